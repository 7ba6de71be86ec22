"""Quantized models: QDQ pairs, QOperator and integer operators, 4-bit MatMulNBits.

**QDQ** (QuantizeLinear / DequantizeLinear, as ``onnxruntime.quantization.quantize_static`` and
quantization-aware-training exports write them) is elementwise: channels flow through, and a
per-channel scale and zero point (1-D, along the node's ``axis``) are tied to that axis, so they are
sliced with the weights; a per-tensor scale is a scalar and needs nothing.  The float operators
between the pairs (Conv, Gemm, MatMul) read a weight computed by DequantizeLinear: their rules tie it
like a stored weight, and surgery slices the stored integers (and their scales) instead.  The
pruned model is still quantized.  Blocked quantization (``block_size``) blocks the blocked axis.

**QOperator / integer operators** (QLinearConv, QLinearMatMul, QGemm, ConvInteger, MatMulInteger,
MatMulIntegerToFloat, DynamicQuantizeMatMul, QLinearAdd/Mul/Concat/pooling/activations) tie their
axes like their float forms, with inputs at other positions; per-channel weight scales and zero
points are tied to the output channel.  The contraction over a quantized input is a ``qcontract``
sink: cutting a channel there means holding it at its zero point (its real value 0), which is what
removing it from the integer accumulation is.  Activations quantized at run time
(DynamicQuantizeLinear, DynamicQuantizeMatMul) take their scale from the whole tensor's range:
removing channels can change it, so those contractions are approximate.

**MatMulNBits** (4-bit blocks along K: ``B`` is ``[N, K / block_size, block_size * bits / 8]``
bytes, ``scales`` ``[N * K / block_size]`` or ``[N, K / block_size]``): an output channel is a row
of B, of its scales and of its zero points, and the attribute ``N`` counts them; an input channel
can only go with its whole block, so K is the product of [blocks, positions in a block] with the
positions fixed: groups reading K lose whole blocks or nothing, and ``K`` is rewritten.

Scorers read quantized weights dequantized (``RuleContext.dequantized``), and scales and zero points
are not weights (``stat``).
"""
from __future__ import annotations

from .common import attr, broadcast, identity_dims, norm
from .rules import concat_ties, conv_ties, gemm_ties, matmul_ties

MS = "com.microsoft"


def _input(node, i):
    return node.input[i] if len(node.input) > i and node.input[i] else ""


def _per_channel(ctx, vec, axis):
    """Tie a 1-D per-channel parameter (scale, zero point) to ``axis``; scalars need nothing."""
    if not vec or ctx.rank(vec) in (None, 0):
        return
    if ctx.rank(vec) == 1 and ctx.size((vec, 0)) == ctx.size(axis):
        ctx.tie((vec, 0), axis)
    elif ctx.rank(vec) == 1 and ctx.size((vec, 0)) == 1:
        return
    else:
        ctx.fix_tensor(vec)
        ctx.fix(axis)


# ---------------------------------------------------------------------------------------------
# QDQ


def rule_qdq(ctx):
    """QuantizeLinear / DequantizeLinear: elementwise, per-channel parameters on ``axis``."""
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    identity_dims(ctx, x, y)
    scale, zp = _input(node, 1), _input(node, 2)
    ctx.stat(1), ctx.stat(2)
    axis = None
    if int(attr(node, "block_size", 0) or 0) and ctx.rank(scale) == r:
        axis = norm(int(attr(node, "axis", 1)), r)
        for p in (scale, zp):
            if p:
                for d in range(r):
                    if d == axis:
                        ctx.fix((p, d))
                        ctx.fix((x, d))
                    else:
                        ctx.tie((p, d), (x, d))
    elif ctx.rank(scale) == 1 and ctx.size((scale, 0)) > 1:
        axis = norm(int(attr(node, "axis", 1)), r)
        for p in (scale, zp):
            _per_channel(ctx, p, (x, axis))
    if node.op_type == "DequantizeLinear" and ctx.is_const(x) and ctx.is_const(scale) and \
            not int(attr(node, "block_size", 0) or 0):
        ctx.dequantized(x, scale, zp, axis)


def rule_dynamic_quantize(ctx):
    """DynamicQuantizeLinear: y is x quantized with a scale from x's whole range (removing channels
    may change it: the channel axis is an approximate sink); y_scale, y_zero_point are scalars."""
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    identity_dims(ctx, x, y)
    ctx.sink((x, r - 1), "approx", 0)


# ---------------------------------------------------------------------------------------------
# QOperator convolutions and products


def rule_qlinear_conv(ctx):
    """QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B): a Conv on x and w."""
    node = ctx.node
    x, w, y, b = node.input[0], node.input[3], node.output[0], _input(node, 8)
    conv_ties(ctx, x, w, y, b, None)
    _weight_params(ctx, w, _input(node, 4), _input(node, 5), 0)
    ctx.stat(1), ctx.stat(2), ctx.stat(6), ctx.stat(7)
    ctx.qsink((x, 1), 0, 2)


def rule_conv_integer(ctx):
    """ConvInteger(x, w, x_zp, w_zp) -> int32."""
    node = ctx.node
    x, w, y = node.input[0], node.input[1], node.output[0]
    conv_ties(ctx, x, w, y, None, None)
    _per_channel(ctx, _input(node, 3), (w, 0))
    ctx.stat(2), ctx.stat(3)
    ctx.qsink((x, 1), 0, 2)


def _weight_params(ctx, w, scale, zp, axis):
    """A quantized weight's per-output-channel scale and zero point, and its dequantized meaning."""
    for p in (scale, zp):
        _per_channel(ctx, p, (w, axis))
    if ctx.is_const(w) and scale and ctx.is_const(scale):
        per = ctx.rank(scale) == 1 and ctx.size((scale, 0)) > 1
        ctx.dequantized(w, scale, zp, axis if per else None)


def rule_qlinear_matmul(ctx):
    """QLinearMatMul(a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp): a MatMul of a and b; b's per-column
    parameters on its last axis."""
    node = ctx.node
    a, b, y = node.input[0], node.input[3], node.output[0]
    got = matmul_ties(ctx, a, b, y)
    if got is None:
        return
    rb = ctx.rank(b)
    _weight_params(ctx, b, _input(node, 4), _input(node, 5), rb - 1)
    ctx.stat(1), ctx.stat(2), ctx.stat(6), ctx.stat(7)
    _product_sinks(ctx, got, (0, 2), (3, 5))


def rule_matmul_integer(ctx):
    """MatMulInteger(a, b, a_zp, b_zp) -> int32 (dynamic quantization's product)."""
    node = ctx.node
    a, b, y = node.input[0], node.input[1], node.output[0]
    got = matmul_ties(ctx, a, b, y)
    if got is None:
        return
    _per_channel(ctx, _input(node, 3), (b, ctx.rank(b) - 1))
    ctx.stat(2), ctx.stat(3)
    _product_sinks(ctx, got, (0, 2), (1, 3))


def rule_matmul_integer_to_float(ctx):
    """com.microsoft MatMulIntegerToFloat(a, b, a_scale, b_scale, a_zp, b_zp, bias) -> float."""
    node = ctx.node
    a, b, y = node.input[0], node.input[1], node.output[0]
    got = matmul_ties(ctx, a, b, y)
    if got is None:
        return
    last = (b, ctx.rank(b) - 1)
    _weight_params(ctx, b, _input(node, 3), _input(node, 5), last[1])
    if _input(node, 6):
        broadcast(ctx, [node.input[6]], y)
    ctx.stat(2), ctx.stat(3), ctx.stat(4), ctx.stat(5)
    _product_sinks(ctx, got, (0, 4), (1, 5))


def rule_dynamic_quantize_matmul(ctx):
    """com.microsoft DynamicQuantizeMatMul(a float, b int8, b_scale, b_zp, bias): a is quantized with
    a scale from its whole range inside the op, so cutting its channels is approximate."""
    node = ctx.node
    a, b, y = node.input[0], node.input[1], node.output[0]
    got = matmul_ties(ctx, a, b, y)
    if got is None:
        return
    _weight_params(ctx, b, _input(node, 2), _input(node, 3), ctx.rank(b) - 1)
    if _input(node, 4):
        broadcast(ctx, [node.input[4]], y)
    ctx.stat(2), ctx.stat(3)
    ctx.sink(got[0], "approx", 0)


def _product_sinks(ctx, got, a_io, b_io):
    """Sinks of a quantized product: on A's contracted axis, or on B's when A is the constant."""
    (ak, bk), (a_index, a_zp), (b_index, b_zp) = got, a_io, b_io
    a, b = ctx.node.input[a_index], ctx.node.input[b_index]
    if ctx.is_const(b) or not ctx.is_const(a):
        ctx.qsink(ak, a_index, a_zp)
    else:
        ctx.qsink(bk, b_index, b_zp)


def rule_qgemm(ctx):
    """com.microsoft QGemm(A, a_s, a_zp, B, b_s, b_zp, C, y_s, y_zp) with transA/transB; y_s absent:
    float output."""
    node = ctx.node
    a, b, y = node.input[0], node.input[3], node.output[0]
    ak, bk = gemm_ties(ctx, a, b, y, _input(node, 6))
    bn = (b, 0 if int(attr(node, "transB", 0)) else 1)
    _weight_params(ctx, b, _input(node, 4), _input(node, 5), bn[1])
    ctx.stat(1), ctx.stat(2), ctx.stat(7), ctx.stat(8)
    _product_sinks(ctx, (ak, bk), (0, 2), (3, 5))


# ---------------------------------------------------------------------------------------------
# QOperator elementwise, concat, pooling


def rule_qlinear_binary(ctx):
    """QLinearAdd / QLinearMul (A, A_s, A_zp, B, B_s, B_zp, C_s, C_zp): numpy broadcasting of A, B."""
    node = ctx.node
    broadcast(ctx, [node.input[0], _input(node, 3)], node.output[0])
    for i in (1, 2, 4, 5, 6, 7):
        ctx.stat(i)


def rule_qlinear_unary(ctx):
    """QLinearSigmoid / QLinearLeakyRelu / QLinearSoftmax-free activations: X (input 0) -> Y."""
    node = ctx.node
    identity_dims(ctx, node.input[0], node.output[0])
    for i in range(1, len(node.input)):
        ctx.stat(i)


def rule_qlinear_concat(ctx):
    """QLinearConcat(Y_s, Y_zp, X0, X0_s, X0_zp, X1, ...): Concat of the X's."""
    node = ctx.node
    concat_ties(ctx, [node.input[i] for i in range(2, len(node.input), 3)], node.output[0])


def rule_qlinear_pool(ctx):
    """QLinearGlobalAveragePool / QLinearAveragePool (X, x_s, x_zp, y_s, y_zp), NCHW or channels_last."""
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None or ctx.rank(y) != r:
        return ctx.fix_all()
    c = r - 1 if int(attr(node, "channels_last", 0)) else 1
    for d in range(r):
        if d in (0, c):
            ctx.tie((x, d), (y, d))
        else:
            ctx.spatial((x, d)), ctx.spatial((y, d))


# ---------------------------------------------------------------------------------------------
# 4-bit weights


def rule_matmul_nbits(ctx):
    """com.microsoft MatMulNBits(A, B, scales, zero_points, g_idx, bias), attributes K, N, bits,
    block_size (see the module docstring)."""
    node = ctx.node
    a, b, y = node.input[0], node.input[1], node.output[0]
    scales, zp, g_idx, bias = _input(node, 2), _input(node, 3), _input(node, 4), _input(node, 5)
    K, N = int(attr(node, "K")), int(attr(node, "N"))
    block = int(attr(node, "block_size"))
    ra, ry = ctx.rank(a), ctx.rank(y)
    if ra is None or ry is None or ctx.rank(b) != 3 or g_idx or K % block or ctx.size((a, ra - 1)) != K:
        return ctx.fix_all()
    blocks = K // block
    for d in range(ra - 1):
        ctx.tie((a, d), (y, d))
    # N: rows of B, of the scales and of the zero points
    ctx.tie((b, 0), (y, ry - 1))
    for p in (scales, zp):
        if not p:
            continue
        if ctx.rank(p) == 2 and ctx.size((p, 0)) == N:
            ctx.tie((p, 0), (b, 0))
            if ctx.size((p, 1)) == blocks:
                ctx.tie((p, 1), (b, 1))
            else:  # packed 4-bit zero points: two blocks a byte
                ctx.fix((p, 1))
                ctx.fix((b, 1))
        elif ctx.rank(p) == 1 and ctx.size((p, 0)) == N * blocks:
            ctx.product((p, 0), [(b, 0), (b, 1)])
        elif ctx.rank(p) == 1 and ctx.size((p, 0)) % N == 0:
            per_row = ctx.size((p, 0)) // N   # packed zero points: bytes per row
            ctx.product((p, 0), [(b, 0), ctx.virtual("zp_bytes", per_row)])
            ctx.fix((b, 1))
        else:
            return ctx.fix_all()
    ctx.stat(2), ctx.stat(3)
    if bias:
        ctx.tie((bias, 0), (b, 0))
    # K: whole blocks only (positions within a block fixed); the blob bytes are not channels
    in_block = ctx.virtual("in_block", block)
    ctx.product((a, ra - 1), [(b, 1), in_block])
    ctx.spatial(in_block)
    ctx.spatial((b, 2))
    ctx.rewrite("attr", attr="N", axis=(b, 0))
    ctx.rewrite("attr", attr="K", axis=(a, ra - 1))
    ctx.sink((a, ra - 1), "contract", 0)


# ---------------------------------------------------------------------------------------------
# MACs: like their float forms


def _conv_macs(w_index):
    def macs(node, shapes):
        w, y = shapes[node.input[w_index]], shapes[node.output[0]]
        return _prod(y) * _prod(w[1:])

    def axes(node, shapes):
        return [(node.input[w_index], 0), (node.input[w_index], 1)]
    return macs, axes


def _matmul_macs(node, shapes):
    a, y = shapes[node.input[0]], shapes[node.output[0]]
    return _prod(y) * int(a[-1])


def _matmul_axes(node, shapes):
    a, y = node.input[0], node.output[0]
    return [(a, len(shapes.get(a, ())) - 1), (y, len(shapes.get(y, ())) - 1)]


def _qgemm_macs(node, shapes):
    y, a = shapes[node.output[0]], shapes[node.input[0]]
    k = a[0] if int(attr(node, "transA", 0)) else a[1]
    return _prod(y) * int(k)


def _qgemm_axes(node, shapes):
    a, y = node.input[0], node.output[0]
    return [(a, 0 if int(attr(node, "transA", 0)) else 1), (y, 1)]


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


RULES = {
    "QuantizeLinear": rule_qdq, "DequantizeLinear": rule_qdq,
    f"{MS}:QuantizeLinear": rule_qdq, f"{MS}:DequantizeLinear": rule_qdq,
    "DynamicQuantizeLinear": rule_dynamic_quantize,
    "QLinearConv": rule_qlinear_conv, "ConvInteger": rule_conv_integer,
    "QLinearMatMul": rule_qlinear_matmul, "MatMulInteger": rule_matmul_integer,
    f"{MS}:MatMulIntegerToFloat": rule_matmul_integer_to_float,
    f"{MS}:DynamicQuantizeMatMul": rule_dynamic_quantize_matmul,
    f"{MS}:QGemm": rule_qgemm,
    f"{MS}:QLinearAdd": rule_qlinear_binary, f"{MS}:QLinearMul": rule_qlinear_binary,
    f"{MS}:QLinearSigmoid": rule_qlinear_unary, f"{MS}:QLinearLeakyRelu": rule_qlinear_unary,
    f"{MS}:QLinearConcat": rule_qlinear_concat,
    f"{MS}:QLinearGlobalAveragePool": rule_qlinear_pool, f"{MS}:QLinearAveragePool": rule_qlinear_pool,
    f"{MS}:MatMulNBits": rule_matmul_nbits,
}

MACS = {
    "QLinearConv": _conv_macs(3), "ConvInteger": _conv_macs(1),
    "QLinearMatMul": (_matmul_macs, _matmul_axes), "MatMulInteger": (_matmul_macs, _matmul_axes),
    f"{MS}:MatMulIntegerToFloat": (_matmul_macs, _matmul_axes),
    f"{MS}:DynamicQuantizeMatMul": (_matmul_macs, _matmul_axes),
    f"{MS}:MatMulNBits": (_matmul_macs, _matmul_axes),
    f"{MS}:QGemm": (_qgemm_macs, _qgemm_axes),
}

REWRITES: dict = {}
