"""Which experts stay: ``--target experts=F`` keeps the best-scored fraction F of every layer.

Per layer, not global: router norms and TCESS of different layers are not on one scale (each
layer's TCESS sums to about its TopK's k), and every layer routes every token, so each keeps the
same share.  A layer keeps at least its TopK's k experts; a fraction that would keep fewer is an
error, not a silent clamp (the user asked for a size the model cannot have).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import SpaError


def n_kept(fraction: float, experts: int) -> int:
    """How many of ``experts`` a fraction keeps: rounded half up, at least one."""
    return max(1, min(experts, int(math.floor(fraction * experts + 0.5))))


def plan_experts(layers, scores: dict, fraction: float) -> dict:
    """``{layer index: kept expert ids (sorted)}`` for every layer that can lose experts."""
    if not 0.0 < fraction <= 1.0:
        raise SpaError(f"--target experts=F: F is the fraction of each layer's experts kept, in (0, 1], got {fraction}")
    live = [layer for layer in layers if not layer.blocked]
    if not live:
        why = "; ".join(f"layer {layer.index}: {layer.blocked}" for layer in layers) or "no TopK-routed layer found"
        raise SpaError(f"--target experts=F: no mixture-of-experts layer can lose experts ({why})")
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
