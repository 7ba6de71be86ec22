"""The library entry points: ``spa.analyze`` and ``spa.prune`` (the CLI only calls these)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import io, probing, surgery
from .counting import count_macs, count_params, mac_axes, node_macs
from .errors import SpaError
from .graph.channels import ChannelModel, build
from .plan import plan as make_plan
from .scoring import CRITERIA


def _quiet(msg):
    pass


@dataclass
class Analysis:
    """A prepared model with its channel model: what ``spa inspect`` shows."""
    model: onnx.ModelProto
    probe: probing.Probe
    channels: ChannelModel
    params: int
    macs: int
    seconds: float = 0.0

    @property
    def groups(self):
        return self.channels.groups

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


def analyze(model, *, input_shapes=None, progress=_quiet) -> Analysis:
    """Load, normalise and probe ``model`` (path or ModelProto) and find its channel groups."""
    t0 = time.perf_counter()
    progress("loading and probing the model in onnxruntime")
    proto, pr = probing.prepare(model, input_shapes)
    progress(f"building the channel model ({len(proto.graph.node)} nodes)")
    cm = build(proto, pr)
    _attribute_costs(cm, proto, pr)
    return Analysis(proto, pr, cm, count_params(proto), count_macs(proto, pr.shapes),
                    time.perf_counter() - t0)


def _attribute_costs(cm: ChannelModel, proto, pr) -> None:
    """Params and MACs each group owns (what removing all of it would save, first order)."""
    per_atom_params = np.zeros(cm.n_atoms)
    for name, value in cm.consts.items():
        if not np.issubdtype(value.dtype, np.floating):
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


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)


def prune(model, ratio: float = 0.3, *, criterion: str = "l2", reduction: str = "sum",
          normalisation: str | None = None, global_rank: bool = False, round_to: int = 1,
          exclude: str | None = None, max_ratio: float = 0.9, target=None, overrides=None, steps: int = 1,
          calib=None, calib_batches: int = 8, calib_batch_size: int | None = None, seed: int = 0,
          hessian: str = "auto", input_shapes=None, output=None, progress=_quiet,
          analysis: Analysis | None = None) -> PruneResult:
    """Remove channels from ``model`` and return the smaller model with a report.

    ``ratio`` removes that fraction of every prunable group (or, with ``global_rank``, of all
    channels ranked together); ``target`` ('macs=2', 'params=1.5') instead searches the global
    threshold that reaches that reduction factor.  ``overrides`` ({group id or node regex: ratio}
    or a JSON path) fixes some groups' ratios; ``steps`` > 1 prunes iteratively, re-analysing and
    re-scoring the pruned model each step.  Calibrated criteria (act_mean, wanda, flap) need
    ``calib`` ('random', or a .npz/.npy path).  ``criterion='obspa'`` chooses channels by Optimal
    Brain Surgeon cost and compensates the kept weights, with Hessians from ``hessian`` ('auto',
    'synthetic', 'bn', 'identity'; ``calib`` data when given).  With ``output`` the validated model
    is written there.
    """
    from . import calib as calib_mod
    from .plan import CostModel, parse_target, plan_target, resolve_overrides
    from .scoring import score
    scorer = CRITERIA.get(criterion)
    if scorer is None:
        raise SpaError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if scorer.needs_calib and calib is None:
        raise SpaError(f"criterion {criterion!r} needs calibration data: pass --calib FILE.npz or --calib random")
    if steps < 1:
        raise SpaError(f"--steps must be >= 1, got {steps}")
    tgt = parse_target(target)
    if tgt is None and not 0.0 <= ratio < 1.0:
        raise SpaError(f"--ratio must be in [0, 1), got {ratio}")
    t0 = time.perf_counter()
    an = analysis or analyze(model, input_shapes=input_shapes, progress=progress)
    first = an
    history, current, after_probe = [], an.model, an.probe
    for step in range(1, steps + 1):
        if step > 1:
            progress(f"step {step}/{steps}: re-analysing the pruned model")
            an = analyze(current, input_shapes=input_shapes, progress=progress)
        cm = an.channels
        tag = f"step {step}/{steps}: " if steps > 1 else ""
        stats = None
        if scorer.needs_calib:
            stats = calib_mod.gather(an, calib, n_batches=calib_batches, batch_size=calib_batch_size,
                                     seed=seed, progress=progress)
        progress(f"{tag}scoring {sum(g.channels for g in an.groups if g.prunable)} channels in "
                 f"{sum(g.prunable for g in an.groups)} prunable groups ({criterion}, {reduction})")
        sc = score(an, criterion, stats=stats, reduction=reduction, normalisation=normalisation, seed=seed + step - 1)
        obs = None
        if criterion == "obspa":
            obs = _obspa_setup(an, sc, hessian, calib, global_rank or tgt is not None, calib_batches,
                               calib_batch_size, seed, progress)
        fixed = resolve_overrides(an.groups, overrides)
        info = {}
        if tgt is not None:
            kind, factor = tgt
            base0 = first.macs if kind == "macs" else first.params
            now = an.macs if kind == "macs" else an.params
            goal = base0 / factor ** (step / steps)
            rel = max(now / goal, 1.0) if goal > 0 else 1.0
            removal, info = plan_target(an.groups, sc.normalised, CostModel(an), (kind, rel), round_to=round_to,
                                        exclude=exclude, max_ratio=max_ratio, overrides=fixed)
        else:
            r = 1.0 - (1.0 - ratio) ** (1.0 / steps)
            stepped = {k: 1.0 - (1.0 - v) ** (1.0 / steps) for k, v in fixed.items()}
            removal = make_plan(an.groups, sc.normalised, r, global_rank=global_rank, round_to=round_to,
                                exclude=exclude, max_ratio=max_ratio, overrides=stepped)
        source = an.model
        if obs is not None:
            source, cm = _obspa_apply(an, sc, obs, removal, progress)
        units = np.concatenate(list(removal.values())) if removal else np.zeros(0, np.int64)
        progress(f"{tag}removing {len(units)} channels from {len(removal)} groups")
        if len(units):
            current = surgery.apply(source, cm, an.probe, units)
            progress("validating the pruned model in onnxruntime")
            after_probe = validate(current, first, input_shapes)
        history.append((an, sc, removal, fixed, info, stats, obs))
    pruned = current
    an, sc, removal, fixed, info, stats, obs = history[-1]
    report = {
        "criterion": criterion, "reduction": sc.reduction, "normalisation": sc.normalisation,
        "ratio": None if tgt else ratio, "global": bool(global_rank or tgt), "round_to": round_to,
        "exclude": exclude, "max_ratio": max_ratio, "steps": steps, "seed": seed,
        "before": {"params": first.params, "macs": first.macs},
        "after": {"params": count_params(pruned), "macs": count_macs(pruned, after_probe.shapes)},
        "groups": [],
    }
    if tgt:
        report["target"] = f"{tgt[0]}={tgt[1]:g}"
        reached = first.macs / max(report["after"]["macs"], 1) if tgt[0] == "macs" \
            else first.params / max(report["after"]["params"], 1)
        report["target_reached"] = round(reached, 4)
        report["target_reachable"] = all(h[4].get("reachable", True) for h in history)
        report["plan"] = info
    if stats is not None:
        report["calibration"] = {"source": stats.source, "samples": stats.samples, "batches": stats.batches,
                                 "tensors": len(stats.axes)}
    if obs is not None:
        report["obspa"] = {"hessian": hessian, "source": obs["hs"].desc, "damp": obs["damp"],
                           "not_modelled": obs["skipped"]}
    if fixed:
        report["overrides"] = {str(k): v for k, v in fixed.items()}
    if sc.notes:
        report["fallbacks"] = {str(k): v for k, v in sc.notes.items()}
    if steps > 1:
        report["step_summaries"] = [
            {"step": i + 1, "params": h[0].params, "macs": h[0].macs,
             "removed": int(sum(len(v) for v in h[2].values())), **({"plan": h[4]} if h[4] else {})}
            for i, h in enumerate(history)]
    for g in an.groups:
        entry = g.summary()
        gone = removal.get(g.id, np.zeros(0, np.int64))
        entry.update(kept=g.channels - len(gone), removed=int(len(gone)),
                     removed_channels=[int(np.searchsorted(g.units, u)) for u in gone])
        if g.prunable:
            entry.update(criterion=criterion, reduction=sc.reduction,
                         scores=[round(float(s), 6) for s in sc.normalised[g.units]])
            if g.id in sc.notes:
                entry["fallback"] = sc.notes[g.id]
            if g.id in fixed:
                entry["override"] = fixed[g.id]
            if obs is not None and g.id in obs["results"]:
                r = obs["results"][g.id]
                entry["obspa"] = {"cost": r.cost, "hessian": r.sources, "inverse": sorted(set(r.how))}
        report["groups"].append(entry)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if output is not None:
        io.save_model(pruned, output)
        report["output"] = str(output)
    return PruneResult(pruned, report)


def _obspa_setup(an, sc, hessian, calib, need_scores, n_batches, batch_size, seed, progress) -> dict:
    """Consumers and Hessians of every group; with a global plan or a target, the groups' scores
    become their single-removal OBS costs (a local ratio needs only counts: the greedy picks)."""
    from .scoring import normalise, obspa
    consumers, skipped = obspa.find_consumers(an)
    per_group = obspa.group_consumers(an, consumers)
    used = [c for items in per_group.values() for c, _ in items]
    progress(f"obspa: {len(used)} consumer weights in {len(per_group)} groups; Hessians: {hessian}")
    hs = obspa.hessians(an, used, hessian, calib, n_batches=n_batches, batch_size=batch_size, seed=seed,
                        progress=progress)
    for g in an.groups:
        if g.prunable and g.id not in per_group:
            sc.notes[g.id] = "obspa: no consumer weight modelled; l2, not compensated"
    if need_scores:
        progress("obspa: single-removal costs of every channel")
        groups = {g.id: g for g in an.groups}
        for gid, s in obspa.group_scores(an, per_group, hs).items():
            sc.raw[groups[gid].units] = s
        sc.normalised = normalise(sc.raw, an.groups, sc.normalisation)
    return {"per_group": per_group, "hs": hs, "skipped": skipped, "damp": obspa.DAMP, "results": {}}


def _obspa_apply(an, sc, obs, removal, progress):
    """Let OBS choose which channels go (as many per group as the plan says) and compensate the
    kept weights; returns the model and channel model carrying the compensated weights."""
    import dataclasses
    from .scoring import normalise, obspa
    counts = {gid: len(u) for gid, u in removal.items()}
    results, new = obspa.prune_groups(an, obs["per_group"], obs["hs"], counts, progress=progress)
    groups = {g.id: g for g in an.groups}
    for gid, r in results.items():
        units = groups[gid].units
        removal[gid] = units[r.removed]
        if len(r.first_costs) == len(units):
            sc.raw[units] = r.first_costs
    sc.normalised = normalise(sc.raw, an.groups, sc.normalisation)
    obs["results"] = results
    if not new:
        return an.model, an.channels
    model = onnx.ModelProto()
    model.CopyFrom(an.model)
    for init in model.graph.initializer:
        if init.name in new:
            init.CopyFrom(onnx.numpy_helper.from_array(new[init.name], init.name))
    return model, dataclasses.replace(an.channels, consts={**an.channels.consts, **new})


def validate(pruned: onnx.ModelProto, an: Analysis, input_shapes=None, *, every_size: bool = True) -> probing.Probe:
    """onnx.checker, then onnxruntime runs at every size the analysis ran the original at (the
    probe sizes and, for dynamic inputs, every symbol moved up and down): the pruned model must run
    and give the original's output shapes at each, and where the inputs have a batch, a batch's
    first row must equal that row run alone.  A failure is a one-line SpaError naming the sizes.
    ``every_size=False`` checks the probe sizes only (the oracle, which compares at several)."""
    if io.model_size(pruned) < 2_000_000_000:
        try:
            io.check_model(pruned)
        except onnx.checker.ValidationError as exc:
            if _checker_ok(an.model):  # only complain about what pruning broke
                raise SpaError(f"internal: pruned model fails onnx.checker ({str(exc).splitlines()[0]})") from None
    if input_shapes is None:  # the sizes the analysis ran with
        input_shapes = {k: list(np.shape(v)) for k, v in an.probe.inputs.items()}
    try:
        pr = probing.probe(pruned, input_shapes, dynamic=False)
    except SpaError as exc:
        raise SpaError(f"internal: pruned model does not run in onnxruntime: {exc}") from None
    for out in an.model.graph.output:
        if pr.shapes.get(out.name) != an.probe.shapes.get(out.name):
            raise SpaError(f"internal: output '{out.name}' changed shape "
                           f"{an.probe.shapes.get(out.name)} -> {pr.shapes.get(out.name)}")
    if every_size:
        _validate_other_sizes(pruned, an, pr)
    return pr


def _validate_other_sizes(pruned, an: Analysis, pr: probing.Probe) -> None:
    plan, points, ref = an.probe.plan, an.probe.points[1:], an.probe.other_shapes
    if plan is None or not points:
        return
    runner = probing.output_runner(pruned, pr.consts)
    outputs = [o.name for o in pruned.graph.output]
    rows_checked = False
    for point, ref_shapes in zip(points, ref):
        where = plan.describe(point)
        feed = probing.input_feed(pruned, plan=plan, values=point, seed=1)
        try:
            got = runner.run(feed)
        except Exception as exc:
            raise SpaError(f"pruned model fails at {where} ({probing.ort_reason(exc)}); spa would not write it: "
                           "please report this model") from None
        for name in outputs:
            if name in ref_shapes and tuple(np.shape(got[name])) != ref_shapes[name]:
                raise SpaError(f"pruned model: output '{name}' is {list(np.shape(got[name]))} at {where}, "
                               f"the original's is {list(ref_shapes[name])}; spa would not write it")
        if not rows_checked:
            rows_checked = _check_batch_rows(runner, plan, point, feed, got, where)


def _check_batch_rows(runner, plan, point, feed, got, where) -> bool:
    """Row 0 of a batch run equals row 0 run alone (a size frozen at the probe's batch shows here).
    False when the inputs and outputs have no common batch dim to check."""
    batch = [s for s in plan.symbols if s in plan.batch and point[s] > 1]
    if not batch or any(plan.dims[(name, 0)] != ("sym", batch[0]) for name in feed):
        return False
    n = point[batch[0]]
    if any(np.ndim(v) == 0 or np.shape(v)[0] != n for v in got.values()):
        return False
    alone = runner.run({k: v[:1] for k, v in feed.items()})
    for name, v in got.items():
        a, b = np.asarray(v[:1], np.float64), np.asarray(alone[name], np.float64)
        if a.shape != b.shape:
            raise SpaError(f"pruned model: output '{name}' row 0 has shape {list(b.shape)} alone and "
                           f"{list(a.shape)} in a batch at {where}; spa would not write it")
        scale = max(np.abs(b).max(initial=0.0), 1e-3)
        if np.abs(a - b).max(initial=0.0) > 1e-3 * scale:
            raise SpaError(f"pruned model: output '{name}' row 0 differs between a batch of {n} and a batch of 1 "
                           f"({where}); a size is frozen somewhere; spa would not write it: please report this model")
    return True


def _checker_ok(proto) -> bool:
    try:
        io.check_model(proto)
        return True
    except onnx.checker.ValidationError:
        return False
