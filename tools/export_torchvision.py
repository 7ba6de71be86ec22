#!/usr/bin/env python
"""Export torchvision architectures (random weights) to ONNX in the model cache.

    python tools/export_torchvision.py resnet18 vit_b_16 --size 64
    python tools/export_torchvision.py --all --size 64
    python tools/export_torchvision.py resnet50 --size 224 --dynamic-batch

Recipe (recorded in models/manifest.json): ``torch.manual_seed(0)``, ``builder(weights=None)``
(``vit_*`` also get ``image_size=size`` so the positional embedding matches), ``model.eval()``,
``torch.onnx.export`` at opset 17 with a static input ``input`` of shape [1, 3, size, size] and an
output ``logits`` (``--dynamic-batch`` makes dim 0 the symbolic ``batch``). Output:
``$SPA_CACHE/torchvision/{arch}_{size}.onnx`` (``_{size}_dynbatch.onnx`` with --dynamic-batch),
written to a temporary file, checked with ``onnx.checker`` and renamed; an existing file is reused.

Init: ``--init torchvision`` (default) is torchvision's own random init, which is degenerate for
output comparisons: vit_b_16's head is zero-initialised (logits are exactly 0), mobilenet_v2 and
efficientnet_b0 give logits around 1e-9 and 1e-14, all BN/LN gammas are 1 and betas/biases 0.
``--init calibrated`` (files get a ``_cal`` suffix) then also draws, from seed 0, every 1-D parameter
(norm gamma ~ U(0.5, 1.5), betas/biases ~ N(0, 0.1)) and every all-zero weight ~ N(0, 0.02), and
recalibrates BatchNorm running statistics on 8 random N(0,1) batches (cumulative average), so
activations and logits are O(1) and no two initializers are equal.

Shared initializers: the TorchScript exporter deduplicates initializers with identical contents and
feeds the duplicates through ``Identity`` nodes. With random init that ties every all-zero bias and
all-one LayerNorm gamma of the same length across unrelated layers (16 Identity in resnet18, 72 in
vit_b_16), which a structured pruner would have to untie. By default :func:`unshare_initializers`
undoes it (each ``Identity(initializer)`` becomes its own initializer, same values, same output
name); ``--keep-shared`` keeps the exporter's raw graph (files get a ``_shared`` suffix).

Exporter: the TorchScript exporter (``dynamo=False``). It still works in torch 2.14.1 (with a
DeprecationWarning, silenced here) and gives classic graphs: weights as initializers, shape
constants folded (``do_constant_folding=True``), no Shape/Gather chains for static shapes, a few
seconds per model, one self-contained file. The dynamo exporter (the default since torch 2.9) is
slower, and emits a different style of graph; it is not used. Needs torch and torchvision (dev-only
dependencies: the test extra, ``pip install -e '.[test]'``, torch 2.13.0 and torchvision 0.28.0; with a CPU torch,
``import_torchvision`` works around torchvision's CUDA-built ops) and onnx.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile
import time
import warnings

from spa.io.writer import plain_mode

ARCHS = [
    "resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121",
    "shufflenet_v2_x1_0", "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t",
]
OPSET = 17


def import_torchvision():
    """torchvision, importable beside a CPU build of torch too.  PyPI's torchvision wheels for x86-64
    Linux are CUDA builds: their C++ ops (nms, roi_align...) do not load beside torch's CPU wheel, and
    torchvision 0.28 then fails at import, registering fake kernels for two of them (``RuntimeError:
    operator torchvision::nms does not exist``).  The architectures spa exports are plain Python: where
    the import fails so, the two schemas are defined and the import tried again (the detection ops
    stay unusable; nothing here uses them).  tests/conftest.py calls this before any test imports
    torchvision."""
    try:
        import torchvision
        return torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    import torch
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for op in ("nms", "qnms"):
        torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision
    return torchvision


def cache_dir() -> pathlib.Path:
    env = os.environ.get("SPA_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "spa" / "models"


@contextlib.contextmanager
def checked_export(out: pathlib.Path):
    """A temporary path beside ``out`` to export to; on success the file is checked with
    ``onnx.checker`` (full_check) and renamed to ``out``, on any failure removed."""
    import onnx
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".part.onnx", dir=out.parent)
    os.close(fd)
    try:
        yield tmp
        onnx.checker.check_model(tmp, full_check=True)
        plain_mode(tmp)   # 0644 under umask 022, not mkstemp's 0600
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def default_path(arch: str, size: int = 224, dynamic_batch: bool = False, keep_shared: bool = False,
                 init: str = "torchvision") -> pathlib.Path:
    suffix = ("_cal" if init == "calibrated" else "") + ("_dynbatch" if dynamic_batch else "") + ("_shared" if keep_shared else "")
    return cache_dir() / "torchvision" / f"{arch}_{size}{suffix}.onnx"


def unshare_initializers(model) -> int:
    """Replace each ``Identity`` whose input is an initializer by a copy of that initializer named
    like the Identity's output. Returns the number of nodes replaced. Values are unchanged."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    keep, copies = [], []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            t = type(inits[node.input[0]])()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            copies.append(t)
        else:
            keep.append(node)
    if copies:
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(copies)
    return len(copies)


def _check_size(arch: str, size: int) -> None:
    if arch.startswith("vit_") and size % 16:
        raise ValueError(f"{arch}: --size must be a multiple of 16 (got {size})")
    if arch.startswith("swin_") and size % 32:
        raise ValueError(f"{arch}: --size must be a multiple of 32 (got {size})")
    if size < 32:
        raise ValueError(f"{arch}: --size must be at least 32 (got {size})")


INITS = ("torchvision", "calibrated")


def calibrate_parameters(model):
    """``--init calibrated``'s draws (seed 0): norm gammas ~ U(0.5, 1.5), other 1-D parameters ~
    N(0, 0.1), all-zero weights ~ N(0, 0.02).  Returns the generator, for what the caller draws next."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return g


def build(arch: str, size: int = 224, init: str = "torchvision"):
    """The eval-mode torchvision model with seeded random weights (see the module docstring)."""
    import torch
    torchvision = import_torchvision()

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    torch.manual_seed(0)
    kwargs = {"weights": None}
    if arch.startswith("vit_"):
        kwargs["image_size"] = size
    model = torchvision.models.get_model(arch, **kwargs)
    if init == "calibrated":
        g = calibrate_parameters(model)
        with torch.no_grad():
            bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            if bns:
                for m in bns:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average
                model.train()
                for _ in range(8):
                    model(torch.randn(4, 3, size, size, generator=g))
    return model.eval()


def export(arch: str, size: int = 224, out: pathlib.Path | None = None, dynamic_batch: bool = False,
           keep_shared: bool = False, init: str = "torchvision") -> pathlib.Path:
    """Export ``arch`` at ``size`` x ``size``; return the path (skips the export if it exists)."""
    _check_size(arch, size)
    out = pathlib.Path(out) if out is not None else default_path(arch, size, dynamic_batch, keep_shared, init)
    if out.is_file():
        return out
    return export_image_model(build(arch, size, init), size, out, dynamic_batch=dynamic_batch,
                              keep_shared=keep_shared)


def export_image_model(model, size: int, out: pathlib.Path, *, dynamic_batch: bool = False,
                       keep_shared: bool = False) -> pathlib.Path:
    """TorchScript-export an image model (input ``input`` [1, 3, size, size], output ``logits``) to
    ``out`` through :func:`checked_export`, its shared initializers made one per user unless
    ``keep_shared``; tools/export_timm.py exports the same way."""
    import onnx
    import torch

    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with checked_export(out) as tmp:
        # No torch.no_grad(): with grad disabled nn.MultiheadAttention (vit_*) takes its fused fast
        # path, aten::_native_multi_head_attention, which the TorchScript exporter cannot export.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-exporter DeprecationWarning, TracerWarnings
            torch.onnx.export(
                model, (x,), tmp, dynamo=False, opset_version=OPSET,
                input_names=["input"], output_names=["logits"], do_constant_folding=True,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
            )
        if not keep_shared:
            m = onnx.load(tmp)
            if unshare_initializers(m):
                onnx.save(m, tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="*", help=f"torchvision architectures (known: {', '.join(ARCHS)})")
    ap.add_argument("--all", action="store_true", help="export every architecture of the manifest")
    ap.add_argument("--size", type=int, default=224, help="input height and width (default 224; tests use 64)")
    ap.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension symbolic")
    ap.add_argument("--out", type=pathlib.Path, help="output file (only with a single arch)")
    ap.add_argument("--keep-shared", action="store_true", help="keep the exporter's Identity-shared initializers")
    ap.add_argument("--init", choices=INITS, default="torchvision", help="weight init recipe (see docstring)")
    ap.add_argument("--force", action="store_true", help="re-export even if the file exists")
    args = ap.parse_args(argv)
    archs = ARCHS if args.all else args.archs
    if not archs:
        ap.error("name at least one architecture, or --all")
    if args.out and len(archs) != 1:
        ap.error("--out needs exactly one architecture")
    try:
        import torch  # noqa: F401
        import_torchvision()
    except ImportError:
        print("error: torch and torchvision are needed: pip install torch==2.13.0 torchvision==0.28.0 (the test "
              "extra's)", file=sys.stderr)
        return 1
    failed = 0
    for arch in archs:
        path = args.out or default_path(arch, args.size, args.dynamic_batch, args.keep_shared, args.init)
        if args.force and path.is_file():
            path.unlink()
        cached = path.is_file()
        t0 = time.perf_counter()
        try:
            path = export(arch, args.size, path, args.dynamic_batch, args.keep_shared, args.init)
        except Exception as err:  # report and go on with the others
            print(f"error: {arch}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
            failed += 1
            continue
        how = "cached" if cached else f"exported in {time.perf_counter() - t0:.1f}s"
        print(f"{arch}\t{path}\t{how}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
