import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_eqns

import jacobian_lab as jl


def _x(n, d, dtype=jnp.float64, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), dtype)


@pytest.mark.parametrize("residual", [False, True])
def test_activations_stack_every_layer_in_paper_order(key, residual):
    net = jl.resmlp(4, 6, "tanh", in_dim=3) if residual else jl.mlp(4, 6, "tanh", in_dim=3)
    params = net.init(key)
    x = _x(5, 3, jnp.float32)
    acts = net.activations(params, x)
    assert acts.shape == (net.num_layers, 5, 6)
    np.testing.assert_allclose(acts[0], net.apply(params, x), rtol=1e-6)
    np.testing.assert_allclose(acts[-1], net.stem(params, x), rtol=1e-6)
    assert acts.dtype == jnp.float32


def test_plain_mlp_matches_a_hand_written_forward_pass(key):
    """Layer order linear -> layer norm -> tanh, as documented."""
    net = jl.mlp(3, 5, "tanh", norm="layer", sigma_b=0.3, dtype="float64")
    params = net.init(key)
    x = _x(2, 5)
    h = x
    for i in range(3):
        p = (
            params["stem"]
            if i == 0
            else jax.tree_util.tree_map(lambda a, i=i: a[i - 1], params["units"])
        )
        z = h @ p["W"].T + p["b"]
        z = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + net.norm_eps)
        h = jnp.tanh(z)
    np.testing.assert_allclose(net.apply(params, x), h, rtol=1e-12)


def test_batch_norm_normalizes_each_feature_over_the_batch(key):
    net = jl.mlp(2, 8, "linear", norm="batch", order="linear-act-norm", dtype="float64")
    params, x = net.init(key), _x(16, 8)
    out = net.apply(params, x)
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-12)
    v = net.preactivations(params, x)[0].var(0)  # the output layer's features before the norm
    np.testing.assert_allclose(out.var(0), v / (v + net.norm_eps), rtol=1e-12)


def test_post_activation_block_applies_activation_after_the_sum(key):
    net = jl.resmlp(2, 6, "relu", block_order="post", order="linear-norm-act")
    params = net.init(key)
    h = _x(3, 6, jnp.float32)
    p0 = jax.tree_util.tree_map(lambda a: a[0], params["units"])
    f, r = net.block_parts(p0, h)
    np.testing.assert_allclose(net.unit(p0, h), jax.nn.relu(f + r))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 0}, "depth must be a positive integer"),
        ({"width": -3}, "width must be a positive integer"),
        ({"activation": "rleu"}, "unknown activation"),
        ({"norm": "group"}, "unknown norm 'group'"),
        ({"order": "linear-act"}, "order must name each of"),
        ({"dtype": "float16"}, "dtype must be"),
    ],
)
def test_bad_descriptions_are_rejected(kwargs, message):
    args = {"depth": 3, "width": 4, "activation": "tanh", **kwargs}
    with pytest.raises(ValueError, match=message):
        jl.mlp(**args)


def test_resmlp_needs_blocks():
    with pytest.raises(ValueError, match="block_layers >= 1"):
        jl.resmlp(3, 4, "relu", block_layers=0)


def test_mismatched_input_shape_is_rejected(key):
    net = jl.mlp(3, 4, "tanh", in_dim=5)
    params = net.init(key)
    with pytest.raises(ValueError, match=r"shape \(batch, 5\), got \(2, 4\)"):
        net.apply(params, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="for one input use x\\[None\\]"):
        jl.gsc(net, params, jnp.ones(5))


def test_batch_norm_needs_two_inputs(key):
    net = jl.mlp(3, 4, "tanh", norm="batch")
    with pytest.raises(ValueError, match="at least 2"):
        net.apply(net.init(key), jnp.ones((1, 4)))


def test_float64_without_x64_says_how_to_enable_it(key):
    net = jl.mlp(2, 4, "tanh", dtype="float64")
    with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64"):
        net.init(key)


@pytest.mark.parametrize("residual", [False, True])
def test_program_size_does_not_grow_with_depth(key, residual):
    """Layers run under lax.scan: the traced program of the all-pairs GSC has the same
    number of equations at depth 3 and depth 60 (so compile time is flat in depth)."""

    def size(depth):
        make = jl.resmlp if residual else jl.mlp
        net = make(depth, 4, "tanh")
        params = jax.eval_shape(net.init, key)
        x = jax.ShapeDtypeStruct((2, 4), jnp.float32)
        return count_eqns(jax.make_jaxpr(lambda p, v: jl.gsc_matrix(net, p, v))(params, x).jaxpr)

    assert size(3) == size(60) > 50
