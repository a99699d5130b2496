"""The raw gradient norm (jl.gradient_norm) and the saturating activations of the
vanishing-gradient analysis: derivatives in closed form, the norm against autodiff and
against the GSC, and against mean-field theory for sigmoid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl
from jacobian_lab import meanfield
from jacobian_lab.experiments.normalization import NORM_THEN_ACT, ORDERS, cycle
from jacobian_lab.gsc import UnderflowWarning


def test_sigmoid_and_hard_tanh_derivatives_in_closed_form():
    """sigmoid' = s (1 - s); hard tanh' = 1 inside (-1, 1), 0 outside: JAX's derivatives,
    which the networks and the mean-field quadrature use, agree to rounding (float32)."""
    x = jnp.linspace(-6.0, 6.0, 97)
    x = x[jnp.abs(jnp.abs(x) - 1) > 1e-3]  # off hard tanh's kinks
    s = jax.nn.sigmoid(x)
    d_sig = jax.vmap(jax.grad(jl.get_activation("sigmoid")))(x)
    np.testing.assert_allclose(d_sig, s * (1 - s), rtol=1e-6, atol=1e-7)
    d_ht = jax.vmap(jax.grad(jl.get_activation("hard_tanh")))(x)
    np.testing.assert_array_equal(d_ht, (jnp.abs(x) < 1).astype(x.dtype))


@pytest.mark.parametrize(
    "make",
    [
        lambda: jl.mlp(3, 5, "tanh", in_dim=4, sigma_w=1.3, sigma_b=0.2),
        lambda: jl.resmlp(2, 5, "sigmoid", in_dim=4, sigma_w=2.0),
    ],
    ids=["mlp", "resmlp"],
)
def test_gradient_norm_matches_autodiff_and_the_gsc(make):
    """gradient_norm_k = ||J_k^0||_F / sqrt(d_0): at the input, from reverse-mode
    autodiff (jax.vjp) of every output unit (sum_i ||J^T e_i||^2 = ||J||_F^2, exact); at
    every layer, from the GSC and the layer lengths, GSC(k, 0) sqrt(d_k / d_0) ||f_0|| /
    ||f_k|| (exact identity). float32 products of <= 4 layers: rtol 1e-5."""
    net = make()
    params = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
    g = jl.gradient_norm(net, params, x)
    assert g.shape == (3, net.num_layers + 1)
    np.testing.assert_allclose(g[:, 0], 1.0, rtol=1e-6)

    out, vjp = jax.vjp(lambda v: net.apply(params, v), x)
    basis = jnp.eye(5)[:, None, :] * jnp.ones_like(out)  # e_i at every sample: (5, S, 5)
    grads = jax.vmap(lambda e: vjp(e)[0])(basis)  # J^T e_i per sample: (5, S, 4)
    fro = jnp.sqrt(jnp.sum(grads**2, axis=(0, 2)))
    np.testing.assert_allclose(g[:, -1], fro / np.sqrt(5), rtol=1e-5)

    lengths = jnp.concatenate(
        [
            jnp.linalg.norm(net.activations(params, x), axis=-1).T,
            jnp.linalg.norm(x, axis=-1)[:, None],
        ],
        axis=1,
    )  # (S, L+1), f_0 .. f_L
    sizes = np.array([5] * net.num_layers + [4])
    from_gsc = jl.gsc(net, params, x) * np.sqrt(sizes / 5) * lengths[:, :1] / lengths
    np.testing.assert_allclose(g, from_gsc, rtol=1e-5)
    np.testing.assert_allclose(jl.gradient_norm(net, params, x, log=True), jnp.log(g), atol=1e-5)


def test_gradient_norm_underflow_is_warned_and_kept_in_logs():
    """A sigmoid net at sigma_w = 0.01 shrinks gradients by ~0.0025 per layer: after 30
    layers ~1e-78, below float32; the value underflows to 0 with a warning naming the
    layer, while log=True keeps it (finite, about 30 log(0.0025))."""
    net = jl.mlp(30, 8, "sigmoid", sigma_w=0.01)
    params = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8))
    with pytest.warns(UnderflowWarning, match="gradient norm at f_"):
        g = jl.gradient_norm(net, params, x)
    assert float(g[:, -1].max()) == 0.0
    log_g = jl.gradient_norm(net, params, x, log=True)
    assert bool(jnp.all(jnp.isfinite(log_g)))
    assert -200 < float(log_g[:, -1].mean()) < -150


def test_sigmoid_gradient_norm_follows_mean_field():
    """Sigmoid at sigma_w = 1 (chi_1 ~ 0.056): the measured log gradient norm at the input
    of a depth-6 width-64 MLP, root mean square over 4 inputs, agrees with the mean-field
    sum over layers of log chi(q_l) / 2 (length map from the inputs' q_1) within 4
    standard errors over 6 independent seeds (the finite-width corrections are smaller than
    that spread at this size: measured 0.1 se at width 128)."""
    depth, width, sigma_w = 6, 64, 1.0
    net = jl.mlp(depth, width, "sigmoid", sigma_w=sigma_w)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, width))
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    log_g = np.stack([np.asarray(jl.gradient_norm(net, net.init(k), x, log=True)) for k in keys])
    per_seed = 0.5 * np.log(np.mean(np.exp(2 * log_g[:, :, -1]), axis=1))
    q = meanfield.length_sequence(
        "sigmoid", float(np.mean(np.asarray(x) ** 2)), sigma_w, 0.0, depth
    )
    predicted = 0.5 * np.sum(np.log(meanfield.chi("sigmoid", q, sigma_w)))
    se = per_seed.std(ddof=1) / np.sqrt(len(per_seed))
    assert abs(per_seed.mean() - predicted) < 4 * se + 1e-3, (per_seed, predicted)
    assert predicted < depth * np.log(0.3)  # it does vanish: sqrt(chi_1) < 0.25 per layer


def test_layer_orders_fall_into_two_cycles():
    """The 6 orders of linear, norm, act are rotations of two cycles: the three in
    NORM_THEN_ACT have the activation right after the norm, cyclically."""
    assert len(ORDERS) == 6
    for order in ORDERS:
        steps = order.split("-")
        after_norm = steps[(steps.index("norm") + 1) % 3]
        assert (cycle(order) == "norm -> act") == (after_norm == "act") == (order in NORM_THEN_ACT)
