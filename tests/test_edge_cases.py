"""Numbers a researcher can trust: extreme and bad inputs give a correct number, a warning
naming the layer and the cause, or an error naming the argument and the fix; never a
silent 0 or NaN."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl
from jacobian_lab.gsc import UnderflowWarning
from jacobian_lab.model import LayerOutputError


def _x(n, d, dtype=jnp.float32, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), dtype)


# -- 1. lengths and products that overflow or underflow while every layer is finite ------


def test_large_activations_give_the_float64_gsc_in_float32(key):
    """ReLU with sigma_w = 4: activations reach ~1e21 at depth 50 (finite in float32), so
    ||f_0||^2 and the running Jacobian product overflow unless rescaled."""
    net32 = jl.mlp(50, 32, "relu", sigma_w=4.0)
    net64 = jl.mlp(50, 32, "relu", sigma_w=4.0, dtype="float64")
    x = _x(2, 32)
    g32 = jl.gsc(net32, net32.init(key), x)
    g64 = jl.gsc(net64, net64.init(key), x.astype(jnp.float64))
    assert float(jnp.max(jnp.abs(net32.activations(net32.init(key), x)))) > 1e19
    np.testing.assert_allclose(g32, g64, rtol=2e-3)  # float32 rounding over 50 layers
    G = jl.gsc_matrix(net32, net32.init(key), x)
    np.testing.assert_allclose(G[:, :, 0], g64, rtol=2e-3)


def test_a_single_layer_jacobian_beyond_float32_range_raises_in_gsc_matrix():
    """One layer scaling by 1e20 keeps its output finite in float32 (~1e20) but the squared
    norm of its Jacobian product, ~1e40, is not a float32 number: an error, not NaN."""
    W = 1e20 * jnp.eye(4, dtype=jnp.float32)
    ch, params = jl.chain([(lambda W, h: W @ h, W), (lambda W, h: W @ h, W / 1e20)])
    with pytest.raises(FloatingPointError, match="float64"):
        jl.gsc_matrix(ch, params, _x(2, 4))


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_a_relu_gsc_does_not_depend_on_the_input_scale(key, scale):
    """ReLU networks without biases are positively homogeneous: GSC is scale free."""
    net = jl.mlp(20, 16, "relu", sigma_w=2**0.5)
    params, x = net.init(key), _x(2, 16)
    g = jl.gsc(net, params, x)
    np.testing.assert_allclose(jl.gsc(net, params, scale * x), g, rtol=1e-4)
    np.testing.assert_allclose(
        jl.gsc_matrix(net, params, scale * x), jl.gsc_matrix(net, params, x), rtol=1e-4
    )
    res = jl.resmlp(4, 16, "relu")
    rp = res.init(key)
    b, b_scaled = jl.block_gsc(res, rp, x), jl.block_gsc(res, rp, scale * x)
    np.testing.assert_allclose(b_scaled.gsc, b.gsc, rtol=1e-4)
    # ||f + r||^2 ~ scale^2 is no float32 number at 1e+-20: an error, not inf or 0; at
    # 1e+-15 it is, and the cosine (computed scale free) is the unscaled one
    with pytest.raises(FloatingPointError, match=r"\|\|f \+ r\|\|\^2 .*float32"):
        jl.pythagorean_decomposition(res, rp, scale * x)
    p = jl.pythagorean_decomposition(res, rp, x)
    p_scaled = jl.pythagorean_decomposition(res, rp, scale**0.75 * x)
    np.testing.assert_allclose(p_scaled.cosine, p.cosine, rtol=1e-4, atol=1e-6)


def test_qm_norm_of_a_finite_matrix_is_finite():
    """Computed in logs: float32 keeps log(2e30) = 69.8 to one ulp, 7.6e-6 relative."""
    A = jnp.full((4, 4), 1e30, jnp.float32)
    np.testing.assert_allclose(jl.qm_norm(A), 2e30, rtol=1e-5)  # sqrt(16 / 4) * 1e30
    np.testing.assert_allclose(jl.qm_norm(jnp.full((4, 4), 1e-30, jnp.float32)), 2e-30, rtol=1e-5)


# -- 2. exact zeros from saturation ------------------------------------------------------


def test_saturated_jacobian_warns_with_the_layer_and_growth_rate_refuses_zeros(key):
    net = jl.mlp(10, 32, "tanh", sigma_w=1000.0)
    with pytest.warns(UnderflowWarning, match=r"GSC\(k, 0\) is exactly 0 for k >= 1.*'dense10'"):
        g = jl.gsc(net, net.init(key), _x(2, 32))
    with pytest.raises(ValueError, match="needs positive finite values"):
        jl.growth_rate(g.mean(0))
    # a value beyond the dtype (a float64 profile past 3e38 is inf once cast to float32)
    with pytest.raises(ValueError, match=r"GSC\(2, 0\) is inf"):
        jl.growth_rate(jnp.array([1.0, 1e20, jnp.inf], jnp.float32))


# -- 3. degenerate networks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: (jl.mlp(5, 8, "relu", sigma_w=0.0), _x(3, 8)),  # zero weights
        lambda: (jl.mlp(4, 1, "relu", norm="layer", in_dim=8), _x(3, 8)),  # one feature
        lambda: (jl.mlp(4, 8, "tanh", norm="batch"), jnp.ones((4, 8))),  # identical samples
    ],
    ids=["sigma_w=0", "width-1 layer norm", "identical batch-norm samples"],
)
def test_a_zero_layer_output_is_an_error_naming_the_layer(key, make):
    net, x = make()
    with pytest.raises(FloatingPointError, match=r"is exactly zero for sample 0.*undefined"):
        jl.gsc(net, net.init(key), x)
    if not net.batch_coupled:  # the pairwise cosines divide by the same lengths
        with pytest.raises(FloatingPointError, match=r"is exactly zero for sample 0"):
            jl.domain_statistics(net, net.init(key), x)


def test_a_dead_relu_network_is_an_error_and_gsc00_is_always_one(key):
    net = jl.mlp(50, 4, "relu", sigma_w=2**0.5)
    with pytest.raises(FloatingPointError, match=r"'dense\d+' .* is exactly zero"):
        jl.gsc(net, net.init(jax.random.PRNGKey(3)), _x(2, 4))
    live = jl.mlp(6, 8, "relu", sigma_w=2**0.5)
    assert bool(jnp.all(jl.gsc(live, live.init(key), _x(3, 8))[:, 0] == 1))


def test_an_empty_layer_output_names_the_layer():
    ch, params = jl.chain([jnp.tanh, (lambda p, h: h[:0], ())], names=["ok", "empty"])
    with pytest.raises(LayerOutputError, match=r"'empty'.*empty output"):
        jl.gsc(ch, params, _x(2, 3))


# -- 4. inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [jnp.inf, jnp.nan])
def test_non_finite_inputs_are_rejected_naming_the_sample(key, bad):
    net = jl.mlp(4, 8, "tanh")
    x = _x(3, 8).at[1, 2].set(bad)
    with pytest.raises(ValueError, match=r"x holds inf or NaN in sample 1 of 3"):
        jl.gsc(net, net.init(key), x)
    with pytest.raises(ValueError, match=r"x holds inf or NaN in sample 1 of 3"):
        jl.gsc_estimate(net, net.init(key), x, key, 8)


# -- 5. params that do not belong to the model ---------------------------------------------


@pytest.mark.parametrize(
    "other, match",
    [
        (
            lambda: jl.mlp(12, 8, "tanh").init(jax.random.PRNGKey(0)),
            r"\['units'\]\['W'\] has shape \(11, 8, 8\), expected \(5, 8, 8\)",
        ),
        (lambda: jl.mlp(6, 9, "tanh", in_dim=8).init(jax.random.PRNGKey(0)), r"has shape"),
        (lambda: jl.resmlp(5, 8, "tanh").init(jax.random.PRNGKey(0)), r"has shape \(5, 2, 8, 8\)"),
        (
            lambda: {"stem": jl.mlp(6, 8, "tanh").init(jax.random.PRNGKey(0))["stem"]},
            r"has no entry \['units'\]",
        ),
        (lambda: None, r"params is None"),
    ],
    ids=["deeper", "wider", "resnet", "missing key", "None"],
)
def test_params_of_another_model_are_rejected_naming_the_entry(other, match):
    net = jl.mlp(6, 8, "tanh")
    with pytest.raises(ValueError, match=match):
        jl.gsc(net, other(), _x(2, 8))


# -- 6. precision: the model's dtype wins ----------------------------------------------------


def test_the_model_dtype_wins_and_seeds_draw_the_same_numbers_in_both_precisions(key):
    net32 = jl.mlp(4, 8, "tanh", weight_init="orthogonal")
    net64 = jl.mlp(4, 8, "tanh", weight_init="orthogonal", dtype="float64")
    p32, p64 = net32.init(key), net64.init(key)
    assert jl.gsc(net32, p32, _x(2, 8, jnp.float64)).dtype == jnp.float32  # x is cast
    with pytest.raises(ValueError, match=r"is float32 but this model computes in float64"):
        jl.gsc(net64, p32, _x(2, 8))
    for a, b in zip(jax.tree_util.tree_leaves(p32), jax.tree_util.tree_leaves(p64), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # rounding only
    W = p64["units"]["W"][0]
    np.testing.assert_allclose(W @ W.T, jnp.eye(8), atol=1e-14)  # orthogonal in float64


# -- 9. raw errors a user cannot act on ------------------------------------------------------


@pytest.mark.parametrize(
    "x, error, match",
    [
        (jnp.zeros((0, 8)), ValueError, "holds no samples"),
        ([[0.0] * 8] * 2, TypeError, r"got list: use jnp.asarray\(x\)"),
        (jnp.ones((2, 8), jnp.int32), TypeError, r"holds int32 values.*jl.chain\(model, ids\)"),
        (jnp.ones((2, 8), bool), TypeError, "holds bool values.*must be real floats"),
        (jnp.ones((2, 8), jnp.complex64), TypeError, "got complex"),
    ],
    ids=["empty", "list", "int", "bool", "complex"],
)
def test_bad_inputs_get_a_message_naming_x_and_the_fix(key, x, error, match):
    net = jl.mlp(3, 8, "tanh")
    with pytest.raises(error, match=match):
        jl.gsc(net, net.init(key), x)


@pytest.mark.parametrize("keys", [3, jax.random.PRNGKey(0)], ids=["int", "unsplit"])
def test_seed_sweeps_need_split_keys(keys):
    net = jl.mlp(3, 8, "tanh")
    with pytest.raises(TypeError, match=r"jax.random.split\(jax.random.PRNGKey\(0\), n_seeds\)"):
        jl.gsc_over_seeds(net, keys, _x(2, 8))


# -- 11. sizes that cannot fit ----------------------------------------------------------------


def test_a_network_too_large_for_the_machine_is_refused_before_allocating(key):
    net = jl.mlp(10**8, 16, "relu")
    with pytest.raises(MemoryError, match=r"params of this Network .* GiB, more than"):
        net.init(key)


def test_every_dense_path_checks_its_memory_before_allocating(key, monkeypatch):
    """Issue 21: every dense path (not only init and layer_to_layer_jacobians) asks XLA's
    memory analysis of its compiled program first and raises MemoryError with the sizes and
    the matrix-free alternative, before anything is allocated. Here the device is said to
    hold 0.5 MiB: the dense programs need 1.4 MiB and more, the matrix-free GSC 0.2 (the
    matrix-free spectra are checked against dense in test_krylov.py)."""
    net = jl.mlp(3, 96, "tanh", in_dim=256)
    res = jl.resmlp(2, 96, "tanh", in_dim=256)
    params, rparams, x = net.init(key), res.init(key), _x(6, 256)
    keys = jax.random.split(key, 2)

    def batch(v):
        return net.apply(params, v)

    monkeypatch.setattr("jacobian_lab.checks.available_memory", lambda: 2**19)
    sizes = r"needs [\d.e-]+ GiB \([\d.e-]+ GiB of workspace and [\d.e-]+ GiB of results"
    refused = [  # (what the message names, the fix it gives, the call)
        (
            "gsc(method='dense')",
            "method='matrix_free'",
            lambda: jl.gsc(net, params, x, method="dense"),
        ),
        (
            "gradient_norm(method='dense')",
            "gradient_norm(..., method='matrix_free')",
            lambda: jl.gradient_norm(net, params, x, method="dense"),
        ),
        ("gsc_matrix", "method='matrix_free'", lambda: jl.gsc_matrix(net, params, x)),
        (
            "input_to_layer_jacobians",
            "method='matrix_free'",
            lambda: jl.input_to_layer_jacobians(net, params, x),
        ),
        ("block_gsc", "method='matrix_free'", lambda: jl.block_gsc(res, rparams, x)),
        ("dilution", "fit='lstsq'", lambda: jl.dilution(res, rparams, x)),
        (
            "the 576 x 1536 Jacobian",
            "method='matrix_free'",
            lambda: jl.jacobian(batch, x),
        ),
        (
            "the 576 x 1536 Jacobian",
            "method='matrix_free'",
            lambda: jl.jacobian_spectrum(batch, x, method="dense"),
        ),
        (
            "map_over_devices over 2 slices",
            "method='matrix_free'",
            lambda: jl.gsc_over_seeds(net, keys, x, method="dense"),
        ),
    ]
    for what, fix, call in refused:
        match = f"(?s){re.escape(what)}.*{sizes}.*more than the 0.000488 GiB.*{re.escape(fix)}"
        with pytest.raises(MemoryError, match=match):
            call()
    # the matrix-free alternatives named in the messages fit
    assert jl.gsc(net, params, x, method="matrix_free", num_probes=8).shape == (6, 4)
    assert jl.gradient_norm(net, params, x, method="matrix_free", num_probes=8).shape == (6, 4)


def test_matrix_free_gradient_norm_is_exact_for_an_orthogonal_network(key):
    """Hutchinson on ||J_k^0||_F^2: for orthogonal J every probe gives ||J^T u||^2 = ||u||^2
    exactly, so the matrix-free gradient norm equals the dense one to rounding (float64)."""
    net = jl.mlp(5, 16, "linear", weight_init="orthogonal", dtype="float64")
    params, x = net.init(key), _x(3, 16, jnp.float64)
    dense = jl.gradient_norm(net, params, x, method="dense")
    free = jl.gradient_norm(net, params, x, method="matrix_free", num_probes=4, key=key)
    np.testing.assert_allclose(free, dense, rtol=1e-12)
    np.testing.assert_allclose(dense, 1.0, rtol=1e-12)


def test_matrix_free_gsc_and_path_gradients_survive_large_activations(key):
    """The probe pass rescales the backpropagated vector at every layer, and the path sums
    are rescaled at every block: float32 gives the float64 numbers where those are
    representable (one path's gradient reaches 1e26 here)."""
    net32 = jl.mlp(50, 32, "relu", sigma_w=4.0)
    x = _x(2, 32)
    est = jl.gsc_estimate(net32, net32.init(key), x, key, 256)
    dense = jl.gsc(net32, net32.init(key), x)
    z = jnp.abs(est.value - dense)[:, 1:] / est.error[:, 1:]
    assert bool(jnp.all(jnp.isfinite(est.value))) and float(jnp.max(z)) < 4.5
    res32 = jl.resmlp(30, 32, "relu", sigma_w=4.0)
    res64 = jl.resmlp(30, 32, "relu", sigma_w=4.0, dtype="float64")
    a = jl.path_gradients(res32, res32.init(key), x, key)
    b = jl.path_gradients(res64, res64.init(key), x.astype(jnp.float64), key)
    assert float(jnp.max(b.exact)) > 1e25  # ||G_k||^2 would overflow float32
    np.testing.assert_allclose(a.exact, b.exact, rtol=1e-3)
    np.testing.assert_allclose(a.per_path, b.per_path, rtol=1e-3)


def test_inputs_captured_by_a_callers_jit_are_checked_not_staged(key):
    """A concrete ``x`` closed over by the caller's ``jax.jit`` is still checked on the host
    (jnp would stage the check and fail to read it back)."""
    net = jl.mlp(3, 8, "tanh")
    params, x = net.init(key), _x(2, 8)
    jitted = jax.jit(lambda p: jl.gsc_estimate(net, p, x, key=key, num_probes=4).value)
    np.testing.assert_allclose(
        jitted(params), jl.gsc_estimate(net, params, x, key=key, num_probes=4).value, rtol=1e-6
    )


# -- 12. inputs and hyper-parameters (issue 21) ----------------------------------------------


def test_non_finite_params_are_refused_naming_the_entry(key):
    """An inf bias in a tanh layer saturates it and the GSC came back finite; every
    diagnostic now refuses non-finite params, naming the entry."""
    net = jl.mlp(3, 8, "tanh")
    params = net.init(key)
    bad = {**params, "stem": {**params["stem"], "b": params["stem"]["b"].at[0].set(jnp.inf)}}
    match = r"params\['stem'\]\['b'\] holds inf or NaN \(1 of 8 entries\)"
    with pytest.raises(ValueError, match=match):
        jl.gsc(net, bad, _x(2, 8))
    with pytest.raises(ValueError, match=match):
        jl.gsc_estimate(net, bad, _x(2, 8), key, 4)


def test_inputs_near_the_denormal_range_are_refused_not_silently_shifted(key):
    """Inputs of 1e-36 in float32 put the first layer's products where XLA flushes to zero:
    the GSC of a (scale-free) ReLU network moved by 8.5%, and denormal inputs read as
    "exactly zero". Both are refused naming x and the fix; in float64 the same inputs are
    far from its denormals and give the unscaled GSC to rounding."""
    net = jl.mlp(6, 16, "relu", sigma_w=2**0.5)
    params, x = net.init(key), np.asarray(_x(2, 16))
    for scale in (1e-36, 1e-40):  # near the range, and denormal
        tiny = (scale * x).astype(np.float32)
        assert 0 < np.abs(tiny).max() < 1e-30
        with pytest.raises(ValueError, match=r"x\[0\] has largest magnitude .* Rescale x"):
            jl.gsc(net, params, tiny)
    net64 = jl.mlp(6, 16, "relu", sigma_w=2**0.5, dtype="float64")
    p64, x64 = net64.init(key), jnp.asarray(x, jnp.float64)
    np.testing.assert_allclose(jl.gsc(net64, p64, 1e-36 * x64), jl.gsc(net64, p64, x64), rtol=1e-12)


def test_a_gsc_below_the_dtype_range_is_reported_as_such_and_kept_in_logs():
    """20 layers h -> 1e-3 h + 1: every Jacobian is 1e-3 I and the lengths stay near 1, so
    GSC(20, 0) ~ 1e-60, no float32 number. Before: 0 with a warning blaming a layer's
    Jacobian. Now: a warning that the value is below float32's range (no layer is zero),
    and log=True gives the float64 value's logarithm to float32 rounding (the log, about
    -138, is a sum over 20 layers: 1e-6 relative)."""

    def make(dtype):
        layer = (lambda p, h: p * h + 1.0, jnp.asarray(1e-3, dtype))
        return jl.chain([layer] * 20), jnp.ones((2, 4), dtype)

    (ch, params), x = make(jnp.float32)
    with pytest.warns(UnderflowWarning, match=r"GSC\(\d+, 0\) is about 1e-\d+, below the smallest"):
        g = jl.gsc(ch, params, x)
    assert float(g[0, -1]) == 0.0
    (ch64, params64), x64 = make(jnp.float64)
    exact = jnp.log(jl.gsc(ch64, params64, x64))
    assert float(exact[0, -1]) == pytest.approx(np.log(1e-60 / (1 / (1 - 1e-3))), rel=1e-9)
    np.testing.assert_allclose(jl.gsc(ch, params, x, log=True), exact, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: jl.mlp(2, 4, "tanh", sigma_w=float("nan")), "sigma_w must be a finite"),
        (lambda: jl.mlp(2, 4, "tanh", sigma_b=-1.0), "sigma_b must be a finite"),
        (lambda: jl.resmlp(2, 4, "tanh", residual_scale=np.nan), "residual_scale must be"),
        (lambda: jl.transformer(1, 8, 2, 4, residual_scale=np.inf), "residual_scale must be"),
        (
            lambda: jl.Network(depth=2, width=4, activation="tanh", norm="layer", norm_eps=-1.0),
            "norm_eps must be a finite number >= 0",
        ),
        (lambda: jl.architecture("resnet-relu", depth=5), r"depth must be even; got 5"),
        (lambda: jl.paper_architectures(depth=5), r"depth must be even; got 5"),
    ],
    ids=[
        "nan-sigma_w",
        "negative-sigma_b",
        "nan-residual",
        "inf-transformer",
        "norm_eps",
        "resnet-depth-5",
        "paper-depth-5",
    ],  # fmt: skip
)
def test_bad_hyper_parameters_are_refused_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_an_odd_depth_still_builds_a_plain_family():
    assert jl.architecture("relu", depth=5).depth == 5
    assert jl.architecture("resnet-relu", depth=6).num_blocks == 3


def test_bad_keys_inputs_and_samples_get_errors_naming_the_argument(key):
    net = jl.mlp(3, 8, "tanh")
    params, x = net.init(key), _x(2, 8)

    def fn(v):
        return jnp.tanh(v)

    with pytest.raises(TypeError, match=r"key must be one PRNG key, got the int 3: .*PRNGKey\(3\)"):
        jl.gsc_estimate(net, params, x, 3, 4)
    with pytest.raises(TypeError, match=r"key must be one PRNG key.*shape \(2, 2\)"):
        jl.extreme_singular_values(fn, jnp.ones(4), jax.random.split(key, 2))
    with pytest.raises(ValueError, match="keys holds no seeds"):
        jl.gsc_over_seeds(net, jax.random.split(key, 0), x)
    with pytest.raises(TypeError, match=r"x must be an array .* for this Network, .*got dict"):
        jl.gsc(net, params, {"a": x})
    for call in (
        lambda v: jl.frobenius_norm_sq(fn, v, key, 4),
        lambda v: jl.slq_spectrum(fn, v, key),
        lambda v: jl.jacobian(fn, v),
    ):
        with pytest.raises(TypeError, match=r"x must hold real floating-point numbers.*int32"):
            call(jnp.ones(4, jnp.int32))
    with pytest.raises(ValueError, match=r"s holds no singular values \(shape \(0,\)\)"):
        jl.spectral_density(jnp.zeros((0,)), jnp.linspace(0, 1, 5))
