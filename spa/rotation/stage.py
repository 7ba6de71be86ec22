"""The rotation stage: the stream's principal axes -> rotate -> slice the trailing dims -> validate.

``spa.prune`` runs :func:`rotate_stream` with ``--rotate F`` before its channel steps, which then
prune the rotated model to the rest of the target.  One orthogonal ``Q`` serves the whole stream
(SliceGPT gives every layer its own, joined by a D x D matrix on every skip path: 0.27M parameters a
sub-block on a 576-wide stream, more than slicing saves on a model that narrow): its columns are the
eigenvectors of the sum, over every RMSNorm that reads the stream, of ``E[x x^T] / tr`` of the
normalised stream ``x / rms(x)`` (each norm counted alike), on the calibration data or on spa's own
inputs (text the model writes itself).  The trailing ``round(F x D)`` dims of the rotated stream then
go as one unit set of the stream's group (the channel model cuts them, with every shape it feeds).
Each RMSNorm then averages over fewer dims; its readers are scaled by ``sqrt(D (1 - f) / d)``, ``f``
the share of that norm's energy in the dims cut, which is what brings ``rms`` back to its value.
"""
from __future__ import annotations

import numpy as np

from ..errors import SpaError
from ..graph.stream import find_streams
from ..planning.counting import count_params
from ..progress import quiet
from ..runtime import calib, synthetic
from ..surgery import slicing
from ..surgery.rotation import NODE_PREFIX, rotate
from ..surgery.validate import validate


def principal_axes(covariances: list) -> tuple[np.ndarray, np.ndarray]:
    """``(Q, energy)``: the eigenvectors of the trace-normalised sum of ``covariances`` (columns,
    by falling eigenvalue) and each eigenvalue's share of the total."""
    total = sum(C / max(float(np.trace(C)), 1e-30) for C in covariances)
    values, vectors = np.linalg.eigh((total + total.T) / 2)
    order = np.argsort(values)[::-1]
    values = np.clip(values[order], 0.0, None)
    return vectors[:, order], values / max(values.sum(), 1e-30)


def norm_scales(covariances: list, Q: np.ndarray, kept: int) -> np.ndarray:
    """``sqrt(D (1 - f) / d)`` per norm: ``f`` its energy share in the dims past ``kept``."""
    D = Q.shape[0]
    out = []
    for C in covariances:
        diag = np.einsum("ij,jk,ki->i", Q.T, C, Q)
        share = float(diag[:kept].sum() / max(diag.sum(), 1e-30))
        out.append(np.sqrt(D * max(share, 1e-6) / kept))
    return np.array(out)


def _covariances(first, stream, opts, progress) -> tuple[list, str]:
    """``E[x x^T]`` of each norm's normalised input (a fused norm's output divided by its scale)."""
    spec = opts.calib if opts.calib is not None else "synthetic"
    desc, feeds = synthetic.calibration(first, spec, n_batches=opts.calib_batches, batch_size=opts.calib_batch_size,
                                        seed=opts.seed, wanted=opts.synthetic, progress=progress)
    axes = [(m.normed, len(first.probe.shapes[m.normed]) - 1) for m in stream.norms]
    progress(f"rotation: the stream's second moments at {len(axes)} RMSNorms on {desc}")
    stats = calib.collect(first, feeds, axes=[], moments=axes, progress=progress, source=desc)
    out = []
    for m, axis in zip(stream.norms, axes):
        C = stats.moments[axis][0]
        if m.fused and m.scale is not None:
            g = np.asarray(first.weights[m.scale], np.float64)
            inv = np.where(np.abs(g) > 1e-12, 1.0 / np.where(g == 0, 1.0, g), 0.0)
            C = C * inv[:, None] * inv[None, :]
        out.append(C)
    return out, desc


def rotate_stream(first, opts, progress=quiet, analyze=None):
    """``(model, weights, report)``: ``first`` (an analysis) with its stream rotated and its trailing
    ``round(opts.rotate x width)`` dims cut; ``analyze``: ``spa.api.analyze`` (the rotated model is
    analysed again to cut it)."""
    progress("rotation: finding the residual stream")
    streams = find_streams(first.model, first.probe.shapes, first.weights)
    if not streams:
        raise SpaError("--rotate: no residual stream read through RMSNorms (a Llama-family decoder's) was found; "
                       "LayerNorm streams (which subtract the mean) are not rotated")
    stream = streams[0]
    D = stream.width
    cut = int(round(opts.rotate * D))
    if cut >= D:
        raise SpaError(f"--rotate {opts.rotate}: nothing of the {D}-wide stream would be left")
    covs, desc = _covariances(first, stream, opts, progress)
    Q, energy = principal_axes(covs)
    scales = norm_scales(covs, Q, D - cut)
    progress(f"rotation: rotating the {D}-wide stream ({len(stream.norms)} norms, {len(stream.writers)} writers)"
             + (f", then cutting {cut} dims" if cut else ""))
    model, weights, key = rotate(first.model, first.weights, stream, Q, scales)
    after = validate(model, first, opts.input_shapes, weights=weights) if not cut else None
    if cut:
        rotated = analyze(model, input_shapes=opts.input_shapes, progress=progress, weights=weights,
                          prune_io=opts.prune_io)
        units = trailing_units(rotated.channels, key, D - cut)
        model, weights = slicing.cut(rotated.model, rotated.channels, rotated.probe, units)
        progress("validating the rotated model in onnxruntime")
        after = validate(model, first, opts.input_shapes, weights=weights)
    report = {"width": [D, D - cut], "source": desc, "norms": len(stream.norms), "writers": len(stream.writers),
              "energy_kept": round(float(energy[:D - cut].sum()), 6),
              "norm_scales": [round(float(s), 6) for s in (scales.min(), scales.max())],
              "params": {"before": first.params, "after": count_params(model)}}
    return model, weights, after, report


def kept_whole(exclude: str | None) -> str:
    """``--exclude`` for the channel steps after a rotation: also every group that runs through a
    MatMul the rotation added.  Those are the stream itself, which is already cut and is approximate,
    and, where a tied embedding is rotated after its lookup, the table's own width in the original
    basis.  That width is an exact group of its own now. Before the rotation it was part of the
    stream, which a uniform plan keeps whole. Cutting a uniform share of it took SmolLM2 at
    params=1.11 from 1.26x to 40x the dense perplexity."""
    own = f"^{NODE_PREFIX}"
    return own if not exclude else f"(?:{exclude})|{own}"


def trailing_units(cm, axis, kept: int) -> np.ndarray:
    """The units that cut ``axis`` of channel model ``cm`` down to its first ``kept`` positions; a
    one-line error when they are not all of one prunable group's units along it."""
    got = cm.axis_index.get(axis)
    if got is None:
        raise SpaError(f"internal: the rotated stream's axis {axis} is not in the channel model")
    start, size = got
    atoms = np.arange(start + kept, start + size)
    units = np.unique(cm.pair_unit[np.isin(cm.pair_atom, atoms)])
    left = cm.keep(cm.removed_atoms(units), axis)
    if left is None or not np.array_equal(left, np.arange(kept)):
        raise SpaError("--rotate: the rotated stream's trailing dims are not units of their own "
                       "(a reshape or an op couples them with the others); use --rotate 0 to rotate only")
    group = next((g for g in cm.groups if np.isin(units, g.units).all()), None)
    if group is None or not group.prunable:
        why = group.reason if group is not None else "its dims fall in several groups"
        raise SpaError(f"--rotate: the rotated stream cannot shrink ({why})")
    return units
