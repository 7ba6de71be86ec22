"""Rotation surgery: a residual stream expressed in another orthonormal basis (DESIGN.md, "Rotation").

Given a stream (``spa.graph.stream``) and an orthogonal ``Q`` [D, D], the rewritten model computes
the stream times ``Q`` everywhere and the same outputs as before:

* every writer's weight ``W`` [F, D] becomes ``W Q`` (its bias ``b Q``);
* a source (an embedding lookup's output) is rotated by its table, ``E Q``, when nothing else reads
  the table or the lookup, else by a new ``MatMul`` by ``Q`` after it;
* every RMSNorm loses its scale ``g`` (the ``Mul`` goes; a fused norm's scale becomes ones) and every
  ``MatMul`` that reads its output gets ``c Q^T diag(g) W`` instead of ``W``; any other reader of a
  norm's output (a graph output, a tied lm_head's shared table) reads ``x Q`` times ``c Q^T diag(g)``;
* any other reader of a stream tensor reads it times ``Q^T`` (the original basis).

``c`` (per norm, 1 by default) is the factor that makes up for an RMSNorm that, once the trailing
dims of the rotated stream are sliced off, averages over fewer of them (``spa.rotation.stage``); at
``c = 1`` the rewrite is exact (the oracle of ``tests/surgery/test_rotation.py``).  Weights shared
with anything outside the stream's role are copied, never changed in place.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper

from ..errors import SpaError
from ..io import weights as weight_store

#: the names of every node the rewrite adds start with this
NODE_PREFIX = "spa_rotation"


def rotate(proto: onnx.ModelProto, weights: dict, stream, Q: np.ndarray, scales=None):
    """``(model, weights, axis)``: ``proto`` with ``stream`` rotated by ``Q`` (see the module doc),
    and an axis (initializer, dim) of it that runs along the rotated stream (a writer's output dim);
    ``weights``: every initializer's array (``Analysis.weights``); ``scales``: ``c`` per norm (in
    ``stream.norms``' order).  ``proto`` and ``weights`` are not changed."""
    if not stream.writers:
        raise SpaError("internal: a stream without writers")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    D = stream.width
    if Q.shape != (D, D):
        raise SpaError(f"internal: a rotation of {Q.shape} for a stream of width {D}")
    scales = [1.0] * len(stream.norms) if scales is None else list(scales)
    new_weights = {t.name: weights[t.name] for t in g.initializer if weight_store.is_stub(t) and t.name in weights}
    inits = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node}
    uses = defaultdict(int)
    for n in g.node:
        for x in n.input:
            uses[x] += 1
    taken = set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input} | set(nodes)
    inserts = defaultdict(list)     # tensor -> nodes to place right after the node that makes it
    removed = set()
    graph_outputs = {o.name for o in g.output}

    def fresh(base):
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    def array(name):
        return np.asarray(weights[name]) if name in weights else onnx.numpy_helper.to_array(inits[name])

    def store(name, value, dtype, node=None, slot=None):
        """``value`` as initializer ``name`` (replaced in place when only ``node`` reads it, else a copy
        that ``node``'s input ``slot`` reads instead); returns the name it went under."""
        value = np.ascontiguousarray(value.astype(dtype))
        if node is not None and uses[name] > 1:
            uses[name] -= 1
            copy = fresh(f"{name}__spa_rotated")
            node.input[slot] = copy
            weight_store.put(out, new_weights, copy, value)
            return copy
        weight_store.put(out, new_weights, name, value, inits[name])
        return name

    def matmul(x, matrix, dtype, output=None, base=NODE_PREFIX):
        """A new MatMul ``x @ matrix`` (a new initializer), placed after ``x``'s producer."""
        m = fresh(f"{base}_matrix")
        weight_store.put(out, new_weights, m, np.ascontiguousarray(matrix.astype(dtype)))
        y = output or fresh(f"{x}__{base}")
        inserts[x].append(helper.make_node("MatMul", [x, m], [y], name=fresh(f"{base}_{x}")))
        return y

    def rename_output(t):
        """Rename the tensor ``t`` where it is made and read (a graph output that must keep its name
        for a new node that makes it): returns the new name."""
        new = fresh(f"{t}__spa_rotated")
        for n in g.node:
            n.output[:] = [new if o == t else o for o in n.output]
            n.input[:] = [new if x == t else x for x in n.input]
        return new

    dtype = _dtype(array(stream.writers[0].weight))
    Qd = Q.astype(np.float64)
    # writers: W Q, b Q
    key = None      # an axis of the rotated model that runs along the stream
    for w in stream.writers:
        node = nodes[w.node]
        stored = store(w.weight, array(w.weight).astype(np.float64) @ Qd, dtype, node, 1)
        key = key or (stored, 1)
        if w.bias:
            add = next(n for n in g.node if w.output in n.output)
            store(w.bias, array(w.bias).astype(np.float64) @ Qd, dtype, add, list(add.input).index(w.bias))
    # sources: the table rotated, or a MatMul by Q after the lookup
    readers = defaultdict(list)
    for n in g.node:
        for i, x in enumerate(n.input):
            readers[x].append((n, i))
    foreign = defaultdict(list)
    for name, i, t in stream.foreign:
        foreign[t].append((nodes[name], i))
    entered = set()
    for s in stream.sources:
        lookup = next((n for n in g.node if s in n.output), None)
        table = lookup.input[0] if lookup is not None and lookup.op_type == "Gather" else None
        attrs = {a.name: helper.get_attribute_value(a) for a in lookup.attribute} if lookup is not None else {}
        if table in inits and uses[table] == 1 and attrs.get("axis", 0) == 0 and not foreign[s] \
                and s not in graph_outputs and array(table).ndim == 2:
            store(table, array(table).astype(np.float64) @ Qd, dtype)
            continue
        rotated = fresh(f"{s}__spa_rotated")
        kept_original = {(n.name, i) for n, i in foreign[s]}
        for n, i in readers[s]:
            if (n.name, i) not in kept_original:
                n.input[i] = rotated
        matmul(s, Qd, dtype, output=rotated)
        entered.add(s)          # its other readers keep reading it, in the original basis
    # norms: the scale goes into the readers, Q^T in front of it
    for norm, c in zip(stream.norms, scales):
        gamma = np.ones(stream.width) if norm.scale is None else array(norm.scale).astype(np.float64)
        back = c * (Qd.T * gamma[None, :])               # c Q^T diag(g): [D, D]
        dropped = norm.scale_node is not None and not norm.fused    # the scale's Mul goes
        source = norm.normed if dropped else norm.output
        if norm.output in graph_outputs and not dropped:   # the norm makes a graph output: renamed
            source = rename_output(norm.output)
        for name, wname in norm.readers:
            node = nodes[name]
            node.input[0] = source
            store(wname, back @ array(wname).astype(np.float64), dtype, node, 1)
        if norm.fused and norm.scale is not None:
            ones = fresh(f"{NODE_PREFIX}_ones")
            weight_store.put(out, new_weights, ones, np.ones(stream.width, _dtype(array(norm.scale))))
            nodes[norm.scale_node].input[1] = ones
        elif dropped:
            removed.add(norm.scale_node)
        if norm.output in graph_outputs:
            matmul(source, back, dtype, output=norm.output, base=f"{NODE_PREFIX}_back")
        if norm.others:
            y = matmul(source, back, dtype, base=f"{NODE_PREFIX}_back")
            for name, i in norm.others:
                nodes[name].input[i] = y
    # other readers of the stream (and a stream tensor that is a graph output): the original basis
    for t in stream.tensors:
        if t in entered:
            continue
        original = None
        if t in graph_outputs:
            original = t
            matmul(rename_output(t), Qd.T, dtype, output=t, base=f"{NODE_PREFIX}_back")
        if foreign[t]:
            original = original or matmul(t, Qd.T, dtype, base=f"{NODE_PREFIX}_back")
            for n, i in foreign[t]:
                n.input[i] = original
    _place(g, inserts, removed)
    live = {x for n in g.node for x in n.input} | graph_outputs
    kept = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]
    return out, {k: v for k, v in new_weights.items() if k in live}, key


def _dtype(a) -> np.dtype:
    """The weights' own float type (bfloat16 included), float32 for anything else."""
    return a.dtype if weight_store.is_float(a.dtype) else np.dtype(np.float32)


def _place(g, inserts, removed) -> None:
    """The graph's nodes in order, without ``removed``, each inserted node right after the node that
    makes its input (first, when a graph input or initializer is its input)."""
    made = {o for n in g.node for o in n.output}
    order = [m for t, ms in inserts.items() if t not in made for m in ms]
    for n in g.node:
        if n.name in removed:
            continue
        order.append(n)
        for o in n.output:
            order.extend(inserts.get(o, []))
    del g.node[:]
    g.node.extend(order)
