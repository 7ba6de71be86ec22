"""The command line answers at once: ``spa --help``, a command's ``--help`` and a usage error load
click, the standard library and spa's import-free modules, never onnx, onnxruntime or numpy (they
cost ~0.5-3 s before anything happens: ml_dtypes through onnx alone was 0.45 s on an idle machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("onnx", "onnxruntime", "numpy", "ml_dtypes", "networkx", "onnx_graphsurgeon", "threadpoolctl", "PIL",
         "scipy", "torch")

PROBE = """
import json, sys
from click.testing import CliRunner
from spa.cli import cli
res = CliRunner().invoke(cli, sys.argv[1:])
loaded = sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(HEAVY)))
print(json.dumps({"exit": res.exit_code, "loaded": loaded, "output": res.output}))
"""


def _run(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in sys.path if p])}
    out = subprocess.run([sys.executable, "-c", PROBE.replace("HEAVY", repr(json.dumps(HEAVY))), *args],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args, code", [
    (["--help"], 0), (["prune", "--help"], 0), (["inspect", "--help"], 0), (["check", "--help"], 0),
    (["bench", "--help"], 0), (["apply-map", "--help"], 0),
    (["prune"], 2),                                        # usage error: no MODEL
    (["prune", "m.onnx", "-o", "x.onnx", "--criterion", "nope"], 2),
    (["check", "a.onnx", "b.onnx", "--input-shapes", "x:[oops]"], 2),
])
def test_help_and_usage_errors_load_nothing_heavy(args, code):
    got = _run(*args)
    assert got["exit"] == code, got["output"]
    assert got["loaded"] == [], f"spa {' '.join(args)} imported {got['loaded']}"


def test_help_lists_every_command_and_criterion():
    got = _run("prune", "--help")
    for name in ("taylor", "snip", "fisher", "obspa", "--quiet", "--verbose", "fidelity=C"):
        assert name in got["output"], name
    assert {"inspect", "prune", "check", "bench", "apply-map"} <= set(_run("--help")["output"].split())


def test_python_dash_m_spa_is_the_command():
    out = subprocess.run([sys.executable, "-m", "spa", "--help"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in sys.path if p])},
                         timeout=120)
    assert out.returncode == 0 and "prune" in out.stdout, out.stderr
