"""How the expert axis of a mixture-of-experts layer flows: the rule family of whole-expert removal.

The expert axis is not a channel axis that the union-find of ``spa.graph.channels`` can tie: the
router's logits carry it as a dimension, but past TopK it becomes *values* (expert ids) that choose
rows of the stacked expert weights at run time.  So it has rules of its own, two tables over plain
data (``consts``: initializer arrays, ``shapes``: probed shapes):

* ``LOGIT_RULES``: op -> ``rule(node, i, dim, consts, shapes)`` for a node reading the expert axis
  ``dim`` of its input ``i`` (router logits, probabilities, biased scores).  It returns
  ``("pass", output, dim, slices)`` (the axis continues on ``output``; ``slices`` are constants to
  cut along it: a routing bias), ``("topk", k)`` (TopK over the axis: its indices output becomes
  expert ids), ``("fused", k, slices)`` (onnxruntime's ``com.microsoft`` MoE/QMoE: routing and
  experts in one node, its per-expert inputs cut along their first dim) or ``("block", why)``.
  Keys are op types, ``domain:op`` outside the default domain (``spa.ops.registry.rule_key``).
* ``ID_RULES``: op -> ``rule(node, i, consts, shapes)`` for a node reading expert ids on input ``i``.
  It returns ``("pass", output)`` (the ids move on unchanged: Reshape, Unsqueeze...),
  ``("sink", const, dim)`` (the ids index ``dim`` of a constant: stacked expert weights that
  surgery slices, so the compact ids of the pruned model pick the same experts) or None: the node
  needs the original numbering (Equal against an expert number, OneHot, a graph output), and
  surgery feeds it the ids mapped back through the kept experts (a Gather of a constant table).
  Masked-original semantics then hold exactly: a removed expert is never chosen, its id never seen.

Unknown operators on the logit path block the layer (they never guess); on the id path they get
the original ids back, which is always exact.
"""
from __future__ import annotations

import numpy as np

from .common import attr


def _expert_dim(dim, rank):
    return dim if dim >= 0 else dim + rank


def logit_unary(node, i, dim, consts, shapes):
    """Elementwise on one operand (Sigmoid: DeepSeek-style scores; Softmax over the experts:
    softmax over the kept experts is softmax with the removed ones at -inf)."""
    if node.op_type in ("Softmax", "LogSoftmax"):
        rank = len(shapes.get(node.input[0], ()))
        if _expert_dim(attr(node, "axis", -1), rank) != dim:
            return ("block", f"{node.op_type} '{node.name}' normalises over another axis than the experts")
    return ("pass", node.output[0], dim, [])


def logit_binary(node, i, dim, consts, shapes):
    """Add/Sub/Mul/Div with a broadcast operand: a scalar passes, a constant with one value per expert
    (a routing bias, DeepSeek's e_score_correction_bias) is cut with the axis, anything else blocks."""
    out_rank = len(shapes.get(node.output[0], ()))
    rank = len(shapes.get(node.input[i], ()))
    out_dim = dim + out_rank - rank
    other = node.input[1 - i]
    oshape = shapes.get(other, np.shape(consts[other]) if other in consts else None)
    if oshape is None:
        return ("block", f"{node.op_type} '{node.name}': unknown shape of the operand beside the expert logits")
    od = out_dim - (out_rank - len(oshape))
    size = 1 if od < 0 else oshape[od]
    if size == 1:
        return ("pass", node.output[0], out_dim, [])
    if other in consts:
        return ("pass", node.output[0], out_dim, [(other, od)])
    return ("block", f"{node.op_type} '{node.name}' combines the expert logits with a computed per-expert tensor")


def logit_topk(node, i, dim, consts, shapes):
    rank = len(shapes.get(node.input[0], ()))
    if i != 0 or _expert_dim(attr(node, "axis", -1), rank) != dim:
        return ("block", f"TopK '{node.name}' does not select over the experts")
    k = consts.get(node.input[1]) if len(node.input) > 1 else None
    if k is None:
        return ("block", f"TopK '{node.name}': k is computed at run time")
    return ("topk", int(np.asarray(k).reshape(-1)[0]))


def logit_fused_moe(node, i, dim, consts, shapes):
    """onnxruntime's MoE and QMoE read the router's logits (input 1, experts last) and pick their
    top k inside; every input after it (fc1/fc2/fc3 weights, biases, scales, zero points) is per
    expert along dim 0, so all of them are cut with the router's rows."""
    rank = len(shapes.get(node.input[1], ())) if len(node.input) > 1 else 0
    if i != 1 or dim != rank - 1:
        return ("block", f"{node.op_type} '{node.name}' reads the expert axis as something else than router logits")
    computed = [x for x in node.input[2:] if x and x not in consts]
    if computed:
        return ("block", f"{node.op_type} '{node.name}': expert weights '{computed[0]}' are computed, not constants")
    return ("fused", int(attr(node, "k", 1)), [(x, 0) for x in node.input[2:] if x])


#: op -> rule for a node reading the expert axis (router logits and what follows them)
LOGIT_RULES = {
    "com.microsoft:MoE": logit_fused_moe,
    "com.microsoft:QMoE": logit_fused_moe,
    **dict.fromkeys(("Softmax", "LogSoftmax", "Sigmoid", "Relu", "Identity", "Cast", "Exp", "Tanh"), logit_unary),
    **dict.fromkeys(("Add", "Sub", "Mul", "Div"), logit_binary),
    "TopK": logit_topk,
}


def id_pass(node, i, consts, shapes):
    """Rearrangements of the ids that keep their values (and integer type)."""
    if i != 0:
        return None
    return ("pass", node.output[0])


def id_gathernd(node, i, consts, shapes):
    """GatherND(stacked, ids[..., 1]) picks one expert's weights per (token, choice): the Mixtral
    dynamo export's batched experts."""
    if i == 0:
        return ("pass", node.output[0])
    if attr(node, "batch_dims", 0) != 0 or node.input[0] not in consts:
        return None
    ishape = shapes.get(node.input[1])
    if ishape is None or ishape[-1] != 1:
        return None
    return ("sink", node.input[0], 0)


def id_gather(node, i, consts, shapes):
    """Gather(stacked, ids, axis=a): the expert weights (or per-expert constants) chosen by id."""
    if i == 0:
        return ("pass", node.output[0])
    if node.input[0] not in consts:
        return None
    rank = np.ndim(consts[node.input[0]])
    return ("sink", node.input[0], _expert_dim(attr(node, "axis", 0), rank))


#: op -> rule for a node reading expert ids (TopK's indices and their rearrangements)
ID_RULES = {
    **dict.fromkeys(("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Transpose", "Expand"), id_pass),
    "GatherND": id_gathernd,
    "Gather": id_gather,
}
