"""``--target fidelity=C`` and ``--allocate sensitivity``: channels allocated across groups by the drift
they cause, verified.

The drift (1 - fidelity, ``spa.planning.fidelity``) of removing the lowest-scored fractions of each
group alone is measured in one onnxruntime session with channel masks (``MaskedModel``); a greedy
path deepens the group that buys the most MACs per unit of drift (``greedy_path``); ``search``
bisects along it, pruning each candidate for real, to the longest prefix that keeps fidelity >= C,
and ``allocate`` spends a MACs or params budget along it.
"""
from __future__ import annotations

import numpy as np

from ..graph.masks import insert_masks
from ..io import initializer_arrays
from ..progress import stepper
from ..runtime import probing, textgen
from .fidelity import batch_macs, batch_rows, drift_of, eval_feeds, fidelity_on, meets, metrics_for, reference_runs
from .plan import CostModel, all_units, multiple, n_remove, plan as local_plan, resolve_overrides, selectable


#: fractions of a group the sensitivity table tries (the lowest-scored channels first)
FRACTIONS = (0.0625, 0.125, 0.25, 0.375, 0.5, 0.75)


class MaskedModel:
    """The original with every contraction input of the channel model multiplied by a 0/1 mask fed at
    run time (``Where`` at the zero point for a quantized input): any removal is one run of one
    onnxruntime session, no surgery.  For exact groups this is the pruned model (the exactness oracle's
    cut); for approximate ones (a norm or softmax over the axis) an estimate."""

    def __init__(self, an):
        proto = type(an.model)()
        proto.CopyFrom(an.model)
        prunable = [g.units for g in an.groups if g.prunable]
        may_go = an.channels.removed_atoms(np.concatenate(prunable) if prunable else np.zeros(0, np.int64))
        self.cm, self.masks = an.channels, insert_masks(an, proto, may_go, as_inputs=True)
        self.runner = probing.output_runner(proto, an.probe.consts)

    def run(self, feed, units) -> dict:
        mask = self.cm.removed_atoms(np.asarray(units, np.int64))
        feed = dict(feed)
        for name, off, size, shape, dtype in self.masks:
            feed[name] = (~mask[off:off + size]).astype(dtype).reshape(shape)
        return self.runner.run(feed)


def _kept_multiple(k, round_to, gid, n, max_ratio) -> int:
    """``k`` units to remove from group ``gid`` of ``n``, moved so that the kept count honours --round-to."""
    return n_remove(n, k, multiple(round_to, gid), max_ratio)




def sensitivity(an, scores, chosen, masked, feeds, reference, *, round_to=1, max_ratio=0.9, progress=None,
                metrics=None):
    """``({group id: [(units removed, drift)] per level}, {group id: units lowest-scored first})``:
    the drift (1 - fidelity) of removing the lowest-scored ``FRACTIONS`` of each group alone."""
    table, orders = {}, {}
    step = stepper(progress, len(chosen), "sensitivity: group")
    for i, g in enumerate(chosen):
        step(i, f"{g.channels} channels")
        order = g.units[np.argsort(scores[g.units], kind="stable")]
        orders[g.id] = order
        levels, seen = [], set()
        for f in FRACTIONS:
            k = n_remove(g.channels, int(np.floor(g.channels * f)), multiple(round_to, g.id), max_ratio)
            if k <= 0 or k in seen:
                continue
            seen.add(k)
            units = np.sort(order[:k])
            levels.append((units, drift_of(reference, (masked.run(fd, units) for fd in feeds), metrics, feeds)))
        table[g.id] = levels
    return table, orders


def greedy_path(levels, saved) -> list:
    """The order in which a greedy allocation deepens groups: each step raises one group to the
    level (any deeper one) that buys the most MACs per unit of measured drift, given where every
    group stands.  Removals along the path are nested, so fidelity falls (nearly) monotonically
    along it and a bisection over its prefix lands close to a target.  ``levels[gid]``: [(units,
    drift)]; ``saved[gid][j]``: MACs saved at level j.  Returns [(gid, level)]."""
    level = {gid: -1 for gid in levels}
    out = []
    while True:
        best = None
        for gid, lv in levels.items():
            cur = level[gid]
            d0 = lv[cur][1] if cur >= 0 else 0.0
            s0 = saved[gid][cur] if cur >= 0 else 0.0
            for j in range(cur + 1, len(lv)):
                dd, ds = max(lv[j][1] - d0, 1e-9), saved[gid][j] - s0
                if ds <= 0:
                    continue
                if best is None or ds / dd > best[0]:
                    best = (ds / dd, gid, j)
        if best is None:
            return out
        _, gid, j = best
        level[gid] = j
        out.append((gid, j))


class Table:
    """What the allocations read: the sensitivity table of the selectable groups (lowest-scored
    channels first), the MACs each level saves (``spa.planning.plan.CostModel``), the removal fixed by
    ``--overrides``, and the evaluation inputs with the original's outputs on them."""

    def __init__(self, an, scores, opts, progress=None, kind: str = "macs", cost=None):
        say = progress or (lambda msg: None)
        fixed = resolve_overrides(an.groups, opts.overrides)
        self.base = local_plan(an.groups, scores, 0.0, overrides=fixed, round_to=opts.round_to,
                               exclude=opts.exclude, max_ratio=opts.max_ratio) if fixed else {}
        chosen = [g for g in selectable(an.groups, opts.exclude) if g.id not in fixed]
        self.feeds, self.inputs = eval_feeds(an, opts)
        original = probing.output_runner(an.model, an.probe.consts)
        self.feeds, self.reference = reference_runs(original, self.feeds)
        self.metrics = metrics_for(an, opts, self.reference[0])
        few = sensitivity_batches(an, self.feeds)
        say(f"sensitivity: {len(chosen)} groups x {len(FRACTIONS)} fractions on {min(few, len(self.feeds))} "
            "input batches, one onnxruntime session with channel masks")
        self.levels, self.order = sensitivity(an, scores, chosen, MaskedModel(an), self.feeds[:few],
                                              self.reference[:few], round_to=opts.round_to,
                                              max_ratio=opts.max_ratio, progress=say, metrics=self.metrics)
        self.round_to, self.max_ratio = opts.round_to, opts.max_ratio
        self.cost, self.kind = cost or CostModel(an), kind     # a LatencyModel for latency=F
        self.base_cost = self.cost.base[kind]
        self.saved = {gid: [self.base_cost - self.cost.estimate(units)[kind] for units, _ in lv]
                      for gid, lv in self.levels.items()}

        self.path = greedy_path(self.levels, self.saved)

    def removal(self, steps: int, partial: int | None = None) -> dict:
        """The removal after the first ``steps`` steps of the greedy path (plus --overrides');
        ``partial``: the group of the next step loses its ``partial`` lowest-scored units instead."""
        at = {}
        for gid, j in self.path[:steps]:
            at[gid] = self.levels[gid][j][0]
        if partial is not None and steps < len(self.path):
            gid = self.path[steps][0]
            at[gid] = np.sort(self.order[gid][:partial])
        return {**self.base, **at}

    def partial_range(self, steps: int) -> tuple[int, int]:
        """(units removed before, at) the next step of the path, for its group."""
        gid, j = self.path[steps]
        before = max((len(self.levels[g][k][0]) for g, k in self.path[:steps] if g == gid), default=0)
        return before, len(self.levels[gid][j][0])

    def estimate(self, removal) -> int:
        """The cost (``kind``: MACs or params) left after ``removal``."""
        return self.cost.estimate(all_units(removal))[self.kind]

    def measure(self, proto, weights) -> float:
        runner = probing.output_runner(proto, initializer_arrays(proto, weights))
        return fidelity_on(self.reference, (runner.run(f) for f in self.feeds), self.metrics, self.feeds)


#: batches the sensitivity table is measured on (the verification uses all of ``eval_feeds``): 2, or
#: as many of ``eval_feeds`` as fit ``SENSITIVITY_MACS`` a run.  PaddleOCR's direction classifier
#: (16 lines of 16M MACs a batch), `--target macs=1.3 --criterion obspa --allocate sensitivity`, four
#: seeds, 400 held-out lines, verified on the guard's 16 batches: the table on 2 batches kept 80% of
#: the dense model's decisions (one seed 54%), on 8 batches 92% (5 s -> 16 s), on 16 92% (30 s)
SENSITIVITY_BATCHES = 2
SENSITIVITY_MACS = 2.2e9


def sensitivity_batches(an, feeds: list) -> int:
    """How many of ``feeds`` the sensitivity table is measured on (``SENSITIVITY_MACS``)."""
    if not feeds:
        return SENSITIVITY_BATCHES
    fit = int(SENSITIVITY_MACS // batch_macs(an, batch_rows(feeds[0])))
    return min(len(feeds), max(SENSITIVITY_BATCHES, fit))


def search(an, scores, target: float, opts, attempt, progress=None):
    """The removal that keeps the outputs at cosine >= ``target`` to the original's (measured on
    ``eval_feeds``) and removes the most MACs found: the sensitivity table gives a greedy path of
    nested removals (``greedy_path``); a bisection over its length prunes each candidate for real
    (``attempt(removal) -> (model, weights)``: the criterion's compensation and surgery) and keeps
    the longest prefix whose measured cosine is >= ``target``.  Returns ``(removal, plan report)``."""
    say = progress or (lambda msg: None)
    t = Table(an, scores, opts, say)
    lo, hi, tried = 0, len(t.path), []
    best = (t.removal(0), 1.0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        removal = t.removal(mid)
        fid = t.measure(*attempt({k: np.array(v) for k, v in removal.items()}))
        saved = t.base_cost - t.estimate(removal)
        tried.append({"steps": mid, "fidelity": round(fid, 6), "macs_saved": int(saved)})
        say(f"fidelity: {mid}/{len(t.path)} steps of the greedy path -> fidelity {fid:.4f}, "
            f"{saved / max(an.macs, 1):.1%} of the MACs removed")
        if meets(fid, target):
            lo, best = mid, (removal, fid)
        else:
            hi = mid - 1
    if lo < len(t.path):   # the next step went too far: take part of it (its group's lowest-scored units)
        a, b = t.partial_range(lo)
        while b - a > 1:
            gid = t.path[lo][0]
            k = _kept_multiple((a + b) // 2, t.round_to, gid, t.order[gid].size, t.max_ratio)
            if k <= a or k >= b:
                break
            removal = t.removal(lo, partial=k)
            fid = t.measure(*attempt({g: np.array(v) for g, v in removal.items()}))
            tried.append({"steps": lo, "partial": int(k), "fidelity": round(fid, 6),
                          "macs_saved": int(t.base_cost - t.estimate(removal))})
            say(f"fidelity: {lo} steps and {k} units of the next -> fidelity {fid:.4f}")
            if meets(fid, target):
                a, best = k, (removal, fid)
            else:
                b = k
    removal, fid = best
    return removal, {"target": f"fidelity={target:g}", "measured": round(fid, 6), "reachable": True,
                     "steps": lo, "path": len(t.path), "macs_saved_estimate": int(t.base_cost - t.estimate(removal)),
                     "rounds": tried, "inputs": t.inputs}


def allocate(an, scores, kind: str, goal: float, opts, attempt, alternative: dict, progress=None, table=None):
    """``--allocate sensitivity`` with a MACs or params target (``kind``, ``goal``: what may be left):
    the shortest prefix of the greedy path (least drift for the MACs or params saved) whose estimate
    reaches the goal, the last step taken in part.  Drift does not add up exactly (removals
    interact), so the result is pruned and measured beside ``alternative`` (the global threshold's
    or the uniform fraction's removal for the same target) and the closer one wins; the report says
    which.  ``table``: a :class:`Table` made before for the same scores (``--target latency=F`` plans
    several times).  Returns ``(removal, plan report)``."""
    t = table or Table(an, scores, opts, progress, kind)
    steps = next((n for n in range(len(t.path) + 1) if t.estimate(t.removal(n)) <= goal), len(t.path))
    removal = t.removal(steps)
    if 0 < steps:   # the last step may overshoot: as few of its group's units as reach the goal
        a, b = t.partial_range(steps - 1)
        while b - a > 1:
            gid = t.path[steps - 1][0]
            k = _kept_multiple((a + b) // 2, t.round_to, gid, t.order[gid].size, t.max_ratio)
            if k <= a or k >= b:
                break
            if t.estimate(t.removal(steps - 1, partial=k)) <= goal:
                b = k
            else:
                a = k
        if b < len(t.levels[t.path[steps - 1][0]][t.path[steps - 1][1]][0]):
            removal = t.removal(steps - 1, partial=b)
    measured = {}
    for name, r in (("sensitivity", removal), ("global", alternative)):
        measured[name] = t.measure(*attempt({k: np.array(v) for k, v in r.items()})) if r else 1.0
    chosen = "sensitivity" if measured["sensitivity"] >= measured["global"] else "global"
    if progress:
        progress(f"allocation: sensitivity -> fidelity {measured['sensitivity']:.4f}, the plain plan -> "
                 f"{measured['global']:.4f}: {chosen}")
    final = removal if chosen == "sensitivity" else alternative
    left = t.estimate(final)
    return final, {"allocation": chosen, "fidelity_by_allocation": {k: round(v, 6) for k, v in measured.items()},
                   "steps": steps, "path": len(t.path),
                   f"{kind}_estimate": round(float(left), 4) if kind == "latency" else int(left),
                   "reachable": bool(left <= goal), "inputs": t.inputs}


def choose(an, allocate: str, target, compensated: bool = False) -> tuple[str, str]:
    """``(allocation, why)`` for ``--allocate`` ``allocate`` and the parsed ``target``: ``allocate``, or
    for ``auto`` on a causal language model stacks where an OBS compensation (``compensated``) measures
    each stack's residual (SmolLM2-135M at params=1.25: 1.88x dense on held-out text against
    uniform's 1.95x; obspa without data 2.58x against 2.71x), else uniform (one global threshold over
    a trained decoder's scores, which are not comparable across layers, cut single layers' MLPs to a
    tenth: SmolLM2-135M at params=1.11, flap, 6.0x the dense perplexity; uniform 1.5x,
    docs/llm_quality.md) and the global threshold elsewhere (CNNs, where it measured
    better); for ``--target latency=F`` elsewhere the measured drift per millisecond saved
    (sensitivity): YOLOv8n at a measured 2x, fidelity 0.985 against 0.77 for the global threshold
    (docs/latency.md)."""
    if allocate != "auto":
        return allocate, ""
    if textgen.causal_lm(an) is not None:
        if compensated:
            return "stacks", "auto: a causal language model with an OBS compensation"
        return "uniform", "auto: a causal language model"
    if target[0] == "latency":
        return "sensitivity", "auto: a latency target (drift per millisecond saved)"
    return "global", "auto"
