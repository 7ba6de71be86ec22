"""Rules of the layout family: Reshape, Flatten, Squeeze, Unsqueeze, Expand, and Shape/Size.

Dims are matched by products (a flattened C*H*W, a hidden 768 split into 12 heads x 64 dims); a
Reshape or Expand target is rebuilt by surgery from one piece per output dim, so that a dim that
follows the input sizes (batch, sequence) is never frozen (see docs/shapes.md).
"""
from __future__ import annotations

import numpy as np

from ..runtime.shapes import all_reads

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


def _give_up(ctx, target):
    """No rebuild of this node's target: it stays as computed, so the sizes it reads must not
    change either (the channel model skips them for targets it expects surgery to rebuild)."""
    for axis in all_reads(ctx.reads(target)):
        ctx.fix(axis)
    return ctx.fix_all()


def rule_reshape(ctx):
    """Reshape: dims matched by products (heads x head dims, flatten before a Linear).  Surgery
    rebuilds the target (``spa.surgery.slicing.rw_reshape``) from one piece per output dim: static dims get
    their new sizes; a dynamic dim is the product of its block's input sizes at run time over the
    block's new static sizes, or, where a block splits into several dynamic dims (GPT-2's
    ``[b*s, 3h] -> [b, s, 3h]``), the original target's element, whose reads are then fixed.
    So no dynamic size is ever frozen."""
    node = ctx.node
    x, y, target = node.input[0], node.output[0], node.input[1]
    if ctx.shape(x) is None or ctx.shape(y) is None:
        return _give_up(ctx, target)
    wx, wy = _widest(ctx, x, y)
    blocks = match_dims(wx, wy)
    if blocks is None:
        return _give_up(ctx, target)
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
        return _give_up(ctx, target)
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
        return _give_up(ctx, target)
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
            return _give_up(ctx, target)
    if "dyn" in kinds and reads is None:
        return _give_up(ctx, target)  # a dynamic size from a target that is not a shape computation
    ctx.rewrite("expand", kinds=kinds)


def rule_shape(ctx):
    """Shape/Size read sizes only: the channel model fixes the dims whose sizes are read by
    something surgery does not rebuild (``Builder.fix_shape_reads``)."""
    ctx.fix_tensor(ctx.node.output[0])


def rule_depth_space(ctx):
    """DepthToSpace / SpaceToDepth (pixel shuffle): the deep side's channel axis is the product of
    the block offsets and the shallow side's channels, in the order ``mode`` gives (DCR: offsets
    first, ``(b1*b + b2)*C + c``; CRD: ``c*b*b + b1*b + b2``; SpaceToDepth writes DCR's order).
    The offsets are positions (fixed), so the shallow channels stay prunable: removing channel c
    removes its b*b deep channels."""
    node = ctx.node
    x, y = node.input[0], node.output[0]
    if ctx.rank(x) != 4 or ctx.rank(y) != 4:
        return ctx.fix_all()
    b = int(next((a.i for a in node.attribute if a.name == "blocksize"), 0))
    if b < 1:
        return ctx.fix_all()
    to_space = node.op_type == "DepthToSpace"
    deep, shallow = (x, y) if to_space else (y, x)
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    rows, cols = ctx.virtual("block_rows", b), ctx.virtual("block_cols", b)
    ctx.spatial(rows), ctx.spatial(cols)
    order = [(shallow, 1), rows, cols] if (to_space and mode == "CRD") else [rows, cols, (shallow, 1)]
    ctx.product((deep, 1), order)
    ctx.tie((x, 0), (y, 0))
    for d in (2, 3):
        ctx.spatial((x, d)), ctx.spatial((y, d))
