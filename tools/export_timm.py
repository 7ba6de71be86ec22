#!/usr/bin/env python
"""Export timm architectures (random weights, nothing downloaded) to ONNX in the model cache.

    python tools/export_timm.py efficientformerv2_s0
    python tools/export_timm.py efficientformerv2_s0 --size 224 --init timm

Recipe: ``torch.manual_seed(0)``, ``timm.create_model(arch, pretrained=False, img_size=size)``
(nothing is downloaded), then by default the calibrated init of ``tools/export_torchvision.py``
(``--init calibrated``: norm gammas ~ U(0.5, 1.5), other 1-D parameters ~ N(0, 0.1), all-zero weights
~ N(0, 0.02), every ``attention_biases`` table ~ N(0, 0.5), BatchNorm statistics recalibrated on 8
random N(0, 1) batches), ``model.eval()``, and ``torch.onnx.export`` (TorchScript, ``dynamo=False``)
at opset 17 with a static input ``input`` [1, 3, size, size] and an output ``logits``,
``do_constant_folding=True``, then ``export_torchvision.unshare_initializers``. Output:
``$SPA_CACHE/timm/{arch}_{size}[_cal].onnx``, written to a temporary file, checked with
``onnx.checker`` and renamed; an existing file is reused. Needs ``pip install timm`` (1.0.31 here)
beside torch.

``efficientformerv2_s0`` (EfficientFormerV2-S0, 3.6M parameters at 224): convolutional stages, then
attention blocks whose attention bias is a learned table ``attention_biases`` [heads, positions]
indexed by a constant ``attention_bias_idxs`` [N, N]: in the export a ``Gather`` over that table
(axis 1), behind the TorchScript exporter's own copy of it, is what spa's rule for a Gather of a
weight-derived table must tie to the heads (issue 26).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from export_torchvision import (cache_dir, calibrate_parameters, export_image_model,  # noqa: E402
                                import_torchvision)

ARCHS = ["efficientformerv2_s0"]
INITS = ("timm", "calibrated")


def default_path(arch: str, size: int = 224, init: str = "calibrated") -> pathlib.Path:
    return cache_dir() / "timm" / f"{arch}_{size}{'_cal' if init == 'calibrated' else ''}.onnx"


def build(arch: str, size: int = 224, init: str = "calibrated"):
    """The eval-mode timm model with seeded random weights (see the module docstring)."""
    import_torchvision()  # timm imports torchvision, whose PyPI build needs help beside a CPU torch
    import timm
    import torch

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, img_size=size)
    if init == "calibrated":
        g = calibrate_parameters(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("attention_biases"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average
            if bns:
                model.train()
                for _ in range(8):
                    model(torch.randn(4, 3, size, size, generator=g))
    return model.eval()


def export(arch: str, size: int = 224, out: pathlib.Path | None = None, init: str = "calibrated") -> pathlib.Path:
    """Export ``arch`` at ``size`` x ``size``; return the path (skips the export if it exists)."""
    out = pathlib.Path(out) if out is not None else default_path(arch, size, init)
    if out.is_file():
        return out
    return export_image_model(build(arch, size, init), size, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="+", help=f"timm architectures (known to the tests: {', '.join(ARCHS)})")
    ap.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    ap.add_argument("--init", choices=INITS, default="calibrated", help="weight init recipe (see docstring)")
    ap.add_argument("--out", type=pathlib.Path, help="output file (only with a single arch)")
    ap.add_argument("--force", action="store_true", help="re-export even if the file exists")
    args = ap.parse_args(argv)
    if args.out and len(args.archs) != 1:
        ap.error("--out needs exactly one architecture")
    try:
        import_torchvision()          # timm imports torchvision (see build)
        import timm  # noqa: F401
    except ImportError:
        print("error: timm is needed: pip install timm", file=sys.stderr)
        return 1
    failed = 0
    for arch in args.archs:
        path = args.out or default_path(arch, args.size, args.init)
        if args.force and path.is_file():
            path.unlink()
        cached, t0 = path.is_file(), time.perf_counter()
        try:
            path = export(arch, args.size, path, args.init)
        except Exception as err:  # report and go on with the others
            print(f"error: {arch}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
            failed += 1
            continue
        print(f"{arch}\t{path}\t{'cached' if cached else f'exported in {time.perf_counter() - t0:.1f}s'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
