"""Map a pruned ONNX model back to the framework checkpoint it was exported from.

``spa prune --map MAP.json`` records, for every initializer of the original model, its shape and,
for each axis the prune sliced, the kept positions (indices into the *original* axis, composed over
``--steps``), computed with the channel model's own ``keep`` on the same atom mask that
``spa.surgery.slicing.cut`` slices with: the map is exact by construction.  ``spa apply-map MAP CHECKPOINT -o
OUT`` takes the same positions out of a framework checkpoint (safetensors, .npz, a PyTorch
state_dict), so that the framework's model rebuilt with the new widths loads it and can be
fine-tuned there.

What the map cannot see directly, it records from what the exporter left in the graph: the
dynamo exporter's ``pkg.torch.onnx.name_scopes`` / ``class_hierarchy`` node metadata name the
framework module of a weight whose initializer was renamed (a Linear weight folded into a
transposed ``val_N`` for MatMul), of modules whose equal tensors the optimizer merged into one
initializer, and of a BatchNorm folded into a convolution (its four tensors are sliced along the
convolution's output channels).  docs/map.md describes the document and the
recommended export settings.
"""
from __future__ import annotations

import mmap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import io
from ..io import safetensors
from ..errors import SpaError
from .layers import describe_all, layer_report, module_of
from .schema import FORMAT, VERSION, check_map, check_names, read_json

#: how many names a summary line shows before "... and N more"
SHOW = 8


# ----------------------------------------------------------------------------------------------
# building the map (spa prune --map)


class KeptMap(dict):
    """``{initializer: {axis: kept indices}}``, plus ``shapes``: the new shape of every tensor the
    prune changed (graph values too).  The layer report of the map needs the pruned model's
    shapes of Reshape outputs, and ``document`` is not given the pruned model's probe."""

    def __init__(self, *args, shapes=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.shapes = dict(shapes or {})


def step_map(an, units) -> dict:
    """{initializer: {axis: kept indices}} for one step (``an``: the step's Analysis): the same
    ``removed_atoms`` mask and ``keep`` that ``spa.surgery.slicing.cut`` slices with, so every index here is
    exactly the position the pruned model kept."""
    cm = an.channels
    mask = cm.removed_atoms(units)
    shapes_before = an.probe.shapes
    kept, shapes = KeptMap(), {}
    for axis in cm.axis_index:
        k = cm.keep(mask, axis)
        if k is None:
            continue
        name, d = axis
        if name in cm.consts:
            kept.setdefault(name, {})[d] = k
        base = shapes_before.get(name)
        if base is not None and d < len(base):
            shapes.setdefault(name, [int(s) for s in base])[d] = len(k)
    kept.shapes = shapes
    return kept


def compose(first: dict, later: dict) -> dict:
    """The map of two steps in a row (indices of ``later`` are into ``first``'s kept ones): a later
    step's model is the earlier one's output, same initializer names, axes already sliced."""
    out = KeptMap({name: dict(axes) for name, axes in first.items()},
                  shapes={**getattr(first, "shapes", {}), **getattr(later, "shapes", {})})
    for name, axes in later.items():
        prev = out.setdefault(name, {})
        for d, k in axes.items():
            prev[d] = prev[d][k] if d in prev else k
    return out


def document(kept: dict, first, result_proto, result_weights, compensated: set) -> dict:
    """The JSON document ``--map`` writes (format in docs/map.md): every initializer of the
    original model with its shape, and for the sliced ones the new shape and the kept indices per
    axis; framework names the exporter's metadata gives for renamed weights; BatchNorm tensors
    folded into a convolution; the tensors obspa rewrote; the per-layer sizes (``layers``).
    ``result_weights`` is not needed: the pruned proto's stubs carry the new dims."""
    result_dims = {t.name: [int(s) for s in t.dims] for t in result_proto.graph.initializer}
    tensors = {}
    for t in first.model.graph.initializer:
        shape = [int(s) for s in t.dims]
        entry = {"shape": shape}
        axes = kept.get(t.name)
        if axes:
            new = list(shape)
            for d, k in axes.items():
                new[d] = int(len(k))
            got = result_dims.get(t.name)
            if got is not None and got != new:
                raise SpaError(f"internal: the map gives {t.name} the shape {new}, the pruned model has {got}; "
                               "please report this model")
            entry["new_shape"] = new
            entry["kept"] = {str(d): np.asarray(k).tolist() for d, k in sorted(axes.items())}
        tensors[t.name] = entry
    folded = _framework_hints(first.model, tensors)
    doc = {"format": FORMAT, "version": VERSION, "tensors": tensors, "folded": folded,
           "compensated": sorted(n for n in compensated if n in tensors)}
    layers = _layers(first, result_proto, getattr(kept, "shapes", {}))
    if layers:
        doc["layers"] = layers
    return doc


def _layers(first, result_proto, changed_shapes) -> list:
    """``spa.mapping.layers.layer_report`` of the prune (the same list as the report's ``layers``)."""
    after = {**first.probe.shapes, **{k: tuple(v) for k, v in changed_shapes.items()}}
    return layer_report(first.model, first.probe.shapes, result_proto, after)


def _metadata(node) -> dict:
    return {p.key: p.value for p in node.metadata_props}


def _scope_classes(meta) -> list:
    """The module classes of a dynamo-exported node, outermost first (the aten op last)."""
    raw = meta.get("pkg.torch.onnx.class_hierarchy", "")
    return [s.strip(" '\"") for s in raw.strip("[]").split(",") if s.strip(" '\"")]


def _attr(node, name, default=0):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def _framework_hints(model, tensors) -> dict:
    """Read the dynamo exporter's node metadata (module path and class of every node) for what
    the initializer names do not say.  (1) A MatMul/Gemm weight the exporter renamed (``val_25``:
    the transposed ``fc.weight`` of a Linear) gets ``"framework": [{"name": "fc.weight",
    "transposed": true}]``.  (2) An initializer ``P.x`` that nodes of another module ``Q`` read too
    (the optimizer deduplicates equal tensors: every RMSNorm weight of a fresh Llama becomes one)
    gets ``Q.x`` there as well.  (3) A convolution with a BatchNorm folded in (onnxscript's
    ``FuseBatchNormInto*``) marks its weight and bias ``"folded": <bn module>`` (their values are
    not the checkpoint's) and the returned dict holds the BatchNorm's four tensors, keyed by their
    checkpoint names, sliced like the convolution's output channels."""
    folded = {}
    for node in model.graph.node:
        meta = _metadata(node)
        module = module_of(node)
        if not module:
            continue
        classes = _scope_classes(meta)
        owner = classes[-2] if len(classes) >= 2 else ""
        for name in node.input:
            prefix, dot, param = name.rpartition(".")
            if name in tensors and dot and prefix != module and "." in name and param in ("weight", "bias"):
                _add_alias(tensors[name], f"{module}.{param}", False)
        if len(node.input) < 2 or node.input[1] not in tensors:
            continue
        weight = node.input[1]
        if "FuseBatchNorm" in meta.get("pkg.onnxscript.rewriter.rule_name", ""):
            axis = _channel_axis(node)
            if "batchnorm" in owner.lower() and axis is not None:
                folded.update(_folded_batchnorm(node, module, axis, tensors))
            continue
        if node.op_type not in ("MatMul", "Gemm") or weight == f"{module}.weight":
            continue
        short = owner.rsplit(".", 1)[-1]
        gemm_b_t = node.op_type == "Gemm" and _attr(node, "transB")
        if short.endswith("Linear"):        # torch Linear: [out, in]; MatMul reads [in, out]
            _add_alias(tensors[weight], f"{module}.weight", not gemm_b_t)
        elif short == "Conv1D":             # transformers' Conv1D: [in, out]
            _add_alias(tensors[weight], f"{module}.weight", bool(gemm_b_t))
    return folded


def _add_alias(entry, name, transposed):
    hints = entry.setdefault("framework", [])
    if all(h["name"] != name for h in hints):
        hints.append({"name": name, "transposed": bool(transposed)})


def _folded_batchnorm(node, module, axis, tensors) -> dict:
    """The four tensors of the BatchNorm ``module`` folded into ``node``: one per output channel
    of the node's weight (``axis``), kept where the weight's channels were kept."""
    for name in node.input[1:3]:
        if name in tensors:
            tensors[name]["folded"] = module
            tensors[name].pop("framework", None)   # its name is the convolution's, values are not
    w = tensors[node.input[1]]
    if axis >= len(w["shape"]):
        return {}
    bn = {"shape": [w["shape"][axis]], "from": node.input[1]}
    k = w.get("kept", {}).get(str(axis))
    if k is not None:
        bn.update(new_shape=[len(k)], kept={"0": k})
    return {f"{module}.{p}": bn for p in ("weight", "bias", "running_mean", "running_var")}


def _channel_axis(node):
    """The output-channel axis of a fused node's weight (None: a form spa does not map)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if _attr(node, "group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB") else 1
    return None


# ----------------------------------------------------------------------------------------------
# applying the map (spa apply-map)


def load_map(path) -> dict:
    """The map document, checked against the schema before any work (one-line errors:
    ``spa.mapping.schema``)."""
    return check_map(read_json(path, "MAP"), path)


def _load_names(path) -> dict:
    if path is None:
        return {}
    return check_names(read_json(path, "--names"), path)


@dataclass
class Match:
    """One checkpoint tensor's slicing: ``cuts`` [(checkpoint axis, kept indices)]."""
    source: str            # the map's ONNX initializer (a folded BatchNorm: its convolution's weight)
    how: str               # "name", "--names", "exporter metadata", "folded BatchNorm"
    cuts: list
    new_shape: tuple
    transposed: bool = False


@dataclass
class Plan:
    """What ``apply-map`` will do, and what it could not place (the summary reports both: a name
    that matches nothing is the usual sign of an exporter renaming, which ``--names`` fixes)."""
    matches: dict = field(default_factory=dict)       # checkpoint name -> Match
    missing: list = field(default_factory=list)       # sliced map tensors with no checkpoint tensor
    exporter_made: list = field(default_factory=list)  # sliced, made by the exporter's folding
    unmatched_unchanged: int = 0
    not_in_map: list = field(default_factory=list)    # checkpoint tensors the map does not know
    scalars: int = 0


def plan(doc: dict, shapes: dict, names: dict | None = None) -> Plan:
    """Which checkpoint tensor each map entry slices, and along which of its axes.  A map entry
    finds its checkpoint tensor by ``names`` ({ONNX name: checkpoint name}), then by its own name,
    then by the framework name the exporter's metadata gave; folded BatchNorm entries are
    checkpoint names already.  ``shapes``: checkpoint name -> shape."""
    names = names or {}
    tensors, folded = doc["tensors"], doc.get("folded") or {}
    out = Plan()
    direct = [(n, e, names.get(n, n), "--names" if n in names else "name") for n, e in tensors.items()]
    hinted = [(n, e, h["name"], "exporter metadata", h.get("transposed", False))
              for n, e in tensors.items() for h in (e.get("framework") or ()) if n not in names]
    bns = [(e.get("from", c), e, c, "folded BatchNorm") for c, e in folded.items()]
    placed = set()
    for source, entry, ck, how, *hint in direct + hinted + bns:
        if ck not in shapes or ck in out.matches:
            continue
        axes = _axis_map(entry["shape"], shapes[ck], bool(hint and hint[0]))
        if axes is None and (how == "exporter metadata" or not entry.get("kept")):
            continue   # a guess that does not fit, or an unchanged constant that shares a name
        if axes is None:
            raise SpaError(f"checkpoint tensor '{ck}' has the shape {list(shapes[ck])}, the map's '{source}' "
                           f"{entry['shape']}: is this the checkpoint the ONNX model was exported from? "
                           "(--names maps names that differ)")
        # a kept axis of size 1 that the checkpoint does not have (``-1``) keeps its one position
        cuts = [(axes[int(d)], np.asarray(k, np.int64)) for d, k in (entry.get("kept") or {}).items()
                if axes[int(d)] >= 0]
        new = list(shapes[ck])
        for a, k in cuts:
            new[a] = len(k)
        out.matches[ck] = Match(source, how, cuts, tuple(new), transposed=len(axes) == 2 and axes == [1, 0])
        if how != "folded BatchNorm":
            placed.add(source)
    for n, e in tensors.items():
        if n in placed:
            continue
        if not e.get("kept"):
            out.unmatched_unchanged += 1
        elif e.get("folded"):
            out.exporter_made.append(n)
        else:
            out.missing.append(n)
    for ck, shape in shapes.items():
        if ck in out.matches:
            continue
        if len(shape) == 0:
            out.scalars += 1
        else:
            out.not_in_map.append(ck)
    return out


def _axis_map(onnx_shape, ck_shape, transposed=False):
    """``axes[d]``: the checkpoint axis of the map's axis ``d``, or None when the shapes do not
    correspond.  Equal shapes: the same axes.  A 2-D tensor whose shape is the ONNX one reversed
    (a Linear weight [out, in] the exporter stored as MatMul's [in, out]), or which the exporter's
    metadata says is transposed (square ones): swapped.  Shapes equal but for size-1 dims (a bias
    [C] stored as [1, C, 1, 1]): the other dims in order."""
    a, b = [int(s) for s in onnx_shape], [int(s) for s in ck_shape]
    if transposed and len(a) == 2 and a[::-1] == b:
        return [1, 0]
    if a == b:
        return list(range(len(a)))
    if len(a) == 2 and a[::-1] == b:
        return [1, 0]
    big_a, big_b = [d for d, s in enumerate(a) if s != 1], [d for d, s in enumerate(b) if s != 1]
    if [a[d] for d in big_a] != [b[d] for d in big_b]:
        return None
    axes = [-1] * len(a)
    for da, db in zip(big_a, big_b):
        axes[da] = db
    return axes   # -1: a size-1 axis the checkpoint does not have (nothing to slice there)


def apply_map(map_file, checkpoint, output, *, names=None, inputs=(), progress=None, doc=None) -> dict:
    """Slice ``checkpoint`` with the map; write ``output`` (the checkpoint's format, through the
    safe writer: never over an input); return a summary whose ``lines`` the CLI prints.  ``doc``:
    the map document ``map_file`` holds, already loaded and adjusted (``spa.mapping.hf``)."""
    progress = progress or (lambda msg: None)
    doc = load_map(map_file) if doc is None else doc
    rename = _load_names(names)
    kind, out_kind = checkpoint_format(checkpoint), checkpoint_format(output)
    if kind is not None and out_kind != kind:
        raise SpaError(f"apply-map output {output}: apply-map writes the checkpoint's format ({kind}); "
                       f"give OUTPUT a {' or '.join(_SUFFIXES[kind])} name")
    ck = open_checkpoint(checkpoint)
    try:
        progress(f"read {len(ck.shapes)} tensors from {checkpoint} ({ck.kind})")
        p = plan(doc, ck.shapes, rename)
        if not p.matches:
            raise SpaError(_nothing_matched(doc, ck.shapes))
        protect = [str(x) for x in (*inputs, map_file, checkpoint) + ((names,) if names else ()) if x]
        progress(f"slicing {sum(bool(m.cuts) for m in p.matches.values())} tensors into {output}")

        def produce(name):
            value = ck.get(name)
            m = p.matches.get(name)
            for axis, k in (m.cuts if m else ()):
                value = ck.take(value, k, axis)
            return value

        shapes = {n: (p.matches[n].new_shape if n in p.matches else tuple(s)) for n, s in ck.shapes.items()}
        io.write_atomic(output, lambda tmp: ck.write(tmp, shapes, produce), inputs=protect, what="apply-map output")
    finally:
        ck.close()
    return _summary(doc, p, ck, checkpoint, output)


def _nothing_matched(doc, shapes) -> str:
    mine = [n for n, e in doc["tensors"].items() if e.get("kept")] or list(doc["tensors"])
    theirs = [n for n, s in shapes.items() if len(s)] or list(shapes)
    return (f"no tensor of the checkpoint matches the map (map: {_few(mine, 3)}; checkpoint: {_few(theirs, 3)}): "
            "pass --names FILE.json {ONNX initializer name: checkpoint name}")


def _few(names, n=SHOW) -> str:
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f", ... and {len(names) - n} more" if len(names) > n else "") if names else "none"


def _summary(doc, p: Plan, ck, checkpoint, output) -> dict:
    sliced = [n for n, m in p.matches.items() if m.cuts]
    via_bn = [n for n in sliced if p.matches[n].how == "folded BatchNorm"]
    transposed = sorted(n for n, m in p.matches.items() if m.transposed)
    comp = set(doc.get("compensated") or ())
    compensated = sorted(n for n, m in p.matches.items() if m.source in comp and m.how != "folded BatchNorm")
    lines = [f"sliced {len(sliced)} of {len(ck.shapes)} checkpoint tensors"
             + (f" ({len(via_bn)} BatchNorm tensors folded into convolutions by the exporter)" if via_bn else "")
             + f"; {len(ck.shapes) - len(sliced)} copied unchanged"]
    if transposed:
        lines.append(f"{len(transposed)} tensors are stored transposed in the ONNX model, mapped axis for axis: "
                     f"{_few(transposed)}")
    if p.missing:
        lines.append(f"warning: {len(p.missing)} sliced tensors of the map are not in the checkpoint, their slices "
                     f"were not applied (--names maps names that differ): {_few(p.missing)}")
    if p.not_in_map:
        lines.append(f"warning: {len(p.not_in_map)} checkpoint tensors are not in the map, copied unchanged (if their "
                     f"layer lost channels the rebuilt model will not load them): {_few(p.not_in_map)}")
    if compensated:
        lines.append(f"warning: the OBS compensation (obspa, --compensate obs) rewrote {len(compensated)} of these "
                     f"tensors ({_few(compensated)}): "
                     "the slices written here are the original values at the kept positions, not the pruned model's; "
                     "for the pruned network's values take them from the pruned ONNX model (see docs/map.md)")
    if doc.get("layers"):
        lines += describe_all(doc["layers"])
    out = {"checkpoint": str(checkpoint), "output": str(output), "format": ck.kind,
           "tensors": len(ck.shapes), "sliced": len(sliced), "unchanged": len(ck.shapes) - len(sliced),
           "folded_batchnorm": via_bn, "transposed": transposed, "missing_in_checkpoint": p.missing,
           "exporter_made": p.exporter_made, "unmatched_unchanged": p.unmatched_unchanged,
           "not_in_map": p.not_in_map, "scalars": p.scalars, "compensated": compensated,
           "matches": {n: {"from": m.source, "how": m.how, "shape": list(m.new_shape)} for n, m in p.matches.items()},
           "lines": lines}
    if doc.get("layers"):
        out["layers"] = doc["layers"]
    return out


# ----------------------------------------------------------------------------------------------
# checkpoint formats: each gives shapes up front, one tensor at a time, and writes a dict back


@dataclass
class Checkpoint:
    """A checkpoint opened for slicing: ``shapes`` (name -> shape, in file order), ``get(name)``,
    ``take(value, indices, axis)``, ``write(path, shapes, produce)`` (``produce(name)`` gives the
    new tensor), ``close()``."""
    kind: str
    shapes: dict
    get: object
    take: object
    write: object
    close: object = lambda: None


_SUFFIXES = {"safetensors": (".safetensors",), "npz": (".npz",), "pytorch": (".pt", ".pth", ".bin")}


def checkpoint_format(path):
    """The format a path's suffix names ("safetensors", "npz", "pytorch"), or None.  The output of
    apply-map must name its checkpoint's format: an .npz written under a .safetensors name would
    only fail later, in whatever reads it."""
    suffix = Path(path).suffix.lower()
    return next((kind for kind, sx in _SUFFIXES.items() if suffix in sx), None)


def open_checkpoint(path) -> Checkpoint:
    """By suffix: .safetensors, .npz, .pt/.pth/.bin (a torch.save'd state_dict; needs torch)."""
    p = Path(path)
    if p.is_dir():
        raise SpaError(f"CHECKPOINT {p}: a folder; for a Hugging Face model folder pass --hf")
    if not p.is_file():
        raise SpaError(f"CHECKPOINT {p}: no such file")
    kind = checkpoint_format(p)
    if kind is None:
        raise SpaError(f"CHECKPOINT {p}: unknown format; give a .safetensors, .npz or PyTorch .pt/.pth file")
    return {"safetensors": _safetensors, "npz": _npz, "pytorch": _torch}[kind](p)


def _np_take(value, k, axis):
    return np.ascontiguousarray(np.take(value, k, axis=axis))


def _safetensors(p: Path) -> Checkpoint:
    entries, meta, start = safetensors.read_header(p, f"CHECKPOINT {p}")
    f = open(p, "rb")
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if p.stat().st_size > start else None

    def get(name):
        tag, shape, lo, _ = entries[name]
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, safetensors.DTYPES[tag])
        return np.ndarray(shape, safetensors.DTYPES[tag], buffer=mm, offset=start + lo)

    def write(path, shapes, produce):
        safetensors.write(path, [(n, entries[n][0], shapes[n], lambda n=n: produce(n)) for n in entries], meta)

    def close():
        if mm is not None:
            mm.close()
        f.close()

    return Checkpoint("safetensors", {n: e[1] for n, e in entries.items()}, get, _np_take, write, close)


# -- .npz: a zip of .npy members; shapes from the members' headers, arrays read one at a time

def _npz(p: Path) -> Checkpoint:
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SpaError(f"CHECKPOINT {p}: not a .npz file ({exc})") from None
    members, shapes = {}, {}
    try:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shapes[name] = tuple(read(fh)[0])
            members[name] = info
    except ValueError as exc:
        zf.close()
        raise SpaError(f"CHECKPOINT {p}: a member is not a .npy array ({exc})") from None
    deflated = any(i.compress_type == zipfile.ZIP_DEFLATED for i in members.values())

    def get(name):
        with zf.open(members[name]) as fh:
            try:
                return np.lib.format.read_array(fh, allow_pickle=False)
            except ValueError as exc:
                raise SpaError(f"CHECKPOINT {p}: '{name}' cannot be read without pickle ({exc})") from None

    def write(path, new_shapes, produce):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED,
                             allowZip64=True) as out:
            for name in members:
                with out.open(name + ".npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(produce(name)), allow_pickle=False)

    return Checkpoint("npz", shapes, get, _np_take, write, zf.close)


# -- PyTorch: torch.load(weights_only=True) of a dict of tensors (or {"state_dict"|"model": {...}})

def _torch(p: Path) -> Checkpoint:
    try:
        import torch
    except ImportError:
        raise SpaError(f"CHECKPOINT {p}: a PyTorch checkpoint needs torch (pip install torch), "
                       "or save the state_dict as .safetensors or .npz") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpaError(f"CHECKPOINT {p}: torch.load(weights_only=True) failed: {first}") from None
    sd, key = _state_dict_of(obj, torch)
    if sd is None:
        raise SpaError(f"CHECKPOINT {p}: not a state_dict (a dict of tensors, or one under 'state_dict' or 'model')")
    tensors = {n: v for n, v in sd.items() if torch.is_tensor(v)}

    def take(value, k, axis):
        return value.index_select(axis, torch.from_numpy(np.asarray(k, np.int64))).contiguous()

    def write(path, new_shapes, produce):
        new_sd = type(sd)()
        for n, v in sd.items():
            new_sd[n] = produce(n) if n in tensors else v
        if hasattr(sd, "_metadata"):
            new_sd._metadata = sd._metadata
        out = new_sd if key is None else {**obj, key: new_sd}
        torch.save(out, path)

    return Checkpoint("pytorch", {n: tuple(v.shape) for n, v in tensors.items()}, lambda n: tensors[n], take, write)


def _state_dict_of(obj, torch):
    """(the dict of tensors, the key it sits under or None)."""
    if not isinstance(obj, dict):
        return None, None
    if any(torch.is_tensor(v) for v in obj.values()):
        return obj, None
    for key in ("state_dict", "model", "module"):
        inner = obj.get(key)
        if isinstance(inner, dict) and any(torch.is_tensor(v) for v in inner.values()):
            return inner, key
    return None, None
