"""The depth pipeline: find -> score -> choose -> cut -> validate.

``spa.prune`` runs :func:`prune_blocks` for ``--target blocks=N`` on the analysis it made (the
channel steps do not run: a prune removes blocks or channels; prune the output again for both).
"""
from __future__ import annotations

import numpy as np

from ..errors import SpaError
from ..graph.blocks import find_blocks
from ..planning.counting import count_macs, count_params, initializer_params
from ..progress import quiet
from ..planning.blocks import drift
from ..scoring.blocks import influence
from ..surgery.blocks import cut_blocks
from ..surgery.validate import interface_changes, validate

SCORERS = {"influence": "block influence, 1 - cos(stream in, stream out) (ShortGPT)",
           "drift": "measured drift of the outputs, blocks removed one at a time (SLEB)"}


def shortlist_size(count: int, found: int) -> int:
    """How many of the least influential blocks SLEB's iterative removal tries at each step: twice
    the count, at least 8 (the full search, every block at every step, took 10 min for 4 of
    SmolLM2's 60 on 2 cores; block influence's ranking already puts the removable ones first)."""
    return min(found, max(2 * count, 8))


def prune_blocks(first, opts, count: int, reference, progress=quiet):
    """Remove ``count`` residual branches of analysis ``first``: those of least block influence on
    the guard's inputs (``reference``), or, with ``opts.allocate == "sensitivity"``, SLEB's iterative
    choice by measured drift among the least influential (``shortlist_size``).  Returns ``(model, weights, probe of the pruned model, report)``."""
    progress("finding residual blocks")
    blocks = find_blocks(first.model, first.probe.shapes, initializer_params(first.model))
    if not blocks:
        raise SpaError("--target blocks=N: no removable residual block found (an Add of a tensor and a branch "
                       "computed from it alone, with weights of its own)")
    if count > len(blocks):
        raise SpaError(f"--target blocks={count}: the model has {len(blocks)} removable residual blocks")
    scorer = "drift" if opts.allocate == "sensitivity" else "influence"
    progress(f"block influence of {len(blocks)} blocks on {reference.inputs}")
    scores, drifts = influence(first, blocks, reference.feeds), {}
    ranked = [int(i) for i in np.argsort(scores, kind="stable")]
    removed = ranked[:count]
    if scorer == "drift":
        shortlist = [blocks[i] for i in ranked[:shortlist_size(count, len(blocks))]]
        progress(f"measuring the drift of removing {count} of the {len(shortlist)} least influential blocks, one "
                 f"at a time, on {reference.inputs}")
        removed, after_each = drift(first, shortlist, count, reference, progress)
        drifts = dict(zip(removed, after_each))
    progress(f"removing {count} residual blocks")
    current, weights = cut_blocks(first.model, first.weights, blocks, removed)
    progress("validating the pruned model in onnxruntime")
    after = validate(current, first, opts.input_shapes, weights=weights)
    entries = []
    for b in blocks:
        e = b.summary()
        e["removed"] = b.index in removed
        e["influence"] = round(float(scores[b.index]), 6)
        if b.index in drifts:
            e["drift_after"] = round(drifts[b.index], 6)
        entries.append(e)
    report = {"criterion": scorer, "reduction": "none", "normalisation": None, "target": f"blocks={count}",
              "before": {"params": first.params, "macs": first.macs},
              "after": {"params": count_params(current), "macs": count_macs(current, after.shapes)},
              "blocks": {"scorer": SCORERS[scorer], "found": len(blocks), "removed": removed, "blocks": entries},
              "interface": interface_changes(first.model, current), "groups": []}
    return current, weights, after, report
