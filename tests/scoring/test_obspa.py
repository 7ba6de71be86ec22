"""--criterion obspa end to end: OBS selection, compensation written into the model, Hessian sources."""
import numpy as np
import pytest

import spa
from graphs import PATTERNS, G, attention
from spa import io
from spa.runtime import probing
from spa.verify.oracle import compare_outputs
from spa.scoring import hessians, obspa
from spa.scoring.hessians import conv_patches


def _feed(model, seed=7, n=None):
    proto = io.load_model(model)
    feed = probing.input_feed(proto, seed=seed)
    return {k: np.random.default_rng(seed).standard_normal(v.shape).astype(v.dtype) for k, v in feed.items()}


def redundant_model():
    """Conv(3->6) without activation whose filter 5 is 2*f0 - f1 (so y5 = 2 y0 - y1 exactly), read by
    a 3x3 Conv with a bias.  Removing channel 5 (or 0 or 1) can be fully compensated."""
    g = G(seed=11)
    w = g.rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    b = g.rng.standard_normal(6).astype(np.float32)
    w[5], b[5] = 2 * w[0] - w[1], 2 * b[0] - b[1]
    y = g.op("Conv", ["x", g.w(value=w), g.w(value=b)], pads=[1] * 4)
    out = g.op("Conv", [y, g.w(4, 6, 3, 3), g.w(4)], pads=[1] * 4)
    return g.model([("x", [2, 3, 8, 8])], [out])


def test_redundant_channel_removed_and_compensated(tmp_path):
    """With measured data (a calibration file) the compensation is exact up to the damping."""
    m = redundant_model()
    feed = _feed(m)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32))
    obs = spa.prune(m, 0.17, criterion="obspa", calib=str(calib))
    l2 = spa.prune(m, 0.17, criterion="l2")
    grp = next(g for g in obs.report["groups"] if g["removed"])
    assert grp["removed"] == 1 and grp["removed_channels"][0] in (0, 1, 5)
    assert grp["obspa"]["hessian"] == ["calibration"]
    err_obs, err_l2 = compare_outputs(m, obs.model, feed), compare_outputs(m, l2.model, feed)
    assert err_obs < 1e-2, err_obs          # exact up to the damping of H
    assert err_l2 > 20 * err_obs


@pytest.mark.parametrize("name", ["residual_chain", "concat_split", "flatten_gemm", "squeeze_excitation",
                                  "transformer_block"])
def test_compensation_beats_dropping(name, tmp_path):
    """On inputs like those H came from (calibration samples of the same distribution), OBS (choice
    + compensation) is closer to the dense model than the same plan's counts chosen by L2."""
    m = PATTERNS[name]()
    feed = _feed(m, seed=123)
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "calib.npz", **{k: rng.standard_normal((64,) + v.shape[1:]).astype(v.dtype)
                                       for k, v in feed.items()})
    obs = spa.prune(m, 0.3, criterion="obspa", calib=str(tmp_path / "calib.npz"), calib_batch_size=8)
    l2 = spa.prune(m, 0.3, criterion="l2")
    assert obs.report["after"]["params"] == l2.report["after"]["params"]
    assert compare_outputs(m, obs.model, feed) < compare_outputs(m, l2.model, feed)


def test_identity_hessian_does_not_compensate():
    """With H = I the kept weights are untouched: the result equals masking the chosen channels."""
    m = redundant_model()
    res = spa.prune(m, 0.34, criterion="obspa", hessian="identity")
    gone = next(g for g in res.report["groups"] if g["removed"])["removed_channels"]
    import onnx
    kept = [c for c in range(6) if c not in gone]
    w_in = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    w_out = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    second = [n for n in m.graph.node if n.op_type == "Conv"][1]
    np.testing.assert_array_equal(w_out[second.input[1]], w_in[second.input[1]][:, kept])
    np.testing.assert_array_equal(w_out[second.input[2]], w_in[second.input[2]])


def test_bn_hessian_is_used_where_a_batchnorm_feeds():
    g = G(seed=5)
    y = g.conv("x", 3, 8, bn=True, act="Relu")
    out = g.conv(y, 8, 4, act=None)
    m = g.model([("x", [1, 3, 8, 8])], [out])
    res = spa.prune(m, 0.5, criterion="obspa", hessian="bn")
    grp = next(gr for gr in res.report["groups"] if gr["removed"])
    assert grp["obspa"]["hessian"] == ["bn"]
    assert res.report["obspa"]["source"] == "bn"


def test_global_and_target_use_obs_costs():
    m = PATTERNS["residual_chain"]()
    res = spa.prune(m, target="params=1.5", criterion="obspa", hessian="synthetic")
    assert res.report["target_reached"] >= 1.4
    assert any("obspa" in g for g in res.report["groups"])


def test_sample_patches_match_im2col():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
    geom = (3, 2, (2, 1), (1, 0, 1, 1), (1, 2))
    full = conv_patches(x, 3, 2, stride=(2, 1), pad=(1, 0, 1, 1), dilation=(1, 2))
    got = obspa.sample_patches(x, geom, rows=10 ** 6, rng=rng)
    np.testing.assert_array_equal(got, full)
    some = obspa.sample_patches(x, geom, rows=5, rng=np.random.default_rng(1))
    assert len(some) == 5 and all((full == r).all(1).any() for r in some)


def test_unknown_hessian_source():
    with pytest.raises(spa.SpaError, match="Hessian source"):
        spa.prune(redundant_model(), 0.3, criterion="obspa", hessian="oracle")


def test_real_model_obspa_is_valid_and_closer_than_l2():
    """YOLOv8n (PyTorch export, BN folded): obspa with synthetic Hessians writes a valid model with the
    same outputs' shapes, fewer params, and outputs closer to the dense model than l2 at the same plan."""
    from exported import model_path
    path = model_path("yolov8n")
    an = spa.analyze(path)
    feed = {k: np.random.default_rng(5).standard_normal(v.shape).astype(v.dtype) for k, v in an.probe.inputs.items()}
    # the 16 bins of the box distribution (Softmax then the fixed arange DFL conv) are an approximate
    # group since Shape reads no longer block it; pruning bins is not what either criterion is for
    dfl = "/model.22/dfl/"
    assert any(g.prunable and any(n.startswith(dfl) for n, _ in g.nodes) for g in an.groups)
    obs = spa.prune(path, 0.3, criterion="obspa", calib_batches=4, analysis=an, exclude=dfl)
    l2 = spa.prune(path, 0.3, criterion="l2", analysis=an, exclude=dfl)
    assert obs.report["after"]["params"] < obs.report["before"]["params"]
    assert sum("obspa" in g for g in obs.report["groups"]) >= 40
    dense = an.full_model()
    out_dense = probing.session(dense).run(None, feed)
    out_obs = probing.session(obs.model).run(None, feed)
    assert [o.shape for o in out_obs] == [o.shape for o in out_dense]
    assert compare_outputs(dense, obs.model, feed) < compare_outputs(dense, l2.model, feed)


def test_synthetic_images_are_correlated_noise_and_auto_prefers_bn():
    g = G(seed=5)
    y = g.conv("x", 3, 8, bn=True, act="Relu")
    out = g.conv(y, 8, 4, act=None)
    m = g.model([("x", [2, 3, 32, 32])], [out])
    an = spa.analyze(m)
    _, feeds = __import__('spa.runtime.synthetic').runtime.synthetic.feeds(an, 2)
    x = feeds[0]["x"]
    assert x.shape == (2, 3, 32, 32) and abs(x.std() - 1) < 0.05
    right = np.corrcoef(x[..., :-1].ravel(), x[..., 1:].ravel())[0, 1]
    across = np.corrcoef(x[:, 0].ravel(), x[:, 1].ravel())[0, 1]
    assert right > 0.5 and across > 0.5          # white noise would give ~0 for both
    res = spa.prune(m, 0.5, criterion="obspa")   # hessian="auto", no data: BN where it feeds
    assert res.report["obspa"]["source"] == "bn"


def test_compensate_obs_keeps_another_criterions_choice_and_compensates_it(tmp_path):
    """--compensate obs under l2: the same channels go as without it (l2 chose them), the kept weights
    of their consumers change, and the outputs on the calibration data get closer to the original's;
    obspa itself refuses --compensate none."""
    m = redundant_model()
    calib = tmp_path / "calib.npy"
    data = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.save(calib, data)
    plain = spa.prune(m, 0.34, criterion="l2")
    comp = spa.prune(m, 0.34, criterion="l2", compensate="obs", calib=str(calib), damp=1e-4)
    removed = lambda r: [g["removed_channels"] for g in r.report["groups"] if g["removed"]]  # noqa: E731
    assert removed(plain) == removed(comp) and removed(plain)
    assert comp.report["compensation"]["selection"] == "criterion" and comp.report["compensation"]["damp"] == 1e-4
    feed = {"x": data[:2]}
    err = {k: compare_outputs(m, r.model, feed) for k, r in (("plain", plain), ("comp", comp))}
    assert err["comp"] < 0.5 * err["plain"]
    with pytest.raises(spa.SpaError, match="compensate"):
        spa.prune(m, 0.3, criterion="obspa", compensate="none")


def _attention_moments(tmp_path, n_batches):
    """``(model, analysis, calibration file, feeds, statistics with every compensation's moments)`` of
    a small attention block and 8 random samples."""
    from spa.runtime import calib
    m = attention(n=6, d=32, heads=4)
    an = spa.analyze(m)
    data = np.random.default_rng(3).standard_normal((8,) + tuple(an.probe.inputs["x"].shape[1:])).astype(np.float32)
    np.save(tmp_path / "c.npy", data)
    spec = str(tmp_path / "c.npy")
    _, feeds = calib.batches(an, spec, n_batches=n_batches)
    return m, an, spec, feeds, calib.collect(an, feeds, moments=obspa.moment_axes(an))


def test_calibration_pass_gathers_the_hessians_obs_would_measure(tmp_path):
    """One pass over the calibration data: the second moments gathered with a calibrated criterion's
    statistics are the Hessians obspa's own pass measures (MatMul/Gemm consumers), and a prune that
    shares them gives the same compensated model."""
    m, an, spec, feeds, stats = _attention_moments(tmp_path, 8)
    # every consumer a compensation uses (those of the prunable groups) has its moment, and no other
    grouped = obspa.group_consumers(an, obspa.find_consumers(an)[0])
    consumers = list({id(c): c for items in grouped.values() for c, _ in items if c.conv is None}.values())
    assert consumers and {c.axis for c in consumers} == set(stats.moments)
    # under a uniform allocation the approximate groups stay whole: their consumers' moments are not gathered
    whole = obspa.kept_whole(an, "uniform")
    assert whole and set(obspa.moment_axes(an, "uniform")) == {
        c.axis for gid, items in grouped.items() if gid not in whole for c, _ in items if c.conv is None}
    own = obspa.hessians(an, consumers, "auto", spec)
    shared = obspa.hessians(an, consumers, "auto", spec, stats=stats)
    for key in own.H:
        np.testing.assert_allclose(shared.H[key], own.H[key], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(shared.mean[key], own.mean[key], rtol=1e-4, atol=1e-6)
    r = spa.prune(m, target="params=1.3", criterion="wanda", calib=spec, compensate="obs", allocate="uniform")
    assert r.report["compensation"]["source"] == r.report["calibration"]["source"]


def test_moments_are_float32_and_a_final_cut_drops_the_hessians_before_validation(tmp_path, monkeypatch):
    """Memory: the calibration pass keeps its second moments in float32 (half a float64 sum: 323 MB
    for SmolLM2's 60 weight inputs), within 1e-5 of float64 ones; and once a step's cut is final the
    compensation drops its Hessians before validation, the guard and the write, and cannot apply again."""
    from spa import api
    m, an, spec, feeds, stats = _attention_moments(tmp_path, 4)
    assert stats.moments
    for (tensor, dim), (S, _) in stats.moments.items():
        rows = [np.moveaxis(probing.run_all(an.model, f, an.probe.consts)[tensor], dim, -1) for f in feeds]
        X = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows]).astype(np.float64)
        assert S.dtype == np.float32
        np.testing.assert_allclose(S, X.T @ X / len(X), rtol=1e-5, atol=1e-6 * np.abs(S).max())
    seen, held = [], []
    from spa.scoring.obs_stage import Compensation
    apply = Compensation.apply

    def recording(self, removal, progress=obspa._quiet):
        seen.append(self)
        return apply(self, removal, progress)
    monkeypatch.setattr(Compensation, "apply", recording)
    validate = api.validate
    monkeypatch.setattr(api, "validate", lambda *a, **k: (held.append(len(seen[-1].hs.H)), validate(*a, **k))[1])
    r = spa.prune(m, target="params=1.3", criterion="wanda", calib=spec, compensate="obs", allocate="uniform")
    assert r.report["compensation"]["source"] and seen and held == [0]
    assert seen[-1].released and not seen[-1].hs.mean
    with pytest.raises(RuntimeError, match="release"):
        seen[-1].apply({})


def test_diagonal_selection_ranks_by_the_uncompensated_cost_and_compensates_that_choice(tmp_path):
    """--obs-selection diagonal: a channel's score is sum ||W[:, j]||^2 E[x_j^2] over its consumers
    (the measured second moments, without a synthetic Hessian's ridge); the lowest go and OBS compensates
    exactly those.  On the redundant model the greedy OBS cost removes the channel the others predict
    (0, 1 or 5), the diagonal cost the one whose output matters least alone."""
    m = redundant_model()
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32))
    an = spa.analyze(m)
    consumers, _ = obspa.find_consumers(an)
    per_group = obspa.group_consumers(an, consumers)
    hs = obspa.hessians(an, [c for items in per_group.values() for c, _ in items], "auto", str(calib))
    (gid, items), = per_group.items()
    got = obspa.diagonal_scores(an, per_group, hs)[gid]
    (c, _), = items
    W = c.matrix(an.channels.consts[c.weight])                     # [out, in * 9]
    expect = ((W ** 2).sum(0) * np.diag(hs.H[c.key])).reshape(6, 9).sum(1)
    np.testing.assert_allclose(got, expect, rtol=1e-6)
    diag = spa.prune(m, 0.17, criterion="obspa", calib=str(calib), obs_selection="diagonal")
    grp = next(g for g in diag.report["groups"] if g["removed"])
    assert grp["removed_channels"] == [int(np.argmin(expect))]
    assert diag.report["obspa"]["selection"] == "diagonal"
    dropped = spa.prune(m, 0.17, criterion="l2", overrides={str(grp["id"]): 0.17})
    feed = _feed(m)
    assert compare_outputs(m, diag.model, feed) <= compare_outputs(m, dropped.model, feed) + 1e-6
    assert spa.prune(m, 0.17, criterion="obspa", calib=str(calib)).report["obspa"]["selection"] == "obs (auto)"


def test_synthetic_hessians_record_their_ridge():
    """The ridge a synthetic Hessian gets is recorded, and second_moments takes it back out."""
    m = redundant_model()
    an = spa.analyze(m)
    consumers, _ = obspa.find_consumers(an)
    hs = obspa.hessians(an, consumers, "synthetic")
    assert hs.H and set(hs.ridge) == set(hs.H)
    for key in hs.H:
        measured = np.diag(hs.H[key]) - hs.ridge[key]
        np.testing.assert_allclose(hs.second_moments(key), measured)
        assert hs.ridge[key] > 0 and np.mean(measured) * hessians.SYNTHETIC_RIDGE == pytest.approx(hs.ridge[key], rel=1e-6)


def test_obs_selection_is_obspas_and_the_cli_offers_every_one():
    with pytest.raises(spa.SpaError, match="obs-selection"):
        spa.prune(redundant_model(), 0.3, criterion="l2", obs_selection="diagonal")
    with pytest.raises(spa.SpaError, match="obs-selection"):
        spa.prune(redundant_model(), 0.3, criterion="obspa", obs_selection="greedy")
    from spa.cli import prune
    choices = {p.name: p.type.choices for p in prune.params if hasattr(p.type, "choices")}
    assert tuple(choices["obs_selection"]) == obspa.SELECTIONS and tuple(choices["hessian"]) == obspa.HESSIANS
