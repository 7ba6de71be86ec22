"""How closely a pruned model follows the original, measured in onnxruntime: the guard every prune
reports, and (``--target fidelity=C``) the allocation of channels across groups that keeps the
outputs at a cosine C to the original's while removing as many MACs as it can.

Fidelity of a model to the original on some inputs is the smallest, over the graph outputs, cosine
similarity of the flattened outputs (float64; an integer output counts the fraction of equal
elements).  The guard measures it on the probe's inputs (random, with realistic integer ranges).
"""
from __future__ import annotations

import numpy as np

from . import probing
from .io import initializer_arrays

#: the CLI warns below this fidelity
WARN_BELOW = 0.9


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


def compare(reference: dict, got: dict) -> dict:
    """``{"cosine": {output: c}, "min": smallest}`` of ``got`` against ``reference`` (output -> value)."""
    per = {k: round(cosine(v, got.get(k)), 6) for k, v in reference.items()}
    return {"cosine": per, "min": min(per.values()) if per else 1.0}


def guard(first, pruned, weights) -> dict:
    """The pruned model's fidelity on the probe's inputs (the report's ``fidelity``)."""
    runner = probing.output_runner(pruned, initializer_arrays(pruned, weights))
    got = runner.run(dict(first.probe.inputs))
    out = compare(first.probe.outputs, got)
    out["inputs"] = "the probe's random inputs (" + ", ".join(
        f"{k}:{list(np.shape(v))}" for k, v in first.probe.inputs.items()) + ")"
    return out

