"""Recurrent operators (LSTM, GRU, RNN): the hidden size is one prunable group per node, exact.

Hand-built graphs put a MatMul before the recurrent node (its output features are contracted by
``W``: an upstream group pruned through the node's input) and MatMuls after it (consuming ``Y``
and ``Y_h``).  Every prunable group is checked by the exactness oracle alone and all together, and
``spa.prune`` must give a model that runs with the same output shapes, fewer MACs and a rewritten
``hidden_size``.  onnxruntime refuses ``layout=1``, so that form is analysed from onnx's shape
inference and run with onnx's reference evaluator.  The torch taggers (TorchScript exporter,
dynamic batch and sequence) are compared with the cut original at two input sizes.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import spa
from graphs import G
from spa.surgery import slicing
from spa.runtime import probing
from spa.planning.counting import node_macs
from spa.verify.oracle import check_groups, check_joint, compare_outputs, cut_model

EXACT = 1e-5
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


# ----------------------------------------------------------------------------------------------
# hand-built graphs


def model_of(g, inputs, outputs, opset=17):
    """A model from G's nodes, its outputs typed by onnx's shape inference (no onnxruntime run:
    it refuses ``layout=1``)."""
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    typed = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(m, strict_mode=True).graph.output}
    for out in m.graph.output:
        out.CopyFrom(typed[out.name])
    onnx.checker.check_model(m)
    return m


def recurrent(op="LSTM", direction="forward", layout=0, states="const", lbr=0, peepholes=False,
              yh_output=False, seq=5, batch=2, feat=6, hidden=8, seed=0):
    """x [N, S, 4] -> MatMul (4 -> feat) -> op (hidden) -> Y: [N, S, D*H] -> MatMul -> out;
    Y_h -> MatMul -> out_h (or Y_h itself a graph output).  ``states``: initial states as
    constants ('const'), graph inputs ('input'), computed from x ('computed') or absent (None)."""
    g = G(seed)
    d, gates = 2 if direction == "bidirectional" else 1, GATES[op]
    inputs = [("x", [batch, seq, 4])]
    x = g.op("MatMul", ["x", g.w(4, feat)])
    if layout == 0:
        x = g.op("Transpose", [x], perm=[1, 0, 2])
    state_shape = [d, batch, hidden] if layout == 0 else [batch, d, hidden]
    n_states = 2 if op == "LSTM" else 1
    if states == "const":
        init = [g.w(*state_shape) for _ in range(n_states)]
    elif states == "input":
        init = ["h0", "c0"][:n_states]
        inputs += [(n, state_shape) for n in init]
    elif states == "computed":  # a projection of x's mean over time, reshaped to a state
        mean = g.op("ReduceMean", ["x"], axes=[1], keepdims=0)
        init = []
        for _ in range(n_states):
            s = g.op("Reshape", [g.op("MatMul", [mean, g.w(4, d * hidden)]), g.i64([batch, d, hidden])])
            init.append(g.op("Transpose", [s], perm=[1, 0, 2]) if layout == 0 else s)
    else:
        init = []
    ins = [x, g.w(d, gates * hidden, feat), g.w(d, gates * hidden, hidden), g.w(d, 2 * gates * hidden), ""]
    ins += init if init else [""] * n_states
    if peepholes:
        ins.append(g.w(d, 3 * hidden))
    attrs = {"hidden_size": hidden, "direction": direction}
    if layout:
        attrs["layout"] = 1
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    y, y_h = g.op(op, ins, n_out=3 if op == "LSTM" else 2, **attrs)[:2]
    t = g.op("Transpose", [y], perm=[2, 0, 1, 3]) if layout == 0 else y   # [N, S, D, H]
    out = g.op("MatMul", [g.op("Reshape", [t, g.i64([batch, seq, d * hidden])]), g.w(d * hidden, 3)])
    outs = [out, y_h] if yh_output else [out, g.op("MatMul", [y_h, g.w(hidden, 2)])]
    return model_of(g, inputs, outs)


def rnn_node(model):
    return next(n for n in model.graph.node if n.op_type in GATES)


def hidden_group(an):
    """The group of the recurrent node's hidden units (the one running through R's last axis)."""
    r = rnn_node(an.model).input[2]
    return next(g for g in an.groups if (r, 2) in g.axes)


def hidden_size(model):
    return next(a.i for a in rnn_node(model).attribute if a.name == "hidden_size")


def expected_macs(op, d, seq, batch, feat, hidden):
    return d * seq * batch * GATES[op] * hidden * (feat + hidden)


CASES = {
    "lstm": dict(op="LSTM"),
    "lstm_bidirectional_peepholes": dict(op="LSTM", direction="bidirectional", peepholes=True),
    "lstm_reverse_no_states": dict(op="LSTM", direction="reverse", states=None),
    "gru": dict(op="GRU", lbr=0),
    "gru_linear_before_reset": dict(op="GRU", lbr=1, direction="bidirectional"),
    "rnn_bidirectional": dict(op="RNN", direction="bidirectional"),
    "lstm_computed_states": dict(op="LSTM", direction="bidirectional", states="computed"),
    "gru_fed_states": dict(op="GRU", states="input", lbr=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hidden_and_input_groups_exact(case):
    kw = CASES[case]
    an = spa.analyze(recurrent(**kw))
    hid = hidden_group(an)
    assert hid.prunable and hid.channels == 8, hid.summary()
    feat = [g for g in an.groups if g.prunable and g.channels == 6]
    assert len(feat) == 1 and rnn_node(an.model).op_type in feat[0].summary()["ops"]  # through the input
    results = check_groups(an)
    assert {r["group"] for r in results} >= {hid.id, feat[0].id}
    for r in results:
        assert not r["approximate"] and r["error"] < EXACT, r
    assert check_joint(an)["error"] < EXACT


@pytest.mark.parametrize("case", sorted(CASES))
def test_prune_rewrites_hidden_size_and_counts_macs(case):
    kw = CASES[case]
    model = recurrent(**kw)
    an = spa.analyze(model)
    d = 2 if kw.get("direction") == "bidirectional" else 1
    node = rnn_node(an.model)
    assert node_macs(node, an.probe.shapes) == expected_macs(kw["op"], d, 5, 2, 6, 8)
    matmuls = sum(node_macs(n, an.probe.shapes) for n in an.model.graph.node if n.op_type == "MatMul")
    assert an.macs == matmuls + expected_macs(kw["op"], d, 5, 2, 6, 8)
    res = spa.prune(model, 0.5, analysis=an)
    pruned = res.model
    h = hidden_size(pruned)
    r = next(t for t in pruned.graph.initializer if t.name == rnn_node(pruned).input[2])
    assert h == 4 and list(r.dims) == [d, GATES[kw["op"]] * 4, 4]
    assert res.report["after"]["macs"] < res.report["before"]["macs"] == an.macs
    feed = an.probe.inputs
    want = probing.session(model).run(None, feed)
    got = probing.session(pruned).run(None, feed)
    assert [o.shape for o in got] == [o.shape for o in want]
    assert [i.name for i in pruned.graph.input] == [i.name for i in model.graph.input]


def test_fed_states_keep_their_width_and_are_read_through_a_gather():
    """A state fed as a graph input keeps its dims; the node reads the kept units of it."""
    model = recurrent(op="LSTM", states="input", direction="bidirectional")
    an = spa.analyze(model)
    pruned = spa.prune(model, 0.5, analysis=an).model
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input}
    assert dims["h0"] == dims["c0"] == [2, 2, 8]
    node = rnn_node(pruned)
    producers = {o: n for n in pruned.graph.node for o in n.output}
    for i in (5, 6):
        gather = producers[node.input[i]]
        assert gather.op_type == "Gather" and gather.input[0] == ["h0", "c0"][i - 5]


def test_state_output_blocks_the_hidden_group():
    """Y_h as a graph output keeps its dims: the hidden group is blocked, the rest still prunes."""
    model = recurrent(op="LSTM", yh_output=True)
    an = spa.analyze(model)
    hid = hidden_group(an)
    assert not hid.prunable and "graph output" in hid.reason
    res = spa.prune(model, 0.5, analysis=an)
    assert hidden_size(res.model) == 8
    assert res.report["after"]["macs"] < res.report["before"]["macs"]
    for r in check_groups(an):
        assert r["error"] < EXACT, r


def test_unreadable_recurrent_node_blocks_rather_than_guesses():
    """R computed at run time: the rule cannot slice it, so every axis of the node is fixed."""
    model = recurrent(op="GRU", states=None)
    node = rnn_node(model)
    r = node.input[2]
    node.input[2] = r + "_id"
    model.graph.node.insert(list(model.graph.node).index(node), helper.make_node("Identity", ["r_in"], [r + "_id"], name="id"))
    shape = next(list(t.dims) for t in model.graph.initializer if t.name == r)
    model.graph.input.append(helper.make_tensor_value_info("r_in", TensorProto.FLOAT, shape))
    an = spa.analyze(model)
    assert not any(g.prunable and "GRU" in g.summary()["ops"] for g in an.groups)
    res = spa.prune(model, 0.5, analysis=an)
    assert hidden_size(res.model) == 8


# ----------------------------------------------------------------------------------------------
# layout=1 (batch first): onnxruntime refuses it; shapes from onnx, runs by onnx's reference


def reference_analysis(model):
    """An Analysis built from onnx's shape inference instead of an onnxruntime probe."""
    from spa.api import Analysis
    from spa.graph.channels import build
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    shapes, dtypes = {}, {}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        shapes[vi.name] = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        dtypes[vi.name] = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, a in consts.items():
        shapes[name], dtypes[name] = a.shape, a.dtype
    feed = {i.name: np.random.default_rng(1).standard_normal(shapes[i.name]).astype(np.float32)
            for i in model.graph.input}
    pr = probing.Probe(shapes=shapes, values={**consts, **feed}, dynamic={n: (False,) * len(s) for n, s in shapes.items()},
                       inputs=feed, dtypes=dtypes, consts=consts)
    return Analysis(model=model, probe=pr, channels=build(model, pr), params=0, macs=0)


def reference_run(model, feed):
    from onnx.reference import ReferenceEvaluator
    return ReferenceEvaluator(model).run(None, feed)


@pytest.mark.parametrize("kw", [dict(op="LSTM", direction="bidirectional", peepholes=True),
                                dict(op="GRU", lbr=1), dict(op="RNN", states="computed")],
                         ids=["lstm", "gru", "rnn_computed_states"])
def test_batch_first_layout_is_exact(kw):
    model = recurrent(layout=1, **kw)
    an = reference_analysis(model)
    hid = hidden_group(an)
    assert hid.prunable and hid.channels == 8
    prunable = [g for g in an.groups if g.prunable]
    assert sorted(g.channels for g in prunable) == [6, 8]
    rng = np.random.default_rng(0)
    for units in [np.sort(rng.choice(g.units, 3, replace=False)) for g in prunable] + \
            [np.sort(np.concatenate([g.units[:2] for g in prunable]))]:
        pruned = slicing.apply(an.model, an.channels, an.probe, units)
        cut = cut_model(an, units)
        for a, b in zip(reference_run(cut, an.probe.inputs), reference_run(pruned, an.probe.inputs)):
            assert a.shape == b.shape
            assert np.abs(a - b).max() <= EXACT * max(np.abs(a).max(), 0.1)
    pruned = slicing.apply(an.model, an.channels, an.probe, hid.units[:3])
    assert hidden_size(pruned) == 5


# ----------------------------------------------------------------------------------------------
# torch exports: Embedding -> LSTM/GRU -> Linear, dynamic batch and sequence


def tagger(kind):
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 32)
            if kind == "gru":
                self.rnn = torch.nn.GRU(32, 48, batch_first=True)
                self.head = torch.nn.Linear(48, 10)
            else:
                self.rnn = torch.nn.LSTM(32, 40, num_layers=2, bidirectional=True, batch_first=True)
                self.head = torch.nn.Linear(80, 10)

        def forward(self, tokens):
            return self.head(self.rnn(self.embed(tokens))[0])

    torch.manual_seed(0)
    return Tagger().eval()


def export_tagger(kind, path):
    import torch
    tokens = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.onnx.export(tagger(kind), (tokens,), str(path), dynamo=False, opset_version=17,
                      input_names=["tokens"], output_names=["logits"],
                      dynamic_axes={"tokens": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}})
    return str(path)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("kind,hidden", [("lstm", [40, 40]), ("gru", [48])])
def test_torch_tagger_prunes_exactly_at_every_size(kind, hidden, tmp_path):
    pytest.importorskip("torch")
    path = export_tagger(kind, tmp_path / f"{kind}.onnx")
    an = spa.analyze(path)
    prunable = [g for g in an.groups if g.prunable]
    # the embedding width and every layer's hidden size (both directions together)
    assert sorted(g.channels for g in prunable) == sorted([32] + hidden), [g.summary() for g in an.groups]
    for r in check_groups(an):
        assert r["error"] < EXACT, r
    assert check_joint(an)["error"] < EXACT
    res = spa.prune(path, 0.3, analysis=an, round_to=1)    # exact counts: the hidden sizes below
    assert res.report["after"]["macs"] < 0.75 * res.report["before"]["macs"]
    rnn_nodes = [n for n in res.model.graph.node if n.op_type in GATES]
    kept = [round(h * 0.7) for h in hidden]
    assert [next(a.i for a in n.attribute if a.name == "hidden_size") for n in rnn_nodes] == kept
    # the pruned model equals the original with the removed channels cut, at every input size
    units = np.concatenate([an.groups[g["id"]].units[g["removed_channels"]] for g in res.report["groups"]])
    feeds = [probing.input_feed(an.model, {"tokens": s}, seed=1) for s in ([2, 7], [3, 11])]
    assert compare_outputs(cut_model(an, np.sort(units)), res.model, feeds) < EXACT
    for f in feeds:
        assert probing.session(res.model).run(None, f)[0].shape == (*f["tokens"].shape, 10)
