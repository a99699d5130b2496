"""Convolutional networks: Jacobians against jax.jacfwd, exact isometries, the
initializers' defining properties, and the diagnostics shared with MLPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl


def _images(n, size, channels, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, channels), jnp.float64)


@pytest.mark.parametrize("residual", [False, True])
def test_conv_jacobians_agree_with_jacfwd(key, residual):
    """Per-layer Jacobians accumulated by jacobian_lab equal jax.jacfwd of the whole
    network on the flattened image (row-major (h, w, c) order)."""
    if residual:
        net = jl.resconvnet(2, 4, "tanh", image_size=5, in_channels=3, dtype="float64")
    else:
        net = jl.convnet(3, 4, "tanh", image_size=5, in_channels=3, dtype="float64")
    p = net.init(key)
    x = _images(2, 5, 3)
    J = jl.input_output_jacobian(net, p, x)
    assert J.shape == (2, 5 * 5 * 4, 5 * 5 * 3)
    for s in range(2):
        ref = jax.jacfwd(lambda v: net.apply(p, v.reshape(1, 5, 5, 3)).ravel())(x[s].ravel())
        np.testing.assert_allclose(J[s], ref, rtol=1e-10, atol=1e-12)
    P = jl.input_to_layer_jacobians(net, p, x)
    np.testing.assert_allclose(P[:, 0], J, rtol=1e-10, atol=1e-12)


def test_linear_delta_orthogonal_network_is_an_exact_isometry(key):
    """Delta-orthogonal kernels act on each pixel by one orthogonal matrix (SAME padding
    only ever reaches zero taps), so every singular value of the Jacobian is sigma_w^L."""
    net = jl.convnet(
        4,
        6,
        "linear",
        image_size=4,
        in_channels=6,
        weight_init="delta_orthogonal",
        sigma_w=1.1,
        dtype="float64",
    )
    p = net.init(key)
    J = jl.input_output_jacobian(net, p, _images(1, 4, 6))
    s = np.linalg.svd(J[0], compute_uv=False)
    np.testing.assert_allclose(s, 1.1**4, rtol=1e-12)
    np.testing.assert_allclose(jl.gsc(net, p, _images(2, 4, 6)), 1.0, rtol=1e-12)


@pytest.mark.parametrize("init", ["orthogonal", "delta_orthogonal"])
def test_orthogonal_kernels_have_orthonormal_rows(key, init):
    """The kernel reshaped to (C_out, k^2 C_in) has orthonormal rows times sigma_w (for the
    delta kernel: its centre tap is orthogonal, the rest zero)."""
    W = jl.convnets.conv_kernel(key, init, 3, 4, 8, sigma_w=2.0, dtype=jnp.float64)
    assert W.shape == (3, 3, 4, 8)
    M = W.reshape(36, 8).T
    if init == "delta_orthogonal":  # centre tap (4, 8): orthonormal rows times sigma_w
        np.testing.assert_allclose(W[1, 1] @ W[1, 1].T, 4.0 * np.eye(4), atol=1e-12)
        assert float(jnp.sum(jnp.abs(W)) - jnp.sum(jnp.abs(W[1, 1]))) == 0.0
    else:
        np.testing.assert_allclose(M @ M.T, 4.0 * np.eye(8), atol=1e-12)


def test_he_kernel_variance(key):
    """He: entries N(0, 2 / (k^2 C_in)); the relative standard error of the sample
    variance of 9*16*64 = 9216 entries is sqrt(2/9216) = 1.5%: tolerance 6% (4 of them)."""
    W = jl.convnets.conv_kernel(key, "he", 3, 16, 64, dtype=jnp.float64)
    np.testing.assert_allclose(jnp.var(W), 2.0 / (9 * 16), rtol=0.06)


def test_he_relu_convnet_keeps_the_gsc_near_one_per_layer(key):
    """Mean field: He-initialized ReLU layers have chi_1 = 1, so the qm norm of the
    Jacobian and the lengths stay O(1) with depth and the per-layer rate GSC(L, 0)^(1/L)
    is 1 up to finite size. Measured over 12 seeds: 1.027 +- 0.036 per seed (a +0.03
    finite-size offset); the mean of 4 seeds has standard error 0.018, so |rate - 1| < 0.1
    holds the offset plus 4 standard errors, and rejects sigma_w^2 = 1 or 4 (rate ~0.7 or
    ~1.4)."""
    net = jl.convnet(8, 16, "relu", image_size=8, in_channels=3)
    x = _images(4, 8, 3).astype(jnp.float32)
    rates = [
        jnp.exp(jnp.mean(jnp.log(jl.gsc(net, net.init(k), x)[:, -1])) / 8)
        for k in jax.random.split(key, 4)
    ]
    assert abs(float(jnp.mean(jnp.array(rates))) - 1.0) < 0.1


def test_layer_norm_normalizes_each_image_and_batch_norm_each_channel(key):
    for norm, axes in (("layer", (1, 2, 3)), ("batch", (0, 1, 2))):
        net = jl.convnet(
            2,
            4,
            "linear",
            image_size=5,
            in_channels=3,
            norm=norm,
            order="linear-act-norm",
            dtype="float64",
        )
        h = net.apply(net.init(key), _images(3, 5, 3))
        np.testing.assert_allclose(jnp.mean(h, axis=axes), 0.0, atol=1e-12)
        np.testing.assert_allclose(jnp.var(h, axis=axes), 1.0, rtol=1e-3)  # eps = 1e-5


def test_residual_diagnostics_on_a_conv_resnet(key):
    """On images: the Pythagorean terms are those of the stream's values, the block GSC
    equals qm(J) ||f_1|| / ||f_0|| with J by jax.jacfwd of the last block, and the
    matrix-free GSC agrees with the dense one within its error."""
    net = jl.resconvnet(3, 4, "relu", image_size=4, in_channels=3, norm="layer", dtype="float64")
    p = net.init(key)
    x = _images(2, 4, 3)
    d = jl.pythagorean_decomposition(net, p, x)
    assert d.skip_sq.shape == (2, 3)
    acts = net.activations(p, x)  # (L, 2, 4, 4, 4): acts[l] = f_l
    np.testing.assert_allclose(d.skip_sq[:, 0], jnp.sum(acts[1] ** 2, axis=(1, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(d.sum_sq, d.skip_sq + d.branch_sq + d.cross, rtol=1e-12)
    bg = jl.block_gsc(net, p, x)
    assert bg.gsc.shape == (2, 3)
    last = jax.tree_util.tree_map(lambda a: a[-1], p["units"])
    f1 = acts[1][0]
    J = jax.jacfwd(lambda v: net.unit(last, v.reshape(1, 4, 4, 4)).ravel())(f1.ravel())
    expected = jnp.linalg.norm(J) / 8.0 * jnp.linalg.norm(f1) / jnp.linalg.norm(acts[0][0])
    np.testing.assert_allclose(bg.gsc[0, 0], expected, rtol=1e-10)
    stats = jl.block_jacobian_stats(net, p, x, key)
    assert stats.singular_values.shape == (2, 3, 64)
    dense = jl.gsc(net, p, x, method="dense")
    est = jl.gsc_estimate(net, p, x, jax.random.PRNGKey(3), 256)
    assert float(jnp.max(jnp.abs((est.value - dense)[:, 1:] / est.error[:, 1:]))) < 4.5


def test_cifar_shaped_gsc_goes_matrix_free(key):
    """A 32 x 32 x 16 layer has a 16384 x 16384 Jacobian: 1 GiB in float32, more than the
    default budget with its running product, so method='auto' estimates it matrix-free."""
    from jacobian_lab.gsc import dense_gsc_bytes

    net = jl.resconvnet(2, 16, "relu", norm="layer")
    p = net.init(key)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 32, 3))
    assert dense_gsc_bytes(net, p, net.samples(x)) > 2**30
    g = jl.gsc(net, p, x, num_probes=8)
    assert g.shape == (1, 4) and bool(jnp.all(jnp.isfinite(g)))


def test_conv_bad_input(key):
    with pytest.raises(ValueError, match="unknown weight_init .glorot. for a ConvNetwork"):
        jl.convnet(2, 4, "relu", weight_init="glorot")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        jl.convnet(2, 4, "relu", kernel_size=2)
    with pytest.raises(ValueError, match="unknown activation"):
        jl.convnet(2, 4, "relux")
    net = jl.convnet(2, 4, "relu", image_size=8)
    with pytest.raises(ValueError, match=r"inputs of shape \(batch, 8, 8, 3\)"):
        jl.gsc(net, net.init(key), jnp.ones((2, 8, 8, 4)))


def test_domain_statistics_of_an_isometric_conv_net_keep_the_input_cosine(key):
    """A linear delta-orthogonal CNN (sigma_w = 1) is an isometry of the flattened image,
    so the mean pairwise cosine between examples is the input's at every layer."""
    net = jl.convnet(
        3,
        4,
        "linear",
        image_size=4,
        in_channels=4,
        weight_init="delta_orthogonal",
        dtype="float64",
    )
    d = jl.domain_statistics(net, net.init(key), _images(3, 4, 4))
    np.testing.assert_allclose(d.cosine, d.cosine[-1], rtol=1e-10)
