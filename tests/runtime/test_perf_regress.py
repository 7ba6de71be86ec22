"""What keeps spa fast on big models, as behaviour (speed itself is measured in tools/, not here).

The probe runs the model once (no second probe after folding), feeds the weights to onnxruntime
from numpy (no serialisation of them), keeps no activations, and runs again at other input sizes
exposing only what is read there (outputs, Reshape/Expand operands, shape-derived values); the channel model reuses the probe's arrays; save_model and
model_size never serialise the whole model at once and write exactly what SerializeToString would.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import spa
from spa import io
from spa.runtime import probing
from graphs import G, attention, residual_chain


def _count_runs(monkeypatch):
    calls = []
    orig = probing._Runner.run

    def run(self, feed, names=None):
        calls.append(None if names is None else list(names))
        return orig(self, feed, names)

    monkeypatch.setattr(probing._Runner, "run", run)
    return calls


def _shape_chain_model(batch="N"):
    """x [N, 4, 8] -> MatMul -> Reshape to [N, 4, 2, 8] by a Shape->Gather->Concat chain, and a
    scale computed from a constant (1/sqrt(8)): folding candidates and a Reshape under a dynamic dim."""
    g = G(seed=3)
    h = g.op("MatMul", ["x", g.w(8, 16)])
    n = g.op("Gather", [g.op("Shape", ["x"]), g.i64(0)], axis=0)
    target = g.op("Concat", [g.op("Unsqueeze", [n, g.i64([0])]), g.i64([4, 2, 8])], axis=0)
    r = g.op("Reshape", [h, target])
    scale = g.op("Div", [g.w(value=np.array(1.0, np.float32)), g.op("Sqrt", [g.w(value=np.array(8.0, np.float32))])])
    y = g.op("MatMul", [g.op("Mul", [r, scale]), g.w(8, 3)])
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 8])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [batch, 4, 2, 3])], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def test_static_model_is_run_once_and_keeps_no_activations(monkeypatch):
    calls = _count_runs(monkeypatch)
    an = spa.analyze(attention())
    assert calls == [None]  # one run exposing everything; folding does not probe again
    pr = an.probe
    inits = {t.name for t in an.model.graph.initializer}
    activations = [n for n in pr.shapes if n not in inits and n not in pr.inputs]
    assert activations and not any(n in pr.values for n in activations)
    assert all(pr.dtypes[n] is not None for n in pr.shapes)
    # the channel model holds the probe's arrays, not copies
    assert all(an.channels.consts[n] is pr.consts[n] for n in inits)


def test_weights_are_fed_not_serialised():
    g = G(seed=2)
    y = g.op("Add", [g.op("MatMul", ["x", g.w(64, 64)]), g.w(64)])
    m = g.model([("x", [2, 64])], [g.op("MatMul", [g.op("Relu", [y]), g.w(64, 40)])])
    consts = io.initializer_arrays(m)
    fed = probing._fed_initializers(m, consts)
    assert fed and all(consts[n].size > io.FEED_LIMIT for n in fed)
    skeleton = onnx.load_from_string(io.skeleton(m, fed, ["extra"]))
    assert not {t.name for t in skeleton.graph.initializer} & set(fed)
    assert set(fed) <= {i.name for i in skeleton.graph.input}
    ref = probing.session(m).run(None, probing.input_feed(m))
    got = probing.run_all(m, probing.input_feed(m), consts)
    for out, value in zip(m.graph.output, ref):
        np.testing.assert_array_equal(got[out.name], value)


def test_dynamic_model_folds_without_a_second_probe(monkeypatch):
    calls = _count_runs(monkeypatch)
    proto, pr = probing.prepare(_shape_chain_model())
    # first run exposes everything, the runs at other sizes (every dim up, down, by odd amounts) only what is watched
    assert calls[0] is None and len(calls) == 4 and all(c is not None for c in calls[1:])
    ops = {n.op_type for n in proto.graph.node}
    assert "Sqrt" not in ops and "Div" not in ops  # the constant scale was folded
    assert "Shape" in ops  # the batch-dependent target was not
    fresh = probing.probe(proto, {"x": [1, 4, 8]})
    assert pr.shapes == fresh.shapes
    reshape = next(n for n in proto.graph.node if n.op_type == "Reshape")
    for name in (reshape.input[0], reshape.output[0], "x"):
        assert pr.dynamic[name] == fresh.dynamic[name]
        assert pr.dynamic[name][0] is True and not any(pr.dynamic[name][1:])
    # pruning through the Reshape still works: the target keeps the batch dim dynamic
    res = spa.prune(_shape_chain_model(), 0.5)
    out = probing.session(res.model).run(None, {"x": np.ones((3, 4, 8), np.float32)})
    assert out[0].shape == (3, 4, 2, 3)


def test_runs_at_other_sizes_expose_only_the_outputs_when_nothing_else_reads_them(monkeypatch):
    """Validation compares the pruned model's output shapes at other sizes with these runs'."""
    m = residual_chain()
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    calls = _count_runs(monkeypatch)
    pr = probing.probe(m)
    outputs = [o.name for o in m.graph.output]
    assert calls == [None, outputs, outputs, outputs]
    assert pr.dynamic["x"] == (True, False, False, False)
    assert [p["N"] for p in pr.points] == [1, 3, 2, 2] and all(outputs[0] in s for s in pr.other_shapes)
    calls.clear()
    pr = probing.probe(_shape_chain_model(), dynamic=False)
    assert calls == [None] and pr.dynamic["x"] == (True, False, False)


@pytest.mark.parametrize("make", [residual_chain, attention, _shape_chain_model])
def test_save_model_writes_what_serialize_would(make, tmp_path):
    m = make()
    m.metadata_props.add(key="k", value="v")
    m.graph.doc_string = "doc"
    path = io.save_model(m, tmp_path / "m.onnx")
    assert path.read_bytes() == m.SerializeToString()
    assert io.model_size(m) == m.ByteSize()
    assert io.load_model(path) == m


def test_check_model_matches_the_checker():
    m = residual_chain()
    io.check_model(m)
    broken = residual_chain()
    broken.graph.node[1].input[0] = "missing"
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(broken)
    with pytest.raises(onnx.checker.ValidationError):
        io.check_model(broken)


def test_load_model_from_memory_map(tmp_path):
    m = residual_chain()
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    assert io.load_model(p) == m
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(spa.errors.SpaError, match="not an ONNX model"):
        io.load_model(empty)
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(spa.errors.SpaError, match="not an ONNX model"):
        io.load_model(tmp_path / "junk.onnx")


def test_a_converted_weight_is_not_folded_and_stays_prunable():
    """A Transpose of a weight (and a Cast, a DequantizeLinear) is not folded into a second copy of
    the weight: the Transpose stays, the weight keeps its own layout, and the channels through it
    are still a prunable group that the oracle checks."""
    g = G(seed=1)
    wt = g.op("Transpose", [g.w(300, 256)], perm=[1, 0])
    y = g.op("MatMul", ["x", wt])
    z = g.op("MatMul", [g.op("Relu", [y]), g.w(300, 8)])
    m = g.model([("x", [1, 256])], [z])
    proto, pr = probing.prepare(m)
    assert [n.op_type for n in proto.graph.node] == ["Transpose", "MatMul", "Relu", "MatMul"]
    assert set(pr.consts) == {t.name for t in m.graph.initializer}
    an = spa.analyze(m)
    assert any(g.prunable and g.channels == 300 for g in an.groups)
    from spa.verify.oracle import check_joint
    assert check_joint(an)["error"] < 1e-5
