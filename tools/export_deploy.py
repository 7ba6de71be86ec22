#!/usr/bin/env python
"""Export tiny models in deployment formats (quantized, fused, recurrent, MoE...) to the model cache.

    python tools/export_deploy.py resnet18_qdq bert_fused
    python tools/export_deploy.py --all --describe

Recipe: random weights only, nothing downloaded; ``torch.manual_seed(0)`` before building each torch
module, seeded generators for the trace inputs, and for static quantization a calibration reader of 8
N(0, 1) batches from ``numpy.random.default_rng(0)``. Output: ``$SPA_CACHE/deploy/{name}.onnx``,
written to a temporary file, checked with ``onnx.checker`` (full_check; ``llama_fused`` instead by
opening an onnxruntime CPU session, see there) and renamed; an existing file is reused. The float
sources come from the sibling tools and land in their caches: ``export_torchvision.export("resnet18",
64)`` (``torchvision/resnet18_64.onnx``) and ``export_transformers.export("bert" | "gpt2_ts" |
"llama_gqa")`` (``transformers/``: hidden 64, 2 layers, 4 heads, head_dim 16, see that tool).
TorchScript exports here use opset 17, ``do_constant_folding=True`` and
``export_torchvision.unshare_initializers``. ``--describe`` runs each file in onnxruntime (CPU) on
random inputs (batch 2, sequence 7) and prints its opsets, I/O, and ``(domain, op_type)`` counts.
Models (the names are the API; op counts are for onnxruntime 1.31.1, torch 2.14.1, transformers 5.24.0):

Static quantization of resnet18 (torchvision random init, eval, [1, 3, 64, 64]; in ``input``
[1, 3, 64, 64] float, out ``logits`` [1, 1000]). The float model goes through
``onnxruntime.quantization.quant_pre_process`` (symbolic + ONNX shape inference, onnxruntime's basic
optimizations), then ``quantize_static(activation_type=QUInt8, weight_type=QInt8)``. The
pre-processed file declares every opset onnxruntime knows (ai.onnx.ml, ai.onnx.training,
com.microsoft, com.microsoft.nchwc, org.pytorch.aten, ...), unused; so do all files it or the
transformers optimizer saves.

``resnet18_qdq``            QuantFormat.QDQ, ``per_channel=True``: 20 Conv + 1 Gemm in float between
                            QuantizeLinear (33, uint8 activations) and DequantizeLinear (75: 33
                            activations, 21 int8 weights with per-output-channel scales (axis 0), 21
                            int32 biases); 8 Add, MaxPool, GlobalAveragePool, Flatten. No Relu: the
                            quantizer drops each Relu after a Conv (its QuantizeLinear clips at 0).
``resnet18_qdq_pertensor``  the same with ``per_channel=False`` (scalar weight scales); same op counts.
``resnet18_qop``            QuantFormat.QOperator, per channel: QLinearConv 20, com.microsoft QLinearAdd 8,
                            QLinearGlobalAveragePool 1, QGemm 1, MaxPool and Flatten on uint8, one
                            QuantizeLinear at the input and one DequantizeLinear at the output.

Transformers, quantized or fused (I/O of the source: ``bert`` in input_ids, attention_mask
[batch, sequence] int64, out last_hidden_state [batch, sequence, 64]; the causal LMs in input_ids
[batch, sequence] int64, out logits [batch, sequence, 256]):

``bert_qdyn``    ``bert``, ``quant_pre_process(skip_symbolic_shape=True)`` (the symbolic shape inference
                 fails on it: "unsupported broadcast between Min(128, sequence) sequence", "Incomplete
                 symbolic shape inference"), then ``quantize_dynamic(weight_type=QInt8)``: 12 MatMulInteger
                 (every Linear) fed by 8 DynamicQuantizeLinear, the scales recombined by Cast/Mul; the
                 embedding tables uint8 behind Gather + DequantizeLinear (3); Q.K^T and A.V stay MatMul (4).
``bert_fused``   ``bert`` through ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert",
                 num_heads=4, hidden_size=64)``: com.microsoft EmbedLayerNormalization 1 (it fuses with
                 these input names), Attention 2 (packed QKV weight [64, 192]), SkipLayerNormalization 4,
                 BiasGelu 2; 6 MatMul (attention output and FFN projections); the token-type buffer
                 path (Expand/Slice/GatherElements) feeding EmbedLayerNormalization's segment ids remains.
                 EmbedLayerNormalization turns the mask into per-row lengths (mask_index), so the fused
                 model matches ``bert`` for right padding only (left padding: 3e-2 off).
``gpt2_fused``   ``gpt2_ts`` through ``optimize_model(model_type="gpt2", num_heads=4, hidden_size=64)``:
                 only com.microsoft SkipLayerNormalization 4 and FastGelu 2 (+ 1 LayerNormalization); no
                 Attention: onnxruntime's GPT-2 attention fusion looks for Softmax(Where(mask, Div(MatMul)))
                 and transformers 5's eager attention is Softmax(Add(Mul(MatMul), additive mask)).
                 Matches ``gpt2_ts`` to 2e-7.
``llama_fused``  ``llama_gqa`` (dynamo, opset 20) through ``optimize_model(model_type="gpt2", num_heads=4,
                 hidden_size=64)`` ("qwen3" and "bert" give the same ops; "phi" fails with a TypeError):
                 SimplifiedLayerNormalization 1 (in the *default* domain, onnxruntime's private schema:
                 ``onnx.checker`` rejects it, "No Op registered for SimplifiedLayerNormalization with
                 domain_version of 20", hence the onnxruntime check) and com.microsoft
                 SkipSimplifiedLayerNormalization 4. No GroupQueryAttention, RotaryEmbedding or
                 MultiHeadAttention: the rotary/attention patterns of this export do not match
                 onnxruntime's fusions. Matches ``llama_gqa`` to 2e-7.
``llama_4bit``   ``llama_gqa`` through ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer
                 (bits=4, block_size=32, is_symmetric=True)`` (there is no ``matmul_4bits_quantizer``
                 module in this onnxruntime), QOperator format: com.microsoft MatMulNBits 15 (7 per
                 layer + lm_head; B uint8 [N, K/32, 16], scales [N, K/32], no zero points; attributes
                 K, N, bits=4, block_size=32); Q.K^T and A.V stay MatMul (4); opset stays 20.

Recurrent models (TorchScript, opset 17):

``gru_tagger``     Embedding(100, 32) -> GRU(32, 48, batch_first) -> Linear(48, 10). in ``tokens``
                   [batch, sequence] int64, out ``logits`` [batch, sequence, 10]: one GRU (forward),
                   Gather, Transpose around it, MatMul + Add for the head.
``bilstm_tagger``  Embedding(100, 32) -> LSTM(32, 40, num_layers=2, bidirectional, batch_first) ->
                   Linear(80, 10); same I/O: 2 LSTM (direction "bidirectional", Y [seq, 2, batch, 40]
                   reshaped to [seq, batch, 80] by Transpose/Reshape), zero initial h/c from
                   Shape/Gather/Concat/ConstantOfShape, sliced per layer (Slice 4).
``crnn_lstm``      Conv(3->16, 3x3, pad 1)+ReLU+MaxPool(2), Conv(16->32)+ReLU+MaxPool(2) on ``image``
                   [1, 3, 32, 128] -> [1, 32, 8, 32]; height collapsed into the features
                   (permute to [1, 32 (width), 32, 8] and reshape to [1, 32, 256]: channel x height),
                   bidirectional LSTM(256, 48), Linear(96, 20); out ``logits`` [1, 32, 20]. Static shapes.
``lstm_qdyn``      ``bilstm_tagger`` through ``quant_pre_process`` + ``quantize_dynamic(weight_type=QInt8)``:
                   com.microsoft DynamicQuantizeLSTM 2 (int8 W and R), the head as DynamicQuantizeLinear
                   + MatMulInteger, the embedding uint8 behind Gather + DequantizeLinear.

Mixture of experts:

``mixtral_moe``  transformers.MixtralForCausalLM from a config (hidden 64, 2 layers, 4 heads over 2 kv
                 heads, intermediate 96, 4 experts, top-2, vocab 256, max positions 128, eager
                 attention, ``experts_implementation="batched_mm"``), wrapped like export_transformers'
                 causal LMs (``use_cache=False``, logits only), dynamo exporter (opset 20), dynamic
                 ``batch`` and ``sequence`` (<= 128). in input_ids [batch, sequence] int64, out logits
                 [batch, sequence, 256]. Router: Gemm (no bias) -> Softmax -> TopK (k=2) -> Div by the
                 sum; tokens flattened to [batch*sequence, 64]; experts: the stacked weights
                 [4, 192, 64] and [4, 64, 96] gathered per (token, choice) by GatherND (index
                 [2*batch*sequence, 1], 2 per layer), batched MatMul, Split (gate/up), SiLU, Mul by the
                 routing weight, ReduceSum over the 2 choices. No NonZero, ScatterND or
                 GatherElements. Matches torch to 2e-7. transformers 5's default experts
                 implementation ("grouped_mm", a custom op ``transformers::grouped_mm_fallback``) has no
                 ONNX translation (DispatchError), and "eager" (a Python loop over ``nonzero()`` hit
                 experts) fails in torch.export on a data-dependent guard.
``qwen_moe``     transformers.Qwen2MoeForCausalLM, the same sizes and recipe, 8 experts of intermediate 48,
                 top-2 without renormalisation (``norm_topk_prob=False``), and a shared expert
                 (intermediate 96) behind a sigmoid gate (Linear 64->1) in every layer.
``olmoe``        transformers.OlmoeForCausalLM, the same sizes and recipe, 8 experts of intermediate 48,
                 top-2 (OLMoE's q/k norms in the attention). Both have Mixtral's router pattern
                 (Gemm -> Softmax -> TopK -> GatherND of stacked weights); ~7 s each.
                 (DeepseekV3ForCausalLM at these sizes fails in torch.export: a rope broadcast of 8 against 4.)

Reshapes that mix channels and space (TorchScript, opset 17, static shapes):

``mobilevit_block``  MobileViT's block on ``input`` [1, 32, 16, 16]: Conv 3x3 (32->32), Conv 1x1
                     (32->48, no bias), unfold into 2x2 patches (Reshape [1, 48, 8, 2, 8, 2], Transpose
                     to [1, 2, 2, 8, 8, 48], Reshape [4, 64, 48]: patch offsets x tokens x channels), a
                     pre-norm transformer layer (LayerNorm, nn.MultiheadAttention(48, 4 heads), LayerNorm,
                     Linear 48->96, SiLU, Linear 96->48, residuals, final LayerNorm), fold back (the
                     inverse Reshape/Transpose/Reshape to [1, 48, 16, 16]), Conv 1x1 48->32, Concat with
                     the input, Conv 3x3 64->32; out ``output`` [1, 32, 16, 16]. The attention brings
                     TorchScript's MultiheadAttention pattern (sequence-first Transpose, packed
                     in-projection MatMul [48, 144] + Add, q/k/v split by Reshape/Gather/Squeeze,
                     Sqrt/Div/Mul scaling, out-projection Gemm).
``pixel_shuffle``    on ``input`` [1, 16, 16, 16]: Conv 3x3 (16->64), PixelShuffle(2), Conv 3x3 (16->8),
                     PixelUnshuffle(2), Conv 3x3 (32->8); out ``output`` [1, 8, 16, 16]. torch emits
                     PixelShuffle as DepthToSpace (mode CRD) and PixelUnshuffle as Reshape [1, 8, 16, 2,
                     16, 2] -> Transpose -> Reshape [1, 32, 16, 16] (no SpaceToDepth).

Times on 2 idle CPU cores from an empty cache, including the sources' exports: ~7 s resnet18_qdq (2.5-3 s
the other two), ~3 s bert_qdyn, < 1 s bert_fused, gpt2_fused, llama_4bit and each torch module, ~20 s
llama_fused (its llama_gqa dynamo export), ~14 s mixtral_moe; ~1 min for ``--all`` (peak RSS 1.1 GB). Needs torch,
torchvision, transformers, onnxscript (dynamo exporter), onnx and onnxruntime (``onnxruntime`` or
``onnxruntime-gpu``: both ship onnxruntime.quantization and onnxruntime.transformers; sympy, for
the symbolic shape inference, comes with torch).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import pathlib
import sys
import tempfile
import time
import warnings

from spa.io.writer import plain_mode

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from export_torchvision import cache_dir, checked_export, unshare_initializers  # noqa: E402

NAMES = [
    "resnet18_qdq", "resnet18_qdq_pertensor", "resnet18_qop",
    "bert_qdyn", "bert_fused", "gpt2_fused", "llama_fused",
    "gru_tagger", "bilstm_tagger", "crnn_lstm", "lstm_qdyn",
    "mixtral_moe", "qwen_moe", "olmoe", "mobilevit_block", "pixel_shuffle", "llama_4bit",
]
OPSET = 17
CALIB_BATCHES = 8
RESNET_SIZE = 64


def default_path(name: str) -> pathlib.Path:
    return cache_dir() / "deploy" / f"{name}.onnx"


def _check_name(name: str) -> None:
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(BUILDERS)}")


@contextlib.contextmanager
def _scratch():
    """A temporary directory for intermediate files (pre-processed and float models)."""
    with tempfile.TemporaryDirectory(prefix="spa-deploy-") as d:
        yield pathlib.Path(d)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter DeprecationWarning, TracerWarnings
        yield


def _ts_export(module, args, path, input_names, output_names, dynamic_axes=None) -> None:
    """TorchScript export (opset 17, constants folded) and untie the exporter's shared initializers."""
    import onnx
    import torch

    with _quiet():
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    m = onnx.load(str(path))
    if unshare_initializers(m):
        onnx.save(m, str(path))


# ---------------------------------------------------------------- static quantization of resnet18

class RandomReader:
    """onnxruntime CalibrationDataReader: ``CALIB_BATCHES`` N(0, 1) batches from ``default_rng(0)``."""

    def __init__(self, model_path, batches: int = CALIB_BATCHES, seed: int = 0):
        import numpy as np
        import onnx

        g = onnx.load(str(model_path), load_external_data=False).graph
        inits = {t.name for t in g.initializer}
        rng = np.random.default_rng(seed)
        self.data = []
        for _ in range(batches):
            self.data.append({v.name: _random_input(v, rng) for v in g.input if v.name not in inits})
        self._it = iter(self.data)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.data)


def _resnet18_float() -> pathlib.Path:
    """export_torchvision's resnet18 at RESNET_SIZE (its cache file, exported if missing)."""
    import export_torchvision
    return export_torchvision.export("resnet18", RESNET_SIZE)


@contextlib.contextmanager
def _preprocessed(src, symbolic: bool = True):
    """``quant_pre_process(src)`` (symbolic and ONNX shape inference, onnxruntime's basic graph
    optimizations) into a temporary file, as onnxruntime's quantization docs recommend;
    ``symbolic=False`` skips the symbolic shape inference (it fails on bert, see the docstring)."""
    from onnxruntime.quantization import quant_pre_process

    with _scratch() as d:
        pre = d / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=not symbolic)
        yield pre


def _quantize_dynamic(src, tmp, symbolic: bool = True) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _preprocessed(src, symbolic) as pre:
        quantize_dynamic(str(pre), tmp, weight_type=QuantType.QInt8)


def _quantize_static(tmp, fmt: str, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with _preprocessed(_resnet18_float()) as pre:
        quantize_static(
            str(pre), tmp, RandomReader(pre), quant_format=getattr(QuantFormat, fmt), per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )


def _resnet18_qdq(tmp):
    _quantize_static(tmp, "QDQ", per_channel=True)


def _resnet18_qdq_pertensor(tmp):
    _quantize_static(tmp, "QDQ", per_channel=False)


def _resnet18_qop(tmp):
    _quantize_static(tmp, "QOperator", per_channel=True)


# ---------------------------------------------------------------- transformers: dynamic quantization, fusion

def _transformers(name: str) -> pathlib.Path:
    import export_transformers
    return export_transformers.export(name)


def _bert_qdyn(tmp):
    _quantize_dynamic(_transformers("bert"), tmp, symbolic=False)


def _fuse(src, tmp, model_type: str) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    from export_transformers import HEADS, HIDDEN
    with _quiet():
        opt = optimize_model(str(src), model_type=model_type, num_heads=HEADS, hidden_size=HIDDEN)
    opt.save_model_to_file(tmp)


def _bert_fused(tmp):
    _fuse(_transformers("bert"), tmp, "bert")


def _gpt2_fused(tmp):
    _fuse(_transformers("gpt2_ts"), tmp, "gpt2")


LLAMA_FUSE_TYPE = "gpt2"


def _llama_fused(tmp):
    _fuse(_transformers("llama_gqa"), tmp, LLAMA_FUSE_TYPE)


LLAMA_4BIT_BLOCK = 32


def _llama_4bit(tmp):
    import onnx

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    # the module calls logging.basicConfig(level=INFO) on import: undo that
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    q = MatMulNBitsQuantizer(onnx.load(str(_transformers("llama_gqa"))), bits=4, block_size=LLAMA_4BIT_BLOCK,
                             is_symmetric=True)
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)  # one INFO line per node otherwise
    try:
        q.process()
    finally:
        log.setLevel(level)
    onnx.save(q.model.model, tmp)


# ---------------------------------------------------------------- recurrent models

def _tagger(rnn: str):
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 32)
            if rnn == "gru":
                self.rnn = torch.nn.GRU(32, 48, batch_first=True)
                self.head = torch.nn.Linear(48, 10)
            else:
                self.rnn = torch.nn.LSTM(32, 40, num_layers=2, bidirectional=True, batch_first=True)
                self.head = torch.nn.Linear(80, 10)

        def forward(self, tokens):
            return self.head(self.rnn(self.embed(tokens))[0])

    torch.manual_seed(0)
    return Tagger().eval()


def _export_tagger(rnn: str, tmp) -> None:
    import torch

    tokens = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    _ts_export(_tagger(rnn), (tokens,), tmp, ["tokens"], ["logits"],
               {"tokens": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}})


def _gru_tagger(tmp):
    _export_tagger("gru", tmp)


def _bilstm_tagger(tmp):
    _export_tagger("lstm", tmp)


def _lstm_qdyn(tmp):
    _quantize_dynamic(export("bilstm_tagger"), tmp)


def _crnn_lstm(tmp):
    import torch

    class CRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            nn = torch.nn
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.rnn = nn.LSTM(32 * 8, 48, bidirectional=True, batch_first=True)
            self.head = nn.Linear(96, 20)

        def forward(self, image):
            f = self.features(image)                       # [N, 32, 8, 32]
            n, c, h, w = f.shape
            seq = f.permute(0, 3, 1, 2).reshape(n, w, c * h)  # [N, 32, 256]: width steps, channel x height
            return self.head(self.rnn(seq)[0])             # [N, 32, 20]

    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 128, generator=torch.Generator().manual_seed(0))
    _ts_export(CRNN().eval(), (x,), tmp, ["image"], ["logits"])


# ---------------------------------------------------------------- mixture of experts

#: the config fields the MoE causal LMs share (Mixtral's sizes)
MOE_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  attn_implementation="eager", experts_implementation="batched_mm")


def _mixtral_moe(tmp):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, **MOE_COMMON)
    _export_causal_lm(tf.MixtralForCausalLM(cfg), tmp)


def _qwen_moe(tmp):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                            num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False,
                            **MOE_COMMON)
    _export_causal_lm(tf.Qwen2MoeForCausalLM(cfg), tmp)


def _olmoe(tmp):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OlmoeConfig(intermediate_size=48, num_experts=8, num_experts_per_tok=2, **MOE_COMMON)
    _export_causal_lm(tf.OlmoeForCausalLM(cfg), tmp)


def _export_causal_lm(model, tmp):
    """A transformers causal LM (random weights, fp32) through the dynamo exporter: input_ids in,
    logits out, dynamic batch and sequence (<= 128), wrapped as export_transformers' causal LMs."""
    import torch

    import export_transformers as et
    model = model.float().eval()

    class CausalLM(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    module = CausalLM(model).eval()
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    Dim = torch.export.Dim
    with _quiet(), et.single_sequence_masks(), et.keep_parameters_apart(et.tensor_names(module)):
        program = torch.onnx.export(module, (x,), dynamo=True, input_names=["input_ids"], output_names=["logits"],
                                    dynamic_shapes=({0: Dim("batch"), 1: Dim("sequence", max=128)},), verbose=False)
    program.save(tmp)


# ---------------------------------------------------------------- reshapes that mix channels and space

def _mobilevit_block(tmp):
    import torch

    nn = torch.nn

    class MobileViTBlock(nn.Module):
        def __init__(self, c=32, d=48, p=2):
            super().__init__()
            self.p = p
            self.conv_kxk = nn.Conv2d(c, c, 3, padding=1)
            self.conv_1x1 = nn.Conv2d(c, d, 1, bias=False)
            self.norm1 = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
            self.norm2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
            self.norm3 = nn.LayerNorm(d)
            self.conv_proj = nn.Conv2d(d, c, 1, bias=False)
            self.conv_fusion = nn.Conv2d(2 * c, c, 3, padding=1)

        def forward(self, x):
            y = self.conv_1x1(self.conv_kxk(x))            # [1, 48, 16, 16]
            b, d, h, w = y.shape
            p = self.p
            nh, nw = h // p, w // p
            # unfold: [B, D, nh, p, nw, p] -> [B, p, p, nh, nw, D] -> [B*p*p, nh*nw, D]
            t = y.reshape(b, d, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(b * p * p, nh * nw, d)
            u = self.norm1(t)
            t = t + self.attn(u, u, u, need_weights=False)[0]
            t = t + self.mlp(self.norm2(t))
            t = self.norm3(t)
            # fold: the inverse permutation back to [B, D, H, W]
            y = t.reshape(b, p, p, nh, nw, d).permute(0, 5, 3, 1, 4, 2).reshape(b, d, h, w)
            y = self.conv_proj(y)
            return self.conv_fusion(torch.cat([x, y], dim=1))

    torch.manual_seed(0)
    x = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(0))
    # no torch.no_grad(): see export_torchvision (MultiheadAttention's fused fast path is not exportable)
    _ts_export(MobileViTBlock().eval(), (x,), tmp, ["input"], ["output"])


def _pixel_shuffle(tmp):
    import torch

    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 64, 3, padding=1), nn.PixelShuffle(2),      # [1, 16, 32, 32]
        nn.Conv2d(16, 8, 3, padding=1), nn.PixelUnshuffle(2),     # [1, 32, 16, 16]
        nn.Conv2d(32, 8, 3, padding=1),
    ).eval()
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    _ts_export(model, (x,), tmp, ["input"], ["output"])


BUILDERS = {
    "resnet18_qdq": _resnet18_qdq,
    "resnet18_qdq_pertensor": _resnet18_qdq_pertensor,
    "resnet18_qop": _resnet18_qop,
    "bert_qdyn": _bert_qdyn,
    "bert_fused": _bert_fused,
    "gpt2_fused": _gpt2_fused,
    "llama_fused": _llama_fused,
    "gru_tagger": _gru_tagger,
    "bilstm_tagger": _bilstm_tagger,
    "crnn_lstm": _crnn_lstm,
    "lstm_qdyn": _lstm_qdyn,
    "mixtral_moe": _mixtral_moe,
    "qwen_moe": _qwen_moe,
    "olmoe": _olmoe,
    "mobilevit_block": _mobilevit_block,
    "pixel_shuffle": _pixel_shuffle,
    "llama_4bit": _llama_4bit,
}


def export(name: str, out: pathlib.Path | None = None) -> pathlib.Path:
    """Export ``name``; return the path (skips the export if the file exists)."""
    _check_name(name)
    out = pathlib.Path(out) if out is not None else default_path(name)
    if out.is_file():
        return out
    with (_ort_checked_export(out) if name in ORT_CHECKED else checked_export(out)) as tmp:
        BUILDERS[name](tmp)
    return out


#: models checked by loading them in onnxruntime instead of onnx.checker: onnxruntime's fusions put
#: SimplifiedLayerNormalization in the default domain, where onnx has no schema for it
ORT_CHECKED = {"llama_fused"}


@contextlib.contextmanager
def _ort_checked_export(out: pathlib.Path):
    """``export_torchvision.checked_export``, but the check is an onnxruntime (CPU) session."""
    import onnxruntime as ort

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".part.onnx", dir=out.parent)
    os.close(fd)
    try:
        yield tmp
        ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        plain_mode(tmp)   # 0644 under umask 022, not mkstemp's 0600
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- checks

SIZES = {"batch": 2, "sequence": 7}


def _random_input(value_info, rng, sizes=None):
    """A random array for a graph input: N(0, 1) floats, token ids in [0, 100), all-ones masks;
    symbolic dims from ``sizes`` (default: batch 2, sequence 7, anything else 4)."""
    import numpy as np
    from onnx import helper

    sizes = SIZES if sizes is None else sizes
    t = value_info.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, 4) for d in t.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
    if np.issubdtype(dtype, np.integer):
        if "mask" in value_info.name:
            return np.ones(shape, dtype)
        return rng.integers(0, 100, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def describe(path) -> dict:
    """Run ``path`` in onnxruntime (CPU) on random inputs; return its op inventory
    ``{(domain, op_type): count}``, its inputs/outputs ``{name: [dims]}`` and the output shapes of the run."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    g = m.graph
    ops = collections.Counter((n.domain or "ai.onnx", n.op_type) for n in g.node)
    inits = {t.name for t in g.initializer}

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {v.name: _random_input(v, rng) for v in g.input if v.name not in inits}
    outs = sess.run(None, feeds)
    finite = all(np.isfinite(o).all() for o in outs if np.issubdtype(o.dtype, np.floating))
    return {
        "ops": dict(sorted(ops.items())),
        "inputs": {v.name: dims(v) for v in g.input if v.name not in inits},
        "outputs": {v.name: dims(v) for v in g.output},
        "run": {o.name: list(r.shape) for o, r in zip(sess.get_outputs(), outs)},
        "finite": finite,
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"models (known: {', '.join(BUILDERS)})")
    ap.add_argument("--all", action="store_true", help="export every model")
    ap.add_argument("--out", type=pathlib.Path, help="output file (only with a single model)")
    ap.add_argument("--force", action="store_true", help="re-export even if the file exists")
    ap.add_argument("--describe", action="store_true",
                    help="run each file in onnxruntime on random inputs and print its operators and I/O")
    args = ap.parse_args(argv)
    names = NAMES if args.all else args.names
    if not names:
        ap.error("name at least one model, or --all")
    if args.out and len(names) != 1:
        ap.error("--out needs exactly one model")
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(BUILDERS)}")
    try:
        import onnxruntime  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        print("error: torch, torchvision, transformers, onnxscript and onnxruntime are needed", file=sys.stderr)
        return 1
    failed = 0
    for name in names:
        path = args.out or default_path(name)
        if args.force and path.is_file():
            path.unlink()
        cached = path.is_file()
        t0 = time.perf_counter()
        try:
            path = export(name, path)
            how = "cached" if cached else f"exported in {time.perf_counter() - t0:.1f}s"
            print(f"{name}\t{path}\t{how}", flush=True)
            if args.describe:
                d = describe(path)
                print("  opset: " + " ".join(f"{k}:{v}" for k, v in d["opset"].items()))
                print("  in: " + " ".join(f"{k}{v}" for k, v in d["inputs"].items())
                      + "  out: " + " ".join(f"{k}{v}" for k, v in d["outputs"].items()))
                print("  ran: " + " ".join(f"{k}{v}" for k, v in d["run"].items())
                      + ("" if d["finite"] else "  (NON-FINITE values)"))
                print("  ops: " + ", ".join(f"{dom}:{op} {c}" for (dom, op), c in d["ops"].items()), flush=True)
        except Exception as err:  # report and go on with the others
            print(f"error: {name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                  file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
