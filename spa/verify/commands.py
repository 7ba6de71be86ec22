"""The ``spa check`` and ``spa bench`` commands: click wrappers over ``spa.verify.check.compare`` and
``spa.verify.bench.benchmark``.  Only click and the standard library at import (``spa --help`` loads
no onnx, onnxruntime or numpy); the library is imported when a command runs."""
from __future__ import annotations

import json
import sys

import click

from ..errors import SpaError
from ..progress import printer
from .flags import CHECK_PROVIDERS, PROVIDERS, parse_input_shapes


def _shapes_option(ctx, param, values):
    try:
        return parse_input_shapes(values)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _batches_option(ctx, param, value):
    try:
        batches = [int(b) for b in str(value).split(",") if b.strip()]
    except ValueError:
        raise click.BadParameter("expected comma-separated integers, e.g. 1,8,32") from None
    if not batches or any(b < 1 for b in batches):
        raise click.BadParameter("expected positive integers, e.g. 1,8,32")
    return batches


def _fail(e) -> None:
    text = str(e).strip().splitlines()
    click.echo(f"spa: error: {text[0] if text else type(e).__name__}", err=True)
    sys.exit(2)


def _load_npz(path) -> dict:
    import numpy as np

    from .check import CheckError
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckError(f"cannot read inputs from {path}: {first}") from e


@click.command("check")
@click.argument("original")
@click.argument("other")
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False),
              help="Input arrays (.npz, keyed by input name); missing inputs are random.")
@click.option("--input-shapes", multiple=True, callback=_shapes_option,
              help="Shapes of inputs, e.g. 'x:[1,3,224,224]' (repeatable or comma-separated).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random inputs.")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="Relative tolerance.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--provider", type=click.Choice(sorted(CHECK_PROVIDERS)), default="cpu",
              show_default=True, help="ONNX Runtime execution provider.")
@click.option("--every-size", is_flag=True,
              help="Also compare at two other sizes of every dynamic dim (all moved up; batch 2 and one token).")
def check_command(original, other, inputs_path, input_shapes, seed, atol, rtol, as_json,
                  provider, every_size):
    """Compare the outputs of ORIGINAL and OTHER (paths or zoo models' names) on the same inputs.

    Exit code 0 if every output matches within tolerance, 1 if not, 2 on usage or load errors.
    """
    try:
        from .check import CheckError, compare, cuda_available, format_check
        inputs = _load_npz(inputs_path) if inputs_path else None
        if provider == "cuda" and not cuda_available():
            raise CheckError("CUDA execution provider is not available (onnxruntime-gpu with a "
                             "CUDA GPU is needed); use --provider cpu")
        result = compare(original, other, inputs=inputs, input_shapes=input_shapes or None, seed=seed,
                         atol=atol, rtol=rtol, providers=CHECK_PROVIDERS[provider], every_size=every_size)
    except (SpaError, OSError, ValueError) as e:
        _fail(e)
    click.echo(json.dumps(result, indent=2) if as_json else format_check(result))
    sys.exit(0 if result["passed"] else 1)


@click.command("bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--provider", type=click.Choice(list(PROVIDERS)), default="cpu",
              show_default=True, help="ONNX Runtime execution provider.")
@click.option("--batch", "batches", default="1", show_default=True, callback=_batches_option,
              help="Batch sizes, comma-separated (e.g. 1,8,32).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="intra_op_num_threads (default: ONNX Runtime's choice).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed runs per model and batch.")
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed runs per model and batch.")
@click.option("--input-shapes", multiple=True, callback=_shapes_option,
              help="Shapes of inputs, e.g. 'x:[1,3,224,224]' (repeatable or comma-separated).")
@click.option("--allow-cpu-fallback", is_flag=True,
              help="Measure on CPU when the requested GPU provider is not available.")
@click.option("--io-binding/--no-io-binding", default=None,
              help="Run through IO binding: inputs copied to the device once, outputs kept there, so "
                   "host/device copies are not timed. Default: on for cuda/tensorrt, off for cpu.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Save a bar chart to this file (needs matplotlib).")
def bench_command(models, provider, batches, threads, warmup, iters, input_shapes,
                  allow_cpu_fallback, io_binding, as_json, plot):
    """Measure the latency of MODELS (paths or zoo models' names) in ONNX Runtime.

    Models run interleaved (round-robin) in one process; speedup is relative to the first
    MODEL at the same provider and batch. Progress goes to stderr."""
    say = printer()
    try:
        from .bench import benchmark, format_bench, plot_bench, plot_available
        if plot:
            plot_available()  # fail before measuring, not after
        result = benchmark(list(models), provider=provider, batches=batches, threads=threads,
                           warmup=warmup, iters=iters, input_shapes=input_shapes or None,
                           allow_fallback=allow_cpu_fallback, progress=say, io_binding=io_binding)
        if plot:
            plot_bench(result, plot)
            say(f"wrote the plot to {plot}")
    except (SpaError, OSError, ValueError) as e:
        _fail(e)
    click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))
