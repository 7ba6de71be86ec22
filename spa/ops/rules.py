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
"""
from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------
# helpers


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx
            return onnx.helper.get_attribute_value(a)
    return default


def _norm(axis, rank):
    return axis + rank if axis < 0 else axis


def _broadcast(ctx, inputs, out):
    """numpy broadcasting: equal sizes on aligned dims are tied; size-1 operands are not."""
    out_rank = ctx.rank(out)
    if out_rank is None:
        return ctx.fix_all()
    for name in inputs:
        if not name:
            continue
        r = ctx.rank(name)
        if r is None:
            return ctx.fix_all()
        for d in range(r):
            od = out_rank - r + d
            if ctx.size((name, d)) == ctx.size((out, od)):
                ctx.tie((name, d), (out, od))
            elif ctx.size((name, d)) != 1:
                ctx.fix((name, d))
                ctx.fix((out, od))


def _identity_dims(ctx, a, b):
    ra, rb = ctx.rank(a), ctx.rank(b)
    if ra is None or ra != rb:
        return ctx.fix_all()
    for d in range(ra):
        ctx.tie((a, d), (b, d))


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
    _identity_dims(ctx, node.input[0], node.output[0])


def rule_broadcast(ctx):
    node = ctx.node
    inputs = list(node.input)
    if node.op_type == "CastLike":
        inputs = inputs[:1]
    _broadcast(ctx, inputs, node.output[0])


def rule_dropout(ctx):
    node = ctx.node
    _identity_dims(ctx, node.input[0], node.output[0])
    if len(node.output) > 1 and node.output[1]:
        _identity_dims(ctx, node.input[0], node.output[1])


# ---------------------------------------------------------------------------------------------
# convolutions and matrix products


def rule_conv(ctx):
    """X[1] = G x Ci with W[1] = Ci;  W[0] = Y[1] = B[0] = G x Co.  Spatial dims are fixed."""
    node = ctx.node
    x, w = node.input[0], node.input[1]
    y = node.output[0]
    b = node.input[2] if len(node.input) > 2 and node.input[2] else None
    rank = ctx.rank(x)
    if rank is None or not ctx.is_const(w):
        return ctx.fix_all()
    g = int(_attr(node, "group", 1))
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
    ctx.sink((x, 1), "contract", 0)


def rule_gemm(ctx):
    node = ctx.node
    a, b = node.input[0], node.input[1]
    y = node.output[0]
    ta, tb = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
    am, ak = (1, 0) if ta else (0, 1)
    bk, bn = (1, 0) if tb else (0, 1)
    ctx.tie((a, ak), (b, bk))
    ctx.tie((a, am), (y, 0))
    ctx.tie((b, bn), (y, 1))
    if len(node.input) > 2 and node.input[2]:
        _broadcast(ctx, [node.input[2]], y)
    ctx.sink((a, ak), "contract", 0)
    if not ctx.is_const(b):
        ctx.sink((b, bk), "contract", 1)


def rule_matmul(ctx):
    node = ctx.node
    a, b = node.input[0], node.input[1]
    y = node.output[0]
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if ra is None or rb is None or ra < 2 or rb < 2:
        return ctx.fix_all()
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
    if ctx.is_const(b) or not ctx.is_const(a):
        ctx.sink((a, ra - 1), "contract", 0)
    else:
        ctx.sink((b, rb - 2), "contract", 1)


# ---------------------------------------------------------------------------------------------
# normalisation and pooling


def rule_batchnorm(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    _identity_dims(ctx, x, y)
    for i in range(1, 5):
        ctx.tie((node.input[i], 0), (x, 1))
    ctx.stat(3), ctx.stat(4)
    for extra in node.output[1:]:
        if extra:
            ctx.fix_tensor(extra)


def rule_instancenorm(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    _identity_dims(ctx, x, y)
    ctx.tie((node.input[1], 0), (x, 1))
    ctx.tie((node.input[2], 0), (x, 1))


def rule_layernorm(ctx):
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    axis = _norm(int(_attr(node, "axis", -1)), r)
    _identity_dims(ctx, x, y)
    for i in (1, 2):
        if len(node.input) > i and node.input[i]:
            _broadcast(ctx, [node.input[i]], y)
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
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = ctx.const(node.input[1])
        if axes is None:
            return ctx.fix_all()
        axes = [int(v) for v in np.ravel(axes)]
    if axes is None or len(axes) == 0:
        if int(_attr(node, "noop_with_empty_axes", 0)):
            return _identity_dims(ctx, x, y)
        axes = list(range(r))
    axes = sorted(_norm(a, r) for a in axes)
    keep = int(_attr(node, "keepdims", 1))
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
    _identity_dims(ctx, x, y)
    axis = _norm(int(_attr(node, "axis", -1)), r)
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
    pads = _attr(node, "pads")
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
    axes = list(range(r)) if axes is None else [_norm(int(a), r) for a in np.ravel(axes)]
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
    perm = _attr(node, "perm") or list(reversed(range(r)))
    for yd, xd in enumerate(perm):
        ctx.tie((x, xd), (y, yd))


def rule_concat(ctx):
    node = ctx.node
    y = node.output[0]
    r = ctx.rank(y)
    if r is None:
        return ctx.fix_all()
    axis = _norm(int(_attr(node, "axis")), r)
    offset = 0
    for x in node.input:
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
    axis = _norm(int(_attr(node, "axis", 0)), r)
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
        starts, ends, axes, steps = _attr(node, "starts"), _attr(node, "ends"), _attr(node, "axes"), None
    else:
        names = list(node.input[1:5]) + [""] * (5 - len(node.input))
        starts, ends, axes, steps = [ctx.const(n) if n else None for n in names]
        if any(n and v is None for n, v in zip(names, (starts, ends, axes, steps))):
            return _slice_live(ctx, x, y, names, r)
    starts, ends = [int(v) for v in np.ravel(starts)], [int(v) for v in np.ravel(ends)]
    axes = list(range(len(starts))) if axes is None else [_norm(int(a), r) for a in np.ravel(axes)]
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
    sliced = {_norm(int(a), r) for a in np.ravel(axes)}
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
    axis = _norm(int(_attr(node, "axis", 0)), r)
    idx = ctx.const(idx_name)
    ir = ctx.rank(idx_name)
    for d in range(r):
        if d < axis:
            ctx.tie((data, d), (y, d))
        elif d > axis:
            ctx.tie((data, d), (y, d + ir - 1))
    if idx is None:  # embedding lookup: the table's rows are fixed, its columns flow on
        ctx.fix((data, axis))
        for d in range(ir):
            ctx.tie((idx_name, d), (y, axis + d))
        return
    n = ctx.size((data, axis))
    flat = np.where(np.ravel(idx) < 0, np.ravel(idx) + n, np.ravel(idx)).astype(np.int64)
    if ir == 0:
        ctx.fix((data, axis), positions=flat)
    elif ir == 1:
        ctx.tie_map((y, axis), (data, axis), flat)
    else:
        return ctx.fix_all()
    ctx.rewrite("gather", axis=axis)


def rule_squeeze(ctx):
    """Squeeze/Unsqueeze/Flatten: match dims by products; size-1 dims carry nothing."""
    node = ctx.node
    x, y = node.input[0], node.output[0]
    xs, ys = ctx.shape(x), ctx.shape(y)
    if xs is None or ys is None:
        return ctx.fix_all()
    blocks = match_dims(xs, ys)
    if blocks is None:
        return ctx.fix_all()
    _tie_blocks(ctx, x, y, blocks)


def _tie_blocks(ctx, x, y, blocks, wide=None):
    """Tie, or declare as products, the dims of each block; a block that regroups several dims on
    both sides (``[N, 12*64] -> [N*12, 64]``, heads merged with a batch) goes through the common
    factors of both sides (``refine``), found at the ``wide`` shapes and sized at the probe's."""
    for xd, yd in blocks:
        if len(xd) == 1 and len(yd) == 1:
            ctx.tie((x, xd[0]), (y, yd[0]))
        elif len(xd) == 1:
            ctx.product((x, xd[0]), [(y, d) for d in yd])
        elif len(yd) == 1:
            ctx.product((y, yd[0]), [(x, d) for d in xd])
        elif not _tie_factors(ctx, x, y, xd, yd, wide):
            for d in xd:
                ctx.fix((x, d))
            for d in yd:
                ctx.fix((y, d))


def refine(xs, ys):
    """The finest common row-major factorisation of two dim lists with equal products: (factor
    sizes, factor indices of each x dim, of each y dim), or None where one side's remaining size
    never divides the other's ([6, 4] vs [4, 6])."""
    factors, fx, fy = [], [[] for _ in xs], [[] for _ in ys]
    i = j = 0
    rx, ry = (xs[0] if xs else 1), (ys[0] if ys else 1)
    while i < len(xs) and j < len(ys):
        f = min(rx, ry)
        if f <= 0 or rx % f or ry % f:
            return None
        fx[i].append(len(factors))
        fy[j].append(len(factors))
        factors.append(f)
        rx, ry = rx // f, ry // f
        if rx == 1:
            i += 1
            rx = xs[i] if i < len(xs) else 1
        if ry == 1:
            j += 1
            ry = ys[j] if j < len(ys) else 1
    if i != len(xs) or j != len(ys):
        return None
    return factors, fx, fy


def _tie_factors(ctx, x, y, xd, yd, wide):
    if wide is None:
        return False
    got = refine([wide[0][d] for d in xd], [wide[1][d] for d in yd])
    if got is None:
        return False
    factors, fx, fy = got
    # the factors' sizes at the probe's shapes: solve dim = product of its factors, one unknown at a time
    dims = [(ctx.shape(x)[d], f) for d, f in zip(xd, fx)] + [(ctx.shape(y)[d], f) for d, f in zip(yd, fy)]
    size = {}
    for _ in range(len(factors) + 1):
        for n, fs in dims:
            unknown = [f for f in fs if f not in size]
            if len(unknown) == 1:
                rest = int(np.prod([size[f] for f in fs if f in size]))
                if rest <= 0 or n % rest:
                    return False
                size[unknown[0]] = n // rest
    if len(size) != len(factors) or any(int(np.prod([size[f] for f in fs])) != n for n, fs in dims):
        return False
    axes = [ctx.virtual(f"factor{k}", size[k]) for k in range(len(factors))]
    for (name, d), fs in [((x, d), f) for d, f in zip(xd, fx)] + [((y, d), f) for d, f in zip(yd, fy)]:
        if len(fs) == 1:
            ctx.tie((name, d), axes[fs[0]])
        else:
            ctx.product((name, d), [axes[f] for f in fs])
    return True


def _widest(ctx, x, y):
    """The (x shape, y shape) of the run with the fewest size-1 dims (a batch of 1 at the probe
    sizes would hide which dims pair up)."""
    runs = [(ctx.shape(x), ctx.shape(y))] + ctx.other_shapes(x, y)
    return max(runs, key=lambda r: sum(n != 1 for n in r[0]) + sum(n != 1 for n in r[1]))


def rule_reshape(ctx):
    """Reshape: dims matched by products (heads x head dims, flatten before a Linear).  Surgery
    rebuilds the target (``surgery.rw_reshape``) from one piece per output dim: static dims get
    their new sizes; a dynamic dim is the product of its block's input sizes at run time over the
    block's new static sizes, or, where a block splits into several dynamic dims (GPT-2's
    ``[b*s, 3h] -> [b, s, 3h]``), the original target's element, whose reads are then fixed.
    So no dynamic size is ever frozen."""
    node = ctx.node
    x, y, target = node.input[0], node.output[0], node.input[1]
    if ctx.shape(x) is None or ctx.shape(y) is None:
        return ctx.fix_all()
    wx, wy = _widest(ctx, x, y)
    blocks = match_dims(wx, wy)
    if blocks is None:
        return ctx.fix_all()
    dyn = ctx.dynamic(y)
    dyn = [True] * len(wy) if dyn is None else list(dyn)
    reads, value = ctx.reads(target), ctx.value(target)
    ys = ctx.shape(y)

    def from_target(d):
        """The original target's element d, where it is a real size computed from sizes."""
        if reads is None or len(reads) != len(ys) or value is None or np.size(value) != len(ys):
            return None
        if int(np.ravel(value)[d]) != ys[d]:
            return None
        for axis in reads[d]:
            ctx.fix(axis)
        return ("target", d)

    pieces = [("static", d) for d in range(len(wy))]
    for xd, yd in blocks:
        dyn_d = [d for d in yd if dyn[d]]
        for d in dyn_d:
            pieces[d] = ("x", list(xd), [s for s in yd if not dyn[s]]) if len(dyn_d) == 1 else from_target(d)
    paired = {d for _, yd in blocks for d in yd}
    for d in range(len(wy)):
        if dyn[d] and d not in paired:  # size 1 in every run: only the original target knows it
            pieces[d] = from_target(d)
    if None in pieces:
        return ctx.fix_all()
    _tie_blocks(ctx, x, y, blocks, (wx, wy))
    ctx.rewrite("reshape", pieces=pieces)


def match_dims(xs, ys):
    """Pair up runs of non-1 dims whose products agree: [(x dims, y dims), ...] or None."""
    xi = [i for i, s in enumerate(xs) if s != 1]
    yi = [i for i, s in enumerate(ys) if s != 1]
    blocks, i, j = [], 0, 0
    while i < len(xi) and j < len(yi):
        bx, by = [xi[i]], [yi[j]]
        px, py = xs[xi[i]], ys[yi[j]]
        i, j = i + 1, j + 1
        while px != py:
            if px < py:
                if i >= len(xi):
                    return None
                px *= xs[xi[i]]
                bx.append(xi[i])
                i += 1
            else:
                if j >= len(yi):
                    return None
                py *= ys[yi[j]]
                by.append(yi[j])
                j += 1
        blocks.append((bx, by))
    if i != len(xi) or j != len(yi):
        return None
    return blocks


def rule_expand(ctx):
    """Expand: dims that x carries at every size are tied (surgery puts 1 there, so x's size
    flows); broadcast dims (x has 1) are free channels of y (GQA's repeated KV axis) whose new size
    surgery writes, or, where they follow a dynamic dim, reads from the original target at run time
    (only the sizes that element reads are fixed)."""
    node = ctx.node
    x, y, target = node.input[0], node.output[0], node.input[1]
    rx, ry = ctx.rank(x), ctx.rank(y)
    if rx is None or ry is None:
        return ctx.fix_all()
    runs = [(ctx.shape(x), ctx.shape(y))] + ctx.other_shapes(x, y)
    dyn = ctx.dynamic(y)
    dyn = [True] * ry if dyn is None else list(dyn)
    kinds = []
    reads = ctx.reads(target)
    for d in range(ry):
        xd = d - (ry - rx)
        if xd >= 0 and all(sx[xd] == sy[d] for sx, sy in runs):
            ctx.tie((x, xd), (y, d))
            kinds.append("x")
        elif xd < 0 or all(sx[xd] == 1 for sx, _ in runs):
            kinds.append("dyn" if dyn[d] else "static")
            if dyn[d] and reads is not None:
                ti = len(reads) - ry + d if len(reads) > 1 else 0
                for axis in (reads[ti] if 0 <= ti < len(reads) else reads[0]):
                    ctx.fix(axis)
        else:
            return ctx.fix_all()
    if "dyn" in kinds and reads is None:
        return ctx.fix_all()        # a dynamic size from a target that is not a shape computation
    ctx.rewrite("expand", kinds=kinds)


def rule_shape(ctx):
    """Shape/Size read sizes only: the channel model fixes the dims whose sizes are read by
    something surgery does not rebuild (``Builder.fix_shape_reads``)."""
    ctx.fix_tensor(ctx.node.output[0])


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
    "Slice": rule_slice, "Gather": rule_gather,
    "Reshape": rule_reshape, "Flatten": rule_squeeze, "Squeeze": rule_squeeze, "Unsqueeze": rule_squeeze,
    "Expand": rule_expand, "Shape": rule_shape, "Size": rule_shape,
})

#: operators whose rule exists; everything else blocks the axes it touches.
SUPPORTED = sorted(RULES)
