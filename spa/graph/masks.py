"""Cutting channels without changing a shape: 0/1 masks where the channel model's channels are consumed.

A channel's contribution is cut at its sinks: each input of a contraction (Conv, Gemm, MatMul) or
an exact reduction (ReduceSum) that reads it is multiplied by a 0/1 mask along that axis (a
quantized input is held at its zero point instead).  The exactness oracle cuts the original this
way to compare a pruned model with (``spa.verify.oracle``), and the sensitivity table feeds the
masks at run time to measure any removal in one session (``spa.planning.allocation``).
"""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper


def insert_masks(an, proto, atoms, *, as_inputs: bool = False) -> list:
    """Put a 0/1 mask on every contraction input of ``an``'s channel model in ``proto`` (a copy of
    ``an.model``) that reads one of ``atoms`` (a boolean mask over the channel model's atoms: the
    ones to cut, or every one that may be): a float input is multiplied by it, a quantized one
    (``qcontract``) is held at its zero point where it is 0.  Returns ``[(mask name, atom offset, size, shape, dtype)]``; the caller
    gives the masks' values as initializers (the cut model) or feeds them (``as_inputs``: one
    session for any removal, ``spa.planning.allocation``)."""
    cm = an.channels
    nodes = {n.name: n for n in proto.graph.node}
    before, done, masks = {}, set(), []
    for (tensor, dim), kind, node_name, idx in cm.sinks:
        got = cm.axis_index.get((tensor, dim))
        if kind not in ("contract", "sum", "qcontract") or got is None or (node_name, idx, dim) in done \
                or not atoms[got[0]:got[0] + got[1]].any():
            continue
        done.add((node_name, idx, dim))
        node = nodes[node_name]
        shape = [1] * len(an.probe.shapes[tensor])
        shape[dim] = got[1]
        name, out = f"{node_name}__cut{idx}_{dim}_m", f"{node_name}__cut{idx}_{dim}"
        if kind == "qcontract":  # the cut channel holds its zero point (real 0)
            dtype = np.dtype(np.bool_)
            zp = cm.zero_points.get((node_name, idx)) or _zero_like(proto, out, an.probe.dtypes.get(tensor))
            cut = helper.make_node("Where", [name, node.input[idx], zp], [out], name=out)
        else:
            dtype = np.dtype(an.probe.dtypes.get(tensor) or an.probe.values[tensor].dtype)
            cut = helper.make_node("Mul", [node.input[idx], name], [out], name=out)
        if as_inputs:
            proto.graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), shape))
        before.setdefault(node_name, []).append(cut)
        node.input[idx] = out
        masks.append((name, got[0], got[1], shape, dtype))
    ordered = []
    for n in proto.graph.node:
        ordered.extend(before.get(n.name, []))
        ordered.append(n)
    del proto.graph.node[:]
    proto.graph.node.extend(ordered)
    return masks


def _zero_like(proto, base, dtype):
    name = f"{base}_zero"
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros((), dtype or np.uint8), name))
    return name
