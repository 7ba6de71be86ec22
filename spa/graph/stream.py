"""The residual stream of a pre-norm transformer, as rotation needs it (DESIGN.md, "Rotation").

A stream is the chain of tensors ``s0 -> Add(s0, w1) -> Add(., w2) -> ...`` that every block reads
through an RMSNorm and writes into through a projection.  An RMSNorm ``g * x / sqrt(mean(x^2) + eps)``
over the last axis is invariant to an orthogonal change of basis ``x -> x Q`` once its scale ``g`` is
moved into the weights that read its output, so the whole stream can be expressed in another basis
with the same outputs: the writers' weights multiplied by ``Q``, the readers' by ``Q^T``.  This
module only finds the pieces (plain data); ``spa.surgery.rotation`` rewrites them.

Found on the graph alone, whatever the exporter: RMSNorm decomposed (``Pow``/``Mul``, ``ReduceMean``
over the last axis, ``Add`` of eps, ``Sqrt`` then ``Reciprocal`` and ``Mul``, or ``Div``; then a
``Mul`` by a 1-D constant scale) or fused (``SimplifiedLayerNormalization``).  Writers are
``MatMul``s by a constant 2-D weight (and an optional constant bias ``Add``) whose output one residual
``Add`` reads.  A stream's source is any tensor not made by such an ``Add`` (an embedding lookup);
readers of stream tensors other than the norms and Adds (``foreign``) are given the stream back in
the original basis.  LayerNorm streams (which also subtract the mean) are not streams here.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx

FUSED_RMSNORM = ("SimplifiedLayerNormalization",)


@dataclass
class Norm:
    """One RMSNorm that reads the stream."""
    stream: str                 # the stream tensor it normalises
    normed: str                 # x / rms(x), before the scale (the fused op's output when fused)
    output: str                 # what the readers read (the scaled output)
    scale: str | None           # the 1-D scale's initializer (None: no scale)
    scale_node: str | None      # the Mul that applies the scale (decomposed), or the fused op
    fused: bool
    inner: list = field(default_factory=list)   # names of the nodes that compute it from the stream
    readers: list = field(default_factory=list)  # (node name, weight initializer) of MatMuls reading output
    others: list = field(default_factory=list)   # (node name, input index) of any other reader of output


@dataclass
class Writer:
    """A projection whose output a residual Add adds to the stream."""
    node: str                   # the MatMul
    weight: str                 # its constant [F, D] weight
    bias: str | None            # a constant [D] bias added after it, if any
    output: str                 # the tensor the residual Add reads


@dataclass
class Stream:
    width: int
    tensors: list               # the stream's tensors, in graph order
    sources: list               # stream tensors no residual Add makes (an embedding lookup's output)
    adds: list                  # the residual Adds' names
    writers: list
    norms: list
    foreign: list               # (node name, input index, tensor): other readers of stream tensors
    outputs: list               # stream tensors that are graph outputs

    def summary(self) -> dict:
        return {"width": self.width, "norms": len(self.norms), "writers": len(self.writers),
                "sources": self.sources, "foreign_reads": len(self.foreign)}


def find_streams(proto: onnx.ModelProto, shapes: dict, consts: dict) -> list:
    """Every RMSNorm-read residual stream of ``proto`` (``shapes``: the probe's; ``consts``: every
    initializer's array), largest first."""
    nodes = list(proto.graph.node)
    by_name = {n.name: n for n in nodes}
    producer = {o: n for n in nodes for o in n.output if o}
    readers = defaultdict(list)
    for n in nodes:
        for i, x in enumerate(n.input):
            if x:
                readers[x].append((n, i))
    norms = [m for m in (_norm_at(n, producer, readers, consts, shapes) for n in nodes) if m is not None]
    if not norms:
        return []
    by_stream = defaultdict(list)
    for m in norms:
        by_stream[m.stream].append(m)
    position = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    graph_outputs = {o.name for o in proto.graph.output}
    # walk back from every normalised tensor through the residual Adds
    member, writers, adds, sources = set(), {}, [], set()
    todo = list(by_stream)
    while todo:
        t = todo.pop()
        if t in member:
            continue
        member.add(t)
        p = producer.get(t)
        found = _residual(p, producer, consts, shapes) if p is not None else None
        if found is None:
            sources.add(t)
            continue
        prev, writer = found
        writers[p.name] = writer
        adds.append(p.name)
        todo.append(prev)
    streams = []
    for component in _components(member, producer, writers):
        width = int(shapes[next(iter(component))][-1])
        tensors = sorted(component, key=lambda t: position.get(t, -1))
        inner = {name for t in component for m in by_stream.get(t, []) for name in m.inner}
        comp_adds = [a for a in adds if by_name[a].output[0] in component]
        foreign = []
        for t in tensors:
            for n, i in readers.get(t, []):
                if n.name in inner or (n.name in comp_adds):
                    continue
                foreign.append((n.name, i, t))
        streams.append(Stream(
            width=width, tensors=tensors, sources=sorted(t for t in component if t in sources),
            adds=comp_adds, writers=[writers[a] for a in comp_adds],
            norms=[m for t in tensors for m in by_stream.get(t, [])], foreign=foreign,
            outputs=[t for t in tensors if t in graph_outputs]))
    streams.sort(key=lambda s: -len(s.norms))
    return streams


def _components(member, producer, writers) -> list:
    """The member tensors split into connected streams (linked through their residual Adds)."""
    parent = {t: t for t in member}

    def root(t):
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t
    for t in member:
        p = producer.get(t)
        if p is not None and p.name in writers:
            for x in p.input:
                if x in member:
                    parent[root(x)] = root(t)
    out = defaultdict(set)
    for t in member:
        out[root(t)].add(t)
    return list(out.values())


def _const(name, consts):
    return consts.get(name) if name else None


def _scalar(name, consts, value=None) -> bool:
    v = _const(name, consts)
    return v is not None and v.size == 1 and (value is None or float(np.asarray(v).ravel()[0]) == value)


def _last_axis_mean(node, consts, rank) -> bool:
    """A ReduceMean over the last axis alone, keeping dims."""
    if node.op_type != "ReduceMean":
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if not attrs.get("keepdims", 1):
        return False
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        got = _const(node.input[1], consts)
        axes = None if got is None else [int(a) for a in np.asarray(got).ravel()]
    return axes is not None and len(axes) == 1 and axes[0] % rank == rank - 1


def _squares(t, x, producer, consts) -> bool:
    p = producer.get(t)
    if p is None:
        return False
    if p.op_type == "Pow":
        return p.input[0] == x and _scalar(p.input[1], consts, 2.0)
    return p.op_type == "Mul" and p.input[0] == x and p.input[1] == x


def _rms(t, producer, consts, shapes):
    """``(x, nodes)`` when ``t`` is ``sqrt(mean(x^2) + eps)`` over the last axis of ``x``, else None."""
    sq = producer.get(t)
    if sq is None or sq.op_type != "Sqrt":
        return None
    add = producer.get(sq.input[0])
    if add is None or add.op_type != "Add":
        return None
    for mean_in, eps in (add.input, add.input[::-1]):
        mean = producer.get(mean_in)
        if mean is None or not _scalar(eps, consts):
            continue
        sq_in = producer.get(mean.input[0]) if mean.input else None
        if sq_in is None:
            continue
        x = sq_in.input[0]
        rank = len(shapes.get(x, ()))
        if rank and _last_axis_mean(mean, consts, rank) and _squares(mean.input[0], x, producer, consts):
            return x, [sq_in.name, mean.name, add.name, sq.name]
    return None


def _norm_at(n, producer, readers, consts, shapes):
    """The RMSNorm whose normalisation node is ``n`` (``x * rsqrt(...)``, ``x / sqrt(...)``, or the
    fused op), or None."""
    if n.op_type in FUSED_RMSNORM:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        x = n.input[0]
        rank = len(shapes.get(x, ()))
        scale = n.input[1] if len(n.input) > 1 else ""
        g = _const(scale, consts)
        if not rank or attrs.get("axis", -1) % rank != rank - 1 or g is None or g.ndim != 1 or len(n.output) > 1 \
                and any(n.output[1:]):
            return None
        return _with_readers(Norm(x, n.output[0], n.output[0], scale, n.name, True, [n.name]), readers, consts)
    found = None
    if n.op_type == "Mul" and len(n.input) == 2:
        for x, r in (n.input, n.input[::-1]):
            rec = producer.get(r)
            if rec is not None and rec.op_type == "Reciprocal":
                got = _rms(rec.input[0], producer, consts, shapes)
                if got is not None and got[0] == x:
                    found = (x, got[1] + [rec.name])
                    break
    elif n.op_type == "Div" and len(n.input) == 2:
        got = _rms(n.input[1], producer, consts, shapes)
        if got is not None and got[0] == n.input[0]:
            found = (n.input[0], got[1])
    if found is None:
        return None
    x, inner = found
    width = shapes.get(x, (None,))[-1]
    normed = n.output[0]
    users = readers.get(normed, [])
    norm = Norm(x, normed, normed, None, None, False, inner + [n.name])
    if len(users) == 1 and users[0][0].op_type == "Mul":
        mul = users[0][0]
        g_name = mul.input[1 - users[0][1]]
        g = _const(g_name, consts)
        if g is not None and g.ndim == 1 and g.shape[0] == width:
            norm.output, norm.scale, norm.scale_node = mul.output[0], g_name, mul.name
    return _with_readers(norm, readers, consts)


def _with_readers(norm, readers, consts):
    for n, i in readers.get(norm.output, []):
        w = _const(n.input[1], consts) if n.op_type == "MatMul" and i == 0 and len(n.input) == 2 else None
        if w is not None and w.ndim == 2:
            norm.readers.append((n.name, n.input[1]))
        else:
            norm.others.append((n.name, i))
    return norm


def _writer(t, producer, consts, width):
    """The Writer that makes ``t`` (a MatMul by a constant [F, width] weight, with an optional
    constant [width] bias Add after it), or None."""
    p = producer.get(t)
    bias = None
    if p is not None and p.op_type == "Add":
        for y, b in (p.input, p.input[::-1]):
            v = _const(b, consts)
            q = producer.get(y)
            if v is not None and v.ndim == 1 and v.shape[0] == width and q is not None and q.op_type == "MatMul":
                p, bias = q, b
                break
        else:
            return None
    if p is None or p.op_type != "MatMul":
        return None
    w = _const(p.input[1], consts)
    if w is None or w.ndim != 2 or w.shape[1] != width:
        return None
    return Writer(p.name, p.input[1], bias, t)


def _residual(p, producer, consts, shapes):
    """``(previous stream tensor, Writer)`` when node ``p`` is a residual Add of the stream and one
    projection's output (same shapes, no broadcasting), else None."""
    if p.op_type != "Add" or len(p.input) != 2:
        return None
    shape = shapes.get(p.output[0])
    if not shape or any(shapes.get(x) != shape for x in p.input):
        return None
    width = shape[-1]
    found = [(s, w) for s, w in (p.input, p.input[::-1]) if _writer(w, producer, consts, width) is not None
             and _const(s, consts) is None]
    if len(found) != 1:   # two projections (a parallel block), or none: not a residual Add of a stream
        return None
    s, w = found[0]
    return s, _writer(w, producer, consts, width)
