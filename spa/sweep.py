"""``spa sweep MODEL --targets macs=1.5,2,3 --criteria l2,obspa -o DIR``: prune every combination of
a target and a criterion, measure each pruned model's fidelity, and write the table, its Pareto front
(the most MACs removed for the fidelity kept) and a plot (docs/sweep.md).

Every combination is one call of :func:`run_one` (``spa.prune`` with the sweep's options, the
combination's target and criterion): in local processes by default (``jobs`` at a time, each a fresh
interpreter), or, with ``ray``, as one Ray task each on a running Ray cluster, the model read by each
worker from its path (shared storage).  Both give the same rows: every prune is seeded, and the rows
hold no timing but ``seconds`` (and ``worker``, the host and process that ran it), which
:func:`table` leaves out.  Latency, when asked (``bench``), is measured by the worker that pruned, so
on a cluster it is that node's: compare speedups, not milliseconds, across nodes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .errors import SpaError

#: the columns of the table, in order (``seconds`` is in the JSON only: it differs from run to run)
COLUMNS = ("criterion", "target", "macs_factor", "params_factor", "fidelity", "metric", "macs", "params")


def combinations(targets, criteria) -> list:
    """``[{"target": ..., "criterion": ...}]``, every criterion at every target, targets outermost;
    ``"macs=1.5,2,params=3"`` is macs=1.5, macs=2, params=3."""
    raw, targets, kind = targets.split(",") if isinstance(targets, str) else targets, [], None
    for t in (t.strip() for t in raw):   # "macs=1.5,2,3": a bare number takes the kind before it
        if not t:
            continue
        if "=" in t:
            kind = t.partition("=")[0]
        elif kind is not None:
            t = f"{kind}={t}"
        targets.append(t)
    criteria = [c.strip() for c in (criteria.split(",") if isinstance(criteria, str) else criteria) if c.strip()]
    if not targets or not criteria:
        raise SpaError("spa sweep: give at least one --targets value and one --criteria value")
    return [{"target": t, "criterion": c} for t in targets for c in criteria]


def run_one(model: str, combo: dict, options: dict, out_dir=None, bench: dict | None = None) -> dict:
    """Prune ``model`` at one combination; the row of the table (``error`` instead when spa refused).
    ``bench`` (``spa.verify.bench.benchmark`` keywords): also measure the original's and the pruned
    model's latency on this worker (``original_ms``, ``pruned_ms``, ``speedup``)."""
    import tempfile
    from .api import PruneOptions, prune
    t0 = time.perf_counter()
    row = dict(combo)
    with tempfile.TemporaryDirectory(prefix="spa-sweep-") as tmp:
        output = None
        if out_dir is not None or bench is not None:
            name = f"{combo['criterion']}_{combo['target'].replace('=', '')}.onnx"
            output = Path(out_dir if out_dir is not None else tmp) / name
        try:
            res = prune(model, options=PruneOptions(**{**options, **combo}), output=output)
        except SpaError as exc:
            return {**row, "error": str(exc), "seconds": round(time.perf_counter() - t0, 3), "worker": _worker()}
        if bench is not None:
            from .verify.bench import benchmark
            got = {r["model"]: r["median_ms"] for r in benchmark([model, str(output)], **bench)["results"]}
            row.update(original_ms=got.get(model), pruned_ms=got.get(str(output)))
            if row["original_ms"] and row["pruned_ms"]:
                row["speedup"] = round(row["original_ms"] / row["pruned_ms"], 3)
        if out_dir is None:
            output = None
    r = res.report
    fid = r.get("fidelity") or {}
    worst = min(fid["agreement"], key=fid["agreement"].get) if fid.get("agreement") else None
    row.update(macs=r["after"]["macs"], params=r["after"]["params"],
               macs_factor=round(r["before"]["macs"] / max(r["after"]["macs"], 1), 4),
               params_factor=round(r["before"]["params"] / max(r["after"]["params"], 1), 4),
               fidelity=fid.get("min"), metric=(fid.get("metric") or {}).get(worst, "cosine"),
               seconds=round(time.perf_counter() - t0, 3), worker=_worker())
    if output is not None:
        row["output"] = str(output)
    return row


def _worker() -> str:
    import socket
    return f"{socket.gethostname()}:{os.getpid()}"


def _local(model, combos, options, out_dir, bench, jobs, progress):
    import concurrent.futures as cf
    import multiprocessing as mp
    rows = [None] * len(combos)
    with cf.ProcessPoolExecutor(max_workers=max(1, min(jobs, len(combos))), mp_context=mp.get_context("spawn")) as ex:
        futures = {ex.submit(run_one, model, c, options, out_dir, bench): i for i, c in enumerate(combos)}
        for done, f in enumerate(cf.as_completed(futures), 1):
            rows[futures[f]] = f.result()
            progress(f"sweep: {done}/{len(combos)} done ({_label(combos[futures[f]])})")
    return rows


def _ray(model, combos, options, out_dir, bench, address, progress):
    try:
        import ray
    except ImportError:
        raise SpaError("--ray needs Ray: pip install 'spa-prune[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    task = ray.remote(num_cpus=1)(run_one)
    refs = [task.remote(model, c, options, out_dir, bench) for c in combos]
    rows = [None] * len(combos)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i = refs.index(done[0])
        rows[i] = ray.get(done[0])
        progress(f"sweep: {len(combos) - len(pending)}/{len(combos)} done on Ray ({_label(combos[i])})")
    return rows


def _label(c) -> str:
    return f"{c['criterion']} at {c['target']}"


def pareto(rows) -> list:
    """Indices of the rows no other row beats on both MACs factor and fidelity (higher is better)."""
    ok = [(i, r["macs_factor"], r["fidelity"]) for i, r in enumerate(rows)
          if "error" not in r and r.get("fidelity") is not None]
    return sorted(i for i, m, f in ok
                  if not any((m2 >= m and f2 >= f) and (m2 > m or f2 > f) for _, m2, f2 in ok))


def sweep(model, targets, criteria, *, options: dict | None = None, out_dir=None, jobs: int = 1, ray=None,
          keep_models: bool = False, bench: dict | None = None, progress=None) -> dict:
    """Run the sweep (see the module docstring); ``{"model", "rows", "pareto", "options"}``.
    ``options``: PruneOptions fields shared by every combination; ``ray``: a Ray address ("auto" for
    the running cluster) or None for local processes; ``bench``: measure latency (see :func:`run_one`)."""
    say = progress or (lambda msg: None)
    combos = combinations(targets, criteria)
    options = dict(options or {})
    from .api import PruneOptions
    for c in combos:   # every option before any work (one-line errors)
        PruneOptions(**{**options, **c}).checked()
    model = str(Path(model).resolve()) if os.path.exists(str(model)) else str(model)
    models = None
    if keep_models:
        if out_dir is None:
            raise SpaError("--keep-models writes the pruned models into the output folder: give -o DIR")
        models = str((Path(out_dir) / "models").resolve())
        Path(models).mkdir(parents=True, exist_ok=True)
    say(f"sweep: {len(combos)} combinations of {model}" + (f" on Ray ({ray})" if ray else f", {jobs} at a time"))
    rows = (_ray(model, combos, options, models, bench, ray, say) if ray
            else _local(model, combos, options, models, bench, jobs, say))
    return {"model": model, "options": {k: v for k, v in options.items() if v is not None}, "rows": rows,
            "pareto": pareto(rows), **({"bench": bench} if bench is not None else {})}


def table(result: dict) -> str:
    """The rows as a markdown table, by MACs factor; the Pareto front marked."""
    front = set(result["pareto"])
    columns = COLUMNS + (("speedup",) if any("speedup" in r for r in result["rows"]) else ())
    lines = ["| " + " | ".join(columns) + " | Pareto |", "|" + "---|" * (len(columns) + 1)]
    order = sorted(range(len(result["rows"])), key=lambda i: (-(result["rows"][i].get("macs_factor") or 0), i))
    for i in order:
        r = result["rows"][i]
        if "error" in r:
            lines.append(f"| {r['criterion']} | {r['target']} | error: {r['error']} |" + " |" * (len(columns) - 2))
            continue
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in columns]
        lines.append("| " + " | ".join(cells) + f" | {'yes' if i in front else ''} |")
    return "\n".join(lines) + "\n"


def plot(result: dict) -> str:
    """Fidelity against MACs factor, one series per criterion, the Pareto front joined (SVG)."""
    from .verify.report import svg_scatter
    rows = [r for r in result["rows"] if "error" not in r and r.get("fidelity") is not None]
    series = []
    for crit in dict.fromkeys(r["criterion"] for r in rows):
        series.append((crit, [(r["macs_factor"], r["fidelity"], f"{crit} {r['target']}") for r in rows
                              if r["criterion"] == crit], False))
    front = [result["rows"][i] for i in result["pareto"]]
    series.append(("Pareto front", [(r["macs_factor"], r["fidelity"], f"{r['criterion']} {r['target']}")
                                    for r in front], True))
    return svg_scatter(f"spa sweep: {Path(result['model']).name}", series, "MACs reduction factor", "fidelity") + "\n"


def write(result: dict, out_dir, inputs=()) -> list:
    """``sweep.json``, ``sweep.md`` and ``sweep.svg`` in ``out_dir`` (the safe writer); their paths."""
    from .io import write_text
    out = Path(out_dir)
    files = [(out / "sweep.json", json.dumps(result, indent=1)), (out / "sweep.md", table(result)),
             (out / "sweep.svg", plot(result))]
    for path, text in files:
        write_text(path, text, inputs=list(inputs), what="spa sweep")
    return [str(p) for p, _ in files]
