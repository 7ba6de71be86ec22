"""A per-layer view of a pruned transformer: what a user rebuilding the model elsewhere (a Hugging
Face config, a generation loop, a framework checkpoint) needs to know.

Nodes are placed in framework modules by what the exporter left: the dynamo exporter's
``pkg.torch.onnx.name_scopes`` metadata (``model.model.layers.0.self_attn.q_proj``), a TorchScript
node name (``/model/transformer/h.0/attn/c_attn/Gemm``), or the weight's initializer name.  A
module's layer is the first number in its path.  For every layer: each projection's weight shape
before and after, each attention Reshape's ``[heads, head_dim]`` before and after (found by walking
up from a rank-4 Reshape to the projection it splits), and from those the numbers a decoder config
holds: ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``.
Nothing here decides anything: it reads the original's and the pruned model's shapes.
"""
from __future__ import annotations

import re

from ..graph.modules import LAYER as _LAYER, module_of

_Q = re.compile(r"(?:^|[._])(?:q_proj|query|q|wq|q_lin)$")
_K = re.compile(r"(?:^|[._])(?:k_proj|key|k|wk|k_lin)$")
_V = re.compile(r"(?:^|[._])(?:v_proj|value|v|wv|v_lin)$")
_MLP_IN = re.compile(r"(?:^|[._])(?:gate_proj|up_proj|c_fc|fc1|intermediate\.dense|w1|w3|dense_h_to_4h|fc_in|lin1)$")
_PROJECTIONS = ("MatMul", "Gemm")
#: ops a projection's output passes through before the head split (bias, scale, q/k/v split)
_THROUGH = {"Add", "Mul", "Div", "Cast", "Split", "Slice", "Identity", "Reshape"}


def _weight_module(node, weight_names) -> str:
    for i in node.input[1:]:
        if i in weight_names:
            return re.sub(r"\.(weight|bias)$", "", i)
    return ""


def _out_width(node, shape) -> int | None:
    """Output features of a projection whose weight (input 1) has ``shape``."""
    if shape is None or len(shape) != 2:
        return None
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        return int(shape[0])
    return int(shape[1])


def layer_report(original, before_shapes, pruned, after_shapes) -> list:
    """One dict per layer found (see the module docstring); empty when the model has no numbered
    modules.  ``*_shapes``: tensor name -> shape from the probes of the two models."""
    weight_names = {t.name for t in original.graph.initializer}
    producer = {o: n for n in original.graph.node for o in n.output}
    pruned_nodes = {n.name for n in pruned.graph.node}
    modules, layers = {}, {}
    for node in original.graph.node:
        if node.op_type not in _PROJECTIONS or len(node.input) < 2:
            continue
        module = module_of(node) or _weight_module(node, weight_names)
        m = _LAYER.search(module)
        if not m or node.name not in pruned_nodes:
            continue
        w = node.input[1]
        before, after = before_shapes.get(w), after_shapes.get(w)
        if before is None or after is None or len(before) != 2:
            continue
        layer = int(m.group(1))
        short = module[m.end():].lstrip(".") or node.name
        entry = layers.setdefault(layer, {"layer": layer, "projections": {}, "attention": {}})
        entry["projections"][short] = {"before": list(before), "after": list(after),
                                       "out": [_out_width(node, before), _out_width(node, after)]}
        modules[node.name] = (layer, short)
    for node in original.graph.node:
        if node.op_type != "Reshape" or node.name not in pruned_nodes:
            continue
        out = node.output[0]
        b, a = before_shapes.get(out), after_shapes.get(out)
        if b is None or a is None or len(b) != 4:
            continue
        src = _projection_above(node.input[0], producer)
        if src is None or src.name not in modules:
            continue
        layer, short = modules[src.name]
        layers[layer]["attention"].setdefault(short, []).append(
            {"before": [int(b[2]), int(b[3])], "after": [int(a[2]), int(a[3])]})
    return [_config(layers[k]) for k in sorted(layers)]


def _projection_above(name, producer):
    seen = 0
    while name in producer and seen < 8:
        node = producer[name]
        if node.op_type in _PROJECTIONS:
            return node
        if node.op_type not in _THROUGH:
            return None
        computed = [i for i in node.input if i in producer]   # not the bias or the scale
        if not computed:
            return None
        name, seen = computed[0], seen + 1
    return None


def _config(entry) -> dict:
    """Add the decoder-config numbers a layer's shapes give (before and after)."""
    att, proj = entry["attention"], entry["projections"]

    def split(pattern, i):
        """The i-th head split of the projection ``pattern`` names, or of a fused q/k/v projection."""
        for short, v in att.items():
            if pattern.search(short):
                return v[0]
        fused = [v for v in att.values() if len(v) == 3]
        return fused[0][i] if len(fused) == 1 else None

    q, k, v = split(_Q, 0), split(_K, 1), split(_V, 2)
    cfg = {}
    if q:
        cfg["num_attention_heads"] = [q["before"][0], q["after"][0]]
        cfg["head_dim"] = [q["before"][1], q["after"][1]]
    if k:
        cfg["num_key_value_heads"] = [k["before"][0], k["after"][0]]
    if q and v and v["after"][1] != q["after"][1]:
        cfg["v_head_dim"] = [v["before"][1], v["after"][1]]
    inter = [v["out"] for short, v in proj.items() if _MLP_IN.search(short) and None not in v["out"]]
    if inter:
        cfg["intermediate_size"] = inter[0]
    entry.update(cfg)
    return entry


def describe(entry, label=None) -> str:
    """One line for the CLI: ``layer 3: heads 32->24, kv heads 8->6, head_dim 64, intermediate 5632->3942``."""
    parts = []
    for key, name in (("num_attention_heads", "heads"), ("num_key_value_heads", "kv heads"),
                      ("head_dim", "head_dim"), ("v_head_dim", "v head_dim"), ("intermediate_size", "intermediate")):
        if key in entry:
            b, a = entry[key]
            parts.append(f"{name} {b}" if a == b else f"{name} {b}->{a}")
    if not parts:
        parts = [f"{k} {v['out'][0]}->{v['out'][1]}" for k, v in entry["projections"].items()][:4]
    return f"{label or 'layer ' + str(entry['layer'])}: " + ", ".join(parts)


def describe_all(entries) -> list:
    """``describe`` lines, consecutive layers that read the same merged: ``layers 0-21: ...``."""
    lines, run = [], []

    def flush():
        if run:
            first, last = run[0]["layer"], run[-1]["layer"]
            lines.append(describe(run[0], f"layer {first}" if first == last else f"layers {first}-{last}"))

    for e in entries:
        if run and (describe(e, "x") != describe(run[-1], "x") or e["layer"] != run[-1]["layer"] + 1):
            flush()
            run = []
        run.append(e)
    flush()
    return lines
