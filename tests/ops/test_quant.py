"""Quantized models (spa/ops/quant.py): QDQ, QOperator and integer operators, MatMulNBits, as
onnxruntime.quantization writes them (tools/export_deploy.py) and as hand-built graphs."""
import collections

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.runtime import probing
from spa.verify.oracle import check_groups, check_joint
from exported import deploy as export, ops

EXACT = 1e-5


def prunable(an):
    return sum(g.prunable for g in an.groups)


def _initializers(model):
    return {t.name: t for t in model.graph.initializer}


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", ["resnet18_qdq", "resnet18_qdq_pertensor"])
def test_static_qdq_resnet18_prunes_like_float_exactly_and_stays_quantized(name):
    """QuantizeLinear/DequantizeLinear pairs (quantize_static, per channel and per tensor): every
    channel group of the float resnet18 is prunable, the oracle is exact (the float computation
    between the pairs), 0.3 removes >= 1.8x of the MACs, and the pruned model keeps its int8 weights,
    their sliced per-channel scales and its Q/DQ pairs."""
    path = export(name)
    assert ops(path)["DequantizeLinear"] >= 20
    an = spa.analyze(path)
    assert prunable(an) >= 12
    assert check_joint(an, seed=1)["error"] < EXACT
    res = spa.prune(path, 0.3, analysis=an, round_to=1)   # exact counts: the MACs bound below
    assert res.report["before"]["macs"] >= 1.8 * res.report["after"]["macs"]
    assert res.report["after"]["params"] < 0.6 * res.report["before"]["params"]
    pruned = res.model
    kinds = collections.Counter(n.op_type for n in pruned.graph.node)
    assert kinds["DequantizeLinear"] == ops(path)["DequantizeLinear"] and kinds["QuantizeLinear"] >= 20
    inits = _initializers(pruned)
    for n in pruned.graph.node:   # every Conv weight is still int8 behind its DequantizeLinear
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == 4:
            w, scale = inits[n.input[0]], inits[n.input[1]]
            assert w.data_type == TensorProto.INT8
            assert list(scale.dims) in ([], [1], [w.dims[0]])
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    y = probing.session(pruned).run(None, {probing.graph_inputs(pruned)[0].name: x})[0]
    assert y.shape == (1, 1000) and np.isfinite(y).all()


@pytest.mark.slow
@pytest.mark.torch
def test_qoperator_resnet18_prunes_and_runs_within_a_quantization_step():
    """QLinearConv/QLinearAdd/QGemm (QOperator format): the same groups as QDQ; the oracle cuts a
    channel by holding it at its zero point.  onnxruntime's u8s8 kernels saturate pairwise int16 sums
    on x86, so which channels sit side by side can move a result by a quantization step: the error is
    bounded, not zero."""
    path = export("resnet18_qop")
    assert ops(path)["QLinearConv"] == 20
    an = spa.analyze(path)
    assert prunable(an) >= 12
    errors = [r["error"] for r in check_groups(an)]
    assert max(errors) < 0.05 and sum(e == 0 for e in errors) >= len(errors) // 2, errors
    res = spa.prune(path, 0.3, analysis=an, round_to=1)   # exact counts: the MACs bound below
    assert res.report["before"]["macs"] >= 1.8 * res.report["after"]["macs"]
    assert collections.Counter(n.op_type for n in res.model.graph.node)["QLinearConv"] == 20


@pytest.mark.slow
@pytest.mark.torch
def test_dynamic_int8_bert_prunes_heads_and_mlp():
    """quantize_dynamic: MatMulInteger with DynamicQuantizeLinear activations (whose run-time range
    makes the batch rows of the original itself depend on the batch: validation compares with it)."""
    path = export("bert_qdyn")
    assert ops(path)["MatMulInteger"] >= 12
    an = spa.analyze(path)
    assert prunable(an) >= 8
    assert check_joint(an, seed=1)["error"] < EXACT
    res = spa.prune(path, 0.3, analysis=an)
    assert res.report["after"]["macs"] < 0.8 * res.report["before"]["macs"]


@pytest.mark.slow
@pytest.mark.torch
def test_4bit_matmulnbits_llama_prunes_whole_blocks():
    """MatMulNBits (4-bit blocks of 32 along K): output channels are rows; input channels go in whole
    blocks only (the 16-wide head dims cannot: they stay), so every pruned K is a multiple of the
    block size; N and K are rewritten."""
    path = export("llama_4bit")
    assert ops(path)["MatMulNBits"] >= 10
    an = spa.analyze(path)
    assert prunable(an) >= 6
    assert check_joint(an, seed=1)["error"] < EXACT
    res = spa.prune(path, 0.5, analysis=an)
    assert res.report["after"]["macs"] < 0.7 * res.report["before"]["macs"]
    for n in res.model.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: x.i for x in n.attribute}
            assert a["K"] % a["block_size"] == 0
    logits = probing.session(res.model).run(None, {"input_ids": np.zeros((2, 9), np.int64)})[0]
    assert logits.shape == (2, 9, 256)


def _qlinear_mlp():
    """x float -> QuantizeLinear -> QLinearMatMul (per-column int8 weights) -> QLinearMatMul -> DQ."""
    rng = np.random.default_rng(0)
    s, zp = np.float32(0.05), np.uint8(128)
    w1 = rng.integers(-60, 60, (16, 24)).astype(np.int8)
    w2 = rng.integers(-60, 60, (24, 8)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(s), "s"), numpy_helper.from_array(np.array(zp), "zp"),
             numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.full(24, 0.01, np.float32), "w1_s"),
             numpy_helper.from_array(np.zeros(24, np.int8), "w1_zp"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.full(8, 0.02, np.float32), "w2_s"),
             numpy_helper.from_array(np.zeros(8, np.int8), "w2_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("QLinearMatMul", ["xq", "s", "zp", "w1", "w1_s", "w1_zp", "s", "zp"], ["h"], name="mm1"),
             helper.make_node("QLinearMatMul", ["h", "s", "zp", "w2", "w2_s", "w2_zp", "s", "zp"], ["yq"], name="mm2"),
             helper.make_node("DequantizeLinear", ["yq", "s", "zp"], ["y"], name="dq")]
    g = helper.make_graph(nodes, "qmlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_qlinear_matmul_hidden_width_is_exact_through_the_zero_point():
    """The hidden width between two QLinearMatMul: pruning it equals holding the cut channels at
    their zero point (real 0) in the original; the per-column scales are sliced with the weights."""
    m = _qlinear_mlp()
    an = spa.analyze(m)
    hidden = [g for g in an.groups if g.prunable and g.channels == 24]
    assert hidden, [(g.channels, g.reason) for g in an.groups]
    assert max(r["error"] for r in check_groups(an, groups=hidden)) < EXACT
    res = spa.prune(m, 0.5)
    inits = _initializers(res.model)
    assert list(inits["w1"].dims) == [16, 12] and list(inits["w1_s"].dims) == [12]
    assert list(inits["w2"].dims) == [12, 8]
