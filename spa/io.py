"""Loading, probing and saving models.

Everything later in the pipeline works on a *normalised* model: weights held in `Constant` nodes
(PaddlePaddle exports) become initializers, and small tensors computed only from constants and from
tensor shapes (``Shape -> Gather -> Concat -> Reshape`` chains, ``1/sqrt(head_dim)`` scales) are
folded into initializers, so that pruning a channel changes exactly what it should and nothing
computed from a shape behind our back.  Concrete shapes of every tensor come from one onnxruntime run
(``probe``), which is exact where static shape inference leaves gaps.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import SpaError

#: default size for a dynamic input dimension: the first (batch) dim gets 1, the others 224.
DEFAULT_BATCH = 1
DEFAULT_DYNAMIC = 224
#: ONNX Runtime 1.2x reads IR versions up to this.
MAX_IR_VERSION = 10
#: a shape-derived tensor larger than this is left as computed, not folded into a constant.
FOLD_LIMIT = 1 << 16

ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


def load_model(model, *, load_weights: bool = True) -> onnx.ModelProto:
    """Read a path or take a ModelProto (copied, never changed in place); one-line errors."""
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        return proto
    path = Path(model)
    if not path.exists():
        raise SpaError(f"{path}: no such file")
    if path.is_dir():
        raise SpaError(f"{path}: is a directory, expected an .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise SpaError(f"{path}: not an ONNX model ({type(exc).__name__}); "
                       "export it with torch.onnx.export, tf2onnx or paddle2onnx first") from None
    if not proto.graph.node and not proto.graph.initializer:
        raise SpaError(f"{path}: not an ONNX model (empty graph)")
    if load_weights and _uses_external_data(proto):
        base = path.parent
        for tensor in _external_tensors(proto):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            target = (base / location).resolve()
            if base.resolve() not in target.parents and target != base.resolve():
                raise SpaError(f"{path}: external data '{location}' points outside the model's folder; refusing to read it")
            if not target.exists():
                raise SpaError(f"{path}: external data file '{location}' is missing; keep it next to the model")
        onnx.load_external_data_for_model(proto, str(base))
    return proto


def _external_tensors(proto):
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t
    for n in proto.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == onnx.TensorProto.EXTERNAL:
                yield a.t


def _uses_external_data(proto) -> bool:
    return any(True for _ in _external_tensors(proto))


def save_model(proto: onnx.ModelProto, path, *, overwrite_ok: bool = True) -> Path:
    """Write atomically (temp file + rename); external data for models over 2 GB."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = proto.ByteSize() > 2_000_000_000 if _no_external(proto) else True
    fd, tmp = tempfile.mkstemp(prefix=".spa-", suffix=".onnx", dir=str(path.parent))
    os.close(fd)
    try:
        if big:
            data_name = path.name + ".data"
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
        return numpy_helper.to_array(attr.t)
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


# ----------------------------------------------------------------------------------------------
# probing: one onnxruntime run that returns every tensor


@dataclass
class Probe:
    """Concrete facts from running the model once: shapes and values of every tensor."""
    shapes: dict = field(default_factory=dict)     # name -> tuple of ints
    values: dict = field(default_factory=dict)     # name -> np.ndarray (every tensor)
    dynamic: dict = field(default_factory=dict)    # name -> tuple of bools (dim changes with input dims)
    inputs: dict = field(default_factory=dict)     # the feed used


def input_feed(proto, input_shapes=None, seed=0):
    """Random inputs from the declared inputs; dynamic dims from ``input_shapes`` or the defaults."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in graph_inputs(proto):
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise SpaError(f"input '{inp.name}' is not a tensor; spa supports tensor inputs only")
        dims = []
        given = (input_shapes or {}).get(inp.name)
        for i, d in enumerate(tt.shape.dim):
            if given is not None:
                dims.append(int(given[i]))
            elif d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(DEFAULT_BATCH if i == 0 else DEFAULT_DYNAMIC)
        dtype = ONNX_TO_NUMPY.get(tt.elem_type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feed[inp.name] = rng.integers(0, 2, dims).astype(np.bool_)
        else:
            feed[inp.name] = rng.integers(0, 4, dims).astype(dtype)
    return feed


def has_dynamic_inputs(proto) -> bool:
    return any(not (d.HasField("dim_value") and d.dim_value > 0)
               for i in graph_inputs(proto) for d in i.type.tensor_type.shape.dim)


def session(proto_or_bytes, providers=None, optimize=False):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors come back as exceptions; keep the C++ log quiet
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = proto_or_bytes if isinstance(proto_or_bytes, (bytes, str)) else serialize(proto_or_bytes)
    return ort.InferenceSession(data, so, providers=providers or ["CPUExecutionProvider"])


def serialize(proto) -> bytes:
    if proto.ir_version > MAX_IR_VERSION:
        proto = _with_ir(proto, MAX_IR_VERSION)
    return proto.SerializeToString()


def _with_ir(proto, ir):
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy.ir_version = ir
    return copy


def run_all(proto, feed):
    """Run the model exposing every node output; returns name -> value."""
    probe_model = onnx.ModelProto()
    probe_model.CopyFrom(proto)
    del probe_model.graph.value_info[:]
    have = {o.name for o in probe_model.graph.output}
    for node in probe_model.graph.node:
        for out in node.output:
            if out and out not in have:
                probe_model.graph.output.append(onnx.ValueInfoProto(name=out))
                have.add(out)
    try:
        sess = session(probe_model)
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, feed)
    except SpaError:
        raise
    except Exception as exc:
        shapes = ", ".join(f"{k}:{list(np.shape(v))}" for k, v in feed.items())
        raise SpaError(f"onnxruntime cannot run the model on inputs {shapes} ({_ort_reason(exc)}); "
                       "give the right sizes of its dynamic inputs with --input-shapes") from None
    result = dict(zip(names, values))
    result.update(feed)
    for init in proto.graph.initializer:
        result.setdefault(init.name, numpy_helper.to_array(init))
    return result


def _ort_reason(exc) -> str:
    """The useful part of an onnxruntime error: the node and its message, without C++ paths."""
    import re
    text = " ".join(str(exc).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    status = re.search(r"Status Message: (.*)", text)
    msg = status.group(1) if status else text
    msg = re.sub(r"^\S+:\d+ .*?\) ", "", msg)[:200]  # drop "file.h:91 Class::func(args) "
    return f"{node.group(1)} '{node.group(2)}': {msg}" if node else msg


def dynamic_dims(proto):
    """(input name, dim) of every input dimension without a static size."""
    return [(i.name, d) for i in graph_inputs(proto)
            for d, dim in enumerate(i.type.tensor_type.shape.dim)
            if not (dim.HasField("dim_value") and dim.dim_value > 0)]


def probe(proto, input_shapes=None) -> Probe:
    """Run once for shapes and values; with dynamic inputs, run again at other sizes to learn
    which tensor dims follow them (first all dynamic dims bumped together, else one at a time;
    a dim that cannot change is treated as static)."""
    feed = input_feed(proto, input_shapes)
    values = run_all(proto, feed)
    shapes = {k: tuple(np.shape(v)) for k, v in values.items()}
    dynamic = {k: (False,) * len(s) for k, s in shapes.items()}
    pr = Probe(shapes, values, dynamic, feed)
    pr.other_runs = [values]
    dims = dynamic_dims(proto)
    if not dims:
        return pr
    runs = []
    for bump in [set(dims)] + ([{d} for d in dims] if len(dims) > 1 else []):
        try:
            runs.append(run_all(proto, _bumped(feed, bump)))
        except SpaError:
            continue
        if len(bump) > 1:
            break
    pr.other_runs = runs
    for k, s in shapes.items():
        if not runs:
            dynamic[k] = None  # unknown: treated as dynamic everywhere it matters
            continue
        flags = [False] * len(s)
        for run in runs:
            s2 = np.shape(run[k]) if k in run else None
            if s2 is None or len(s2) != len(s):
                flags = None
                break
            flags = [f or a != b for f, a, b in zip(flags, s, s2)]
        dynamic[k] = None if flags is None else tuple(flags)
    return pr


def _bumped(feed, dims):
    """The same feed with the given (input, dim) sizes changed (1 -> 2, n -> n + 32)."""
    out = {}
    for name, value in feed.items():
        shape = list(value.shape)
        for d, n in enumerate(shape):
            if (name, d) in dims:
                shape[d] = 2 if n == 1 else n + 32
        if shape == list(value.shape):
            out[name] = value
        else:
            out[name] = np.resize(value, shape).astype(value.dtype)
    return out


SHAPE_SOURCES = {"Shape", "Size"}


def fold_constants(proto, pr: Probe) -> int:
    """Replace tensors computed only from constants and shapes by initializers (values from the probe).

    A shape-derived value is folded only where it is the same for both probe runs (it does not
    depend on a dynamic input dimension).  Returns how many node outputs were folded.
    """
    const = {t.name for t in proto.graph.initializer}
    derived = set()
    folded = []
    for node in proto.graph.node:
        if node.op_type in ("If", "Loop", "Scan") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if node.op_type in SHAPE_SOURCES:
            ok = True
        elif node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"):
            ok = False
        else:
            ok = all((not i) or i in const or i in derived for i in node.input)
        if not ok:
            continue
        for out in node.output:
            if not out or out not in pr.values:
                continue
            v = pr.values[out]
            runs = pr.other_runs
            if not runs or any(out not in r or np.shape(r[out]) != np.shape(v) or not np.array_equal(r[out], v)
                               for r in runs):
                continue
            if node.op_type not in ("Constant",) and np.size(v) > FOLD_LIMIT and \
                    not all((not i) or i in const for i in node.input):
                continue
            derived.add(out)
            folded.append(out)
    if not folded:
        return 0
    graph_outputs = {o.name for o in proto.graph.output}
    folded_set = set(folded) - graph_outputs
    keep = [n for n in proto.graph.node if not all((not o) or o in folded_set for o in n.output)]
    for name in folded:
        if name in folded_set:
            proto.graph.initializer.append(numpy_helper.from_array(np.asarray(pr.values[name]), name))
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    remove_dead(proto)
    return len(folded_set)


def remove_dead(proto) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    needed = {o.name for o in proto.graph.output}
    sub_refs = set()
    for node in proto.graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                sub_refs |= _graph_refs(g)
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
    inits = [t for t in proto.graph.initializer if t.name in needed]
    if len(inits) != len(proto.graph.initializer):
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(inits)


def _graph_refs(g) -> set:
    refs = set()
    for n in g.node:
        refs.update(i for i in n.input if i)
        for a in n.attribute:
            for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                refs |= _graph_refs(sg)
    refs.update(o.name for o in g.output)
    return refs


def prepare(model, input_shapes=None):
    """load -> normalise -> probe -> fold -> probe again: the model every later stage sees."""
    proto = load_model(model)
    drop_initializer_inputs(proto)
    constants_to_initializers(proto)
    pr = probe(proto, input_shapes)
    if fold_constants(proto, pr):
        pr = probe(proto, input_shapes)
    del proto.graph.value_info[:]
    return proto, pr
