"""Hand-built ONNX graphs, one per coupling pattern, with random weights (seeded)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class G:
    """A tiny graph builder: ``g.w(shape)`` makes a weight, ``g.op(...)`` a node."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def w(self, *shape, positive=False, value=None):
        name = self.name("w")
        arr = value if value is not None else self.rng.standard_normal(shape).astype(np.float32) * 0.5
        if positive:
            arr = np.abs(arr) + 0.5
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def i64(self, values):
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def op(self, op_type, inputs, n_out=1, **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k=3, group=1, bias=True, bn=False, act="Relu"):
        ins = [x, self.w(cout, cin // group, k, k)] + ([self.w(cout)] if bias else [])
        y = self.op("Conv", ins, pads=[k // 2] * 4, group=group)
        if bn:
            y = self.op("BatchNormalization", [y, self.w(cout), self.w(cout), self.w(cout), self.w(cout, positive=True)])
        if act:
            y = self.op(act, [y])
        return y

    def model(self, inputs, outputs, opset=17):
        g = helper.make_graph(self.nodes, "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        # give the outputs their shapes (from one onnxruntime run) so the model passes onnx.checker
        import onnxruntime as ort
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {n: np.zeros(s, np.float32) for n, s in inputs}
        for out, value in zip(m.graph.output, sess.run(None, feed)):
            out.CopyFrom(helper.make_tensor_value_info(out.name, TensorProto.FLOAT, list(value.shape)))
        onnx.checker.check_model(m)
        return m


def residual_chain():
    g = G()
    x = g.conv("x", 3, 8, bn=True)
    for _ in range(3):
        y = g.conv(x, 8, 8, bn=True)
        y = g.conv(y, 8, 8, bn=True, act=None)
        x = g.op("Relu", [g.op("Add", [x, y])])
    p = g.op("GlobalAveragePool", [x])
    f = g.op("Flatten", [p])
    out = g.op("Gemm", [f, g.w(5, 8), g.w(5)], transB=1)
    return g.model([("x", [1, 3, 8, 8])], [out])


def concat_split():
    g = G()
    a = g.conv("x", 3, 6)
    b = g.conv("x", 3, 4, act="Sigmoid")
    c = g.op("Concat", [a, b], axis=1)
    c = g.conv(c, 10, 10, bn=True)
    s1, s2 = g.op("Split", [c, g.i64([4, 6])], n_out=2, axis=1)
    y1 = g.conv(s1, 4, 5, act=None)
    y2 = g.conv(s2, 6, 5, act=None)
    out = g.op("Add", [y1, y2])
    return g.model([("x", [1, 3, 8, 8])], [out])


def grouped_depthwise():
    g = G()
    x = g.conv("x", 3, 8)
    x = g.conv(x, 8, 16, group=4, bn=True)            # grouped: 4 groups of 2 -> 4
    x = g.conv(x, 16, 16, group=16, bn=True)          # depthwise
    x = g.conv(x, 16, 32, group=16, bias=False)       # depthwise multiplier 2
    out = g.conv(x, 32, 4, k=1, act=None)
    return g.model([("x", [1, 3, 8, 8])], [out])


def channel_shuffle():
    g = G()
    x = g.conv("x", 3, 12, bn=True)
    y = g.op("Reshape", [x, g.i64([1, 3, 4, 8, 8])])
    y = g.op("Transpose", [y], perm=[0, 2, 1, 3, 4])
    y = g.op("Reshape", [y, g.i64([1, 12, 8, 8])])
    out = g.conv(y, 12, 6, k=1, act=None)
    return g.model([("x", [1, 3, 8, 8])], [out])


def flatten_gemm():
    g = G()
    x = g.conv("x", 3, 8, bn=True)
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    f = g.op("Flatten", [x])
    h = g.op("Relu", [g.op("Gemm", [f, g.w(8 * 4 * 4, 16), g.w(16)])])
    out = g.op("Gemm", [h, g.w(3, 16), g.w(3)], transB=1)
    return g.model([("x", [1, 3, 8, 8])], [out])


def squeeze_excitation():
    g = G()
    x = g.conv("x", 3, 16, bn=True, act="HardSwish")
    s = g.op("GlobalAveragePool", [x])
    s = g.conv(s, 16, 4, k=1)
    s = g.conv(s, 4, 16, k=1, act="HardSigmoid")
    x = g.op("Mul", [x, s])
    out = g.conv(x, 16, 4, k=1, act=None)
    return g.model([("x", [1, 3, 8, 8])], [out])


def attention(n=6, d=16, heads=4, layernorm=True, mlp=True, bias_table=False):
    """A transformer block: [1, n, d] -> qkv -> heads -> softmax(QK^T) V -> out proj (+ MLP).
    ``bias_table``: a learned attention bias added to the scores, as EfficientFormerV2 and LeViT
    export it: a table [heads, relative positions] read by ``Gather(axis=1)`` at constant indices [n, n]."""
    g = G()
    hd = d // heads
    x = "x"
    h = g.op("LayerNormalization", [x, g.w(d), g.w(d)], axis=-1) if layernorm else x
    q = g.op("Add", [g.op("MatMul", [h, g.w(d, d)]), g.w(d)])
    k = g.op("Add", [g.op("MatMul", [h, g.w(d, d)]), g.w(d)])
    v = g.op("Add", [g.op("MatMul", [h, g.w(d, d)]), g.w(d)])
    split = g.i64([1, n, heads, hd])
    q = g.op("Transpose", [g.op("Reshape", [q, split])], perm=[0, 2, 1, 3])
    k = g.op("Transpose", [g.op("Reshape", [k, split])], perm=[0, 2, 3, 1])
    v = g.op("Transpose", [g.op("Reshape", [v, split])], perm=[0, 2, 1, 3])
    scale = g.w(value=np.array(1 / np.sqrt(hd), np.float32))
    scores = g.op("Mul", [g.op("MatMul", [q, k]), scale])
    if bias_table:
        rel = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :])
        scores = g.op("Add", [scores, g.op("Gather", [g.w(heads, n), g.i64(rel)], axis=1)])
    att = g.op("Softmax", [scores], axis=-1)
    o = g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3])
    o = g.op("Reshape", [o, g.i64([1, n, d])])
    o = g.op("Add", [g.op("MatMul", [o, g.w(d, d)]), g.w(d)])
    x = g.op("Add", [x, o])
    if mlp:
        h = g.op("LayerNormalization", [x, g.w(d), g.w(d)], axis=-1) if layernorm else x
        h = g.op("Gelu", [g.op("Add", [g.op("MatMul", [h, g.w(d, 4 * d)]), g.w(4 * d)])], )
        h = g.op("Add", [g.op("MatMul", [h, g.w(4 * d, d)]), g.w(d)])
        x = g.op("Add", [x, h])
    out = g.op("MatMul", [x, g.w(d, 3)])
    return g.model([("x", [1, n, d])], [out], opset=20)


PATTERNS = {
    "residual_chain": residual_chain, "concat_split": concat_split,
    "grouped_depthwise": grouped_depthwise, "channel_shuffle": channel_shuffle,
    "flatten_gemm": flatten_gemm, "squeeze_excitation": squeeze_excitation,
    "attention": lambda: attention(layernorm=False, mlp=False),
    "attention_bias_table": lambda: attention(layernorm=False, mlp=False, bias_table=True),
    "transformer_block": attention,
}


def small_mlp(front, inputs, outputs=(), opsets=()):
    """``front`` nodes make ``x`` [1, 4] from ``inputs``; then Gemm(8) -> Relu -> Gemm(3) = ``y``:
    one prunable group of 8 hidden units."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 4)), ("b1", (8,)), ("w2", (3, 8)), ("b2", (3,)))]
    nodes = list(front) + [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="g1"),
                           helper.make_node("Relu", ["h"], ["r"], name="relu"),
                           helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, name="g2")]
    g = helper.make_graph(nodes, "g", list(inputs),
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]), *outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), *opsets], ir_version=10)
    onnx.checker.check_model(m)
    return m


def typed_input(elem_type):
    """x0 float [1, 4] + Cast(aux of ``elem_type``) -> the MLP."""
    return small_mlp([helper.make_node("Cast", ["aux"], ["auxf"], to=TensorProto.FLOAT, name="cast"),
                      helper.make_node("Add", ["x0", "auxf"], ["x"], name="add")],
                     [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 4]),
                      helper.make_tensor_value_info("aux", elem_type, [1, 4])])


# ---------------------------------------------------------------- whole experts: the masked-router oracle

def masked_router(proto, layers, kept):
    """The original with every removed expert's router logit at -inf."""
    ref = onnx.ModelProto()
    ref.CopyFrom(proto)
    for layer in layers:
        if layer.index not in kept:
            continue
        mask = np.full(layer.experts, -np.inf, np.float32)
        mask[list(kept[layer.index])] = 0.0
        node = next(n for n in ref.graph.node if n.name == layer.router)
        raw = node.output[0] + "/raw"
        ref.graph.initializer.append(numpy_helper.from_array(mask, node.output[0] + "/mask"))
        ref.graph.node.insert(list(ref.graph.node).index(node) + 1,
                              helper.make_node("Add", [raw, node.output[0] + "/mask"], [node.output[0]]))
        node.output[0] = raw
    del ref.graph.value_info[:]
    return ref


def worst_error(a, b, feeds):
    """Largest relative error over the outputs of ``a`` and ``b`` in onnxruntime on ``feeds``."""
    import onnxruntime as ort
    sa, sb = ort.InferenceSession(a.SerializeToString()), ort.InferenceSession(b.SerializeToString())
    err = 0.0
    for f in feeds:
        for x, y in zip(sa.run(None, f), sb.run(None, f)):
            assert x.shape == y.shape
            err = max(err, float(np.abs(x - y).max() / max(np.abs(x).max(), 0.1)))
    return err
