"""Plain operations on a loaded ModelProto: normalisation, tensors as numpy, serialisation.

Everything later in the pipeline works on a *normalised* model: weights held in `Constant` nodes
(PaddlePaddle exports) become initializers, initializers listed as graph inputs are weights, not
inputs, and every node has a name of its own.  Running models (the probe, constant folding) lives in ``spa.runtime.probing``.

``skeleton`` serialises a graph whose big initializers are typed inputs (no weight bytes) for
onnx.checker and for probe sessions fed from numpy.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from . import weights as weights_mod
from ..errors import SpaError

#: ONNX Runtime 1.2x reads IR versions up to this.
MAX_IR_VERSION = 10

#: every numeric ONNX element type spa reads and feeds, as numpy dtypes (``spa.runtime.feeds``)
ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT16: np.int16, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
    **({onnx.TensorProto.BFLOAT16: weights_mod.BFLOAT16} if weights_mod.BFLOAT16 is not None else {}),
}


def constants_to_initializers(proto: onnx.ModelProto) -> int:
    """Move main-graph ``Constant`` nodes into initializers (Paddle keeps weights there)."""
    keep, moved = [], 0
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            value = _constant_value(attr)
            if value is not None:
                proto.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                moved += 1
                continue
        keep.append(node)
    if moved:
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
    return moved


def name_nodes(proto: onnx.ModelProto) -> int:
    """Give every main-graph node without a name, or with a name an earlier node took, a name of its
    own (``{op}__{first output}``, made unique): spa finds nodes by name (the channel model's sinks,
    the masks of the fidelity search and the oracle, surgery), and onnxruntime refuses a graph
    where two nodes share one, as the masked copy of a graph of unnamed nodes did (issue 19:
    ``--target fidelity=C`` failing with "two nodes with same node name").  Returns how many were named."""
    taken = {n.name for n in proto.graph.node if n.name}
    seen, renamed = set(), 0
    for node in proto.graph.node:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.op_type}__{next((o for o in node.output if o), 'out')}"
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        taken.add(name)
        seen.add(name)
        renamed += 1
    return renamed


def _constant_value(attr):
    if attr.name == "value":
        return tensor_array(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), np.int64)
    return None


def drop_initializer_inputs(proto: onnx.ModelProto) -> None:
    """Old exporters list initializers among graph inputs; they are weights, not inputs."""
    inits = {t.name for t in proto.graph.initializer}
    real = [i for i in proto.graph.input if i.name not in inits]
    if len(real) != len(proto.graph.input):
        del proto.graph.input[:]
        proto.graph.input.extend(real)


def graph_inputs(proto):
    inits = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def serialize(proto) -> bytes:
    if proto.ir_version > MAX_IR_VERSION:
        proto = _with_ir(proto, MAX_IR_VERSION)
    return proto.SerializeToString()


def _with_ir(proto, ir):
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy.ir_version = ir
    return copy


def initializer_arrays(proto, weights=None) -> dict:
    """Every initializer as a numpy array (stubs: their array in ``weights``): one copy of the
    weights, shared by the probe sessions (fed in place) and the channel model."""
    return {t.name: weights_mod.array_of(t, weights) if weights_mod.is_stub(t) else tensor_array(t)
            for t in proto.graph.initializer}


def tensor_array(t) -> np.ndarray:
    """A TensorProto as numpy, or a one-line SpaError for a damaged one (data shorter or longer
    than its dims, an unknown data type)."""
    try:
        return numpy_helper.to_array(t)
    except Exception as exc:
        raise SpaError(f"tensor '{t.name}' (dims {list(t.dims)}, data type {t.data_type}) cannot be read: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}; "
                       "the model file is damaged") from None


#: initializers with more elements than this are graph inputs of a probe session, fed from numpy
FEED_LIMIT = 1024

def _repeated(fd) -> bool:
    rep = getattr(fd, "is_repeated", None)
    return bool(rep) if rep is not None else fd.label == fd.LABEL_REPEATED


def copy_fields(src, dst, skip=()):
    for fd, value in src.ListFields():
        if fd.name not in skip:
            copy_field(fd, value, dst)


def copy_field(fd, value, dst):
    if _repeated(fd):
        getattr(dst, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(dst, fd.name).CopyFrom(value)
    else:
        setattr(dst, fd.name, value)


def skeleton(proto, fed, outputs, *, for_ort=True, weights=None) -> bytes:
    """Serialised copy of ``proto`` in which the ``fed`` initializers are typed graph inputs (their
    data is not copied) and ``outputs`` are graph outputs too; value_info is left out.  Stubs that
    are not fed are filled from ``weights``."""
    m = onnx.ModelProto()
    copy_fields(proto, m, skip=("graph",))
    if for_ort and m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
    g = m.graph
    copy_fields(proto.graph, g, skip=("initializer", "value_info", "input", "output"))
    g.input.extend(proto.graph.input)
    for t in proto.graph.initializer:
        if t.name in fed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(weights_mod.filled(t, weights))
    g.output.extend(proto.graph.output)
    have = {o.name for o in proto.graph.output}
    for name in outputs:
        if name not in have:
            g.output.add(name=name)
            have.add(name)
    return m.SerializeToString()


def check_model(proto) -> None:
    """``onnx.checker.check_model`` without copying the weights: big initializers are checked as
    typed graph inputs (their data sizes are checked when a probe reads them).  Raises
    ``onnx.checker.ValidationError`` like the checker."""
    outs = {o.name for o in proto.graph.output}
    fed = {t.name for t in proto.graph.initializer
           if t.name not in outs and (weights_mod.is_stub(t) or int(np.prod(t.dims)) > FEED_LIMIT
                                      and t.data_location != onnx.TensorProto.EXTERNAL)}
    onnx.checker.check_model(skeleton(proto, fed, [], for_ort=False))


def remove_dead(proto) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    needed = {o.name for o in proto.graph.output}
    sub_refs = set()
    for node in proto.graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                sub_refs |= graph_refs(g)
    needed |= sub_refs
    live = []
    for node in reversed(proto.graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    live.reverse()
    if len(live) != len(proto.graph.node):
        del proto.graph.node[:]
        proto.graph.node.extend(live)
    # delete in place: rebuilding the list would copy every kept weight
    dead = [i for i, t in enumerate(proto.graph.initializer) if t.name not in needed]
    for i in reversed(dead):
        del proto.graph.initializer[i]


def graph_refs(g) -> set:
    refs = set()
    for n in g.node:
        refs.update(i for i in n.input if i)
        for a in n.attribute:
            for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                refs |= graph_refs(sg)
    refs.update(o.name for o in g.output)
    return refs
