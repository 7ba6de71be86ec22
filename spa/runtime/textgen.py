"""Text a language model writes itself: spa's inputs for a causal LM when the user gives no data.

Random token ids are nothing like text: a decoder's activations on them have other statistics
than on language, and every criterion or Hessian measured on them misleads (SmolLM2-135M at
params=1.11, wanda, uniform allocation: perplexity 16x dense from statistics on random ids, 1.6x
from text the model sampled itself; docs/llm_quality.md).  Data-free quantization does the same
(LLM-QAT generates its calibration text from the model).

A model is a causal LM here when one integer input indexes an embedding table (``shapes.integer_ranges``:
the token ids) and one float output ends in that many logits, its leading dims those of the ids
(``[batch, sequence, vocab]``).  Other inputs it may have: an attention mask (ones), position ids
(0, 1, ...), a KV cache (empty: past 0).  Generation samples autoregressively in onnxruntime,
with the model's own KV cache where it has one (each step feeds one token and the cache),
temperature 1 and nucleus 0.95, from start tokens drawn from the model's average next-token
distribution after random tokens (no tokenizer and no BOS id is needed).  Without a KV cache each
step reruns the whole prefix: ``n * length**2 / 2`` token positions (32 sequences of 64: 66 k, ~50
s for a 135M model on 2 cores).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SpaError
from ..progress import stepper
from .calib import exposing_session
from .probing import ort_reason
from .shapes import integer_ranges

#: tokens per generated sequence, and sequences per batch of a dynamic batch
LENGTH = 64
PER_BATCH = 4
TOP_P = 0.95
#: tokens a nucleus is looked for among before the whole vocabulary is sorted
CANDIDATES = 1024
#: random tokens whose next-token distributions, averaged, give the start tokens' distribution
PRIOR_ROWS = 16


@dataclass(frozen=True)
class CausalLM:
    """The names a generation loop needs."""
    ids: str                 # the token-id input
    logits: str              # the [batch, sequence, vocab] output
    vocab: int
    dtype: object            # of the ids
    others: tuple            # (input name, what to feed: "mask" | "positions" | "past")


def causal_lm(an) -> CausalLM | None:
    """The causal-LM reading of ``an``'s model (see the module doc), or None."""
    ranges = integer_ranges(an.model)
    inputs = an.probe.inputs
    ids = [n for n, (lo, hi) in ranges.items() if n in inputs and hi > 4 and inputs[n].ndim == 2]
    if len(ids) != 1:
        return None
    name, vocab = ids[0], ranges[ids[0]][1]
    x = inputs[name]
    logits = [o.name for o in an.model.graph.output
              if tuple(an.probe.shapes.get(o.name, ())) == (x.shape[0], x.shape[1], vocab)]
    if len(logits) != 1:
        return None
    others = []
    for n, v in inputs.items():
        if n == name:
            continue
        low = n.lower()
        if "mask" in low and v.ndim == 2:
            others.append((n, "mask"))
        elif "position" in low and v.ndim == 2:
            others.append((n, "positions"))
        elif ("past" in low or "cache" in low) and np.issubdtype(v.dtype, np.floating) and v.ndim == 4:
            others.append((n, "past"))
        else:
            return None
    return CausalLM(name, logits[0], int(vocab), x.dtype, tuple(others))


def _feed(lm: CausalLM, an, ids):
    feed = {lm.ids: ids.astype(lm.dtype)}
    b, t = ids.shape
    for n, what in lm.others:
        v = an.probe.inputs[n]
        if what == "mask":
            feed[n] = np.ones((b, t), v.dtype)
        elif what == "positions":
            feed[n] = np.broadcast_to(np.arange(t, dtype=v.dtype), (b, t)).copy()
        else:
            feed[n] = np.zeros((b, v.shape[1], 0, v.shape[3]), v.dtype)
    return feed


def _sample(logits, u, top_p=TOP_P):
    """One token per row from ``logits`` [rows, vocab]: temperature 1, nucleus ``top_p``, row ``i``
    drawn by the uniform ``u[i]``.  The nucleus is looked for among the ``CANDIDATES`` likeliest
    tokens first (a partition, not a sort of the whole vocabulary); the whole vocabulary is sorted
    only where they hold less than ``top_p``."""
    z = logits.astype(np.float64)
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    order = None
    if p.shape[1] > 2 * CANDIDATES:
        top = np.argpartition(-p, CANDIDATES, axis=1)[:, :CANDIDATES]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(p, top, 1), axis=1), 1)
        if np.all(np.take_along_axis(p, top, 1).sum(1) >= top_p):
            order = top
    if order is None:
        order = np.argsort(-p, axis=1)
    sp = np.take_along_axis(p, order, 1)
    keep = np.cumsum(sp, 1) - sp < top_p
    sp = np.where(keep, sp, 0.0)
    sp /= sp.sum(1, keepdims=True)
    pick = np.minimum((np.cumsum(sp, 1) < np.reshape(u, (-1, 1))).sum(1), sp.shape[1] - 1)
    return order[np.arange(len(p)), pick]


def generate(an, n: int, length: int = LENGTH, seed: int = 0, progress=None) -> np.ndarray:
    """The first ``n`` sequences of ``length`` token ids that ``an``'s model writes from ``seed`` (int64
    [n, length]).  Each sequence depends on its row and the seed only, not on how many are asked
    for, so the first rows of a longer request are a shorter one's: the rows written are kept on
    the analysis's probe, and every stage of one prune that asks for text (the fidelity guard, the
    calibration statistics, obspa's Hessians) pays only for the rows nobody asked for before.
    Raises SpaError when the model is not a causal LM or onnxruntime refuses a step."""
    have = an.probe.generated.get((length, seed))
    if have is None or len(have) < n:
        start = 0 if have is None else len(have)
        new = _generate(an, start, n, length, seed, progress)
        have = new if have is None else np.concatenate([have, new])
        an.probe.generated[(length, seed)] = have
    return have if len(have) == n else have[:n]


def cache_pairs(an, lm: CausalLM) -> dict:
    """``{past input: present output}`` when every past input of ``lm`` has its present output (the
    names of optimum's and torch's exports: ``past_key_values.*`` / ``past.*`` -> ``present.*``), else {}."""
    outputs = {o.name for o in an.model.graph.output}
    pairs = {}
    for n, what in lm.others:
        if what != "past":
            continue
        match = [n.replace(p, "present", 1) for p in ("past_key_values", "past") if n.startswith(p)]
        if not match or match[0] not in outputs:
            return {}
        pairs[n] = match[0]
    return pairs


def _constant(an, name, producers):
    """The value of ``name`` when it is a weight or the 2-D Transpose of one, else None."""
    if name in an.probe.consts:
        return an.probe.consts[name]
    node = producers.get(name)
    if node is None or node.op_type != "Transpose" or node.input[0] not in an.probe.consts:
        return None
    a = an.probe.consts[node.input[0]]
    perm = [list(x.ints) for x in node.attribute if x.name == "perm"]
    return a.T if a.ndim == 2 and (not perm or perm[0] == [1, 0]) else None


def last_position_head(an, lm: CausalLM):
    """``(hidden, head)`` when the logits are ``hidden @ W`` (+ a constant bias) with ``W`` a
    ``[width, vocab]`` weight (or a weight's Transpose: a tied embedding), else None; ``head(h)`` gives
    the logits of the rows ``h`` [rows, width].  A generation step needs the last position's logits
    only: computing every position's through the vocabulary is a fifth of a 135M decoder's work
    (49152 x 576 of its ~135M MACs per token) and writes [batch, sequence, vocab] floats per step."""
    producers = {o: n for n in an.model.graph.node for o in n.output}
    node, bias = producers.get(lm.logits), None
    if node is not None and node.op_type == "Add":
        consts = [i for i in node.input if i in an.probe.consts]
        if len(consts) != 1 or an.probe.consts[consts[0]].ndim != 1:
            return None
        bias = an.probe.consts[consts[0]]
        node = producers.get(next(i for i in node.input if i != consts[0]))
    if node is None or node.op_type != "MatMul":
        return None
    weight = _constant(an, node.input[1], producers)
    if weight is None or weight.ndim != 2 or weight.shape[1] != lm.vocab:
        return None

    def head(h):
        out = h.astype(np.float32) @ weight.astype(np.float32, copy=False)
        return out + bias if bias is not None else out
    return node.input[0], head


def _uniforms(seed, stop, length) -> np.ndarray:
    """[stop, length] uniforms, row ``i`` the same for every ``stop`` > i (numpy fills row by row):
    row ``i``'s start token and its every sampled token come from row ``i``."""
    return np.random.default_rng([seed, 1]).random((stop, length))


def _generate(an, start, stop, length, seed, progress):
    """Rows ``start`` to ``stop`` of ``seed``'s text (``generate``)."""
    lm = causal_lm(an)
    if lm is None:
        raise SpaError("the model is not a causal language model (token ids in, [batch, sequence, vocab] logits "
                       "out): spa cannot make it write text")
    n, u = stop - start, _uniforms(seed, stop, length)[start:]
    pairs = cache_pairs(an, lm)
    last = last_position_head(an, lm)
    # only the tensors read here: the graph's logits over every position (a [32, 64, 49152] float
    # array at the last step of SmolLM2's text, 400 MB) and the lm_head that makes them are left out
    runner, fetch = exposing_session(an, [last[0] if last else lm.logits, *pairs.values()])
    past = {}

    def step(ids, cached=False):
        """The next-token logits after ``ids``; with a KV cache (``cached``) only the last token is
        fed, with the cache of the steps before (a step then costs one token, not the prefix)."""
        feed = _feed(lm, an, ids[:, -1:] if cached else ids)
        if cached:
            feed.update(past)
            for name, what in lm.others:
                if what == "mask":
                    feed[name] = np.ones(ids.shape, feed[name].dtype)
                elif what == "positions":
                    feed[name] = np.full((len(ids), 1), ids.shape[1] - 1, feed[name].dtype)
        try:
            got = runner.run(feed, fetch)
        except Exception as exc:
            raise SpaError(f"generating text with the model failed at length {ids.shape[1]} "
                           f"({ort_reason(exc)})") from None
        past.clear()
        past.update({p: got[q] for p, q in pairs.items()})
        return last[1](got[last[0]][:, -1]) if last else got[lm.logits][:, -1]

    random_ids = np.random.default_rng([seed, 0]).integers(0, lm.vocab, (PRIOR_ROWS, 1))
    first = step(random_ids)                                     # next-token logits after random tokens
    after = np.exp(first - first.max(1, keepdims=True))
    prior = np.cumsum((after / after.sum(1, keepdims=True)).mean(0))
    ids = np.minimum(np.searchsorted(prior / prior[-1], u[:, 0], side="right"), lm.vocab - 1)[:, None]
    tick = stepper(progress, length - 1, f"writing synthetic text ({n} sequences"
                   + (", with the KV cache" if pairs else "") + "): token")
    for t in range(1, length):
        tick(t - 1)
        ids = np.concatenate([ids, _sample(step(ids, cached=bool(pairs) and t > 1), u[:, t])[:, None]], 1)
    return ids.astype(np.int64)


def text_feeds(an, n_batches: int, seed: int = 0, progress=None) -> list:
    """``n_batches`` feeds of generated text: ``PER_BATCH`` sequences of ``LENGTH`` tokens each where
    the batch is dynamic (else the probe's batch), with the mask, positions and empty cache the
    model takes."""
    lm = causal_lm(an)
    b = an.probe.inputs[lm.ids].shape[0]
    dynamic = an.probe.dynamic.get(lm.ids) or (False, False)
    per = PER_BATCH if dynamic[0] else b
    length = LENGTH if dynamic[1] else an.probe.inputs[lm.ids].shape[1]
    ids = generate(an, n_batches * per, length, seed, progress)
    return [_feed(lm, an, ids[i * per:(i + 1) * per]) for i in range(n_batches)]
