"""``spa apply-map MAP model_dir -o pruned_dir --hf``: a Hugging Face model folder (``config.json``,
``model.safetensors``) sliced with the map into a folder that ``AutoModelForCausalLM.from_pretrained``
loads as the pruned model (docs/hf.md).

A transformers config holds one width per kind for all layers, so the map's ``layers`` (the per-layer
sizes ``spa prune --map`` recorded) must agree across layers (``spa prune --uniform-layers`` plans them
so), with ``head_dim`` unchanged (the attention scale and the rotary frequencies derive from it) and the
residual width unchanged.  Otherwise nothing but ``spa-layers.json`` (the per-layer sizes) is written
in the output folder, and the one-line error says which width differs.  The checkpoint's names may be
the ONNX model's with a prefix taken off (an export of a wrapper module: ``model.model.layers.0...``
against ``model.layers.0...``); the prefix that matches most names is used.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import io
from ..errors import SpaError
from ..io import safetensors
from .mapfile import apply_map, load_map

#: the map's layer keys and the config keys that hold them, by model family
CONFIG_KEYS = {"intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
               "num_attention_heads": ("num_attention_heads", "n_head"),
               "num_key_value_heads": ("num_key_value_heads",)}
#: model types whose config takes ``head_dim`` and ``num_key_value_heads`` apart from hidden_size / heads
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite"}
#: the file of per-layer sizes written beside the config (always, and alone when the config cannot hold them)
LAYERS_FILE = "spa-layers.json"
#: other files of the model folder copied as they are (tokenizer, generation config), up to this size each
COPY_LIMIT = 64 << 20


def config_sizes(layers: list) -> tuple[dict, str | None]:
    """``({map key: [before, after]}, why not)``: the one value per key a config can hold, or the
    reason the layers' sizes cannot be one config (None when they can)."""
    sizes = {}
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "v_head_dim", "intermediate_size"):
        got = {tuple(e[key]) for e in layers if key in e}
        if not got:
            continue
        if len(got) > 1:
            per = ", ".join(f"layer {e['layer']}: {e[key][1]}" for e in layers if key in e)
            return sizes, (f"the layers have different {key} ({per}) and a transformers config holds one for all "
                           "layers: prune with --uniform-layers")
        sizes[key] = list(got.pop())
    for key in ("head_dim", "v_head_dim"):
        if key in sizes and sizes[key][0] != sizes[key][1]:
            return sizes, (f"{key} went {sizes[key][0]} -> {sizes[key][1]}; transformers derives the attention scale "
                           "and the rotary frequencies from it, so from_pretrained would not reproduce the pruned model: "
                           "prune with --uniform-layers (head dims kept)")
    return sizes, None


def new_config(config: dict, sizes: dict) -> tuple[dict, str | None]:
    """``config`` with the new sizes, or the reason it cannot hold them."""
    out = dict(config)
    for key, names in CONFIG_KEYS.items():
        if key not in sizes or sizes[key][0] == sizes[key][1]:
            continue
        have = [n for n in names if out.get(n) is not None]
        if not have and key == "num_key_value_heads" and config.get("model_type") in LLAMA_LIKE:
            have = [key]
        if not have:
            return out, f"config.json has no {' or '.join(names)} to hold {key} {sizes[key][1]}"
        out[have[0]] = sizes[key][1]
    heads = sizes.get("num_attention_heads")
    if heads and heads[0] != heads[1] and "head_dim" in sizes and out.get("head_dim") is None:
        if config.get("model_type") not in LLAMA_LIKE:
            return out, (f"a {config.get('model_type')!r} config derives head_dim from hidden_size / heads, so it "
                         "cannot hold fewer heads: keep the heads (--exclude them) or build the model yourself")
        out["head_dim"] = sizes["head_dim"][0]
    return out, None


def strip_prefix(doc: dict, names) -> tuple[dict, str]:
    """The map with the one module prefix taken off its names (and its ``framework`` names) that
    makes the most of them checkpoint ``names``; ``(doc, prefix)``."""
    names = set(names)
    counts = {}
    for name, entry in doc["tensors"].items():
        for n in [name] + [h["name"] for h in entry.get("framework") or ()]:
            parts = n.split(".")
            for i in range(len(parts)):
                if ".".join(parts[i:]) in names:
                    prefix = ".".join(parts[:i]) + ("." if i else "")
                    counts[prefix] = counts.get(prefix, 0) + 1
                    break
    if not counts:
        return doc, ""
    prefix = max(sorted(counts), key=lambda p: (counts[p], -len(p)))
    if not prefix:
        return doc, ""

    def cut(n):
        return n[len(prefix):] if n.startswith(prefix) else n

    tensors = {}
    for name, entry in doc["tensors"].items():
        e = dict(entry)
        hints = [{**h, "name": cut(h["name"])} for h in entry.get("framework") or ()]
        if name.startswith(prefix):
            hints.insert(0, {"name": cut(name), "transposed": False})
        if hints:
            e["framework"] = hints
        tensors[name] = e
    folded = {cut(k): v for k, v in (doc.get("folded") or {}).items()}
    return {**doc, "tensors": tensors, "folded": folded}, prefix


def apply_hf(map_file, model_dir, out_dir, *, progress=None) -> dict:
    """Slice the Hugging Face folder ``model_dir`` with the map into ``out_dir`` (see the module
    docstring); the summary of ``mapfile.apply_map`` with ``config`` (the changed keys) added."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise SpaError(f"--hf: {model_dir} is not a Hugging Face model folder (no config.json)")
    if out_dir.resolve() == model_dir.resolve():
        raise SpaError(f"--hf: the output folder is the model folder {model_dir}; choose another -o")
    ckpt = model_dir / "model.safetensors"
    if not ckpt.is_file():
        sharded = (model_dir / "model.safetensors.index.json").is_file()
        raise SpaError(f"--hf: {model_dir} has no model.safetensors" + (
            " (a sharded checkpoint: run apply-map on each shard and build the config from the map's layers)"
            if sharded else " (save it with save_pretrained(..., safe_serialization=True))"))
    doc = load_map(map_file)
    layers = doc.get("layers") or []
    if not layers:
        raise SpaError(f"--hf: the map {map_file} has no per-layer sizes (not a transformer with numbered layers)")
    config = json.loads((model_dir / "config.json").read_text())
    protect = [str(map_file), str(ckpt), str(model_dir / "config.json")]
    per_layer = json.dumps({"layers": layers}, indent=1)
    sizes, why = config_sizes(layers)
    cfg, why = (config, why) if why else new_config(config, sizes)
    if why:
        io.write_text(out_dir / LAYERS_FILE, per_layer, inputs=protect, what="--hf")
        raise SpaError(f"--hf: {why}; wrote the per-layer sizes to {out_dir / LAYERS_FILE}")
    entries, _, _ = safetensors.read_header(ckpt, f"CHECKPOINT {ckpt}")
    renamed, prefix = strip_prefix(doc, entries)
    hidden = config.get("hidden_size")
    summary = apply_map(map_file, ckpt, out_dir / "model.safetensors", inputs=protect, progress=progress, doc=renamed)
    changed = sorted(n for n, m in summary["matches"].items()
                     if hidden and list(entries[n][1]) == [hidden] and m["shape"] != [hidden])
    if changed:
        (out_dir / "model.safetensors").unlink()
        io.write_text(out_dir / LAYERS_FILE, per_layer, inputs=protect, what="--hf")
        raise SpaError(f"--hf: the residual width (hidden_size {hidden}) lost channels ({changed[0]}); prune with "
                       f"--uniform-layers, which keeps it; wrote the per-layer sizes to {out_dir / LAYERS_FILE}")
    io.write_text(out_dir / "config.json", json.dumps(cfg, indent=2) + "\n", inputs=protect, what="--hf")
    io.write_text(out_dir / LAYERS_FILE, per_layer, inputs=protect, what="--hf")
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.name not in ("config.json", LAYERS_FILE) and f.suffix not in (".safetensors", ".bin") \
                and not f.name.endswith(".index.json") and f.stat().st_size <= COPY_LIMIT:
            shutil.copyfile(f, out_dir / f.name)
    diff = {k: [config.get(k), v] for k, v in cfg.items() if config.get(k) != v}
    summary["config"] = diff
    summary["prefix"] = prefix
    summary["lines"].append("config.json: " + (", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()) or "unchanged")
                            + (f" (checkpoint names are the map's without '{prefix}')" if prefix else ""))
    summary["output"] = str(out_dir)
    return summary
