"""Operators that onnxruntime's transformer optimizer fuses (domain ``com.microsoft``): attention,
rotary embeddings, skip/simplified layer norms, the embedding layer norm and biased activations.

Every rule models the fused op as the unfused subgraph it replaces, in the channel model's terms
(``spa.graph.channels``): the same heads, head dims and MLP widths as the MatMul/Reshape/Softmax
form, exact for the same reasons, with the op's attributes rewritten from the kept counts.

Attention (packed QKV projection).  ``input [B, S, Hin] x weights [Hin, Wq+Wk+Wv] (+ bias)``, then
per head ``softmax(q kT * scale) v``; output ``[B, S, Wv]``.  ``Hin`` is the input's last axis and
the weight's first, contracted as a MatMul's (a ``contract`` sink on the input).  The weight's
second axis (and the bias) is the concatenation of three sections (``qkv_hidden_sizes``, or three
equal thirds), each a row-major product of virtual axes: ``q = heads x d``, ``k = heads x d``,
``v = heads x dv`` (q and k share their head dim because ``q kT`` contracts it), and the output's
last axis is ``heads x dv``.  So a head unit removes one head everywhere, a ``d`` unit one q/k
position in every head, a ``dv`` unit one value position in every head.  Why exact: the oracle's
cut model zeroes the removed columns of the weight and the bias (``sum`` sinks, inputs 1 and 2):
a zeroed q/k position adds nothing to any score; a zeroed head has all-zero scores and values, so
its (removed) output columns are zero; the output's consumer cuts them anyway.  The pruned op must
compute the same scores: it scales by ``1/sqrt(head_size)`` of its *new* head size unless the
``scale`` attribute is set, so surgery writes the original scale there (``rw_attention``) with
``num_heads`` and ``qkv_hidden_sizes`` (written whenever a section shrinks).  ``past``/``present``
``[2, B, heads, T, d]`` need equal q/k/v head dims: then ``dv`` is ``d`` and the caches' axes are
tied (graph inputs stay blocked unless ``prune_io``); ``attention_bias [B|1, heads|1, S, T]`` is
tied on its head axis; a mask has no channel axis.  ``do_rotary`` fixes ``d`` (its rotary pairs
are internal), heads stay free; a shared past/present buffer blocks the node.

MultiHeadAttention.  The projections are outside: ``query [B, S, heads*d]``, ``key [B, T, heads*d]``
or ``[B, heads, T, d]``, ``value [B, T, heads*dv]`` or ``[B, heads, T, d]`` (onnxruntime wants BNSH
key and value of one shape, and caches of one head size: ``dv`` is then ``d``).  The same
``heads``, ``d``, ``dv`` products, an optional bias of three sections as Attention's (blocked with
BNSH key/value, where it is not added to them), caches ``[B, heads, P, d|dv]``, ``qk [B, heads, S,
T]`` and ``attention_bias`` tied on their head axis.  The cut model zeroes the removed channels of
query, key and value (``contract`` sinks: ``q kT`` contracts ``d``, and with value cut too a removed
head's output is zero) and of the bias (``sum`` sink: it is added inside the op).  ``num_heads``
and the original ``scale`` are rewritten as for Attention.  The packed forms (``[B, S, heads, 3,
d]``, ``[B, T, heads, 2, d]``) have no CPU kernel, so spa cannot probe them: they block, as a beam
search's ``cache_indirection`` does.

GroupQueryAttention.  ``query [B, S, heads*d]`` (or packed ``[B, S, (heads + 2 kv)*d]`` without
key/value: three sections), ``key``/``value [B, T, kv*d]``, caches ``[B, kv, P, d]``, one head dim
for q, k and v.  Query head ``h`` reads KV head ``h // group``, so the query and output axes are
``kv x group x d`` and the KV axes ``kv x d``, as spa models the unfused ``repeat_kv`` Expand: a
``kv`` unit removes a KV head with its whole group of query heads, a ``group`` unit one query head
in every group (``num_heads`` stays a multiple of ``kv_num_heads``).  The head dim is fixed:
onnxruntime's kernel wants ``head_size % 8 == 0`` (``% 16`` with ``do_rotary``), which a pruned
head dim would seldom keep.  Exact as MultiHeadAttention: the cut model zeroes the removed channels
of query, key and value, a removed KV head's values with them; a removed query head's output
columns are cut by the output's consumer.  ``attention_bias``, ``head_sink`` and ``output_qk``
are tied on their query-head axis; quantized KV caches (``k_scale``, ``v_scale``,
``kv_cache_bit_width``) and window-sized caches block the node.  Surgery rewrites ``num_heads``
(the kept ``kv x group``) and ``kv_num_heads``.

RotaryEmbedding.  Rotates pairs of head-dim positions by the angle of the token's position: with
``half`` = the caches' last dim (``rotary_embedding_dim / 2``), pair ``(i, i + half)``
(``interleaved=0``) or ``(2i, 2i + 1)`` (``interleaved=1``) uses cache column i.  The rule ties both
positions of a pair to column i of ``cos_cache`` and ``sin_cache`` (``tie_map``), exactly what the
unfused form's rotate_half Slice/Neg/Concat and the ``cat(freqs, freqs)`` cos/sin give: a head-dim
unit is a pair, whose rotation reads only itself and its column, so removing it removes both
positions and the column (surgery slices the constant caches).  Positions past the rotary dim pass
through untouched and are free units of their own.  Input ``[B, heads, S, d]`` gives heads and
``d`` directly; ``[B, S, hidden]`` is ``heads x d`` (``num_heads``, or ``d = 2 * half``).  Caches
are shared by every layer's q and k, so the pairs are shared as they are in the unfused export.
Surgery rewrites ``num_heads`` and ``rotary_embedding_dim`` when they are set.  Nothing is
consumed here (no sink): q kT downstream contracts the pairs.

SkipLayerNormalization / SkipSimplifiedLayerNormalization.  ``LayerNorm(input + skip + bias)``
(RMSNorm for the simplified one): input, skip, gamma, beta, bias and both the output and the
optional sum output (``input_skip_bias_sum``, the residual stream) share the hidden axis; the
normalisation is an ``approx`` sink there, as LayerNormalization's.  The saved mean/inv_std
outputs are fixed.  SimplifiedLayerNormalization (RMSNorm; the default domain in ORT's exports,
registered under both keys) is LayerNormalization without beta.

EmbedLayerNormalization.  ``LayerNorm(word[ids] + position[pos] + segment[seg])``: the three
tables' hidden axis, gamma, beta, the output and ``embedding_sum`` share the hidden axis (an
``approx`` sink); the tables' row axes are vocabularies, fixed; ``mask_index`` has no channels.

BiasGelu, FastGelu (with or without bias), BiasAdd (``x + bias + skip``), Gelu, QuickGelu: per
element on the last axis after adding a bias vector, so every operand is tied by broadcasting, as
Add followed by an activation.

MACs: Attention ``B*S*Hin*(Wq+Wk+Wv)`` for the projection plus ``B*S*T*(Wq+Wv)`` for ``q kT`` and
``probs v`` (``B*heads*S*T*(d+dv)``; ``T`` = past + kv sequence); MultiHeadAttention and
GroupQueryAttention the attention products only.  They are attributed to (Attention) the input's
hidden axis and the weight's QKV axis, (MultiHeadAttention) the query's hidden axis, (GQA) the
output's hidden axis: first order, as the recurrent ops'; the counts in a prune report come from the
pruned model's shapes and are exact.

Virtual axes and rewrites are keyed by the node's name: a node without one (which loading names,
``spa.io.proto.name_nodes``) blocks.  Whatever a rule cannot read (unknown ranks, sizes that disagree with the attributes,
optional inputs it does not model) fixes every axis of the node: blocking is always safe.
"""
from __future__ import annotations

import numpy as np

from .common import attr, broadcast, identity_dims, norm


def _name(names, i):
    """Name ``i`` of a node's inputs or outputs, or None when the optional slot is empty."""
    return names[i] if len(names) > i and names[i] else None


def _sections(ctx, whole, sizes, tags):
    """Virtual axes for consecutive sections of ``whole`` (a packed QKV axis), each tied to its
    positions of ``whole``."""
    axes, offset = [], 0
    for n, tag in zip(sizes, tags):
        v = ctx.virtual(tag, n)
        ctx.tie_map(whole, v, np.arange(n), out_offset=offset)
        axes.append(v)
        offset += n
    return axes


def _tie_if(ctx, axis, target, size):
    """Tie ``axis`` to ``target`` where it has ``size`` positions; a broadcast axis of size 1 is
    left alone; anything else cannot be read: False."""
    n = ctx.size(axis)
    if n == size and size != 1:
        ctx.tie(axis, target)
        return True
    return n == 1 or n == size


def _rotary_pairs(ctx, head_axis, caches, interleaved):
    """Tie each rotary pair of ``head_axis`` to its column of the cos/sin ``caches``: (i, i + half)
    or (2i, 2i + 1) read column i.  False when the caches do not fit the head dim."""
    half = ctx.size((caches[0], ctx.rank(caches[0]) - 1))
    if half is None or 2 * half > ctx.size(head_axis) or any(ctx.shape(c) != ctx.shape(caches[0]) for c in caches):
        return False
    col = np.repeat(np.arange(half), 2) if interleaved else np.tile(np.arange(half), 2)
    for c in caches:
        ctx.tie_map(head_axis, (c, ctx.rank(c) - 1), col)
    return True


def _tie_seq(ctx, x, y):
    """Batch and sequence dims of a [B, S, ...] input and output."""
    ctx.tie((x, 0), (y, 0))
    ctx.tie((x, 1), (y, 1))


# ---------------------------------------------------------------------------------------------
# attention


def rule_attention(ctx):
    """Attention: Hin = X[2] = W[0] (contracted); W[1] = B[0] = q|k|v sections, q = k = heads x d,
    v = Y[2] = heads x dv; caches tied to heads and d (then dv = d)."""
    node = ctx.node
    x, w, b, y = node.input[0], node.input[1], _name(node.input, 2), node.output[0]
    past, bias4, present = _name(node.input, 4), _name(node.input, 5), _name(node.output, 1)
    xs, ws, n = ctx.shape(x), ctx.shape(w), int(attr(node, "num_heads", 0))
    if (not node.name or xs is None or ws is None or len(xs) != 3 or len(ws) != 2 or n <= 0
            or attr(node, "past_present_share_buffer", 0) or _name(node.input, 6) or ctx.rank(y) != 3):
        return ctx.fix_all()
    sizes = list(attr(node, "qkv_hidden_sizes", None) or [ws[1] // 3] * 3)
    caches = [c for c in (past, present) if c]
    if (len(sizes) != 3 or sum(sizes) != ws[1] or sizes[0] != sizes[1] or any(s % n for s in sizes)
            or (caches and sizes[2] != sizes[0]) or any(ctx.rank(c) != 5 for c in caches)):
        return ctx.fix_all()
    heads, d = ctx.virtual("heads", n), ctx.virtual("head", sizes[0] // n)
    dv = d if caches else ctx.virtual("v_head", sizes[2] // n)
    q, k, v = _sections(ctx, (w, 1), sizes, ("q", "k", "v"))
    for part, hd in ((q, d), (k, d), (v, dv), ((y, 2), dv)):
        ctx.product(part, [heads, hd])
    for c in caches:
        ctx.tie((c, 2), heads)
        ctx.tie((c, 4), d)
    if bias4 and (ctx.rank(bias4) != 4 or not _tie_if(ctx, (bias4, 1), heads, n)):
        return ctx.fix_all()
    if attr(node, "do_rotary", 0):
        ctx.fix(d)  # rotated inside the op: its pairs are not ours to keep
    ctx.tie((x, 2), (w, 0))
    _tie_seq(ctx, x, y)
    if b:
        ctx.tie((b, 0), (w, 1))
        ctx.sink((b, 0), "sum", 2)
    ctx.sink((x, 2), "contract", 0)
    ctx.sink((w, 1), "sum", 1)
    ctx.rewrite("fused_attention", counts={"num_heads": heads}, head=d, head_size=sizes[0] // n,
                sections=[q, k, v], section_sizes=sizes)


def _mha_side(ctx, name, heads, hd):
    """Key or value of MultiHeadAttention: ``[B, T, heads*hd]`` or ``[B, heads, T, hd]``; the
    axes the cut model zeroes, or None when the form is unknown."""
    r = ctx.rank(name)
    if r == 3:
        if ctx.size((name, 2)) != ctx.size(heads) * ctx.size(hd):
            return None
        ctx.product((name, 2), [heads, hd])
        return [2]
    if r == 4 and ctx.size((name, 1)) == ctx.size(heads) and ctx.size((name, 3)) == ctx.size(hd):
        ctx.tie((name, 1), heads)
        ctx.tie((name, 3), hd)
        return [1, 3]
    return None


def rule_multihead_attention(ctx):
    """MultiHeadAttention: query = heads x d, key = heads x d, value = heads x dv (3-D, or BNSH
    key/value with dv = d), output = heads x dv; bias = q|k|v sections; caches, qk tied on heads."""
    node = ctx.node
    q, k, v, b = (_name(node.input, i) for i in range(4))
    bias4, pk, pv = _name(node.input, 5), _name(node.input, 6), _name(node.input, 7)
    y, prk, prv, qk = (_name(node.output, i) for i in range(4))
    n = int(attr(node, "num_heads", 0))
    if (not node.name or n <= 0 or ctx.rank(y) != 3 or _name(node.input, 9) or ctx.rank(q) != 3 or not k or not v
            or ctx.size((q, 2)) % n or ctx.rank(k) != ctx.rank(v) or ctx.rank(k) not in (3, 4)):
        return ctx.fix_all()  # packed QKV/KV forms (no CPU kernel: spa cannot probe them), beam caches
    heads, d = ctx.virtual("heads", n), ctx.virtual("head", ctx.size((q, 2)) // n)
    # BNSH key and value must keep one shape, and caches one head size: then dv is d
    dv = ctx.virtual("v_head", ctx.size((v, 2)) // n) if ctx.rank(v) == 3 and not (pk or pv or prk or prv) else d
    ctx.product((q, 2), [heads, d])
    cut = {0: [2], 1: _mha_side(ctx, k, heads, d), 2: _mha_side(ctx, v, heads, dv)}
    if cut[1] is None or cut[2] is None or (b and ctx.rank(k) != 3):
        return ctx.fix_all()
    hd_sizes = [ctx.size(d), ctx.size(d), ctx.size(dv)]
    if b:
        sizes = [n * s for s in hd_sizes]
        if tuple(ctx.shape(b) or ()) != (sum(sizes),):
            return ctx.fix_all()
        for part, hd in zip(_sections(ctx, (b, 0), sizes, ("bq", "bk", "bv")), (d, d, dv)):
            ctx.product(part, [heads, hd])
    for cache, hd in ((pk, d), (prk, d), (pv, dv), (prv, dv)):
        if cache and _mha_side(ctx, cache, heads, hd) != [1, 3]:
            return ctx.fix_all()
    for t in (bias4, qk):
        if t and (ctx.rank(t) != 4 or not _tie_if(ctx, (t, 1), heads, n)):
            return ctx.fix_all()
    ctx.product((y, 2), [heads, dv])
    _tie_seq(ctx, q, y)
    for i, dims in cut.items():
        for dim in dims:
            ctx.sink((node.input[i], dim), "contract", i)
    if b:
        ctx.sink((b, 0), "sum", 3)
    ctx.rewrite("fused_attention", counts={"num_heads": heads}, head=d, head_size=hd_sizes[0])


def rule_group_query_attention(ctx):
    """GroupQueryAttention: query = kv x group x d (packed: q|k|v sections), key = value =
    kv x d, output = kv x group x d, caches [B, kv, P, d]; d is fixed."""
    node = ctx.node
    q, k, v, pk, pv = (_name(node.input, i) for i in range(5))
    cos, sin, bias4, sink_ = (_name(node.input, i) for i in (7, 8, 10, 11))
    qn, kn = _name(node.input, 14), _name(node.input, 15)
    y, prk, prv, qk = (_name(node.output, i) for i in range(4))
    n, kv = int(attr(node, "num_heads", 0)), int(attr(node, "kv_num_heads", 0))
    quantized = _name(node.input, 12) or _name(node.input, 13) or attr(node, "kv_cache_bit_width", 0)
    if (not node.name or n <= 0 or kv <= 0 or n % kv or quantized or attr(node, "sliding_window_cache", 0)
            or ctx.rank(q) != 3 or ctx.rank(y) != 3 or bool(k) != bool(v) or bool(qn) != bool(kn)):
        return ctx.fix_all()
    width = n + (0 if k else 2 * kv)
    if ctx.size((q, 2)) % width:
        return ctx.fix_all()
    hd = ctx.size((q, 2)) // width
    kvh, group, d = ctx.virtual("kv_heads", kv), ctx.virtual("group", n // kv), ctx.virtual("head", hd)
    heads = ctx.virtual("heads", n)
    ctx.product(heads, [kvh, group])
    if k:
        if any(ctx.rank(t) != 3 or ctx.size((t, 2)) != kv * hd for t in (k, v)):
            return ctx.fix_all()
        qs, ks, vs = (q, 2), (k, 2), (v, 2)
    else:
        qs, ks, vs = _sections(ctx, (q, 2), [n * hd, kv * hd, kv * hd], ("q", "k", "v"))
    ctx.product(qs, [kvh, group, d])
    ctx.product(ks, [kvh, d])
    ctx.product(vs, [kvh, d])
    ctx.product((y, 2), [kvh, group, d])
    for cache in (pk, pv, prk, prv):
        if cache and _mha_side(ctx, cache, kvh, d) != [1, 3]:
            return ctx.fix_all()
    for t in (bias4, qk):
        if t and (ctx.rank(t) != 4 or not _tie_if(ctx, (t, 1), heads, n)):
            return ctx.fix_all()
    if sink_ and not _tie_if(ctx, (sink_, 0), heads, n):
        return ctx.fix_all()
    if attr(node, "do_rotary", 0) and not (cos and sin):
        return ctx.fix_all()
    ctx.fix(d)  # onnxruntime's kernel wants head_size % 8 == 0 (% 16 with do_rotary)
    for norm_w in (qn, kn):  # a per-head RMS norm over d (Qwen3)
        if norm_w:
            ctx.tie((norm_w, 0), d)
    _tie_seq(ctx, q, y)
    for i, t in enumerate((q, k, v)):
        if t:
            ctx.sink((t, 2), "contract", i)
    ctx.rewrite("fused_attention", counts={"num_heads": heads, "kv_num_heads": kvh}, head=d, head_size=hd)


def rw_attention(node, info, kept, new_size, probe, new):
    """Head counts from the kept heads; ``qkv_hidden_sizes`` from the kept section sizes (written
    when it was set or the sections no longer have one size); the original ``scale`` when the q/k
    head dim shrinks and the op would otherwise take ``1/sqrt`` of the new one."""
    for name, axis in info["counts"].items():
        k = kept(axis)
        if k is not None:
            node.attrs[name] = int(len(k))
    if "sections" in info:
        sizes = [n if kept(a) is None else len(kept(a)) for a, n in zip(info["sections"], info["section_sizes"])]
        if sizes != list(info["section_sizes"]) and ("qkv_hidden_sizes" in node.attrs or len(set(sizes)) > 1):
            node.attrs["qkv_hidden_sizes"] = [int(s) for s in sizes]
    if kept(info["head"]) is not None and not node.attrs.get("scale"):
        node.attrs["scale"] = float(np.float32(1.0 / np.sqrt(info["head_size"])))


# ---------------------------------------------------------------------------------------------
# rotary embedding


def rule_rotary(ctx):
    """RotaryEmbedding: X [B, heads, S, d] or [B, S, heads x d] = Y; rotary pairs of d tied to the
    cos/sin cache columns; positions past the rotary dim are free."""
    node = ctx.node
    x, cos, sin, y = node.input[0], _name(node.input, 2), _name(node.input, 3), node.output[0]
    r, n = ctx.rank(x), int(attr(node, "num_heads", 0))
    if (not node.name or not cos or not sin or ctx.rank(cos) is None or attr(node, "is_packed_batching", 0)
            or r not in (3, 4)):
        return ctx.fix_all()
    half = ctx.size((cos, ctx.rank(cos) - 1))
    identity_dims(ctx, x, y)
    if r == 4:
        heads, head_axis = (x, 1), (x, 3)
    else:
        hd = ctx.size((x, 2)) // n if n else 2 * half
        if hd <= 0 or ctx.size((x, 2)) % hd:
            return ctx.fix_all()
        heads, head_axis = ctx.virtual("heads", ctx.size((x, 2)) // hd), ctx.virtual("head", hd)
        ctx.product((x, 2), [heads, head_axis])
    rd = int(attr(node, "rotary_embedding_dim", 0)) or ctx.size(head_axis)
    if rd != 2 * half or not _rotary_pairs(ctx, head_axis, [cos, sin], attr(node, "interleaved", 0)):
        return ctx.fix_all()
    ctx.rewrite("rotary", heads=heads, cache=(cos, ctx.rank(cos) - 1))


def rw_rotary(node, info, kept, new_size, probe, new):
    """``num_heads`` and ``rotary_embedding_dim`` (two positions per kept cache column), where set."""
    k = kept(info["heads"])
    if k is not None and node.attrs.get("num_heads"):
        node.attrs["num_heads"] = int(len(k))
    k = kept(info["cache"])
    if k is not None and node.attrs.get("rotary_embedding_dim"):
        node.attrs["rotary_embedding_dim"] = 2 * int(len(k))


# ---------------------------------------------------------------------------------------------
# normalisation and biased activations


def _norm_outputs(ctx, x, y, extras, sums=()):
    """The normalised output and the un-normalised sums share every dim with x; saved statistics
    are fixed; the last axis is an approximate sink."""
    identity_dims(ctx, x, y)
    for s in sums:
        if s:
            identity_dims(ctx, y, s)
    for e in extras:
        if e:
            ctx.fix_tensor(e)
    ctx.sink((x, ctx.rank(x) - 1), "approx", 0)


def rule_skip_layernorm(ctx):
    """SkipLayerNormalization / SkipSimplifiedLayerNormalization: input, skip, gamma, beta, bias,
    the output and the input+skip+bias sum share the hidden axis (approximate)."""
    node = ctx.node
    x, y = node.input[0], node.output[0]
    if ctx.rank(x) is None or ctx.rank(x) != ctx.rank(y):
        return ctx.fix_all()
    broadcast(ctx, list(node.input[1:]), y)
    _norm_outputs(ctx, x, y, [_name(node.output, 1), _name(node.output, 2)], [_name(node.output, 3)])


def rule_simplified_layernorm(ctx):
    """SimplifiedLayerNormalization (RMSNorm over dims ``axis``..): LayerNormalization's form."""
    node = ctx.node
    x, y = node.input[0], node.output[0]
    r = ctx.rank(x)
    if r is None:
        return ctx.fix_all()
    identity_dims(ctx, x, y)
    broadcast(ctx, list(node.input[1:2]), y)
    for d in range(norm(int(attr(node, "axis", -1)), r), r):
        ctx.sink((x, d), "approx", 0)
    for extra in node.output[1:]:
        if extra:
            ctx.fix_tensor(extra)


def rule_embed_layernorm(ctx):
    """EmbedLayerNormalization: word/position/segment tables' hidden axis = gamma = beta = output
    hidden = embedding_sum hidden (approximate); the tables' rows are fixed."""
    node = ctx.node
    ids, y = node.input[0], node.output[0]
    tables = [t for t in (_name(node.input, 2), _name(node.input, 3), _name(node.input, 4)) if t]
    if ctx.rank(ids) != 2 or ctx.rank(y) != 3 or any(ctx.rank(t) != 2 for t in tables):
        return ctx.fix_all()
    for t in tables:
        ctx.fix((t, 0))
        ctx.tie((t, 1), (y, 2))
    for i in (5, 6):
        if _name(node.input, i):
            ctx.tie((node.input[i], 0), (y, 2))
    _tie_seq(ctx, ids, y)
    s = _name(node.output, 2)
    if s:
        identity_dims(ctx, y, s)
    ctx.sink((tables[0], 1), "approx", 2)


def rule_bias_activation(ctx):
    """BiasGelu, FastGelu, BiasAdd, Gelu, QuickGelu: elementwise after adding broadcast operands."""
    broadcast(ctx, list(ctx.node.input), ctx.node.output[0])


# ---------------------------------------------------------------------------------------------
# MACs


def _total_length(node, shapes, kv_seq):
    """Keys each query attends to: the present cache's length, else past + new keys."""
    present = _name(node.output, 1)
    if present and present in shapes:
        return int(shapes[present][-2])
    return int(kv_seq)


def macs_attention(node, shapes):
    """The projection ``B*S*Hin*(Wq+Wk+Wv)`` plus q kT and probs v, ``B*S*T*(Wq+Wv)``."""
    x, w = shapes[node.input[0]], shapes[node.input[1]]
    sizes = list(attr(node, "qkv_hidden_sizes", None) or [w[1] // 3] * 3)
    b, s = int(x[0]), int(x[1])
    past = _name(node.input, 4)
    t = _total_length(node, shapes, s + (int(shapes[past][3]) if past and past in shapes else 0))
    return b * s * int(x[2]) * int(w[1]) + b * s * t * (sizes[0] + sizes[2])


def macs_multihead(node, shapes):
    """q kT and probs v: ``B*S*T*(heads*d + heads*dv)``, T = past + key sequence."""
    q, y = shapes[node.input[0]], shapes[node.output[0]]
    k, past = _name(node.input, 1), _name(node.input, 6)
    kv_seq = int(q[1]) if not k else int(shapes[k][2] if len(shapes[k]) == 4 else shapes[k][1])
    if past and past in shapes:
        kv_seq += int(shapes[past][2])
    wq = int(np.prod(q[2:])) // (3 if len(q) == 5 else 1)
    return int(q[0]) * int(q[1]) * _total_length(node, shapes, kv_seq) * (wq + int(y[2]))


def macs_gqa(node, shapes):
    """q kT and probs v: ``2*B*S*T*heads*d`` (the output's width is ``heads*d``)."""
    q, y = shapes[node.input[0]], shapes[node.output[0]]
    k, past = _name(node.input, 1), _name(node.input, 3)
    kv_seq = int(shapes[k][1] if k else q[1]) + (int(shapes[past][2]) if past and past in shapes else 0)
    return 2 * int(q[0]) * int(q[1]) * _total_length(node, shapes, kv_seq) * int(y[2])


def _axes_attention(node, shapes):
    return [(node.input[0], 2), (node.input[1], 1)]


def _axes_multihead(node, shapes):
    return [(node.input[0], 2)] if len(shapes.get(node.input[0], ())) == 3 else [(node.output[0], 2)]


def _axes_gqa(node, shapes):
    return [(node.output[0], 2)]


MS = "com.microsoft:"
RULES = {
    MS + "Attention": rule_attention,
    MS + "MultiHeadAttention": rule_multihead_attention,
    MS + "GroupQueryAttention": rule_group_query_attention,
    MS + "RotaryEmbedding": rule_rotary,
    MS + "SkipLayerNormalization": rule_skip_layernorm,
    MS + "SkipSimplifiedLayerNormalization": rule_skip_layernorm,
    MS + "SimplifiedLayerNormalization": rule_simplified_layernorm,
    "SimplifiedLayerNormalization": rule_simplified_layernorm,
    MS + "EmbedLayerNormalization": rule_embed_layernorm,
    **{MS + op: rule_bias_activation for op in ("BiasGelu", "FastGelu", "BiasAdd", "Gelu", "QuickGelu")},
}
MACS = {
    MS + "Attention": (macs_attention, _axes_attention),
    MS + "MultiHeadAttention": (macs_multihead, _axes_multihead),
    MS + "GroupQueryAttention": (macs_gqa, _axes_gqa),
}
REWRITES = {"fused_attention": rw_attention, "rotary": rw_rotary}
