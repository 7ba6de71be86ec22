"""Vocabulary pruning on the real SmolLM2-135M export (docs/llm.md#vocabulary-pruning---keep-tokens).

    python tools/bench_vocab.py [--model M.onnx] [--keep CALIB.npz] [--heldout H.npy] [--window 128]

Keeps the token ids of the calibration text (``spa prune --keep-tokens``, through ``spa.prune``),
prints params before and after, then runs both models on a held-out window made of kept tokens (the
held-out text with the tokens it does not keep dropped, so the pruned model can read it) and
compares the pruned model's logits with the original's restricted to the kept tokens: the largest
difference and the greedy choice among kept tokens.  Also prints what fraction of the held-out
text's tokens are kept at all (what a vocabulary cut to one text costs on another).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # this checkout's spa
import spa  # noqa: E402
from spa.runtime import probing  # noqa: E402

LLM = Path("/work/cache/llm/smollm2")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(LLM / "smollm2.onnx"))
    ap.add_argument("--keep", default=str(LLM / "calib_python_docs_32x256.npz"))
    ap.add_argument("--heldout", default=str(LLM / "heldout_release_notes_16x256.npy"))
    ap.add_argument("--window", type=int, default=128)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "small.onnx"
        r = spa.prune(args.model, keep_tokens=args.keep, output=out)
        seconds = time.perf_counter() - t0
        voc = r.report["vocabulary"]
        kept = np.asarray(voc["ids"])
        held = np.load(args.heldout)
        coverage = float(np.isin(held, kept).mean())
        stream = held.ravel()[np.isin(held.ravel(), kept)]
        window = stream[:args.window][None]
        original = probing.output_runner(spa.io.load_model(args.model))
        want = original.run({"input_ids": window})["logits"][..., kept]
        del original
        got = probing.output_runner(spa.io.load_model(str(out))).run(
            {"input_ids": np.searchsorted(kept, window)})["logits"]
        size = out.stat().st_size
    print(json.dumps({
        "command": f"spa prune {args.model} -o small.onnx --keep-tokens {args.keep}",
        "seconds": round(seconds, 1), "kept": voc["kept"], "original": voc["original"], "tied": voc["tied"],
        "params_before": r.report["before"]["params"], "params_after": r.report["after"]["params"],
        "macs_before": r.report["before"]["macs"], "macs_after": r.report["after"]["macs"],
        "file_mb": round(size / 2 ** 20, 1), "heldout": Path(args.heldout).name,
        "heldout_tokens_kept": round(coverage, 4), "window": int(window.shape[1]),
        "max_abs_diff": float(np.abs(got - want).max()),
        "max_abs_logit": float(np.abs(want).max()),
        "greedy_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "check_in_report": voc["check"]}, indent=1))


if __name__ == "__main__":
    main()
