"""Synthetic images matched to the model's own BatchNorm statistics (issue 24, after DeepInversion).

A BatchNormalization node left in an exported graph holds the per-channel mean and variance of its
input over the training data (``running_mean``, ``running_var``).  That is the one description of the
model's data that a data-free prune has: a unit-variance noise image is nothing like a log-mel
spectrogram around 4-12 or a photo in 0-255 minus the mean, and the first BatchNorm says so.  Here
the noise spa would feed is given a scale and an offset (per channel of a small channel axis, else one
of each) so that the inputs of the first few BatchNorms reached from it have the statistics those
BatchNorms expect.  The search is gradient-free (a coarse grid over one shared scale and offset, then
Nelder-Mead over all of them), each step one onnxruntime run of only the layers before those
BatchNorms on one batch: a few seconds at most (:data:`MAX_SECONDS`).

Nothing changes where there is nothing to match (no BatchNormalization reached, as when the
exporter folded every BN into its Conv: YOLOv8n, open_nsfw, torchvision's eval-mode exports), where
the plain noise already matches (mismatch below :data:`CLOSE`), or where the fit does not come close
(:data:`GOOD`) or does not lower the mismatch to at most :data:`GAIN` of the plain noise's.  Only 1/f
noise for images is matched: rendered text is already preprocessed as the model's data is, and token
ids and masks are not noise.

A BatchNorm sees its input only through the layers before it: openWakeWord's embedder has filters that
sum to zero before its first BatchNorm, so the level of its log-mel frames is invisible there and the
fit sets their scale, and an offset that only the zero-padded borders see (docs/fidelity_bench.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

#: how many BatchNormalization nodes (the first in graph order that the images reach) are matched
MAX_NORMS = 3
#: a channel axis up to this size gets a scale and an offset per channel, a larger one a shared pair
MAX_CHANNELS = 4
#: the plain noise is kept when its mismatch is already below this
CLOSE = 0.05
#: the fit is kept only when its mismatch is at most this fraction of the plain noise's, and at most
#: ``GOOD`` (a mean off by half a deviation in every channel): an affine map of noise that cannot come
#: close to the statistics says little about the data (the random BatchNorms of spa's test graphs
#: stay above 0.45 however the noise is scaled), and the plain noise is the measured behaviour
GAIN, GOOD = 0.5, 0.25
#: how far a channel's scale (a factor) and offset (in deviations of the noise) may stray from the
#: input's shared ones
SPREAD = 2.0
#: the search stops after this many onnxruntime runs, or this many seconds
MAX_EVALS, MAX_SECONDS = 300, 3.0
#: the coarse grid: scales (powers of two) and offsets in units of the scale
GRID_SCALES = 2.0 ** np.arange(-3, 8)
GRID_OFFSETS = np.array([-3.0, -1.0, 0.0, 1.0, 3.0])
EPS = 1e-6


@dataclass
class Norm:
    """A BatchNormalization's input tensor and the statistics it expects there."""
    tensor: str
    mean: np.ndarray
    var: np.ndarray


@dataclass
class Match:
    """What :func:`match` did: the mismatch before and after, and the transforms per input name
    (``scale``, ``offset``: per channel, or one value)."""
    norms: int
    before: float
    after: float
    scale: dict
    offset: dict

    def describe(self) -> str:
        def show(v):
            v = np.atleast_1d(v)
            return f"{v[0]:.3g}" if v.size == 1 else "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
        how = "; ".join(f"'{k}' x {show(self.scale[k])} + {show(self.offset[k])}" for k in self.scale)
        return (f"matched to the model's BatchNorm statistics ({how}: mismatch {self.before:.3g} -> "
                f"{self.after:.3g} over {self.norms} BatchNormalization)")


def norms(proto, consts, inputs, limit: int = MAX_NORMS) -> list:
    """The first ``limit`` BatchNormalization nodes (graph order, which ONNX makes topological) that
    the tensors ``inputs`` reach, in inference mode, with constant running statistics in ``consts``.
    An exporter that folded BN into the Conv before it left none: then there is nothing to match."""
    reach, found = set(inputs), []
    for node in proto.graph.node:
        if not any(i in reach for i in node.input if i):
            continue
        reach.update(o for o in node.output if o)
        if node.op_type != "BatchNormalization" or len(node.input) < 5:
            continue
        if any(a.name == "training_mode" and a.i for a in node.attribute):
            continue
        mean, var = consts.get(node.input[3]), consts.get(node.input[4])
        if mean is None or var is None or mean.size != var.size or not np.all(np.isfinite(var)) or np.any(var < 0):
            continue
        found.append(Norm(node.input[0], np.asarray(mean, np.float64).ravel(), np.asarray(var, np.float64).ravel()))
        if len(found) == limit:
            break
    return found


def mismatch(values: dict, targets: list) -> float:
    """How far the tensors ``values`` (name -> [N, C, ...], as many runs concatenated as measured) are
    from the statistics their BatchNorms expect: per BN the mean over channels of
    ``(mu - running_mean)^2 / running_var + (log var - log running_var)^2`` (a mean off by one
    standard deviation costs 1, a variance off by e costs 1), then the mean over BNs."""
    out = []
    for t in targets:
        v = np.asarray(values[t.tensor], np.float64)
        axes = (0,) + tuple(range(2, v.ndim))
        if v.ndim < 2 or v.shape[1] != t.mean.size:
            return float("inf")
        mu, var = v.mean(axis=axes), v.var(axis=axes)
        rv = t.var + EPS
        out.append(np.mean((mu - t.mean) ** 2 / rv + (np.log(var + EPS) - np.log(rv)) ** 2))
    loss = float(np.mean(out)) if out else float("inf")
    return loss if np.isfinite(loss) else float("inf")


def nelder_mead(f, x0, step, max_evals, deadline):
    """Minimise ``f`` from ``x0`` (initial simplex: ``x0`` plus ``step`` along each axis) with the
    standard Nelder-Mead moves, within ``max_evals`` calls and until ``deadline`` (time.monotonic);
    returns ``(x, f(x))``: a handful of parameters, each call one onnxruntime run, no gradient."""
    n = len(x0)
    pts = [np.asarray(x0, np.float64)] + [x0 + step * e for e in np.eye(n)]
    vals = [f(p) for p in pts]
    evals = len(pts)
    while evals < max_evals and time.monotonic() < deadline:
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] < 1e-6 * (1 + abs(vals[0])):
            break
        centre = np.mean(pts[:-1], axis=0)
        refl = centre + (centre - pts[-1])
        fr = f(refl)
        evals += 1
        if fr < vals[0]:
            exp = centre + 2 * (centre - pts[-1])
            fe = f(exp)
            evals += 1
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = centre + 0.5 * (pts[-1] - centre)
            fc = f(con)
            evals += 1
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:   # shrink towards the best
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
                evals += n
    best = int(np.argmin(vals))
    return pts[best], vals[best]


def match(an, noise: list, *, fit_feeds: int = 1, progress=None) -> Match | None:
    """Give the noise images ``noise`` (``(feed, name, image, x)``: ``x`` the [N, C, H, W] unit noise
    that ``feed[name]`` holds in ``image``'s layout) a scale and an offset that bring the inputs of the
    model's first BatchNorms to their running statistics, and write them into the feeds in place.
    Fitted on the noise of the first ``fit_feeds`` feeds, applied to all.  Returns what was done, or
    None where the feeds are left as they are (no BN reached, the plain noise already close, the fit
    not close or no better: see the module doc).

    The search: a grid over one scale and offset per input, Nelder-Mead over them, then (a channel
    axis of 2 to ``MAX_CHANNELS``) Nelder-Mead over per-channel deviations bounded to a factor
    ``SPREAD`` in scale and ``SPREAD`` noise deviations in offset: left free, a channel's scale
    collapses to zero wherever that lowers the mismatch (a constant channel is no image)."""
    if not noise:
        return None
    from . import calib
    targets = norms(an.model, an.probe.consts, {name for _, name, _, _ in noise})
    if not targets:
        return None
    feeds = list({id(feed): feed for feed, *_ in noise}.values())[:fit_feeds]
    fitting = [e for e in noise if any(e[0] is f for f in feeds)]
    names = list(dict.fromkeys(name for _, name, _, _ in noise))
    extra = {name: (x.shape[1] if 1 < x.shape[1] <= MAX_CHANNELS else 0) for _, name, _, x in noise}
    runner, fetch = calib.exposing_session(an, [t.tensor for t in targets])
    if len(fetch) != len(targets):
        return None

    def unpack(p):
        """per input: log scale, offset, then per-channel deviations of each (bounded by tanh)"""
        scale, offset, i = {}, {}, 0
        for name in names:
            k = extra[name]
            log_s, b, d, e = p[i], p[i + 1], p[i + 2:i + 2 + k], p[i + 2 + k:i + 2 + 2 * k]
            scale[name] = np.exp(log_s + np.log(SPREAD) * np.tanh(d)) if k else np.exp([log_s])
            offset[name] = b + SPREAD * np.exp(log_s) * np.tanh(e) if k else np.array([b])
            i += 2 + 2 * k
        return scale, offset

    def transformed(x, name, scale, offset):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * scale[name].reshape(shape) + offset[name].reshape(shape)

    def loss(p):
        scale, offset = unpack(p)
        runs = []
        for feed in feeds:
            trial = dict(feed)
            for f, name, image, x in fitting:
                if f is feed:
                    trial[name] = image.from_nchw(transformed(x, name, scale, offset)).astype(feed[name].dtype)
            try:
                runs.append(runner.run(trial, fetch))
            except Exception:   # a scale the model cannot take (an overflow in float16): not a candidate
                return float("inf")
        return mismatch({t: np.concatenate([r[t] for r in runs]) for t in fetch}, targets)

    n = sum(2 + 2 * extra[name] for name in names)
    shared = np.concatenate([[i, i + 1] for i in np.cumsum([0] + [2 + 2 * extra[k] for k in names])[:-1]]).astype(int)

    def full(q):   # the shared parameters q (log scale, offset per input) with no per-channel deviation
        p = np.zeros(n)
        p[shared] = q
        return p

    if progress is not None:
        progress(f"matching the synthetic images to {len(targets)} BatchNorm statistics")
    deadline = time.monotonic() + MAX_SECONDS
    plain = loss(np.zeros(n))
    if plain < CLOSE:
        return None
    grid = [(np.log(s), o * s) for s in GRID_SCALES for o in GRID_OFFSETS]
    scored = []
    for ls, b in grid:
        scored.append((loss(full(np.tile([ls, b], len(names)))), ls, b))
        if time.monotonic() > deadline:
            break
    best, ls, b = min(scored, key=lambda t: t[0])
    budget = MAX_EVALS - len(scored) - 1
    q, fx = nelder_mead(lambda q: loss(full(q)), np.tile([ls, b], len(names)),
                        np.tile([0.5, max(np.exp(ls), 1e-3)], len(names)), budget // 2, deadline)
    x = full(q)
    if len(shared) < n:
        step = np.full(n, 0.5)
        step[shared] = np.tile([0.1, 0.1 * max(np.exp(ls), 1e-3)], len(names))
        x, fx = nelder_mead(loss, x, step, budget // 2, deadline)
    if not np.isfinite(fx) or fx > GAIN * plain or fx > GOOD:
        return None
    scale, offset = unpack(x)
    for feed, name, image, xx in noise:
        feed[name] = image.from_nchw(transformed(xx, name, scale, offset)).astype(feed[name].dtype)
    return Match(len(targets), plain, fx, scale, offset)
