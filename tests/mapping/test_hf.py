"""The Hugging Face round trip: ``spa prune --uniform-layers --map`` and ``spa apply-map --hf``
(``spa.planning.layerwise``, ``spa.mapping.hf``).

The property under test: a Llama with random weights (tools/export_transformers.py's ``llama_gqa``:
4 query heads over 2 key/value heads, intermediate 128, two layers) pruned with ``--uniform-layers`` has
the same heads, key/value heads and MLP width in every layer, its head dims and residual kept; the
folder apply-map --hf writes loads with ``AutoModelForCausalLM.from_pretrained`` and gives the pruned
ONNX model's logits (1e-4) at two sequence lengths.  Per-layer widths that differ are refused in one
line, with the per-layer sizes written beside.
"""
import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import spa
from spa.cli import cli
from spa.errors import SpaError
from spa.mapping import hf
from spa.planning import layerwise


def test_config_sizes_and_refusals():
    same = [{"layer": i, "num_attention_heads": [4, 2], "head_dim": [16, 16], "intermediate_size": [128, 64]}
            for i in range(2)]
    sizes, why = hf.config_sizes(same)
    assert why is None and sizes["intermediate_size"] == [128, 64]
    cfg, why = hf.new_config({"model_type": "llama", "intermediate_size": 128, "num_attention_heads": 4,
                              "hidden_size": 64}, sizes)
    assert why is None and cfg["intermediate_size"] == 64 and cfg["num_attention_heads"] == 2 and cfg["head_dim"] == 16
    _, why = hf.new_config({"model_type": "gpt2", "n_inner": 128, "n_head": 4, "n_embd": 64}, sizes)
    assert "derives head_dim" in why
    differ = [dict(same[0]), {**same[1], "intermediate_size": [128, 90]}]
    _, why = hf.config_sizes(differ)
    assert "different intermediate_size (layer 0: 64, layer 1: 90)" in why and "--uniform-layers" in why
    _, why = hf.config_sizes([{**e, "head_dim": [16, 12]} for e in same])
    assert "head_dim went 16 -> 12" in why


def test_strip_prefix():
    doc = {"tensors": {"model.model.norm.weight": {"shape": [4]},
                       "val_3": {"shape": [4, 8], "framework": [{"name": "model.lm_head.weight", "transposed": True}]}}}
    out, prefix = hf.strip_prefix(doc, ["model.norm.weight", "lm_head.weight"])
    assert prefix == "model."
    assert out["tensors"]["val_3"]["framework"] == [{"name": "lm_head.weight", "transposed": True}]
    assert out["tensors"]["model.model.norm.weight"]["framework"] == [{"name": "model.norm.weight", "transposed": False}]
    assert hf.strip_prefix(doc, ["model.model.norm.weight"])[1] == ""


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import export_transformers as et
    d = tmp_path_factory.mktemp("hf")
    et.build("llama_gqa").model.save_pretrained(d / "orig")
    return et, et.export("llama_gqa"), d


@pytest.mark.slow
@pytest.mark.torch
def test_uniform_layers_round_trip_from_pretrained(llama, tmp_path):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    et, path, d = llama
    r = CliRunner().invoke(cli, ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--target", "macs=1.5",
                                 "--uniform-layers", "--map", str(tmp_path / "map.json"),
                                 "--report", str(tmp_path / "r.json"), "-q"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    layers = rep["layers"]
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"):
        assert len({tuple(e[key]) for e in layers}) == 1, key
    first = layers[0]
    assert first["head_dim"] == [16, 16] and first["intermediate_size"][1] < 128
    assert first["num_key_value_heads"][1] < 2 and first["num_attention_heads"][1] < 4
    assert rep["uniform_layers"]["kept_whole"]          # the residual, rotary and value head dims
    out = tmp_path / "small"
    r = CliRunner().invoke(cli, ["apply-map", str(tmp_path / "map.json"), str(d / "orig"), "-o", str(out), "--hf"])
    assert r.exit_code == 0, r.output
    assert "config.json: " in r.output and "intermediate_size 128 -> " in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == first["intermediate_size"][1]
    assert cfg["num_attention_heads"] == first["num_attention_heads"][1]
    assert cfg["num_key_value_heads"] == first["num_key_value_heads"][1] and cfg["head_dim"] == 16
    assert json.loads((out / hf.LAYERS_FILE).read_text())["layers"] == layers
    model = tf.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    for seq in (5, 23):
        ids = et.sample_inputs("llama_gqa", 2, seq, seed=seq)["input_ids"]
        with et.single_sequence_masks(), torch.no_grad():
            y = model(input_ids=ids, use_cache=False).logits.numpy()
        want = sess.run(None, {"input_ids": ids.numpy()})[0]
        assert y.shape == want.shape
        np.testing.assert_allclose(y, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.torch
def test_per_layer_widths_are_refused(llama, tmp_path):
    et, path, d = llama
    an = spa.analyze(str(path))
    mlp1 = [g for g, (layer, role) in layerwise.layer_roles(an).items() if layer == 1 and role[1] == 128]
    assert len(mlp1) == 1                                  # layer 1's MLP width
    res = spa.prune(str(path), 0.3, exclude="node_embedding", overrides={str(mlp1[0]): 0.5}, analysis=an,
                    map_path=tmp_path / "map.json", output=tmp_path / "p.onnx")
    inter = {e["layer"]: e["intermediate_size"][1] for e in res.report["layers"]}
    assert inter[0] != inter[1]
    out = tmp_path / "small"
    r = CliRunner().invoke(cli, ["apply-map", str(tmp_path / "map.json"), str(d / "orig"), "-o", str(out), "--hf"])
    assert r.exit_code == 2
    line = r.output.strip().splitlines()[-1]
    assert "different intermediate_size" in line and "one for all layers" in line and hf.LAYERS_FILE in line
    assert sorted(p.name for p in out.iterdir()) == [hf.LAYERS_FILE]
    with pytest.raises(SpaError, match="no config.json"):
        hf.apply_hf(tmp_path / "map.json", tmp_path, tmp_path / "x")


def test_uniform_layers_refuses_measured_allocations():
    with pytest.raises(SpaError, match="--uniform-layers plans by"):
        spa.PruneOptions(target="fidelity=0.9", uniform_layers=True).checked()


def test_a_folder_without_hf_is_named(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"format": "spa-map", "version": 1, "tensors": {}}))
    (tmp_path / "model").mkdir()
    r = CliRunner().invoke(cli, ["apply-map", str(tmp_path / "map.json"), str(tmp_path / "model"),
                                 "-o", str(tmp_path / "out.safetensors")])
    assert r.exit_code == 2 and "a folder; for a Hugging Face model folder pass --hf" in r.output
