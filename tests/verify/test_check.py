import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from spa.verify.check import (CheckError, compare, format_check,
                       make_inputs, parse_input_shapes)
from spa.verify.commands import check_command


def build(batch="N", scale=1.0, output="logits", extra_input=False, seed=0):
    """Conv(3->4, 3x3) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(4->5)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * scale
    b = rng.standard_normal(4).astype(np.float32)
    g = rng.standard_normal((5, 4)).astype(np.float32)
    c = rng.standard_normal(5).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "g", "c"], [output], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 2]))
    graph = helper.make_graph(
        nodes, "tiny", inputs,
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, 5])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (g, "g"), (c, "c"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def save(model, path):
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture
def models(tmp_path):
    return {
        "m": save(build(), tmp_path / "m.onnx"),
        "scaled": save(build(scale=1.1), tmp_path / "scaled.onnx"),
        "renamed": save(build(output="probs"), tmp_path / "renamed.onnx"),
        "extra": save(build(extra_input=True), tmp_path / "extra.onnx"),
    }


def test_make_inputs_defaults_and_overrides():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 7])
    mask = helper.make_tensor_value_info("mask", TensorProto.BOOL, [2])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [x, ids, mask, w],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones(1, np.float32), "w")])
    model = helper.make_model(graph, ir_version=8)
    inputs = make_inputs(model)
    assert set(inputs) == {"x", "ids", "mask"}  # the initializer listed as input is skipped
    from spa.runtime.shapes import BATCH_SIZE as first, OTHER_SIZE as other
    assert inputs["x"].shape == (first, 3, other, other) and inputs["x"].dtype == np.float32
    assert inputs["ids"].shape == (first, 7) and inputs["ids"].dtype == np.int64
    assert inputs["ids"].min() >= 0 and inputs["mask"].dtype == np.bool_
    inputs = make_inputs(model, {"x": [2, 3, 16, 16]}, batch=4)
    assert inputs["x"].shape == (4, 3, 16, 16) and inputs["ids"].shape == (4, 7)
    assert inputs["mask"].shape == (2,)  # static first dim: batch does not apply
    np.testing.assert_array_equal(make_inputs(model, seed=3)["x"], make_inputs(model, seed=3)["x"])
    with pytest.raises(CheckError, match="not a model input"):
        make_inputs(model, {"nope": [1]})


def test_parse_input_shapes():
    assert parse_input_shapes(["x:[1,3,224,224]"]) == {"x": [1, 3, 224, 224]}
    assert parse_input_shapes(["a:[1,3],b:[2]", "c:[]"]) == {"a": [1, 3], "b": [2], "c": []}
    assert parse_input_shapes("input:0:[1, 2]") == {"input:0": [1, 2]}
    assert parse_input_shapes([]) == {}
    for bad in (["x"], ["x:[a]"], ["x:[1],x:[2]"], ["x:[1] y:[2]"]):
        with pytest.raises(ValueError):
            parse_input_shapes(bad)


def test_same_model_passes(models):
    result = compare(models["m"], models["m"], input_shapes={"x": [2, 3, 8, 8]})
    assert result["passed"] and result["signature"]["ok"]
    (out,) = result["outputs"]
    assert out["name"] == "logits" and out["shape"] == [2, 5]
    assert out["max_abs"] == 0 and out["cosine"] == pytest.approx(1.0) and out["top1"] == 1.0
    assert "PASSED" in format_check(result)


def test_model_proto_inputs(models):
    result = compare(build(), onnx.load(models["scaled"]))
    assert not result["passed"] and result["outputs"][0]["max_abs"] > 1e-3


def test_cli_same_model_exit_0(models):
    res = CliRunner().invoke(check_command, [models["m"], models["m"]])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output


def test_cli_scaled_weight_fails(models):
    res = CliRunner().invoke(check_command, [models["m"], models["scaled"]])
    assert res.exit_code == 1, res.output
    assert "FAILED" in res.output


@pytest.mark.parametrize("other, needle", [("renamed", "'logits' missing"),
                                           ("extra", "input 'z' only in the candidate")])
def test_signature_mismatch_fails(models, other, needle):
    result = compare(models["m"], models[other])
    assert not result["passed"] and not result["signature"]["ok"]
    assert any(needle in p for p in result["signature"]["problems"])
    res = CliRunner().invoke(check_command, [models["m"], models[other]])
    assert res.exit_code == 1 and needle in res.output


def test_cli_json_and_inputs_file(models, tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    res = CliRunner().invoke(check_command, [models["m"], models["scaled"], "--json",
                                             "--inputs", str(tmp_path / "in.npz"),
                                             "--atol", "10", "--rtol", "0"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["passed"] and result["signature"] == {"ok": True, "problems": []}
    out = result["outputs"][0]
    assert out["shape"] == [3, 5]
    assert set(out) >= {"name", "shape", "max_abs", "mean_abs", "max_rel", "mean_rel", "cosine",
                        "top1", "passed"}


def test_cli_input_shapes_and_usage_errors(models, tmp_path):
    runner = CliRunner()
    res = runner.invoke(check_command, [models["m"], models["m"], "--input-shapes", "x:[4,3,8,8]",
                                        "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["outputs"][0]["shape"] == [4, 5]
    res = runner.invoke(check_command, [models["m"], models["m"], "--input-shapes", "x:[oops]"])
    assert res.exit_code == 2
    res = runner.invoke(check_command, [models["m"], models["m"], "--input-shapes", "y:[1]"])
    assert res.exit_code == 2 and "not a model input" in res.output
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    res = runner.invoke(check_command, [models["m"], str(broken)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
