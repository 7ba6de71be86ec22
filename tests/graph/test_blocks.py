"""Depth pruning (spa.graph.blocks, spa.surgery.blocks, --target blocks=N).

Oracle (DESIGN.md, "Blocks"): the model without a block equals the original with that branch's
output multiplied by 0, in onnxruntime, at every size the probe ran (and a decode step with a past
for the KV-cache decoder, where the removed layer's cache pair leaves the interface); the original
itself differs, so the comparison can fail.  The gate is built by ``spa.graph.blocks.gated``; a
hand-made model checks that gate against an Add the test builds itself."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.errors import SpaError
from spa.graph.blocks import find_blocks, gate_feed, gated
from spa.io import initializer_arrays
from spa.planning.counting import initializer_params
from spa.runtime import probing
from spa.surgery.blocks import cut_blocks
from spa.surgery.validate import validate
from spa.verify.oracle import feeds_at_every_size
from exported import model_path, transformers

EXACT = 1e-5
D, F = 8, 12


def residual_mlp(n_blocks=3, leak=False, broadcast=False, seed=0):
    """x [batch, seq, D] through ``n_blocks`` of ``h + W2 tanh(W1 h)``, then a head.  ``leak``: the
    second block's hidden activation is also read after its Add (it is then not a block);
    ``broadcast``: the last Add adds a [D] bias-like branch (no block either)."""
    rng = np.random.default_rng(seed)
    inits, nodes, h = [], [], "x"
    for i in range(n_blocks):
        inits += [numpy_helper.from_array(rng.standard_normal((D, F)).astype(np.float32) * 0.5, f"w1_{i}"),
                  numpy_helper.from_array(rng.standard_normal((F, D)).astype(np.float32) * 0.5, f"w2_{i}")]
        nodes += [helper.make_node("MatMul", [h, f"w1_{i}"], [f"a{i}"], name=f"up{i}"),
                  helper.make_node("Tanh", [f"a{i}"], [f"t{i}"], name=f"act{i}"),
                  helper.make_node("MatMul", [f"t{i}", f"w2_{i}"], [f"m{i}"], name=f"down{i}"),
                  helper.make_node("Add", [h, f"m{i}"], [f"h{i}"], name=f"residual{i}")]
        h = f"h{i}"
    if leak:
        inits.append(numpy_helper.from_array(rng.standard_normal((F, D)).astype(np.float32), "w_leak"))
        nodes += [helper.make_node("MatMul", ["t1", "w_leak"], ["leak"], name="leak"),
                  helper.make_node("Add", [h, "leak"], ["h_leak"], name="leak_add")]
        h = "h_leak"
    if broadcast:
        inits.append(numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "wb"))
        nodes += [helper.make_node("ReduceMean", [h], ["mean"], name="mean", axes=[1], keepdims=1),
                  helper.make_node("MatMul", ["mean", "wb"], ["bias"], name="bias"),
                  helper.make_node("Add", [h, "bias"], ["h_b"], name="broadcast_add")]
        h = "h_b"
    inits.append(numpy_helper.from_array(rng.standard_normal((D, 5)).astype(np.float32), "head"))
    nodes.append(helper.make_node("MatMul", [h, "head"], ["y"], name="head"))
    graph = helper.make_graph(nodes, "residual_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _run(proto, weights, feed):
    names = {i.name for i in proto.graph.input}
    return probing.output_runner(proto, initializer_arrays(proto, weights)).run(
        {k: v for k, v in feed.items() if k in names})


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 0.1))


def check_every_block(an, feeds, sets=None):
    """Each block alone (and each set in ``sets``) removed vs gated to 0: the worst relative error
    over the common outputs, and the smallest difference from the ungated original (must be > 0)."""
    blocks = find_blocks(an.model, an.probe.shapes, initializer_params(an.model))
    proto, names = gated(an.model, blocks, an.probe.dtypes)
    runner = probing.output_runner(proto, an.probe.consts)
    worst, tells = 0.0, np.inf
    for removed in sets or [[b.index] for b in blocks]:
        pruned, w = cut_blocks(an.model, an.weights, blocks, removed)
        validate(pruned, an, weights=w)
        for f in feeds:
            got = _run(pruned, w, f)
            ref = runner.run({**f, **gate_feed(names, removed)})
            full = runner.run({**f, **gate_feed(names, [])})
            for k, v in got.items():
                worst = max(worst, _rel(ref[k], v))
            tells = min(tells, max(_rel(full[k], v) for k, v in got.items()))
    return blocks, worst, tells


def test_hand_model_blocks_and_oracle():
    an = spa.analyze(residual_mlp())
    feeds = feeds_at_every_size(an)
    blocks, worst, tells = check_every_block(an, feeds, sets=[[0], [1], [2], [0, 1], [0, 1, 2]])
    assert [(b.add, b.stream, b.kind, b.params, len(b.nodes)) for b in blocks] == [
        ("residual0", "x", "mlp", 2 * D * F, 3), ("residual1", "h0", "mlp", 2 * D * F, 3),
        ("residual2", "h1", "mlp", 2 * D * F, 3)]
    assert worst < EXACT and tells > 1e-3
    # the gate itself against an Add the test builds: removing every block leaves the head on x
    pruned, w = cut_blocks(an.model, an.weights, blocks, [0, 1, 2])
    assert [n.op_type for n in pruned.graph.node] == ["MatMul"]
    x = feeds[0]["x"]
    head = numpy_helper.to_array([t for t in an.model.graph.initializer if t.name == "head"][0])
    assert _rel(x @ head, _run(pruned, w, feeds[0])["y"]) < EXACT


def test_what_is_not_a_block():
    an = spa.analyze(residual_mlp(leak=True, broadcast=True))
    adds = [b.add for b in find_blocks(an.model, an.probe.shapes, initializer_params(an.model))]
    # residual1's hidden activation is read after it (leak); broadcast_add's branch is [batch, 1, D];
    # leak_add's branch reads t1, inside residual1's: neither is a branch of the stream alone
    assert adds == ["residual0", "residual2"]


@pytest.mark.torch
def test_kv_decoder_blocks_leave_their_cache_pair():
    an = spa.analyze(transformers("llama_gqa_kv"))
    feeds = feeds_at_every_size(an)
    plan = an.probe.plan
    decode = plan.decode_point(an.probe.points) or plan.bumped("short")
    feeds.append(probing.input_feed(an.model, plan=plan, values=decode, seed=5))
    blocks, worst, tells = check_every_block(an, feeds, sets=[[0], [1], [2], [3], [0, 1], [0, 2], [1, 3]])
    assert [b.kind for b in blocks] == ["attention", "mlp", "attention", "mlp"]
    assert worst < EXACT and tells > 1e-3
    r = spa.prune(an.model, target="blocks=1", analysis=an)
    removed = r.report["blocks"]["removed"]
    assert len(removed) == 1 and r.report["blocks"]["found"] == 4
    gone = {(c["kind"], c["tensor"]) for c in r.report["interface"]}
    want = {("output", o) for o in blocks[removed[0]].outputs} | {("input", i) for i in blocks[removed[0]].inputs}
    assert gone == want
    assert all(c.get("removed") for c in r.report["interface"])
    if blocks[removed[0]].kind == "attention":
        assert gone and "skipped" in r.report["fidelity"]


@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=pytest.mark.torch), "yolov8n"])
def test_cnn_blocks_oracle(name):
    an = spa.analyze(model_path(name))
    blocks, worst, tells = check_every_block(an, feeds_at_every_size(an, most=2))
    assert len(blocks) == {"resnet18": 5, "yolov8n": 6}[name]   # resnet18: the identity blocks (3 downsample)
    assert {b.kind for b in blocks} == {"conv"}
    assert worst < EXACT and tells > 1e-4


def test_prune_blocks_report_and_refusals():
    model = residual_mlp()
    r = spa.prune(model, target="blocks=2")
    rep = r.report
    assert rep["target"] == "blocks=2" and rep["criterion"] == "influence" and rep["blocks"]["found"] == 3
    entries = rep["blocks"]["blocks"]
    infl = [e["influence"] for e in entries]
    kept = [e for e in entries if not e["removed"]]
    assert len(kept) == 1 and kept[0]["influence"] == max(infl)   # the most influential stays
    assert rep["after"]["params"] == rep["before"]["params"] - 2 * 2 * D * F
    assert rep["interface"] == [] and "min" in rep["fidelity"]
    s = spa.prune(model, target="blocks=1", allocate="sensitivity").report
    assert s["criterion"] == "drift" and "drift_after" in [e for e in s["blocks"]["blocks"] if e["removed"]][0]
    for bad, msg in [("blocks=0", "whole number >= 1"), ("blocks=1.5", "whole number"), ("blocks=x", "count N")]:
        with pytest.raises(SpaError, match=msg):
            spa.prune(model, target=bad)
    with pytest.raises(SpaError, match="3 removable residual blocks"):
        spa.prune(model, target="blocks=4")
    with pytest.raises(SpaError, match="one step"):
        spa.prune(model, target="blocks=1", steps=2)


def test_cli_blocks(tmp_path):
    from click.testing import CliRunner
    from spa.cli import cli
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(residual_mlp(), src)
    res = CliRunner().invoke(cli, ["prune", str(src), "-o", str(out), "--target", "blocks=1"])
    assert res.exit_code == 0, res.output
    assert "1 of 3 blocks removed" in res.output and "blocks removed (block influence" in res.output
    assert len(onnx.load(out).graph.node) == 2 * 4 + 1   # two blocks of 4 nodes and the head


def test_a_block_inside_another_is_left_to_the_outer_one():
    rng = np.random.default_rng(1)
    w = {k: numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32) * 0.5, k) for k in ("w1", "w2", "w3")}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="in"),
             helper.make_node("Tanh", ["a"], ["t"], name="act"),
             helper.make_node("MatMul", ["t", "w2"], ["m"], name="inner_mm"),
             helper.make_node("Add", ["a", "m"], ["inner"], name="inner_add"),
             helper.make_node("MatMul", ["inner", "w3"], ["y"], name="out"),
             helper.make_node("Add", ["x", "y"], ["z"], name="outer_add")]
    graph = helper.make_graph(nodes, "nested", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, D])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, D])], list(w.values()))
    an = spa.analyze(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    blocks, worst, tells = check_every_block(an, [an.probe.inputs])
    assert [(b.add, len(b.nodes), b.params) for b in blocks] == [("outer_add", 5, 3 * D * D)]
    assert worst < EXACT and tells > 1e-3
    pruned, _ = cut_blocks(an.model, an.weights, blocks, [0])
    assert [n.op_type for n in pruned.graph.node] == ["Identity"]   # z is a graph output: it keeps its name
