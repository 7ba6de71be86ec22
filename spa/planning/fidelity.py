"""How closely a pruned model follows the original, measured in onnxruntime: the guard every prune
reports (the allocation that reaches a fidelity target is ``spa.planning.allocation``).

Fidelity of a model to the original on a set of inputs is the smallest, over the graph outputs,
cosine similarity of the output over the whole set (flattened, float64; an integer output counts
the fraction of equal elements).  The guard measures it on two batches of the --calib data, or of synthetic inputs at the probe's
sizes (``spa.runtime.synthetic``: 1/f noise for images, rendered lines for a text recogniser, realistic
integer ranges).
"""
from __future__ import annotations

import numpy as np

from ..io import initializer_arrays
from ..io.weights import release_pages
from ..runtime import calib, probing, synthetic, textgen

#: the CLI warns below this fidelity
WARN_BELOW = 0.9
#: --calib batches fidelity is measured on (at most)
CALIB_BATCHES = 8


def cosine(a, b) -> float:
    """The cosine of two arrays (flattened, float64); of integer ones, the fraction of equal elements."""
    return _cosines([{"x": np.asarray(a)}], [{"x": b}])["x"]


#: ``--target fidelity=1`` (or any C above it): the outputs must stay the original's to the exactness
#: oracle's tolerance, 1 - cosine <= 1e-10 (a relative L2 error of 1.4e-5; float32 rounding of a
#: removal that changes nothing, a dead channel, is ~1e-14): only such channels go
EXACT = 1.0 - 1e-10


def meets(fid: float, target: float) -> bool:
    """Whether a measured (unrounded) fidelity reaches ``target`` (``EXACT`` for a target of 1)."""
    return fid >= min(target, EXACT)


def compare(reference: dict, got: dict, digits: int | None = 6) -> dict:
    """``{"cosine": {output: c}, "min": smallest}`` of ``got`` against ``reference`` (output -> value),
    rounded to ``digits`` (the report's; None: unrounded, what a search compares with its target)."""
    return compare_runs([reference], [got], digits)


#: elements cast to float64 at a time while comparing (bounds the temporaries: a decoder's logits
#: over a batch of text are hundreds of MB)
_CHUNK = 1 << 22
#: the original's outputs the guard and the allocation keep to compare with (at least one batch):
#: a batch of 4 x 256 tokens of a 49k-word decoder's logits is 200 MB, 8 of them were 1.6 GB
REFERENCE_BYTES = 256 << 20


def compare_runs(reference: list, outputs, digits: int | None = 6) -> dict:
    """``{"cosine": {output: c}, "min": smallest}``: fidelity of ``outputs`` (runs: output name -> value,
    an iterable, consumed one run at a time) to ``reference`` (the original's runs on the same feeds):
    per output, the cosine over every run at once (the set as one tensor: steadier than the worst
    batch; an integer output counts the fraction of equal elements), accumulated run by run in
    float64 chunks, never concatenated; rounded to ``digits`` (None: unrounded)."""
    per = _cosines(reference, outputs)
    if digits is not None:
        per = {k: round(c, digits) for k, c in per.items()}
    return {"cosine": per, "min": min(per.values()) if per else 1.0}


def _cosines(reference: list, outputs) -> dict:
    names = list(reference[0]) if reference else []
    sums = {k: np.zeros(3) for k in names}     # a.b, a.a, b.b  (integers: equal, total, -)
    bad = set()
    for ref, got in zip(reference, outputs):
        for k in names:
            a, b = np.asarray(ref[k]), got.get(k)
            if b is None or np.shape(b) != a.shape:
                bad.add(k)
                continue
            a, b = a.reshape(-1), np.asarray(b).reshape(-1)
            if not np.issubdtype(a.dtype, np.floating):
                sums[k] += (np.count_nonzero(a == b), a.size, 0)
                continue
            for i in range(0, a.size, _CHUNK):
                x, y = a[i:i + _CHUNK].astype(np.float64), b[i:i + _CHUNK].astype(np.float64)
                sums[k] += (x @ y, x @ x, y @ y)
    per = {}
    for k in names:
        dot, aa, bb = sums[k]
        if k in bad:
            c = 0.0
        elif not np.issubdtype(np.asarray(reference[0][k]).dtype, np.floating):
            c = dot / aa if aa else 1.0
        elif aa == 0.0 and bb == 0.0:
            c = 1.0
        elif aa == 0.0 or bb == 0.0 or not (np.isfinite(aa) and np.isfinite(bb)):
            c = 0.0
        else:
            c = float(dot / np.sqrt(aa * bb))
        per[k] = float(c)
    return per


def reference_runs(runner, feeds) -> tuple[list, list]:
    """``(feeds, outputs)``: ``runner`` run on ``feeds`` while the outputs kept stay within
    ``REFERENCE_BYTES`` (the first batch always)."""
    kept, outputs, size = [], [], 0
    for f in feeds:
        out = runner.run(f)
        size += sum(np.asarray(v).nbytes for v in out.values())
        if outputs and size > REFERENCE_BYTES:
            break
        kept.append(f)
        outputs.append(out)
    return kept, outputs


def token_agreement(logits, ids) -> tuple[float, int, np.ndarray]:
    """``(sum of next-token negative log-likelihoods, tokens, argmax)`` of a causal LM's ``logits``
    [batch, sequence, vocab] on the token ``ids`` [batch, sequence] it read (each position predicts
    the next token), computed in float64 a row at a time."""
    nll, count, top = 0.0, 0, []
    for row, x in zip(logits, ids):
        z = np.asarray(row[:-1], np.float64)
        m = z.max(1)
        lse = m + np.log(np.exp(z - m[:, None]).sum(1))
        nll += float((lse - z[np.arange(len(z)), x[1:]]).sum())
        count += len(z)
        top.append(z.argmax(1))
    return nll, count, np.stack(top) if top else np.zeros((0, 0), np.int64)


def _lm_figures(lm, feeds, outputs) -> list:
    return [token_agreement(o[lm.logits], f[lm.ids]) for f, o in zip(feeds, outputs)]


def reference(first, opts) -> tuple:
    """``(feeds, the original's outputs on them, what the feeds are, its next-token figures)`` for the
    guard: ``eval_feeds`` (up to ``CALIB_BATCHES`` batches of the --calib data, or two synthetic ones,
    within ``REFERENCE_BYTES``); the last item, for a causal language model (``textgen.causal_lm``),
    is ``(lm, token_agreement per batch)``, else None.  Run before surgery, while the original's
    weights are read anyway, and their pages handed back: the guard then runs only the pruned model
    (running the original after surgery would hold both models' weights at once: 1.5x a 1B decoder's
    size)."""
    feeds, what = eval_feeds(first, opts)
    original = probing.output_runner(first.model, first.probe.consts)
    kept, outputs = reference_runs(original, feeds)
    del original
    release_pages(first.probe.consts.values())
    if len(kept) < len(feeds):
        what = f"{what}; the first {len(kept)} of them (the outputs kept to compare with are bounded)"
    lm = textgen.causal_lm(first)
    return kept, outputs, what, (lm, _lm_figures(lm, kept, outputs)) if lm is not None else None


def guard(ref, pruned, weights, opts) -> dict:
    """The pruned model's fidelity on the ``reference`` feeds: the report's ``fidelity``.  For a causal
    language model also what a reader of its text would see (``language_model``): the pruned model's
    perplexity on those tokens over the original's, and how often its next-token choice is the
    original's; the outputs' cosine says little there (0.99 on a model at 1.3x dense perplexity,
    0.91 on one at 13x)."""
    feeds, outputs, what, lm_ref = ref
    runner = probing.output_runner(pruned, initializer_arrays(pruned, weights))
    runs = []       # the next-token figures of each run (a run's logits are not kept)

    def pruned_runs():
        for f in feeds:
            got = runner.run(f)
            if lm_ref is not None:
                runs.append(token_agreement(got[lm_ref[0].logits], f[lm_ref[0].ids]))
            yield got
    out = compare_runs(outputs, pruned_runs())
    out["inputs"] = what
    if lm_ref is not None and len(runs) == len(lm_ref[1]):
        (nll0, n, top0), (nll1, _, top1) = [(sum(r[0] for r in rs), sum(r[1] for r in rs),
                                             np.concatenate([r[2].ravel() for r in rs]))
                                            for rs in (lm_ref[1], runs)]
        out["language_model"] = {"perplexity_ratio": round(float(np.exp((nll1 - nll0) / max(n, 1))), 4),
                                 "next_token_agreement": round(float(np.mean(top0 == top1)), 4), "tokens": int(n)}
    return out


def eval_feeds(an, opts, n: int = 2) -> tuple[list, str]:
    """``(feeds, what they are)``: the inputs fidelity is measured on, up to ``CALIB_BATCHES``
    --calib batches when given, else ``n`` synthetic batches at the probe's sizes (``spa.runtime.synthetic``,
    seed 101)."""
    if opts.calib is not None and str(opts.calib) not in ("random", "synthetic"):
        feeds = calib.batches(an, opts.calib, n_batches=CALIB_BATCHES, batch_size=opts.calib_batch_size)[1][:CALIB_BATCHES]
        return feeds, f"{len(feeds)} batches of calibration data"
    what, got = synthetic.feeds(an, n, seed=101, wanted=opts.synthetic)
    return got, f"{what} at the probe's sizes"


def fidelity_on(reference: list, outputs) -> float:
    """Fidelity over a set of batches (:func:`compare_runs`): the smallest over the outputs, unrounded
    (``meets`` compares it with a target)."""
    return compare_runs(reference, outputs, digits=None)["min"]
