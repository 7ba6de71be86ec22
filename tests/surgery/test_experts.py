"""Whole-expert removal (spa.graph.experts, spa.surgery.experts, --target experts=F).

Oracle: the pruned model equals the original with the removed experts' router logits at -inf (an
Add of a 0/-inf vector after the router, built here, not by spa), in onnxruntime at several batch
and sequence sizes; the unmasked original differs, so the comparison can fail."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.errors import SpaError
from spa.graph.experts import find_layers
from spa.io import weights as weight_store
from spa.scoring.experts import selection_share, tcess
from spa.surgery.experts import cut_experts
from spa.verify.oracle import feeds_at_every_size
from exported import deploy as export
from graphs import masked_router as masked, worst_error as worst

EXACT = 1e-5


def token_feeds():
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, 256, (b, s)).astype(np.int64)} for b, s in ((1, 1), (3, 7), (2, 40))]


@pytest.fixture(scope="module")
def mixtral():
    an = spa.analyze(export("mixtral_moe"))
    return an, find_layers(an.model, an.weights, an.probe.shapes)


@pytest.mark.torch
@pytest.mark.parametrize("kept", [{0: [1, 3], 1: [0, 2]}, {0: [0, 1, 3], 1: [1, 2, 3]}, {1: [0, 3]}])
def test_mixtral_experts_removed_equal_the_masked_original(mixtral, kept):
    an, layers = mixtral
    assert [(la.experts, la.top_k, len(la.slices), la.blocked) for la in layers] == [(4, 2, 3, "")] * 2
    pruned, w = cut_experts(an.model, an.weights, layers, kept)
    full = weight_store.full_model(pruned, w)
    original = an.full_model()
    feeds = token_feeds() + feeds_at_every_size(an)       # ours, and every size the probe ran
    assert worst(masked(original, layers, kept), full, feeds) < EXACT
    assert worst(original, full, feeds) > 1e-3          # the oracle can tell
    dims = {t.name: list(t.dims) for t in pruned.graph.initializer}
    for layer in layers:                                # router rows and stacked experts shrink together
        n = len(kept.get(layer.index, range(layer.experts)))
        assert {dims[c][d] for c, d in layer.slices} == {n}
    # a batch's rows equal the rows run alone
    s = ort.InferenceSession(full.SerializeToString())
    x = feeds[1]["input_ids"]
    both = s.run(None, {"input_ids": x})[0]
    alone = s.run(None, {"input_ids": x[1:2]})[0]
    assert np.abs(both[1:2] - alone).max() < 1e-5


@pytest.mark.torch
@pytest.mark.parametrize("name", ["qwen_moe", "olmoe"])
def test_qwen_and_olmoe_experts_removed_equal_the_masked_original(name):
    """Qwen2-MoE (top-2 probabilities not renormalised; a shared expert behind a sigmoid gate, which
    has no router row and stays) and OLMoE: the Mixtral router pattern with 8 experts."""
    an = spa.analyze(export(name))
    layers = find_layers(an.model, an.weights, an.probe.shapes)
    assert [(la.experts, la.top_k, len(la.slices), la.blocked) for la in layers] == [(8, 2, 3, "")] * 2
    kept = {0: [0, 2, 5, 7], 1: [1, 2, 3, 6]}
    pruned, w = cut_experts(an.model, an.weights, layers, kept)
    full = weight_store.full_model(pruned, w)
    assert worst(masked(an.full_model(), layers, kept), full, token_feeds()) < EXACT
    assert worst(an.full_model(), full, token_feeds()) > 1e-3


@pytest.mark.torch
def test_topk_k_must_stay_within_the_experts_left(mixtral):
    an, layers = mixtral
    with pytest.raises(SpaError, match="routes each token to 2 experts.*keep at least 2 of its 4, not 1"):
        cut_experts(an.model, an.weights, layers, {0: [3]})
    with pytest.raises(SpaError, match="keeps 1 of 4 experts in layer 0.*use F >= 0.5"):
        spa.prune(export("mixtral_moe"), target="experts=0.25", analysis=an)


@pytest.mark.torch
def test_target_experts_halves_the_experts_and_the_file(mixtral, tmp_path):
    an, layers = mixtral
    res = spa.prune(export("mixtral_moe"), target="experts=0.5", analysis=an, output=tmp_path / "half.onnx")
    rep = res.report["experts"]
    assert rep["scorer"] == "router_norm" and [len(e["kept"]) for e in rep["layers"]] == [2, 2]
    kept = {e["layer"]: e["kept"] for e in rep["layers"]}
    assert worst(masked(an.full_model(), layers, kept), res.model, token_feeds()) < EXACT
    stacked = sum(an.weights[c].nbytes for la in layers for c, _ in la.slices)
    before = sum(v.nbytes for v in an.weights.values())
    after = sum(numpy_helper.to_array(t).nbytes for t in res.model.graph.initializer)
    assert after == before - stacked // 2
    size = (tmp_path / "half.onnx").stat().st_size
    assert size < len(an.full_model().SerializeToString()) - stacked // 2 + 4096
    # with data: TCESS from the router logits of the calibration pass
    res = spa.prune(export("mixtral_moe"), target="experts=0.75", analysis=an, calib="synthetic", calib_batches=1)
    rep = res.report["experts"]
    assert rep["scorer"] == "tcess" and [len(e["kept"]) for e in rep["layers"]] == [3, 3]
    assert all(0.5 <= sum(e["scores"]) <= 1.0 for e in rep["layers"])  # each token's top 2 of 4 probabilities


def moe_graph(remap=True):
    """x [N, 8] -> router Gemm (5 experts) -> Softmax -> TopK 2; stacked experts [5, 8, 6] chosen by
    Gather(ids); routing weights times expert outputs; and (``remap``) a per-expert constant chosen by
    Equal(ids, range(5)): a reader that needs the original expert numbering."""
    rng = np.random.default_rng(1)
    E, H, O = 5, 8, 6
    inits = [numpy_helper.from_array(rng.standard_normal((E, H)).astype(np.float32), "router"),
             numpy_helper.from_array(rng.standard_normal(E).astype(np.float32), "router_b"),
             numpy_helper.from_array(rng.standard_normal((E, H, O)).astype(np.float32), "experts"),
             numpy_helper.from_array(np.array([2], np.int64), "k"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"),
             numpy_helper.from_array(np.arange(E, dtype=np.int64), "numbers"),
             numpy_helper.from_array(rng.standard_normal(E).astype(np.float32), "per_expert")]
    nodes = [helper.make_node("Gemm", ["x", "router", "router_b"], ["logits"], transB=1, name="router_gemm"),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
             helper.make_node("TopK", ["probs", "k"], ["w", "ids"], axis=-1, name="topk"),
             helper.make_node("Gather", ["experts", "ids"], ["chosen"], axis=0),        # [N, 2, H, O]
             helper.make_node("Unsqueeze", ["x", "axes12"], ["x4"]),                     # [N, 1, 1, H]
             helper.make_node("MatMul", ["x4", "chosen"], ["y4"]),                       # [N, 2, 1, O]
             helper.make_node("Unsqueeze", ["w", "last"], ["w3"]),
             helper.make_node("Unsqueeze", ["w3", "last"], ["w4"]),
             helper.make_node("Mul", ["y4", "w4"], ["yw"]),
             helper.make_node("ReduceSum", ["yw", "axes12"], ["y"], keepdims=0)]        # [N, O]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", O])]
    if remap:
        nodes += [helper.make_node("Unsqueeze", ["ids", "last"], ["ids3"]),
                  helper.make_node("Equal", ["ids3", "numbers"], ["hit"], name="equal"),   # [N, 2, E]
                  helper.make_node("Cast", ["hit"], ["hitf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["hitf", "per_expert"], ["usage3"]),
                  helper.make_node("ReduceSum", ["usage3", "axes12"], ["usage"], keepdims=0)]
        outputs.append(helper.make_tensor_value_info("usage", TensorProto.FLOAT, ["N"]))
    g = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("kept", [[0, 2, 4], [1, 3], [0, 1, 2, 3]])
def test_ids_read_by_other_ops_get_the_original_numbering(kept):
    """Gather(stacked, ids) is cut; Equal(ids, range(5)) is fed the ids mapped back, so the
    per-expert constant it selects is the original one."""
    an = spa.analyze(moe_graph(), input_shapes={"x": [3, 8]})
    layers = find_layers(an.model, an.weights, an.probe.shapes)
    assert [(la.experts, la.top_k, la.blocked, la.remaps) for la in layers] == [(5, 2, "", [("equal", 0)])]
    assert sorted(c for c, _ in layers[0].slices) == ["experts", "router", "router_b"]
    pruned, w = cut_experts(an.model, an.weights, layers, {0: kept})
    full = weight_store.full_model(pruned, w)
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((n, 8)).astype(np.float32)} for n in (1, 4, 33)]
    assert worst(masked(an.full_model(), layers, {0: kept}), full, feeds) < EXACT
    assert worst(an.full_model(), full, feeds) > 1e-3


def test_an_unknown_reader_of_the_expert_logits_blocks_the_layer(tmp_path):
    m = moe_graph(remap=False)
    m.graph.node.append(helper.make_node("ReduceMax", ["logits"], ["top"], keepdims=0, name="peek"))
    m.graph.output.append(helper.make_tensor_value_info("top", TensorProto.FLOAT, ["N"]))
    an = spa.analyze(m, input_shapes={"x": [3, 8]})
    layers = find_layers(an.model, an.weights, an.probe.shapes)
    assert layers[0].blocked == "ReduceMax 'peek' reads the expert axis and has no expert rule"
    with pytest.raises(SpaError, match="no mixture-of-experts layer can lose experts.*ReduceMax 'peek'"):
        spa.prune(m, target="experts=0.6", input_shapes={"x": [3, 8]})
    from click.testing import CliRunner
    from spa.cli import cli
    onnx.save(m, str(tmp_path / "peek.onnx"))
    got = CliRunner().invoke(cli, ["experts", "list", str(tmp_path / "peek.onnx"), "--input-shapes", "x:[3,8]"])
    assert got.exit_code == 0 and "layer 0 (router_gemm): 5 experts; blocked: ReduceMax 'peek' reads" \
        in got.output, got.output


def loop_graph(E=4, H=8, O=6):
    """The per-expert-branch form: router Gemm -> Softmax -> TopK; the routing weights scattered
    into a dense [N, E] combine (ScatterElements at the ids: a reader needing the original ids);
    every expert its own MLP branch weighted by its combine column, summed."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal((E, H)).astype(np.float32), "router"),
             numpy_helper.from_array(np.array([2], np.int64), "k"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([E], np.int64), "width")]
    nodes = [helper.make_node("Gemm", ["x", "router"], ["logits"], transB=1, name="router_gemm"),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
             helper.make_node("TopK", ["probs", "k"], ["w", "ids"], axis=-1),
             helper.make_node("Shape", ["x"], ["xs"]),
             helper.make_node("Gather", ["xs", "zero"], ["n"], axis=0),
             helper.make_node("Concat", ["n", "width"], ["nw"], axis=0),
             helper.make_node("ConstantOfShape", ["nw"], ["zeros"], value=helper.make_tensor("v", TensorProto.FLOAT,
                                                                                              [1], [0.0])),
             helper.make_node("ScatterElements", ["zeros", "ids", "w"], ["combine"], axis=1, name="scatter")]
    parts = []
    for e in range(E):
        inits += [numpy_helper.from_array(rng.standard_normal((H, 12)).astype(np.float32), f"w1_{e}"),
                  numpy_helper.from_array(rng.standard_normal((12, O)).astype(np.float32), f"w2_{e}"),
                  numpy_helper.from_array(np.array([e], np.int64), f"e{e}")]
        nodes += [helper.make_node("MatMul", ["x", f"w1_{e}"], [f"a{e}"]),
                  helper.make_node("Relu", [f"a{e}"], [f"r{e}"]),
                  helper.make_node("MatMul", [f"r{e}", f"w2_{e}"], [f"b{e}"]),
                  helper.make_node("Gather", ["combine", f"e{e}"], [f"c{e}"], axis=1),
                  helper.make_node("Mul", [f"b{e}", f"c{e}"], [f"y{e}"])]
        parts.append(f"y{e}")
    nodes.append(helper.make_node("Sum", parts, ["y"]))
    g = helper.make_graph(nodes, "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", O])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_per_expert_branches_stay_exact_and_say_that_only_the_router_shrinks():
    an = spa.analyze(loop_graph(), input_shapes={"x": [3, 8]})
    layers = find_layers(an.model, an.weights, an.probe.shapes)
    assert [(la.blocked, la.remaps, la.expert_weights) for la in layers] == [("", [("scatter", 1)], [])]
    assert "only the router shrinks" in layers[0].summary()["note"]
    kept = {0: [0, 3]}
    pruned, w = cut_experts(an.model, an.weights, layers, kept)
    full = weight_store.full_model(pruned, w)
    feeds = [{"x": np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)} for n in (1, 4, 30)]
    assert worst(masked(an.full_model(), layers, kept), full, feeds) < EXACT
    assert worst(an.full_model(), full, feeds) > 1e-3


def test_a_stacked_weight_read_elsewhere_blocks_the_layer():
    m = moe_graph(remap=False)
    m.graph.node.append(helper.make_node("ReduceSum", ["experts"], ["total"], keepdims=0, name="total"))
    m.graph.node.append(helper.make_node("Add", ["y", "total"], ["y2"], name="use"))
    m.graph.output[0].name = "y2"
    an = spa.analyze(m, input_shapes={"x": [3, 8]})
    layers = find_layers(an.model, an.weights, an.probe.shapes)
    assert layers[0].blocked == "'experts', cut with the experts, is also read by 'total'"


def test_a_global_budget_spreads_the_kept_experts_by_normalised_score():
    from types import SimpleNamespace as L
    from spa.planning.experts import plan_experts
    layers = [L(index=0, experts=4, top_k=2, blocked="", router="a"),
              L(index=1, experts=4, top_k=1, blocked="", router="b")]
    scores = {0: [4.0, 3.0, 2.0, 1.0], 1: [10.0, 0.1, 0.1, 0.1]}   # layer 1: one expert carries it
    assert {i: v.tolist() for i, v in plan_experts(layers, scores, 0.5).items()} == {0: [0, 1], 1: [0, 1]}
    assert {i: v.tolist() for i, v in plan_experts(layers, scores, 0.5, global_rank=True).items()} == \
        {0: [0, 1, 2], 1: [0]}
    with pytest.raises(SpaError, match="--global keeps 2 of 8 experts, but the layers' TopKs need 3"):
        plan_experts(layers, scores, 0.25, global_rank=True)


def test_tcess_weighs_selection_by_probability():
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    got = tcess(logits, logits, 1)
    assert np.allclose(got, [0.25, 0.3, 0.0])
    assert np.allclose(tcess(logits, logits, 2), [0.25, 0.45, 0.15])
    assert selection_share(logits, 2, [0, 1]) == 0.75


@pytest.mark.torch
def test_spa_prune_target_experts_on_the_command_line(tmp_path):
    from click.testing import CliRunner
    from spa.cli import cli
    out = tmp_path / "half.onnx"
    got = CliRunner().invoke(cli, ["prune", export("mixtral_moe"), "-o", str(out), "--target", "experts=0.5"])
    assert got.exit_code == 0, got.output
    assert "experts layer 0 (node_linear_4): kept 2 of 4" in got.output and out.exists()
    got = CliRunner().invoke(cli, ["prune", export("mixtral_moe"), "-o", str(tmp_path / "q.onnx"),
                                   "--target", "experts=1.5"])
    assert got.exit_code != 0 and "experts=F: F is the fraction of each layer's experts kept" in got.output


def ort_moe_graph(E=6, H=8, I=12, k=2, op="MoE"):
    """x [N, 8] -> router Gemm (6 experts, with a bias) -> com.microsoft MoE (top 2, relu, fc1/fc2
    weights [E, out, in] and biases) or QMoE (8-bit weights [E, out, in] with per-row scales):
    onnxruntime's fused mixture of experts."""
    rng = np.random.default_rng(3)
    arrays = {"router": rng.standard_normal((E, H)), "router_b": rng.standard_normal(E)}
    if op == "MoE":
        arrays.update(fc1=rng.standard_normal((E, I, H)), fc1_b=rng.standard_normal((E, I)),
                      fc2=rng.standard_normal((E, H, I)) * 0.3, fc2_b=rng.standard_normal((E, H)))
        inputs, extra = ["x", "logits", "fc1", "fc1_b", "fc2", "fc2_b"], {}
    else:
        arrays.update(fc1=rng.integers(0, 255, (E, I, H)).astype(np.uint8), fc1_s=rng.random((E, I)) * 0.02,
                      fc2=rng.integers(0, 255, (E, H, I)).astype(np.uint8), fc2_s=rng.random((E, H)) * 0.02)
        inputs, extra = ["x", "logits", "fc1", "fc1_s", "", "fc2", "fc2_s"], {"expert_weight_bits": 8}
    inits = [numpy_helper.from_array(v if v.dtype == np.uint8 else v.astype(np.float32), n) for n, v in arrays.items()]
    nodes = [helper.make_node("Gemm", ["x", "router", "router_b"], ["logits"], transB=1, name="router_gemm"),
             helper.make_node(op, inputs, ["y"], name="moe", domain="com.microsoft", k=k, activation_type="relu",
                              normalize_routing_weights=1, **extra)]
    g = helper.make_graph(nodes, "ort_moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", H])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


@pytest.mark.parametrize("op", ["MoE", "QMoE"])
@pytest.mark.parametrize("kept", [[0, 2, 5], [1, 4], [0, 1, 2, 3, 4]])
def test_onnxruntime_moe_op_loses_experts_exactly(kept, op):
    model = ort_moe_graph(op=op)
    an = spa.analyze(model, input_shapes={"x": [3, 8]})
    layers = find_layers(an.model, an.weights, an.probe.shapes)
    assert [(la.experts, la.top_k, la.topk, la.blocked) for la in layers] == [(6, 2, "moe", "")]
    per_expert = ["fc1", "fc1_b", "fc2", "fc2_b"] if op == "MoE" else ["fc1", "fc1_s", "fc2", "fc2_s"]
    assert sorted(c for c, _ in layers[0].slices) == per_expert + ["router", "router_b"]
    pruned, w = cut_experts(an.model, an.weights, layers, {0: kept})
    full = weight_store.full_model(pruned, w)
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((n, 8)).astype(np.float32)} for n in (1, 5, 64)]
    assert worst(masked(an.full_model(), layers, {0: kept}), full, feeds) < EXACT
    assert worst(an.full_model(), full, feeds) > 1e-3
    assert [list(t.dims)[0] for t in full.graph.initializer if t.name.startswith("fc")] == [len(kept)] * 4


def test_target_experts_on_the_moe_op_refuses_fewer_experts_than_k():
    res = spa.prune(ort_moe_graph(), target="experts=0.5", input_shapes={"x": [3, 8]})
    assert [len(e["kept"]) for e in res.report["experts"]["layers"]] == [3]
    with pytest.raises(SpaError, match=r"keeps 1 of 6 experts in layer 0 \('router_gemm'\).*routes each token to 2"):
        spa.prune(ort_moe_graph(), target="experts=0.2", input_shapes={"x": [3, 8]})


def test_measured_drift_scores_each_expert_by_the_output_it_moves():
    """--allocate sensitivity: each expert's score is 1 - cosine of the outputs with it removed,
    measured here on the masked original the test builds itself."""
    from spa.scoring.experts import drift_scores
    m = moe_graph(remap=False)
    an = spa.analyze(m, input_shapes={"x": [16, 8]})
    layers = find_layers(an.model, an.weights, an.probe.shapes)
    feeds = [{"x": np.random.default_rng(5).standard_normal((16, 8)).astype(np.float32)}]
    got = drift_scores(an, layers, feeds)[0]
    s0 = ort.InferenceSession(an.full_model().SerializeToString())
    ref = s0.run(None, feeds[0])[0].ravel().astype(np.float64)
    for e in range(5):
        others = {0: [i for i in range(5) if i != e]}
        s = ort.InferenceSession(masked(an.full_model(), layers, others).SerializeToString())
        y = s.run(None, feeds[0])[0].ravel().astype(np.float64)
        assert abs(got[e] - (1 - ref @ y / np.linalg.norm(ref) / np.linalg.norm(y))) < 1e-6
    res = spa.prune(m, target="experts=0.6", allocate="sensitivity", input_shapes={"x": [16, 8]})
    rep = res.report["experts"]
    assert rep["scorer"] == "drift" and rep["layers"][0]["kept"] == sorted(np.argsort(-np.array(
        rep["layers"][0]["scores"]), kind="stable")[:3].tolist())
