"""Which framework module a node of an exported model belongs to, from what the exporter left:
the dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata (``model.model.layers.0.self_attn.q_proj``)
or a TorchScript node name (``/model/transformer/h.0/attn/c_attn/Gemm``).  A module's layer is the
first number in its path (``spa.mapping.layers`` reports per layer, ``spa.planning.layerwise`` plans
per layer)."""
from __future__ import annotations

import re

#: the layer number in a module path: the first dotted component made of digits
LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def module_of(node) -> str:
    """The framework module a node belongs to ('' when the exporter left no trace)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in p.value.strip("[]").split(",")]
            paths = [s for s in scopes[:-1] if s]
            if paths:
                return paths[-1]
    if node.name.startswith("/") and node.name.count("/") >= 2:
        return ".".join(node.name.strip("/").split("/")[:-1])
    return ""


def layer_of(module: str):
    """``(prefix, layer, rest)`` of a module path (``("model.model.layers", 0, "mlp.up_proj")``), or None."""
    m = LAYER.search(module)
    if not m:
        return None
    return module[:m.start()], int(m.group(1)), module[m.end():].lstrip(".")
