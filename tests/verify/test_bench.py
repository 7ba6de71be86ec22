import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import spa.verify.bench as bench
from spa.verify.bench import BenchError, benchmark, format_bench, plot_bench
from spa.verify.commands import bench_command
from spa.verify.check import cuda_available

FAST = dict(warmup=1, iters=3)
KEYS = {"model", "provider", "device", "io_binding", "batch", "median_ms", "p90_ms", "p99_ms", "mean_ms", "throughput",
        "speedup"}


def build(batch="N", channels=4, seed=0):
    """Conv(3->channels, 3x3) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(channels->5)."""
    rng = np.random.default_rng(seed)
    inits = {"w": rng.standard_normal((channels, 3, 3, 3)), "b": rng.standard_normal(channels),
             "g": rng.standard_normal((5, channels)), "c": rng.standard_normal(5)}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "g", "c"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def paths(tmp_path):
    out = {}
    for name, model in (("dyn", build()), ("small", build(channels=2)),
                        ("static", build(batch=1))):
        out[name] = str(tmp_path / f"{name}.onnx")
        onnx.save(model, out[name])
    return out


def test_schedule_round_robin():
    assert bench._schedule(3, 3) == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert bench._schedule(1, 2) == [0, 0]
    order = bench._schedule(2, 4)
    assert all(sorted(order[i:i + 2]) == [0, 1] for i in range(0, 8, 2))


def test_benchmark_json_keys_and_interleaving(paths, monkeypatch):
    calls = []
    real_runner = bench._runner

    def recording_runner(sess, used, inputs, io_binding):
        run = real_runner(sess, used, inputs, io_binding)
        tag = (id(sess), inputs["x"].shape[0])

        def wrapped():
            calls.append(tag)
            return run()
        return wrapped

    monkeypatch.setattr(bench, "_runner", recording_runner)
    lines = []
    result = benchmark([paths["dyn"], paths["small"]], batches=(1, 2), progress=lines.append,
                       **FAST)
    assert set(result["machine"]) >= {"cpu", "cores", "onnxruntime", "gpu"}
    assert result["machine"]["onnxruntime"] == ort.__version__
    rows = result["results"]
    assert [(r["model"], r["batch"]) for r in rows] == [
        (paths["dyn"], 1), (paths["small"], 1), (paths["dyn"], 2), (paths["small"], 2)]
    for r in rows:
        assert set(r) >= KEYS and r["provider"] == "cpu" and r["median_ms"] > 0
        assert r["io_binding"] is False and r["device"] == result["machine"]["cpu"]
        assert r["throughput"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3))
    assert rows[0]["speedup"] == 1.0 and rows[2]["speedup"] == 1.0
    assert rows[1]["speedup"] == pytest.approx(rows[0]["median_ms"] / rows[1]["median_ms"])
    assert len(lines) == 4
    json.dumps(result)
    # Per batch: 1 check run per model, then warmup and timed runs alternate between models.
    a, b = sorted({t[0] for t in calls})
    batch1 = [t[0] for t in calls if t[1] == 1][2:]
    assert len(batch1) == 2 * (FAST["warmup"] + FAST["iters"])
    first = batch1[0]
    other = b if first == a else a
    assert batch1 == [first, other] + [first, other, other, first, first, other]


def test_static_batch_is_skipped(paths):
    result = benchmark([paths["static"], paths["dyn"]], batches=(1, 2), **FAST)
    assert [(r["model"], r["batch"]) for r in result["results"]] == [
        (paths["static"], 1), (paths["dyn"], 1), (paths["dyn"], 2)]
    assert result["results"][2]["speedup"] is None  # the first model did not run at batch 2
    (skip,) = result["skipped"]
    assert skip["model"] == paths["static"] and skip["batch"] == 2 and "static" in skip["reason"]
    assert "skipped" in format_bench(result)


def test_cli_cpu(paths):
    res = CliRunner().invoke(bench_command, [paths["dyn"], paths["small"], "--batch", "1,2",
                                             "--threads", "1", "--warmup", "1", "--iters", "3",
                                             "--input-shapes", "x:[1,3,8,8]"])
    assert res.exit_code == 0, res.output
    assert "median ms" in res.output and "speedup" in res.output
    res = CliRunner().invoke(bench_command, [paths["dyn"], "--json", "--iters", "2",
                                             "--warmup", "0", "--batch", "3"])
    assert res.exit_code == 0, res.output
    # CliRunner mixes stderr (progress) into output; the JSON starts at the first '{'.
    result = json.loads(res.output[res.output.index("{"):])
    assert result["results"][0]["batch"] == 3


def test_cli_usage_errors(paths):
    runner = CliRunner()
    assert runner.invoke(bench_command, [paths["dyn"], "--batch", "x"]).exit_code == 2
    res = runner.invoke(bench_command, [paths["dyn"], "--input-shapes", "nope:[1]"])
    assert res.exit_code == 2 and "not an input of any model" in res.output


def test_plot(paths, tmp_path, monkeypatch):
    result = benchmark([paths["dyn"], paths["small"]], batches=(1, 2), **FAST)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(BenchError, match=r"pip install 'spa-prune\[plot\]'"):
            plot_bench(result, tmp_path / "p.png")
    else:
        plot_bench(result, tmp_path / "p.png")
        assert (tmp_path / "p.png").stat().st_size > 0
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        with pytest.raises(BenchError, match=r"pip install 'spa-prune\[plot\]'"):
            plot_bench(result, tmp_path / "q.png")


def test_cuda_runs_when_available(paths):
    if not cuda_available():
        pytest.skip("CUDAExecutionProvider is not usable here")
    result = benchmark([paths["dyn"], paths["small"]], provider="cuda", batches=(1, 2), **FAST)
    assert {r["provider"] for r in result["results"]} == {"cuda"}
    assert result["machine"]["gpu"]


def _check_unavailable(paths):
    with pytest.raises(BenchError, match="CUDA execution provider is not available"):
        benchmark([paths["dyn"]], provider="cuda", **FAST)
    res = CliRunner().invoke(bench_command, [paths["dyn"], "--provider", "cuda"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [
        "spa: error: CUDA execution provider is not available (onnxruntime-gpu with a CUDA GPU is "
        "needed); pass --allow-cpu-fallback to measure on CPU"]
    res = CliRunner().invoke(bench_command, [paths["dyn"], "--provider", "cuda",
                                             "--allow-cpu-fallback", "--iters", "2", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output[res.output.index("{"):])
    assert result["results"][0]["provider"] == "cpu"


def test_cuda_unavailable_errors_or_falls_back(paths):
    if cuda_available():
        pytest.skip("CUDA is usable here")
    _check_unavailable(paths)


def test_cuda_missing_from_available_providers(paths, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    _check_unavailable(paths)


# IO binding: the GPU path (inputs copied to the device once, outputs bound there) run on the CPU,
# so that every machine tests the code the CUDA measurements will use.

def _fp16(model):
    from to_fp16 import to_fp16  # tools/, on sys.path through conftest
    return to_fp16(model)


def _bf16_model():
    """A bfloat16 input cast to float: numpy cannot hand bfloat16 to onnxruntime directly."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT), helper.make_node("Relu", ["c"], ["y"])],
        "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16"])
def test_bound_runner_on_cpu_equals_session_run(kind):
    from spa.runtime.feeds import for_ort
    from spa.verify.check import make_inputs
    model = {"float32": build, "float16": lambda: _fp16(build()), "bfloat16": _bf16_model}[kind]()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = make_inputs(model, batch=2)
    run = bench.bound_runner(sess, inputs, "cpu")
    run()  # the binding is reused run after run, as in the timed loop
    got = run().copy_outputs_to_cpu()
    want = sess.run(None, for_ort(inputs))
    assert [o.name for o in sess.get_outputs()] and len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    if kind == "float16":
        assert inputs["x"].dtype == np.float16 and got[0].dtype == np.float16


def test_io_binding_on_cpu_benchmark_and_cli(paths, tmp_path):
    result = benchmark([paths["dyn"], paths["small"]], batches=(1, 2), io_binding=True, **FAST)
    assert [r["io_binding"] for r in result["results"]] == [True] * 4
    assert {r["provider"] for r in result["results"]} == {"cpu"}
    assert "cpu (io binding)" in format_bench(result)
    # an fp16 pair (tools/to_fp16.py): inputs are made in the model's dtype
    fp16 = []
    for name in ("dyn", "small"):
        fp16.append(str(tmp_path / f"{name}16.onnx"))
        onnx.save(_fp16(onnx.load(paths[name])), fp16[-1])
    res = CliRunner().invoke(bench_command, fp16 + ["--io-binding", "--json", "--iters", "2",
                                                    "--warmup", "0", "--batch", "1,3"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output[res.output.index("{"):])["results"]
    assert len(rows) == 4 and all(r["io_binding"] for r in rows)
    res = CliRunner().invoke(bench_command, [paths["dyn"], "--no-io-binding", "--json", "--iters", "2",
                                             "--warmup", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["results"][0]["io_binding"] is False


def test_io_binding_defaults_to_the_provider_used(paths, monkeypatch):
    """On for a GPU provider, off on CPU, and off again when a GPU request fell back to CPU:
    the flag follows the provider actually used, and binding to 'cuda' there would fail."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    result = benchmark([paths["dyn"]], provider="cuda", allow_fallback=True, **FAST)
    (row,) = result["results"]
    assert row["provider"] == "cpu" and row["io_binding"] is False and result["machine"]["gpu"] is None
    seen = []
    real = bench.bound_runner
    monkeypatch.setattr(bench, "bound_runner", lambda s, i, d: seen.append(d) or real(s, i, "cpu"))
    monkeypatch.setattr(bench, "_make_session", lambda m, p, t, a: (
        ort.InferenceSession(m if isinstance(m, str) else m.SerializeToString(),
                             providers=["CPUExecutionProvider"]), "cuda"))
    monkeypatch.setattr(bench, "gpu_name", lambda: "Fake GPU")
    (row,) = benchmark([paths["dyn"]], provider="cuda", **FAST)["results"]
    assert row["io_binding"] is True and row["device"] == "Fake GPU" and set(seen) == {"cuda"}
