"""The Olive pass (``spa.olive.SpaPrune``, the ``olive`` extra): docs/olive.md's workflow run with ``olive run``.

The workflow prunes a small residual CNN with obspa at ``macs=1.5`` (calibration data from an Olive data
config), quantizes the result with Olive's ``OnnxDynamicQuantization`` and evaluates its latency; the
test checks the output model is pruned (fewer convolution weights) and quantized, and that both
models were evaluated.  Skipped where Olive is not installed (the test extra does not include it).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphs import residual_chain

ROOT = Path(__file__).resolve().parents[1]


def workflow_from_docs() -> dict:
    text = (ROOT / "docs" / "olive.md").read_text()
    block = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    return json.loads(block)


def test_docs_workflow_is_json_with_the_pass():
    wf = workflow_from_docs()
    assert wf["passes"]["prune"]["type"] == "SpaPrune"


@pytest.mark.slow
def test_olive_run_prune_quantize_evaluate(tmp_path):
    pytest.importorskip("olive")
    from spa import olive as spa_olive
    onnx.save(residual_chain(), str(tmp_path / "model.onnx"))
    (tmp_path / "olive_spa.json").write_text(json.dumps(spa_olive.package_config()))
    (tmp_path / "prune_quantize.json").write_text(json.dumps(workflow_from_docs()))
    out = subprocess.run([sys.executable, "-m", "olive", "run", "--config", "prune_quantize.json",
                          "--package-config", "olive_spa.json"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}, ops     # quantized
    conv_weights = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims) == 4)
    assert conv_weights(model) < conv_weights(residual_chain()) / 1.2                 # pruned before that
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "latency-avg" in json.dumps(metrics)
    reports = list((tmp_path / "cache").rglob("*.spa.json"))
    assert reports and json.loads(reports[0].read_text())["target"] == "macs=1.5"
