"""Agreement the task would measure: how often the pruned model's outputs lead to the original's
decisions, chosen from each output's form.  The cosine of raw outputs is blunt -- a softmax over two
classes is close to anything, CTC frames are mostly blanks, a decoder's 49k logits are mostly noise
-- so fidelity is measured by what a user of the output reads off it:

==============  ==============================================  ==========================================
metric          output form                                     agreement
==============  ==============================================  ==========================================
``tokens``      a causal LM's logits [batch, seq, vocab]        next-token argmax equal to the original's
``top1``        class scores [batch, classes] (2..1024, or a    argmax equal (a single sigmoid score: the
                Softmax/Sigmoid output, or named like logits)   same side of 0.5); KL reported beside
``ctc``         per-frame class probabilities [batch, T, C]     greedy CTC decoding (argmax, repeats
                (rows summing to 1) of a non-LM                 merged, blank dropped): 1 - edit distance /
                                                                length, averaged over lines
``mask``        a probability map [batch, 1, H, W] in [0, 1]    IoU of the maps binarised at 0.3 (DB's)
``neighbours``  embeddings [batch, D] (D > 1024, or named like   each sample's nearest other sample (cosine,
                embeddings), or [batch, T, D] hidden states     token states mean-pooled) is the same one
``cosine``      anything else (detector heads, images...)       the cosine over every run at once
==============  ==============================================  ==========================================

The CTC blank is the class the original predicts most often (CTC frames are dominated by blanks).
A discrete agreement needs samples (``MIN_SAMPLES``): with fewer, the cosine stands in and the
report's ``metric`` says ``cosine``.
``--fidelity-metric NAME`` sets one metric for every output it suits (``auto``: as above).  A metric
accumulates run by run (:class:`Tally`), so no run's outputs are kept beyond what it needs.
"""
from __future__ import annotations

import re

import numpy as np

from ..errors import SpaError
from ..runtime import textgen
from . import METRICS

#: samples (lines for ctc) a discrete agreement needs to say anything; with fewer the cosine stands in
#: (top-1 agreement over the two images a static-batch classifier's guard runs is 0, 0.5 or 1)
MIN_SAMPLES = {"top1": 16, "ctc": 8, "neighbours": 8}
#: the threshold a probability map is binarised at (DB text detection's default)
MASK_THRESHOLD = 0.3
_CLASS_NAMES = re.compile(r"logit|prob|score|label|class|pred|softmax|sigmoid|output_?\d*$", re.I)
_EMBEDDING_NAMES = re.compile(r"embed|hidden|pool|feature|sentence|vector|encod", re.I)


def _producer_ops(model) -> dict:
    return {o: n.op_type for n in model.graph.node for o in n.output}


def choose(name: str, value, producer: str | None, lm_logits: str | None, wanted: str = "auto") -> str:
    """The metric for output ``name`` whose first reference run is ``value`` (see the module doc)."""
    v = np.asarray(value)
    floating = np.issubdtype(v.dtype, np.floating)
    forms = []
    if floating and name == lm_logits:
        forms.append("tokens")
    if floating and v.ndim == 2 and (producer in ("Softmax", "LogSoftmax", "Sigmoid") or _CLASS_NAMES.search(name)
                                     or (not _EMBEDDING_NAMES.search(name) and 1 <= v.shape[1] <= 1024)):
        forms.append("top1")
    probs = floating and v.ndim == 3 and v.size and v.min() >= 0 and np.allclose(v.sum(-1), 1.0, atol=1e-3)
    if probs and name != lm_logits and v.shape[2] >= 2:
        forms.append("ctc")
    if floating and v.ndim == 4 and v.shape[1] == 1 and v.size and v.min() >= 0 and v.max() <= 1:
        forms.append("mask")
    if floating and v.ndim in (2, 3) and (_EMBEDDING_NAMES.search(name) or (v.ndim == 2 and "top1" not in forms)):
        forms.append("neighbours")
    if wanted == "auto":
        return forms[0] if forms else "cosine"
    if wanted not in METRICS:
        raise SpaError(f"--fidelity-metric must be one of {', '.join(METRICS)}, got {wanted!r}")
    return wanted if wanted == "cosine" or wanted in forms else "cosine"


def plan(an, first_run: dict, wanted: str = "auto") -> dict:
    """``{output: metric}`` for ``an``'s model from the original's first run on the fidelity inputs."""
    lm = textgen.causal_lm(an)
    producers = _producer_ops(an.model)
    return {k: choose(k, v, producers.get(k), lm.logits if lm else None, wanted) for k, v in first_run.items()}


def _edit_distance(a: list, b: list) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def ctc_decode(frames: np.ndarray, blank: int) -> list:
    """Greedy CTC decoding of ``frames`` [T, C]: argmax per frame, repeats merged, blanks dropped."""
    best = frames.argmax(-1)
    keep = np.concatenate([[True], best[1:] != best[:-1]]) & (best != blank)
    return best[keep].tolist()


#: positions of a language model's logits taken to float64 at a time (``token_agreement``)
POSITIONS = 32


def token_agreement(logits, ids) -> tuple[float, int, np.ndarray]:
    """``(sum of next-token negative log-likelihoods, tokens, argmax)`` of a causal LM's ``logits``
    [batch, sequence, vocab] on the token ``ids`` [batch, sequence] it read (each position predicts
    the next token), computed in float64 ``POSITIONS`` positions at a time (a whole row of a 49k-word
    vocabulary over 256 positions was 100 MB of float64, and its exponentials as much again)."""
    nll, count, top = 0.0, 0, []
    for row, x in zip(logits, ids):
        row_top = []
        for lo in range(0, len(row) - 1, POSITIONS):
            hi = min(lo + POSITIONS, len(row) - 1)
            z = np.asarray(row[lo:hi], np.float64)
            m = z.max(1)
            lse = m + np.log(np.exp(z - m[:, None]).sum(1))
            nll += float((lse - z[np.arange(hi - lo), x[lo + 1:hi + 1]]).sum())
            row_top.append(z.argmax(1))
        count += len(row) - 1
        top.append(np.concatenate(row_top) if row_top else np.zeros(0, np.int64))
    return nll, count, np.stack(top) if top else np.zeros((0, 0), np.int64)


class Tally:
    """One output's agreement, accumulated run by run: ``add(reference, got, feed)``, then ``value()``
    (in [0, 1]) and ``extra()`` (figures reported beside it: KL, perplexity ratio...)."""

    def __init__(self, metric: str, lm=None):
        self.metric, self.lm = metric, lm
        self.hit = self.total = 0.0
        self.kl = 0.0
        self.nll = [0.0, 0.0]
        self.pooled = ([], [])
        self.blank = None
        self.broken = False       # a run whose output changed shape: no agreement

    def add(self, ref, got, feed=None):
        a, b = np.asarray(ref), np.asarray(got)
        m = self.metric
        if m == "top1":
            if a.shape[1] == 1:
                self.hit += float(np.sum((a[:, 0] > 0.5) == (b[:, 0] > 0.5)))
            else:
                self.hit += float(np.sum(a.argmax(1) == b.argmax(1)))
                pa, pb = _probabilities(a), _probabilities(b)
                self.kl += float(np.sum(pa * (np.log(pa + 1e-12) - np.log(pb + 1e-12))))
            self.total += len(a)
        elif m == "ctc":
            if self.blank is None:
                self.blank = int(np.bincount(a.argmax(-1).ravel(), minlength=a.shape[-1]).argmax())
            for fa, fb in zip(a, b):
                sa, sb = ctc_decode(fa, self.blank), ctc_decode(fb, self.blank)
                self.hit += max(0.0, 1.0 - _edit_distance(sa, sb) / max(len(sa), 1))
                self.total += 1
        elif m == "mask":
            ma, mb = a > MASK_THRESHOLD, b > MASK_THRESHOLD
            self.hit += float(np.count_nonzero(ma & mb))
            self.total += float(np.count_nonzero(ma | mb))
        elif m == "neighbours":
            for side, v in zip(self.pooled, (a, b)):
                v = v.reshape(len(v), -1) if v.ndim == 2 else v.mean(1)
                side.append(np.asarray(v, np.float64))
        elif m == "tokens":
            ids = feed[self.lm.ids]
            ra, rb = token_agreement(a, ids), token_agreement(b, ids)
            self.nll[0] += ra[0]
            self.nll[1] += rb[0]
            self.hit += float(np.count_nonzero(ra[2] == rb[2]))
            self.total += ra[1]

    def value(self) -> float | None:
        """The agreement in [0, 1]; None where it cannot be measured (neighbours of a single sample)."""
        if self.broken:
            return 0.0
        if self.metric == "neighbours":
            return _neighbour_agreement(*self.pooled)
        if self.metric == "mask":
            return self.hit / self.total if self.total else 1.0
        if self.total < MIN_SAMPLES.get(self.metric, 1):
            return None
        return self.hit / self.total

    def extra(self) -> dict:
        if self.metric == "top1" and self.total and self.kl:
            return {"kl": round(self.kl / self.total, 6)}
        if self.metric == "tokens" and self.total:
            return {"perplexity_ratio": round(float(np.exp((self.nll[1] - self.nll[0]) / self.total)), 4),
                    "tokens": int(self.total)}
        if self.metric == "ctc" and self.blank is not None:
            return {"blank": self.blank, "lines": int(self.total)}
        return {}


def _probabilities(x):
    x = np.asarray(x, np.float64)
    if x.min() >= 0 and np.allclose(x.sum(1), 1.0, atol=1e-3):
        return x
    z = np.exp(x - x.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def _neighbour_agreement(ref: list, got: list) -> float | None:
    """Fraction of samples whose nearest other sample (cosine) is the same under both models (None
    for fewer than two samples)."""
    if not ref or sum(len(r) for r in ref) < MIN_SAMPLES["neighbours"]:
        return None
    a, b = np.concatenate(ref), np.concatenate(got)

    def nearest(x):
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)
    return float(np.mean(nearest(a) == nearest(b)))
