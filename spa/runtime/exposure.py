"""How many tensors one onnxruntime session may expose at once: the probe's memory bound.

A session keeps every output it exposes alive to the end of a run, so the probe, which wants the
shape of every tensor, exposes them a chunk per session where all at once would pass
``PROBE_BUDGET``.  Sizes come from ONNX shape inference at the feed's sizes.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..io import FEED_LIMIT, ONNX_TO_NUMPY, skeleton

#: the probe exposes at most this many bytes of tensors per onnxruntime session (more: several sessions)
PROBE_BUDGET = 256 << 20


def chunks(proto, feed, exposed, budget=None) -> list:
    """``exposed`` split into runs whose exposed tensors fit ``budget`` bytes (``PROBE_BUDGET``), from
    ONNX shape inference at the feed's sizes (a tensor of unknown size counts as the largest known
    one that the inputs reach: a weight's Transpose is no guide to the rotary tables and masks whose
    shapes inference loses, and counting SmolLM2's 113 MB tied head for each of its 13 such tensors
    cut a 167 MB probe into 8 sessions of 0.8 s each); one chunk when everything fits or nothing is
    known."""
    budget = PROBE_BUDGET if budget is None else budget
    sizes = estimated_bytes(proto, feed)
    known = [n for n in sizes.values() if n]
    if not known:
        return [exposed]
    reached = input_reached(proto)
    guess = max((n for name, n in sizes.items() if n and name in reached), default=max(known))
    cost = [sizes.get(name) or guess for name in exposed]
    if sum(cost) <= budget:
        return [exposed]
    outputs = [o.name for o in proto.graph.output]
    out, current, total = [], [], 0
    for name, c in zip(exposed, cost):
        if current and total + c > budget:
            out.append(outputs + [n for n in current if n not in outputs])
            current, total = [], 0
        current.append(name)
        total += c
    out.append(outputs + [n for n in current if n not in outputs])
    return out


def input_reached(proto) -> set:
    """The tensors computed from a graph input (the others come from weights and constants alone)."""
    reached = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:    # topological order; a subgraph's outer reads are not followed
        if any(i in reached for i in node.input):
            reached.update(o for o in node.output if o)
    return reached


def estimated_bytes(proto, feed) -> dict:
    """{tensor: bytes} from ONNX shape inference with the inputs at the feed's sizes (weights left
    out: big initializers are typed inputs); tensors whose shape it cannot tell are left out."""
    try:
        fed = {t.name for t in proto.graph.initializer if int(np.prod(t.dims)) > FEED_LIMIT}
        m = onnx.ModelProto()
        m.ParseFromString(skeleton(proto, fed, [], for_ort=False))
        for inp in m.graph.input:
            if inp.name in feed:
                dims = inp.type.tensor_type.shape.dim
                del dims[:]
                for n in np.shape(feed[inp.name]):
                    dims.add().dim_value = int(n)
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    out = {}
    for vi in list(m.graph.value_info) + list(m.graph.output):
        tt = vi.type.tensor_type
        dtype = ONNX_TO_NUMPY.get(tt.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if dtype is not None and tt.HasField("shape") and all(d >= 0 for d in dims):
            out[vi.name] = int(np.prod(dims, dtype=np.float64)) * np.dtype(dtype).itemsize
    return out
