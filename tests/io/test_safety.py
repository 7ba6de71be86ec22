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
    lines = [ln for ln in res.output.splitlines() if ln.startswith(("spa: error", "Error:"))]  # spa's, or click's
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
    monkeypatch.setattr("spa.io.save.EXTERNAL_DATA_ABOVE", 0)  # take the >2 GB path on a small model
    out = tmp_path / "o.onnx"
    sizes = []
    for _ in range(2):  # a re-run replaces the data file, never appends to it
        io.save_model(residual_chain(), out)
        sizes.append(os.path.getsize(str(out) + ".data"))
    assert sizes[0] == sizes[1] > 0 and leftovers(tmp_path) == []
    onnx.checker.check_model(str(out))
    from spa.runtime.probing import session
    assert session(str(out)).get_inputs()[0].name == "x"
    data = tmp_path / "o.onnx.data"
    os.remove(data)
    data.symlink_to(tmp_path / "elsewhere")  # the data target is checked like the model's
    with pytest.raises(SpaError, match="symbolic link"):
        io.save_model(residual_chain(), out)


# ----------------------------------------------------------------------------------------------
# reading only what the model's folder holds


def _with_location(tmp_path, location, offset=None, length=None, subgraph=False):
    """m.onnx whose first weight is external data at ``location`` (a file 'weights.bin' beside it
    holds the real bytes); ``subgraph``: the weight sits inside an If branch."""
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    (folder / "weights.bin").write_bytes(w.raw_data)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    entries = {"location": location}
    if offset is not None:
        entries["offset"] = str(offset)
    if length is not None:
        entries["length"] = str(length)
    for k, v in entries.items():
        e = w.external_data.add()
        e.key, e.value = k, v
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    if subgraph:
        branch = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "b", [], [y], [w])
        cond = numpy_helper.from_array(np.array(True), "c")
        graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
                                  "g", [x], [y], [cond])
    else:
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = folder / "m.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink_out", "hardlink", "fifo", "past_end", "subgraph"])
def test_external_data_outside_the_model_folder_is_never_read(tmp_path, case):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00" * 64)
    if case == "dotdot":
        path = _with_location(tmp_path, "../secret.bin")
    elif case == "absolute":
        path = _with_location(tmp_path, str(secret))
    elif case == "symlink_out":
        path = _with_location(tmp_path, "link.bin")
        (path.parent / "link.bin").symlink_to(secret)
    elif case == "hardlink":
        path = _with_location(tmp_path, "hard.bin")
        os.link(secret, path.parent / "hard.bin")
    elif case == "fifo":
        path = _with_location(tmp_path, "pipe.bin")
        os.mkfifo(path.parent / "pipe.bin")
    elif case == "past_end":
        path = _with_location(tmp_path, "weights.bin", offset=32, length=64)
    else:
        path = _with_location(tmp_path, "../secret.bin", subgraph=True)
    with pytest.raises(SpaError, match="external data") as err:
        io.load_model(str(path))
    assert "\n" not in str(err.value)
    res = run("inspect", path)  # the CLI: one line, exit 2, no hang
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output


def test_a_good_external_data_model_still_loads(tmp_path):
    path = _with_location(tmp_path, "weights.bin", offset=0, length=64)
    assert len(io.load_model(str(path)).graph.initializer[0].raw_data) == 64


def test_fifos_as_model_calib_or_overrides_do_not_hang(model, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert "not a regular file" in refused(run("inspect", fifo))
    out = tmp_path / "o.onnx"
    assert "not a regular file" in refused(run("prune", model, "-o", out, "--criterion", "wanda", "--calib", fifo))
    assert "--overrides" in refused(run("prune", model, "-o", out, "--overrides", fifo))
    assert "--overrides" in refused(run("prune", model, "-o", out, "--overrides", "/dev/zero"))


# ----------------------------------------------------------------------------------------------
# one front door: every command and the API take a path or a zoo model's name, with its default shapes


def test_every_command_and_the_api_take_zoo_names(tmp_path):
    import spa
    an = spa.analyze("yolov8n")
    assert an.probe.inputs["images"].shape == (1, 3, 320, 320)  # the manifest's default, not 224
    out = tmp_path / "y.onnx"
    res = run("prune", "yolov8n", "-o", out, "--ratio", "0.2")
    assert res.exit_code == 0, res.output
    res = run("check", "yolov8n", out)
    assert "images:[1,3,320,320]" in res.output and "Traceback" not in res.output, res.output
    res = run("inspect", "ppocr_cls")
    assert res.exit_code == 0 and "input shapes: x:[" in res.output, res.output
    res = run("bench", "ppocr_cls", "ppocr_cls", "--iters", "2", "--warmup", "0", "--json")
    import json
    rows = json.loads(res.stdout)["results"]
    assert res.exit_code == 0 and rows and not any(r.get("skipped") for r in rows), res.output


def test_a_minus_one_dim_is_dynamic():
    from onnx import TensorProto, helper
    from spa.verify.check import make_inputs
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 8, 8])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))
    assert make_inputs(m, batch=4)["x"].shape == (4, 3, 8, 8)
    from spa.runtime import shapes
    assert shapes.size_plan([x]).symbols == ["x[0]"]


# ----------------------------------------------------------------------------------------------
# bad options and damaged models: one line, exit 2, before any work where the option alone says so


@pytest.mark.parametrize("args, says", [
    (["--max-ratio", "nan"], "--max-ratio"), (["--max-ratio", "inf"], "--max-ratio"),
    (["--seed", "-1"], "--seed"), (["--target", "macs=inf"], "--target"), (["--round-to", "0"], "--round-to"),
    (["--input-shapes", "x:[]"], "rank"), (["--input-shapes", "x:[1,3,8,8,1]"], "rank"),
    (["--input-shapes", "x:[-1,3,8,8]"], ">= 1"), (["--input-shapes", "x:[1,3,8,100000000]"], "dim 3"),
    (["--calib-batches", "0"], "--calib-batches"), (["--hessian", "oracle"], None),
])
def test_bad_options_are_one_line(model, tmp_path, args, says):
    before = digest(model)
    line = refused(run("prune", model, "-o", tmp_path / "o.onnx", *args), (model, before))
    assert says is None or says in line, line
    assert not (tmp_path / "o.onnx").exists()


def test_calib_npz_reads_only_the_inputs_and_refuses_strings(model, tmp_path):
    import numpy as np
    good = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "c.npz"
    np.savez_compressed(path, x=good, unused=np.zeros(1, np.float32))
    res = run("prune", model, "-o", tmp_path / "o.onnx", "--criterion", "wanda", "--calib", path)
    assert res.exit_code == 0, res.output
    np.savez(path, x=np.array(["a", "b"]))
    assert "numbers" in refused(run("prune", model, "-o", tmp_path / "o.onnx", "--criterion", "wanda",
                                    "--calib", path))


def test_mutated_models_never_give_a_traceback(tmp_path):
    """A small mutation fuzzer over two models (damaged tensors, attributes, shapes, op types, names,
    opsets): inspect and prune answer every mutant with success or one line and exit 2."""
    import random
    import traceback
    from onnx import AttributeProto, TensorProto
    from graphs import attention
    rng = random.Random(0)
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    failures = []
    for base in (residual_chain(), attention()):
        for _ in range(40):
            m = onnx.ModelProto()
            m.CopyFrom(base)
            g, k = m.graph, rng.randrange(10)
            t = rng.choice(list(g.initializer))
            n = rng.choice(list(g.node))
            if k == 0:
                t.raw_data = t.raw_data[: len(t.raw_data) // 2]
            elif k == 1:
                t.dims[0] += rng.choice([-1, 1, 7])
            elif k == 2:
                t.data_type = rng.choice([TensorProto.INT64, TensorProto.STRING, TensorProto.FLOAT16, 99])
            elif k == 3 and len(n.input) > 1:
                del n.input[-1]
            elif k == 4 and n.attribute:
                a = rng.choice(list(n.attribute))
                if a.type == AttributeProto.INT:
                    a.i = rng.choice([-5, 0, 10 ** 9])
                elif a.type == AttributeProto.INTS and len(a.ints):
                    a.ints[0] = rng.choice([-5, 0, 10 ** 6])
            elif k == 5:
                rng.choice(list(g.input[0].type.tensor_type.shape.dim)).dim_value = rng.choice([-3, 0, 10 ** 7])
            elif k == 6:
                n.op_type = rng.choice(["Relu", "Conv", "Foo", "Reshape", "MatMul"])
            elif k == 7:
                n.output[0] = rng.choice(list(g.node)).input[0]
            elif k == 8:
                m.opset_import[0].version = rng.choice([1, 5, 99])
            else:
                t.ClearField("raw_data")
                t.float_data.extend([1.0] * 3)
            path.write_bytes(m.SerializeToString())
            for args in (["inspect", path], ["prune", path, "-o", out]):
                res = run(*args)
                if res.exception is not None and not isinstance(res.exception, SystemExit):
                    failures.append((k, type(res.exception).__name__, traceback.format_tb(res.exception.__traceback__)[-1]))
    assert not failures, failures[:3]


def test_inspect_graph_carries_every_prunable_group(tmp_path):
    import networkx as nx
    import spa
    path = tmp_path / "g.graphml"
    res = run("inspect", "yolov8n", "--graph", path)
    assert res.exit_code == 0, res.output
    G = nx.read_graphml(str(path))
    on_edges = {int(p.split(":")[1]) for _, _, d in G.edges(data=True)
                for p in (d.get("prunable_groups") or "").split(",") if p}
    prunable = {g.id for g in spa.analyze("yolov8n").groups if g.prunable}
    assert prunable and prunable <= on_edges
    assert {d["kind"] for _, d in G.nodes(data=True)} == {"input", "op", "output"}
    dot = tmp_path / "g.dot"
    assert run("inspect", "yolov8n", "--graph", dot).exit_code == 0
    assert dot.read_text().startswith("digraph spa {") and "color=blue" in dot.read_text()
    assert "--graph" in refused(run("inspect", "yolov8n", "--graph", tmp_path / "g.png"))


def test_check_sizes_a_path_like_prune_and_falls_back_when_refused():
    """spa check on the PP-OCRv4 recogniser's file (no --input-shapes): the defaults (224) are
    refused, so smaller sizes are tried as the probe does, instead of failing on a Concat."""
    from spa import zoo
    from spa.verify.check import compare
    path = str(zoo.fetch("ppocr_rec"))
    res = compare(path, path)
    assert res["passed"] and res["input_shapes"]["x"][2] < 224


def test_external_data_save_keeps_the_callers_weights_and_creates_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("spa.io.save.EXTERNAL_DATA_ABOVE", 0)
    m = residual_chain()
    before = sum(len(t.raw_data) for t in m.graph.initializer)
    io.save_model(m, tmp_path / "new" / "o.onnx")
    assert sum(len(t.raw_data) for t in m.graph.initializer) == before  # onnx would have moved them out
    assert (tmp_path / "new" / "o.onnx.data").is_file()


def test_tools_and_the_zoo_write_plain_modes(tmp_path):
    """Files the tools' exports and the zoo's fetch write through mkstemp get the mode a plain open() would
    (0644 under umask 022), not mkstemp's 0600."""
    import stat

    from export_deploy import _ort_checked_export
    from export_torchvision import checked_export
    from graphs import residual_chain
    old = os.umask(0o022)
    try:
        for export in (checked_export, _ort_checked_export):
            out = tmp_path / f"{export.__name__}.onnx"
            with export(out) as tmp:
                onnx.save(residual_chain(), tmp)
            assert stat.S_IMODE(out.stat().st_mode) == 0o644, export.__name__
        from spa.io import zoo
        data = b"spa"
        import hashlib
        zoo._atomic_write(tmp_path / "member.bin", lambda f: f.write(data), hashlib.sha256(data).hexdigest(), "test")
        assert stat.S_IMODE((tmp_path / "member.bin").stat().st_mode) == 0o644
    finally:
        os.umask(old)
