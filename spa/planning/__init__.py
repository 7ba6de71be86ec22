"""Planning: which channels go.  The params and MACs of a model and of a removal (``counting``), the
plan from scores and a target (``plan``), the sensitivity-aware allocation across groups
(``allocation``) and the fidelity guard every prune reports (``fidelity``)."""

#: --allocate: how a target is spread over the groups (``spa.api``; here, with no imports, for the command line)
ALLOCATIONS = ("auto", "global", "uniform", "stacks", "sensitivity")
#: --fidelity-metric: what fidelity measures per output (``spa.planning.agreement``; here for the command line)
METRICS = ("auto", "cosine", "top1", "ctc", "mask", "neighbours", "tokens")
