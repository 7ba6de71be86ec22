"""The whole-expert pipeline: find -> score -> plan -> cut -> validate, and the task patterns.

``spa.prune`` runs :func:`prune_experts` for ``--target experts=F`` on the analysis it made (the
channel steps do not run: the expert axis is not a channel axis, and a prune does one or the
other); ``spa experts profile`` and ``match`` call :func:`profile` and :func:`match`.  Each stage is
a plain function of ``spa/{graph,scoring,planning,surgery}/experts.py``; this module only strings
them together and writes the report.
"""
from __future__ import annotations

import os

from ..errors import SpaError
from ..graph.experts import find_layers
from ..planning import patterns
from ..planning.counting import count_macs, count_params
from ..planning.experts import plan_experts
from ..planning.fidelity import eval_feeds
from ..progress import quiet
from ..runtime import synthetic
from ..scoring.experts import drift_scores, expert_scores, router_logits, selection_frequency, tcess
from ..surgery.experts import cut_experts
from ..surgery.validate import validate


def prune_experts(first, opts, fraction: float, progress=quiet):
    """Keep ``fraction`` of every MoE layer's experts of analysis ``first``, ranked by the task
    pattern ``opts.task`` of ``opts.experts_from``, the measured drift (``opts.allocate ==
    "sensitivity"``, on --calib or synthetic inputs), TCESS on ``opts.calib``, or router norms.
    Returns ``(model, weights, probe of the pruned model, report)``."""
    progress("finding mixture-of-experts layers")
    layers = find_layers(first.model, first.weights, first.probe.shapes)
    if opts.experts_from is not None:
        doc = patterns.load(opts.experts_from)
        scorer, scores = f"pattern {opts.task}", patterns.task_scores(doc, opts.task, layers)
    elif opts.allocate == "sensitivity":
        feeds, what = eval_feeds(first, opts)
        progress(f"measuring each expert's drift on {what}")
        scorer, scores = "drift", drift_scores(first, layers, feeds, progress)
    else:
        feeds = None
        if opts.calib is not None:
            desc, feeds = synthetic.calibration(first, opts.calib, n_batches=opts.calib_batches,
                                                batch_size=opts.calib_batch_size, seed=opts.seed,
                                                wanted=opts.synthetic, progress=progress)
            progress(f"gathering router logits on {desc}")
        scorer, scores = expert_scores(first, layers, feeds=feeds, progress=progress)
    kept = plan_experts(layers, scores, fraction, global_rank=opts.global_rank)
    progress(f"removing {sum(la.experts - len(kept[la.index]) for la in layers if la.index in kept)} experts "
             f"from {len(kept)} layers")
    current, weights = cut_experts(first.model, first.weights, layers, kept)
    progress("validating the pruned model in onnxruntime")
    after = validate(current, first, opts.input_shapes, weights=weights)
    entries = []
    for layer in layers:
        e = layer.summary()
        if layer.index in kept:
            e.update(kept=kept[layer.index].tolist(), scores=[round(float(v), 6) for v in scores[layer.index]])
        entries.append(e)
    report = {"criterion": scorer, "reduction": "none", "normalisation": None, "target": f"experts={fraction:g}",
              "before": {"params": first.params, "macs": first.macs},
              "after": {"params": count_params(current), "macs": count_macs(current, after.shapes)},
              "experts": {"scorer": scorer, "layers": entries}, "groups": []}
    return current, weights, after, report


def describe(an) -> list:
    """Every MoE layer of analysis ``an`` as plain data (``ExpertLayer.summary``): ``spa experts list``."""
    return [la.summary() for la in find_layers(an.model, an.weights, an.probe.shapes)]


def _router_runs(an, calib, calib_batch_size, seed, progress):
    """``(layers, {layer index: (logits, selection)}, description of the data)`` on ``calib``."""
    layers = find_layers(an.model, an.weights, an.probe.shapes)
    live = [la for la in layers if not la.blocked]
    if not live:
        raise SpaError("no mixture-of-experts layer with a TopK or MoE router found" +
                       "".join(f"; layer {la.index}: {la.blocked}" for la in layers))
    desc, feeds = synthetic.calibration(an, calib, batch_size=calib_batch_size, seed=seed, progress=progress)
    progress(f"gathering router logits on {desc}")
    return layers, router_logits(an, live, feeds, progress), desc


def profile(an, model_name: str, calib, name: str, *, into=None, calib_batch_size=None, seed: int = 0,
            progress=quiet) -> dict:
    """The patterns document ``into`` (a document, a file, or None for a new one) with task ``name``:
    each MoE layer's TCESS and selection frequencies on ``calib``."""
    if not name or not str(name).strip():
        raise SpaError("--name: give the task a name (math, code...)")
    doc = patterns.load(into, "--output") if isinstance(into, (str, os.PathLike)) else into
    layers, runs, desc = _router_runs(an, calib, calib_batch_size, seed, progress)
    scores = {i: tcess(lg, sel, layers[i].top_k) for i, (lg, sel) in runs.items()}
    selected = {i: selection_frequency(sel, layers[i].top_k) for i, (lg, sel) in runs.items()}
    tokens = min(len(lg) for lg, _ in runs.values())
    return patterns.add_task(doc, model_name, layers, str(name), scores, selected, desc, tokens)


def match(an, doc: dict, calib, *, calib_batch_size=None, seed: int = 0, progress=quiet) -> dict:
    """Which stored task of ``doc`` the ``calib`` batch is closest to (TCESS per layer against each
    task's pattern): ``{"closest", "tasks": [{"task", "similarity"}], "source"}``."""
    if not doc["tasks"]:
        raise SpaError("the patterns hold no task: add one with spa experts profile")
    layers, runs, desc = _router_runs(an, calib, calib_batch_size, seed, progress)
    ranked = patterns.match(doc, layers, {i: tcess(lg, sel, layers[i].top_k) for i, (lg, sel) in runs.items()})
    return {"closest": ranked[0]["task"], "tasks": ranked, "source": desc}
