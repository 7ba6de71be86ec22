"""A mixture-of-experts model with a planted routing structure, and task data for it: the bench of
task expert patterns (docs/moe.md) and the fixture of tests/surgery/test_expert_patterns.py.

The model (onnx.helper, random weights, opset 18): input ``x`` [tokens, 32] float; ``LAYERS`` residual
MoE layers, each a router MatMul [32, 16] -> Softmax -> TopK (k=2) over 16 experts whose stacked weights
[16, 32, 48] and [16, 48, 32] are chosen by Gather(ids) (the Mixtral pattern without attention), a ReLU
MLP per expert, routing weights renormalised over the two chosen; out ``y`` [tokens, 32].  Planted
structure: each of ``TASKS`` tasks has a direction in the input space and, in every layer, its own
four experts (a different four per layer) whose router columns point along it; a task's tokens are
its direction plus noise.  So a task routes almost only to its four experts per layer, and which
four is visible in the router logits alone.

    python tools/planted_moe.py OUT_DIR     # writes planted_moe.onnx and task_{0..3}.npz (+ held-out)

prints the selection share each task's pattern keeps at 25% of the experts and the task match of
held-out batches (``spa experts profile/match``), the numbers docs/moe.md quotes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

H, E, INNER, K, TASKS, LAYERS = 32, 16, 48, 2, 4, 2
#: how strongly a task's experts' router columns point along its direction, and the tokens' noise
ROUTER_PULL, NOISE = 2.5, 0.7
PER_TASK = E // TASKS


def directions(seed: int = 0) -> np.ndarray:
    """One unit direction per task (orthonormal)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((H, TASKS)))
    return q.T.astype(np.float32)


def expert_sets(seed: int = 0) -> list:
    """Per layer, the experts of each task: a random partition of the 16 experts into fours."""
    rng = np.random.default_rng(seed + 1)
    return [rng.permutation(E).reshape(TASKS, PER_TASK) for _ in range(LAYERS)]


def build(seed: int = 0):
    rng = np.random.default_rng(seed + 2)
    u, sets = directions(seed), expert_sets(seed)
    nodes, inits = [], [numpy_helper.from_array(np.array([K], np.int64), "k"),
                        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
                        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
                        numpy_helper.from_array(np.array([-1], np.int64), "last")]
    h = "x"
    for layer in range(LAYERS):
        router = rng.standard_normal((H, E)).astype(np.float32) * 0.3
        for t in range(TASKS):
            router[:, sets[layer][t]] += ROUTER_PULL * u[t][:, None]
        p = f"l{layer}."
        inits += [numpy_helper.from_array(router, p + "router"),
                  numpy_helper.from_array(rng.standard_normal((E, H, INNER)).astype(np.float32) * 0.1, p + "w1"),
                  numpy_helper.from_array(rng.standard_normal((E, INNER, H)).astype(np.float32) * 0.1, p + "w2")]
        nodes += [helper.make_node("MatMul", [h, p + "router"], [p + "logits"], name=p + "router"),
                  helper.make_node("Softmax", [p + "logits"], [p + "probs"], axis=-1),
                  helper.make_node("TopK", [p + "probs", "k"], [p + "w", p + "ids"], axis=-1, name=p + "topk"),
                  helper.make_node("ReduceSum", [p + "w", "last"], [p + "wsum"], keepdims=1),
                  helper.make_node("Div", [p + "w", p + "wsum"], [p + "wn"]),
                  helper.make_node("Gather", [p + "w1", p + "ids"], [p + "g1"], axis=0),     # [T, 2, H, I]
                  helper.make_node("Gather", [p + "w2", p + "ids"], [p + "g2"], axis=0),     # [T, 2, I, H]
                  helper.make_node("Unsqueeze", [h, "axis1"], [p + "h3"]),                   # [T, 1, H]
                  helper.make_node("Unsqueeze", [p + "h3", "axis2"], [p + "h4"]),            # [T, 1, 1, H]
                  helper.make_node("MatMul", [p + "h4", p + "g1"], [p + "a"]),               # [T, 2, 1, I]
                  helper.make_node("Relu", [p + "a"], [p + "r"]),
                  helper.make_node("MatMul", [p + "r", p + "g2"], [p + "b"]),                # [T, 2, 1, H]
                  helper.make_node("Unsqueeze", [p + "wn", "last"], [p + "w3"]),
                  helper.make_node("Unsqueeze", [p + "w3", "last"], [p + "w4"]),
                  helper.make_node("Mul", [p + "b", p + "w4"], [p + "bw"]),
                  helper.make_node("ReduceSum", [p + "bw", "axis1"], [p + "s3"], keepdims=0),  # [T, 1, H]
                  helper.make_node("Squeeze", [p + "s3", "axis1"], [p + "moe"]),
                  helper.make_node("Add", [h, p + "moe"], [p + "out"])]
        h = p + "out"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    g = helper.make_graph(nodes, "planted_moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", H])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", H])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def task_tokens(task: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` tokens of ``task``: its direction, scaled, plus isotropic noise."""
    rng = np.random.default_rng(1000 * (task + 1) + seed)
    return (directions()[task] * 3.0 + rng.standard_normal((n, H)) * NOISE).astype(np.float32)


def write(out_dir) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from spa.io import save_model
    save_model(build(), out / "planted_moe.onnx")
    paths = {}
    for t in range(TASKS):
        for split, seed in (("", 0), ("_heldout", 7)):
            p = out / f"task_{t}{split}.npz"
            np.savez(p, x=task_tokens(t, 256, seed))
            paths[f"{t}{split}"] = p
    return paths


def main(out_dir) -> None:
    import spa
    paths = write(out_dir)
    model = str(Path(out_dir) / "planted_moe.onnx")
    shapes = {"x": [64, H]}
    an = spa.analyze(model, input_shapes=shapes)
    doc = None
    for t in range(TASKS):
        doc = spa.profile_experts(model, str(paths[str(t)]), f"task{t}", into=doc, analysis=an)
    from spa.graph.experts import find_layers
    from spa.planning.experts import plan_experts
    from spa.planning.patterns import task_scores
    from spa.scoring.experts import router_logits, router_norm, selection_share
    from spa.runtime import calib
    layers = find_layers(an.model, an.weights, an.probe.shapes)
    for t in range(TASKS):
        kept = plan_experts(layers, task_scores(doc, f"task{t}", layers), 0.25)
        _, feeds = calib.batches(an, str(paths[f"{t}_heldout"]))
        runs = router_logits(an, layers, feeds)
        shares = [selection_share(runs[la.index][1], la.top_k, kept[la.index]) for la in layers]
        blind = plan_experts(layers, {la.index: router_norm(la, an.weights) for la in layers}, 0.25)
        base = [selection_share(runs[la.index][1], la.top_k, blind[la.index]) for la in layers]
        got = spa.match_experts(doc, str(paths[f"{t}_heldout"]), model, analysis=an)
        print(f"task{t}: kept {[kept[la.index].tolist() for la in layers]}, held-out selections kept "
              f"{[round(s, 4) for s in shares]} (router norms: {[round(s, 4) for s in base]}), "
              f"match -> {got['closest']} "
              f"({got['tasks'][0]['similarity']:.3f} vs next {got['tasks'][1]['similarity']:.3f})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "planted_moe")
