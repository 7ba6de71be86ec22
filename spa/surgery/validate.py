"""The validate stage: a pruned model is written only if it runs right at every size.

``onnx.checker``, then onnxruntime runs at every size the analysis ran the original at (the probe
sizes and, for dynamic inputs, every symbol moved up and down: ``spa.runtime.shapes``), each with the
original's output shapes, and a batch's first row equal to that row run alone.  A decoder with a KV
cache is always run at a decode step and a second batch (``SizePlan.decode_point``), whatever sizes
the probe ran at.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .. import io
from ..io.weights import trim_heap
from ..runtime import probing
from ..errors import SpaError


def validate(pruned: onnx.ModelProto, an, input_shapes=None, *, every_size: bool = True,
             weights=None) -> probing.Probe:
    """onnx.checker, then onnxruntime runs at every size the analysis ran the original at (the
    probe sizes and, for dynamic inputs, every symbol moved up and down): the pruned model must run
    and give the original's output shapes at each, and where the inputs have a batch, a batch's
    first row must equal that row run alone.  A failure is a one-line SpaError naming the sizes.
    ``every_size=False`` checks the probe sizes only (the oracle, which compares at several).
    ``weights``: the arrays of ``pruned``'s stubs (``spa.io.weights``)."""
    if io.model_size(pruned, weights) < 2_000_000_000:
        try:
            io.check_model(pruned)
        except onnx.checker.ValidationError as exc:
            if _checker_ok(an.model):  # only complain about what pruning broke
                raise SpaError(f"internal: pruned model fails onnx.checker ({str(exc).splitlines()[0]})") from None
    changes = interface_changes(an.model, pruned)
    if input_shapes is None:  # the sizes the analysis ran with
        input_shapes = {k: list(np.shape(v)) for k, v in an.probe.inputs.items()}
    present = {i.name for i in pruned.graph.input}
    input_shapes = {k: v for k, v in _resized(input_shapes, changes).items() if k in present}
    try:
        pr = probing.probe(pruned, input_shapes, consts=io.initializer_arrays(pruned, weights), dynamic=False)
    except SpaError as exc:
        raise SpaError(f"internal: pruned model does not run in onnxruntime: {exc}") from None
    want = _resized({o.name: an.probe.shapes.get(o.name) for o in an.model.graph.output}, changes)
    for out in pruned.graph.output:
        if pr.shapes.get(out.name) != want.get(out.name):
            raise SpaError(f"internal: output '{out.name}' changed shape "
                           f"{an.probe.shapes.get(out.name)} -> {pr.shapes.get(out.name)}")
    if every_size:
        try:
            _validate_other_sizes(pruned, an, pr, changes)
        finally:
            probing.release_twins()
    trim_heap()   # the sessions' buffers, freed, stay in malloc's heaps otherwise (SmolLM2: 0.38 GB)
    return pr


def interface_changes(original, pruned) -> list:
    """Every static dim of a graph input or output that differs between the two models (what
    ``prune_io`` let shrink): ``{"tensor", "kind": "input"|"output", "axis", "before", "after"}``,
    and every input or output the pruned model no longer has (a removed block's KV cache pair):
    ``{"tensor", "kind", "removed": True}``."""
    out = []
    for kind in ("input", "output"):
        new = {vi.name: vi for vi in getattr(pruned.graph, kind)}
        for vi in getattr(original.graph, kind):
            if vi.name not in new:
                out.append({"tensor": vi.name, "kind": kind, "removed": True})
                continue
            for d, (a, b) in enumerate(zip(vi.type.tensor_type.shape.dim, new[vi.name].type.tensor_type.shape.dim)):
                if a.HasField("dim_value") and b.HasField("dim_value") and a.dim_value != b.dim_value:
                    out.append({"tensor": vi.name, "kind": kind, "axis": d, "before": int(a.dim_value),
                                "after": int(b.dim_value)})
    return out


def _resized(shapes: dict, changes: list) -> dict:
    """``shapes`` ({name: shape}) with the interface changes applied."""
    out = {k: None if v is None else tuple(v) for k, v in shapes.items()}
    for c in changes:
        v = out.get(c["tensor"])
        if v is not None and "axis" in c and c["axis"] < len(v):
            out[c["tensor"]] = v[:c["axis"]] + (c["after"],) + v[c["axis"] + 1:]
    return out


def _validate_other_sizes(pruned, an, pr: probing.Probe, changes=()) -> None:
    plan, points, ref = an.probe.plan, list(an.probe.points[1:]), list(an.probe.other_shapes)
    if plan is None:
        return
    decode = plan.decode_point(an.probe.points)
    if decode is not None:  # a KV decoder is checked at a decode step and a second batch, whatever the probe ran
        points.append(decode)
        ref.append(_original_shapes(an, plan, decode))
    if not points:
        return
    if changes:  # the pruned inputs' static dims
        dims = dict(plan.dims)
        for c in changes:
            if c["kind"] == "input" and "axis" in c and isinstance(dims.get((c["tensor"], c["axis"])), int):
                dims[(c["tensor"], c["axis"])] = c["after"]
        plan = dataclasses.replace(plan, dims=dims)
    runner = probing.output_runner(pruned, pr.consts)
    outputs = [o.name for o in pruned.graph.output]
    rows_checked = False
    for point, ref_shapes in zip(points, ref):
        ref_shapes = _resized(ref_shapes, changes)
        where = plan.describe(point)
        feed = probing.input_feed(pruned, plan=plan, values=point, seed=1)
        try:
            got = runner.run(feed)
        except Exception as exc:
            raise SpaError(f"pruned model fails at {where} ({probing.ort_reason(exc)}); spa would not write it: "
                           "please report this model") from None
        for name in outputs:
            if name in ref_shapes and tuple(np.shape(got[name])) != ref_shapes[name]:
                raise SpaError(f"pruned model: output '{name}' is {list(np.shape(got[name]))} at {where}, "
                               f"the original's is {list(ref_shapes[name])}; spa would not write it")
        if not rows_checked:
            rows_checked = _check_batch_rows(runner, plan, point, feed, got, where,
                                             original=None if changes else (lambda: _original_runner(an)))


def _original_shapes(an, plan, point) -> dict:
    """{output: shape} of the original at ``point``; a one-line SpaError where it does not run there."""
    feed = probing.input_feed(an.model, plan=plan, values=point, seed=1)
    try:
        got = _original_runner(an).run(feed)
    except Exception as exc:
        raise SpaError(f"spa cannot check the pruned decoder at a decode step and a second batch ({plan.describe(point)}): "
                       f"the original does not run there ({probing.ort_reason(exc)}); spa would not write a decoder "
                       "it cannot check: please report this model") from None
    return {k: tuple(np.shape(v)) for k, v in got.items()}


def _check_batch_rows(runner, plan, point, feed, got, where, original=None) -> bool:
    """Row 0 of a batch run equals row 0 run alone (a size frozen at the probe's batch shows here),
    unless ``original()``'s rows depend on the batch as well (a dynamically quantized model takes its
    scale from the whole batch).  False when the inputs and outputs have no common batch dim to check."""
    batch = [s for s in plan.symbols if s in plan.batch and point[s] > 1]
    if not batch or any(plan.dims[(name, 0)] != ("sym", batch[0]) for name in feed):
        return False
    n = point[batch[0]]
    if any(np.ndim(v) == 0 or np.shape(v)[0] != n for v in got.values()):
        return False
    bad = _row_mismatch(runner, feed, got)
    if bad is None:
        return True
    if original is not None and _row_mismatch(original(), feed, None) is not None:
        return True  # the original's rows depend on the batch too (dynamic quantization's range): not pruning's doing
    name, a, b = bad
    if a.shape != b.shape:
        raise SpaError(f"pruned model: output '{name}' row 0 has shape {list(b.shape)} alone and "
                       f"{list(a.shape)} in a batch at {where}; spa would not write it")
    raise SpaError(f"pruned model: output '{name}' row 0 differs between a batch of {n} and a batch of 1 "
                   f"({where}); a size is frozen somewhere; spa would not write it: please report this model")


def _row_mismatch(runner, feed, got):
    """(output, batch row 0, row 0 alone) of the first output whose row 0 changes when run alone, or None."""
    got = runner.run(feed) if got is None else got
    alone = runner.run({k: v[:1] for k, v in feed.items()})
    for name, v in got.items():
        a, b = np.asarray(v[:1], np.float64), np.asarray(alone[name], np.float64)
        if a.shape != b.shape:
            return name, a, b
        scale = max(np.abs(b).max(initial=0.0), 1e-3)
        if np.abs(a - b).max(initial=0.0) > 1e-3 * scale:
            return name, a, b
    return None


def _original_runner(an):
    """A runner of the analysed original (the batch-row check asks it only when the pruned model fails)."""
    return probing.output_runner(an.model, an.probe.consts)


def _checker_ok(proto) -> bool:
    try:
        io.check_model(proto)
        return True
    except onnx.checker.ValidationError:
        return False
