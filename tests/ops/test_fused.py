"""Transformers fused by onnxruntime's optimizer (``com.microsoft`` contrib ops, ``spa.ops.fused``).

Real fusions come from ``onnxruntime.transformers.optimizer`` on the tiny BERT and GPT-2 exports of
``tools/export_transformers.py``; the ops it does not produce from them (MultiHeadAttention,
GroupQueryAttention, RotaryEmbedding, the simplified norms, the Gelu family) are hand-built, each
graph run once in onnxruntime before spa sees it.  Every prunable group must equal the cut original
(``spa.verify.oracle``), alone and all together, at two sizes of the dynamic batch and sequence.
"""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import spa
from graphs import G
from spa.surgery import slicing
from spa.verify.oracle import check_groups, check_joint, cut_model
from exported import transformers as export

EXACT = 1e-5
MS = "com.microsoft"
HIDDEN = 16


def prunable(an):
    return [g for g in an.groups if g.prunable]


def assert_exact(an, n_prunable=None, approx=0):
    """Every exact group alone and all exact groups at once equal the cut original; approximate
    groups (through a norm) prune into a valid model."""
    groups = prunable(an)
    if n_prunable is not None:
        assert len(groups) == n_prunable, [g.summary() for g in an.groups]
    assert sum(g.approximate for g in groups) == approx, [g.summary() for g in groups]
    for r in check_groups(an):
        assert r["approximate"] or r["error"] < EXACT, r
    joint = check_joint(an, seed=1)
    assert joint["removed"] > 0 and joint["error"] < EXACT, joint["error"]
    if approx:
        check_joint(an, seed=2, approximate=True)  # validity only


def fused_ops(model):
    return collections.Counter(n.op_type for n in model.graph.node if n.domain == MS)


def attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ----------------------------------------------------------------------------------------------
# hand-built graphs


class F(G):
    """``G`` with contrib ops and dynamic [batch, seq, HIDDEN] float input ``x``."""

    def ms(self, op_type, inputs, n_out=1, **kw):
        out = self.op(op_type, inputs, n_out, **kw)
        self.nodes[-1].domain = MS
        return out

    def linear(self, x, cin, cout):
        return self.op("MatMul", [x, self.w(cin, cout)])

    def renamed(self, outs, names):
        """The last node's extra outputs renamed (present caches are graph outputs); its first."""
        self.nodes[-1].output[1:] = names
        return outs[0]

    def heads(self, t, n, d):
        """[B, S, n*d] -> [B, n, S, d]."""
        return self.op("Transpose", [self.op("Reshape", [t, self.i64([0, 0, n, d])])], perm=[0, 2, 1, 3])

    def rope_caches(self, rows, half):
        """cos and sin caches [rows, half] (constants)."""
        pos = np.arange(rows, dtype=np.float32)[:, None] / (10.0 ** (np.arange(half, dtype=np.float32) / half))
        return self.w(value=np.cos(pos)), self.w(value=np.sin(pos))

    def build(self, caches=None):
        """The model: input x (and ``caches``: name -> [batch, heads, "past", head dim] inputs, each
        with a "present" output named after it), output y; run in onnxruntime at two sizes."""
        caches = caches or {}
        self.nodes[-1].output[0] = "y"
        f32 = TensorProto.FLOAT
        ins = [helper.make_tensor_value_info("x", f32, ["batch", "seq", HIDDEN])] + \
            [helper.make_tensor_value_info(n, f32, dims) for n, dims in caches.items()]
        outs = [helper.make_tensor_value_info(n, f32, None) for n in ["y"] + [present(c) for c in caches]]
        graph = helper.make_graph(self.nodes, "g", ins, outs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=8)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for b, s, p in ((1, 3, 2), (2 - bool(caches), 7, 0)):
            got = sess.run(None, {"x": np.ones((b, s, HIDDEN), np.float32),
                                  **{n: np.ones((b, dims[1], p, dims[3]), np.float32) for n, dims in caches.items()}})[0]
            assert got.shape[:2] == (b, s) and np.isfinite(got).all()
        return m


def present(cache):
    return cache.replace("past", "present")


def mha_block(bias=True, rotary=0, bnsh=False, interleaved=0, cache=False):
    """Projections -> (RotaryEmbedding of ``rotary`` dims: on q 3-D with num_heads; on k 3-D
    without, or BNSH) -> MultiHeadAttention (4 heads, q/k head dim 8, v head dim 6, or 8 with
    BNSH key/value or a ``cache``) -> output projection -> SkipSimplifiedLayerNormalization with x."""
    g = F(0)
    n, d = 4, 8
    dv = d if bnsh or cache else 6
    q, k, v = g.linear("x", HIDDEN, n * d), g.linear("x", HIDDEN, n * d), g.linear("x", HIDDEN, n * dv)
    if rotary:
        pid, (cos, sin) = g.i64([0]), g.rope_caches(512, rotary // 2)  # rows: positions up to the probe's sequence
        q = g.ms("RotaryEmbedding", [q, pid, cos, sin], num_heads=n, rotary_embedding_dim=rotary, interleaved=interleaved)
        # k: BNSH, or 3-D with the head dim implied by the caches (full rotation only)
        k = g.heads(k, n, d) if bnsh else k
        partial = {} if bnsh or rotary == d else {"num_heads": n, "rotary_embedding_dim": rotary}
        k = g.ms("RotaryEmbedding", [k, pid, cos, sin], interleaved=interleaved, **partial)
    elif bnsh:
        k = g.heads(k, n, d)
    if bnsh:
        v = g.heads(v, n, dv)
    ins = [q, k, v, g.w(2 * n * d + n * dv) if bias else ""] + (["", "", "past_key", "past_value"] if cache else [])
    a = g.ms("MultiHeadAttention", ins, 3 if cache else 1, num_heads=n)
    if cache:
        a = g.renamed(a, ["present_key", "present_value"])
    o = g.linear(a, n * dv, HIDDEN)
    g.ms("SkipSimplifiedLayerNormalization", [o, "x", g.w(HIDDEN)])
    return g.build({"past_key": ["batch", n, "past", d], "past_value": ["batch", n, "past", d]} if cache else None)


def gqa_block(packed=False, cache=False, rotary=False):
    """GroupQueryAttention, 4 query heads over 2 KV heads (head dim 8), prompt form or with a
    ``cache``: seqlens_k and total_sequence_length computed from the shapes of x and the cache.
    With a cache the kernel runs several new tokens at batch 1 only, so the probe never moves the
    batch and spa folds it: that model is for batch 1."""
    g = F(1)
    n, kv, d = 4, 2, 16 if rotary else 8  # the kernel's head_size % 8 (% 16 with do_rotary)
    shp = g.op("Shape", ["x"])
    total = g.op("Gather", [shp, g.i64(1)], axis=0)
    if cache:
        total = g.op("Add", [total, g.op("Gather", [g.op("Shape", ["past_key"]), g.i64(2)], axis=0)])
    batch = g.op("Slice", [shp, g.i64([0]), g.i64([1])])
    seqlens = g.op("Cast", [g.op("Expand", [g.op("Sub", [total, g.i64(1)]), batch])], to=TensorProto.INT32)
    if packed:
        qkv = [g.linear("x", HIDDEN, (n + 2 * kv) * d), "", ""]
    else:
        qkv = [g.linear("x", HIDDEN, n * d), g.linear("x", HIDDEN, kv * d), g.linear("x", HIDDEN, kv * d)]
    past = ["past_key", "past_value"] if cache else ["", ""]
    rope = dict(do_rotary=1, rotary_interleaved=0) if rotary else {}
    ins = qkv + past + [seqlens, g.op("Cast", [total], to=TensorProto.INT32)]
    ins += list(g.rope_caches(512, d // 2)) if rotary else []
    a = g.ms("GroupQueryAttention", ins, 3 if cache else 1, num_heads=n, kv_num_heads=kv, **rope)
    if cache:
        a = g.renamed(a, ["present_key", "present_value"])
    g.linear(a, n * d, HIDDEN)
    return g.build({"past_key": ["batch", kv, "past", d], "past_value": ["batch", kv, "past", d]} if cache else None)


def attention_block():
    """Attention with its own v width (qkv_hidden_sizes 32/32/24), causal."""
    g = F(2)
    a = g.ms("Attention", ["x", g.w(HIDDEN, 88), g.w(88)], num_heads=4, qkv_hidden_sizes=[32, 32, 24], unidirectional=1)
    g.linear(a, 24, HIDDEN)
    return g.build()


def mlp_block():
    """FastGelu(bias), BiasGelu, QuickGelu, Gelu between MatMuls; a SimplifiedLayerNormalization
    (default domain) and a SkipLayerNormalization whose input+skip sum output is used."""
    g = F(3)
    h = g.ms("FastGelu", [g.linear("x", HIDDEN, 24), g.w(24)])
    h = g.ms("BiasGelu", [g.linear(h, 24, 24), g.w(24)])
    h = g.ms("Gelu", [g.ms("QuickGelu", [g.linear(h, 24, 20)], alpha=1.702)])
    h = g.ms("FastGelu", [g.linear(h, 20, 12)])
    h = g.op("SimplifiedLayerNormalization", [h, g.w(12, positive=True)], axis=-1, epsilon=1e-5)
    a = g.linear(h, 12, 12)
    y, _, _, s = g.ms("SkipLayerNormalization", [a, h, g.w(12, positive=True), g.w(12), g.w(12)], n_out=4)
    g.linear(g.op("Add", [g.linear(y, 12, 12), s]), 12, HIDDEN)
    return g.build()


def test_multihead_attention_heads_and_head_dims_are_exact():
    an = spa.analyze(mha_block())
    assert_exact(an, 3)  # heads, q/k head dim, v head dim


def test_multihead_attention_with_bnsh_key_value_and_no_bias():
    an = spa.analyze(mha_block(bias=False, bnsh=True))
    assert_exact(an, 2)  # heads, one head dim for q, k and v


@pytest.mark.parametrize("bnsh,interleaved", [(False, 0), (True, 0), (True, 1)])
def test_rotary_embedding_keeps_pairs(bnsh, interleaved):
    model = mha_block(bias=not bnsh, rotary=8, bnsh=bnsh, interleaved=interleaved)  # bias with BNSH: blocked
    an = spa.analyze(model)
    assert_exact(an, 3 - bnsh)
    cos = next(t.name for t in model.graph.initializer if list(t.dims) == [512, 4])
    pairs = next(g for g in prunable(an) if (cos, 1) in g.axes)
    assert pairs.channels == 4  # a unit is a rotary pair and its cache column
    pruned = slicing.apply(an.model, an.channels, an.probe, pairs.units[:1])
    rot = [attrs(n) for n in pruned.graph.node if n.op_type == "RotaryEmbedding"]
    assert {"num_heads": 4, "rotary_embedding_dim": 6, "interleaved": interleaved}.items() <= rot[0].items()


def test_partial_rotary_prunes_pairs_and_the_positions_it_does_not_rotate():
    model = mha_block(rotary=4)
    an = spa.analyze(model)
    assert_exact(an, 4)  # heads, 2 rotary pairs, 4 unrotated q/k dims, v head dim
    assert sorted(g.channels for g in prunable(an)) == [2, 4, 4, 6]
    cos = next(t.name for t in model.graph.initializer if list(t.dims) == [512, 2])
    pairs = next(g for g in prunable(an) if (cos, 1) in g.axes)
    rest = next(g for g in prunable(an) if g.channels == 4 and not any(ax[0].endswith("#heads") for ax in g.axes))
    pruned = slicing.apply(an.model, an.channels, an.probe, np.concatenate([pairs.units[:1], rest.units[:1]]))
    assert [attrs(n)["rotary_embedding_dim"] for n in pruned.graph.node if n.op_type == "RotaryEmbedding"] == [2, 2]


def test_group_query_attention_prunes_kv_heads_and_query_groups():
    for model in (gqa_block(), gqa_block(packed=True), gqa_block(rotary=True)):
        an = spa.analyze(model)
        assert_exact(an, 2)  # KV heads, query heads per KV head (the head dim is fixed: the kernel's % 8)
        kv = next(g for g in prunable(an) if g.channels == 2 and "kv_heads" in str(g.axes))
        pruned = slicing.apply(an.model, an.channels, an.probe, kv.units[:1])
        got = attrs(next(n for n in pruned.graph.node if n.op_type == "GroupQueryAttention"))
        assert (got["num_heads"], got["kv_num_heads"]) == (2, 1)


@pytest.mark.parametrize("block", ["mha", "gqa"])
def test_kv_caches_tie_heads_and_a_decode_step_equals_the_cut_original(block):
    """Caches are graph inputs: their heads and head dims stay unless prune_io frees them; then the
    pruned model fed the kept slices of the caches equals the cut original fed the whole caches."""
    model = mha_block(cache=True) if block == "mha" else gqa_block(cache=True)
    blocked = prunable(spa.analyze(model))
    an = spa.analyze(model, prune_io="past|present")
    # MHA: heads and the head dim (q, k, v share it with a cache); GQA: query heads per KV head are
    # free anyway, KV heads with prune_io (the head dim is fixed)
    assert [g.channels for g in blocked] == ([] if block == "mha" else [2])
    assert sorted(g.channels for g in prunable(an)) == ([4, 8] if block == "mha" else [2, 2])
    units = np.concatenate([g.units[:g.channels // 2] for g in prunable(an)])
    pruned = slicing.apply(an.model, an.channels, an.probe, units)
    mask = an.channels.removed_atoms(units)

    def kept(name, d):
        k = an.channels.keep(mask, (name, d))
        return np.arange(an.probe.shapes[name][d]) if k is None else k

    rng = np.random.default_rng(0)
    sa, sb = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
              for m in (pruned, cut_model(an, units)))
    for b, s, p in ((1, 3, 5), (1 if block == "gqa" else 2, 1, 7)):  # GQA with a cache: batch 1 (see gqa_block)
        full = {"x": rng.standard_normal((b, s, HIDDEN)).astype(np.float32)}
        for c in ("past_key", "past_value"):
            shape = an.probe.shapes[c]
            full[c] = rng.standard_normal((b, shape[1], p, shape[3])).astype(np.float32)
        small = {n: v if n == "x" else v[:, kept(n, 1)][..., kept(n, 3)] for n, v in full.items()}
        got, want = sa.run(None, small), sb.run(None, full)
        assert np.abs(got[0] - want[0]).max() < EXACT * np.abs(want[0]).max()
        assert np.abs(got[1] - want[1][:, kept("past_key", 1)][..., kept("past_key", 3)]).max() < 1e-6


def test_attention_with_its_own_v_width_rewrites_qkv_hidden_sizes():
    an = spa.analyze(attention_block())
    assert_exact(an, 3)
    sizes = {g.channels for g in prunable(an)}
    assert sizes == {4, 8, 6}
    head_dim = next(g for g in prunable(an) if g.channels == 8)
    pruned = slicing.apply(an.model, an.channels, an.probe, head_dim.units[:3])
    got = attrs(next(n for n in pruned.graph.node if n.op_type == "Attention"))
    assert got["qkv_hidden_sizes"] == [20, 20, 24] and got["num_heads"] == 4
    assert abs(got["scale"] - 1 / np.sqrt(8)) < 1e-7  # the original scale, not 1/sqrt(5)


def test_bias_activations_and_simplified_norms():
    an = spa.analyze(mlp_block())
    assert_exact(an, 4, approx=1)
    # 24, 24, 20 through the activations; 12 through both norms and the skip sum (approximate)
    assert sorted((g.channels, g.approximate) for g in prunable(an)) == [(12, True), (20, False), (24, False), (24, False)]


def test_an_unnamed_attention_node_is_named_when_loaded_and_prunes_exactly():
    """Virtual axes and rewrites are keyed by node name: loading gives a node without one a name of
    its own (``spa.io.proto.name_nodes``), so an unnamed Attention prunes as a named one does."""
    model = attention_block()
    next(n for n in model.graph.node if n.op_type == "Attention").name = ""
    an = spa.analyze(model)
    assert next(n for n in an.model.graph.node if n.op_type == "Attention").name
    assert_exact(an, 3)
    assert {g.channels for g in prunable(an)} == {4, 8, 6}


# ----------------------------------------------------------------------------------------------
# the optimizer's fusions of real exports



def optimized(name, tmp_path, mha=False):
    """The export fused by onnxruntime's optimizer; ``mha``: MultiHeadAttention (projections left
    as MatMuls) instead of Attention."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    kind = "bert" if name == "bert" else "gpt2"
    options = FusionOptions(kind)
    options.use_multi_head_attention = mha
    m = optimize_model(export(name), model_type=kind, num_heads=4, hidden_size=64, optimization_options=options)
    path = tmp_path / f"{name}_fused.onnx"
    m.save_model_to_file(str(path))
    return str(path)


def _feed(batch, seq, rng):
    return {"input_ids": rng.integers(0, 256, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64)}


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("attention", ["Attention", "MultiHeadAttention"])
def test_fused_bert_prunes_like_the_unfused_export(tmp_path, attention):
    path = optimized("bert", tmp_path, mha=attention == "MultiHeadAttention")
    ops = fused_ops(onnx.load(path))
    assert ops[attention] == 2 and ops["SkipLayerNormalization"] == 4 and ops["BiasGelu"] == 2 \
        and ops["EmbedLayerNormalization"] == 1, ops
    an, unfused = spa.analyze(path), spa.analyze(export("bert"))
    assert an.macs == unfused.macs  # the fused ops' MACs are the MatMuls they replace
    assert sorted(g.channels for g in prunable(an)) == sorted(g.channels for g in prunable(unfused))
    assert_exact(an, 8)  # per layer: heads, q/k head dim, v head dim, MLP
    # one head less: num_heads follows
    heads = next(g for g in prunable(an) if g.channels == 4)
    pruned = slicing.apply(an.model, an.channels, an.probe, heads.units[:1])
    assert sorted(attrs(n)["num_heads"] for n in pruned.graph.node if n.op_type == attention) == [3, 4]
    # spa.prune: as the unfused export, and it runs at other sizes with the original output shapes
    res = spa.prune(path, 0.3, criterion="l2")  # weight norms: the same scores as the unfused weights
    assert res.report["after"]["macs"] == spa.prune(export("bert"), 0.3, criterion="l2").report["after"]["macs"] < an.macs
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for b, s in ((1, 5), (3, 11)):
        assert sess.run(None, _feed(b, s, rng))[0].shape == (b, s, 64)
    assert any(attrs(n)["num_heads"] < 4 for n in res.model.graph.node if n.op_type == attention)


@pytest.mark.slow
@pytest.mark.torch
def test_fused_gpt2_prunes_like_the_unfused_export(tmp_path):
    path = optimized("gpt2_ts", tmp_path)
    ops = fused_ops(onnx.load(path))
    assert ops["SkipLayerNormalization"] == 4 and ops["FastGelu"] == 2, ops
    an = spa.analyze(path)
    assert len(prunable(an)) == len(prunable(spa.analyze(export("gpt2_ts")))) == 9
    assert_exact(an, 9, approx=1)  # the residual width runs through the (skip) layer norms
    res = spa.prune(path, 0.3)
    assert res.report["after"]["macs"] < res.report["before"]["macs"]
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for b, s in ((1, 5), (3, 11)):
        assert sess.run(None, {"input_ids": rng.integers(0, 256, (b, s)).astype(np.int64)})[0].shape == (b, s, 256)
