"""OBSPA numerical core (spa/scoring/obs.py, spa/scoring/hessians.py): constructed layers, exact expectations, seeded."""
import numpy as np
import pytest

from spa.scoring.hessians import (BlockHessian, HessianAccumulator, bn_moments, conv_patches, hessian_from_bn,
                                  hessian_from_samples, hessian_identity, kept_columns, split_bias, with_bias)
from spa.scoring.obs import damped_inverse, obs_group, obs_scores, obs_select


def correlated(rng, n, d):
    """Samples with a non-trivial covariance and a non-zero mean (like post-ReLU activations)."""
    Z = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    return Z + rng.uniform(0, 1, d)


def out_err(W, W_new, X):
    return np.linalg.norm(X @ W.T - X @ W_new.T) / np.linalg.norm(X @ W.T)


# (a) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [1, 9])
def test_linear_combination_removed_first_and_exactly(block):
    rng = np.random.default_rng(1)
    C, n, j = 10, 600, 4
    X = correlated(rng, n, C * block)
    # channel j = combination of channels 0 and 1 -- which makes each of {0, 1, j} a combination
    # of the other two: those three, and only those, are free to remove
    support = np.arange(2 * block)
    X[:, j * block:(j + 1) * block] = X[:, support] @ rng.standard_normal((len(support), block))
    W = rng.standard_normal((6, C * block))
    H = hessian_from_samples(X)
    removed, cost, W_new = obs_select(W, H, 1, block=block, damp=1e-10)
    r = int(removed[0])
    assert r in (0, 1, j)
    assert np.all(W_new[:, r * block:(r + 1) * block] == 0)
    assert out_err(W, W_new, X) < 1e-6
    scores = obs_scores([(W, H, block)], damp=1e-10)
    rest = np.delete(scores, [0, 1, j]).min()
    assert cost < 1e-6 * rest and scores[j] < 1e-6 * rest          # zero up to the 1e-10 damping
    # forcing j out (the others kept) is exact too: compensate only for j
    keep = np.delete(np.arange(C * block), np.arange(j * block, (j + 1) * block))
    Wk = W @ H[:, keep] @ np.linalg.pinv(H[np.ix_(keep, keep)])
    assert np.linalg.norm(X[:, keep] @ Wk.T - X @ W.T) / np.linalg.norm(X @ W.T) < 1e-6


# (b) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block", [1, 9])
@pytest.mark.parametrize("max_steps", [None, 3])
def test_compensation_never_worse_than_dropping(seed, block, max_steps):
    rng = np.random.default_rng(seed)
    C = 12
    X = correlated(rng, 500, C * block)
    W = rng.standard_normal((8, C * block))
    H = hessian_from_samples(X)
    n_remove = int(rng.integers(1, C))
    removed, cost, W_new = obs_select(W, H, n_remove, block=block, max_steps=max_steps)
    assert len(set(removed.tolist())) == n_remove
    dropped = W.copy()
    cols = np.setdiff1d(np.arange(C * block), kept_columns(removed, C, block))
    dropped[:, cols] = 0
    assert np.all(W_new[:, cols] == 0)
    assert out_err(W, W_new, X) <= out_err(W, dropped, X) + 1e-12
    # the reported cost is the exact (damped) loss of the returned weights
    lam = 0.01 * np.mean(np.diag(H))
    dW = W - W_new
    assert cost == pytest.approx(0.5 * np.trace(dW @ (H + lam * np.eye(len(H))) @ dW.T), rel=1e-8)


def test_batched_steps_close_to_exact_greedy():
    rng = np.random.default_rng(7)
    C, b = 32, 4
    X = correlated(rng, 800, C * b)
    W = rng.standard_normal((16, C * b))
    H = hessian_from_samples(X)
    _, exact, _ = obs_select(W, H, 16, block=b, max_steps=None)
    _, batched, _ = obs_select(W, H, 16, block=b, max_steps=4)
    assert exact <= batched * (1 + 1e-9)
    assert batched < 1.5 * exact


# (c) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [1, 9])
def test_identity_hessian_is_l2(block):
    rng = np.random.default_rng(3)
    C = 15
    W = rng.standard_normal((5, C * block)) * rng.uniform(0.1, 2, C * block)
    norms = np.linalg.norm(W.reshape(5, C, block), axis=(0, 2))
    H = hessian_identity(C * block)
    removed, _, W_new = obs_select(W, H, C - 1, block=block, max_steps=None)
    assert removed.tolist() == np.argsort(norms)[:C - 1].tolist()
    removed_b, _, _ = obs_select(W, H, C - 1, block=block)          # batched steps too
    assert removed_b.tolist() == removed.tolist()
    keep = kept_columns(removed, C, block)
    np.testing.assert_allclose(W_new[:, keep], W[:, keep])          # nothing to compensate with
    scores = obs_scores([(W, H, block)])
    np.testing.assert_allclose(scores / scores.max(), norms ** 2 / (norms ** 2).max(), rtol=1e-12)


# (d) ------------------------------------------------------------------------------------------
def test_multi_consumer_costs_add():
    rng = np.random.default_rng(4)
    C = 16
    X1 = correlated(rng, 400, C * 9)
    X2 = correlated(rng, 400, C)
    W1, W2, W3 = rng.standard_normal((8, C * 9)), rng.standard_normal((5, C)), rng.standard_normal((3, C))
    H1, H2 = hessian_from_samples(X1), hessian_from_samples(X2)
    cons = [(W1, H1, 9), (W2, H2, 1), (W3, H2, 1)]          # W2, W3 share H2: stacked engine
    s = obs_scores(cons)
    parts = [obs_scores([c]) for c in cons]
    np.testing.assert_allclose(s, sum(parts), rtol=1e-10)
    removed, Ws, info = obs_group(cons, 6, max_steps=None, return_info=True)
    assert removed[0] == np.argmin(s)
    # the group cost is the sum of the consumers' exact losses
    total = 0.0
    for (W, H, _), Wn in zip(cons, Ws):
        lam = 0.01 * np.mean(np.diag(H))
        dW = W - Wn
        total += 0.5 * np.trace(dW @ (H + lam * np.eye(len(H))) @ dW.T)
    assert info["cost"] == pytest.approx(total, rel=1e-8)
    # sharing the H object is only an optimisation: same result with a copy
    removed2, Ws2 = obs_group([(W1, H1, 9), (W2, H2, 1), (W3, H2.copy(), 1)], 6, max_steps=None)
    assert removed2.tolist() == removed.tolist()
    for a, b in zip(Ws, Ws2):
        np.testing.assert_allclose(a, b, atol=1e-10)


# (e) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,stride,pad,dil", [(3, 1, 1, 1), (3, 2, (1, 0, 2, 1), 1), (1, 2, 0, 1),
                                              (3, 1, 2, 2), ((2, 3), (2, 1), (0, 1), (1, 2))])
def test_conv_patches_is_convolution(k, stride, pad, dil):
    rng = np.random.default_rng(5)
    kh, kw = (k, k) if np.isscalar(k) else k
    sh, sw = (stride, stride) if np.isscalar(stride) else stride
    dh, dw = (dil, dil) if np.isscalar(dil) else dil
    p = (pad,) * 4 if np.isscalar(pad) else (pad * 2 if len(pad) == 2 else pad)
    x = rng.standard_normal((2, 3, 9, 8))
    Wc = rng.standard_normal((4, 3, kh, kw))
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
    OH = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    OW = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    ref = np.zeros((2, 4, OH, OW))
    for i in range(kh):
        for j in range(kw):
            win = xp[:, :, i * dh:i * dh + sh * (OH - 1) + 1:sh, j * dw:j * dw + sw * (OW - 1) + 1:sw]
            ref += np.einsum("nchw,oc->nohw", win, Wc[:, :, i, j])
    P = conv_patches(x, kh, kw, stride, pad, dil)
    got = (P @ Wc.reshape(4, -1).T).reshape(2, OH, OW, 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    acc = HessianAccumulator().add_conv(x, kh, kw, stride, pad, dil, rows=7)
    np.testing.assert_allclose(acc.H, hessian_from_samples(P), atol=1e-12)
    np.testing.assert_allclose(acc.mean, P.mean(0), atol=1e-12)


# (f) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["relu", "none", "silu", "hardswish", "sigmoid"])
def test_bn_moments_match_monte_carlo(act):
    rng = np.random.default_rng(6)
    gamma = rng.uniform(0.3, 2.0, 6) * rng.choice([-1, 1], 6)
    beta = rng.normal(0, 1, 6)
    z = beta + np.abs(gamma) * rng.standard_normal((400_000, 6))
    f = {"relu": lambda t: np.maximum(t, 0), "none": lambda t: t, "silu": lambda t: t / (1 + np.exp(-t)),
         "hardswish": lambda t: t * np.clip(t + 3, 0, 6) / 6, "sigmoid": lambda t: 1 / (1 + np.exp(-t))}[act]
    a = f(z)
    mu, m2 = bn_moments(gamma, beta, act)
    np.testing.assert_allclose(m2, (a ** 2).mean(0), rtol=0.02)
    np.testing.assert_allclose(mu, a.mean(0), rtol=0.02, atol=0.01)
    H = hessian_from_bn(gamma, beta, None, None, act)
    np.testing.assert_allclose(np.diag(H), m2)
    np.testing.assert_allclose(H[0, 1], mu[0] * mu[1])
    if act == "relu":                                             # closed form == quadrature
        mq, m2q = bn_moments(gamma, beta, lambda t: np.maximum(t, 0))
        np.testing.assert_allclose(mq, mu, rtol=1e-4)
        np.testing.assert_allclose(m2q, m2, rtol=1e-4)


def test_bn_hessian_conv_blocks():
    gamma, beta = np.array([1.0, 2.0]), np.array([0.5, -1.0])
    mu, m2 = bn_moments(gamma, beta, "relu")
    var = m2 - mu ** 2
    H = hessian_from_bn(gamma, beta, activation="relu", kh=3, kw=3, rho=0.5)
    assert H.shape == (18, 18)
    np.testing.assert_allclose(np.diag(H), np.repeat(m2, 9))
    assert H[0, 1] == pytest.approx(mu[0] ** 2 + 0.5 * var[0])
    assert H[0, 9] == pytest.approx(mu[0] * mu[1])
    np.testing.assert_allclose(H, H.T)
    assert np.linalg.eigvalsh(H).min() > 0


# (g) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rank_deficient", "zero", "nan", "indefinite"])
def test_singular_hessian_does_not_crash(kind):
    rng = np.random.default_rng(8)
    C, b = 6, 4
    if kind == "rank_deficient":
        X = rng.standard_normal((3, C * b))
        H = hessian_from_samples(X)
    elif kind == "zero":
        H = np.zeros((C * b, C * b))
    elif kind == "nan":
        H = hessian_from_samples(rng.standard_normal((50, C * b)))
        H[2, 2] = np.nan
    else:
        H = -np.eye(C * b)
    W = rng.standard_normal((5, C * b))
    removed, cost, W_new = obs_select(W, H, 3, block=b, damp=0.0)
    assert len(set(removed.tolist())) == 3 and np.all(np.isfinite(W_new)) and np.isfinite(cost)
    _, lam, how = damped_inverse(H, 0.0)
    assert how in ("full", "diagonal")


# structured engine, bias compensation ------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_structured_engine_equals_dense(bias, k):
    rng = np.random.default_rng(9)
    C = 24
    gamma, beta = rng.uniform(0.2, 2, C), rng.normal(0, 1, C)
    Hs = hessian_from_bn(gamma, beta, activation="relu", kh=k, kw=k, structured=True)
    assert isinstance(Hs, BlockHessian)
    Hd = Hs.dense()
    W = rng.standard_normal((10, C * k * k))
    nf = 0
    if bias:
        mean = np.repeat(bn_moments(gamma, beta)[0], k * k)
        b0 = rng.standard_normal(10)
        (W, Hs), (_, Hd) = with_bias(W, Hs, mean, b0), with_bias(W, Hd, mean, b0)
        assert isinstance(Hs, BlockHessian)
        np.testing.assert_allclose(Hs.dense(), Hd)
        nf = 1
    r1, c1, W1 = obs_select(W, Hs, 10, block=k * k, n_fixed=nf)
    r2, c2, W2 = obs_select(W, Hd, 10, block=k * k, n_fixed=nf, max_steps=None)
    assert r1.tolist() == r2.tolist()
    assert c1 == pytest.approx(c2, rel=1e-9)
    np.testing.assert_allclose(W1, W2, atol=1e-9)
    np.testing.assert_allclose(obs_scores([(W, Hs, k * k, nf)]), obs_scores([(W, Hd, k * k, nf)]), rtol=1e-9)


def test_bias_absorbs_constant_channel():
    """A channel with zero variance but a large mean costs nothing once the bias may change."""
    rng = np.random.default_rng(10)
    C = 8
    X = correlated(rng, 500, C)
    X[:, 3] = 5.0
    W, b = rng.standard_normal((4, C)), rng.standard_normal(4)
    Wa, Ha = with_bias(W, hessian_from_samples(X), X.mean(0), b)
    removed, cost, Wn = obs_select(Wa, Ha, 1, n_fixed=1, damp=1e-10)
    assert removed.tolist() == [3]
    W2, b2 = split_bias(Wn)
    ref = X @ W.T + b
    assert np.linalg.norm(X @ W2.T + b2 - ref) / np.linalg.norm(ref) < 1e-6
    r_nob, _, _ = obs_select(W, hessian_from_samples(X), 1, damp=1e-10)
    assert r_nob.tolist() != [3] or abs(W[:, 3]).sum() < 1e-3      # without a bias it is not free


def test_edge_cases():
    rng = np.random.default_rng(11)
    W = rng.standard_normal((3, 8))
    H = hessian_identity(8)
    r, c, Wn = obs_select(W, H, 0)
    assert len(r) == 0 and c == 0 and np.array_equal(Wn, W)
    r, c, Wn = obs_select(W, H, 8)
    assert sorted(r.tolist()) == list(range(8)) and np.all(Wn == 0)
    with pytest.raises(ValueError):
        obs_select(W, H, 9)
    with pytest.raises(ValueError):
        obs_group([(W, H, 1), (rng.standard_normal((3, 18)), hessian_identity(18), 9)], 1)


def test_float32_engine_agrees():
    rng = np.random.default_rng(12)
    C, b = 20, 9
    X = correlated(rng, 600, C * b)
    W = rng.standard_normal((8, C * b))
    H = hessian_from_samples(X)
    r64, c64, W64 = obs_select(W, H, 10, block=b)
    r32, c32, W32 = obs_select(W, H, 10, block=b, dtype=np.float32)
    assert sorted(r32.tolist()) == sorted(r64.tolist())
    assert c32 == pytest.approx(c64, rel=1e-3)
    np.testing.assert_allclose(W32, W64, atol=1e-3 * np.abs(W64).max())


@pytest.mark.parametrize("structured", [False, True])
def test_chosen_channels_go_and_the_rest_is_the_least_squares_fit(structured):
    """``chosen``: exactly those channels are removed and the kept weights are the damped
    least-squares optimum for that set, W H[:, K] (H + lam)_KK^-1, whatever OBS would have chosen."""
    rng = np.random.default_rng(4)
    C, b = 12, 1
    if structured:
        H = hessian_from_bn(rng.uniform(0.2, 2, C), rng.normal(0, 1, C), activation="relu", structured=True)
        Hd = H.dense()
    else:
        H = Hd = hessian_from_samples(correlated(rng, 500, C))
    W = rng.standard_normal((6, C))
    chosen = [7, 1, 3]
    removed, (W_new,) = obs_group([(W, H, b)], 0, damp=0.05, chosen=chosen)
    assert sorted(removed.tolist()) == [1, 3, 7]
    K = np.setdiff1d(np.arange(C), chosen)
    lam = 0.05 * np.mean(np.diag(Hd))
    Hl = Hd + lam * np.eye(C)
    want = np.zeros_like(W)
    want[:, K] = W @ Hl[:, K] @ np.linalg.inv(Hl[np.ix_(K, K)])
    np.testing.assert_allclose(W_new, want, atol=1e-8)
    with pytest.raises(ValueError, match="chosen"):
        obs_group([(W, H, b)], 0, chosen=[C])
