"""Which experts stay: ``--target experts=F`` keeps the best-scored fraction F of every layer.

Per layer by default: router norms and TCESS of different layers are not on one scale, and every
layer routes every token, so each keeps the same share.  With ``global_rank`` (``--global``) the
fraction is of all experts together: each layer's scores are divided by their mean (the channel
groups' ``mean`` normalisation), every layer keeps its TopK's k best, and the rest of the budget goes
to the best normalised scores wherever they are (a task that lives in a few layers' experts keeps
more of those).  A layer keeps at least its TopK's k experts; a per-layer fraction that would keep
fewer is an error, not a silent clamp (the user asked for a size the model cannot have).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import SpaError


def n_kept(fraction: float, experts: int) -> int:
    """How many of ``experts`` a fraction keeps: rounded half up, at least one."""
    return max(1, min(experts, int(math.floor(fraction * experts + 0.5))))


def plan_experts(layers, scores: dict, fraction: float, global_rank: bool = False) -> dict:
    """``{layer index: kept expert ids (sorted)}`` for every layer that can lose experts."""
    if not 0.0 < fraction <= 1.0:
        raise SpaError(f"--target experts=F: F is the fraction of each layer's experts kept, in (0, 1], got {fraction}")
    live = [layer for layer in layers if not layer.blocked]
    if not live:
        why = "; ".join(f"layer {layer.index}: {layer.blocked}" for layer in layers) or "no TopK-routed layer found"
        raise SpaError(f"--target experts=F: no mixture-of-experts layer can lose experts ({why})")
    if global_rank:
        return _global(live, scores, fraction)
    kept = {}
    for layer in live:
        n = n_kept(fraction, layer.experts)
        if n < layer.top_k:
            raise SpaError(f"--target experts={fraction:g} keeps {n} of {layer.experts} experts in layer {layer.index} "
                           f"('{layer.router}'), but its TopK routes each token to {layer.top_k}: use F >= "
                           f"{layer.top_k / layer.experts:g}")
        order = np.argsort(-np.asarray(scores[layer.index]), kind="stable")
        kept[layer.index] = np.sort(order[:n])
    return kept


def _global(live, scores: dict, fraction: float) -> dict:
    """One budget over every layer's experts, each layer keeping at least its k (see the module)."""
    total = n_kept(fraction, sum(la.experts for la in live))
    floor = sum(la.top_k for la in live)
    if total < floor:
        raise SpaError(f"--target experts={fraction:g} --global keeps {total} of {sum(la.experts for la in live)} "
                       f"experts, but the layers' TopKs need {floor} (each keeps its k): use F >= "
                       f"{floor / sum(la.experts for la in live):g}")
    chosen = {}
    rest = []
    for la in live:
        s = np.asarray(scores[la.index], np.float64)
        s = s / max(float(np.mean(np.abs(s))), 1e-30)
        order = np.argsort(-s, kind="stable")
        chosen[la.index] = list(order[:la.top_k])
        rest += [(-s[e], la.index, int(e)) for e in order[la.top_k:]]
    for _, i, e in sorted(rest)[:total - floor]:
        chosen[i].append(e)
    return {i: np.sort(np.asarray(v, np.int64)) for i, v in chosen.items()}
