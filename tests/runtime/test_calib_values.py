"""``--calib`` data that cannot feed its input as it is (complex, NaN, inf, beyond the input type's
range, fractions for an integer input) is refused in one line naming the input and the problem
(``spa.runtime.calib.check_values``); good data of another real dtype is accepted."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from graphs import residual_chain, typed_input
from spa.cli import cli


def _x(n=4):
    return np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)


def _with(index, value, dtype=np.float64):
    a = _x().astype(dtype)
    a.flat[index] = value
    return a


IMAGE = {   # residual_chain: x float32 [1, 3, 8, 8]
    "complex": (_x().astype(np.complex64) + 1j, "holds complex (complex64) data"),
    "NaN": (_with(3 * 192 + 5, np.nan, np.float32), "holds NaN (in 1 of 4 samples, the first is sample 3)"),
    "inf": (_with(7, np.inf, np.float32), "holds inf (in 1 of 4 samples, the first is sample 0)"),
    "-inf in float64": (_with(200, -np.inf), "holds inf"),
    "beyond float32": (_with(400, 1e39), "values beyond float32's range"),
}
TOKENS = {  # typed_input(INT8): aux int8 [1, 4]
    "fractions": (np.array([[0, 1, 2, 3]] * 3 + [[0, 1.5, 2, 3]], np.float32), "holds fractions, and the input is int8"),
    "beyond int8": (np.array([[0, 1, 2, 300]] * 4, np.int64), "values outside int8's range [-128, 127]"),
    "negative beyond int8": (np.array([[0, 1, 2, 3]] * 3 + [[-200, 1, 2, 3]], np.int32), "outside int8's range"),
    "NaN": (np.array([[0, 1, 2, np.nan]] * 4), "holds NaN"),
}


def _prune(tmp_path, model, calib):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "calib.npz", **calib)
    return CliRunner().invoke(cli, ["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--criterion", "wanda",
                                    "--calib", str(tmp_path / "calib.npz"), "--ratio", "0.5"])


def _refused(res, name, message, tmp_path):
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    lines = [line for line in res.output.splitlines() if not line.startswith("spa: [")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith(f"spa: error: --calib: input '{name}' ") and message in lines[0], lines[0]
    assert not (tmp_path / "p.onnx").exists()


@pytest.mark.parametrize("case", list(IMAGE))
def test_bad_image_calibration_data_is_refused(tmp_path, case):
    data, message = IMAGE[case]
    _refused(_prune(tmp_path, residual_chain(), {"x": data}), "x", message, tmp_path)


@pytest.mark.parametrize("case", list(TOKENS))
def test_bad_integer_calibration_data_is_refused(tmp_path, case):
    data, message = TOKENS[case]
    calib = {"x0": np.zeros((4, 4), np.float32), "aux": data}
    _refused(_prune(tmp_path, typed_input(TensorProto.INT8), calib), "aux", message, tmp_path)


def test_real_data_of_other_dtypes_is_accepted(tmp_path):
    assert _prune(tmp_path, residual_chain(), {"x": _x().astype(np.float64)}).exit_code == 0
    calib = {"x0": np.zeros((4, 4), np.float16), "aux": np.array([[0, 1, 2, 3]] * 4, np.float32)}
    res = _prune(tmp_path, typed_input(TensorProto.INT8), calib)
    assert res.exit_code == 0, res.output
