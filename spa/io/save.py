"""Writing model files: one initializer at a time, external data beside models over 2 GB.

Weights are big and copies of them are what a model costs: saving streams one initializer at a
time (``_stream_plan``: upb would serialise the whole model into a growing buffer and copy it),
stubs (``spa.io.weights``) straight from their arrays.  Every file goes through the safe writer
(``spa.io.writer``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from . import weights as weights_mod
from ..errors import SpaError
from .load import uses_external_data
from .proto import copy_field, copy_fields
from .writer import write_atomic, write_files

#: models larger than this (bytes) are written with external data (protobuf's limit is 2 GiB)
EXTERNAL_DATA_ABOVE = 2_000_000_000


def save_model(proto: onnx.ModelProto, path, *, inputs=(), weights=None) -> Path:
    """Write a model through the safe writer (``write_atomic``; ``inputs``: the run's input files,
    which it refuses to replace); external data, beside it and as safely, for models over 2 GB.
    ``weights`` holds the arrays of ``proto``'s stubs (``spa.io.weights``): they are streamed to the
    file one tensor at a time, never copied into a proto."""
    path = Path(path)
    if weights_mod.has_stubs(proto):
        return _save_stubbed(proto, path, inputs, weights)
    plan = None
    if not _no_external(proto):
        big = True
    else:
        plan = _stream_plan(proto)
        big = (plan[0] if plan is not None else proto.ByteSize()) > EXTERNAL_DATA_ABOVE
    if not big:
        return write_atomic(path, lambda tmp: onnx.save_model(proto, tmp) if plan is None
                            else _write_stream(proto, plan, tmp), inputs=inputs)
    data = path.with_name(path.name + ".data")
    # onnx moves the tensors' bytes out of the proto it saves this way: save a copy, the caller's
    # model keeps its weights; the data is renamed into place first, so the model never names data
    # that is not there
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    write_files([data, path], lambda folder: onnx.save_model(
        copy, os.path.join(folder, path.name), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data.name, size_threshold=1024), inputs=inputs)
    return path


def _save_stubbed(proto, path: Path, inputs, weights) -> Path:
    plan = _stream_plan(proto, weights)
    if plan is None:  # unknown fields: the plain way, with a filled copy
        return save_model(weights_mod.full_model(proto, weights), path, inputs=inputs)
    if plan[0] <= EXTERNAL_DATA_ABOVE:
        return write_atomic(path, lambda tmp: _write_stream(proto, plan, tmp, weights), inputs=inputs)
    data = path.with_name(path.name + ".data")
    write_files([data, path], lambda folder: _write_external(proto, weights, folder, path.name, data.name),
                 inputs=inputs)
    return path


#: offsets of tensors in an external data file spa writes (onnxruntime maps page-aligned tensors
#: from the file instead of copying them)
DATA_ALIGN = 4096


def _write_external(proto, weights, folder, name, data_name) -> None:
    """The model file and its one external data file: every stub and every initializer with more
    than 1 KB of raw data goes to the data file, page-aligned, streamed from its array."""
    m = onnx.ModelProto()
    copy_fields(proto, m, skip=("graph",))
    copy_fields(proto.graph, m.graph, skip=("initializer",))
    with open(os.path.join(folder, data_name), "wb") as f:
        for t in proto.graph.initializer:
            stub = weights_mod.is_stub(t)
            if not stub and len(t.raw_data) <= 1024:
                m.graph.initializer.append(t)
                continue
            offset = -f.tell() % DATA_ALIGN
            if offset:
                f.write(b"\0" * offset)
            start = f.tell()
            if stub:
                f.write(_raw_bytes(value := weights_mod.array_of(t, weights)))
                weights_mod.release_pages([value])
            else:
                f.write(t.raw_data)
            h = weights_mod.header(t) if stub else _without_data(t)
            h.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(start)), ("length", str(f.tell() - start))):
                h.external_data.add(key=key, value=value)
            m.graph.initializer.append(h)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(m.SerializeToString())


def _raw_bytes(a: np.ndarray):
    """The array's bytes, little-endian as ONNX stores them, without a copy when it is contiguous
    (viewed as bytes: a buffer of ml_dtypes' bfloat16 cannot be written as it is)."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.reshape(-1).view(np.uint8).data


def _without_data(t):
    h = onnx.TensorProto()
    h.CopyFrom(t)
    h.ClearField("raw_data")
    return h


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number            # 7
_INIT_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number       # 5
_RAW_TAG = _varint(onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number << 3 | 2)


def _split(msg, number, cls):
    """Two messages with the fields of ``msg`` numbered below / above ``number`` (that one left out)."""
    lo, hi = cls(), cls()
    for fd, value in msg.ListFields():
        if fd.number != number:
            copy_field(fd, value, lo if fd.number < number else hi)
    return lo, hi


def _stream_plan(proto, weights=None):
    """(total bytes, pieces) to write ``proto`` one initializer at a time (as ``SerializeToString``
    would, stubs with their data from ``weights``): upb serialises a whole model into a growing
    buffer and then copies it, three times the model in fresh memory (seconds for a ViT).  None
    when the model or its graph carries unknown fields (then the plain path keeps them)."""
    try:
        from google.protobuf import unknown_fields
        if len(unknown_fields.UnknownFieldSet(proto)) or len(unknown_fields.UnknownFieldSet(proto.graph)):
            return None
    except Exception:
        return None
    m_lo, m_hi = _split(proto, _GRAPH_FIELD, onnx.ModelProto)
    g_lo, g_hi = _split(proto.graph, _INIT_FIELD, onnx.GraphProto)
    m_lo, m_hi, g_lo, g_hi = (x.SerializeToString() for x in (m_lo, m_hi, g_lo, g_hi))
    sizes, stubs = [], []
    for t in proto.graph.initializer:
        if weights_mod.is_stub(t):
            head = weights_mod.header(t).SerializeToString()
            nbytes = weights_mod.array_of(t, weights).nbytes
            stubs.append((head, nbytes))
            sizes.append(len(head) + len(_RAW_TAG) + len(_varint(nbytes)) + nbytes)
        else:
            stubs.append(None)
            sizes.append(t.ByteSize())
    init_tag = _varint(_INIT_FIELD << 3 | 2)
    glen = len(g_lo) + len(g_hi) + sum(len(init_tag) + len(_varint(n)) + n for n in sizes)
    graph_head = _varint(_GRAPH_FIELD << 3 | 2) + _varint(glen) if proto.HasField("graph") else b""
    total = len(m_lo) + len(graph_head) + (glen if graph_head else 0) + len(m_hi)
    return total, (m_lo, graph_head, g_lo, sizes, stubs, init_tag, g_hi, m_hi)


def _write_stream(proto, plan, path, weights=None) -> None:
    _, (m_lo, graph_head, g_lo, sizes, stubs, init_tag, g_hi, m_hi) = plan
    with open(path, "wb") as f:
        f.write(m_lo)
        if graph_head:
            f.write(graph_head)
            f.write(g_lo)
            for t, n, stub in zip(proto.graph.initializer, sizes, stubs):
                f.write(init_tag + _varint(n))
                if stub is not None:  # the header's fields, then raw_data (fields may come in any order)
                    head, nbytes = stub
                    f.write(head)
                    f.write(_RAW_TAG + _varint(nbytes))
                    f.write(_raw_bytes(value := weights_mod.array_of(t, weights)))
                    weights_mod.release_pages([value])   # a pruned model's are read from a memory map too
                    continue
                data = t.SerializeToString()
                if len(data) != n:
                    raise SpaError(f"internal: initializer '{t.name}' changed while being written")
                f.write(data)
            f.write(g_hi)
        f.write(m_hi)


def _no_external(proto) -> bool:
    return not uses_external_data(proto)


def model_size(proto, weights=None) -> int:
    """Serialised size in bytes (stubs with their data), without serialising the model whole
    (``ByteSize`` does)."""
    plan = _stream_plan(proto, weights)
    return plan[0] if plan is not None else proto.ByteSize()
