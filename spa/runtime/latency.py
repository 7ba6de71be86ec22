"""How long single operators take in onnxruntime, at the widths a prune may give them: measured once per
machine and cached on disk, so a second prune of a similar model measures nothing.

An :class:`OpSpec` is one operator at concrete shapes (its weights random: the time of a dense kernel
does not depend on the values).  :class:`LatencyTable` times a batch of specs in small sessions of one
node each, interleaved (every spec runs once per round, the median of the rounds is kept: a burst of
other load lands on every width alike), and keeps the medians in a JSON file per machine and execution
provider under ``$SPA_LATENCY_CACHE`` (default ``~/.cache/spa/latency``).  The machine's key names the
CPU model or GPU, the onnxruntime version, the provider and the intra-op threads: a table measured
elsewhere is never reused.

Why single operators: a prune changes the widths of a few hundred kernels; timing whole models at
every candidate allocation would take hours, timing each kernel at a handful of widths takes seconds
and composes (``spa.planning.latency`` adds them up, and ``spa.api`` checks the sum by timing the
written model).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import platform
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..errors import SpaError
from ..io import ONNX_TO_NUMPY, write_atomic

#: --device: the execution providers a latency table can be measured on
DEVICES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ROUNDS = 7        # interleaved rounds per batch of specs (the median is kept), after one warm-up round


@dataclass(frozen=True)
class OpSpec:
    """One operator at concrete shapes: ``inputs`` are (shape, ONNX dtype, constant?) in input order;
    constant inputs become random initializers, the others graph inputs fed random values."""
    op_type: str
    attrs: tuple          # ((name, value), ...) sorted; values are ints, floats, strings or tuples of ints
    inputs: tuple         # ((shape tuple, dtype int, const bool), ...)
    opset: int = 17
    domain: str = ""

    def key(self) -> str:
        return json.dumps([self.domain, self.op_type, self.opset, [list(a) for a in self.attrs],
                           [[list(s), d, c] for s, d, c in self.inputs]], separators=(",", ":"), default=list)

    def model(self) -> onnx.ModelProto:
        rng = np.random.default_rng(0)
        inits, graph_inputs, names = [], [], []
        for i, (shape, dtype, const) in enumerate(self.inputs):
            name = f"i{i}"
            names.append(name)
            if const:
                value = (rng.standard_normal(shape) * 0.1).astype(ONNX_TO_NUMPY[dtype])
                inits.append(numpy_helper.from_array(value, name))
            else:
                graph_inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in self.attrs}
        node = helper.make_node(self.op_type, names, ["y"], domain=self.domain, **attrs)
        out = helper.make_tensor_value_info("y", self.inputs[0][1], None)
        graph = helper.make_graph([node], "op", graph_inputs, [out], inits)
        opsets = [helper.make_opsetid("", self.opset)] + ([helper.make_opsetid(self.domain, 1)] if self.domain else [])
        # the oldest IR version these opsets allow, not the onnx package's newest (onnx 1.23 writes IR 14,
        # which onnxruntime builds older than the package refuse to load)
        return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))

    def feed(self) -> dict:
        rng = np.random.default_rng(1)
        return {f"i{i}": rng.standard_normal(shape).astype(ONNX_TO_NUMPY[dtype])
                for i, (shape, dtype, const) in enumerate(self.inputs) if not const}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name():
    """The name of the GPU sessions run on (device 0 of CUDA_VISIBLE_DEVICES, which nvidia-smi
    itself ignores), or None without nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    select = ["-i", visible] if visible else []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", *select],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device: str, threads) -> dict:
    """What a latency measured here depends on besides the operator: the key of the cache file."""
    return {"device": device, "hardware": gpu_name() if device == "cuda" else cpu_name(),
            "cores": os.cpu_count(), "onnxruntime": ort.__version__, "threads": int(threads or 0)}


def cache_dir() -> pathlib.Path:
    """``$SPA_LATENCY_CACHE`` or ``~/.cache/spa/latency`` (created on the first save)."""
    env = os.environ.get("SPA_LATENCY_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "spa" / "latency"


class LatencyTable:
    """Median milliseconds of :class:`OpSpec` s on one device, measured on demand and cached.

    ``measured`` and ``reused`` count the distinct specs timed by this table and those answered from
    the cache file (the report says both: a second prune of the same architecture measures nothing)."""

    def __init__(self, device: str = "cpu", threads=None, cache: bool = True, progress=None):
        if device not in DEVICES:
            raise SpaError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
        if device != "cpu" and DEVICES[device] not in ort.get_available_providers():
            raise SpaError(f"--device {device}: onnxruntime has no {DEVICES[device]} here "
                           "(onnxruntime-gpu with a CUDA GPU is needed); use --device cpu")
        self.device, self.threads = device, threads
        self.machine = machine(device, threads)
        digest = hashlib.sha1(json.dumps(self.machine, sort_keys=True).encode()).hexdigest()[:12]
        self.path = cache_dir() / f"{device}-{digest}.json" if cache else None
        self.ms: dict = {}
        if self.path is not None and self.path.is_file():
            try:
                doc = json.loads(self.path.read_text())
                if doc.get("machine") == self.machine:
                    self.ms = {k: float(v) for k, v in doc.get("ms", {}).items()}
            except (OSError, ValueError, AttributeError):
                self.ms = {}     # a damaged cache is measured again, never trusted
        self.cached = set(self.ms)
        self._dense = None            # (the original model, its session): speedup() reuses it
        self.measured, self._reused = 0, set()
        self.seconds = 0.0
        self.progress = progress or (lambda msg: None)

    def _session(self, model: onnx.ModelProto):
        options = ort.SessionOptions()
        options.log_severity_level = 4
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
        return ort.InferenceSession(model.SerializeToString(), options, providers=[DEVICES[self.device]])

    def times(self, specs) -> list:
        """Median milliseconds of each spec (one batch, timed interleaved; cached ones are not re-run).
        A spec onnxruntime cannot run gets ``None``."""
        keys = [s.key() for s in specs]
        todo = {}
        for k, s in zip(keys, specs):
            if k in self.cached:
                self._reused.add(k)
            elif k not in self.ms and k not in todo:
                todo[k] = s
        if todo:
            t0 = time.perf_counter()
            runs = {}
            for k, s in todo.items():
                try:
                    runs[k] = (self._session(s.model()), s.feed())
                except Exception:   # noqa: BLE001 - an operator ORT cannot build is left unmeasured
                    self.ms[k] = float("nan")
            samples = {k: [] for k in runs}
            for r in range(ROUNDS + 1):
                for k, (sess, feed) in runs.items():
                    t = time.perf_counter()
                    sess.run(None, feed)
                    if r:
                        samples[k].append(time.perf_counter() - t)
            for k, v in samples.items():
                self.ms[k] = float(np.median(v) * 1e3)
            self.measured += len(todo)
            self.seconds += time.perf_counter() - t0
        return [None if np.isnan(self.ms[k]) else self.ms[k] for k in keys]

    def time_model(self, model: onnx.ModelProto, feed: dict, rounds: int = ROUNDS) -> float:
        """Median milliseconds of a whole model on ``feed`` (one session, one warm-up run)."""
        sess = self._session(model)
        feed = {i.name: feed[i.name] for i in sess.get_inputs() if i.name in feed}
        sess.run(None, feed)
        samples = []
        for _ in range(rounds):
            t = time.perf_counter()
            sess.run(None, feed)
            samples.append(time.perf_counter() - t)
        return float(np.median(samples) * 1e3)

    def speedup(self, dense: onnx.ModelProto, pruned: onnx.ModelProto, feed: dict, rounds: int = 15) -> dict:
        """The pruned model's measured speed-up over the dense one: both sessions run in turn on ``feed``
        (the pruned one first every other round), one warm-up each, medians of ``rounds``."""
        if self._dense is None or self._dense[0] is not dense:   # every round of a prune times the same original
            self._dense = (dense, self._session(dense))
        sessions = [self._dense[1], self._session(pruned)]
        feeds = [{i.name: feed[i.name] for i in s.get_inputs() if i.name in feed} for s in sessions]
        for s, f in zip(sessions, feeds):
            s.run(None, f)
        samples = [[], []]
        for r in range(rounds):
            for j in ((0, 1) if r % 2 == 0 else (1, 0)):
                t = time.perf_counter()
                sessions[j].run(None, feeds[j])
                samples[j].append(time.perf_counter() - t)
        dense_ms, pruned_ms = (float(np.median(x) * 1e3) for x in samples)
        return {"original_ms": round(dense_ms, 4), "pruned_ms": round(pruned_ms, 4),
                "speedup": round(dense_ms / max(pruned_ms, 1e-9), 4), "rounds": rounds}

    def save(self) -> None:
        """Write the table (every spec measured so far here or before) to its cache file."""
        if self.path is None or not self.measured:
            return
        text = json.dumps({"machine": self.machine, "ms": self.ms}, separators=(",", ":"))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, lambda tmp: pathlib.Path(tmp).write_text(text), what="the latency cache")
        except (OSError, SpaError) as exc:
            self.progress(f"could not write the latency cache {self.path} ({exc}); it will be measured again")

    @property
    def reused(self) -> int:
        return len(self._reused)

    def summary(self) -> dict:
        return {"device": self.device, "machine": self.machine, "measured": self.measured, "reused": self.reused,
                "seconds": round(self.seconds, 2), "cache": str(self.path) if self.path else None}


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kernel_alignment(device: str = "cpu") -> tuple[int, str]:
    """``(channels, why)``: the channel multiple the device's dense kernels run whole.

    On CPU, onnxruntime's MLAS blocks convolutions in NCHWc layout and pads output channels to its
    block: 16 with AVX-512, 8 otherwise (measured on an AVX-512 EPYC: a 3x3 Conv's time steps at
    every 16 output channels, and a chain whose middle width is not a multiple of 8 falls off the
    NCHWc kernels, 20% slower; docs/latency.md).  On CUDA, fp16 tensor cores take multiples of 8."""
    if device == "cuda":
        return 8, "CUDA tensor cores (fp16: multiples of 8)"
    if "avx512f" in _cpu_flags():
        return 16, "MLAS NCHWc block on AVX-512 (16 channels)"
    return 8, "MLAS NCHWc block (8 channels)"
