"""Hessians for OBSPA: ``H = E[x x^T]`` over a consumer's input columns, from samples, from
batch-norm statistics (a :class:`BlockHessian`: block diagonal plus one rank-1 term) or the
identity, and the bias column that lets compensation update a bias too.  Conventions are those of
``spa.scoring.obs`` (the selection and compensation engines that consume these)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BlockHessian", "HessianAccumulator", "hessian_identity", "hessian_from_bn", "hessian_from_moments",
    "bn_moments", "hessian_from_samples", "conv_patches", "with_bias", "split_bias", "kept_columns", "RHO",
    "Hessians", "SYNTHETIC_RIDGE",
]

#: correlation assumed between two kernel taps of the same channel when H is built without data
#: (neighbouring pixels of a feature map are strongly but not perfectly correlated).
RHO = 0.5

@dataclass
class BlockHessian:
    """``H = blockdiag(blocks[0], ..., blocks[C-1], diag(tail)) + u u^T`` kept in factored form.

    ``blocks`` is ``[C, b, b]`` (one per channel), ``tail`` the diagonal of the ``n_fixed``
    trailing fixed columns (0 for a bias column), ``u`` has ``C*b + n_fixed`` entries.  This is
    the form batch-norm statistics give; keeping it factored lets the greedy run in closed form.
    """

    blocks: np.ndarray
    u: np.ndarray
    tail: np.ndarray

    @property
    def shape(self):
        n = self.blocks.shape[0] * self.blocks.shape[1] + len(self.tail)
        return (n, n)

    def diag(self) -> np.ndarray:
        return np.concatenate([np.einsum("cii->ci", self.blocks).ravel(), self.tail]) + self.u ** 2

    def dense(self) -> np.ndarray:
        """The full ``[in, in]`` matrix (for tests and for the dense engine)."""
        C, b, _ = self.blocks.shape
        n = C * b + len(self.tail)
        H = np.outer(self.u, self.u)
        idx = np.arange(C * b).reshape(C, b)
        H[idx[:, :, None], idx[:, None, :]] += self.blocks
        t = np.arange(C * b, n)
        H[t, t] += self.tail
        return H


def hessian_identity(n_in: int) -> np.ndarray:
    """The control: with ``H = I`` OBS cost is ``1/2 ||W_M||^2`` -- the L2 criterion."""
    return np.eye(int(n_in))


def hessian_from_samples(X: np.ndarray) -> np.ndarray:
    """``X^T X / n`` for sample rows ``X [n, in]`` (float64 accumulation)."""
    X = np.asarray(X, np.float64).reshape(len(X), -1)
    return X.T @ X / max(len(X), 1)


class HessianAccumulator:
    """Running ``E[x x^T]`` (and ``E[x]`` for bias compensation) over batches of sample rows.

    ``add(X)`` takes ``[n, in]`` rows; ``add_conv(x, ...)`` takes an NCHW activation and the
    consumer Conv's geometry and adds its patch rows a few images at a time, so memory stays at
    ``rows x in`` whatever the batch size.
    """

    def __init__(self, n_in: int | None = None):
        self._S = None if n_in is None else np.zeros((n_in, n_in))
        self._s = None if n_in is None else np.zeros(n_in)
        self.n = 0

    def add(self, X: np.ndarray) -> "HessianAccumulator":
        X = np.asarray(X, np.float64)
        X = X.reshape(len(X), -1)
        if self._S is None:
            self._S = np.zeros((X.shape[1], X.shape[1]))
            self._s = np.zeros(X.shape[1])
        self._S += X.T @ X
        self._s += X.sum(0)
        self.n += len(X)
        return self

    def add_conv(self, x, kh, kw, stride=1, pad=0, dilation=1, rows: int = 65536):
        x = np.asarray(x)
        per_image = max(1, conv_patches(x[:1], kh, kw, stride, pad, dilation).shape[0])
        step = max(1, rows // per_image)
        for i in range(0, len(x), step):
            self.add(conv_patches(x[i:i + step], kh, kw, stride, pad, dilation))
        return self

    @property
    def H(self) -> np.ndarray:
        return self._S / max(self.n, 1)

    @property
    def mean(self) -> np.ndarray:
        return self._s / max(self.n, 1)


def _pair(v, n=2):
    if np.isscalar(v):
        return (int(v),) * n
    v = tuple(int(a) for a in v)
    return v


def conv_patches(x, kh, kw, stride=1, pad=0, dilation=1) -> np.ndarray:
    """NCHW activation -> ``[N*OH*OW, C*kh*kw]`` patch rows (im2col), vectorised.

    Column ``c*kh*kw + i*kw + j`` is tap ``(i, j)`` of channel ``c``: the order of
    ``W.reshape(Cout, -1)`` for an ONNX/PyTorch Conv weight ``[Cout, Cin, kh, kw]``, so
    ``patches @ W.reshape(Cout, -1).T`` is the convolution.  ``pad`` is an int, ``(ph, pw)`` or
    ONNX ``pads`` ``(top, left, bottom, right)``; zero padding as in ONNX Conv.
    """
    x = np.asarray(x)
    N, C, Hh, Ww = x.shape
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    p = _pair(pad) if np.isscalar(pad) else tuple(int(a) for a in pad)
    if len(p) == 2:
        p = (p[0], p[1], p[0], p[1])
    pt, pl, pb, pr = p
    if any(p):
        x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    v = np.lib.stride_tricks.sliding_window_view(x, (eh, ew), axis=(2, 3))
    v = v[:, :, ::sh, ::sw, ::dh, ::dw]                       # [N, C, OH, OW, kh, kw]
    OH, OW = v.shape[2], v.shape[3]
    return np.ascontiguousarray(v.transpose(0, 2, 3, 1, 4, 5)).reshape(N * OH * OW, C * kh * kw)


def _norm_cdf(z):
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[float])(np.asarray(z) / math.sqrt(2.0)))


_ACT = {
    "none": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "relu6": lambda z: np.clip(z, 0.0, 6.0),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
    "swish": lambda z: z / (1.0 + np.exp(-z)),
    "hardswish": lambda z: z * np.clip(z + 3.0, 0.0, 6.0) / 6.0,
    "hardsigmoid": lambda z: np.clip(z / 6.0 + 0.5, 0.0, 1.0),
    "tanh": np.tanh,
    "gelu": lambda z: 0.5 * z * (1.0 + np.tanh(0.7978845608028654 * (z + 0.044715 * z ** 3))),
}


def bn_moments(gamma, beta, activation="relu", n_quad: int = 4001):
    """``(E[a], E[a^2])`` per channel of ``a = act(z)``, ``z ~ N(beta, gamma^2)``.

    After an inference-mode BatchNormalization whose running statistics describe its input, the
    normalised value is ~N(0, 1), so the BN output of channel c is ~N(beta_c, gamma_c^2): the
    running mean/var are not needed.  ReLU uses the rectified-Gaussian moments in closed form.
    Other activations (a name in ``_ACT`` or any vectorised callable) are integrated numerically
    on ``n_quad`` equispaced nodes over +-10 sigma with Gaussian weights.  That replaces
    Gauss-Hermite on purpose: GH converges slowly at kinks (ReLU, ReLU6, hardswish): 101 GH nodes
    are 4% off on ReLU's mean and more nodes overflow numpy's weights, while the grid is within
    3e-5 (measured against the closed form).
    """
    m = np.asarray(beta, np.float64).ravel()
    s = np.abs(np.asarray(gamma, np.float64).ravel())
    if activation == "none" or activation is None:
        return m.copy(), m ** 2 + s ** 2
    if activation == "relu":
        safe = np.where(s > 0, s, 1.0)
        z = m / safe
        Phi, phi = _norm_cdf(z), np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
        mu = np.where(s > 0, m * Phi + s * phi, np.maximum(m, 0))
        m2 = np.where(s > 0, (m ** 2 + s ** 2) * Phi + m * s * phi, np.maximum(m, 0) ** 2)
        return mu, m2
    f = _ACT[activation] if isinstance(activation, str) else activation
    x = np.linspace(-10.0, 10.0, int(n_quad))
    w = np.exp(-0.5 * x ** 2)
    w /= w.sum()
    mu, m2 = np.empty_like(m), np.empty_like(m)
    for i in range(0, len(m), 256):                       # bound the [channels, nodes] temporary
        a = f(m[i:i + 256, None] + s[i:i + 256, None] * x[None, :])
        mu[i:i + 256], m2[i:i + 256] = a @ w, (a * a) @ w
    return mu, m2


def hessian_from_moments(mu, second, kh=1, kw=1, rho=RHO, structured=False):
    """``H`` of a consumer reading independent channels with moments ``E[a_c]``, ``E[a_c^2]``.

    Across channels ``E[a_c a_d] = mu_c mu_d``; within a channel the ``kh*kw`` taps of a Conv
    window all have ``E[a^2]`` on the diagonal and ``mu^2 + rho * var`` off it (neighbouring pixels
    are correlated; ``rho`` defaults to :data:`RHO`).  So ``H = blockdiag(var_c R) + u u^T`` with
    ``R = (1-rho) I + rho 11^T`` and ``u = repeat(mu, kh*kw)``.  ``structured=True`` returns that
    factored :class:`BlockHessian` (fast engine), else the dense matrix.
    """
    mu = np.asarray(mu, np.float64).ravel()
    var = np.maximum(np.asarray(second, np.float64).ravel() - mu ** 2, 0.0)
    b = int(kh) * int(kw)
    R = (1.0 - rho) * np.eye(b) + rho * np.ones((b, b)) if b > 1 else np.ones((1, 1))
    Hb = BlockHessian(var[:, None, None] * R[None], np.repeat(mu, b), np.zeros(0))
    return Hb if structured else Hb.dense()


def hessian_from_bn(gamma, beta, mean_unused=None, var_unused=None, activation="relu", kh=1, kw=1,
                    rho=RHO, structured=False):
    """H without data from a BatchNormalization (+ activation) feeding the consumer.

    See :func:`bn_moments` (why running statistics are unused) and :func:`hessian_from_moments`
    (the block structure).  Padding at the borders, pooling and the data's real correlations are
    ignored: this is a prior, not a measurement.
    """
    mu, m2 = bn_moments(gamma, beta, activation)
    return hessian_from_moments(mu, m2, kh, kw, rho, structured)


def with_bias(W, H, mean, bias=None):
    """Augment a consumer with its bias as a fixed input column of constant 1.

    Returns ``(W_aug [out, in+1], H_aug)`` with ``H_aug = [[H, m], [m^T, 1]]`` (``m = E[x]``); pass
    it to the selectors with ``n_fixed=1`` so the bias absorbs the mean of removed channels.  For a
    :class:`BlockHessian` whose ``u`` is the mean this stays factored.  A consumer without a bias
    gets one (zeros before compensation).  :func:`split_bias` undoes it.
    """
    W = np.asarray(W, np.float64)
    mean = np.asarray(mean, np.float64).ravel()
    b = np.zeros(W.shape[0]) if bias is None else np.asarray(bias, np.float64).ravel()
    Wa = np.concatenate([W, b[:, None]], 1)
    if isinstance(H, BlockHessian):
        if not np.allclose(H.u[:len(mean)], mean):
            H = H.dense()
        else:
            return Wa, BlockHessian(H.blocks, np.append(H.u, 1.0), np.append(H.tail, 0.0))
    H = np.asarray(H, np.float64)
    Ha = np.empty((len(H) + 1, len(H) + 1))
    Ha[:-1, :-1] = H
    Ha[-1, :-1] = Ha[:-1, -1] = mean
    Ha[-1, -1] = 1.0
    return Wa, Ha


def split_bias(W_aug):
    """``(W [out, in], bias [out])`` from an augmented weight."""
    return W_aug[:, :-1], W_aug[:, -1]


def kept_columns(removed, n_channels, block=1) -> np.ndarray:
    """Column indices of the kept channels (for slicing ``W_new`` / building ``X_kept``)."""
    keep = np.setdiff1d(np.arange(n_channels), np.asarray(removed, int))
    return (keep[:, None] * block + np.arange(block)).ravel()


#: synthetic Hessians are a guess, not a measurement: they are shrunk towards the identity by adding
#: this multiple of their mean diagonal (on top of DAMP).  Measured (docs/obspa.md): with 0.01 the
#: compensation trusts the guess too much and loses to l2 on the PP-OCR classifier; 1.0 beats l2 on
#: the digits CNNs, the PP-OCR classifier and YOLOv8n.  Calibration data and BN priors keep DAMP.
SYNTHETIC_RIDGE = 1.0


@dataclass
class Hessians:
    """``(H, mean)`` per consumer key, which source gave each, and the ridge already added to each
    diagonal (synthetic Hessians are shrunk towards the identity: ``SYNTHETIC_RIDGE``)."""
    H: dict = field(default_factory=dict)
    mean: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    desc: str = ""
    ridge: dict = field(default_factory=dict)

    def shrink(self, key) -> None:
        """Add ``SYNTHETIC_RIDGE`` x the mean diagonal to ``H[key]``'s diagonal, and record it."""
        H = self.H[key]
        self.ridge[key] = SYNTHETIC_RIDGE * max(float(np.mean(np.diag(H))), 1e-12)
        H[np.diag_indices_from(H)] += self.ridge[key]

    def second_moments(self, key) -> np.ndarray:
        """``E[x_j^2]`` of every column, as measured (without the ridge)."""
        return np.diag(self.H[key]) - self.ridge.get(key, 0.0)
