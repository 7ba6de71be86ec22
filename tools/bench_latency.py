#!/usr/bin/env python
"""Pruning for the runtime: measured speed-up per MACs saved with the default widths, and
``--target latency=F`` against ``--target macs=F`` at the same measured speed-up (issue 20).

    python tools/bench_latency.py --out docs/latency.md            # every model (about 15 minutes)
    python tools/bench_latency.py --models resnet50 --threads 1
    python tools/bench_latency.py --alignment                      # where the CPU's Conv kernels step

Per model, in one process, onnxruntime CPU with ``--threads`` intra-op threads (1 by default: on a
shared 2-core machine one thread measures the kernels, not the other load):

* ``ratio 0.3`` with ``--round-to 1`` (exact counts) and with the default ``--round-to auto``: the
  MACs reduction, the measured speed-up, and latency/MACs (speed-up over MACs reduction).
* ``latency=F``: its own measured speed-up (the report's), the number of operator timings it made
  and took from the cache, then a second prune of the same model (which should time nothing).
* ``macs=G``: G searched (up to four prunes) so that its measured speed-up matches the latency
  prune's, to compare the fidelity each keeps at the same speed.

All variants of a model and the dense model are then timed together, interleaved
(``spa.verify.bench.benchmark``), and that table's speed-ups are the ones reported.  Fidelity is the
report's (the guard's task metric on its inputs: ``--calib`` data where the model entry gives one).
Models come from the cache (``$SPA_CACHE``): ``tools/export_torchvision.py resnet50 vit_b_16 --size 224
--init calibrated``, YOLOv8n from the nudenet wheel (``spa.zoo``), SmolLM2 from ``tools/export_smollm2.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import onnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import spa  # noqa: E402
from spa.io import zoo  # noqa: E402
from spa.runtime.latency import LatencyTable  # noqa: E402
from spa.verify.bench import benchmark  # noqa: E402

CACHE = pathlib.Path(os.environ.get("SPA_CACHE", pathlib.Path.home() / ".cache" / "spa" / "models"))
#: name: (path or zoo name, input shapes, extra prune options)
MODELS = {
    "resnet50": (CACHE / "torchvision" / "resnet50_224_cal.onnx", None, {}),
    "vit_b_16": (CACHE / "torchvision" / "vit_b_16_224_cal.onnx", None, {}),
    "yolov8n": ("yolov8n", None, {}),
    "smollm2": (CACHE / "llm" / "smollm2" / "smollm2.onnx", {"input_ids": [1, 128]}, {}),
}


def _prune(path, out, shapes, threads, **kw):
    t = time.perf_counter()
    res = spa.prune(str(path), input_shapes=shapes, threads=threads, **kw)
    res.save(out)
    rep = res.report
    fid = rep.get("fidelity", {})
    return {"options": kw, "macs_reduction": rep["before"]["macs"] / max(rep["after"]["macs"], 1),
            "params_reduction": rep["before"]["params"] / max(rep["after"]["params"], 1),
            "fidelity": fid.get("min"), "fidelity_inputs": fid.get("inputs"), "seconds": time.perf_counter() - t,
            "latency": (rep.get("plan") or {}).get("latency"), "path": str(out)}


def alignment_table(threads: int, widths=(64, 63, 57, 56, 49, 48, 47, 45, 41, 40, 33, 32), hw: int = 56) -> list:
    """Where the CPU kernels step: one 3x3 Conv from 64 channels at ``hw`` x ``hw`` to each width, and
    a Conv -> Relu -> Conv -> Relu chain 64 -> width -> 64, every width in turn, 15 rounds, medians."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def model(mid, chain):
        rng = np.random.default_rng(0)
        nodes, inits, prev, c_in = [], [], "x", 64
        for i, c_out in enumerate([mid, 64] if chain else [mid]):
            weight = (rng.standard_normal((c_out, c_in, 3, 3)) * .05).astype(np.float32)
            inits += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(np.zeros(c_out, np.float32), f"b{i}")]
            nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4),
                      helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
            prev, c_in = f"r{i}", c_out
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, hw, hw])],
                                  [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    table = LatencyTable("cpu", threads, cache=False)
    x = {"x": np.random.default_rng(1).standard_normal((1, 64, hw, hw)).astype(np.float32)}
    rows = []
    for w in widths:
        rows.append({"width": w, "conv_ms": table.time_model(model(w, False), x, rounds=15),
                     "chain_ms": table.time_model(model(w, True), x, rounds=15)})
    return rows


def run_model(name, threads, work: pathlib.Path, factor: float, iters: int) -> dict:
    src, shapes, extra = MODELS[name]
    path = zoo.resolve(str(src), shapes)[0] if not isinstance(src, pathlib.Path) else src
    rows = {}
    rows["ratio 0.3, round-to 1"] = _prune(path, work / f"{name}_r1.onnx", shapes, threads, ratio=0.3,
                                          round_to=1, **extra)
    rows["ratio 0.3 (default widths)"] = _prune(path, work / f"{name}_auto.onnx", shapes, threads, ratio=0.3,
                                               **extra)
    lat = rows[f"latency={factor:g}"] = _prune(path, work / f"{name}_lat.onnx", shapes, threads,
                                               target=f"latency={factor:g}", **extra)
    again = _prune(path, work / f"{name}_lat2.onnx", shapes, threads, target=f"latency={factor:g}", **extra)
    lat["second_prune_timings"] = again["latency"]["table"]["measured"]
    lat["second_prune_cached"] = again["latency"]["table"]["reused"]
    want = lat["latency"]["measured_speedup"]
    g, tries = lat["macs_reduction"], []
    table = LatencyTable("cpu", threads)
    an = spa.analyze(str(path), input_shapes=shapes)
    dense = an.full_model()
    for _ in range(4):   # macs=G whose measured speed-up matches the latency prune's
        got = _prune(path, work / f"{name}_macs.onnx", shapes, threads, target=f"macs={g:.4f}", **extra)
        sp = table.speedup(dense, onnx.load(got["path"]), dict(an.probe.inputs))["speedup"]
        tries.append((g, sp, got))
        if abs(sp / want - 1) <= 0.03:
            break
        g = max(1.0, g * want / sp)
    best = min(tries, key=lambda t: abs(t[1] / want - 1))
    rows[f"macs={best[0]:.3f} (same speed)"] = best[2]
    bench = benchmark([str(path)] + [r["path"] for r in rows.values()], threads=threads, warmup=3, iters=iters,
                      input_shapes=shapes)
    ms = {r["model"]: r for r in bench["results"]}
    dense_ms = ms[str(path)]["median_ms"]
    for r in rows.values():
        r["median_ms"] = ms[r["path"]]["median_ms"]
        r["speedup"] = dense_ms / r["median_ms"]
        r["latency_per_macs"] = r["speedup"] / r["macs_reduction"]
    return {"model": name, "dense_ms": dense_ms, "rows": rows, "machine": bench.get("machine")}


def write(results: list, out: pathlib.Path, threads, factor) -> None:
    lines = ["<!-- bench_latency:begin (generated by tools/bench_latency.py) -->", ""]
    for res in results:
        lines += [f"### {res['model']} (dense {res['dense_ms']:.2f} ms, {threads or 'default'} thread(s))", "",
                  "| variant | MACs red. | params red. | measured speed-up | speed-up / MACs red. | fidelity | "
                  "prune s | timings made / cached (2nd prune) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for label, r in res["rows"].items():
            lat = r.get("latency")
            extra = (f"{lat['table']['measured']} / {lat['table']['reused']} "
                     f"({r['second_prune_timings']} / {r['second_prune_cached']})") if lat else ""
            fid = "-" if r["fidelity"] is None else f"{r['fidelity']:.4f}"
            lines.append(f"| {label} | {r['macs_reduction']:.2f}x | {r['params_reduction']:.2f}x | "
                         f"{r['speedup']:.2f}x | {r['latency_per_macs']:.2f} | {fid} | {r['seconds']:.1f} | {extra} |")
        lines.append("")
    lines.append("<!-- bench_latency:end -->")
    block = "\n".join(lines)
    text = out.read_text() if out.exists() else ""
    if "<!-- bench_latency:begin" in text:
        head, rest = text.split("<!-- bench_latency:begin", 1)
        text = head + block + rest.split("<!-- bench_latency:end -->", 1)[1]
    else:
        text = text + "\n" + block + "\n"
    out.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--alignment", action="store_true", help="only print where the CPU's Conv kernels step")
    ap.add_argument("--keep-cache", action="store_true", help="use the user's latency cache instead of a fresh one")
    args = ap.parse_args(argv)
    if args.alignment:
        for r in alignment_table(args.threads):
            print(f"width {r['width']:3d}: one Conv {r['conv_ms']:.3f} ms, Conv-Conv chain {r['chain_ms']:.3f} ms")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="spa-bench-latency-") as tmp:
        if not args.keep_cache:      # a fresh latency cache: the first prune's timings are all made here
            os.environ["SPA_LATENCY_CACHE"] = str(pathlib.Path(tmp) / "latency-cache")
        for name in args.models:
            print(f"== {name}", flush=True)
            res = run_model(name, args.threads, pathlib.Path(tmp), args.factor, args.iters)
            for label, r in res["rows"].items():
                print(f"{label:32s} MACs {r['macs_reduction']:.2f}x  speed-up {r['speedup']:.2f}x  "
                      f"per MACs {r['latency_per_macs']:.2f}  fidelity {r['fidelity']}", flush=True)
            results.append(res)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.out:
        write(results, args.out, args.threads, args.factor)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
