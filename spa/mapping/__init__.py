"""Back to the framework: the map file of the kept indices of every sliced tensor, written by
``spa prune --map`` and applied to a framework checkpoint by ``spa apply-map`` (``mapfile``), and
the per-layer report of a pruned transformer's new widths (``layers``)."""
