#!/usr/bin/env python
"""Convert a float32 ONNX model to float16, for the CUDA latency table (docs/benchmarks.md).

    python tools/to_fp16.py dense.onnx dense_fp16.onnx
    python tools/to_fp16.py pruned.onnx pruned_fp16.onnx --keep-io-types

Why a script and not a spa feature: fp16 is how models are deployed on a GPU, so the CUDA table
measures dense and pruned models at fp16; spa itself prunes the float32 model, and both files are
then converted the same way here. The conversion is the standard one,
``onnxruntime.transformers.float16.convert_float_to_float16`` (onnxruntime's copy of
onnxconverter-common's ``float16`` module), so it needs nothing beyond spa's own onnxruntime: no
onnxconverter-common. Its defaults are kept: ops without a float16 kernel in onnxruntime
(``DEFAULT_OP_BLOCK_LIST``) stay float32 behind Casts, weights outside float16's range are clamped.
The inputs and outputs become float16 too unless ``--keep-io-types`` (then Casts at the edges);
``spa bench`` makes every input in its declared dtype, so either form benchmarks as it is.
Nothing checks accuracy here: a Llama's fp16 logits can differ visibly from fp32 (compare with
``spa check A B --atol 1e-1 --rtol 1e-1``). Written through spa's safe writer (temporary file and
rename; external data above 2 GB; refuses to overwrite the input).
"""
from __future__ import annotations

import argparse
import sys

import onnx


def to_fp16(model: onnx.ModelProto, keep_io_types: bool = False) -> onnx.ModelProto:
    """``model`` with its float tensors made float16 (onnxruntime's standard converter)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=keep_io_types)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="float32 ONNX model")
    ap.add_argument("out", help="float16 ONNX model to write")
    ap.add_argument("--keep-io-types", action="store_true",
                    help="keep float32 graph inputs and outputs (Casts at the edges)")
    args = ap.parse_args(argv)
    from spa.io import save_model

    save_model(to_fp16(onnx.load(args.model), keep_io_types=args.keep_io_types), args.out,
               inputs=[args.model])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
