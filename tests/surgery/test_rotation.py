"""Rotation of the residual stream (spa.graph.stream, spa.surgery.rotation, spa.rotation.stage).

The oracle (DESIGN.md, "Rotation"): the stream rotated by any orthogonal Q, before any slicing, gives
the original's outputs (relative error below 1e-5) at every size of its dynamic dims.  After slicing,
a stream whose states lie in a subspace of dimension r (the embedding and every writer's output in
the row space of one r x D matrix) loses nothing when at least r dims are kept: the rotated trailing
dims carry no energy, and the norms' readers are scaled back to the RMS over the full width.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.errors import SpaError
from spa.graph.stream import find_streams
from spa.io.weights import full_model
from spa.surgery.rotation import rotate
from graphs import attention, worst_error

V, D, F = 40, 32, 48


def decoder(rank=None, seed=0, graph_output_stream=True):
    """A pre-norm decoder over ``input_ids`` [batch, seq]: an embedding table tied with the head
    (Gather, then MatMul by its Transpose), two blocks (a decomposed RMSNorm -> MatMul -> Relu ->
    MatMul + bias -> residual Add; the second block's norm fused, SimplifiedLayerNormalization), a
    final RMSNorm written as a Div, ``logits`` and (optionally) the last stream tensor as the graph
    output ``hidden``.  ``rank``: the embedding and every writer in the row space of one rank x D
    matrix (the stream's states span ``rank`` dims)."""
    rng = np.random.default_rng(seed)
    basis = orthogonal(D, seed)[:rank] if rank else None
    inits, nodes = [], []

    def w(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def writer_weight(rows):
        if basis is None:
            return rng.standard_normal((rows, D)) * 0.3
        return rng.standard_normal((rows, rank)) @ basis

    table = writer_weight(V) * 3
    w("E", table)
    w("two", np.float32(2.0))
    w("eps", np.float32(1e-6))
    nodes += [helper.make_node("Gather", ["E", "input_ids"], ["s0"], name="embed"),
              helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="head_t")]

    def rms(x, tag, form):
        nodes.extend([helper.make_node("Pow", [x, "two"], [f"{tag}_sq"], name=f"{tag}_pow"),
                      helper.make_node("ReduceMean", [f"{tag}_sq"], [f"{tag}_m"], axes=[-1], name=f"{tag}_mean"),
                      helper.make_node("Add", [f"{tag}_m", "eps"], [f"{tag}_e"], name=f"{tag}_eps"),
                      helper.make_node("Sqrt", [f"{tag}_e"], [f"{tag}_r"], name=f"{tag}_sqrt")])
        if form == "div":
            nodes.append(helper.make_node("Div", [x, f"{tag}_r"], [f"{tag}_n"], name=f"{tag}_div"))
        else:
            nodes.extend([helper.make_node("Reciprocal", [f"{tag}_r"], [f"{tag}_ir"], name=f"{tag}_rec"),
                          helper.make_node("Mul", [x, f"{tag}_ir"], [f"{tag}_n"], name=f"{tag}_norm")])
        g = w(f"{tag}_g", rng.uniform(0.5, 1.5, D))
        nodes.append(helper.make_node("Mul", [g, f"{tag}_n"], [f"{tag}_y"], name=f"{tag}_scale"))
        return f"{tag}_y"

    s = "s0"
    for b, form in enumerate(("mul", "fused")):
        if form == "fused":
            w(f"n{b}_g", rng.uniform(0.5, 1.5, D))
            nodes.append(helper.make_node("SimplifiedLayerNormalization", [s, f"n{b}_g"], [f"n{b}_y"], axis=-1,
                                          epsilon=1e-6, name=f"n{b}_fused"))
            y = f"n{b}_y"
        else:
            y = rms(s, f"n{b}", form)
        w(f"up{b}", rng.standard_normal((D, F)) * 0.3)
        w(f"down{b}", writer_weight(F) * 0.3)
        w(f"bias{b}", (writer_weight(1)[0] if rank else rng.standard_normal(D)) * 0.1)
        nodes += [helper.make_node("MatMul", [y, f"up{b}"], [f"h{b}"], name=f"up{b}"),
                  helper.make_node("Relu", [f"h{b}"], [f"a{b}"], name=f"relu{b}"),
                  helper.make_node("MatMul", [f"a{b}", f"down{b}"], [f"d{b}"], name=f"down{b}"),
                  helper.make_node("Add", [f"d{b}", f"bias{b}"], [f"o{b}"], name=f"bias{b}"),
                  helper.make_node("Add", [s, f"o{b}"], [f"s{b + 1}"], name=f"res{b}")]
        s = f"s{b + 1}"
    y = rms(s, "final", "div")
    nodes.append(helper.make_node("MatMul", [y, "Et"], ["logits"], name="head"))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])]
    if graph_output_stream:
        outputs.append(helper.make_tensor_value_info(s, TensorProto.FLOAT, ["batch", "seq", D]))
    graph = helper.make_graph(nodes, "decoder",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                              outputs, inits)
    # SimplifiedLayerNormalization is onnxruntime's, in the default domain: onnx.checker does not know it
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def feeds(sizes=((1, 5), (3, 11))):
    rng = np.random.default_rng(1)
    return [{"input_ids": rng.integers(0, V, size).astype(np.int64)} for size in sizes]


def orthogonal(n, seed=0):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def test_the_stream_is_found_whatever_form_its_norms_take():
    an = spa.analyze(decoder())
    (stream,) = find_streams(an.model, an.probe.shapes, an.weights)
    assert stream.width == D and len(stream.norms) == 3 and len(stream.writers) == 2
    assert [m.fused for m in stream.norms] == [False, True, False]
    assert stream.sources == ["s0"] and stream.outputs == ["s2"]
    assert all(w.bias for w in stream.writers)
    # the tied head reads the final norm through a Transpose of the table: not a foldable reader
    assert [len(m.readers) for m in stream.norms] == [1, 1, 0] and stream.norms[2].others == [("head", 0)]


def test_rotation_alone_is_exact_at_every_size():
    """The oracle at 0%: any orthogonal Q, every norm form, a tied head and a stream graph output."""
    an = spa.analyze(decoder())
    (stream,) = find_streams(an.model, an.probe.shapes, an.weights)
    model, weights, axis = rotate(an.model, an.weights, stream, orthogonal(D))
    rotated = full_model(model, weights)
    assert axis[1] == 1
    assert not any(n.name == "n0_scale" for n in rotated.graph.node)      # the scale went into the reader
    assert worst_error(an.full_model(), rotated, feeds()) < 1e-5


def test_a_stream_in_a_subspace_is_sliced_without_loss():
    """States of rank 8 in a 32-wide stream: rotating and cutting 16 dims changes no output, so the
    slicing and the norms' rescaling are right (without the rescaling the error is about 40%)."""
    model = decoder(rank=8)
    res = spa.prune(model, ratio=0.0, rotate=0.5, criterion="l2")
    rot = res.report["rotation"]
    assert rot["width"] == [D, D // 2] and rot["energy_kept"] > 1 - 1e-6
    assert res.report["after"]["params"] < res.report["before"]["params"]
    assert worst_error(model, res.model, feeds()) < 1e-4
    widths = {t.name: list(t.dims) for t in res.model.graph.initializer}
    assert widths["down0"] == [F, D // 2] and widths["up1"] == [D // 2, F]


def test_rotate_then_channels_reaches_the_target():
    """The channel steps prune the rotated model to the rest of the target, and leave alone what the
    rotation added (cutting a uniform share of the tied table's width took SmolLM2 to 40x)."""
    model = decoder(seed=3, graph_output_stream=False)
    res = spa.prune(model, target="params=1.3", rotate=0.25, criterion="l2", allocate="uniform")
    assert res.report["rotation"]["width"] == [D, D - 8]
    assert res.report["target_reached"] >= 1.3 - 1e-3
    # the tied table's own width (the original basis, between the lookup and the rotation) stays whole
    assert {t.name: list(t.dims) for t in res.model.graph.initializer}["E"] == [V, D]
    for f in feeds():
        got = onnx_run(res.model, f)
        assert got[0].shape == (*f["input_ids"].shape, V)


def onnx_run(model, feed):
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_a_layernorm_stream_is_refused_in_one_line():
    with pytest.raises(SpaError, match="no residual stream read through RMSNorms"):
        spa.prune(attention(), ratio=0.0, rotate=0.1, criterion="l2")


@pytest.mark.parametrize("kwargs", [{"map_path": "m.json"}, {"target": "blocks=1"}, {"rotate": 1.0}, {"rotate": -0.1}])
def test_rotate_options_are_checked(kwargs):
    opts = {"rotate": 0.1, **kwargs}
    with pytest.raises(SpaError, match="--rotate"):
        spa.PruneOptions(**opts).checked()


@pytest.mark.parametrize("name", ["llama_gqa", "llama_gqa_kv"])
def test_exported_llamas_rotate_exactly(name):
    """A dynamo Llama (untied head, decomposed RMSNorm, GQA) and its KV-cache export, whose graph
    output is the final norm's: exact at 0% at two sizes (and a decode step with a past)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import export_transformers as et
    path = et.export(name)
    res = spa.prune(str(path), ratio=0.0, rotate=0.0, criterion="l2")
    assert res.report["rotation"]["norms"] == 2 * et.LAYERS + 1
    sizes = [(1, 5, 0), (2, 9, 0)] if name == "llama_gqa" else [(1, 3, 4), (2, 7, 9)]
    runs = [{k: v.numpy() for k, v in et.sample_inputs(name, b, s, past=p, seed=s).items()} for b, s, p in sizes]
    assert worst_error(onnx.load(str(path)), res.model, runs) < 1e-5
