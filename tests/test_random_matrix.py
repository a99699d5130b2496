import numpy as np
import pytest
from scipy.integrate import quad

import jacobian_lab as jl
from jacobian_lab import random_matrix as rm


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_fuss_catalan_density_integrates_to_one_and_has_the_combinatorial_moments(depth):
    """Integrated in y with x = y^(L+1), which removes the x^(-L/(L+1)) singularity at 0."""
    top = ((depth + 1) ** (depth + 1) / depth**depth) ** (1 / (depth + 1))

    def moment(k):
        def integrand(y):
            x = y ** (depth + 1)
            return x**k * rm.fuss_catalan_density(depth, np.array(x)) * (depth + 1) * y**depth

        return quad(integrand, 0, top, limit=500)[0]

    for k in range(4):
        assert moment(k) == pytest.approx(rm.fuss_catalan_moments(depth, k), rel=1e-7)


def test_fuss_catalan_moments_known_values():
    np.testing.assert_allclose(rm.fuss_catalan_moments(1, np.arange(5)), [1, 1, 2, 5, 14])
    np.testing.assert_allclose(rm.fuss_catalan_moments(7, [1, 2]), [1, 8])  # k=2: L + 1


def test_one_layer_fuss_catalan_is_marchenko_pastur():
    x = np.linspace(0.01, 3.99, 50)
    np.testing.assert_allclose(
        rm.fuss_catalan_density(1, x), rm.marchenko_pastur_density(x), rtol=1e-9
    )
    assert quad(lambda v: rm.marchenko_pastur_density(v, 1.5), 0, 9)[0] == pytest.approx(1)


def test_free_probability_moments_reduce_to_known_cases():
    mean, var = rm.jacobian_moments("linear", 1.0, 0.0, 6)  # Fuss-Catalan: 1 and L
    np.testing.assert_allclose(mean, 1.0)
    np.testing.assert_allclose(var, np.arange(1, 7), rtol=1e-12)
    mean, var = rm.jacobian_moments("linear", 1.3, 0.0, 3, "orthogonal")  # exact isometry
    np.testing.assert_allclose(mean, 1.69 ** np.arange(1, 4), rtol=1e-12)
    np.testing.assert_allclose(var, 0.0, atol=1e-12)
    # ReLU: D^2 is Bernoulli(1/2), v_D = 1: orthogonal ReLU spreads like Gaussian linear
    _, var = rm.jacobian_moments("relu", np.sqrt(2), 0.0, 5, "orthogonal")
    np.testing.assert_allclose(var, np.arange(1, 6), rtol=1e-12)


def test_measured_deep_linear_spectrum_matches_fuss_catalan(key):
    """Width 256, depth 3, 8 seeds: E[lambda] = 1 and E[lambda^2] = L + 1 = 4. The second
    moment's Monte-Carlo error over 8 x 256 eigenvalues is a few percent, and its finite-
    width bias is O(L^2 / n) ~ 4%: tolerance 12%."""
    import jax

    net = jl.mlp(3, 256, "linear", dtype="float64")
    x = jax.numpy.ones((1, 256))
    lam = np.concatenate(
        [
            np.asarray(jl.singular_values(jl.input_output_jacobian(net, net.init(k), x))) ** 2
            for k in jax.random.split(key, 8)
        ]
    )
    assert lam.mean() == pytest.approx(1.0, rel=0.05)
    assert (lam**2).mean() == pytest.approx(4.0, rel=0.12)


def test_ks_distance_of_a_sample_from_its_own_law_is_small_and_detects_a_shift():
    """100000 uniform draws: KS ~ 1/sqrt(n) = 0.003 against U(0, 1), 0.1 against a law
    shifted by 0.1."""
    u = np.random.default_rng(0).uniform(size=100_000)
    grid = np.linspace(0, 1, 1001)
    assert rm.ks_distance(u, grid, grid) < 0.01
    shifted = np.clip(grid - 0.1, 0, None)
    assert rm.ks_distance(u, grid, shifted) == pytest.approx(0.1, abs=0.01)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown weights"):
        rm.jacobian_moments("relu", 1.0, 0.0, 3, "uniform")
    with pytest.raises(ValueError, match="depth must be >= 1"):
        rm.fuss_catalan_density(0, 1.0)
    with pytest.raises(ValueError, match="points x > 0"):
        rm.jacobian_spectral_density("tanh", 1.2, 0.1, 2, [0.0, 1.0])


def test_free_probability_density_reduces_to_marchenko_pastur_and_fuss_catalan():
    x = np.linspace(0.05, 3.9, 9)
    np.testing.assert_allclose(
        rm.jacobian_spectral_density("linear", 1.0, 0.0, 1, x),
        rm.marchenko_pastur_density(x),
        rtol=1e-6,
    )
    x = np.linspace(0.05, 9.0, 9)
    np.testing.assert_allclose(
        rm.jacobian_spectral_density("linear", 1.0, 0.0, 3, x),
        rm.fuss_catalan_density(3, x),
        rtol=1e-6,
        atol=1e-12,
    )


@pytest.mark.parametrize(
    "act, sw, sb, depth, weights, top",
    [("relu", np.sqrt(2), 0.0, 2, "gaussian", 30.0), ("tanh", 1.2, 0.1, 4, "orthogonal", 10.0)],
)
def test_free_probability_density_has_the_closed_form_moments(act, sw, sb, depth, weights, top):
    """The numerically solved density and the S-transform series agree on the mean and the
    variance (trapezoid rule on 4400 points: 0.3%). ReLU: half the mass is an atom at 0."""
    x = np.concatenate([np.geomspace(1e-6, 0.05, 400), np.linspace(0.05, top, 4000)[1:]])
    d = rm.jacobian_spectral_density(act, sw, sb, depth, x, weights)
    q = float(jl.mean_field(act, sw, sb).q_star)
    mean, var = rm.jacobian_moments(act, sw, sb, depth, weights, q1=q)
    m1, m2 = np.trapezoid(x * d, x), np.trapezoid(x * x * d, x)
    assert m1 == pytest.approx(mean[-1], rel=3e-3)
    assert m2 - m1**2 == pytest.approx(var[-1], rel=3e-3)
    if act == "relu":
        assert np.trapezoid(d, x) == pytest.approx(0.5, abs=3e-3)


def test_measured_tanh_spectrum_matches_free_probability_by_kolmogorov_smirnov(key):
    """Orthogonal tanh network at sigma_w = 1.2, sigma_b = 0.1, depth 4, width 400, inputs
    scaled onto the fixed point q*. Eigenvalues of one matrix repel, so the empirical CDF
    of 4 x 400 of them sits far closer to the limit than an i.i.d. sample would; the
    remaining error is the O(depth / width) = 1% finite-width correction. Tolerance: KS
    distance 0.04."""
    import jax

    sw, sb, depth, width = 1.2, 0.1, 4, 400
    q_star = float(jl.mean_field("tanh", sw, sb).q_star)
    net = jl.mlp(
        depth, width, "tanh", weight_init="orthogonal", sigma_w=sw, sigma_b=sb, dtype="float64"
    )
    x = jax.random.normal(key, (1, width), jax.numpy.float64)
    x = x / jax.numpy.linalg.norm(x) * np.sqrt(width * (q_star - sb**2) / sw**2)
    lam = np.sort(
        np.concatenate(
            [
                np.asarray(
                    jl.singular_values(jl.input_output_jacobian(net, net.init(k), x))
                ).ravel()
                ** 2
                for k in jax.random.split(key, 4)
            ]
        )
    )
    grid = np.linspace(1e-4, lam.max() * 1.5, 3000)
    density = rm.jacobian_spectral_density("tanh", sw, sb, depth, grid, "orthogonal")
    ks = rm.ks_distance(lam, grid, rm.cdf_from_density(grid, density))
    assert ks < 0.04


def test_free_probability_of_relu_beyond_he_is_the_he_law_rescaled():
    """ReLU without bias at sigma_w = 2 has q* = inf (issue 21: the density raised
    ZeroDivisionError there), but D^2 is Bernoulli(1/2) at every length, so J J^T is the He
    network's times s = (sigma_w^2 / 2)^L: mean s, density rho_he(x / s) / s. Both sides
    are solved by the same Newton continuation (1e-13 steps): agreement to 1e-6."""
    depth, s = 3, (2.0**2 / 2) ** 3
    x = np.array([0.5, 2.0, 8.0, 20.0])
    big = rm.jacobian_spectral_density("relu", 2.0, 0.0, depth, x)
    he = rm.jacobian_spectral_density("relu", np.sqrt(2), 0.0, depth, x / s) / s
    np.testing.assert_allclose(big, he, rtol=1e-6)
    mean, _ = rm.jacobian_moments("relu", 2.0, 0.0, depth)
    np.testing.assert_allclose(mean, 2.0 ** np.arange(1, depth + 1), rtol=1e-12)
