"""Which residual blocks a depth prune removes by measured drift: SLEB's iterative removal.

At each step, the block whose removal (with the blocks already chosen) moves the model's outputs
least, measured on the guard's inputs (``fidelity.drift_of``) in one onnxruntime session over the
gated model (``spa.graph.blocks.gated``: a 0 gate is exactly the removal).  Costs ``blocks x
steps`` runs per batch; what it buys is the joint effect, where block influence
(``spa.scoring.blocks``) scores each block alone.
"""
from __future__ import annotations

import numpy as np

from ..graph.blocks import gate_feed, gated
from ..progress import stepper
from ..runtime import probing
from .fidelity import drift_of

#: batches of the guard's inputs each trial runs on (the sensitivity table's 2): 4 of SmolLM2's 60
#: blocks on 5 batches of 256 tokens took 122 s
BATCHES = 2

def drift(an, blocks, n_remove: int, reference, progress=None) -> tuple[list, list]:
    """``(order, drifts)``: the ``n_remove`` blocks SLEB's greedy removal picks, in the order picked,
    and the measured drift of the model after each pick (``fidelity.drift_of`` on the first
    ``BATCHES`` of ``reference``, the guard's :class:`~spa.planning.fidelity.Reference`)."""
    proto, names = gated(an.model, blocks, an.probe.dtypes)
    runner = probing.output_runner(proto, an.probe.consts)
    outputs = [o.name for o in an.model.graph.output]
    removed, drifts = [], []
    total = sum(len(blocks) - k for k in range(n_remove))
    step, done = stepper(progress, total, "block drift: trial"), 0
    for _ in range(n_remove):
        best, best_drift = None, np.inf
        for b in blocks:
            if b.index in removed:
                continue
            step(done, f"removal {len(removed) + 1}/{n_remove}, block {b.index} ({b.kind})")
            done += 1
            gates = gate_feed(names, removed + [b.index])
            feeds = reference.feeds[:BATCHES]
            runs = (runner.run({**f, **gates}, outputs) for f in feeds)
            d = drift_of(reference.outputs[:BATCHES], runs, reference.metrics, feeds)
            if d < best_drift:
                best, best_drift = b.index, d
        removed.append(best)
        drifts.append(float(best_drift))
    return removed, drifts
