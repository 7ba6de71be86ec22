"""Shape-polymorphic pruning: a pruned model is right at every input size it accepts.

Models with dynamic dims are analysed with their dims as symbols; every test runs the pruned model
at two or more sizes of each dynamic dim, and the exactness oracle compares it with the cut original
at every size the analysis ran (``oracle.feeds_at_every_size``).  Transformers come from
``tools/export_transformers.py`` (configs with random weights; TorchScript and dynamo exporters).
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import spa
from spa.runtime import calib, probing, shapes

from spa.surgery.validate import validate
from spa.errors import SpaError
from spa.verify.oracle import check_groups, check_joint
from graphs import G
from exported import transformers as export

EXACT = 1e-5


# ----------------------------------------------------------------------------------------------
# a CNN with a dynamic batch and Expand targets computed from Shape


def dyn_cnn(frozen=False):
    """conv -> conv -> + bias expanded to Shape(y) -> a class token expanded to the batch
    (Concat(Shape(y)[0], 1, 16)) -> concat with pooled features -> Reshape [N, 32] -> Gemm.
    ``frozen``: the token's Expand target is the constant [1, 1, 16] (right at batch 1 only)."""
    g = G(0)
    y = g.conv("x", 3, 8, bn=True)
    y = g.conv(y, 8, 16)
    shp = g.op("Shape", [y])
    y = g.op("Add", [y, g.op("Expand", [g.w(1, 16, 1, 1), shp])])
    n = g.op("Unsqueeze", [g.op("Gather", [shp, g.i64(0)], axis=0), g.i64([0])])
    target = g.i64([1, 1, 16]) if frozen else g.op("Concat", [n, g.i64([1]), g.i64([16])], axis=0)
    cls = g.op("Expand", [g.w(1, 1, 16), target])
    p = g.op("Unsqueeze", [g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1), g.i64([1])])
    t = g.op("Concat", [cls, p], axis=1)
    t = g.op("Reshape", [t, g.op("Concat", [n, g.i64([32])], axis=0)])
    g.op("Gemm", [t, g.w(10, 32)], transB=1)
    g.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def fixed(model, sizes):
    """The same model with its inputs' dynamic dims fixed (in order of appearance, per input)."""
    m = onnx.ModelProto()
    m.CopyFrom(model if isinstance(model, onnx.ModelProto) else onnx.load(model))
    for inp in m.graph.input:
        for d, dim in enumerate(inp.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                n = sizes[inp.name][d]
                dim.Clear()
                dim.dim_value = n
    return m


def prunable(an):
    return sum(g.prunable for g in an.groups)


def test_dynamic_batch_cnn_prunes_like_the_fixed_one_and_batch_rows_agree():
    model = dyn_cnn()
    an = spa.analyze(model)
    assert prunable(an) == prunable(spa.analyze(fixed(model, {"x": [1, 3, 16, 16]}))) == 2
    assert [p["batch"] for p in an.probe.points] == [1, 3, 2, 2]  # probe, up, short, odd
    for r in check_groups(an):
        assert r["error"] < EXACT, r
    pruned = spa.prune(model, 0.3).model
    sess = probing.session(pruned)
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    batch = sess.run(None, {"x": x})[0]
    rows = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(5)])
    assert batch.shape == (5, 10)
    assert np.abs(batch - rows).max() <= 1e-4 * np.abs(rows).max()


def test_validation_refuses_a_model_frozen_at_the_probe_batch():
    an = spa.analyze(dyn_cnn())
    with pytest.raises(SpaError, match="batch=3"):
        validate(dyn_cnn(frozen=True), an)


# ----------------------------------------------------------------------------------------------
# dim symbols


def test_spa_check_every_size_catches_a_model_frozen_at_batch_1(tmp_path):
    from click.testing import CliRunner
    from spa.verify.commands import check_command
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(dyn_cnn(), str(good))
    onnx.save(dyn_cnn(frozen=True), str(bad))
    same = CliRunner().invoke(check_command, [str(good), str(good), "--every-size"])
    assert same.exit_code == 0 and "at batch=3" in same.output and "at batch=2" in same.output
    assert CliRunner().invoke(check_command, [str(good), str(bad)]).exit_code == 0  # batch 1 only: same
    frozen = CliRunner().invoke(check_command, [str(good), str(bad), "--every-size"])
    assert frozen.exit_code == 1 and "FAIL" in frozen.output


def test_dim_params_are_symbols_and_expressions():
    assert shapes.parse_dim("batch") == ("sym", "batch")
    tree = shapes.parse_dim("past_sequence_length + sequence_length")
    assert shapes.evaluate(tree, {"past_sequence_length": 3, "sequence_length": 4}) == 7
    assert shapes.evaluate(shapes.parse_dim("2*s0 - 1"), {"s0": 5}) == 9
    assert shapes.parse_dim("__import__('os')") == ("sym", "__import__('os')")  # never evaluated
    # paddle2onnx names every unknown dim '?': each is a symbol of its own
    plan = shapes.size_plan([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 3, "?", "?"])])
    assert len(plan.symbols) == 3


def _inputs(**dims):
    return [helper.make_tensor_value_info(n, TensorProto.INT64 if n.endswith("ids") or "mask" in n else TensorProto.FLOAT, d)
            for n, d in dims.items()]


def test_size_plan_shares_symbols_and_binds_given_shapes():
    ins = _inputs(input_ids=["batch", "seq"], attention_mask=["batch", "past + seq"], past_key=["batch", 2, "past", 8])
    plan = shapes.size_plan(ins, {"input_ids": [2, 7]})
    assert plan.symbols == ["batch", "seq", "past"]
    assert plan.batch == {"batch"} and plan.steps == {"seq"} and "past" in plan.tokens
    sizes = plan.shapes(plan.base)
    assert sizes["attention_mask"] == [2, 7 + plan.base["past"]] and sizes["past_key"][:3] == [2, 2, plan.base["past"]]
    short = plan.bumped("short")
    assert short["seq"] == 1 and short["past"] > plan.base["past"]  # a decode step after a longer past
    with pytest.raises(SpaError, match="rank"):
        shapes.size_plan(ins, {"input_ids": [2]})


def test_an_unnamed_total_length_is_found_as_a_sum():
    ins = _inputs(input_ids=["batch", "seq"], attention_mask=["batch", "total"], past_key=["batch", 2, "past", 8])
    plan = shapes.size_plan(ins)
    first = shapes.related_plans(plan)[0]
    assert first.dims[("attention_mask", 1)] == ("+", ("sym", "seq"), ("sym", "past"))
    assert first.symbols == ["batch", "seq", "past"]


def test_user_sizes_never_hide_a_sum_they_satisfy():
    """A mask the user sized to past + sequence may still be their sum (it was never tried: the
    probe froze the past); a mask sized otherwise is not."""
    ins = _inputs(input_ids=["batch", "seq"], attention_mask=["batch", "total"], past_key=["batch", 2, "past", 8])
    plan = shapes.size_plan(ins, {"input_ids": [1, 16], "attention_mask": [1, 24], "past_key": [1, 2, 8, 8]})
    fits = shapes.fitting_plans(plan)
    assert [p.dims[("attention_mask", 1)] for p in fits] == [("+", ("sym", "seq"), ("sym", "past"))]
    assert fits[0].shapes(fits[0].base) == plan.shapes(plan.base) and fits[0].caches == {"past"}
    other = shapes.size_plan(ins, {"input_ids": [1, 16], "attention_mask": [1, 30], "past_key": [1, 2, 8, 8]})
    assert shapes.fitting_plans(other) == [] and shapes.related_plans(other) == []
    # a KV decoder is validated at a decode step and a second batch, whatever points the probe ran
    sum_plan = fits[0]
    short = sum_plan.bumped("short")
    assert sum_plan.decode_point([sum_plan.base]) == short and short["seq"] == 1 and short["batch"] == 2
    assert sum_plan.decode_point([sum_plan.base, short]) is None
    assert shapes.size_plan(_inputs(input_ids=["batch", "seq"])).decode_point([{"batch": 1, "seq": 16}]) is None


def test_regrouped_dims_are_refined_into_common_factors():
    from spa.ops.layout import refine
    # [N, heads*dim] -> [N*heads, dim] (a batch merged with the heads)
    assert refine([3, 768], [36, 64]) == ([3, 12, 64], [[0], [1, 2]], [[0, 1], [2]])
    assert refine([6, 4], [4, 6]) is None


def test_integer_inputs_span_the_embedding_table():
    g = G(0)
    e = g.op("Gather", [g.w(50, 8), "input_ids"], axis=0)
    graph = helper.make_graph(g.nodes, "g", _inputs(input_ids=["batch", "seq"], attention_mask=["batch", "seq"]),
                              [helper.make_tensor_value_info(e, TensorProto.FLOAT, None)], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert shapes.integer_ranges(m) == {"input_ids": (0, 50), "attention_mask": (1, 2)}
    feed = probing.input_feed(m)
    assert feed["input_ids"].shape == (1, shapes.TOKEN_SIZE) and feed["input_ids"].max() > 4
    assert (feed["attention_mask"] == 1).all()


# ----------------------------------------------------------------------------------------------
# transformers exported with dynamic batch and sequence

CAUSAL = ["gpt2_ts", "gpt2_dynamo", "llama_gqa"]
#: prunable groups each export must expose (heads, head dims, KV heads, query heads per KV group, MLP, width)
MIN_PRUNABLE = {"gpt2_ts": 7, "gpt2_dynamo": 7, "llama_gqa": 10, "bert": 7, "llama_gqa_kv": 5, "llama_gqa_fp16": 10}



def _token_feed(model, batch, seq, rng, past=None):
    feed = {}
    for inp in model.graph.input:
        if inp.name == "input_ids":
            feed[inp.name] = rng.integers(0, 256, (batch, seq)).astype(np.int64)
        elif inp.name == "attention_mask":
            feed[inp.name] = np.ones((batch, seq + (past or 0)), np.int64)
        elif inp.name == "token_type_ids":
            feed[inp.name] = np.zeros((batch, seq), np.int64)
        else:  # past key/values [batch, kv heads, past, head dim]
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            feed[inp.name] = rng.standard_normal((batch, dims[1], past, dims[3])).astype(np.float32)
    return feed


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", CAUSAL + ["bert"])
def test_transformer_groups_match_the_fixed_export_and_the_oracle_holds_at_every_size(name):
    path = export(name)
    an = spa.analyze(path)
    model = onnx.load(path)
    static = spa.analyze(fixed(model, {i.name: [2, 16] for i in model.graph.input}))
    assert prunable(an) >= max(prunable(static), MIN_PRUNABLE[name]), (prunable(an), prunable(static))
    assert len(an.probe.points) >= 3  # the probe size, every dim moved up, a short sequence
    joint = check_joint(an, seed=1)
    assert joint["error"] < EXACT, joint["error"]


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", CAUSAL)
def test_pruned_causal_lm_rows_and_prefixes_agree_at_other_sizes(name):
    path = export(name)
    res = spa.prune(path, 0.3)
    assert res.report["after"]["macs"] < 0.8 * res.report["before"]["macs"]
    sess = probing.session(res.model)
    model = onnx.load(path)
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 7), (3, 19)):
        feed = _token_feed(model, batch, seq, rng)
        logits = sess.run(["logits"], feed)[0]
        assert logits.shape == (batch, seq, 256)
        rows = np.concatenate([sess.run(["logits"], {k: v[i:i + 1] for k, v in feed.items()})[0] for i in range(batch)])
        prefix = sess.run(["logits"], {k: v[:, :5] for k, v in feed.items()})[0]
        scale = np.abs(logits).max()
        assert np.abs(logits - rows).max() <= 1e-4 * scale
        assert np.abs(logits[:, :5] - prefix).max() <= 1e-4 * scale


@pytest.mark.slow
@pytest.mark.torch
def test_kv_cache_decoder_prunes_and_runs_a_decode_step_and_a_batch():
    path = export("llama_gqa_kv")
    an = spa.analyze(path)
    assert prunable(an) >= MIN_PRUNABLE["llama_gqa_kv"]
    # the past/present interface is unchanged by default: groups reaching present.* stay blocked
    assert any(not g.prunable and "present." in g.reason for g in an.groups)
    assert check_joint(an, seed=1)["error"] < EXACT
    res = spa.prune(path, 0.3, analysis=an)
    original, pruned = probing.session(onnx.load(path)), probing.session(res.model)
    model = onnx.load(path)
    rng = np.random.default_rng(0)
    for batch, seq, past in ((1, 1, 24), (2, 5, 3), (2, 9, 0)):
        feed = _token_feed(model, batch, seq, rng, past=past)
        want = [o.shape for o in original.run(None, feed)]
        got = [o.shape for o in pruned.run(None, feed)]
        assert got == want, (batch, seq, past)
    # --check compares at the other sizes too, finding mask = past + sequence as the probe did
    from spa.verify.check import compare
    sizes = compare(path, res.model, input_shapes={k: list(v.shape) for k, v in an.probe.inputs.items()},
                    every_size=True)["sizes"]
    assert len(sizes) == 2 and not any(s.get("skipped") or s.get("error") for s in sizes), sizes


def _decode_loop(model, steps, rng_seed=0, batch=2, prompt=5):
    """Logits of a prefill (no past) and ``steps`` one-token decode steps, each fed the present of
    the step before; the past's head and head-dim sizes are the model's declared ones."""
    sess = probing.session(model)
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    past_names = [n for n in declared if n.startswith("past_key_values")]
    rng = np.random.default_rng(rng_seed)
    past = {n: np.zeros((batch, declared[n][1], 0, declared[n][3]), np.float32) for n in past_names}
    length, out = 0, []
    for step in range(steps + 1):
        seq = prompt if step == 0 else 1
        feed = {"input_ids": rng.integers(0, 256, (batch, seq)).astype(np.int64),
                "attention_mask": np.ones((batch, length + seq), np.int64), **past}
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        out.append(got["logits"])
        past = {n: got[n.replace("past_key_values.", "present.")] for n in past_names}
        length += seq
    return out


@pytest.mark.slow
@pytest.mark.torch
def test_prune_io_shrinks_the_kv_cache_and_a_decode_loop_equals_the_cut_original():
    """--prune-io 'past_key_values|present': KV heads and head dims become prunable groups; the pruned
    model, fed caches of the sizes the report gives, runs a prefill and 8 decode steps whose logits
    equal those of the original with the same channels cut (the exactness oracle), step by step."""
    from spa.surgery import slicing
    from spa.verify.oracle import cut_model
    path = export("llama_gqa_kv")
    blocked = prunable(spa.analyze(path))
    an = spa.analyze(path, prune_io="past_key_values|present")
    assert prunable(an) >= blocked + 5     # KV heads and head dims of both layers
    assert not any("present." in g.reason or "past_key" in g.reason for g in an.groups)
    rng = np.random.default_rng(3)
    exact = [g for g in an.groups if g.prunable and not g.approximate]
    units = np.sort(np.concatenate([rng.choice(g.units, size=max(1, g.channels // 2), replace=False) for g in exact]))
    pruned = slicing.apply(an.model, an.channels, an.probe, units)
    validate(pruned, an)
    cut = cut_model(an, units)
    a, b = _decode_loop(pruned, 8), _decode_loop(cut, 8)
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape
        assert np.abs(x - y).max() <= 1e-5 * max(np.abs(y).max(), 1.0), step
    # through the API: the report lists every interface change, which sizes the caches of the loop
    res = spa.prune(path, 0.5, prune_io="past_key_values|present")
    changes = {(c["tensor"], c["axis"]): (c["before"], c["after"]) for c in res.report["interface"]}
    assert changes[("past_key_values.0.key", 1)] == (2, 1) and changes[("present.1.value", 3)][1] < 16
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in res.model.graph.input}
    for (name, axis), (_, after) in changes.items():
        if name in declared:
            assert declared[name][axis] == after
    logits = _decode_loop(res.model, 8)
    assert all(x.shape == (2, 5 if i == 0 else 1, 256) and np.isfinite(x).all() for i, x in enumerate(logits))
    # default: the interface never changes
    assert "interface" not in spa.prune(path, 0.5, analysis=spa.analyze(path)).report


#: the sizes of issue 19: a prompt of 16 after a past of 8, the mask sized to their sum
KV_SIZES = {"input_ids": [1, 16], "attention_mask": [1, 24],
            **{f"past_key_values.{i}.{kv}": [1, 2, 8, 16] for i in (0, 1) for kv in ("key", "value")}}


@pytest.mark.slow
@pytest.mark.torch
def test_kv_decoder_pruned_at_user_sizes_runs_a_decode_loop_that_equals_the_cut_original(tmp_path):
    """--input-shapes for every input of a KV decoder (mask = past + sequence under the name
    total_sequence): the probe still finds the sum, so the pruned model runs a prefill and decode
    steps at batch 1 and 2 and equals the cut original step by step (it was frozen at past 8: a
    decode step failed in an Add, batch 2 in a GatherND, and spa wrote it with exit 0)."""
    from spa.surgery import slicing
    from spa.verify.oracle import cut_model
    path = export("llama_gqa_kv")
    an = spa.analyze(path, input_shapes=KV_SIZES)
    assert an.probe.plan.dims[("attention_mask", 1)] == ("+", ("sym", "sequence"), ("sym", "past"))
    assert {(p["sequence"], p["batch"]) for p in an.probe.points[1:]} >= {(1, 2)}  # a decode step, another batch
    rng = np.random.default_rng(3)
    exact = [g for g in an.groups if g.prunable and not g.approximate]
    units = np.sort(np.concatenate([rng.choice(g.units, size=max(1, g.channels // 2), replace=False) for g in exact]))
    pruned = slicing.apply(an.model, an.channels, an.probe, units)
    validate(pruned, an)
    cut = cut_model(an, units)
    for batch in (1, 2):
        a, b = _decode_loop(pruned, 6, batch=batch), _decode_loop(cut, 6, batch=batch)
        for step, (x, y) in enumerate(zip(a, b)):
            assert x.shape == y.shape == (batch, 5 if step == 0 else 1, 256)
            assert np.abs(x - y).max() <= 1e-5 * max(np.abs(y).max(), 1.0), (batch, step)
    # the command line: the file it writes runs the same loop
    from click.testing import CliRunner
    from spa.cli import cli
    out = tmp_path / "kv.onnx"
    sizes = ",".join(f"{k}:[{','.join(map(str, v))}]" for k, v in KV_SIZES.items())
    res = CliRunner().invoke(cli, ["prune", path, "-o", str(out), "--ratio", "0.3", "--input-shapes", sizes])
    assert res.exit_code == 0, res.output
    for batch in (1, 2):
        assert [x.shape for x in _decode_loop(onnx.load(str(out)), 4, batch=batch, prompt=3)] == \
            [(batch, 3, 256)] + [(batch, 1, 256)] * 4


def _frozen_at_probe_sizes(an):
    """``an.model`` with every value computed from shapes folded at the probe's sizes (what the
    probe folds where it sees nothing move): a model right at the probe's sizes only."""
    import dataclasses
    proto = onnx.ModelProto()
    proto.CopyFrom(an.model)
    pr = an.probe
    frozen = dataclasses.replace(pr, shapes=dict(pr.shapes), values=dict(pr.values), dynamic=dict(pr.dynamic),
                                 dtypes=dict(pr.dtypes), consts=dict(pr.consts), other_runs=[pr.values])
    assert probing.fold_constants(proto, frozen) > 0
    from spa.io.weights import full_model
    return full_model(proto, frozen.consts)


@pytest.mark.slow
@pytest.mark.torch
def test_validation_refuses_a_kv_decoder_frozen_at_the_probe_sizes():
    """Validation runs a KV decoder at a decode step and a second batch whatever points the probe
    ran at: a model frozen at the probe's sizes is refused with one line, even where the probe saw
    nothing move."""
    an = spa.analyze(export("llama_gqa_kv"), input_shapes=KV_SIZES)
    frozen = _frozen_at_probe_sizes(an)
    validate(frozen, an, every_size=False)  # right at the probe's sizes
    with pytest.raises(SpaError, match="^pruned model"):
        validate(frozen, an)
    an.probe.points, an.probe.other_shapes = an.probe.points[:1], []  # a probe that moved nothing
    with pytest.raises(SpaError, match=r"^pruned model.* at batch=2, sequence=1, past=16") as err:
        validate(frozen, an)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.torch
def test_vit_with_a_dynamic_batch_prunes_like_the_fixed_one():
    """torchvision's attention is sequence-first: [L, N, 768] -> [L, N*12, 64] merges the batch with
    the heads, and the scale is computed from Shape(q) of a tensor with a dynamic batch."""
    pytest.importorskip("torchvision")
    from export_torchvision import export as export_tv
    an = spa.analyze(str(export_tv("vit_b_16", size=64, dynamic_batch=True, init="calibrated")))
    static = spa.analyze(str(export_tv("vit_b_16", size=64, init="calibrated")))
    assert prunable(an) == prunable(static) >= 37
    assert check_joint(an, seed=1)["error"] < EXACT


@pytest.mark.slow
@pytest.mark.torch
def test_decode_step_export_moves_each_dim_alone(tmp_path):
    """A mask named 'past + 1' (an export for one new token at a time, older optimum naming): every
    symbol moved at once is refused, so each moves alone, and the past is never taken for a
    constant (it was: the pruned model ran at the probe's past only)."""
    model = onnx.load(export("llama_gqa_kv"))
    for inp in model.graph.input:
        for dim in inp.type.tensor_type.shape.dim:
            if dim.dim_param == "total_sequence":
                dim.dim_param = "past + 1"
    path = str(tmp_path / "decode.onnx")
    onnx.save(model, path)
    an = spa.analyze(path)
    assert an.probe.points[0]["sequence"] == 1 and {p["past"] for p in an.probe.points} != {an.probe.points[0]["past"]}
    res = spa.prune(path, 0.3, analysis=an)
    original, pruned = probing.session(model), probing.session(res.model)
    rng = np.random.default_rng(0)
    for batch, past in ((1, 0), (1, 5), (3, 40)):
        feed = _token_feed(model, batch, 1, rng, past=past)
        assert [o.shape for o in pruned.run(None, feed)] == [o.shape for o in original.run(None, feed)]


@pytest.mark.slow
@pytest.mark.torch
def test_fp16_decoder_prunes_in_fp16_and_agrees_with_the_cut_original():
    """Llama-GQA exported in half precision (how LLMs ship): the same groups as fp32, the oracle at
    every size, and the pruned file keeps fp16 weights."""
    path = export("llama_gqa_fp16")
    an = spa.analyze(path)
    assert prunable(an) >= MIN_PRUNABLE["llama_gqa_fp16"]
    assert check_joint(an, seed=1)["error"] < 1e-3  # fp16 sums
    res = spa.prune(path, 0.3, analysis=an)
    kinds = {t.data_type for t in res.model.graph.initializer if t.dims and np.prod(t.dims) > 64}
    assert onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.FLOAT not in kinds
    logits = probing.session(res.model).run(["logits"], {"input_ids": np.zeros((3, 19), np.int64)})[0]
    assert logits.shape == (3, 19, 256) and logits.dtype == np.float16


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("name", ["llama_gqa", "gpt2_ts", "bert"])
def test_the_report_gives_each_layers_new_decoder_config(name):
    """report['layers']: per layer, the heads, KV heads, head dim and MLP width before and after,
    consistent with the pruned projections' widths (dynamo name scopes and TorchScript node names)."""
    res = spa.prune(export(name), 0.5)
    layers = res.report["layers"]
    assert [e["layer"] for e in layers] == [0, 1]
    for e in layers:
        heads, dim, kv, inter = (e[k] for k in ("num_attention_heads", "head_dim", "num_key_value_heads",
                                                "intermediate_size"))
        assert heads[0] == 4 and dim[0] == 16 and inter == [128, 64]
        assert kv[0] == (2 if name == "llama_gqa" else 4)
        assert heads[1] * dim[1] < 64
        proj = e["projections"]
        q = next(v for k, v in proj.items() if k.endswith(("q_proj", "query", "c_attn")))
        q_out = q["out"][1] if name != "gpt2_ts" else None
        if q_out is not None:
            assert q_out == heads[1] * dim[1]
        if name == "llama_gqa":
            assert proj["self_attn.k_proj"]["out"][1] == kv[1] * dim[1]


def _fp16_storage(model):
    """``model`` with every float weight stored in fp16 and Cast to float where it is read (what
    fp16 converters that keep float compute write)."""
    from onnx import numpy_helper
    inits, casts = [], []
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.size > 1:
            inits.append(numpy_helper.from_array(a.astype(np.float16), t.name + "_fp16"))
            casts.append(helper.make_node("Cast", [t.name + "_fp16"], [t.name], to=TensorProto.FLOAT,
                                          name="cast_" + t.name))
        else:
            inits.append(t)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.slow
@pytest.mark.torch
def test_fp16_weights_cast_to_float_stay_fp16_and_prune_like_float(tmp_path):
    """Weights stored in fp16 and Cast to float at run time: the Casts are not folded into float
    copies (which would double the file and lose its dtype), the same groups as the float model are
    prunable, the oracle holds, and the pruned file keeps fp16 weights behind the same Casts."""
    path = export("llama_gqa")
    fp16 = tmp_path / "llama_cast16.onnx"
    onnx.save(_fp16_storage(onnx.load(path)), str(fp16))
    an = spa.analyze(str(fp16))
    assert prunable(an) == prunable(spa.analyze(path))
    assert check_joint(an, seed=1)["error"] < EXACT
    res = spa.prune(str(fp16), 0.3, analysis=an)
    kinds = {t.data_type for t in res.model.graph.initializer if np.prod(t.dims) > 1 and t.data_type != TensorProto.INT64}
    assert kinds == {TensorProto.FLOAT16}
    assert sum(n.op_type == "Cast" for n in res.model.graph.node) >= 20


@pytest.mark.slow
@pytest.mark.torch
def test_bf16_decoder_prunes_through_an_fp16_twin_and_keeps_bf16_weights():
    """bfloat16 (onnxruntime's CPU provider runs almost none of it): spa probes and validates an
    fp16 twin, finds the same groups as fp32, and writes bf16 weights; the pruned model equals the
    cut original (both run as fp16 twins, to fp16 precision)."""
    from spa.surgery import slicing
    from spa.verify.oracle import compare_outputs, cut_model, feeds_at_every_size
    path = export("llama_gqa_bf16")
    an = spa.analyze(path)
    assert prunable(an) == prunable(spa.analyze(export("llama_gqa")))
    rng = np.random.default_rng(2)
    exact = [g for g in an.groups if g.prunable and not g.approximate]
    units = np.sort(np.concatenate([rng.choice(g.units, size=max(1, g.channels // 3), replace=False) for g in exact]))
    pruned = slicing.apply(an.model, an.channels, an.probe, units)
    validate(pruned, an)
    err = compare_outputs(probing.fp16_twin(cut_model(an, units)), probing.fp16_twin(pruned), feeds_at_every_size(an))
    assert err < 2e-2, err
    res = spa.prune(path, 0.5, analysis=an)
    before = {t.name: t.data_type for t in onnx.load(path).graph.initializer}
    after = {t.name: t.data_type for t in res.model.graph.initializer}
    assert sum(v == TensorProto.BFLOAT16 for v in after.values()) >= 20
    assert all(after[k] == v for k, v in before.items() if k in after)


def test_a_size_modulo_32_is_not_frozen():
    """Padding to a multiple of 32 ((32 - H % 32) % 32, Swin/YOLO style) is the same at sizes that
    are all multiples of 32: the probe's odd point moves it, so it stays live."""
    g = G()
    y = g.conv("x", 3, 8)
    h = g.op("Gather", [g.op("Shape", [y]), g.i64([2])], axis=0)
    pad = g.op("Mod", [g.op("Sub", [g.i64([32]), g.op("Mod", [h, g.i64([32])])]), g.i64([32])])
    y = g.op("Pad", [y, g.op("Concat", [g.i64([0, 0, 0, 0, 0, 0]), pad, g.i64([0])], axis=0)])
    g.conv(y, 8, 8, act=None)
    g.nodes[-1].output[0] = "out"
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    pruned = spa.prune(m, 0.25).model
    for H in (224, 100):
        x = {"x": np.zeros((1, 3, H, 40), np.float32)}
        assert probing.session(pruned).run(None, x)[0].shape == probing.session(m).run(None, x)[0].shape


def test_names_are_names():
    assert shapes.parse_dim("batch-size") == ("sym", "batch-size")  # not batch minus size
    pixel = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 3, "h", "w"])
    assert shapes.size_plan([pixel]).tokens == set()  # an image, not a KV cache
    kv = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["b", 2, "past", 8])
    assert shapes.size_plan([kv]).tokens == {"past"}
    with pytest.raises(SpaError, match="not a model input"):
        shapes.size_plan([pixel], {"pixel": [1, 3, 8, 8]})


def test_calibration_text_of_another_length_than_the_probe_is_taken(tmp_path):
    """A decoder with a dynamic sequence is probed at a short one; calibration windows of any length
    fit it (statistics are per channel), a static dim of the wrong size is still refused."""
    path = export("llama_gqa")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "text.npz", input_ids=rng.integers(0, 256, (4, 40)).astype(np.int64))
    res = spa.prune(path, 0.2, criterion="wanda", calib=str(tmp_path / "text.npz"), calib_batch_size=2)
    assert res.report["calibration"]["samples"] == 4
    cnn = spa.analyze(dyn_cnn())
    np.savez(tmp_path / "bad.npz", x=rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    with pytest.raises(spa.SpaError, match="samples of shape"):
        calib.batches(cnn, str(tmp_path / "bad.npz"))
