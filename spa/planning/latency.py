"""Latency as a quantity a plan can target (``--target latency=F``), and the channel counts the device
runs fast (``--round-to auto``).

:class:`LatencyModel` is a :class:`~spa.planning.plan.CostModel` with one more kind, ``latency``:
every Conv, ConvTranspose, Gemm and MatMul of the model is timed alone in onnxruntime
(``spa.runtime.latency``) at its real shapes, at full width and at a few kept widths of each of its
prunable channel axes.  Its predicted time after a removal is its full time times, per axis, the
measured share at the kept width (a curve over widths; between the measured widths it is
interpolated at the width rounded up to the device's alignment, since the kernels pad to it).  The
rest of the model (what the dense model's measured time leaves once the timed operators are taken
out: elementwise work, normalisations, layout changes) shrinks with the kept fraction of each
node's output channels.  The sum is a prediction; ``spa.api`` times the written model and corrects
the target when the prediction missed.
"""
from __future__ import annotations

import math
import time

import numpy as np
import onnx
from onnx import helper

from ..runtime.latency import OpSpec, kernel_alignment
from .counting import mac_axes
from .plan import CostModel, multiple

#: operators timed alone; others are part of the rest
TIMED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: kept fractions of an axis timed besides the full width (rounded up to the alignment)
FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.85)
_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _ceil(w, a):
    return int(math.ceil(w / a) * a)


#: a group is rounded to a block only when it is at least this many blocks wide (a narrower one would
#: lose nothing at --ratio 0.3: 0.7 x 32 rounds up to 32 with blocks of 16)
WIDE = 4
#: the smallest block a narrow group falls back to: the blocked layout's own (8 channels)
LAYOUT_BLOCK = 8


def multiples(an, alignment: int) -> dict:
    """{group id: multiple its kept count keeps} so that every timed operator's channel axis the group
    runs through stays a multiple of a block: ``alignment``, or for a group narrower than ``WIDE``
    blocks the largest halving of it down to ``LAYOUT_BLOCK`` that fits ``WIDE`` times.  Only groups of
    plain channels are rounded (one element of each timed axis per unit: conv channels, MLP width,
    the residual): a head dim is one element in every head of the projections, so aligning the
    projections would take head dims in multiples of 16, too coarse for what heads carry (SmolLM2-135M
    at params=1.11: 1.36x the dense perplexity instead of 1.23x), and a matrix product's cost only pads
    to its panel there; whole heads are aligned already.  Groups whose full width is not itself a
    multiple of the block, or still too narrow, are left alone (their kernels were never aligned)."""
    cm = an.channels
    ranges = sorted({r for _, rs, _ in CostModel(an).items["macs"] for r in rs})
    if not ranges:
        return {}
    atom_range = np.full(cm.n_atoms, -1, np.int64)
    for i, (off, size) in enumerate(ranges):
        atom_range[off:off + size] = i
    unit_group = np.full(cm.n_units, -1, np.int64)
    prunable = [g for g in an.groups if g.prunable]
    for g in prunable:
        unit_group[g.units] = g.id
    pg, pr = unit_group[cm.pair_unit], atom_range[cm.pair_atom]
    keep = (pg >= 0) & (pr >= 0)
    pairs, counts = np.unique(np.stack([pg[keep], pr[keep]]), axis=1, return_counts=True)
    per_unit = {}
    for gid, count in zip(pairs[0], counts):
        per_unit.setdefault(int(gid), []).append(int(count))
    out = {}
    by_id = {g.id: g for g in prunable}
    for gid, widths in per_unit.items():
        if any(w != by_id[gid].channels for w in widths):
            continue         # head dims (one per head on the projections) or whole heads: see above
        block = alignment
        while block > LAYOUT_BLOCK and min(widths) < WIDE * block:
            block //= 2      # a narrow group keeps the layout's smaller block: rounding 32 channels up to 16s keeps all
        if all(w % block == 0 and w >= WIDE * block for w in widths):
            out[gid] = block
    return out


def kept_multiples(an, round_to, device: str = "cpu") -> tuple:
    """``(round_to, report)``: ``round_to`` as the plan takes it.  ``auto`` keeps every group's count at
    what the device's kernels run whole (:func:`multiples` of ``kernel_alignment``): resnet50 at
    --ratio 0.3 ran 1.56x faster for 2.00x fewer MACs with exact counts, 1.88x for 1.89x with counts
    rounded up to 8 (docs/benchmarks.md).  Counts are only ever rounded up: a group keeps at most one
    alignment more than asked, and the report says how many groups were rounded."""
    if round_to != "auto":
        return round_to, {"round_to": round_to}
    alignment, why = kernel_alignment(device)
    found = multiples(an, alignment)
    return found, {"round_to": "auto", "device": device, "alignment": alignment, "why": why,
                   "groups_rounded": len(found)}


def _attrs(node) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list):
            if not all(isinstance(x, (int, float)) for x in v):
                return None
            v = tuple(v)
        elif not isinstance(v, (int, float, str)):
            return None
        out[a.name] = v
    return out


class _Node:
    """One timed operator: its spec at full width and how to change the width of one mac axis."""

    def __init__(self, node, shapes, dtype, consts, opset):
        self.node, self.opset = node, opset
        self.attrs = _attrs(node)
        self.shapes = [list(shapes[x]) if x in shapes else None for x in node.input if x]
        self.dtype, self.consts = dtype, [x in consts for x in node.input if x]

    def spec(self, shapes=None, attrs=None) -> OpSpec:
        shapes = shapes or self.shapes
        attrs = attrs or self.attrs
        return OpSpec(self.node.op_type, tuple(sorted(attrs.items())),
                      tuple((tuple(s), self.dtype, c) for s, c in zip(shapes, self.consts)), self.opset)

    def variant(self, axis_pos: int, w: int):
        """The spec with mac axis ``axis_pos`` (the order of ``counting.mac_axes``: a Conv's weight dims
        0 and 1, that is output then input channels; ConvTranspose's input then output; MatMul's and
        Gemm's contraction then output) at width ``w``, or None where this operator's width cannot be
        changed alone (a grouped, non-depthwise Conv)."""
        op, s, a = self.node.op_type, [list(x) for x in self.shapes], dict(self.attrs)
        if op == "Conv":
            axis_pos = 1 - axis_pos          # below, 0 is the input side as for the others
            group = int(a.get("group", 1))
            if group > 1:
                if not (s[1][1] == 1 and s[1][0] == group and s[0][1] == group):
                    return None
                s[0][1] = s[1][0] = w           # depthwise: channels in = out = groups
                a["group"] = w
                if len(s) > 2:
                    s[2][0] = w
            elif axis_pos == 0:
                s[0][1] = s[1][1] = w
            else:
                s[1][0] = w
                if len(s) > 2:
                    s[2][0] = w
        elif op == "ConvTranspose":
            if int(a.get("group", 1)) > 1:
                return None
            if axis_pos == 0:
                s[0][1] = s[1][0] = w
            else:
                s[1][1] = w
                if len(s) > 2:
                    s[2][0] = w
        elif op == "MatMul":
            if len(s[0]) < 2 or len(s[1]) < 2:
                return None
            if axis_pos == 0:
                s[0][-1] = s[1][-2] = w
            else:
                s[1][-1] = w
        elif op == "Gemm":
            ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))
            if axis_pos == 0:
                s[0][0 if ta else 1] = w
                s[1][1 if tb else 0] = w
            else:
                n = s[1][0 if tb else 1]
                s[1][0 if tb else 1] = w
                if len(s) > 2 and s[2] and s[2][-1] == n:
                    s[2][-1] = w
        return self.spec(s, a)


class LatencyModel(CostModel):
    """Params, MACs and predicted milliseconds (kind ``latency``) after a removal; see the module."""

    def __init__(self, an, table, alignment: int, progress=None, dense=None):
        """``dense``: the full original model when the caller has it (it is timed whole; else made here)."""
        super().__init__(an)
        say = progress or (lambda msg: None)
        t0 = time.perf_counter()
        shapes, consts = an.probe.shapes, an.probe.consts or {}
        opset = next((o.version for o in an.model.opset_import if o.domain in ("", "ai.onnx")), 17)
        timed = []
        for node in an.model.graph.node:
            if node.op_type not in TIMED or not node.input or node.input[0] not in shapes:
                continue
            dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(an.probe.dtypes.get(node.input[0], np.float32)))
            if dtype not in _FLOAT or any(x and x not in shapes for x in node.input):
                continue
            op = _Node(node, shapes, dtype, consts, opset)
            if op.attrs is not None:
                timed.append(op)
        say(f"latency: timing {len(timed)} operators at their real shapes and a few kept widths "
            f"({table.device}, {table.machine['threads'] or 'default'} threads; cached in {table.path})")
        ops_ms = 0.0
        self.timed = 0
        for i, op in enumerate(timed):
            axes = mac_axes(op.node, shapes)
            plan = [(None, None)]
            for pos, axis in enumerate(axes[:2]):
                got = self.cm.axis_index.get(axis)
                if got is None or got[1] < 2 * alignment:
                    continue
                n = got[1]
                grid = sorted({min(_ceil(n * f, alignment), n) for f in FRACTIONS} | {n})
                plan += [(pos, w) for w in grid if w < n]
            specs = [op.spec() if pos is None else op.variant(pos, w) for pos, w in plan]
            ok = [s for s in specs if s is not None]
            got_ms = dict(zip([s.key() for s in ok], table.times(ok)))
            full = got_ms.get(specs[0].key())
            if full is None or full <= 0:
                continue
            ops_ms += full
            self.timed += 1
            curves = []
            for pos, axis in enumerate(axes[:2]):
                pts = [(w, got_ms.get(s.key())) for (p, w), s in zip(plan, specs) if p == pos and s is not None]
                pts = [(w, t) for w, t in pts if t is not None]
                got = self.cm.axis_index.get(axis)
                if not pts or got is None:
                    curves.append(None)
                    continue
                n = got[1]
                ws = np.array([w for w, _ in pts] + [n], float)
                ts = np.array([t for _, t in pts] + [full], float) / full
                widths = np.minimum(np.ceil(np.arange(n + 1) / alignment) * alignment, n)
                curves.append(np.minimum(np.interp(widths, ws, ts), 1.0))
            self._add("latency", full, axes[:2], curves)
            if (i + 1) % 25 == 0:
                say(f"latency: {i + 1}/{len(timed)} operators timed")
        self.dense_ms = table.time_model(dense if dense is not None else an.full_model(), dict(an.probe.inputs))
        self.ops_ms = ops_ms
        rest = max(self.dense_ms - ops_ms, 0.0)
        sizes = {}
        for node in an.model.graph.node:
            if node.op_type in TIMED or not node.output or node.output[0] not in shapes:
                continue
            sizes[node.output[0]] = float(np.prod(shapes[node.output[0]])) if shapes[node.output[0]] else 1.0
        total = sum(sizes.values()) or 1.0
        for name, size in sizes.items():
            self._add("latency", rest * size / total, [(name, d) for d in range(len(shapes[name]))])
        self.base["latency"] = ops_ms + rest
        self.items.setdefault("latency", [])
        self.seconds = time.perf_counter() - t0
        table.save()
        say(f"latency: original {self.dense_ms:.2f} ms measured, of which {ops_ms:.2f} ms in the {self.timed} timed "
            f"operators alone ({table.measured} timings made, {table.reused} from the cache)")

    def rank_weights(self, groups, kind: str, round_to) -> dict:
        """The milliseconds one channel of each group saves (removing one aligned block, or a quarter of
        the group, of it alone), over the mean of those: HALP's importance per unit of latency, so the
        global threshold spends drift where the runtime pays it back."""
        if kind != "latency":
            return {}
        saved = {}
        for g in groups:
            k = min(max(multiple(round_to, g.id), g.channels // 4, 1), g.channels - 1)
            if k >= 1:
                saved[g.id] = max(self.base["latency"] - self.estimate(g.units[:k])["latency"], 0.0) / k
        mean = float(np.mean([v for v in saved.values() if v > 0] or [1.0]))
        floor = 0.05 * mean      # a group the table says saves nothing still goes last, not never
        return {gid: (max(v, floor) / mean) ** RANK_POWER for gid, v in saved.items()}

    def group_curves(self, groups, top: int = 12) -> dict:
        """{group id: [[kept channels, predicted model ms], ...]} for the ``top`` groups whose removal
        saves the most: the model's predicted time with only that group cut (the steps of its kernels),
        what ``spa report`` plots."""
        out = {}
        for g in groups:
            kept = sorted({max(1, int(round(g.channels * f))) for f in (0.1, 0.3, 0.5, 0.7, 0.85, 1.0)})
            out[g.id] = [[k, round(self.estimate(g.units[: g.channels - k])["latency"], 4)] for k in kept]
        best = sorted(out, key=lambda gid: out[gid][0][1])[:top]
        return {str(gid): out[gid] for gid in best}

    def info(self) -> dict:
        return {"original_ms": round(self.dense_ms, 4), "timed_operators": self.timed,
                "timed_operators_ms": round(self.ops_ms, 4), "predicted_original_ms": round(self.base["latency"], 4),
                "seconds": round(self.seconds, 2)}



#: the power of the milliseconds a channel saves in the global ranking (score / saved ** power)
RANK_POWER = 1.0
#: --target latency=F: a measured speed-up within this fraction of F is taken
TOLERANCE = 0.05
TRIES = 4


def reach(factor: float, attempt, measure, progress=None):
    """Prune for a predicted speed-up, time the result, and correct: ``attempt(goal)`` prunes to the
    predicted speed-up ``goal`` and returns a candidate, ``measure(candidate)`` its measured speed-up.
    Each round scales the goal by how far the measurement missed ``factor`` (the prediction's error
    is mostly a factor: the rest of the model, layout changes); at most ``TRIES`` rounds, the
    closest candidate wins.  Returns ``(candidate, rounds, index of the winning round)``."""
    say = progress or (lambda msg: None)
    goal, best, rounds = float(factor), None, []
    for i in range(TRIES):
        candidate = attempt(goal)
        got = measure(candidate)
        rounds.append({"goal": round(goal, 4), **got})
        say(f"latency: round {i + 1}: planned for {goal:.3f}x predicted, measured {got['speedup']:.3f}x "
            f"({got['original_ms']:.2f} -> {got['pruned_ms']:.2f} ms; target {factor:g}x)")
        if best is None or abs(math.log(got["speedup"] / factor)) < abs(math.log(best[1] / factor)):
            best = (candidate, got["speedup"], i)
        if abs(got["speedup"] / factor - 1.0) <= TOLERANCE:
            break
        goal = max(1.0, goal * factor / max(got["speedup"], 1e-6))
    return best[0], rounds, best[2]
