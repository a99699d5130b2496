"""The figures of jacobian_lab.plot, each drawn from a tiny real result: what is drawn is the
numbers given (medians of stacks, bands from their range, error bars from the estimate's
errors), on the stated scales, saved as PDF and PNG; NaN predictions are left out; wrong
inputs raise errors naming the argument. The comparisons are exact up to float64
rounding of a median or a mean (rtol 1e-12)."""

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

import jacobian_lab as jl
from jacobian_lab import meanfield

matplotlib.use("Agg")
from matplotlib.colors import LogNorm  # noqa: E402

P = jl.plot
RTOL = 1e-12
L = 3


@pytest.fixture(scope="module")
def mlp():
    net = jl.mlp(L, 8, "tanh", dtype="float64")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8), jnp.float64)
    return net, net.init(jax.random.PRNGKey(0)), x


@pytest.fixture(scope="module")
def seeds(mlp):
    """``(3 seeds, 2 samples, L+1)``."""
    net, _, x = mlp
    return np.asarray(jl.gsc_over_seeds(net, jax.random.split(jax.random.PRNGKey(2), 3), x))


@pytest.fixture(scope="module")
def resnet(mlp):
    net = jl.resmlp(3, 8, "relu", dtype="float64")
    return net, net.init(jax.random.PRNGKey(0)), mlp[2]


def _saved(fig_or_ax, tmp_path, stem):
    paths = P.save_figure(fig_or_ax, tmp_path / stem)
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)


def _line(ax, label):
    return next(line for line in ax.lines if line.get_label() == label)


def test_gsc_profile_draws_the_median_over_seeds_and_samples_with_the_range_and_theory(
    seeds, tmp_path
):
    g = seeds
    theory = meanfield.gsc_profile("tanh", 1.0, 0.0, L)
    ax = P.gsc_profile(g, theory=theory, label="measured")
    pooled = g.reshape(-1, L + 1)  # 3 seeds x 2 samples
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.median(pooled, 0), rtol=RTOL)
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), np.arange(L + 1))  # k = 0 .. L
    np.testing.assert_allclose(_line(ax, "theory").get_ydata(), theory, rtol=RTOL)
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    np.testing.assert_allclose([band.min(), band.max()], [pooled.min(), pooled.max()], RTOL)
    assert ax.get_yscale() == "log"
    assert "0 = output" in ax.get_xlabel() and ax.get_ylabel() == "GSC(k, 0)"
    _saved(ax, tmp_path, "gsc_profile")


def test_gsc_profile_of_an_estimate_has_two_standard_error_bars_of_the_mean(mlp, tmp_path):
    net, params, x = mlp
    est = jl.gsc_estimate(net, params, x, jax.random.PRNGKey(3), 4)
    ax = P.gsc_profile(est, theory=lambda k: np.ones(k.shape))
    mean = np.asarray(est.value).mean(0)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), mean, rtol=RTOL)
    se = np.sqrt(np.sum(np.asarray(est.error) ** 2, 0)) / 2
    lo, hi = (np.array(seg)[:, 1] for seg in zip(*ax.collections[0].get_segments(), strict=True))
    # log-scale bars: mean exp(-+2 se / mean); GSC(0, 0) = 1 is exact (no bar)
    np.testing.assert_allclose(lo, mean * np.exp(-2 * se / mean), rtol=RTOL)
    np.testing.assert_allclose(hi, mean * np.exp(2 * se / mean), rtol=RTOL)
    assert lo[0] == hi[0] == 1.0
    _saved(ax, tmp_path, "gsc_estimate")


def test_gsc_matrix_is_the_median_on_a_log_colour_scale_blank_above_the_diagonal(mlp, tmp_path):
    net, params, x = mlp
    G = np.asarray(jl.gsc_matrix(net, params, x))
    ax = P.gsc_matrix(G)
    shown = ax.images[0].get_array()
    k, l = np.indices((L + 1, L + 1))
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), k < l)  # NaN: blank
    np.testing.assert_allclose(shown[k >= l], np.median(G, 0)[k >= l], rtol=RTOL)
    assert isinstance(ax.images[0].norm, LogNorm)
    assert len(ax.figure.axes) == 2  # the heat map and its colour bar
    _saved(ax, tmp_path, "gsc_matrix")


def _area(polygon):
    x, y = polygon.get_xy().T
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def test_spectrum_is_a_density_of_squared_singular_values_with_the_theory_on_top(tmp_path):
    # one Gaussian layer: its Jacobian is W, its law Marchenko-Pastur
    W = jl.weight_matrix(jax.random.PRNGKey(0), "gaussian", 32, 32, dtype=jnp.float64)
    s = jl.singular_values(W)
    ax = P.spectrum(s, theory=jl.marchenko_pastur_density, label="dense")
    assert _area(ax.patches[0]) == pytest.approx(1.0, rel=1e-9)  # a histogram density
    lam = ax.patches[0].get_xy()[:, 0]
    np.testing.assert_allclose([lam.min(), lam.max()], [jnp.min(s**2), jnp.max(s**2)], RTOL)
    grid = _line(ax, "theory").get_xdata()
    assert grid.min() > 0  # the laws are evaluated at lambda > 0 only
    np.testing.assert_allclose(
        _line(ax, "theory").get_ydata(), jl.marchenko_pastur_density(grid), rtol=RTOL
    )
    _saved(ax, tmp_path, "spectrum")

    spec = jl.jacobian_spectrum(lambda v: W @ v, jnp.ones(32), method="dense")
    grid = np.linspace(0.01, 4, 50)
    ax = P.spectrum(spec, theory=(grid, jl.marchenko_pastur_density(grid)))
    assert _area(ax.patches[0]) == pytest.approx(1.0, rel=1e-9)
    np.testing.assert_allclose(ax.patches[0].get_xy()[:, 0].max(), jnp.max(s**2), RTOL)
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), grid)


def test_pythagorean_draws_each_term_as_a_median_share(resnet, tmp_path):
    p = jl.pythagorean_decomposition(*resnet)
    ax = P.pythagorean(p)
    drawn = [line for line in ax.lines if not line.get_label().startswith("_")]
    assert len(drawn) == 3
    for line, field in zip(drawn, ("skip_sq", "branch_sq", "cross"), strict=True):
        share = np.asarray(getattr(p, field)) / np.asarray(p.sum_sq)
        np.testing.assert_allclose(line.get_ydata(), np.median(share, 0), rtol=RTOL)
    np.testing.assert_array_equal(drawn[0].get_xdata(), np.arange(3))  # 3 blocks
    _saved(ax, tmp_path, "pythagorean")


def test_block_gsc_leaves_out_nan_predictions(resnet, tmp_path):
    b = jl.block_gsc(*resnet)
    b = b._replace(predicted=b.predicted.at[:, 1].set(jnp.nan))  # as for a post block
    ax = P.block_gsc(b)
    np.testing.assert_allclose(
        _line(ax, "measured").get_ydata(), np.median(np.asarray(b.gsc), 0), rtol=RTOL
    )
    predicted = _line(ax, "Pythagorean prediction")
    np.testing.assert_array_equal(predicted.get_xdata(), [0, 2])
    expected = np.median(np.asarray(b.predicted), 0)[[0, 2]]
    np.testing.assert_allclose(predicted.get_ydata(), expected, rtol=RTOL)
    _saved(ax, tmp_path, "block_gsc")


def test_tokens_stacked_over_seeds_draws_the_median_of_every_profile(tmp_path):
    net = jl.transformer(1, 4, 1, 3, dtype="float64")
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4), jnp.float64)
    seeds = [jl.token_statistics(net, net.init(jax.random.PRNGKey(i)), x) for i in range(2)]
    stats = jax.tree_util.tree_map(lambda *a: np.stack(a), *seeds)  # (2 seeds, 2, L+1)
    ax = P.tokens(stats)
    for line, field in zip(ax.lines, ("residual", "cosine"), strict=True):
        pooled = np.asarray(getattr(stats, field)).reshape(4, -1)
        np.testing.assert_allclose(line.get_ydata(), np.median(pooled, 0), rtol=RTOL)
    assert len(ax.collections) == 2  # a band each
    _saved(ax, tmp_path, "tokens")


def test_training_curves_against_the_step(tmp_path):
    data = jl.gaussian_data(jax.random.PRNGKey(1), num_train=12, num_test=6, dim=4, num_classes=2)
    net = jl.mlp(2, 4, "tanh", in_dim=4)
    h = jl.train(net, net.init(jax.random.PRNGKey(2)), data, key=jax.random.PRNGKey(3), steps=3,
                 gsc_samples=2)  # fmt: skip
    ax = P.training(h)
    np.testing.assert_array_equal(_line(ax, "training").get_xdata(), h.steps)
    np.testing.assert_allclose(_line(ax, "training").get_ydata(), h.train_loss, rtol=RTOL)
    np.testing.assert_allclose(_line(ax, "held out").get_ydata(), h.test_loss, rtol=RTOL)
    assert ax.get_yscale() == "log" and ax.get_xscale() == "symlog"
    _saved(ax, tmp_path, "training")
    ax = P.training(h, metric="gsc")
    np.testing.assert_allclose(ax.lines[0].get_ydata(), h.gsc[:, -1], rtol=RTOL)
    with pytest.raises(ValueError, match="metric"):
        P.training(h, metric="speed")


def test_remedies_pair_before_and_after_per_row(seeds, tmp_path):
    """The rows' contract (name, before, after), with the GSC of the plain MLP as "before"
    and made-up numbers as "after" (the function that measures remedies is elsewhere)."""
    plain = np.median(seeds.reshape(-1, L + 1), 0)
    rate = float(jl.growth_rate(plain).rate)
    rows = [
        {
            "name": "residual blocks",
            "before": {"gsc": plain[-1], "growth_rate": rate},
            "after": {"gsc": 1.5, "growth_rate": 1.1},
        },
        {"name": "nothing", "before": {"gsc": plain[-1]}, "after": {"gsc": plain[-1]}},
    ]
    ax = P.remedies(rows, metrics=["gsc"])
    np.testing.assert_allclose(_line(ax, "before").get_xdata(), [plain[-1], plain[-1]], RTOL)
    np.testing.assert_allclose(_line(ax, "after").get_xdata(), [1.5, plain[-1]], RTOL)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["residual blocks", "nothing"]
    _saved(ax, tmp_path, "remedies_gsc")
    fig = P.remedies(rows)  # every metric: one panel each
    assert [a.get_xlabel() for a in fig.axes] == ["gsc", "growth_rate"]
    after = _line(fig.axes[1], "after").get_xdata()  # no growth rate in the second row
    assert after[0] == 1.1 and np.isnan(after[1])
    with pytest.raises(ValueError, match="metrics"):
        P.remedies(rows, ax=fig.axes[0])
    with pytest.raises(ValueError, match=r"rows\[0\]"):
        P.remedies([{"name": "no after", "before": {"gsc": 1.0}}])
    rows[0]["predicted"] = {"gsc": 1.4}  # optional: drawn where a row has it
    ax = P.remedies(rows, metrics=["gsc"])
    np.testing.assert_allclose(_line(ax, "predicted").get_xdata()[0], 1.4, RTOL)
    assert np.isnan(_line(ax, "predicted").get_xdata()[1])
    assert "predicted" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_wrong_inputs_raise_errors_naming_the_argument(mlp):
    with pytest.raises(ValueError, match="gsc must be"):
        P.gsc_profile(np.ones((2, 2, 2, 4)))
    with pytest.raises(ValueError, match="theory"):
        P.gsc_profile(np.ones(4), theory=np.ones(3))
    with pytest.raises(ValueError, match="mat must"):
        P.gsc_matrix(np.ones((3, 4)))
    with pytest.raises(ValueError, match="spec_or_singular_values"):
        P.spectrum(np.array([]))
    with pytest.raises(ValueError, match="theory"):
        P.spectrum(np.ones(3), theory=(np.ones(3), np.ones(4)))
    bad = jl.Pythagorean(*[np.ones((2, 2, 3))] * 5)
    with pytest.raises(ValueError, match="p must be"):
        P.pythagorean(bad)
    with pytest.raises(TypeError, match="b must be"):
        P.block_gsc(bad)
    with pytest.raises(ValueError, match="stats must be"):
        P.tokens(jl.TokenStats(np.ones(()), np.ones(())))
