"""Models as they reach deployment (tools/export_deploy.py): mixture of experts, channel x spatial
reshapes, recurrent OCR, dynamically quantized LSTMs; and every operator of every such model has a
rule (``spa inspect --all`` names none without one)."""
import pytest

import spa
from spa.verify.oracle import check_groups, check_joint
from exported import deploy as export, ops

EXACT = 1e-5


@pytest.mark.slow
@pytest.mark.torch
def test_mixture_of_experts_prunes_expert_widths_heads_and_head_dims_exactly():
    """Mixtral (dynamo): the experts' stacked weights are gathered per token (GatherND) after a TopK
    router; the expert axis is positions chosen at run time, the experts' intermediate width (all
    experts at once: one stacked tensor) and the attention groups are prunable and exact."""
    path = export("mixtral_moe")
    assert ops(path)["GatherND"] >= 4 and ops(path)["TopK"] >= 2
    an = spa.analyze(path)
    experts = [g for g in an.groups if g.prunable and g.channels == 96]
    assert len(experts) == 2, [(g.channels, g.reason) for g in an.groups]
    exact = [g for g in an.groups if g.prunable and not g.approximate]
    assert len(exact) >= 8
    assert max(r["error"] for r in check_groups(an, groups=exact)) < EXACT
    res = spa.prune(path, 0.3, analysis=an, round_to=1)   # exact counts: the MACs bound below
    assert res.report["after"]["macs"] < 0.6 * res.report["before"]["macs"]


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", ["mobilevit_block", "pixel_shuffle", "crnn_lstm"])
def test_channel_by_spatial_reshapes_and_recurrent_ocr_prune_exactly(name):
    path = export(name)
    an = spa.analyze(path)
    assert sum(g.prunable for g in an.groups) >= 2
    assert check_joint(an, seed=1)["error"] < EXACT
    res = spa.prune(path, 0.3, analysis=an)
    assert res.report["after"]["macs"] < res.report["before"]["macs"]


@pytest.mark.slow
@pytest.mark.torch
def test_dynamically_quantized_lstm_prunes_its_hidden_size_approximately():
    """DynamicQuantizeLSTM quantizes X and h with run-time ranges: the hidden groups are prunable but
    approximate; the pruned model runs and counts its LSTM MACs."""
    path = export("lstm_qdyn")
    assert ops(path)["DynamicQuantizeLSTM"] == 2
    an = spa.analyze(path)
    hidden = [g for g in an.groups if g.prunable and g.channels == 40]
    assert len(hidden) == 2 and all(g.approximate for g in hidden)
    res = spa.prune(path, 0.3, analysis=an)
    assert res.report["after"]["macs"] < 0.6 * res.report["before"]["macs"]
    hs = [a.i for n in res.model.graph.node if n.op_type == "DynamicQuantizeLSTM" for a in n.attribute
          if a.name == "hidden_size"]
    assert hs == [28, 28]


@pytest.mark.slow
@pytest.mark.torch
def test_every_operator_of_the_deployment_models_has_a_rule():
    """`spa inspect --all` on every model of tools/export_deploy.py names no operator without a rule."""
    from export_deploy import NAMES
    missing = {}
    for name in NAMES:
        try:
            path = export(name)
        except Exception as exc:  # an optional recipe this onnxruntime cannot build
            pytest.skip(f"{name}: {exc}")
        an = spa.analyze(path)
        unknown = sorted({g.reason.split("no rule for operator ")[1].split(" ")[0]
                          for g in an.groups if "no rule for operator" in g.reason})
        if unknown:
            missing[name] = unknown
    assert not missing, missing


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("dynamo", [False, True])
def test_mobilevit_unfold_fold_keeps_its_transformer_widths_prunable(tmp_path, dynamo):
    """transformers' MobileViT (random weights, 64x64): the unfold reshape [B, C, H, W] ->
    [B*C*nH, pH, nW, pW] merges channels with a spatial factor; the channel factor stays prunable
    (every group but the graph's input and output), exactly."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    import warnings
    torch.manual_seed(0)
    cfg = tf.MobileViTConfig(image_size=64, hidden_sizes=[48, 64, 80], neck_hidden_sizes=[16, 16, 24, 32, 48, 64, 80],
                             num_labels=10)
    model = tf.MobileViTForImageClassification(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(pixel_values=x).logits

    path = str(tmp_path / "mobilevit.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(Logits(model), (torch.randn(1, 3, 64, 64),), dynamo=True, verbose=False).save(path)
        else:
            torch.onnx.export(Logits(model), (torch.randn(1, 3, 64, 64),), path, dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"])
    an = spa.analyze(path)
    blocked = [g.reason for g in an.groups if not g.prunable]
    assert len(blocked) == 2 and all("graph " in r for r in blocked), blocked
    assert check_joint(an)["error"] < EXACT
