"""Plans: cost targets met within one channel step per group, overrides, iterative steps, CLI."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import graphs
import spa
from spa.cli import cli
from spa.errors import SpaError
from spa.planning.plan import CostModel, parse_target, resolve_overrides


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _step_cost(report, kind):
    """The most one more channel per pruned group could change the cost."""
    return sum(g[kind] / g["channels"] for g in report["groups"] if g["prunable"] and g["removed"])


@pytest.mark.parametrize("name", ["residual_chain", "concat_split", "flatten_gemm", "squeeze_excitation"])
@pytest.mark.parametrize("kind,factor", [("macs", 2.0), ("params", 1.5), ("macs", 1.25)])
def test_target_met_within_one_channel_step(name, kind, factor):
    m = getattr(graphs, name)()
    r = spa.prune(m, target=f"{kind}={factor}")
    rep = r.report
    goal = rep["before"][kind] / factor
    assert rep["target_reachable"]
    assert rep["after"][kind] <= goal + 1
    assert rep["after"][kind] >= goal - _step_cost(rep, kind) - 1
    assert rep["target"] == f"{kind}={factor:g}" and rep["global"]


@pytest.mark.parametrize("name", ["residual_chain", "concat_split", "grouped_depthwise", "channel_shuffle", "flatten_gemm"])
def test_cost_estimate_matches_pruned_model(name):
    m = getattr(graphs, name)()
    for ratio in (0.25, 0.5):
        r = spa.prune(m, ratio)
        an = spa.analyze(m)
        est = CostModel(an).estimate(np.zeros(0, np.int64))
        assert est == {"params": an.params, "macs": an.macs}
    r = spa.prune(m, target="macs=1.5")
    assert r.report["plan"]["estimate"] == r.report["after"]


def test_unreachable_target_is_reported():
    r = spa.prune(graphs.residual_chain(), target="macs=1000")
    assert not r.report["target_reachable"]
    assert all(g["kept"] >= 1 for g in r.report["groups"])


def test_parse_target_errors():
    assert parse_target("macs=2") == ("macs", 2.0)
    for bad in ("flops=2", "macs", "macs=x", "params=0.5"):
        with pytest.raises(SpaError, match="--target"):
            parse_target(bad)


def test_overrides_by_id_and_regex(tmp_path):
    m = graphs.residual_chain()
    an = spa.analyze(m)
    prunable = [g for g in an.groups if g.prunable]
    first, second = prunable[0], prunable[1]
    elsewhere = {n for g in an.groups if g.id != second.id for n, _ in g.nodes}
    node = next(n for n, op in second.nodes if n not in elsewhere)   # a node only this group touches
    over = resolve_overrides(an.groups, {str(first.id): 0.0, f"^{node}$": 0.5})
    assert over == {first.id: 0.0, second.id: 0.5}
    r = spa.prune(m, 0.25, overrides=over)
    by_id = {g["id"]: g for g in r.report["groups"]}
    assert by_id[first.id]["removed"] == 0
    assert by_id[second.id]["removed"] == second.channels // 2 and by_id[second.id]["override"] == 0.5
    path = tmp_path / "o.json"
    path.write_text(json.dumps({str(first.id): 0.0}))
    r = spa.prune(m, target="macs=1.5", overrides=str(path))
    assert {g["id"]: g for g in r.report["groups"]}[first.id]["removed"] == 0
    path.write_text("{not json")
    with pytest.raises(SpaError, match="--overrides"):
        spa.prune(m, 0.3, overrides=str(path))
    with pytest.raises(SpaError, match="no group"):
        spa.prune(m, 0.3, overrides={"999": 0.5})


def test_iterative_steps():
    m = graphs.residual_chain()
    r = spa.prune(m, 0.5, steps=3)
    assert [s["step"] for s in r.report["step_summaries"]] == [1, 2, 3]
    assert r.report["after"]["params"] < r.report["before"]["params"]
    r = spa.prune(m, target="macs=2", steps=2, criterion="wanda", calib="random")
    rep = r.report
    assert rep["after"]["macs"] <= rep["before"]["macs"] / 2 + 1
    assert len(rep["step_summaries"]) == 2


def test_max_ratio_caps_groups_under_target():
    r = spa.prune(graphs.residual_chain(), target="macs=4", max_ratio=0.5)
    for g in r.report["groups"]:
        if g["prunable"]:
            assert g["removed"] <= g["channels"] // 2


def test_cli_options(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(graphs.residual_chain(), str(path))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = run("prune", path, "-o", out, "--target", "macs=2", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["target"] == "macs=2" and data["before"]["macs"] / data["after"]["macs"] >= 2
    (tmp_path / "ov.json").write_text(json.dumps({"0": 0.0}))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    for extra in (["--criterion", "fpgm", "--reduction", "max"], ["--criterion", "lamp", "--global"],
                  ["--criterion", "wanda", "--calib", "random", "--calib-batches", "2"],
                  ["--criterion", "flap", "--calib", tmp_path / "c.npz"],
                  ["--criterion", "bn_scale", "--normalisation", "max"],
                  ["--overrides", tmp_path / "ov.json", "--steps", "2"],
                  ["--target", "params=1.5", "--criterion", "random", "--seed", "3"]):
        res = run("prune", path, "-o", out, "--report", rep, *extra)
        assert res.exit_code == 0, (extra, res.output)
        report = json.loads(rep.read_text())
        assert report["after"]["macs"] < report["before"]["macs"], extra
        assert "criterion" in res.stdout
    res = run("prune", path, "-o", out, "--criterion", "act_mean")
    assert res.exit_code == 2 and "calib" in res.output
    res = run("prune", path, "-o", out, "--target", "flops=2")
    assert res.exit_code == 2 and "--target" in res.output


@pytest.mark.parametrize("kind,factor", [("params", 1.3), ("macs", 1.6)])
def test_uniform_allocation_cuts_every_exact_group_by_one_fraction(kind, factor):
    """--allocate uniform: every exact group loses floor(f n) of its lowest-scored channels for one f,
    the smallest that reaches the target."""
    r = spa.prune(graphs.attention(n=6, d=32, heads=4), target=f"{kind}={factor}", allocate="uniform",
                  round_to=1)
    rep = r.report
    assert rep["plan"]["allocation"] == "uniform" and rep["target_reachable"]
    assert rep["after"][kind] <= rep["before"][kind] / factor + 1
    f = rep["plan"]["fraction"]
    exact = [g for g in rep["groups"] if g["prunable"] and not g["approximate"]]
    assert len(exact) >= 3 and all(g["removed"] == min(int(np.floor(g["channels"] * f + 1e-9)), g["channels"] - 1)
                                   for g in exact)
    for g in exact:   # the lowest-scored channels went
        kept = np.delete(np.asarray(g["scores"]), g["removed_channels"])
        assert not g["removed"] or max(np.asarray(g["scores"])[g["removed_channels"]]) <= min(kept)
    smaller = spa.prune(graphs.attention(n=6, d=32, heads=4), target=f"{kind}={factor * 0.9}", allocate="uniform",
                        round_to=1)
    assert smaller.report["plan"]["fraction"] < f


@pytest.mark.torch
def test_uniform_allocation_leaves_approximate_and_unscored_groups_whole():
    """On a decoder: the RMSNorm'ed residual stream (approximate) and the rotary query/key dims, which
    wanda cannot score (read only by Q.K^T; it falls back to l2), are not cut by a uniform share."""
    from exported import transformers as export
    path = export("llama_gqa")
    r = spa.prune(path, target="params=1.2", allocate="uniform", criterion="wanda", calib="random")
    rep = r.report
    whole = set(rep["plan"]["kept_whole"])
    approximate = {g["id"] for g in rep["groups"] if g["prunable"] and g["approximate"]}
    unscored = {g["id"] for g in rep["groups"] if g["prunable"] and g.get("fallback")}
    assert approximate and unscored and whole == approximate | unscored
    assert all(g["removed"] == 0 for g in rep["groups"] if g["id"] in whole)
    assert rep["target_reachable"] and rep["after"]["params"] <= rep["before"]["params"] / 1.2 + 1


def test_uniform_allocation_needs_a_size_target():
    for bad in ({}, {"target": "fidelity=0.9"}):
        with pytest.raises(SpaError, match="--allocate uniform"):
            spa.prune(graphs.residual_chain(), allocate="uniform", **bad)


def test_the_ends_of_a_stack_of_repeated_blocks_are_found_in_graph_order():
    """stack_ends: groups of one signature (channels, operators), 8 or more, in graph order: the first
    and last of them; a shorter stack (a CNN stage) or a lone group is left alone."""
    from spa.graph.channels import Group
    from spa.planning.plan import stack_ends

    def group(gid, channels, layer, ops=("MatMul", "MatMul", "Sigmoid")):
        return Group(gid, np.arange(channels), [], True, nodes=[(f"n{layer}_{k}", op) for k, op in enumerate(ops)])
    layers = [group(100 - i, 48, i) for i in range(10)]               # ids run against the graph's order
    short = [group(200 + i, 16, 20 + i, ("Conv",)) for i in range(4)]
    lone = [group(300, 48, 40, ("Conv", "Conv"))]
    position = {f"n{layer}_{k}": layer * 10 + k for layer in range(50) for k in range(3)}
    assert stack_ends(layers + short + lone, position, 2, 1) == sorted([100, 99, 91])
    assert stack_ends(layers, position, 0, 0) == []
    assert stack_ends(layers[:7], position, 1, 0) == []


def _mlp_blocks(kinds, blocks=10, d=8):
    """x -> blocks x, per ``(name, hidden, output scale)`` of ``kinds``, (MatMul, Relu, MatMul, Add x):
    repeated residual MLP blocks, a stack per kind."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for b in range(blocks):
        for kind, h, scale in kinds:
            inits += [numpy_helper.from_array(rng.standard_normal((d, h)).astype(np.float32), f"w{kind}{b}a"),
                      numpy_helper.from_array(rng.standard_normal((h, d)).astype(np.float32) * scale, f"w{kind}{b}b")]
            nodes += [helper.make_node("MatMul", [x, f"w{kind}{b}a"], [f"h{kind}{b}"], name=f"up{kind}{b}"),
                      helper.make_node("Relu", [f"h{kind}{b}"], [f"a{kind}{b}"], name=f"relu{kind}{b}"),
                      helper.make_node("MatMul", [f"a{kind}{b}", f"w{kind}{b}b"], [f"o{kind}{b}"],
                                       name=f"down{kind}{b}"),
                      helper.make_node("Add", [x, f"o{kind}{b}"], [f"x{kind}{b}"], name=f"add{kind}{b}")]
            x = f"x{kind}{b}"
    g = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _deep_mlp_stack():
    """Ten repeated residual MLP blocks of 24 hidden units (nodes up0, down0, ...)."""
    return _mlp_blocks([("", 24, 0.1)])


def test_uniform_allocation_keeps_the_first_blocks_of_a_stack_whole():
    """--keep-ends 1,0 (the default's kind): the first block's hidden units stay whole, the report names
    its group, and every other block loses the uniform share; 0,0 cuts the first block too."""
    m = _deep_mlp_stack()
    for ends, first_cut in (((1, 0), False), ((0, 0), True), ((2, 1), False)):
        rep = spa.prune(m, target="params=1.3", allocate="uniform", keep_ends=ends).report
        by_node = {n: g for g in rep["groups"] if g["channels"] == 24 for n in g["nodes"]}   # hidden units
        cut = [by_node[f"up{b}"]["removed"] for b in range(10)]
        assert (cut[0] > 0) == first_cut and all(c > 0 for c in cut[ends[0]:10 - ends[1]]), (ends, cut)
        assert rep["plan"]["ends_kept"] == sorted(by_node[f"up{b}"]["id"] for b in
                                                  list(range(ends[0])) + list(range(10 - ends[1], 10)))
        assert rep["after"]["params"] <= rep["before"]["params"] / 1.3 + 1
    with pytest.raises(SpaError, match="--keep-ends"):
        spa.prune(m, target="params=1.3", allocate="uniform", keep_ends=(1,))


def _two_stacks(loud=3.0):
    """Ten blocks of (MLP of 24, Add, MLP of 16, Add): two stacks of repeated residual MLPs whose hidden
    units differ in what they cost: the MLPs of 16 have output weights ``loud`` times larger."""
    return _mlp_blocks([("q", 24, 0.1), ("l", 16, 0.1 * loud)])


def test_stacks_allocation_gives_the_costlier_stack_the_smaller_share(tmp_path):
    """--allocate stacks: the uniform plan's OBS residual per parameter saved, a geometric mean per stack,
    sets each stack's share: the stack whose hidden units have 3x louder output weights (9x the residual
    per parameter) loses far less than the other, every block of a stack the same share, at the target;
    without an OBS compensation there is no residual to weigh by."""
    m = _two_stacks()
    calib = tmp_path / "x.npy"
    np.save(calib, np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32))
    kw = dict(target="params=1.3", criterion="wanda", calib=str(calib), compensate="obs", keep_ends=(0, 0))
    rep = spa.prune(m, allocate="stacks", **kw).report
    plan = rep["plan"]
    assert plan["allocation"] == "stacks" and len(plan["stacks"]) == 2
    hidden = {n: g for g in rep["groups"] if g["channels"] in (16, 24) for n in g["nodes"]}
    share = {k: [hidden[f"up{k}{b}"]["removed"] / hidden[f"up{k}{b}"]["channels"] for b in range(10)] for k in "ql"}
    assert len(set(share["q"])) == 1 and len(set(share["l"])) == 1, share       # one share per stack
    weight = {s["channels"]: s["weight"] for s in plan["stacks"]}
    assert 4 < weight[24] / weight[16] < 20, weight
    assert share["l"][0] < share["q"][0] / 3 and 0 < plan["fraction"] < plan["uniform_fraction"] * 2
    assert rep["after"]["params"] <= rep["before"]["params"] / 1.3 + 1
    with pytest.raises(SpaError, match="--allocate stacks"):
        spa.prune(m, target="params=1.3", criterion="l2", allocate="stacks")
    import onnx
    from click.testing import CliRunner
    from spa.cli import cli
    onnx.save(m, str(tmp_path / "m.onnx"))
    out = CliRunner().invoke(cli, ["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--target",
                                   "params=1.3", "--criterion", "wanda", "--calib", str(calib), "--compensate", "obs",
                                   "--keep-ends", "0,0", "--allocate", "stacks"], catch_exceptions=False).output
    assert "allocation stacks: the uniform share 0.250 times" in out and "10 groups of 16 channels x0." in out, out
