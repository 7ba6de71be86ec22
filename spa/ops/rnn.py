"""Recurrent operators (LSTM, GRU, RNN of the default domain, and onnxruntime's DynamicQuantizeLSTM):
the hidden size of a node is one group.

The three share one form.  With G gates (LSTM 4: iofc, GRU 3: zrh, RNN 1), D directions
(``bidirectional``: 2) and H hidden units:

* ``W [D, G*H, I]``, ``R [D, G*H, H]``: the gate axis is the row-major product ``gates x hidden``
  (each gate's H rows one after the other); ``B [D, 2*G*H]`` is ``2 x gates x hidden`` (Wb then
  Rb); LSTM's peepholes ``P [D, 3*H]`` are ``3 x hidden`` (iof);
* ``R``'s last axis and the last axis of ``Y``, ``Y_h``, ``Y_c`` and of constant initial states
  are the hidden units themselves;
* ``X``'s feature axis is ``W``'s last axis and is contracted, exactly like a MatMul's: a group
  upstream (an embedding's width, a projection's outputs) is pruned through the node's input;
* the direction axis (``W[0]``, ``Y``'s num_directions dim...) and the virtual gate, bias-half and
  peephole-gate factors are positions, not channels: fixed as spatial, they never shrink and form
  no group of their own;
* batch and sequence dims of ``X`` flow to those of ``Y``, ``Y_h``, ``Y_c`` and the initial states
  (``layout`` 0: ``X [S, N, I]``, ``Y [S, D, N, H]``, states ``[D, N, H]``; ``layout`` 1:
  ``X [N, S, I]``, ``Y [N, S, D, H]``, states ``[N, D, H]``); ``sequence_lens`` is untouched.

``hidden_size`` is one attribute for both directions and surgery slices a constant axis with one
index list, so both directions keep the same units: the hidden axis is one virtual axis per node
(each of ``W``/``R``/``B`` spans both directions' rows anyway).  Surgery slices ``W``, ``R``,
``B``, ``P`` and constant initial states along the tied axes; ``hidden_size`` is rewritten from
the kept count (the generic ``attr`` rewrite).

Initial states that are not constants (fed as graph inputs, or computed: the TorchScript exporter
makes zeros with ``ConstantOfShape`` of a shape built from ``Shape(X)``) are not tied to the
hidden units: the node reads every position of them (their hidden axis is fixed, so what makes
them keeps its width and a graph input keeps its dims) and surgery feeds the pruned node
``Gather(state, kept, axis=2)`` (``rnn_state``).  Tying them instead would block the hidden group
whenever the state's producer cannot shrink, which is the common case.

Why removing hidden unit j is exact.  Unit j's own state (h_j, and c_j for LSTM) is computed from
its own gate rows, biases and peepholes; it reaches the rest of the model in two ways: through
``Y``/``Y_h``/``Y_c`` (the consumers' own sinks cut it there) and through the recurrence, as
column j of ``R`` in every gate of every unit.  The rule declares that column a ``contract`` sink,
so the oracle's cut model zeroes ``R[:, :, j]``; then no other unit ever reads h_j and the kept
units compute exactly what the pruned node computes (from the kept units of the initial state).
GRU's candidate gate reads h_j through ``R_h (r * h)`` (``linear_before_reset=0``) or
``r * (R_h h + Rb_h)`` (``=1``): in both the only path from h_j to unit i is ``R_h[i, j]``, so
zeroing the column cuts it; the reset gate r_j only scales unit j's own term.  LSTM's
``input_forget`` couples the i and f gates of one unit; ``clip`` and ``activations`` act per
element: none mixes units.  A node the rule cannot read (``W`` or ``R`` computed, sizes or
direction that disagree with the attributes, unknown ranks, no node name) fixes every axis.

MACs: ``D * S * N * G * H * (I + H)`` (the input and the recurrent products at every step).
``mac_axes`` names ``X``'s feature axis and the hidden axis, so a plan's first-order estimate
scales the whole count by (kept inputs) x (kept hidden): exact for the ``W`` term, while the ``R``
term really scales with (kept hidden)^2 (the registry takes one product of kept fractions per
node).  The counts in a prune report come from the pruned model's shapes and are exact.
"""
from __future__ import annotations

from .common import attr

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _name(names, i):
    """Name ``i`` of a node's inputs or outputs, or None when the optional slot is empty."""
    return names[i] if len(names) > i and names[i] else None


def _dims(layout):
    """(X's seq, X's batch), (Y's seq, dir, batch), (state's dir, batch) for ``layout``."""
    if layout == 0:
        return (0, 1), (0, 1, 2), (0, 1)
    return (1, 0), (1, 2, 0), (1, 0)


def _sizes_agree(ctx, g, d, h, inputs):
    """Whether W, R, B, P have the sizes ``G``, ``D``, ``H`` and X's features imply."""
    x, w, r, b, p = inputs
    ix = ctx.size((x, 2))
    want = {w: (d, g * h, ix), r: (d, g * h, h), b: (d, 2 * g * h), p: (d, 3 * h)}
    return all(name is None or ctx.shape(name) is not None and tuple(ctx.shape(name)) == shape
               for name, shape in want.items())


def rule_recurrent(ctx):
    """W[1] = R[1] = gates x hidden, B[1] = 2 x gates x hidden, P[1] = 3 x hidden; R[2] and the
    states' last dims = hidden; X[2] = W[2] (contracted); R[2] is contracted by the recurrence."""
    node = ctx.node
    lstm = node.op_type == "LSTM"
    x, w, r = node.input[0], node.input[1], node.input[2]
    b, p = _name(node.input, 3), _name(node.input, 7) if lstm else None
    states = {i: _name(node.input, i) for i in ((5, 6) if lstm else (5,)) if _name(node.input, i)}
    y, outs = _name(node.output, 0), [o for o in (_name(node.output, 1), _name(node.output, 2)) if o]
    if not _readable(ctx, x, w, r, y, list(states.values()) + outs):
        return ctx.fix_all()
    g, d, h = GATES[node.op_type], ctx.size((w, 0)), ctx.size((r, 2))
    if not _sizes_agree(ctx, g, d, h, (x, w, r, b, p)):
        return ctx.fix_all()
    (x_seq, x_batch), (y_seq, y_dir, y_batch), (s_dir, s_batch) = _dims(int(attr(node, "layout", 0)))
    seq_batch_dir(ctx, x, (x_seq, x_batch), [(y, (y_seq, y_batch, y_dir))] if y else [],
                  [(s, (s_batch, s_dir)) for s in list(states.values()) + outs], [n for n in (w, r, b, p) if n])
    hidden = ctx.virtual("hidden", h)
    gates = _positions(ctx, "gates", g)
    ctx.tie((w, 1), (r, 1))
    ctx.product((w, 1), [gates, hidden])
    if b:
        ctx.product((b, 1), [_positions(ctx, "bias_halves", 2), gates, hidden])
    if p:
        ctx.product((p, 1), [_positions(ctx, "peephole_gates", 3), hidden])
    for axis in [(r, 2)] + [(o, 2) for o in outs] + ([(y, 3)] if y else []):
        ctx.tie(axis, hidden)
    for i, s in states.items():
        if ctx.is_const(s):
            ctx.tie((s, 2), hidden)
        else:  # computed or fed: read whole, the node gets its kept units (module docstring)
            ctx.fix((s, 2))
            ctx.rewrite("rnn_state", input=i, axis=hidden)
    ctx.tie((x, 2), (w, 2))
    ctx.sink((x, 2), "contract", 0)
    ctx.sink((r, 2), "contract", 2)
    ctx.rewrite("attr", attr="hidden_size", axis=hidden)


def _readable(ctx, x, w, r, y, states) -> bool:
    """Whether the rule can model this node: named (its virtual axes and rewrites are keyed by the
    node's name), a known layout and direction, ranks known, ``W`` and ``R`` constants (surgery
    slices constants only)."""
    node = ctx.node
    ranks = [(x, 3), (w, 3), (r, 3)] + [(s, 3) for s in states] + ([(y, 4)] if y else [])
    direction = attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    return bool(node.name) and int(attr(node, "layout", 0)) in (0, 1) \
        and direction in ("forward", "reverse", "bidirectional") \
        and all(ctx.rank(n) == k for n, k in ranks) and ctx.is_const(w) and ctx.is_const(r) \
        and ctx.size((w, 0)) == (2 if direction == "bidirectional" else 1) \
        and int(attr(node, "hidden_size", ctx.size((r, 2)))) == ctx.size((r, 2))


def _positions(ctx, tag, size):
    """A virtual axis of positions that never shrink (gates, bias halves): a factor, not a channel."""
    axis = ctx.virtual(tag, size)
    ctx.spatial(axis)
    return axis


def seq_batch_dir(ctx, x, x_dims, ys, states, params):
    """Sequence and batch dims flow from X to Y and the states (positions: they touch no weight,
    so they form no group); the direction dim of the parameters, Y and the states is one axis of
    positions that never shrinks."""
    x_seq, x_batch = x_dims
    direction = (params[0], 0)
    for name in params[1:]:
        ctx.tie((name, 0), direction)
    ctx.spatial(direction)
    for y, (seq, batch, dim) in ys:
        ctx.tie((x, x_seq), (y, seq))
        ctx.tie((x, x_batch), (y, batch))
        ctx.tie((y, dim), direction)
    for s, (batch, dim) in states:
        ctx.tie((x, x_batch), (s, batch))
        ctx.tie((s, dim), direction)


def macs_recurrent(node, shapes) -> int:
    """``D * S * N * G*H * (I + H)``: the input and recurrent products of every step."""
    x, w, r = shapes[node.input[0]], shapes[node.input[1]], shapes[node.input[2]]
    layout = int(attr(node, "layout", 0))
    seq, batch = (x[0], x[1]) if layout == 0 else (x[1], x[0])
    d, gh, i = (int(v) for v in w)
    return d * int(seq) * int(batch) * gh * (i + int(r[2]))


def mac_axes_recurrent(node, shapes):
    """X's feature axis and R's hidden-input axis (the hidden units): see the module docstring."""
    return [(node.input[0], 2), (node.input[2], 2)]


def rw_state(node, info, kept, new_size, probe, new):
    """Feed the node the kept hidden units of a computed initial state: ``Gather(state, kept,
    axis=2)`` (its hidden axis is the last in both layouts); the state's producer is untouched."""
    import onnx_graphsurgeon as gs
    k = kept(info["axis"])
    if k is None:
        return
    state = node.inputs[info["input"]]
    out = gs.Variable(new.name(f"{node.name}__spa_state{info['input']}"), dtype=probe.dtypes.get(state.name))
    new.graph.nodes.append(gs.Node("Gather", new.name(f"{node.name}__spa_state{info['input']}_Gather"), {"axis": 2},
                                   [state, new.const(node, f"state{info['input']}", k)], [out]))
    node.inputs[info["input"]] = out


def rule_dynamic_quantize_lstm(ctx):
    """com.microsoft DynamicQuantizeLSTM (``quantize_dynamic``'s LSTM): int8 ``W [D, I, 4*H]`` and
    ``R [D, H, 4*H]`` (transposed with respect to LSTM's), per-direction or per-row scales and zero
    points, layout 0.  The hidden units are one group as for LSTM; X and the hidden state are
    quantized inside the op with ranges taken at run time, so cutting their channels is approximate
    (the ranges can change): both contractions are ``approx`` sinks."""
    node = ctx.node
    x, w, r = node.input[0], node.input[1], node.input[2]
    b, p = _name(node.input, 3), _name(node.input, 7)
    states = {i: _name(node.input, i) for i in (5, 6) if _name(node.input, i)}
    y, outs = _name(node.output, 0), [o for o in (_name(node.output, 1), _name(node.output, 2)) if o]
    ranks = [(x, 3), (w, 3), (r, 3)] + [(s, 3) for s in list(states.values()) + outs] + ([(y, 4)] if y else [])
    if not node.name or int(attr(node, "layout", 0)) != 0 or any(ctx.rank(n) != k for n, k in ranks) \
            or not (ctx.is_const(w) and ctx.is_const(r)):
        return ctx.fix_all()
    h = ctx.size((r, 1))
    if ctx.size((w, 2)) != 4 * h or ctx.size((r, 2)) != 4 * h or ctx.size((w, 1)) != ctx.size((x, 2)):
        return ctx.fix_all()
    seq_batch_dir(ctx, x, (0, 1), [(y, (0, 2, 1))] if y else [],
                  [(s, (1, 0)) for s in list(states.values()) + outs], [n for n in (w, r, b, p) if n])
    hidden = ctx.virtual("hidden", h)
    gates = _positions(ctx, "gates", 4)
    ctx.tie((w, 2), (r, 2))
    ctx.product((w, 2), [gates, hidden])
    if b:
        ctx.product((b, 1), [_positions(ctx, "bias_halves", 2), gates, hidden])
    if p:
        ctx.product((p, 1), [_positions(ctx, "peephole_gates", 3), hidden])
    for axis in [(r, 1)] + [(o, 2) for o in outs] + ([(y, 3)] if y else []):
        ctx.tie(axis, hidden)
    for i, st in states.items():
        if ctx.is_const(st):
            ctx.tie((st, 2), hidden)
        else:
            ctx.fix((st, 2))
            ctx.rewrite("rnn_state", input=i, axis=hidden)
    for i, target in ((8, w), (9, w), (10, r), (11, r)):   # scales and zero points
        q = _name(node.input, i)
        if not q:
            continue
        ctx.stat(i)
        ctx.tie((q, 0), (target, 0))
        if ctx.rank(q) == 2:
            ctx.tie((q, 1), (target, 2))
    ctx.tie((x, 2), (w, 1))
    ctx.sink((x, 2), "approx", 0)
    ctx.sink((r, 1), "approx", 2)
    ctx.rewrite("attr", attr="hidden_size", axis=hidden)


def macs_dynamic_quantize_lstm(node, shapes) -> int:
    x, w, r = shapes[node.input[0]], shapes[node.input[1]], shapes[node.input[2]]
    return int(w[0]) * int(x[0]) * int(x[1]) * int(w[2]) * (int(w[1]) + int(r[1]))


def mac_axes_dynamic_quantize_lstm(node, shapes):
    return [(node.input[0], 2), (node.input[2], 1)]


RULES: dict = {**{op: rule_recurrent for op in GATES}, "com.microsoft:DynamicQuantizeLSTM": rule_dynamic_quantize_lstm}
MACS: dict = {**{op: (macs_recurrent, mac_axes_recurrent) for op in GATES},
              "com.microsoft:DynamicQuantizeLSTM": (macs_dynamic_quantize_lstm, mac_axes_dynamic_quantize_lstm)}
REWRITES: dict = {"rnn_state": rw_state}
