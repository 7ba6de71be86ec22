"""The CLI and the Python API on small graphs: tables, JSON, reports, bad inputs."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import spa
from graphs import G, residual_chain
from spa.cli import cli


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "res.onnx"
    onnx.save(residual_chain(), str(path))
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_inspect_table_and_json(model_path):
    res = run("inspect", model_path)
    assert res.exit_code == 0, res.output
    assert "prunable" in res.output and "groups prunable" in res.output
    res = run("inspect", model_path, "--json")
    data = json.loads(res.stdout)
    assert data["totals"]["prunable_groups"] == 4
    assert {"id", "channels", "ops", "params", "macs", "prunable", "reason"} <= set(data["groups"][0])


def test_prune_writes_smaller_valid_model_and_report(model_path, tmp_path):
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    res = run("prune", model_path, "-o", out, "--ratio", "0.5", "--report", rep)
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["macs"] < report["before"]["macs"]
    assert all(g["kept"] >= 1 for g in report["groups"])
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned)
    from spa.runtime.probing import session
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert session(pruned).run(None, {"x": x})[0].shape == (1, 5)


def test_prune_options(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    for extra in (["--global"], ["--round-to", "4"], ["--criterion", "l1"], ["--exclude", "Conv"]):
        res = run("prune", model_path, "-o", out, "--ratio", "0.5", *extra)
        assert res.exit_code == 0, (extra, res.output)


def test_round_to_keeps_multiples():
    r = spa.prune(residual_chain(), 0.3, round_to=4)
    kept = [g["kept"] for g in r.report["groups"] if g["prunable"]]
    assert all(k % 4 == 0 for k in kept), kept


def test_exclude_protects_matching_groups():
    m = residual_chain()
    first_conv = m.graph.node[0].name
    r = spa.prune(m, 0.5, exclude=first_conv + "$")
    for g in r.report["groups"]:
        if first_conv in g["nodes"]:
            assert g["removed"] == 0


def test_global_never_empties_a_group():
    r = spa.prune(residual_chain(), 0.85, global_rank=True)
    assert all(g["kept"] >= 1 for g in r.report["groups"])


def test_zero_channel_goes_first():
    g = G()
    w = np.random.default_rng(1).standard_normal((6, 3, 3, 3)).astype(np.float32)
    w[2] = 0
    x = g.op("Relu", [g.op("Conv", ["x", g.w(value=w)], pads=[1] * 4)])
    out = g.op("Conv", [x, g.w(4, 6, 1, 1)])
    for crit in ("l1", "l2"):
        r = spa.prune(g.model([("x", [1, 3, 4, 4])], [out]), 0.2, criterion=crit)
        grp = next(e for e in r.report["groups"] if e["prunable"])
        assert grp["removed_channels"] == [2]


def test_output_never_overwrites_input(model_path):
    res = run("prune", model_path, "-o", model_path)
    assert res.exit_code == 2 and "overwrite" in res.output


@pytest.mark.parametrize("content,msg", [(b"not a model at all", "not an ONNX model"), (None, "no such file")])
def test_bad_input_files(tmp_path, content, msg):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    res = run("inspect", path)
    assert res.exit_code == 2
    assert msg in res.output and "Traceback" not in res.output


def test_missing_external_data(tmp_path):
    m = residual_chain()
    path = tmp_path / "ext.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    assert spa.analyze(str(path)).groups  # loads fine with its data
    (tmp_path / "ext.data").unlink()
    res = run("inspect", path)
    assert res.exit_code == 2 and "external data" in res.output


def test_invalid_ratio(model_path, tmp_path):
    res = run("prune", model_path, "-o", tmp_path / "x.onnx", "--ratio", "1.5")
    assert res.exit_code == 2 and "--ratio" in res.output


def test_unknown_operator_blocks_its_groups():
    g = G()
    x = g.conv("x", 3, 8)
    y = g.op("Hardmax", [x], axis=1)     # no rule: the 8 channels must not shrink
    z = g.conv("x", 3, 6)
    z = g.conv(z, 6, 8, act=None)
    out = g.op("Add", [y, z])
    an = spa.analyze(g.model([("x", [1, 3, 4, 4])], [out]))
    six = [gr for gr in an.groups if gr.channels == 6]
    eight = [gr for gr in an.groups if gr.channels == 8]
    assert six and all(gr.prunable for gr in six)
    assert eight and not any(gr.prunable for gr in eight)
    assert any("Hardmax" in gr.reason for gr in eight)


def test_api_accepts_path_and_proto(model_path):
    a = spa.analyze(str(model_path))
    b = spa.analyze(onnx.load(str(model_path)))
    assert [g.channels for g in a.groups] == [g.channels for g in b.groups]


# ----------------------------------------------------------------------------- prune --check / --bench

METRICS = {"name", "shape", "max_abs", "mean_abs", "max_rel", "mean_rel", "cosine", "top1", "passed"}


def _dynamic_batch(model):
    """The same model with a dynamic batch dimension 'N' on its input and output."""
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def test_prune_check_json_reports_agreement(model_path, tmp_path):
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    res = run("prune", model_path, "-o", out, "--ratio", "0.5", "--check", "--json", "--report", rep)
    assert res.exit_code == 0, res.output  # pruning changes outputs: --check alone never fails on them
    data = json.loads(res.stdout)
    chk = data["check"]
    assert chk == json.loads(rep.read_text())["check"]
    assert chk["mode"] == "report" and chk["passed"] is None and chk["atol"] is None
    assert chk["input_shapes"] == {"x": [1, 3, 8, 8]} and chk["signature"]["ok"]
    (o,) = chk["outputs"]
    assert set(o) >= METRICS and o["shape"] == [1, 5] and o["passed"] is None
    assert 0 < o["max_abs"] and 0 < o["mean_abs"] <= o["max_abs"] and 0 < o["mean_rel"] <= o["max_rel"]
    assert -1 <= o["cosine"] < 0.999999 and o["top1"] in (0.0, 1.0)
    # the metrics are those of `spa check` on the same two files and inputs
    from spa.verify.check import compare
    ref = compare(str(model_path), str(out), input_shapes=chk["input_shapes"], seed=0)["outputs"][0]
    assert all(ref[k] == o[k] for k in ("max_abs", "mean_abs", "max_rel", "mean_rel", "cosine", "top1"))


def test_prune_check_tolerances_give_a_verdict(model_path, tmp_path):
    out = tmp_path / "small.onnx"
    res = run("prune", model_path, "-o", out, "--ratio", "0.5", "--atol", "1e-6")  # --atol implies --check
    assert res.exit_code == 1, res.output
    assert "check FAILED" in res.stdout and "cosine" in res.stdout and out.exists()
    res = run("prune", model_path, "-o", out, "--ratio", "0.5", "--rtol", "1e-3", "--json")
    chk = json.loads(res.stdout)["check"]
    assert res.exit_code == 1 and chk["mode"] == "tolerance" and chk["passed"] is False
    assert (chk["atol"], chk["rtol"]) == (1e-5, 1e-3) and chk["outputs"][0]["passed"] is False
    # nothing removed: the outputs agree and the check passes
    res = run("prune", model_path, "-o", out, "--ratio", "0", "--atol", "1e-4", "--json")
    chk = json.loads(res.stdout)["check"]
    assert res.exit_code == 0 and chk["passed"] is True
    assert chk["outputs"][0]["max_abs"] < 1e-4 and chk["outputs"][0]["cosine"] > 0.999999


def test_prune_check_and_bench_use_the_prune_input_shapes(tmp_path):
    src, out = tmp_path / "dyn.onnx", tmp_path / "small.onnx"
    onnx.save(_dynamic_batch(residual_chain()), str(src))
    res = run("prune", src, "-o", out, "--input-shapes", "x:[3,3,8,8]", "--check", "--bench",
              "--bench-warmup", "1", "--bench-iters", "3", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["check"]["input_shapes"] == {"x": [3, 3, 8, 8]}
    assert data["check"]["outputs"][0]["shape"] == [3, 5]
    assert data["check"]["outputs"][0]["top1"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert data["bench"]["batch"] == 3 and {r["batch"] for r in data["bench"]["results"]} == {3}


def test_prune_bench_reports_speedup(model_path, tmp_path):
    out = tmp_path / "small.onnx"
    res = run("prune", model_path, "-o", out, "--ratio", "0.5", "--bench", "--bench-iters", "5", "--json")
    assert res.exit_code == 0, res.output
    b = json.loads(res.stdout)["bench"]
    assert (b["provider"], b["warmup"], b["iters"], b["batch"]) == ("cpu", 3, 5, 1)
    rows = b["results"]
    assert [r["model"] for r in rows] == [str(model_path), str(out)]
    assert all(r["provider"] == "cpu" and r["median_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0
    assert b["speedup"] == rows[1]["speedup"] == pytest.approx(rows[0]["median_ms"] / rows[1]["median_ms"])
    assert (b["original_ms"], b["pruned_ms"]) == (rows[0]["median_ms"], rows[1]["median_ms"])
    assert "check" not in json.loads(res.stdout)


def test_prune_check_bench_table(model_path, tmp_path):
    res = run("prune", model_path, "-o", tmp_path / "s.onnx", "--check", "--bench", "--bench-iters", "3")
    assert res.exit_code == 0, res.output
    assert "cosine" in res.stdout and "top-1" in res.stdout and "not judged" in res.stdout
    assert "speedup" in res.stdout and "original" in res.stdout


def test_prune_check_refuses_to_compare_with_overwritten_input(model_path):
    before = model_path.read_bytes()
    res = run("prune", model_path, "-o", model_path, "--force", "--check")
    assert res.exit_code == 2 and "elsewhere" in res.output
    assert model_path.read_bytes() == before


@pytest.mark.parametrize("spec,msg", [("x:1,3", "expected name:[d0,d1,...]"), ("y:[1,3,8,8]", "not a model input")])
def test_bad_input_shapes_are_one_line_errors(model_path, tmp_path, spec, msg):
    for args in (["inspect", model_path], ["prune", model_path, "-o", tmp_path / "o.onnx"]):
        res = run(*args, "--input-shapes", spec)
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output


def test_every_flag_is_documented():
    """docs/cli.md names every command and every flag the CLI defines (a new flag needs a doc line)."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for name, cmd in cli.commands.items():
        assert f"`spa {name}" in text, name
        for param in cmd.params:
            for flag in getattr(param, "opts", []):
                if flag.startswith("--"):
                    assert f"`{flag}" in text, (name, flag)
