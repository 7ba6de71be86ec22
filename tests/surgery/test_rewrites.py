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
