"""The library entry points: ``spa.analyze`` and ``spa.prune`` (the CLI only calls these)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import io, surgery
from .counting import count_macs, count_params, node_macs
from .errors import SpaError
from .graph.channels import ChannelModel, build
from .plan import plan as make_plan
from .scoring import CRITERIA, magnitude_scores, normalise


def _quiet(msg):
    pass


@dataclass
class Analysis:
    """A prepared model with its channel model: what ``spa inspect`` shows."""
    model: onnx.ModelProto
    probe: io.Probe
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
    proto, pr = io.prepare(model, input_shapes)
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
        for axis in _mac_axes(node, pr.shapes):
            got = cm.axis_index.get(axis)
            if got is not None and got[1] > 1:
                per_atom_macs[got[0]:got[0] + got[1]] += macs / got[1]
    unit_params = np.bincount(cm.pair_unit, weights=per_atom_params[cm.pair_atom], minlength=cm.n_units)
    unit_macs = np.bincount(cm.pair_unit, weights=per_atom_macs[cm.pair_atom], minlength=cm.n_units)
    for g in cm.groups:
        g.params = int(round(unit_params[g.units].sum()))
        g.macs = int(round(unit_macs[g.units].sum()))


def _mac_axes(node, shapes):
    """The input-channel and output-channel axes whose sizes MACs scale with."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return [(node.input[1], 0), (node.input[1], 1)]
    y = node.output[0]
    r = len(shapes.get(y, ()))
    a = node.input[0]
    ra = len(shapes.get(a, ()))
    if node.op_type == "Gemm":
        ta = any(at.name == "transA" and at.i for at in node.attribute)
        return [(a, 0 if ta else 1), (y, 1)]
    return [(a, ra - 1), (y, r - 1)]


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)


def prune(model, ratio: float = 0.3, *, criterion: str = "l2", global_rank: bool = False,
          round_to: int = 1, exclude: str | None = None, max_ratio: float = 0.9,
          input_shapes=None, output=None, progress=_quiet, analysis: Analysis | None = None) -> PruneResult:
    """Remove ``ratio`` of the channels of every prunable group (or globally) and return the model.

    ``model`` is a path or an ``onnx.ModelProto``; with ``output`` the validated model is written
    there atomically.  The report holds params and MACs before and after and one entry per group.
    """
    if criterion not in CRITERIA:
        raise SpaError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    t0 = time.perf_counter()
    an = analysis or analyze(model, input_shapes=input_shapes, progress=progress)
    cm = an.channels
    progress(f"scoring {sum(g.channels for g in an.groups if g.prunable)} channels in "
             f"{sum(g.prunable for g in an.groups)} prunable groups ({criterion})")
    raw = magnitude_scores(cm, criterion)
    scores = normalise(raw, an.groups)
    removal = make_plan(an.groups, scores, ratio, global_rank=global_rank, round_to=round_to,
                        exclude=exclude, max_ratio=max_ratio)
    units = np.concatenate(list(removal.values())) if removal else np.zeros(0, np.int64)
    progress(f"removing {len(units)} channels from {len(removal)} groups")
    pruned = surgery.apply(an.model, cm, an.probe, units)
    progress("validating the pruned model in onnxruntime")
    after_probe = validate(pruned, an, input_shapes)
    report = {
        "criterion": criterion, "reduction": "sum", "normalisation": "mean",
        "ratio": ratio, "global": global_rank, "round_to": round_to, "exclude": exclude,
        "before": {"params": an.params, "macs": an.macs},
        "after": {"params": count_params(pruned), "macs": count_macs(pruned, after_probe.shapes)},
        "groups": [],
    }
    for g in an.groups:
        entry = g.summary()
        gone = removal.get(g.id, np.zeros(0, np.int64))
        entry.update(kept=g.channels - len(gone), removed=int(len(gone)),
                     removed_channels=[int(np.searchsorted(g.units, u)) for u in gone])
        if g.prunable:
            entry["scores"] = [round(float(s), 6) for s in scores[g.units]]
        report["groups"].append(entry)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if output is not None:
        io.save_model(pruned, output)
        report["output"] = str(output)
    return PruneResult(pruned, report)


def validate(pruned: onnx.ModelProto, an: Analysis, input_shapes=None) -> io.Probe:
    """onnx.checker + an onnxruntime run with unchanged output shapes, or SpaError."""
    if pruned.ByteSize() < 2_000_000_000:
        try:
            onnx.checker.check_model(pruned)
        except onnx.checker.ValidationError as exc:
            if _checker_ok(an.model):  # only complain about what pruning broke
                raise SpaError(f"internal: pruned model fails onnx.checker ({str(exc).splitlines()[0]})") from None
    try:
        pr = io.probe(pruned, input_shapes)
    except SpaError as exc:
        raise SpaError(f"internal: pruned model does not run in onnxruntime: {exc}") from None
    for out in an.model.graph.output:
        if pr.shapes.get(out.name) != an.probe.shapes.get(out.name):
            raise SpaError(f"internal: output '{out.name}' changed shape "
                           f"{an.probe.shapes.get(out.name)} -> {pr.shapes.get(out.name)}")
    return pr


def _checker_ok(proto) -> bool:
    try:
        onnx.checker.check_model(proto)
        return True
    except onnx.checker.ValidationError:
        return False
