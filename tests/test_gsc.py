import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import quad

import jacobian_lab as jl
from jacobian_lab.gsc import UnderflowWarning


def _x(n, d, dtype=jnp.float64, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), dtype)


def test_qm_norm_divides_by_the_input_dimension(key):
    """||A||_qm^2 = ||A||_F^2 / d_in = E_u ||A u||^2 for u uniform on the unit sphere."""
    np.testing.assert_allclose(jl.qm_norm(jnp.eye(7)), 1.0)
    Q = jl.weight_matrix(key, "orthogonal", 10, 4, sigma_w=3.0, dtype=jnp.float64)  # (4, 10)
    # 4 singular values equal to 3 over an input dimension of 10
    np.testing.assert_allclose(jl.qm_norm(Q), 3.0 * np.sqrt(4 / 10), rtol=1e-12)
    u = jax.random.normal(key, (20000, 10), jnp.float64)
    u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
    mc = jnp.mean(jnp.sum((u @ Q.T) ** 2, axis=1))
    # Monte-Carlo: relative standard error of the mean below 1% at 20,000 samples
    np.testing.assert_allclose(mc, jl.qm_norm(Q) ** 2, rtol=0.03)


def test_deep_orthogonal_linear_network_is_an_isometry_with_gsc_one(key):
    net = jl.mlp(20, 16, "linear", weight_init="orthogonal", dtype="float64")
    params = net.init(key)
    x = _x(3, 16)
    J = jl.input_output_jacobian(net, params, x)
    np.testing.assert_allclose(jl.singular_values(J), 1.0, rtol=1e-12)
    G = jl.gsc_matrix(net, params, x)
    upper = ~jnp.isnan(G)
    assert int(upper.sum()) == 3 * 21 * 22 // 2
    np.testing.assert_allclose(G[upper], 1.0, rtol=1e-12)


def test_gsc_equals_gradient_scale_of_direct_jacobians(key):
    net = jl.mlp(6, 8, "tanh", in_dim=5, norm="layer", sigma_w=1.6, dtype="float64")
    params = net.init(key)
    x = _x(2, 5)
    G = jl.gsc_matrix(net, params, x)
    pj = jl.layer_to_layer_jacobians(net, params, x)
    acts = net.activations(params, x)
    L = net.num_layers
    for k in range(L + 1):
        for l in range(min(k + 1, L)):
            J = pj.from_input[:, l] if k == L else pj.hidden[:, l, k]
            f_k = x if k == L else acts[k]
            np.testing.assert_allclose(G[:, k, l], jl.gradient_scale(J, f_k, acts[l]), rtol=1e-12)
    assert bool(jnp.all(jnp.isnan(G[:, 0, 1:])))  # k < l is undefined
    np.testing.assert_allclose(jl.gsc(net, params, x), G[:, :, 0], rtol=1e-12)


def test_gsc_of_a_callable_matches_its_definition(key):
    """GSC(input, output) of any function: ||J||_qm ||x|| / ||fn(x)||; for fn = c * x it is 1
    whatever c, since the GSC measures relative change."""
    x = _x(1, 6)[0]
    J = jl.jacobian(lambda v: 5.0 * v, x)
    np.testing.assert_allclose(jl.gradient_scale(J, x, 5.0 * x), 1.0, rtol=1e-12)


def test_relu_he_layer_has_mean_squared_singular_value_one():
    """E ||D||_F^2 / n = sigma_w^2 P(h > 0) = 2 * 1/2 = 1 for one ReLU layer with He weights.
    Per draw the estimate has standard deviation ~ 1/sqrt(n) = 0.07 (n = 200); the mean over
    64 independent draws has ~0.009, and the tolerance is 4 of those."""
    net = jl.mlp(2, 200, "relu", weight_init="he", dtype="float64")
    keys = jax.random.split(jax.random.PRNGKey(3), 64)
    x = _x(1, 200)

    def mean_sq(k):
        D = jl.layer_jacobians(net, net.init(k), x).units[0, 0]
        return jl.spectrum_summary(jl.singular_values(D)).mean_sq

    values = jax.vmap(mean_sq)(keys)
    assert abs(float(values.mean()) - 1.0) < 4 * 0.009


def _mp_cdf(lam):
    """CDF of Marchenko-Pastur with ratio 1 and sigma = 1: density sqrt(l (4 - l)) / (2 pi l)
    on [0, 4]; closed form by the substitution l = 4 sin^2 t."""
    t = np.arcsin(np.sqrt(np.clip(lam, 0, 4) / 4))
    return (2 * t + np.sin(2 * t)) / np.pi


def test_gaussian_layer_follows_marchenko_pastur(key):
    """Squared singular values of one Gaussian N(0, 1/n) layer, n = 400: moments 1, 2 + 1/n
    (exact for finite n) and a Kolmogorov-Smirnov distance to Marchenko-Pastur below the
    95% i.i.d. critical value 1.36/sqrt(n) (eigenvalues are more regular than i.i.d.)."""
    n = 400
    net = jl.mlp(1, n, "linear", dtype="float64")
    lj = jl.layer_jacobians(net, net.init(key), _x(1, n))
    lam = np.sort(np.asarray(jl.singular_values(lj.stem[0]) ** 2))
    assert abs(lam.mean() - 1) < 4 * np.sqrt(2) / n  # trace of a Wishart: sd sqrt(2)/n
    assert abs((lam**2).mean() - (2 + 1 / n)) < 0.1
    empirical = np.arange(1, n + 1) / n
    ks = np.max(
        np.maximum(np.abs(empirical - _mp_cdf(lam)), np.abs(empirical - 1 / n - _mp_cdf(lam)))
    )
    assert ks < 1.36 / np.sqrt(n)


def test_mp_cdf_helper_is_a_cdf():
    np.testing.assert_allclose(_mp_cdf(np.array([0.0, 4.0])), [0.0, 1.0], atol=1e-12)
    # numerical integral of the density up to 1
    integral, _ = quad(lambda v: np.sqrt(v * (4 - v)) / (2 * np.pi * v), 0, 1)
    np.testing.assert_allclose(integral, _mp_cdf(1.0), rtol=1e-8)


def test_growth_rate_recovers_an_exact_exponential():
    k = jnp.arange(11.0)
    g = 0.7 * 1.3**k
    fit = jl.growth_rate(jnp.stack([g, 2 * g]))
    np.testing.assert_allclose(fit.rate, 1.3, rtol=1e-12)
    np.testing.assert_allclose(fit.intercept, [0.7, 1.4], rtol=1e-12)
    np.testing.assert_allclose(fit.endpoint_rate, (0.7 * 1.3**10) ** 0.1 * np.array([1, 2**0.1]))


def test_float32_agrees_with_float64(key):
    """Same weights in both precisions: the GSC agrees to float32 accumulated rounding
    (~ depth * 1e-7 relative, tolerance 1e-4)."""
    net64 = jl.mlp(12, 32, "tanh", norm="layer", sigma_w=1.5, dtype="float64")
    params = net64.init(key)
    x = _x(4, 32)
    g64 = jl.gsc_matrix(net64, params, x)
    net32 = jl.mlp(12, 32, "tanh", norm="layer", sigma_w=1.5)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    g32 = jl.gsc_matrix(net32, p32, x.astype(jnp.float32))
    assert g32.dtype == jnp.float32
    np.testing.assert_allclose(g32, g64, rtol=1e-4)


def test_gsc_over_seeds_equals_one_seed_at_a_time(key):
    net = jl.resmlp(4, 8, "relu", norm="layer", dtype="float64")
    keys = jax.random.split(key, 3)
    x = _x(5, 8)
    batched = jl.gsc_over_seeds(net, keys, x)
    assert batched.shape == (3, 5, net.num_layers + 1)
    for i in range(3):
        np.testing.assert_allclose(batched[i], jl.gsc(net, net.init(keys[i]), x), rtol=1e-12)


def test_gsc_over_seeds_names_the_layer_that_went_non_finite(key):
    net = jl.mlp(10, 16, "linear", sigma_w=1e6)
    with pytest.raises(FloatingPointError, match="f_3"):
        jl.gsc_over_seeds(net, jax.random.split(key, 2), _x(2, 16, jnp.float32))


def test_growth_rate_needs_two_layers():
    with pytest.raises(ValueError, match="at least two"):
        jl.growth_rate(jnp.ones(1))


@pytest.mark.parametrize(
    "net",
    [
        jl.resmlp(3, 12, "tanh", dtype="float64"),
        jl.mlp(4, 10, "relu", norm="batch", dtype="float64"),  # batch-coupled: one sample
        jl.mlp(3, 9, "tanh", in_dim=5, dtype="float64"),  # a layer that changes the width
    ],
    ids=["resmlp", "batchnorm", "widths"],
)
def test_layer_gsc_is_the_diagonal_of_the_all_pairs_matrix(net):
    """GSC(l+1, l) from one Jacobian per layer equals the all-pairs matrix's entry (which
    the tests above check against jax.jacfwd), at every layer and sample."""
    params = net.init(jax.random.PRNGKey(0))
    x = _x(6, net.in_dim or net.width)
    G = np.asarray(jl.gsc_matrix(net, params, x))
    got = np.asarray(jl.layer_gsc(net, params, x))
    L = net.num_layers
    assert got.shape == (G.shape[0], L)
    np.testing.assert_allclose(got, G[:, np.arange(1, L + 1), np.arange(L)], rtol=1e-10)
    np.testing.assert_allclose(jl.layer_gsc(net, params, x, log=True), np.log(got), rtol=1e-12)


def test_layer_gsc_of_a_saturated_layer_warns_naming_it():
    """tanh with sigma_w = 1e4 in float32: tanh' rounds to exactly 0, so the last layer's
    Jacobian is zero while its output (+-1) is not; the zero comes back with a warning
    naming that layer, not as a silent measurement."""
    net = jl.mlp(2, 8, "tanh", sigma_w=1e4)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
    with pytest.warns(UnderflowWarning, match="dense2"):
        g = jl.layer_gsc(net, net.init(jax.random.PRNGKey(0)), x)
    assert np.all(np.asarray(g)[:, 0] == 0)
