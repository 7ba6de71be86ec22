#!/usr/bin/env python
"""LLM-scale benchmark: export Llama-style decoders (random weights) and prune them with spa, recording time
and peak memory per stage against the time and memory onnx needs to load and save the same file.

    python tools/bench_llm.py export llama_50m llama_300m          # export only (cached)
    python tools/bench_llm.py run --out docs/llm_bench.md           # every model: export, prune, validate
    python tools/bench_llm.py run llama_300m --ratio 0.3

Models (``transformers.LlamaConfig``, GQA, RoPE, SwiGLU, RMSNorm, untied lm_head, vocab 32000, eager
attention), exported by ``torch.onnx.export(dynamo=True)`` with a dynamic batch and sequence, no cache, as
``$SPA_CACHE/llm/{name}/model.onnx`` with the weights in ``model.onnx.data`` (external data, as every
exporter writes files of this size):

==================  ======  ======  =====  ===  ==========  =====  ======
name                hidden  layers  heads  kv   inter       dtype  params
==================  ======  ======  =====  ===  ==========  =====  ======
``llama_50m``       512     8       8      4    1376        fp32   55 M
``llama_300m``      1024    20      16     4    2816        fp32   302 M
``llama_1b``        2048    22      32     4    5632        fp32   1.1 B   (TinyLlama's shape)
``llama_3b_fp16``   3200    26      32     8    8640        fp16   3.0 B   (OpenLLaMA-3B's shape, GQA)
==================  ======  ======  =====  ===  ==========  =====  ======

Every measurement is a fresh process; peak RSS is the process's ``ru_maxrss``.  Rows: ``onnx load+save``
(``onnx.load`` with its external data, then ``onnx.save`` with external data: what any tool that edits the
file costs at least), ``spa prune`` (the CLI, per stage from its progress lines), and a run of the pruned model
in onnxruntime at batch 2, sequence 9.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from export_torchvision import cache_dir  # noqa: E402

#: name: (hidden, layers, heads, kv heads, intermediate, dtype)
MODELS = {
    "llama_50m": (512, 8, 8, 4, 1376, "float32"),
    "llama_300m": (1024, 20, 16, 4, 2816, "float32"),
    "llama_1b": (2048, 22, 32, 4, 5632, "float32"),
    "llama_3b_fp16": (3200, 26, 32, 8, 8640, "float16"),
}
VOCAB, MAXPOS = 32000, 2048


def model_path(name: str) -> pathlib.Path:
    return cache_dir() / "llm" / name / "model.onnx"


def export(name: str) -> pathlib.Path:
    """Export ``name`` (see the module docstring) unless it is cached; returns the model path.  The export
    goes to a temporary folder beside the final one, renamed when complete."""
    import torch
    import transformers as tf
    from export_transformers import keep_parameters_apart, single_sequence_masks, tensor_names

    out = model_path(name)
    if out.is_file():
        return out
    hidden, layers, heads, kv, inter, dtype = MODELS[name]
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=VOCAB,
                         max_position_embeddings=MAXPOS, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         attn_implementation="eager")
    torch_dtype = getattr(torch, dtype)
    with torch.no_grad():
        model = tf.LlamaForCausalLM._from_config(cfg, dtype=torch_dtype).eval()

    class CausalLM(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    module = CausalLM(model).eval()
    tmp = out.parent.with_name(out.parent.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    Dim = torch.export.Dim
    x = torch.randint(0, VOCAB, (2, 9))
    try:
        with warnings.catch_warnings(), single_sequence_masks(), keep_parameters_apart(tensor_names(module)), \
                torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (x,), dynamo=True, input_names=["input_ids"],
                                        output_names=["logits"], verbose=False,
                                        dynamic_shapes=({0: Dim("batch"), 1: Dim("sequence", max=MAXPOS)},))
            program.save(str(tmp / "model.onnx"), external_data=True)
        del program, module, model
        if out.parent.exists():
            shutil.rmtree(out.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)   # mkdtemp's folder is 0700: make it a plain folder
        os.replace(tmp, out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def disk_size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())


_MEASURE = r"""
import resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
dt = time.perf_counter() - t0
sys.stdout.write(p.stdout)
sys.stderr.write(p.stderr)
print(f"@@ {p.returncode} {dt:.2f} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
"""


def measure(cmd: list[str], env=None) -> dict:
    """Run ``cmd`` in a fresh process; its exit code, seconds, peak RSS (bytes), stdout and stderr."""
    p = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env)
    last = [ln for ln in p.stdout.splitlines() if ln.startswith("@@ ")][-1].split()
    return {"rc": int(last[1]), "seconds": float(last[2]), "peak": int(last[3]) * 1024,
            "stdout": p.stdout, "stderr": p.stderr}


_LOAD_SAVE = r"""
import onnx, sys
m = onnx.load(sys.argv[1])
onnx.save(m, sys.argv[2], save_as_external_data=True, location="model.onnx.data")
"""

_RUN = r"""
import numpy as np, onnxruntime as ort, sys
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
for b, t in ((2, 9), (1, 23)):
    y = s.run(None, {"input_ids": np.random.default_rng(0).integers(0, 32000, (b, t))})[0]
    assert y.shape == (b, t, 32000) and np.isfinite(y).all(), y.shape
    print(f"ran at [{b},{t}] -> {list(y.shape)}")
"""

#: a progress line of spa's CLI: "[  12.3s  1.23 GB] message"
_PROGRESS = re.compile(r"^spa: \[\s*([\d.]+)s\s+([\d.]+) GB\] (.*)$")


def stages(stderr: str) -> list[tuple[float, float, str]]:
    """(seconds, peak GB so far, message) of every progress line."""
    return [(float(m[1]), float(m[2]), m[3]) for m in map(_PROGRESS.match, stderr.splitlines()) if m]


def bench(name: str, ratio: float, work: pathlib.Path) -> dict:
    src = export(name)
    size = disk_size(src)
    row = {"model": name, "disk": size, "ratio": ratio}
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    r = measure([sys.executable, "-c", _LOAD_SAVE, str(src), str(out / "copy.onnx")])
    row["load_save"] = {k: r[k] for k in ("rc", "seconds", "peak")}
    shutil.rmtree(out)
    out.mkdir()
    r = measure([sys.executable, "-m", "spa.cli", "prune", str(src), "-o", str(out / "model.onnx"),
                 "--ratio", str(ratio), "--criterion", "l2", "--report", str(out / "report.json")])
    row["prune"] = {k: r[k] for k in ("rc", "seconds", "peak")}
    row["stages"] = stages(r["stderr"])
    if r["rc"]:
        row["error"] = r["stderr"].strip().splitlines()[-1:]
        return row
    report = json.loads((out / "report.json").read_text())
    row["macs"] = [report["before"]["macs"], report["after"]["macs"]]
    row["params"] = [report["before"]["params"], report["after"]["params"]]
    row["layers"] = describe_layers(report)
    row["pruned_disk"] = disk_size(out / "model.onnx")
    r = measure([sys.executable, "-c", _RUN, str(out / "model.onnx")])
    row["run"] = {"rc": r["rc"], "seconds": r["seconds"], "peak": r["peak"], "out": r["stdout"].splitlines()[:2]}
    shutil.rmtree(out, ignore_errors=True)
    return row


def describe_layers(report) -> list:
    from spa.mapping.layers import describe_all
    return describe_all(report.get("layers", []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="export models to the cache")
    e.add_argument("names", nargs="*", default=list(MODELS))
    r = sub.add_parser("run", help="export, prune and measure")
    r.add_argument("names", nargs="*", default=list(MODELS))
    r.add_argument("--ratio", type=float, default=0.3)
    r.add_argument("--work", type=pathlib.Path, default=cache_dir() / "llm" / "work")
    r.add_argument("--json", type=pathlib.Path, help="write the rows as JSON")
    r.add_argument("--out", type=pathlib.Path, help="write the markdown table here (docs/llm_bench.md)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    if args.cmd == "export":
        for n in args.names:
            t0 = time.perf_counter()
            p = export(n)
            print(f"{n}\t{p}\t{disk_size(p) / 1e9:.2f} GB\t{time.perf_counter() - t0:.0f}s", flush=True)
        return 0
    rows = []
    for n in args.names:
        row = bench(n, args.ratio, args.work)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    if args.out:
        args.out.write_text(markdown(rows, args.ratio))
    return 0


def _gb(n) -> str:
    return f"{n / 1e9:.2f}"


def markdown(rows, ratio: float) -> str:
    """docs/llm_bench.md: the main table, then the stages of each prune."""
    out = ["# LLM scale: measurements", "",
           f"Measured by `python tools/bench_llm.py run --out docs/llm_bench.md` ({_machine()}); every number is one fresh",
           "process; peak = the process's peak resident memory (`ru_maxrss`, memory-mapped weights included).",
           f"`spa prune MODEL -o OUT --ratio {ratio:g} --criterion l2`; the models are Llama decoders with random",
           "weights exported by `torch.onnx.export(dynamo=True)` with dynamic batch and sequence (see the tool's docstring).",
           "",
           "| model | on disk (GB) | onnx load+save: s / peak GB | spa prune: s / peak GB | peak / disk | params | MACs (seq 16) | pruned on disk (GB) | pruned runs at [2,9], [1,23] |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ls, pr = r["load_save"], r["prune"]
        ls_text = f"{ls['seconds']:.0f} / {_gb(ls['peak'])}" if ls["rc"] == 0 else f"failed (rc {ls['rc']}) / {_gb(ls['peak'])}"
        if pr["rc"]:
            out.append(f"| {r['model']} | {_gb(r['disk'])} | {ls_text} | failed: {' '.join(r.get('error', []))[:80]} | | | | | |")
            continue
        ran = "yes" if r.get("run", {}).get("rc") == 0 else "NO"
        out.append(f"| {r['model']} | {_gb(r['disk'])} | {ls_text} | {pr['seconds']:.0f} / {_gb(pr['peak'])} | "
                   f"{pr['peak'] / r['disk']:.2f}x | {r['params'][0] / 1e9:.2f}G -> {r['params'][1] / 1e9:.2f}G | "
                   f"{r['macs'][0] / 1e9:.1f}G -> {r['macs'][1] / 1e9:.1f}G | {_gb(r['pruned_disk'])} | {ran} |")
    out += ["", "## Stages", "",
            "Seconds since the command started and peak memory so far, at the start of each stage (from the CLI's",
            "progress lines); the last row is the end of the process.", ""]
    for r in rows:
        if not r.get("stages"):
            continue
        out += [f"**{r['model']}** ({_gb(r['disk'])} GB on disk)", "", "| stage | s | peak GB |", "|---|---|---|"]
        for sec, peak, msg in r["stages"]:
            out.append(f"| {msg[:70]} | {sec:.1f} | {peak:.2f} |")
        out += [f"| (exit) | {r['prune']['seconds']:.1f} | {_gb(r['prune']['peak'])} |", ""]
        out += [f"New sizes: `{line}`" for line in r.get("layers", [])] + [""]
    return "\n".join(out) + "\n"


def _machine() -> str:
    import platform
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0
    return f"{os.cpu_count()} cores, {mem:.0f} GiB, {platform.machine()}, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
