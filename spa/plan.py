"""Which channels go: local (per group) or global ranking, rounding, exclusions, limits."""
from __future__ import annotations

import math
import re

import numpy as np

from .errors import SpaError


def _n_remove(n: int, want: int, round_to: int, max_ratio: float) -> int:
    """How many of ``n`` channels to remove: capped, rounded so that kept % round_to == 0, never all."""
    want = min(want, int(math.floor(n * max_ratio)), n - 1)
    want = max(want, 0)
    if round_to > 1 and want > 0:
        kept = n - want
        kept = int(math.ceil(kept / round_to) * round_to)
        if kept >= n:
            return 0
        want = n - kept
    return max(0, min(want, n - 1))


def selectable(groups, exclude: str | None = None):
    """Prunable groups not protected by ``exclude`` (a regex matched against node names)."""
    pattern = None
    if exclude:
        try:
            pattern = re.compile(exclude)
        except re.error as exc:
            raise SpaError(f"--exclude: invalid regular expression {exclude!r} ({exc})") from None
    out = []
    for g in groups:
        if not g.prunable:
            continue
        if pattern is not None and any(pattern.search(name) for name, _ in g.nodes):
            continue
        out.append(g)
    return out


def plan(groups, scores, ratio: float, *, global_rank: bool = False, round_to: int = 1,
         exclude: str | None = None, max_ratio: float = 0.9) -> dict:
    """Map group id -> unit ids to remove.  ``scores`` are normalised per-unit scores."""
    if not 0.0 <= ratio < 1.0:
        raise SpaError(f"--ratio must be in [0, 1), got {ratio}")
    if round_to < 1:
        raise SpaError(f"--round-to must be >= 1, got {round_to}")
    chosen = selectable(groups, exclude)
    removal = {}
    if not chosen or ratio == 0:
        return removal
    if global_rank:
        all_scores = np.concatenate([scores[g.units] for g in chosen])
        k = int(math.floor(len(all_scores) * ratio))
        if k == 0:
            return removal
        threshold = np.partition(all_scores, k - 1)[k - 1]
        wants = {g.id: int((scores[g.units] <= threshold).sum()) for g in chosen}
    else:
        wants = {g.id: int(math.floor(g.channels * ratio + 1e-9)) for g in chosen}
    for g in chosen:
        n = _n_remove(g.channels, wants[g.id], round_to, max_ratio if global_rank else 1.0)
        if n:
            order = np.argsort(scores[g.units], kind="stable")
            removal[g.id] = np.sort(g.units[order[:n]])
    return removal
