"""Matrix-free estimators against dense answers: exact cases, quadrature identities, and
agreement within the reported errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl


def _tanh_layer(key, m=50, n=30):
    W = jax.random.normal(key, (m, n), jnp.float64) / np.sqrt(n)
    x = jax.random.normal(jax.random.PRNGKey(9), (n,), jnp.float64)
    return (lambda v: jnp.tanh(W @ v)), x


def test_operator_products_are_the_jacobian(key):
    fn, x = _tanh_layer(key)
    op = jl.jacobian_operator(fn, x)
    J = jax.jacfwd(fn)(x)
    v = jax.random.normal(jax.random.PRNGKey(1), (30,), jnp.float64)
    u = jax.random.normal(jax.random.PRNGKey(2), (50,), jnp.float64)
    assert op.shape == (50, 30)
    np.testing.assert_allclose(op.matvec(v), J @ v, rtol=1e-12)
    np.testing.assert_allclose(op.vecmat(u), J.T @ u, rtol=1e-12)


def test_hutchinson_is_exact_for_an_orthogonal_jacobian(key):
    """||Q v||^2 = ||v||^2 = n for every Rademacher v: estimate n, standard error 0."""
    Q = jax.nn.initializers.orthogonal()(key, (40, 40), jnp.float64)
    est = jl.frobenius_norm_sq(lambda v: Q @ v, jnp.ones(40), jax.random.PRNGKey(1), 16)
    np.testing.assert_allclose(est.value, 40.0, rtol=1e-12)
    assert float(est.error) < 1e-10


def test_hutchinson_agrees_with_the_exact_norm_within_its_error(key):
    """A z-score of the estimate against the exact ||J||_F^2; |z| < 4 fails by chance with
    probability 6e-5 for a calibrated standard error (256 probes: nearly Gaussian)."""
    fn, x = _tanh_layer(key)
    exact = jnp.sum(jax.jacfwd(fn)(x) ** 2)
    est = jl.frobenius_norm_sq(fn, x, jax.random.PRNGKey(3), 256)
    assert abs(float((est.value - exact) / est.error)) < 4
    assert 0.01 < float(est.error / exact) < 0.1  # sqrt(2 tr((JJ^T)^2)/P)/||J||^2 ~ 0.03


def test_xrownorms_is_exact_for_a_low_rank_jacobian(key):
    """XRowNorm captures the range of a rank-5 J with 20 probes, leaving no Monte-Carlo
    error: the estimate equals ||J||_F^2 to rounding."""
    k1, k2 = jax.random.split(key)
    A = jax.random.normal(k1, (60, 5), jnp.float64) @ jax.random.normal(k2, (5, 300))
    est = jl.frobenius_norm_sq(
        lambda v: A @ v, jnp.zeros(300), jax.random.PRNGKey(1), 20, method="xrownorms"
    )
    np.testing.assert_allclose(est.value, jnp.sum(A**2), rtol=1e-8)


def test_extreme_singular_values_match_the_svd(key):
    fn, x = _tanh_layer(key)
    s = np.linalg.svd(jax.jacfwd(fn)(x), compute_uv=False)
    ext = jl.extreme_singular_values(fn, x, jax.random.PRNGKey(4), num_matvecs=20)
    # the Ritz value is within its residual bound of some singular value, here s_1
    assert abs(float(ext.largest.value) - s[0]) <= float(ext.largest.error) + 1e-12
    assert abs(float(ext.largest.value) - s[0]) < 1e-8  # converged: 20 steps, gap ratio ~1.1
    assert float(ext.smallest.value) >= s[-1] - 1e-12  # an upper bound before convergence
    full = jl.extreme_singular_values(fn, x, jax.random.PRNGKey(4), num_matvecs=30)
    np.testing.assert_allclose(full.smallest.value, s[-1], rtol=1e-8)  # k = min(m, n)
    np.testing.assert_allclose(full.condition_number, s[0] / s[-1], rtol=1e-8)


@pytest.mark.parametrize("shape", [(60, 80), (80, 60), (20, 50)])
def test_lanczos_residual_bounds_hold_before_convergence(key, shape):
    """After 5 and 10 steps (far from converged), each reported Ritz value lies within its
    residual bound of some singular value; a wide J (m < n) still finds s_min(m, n), not
    the zeros of its null space, once k = min(m, n)."""
    A = jax.random.normal(key, shape, jnp.float64)
    s = np.linalg.svd(A, compute_uv=False)
    fn, x = (lambda v: A @ v), jnp.zeros(shape[1])
    for k in (5, 10):
        ext = jl.extreme_singular_values(fn, x, jax.random.PRNGKey(1), k)
        for est in (ext.largest, ext.smallest):
            assert np.min(np.abs(s - float(est.value))) <= float(est.error) * (1 + 1e-9)
        assert float(ext.smallest.value) >= s[-1] - 1e-12
    full = jl.extreme_singular_values(fn, x, jax.random.PRNGKey(1), min(shape))
    np.testing.assert_allclose(full.smallest.value, s[-1], rtol=1e-8)


def test_extreme_singular_values_of_a_float32_jacobian_under_x64(key):
    """matfree's bidiagonalization allocates at the default float; the float32 operator is
    cast, and the result comes back as float32."""
    W = jax.random.normal(key, (20, 20), jnp.float32) / 4.5
    ext = jl.extreme_singular_values(lambda v: W @ v, jnp.ones(20, jnp.float32), key, 20)
    assert ext.largest.value.dtype == jnp.float32
    np.testing.assert_allclose(
        ext.largest.value, np.linalg.svd(np.asarray(W, np.float64))[1][0], rtol=1e-5
    )


def test_slq_moments_are_the_probes_quadratic_forms(key):
    """Gauss quadrature with k nodes integrates polynomials of degree < 2k exactly, so
    sum_j w_j theta_j^p = v^T (J^T J)^p v / ||v||^2 for each probe v and p < 2k."""
    fn, x = _tanh_layer(key)
    J = jax.jacfwd(fn)(x)
    k_probe = jax.random.PRNGKey(5)
    slq = jl.slq_spectrum(fn, x, k_probe, num_probes=4, num_matvecs=6)
    from matfree import stochtrace

    probes = stochtrace.sampler_signs(jnp.zeros(30), num=4)(k_probe)
    A = J.T @ J
    for p in (1, 2, 5):
        quad = jnp.sum(slq.weights * slq.nodes**p, axis=1)
        Ap = jnp.linalg.matrix_power(A, p)
        forms = jnp.einsum("pi,ij,pj->p", probes, Ap, probes) / 30.0
        np.testing.assert_allclose(quad, forms, rtol=1e-9)
    np.testing.assert_allclose(jnp.sum(slq.weights, axis=1), 1.0, rtol=1e-12)


def test_jacobian_spectrum_dense_and_matrix_free_agree(key):
    """Dense: the exact spectral measure. Matrix-free (SLQ, 64 probes x 30 steps): the
    Frobenius norm within 4 standard errors, s_1 to Lanczos convergence, and the CDF of the
    squared singular values within 0.06 (probe Monte-Carlo error ~ 1/sqrt(64 * 30) per
    quadrature node, plus the staircase of 30 nodes per probe)."""
    net = jl.mlp(3, 60, "tanh", dtype="float64")
    p = net.init(key)
    fn = lambda v: net.apply(p, v[None])[0]  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(1), (60,), jnp.float64)
    dense = jl.jacobian_spectrum(fn, x)
    assert dense.method == "dense"
    s = np.linalg.svd(jax.jacfwd(fn)(x), compute_uv=False)
    np.testing.assert_allclose(dense.frobenius_sq.value, np.sum(s**2), rtol=1e-12)
    np.testing.assert_allclose(dense.moment(2), np.mean(s**4), rtol=1e-12)
    mf = jl.jacobian_spectrum(fn, x, memory_budget=0, num_probes=64, num_matvecs=30)
    assert mf.method == "matrix_free"
    z = (mf.frobenius_sq.value - dense.frobenius_sq.value) / mf.frobenius_sq.error
    assert abs(float(z)) < 4
    np.testing.assert_allclose(mf.largest.value, s[0], rtol=1e-8)
    t = jnp.linspace(0.0, float(s[0] ** 2), 50)
    assert float(jnp.max(jnp.abs(mf.cdf(t) - dense.cdf(t)))) < 0.06
    with pytest.raises(ValueError, match="method must be"):
        jl.jacobian_spectrum(fn, x, method="svd")


def test_gsc_estimate_is_exact_for_an_orthogonal_linear_network(key):
    """Every J_k^0 is orthogonal, so ||J^T u||^2 = ||u||^2 for each probe: the estimate is
    the exact GSC (1 at every layer) with standard error 0."""
    net = jl.mlp(6, 16, "linear", weight_init="orthogonal", dtype="float64")
    p = net.init(key)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 16), jnp.float64)
    est = jl.gsc_estimate(net, p, x, jax.random.PRNGKey(2), num_probes=4)
    np.testing.assert_allclose(est.value, 1.0, rtol=1e-12)
    np.testing.assert_allclose(est.error, 0.0, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "batch-resnet", "chain"])
def test_gsc_estimate_agrees_with_dense_within_its_error(key, kind):
    """All layers from one backward pass per probe. Per entry |z| < 4.5 (14 layers x up to
    3 samples, 256 probes each: a calibrated error gives a family-wise false alarm well
    under 1%)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 24), jnp.float64)
    if kind == "mlp":
        net = jl.mlp(12, 24, "tanh", sigma_w=1.5, dtype="float64")
        params = net.init(key)
    elif kind == "batch-resnet":
        net = jl.resmlp(6, 24, "relu", norm="batch", dtype="float64")
        params = net.init(key)
    else:
        W = jax.random.normal(key, (5, 24, 24), jnp.float64) * 1.3 / np.sqrt(24)
        net, params = jl.chain([(lambda W, h: jnp.tanh(W @ h), W[i]) for i in range(5)])
    dense = jl.gsc(net, params, x, method="dense")
    est = jl.gsc_estimate(net, params, x, jax.random.PRNGKey(2), num_probes=256)
    assert est.value.shape == dense.shape
    z = (est.value[:, 1:] - dense[:, 1:]) / est.error[:, 1:]
    assert float(jnp.max(jnp.abs(z))) < 4.5
    rel = est.error[:, 1:] / dense[:, 1:]
    assert 0.002 < float(jnp.median(rel)) < 0.1  # ~ sqrt(var / 256): errors are informative


def test_gsc_estimate_on_a_chain_of_images_and_pytrees(key):
    """Matrix-free GSC of a chain whose input is an image and whose layers return a dict
    (the output too): agrees with the dense GSC within its error (|z| < 4.5)."""
    k1, k2, k3 = jax.random.split(key, 3)
    conv = jax.random.normal(k1, (3, 3, 2, 3), jnp.float64) / 3.0
    W1 = jax.random.normal(k2, (12, 75), jnp.float64) / 8.0
    W2 = jax.random.normal(k3, (10, 12), jnp.float64) / 3.0

    def conv_layer(w, img):  # (5, 5, 2) -> (5, 5, 3)
        out = jax.lax.conv_general_dilated(
            img[None], w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.tanh(out[0])

    def split(W, img):  # image -> {"a": (6,), "b": (2, 3)}
        h = jnp.tanh(W @ img.ravel())
        return {"a": h[:6], "b": h[6:].reshape(2, 3)}

    def head(W, t):  # dict -> dict
        h = W @ jnp.concatenate([t["a"], t["b"].ravel()])
        return {"out": jnp.sin(h[:7]), "aux": h[7:]}

    ch, params = jl.chain([(conv_layer, conv), (split, W1), (head, W2)])
    xs = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 5, 2), jnp.float64)
    dense = jl.gsc(ch, params, xs, method="dense")
    est = jl.gsc_estimate(ch, params, xs, jax.random.PRNGKey(3), 256)
    assert est.value.shape == dense.shape == (2, 4)
    assert float(jnp.max(jnp.abs((est.value - dense)[:, 1:] / est.error[:, 1:]))) < 4.5


def test_gsc_estimate_names_the_layer_that_went_non_finite(key):
    """A NaN in the forward pass is named at its layer, and so is a Jacobian that is only
    non-finite in the backward pass (sqrt at 0), not the layers below that inherit it."""
    W = jnp.eye(3)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3), jnp.float64)
    for bad in (lambda p, h: jnp.log(h - 10.0), lambda p, h: jnp.sqrt(jnp.abs(h) * 0.0)):
        ch, params = jl.chain(
            [(lambda W, h: W @ h, W), (bad, ()), (lambda p, h: jnp.sin(h), ())],
            names=["lin", "bad", "sin"],
        )
        with pytest.raises(FloatingPointError, match=r"'bad' \(layer 2 of 3 from the input\)"):
            jl.gsc_estimate(ch, params, x, jax.random.PRNGKey(0), 4)


def test_gsc_auto_goes_matrix_free_beyond_the_memory_budget(key):
    net = jl.mlp(5, 16, "tanh", dtype="float64")
    p = net.init(key)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16), jnp.float64)
    np.testing.assert_array_equal(jl.gsc(net, p, x), jl.gsc(net, p, x, method="dense"))
    with pytest.warns(jl.AutoMethodWarning, match=r"GiB.*jl.gsc_estimate"):
        small = jl.gsc(net, p, x, memory_budget=1000)
    np.testing.assert_array_equal(
        small, jl.gsc_estimate(net, p, x, jax.random.PRNGKey(0), num_probes=64).value
    )
    with pytest.raises(ValueError, match="method must be"):
        jl.gsc(net, p, x, method="lanczos")


def test_gsc_estimate_float32_matches_float64(key):
    """Same probes, same weights: float32 differs from float64 by rounding only."""
    net64 = jl.mlp(8, 32, "tanh", dtype="float64")
    p64 = net64.init(key)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p64)
    net32 = jl.mlp(8, 32, "tanh", dtype="float32")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32), jnp.float64)
    e64 = jl.gsc_estimate(net64, p64, x, jax.random.PRNGKey(2), 32)
    e32 = jl.gsc_estimate(net32, p32, x.astype(jnp.float32), jax.random.PRNGKey(2), 32)
    assert e32.value.dtype == jnp.float32
    np.testing.assert_allclose(e32.value, e64.value, rtol=1e-4)


def test_gsc_over_seeds_goes_matrix_free_beyond_the_budget(key):
    """Seeds vmapped (and sharded) through the matrix-free path give each seed's
    gsc_estimate with the same probes."""
    net = jl.mlp(4, 12, "tanh", dtype="float64")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 12), jnp.float64)
    keys = jax.random.split(key, 3)
    probe = jax.random.PRNGKey(4)
    g = jl.gsc_over_seeds(net, keys, x, memory_budget=0, key=probe, num_probes=8)
    each = jnp.stack([jl.gsc_estimate(net, net.init(k), x, probe, 8).value for k in keys])
    np.testing.assert_allclose(g, each, rtol=1e-12)
