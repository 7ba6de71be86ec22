"""Never destroy a user's file: every write goes through one safe writer (spa.io.write_atomic).

Each case: the input is intact, the error is one line, the exit code is 2, nothing is left behind.
"""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import onnx
import pytest
from click.testing import CliRunner

from graphs import residual_chain
from spa import io
from spa.cli import cli
from spa.errors import SpaError


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith(".spa-")]


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(residual_chain(), str(path))
    return path


@pytest.fixture
def external(tmp_path):
    """A model whose weights live in weights.bin beside it."""
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save_model(residual_chain(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return path


def refused(res, *paths_and_digests):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("spa: error")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for path, before in paths_and_digests:
        assert digest(path) == before, f"{path} changed"
    return lines[0]


def test_report_onto_the_input_or_the_output_is_refused(model, tmp_path):
    before = digest(model)
    line = refused(run("prune", model, "-o", tmp_path / "out.onnx", "--report", model), (model, before))
    assert "input of this run" in line
    assert not (tmp_path / "out.onnx").exists()  # refused before any work
    line = refused(run("prune", model, "-o", tmp_path / "out.onnx", "--report", tmp_path / "out.onnx"), (model, before))
    assert "output model" in line


def test_output_onto_the_models_external_data_is_refused(external):
    data = external.parent / "weights.bin"
    before_m, before_d = digest(external), digest(data)
    line = refused(run("prune", external, "-o", data), (external, before_m), (data, before_d))
    assert "weights.bin" in line and "input of this run" in line
    # a hard link to the data is the same file
    link = external.parent / "alias.bin"
    os.link(data, link)
    refused(run("prune", external, "-o", link), (data, before_d))


def test_output_onto_a_symlink_or_a_device_is_refused(model, tmp_path):
    before = digest(model)
    target = tmp_path / "real.onnx"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    assert "symbolic link" in refused(run("prune", model, "-o", link), (model, before))
    assert link.is_symlink() and target.read_bytes() == b"keep me"
    assert "not a regular file" in refused(run("prune", model, "-o", "/dev/null"), (model, before))
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_calib_file_is_protected(model, tmp_path):
    import numpy as np
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((2, 3, 8, 8), np.float32))
    before = digest(calib)
    refused(run("prune", model, "-o", calib, "--criterion", "wanda", "--calib", calib), (calib, before))


def test_written_files_follow_the_umask_and_leave_nothing_behind(model, tmp_path):
    old = os.umask(0o022)
    try:
        out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
        res = run("prune", model, "-o", out, "--report", rep)
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o644) and oct(rep.stat().st_mode & 0o777) == oct(0o644)
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(SpaError, match="No space left"):
        io.write_atomic(target, boom)
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from spa import io
        def slow(tmp):
            open(tmp, "w").write("x")
            print("writing", flush=True)
            time.sleep(30)
        io.write_atomic({str(tmp_path / 'out.onnx')!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert leftovers(tmp_path)  # the temporary file exists while writing
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.onnx").exists()


def test_external_data_output_is_written_beside_it_and_never_appended(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "EXTERNAL_DATA_ABOVE", 0)  # take the >2 GB path on a small model
    out = tmp_path / "o.onnx"
    sizes = []
    for _ in range(2):  # a re-run replaces the data file, never appends to it
        io.save_model(residual_chain(), out)
        sizes.append(os.path.getsize(str(out) + ".data"))
    assert sizes[0] == sizes[1] > 0 and leftovers(tmp_path) == []
    onnx.checker.check_model(str(out))
    from spa.probing import session
    assert session(str(out)).get_inputs()[0].name == "x"
    data = tmp_path / "o.onnx.data"
    os.remove(data)
    data.symlink_to(tmp_path / "elsewhere")  # the data target is checked like the model's
    with pytest.raises(SpaError, match="symbolic link"):
        io.save_model(residual_chain(), out)
