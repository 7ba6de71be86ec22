"""OBSPA numerical core: Optimal Brain Surgeon channel selection and weight compensation.

Everything here is plain numpy over plain arrays; the pipeline decides which consumer weights and
which Hessians a group gets (see ``docs/obspa.md``); the Hessians are built in
``spa.scoring.hessians``.

Conventions
-----------
* ``W`` is a consumer weight as a matrix ``[out, in]`` that multiplies a column vector of inputs:
  a Gemm/MatMul weight in ``y = W x`` orientation (transpose a MatMul ``B [in, out]``), a Conv
  weight ``[Cout, Cin, kh, kw]`` reshaped to ``[Cout, Cin*kh*kw]``.
* The input columns are grouped into *channels* of ``block`` consecutive columns (a Conv input
  channel ``c`` is the block ``c*kh*kw:(c+1)*kh*kw``).  Optionally the last ``n_fixed`` columns are
  never removable -- that is how a bias is compensated too (see :func:`with_bias`).
* ``H = E[x x^T]`` over the input columns (``[in, in]``).  The loss of replacing ``W`` by ``W'``
  is ``E = 1/2 tr((W - W') H (W - W')^T)`` -- half the mean squared output error, the OBS
  convention -- and every cost returned here is in those units, so costs of different consumers
  of a group simply add.

Removing channel set ``M`` costs ``dE = 1/2 tr(W_M ([H^-1]_MM)^-1 W_M^T)`` and is compensated by
``dW = -W_M ([H^-1]_MM)^-1 H^-1[M,:]``; after it ``H^-1`` is downdated to the inverse of the kept
sub-matrix.  Greedy selection repeats that (Optimal Brain Compression / ZipLM).  Sequential OBS
updates compose exactly: the final weights are the least-squares optimum for the final kept set
under the (damped) H, whatever the order of removal.

Two engines share that maths:

* *dense* -- any H.  Costs of all remaining channels are evaluated at once from a stack of the
  ``[b, b]`` diagonal blocks of the current ``H^-1``; a step removes ``k`` channels jointly
  (``k = ceil(n_remove / max_steps)``, exact one-at-a-time greedy when ``max_steps >= n_remove``)
  and downdates ``H^-1`` once; the kept part of ``H^-1`` is a leading slice (removed channels
  are swapped to the end), so it shrinks as it goes without an ``[n, n]`` copy per step.
* *structured* -- ``H = blockdiag(B_c) + u u^T`` (a :class:`BlockHessian`), which is exactly what
  batch-norm statistics give (channels independent, one rank-1 term from the means, optionally
  the bias column).  Then ``H_KK^-1`` of every kept set is known in closed form (Sherman-Morrison)
  and the exact one-channel-per-step greedy costs ``O(out * C)`` per step without ever forming an
  ``[in, in]`` matrix.

Failure handling: the damped H is inverted blockwise with a Cholesky check on every leaf; a
failure (or a non-finite result) multiplies the damping by 10 and retries, and after that the
diagonal of H is used.  Singular ``[b, b]`` blocks during the greedy use a pseudo-inverse.
Nothing here raises on a bad H.
"""
from __future__ import annotations

import math

import numpy as np

from .hessians import BlockHessian, hessian_from_bn

__all__ = ["obs_select", "obs_group", "obs_scores", "damped_inverse"]

_LEAF = 768          # recursive inverse: blocks at most this size go to LAPACK
_ROWS = 1024         # row chunk of the in-place downdate (bounds the temporary to ROWS x n)


# --------------------------------------------------------------------------------------------
# inverses
# --------------------------------------------------------------------------------------------

def _spd_inv(H):
    """Inverse of an SPD matrix by recursive Schur complements (all heavy work is GEMM).

    numpy exposes no ``potri``; ``np.linalg.inv`` (LU) runs at half the GEMM rate on 2 cores, and
    an extra full Cholesky just to test definiteness would cost as much again.  Here every leaf
    gets a (cheap) Cholesky, which together checks that H is positive definite.
    """
    n = H.shape[0]
    if n <= _LEAF:
        np.linalg.cholesky(H)                       # raises LinAlgError if not SPD
        return np.linalg.inv(H)
    h = n // 2
    B = H[:h, h:]
    Ai = _spd_inv(H[:h, :h])
    AiB = Ai @ B
    Si = _spd_inv(H[h:, h:] - B.T @ AiB)
    X = AiB @ Si
    out = np.empty_like(H)
    out[:h, :h] = Ai + X @ AiB.T
    out[:h, h:] = -X
    out[h:, :h] = -X.T
    out[h:, h:] = Si
    return out


def _damp_base(d):
    m = float(np.mean(d)) if len(d) else 1.0
    return m if np.isfinite(m) and m > 0 else 1.0


def damped_inverse(H, damp=0.01, dtype=np.float64, retries=6):
    """``(H + lam I)^-1`` with ``lam = damp * mean(diag H)``; returns ``(Hinv, lam, how)``.

    On a failed Cholesky / non-finite result the damping grows x10 (at least to 1e-8 of the mean
    diagonal) up to ``retries`` times; then the inverse of the damped diagonal is used
    (``how = "diagonal"``).  Never raises.
    """
    H = np.asarray(H, np.float64)
    H = 0.5 * (H + H.T)
    d = np.diag(H).copy()
    base = _damp_base(d)
    lam = max(float(damp), 0.0) * base
    for _ in range(retries + 1):
        try:
            Hd = H.astype(dtype, copy=True)
            Hd[np.diag_indices_from(Hd)] += lam
            Hi = _spd_inv(Hd)
            if np.all(np.isfinite(Hi)):
                return Hi, lam, "full"
        except np.linalg.LinAlgError:
            pass
        lam = max(lam * 10.0, 1e-8 * base)
    dd = np.where(np.isfinite(d), d, 0.0) + lam
    dd = np.where(dd > 0, dd, base)
    return np.diag(1.0 / dd).astype(dtype), lam, "diagonal"


def _inv_stack(A):
    """Batched inverse of small ``[n, b, b]`` blocks; pseudo-inverse where singular."""
    try:
        out = np.linalg.inv(A)
        if np.all(np.isfinite(out)):
            return out
    except np.linalg.LinAlgError:
        pass
    return np.linalg.pinv(np.where(np.isfinite(A), A, 0.0))


# --------------------------------------------------------------------------------------------
# engines: one state per consumer (or per stack of consumers sharing an H)
# --------------------------------------------------------------------------------------------

class _Dense:
    """Current compensated ``W`` and ``H^-1`` of the kept columns, kept as a *leading slice*.

    Storage order is ``[fixed columns, channel blocks in the order of obs_group's ``order``]``.
    A step swaps the chosen channels to the end of the alive region (O(n b) per channel) and
    downdates ``Hinv[:nk, :nk]`` in place: no ``[n, n]`` copy per step (a fancy-index compaction
    of a 4608^2 matrix costs ~0.5 s, more than the downdate itself).
    """

    def __init__(self, W, H, block, n_fixed, damp, dtype):
        self.b, self.nf = int(block), int(n_fixed)
        W = np.asarray(W)
        n = W.shape[1]
        self.C = (n - self.nf) // self.b
        if self.nf:
            perm = np.concatenate([np.arange(n - self.nf, n), np.arange(n - self.nf)])
            W, H = W[:, perm], np.asarray(H)[np.ix_(perm, perm)]
        self.Hinv, self.lam, self.how = damped_inverse(H, damp, dtype)
        self.W = np.array(W, dtype=dtype)
        self.na = self.C

    def costs(self, ids):
        """Single-removal cost of every alive channel (storage order), vectorised over channels."""
        b, na, nf = self.b, self.na, self.nf
        if na == 0:
            return np.zeros(0)
        Wa = self.W[:, nf:nf + na * b]
        if b == 1:
            d = np.diagonal(self.Hinv)[nf:nf + na]
            d = np.where(d > 1e-300, d, 1e-300)
            return 0.5 * np.einsum("ij,ij->j", Wa, Wa) / d
        idx = nf + np.arange(na * b).reshape(na, b)
        Q = _inv_stack(self.Hinv[idx[:, :, None], idx[:, None, :]])
        Wb = Wa.reshape(-1, na, b)
        G = np.matmul(Wb.transpose(1, 2, 0), Wb.transpose(1, 0, 2))      # [na, b, b] = W_c^T W_c
        return 0.5 * np.einsum("nij,nij->n", G, Q)

    def _swap(self, p, q):
        i = self.nf + p * self.b + np.arange(self.b)
        j = self.nf + q * self.b + np.arange(self.b)
        ij, ji = np.concatenate([i, j]), np.concatenate([j, i])
        self.Hinv[ij] = self.Hinv[ji]
        self.Hinv[:, ij] = self.Hinv[:, ji]
        self.W[:, ij] = self.W[:, ji]

    def remove(self, ids, swaps, k):
        """Swap the chosen channels to the last ``k`` alive slots, remove them jointly; returns
        the exact joint cost."""
        for p, q in swaps:
            self._swap(p, q)
        b = self.b
        self.na -= k
        nk = self.nf + self.na * b
        m = k * b
        Hm = self.Hinv[nk:nk + m, nk:nk + m]
        Sinv = _inv_stack(0.5 * (Hm + Hm.T)[None])[0]
        Wm = self.W[:, nk:nk + m]
        WS = Wm @ Sinv
        cost = 0.5 * float(np.einsum("ij,ij->", WS, Wm))
        HkM = self.Hinv[:nk, nk:nk + m]                                     # [nk, m]
        MkT = np.ascontiguousarray(HkM.T)
        self.W[:, :nk] -= WS @ MkT
        A = HkM @ Sinv
        for r in range(0, nk, _ROWS):
            e = min(r + _ROWS, nk)
            self.Hinv[r:e, :nk] -= A[r:e] @ MkT
        return cost

    def final_W(self, order):
        """``(W of the alive channels in storage order, W of the fixed columns)``."""
        nf, b = self.nf, self.b
        return self.W[:, nf:nf + self.na * b], self.W[:, :nf]


class _Block:
    """Closed-form engine for ``H = blockdiag(B_c) + u u^T`` (see module docstring).

    With ``B' = B + lam I``, ``y_c = B'_c^-1 u_c``, ``s_c = u_c^T y_c``, kept set K
    (``alpha = 1 + sum_K s``) and ``a = sum_{c removed} W_c u_c``:
    compensated ``W'_K = W_K + a y_K^T / alpha``; single-removal cost of kept c is
    ``1/2 [T_c + (|v_c|^2 + 2 a.v_c + |a|^2 s_c / alpha) / (alpha - s_c)]`` with
    ``T_c = tr(B'_c W_c^T W_c)``, ``v_c = W_c u_c``; total loss ``1/2 [sum_R T_c + |a|^2 / alpha]``.
    """

    def __init__(self, W, Hb: BlockHessian, block, n_fixed, damp):
        C, b, _ = Hb.blocks.shape
        if b != block or len(Hb.tail) != n_fixed:
            raise ValueError("BlockHessian does not match block / n_fixed")
        self.b, self.nf, self.C = b, n_fixed, C
        self.lam = max(float(damp), 0.0) * _damp_base(Hb.diag())
        self.how = "structured"
        Bd = Hb.blocks + self.lam * np.eye(b)[None]
        Bi = _inv_stack(Bd)
        u = np.asarray(Hb.u, np.float64)
        uc = u[:C * b].reshape(C, b)
        self.y = np.einsum("cij,cj->ci", Bi, uc)                            # [C, b]
        self.s = np.einsum("ci,ci->c", uc, self.y)
        td = Hb.tail + self.lam
        td = np.where(td > 0, td, 1.0)
        self.yt = u[C * b:] / td
        self.st = float(u[C * b:] @ self.yt)
        self.W0 = np.asarray(W, np.float64)
        Wb = self.W0[:, :C * b].reshape(-1, C, b)
        self.T = np.einsum("ocb,cbd,ocd->c", Wb, Bd, Wb)
        self.V = np.einsum("ocb,cb->oc", Wb, uc)                            # [out, C]
        self.v2 = np.einsum("oc,oc->c", self.V, self.V)
        self.alive = np.ones(C, bool)
        self.a = np.zeros(self.W0.shape[0])
        self.av = np.zeros(C)                 # a . v_c for every channel, kept up to date
        self.aa = 0.0                         # |a|^2
        self.G = None                         # V^T V, built on the first removal
        self.alpha = 1.0 + float(self.s.sum()) + self.st
        self.TR = 0.0

    def loss(self):
        return 0.5 * (self.TR + self.aa / self.alpha)

    def costs(self, idx):
        s = self.s[idx]
        beta = np.maximum(self.alpha - s, 1e-300)
        return 0.5 * (self.T[idx] + (self.v2[idx] + 2 * self.av[idx] + self.aa * s / self.alpha) / beta)

    def remove(self, ch, swaps, k):
        # a.v_c and |a|^2 are updated from the Gram matrix V^T V (one GEMM, out*C^2) so that a
        # step costs O(C): a matvec per step is memory-bound and n_remove ~ C/2 of them cost more.
        if self.G is None:
            self.G = self.V.T @ self.V
        before = self.loss()
        g = self.G[ch].sum(0)
        self.aa += 2 * float(self.av[ch].sum()) + float(g[ch].sum())
        self.av += g
        self.a = self.a + self.V[:, ch].sum(1)
        self.alpha -= float(self.s[ch].sum())
        self.TR += float(self.T[ch].sum())
        self.alive[ch] = False
        return self.loss() - before

    def final_W(self, order):
        """Compensated weights: alive channels in ``order``, and the fixed tail."""
        b, C = self.b, self.C
        keep = np.asarray(order)
        Wk = self.W0[:, :C * b].reshape(-1, C, b)[:, keep].reshape(len(self.W0), -1)
        Wk = Wk + np.outer(self.a, self.y[keep].ravel()) / self.alpha
        Wt = self.W0[:, C * b:] + np.outer(self.a, self.yt) / self.alpha
        return Wk, Wt


def _states(consumers, damp, dtype):
    """One engine per consumer; consumers given the *same* H object (and block) are stacked into
    one engine (their W rows concatenated): costs add and the downdate is shared."""
    norm = []
    for c in consumers:
        W, H, block = c[0], c[1], int(c[2])
        nf = int(c[3]) if len(c) > 3 else 0
        W = np.asarray(W)
        if W.ndim != 2:
            raise ValueError("consumer W must be a matrix [out, in] (reshape Conv weights)")
        if H.shape[0] != W.shape[1] or (W.shape[1] - nf) % block:
            raise ValueError(f"W {W.shape}, H {H.shape}, block {block}, n_fixed {nf} do not agree")
        norm.append((W, H, block, nf))
    C = {(W.shape[1] - nf) // b for W, H, b, nf in norm}
    if len(C) != 1:
        raise ValueError(f"consumers disagree on the channel count: {sorted(C)}")
    keyed = {}
    for i, (W, H, b, nf) in enumerate(norm):
        keyed.setdefault((id(H), b, nf), []).append(i)
    states, where = [], [None] * len(norm)
    for (_, b, nf), members in keyed.items():
        H = norm[members[0]][1]
        Ws = [norm[i][0] for i in members]
        W = np.concatenate(Ws, 0) if len(Ws) > 1 else Ws[0]
        st = _Block(W, H, b, nf, damp) if isinstance(H, BlockHessian) else _Dense(W, H, b, nf, damp, dtype)
        off = 0
        for i, Wi in zip(members, Ws):
            where[i] = (len(states), off, off + len(Wi))
            off += len(Wi)
        states.append(st)
    return states, where, C.pop()


def _scatter(st, lo, hi, alive, n_in, C, b):
    """Full-width ``W_new`` (removed columns exactly 0) from a state's final weights."""
    Wk, Wt = st.final_W(alive)
    out = np.zeros((hi - lo, n_in))
    cols = (np.asarray(alive, int)[:, None] * b + np.arange(b)).ravel()
    out[:, cols] = Wk[lo:hi]
    out[:, C * b:] = Wt[lo:hi]
    return out


# --------------------------------------------------------------------------------------------
# public selectors
# --------------------------------------------------------------------------------------------

def obs_group(consumers, n_remove, damp=0.01, max_steps=32, dtype=np.float64, return_info=False, chosen=None):
    """Greedy OBS removal of ``n_remove`` channels read by several consumers (or, with ``chosen``,
    removal of exactly those channel ids, jointly: the compensation alone).

    ``consumers``: list of ``(W [out, in], H, block)`` or ``(W, H, block, n_fixed)``; every
    consumer must have the same channel count ``(in - n_fixed) / block``.  ``H`` is an ndarray or
    a :class:`BlockHessian` (closed-form engine).  The cost of a channel set is the sum over
    consumers.  The dense engine removes ``k = ceil(n_remove / max_steps)`` channels per step
    (cheapest ``k`` by summed single-removal cost, then a joint exact removal and one downdate);
    ``max_steps=None`` is the exact one-at-a-time greedy.  The structured engine is always exact
    one-at-a-time (it is cheap); if consumers mix engines, both follow the dense step size.

    ``chosen`` (channel ids) skips the selection: those channels go in one joint step, and the kept
    weights get the least-squares compensation for exactly that set (another criterion chose it).

    Returns ``(removed, W_news)``: channel ids in removal order and, per consumer, the compensated
    weight in the original ``[out, in]`` layout with the removed columns exactly zero.  With
    ``return_info`` a third item ``{"cost", "step_costs", "first_costs", "lam", "how"}`` is added
    (``first_costs``: every channel's single-removal cost before anything was removed).
    """
    states, where, C = _states(consumers, damp, dtype)
    given = None if chosen is None else np.unique(np.asarray(chosen, np.int64))
    if given is not None:
        if len(given) and not (0 <= given[0] and given[-1] < C):
            raise ValueError(f"chosen channels outside [0, {C})")
        n_remove = len(given)
    n_remove = int(n_remove)
    if not 0 <= n_remove <= C:
        raise ValueError(f"n_remove={n_remove} outside [0, {C}]")
    all_block = all(isinstance(s, _Block) for s in states)
    k = 1 if (all_block or max_steps is None) else max(1, math.ceil(n_remove / max(int(max_steps), 1)))
    if given is not None and not all_block:
        k = max(n_remove, 1)                # one joint removal of the given set
    order = np.arange(C)                    # channel ids by storage position; alive = order[:na]
    na = C
    removed, step_costs, first_costs = [], [], None
    while len(removed) < n_remove:
        kk = min(k, n_remove - len(removed))
        cost = sum(s.costs(order[:na]) for s in states)
        cost = np.where(np.isfinite(cost), cost, np.inf)
        if first_costs is None:
            first_costs = cost.copy()
        if given is not None:               # the given set, cheapest first (the structured engine goes one by one)
            left = np.isin(order[:na], given)
            cost = np.where(left, cost, np.inf)
        pos = np.argpartition(cost, kk - 1)[:kk] if kk < na else np.arange(na)
        pos = pos[np.argsort(cost[pos], kind="stable")]
        chosen = order[pos].copy()
        # swap plan: chosen positions outside the last kk alive slots trade places with
        # non-chosen positions inside them (the same plan for every dense engine)
        tail = np.arange(na - kk, na)
        swaps = list(zip(np.setdiff1d(pos, tail).tolist(), np.setdiff1d(tail, pos).tolist()))
        for p, q in swaps:
            order[p], order[q] = order[q], order[p]
        step_costs.append(sum(s.remove(chosen, swaps, kk) for s in states))
        removed.extend(chosen.tolist())
        na -= kk
    removed = np.asarray(removed, np.int64)
    alive = order[:na]
    W_news = []
    for (si, lo, hi), c in zip(where, consumers):
        st = states[si]
        W_news.append(_scatter(st, lo, hi, alive, np.asarray(c[0]).shape[1], C, st.b))
    if return_info:
        if first_costs is None:
            first_costs = sum(s.costs(np.arange(C)) for s in states) if C else np.zeros(0)
        info = {"cost": float(sum(step_costs)), "step_costs": step_costs, "first_costs": first_costs,
                "lam": [s.lam for s in states], "how": [s.how for s in states]}
        return removed, W_news, info
    return removed, W_news


def obs_select(W, H, n_remove, block=1, damp=0.01, n_fixed=0, max_steps=32, dtype=np.float64):
    """Single-consumer OBS: ``(removed channel ids in order, total cost, W_new [out, in])``.

    ``cost`` is the exact loss ``1/2 tr(dW H_damped dW^T)`` of the final compensated weights.
    See :func:`obs_group` for the arguments.
    """
    removed, Ws, info = obs_group([(W, H, block, n_fixed)], n_remove, damp, max_steps, dtype, True)
    return removed, info["cost"], Ws[0]


def obs_scores(consumers, damp=0.01, dtype=np.float64) -> np.ndarray:
    """Per-channel single-removal OBS cost summed over consumers (higher = keep).

    A plain criterion for the planner (global ranking across groups is meaningful because costs
    are in output-error units); it ignores interactions between removed channels and does not
    compensate -- :func:`obs_group` does both.
    """
    states, _, C = _states(consumers, damp, dtype)
    return sum(s.costs(np.arange(C)) for s in states)


# --------------------------------------------------------------------------------------------
# benchmark (not a test): python -m spa.scoring.obs CASE  -- prints seconds and peak RSS
# --------------------------------------------------------------------------------------------

def _resnet50_groups():
    """(channels, [(out, kh*kw), ...]) for every prunable group of torchvision resnet50."""
    groups = [(64, [(64, 1), (256, 1)])]                       # stem -> layer1.0 conv1 + downsample
    stages = [(3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048)]
    for si, (n, w, o) in enumerate(stages):
        for _ in range(n):
            groups += [(w, [(w, 9)]), (w, [(o, 1)])]           # conv1 -> conv2, conv2 -> conv3
        cons = [(w, 1)] * (n - 1)                              # residual stream -> later conv1s
        if si + 1 < len(stages):
            nw, no = stages[si + 1][1], stages[si + 1][2]
            cons += [(nw, 1), (no, 1)]                         # next stage conv1 + downsample
        else:
            cons += [(1000, 1)]                                # fc
        groups.append((o, cons))
    return groups


def _bench(case, max_steps=32, dtype="float64"):
    import resource
    import sys
    import time
    rng = np.random.default_rng(0)

    def bn_h(C, kk, structured):
        return hessian_from_bn(rng.uniform(0.2, 2, C), rng.normal(0, 1, C), kh=int(kk ** 0.5),
                               kw=int(kk ** 0.5), structured=structured)

    def data_h(n):                                             # a dense, correlated, full-rank H
        A = rng.standard_normal((n, n)) / np.sqrt(n)
        return A @ A.T + 0.1 * np.eye(n)

    def group(C, cons, source):
        if source == "data":
            Hs = {kk: data_h(C * kk) for kk in {kk for _, kk in cons}}
        else:
            Hs = {kk: bn_h(C, kk, source == "bn") for kk in {kk for _, kk in cons}}
        return [(rng.standard_normal((o, C * kk)), Hs[kk], kk) for o, kk in cons], C // 2

    source = case.split(":")[1]
    if case.startswith("conv512"):
        setups = [group(512, [(512, 9)], source)]
    elif case.startswith("res2048"):
        setups = [group(2048, [(512, 1), (512, 1), (1000, 1)], source)]
    else:
        setups = [group(C, cons, source) for C, cons in _resnet50_groups()]
    t = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for cons, n_remove in setups:
        obs_group(cons, n_remove, max_steps=max_steps, dtype=np.dtype(dtype))
    dt = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    load = open("/proc/loadavg").read().split()[0] if sys.platform == "linux" else "?"
    print(f"{case:16s} max_steps={max_steps} {dtype}  {dt:7.2f} s wall {cpu:7.2f} s cpu  "
          f"peak RSS {rss:5.2f} GiB  (load {load})")


if __name__ == "__main__":                                     # pragma: no cover
    import sys
    _bench(sys.argv[1], None if len(sys.argv) < 3 or sys.argv[2] == "none" else int(sys.argv[2]),
           sys.argv[3] if len(sys.argv) > 3 else "float64")
