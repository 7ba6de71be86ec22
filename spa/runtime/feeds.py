"""Values for graph inputs: the one place that knows which ONNX types spa can feed and how.

Every feed spa makes (the probe and its other sizes, validation, ``--calib random``, the synthetic
inputs, ``spa check`` and ``spa bench``) draws its random values here (:func:`random_value`) and
hands them to onnxruntime through :func:`for_ort`.  Every numeric tensor type is fed in its own
dtype: int8/16/32/64, uint8/16/32/64, bool, float16, bfloat16, float and double (an int16 input fed
as float32 was refused by onnxruntime: "Unexpected input data type").  Other inputs (strings,
complex, 8- and 4-bit floats and ints, optional, sequence and map inputs) cannot be made up: a model
with one is refused by :func:`check_feedable` in one line that says what to do.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import SpaError
from ..io import ONNX_TO_NUMPY, graph_inputs
from ..io.weights import BFLOAT16, is_float

#: what a model with an input spa cannot feed is told (``cut_out`` names the tensors)
CUT_OUT = ("spa runs the model to learn its shapes and makes up values only for numeric tensor inputs "
           "(int8...int64, uint8...uint64, bool, float16, bfloat16, float, double)")


def numpy_dtype(elem_type):
    """The numpy dtype of an ONNX tensor element type spa can feed, or None."""
    return ONNX_TO_NUMPY.get(elem_type)


def _type_name(vi) -> str:
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"optional_type": "an optional", "sequence_type": "a sequence", "map_type": "a map",
                "sparse_tensor_type": "a sparse tensor"}.get(kind, f"a {kind or 'typeless'}") + " input"
    try:
        return f"a {onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()} tensor"
    except ValueError:
        return f"a tensor of element type {vi.type.tensor_type.elem_type}"


def unfeedable(vi) -> str | None:
    """Why spa cannot make values for graph input ``vi`` (a ValueInfoProto), or None."""
    if vi.type.WhichOneof("value") == "tensor_type" and numpy_dtype(vi.type.tensor_type.elem_type) is not None:
        return None
    return _type_name(vi)


def check_feedable(proto, given=()) -> None:
    """A one-line :class:`SpaError` for the first graph input spa cannot make values for (and that
    ``given`` does not name), saying how to cut the numeric part out (``cut_out``)."""
    for vi in graph_inputs(proto):
        why = unfeedable(vi)
        if why and vi.name not in given:
            raise SpaError(f"input '{vi.name}' is {why}: {CUT_OUT}; {cut_out(proto, vi.name)}")


def cut_out(proto, name) -> str:
    """What to do about input ``name`` that spa cannot feed: the ``onnx.utils.extract_model`` call
    that cuts out the numeric part, whose inputs are the first numeric tensors computed from
    ``name`` (and the other inputs) and whose outputs are the numeric graph outputs."""
    typed = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
            typed[vi.name] = vi
    except Exception:   # noqa: BLE001 - a model shape inference cannot type: no names to offer
        pass
    bad = {vi.name for vi in graph_inputs(proto) if unfeedable(vi)}
    frontier, queue, seen = [], list(bad), set(bad)
    while queue:
        t = queue.pop()
        for node in proto.graph.node:
            if t not in node.input:
                continue
            for out in node.output:
                if not out or out in seen:
                    continue
                seen.add(out)
                vi = typed.get(out)
                if vi is not None and not unfeedable(vi):
                    frontier.append(out)
                else:
                    queue.append(out)
    inputs = [vi.name for vi in graph_inputs(proto) if vi.name not in bad] + frontier
    outputs = [o.name for o in proto.graph.output if not unfeedable(o)]
    call = f"onnx.utils.extract_model(MODEL, 'part.onnx', {inputs}, {outputs})"
    if not outputs:
        return "the model has no numeric output: nothing for spa to prune"
    if not frontier:
        return f"'{name}' feeds no numeric tensor: cut it off with {call} and prune part.onnx"
    return (f"prune the numeric part: {call} cuts it out ({', '.join(repr(f) for f in frontier)}, computed from "
            f"'{name}', become inputs); prune part.onnx and compute those before it in your pipeline")


def random_value(rng, shape, dtype, int_range=None) -> np.ndarray:
    """Random values of ``shape`` in ``dtype``: floats (bfloat16 too) standard normal, bools fair coin
    flips, integers uniform over ``int_range`` ([lo, hi), default [0, 4)) clipped to what the dtype holds."""
    dtype = np.dtype(dtype)
    if is_float(dtype):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = int_range or (0, 4)
        lo, hi = max(int(lo), int(info.min)), min(int(hi), int(info.max) + 1, 2 ** 63 - 1)
        return rng.integers(lo, max(hi, lo + 1), shape).astype(dtype)
    raise SpaError(f"spa cannot make random values of type {dtype}: {CUT_OUT}")


def for_ort(feed: dict) -> dict:
    """``feed`` as onnxruntime's Python API takes it: a bfloat16 array (which it cannot convert from
    numpy) becomes an OrtValue of ONNX type bfloat16; everything else is passed as it is."""
    if BFLOAT16 is None or not any(getattr(v, "dtype", None) == BFLOAT16 for v in feed.values()):
        return feed
    import onnxruntime as ort
    return {k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(v).view(np.uint16),
                                                                onnx.TensorProto.BFLOAT16)
            if getattr(v, "dtype", None) == BFLOAT16 else v for k, v in feed.items()}
