#!/usr/bin/env python
"""Type-shaped shares on SmolLM2-135M: the value head dims of every layer lose R times the share its
MLP loses, layer 0 whole, the shares scaled to a params target, then spa's quality recipe (wanda,
OBS compensation, ridge 3, calibration text) through ``--overrides``; perplexity on the held-out texts.
An experiment for docs/llm_quality.md, not a feature: the shares are fixed by hand.

    python tools/llm_shares.py 0.5 1.25 /tmp/shares.onnx      # R, params target, output
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_llm_quality as bench  # noqa: E402


def main(argv=None) -> int:
    import spa
    from spa.planning.plan import CostModel
    ratio, target, out = float(argv[0]), float(argv[1]), argv[2]
    paths = bench.prepare()
    an = spa.analyze(paths["model"])
    pos = {n.name: i for i, n in enumerate(an.model.graph.node)}
    in_order = lambda gs: sorted(gs, key=lambda g: min(pos[name] for name, _ in g.nodes))  # noqa: E731
    mlp = in_order(g for g in an.groups if g.prunable and g.channels == 1536)
    heads = in_order(g for g in an.groups if g.prunable and g.channels == 64)
    weights = [(g, 0.0 if i == 0 else 1.0) for i, g in enumerate(mlp)]
    weights += [(g, 0.0 if i < len(heads) // len(mlp) else ratio) for i, g in enumerate(heads)]
    cost, goal = CostModel(an), an.params * (1 - 1 / target)

    def shares(f):
        return {g.id: np.floor(g.channels * min(f * w, 0.7)) / g.channels for g, w in weights}

    def saved(f):
        s = shares(f)
        units = [g.units[:int(round(s[g.id] * g.channels))] for g, _ in weights]
        return an.params - cost.estimate(np.concatenate(units))["params"]
    lo, hi = 0.0, 2.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if saved(mid) < goal else (lo, mid)
    overrides = {str(g.id): 0.0 for g in an.groups if g.prunable}
    overrides.update({str(gid): s + 1e-6 for gid, s in shares(hi).items()})
    t0 = time.perf_counter()
    r = spa.prune(paths["model"], options=spa.PruneOptions(
        target=f"params={target}", criterion="wanda", allocate="uniform", compensate="obs", damp=3.0,
        calib=str(paths["calib"]), calib_batch_size=4, overrides=overrides), output=out, analysis=an)
    ppl = bench.measure(out, paths["held"])
    print(json.dumps({"ratio": ratio, "target": target, "reached": r.report.get("target_reached"),
                      "share_mlp": round(shares(hi)[mlp[1].id], 3),
                      "share_head_dims": round(shares(hi)[heads[-1].id], 3),
                      "perplexity": ppl, "seconds": round(time.perf_counter() - t0)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
