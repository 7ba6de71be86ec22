"""The library entry points: ``spa.analyze`` and ``spa.prune`` (the CLI only calls these)."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from . import io
from .errors import SpaError
from .progress import quiet
from .graph.channels import ChannelModel, build
from .io import weights as weight_store, zoo
from .io.weights import is_float
from .mapping import mapfile
from .mapping.layers import layer_report
from .depth import stage as depth_stage
from .moe import stage as moe_stage
from .rotation import stage as rotation_stage
from .planning import allocation, fidelity, latency, layerwise
from .planning.latency import LatencyModel, kept_multiples
from .planning.counting import count_macs, count_params, mac_axes, node_macs
from .planning.plan import (CostModel, all_units, plan as make_plan, plan_stacks, plan_target, plan_uniform,
                            resolve_overrides, stack_ends)
from .runtime import calib as calib_mod, probing, synthetic
from .runtime.latency import LatencyTable, kernel_alignment
from .options import PruneOptions, check_regex
from .scoring import CRITERIA, compensation, score
from .scoring import choose as choose_criterion
from .scoring.obspa import moment_axes
from .surgery import slicing, vocab
from .surgery.validate import interface_changes, validate




@dataclass
class Analysis:
    """A prepared model with its channel model: what ``spa inspect`` shows."""
    model: onnx.ModelProto
    probe: probing.Probe
    channels: ChannelModel
    params: int
    macs: int
    seconds: float = 0.0
    prune_io: str | None = None    # graph inputs/outputs whose static dims may shrink (a regex)

    @property
    def groups(self):
        return self.channels.groups

    @property
    def weights(self) -> dict:
        """Every initializer as an array (the stubs' data: ``spa.io.weights``)."""
        return self.probe.consts

    def full_model(self) -> onnx.ModelProto:
        """A complete copy of the prepared model, weights filled in (costs the model's size)."""
        return weight_store.full_model(self.model, self.weights)

    @property
    def graph(self):
        """The model as a networkx graph whose edges carry their channel groups (``spa.graph.view``)."""
        from .graph.view import graph_view  # networkx: imported only for the graph view (start-up cost)
        return graph_view(self)

    def summary(self) -> dict:
        prunable = [g for g in self.groups if g.prunable]
        return {
            "params": self.params, "macs": self.macs,
            "groups": [g.summary() for g in self.groups],
            "totals": {"groups": len(self.groups), "prunable_groups": len(prunable),
                       "channels": int(sum(g.channels for g in self.groups)),
                       "prunable_channels": int(sum(g.channels for g in prunable)),
                       "approximate_groups": int(sum(g.approximate for g in prunable))},
        }


def analyze(model, *, input_shapes=None, progress=quiet, weights=None, prune_io: str | None = None) -> Analysis:
    """Load, normalise and probe ``model`` (a path, a zoo model's name such as ``"yolov8n"``, or a
    ModelProto) and find its channel groups.  A model read from a file keeps its big weights out of
    ``Analysis.model`` (``spa.io.weights`` stubs; the arrays are ``Analysis.weights``, read-only views
    of the file); ``weights``: the arrays of a ModelProto's stubs.  ``prune_io``: a regular
    expression; graph inputs and outputs whose names match may lose channels along their static
    dims (a KV cache's heads and head dims; see ``PruneOptions.prune_io``)."""
    if prune_io is not None:
        check_regex(prune_io, "--prune-io")
    t0 = time.perf_counter()
    if isinstance(model, (str, os.PathLike)):  # a path or a zoo model's name, with its default shapes
        model, input_shapes = zoo.resolve(model, input_shapes, progress=progress)
    progress("loading and probing the model in onnxruntime")
    proto, pr = probing.prepare(model, input_shapes, weights)
    progress(f"building the channel model ({len(proto.graph.node)} nodes)")
    cm = build(proto, pr, prune_io)
    _attribute_costs(cm, proto, pr)
    return Analysis(proto, pr, cm, count_params(proto), count_macs(proto, pr.shapes),
                    time.perf_counter() - t0, prune_io)


def _attribute_costs(cm: ChannelModel, proto, pr) -> None:
    """Params and MACs each group owns (what removing all of it would save, first order)."""
    per_atom_params = np.zeros(cm.n_atoms)
    for name, value in cm.consts.items():
        if not is_float(value.dtype):
            continue
        for d in range(value.ndim):
            got = cm.axis_index.get((name, d))
            if got is not None and got[1] > 1:
                per_atom_params[got[0]:got[0] + got[1]] += value.size / got[1]
    per_atom_macs = np.zeros(cm.n_atoms)
    for node in proto.graph.node:
        macs = node_macs(node, pr.shapes)
        if not macs:
            continue
        for axis in mac_axes(node, pr.shapes):
            got = cm.axis_index.get(axis)
            if got is not None and got[1] > 1:
                per_atom_macs[got[0]:got[0] + got[1]] += macs / got[1]
    unit_params = np.bincount(cm.pair_unit, weights=per_atom_params[cm.pair_atom], minlength=cm.n_units)
    unit_macs = np.bincount(cm.pair_unit, weights=per_atom_macs[cm.pair_atom], minlength=cm.n_units)
    for g in cm.groups:
        g.params = int(round(unit_params[g.units].sum()))
        g.macs = int(round(unit_macs[g.units].sum()))


class PruneResult:
    """The pruned model and its report.  The model's big weights are kept apart (``weights``,
    stubs in the proto: ``spa.io.weights``); ``save`` streams them to a file, ``model`` fills a
    complete ModelProto on first use (the model's size in memory once more)."""

    def __init__(self, proto: onnx.ModelProto, report: dict, weights: dict | None = None):
        self.proto, self.report, self.weights = proto, report, weights or {}
        self._full = None

    @property
    def model(self) -> onnx.ModelProto:
        if self._full is None:
            self._full = weight_store.full_model(self.proto, self.weights)
        return self._full

    def save(self, path, *, inputs=()):
        """Write the pruned model through spa's safe writer (``spa.io.save_model``)."""
        return io.save_model(self.proto, path, inputs=inputs, weights=self.weights)

    def __repr__(self):
        return f"PruneResult({len(self.proto.graph.node)} nodes, report keys {sorted(self.report)})"


@dataclass
class Step:
    """One pass of the pipeline: the analysis it pruned and what each stage decided."""
    analysis: Analysis
    stats: object = None          # calibration statistics (calibrated criteria)
    scores: object = None         # scoring.Scores
    compensation: object = None   # the criterion's compensation (obspa), if it has one
    overrides: dict = field(default_factory=dict)
    removal: dict = field(default_factory=dict)   # group id -> removed units
    plan: dict = field(default_factory=dict)      # what a target plan reports
    cost: object = None           # the plan's cost model when it is not plain counting (a LatencyModel)
    widths: dict = field(default_factory=dict)    # how the kept counts were rounded (planning.latency.kept_multiples)
    sensitivity: object = None    # the sensitivity table (allocation.Table), made once per step


def prune(model, ratio: float = 0.3, *, options: PruneOptions | None = None, output=None, progress=quiet,
          analysis: Analysis | None = None, **kwargs) -> PruneResult:
    """Remove channels from ``model`` and return the smaller model with a report: analyse, then per
    step score, plan, compensate, cut and validate, then report (and write to ``output``).

    Options come as a :class:`PruneOptions` or as its fields by keyword (``spa.prune(m, 0.3,
    criterion="obspa")``); ``analysis`` reuses an earlier ``spa.analyze`` of the same model.
    ``progress``: a callable of one line of text, called as each stage starts and, on long stages,
    with the step and the time left (``spa.prune(m, progress=print)``; ``spa.progress``); silent by
    default."""
    opts = options or PruneOptions(ratio=ratio, **kwargs)
    scorer, target = opts.checked()
    with blas_threads(opts.blas_threads):
        return _prune(model, opts, scorer, target, output, progress, analysis)


@contextlib.contextmanager
def blas_threads(n: int):
    """numpy's BLAS limited to ``n`` threads for the duration (0: left as it is).  spa's own numpy
    work (OBSPA's inverses, scoring) is many mid-sized products; on a shared machine BLAS threads
    contend with each other and with onnxruntime (YOLOv8n obspa: 130 s with OpenBLAS's default
    threads, 14.5 s with one, on a busy 2-core box)."""
    if not n:
        yield
        return
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=int(n), user_api="blas"):
        yield


def _prune(model, opts, scorer, target, output, progress, analysis) -> PruneResult:
    t0 = time.perf_counter()
    if analysis is not None and analysis.prune_io != opts.prune_io:
        raise SpaError(f"the analysis was made with prune_io={analysis.prune_io!r}, the options ask for "
                       f"{opts.prune_io!r}: analyse with the same prune_io")
    first = analysis or analyze(model, input_shapes=opts.input_shapes, progress=progress, prune_io=opts.prune_io)
    if opts.keep_tokens is not None:   # the vocabulary only: its own stage (spa.surgery.vocab)
        current, current_weights, report, kept = vocab.prune_vocab(first, opts.keep_tokens, opts.input_shapes,
                                                                   opts.seed, progress)
        return _finish(model, first, current, current_weights, report, opts, output, progress, t0, None, kept)
    channels = target is None or target[0] not in ("experts", "blocks")
    fields, criterion_why = choose_criterion(first, opts) if channels else ({}, "")
    ref = None
    if not opts.prune_io:   # the guard's reference, before any surgery (see fidelity.reference)
        progress("running the original on the fidelity guard's inputs")
        ref = fidelity.reference(first, opts, progress, ahead=_text_batches(replace(opts, **fields)) if channels else 0)
    if target is not None and target[0] == "experts":
        current, current_weights, after, report = moe_stage.prune_experts(first, opts, target[1], progress)
        return _finish(model, first, current, current_weights, report, opts, output, progress, t0, ref)
    if target is not None and target[0] == "blocks":
        current, current_weights, after, report = depth_stage.prune_blocks(first, opts, target[1], ref, progress)
        return _finish(model, first, current, current_weights, report, opts, output, progress, t0, ref)
    if fields:
        opts = replace(opts, **fields)
        scorer, target = opts.checked()
        progress(f"criterion {opts.criterion} ({criterion_why})")
    allocate, chosen = (allocation.choose(first, opts.allocate, target, compensated=_obs_compensated(opts))
                        if target is not None else (opts.allocate, ""))
    opts = replace(opts, allocate=allocate)     # every stage sees the allocation the plan uses
    history, current, current_weights, after = [], first.model, first.weights, first.probe
    kept_map, compensated, rotated = None, set(), None
    if opts.rotate is not None:    # the stream in its principal axes, its trailing dims cut: then channels
        current, current_weights, after, rotated = rotation_stage.rotate_stream(first, opts, progress, analyze)
        opts = replace(opts, exclude=rotation_stage.kept_whole(opts.exclude))
    for k in range(1, opts.steps + 1):
        tag = f"step {k}/{opts.steps}: " if opts.steps > 1 else ""
        if k > 1 or rotated is not None:
            progress(f"{tag}re-analysing the {'pruned' if k > 1 else 'rotated'} model")
        step = Step(first if k == 1 and rotated is None else analyze(
            current, input_shapes=opts.input_shapes, progress=progress, weights=current_weights,
            prune_io=opts.prune_io))
        _score(step, scorer, opts, k, tag, opts.global_rank or target is not None, progress)
        if target is not None and target[0] == "latency":
            cut = _reach_latency(step, first, opts, target, k, tag, progress)
            if step.compensation is not None:   # the rounds are over: its Hessians are not needed again
                step.compensation.release()
        else:
            cut = _cut_step(step, first, opts, target, k, tag, progress, final=True)
        units = all_units(step.removal)
        if len(units):
            current, current_weights, after, changed = cut
            if opts.map_path is not None:
                step_kept = mapfile.step_map(step.analysis, units)
                kept_map = step_kept if kept_map is None else mapfile.compose(kept_map, step_kept)
                compensated |= changed
        history.append(step)
    report = _report(first, history, current, after, opts, target)
    if rotated is not None:
        report["rotation"] = rotated
    if criterion_why:
        report["criterion_chosen"] = criterion_why
    if chosen and isinstance(report.get("plan"), dict):
        report["plan"]["allocation_chosen"] = f"{allocate} ({chosen})"
    return _finish(model, first, current, current_weights, report, opts, output, progress, t0, ref, kept_map,
                   compensated)


def _cut_step(step: Step, first: Analysis, opts: PruneOptions, target, k: int, tag: str, progress, final=False):
    """Plan, compensate, cut and validate one step: ``(model, weights, probe, names of the weights the
    compensation changed)`` of the pruned model, or Nones when the plan removes nothing.  ``final``: no
    other plan of this step follows (a latency target tries several), so the compensation's Hessians go
    before validation.  The new weights live in a temporary file's memory map (``weights.spilled``)."""
    _plan(step, first, opts, target, k, progress)
    source, channels = _compensated(step, step.removal, progress)
    if final and step.compensation is not None:
        step.compensation.release()
    units = all_units(step.removal)
    progress(f"{tag}removing {len(units)} channels from {len(step.removal)} groups")
    if not len(units):
        return None, None, None, set()
    model, weights = slicing.cut(source, channels, step.analysis.probe, units)
    changed = {n for n, v in channels.consts.items() if v is not step.analysis.channels.consts.get(n)}
    weight_store.release_pages(channels.consts.values())
    source = channels = None     # the compensated weights before slicing (SmolLM2: 146 MB) are not read again
    weights = weight_store.spilled(weights)
    weight_store.trim_heap()
    progress("validating the pruned model in onnxruntime")
    return model, weights, validate(model, first, opts.input_shapes, weights=weights), changed


def _reach_latency(step: Step, first: Analysis, opts: PruneOptions, target, k: int, tag: str, progress):
    """``--target latency=F``: plan on the latency table's prediction, time the written model against
    the original on the device, and re-plan with a corrected goal until the measured speed-up is
    within ``latency.TOLERANCE`` of F (``latency.reach``).  The report's plan holds every round."""
    an = step.analysis
    table = LatencyTable(opts.device, opts.threads, progress=progress)
    alignment, _ = kernel_alignment(opts.device)
    dense = an.full_model()
    step.cost = LatencyModel(an, table, alignment, progress, dense=dense)
    feed = dict(an.probe.inputs)

    def attempt(goal):
        got = _cut_step(step, first, opts, ("latency", goal), k, tag, progress)
        return got, dict(step.removal), dict(step.plan)

    def measure(candidate):
        model, weights = candidate[0][0], candidate[0][1]
        if model is None:
            return {"original_ms": 0.0, "pruned_ms": 0.0, "speedup": 1.0}
        progress(f"latency: timing the pruned model against the original ({opts.device})")
        return table.speedup(dense, weight_store.full_model(model, weights), feed)

    (cut, step.removal, plan), rounds, best = latency.reach(target[1], attempt, measure, progress)
    est = step.cost.estimate(all_units(step.removal))["latency"]
    step.plan = {**plan, "target": f"latency={target[1]:g}", "planned_for": rounds[best]["goal"], "latency": {
        "device": opts.device, "rounds": rounds, "chosen_round": best + 1, "measured_speedup": rounds[best]["speedup"],
        "predicted_speedup": round(step.cost.base["latency"] / est, 4) if est else 1.0,
        "model": step.cost.info(), "table": table.summary(),
        "groups": step.cost.group_curves([g for g in an.groups if g.prunable])}}
    return cut


def _finish(model, first, current, current_weights, report, opts, output, progress, t0, ref, kept_map=None,
            compensated=()):
    """The last stages of every prune: the fidelity guard, the map, writing the output."""
    if ref is None or report.get("interface"):
        report["fidelity"] = {"skipped": "the inputs may change (--prune-io, --keep-tokens, a removed block's cache "
                                         "pair): compare with your own loop"}
    else:
        progress("measuring the pruned model's fidelity to the original")
        report["fidelity"] = fidelity.guard(ref, current, current_weights, opts)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    result = PruneResult(current, report, current_weights)
    if opts.map_path is not None:
        import json
        doc = mapfile.document(kept_map or {}, first, current, current_weights, compensated)
        io.write_text(opts.map_path, json.dumps(doc, separators=(",", ":")),
                      inputs=[model] if isinstance(model, (str, os.PathLike)) else [], what="--map")
        report["map"] = str(opts.map_path)
    if output is not None:
        result.save(output, inputs=[model] if isinstance(model, (str, os.PathLike)) else [])
        report["output"] = str(output)
    return result


def profile_experts(model, calib, name: str, *, into=None, output=None, input_shapes=None, calib_batch_size=None,
                    seed: int = 0, progress=quiet, analysis: Analysis | None = None) -> dict:
    """Task pattern ``name`` of ``model`` on ``calib`` (each MoE layer's TCESS and selection
    frequencies: ``spa.planning.patterns``), added to ``into`` (a patterns document or file) or to a
    new document, and safe-written to ``output`` when given.  Returns the document."""
    an = analysis or analyze(model, input_shapes=input_shapes, progress=progress)
    named = "<model>" if not isinstance(model, (str, os.PathLike)) else \
        str(os.path.abspath(model)) if os.path.isfile(model) else str(model)   # a file, or a zoo name
    doc = moe_stage.profile(an, named, calib, name, into=into, calib_batch_size=calib_batch_size, seed=seed,
                            progress=progress)
    if output is not None:
        import json
        io.write_text(output, json.dumps(doc, separators=(",", ":")), what="--output",
                      inputs=[p for p in (model, calib) if isinstance(p, (str, os.PathLike))])
    return doc


def match_experts(patterns, calib, model=None, *, input_shapes=None, calib_batch_size=None, seed: int = 0,
                  progress=quiet, analysis: Analysis | None = None) -> dict:
    """Which task of ``patterns`` (a document or file) a query batch ``calib`` is closest to, on
    ``model`` (default: the model the patterns were made on)."""
    from .planning.patterns import load
    doc = load(patterns, "patterns") if isinstance(patterns, (str, os.PathLike)) else patterns
    an = analysis or analyze(model or doc["model"], input_shapes=input_shapes, progress=progress)
    return moe_stage.match(an, doc, calib, calib_batch_size=calib_batch_size, seed=seed, progress=progress)


def _text_batches(opts: PruneOptions) -> int:
    """Batches of text the model writes itself that the first step's statistics read (0: none):
    ``--calib synthetic`` for a calibrated criterion, or the Hessians of an OBS compensation without
    data (``obspa.hessians``).  The guard's text is their first batches, written in the same run."""
    scorer, _ = opts.checked()
    if scorer.needs_calib:
        return opts.calib_batches if str(opts.calib) == "synthetic" else 0
    no_data = opts.calib is None or str(opts.calib) in ("random", "synthetic")
    return opts.calib_batches if _obs_compensated(opts) and no_data else 0


def _obs_compensated(opts: PruneOptions) -> bool:
    """Whether the prune has an OBS compensation with measured (data or synthetic) Hessians."""
    scorer, _ = opts.checked()
    return scorer is not None and compensation(scorer, opts.compensate) is not None and opts.hessian != "identity"


def _score(step: Step, scorer, opts: PruneOptions, k: int, tag: str, ranked: bool, progress) -> None:
    """Calibration statistics (calibrated criteria), scores, and the criterion's compensation
    (``ranked``: the plan compares scores across groups, a global rank or a target)."""
    an = step.analysis
    stage = compensation(scorer, opts.compensate)
    if scorer.needs_calib:
        desc, feeds = synthetic.calibration(an, opts.calib, n_batches=opts.calib_batches,
                                            batch_size=opts.calib_batch_size, seed=opts.seed, wanted=opts.synthetic,
                                            progress=progress)
        # an OBS compensation of the same data takes its Hessians from this pass (hessians(stats=))
        moments = moment_axes(an, opts.allocate) if stage is not None and opts.hessian == "auto" else ()
        progress(f"calibrating on {desc}" + (f" (with the second moments of {len(moments)} weight inputs)"
                                             if moments else ""))
        step.stats = calib_mod.collect(an, feeds, progress=progress, source=desc, moments=moments)
    progress(f"{tag}scoring {sum(g.channels for g in an.groups if g.prunable)} channels in "
             f"{sum(g.prunable for g in an.groups)} prunable groups ({opts.criterion}, {opts.reduction})")
    step.scores = score(an, opts.criterion, stats=step.stats, reduction=opts.reduction,
                        normalisation=opts.normalisation, seed=opts.seed + k - 1,
                        grads=opts.grads if scorer.needs_grads else None)
    if stage is not None:
        step.compensation = stage(an, step.scores, opts, ranked, progress, stats=step.stats)


def _compensated(step: Step, removal: dict, progress=quiet):
    """``(model, channel model)`` that surgery cuts ``removal`` from: the criterion's compensation
    (obspa rewrites the kept weights, and may choose other units: ``removal`` is updated), or the
    analysis as it is."""
    if step.compensation is None:
        return step.analysis.model, step.analysis.channels
    return step.compensation.apply(removal, progress)


def _cut(step: Step, removal: dict):
    """The pruned model and its weights for ``removal`` (compensation, then surgery): what the
    fidelity search measures."""
    source, channels = _compensated(step, removal)
    return slicing.cut(source, channels, step.analysis.probe, all_units(removal))


def _plan(step: Step, first: Analysis, opts: PruneOptions, target, k: int, progress=quiet) -> None:
    """Which units go: a ratio per group (or global), or the threshold that reaches a target; with
    several steps each reaches its share."""
    an, n = step.analysis, opts.steps
    step.overrides = resolve_overrides(an.groups, opts.overrides)
    groups, roles = an.groups, None
    if opts.uniform_layers:
        roles = layerwise.layer_roles(an)
        if not roles:
            raise SpaError("--uniform-layers: no group runs through one numbered layer's projections (it needs "
                           "the module names a transformers export leaves: model.layers.N...)")
        groups = [g for g in an.groups if g.id in roles]
    round_to, widths = kept_multiples(an, opts.round_to, opts.device)
    opts = replace(opts, round_to=round_to)      # the allocations read it from the options
    common = dict(round_to=round_to, exclude=opts.exclude, max_ratio=opts.max_ratio)
    cost = step.cost or CostModel(an)
    if target is not None and target[0] == "fidelity":
        step.removal, step.plan = allocation.search(an, step.scores.normalised, target[1], opts,
                                                  lambda removal: _cut(step, removal), progress)
    elif target is not None:
        kind, factor = target
        base0 = first.macs if kind == "macs" else first.params
        now = an.macs if kind == "macs" else an.params
        goal = base0 / factor ** (k / n)
        rel = factor if kind == "latency" else max(now / goal, 1.0) if goal > 0 else 1.0
        if opts.allocate in ("uniform", "stacks"):
            position = {node.name: i for i, node in enumerate(an.model.graph.node)}
            spared = () if opts.uniform_layers else stack_ends(groups, position, *opts.keep_ends)  # one width per kind
            uniform = dict(overrides=step.overrides, unscored=step.scores.notes, spared=spared, **common)
            if opts.allocate == "stacks":
                step.removal, step.plan = plan_stacks(groups, step.scores.normalised, cost, (kind, rel),
                                                      lambda removal: step.compensation.residuals(removal, progress),
                                                      position=position, **uniform)
            else:
                step.removal, step.plan = plan_uniform(groups, step.scores.normalised, cost, (kind, rel), **uniform)
        else:
            step.removal, step.plan = plan_target(groups, step.scores.normalised, cost, (kind, rel),
                                                  overrides=step.overrides, **common)
        if opts.allocate == "sensitivity":
            left = cost.base[kind] / rel if kind == "latency" else int(goal)
            step.sensitivity = step.sensitivity or allocation.Table(an, step.scores.normalised, opts, progress, kind, cost)
            step.removal, sens = allocation.allocate(an, step.scores.normalised, kind, left, opts,
                                                     lambda removal: _cut(step, removal), step.removal, progress,
                                                     table=step.sensitivity)
            step.plan = {**sens, "global_plan": step.plan}
    else:
        r = 1.0 - (1.0 - opts.ratio) ** (1.0 / n)
        stepped = {g: 1.0 - (1.0 - v) ** (1.0 / n) for g, v in step.overrides.items()}
        step.removal = make_plan(groups, step.scores.normalised, r, global_rank=opts.global_rank,
                                 overrides=stepped, **common)
    if roles is not None:
        step.removal, info = layerwise.equalise(an.groups, step.scores.normalised, step.removal, roles, round_to)
        step.plan = {**step.plan, "uniform_layers": info}
    step.widths = widths


def _compensation_key(opts) -> str:
    """Where the report keeps the compensation's record: under the criterion's name when it is the
    criterion's own (obspa), else under ``compensation``."""
    return opts.criterion if CRITERIA[opts.criterion].compensation is not None else "compensation"


def _report(first: Analysis, history: list, pruned, after, opts: PruneOptions, target) -> dict:
    """The prune report: options, sizes before and after, and every group of the last step."""
    last = history[-1]
    sc, removal, fixed = last.scores, last.removal, last.overrides
    report = {
        "criterion": opts.criterion, "reduction": sc.reduction, "normalisation": sc.normalisation,
        "ratio": None if target else opts.ratio, "global": bool(opts.global_rank or target),
        "round_to": opts.round_to, "widths": last.widths, "exclude": opts.exclude, "max_ratio": opts.max_ratio,
        "steps": opts.steps,
        "seed": opts.seed,
        "before": {"params": first.params, "macs": first.macs},
        "after": {"params": count_params(pruned), "macs": count_macs(pruned, after.shapes)},
        "groups": [],
    }
    layers = layer_report(first.model, first.probe.shapes, pruned, after.shapes)
    if layers:
        report["layers"] = layers
    if opts.prune_io:
        report["prune_io"] = opts.prune_io
        report["interface"] = interface_changes(first.model, pruned)
    if target:
        report["target"] = f"{target[0]}={target[1]:g}"
        reached = last.plan.get("measured", 1.0) if target[0] == "fidelity" else \
            last.plan["latency"]["measured_speedup"] if target[0] == "latency" else \
            first.macs / max(report["after"]["macs"], 1) if target[0] == "macs" \
            else first.params / max(report["after"]["params"], 1)
        report["target_reached"] = round(reached, 4)
        report["target_reachable"] = all(s.plan.get("reachable", True) for s in history)
        report["plan"] = last.plan
    if "uniform_layers" in last.plan:
        report["uniform_layers"] = last.plan["uniform_layers"]
    if last.stats is not None:
        st = last.stats
        report["calibration"] = {"source": st.source, "samples": st.samples, "batches": st.batches,
                                 "tensors": len(st.axes)}
    if last.compensation is not None:
        report[_compensation_key(opts)] = last.compensation.report()
    if fixed:
        report["overrides"] = {str(k): v for k, v in fixed.items()}
    if sc.notes:
        report["fallbacks"] = {str(k): v for k, v in sc.notes.items()}
    if opts.steps > 1:
        report["step_summaries"] = [
            {"step": i + 1, "params": s.analysis.params, "macs": s.analysis.macs,
             "removed": int(sum(len(v) for v in s.removal.values())), **({"plan": s.plan} if s.plan else {})}
            for i, s in enumerate(history)]
    for g in last.analysis.groups:
        entry = g.summary()
        gone = removal.get(g.id, np.zeros(0, np.int64))
        entry.update(kept=g.channels - len(gone), removed=int(len(gone)),
                     removed_channels=[int(np.searchsorted(g.units, u)) for u in gone])
        if g.prunable:
            entry.update(criterion=opts.criterion, reduction=sc.reduction,
                         scores=[round(float(s), 6) for s in sc.normalised[g.units]])
            if g.id in sc.notes:
                entry["fallback"] = sc.notes[g.id]
            if g.id in fixed:
                entry["override"] = fixed[g.id]
            extra = last.compensation.group_report(g.id) if last.compensation is not None else None
            if extra is not None:
                entry[_compensation_key(opts)] = extra
        report["groups"].append(entry)
    return report
