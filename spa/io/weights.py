"""Weights kept out of the model proto: a big model costs its size once, on disk.

A model spa loads from a file is a proto whose big initializers are *stubs* (dims and data type, no
data; ``data_location`` EXTERNAL with the location :data:`STUB`) and a dict ``weights`` of name ->
numpy array.  The arrays are read-only views of a memory map of the file (the tensor's bytes inside
the .onnx file, found by walking the protobuf wire format, or in its external data file): nothing is
read until a stage touches it, and the pages a stage read can be handed back (:func:`release_pages`)
so that the next stage does not pay for them again.  Stages that make new weights (surgery,
OBSPA's compensation) put new arrays in a new dict and keep stubs in the proto; the writer streams
each array to the file (``spa.io.save_model``), and :func:`full_model` fills a complete proto for
callers who want one.

Why not parse the file into a proto: protobuf copies every byte it parses into its own arena (which
is not freed until the whole message is), numpy then copies them again, and the writer serialises
them a third time; a 1.2 GB model cost 3-4 GB.
"""
from __future__ import annotations

import contextlib
import mmap
import tempfile
import threading

import numpy as np
import onnx

from ..errors import SpaError

try:
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - onnx depends on ml_dtypes
    BFLOAT16 = None

#: the external_data location of a stub: its data is an array in the model's weights
STUB = "spa:weights"
#: initializers with more elements than this become stubs (smaller ones stay in the proto: shapes,
#: axes and scalars that the rules read)
STUB_ABOVE = 1024

_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number          # 9
_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number                   # 7
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number       # 5
_LEN = 2  # wire type of length-delimited fields


def numpy_dtype(data_type: int):
    """The numpy dtype of an ONNX tensor data type (bfloat16: ml_dtypes', which onnx depends on),
    or None (strings, 4-bit and 8-bit floats)."""
    if data_type == onnx.TensorProto.BFLOAT16:
        return BFLOAT16
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except Exception:
        return None
    if dt.kind not in "biuf" or data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return None
    return dt


def is_float(dtype) -> bool:
    """A floating-point dtype, bfloat16 included (numpy does not count ml_dtypes' as floating)."""
    return dtype is not None and (np.issubdtype(dtype, np.floating) or np.dtype(dtype) == BFLOAT16)


def is_stub(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == STUB for e in t.external_data)


def make_stub(t: onnx.TensorProto, shape=None) -> onnx.TensorProto:
    """Turn ``t`` into a stub in place (its data goes; ``shape``: new dims)."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "string_data"):
        t.ClearField(field)
    if shape is not None:
        del t.dims[:]
        t.dims.extend(int(d) for d in shape)
    del t.external_data[:]
    t.external_data.add(key="location", value=STUB)
    t.data_location = onnx.TensorProto.EXTERNAL
    return t


def stub_like(t: onnx.TensorProto, shape) -> onnx.TensorProto:
    """A new stub with ``t``'s name and data type and the given dims."""
    s = onnx.TensorProto(name=t.name, data_type=t.data_type)
    return make_stub(s, shape)


def header(t: onnx.TensorProto) -> onnx.TensorProto:
    """A stub's fields for writing it with its data: no external data, default location."""
    h = onnx.TensorProto()
    h.CopyFrom(t)
    del h.external_data[:]
    h.ClearField("data_location")
    return h


def filled(t: onnx.TensorProto, weights) -> onnx.TensorProto:
    """``t`` with its data: a stub filled from ``weights``, anything else as it is."""
    if not is_stub(t):
        return t
    out = header(t)
    out.raw_data = np.ascontiguousarray(array_of(t, weights)).tobytes()
    return out


def array_of(t: onnx.TensorProto, weights) -> np.ndarray:
    """A stub's array, checked against its dims and data type."""
    a = weights.get(t.name) if weights is not None else None
    if a is None:
        raise SpaError(f"internal: tensor '{t.name}' is held outside the model and its weights were not given")
    dt = numpy_dtype(t.data_type)
    if tuple(a.shape) != tuple(t.dims) or (dt is not None and a.dtype != dt):
        raise SpaError(f"internal: tensor '{t.name}' is {list(t.dims)} in the model but its array is "
                       f"{list(a.shape)} {a.dtype}")
    return a


def has_stubs(proto) -> bool:
    return any(is_stub(t) for t in proto.graph.initializer)


def full_model(proto, weights) -> onnx.ModelProto:
    """A complete copy of ``proto``: every stub filled from ``weights`` (costs the model's size)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        if is_stub(t):
            t.CopyFrom(filled(t, weights))
    return out


#: bytes: stages give back the memory-mapped pages of each weight bigger than this once they are
#: done with it (smaller ones are not worth a system call)
RELEASE_ABOVE = 1 << 20


def _mapped_ranges(arrays) -> list:
    """``(memory map, first byte, end)`` of the pages behind each of ``arrays`` that views a memory
    map, ranges that touch merged (a model's weights lie end to end in its file: one range or a few)."""
    ranges = {}
    for a in arrays:
        base = a
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        if not isinstance(base, mmap.mmap) or not isinstance(a, np.ndarray) or a.nbytes == 0:
            continue
        try:
            start = a.ctypes.data - np.frombuffer(base, np.uint8, 1).ctypes.data
        except ValueError:  # a closed map
            continue
        ranges.setdefault(id(base), (base, []))[1].append((start - start % mmap.PAGESIZE,
                                                          min(len(base), start + a.nbytes)))
    merged = []
    for base, spans in ranges.values():
        spans.sort()
        lo, hi = spans[0]
        for s, e in spans[1:]:
            if s > hi + mmap.PAGESIZE:
                merged.append((base, lo, hi))
                lo = s
            hi = max(hi, e)
        merged.append((base, lo, hi))
    return merged


def _hand_back(ranges) -> None:
    for base, lo, hi in ranges:
        try:
            base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (AttributeError, OSError, ValueError):
            pass


def release_pages(arrays) -> None:
    """Hand back the pages of the memory maps behind ``arrays`` (each array's own range) that this
    process has read; they stay in the page cache and come back on the next read.  A stage that
    read all the weights does not leave them counted against the next one.  Arrays that are not
    views of a memory map are left alone."""
    _hand_back(_mapped_ranges(arrays))


#: seconds between two hand-backs of the weights' pages while onnxruntime reads them
SWEEP_SECONDS = 0.01


@contextlib.contextmanager
def pages_handed_back(arrays, every: float = SWEEP_SECONDS):
    """Hand back the pages of ``arrays`` (see :func:`release_pages`) every ``every`` seconds while
    the block runs, and once at its end.  A run of the whole model (onnxruntime reading weights
    fed from the memory map) then holds the pages of the last interval's operators, not every
    page of the file: SmolLM2's 540 MB were all resident at the end of each run.  Pages read again
    come back from the page cache (a minor fault, not a disk read)."""
    ranges = _mapped_ranges(arrays)
    if not ranges:
        yield
        return
    stop = threading.Event()

    def sweep():
        while not stop.wait(every):
            _hand_back(ranges)

    sweeper = threading.Thread(target=sweep, name="spa-pages", daemon=True)
    sweeper.start()
    try:
        yield
    finally:
        stop.set()
        sweeper.join()
        _hand_back(ranges)


#: bytes: new weights of more than this in all (surgery's) are kept in a temporary file's memory map
#: (:func:`spilled`); below it a file is not worth its system calls
SPILL_ABOVE = 64 << 20
#: byte alignment of each array in the temporary file
SPILL_ALIGN = 64


def spilled(arrays: dict, directory=None) -> dict:
    """``arrays`` with the big ones that are not views of a memory map already (the slices and
    compensated weights surgery makes) written end to end to an unlinked temporary file (in
    ``directory``, by default ``tempfile``'s: ``TMPDIR``) and replaced by read-only views of its
    memory map, when they pass ``SPILL_ABOVE`` in all.  As arrays they stayed resident through
    validation, the guard and the write (SmolLM2 at 10%: 290 MB); as a map they cost the page cache,
    and a run hands their pages back (:func:`pages_handed_back`) as it does the original's.  The
    file goes when the last view does.  Without room on disk they stay as they are."""
    big = {k: v for k, v in arrays.items()
           if isinstance(v, np.ndarray) and v.nbytes > RELEASE_ABOVE and not _mapped_ranges([v])}
    if sum(v.nbytes for v in big.values()) <= SPILL_ABOVE:
        return arrays
    offsets, end = {}, 0
    for k, v in big.items():
        offsets[k] = end
        end += -(-v.nbytes // SPILL_ALIGN) * SPILL_ALIGN
    try:
        with tempfile.TemporaryFile(dir=directory, prefix="spa-weights-") as f:
            for k, v in big.items():
                f.seek(offsets[k])
                f.write(np.ascontiguousarray(v).reshape(-1).view(np.uint8).data)
            f.truncate(end)
            f.flush()
            mm = mmap.mmap(f.fileno(), end, access=mmap.ACCESS_READ)
    except OSError:
        return arrays
    out = dict(arrays)
    for k, v in big.items():
        out[k] = np.frombuffer(mm, dtype=v.dtype, count=v.size, offset=offsets[k]).reshape(v.shape)
    return out


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``).  Freed buffers below
    malloc's mmap threshold (which rises to the largest block freed so far, up to 32 MB: a Hessian,
    a weight) stay in its heaps otherwise, counted, and a later large allocation (a run's logits) is
    mapped fresh beside them; the same for onnxruntime's buffers without an arena."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------
# reading a model file without copying its weights


def _varint(buf, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf, start: int, end: int):
    """(number, wire type, field start, value start, field end) of each field in ``buf[start:end]``."""
    i = start
    while i < end:
        fs = i
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        vs = i
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == _LEN:
            n, vs = _varint(buf, i)
            i = vs + n
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > end:
            raise ValueError("field runs past its message")
        yield number, wire, fs, vs, i


def parse_with_stubs(mm) -> tuple[onnx.ModelProto, dict]:
    """Parse a model file held in ``mm`` (a memory map) into a proto whose big raw-data
    initializers are stubs, and ``{name: read-only array view of mm}`` for them.  Only the bytes of
    everything else are copied."""
    model_rest, graph, inits = bytearray(), None, []
    for number, wire, fs, vs, fe in _fields(mm, 0, len(mm)):
        if number == _GRAPH and wire == _LEN and graph is None:
            graph = (vs, fe)
        else:
            model_rest += mm[fs:fe]
    proto = onnx.ModelProto()
    proto.ParseFromString(bytes(model_rest))
    if graph is None:
        return proto, {}
    graph_rest = bytearray()
    for number, wire, fs, vs, fe in _fields(mm, *graph):
        if number == _INITIALIZER and wire == _LEN:
            inits.append((vs, fe))
        else:
            graph_rest += mm[fs:fe]
    proto.graph.ParseFromString(bytes(graph_rest))
    weights = {}
    for vs, fe in inits:
        raw, rest = None, bytearray()
        for number, wire, f_s, v_s, f_e in _fields(mm, vs, fe):
            if number == _RAW_DATA and wire == _LEN and raw is None:
                raw = (v_s, f_e)
            else:
                rest += mm[f_s:f_e]
        t = proto.graph.initializer.add()
        t.ParseFromString(bytes(rest))
        dt = numpy_dtype(t.data_type)
        count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        if raw is not None and dt is not None and count > STUB_ABOVE and raw[1] - raw[0] == count * dt.itemsize:
            weights[t.name] = np.frombuffer(mm, dt, count, raw[0]).reshape(tuple(t.dims))
            make_stub(t)
        elif raw is not None:
            t.raw_data = mm[raw[0]:raw[1]]
    return proto, weights


def stub_external(t: onnx.TensorProto, mm, offset: int, length: int) -> np.ndarray | None:
    """A tensor stored as external data in ``mm`` at ``offset``: a stub and its array view (big
    tensors), or its data copied into the proto (small ones; returns None)."""
    dt = numpy_dtype(t.data_type)
    count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    if dt is None:
        raise SpaError(f"tensor '{t.name}': external data of type {t.data_type} is not supported")
    if length < 0:
        length = count * dt.itemsize
    if length != count * dt.itemsize:
        raise SpaError(f"tensor '{t.name}': its external data has {length} bytes, its dims need "
                       f"{count * dt.itemsize}; the model file is damaged")
    if count > STUB_ABOVE:
        make_stub(t)
        return np.frombuffer(mm, dt, count, offset).reshape(tuple(t.dims))
    del t.external_data[:]
    t.ClearField("data_location")
    t.raw_data = mm[offset:offset + length]
    return None


def put(proto, weights, name: str, value: np.ndarray, tensor: onnx.TensorProto | None = None) -> None:
    """Set initializer ``name`` of ``proto`` to ``value`` (appended, or replacing ``tensor``): a stub
    with the array in ``weights`` when it is big, the data in the proto when it is small."""
    value = np.asarray(value)
    if weights is not None and value.size > STUB_ABOVE and numpy_dtype(
            onnx.helper.np_dtype_to_tensor_dtype(value.dtype)) is not None:
        new = make_stub(onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(value.dtype)),
                        value.shape)
    else:
        new = onnx.numpy_helper.from_array(value, name)
    if weights is not None:
        weights[name] = value
    if tensor is None:
        proto.graph.initializer.append(new)
    else:
        tensor.CopyFrom(new)
