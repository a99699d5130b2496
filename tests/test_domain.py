import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl
from jacobian_lab.domain import mean_pairwise_cosine, sign_diversity


def test_pairwise_cosine_of_known_configurations():
    same = jnp.ones((4, 3))
    assert float(mean_pairwise_cosine(same)) == pytest.approx(1.0)
    assert float(mean_pairwise_cosine(jnp.eye(5))) == pytest.approx(0.0)
    opposite = jnp.array([[1.0, 2.0], [-1.0, -2.0]])
    assert float(mean_pairwise_cosine(opposite)) == pytest.approx(-1.0)


def test_sign_diversity_counts_the_minority_sign():
    z = jnp.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]])
    # neuron 0: 3 positive 1 negative -> 1/4; neuron 1: same; neuron 2: all zero -> 0
    assert float(sign_diversity(z)) == pytest.approx((0.25 + 0.25 + 0.0) / 3)


def test_orthogonal_linear_network_preserves_every_angle(key):
    """An orthogonal linear map preserves inner products, so every layer has the inputs'
    pairwise cosine; its pre-activations are its outputs."""
    net = jl.mlp(6, 10, "linear", weight_init="orthogonal", dtype="float64")
    params = net.init(key)
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 10), jnp.float64)
    stats = jl.domain_statistics(net, params, x)
    assert stats.cosine.shape == (7,) and stats.sign_diversity.shape == (6,)
    np.testing.assert_allclose(stats.cosine, stats.cosine[-1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(net.preactivations(params, x), net.activations(params, x))


def test_preactivations_feed_the_nonlinearity(key):
    net = jl.mlp(4, 6, "tanh", norm="layer", dtype="float64")
    params = net.init(key)
    x = jax.random.normal(key, (3, 6), jnp.float64)
    np.testing.assert_allclose(
        jnp.tanh(net.preactivations(params, x)), net.activations(params, x), rtol=1e-12
    )


def test_deep_relu_network_collapses_its_domain(key):
    """Mean-field: the correlation map of a ReLU network at sigma_w^2 = 2 drives every
    pair of inputs towards correlation 1, so independent inputs end nearly aligned."""
    net = jl.mlp(40, 64, "relu", sigma_w=2**0.5, dtype="float64")
    x = jax.random.normal(jax.random.PRNGKey(5), (6, 64), jnp.float64)
    stats = jl.domain_statistics(net, net.init(key), x)
    assert abs(float(stats.cosine[-1])) < 0.3  # independent inputs
    assert float(stats.cosine[0]) > 0.9
    assert float(stats.sign_diversity[0]) < float(stats.sign_diversity[-1]) / 3


def test_domain_statistics_bad_input(key):
    net = jl.resmlp(2, 4, "relu")
    with pytest.warns(jl.DomainWarning, match="no known pre-activation \\('stem'\\)"):
        st = jl.domain_statistics(net, net.init(key), jax.random.normal(key, (3, 4)))
    # the paper's indexing: index 0 is the output, the stem (first layer) is the last
    assert np.isnan(st.sign_diversity[-1]) and np.isnan(st.preact_std[-1])
    assert np.isfinite(st.sign_diversity[:-1]).all() and np.isfinite(st.cosine).all()
    net = jl.mlp(2, 4, "relu")
    with pytest.raises(ValueError, match="at least 2 inputs"):
        jl.domain_statistics(net, net.init(key), jnp.ones((1, 4)))


def test_one_pass_gives_the_activations_of_the_forward_pass(key):
    net = jl.mlp(4, 5, "selu", norm="layer", dtype="float64")
    params = net.init(key)
    x = jax.random.normal(key, (3, 5), jnp.float64)
    acts, pre = net.activations_and_preactivations(params, x)
    np.testing.assert_allclose(acts, net.activations(params, x), rtol=1e-13)
    np.testing.assert_allclose(pre, net.preactivations(params, x), rtol=1e-13)


def test_pairwise_cosine_keeps_rows_whose_norm_overflows():
    """Entries of 1e30 are finite in float32 but their norm (~2e30 * sqrt(d)) squared is
    not: identical rows still have cosine 1, opposite rows -1 (not 0 from inf / inf)."""
    row = jnp.full((4,), 1e30, jnp.float32)
    assert float(mean_pairwise_cosine(jnp.stack([row, row]))) == pytest.approx(1.0, abs=1e-6)
    assert float(mean_pairwise_cosine(jnp.stack([row, -row]))) == pytest.approx(-1.0, abs=1e-6)
