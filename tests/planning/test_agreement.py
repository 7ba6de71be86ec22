"""Task agreement (spa/planning/agreement.py): each metric on constructed outputs, the choice from
an output's form, and the metric real models get."""
import numpy as np
import pytest

import spa
from spa.planning import agreement, fidelity


def tally(metric, pairs, lm=None, feeds=None):
    t = agreement.Tally(metric, lm=lm)
    for i, (a, b) in enumerate(pairs):
        t.add(a, b, feeds[i] if feeds else None)
    return t


def test_top1_counts_equal_argmax_and_reports_kl():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20, 5))
    b = a.copy()
    b[:5] = -b[:5]                                    # flips the argmax of (most of) five rows
    flipped = np.count_nonzero(a.argmax(1) != b.argmax(1))
    t = tally("top1", [(a, b)])
    assert t.value() == pytest.approx(1 - flipped / 20) and t.extra()["kl"] > 0
    assert tally("top1", [(a, a)]).value() == 1.0 and "kl" not in tally("top1", [(a, a)]).extra()
    s = np.array([[0.9], [0.2], [0.6]] * 6)          # one sigmoid score: the side of 0.5
    assert tally("top1", [(s, 1 - s)]).value() == 0.0
    assert tally("top1", [(a[:3], a[:3])]).value() is None          # too few samples to say


def test_ctc_agreement_is_on_the_decoded_text():
    blank = 0

    def frames(seq, T=12, C=6):
        f = np.full((T, C), 0.01)
        f[:, blank] = 1.0
        for i, c in enumerate(seq):
            f[1 + 2 * i, :] = 0.01
            f[1 + 2 * i, c] = 1.0
        return f / f.sum(1, keepdims=True)
    assert agreement.ctc_decode(frames([3, 3, 5]), blank) == [3, 3, 5]   # a blank between repeats keeps both
    a = np.stack([frames([1, 2, 3])] * 8)
    b = np.stack([frames([1, 2, 4])] * 8)                               # one character of three wrong
    t = tally("ctc", [(a, b)])
    assert t.value() == pytest.approx(2 / 3) and t.extra()["blank"] == blank
    assert tally("ctc", [(a, a)]).value() == 1.0


def test_mask_is_iou_and_neighbours_follow_the_nearest_sample():
    a = np.zeros((1, 1, 4, 4))
    a[..., :2, :] = 0.9
    b = np.zeros_like(a)
    b[..., :1, :] = 0.9
    assert tally("mask", [(a, b)]).value() == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    e = rng.standard_normal((10, 8))
    assert tally("neighbours", [(e, e + 1e-3 * rng.standard_normal(e.shape))]).value() == 1.0
    assert tally("neighbours", [(e, rng.standard_normal(e.shape))]).value() < 0.6
    assert tally("neighbours", [(e[:2], e[:2])]).value() is None


def test_the_metric_follows_the_output_form():
    rng = np.random.default_rng(2)
    probs = rng.random((2, 30, 7))
    probs /= probs.sum(-1, keepdims=True)
    assert agreement.choose("logits", rng.standard_normal((1, 9, 50)), None, "logits") == "tokens"
    assert agreement.choose("output", rng.standard_normal((4, 1000)), "Gemm", None) == "top1"
    assert agreement.choose("x", probs, "Softmax", None) == "ctc"
    assert agreement.choose("map", rng.random((1, 1, 8, 8)), "Sigmoid", None) == "mask"
    assert agreement.choose("sentence_embedding", rng.standard_normal((4, 384)), "Div", None) == "neighbours"
    assert agreement.choose("last_hidden_state", rng.standard_normal((4, 7, 64)), "Add", None) == "neighbours"
    assert agreement.choose("output0", rng.standard_normal((1, 22, 2100)), "Concat", None) == "cosine"
    assert agreement.choose("output", rng.standard_normal((4, 10)), None, None, "ctc") == "cosine"   # does not suit
    with pytest.raises(spa.SpaError, match="--fidelity-metric"):
        agreement.choose("output", rng.standard_normal((4, 10)), None, None, "accuracy")


def test_compare_runs_reports_agreement_beside_the_cosine():
    rng = np.random.default_rng(3)
    ref = [{"y": rng.standard_normal((8, 3))} for _ in range(3)]
    got = [{"y": r["y"] + 0.01} for r in ref]
    out = fidelity.compare_runs(ref, got, metrics={"y": "top1"})
    assert out["metric"] == {"y": "top1"} and out["min"] == out["agreement"]["y"] == 1.0
    assert out["cosine"]["y"] > 0.99
    few = fidelity.compare_runs(ref[:1], got[:1], metrics={"y": "top1"})      # 8 samples: the cosine stands in
    assert few["metric"] == {"y": "cosine"} and few["min"] == few["cosine"]["y"]


@pytest.mark.parametrize("name,output,metric", [("ppocr_rec", "softmax_11.tmp_0", "ctc"),
                                                ("ppocr_det", "sigmoid_0.tmp_0", "mask"),
                                                ("yolov8n", "output0", "cosine")])
def test_real_models_are_measured_by_their_task(name, output, metric):
    """The recogniser by its decoded text, the detector by its text map, YOLO's raw head by the cosine
    (boxes are not decoded); the text direction classifier, given its 32 rendered lines, by its top-1."""
    fid = spa.prune(name, 0.1).report["fidelity"]
    assert fid["metric"] == {output: metric}, fid
    assert 0.0 <= fid["min"] <= 1.0
    assert spa.prune("ppocr_cls", 0.1).report["fidelity"]["metric"] == {"save_infer_model/scale_0.tmp_1": "top1"}


def test_the_guard_says_when_its_inputs_are_unlike_the_models_data(tmp_path):
    """1/f noise for a detector, integer ranges for a byte classifier: a caution that asks for --calib;
    rendered lines for a recogniser or a text direction classifier, or real data: none."""
    assert "--calib" in spa.prune("yolov8n", 0.1).report["fidelity"]["caution"]
    assert "--calib" in spa.prune("magika", 0.1).report["fidelity"]["caution"]
    assert "caution" not in spa.prune("ppocr_rec", 0.1).report["fidelity"]
    assert "caution" not in spa.prune("ppocr_cls", 0.1).report["fidelity"]
    an = spa.analyze("yolov8n")
    (name, value), = an.probe.inputs.items()
    x = np.random.default_rng(0).random((4,) + tuple(value.shape[1:])).astype(np.float32)
    np.save(tmp_path / "real.npy", x)
    assert "caution" not in spa.prune("yolov8n", 0.1, analysis=an, calib=str(tmp_path / "real.npy"),
                                      criterion="wanda").report["fidelity"]
