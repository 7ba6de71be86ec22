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
from typing import Callable

import numpy as np

from ..errors import SpaError
from .activation import act_mean_scores, flap_scores, wanda_scores
from .gradient import fisher_scores, snip_scores, taylor_scores
from .obspa import Compensation as obspa_compensation
from .magnitude import NORMALISATIONS, REDUCTIONS, magnitude_scores, normalise  # noqa: F401
from .structure import (bn_scale_scores, fpgm_scores, l1_scores, l2_scores, lamp_scores,  # noqa: F401
                        random_scores)


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable
    needs_calib: bool = False
    normalisation: str = "mean"     # the default; lamp is already layer-adaptive
    doc: str = ""
    compensation: Callable | None = None   # see the module docstring
    needs_grads: bool = False              # reads --grads (per-initializer gradients): fn(..., grads=)


CRITERIA = {s.name: s for s in (
    Scorer("l1", l1_scores, doc="sum |w| over the channel's weight slices"),
    Scorer("l2", l2_scores, doc="L2 norm of the channel's weight slices"),
    Scorer("random", random_scores, doc="seeded uniform random (the control)"),
    Scorer("bn_scale", bn_scale_scores, doc="|gamma| of the channel's BatchNormalization (l2 where none)"),
    Scorer("fpgm", fpgm_scores, doc="distance of the producer filter to the others (geometric median)"),
    Scorer("lamp", lamp_scores, normalisation="none", doc="layer-adaptive magnitude (LAMP) per group"),
    Scorer("act_mean", act_mean_scores, needs_calib=True, doc="mean |activation| of the channel"),
    Scorer("wanda", wanda_scores, needs_calib=True, doc="|W| x input activation norm over consumers"),
    Scorer("flap", flap_scores, needs_calib=True, doc="activation variance x squared consumer column norm"),
    # the scores here are only L2, the fallback for groups OBS cannot model: the compensation
    # replaces them with OBS removal costs and compensates the kept weights (spa.scoring.obspa)
    Scorer("obspa", l2_scores, compensation=obspa_compensation,
           doc="Optimal Brain Surgeon removal cost + weight compensation (no data needed)"),
    Scorer("taylor", taylor_scores, needs_grads=True,
           doc="|sum of w x dL/dw| over the channel's weights (first-order Taylor, LLM-Pruner); needs --grads"),
    Scorer("snip", snip_scores, needs_grads=True,
           doc="sum |w x dL/dw| over the channel's weights (SNIP, at initialisation); needs --grads"),
    Scorer("fisher", fisher_scores, needs_grads=True,
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
    if how == "obs" and scorer.compensation is None:
        return functools.partial(obspa_compensation, choose=False)
    return scorer.compensation


@dataclass
class Scores:
    raw: np.ndarray
    normalised: np.ndarray
    criterion: str
    reduction: str
    normalisation: str
    notes: dict = field(default_factory=dict)   # group id -> text (fallbacks)


def score(an, criterion: str = "l2", *, stats=None, reduction: str = "sum", normalisation: str | None = None,
          seed: int = 0, grads=None) -> Scores:
    """Raw and normalised per-unit scores of ``criterion`` on analysis ``an``."""
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
