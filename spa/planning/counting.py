"""Params and MACs of a model, from its constants and the concrete shapes of one probe run."""
from __future__ import annotations

import numpy as np
import onnx

from ..ops.registry import MACS, rule_key

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
#: integer types of quantized weights (int64/int32 initializers are shapes, indices, biases' sums)
_QUANTIZED = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def count_params(proto: onnx.ModelProto) -> int:
    """Elements of floating-point initializers (Constant nodes are moved there at load), and of
    quantized weights: integer initializers of two or more dims (zero points are 1-D), MatMulNBits'
    packed blocks as their K x N weights."""
    total = sum(initializer_params(proto).values())
    for n in proto.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == onnx.TensorProto.FLOAT:
                    total += int(np.prod(a.t.dims)) if len(a.t.dims) else 1
    return total


def initializer_params(proto: onnx.ModelProto) -> dict:
    """{initializer name: the parameters it counts for in :func:`count_params`} (those that count)."""
    packed = {}
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits" and len(n.input) > 1:
            a = {x.name: x.i for x in n.attribute}
            packed[n.input[1]] = int(a.get("K", 0)) * int(a.get("N", 0))
    out = {}
    for t in proto.graph.initializer:
        if t.name in packed:
            out[t.name] = packed[t.name]
        elif t.data_type in _FLOATS or (t.data_type in _QUANTIZED and len(t.dims) >= 2):
            out[t.name] = int(np.prod(t.dims)) if len(t.dims) else 1
    return out


def node_macs(node, shapes) -> int:
    """MACs of one node: Conv, ConvTranspose, Gemm, MatMul here, the families with a module of
    their own by their ``MACS`` (``spa.ops.registry``; others are negligible: 0)."""
    op = node.op_type
    extra = MACS.get(rule_key(node))
    if extra is not None:
        try:
            return int(extra[0](node, shapes))
        except (KeyError, IndexError, TypeError, ValueError):
            return 0
    try:
        if op == "Conv":
            w, y = shapes[node.input[1]], shapes[node.output[0]]
            return int(np.prod(y)) * int(np.prod(w[1:]))
        if op == "ConvTranspose":
            w, x = shapes[node.input[1]], shapes[node.input[0]]
            return int(np.prod(x)) * int(np.prod(w[1:]))
        if op == "Gemm":
            y = shapes[node.output[0]]
            a = shapes[node.input[0]]
            k = a[0] if any(at.name == "transA" and at.i for at in node.attribute) else a[1]
            return int(np.prod(y)) * int(k)
        if op == "MatMul":
            a, y = shapes[node.input[0]], shapes[node.output[0]]
            return int(np.prod(y)) * int(a[-1])
    except (KeyError, IndexError, TypeError):
        return 0
    return 0


def count_macs(proto: onnx.ModelProto, shapes: dict) -> int:
    return sum(node_macs(n, shapes) for n in proto.graph.node)


def mac_axes(node, shapes):
    """The input-channel and output-channel axes whose sizes MACs scale with."""
    extra = MACS.get(rule_key(node))
    if extra is not None:
        return extra[1](node, shapes)
    if node.op_type in ("Conv", "ConvTranspose"):
        return [(node.input[1], 0), (node.input[1], 1)]
    y = node.output[0]
    r = len(shapes.get(y, ()))
    a = node.input[0]
    ra = len(shapes.get(a, ()))
    if node.op_type == "Gemm":
        ta = any(at.name == "transA" and at.i for at in node.attribute)
        return [(a, 0 if ta else 1), (y, 1)]
    return [(a, ra - 1), (y, r - 1)]
