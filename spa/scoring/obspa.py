"""OBSPA in the pipeline: which weights read each group, where their Hessians come from, and the
greedy selection with weight compensation written back into the model (``--criterion obspa``).

The numerical core is :mod:`spa.scoring.obs`; this module supplies what it needs (see
``docs/obspa.md``, "Wiring"), and :mod:`spa.scoring.obs_stage` runs it as a stage of the prune:

* **consumers** -- every *contract* sink of the channel model whose other operand is a constant
  weight used by that node alone: Conv (``group == 1``, 2-D), Gemm (``transA == 0``, alpha = beta
  = 1), MatMul with a 2-D constant ``B``.  Each reads an input axis whose positions map to the
  group's units (one position per unit, or several: flatten before a Linear, attention heads);
  positions of other groups are *fixed* columns (never removed, used for compensation); a bias
  (Conv ``B``, Gemm ``C``, the constant Add after a MatMul) is a fixed constant-1 column so it
  absorbs the mean of removed channels.  Grouped and depthwise convolutions pass channels through
  to their own consumers and are not compensated; activation x activation products (attention
  scores) have no weight: a group read only by those falls back to L2.
* **Hessians** ``H = E[x x^T]`` per consumer input (tensor + conv geometry), from ``synthetic``
  inputs (random, of the probed shapes) or calibration data run through onnxruntime (patch rows
  sampled, running sums, bounded memory), from the BatchNormalization (+ activation) feeding the
  consumer (``bn``; no data at all, other consumers fall back to synthetic), or the identity (the
  control: OBS then equals L2 and nothing is compensated).
* **selection** (``SELECTIONS``) -- ``obs``: the planner decides how many channels each group loses
  (for a global plan or a target, from the single-removal OBS costs); :func:`obs_group` removes that
  many greedily over all consumers of the group and compensates the kept weights.  ``diagonal``: a
  channel's cost is its removal alone, uncompensated, under the Hessian's diagonal (Optimal Brain
  Damage); the planner removes the cheapest and OBS compensates that set.  The greedy cost trusts
  the Hessian's correlations, which text a decoder wrote itself does not share with real text
  (SmolLM2-135M, params=1.11, no data: 2.32x the dense perplexity under ``obs``, 1.55x under
  ``diagonal``, docs/obspa.md); ``auto`` is ``diagonal`` for a causal language model, else ``obs``.
  Groups are processed in graph order; a weight read by several groups sees earlier ones' changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime import calib as calib_mod, probing, synthetic as synthetic_inputs
from ..runtime.calib import exposing_session
from ..errors import SpaError
from ..io.weights import release_pages, trim_heap
from ..progress import stepper
from .hessians import Hessians, bn_moments, hessian_from_bn, split_bias, with_bias
from .obs import obs_group, obs_scores
from .structure import axis_pairs

HESSIANS = ("auto", "synthetic", "bn", "identity")
SELECTIONS = ("auto", "obs", "diagonal")
#: patch rows kept per consumer input and calibration batch (random subset): bounds both the
#: im2col memory and the ``rows x in^2`` accumulation cost on large feature maps.
ROWS_PER_BATCH = 4096
DAMP = 0.01
#: precision of the dense OBS engine: float32 halves the inverse/downdate time of the big layers
#: (docs/obspa.md: resnet50 12.5 s vs 20.9 s) and agrees with float64 (tests/scoring/test_obs.py)
DTYPE = np.float32
_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "HardSwish": "hardswish", "HardSigmoid": "hardsigmoid",
                "Tanh": "tanh", "Identity": "none"}


def _quiet(msg):
    pass


@dataclass
class Consumer:
    """A node that reads channels through a constant weight, as OBS sees it."""
    node: str
    weight: str                # constant, used by this node only
    transposed: bool           # W [out, in] is the constant transposed (MatMul B, Gemm transB=0)
    bias: str | None           # constant bias of the output (None: no bias column)
    axis: tuple                # the sink axis (x, d) whose positions the columns follow
    taps: int                  # columns per position (Conv kh*kw, else 1)
    conv: tuple | None         # (kh, kw, strides, pads, dilations) for Conv, else None

    @property
    def key(self):
        """Consumers with equal keys read the same tensor the same way: one Hessian."""
        return (self.axis, self.conv)

    def matrix(self, value):
        v = np.asarray(value, np.float64)
        return v.T if self.transposed else v.reshape(v.shape[0], -1)

    def restore(self, W, like):
        return (W.T if self.transposed else W.reshape(like.shape)).astype(like.dtype)


# ------------------------------------------------------------------------------------------------
# consumers
# ------------------------------------------------------------------------------------------------

def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            if a.type == a.INTS:
                return list(a.ints)
            if a.type == a.FLOAT:
                return a.f
            if a.type == a.STRING:
                return a.s.decode()
            return a.i
    return default


def _conv_geometry(node, x_shape, y_shape, w_shape):
    if len(w_shape) != 4 or len(x_shape) != 4:
        return None
    kh, kw = int(w_shape[2]), int(w_shape[3])
    strides = [int(s) for s in _attr(node, "strides", [1, 1])]
    dil = [int(d) for d in _attr(node, "dilations", [1, 1])]
    pads = [int(p) for p in _attr(node, "pads", [0, 0, 0, 0])]
    auto = _attr(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i, k in enumerate((kh, kw)):
            total = max((y_shape[2 + i] - 1) * strides[i] + (k - 1) * dil[i] + 1 - x_shape[2 + i], 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    return (kh, kw, tuple(strides), tuple(pads), tuple(dil))


def _bias_after_matmul(node, consumers_of, consts, n_out):
    """The constant of the single Add that follows a MatMul on its last axis, if any."""
    nxt = consumers_of.get(node.output[0], [])
    if len(nxt) != 1 or nxt[0].op_type != "Add":
        return None
    add = nxt[0]
    other = [t for t in add.input if t != node.output[0]]
    if len(other) != 1 or other[0] not in consts:
        return None
    b = consts[other[0]]
    return other[0] if b.size == n_out and b.shape[-1] == n_out else None


def find_consumers(an):
    """``(consumers, skipped)``: the modelled consumers, and ``{node: why}`` for contract sinks that
    are not (grouped convs, activation x activation products, shared or odd weights)."""
    cm, shapes = an.channels, an.probe.shapes
    graph = an.model.graph
    nodes = {n.name: n for n in graph.node}
    uses, consumers_of = {}, {}
    for n in graph.node:
        for t in n.input:
            uses[t] = uses.get(t, 0) + 1
            consumers_of.setdefault(t, []).append(n)
    out, skipped = [], {}
    for axis, kind, node_name, index in cm.sinks:
        node = nodes.get(node_name)
        if kind != "contract" or node is None:
            continue
        op, why = node.op_type, None
        weight = node.input[1] if len(node.input) > 1 else ""
        if index != 0 or weight not in cm.consts:
            why = "no constant weight (activation x activation)"
        elif uses.get(weight, 0) != 1:
            why = "weight shared by several nodes"
        elif op == "Conv":
            w = cm.consts[weight]
            geom = _conv_geometry(node, shapes.get(node.input[0], ()), shapes.get(node.output[0], ()), w.shape)
            if int(_attr(node, "group", 1)) != 1:
                why = "grouped convolution (passes channels through)"
            elif geom is None:
                why = "only 2-D convolutions are modelled"
            else:
                bias = node.input[2] if len(node.input) > 2 and node.input[2] in cm.consts else None
                out.append(Consumer(node_name, weight, False, bias, axis, geom[0] * geom[1], geom))
        elif op == "Gemm":
            w = cm.consts[weight]
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                why = "Gemm with transA or alpha/beta != 1"
            else:
                tb = bool(_attr(node, "transB", 0))
                n_out = w.shape[0] if tb else w.shape[1]
                c = node.input[2] if len(node.input) > 2 and node.input[2] in cm.consts else None
                bias = c if c is not None and cm.consts[c].size == n_out and uses.get(c, 0) == 1 else None
                out.append(Consumer(node_name, weight, not tb, bias, axis, 1, None))
        elif op == "MatMul":
            w = cm.consts[weight]
            if w.ndim != 2:
                why = "MatMul with a batched weight"
            else:
                bias = _bias_after_matmul(node, consumers_of, cm.consts, w.shape[1])
                if bias is not None and uses.get(bias, 0) != 1:
                    bias = None
                out.append(Consumer(node_name, weight, True, bias, axis, 1, None))
        else:
            why = f"{op} is not modelled"
        if why:
            skipped[node_name] = why
    return out, skipped


def group_consumers(an, consumers):
    """``{group id: [(consumer, unit_of_position)]}``: ``unit_of_position[p]`` is the group-local
    unit index that owns input position ``p`` of the consumer, -1 where another group's channel
    (or a fixed one) sits."""
    cm = an.channels
    unit_group = np.full(cm.n_units, -1, np.int64)
    local = np.full(cm.n_units, -1, np.int64)
    for g in an.groups:
        if g.prunable:
            unit_group[g.units] = g.id
            local[g.units] = np.arange(len(g.units))
    out = {}
    for c in consumers:
        pos, units = axis_pairs(cm, c.axis)
        n_pos = cm.axis_index[c.axis][1]
        gids = unit_group[units]
        for gid in np.unique(gids[gids >= 0]):
            sel = gids == gid
            owner = np.full(n_pos, -1, np.int64)
            owner[pos[sel]] = local[units[sel]]
            out.setdefault(int(gid), []).append((c, owner))
    return out


# ------------------------------------------------------------------------------------------------
# Hessians
# ------------------------------------------------------------------------------------------------

def sample_patches(x, conv, rows, rng):
    """Up to ``rows`` random im2col rows ``[R, C*kh*kw]`` of an NCHW input for a Conv geometry
    (column order of ``W.reshape(Cout, -1)``), without forming the whole patch matrix."""
    kh, kw, (sh, sw), (pt, pl, pb, pr), (dh, dw) = conv
    N, C, Hh, Ww = x.shape
    if pt or pl or pb or pr:
        x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    OH = (Hh + pt + pb - dh * (kh - 1) - 1) // sh + 1
    OW = (Ww + pl + pr - dw * (kw - 1) - 1) // sw + 1
    total = N * OH * OW
    idx = np.arange(total) if total <= rows else np.sort(rng.choice(total, rows, replace=False))
    n, rem = np.divmod(idx, OH * OW)
    oh, ow = np.divmod(rem, OW)
    hh = oh[:, None] * sh + np.arange(kh) * dh
    ww = ow[:, None] * sw + np.arange(kw) * dw
    P = x[n[:, None, None], :, hh[:, :, None], ww[:, None, :]]        # [R, kh, kw, C]
    return np.ascontiguousarray(P.transpose(0, 3, 1, 2)).reshape(len(idx), C * kh * kw)


def _rows(x, c: Consumer, rows, rng):
    if c.conv is not None:
        return sample_patches(x, c.conv, rows, rng)
    d = c.axis[1]
    X = np.moveaxis(x, d, -1).reshape(-1, x.shape[d])
    if len(X) > rows:
        X = X[np.sort(rng.choice(len(X), rows, replace=False))]
    return X


def data_hessians(an, wanted, feeds, *, rows=ROWS_PER_BATCH, seed=0, source="synthetic", progress=_quiet):
    """``E[x x^T]`` and ``E[x]`` for every consumer in ``wanted`` ({key: consumer}) over ``feeds``."""
    hs = Hessians()
    if not wanted:
        return hs
    tensors = sorted({c.axis[0] for c in wanted.values()})
    runner, fetch = exposing_session(an, tensors)
    rng = np.random.default_rng(seed)
    S, s, n = {}, {}, {}
    step = stepper(progress, len(feeds), f"obspa: Hessians of {len(wanted)} consumer inputs from {source}, batch")
    for i, feed in enumerate(feeds):
        step(i)
        try:
            values = runner.run(feed, fetch)
        except Exception as exc:
            raise SpaError(f"obspa: onnxruntime cannot run the {source} batch ({probing.ort_reason(exc)})") from None
        values.update({k: v for k, v in feed.items() if k in tensors})
        for key, c in wanted.items():
            X = _rows(np.asarray(values[c.axis[0]], np.float32), c, rows, rng)
            if key not in S:
                S[key] = np.zeros((X.shape[1], X.shape[1]), np.float32)
                s[key] = np.zeros(X.shape[1])
                n[key] = 0
            S[key] += X.T @ X                 # float32 GEMM (syrk) and running sum (see calib._accumulate)
            s[key] += X.sum(0, dtype=np.float64)
            n[key] += len(X)
        del values
    for key in wanted:
        hs.H[key] = S.pop(key) / max(n[key], 1)
        hs.mean[key] = s[key] / max(n[key], 1)
        hs.source[key] = source
    return hs


def _bn_feeding(an, tensor, producer):
    """``(gamma, beta, activation)`` of a BatchNormalization (+ one activation) that makes ``tensor``."""
    consts = an.channels.consts
    node, act = producer.get(tensor), "none"
    if node is None:
        return None
    if node.op_type in _ACTIVATIONS or node.op_type == "Clip":
        if node.op_type == "Clip":
            lo = consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            hi = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            lo, hi = (None if v is None else float(v) for v in (lo, hi))
            if lo != 0.0 or hi not in (6.0, None):
                return None
            act = "relu" if hi is None else "relu6"
        else:
            act = _ACTIVATIONS[node.op_type]
        node = producer.get(node.input[0])
    elif node.op_type == "Mul" and len(node.input) == 2:        # x * sigmoid(x): SiLU / swish
        a, b = node.input
        for x, sig in ((a, b), (b, a)):
            p = producer.get(sig)
            if p is not None and p.op_type == "Sigmoid" and p.input[0] == x:
                node, act = producer.get(x), "silu"
                break
        else:
            return None
    if node is None or node.op_type != "BatchNormalization":
        return None
    gamma, beta = consts.get(node.input[1]), consts.get(node.input[2])
    if gamma is None or beta is None:
        return None
    return gamma, beta, act


def moment_axes(an, allocate: str = "global") -> list:
    """The input axes of every modelled consumer whose Hessian is the plain second moment of one
    tensor (Gemm, MatMul; a Conv's is over patches) and that an OBS compensation under ``allocate``
    will use (not those of the groups it keeps whole: ``kept_whole``): what ``calib.collect`` can
    gather in the pass that makes a calibrated criterion's statistics (``hessians(..., stats=)``)."""
    whole = kept_whole(an, allocate)
    used = [c for gid, items in group_consumers(an, find_consumers(an)[0]).items() if gid not in whole
            for c, _ in items]
    return list(dict.fromkeys(c.axis for c in used if c.conv is None))


def kept_whole(an, allocate: str) -> set:
    """Ids of the groups OBS neither scores nor compensates: under a uniform allocation the
    approximate groups, which that allocation keeps whole (a decoder's residual width: every
    q/k/v/gate/up weight of every layer, 1.1 GB of float64 on SmolLM2-135M)."""
    return {g.id for g in an.groups if g.approximate} if allocate in ("uniform", "stacks") else set()


def hessians(an, consumers, source="auto", calib=None, *, n_batches=8, batch_size=None, seed=0,
             progress=_quiet, synthetic_kind="auto", stats=None) -> Hessians:
    """The Hessian of every consumer input in ``consumers`` from ``source`` (see module doc).
    ``stats``: calibration statistics gathered on the very feeds this would run (the same ``calib``,
    batches and seed) with ``moments``; the Hessians found there are taken instead of a second pass.

    ``bn`` uses the BN feeding each consumer and falls back to ``synthetic`` (or ``calib``) for
    the others; ``auto`` is ``bn`` without calibration data (the data-free combination that measured
    best, docs/obspa.md) and the calibration data everywhere with it.  The source of each is recorded.
    """
    if source not in HESSIANS:
        raise SpaError(f"unknown Hessian source {source!r}; choose one of {', '.join(HESSIANS)}")
    wanted = {}
    for c in consumers:
        wanted.setdefault(c.key, c)
    hs = Hessians()
    if source == "identity":
        for key, c in wanted.items():
            n = an.channels.axis_index[c.axis][1] * c.taps
            hs.H[key], hs.mean[key], hs.source[key] = np.eye(n), np.zeros(n), "identity"
        hs.desc = "identity"
        return hs
    synthetic = calib is None or str(calib) in ("random", "synthetic")
    if source == "auto":
        source = "bn" if synthetic else "synthetic"
    if source == "bn":
        producer = {o: n for n in an.model.graph.node for o in n.output}
        for key, c in list(wanted.items()):
            got = _bn_feeding(an, c.axis[0], producer)
            if got is None or c.axis[1] != 1:        # BN normalises axis 1
                continue
            gamma, beta, act = got
            kh, kw = (c.conv[0], c.conv[1]) if c.conv else (1, 1)
            H = hessian_from_bn(gamma, beta, activation=act, kh=kh, kw=kw, structured=False)
            hs.H[key], hs.mean[key], hs.source[key] = H, np.repeat(bn_moments(gamma, beta, act)[0], kh * kw), "bn"
            del wanted[key]
    data = "synthetic" if synthetic else "calibration"
    shared = {key: c for key, c in wanted.items() if stats is not None and c.conv is None and c.axis in stats.moments}
    for key, c in shared.items():     # taken over, not copied (805 MB of float64 on SmolLM2-135M)
        H, mean = stats.moments.pop(c.axis)
        hs.H[key], hs.mean[key], hs.source[key] = H, mean, data
        if synthetic:
            hs.shrink(key)
        del wanted[key]
    if shared:
        hs.desc = stats.source
    if wanted:
        if synthetic:
            desc, feeds = synthetic_inputs.feeds(an, n_batches, seed, wanted=synthetic_kind, progress=progress)
        else:
            desc, feeds = calib_mod.batches(an, calib, n_batches=n_batches, batch_size=batch_size, seed=seed)
        got = data_hessians(an, wanted, feeds, seed=seed, source=data, progress=progress)
        hs.H.update(got.H)
        hs.mean.update(got.mean)
        hs.source.update(got.source)
        if synthetic:
            for key in got.H:
                hs.shrink(key)
        hs.desc = desc if source != "bn" else f"bn, else {desc}"
    elif not shared:
        hs.desc = "bn"
    return hs


# ------------------------------------------------------------------------------------------------
# one group's OBS problem
# ------------------------------------------------------------------------------------------------

def problem(c: Consumer, owner, n_units, weights, gone, hs):
    """``(W, H, block, n_fixed, layout)`` for obs_group, or None when the positions do not split
    evenly into the group's units.  ``layout`` maps the problem's columns back to the weight's."""
    dead = gone.get(c.weight)
    if dead is not None:                  # positions an earlier group removed take no part
        owner = np.where(dead, -2, owner)
    counts = np.bincount(owner[owner >= 0], minlength=n_units)
    per = np.unique(counts[counts > 0])
    if len(per) != 1:
        return None
    m, taps = int(per[0]), c.taps
    block = m * taps
    order = np.argsort(owner, kind="stable")
    own = order[owner[order] >= 0]                                    # positions, unit by unit
    fixed = np.flatnonzero(owner == -1)
    expand = lambda p: (p[:, None] * taps + np.arange(taps)).ravel()  # noqa: E731  positions -> columns
    # column of the weight for every problem column; -1 for the padding of units this consumer
    # does not read (they cost nothing here and take no compensation: zero weight, unit H block)
    cols = np.full(n_units * block, -1, np.int64)
    seen = np.flatnonzero(counts > 0)
    cols[(seen[:, None] * block + np.arange(block)).ravel()] = expand(own)
    cols = np.concatenate([cols, expand(fixed)])
    W0 = c.matrix(weights[c.weight])
    H0, mean0 = hs.H[c.key], hs.mean[c.key]
    safe = np.where(cols >= 0, cols, 0)
    W = W0[:, safe]
    release_pages([weights[c.weight]])   # W is a copy: the original's memory-mapped pages can go
    H = np.asarray(H0[np.ix_(safe, safe)], np.float64)
    mean = mean0[safe].astype(np.float64)
    pad = cols < 0
    if pad.any():
        W[:, pad] = 0.0
        H[pad, :] = 0.0
        H[:, pad] = 0.0
        diag = np.diag(H0)
        H[pad, pad] = float(diag.mean()) if diag.size and diag.mean() > 0 else 1.0
        mean[pad] = 0.0
    n_fixed = len(cols) - n_units * block
    bias = None
    if c.bias is not None:
        bias = np.asarray(weights[c.bias], np.float64).reshape(-1)
        W, H = with_bias(W, H, mean, bias)
        n_fixed += 1
    return W, H, block, n_fixed, cols


def _write_back(c: Consumer, W_new, cols, owner, removed_local, weights, gone):
    W_full = c.matrix(weights[c.weight]).copy()
    release_pages([weights[c.weight]])
    if c.bias is not None:
        W_new, b = split_bias(W_new)
        weights[c.bias] = b.reshape(weights[c.bias].shape).astype(weights[c.bias].dtype)
    real = cols >= 0
    W_full[:, cols[real]] = W_new[:, real]
    weights[c.weight] = c.restore(W_full, weights[c.weight])
    dead = gone.setdefault(c.weight, np.zeros(len(owner), bool))
    dead |= np.isin(owner, removed_local)


@dataclass
class GroupResult:
    removed: np.ndarray            # group-local unit indices, in removal order
    cost: float
    how: list
    sources: list
    first_costs: np.ndarray


def group_scores(an, per_group, hs, damp=DAMP, progress=_quiet):
    """Single-removal OBS costs of every unit of each modelled group (higher = keep), original
    weights; ``{group id: scores}``."""
    out = {}
    weights, gone = an.channels.consts, {}
    todo = [g for g in an.groups if g.prunable and per_group.get(g.id)]
    tick = stepper(progress, len(todo), "obspa: single-removal costs, group")
    for i, g in enumerate(todo):
        items = per_group[g.id]
        tick(i, f"{g.channels} channels")
        probs = [p for p in (problem(c, owner, len(g.units), weights, gone, hs) for c, owner in items) if p]
        if probs:
            out[g.id] = obs_scores([p[:4] for p in probs], damp=damp, dtype=DTYPE)
    return out


def diagonal_scores(an, per_group, hs, progress=_quiet):
    """Per-unit cost of removing each unit alone, uncompensated, under the diagonal of each consumer's
    Hessian (Optimal Brain Damage; higher = keep): ``sum over consumers and the unit's columns of
    ||W[:, col]||^2 E[x_col^2]``; ``{group id: scores}``.  The ridge of a synthetic Hessian is left out
    (it would add plain magnitude) and so is a bias column (never removed)."""
    out = {}
    weights = an.channels.consts
    todo = [g for g in an.groups if g.prunable and per_group.get(g.id)]
    tick = stepper(progress, len(todo), "obspa: diagonal costs, group")
    for i, g in enumerate(todo):
        tick(i, f"{g.channels} channels")
        n, total, seen = len(g.units), np.zeros(len(g.units)), False
        for c, owner in per_group[g.id]:
            p = problem(c, owner, n, weights, {}, hs)
            if p is None:
                continue
            W, block, cols = p[0], p[2], p[4][:n * p[2]]
            ex2 = np.where(cols >= 0, hs.second_moments(c.key)[np.maximum(cols, 0)], 0.0)
            total += ((W[:, :n * block] ** 2).sum(0) * np.maximum(ex2, 0.0)).reshape(n, block).sum(1)
            seen = True
        if seen:
            out[g.id] = total
    return out


def prune_groups(an, per_group, hs, counts, *, damp=DAMP, progress=_quiet, chosen=None):
    """Greedy OBS removal of ``counts[gid]`` channels per group, graph order, with compensation;
    with ``chosen`` ({gid: group-local unit ids}) exactly those units go and only the kept weights
    are compensated.

    Returns ``(results {gid: GroupResult}, new weight values {name: array})``.
    """
    weights = dict(an.channels.consts)
    gone, results = {}, {}
    todo = [g for g in an.groups if counts.get(g.id, 0) > 0 and per_group.get(g.id)]
    step = stepper(progress, len(todo), "obs: group")
    for i, g in enumerate(todo):
        items = per_group[g.id]
        step(i, f"id {g.id}, removing {counts[g.id]} of {g.channels} channels")
        probs, used = [], []
        for c, owner in items:
            p = problem(c, owner, len(g.units), weights, gone, hs)
            if p is not None:
                probs.append(p)
                used.append((c, owner))
        if not probs:
            continue
        removed, W_news, info = obs_group([p[:4] for p in probs], int(counts[g.id]), damp=damp, dtype=DTYPE,
                                          return_info=True, chosen=None if chosen is None else chosen[g.id])
        for (c, owner), p, W_new in zip(used, probs, W_news):
            _write_back(c, W_new, p[4], owner, removed, weights, gone)
        results[g.id] = GroupResult(removed, info["cost"], info["how"], sorted({hs.source[c.key] for c, _ in used}),
                                    info.get("first_costs", np.zeros(0)))
        del probs, removed, W_news
        trim_heap()   # a group's float64 problems (19 MB each for SmolLM2's down_proj) stay in malloc's heaps
    changed = {k: v for k, v in weights.items() if v is not an.channels.consts.get(k)}
    return results, changed
