"""Validation in the manner of ``polygraphy run``: run two models on the same inputs and compare.

Python API::

    make_inputs(model_or_path, input_shapes=None, seed=0, batch=None) -> {name: ndarray}
    compare(reference, candidate, inputs=None, input_shapes=None, seed=0,
            atol=1e-5, rtol=1e-4, providers=None) -> dict
    format_check(result) -> str
    parse_input_shapes(values) -> {name: [int, ...]}
    session(model, providers=None, threads=None) -> onnxruntime.InferenceSession
    cuda_available() -> bool

CLI: ``spa check ORIGINAL OTHER ...`` (``spa.verify.commands``).
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from spa.errors import SpaError
from spa.io import graph_inputs, zoo
from spa.runtime.feeds import for_ort, unfeedable
from spa.runtime.probing import first_run, input_feed
from spa.runtime.shapes import fitting_plans, size_plan
from spa.verify.flags import CHECK_PROVIDERS, parse_input_shapes  # noqa: F401 - spa.verify.check names them too


# Models whose serialised protobuf reaches this size cannot be passed to ORT as bytes.
_PROTO_LIMIT = 2**31 - 1


class CheckError(SpaError):
    """A model could not be loaded, prepared or run for the comparison."""


# ----------------------------------------------------------------------------- loading


def load_proto(model_or_path) -> onnx.ModelProto:
    """The ModelProto (weights not loaded when read from a path: only the signature is needed)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = os.fspath(model_or_path)
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types
        raise CheckError(f"cannot read ONNX model {path}: {one_line(e)}") from e


def session(model, providers=None, threads=None) -> ort.InferenceSession:
    """An ORT InferenceSession for a path or ModelProto, ORT's C++ log at severity 4 (fatal only: a
    run that fails comes back as an exception, not as a raw log line on the terminal too).

    A ModelProto of 2 GB or more is saved with external data to a temporary directory first.
    ``providers`` is a list of ORT provider names (default: CPU only); ``threads`` sets
    ``intra_op_num_threads``.
    """
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = int(threads)
    providers = list(providers or ["CPUExecutionProvider"])
    try:
        if not isinstance(model, onnx.ModelProto):
            return ort.InferenceSession(os.fspath(model), options, providers=providers)
        if _proto_size(model) < _PROTO_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="spa-check-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # save_model with external data rewrites the proto in place
            onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data")
            return ort.InferenceSession(path, options, providers=providers)
    except CheckError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT raises its own pybind exception types
        raise CheckError(f"onnxruntime cannot load {_label(model)}: {one_line(e)}") from e


def _proto_size(model: onnx.ModelProto) -> int:
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001 - very large protos may refuse to report a size
        return _PROTO_LIMIT


def _label(model) -> str:
    return "the model" if isinstance(model, onnx.ModelProto) else os.fspath(model)


def one_line(e) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- inputs


def input_specs(model: onnx.ModelProto):
    """Declared graph inputs that are not initializers: [(name, elem_type, [dim or None])]."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tensor = vi.type.tensor_type
        dims = None
        if tensor.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
        specs.append((vi.name, tensor.elem_type, dims))
    return specs


def _graph_outputs(model: onnx.ModelProto):
    specs = []
    for vi in model.graph.output:
        tensor = vi.type.tensor_type
        rank = len(tensor.shape.dim) if tensor.HasField("shape") else None
        specs.append((vi.name, tensor.elem_type, rank))
    return specs


def make_inputs(model_or_path, input_shapes=None, seed=0, batch=None, values=None) -> dict:
    """Random inputs for the declared graph inputs (initializers listed as inputs are skipped), made
    as ``spa inspect``/``spa prune`` make them (``spa.runtime.probing.input_feed``, one feed maker).

    Shape of each input: ``input_shapes[name]`` if given (it must name a graph input), else the
    declared shape with its dynamic dims from the size plan (``spa.runtime.shapes.size_plan``: the
    batch 1, token dims 16, other dims 224; a named dim given for one input sizes the others;
    ``values`` gives symbol sizes instead). ``batch``, if given, then replaces every symbol used as
    a first dimension. Floats are standard normal, bools fair coin flips, integers uniform over
    what the model can read (``spa.runtime.shapes.integer_ranges``: an embedding's rows, ones for an
    attention mask; [0, 4) otherwise).
    """
    model = load_proto(model_or_path)
    plan = input_plan(model, input_shapes)
    if batch is not None:
        plan.fix_batch(batch)
    return _feed(model, plan, seed, values=values)


def _feed(model, plan, seed, values=None, given=None) -> dict:
    try:
        return input_feed(model, plan=plan, values=plan.base if values is None else {**plan.base, **values},
                          seed=seed, given=given)
    except SpaError as e:
        raise CheckError(str(e)) from None


def input_plan(model, input_shapes, given=()):
    """The size plan of ``model``'s inputs with ``input_shapes`` (a name that is not an input, an
    input without a declared shape and none given, or one spa cannot make values for that ``given``
    does not name, is a ``CheckError``)."""
    specs = input_specs(model)
    input_shapes = dict(input_shapes or {})
    unknown = sorted(set(input_shapes) - {name for name, _, _ in specs})
    if unknown:
        known = ", ".join(name for name, _, _ in specs)
        raise CheckError(f"--input-shapes names {', '.join(unknown)}, not a model input "
                         f"(inputs: {known})")
    for name, _, dims in specs:
        if dims is None and name not in input_shapes:
            raise CheckError(f"input {name!r} has no declared shape: pass --input-shapes")
    for vi in graph_inputs(model):
        why = unfeedable(vi)
        if why and vi.name not in given:
            raise CheckError(f"input {vi.name!r} is {why}: spa cannot make up its values; "
                             "pass --inputs FILE.npz with them")
    try:
        return size_plan(graph_inputs(model), input_shapes)
    except SpaError as e:
        raise CheckError(str(e)) from None


# ----------------------------------------------------------------------------- compare


def _type_name(elem_type) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return str(elem_type)


def _signature(ref: onnx.ModelProto, cand: onnx.ModelProto) -> dict:
    """Signature differences: input/output names, and the ranks and dtypes of shared names."""
    problems = []
    for kind, ref_specs, cand_specs in (
        ("input", [(n, t, None if d is None else len(d)) for n, t, d in input_specs(ref)],
         [(n, t, None if d is None else len(d)) for n, t, d in input_specs(cand)]),
        ("output", _graph_outputs(ref), _graph_outputs(cand)),
    ):
        ref_map = {n: (t, r) for n, t, r in ref_specs}
        cand_map = {n: (t, r) for n, t, r in cand_specs}
        for name in ref_map:
            if name not in cand_map:
                problems.append(f"{kind} {name!r} missing from the candidate")
        for name in cand_map:
            if name not in ref_map:
                problems.append(f"{kind} {name!r} only in the candidate")
        for name, (rtype, rrank) in ref_map.items():
            if name not in cand_map:
                continue
            ctype, crank = cand_map[name]
            if rtype != ctype:
                problems.append(f"{kind} {name!r} dtype {_type_name(rtype)} vs {_type_name(ctype)}")
            if rrank is not None and crank is not None and rrank != crank:
                problems.append(f"{kind} {name!r} rank {rrank} vs {crank}")
    return {"ok": not problems, "problems": problems}


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _metrics(name, ref, cand, atol, rtol) -> dict:
    entry = {"name": name, "shape": list(ref.shape), "max_abs": None, "mean_abs": None,
             "max_rel": None, "mean_rel": None, "cosine": None, "top1": None, "passed": False}
    if ref.shape != cand.shape:
        entry["error"] = f"shape {list(ref.shape)} vs {list(cand.shape)}"
        return entry
    b = ref.astype(np.float64).ravel()
    a = cand.astype(np.float64).ravel()
    if a.size:
        diff = np.abs(a - b)
        rel = diff / np.maximum(np.abs(b), 1e-12)
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        cosine = 1.0 if na == 0 and nb == 0 else (0.0 if na == 0 or nb == 0
                                                  else float(a @ b) / (na * nb))
        entry.update(max_abs=_num(diff.max()), mean_abs=_num(diff.mean()),
                     max_rel=_num(rel.max()), mean_rel=_num(rel.mean()), cosine=_num(cosine))
    else:
        entry.update(max_abs=0.0, mean_abs=0.0, max_rel=0.0, mean_rel=0.0, cosine=1.0)
    if ref.ndim == 2 and ref.shape[1] > 1 and ref.shape[0] > 0:
        entry["top1"] = float(np.mean(np.argmax(ref, axis=1) == np.argmax(cand, axis=1)))
    entry["passed"] = bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
    return entry


def _run(sess, inputs):
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise CheckError(f"no data for input(s) {', '.join(missing)}")
    outputs = [o.name for o in sess.get_outputs()]
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failure comes back as the exception below, not as a log line too
    try:
        values = sess.run(outputs, for_ort({n: inputs[n] for n in names}), quiet)
    except Exception as e:  # noqa: BLE001
        raise CheckError(f"onnxruntime failed to run the model: {one_line(e)}") from e
    return dict(zip(outputs, values))


def compare(reference, candidate, inputs=None, input_shapes=None, seed=0, atol=1e-5, rtol=1e-4,
            providers=None, every_size=False) -> dict:
    """Run ``reference`` and ``candidate`` (paths, zoo models' names or ModelProtos) on the same inputs
    and compare.

    ``inputs`` (name → array) are used as given; inputs they do not cover are generated as ``spa
    prune`` makes them, at the first sizes the reference runs at (``spa.runtime.probing.first_run``:
    the size plan, a KV cache's mask of past + sequence, smaller sizes), then for the candidate's
    extra inputs. A zoo model's name brings its default input shape (when ``input_shapes`` is not
    given). An output passes when ``|cand - ref| <= atol + rtol * |ref|`` element-wise; the check
    passes when the signatures match and every output passes.  With ``every_size`` and dynamic
    inputs, both models also run at other sizes (every dynamic dim moved up, then a short point:
    batch 2, one token; ``spa.runtime.shapes.SizePlan.bumped``), listed in ``result["sizes"]``; the check
    passes only if every size does (a size the reference refuses is skipped).
    """
    reference, input_shapes = resolve(reference, input_shapes)
    candidate, _ = resolve(candidate)
    ref_proto, cand_proto = load_proto(reference), load_proto(candidate)
    signature = _signature(ref_proto, cand_proto)
    given = dict(inputs or {})
    shapes = dict(input_shapes or {})
    ref_names = {n for n, _, _ in input_specs(ref_proto)}
    cand_names = {n for n, _, _ in input_specs(cand_proto)}
    unknown = sorted(set(shapes) - ref_names - cand_names)
    if unknown:
        raise CheckError(f"--input-shapes names {', '.join(unknown)}, not a model input")
    ref_sess, cand_sess = session(reference, providers), session(candidate, providers)
    ref_given = {k: v for k, v in given.items() if k in ref_names}
    _, feeds, ref_out = fitting_inputs(ref_proto, lambda feed: _run(ref_sess, feed),
                                       {k: v for k, v in shapes.items() if k in ref_names}, seed, given=ref_given)
    if cand_names - set(feeds):   # the candidate's own inputs, sized as the shared ones
        shared = {k: v for k, v in feeds.items() if k in cand_names}
        sized = {**{k: list(np.shape(v)) for k, v in shared.items()}, **{k: v for k, v in shapes.items()
                                                                         if k in cand_names}}
        cand_given = {**shared, **{k: v for k, v in given.items() if k in cand_names}}
        try:
            extra = _feed(cand_proto, input_plan(cand_proto, sized, cand_given), seed, given=cand_given)
        except CheckError:   # the shared inputs disagree with the candidate's dims (a signature problem)
            extra = make_inputs(cand_proto, {k: v for k, v in shapes.items() if k in cand_names}, seed)
        for name, value in extra.items():
            feeds.setdefault(name, value)
    cand_out = _run(cand_sess, feeds)
    outputs = [_metrics(name, value, np.asarray(cand_out[name]), atol, rtol)
               for name, value in ref_out.items() if name in cand_out]
    passed = signature["ok"] and bool(outputs) and all(o["passed"] for o in outputs)
    result = {"passed": passed, "atol": atol, "rtol": rtol, "signature": signature, "outputs": outputs,
              "input_shapes": {k: list(np.shape(v)) for k, v in feeds.items()}}
    if every_size and not given:
        result["sizes"] = _other_sizes(ref_proto, ref_sess, cand_sess, feeds, seed, atol, rtol)
        result["passed"] = passed and all(s["passed"] is not False for s in result["sizes"])
    return result


def fitting_inputs(model, run, input_shapes=None, seed=0, batch=None, given=None):
    """``(plan, inputs, run(inputs))`` at the first sizes ``model`` (a ModelProto) runs at, as ``spa
    prune`` finds them (``spa.runtime.probing.first_run``); ``given`` inputs are used as they are and
    size the others; every failure is a ``CheckError`` (the reason at the default sizes)."""
    given = given or {}
    plan = input_plan(model, {**dict(input_shapes or {}), **{k: list(np.shape(v)) for k, v in given.items()}},
                      given)
    try:
        return first_run(model, run, plan=plan, seed=seed, batch=batch, given=given)
    except CheckError:
        raise
    except SpaError as e:
        raise CheckError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - onnxruntime's own types
        raise CheckError(f"onnxruntime failed to run the model: {one_line(e)}") from None


def resolve(model, input_shapes=None):
    """(model, input shapes): a ModelProto or an existing path as they are, a zoo model's name fetched
    (``spa.zoo.resolve``) with its default shape where ``input_shapes`` are not given."""
    if isinstance(model, onnx.ModelProto):
        return model, input_shapes
    try:
        return zoo.resolve(os.fspath(model), input_shapes or None)
    except SpaError as e:
        raise CheckError(str(e)) from None


def _other_sizes(ref_proto, ref_sess, cand_sess, feeds, seed, atol, rtol) -> list:
    """Both models at the size plan's other points; where the reference refuses independent sizes,
    the plans in which one dim is the sum of two others that fit ``feeds`` are tried (a KV cache's
    mask length = past + sequence)."""
    given = {k: list(v.shape) for k, v in feeds.items()}
    plan = size_plan(graph_inputs(ref_proto), given)
    if not plan.symbols:
        return []
    plans = [plan] + fitting_plans(plan)
    out = []
    for how in ("up", "short"):
        ref_out, why = None, ""
        for p in plans:
            point = p.bumped(how)
            feed = input_feed(ref_proto, plan=p, values=point, seed=seed + 1)
            try:
                ref_out = _run(ref_sess, feed)
                break
            except CheckError as e:
                why = why or str(e)
        entry = {"sizes": p.describe(point), "passed": None, "outputs": []}
        if ref_out is None:
            entry["skipped"] = f"the reference does not run there: {why}"
            out.append(entry)
            continue
        try:
            cand_out = _run(cand_sess, feed)
        except CheckError as e:
            entry.update(passed=False, error=str(e))
            out.append(entry)
            continue
        entry["outputs"] = [_metrics(name, value, np.asarray(cand_out[name]), atol, rtol)
                            for name, value in ref_out.items() if name in cand_out]
        entry["passed"] = all(o["passed"] for o in entry["outputs"])
        out.append(entry)
    return out


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def format_check(result) -> str:
    """A readable terminal table of a ``compare`` result."""
    header = ["output", "shape", "max_abs", "mean_abs", "max_rel", "mean_rel", "cosine", "top1",
              "result"]
    rows = []
    for o in result["outputs"]:
        status = "ok" if o["passed"] else ("FAIL " + o["error"] if o.get("error") else "FAIL")
        rows.append([o["name"], "x".join(map(str, o["shape"])) or "scalar", _fmt(o["max_abs"]),
                     _fmt(o["mean_abs"]), _fmt(o["max_rel"]), _fmt(o["mean_rel"]),
                     _fmt(o["cosine"], ".6f"), _fmt(o["top1"], ".3f"), status])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if result.get("input_shapes"):
        lines.insert(0, "inputs: " + ", ".join(f"{k}:[{','.join(map(str, v))}]" for k, v in result["input_shapes"].items()))
    for size in result.get("sizes", []):
        if size.get("skipped") or size.get("error"):
            lines.append(f"at {size['sizes']}: " + (f"skipped ({size['skipped']})" if size.get("skipped")
                                                     else f"FAIL {size['error']}"))
            continue
        bad = [o["name"] for o in size["outputs"] if not o["passed"]]
        worst = min((o["cosine"] for o in size["outputs"] if o["cosine"] is not None), default=None)
        lines.append(f"at {size['sizes']}: lowest cosine {_fmt(worst, '.6f')}  "
                     + (f"FAIL {', '.join(bad)}" if bad else "ok"))
    for problem in result["signature"]["problems"]:
        lines.append(f"signature: {problem}")
    verdict = "PASSED" if result["passed"] else "FAILED"
    lines.append(f"{verdict} (atol={result.get('atol')}, rtol={result.get('rtol')}: "
                 "|candidate - reference| <= atol + rtol * |reference|)")
    return "\n".join(lines)


_CUDA_WORKS = None


def cuda_available() -> bool:
    """Whether a CUDA session really runs on CUDA here (ORT falls back to CPU silently when
    the CUDA libraries or the GPU are missing). Probed once per process."""
    global _CUDA_WORKS
    if _CUDA_WORKS is None:
        _CUDA_WORKS = False
        if "CUDAExecutionProvider" in ort.get_available_providers():
            from onnx import TensorProto, helper

            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
            y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
            probe = helper.make_model(
                helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y]),
                opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
            options = ort.SessionOptions()
            options.log_severity_level = 4
            ort.set_default_logger_severity(4)  # a failed CUDA library load logs an error
            try:
                sess = ort.InferenceSession(probe.SerializeToString(), options,
                                            providers=["CUDAExecutionProvider"])
                _CUDA_WORKS = "CUDAExecutionProvider" in sess.get_providers()
            except Exception:  # noqa: BLE001
                pass
            finally:
                ort.set_default_logger_severity(3)
    return _CUDA_WORKS
