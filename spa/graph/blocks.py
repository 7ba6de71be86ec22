"""Residual branches: the units of depth pruning (DESIGN.md, "Blocks").

A residual branch is the part of the graph between a tensor ``s`` (the stream) and an ``Add(s, y)``
whose other input ``y`` is computed from ``s``: the nodes that depend on ``s`` and that ``y``
depends on.  It is a unit only when nothing outside it reads what it computes (except graph outputs,
such as a KV cache's present tensors, which then leave the interface), when ``y`` has the stream's
shape (no broadcasting), when it owns weights, and when no node in it carries a subgraph.  Removing
it replaces the ``Add`` by ``s``; masking it (``gated``: ``Add(s, y * g)`` with ``g = 0``) must give
exactly the same outputs: the oracle of ``tests/graph/test_blocks.py``.

Found on the graph alone, whatever the exporter: a decoder's attention and MLP sub-blocks, a ViT's,
ResNet's identity blocks, YOLO's bottleneck shortcuts.  A branch nested inside another's is left to
the outer one (removing the outer removes it).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper


#: operators that make a branch an attention sub-block (else MLP, or conv where it convolves)
ATTENTION_OPS = {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"}
CONV_OPS = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"}


@dataclass
class Block:
    """One removable residual branch of a model."""
    index: int
    add: str              # the residual Add node's name
    stream: str           # the tensor the branch reads and the Add passes on
    branch: str           # the branch's output (the Add's other input)
    output: str           # the Add's output
    nodes: list           # names of the branch's nodes, in graph order
    kind: str             # "attention", "mlp" or "conv"
    params: int           # parameters only the branch reads
    outputs: list = field(default_factory=list)   # graph outputs the branch alone computes (leave the interface)
    inputs: list = field(default_factory=list)    # graph inputs only the branch reads (leave the interface)

    def summary(self) -> dict:
        out = {"block": self.index, "add": self.add, "kind": self.kind, "params": self.params,
               "nodes": len(self.nodes)}
        if self.outputs or self.inputs:
            out["interface"] = {"inputs": self.inputs, "outputs": self.outputs}
        return out


def find_blocks(proto: onnx.ModelProto, shapes: dict, params: dict) -> list:
    """Every removable residual branch of ``proto`` (``shapes``: tensor name -> shape, the probe's;
    ``params``: initializer name -> the parameters it counts for, ``counting.initializer_params``),
    outermost first in graph order (see the module's docstring for what qualifies)."""
    nodes = list(proto.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    readers = defaultdict(list)
    for i, n in enumerate(nodes):
        for x in n.input:
            if x:
                readers[x].append(i)
    graph_outputs = {o.name for o in proto.graph.output}
    graph_inputs = {i.name for i in proto.graph.input}
    sizes = params
    constants = {t.name for t in proto.graph.initializer}
    found = []
    for a_idx, add in enumerate(nodes):
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        for s, y in (add.input, add.input[::-1]):
            if s in constants or y in constants or y not in producer:
                continue
            shape = shapes.get(s)
            if shape is None or shapes.get(y) != shape or shapes.get(add.output[0]) != shape:
                continue
            branch = _branch(nodes, producer, s, y)
            if branch is None:
                continue
            block = _qualify(nodes, branch, readers, a_idx, s, y, graph_outputs, graph_inputs, sizes)
            if block is not None:
                block.index = len(found)
                found.append(block)
                break
    # a branch nested inside another's: the outer one takes it
    nested = {b.add for b in found for o in found if o is not b and b.add in o.nodes}
    kept = [b for b in found if b.add not in nested]
    for i, b in enumerate(kept):
        b.index = i
    return kept


def _branch(nodes, producer, s, y):
    """Indices of the nodes that depend on ``s`` and that ``y`` depends on, or None when ``y`` does
    not depend on ``s``.  Walks back from ``y``; a node that does not read ``s`` (directly or through
    the walk) is outside the branch, and so are its ancestors."""
    depends = {}

    def reads_stream(i):
        # iterative post-order: does node i depend on s?
        stack = [i]
        while stack:
            j = stack[-1]
            if j in depends:
                stack.pop()
                continue
            pending = [producer[x] for x in nodes[j].input if x and x != s and x in producer
                       and producer[x] not in depends]
            if pending:
                stack.extend(pending)
                continue
            depends[j] = any(x == s or (x in producer and depends[producer[x]]) for x in nodes[j].input if x)
            stack.pop()
        return depends[i]

    if not reads_stream(producer[y]):
        return None
    return {j for j, d in depends.items() if d}   # the walk visits only ancestors of y


def _qualify(nodes, branch, readers, add_idx, s, y, graph_outputs, graph_inputs, sizes):
    leaves, used_inputs, params, seen_w = [], set(), 0, set()
    for j in branch:
        n = nodes[j]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            return None
        for o in n.output:
            if not o:
                continue
            outside = [r for r in readers.get(o, []) if r not in branch and not (r == add_idx and o == y)]
            if outside:
                return None
            if o in graph_outputs:
                leaves.append(o)
        for x in n.input:
            if x in graph_inputs and x != s:
                used_inputs.add(x)
            if x in sizes and x not in seen_w:
                if all(r in branch for r in readers[x]):
                    params += sizes[x]
                seen_w.add(x)
    if params == 0:
        return None
    own = {x for x in used_inputs if all(r in branch for r in readers[x])}
    # a graph output the branch computes from an input that is read elsewhere too (a past key whose
    # length the mask reads) stays, with the nodes that make it: the caller keeps feeding that input
    # and gets its grown cache back; the others leave the interface with the inputs only they read
    sources = {o: _sources(nodes, branch, o, graph_inputs) for o in leaves}
    staying = {o for o in leaves if not sources[o] <= own}
    leaves = [o for o in leaves if o not in staying]
    own_inputs = sorted(own - {x for o in staying for x in sources[o]})
    ops = {nodes[j].op_type for j in branch}
    kind = "attention" if ops & ATTENTION_OPS else "conv" if ops & CONV_OPS else "mlp"
    order = sorted(branch)
    return Block(0, nodes[add_idx].name or nodes[add_idx].output[0], s, y, nodes[add_idx].output[0],
                 [nodes[j].name or nodes[j].output[0] for j in order], kind, params,
                 outputs=sorted(leaves), inputs=own_inputs)


def _sources(nodes, branch, tensor, graph_inputs) -> set:
    """The graph inputs that ``tensor`` is computed from inside ``branch``."""
    by_output = {o: j for j in branch for o in nodes[j].output if o}
    seen, stack, found = set(), [tensor], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in graph_inputs:
            found.add(t)
        if t in by_output:
            stack.extend(x for x in nodes[by_output[t]].input if x)
    return found


def gated(proto: onnx.ModelProto, blocks: list, dtypes: dict) -> tuple[onnx.ModelProto, dict]:
    """``(model, {block index: (gate input name, dtype)})``: ``proto`` with each block's Add reading
    ``branch * gate`` (a scalar input of the branch's dtype, ``dtypes``: the probe's: 1 keeps the
    branch, 0 masks it, the oracle's removal)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    by_add = {b.output: b for b in blocks}
    names, new_nodes = {}, []
    for n in out.graph.node:
        b = by_add.get(n.output[0]) if n.op_type == "Add" else None
        if b is not None:
            gate, scaled = f"spa_block_gate_{b.index}", f"{b.branch}__spa_gated"
            dt = np.dtype(dtypes.get(b.branch, np.float32))
            out.graph.input.append(helper.make_tensor_value_info(gate, helper.np_dtype_to_tensor_dtype(dt), []))
            names[b.index] = (gate, dt)
            new_nodes.append(helper.make_node("Mul", [b.branch, gate], [scaled], name=f"spa_gate_{b.index}"))
            n.input[list(n.input).index(b.branch)] = scaled
        new_nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    return out, names


def gate_feed(names: dict, removed) -> dict:
    """The gate inputs of ``gated``: 0 for the blocks in ``removed``, 1 for the others."""
    removed = set(removed)
    return {name: np.array(0.0 if i in removed else 1.0, dt) for i, (name, dt) in names.items()}

