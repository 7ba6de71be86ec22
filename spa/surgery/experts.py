"""Whole-expert surgery: cut the kept experts out of every tensor indexed by expert id.

For each layer the router's rows (and any per-expert bias on the way to TopK) and the stacked
expert weights keep the rows of the kept experts, in their original order.  TopK then chooses among
the kept experts only, and the ids it returns are positions among them: the stacked weights, cut
the same way, are indexed consistently, so nothing is rewritten on the id path.  Readers of the ids
that need the original numbering (``ExpertLayer.remaps``) are fed ``Gather(kept, ids)``.  The result
equals the original with the removed experts' router logits at -inf (the oracle of
``tests/surgery/test_experts.py``).
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import SpaError
from ..io import weights as weight_store


def check_kept(layer, kept) -> np.ndarray:
    """``kept`` as sorted unique expert ids, or a one-line SpaError (TopK's k must stay <= kept)."""
    kept = np.unique(np.asarray(kept, np.int64))
    if len(kept) and (kept[0] < 0 or kept[-1] >= layer.experts):
        raise SpaError(f"experts layer {layer.index} ('{layer.router}'): expert ids must be in [0, {layer.experts}), "
                       f"got {kept.tolist()}")
    if len(kept) < layer.top_k:
        raise SpaError(f"experts layer {layer.index} ('{layer.router}') routes each token to {layer.top_k} experts "
                       f"(TopK '{layer.topk}'): keep at least {layer.top_k} of its {layer.experts}, not {len(kept)}")
    return kept


def cut_experts(proto: onnx.ModelProto, weights: dict, layers: list, kept: dict) -> tuple[onnx.ModelProto, dict]:
    """``(model, weights)`` keeping, for each layer index in ``kept``, those experts only (``proto``
    and ``weights`` are not changed; big weights stay stubs, as ``spa.surgery.slicing.cut``)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    new_weights = {t.name: weights[t.name] for t in out.graph.initializer
                   if weight_store.is_stub(t) and t.name in weights}
    for layer in layers:
        if layer.index not in kept:
            continue
        if layer.blocked:
            raise SpaError(f"experts layer {layer.index} ('{layer.router}') cannot lose experts: {layer.blocked}")
        ids = check_kept(layer, kept[layer.index])
        if len(ids) == layer.experts:
            continue
        for name, dim in layer.slices:
            value = np.ascontiguousarray(np.take(weights[name], ids, axis=dim))
            if weights[name].nbytes > weight_store.RELEASE_ABOVE:   # the original's pages: read once, not kept
                weight_store.release_pages([weights[name]])
            weight_store.put(out, new_weights, name, value, tensor=inits[name])
            if not weight_store.is_stub(inits[name]):
                new_weights.pop(name, None)
        if layer.remaps:
            _remap(out, layer, ids)
    del out.graph.value_info[:]   # shapes along the expert axis are stale
    return out, new_weights


def _remap(out, layer, ids) -> None:
    """Feed each reader that needs original expert ids ``Gather(kept ids, compact ids)``."""
    table = f"{layer.topk}/kept_experts"
    out.graph.initializer.append(onnx.numpy_helper.from_array(ids, table))
    nodes = list(out.graph.node)
    where = set(layer.remaps)
    fresh = []
    for node in nodes:
        for i, name in enumerate(node.input):
            if (node.name, i) in where:
                new = f"{name}/original_expert_ids"
                if new not in {f.output[0] for f in fresh}:
                    fresh.append(onnx.helper.make_node("Gather", [table, name], [new], name=f"{new}/remap", axis=0))
                node.input[i] = new
    # a remap reads the ids where they are made: place it right after the producer of its input
    del out.graph.node[:]
    pending = {f.input[1]: f for f in fresh}
    known = {i.name for i in out.graph.input} | {t.name for t in out.graph.initializer}
    for name in list(pending):
        if name in known:
            out.graph.node.append(pending.pop(name))
    for node in nodes:
        out.graph.node.append(node)
        for o in node.output:
            if o in pending:
                out.graph.node.append(pending.pop(o))
