"""What the commands print: a few summary lines by default, the group table with --verbose, nothing
but warnings and errors with --quiet, progress with the time left on stages of many steps, a line for
every file written where the user might not expect it."""
import importlib.util

import onnx
import pytest
from click.testing import CliRunner

import spa
from graphs import residual_chain
from spa.cli import cli
from spa.progress import stepper


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "res.onnx"
    onnx.save(residual_chain(), str(path))
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _progress_lines(output):
    return [line for line in output.splitlines() if line.startswith("spa: [")]


def test_prune_prints_a_summary_and_the_table_only_when_asked(model_path, tmp_path):
    res = run("prune", model_path, "-o", tmp_path / "a.onnx")
    assert res.exit_code == 0, res.output
    summary = [line for line in res.stdout.splitlines()]
    assert "score range" not in res.output and len(summary) <= 6, summary
    assert summary[-1] == f"wrote {tmp_path / 'a.onnx'}" and any(s.startswith("params ") for s in summary)
    assert _progress_lines(res.output)
    res = run("prune", model_path, "-o", tmp_path / "b.onnx", "--verbose")
    assert res.exit_code == 0 and "score range" in res.stdout
    res = run("prune", model_path, "-o", tmp_path / "c.onnx", "--quiet")
    assert res.exit_code == 0 and res.stdout == "" and not _progress_lines(res.output), res.output
    assert (tmp_path / "c.onnx").exists()
    assert run("prune", model_path, "-o", tmp_path / "d.onnx", "-q", "-v").exit_code == 2


def test_quiet_keeps_warnings(model_path, tmp_path):
    res = run("prune", model_path, "-o", tmp_path / "a.onnx", "--ratio", "0.9", "--quiet")
    assert res.exit_code == 0
    assert [line for line in res.output.splitlines() if line] == \
        [line for line in res.output.splitlines() if line.startswith("spa: warning:")]


def test_a_missing_output_folder_is_announced(model_path, tmp_path):
    out = tmp_path / "new" / "deeper" / "small.onnx"
    res = run("prune", model_path, "-o", out)
    assert res.exit_code == 0 and out.exists()
    assert f"the folder {out.parent} does not exist; spa will create it" in res.output


def test_prune_io_says_why_there_is_no_fidelity(model_path, tmp_path):
    res = run("prune", model_path, "-o", tmp_path / "a.onnx", "--prune-io", "nothing_matches")
    assert res.exit_code == 0, res.output
    assert "fidelity not measured: the inputs may change (--prune-io" in res.stdout


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib (the plot extra)")
def test_bench_plot_says_where_it_wrote(model_path, tmp_path):
    plot = tmp_path / "bench.png"
    res = run("bench", model_path, "--iters", "1", "--warmup", "0", "--plot", plot)
    assert res.exit_code == 0 and plot.exists()
    assert f"wrote the plot to {plot}" in res.output


def test_stepper_says_the_time_left_at_most_every_few_seconds():
    lines = []
    step = stepper(lines.append, 4, "calibration batch", every=0)
    for i in range(4):
        step(i, "x")
    assert lines[0] == "calibration batch 1/4: x" and all("left" in line for line in lines[1:]), lines
    lines.clear()
    step = stepper(lines.append, 100, "group")
    for i in range(100):
        step(i)
    assert lines == ["group 1/100"]   # the rest came within 5 s of it


def test_python_progress_is_a_callable(model_path):
    lines = []
    spa.prune(str(model_path), 0.3, criterion="wanda", calib="random", calib_batches=3, progress=lines.append)
    assert any(line.startswith("calibration batch 1/3") for line in lines), lines
    assert any("validating" in line for line in lines)
