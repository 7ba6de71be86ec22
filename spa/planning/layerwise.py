"""``--uniform-layers``: the same widths in every layer of a transformer, so that a framework config,
which holds one ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` for all
layers, can describe the pruned model (``spa apply-map --hf``, docs/hf.md).

A group is *per layer* when the projections (MatMul/Gemm) it runs through all sit in one numbered
module (``model.layers.3.mlp.up_proj``: layer 3, see ``spa.graph.modules``).  Its *role* is what it
touches there: the module paths with the layer number taken out, and its channel count; groups of
the same role in different layers are the same kind of width (layer 0's MLP and layer 1's, a key/value
group's heads, the query heads inside each key/value group).  Under ``--uniform-layers`` only
per-layer groups are planned, except the head dims (a group through the last axis of an attention
Reshape ``[batch, seq, heads, head_dim]``: configs derive the attention scale and the rotary
frequencies from ``head_dim``); groups that span layers (the residual stream, a rotary dim shared by
every layer) are kept whole.  After the usual plan (a ratio or a target), every group of a role
removes the same number of channels, the mean of what the plan gave the role's groups (rounded to
the nearest, and by ``round_to``), each its own lowest-scored ones.
"""
from __future__ import annotations

import math

import numpy as np

from ..graph.modules import layer_of, module_of
from .plan import multiple, n_remove

_PROJECTIONS = ("MatMul", "Gemm")


def head_dim_axes(model, shapes) -> set:
    """``(tensor, 3)`` of every rank-4 Reshape of a rank-3 tensor (the attention head split)."""
    out = set()
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
        if src is not None and dst is not None and len(src) == 3 and len(dst) == 4:
            out.add((node.output[0], 3))
    return out


def layer_roles(an) -> dict:
    """``{group id: (layer, role)}`` for the prunable per-layer groups ``--uniform-layers`` plans
    (head dims left out); ``role`` is hashable and equal for the same width in different layers."""
    nodes = {n.name: n for n in an.model.graph.node}
    head_dims = head_dim_axes(an.model, an.probe.shapes)
    out = {}
    for g in an.groups:
        if not g.prunable or head_dims.intersection(g.axes):
            continue
        places = {layer_of(module_of(nodes[name])) for name, op in g.nodes
                  if op in _PROJECTIONS and name in nodes}
        if not places or None in places or len({(p[0], p[1]) for p in places}) != 1:
            continue
        layer = next(iter(places))[1]
        out[g.id] = (layer, (frozenset((p[0], p[2]) for p in places), g.channels))
    return out


def equalise(groups, scores, removal: dict, roles: dict, round_to: int = 1) -> tuple[dict, dict]:
    """``removal`` with every group of a role removing the same number of channels (the mean of the
    role's planned counts), and a record for the report: per role its layers, channels and count."""
    by_role = {}
    for g in groups:
        if g.id in roles:
            by_role.setdefault(roles[g.id][1], []).append(g)
    out, record = {}, []
    for role, members in by_role.items():
        planned = [len(removal.get(g.id, ())) for g in members]
        want = int(math.floor(float(np.mean(planned)) + 0.5))
        n = n_remove(members[0].channels, want, multiple(round_to, members[0].id), 1.0)
        for g in members:
            if n:
                order = np.argsort(scores[g.units], kind="stable")
                out[g.id] = np.sort(g.units[order[:n]])
        record.append({"groups": [g.id for g in members], "layers": sorted({roles[g.id][0] for g in members}),
                       "channels": members[0].channels, "removed": n, "planned": planned,
                       "modules": sorted(rest for _, rest in role[0])})
    record.sort(key=lambda r: r["groups"][0])
    return out, {"roles": record, "kept_whole": sorted(g.id for g in groups if g.prunable and g.id not in roles)}
