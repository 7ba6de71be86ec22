"""Depth pruning: whole residual branches removed (``stage``), over the branches of
``spa.graph.blocks``, the scores of ``spa.scoring.blocks`` and the surgery of
``spa.surgery.blocks``.  See docs/depth.md."""
