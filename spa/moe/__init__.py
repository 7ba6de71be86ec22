"""Whole experts of mixture-of-experts models: the pipeline that finds, scores, plans and cuts them
(``stage``), over the expert rule family of ``spa.ops.experts``, the layers of ``spa.graph.experts``,
the scores of ``spa.scoring.experts``, the plans and task patterns of ``spa.planning.experts`` and
``spa.planning.patterns``, and the surgery of ``spa.surgery.experts``.  See docs/moe.md."""
