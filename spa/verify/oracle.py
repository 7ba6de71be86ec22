"""The exactness oracle: the original model with the removed channels' contributions cut.

Pruning a set of channels must give exactly the original model in which those channels are cut
where they are consumed.  The cut keeps every shape: each input of a contraction (Conv, Gemm,
MatMul) or an exact reduction (ReduceSum) that reads a removed channel is multiplied by a 0/1 mask
along that axis.  The pruned model and the cut model must agree to float precision; groups that
reach LayerNorm, a mean or a softmax over their axis are approximate by nature and only checked
for validity.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.masks import insert_masks
from ..io.weights import full_model
from ..runtime.probing import input_feed, session
from ..surgery import slicing
from ..surgery.validate import validate


def cut_model(an, units) -> onnx.ModelProto:
    """Copy of ``an.model`` with the contributions of ``units`` masked out at their consumers."""
    proto = full_model(an.model, an.probe.consts)
    removed = an.channels.removed_atoms(units)
    for name, offset, size, shape, dtype in insert_masks(an, proto, removed):
        part = removed[offset:offset + size]
        proto.graph.initializer.append(numpy_helper.from_array((~part).astype(dtype).reshape(shape), name))
    return proto


#: scale floor of the relative error: outputs whose values are all below it (a saturated sigmoid)
#: are compared absolutely, so onnxruntime's 1e-7 approximation noise there is not a pruning error
SCALE_FLOOR = 0.1


def compare_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feed) -> float:
    """Largest relative error over the graph outputs: ``max|a-b| / max(max|a|, SCALE_FLOOR)``;
    ``feed`` is one input dict or a list of them (every size is compared)."""
    feeds = feed if isinstance(feed, list) else [feed]
    sa, sb = session(a), session(b)
    worst = 0.0
    for f in feeds:
        for x, y in zip(sa.run(None, f), sb.run(None, f)):
            if np.shape(x) != np.shape(y):
                return float("inf")
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            scale = max(np.abs(x).max(initial=0.0), SCALE_FLOOR)
            worst = max(worst, float(np.abs(x - y).max(initial=0.0) / scale))
    return worst


def feeds_at_every_size(an, most=None) -> list:
    """Inputs at every size the analysis ran the model at (the probe's, then each other point:
    every dynamic dim moved up, then down), or the ``most`` cheapest of them (the probe's first,
    then the short point: each dynamic dim still at two sizes)."""
    pr = an.probe
    points = pr.points[1:] if pr.plan is not None else []
    if most is not None:
        points = points[::-1][:most - 1]
    return [pr.inputs] + [input_feed(an.model, plan=pr.plan, values=p, seed=3) for p in points]


def check_groups(an, fraction: float = 0.34, seed: int = 0, groups=None):
    """Prune each prunable group alone and compare with the cut original.

    Returns one dict per group: ``{"group", "removed", "error", "approximate"}`` where error is the
    relative output error of the pruned model against the cut model (``inf`` if shapes differ), the
    worst over two sizes of every dynamic dim (``feeds_at_every_size``).
    Raises whatever surgery or validation raises: a group that cannot be pruned validly is a bug.
    """
    rng = np.random.default_rng(seed)
    results = []
    for g in (groups if groups is not None else an.groups):
        if not g.prunable:
            continue
        k = max(1, min(g.channels - 1, int(round(g.channels * fraction))))
        units = np.sort(rng.choice(g.units, size=k, replace=False))
        pruned = slicing.apply(an.model, an.channels, an.probe, units)
        validate(pruned, an, every_size=False)  # compared at two sizes below
        err = compare_outputs(cut_model(an, units), pruned, feeds_at_every_size(an, most=2))
        results.append({"group": g.id, "removed": k, "error": err, "approximate": g.approximate})
    return results


def check_joint(an, fraction: float = 0.34, seed: int = 0, approximate: bool = False):
    """Prune every prunable group at once (random channels) and compare with the cut original.

    One surgery and two runs for the whole model, so it scales to ViT-sized graphs; it also checks
    that groups pruned together (heads and head dims, concat segments) compose.  With
    ``approximate=False`` only exact groups are pruned and the error is returned; with True every
    group is pruned and only validity is checked (error is then informative, not bounded).
    """
    rng = np.random.default_rng(seed)
    chosen = [g for g in an.groups if g.prunable and (approximate or not g.approximate)]
    units = []
    for g in chosen:
        k = max(1, min(g.channels - 1, int(round(g.channels * fraction))))
        units.append(rng.choice(g.units, size=k, replace=False))
    units = np.sort(np.concatenate(units)) if units else np.zeros(0, np.int64)
    pruned = slicing.apply(an.model, an.channels, an.probe, units)
    validate(pruned, an)
    return {"groups": len(chosen), "removed": int(len(units)),
            "error": compare_outputs(cut_model(an, units), pruned, feeds_at_every_size(an)), "model": pruned}
