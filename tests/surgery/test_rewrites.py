"""Surgery's rewrites of the parameters that count channels: Reshape targets when heads go, a grouped
Conv's ``group`` when whole groups go (the exactness of the result: tests/graph/test_patterns.py)."""
import spa
from graphs import attention, grouped_depthwise


def test_removing_heads_rewrites_reshapes():
    an = spa.analyze(attention(n=6, d=16, heads=4, layernorm=False, mlp=False))
    head_group = next(g for g in an.groups if g.prunable and "Softmax" in g.summary()["ops"])
    units = head_group.units[:2]
    from spa.surgery import slicing
    pruned = slicing.apply(an.model, an.channels, an.probe, units)
    reshapes = [n for n in pruned.graph.node if n.op_type == "Reshape"]
    inits = {t.name: t for t in pruned.graph.initializer}
    from onnx import numpy_helper
    targets = [list(numpy_helper.to_array(inits[n.input[1]])) for n in reshapes]
    assert [1, 6, 2, 4] in targets and [1, 6, 8] in targets


def test_grouped_conv_group_attribute_follows_removed_groups():
    an = spa.analyze(grouped_depthwise())
    from spa.surgery import slicing

    def group_attrs(model):
        return [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]

    before = group_attrs(an.model)
    changed = []
    for g in an.groups:
        if g.prunable:
            pruned = slicing.apply(an.model, an.channels, an.probe, g.units[:1])
            changed.append(group_attrs(pruned) != before)
    # removing one whole group of the grouped conv (and one depthwise channel) changes `group`
    assert sum(changed) == 2, changed


def _sliced_tokens():
    """x [batch, seq, 8] -> MatMul -> Slice [0:1e9, 1:1e9, 0:1e9] (every row, all tokens but the
    first, every channel: tf2onnx writes such full-range bounds) -> Relu -> MatMul -> [batch, seq - 1, 4]."""
    import numpy as np
    from onnx import TensorProto, helper
    from graphs import G
    g = G(0)
    h = g.op("MatMul", ["x", g.w(8, 16)])
    big = 1_000_000_000
    s = g.op("Slice", [h, g.i64([0, 1, 0]), g.i64([big, big, big]), g.i64([0, 1, 2]), g.i64([1, 1, 1])])
    y = g.op("MatMul", [g.op("Relu", [s]), g.w(16, 4)])
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch", "seq_minus_1", 4])], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), np


def test_a_slice_keeps_its_bounds_on_the_axes_that_keep_their_size():
    """Only the channel axis of a Slice gets new bounds: the batch and token axes keep the
    original's (they were written at the probe's sizes: a model frozen at batch 1 and 16 tokens)."""
    from spa.runtime import probing
    from spa.surgery import slicing
    from spa.verify.oracle import cut_model
    model, np = _sliced_tokens()
    an = spa.analyze(model)
    group = next(g for g in an.groups if g.prunable and g.channels == 16)
    units = group.units[::2]
    pruned, cut = slicing.apply(an.model, an.channels, an.probe, units), cut_model(an, units)
    x = np.random.default_rng(1).standard_normal((3, 40, 8)).astype(np.float32)
    got, want = probing.session(pruned).run(None, {"x": x})[0], probing.session(cut).run(None, {"x": x})[0]
    assert got.shape == want.shape == (3, 39, 4)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    res = spa.prune(model, 0.5)   # validation at batch 3 and other lengths passes
    assert res.report["after"]["params"] < res.report["before"]["params"]
