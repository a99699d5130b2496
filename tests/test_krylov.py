"""Krylov spectra of hard Jacobians (issue 21): stochastic Lanczos quadrature and the
extreme singular values against the dense SVD on matrices whose Krylov space is
exhausted early or whose spectrum spans many orders of magnitude.

Each matrix is ``U diag(s) V^T`` with Haar-random ``U``, ``V`` and prescribed singular
values. Every SLQ run takes ``min(m, n)`` steps, so each probe's quadrature is exact
(Gauss quadrature on an exhausted, or invariant, Krylov space) and what remains is the
probes' Monte-Carlo error: moments and the CDF are compared within 4 standard errors of
the mean over the probes (a 6e-5 chance per comparison for a Gaussian mean; the seeds are
fixed) plus rounding (``RTOL``). The extreme values must lie within their stated bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl

N = 40
PROBES = 32
RTOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}
"""Rounding in the comparisons of means: the weights and nodes are stored in the
operator's dtype."""


def _matrix(s, m, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.normal(size=(m, m)))[0]
    V = np.linalg.qr(rng.normal(size=(n, n)))[0]
    S = np.zeros((m, n))
    S[np.arange(len(s)), np.arange(len(s))] = s
    return jnp.asarray(U @ S @ V.T, dtype)


CASES = {
    "isometric": (np.full(N, 3.0), N, N, jnp.float64),
    "isometric-float32": (np.full(N, 3.0), N, N, jnp.float32),
    "rank-5": (np.r_[np.linspace(1, 3, 5), np.zeros(N - 5)], N, N, jnp.float64),
    "clustered": (np.repeat([0.5, 1.0, 2.0, 4.0], N // 4), N, N, jnp.float64),
    "zero": (np.zeros(N), N, N, jnp.float64),
    "cond-1e10": (np.geomspace(1, 1e-10, N), N, N, jnp.float64),
    "cond-1e6-float32": (np.geomspace(1, 1e-6, N), N, N, jnp.float32),
    "wide-rank-deficient": (np.r_[np.geomspace(2, 0.1, 16), np.zeros(8)], 24, N, jnp.float64),
}


def _between(lam, q, resolution):
    """A point at the ``q`` quantile of the eigenvalues ``lam`` that no eigenvalue is
    within the methods' resolution of: between two distinct neighbours (geometric mean),
    just above an atom, and never below the resolution itself (rounding leaves zero
    eigenvalues at ~1e-32, not 0)."""
    lam = np.sort(lam)
    lo, hi = lam[int(q * lam.size) - 1], lam[int(q * lam.size)]
    t = np.sqrt(lo * hi) if lo > 0 and hi > 1.001 * lo else max(lo, 1e-3 * hi) * 1.001
    return max(t, resolution, 1e-300)


@pytest.mark.parametrize("name", list(CASES))
def test_matrix_free_spectrum_agrees_with_dense(name):
    s, m, n, dtype = CASES[name]
    A = _matrix(s, m, n, dtype)
    x = jnp.zeros(n, dtype)
    dense = jl.jacobian_spectrum(lambda v: A @ v, x, method="dense")
    mf = jl.jacobian_spectrum(
        lambda v: A @ v,
        x,
        method="matrix_free",
        key=jax.random.PRNGKey(1),
        num_probes=PROBES,
        num_matvecs=min(m, n),
    )
    assert bool(jnp.all(jnp.isfinite(mf.nodes))) and bool(jnp.all(jnp.isfinite(mf.weights)))
    rtol = RTOL[dtype]
    for j in (1, 2):
        est = mf.moment_estimate(j)
        exact = float(dense.moment(j))
        assert abs(float(est.value) - exact) <= 4 * float(est.error) + rtol * abs(exact) + 1e-300
    # the CDF at the quartiles, per probe, then its mean and standard error
    exact_s = np.linalg.svd(np.asarray(A, np.float64), compute_uv=False)
    resolution = (100 * float(mf.largest.error)) ** 2
    lam = np.asarray(dense.nodes[0], np.float64)
    for q in (0.25, 0.5, 0.75):
        t = _between(lam, q, resolution)
        per_probe = np.asarray(jnp.sum(mf.weights * (mf.nodes <= t), axis=1), np.float64)
        se = per_probe.std(ddof=1) / np.sqrt(PROBES)
        assert abs(per_probe.mean() - float(dense.cdf(t))) <= 4 * se + rtol, (q, t)
    # extreme values within their bounds of the exact ones (float64 SVD of the matrix)
    r = min(m, n)
    for est, exact in ((mf.largest, exact_s[0]), (mf.smallest, exact_s[r - 1])):
        assert abs(float(est.value) - exact) <= float(est.error), (est, exact)
    if name == "zero":
        assert float(mf.largest.value) == 0.0 and float(mf.moment(1)) == 0.0
        assert float(mf.condition_number) == float(dense.condition_number) == np.inf


def test_a_depth_30_relu_jacobian_gets_its_largest_singular_value_not_a_nan():
    """The issue's example: a 32 x 64 float32 Jacobian of a depth-30 ReLU MLP, rank about
    10 (dead units), singular values from 7 down to rounding. Before: NaN at the default 32
    steps, and s_1 = 2,108 against 7 at 24 steps (Lanczos vectors that lost orthogonality
    after the range was exhausted). Now the factorization is cut there: s_1 within its bound
    (at 24 steps, the worst case), moments agree with dense within 4 standard errors."""
    key = jax.random.PRNGKey(0)
    net = jl.mlp(30, 32, "relu", in_dim=64, sigma_w=2**0.5)
    params = net.init(key)
    x = jax.random.normal(jax.random.PRNGKey(2), (64,))

    def fn(v):
        return net.apply(params, v[None])[0]

    dense = jl.jacobian_spectrum(fn, x, method="dense")
    s1 = float(np.linalg.svd(np.asarray(jax.jacfwd(fn)(x), np.float64), compute_uv=False)[0])
    mf = jl.jacobian_spectrum(fn, x, method="matrix_free", num_matvecs=24)
    assert abs(float(mf.largest.value) - s1) <= float(mf.largest.error) < 1e-3 * s1
    est = mf.moment_estimate(1)
    assert abs(float(est.value - dense.moment(1))) <= 4 * float(est.error) + 1e-6
    assert bool(jnp.all(jnp.isfinite(mf.cdf(jnp.array([0.0, 1.0, 100.0])))))


def test_non_finite_products_are_an_error_and_cdf_never_reads_nan_as_a_probability(key):
    """A function whose derivative is not finite at x: the Krylov methods raise naming the
    cause instead of returning NaN nodes; a Spectrum holding NaN gives a NaN CDF, not 0."""

    def fn(v):
        return jnp.sqrt(v)  # d sqrt(v) / dv = inf at 0

    x = jnp.zeros(8)
    for call in (
        lambda: jl.slq_spectrum(fn, x, key),
        lambda: jl.extreme_singular_values(fn, x, key),
        lambda: jl.jacobian_spectrum(fn, x, method="matrix_free"),
    ):
        with pytest.raises(FloatingPointError, match="hold inf or NaN"):
            call()
    estimate = jl.Estimate(jnp.float32(1.0), jnp.float32(0.0))
    spec = jl.Spectrum(
        jnp.array([[jnp.nan, 1.0]]), jnp.array([[0.5, 0.5]]), estimate, estimate, estimate, "x"
    )
    assert bool(jnp.all(jnp.isnan(spec.cdf(jnp.array([0.5, 2.0])))))
    good = jl.Spectrum(
        jnp.array([[0.0, 1.0]]), jnp.array([[0.5, 0.5]]), estimate, estimate, estimate, "x"
    )
    np.testing.assert_array_equal(good.cdf(jnp.array([0.5, 2.0])), [0.5, 1.0])
    assert bool(jnp.isnan(good.cdf(jnp.nan)))
