"""Reading model files: a path or a ModelProto in, one-line errors for anything that is not a model.

A path is parsed from a memory map of the file (``load_model``), or without copying its big weights
at all (``load_lazily``: the proto holds stubs, the arrays map the file, ``spa.io.weights``).
External data is read only after it passed ``_check_external``: a regular file inside the model's
folder, its offset and length within the file.  Normalising the loaded model (Constant-node
weights, initializers listed as inputs) is ``spa.io.proto``'s.
"""
from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

import onnx

from . import weights as weights_mod
from ..errors import SpaError


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
    if load_weights and uses_external_data(proto):
        for tensor in _external_tensors(proto):
            _check_external(path, tensor)
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise SpaError(f"{path}: cannot read its external data ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    return proto


def load_lazily(model, weights=None) -> tuple[onnx.ModelProto, dict]:
    """``(proto, weights)``: a path is read without copying its big weights (``spa.io.weights``: the
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


def uses_external_data(proto) -> bool:
    return any(True for _ in _external_tensors(proto))
