"""L1 / L2 magnitude of every weight slice a channel owns, summed over the slices.

A channel owns a slice of each weight tensor along every axis it runs through: the output filter
of the Conv that makes it, the BN scale and shift, the input columns of every consumer.  The raw
score sums |w| (L1) or w^2 (L2, square-rooted at the end) over all of them; ``normalise`` divides
by the group mean so that scores are comparable across groups for a global ranking.  BN running
statistics are not weights and are left out.
"""
from __future__ import annotations

import numpy as np


def magnitude_scores(cm, criterion: str = "l2") -> np.ndarray:
    """Raw per-unit scores for every unit of the channel model (vectorised over all weights)."""
    if criterion not in ("l1", "l2"):
        raise ValueError(f"unknown magnitude criterion {criterion!r}")
    per_atom = np.zeros(cm.n_atoms, np.float64)
    for name, value in cm.consts.items():
        if name in cm.stats or not np.issubdtype(value.dtype, np.floating) or value.ndim == 0:
            continue
        mag = np.abs(value.astype(np.float64)) if criterion == "l1" else np.square(value.astype(np.float64))
        for d in range(value.ndim):
            got = cm.axis_index.get((name, d))
            if got is None or got[1] <= 1:
                continue
            other = tuple(i for i in range(value.ndim) if i != d)
            per_atom[got[0]:got[0] + got[1]] += mag.sum(axis=other) if other else mag
    scores = np.bincount(cm.pair_unit, weights=per_atom[cm.pair_atom], minlength=cm.n_units)
    return np.sqrt(scores) if criterion == "l2" else scores


def normalise(scores: np.ndarray, groups) -> np.ndarray:
    """Divide each group's scores by their mean (the normalisation named in reports: 'mean')."""
    out = scores.astype(np.float64).copy()
    for g in groups:
        s = out[g.units]
        m = s.mean() if len(s) else 0.0
        out[g.units] = s / m if m > 0 else 1.0
    return out
