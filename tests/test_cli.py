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
    from spa.io import session
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
