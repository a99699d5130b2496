"""The residual trick (dilution of every layer or block) and the add-node split of the
backpropagated gradient, against closed forms and second methods."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl
from jacobian_lab.initializers import normal


def _gauss(n, d, dtype=jnp.float64, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), jnp.float32).astype(dtype)


A, B = 0.2, 1.0


def _sin_layer(dtype):
    """``f(v) = a v + b sin(v)`` per coordinate; for ``v ~ N(0, I)``: ``S = (a + b e^{-1/2})
    I`` (Stein: ``E[cos v] = e^{-1/2}``), ``rho = b (sin v - e^{-1/2} v)`` with
    ``E rho^2 = b^2 ((1 - e^{-2}) / 2 - e^{-1})``."""
    net, params = jl.chain([(lambda p, h: p[0] * h + p[1] * jnp.sin(h), jnp.array([A, B], dtype))])
    k_sq = (A + B * np.exp(-0.5)) ** 2 / (B**2 * ((1 - np.exp(-2)) / 2 - np.exp(-1)))
    return net, params, k_sq / (1 + k_sq)


@pytest.mark.parametrize("fit", ["jacobian", "lstsq"])
def test_closed_form_dilution_of_a_diluted_odd_nonlinearity(fit):
    """Both fits give the closed-form share k^2 / (1 + k^2) = 0.910 for Gaussian inputs.
    Tolerance: N d = 40000 scalar samples; the relative standard error of E rho^2 is
    about 1.5%, that of the share (1 - share) times that: 0.0015; we allow 0.005."""
    net, params, share = _sin_layer(jnp.float64)
    d = jl.dilution(net, params, _gauss(20000, 2), fit=fit)
    np.testing.assert_allclose(d.linear_share, [share], atol=5e-3)
    assert d.samples == 20000


def test_relu_layer_has_dilution_one_and_float32_agrees_with_float64():
    """relu(z) = z / 2 + |z| / 2 with E[|z| z] = 0 for any Gaussian pre-activation z = W x:
    k = 1 exactly (share 1/2). Tolerance: 4096 x 8 samples, relative error of each
    quadratic mean ~ 1%, share within 0.01. float32 and float64 agree to float32
    rounding of the sums (1e-4)."""
    shares = []
    for dtype in ("float32", "float64"):
        net = jl.mlp(1, 8, "relu", dtype=dtype)
        d = jl.dilution(net, net.init(jax.random.PRNGKey(0)), _gauss(4096, 8, dtype))
        shares.append(np.asarray(d.linear_share, float))
        np.testing.assert_allclose(d.linear_share, [0.5], atol=0.01)
    np.testing.assert_allclose(*shares, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_linear_layer_is_all_linear_part(dtype, tol):
    net = jl.mlp(1, 6, "linear", dtype=dtype)
    params = net.init(jax.random.PRNGKey(0))
    x = _gauss(64, 6, dtype)
    for fit in ("jacobian", "lstsq"):
        d = jl.dilution(net, params, x, fit=fit)
        assert np.all(1 - np.asarray(d.linear_share) < tol), (fit, d.linear_share)
    assert jl.Dilution(jnp.ones(1), *([None] * 6), 1).dilution[0] == jnp.inf
    # its remainder is rounding: no remainder GSC (0/0), while the linear part's is the GSC
    d = jl.dilution(net, params, x)
    assert np.all(np.isnan(np.asarray(d.remainder_gsc)))
    np.testing.assert_allclose(d.linear_gsc, d.gsc, rtol=100 * tol)
    tanh = jl.dilution(jl.mlp(1, 6, "tanh", dtype=dtype), params, x)
    assert np.all(np.isfinite(np.asarray(tanh.remainder_gsc)))


def _hand_resnet(net, params):
    """The pre-activation resmlp written out: stem, then h <- h + branch(h)."""
    W, b = params["stem"]["W"], params["stem"]["b"]
    units = params["units"]

    def block(i, h):
        return h + net.branch(jax.tree_util.tree_map(lambda a: a[i], units), h)

    return (lambda x: W @ x + b), block


def test_blocks_skip_share_gsc_and_prediction_against_second_methods():
    """skip_share = sum ||s||^2 / (sum ||s||^2 + sum ||r||^2) from the Pythagorean
    decomposition; the measured per-unit GSC equals GSC(l+1, l) of the network written
    out by hand (jax.jacfwd per unit); the stem
    (linear) has share 1; the block's remainder is its branch's (S_block = I + S_branch),
    so the block is at least as linear as its branch; and the prediction (*) holds where
    the cross terms average out (here within 10% at width 16)."""
    net = jl.resmlp(2, 16, "relu", norm="layer", dtype="float64")
    params = net.init(jax.random.PRNGKey(0))
    x = _gauss(32, 16)
    d = jl.dilution(net, params, x)
    pyth = jl.pythagorean_decomposition(net, params, x)
    s, r = jnp.sum(pyth.skip_sq, 0), jnp.sum(pyth.branch_sq, 0)
    np.testing.assert_allclose(d.skip_share[:2], s / (s + r), rtol=1e-10)
    assert np.isnan(d.skip_share[2]) and abs(d.linear_share[2] - 1) < 1e-12
    stem, block = _hand_resnet(net, params)

    @jax.jit
    @jax.vmap
    def unit_gsc(x):  # GSC(l+1, l) = qm(J) ||f_{l+1}|| / ||f_l||, units from the input
        hs, out = [x], []
        for i, fn in enumerate([stem, *(partial(block, j) for j in range(2))]):
            hs.append(fn(hs[-1]))
            J = jax.jacfwd(fn)(hs[i])
            out.append(jl.gradient_scale(J, hs[i], hs[i + 1]))
        return jnp.stack(out[::-1])

    np.testing.assert_allclose(d.gsc, unit_gsc(x), rtol=1e-9)
    assert np.all(d.linear_share[:2] >= d.branch_share[:2])
    assert np.median(np.abs(d.predicted_gsc / d.gsc - 1)) < 0.1


def test_add_node_split_sums_to_jax_grad(key):
    """For y = h + r(h) and g_y = d<v, f_0>/dy: the skip part is g_y (norm equal), and
    skip part + branch part = d<v, f_0>/dh, checked through
    ||g_h||^2 = ||skip||^2 + ||branch||^2 + 2 cos ||skip|| ||branch|| (float64 rounding)."""
    net = jl.resmlp(2, 8, "tanh", dtype="float64")
    params = net.init(key)
    x = _gauss(3, 8)
    split = jl.add_node_split(net, params, x, jax.random.PRNGKey(5))
    stem, block = _hand_resnet(net, params)
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    vs = jax.vmap(lambda k: normal(k, (8,), jnp.float64))(keys)

    @jax.jit
    @jax.vmap
    def grads(x, v):  # d<v, f_0>/dh at the input of block i, i = 0..2 from the input
        hs = [stem(x)]
        for i in range(2):
            hs.append(block(i, hs[-1]))

        def loss_from(i, h):
            for j in range(i, 2):
                h = block(j, h)
            return v @ h

        return jnp.stack(
            [jnp.linalg.norm(jax.grad(partial(loss_from, i))(hs[i])) for i in range(3)]
        )

    g = grads(x, vs)  # block i from the input is block 1 - i nearest the output
    np.testing.assert_allclose(split.skip, g[:, 2:0:-1], rtol=1e-12)
    np.testing.assert_allclose(split.total, g[:, 1::-1], rtol=1e-12)
    total_sq = split.skip**2 + split.branch**2 + 2 * split.cosine * split.skip * split.branch
    np.testing.assert_allclose(total_sq, split.total**2, rtol=1e-10)
    np.testing.assert_allclose(split.skip, split.arriving, rtol=1e-14)


def test_add_node_split_with_projection_skip_and_chain_lstsq(key):
    """A chain with a projection skip P: the skip part is P^T g_z, not g_z; dilution runs
    on the same chain with the least-squares fit."""
    k1, k2 = jax.random.split(key)
    W = jax.random.normal(k1, (6, 6), jnp.float64) / np.sqrt(6)
    P = jax.random.normal(k2, (6, 6), jnp.float64) / np.sqrt(6)
    net, params = jl.chain(
        [jl.Residual((lambda p, h: jnp.tanh(p @ h), W), skip=(lambda p, h: p @ h, P))]
    )
    x = _gauss(64, 6)
    split = jl.add_node_split(net, params, x[:2], key)
    v = normal(jax.random.split(key, 2)[0], (6,), jnp.float64)
    np.testing.assert_allclose(split.arriving[0, 0], jnp.linalg.norm(v), rtol=1e-12)
    np.testing.assert_allclose(split.skip[0, 0], jnp.linalg.norm(P.T @ v), rtol=1e-12)
    d = jl.dilution(net, params, x, fit="lstsq")
    assert 0 < float(d.linear_share[0]) < 1 and 0 < float(d.skip_share[0]) < 1


def test_post_activation_blocks_have_no_skip_share_and_pass_the_gradient_through_post():
    """With act(s + r) the skip is not the block's linear part: skip_share is NaN; the
    add node receives J_post^T g_y, which the identity skip passes on unchanged."""
    net = jl.resmlp(2, 6, "relu", block_order="post", dtype="float64")
    params = net.init(jax.random.PRNGKey(0))
    d = jl.dilution(net, params, _gauss(60, 6), fit="lstsq")
    assert np.all(np.isnan(d.skip_share)) and np.all(d.branch_share[:2] <= 1)
    split = jl.add_node_split(net, params, _gauss(2, 6), jax.random.PRNGKey(1))
    np.testing.assert_allclose(split.skip, split.arriving, rtol=1e-14)


def test_errors_name_the_argument():
    net = jl.mlp(2, 6, "relu", dtype="float64")
    params = net.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="fit must be one of"):
        jl.dilution(net, params, _gauss(8, 6), fit="svd")
    with pytest.raises(ValueError, match="at least 12 samples"):
        jl.dilution(net, params, _gauss(8, 6), fit="lstsq")
    bn = jl.mlp(2, 6, "relu", norm="batch", dtype="float64")
    with pytest.raises(ValueError, match="fit='lstsq'"):
        jl.dilution(bn, bn.init(jax.random.PRNGKey(0)), _gauss(8, 6))
    with pytest.raises(ValueError, match="no residual blocks"):
        jl.add_node_split(net, params, _gauss(2, 6), jax.random.PRNGKey(0))
