"""Graph inputs of every ONNX numeric type are fed in their own dtype, by every feed spa makes (the
probe, validation, ``--calib random``, synthetic inputs, ``--check``, ``spa check``, ``spa bench``:
``spa.runtime.feeds``); inputs spa cannot make up are refused in one line that says what to do."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.utils
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T, helper

from spa.cli import cli
from graphs import small_mlp, typed_input
from spa.runtime import feeds

NUMERIC = ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL",
           "FLOAT16", "BFLOAT16", "FLOAT", "DOUBLE"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("kind", NUMERIC)
def test_every_numeric_input_type_is_fed_in_its_own_dtype(tmp_path, kind):
    elem = getattr(T, kind)
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(typed_input(elem), str(path))
    # the probe, validation, --calib random (wanda), the fidelity guard's synthetic inputs, --check
    res = run("prune", path, "-o", out, "--ratio", "0.5", "--criterion", "wanda", "--calib", "random", "--check")
    assert res.exit_code == 0, res.output
    pruned = onnx.load(str(out))
    assert {i.name: i.type.tensor_type.elem_type for i in pruned.graph.input}["aux"] == elem
    assert {t.name: list(t.dims) for t in pruned.graph.initializer}["w1"] == [4, 4]
    res = run("check", path, out)            # spa check: random inputs of each input's type
    assert res.exit_code in (0, 1) and "error" not in res.output, res.output
    res = run("bench", path, out, "--iters", "2", "--warmup", "1")
    assert res.exit_code == 0, res.output
    res = run("prune", path, "-o", tmp_path / "f.onnx", "--target", "fidelity=0.9")   # the search's masked runs
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("kind", NUMERIC)
def test_random_values_hold_their_dtype_and_range(kind):
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(getattr(T, kind)))
    assert feeds.numpy_dtype(getattr(T, kind)) == dtype
    rng = np.random.default_rng(0)
    v = feeds.random_value(rng, (3, 5), dtype, (0, 70_000))
    assert v.dtype == dtype and v.shape == (3, 5)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        assert v.min() >= 0 and v.max() <= min(info.max, 69_999)
    assert feeds.for_ort({"a": v})["a"] is not v if kind == "BFLOAT16" else feeds.for_ort({"a": v})["a"] is v


def _string_to_ids():
    """s: string [1, 4] -> LabelEncoder -> ids (int64) -> Cast -> + x0 -> the MLP."""
    return small_mlp([helper.make_node("LabelEncoder", ["s"], ["ids"], domain="ai.onnx.ml", keys_strings=["a", "b"],
                                  values_int64s=[1, 2], default_int64=0, name="le"),
                 helper.make_node("Cast", ["ids"], ["idf"], to=T.FLOAT, name="cast"),
                 helper.make_node("Add", ["x0", "idf"], ["x"], name="add")],
                [helper.make_tensor_value_info("x0", T.FLOAT, [1, 4]), helper.make_tensor_value_info("s", T.STRING, [1, 4])],
                opsets=[helper.make_opsetid("ai.onnx.ml", 4)])


def _string_aside():
    """x -> the MLP; s: string [2] -> Identity -> a string output of its own."""
    return small_mlp([helper.make_node("Identity", ["x1"], ["x"], name="x_id"), helper.make_node("Identity", ["s"], ["s_out"], name="s_id")],
                [helper.make_tensor_value_info("x1", T.FLOAT, [1, 4]), helper.make_tensor_value_info("s", T.STRING, [2])],
                outputs=[helper.make_tensor_value_info("s_out", T.STRING, [2])])


def _optional():
    """o: optional(float [1, 4]) -> OptionalGetElement -> + x0 -> the MLP."""
    opt = helper.make_value_info("o", helper.make_optional_type_proto(helper.make_tensor_type_proto(T.FLOAT, [1, 4])))
    return small_mlp([helper.make_node("OptionalGetElement", ["o"], ["of"], name="get"),
                 helper.make_node("Add", ["x0", "of"], ["x"], name="add")],
                [helper.make_tensor_value_info("x0", T.FLOAT, [1, 4]), opt])


def _float8():
    return typed_input(T.FLOAT8E4M3FN)


@pytest.mark.parametrize("build, what, extract, cut", [
    (_string_to_ids, "a string tensor", ["x0", "ids"], "('ids', computed from 's', become inputs)"),
    (_string_aside, "a string tensor", ["x1"], "'s' feeds no numeric tensor"),
    (_optional, "an optional input", ["x0", "of"], "('of', computed from 'o', become inputs)"),
    (_float8, "a float8e4m3fn tensor", ["x0", "auxf"], "('auxf', computed from 'aux', become inputs)"),
])
def test_inputs_spa_cannot_make_up_are_refused_with_the_cut_that_makes_the_rest_prunable(tmp_path, build, what,
                                                                                       extract, cut):
    path = tmp_path / "m.onnx"
    onnx.save(build(), str(path))
    for cmd in (["prune", path, "-o", tmp_path / "p.onnx"], ["inspect", path]):
        res = run(*cmd)
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
        lines = [line for line in res.output.splitlines() if not line.startswith("spa: [")]
        assert len(lines) == 1 and lines[0].startswith("spa: error: input ") and "Traceback" not in res.output
        assert what in lines[0] and f"onnx.utils.extract_model(MODEL, 'part.onnx', {extract}, ['y'])" in lines[0]
        assert cut in lines[0]
    # what the message says to do works: the numeric part prunes
    onnx.utils.extract_model(str(path), str(tmp_path / "part.onnx"), extract, ["y"])
    res = run("prune", tmp_path / "part.onnx", "-o", tmp_path / "p.onnx", "--ratio", "0.5")
    assert res.exit_code == 0, res.output
    assert "1 groups pruned" in res.output
