"""The rule of every operator spa knows: the table the channel model, the MAC count and surgery read.

``spa.ops.rules`` (with the layout family of ``spa.ops.layout``) holds the rules of the standard
operators; the families with a module of their own (``quant``, ``rnn``, ``fused``) each have
``RULES`` (rule key -> rule), ``MACS`` (rule key -> (macs(node, shapes), mac_axes(node, shapes)),
counted by ``spa.planning.counting``) and ``REWRITES`` (surgery's rewrites of their attributes).
This module gathers them; the families import ``rules`` for the ties they share with it (a
QLinearConv ties like a Conv), never this table.
"""
from __future__ import annotations

from . import fused, quant, rnn, rules

#: rule key -> rule, for every operator with a rule
RULES: dict = dict(rules.RULES)
#: rule key -> (macs, mac_axes) of the families with a module of their own (Conv, ConvTranspose,
#: Gemm and MatMul are counted by ``spa.planning.counting`` itself)
MACS: dict = {}
for _family in (quant, rnn, fused):
    RULES.update(_family.RULES)
    MACS.update(_family.MACS)
#: rewrite kind -> surgery's rewrite, of the families with a module of their own
REWRITES: dict = {**quant.REWRITES, **rnn.REWRITES, **fused.REWRITES}


def rule_key(node) -> str:
    """The key of a node's rule in ``RULES``: the op type for the default ONNX domain,
    ``domain:op`` for the others (``com.microsoft:Attention``)."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def rule_for(node):
    return RULES.get(rule_key(node))


#: operators whose rule exists; everything else blocks the axes it touches.
SUPPORTED = sorted(RULES)
