"""Accuracy vs MACs removed for every spa criterion, without fine-tuning.

A small CNN is trained on CPU (about a minute) on scikit-learn's digits, upsampled to 16x16,
exported to ONNX, then pruned with ``spa.prune(target="macs=F")`` for each criterion and factor
and evaluated with onnxruntime on the held-out digits.  Calibrated criteria use 128 training
images (``--calib`` as a .npz).  Writes a Markdown table and (with matplotlib) a plot:

    python tools/bench_criteria.py --out docs            # docs/criteria_table.md, docs/criteria.png

(Part (b) of issue 3, the PP-OCRv4 models from rapidocr-onnxruntime, is not done yet.)
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FACTORS = (1.25, 1.5, 2.0, 3.0)


def load_digits(size=16, seed=0):
    from sklearn.datasets import load_digits as ld
    import torch
    import torch.nn.functional as F
    d = ld()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = int(len(y) * 0.75)
    return x[:n], y[:n], x[n:], y[n:]


def make_cnn():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return (x + self.a(x)).relu()

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        Block(64),
        nn.Conv2d(64, 96, 3, padding=1, bias=False), nn.BatchNorm2d(96), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(96, 128, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def train(epochs=12, seed=0):
    import torch
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits(seed=seed)
    net = make_cnn()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(ytr)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
    net.eval()
    return net, xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy()


def export(net, path):
    import torch
    torch.onnx.export(net, torch.zeros(1, 1, 16, 16), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)


def accuracy(model, x, y):
    from spa.io import session
    sess = session(model)
    logits = np.concatenate([sess.run(None, {"x": x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return float((logits.argmax(1) == y).mean())


def main(argv=None):
    import spa
    from spa.scoring import CRITERIA
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--factors", default=",".join(map(str, FACTORS)))
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    net, xtr, ytr, xte, yte = train(args.epochs)
    tmp = pathlib.Path(tempfile.mkdtemp())
    path = tmp / "digits_cnn.onnx"
    export(net, path)
    calib = tmp / "calib.npz"
    np.savez(calib, x=xtr[:128])
    an = spa.analyze(str(path))
    base = accuracy(an.model, xte, yte)
    print(f"trained in {time.time() - t0:.0f}s: test accuracy {base:.4f}, {an.macs} MACs", flush=True)
    factors = [float(f) for f in args.factors.split(",")]
    rows = {}
    for crit in args.criteria.split(","):
        rows[crit] = []
        for f in factors:
            r = spa.prune(str(path), target=f"macs={f}", criterion=crit, analysis=an,
                          calib=str(calib) if CRITERIA[crit].needs_calib else None, calib_batch_size=32)
            removed = 1 - r.report["after"]["macs"] / r.report["before"]["macs"]
            acc = accuracy(r.model, xte, yte)
            rows[crit].append({"factor": f, "macs_removed": removed, "accuracy": acc})
            print(f"{crit:>9} macs={f:<5g} removed {removed:6.1%}  accuracy {acc:.4f}", flush=True)
    res = {"baseline_accuracy": base, "macs": an.macs, "params": an.params, "results": rows}
    (out / "criteria_results.json").write_text(json.dumps(res, indent=1))
    lines = ["| criterion | " + " | ".join(f"macs={f:g}" for f in factors) + " |",
             "|---|" + "---|" * len(factors)]
    for crit, rs in rows.items():
        lines.append(f"| {crit} | " + " | ".join(f"{r['accuracy']:.3f} ({r['macs_removed']:.0%})" for r in rs) + " |")
    table = "\n".join(lines)
    (out / "criteria_table.md").write_text(table + "\n")
    print(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for crit, rs in rows.items():
            ax.plot([0] + [r["macs_removed"] * 100 for r in rs], [base] + [r["accuracy"] for r in rs],
                    marker="o", label=crit, linestyle="--" if crit == "random" else "-")
        ax.set_xlabel("MACs removed (%)")
        ax.set_ylabel("test accuracy (no fine-tuning)")
        ax.set_title("digits CNN: accuracy vs MACs removed per criterion")
        ax.grid(alpha=0.3)
        ax.legend(ncol=3, fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "criteria.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
