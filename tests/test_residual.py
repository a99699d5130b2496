import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl
from jacobian_lab.initializers import normal


def _x(n, d, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), jnp.float64)


@pytest.mark.parametrize("block_order", ["pre", "post"])
def test_pythagorean_identity_holds_to_float64_rounding(key, block_order):
    net = jl.resmlp(6, 32, "relu", norm="layer", block_order=block_order, dtype="float64")
    params = net.init(key)
    x = _x(4, 32)
    d = jl.pythagorean_decomposition(net, params, x)
    assert d.skip_sq.shape == (4, 6)
    np.testing.assert_allclose(d.sum_sq, d.skip_sq + d.branch_sq + d.cross, rtol=1e-13)
    # block 0 (paper indexing) is the last block: its skip is f_1
    acts = net.activations(params, x)
    np.testing.assert_allclose(d.skip_sq[:, 0], jnp.sum(acts[1] ** 2, -1), rtol=1e-13)
    np.testing.assert_allclose(d.skip_sq[:, -1], jnp.sum(acts[-1] ** 2, -1), rtol=1e-13)
    np.testing.assert_allclose(d.relative_error, jnp.abs(d.cross) / d.sum_sq, rtol=1e-9, atol=1e-15)


def test_cosine_of_skip_and_branch_is_of_order_one_over_sqrt_width(key):
    """The branch ends in a Gaussian linear layer independent of the skip f, so r(f) points
    in a uniformly random direction: E[cos^2] = 1/width exactly. The mean of width*cos^2
    over 20 seeds x 8 blocks (independent weights; examples share them) has standard error
    about sqrt(2/160) = 0.11; tolerance 0.4. Widening 9-fold divides the median |cos| by
    sqrt(9) = 3."""

    def mean_sq_cos(width):
        net = jl.resmlp(
            8, width, "tanh", block_layers=1, norm="layer", residual_scale=0.5, dtype="float64"
        )
        keys = jax.random.split(key, 20)
        x = _x(4, width)
        cos = jax.vmap(lambda k: jl.pythagorean_decomposition(net, net.init(k), x).cosine)(keys)
        return float(jnp.mean(width * cos**2)), float(jnp.median(jnp.abs(cos)))

    m64, med64 = mean_sq_cos(64)
    m576, med576 = mean_sq_cos(576)
    assert abs(m64 - 1) < 0.4 and abs(m576 - 1) < 0.4
    assert 2.0 < med64 / med576 < 4.5  # sqrt(576/64) = 3


def test_block_jacobian_is_identity_plus_branch_jacobian(key):
    net = jl.resmlp(3, 10, "gelu", residual_scale=0.3, dtype="float64")
    params = net.init(key)
    x = _x(2, 10)
    lj = jl.layer_jacobians(net, params, x)
    acts = net.activations(params, x)
    p0 = jax.tree_util.tree_map(lambda a: a[-1], params["units"])  # last block -> f_0
    branch = jax.jacfwd(lambda h: net.block_parts(p0, h[None])[1][0])(acts[1, 0])
    np.testing.assert_allclose(lj.units[0, 0], jnp.eye(10) + branch, rtol=1e-12, atol=1e-14)
    stats = jl.block_jacobian_stats(net, params, x, key)
    np.testing.assert_allclose(stats.singular_values, jl.singular_values(lj.units), rtol=1e-12)


def test_zero_branch_is_exactly_norm_preserving(key):
    net = jl.resmlp(5, 8, "relu", residual_scale=0.0, dtype="float64")
    stats = jl.block_jacobian_stats(net, net.init(key), _x(3, 8), key)
    np.testing.assert_allclose(stats.singular_values, 1.0, rtol=1e-14)
    np.testing.assert_allclose(stats.gradient_ratio, 1.0, rtol=1e-14)


def test_gradient_ratios_multiply_to_the_whole_backward_pass(key):
    """prod_l ||g_{l+1}|| / ||g_l|| = ||J^T v|| / ||v|| with J the Jacobian from the stem's
    output to the network output."""
    net = jl.resmlp(4, 8, "tanh", dtype="float64")
    params = net.init(key)
    x = _x(2, 8)
    stats = jl.block_jacobian_stats(net, params, x, key)
    v = normal(key, (2, 8), jnp.float64)  # the same draw the function makes
    J = jl.layer_to_layer_jacobians(net, params, x).hidden[:, 0, -1]
    expected = jnp.linalg.norm(jnp.einsum("sij,si->sj", J, v), axis=1) / jnp.linalg.norm(v, axis=1)
    np.testing.assert_allclose(jnp.prod(stats.gradient_ratio, axis=1), expected, rtol=1e-12)


def test_plain_networks_have_no_blocks(key):
    net = jl.mlp(3, 4, "relu")
    with pytest.raises(ValueError, match="no residual blocks"):
        jl.pythagorean_decomposition(net, net.init(key), jnp.ones((2, 4)))


def test_block_gsc_equals_the_gsc_matrix_entry_across_each_block(key):
    """GSC(l+1, l) from the all-pairs GSC matrix is the GSC across block l."""
    net = jl.resmlp(4, 12, "tanh", norm="layer", dtype="float64")
    params = net.init(key)
    x = _x(3, 12)
    b = jl.block_gsc(net, params, x)
    G = jl.gsc_matrix(net, params, x)
    across = jnp.stack([G[:, l + 1, l] for l in range(4)], axis=1)
    np.testing.assert_allclose(b.gsc, across, rtol=1e-12)
    np.testing.assert_allclose(
        b.branch_ratio, jl.pythagorean_decomposition(net, params, x).branch_ratio, rtol=1e-12
    )


def test_block_gsc_prediction_becomes_exact_as_width_grows(key):
    """The prediction neglects the cross term 2<f, r> and 2 tr(J_r)/d, both of relative
    order 1/sqrt(width): its median error shrinks about 3-fold from width 32 to 288. The
    median is pooled over 4 initializations (96 blocks x inputs): one draw's median varies
    2-3x between seeds."""

    def median_error(width):
        net = jl.resmlp(6, width, "tanh", norm="layer", dtype="float64")
        errors = [
            jnp.abs(b.predicted / b.gsc - 1)
            for b in (
                jl.block_gsc(net, net.init(k), _x(4, width)) for k in jax.random.split(key, 4)
            )
        ]
        return float(jnp.median(jnp.stack(errors)))

    e32, e288 = median_error(32), median_error(288)
    assert e288 < e32 / 1.8
    assert e288 < 0.02


def test_zero_branch_has_block_gsc_one(key):
    net = jl.resmlp(3, 8, "relu", residual_scale=0.0, dtype="float64")
    b = jl.block_gsc(net, net.init(key), _x(2, 8))
    np.testing.assert_allclose(b.gsc, 1.0, rtol=1e-14)
    np.testing.assert_allclose(b.predicted, 1.0, rtol=1e-14)
    assert np.all(np.isnan(b.branch_gsc))  # a branch of length 0 has no GSC


def test_block_gsc_measures_post_activation_blocks_and_predicts_nan(key):
    """With a post-activation the output is not skip + branch: the GSC across the block is
    still measured (it equals the all-pairs GSC(l+1, l)), the Pythagorean prediction is
    NaN, and one warning names the blocks."""
    net = jl.resmlp(2, 4, "relu", block_order="post", dtype="float64")
    params = net.init(key)
    x = _x(3, 4)
    with pytest.warns(jl.PostBlockWarning, match="2 block"):
        bg = jl.block_gsc(net, params, x)
    G = jl.gsc_matrix(net, params, x)
    ls = np.array(net.block_outputs)
    np.testing.assert_allclose(bg.gsc, G[:, ls + 1, ls], rtol=1e-12)
    assert np.all(np.isnan(bg.predicted)) and np.all(np.isfinite(bg.branch_gsc))


def test_block_stats_of_a_plain_network_are_its_layer_jacobians(key):
    net = jl.mlp(4, 6, "tanh", dtype="float64")
    params = net.init(key)
    x = _x(2, 6)
    stats = jl.block_jacobian_stats(net, params, x, key)
    lj = jl.layer_jacobians(net, params, x)
    np.testing.assert_allclose(stats.singular_values, jl.singular_values(lj.units), rtol=1e-12)
