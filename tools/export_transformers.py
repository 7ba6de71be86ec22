#!/usr/bin/env python
"""Export tiny Hugging Face transformers (random weights) to ONNX in the model cache.

    python tools/export_transformers.py gpt2_ts bert
    python tools/export_transformers.py --all --verify

Recipe: every model is built from a ``transformers`` config (nothing is downloaded) after
``torch.manual_seed(0)``, with the library's own random init (or ``--init calibrated``), fp32, ``model.eval()``, and
``attn_implementation="eager"`` (explicit MatMul/Softmax attention, no SDPA). Sizes: hidden 64,
2 layers, 4 attention heads (head_dim 16), intermediate 128, vocab 256, max positions 128, so an
export takes seconds and a run milliseconds. Output: ``$SPA_CACHE/transformers/{name}[_cal].onnx``, written
to a temporary file, checked with ``onnx.checker`` (full_check) and renamed; an existing file is
reused. The files are self-contained (no external data). Models (the names are the API):

``gpt2_ts``       GPT2LMHeadModel (n_inner 128, tied lm_head), TorchScript exporter (``dynamo=False``),
                  opset 17. in: input_ids [batch, sequence] int64; out: logits [batch, sequence, 256].
``gpt2_dynamo``   the same model and I/O, dynamo exporter (``dynamo=True``; torch 2.14.1 emits opset 20).
``llama_gqa``     LlamaForCausalLM, 4 query heads over 2 key/value heads (GQA), untied lm_head, dynamo
                  exporter, opset 20. in: input_ids [batch, sequence]; out: logits [batch, sequence, 256].
``llama_gqa_kv``  the same Llama with a key/value cache, dynamo exporter, opset 20. in: input_ids
                  [batch, sequence] int64, attention_mask [batch, total_sequence] int64,
                  past_key_values.{i}.key / .value [batch, 2, past, 16] float (i = 0, 1); out:
                  logits [batch, sequence, 256], present.{i}.key / .value [batch, 2, past + sequence, 16].
``bert``          BertModel without pooler, TorchScript exporter, opset 17. in: input_ids and
                  attention_mask [batch, sequence] int64; out: last_hidden_state [batch, sequence, 64].

The causal LMs run with ``use_cache=False`` and no attention_mask input (a small wrapper module
returns only the logits), except ``llama_gqa_kv``, whose wrapper takes flat tensors, builds a
``transformers.DynamicCache`` from the past ones and returns the logits and the flat grown cache.
The dim_params above are the exact names in the files (the dynamo exports bound ``sequence`` to
<= 128, the position limit; the TorchScript ones cannot declare it). torch.export's ``Dim`` only supports
``a * dim + b`` of a single Dim, not ``past + sequence`` (``NotImplementedError: Attempted to add
Dim('seq', min=0) to past, where an integer was expected``), so the attention mask's length is its
own Dim, ``total_sequence``: the exported graph does not tie it to ``past + sequence`` (callers must
pass past + sequence, as in transformers); the present outputs get the derived ``past + sequence``.
The KV export traces at batch 2, sequence 3, past 5, and the file also runs at past = 0 (prefill
without a cache, checked by :func:`verify`); tracing at past = 0 works too but specialises a little
differently (190 instead of 178 nodes, one output named ``seq + past``), so it is not used.

Workarounds. transformers' ``find_packed_sequence_indices`` (masking_utils; it looks for several
sequences packed in one row when there is no attention_mask and no cache) calls ``torch.diff``, which
the TorchScript exporter rejects (``UnsupportedOperatorError: Exporting the operator 'aten::diff'
to ONNX opset version 17 is not supported``) and which the dynamo exporter keeps in the graph (diff,
cumsum, GatherND: 137 instead of 100 nodes in gpt2_dynamo). It is patched to return ``None`` (one
sequence per row, which is what eager transformers concludes for such inputs) while exporting. Tied
initializers: the TorchScript exporter feeds equal initializers through ``Identity`` nodes (14 in
gpt2_ts, 19 in bert), undone by ``export_torchvision.unshare_initializers``; the dynamo exporter's
optimizer (onnx_ir ``DeduplicateInitializersPass``, tensors of <= 1024 elements) makes the nodes share
one initializer directly (all 5 LayerNorm gammas and betas of gpt2_dynamo, all 5 RMSNorm weights of
llama), so while exporting that pass is told to skip every parameter and buffer of the module (its
other constants, shapes and axes, are still shared). A genuine tie stays: gpt2's lm_head is its token
embedding (gpt2_dynamo: one initializer read by Gather and Transpose; gpt2_ts: the transposed copy is
folded into a second initializer). The dynamo optimizer also drops all-zero Gemm biases (gpt2_dynamo's
8 Gemm have 2 inputs with the default init, 3 with ``--init calibrated``).

Init: ``--init transformers`` (default) is the library's own random init: Linear/Embedding weights
~ N(0, 0.02), every LayerNorm/RMSNorm gamma 1, every bias 0 (hence the ties above). ``--init
calibrated`` (files get a ``_cal`` suffix) then also draws, from seed 0, as export_torchvision does,
every 1-D parameter (norm gamma ~ U(0.5, 1.5), biases ~ N(0, 0.1)) and every all-zero weight ~ N(0, 0.02).

Exports take ~0.5-7 s (TorchScript) and ~10-20 s (dynamo: torch.export, decompositions, optimizer) on
2 CPU cores; an onnxruntime run at [3, 19] takes ~1 ms. Needs torch, transformers, onnxscript (dynamo
exporter), onnx and onnxruntime; tested with torch 2.14.1, transformers 5.24.0, onnxscript 0.7.2.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import pathlib
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from export_torchvision import (cache_dir, calibrate_parameters, checked_export, import_torchvision,  # noqa: E402
                                unshare_initializers)

NAMES = ["gpt2_ts", "gpt2_dynamo", "llama_gqa", "llama_gqa_kv", "bert"]
#: fp16 variants (weights and activations in half precision, as LLMs ship): ``NAME_fp16`` of these
FP16 = ["llama_gqa"]
#: bfloat16 variants ``NAME_bf16`` (onnxruntime's CPU provider runs almost no bf16 operator, so
#: these are not verified against torch in onnxruntime; spa probes them through an fp16 twin)
BF16 = ["llama_gqa"]
#: every name export() takes
ALL = NAMES + [f"{n}_fp16" for n in FP16] + [f"{n}_bf16" for n in BF16]
OPSET_TS = 17
HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB, MAXPOS = 64, 2, 4, 2, 128, 256, 128
HEAD_DIM = HIDDEN // HEADS
TOL = 1e-4


INITS = ("transformers", "calibrated")


def default_path(name: str, init: str = "transformers") -> pathlib.Path:
    return cache_dir() / "transformers" / f"{name}{'_cal' if init == 'calibrated' else ''}.onnx"


def _check_name(name: str) -> None:
    if name not in ALL:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(ALL)}")


def kv_names() -> tuple[list[str], list[str]]:
    """Names of the past inputs and present outputs of ``llama_gqa_kv``, layer by layer, key first."""
    past = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    return past, [n.replace("past_key_values.", "present.") for n in past]


def io_names(name: str) -> tuple[list[str], list[str]]:
    if name == "llama_gqa_kv":
        past, present = kv_names()
        return ["input_ids", "attention_mask", *past], ["logits", *present]
    if name == "bert":
        return ["input_ids", "attention_mask"], ["last_hidden_state"]
    return ["input_ids"], ["logits"]


def wrap(name: str, model):
    """An nn.Module with flat tensor inputs and outputs (see the module docstring)."""
    import torch

    if name == "bert":
        class Bert(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return Bert(model).eval()

    if name == "llama_gqa_kv":
        from transformers import DynamicCache

        # transformers 5 calls the argument `cache` (`past_key_values` is deprecated), 4.x `past_key_values`
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

        class LlamaKV(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, *past):
                cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{kw: cache})
                present = out.cache if kw == "cache" else out.past_key_values
                flat = []
                for layer in present:  # (keys, values[, sliding window])
                    flat += list(layer)[:2]
                return (out.logits, *flat)
        return LlamaKV(model).eval()

    class CausalLM(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits
    return CausalLM(model).eval()


def build(name: str, init: str = "transformers"):
    """The eval-mode fp32 wrapper module of ``name`` with seeded random weights (see the docstring)."""
    import torch
    import_torchvision()  # transformers imports torchvision, whose PyPI build needs help beside a CPU torch
    import transformers as tf

    _check_name(name)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    torch.manual_seed(0)
    if name.startswith("gpt2"):
        cfg = tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTER, vocab_size=VOCAB,
                            n_positions=MAXPOS, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
        model = tf.GPT2LMHeadModel(cfg)
    elif name.startswith("llama"):
        cfg = tf.LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             num_key_value_heads=KV_HEADS, intermediate_size=INTER, vocab_size=VOCAB,
                             max_position_embeddings=MAXPOS, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             attn_implementation="eager")
        model = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=INTER, vocab_size=VOCAB, max_position_embeddings=MAXPOS,
                            pad_token_id=0, attn_implementation="eager")
        model = tf.BertModel(cfg, add_pooling_layer=False)
    if init == "calibrated":  # as export_torchvision's --init calibrated (there is no BatchNorm here)
        calibrate_parameters(model)
    return wrap(name, model.float().eval())


def sample_inputs(name: str, batch: int, seq: int, past: int = 0, seed: int = 0, pad: int = 0) -> dict:
    """Named torch inputs: random tokens, an all-ones mask except ``pad`` masked positions at the start
    of the last row (left padding), random N(0, 1) past keys/values for ``llama_gqa_kv``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    feeds = {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}
    if name in ("bert", "llama_gqa_kv"):
        mask = torch.ones(batch, past + seq, dtype=torch.int64)
        mask[-1, :pad] = 0
        feeds["attention_mask"] = mask
    if name == "llama_gqa_kv":
        for n in kv_names()[0]:
            feeds[n] = torch.randn(batch, KV_HEADS, past, HEAD_DIM, generator=g)
    return feeds


@contextlib.contextmanager
def single_sequence_masks():
    """Make transformers treat every row as one sequence (see "Workarounds" in the docstring)."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    orig = getattr(masking_utils, "find_packed_sequence_indices", None)
    if orig is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig


def tensor_names(module) -> set[str]:
    """Qualified names of every parameter and buffer of ``module`` (tied ones under each name)."""
    return ({n for n, _ in module.named_parameters(remove_duplicate=False)}
            | {n for n, _ in module.named_buffers(remove_duplicate=False)})


@contextlib.contextmanager
def keep_parameters_apart(names):
    """Keep the dynamo exporter from tying parameters and buffers of equal contents (see "Workarounds");
    its other constants (shapes, axes) are still deduplicated, so shape computations still share nodes."""
    try:
        from onnx_ir.passes.common import initializer_deduplication as dedup
        orig = dedup._should_skip_initializer
    except (ImportError, AttributeError):
        yield
        return
    names = frozenset(names)
    dedup._should_skip_initializer = lambda value, *args: value.name in names or orig(value, *args)
    try:
        yield
    finally:
        dedup._should_skip_initializer = orig


def _export_to(name: str, module, tmp: str) -> None:
    import torch

    inputs, outputs = io_names(name)
    if name in ("gpt2_ts", "bert"):
        x = sample_inputs(name, 2, 9)
        dyn = {n: {0: "batch", 1: "sequence"} for n in inputs + outputs}
        torch.onnx.export(
            module, tuple(x.values()), tmp, dynamo=False, opset_version=OPSET_TS,
            input_names=inputs, output_names=outputs, dynamic_axes=dyn, do_constant_folding=True,
        )
        return
    Dim = torch.export.Dim
    batch, seq = Dim("batch"), Dim("sequence", max=MAXPOS)
    if name == "llama_gqa_kv":
        x = sample_inputs(name, 2, 3, past=5)
        past, total = Dim("past"), Dim("total_sequence")
        shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past} for _ in kv_names()[0]))
    else:
        x = sample_inputs(name, 2, 9)
        shapes = ({0: batch, 1: seq},)
    program = torch.onnx.export(
        module, tuple(x.values()), dynamo=True, input_names=inputs, output_names=outputs,
        dynamic_shapes=shapes, verbose=False,
    )
    program.save(tmp)


def export(name: str, out: pathlib.Path | None = None, init: str = "transformers") -> pathlib.Path:
    """Export ``name``; return the path (skips the export if the file exists)."""
    import onnx

    _check_name(name)
    out = pathlib.Path(out) if out is not None else default_path(name, init)
    if out.is_file():
        return out
    base = name.removesuffix("_fp16").removesuffix("_bf16")
    module = build(base, init)
    if name.endswith("_fp16"):
        module = module.half()
    elif name.endswith("_bf16"):
        import torch
        module = module.to(torch.bfloat16)
    with checked_export(out) as tmp:
        with warnings.catch_warnings(), single_sequence_masks(), \
                keep_parameters_apart(tensor_names(module)):
            warnings.simplefilter("ignore")  # legacy-exporter DeprecationWarning, TracerWarnings, dim renames
            _export_to(base, module, tmp)
        m = onnx.load(tmp, load_external_data=False)
        external = [t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        if external:
            raise RuntimeError(f"{name}: the exporter wrote external data ({len(external)} tensors)")
        if unshare_initializers(m):
            onnx.save(m, tmp)
    return out


def signature(path) -> dict[str, list]:
    """``{name: shape}`` of the graph inputs and outputs; symbolic dims as their dim_param."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(g.input) + list(g.output)}


def verify(name: str, path, tol: float = TOL, init: str | None = None) -> dict[str, float]:
    """Run ``path`` in onnxruntime (CPU) at two sizes (plus padded masks, and for ``llama_gqa_kv`` a
    prefill with and without a past, and a decode step fed with the prefill's present) and compare every
    output to torch (the model rebuilt with ``init``; by default "calibrated" for a ``*_cal.onnx`` file).
    Returns ``{case: max abs diff}``; raises AssertionError above ``tol``."""
    import numpy as np
    import onnxruntime as ort
    import torch

    _check_name(name)
    if init is None:
        init = "calibrated" if pathlib.Path(path).stem.endswith("_cal") else "transformers"
    if name.endswith("_bf16"):
        raise ValueError(f"{name}: onnxruntime has no CPU kernels for bf16 models; they are not verified")
    base = name.removesuffix("_fp16")
    module = build(base, init)
    if base != name:  # half precision on both sides: compare to fp16 rounding
        module, tol = module.half(), max(tol, 1e-2)
    name = base
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want_in, want_out = io_names(name)
    got_in, got_out = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    assert (got_in, got_out) == (want_in, want_out), f"{name}: I/O {got_in} -> {got_out}"

    def run(feeds):
        with torch.no_grad():
            ref = module(*feeds.values())
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
        for r, o, n in zip(ref, got, got_out):
            assert tuple(r.shape) == o.shape, f"{name}: {n} shape {o.shape}, torch {tuple(r.shape)}"
        return ref, got, max(float(np.abs(r.numpy() - o).max()) for r, o in zip(ref, got))

    if name == "llama_gqa_kv":
        cases = [(1, 7, 0, 0), (3, 19, 4, 0), (2, 5, 6, 3)]
    else:
        cases = [(1, 7, 0, 0), (3, 19, 0, 0)] + ([(3, 19, 0, 4)] if name == "bert" else [])
    results = {}
    for i, (b, s, p, pad) in enumerate(cases):
        key = f"[{b},{s}]" + (f" past={p}" if name == "llama_gqa_kv" else "") + (f" pad={pad}" if pad else "")
        results[key] = run(sample_inputs(name, b, s, p, seed=i + 1, pad=pad))[2]
    if name == "llama_gqa_kv":  # prefill 24 tokens without a cache, then one decode step on each side's cache
        feeds = sample_inputs(name, 2, 24, 0, seed=10)
        ref, got, results["[2,24] past=0 prefill"] = run(feeds)
        step = sample_inputs(name, 2, 1, 24, seed=11)
        t_feeds = dict(step, **dict(zip(kv_names()[0], ref[1:])))
        with torch.no_grad():
            t_out = module(*t_feeds.values())
        o_out = sess.run(None, {**{k: v.numpy() for k, v in step.items()}, **dict(zip(kv_names()[0], got[1:]))})
        results["[2,1] past=24 decode"] = max(float(np.abs(r.numpy() - o).max()) for r, o in zip(t_out, o_out))
    bad = {k: v for k, v in results.items() if not v <= tol}
    assert not bad, f"{name}: onnxruntime vs torch above {tol}: {bad}"
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"models (known: {', '.join(ALL)})")
    ap.add_argument("--all", action="store_true", help="export every model")
    ap.add_argument("--out", type=pathlib.Path, help="output file (only with a single model)")
    ap.add_argument("--init", choices=INITS, default="transformers", help="weight init recipe (see docstring)")
    ap.add_argument("--force", action="store_true", help="re-export even if the file exists")
    ap.add_argument("--verify", action="store_true", help="check each file against torch in onnxruntime")
    args = ap.parse_args(argv)
    names = NAMES if args.all else args.names
    if not names:
        ap.error("name at least one model, or --all")
    if args.out and len(names) != 1:
        ap.error("--out needs exactly one model")
    unknown = [n for n in names if n not in ALL]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(ALL)}")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("error: torch and transformers are needed: pip install -e '.[test]' (torch, transformers, onnxscript)",
              file=sys.stderr)
        return 1
    failed = 0
    for name in names:
        path = args.out or default_path(name, args.init)
        if args.force and path.is_file():
            path.unlink()
        cached = path.is_file()
        t0 = time.perf_counter()
        try:
            path = export(name, path, args.init)
            how = "cached" if cached else f"exported in {time.perf_counter() - t0:.1f}s"
            print(f"{name}\t{path}\t{how}", flush=True)
            if args.verify:
                t0 = time.perf_counter()
                res = verify(name, path, init=args.init)
                sig = " ".join(f"{k}{v}" for k, v in signature(path).items())
                print(f"  io: {sig}", flush=True)
                print(f"  verified in {time.perf_counter() - t0:.1f}s, max abs diff: "
                      + ", ".join(f"{k} {v:.1e}" for k, v in res.items()), flush=True)
        except Exception as err:  # report and go on with the others
            print(f"error: {name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                  file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
