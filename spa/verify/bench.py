"""Latency benchmark of ONNX models in ONNX Runtime, all models in one process, interleaved.

Python API::

    benchmark(models, provider="cpu", batches=(1,), threads=None, warmup=10, iters=50,
              input_shapes=None, allow_fallback=False, progress=None, io_binding=None) -> dict
    format_bench(result) -> str
    plot_bench(result, path)

CLI: ``spa bench MODEL [MODEL...] ...`` (``spa.verify.commands``).
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
import onnxruntime as ort

from spa.verify.check import CheckError, input_specs, load_proto, one_line, cuda_available, \
    fitting_inputs, resolve, session
from spa.verify.flags import PROVIDERS
from spa.errors import SpaError
from spa.runtime.feeds import for_ort
from spa.runtime.latency import cpu_name, gpu_name
from spa.io import write_atomic
from spa.io.weights import BFLOAT16

_SHORT = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
          "TensorrtExecutionProvider": "tensorrt"}
_UNAVAILABLE = {
    "cuda": "CUDA execution provider is not available (onnxruntime-gpu with a CUDA GPU is "
            "needed); pass --allow-cpu-fallback to measure on CPU",
    "tensorrt": "TensorRT execution provider is not available (onnxruntime-gpu with TensorRT "
                "and a CUDA GPU is needed); pass --allow-cpu-fallback to measure on CPU",
}


class BenchError(SpaError):
    """The benchmark cannot run as asked (provider missing, model unusable, ...)."""


def _schedule(n_models: int, iters: int) -> list[int]:
    """Model indices in run order: each iteration runs every model once, and the starting
    model rotates by one per iteration (0 1 2, 1 2 0, 2 0 1, ...)."""
    return [(i + k) % n_models for i in range(iters) for k in range(n_models)]


def _make_session(model, provider, threads, allow_fallback):
    """(session, provider actually used) for the --provider name ``provider``."""
    if provider not in PROVIDERS:
        raise BenchError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    usable = provider == "cpu" or (wanted[0] in ort.get_available_providers()
                                   and cuda_available())
    if not usable:
        if not allow_fallback:
            raise BenchError(_UNAVAILABLE[provider])
        wanted = PROVIDERS["cpu"]
    try:
        sess = session(model, wanted, threads=threads)
    except CheckError as e:
        raise BenchError(str(e)) from e
    used = _SHORT.get(sess.get_providers()[0], sess.get_providers()[0])
    if used != provider and not allow_fallback:  # ORT fell back silently
        raise BenchError(_UNAVAILABLE[provider])
    return sess, used


#: the device an execution provider's tensors live on (OrtValue / IOBinding device names)
_DEVICE = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"}


def bound_runner(sess, inputs, device="cpu", device_id=0):
    """A no-argument callable that runs ``sess`` once through IO binding and returns the binding
    (``binding.copy_outputs_to_cpu()`` gives the outputs).

    Why: on a GPU, ``session.run`` copies every input to the device and every output back on each
    call, so a timed loop over it measures PCIe traffic as well as the model (and a pruned model's
    logits are as big as the dense one's). Here the inputs are copied to ``device`` once, before
    the loop; outputs are bound to ``device`` and stay there. ``device="cpu"`` runs the very same
    code path, which is how the CPU tests exercise it. bfloat16 inputs, which numpy cannot hand
    to onnxruntime, are allocated with their ONNX type and filled in place.
    """
    binding = sess.io_binding()
    for i in sess.get_inputs():
        x = np.ascontiguousarray(inputs[i.name])
        if BFLOAT16 is not None and x.dtype == BFLOAT16:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), onnx.TensorProto.BFLOAT16,
                                                              device, device_id)
            value.update_inplace(x.view(np.uint16))
        else:
            value = ort.OrtValue.ortvalue_from_numpy(x, device, device_id)
        binding.bind_ortvalue_input(i.name, value)
    for o in sess.get_outputs():
        binding.bind_output(o.name, device, device_id)
    binding.synchronize_inputs()  # the copies are finished before anything is timed

    def run():
        sess.run_with_iobinding(binding)
        # the timer stops when the device is done, whatever the provider's own end-of-run sync does
        binding.synchronize_outputs()
        return binding

    return run


def _runner(sess, used, inputs, io_binding):
    """A no-argument callable that runs the model once: through IO binding on the device of the
    provider actually ``used`` (``bound_runner``) when ``io_binding``, else ``session.run``."""
    if io_binding:
        return bound_runner(sess, inputs, _DEVICE.get(used, "cuda"))
    feed = for_ort({i.name: inputs[i.name] for i in sess.get_inputs()})
    return lambda: sess.run(None, feed)


def _skip_reason(model, batch):
    """Why ``model`` cannot run at ``batch`` (a static first dim that differs), else None."""
    for name, _, dims in input_specs(load_proto(model)):
        if dims and dims[0] is not None and dims[0] != batch:
            return f"input {name!r} has a static batch dimension {dims[0]}"
    return None


def benchmark(models, provider="cpu", batches=(1,), threads=None, warmup=10, iters=50,
              input_shapes=None, allow_fallback=False, progress=None, io_binding=None) -> dict:
    """Median/p90/p99 latency of each model at each batch size, measured interleaved.

    ``models``: paths or ModelProtos. ``provider``: "cpu", "cuda" or "tensorrt".
    ``batches`` replaces the first dimension of inputs whose first dimension is dynamic; a
    model whose first dimension is static and different is skipped at that batch (listed in
    ``result["skipped"]``). ``input_shapes`` (name → shape) fixes other dynamic dimensions; a
    name must be an input of at least one model. ``threads`` sets intra_op_num_threads.
    ``progress``, if given, is called with one line of text per model and batch.
    ``io_binding`` (``bound_runner``): None means on where the provider actually used is a GPU
    one (cuda, tensorrt) and off on CPU; True or False forces it (True on CPU is the same code
    path as on a GPU, with tensors in host memory). Inputs are made in each input's own dtype
    (float16 for an fp16 model). Every result row records ``provider`` (the one actually used),
    ``device`` (the GPU's name from nvidia-smi, or the CPU's) and ``io_binding``.
    """
    if not models:
        raise BenchError("no models to benchmark")
    if iters < 1 or warmup < 0:
        raise BenchError("--iters must be at least 1 and --warmup at least 0")
    ort.set_default_logger_severity(3)
    labels = [os.fspath(m) if not isinstance(m, onnx.ModelProto) else
              (m.graph.name or f"model{k}") for k, m in enumerate(models)]
    try:
        resolved = [resolve(m, input_shapes) for m in models]  # paths, or zoo models' names
    except CheckError as e:
        raise BenchError(str(e)) from None
    models = [m for m, _ in resolved]
    input_shapes = dict(input_shapes or resolved[0][1] or {})
    protos = [load_proto(m) for m in models]
    names = [{n for n, _, _ in input_specs(p)} for p in protos]
    unknown = sorted(set(input_shapes) - set().union(*names))
    if unknown:
        raise BenchError(f"--input-shapes names {', '.join(unknown)}, not an input of any model")

    sessions = [_make_session(m, provider, threads, allow_fallback) for m in models]
    gpu = gpu_name() if any(used != "cpu" for _, used in sessions) else None
    cpu = cpu_name()
    binding_flags = {}
    results, skipped = [], []
    for batch in batches:
        runners, active = [], []
        for k, (model, (sess, used)) in enumerate(zip(protos, sessions)):
            reason = _skip_reason(model, batch)
            if reason:
                skipped.append({"model": labels[k], "batch": batch, "reason": reason})
                if progress:
                    progress(f"{labels[k]} batch {batch}: skipped ({reason})")
                continue
            shapes = {n: s for n, s in input_shapes.items() if n in names[k]}

            bound = (used != "cpu") if io_binding is None else bool(io_binding)
            binding_flags[k] = bound

            def first(feed):  # run once: fail early, outside the timed loop
                run = _runner(sess, used, feed, bound)
                run()
                return run

            try:  # the first sizes the model runs at, as spa prune finds them (a KV cache's mask of past + seq)
                _, _, run = fitting_inputs(model, first, shapes, seed=0, batch=batch)
            except Exception as e:  # noqa: BLE001 - ORT raises its own types
                raise BenchError(f"{labels[k]} batch {batch}: {one_line(e)}") from e
            runners.append(run)
            active.append(k)
        if not active:
            continue
        times = [[] for _ in active]
        for j in _schedule(len(active), warmup):
            runners[j]()
        for j in _schedule(len(active), iters):
            start = time.perf_counter()
            runners[j]()
            times[j].append(time.perf_counter() - start)
        base = None
        for j, k in enumerate(active):
            ms = np.asarray(times[j]) * 1e3
            median = float(np.median(ms))
            if k == 0:
                base = median
            row = {"model": labels[k], "provider": sessions[k][1],
                   "device": cpu if sessions[k][1] == "cpu" else (gpu or "unknown GPU"),
                   "io_binding": binding_flags[k], "batch": batch,
                   "median_ms": median, "p90_ms": float(np.percentile(ms, 90)),
                   "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
                   "throughput": batch / (median / 1e3) if median > 0 else None,
                   "speedup": (base / median if base is not None and median > 0 else None)}
            results.append(row)
            if progress:
                progress(f"{labels[k]} batch {batch} [{row['provider']}]: "
                         f"median {median:.3f} ms, p90 {row['p90_ms']:.3f} ms")
    machine = {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__, "gpu": gpu}
    return {"machine": machine, "results": results, "skipped": skipped}


def format_bench(result) -> str:
    """A readable terminal table of a ``benchmark`` result."""
    m = result["machine"]
    lines = [f"cpu: {m['cpu']} ({m['cores']} cores), onnxruntime {m['onnxruntime']}"
             + (f", gpu: {m['gpu']}" if m.get("gpu") else "")]
    header = ["model", "provider", "batch", "median ms", "p90 ms", "p99 ms", "mean ms",
              "samples/s", "speedup"]
    rows = [[r["model"], r["provider"] + (" (io binding)" if r.get("io_binding") else ""), str(r["batch"]), f"{r['median_ms']:.3f}",
             f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['mean_ms']:.3f}",
             "-" if r["throughput"] is None else f"{r['throughput']:.1f}",
             "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"]
            for r in result["results"]]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for n, row in enumerate([header] + rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for s in result.get("skipped", []):
        lines.append(f"skipped: {s['model']} batch {s['batch']}: {s['reason']}")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'spa-prune[plot]'") from None
    return plt


def plot_available() -> None:
    """A ``BenchError`` naming ``pip install 'spa-prune[plot]'`` when matplotlib is missing."""
    _pyplot()


def plot_bench(result, path) -> None:
    """Bar chart of median latency (one group of bars per provider and batch) saved to
    ``path``. Needs matplotlib (``pip install 'spa-prune[plot]'``)."""
    plt = _pyplot()
    rows = result["results"]
    groups = list(dict.fromkeys((r["provider"], r["batch"]) for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(groups) + 2), 4))
    for i, model in enumerate(models):
        xs, ys = [], []
        for g, (prov, batch) in enumerate(groups):
            for r in rows:
                if r["model"] == model and (r["provider"], r["batch"]) == (prov, batch):
                    xs.append(g + i * width)
                    ys.append(r["median_ms"])
        ax.bar(xs, ys, width, label=os.path.basename(model))
    ax.set_xticks([g + width * (len(models) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{p}\nbatch {b}" for p, b in groups])
    ax.set_ylabel("median latency (ms)")
    ax.legend()
    fig.tight_layout()
    fmt = os.path.splitext(str(path))[1].lstrip(".") or "png"
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt), inputs=models, what="--plot")
    finally:
        plt.close(fig)
