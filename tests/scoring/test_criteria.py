"""Each criterion ranks as it must on constructed cases; calibration data in and out."""
import numpy as np
import pytest

import spa
from graphs import G, residual_chain
from spa.runtime import calib
from spa.errors import SpaError
from spa.scoring import CRITERIA, score

MAGNITUDE = ("l1", "l2", "lamp")
ACTIVATION = ("act_mean", "wanda", "flap")
REDUCTIONS = ("sum", "mean", "max")


def _prunable(report):
    return [g for g in report["groups"] if g["prunable"]]


def zero_channel_model(zero=2, bn=False):
    """x -> Conv(3->6) [filter `zero` and its bias are 0] (-> BN) -> Relu -> Conv(6->4)."""
    g = G(seed=3)
    w = g.rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    b = g.rng.standard_normal(6).astype(np.float32) * 0.1
    w2 = g.rng.standard_normal((4, 6, 1, 1)).astype(np.float32)
    w[zero], b[zero], w2[:, zero] = 0, 0, 0
    y = g.op("Conv", ["x", g.w(value=w), g.w(value=b)], pads=[1] * 4)
    if bn:
        gamma = np.abs(g.rng.standard_normal(6)).astype(np.float32) + 0.5
        gamma[zero] = 0
        y = g.op("BatchNormalization", [y, g.w(value=gamma), g.w(6), g.w(6), g.w(6, positive=True)])
    y = g.op("Relu", [y])
    out = g.op("Conv", [y, g.w(value=w2)])
    return g.model([("x", [1, 3, 6, 6])], [out])


def activation_zero_model(zero=1):
    """The zero filter's consumer columns are *not* zero: only its activations are."""
    g = G(seed=4)
    w = g.rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    b = np.abs(g.rng.standard_normal(5)).astype(np.float32) * 0.1
    w[zero], b[zero] = 0, 0
    y = g.op("Relu", [g.op("Conv", ["x", g.w(value=w), g.w(value=b)], pads=[1] * 4)])
    h = g.op("Relu", [g.op("Conv", [y, g.w(7, 5, 1, 1)])])
    out = g.op("Conv", [h, g.w(2, 7, 1, 1)])
    return g.model([("x", [1, 3, 6, 6])], [out])


def test_registry_names_and_signature():
    assert set(CRITERIA) == {"l1", "l2", "random", "bn_scale", "fpgm", "lamp", "act_mean", "wanda", "flap", "obspa",
                             "taylor", "snip", "fisher"}
    an = spa.analyze(residual_chain())
    grads = {k: np.ones(v.shape, np.float32) for k, v in an.weights.items() if v.dtype == np.float32}
    for name, scorer in CRITERIA.items():
        stats = calib.gather(an, "random", n_batches=2) if scorer.needs_calib else None
        got = scorer.fn(an, stats, "sum", **({"grads": grads} if scorer.needs_grads else {}))
        raw = got[0] if isinstance(got, tuple) else got
        assert raw.shape == (an.channels.n_units,), name


@pytest.mark.parametrize("criterion", MAGNITUDE)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_weight_channel_ranks_last(criterion, reduction):
    r = spa.prune(zero_channel_model(), 0.2, criterion=criterion, reduction=reduction)
    grp = _prunable(r.report)[0]
    assert grp["removed_channels"] == [2]
    assert r.report["reduction"] == reduction and grp["reduction"] == reduction
    assert r.report["normalisation"] == ("none" if criterion == "lamp" else "mean")


def test_bn_scale_ranks_zero_gamma_last_and_falls_back_without_bn():
    g = G(seed=5)
    w = g.rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    gamma = np.ones(6, np.float32)
    gamma[4] = 0.01
    y = g.op("Conv", ["x", g.w(value=w)], pads=[1] * 4)
    y = g.op("Relu", [g.op("BatchNormalization", [y, g.w(value=gamma), g.w(6), g.w(6), g.w(6, positive=True)])])
    out = g.op("Conv", [y, g.w(4, 6, 1, 1)])
    r = spa.prune(g.model([("x", [1, 3, 6, 6])], [out]), 0.2, criterion="bn_scale")
    assert _prunable(r.report)[0]["removed_channels"] == [4]
    assert "fallbacks" not in r.report
    r = spa.prune(zero_channel_model(), 0.2, criterion="bn_scale")
    grp = _prunable(r.report)[0]
    assert grp["removed_channels"] == [2]                 # l2 fallback
    assert "BatchNormalization" in grp["fallback"] and r.report["fallbacks"]


def test_bn_scale_with_bn():
    r = spa.prune(zero_channel_model(bn=True), 0.2, criterion="bn_scale")
    assert _prunable(r.report)[0]["removed_channels"] == [2]


@pytest.mark.parametrize("criterion", ACTIVATION)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dead_activation_ranks_last(criterion, reduction):
    r = spa.prune(activation_zero_model(), 0.2, criterion=criterion, reduction=reduction, calib="random")
    grp = next(g for g in _prunable(r.report) if g["channels"] == 5)
    assert grp["removed_channels"] == [1]
    assert r.report["calibration"]["batches"] == 8


def test_activation_criteria_need_calibration():
    with pytest.raises(SpaError, match="calib"):
        spa.prune(activation_zero_model(), 0.2, criterion="wanda")


def test_calibration_from_npz_and_npy(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    np.save(tmp_path / "c.npy", x)
    for path in ("c.npz", "c.npy"):
        r = spa.prune(activation_zero_model(), 0.2, criterion="wanda", calib=str(tmp_path / path))
        assert r.report["calibration"]["samples"] == 5
        assert next(g for g in _prunable(r.report) if g["channels"] == 5)["removed_channels"] == [1]
    np.savez(tmp_path / "bad.npz", y=x)
    with pytest.raises(SpaError, match="lacks input"):
        spa.prune(activation_zero_model(), 0.2, criterion="act_mean", calib=str(tmp_path / "bad.npz"))
    np.save(tmp_path / "shape.npy", x[:, :, :4])
    with pytest.raises(SpaError, match="input-shapes"):
        spa.prune(activation_zero_model(), 0.2, criterion="act_mean", calib=str(tmp_path / "shape.npy"))


def test_running_statistics_match_numpy():
    an = spa.analyze(activation_zero_model())
    _, feeds = calib.batches(an, "random", n_batches=3)
    stats = calib.collect(an, feeds)
    from spa.runtime.probing import run_all
    axis = next(ax for ax in stats.axes if stats.axes[ax].sum.shape == (5,))
    acts = np.concatenate([np.moveaxis(run_all(an.model, f, an.weights)[axis[0]], axis[1], -1).reshape(-1, 5) for f in feeds])
    st = stats.axes[axis]
    np.testing.assert_allclose(st.mean_abs, np.abs(acts).mean(0), rtol=1e-6)
    np.testing.assert_allclose(st.var, acts.var(0), rtol=1e-5, atol=1e-9)


def test_fpgm_removes_a_duplicated_filter_first():
    g = G(seed=7)
    x = g.conv("x", 3, 16, k=1)
    w = g.rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    w[1] = w[5]
    y = g.op("Relu", [g.op("Conv", [x, g.w(value=w)], pads=[1] * 4)])
    out = g.op("Conv", [y, g.w(4, 8, 1, 1)])
    an = spa.analyze(g.model([("x", [1, 3, 6, 6])], [out]))
    s = score(an, "fpgm")
    grp = next(gr for gr in an.groups if gr.prunable and gr.channels == 8)
    lowest = set(np.argsort(s.raw[grp.units])[:2].tolist())
    assert lowest == {1, 5}
    r = spa.prune(an.model, 0.125, criterion="fpgm", analysis=an)
    assert next(e for e in r.report["groups"] if e["id"] == grp.id)["removed_channels"][0] in (1, 5)


def test_random_is_seeded():
    an = spa.analyze(residual_chain())
    a, b, c = (score(an, "random", seed=s).raw for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bad_reduction_and_normalisation():
    with pytest.raises(SpaError, match="reduction"):
        spa.prune(residual_chain(), 0.2, reduction="median")
    with pytest.raises(SpaError, match="normalisation"):
        spa.prune(residual_chain(), 0.2, normalisation="zscore")
