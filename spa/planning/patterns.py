"""Task expert patterns (PreMoe's task-adaptive expert retrieval): small JSON, one entry per task.

``spa experts profile`` stores, for a task's calibration data, each MoE layer's expert scores
(TCESS) and selection frequencies; ``spa prune --experts-from FILE --task NAME --target
experts=F`` keeps the experts that task's pattern ranks highest; ``spa experts match`` scores a
query batch the same way and names the stored task whose pattern it is closest to (the cosine of
the per-layer score vectors, each layer scaled to unit length so that every layer counts alike).

The document (``FORMAT``, version 1)::

    {"format": "spa-expert-patterns", "version": 1, "model": "<the model as given>",
     "layers": [{"router": "<node>", "experts": E, "top_k": k}, ...],
     "tasks": {"<name>": {"source": "<calib>", "tokens": T,
                          "scores": [[TCESS per expert] per layer],
                          "selected": [[selection frequency per expert] per layer]}}}

Layers are matched to a model by router name and expert count: a pattern never applies to a model
it was not made on.  Plain functions over plain data; the run that gathers the scores is in ``spa.api``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import SpaError

FORMAT = "spa-expert-patterns"
VERSION = 1
#: a patterns file bigger than this is not a patterns file (they are a few kB per task)
MAX_BYTES = 16 << 20


def layer_entries(layers) -> list:
    return [{"router": la.router, "experts": la.experts, "top_k": la.top_k} for la in layers if not la.blocked]


def add_task(doc: dict | None, model: str, layers, name: str, scores: dict, selected: dict, source: str,
             tokens: int) -> dict:
    """``doc`` (or a new document) with task ``name`` set (replaced if it was there)."""
    entries = layer_entries(layers)
    if doc is None:
        doc = {"format": FORMAT, "version": VERSION, "model": model, "layers": entries, "tasks": {}}
    elif doc["layers"] != entries:
        raise SpaError(f"--output: the patterns there were made on another model ({doc.get('model')}: "
                       f"{len(doc['layers'])} MoE layers); write this task's pattern to another file")
    live = [la for la in layers if not la.blocked]
    doc["tasks"][name] = {"source": source, "tokens": int(tokens),
                          "scores": [[round(float(v), 6) for v in scores[la.index]] for la in live],
                          "selected": [[round(float(v), 6) for v in selected[la.index]] for la in live]}
    return doc


def load(path, what: str = "--experts-from") -> dict:
    """A patterns document, checked: one-line SpaErrors (naming the option ``what``) for anything else."""
    p = Path(path)
    if not p.is_file():
        raise SpaError(f"{what} {p}: no such file (make one with spa experts profile)")
    if p.stat().st_size > MAX_BYTES:
        raise SpaError(f"{what} {p}: {p.stat().st_size} bytes is too big for a patterns file")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpaError(f"{what} {p}: not JSON ({str(exc).splitlines()[0][:100]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise SpaError(f"{what} {p}: not a {FORMAT} version {VERSION} file")
    layers, tasks = doc.get("layers"), doc.get("tasks")
    if not isinstance(layers, list) or not isinstance(tasks, dict) or not all(
            isinstance(la, dict) and isinstance(la.get("router"), str) and isinstance(la.get("experts"), int)
            for la in layers):
        raise SpaError(f"{what} {p}: malformed 'layers' or 'tasks'")
    for name, t in tasks.items():
        for key in ("scores", "selected"):
            rows = t.get(key) if isinstance(t, dict) else None
            if not isinstance(rows, list) or len(rows) != len(layers) or not all(
                    isinstance(r, list) and len(r) == la["experts"] and all(
                        isinstance(v, (int, float)) and math.isfinite(v) for v in r)
                    for r, la in zip(rows, layers)):
                raise SpaError(f"{what} {p}: task '{name}': '{key}' must hold one finite number per "
                               f"expert of each of the {len(layers)} layers")
    return doc


def _aligned(doc: dict, layers) -> list:
    """For each stored layer, the model's layer it describes (by router name and expert count)."""
    by_router = {la.router: la for la in layers if not la.blocked}
    out = []
    for entry in doc["layers"]:
        la = by_router.get(entry["router"])
        if la is None or la.experts != entry["experts"]:
            raise SpaError(f"the patterns were made on another model ({doc.get('model')}): its MoE layer "
                           f"'{entry['router']}' with {entry['experts']} experts is not in this one")
        out.append(la)
    return out


def task_scores(doc: dict, task: str, layers) -> dict:
    """``{layer index: scores}`` of stored task ``task`` for this model's layers."""
    if task not in doc["tasks"]:
        raise SpaError(f"--task {task!r}: the patterns hold {', '.join(sorted(doc['tasks'])) or 'no task'}")
    rows = doc["tasks"][task]["scores"]
    return {la.index: np.asarray(r, np.float64) for la, r in zip(_aligned(doc, layers), rows)}


def _unit(rows) -> np.ndarray:
    v = [np.asarray(r, np.float64) for r in rows]
    return np.concatenate([r / max(np.linalg.norm(r), 1e-12) for r in v]) / math.sqrt(max(len(v), 1))


def match(doc: dict, layers, scores: dict) -> list:
    """Every stored task with the cosine of its pattern to ``scores`` (``{layer index: scores}``),
    closest first: ``[{"task", "similarity"}]``."""
    aligned = _aligned(doc, layers)
    query = _unit([scores[la.index] for la in aligned])
    ranked = [{"task": name, "similarity": round(float(query @ _unit(t["scores"])), 6)}
              for name, t in doc["tasks"].items()]
    return sorted(ranked, key=lambda r: -r["similarity"])
