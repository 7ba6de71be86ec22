"""Task expert patterns (PreMoe's TAER) on a planted-routing MoE (tools/planted_moe.py): each of 4
tasks routes to its own 4 of 16 experts per layer.  ``spa experts profile`` finds those sets from
the task's data alone, ``spa prune --experts-from --task --target experts=0.25`` keeps them (the
task's held-out selections stay >= 95%, router norms keep far fewer), the pruned model equals the
masked original, and ``spa experts match`` names the task of held-out batches."""
import json

import pytest
from click.testing import CliRunner

import planted_moe as pm
import spa
from spa.cli import cli
from spa.errors import SpaError
from spa.graph.experts import find_layers
from spa.planning.experts import plan_experts
from spa.planning.patterns import task_scores
from spa.runtime import calib
from spa.scoring.experts import router_logits, router_norm, selection_share
from graphs import masked_router, worst_error

EXACT = 1e-5
SHAPES = {"x": [64, pm.H]}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    paths = pm.write(out)
    model = str(out / "planted_moe.onnx")
    an = spa.analyze(model, input_shapes=SHAPES)
    doc = None
    for t in range(pm.TASKS):
        doc = spa.profile_experts(model, str(paths[str(t)]), f"task{t}", into=doc, analysis=an)
    return model, paths, an, doc, out


def test_task_patterns_keep_the_planted_experts_and_their_selections(planted):
    model, paths, an, doc, _ = planted
    layers = find_layers(an.model, an.weights, an.probe.shapes)
    sets = pm.expert_sets()
    for t in range(pm.TASKS):
        kept = plan_experts(layers, task_scores(doc, f"task{t}", layers), 0.25)
        assert [kept[la.index].tolist() for la in layers] == [sorted(s[t].tolist()) for s in sets]
        _, feeds = calib.batches(an, str(paths[f"{t}_heldout"]))
        runs = router_logits(an, layers, feeds)
        shares = [selection_share(runs[la.index][1], la.top_k, kept[la.index]) for la in layers]
        assert min(shares) >= 0.95, shares
        blind = plan_experts(layers, {la.index: router_norm(la, an.weights) for la in layers}, 0.25)
        assert min(selection_share(runs[la.index][1], la.top_k, blind[la.index]) for la in layers) < 0.7
        got = spa.match_experts(doc, str(paths[f"{t}_heldout"]), model, analysis=an)
        assert got["closest"] == f"task{t}" and got["tasks"][0]["similarity"] > 0.9 > got["tasks"][1]["similarity"]


def test_profile_prune_and_match_on_the_command_line(planted, tmp_path):
    model, paths, an, _, _ = planted
    pat = tmp_path / "patterns.json"
    run = CliRunner()
    for t in (0, 2):
        got = run.invoke(cli, ["experts", "profile", model, "--calib", str(paths[str(t)]), "--name", f"task{t}",
                               "-o", str(pat), "--input-shapes", "x:[64,32]"])
        assert got.exit_code == 0, got.output
    assert "2 task(s) in" in got.output
    doc = json.loads(pat.read_text())
    assert sorted(doc["tasks"]) == ["task0", "task2"] and pat.stat().st_size < 4000
    out = tmp_path / "task2.onnx"
    got = run.invoke(cli, ["prune", model, "-o", str(out), "--experts-from", str(pat), "--task", "task2",
                           "--target", "experts=0.25", "--input-shapes", "x:[64,32]", "--json"])
    assert got.exit_code == 0, got.output
    rep = json.loads(got.output[got.output.index("{"):])
    kept = {e["layer"]: e["kept"] for e in rep["experts"]["layers"]}
    assert [kept[i] for i in range(pm.LAYERS)] == [sorted(s[2].tolist()) for s in pm.expert_sets()]
    assert rep["criterion"] == "pattern task2"
    layers = find_layers(an.model, an.weights, an.probe.shapes)
    feeds = [{"x": pm.task_tokens(t, n, seed=9)} for t, n in ((2, 1), (2, 64), (0, 200))]
    assert worst_error(masked_router(an.full_model(), layers, kept), spa.load_model(str(out)), feeds) < EXACT
    from pathlib import Path
    assert out.stat().st_size < 0.3 * Path(model).stat().st_size      # 4 of 16 experts: a quarter of the weights
    got = run.invoke(cli, ["experts", "match", str(pat), "--calib", str(paths["2_heldout"]),
                           "--input-shapes", "x:[64,32]"])
    assert got.exit_code == 0 and "closest task: task2" in got.output, got.output


def test_bad_patterns_are_one_line_errors(planted, tmp_path):
    model, paths, an, doc, _ = planted
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpaError, match="--experts-from .*bad.json: not JSON"):
        spa.prune(model, target="experts=0.25", experts_from=str(bad), task="task0", analysis=an)
    bad.write_text(json.dumps({**doc, "layers": [{**doc["layers"][0], "router": "other"}] + doc["layers"][1:]}))
    with pytest.raises(SpaError, match="made on another model.*'other' with 16 experts is not in this one"):
        spa.prune(model, target="experts=0.25", experts_from=str(bad), task="task0", analysis=an)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(doc))
    with pytest.raises(SpaError, match="--task 'code': the patterns hold task0, task1, task2, task3"):
        spa.prune(model, target="experts=0.25", experts_from=str(good), task="code", analysis=an)
    with pytest.raises(SpaError, match="--experts-from FILE and --task NAME go together"):
        spa.prune(model, target="experts=0.25", experts_from=str(good), analysis=an)
    bad.write_text(json.dumps({**doc, "tasks": {"t": {**doc["tasks"]["task0"], "scores": [[1.0] * 3] * 2}}}))
    with pytest.raises(SpaError, match="task 't': 'scores' must hold one finite number per expert"):
        spa.match_experts(str(bad), str(paths["0"]), model, analysis=an)
