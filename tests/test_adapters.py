"""Models written in Flax (linen and NNX) and Equinox, given the weights of a built-in
network, give that network's Jacobians, GSC and block diagnostics."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl

WIDTH, DEPTH, EPS = 8, 3, 1e-5


def _zoo_resnet(key):
    """A pre-order ResNet: linear stem, blocks h + r(h), r = 2 x (dense, layer norm, relu)."""
    net = jl.resmlp(
        DEPTH,
        WIDTH,
        "relu",
        norm="layer",
        order="linear-norm-act",
        block_layers=2,
        dtype="float64",
    )
    return net, net.init(key)


def _x(n=3):
    return jax.random.normal(jax.random.PRNGKey(7), (n, WIDTH), jnp.float64)


def _assert_same_diagnostics(net, params, ch, cp):
    x = _x()
    for fn in (jl.gsc, jl.gsc_matrix, jl.input_output_jacobian):
        np.testing.assert_allclose(fn(ch, cp, x), fn(net, params, x), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        jl.layer_to_layer_jacobians(ch, cp, x).hidden,
        jl.layer_to_layer_jacobians(net, params, x).hidden,
        rtol=1e-9,
        atol=1e-12,
    )
    if net.residual:
        for fn in (jl.block_gsc, jl.pythagorean_decomposition):
            for a, b in zip(fn(ch, cp, x), fn(net, params, x), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        k = jax.random.PRNGKey(3)
        for a, b in zip(
            jl.block_jacobian_stats(ch, cp, x, k),
            jl.block_jacobian_stats(net, params, x, k),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def _unit(params, i, j):
    return jax.tree_util.tree_map(lambda a: a[i, j], params["units"])


def test_flax_linen_resnet_matches_the_builtin_network(key):
    nn = pytest.importorskip("flax.linen")

    class Branch(nn.Module):
        @nn.compact
        def __call__(self, h):
            for _ in range(2):
                h = nn.Dense(WIDTH, param_dtype=jnp.float64)(h)
                h = nn.LayerNorm(epsilon=EPS, use_scale=False, use_bias=False)(h)
                h = nn.relu(h)
            return h

    class ResNet(nn.Module):
        def setup(self):
            self.stem = nn.Dense(WIDTH, param_dtype=jnp.float64)
            self.blocks = [Branch() for _ in range(DEPTH)]

        def __call__(self, x):
            h = self.stem(x)
            for block in self.blocks:
                h = h + block(h)
            return h

    net, params = _zoo_resnet(key)
    dense = lambda p: {"kernel": p["W"].T, "bias": p["b"]}  # noqa: E731
    variables = {
        "params": {
            "stem": dense(params["stem"]),
            **{
                f"blocks_{i}": {f"Dense_{j}": dense(_unit(params, i, j)) for j in range(2)}
                for i in range(DEPTH)
            },
        }
    }
    model = ResNet()
    x = _x()
    np.testing.assert_allclose(model.apply(variables, x), net.apply(params, x), rtol=1e-12)
    bound = model.bind(variables)
    ch, cp = jl.chain([bound.stem, *[jl.Residual(b) for b in bound.blocks]])
    assert ch.names == ("layer0", "block1", "block2", "block3")
    _assert_same_diagnostics(net, params, ch, cp)
    with pytest.raises(TypeError, match="not bound to its variables"):
        jl.chain([model])


def test_flax_nnx_resnet_matches_the_builtin_network(key):
    nnx = pytest.importorskip("flax.nnx")
    net, params = _zoo_resnet(key)

    def linear(p):
        layer = nnx.Linear(WIDTH, WIDTH, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
        layer.kernel[...], layer.bias[...] = p["W"].T, p["b"]
        return layer

    def norm():
        return nnx.LayerNorm(WIDTH, epsilon=EPS, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))

    layers = [linear(params["stem"])]
    for i in range(DEPTH):
        branch = nnx.Sequential(
            *[m for j in range(2) for m in (linear(_unit(params, i, j)), norm(), nnx.relu)]
        )
        layers.append(jl.Residual(branch))
    ch, cp = jl.chain(layers)
    assert ch.num_layers == DEPTH + 1
    _assert_same_diagnostics(net, params, ch, cp)


def test_equinox_resnet_and_mlp_match_the_builtin_networks(key):
    eqx = pytest.importorskip("equinox")

    def linear(p):
        layer = eqx.nn.Linear(p["W"].shape[1], p["W"].shape[0], key=jax.random.PRNGKey(0))
        return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (p["W"], p["b"]))

    net, params = _zoo_resnet(key)
    norm = eqx.nn.LayerNorm(WIDTH, eps=EPS, use_weight=False, use_bias=False)
    relu = eqx.nn.Lambda(jax.nn.relu)
    blocks = [
        jl.Residual(
            eqx.nn.Sequential(
                [m for j in range(2) for m in (linear(_unit(params, i, j)), norm, relu)]
            )
        )
        for i in range(DEPTH)
    ]
    ch, cp = jl.chain([linear(params["stem"]), *blocks])
    _assert_same_diagnostics(net, params, ch, cp)

    # eqx.nn.MLP: Linear + activation per layer, as the built-in plain MLP.
    mlp = jl.mlp(4, WIDTH, "tanh", dtype="float64")
    mp = mlp.init(key)
    model = eqx.nn.MLP(
        WIDTH,
        WIDTH,
        WIDTH,
        3,
        activation=jnp.tanh,
        final_activation=jnp.tanh,
        key=jax.random.PRNGKey(1),
    )
    lins = [mp["stem"]] + [
        jax.tree_util.tree_map(lambda a, i=i: a[i], mp["units"]) for i in range(3)
    ]
    model = eqx.tree_at(lambda m: m.layers, model, tuple(linear(p) for p in lins))
    ch, cp = jl.chain(model)
    assert ch.num_layers == 4  # each activation joined its Linear
    _assert_same_diagnostics(mlp, mp, ch, cp)


def test_core_imports_without_flax_and_equinox():
    code = (
        "import sys\n"
        "for m in ('flax', 'equinox'): sys.modules[m] = None  # make the import fail\n"
        "import jax.numpy as jnp, jacobian_lab as jl\n"
        "ch, p = jl.chain([jnp.tanh])\n"
        "print(jl.gsc(ch, p, jnp.ones((2, 3))).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(2, 2)"
