"""``spa sweep`` (``spa.sweep``): every target x criterion pruned, the fidelity measured, the Pareto
table and plot written; local processes and Ray tasks give the same table (the same ``run_one``).

A residual chain of conv+BN blocks (tests/graphs.py) keeps each prune to a fraction of a second; the
Ray test starts a local Ray instance in the test process (two CPUs), compares on it and on YOLOv8n (the
zoo's, l2 at two targets), and checks the rows came from other processes."""
import json
import os
from html.parser import HTMLParser

import onnx
import pytest
from click.testing import CliRunner

from spa import sweep as sw
from spa.cli import cli
from spa.errors import SpaError
from graphs import residual_chain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "chain.onnx"
    onnx.save(residual_chain(), str(path))
    return path


def test_combinations():
    assert sw.combinations("macs=1.5,2,params=3", "l2, random") == [
        {"target": "macs=1.5", "criterion": "l2"}, {"target": "macs=1.5", "criterion": "random"},
        {"target": "macs=2", "criterion": "l2"}, {"target": "macs=2", "criterion": "random"},
        {"target": "params=3", "criterion": "l2"}, {"target": "params=3", "criterion": "random"}]
    with pytest.raises(SpaError, match="at least one"):
        sw.combinations("", "l2")


def test_pareto():
    rows = [{"macs_factor": 2.0, "fidelity": 0.9}, {"macs_factor": 1.5, "fidelity": 0.95},
            {"macs_factor": 1.5, "fidelity": 0.8}, {"macs_factor": 3.0, "fidelity": 0.5},
            {"macs_factor": 2.0, "fidelity": 0.85}, {"error": "x", "target": "macs=9", "criterion": "l2"}]
    assert sw.pareto(rows) == [0, 1, 3]


def test_options_are_checked_before_any_work(chain):
    with pytest.raises(SpaError, match="needs calibration data"):
        sw.sweep(str(chain), "macs=1.5", "l2,wanda")


def rows_without_timing(res):
    return [{k: v for k, v in r.items() if k not in ("seconds", "worker", "original_ms", "pruned_ms", "speedup")}
            for r in res["rows"]]


def test_bench_adds_latency(chain, tmp_path):
    r = CliRunner().invoke(cli, ["sweep", str(chain), "--targets", "macs=2", "-o", str(tmp_path), "--bench"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "sweep.json").read_text())
    (row,) = res["rows"]
    assert row["original_ms"] > 0 and row["pruned_ms"] > 0 and row["speedup"] > 0 and "output" not in row
    assert "| speedup | Pareto |" in (tmp_path / "sweep.md").read_text()


def test_cli_local_sweep(chain, tmp_path):
    out = tmp_path / "sw"
    r = CliRunner().invoke(cli, ["sweep", str(chain), "--targets", "macs=1.5,2", "--criteria", "l2,random",
                                 "-o", str(out), "--jobs", "2", "--keep-models"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "sweep.json").read_text())
    assert [(x["target"], x["criterion"]) for x in res["rows"]] == [
        ("macs=1.5", "l2"), ("macs=1.5", "random"), ("macs=2", "l2"), ("macs=2", "random")]
    for row in res["rows"]:
        assert row["macs_factor"] >= float(row["target"].split("=")[1]) and 0 < row["fidelity"] <= 1
        assert os.path.isfile(row["output"]) and not row["worker"].endswith(f":{os.getpid()}")
    assert res["pareto"] == sw.pareto(res["rows"]) and res["pareto"]
    md = (out / "sweep.md").read_text()
    assert md.count("\n") == 2 + 4 and md.count("| yes |") == len(res["pareto"])
    svg = (out / "sweep.svg").read_text()
    HTMLParser().feed(svg)
    assert svg.startswith("<svg") and svg.count("<circle") == 4 + len(res["pareto"])
    assert md in r.output


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                   runtime_env={"env_vars": {"PYTHONPATH": ROOT, "SPA_CACHE": os.environ["SPA_CACHE"]}})
    yield ctx.address_info["address"]
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("model, targets, criteria", [("chain", "macs=1.5,2", "l2,random"),
                                                      ("yolov8n", "macs=1.5,2", "l2")])
def test_ray_gives_the_local_table(chain, ray_address, model, targets, criteria):
    model = str(chain) if model == "chain" else model
    local = sw.sweep(model, targets, criteria, jobs=2)
    remote = sw.sweep(model, targets, criteria, ray=ray_address)
    assert rows_without_timing(remote) == rows_without_timing(local)
    assert all("error" not in r for r in local["rows"])
    assert sw.table(remote) == sw.table(local) and remote["pareto"] == local["pareto"]
    assert all(not r["worker"].endswith(f":{os.getpid()}") for r in remote["rows"])
