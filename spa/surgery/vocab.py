"""Vocabulary pruning (``spa prune --keep-tokens FILE``): a causal LM that knows only the tokens kept.

A model that serves one kind of text reads and writes a small part of its vocabulary, yet every
token position pays for the whole lm_head (SmolLM2-135M: 49152 x 576 of its ~135M MACs per token)
and the file carries the whole embedding table.  Keeping K token ids slices the embedding's rows
(the ``Gather`` on an initializer that the token ids index) and the lm_head's output rows (the
``MatMul`` weight that makes the logits, its bias, or the ``Transpose`` of the embedding a tied head
exports as), keeping the kept ids in ascending order.  The pruned model takes *new* ids 0..K-1
(new id i is original id ``kept[i]``) and writes K logits: each equals the original's logit of
``kept[i]`` exactly, since no other weight changes (the oracle of ``tests/surgery/test_vocab.py``:
the original with the other tokens' logits masked).  Its input and output therefore change meaning,
and the report's ``interface`` and ``vocabulary`` (the id map) say how; the generation loop maps the
tokenizer's ids through the map both ways.

The kept ids come from a file (:func:`read_ids`): the user's special tokens (BOS, EOS, padding) are
kept only when the file lists them (the tokenizer is not at hand here), besides any
``bos_token_id``/``eos_token_id``/``pad_token_id`` the model's metadata names.  What spa cannot cut
exactly (ids read by anything but an embedding, logits made by anything but a MatMul, a table read
elsewhere) is refused with a one-line SpaError.  This is a stage of its own: channel pruning is a
second ``spa prune`` of its output.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import SpaError
from ..io import weights as weight_store
from ..planning.counting import count_macs, count_params
from ..progress import quiet
from ..runtime import probing, textgen
from .validate import validate

#: ops that carry token ids on unchanged (the ones ``shapes.integer_ranges`` follows), and ops that read
#: only the ids' shape (a remapped id is as good as the original there)
ID_OPS = ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity")
SHAPE_OPS = ("Shape", "Size")
#: metadata keys whose ids are always kept
SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
MAX_BYTES = 256 << 20


def read_ids(path, key: str | None = None) -> np.ndarray:
    """The sorted unique token ids of ``path``: a .npz (member ``key``, else ``input_ids``, else its
    only member: a ``--calib`` file of token ids), a .npy, a JSON list (nested lists too), or text of
    integers separated by spaces, commas or lines (``#`` starts a comment)."""
    p = Path(path)
    if not p.is_file():
        raise SpaError(f"--keep-tokens: {p}: no such file (give token ids as .npz, .npy, JSON or text)")
    if p.stat().st_size > MAX_BYTES:
        raise SpaError(f"--keep-tokens: {p}: over {MAX_BYTES >> 20} MB; give the unique ids only")
    try:
        if p.suffix in (".npz", ".npy"):
            loaded = np.load(str(p), allow_pickle=False)
            if not isinstance(loaded, np.ndarray):
                names = [k for k in (key, "input_ids") if k in loaded.files] or \
                    (loaded.files if len(loaded.files) == 1 else [])
                if not names:
                    raise SpaError(f"--keep-tokens: {p} has {', '.join(loaded.files) or 'nothing'}: "
                                   "name the token ids input_ids")
                loaded = loaded[names[0]]
            ids = loaded
        elif p.suffix == ".json":
            ids = np.asarray(json.loads(p.read_text()))
        else:
            text = "\n".join(line.split("#")[0] for line in p.read_text().splitlines())
            ids = np.asarray([int(w) for w in text.replace(",", " ").split()])
    except SpaError:
        raise
    except Exception as exc:
        raise SpaError(f"--keep-tokens: {p}: cannot read token ids ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:100] if str(exc) else ''})") from None
    if ids.dtype == object or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise SpaError(f"--keep-tokens: {p}: token ids must be whole numbers, got {ids.dtype}")
    ids = np.unique(ids.astype(np.int64).ravel())
    if not len(ids) or ids[0] < 0:
        raise SpaError(f"--keep-tokens: {p}: " + ("no token ids" if not len(ids) else f"negative id {ids[0]}"))
    return ids


@dataclass(frozen=True)
class Sites:
    """Where the vocabulary lives: the tensors to slice (``slices``: (initializer, axis)), the
    token-id input, the logits output and the vocabulary size."""
    ids: str
    logits: str
    vocab: int
    embedding: str
    head: str
    slices: tuple

    @property
    def tied(self) -> bool:
        return self.embedding == self.head


def find_sites(model, consts: dict, lm) -> Sites:
    """The embedding and lm_head of causal LM ``lm`` (``textgen.causal_lm``), or a one-line SpaError
    naming what stands in the way of an exact cut."""
    consumers, producers = {}, {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    gathers, todo = [], [lm.ids]
    while todo:
        for node, i in consumers.get(todo.pop(), []):
            if node.op_type in ID_OPS and i == 0:
                todo.extend(node.output)
            elif node.op_type == "Gather" and i == 1 and node.input[0] in consts \
                    and _attr(node, "axis", 0) == 0 and consts[node.input[0]].shape[0] == lm.vocab:
                gathers.append(node)
            elif node.op_type not in SHAPE_OPS:
                raise SpaError(f"--keep-tokens: the token ids '{lm.ids}' are read by {node.op_type} '{node.name}', "
                               "not only an embedding Gather: spa cannot renumber them there")
    if len(gathers) != 1:
        raise SpaError(f"--keep-tokens: the token ids index {len(gathers)} embedding tables, spa cuts exactly one")
    embedding = gathers[0].input[0]
    slices, readers = {(embedding, 0)}, {(gathers[0].name, embedding)}
    node = producers.get(lm.logits)
    if node is not None and node.op_type == "Add" and any(_is_vector(consts, x, lm.vocab) for x in node.input):
        bias = next(x for x in node.input if _is_vector(consts, x, lm.vocab))
        slices.add((bias, 0))
        readers.add((node.name, bias))
        node = producers.get(next(x for x in node.input if x != bias))
    if node is None or node.op_type != "MatMul" or len(consumers.get(node.output[0], [])) > 1:
        raise SpaError(f"--keep-tokens: the logits '{lm.logits}' are not made by a MatMul with a weight (and a bias): "
                       "spa cannot cut the lm_head")
    w, t = node.input[1], producers.get(node.input[1])
    if w in consts and consts[w].ndim == 2 and consts[w].shape[1] == lm.vocab:
        head, axis = w, 1
    elif t is not None and t.op_type == "Transpose" and t.input[0] in consts and consts[t.input[0]].ndim == 2 \
            and _attr(t, "perm", [1, 0]) == [1, 0] and len(consumers[w]) == 1:
        head, axis = t.input[0], 0                      # a tied head: MatMul(h, Transpose(embedding))
        readers.add((t.name, head))
    else:
        raise SpaError(f"--keep-tokens: the lm_head MatMul '{node.name}' reads '{w}', not a [width, vocab] weight "
                       "or the Transpose of one: spa cannot cut it")
    slices.add((head, axis))
    readers.add((node.name, head))
    for name, _ in slices:
        other = [n.name for n, _ in consumers.get(name, []) if (n.name, name) not in readers]
        if other:
            raise SpaError(f"--keep-tokens: '{name}' is also read by '{other[0]}': spa cannot cut it there")
    return Sites(lm.ids, lm.logits, lm.vocab, embedding, head, tuple(sorted(slices)))


def _attr(node, name, default):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def _is_vector(consts, name, n) -> bool:
    return name in consts and consts[name].shape == (n,)


def cut_vocab(proto, weights: dict, sites: Sites, kept: np.ndarray):
    """``(model, weights)`` keeping token ids ``kept`` (sorted, unique) in every tensor of ``sites``,
    the logits output declared K wide; ``proto`` and ``weights`` are not changed."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    new_weights = {t.name: weights[t.name] for t in out.graph.initializer
                   if weight_store.is_stub(t) and t.name in weights}
    for name, axis in sites.slices:
        value = np.ascontiguousarray(np.take(weights[name], kept, axis=axis))
        weight_store.put(out, new_weights, name, value, tensor=inits[name])
        if not weight_store.is_stub(inits[name]):
            new_weights.pop(name, None)
    logits = next(o for o in out.graph.output if o.name == sites.logits)
    dim = logits.type.tensor_type.shape.dim
    if not len(dim) or not dim[-1].HasField("dim_value"):
        raise SpaError(f"--keep-tokens: the logits '{sites.logits}' do not declare their vocabulary size: spa "
                       "cannot write the smaller one")
    dim[-1].dim_value = len(kept)
    del out.graph.value_info[:]   # shapes along the vocabulary are stale
    return out, new_weights


def kept_ids(model, path, lm) -> tuple[np.ndarray, list]:
    """The ids of ``path`` with the model metadata's special tokens; ``(kept, specials added)``."""
    ids = read_ids(path, lm.ids)
    meta = {p.key: p.value.strip() for p in model.metadata_props}
    special = np.asarray([int(meta[k]) for k in SPECIAL_KEYS if meta.get(k, "").isdigit()], np.int64)
    added = sorted(set(special.tolist()) - set(ids.tolist()))
    kept = np.union1d(ids, special)
    if kept[-1] >= lm.vocab:
        raise SpaError(f"--keep-tokens: {path}: id {kept[-1]} is outside the model's vocabulary of {lm.vocab}")
    return kept, added


def prune_vocab(first, path, input_shapes=None, seed: int = 0, progress=quiet):
    """Keep the token ids of ``path`` in analysis ``first``'s causal LM.  Returns ``(model, weights,
    report, kept map)``: the map as ``{initializer: {axis: kept}}`` for ``--map``.  The report's
    ``vocabulary.check`` is the largest difference between the pruned model's logits on remapped ids
    and the original's kept logits on the same tokens (probe-sized, ids drawn from the kept ones)."""
    lm = textgen.causal_lm(first)
    if lm is None:
        raise SpaError("--keep-tokens: the model is not a causal language model (token ids in, [batch, sequence, "
                       "vocab] logits out): spa has no vocabulary to cut")
    sites = find_sites(first.model, first.weights, lm)
    kept, added = kept_ids(first.model, path, lm)
    progress(f"keeping {len(kept)} of {lm.vocab} tokens ({', '.join(sorted({n for n, _ in sites.slices}))})")
    model, weights = cut_vocab(first.model, first.weights, sites, kept)
    progress("validating the pruned model in onnxruntime")
    after = validate(model, first, input_shapes, weights=weights)
    feed = dict(first.probe.inputs)
    tokens = np.random.default_rng(seed).choice(kept, feed[lm.ids].shape)
    want = probing.output_runner(first.model, first.weights, [lm.logits]).run(
        {**feed, lm.ids: tokens.astype(lm.dtype)})[lm.logits]
    got = probing.output_runner(model, after.consts, [lm.logits]).run(
        {**feed, lm.ids: np.searchsorted(kept, tokens).astype(lm.dtype)})[lm.logits]
    diff = float(np.abs(got - want[..., kept]).max())
    if not np.allclose(got, want[..., kept], rtol=1e-4, atol=1e-4):
        raise SpaError(f"internal: the pruned model's logits differ from the original's kept logits by {diff:.3g}; "
                       "spa would not write it: please report this model")
    vocab = {"kept": int(len(kept)), "original": lm.vocab, "embedding": sites.embedding, "head": sites.head,
             "tied": sites.tied, "tensors": [f"{n}[axis {a}]" for n, a in sites.slices], "metadata_specials": added,
             "check": {"tokens": int(tokens.size), "max_abs_diff": diff}, "ids": kept.tolist()}
    interface = [{"tensor": lm.ids, "kind": "input", "axis": "values", "before": lm.vocab, "after": len(kept),
                  "note": "token ids 0..K-1: new id i is original id vocabulary.ids[i]"},
                 {"tensor": lm.logits, "kind": "output", "axis": len(after.shapes[lm.logits]) - 1,
                  "before": lm.vocab, "after": len(kept), "note": "logit i is that of original id vocabulary.ids[i]"}]
    report = {"criterion": "keep-tokens", "reduction": "none", "normalisation": None,
              "before": {"params": first.params, "macs": first.macs},
              "after": {"params": count_params(model), "macs": count_macs(model, after.shapes)},
              "vocabulary": vocab, "interface": interface, "groups": []}
    kept_map = {}
    for name, axis in sites.slices:
        kept_map.setdefault(name, {})[axis] = kept
    return model, weights, report, kept_map
