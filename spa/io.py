"""Loading, probing and saving models.

Everything later in the pipeline works on a *normalised* model: weights held in `Constant` nodes
(PaddlePaddle exports) become initializers, and small tensors computed only from constants and from
tensor shapes (``Shape -> Gather -> Concat -> Reshape`` chains, ``1/sqrt(head_dim)`` scales) are
folded into initializers, so that pruning a channel changes exactly what it should and nothing
computed from a shape behind our back.  Concrete shapes of every tensor come from one onnxruntime run
(``probe``), which is exact where static shape inference leaves gaps.

Weights are big and copies of them are what a probe costs (a ViT-B is 350 MB): the file is parsed from
a memory map, every initializer becomes a numpy array once (``Probe.consts``, reused by the channel
model), and a probe session is built from a small copy of the graph in which the big initializers are
graph inputs fed from those arrays (onnxruntime reads them in place, no serialisation, no prepacking).
"""
from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import shapes
from .errors import SpaError

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
        proto = _parse(path)
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
    plan = None
    if not _no_external(proto):
        big = True
    else:
        plan = _stream_plan(proto)
        big = (plan[0] if plan is not None else proto.ByteSize()) > 2_000_000_000
    fd, tmp = tempfile.mkstemp(prefix=".spa-", suffix=".onnx", dir=str(path.parent))
    os.close(fd)
    try:
        if big:
            data_name = path.name + ".data"
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        elif plan is None:
            onnx.save_model(proto, tmp)
        else:
            _write_stream(proto, plan, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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


def _split(msg, number, cls):
    """Two messages with the fields of ``msg`` numbered below / above ``number`` (that one left out)."""
    lo, hi = cls(), cls()
    for fd, value in msg.ListFields():
        if fd.number != number:
            _copy_fields_one(fd, value, lo if fd.number < number else hi)
    return lo, hi


def _stream_plan(proto):
    """(total bytes, pieces) to write ``proto`` exactly as ``SerializeToString`` would, one
    initializer at a time: upb serialises a whole model into a growing buffer and then copies it,
    three times the model in fresh memory (seconds for a ViT).  None when the model or its graph
    carries unknown fields (then the plain path keeps them)."""
    try:
        from google.protobuf import unknown_fields
        if len(unknown_fields.UnknownFieldSet(proto)) or len(unknown_fields.UnknownFieldSet(proto.graph)):
            return None
    except Exception:
        return None
    m_lo, m_hi = _split(proto, _GRAPH_FIELD, onnx.ModelProto)
    g_lo, g_hi = _split(proto.graph, _INIT_FIELD, onnx.GraphProto)
    m_lo, m_hi, g_lo, g_hi = (x.SerializeToString() for x in (m_lo, m_hi, g_lo, g_hi))
    sizes = [t.ByteSize() for t in proto.graph.initializer]
    init_tag = _varint(_INIT_FIELD << 3 | 2)
    glen = len(g_lo) + len(g_hi) + sum(len(init_tag) + len(_varint(n)) + n for n in sizes)
    graph_head = _varint(_GRAPH_FIELD << 3 | 2) + _varint(glen) if proto.HasField("graph") else b""
    total = len(m_lo) + len(graph_head) + (glen if graph_head else 0) + len(m_hi)
    return total, (m_lo, graph_head, g_lo, sizes, init_tag, g_hi, m_hi)


def _write_stream(proto, plan, path) -> None:
    _, (m_lo, graph_head, g_lo, sizes, init_tag, g_hi, m_hi) = plan
    with open(path, "wb") as f:
        f.write(m_lo)
        if graph_head:
            f.write(graph_head)
            f.write(g_lo)
            for t, n in zip(proto.graph.initializer, sizes):
                data = t.SerializeToString()
                if len(data) != n:
                    raise SpaError(f"internal: initializer '{t.name}' changed while being written")
                f.write(init_tag + _varint(n))
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
    """Concrete facts from running the model: the shape and dtype of every tensor, and the values
    that later stages read.

    ``values`` holds the feed, the initializers (the arrays of ``consts``) and the tensors computed
    only from constants and shapes (what ``fold_constants`` may fold); activations are not kept.
    ``dynamic`` says which dims follow the input dims.  It is exact for the feed, the initializers
    (never) and every tensor of a model with static inputs; in a model with dynamic inputs, for the
    data input and output of every Reshape and the constant- and shape-derived tensors (what the
    rules, the fold and surgery read); it is None (unknown) for the other tensors.
    """
    shapes: dict = field(default_factory=dict)     # name -> tuple of ints
    values: dict = field(default_factory=dict)     # name -> np.ndarray (see above)
    dynamic: dict = field(default_factory=dict)    # name -> tuple of bools, or None (unknown)
    inputs: dict = field(default_factory=dict)     # the feed used
    dtypes: dict = field(default_factory=dict)     # name -> numpy dtype
    consts: dict | None = None                     # initializer name -> np.ndarray (read-only)
    other_runs: list = field(default_factory=list)  # per run at other sizes: name -> fold-candidate value
    other_shapes: list = field(default_factory=list)  # per run at other sizes: watched name -> shape
    plan: object = None                            # shapes.SizePlan: the dynamic dims as symbols
    points: list = field(default_factory=list)     # symbol sizes of the runs: the first, then the others


def input_feed(proto, input_shapes=None, seed=0, *, plan=None, values=None):
    """Random inputs from the declared inputs: dynamic dims from ``input_shapes`` or the size plan's
    defaults (``values``: symbol sizes to use instead); integer inputs span what the model can read
    (see ``shapes.integer_ranges``), floats are standard normal."""
    plan = plan or shapes.size_plan(graph_inputs(proto), input_shapes)
    sizes = plan.shapes(plan.base if values is None else values)
    ranges = shapes.integer_ranges(proto)
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in graph_inputs(proto):
        dims = sizes[inp.name]
        dtype = ONNX_TO_NUMPY.get(inp.type.tensor_type.elem_type, np.float32)
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feed[inp.name] = rng.integers(0, 2, dims).astype(np.bool_)
        else:
            lo, hi = ranges.get(inp.name, (0, 4))
            feed[inp.name] = rng.integers(lo, hi, dims).astype(dtype)
    return feed


def has_dynamic_inputs(proto) -> bool:
    return any(not (d.HasField("dim_value") and d.dim_value > 0)
               for i in graph_inputs(proto) for d in i.type.tensor_type.shape.dim)


def session(proto_or_bytes, providers=None, optimize=False, *, oneshot=False):
    """An onnxruntime session (CPU unless ``providers``), unoptimised unless ``optimize``.
    ``oneshot`` (probes: one or two runs) turns off weight prepacking, which is only a copy for so
    few runs, and the thread pool's spinning, which on a busy machine costs more than it saves
    (a ViT-B probe run: 1.5-1.8 s spinning, 1.2-1.4 s not, under load 3 on 2 cores)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors come back as exceptions; keep the C++ log quiet
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if oneshot:
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def initializer_arrays(proto) -> dict:
    """Every initializer as a numpy array: one copy of the weights, shared by the probe sessions
    (fed in place) and the channel model."""
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


#: initializers with more elements than this are graph inputs of a probe session, fed from numpy
FEED_LIMIT = 1024


def _fed_initializers(proto, consts) -> dict:
    outs = {o.name for o in proto.graph.output} | {i.name for i in proto.graph.input}
    fed = {}
    for t in proto.graph.initializer:
        a = consts.get(t.name)
        if a is None or a.size <= FEED_LIMIT or t.name in outs or ONNX_TO_NUMPY.get(t.data_type) != a.dtype \
                or tuple(t.dims) != a.shape or not a.flags.c_contiguous:
            continue
        fed[t.name] = a
    return fed


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


def _skeleton(proto, fed, outputs, *, for_ort=True) -> bytes:
    """Serialised copy of ``proto`` in which the ``fed`` initializers are typed graph inputs (their
    data is not copied) and ``outputs`` are graph outputs too; value_info is left out."""
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
            g.initializer.append(t)
    g.output.extend(proto.graph.output)
    have = {o.name for o in proto.graph.output}
    for name in outputs:
        if name not in have:
            g.output.add(name=name)
            have.add(name)
    return m.SerializeToString()


def model_size(proto) -> int:
    """Serialised size in bytes, without serialising the model whole (``ByteSize`` does)."""
    plan = _stream_plan(proto)
    return plan[0] if plan is not None else proto.ByteSize()


def check_model(proto) -> None:
    """``onnx.checker.check_model`` without copying the weights: big initializers are checked as
    typed graph inputs (their data sizes are checked when a probe reads them).  Raises
    ``onnx.checker.ValidationError`` like the checker."""
    outs = {o.name for o in proto.graph.output}
    fed = {t.name for t in proto.graph.initializer
           if t.name not in outs and int(np.prod(t.dims)) > FEED_LIMIT and t.data_location != onnx.TensorProto.EXTERNAL}
    onnx.checker.check_model(_skeleton(proto, fed, [], for_ort=False))


class _Runner:
    """One onnxruntime session over ``proto`` exposing ``outputs`` (probe sessions: no
    optimisation, no prepacking, big initializers fed from ``consts`` without copies)."""

    def __init__(self, proto, consts, outputs):
        self.proto, self.exposed = proto, outputs
        self.fed = _fed_initializers(proto, consts)
        self.ran = False
        try:
            self.sess = session(_skeleton(proto, self.fed, outputs), oneshot=True)
        except Exception:
            if not self.fed:
                raise
            self._embed()
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def _embed(self):
        """An operator that insists on constant weights: embed them all (the plain, costly way)."""
        self.fed = {}
        self.sess = session(_skeleton(self.proto, {}, self.exposed), oneshot=True)

    def run(self, feed, names=None) -> dict:
        import onnxruntime as ort
        names = self.outputs if names is None else names
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a size the model refuses is an answer here, not an error to print
        try:
            out = self.sess.run(names, {**feed, **self.fed}, quiet)
        except Exception:
            if self.ran or not self.fed:  # after one good run, a failure is the feed's
                raise
            self._embed()
            out = self.sess.run(names, feed, quiet)
        self.ran = True
        return dict(zip(names, out))


def _checked(fn, feed):
    """Call ``fn``; an onnxruntime failure becomes a one-line SpaError naming the input sizes."""
    try:
        return fn()
    except SpaError:
        raise
    except Exception as exc:
        shapes = ", ".join(f"{k}:{list(np.shape(v))}" for k, v in feed.items())
        raise SpaError(f"onnxruntime cannot run the model on inputs {shapes} ({ort_reason(exc)}); "
                       "give the right sizes of its dynamic inputs with --input-shapes") from None


def _exposed(proto) -> list:
    """Graph outputs, then every node output, once each."""
    names = [o.name for o in proto.graph.output]
    have = set(names)
    for node in proto.graph.node:
        for out in node.output:
            if out and out not in have:
                names.append(out)
                have.add(out)
    return names


def output_runner(proto, consts=None):
    """A probe-style session over ``proto`` exposing only its graph outputs: ``run(feed) -> dict``."""
    consts = initializer_arrays(proto) if consts is None else consts
    return _Runner(proto, consts, [o.name for o in proto.graph.output])


def run_all(proto, feed, consts=None):
    """Run the model exposing every node output; returns name -> value (node outputs, the feed and
    the initializers)."""
    consts = initializer_arrays(proto) if consts is None else consts
    result = _checked(lambda: _Runner(proto, consts, _exposed(proto)).run(feed), feed)
    result.update(feed)
    for name, value in consts.items():
        result.setdefault(name, value)
    return result


def ort_reason(exc) -> str:
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


def probe(proto, input_shapes=None, *, consts=None, dynamic=True) -> Probe:
    """Run once for the shape of every tensor (and the values of constant- and shape-derived ones).

    Dynamic input dims are symbols (``shapes.size_plan``): the first run is at the plan's base
    sizes (smaller ones are tried when the model refuses them); with dynamic inputs the same
    session runs again with every symbol moved at once (else one symbol at a time), for the
    tensors whose rewrite depends on which dims follow the inputs (see ``Probe``).  ``consts`` are
    the initializers as arrays (computed when not given); ``dynamic=False`` skips the runs at
    other sizes (validation runs its own); they are also skipped when nothing would read them."""
    consts = initializer_arrays(proto) if consts is None else consts
    plan = shapes.size_plan(graph_inputs(proto), input_shapes)
    exposed = _exposed(proto)
    cands, any_size = fold_candidates(proto)
    feed = input_feed(proto, plan=plan)
    runner = _checked(lambda: _Runner(proto, consts, exposed), feed)
    first, default = None, plan
    for plan in [plan] + shapes.related_plans(plan):
        for base in [plan.base] + shapes.fallback_bases(plan):
            feed = input_feed(proto, plan=plan, values=base)
            try:
                first = runner.run(feed)
            except Exception:
                continue
            plan.base = base
            break
        if first is not None:
            break
    if first is None:  # the model refuses every size tried: say so for the defaults
        plan = default
        feed = input_feed(proto, plan=plan)
        first = _checked(lambda: runner.run(feed), feed)
    pr = Probe(inputs=feed, consts=consts, plan=plan, points=[dict(plan.base)])
    for name, v in first.items():
        pr.shapes[name] = tuple(np.shape(v))
        pr.dtypes[name] = getattr(v, "dtype", None)
        if name in cands and (name in any_size or np.size(v) <= FOLD_LIMIT):
            pr.values[name] = np.array(v)  # a copy: the session's buffers go back to its arena
    del first
    for name, v in feed.items():
        pr.shapes[name], pr.dtypes[name], pr.values[name] = tuple(v.shape), v.dtype, v
    for name, v in consts.items():
        if name not in pr.shapes:
            pr.shapes[name], pr.dtypes[name], pr.values[name] = tuple(v.shape), v.dtype, v
    dims = dynamic_dims(proto)
    if not dims:
        pr.dynamic = {k: (False,) * len(s) for k, s in pr.shapes.items()}
        pr.other_runs = [pr.values]
        return pr
    shaped = [n for n in proto.graph.node if n.op_type in ("Reshape", "Expand") and n.domain in ("", "ai.onnx")]
    watch = cands | {n.input[0] for n in shaped} | {n.output[0] for n in shaped} | {o.name for o in proto.graph.output}
    watched = [n for n in runner.outputs if n in watch]
    if not dynamic or not watched:
        # no runs at other sizes: the inputs' flags are their declared dynamic dims, others unknown
        pr.dynamic = {k: (tuple((k, d) in dims for d in range(len(s))) if k in feed else
                          (False,) * len(s) if k in consts else None) for k, s in pr.shapes.items()}
        return pr
    runs = []

    def run_at(point) -> bool:
        try:
            bfeed = input_feed(proto, plan=plan, values=point, seed=1)
            got = runner.run(bfeed, watched)
        except Exception:
            return False
        run = {k: (tuple(np.shape(v)), np.array(v) if k in pr.values else None) for k, v in got.items()}
        del got
        run.update({k: (tuple(v.shape), v) for k, v in bfeed.items()})
        runs.append(run)
        pr.points.append(point)
        return True

    for how in ("up", "short"):  # every symbol moved at once
        run_at(plan.bumped(how))
    if not runs and len(plan.symbols) > 1:
        # the model refuses every symbol moved at once (a relation spa does not know): move each
        # symbol alone, so that none is taken for a constant because another cannot move
        for sym in plan.symbols:
            any(run_at({**plan.base, sym: plan.bumped(how)[sym]}) for how in ("up", "short"))
    pr.other_runs = [{k: v for k, (_, v) in run.items() if k in cands and v is not None} for run in runs]
    pr.other_shapes = [{k: s for k, (s, _) in run.items()} for run in runs]
    for k, s in pr.shapes.items():
        if k in consts and k not in feed:
            pr.dynamic[k] = (False,) * len(s)
            continue
        if not runs or not (k in watch or k in feed):
            pr.dynamic[k] = None  # unknown: treated as dynamic everywhere it matters
            continue
        flags = [False] * len(s)
        for run in runs:
            s2 = run[k][0] if k in run else None
            if s2 is None or len(s2) != len(s):
                flags = None
                break
            flags = [f or a != b for f, a, b in zip(flags, s, s2)]
        pr.dynamic[k] = None if flags is None else tuple(flags)
    return pr


SHAPE_SOURCES = {"Shape", "Size"}
RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _has_subgraph(node) -> bool:
    return node.op_type in ("If", "Loop", "Scan") or \
        any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def fold_candidates(proto):
    """Node outputs computed only from initializers and tensor shapes (``Shape``/``Size``), found
    from the graph alone: ``(candidates, any_size)``, where ``any_size`` are those whose node reads
    initializers only (folded whatever their size; the others only up to ``FOLD_LIMIT`` elements)."""
    const = {t.name for t in proto.graph.initializer}
    derived, any_size = set(), set()
    for node in proto.graph.node:
        if _has_subgraph(node) or node.op_type in RANDOM_OPS:
            continue
        if node.op_type not in SHAPE_SOURCES and \
                not all((not i) or i in const or i in derived for i in node.input):
            continue
        outs = [o for o in node.output if o]
        derived.update(outs)
        if node.op_type == "Constant" or (node.op_type not in SHAPE_SOURCES and
                                          all((not i) or i in const for i in node.input)):
            any_size.update(outs)
    return derived, any_size


def fold_constants(proto, pr: Probe) -> int:
    """Replace tensors computed only from constants and shapes by initializers (values from the probe).

    A shape-derived value is folded only where it is the same in every probe run (it does not
    depend on a dynamic input dimension), even when what it is computed from moves
    (``Shape(q)[-1]`` of a q with a dynamic batch: the head dim, then the attention scale).  The probe is updated in place (folded tensors become
    constants, dead tensors are forgotten): values do not change, so no second run is needed.
    Returns how many node outputs were folded.
    """
    const = {t.name for t in proto.graph.initializer}
    derived = set()   # computed from constants and shapes: folded where the value never moves
    folded = []
    runs = pr.other_runs
    for node in proto.graph.node:
        if _has_subgraph(node) or node.op_type in RANDOM_OPS:
            continue
        if node.op_type not in SHAPE_SOURCES and \
                not all((not i) or i in const or i in derived for i in node.input):
            continue
        derived.update(o for o in node.output if o)
        for out in node.output:
            if not out or out not in pr.values:
                continue
            v = pr.values[out]
            if not runs or any(out not in r or np.shape(r[out]) != np.shape(v) or not np.array_equal(r[out], v)
                               for r in runs):
                continue
            if node.op_type not in ("Constant",) and np.size(v) > FOLD_LIMIT and \
                    not all((not i) or i in const for i in node.input):
                continue
            folded.append(out)
    if not folded:
        return 0
    graph_outputs = {o.name for o in proto.graph.output}
    folded_set = set(folded) - graph_outputs
    keep = [n for n in proto.graph.node if not all((not o) or o in folded_set for o in n.output)]
    for name in folded:
        if name in folded_set:
            value = np.asarray(pr.values[name])
            proto.graph.initializer.append(numpy_helper.from_array(value, name))
            if pr.consts is not None:
                pr.consts[name] = value
            pr.dynamic[name] = (False,) * value.ndim
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    remove_dead(proto)
    _forget_dead(pr, proto)
    return len(folded_set)


def _forget_dead(pr: Probe, proto) -> None:
    live = {t.name for t in proto.graph.initializer} | {i.name for i in proto.graph.input} | \
        {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        live.update(node.input)
        live.update(node.output)
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                live |= graph_refs(g)
    for d in (pr.shapes, pr.values, pr.dynamic, pr.dtypes, pr.consts or {}):
        for name in [k for k in d if k not in live]:
            del d[name]



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


def prepare(model, input_shapes=None):
    """load -> normalise -> probe -> fold: the model every later stage sees, and its probe (the
    fold updates it: folded tensors keep their values and shapes, so the model is run once)."""
    proto = load_model(model)
    drop_initializer_inputs(proto)
    constants_to_initializers(proto)
    del proto.graph.value_info[:]
    pr = probe(proto, input_shapes)
    fold_constants(proto, pr)
    return proto, pr

