"""Group-level scorers: one score per channel (unit) of each group, higher = keep.

``CRITERIA`` maps a CLI name to a :class:`Scorer`.  A scorer's function takes
``(an, stats=None, reduction="sum", **opts)`` (``an`` a ``spa.Analysis``, ``stats`` the
``spa.runtime.calib.ActStats`` for calibrated criteria) and returns raw per-unit scores of length
``n_units``, or ``(scores, {group_id: note})`` where it fell back to another rule.  ``score``
calls one and normalises the result so that scores are comparable across groups.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..errors import SpaError


def _function(name: str):
    """A criterion's function by name; its module (numpy and the rest) is imported when a
    criterion runs, not when the command line lists the criteria (``spa --help`` loads no numpy)."""
    from . import activation, gradient, obs_stage, obspa, structure
    for module in (structure, activation, gradient, obspa, obs_stage):
        if hasattr(module, name):
            return getattr(module, name)
    raise SpaError(f"internal: no scoring function {name!r}")


@dataclass(frozen=True)
class Scorer:
    name: str
    function: str                   # the name of its function in spa.scoring's modules (``fn``)
    needs_calib: bool = False
    normalisation: str = "mean"     # the default; lamp is already layer-adaptive
    doc: str = ""
    compensates: bool = False       # whether it has a compensation stage of its own (``compensation``)
    needs_grads: bool = False       # reads --grads (per-initializer gradients): fn(..., grads=)

    @property
    def fn(self):
        return _function(self.function)

    @property
    def compensation(self):
        """The criterion's own compensation stage (obspa's ``Compensation``; see the module docstring), or None."""
        return _function("Compensation") if self.compensates else None


CRITERIA = {s.name: s for s in (
    Scorer("l1", "l1_scores", doc="sum |w| over the channel's weight slices"),
    Scorer("l2", "l2_scores", doc="L2 norm of the channel's weight slices"),
    Scorer("random", "random_scores", doc="seeded uniform random (the control)"),
    Scorer("bn_scale", "bn_scale_scores", doc="|gamma| of the channel's BatchNormalization (l2 where none)"),
    Scorer("fpgm", "fpgm_scores", doc="distance of the producer filter to the others (geometric median)"),
    Scorer("lamp", "lamp_scores", normalisation="none", doc="layer-adaptive magnitude (LAMP) per group"),
    Scorer("act_mean", "act_mean_scores", needs_calib=True, doc="mean |activation| of the channel"),
    Scorer("wanda", "wanda_scores", needs_calib=True, doc="|W| x input activation norm over consumers"),
    Scorer("flap", "flap_scores", needs_calib=True, doc="activation variance x squared consumer column norm"),
    # the scores here are only L2, the fallback for groups OBS cannot model: the compensation
    # replaces them with OBS removal costs and compensates the kept weights (spa.scoring.obspa)
    Scorer("obspa", "l2_scores", compensates=True,
           doc="Optimal Brain Surgeon removal cost + weight compensation (no data needed)"),
    Scorer("taylor", "taylor_scores", needs_grads=True,
           doc="|sum of w x dL/dw| over the channel's weights (first-order Taylor, LLM-Pruner); needs --grads"),
    Scorer("snip", "snip_scores", needs_grads=True,
           doc="sum |w x dL/dw| over the channel's weights (SNIP, at initialisation); needs --grads"),
    Scorer("fisher", "fisher_scores", needs_grads=True,
           doc="sum of squared gradients (empirical Fisher) over the channel's weights; needs --grads"),
)}


#: --compensate: the criterion's own (obspa's OBS), none, or OBS compensation of whatever the criterion chose
COMPENSATE = ("auto", "none", "obs")


def compensation(scorer: Scorer, how: str = "auto"):
    """The compensation stage of a prune (``Scorer.compensation``'s signature), or None: ``auto`` is the
    criterion's own (obspa chooses by OBS and compensates; the others have none), ``obs`` compensates
    the kept weights of whatever channels the criterion chose by OBS's least-squares update (obspa:
    its own), ``none`` writes the kept weights as they are."""
    if how == "none":
        return None
    if how == "obs" and not scorer.compensates:
        return functools.partial(_function("Compensation"), choose=False)
    return scorer.compensation


#: --criterion auto: the ridge of the OBS compensation that follows wanda on a causal LM with calibration
#: data.  The calibration text is rarely the deployment's: SmolLM2-135M at params=1.11, calibrated on
#: Python's docs, held-out licences: ridge 0.01 1.39x the dense perplexity, 3 1.23x (docs/llm_quality.md).
LM_DAMP = 3.0


def choose(an, opts) -> tuple[dict, str]:
    """``(PruneOptions fields, why)`` that ``--criterion auto`` sets once the model is analysed
    (``an``): for a causal language model with ``--calib`` data wanda with an OBS compensation of
    ridge ``LM_DAMP`` (where the user left those as they were), without data obspa (Hessians from text
    the model writes, diagonal selection; wanda on that text under ``--compensate none`` or with a
    ``--map``, whose rebuild from the original checkpoint cannot carry a compensation); l2
    elsewhere.  Measured on SmolLM2-135M at params=1.11 (docs/llm_quality.md): l2 under the uniform
    allocation is 5100x the dense perplexity, wanda + OBS 1.23x, obspa without data 1.55x."""
    if opts.criterion != "auto":
        return {}, ""
    from ..runtime import textgen
    if textgen.causal_lm(an) is None:
        return {"criterion": "l2"}, "auto"
    # a --map rebuilds the pruned model from the original checkpoint's slices: no compensation then
    plain = opts.compensate == "none" or opts.map_path is not None
    if opts.calib is None and plain:
        return {"criterion": "wanda", "calib": "synthetic"}, "auto: a causal language model, no data, no compensation"
    if opts.calib is None:
        return {"criterion": "obspa"}, "auto: a causal language model without data"
    if plain:
        return {"criterion": "wanda"}, "auto: a causal language model with calibration data, no compensation"
    return ({"criterion": "wanda", "compensate": "obs", "damp": LM_DAMP if opts.damp is None else opts.damp},
            "auto: a causal language model with calibration data (wanda, OBS compensation)")


@dataclass
class Scores:
    raw: object           # np.ndarray
    normalised: object    # np.ndarray
    criterion: str
    reduction: str
    normalisation: str
    notes: dict = field(default_factory=dict)   # group id -> text (fallbacks)


def score(an, criterion: str = "l2", *, stats=None, reduction: str = "sum", normalisation: str | None = None,
          seed: int = 0, grads=None) -> Scores:
    """Raw and normalised per-unit scores of ``criterion`` on analysis ``an``."""
    import numpy as np

    from .magnitude import NORMALISATIONS, REDUCTIONS, normalise
    scorer = CRITERIA.get(criterion)
    if scorer is None:
        raise SpaError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if reduction not in REDUCTIONS:
        raise SpaError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    how = normalisation or scorer.normalisation
    if how not in NORMALISATIONS:
        raise SpaError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALISATIONS)}")
    got = scorer.fn(an, stats, reduction, seed=seed, **({"grads": grads} if scorer.needs_grads else {}))
    raw, notes = got if isinstance(got, tuple) else (got, {})
    raw = np.nan_to_num(np.asarray(raw, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return Scores(raw, normalise(raw, an.groups, how), criterion, reduction, how, dict(notes))
