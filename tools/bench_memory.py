#!/usr/bin/env python
"""Peak memory of spa on inputs that used to cost far more than their size (issue 9).

    python tools/bench_memory.py [--out docs/memory.md]

Cases, each run as `spa prune` in a fresh process (peak RSS from the kernel: ru_maxrss of the child):
* chain: an 80 KB model, a Conv then 2000 elementwise ops on a [1, 16, 112, 112] activation (0.8 MB
  each: 1.6 GB if every activation is kept at once, as the probe did when it exposed them all; 1.72 GB
  peak before the probe exposed tensors in chunks, measured with `/usr/bin/time -f %M spa prune`);
* npz: `--criterion wanda --calib c.npz` with a 2 MB .npz whose members are the input (16 samples)
  and an unused, highly compressible 2 GB member (spa read every member);
* vit: torchvision vit_b_16 at 224 (`tools/export_torchvision.py`), `spa.analyze` peak and time with
  the probe's default budget and with it raised so everything is exposed at once (the old behaviour).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def chain_model(path):
    import onnx
    from onnx import TensorProto, helper
    from graphs import G
    g = G(0)
    y = g.conv("x", 3, 16, act="Relu")
    for i in range(2000):
        y = g.op(["Relu", "Sigmoid", "Tanh", "Neg"][i % 4], [y])
    y = g.op("GlobalAveragePool", [y])
    graph = helper.make_graph(g.nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 112, 112])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 16, 1, 1])], g.inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def npz_with_unused_member(path):
    """x: 16 samples of [3, 8, 8]; unused: 2 GB of zeros, deflated to ~2 MB."""
    import zipfile
    import numpy as np
    from numpy.lib import format as npformat
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w") as f:
            npformat.write_array(f, np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
        with z.open("unused.npy", "w", force_zip64=True) as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (512, 1024, 1024)}
            npformat.write_array_header_1_0(f, header)
            block = bytes(1 << 24)
            for _ in range((2 << 30) // len(block)):
                f.write(block)


def peak(cmd) -> tuple[float, float]:
    """(seconds, peak RSS MB) of a child process (its own rusage, from wait4)."""
    t = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        chain_model(tmp / "chain.onnx")
        s, mb = peak([sys.executable, "-m", "spa.cli", "prune", tmp / "chain.onnx", "-o", tmp / "c.onnx"])
        rows.append(("chain: 80 KB model, 2000 elementwise ops, `spa prune`", s, mb))
        from graphs import residual_chain
        import onnx
        onnx.save(residual_chain(), str(tmp / "res.onnx"))
        npz_with_unused_member(tmp / "c.npz")
        size = os.path.getsize(tmp / "c.npz") / 1e6
        s, mb = peak([sys.executable, "-m", "spa.cli", "prune", tmp / "res.onnx", "-o", tmp / "r.onnx",
                      "--criterion", "wanda", "--calib", tmp / "c.npz"])
        rows.append((f"npz: {size:.1f} MB .npz with an unused 2 GB member, `--calib`", s, mb))
        sys.path.insert(0, str(ROOT / "tools"))
        from export_torchvision import export
        vit = export("vit_b_16", size=224, init="calibrated")
        code = ("import sys, spa; from spa.runtime import exposure; "
                "exposure.PROBE_BUDGET = int(sys.argv[2]) << 20 if len(sys.argv) > 2 else exposure.PROBE_BUDGET; "
                "spa.analyze(sys.argv[1])")
        for budget, label in ((None, "default budget (256 MB)"), (1 << 20, "everything exposed at once (before)")):
            cmd = [sys.executable, "-c", code, str(vit)] + ([str(budget)] if budget else [])
            s, mb = peak(cmd)
            rows.append((f"vit_b_16 224 (346 MB), `spa.analyze`, {label}", s, mb))
    lines = ["| case | seconds | peak RSS (MB) |", "|---|---|---|"]
    lines += [f"| {name} | {s:.1f} | {mb:.0f} |" for name, s, mb in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text("# Peak memory\n\nMeasured by `python tools/bench_memory.py --out docs/memory.md` "
                                          "(2-core dev box). Each row is a fresh process.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
