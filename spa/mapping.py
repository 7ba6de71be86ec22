"""Map a pruned ONNX model back to the framework checkpoint it was exported from (placeholder: being written)."""
from __future__ import annotations


def step_map(an, units) -> dict:
    """{initializer: {axis: kept indices}} for one step (``an``: the step's Analysis)."""
    raise NotImplementedError


def compose(first: dict, later: dict) -> dict:
    """The map of two steps in a row (indices of ``later`` are into ``first``'s kept ones)."""
    raise NotImplementedError


def document(kept: dict, first, result_proto, result_weights, compensated: set) -> dict:
    """The JSON document ``--map`` writes."""
    raise NotImplementedError


def apply_map(map_file, checkpoint, output, *, names=None, inputs=(), progress=None) -> dict:
    """Slice ``checkpoint`` with the map; write ``output``; return a summary."""
    raise NotImplementedError
