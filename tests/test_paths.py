import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import comb

import jacobian_lab as jl
from jacobian_lab.initializers import normal
from jacobian_lab.paths import path_decomposition


def test_scalar_branches_give_binomial_path_sums(key):
    """With every branch Jacobian a * I, the paths of length k sum to C(n, k) a^k v and one
    path's gradient has norm a^k ||v||."""
    n, d, a = 7, 5, 0.3
    J = jnp.broadcast_to(a * jnp.eye(d), (n, d, d))
    v = jax.random.normal(key, (d,), jnp.float64)
    G, per_path = path_decomposition(J, v, key, num_paths=4)
    k = np.arange(n + 1)
    np.testing.assert_allclose(G, (comb(n, k) * a**k)[:, None] * v[None], rtol=1e-12)
    np.testing.assert_allclose(per_path, a**k * jnp.linalg.norm(v), rtol=1e-12)


def test_path_sums_add_up_to_the_whole_backward_pass(key):
    n, d = 6, 4
    J = 0.5 * jax.random.normal(key, (n, d, d), jnp.float64)
    v = jax.random.normal(jax.random.PRNGKey(3), (d,), jnp.float64)
    G, _ = path_decomposition(J, v, key)
    g = v
    for l in range(n):  # block 0 is nearest the output
        g = (jnp.eye(d) + J[l]).T @ g
    np.testing.assert_allclose(G.sum(0), g, rtol=1e-12)
    np.testing.assert_allclose(G[1], sum(J[l].T @ v for l in range(n)), rtol=1e-12)


def test_network_path_gradients_match_backpropagation(key):
    """The full gradient equals the vector-Jacobian product of the block stack, computed by
    jax.vjp (the output direction is the same draw the function makes)."""
    net = jl.resmlp(5, 8, "tanh", norm="layer", dtype="float64")
    params = net.init(key)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8), jnp.float64)
    pg = jl.path_gradients(net, params, x, key, num_paths=4)
    assert pg.exact.shape == (3, 6) and pg.per_path.shape == (3, 6)
    v = normal(key, (3, 8), jnp.float64)  # the draw the function makes

    def blocks(h):
        return jax.lax.scan(lambda h, p: (net.unit(p, h), None), h, params["units"])[0]

    h0 = net.stem(params, x)
    _, pullback = jax.vjp(blocks, h0)
    (g,) = pullback(v)
    np.testing.assert_allclose(pg.full, jnp.linalg.norm(g, axis=1), rtol=1e-10)
    np.testing.assert_allclose(pg.exact[:, 0], jnp.linalg.norm(v, axis=1), rtol=1e-12)
    np.testing.assert_allclose(pg.num_paths, comb(5, np.arange(6)), rtol=1e-10)


def test_path_gradients_need_pre_activation_residual_blocks(key):
    net = jl.mlp(3, 4, "relu")
    with pytest.raises(ValueError, match="no residual blocks"):
        jl.path_gradients(net, net.init(key), jnp.ones((2, 4)), key)
    with pytest.raises(ValueError, match="num_paths must be >= 1"):
        path_decomposition(jnp.zeros((2, 3, 3)), jnp.zeros(3), key, num_paths=0)
    with pytest.raises(ValueError, match=r"v must have shape \(3,\)"):
        path_decomposition(jnp.zeros((2, 3, 3)), jnp.zeros(4), key)
