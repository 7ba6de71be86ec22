"""How closely a pruned model follows the original, measured in onnxruntime: the guard every prune
reports (the allocation that reaches a fidelity target is ``spa.planning.allocation``).

Fidelity of a model to the original on a set of inputs is the smallest, over the graph outputs,
cosine similarity of the output over the whole set (flattened, float64; an integer output counts
the fraction of equal elements).  The guard measures it on two batches of the --calib data, or of synthetic inputs at the probe's
sizes (``spa.runtime.synthetic``: 1/f noise for images, rendered lines for a text recogniser, realistic
integer ranges).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..io import initializer_arrays
from ..io.weights import release_pages, trim_heap
from ..runtime import calib, probing, synthetic, textgen
from . import agreement

#: the CLI warns below this fidelity
WARN_BELOW = 0.9
#: --calib batches fidelity is measured on (at most)
CALIB_BATCHES = 8
#: synthetic inputs of a model cheap enough are given more batches, up to this many samples (images,
#: lines) and this many MACs in all: a discrete agreement over the two batches of 16 lines PaddleOCR's
#: direction classifier got said 1.0 where 256 other lines said 0.91 (and 400 held-out ones 0.91);
#: a search that keeps the most aggressive prune those 32 lines allow picks the one that fits them
GUARD_SAMPLES = 256
GUARD_MACS = 16e9


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


def compare_runs(reference: list, outputs, digits: int | None = 6, metrics: dict | None = None,
                 feeds: list | None = None) -> dict:
    """Fidelity of ``outputs`` (runs: output name -> value, an iterable, consumed one run at a time)
    to ``reference`` (the original's runs on the same ``feeds``): ``{"cosine": {output: c}, "min":
    smallest}``, where per output the cosine is over every run at once (the set as one tensor:
    steadier than the worst batch; an integer output counts the fraction of equal elements),
    accumulated run by run in float64 chunks, never concatenated.  With ``metrics`` ({output:
    metric}, ``agreement.plan``) also ``metric``, ``agreement`` ({output: value in [0, 1]}) and
    ``details`` (KL, perplexity ratio...), and ``min`` is the smallest agreement (the cosine where an
    output's metric is ``cosine``).  Rounded to ``digits`` (None: unrounded)."""
    tallies = {k: agreement.Tally(m, lm=metrics.get("_lm")) for k, m in (metrics or {}).items()
               if k != "_lm" and m != "cosine"}

    def tallied():
        for i, (ref, got) in enumerate(zip(reference, outputs)):
            for k, t in tallies.items():
                if got.get(k) is not None and np.shape(got[k]) == np.shape(ref[k]):
                    t.add(ref[k], got[k], feeds[i] if feeds else None)
                else:
                    t.broken = True
            yield got
    per = _cosines(reference, tallied())
    rnd = (lambda x: x) if digits is None else (lambda x: round(x, digits))  # noqa: E731
    out = {"cosine": {k: rnd(c) for k, c in per.items()}}
    if metrics:
        measured = {k: t.value() for k, t in tallies.items()}
        used = {k: m for k, m in metrics.items() if k in per and measured.get(k) is not None}
        agree = {k: measured[k] if k in used and k in tallies else per[k] for k in per}
        out["metric"] = {k: used.get(k, "cosine") for k in per}
        out["agreement"] = {k: rnd(v) for k, v in agree.items()}
        details = {k: t.extra() for k, t in tallies.items() if k in used and t.extra()}
        if details:
            out["details"] = details
        out["min"] = min(out["agreement"].values()) if agree else 1.0
    else:
        out["min"] = min(out["cosine"].values()) if per else 1.0
    return out


def metrics_for(an, opts, first_run: dict) -> dict:
    """``{output: metric}`` for the guard and the allocation (``agreement.plan``, ``--fidelity-metric``),
    with the causal-LM reading under ``_lm`` for the ``tokens`` metric."""
    got = agreement.plan(an, first_run, getattr(opts, "fidelity_metric", "auto"))
    got["_lm"] = textgen.causal_lm(an)
    return got


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
    ``REFERENCE_BYTES`` (the first batch always).  The outputs are copies: one that an arena session
    returned keeps the session's whole arena while it lives."""
    kept, outputs, size = [], [], 0
    for f in feeds:
        out = {k: np.array(v) for k, v in runner.run(f).items()}
        size += sum(np.asarray(v).nbytes for v in out.values())
        if outputs and size > REFERENCE_BYTES:
            break
        kept.append(f)
        outputs.append(out)
    return kept, outputs


class Reference(NamedTuple):
    """What the guard compares the pruned model with (``reference``)."""
    feeds: list
    outputs: list          # the original's outputs on ``feeds``
    inputs: str            # what the feeds are
    metrics: dict          # {output: metric} (``metrics_for``)
    caution: str | None    # why the number may not reflect the task (``weak_inputs``), or None


def reference(first, opts, progress=None, ahead: int = 0) -> Reference:
    """The guard's :class:`Reference`: ``eval_feeds`` (up to ``CALIB_BATCHES`` batches of the --calib
    data, or two synthetic ones, within ``REFERENCE_BYTES``), the original's outputs on them and the
    task metric of each output.  Run before surgery, while the original's weights are read anyway,
    and their pages handed back: the guard then runs only the pruned model (running the original
    after surgery would hold both models' weights at once: 1.5x a 1B decoder's size).  The outputs
    kept are copies and the heap is trimmed after the session: an output kept from an arena session
    kept the whole arena (SmolLM2's 200 MB of logits held 0.58 GB to the end of the prune).  The
    session keeps its arena: without one, a run of 4 x 256 tokens of SmolLM2 peaked 0.36 GB higher
    (every tensor malloc'd apart)."""
    feeds, what = eval_feeds(first, opts, progress=progress, ahead=ahead)
    original = probing.output_runner(first.model, first.probe.consts)
    kept, outputs = reference_runs(original, feeds)
    del original
    release_pages(first.probe.consts.values())
    trim_heap()
    if len(kept) < len(feeds):
        what = f"{what}; the first {len(kept)} of them (the outputs kept to compare with are bounded)"
    return Reference(kept, outputs, what, metrics_for(first, opts, outputs[0]), weak_inputs(first, opts))


def weak_inputs(an, opts) -> str | None:
    """Why fidelity on spa's own inputs may say little about the model's task, or None: real data
    (--calib), text a language model wrote itself and rendered text lines for a text model are like
    its data; 1/f noise, random values and integer ranges are not (the PP-OCRv4 direction
    classifier printed 0.99 on noise at 44% of its orientation accuracy on real lines)."""
    if opts.calib is not None and str(opts.calib) not in ("random", "synthetic"):
        return None
    if textgen.causal_lm(an) is not None:
        return None
    if synthetic.kind(an, opts.synthetic) == "text lines":
        return None
    return ("measured on synthetic inputs unlike the model's data: the number may not reflect its task; "
            "give --calib with a few dozen real samples")


def guard(ref: Reference, pruned, weights, opts) -> dict:
    """The pruned model's fidelity on the ``reference`` feeds: the report's ``fidelity``: per output the
    agreement its task would measure (``spa.planning.agreement``: next-token agreement for a language
    model, top-1 for class scores, greedy CTC decoding for a recogniser...), the cosine beside it,
    which inputs it was measured on, and a ``caution`` where those are unlike the model's data.  The
    cosine alone says little: 0.99 on a decoder at 1.3x dense perplexity, 0.91 on one at 13x."""
    runner = probing.output_runner(pruned, initializer_arrays(pruned, weights))
    out = compare_runs(ref.outputs, (runner.run(f) for f in ref.feeds), metrics=ref.metrics, feeds=ref.feeds)
    del runner
    trim_heap()
    out["inputs"] = ref.inputs
    if ref.caution:
        out["caution"] = ref.caution
    return out


def eval_feeds(an, opts, n: int = 2, progress=None, ahead: int = 0) -> tuple[list, str]:
    """``(feeds, what they are)``: the inputs fidelity is measured on, up to ``CALIB_BATCHES``
    --calib batches when given, else ``n`` synthetic batches at the probe's sizes (``spa.runtime.synthetic``,
    seed 101; more for a cheap model: ``GUARD_SAMPLES``; ``progress`` hears a language model write its
    text).  A language model's are the first
    ``n`` batches of the text its statistics are written from (seed ``opts.seed``), as the --calib
    batches are the statistics' own: ``ahead`` batches of that text, which a later stage will read,
    are written in the same run (one batch of 32 sequences costs less than 8 and then 24)."""
    if opts.calib is not None and str(opts.calib) not in ("random", "synthetic"):
        feeds = calib.batches(an, opts.calib, n_batches=CALIB_BATCHES, batch_size=opts.calib_batch_size)[1][:CALIB_BATCHES]
        return feeds, f"{len(feeds)} batches of calibration data"
    if textgen.causal_lm(an) is not None:
        what, got = synthetic.feeds(an, max(n, ahead), seed=opts.seed, progress=progress)
        if len(got) > n:
            what = f"{what}, the first {n} of them"
        return got[:n], f"{what} at the probe's sizes"
    n = max(n, _guard_batches(an, synthetic.rows_per_batch(an, opts.synthetic)))
    what, got = synthetic.feeds(an, n, seed=101, wanted=opts.synthetic, progress=progress)
    return got, f"{what} at the probe's sizes"


def _guard_batches(an, rows: int) -> int:
    """Synthetic batches of ``rows`` samples to measure fidelity on: enough for ``GUARD_SAMPLES``
    samples where ``GUARD_MACS`` allow (``batch_macs``), else 2.  Only where two batches already hold
    the samples a discrete agreement needs (``agreement.MIN_SAMPLES``): more batches make the same
    metric reliable, they do not turn a cosine over two images of a static-batch model into a top-1
    agreement over hundreds."""
    if 2 * rows < agreement.MIN_SAMPLES["top1"]:
        return 2
    wanted = -(-GUARD_SAMPLES // rows)
    return int(max(2, min(wanted, GUARD_MACS // batch_macs(an, rows))))


def batch_rows(feed: dict) -> int:
    """The batch dim of a feed (its first input with one)."""
    return max(next((np.shape(v)[0] for v in feed.values() if np.ndim(v)), 1), 1)


def batch_macs(an, rows: int) -> float:
    """The MACs of one run on a batch of ``rows``: the analysis's (at the probe's inputs) scaled by the batch."""
    return max(an.macs * rows / batch_rows(an.probe.inputs), 1.0)


#: the cosine's weight in a measured drift beside the task agreement: a tie-breaker (on a few samples a
#: discrete agreement stays at 1 for removals that do move the outputs)
COSINE_TIE = 0.01


def drift_of(reference: list, outputs, metrics: dict | None = None, feeds: list | None = None) -> float:
    """How far ``outputs`` moved from ``reference`` (:func:`compare_runs`): 1 - the task agreement,
    plus ``COSINE_TIE`` times 1 - the cosine; >= 0.  What the sensitivity table and the depth
    prune's iterative removal minimise."""
    got = compare_runs(reference, outputs, None, metrics, feeds)
    return max((1.0 - got["min"]) + COSINE_TIE * (1.0 - min(got["cosine"].values(), default=1.0)), 0.0)


def fidelity_on(reference: list, outputs, metrics: dict | None = None, feeds: list | None = None) -> float:
    """Fidelity over a set of batches (:func:`compare_runs`): the smallest agreement over the outputs
    (the cosine without ``metrics``), unrounded (``meets`` compares it with a target)."""
    return compare_runs(reference, outputs, digits=None, metrics=metrics, feeds=feeds)["min"]
