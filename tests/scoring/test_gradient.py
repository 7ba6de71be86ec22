"""Gradient criteria (taylor, snip, fisher): hand-computed scores, the three ways gradients come in
(dict, .npz, .safetensors), the errors, the l2 fallback, and gradients from PyTorch by
tools/grads_from_torch.py for models exported by both exporters."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import spa
from graphs import G
from spa.cli import cli
from spa.errors import SpaError
from spa.scoring import CRITERIA, gradient, score

GRADIENT = ("taylor", "snip", "fisher")
REDUCTIONS = ("sum", "mean", "max")


def chain():
    """x -> Conv(3->4, bias) -> Relu -> Conv(4->5) -> Relu -> Conv(5->2): two prunable groups, of
    4 channels (slices W1[c], b1[c], W2[:, c]) and of 5 (W2[c], W3[:, c])."""
    g = G(seed=1)
    w1, b1 = g.w(4, 3, 3, 3), g.w(4)
    y = g.op("Relu", [g.op("Conv", ["x", w1, b1], pads=[1] * 4)])
    w2 = g.w(5, 4, 1, 1)
    y = g.op("Relu", [g.op("Conv", [y, w2])])
    w3 = g.w(2, 5, 1, 1)
    out = g.op("Conv", [y, w3])
    return g.model([("x", [1, 3, 6, 6])], [out]), (w1, b1, w2, w3)


@pytest.fixture(scope="module")
def case():
    model, names = chain()
    an = spa.analyze(model)
    rng = np.random.default_rng(7)
    grads = {n: rng.standard_normal(an.weights[n].shape).astype(np.float32) for n in names}
    return model, an, names, grads


def slice_values(criterion, w, g, axis):
    """Per channel along ``axis``, the criterion's value of each slice (the reference, in float64)."""
    w, g = np.moveaxis(w.astype(np.float64), axis, 0), np.moveaxis(g.astype(np.float64), axis, 0)
    w, g = w.reshape(len(w), -1), g.reshape(len(g), -1)
    if criterion == "taylor":
        return np.abs((w * g).sum(1))
    if criterion == "snip":
        return np.abs(w * g).sum(1)
    return (g * g).sum(1)


def expected(criterion, reduction, an, names, grads):
    """Per prunable group (in channel order) the hand-computed raw scores."""
    w1, b1, w2, w3 = names
    W = an.weights
    per_group = [[(w1, 0), (b1, 0), (w2, 1)], [(w2, 0), (w3, 1)]]
    out = []
    for slices in per_group:
        vals = np.stack([slice_values(criterion, W[n], grads[n], d) for n, d in slices])
        out.append({"sum": vals.sum(0), "mean": vals.mean(0), "max": vals.max(0)}[reduction])
    return out


def prunable(an):
    return [g for g in an.groups if g.prunable]


def test_registered_with_needs_grads():
    assert all(CRITERIA[c].needs_grads for c in GRADIENT)
    assert not any(s.needs_grads for n, s in CRITERIA.items() if n not in GRADIENT)


@pytest.mark.parametrize("criterion", GRADIENT)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_scores_equal_hand_computed(case, criterion, reduction):
    _, an, names, grads = case
    sc = score(an, criterion, reduction=reduction, grads=grads)
    groups = prunable(an)
    assert [len(g.units) for g in groups] == [4, 5]
    for g, want in zip(groups, expected(criterion, reduction, an, names, grads)):
        np.testing.assert_allclose(sc.raw[g.units], want, rtol=1e-9)
    assert sc.notes == {}


def test_taylor_is_not_snip():
    """taylor lets a slice's signed products cancel (|sum w g|), snip does not (sum |w g|)."""
    model, names = chain()
    an = spa.analyze(model)
    grads = {n: np.sign(an.weights[n]).astype(np.float32) for n in names}   # w * g = |w| > 0
    grads[names[0]][1, 0] *= -1    # channel 1 of W1: some products negative
    t, s = (score(an, c, grads=grads).raw[prunable(an)[0].units] for c in ("taylor", "snip"))
    assert t[1] < s[1] and np.allclose(np.delete(t, 1), np.delete(s, 1))


def write_safetensors_by_hand(path, arrays, metadata=None, bf16=False):
    """The format by hand (``bf16``: float32 arrays written as their top 16 bits)."""
    header, off, blobs = {}, 0, []
    for k, a in arrays.items():
        a = np.ascontiguousarray(a)
        dt = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64"}[a.dtype]
        if bf16:
            a, dt = (a.astype("<f4").view("<u4") >> 16).astype("<u2"), "BF16"
        header[k] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        blobs.append(a.tobytes())
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


@pytest.mark.parametrize("criterion", GRADIENT)
def test_dict_npz_and_safetensors_give_the_same_scores(case, tmp_path, criterion):
    _, an, names, grads = case
    np.savez(tmp_path / "g.npz", **grads)                  # stored: memory-mapped
    np.savez_compressed(tmp_path / "gz.npz", **grads)      # deflated: read member by member
    write_safetensors_by_hand(tmp_path / "g.safetensors", grads)
    want = score(an, criterion, grads=grads).raw
    files = ["g.npz", "gz.npz", "g.safetensors"]
    st = pytest.importorskip("safetensors.numpy", reason="the safetensors package writes one file more")
    st.save_file({k: np.ascontiguousarray(v) for k, v in grads.items()}, str(tmp_path / "pkg.safetensors"))
    files.append("pkg.safetensors")
    for f in files:
        np.testing.assert_array_equal(score(an, criterion, grads=str(tmp_path / f)).raw, want, err_msg=f)


def test_npz_members_are_memory_mapped(case, tmp_path):
    _, an, names, grads = case
    np.savez(tmp_path / "g.npz", **grads)
    g = gradient.load(str(tmp_path / "g.npz"))
    a = g.read(names[0])
    assert not a.flags.owndata and np.array_equal(a, grads[names[0]])
    np.savez_compressed(tmp_path / "gz.npz", **grads)
    assert np.array_equal(gradient.load(str(tmp_path / "gz.npz")).read(names[0]), grads[names[0]])


def test_half_precision_and_slabs(case, tmp_path, monkeypatch):
    """fp16 and bf16 gradients in a .safetensors; sums a slab at a time give what one slab gives."""
    _, an, names, grads = case
    half = {k: v.astype(np.float16) for k, v in grads.items()}
    write_safetensors_by_hand(tmp_path / "h.safetensors", half)
    want = score(an, "taylor", grads={k: v.astype(np.float32) for k, v in half.items()}).raw
    np.testing.assert_allclose(score(an, "taylor", grads=str(tmp_path / "h.safetensors")).raw, want, rtol=1e-12)
    write_safetensors_by_hand(tmp_path / "b.safetensors", grads, bf16=True)
    truncated = {k: ((v.view("<u4") >> 16) << 16).view("<f4") for k, v in grads.items()}
    np.testing.assert_allclose(score(an, "snip", grads=str(tmp_path / "b.safetensors")).raw,
                               score(an, "snip", grads=truncated).raw, rtol=1e-12)
    monkeypatch.setattr(gradient, "BFLOAT16", None)     # without ml_dtypes: widened by hand
    np.testing.assert_allclose(score(an, "snip", grads=str(tmp_path / "b.safetensors")).raw,
                               score(an, "snip", grads=truncated).raw, rtol=1e-12)
    monkeypatch.undo()
    whole = {c: score(an, c, grads=grads).raw for c in GRADIENT}
    monkeypatch.setattr(gradient, "SLAB_BYTES", 64)    # a few channels a slab
    for c in GRADIENT:
        np.testing.assert_allclose(score(an, c, grads=grads).raw, whole[c], rtol=1e-12)
    w, g = an.weights[names[0]], grads[names[0]]
    for d in range(4):
        np.testing.assert_allclose(gradient.slab_sums((w, g), d, np.multiply),
                                   (w.astype(np.float64) * g).sum(axis=tuple(i for i in range(4) if i != d)),
                                   rtol=1e-12)


def test_squared_gradients(case, tmp_path):
    """A file marked squared: fisher sums its values as they are; taylor and snip refuse it."""
    _, an, names, grads = case
    sq = {k: v.astype(np.float64) ** 2 for k, v in grads.items()}
    want = score(an, "fisher", grads=grads).raw
    np.savez(tmp_path / "sq.npz", __squared__=np.array(1), **sq)
    write_safetensors_by_hand(tmp_path / "sq.safetensors", sq, {"squared": "1"})
    for got in ({**sq, "__squared__": True}, str(tmp_path / "sq.npz"), str(tmp_path / "sq.safetensors")):
        np.testing.assert_allclose(score(an, "fisher", grads=got).raw, want, rtol=1e-6)
    for crit in ("taylor", "snip"):
        with pytest.raises(SpaError, match="signed gradients"):
            score(an, crit, grads=str(tmp_path / "sq.npz"))
    with pytest.raises(SpaError, match="negative"):
        score(an, "fisher", grads={**grads, "__squared__": 1})


def test_shape_mismatch_and_no_matching_name(case, tmp_path):
    _, an, names, grads = case
    bad = {**grads, names[2]: grads[names[2]][:3]}
    with pytest.raises(SpaError, match=r"shape \[3, 4, 1, 1\].*\[5, 4, 1, 1\]") as e:
        score(an, "taylor", grads=bad)
    assert "\n" not in str(e.value)
    np.savez(tmp_path / "other.npz", **{"conv1.weight": grads[names[0]]})
    with pytest.raises(SpaError, match="none of the 1 names") as e:
        spa.prune(case[0], 0.3, criterion="snip", grads=str(tmp_path / "other.npz"))
    assert "\n" not in str(e.value)
    for content, what in ((b"not a gradient file at all", "neither"), (b"PK\x03\x04garbage", "npz")):
        (tmp_path / "bad.npz").write_bytes(content)
        with pytest.raises(SpaError, match=what):
            score(an, "taylor", grads=str(tmp_path / "bad.npz"))
    with pytest.raises(SpaError, match="no such file"):
        score(an, "taylor", grads=str(tmp_path / "missing.npz"))
    with pytest.raises(SpaError, match="floating point"):
        score(an, "taylor", grads={names[0]: np.ones(an.weights[names[0]].shape, np.int64)})
    with pytest.raises(SpaError, match="NaN"):
        score(an, "taylor", grads={**grads, names[1]: np.full(4, np.nan, np.float32)})


def test_other_names_are_ignored_and_counted(case):
    _, an, names, grads = case
    g = gradient.checked({**grads, "optimizer.step": np.zeros(3), "layer.9.weight": np.zeros((2, 2))}, an.channels)
    assert g.matched == 4 and sorted(g.ignored) == ["layer.9.weight", "optimizer.step"]
    np.testing.assert_array_equal(score(an, "taylor", grads={**grads, "optimizer.step": np.zeros(3)}).raw,
                                  score(an, "taylor", grads=grads).raw)


def test_group_without_gradients_falls_back_to_l2(case):
    """Gradients of W1 and b1 only: the first group is scored from them; the second (W2 rows, W3
    columns) has none and is scored by l2, with a note that reaches the report."""
    model, an, names, grads = case
    part = {k: grads[k] for k in names[:2]}
    sc = score(an, "taylor", grads={**part, "unrelated": np.zeros(2)})
    g0, g1 = prunable(an)
    w1, b1 = names[:2]
    want = slice_values("taylor", an.weights[w1], grads[w1], 0) + slice_values("taylor", an.weights[b1], grads[b1], 0)
    np.testing.assert_allclose(sc.raw[g0.units], want, rtol=1e-9)
    np.testing.assert_allclose(sc.raw[g1.units], score(an, "l2").raw[g1.units], rtol=1e-12)
    assert list(sc.notes) == [g1.id] and "fell back to l2" in sc.notes[g1.id] and "1 of its 3 names" in sc.notes[g1.id]
    r = spa.prune(model, 0.4, criterion="taylor", grads=part)
    assert list(r.report["fallbacks"]) == [str(g1.id)]
    assert "fallback" in next(e for e in r.report["groups"] if e["id"] == g1.id)


def test_a_low_score_channel_goes(case):
    """A channel whose weights have no gradient (zero importance) is the one removed."""
    model, an, names, grads = case
    g = {k: v.copy() for k, v in grads.items()}
    w1, b1, w2, _ = names
    g[w1][2], g[b1][2], g[w2][:, 2] = 0, 0, 0
    for crit in GRADIENT:
        r = spa.prune(model, 0.25, criterion=crit, grads=g)
        grp = next(e for e in r.report["groups"] if e["prunable"] and e["channels"] == 4)
        assert grp["removed_channels"] == [2], crit


def quantized_model():
    """x -> Conv(W = DequantizeLinear(int8, per-channel scale)) -> Relu -> Conv(float)."""
    rng = np.random.default_rng(3)
    wq = rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)
    scale = (rng.random(4) * 0.02 + 0.01).astype(np.float32)
    w2 = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale, "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wz"), numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0, name="dq"),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4, name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m, wq.astype(np.float32) * scale[:, None, None, None], w2


def test_quantized_weights_use_their_dequantized_values():
    model, w, w2 = quantized_model()
    an = spa.analyze(model)
    if "wq" not in an.channels.dequant:
        pytest.skip("spa does not model this DequantizeLinear weight")
    rng = np.random.default_rng(0)
    grads = {"wq": rng.standard_normal(w.shape).astype(np.float32), "w2": rng.standard_normal(w2.shape).astype(np.float32)}
    grp = next(g for g in prunable(an) if len(g.units) == 4)
    want = slice_values("taylor", w, grads["wq"], 0) + slice_values("taylor", w2, grads["w2"], 1)
    np.testing.assert_allclose(score(an, "taylor", grads=grads).raw[grp.units], want, rtol=1e-5)


def test_cli_needs_grads_and_takes_them(case, tmp_path):
    model, _, _, grads = case
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    run = CliRunner().invoke
    res = run(cli, ["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--criterion", "taylor"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "needs gradients" in lines[0] and "--grads" in lines[0]
    np.savez(tmp_path / "g.npz", **grads)
    res = run(cli, ["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--criterion", "fisher",
                    "--grads", str(tmp_path / "g.npz"), "--ratio", "0.3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["criterion"] == "fisher"


# ------------------------------------------------------------------------------------------------
# gradients from PyTorch (tools/grads_from_torch.py)


def _net():
    """Conv+BN (folded by both exporters), a Linear on a 2-D input (Gemm) and one on a 3-D input
    (MatMul: the dynamo exporter stores its weight transposed under a new name)."""
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
            self.tok = nn.Linear(12, 16)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            x = self.b1(self.c1(x)).relu()
            x = self.b2(self.c2(x)).relu()                   # [N, 12, 6, 6]
            t = self.tok(x.flatten(2).transpose(1, 2)).relu()  # [N, 36, 16]: MatMul
            return self.head(t.mean(1))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for bn in (net.b1, net.b2):   # statistics as training leaves them: folding changes the weights
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _export(net, path, dynamo):
    import warnings
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            pytest.importorskip("onnxscript")
            torch.onnx.export(net, (torch.zeros(4, 3, 6, 6),), str(path), input_names=["x"], output_names=["y"],
                              dynamo=True, verbose=False)
        else:
            torch.onnx.export(net, torch.zeros(4, 3, 6, 6), str(path), input_names=["x"], output_names=["y"],
                              opset_version=17, dynamo=False)


def _ort_loss(model_bytes, x, y):
    import onnxruntime as ort
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    z = sess.run(None, {"x": x})[0].astype(np.float64)
    z -= z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_gradients_from_torch_match_the_onnx_model_and_prune(tmp_path, dynamo):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from grads_from_torch import grads_for_onnx
    net = _net()
    path = tmp_path / "net.onnx"
    _export(net, path, dynamo)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(3)]
    out = tmp_path / "g.safetensors"
    grads, summary = grads_for_onnx(net, path, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), out=out)
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [n for n, a in inits.items() if a.dtype == np.float32 and a.ndim >= 1 and a.size > 2]
    assert set(weights) <= set(grads), summary          # folded, transposed and folded biases included
    assert "folded" in summary
    if dynamo:
        assert any(not n.startswith(("c1", "c2", "tok", "head")) for n in grads if grads[n].ndim == 2), summary

    # every gradient is the ONNX model's own: a central difference of the loss in onnxruntime
    # along it, on one batch, equals its squared norm
    x, y = batches[0][0].numpy(), batches[0][1].numpy()
    one, _ = grads_for_onnx(net, path, batches[:1], lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    for name in weights:
        g = one[name].astype(np.float64)
        step = 1e-2 / max(np.linalg.norm(g), 1e-12)
        losses = []
        for sign in (1, -1):
            m = onnx.ModelProto()
            m.CopyFrom(model)
            t = next(t for t in m.graph.initializer if t.name == name)
            t.CopyFrom(numpy_helper.from_array((inits[name] + sign * step * g).astype(np.float32), name))
            losses.append(_ort_loss(m.SerializeToString(), x, y))
        fd = (losses[0] - losses[1]) / (2 * step)
        assert fd == pytest.approx(float((g * g).sum()), rel=0.05, abs=1e-6), name

    r = spa.prune(str(path), 0.3, criterion="taylor", grads=str(out))
    assert "fallbacks" not in r.report
    assert r.report["after"]["macs"] < r.report["before"]["macs"]
    import onnxruntime as ort
    sess = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": x})[0].shape == (4, 5)
