"""Running a model to learn its facts: the probe, and folding what never moves.

Concrete shapes of every tensor come from one onnxruntime run (``probe``), exact where static shape
inference leaves gaps; with dynamic inputs the same session runs again at other sizes where every
dynamic dim moves (``spa.runtime.shapes``), exposing only what is read there.  Small tensors computed only
from constants and from tensor shapes (``Shape -> Gather -> Concat -> Reshape`` chains, the
``1/sqrt(head_dim)`` scale) that are the same at every size are folded into initializers
(``fold_constants``), so that pruning a channel changes exactly what it should and nothing computed
from a shape behind our back.

A probe session is built from a small copy of the graph in which the big initializers are graph
inputs fed from numpy arrays (``Probe.consts``, reused by the channel model): onnxruntime reads them
in place, no serialisation, no prepacking.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from . import exposure, feeds, kinds, shapes
from ..io import weights
from ..errors import SpaError
from ..io import (FEED_LIMIT, ONNX_TO_NUMPY, constants_to_initializers, drop_initializer_inputs, graph_inputs, name_nodes,
                 graph_refs, initializer_arrays, load_lazily, remove_dead, serialize, skeleton,
                 tensor_array)

#: spa refuses to make a random input larger than this (bytes): a huge --input-shapes is a mistake
INPUT_LIMIT = 4 << 30
#: a shape-derived tensor larger than this is left as computed, not folded into a constant.
FOLD_LIMIT = 1 << 16



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
    generated: dict = field(default_factory=dict)  # (n, length, seed) -> token ids the model wrote (textgen)


def input_feed(proto, input_shapes=None, seed=0, *, plan=None, values=None, given=None):
    """Random inputs from the declared inputs: dynamic dims from ``input_shapes`` or the size plan's
    defaults (``values``: symbol sizes to use instead); integer inputs span what the model can read
    (see ``shapes.integer_ranges``), floats are standard normal, each in its own dtype
    (``spa.runtime.feeds``); ``given`` (name -> value) are used as they are."""
    given = given or {}
    feeds.check_feedable(proto, given)
    plan = plan or shapes.size_plan(graph_inputs(proto), input_shapes)
    sizes = plan.shapes(plan.base if values is None else values)
    ranges = shapes.integer_ranges(proto)
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in graph_inputs(proto):
        if inp.name in given:
            feed[inp.name] = given[inp.name]
            continue
        dims = sizes[inp.name]
        dtype = feeds.numpy_dtype(inp.type.tensor_type.elem_type)
        if np.prod(dims, dtype=np.float64) * np.dtype(dtype).itemsize > INPUT_LIMIT:
            raise SpaError(f"input '{inp.name}' of shape {dims} would take more than {INPUT_LIMIT >> 30} GiB; "
                           "give smaller sizes with --input-shapes")
        feed[inp.name] = feeds.random_value(rng, dims, dtype, ranges.get(inp.name))
    return feed


def first_run(proto, run, input_shapes=None, *, plan=None, seed=0, batch=None, given=None):
    """``(plan, feed, run(feed))`` at the first sizes the model runs at: the size plan's base, then
    the plans in which one token symbol is the sum of two others (``shapes.related_plans``: a KV
    cache's mask of past + sequence), each at its base and then at smaller sizes
    (``shapes.fallback_bases``).  Every command sizes a model so (the probe, ``spa check``, ``spa
    bench``): what one runs, the others run.  ``batch`` fixes every symbol used as a first dim
    (``SizePlan.fix_batch``);
    ``run`` raises where the model refuses a feed, and the first error (at the defaults) is raised
    when it refuses them all; ``given`` inputs are fed as they are (``input_feed``)."""
    plan = plan or shapes.size_plan(graph_inputs(proto), input_shapes)
    if batch is not None:
        plan.fix_batch(batch)
    first_error = None
    for p in [plan] + shapes.related_plans(plan):
        for base in [p.base] + shapes.fallback_bases(p):
            try:
                feed = input_feed(proto, plan=p, values=base, seed=seed, given=given)
                out = run(feed)
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own types: a size refused
                first_error = first_error or exc
                continue
            p.base = dict(base)
            return p, feed, out
    raise first_error


def has_dynamic_inputs(proto) -> bool:
    return any(not (d.HasField("dim_value") and d.dim_value > 0)
               for i in graph_inputs(proto) for d in i.type.tensor_type.shape.dim)


def session(proto_or_bytes, providers=None, optimize=False, *, oneshot=False, arena=True):
    """An onnxruntime session (CPU unless ``providers``), unoptimised unless ``optimize``.
    ``arena=False``: every tensor is malloc'd and freed, none kept in a growing arena, so that
    exposed outputs go back to the system when their arrays die and sessions run one after
    another (``calib.collect``'s groups) do not each keep the peak of their runs.
    ``oneshot`` (probes: one or two runs) turns off weight prepacking, which is only a copy for so
    few runs, and the thread pool's spinning, which on a busy machine costs more than it saves
    (a ViT-B probe run: 1.5-1.8 s spinning, 1.2-1.4 s not, under load 3 on 2 cores)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors come back as exceptions; keep the C++ log quiet
    so.enable_cpu_mem_arena = arena
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if oneshot:
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # nodes in priority order: the float copies onnxruntime makes of fp16 weights for kernels it
        # has only in float (MatMul on x86) are made just before use, not all at the start of the
        # run (a 3B fp16 decoder: 11.2 GB -> see docs/llm.md)
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if isinstance(proto_or_bytes, onnx.ModelProto) and weights.has_stubs(proto_or_bytes):
        raise SpaError("internal: this model keeps its big weights apart (spa.io.weights); run it with "
                       "probing.output_runner(model, weights) or fill it first (Analysis.full_model())")
    data = proto_or_bytes if isinstance(proto_or_bytes, (bytes, str)) else serialize(proto_or_bytes)
    return ort.InferenceSession(data, so, providers=providers or ["CPUExecutionProvider"])



def _fed_initializers(proto, consts) -> dict:
    outs = {o.name for o in proto.graph.output} | {i.name for i in proto.graph.input}
    fed = {}
    for t in proto.graph.initializer:
        a = consts.get(t.name)
        if a is None or (a.size <= FEED_LIMIT and not weights.is_stub(t)) or t.name in outs or ONNX_TO_NUMPY.get(t.data_type) != a.dtype \
                or tuple(t.dims) != a.shape or not a.flags.c_contiguous:
            continue
        fed[t.name] = a
    return fed


_BF16, _FP16 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16


def has_bf16(proto) -> bool:
    """Whether any tensor type of the main graph is bfloat16 (initializers, inputs, outputs, Casts)."""
    g = proto.graph
    return any(t.data_type == _BF16 for t in g.initializer) or \
        any(v.type.tensor_type.elem_type == _BF16 for v in list(g.input) + list(g.output)) or \
        any(a.name == "to" and a.i == _BF16 for n in g.node if n.op_type == "Cast" for a in n.attribute)


def fp16_twin(proto) -> onnx.ModelProto:
    """``proto`` with every bfloat16 type made float16: onnxruntime's CPU provider has almost no
    bfloat16 kernel, and the probe needs only shapes and shape-derived values (integers), which the
    twin computes the same.  Its stubs' arrays are the originals converted (``_fp16_of``)."""
    twin = onnx.ModelProto()
    twin.CopyFrom(proto)
    g = twin.graph
    for t in g.initializer:
        if t.data_type == _BF16:
            if weights.is_stub(t):
                t.data_type = _FP16
            else:
                t.CopyFrom(numpy_helper.from_array(tensor_array(t).astype(np.float16), t.name))
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type == _BF16:
            v.type.tensor_type.elem_type = _FP16
    for n in g.node:
        for a in n.attribute:
            if a.name == "to" and a.i == _BF16:
                a.i = _FP16
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == _BF16:
                a.t.CopyFrom(numpy_helper.from_array(tensor_array(a.t).astype(np.float16), a.t.name))
    return twin


#: id(bfloat16 array) -> (weak reference to it, its float16 copy), for the fp16 twin's feeds; emptied
#: at the end of every probe (the copies cost the model's size once more while they live)
_TWINS: dict = {}


def _fp16_of(a):
    hit = _TWINS.get(id(a))
    if hit is not None and hit[0]() is a:
        return hit[1]
    b = a.astype(np.float16)
    weights.release_pages([a])
    _TWINS[id(a)] = (weakref.ref(a), b)
    return b


def _twin_arrays(consts) -> dict:
    return {k: _fp16_of(v) if v.dtype == weights.BFLOAT16 else v for k, v in consts.items()}


class _Runner:
    """One onnxruntime session over ``proto`` exposing ``outputs`` (probe sessions: no
    optimisation, no prepacking, big initializers fed from ``consts`` without copies).  A bfloat16
    model runs as its float16 twin (``fp16_twin``): feeds are converted, outputs come back float16."""

    def __init__(self, proto, consts, outputs, arena=True):
        self.arena = arena
        self.twin = has_bf16(proto)
        if self.twin:
            proto, consts = fp16_twin(proto), _twin_arrays(consts)
        self.proto, self.exposed, self.consts = proto, outputs, consts
        self.fed = _fed_initializers(proto, consts)
        self.ran = False
        try:
            self.sess = session(skeleton(proto, self.fed, outputs, weights=consts), oneshot=True, arena=self.arena)
        except Exception:
            if not self.fed:
                raise
            self._embed()
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def _embed(self):
        """An operator that insists on constant weights: embed them all (the plain, costly way)."""
        self.fed = {}
        self.sess = session(skeleton(self.proto, {}, self.exposed, weights=self.consts), oneshot=True, arena=self.arena)

    def run(self, feed, names=None) -> dict:
        import onnxruntime as ort
        names = self.outputs if names is None else names
        if self.twin:
            feed = {k: v.astype(np.float16) if v.dtype == weights.BFLOAT16 else v for k, v in feed.items()}
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a size the model refuses is an answer here, not an error to print
        try:
            with weights.pages_handed_back(self.fed.values()):
                out = self.sess.run(names, {**feed, **self.fed}, quiet)
        except Exception:
            if self.ran or not self.fed:  # after one good run, a failure is the feed's
                raise
            self._embed()
            try:
                out = self.sess.run(names, feed, quiet)
            except Exception:
                # embedding did not help: the sizes were refused, not the fed weights; feed them
                # again (embedded weights cost a copy of the model for the rest of the probe)
                self.fed = _fed_initializers(self.proto, self.consts)
                self.sess = session(skeleton(self.proto, self.fed, self.exposed, weights=self.consts), oneshot=True, arena=self.arena)
                raise
        self.ran = True
        return dict(zip(names, out))


def _checked(fn, feed):
    """Call ``fn``; an onnxruntime failure becomes a one-line SpaError naming the input sizes."""
    try:
        return fn()
    except SpaError:
        raise
    except Exception as exc:
        reason = ort_reason(exc)
        if "NOT_IMPLEMENTED" in str(exc) or "Could not find an implementation" in str(exc):
            raise SpaError(f"this onnxruntime has no CPU kernel for part of the model ({reason}); spa runs the "
                           "model to learn its shapes: convert it to float32/float16 or use a newer onnxruntime") from None
        shapes = ", ".join(f"{k}:{list(np.shape(v))}" for k, v in feed.items())
        raise SpaError(f"onnxruntime cannot run the model on inputs {shapes} ({reason}); "
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


def output_runner(proto, consts=None, outputs=None, *, arena=True):
    """A probe-style session over ``proto`` (big weights fed from ``consts``) exposing its graph
    outputs, or the tensors ``outputs``: ``run(feed[, names]) -> {name: value}`` (``arena``: see
    ``session``)."""
    consts = initializer_arrays(proto) if consts is None else consts
    return _Runner(proto, consts, [o.name for o in proto.graph.output] if outputs is None else outputs, arena)


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
    """Run once for the shape of every tensor (see ``_probe``); a bfloat16 model's float16 copies
    of its weights are dropped when it returns."""
    try:
        return _probe(proto, input_shapes, consts=consts, dynamic=dynamic)
    finally:
        release_twins()


def release_twins() -> None:
    """Drop the float16 copies made to run bfloat16 models (``fp16_twin``)."""
    _TWINS.clear()


def _probe(proto, input_shapes=None, *, consts=None, dynamic=True) -> Probe:
    """Run once for the shape of every tensor (and the values of constant- and shape-derived ones).

    Dynamic input dims are symbols (``shapes.size_plan``): the first run is at the plan's base
    sizes (smaller ones are tried when the model refuses them); with dynamic inputs the same
    session runs again with every symbol moved at once (else one symbol at a time), for the
    tensors whose rewrite depends on which dims follow the inputs (see ``Probe``).  ``consts`` are
    the initializers as arrays (computed when not given); ``dynamic=False`` skips the runs at
    other sizes (validation runs its own); they are also skipped when nothing would read them."""
    consts = initializer_arrays(proto) if consts is None else consts
    feeds.check_feedable(proto)
    plan = shapes.size_plan(graph_inputs(proto), input_shapes)
    exposed = _exposed(proto)
    cands = fold_candidates(proto)
    feed = input_feed(proto, plan=plan)
    # every node output exposed at once keeps every activation alive in onnxruntime: where that
    # would pass PROBE_BUDGET, the sizes are found with the outputs only, then the tensors are
    # exposed a chunk per session (each chunk's activations freed before the next)
    chunks = exposure.chunks(proto, feed, exposed)
    runner = _checked(lambda: _Runner(proto, consts, exposed if len(chunks) == 1 else
                                      [o.name for o in proto.graph.output]), feed)
    try:
        plan, feed, first = first_run(proto, runner.run, plan=plan)
    except Exception:  # the model refuses every size tried: say so for the defaults
        feed = input_feed(proto, plan=plan)
        first = _checked(lambda: runner.run(feed), feed)
    pr = Probe(inputs=feed, consts=consts, plan=plan, points=[dict(plan.base)])

    def keep(got):
        for name, v in got.items():
            pr.shapes[name] = tuple(np.shape(v))
            pr.dtypes[name] = getattr(v, "dtype", None)
            if name in cands and np.size(v) <= FOLD_LIMIT:
                pr.values[name] = np.array(v)  # a copy: the session's buffers go back to its arena

    keep(first)
    del first
    if len(chunks) > 1:
        for chunk in chunks:
            got = _checked(lambda: _Runner(proto, consts, chunk).run(feed), feed)
            keep(got)
            del got
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
    watched = [n for n in exposed if n in watch]
    if watched and dynamic and (len(chunks) > 1 or len(watched) < len(runner.exposed)):
        # a session's graph outputs all get buffers of their own, fetched or not: the runs at other
        # (larger) sizes expose only what they watch (+0.5 GB at batch 3 for a 300M decoder otherwise)
        del runner
        runner = _checked(lambda: _Runner(proto, consts, watched), feed)
    if not dynamic or not watched:
        # no runs at other sizes: the inputs' flags are their declared dynamic dims, others unknown
        pr.dynamic = {k: (tuple((k, d) in dims for d in range(len(s))) if k in feed else
                          (False,) * len(s) if k in consts else None) for k, s in pr.shapes.items()}
        return pr

    def runs_at(p, points) -> list:
        """[(point, run)] of the points the model runs at under size plan ``p``."""
        out = []
        for point in points:
            try:
                bfeed = input_feed(proto, plan=p, values=point, seed=1)
                got = runner.run(bfeed, watched)
            except Exception:
                continue
            run = {k: (tuple(np.shape(v)), np.array(v) if k in pr.values else None) for k, v in got.items()}
            del got
            run.update({k: (tuple(v.shape), v) for k, v in bfeed.items()})
            out.append((point, run))
        return out

    # every symbol moved at once (odd sizes where the model takes them); where the model refuses
    # some of those points, the relations the probe sizes satisfy are tried (a mask of past +
    # sequence that the user sized): a size the user gave never hides a relation from the probe
    moves = ("up", "short", "odd")
    done = runs_at(plan, [plan.bumped(how) for how in moves])
    for other in shapes.fitting_plans(plan) if len(done) < len(moves) else ():
        got = runs_at(other, [other.bumped(how) for how in moves])
        if len(got) > len(done):
            plan, done = other, got
        if len(done) == len(moves):
            break
    pr.plan, pr.points = plan, [dict(plan.base)] + [point for point, _ in done]
    runs = [run for _, run in done]
    if not runs and len(plan.symbols) > 1:
        # the model refuses every symbol moved at once (a relation spa does not know): move each
        # symbol alone, so that none is taken for a constant because another cannot move
        for sym in plan.symbols:
            for how in ("up", "short"):
                got = runs_at(plan, [{**plan.base, sym: plan.bumped(how)[sym]}])
                if got:
                    pr.points.append(got[0][0])
                    runs.append(got[0][1])
                    break
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
#: their outputs are never folded: a quantized model keeps its integer tensors (a per-tensor
#: DequantizeLinear of an int32 bias would otherwise become a float bias)
QUANTIZERS = {"QuantizeLinear", "DequantizeLinear"}
RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _has_subgraph(node) -> bool:
    return node.op_type in ("If", "Loop", "Scan") or \
        any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _is_weight(t) -> bool:
    """A float tensor of more than one element, or any tensor of more than ``FEED_LIMIT`` (shapes,
    axes and scalars are not weights)."""
    n = math.prod(t.dims)
    return n > FEED_LIMIT or (n > 1 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                         onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE))


def fold_candidates(proto) -> set:
    """Node outputs computed only from initializers and tensor shapes (``Shape``/``Size``), found
    from the graph alone; the probe keeps (and the fold folds) those of at most ``FOLD_LIMIT``
    elements.  Weights converted (Cast of fp16 weights, DequantizeLinear, Transpose: anything
    computed from a weight, see ``_is_weight``) are not candidates: folding them would store the
    weights again, in another type, and lose the file's own (fp16, int8)."""
    weights = {t.name for t in proto.graph.initializer if _is_weight(t)}
    const = {t.name for t in proto.graph.initializer} - weights
    derived, weighty = set(), set(weights)
    for node in proto.graph.node:
        outs = [o for o in node.output if o]
        if node.op_type in QUANTIZERS or (node.op_type not in SHAPE_SOURCES and any(i in weighty for i in node.input)):
            weighty.update(outs)
            continue
        if _has_subgraph(node) or node.op_type in RANDOM_OPS:
            continue
        if node.op_type not in SHAPE_SOURCES and \
                not all((not i) or i in const or i in derived for i in node.input):
            continue
        derived.update(outs)
    return derived


def fold_constants(proto, pr: Probe) -> int:
    """Replace tensors computed only from constants and shapes by initializers (values from the probe).

    A shape-derived value is folded only where it is the same in every probe run (it does not
    depend on a dynamic input dimension), even when what it is computed from moves
    (``Shape(q)[-1]`` of a q with a dynamic batch: the head dim, then the attention scale).  The
    probe is updated in place (folded tensors become constants, dead tensors are forgotten):
    values do not change, so no second run is needed.
    Returns how many node outputs were folded.
    """
    derived = fold_candidates(proto)   # folded where the value never moves
    folded = []
    runs = pr.other_runs
    for node in proto.graph.node:
        for out in node.output:
            if not out or out not in derived or out not in pr.values:
                continue
            v = pr.values[out]
            if not runs or any(out not in r or np.shape(r[out]) != np.shape(v) or not np.array_equal(r[out], v)
                               for r in runs):
                continue
            if np.size(v) > FOLD_LIMIT:  # see fold_candidates
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
            weights.put(proto, pr.consts, name, value)
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



def prepare(model, input_shapes=None, arrays=None):
    """load -> normalise -> probe -> fold: the model every later stage sees, and its probe (the
    fold updates it: folded tensors keep their values and shapes, so the model is run once).
    ``arrays``: the weights of a ModelProto's stubs (``spa.io.weights``)."""
    proto, arrays = load_lazily(model, arrays)
    drop_initializer_inputs(proto)
    constants_to_initializers(proto)
    name_nodes(proto)
    del proto.graph.value_info[:]
    consts = initializer_arrays(proto, arrays)
    pr = None
    if input_shapes is None:   # a text recogniser runs at the size it reads lines at, if it takes it
        lines = kinds.recogniser_shapes(proto)
        if not lines:   # a CTC head whose rank only the run shows
            pr = probe(proto, None, consts=consts)
            lines = kinds.recogniser_shapes(proto, pr.shapes)
        for line in lines:
            try:
                pr = probe(proto, line, consts=consts)
                break
            except SpaError:
                continue
    pr = pr or probe(proto, input_shapes, consts=consts)
    fold_constants(proto, pr)
    weights.release_pages(pr.consts.values())  # the runs read every weight; the next stage pays for what it reads
    return proto, pr
