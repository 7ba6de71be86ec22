"""The exactness oracle over every prunable group of one hand-built graph per coupling pattern."""
import numpy as np
import pytest

import spa
from graphs import PATTERNS, attention
from spa.verify.oracle import check_groups, check_joint

EXACT = 1e-5

# how many prunable groups each pattern must expose (a rule regression shows up here first)
EXPECTED_PRUNABLE = {
    "residual_chain": 4,        # stem+residual stream, 3 inner convs
    "concat_split": 4,          # two concat segments, split pieces, post-concat conv is split
    "grouped_depthwise": 4,     # first conv (-> group factor), group-inner in/out, depthwise multiplier
    "channel_shuffle": 2,       # the shuffled 12 = 3 x 4 factors
    "flatten_gemm": 2,          # conv channels through flatten, hidden of the MLP
    "squeeze_excitation": 2,    # SE hidden, main channels through the gate
    "attention": 3,             # heads, q/k head dims, v head dims
    "attention_bias_table": 3,  # the same: the bias table's rows go with their heads
    "transformer_block": 4,     # heads, q/k dims, v dims, MLP hidden
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_group_exact(name):
    an = spa.analyze(PATTERNS[name]())
    prunable = [g for g in an.groups if g.prunable]
    assert len(prunable) == EXPECTED_PRUNABLE[name], [g.summary() for g in an.groups]
    results = check_groups(an)
    assert len(results) == len(prunable)
    for r in results:
        assert r["approximate"] or r["error"] < EXACT, r


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_all_groups_together_exact(name):
    an = spa.analyze(PATTERNS[name]())
    res = check_joint(an)
    assert res["removed"] > 0
    assert res["error"] < EXACT


def test_attention_heads_and_head_dims_are_separate_groups():
    an = spa.analyze(attention(n=6, d=16, heads=4, layernorm=False, mlp=False))
    sizes = sorted(g.channels for g in an.groups if g.prunable)
    assert sizes == [4, 4, 4]  # 4 heads; 4 q/k dims per head; 4 v dims per head
    heads = [g for g in an.groups if g.prunable and "Softmax" in g.summary()["ops"]]
    assert heads, "the head group runs through the softmax"


def test_layernorm_group_is_approximate_but_valid():
    # residual stream of a transformer whose input comes through a projection (so it is prunable)
    from graphs import G
    g = G()
    x = g.op("MatMul", ["x", g.w(8, 16)])
    h = g.op("LayerNormalization", [x, g.w(16), g.w(16)], axis=-1)
    h = g.op("Add", [x, g.op("MatMul", [h, g.w(16, 16)])])
    out = g.op("MatMul", [h, g.w(16, 3)])
    an = spa.analyze(g.model([("x", [1, 5, 8])], [out]))
    approx = [gr for gr in an.groups if gr.prunable and gr.approximate]
    assert len(approx) == 1 and approx[0].channels == 16
    res = check_joint(an, approximate=True)
    assert np.isfinite(res["error"])


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_pixel_shuffle_keeps_the_shallow_channels_prunable(mode):
    """DepthToSpace / SpaceToDepth: the deep channel axis is block offsets x channels (in the mode's
    order); removing a shallow channel removes its b*b deep ones, exactly."""
    from graphs import G
    g = G(seed=3)
    y = g.conv("x", 8, 32, act=None)
    y = g.op("DepthToSpace", [y], blocksize=2, mode=mode)
    y = g.conv(y, 8, 6, act="Relu")
    y = g.op("SpaceToDepth", [y], blocksize=2)
    y = g.conv(y, 24, 4, act=None)
    an = spa.analyze(g.model([("x", [1, 8, 6, 6])], [y]))
    shallow = sorted(gr.channels for gr in an.groups if gr.prunable)
    assert shallow == [6, 8]
    assert max(r["error"] for r in check_groups(an)) < 1e-5
    assert check_joint(an)["error"] < 1e-5
