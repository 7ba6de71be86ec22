"""The map back to the framework: ``spa prune --map`` and ``spa apply-map`` (``spa.mapping.mapfile``).

The property under test: slicing a checkpoint of the exported model with the map gives exactly the
pruned ONNX model's initializers (transposed where the exporter transposed), and the framework's
model rebuilt with the new widths loads the result and reproduces the pruned ONNX model.  Hand-built
graphs cover the format, names, composition, obspa and errors without torch; torchvision's resnet18
(dynamo export keeping BatchNorm: the recommended settings), a small model exported with the
exporter's defaults (BatchNorm folded, Linear weights transposed and renamed) and a Llama cover
real exports.
"""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.mapping import mapfile
from spa.io import safetensors
from spa.cli import cli
from spa.errors import SpaError
from graphs import residual_chain


def initializers(path) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def run(path, feed) -> list:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def save_safetensors(arrays: dict, path) -> None:
    """With the safetensors package where installed (an independent writer), spa's own otherwise."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        safetensors.write(path, [(n, {"float32": "F32", "int64": "I64"}[str(a.dtype)], a.shape,
                                          lambda a=a: a) for n, a in arrays.items()])
        return
    save_file({n: np.array(a, order="C") for n, a in arrays.items()}, str(path))


def assert_matches_pruned(out: dict, pruned: dict, names) -> None:
    """Every checkpoint tensor in ``names`` equals the pruned initializer of the same name."""
    assert names
    for n in names:
        assert out[n].shape == pruned[n].shape, n
        np.testing.assert_array_equal(out[n], pruned[n], err_msg=n)


# ----------------------------------------------------------------------------------------------
# hand-built graphs (no torch)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A residual chain of conv+BN blocks and a Gemm; its initializers as an .npz checkpoint."""
    d = tmp_path_factory.mktemp("chain")
    onnx.save(residual_chain(), str(d / "m.onnx"))
    np.savez(d / "ckpt.npz", **initializers(d / "m.onnx"))
    return d


def test_map_document_and_npz_round_trip(chain, tmp_path):
    res = spa.prune(str(chain / "m.onnx"), 0.5, map_path=tmp_path / "map.json", output=tmp_path / "p.onnx")
    assert res.report["map"] == str(tmp_path / "map.json")
    doc = json.loads((tmp_path / "map.json").read_text())
    assert doc["format"] == "spa-map" and doc["version"] == 1 and doc["compensated"] == []
    pruned, orig = initializers(tmp_path / "p.onnx"), initializers(chain / "m.onnx")
    assert set(doc["tensors"]) == set(orig)
    sliced = [n for n, e in doc["tensors"].items() if "kept" in e]
    assert sliced
    for n, e in doc["tensors"].items():
        assert e["shape"] == list(orig[n].shape)
        if n in pruned:
            assert e.get("new_shape", e["shape"]) == list(pruned[n].shape)
        for d, k in e.get("kept", {}).items():   # strictly increasing original positions
            assert all(isinstance(i, int) for i in k) and np.all(np.diff(k) > 0) and k[-1] < e["shape"][int(d)]
    summary = mapfile.apply_map(tmp_path / "map.json", chain / "ckpt.npz", tmp_path / "out.npz")
    out = dict(np.load(tmp_path / "out.npz"))
    assert set(out) == set(orig)
    assert_matches_pruned(out, pruned, [n for n in orig if n in pruned])
    assert summary["sliced"] == len(sliced) and summary["format"] == "npz"
    assert summary["lines"][0].startswith(f"sliced {len(sliced)} of {len(orig)} checkpoint tensors")


def test_two_steps_compose(chain, tmp_path):
    res = spa.prune(str(chain / "m.onnx"), 0.6, steps=2, map_path=tmp_path / "map.json", output=tmp_path / "p.onnx")
    assert all(s["removed"] > 0 for s in res.report["step_summaries"])  # both steps slice
    mapfile.apply_map(tmp_path / "map.json", chain / "ckpt.npz", tmp_path / "out.npz")
    out, pruned = dict(np.load(tmp_path / "out.npz")), initializers(tmp_path / "p.onnx")
    assert_matches_pruned(out, pruned, [n for n in out if n in pruned])


def test_compose_indexes_through_the_first_step():
    first = mapfile.KeptMap({"w": {0: np.array([0, 2, 3, 5, 7])}}, shapes={"w": [5, 4]})
    later = mapfile.KeptMap({"w": {0: np.array([1, 4]), 1: np.array([0, 3])}, "v": {0: np.array([2])}},
                            shapes={"w": [2, 2]})
    both = mapfile.compose(first, later)
    assert both["w"][0].tolist() == [2, 7] and both["w"][1].tolist() == [0, 3] and both["v"][0].tolist() == [2]
    assert both.shapes == {"w": [2, 2]} and first["w"][0].tolist() == [0, 2, 3, 5, 7]


def test_names_file_and_unmatched_names(chain, tmp_path):
    spa.prune(str(chain / "m.onnx"), 0.5, map_path=tmp_path / "map.json", output=tmp_path / "p.onnx")
    orig, pruned = initializers(chain / "m.onnx"), initializers(tmp_path / "p.onnx")
    ck = {f"net.{n}": a for n, a in orig.items()}
    ck["net.extra"] = np.ones(3, np.float32)
    np.savez(tmp_path / "ck.npz", **ck)
    with pytest.raises(SpaError, match="no tensor of the checkpoint matches the map.*--names"):
        mapfile.apply_map(tmp_path / "map.json", tmp_path / "ck.npz", tmp_path / "out.npz")
    doc = json.loads((tmp_path / "map.json").read_text())
    left_out = next(n for n, e in doc["tensors"].items() if "kept" in e)
    (tmp_path / "names.json").write_text(json.dumps({n: f"net.{n}" for n in orig if n != left_out}))
    summary = mapfile.apply_map(tmp_path / "map.json", tmp_path / "ck.npz", tmp_path / "out.npz",
                                names=tmp_path / "names.json")
    out = dict(np.load(tmp_path / "out.npz"))
    done = [n for n in orig if n != left_out and n in pruned]
    assert_matches_pruned({n: out[f"net.{n}"] for n in done}, pruned, done)
    assert summary["missing_in_checkpoint"] == [left_out]
    assert sorted(summary["not_in_map"]) == sorted(["net.extra", f"net.{left_out}"])
    np.testing.assert_array_equal(out[f"net.{left_out}"], orig[left_out])    # copied unchanged
    assert any(line.startswith("warning: 1 sliced tensors of the map are not in the checkpoint")
               for line in summary["lines"])
    assert any("not in the map, copied unchanged" in line for line in summary["lines"])


def test_obspa_compensated_tensors_are_listed(chain, tmp_path):
    spa.prune(str(chain / "m.onnx"), 0.5, criterion="obspa", map_path=tmp_path / "map.json", output=tmp_path / "p.onnx")
    doc = json.loads((tmp_path / "map.json").read_text())
    assert doc["compensated"] and set(doc["compensated"]) <= set(doc["tensors"])
    summary = mapfile.apply_map(tmp_path / "map.json", chain / "ckpt.npz", tmp_path / "out.npz")
    out, pruned = dict(np.load(tmp_path / "out.npz")), initializers(tmp_path / "p.onnx")
    assert summary["compensated"] == sorted(doc["compensated"])
    warning = f"warning: the OBS compensation (obspa, --compensate obs) rewrote {len(doc['compensated'])} of these tensors"
    assert any(line.startswith(warning)
               for line in summary["lines"])
    # the others are the pruned model's; the rewritten ones are the original values at the kept positions
    rest = [n for n in out if n in pruned and n not in doc["compensated"]]
    assert_matches_pruned(out, pruned, rest)
    assert any(not np.array_equal(out[n], pruned[n]) for n in doc["compensated"])


def test_cli_apply_map_and_errors(chain, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["prune", str(chain / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5",
                              "--map", str(tmp_path / "map.json")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["apply-map", str(tmp_path / "map.json"), str(chain / "ckpt.npz"),
                              "-o", str(tmp_path / "out.npz")])
    assert res.exit_code == 0, res.output
    assert "wrote " + str(tmp_path / "out.npz") in res.output
    out, pruned = dict(np.load(tmp_path / "out.npz")), initializers(tmp_path / "p.onnx")
    assert_matches_pruned(out, pruned, [n for n in out if n in pruned])
    res = runner.invoke(cli, ["apply-map", str(tmp_path / "map.json"), str(chain / "ckpt.npz"),
                              "-o", str(tmp_path / "out2.npz"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["sliced"] > 0 and summary["format"] == "npz"
    # the output over the checkpoint: refused by the safe writer, the checkpoint left as it was
    before = (chain / "ckpt.npz").read_bytes()
    res = runner.invoke(cli, ["apply-map", str(tmp_path / "map.json"), str(chain / "ckpt.npz"),
                              "-o", str(chain / "ckpt.npz")])
    assert res.exit_code == 2 and "an input of this run" in res.output
    assert (chain / "ckpt.npz").read_bytes() == before
    # nothing matches: one line
    np.savez(tmp_path / "other.npz", a=np.zeros(3, np.float32))
    res = runner.invoke(cli, ["apply-map", str(tmp_path / "map.json"), str(tmp_path / "other.npz"),
                              "-o", str(tmp_path / "o.npz")])
    assert res.exit_code == 2 and "no tensor of the checkpoint matches the map" in res.output
    assert len([l for l in res.output.splitlines() if l.startswith("spa: error:")]) == 1
    assert not (tmp_path / "o.npz").exists()
    # not a map, unknown checkpoint format
    (tmp_path / "bad.json").write_text("{}")
    res = runner.invoke(cli, ["apply-map", str(tmp_path / "bad.json"), str(chain / "ckpt.npz"),
                              "-o", str(tmp_path / "o.npz")])
    assert res.exit_code == 2 and "not a map written by" in res.output
    res = runner.invoke(cli, ["apply-map", str(tmp_path / "map.json"), str(tmp_path / "bad.json"),
                              "-o", str(tmp_path / "o.npz")])
    assert res.exit_code == 2 and "unknown format" in res.output
    res = runner.invoke(cli, ["apply-map", str(tmp_path / "map.json"), str(chain / "ckpt.npz"),
                              "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "writes the checkpoint's format (npz)" in res.output


def _linear_model():
    """x[1,4,8] -> MatMul(val_0 [8,8]) + fc.bias -> Relu -> MatMul(val_1 [8,6]): two Linear weights
    the exporter renamed and stored transposed, described by dynamo-style node metadata (fc's is
    square: only the metadata tells that the checkpoint's [out, in] is transposed)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("val_0", (8, 8)), ("fc.bias", (8,)), ("val_1", (8, 6)))]

    def node(op, ins, out, module):
        n = helper.make_node(op, ins, [out], name=f"node_{out}")
        for k, v in (("pkg.torch.onnx.name_scopes", f"['', '{module}', 'linear']"),
                     ("pkg.torch.onnx.class_hierarchy",
                      "['M', 'torch.nn.modules.linear.Linear', 'aten.linear.default']")):
            n.metadata_props.add(key=k, value=v)
        return n

    nodes = [node("MatMul", ["x", "val_0"], "mm", "fc"), node("Add", ["mm", "fc.bias"], "h", "fc"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"), node("MatMul", ["r", "val_1"], "y", "out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_renamed_transposed_linear_weights(tmp_path):
    onnx.save(_linear_model(), str(tmp_path / "m.onnx"))
    orig = initializers(tmp_path / "m.onnx")
    save_safetensors({"fc.weight": orig["val_0"].T, "fc.bias": orig["fc.bias"], "out.weight": orig["val_1"].T,
                      "step": np.array(3, np.int64)}, tmp_path / "ck.safetensors")
    spa.prune(str(tmp_path / "m.onnx"), 0.5, map_path=tmp_path / "map.json", output=tmp_path / "p.onnx")
    doc = json.loads((tmp_path / "map.json").read_text())
    assert doc["tensors"]["val_0"]["framework"] == [{"name": "fc.weight", "transposed": True}]
    summary = mapfile.apply_map(tmp_path / "map.json", tmp_path / "ck.safetensors", tmp_path / "out.safetensors")
    ck = mapfile.open_checkpoint(tmp_path / "out.safetensors")
    out = {n: np.array(ck.get(n)) for n in ck.shapes}
    ck.close()
    pruned = initializers(tmp_path / "p.onnx")
    assert pruned["val_0"].shape == (8, 4)      # fc's outputs halved: the checkpoint's axis 0
    np.testing.assert_array_equal(out["fc.weight"], pruned["val_0"].T)
    np.testing.assert_array_equal(out["out.weight"], pruned["val_1"].T)
    np.testing.assert_array_equal(out["fc.bias"], pruned["fc.bias"])
    assert out["step"] == 3 and summary["scalars"] == 1 and summary["not_in_map"] == []
    assert summary["transposed"] == ["fc.weight", "out.weight"]


def test_pytorch_checkpoint_without_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)    # import torch raises ImportError
    (tmp_path / "ck.pt").write_bytes(b"not read")
    with pytest.raises(SpaError, match="needs torch"):
        mapfile.open_checkpoint(tmp_path / "ck.pt")


@pytest.mark.torch
def test_pytorch_checkpoint_under_a_state_dict_key(tmp_path):
    torch = pytest.importorskip("torch")
    onnx.save(_linear_model(), str(tmp_path / "m.onnx"))
    orig = initializers(tmp_path / "m.onnx")
    sd = {"fc.weight": torch.tensor(orig["val_0"].T), "fc.bias": torch.tensor(orig["fc.bias"]),
          "out.weight": torch.tensor(orig["val_1"].T).to(torch.bfloat16)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ck.pth")
    spa.prune(str(tmp_path / "m.onnx"), 0.5, map_path=tmp_path / "map.json", output=tmp_path / "p.onnx")
    mapfile.apply_map(tmp_path / "map.json", tmp_path / "ck.pth", tmp_path / "out.pth")
    got = torch.load(tmp_path / "out.pth", weights_only=True)
    pruned = initializers(tmp_path / "p.onnx")
    assert got["epoch"] == 3 and got["state_dict"]["out.weight"].dtype == torch.bfloat16
    np.testing.assert_array_equal(got["state_dict"]["fc.weight"].numpy(), pruned["val_0"].T)
    np.testing.assert_array_equal(got["state_dict"]["out.weight"].float().numpy(),
                                  torch.tensor(pruned["val_1"].T).to(torch.bfloat16).float().numpy())


def test_axis_map():
    assert mapfile._axis_map([4, 3], [4, 3]) == [0, 1]
    assert mapfile._axis_map([4, 3], [3, 4]) == [1, 0]
    assert mapfile._axis_map([4, 4], [4, 4], transposed=True) == [1, 0]
    assert mapfile._axis_map([1, 8, 1, 1], [8]) == [-1, 0, -1, -1]
    assert mapfile._axis_map([8], [1, 8, 1])[0] == 1
    assert mapfile._axis_map([4, 3], [12]) is None


def test_safetensors_writer_round_trip(tmp_path):
    bits = np.arange(6, dtype=np.uint16).reshape(2, 3)
    tensors = {"f32": ("F32", np.arange(12, dtype=np.float32).reshape(3, 4)), "bf16": ("BF16", bits),
               "i64": ("I64", np.array(7, np.int64)), "b": ("BOOL", np.array([True, False])),
               "empty": ("F16", np.zeros((0, 4), np.float16))}
    items = [(n, tag, a.shape, lambda a=a: a) for n, (tag, a) in tensors.items()]
    safetensors.write(tmp_path / "t.safetensors", items, {"note": "x"})
    entries, meta, _ = safetensors.read_header(tmp_path / "t.safetensors")
    assert meta == {"note": "x"} and {n: e[0] for n, e in entries.items()} == {n: t for n, (t, _) in tensors.items()}
    ck = mapfile.open_checkpoint(tmp_path / "t.safetensors")
    for n, (_, a) in tensors.items():
        np.testing.assert_array_equal(np.asarray(ck.get(n)).view(a.dtype), a)
    ck.close()
    st = pytest.importorskip("safetensors.numpy")
    # the package reads spa's files (bfloat16 has no numpy dtype there: left out)
    safetensors.write(tmp_path / "u.safetensors", [i for i in items if i[1] != "BF16"])
    got = st.load_file(str(tmp_path / "u.safetensors"))
    for n, (tag, a) in tensors.items():
        if tag != "BF16":
            np.testing.assert_array_equal(got[n], a)


# ----------------------------------------------------------------------------------------------
# real exports (torch)


def narrow(model, sd):
    """``model`` with every Conv2d / BatchNorm2d / Linear rebuilt at the widths of state_dict ``sd``,
    loaded with it (strict): what a user does to fine-tune the pruned network in torch."""
    import torch.nn as nn
    for name, mod in list(model.named_modules()):
        w = sd.get(f"{name}.weight")
        if isinstance(mod, nn.Conv2d):
            new = nn.Conv2d(w.shape[1] * mod.groups, w.shape[0], mod.kernel_size, mod.stride, mod.padding,
                            mod.dilation, mod.groups, bias=mod.bias is not None)
        elif isinstance(mod, nn.BatchNorm2d):
            new = nn.BatchNorm2d(w.shape[0], eps=mod.eps, momentum=mod.momentum)
        elif isinstance(mod, nn.Linear):
            new = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def randomise_batchnorm(model):
    """Give every BatchNorm its own statistics and affine parameters (torch's init makes all channels
    alike, so a wrong slice of them would go unnoticed)."""
    import torch
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def export_dynamo(model, x, path, **kwargs):
    import warnings
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), dynamo=True, verbose=False, **kwargs).save(str(path))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """torchvision resnet18, random init (BatchNorm randomised), exported by dynamo with
    ``optimize=False`` (docs/map.md: every parameter and buffer keeps its name and value, BatchNorm
    stays); its state_dict as .safetensors and .pt."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    d = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    model = randomise_batchnorm(torchvision.models.resnet18(weights=None)).eval()
    export_dynamo(model, torch.randn(1, 3, 64, 64), d / "m.onnx", optimize=False)
    sd = model.state_dict()
    save_safetensors({n: v.numpy() for n, v in sd.items()}, d / "ck.safetensors")
    torch.save(sd, d / "ck.pt")
    return d


@pytest.mark.slow
@pytest.mark.torch
def test_resnet18_checkpoint_loads_into_the_narrow_model(resnet, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    res = spa.prune(str(resnet / "m.onnx"), 0.3, map_path=tmp_path / "map.json", output=tmp_path / "p.onnx")
    assert res.report["after"]["params"] < 0.7 * res.report["before"]["params"]
    pruned = initializers(tmp_path / "p.onnx")
    # the CLI, on the safetensors checkpoint
    got = CliRunner().invoke(cli, ["apply-map", str(tmp_path / "map.json"), str(resnet / "ck.safetensors"),
                                   "-o", str(tmp_path / "out.safetensors")])
    assert got.exit_code == 0, got.output
    ck = mapfile.open_checkpoint(tmp_path / "out.safetensors")
    out = {n: np.array(ck.get(n)) for n in ck.shapes}
    ck.close()
    params = [n for n in out if not n.endswith("num_batches_tracked")]
    assert len(params) == 102 and set(params) <= set(pruned)      # every parameter and BN statistic
    assert_matches_pruned(out, pruned, params)
    # the library, on the .pt state_dict
    summary = mapfile.apply_map(tmp_path / "map.json", resnet / "ck.pt", tmp_path / "out.pt")
    assert summary["not_in_map"] == [] and summary["missing_in_checkpoint"] == [] and summary["scalars"] == 20
    sd = torch.load(tmp_path / "out.pt", weights_only=True)
    assert_matches_pruned({n: v.numpy() for n, v in sd.items()}, pruned, params)
    model = narrow(torchvision.models.resnet18(weights=None), sd)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    ref = np.concatenate([run(tmp_path / "p.onnx", {"x": x[i:i + 1]})[0] for i in range(2)])
    np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.torch
def test_resnet18_two_steps(resnet, tmp_path):
    torch = pytest.importorskip("torch")
    res = spa.prune(str(resnet / "m.onnx"), 0.4, steps=2, map_path=tmp_path / "map.json", output=tmp_path / "p.onnx")
    assert all(s["removed"] > 0 for s in res.report["step_summaries"])
    mapfile.apply_map(tmp_path / "map.json", resnet / "ck.pt", tmp_path / "out.pt")
    sd = torch.load(tmp_path / "out.pt", weights_only=True)
    pruned = initializers(tmp_path / "p.onnx")
    assert_matches_pruned({n: v.numpy() for n, v in sd.items()}, pruned,
                          [n for n in sd if not n.endswith("num_batches_tracked")])


@pytest.mark.slow
@pytest.mark.torch
def test_default_export_folded_batchnorm_and_transposed_linear(tmp_path):
    """The exporter's defaults (``optimize=True``): BatchNorm folded into the convolutions (its four
    tensors are not in the ONNX model), Linear weights renamed ``val_N`` and transposed for MatMul.
    The map recovers both from the node metadata; the narrow torch model reproduces the pruned ONNX."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 5)

        def forward(self, x):
            y = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
            return self.out(torch.relu(self.fc(y.flatten(2).transpose(1, 2))))

    torch.manual_seed(0)
    model = randomise_batchnorm(Net()).eval()
    export_dynamo(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    names = set(initializers(tmp_path / "m.onnx"))
    assert "b1.running_mean" not in names and "fc.weight" not in names     # what the exporter did
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    spa.prune(str(tmp_path / "m.onnx"), 0.4, map_path=tmp_path / "map.json", output=tmp_path / "p.onnx")
    summary = mapfile.apply_map(tmp_path / "map.json", tmp_path / "ck.pt", tmp_path / "out.pt")
    assert len(summary["folded_batchnorm"]) == 8 and summary["transposed"] == ["fc.weight", "out.weight"]
    assert summary["not_in_map"] == [] and summary["missing_in_checkpoint"] == []
    sd = torch.load(tmp_path / "out.pt", weights_only=True)
    assert sd["b2.running_var"].shape[0] == sd["c2.weight"].shape[0] < 16 and sd["fc.weight"].shape[0] < 16
    narrow_model = narrow(Net(), sd)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        y = narrow_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, run(tmp_path / "p.onnx", {"x": x})[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.torch
def test_llama_map_has_the_layers_and_rebuilds_the_hugging_face_model(tmp_path):
    """A Llama (dynamo defaults: Linear weights renamed and transposed) pruned with its residual
    width kept (Hugging Face wants hidden_size divisible by the heads): the map's ``layers`` are the
    report's, the sliced state_dict loads into LlamaForCausalLM built from them, and with the two
    settings docs/map.md names for a shrunk head_dim it reproduces the pruned ONNX model."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    import export_transformers as et
    path = et.export("llama_gqa")
    res = spa.prune(str(path), 0.3, criterion="l2", exclude="node_embedding", map_path=tmp_path / "map.json",
                    output=tmp_path / "p.onnx")
    doc = json.loads((tmp_path / "map.json").read_text())
    assert doc["layers"] == json.loads(json.dumps(res.report["layers"]))
    layer = doc["layers"][0]
    assert layer["intermediate_size"][1] < layer["intermediate_size"][0] and layer["head_dim"][1] < layer["head_dim"][0]
    wrapper = et.build("llama_gqa")                       # the exported module: its own seeded weights
    torch.save(wrapper.state_dict(), tmp_path / "ck.pt")
    summary = mapfile.apply_map(tmp_path / "map.json", tmp_path / "ck.pt", tmp_path / "out.pt")
    assert summary["not_in_map"] == [] and summary["layers"] == doc["layers"]
    assert summary["missing_in_checkpoint"] == ["model.model.rotary_emb.inv_freq"]   # a buffer, not saved
    assert any(line.startswith("layers 0-1: ") for line in summary["lines"])
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    pruned = initializers(tmp_path / "p.onnx")
    for onnx_name, entry in doc["tensors"].items():
        for hint in entry.get("framework", []):
            want = pruned[onnx_name].T if hint["transposed"] else pruned[onnx_name]
            np.testing.assert_array_equal(out[hint["name"]].numpy(), want, err_msg=hint["name"])
        if onnx_name in out:
            np.testing.assert_array_equal(out[onnx_name].numpy(), pruned[onnx_name], err_msg=onnx_name)
    # the Hugging Face model with the new sizes
    sizes = ("intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads")
    cfg = {**wrapper.model.config.to_dict(), **{k: layer[k][1] for k in sizes}}
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in out.items()}, strict=True)
    model.model.rotary_emb.inv_freq.copy_(torch.tensor(pruned["model.model.rotary_emb.inv_freq"]))
    for block in model.model.layers:
        block.self_attn.scaling = layer["head_dim"][0] ** -0.5
    ids = et.sample_inputs("llama_gqa", 2, 9)["input_ids"]
    with et.single_sequence_masks(), torch.no_grad():
        y = model(input_ids=ids, use_cache=False).logits.numpy()
    np.testing.assert_allclose(y, run(tmp_path / "p.onnx", {"input_ids": ids.numpy()})[0], atol=1e-4, rtol=1e-4)
