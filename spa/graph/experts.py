"""Mixture-of-experts layers found in the graph: where the expert axis starts, flows and is used.

A layer is found from its TopK: back from TopK's input through the expert-axis rules
(``spa.ops.experts.LOGIT_RULES``: Softmax, Sigmoid, a bias...) to the router, a Gemm or MatMul with
a constant weight whose output rows are the experts.  Then forward from the router over every
reader of the expert axis (each must have a rule: the layer is blocked otherwise, with the reason),
and forward from TopK's indices over every reader of the ids (``ID_RULES``): the constants they
index (stacked expert weights) are cut with the router's rows, and readers that need the original
numbering are listed for a remap.  The result is plain data (:class:`ExpertLayer`) that scoring,
planning and surgery read; nothing here changes the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ops.common import attr
from ..ops.experts import ID_RULES, LOGIT_RULES
from ..ops.registry import rule_key

#: steps back from TopK to the router through expert-axis ops
MAX_BACK = 8
#: nodes that select experts -> their input of router scores (TopK; onnxruntime's fused MoE ops)
SELECTORS = {"TopK": 0, "com.microsoft:MoE": 1, "com.microsoft:QMoE": 1}


@dataclass
class ExpertLayer:
    """One mixture-of-experts layer: its expert axis and everything cut along it."""
    index: int
    router: str                 # the router node's name
    weight: str                 # its constant weight
    experts: int
    top_k: int = 0
    topk: str = ""              # the TopK node's name
    logits: str = ""            # the router's output (router logits)
    scores: str = ""            # TopK's input (the selection scores)
    ids: str = ""               # TopK's indices (expert ids)
    slices: list = field(default_factory=list)   # (constant, dim) cut along the expert axis
    remaps: list = field(default_factory=list)   # (node name, input index) fed the original ids
    blocked: str = ""           # why the layer's experts cannot be removed ("" when they can)
    users: set = field(default_factory=set)      # the nodes of the layer (router, logit path, sinks)
    expert_weights: list = field(default_factory=list)   # the per-expert tensors among ``slices`` (not the router's)

    def summary(self) -> dict:
        note = {}
        if not self.blocked and not self.expert_weights:
            note = {"note": "no expert weights are indexed by expert id here (per-expert branches?): only the "
                            "router shrinks; each removed expert's branch stays, weighted 0"}
        return {"layer": self.index, "router": self.router, "experts": self.experts, "top_k": self.top_k,
                "stacked": list(self.expert_weights), "remapped": len(self.remaps),
                **({"blocked": self.blocked} if self.blocked else {}), **note}


def find_layers(proto, consts: dict, shapes: dict) -> list:
    """Every mixture-of-experts layer of ``proto`` (in graph order), blocked ones included."""
    producer = {o: n for n in proto.graph.node for o in n.output if o}
    readers = {}
    for n in proto.graph.node:
        for i, name in enumerate(n.input):
            if name:
                readers.setdefault(name, []).append((n, i))
    outputs = {o.name for o in proto.graph.output}
    layers = []
    for node in proto.graph.node:
        scores = SELECTORS.get(rule_key(node))
        if scores is None or len(node.input) <= scores:
            continue
        router = _router(node.input[scores], producer, consts)
        if router is None:
            continue
        rnode, wdim = router
        w = consts[rnode.input[1]]
        layer = ExpertLayer(len(layers), rnode.name, rnode.input[1], int(w.shape[wdim]),
                            logits=rnode.output[0], scores=node.input[scores])
        layer.slices.append((rnode.input[1], wdim))
        if rnode.op_type == "Gemm" and len(rnode.input) > 2 and rnode.input[2]:
            bias = rnode.input[2]
            if np.ndim(consts.get(bias, 0)) and np.shape(consts[bias])[-1] == layer.experts:
                layer.slices.append((bias, np.ndim(consts[bias]) - 1))
        layer.users.add(rnode.name)
        out_rank = len(shapes.get(rnode.output[0], ()))
        if not out_rank:
            layer.blocked = f"the router '{rnode.name}' has an output of unknown shape"
        else:
            _follow_logits(layer, rnode.output[0], out_rank - 1, readers, outputs, consts, shapes)
        if not layer.blocked and layer.ids:
            _follow_ids(layer, readers, outputs, consts, shapes)
        for c, _ in layer.slices if not layer.blocked else ():
            others = [n.name for n, _ in readers.get(c, []) if n.name not in layer.users]
            if others:   # a weight of this layer read elsewhere (shared, or by another layer) cannot shrink here
                layer.blocked = f"'{c}', cut with the experts, is also read by '{others[0]}'"
                break
        if not layer.blocked and not 0 < layer.top_k < layer.experts:
            layer.blocked = f"TopK '{layer.topk}' picks {layer.top_k} of {layer.experts} experts"
        layers.append(layer)
    return layers


def _router(name, producer, consts):
    """(router node, its weight's expert dim) behind TopK input ``name``, or None."""
    for _ in range(MAX_BACK):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type == "Gemm" and node.input[1] in consts and not attr(node, "transA", 0):
            return node, 0 if attr(node, "transB", 0) else 1
        if node.op_type == "MatMul" and node.input[1] in consts and np.ndim(consts[node.input[1]]) == 2:
            return node, 1
        if rule_key(node) not in LOGIT_RULES or rule_key(node) in SELECTORS:
            return None
        live = [x for x in node.input if x and x not in consts]
        if len(live) != 1:
            return None
        name = live[0]
    return None


def _follow_logits(layer, start, dim, readers, outputs, consts, shapes):
    """Every reader of the expert axis from the router on; the TopK; the constants cut with it."""
    todo, seen = [(start, dim)], set()
    while todo and not layer.blocked:
        name, d = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in outputs:
            layer.blocked = f"the expert logits '{name}' are a graph output"
            return
        for node, i in readers.get(name, []):
            layer.users.add(node.name)
            rule = LOGIT_RULES.get(rule_key(node))
            if rule is None:
                layer.blocked = f"{node.op_type} '{node.name}' reads the expert axis and has no expert rule"
                return
            got = rule(node, i, d, consts, shapes)
            if got[0] == "block":
                layer.blocked = got[1]
                return
            if got[0] in ("topk", "fused"):
                if layer.topk and layer.topk != node.name:
                    layer.blocked = f"two selectors ({layer.topk}, {node.name}) choose from one router"
                    return
                layer.topk, layer.top_k = node.name, got[1]
                if got[0] == "topk":
                    layer.ids = node.output[1]
                    continue
                out, slices = None, got[2]
                layer.expert_weights += [c for c, _ in slices]
            else:
                _, out, od, slices = got
            for c, cd in slices:
                if np.shape(consts[c])[cd] != layer.experts:
                    layer.blocked = f"'{c}' is beside the expert logits with {np.shape(consts[c])[cd]} values"
                    return
                layer.slices.append((c, cd))
            if out is not None:
                todo.append((out, od))
    if not layer.blocked and not layer.topk:
        layer.blocked = "no TopK or MoE op selects from the router's experts"


def _follow_ids(layer, readers, outputs, consts, shapes):
    """Every reader of the expert ids: constants they index are cut, others get the original ids."""
    todo, seen, sinks = [layer.ids], set(), {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in outputs:
            layer.blocked = f"the expert ids '{name}' are a graph output"
            return
        for node, i in readers.get(name, []):
            rule = ID_RULES.get(rule_key(node))
            got = rule(node, i, consts, shapes) if rule is not None else None
            if got is not None and got[0] == "sink" and np.shape(consts[got[1]])[got[2]] != layer.experts:
                got = None
            if got is None:
                layer.remaps.append((node.name, i))
            elif got[0] == "pass":
                todo.append(got[1])
            else:
                sinks.setdefault((got[1], got[2]), set()).add(node.name)
    for (c, d), users in sinks.items():
        layer.users |= users
        if (c, d) not in layer.slices:
            layer.slices.append((c, d))
            layer.expert_weights.append(c)
