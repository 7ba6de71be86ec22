"""Vocabulary pruning (spa prune --keep-tokens, spa.surgery.vocab): the pruned model on remapped ids
is the original with the other tokens' logits masked (DESIGN.md's oracle for index axes), at two
sequence lengths; greedy decoding through the map picks the original's choice among kept tokens;
ids files of every kind; one-line refusals."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.cli import cli
from spa.runtime import probing
from spa.surgery import vocab

V, D, F = 97, 16, 24


def tiny_lm(tied=True, seed=0, extra_reader=False):
    """A causal LM of one block: embedding Gather, a causal mix (CumSum over the sequence), an MLP
    with a residual, and a head tied to the embedding (MatMul by its Transpose, as the SmolLM2
    export has) or a separate [D, V] weight with a bias."""
    rng = np.random.default_rng(seed)
    inits = {"embed": rng.standard_normal((V, D)).astype(np.float32),
             "w1": rng.standard_normal((D, F)).astype(np.float32) * 0.3,
             "w2": rng.standard_normal((F, D)).astype(np.float32) * 0.3,
             "axis": np.array(1, np.int64)}
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h0"], name="embedding", axis=0),
             helper.make_node("CumSum", ["h0", "axis"], ["h1"], name="mix"),
             helper.make_node("MatMul", ["h1", "w1"], ["a"], name="up"),
             helper.make_node("Tanh", ["a"], ["t"], name="act"),
             helper.make_node("MatMul", ["t", "w2"], ["m"], name="down"),
             helper.make_node("Add", ["h1", "m"], ["h"], name="residual")]
    head_in = "h"
    if extra_reader:   # the ids' values read by something else than the embedding
        inits["minus1"] = np.array([-1], np.int64)
        nodes += [helper.make_node("Cast", ["input_ids"], ["ids_f"], name="ids_as_float", to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", ["ids_f", "minus1"], ["ids_u"], name="u"),
                  helper.make_node("Add", ["h", "ids_u"], ["h_plus"], name="peek")]
        head_in = "h_plus"
    if tied:
        nodes += [helper.make_node("Transpose", ["embed"], ["embed_t"], name="tie", perm=[1, 0]),
                  helper.make_node("MatMul", [head_in, "embed_t"], ["logits"], name="lm_head")]
    else:
        inits["head"] = rng.standard_normal((D, V)).astype(np.float32) * 0.3
        inits["bias"] = rng.standard_normal(V).astype(np.float32)
        nodes += [helper.make_node("MatMul", [head_in, "head"], ["z"], name="lm_head"),
                  helper.make_node("Add", ["z", "bias"], ["logits"], name="lm_bias")]
    graph = helper.make_graph(
        nodes, "tiny_lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", V])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _logits(proto, weights, ids):
    return probing.output_runner(proto, spa.io.initializer_arrays(proto, weights)).run({"input_ids": ids})["logits"]


KEPT = [0, 3, 5, 17, 42, 43, 60, 88, 96]


@pytest.mark.parametrize("tied", [True, False])
def test_pruned_logits_are_the_originals_kept_columns(tied, tmp_path):
    model = tiny_lm(tied)
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps([42, 3, 96, 0, 17, 5, 43, 88, 60, 3]))   # order and repeats do not matter
    r = spa.prune(model, keep_tokens=str(ids_file))
    voc = r.report["vocabulary"]
    assert voc["ids"] == KEPT and voc["kept"] == len(KEPT) and voc["original"] == V and voc["tied"] == tied
    assert voc["check"]["max_abs_diff"] < 1e-5
    assert r.report["after"]["params"] == r.report["before"]["params"] - (V - len(KEPT)) * (D * (1 if tied else 2) +
                                                                                           (0 if tied else 1))
    changes = {(c["kind"], c["axis"]): (c["before"], c["after"]) for c in r.report["interface"]}
    assert changes == {("input", "values"): (V, len(KEPT)), ("output", 2): (V, len(KEPT))}
    kept = np.asarray(KEPT)
    rng = np.random.default_rng(1)
    for batch, seq in ((1, 5), (3, 23)):
        original_ids = rng.choice(kept, (batch, seq))
        want = _logits(model, None, original_ids)[..., kept]
        got = _logits(r.proto, r.weights, np.searchsorted(kept, original_ids))
        assert got.shape == (batch, seq, len(KEPT))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_greedy_decoding_through_the_map_picks_the_originals_kept_choice(tmp_path):
    """A greedy loop on the pruned model (new ids, mapped back by vocabulary.ids) writes the same text
    as the original's greedy loop restricted to the kept tokens; where the original's unrestricted
    choice is a kept token, the two choices agree."""
    model = tiny_lm(False, seed=3)       # untied: a tied random head repeats its last token, always a kept one
    np.save(tmp_path / "ids.npy", np.arange(0, V, 2).reshape(1, -1))      # half the vocabulary: as a .npy batch
    r = spa.prune(model, keep_tokens=str(tmp_path / "ids.npy"))
    kept = np.asarray(r.report["vocabulary"]["ids"])
    original, pruned = [kept[[1, 4]].reshape(2, 1)], [np.searchsorted(kept, kept[[1, 4]]).reshape(2, 1)]
    agreed = 0
    for _ in range(12):
        full = _logits(model, None, original[-1])[:, -1]
        mine = _logits(r.proto, r.weights, pruned[-1])[:, -1].argmax(1)
        free = full.argmax(1)
        restricted = kept[full[:, kept].argmax(1)]
        assert np.array_equal(kept[mine], restricted)
        inside = np.isin(free, kept)
        assert np.array_equal(kept[mine][inside], free[inside])
        agreed += int(inside.sum())
        original.append(np.concatenate([original[-1], restricted[:, None]], 1))
        pruned.append(np.concatenate([pruned[-1], mine[:, None]], 1))
    assert np.array_equal(kept[pruned[-1]], original[-1])
    assert 0 < agreed < 24     # both cases happened: the original's own choice kept, and not


def test_ids_files_of_every_kind(tmp_path):
    (tmp_path / "a.txt").write_text("# BOS, EOS\n1 2\n5,7  # user text\n7\n")
    np.savez(tmp_path / "calib.npz", input_ids=np.array([[9, 1], [1, 4]]))
    np.savez(tmp_path / "other.npz", tokens=np.array([3, 3, 2]))
    (tmp_path / "nested.json").write_text("[[4, 2], [2, 0]]")
    assert vocab.read_ids(tmp_path / "a.txt").tolist() == [1, 2, 5, 7]
    assert vocab.read_ids(tmp_path / "calib.npz").tolist() == [1, 4, 9]
    assert vocab.read_ids(tmp_path / "other.npz").tolist() == [2, 3]
    assert vocab.read_ids(tmp_path / "nested.json").tolist() == [0, 2, 4]
    (tmp_path / "bad.json").write_text("[1.5, 2]")
    (tmp_path / "neg.txt").write_text("-3 4")
    np.savez(tmp_path / "two.npz", a=np.arange(3), b=np.arange(2))
    for name, why in (("bad.json", "whole numbers"), ("neg.txt", "negative id -3"), ("two.npz", "name the token ids"),
                      ("missing.txt", "no such file")):
        with pytest.raises(spa.SpaError, match=why):
            vocab.read_ids(tmp_path / name)


def test_metadata_specials_are_kept_and_out_of_range_ids_refused(tmp_path):
    model = tiny_lm(False)
    helper.set_model_props(model, {"eos_token_id": "2"})
    (tmp_path / "ids.txt").write_text("10 11")
    r = spa.prune(model, keep_tokens=str(tmp_path / "ids.txt"))
    assert r.report["vocabulary"]["ids"] == [2, 10, 11] and r.report["vocabulary"]["metadata_specials"] == [2]
    (tmp_path / "far.txt").write_text(f"1 {V}")
    with pytest.raises(spa.SpaError, match=f"outside the model's vocabulary of {V}"):
        spa.prune(model, keep_tokens=str(tmp_path / "far.txt"))


def test_what_cannot_be_cut_exactly_is_refused(tmp_path):
    (tmp_path / "ids.txt").write_text("1 2 3")
    with pytest.raises(spa.SpaError, match="read by Add 'peek'"):
        spa.prune(tiny_lm(True, extra_reader=True), keep_tokens=str(tmp_path / "ids.txt"))
    from graphs import residual_chain
    with pytest.raises(spa.SpaError, match="not a causal language model"):
        spa.prune(residual_chain(), keep_tokens=str(tmp_path / "ids.txt"))
    with pytest.raises(spa.SpaError, match="a run of its own"):
        spa.prune(tiny_lm(), target="params=1.5", keep_tokens=str(tmp_path / "ids.txt"))


def test_cli_writes_the_model_the_report_and_the_map(tmp_path):
    onnx.save(tiny_lm(True), str(tmp_path / "lm.onnx"))
    (tmp_path / "ids.txt").write_text(" ".join(map(str, KEPT)))
    res = CliRunner().invoke(cli, ["prune", str(tmp_path / "lm.onnx"), "-o", str(tmp_path / "small.onnx"),
                                   "--keep-tokens", str(tmp_path / "ids.txt"), "--report", str(tmp_path / "r.json"),
                                   "--map", str(tmp_path / "map.json")])
    assert res.exit_code == 0, res.output
    assert f"interface: output logits axis 2: {V} -> {len(KEPT)}" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["vocabulary"]["ids"] == KEPT
    tensors = json.loads((tmp_path / "map.json").read_text())["tensors"]
    assert tensors["embed"]["kept"] == {"0": KEPT} and tensors["embed"]["new_shape"] == [len(KEPT), D]
    small = onnx.load(str(tmp_path / "small.onnx"))
    assert small.graph.output[0].type.tensor_type.shape.dim[2].dim_value == len(KEPT)
    res = CliRunner().invoke(cli, ["prune", str(tmp_path / "lm.onnx"), "-o", str(tmp_path / "x.onnx"),
                                   "--keep-tokens", str(tmp_path / "ids.txt"), "--check"])
    assert res.exit_code == 2 and "--keep-tokens" in res.output


@pytest.mark.torch
@pytest.mark.parametrize("name, tied", [("llama_gqa", False), ("gpt2_dynamo", True), ("gpt2_ts", False),
                                        ("llama_gqa_kv", False)])
def test_torch_exports_untied_tied_and_with_a_kv_cache(name, tied, tmp_path):
    """The exporters' own heads: dynamo's MatMul by a transposed copy (Llama), GPT-2's tied head as
    the Transpose of the embedding (dynamo) or a separate copy (TorchScript); the KV-cache export is
    validated at a decode step too (spa.surgery.validate)."""
    from exported import transformers as export
    (tmp_path / "ids.txt").write_text(" ".join(map(str, range(0, 256, 3))))
    path = export(name)
    r = spa.prune(path, keep_tokens=str(tmp_path / "ids.txt"))
    kept = np.asarray(r.report["vocabulary"]["ids"])
    assert len(kept) == 86 and r.report["vocabulary"]["tied"] == tied
    assert r.report["vocabulary"]["check"]["max_abs_diff"] < 1e-5
    if name.endswith("_kv"):
        return
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 7), (2, 19)):
        original_ids = rng.choice(kept, (batch, seq))
        want = _logits(onnx.load(path), None, original_ids)[..., kept]
        np.testing.assert_allclose(_logits(r.proto, r.weights, np.searchsorted(kept, original_ids)), want, atol=1e-5)
