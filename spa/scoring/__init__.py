"""Group-level scorers: one score per channel (unit) of each group, higher = keep."""
from .magnitude import magnitude_scores, normalise  # noqa: F401

CRITERIA = ("l1", "l2")
