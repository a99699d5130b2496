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


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown weights"):
        rm.jacobian_moments("relu", 1.0, 0.0, 3, "uniform")
    with pytest.raises(ValueError, match="depth must be >= 1"):
        rm.fuss_catalan_density(0, 1.0)
