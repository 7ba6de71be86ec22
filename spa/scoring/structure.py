"""Weight-only criteria beyond plain magnitude: random, bn_scale, fpgm, lamp.

Every scorer takes ``(an, stats=None, reduction="sum", **opts)`` and returns raw per-unit scores
(higher = keep), optionally with ``{group_id: note}`` saying where it fell back to another rule.
"""
from __future__ import annotations

import numpy as np

from .magnitude import SliceAccumulator, magnitude_scores


def axis_pairs(cm, axis):
    """(positions, units) of every atom->unit pair on ``axis`` (positions relative to the axis)."""
    sorted_ = getattr(cm, "_pairs_by_atom", None)
    if sorted_ is None:
        order = np.argsort(cm.pair_atom, kind="stable")
        sorted_ = (cm.pair_atom[order], cm.pair_unit[order])
        cm._pairs_by_atom = sorted_
    atoms, units = sorted_
    got = cm.axis_index.get(axis)
    if got is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = np.searchsorted(atoms, [got[0], got[0] + got[1]])
    return atoms[lo:hi] - got[0], units[lo:hi]


def unit_rows(cm, axis, value, d, units):
    """One row per unit of ``units`` (sorted): the slices of ``value`` along ``d`` it owns, flattened.

    None when the units do not own equally many positions on the axis (then no common space).
    """
    pos, uni = axis_pairs(cm, axis)
    keep = np.isin(uni, units)
    pos, uni = pos[keep], uni[keep]
    if len(pos) == 0:
        return None
    order = np.lexsort((pos, uni))
    pos, uni = pos[order], uni[order]
    present, counts = np.unique(uni, return_counts=True)
    if len(present) != len(units) or counts.min() != counts.max():
        return None
    rows = np.moveaxis(value.astype(np.float64), d, 0).reshape(value.shape[d], -1)
    return rows[pos].reshape(len(units), -1)


def random_scores(an, stats=None, reduction="sum", seed=0, **_):
    """Uniform random scores (seeded): the control every criterion must beat."""
    return np.random.default_rng(seed).random(an.channels.n_units)


def l1_scores(an, stats=None, reduction="sum", **_):
    return magnitude_scores(an.channels, "l1", reduction)


def l2_scores(an, stats=None, reduction="sum", **_):
    return magnitude_scores(an.channels, "l2", reduction)


def fallback(an, raw, covered, reduction, why):
    """Fill prunable groups that ``covered`` misses with L2 magnitude; return the notes."""
    notes, l2 = {}, None
    for g in an.groups:
        if not g.prunable or covered[g.units].all():
            continue
        if l2 is None:
            l2 = magnitude_scores(an.channels, "l2", reduction)
        raw[g.units] = l2[g.units]
        notes[g.id] = f"{why}; fell back to l2"
    return notes


def bn_scale_scores(an, stats=None, reduction="sum", **_):
    """|gamma| of the BatchNormalization on the channel (network slimming)."""
    cm = an.channels
    acc = SliceAccumulator(cm)
    for node in an.model.graph.node:
        if node.op_type == "BatchNormalization" and len(node.input) > 1 and node.input[1] in cm.consts:
            acc.add((node.input[1], 0), np.abs(cm.consts[node.input[1]].astype(np.float64)).reshape(-1))
    raw = acc.reduce(reduction)
    notes = fallback(an, raw, acc.covered(), reduction, "no BatchNormalization on this group")
    return raw, notes


def producer_axes(model, consts):
    """Weight axes that are a layer's output channels: Conv W[0], ConvTranspose W[1], Gemm/MatMul columns."""
    out = []
    for node in model.graph.node:
        op = node.op_type
        if len(node.input) < 2 or node.input[1] not in consts:
            continue
        w = node.input[1]
        if op == "Conv":
            out.append((w, 0))
        elif op == "ConvTranspose":
            out.append((w, 1))
        elif op == "Gemm":
            tb = any(a.name == "transB" and a.i for a in node.attribute)
            out.append((w, 0 if tb else 1))
        elif op == "MatMul" and consts[w].ndim >= 2:
            out.append((w, consts[w].ndim - 1))
    return out


def fpgm_scores(an, stats=None, reduction="sum", **_):
    """Distance of each producer filter to the others (FPGM: near the geometric median = redundant).

    For each output-channel weight axis the group runs through, a unit's filter is the slices it
    owns; the score sums its Euclidean distances to the other filters of the group (the usual
    approximation of the distance to the geometric median), summed over the producer layers.
    """
    cm = an.channels
    raw = np.zeros(cm.n_units)
    covered = np.zeros(cm.n_units, bool)
    prods = set(producer_axes(an.model, cm.consts))
    for g in an.groups:
        if not g.prunable:
            continue
        for axis in g.axes:
            if axis not in prods:
                continue
            f = unit_rows(cm, axis, cm.consts[axis[0]], axis[1], g.units)
            if f is None:
                continue
            sq = np.einsum("ij,ij->i", f, f)
            d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (f @ f.T), 0.0)
            np.fill_diagonal(d2, 0.0)
            dist = np.sqrt(d2)
            part = dist.max(1) if reduction == "max" else dist.sum(1)
            if reduction == "mean":
                part = part / max(len(g.units) - 1, 1)
            raw[g.units] += part
            covered[g.units] = True
    notes = fallback(an, raw, covered, reduction, "no producer filter (Conv/Gemm/MatMul output weights)")
    return raw, notes


def lamp_scores(an, stats=None, reduction="sum", **_):
    """Layer-adaptive magnitude pruning at channel level: s_i / sum of s_j over s_j >= s_i (s = L2^2).

    Already comparable across groups, so its default normalisation is ``none``.
    """
    cm = an.channels
    s = np.square(magnitude_scores(cm, "l2", reduction))
    raw = np.zeros(cm.n_units)
    for g in an.groups:
        v = s[g.units]
        order = np.argsort(v, kind="stable")
        tail = np.cumsum(v[order][::-1])[::-1]           # sum over this and every larger score
        out = np.empty_like(v)
        out[order] = np.divide(v[order], tail, out=np.ones_like(tail), where=tail > 0)
        raw[g.units] = out
    return raw
