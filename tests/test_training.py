"""The training loop (jacobian_lab.training) and the data loaders (jacobian_lab.datasets):
a hand-computed SGD step, optax's own Adam, loss decrease on a separable problem, bit-for-bit
seeds, the first-order expansion in the weights, the shipped digits and ``--data`` files."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jacobian_lab as jl

# float32 throughout: differences between two orderings of the same float32 operations are
# a few ulp per operation; 1e-5 relative covers the few dozen operations compared here.
RTOL = 1e-5


@pytest.fixture(scope="module")
def toy():
    """3 linearly separable classes in 8 dimensions, and a small tanh MLP for them."""
    data = jl.gaussian_data(jax.random.PRNGKey(1), num_train=96, num_test=48, dim=8, num_classes=3)
    net = jl.mlp(2, 16, "tanh", in_dim=8)
    return data, net, net.init(jax.random.PRNGKey(2))


def test_loss_decreases_on_a_separable_problem_and_seeds_repeat_bit_for_bit(toy):
    data, net, params = toy
    run = dict(optimizer="adam", learning_rate=0.03, steps=40, batch_size=32, gsc_samples=4)
    h = jl.train(net, params, data, key=jax.random.PRNGKey(3), **run)
    L = net.num_layers
    assert h.steps.tolist() == list(jl.training.record_steps(40))
    assert h.gsc.shape == (len(h.steps), L + 1) and h.grad_norm.shape == (len(h.steps), L)
    assert float(h.train_loss[0]) == pytest.approx(math.log(3), rel=RTOL)  # zero readout: uniform
    assert h.train_loss[-1] < 0.25 * h.train_loss[0]
    assert h.train_accuracy[-1] > 0.95 and h.test_accuracy[-1] > 0.8
    assert np.all(np.isfinite(h.gsc)) and np.allclose(h.gsc[:, 0], 1.0)
    exact = jl.gsc(net, params, data.x_train[:4], method="dense").mean(axis=0)
    np.testing.assert_allclose(h.gsc[0], exact, rtol=RTOL)  # recorded at initialization

    again = jl.train(net, params, data, key=jax.random.PRNGKey(3), **run)
    for a, b in zip(jax.tree_util.tree_leaves(h), jax.tree_util.tree_leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)  # same seed: the same numbers, bit for bit
    other = jl.train(net, params, data, key=jax.random.PRNGKey(4), **run)
    assert not np.array_equal(other.train_loss, h.train_loss)  # other mini-batches


def test_adam_matches_optax_step_by_step(toy):
    data, net, params = toy
    lr, steps = 0.01, 3
    h = jl.train(
        net,
        params,
        data,
        key=jax.random.PRNGKey(0),
        optimizer="adam",
        learning_rate=lr,
        steps=steps,
        gsc_samples=0,
    )
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    scale = h.readout_scale
    rms = jnp.sqrt(jnp.mean(jnp.square(jl.training.model_outputs(net, params, x))))
    assert float(scale) == pytest.approx(float(1 / rms), rel=RTOL)

    def loss(both):
        z = jl.logits(net, *both, x, readout_scale=scale)
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    both = (params, {"W": jnp.zeros((16, 3)), "b": jnp.zeros(3)})
    opt = optax.adam(lr)
    state = opt.init(both)

    @jax.jit
    def step(both, state):
        updates, state = opt.update(jax.grad(loss)(both), state, both)
        return optax.apply_updates(both, updates), state

    for _ in range(steps):  # the reference: optax's own Adam, one step at a time
        both, state = step(both, state)
    got = (h.params, h.head)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(both), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7)
    assert float(h.train_loss[-1]) == pytest.approx(float(loss(both)), rel=RTOL)


def test_sgd_step_equals_the_hand_computed_step():
    """One full-batch SGD step from the zero readout, in numpy: the softmax of zero logits
    is uniform, so the head's gradient is ``c F^T (1/C - onehot(y)) / N`` and the
    model's is zero (it only reaches the model through the zero head)."""
    data = jl.gaussian_data(jax.random.PRNGKey(5), num_train=12, num_test=4, dim=3, num_classes=4)
    net = jl.mlp(1, 5, "linear", in_dim=3)
    params = net.init(jax.random.PRNGKey(6))
    lr = 0.5
    h = jl.train(
        net,
        params,
        data,
        key=jax.random.PRNGKey(0),
        learning_rate=lr,
        steps=1,
        record_at=(0, 1),
        gsc_samples=0,
    )
    x, y = data.x_train.astype(np.float64), data.y_train
    W, b = (np.asarray(params["stem"][k], np.float64) for k in ("W", "b"))
    F = x @ W.T + b  # the linear layer's output f_0
    c = 1 / np.sqrt(np.mean(F**2))
    residual = np.full((12, 4), 1 / 4) - np.eye(4)[y]  # softmax(0) - onehot
    np.testing.assert_allclose(h.head["W"], -lr * c * F.T @ residual / 12, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h.head["b"], -lr * residual.mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(h.params["stem"]["W"], params["stem"]["W"])
    assert h.grad_norm[0].tolist() == [0.0] and h.update_ratio[0].tolist() == [0.0]
    assert float(h.head_grad_norm[0]) == pytest.approx(
        np.sqrt(np.sum((c * F.T @ residual / 12) ** 2) + np.sum(residual.mean(0) ** 2)), rel=1e-5
    )


def test_layer_norms_index_layers_from_the_output():
    net = jl.resmlp(3, 4, "relu", block_layers=2, in_dim=2)
    ones = jax.tree_util.tree_map(jnp.ones_like, net.init(jax.random.PRNGKey(0)))
    ones["units"]["W"] = ones["units"]["W"].at[0].multiply(2.0)  # the first block
    got = jl.norm_per_layer(net, ones)
    block, first = np.sqrt(2 * 16 + 2 * 4), np.sqrt(2 * 64 + 2 * 4)
    # f_0: block 3, f_1: block 2, f_2: block 1 (doubled weights), f_3: the stem (4x2 + 4)
    np.testing.assert_allclose(got, [block, block, first, np.sqrt(12)], rtol=1e-6)


def test_norm_per_layer_counts_each_unit_of_a_group():
    """A transformer repeats (attention, MLP) per block: one norm per sublayer, copy by copy,
    and 0 for the parameter-free final norm. All-ones params: the norm is sqrt(entries)."""
    net = jl.transformer(2, 8, 2, 4, mlp_ratio=2)
    ones = jax.tree_util.tree_map(jnp.ones_like, net.init(jax.random.PRNGKey(0)))
    attn, mlp = np.sqrt(4 * (8 * 8 + 8)), np.sqrt(16 * 8 + 16 + 8 * 16 + 8)
    got = jl.norm_per_layer(net, ones)  # f_0 = final norm, then block 2's mlp, attn, ...
    np.testing.assert_allclose(got, [0.0, mlp, attn, mlp, attn], rtol=1e-6)
    with pytest.raises(NotImplementedError, match="group"):
        jl.linearized_outputs(net, ones, ones, jnp.ones((2, 4, 8)), jnp.ones(5, bool))


def test_first_order_expansion_in_the_weights():
    """A linear layer is affine in its weights, so its expansion is exact; for tanh layers
    the error is second order in the weight change."""
    k0, k1, kx = jax.random.split(jax.random.PRNGKey(7), 3)
    x = jax.random.normal(kx, (5, 6))
    for act, exact in (("linear", True), ("tanh", False)):
        net = jl.mlp(4, 6, act)
        p0 = net.init(k0)
        delta = jax.tree_util.tree_map(lambda a: 1e-2 * a, net.init(k1))
        p1 = jax.tree_util.tree_map(jnp.add, p0, delta)
        full = jl.training.model_outputs(net, p1, x)
        linearized = jax.jit(
            lambda mask, net=net, p0=p0, p1=p1: jl.linearized_outputs(net, p0, p1, x, mask)
        )  # one compilation for both masks
        np.testing.assert_allclose(linearized(np.zeros(4, bool)), full, rtol=RTOL)
        lin = linearized(np.ones(4, bool))
        err = float(jnp.max(jnp.abs(lin - full)) / jnp.max(jnp.abs(full)))
        # tanh: the weight change is 1e-2 of the weights, so the second-order error ~1e-4
        assert err < 1e-5 if exact else 1e-6 < err < 1e-3


def test_digits_are_shipped_split_and_standardized():
    d = jl.digits()
    assert (d.x_train.shape, d.x_test.shape, d.num_classes) == ((1437, 64), (360, 64), 10)
    assert set(np.unique(d.y_test)) == set(range(10))
    varying = d.x_train.std(axis=0) > 0
    np.testing.assert_allclose(d.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(d.x_train.std(axis=0)[varying], 1, rtol=1e-4)
    np.testing.assert_array_equal(jl.digits().y_train, d.y_train)  # a fixed split


def test_load_npz_reads_a_small_file_and_names_what_is_wrong(tmp_path):
    rng = np.random.default_rng(0)
    good = {
        "x_train": rng.normal(size=(6, 2, 2)),
        "y_train": np.array([0, 1, 2, 0, 1, 2]),
        "x_test": rng.normal(size=(3, 2, 2)),
        "y_test": np.array([2, 1, 0]),
    }
    np.savez(tmp_path / "ok.npz", **good)
    d = jl.load_npz(tmp_path / "ok.npz")
    assert d.feature_shape == (2, 2) and d.num_classes == 3 and d.x_train.dtype == np.float32

    def bad(name, match, **change):
        arrays = {k: v for k, v in {**good, **change}.items() if v is not None}
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=match):
            jl.load_npz(tmp_path / name)

    bad("no_y.npz", "missing array 'y_test'", y_test=None)
    bad("short_y.npz", r"y_train has shape \(5,\); expected \(6,\)", y_train=np.zeros(5, int))
    bad("flat.npz", r"x_test has shape \(3,\)", x_test=np.zeros(3))
    bad("float_y.npz", "integer class labels", y_test=np.array([0.5, 1.0, 2.0]))
    bad("mismatch.npz", "x_train inputs have shape", x_test=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="no such file"):
        jl.load_npz(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        jl.load_npz(tmp_path / "junk.npz")


def test_train_rejects_data_that_does_not_fit_the_model(toy):
    data, net, params = toy
    with pytest.raises(ValueError, match="in_dim=64"):
        jl.train(net, params, jl.digits(), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        jl.train(net, params, data, key=jax.random.PRNGKey(0), optimizer="rmsprop")
    with pytest.raises(ValueError, match="batch_size"):
        jl.train(net, params, data, key=jax.random.PRNGKey(0), batch_size=1000)


def test_data_option_reaches_the_analysis_and_a_bad_file_stops_it_early(tmp_path, capsys):
    from jacobian_lab.experiments.report import analysis_config, script_main
    from jacobian_lab.experiments.trainability import ANALYSIS, configs

    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.normal(size=(8, 3)), "y_train": np.arange(8) % 2}
    np.savez(tmp_path / "good.npz", **arrays, x_test=rng.normal(size=(4, 3)), y_test=[0, 1, 0, 1])
    config = analysis_config(ANALYSIS, "tiny", data=str(tmp_path / "good.npz"))
    units = configs(config)
    assert units[0]["data"] == str(tmp_path / "good.npz") and len(units[0]["data_sha256"]) == 16

    np.savez(tmp_path / "bad.npz", **arrays, x_test=rng.normal(size=(4, 3)))
    argv = ["--size", "tiny", "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o")]
    assert script_main(ANALYSIS, argv) == 2
    assert "missing array 'y_test'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "trainability" / "records.jsonl").exists()  # no work done


def test_a_brought_model_trains_and_its_parameter_free_layers_get_nan(toy):
    data = toy[0]
    k1, k2 = jax.random.split(jax.random.PRNGKey(8))

    def dense(p, h):
        return h @ p["W"] + p["b"]

    layers = [  # chain() joins an activation to the layer before it: a first one stays
        jnp.tanh,
        (dense, {"W": jax.random.normal(k1, (8, 16)) / jnp.sqrt(8.0), "b": jnp.zeros(16)}),
        jnp.tanh,
        (dense, {"W": jax.random.normal(k2, (16, 5)) / 4.0, "b": jnp.zeros(5)}),
    ]
    model, params = jl.chain(layers)
    h = jl.train(model, params, data, key=jax.random.PRNGKey(0), optimizer="adam",
                 learning_rate=0.03, steps=10, gsc_samples=4)  # fmt: skip
    assert h.train_loss[-1] < 0.5 * h.train_loss[0]
    assert h.gsc.shape[1] == 4 and np.all(np.isfinite(h.gsc))
    # GSC-paper order: f_0 = the last dense layer, f_1 = dense + tanh, f_2 = tanh (no params)
    assert np.isnan(h.grad_norm[-1, 2]) and np.isnan(h.update_ratio[-1, 2])
    assert np.all(h.grad_norm[-1, :2] > 0) and np.all(h.update_ratio[-1, :2] > 0)


def test_a_diverging_run_warns_and_bad_counts_are_refused():
    """An absurd learning rate makes the loss non-finite: a warning naming the run, not a
    silent NaN history; negative sample or probe counts are errors naming the argument."""
    net = jl.mlp(3, 8, "relu", in_dim=4)
    data = jl.gaussian_data(jax.random.PRNGKey(0), num_train=32, num_test=8, dim=4)
    params = jax.tree_util.tree_map(lambda a: a[None], net.init(jax.random.PRNGKey(1)))
    keys = jax.random.split(jax.random.PRNGKey(2), 1)
    with pytest.warns(RuntimeWarning, match=r"run\(s\) \[0\] of 1"):
        jl.train_runs(net, params, data, keys=keys, learning_rates=[1e30], steps=5)
    with pytest.raises(ValueError, match="gsc_samples"):
        jl.train_runs(net, params, data, keys=keys, learning_rates=[0.1], gsc_samples=-1)


def test_tied_weights_stay_tied():
    """One array used by two layers: in a list of layers the copies get the summed
    gradient and stay equal; in a model read whole it is one leaf. Both train the same."""
    W = jax.random.normal(jax.random.PRNGKey(0), (6, 6)) / 3
    V = jax.random.normal(jax.random.PRNGKey(1), (6, 6)) / 3
    layer = lambda A, h: jnp.tanh(A @ h)  # noqa: E731
    listed, lp = jl.chain([(layer, W), (layer, V), (layer, W)])
    assert listed.ties == ((0, 2),)

    def apply(p, x):
        for A in (p["W"], p["V"], p["W"]):
            x = jl.tap(jnp.tanh(x @ A.T))
        return x

    read, rp = jl.chain((apply, {"W": W, "V": V}), jnp.ones((2, 6)))
    data = jl.gaussian_data(jax.random.PRNGKey(2), num_train=64, num_test=32, dim=6, num_classes=3)
    kw = {"key": jax.random.PRNGKey(3), "steps": 10, "learning_rate": 0.3, "optimizer": "adam"}
    a = jl.train(listed, lp, data, **kw)
    b = jl.train(read, rp, data, **kw)
    np.testing.assert_array_equal(a.params[0], a.params[2])  # kept equal
    assert not np.allclose(a.params[0], W)  # and trained
    np.testing.assert_allclose(a.params[0], b.params["W"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-5)


def _replace(data, **change):
    return data._replace(**{k: np.asarray(v) for k, v in change.items()})


@pytest.mark.parametrize(
    "change, error, match",
    [
        (
            lambda d: _replace(d, y_train=np.where(d.y_train == 0, -1, d.y_train)),
            ValueError,
            r"y_train must hold integer class labels 0, 1, \.\.\., got -1 .*wrap",
        ),
        (
            lambda d: _replace(d, y_test=d.y_test + 3),
            ValueError,
            r"labels must lie in 0 \.\. num_classes - 1 = 2, but y_test holds 5",
        ),
        (
            lambda d: _replace(d, x_train=d.x_train.at[4, 1].set(np.nan)),
            ValueError,
            r"x_train holds inf or NaN \(first in row 4 of 96\)",
        ),
        (
            lambda d: _replace(d, y_train=d.y_train.astype(np.float32)),
            ValueError,
            r"y_train must hold integer class labels.*float32",
        ),
        (
            lambda d: _replace(d, x_test=d.x_test[:0], y_test=d.y_test[:0]),
            ValueError,
            r"x_test has shape \(0, 8\); expected .* at least one sample",
        ),
        (
            lambda d: _replace(d, y_train=d.y_train[:5]),
            ValueError,
            r"y_train has shape \(5,\); expected \(96,\), one label per row of x_train",
        ),
    ],
    ids=["negative", "beyond", "nan", "float", "empty-test", "short"],
)
def test_train_checks_a_dataset_as_load_npz_does(toy, change, error, match):
    """Issue 21: a Dataset built by hand gets the checks of load_npz before any step (it
    used to wrap negative labels to the last class, warn only "diverged" for labels beyond
    num_classes or NaN inputs, and end in raw JAX errors for an empty or short split)."""
    data, net, params = toy
    data = change(data._replace(x_train=jnp.asarray(data.x_train)))
    with pytest.raises(error, match=match):
        jl.train(net, params, data, key=jax.random.PRNGKey(0), steps=1)


def test_train_refuses_integer_params_and_an_absurd_readout(toy):
    data, net, params = toy
    with pytest.raises(TypeError, match=r"params\['stem'\]\['b'\] is int32.*needs floats"):
        bad = {**params, "stem": {**params["stem"], "b": jnp.zeros(16, jnp.int32)}}
        jl.train(net, bad, data, key=jax.random.PRNGKey(0), steps=1)
    with pytest.raises(MemoryError, match=r"readout head \(16 x 100000000000 weights"):
        jl.train(net, params, data._replace(num_classes=10**11), key=jax.random.PRNGKey(0))


def test_load_npz_keeps_huge_inputs_and_refuses_a_stray_label(tmp_path):
    """Inputs near 1e300 are finite: standardized they are the inputs at scale 1 (before:
    std = inf, every input 0). One label of 10^9 among 9 would build a 10^9-class readout."""
    rng = np.random.default_rng(0)
    x_train, x_test = rng.normal(size=(6, 3)), rng.normal(size=(3, 3))
    y = {"y_train": np.array([0, 1, 2, 0, 1, 2]), "y_test": np.array([2, 1, 0])}
    np.savez(tmp_path / "huge.npz", x_train=1e300 * x_train, x_test=1e300 * x_test, **y)
    np.savez(tmp_path / "unit.npz", x_train=x_train, x_test=x_test, **y)
    huge, unit = jl.load_npz(tmp_path / "huge.npz"), jl.load_npz(tmp_path / "unit.npz")
    np.testing.assert_allclose(huge.x_train, unit.x_train, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(huge.x_test, unit.x_test, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(huge.x_train.std(axis=0), 1.0, rtol=1e-5)
    stray = {**y, "y_train": np.array([0, 1, 2, 0, 10**9, 2])}
    np.savez(tmp_path / "stray.npz", x_train=x_train, x_test=x_test, **stray)
    with pytest.raises(ValueError, match=r"y_train\[4\] = 1000000000 implies 1000000001 classes"):
        jl.load_npz(tmp_path / "stray.npz")
