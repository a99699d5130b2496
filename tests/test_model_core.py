"""The one model core: stages, automatic and explicit stacking, and every diagnostic on
every kind of model (float64 unless stated)."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_eqns

import jacobian_lab as jl
from jacobian_lab.model import Repeat

WIDTH = 6


def _eqx_mlp(depth: int):
    key = jax.random.PRNGKey(1)
    return eqx.nn.MLP(
        WIDTH, WIDTH, WIDTH, depth, activation=jnp.tanh, final_activation=jnp.tanh, key=key
    )


def _x(n, d=WIDTH, seed=2):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), jnp.float64)


def _to64(model):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model
    )


def test_eqx_mlp_hidden_layers_are_stacked_and_give_the_unstacked_numbers(key):
    """eqx.nn.MLP's hidden Linear+tanh layers compute one function of params of one shape:
    chain stacks them into one scanned stage, and every diagnostic is unchanged."""
    model = _to64(_eqx_mlp(5))
    stacked, sp = jl.chain(model)
    unrolled, up = jl.chain(model, stack=False)
    assert any(isinstance(s, Repeat) for s in stacked.stages)
    assert not any(isinstance(s, Repeat) for s in unrolled.stages)
    assert stacked.num_layers == unrolled.num_layers == 6
    x = _x(3)
    for fn in (jl.gsc, jl.gsc_matrix, jl.input_output_jacobian):
        np.testing.assert_allclose(fn(stacked, sp, x), fn(unrolled, up, x), rtol=1e-12)
    a, b = (jl.layer_to_layer_jacobians(c, p, x) for c, p in ((stacked, sp), (unrolled, up)))
    np.testing.assert_allclose(a.hidden, b.hidden, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a.from_input, b.from_input, rtol=1e-12, atol=1e-14)
    s1, s2 = (jl.block_jacobian_stats(c, p, x, key) for c, p in ((stacked, sp), (unrolled, up)))
    np.testing.assert_allclose(s1.singular_values, s2.singular_values, rtol=1e-12)
    d1, d2 = (jl.domain_statistics(c, p, x) for c, p in ((stacked, sp), (unrolled, up)))
    for f1, f2 in zip(d1, d2, strict=True):
        np.testing.assert_allclose(f1, f2, rtol=1e-12)


def test_explicit_repeat_stacks_pairs_and_rejects_layers_that_differ(key):
    def dense(p, h):
        return jnp.tanh(h @ p["W"].T)

    Ws = [
        {"W": jax.random.normal(k, (WIDTH, WIDTH)) / WIDTH**0.5} for k in jax.random.split(key, 4)
    ]
    ch, params = jl.chain([jl.repeat([(dense, W) for W in Ws])])
    assert len(ch.stages) == 1 and isinstance(ch.stages[0], Repeat) and ch.stages[0].n == 4
    x = _x(2)

    def direct(v):
        for W in Ws:
            v = dense(W, v)
        return v

    J = jax.vmap(jax.jacfwd(direct))(x)
    np.testing.assert_allclose(jl.input_output_jacobian(ch, params, x), J, rtol=1e-12)
    with pytest.raises(ValueError, match="cannot be stacked"):
        jl.chain([jl.repeat([(dense, Ws[0]), (dense, {"W": jnp.ones((WIDTH, 3))})])])


def test_repeated_layers_that_change_the_shape_run_one_by_one():
    """Identical parameter-free-shaped layers that halve their input (as strided convs
    do) cannot share a scan carry; the driver runs them one at a time, same numbers."""

    def halve(p, h):
        return jnp.tanh(p * (h[::2] + h[1::2]))

    ch, params = jl.chain([jl.repeat([(halve, jnp.float64(0.9)), (halve, jnp.float64(1.1))])])
    x = _x(2, 8)
    g = jl.gsc(ch, params, x)
    out = jax.vmap(lambda v: halve(1.1, halve(0.9, v)))(x)
    J = jax.vmap(jax.jacfwd(lambda v: halve(1.1, halve(0.9, v))))(x)
    expected = jnp.linalg.norm(J, axis=(1, 2)) / 8**0.5 * jnp.linalg.norm(x, axis=1)
    np.testing.assert_allclose(g[:, 2], expected / jnp.linalg.norm(out, axis=1), rtol=1e-12)


def test_brought_models_compile_to_a_program_that_does_not_grow_with_depth():
    def size(depth):
        ch, p = jl.chain(_eqx_mlp(depth))
        x = jax.ShapeDtypeStruct((2, WIDTH), jnp.float32)
        return count_eqns(jax.make_jaxpr(lambda q, v: jl.gsc(ch, q, v, method="dense"))(p, x).jaxpr)

    assert size(8) == size(64) > 20


def test_path_gradients_domain_statistics_and_seed_sweeps_take_brought_models(key):
    net = jl.resmlp(4, WIDTH, "relu", norm="layer", dtype="float64")
    params = net.init(key)
    unit = lambda i: jax.tree_util.tree_map(lambda a: a[i], params["units"])  # noqa: E731
    blocks = [jl.Residual((net.branch, unit(i))) for i in range(4)]
    ch, cp = jl.chain([(net.stem, params), *blocks])
    assert isinstance(ch.stages[1], Repeat)  # the same net.branch with params of one shape
    x = _x(3)
    a = jl.path_gradients(net, params, x, key)
    b = jl.path_gradients(ch, cp, x, key)
    for f1, f2 in zip(a, b, strict=True):
        np.testing.assert_allclose(f1, f2, rtol=1e-10)

    plain = jl.mlp(3, WIDTH, "tanh", dtype="float64")
    pp = plain.init(key)
    layers = [(plain.dense, pp["stem"])] + [
        (plain.dense, jax.tree_util.tree_map(lambda a, i=i: a[i], pp["units"])) for i in range(2)
    ]
    with pytest.warns(jl.DomainWarning, match="no known pre-activation"):
        opaque = jl.domain_statistics(*jl.chain(layers), x)  # an opaque layer
    assert np.isnan(opaque.sign_diversity).all()
    np.testing.assert_allclose(opaque.cosine, jl.domain_statistics(plain, pp, x).cosine, rtol=1e-10)
    dense_then_act = [
        ((lambda p, h: h @ p["W"].T + p["b"]), q) for q in (layers[i][1] for i in range(3))
    ]
    ch2, cp2 = jl.chain([layer for d in dense_then_act for layer in (d, jnp.tanh)])
    for f1, f2 in zip(
        jl.domain_statistics(plain, pp, x), jl.domain_statistics(ch2, cp2, x), strict=True
    ):
        np.testing.assert_allclose(f1, f2, rtol=1e-12)

    keys = jax.random.split(key, 3)
    g = jl.gsc_over_seeds(
        ch2, keys, x, init=lambda k: jl.chain(_layers_of(plain, plain.init(k)))[1]
    )
    for i in range(3):
        np.testing.assert_allclose(g[i], jl.gsc(plain, plain.init(keys[i]), x), rtol=1e-10)


def _layers_of(plain, p):
    lins = [p["stem"]] + [jax.tree_util.tree_map(lambda a, i=i: a[i], p["units"]) for i in range(2)]
    return [layer for q in lins for layer in (((lambda p, h: h @ p["W"].T + p["b"]), q), jnp.tanh)]


def test_renamed_arguments_warn_and_keep_their_meaning(key):
    with pytest.warns(DeprecationWarning, match="num_blocks"):
        old = jl.resmlp(depth=3, width=4, activation="relu")
    assert old == jl.resmlp(3, 4, "relu") and old.num_blocks == 3 and old.num_layers == 4
    with pytest.warns(DeprecationWarning, match="by keyword"):
        arch = jl.architecture("tanh", 6, 8)
    assert arch == jl.architecture("tanh", depth=6, width=8)
    with pytest.raises(TypeError):
        jl.mlp(4, 8, "tanh", None)  # keyword-only after the first three
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jl.resconvnet(2, 4, "relu", image_size=4)  # the new spelling does not warn
