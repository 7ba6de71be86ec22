"""How closely a pruned model follows the original (spa/fidelity.py): the guard on every prune and
the fidelity target."""
import numpy as np
import onnx
from click.testing import CliRunner

import spa
from spa.cli import cli
from graphs import residual_chain


def test_every_prune_reports_its_fidelity_and_the_cli_warns_when_it_is_low(tmp_path):
    m = residual_chain()
    gentle = spa.prune(m, 0.0)
    assert gentle.report["fidelity"]["min"] == 1.0
    harsh = spa.prune(m, 0.8)
    fid = harsh.report["fidelity"]
    assert set(fid["cosine"]) == {o.name for o in m.graph.output}
    assert 0.0 <= fid["min"] < gentle.report["fidelity"]["min"]
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    low = CliRunner().invoke(cli, ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.8"])
    assert low.exit_code == 0
    if fid["min"] < spa.fidelity.WARN_BELOW:
        assert "spa: warning:" in low.output and "--target fidelity" in low.output
    ok = CliRunner().invoke(cli, ["prune", str(path), "-o", str(tmp_path / "q.onnx"), "--ratio", "0.0"])
    assert ok.exit_code == 0 and "warning" not in ok.output


def test_cosine_of_outputs():
    from spa.fidelity import compare, cosine
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert cosine(a, a) == 1.0 and cosine(a, -a) == -1.0 and cosine(a, a[:1]) == 0.0
    assert cosine(np.array([1, 2, 3]), np.array([1, 0, 3])) == 2 / 3   # integer outputs: equal fraction
    assert compare({"y": a, "z": a}, {"y": a, "z": 2 * a})["min"] == 1.0
