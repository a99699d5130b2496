import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl


def test_singular_values_of_a_known_matrix(key):
    """U diag(s) V^T with random orthogonal U, V has singular values s, descending."""
    s = jnp.array([5.0, 2.0, 0.5])
    U = jl.weight_matrix(key, "orthogonal", 3, 3, dtype=jnp.float64)
    V = jl.weight_matrix(jax.random.PRNGKey(7), "orthogonal", 3, 3, dtype=jnp.float64)
    A = U @ jnp.diag(s) @ V.T
    np.testing.assert_allclose(jl.singular_values(A), s, rtol=1e-12)
    summary = jl.spectrum_summary(jl.singular_values(jnp.stack([A, 2 * A])))
    np.testing.assert_allclose(summary.max, [5.0, 10.0], rtol=1e-12)
    np.testing.assert_allclose(summary.min, [0.5, 1.0], rtol=1e-12)
    np.testing.assert_allclose(summary.condition_number, [10.0, 10.0], rtol=1e-12)
    sq = np.array([25.0, 4.0, 0.25])
    np.testing.assert_allclose(summary.mean_sq[0], sq.mean(), rtol=1e-12)
    np.testing.assert_allclose(summary.var_sq[0], sq.var(), rtol=1e-12)
    np.testing.assert_allclose(summary.log_spread[0], np.log(s).std(), rtol=1e-12)
    # mean squared singular value is ||A||_F^2 / min(m, n)
    np.testing.assert_allclose(summary.mean_sq[0], jnp.sum(A**2) / 3, rtol=1e-12)


def test_singular_values_needs_a_matrix():
    with pytest.raises(ValueError, match="needs a matrix"):
        jl.singular_values(jnp.ones(3))


def test_density_estimate_integrates_to_one_and_finds_a_known_law(key):
    """A kernel density estimate of N(0, 1) samples (squared=False) integrates to 1 and is
    within 0.02 of the normal density: KDE error at 20,000 samples is ~ N^(-2/5) = 0.02
    in relative terms at the mode (0.4), i.e. ~0.008 absolute."""
    samples = jax.random.normal(key, (20000,), jnp.float64)
    grid = jnp.linspace(-6, 6, 1201)
    dens = jl.spectral_density(samples, grid, squared=False)
    np.testing.assert_allclose(jnp.trapezoid(dens, grid), 1.0, rtol=1e-6)
    normal = jnp.exp(-(grid**2) / 2) / jnp.sqrt(2 * jnp.pi)
    assert float(jnp.abs(dens - normal).max()) < 0.02


def test_orthogonal_linear_network_spectrum_is_a_point_mass(key):
    net = jl.mlp(8, 12, "linear", weight_init="orthogonal", dtype="float64")
    x = jax.random.normal(key, (2, 12), jnp.float64)
    s = jl.singular_values(jl.input_output_jacobian(net, net.init(key), x))
    summary = jl.spectrum_summary(s)
    np.testing.assert_allclose(summary.condition_number, 1.0, rtol=1e-12)
    np.testing.assert_allclose(summary.var_sq, 0.0, atol=1e-12)


def test_prefix_singular_values_are_those_of_the_prefix_networks(key):
    """The prefix of depth D of an MLP is the MLP of depth D with the same first layers.
    SVD errors are absolute, about eps * sigma_max (sigma_max ~ 1 here): atol 1e-13."""
    net = jl.mlp(5, 6, "tanh", dtype="float64")
    params = net.init(key)
    x = jax.random.normal(key, (2, 6), jnp.float64)
    s = jl.prefix_singular_values(net, params, x, [1, 3, 5])
    assert s.shape == (2, 3, 6)
    np.testing.assert_allclose(
        s[:, 2], jl.singular_values(jl.input_output_jacobian(net, params, x)), atol=1e-13
    )
    short = jl.mlp(3, 6, "tanh", dtype="float64")
    short_params = {
        "stem": params["stem"],
        "units": jax.tree_util.tree_map(lambda a: a[:2], params["units"]),
    }
    np.testing.assert_allclose(
        s[:, 1], jl.singular_values(jl.input_output_jacobian(short, short_params, x)), atol=1e-13
    )
    with pytest.raises(ValueError, match="depths must lie in 1..5"):
        jl.prefix_singular_values(net, params, x, [0, 6])


def test_default_density_integrates_to_one_for_point_masses_and_spread_spectra(key):
    """The default bandwidth is floored at the grid step: a point mass (all s = 1: the
    rule-of-thumb width was 0 and the density 0/0) and a near point mass (an orthogonal
    network, s = 1 +- 1e-7: a spike integrating to ~1e4 on the grid) integrate to 1 by the
    trapezoid rule on a grid covering them, as does a Marchenko-Pastur sample (its width
    is the rule's). Same for Spectrum.density, dense and matrix-free."""
    grid = jnp.linspace(-2.0, 5.0, 1401)  # step 0.005; covers the MP spectrum by 5 widths
    net = jl.mlp(8, 16, "linear", weight_init="orthogonal", dtype="float64")
    x = jax.random.normal(key, (2, 16), jnp.float64)
    orth = jl.singular_values(jl.input_output_jacobian(net, net.init(key), x))
    W = jax.random.normal(key, (200, 100), jnp.float64) / np.sqrt(200)  # MP, ratio 1/2
    for s in (jnp.ones(16), orth, jl.singular_values(W)):
        dens = jl.spectral_density(s, grid)
        assert bool(jnp.all(jnp.isfinite(dens)))
        np.testing.assert_allclose(jnp.trapezoid(dens, grid), 1.0, atol=1e-6)
    Q = jl.weight_matrix(key, "orthogonal", 40, 40, dtype=jnp.float64)
    for fn, x0 in ((lambda v: Q @ v, jnp.zeros(40)), (lambda v: W @ v, jnp.zeros(100))):
        for method in ("dense", "matrix_free"):
            spec = jl.jacobian_spectrum(fn, x0, method=method, num_probes=8, num_matvecs=12)
            np.testing.assert_allclose(jnp.trapezoid(spec.density(grid), grid), 1.0, atol=1e-6)
    # an explicit bandwidth is used as given: the density of N(1, 0.1^2)
    dens = jl.spectral_density(jnp.ones(3), grid, bandwidth=0.1, squared=False)
    np.testing.assert_allclose(dens.max(), 1 / (0.1 * np.sqrt(2 * np.pi)), rtol=1e-3)
    with pytest.raises(ValueError, match="bandwidth must be a positive number"):
        jl.spectral_density(jnp.ones(3), grid, bandwidth=0.0)
