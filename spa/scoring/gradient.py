"""Gradient criteria: ``taylor``, ``snip`` and ``fisher``, from gradients made in the user's framework.

onnxruntime has no backward pass, so the gradients of the loss with respect to the weights come
from a file (``--grads``) that the framework wrote, keyed by ONNX initializer name
(``tools/grads_from_torch.py`` makes one from a PyTorch module and a few batches):

* ``.npz``: one array per initializer; a member ``__squared__`` holding a nonzero scalar marks the
  arrays as accumulated squared gradients (sum or mean over batches of g**2) instead of gradients.
  Members stored uncompressed (``np.savez``) are memory-mapped; compressed ones are read one at a
  time, when their weight is scored.
* ``.safetensors``: one tensor per initializer (F64, F32, F16 or BF16), memory-mapped; metadata
  ``"squared": "1"`` (or ``"true"``) marks squared gradients.
* from Python, a dict ``{initializer name: array}`` (the key ``__squared__`` likewise).

Every gradient must have its initializer's shape; names that are not initializers of the model
are ignored (counted in the fallback notes); a file that names no initializer at all is an error.

Per channel, over every weight slice it owns (the Conv filter that makes it, BN gamma and beta,
the consumer columns, as for ``l2``), each slice gets a value, reduced over the slices with
``--reduction`` (``sum``, ``mean`` or ``max``):

* ``taylor``: ``|sum over the slice of w * g|``, LLM-Pruner's first-order "vector-wise" importance:
  the loss change to first order when the whole slice is zeroed (signed contributions of the
  slice's elements may cancel, as they do when the slice goes as a whole).
* ``snip``: ``sum over the slice of |w * g|`` (SNIP's connection sensitivity, LLM-Pruner's
  "element-wise" variant): no cancelling, meant for gradients at initialisation.
* ``fisher``: ``sum over the slice of g**2`` (empirical Fisher diagonal).  With squared gradients
  in the file the values are summed as they are (``E[g**2]`` over batches, the proper estimate);
  with plain gradients they are squared (``(E[g])**2``, what a mean gradient allows).
  ``taylor`` and ``snip`` need signed gradients and refuse a squared file.

Weights without a gradient contribute no slice; a prunable group none of whose weights has one
falls back to ``l2`` with a note.  Quantized weights use their dequantized values.  Sums run in
float64 a slab at a time (weights and gradients may be large memory maps).
"""
from __future__ import annotations

import mmap
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..io import safetensors
from ..errors import SpaError
from ..io.weights import BFLOAT16, RELEASE_ABOVE, is_float, release_pages
from .magnitude import SLAB_BYTES, SliceAccumulator, dequantized
from .structure import fallback

#: the member / key / metadata entry that marks accumulated squared gradients
SQUARED = "__squared__"
#: safetensors dtypes a gradient may have (BF16 is read as its bits and widened)
SAFETENSORS_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


@dataclass
class Gradients:
    """Gradients by initializer name, read lazily: ``shapes`` come from the file's headers and
    ``read(name)`` gives one array (a memory-map view where the format allows)."""
    source: str
    shapes: dict
    read: Callable
    squared: bool = False
    matched: int = 0                  # names that are initializers of the model (set by ``checked``)
    ignored: list = field(default_factory=list)   # names that are not


def load(grads) -> Gradients:
    """``grads`` as :class:`Gradients`: a path to a .npz or .safetensors file, or a dict of arrays."""
    if isinstance(grads, Gradients):
        return grads
    if isinstance(grads, dict):
        return _from_dict(grads)
    if not isinstance(grads, (str, os.PathLike)):
        raise SpaError(f"--grads: expected a .npz or .safetensors path or a dict of arrays, got {type(grads).__name__}")
    path = Path(grads)
    if not path.exists():
        raise SpaError(f"--grads: {path}: no such file")
    if not path.is_file():
        raise SpaError(f"--grads: {path}: not a regular file; give a .npz or .safetensors file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":  # a zip archive: what np.savez writes, whatever the file is called
        return _from_npz(path)
    return _from_safetensors(path)


def _float_or_error(name, dtype, source) -> None:
    if not is_float(dtype):
        raise SpaError(f"--grads: {source}: '{name}' holds {dtype} values; gradients must be floating point")


def _from_dict(d: dict) -> Gradients:
    arrays, squared = {}, False
    for k, v in d.items():
        if k == SQUARED:
            squared = bool(np.asarray(v).any())
            continue
        a = np.asarray(v)
        _float_or_error(k, a.dtype, "dict")
        arrays[str(k)] = a
    return Gradients("dict", {k: tuple(a.shape) for k, a in arrays.items()}, arrays.__getitem__, squared)


def _from_npz(path: Path) -> Gradients:
    """Headers of every ``.npy`` member now (shape and dtype, no data); data on ``read``: a view of
    one memory map of the file for stored members, a full read of the member for compressed ones."""
    squared, shapes, where = False, {}, {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                if name == SQUARED:
                    with zf.open(info) as f:
                        squared = bool(np.lib.format.read_array(f, allow_pickle=False).any())
                    continue
                shape, fortran, dtype, skip = _npy_header(zf, info, path, name)
                shapes[name] = shape
                offset = None
                if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
                    raw.seek(info.header_offset + 26)  # local header: name and extra-field lengths at 26, 28
                    n, m = np.frombuffer(raw.read(4), "<u2")
                    offset = info.header_offset + 30 + int(n) + int(m) + skip
                where[name] = (info.filename, offset, fortran, dtype)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SpaError(f"--grads: {path}: not a readable .npz ({type(exc).__name__})") from None
    mm = _mapped(path) if any(w[1] is not None for w in where.values()) else None

    def read(name):
        member, offset, fortran, dtype = where[name]
        if offset is None or int(np.prod(shapes[name])) == 0:
            with zipfile.ZipFile(path) as zf, zf.open(member) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        return np.ndarray(shapes[name], dtype, buffer=mm, offset=offset, order="F" if fortran else "C")

    return Gradients(str(path), shapes, read, squared)


def _npy_header(zf, info, path, name):
    """(shape, fortran order, dtype, header bytes) of one ``.npy`` member, its data unread."""
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            skip = f.tell()
    except Exception as exc:
        raise SpaError(f"--grads: {path}: member '{name}' is not a readable array ({type(exc).__name__})") from None
    if dtype.hasobject:
        raise SpaError(f"--grads: {path}: member '{name}' holds Python objects; gradients must be floating point")
    _float_or_error(name, dtype, path)
    return tuple(shape), fortran, dtype, skip


def _mapped(path: Path):
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _from_safetensors(path: Path) -> Gradients:
    """A .safetensors file (``spa.io.safetensors``), memory-mapped; metadata ``"squared": "1"`` marks
    accumulated squared gradients."""
    try:
        entries, meta, start = safetensors.read_header(path, f"--grads: {path}")
    except SpaError as exc:
        if "bad header length" in str(exc):
            raise SpaError(f"--grads: {path}: neither a .npz (zip) nor a .safetensors file") from None
        raise
    size = path.stat().st_size
    squared = str(meta.get("squared", "")).lower() in ("1", "true", "yes") if isinstance(meta, dict) else False
    shapes, where = {}, {}
    for name, (dtype, shape, lo, _) in entries.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise SpaError(f"--grads: {path}: '{name}' holds {dtype} values; gradients must be F64, F32, F16 or BF16")
        shapes[name] = tuple(shape)
        where[name] = (dtype, start + lo)
    mm = _mapped(path) if shapes and size > start else None

    def read(name):
        dtype, offset = where[name]
        shape = shapes[name]
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, np.float32)
        a = np.ndarray(shape, SAFETENSORS_DTYPES[dtype], buffer=mm, offset=offset)
        if dtype != "BF16":
            return a
        return a.view(BFLOAT16) if BFLOAT16 is not None else (a.astype(np.uint32) << 16).view(np.float32)

    return Gradients(str(path), shapes, read, squared)


def checked(grads, cm) -> Gradients:
    """Loaded gradients, checked against the channel model's initializers: every gradient of an
    initializer has its shape; at least one name is an initializer; the others are counted."""
    g = load(grads)
    matched, ignored = 0, []
    for name, shape in g.shapes.items():
        value = cm.consts.get(name)
        if value is None:
            ignored.append(name)
            continue
        if tuple(value.shape) != shape:
            raise SpaError(f"--grads: the gradient of '{name}' has shape {list(shape)}, the initializer "
                           f"{list(value.shape)} (gradients of another model, or of a model pruned since: "
                           "gradient criteria need gradients of the model they prune, so --steps 1)")
        matched += 1
    if not matched:
        example = ", ".join(repr(k) for k in list(g.shapes)[:3]) or "nothing"
        raise SpaError(f"--grads: none of the {len(g.shapes)} names in {g.source} ({example}...) is an initializer "
                       "of this model; key gradients by ONNX initializer name (tools/grads_from_torch.py)")
    g.matched, g.ignored = matched, ignored
    return g


def slab_sums(arrays, d: int, fn) -> np.ndarray:
    """``fn(*slabs).sum`` over every axis but ``d`` of equally shaped ``arrays``, in float64, a slab
    at a time along another axis (a weight and its gradient may be large memory maps)."""
    shape = arrays[0].shape
    if len(shape) == 1:
        return fn(*(a.astype(np.float64) for a in arrays))
    other = tuple(i for i in range(len(shape)) if i != d)
    slab_axis = other[0]
    row_bytes = 8 * len(arrays) * int(np.prod(shape)) // max(shape[slab_axis], 1)
    step = max(1, SLAB_BYTES // max(row_bytes, 1))
    out = np.zeros(shape[d], np.float64)
    index = [slice(None)] * len(shape)
    for start in range(0, shape[slab_axis], step):
        index[slab_axis] = slice(start, start + step)
        out += fn(*(a[tuple(index)].astype(np.float64) for a in arrays)).sum(axis=other)
    return out


def gradient_slices(cm, grads: Gradients, per_slice) -> SliceAccumulator:
    """Feed ``per_slice(w, g, d)`` -> per-position values for every channel axis of every weight
    that has a gradient (weights as ``spa.scoring.magnitude.weight_slices`` takes them: no BN
    running statistics, quantized ones dequantized)."""
    acc = SliceAccumulator(cm)
    for name, value in cm.consts.items():
        if name not in grads.shapes or name in cm.stats:
            continue
        if name in cm.dequant:
            value = dequantized(cm, name, value)
        if not is_float(value.dtype) or value.ndim == 0:
            continue
        axes = [d for d in range(value.ndim) if cm.axis_index.get((name, d), (0, 0))[1] > 1]
        if not axes:
            continue
        g = grads.read(name)
        if grads.squared and g.size and np.min(g) < 0:
            raise SpaError(f"--grads: {grads.source} is marked as squared gradients but '{name}' has negative values")
        for d in axes:
            values = per_slice(value, g, d)
            if not np.isfinite(values).all():
                raise SpaError(f"--grads: the gradient of '{name}' holds NaN or infinite values")
            acc.add((name, d), values)
        if value.nbytes > RELEASE_ABOVE or g.nbytes > RELEASE_ABOVE:
            release_pages([value, g])
    return acc


def _scores(an, grads, reduction, criterion, per_slice, signed=True):
    """Raw scores and fallback notes; ``per_slice(w, g, d, squared)`` gives one axis's slice values."""
    if grads is None:
        raise SpaError(f"criterion {criterion!r} needs gradients: pass --grads FILE.npz|.safetensors "
                       "(tools/grads_from_torch.py shows how to make one)")
    g = checked(grads, an.channels)
    if signed and g.squared:
        raise SpaError(f"criterion {criterion!r} needs signed gradients, but {g.source} holds squared ones "
                       "(use them with --criterion fisher)")
    acc = gradient_slices(an.channels, g, lambda w, grad, d: per_slice(w, grad, d, g.squared))
    raw = acc.reduce(reduction)
    why = f"no gradient of this group's weights in {g.source}"
    if g.ignored:
        why += f" ({len(g.ignored)} of its {len(g.shapes)} names are not initializers of this model)"
    return raw, fallback(an, raw, acc.covered(), reduction, why)


def _taylor(w, g, d, squared):
    return np.abs(slab_sums((w, g), d, np.multiply))


def _snip(w, g, d, squared):
    return slab_sums((w, g), d, lambda a, b: np.abs(a * b))


def _fisher(w, g, d, squared):
    return slab_sums((g,), d, (lambda a: a) if squared else np.square)


def taylor_scores(an, stats=None, reduction="sum", seed=0, grads=None):
    """|sum of w * g| per weight slice, reduced over the channel's slices (first-order Taylor)."""
    return _scores(an, grads, reduction, "taylor", _taylor)


def snip_scores(an, stats=None, reduction="sum", seed=0, grads=None):
    """sum of |w * g| per weight slice, reduced over the channel's slices (SNIP)."""
    return _scores(an, grads, reduction, "snip", _snip)


def fisher_scores(an, stats=None, reduction="sum", seed=0, grads=None):
    """sum of g**2 per weight slice (a squared file's values as they are), reduced over the slices."""
    return _scores(an, grads, reduction, "fisher", _fisher, signed=False)
