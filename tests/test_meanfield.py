"""Mean-field maps against closed forms. Quadrature is float64 Gauss-Legendre split at
kinks, so agreement is to about 1e-12."""

import numpy as np
import pytest

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
    import jax
    import jax.numpy as jnp

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
    import jacobian_lab as jl

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
    import jax

    import jacobian_lab as jl

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
