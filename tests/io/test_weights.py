"""Weights kept out of the proto (spa.io.weights): reading a file without copying its weights, writing
them back streamed, with and without external data, and the pipeline on such models."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa import io
from spa.runtime import probing
from spa.io import weights


def _mlp(seed=0, hidden=48, inner=96):
    """x[b, 32] -> MatMul -> Relu -> MatMul -> Add(bias): weights above and below the stub size."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((32, inner)).astype(np.float32)
    w2 = rng.standard_normal((inner, hidden)).astype(np.float16).astype(np.float32)
    b2 = rng.standard_normal(hidden).astype(np.float32)          # small: stays in the proto
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="mm2"),
             helper.make_node("Add", ["m", "b2"], ["y"], name="add")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                           numpy_helper.from_array(b2, "b2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _save_external(m, path):
    """onnx moves the data out of the proto it saves this way: save a copy."""
    copy = onnx.ModelProto()
    copy.CopyFrom(m)
    onnx.save_model(copy, path, save_as_external_data=True, location=os.path.basename(path) + ".data",
                    size_threshold=0)


def _arrays(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _same_model(a, b):
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    aa, bb = _arrays(a), _arrays(b)
    assert aa.keys() == bb.keys()
    for k in aa:
        assert aa[k].dtype == bb[k].dtype and np.array_equal(aa[k], bb[k]), k


def _run(path_or_proto, x):
    data = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("external", [False, True])
def test_a_file_is_read_as_stubs_over_a_memory_map_and_filled_back_exactly(tmp_path, external):
    m = _mlp()
    path = str(tmp_path / "m.onnx")
    if external:
        _save_external(m, path)
    else:
        onnx.save_model(m, path)
    proto, arrays = io.load_lazily(path)
    stubs = {t.name for t in proto.graph.initializer if weights.is_stub(t)}
    assert stubs == {"w1", "w2"} == set(arrays)               # b2 (48 values) stays in the proto
    for a in arrays.values():
        assert not a.flags.writeable                           # views of the file, never copies
    assert proto.ByteSize() < 2000                             # the proto holds no weight bytes
    _same_model(weights.full_model(proto, arrays), m)


@pytest.mark.parametrize("over_2gb", [False, True])
def test_save_streams_stubs_inline_or_as_page_aligned_external_data(tmp_path, monkeypatch, over_2gb):
    m = _mlp(1)
    src = str(tmp_path / "src.onnx")
    onnx.save_model(m, src)
    proto, arrays = io.load_lazily(src)
    if over_2gb:
        monkeypatch.setattr("spa.io.save.EXTERNAL_DATA_ABOVE", 1000)
    out = tmp_path / "out" / "m.onnx"
    io.save_model(proto, out, weights=arrays)
    data = tmp_path / "out" / "m.onnx.data"
    assert data.is_file() == over_2gb
    assert sorted(os.listdir(out.parent)) == (["m.onnx", "m.onnx.data"] if over_2gb else ["m.onnx"])
    back = onnx.load(str(out))
    _same_model(back, m)
    if over_2gb:
        raw = onnx.load(str(out), load_external_data=False)
        offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in raw.graph.initializer
                   if t.data_location == TensorProto.EXTERNAL]
        assert offsets and all(o % io.DATA_ALIGN == 0 for o in offsets)
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_array_equal(_run(str(out), x), _run(m, x))


def test_released_pages_read_back_the_same_values(tmp_path):
    m = _mlp(2, hidden=512, inner=1024)          # w1 and w2 over a page each
    path = str(tmp_path / "m.onnx")
    onnx.save_model(m, path)
    proto, arrays = io.load_lazily(path)
    before = {k: np.array(v) for k, v in arrays.items()}
    weights.release_pages(arrays.values())
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, before[k])


def _file_pages_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssFile from /proc")
def test_a_run_hands_the_weights_pages_back_while_it_reads_them(tmp_path):
    """A probe-style run over weights fed from the file's memory map ends holding none of their pages
    (the sweeper hands them back during the run and at its end), and computes the same outputs."""
    m = _mlp(4, hidden=1024, inner=16384)          # w1 2 MB, w2 64 MB
    path = str(tmp_path / "m.onnx")
    onnx.save_model(m, path)
    x = np.random.default_rng(2).standard_normal((2, 32)).astype(np.float32)
    proto, arrays = io.load_lazily(path)
    runner = probing.output_runner(proto, arrays)
    assert runner.fed, "the big weights are fed from the memory map, not copied into the session"
    before = _file_pages_mb()
    got = runner.run({"x": x})["y"]
    assert _file_pages_mb() - before < 16, "the run kept the weights' 64 MB of pages"
    want = _run(m, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    np.asarray(arrays["w2"]).sum()                  # reading outside a run touches them, as before
    assert _file_pages_mb() - before > 48


def test_spilled_weights_are_the_same_values_in_an_unlinked_memory_map(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "SPILL_ABOVE", 1 << 20)
    rng = np.random.default_rng(5)
    made = {"a": rng.standard_normal((700, 600)).astype(np.float32),       # 1.7 MB: over RELEASE_ABOVE
            "b": rng.standard_normal((3, 1000, 201)).astype(np.float16),     # 1.2 MB
            "small": np.arange(10, dtype=np.int64)}
    got = weights.spilled(made, directory=tmp_path)
    assert os.listdir(tmp_path) == []                 # the file has no name: it goes with its last view
    assert got["small"] is made["small"]              # small arrays stay as they are
    for k in ("a", "b"):
        np.testing.assert_array_equal(got[k], made[k])
        assert got[k].dtype == made[k].dtype and not got[k].flags.writeable
        assert got[k].ctypes.data % weights.SPILL_ALIGN == 0
    assert weights.spilled(got, directory=tmp_path)["a"] is got["a"]   # views of a map are not written again
    monkeypatch.setattr(weights, "SPILL_ABOVE", 1 << 30)
    assert weights.spilled(made)["a"] is made["a"]    # below the threshold nothing moves


def test_a_pruned_file_model_keeps_stubs_until_written_and_runs_like_the_filled_one(tmp_path):
    m = _mlp(3, hidden=64, inner=256)
    path = str(tmp_path / "m.onnx")
    onnx.save_model(m, path)
    an = spa.analyze(path)
    assert weights.has_stubs(an.model) and not an.weights["w1"].flags.writeable
    res = spa.prune(path, 0.5, analysis=an)
    assert weights.has_stubs(res.proto) and res.report["after"]["params"] < res.report["before"]["params"]
    out = str(tmp_path / "p.onnx")
    res.save(out)
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    got = _run(out, x)
    np.testing.assert_array_equal(got, _run(res.model, x))     # .model fills a complete proto
    assert got.shape == (2, 64)
    # the analysis' model runs only with its weights; asking onnxruntime for the stubs is a clear error
    with pytest.raises(spa.SpaError, match="keeps its big weights apart"):
        probing.session(an.model)
    np.testing.assert_array_equal(_run(an.full_model(), x), _run(m, x))


def test_a_damaged_external_length_is_one_line(tmp_path):
    m = _mlp(4)
    path = str(tmp_path / "m.onnx")
    _save_external(m, path)
    raw = onnx.load(path, load_external_data=False)
    for t in raw.graph.initializer:
        if t.name == "w1":
            for e in t.external_data:
                if e.key == "length":
                    e.value = str(int(e.value) - 4)
    onnx.save_model(raw, path)
    with pytest.raises(spa.SpaError, match="external data has .* bytes, its dims need"):
        io.load_lazily(path)
