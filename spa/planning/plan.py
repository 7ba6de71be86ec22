"""Which channels go: local (per group) or global ranking, rounding, exclusions, limits."""
from __future__ import annotations

import math
import re

import numpy as np

from ..errors import SpaError
from ..io.weights import is_float
from .counting import mac_axes, node_macs

#: an --overrides file is a small JSON object; anything bigger is a mistake (or /dev/zero)
OVERRIDES_LIMIT = 1 << 20


def n_remove(n: int, want: int, round_to: int, max_ratio: float) -> int:
    """How many of ``n`` channels to remove: capped, rounded so that kept % round_to == 0, never all."""
    want = min(want, int(math.floor(n * max_ratio)), n - 1)
    want = max(want, 0)
    if round_to > 1 and want > 0:
        kept = n - want
        kept = int(math.ceil(kept / round_to) * round_to)
        if kept >= n:
            return 0
        want = n - kept
    return max(0, min(want, n - 1))


def multiple(round_to, group_id: int) -> int:
    """The multiple group ``group_id``'s kept count honours: ``round_to`` is one number for every
    group, or {group id: multiple} (``--round-to auto``: ``spa.planning.latency.multiples``; absent
    ids: 1)."""
    return int(round_to.get(group_id, 1)) if isinstance(round_to, dict) else int(round_to)


def check_round_to(round_to) -> None:
    values = round_to.values() if isinstance(round_to, dict) else [round_to]
    if any(int(v) < 1 for v in values):
        raise SpaError(f"--round-to must be >= 1, got {round_to}")


def selectable(groups, exclude: str | None = None):
    """Prunable groups not protected by ``exclude`` (a regex matched against node names)."""
    pattern = None
    if exclude:
        try:
            pattern = re.compile(exclude)
        except re.error as exc:
            raise SpaError(f"--exclude: invalid regular expression {exclude!r} ({exc})") from None
    out = []
    for g in groups:
        if not g.prunable:
            continue
        if pattern is not None and any(pattern.search(name) for name, _ in g.nodes):
            continue
        out.append(g)
    return out


def plan(groups, scores, ratio: float, *, global_rank: bool = False, round_to: int = 1,
         exclude: str | None = None, max_ratio: float = 0.9, overrides: dict | None = None) -> dict:
    """Map group id -> unit ids to remove.  ``scores`` are normalised per-unit scores.

    ``overrides`` ({group id: ratio}, see ``resolve_overrides``) sets those groups' local ratio,
    whatever the global ranking says; they take no part in it.
    """
    overrides = dict(overrides or {})
    if not 0.0 <= ratio < 1.0:
        raise SpaError(f"--ratio must be in [0, 1), got {ratio}")
    check_round_to(round_to)
    chosen = selectable(groups, exclude)
    removal = {}
    for g in chosen:
        if g.id in overrides:
            want = int(math.floor(g.channels * overrides[g.id] + 1e-9))
            n = n_remove(g.channels, want, multiple(round_to, g.id), 1.0)
            if n:
                order = np.argsort(scores[g.units], kind="stable")
                removal[g.id] = np.sort(g.units[order[:n]])
    chosen = [g for g in chosen if g.id not in overrides]
    if not chosen or ratio == 0:
        return removal
    if global_rank:
        all_scores = np.concatenate([scores[g.units] for g in chosen])
        k = int(math.floor(len(all_scores) * ratio))
        if k == 0:
            return removal
        threshold = np.partition(all_scores, k - 1)[k - 1]
        wants = {g.id: int((scores[g.units] <= threshold).sum()) for g in chosen}
    else:
        wants = {g.id: int(math.floor(g.channels * ratio + 1e-9)) for g in chosen}
    for g in chosen:
        n = n_remove(g.channels, wants[g.id], multiple(round_to, g.id), max_ratio if global_rank else 1.0)
        if n:
            order = np.argsort(scores[g.units], kind="stable")
            removal[g.id] = np.sort(g.units[order[:n]])
    return removal


# ----------------------------------------------------------------------------------------------
# overrides and cost targets


def parse_target(target):
    """'macs=2' / 'params=1.5' / 'latency=2' / 'fidelity=0.99' / 'experts=0.5' / 'blocks=4' (or a
    (kind, value) pair) -> ('macs', 2.0); blocks=N -> ('blocks', N) with N an int."""
    if target is None:
        return None
    if isinstance(target, (tuple, list)):
        kind, factor = target
    else:
        kind, sep, factor = str(target).partition("=")
        if not sep:
            raise SpaError(f"--target: expected macs=F or params=F, got {target!r}")
    kind = kind.strip().lower()
    if kind not in ("macs", "params", "latency", "fidelity", "experts", "blocks"):
        raise SpaError(f"--target: unknown quantity {kind!r}; use macs=F, params=F, latency=F, fidelity=C, experts=F "
                       "or blocks=N")
    try:
        factor = float(factor)
    except (TypeError, ValueError):
        what = {"fidelity": "the cosine C", "experts": "the fraction F kept",
                "blocks": "the count N of blocks removed"}.get(kind, "the reduction factor")
        raise SpaError(f"--target {kind}=: {what} must be a number, got {factor!r}") from None
    if kind == "fidelity":
        if not 0.0 < factor <= 1.0:   # nan and inf too
            raise SpaError(f"--target fidelity=C: C is the outputs' cosine to the original's, in (0, 1] "
                           f"(0.99 keeps it close; 1 removes only channels that change nothing), got {factor}")
        return kind, factor
    if kind == "blocks":
        if not (factor >= 1 and factor == int(factor)):
            raise SpaError(f"--target blocks=N: N is how many residual blocks to remove, a whole number >= 1, "
                           f"got {factor:g}")
        return kind, int(factor)
    if kind == "experts":
        if not 0.0 < factor <= 1.0:
            raise SpaError(f"--target experts=F: F is the fraction of each layer's experts kept, in (0, 1] "
                           f"(0.5 keeps half), got {factor}")
        return kind, factor
    if not 1.0 <= factor < float("inf"):
        what = "a speed-up (2 runs twice as fast)" if kind == "latency" else f"a reduction factor (2 halves the {kind})"
        raise SpaError(f"--target {kind}=F: F must be a finite number >= 1, {what}; got {factor}")
    return kind, factor


def load_overrides(path):
    """The JSON object of an --overrides file (small, regular, JSON), or a one-line SpaError."""
    import json
    from pathlib import Path
    path = Path(path)
    if not path.exists():
        raise SpaError(f"--overrides: {path}: no such file")
    if not path.is_file() or path.stat().st_size > OVERRIDES_LIMIT:
        raise SpaError(f"--overrides: {path}: not a JSON file of at most {OVERRIDES_LIMIT // 1024} KB")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaError(f"--overrides: {path}: cannot read ({type(exc).__name__})") from None
    except ValueError as exc:
        raise SpaError(f"--overrides: {path}: not JSON ({exc})") from None


def resolve_overrides(groups, overrides) -> dict:
    """``{group id or node-name regex: ratio}`` (a dict, or a path to a JSON file) -> {group id: ratio}.

    A key made of digits is a group id; any other key is a regular expression searched in the
    names of the group's nodes.  A JSON file may also hold ``{"overrides": {...}}``.  Later keys win.
    """
    if not overrides:
        return {}
    if not isinstance(overrides, dict):
        overrides = load_overrides(overrides)
        if isinstance(overrides, dict) and isinstance(overrides.get("overrides"), dict):
            overrides = overrides["overrides"]
        if not isinstance(overrides, dict):
            raise SpaError("--overrides: expected a JSON object {group id or node regex: ratio}")
    by_id = {g.id: g for g in groups}
    out = {}
    for key, value in overrides.items():
        try:
            r = float(value)
        except (TypeError, ValueError):
            raise SpaError(f"--overrides: ratio for {key!r} must be a number, got {value!r}") from None
        if not 0.0 <= r < 1.0:
            raise SpaError(f"--overrides: ratio for {key!r} must be in [0, 1), got {r}")
        skey = str(key)
        if skey.isdigit():
            if int(skey) not in by_id:
                raise SpaError(f"--overrides: no group {skey}")
            out[int(skey)] = r
            continue
        try:
            pat = re.compile(skey)
        except re.error as exc:
            raise SpaError(f"--overrides: invalid regular expression {skey!r} ({exc})") from None
        for g in groups:
            if any(pat.search(name) for name, _ in g.nodes):
                out[g.id] = r
    return out


def _ranked(chosen, scores):
    """Per group: units sorted by ascending score, and those sorted scores."""
    out = {}
    for g in chosen:
        order = np.argsort(scores[g.units], kind="stable")
        out[g.id] = (g.units[order], scores[g.units][order])
    return out


def _removal_at(chosen, ranked, threshold, round_to, max_ratio, fixed):
    removal = {}
    for g in chosen:
        units, s = ranked[g.id]
        if g.id in fixed:
            want = int(math.floor(g.channels * fixed[g.id] + 1e-9))
            n = n_remove(g.channels, want, multiple(round_to, g.id), 1.0)
        else:
            want = int(np.searchsorted(s, threshold, side="right"))
            n = n_remove(g.channels, want, multiple(round_to, g.id), max_ratio)
        if n:
            removal[g.id] = np.sort(units[:n])
    return removal


class CostModel:
    """First-order params and MACs after removing units, from kept fractions (no surgery).

    A Conv/Gemm/MatMul's MACs scale with the kept fraction of its input-channel axis times that of
    its output-channel axis; a weight's size with the product of the kept fractions of its axes.
    ``base`` holds the totals by kind; another quantity (``spa.planning.latency``) adds a kind with
    items whose axes may carry a curve: the item's kept share at each kept width, instead of the
    kept fraction.
    """

    def __init__(self, an):
        cm = an.channels
        self.cm = cm
        self.params, self.macs = an.params, an.macs
        self.base = {"params": an.params, "macs": an.macs}
        self.items = {"macs": [], "params": []}
        shapes = an.probe.shapes
        for node in an.model.graph.node:
            m = node_macs(node, shapes)
            if m:
                self._add("macs", m, mac_axes(node, shapes))
        for name, value in cm.consts.items():
            if is_float(value.dtype) and value.ndim:
                self._add("params", value.size, [(name, d) for d in range(value.ndim)])

    def _add(self, kind, cost, axes, curves=None):
        """One item of ``kind``: ``cost`` times the product, over its prunable ``axes``, of the kept
        fraction (or of ``curves[i][kept width]`` where a curve is given)."""
        curves = curves or [None] * len(axes)
        picked = [(self.cm.axis_index[a], c) for a, c in zip(axes, curves)
                  if a in self.cm.axis_index and self.cm.axis_index[a][1] > 1]
        if picked:
            self.items.setdefault(kind, []).append((float(cost), [r for r, _ in picked], [c for _, c in picked]))

    def rank_weights(self, groups, kind: str, round_to) -> dict:
        """{group id: how much more than the average a channel of the group saves}: the global threshold
        ranks score / weight.  Params and MACs rank by score alone (what measured best on the
        criteria bench); a latency model weighs by measured milliseconds."""
        return {}

    def estimate(self, units) -> dict:
        units = np.asarray(units, np.int64)
        if len(units) == 0:
            return dict(self.base)
        mask = self.cm.removed_atoms(units)
        cs = np.concatenate([[0], np.cumsum(mask)])
        out = {}
        for kind, base in self.base.items():
            saved = 0.0
            for cost, ranges, curves in self.items[kind]:
                kept = 1.0
                for (off, size), curve in zip(ranges, curves):
                    gone = cs[off + size] - cs[off]
                    kept *= 1.0 - gone / size if curve is None else curve[size - gone]
                saved += cost * (1.0 - kept)
            out[kind] = base - saved if kind not in ("params", "macs") else int(round(base - saved))
        return out


def _goal(kind, goal):
    """What a plan reports as its goal: counts are whole, milliseconds are not."""
    return round(float(goal), 4) if kind == "latency" else int(round(goal))


def all_units(removal) -> np.ndarray:
    """Every unit of a removal ({group id: units}), one array."""
    return np.concatenate(list(removal.values())) if removal else np.zeros(0, np.int64)


def plan_target(groups, scores, cost: CostModel, target, *, round_to: int = 1, exclude: str | None = None,
                max_ratio: float = 0.9, overrides: dict | None = None):
    """Search the global score threshold whose removal reaches ``target`` (kind, factor).

    Returns ``(removal, info)``; ``info`` holds the estimate and whether the target was reachable.
    The threshold moves over the sorted scores, so the result is the smallest removal (one channel
    per group at a time) whose estimated cost meets the target.
    """
    kind, factor = parse_target(target)
    check_round_to(round_to)
    chosen = selectable(groups, exclude)
    fixed = dict(overrides or {})
    ranked = _ranked(chosen, scores)
    for gid, w in cost.rank_weights(chosen, kind, round_to).items():   # score per unit of cost saved
        ranked[gid] = (ranked[gid][0], ranked[gid][1] / w)
    base = cost.base[kind]
    goal = base / factor
    free = [g for g in chosen if g.id not in fixed]
    cands = np.unique(np.concatenate([ranked[g.id][1] for g in free])) if free else np.zeros(0)
    cands = np.concatenate([[-np.inf], cands])

    def at(i):
        rem = _removal_at(chosen, ranked, cands[i], round_to, max_ratio, fixed)
        return rem, cost.estimate(all_units(rem))

    lo, hi = 0, len(cands) - 1
    rem, est = at(hi)
    reachable = est[kind] <= goal
    if reachable:
        while lo < hi:  # smallest index whose estimate meets the goal
            mid = (lo + hi) // 2
            if at(mid)[1][kind] <= goal:
                hi = mid
            else:
                lo = mid + 1
        rem, est = at(hi)
    info = {"target": f"{kind}={factor:g}", "goal": _goal(kind, goal), "estimate": est,
            "reachable": bool(reachable), "threshold": float(cands[hi]) if np.isfinite(cands[hi]) else None}
    return rem, info


#: a stack: at least this many groups of one signature (a transformer's layers, not a CNN stage)
STACK = 8


def stacks(groups, position: dict, min_stack: int = STACK) -> list[list]:
    """Every stack: groups of one signature (channel count and the multiset of their nodes' operators:
    the same block repeated, such as every layer's MLP or attention heads of a decoder), at least
    ``min_stack`` of them, each in graph order (``position``: node name -> index in the graph)."""
    from collections import Counter
    found = {}
    for g in groups:
        if not g.nodes:
            continue
        key = (g.channels, tuple(sorted(Counter(op for _, op in g.nodes).items())))
        found.setdefault(key, []).append(g)
    out = []
    for members in found.values():
        if len(members) >= min_stack:
            out.append(sorted(members, key=lambda g: min(position.get(n, 1 << 30) for n, _ in g.nodes)))
    return out


def stack_ends(groups, position: dict, first: int, last: int, min_stack: int = STACK) -> list[int]:
    """Ids of the first ``first`` and last ``last`` groups of every :func:`stacks` stack.  The first
    blocks of a trained decoder carry what every later one reads: on SmolLM2-135M at params=1.25
    keeping its first two layers' MLPs whole took the held-out perplexity from 2.25x to 1.96x dense
    (docs/llm_quality.md)."""
    ends = []
    for members in stacks(groups, position, max(min_stack, first + last + 1)):
        ends += [g.id for g in members[:first]] + ([g.id for g in members[-last:]] if last else [])
    return sorted(ends)


def plan_uniform(groups, scores, cost: CostModel, target, *, round_to: int = 1, exclude: str | None = None,
                 max_ratio: float = 0.9, overrides: dict | None = None, unscored=(), spared=(), weights=None):
    """``--allocate uniform``: the smallest fraction ``f`` that, removed from every selectable exact
    group (each group's lowest-scored ``floor(f n)`` units, rounded by ``round_to``), reaches
    ``target``.  Scores then only rank units inside a group, never across groups: what FLAP calls
    uniform across layers and modules, and what measured best on a trained decoder
    (docs/llm_quality.md), where one global threshold guts single layers.  Approximate groups (a
    norm or a softmax over the axis) are left whole: no uniform share of them is safe; so are the
    ``unscored`` groups (ids the criterion could not score and filled with another rule: wanda on
    the query/key dims of every layer's rotary embedding, read only by Q.K^T), and the ``spared``
    ones (:func:`stack_ends`) unless an override names them.  ``weights`` ({group id: w}, default 1):
    a group loses ``w f`` instead of ``f`` (:func:`plan_stacks`).
    Returns ``(removal, info)`` like :func:`plan_target`."""
    kind, factor = parse_target(target)
    fixed = dict(overrides or {})
    fixed.update({gid: 0.0 for gid in spared if gid not in fixed})
    unscored, weights = set(unscored), weights or {}
    whole = [g for g in selectable(groups, exclude) if g.id not in fixed and (g.approximate or g.id in unscored)]
    chosen = [g for g in selectable(groups, exclude) if g.id in fixed or g not in whole]
    ranked = _ranked(chosen, scores)
    goal = cost.base[kind] / factor

    def at(f):
        removal = {}
        for g in chosen:
            share = fixed.get(g.id, min(f * weights.get(g.id, 1.0), 1.0))
            n = n_remove(g.channels, int(math.floor(g.channels * share + 1e-9)), multiple(round_to, g.id),
                         1.0 if g.id in fixed else max_ratio)
            if n:
                removal[g.id] = np.sort(ranked[g.id][0][:n])
        return removal, cost.estimate(all_units(removal))

    lo, hi = 0.0, float(max_ratio)
    rem, est = at(hi)
    reachable = est[kind] <= goal
    if reachable:
        for _ in range(40):        # bisection to well below one channel of the largest group
            mid = 0.5 * (lo + hi)
            if at(mid)[1][kind] <= goal:
                hi = mid
            else:
                lo = mid
        rem, est = at(hi)
    info = {"target": f"{kind}={factor:g}", "goal": _goal(kind, goal), "estimate": est, "reachable": bool(reachable),
            "allocation": "uniform", "fraction": hi, "kept_whole": [g.id for g in whole],
            "ends_kept": sorted(gid for gid in spared if fixed.get(gid) == 0.0)}
    return rem, info


def stack_weights(groups, position: dict, removal: dict, residual: dict, cost: CostModel,
                  kind: str = "params") -> tuple[dict, list]:
    """``({group id: w}, per stack report)``: each :func:`stacks` stack's share weight, the geometric
    mean over all measured groups of the residual per unit of ``kind`` saved (``residual[gid]`` for
    removing ``removal[gid]``) over that mean within the stack.  A stack whose channels cost twice the
    typical residual per parameter loses half the typical share; groups outside a measured stack keep 1.
    Geometric means, because a decoder's layers differ by orders of magnitude in output energy while
    its stacks (MLPs, head dims) run through the same layers: the layers' scale cancels."""
    per_unit = {}
    for g in groups:
        units, r = removal.get(g.id), residual.get(g.id)
        if units is None or not len(units) or r is None or not r > 0:
            continue
        saved = cost.base[kind] - cost.estimate(units)[kind]
        if saved > 0:
            per_unit[g.id] = r / saved
    if not per_unit:
        return {}, []
    typical = float(np.exp(np.mean(np.log(list(per_unit.values())))))
    weights, report = {}, []
    for members in stacks(groups, position):
        got = [per_unit[g.id] for g in members if g.id in per_unit]
        if len(got) < max(2, len(members) // 2):
            continue
        mean = float(np.exp(np.mean(np.log(got))))
        weights.update({g.id: typical / mean for g in members})
        report.append({"channels": members[0].channels, "groups": [g.id for g in members], "measured": len(got),
                       f"residual_per_{kind}": mean, "weight": round(typical / mean, 4)})
    return weights, report


def plan_stacks(groups, scores, cost: CostModel, target, residual, *, position: dict, **uniform):
    """``--allocate stacks``: :func:`plan_uniform`, then every stack's share weighed by what its channels
    cost (:func:`stack_weights`): ``residual(removal)`` gives each group's OBS residual, the
    compensated calibration loss of removing exactly those units, and the uniform plan is remade
    with the weights.  Layers keep one share per stack, as under uniform (a share per layer measured
    worse on a trained decoder); the stacks differ: on SmolLM2-135M the value head dims cost about
    twice an MLP channel's residual per parameter.  Returns ``(removal, info)`` like
    :func:`plan_target`."""
    first, info0 = plan_uniform(groups, scores, cost, target, **uniform)
    weights, report = stack_weights(groups, position, first, residual(first) if first else {}, cost,
                                    parse_target(target)[0])
    if not weights:
        return first, {**info0, "stacks": "no stack's residual measured: uniform"}
    removal, info = plan_uniform(groups, scores, cost, target, weights=weights, **uniform)
    info.update(allocation="stacks", uniform_fraction=info0["fraction"], stacks=report)
    return removal, info
