"""How each operator ties the axes of its inputs and outputs: one rule per operator family.

A rule reads one node through a :class:`RuleContext` and declares, in terms of axes
``(tensor, dim)``:

* ``tie(a, b)``: positions of a and b are the same channels (elementwise, BN, Transpose...);
* ``tie_map(out, inp, idx)``: position i of ``out`` is position ``idx[i]`` of ``inp`` (Concat, Slice, Gather);
* ``product(whole, parts)``: ``whole`` is the row-major product of ``parts`` (Reshape, grouped Conv);
* ``fix(axis)``: this axis cannot shrink (a Conv's spatial dims, an operand we cannot rewrite);
* ``sink(axis, kind)``: the channel is consumed here: ``contract`` (Conv/Gemm/MatMul reduction, exact
  to cut by zeroing), ``sum`` (ReduceSum), ``approx`` (LayerNorm, mean, softmax: removal is not exact);
* ``rewrite(kind)``: surgery must update an attribute or a parameter input of this node;
* ``stat(i)``: input i holds statistics, not weights (BN mean/var: excluded from magnitude scores).

Operators without a rule fix every axis they touch: unknown operators block, they never guess.
This module holds the rules of the standard operators and their table (``RULES``; the layout family,
Reshape, Flatten, Squeeze, Unsqueeze, Expand, Shape, is in ``spa.ops.layout``); helpers are in
``spa.ops.common``; the table of every operator, with the families that have a module of their own
(quantized, recurrent, fused), is ``spa.ops.registry``.
"""
from __future__ import annotations

import numpy as np

from .common import attr, broadcast, identity_dims, norm
from .layout import rule_depth_space, rule_expand, rule_reshape, rule_shape, rule_squeeze

# ---------------------------------------------------------------------------------------------
# elementwise


UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Sqrt", "Exp", "Log",
    "Abs", "Neg", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Softplus", "Softsign", "Elu", "Selu",
    "Celu", "Gelu", "Mish", "ThresholdedRelu", "Sin", "Cos", "Identity", "Cast", "Not", "IsNaN",
    "IsInf", "Swish", "Relu6", "CastLike",
}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less",
          "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "Clip",
          "BitShift"}


def rule_unary(ctx):
    node = ctx.node
    identity_dims(ctx, node.input[0], node.output[0])


def rule_broadcast(ctx):
    node = ctx.node
    inputs = list(node.input)
    if node.op_type == "CastLike":
        inputs = inputs[:1]
    broadcast(ctx, inputs, node.output[0])


def rule_dropout(ctx):
    node = ctx.node
    identity_dims(ctx, node.input[0], node.output[0])
    if len(node.output) > 1 and node.output[1]:
        identity_dims(ctx, node.input[0], node.output[1])


# ---------------------------------------------------------------------------------------------
# convolutions and matrix products


def rule_conv(ctx):
    node = ctx.node
    b = node.input[2] if len(node.input) > 2 and node.input[2] else None
    conv_ties(ctx, node.input[0], node.input[1], node.output[0], b, 0)


def conv_ties(ctx, x, w, y, b, x_index):
    """X[1] = G x Ci with W[1] = Ci;  W[0] = Y[1] = B[0] = G x Co.  Spatial dims are fixed.  The
    weight may be computed (a DequantizeLinear or Cast of the stored one): its axes are tied all
    the same, and surgery slices what it is computed from.  Shared by Conv, ConvTranspose and the
    quantized convolutions (``x_index``: where X is among the node's inputs, for the contraction
    sink; None: the caller declares its own)."""
    node = ctx.node
    rank = ctx.rank(x)
    if rank is None or ctx.rank(w) != rank:
        return ctx.fix_all()
    g = int(attr(node, "group", 1))
    transpose = node.op_type == "ConvTranspose"
    ctx.tie((x, 0), (y, 0))
    for d in range(2, rank):
        ctx.spatial((x, d)), ctx.spatial((y, d)), ctx.spatial((w, d))
    w_in, w_out = (0, 1) if transpose else (1, 0)
    ci = ctx.size((w, w_in)) if not transpose else ctx.size((w, 0)) // g
    if g == 1:
        ctx.tie((x, 1), (w, w_in))
        ctx.tie((w, w_out), (y, 1))
    else:
        G = ctx.virtual("group", g)
        if transpose:
            # W[0] = X[1] = G x Ci ; Y[1] = G x W[1]
            ctx.tie((x, 1), (w, 0))
            ctx.product((w, 0), [G, ctx.virtual("cin", ci)])
            ctx.product((y, 1), [G, (w, 1)])
        else:
            ctx.product((x, 1), [G, (w, 1)])
            ctx.product((w, 0), [G, ctx.virtual("cout", ctx.size((w, 0)) // g)])
            ctx.tie((w, 0), (y, 1))
        ctx.rewrite("group", virtual=G)
    if b:
        ctx.tie((b, 0), (y, 1))
    if x_index is not None:
        ctx.sink((x, 1), "contract", x_index)


def rule_gemm(ctx):
    node = ctx.node
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    ak, bk = gemm_ties(ctx, a, b, node.output[0], c)
    ctx.sink(ak, "contract", 0)
    if not ctx.is_const(b):
        ctx.sink(bk, "contract", 1)


def gemm_ties(ctx, a, b, y, c):
    """Y = A' B' (+ C) with the node's transA/transB; returns the contracted axes of A and B.
    Shared with the quantized Gemm."""
    node = ctx.node
    ta, tb = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    am, ak = (1, 0) if ta else (0, 1)
    bk, bn = (1, 0) if tb else (0, 1)
    ctx.tie((a, ak), (b, bk))
    ctx.tie((a, am), (y, 0))
    ctx.tie((b, bn), (y, 1))
    if c:
        broadcast(ctx, [c], y)
    return (a, ak), (b, bk)


def rule_matmul(ctx):
    node = ctx.node
    a, b = node.input[0], node.input[1]
    got = matmul_ties(ctx, a, b, node.output[0])
    if got is None:
        return
    ak, bk = got
    if ctx.is_const(b) or not ctx.is_const(a):
        ctx.sink(ak, "contract", 0)
    else:
        ctx.sink(bk, "contract", 1)


def matmul_ties(ctx, a, b, y):
    """numpy matmul's axes (batch dims broadcast); returns the contracted axes of A and B, or None
    when the node was blocked.  Shared with the quantized and integer matrix products."""
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if ra is None or rb is None or ra < 2 or rb < 2:
        ctx.fix_all()
        return None
    ctx.tie((a, ra - 1), (b, rb - 2))
    ctx.tie((a, ra - 2), (y, ry - 2))
    ctx.tie((b, rb - 1), (y, ry - 1))
    for name, r in ((a, ra), (b, rb)):  # batch dims broadcast
        for d in range(r - 2):
            yd = ry - r + d
            if ctx.size((name, d)) == ctx.size((y, yd)):
                ctx.tie((name, d), (y, yd))
            elif ctx.size((name, d)) != 1:
                ctx.fix_all()
                return None
    return (a, ra - 1), (b, rb - 2)


# ---------------------------------------------------------------------------------------------
# normalisation and pooling


def rule_batchnorm(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    identity_dims(ctx, x, y)
    for i in range(1, 5):
        ctx.tie((node.input[i], 0), (x, 1))
    ctx.stat(3), ctx.stat(4)
    for extra in node.output[1:]:
        if extra:
            ctx.fix_tensor(extra)


def rule_instancenorm(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    identity_dims(ctx, x, y)
    ctx.tie((node.input[1], 0), (x, 1))
    ctx.tie((node.input[2], 0), (x, 1))


def rule_layernorm(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    axis = norm(int(attr(node, "axis", -1)), r)
    identity_dims(ctx, x, y)
    for i in (1, 2):
        if len(node.input) > i and node.input[i]:
            broadcast(ctx, [node.input[i]], y)
    for d in range(axis, r):
        ctx.sink((x, d), "approx", 0)
    for extra in node.output[1:]:
        if extra:
            ctx.fix_tensor(extra)


def rule_pool(ctx):
    node = ctx.node
    x = node.input[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    for y in node.output:
        if not y:
            continue
        ctx.tie((x, 0), (y, 0))
        ctx.tie((x, 1), (y, 1))
        for d in range(2, r):
            ctx.spatial((x, d)), ctx.spatial((y, d))


REDUCE_EXACT = {"ReduceSum"}


def rule_reduce(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.const(node.input[1])
        if axes is None:
            return ctx.fix_all()
        axes = [int(v) for v in np.ravel(axes)]
    if axes is None or len(axes) == 0:
        if int(attr(node, "noop_with_empty_axes", 0)):
            return identity_dims(ctx, x, y)
        axes = list(range(r))
    axes = sorted(norm(a, r) for a in axes)
    keep = int(attr(node, "keepdims", 1))
    yd = 0
    for d in range(r):
        if d in axes:
            kind = "sum" if node.op_type in REDUCE_EXACT else "approx"
            ctx.sink((x, d), kind, 0)
            yd += keep
        else:
            ctx.tie((x, d), (y, yd))
            yd += 1


def rule_softmax(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    identity_dims(ctx, x, y)
    axis = norm(int(attr(node, "axis", -1)), r)
    ctx.sink((x, axis), "approx", 0)


# ---------------------------------------------------------------------------------------------
# shape-preserving data movement


def rule_resize(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    for d in range(r):
        if ctx.size((x, d)) == ctx.size((y, d)) and d < 2:
            ctx.tie((x, d), (y, d))
        else:
            ctx.spatial((x, d)), ctx.spatial((y, d))
    if len(node.input) > 3 and node.input[3]:
        ctx.rewrite("sizes")


def rule_pad(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    pads = attr(node, "pads")
    if pads is None and len(node.input) > 1:
        pads = ctx.const(node.input[1])
    axes = None
    if len(node.input) > 3 and node.input[3]:
        axes = ctx.const(node.input[3])
        if axes is None:
            return ctx.fix_all()
    if pads is None or r is None:
        return ctx.fix_all()
    pads = [int(p) for p in np.ravel(pads)]
    axes = list(range(r)) if axes is None else [norm(int(a), r) for a in np.ravel(axes)]
    padded = {a for i, a in enumerate(axes) if pads[i] != 0 or pads[i + len(axes)] != 0}
    for d in range(r):
        if d in padded:
            ctx.fix((x, d)), ctx.fix((y, d))
        else:
            ctx.tie((x, d), (y, d))


def rule_transpose(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    perm = attr(node, "perm") or list(reversed(range(r)))
    for yd, xd in enumerate(perm):
        ctx.tie((x, xd), (y, yd))


def rule_concat(ctx):
    concat_ties(ctx, list(ctx.node.input), ctx.node.output[0])


def concat_ties(ctx, inputs, y):
    """Each input's positions on the node's axis are a segment of the output's (shared with QLinearConcat)."""
    r = ctx.rank(y)
    if r is None:
        return ctx.fix_all()
    axis = norm(int(attr(ctx.node, "axis")), r)
    offset = 0
    for x in inputs:
        if ctx.rank(x) is None:
            return ctx.fix_all()
        n = ctx.size((x, axis))
        for d in range(r):
            if d == axis:
                ctx.tie_map((y, d), (x, d), np.arange(n), out_offset=offset)
            else:
                ctx.tie((x, d), (y, d))
        offset += n


def rule_split(ctx):
    node = ctx.node
    x = node.input[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    axis = norm(int(attr(node, "axis", 0)), r)
    offset = 0
    for y in node.output:
        n = ctx.size((y, axis))
        for d in range(r):
            if d == axis:
                ctx.tie_map((y, d), (x, d), np.arange(offset, offset + n))
            else:
                ctx.tie((x, d), (y, d))
        offset += n
    ctx.rewrite("split", axis=axis)


def rule_slice(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    if len(node.input) == 1:  # opset < 10 keeps the parameters in attributes
        starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
    else:
        names = list(node.input[1:5]) + [""] * (5 - len(node.input))
        starts, ends, axes, steps = [ctx.const(n) if n else None for n in names]
        if any(n and v is None for n, v in zip(names, (starts, ends, axes, steps))):
            return _slice_live(ctx, x, y, names, r)
    starts, ends = [int(v) for v in np.ravel(starts)], [int(v) for v in np.ravel(ends)]
    axes = list(range(len(starts))) if axes is None else [norm(int(a), r) for a in np.ravel(axes)]
    steps = [1] * len(starts) if steps is None else [int(s) for s in np.ravel(steps)]
    sliced = {}
    for s, e, a, st in zip(starts, ends, axes, steps):
        sliced[a] = np.arange(ctx.size((x, a)))[slice(s, e, st)] if st == 1 else None
    for d in range(r):
        if d in sliced:
            idx = sliced[d]
            if idx is None:
                ctx.fix((x, d)), ctx.fix((y, d))
            elif len(idx) == ctx.size((x, d)):
                ctx.tie((x, d), (y, d))
            else:
                ctx.tie_map((y, d), (x, d), idx)
        else:
            ctx.tie((x, d), (y, d))
    ctx.rewrite("slice", sliced={a: (i is not None) for a, i in sliced.items()})


def _slice_live(ctx, x, y, names, r):
    """A Slice whose bounds are computed at run time (``cos_cached[:seq]``): the sliced axes are
    positions, not channels; every other axis flows through unchanged."""
    axes = ctx.value(names[2]) if names[2] else None
    if axes is None:
        starts = ctx.value(names[0])
        if names[2] or starts is None:
            return ctx.fix_all()
        axes = range(np.size(starts))
    sliced = {norm(int(a), r) for a in np.ravel(axes)}
    for d in range(r):
        if d in sliced:
            ctx.fix((x, d)), ctx.fix((y, d))
        else:
            ctx.tie((x, d), (y, d))


def rule_gather(ctx):
    node = ctx.node
    data, idx_name, y = node.input[0], node.input[1], node.output[0]
    r = ctx.rank(data)
    if r is None:
        return ctx.fix_all()
    axis = norm(int(attr(node, "axis", 0)), r)
    idx = ctx.const(idx_name)
    ir = ctx.rank(idx_name)
    for d in range(r):
        if d < axis:
            ctx.tie((data, d), (y, d))
        elif d > axis:
            ctx.tie((data, d), (y, d + ir - 1))
    if idx is None or ir > 1:
        # indices computed at run time (an embedding lookup: the table's rows are fixed), or a
        # constant table of them (an attention-bias table [heads, relative positions] read at idx
        # [N, N]: positions, not channels); the indices' dims are the output's (a constant one is
        # sliced with them), every other axis of the table flows on (its columns, the heads)
        if idx is None:
            ctx.fix((data, axis))
        else:
            ctx.spatial((data, axis))
        for d in range(ir):
            ctx.tie((idx_name, d), (y, axis + d))
        return
    n = ctx.size((data, axis))
    flat = np.where(np.ravel(idx) < 0, np.ravel(idx) + n, np.ravel(idx)).astype(np.int64)
    if ir == 0:
        ctx.fix((data, axis), positions=flat)
    else:
        ctx.tie_map((y, axis), (data, axis), flat)
    ctx.rewrite("gather", axis=axis)


def rule_gather_nd(ctx):
    """GatherND(data, indices[..., q]) with ``batch_dims`` b: the output is indices.shape[:-1] +
    data.shape[b+q:].  Batch dims are tied through; the indexed dims of data are positions read by
    run-time indices (fixed: a mixture of experts' expert axis); the dims after them flow to the
    output (an expert's weights: their channels stay prunable); the indices' leading dims are the
    output's (tokens)."""
    node = ctx.node
    data, idx, y = node.input[0], node.input[1], node.output[0]
    r, ir, ry = ctx.rank(data), ctx.rank(idx), ctx.rank(y)
    q = ctx.size((idx, ir - 1)) if ir else None
    b = int(attr(node, "batch_dims", 0))
    if r is None or ir is None or ry is None or q is None or ry != ir - 1 + r - b - q:
        return ctx.fix_all()
    for d in range(b):
        ctx.tie((data, d), (y, d)), ctx.tie((idx, d), (y, d))
    for d in range(b, b + q):
        ctx.fix((data, d))
    for d in range(b, ir - 1):
        ctx.tie((idx, d), (y, d))
    ctx.fix((idx, ir - 1))
    for d in range(b + q, r):
        ctx.tie((data, d), (y, ir - 1 + d - b - q))


def rule_scatter_nd(ctx):
    """ScatterND(data, indices[..., q], updates): the output is data with the indexed slices
    replaced; updates' trailing dims are data's dims after the q indexed ones (tied), the indexed
    dims are positions (fixed)."""
    node = ctx.node
    data, idx, upd, y = node.input[0], node.input[1], node.input[2], node.output[0]
    r, ir, ru = ctx.rank(data), ctx.rank(idx), ctx.rank(upd)
    q = ctx.size((idx, ir - 1)) if ir else None
    if r is None or ir is None or ru is None or q is None or ru != ir - 1 + r - q:
        return ctx.fix_all()
    identity_dims(ctx, data, y)
    for d in range(q):
        ctx.fix((data, d))
    for d in range(ir - 1):
        ctx.tie((idx, d), (upd, d))
    ctx.fix((idx, ir - 1))
    for d in range(q, r):
        ctx.tie((data, d), (upd, ir - 1 + d - q))


def rule_gather_elements(ctx):
    """GatherElements / ScatterElements along ``axis``: every other dim indexes data directly
    (tied where the sizes agree); the axis is positions chosen at run time (fixed)."""
    node = ctx.node
    data, idx = node.input[0], node.input[1]
    y = node.output[0]
    r = ctx.rank(data)
    if r is None or ctx.rank(idx) != r or ctx.rank(y) is None:
        return ctx.fix_all()
    axis = norm(int(attr(node, "axis", 0)), r)
    others = [idx, y] + ([node.input[2]] if node.op_type == "ScatterElements" else [])
    for d in range(r):
        if d == axis:
            ctx.fix((data, d))
            for t in others:
                ctx.fix((t, d))
            continue
        for t in others:
            if ctx.size((t, d)) == ctx.size((data, d)):
                ctx.tie((t, d), (data, d))
            else:
                ctx.fix((t, d)), ctx.fix((data, d))
    if node.op_type == "ScatterElements":
        identity_dims(ctx, data, y)


def rule_topk(ctx):
    """TopK(X, K) along ``axis``: values and indices keep X's other dims; the axis is ranked (fixed)."""
    node = ctx.node
    x = node.input[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    axis = norm(int(attr(node, "axis", -1)), r)
    for y in node.output:
        if not y:
            continue
        for d in range(r):
            if d == axis:
                ctx.fix((x, d)), ctx.fix((y, d))
            else:
                ctx.tie((x, d), (y, d))


def rule_passthrough_fixed(ctx):
    ctx.fix_all()


RULES = {}
for _op in UNARY:
    RULES[_op] = rule_unary
for _op in BINARY:
    RULES[_op] = rule_broadcast
RULES.update({
    "Dropout": rule_dropout,
    "Conv": rule_conv, "ConvTranspose": rule_conv,
    "Gemm": rule_gemm, "MatMul": rule_matmul,
    "BatchNormalization": rule_batchnorm, "InstanceNormalization": rule_instancenorm,
    "LayerNormalization": rule_layernorm,
    "MaxPool": rule_pool, "AveragePool": rule_pool, "LpPool": rule_pool,
    "GlobalAveragePool": rule_pool, "GlobalMaxPool": rule_pool, "GlobalLpPool": rule_pool,
    "ReduceMean": rule_reduce, "ReduceMax": rule_reduce, "ReduceMin": rule_reduce,
    "ReduceSum": rule_reduce, "ReduceL2": rule_reduce, "ReduceL1": rule_reduce,
    "ReduceProd": rule_reduce, "ReduceSumSquare": rule_reduce, "ReduceLogSumExp": rule_reduce,
    "Softmax": rule_softmax, "LogSoftmax": rule_softmax,
    "Resize": rule_resize, "Upsample": rule_resize, "Pad": rule_pad,
    "Transpose": rule_transpose, "Concat": rule_concat, "Split": rule_split,
    "Slice": rule_slice, "Gather": rule_gather, "GatherND": rule_gather_nd, "ScatterND": rule_scatter_nd,
    "GatherElements": rule_gather_elements, "ScatterElements": rule_gather_elements, "TopK": rule_topk,
    "Reshape": rule_reshape, "Flatten": rule_squeeze, "Squeeze": rule_squeeze, "Unsqueeze": rule_squeeze,
    "Expand": rule_expand, "Shape": rule_shape, "Size": rule_shape,
    "DepthToSpace": rule_depth_space, "SpaceToDepth": rule_depth_space,
})
