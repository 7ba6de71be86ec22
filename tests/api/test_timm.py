"""timm architectures exported with TorchScript (tools/export_timm.py): the exactness oracle over
every prunable group and a prune that onnxruntime runs."""
import pytest

import spa
from exported import timm
from spa.verify.oracle import check_groups, check_joint

EXACT = 1e-5


@pytest.mark.slow
@pytest.mark.torch
def test_efficientformerv2_attention_heads_are_prunable_through_their_bias_table():
    """EfficientFormerV2-S0 adds a learned bias table [heads, positions], read by a Gather at
    constant indices [N, N], to every attention's scores. Folded into a constant it cost a copy of
    the table per block; left computed it blocked the heads ("rule cannot handle this form": 37
    prunable groups of 54). The Gather's rule ties the table's rows to the heads: 42 of 45, exact."""
    path = timm("efficientformerv2_s0")
    an = spa.analyze(path)
    prunable = [g for g in an.groups if g.prunable]
    assert len(prunable) >= 42, [(g.channels, g.reason) for g in an.groups if not g.prunable]
    heads = [g for g in prunable if any("token_mixer" in n or "attn" in n for n, _ in g.nodes) and g.channels == 8]
    assert len(heads) >= 5, [(g.channels, g.nodes[:3]) for g in prunable]
    bad = [r for r in check_groups(an) if not r["approximate"] and r["error"] >= EXACT]
    assert not bad, bad
    assert check_joint(an, seed=1)["error"] < EXACT
    res = spa.prune(path, 0.3, analysis=an)
    assert res.report["after"]["macs"] < 0.8 * res.report["before"]["macs"]
