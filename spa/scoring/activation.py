"""Criteria that need activation statistics (``spa.runtime.calib``): act_mean, wanda, flap.

Statistics are kept per sink axis (a tensor where a channel is consumed).  A channel's score
reduces its per-sink values with the chosen reduction:

* ``act_mean``: mean |x| of the channel's activation at each sink.
* ``wanda``: at each consumer with a weight, RMS of the input channel times the sum of |W| over
  the consumer columns it feeds (Wanda's |W| * ||X||, summed over the channel's weights).
* ``flap``: at each consumer, variance of the input channel times the squared norm of the
  consumer columns (FLAP's fluctuation metric).
"""
from __future__ import annotations

import numpy as np

from ..errors import SpaError
from ..io.weights import RELEASE_ABOVE, release_pages
from .magnitude import SliceAccumulator
from .structure import fallback


def _need(stats, name):
    if stats is None:
        raise SpaError(f"criterion {name!r} needs calibration data: pass --calib FILE.npz or --calib random")


def act_mean_scores(an, stats=None, reduction="sum", **_):
    _need(stats, "act_mean")
    acc = SliceAccumulator(an.channels)
    for axis, st in stats.axes.items():
        acc.add(axis, st.mean_abs)
    raw = acc.reduce(reduction)
    return raw, fallback(an, raw, acc.covered(), reduction, "no calibrated activation")


def _abs_power(cm, name, power) -> np.ndarray:
    """``|W| ** power`` of weight ``name`` in float64; a weight read from the file's memory map hands
    its pages back after (``spa.io.weights``), so scoring every consumer does not hold the model."""
    value = cm.consts[name]
    w = np.abs(value.astype(np.float64)) ** power
    if value.nbytes > RELEASE_ABOVE:
        release_pages([value])
    return w


def consumer_columns(an, node, index, power):
    """Per input channel of sink ``(node, index)``: sum over the consumer's weight column of |W|^power.

    None when the other operand is not a weight (activation x activation).
    """
    cm = an.channels
    op = node.op_type
    if op in ("Conv",) and index == 0:
        if len(node.input) < 2 or node.input[1] not in cm.consts:
            return None
        w = _abs_power(cm, node.input[1], power)
        g = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
        co, cig = w.shape[0], w.shape[1]
        a = w.reshape(co, cig, -1).sum(2)                       # [Co, Ci/G]
        return a.reshape(g, co // g, cig).sum(1).reshape(-1)     # input channel c = (group, i)
    if op == "Gemm" and index == 0:
        if node.input[1] not in cm.consts:
            return None
        w = _abs_power(cm, node.input[1], power)
        tb = any(a.name == "transB" and a.i for a in node.attribute)
        return w.sum(0) if tb else w.sum(1)
    if op == "MatMul":
        other = node.input[1 - index]
        if other not in cm.consts:
            return None
        w = _abs_power(cm, other, power)
        if w.ndim < 2:
            return None
        k = w.ndim - 2 if index == 0 else w.ndim - 1
        return np.moveaxis(w, k, -1).reshape(-1, w.shape[k]).sum(0)
    return None


def _weighted(an, stats, reduction, name, act, power):
    _need(stats, name)
    cm = an.channels
    nodes = {n.name: n for n in an.model.graph.node}
    acc = SliceAccumulator(cm)
    for axis, kind, node_name, index in cm.sinks:
        st = stats.get(axis)
        node = nodes.get(node_name)
        if st is None or node is None or kind != "contract":
            continue
        col = consumer_columns(an, node, index, power)
        if col is None or len(col) != len(st.sum):
            continue
        acc.add(axis, act(st) * col)
    raw = acc.reduce(reduction)
    return raw, fallback(an, raw, acc.covered(), reduction, "no weighted consumer with calibrated input")


def wanda_scores(an, stats=None, reduction="sum", **_):
    return _weighted(an, stats, reduction, "wanda", lambda st: st.rms, 1)


def flap_scores(an, stats=None, reduction="sum", **_):
    return _weighted(an, stats, reduction, "flap", lambda st: st.var, 2)
