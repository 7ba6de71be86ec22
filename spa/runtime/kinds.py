"""What a model's inputs are, read from its graph: which are images and in which layout, and whether
the images are text lines.  ``spa.runtime.synthetic`` makes its inputs from these facts.

* **Layout.** An image input is channels first (NCHW, what PyTorch and Paddle export) or channels last
  (NHWC, what Keras models exported by tf2onnx take: ``[N, 224, 224, 3]``).  The graph says which:
  following the input through what does not move its axes (casts, elementwise scaling, Pad...), the
  first operator that cares is a ``Conv`` reading it (NCHW), a ``Transpose`` with perm ``[0, 3, 1, 2]``
  (NHWC; tf2onnx puts one before the first Conv, so does a PyTorch model that permutes a
  channel-last input itself) or, for one channel, a ``Reshape`` of ``[N, H, W, 1]`` into ``[N, 1, H, W]``
  (what tf2onnx emits instead of that Transpose: a speech embedder's ``[N, 76, 32, 1]``).  Without such
  a sign the shape decides: 1, 3 or 4 channels last after two dims of at least 8 is NHWC, anything else
  with two trailing dims of at least 8 NCHW, and the layout is then marked a guess (``Image.sure``).
* **Text lines.** A text recogniser that lists its characters (PaddleOCR's ``character`` metadata:
  ``spa.runtime.shapes.recogniser_characters``); a **CTC head** without them: an output ``[N, T, C]``
  of a softmax over its last axis whose T follows the width of a line-shaped input (at least twice as
  wide as high); a **text direction classifier**: a 2-class softmax over a line-shaped input
  (PaddleOCR's, 0 and 180 degrees).  A recogniser whose line height or width is dynamic is probed at
  PaddleOCR's line size (:func:`recogniser_shapes`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..io import graph_inputs
from .shapes import recogniser_characters

NCHW, NHWC = "NCHW", "NHWC"

#: operators through which an input's axes keep their meaning (what may stand between an image
#: input and the operator that reads it as channels: a cast, a normalisation by constants, padding)
_AXES_KEPT = {"Cast", "Identity", "Add", "Sub", "Mul", "Div", "Pad", "Clip", "Relu", "Neg", "Abs", "Sqrt",
              "QuantizeLinear", "DequantizeLinear", "CastLike", "Max", "Min"}
_CONVS = {"Conv", "ConvInteger", "QLinearConv", "ConvTranspose"}
#: smallest spatial side of an image, and the channel counts of a picture (grey, RGB, RGBA)
MIN_SIDE = 8
PICTURE_CHANNELS = (1, 3, 4)


@dataclass(frozen=True)
class Image:
    """An image input: its ``layout`` (``NCHW`` or ``NHWC``), whether the graph says so (``sure``)
    and ``why`` in words."""
    name: str
    layout: str
    sure: bool
    why: str

    def nchw(self, shape) -> tuple:
        """``shape`` of this input as (N, C, H, W)."""
        n, a, b, c = (int(s) for s in shape)
        return (n, c, a, b) if self.layout == NHWC else (n, a, b, c)

    def from_nchw(self, x: np.ndarray) -> np.ndarray:
        """``x`` [N, C, H, W] in this input's layout."""
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if self.layout == NHWC else x


def _consumers(proto) -> dict:
    out = {}
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name:
                out.setdefault(name, []).append((node, i))
    return out


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.ints else a.i
    return default


def graph_layout(proto, name, shapes=None, consumers=None):
    """``(layout, why)`` that the operators reading 4-D input ``name`` show, or None (``shapes``: the
    probe's, to read a Reshape)."""
    consumers = consumers if consumers is not None else _consumers(proto)
    shapes = shapes or {}
    seen, frontier = {name}, [name]
    while frontier:
        t = frontier.pop(0)
        for node, i in consumers.get(t, []):
            if node.op_type in _CONVS and i == 0:
                return NCHW, f"{node.op_type} '{node.name}' reads it as channels first"
            if node.op_type == "Transpose" and i == 0:
                perm = _attr(node, "perm")
                if perm == [0, 3, 1, 2]:
                    return NHWC, f"Transpose '{node.name}' makes it channels first"
                continue
            if node.op_type == "Reshape" and i == 0:
                a, b = shapes.get(t), shapes.get(node.output[0])
                if a is not None and b is not None and len(a) == len(b) == 4 and a[3] == 1 and \
                        tuple(b) == (a[0], 1, a[1], a[2]):
                    return NHWC, f"Reshape '{node.name}' makes its one channel first"
                continue
            if node.op_type in _AXES_KEPT:
                for o in node.output:
                    if o and o not in seen:
                        seen.add(o)
                        frontier.append(o)
    return None


def images(proto, probe) -> list:
    """Every float 4-D input of ``proto`` that is an image at the ``probe``'s sizes, as :class:`Image`."""
    out, consumers = [], _consumers(proto)
    for vi in graph_inputs(proto):
        v = probe.inputs.get(vi.name)
        if v is None or v.ndim != 4 or not np.issubdtype(v.dtype, np.floating):
            continue
        told = graph_layout(proto, vi.name, probe.shapes, consumers)
        if told is not None:
            layout, why = told
            sure = True
        elif v.shape[3] in PICTURE_CHANNELS and v.shape[1] not in PICTURE_CHANNELS and min(v.shape[1:3]) >= MIN_SIDE:
            layout, sure, why = NHWC, False, f"guessed from its shape {list(v.shape)}: {v.shape[3]} channels last"
        else:
            layout, sure, why = NCHW, False, f"guessed from its shape {list(v.shape)}: channels first"
        image = Image(vi.name, layout, sure, why)
        if min(image.nchw(v.shape)[2:]) >= MIN_SIDE:
            out.append(image)
    return out


def is_line(image: Image, shape) -> bool:
    """A line-shaped image (a recogniser's or a direction classifier's input): at least 2x wider than high."""
    _, _, h, w = image.nchw(shape)
    return w >= 2 * h


def _softmax_outputs(proto):
    """``{graph output: (softmax node, its axis)}`` for the outputs a Softmax or LogSoftmax makes
    (through Identity nodes)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    out = {}
    for vi in proto.graph.output:
        node = producer.get(vi.name)
        while node is not None and node.op_type == "Identity":
            node = producer.get(node.input[0])
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            out[vi.name] = (node, _attr(node, "axis", -1 if opset >= 13 else 1))
    return out


def ctc_output(proto, shapes=None) -> str | None:
    """The graph output that looks like a CTC head from the graph: ``[N, T, C]`` (as declared, or
    in the probe's ``shapes``), a softmax over its last axis; None if there is none."""
    declared = {vi.name: len(vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else None
                for vi in proto.graph.output}
    for name, (_, axis) in _softmax_outputs(proto).items():
        rank = len(shapes[name]) if shapes and name in shapes else declared.get(name)
        if rank == 3 and axis in (-1, 2):
            return name
    return None


def text_reader(proto, probe) -> tuple | None:
    """``(kind, why)`` when ``proto`` reads text lines: ``characters`` (a recogniser that lists
    them), ``ctc`` (a CTC head over a line-shaped input) or ``orientation`` (a 2-class softmax over a
    line-shaped input: a text direction classifier); None otherwise."""
    if recogniser_characters(proto):
        return "characters", "a text recogniser that lists its characters"
    pictures = [im for im in images(proto, probe) if im.nchw(probe.inputs[im.name].shape)[1] in (1, 3)]
    if len(pictures) != 1 or not is_line(pictures[0], probe.inputs[pictures[0].name].shape):
        return None
    image = pictures[0]
    _, _, h, w = image.nchw(probe.inputs[image.name].shape)
    width_axis = 2 if image.layout == NHWC else 3
    width_moves = (probe.dynamic.get(image.name) or (False,) * 4)[width_axis]
    for name, (node, axis) in _softmax_outputs(proto).items():
        shape = probe.shapes.get(name)
        if shape is None:
            continue
        last = axis in (-1, len(shape) - 1)
        if len(shape) == 3 and last and shape[2] >= 3 and 2 <= shape[1] and 2 <= w / shape[1] <= 64:
            follows = probe.dynamic.get(name)
            if not width_moves or follows is None or follows[1]:
                return "ctc", (f"a CTC head: '{name}' {list(shape)} is a softmax over {shape[2]} classes at "
                               f"{shape[1]} steps along the {h}x{w} line '{image.name}'")
        if len(shape) == 2 and last and shape[1] == 2:
            return "orientation", (f"a text direction classifier: a 2-class softmax '{name}' over the "
                                   f"{h}x{w} line '{image.name}'")
    return None


#: the line sizes PaddleOCR feeds its recognisers (``rec_image_shape``: 3,48,320 since PP-OCRv3,
#: 3,32,320 before): a recogniser whose height or width is dynamic is probed at the first it takes,
#: unless the user gives --input-shapes
LINE_SIZES = ((48, 320), (32, 320))


def recogniser_shapes(model, shapes=None) -> list:
    """``[{input: [1, C, H, W]}]`` per ``LINE_SIZES`` (dims the model fixes kept) for a text
    recogniser (its characters listed, or a CTC head: :func:`ctc_output`, ``shapes`` the probe's
    where the declared ones do not tell) whose channels-first image input has a dynamic height or
    width, else []."""
    if not recogniser_characters(model) and not ctc_output(model, shapes):
        return []
    for inp in graph_inputs(model):
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        if tt.elem_type not in (1, 10, 11, 16) or len(dims) != 4 or dims[1] not in (1, 3) or \
                (dims[2] is not None and dims[3] is not None):
            continue
        return [{inp.name: [dims[0] or 1, dims[1], dims[2] or h, dims[3] or w]} for h, w in LINE_SIZES]
    return []
