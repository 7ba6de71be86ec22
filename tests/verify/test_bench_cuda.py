"""``spa bench`` on a real CUDA device: a pruned-vs-dense benchmark through IO binding, fp32 and fp16.

Skipped unless onnxruntime's CUDA provider really runs here (``cuda_available``: onnxruntime-gpu with
its CUDA libraries and a GPU).  The binding code itself is tested on every machine in test_bench.py
(``bound_runner`` with device 'cpu').
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import spa
import spa.verify.bench as bench
from spa.verify.bench import benchmark
from spa.verify.check import cuda_available, make_inputs

from test_bench import build  # tests/verify is on sys.path (pytest's rootdir-relative import)

pytestmark = pytest.mark.skipif(
    not cuda_available(), reason="CUDA execution provider not usable here (needs onnxruntime-gpu, "
                                 "the CUDA libraries and a GPU): the CUDA benchmark tests need a GPU")

FAST = dict(warmup=2, iters=5)


@pytest.fixture
def pair(tmp_path):
    """A dense CNN and spa's prune of it at ratio 0.5, as files."""
    dense = str(tmp_path / "dense.onnx")
    onnx.save(build(channels=16), dense)
    pruned = str(tmp_path / "pruned.onnx")
    spa.prune(dense, 0.5).save(pruned)
    return dense, pruned


def test_pruned_vs_dense_on_cuda_with_io_binding(pair):
    result = benchmark(list(pair), provider="cuda", batches=(1, 4), **FAST)
    rows = result["results"]
    assert len(rows) == 4 and result["machine"]["gpu"]
    for r in rows:
        assert r["provider"] == "cuda" and r["io_binding"] is True
        assert r["device"] == result["machine"]["gpu"] and r["median_ms"] > 0
    assert rows[1]["speedup"] is not None and rows[3]["speedup"] is not None
    off = benchmark(list(pair), provider="cuda", io_binding=False, **FAST)["results"]
    assert [r["io_binding"] for r in off] == [False, False]


def test_bound_runner_on_cuda_equals_session_run(pair):
    for path in pair:
        sess = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        assert sess.get_providers()[0] == "CUDAExecutionProvider"
        inputs = make_inputs(onnx.load(path), batch=3)
        got = bench.bound_runner(sess, inputs, "cuda")().copy_outputs_to_cpu()
        want = sess.run(None, inputs)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fp16_pair_on_cuda(pair, tmp_path):
    from to_fp16 import to_fp16  # tools/, on sys.path through conftest
    fp16 = []
    for path in pair:
        fp16.append(str(tmp_path / ("fp16_" + path.rsplit("/", 1)[-1])))
        onnx.save(to_fp16(onnx.load(path)), fp16[-1])
    rows = benchmark(fp16, provider="cuda", batches=(1, 4), **FAST)["results"]
    assert len(rows) == 4 and all(r["provider"] == "cuda" and r["io_binding"] for r in rows)
