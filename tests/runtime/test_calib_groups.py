"""Calibration under a memory budget (issue 23): the exposed tensors split into groups, one
onnxruntime session each, give the very statistics of the one-pass collection."""
from __future__ import annotations

import numpy as np

import spa
from graphs import attention, residual_chain
from spa.runtime import calib
from spa.scoring import obspa


def _feeds(an, n=3, seed=3):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in an.probe.inputs.items()} for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(a[k], b[k]):
            np.testing.assert_array_equal(x, y)


def test_split_collection_equals_one_pass():
    """A budget of one byte puts every tensor in a group of its own: sums and second moments are
    bit-for-bit those of one session exposing them all (each axis sees the same batches in order)."""
    for m in (attention(n=6, d=32, heads=4), residual_chain()):
        an = spa.analyze(m)
        feeds, moments = _feeds(an), obspa.moment_axes(an)
        tensors = {ax[0] for ax in calib.sink_axes(an)} | {ax[0] for ax in moments}
        assert len(calib.exposure_groups(an, tensors, feeds[0], budget=1)) > 1
        one = calib.collect(an, feeds, moments=moments, budget=float("inf"))
        split = calib.collect(an, feeds, moments=moments, budget=1)
        assert one.axes and one.samples == split.samples and one.batches == split.batches
        _same({k: (v.n, v.abs_sum, v.sum, v.sq_sum) for k, v in one.axes.items()},
              {k: (v.n, v.abs_sum, v.sum, v.sq_sum) for k, v in split.axes.items()})
        _same(one.moments, split.moments)


def test_exposure_groups_follow_the_graph_under_the_budget():
    """Groups keep graph order, cover every tensor once, and stay under the budget unless a single
    tensor is larger; the session of a group exposes its tensors and not the graph's outputs."""
    an = spa.analyze(attention(n=6, d=32, heads=4))
    feed = _feeds(an, 1)[0]
    tensors = sorted({ax[0] for ax in calib.sink_axes(an)})
    order = [o for node in an.model.graph.node for o in node.output]
    size = {t: np.prod(an.probe.shapes[t]) * 4 for t in tensors}
    budget = 2 * max(size.values())
    groups = calib.exposure_groups(an, tensors, feed, budget=budget)
    flat = [t for g in groups for t in g]
    assert sorted(flat) == tensors and flat == sorted(flat, key=order.index)
    assert all(len(g) == 1 or sum(size[t] for t in g) <= budget for g in groups)
    runner, fetch = calib.exposing_session(an, groups[0])
    assert fetch == groups[0] and set(runner.outputs) == set(groups[0])
