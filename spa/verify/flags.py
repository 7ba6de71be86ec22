"""What ``spa check`` and ``spa bench`` take on the command line: the execution providers and the
``--input-shapes`` syntax.  The standard library only, so that the command line (``spa --help``, a
usage error) answers without loading onnx, onnxruntime or numpy."""
from __future__ import annotations

import re

#: ``spa bench --provider`` name -> onnxruntime providers to request (in order of preference)
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}

#: ``spa check --provider``: the same, without TensorRT
CHECK_PROVIDERS = {k: v for k, v in PROVIDERS.items() if k in ("cpu", "cuda")}


def parse_input_shapes(values) -> dict:
    """Parse ``name:[1,3,224,224]`` specs (a string or an iterable of strings, each possibly a
    comma-separated list like ``a:[1,3],b:[2]``) into ``{name: [1, 3, 224, 224]}``.

    Names may contain ':' (``input:0:[1,3]``). Raises ValueError on bad syntax or repeats.
    """
    if isinstance(values, str):
        values = [values]
    shapes = {}
    pattern = re.compile(r"\s*([^\[\]]+?)\s*:\s*\[([^\]]*)\]\s*(,|$)")
    for text in values or ():
        pos = 0
        while pos < len(text):
            m = pattern.match(text, pos)
            if not m:
                raise ValueError(f"bad input shape {text[pos:]!r}: expected name:[d0,d1,...]")
            name, dims = m.group(1), m.group(2).strip()
            try:
                shape = [int(d) for d in dims.split(",")] if dims else []
            except ValueError:
                raise ValueError(f"bad input shape {m.group(0).strip()!r}: "
                                 "dimensions must be integers") from None
            if name in shapes:
                raise ValueError(f"input {name!r} is given more than one shape")
            shapes[name] = shape
            pos = m.end()
    return shapes
