"""The safetensors format, read and written without the package (no runtime dependency): a u64
little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets: [begin, end]},
"__metadata__": {str: str}}``, then the raw little-endian data.  16-bit and 8-bit floats move as raw
bits (slicing never looks at a value).  Used by ``spa apply-map`` (checkpoints) and ``--grads``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import SpaError

#: dtype tag -> numpy dtype of the same size (BF16 and F8: their bits)
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "F8_E4M3": "u1", "F8_E5M2": "u1",
          "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
          "U8": "u1", "BOOL": "?"}
#: a JSON header bigger than this is not a header (the format caps it at 100 MB)
MAX_HEADER = 100 << 20


def read_header(path, what: str = "") -> tuple[dict, dict, int]:
    """``(entries, metadata, data start)``; entries: name -> (dtype tag, shape, begin, end), checked
    against the file's size.  ``what`` prefixes the one-line errors (``--grads: x.safetensors``)."""
    p = Path(path)
    where = what or str(p)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(MAX_HEADER, size - 8):
            raise SpaError(f"{where}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except Exception:
            raise SpaError(f"{where}: not a safetensors file (bad JSON header)") from None
    meta = header.pop("__metadata__", None) or {}
    start, entries = 8 + n, {}
    for name, e in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0]
                          if isinstance(kv[1], dict) else 0):
        try:
            tag, shape, (lo, hi) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
        except Exception:
            raise SpaError(f"{where}: bad safetensors entry for '{name}'") from None
        if tag not in DTYPES:
            raise SpaError(f"{where}: '{name}' has the dtype {tag}, which spa does not know")
        nbytes = int(np.prod(shape)) * np.dtype(DTYPES[tag]).itemsize
        if not (0 <= lo <= hi and start + hi <= size and hi - lo == nbytes and min(shape, default=1) >= 0):
            raise SpaError(f"{where}: '{name}' has data offsets that do not fit its shape or the file")
        entries[name] = (tag, shape, lo, hi)
    return entries, meta, start


def write(path, tensors, metadata=None) -> None:
    """``tensors``: [(name, dtype tag, shape, produce)], written in order; ``produce()`` gives the
    array (any dtype of the tag's size: its bytes are written as they are)."""
    header, offset = {}, 0
    for name, tag, shape, _ in tensors:
        nbytes = int(np.prod(shape)) * np.dtype(DTYPES[tag]).itemsize
        header[name] = {"dtype": tag, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, tag, shape, produce in tensors:
            a = np.asarray(produce())
            a = a if a.flags.c_contiguous else a.copy(order="C")   # ascontiguousarray makes 0-d 1-d
            if tuple(a.shape) != tuple(shape) or a.dtype.itemsize != np.dtype(DTYPES[tag]).itemsize:
                raise SpaError(f"internal: '{name}' came out {a.dtype}{list(a.shape)}, expected {tag}{list(shape)}")
            if a.dtype.byteorder == ">":
                a = a.byteswap().view(a.dtype.newbyteorder("<"))
            f.write(a.tobytes())
