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
from ..runtime import calib, probing, synthetic

#: the CLI warns below this fidelity
WARN_BELOW = 0.9
#: --calib batches fidelity is measured on (at most)
CALIB_BATCHES = 8


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return 0.0
    if not np.issubdtype(a.dtype, np.floating):
        return float(np.mean(a == b)) if a.size else 1.0
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0 or not (np.isfinite(na) and np.isfinite(nb)):
        return 0.0
    return float(np.dot(a, b) / (na * nb))


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
    per = {k: cosine(v, got.get(k)) for k, v in reference.items()}
    if digits is not None:
        per = {k: round(c, digits) for k, c in per.items()}
    return {"cosine": per, "min": min(per.values()) if per else 1.0}


def reference(first, opts) -> tuple[list, list, str]:
    """``(feeds, the original's outputs on them, what the feeds are)`` for the guard: ``eval_feeds`` (two batches of the
    --calib data, or synthetic).  Run before surgery, while the original's weights are read anyway,
    and their pages handed back: the guard then runs only the pruned model (running the original
    after surgery would hold both models' weights at once: 1.5x a 1B decoder's size)."""
    feeds, what = eval_feeds(first, opts)
    original = probing.output_runner(first.model, first.probe.consts)
    outputs = [original.run(f) for f in feeds]
    del original
    release_pages(first.probe.consts.values())
    return feeds, outputs, what


def guard(ref, pruned, weights, opts) -> dict:
    """The pruned model's fidelity on the ``reference`` feeds: the report's ``fidelity``."""
    feeds, outputs, what = ref
    runner = probing.output_runner(pruned, initializer_arrays(pruned, weights))
    out = compare(_stacked(outputs), _stacked([runner.run(f) for f in feeds]))
    out["inputs"] = what
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


def fidelity_on(reference: list, outputs: list) -> float:
    """Fidelity over a set of batches: each output's cosine over all of them at once (the set as one
    tensor: steadier than the worst batch), the smallest over the outputs; unrounded (``meets``)."""
    return compare(_stacked(reference), _stacked(outputs), digits=None)["min"]


def _stacked(runs: list) -> dict:
    if not runs:
        return {}
    return {k: np.concatenate([np.ravel(r[k]) for r in runs]) for k in runs[0]}
