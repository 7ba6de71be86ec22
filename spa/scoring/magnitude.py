"""L1 / L2 magnitude of every weight slice a channel owns, reduced over the slices.

A channel owns a slice of each weight tensor along every axis it runs through: the output filter
of the Conv that makes it, the BN scale and shift, the input columns of every consumer.  Each slice
gets a value (sum |w| for L1, sum w^2 for L2) and the channel's raw score reduces the values of its
slices with ``sum`` (the default), ``mean`` or ``max``; L2 is square-rooted at the end.
``normalise`` divides by the group mean so that scores are comparable across groups for a global
ranking.  BN running statistics are not weights and are left out.
"""
from __future__ import annotations

import numpy as np

from ..io.weights import RELEASE_ABOVE, is_float, release_pages

REDUCTIONS = ("sum", "mean", "max")
NORMALISATIONS = ("mean", "max", "none")


class SliceAccumulator:
    """Per-atom values from any number of slices, reduced per unit (vectorised, O(atoms + pairs))."""

    def __init__(self, cm):
        self.cm = cm
        self.total = np.zeros(cm.n_atoms, np.float64)
        self.count = np.zeros(cm.n_atoms, np.float64)
        self.peak = np.full(cm.n_atoms, -np.inf)

    def add(self, axis, values) -> bool:
        got = self.cm.axis_index.get(axis)
        values = np.asarray(values, np.float64).reshape(-1)
        if got is None or got[1] != len(values):
            return False
        sl = slice(got[0], got[0] + got[1])
        self.total[sl] += values
        self.count[sl] += 1
        np.maximum(self.peak[sl], values, out=self.peak[sl])
        return True

    def covered(self) -> np.ndarray:
        """Units with at least one slice."""
        cm = self.cm
        return np.bincount(cm.pair_unit, weights=self.count[cm.pair_atom], minlength=cm.n_units) > 0

    def reduce(self, reduction: str = "sum") -> np.ndarray:
        cm = self.cm
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
        if reduction == "max":
            out = np.full(cm.n_units, -np.inf)
            np.maximum.at(out, cm.pair_unit, self.peak[cm.pair_atom])
            out[~np.isfinite(out)] = 0.0
            return out
        s = np.bincount(cm.pair_unit, weights=self.total[cm.pair_atom], minlength=cm.n_units)
        if reduction == "mean":
            c = np.bincount(cm.pair_unit, weights=self.count[cm.pair_atom], minlength=cm.n_units)
            s = s / np.maximum(c, 1.0)
        return s


def weight_slices(cm, fn):
    """Feed ``fn(name, value, dims)`` -> ``{d: per-position values}`` for the channel axes ``dims``
    of every weight (all of a weight's axes at once: one pass over it).
    Weights read from a file's memory map give their pages back after use (``spa.io.weights``)."""
    acc = SliceAccumulator(cm)
    for name, value in cm.consts.items():
        if name in cm.dequant:   # a quantized weight: its real values
            value = dequantized(cm, name, value)
        if name in cm.stats or not is_float(value.dtype) or value.ndim == 0:
            continue
        dims = [d for d in range(value.ndim) if (got := cm.axis_index.get((name, d))) is not None and got[1] > 1]
        if not dims:
            continue
        for d, values in fn(name, value, dims).items():
            acc.add((name, d), values)
        if value.nbytes > RELEASE_ABOVE:
            release_pages([value])
    return acc


def dequantized(cm, name, value) -> np.ndarray:
    """``(value - zero_point) * scale`` of a quantized weight (``ChannelModel.dequant``), float32."""
    scale, zp, axis = cm.dequant[name]
    s = np.asarray(cm.consts[scale], np.float32)
    z = np.asarray(cm.consts[zp], np.float32) if zp and zp in cm.consts else np.float32(0)
    if axis is not None and s.ndim == 1:
        shape = [1] * value.ndim
        shape[axis] = -1
        s = s.reshape(shape)
        z = z.reshape(shape) if np.ndim(z) == 1 else z
    return (value.astype(np.float32) - z) * s


#: bytes of float64 per slab of ``axis_sums``
SLAB_BYTES = 4 << 20


def axis_sums(value: np.ndarray, d: int, fn) -> np.ndarray:
    """``fn(x).sum`` over every axis but ``d``, in float64, a slab at a time (a 32000 x 3200 fp16
    embedding as float64 squares is 1.6 GB at once)."""
    return all_axis_sums(value, [d], fn)[d]


def all_axis_sums(value: np.ndarray, dims, fn) -> dict:
    """``{d: fn(x).sum over every axis but d}`` for each of ``dims``, reading ``value`` once: slabs
    of rows (axis 0, views of a memory map, no copy) converted to float64 one at a time."""
    if value.ndim == 1:
        return {d: fn(value.astype(np.float64)) for d in dims}
    rows = value.shape[0]
    step = max(1, int(rows * SLAB_BYTES // max(value.size * 8, 1)))
    out = {d: np.zeros(value.shape[d], np.float64) for d in dims}
    for start in range(0, rows, step):
        f = fn(value[start:start + step].astype(np.float64))
        for d in dims:
            other = tuple(i for i in range(value.ndim) if i != d)
            if d == 0:
                out[0][start:start + step] = f.sum(axis=other)
            else:
                out[d] += f.sum(axis=other)
    return out


def magnitude_scores(cm, criterion: str = "l2", reduction: str = "sum") -> np.ndarray:
    """Raw per-unit scores for every unit of the channel model (vectorised over all weights)."""
    if criterion not in ("l1", "l2"):
        raise ValueError(f"unknown magnitude criterion {criterion!r}")

    def per_slice(name, value, dims):
        return all_axis_sums(value, dims, np.abs if criterion == "l1" else np.square)

    scores = weight_slices(cm, per_slice).reduce(reduction)
    return np.sqrt(scores) if criterion == "l2" else scores


def normalise(scores: np.ndarray, groups, how: str = "mean") -> np.ndarray:
    """Divide each group's scores by their mean (or max); ``none`` leaves them as they are."""
    if how not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALISATIONS)}")
    out = scores.astype(np.float64).copy()
    if how == "none":
        return out
    for g in groups:
        s = out[g.units]
        m = (s.mean() if how == "mean" else s.max()) if len(s) else 0.0
        out[g.units] = s / m if m > 0 else 1.0
    return out
