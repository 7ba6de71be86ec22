"""Latency as a target (``--target latency=F``) and the device's widths (``--round-to auto``):
the operator table and its cache, the curves of the latency model, the measured correction loop,
and kept counts that honour the kernels' alignment."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import spa
from spa.errors import SpaError
from spa.planning import latency
from spa.planning.latency import LatencyModel, kept_multiples, multiples
from spa.planning.plan import CostModel, all_units, plan
from spa.runtime.latency import LatencyTable, OpSpec, kernel_alignment
from spa.verify.check import compare
from spa.verify.report import render
from tests.graphs import G


def conv_net(width=64, hw=24, blocks=2):
    """Conv stacks wide enough that alignment matters (64 channels: four blocks of 16)."""
    g = G(seed=3)
    x = g.conv("x", 3, width)
    for _ in range(blocks):
        y = g.conv(x, width, 2 * width)
        x = g.conv(y, 2 * width, width)
    p = g.op("GlobalAveragePool", [x])
    out = g.op("Gemm", [g.op("Flatten", [p]), g.w(10, width), g.w(10)], transB=1)
    return g.model([("x", [1, 3, hw, hw])], [out])


@pytest.fixture(autouse=True)
def latency_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPA_LATENCY_CACHE", str(tmp_path / "latency"))
    return tmp_path / "latency"


def test_multiples_align_every_conv_width_and_leave_narrow_groups_alone():
    an = spa.analyze(conv_net())
    got = multiples(an, 16)
    widths = {g.id: g.channels for g in an.groups if g.prunable}
    assert got and set(got.values()) == {16} and set(widths[gid] for gid in got) == {64, 128}
    assert {widths[gid]: k for gid, k in multiples(an, 64).items()} == {64: 16, 128: 32}   # blocks halved to fit
    narrow = spa.analyze(conv_net(width=32))
    width = {g.id: g.channels for g in narrow.groups}
    assert {width[gid]: k for gid, k in multiples(narrow, 16).items()} == {32: 8, 64: 16}   # 16s would keep all 32


def test_auto_round_to_keeps_aligned_counts_and_says_so():
    model = conv_net()
    alignment, _ = kernel_alignment("cpu")
    res = spa.prune(model, 0.3)
    assert res.report["round_to"] == "auto" and res.report["widths"]["alignment"] == alignment
    kept = [g["kept"] for g in res.report["groups"] if g["removed"]]
    assert kept and all(k % alignment == 0 for k in kept)
    exact = spa.prune(model, 0.3, round_to=1)
    assert any(g["kept"] % alignment for g in exact.report["groups"] if g["removed"])   # 0.7 x 64 = 44.8: 45


def test_round_to_rejects_words_other_than_auto():
    with pytest.raises(SpaError, match="--round-to must be auto"):
        spa.prune(conv_net(), 0.3, round_to="fast")


def test_table_measures_once_and_the_cache_answers_a_second_table(latency_cache):
    spec = OpSpec("Conv", (("pads", (1, 1, 1, 1)),), (((1, 16, 12, 12), 1, False), ((32, 16, 3, 3), 1, True)))
    first = LatencyTable("cpu", threads=1)
    (ms,) = first.times([spec])
    assert ms > 0 and first.measured == 1 and first.reused == 0
    first.save()
    second = LatencyTable("cpu", threads=1)
    assert second.times([spec]) == [ms] and second.measured == 0 and second.reused == 1
    other = LatencyTable("cpu", threads=2)     # another thread count is another machine key
    assert other.ms == {}
    second.path.write_text("{not json")
    assert LatencyTable("cpu", threads=1).ms == {}     # a damaged cache is measured again


def test_latency_model_predicts_less_time_for_fewer_channels():
    an = spa.analyze(conv_net())
    table = LatencyTable("cpu", threads=1)
    model = LatencyModel(an, table, 16)
    assert model.timed >= 5 and model.base["latency"] > 0
    assert table.measured > 0 and table.path.is_file()
    group = max((g for g in an.groups if g.prunable), key=lambda g: g.macs)
    half = model.estimate(group.units[: group.channels // 2])["latency"]
    assert half < model.base["latency"]
    assert model.estimate([])["latency"] == model.base["latency"]
    weights = model.rank_weights([g for g in an.groups if g.prunable], "latency", 16)
    assert weights and all(w > 0 for w in weights.values())
    assert CostModel(an).rank_weights(an.groups, "macs", 1) == {}
    again = LatencyTable("cpu", threads=1)
    LatencyModel(an, again, 16)
    assert again.measured == 0 and again.reused > 0      # the second prune of the architecture times nothing


def test_reach_corrects_the_goal_by_the_measured_miss():
    calls = []

    def attempt(goal):
        calls.append(goal)
        return goal

    def measure(goal):        # the prediction is 25% optimistic
        return {"original_ms": 10.0, "pruned_ms": 10.0 / (0.8 * goal), "speedup": 0.8 * goal}

    best, rounds, i = latency.reach(2.0, attempt, measure)
    assert calls[0] == 2.0 and abs(calls[1] - 2.5) < 1e-9
    assert len(rounds) == 2 and i == 1 and abs(rounds[i]["speedup"] - 2.0) < 1e-9 and best == calls[1]


def test_reach_keeps_the_closest_round_when_none_is_close_enough():
    seq = iter([1.2, 3.0, 1.3, 2.6])
    best, rounds, i = latency.reach(2.0, lambda goal: goal, lambda c: {"original_ms": 1, "pruned_ms": 1,
                                                                          "speedup": next(seq)})
    assert len(rounds) == latency.TRIES
    errors = [abs(np.log(r["speedup"] / 2.0)) for r in rounds]
    assert i == int(np.argmin(errors))


def test_target_latency_prunes_times_and_reports_every_round(tmp_path):
    model = conv_net(hw=32)
    res = spa.prune(model, target="latency=1.5", threads=1)
    rep = res.report
    lat = rep["plan"]["latency"]
    assert rep["target"] == "latency=1.5" and 1 <= len(lat["rounds"]) <= latency.TRIES
    assert rep["plan"]["allocation_chosen"].startswith("sensitivity")    # auto: drift per millisecond
    assert rep["target_reached"] == lat["measured_speedup"] == lat["rounds"][lat["chosen_round"] - 1]["speedup"]
    assert lat["table"]["measured"] > 0 and lat["model"]["timed_operators"] >= 5
    assert rep["after"]["macs"] < rep["before"]["macs"]
    json.dumps(rep)                                    # the report stays JSON
    curves = lat["groups"]
    assert curves and all(pts[-1][1] >= pts[0][1] for pts in curves.values())   # more channels, no less time
    html = render(rep)
    assert "Latency target" in html and html.count("<polyline") >= min(len(curves), 6)
    out, dense = tmp_path / "small.onnx", tmp_path / "dense.onnx"
    res.save(out)
    onnx.save(model, dense)
    chk = compare(str(dense), str(out))
    assert chk["signature"]["ok"] and all(o["cosine"] is not None for o in chk["outputs"])


def test_latency_target_refuses_steps_and_factors_below_one():
    with pytest.raises(SpaError, match="latency=F times one pruned model"):
        spa.prune(conv_net(), target="latency=2", steps=2)
    with pytest.raises(SpaError, match="--target"):
        spa.prune(conv_net(), target="latency=0.5")


def test_kept_multiples_passes_numbers_through():
    an = spa.analyze(conv_net())
    assert kept_multiples(an, 8) == (8, {"round_to": 8})
    found, info = kept_multiples(an, "auto")
    assert info["groups_rounded"] == len(found) > 0
    removal = plan(an.groups, np.arange(an.channels.n_units, dtype=float), 0.3, round_to=found)
    assert all((g.channels - len(removal.get(g.id, ()))) % found.get(g.id, 1) == 0 for g in an.groups if g.prunable)
    assert len(all_units(removal))
