"""Depth surgery: residual branches removed, their Adds replaced by the stream.

Every reader of a removed block's Add output reads the stream instead (an Identity stays only where
the Add's output is a graph output, to keep its name); then every node that no graph output needs
any more goes, with the initializers and graph inputs nothing reads.  Graph outputs that only a
removed branch computed (a KV cache's present tensors of a removed attention) and graph inputs that
only it read (their past tensors) leave the interface (``spa.surgery.validate.interface_changes`` lists them for the report).  Other
inputs stay declared even where nothing reads them any more (an attention mask when every attention
is gone), so that a caller's feed still fits.  The
result equals the original with the branches' outputs multiplied by 0 (``spa.graph.blocks.gated``).
"""
from __future__ import annotations

import onnx
from onnx import helper

from ..io import weights as weight_store


def cut_blocks(proto: onnx.ModelProto, weights: dict, blocks: list, removed) -> tuple[onnx.ModelProto, dict]:
    """``(model, weights)`` without the blocks whose index is in ``removed``
    (``proto`` and ``weights`` are not changed; big weights stay stubs)."""
    gone = [b for b in blocks if b.index in set(removed)]
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    rename = {b.output: b.stream for b in gone}
    for b in gone:   # a chain of removed blocks: each reads the stream of the one before
        while rename[b.output] in rename:
            rename[b.output] = rename[rename[b.output]]
    adds = {b.output for b in gone}
    graph_outputs = {o.name for o in g.output}
    dropped_outputs = {o for b in gone for o in b.outputs}
    nodes = []
    for n in g.node:
        if n.op_type == "Add" and n.output[0] in adds:
            if n.output[0] in graph_outputs:
                nodes.append(helper.make_node("Identity", [rename[n.output[0]]], [n.output[0]], name=n.name))
            continue
        for k, x in enumerate(n.input):
            if x in rename:
                n.input[k] = rename[x]
        nodes.append(n)
    kept_outputs = [o for o in g.output if o.name not in dropped_outputs]
    live = {o.name for o in kept_outputs}
    needed = []
    for n in reversed(nodes):   # graph order: a node's readers come after it
        if any(o in live for o in n.output if o):
            needed.append(n)
            live.update(x for x in n.input if x)
            for a in n.attribute:   # a subgraph's reads of outer tensors
                if a.type == onnx.AttributeProto.GRAPH:
                    live.update(_outer_reads(a.g))
    needed.reverse()
    del g.node[:]
    g.node.extend(needed)
    del g.output[:]
    g.output.extend(kept_outputs)
    own = {x for b in gone for x in b.inputs}   # read by the removed branches alone: they go with them
    dropped_inputs = [i.name for i in g.input if i.name in own and i.name not in live]
    kept_inputs = [i for i in g.input if i.name not in dropped_inputs]
    del g.input[:]
    g.input.extend(kept_inputs)
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)
    produced = {o for n in needed for o in n.output} | live
    vis = [vi for vi in g.value_info if vi.name in produced]
    del g.value_info[:]
    g.value_info.extend(vis)
    new_weights = {t.name: weights[t.name] for t in inits if weight_store.is_stub(t) and t.name in weights}
    return out, new_weights


def _outer_reads(graph) -> set:
    names = set()
    for n in graph.node:
        names.update(x for x in n.input if x)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= _outer_reads(a.g)
    return names
