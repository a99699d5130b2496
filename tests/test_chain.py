"""Chains of plain JAX layers: the same numbers as the built-in networks, and direct
checks against jax.jacfwd of the composed function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl


def _x(n, d, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), jnp.float64)


def _as_chain(net, params):
    """A built-in network rewritten as a chain of plain (apply, params) layers."""
    unit = lambda i: jax.tree_util.tree_map(lambda a: a[i], params["units"])  # noqa: E731
    stem = (lambda p, h: net.stem({"stem": p}, h[None])[0], params["stem"])
    if net.residual:
        units = [
            jl.Residual((lambda p, h: net.block_parts(p, h[None])[1][0], unit(i)))
            for i in range(net.num_units)
        ]
    else:
        units = [(lambda p, h: net.unit(p, h[None])[0], unit(i)) for i in range(net.num_units)]
    return jl.chain([stem, *units])


@pytest.mark.parametrize("residual", [False, True])
def test_chain_of_a_builtin_network_gives_its_numbers(key, residual):
    """Same weights, same function: every diagnostic agrees to float64 rounding."""
    if residual:
        net = jl.resmlp(4, 8, "relu", norm="layer", block_layers=2, dtype="float64")
    else:
        net = jl.mlp(5, 8, "tanh", in_dim=6, dtype="float64")
    params = net.init(key)
    ch, cp = _as_chain(net, params)
    x = _x(3, net.input_dim)
    for fn in (jl.gsc, jl.gsc_matrix, jl.input_output_jacobian, jl.input_to_layer_jacobians):
        np.testing.assert_allclose(fn(ch, cp, x), fn(net, params, x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        jl.layer_to_layer_jacobians(ch, cp, x).hidden,
        jl.layer_to_layer_jacobians(net, params, x).hidden,
        rtol=1e-12,
        atol=1e-14,
    )
    k = jax.random.PRNGKey(5)
    for a, b in zip(
        jl.block_jacobian_stats(ch, cp, x, k),
        jl.block_jacobian_stats(net, params, x, k),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    if residual:
        assert ch.block_outputs == tuple(range(net.num_blocks))
        for fn in (jl.block_gsc, jl.pythagorean_decomposition):
            for a, b in zip(fn(ch, cp, x), fn(net, params, x), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def _mixed_chain(key):
    """Layers of different sizes, a pytree (dict) in the middle, an image with channels
    at the input."""
    k1, k2, k3 = jax.random.split(key, 3)
    conv = jax.random.normal(k1, (3, 3, 2, 4), jnp.float64) / 3.0

    def conv_layer(w, img):  # (5, 5, 2) -> (3, 3, 4), no padding
        out = jax.lax.conv_general_dilated(
            img[None], w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.tanh(out[0])

    def split(W, img):  # (3, 3, 4) -> {"a": (5,), "b": (2, 3)}
        h = W @ img.ravel()
        return {"a": jnp.tanh(h[:5]), "b": jnp.sin(h[5:]).reshape(2, 3)}

    def head(W, tree):  # dict -> (4,)
        return W @ jnp.concatenate([tree["a"], tree["b"].ravel()])

    W1 = jax.random.normal(k2, (11, 36), jnp.float64) / 6.0
    W2 = jax.random.normal(k3, (4, 11), jnp.float64) / 3.0
    return jl.chain([(conv_layer, conv), (split, W1), (head, W2)])


def test_gsc_of_a_mixed_chain_matches_jacfwd_of_each_sub_chain(key):
    """GSC(k, 0) = ||d f_0/d f_k||_F / sqrt(size f_k) * ||f_k|| / ||f_0||, with
    d f_0 / d f_k taken by jax.jacfwd of the composed remaining layers, for pytree layer
    outputs flattened by ravel_pytree."""
    from jax.flatten_util import ravel_pytree

    ch, params = _mixed_chain(key)
    xs = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 5, 2), jnp.float64)
    g = jl.gsc(ch, params, xs)
    G = jl.gsc_matrix(ch, params, xs)
    assert g.shape == (2, 4) and G.shape == (2, 4, 4)
    np.testing.assert_allclose(G[:, :, 0], g, rtol=1e-12)
    for s in range(2):
        # layer values f_3 = x, f_2, f_1, f_0
        vals = [xs[s]]
        for stage, p in zip(ch.stages, params, strict=True):
            vals.append(stage.apply(p, vals[-1]))
        f = vals[::-1]  # f[l]
        for k in range(1, 4):
            flat_k, unravel = ravel_pytree(f[k])

            def tail(v, k=k, unravel=unravel):
                h = unravel(v)
                for stage, p in list(zip(ch.stages, params, strict=True))[3 - k :]:
                    h = stage.apply(p, h)
                return ravel_pytree(h)[0]

            J = jax.jacfwd(tail)(flat_k)
            expected = (
                jnp.linalg.norm(J)
                / np.sqrt(flat_k.size)
                * jnp.linalg.norm(flat_k)
                / jnp.linalg.norm(ravel_pytree(f[0])[0])
            )
            np.testing.assert_allclose(g[s, k], expected, rtol=1e-12)
    J_io = jl.input_output_jacobian(ch, params, xs)
    assert J_io.shape == (2, 4, 50)
    np.testing.assert_allclose(
        J_io[0],
        jax.jacfwd(lambda v: ch.apply(params, v.reshape(5, 5, 2)))(xs[0].ravel()),
        rtol=1e-12,
    )


def test_block_with_a_projection_skip(key):
    """Residual(branch, skip=projection): the Pythagorean identity holds exactly, the
    measured block GSC equals qm(J_s + J_r) ||h|| / ||s + r|| from jax.jacfwd, and the
    prediction uses the skip's own GSC."""
    k1, k2 = jax.random.split(key)
    P = jax.random.normal(k1, (6, 4), jnp.float64) / 2.0
    W = jax.random.normal(k2, (6, 4), jnp.float64) / 2.0
    ch, params = jl.chain(
        [jl.Residual(branch=(lambda W, h: jnp.tanh(W @ h), W), skip=(lambda P, h: P @ h, P))]
    )
    xs = _x(3, 4)
    pyth = jl.pythagorean_decomposition(ch, params, xs)
    np.testing.assert_allclose(pyth.skip_sq[:, 0], jnp.sum((xs @ P.T) ** 2, -1), rtol=1e-13)
    np.testing.assert_allclose(
        pyth.branch_sq[:, 0], jnp.sum(jnp.tanh(xs @ W.T) ** 2, -1), rtol=1e-13
    )
    np.testing.assert_allclose(pyth.sum_sq, pyth.skip_sq + pyth.branch_sq + pyth.cross, rtol=1e-13)
    bg = jl.block_gsc(ch, params, xs)
    for s in range(3):
        h = xs[s]
        J = jax.jacfwd(lambda v: P @ v + jnp.tanh(W @ v))(h)
        out = P @ h + jnp.tanh(W @ h)
        expected = jnp.linalg.norm(J) / 2.0 * jnp.linalg.norm(h) / jnp.linalg.norm(out)
        np.testing.assert_allclose(bg.gsc[s, 0], expected, rtol=1e-12)
        r, sk = jnp.tanh(W @ h), P @ h
        np.testing.assert_allclose(bg.branch_ratio[s, 0], jnp.linalg.norm(r) / jnp.linalg.norm(sk))
        g_s = jnp.linalg.norm(P) / 2.0 * jnp.linalg.norm(h) / jnp.linalg.norm(sk)
        J_r = jax.jacfwd(lambda v: jnp.tanh(W @ v))(h)
        g_r = jnp.linalg.norm(J_r) / 2.0 * jnp.linalg.norm(h) / jnp.linalg.norm(r)
        rho = bg.branch_ratio[s, 0]
        np.testing.assert_allclose(
            bg.predicted[s, 0], jnp.sqrt((g_s**2 + g_r**2 * rho**2) / (1 + rho**2)), rtol=1e-12
        )


def test_parameter_free_layers_join_the_layer_before_them(key):
    W = jax.random.normal(key, (4, 4), jnp.float64)
    ch, params = jl.chain([(lambda W, h: W @ h, W), jnp.tanh, (lambda W, h: W @ h, W), jnp.tanh])
    assert ch.num_layers == 2 and ch.names == ("layer0", "layer1")
    x = _x(2, 4)
    np.testing.assert_allclose(
        jax.vmap(lambda v: ch.apply(params, v))(x), jnp.tanh(jnp.tanh(x @ W.T) @ W.T), rtol=1e-14
    )
    ch2, _ = jl.chain([jnp.tanh, (lambda W, h: W @ h, W)])  # nothing before: its own layer
    assert ch2.num_layers == 2
    ch3, _ = jl.chain([(lambda W, h: W @ h, W), (lambda p, h: jnp.tanh(h), ())])
    assert ch3.num_layers == 2  # params () keep a parameter-free layer on its own


# -- bad input ---------------------------------------------------------------------------


def _linear_chain(key, d=4):
    W = jax.random.normal(key, (d, d), jnp.float64)
    return jl.chain([(lambda W, h: W @ h, W), (lambda W, h: jnp.tanh(W @ h), W)], names=["a", "b"])


def test_wrong_input_shape_names_the_layer_and_the_shape(key):
    ch, params = _linear_chain(key)
    with pytest.raises(ValueError, match=r"layer 0 \('a'\) failed on a sample of shape \(5,\)"):
        jl.gsc(ch, params, _x(2, 5))
    with pytest.raises(ValueError, match="leading sample axis"):
        jl.gsc(ch, params, jnp.float64(1.0))


def test_layer_returning_no_float_array_is_rejected(key):
    from jacobian_lab.model import LayerOutputError

    W = jax.random.normal(key, (4, 4), jnp.float64)
    for bad in (lambda W, h: None, lambda W, h: (W @ h).astype(jnp.int32)):
        ch, params = jl.chain([(lambda W, h: W @ h, W), (bad, W)])
        with pytest.raises(LayerOutputError, match=r"layer 1 \('layer1'\) returned"):
            jl.gsc(ch, params, _x(2, 4))


def test_closing_over_a_tracer_gets_a_hint(key):
    ch_params = {}

    @jax.jit
    def build(W):
        ch_params["chain"] = jl.chain([lambda h: W @ h])  # W is a tracer here
        return W

    build(jnp.eye(3))
    ch, params = ch_params["chain"]
    with pytest.raises(jax.errors.UnexpectedTracerError, match="closes over a tracer"):
        jl.gsc(ch, params, _x(2, 3))


def test_other_bad_input(key):
    ch, params = _linear_chain(key)
    with pytest.raises(TypeError, match="cannot read a layer of type int"):
        jl.chain([3])
    with pytest.raises(ValueError, match="at least one layer"):
        jl.chain([])
    with pytest.raises(ValueError, match="2 names for 1 layers"):
        jl.chain([jnp.tanh], names=["a", "b"])
    with pytest.raises(ValueError, match=r"params has no entry \[1\]"):
        jl.gsc(ch, params[:1], _x(2, 4))
    with pytest.raises(ValueError, match="no residual blocks"):
        jl.block_gsc(ch, params, _x(2, 4))
    with pytest.raises(TypeError, match="pass init="):
        jl.gsc_over_seeds(ch, jax.random.split(key, 2), _x(2, 4))


def test_non_finite_layer_is_named(key):
    W = jnp.eye(3)
    ch, params = jl.chain(
        [
            (lambda W, h: W @ h, W),
            (lambda W, h: jnp.log(W @ h - 10.0), W),
            (lambda p, h: jnp.sin(h), ()),
        ],
        names=["lin", "log", "sin"],
    )
    with pytest.raises(FloatingPointError, match=r"'log' \(layer 2 of 3 from the input\)"):
        jl.gsc(ch, params, _x(2, 3))


def test_layers_of_several_sizes_give_padded_jacobians(key):
    """A chain whose layers change size (a conv layer, then dense layers): the stacked
    Jacobians are padded with NaN, and each layer's own block is its Jacobian: the chain
    rule of the padded blocks gives the input-output Jacobian."""
    mixed, mp = _mixed_chain(key)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 5, 2), jnp.float64)
    lj = jl.layer_jacobians(mixed, mp, x)
    L = mixed.num_layers
    prod = lj.layer(L - 1)
    for l in range(L - 2, -1, -1):
        prod = lj.layer(l) @ prod
    np.testing.assert_allclose(prod, jl.input_output_jacobian(mixed, mp, x), rtol=1e-10)
    assert np.isnan(lj.units).any()  # the padding
    pj = jl.layer_to_layer_jacobians(mixed, mp, x)
    d0 = prod.shape[1]
    np.testing.assert_allclose(pj.from_input[:, 0, :d0], prod, rtol=1e-10)
    assert np.all(np.isnan(pj.from_input[:, 0, d0:]))
