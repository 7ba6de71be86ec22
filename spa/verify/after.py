"""What ``spa prune --check`` and ``--bench`` add to the report after the prune: the pruned model compared
with the original in onnxruntime, and both timed, as report entries and as the summary's lines.

Imports of onnx/onnxruntime stay inside the functions: the command line loads this module at start."""
from __future__ import annotations

from ..errors import SpaError


def shape_text(shapes) -> str:
    return ", ".join(f"{k}:[{','.join(map(str, v))}]" for k, v in shapes.items())


def run_check(reference, candidate, shapes, seed, atol, rtol, progress=None) -> dict:
    """``spa.verify.check.compare`` of the pruned model against the original, as the report's "check" entry.

    Without tolerances (mode "report") nothing is judged: ``passed`` is null unless the two models
    cannot be compared at all (signature or output shape mismatch), which is false."""
    from .check import compare
    say = progress or (lambda msg: None)
    tolerance = atol is not None or rtol is not None
    say(f"checking the pruned model against the original in onnxruntime (cpu; {shape_text(shapes)})")
    res = compare(reference, candidate, input_shapes=shapes, seed=seed,
                  atol=1e-5 if atol is None else atol, rtol=1e-4 if rtol is None else rtol,
                  providers=["CPUExecutionProvider"], every_size=True)
    sizes = res.get("sizes", [])
    if not tolerance:
        every = res["outputs"] + [o for s in sizes for o in s["outputs"]]
        comparable = res["signature"]["ok"] and bool(res["outputs"]) \
            and not any(o.get("error") for o in every) and not any(s.get("error") for s in sizes)
        res["passed"] = None if comparable else False
        res["atol"] = res["rtol"] = None
        for o in every:
            o["passed"] = False if o.get("error") else None
        for s in sizes:
            s["passed"] = False if s.get("error") else None
    return {"mode": "tolerance" if tolerance else "report", "passed": res["passed"], "atol": res["atol"],
            "rtol": res["rtol"], "provider": "cpu", "seed": seed, "input_shapes": shapes,
            "signature": res["signature"], "outputs": res["outputs"], "sizes": sizes}


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def format_check(chk) -> str:
    lines = [f"check: pruned vs original in onnxruntime cpu, random inputs {shape_text(chk['input_shapes'])} "
             f"(seed {chk['seed']})"]
    for o in chk["outputs"]:
        shape = "x".join(map(str, o["shape"])) or "scalar"
        if o.get("error"):
            lines.append(f"  {o['name']} [{shape}]: cannot compare: {o['error']}")
            continue
        top1 = "" if o["top1"] is None else f"  top-1 {o['top1']:.3f}"
        verdict = "" if o["passed"] is None else ("  ok" if o["passed"] else "  OUT OF TOLERANCE")
        lines.append(f"  {o['name']} [{shape}]: cosine {fmt(o['cosine'], '.6f')}{top1}  "
                     f"max abs {fmt(o['max_abs'])}  mean abs {fmt(o['mean_abs'])}  "
                     f"max rel {fmt(o['max_rel'])}  mean rel {fmt(o['mean_rel'])}{verdict}")
    for size in chk.get("sizes", []):
        if size.get("skipped") or size.get("error"):
            lines.append(f"  at {size['sizes']}: " + (f"skipped ({size['skipped']})" if size.get("skipped")
                                                        else f"FAILED: {size['error']}"))
            continue
        worst = min((o["cosine"] for o in size["outputs"] if o["cosine"] is not None), default=None)
        bad = [o["name"] for o in size["outputs"] if o.get("error") or o["passed"] is False]
        lines.append(f"  at {size['sizes']}: lowest cosine {fmt(worst, '.6f')}"
                     + (f"  OUT OF TOLERANCE or not comparable: {', '.join(bad)}" if bad else ""))
    for problem in chk["signature"]["problems"]:
        lines.append(f"  signature: {problem}")
    if chk["mode"] == "report":
        lines.append("  (agreement reported, not judged: pass --atol/--rtol for a pass/fail check)"
                     if chk["passed"] is None else "check FAILED: the models cannot be compared")
    else:
        lines.append(f"check {'PASSED' if chk['passed'] else 'FAILED'} (atol={chk['atol']}, rtol={chk['rtol']}: "
                     "|pruned - original| <= atol + rtol * |original|)")
    return "\n".join(lines)


def bench_provider_usable(provider):
    if provider == "cpu":
        return
    import onnxruntime as ort
    from .bench import PROVIDERS
    from .check import cuda_available
    if PROVIDERS[provider][0] not in ort.get_available_providers() or not cuda_available():
        raise SpaError(f"--bench-provider {provider}: {PROVIDERS[provider][0]} is not usable here "
                       "(onnxruntime-gpu with a CUDA GPU is needed); use --bench-provider cpu")


def run_bench(dense, pruned, shapes, provider, warmup, iters, progress=None) -> dict:
    """``spa.verify.bench.benchmark`` of the original and the pruned model, as the report's "bench" entry."""
    from .bench import benchmark
    say = progress or (lambda msg: None)
    first = next(iter(shapes.values()), [])
    batch = first[0] if first else 1  # benchmark sets dim 0 of dynamic inputs to the batch: keep the used one
    say(f"benchmarking original vs pruned ({provider}, {warmup} warmup + {iters} timed runs each, "
        f"interleaved)")
    from .bench import BenchError
    try:
        res = benchmark([dense, pruned], provider=provider, batches=(batch,), warmup=warmup, iters=iters,
                        input_shapes=shapes, progress=progress)
    except BenchError as exc:  # its advice names `spa bench` flags
        raise SpaError(str(exc).replace("pass --allow-cpu-fallback to measure on CPU",
                                        "use --bench-provider cpu")) from None
    rows = {r["model"]: r for r in res["results"]}
    d, p = rows.get(str(dense)), rows.get(str(pruned))
    return {"provider": provider, "batch": batch, "warmup": warmup, "iters": iters, "input_shapes": shapes,
            "original_ms": d and d["median_ms"], "pruned_ms": p and p["median_ms"],
            "speedup": p and p["speedup"], **res}


def format_bench(b) -> str:
    prov = b["results"][-1]["provider"] if b["results"] else b["provider"]
    head = f"latency: onnxruntime {prov}, batch {b['batch']}, median of {b['iters']} interleaved runs:"
    if b["original_ms"] is None or b["pruned_ms"] is None:
        return head + " not measured (" + "; ".join(s["reason"] for s in b["skipped"]) + ")"
    return (head + f" original {b['original_ms']:.3f} ms -> pruned {b['pruned_ms']:.3f} ms "
            f"({fmt(b['speedup'], '.2f')}x speedup)")
