"""What spa feeds a model without data (spa/runtime/synthetic.py): 1/f noise for images, rendered text lines
for a text recogniser that lists its characters, and the recogniser that this keeps reading."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.runtime import shapes, synthetic


def _recogniser(characters="abc0123-:", with_metadata=True):
    """A tiny CTC-shaped recogniser: conv over a [N, 3, 48, W] line, pooled over height, a linear
    layer over the characters (+ blank, + space), softmax; dynamic batch and width."""
    rng = np.random.default_rng(0)
    n_cls = len(characters) + 2
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 48, "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((16, n_cls)).astype(np.float32) * 0.3, "w2"),
             numpy_helper.from_array(np.array([0, 2, 3, 1], np.int64), "perm_unused")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["p"], axes=[2], keepdims=0),
             helper.make_node("Transpose", ["p"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "w2"], ["l"]),
             helper.make_node("Softmax", ["l"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "rec", [x], [y], inits[:3])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    if with_metadata:
        helper.set_model_props(m, {"character": "\n".join(characters)})
    return m


def test_a_text_recogniser_gets_rendered_lines_of_its_characters():
    an = spa.analyze(_recogniser(), input_shapes={"x": [1, 3, 48, 160]})
    assert synthetic.kind(an) == "text lines"
    desc, feeds = synthetic.feeds(an, 2, seed=3)
    assert "rendered text lines" in desc and len(feeds) == 2
    x = feeds[0]["x"]
    assert x.shape == (synthetic.lines_per_batch(48, 160), 3, 48, 160) and x.dtype == np.float32
    assert x.min() >= -1.2 and x.max() <= 1.2                  # (x/255 - 0.5)/0.5, a little noise
    # a line is mostly background with ink on it (two clusters of values), not noise around 0
    for line in x:
        used = line[:, :, :np.flatnonzero(np.abs(line).sum(axis=(0, 1)) > 0).max() + 1]
        assert abs(np.median(used)) > 0.2
    assert not np.allclose(feeds[0]["x"], feeds[1]["x"])
    # deterministic in the seed
    np.testing.assert_array_equal(synthetic.feeds(an, 2, seed=3)[1][1]["x"], feeds[1]["x"])


def test_images_without_characters_get_1_over_f_noise_and_so_does_a_recogniser_without_pillow(monkeypatch):
    # not a line (square): the softmax over the last axis is no CTC head along a line
    an = spa.analyze(_recogniser(with_metadata=False), input_shapes={"x": [1, 3, 48, 48]})
    assert synthetic.kind(an) == "1/f noise"
    desc, feeds = synthetic.feeds(an, 1)
    x = feeds[0]["x"]
    assert x.shape == (1, 3, 48, 48) and "1/f" in desc
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3
    monkeypatch.setattr(synthetic, "_pillow", lambda: False)
    an2 = spa.analyze(_recogniser(), input_shapes={"x": [1, 3, 48, 160]})
    assert synthetic.kind(an2) == synthetic.NO_PILLOW and "Pillow" in synthetic.NO_PILLOW
    assert "1/f" in synthetic.feeds(an2, 1)[0]


def test_the_guard_says_what_it_measured_on():
    res = spa.prune(_recogniser(), 0.25, input_shapes={"x": [1, 3, 48, 160]})
    assert "text lines" in res.report["fidelity"]["inputs"]


def _lines(n, seed):
    """Rendered lines and their texts, drawn apart from spa's generator: other sizes, no inversion."""
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    out = []
    for i in range(n):
        text = "".join(rng.choice(alphabet, int(rng.integers(4, 11))))
        font = ImageFont.load_default(size=int(rng.integers(28, 36)))
        w = int(font.getlength(text)) + 16
        img = Image.new("RGB", (w, 48), (255, 255, 255))
        ImageDraw.Draw(img).text((8, 4), text, fill=(20, 20, 20), font=font)
        nw = min(320, int(np.ceil(48 * w / 48)))
        x = np.asarray(img.resize((nw, 48)), np.float32) / 255.0
        feed = np.zeros((1, 3, 48, 320), np.float32)
        feed[0, :, :, :nw] = ((x - 0.5) / 0.5).transpose(2, 0, 1)
        out.append((feed, text))
    return out


def _char_accuracy(probs, truth, chars):
    idx, pred, prev = probs.argmax(-1), [], -1
    for i in idx:
        if i != prev and i != 0 and i - 1 < len(chars):
            pred.append(chars[i - 1])
        prev = i
    d = np.arange(len(truth) + 1)
    for i, c in enumerate(pred, 1):
        prev, d[0] = d[0], i
        for j, t in enumerate(truth, 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (c != t))
            prev, d[j] = d[j], cur
    return max(0.0, 1.0 - d[len(truth)] / max(len(truth), 1))


@pytest.mark.slow
def test_the_ppocr_recogniser_keeps_reading_after_a_data_free_1_3x_prune():
    """PP-OCRv4's recogniser, --target macs=1.3 --criterion obspa --allocate sensitivity, no data:
    on rendered lines it keeps >= 90% of the dense character accuracy (on 1/f noise it kept 9%)."""
    from spa import zoo
    from spa.runtime import probing
    path = str(zoo.fetch("ppocr_rec"))
    an = spa.analyze(path)
    assert synthetic.kind(an) == "text lines"
    chars = shapes.recogniser_characters(an.model) + [" "]
    res = spa.prune(path, target="macs=1.3", criterion="obspa", allocate="sensitivity", analysis=an)
    assert res.report["before"]["macs"] / res.report["after"]["macs"] >= 1.29
    dense, pruned = probing.session(an.full_model()), probing.session(res.model)
    lines = _lines(16, seed=2024)
    acc = lambda s: np.mean([_char_accuracy(s.run(None, {"x": x})[0][0], t, chars) for x, t in lines])  # noqa: E731
    a, b = acc(dense), acc(pruned)
    assert a > 0.8, a
    assert b >= 0.9 * a, (a, b)


def test_a_recogniser_is_probed_at_paddleocrs_line_size_or_the_older_one_it_takes():
    an = spa.analyze(_recogniser())
    assert an.probe.inputs["x"].shape == (1, 3, 48, 320)
    # a CRNN that flattens channels x height into a fixed width only takes 32-pixel lines
    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4 * 32, 5)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([0, 0, 4 * 32], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Reshape", ["t", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["l"]),
             helper.make_node("Softmax", ["l"], ["y"], axis=-1)]
    m = helper.make_model(helper.make_graph(nodes, "crnn", [x], [y], inits),
                          opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(m, {"character": "\n".join("abc")})
    assert spa.analyze(m).probe.inputs["x"].shape == (1, 3, 32, 320)
    # what the user asks for wins
    assert spa.analyze(m, input_shapes={"x": [1, 3, 32, 100]}).probe.inputs["x"].shape == (1, 3, 32, 100)


def test_synthetic_text_is_asked_for_a_model_that_does_not_list_its_characters():
    m = _recogniser(with_metadata=False)
    an = spa.analyze(m, input_shapes={"x": [1, 3, 48, 48]})
    assert synthetic.kind(an) == "1/f noise" and synthetic.kind(an, "text") == "text lines"
    an = spa.analyze(m, input_shapes={"x": [1, 3, 48, 160]})
    desc, feeds = synthetic.feeds(an, 1, wanted="text")
    assert "Latin characters" in desc and abs(np.median(feeds[0]["x"])) > 0.2
    res = spa.prune(m, 0.25, input_shapes={"x": [1, 3, 48, 160]}, synthetic="text", analysis=an)
    assert "text lines" in res.report["fidelity"]["inputs"]
    # and a recogniser that lists them can be given noise
    an2 = spa.analyze(_recogniser(), input_shapes={"x": [1, 3, 48, 160]})
    assert synthetic.kind(an2, "noise") == "1/f noise"
    with pytest.raises(spa.SpaError, match="--synthetic"):
        spa.prune(m, 0.25, synthetic="lines")


def test_synthetic_text_gives_a_page_shaped_input_pages_of_words():
    """--synthetic text on a detector-shaped input (not twice as wide as high): pages, not one
    stretched line."""
    m = _recogniser(with_metadata=False)
    an = spa.analyze(m, input_shapes={"x": [1, 3, 48, 64]})
    desc, feeds = synthetic.feeds(an, 1, wanted="text")
    x = feeds[0]["x"]
    assert "pages" in desc and x.shape == (1, 3, 48, 64)      # the probe's batch: pages are not lines
    rows = np.abs(x[0] - np.median(x[0])).max(axis=(0, 2))   # ink per row: several rows of words
    assert (rows > 0.5).sum() >= 3 and (rows <= 0.2).sum() >= 3


def test_pillow_is_a_core_dependency_so_the_readme_install_renders_text_lines():
    """The README's no-data recogniser prune is judged on rendered lines; from ``pip install .``
    alone (no extra) that needs Pillow (issue 19: 24% of the dense accuracy on 1/f noise)."""
    import tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert any(d.replace(" ", "").lower().startswith("pillow>=") for d in project["dependencies"])
    assert synthetic._pillow()


def test_a_ctc_recogniser_without_its_characters_gets_text_lines_and_is_told_so():
    """A recogniser exported without PaddleOCR's ``character`` metadata: an output [N, T, C], a
    softmax over C, T following the width of a line. It is probed at PaddleOCR's line size and gets
    rendered lines of Latin characters (it got 1/f noise: a prune printed 0.986 and kept 0% of the
    characters), and the description says what spa took it for."""
    m = _recogniser(with_metadata=False)
    an = spa.analyze(m)
    assert an.probe.inputs["x"].shape == (1, 3, 48, 320)
    assert synthetic.kind(an) == "text lines" and synthetic.kind(an, "noise") == "1/f noise"
    desc, feeds = synthetic.feeds(an, 1)
    assert "Latin characters" in desc and "CTC head" in desc, desc
    assert abs(np.median(feeds[0]["x"])) > 0.2
    res = spa.prune(m, 0.25, analysis=an)
    assert "CTC head" in res.report["fidelity"]["inputs"]


def test_the_ppocr_recogniser_without_its_metadata_is_taken_for_a_ctc_recogniser(tmp_path):
    """PP-OCRv4's recogniser with its ``character`` entry stripped: probed at 48x320 (it was probed
    at 64x64, the fallback of a square 224 it refuses) and given rendered lines, not 1/f noise."""
    from spa import zoo
    m = onnx.load(str(zoo.fetch("ppocr_rec")))
    del m.metadata_props[:]
    path = tmp_path / "rec.onnx"
    onnx.save(m, str(path))
    an = spa.analyze(str(path))
    assert an.probe.inputs["x"].shape == (1, 3, 48, 320)
    assert synthetic.kind(an) == "text lines"
    desc, _ = synthetic.feeds(an, 1)
    assert "CTC head" in desc and "Latin characters" in desc, desc
