"""Expert scores (higher = keep): one score per expert of each mixture-of-experts layer.

Without data, an expert's score is the L2 norm of its router row: the router's logit for it grows
with that norm, so a small row is an expert that is rarely the largest logit (onnxsim ranks MoE
experts by the gate weights in the same spirit).  With calibration data it is the task-conditioned
expected selection score of PreMoe (TCESS): over every token of the data, the softmax router
probability of the expert where TopK chose it and 0 where it did not, averaged.  It weighs how
often an expert is chosen by how confidently, so an expert chosen once with high probability does
not outrank one that carries the task.
"""
from __future__ import annotations

import numpy as np

from ..io.weights import is_float
from ..runtime import calib as calib_mod, probing

#: the scorers of ``spa prune --target experts=F``: router row norms without data, TCESS with it,
#: the measured drift with ``--allocate sensitivity``
SCORERS = ("router_norm", "tcess", "drift")


def router_norm(layer, consts) -> np.ndarray:
    """The L2 norm of each expert's router row (float64, one per expert)."""
    name, dim = layer.slices[0]
    w = np.asarray(consts[name], np.float64)
    return np.sqrt(np.square(np.moveaxis(w, dim, 0)).reshape(layer.experts, -1).sum(1))


def router_logits(an, layers, feeds, progress=None) -> dict:
    """Run ``feeds`` through the analysed model and return, per layer index, the router logits and
    TopK's selection scores as ``[tokens, experts]`` float64 arrays (concatenated over batches)."""
    wanted = [t for layer in layers for t in (layer.logits, layer.scores)]
    runner, fetch = calib_mod.exposing_session(an, wanted)
    got = {layer.index: ([], []) for layer in layers}
    for j, feed in enumerate(feeds):
        if progress is not None:
            progress(f"router logits: calibration batch {j + 1}/{len(feeds)}")
        values = calib_mod.run_batch(runner, feed, fetch)
        for layer in layers:
            for k, t in enumerate((layer.logits, layer.scores)):
                v = np.asarray(values[t], np.float64)
                got[layer.index][k].append(v.reshape(-1, layer.experts))
    return {i: (np.concatenate(a), np.concatenate(b)) for i, (a, b) in got.items()}


def tcess(logits: np.ndarray, selection: np.ndarray, k: int) -> np.ndarray:
    """TCESS per expert from ``[tokens, experts]`` router logits and the scores TopK ranks
    (``selection``; the same as the logits for a softmax router): mean over tokens of
    ``softmax(logits)[t, e] * [e in top-k of selection[t]]``."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    top = np.argpartition(-selection, k - 1, axis=1)[:, :k]
    chosen = np.zeros_like(p, bool)
    np.put_along_axis(chosen, top, True, axis=1)
    return (p * chosen).sum(0) / max(len(p), 1)


def selection_frequency(selection: np.ndarray, k: int) -> np.ndarray:
    """The fraction of tokens whose top-k holds each expert."""
    top = np.argpartition(-selection, k - 1, axis=1)[:, :k]
    return np.bincount(top.ravel(), minlength=selection.shape[1]) / max(len(selection), 1)


def selection_share(selection: np.ndarray, k: int, kept) -> float:
    """The fraction of the data's (token, choice) selections that fall on ``kept`` experts: how much
    of a task's routing a kept set preserves."""
    top = np.argpartition(-selection, k - 1, axis=1)[:, :k]
    return float(np.isin(top, np.asarray(kept)).mean()) if top.size else 1.0


def expert_scores(an, layers, *, feeds=None, progress=None) -> tuple[str, dict]:
    """``(scorer name, {layer index: scores})``: TCESS on ``feeds`` when given, router norms otherwise."""
    live = [layer for layer in layers if not layer.blocked]
    if feeds is None:
        return "router_norm", {layer.index: router_norm(layer, an.weights) for layer in live}
    runs = router_logits(an, live, feeds, progress)
    return "tcess", {layer.index: tcess(*runs[layer.index], layer.top_k) for layer in live}


def mask_inputs(proto, layers) -> tuple:
    """A copy of ``proto`` whose router logits each get a graph input added (``[experts]``, 0 keeps
    an expert, -inf removes it): the masked original in one session.  Returns ``(proto, names)``."""
    import onnx
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    names = {}
    nodes = list(out.graph.node)
    for layer in layers:
        node = next(n for n in nodes if n.name == layer.router)
        name, raw = f"spa/expert_mask/{layer.index}", f"{layer.logits}/unmasked"
        node.output[0] = raw
        out.graph.node.insert(list(out.graph.node).index(node) + 1,
                              onnx.helper.make_node("Add", [raw, name], [layer.logits], name=f"{name}/add"))
        out.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [layer.experts]))
        names[layer.index] = name
    del out.graph.value_info[:]
    return out, names


def _flat(outputs: dict) -> np.ndarray:
    """Every float output, flattened into one float64 vector (what the drift's cosine compares)."""
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in outputs.values()
                           if is_float(np.asarray(v).dtype)])


def drift_scores(an, layers, feeds, progress=None) -> dict:
    """The measured drift of every expert (higher = keep): ``1 - cosine`` of the model's outputs to
    the original's on ``feeds`` when that expert alone is removed (its router logit at -inf, which is
    exactly what removing it does), in one onnxruntime session with a mask input per layer.  Costs
    one run per expert and batch: what it buys is the output's own say, where norms and TCESS only
    read the router."""
    live = [la for la in layers if not la.blocked]
    proto, names = mask_inputs(an.model, live)
    runner = probing.output_runner(proto, an.probe.consts)
    outputs = [o.name for o in an.model.graph.output]
    zero = {names[la.index]: np.zeros(la.experts, np.float32) for la in live}
    refs = [_flat(runner.run({**f, **zero}, outputs)) for f in feeds]
    got = {}
    for j, la in enumerate(live):
        if progress is not None:
            progress(f"expert drift: layer {j + 1}/{len(live)} ({la.experts} experts)")
        d = np.zeros(la.experts)
        for e in range(la.experts):
            mask = dict(zero)
            mask[names[la.index]] = np.where(np.arange(la.experts) == e, -np.inf, 0).astype(np.float32)
            for f, ref in zip(feeds, refs):
                y = _flat(runner.run({**f, **mask}, outputs))
                d[e] += 1.0 - float(ref @ y / max(np.linalg.norm(ref) * np.linalg.norm(y), 1e-30))
        got[la.index] = d / max(len(feeds), 1)
    return got
