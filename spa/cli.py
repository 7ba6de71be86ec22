"""The ``spa`` command line: thin click wrappers over the library (no logic lives only here).

Only click, the standard library and spa's import-free modules are loaded at start (``spa --help`` and
a usage error answer in a fraction of a second); the library (onnx, onnxruntime, numpy) is imported
by the command that runs."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .errors import SpaError
from .planning import ALLOCATIONS, METRICS
from .progress import printer
from .scoring import COMPENSATE, CRITERIA
from .verify import after
from .verify.commands import bench_command, check_command
from .verify.flags import parse_input_shapes

_STARTED = time.perf_counter()
_say = printer(_STARTED)
#: ``spa prune --quiet`` turns the progress lines off
_QUIET = {"on": False}


def _progress(msg):
    """A progress line on stderr, with the seconds since the command started and the process's peak
    memory so far (what a big model costs, stage by stage); none with --quiet."""
    if not _QUIET["on"]:
        _say(msg)


#: how the summary names each fidelity metric (spa.planning.agreement)
METRIC_WORDS = {"cosine": "the outputs' cosine to the original's", "top1": "top-1 agreement with the original",
                "ctc": "agreement of the decoded text with the original's", "mask": "IoU of the map with the original's",
                "neighbours": "nearest-neighbour agreement with the original", "tokens": "next-token agreement with the "
                "original"}


def _fidelity_line(fid) -> str:
    """The summary's fidelity line: the task metric of the worst output, on which inputs, with the
    figures beside it (the cosine, a language model's perplexity over the original's)."""
    values = fid.get("agreement", fid["cosine"])
    worst = min(values, key=values.get)
    metric = fid.get("metric", {}).get(worst, "cosine")
    extra = [] if metric == "cosine" else [f"cosine {fid['cosine'][worst]:.4f}"]
    more = fid.get("details", {}).get(worst, {})
    if "perplexity_ratio" in more:
        extra.insert(0, f"perplexity {more['perplexity_ratio']:.3f}x the original's on those {more['tokens']} tokens")
    if "kl" in more:
        extra.append(f"KL {more['kl']:.4f}")
    name = f" of '{worst}'" if len(values) > 1 else ""
    return (f"fidelity {fid['min']:.4f} ({METRIC_WORDS[metric]}{name} on {fid['inputs']}"
            + (f"; {', '.join(extra)}" if extra else "") + ")")


def _fidelity_warning(rep) -> None:
    """One line on stderr when the pruned model strays far from the original on the probe's inputs."""
    from .planning.fidelity import WARN_BELOW
    fid = rep.get("fidelity", {})
    low = fid.get("min")
    if low is None or low >= WARN_BELOW:
        return
    values = fid.get("agreement", fid["cosine"])
    worst = min(values, key=values.get)
    what = METRIC_WORDS[fid.get("metric", {}).get(worst, "cosine")]
    click.echo(f"spa: warning: the pruned model's output '{worst}': {what} is {low:.3f} on "
               f"{'calibration' if 'calibration' in fid.get('inputs', '') else 'synthetic'} inputs (below {WARN_BELOW}); "
               "it may be useless without fine-tuning: try a smaller --ratio, --target fidelity=0.99, or "
               "--criterion obspa --allocate sensitivity with --target macs=F", err=True)


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _resolve_model(model: str, input_shapes=()):
    """(path, input shapes): a path, or the name of a zoo model (``spa.zoo.resolve``)."""
    from .io import zoo
    return zoo.resolve(model, _shapes(input_shapes), progress=_progress)


def _run_inputs(model, targets, *files) -> list:
    """The files a run reads that a write must never replace: the model, its external data (looked
    up only when a target is an existing file in the model's folder), and option files."""
    from .io import external_data_files
    out = [str(Path(model).resolve())] + [str(Path(f).resolve()) for f in files if f and Path(str(f)).is_file()]
    folder = Path(model).resolve().parent
    if any(t and Path(t).exists() and Path(t).resolve().parent == folder for t in targets):
        out += external_data_files(model)
    return out


def _ends(value):
    try:
        first, last = (int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected FIRST,LAST (two counts), got {value!r}") from None
    return first, last


def _round_to(value):
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected auto or a whole number, got {value!r}") from None


def _shapes(values):
    if not values:
        return None
    try:
        return parse_input_shapes(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--input-shapes'") from None


class _Group(click.Group):
    def invoke(self, ctx):
        _QUIET["on"] = False   # each command starts with its progress lines on (prune --quiet turns them off)
        try:
            return super().invoke(ctx)
        except SpaError as exc:
            click.echo(f"spa: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="spa-prune")
def cli():
    """spa: structured pruning for ONNX models, from any exporter."""


SHAPES_HELP = "shape of a dynamic input, e.g. 'x:[1,3,224,224]' (repeatable)"


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--all", "show_all", is_flag=True, help="list blocked groups too")
@click.option("--input-shapes", multiple=True, help=SHAPES_HELP)
@click.option("--graph", "graph_file", default=None, metavar="FILE",
              help="also write the operator graph with each tensor's channel groups (.graphml or .dot)")
def inspect(model, as_json, show_all, input_shapes, graph_file):
    """List the coupled channel groups of MODEL and whether each can be pruned."""
    import numpy as np

    from .api import analyze
    from .io import check_target
    path, shapes = _resolve_model(model, input_shapes)
    if graph_file:
        if not str(graph_file).lower().endswith((".graphml", ".dot", ".gv")):
            raise SpaError(f"--graph {graph_file}: write .graphml (networkx, yEd, Gephi) or .dot/.gv (Graphviz)")
        check_target(graph_file, _run_inputs(path, [graph_file]), what="--graph")
    an = analyze(path, input_shapes=shapes, progress=_progress)
    summary = an.summary()
    summary["input_shapes"] = {k: [int(d) for d in np.shape(v)] for k, v in an.probe.inputs.items()}
    if graph_file:
        from .graph.view import write_graph  # networkx: imported only for --graph (start-up cost)
        write_graph(an.graph, graph_file, inputs=_run_inputs(path, [graph_file]))
        _progress(f"wrote the graph to {graph_file}")
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(f"input shapes: {after.shape_text(summary['input_shapes'])}")
    click.echo(f"{'id':>4} {'chan':>6} {'params':>9} {'MACs':>9}  {'status':<11} ops / reason")
    for g in summary["groups"]:
        if not g["prunable"] and not show_all:
            continue
        status = ("approx" if g["approximate"] else "prunable") if g["prunable"] else "blocked"
        what = ",".join(g["ops"]) if g["prunable"] else g["reason"]
        click.echo(f"{g['id']:>4} {g['channels']:>6} {_human(g['params']):>9} {_human(g['macs']):>9}  {status:<11} "
                   f"{what[:90]}")
    t = summary["totals"]
    click.echo(f"model: {_human(summary['params'])} params, {_human(summary['macs'])} MACs; "
               f"{t['prunable_groups']}/{t['groups']} groups prunable "
               f"({t['prunable_channels']}/{t['channels']} channels, {t['approximate_groups']} approximate)"
               + ("" if show_all else "; --all lists blocked groups"))


def _criteria():
    return ["auto"] + list(CRITERIA)


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="where to write the pruned model")
@click.option("--ratio", type=float, default=0.3, show_default=True, help="fraction of each group's channels to remove")
@click.option("--target", default=None, metavar="KIND=F",
              help="reach a reduction factor instead of a ratio: macs=2 halves MACs, params=1.5 (global threshold); "
                   "latency=2 runs twice as fast on --device, timed (docs/latency.md); "
                   "fidelity=C (0 < C <= 1) removes the most MACs that keep the outputs' cosine to the original's "
                   ">= C; experts=F keeps that fraction of every mixture-of-experts layer's experts (docs/moe.md); "
                   "blocks=N removes N whole residual blocks (docs/depth.md)")
@click.option("--criterion", type=click.Choice(_criteria()), default="auto", show_default=True,
              help="auto = l2, or for a causal language model wanda + OBS compensation with --calib and obspa "
                   "without; act_mean, wanda and flap need --calib; taylor, snip and fisher need --grads")
@click.option("--reduction", type=click.Choice(["sum", "mean", "max"]), default="sum", show_default=True,
              help="how a channel's parameter slices (or consumers) are combined")
@click.option("--normalisation", type=click.Choice(["mean", "max", "none"]), default=None,
              help="per-group score normalisation [default: mean; none for lamp]")
@click.option("--calib", default=None, metavar="FILE|synthetic|random",
              help="calibration data: .npz keyed by input name, .npy (single input); 'synthetic': spa's own inputs "
                   "(text a language model writes itself, rendered text lines, 1/f noise); 'random': random values")
@click.option("--calib-batches", type=int, default=8, show_default=True, help="with --calib random: batches drawn")
@click.option("--calib-batch-size", type=int, default=None, help="samples per batch when the batch dim is dynamic")
@click.option("--hessian", type=click.Choice(["auto", "synthetic", "bn", "identity"]), default="auto", show_default=True,
              help="--criterion obspa: where E[x x^T] of each consumer input comes from (auto: --calib data if "
                   "given, else bn with a synthetic fallback)")
@click.option("--synthetic", type=click.Choice(["auto", "noise", "text"]), default="auto", show_default=True,
              help="without --calib, what spa's synthetic images look like: text = rendered text (lines for a "
                   "line-shaped input such as a direction classifier's, pages for a detector's); auto = lines for "
                   "a recogniser that lists its characters, else 1/f noise")
@click.option("--fidelity-metric", type=click.Choice(list(METRICS)), default="auto", show_default=True,
              help="what fidelity (the guard, --target fidelity=C, --allocate sensitivity) measures per output: "
                   "auto chooses from the output's form (next-token agreement for a language model, top-1 for "
                   "class scores, decoded-text agreement for a CTC recogniser, IoU for a probability map, "
                   "nearest-neighbour agreement for embeddings, else the cosine)")
@click.option("--blas-threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="threads of numpy's BLAS while pruning (obspa's inverses); 0 leaves BLAS's own default")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of --criterion random and --calib random")
@click.option("--global", "global_rank", is_flag=True, help="rank all channels together instead of per group")
@click.option("--max-ratio", type=float, default=0.9, show_default=True,
              help="with --global/--target: most of one group that may go")
@click.option("--overrides", default=None, type=click.Path(dir_okay=False),
              help="JSON {group id or node-name regex: ratio} fixing some groups' ratios")
@click.option("--steps", type=int, default=1, show_default=True, help="prune iteratively, re-scoring after each step")
@click.option("--round-to", default="auto", show_default=True, metavar="auto|N", callback=lambda c, p, v: _round_to(v),
              help="keep channel counts multiples of N; auto: what --device's kernels run whole (16 or 8 on CPU)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="the execution provider the widths align to and --target latency= is timed on")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="onnxruntime intra-op threads of the latency timings [default: onnxruntime's]")
@click.option("--exclude", default=None, help="regex over node names: groups touching them are kept whole")
@click.option("--uniform-layers", is_flag=True,
              help="the same heads (whole KV groups) and MLP width in every layer, head dims and the residual kept: "
                   "what one transformers config holds (apply-map --hf)")
@click.option("--prune-io", default=None, metavar="REGEX",
              help="graph inputs/outputs whose names match may lose channels along their static dims (e.g. "
                   "'past_key_values|present': KV heads and head dims, a smaller cache); the report lists each change")
@click.option("--allocate", type=click.Choice(list(ALLOCATIONS)), default="auto", show_default=True,
              help="how --target spreads over the groups: auto = stacks for a causal language model with an OBS "
                   "compensation (else uniform), sensitivity "
                   "for latency=F, else global; "
                   "global, one score threshold; uniform, the one fraction "
                   "of every exact group that reaches the target; stacks, uniform with each stack of repeated blocks "
                   "(every layer's MLP, head dims) given a share by the OBS residual its channels cost (with "
                   "--compensate obs or obspa); or sensitivity, per-group amounts chosen by the output "
                   "drift each group causes, measured in onnxruntime (--target fidelity=C always does the latter)")
@click.option("--keep-ends", default="1,0", show_default=True, metavar="FIRST,LAST", callback=lambda c, p, v: _ends(v),
              help="--allocate uniform: keep the first FIRST and last LAST blocks of every stack of repeated blocks "
                   "(8 or more: a transformer's layers) whole; the first layers of a trained decoder are the ones "
                   "every later one reads")
@click.option("--compensate", type=click.Choice(list(COMPENSATE)), default="auto", show_default=True,
              help="update the weights that read removed channels: obs = the least-squares (OBS) update of the kept "
                   "weights from --calib (else synthetic) Hessians, for any criterion; auto = the criterion's own "
                   "(obspa's); none")
@click.option("--damp", type=float, default=None,
              help="OBS (obspa, --compensate obs): ridge added to each Hessian, a multiple of its mean diagonal "
                   "[default: 0.01]; larger trusts the calibration data less")
@click.option("--obs-selection", type=click.Choice(["auto", "obs", "diagonal"]), default="auto", show_default=True,
              help="--criterion obspa: how it chooses channels: obs = the greedy OBS cost (trusts the Hessian's "
                   "correlations), diagonal = each channel's uncompensated cost under the Hessian's diagonal (OBD), "
                   "then OBS compensates; auto = diagonal for a causal language model, else obs")
@click.option("--grads", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="taylor, snip and fisher: per-initializer gradients (.npz or .safetensors keyed by ONNX "
                   "initializer name; tools/grads_from_torch.py)")
@click.option("--map", "map_path", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="write the map back to the framework (kept indices of every sliced initializer) for "
                   "`spa apply-map`")
@click.option("--keep-tokens", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="cut a causal LM's vocabulary to the token ids of FILE (JSON or text list, or .npz/.npy such as a "
                   "--calib file's input_ids; list BOS/EOS/specials there): the model takes ids 0..K-1, the report's "
                   "vocabulary.ids maps them back; a run of its own")
@click.option("--rotate", default=None, type=click.FloatRange(0.0, 1.0, max_open=True), metavar="F",
              help="rotate an RMSNorm residual stream into its principal axes (on --calib, else text the model "
                   "writes), cut share F of its width, then prune channels to the rest of the target (0: rotate only)")
@click.option("--experts-from", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="with --target experts=F and --task: rank experts by a task pattern of `spa experts profile`")
@click.option("--task", default=None, help="the task of --experts-from whose experts to keep")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="write the JSON report here")
@click.option("--json", "as_json", is_flag=True, help="print the JSON report on stdout instead of the summary")
@click.option("--input-shapes", multiple=True, help=SHAPES_HELP)
@click.option("--force", is_flag=True, help="allow OUTPUT to be the input model")
@click.option("--check", "do_check", is_flag=True,
              help="after writing, compare pruned and original outputs in onnxruntime (CPU) and report the agreement")
@click.option("--atol", type=float, default=None,
              help="with --check (implied): fail (exit 1) unless |pruned - original| <= atol + rtol*|original| "
                   "[default when only --rtol is given: 1e-5]")
@click.option("--rtol", type=float, default=None,
              help="with --check (implied): relative tolerance of that test [default when only --atol is given: 1e-4]")
@click.option("--bench", "do_bench", is_flag=True,
              help="after writing, measure original vs pruned latency in onnxruntime (interleaved) and the speedup")
@click.option("--bench-provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="execution provider of --bench")
@click.option("--bench-warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="untimed runs per model for --bench")
@click.option("--bench-iters", type=click.IntRange(min=1), default=20, show_default=True,
              help="timed runs per model for --bench")
@click.option("-q", "--quiet", is_flag=True, help="print nothing but errors and warnings (no progress, no summary)")
@click.option("-v", "--verbose", is_flag=True, help="also print the table of every prunable group (kept, removed, scores)")
def prune(model, output, ratio, target, criterion, reduction, normalisation, calib, calib_batches, calib_batch_size,
          hessian, synthetic, fidelity_metric, blas_threads, seed, global_rank, max_ratio, overrides, steps, round_to,
          device, threads,
          exclude, uniform_layers, prune_io,
          allocate, keep_ends, compensate, damp, obs_selection,
          grads, map_path, keep_tokens, rotate, experts_from, task, report, as_json, input_shapes, force,
          do_check, atol, rtol, do_bench, bench_provider, bench_warmup, bench_iters, quiet, verbose):
    """Remove channels from MODEL and write the smaller model to OUTPUT.

    Exit code 0 on success (--check only reports unless --atol/--rtol is given), 1 when --atol/--rtol
    is given and an output is out of tolerance (the model is written all the same), 2 on errors.
    """
    import numpy as np

    from .api import PruneOptions, analyze, prune as do_prune
    from .io import check_target, write_text
    from .mapping.layers import describe_all
    if quiet and verbose:
        raise SpaError("--quiet and --verbose: choose one")
    _QUIET["on"] = quiet
    src, shapes = _resolve_model(model, input_shapes)
    do_check = do_check or atol is not None or rtol is not None
    if Path(src).resolve() == Path(output).resolve():
        if not force:
            raise SpaError("output would overwrite the input model; choose another -o or pass --force")
        if do_check or do_bench:
            raise SpaError("--check and --bench compare with the input model, which -o would overwrite; "
                           "write the pruned model elsewhere")
    # every file of the run that spa reads is protected from every file it writes (checked now, before
    # the work, and again at each write)
    protect = _run_inputs(src, [output, report, map_path], calib, overrides, grads, experts_from, keep_tokens)
    check_target(output, [p for p in protect if not (force and p == src)])
    for target_file in (output, report, map_path):
        if target_file and not Path(target_file).parent.exists():
            _progress(f"{target_file}: the folder {Path(target_file).parent} does not exist; spa will create it")
    if report:
        if Path(report).resolve() == Path(output).resolve():
            raise SpaError(f"--report {report}: is the output model's path; choose another file for the report")
        check_target(report, protect + [output], what="--report")
    if map_path:
        if Path(map_path).resolve() in (Path(output).resolve(), Path(report).resolve() if report else None):
            raise SpaError(f"--map {map_path}: is the output model's or the report's path; choose another file")
        check_target(map_path, protect + [output], what="--map")
    if (prune_io or keep_tokens) and (do_check or do_bench):
        raise SpaError("--check and --bench feed both models the same inputs, but with --prune-io or --keep-tokens "
                       "the pruned model's inputs may differ (the report's 'interface' lists them); check it with your "
                       "own loop")
    if do_bench:
        after.bench_provider_usable(bench_provider)  # fail before pruning, not after
    options = PruneOptions(ratio=ratio, criterion=criterion, reduction=reduction, normalisation=normalisation,
                           global_rank=global_rank, round_to=round_to, exclude=exclude, max_ratio=max_ratio,
                           target=target, overrides=overrides, steps=steps, calib=calib, calib_batches=calib_batches,
                           calib_batch_size=calib_batch_size, seed=seed, hessian=hessian, input_shapes=shapes,
                           blas_threads=blas_threads, prune_io=prune_io, grads=grads, map_path=map_path,
                           allocate=allocate, keep_ends=keep_ends, compensate=compensate, damp=damp,
                           obs_selection=obs_selection, synthetic=synthetic,
                           fidelity_metric=fidelity_metric, uniform_layers=uniform_layers,
                           device=device, threads=threads,
                           experts_from=experts_from, task=task, keep_tokens=keep_tokens, rotate=rotate)
    options.checked()  # every option before the load and probe
    an = analyze(src, input_shapes=shapes, progress=_progress, prune_io=prune_io)
    result = do_prune(src, options=options, progress=_progress, analysis=an)
    _progress(f"writing {output}")
    result.save(output, inputs=[p for p in protect if not (force and p == src)])
    rep = result.report
    rep["output"] = output
    # the pruned model is validated (and its shape constants folded) at the sizes the analysis ran with:
    # check and bench use exactly those
    used = {name: [int(d) for d in np.shape(value)] for name, value in an.probe.inputs.items()}
    if do_check:
        rep["check"] = after.run_check(src, output, used, seed, atol, rtol, progress=_progress)
    if do_bench:
        rep["bench"] = after.run_bench(src, output, used, bench_provider, bench_warmup, bench_iters, progress=_progress)
    if report:
        write_text(report, json.dumps(rep, indent=1), inputs=protect + [output], what="--report")
    failed = do_check and rep["check"]["passed"] is False
    if as_json or quiet:
        if as_json:
            click.echo(json.dumps(rep, indent=1))
        else:
            _fidelity_warning(rep)
        if failed:
            sys.exit(1)
        return
    b, a = rep["before"], rep["after"]
    pruned_groups = sum(1 for g in rep["groups"] if g.get("removed"))
    if verbose:
        click.echo(f"{'id':>4} {'kept':>6} {'removed':>7}  {'score range':<17} ops")
        for g in rep["groups"]:
            if not g["prunable"]:
                continue
            sc = g.get("scores") or [0.0]
            note = "  (" + g["fallback"] + ")" if g.get("fallback") else ""
            click.echo(f"{g['id']:>4} {g['kept']:>6} {g['removed']:>7}  {min(sc):>7.3f}..{max(sc):<8.3f} "
                       f"{','.join(g['ops'])[:60]}{note}")
    click.echo(f"criterion {rep['criterion']} (reduction {rep['reduction']}, normalisation {rep['normalisation']})"
               + (f", target {rep['target']}" + ("" if rep.get("target_reachable", True) else " (not reachable)")
                  if rep.get("target") else ""))
    click.echo(f"params {_human(b['params'])} -> {_human(a['params'])} ({b['params'] / max(a['params'], 1):.2f}x)   "
               f"MACs {_human(b['macs'])} -> {_human(a['macs'])} ({b['macs'] / max(a['macs'], 1):.2f}x)   "
               + (f"{sum(e['experts'] - len(e['kept']) for e in rep['experts']['layers'] if 'kept' in e)} experts "
                  "removed" if "experts" in rep else f"{len(rep['blocks']['removed'])} of {rep['blocks']['found']} "
                  "blocks removed" if "blocks" in rep else f"{pruned_groups} groups pruned") + f", {rep['seconds']:.1f}s")
    plan = rep.get("plan") or {}
    if plan.get("allocation") == "stacks":
        click.echo(f"allocation stacks: the uniform share {plan['uniform_fraction']:.3f} times each stack's weight, "
                   "by its OBS residual per unit saved: " + ", ".join(
                       f"{len(st['groups'])} groups of {st['channels']} channels x{st['weight']:.2f}"
                       for st in plan["stacks"]))
    if "blocks" in rep:
        gone = [e for e in rep["blocks"]["blocks"] if e["removed"]]
        click.echo(f"blocks removed ({rep['blocks']['scorer']}): " +
                   ", ".join(f"{e['block']} {e['kind']} ({e['add']})" for e in gone))
    if "vocabulary" in rep:
        v = rep["vocabulary"]
        click.echo(f"vocabulary: kept {v['kept']} of {v['original']} tokens ({'tied' if v.get('tied') else 'untied'} "
                   "head); new id i is original id vocabulary.ids[i] in the report")
    if "rotation" in rep:
        r = rep["rotation"]
        click.echo(f"rotation: stream {r['width'][0]} -> {r['width'][1]} wide, {100 * r['energy_kept']:.2f}% of its "
                   f"normalised energy kept ({r['norms']} RMSNorms, principal axes on {r['source']})")
    lat = (rep.get("plan") or {}).get("latency")
    if lat:
        t = lat["table"]
        click.echo(f"latency: {lat['measured_speedup']:.2f}x measured on {lat['device']} (predicted "
                   f"{lat['predicted_speedup']:.2f}x; {len(lat['rounds'])} rounds; {t['measured']} operator timings "
                   f"made, {t['reused']} from the cache)")
    fid = rep.get("fidelity", {})
    if "min" in fid:
        click.echo(_fidelity_line(fid))
        if fid.get("caution"):
            click.echo(f"  note: {fid['caution']}")
    elif fid.get("skipped"):
        click.echo(f"fidelity not measured: {fid['skipped']}")
    for line in describe_all(rep.get("layers", [])):
        click.echo(line)
    for e in rep.get("experts", {}).get("layers", []):
        click.echo(f"experts layer {e['layer']} ({e['router']}): " + (f"kept {len(e['kept'])} of {e['experts']} "
                   f"{e['kept']}" if "kept" in e else f"all {e['experts']} kept ({e.get('blocked', '')})")
                   + (f" ({e['note']})" if "note" in e and "kept" in e else ""))
    for c in rep.get("interface", []):
        click.echo(f"interface: {c['kind']} {c['tensor']} " + ("removed" if c.get("removed") else
                                                                 f"axis {c['axis']}: {c['before']} -> {c['after']}"))
    click.echo(f"wrote {output}")
    _fidelity_warning(rep)
    if do_check:
        click.echo(after.format_check(rep["check"]))
    if do_bench:
        click.echo(after.format_bench(rep["bench"]))
    if failed:
        sys.exit(1)


@cli.command("apply-map")
@click.argument("map_file", metavar="MAP", type=click.Path(dir_okay=False))
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(),
              help="where to write the sliced checkpoint (same format as CHECKPOINT; with --hf a folder)")
@click.option("--names", default=None, type=click.Path(dir_okay=False),
              help="JSON {ONNX initializer name: checkpoint name} where the names differ")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--hf", is_flag=True, help="CHECKPOINT is a Hugging Face model folder: write config.json with the new "
              "sizes and model.safetensors into the OUTPUT folder, for from_pretrained (docs/hf.md)")
def apply_map(map_file, checkpoint, output, names, as_json, hf):
    """Slice a framework CHECKPOINT (.safetensors, .npz, or a PyTorch state_dict .pt/.pth) with the MAP
    that `spa prune --map` wrote, so that the model rebuilt with the new widths loads it (for
    fine-tuning in the framework)."""
    from .mapping import hf as hf_mod, mapfile
    if hf and names:
        raise SpaError("--hf matches the checkpoint's names itself: drop --names")
    summary = hf_mod.apply_hf(map_file, checkpoint, output, progress=_progress) if hf else mapfile.apply_map(
        map_file, checkpoint, output, names=names, inputs=[p for p in (map_file, checkpoint, names) if p],
        progress=_progress)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    for line in summary.get("lines", []):
        click.echo(line)
    click.echo(f"wrote {output}")


@cli.command("report")
@click.argument("report_json", metavar="R.json", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the HTML page to write")
def report_command(report_json, output):
    """Write the JSON report of `spa prune --report` (or --json) as one self-contained HTML page: sizes,
    fidelity, per-layer widths before/after, the sortable group table (docs/report.md)."""
    from .verify.report import write_report
    click.echo(f"wrote {write_report(report_json, output)}")


@cli.command("sweep")
@click.argument("model")
@click.option("--targets", required=True, help="comma-separated targets, e.g. macs=1.5,2,3 (or params=F, fidelity=C)")
@click.option("--criteria", default="l2", show_default=True, help="comma-separated criteria, e.g. l2,obspa")
@click.option("--calib", default=None, metavar="FILE|synthetic|random", help="calibration data, as for spa prune")
@click.option("--allocate", type=click.Choice(list(ALLOCATIONS)), default="auto", show_default=True)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="folder for sweep.json, sweep.md (the Pareto table) and sweep.svg (the plot)")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="local processes at a time")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="run each combination as a Ray task on the cluster at ADDRESS (alone: the running one)")
@click.option("--keep-models", is_flag=True, help="also write every pruned model into OUTPUT/models")
@click.option("--bench", "do_bench", is_flag=True, help="also measure each pruned model's CPU latency and speedup")
def sweep_command(model, targets, criteria, calib, allocate, out_dir, jobs, ray_address, keep_models, do_bench):
    """Prune MODEL at every combination of --targets and --criteria, measure each one's fidelity, and
    write the table with its Pareto front and a plot (docs/sweep.md)."""
    from . import sweep as sw
    res = sw.sweep(model, targets, criteria, options={"calib": calib, "allocate": allocate}, out_dir=out_dir,
                   jobs=jobs, ray=ray_address, keep_models=keep_models, progress=_progress,
                   bench={"warmup": 3, "iters": 20, "threads": 1} if do_bench else None)
    click.echo(sw.table(res), nl=False)
    for path in sw.write(res, out_dir, inputs=[model] + ([calib] if calib else [])):
        click.echo(f"wrote {path}")


@cli.group()
def experts():
    """Task expert patterns of mixture-of-experts models (docs/moe.md)."""


@experts.command("list")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--input-shapes", multiple=True, help=SHAPES_HELP)
def experts_list(model, as_json, input_shapes):
    """List the MoE layers of MODEL: experts, top-k, and why a layer cannot lose experts."""
    from .api import analyze
    from .moe.stage import describe
    path, shapes = _resolve_model(model, input_shapes)
    layers = describe(analyze(path, input_shapes=shapes, progress=_progress))
    if as_json:
        click.echo(json.dumps(layers, indent=1))
        return
    for e in layers:
        what = f"blocked: {e['blocked']}" if e.get("blocked") else \
            e.get("note") or f"cut with it: {', '.join(e['stacked'])}"
        click.echo(f"layer {e['layer']} ({e['router']}): {e['experts']} experts"
                   + (f", top {e['top_k']}" if e["top_k"] else "") + f"; {what}")
    click.echo(f"{len(layers)} MoE layers" + ("" if layers else " (no TopK or MoE op chooses from a router)"))


@experts.command("profile")
@click.argument("model")
@click.option("--calib", required=True, help="the task's inputs: .npz keyed by input name (or synthetic, random)")
@click.option("--name", required=True, help="the task's name in the patterns")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="the patterns file (JSON); an existing one gains or replaces this task")
@click.option("--calib-batch-size", type=int, default=None, help="samples per calibration batch")
@click.option("--input-shapes", multiple=True, help=SHAPES_HELP)
def experts_profile(model, calib, name, output, calib_batch_size, input_shapes):
    """Record each MoE layer's expert scores (TCESS) for a task."""
    from .api import profile_experts
    path, shapes = _resolve_model(model, input_shapes)
    into = output if Path(output).is_file() else None
    doc = profile_experts(path, calib, name, into=into, output=output, input_shapes=shapes,
                          calib_batch_size=calib_batch_size, progress=_progress)
    click.echo(f"task {name}: {len(doc['layers'])} MoE layers, {doc['tasks'][name]['tokens']} tokens; "
               f"{len(doc['tasks'])} task(s) in {output}")


@experts.command("match")
@click.argument("patterns", type=click.Path(dir_okay=False))
@click.option("--calib", required=True, help="the query's inputs (.npz keyed by input name)")
@click.option("--model", default=None, help="the model [default: the one the patterns were made on]")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--input-shapes", multiple=True, help=SHAPES_HELP)
def experts_match(patterns, calib, model, as_json, input_shapes):
    """Say which stored task a query batch is closest to."""
    from .api import match_experts
    shapes = _shapes(input_shapes)
    got = match_experts(patterns, calib, model, input_shapes=shapes, progress=_progress)
    if as_json:
        click.echo(json.dumps(got, indent=1))
        return
    click.echo(f"closest task: {got['closest']}  (" + ", ".join(f"{t['task']} {t['similarity']:.3f}"
                                                            for t in got["tasks"]) + ")")


cli.add_command(check_command)
cli.add_command(bench_command)


def main():
    cli()


if __name__ == "__main__":
    main()
