"""Mean-field maps against closed forms. Quadrature is float64 Gauss-Legendre split at
kinks, so agreement is to about 1e-12."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl
from jacobian_lab import meanfield as mf


def _erf_q(q):  # E[erf(u)^2], u ~ N(0, q)
    return 2 / np.pi * np.arcsin(2 * q / (1 + 2 * q))


def test_relu_chi_is_half_sigma_w_squared_at_any_length():
    sigma_w = np.array([0.5, 1.0, np.sqrt(2), 3.0])
    np.testing.assert_allclose(mf.chi("relu", 0.7, sigma_w), sigma_w**2 / 2, rtol=1e-12)
    np.testing.assert_allclose(mf.chi("relu", 25.0, 1.3), 1.3**2 / 2, rtol=1e-12)


def test_linear_network_chi_is_sigma_w_squared_and_length_map_is_affine():
    np.testing.assert_allclose(mf.chi("linear", 0.3, 1.7), 1.7**2, rtol=1e-12)
    np.testing.assert_allclose(mf.length_map("linear", 0.3, 1.7, 0.2), 1.7**2 * 0.3 + 0.04)


@pytest.mark.parametrize("q", [0.05, 0.7, 3.0, 50.0])
def test_erf_length_and_correlation_maps_match_closed_forms(q):
    """Williams (1997): E[erf(u1) erf(u2)] = 2/pi asin(2 q12 / sqrt((1+2 q11)(1+2 q22)))."""
    np.testing.assert_allclose(
        mf.length_map("erf", q, 1.3, 0.1), 1.69 * _erf_q(q) + 0.01, rtol=1e-11
    )
    c = np.array([-0.9, -0.2, 0.3, 0.99])
    q12 = 2 / np.pi * np.arcsin(2 * q * c / (1 + 2 * q))
    expected = (1.69 * q12 + 0.01) / (1.69 * _erf_q(q) + 0.01)
    np.testing.assert_allclose(mf.correlation_map("erf", c, q, 1.3, 0.1), expected, rtol=1e-11)


def test_relu_correlation_map_is_the_arc_cosine_kernel():
    """Cho & Saul: for He-initialized ReLU, c -> (sqrt(1-c^2) + (pi - acos c) c) / pi."""
    c = np.array([-0.95, -0.5, 0.0, 0.4, 0.9])
    expected = (np.sqrt(1 - c**2) + (np.pi - np.arccos(c)) * c) / np.pi
    np.testing.assert_allclose(
        mf.correlation_map("relu", c, 1.7, np.sqrt(2), 0.0), expected, rtol=1e-11, atol=1e-14
    )


def test_fixed_points_and_depth_scales_are_self_consistent():
    sw, sb = np.array([1.2, 1.8]), np.array([0.05, 0.3])
    m = mf.mean_field("tanh", sw, sb)
    np.testing.assert_allclose(mf.length_map("tanh", m.q_star, sw, sb), m.q_star, rtol=1e-10)
    np.testing.assert_allclose(
        mf.correlation_map("tanh", m.c_star, m.q_star, sw, sb), m.c_star, rtol=1e-8
    )
    np.testing.assert_allclose(m.chi_1, mf.chi("tanh", m.q_star, sw), rtol=1e-12)
    assert np.all(np.isfinite(m.xi_q)) and np.all(m.xi_q > 0) and np.all(m.xi_c > 0)


def test_he_relu_is_critical_and_tanh_critical_line_has_chi_one():
    m = mf.mean_field("relu", np.sqrt(2), 0.0)
    assert float(m.chi_1) == pytest.approx(1.0, abs=1e-12)
    assert np.isinf(m.xi_q)  # q map is the identity: every q is a fixed point
    sb = np.array([0.05, 0.3])
    sw = mf.critical_sigma_w("tanh", sb)
    assert np.all(sw > 1) and sw[1] > sw[0]  # the critical line rises with sigma_b
    np.testing.assert_allclose(mf.mean_field("tanh", sw, sb).chi_1, 1.0, atol=1e-9)


def test_ordered_and_critical_networks_have_correlation_fixed_point_one():
    """chi_1 is the slope of the correlation map at c = 1: for chi_1 <= 1 the stable fixed
    point is c* = 1 with xi_c = -1/ln chi_1 (infinite at chi_1 = 1); chaotic networks have
    c* < 1."""
    he = mf.mean_field("relu", np.sqrt(2), 0.0)
    assert float(he.c_star) == 1.0 and np.isinf(he.xi_c)
    ordered = mf.mean_field("tanh", 0.8, 0.3)
    assert float(ordered.chi_1) < 1 and float(ordered.c_star) == 1.0
    assert float(ordered.xi_c) == pytest.approx(-1 / np.log(float(ordered.chi_1)), rel=1e-12)
    chaotic = mf.mean_field("tanh", 2.5, 0.1)
    assert float(chaotic.chi_1) > 1 and float(chaotic.c_star) < 0.9


def test_length_sequence_starts_at_q1_and_follows_the_map():
    q = mf.length_sequence("tanh", 1.0, 1.5, 0.1, 4)
    assert q.shape == (4,) and q[0] == 1.0
    np.testing.assert_allclose(q[1], mf.length_map("tanh", 1.0, 1.5, 0.1), rtol=1e-13)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown activation 'nope'"):
        mf.chi("nope", 1.0, 1.0)


# -- batch norm (Yang et al., arXiv 1902.08129) and residual networks ------------------


@pytest.mark.parametrize("B", [5, 8, 64, 1000])
def test_batchnorm_quadrature_matches_the_relu_closed_form(B):
    """The sphere quadrature is exponentially convergent from B = 5 (analytic pieces):
    agreement to rounding, 1e-10. At B = 4 the inner density is flat up to the edge of the
    disc and the error is algebraic (about 1e-6)."""
    got = mf.batchnorm_mean_field("relu", B).lambda_g
    assert float(got) == pytest.approx(float(mf.relu_batchnorm_lambda_g(B)), rel=1e-10)
    got4 = mf.batchnorm_mean_field("relu", 4).lambda_g
    assert float(got4) == pytest.approx(float(mf.relu_batchnorm_lambda_g(4)), rel=1e-5)


def test_batchnorm_relu_rate_falls_to_pi_over_pi_minus_one():
    """lambda_G(B) decreases with B to pi / (pi - 1); the correction is O(1/B) (1.6e-3 at
    B = 1000), so 1e-6 at B = 1e7."""
    B = np.array([4, 5, 8, 16, 64, 256, 4096])
    lam = mf.relu_batchnorm_lambda_g(B)
    assert np.all(np.diff(lam) < 0)
    limit = np.pi / (np.pi - 1)
    assert float(mf.relu_batchnorm_lambda_g(10**7)) == pytest.approx(limit, abs=1e-6)
    assert float(lam[-1]) > limit


def test_batchnorm_linear_network_rate_is_b_minus_2_over_b_minus_3():
    """For phi = identity every expectation is a moment of the sphere: lambda_G = (B-2)/(B-3),
    mu = 0 (a linear layer's gradient stays in the zero-sum subspace) and c* = -1/(B-1)."""
    for B in (5, 12):
        m = mf.batchnorm_mean_field("linear", B)
        assert float(m.lambda_g) == pytest.approx((B - 2) / (B - 3), rel=1e-11)
        assert float(m.mu) == pytest.approx(0.0, abs=1e-11)
        assert float(m.c_star) == pytest.approx(-1 / (B - 1), rel=1e-11)


def _monte_carlo_backward_map(activation, B, n, seed=0):
    """The whole batch-norm backward map T on B x B matrices by Monte Carlo over batches of
    normalized pre-activations (float64), as a (B^2, B^2) matrix, and the centred variance."""

    with jax.enable_x64(True):
        phi = {"relu": jax.nn.relu, "tanh": jnp.tanh}[activation]
        z = jax.random.normal(jax.random.PRNGKey(seed), (n, B), jnp.float64)
        g = z - z.mean(1, keepdims=True)
        u = g / jnp.linalg.norm(g, axis=1, keepdims=True)
        h = np.sqrt(B) * u
        d = jax.vmap(jax.vmap(jax.grad(phi)))(h)
        f = phi(h)
        G = jnp.eye(B) - 1.0 / B
        M = (G[None] - u[:, :, None] * u[:, None, :]) * d[:, None, :]  # P_u D
        centred = jnp.mean(jnp.sum(f**2, 1) - jnp.sum(f, 1) ** 2 / B) / (B - 1)
        K = jnp.einsum("nij,nkl->ikjl", M, M).reshape(B * B, B * B) / n
        return np.asarray(K * B / ((B - 3) * centred)), float(centred)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_batchnorm_rate_is_the_top_eigenvalue_of_the_monte_carlo_backward_map(activation):
    """Monte Carlo over 40000 batches of B = 6 (a second method, independent of the
    two-coordinate reduction): the top eigenvalue of the whole backward map, its eigenvector
    G, and the centred variance agree with the quadrature. Their relative standard error
    is about 2e-3 here (from the spread of the per-batch factors); tolerance 1%."""
    B = 6
    K, centred = _monte_carlo_backward_map(activation, B, 40000)
    m = mf.batchnorm_mean_field(activation, B)
    vals, vecs = np.linalg.eig(K)
    top = np.argmax(vals.real)
    assert vals.real[top] == pytest.approx(float(m.lambda_g), rel=1e-2)
    G = (np.eye(B) - 1 / B).ravel()
    v = vecs[:, top].real
    assert abs(v @ G) / (np.linalg.norm(v) * np.linalg.norm(G)) > 0.999
    assert centred == pytest.approx(float(m.centred), rel=1e-2)
    ones = np.ones((B, B)).ravel()
    assert np.trace((K @ ones).reshape(B, B)) / (B - 1) == pytest.approx(float(m.mu), rel=3e-2)


def test_gsc_growth_rate_batch_norm_and_its_argument_checks():

    r = jl.gsc_growth_rate("relu", np.sqrt(2), 0.0, "batch", batch_size=64)
    assert float(r) == pytest.approx(np.sqrt(float(mf.relu_batchnorm_lambda_g(64))), rel=1e-10)
    assert float(r) == pytest.approx(1.2219, abs=1e-4)  # the measured 1.218 at width 256
    assert jl.gsc_growth_rate("tanh", np.array([1.0, 2.0]), 0.0, "batch", batch_size=8).shape == (
        2,
    )
    with pytest.raises(ValueError, match="needs batch_size"):
        jl.gsc_growth_rate("relu", 1.0, 0.0, "batch")
    for bad in (3, 2, 8.0, True, "8"):
        with pytest.raises(ValueError, match="batch_size must be an int >= 4"):
            jl.gsc_growth_rate("relu", 1.0, 0.0, "batch", batch_size=bad)
    with pytest.raises(ValueError, match="batch_size is for norm='batch' only"):
        jl.gsc_growth_rate("relu", 1.0, 0.0, "none", batch_size=8)
    np.testing.assert_allclose(jl.gsc_growth_rate("relu", np.sqrt(2), 0.0), 1.0, rtol=1e-12)


def test_batchnorm_profile_matches_a_measured_batch_norm_mlp():
    """The built-in batch-norm ReLU MLP (width 128, 16 layers, batch 16, 8 seeds; matrix-free
    GSC): its fitted rate agrees with the fitted rate of the predicted profile within 4
    standard errors over seeds (the finite-width deviation, of order batch / width, was
    below 0.1% here; 1.2610 +- 0.0027 at 30 layers against 1.2609)."""

    B, L, width = 16, 16, 128
    net = jl.mlp(L, width, "relu", norm="batch", sigma_w=np.sqrt(2))
    x = jax.random.normal(jax.random.PRNGKey(1), (B, width))
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    g = jl.gsc_over_seeds(net, keys, x, method="matrix_free", num_probes=4)[:, 0]
    rates = np.asarray(jl.growth_rate(g).rate, float)
    xs = np.asarray(x, float)
    profile = mf.batchnorm_gsc_profile("relu", L, B, input_gram=xs @ xs.T / width)
    predicted = float(jl.growth_rate(profile).rate)
    se = rates.std(ddof=1) / np.sqrt(len(rates))
    assert abs(rates.mean() - predicted) < 4 * se
    assert predicted == pytest.approx(1.26, abs=0.01)


def test_residual_profile_of_linear_and_he_relu_resnets_is_flat():
    """Closed forms: a linear (sigma_w = 1) or He-ReLU ResNet without normalization has
    branch gain prod chi = sigma_w^4 (linear) or 1 (ReLU) and the stream's variance grows by
    the same factor per block, so GSC(k, 0) = 1 at every block in mean field."""
    for act, sw in (("linear", 0.7), ("relu", np.sqrt(2))):
        p = mf.residual_gsc_profile(act, sw, 0.0, 6)
        assert p.shape == (8,)
        np.testing.assert_allclose(p, 1.0, rtol=1e-10)


def test_residual_profile_layer_norm_closed_form():
    """Layer norm: v_out = sigma_w^2 E[phi(z)^2] per block, so q_b = q_stem + b v_out and the
    branch gain is r^2 chi_z / q with r^2 = E[phi'^2] / E[phi^2], chi_z = sigma_w^2 E[phi'^2]."""
    sw, nb = 1.0, 5
    p = mf.residual_gsc_profile("tanh", sw, 0.0, nb, norm="layer")
    e_phi = float(mf.length_map("tanh", 1.0, 1.0, 0.0))
    e_d = float(mf.chi("tanh", 1.0, 1.0))
    v = sw**2 * e_phi
    q = sw**2 + v * np.arange(nb + 1)  # q at block inputs, input to output
    gains = 1 + (sw**2 * e_d / q[:-1]) * (sw**2 * e_d / v)
    pi = np.concatenate([[1.0], np.cumprod(gains[::-1])])
    expected = np.sqrt(pi * q[::-1] / q[-1])
    np.testing.assert_allclose(p[:-1], expected, rtol=1e-10)
    assert p[-1] == pytest.approx(expected[-1] * np.sqrt(sw**2 / sw**2), rel=1e-10)


def test_batch_norm_profile_refuses_inputs_without_spread():
    """Batch norm divides by the inputs' centred variance: identical inputs are an error
    naming input_gram, not an inf or NaN profile."""
    with pytest.raises(ValueError, match="input_gram has no spread"):
        mf.batchnorm_gsc_profile("relu", 5, 8, input_gram=np.ones((8, 8)))


# -- outside a finite nonzero fixed point (issue 21) -----------------------------------


@pytest.mark.parametrize(
    "sigma_w, q_star", [(1.0, 0.0), (np.sqrt(2), 1.0), (2.0, np.inf), (3.0, np.inf)]
)
def test_relu_without_bias_has_exact_limits_at_every_sigma_w(sigma_w, q_star):
    """ReLU is positively homogeneous: V(q) = (sigma_w^2 / 2) q, so q* is 0, 1 (the identity
    map, every q fixed) or inf; chi_1 = q_ratio = sigma_w^2 / 2 at every q; correlations
    follow the arc-cosine kernel, whose slope at c = 1 is 1 (xi_c = inf); and the GSC
    divides out the change of length: rate sqrt(chi_1 / q_ratio) = 1."""
    m = jl.mean_field("relu", sigma_w, 0.0)
    rho = sigma_w**2 / 2
    assert float(m.q_star) == q_star
    assert float(m.chi_1) == pytest.approx(rho, rel=1e-12)
    assert float(m.q_ratio) == pytest.approx(1.0 if q_star == 1.0 else rho, rel=1e-12)
    assert float(m.c_star) == 1.0 and np.isinf(m.xi_c)
    assert float(m.xi_q) == (np.inf if q_star == 1.0 else pytest.approx(1 / abs(np.log(rho))))
    assert float(jl.gsc_growth_rate("relu", sigma_w, 0.0)) == pytest.approx(1.0, rel=1e-12)


def test_measured_relu_gsc_is_scale_free_as_the_theory_says(key):
    """The network at sigma_w = 2 is the He network (sigma_w = sqrt(2)) times sqrt(2) per
    layer, so its measured GSC is the same to rounding (float64), as is the predicted rate
    (1). Before issue 21 the prediction was 0 at sigma_w = 2 (chi_1 read at q* = NaN)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 32), jnp.float64)
    he = jl.mlp(8, 32, "relu", sigma_w=np.sqrt(2), dtype="float64")
    big = jl.mlp(8, 32, "relu", sigma_w=2.0, dtype="float64")
    g_he, g_big = jl.gsc(he, he.init(key), x), jl.gsc(big, big.init(key), x)
    np.testing.assert_allclose(g_big, g_he, rtol=1e-10)
    assert float(jl.gsc_growth_rate("relu", 2.0, 0.0)) == pytest.approx(1.0, rel=1e-12)


def test_relu_with_bias_beyond_the_critical_line_has_infinite_q_star():
    """sigma_w^2 / 2 >= 1 and sigma_b > 0: lengths grow (linearly at sigma_w = sqrt(2)), the
    bias becomes negligible, and the map acts as ReLU without bias. Below: the closed form
    q* = sigma_b^2 / (1 - sigma_w^2 / 2)."""
    m = jl.mean_field("relu", np.array([1.0, np.sqrt(2), 1.5]), 0.5)
    np.testing.assert_array_equal(m.q_star, [0.25 / 0.5, np.inf, np.inf])
    np.testing.assert_allclose(m.chi_1, [0.5, 1.0, 1.125], rtol=1e-12)
    np.testing.assert_allclose(m.q_ratio, [1.0, 1.0, 1.125], rtol=1e-12)
    assert np.isinf(m.xi_q[1]) and float(m.xi_q[2]) == pytest.approx(1 / np.log(1.125))
    assert np.all(m.xi_q > 0) and np.all(m.xi_c > 0)  # depth scales are never negative


@pytest.mark.parametrize(
    "act, slope_sq", [("selu", 1.0507009873554805**2 / 2), ("gelu", 0.5), ("swish", 0.5)]
)
def test_unbounded_activations_in_the_chaotic_phase_have_infinite_q_star(act, slope_sq):
    """At sigma_w = 3 the length map grows without bound: for large q these activations act
    as a ReLU of slope lambda (SELU) or 1 (GELU, swish), so chi_1 = q_ratio = 9 slope^2 / 2,
    which the length map's own ratio V(q) / q approaches (O(1/q) from the negative side:
    1e-9 at q = 1e12)."""
    m = jl.mean_field(act, 3.0, 0.0)
    assert float(m.q_star) == np.inf and float(m.c_star) == 1.0
    np.testing.assert_allclose([m.chi_1, m.q_ratio], 9 * slope_sq, rtol=1e-12)
    ratio = float(mf.length_map(act, 1e12, 3.0, 0.0)) / 1e12
    assert ratio == pytest.approx(float(m.q_ratio), rel=1e-9)
    assert float(jl.gsc_growth_rate(act, 3.0, 0.0)) == pytest.approx(1.0, rel=1e-12)


def test_lengths_shrinking_to_zero():
    """tanh, sigma_w = 0.5, sigma_b = 0: q* = 0, where tanh is linear, so chi_1 = q_ratio =
    sigma_w^2 and xi_q = -1 / ln(sigma_w^2); the correlation map is the identity there
    (every correlation is kept): c* is undefined, NaN. ReLU at sigma_w = 1: chi_1 = 1/2
    (not relu'(0) = 0) and c* = 1 (the arc-cosine kernel)."""
    m = jl.mean_field("tanh", 0.5, 0.0)
    assert float(m.q_star) == 0.0 and np.isnan(m.c_star) and np.isinf(m.xi_c)
    np.testing.assert_allclose([m.chi_1, m.q_ratio], 0.25, rtol=1e-12)
    assert float(m.xi_q) == pytest.approx(-1 / np.log(0.25), rel=1e-12)
    np.testing.assert_allclose(mf.correlation_map("tanh", [0.2, 0.7], 0.0, 0.5, 0.0), [0.2, 0.7])
    relu = jl.mean_field("relu", 1.0, 0.0)
    assert float(relu.chi_1) == pytest.approx(0.5, rel=1e-12) and float(relu.c_star) == 1.0


def test_limit_maps_are_the_kernels_of_the_homogeneous_limits():
    """At q = inf SELU is lambda * ReLU: its correlation map is the arc-cosine kernel, and
    phi'(u)^2 takes the values lambda^2 and 0 with probability 1/2 each."""
    c = np.array([-0.9, 0.0, 0.5, 0.99])
    arc_cos = (np.sqrt(1 - c**2) + (np.pi - np.arccos(c)) * c) / np.pi
    np.testing.assert_allclose(mf.correlation_map("selu", c, np.inf, 2.0, 0.3), arc_cos)
    np.testing.assert_allclose(mf.correlation_map("relu", c, np.inf, 2.0, 0.3), arc_cos)
    values, weights = mf.derivative_distribution("relu", np.inf)
    np.testing.assert_array_equal(values, [1.0, 0.0])
    np.testing.assert_array_equal(weights, [0.5, 0.5])
    np.testing.assert_allclose(mf.chi("selu", np.inf, 1.0), 1.0507009873554805**2 / 2)


def test_critical_sigma_w_of_homogeneous_activations_is_closed_form():
    """chi_1 = sigma_w^2 E[phi'(z)^2] at every q* for ReLU and linear networks: sqrt(2) and
    1 for every sigma_b (for ReLU with sigma_b > 0 the lengths then grow linearly). tanh at
    sigma_b = 0: 1, to the bisection's resolution of chi_1 - 1 = O((sigma_w - 1)^2) against
    the quadrature's 1e-13 (measured 4e-8)."""
    sb = np.array([0.0, 0.1, 1.0])
    np.testing.assert_allclose(jl.critical_sigma_w("relu", sb), np.sqrt(2), rtol=1e-15)
    np.testing.assert_allclose(jl.critical_sigma_w("linear", sb), 1.0, rtol=1e-15)
    assert float(jl.critical_sigma_w("tanh", 0.0)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: jl.mean_field("tanh", np.nan, 0.0), r"sigma_w must be finite and >= 0.*nan"),
        (lambda: jl.mean_field("tanh", -1.0, 0.0), r"sigma_w must be finite and >= 0.*-1.0"),
        (lambda: jl.mean_field("tanh", [1.0, np.inf], 0.0), r"sigma_w .*entry 1 of 2"),
        (lambda: jl.mean_field("tanh", 1.0, -0.1), r"sigma_b must be finite and >= 0"),
        (lambda: jl.gsc_growth_rate("relu", np.nan, 0.0, "layer"), r"sigma_w must be"),
        (lambda: jl.critical_sigma_w("tanh", np.nan), r"sigma_b must be finite"),
        (lambda: mf.length_map("tanh", -1.0, 1.0, 0.0), r"q must be >= 0"),
        (lambda: mf.correlation_map("tanh", 1.5, 1.0, 1.0, 0.0), r"c must be in \[-1, 1\]"),
        (lambda: mf.gsc_profile("tanh", 1.0, 0.0, 4, q1=np.nan), r"q1 must be >= 0"),
        (
            lambda: mf.residual_gsc_profile("relu", 1.0, 0.0, 3, residual_scale=np.nan),
            r"residual_scale must be finite",
        ),
        (lambda: jl.jacobian_moments("relu", np.nan, 0.0, 3), r"sigma_w must be"),
        (lambda: jl.jacobian_spectral_density("relu", 1.0, np.nan, 3, [1.0]), r"sigma_b must"),
    ],
)
def test_theory_arguments_out_of_range_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_gsc_profile_refuses_lengths_beyond_float64():
    """ReLU at sigma_w = 4 multiplies the lengths by 8 per layer: past about 340 layers
    they are no float64 number and the profile's length ratio would be inf / inf."""
    np.testing.assert_allclose(mf.gsc_profile("relu", 4.0, 0.0, 20), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match=r"beyond float64's range"):
        mf.gsc_profile("relu", 4.0, 0.0, 400)
