"""Loading and saving models, and the plain graph operations around them.

Everything later in the pipeline works on a *normalised* model: weights held in `Constant` nodes
(PaddlePaddle exports) become initializers and initializers listed as graph inputs are weights, not
inputs.  Running models (the probe, constant folding) lives in ``spa.probing``.

Weights are big and copies of them are what a model costs: the file is parsed from a memory map,
saving streams one initializer at a time, and ``skeleton`` serialises a graph whose big
initializers are typed inputs (no weight bytes) for onnx.checker and for probe sessions fed from
numpy.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import weights as weights_mod
from .errors import SpaError

#: models larger than this (bytes) are written with external data (protobuf's limit is 2 GiB)
EXTERNAL_DATA_ABOVE = 2_000_000_000
#: ONNX Runtime 1.2x reads IR versions up to this.
MAX_IR_VERSION = 10

ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
    **({onnx.TensorProto.BFLOAT16: weights_mod.BFLOAT16} if weights_mod.BFLOAT16 is not None else {}),
}


def load_model(model, *, load_weights: bool = True) -> onnx.ModelProto:
    """Read a path or take a ModelProto (copied, never changed in place); one-line errors."""
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        return proto
    path = _checked_path(Path(model))
    try:
        proto = _parse(path)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise SpaError(f"{path}: not an ONNX model ({type(exc).__name__}); "
                       "export it with torch.onnx.export, tf2onnx or paddle2onnx first") from None
    if not proto.graph.node and not proto.graph.initializer:
        raise SpaError(f"{path}: not an ONNX model (empty graph)")
    if load_weights and _uses_external_data(proto):
        for tensor in _external_tensors(proto):
            _check_external(path, tensor)
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise SpaError(f"{path}: cannot read its external data ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    return proto


def load_lazily(model, weights=None) -> tuple[onnx.ModelProto, dict]:
    """``(proto, weights)``: a path is read without copying its big weights (``spa.weights``: the
    proto holds stubs, ``weights`` read-only arrays over a memory map of the file and of its
    external data); a ModelProto is copied (its stubs' arrays are ``weights``)."""
    if isinstance(model, onnx.ModelProto):
        return load_model(model), dict(weights or {})
    path = _checked_path(Path(model))
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError("empty file")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        proto, arrays = weights_mod.parse_with_stubs(mm)
    except SpaError:
        raise
    except Exception as exc:
        raise SpaError(f"{path}: not an ONNX model ({type(exc).__name__}); "
                       "export it with torch.onnx.export, tf2onnx or paddle2onnx first") from None
    if not proto.graph.node and not proto.graph.initializer:
        raise SpaError(f"{path}: not an ONNX model (empty graph)")
    external = [t for t in _external_tensors(proto) if not weights_mod.is_stub(t)]
    if not external:
        return proto, arrays
    for tensor in external:
        _check_external(path, tensor)
    if len(external) != sum(t.data_location == onnx.TensorProto.EXTERNAL and not weights_mod.is_stub(t)
                            for t in proto.graph.initializer):
        # external data in subgraphs or Constant nodes: rare; read it all the plain way
        return load_model(path), {}
    maps = {}
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        target = os.path.realpath(os.path.join(path.parent, info["location"]))
        if target not in maps:
            with open(target, "rb") as f:
                maps[target] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size \
                    else b""
        a = weights_mod.stub_external(t, maps[target], int(info.get("offset", 0) or 0),
                                      int(info.get("length", -1) or -1))
        if a is not None:
            arrays[t.name] = a
    return proto, arrays


def _checked_path(path: Path) -> Path:
    if not path.exists():
        raise SpaError(f"{path}: no such file")
    if path.is_dir():
        raise SpaError(f"{path}: is a directory, expected an .onnx file")
    if not path.is_file():
        raise SpaError(f"{path}: not a regular file (a FIFO or a device); give spa the .onnx file itself")
    return path


def _check_external(path: Path, tensor) -> None:
    """Before anything reads it: a tensor's external data must be a regular file inside the model's
    folder (a relative location, no '..' out, no symbolic or hard link out), its offset and length
    within the file (the CVE-2024-27318 class; onnx >= 1.16 checks too, spa does not rely on it)."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    where = f"{path}: external data '{location}' of tensor '{tensor.name}'"
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise SpaError(f"{where}: not a plain relative path; refusing to read it")
    base = os.path.realpath(path.parent)
    target = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base, target]) != base:
        raise SpaError(f"{where} points outside the model's folder; refusing to read it")
    try:
        st = os.stat(target)
    except OSError:
        raise SpaError(f"{where} is missing; keep it next to the model") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpaError(f"{where} is not a regular file; refusing to read it")
    if st.st_nlink > 1:
        raise SpaError(f"{where} is a hard link (it may be a file from elsewhere); copy the data instead")
    try:
        offset, length = int(info.get("offset", 0) or 0), int(info.get("length", -1) or -1)
    except ValueError:
        raise SpaError(f"{where}: offset/length are not numbers") from None
    if offset < 0 or offset > st.st_size or (length >= 0 and offset + length > st.st_size):
        raise SpaError(f"{where}: offset {offset} and length {length} run past the file's {st.st_size} bytes")


def _parse(path: Path) -> onnx.ModelProto:
    """Parse from a memory map of the file: the parser copies what it keeps, and the file's bytes
    are not read into a second buffer first (what ``onnx.load`` does)."""
    proto = onnx.ModelProto()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                proto.ParseFromString(view)
            finally:
                view.release()
    return proto


def _external_tensors(proto):
    """Every tensor stored as external data, in the main graph and in every subgraph (initializers
    and Constant-node values)."""
    def walk(graph):
        for t in graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                yield t
        for n in graph.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == onnx.TensorProto.EXTERNAL:
                    yield a.t
                for t in a.tensors:
                    if t.data_location == onnx.TensorProto.EXTERNAL:
                        yield t
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    yield from walk(g)
    yield from walk(proto.graph)


def external_data_files(path) -> list:
    """The files a model's external data lives in (resolved paths; the model is parsed without its
    data, so only call this when it matters: a write into the model's folder)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    base = Path(path).parent
    return sorted({str((base / next((e.value for e in t.external_data if e.key == "location"), "")).resolve())
                   for t in _external_tensors(proto)})


def _uses_external_data(proto) -> bool:
    return any(True for _ in _external_tensors(proto))


def save_model(proto: onnx.ModelProto, path, *, inputs=(), weights=None) -> Path:
    """Write a model through the safe writer (``write_atomic``; ``inputs``: the run's input files,
    which it refuses to replace); external data, beside it and as safely, for models over 2 GB.
    ``weights`` holds the arrays of ``proto``'s stubs (``spa.weights``): they are streamed to the
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
    _write_files([data, path], lambda folder: onnx.save_model(
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
    _write_files([data, path], lambda folder: _write_external(proto, weights, folder, path.name, data.name),
                 inputs=inputs)
    return path


#: offsets of tensors in an external data file spa writes (onnxruntime maps page-aligned tensors
#: from the file instead of copying them)
DATA_ALIGN = 4096


def _write_external(proto, weights, folder, name, data_name) -> None:
    """The model file and its one external data file: every stub and every initializer with more
    than 1 KB of raw data goes to the data file, page-aligned, streamed from its array."""
    m = onnx.ModelProto()
    _copy_fields(proto, m, skip=("graph",))
    _copy_fields(proto.graph, m.graph, skip=("initializer",))
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
                f.write(_raw_bytes(weights_mod.array_of(t, weights)))
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


# ----------------------------------------------------------------------------------------------
# the safe writer: every file spa writes goes through here


def check_target(path, inputs=(), *, what="output") -> Path:
    """Refuse, in one line, a write that would replace one of the run's input files (``inputs``:
    paths; hard links count) or anything that is not a regular file (a symbolic link, a device, a
    FIFO, a folder); the target's folder must exist or be creatable."""
    p = Path(path)
    if p.is_symlink():
        raise SpaError(f"{what} {p}: is a symbolic link; spa writes regular files only (give the real path)")
    if p.exists():
        if not p.is_file():
            raise SpaError(f"{what} {p}: exists and is not a regular file; spa will not replace it")
        for src in inputs:
            try:
                same = src is not None and os.path.samefile(p, src)
            except OSError:
                continue
            if same:
                raise SpaError(f"{what} {p}: is {src}, an input of this run; choose another path")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SpaError(f"{what} {p}: cannot write in {parent} (not a writable folder)")
    return p


def write_atomic(path, write, *, inputs=(), what="output") -> Path:
    """Write ``path`` the safe way: ``check_target``, then ``write(tmp)`` into a temporary folder
    beside it, fsync, the mode the umask gives (0644 under 022), rename over the target.  On any
    failure, SIGTERM included, the temporary folder is removed and the target left as it was."""
    path = Path(path)
    _write_files([path], lambda folder: write(os.path.join(folder, path.name)), inputs=inputs, what=what)
    return path


def _write_files(targets, write, *, inputs=(), what="output") -> None:
    """``write(folder)`` makes each target's file, under its own name, in a temporary folder beside
    them; each is then fsynced, given the umask's mode and renamed over its target, in order.  The
    temporary folder goes on any failure, SIGTERM included."""
    targets = [check_target(t, inputs, what=what) for t in targets]
    parent = targets[0].parent
    with _cleanup_on_term():
        try:
            parent.mkdir(parents=True, exist_ok=True)
            folder = tempfile.mkdtemp(prefix=".spa-", dir=str(parent))
        except OSError as exc:
            raise SpaError(f"{what} {targets[0]}: cannot write there ({exc.strerror or exc})") from None
        try:
            write(folder)
            for final in targets:
                tmp = os.path.join(folder, final.name)
                _finish(tmp)
                os.replace(tmp, final)
            _sync_dir(parent)
        except OSError as exc:
            raise SpaError(f"{what} {targets[0]}: write failed ({exc.strerror or exc}); nothing was written") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def write_text(path, text: str, *, inputs=(), what="output") -> Path:
    """A text file (a JSON report) through ``write_atomic``."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), inputs=inputs, what=what)


def _finish(tmp) -> None:
    """fsync the written file and give it the mode a plain open() would (0666 less the umask)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def _sync_dir(folder) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _cleanup_on_term():
    """SIGTERM during a write raises SystemExit, so that the writer's ``finally`` removes its
    temporary files (the default action would kill the process and leave them behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)
    try:
        old = signal.signal(signal.SIGTERM, stop)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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
            _copy_fields_one(fd, value, lo if fd.number < number else hi)
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
                    f.write(_raw_bytes(weights_mod.array_of(t, weights)))
                    continue
                data = t.SerializeToString()
                if len(data) != n:
                    raise SpaError(f"internal: initializer '{t.name}' changed while being written")
                f.write(data)
            f.write(g_hi)
        f.write(m_hi)


def _no_external(proto) -> bool:
    return not _uses_external_data(proto)


# ----------------------------------------------------------------------------------------------
# normalisation


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


def _copy_fields(src, dst, skip=()):
    for fd, value in src.ListFields():
        if fd.name not in skip:
            _copy_fields_one(fd, value, dst)


def _copy_fields_one(fd, value, dst):
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
    _copy_fields(proto, m, skip=("graph",))
    if for_ort and m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
    g = m.graph
    _copy_fields(proto.graph, g, skip=("initializer", "value_info", "input", "output"))
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


def model_size(proto, weights=None) -> int:
    """Serialised size in bytes (stubs with their data), without serialising the model whole
    (``ByteSize`` does)."""
    plan = _stream_plan(proto, weights)
    return plan[0] if plan is not None else proto.ByteSize()


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
