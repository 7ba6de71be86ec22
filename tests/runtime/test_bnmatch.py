"""Synthetic images matched to the model's BatchNorm statistics (spa/runtime/bnmatch.py, issue 24): noise
given the scale and offset that bring the first BatchNorm's input to its running mean and variance, and
the plain noise wherever there is nothing to match."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.runtime import bnmatch, probing, synthetic

MEAN, VAR = 8.0, 4.0


def _model(bn=True, mean=MEAN, var=VAR):
    """x [1, 3, 32, 32] -> 3x3 Conv averaging all 27 taps into 4 channels -> BatchNormalization (running
    mean ``mean``, variance ``var``: an input around 8 +- 2, far from unit noise) -> Relu -> pooled; without
    ``bn`` the BN is folded away (a Conv with a bias), as exporters in eval mode leave it."""
    c = 4
    inits = [numpy_helper.from_array(np.full((c, 3, 3, 3), 1 / 27, np.float32), "w"),
             numpy_helper.from_array(np.zeros(c, np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1])]
    y = "conv"
    if bn:
        for name, v in (("scale", 1.0), ("shift", 0.0), ("mean", mean), ("var", var)):
            inits.append(numpy_helper.from_array(np.full(c, v, np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", ["conv", "scale", "shift", "mean", "var"], ["bn"]))
        y = "bn"
    nodes += [helper.make_node("Relu", [y], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["out"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _conv_stats(an, feeds):
    r = probing.output_runner(an.model, an.probe.consts, ["conv"])
    v = np.concatenate([r.run(f)["conv"] for f in feeds]).astype(np.float64)
    return v.mean(axis=(0, 2, 3)), v.var(axis=(0, 2, 3))


def test_noise_is_matched_to_the_first_batchnorm():
    an = spa.analyze(_model())
    plain = [{"x": synthetic.pink(np.random.default_rng(2), (1, 3, 32, 32)).astype(np.float32)} for _ in range(2)]
    mu, var = _conv_stats(an, plain)
    assert np.all(np.abs(mu - MEAN) > 5) and np.all(var < 1.5)       # plain noise: nothing like 8 +- 2
    desc, feeds = synthetic.feeds(an, 2)
    assert "matched to the model's BatchNorm statistics" in desc and "over 1 BatchNormalization" in desc
    mu, var = _conv_stats(an, feeds)
    np.testing.assert_allclose(mu, MEAN, atol=0.3)
    np.testing.assert_allclose(var, VAR, rtol=0.15)
    # and the guard says what it measured on
    res = spa.prune(_model(), 0.25)
    assert "matched to the model's BatchNorm statistics" in res.report["fidelity"]["inputs"]


def test_nothing_to_match_leaves_the_noise_as_it_was():
    an = spa.analyze(_model(bn=False))       # the BN folded away by the exporter
    desc, feeds = synthetic.feeds(an, 2)
    assert "matched" not in desc
    x = feeds[0]["x"]
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3   # the 1/f noise, standardised per image
    assert bnmatch.norms(an.model, an.probe.consts, {"x"}) == []
    feed = {"x": np.ones((1, 3, 32, 32), np.float32)}
    assert bnmatch.match(an, [(feed, "x", None, feed["x"])]) is None
    assert np.all(feed["x"] == 1)


def test_statistics_no_affine_map_of_noise_reaches_keep_the_plain_noise():
    import graphs      # tests/graphs.py: random BatchNorm statistics (means +-0.5, variances 0.5-1.5)
    an = spa.analyze(graphs.residual_chain())
    assert len(bnmatch.norms(an.model, an.probe.consts, {"x"})) == bnmatch.MAX_NORMS
    assert "matched" not in synthetic.feeds(an, 2)[0]


def test_mismatch():
    t = [bnmatch.Norm("a", np.array([8.0, 0.0]), np.array([4.0, 1.0]))]
    rng = np.random.default_rng(0)
    v = rng.standard_normal((64, 2, 8, 8)) * np.array([2.0, 1.0])[:, None, None] + np.array([8.0, 0.0])[:, None, None]
    assert bnmatch.mismatch({"a": v}, t) < 0.01
    assert bnmatch.mismatch({"a": v - 8.0}, t) > 7      # the first channel's mean off by 4 deviations: 16 / 2
    assert bnmatch.mismatch({"a": v[:, :1]}, t) == float("inf")
