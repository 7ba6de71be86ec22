"""The OBS compensation as a stage of the prune pipeline (``spa.api``): the consumers and Hessians of
every group, obspa's selection, the residual a plan costs, and ``apply``, which removes a plan's
channels and compensates the kept weights of their consumers.  The machinery (consumers, Hessians,
the OBS problem of a group) is ``spa.scoring.obspa``'s."""
from __future__ import annotations

import numpy as np

from ..errors import SpaError
from ..io.weights import put as put_weight, trim_heap
from ..progress import quiet as _quiet, stepper
from ..runtime import textgen
from .magnitude import normalise
from .obs import obs_group
from .obspa import (DAMP, DTYPE, SELECTIONS, diagonal_scores, find_consumers, group_consumers, group_scores,
                    hessians, kept_whole, problem, prune_groups)


def selection(an, how: str = "auto") -> tuple[str, str]:
    """``(selection, why)`` of obspa for ``--obs-selection`` ``how`` (see the module doc)."""
    if how not in SELECTIONS:
        raise SpaError(f"--obs-selection must be one of {', '.join(SELECTIONS)}, got {how!r}")
    if how != "auto":
        return how, ""
    if textgen.causal_lm(an) is not None:
        return "diagonal", "auto: a causal language model"
    return "obs", "auto"


class Compensation:
    """OBS compensation in the prune pipeline: consumers and Hessians of every group, and ``apply``,
    which removes a plan's channels and compensates the kept weights of their consumers.

    ``choose=True`` is ``criterion='obspa'``, with its selection (``opts.obs_selection``, see the module
    doc): under ``obs``, with a global plan or a target (``ranked``) the groups' scores become their
    single-removal OBS costs (a local ratio needs only counts), and ``apply`` lets OBS choose which
    channels go, as many per group as the plan says; under ``diagonal`` the scores become the
    uncompensated diagonal costs and the plan's channels go.  ``choose=False`` is ``--compensate obs``
    under another criterion: that criterion's channels go, and OBS only compensates (the
    least-squares update of the kept weights for exactly that set).  ``damp``: the ridge added to
    every Hessian, a multiple of its mean diagonal (``DAMP`` by default)."""

    def __init__(self, an, scores, opts, ranked, progress=_quiet, choose=True, stats=None):
        self.an, self.scores, self.hessian = an, scores, opts.hessian
        self.selection, self.why = selection(an, opts.obs_selection) if choose else ("criterion", "")
        self.damp = DAMP if opts.damp is None else float(opts.damp)
        consumers, self.skipped = find_consumers(an)
        self.per_group = group_consumers(an, consumers)
        whole = kept_whole(an, opts.allocate)     # no costs, no Hessians for them
        self.per_group = {gid: items for gid, items in self.per_group.items() if gid not in whole}
        used = [c for items in self.per_group.values() for c, _ in items]
        progress(f"obs: {len(used)} consumer weights in {len(self.per_group)} groups; Hessians: {opts.hessian}")
        self.hs = hessians(an, used, opts.hessian, opts.calib, n_batches=opts.calib_batches,
                           batch_size=opts.calib_batch_size, seed=opts.seed, progress=progress,
                           synthetic_kind=opts.synthetic, stats=stats)
        self.results, self.released = {}, False
        for g in an.groups:
            if g.prunable and g.id in whole:
                scores.notes[g.id] = "approximate, kept whole by the uniform allocation: not scored by OBS"
            elif g.prunable and g.id not in self.per_group:
                scores.notes[g.id] = ("obspa: no consumer weight modelled; l2, not compensated" if choose
                                      else "obs: no consumer weight modelled; not compensated")
        costs = None
        if self.selection == "diagonal":       # the plan picks by these, for a ratio too
            costs = diagonal_scores(an, self.per_group, self.hs, progress=progress)
        elif self.selection == "obs" and ranked:
            costs = group_scores(an, self.per_group, self.hs, damp=self.damp, progress=progress)
        if costs is not None:
            groups = {g.id: g for g in an.groups}
            for gid, s in costs.items():
                scores.raw[groups[gid].units] = s
            scores.normalised = normalise(scores.raw, an.groups, scores.normalisation)

    def apply(self, removal, progress=_quiet):
        """The model and channel model carrying the compensated weights; with ``choose``, OBS's choice
        of channels (``removal`` is updated in place)."""
        import dataclasses
        import onnx
        if self.released:
            raise RuntimeError("Compensation.apply after release(): the Hessians are gone")
        an, sc = self.an, self.scores
        groups = {g.id: g for g in an.groups}
        counts = {gid: len(u) for gid, u in removal.items()}
        greedy = self.selection == "obs"
        chosen = None if greedy else {gid: np.searchsorted(groups[gid].units, u) for gid, u in removal.items()}
        self.results, new = prune_groups(an, self.per_group, self.hs, counts, damp=self.damp, progress=progress,
                                         chosen=chosen)
        if greedy:
            for gid, r in self.results.items():
                units = groups[gid].units
                removal[gid] = units[r.removed]
                if len(r.first_costs) == len(units):
                    sc.raw[units] = r.first_costs
            sc.normalised = normalise(sc.raw, an.groups, sc.normalisation)
        if not new:
            return an.model, an.channels
        model = onnx.ModelProto()
        model.CopyFrom(an.model)   # big weights are stubs (spa.io.weights): a small copy
        consts = dict(an.channels.consts)
        for init in model.graph.initializer:
            if init.name in new:
                put_weight(model, consts, init.name, new[init.name], tensor=init)
        return model, dataclasses.replace(an.channels, consts=consts)

    def residuals(self, removal, progress=_quiet) -> dict:
        """``{group id: OBS residual}`` of removing exactly ``removal[gid]`` (units) from each group alone,
        original weights, the kept ones compensated: the calibration loss (the squared error of the
        group's consumers' outputs on the Hessians' data) the plan would cost.  ``--allocate stacks``
        weighs stacks by it (``planning.plan.plan_stacks``)."""
        groups = {g.id: g for g in self.an.groups}
        todo = [gid for gid, u in removal.items() if len(u) and self.per_group.get(gid)]
        tick = stepper(progress, len(todo), "obs: residual of the uniform share, group")
        out = {}
        for i, gid in enumerate(todo):
            tick(i)
            units = groups[gid].units
            probs = [p for p in (problem(c, owner, len(units), self.an.channels.consts, {}, self.hs)
                                 for c, owner in self.per_group[gid]) if p]
            if probs:
                local = np.searchsorted(units, removal[gid])
                out[gid] = obs_group([p[:4] for p in probs], len(local), damp=self.damp, dtype=DTYPE,
                                     return_info=True, chosen=local)[2]["cost"]
        return out

    def release(self) -> None:
        """Drop the Hessians once the step's cut is final: they are the largest thing a compensated prune
        holds (SmolLM2-135M: 60 matrices, 323 MB), and validation, the guard and the write come after.
        ``apply`` cannot run again; the report needs only what ``results`` and ``hs.desc`` keep."""
        self.hs.H.clear()
        self.hs.mean.clear()
        self.released = True
        trim_heap()

    def report(self) -> dict:
        return {"hessian": self.hessian, "source": self.hs.desc, "damp": self.damp,
                "selection": self.selection + (f" ({self.why})" if self.why else ""), "not_modelled": self.skipped}

    def group_report(self, gid):
        r = self.results.get(gid)
        return None if r is None else {"cost": r.cost, "hessian": r.sources, "inverse": sorted(set(r.how))}
