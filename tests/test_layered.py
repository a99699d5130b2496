import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl

ARCHS = {
    "tanh-layer": lambda: jl.mlp(
        5, 6, "tanh", in_dim=4, norm="layer", sigma_b=0.2, dtype="float64"
    ),
    "selu": lambda: jl.mlp(5, 6, "selu", in_dim=4, dtype="float64"),
    "resnet-gelu": lambda: jl.resmlp(3, 6, "gelu", in_dim=4, norm="layer", dtype="float64"),
    "resnet-post": lambda: jl.resmlp(3, 6, "tanh", in_dim=4, block_order="post", dtype="float64"),
}


def _x(n, d, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), jnp.float64)


@pytest.mark.parametrize("arch", ARCHS)
def test_input_output_jacobian_matches_jacfwd_jacrev_and_finite_differences(key, arch):
    net = ARCHS[arch]()
    params = net.init(key)
    x = _x(3, 4)
    J = jl.input_output_jacobian(net, params, x)
    assert J.shape == (3, 6, 4)
    # the product of per-layer Jacobians gives the same matrix as differentiating the whole
    products = jl.layer_to_layer_jacobians(net, params, x).from_input[:, 0]
    np.testing.assert_allclose(products, J, rtol=1e-11, atol=1e-13)

    def fn(v):
        return net.apply(params, v[None])[0]

    h = 1e-6
    for s in range(3):
        fd = jnp.stack(
            [(fn(x[s] + h * e) - fn(x[s] - h * e)) / (2 * h) for e in jnp.eye(4)], axis=1
        )
        np.testing.assert_allclose(J[s], jax.jacfwd(fn)(x[s]), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(J[s], jax.jacrev(fn)(x[s]), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(J[s], fd, rtol=1e-6, atol=1e-8)


def _sub_network(net, params, k, l):
    """f_l as a function of f_k (paper indexing), written directly from the units."""
    L = net.num_layers

    def fn(h):
        h = h[None]
        if k == L:
            h = net.stem(params, h)
        start = min(k, L - 1)
        for layer in range(start, l, -1):  # unit producing f_{layer-1}
            i = L - layer  # forward index of that unit in the stacked params
            h = net.unit(jax.tree_util.tree_map(lambda a, i=i: a[i - 1], params["units"]), h)
        return h[0]

    return fn


@pytest.mark.parametrize("arch", ARCHS)
def test_all_pairs_products_equal_directly_differentiated_sub_networks(key, arch):
    net = ARCHS[arch]()
    params = net.init(key)
    x = _x(1, 4)
    pj = jl.layer_to_layer_jacobians(net, params, x)
    L = net.num_layers
    assert pj.hidden.shape == (1, L, L, 6, 6)
    acts = net.activations(params, x)
    f = [acts[i] for i in range(L)] + [x]
    for s in range(1):
        for k in range(L + 1):
            for l in range(min(k + 1, L)):
                direct = jax.jacfwd(_sub_network(net, params, k, l))(f[k][s])
                got = pj.from_input[s, l] if k == L else pj.hidden[s, l, k]
                np.testing.assert_allclose(got, direct, rtol=1e-11, atol=1e-12)
        # entries with k < l (f_k above f_l) are zero
        below = jnp.tril(jnp.ones((L, L)), -1)[..., None, None] * pj.hidden[s]  # [l, k], k < l
        assert float(jnp.abs(below).max()) == 0


def test_layer_jacobians_shapes_and_order(key):
    net = jl.mlp(4, 5, "tanh", in_dim=3, dtype="float64")
    params = net.init(key)
    x = _x(2, 3)
    lj = jl.layer_jacobians(net, params, x)
    assert lj.units.shape == (2, 3, 5, 5) and lj.stem.shape == (2, 5, 3)
    # units[:, l] = d f_l / d f_{l+1}: the last unit's Jacobian comes first
    acts = net.activations(params, x)
    p_last = jax.tree_util.tree_map(lambda a: a[-1], params["units"])
    direct = jax.jacfwd(lambda h: net.unit(p_last, h[None])[0])(acts[1, 0])
    np.testing.assert_allclose(lj.units[0, 0], direct, rtol=1e-12)


def test_batch_norm_jacobian_is_taken_over_the_whole_batch(key):
    """With batch statistics, example i's output depends on example j's input, and a shift
    of every input by the same vector is removed by the first normalization. The
    whole-batch Jacobian shows both; per-example differentiation (statistics held fixed,
    i.e. only the diagonal blocks) shows neither."""
    B, d, n = 4, 3, 5
    net = jl.mlp(3, n, "tanh", in_dim=d, norm="batch", dtype="float64")
    params = net.init(key)
    x = _x(B, d)
    J = jl.input_output_jacobian(net, params, x)
    assert J.shape == (1, B * n, B * d)
    J = J[0]
    np.testing.assert_allclose(
        J, jax.jacfwd(lambda v: net.apply(params, v).ravel())(x).reshape(B * n, B * d), rtol=1e-12
    )
    blocks = J.reshape(B, n, B, d)
    off_diagonal = [blocks[i, :, j] for i in range(B) for j in range(B) if i != j]
    assert min(float(jnp.abs(b).max()) for b in off_diagonal) > 1e-3
    # common shift directions 1 (x) v are in the null space
    shifts = jnp.kron(jnp.ones((B, 1)), jnp.eye(d))  # (B*d, d)
    np.testing.assert_allclose(J @ shifts, 0, atol=1e-10)

    # Per-example differentiation with the batch statistics frozen at their values:
    stem = params["stem"]
    z = x @ stem["W"].T + stem["b"]
    mean, std = z.mean(0), jnp.sqrt(z.var(0) + net.norm_eps)

    def frozen(v):  # one example through the first layer with fixed statistics
        return jnp.tanh((v @ stem["W"].T + stem["b"] - mean) / std)

    per_example = jax.jacfwd(frozen)(x[0])
    whole_batch = jl.layer_jacobians(net, params, x).stem[0].reshape(B, n, B, d)[0, :, 0]
    assert float(jnp.abs(whole_batch - per_example).max()) > 1e-3


def test_batch_norm_accepts_several_batches(key):
    net = jl.mlp(3, 4, "relu", norm="batch", dtype="float64")
    params = net.init(key)
    xs = jax.random.normal(key, (2, 5, 4), jnp.float64)
    g = jl.gsc(net, params, xs)
    assert g.shape == (2, net.num_layers + 1)
    np.testing.assert_allclose(g[1], jl.gsc(net, params, xs[1])[0], rtol=1e-12)


def test_non_finite_network_names_the_first_bad_layer(key):
    """Weights of scale 1e6 in float32: activations grow by ~1e6 per layer and overflow
    at the 7th layer from the input, which is f_3 of a 10-layer network."""
    net = jl.mlp(10, 16, "linear", sigma_w=1e6)
    params = net.init(key)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16), jnp.float32)
    with pytest.raises(
        FloatingPointError, match=r"f_3 = output of 'dense7' \(layer 7 of 10 from the input\)"
    ):
        jl.gsc(net, params, x)
    with pytest.raises(FloatingPointError, match="f_3"):
        jl.layer_jacobians(net, params, x)


def test_input_to_layer_jacobians_are_the_prefix_networks_jacobians(key):
    net = jl.mlp(5, 6, "tanh", in_dim=4, dtype="float64")
    params = net.init(key)
    x = jax.random.normal(key, (2, 4), jnp.float64)
    P = jl.input_to_layer_jacobians(net, params, x)
    assert P.shape == (2, 5, 6, 4)
    np.testing.assert_allclose(P[:, 0], jl.input_output_jacobian(net, params, x), rtol=1e-12)
    for l in range(5):
        direct = jax.vmap(jax.jacfwd(lambda v, l=l: net.activations(params, v[None])[l, 0]))(x)
        np.testing.assert_allclose(P[:, l], direct, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("arch", ["layer-selu", "layer-tanh", "batch-relu"])
def test_batched_layer_jacobians_equal_one_input_at_a_time(key, arch):
    """Regression: jit(vmap(jacfwd)) of a normalization written with a square returned wrong
    Jacobians for every batch element but the first at width 256 x batch 16 (jax 0.10.2,
    CPU), with errors of 1e-2 and more. Each sample must get the Jacobian it gets alone, in
    float32, up to summation-order rounding (1e-5 absolute; entries are of order 1)."""
    net = jl.architecture(arch, depth=2, width=256)
    shape = (4, 4, 256) if arch == "batch-relu" else (16, 256)
    x = jax.random.normal(key, shape, jnp.float32)
    params = net.init(key)
    together = jl.layer_jacobians(net, params, x)
    for i in range(x.shape[0]):
        alone = jl.layer_jacobians(net, params, x[i : i + 1] if x.ndim == 2 else x[i])
        np.testing.assert_allclose(together.stem[i], alone.stem[0], atol=1e-5)
        np.testing.assert_allclose(together.units[i], alone.units[0], atol=1e-5)
