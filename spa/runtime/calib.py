"""Calibration data and activation statistics gathered with onnxruntime.

``--calib FILE.npz`` holds arrays keyed by model input name (``.npy`` for a single-input model),
samples along the first axis; ``--calib random`` draws synthetic inputs of the probed shapes.
``collect`` exposes the tensors where channels are consumed (the *sink* inputs of the channel
model: Conv X[1], Gemm/MatMul contraction axes, reductions) as extra outputs and keeps running
per-channel sums batch by batch, so memory is bounded by one batch whatever the data size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import exposure, probing
from .feeds import random_value
from ..io import remove_dead
from ..io.weights import BFLOAT16, is_float, trim_heap
from ..errors import SpaError
from ..progress import stepper
from .shapes import integer_ranges


def _quiet(msg):
    pass


@dataclass
class ChannelStats:
    """Running sums over every position of one tensor, per position of its channel axis."""
    n: int
    abs_sum: np.ndarray
    sum: np.ndarray
    sq_sum: np.ndarray

    @property
    def mean_abs(self):
        return self.abs_sum / max(self.n, 1)

    @property
    def rms(self):
        return np.sqrt(self.sq_sum / max(self.n, 1))

    @property
    def var(self):
        m = self.sum / max(self.n, 1)
        return np.maximum(self.sq_sum / max(self.n, 1) - m * m, 0.0)


@dataclass
class ActStats:
    """Statistics per sink axis ``(tensor, dim)``; ``source`` and ``samples`` go in the report."""
    axes: dict = field(default_factory=dict)
    source: str = ""
    samples: int = 0
    moments: dict = field(default_factory=dict)   # axis -> (E[x x^T], E[x]) where collect was asked for them
    batches: int = 0

    def get(self, axis):
        return self.axes.get(axis)


def sink_axes(an) -> list:
    """Activation axes (not weights) where the channels of prunable groups are consumed."""
    cm = an.channels
    wanted = {ax for g in an.groups if g.prunable for ax in g.axes}
    out, seen = [], set()
    for axis, kind, _, _ in cm.sinks:
        if axis in wanted and axis[0] not in cm.consts and axis not in seen:
            seen.add(axis)
            out.append(axis)
    return out


def batches(an, spec, *, n_batches: int = 8, batch_size: int | None = None, seed: int = 0, max_samples=None):
    """Feeds of the probed input shapes from ``spec`` ('random', a .npz or a .npy path).

    Returns ``(description, list_of_feeds)``.  The batch dimension follows the probe (the model is
    normalised for those shapes); data with more samples is cut into batches of that size.
    """
    ref = an.probe.inputs
    if not ref:
        raise SpaError("the model has no inputs to calibrate")
    if str(spec) == "random":
        rng = np.random.default_rng(seed + 1)
        ranges = integer_ranges(an.model)  # token ids span the embedding, masks are ones
        feeds = []
        for _ in range(n_batches):
            feed = {}
            for name, v in ref.items():
                feed[name] = random_value(rng, v.shape, v.dtype, ranges.get(name))
            feeds.append(feed)
        return f"random ({n_batches} batches)", feeds
    path = Path(spec)
    if not path.exists():
        raise SpaError(f"--calib: {path}: no such file (give a .npz, a .npy, or 'random')")
    if not path.is_file():
        raise SpaError(f"--calib: {path}: not a regular file (a FIFO or a device); give a .npz or .npy file")
    try:
        loaded = np.load(str(path), allow_pickle=False)
    except Exception as exc:
        raise SpaError(f"--calib: {path}: cannot read ({type(exc).__name__}); expected .npz or .npy") from None
    if isinstance(loaded, np.ndarray):
        if len(ref) != 1:
            raise SpaError(f"--calib: a .npy file suits a single-input model; this one has inputs "
                           f"{', '.join(ref)}: use a .npz keyed by input name")
        arrays = {next(iter(ref)): loaded}
    else:
        missing = [k for k in ref if k not in loaded.files]
        if missing:
            raise SpaError(f"--calib: {path} lacks input(s) {', '.join(missing)} "
                           f"(has {', '.join(loaded.files) or 'nothing'})")
        arrays = {}
        for k in ref:  # only the members that name inputs are read (an npz may hold much else)
            try:
                arrays[k] = loaded[k]
            except Exception as exc:
                raise SpaError(f"--calib: {path}: member '{k}' cannot be read ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    for k, a in arrays.items():
        check_values(k, a, ref[k].dtype)
    n = None
    for name, v in ref.items():
        a = arrays[name]
        moving = an.probe.dynamic.get(name) or (False,) * v.ndim   # dims that follow the input's size
        if a.ndim == v.ndim - 1 and _fits(a.shape, v.shape[1:], moving[1:]):
            a = a[None]
        if a.ndim != v.ndim or not _fits(a.shape[1:], v.shape[1:], moving[1:]):
            raise SpaError(f"--calib: input '{name}' has samples of shape {list(a.shape[1:])}, the model was "
                           f"probed with {list(v.shape[1:])}; pass --input-shapes '{name}:[1,...]' to match")
        arrays[name] = a
        n = a.shape[0] if n is None else min(n, a.shape[0])
    if max_samples:
        n = min(n, int(max_samples))
    b = next(iter(ref.values())).shape[0] or 1
    if batch_size and _batch_dynamic(an):
        b = int(batch_size)
    if n < b:
        raise SpaError(f"--calib: {path} holds {n} samples, fewer than one batch of {b}")
    feeds = []
    for start in range(0, n - b + 1, b):
        feeds.append({name: np.ascontiguousarray(arrays[name][start:start + b]).astype(v.dtype, copy=False)
                      for name, v in ref.items()})
    return f"{path.name} ({len(feeds) * b} samples)", feeds


def check_values(name, a, dtype) -> None:
    """A one-line :class:`SpaError` unless array ``a`` can feed input ``name`` of ``dtype`` as it is:
    real numbers (or bools), finite, and in the input's range (a float64 1e39 would be inf as float32,
    a 300 would wrap as int8, a 2.5 would be cut to 2 as a token id)."""
    where = f"--calib: input '{name}'"
    fix = "calibration data must be finite real numbers the input's type holds: fix or drop those samples"
    if np.issubdtype(a.dtype, np.complexfloating):
        raise SpaError(f"{where} holds complex ({a.dtype}) data; the model reads {np.dtype(dtype)}: pass the real part")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise SpaError(f"{where} holds {a.dtype} data; calibration data must be numbers")
    if a.size == 0 or a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer) and np.dtype(dtype) == a.dtype:
        return
    flat = a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(-1, 1)

    def first(bad, what):
        rows = np.flatnonzero(bad.any(axis=1))
        if rows.size:
            raise SpaError(f"{where} holds {what} (in {rows.size} of {len(flat)} samples, the first is sample "
                           f"{int(rows[0])}); {fix}")

    if is_float(a.dtype):
        first(np.isnan(flat), "NaN")
        first(np.isinf(flat), "inf")
    target = np.dtype(dtype)
    if is_float(target) and a.dtype != target and _largest(a.dtype) > _largest(target):
        top = _largest(target)
        first(np.abs(flat) > top, f"values beyond {target}'s range (+-{top:.3g})")
    elif np.issubdtype(target, np.integer):
        info = np.iinfo(target)
        if is_float(a.dtype):
            first(flat != np.round(flat), f"fractions, and the input is {target}")
        first((flat < info.min) | (flat > info.max), f"values outside {target}'s range [{info.min}, {info.max}]")


def _largest(dtype) -> float:
    """The largest finite value of a real dtype."""
    dtype = np.dtype(dtype)
    if dtype == BFLOAT16:
        return 3.389e38
    return float(np.finfo(dtype).max if is_float(dtype) else np.iinfo(dtype).max)


def _fits(got, probed, moving) -> bool:
    """Samples of shape ``got`` suit a model probed at ``probed``: equal on every static dim (a dynamic
    dim, such as a sequence, may have any size: statistics are per channel)."""
    return len(got) == len(probed) and all(m or g == p for g, p, m in zip(got, probed, moving))


def _batch_dynamic(an) -> bool:
    dyn = an.probe.dynamic
    return all(dyn.get(name) is not None and len(dyn[name]) and dyn[name][0] for name in an.probe.inputs)


#: ``collect`` exposes at most about this many bytes of tensors per onnxruntime run (more: the
#: tensors are split into groups, each run in a session of its own, one after another)
CALIB_BUDGET = exposure.PROBE_BUDGET


def exposing_session(an, tensors, *, arena=True):
    """``(runner, fetch)``: an onnxruntime runner over the analysed model (weights fed from the
    analysis, never copied) whose outputs are ``tensors``, and the names among them to fetch
    (graph inputs come from the feed instead); ``runner.run(feed, fetch) -> {name: value}``.

    The graph's own outputs are left out unless asked for, and so is every node that the fetched
    tensors do not need: a session keeps all its outputs alive to the end of a run, and a causal
    LM's logits are [batch, seq, vocab] floats (200 MB at 4 x 256 tokens for a 49 k vocabulary)
    that nobody reads here, made by its largest MatMul.  ``arena``: see ``probing.session``."""
    inputs = {i.name for i in an.model.graph.input}
    fetch = list(dict.fromkeys(t for t in tensors if t not in inputs))
    if not fetch:
        runner = probing.output_runner(an.model, an.probe.consts, arena=arena)
        return runner, []
    model = onnx.ModelProto()
    model.CopyFrom(an.model)    # big weights are stubs (spa.io.weights): a copy of the graph only
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in fetch)
    remove_dead(model)
    runner = probing.output_runner(model, an.probe.consts, outputs=fetch, arena=arena)
    return runner, [t for t in fetch if t in set(runner.outputs)]


def exposure_groups(an, tensors, feed, budget=CALIB_BUDGET) -> list:
    """``tensors`` (graph inputs left out) in graph order, cut into groups of about ``budget`` bytes
    at the sizes of ``feed``: each group is one session's outputs, so that one run never holds more.
    Sizes are the probe's scaled by how much larger the feed is than the probe's inputs (the
    tensors exposed here are [positions, channels]: they grow with batch and sequence alike); a
    group ends where the graph does, so early groups run only the layers before them."""
    order = {o: i for i, node in enumerate(an.model.graph.node) for o in node.output}
    names = sorted((t for t in dict.fromkeys(tensors) if t in order), key=order.__getitem__)
    pr = an.probe
    probed = sum(np.prod(v.shape, dtype=np.float64) for v in pr.inputs.values()) or 1.0
    scale = sum(np.prod(np.shape(v), dtype=np.float64) for v in feed.values()) / probed
    groups, total = [], 0.0
    for t in names:
        size = np.prod(pr.shapes.get(t, ()), dtype=np.float64) * np.dtype(pr.dtypes.get(t) or np.float32).itemsize * scale
        if not groups or (total + size > budget and groups[-1]):
            groups.append([])
            total = 0.0
        groups[-1].append(t)
        total += size
    return groups


def _accumulate(stats, outer, v, axes, moments) -> None:
    """Add one tensor's value ``v`` to the running sums of its ``axes`` and ``moments``."""
    if not is_float(v.dtype):
        return
    for axis in axes:
        if axis[1] >= v.ndim:
            continue
        x = np.moveaxis(v, axis[1], -1).reshape(-1, v.shape[axis[1]]).astype(np.float64)
        got = stats.axes.get(axis)
        if got is None:
            c = x.shape[1]
            got = stats.axes[axis] = ChannelStats(0, np.zeros(c), np.zeros(c), np.zeros(c))
        got.n += x.shape[0]
        got.abs_sum += np.abs(x).sum(0)
        got.sum += x.sum(0)
        got.sq_sum += np.einsum("ij,ij->j", x, x)
    for axis in moments:
        if axis[1] >= v.ndim:
            continue
        x = np.moveaxis(v, axis[1], -1).reshape(-1, v.shape[axis[1]]).astype(np.float32)
        acc = outer.setdefault(axis, [np.zeros((x.shape[1], x.shape[1]), np.float32), np.zeros(x.shape[1]), 0])
        # float32 GEMM and float32 running sum (as obspa's own pass): half a float64 sum's memory (SmolLM2's
        # 60 weight inputs: 323 MB, not 646); a sum of a few dozen float32 products is off by ~1e-7 of
        # itself, far below the ridge every Hessian gets before it is inverted
        acc[0] += x.T @ x
        acc[1] += x.sum(0, dtype=np.float64)
        acc[2] += len(x)


def run_batch(runner, feed, fetch) -> dict:
    """``runner.run(feed, fetch)`` for one calibration batch; onnxruntime's failure as a one-line SpaError."""
    try:
        return runner.run(feed, fetch)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[-1][:300]
        raise SpaError(f"--calib: onnxruntime cannot run the calibration batch ({msg})") from None


def collect(an, feeds, *, axes=None, progress=_quiet, source: str = "", moments=(), budget=CALIB_BUDGET) -> ActStats:
    """Run ``feeds`` through the model and keep per-channel running sums on ``axes`` (default: sinks),
    and on ``moments`` (axes) the full second moment ``E[x x^T]`` and mean too, in the same pass: what
    an OBS compensation of the same data needs (``stats.moments``), without a second run over it.

    Memory: onnxruntime holds every output of a run until it returns, so the exposed tensors are
    split into groups of about ``budget`` bytes (``exposure_groups``), one session each, and every
    value is added to the sums and dropped as soon as it arrives.  The sums are the same whatever
    the grouping (each axis sees the same batches in the same order).  Several groups run without
    onnxruntime's arena: an arena per session would each keep its peak (measured: 1.50 GB for 3
    groups with arenas, 1.13 GB without, 1.44 GB for one group with its arena; one arena shared
    by the groups held its peak to the end of the prune, which then peaked higher).  A single
    group keeps its arena: faster, and it is freed with the session."""
    axes = sink_axes(an) if axes is None else list(axes)
    moments = [m for m in dict.fromkeys(moments)]
    stats = ActStats(source=source)
    if not (axes or moments) or not feeds:
        return stats
    by_tensor = {}
    for kind, wanted in enumerate((axes, moments)):
        for axis in wanted:
            by_tensor.setdefault(axis[0], ([], []))[kind].append(axis)
    fed = [t for t in by_tensor if t in feeds[0]]
    groups = exposure_groups(an, [t for t in by_tensor if t not in fed], feeds[0], budget)
    sessions = [exposing_session(an, group, arena=len(groups) == 1) for group in groups]
    outer = {}
    step = stepper(progress, len(feeds), "calibration batch")
    for i, feed in enumerate(feeds):
        step(i)
        for t in fed:
            _accumulate(stats, outer, feed[t], *by_tensor[t])
        for runner, fetch in sessions:
            values = run_batch(runner, feed, fetch)
            for t in fetch:
                _accumulate(stats, outer, values.pop(t), *by_tensor[t])
            del values
            if len(sessions) > 1:
                trim_heap()
        stats.samples += next(iter(feed.values())).shape[0] if feed else 0
        stats.batches += 1
    for axis in list(outer):
        S, total, n = outer.pop(axis)
        S /= max(n, 1)                    # in place: the sums are the size of the result
        stats.moments[axis] = (S, total / max(n, 1))
    return stats


def gather(an, spec, *, n_batches: int = 8, batch_size=None, max_samples=None, seed: int = 0,
           progress=_quiet) -> ActStats:
    """``batches`` + ``collect``: the activation statistics the calibrated criteria need."""
    desc, feeds = batches(an, spec, n_batches=n_batches, batch_size=batch_size, seed=seed, max_samples=max_samples)
    progress(f"calibrating on {desc}: {len(sink_axes(an))} activation tensors")
    return collect(an, feeds, progress=progress, source=desc)
