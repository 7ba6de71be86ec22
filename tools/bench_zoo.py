#!/usr/bin/env python
"""Benchmark tables for docs/benchmarks.md: spa vs Torch-Pruning vs onnxsim, on CPU.

    SPA_CACHE=/tmp/spacache python tools/bench_zoo.py --out docs/benchmarks.md --json bench.json
    python tools/bench_zoo.py --models resnet50 vit_b_16 --ratios 0.5 --iters 30

For each model and ratio R:

* **spa**: ``spa prune MODEL -o OUT --ratio R`` run as a subprocess (so the import of spa,
  loading, probing, pruning, validation in onnxruntime and writing all count in its time);
  ``--round-to 1 8`` adds ``spa@R/r8`` rows pruned with ``--round-to 8``.
* **Torch-Pruning** (torchvision models only; ``pip install torch-pruning``):
  ``tp.pruner.MagnitudePruner`` with ``MagnitudeImportance(p=2)``, ``pruning_ratio=R``, the final
  classifier ignored, in a python subprocess. Its time is the whole process up to the end of
  ``pruner.step()`` (interpreter start, ``import torch, torchvision, torch_pruning``, building the
  model, tracing the dependency graph, pruning). The calibrated random weights (see
  ``tools/export_torchvision.py``) are copied into the built model outside the timed span, so TP is
  charged for building a plain model, as a user loading a checkpoint would be. The pruned module is
  then exported with ``torch.onnx.export`` (TorchScript exporter, opset 17; not timed in the
  pruning time, reported separately). vit_b_16: every ``nn.MultiheadAttention``
  handled as in the Torch-Pruning torchvision example: ``round_to=num_heads``;
  TP's ``MultiheadAttention`` handler shrinks ``embed_dim`` (the residual width and with it the
  head dim; ``num_heads`` stays 12) and the MLP hidden width; ``model.hidden_dim`` is updated after
  pruning. (Also passing ``num_heads={mha: 12}`` leaves the residual width whole in TP 1.6, so it is
  not passed.)
* **onnxsim**: ``onnxsim.pruning.apply_structured_pruning(model, sparsity=R)`` (PyPI ``onnxsim``
  0.8.x; ONNX-level, single producer-to-consumer chains only), in a python subprocess timed as a
  whole (import, load, prune, save).

Every model's params and MACs are counted by ``spa.analyze`` (the same counter for all), and all
variants of one model (dense first) are timed together in one interleaved ``spa.verify.bench.benchmark``
run on the CPU execution provider, batch 1. Dev-only dependencies: torch, torchvision,
torch-pruning, onnxsim. Models: torchvision exports in ``$SPA_CACHE/torchvision`` (made here if
missing), YOLOv8n and PP-OCRv4 det fetched with ``spa.zoo.fetch``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(1, str(ROOT))  # run from a checkout: this repository's spa, installed or not
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "vit_b_16"]
ZOO = {"yolov8n": {"images": [1, 3, 320, 320]}, "ppocr_det": {"x": [1, 3, 640, 640]}}
MODELS = TORCHVISION + list(ZOO)
SIZE = 224


# --------------------------------------------------------------------------------------------------
# Torch-Pruning worker (run in a fresh interpreter: ``bench_zoo.py --tp-worker ARCH RATIO OUT``)

def tp_worker(arch: str, ratio: float, out: str) -> int:
    """Prune ``arch`` with Torch-Pruning, export it, print one JSON line of timestamps."""
    t_start = time.time()
    import torch
    import torchvision
    import torch_pruning as tp
    t_import = time.time()
    torch.manual_seed(0)
    kwargs = {"weights": None}
    if arch.startswith("vit_"):
        kwargs["image_size"] = SIZE
    model = torchvision.models.get_model(arch, **kwargs).eval()
    t_build = time.time()
    # not timed: copy in the calibrated random weights that the ONNX export of spa's input has
    import export_torchvision
    model.load_state_dict(export_torchvision.build(arch, SIZE, init="calibrated").state_dict())
    model.eval()
    t_weights = time.time()

    example = torch.randn(1, 3, SIZE, SIZE)
    ignored, round_to = [], None
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.out_features == 1000:
            ignored.append(m)
        if isinstance(m, torch.nn.MultiheadAttention):
            # round_to=num_heads as in Torch-Pruning's torchvision example. Passing
            # num_heads={mha: 12} as well keeps the residual width whole in TP 1.6 (only the MLP
            # is pruned, 1.47x MACs at 0.5), so it is not passed.
            round_to = m.num_heads
    pruner = tp.pruner.MagnitudePruner(
        model, example_inputs=example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to,
        global_pruning=False, iterative_steps=1)
    pruner.step()
    if isinstance(model, torchvision.models.VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels
    t_prune = time.time()
    with torch.no_grad():
        model(example)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # grad left enabled: nn.MultiheadAttention's fused fast path cannot be exported
        torch.onnx.export(model, (example,), out, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], do_constant_folding=True)
    t_export = time.time()
    vit = {}
    if isinstance(model, torchvision.models.VisionTransformer):
        a = model.encoder.layers[0]
        vit = {"hidden": int(model.hidden_dim), "num_heads": int(a.self_attention.num_heads),
               "head_dim": int(a.self_attention.embed_dim // a.self_attention.num_heads),
               "mlp": int(a.mlp[0].out_features)}
    print(json.dumps({"t_start": t_start, "import_s": t_import - t_start, "build_s": t_build - t_import,
                      "weights_s": t_weights - t_build, "prune_s": t_prune - t_weights,
                      "export_s": t_export - t_prune, "t_pruned": t_prune, "t_weights": t_weights,
                      "t_build": t_build, "vit": vit}))
    return 0


# --------------------------------------------------------------------------------------------------
# the three pruners, each as a timed subprocess

def _run(cmd):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    return p, t0, time.time() - t0


def _tail(p):
    return (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]


def run_spa(src, ratio, out, shapes, round_to=1):
    cmd = [sys.executable, "-m", "spa.cli", "prune", str(src), "-o", str(out), "--ratio", str(ratio),
           "--criterion", "l2", "--force", "--round-to", str(round_to)]
    for name, shape in (shapes or {}).items():
        cmd += ["--input-shapes", f"{name}:[{','.join(map(str, shape))}]"]
    p, _, wall = _run(cmd)
    if p.returncode:
        return {"error": _tail(p)[0], "time_s": wall}
    return {"time_s": wall}


def run_tp(arch, ratio, out):
    p, t0, wall = _run([sys.executable, str(pathlib.Path(__file__).resolve()), "--tp-worker", arch,
                        str(ratio), str(out)])
    if p.returncode:
        return {"error": _tail(p)[0], "time_s": None}
    info = json.loads(p.stdout.strip().splitlines()[-1])
    # whole process up to the end of pruner.step(), less the untimed weight copy
    whole = info["t_pruned"] - t0 - (info["t_weights"] - info["t_build"])
    return {"time_s": whole, "detail": info}


_ONNXSIM = r"""
import sys, time, onnx
from onnxsim.pruning import apply_structured_pruning
m = apply_structured_pruning(sys.argv[1], sparsity=float(sys.argv[2]))
onnx.save(m, sys.argv[3])
"""


def run_onnxsim(src, ratio, out):
    p, _, wall = _run([sys.executable, "-c", _ONNXSIM, str(src), str(ratio), str(out)])
    if p.returncode:
        return {"error": _tail(p)[0], "time_s": wall}
    return {"time_s": wall}


def have(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def onnxsim_ok():
    try:
        from onnxsim.pruning import apply_structured_pruning  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------------------------------
# measurement

def dense_path(name):
    import spa.zoo
    if name in ZOO:
        return spa.zoo.fetch(name)
    import export_torchvision
    return export_torchvision.export(name, SIZE, init="calibrated")


def bench_model(name, ratios, iters, warmup, threads, workdir, tools, log, round_tos=(1,)):
    import spa
    import spa.verify.bench
    shapes = ZOO.get(name)
    src = dense_path(name)
    rows = [{"variant": "dense", "tool": "dense", "ratio": 0.0, "path": str(src), "time_s": None}]
    for tool in ("spa", "tp", "onnxsim"):
        if tool not in tools or (tool == "tp" and name not in TORCHVISION):
            continue
        for r, rt in [(r, rt) for r in ratios for rt in (round_tos if tool == "spa" else (1,))]:
            tag = f"{tool}@{r}" + (f"/r{rt}" if rt > 1 else "")
            out = workdir / f"{name}_{tag.replace('@', '_').replace('/', '_')}.onnx"
            log(f"{name}: {tag}")
            if tool == "spa":
                res = run_spa(src, r, out, shapes, rt)
            elif tool == "tp":
                res = run_tp(name, r, out)
            else:
                res = run_onnxsim(src, r, out)
            row = {"variant": tag, "tool": tool, "ratio": r, "round_to": rt, "path": str(out), **res}
            if "error" in res:
                log(f"  failed: {res['error']}")
            else:
                log(f"  {res['time_s']:.2f} s")
            rows.append(row)
    ok = [row for row in rows if "error" not in row]
    for row in ok:
        try:
            an = spa.analyze(row["path"], input_shapes=shapes)
            row["params"], row["macs"] = int(an.params), int(an.macs)
        except Exception as e:  # noqa: BLE001 - record and go on
            row["error"] = f"spa.analyze: {type(e).__name__}: {str(e).splitlines()[0]}"
    ok = [row for row in rows if "error" not in row]
    log(f"{name}: benchmarking {len(ok)} models interleaved ({iters} iters, {threads} threads)")
    load_before = os.getloadavg()[0]
    res = spa.verify.bench.benchmark([row["path"] for row in ok], provider="cpu", batches=(1,),
                              threads=threads, warmup=warmup, iters=iters, input_shapes=shapes)
    load_after = os.getloadavg()[0]
    by_path = {r["model"]: r for r in res["results"]}
    for row in ok:
        b = by_path.get(row["path"])
        if b:
            row["median_ms"], row["p90_ms"], row["speedup"] = b["median_ms"], b["p90_ms"], b["speedup"]
    dense = rows[0]
    for row in ok:
        row["macs_factor"] = dense["macs"] / row["macs"] if row.get("macs") else None
        row["params_factor"] = dense["params"] / row["params"] if row.get("params") else None
        if row.get("speedup") and row.get("macs_factor"):
            row["speedup_per_macs"] = row["speedup"] / row["macs_factor"]
    return {"model": name, "input_shapes": shapes or {"input": [1, 3, SIZE, SIZE]}, "rows": rows,
            "machine": res["machine"], "loadavg_1min": [load_before, load_after]}


# --------------------------------------------------------------------------------------------------
# output

def _h(n):
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def _f(x, fmt):
    return "–" if x is None else format(x, fmt)


def table(m):
    shape = ", ".join(f"{k} {v}" for k, v in m["input_shapes"].items())
    lines = [f"### {m['model']} ({shape})", "",
             "| variant | params | MACs | MACs reduction | CPU median ms | speedup | speedup / MACs red. | prune time s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in m["rows"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error'][:120].replace('|', '/')} | | | | | | |")
            continue
        lines.append("| " + " | ".join([
            row["variant"], _h(row["params"]), _h(row["macs"]), _f(row.get("macs_factor"), ".2f") + "x",
            _f(row.get("median_ms"), ".2f"), _f(row.get("speedup"), ".2f") + "x",
            _f(row.get("speedup_per_macs"), ".2f"), _f(row.get("time_s"), ".2f")]) + " |")
    if m.get("loadavg_1min"):
        lines.append("")
        lines.append("1-min load average before/after the latency run: "
                     + " / ".join(f"{x:.1f}" for x in m["loadavg_1min"]) + ".")
    vit = [r for r in m["rows"] if r.get("detail", {}).get("vit")]
    if vit:
        lines.append("")
        lines.append("Torch-Pruning's vit_b_16 result per block: " + "; ".join(
            f"{r['variant']}: hidden {r['detail']['vit']['hidden']}, {r['detail']['vit']['num_heads']} heads x "
            f"{r['detail']['vit']['head_dim']}, MLP {r['detail']['vit']['mlp']}" for r in vit) + ".")
    return "\n".join(lines)


def machine_line(machine):
    import onnxruntime
    return (f"CPU: {machine.get('cpu')} ({os.cpu_count()} cores visible), Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__} (CPU execution provider)")


BEGIN, END = "<!-- bench_zoo:begin (generated by tools/bench_zoo.py) -->", "<!-- bench_zoo:end -->"


def write_out(path, body):
    """Write the tables between the BEGIN/END markers of ``path`` (the prose around them is
    kept); a file without the markers is replaced by the tables alone."""
    block = f"{BEGIN}\n{body}\n{END}"
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = block + "\n"
    path.write_text(text)


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--tp-worker"]:
        return tp_worker(argv[1], float(argv[2]), argv[3])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    ap.add_argument("--tools", nargs="+", default=["spa", "tp", "onnxsim"], choices=["spa", "tp", "onnxsim"])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--round-to", type=int, nargs="+", default=[1],
                    help="spa variants with --round-to N (spa@R/rN rows for N > 1), e.g. 1 8")
    ap.add_argument("--out", type=pathlib.Path, help="write the markdown tables here")
    ap.add_argument("--json", type=pathlib.Path, help="write the raw results here")
    ap.add_argument("--workdir", type=pathlib.Path, help="keep the pruned models here (default: a temp dir)")
    args = ap.parse_args(argv)

    def log(msg):
        print(f"bench_zoo: {msg}", file=sys.stderr, flush=True)

    tools = list(args.tools)
    if "tp" in tools and not have("torch_pruning"):
        log("torch_pruning not installed (pip install torch-pruning): Torch-Pruning rows skipped")
        tools.remove("tp")
    if "onnxsim" in tools and not onnxsim_ok():
        log("onnxsim.pruning.apply_structured_pruning not available (pip install onnxsim): rows skipped")
        tools.remove("onnxsim")
    tmp = None
    if args.workdir:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_zoo.")
        workdir = pathlib.Path(tmp.name)
    t0 = time.time()
    results = []
    for name in args.models:
        m = bench_model(name, args.ratios, args.iters, args.warmup, args.threads, workdir, tools, log,
                        args.round_to)
        results.append(m)
        print(table(m) + "\n", flush=True)
    machine = results[0]["machine"] if results else {}
    versions = {}
    for mod in ("torch", "torch_pruning", "onnxsim", "onnx"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    raw = {"machine": {**machine, "line": machine_line(machine)}, "versions": versions,
           "command": "python tools/bench_zoo.py " + " ".join(argv), "iters": args.iters,
           "warmup": args.warmup, "threads": args.threads, "total_s": time.time() - t0, "models": results}
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    if args.out:
        write_out(args.out, machine_line(machine) + "\n\n" + "\n\n".join(table(m) for m in results))
    log(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
