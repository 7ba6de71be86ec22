"""Gradients of a PyTorch model, keyed by the initializer names of its ONNX export, for ``spa prune
--criterion taylor|snip|fisher --grads FILE``.

spa prunes the ONNX file, so gradients must be keyed by ONNX initializer names, and exporters do
not keep PyTorch's parameter names and values one to one: the TorchScript exporter folds each
BatchNorm into the Conv before it under a new name (``onnx::Conv_63``), the dynamo exporter folds
it keeping the Conv's name (``0.weight``, values scaled) and may store a Linear weight transposed
under a new name (``val_31``).  So this tool computes gradients of the PyTorch parameters and then
finds, for each float initializer of the ONNX file, the parameter it was made from, in this order:

1. ``name``: a parameter of the same name, shape and values;
2. ``value``: the one parameter with the same values (bytes, in the initializer's dtype);
3. ``transposed``: the one 2-D parameter whose transpose it equals;
4. ``folded``: a parameter it equals up to one factor per output channel (axis 0 or 1 of the
   parameter or of its transpose; the same-named parameter first, else the only one that fits):
   a BatchNorm folded in.  In eval mode the folded weight is ``W' = W * s``, so
   ``dL/dW' = dL/dW / s`` (squared gradients: ``/ s**2``); channels with ``s = 0`` get 0;
5. ``folded_bias``: the bias a folded BatchNorm makes, ``beta + s * (b - mean)`` (``b``: the
   layer's own bias or 0) for exactly one BatchNorm module (running statistics, affine): in eval
   mode ``dL/db' = dL/dbeta``.

Values that several parameters share (LayerNorm weights at initialisation are all ones) match only
by name; initializers that match nothing (shape constants, a bias whose BatchNorm is not found) get
no gradient, and spa scores their channels from the other weights.  Gradients are taken in eval mode
by default (BatchNorm on running statistics, no dropout): the function the ONNX file computes,
which is what makes rules 4 and 5 exact (tests/scoring/test_gradient.py checks every gradient against a
central difference of the loss in onnxruntime, for both exporters).

The file (``.npz`` uncompressed, or ``.safetensors``) holds the mean gradient over the batches, or
with ``squared=True`` the mean of the per-batch squared gradients (empirical Fisher) and the marker
spa reads (npz member ``__squared__`` = 1, safetensors metadata ``"squared": "1"``).  Example::

    import torch, torch.nn.functional as F
    from grads_from_torch import grads_for_onnx
    torch.onnx.export(net.eval(), x[:1], "net.onnx", dynamo=False)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    grads, summary = grads_for_onnx(net, "net.onnx", batches,
                                    lambda m, b: F.cross_entropy(m(b[0]), b[1]), out="grads.npz")
    print(summary)      # how each initializer was matched
    # spa prune net.onnx -o small.onnx --criterion taylor --grads grads.npz --target macs=1.5

(``sys.path`` must reach ``tools/``; ``python tools/grads_from_torch.py --help`` says the same.)
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SQUARED = "__squared__"   # spa.scoring.gradient.SQUARED
#: rule 4: largest |W' - s * W| allowed, relative to the largest |W'|
FOLD_RTOL = 1e-5


@dataclass
class Match:
    """Where one initializer comes from: ``param`` and ``how`` (name, value, transposed, folded);
    ``transposed``: the initializer is the parameter's transpose; ``scale``/``axis``: rule 4."""
    param: str
    how: str
    transposed: bool = False
    scale: np.ndarray | None = None
    axis: int = 0


def accumulate(model, batches, loss_fn, *, squared: bool = False, train: bool = False) -> dict:
    """Per named parameter, the mean over ``batches`` of d loss_fn(model, batch) / d parameter, as
    float32 numpy arrays (``squared``: the mean of each batch's squared gradient).  ``train=False``
    takes the gradients in eval mode, of the function the exported model computes."""
    import torch
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}
    was, n_batches = model.training, 0
    model.train(train)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    g = p.grad.detach().double()
                    sums[n] += g * g if squared else g
            n_batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    if not n_batches:
        raise ValueError("no batches: gradients need at least one")
    return {n: (s / n_batches).float().cpu().numpy() for n, s in sums.items()}


def parameters(model) -> dict:
    """Named parameters as float32 numpy arrays (what the exporter wrote)."""
    return {n: p.detach().float().cpu().numpy() for n, p in model.named_parameters()}


def onnx_initializers(path) -> dict:
    """The floating-point initializers of an ONNX file as numpy arrays (external data read)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    out = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if np.issubdtype(a.dtype, np.floating) and a.ndim >= 1:
            out[t.name] = a
    return out


def _key(a: np.ndarray, dtype) -> tuple:
    return a.shape, np.dtype(dtype).str, hashlib.sha1(np.ascontiguousarray(a.astype(dtype)).tobytes()).hexdigest()


def _fold_scale(init: np.ndarray, param: np.ndarray, axis: int):
    """One factor per slice along ``axis`` with ``init == scale * param`` (to FOLD_RTOL), or None."""
    if init.shape != param.shape or init.ndim < 2 or init.size // init.shape[axis] < 2 or not np.any(init):
        return None  # (one element per slice: anything is proportional)
    a, p = np.moveaxis(init.astype(np.float64), axis, 0), np.moveaxis(param.astype(np.float64), axis, 0)
    a, p = a.reshape(len(a), -1), p.reshape(len(p), -1)
    pp = np.einsum("ij,ij->i", p, p)
    s = np.divide(np.einsum("ij,ij->i", a, p), pp, out=np.zeros(len(pp)), where=pp > 0)
    if np.abs(a - s[:, None] * p).max() > FOLD_RTOL * np.abs(a).max():
        return None
    return s


def match(params: dict, inits: dict, norms: dict | None = None) -> dict:
    """Initializer name -> :class:`Match` under the rules of the module docstring (``norms``, from
    :func:`batch_norms`, for rule 5)."""
    by_value = {}
    dtypes = {a.dtype for a in inits.values()}
    for n, p in params.items():
        for dt in dtypes:
            by_value.setdefault(_key(p, dt), []).append((n, False))
            if p.ndim == 2:
                by_value.setdefault(_key(p.T, dt), []).append((n, True))
    out, left = {}, []
    for name, a in inits.items():
        p = params.get(name)
        if p is not None and p.shape == a.shape and np.array_equal(p.astype(a.dtype), a):
            out[name] = Match(name, "name")
            continue
        hits = by_value.get(_key(a, a.dtype), [])
        if len({n for n, _ in hits}) == 1:
            n, t = hits[0]
            out[name] = Match(n, "transposed" if t else "value", transposed=t)
        elif not hits:
            left.append(name)
    for name in left:
        got = _folded(name, inits[name], params) or _folded_bias(inits[name], params, norms or {})
        if got is not None:
            out[name] = got
    return out


def batch_norms(model) -> dict:
    """Every BatchNorm-like module (affine, running statistics): ``{beta name: (s, mean, beta)}``
    with ``s = gamma / sqrt(running_var + eps)``, as float64 numpy arrays."""
    out = {}
    for prefix, m in model.named_modules():
        stats = [getattr(m, k, None) for k in ("weight", "bias", "running_mean", "running_var")]
        if any(v is None for v in stats) or not hasattr(m, "eps"):
            continue
        gamma, beta, mean, var = (v.detach().double().cpu().numpy() for v in stats)
        if gamma.ndim == 1 and gamma.shape == beta.shape == mean.shape == var.shape:
            out[f"{prefix}.bias" if prefix else "bias"] = (gamma / np.sqrt(var + m.eps), mean, beta)
    return out


def _folded_bias(a, params, norms):
    """Rule 5: ``a == beta + s * (b - mean)`` for exactly one BatchNorm (``b`` 0 or a 1-D parameter)."""
    if a.ndim != 1:
        return None
    a = a.astype(np.float64)
    tol = FOLD_RTOL * max(np.abs(a).max(), 1e-30) + 1e-7
    found = set()
    for beta_name, (s, mean, beta) in norms.items():
        if s.shape != a.shape:
            continue
        for b in [0.0] + [p for p in params.values() if p.shape == a.shape]:
            if np.abs(beta + s * (b - mean) - a).max() <= tol:
                found.add(beta_name)
                break
    return Match(found.pop(), "folded_bias") if len(found) == 1 else None


def _folded(name, a, params):
    """Rule 4: the same-named parameter first, else the only parameter that fits."""
    def fits(n):
        p = params[n]
        for transposed, q in ((False, p), (True, p.T if p.ndim == 2 else None)):
            if q is None or q.shape != a.shape:
                continue
            for axis in (0, 1):
                s = _fold_scale(a, q, axis)
                if s is not None:
                    return Match(n, "folded", transposed, s, axis)
        return None

    if name in params and (m := fits(name)) is not None:
        return m
    found = [m for n in params if n != name and (m := fits(n)) is not None]
    return found[0] if len(found) == 1 else None


def to_onnx_names(grads: dict, matches: dict, *, squared: bool = False) -> dict:
    """Gradients keyed by parameter name -> keyed by initializer name, oriented and scaled like the
    initializer (rule 4: divided by the fold factor, or its square for squared gradients)."""
    out = {}
    for name, m in matches.items():
        g = grads.get(m.param)
        if g is None:
            continue
        g = g.T if m.transposed else g
        if m.scale is not None:
            s = m.scale ** 2 if squared else m.scale
            inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
            shape = [1] * g.ndim
            shape[m.axis] = -1
            g = g * inv.reshape(shape)
        out[name] = np.ascontiguousarray(g, dtype=np.float32)
    return out


def save(grads: dict, path, *, squared: bool = False) -> Path:
    """Write ``{initializer name: gradient}`` as .npz (uncompressed: spa memory-maps it) or
    .safetensors (little-endian F32, written here without the package)."""
    path = Path(path)
    if path.suffix == ".npz":
        extra = {SQUARED: np.array(1, np.int8)} if squared else {}
        with open(path, "wb") as f:   # np.savez on a path would append .npz to other suffixes
            np.savez(f, **grads, **extra)
    elif path.suffix == ".safetensors":
        write_safetensors(path, grads, {"squared": "1"} if squared else {})
    else:
        raise ValueError(f"{path}: write .npz or .safetensors")
    return path


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """float32 tensors in the safetensors layout (``spa.io.safetensors``, no package needed)."""
    from spa.io import safetensors
    items = [(name, "F32", np.shape(a), lambda a=a: np.ascontiguousarray(a, dtype="<f4")) for name, a in tensors.items()]
    safetensors.write(path, items, {str(k): str(v) for k, v in (metadata or {}).items()})


def summary(matches: dict, inits: dict, params: dict) -> str:
    """How many initializers each rule matched, and the float weights nothing matched."""
    counts = {}
    for m in matches.values():
        counts[m.how] = counts.get(m.how, 0) + 1
    used = {m.param for m in matches.values()}
    unmatched = [n for n in inits if n not in matches]
    lines = [f"{len(matches)} of {len(inits)} float initializers matched ("
             + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")"]
    if unmatched:
        lines.append(f"no gradient for {len(unmatched)}: " + ", ".join(unmatched[:12])
                     + (" ..." if len(unmatched) > 12 else ""))
    unused = [n for n in params if n not in used]
    if unused:
        lines.append(f"{len(unused)} parameters match no initializer (folded into one, or not exported): "
                     + ", ".join(unused[:12])
                     + (" ..." if len(unused) > 12 else ""))
    return "\n".join(lines)


def grads_for_onnx(model, onnx_path, batches, loss_fn, *, out=None, squared: bool = False, train: bool = False):
    """Gradients of ``model`` over ``batches`` keyed by the initializers of ``onnx_path`` (its
    export); written to ``out`` when given.  Returns ``(gradients, summary text)``."""
    inits = onnx_initializers(onnx_path)
    params = parameters(model)
    matches = match(params, inits, batch_norms(model))
    grads = to_onnx_names(accumulate(model, batches, loss_fn, squared=squared, train=train), matches, squared=squared)
    if out is not None:
        save(grads, out, squared=squared)
    return grads, summary(matches, inits, params)


if __name__ == "__main__":
    print(__doc__)
    sys.exit(0 if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") else 2)
