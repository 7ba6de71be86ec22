"""``spa check M M`` and ``spa bench M`` run on every model ``spa prune M`` takes, by path or by a zoo
model's name, from the command line and from Python, sized as the prune sizes them (one size plan,
one feed maker: ``spa.runtime.probing.first_run``), with no onnxruntime log line on the terminal."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import spa
from exported import transformers
from spa.cli import cli
from spa.verify.bench import benchmark
from spa.verify.check import compare

ROOT = Path(__file__).resolve().parents[2]
DECODERS = ["llama_gqa_kv", "llama_gqa", "gpt2_ts", "gpt2_dynamo", "bert"]
ZOO = ["ppocr_cls", "ppocr_rec", "magika", "yolov8n", "ppocr_det"]


def _spa(*args):
    """``python -m spa ARGS`` in a subprocess: what reaches the terminal, onnxruntime's own C++ log included."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in sys.path if p])}
    return subprocess.run([sys.executable, "-m", "spa", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("name", DECODERS)
def test_check_and_bench_run_where_prune_runs(name):
    path = transformers(name)
    probed = {k: list(np.shape(v)) for k, v in spa.analyze(path).probe.inputs.items()}
    res = CliRunner().invoke(cli, ["check", path, path, "--every-size", "--json"])
    assert res.exit_code == 0, res.output
    got = compare(path, path, every_size=True)
    assert got["passed"] and got["input_shapes"] == probed       # the sizes the prune probed
    assert all(s["passed"] for s in got["sizes"]), got["sizes"]
    res = CliRunner().invoke(cli, ["bench", path, path, "--iters", "2", "--warmup", "0", "--batch", "1,2"])
    assert res.exit_code == 0, res.output
    assert len(benchmark([path], iters=2, warmup=0, batches=(1, 2))["results"]) == 2


def test_kv_cache_decoder_on_the_terminal():
    """The KV-cache export (mask = past + sequence): check and bench pass, and a size it refuses is one
    ``spa: error`` line, without onnxruntime's raw log line beside it."""
    path = transformers("llama_gqa_kv")
    for args in (["check", path, path], ["bench", path, "--iters", "2", "--warmup", "0"]):
        out = _spa(*args)
        assert out.returncode == 0, out.stderr
        assert "onnxruntime:" not in out.stderr, out.stderr
    wrong = "input_ids:[1,16],attention_mask:[1,5],past_key_values.0.key:[1,2,3,16]"
    for args in (["check", path, path, "--input-shapes", wrong],
                 ["bench", path, "--iters", "2", "--input-shapes", wrong]):
        out = _spa(*args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("spa: error: "), out.stderr


@pytest.mark.parametrize("name", ZOO)
def test_zoo_names_from_python_and_the_command_line(name):
    got = compare(name, name)
    assert got["passed"], got
    assert benchmark([name], iters=1, warmup=0)["results"][0]["model"] == name
    res = CliRunner().invoke(cli, ["check", name, name])
    assert res.exit_code == 0, res.output
