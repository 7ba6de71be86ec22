"""Gradient criteria (placeholder: being written)."""
from __future__ import annotations


def taylor_scores(an, stats=None, reduction="sum", seed=0, grads=None):
    raise NotImplementedError


def snip_scores(an, stats=None, reduction="sum", seed=0, grads=None):
    raise NotImplementedError


def fisher_scores(an, stats=None, reduction="sum", seed=0, grads=None):
    raise NotImplementedError
