"""How closely a pruned model follows the original: the guard on every prune (spa/planning/fidelity.py)
and the fidelity target (spa/planning/allocation.py)."""
import numpy as np
import pytest
import onnx
from click.testing import CliRunner

import spa
from spa.cli import cli
from graphs import residual_chain


def test_every_prune_reports_its_fidelity_and_the_cli_warns_when_it_is_low(tmp_path):
    m = residual_chain()
    gentle = spa.prune(m, 0.0)
    assert gentle.report["fidelity"]["min"] == 1.0
    harsh = spa.prune(m, 0.8)
    fid = harsh.report["fidelity"]
    assert set(fid["cosine"]) == {o.name for o in m.graph.output}
    assert 0.0 <= fid["min"] < gentle.report["fidelity"]["min"]
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    low = CliRunner().invoke(cli, ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.8"])
    assert low.exit_code == 0
    if fid["min"] < spa.planning.fidelity.WARN_BELOW:
        assert "spa: warning:" in low.output and "--target fidelity" in low.output
    ok = CliRunner().invoke(cli, ["prune", str(path), "-o", str(tmp_path / "q.onnx"), "--ratio", "0.0"])
    assert ok.exit_code == 0 and "warning" not in ok.output


def test_cosine_of_outputs():
    from spa.planning.fidelity import compare, cosine
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert cosine(a, a) == 1.0 and cosine(a, -a) == -1.0 and cosine(a, a[:1]) == 0.0
    assert cosine(np.array([1, 2, 3]), np.array([1, 0, 3])) == 2 / 3   # integer outputs: equal fraction
    assert compare({"y": a, "z": a}, {"y": a, "z": 2 * a})["min"] == 1.0


def test_fidelity_over_runs_is_the_cosine_of_the_whole_set_and_the_reference_is_bounded(monkeypatch):
    """Runs are compared one at a time in chunks (no concatenated copy of a decoder's logits), and the
    result is the cosine of everything at once; the original's outputs kept are bounded (first batch always)."""
    from spa.planning import fidelity
    rng = np.random.default_rng(0)
    ref = [{"y": rng.standard_normal((3, 50)).astype(np.float32)} for _ in range(4)]
    got = [{"y": r["y"] + rng.standard_normal((3, 50)).astype(np.float32)} for r in ref]
    monkeypatch.setattr(fidelity, "_CHUNK", 7)
    whole = fidelity.cosine(np.concatenate([r["y"] for r in ref]), np.concatenate([g["y"] for g in got]))
    assert fidelity.compare_runs(ref, iter(got))["cosine"]["y"] == pytest.approx(whole, abs=1e-6)
    assert fidelity.compare_runs(ref, [{"y": g["y"][:1]} for g in got])["min"] == 0.0   # a shape changed

    class Runner:
        def run(self, feed):
            return {"y": np.zeros(feed["n"], np.float32)}
    monkeypatch.setattr(fidelity, "REFERENCE_BYTES", 100)
    feeds, outputs = fidelity.reference_runs(Runner(), [{"n": 10}, {"n": 10}, {"n": 30}])
    assert len(feeds) == len(outputs) == 2
    assert len(fidelity.reference_runs(Runner(), [{"n": 1000}, {"n": 1}])[0]) == 1


def test_the_masked_model_is_the_pruned_model_for_exact_groups():
    """One session with channel masks fed at run time gives the pruned model's outputs (the
    sensitivity table measures what surgery would make, without surgery)."""
    from spa.surgery import slicing
    from spa.runtime import probing
    from spa.planning.allocation import MaskedModel
    an = spa.analyze(residual_chain())
    masked = MaskedModel(an)
    rng = np.random.default_rng(0)
    for g in an.groups:
        if not g.prunable or g.approximate:
            continue
        units = np.sort(rng.choice(g.units, size=max(1, g.channels // 2), replace=False))
        pruned = slicing.apply(an.model, an.channels, an.probe, units)
        want = probing.session(pruned).run(None, an.probe.inputs)[0]
        got = list(masked.run(an.probe.inputs, units).values())[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.torch
def test_fidelity_target_lands_just_above_the_asked_cosine_and_beats_a_uniform_ratio():
    """--target fidelity=0.99 on a calibrated mobilenet_v2: the measured cosine on the search's inputs
    is >= 0.99 and close to it, it holds within 0.02 on held-out inputs (other synthetic batches), and
    it removes more MACs than the uniform ratio that keeps the same fidelity."""
    from exported import model_path
    from spa.planning.fidelity import compare
    from spa.runtime.synthetic import feeds as synthetic_feeds
    path = model_path("mobilenet_v2")
    an = spa.analyze(path)
    res = spa.prune(path, target="fidelity=0.99", analysis=an)
    got = res.report["target_reached"]
    assert 0.99 <= got < 0.999, res.report["plan"]["rounds"]
    held = synthetic_feeds(an, 3, seed=777)[1]
    from spa.runtime import probing
    a, b = probing.session(an.full_model()), probing.session(res.model)
    held_fid = min(compare(dict(zip(["y"], a.run(None, f))), dict(zip(["y"], b.run(None, f))))["min"] for f in held)
    assert held_fid > 0.97, held_fid
    saved = 1 - res.report["after"]["macs"] / res.report["before"]["macs"]
    for ratio in (0.1, 0.2, 0.3, 0.4, 0.5):   # the uniform ratios that keep the same fidelity save less
        uni = spa.prune(path, ratio, analysis=an)
        if uni.report["fidelity"]["min"] >= got:
            assert 1 - uni.report["after"]["macs"] / uni.report["before"]["macs"] < saved


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["macs", "params"])
def test_allocate_sensitivity_reaches_the_target_with_less_drift(kind):
    """The trained PP-OCRv4 direction classifier (PaddlePaddle export) at macs=1.3 or params=1.3:
    per-group amounts from the measured drift keep the outputs far closer than one global score
    threshold at macs=1.3; at params=1.3 the global threshold already drifts little (it takes the
    wide late layers) and the allocation keeps whichever measures closer."""
    an = spa.analyze("ppocr_cls")   # the zoo's sizes (48 x 192 text lines)
    glob = spa.prune("ppocr_cls", target=f"{kind}=1.3", analysis=an)
    sens = spa.prune("ppocr_cls", target=f"{kind}=1.3", allocate="sensitivity", analysis=an)
    assert 1.29 <= sens.report["target_reached"] < 1.4
    plan = sens.report["plan"]
    by = plan["fidelity_by_allocation"]
    assert by[plan["allocation"]] == max(by.values()) and f"{kind}_estimate" in plan
    assert sens.report["fidelity"]["min"] >= glob.report["fidelity"]["min"] - 1e-6
    if kind == "macs":
        assert sens.report["fidelity"]["min"] > glob.report["fidelity"]["min"] + 0.05
        assert plan["allocation"] == "sensitivity"


def test_fidelity_options_are_checked():
    with pytest.raises(spa.SpaError, match="fidelity=C"):
        spa.prune(residual_chain(), target="fidelity=1.5")
    for bad in ({}, {"target": "fidelity=0.9"}):
        with pytest.raises(spa.SpaError, match="--allocate sensitivity"):
            spa.prune(residual_chain(), allocate="sensitivity", **bad)
    with pytest.raises(spa.SpaError, match="--steps 1"):
        spa.prune(residual_chain(), target="fidelity=0.9", steps=2)


def test_token_agreement_is_the_next_token_likelihood():
    from spa.planning.agreement import token_agreement
    ids = np.array([[1, 2, 3], [0, 0, 1]])
    flat = np.zeros((2, 3, 5), np.float32)
    nll, n, top = token_agreement(flat, ids)
    assert n == 4 and nll == pytest.approx(4 * np.log(5)) and top.shape == (2, 2)
    sure = np.full((2, 3, 5), -30.0, np.float32)
    for b in range(2):
        for t in range(2):
            sure[b, t, ids[b, t + 1]] = 30.0
    nll, _, top = token_agreement(sure, ids)
    assert nll < 1e-20 and (top == ids[:, 1:]).all()


def _dead_channel_model():
    """x -> Conv(3->8)+Relu -> Conv(8->4) -> GlobalAveragePool -> Flatten: channel 2 of the first conv
    is dead (its filter, bias and the second conv's column are zero), so removing it changes nothing."""
    from graphs import G
    from onnx import numpy_helper
    g = G(seed=3)
    h = g.conv("x", 3, 8)
    y = g.conv(h, 8, 4, act=None)
    out = g.op("Flatten", [g.op("GlobalAveragePool", [y])])
    m = g.model([("x", [1, 3, 8, 8])], [out])
    inits = {t.name: t for t in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    for name, axis in ((convs[0].input[1], 0), (convs[0].input[2], 0), (convs[1].input[1], 1)):
        a = numpy_helper.to_array(inits[name]).copy()
        np.moveaxis(a, axis, 0)[2] = 0
        inits[name].CopyFrom(numpy_helper.from_array(a, name))
    return m


def _max_rel(a, b):
    import onnxruntime as ort
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    ya, yb = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
              for m in (a, b))
    return float(np.abs(ya - yb).max() / np.abs(ya).max())


def test_fidelity_1_removes_only_channels_that_change_nothing():
    """``--target fidelity=1``: a dead channel goes, nothing else (the measured cosine is compared
    unrounded, with the exactness oracle's tolerance: ``spa.planning.fidelity.EXACT``)."""
    m = _dead_channel_model()
    exact = spa.prune(m, target="fidelity=1")
    group = next(g for g in exact.report["groups"] if g["removed"])
    assert [g["removed"] for g in exact.report["groups"] if g["removed"]] == [1] and group["removed_channels"] == [2]
    assert _max_rel(m, exact.model) < 1e-5
    # a channel whose removal changes the outputs by a cosine of 1 - 1e-7 (which rounds to 1.0) stays
    from spa.planning.fidelity import meets
    assert meets(1.0 - 1e-11, 1.0) and not meets(1.0 - 1e-7, 1.0) and meets(0.99, 0.99)
    # nothing is exact in the residual chain: nothing goes, and the model is written as it was
    rc = spa.prune(residual_chain(), target="fidelity=1")
    assert rc.report["after"] == rc.report["before"] and rc.report["target_reached"] == 1.0


def test_fidelity_target_on_a_graph_of_unnamed_nodes(tmp_path):
    """Nodes without names (or sharing one) get names of their own when the model is loaded: the
    fidelity search's masked copy used to hold two nodes named ``__cut0_1`` and onnxruntime refused it."""
    for blank in ("", "same"):
        m = residual_chain()
        for n in m.graph.node:
            n.name = blank
        path = tmp_path / f"m{blank}.onnx"
        onnx.save(m, str(path))
        for target in ("fidelity=1", "fidelity=0.99"):
            res = CliRunner().invoke(cli, ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--target", target])
            assert res.exit_code == 0, res.output
            names = [n.name for n in onnx.load(str(tmp_path / "p.onnx")).graph.node]
            assert all(names) and len(set(names)) == len(names)


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "1.0000001", "nan", "inf", "-inf", "abc", ""])
def test_fidelity_targets_outside_0_1_are_refused_in_one_line(tmp_path, value):
    path = tmp_path / "m.onnx"
    onnx.save(residual_chain(), str(path))
    res = CliRunner().invoke(cli, ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--target", f"fidelity={value}"])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spa: error: --target fidelity") and "Traceback" not in res.output
    assert not (tmp_path / "p.onnx").exists()


def test_a_cheap_models_guard_measures_on_more_samples_and_a_costly_or_static_one_on_two_batches(monkeypatch):
    """The direction classifier (16 rendered lines of 16M MACs a batch) is measured on GUARD_SAMPLES
    lines, and its sensitivity table on as many of those batches as SENSITIVITY_MACS allow; under a
    small MAC budget, or for a model whose two batches hold too few samples for a discrete agreement
    (a static batch of one), the guard keeps its two batches."""
    from spa.planning import allocation, fidelity
    an = spa.analyze("ppocr_cls")
    opts = spa.PruneOptions()
    feeds, what = fidelity.eval_feeds(an, opts)
    rows = fidelity.batch_rows(feeds[0])
    assert rows == 16 and len(feeds) * rows == fidelity.GUARD_SAMPLES and "16 batches" in what
    assert allocation.sensitivity_batches(an, feeds) == int(allocation.SENSITIVITY_MACS // (16 * an.macs))
    monkeypatch.setattr(fidelity, "GUARD_MACS", 4 * 16 * an.macs)
    assert len(fidelity.eval_feeds(an, opts)[0]) == 4
    monkeypatch.setattr(fidelity, "GUARD_MACS", 1.0)
    assert len(fidelity.eval_feeds(an, opts)[0]) == 2
    monkeypatch.undo()
    chain = spa.analyze(residual_chain())
    assert fidelity.batch_rows(chain.probe.inputs) < 8 and len(fidelity.eval_feeds(chain, opts)[0]) == 2
