"""Helpers shared by the operator rules (``spa.ops.rules``, ``spa.ops.layout``)."""
from __future__ import annotations

import onnx



def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def norm(axis, rank):
    return axis + rank if axis < 0 else axis


def broadcast(ctx, inputs, out):
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


def identity_dims(ctx, a, b):
    ra, rb = ctx.rank(a), ctx.rank(b)
    if ra is None or ra != rb:
        return ctx.fix_all()
    for d in range(ra):
        ctx.tie((a, d), (b, d))
