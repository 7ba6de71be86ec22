"""What a model's inputs are, read from its graph (spa/runtime/kinds.py), and what spa feeds them
(spa/runtime/synthetic.py): channel-last images get the same image-like inputs as channel-first ones,
in their layout; a text direction classifier gets lines of both of its classes."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from spa.runtime import kinds, synthetic


def _classifier(shape, front, n_cls=5, c=3, opset=13):
    """``front`` nodes turn input ``x`` of ``shape`` into ``f`` [N, c, H, W]; then Conv(8) -> Relu ->
    GlobalAveragePool -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, c, 3, 3)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(rng.standard_normal((8, n_cls)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(n_cls, np.float32), "b2")]
    inits += [numpy_helper.from_array(np.asarray(v), k) for k, v in front.get("inits", {}).items()]
    nodes = front["nodes"] + [
        helper.make_node("Conv", ["f", "w1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["q"]), helper.make_node("Gemm", ["q", "w2", "b2"], ["l"]),
        helper.make_node("Softmax", ["l"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


#: tf2onnx's form: scale the NHWC input, then a Transpose to NCHW before the first Conv
TF2ONNX = {"nodes": [helper.make_node("Mul", ["x", "s"], ["m"]),
                     helper.make_node("Transpose", ["m"], ["f"], perm=[0, 3, 1, 2])],
           "inits": {"s": np.float32(1 / 127.5)}}
#: tf2onnx's form for one channel: the Transpose becomes a Reshape [N, H, W, 1] -> [N, 1, H, W] (after a Pad)
ONE_CHANNEL = {"nodes": [helper.make_node("Pad", ["x", "pads"], ["pd"]),
                         helper.make_node("Reshape", ["pd", "to"], ["f"])],
               "inits": {"pads": np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64), "to": np.array([-1, 1, 78, 32], np.int64)}}


def _smooth(x, axis):
    """Correlation of neighbouring values along ``axis``."""
    a, b = np.moveaxis(x, axis, 0)[:-1].ravel(), np.moveaxis(x, axis, 0)[1:].ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_a_tf2onnx_nhwc_classifier_gets_1_over_f_images_in_its_layout():
    """[N, 64, 64, 3] (a Keras classifier): 1/f noise laid out channels last, not white noise
    labelled "realistic integer ranges"; the description names the layout and how spa knows it."""
    an = spa.analyze(_classifier(["n", 64, 64, 3], TF2ONNX))
    (image,) = kinds.images(an.model, an.probe)
    assert (image.layout, image.sure) == ("NHWC", True) and "Transpose" in image.why
    assert synthetic.kind(an) == "1/f noise"
    desc, feeds = synthetic.feeds(an, 2, seed=1)
    x = feeds[0]["x"]
    assert x.shape == (1, 64, 64, 3) and x.dtype == np.float32
    assert _smooth(x, 1) > 0.5 and _smooth(x, 2) > 0.5        # correlated along H and W (white noise: 0) ...
    assert _smooth(x, 3) > 0.5                                 # ... and across the channels, last
    assert "1/f noise" in desc and "NHWC" in desc and "integer" not in desc, desc
    res = spa.prune(an.model, 0.25, analysis=an)
    assert "NHWC" in res.report["fidelity"]["inputs"]


def test_one_channel_last_behind_a_reshape_is_an_image_too():
    """openWakeWord's speech embedder takes [N, 76, 32, 1]: tf2onnx pads it and reshapes it to
    [N, 1, 78, 32] for its first Conv."""
    an = spa.analyze(_classifier(["n", 76, 32, 1], ONE_CHANNEL, c=1))
    (image,) = kinds.images(an.model, an.probe)
    assert (image.layout, image.sure) == ("NHWC", True) and "Reshape" in image.why
    desc, feeds = synthetic.feeds(an, 1)
    x = feeds[0]["x"]
    assert x.shape == (1, 76, 32, 1) and _smooth(x, 1) > 0.5 and _smooth(x, 2) > 0.5
    assert "NHWC" in desc


def test_a_layout_read_from_the_shape_alone_is_said_to_be_a_guess():
    """No Conv, Transpose or Reshape says which axis is channels: three last after two of 64 is
    taken for NHWC, and the description says spa is not sure and asks for --calib."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 64, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), "w"),
                           numpy_helper.from_array(rng.standard_normal((8, 2)).astype(np.float32), "w2")])
    an = spa.analyze(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    (image,) = kinds.images(an.model, an.probe)
    assert (image.layout, image.sure) == ("NHWC", False)
    desc, feeds = synthetic.feeds(an, 1)
    assert "not sure" in desc and "--calib" in desc and feeds[0]["x"].shape == (1, 64, 64, 3)


def test_channels_first_models_keep_their_inputs():
    an = spa.analyze(_classifier(["n", 3, 32, 32], {"nodes": [helper.make_node("Identity", ["x"], ["f"])]}))
    (image,) = kinds.images(an.model, an.probe)
    assert (image.layout, image.sure) == ("NCHW", True)
    desc, _ = synthetic.feeds(an, 1)
    assert desc == "synthetic (1 batches, 1/f noise for images)"


@pytest.mark.torch
def test_a_torch_model_that_takes_channels_last_images(tmp_path):
    """A PyTorch model that permutes a channel-last input itself (exported with torch.onnx)."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):   # x: [N, H, W, 3]
            h = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
            return self.fc(h.mean(dim=(2, 3)))

    torch.manual_seed(0)
    path = tmp_path / "nhwc.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(1, 40, 40, 3),), str(path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"])
    an = spa.analyze(str(path))
    (image,) = kinds.images(an.model, an.probe)
    assert (image.layout, image.sure) == ("NHWC", True)
    x = synthetic.feeds(an, 1)[1][0]["image"]
    assert x.shape == (1, 40, 40, 3) and _smooth(x, 1) > 0.5


def _direction_classifier():
    """A 2-class softmax over a [N, 3, 48, W] line (PaddleOCR's text direction classifier's form)."""
    m = _classifier(["n", 3, 48, "w"], {"nodes": [helper.make_node("Identity", ["x"], ["f"])]}, n_cls=2)
    return m


def test_a_text_direction_classifier_gets_lines_half_of_them_upside_down():
    an = spa.analyze(_direction_classifier(), input_shapes={"x": [1, 3, 48, 192]})
    assert kinds.text_reader(an.model, an.probe)[0] == "orientation"
    assert synthetic.kind(an) == "text lines"
    desc, feeds = synthetic.feeds(an, 1, seed=4)
    assert "upside down" in desc and "direction classifier" in desc, desc
    assert feeds[0]["x"].shape[0] == synthetic.lines_per_batch(48, 192)
    # the same lines drawn upright and upside down: every second one is the other turned by 180 degrees
    up = synthetic.text_lines(np.random.default_rng(7), (4, 3, 48, 192), synthetic.LATIN)
    turned = synthetic.text_lines(np.random.default_rng(7), (4, 3, 48, 192), synthetic.LATIN, upside_down=True)
    for i in range(4):
        width = np.flatnonzero(np.abs(up[i]).sum(axis=(0, 1)) > 0).max() + 1
        a, b = up[i][:, :, :width], turned[i][:, :, :width]
        same = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        flipped = np.corrcoef(a.ravel(), b[:, ::-1, ::-1].ravel())[0, 1]
        if i % 2:
            assert flipped > 0.9 and same < flipped, (i, same, flipped)
        else:
            assert same > 0.99, (i, same)
    # a square input is no line: 1/f noise, as before
    assert synthetic.kind(spa.analyze(_direction_classifier(), input_shapes={"x": [1, 3, 48, 48]})) == "1/f noise"
