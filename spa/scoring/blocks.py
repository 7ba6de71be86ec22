"""Scores of residual branches (``spa.graph.blocks``): which blocks a depth prune removes.

``influence``: ShortGPT's block influence, ``1 - cos(stream, stream + branch)``, from one run of the
original exposing every block's input and output: a branch that barely turns the stream matters
little.  Per position over the last axis for [batch, sequence, hidden] streams (the paper's
per-token reading), per sample elsewhere (a feature map as one vector).

SLEB's iterative removal by measured drift is a plan over these blocks: ``spa.planning.blocks``.
"""
from __future__ import annotations

import numpy as np

from ..runtime import probing


def influence(an, blocks, feeds) -> np.ndarray:
    """Block influence of every block on ``feeds`` (higher = keep)."""
    names = sorted({t for b in blocks for t in (b.stream, b.output)})
    runner = probing.output_runner(an.model, an.probe.consts, outputs=names)
    total, count = np.zeros(len(blocks)), 0
    for feed in feeds:
        got = runner.run(feed)
        for i, b in enumerate(blocks):
            total[i] += _mean_turn(got[b.stream], got[b.output])
        count += 1
    return total / max(count, 1)


def _mean_turn(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim == 3:
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    else:
        x, y = x.reshape(len(x) if x.ndim else 1, -1), y.reshape(len(y) if y.ndim else 1, -1)
    dot = (x * y).sum(1)
    norm = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    cos = np.where(norm > 0, dot / np.where(norm > 0, norm, 1.0), 1.0)
    return float(np.mean(1.0 - cos))
