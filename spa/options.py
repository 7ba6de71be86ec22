"""``PruneOptions``: everything ``spa.prune`` and ``spa prune`` take besides the model, and the checks
that turn a bad value into a one-line error before the model is loaded."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import SpaError
from .planning import ALLOCATIONS, METRICS
from .planning.plan import load_overrides, parse_target
from .runtime.latency import DEVICES
from .runtime.synthetic import KINDS
from .scoring import COMPENSATE, CRITERIA, Scorer
from .scoring.obspa import HESSIANS, SELECTIONS
from .surgery import vocab


def check_regex(pattern: str, what: str) -> None:
    import re
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SpaError(f"{what} {pattern!r}: not a regular expression ({exc})") from None


@dataclass
class PruneOptions:
    """Everything ``spa.prune`` and ``spa prune`` take besides the model: one object for both.

    ``ratio`` removes that fraction of every prunable group (or, with ``global_rank``, of all
    channels ranked together); ``target`` ('macs=2', 'params=1.5') instead searches the global
    threshold that reaches that reduction factor.  ``overrides`` ({group id or node regex: ratio}
    or a JSON path) fixes some groups' ratios; ``steps`` > 1 prunes iteratively, re-analysing and
    re-scoring the pruned model each step.  Calibrated criteria (act_mean, wanda, flap) need
    ``calib`` ('random', or a .npz/.npy path).  ``criterion='obspa'`` chooses channels by Optimal
    Brain Surgeon cost and compensates the kept weights, with Hessians from ``hessian`` ('auto',
    'synthetic', 'bn', 'identity'; ``calib`` data when given).  ``prune_io`` (a regular expression,
    off by default) lets the graph inputs and outputs it matches lose channels along their static
    dims: a KV-cache export's ``past_key_values|present`` then loses KV heads and head dims, so the
    cache itself shrinks; the report's ``interface`` lists every change for the generation loop.
    ``keep_tokens`` (a file of token ids) instead cuts a causal LM's vocabulary to them (``spa.surgery.vocab``).
    """
    ratio: float = 0.3
    criterion: str = "auto"        # auto: chosen once the model is analysed (scoring.choose); l2 for most models
    reduction: str = "sum"
    normalisation: str | None = None
    global_rank: bool = False
    round_to: object = "auto"      # kept counts' multiple: an int, or "auto" (the device's kernels: planning.latency)
    exclude: str | None = None
    max_ratio: float = 0.9
    target: str | None = None
    overrides: object = None
    steps: int = 1
    calib: object = None
    calib_batches: int = 8
    calib_batch_size: int | None = None
    seed: int = 0
    hessian: str = "auto"
    input_shapes: dict | None = None
    blas_threads: int = 1          # numpy BLAS threads while pruning (0: BLAS's own default)
    prune_io: str | None = None    # regex: graph inputs/outputs that may lose channels (off: None)
    grads: object = None           # gradient criteria: per-initializer gradients (.npz/.safetensors path or dict)
    map_path: object = None        # where to write the map back to the framework (spa.mapping), or None
    allocate: str = "auto"         # a target: "global" score threshold, "uniform", "stacks" (uniform, a share per
                                   # stack by its OBS residual), "sensitivity" (measured drift);
                                   # auto: stacks (with an OBS compensation) or uniform for a causal language model,
                                   # else global (planning.allocation.choose)
    keep_ends: tuple = (1, 0)      # uniform: the first/last groups of every stack of repeated blocks kept whole
    compensate: str = "auto"       # the criterion's own (obspa), "none", or "obs" (OBS update of the kept weights)
    damp: float | None = None      # OBS: ridge on each Hessian, a multiple of its mean diagonal (None: obspa's DAMP)
    obs_selection: str = "auto"    # obspa: "obs" (greedy) or "diagonal" (OBD); auto: scoring.obspa.selection
    synthetic: str = "auto"        # without --calib: what synthetic images look like (spa.runtime.synthetic.KINDS)
    fidelity_metric: str = "auto"  # what fidelity measures per output (spa.planning.agreement.METRICS)
    uniform_layers: bool = False   # the same widths in every layer (spa.planning.layerwise; a config can hold them)
    experts_from: object = None    # --target experts=F: a patterns file whose --task ranks the experts
    task: str | None = None        # the task of ``experts_from`` to keep the experts of
    device: str = "cpu"            # the execution provider the widths align to and --target latency= is timed on
    threads: int | None = None     # onnxruntime intra-op threads of the latency timings (None: its default)
    keep_tokens: object = None     # a file of token ids: keep only them in the vocabulary (a mode of its own)
    rotate: float | None = None    # rotate the residual stream, then cut this share of its width (spa.rotation)

    def checked(self):
        """The criterion's Scorer (None for ``auto``: checked again once chosen) and the parsed target;
        one-line errors for bad values."""
        scorer = CRITERIA.get(self.criterion) if self.criterion != "auto" else Scorer("auto", "")
        if scorer is None:
            raise SpaError(f"unknown criterion {self.criterion!r}; choose auto or one of {', '.join(CRITERIA)}")
        if scorer.needs_grads and self.grads is None:
            raise SpaError(f"criterion {self.criterion!r} needs gradients: pass --grads FILE.npz|.safetensors "
                           "(tools/grads_from_torch.py shows how to make one)")
        if scorer.needs_grads and self.steps != 1:
            raise SpaError(f"criterion {self.criterion!r} reads gradients of the original's weights: use it with "
                           "--steps 1 (a second step would score the pruned weights)")
        if scorer.needs_calib and self.calib is None:
            raise SpaError(f"criterion {self.criterion!r} needs calibration data: pass --calib FILE.npz, or --calib "
                           "synthetic for spa's own inputs (text a language model writes itself, rendered text, 1/f noise)")
        if self.steps < 1:
            raise SpaError(f"--steps must be >= 1, got {self.steps}")
        target = parse_target(self.target)
        if self.allocate not in ALLOCATIONS:
            raise SpaError(f"--allocate must be one of {', '.join(ALLOCATIONS)}, got {self.allocate!r}")
        sizes = ("macs", "params", "latency") + (("experts", "blocks") if self.allocate == "sensitivity" else ())
        if self.allocate in ("sensitivity", "uniform", "stacks") and (target is None or target[0] not in sizes):
            raise SpaError(f"--allocate {self.allocate} spreads a size over the groups: use it with --target macs=F or "
                           "params=F (--ratio R is already uniform; --target fidelity=C always allocates by sensitivity)")
        ends = tuple(self.keep_ends) if isinstance(self.keep_ends, (tuple, list)) else ()
        if len(ends) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ends):
            raise SpaError(f"--keep-ends must be FIRST,LAST (two counts >= 0), got {self.keep_ends!r}")
        if self.compensate not in COMPENSATE:
            raise SpaError(f"--compensate must be one of {', '.join(COMPENSATE)}, got {self.compensate!r}")
        if self.compensate == "none" and scorer.compensation is not None:
            raise SpaError(f"--criterion {self.criterion} compensates the weights it keeps by definition: "
                           "use --compensate auto (or another criterion)")
        if self.allocate == "stacks" and self.criterion != "auto" and (self.hessian == "identity" or (
                scorer.compensation is None and self.compensate != "obs")):
            raise SpaError("--allocate stacks weighs each stack by its OBS residual: use it with --compensate obs "
                           "or --criterion obspa, and Hessians other than identity")
        if self.damp is not None and not (0.0 <= self.damp < float("inf")):
            raise SpaError(f"--damp must be a finite number >= 0, got {self.damp}")
        if self.uniform_layers and (self.allocate == "sensitivity" or (target is not None and target[0] == "fidelity")):
            raise SpaError("--uniform-layers plans by --ratio or --target macs=F/params=F with --allocate global or "
                           "uniform: a measured allocation (sensitivity, fidelity=C) gives each layer its own widths")
        if (self.experts_from is not None or self.task is not None) and (
                target is None or target[0] != "experts" or self.experts_from is None or not self.task):
            raise SpaError("--experts-from FILE and --task NAME go together, with --target experts=F")
        if target is not None and target[0] == "experts" and (self.steps != 1 or self.map_path is not None):
            raise SpaError("--target experts=F removes whole experts in one step, without a --map: use it with "
                           "--steps 1 and no --map")
        if target is not None and target[0] == "blocks" and (self.steps != 1 or self.map_path is not None
                                                             or self.prune_io):
            raise SpaError("--target blocks=N removes whole residual blocks in one step, without a --map or "
                           "--prune-io: prune channels with a second spa prune of its output")
        if self.keep_tokens is not None:
            vocab.read_ids(self.keep_tokens)    # readable token ids, before the load and probe
        if self.keep_tokens is not None and (target is not None or self.steps != 1):
            raise SpaError("--keep-tokens cuts the vocabulary in a run of its own (no --target, --steps): prune "
                           "channels with a second spa prune of its output")
        if self.rotate is not None and not (isinstance(self.rotate, (int, float)) and 0.0 <= self.rotate < 1.0):
            raise SpaError(f"--rotate must be a share of the stream's width in [0, 1), got {self.rotate!r}")
        if self.rotate is not None and (self.map_path is not None or self.keep_tokens is not None or (
                target is not None and target[0] in ("blocks", "experts"))):
            raise SpaError("--rotate changes the basis of every weight that reads or writes the stream: it goes with "
                           "channel pruning (--ratio, --target params=/macs=/latency=/fidelity=), not with --map, "
                           "--keep-tokens or --target blocks=/experts=")
        if target is not None and target[0] == "fidelity" and self.steps != 1:
            raise SpaError("--target fidelity=C measures one pruned model: use it with --steps 1")
        if target is None and not 0.0 <= self.ratio < 1.0:
            raise SpaError(f"--ratio must be in [0, 1), got {self.ratio}")
        if not 0.0 < self.max_ratio <= 1.0:
            raise SpaError(f"--max-ratio must be in (0, 1], got {self.max_ratio}")
        if self.round_to != "auto" and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                        or self.round_to < 1):
            raise SpaError(f"--round-to must be auto or a whole number >= 1, got {self.round_to!r}")
        if self.device not in DEVICES:
            raise SpaError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 0):
            raise SpaError(f"--threads must be a whole number >= 0, got {self.threads!r}")
        if target is not None and target[0] == "latency" and self.steps != 1:
            raise SpaError("--target latency=F times one pruned model: use it with --steps 1")
        if self.seed < 0:
            raise SpaError(f"--seed must be >= 0, got {self.seed}")
        if self.blas_threads < 0:
            raise SpaError(f"--blas-threads must be >= 0 (0: the BLAS default), got {self.blas_threads}")
        if self.calib_batches < 1 or (self.calib_batch_size is not None and self.calib_batch_size < 1):
            raise SpaError("--calib-batches and --calib-batch-size must be >= 1")
        if self.overrides is not None and not isinstance(self.overrides, dict):
            load_overrides(self.overrides)  # a file: readable, small, JSON (its keys need the analysis)
        if self.prune_io is not None:
            check_regex(self.prune_io, "--prune-io")
        if self.synthetic not in KINDS:
            raise SpaError(f"--synthetic must be one of {', '.join(KINDS)}, got {self.synthetic!r}")
        if self.fidelity_metric not in METRICS:
            raise SpaError(f"--fidelity-metric must be one of {', '.join(METRICS)}, got {self.fidelity_metric!r}")
        if self.hessian not in HESSIANS:
            raise SpaError(f"unknown Hessian source {self.hessian!r}; choose one of {', '.join(HESSIANS)}")
        if self.obs_selection not in SELECTIONS or (self.obs_selection != "auto"
                                                     and self.criterion not in ("obspa", "auto")):
            raise SpaError(f"--obs-selection ({', '.join(SELECTIONS)}) is how --criterion obspa chooses channels, "
                           f"got {self.obs_selection!r} with --criterion {self.criterion}")
        return (None if self.criterion == "auto" else scorer), target
