"""Paper-ready figures of the library's results, and the paper style they share.

Each figure function takes a result object (or the arrays the library returns), draws into
``ax`` when given (else into a new figure of one column's width), and returns the Axes, or
the Figure when it draws several panels. Nothing is shown (no ``plt.show``): save with
:func:`save_figure`, which writes PDF and PNG. Everything runs under the Agg backend.

The style: a colour-blind safe palette (Okabe & Ito) with line styles that also separate
the series in greyscale, 8 pt text, single-column figures (:data:`COLUMN_WIDTH`). Theory is
drawn black and dotted, the data in blue, vermillion and reddish purple. Where a result has
a stack of profiles (seeds, samples, runs), the line is their median and the shaded band
their min-max range.

Layers are indexed as in the GSC paper (Philipp, Song & Carbonell, arXiv 1712.05577) and
everywhere in jacobian_lab: ``k = 0`` is the output, ``k = L`` the input; residual blocks
are numbered nearest the output first. The axis labels say so.

matplotlib is imported only here, so ``import jacobian_lab`` does not load it;
``jacobian_lab.plot`` is loaded on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from jacobian_lab.matrix_free import SLQ, Estimate
from jacobian_lab.residual import BlockGSC, Pythagorean
from jacobian_lab.spectra import Spectrum
from jacobian_lab.tokens import TokenStats
from jacobian_lab.training import History

OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442")
LINESTYLES = ("-", "--", ":", "-.")
STYLE = {
    "font.size": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 6,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.2,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.bbox": "tight",
    "savefig.dpi": 200,
}
COLUMN_WIDTH = 3.3
"""Inches: one column of a two-column paper (ICML, NeurIPS workshops, IEEE)."""
FULL_WIDTH = 6.75
"""Inches: the full text width of a two-column paper."""
FIGURE_FORMATS = ("pdf", "png", "svg")


def save_figure(
    fig: Figure | Axes, path: str | Path, formats: Sequence[str] = ("pdf", "png")
) -> list[Path]:
    """Save ``fig`` (a Figure, or an Axes whose figure is saved) as ``path`` with each suffix
    in ``formats`` (of :data:`FIGURE_FORMATS`), tightly cropped at :data:`STYLE`'s
    resolution, and close it; returns the paths written. A suffix of ``path`` is
    replaced."""
    unknown = set(formats) - set(FIGURE_FORMATS)
    if unknown:
        raise ValueError(f"unknown figure format(s) {sorted(unknown)}; use {FIGURE_FORMATS}")
    fig = fig.figure if isinstance(fig, Axes) else fig
    base = Path(path).with_suffix("")
    paths = [base.with_suffix(f".{fmt}") for fmt in formats]
    for p in paths:
        fig.savefig(p, bbox_inches=STYLE["savefig.bbox"], dpi=STYLE["savefig.dpi"])
    plt.close(fig)
    return paths


def series_style(i: int) -> dict:
    """Colour and line style of the ``i``-th series: 7 Okabe-Ito colours (yellow left out,
    too faint on white) times 4 line styles, unique for up to 28 series."""
    return {"color": OKABE_ITO[i % 7], "linestyle": LINESTYLES[i % 4]}


def plot_band(
    ax: Axes,
    x,
    values,
    *,
    label: str | None,
    style: dict,
    log: bool = False,
    centre: str = "mean",
):
    """A centre line over seeds and the min-max range over seeds as a shaded band; returns
    the line.

    Args:
        values: ``(seeds, len(x))``.
        centre: ``"mean"`` (with ``log=True`` the geometric mean, for quantities plotted on
            a log axis) or ``"median"``.
    """
    v = np.asarray(values, dtype=float)
    if centre == "median":
        mid = np.median(v, axis=0)
    elif centre == "mean":
        mid = np.exp(np.log(v).mean(axis=0)) if log else v.mean(axis=0)
    else:
        raise ValueError(f"centre must be 'mean' or 'median', got {centre!r}")
    (line,) = ax.plot(x, mid, label=label, **style)
    if v.shape[0] > 1:
        ax.fill_between(x, v.min(axis=0), v.max(axis=0), color=style["color"], alpha=0.2, lw=0)
    return line


# -- helpers ------------------------------------------------------------------------------

THEORY_STYLE = {"color": OKABE_ITO[0], "linestyle": ":", "linewidth": 1.2}


def _style(i: int) -> dict:
    """The ``i``-th data series: blue, vermillion, reddish purple first (black is the
    theory's colour)."""
    return series_style(i + 4)


def _figure(size: tuple[float, float], ncols: int = 1, **kwargs) -> tuple[Figure, list[Axes]]:
    """A new figure of ``size`` inches with ``ncols`` panels in :data:`STYLE`."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, ncols, figsize=size, squeeze=False, **kwargs)
    for ax in axes[0]:
        # ticks are created lazily, possibly outside the style's context: fix their size
        ax.tick_params(labelsize=STYLE["xtick.labelsize"])
    return fig, list(axes[0])


@contextmanager
def _axes(ax: Axes | None, size: tuple[float, float]):
    """Draw under :data:`STYLE` into ``ax``, or into a new figure of ``size`` inches."""
    with plt.rc_context(STYLE):
        yield _figure(size)[1][0] if ax is None else ax


def _stack(values, name: str, what: str, max_ndim: int = 3) -> np.ndarray:
    """``values`` as float ``(n, m)``: a profile ``(m,)`` or a stack ``(..., m)`` with its
    leading axes pooled; ``ValueError`` naming ``name`` otherwise."""
    v = np.asarray(values, dtype=float)
    if not 1 <= v.ndim <= max_ndim or v.shape[-1] < 1 or v.size == 0:
        raise ValueError(
            f"{name} must be {what}, with at most {max_ndim - 1} leading stack axes; "
            f"got shape {v.shape}"
        )
    return v.reshape(-1, v.shape[-1])


def _integer_ticks(ax: Axes) -> None:
    # round steps (1, 2, 5, 10 times a power of ten): layers 0, 10, 20, ... not 0, 6, 12
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def _log_ticks(axis, lo: float, hi: float) -> None:
    """Ticks of a log ``axis`` showing ``lo .. hi``: under 2.5 decades, plain numbers at
    1-2-5 steps (every multiple under 0.6 decades), where matplotlib's default labels only
    the powers of ten, leaving one label or none, or crowds the minor ticks with
    overlapping ``a x 10^b``."""
    decades = np.log10(hi / lo)
    if decades < 2.5:
        subs = (1.0, 2.0, 5.0) if decades > 0.6 else np.arange(1.0, 10.0)
        axis.set_major_locator(LogLocator(subs=subs))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def _log_scale(ax: Axes, which: str) -> None:
    """A log scale on ``ax``'s ``which`` (``"x"`` or ``"y"``) axis, called after drawing
    (the ticks follow the data's range, :func:`_log_ticks`)."""
    getattr(ax, f"set_{which}scale")("log")
    _log_ticks(getattr(ax, f"{which}axis"), *sorted(getattr(ax, f"get_{which}lim")()))


def _legend(ax: Axes) -> None:
    # a half-transparent white box: where no corner is free of data, the labels stay legible
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=True, framealpha=0.8, edgecolor="none")


# -- the GSC ------------------------------------------------------------------------------


def gsc_profile(
    gsc,
    ax: Axes | None = None,
    *,
    theory: np.ndarray | Callable | None = None,
    label: str | None = None,
    style: dict | None = None,
) -> Axes:
    """The GSC from every layer to the output, ``GSC(k, 0)`` against ``k``, on a log axis.

    Args:
        gsc: an array ``(L+1,)`` (one profile, ``[k] = GSC(k, 0)``), ``(S, L+1)`` (per
            sample, as :func:`jacobian_lab.gsc` returns) or ``(n_seeds, S, L+1)`` (as
            :func:`jacobian_lab.gsc_over_seeds` returns): a stack is drawn as the median
            over all its profiles (seeds and samples pooled) with their min-max range as a
            band. Or an :class:`~jacobian_lab.Estimate` from
            :func:`jacobian_lab.gsc_estimate` (fields ``(L+1,)`` or ``(S, L+1)``): the mean
            over the samples as points with error bars of two standard errors of that mean
            from the probes, ``se = sqrt(sum_s error_s^2) / S``, drawn on the log scale the
            GSC's intervals are built on, ``mean * exp(-+2 se / mean)``; a layer whose
            error is ``inf`` (fewer than 3 probes) has no bar. For one sample,
            :meth:`Estimate.interval` gives the calibrated Student-t interval instead.
        ax: draw into this Axes (each call on one Axes takes the next colour), else into
            a new column-wide figure.
        theory: a predicted profile, ``(L+1,)`` (e.g.
            :func:`jacobian_lab.meanfield.gsc_profile`) or a callable taking the layer
            indices ``k`` (an int array ``0 .. L``) to ``GSC(k, 0)`` (e.g.
            ``lambda k: r**k`` with ``r`` from :func:`jacobian_lab.gsc_growth_rate`);
            drawn black and dotted (in the profile's colour, unlabelled, when ``style``
            is given: several profiles with their theories on one Axes).
        label: legend entry of the measured profile.
        style: line properties of the measured profile (``color``, ``linestyle``; e.g.
            :func:`series_style`), default the Axes' next colour.

    Returns:
        The Axes. Layer ``k = 0`` is the output (``GSC(0, 0) = 1``), ``k = L`` the input,
        as in the GSC paper and :func:`jacobian_lab.gsc`.
    """
    with _axes(ax, (COLUMN_WIDTH, 2.4)) as ax:
        own = style is not None
        style = dict(style) if own else _style(len(ax.lines))
        if isinstance(gsc, Estimate):
            value = _stack(gsc.value, "gsc", "an Estimate with fields (L+1,) or (S, L+1)", 2)
            error = _stack(gsc.error, "gsc", "an Estimate with fields (L+1,) or (S, L+1)", 2)
            if error.shape != value.shape:
                raise ValueError(
                    f"gsc: the Estimate's error {error.shape} and value {value.shape} differ"
                )
            mean = value.mean(axis=0)
            se = np.sqrt(np.sum(error**2, axis=0)) / value.shape[0]
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.where(np.isfinite(se), 2 * se / mean, np.nan)
            bars = np.stack([mean - mean * np.exp(-r), mean * np.exp(r) - mean])
            k = np.arange(value.shape[1])
            ax.errorbar(
                k, mean, yerr=bars, fmt="o", ms=3, lw=0.8, color=style["color"], label=label
            )
        else:
            profiles = _stack(gsc, "gsc", "a GSC profile (L+1,) or a stack (..., L+1)")
            k = np.arange(profiles.shape[1])
            plot_band(ax, k, profiles, label=label, style=style, centre="median")
        if theory is not None:
            t = np.asarray(theory(k) if callable(theory) else theory, dtype=float)
            if t.shape != k.shape:
                raise ValueError(
                    f"theory must give GSC(k, 0) for k = 0 .. {k[-1]}, shape {k.shape}; "
                    f"got shape {t.shape}"
                )
            if own:
                ax.plot(k, t, **{**THEORY_STYLE, "color": style["color"]})
            else:
                ax.plot(k, t, label="theory", **THEORY_STYLE)
        _log_scale(ax, "y")
        _integer_ticks(ax)
        ax.set_xlabel("layer k (0 = output, L = input)")
        ax.set_ylabel("GSC(k, 0)")
        _legend(ax)
    return ax


def gsc_matrix(mat, ax: Axes | None = None) -> Axes:
    """The all-pairs GSC as a heat map on a log colour scale with a colour bar.

    Args:
        mat: ``(L+1, L+1)`` or a stack ``(S, L+1, L+1)`` as :func:`jacobian_lab.gsc_matrix`
            returns, ``[k, l] = GSC(k, l)``: row ``k`` the layer perturbed, column ``l`` the
            layer observed, ``0`` the output and ``L`` the input; a stack is drawn as its
            median over samples. Cells that are NaN (``k < l``, undefined) or not positive
            are left blank.
        ax: draw into this Axes (its figure gets the colour bar), else a new figure.

    Returns:
        The Axes; the output (``k = l = 0``) is the top-left corner, so the defined
        triangle ``k >= l`` lies below the diagonal.
    """
    m = np.asarray(mat, dtype=float)
    if m.ndim not in (2, 3) or m.shape[-1] != m.shape[-2] or m.shape[-1] < 1:
        raise ValueError(f"mat must have shape (L+1, L+1) or (S, L+1, L+1); got {m.shape}")
    G = np.median(m.reshape(-1, *m.shape[-2:]), axis=0)
    shown = np.ma.masked_where(~(np.isfinite(G) & (G > 0)), G)
    if shown.count() == 0:
        raise ValueError("mat has no finite positive GSC to draw")
    lo, hi = float(shown.min()), float(shown.max())
    if lo == hi:  # every GSC equal (an isometry): a colour bar one decade wide around it
        lo, hi = lo / np.sqrt(10), hi * np.sqrt(10)
    with _axes(ax, (COLUMN_WIDTH, 2.7)) as ax:
        cmap = plt.get_cmap("viridis").with_extremes(bad="none")
        image = ax.imshow(shown, cmap=cmap, norm=LogNorm(lo, hi), origin="upper")
        bar = ax.figure.colorbar(image, ax=ax, label="GSC(k, l)")
        _log_ticks(bar.ax.yaxis, lo, hi)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("observed layer l (0 = output)")
        ax.set_ylabel("perturbed layer k (L = input)")
    return ax


# -- spectra ------------------------------------------------------------------------------


def spectrum(
    spec_or_singular_values,
    ax: Axes | None = None,
    *,
    theory: Callable | tuple | None = None,
    bins: int | Sequence[float] = 40,
    label: str | None = None,
) -> Axes:
    """Histogram density of the squared singular values ``lambda = s^2`` of a Jacobian (the
    eigenvalues of ``J^T J``, the variable of every law in :mod:`jacobian_lab.random_matrix`).

    Args:
        spec_or_singular_values: singular values of any shape (e.g. from
            :func:`jacobian_lab.singular_values` or
            :func:`jacobian_lab.prefix_singular_values`; all entries pooled and squared),
            or a :class:`~jacobian_lab.Spectrum` (:func:`jacobian_lab.jacobian_spectrum`,
            dense or matrix-free) or :class:`~jacobian_lab.SLQ`
            (:func:`jacobian_lab.slq_spectrum`), whose nodes are already squared and are
            weighted by the quadrature weights (for a wide ``J`` a dense Spectrum holds
            ``n - m`` zeros, as its measure does).
        ax: draw into this Axes, else a new column-wide figure.
        theory: the predicted density of ``lambda``: a callable ``lambda -> density`` (e.g.
            :func:`jacobian_lab.marchenko_pastur_density`,
            ``functools.partial(jacobian_lab.fuss_catalan_density, depth)`` or a partial
            of :func:`jacobian_lab.jacobian_spectral_density`), evaluated at 400 points
            ``> 0`` across the histogram, or ``(grid, density)`` arrays of one shape;
            drawn black and dotted.
        bins: histogram bins (a count or the edges).
        label: legend entry of the histogram.

    Returns:
        The Axes (linear axes; ``ax.set_yscale("log")`` for heavy tails).
    """
    name = "spec_or_singular_values"
    if isinstance(spec_or_singular_values, (Spectrum, SLQ)):
        nodes = np.asarray(spec_or_singular_values.nodes, dtype=float)
        weights = np.asarray(spec_or_singular_values.weights, dtype=float)
        if nodes.ndim != 2 or weights.shape != nodes.shape:
            raise ValueError(
                f"{name}: nodes and weights must both be (P, k); got {nodes.shape} and "
                f"{weights.shape}"
            )
        lam, w = nodes.ravel(), weights.ravel() / nodes.shape[0]
    else:
        s = np.asarray(spec_or_singular_values, dtype=float)
        if s.size == 0:
            raise ValueError(f"{name} is empty: give singular values or a Spectrum")
        lam, w = s.ravel() ** 2, None
    if not np.all(np.isfinite(lam)):
        raise ValueError(f"{name} has values that are not finite")
    with _axes(ax, (COLUMN_WIDTH, 2.4)) as ax:
        style = _style(len(ax.patches))
        heights, edges, _ = ax.hist(
            lam,
            bins=bins,
            weights=w,
            density=True,
            histtype="stepfilled",
            color=style["color"],
            alpha=0.35,
            edgecolor=style["color"],
            linewidth=0.6,
            label=label,
        )
        if theory is not None:
            if callable(theory):
                grid = np.linspace(edges[0], edges[-1], 401)
                grid = grid[grid > 0]
                density = np.asarray(theory(grid), dtype=float)
            else:
                grid, density = (np.asarray(a, dtype=float) for a in theory)
            if grid.ndim != 1 or density.shape != grid.shape:
                raise ValueError(
                    "theory must be a callable lambda -> density or (grid, density) of one "
                    f"shape (g,); got density {density.shape} on grid {grid.shape}"
                )
            ax.plot(grid, density, label="theory", **THEORY_STYLE)
            # a density diverging at 0 (Marchenko-Pastur, Fuss-Catalan) is cut off within
            # the first bin rather than setting the scale
            beyond = density[(grid > edges[1]) & np.isfinite(density)]
            top = max(float(np.max(heights)), float(np.max(beyond, initial=0.0)))
            ax.set_ylim(0.0, 1.1 * top)
        ax.set_xlabel(r"$\lambda = s^2$ (eigenvalue of $J^\top J$)")
        ax.set_ylabel("density")
        _legend(ax)
    return ax


# -- residual blocks ----------------------------------------------------------------------


def _blocks_of(result, cls, name: str) -> dict[str, np.ndarray]:
    """The fields of a per-block result as ``(n, blocks)`` stacks."""
    if not isinstance(result, cls):
        raise TypeError(f"{name} must be a jacobian_lab.{cls.__name__}, got {type(result)}")
    what = f"a {cls.__name__} with fields (blocks,) or (S, blocks)"
    return {f: _stack(v, name, what, 2) for f, v in result._asdict().items()}


def pythagorean(p: Pythagorean, ax: Axes | None = None) -> Axes:
    """The terms of ``||f + r||^2 = ||f||^2 + ||r||^2 + 2 <f, r>`` per residual block, each
    as a share of ``||f + r||^2`` (the three shares sum to 1; the Pythagorean equation
    holds where the cross term's share is near 0).

    Args:
        p: a :class:`~jacobian_lab.Pythagorean` from
            :func:`jacobian_lab.pythagorean_decomposition`, fields ``(S, blocks)`` (or
            ``(blocks,)``): median over samples with their min-max range as a band.
        ax: draw into this Axes, else a new column-wide figure.

    Returns:
        The Axes; block ``j = 0`` is the block nearest the output (its output is
        ``f_l`` with ``l = net.block_outputs[j]``).
    """
    f = _blocks_of(p, Pythagorean, "p")
    j = np.arange(f["sum_sq"].shape[1])
    terms = [
        ("skip_sq", r"$\|f\|^2$ (skip)"),
        ("branch_sq", r"$\|r\|^2$ (branch)"),
        ("cross", r"$2\langle f, r\rangle$ (cross)"),
    ]
    with _axes(ax, (COLUMN_WIDTH, 2.4)) as ax:
        ax.axhline(0.0, color="0.7", lw=0.5)
        for i, (field, label) in enumerate(terms):
            share = f[field] / f["sum_sq"]
            plot_band(ax, j, share, label=label, style=_style(i), centre="median")
        _integer_ticks(ax)
        ax.set_xlabel("residual block j (0 = nearest the output)")
        ax.set_ylabel(r"share of $\|f + r\|^2$")
        _legend(ax)
    return ax


def block_gsc(b: BlockGSC, ax: Axes | None = None) -> Axes:
    """The GSC across each residual block, measured, beside its prediction from the
    Pythagorean equation.

    Args:
        b: a :class:`~jacobian_lab.BlockGSC` from :func:`jacobian_lab.block_gsc`, fields
            ``(S, blocks)`` (or ``(blocks,)``). The measured ``GSC(l+1, l)``: median over
            samples with their min-max range as a band; the prediction: median over
            samples as crosses, left out for blocks whose prediction is NaN (blocks with
            a post-activation or Post-LN norm; with none left, no legend entry either).
        ax: draw into this Axes, else a new column-wide figure.

    Returns:
        The Axes; block ``j = 0`` is the block nearest the output. A grey line marks 1, the
        GSC of the skip alone.
    """
    f = _blocks_of(b, BlockGSC, "b")
    j = np.arange(f["gsc"].shape[1])
    predicted = np.median(f["predicted"], axis=0)
    drawn = np.isfinite(predicted)
    with _axes(ax, (COLUMN_WIDTH, 2.4)) as ax:
        ax.axhline(1.0, color="0.7", lw=0.5)
        measured = {**_style(0), "marker": "o", "markersize": 3}
        plot_band(ax, j, f["gsc"], label="measured", style=measured, centre="median")
        if drawn.any():
            ax.plot(
                j[drawn],
                predicted[drawn],
                "x",
                ms=5,
                color=_style(1)["color"],
                label="Pythagorean prediction",
            )
        _integer_ticks(ax)
        ax.set_xlabel("residual block j (0 = nearest the output)")
        ax.set_ylabel("GSC across the block")
        _legend(ax)
    return ax


# -- tokens -------------------------------------------------------------------------------


def tokens(stats: TokenStats, ax: Axes | None = None) -> Axes:
    """Token statistics per layer: the relative rank-collapse residual
    ``||X - 1 mean(X)^T||_F / ||X||_F`` and the mean pairwise token cosine of each layer
    output (both 0 .. 1 for tokens that do not point against each other; rank collapse
    drives the residual to 0 and the cosine to 1).

    Args:
        stats: a :class:`~jacobian_lab.TokenStats` from :func:`jacobian_lab.token_statistics`,
            fields ``(L+1,)``, ``(S, L+1)``, or with a leading seed axis ``(n_seeds, S,
            L+1)`` (e.g. under ``jax.vmap`` over seeds): a stack is drawn as the median over
            all its profiles with their min-max range as a band. NaN layers (outputs that
            are not token matrices) are gaps.
        ax: draw into this Axes, else a new column-wide figure.

    Returns:
        The Axes; layer ``l = 0`` is the output, ``l = L`` the input.
    """
    if not isinstance(stats, TokenStats):
        raise TypeError(f"stats must be a jacobian_lab.TokenStats, got {type(stats)}")
    what = "a TokenStats with fields (L+1,), (S, L+1) or (n_seeds, S, L+1)"
    residual, cosine = (_stack(v, "stats", what) for v in stats)
    l = np.arange(residual.shape[1])
    with _axes(ax, (COLUMN_WIDTH, 2.4)) as ax:
        for i, (values, label) in enumerate(
            [(residual, "rank-collapse residual"), (cosine, "mean token cosine")]
        ):
            plot_band(ax, l, values, label=label, style=_style(i), centre="median")
        _integer_ticks(ax)
        ax.set_xlabel("layer l (0 = output, L = input)")
        ax.set_ylabel("token statistic")
        _legend(ax)
    return ax


# -- training -----------------------------------------------------------------------------

TRAINING_METRICS = {
    # metric -> (History fields and their labels, y label, log y axis)
    "loss": (
        [("train_loss", "training"), ("test_loss", "held out")],
        "cross-entropy (nats)",
        True,
    ),
    "accuracy": (
        [("train_accuracy", "training"), ("test_accuracy", "held out")],
        "accuracy",
        False,
    ),
    "gsc": ([("gsc", None)], "GSC(L, 0), input to output", True),
}


def training(history: History, ax: Axes | None = None, *, metric: str = "loss") -> Axes:
    """Training curves of :func:`jacobian_lab.train` against the step.

    Args:
        history: a :class:`~jacobian_lab.History` of one run (fields ``(T,)``, ``gsc``
            ``(T, L+1)``) or of several from :func:`jacobian_lab.train_runs` (a leading
            run axis ``R``), drawn as the median over the runs with their min-max range
            as a band: treat runs as seeds of one setting, and select one run
            (``jax.tree_util.tree_map(lambda a: a[r], history)``) to compare learning
            rates.
        ax: draw into this Axes, else a new column-wide figure.
        metric: ``"loss"`` (training and held-out cross-entropy, log axis), ``"accuracy"``
            (training and held-out), or ``"gsc"`` (``GSC(L, 0)`` from the input to the
            output, at each recorded step, log axis).

    Returns:
        The Axes. The step axis is linear up to 1 and logarithmic beyond (``symlog``), so
        step 0 (initialization) and geometrically spaced records both show.
    """
    if metric not in TRAINING_METRICS:
        raise ValueError(f"metric must be one of {tuple(TRAINING_METRICS)}, got {metric!r}")
    if not isinstance(history, History):
        raise TypeError(f"history must be a jacobian_lab.History, got {type(history)}")
    steps = _stack(history.steps, "history", "a History with steps (T,) or (R, T)", 2)
    if np.any(steps != steps[0]):
        raise ValueError("history: the runs recorded different steps; plot them one by one")
    fields, ylabel, log = TRAINING_METRICS[metric]
    with _axes(ax, (COLUMN_WIDTH, 2.4)) as ax:
        for i, (field, label) in enumerate(fields):
            v = np.asarray(getattr(history, field), dtype=float)
            if field == "gsc":
                if np.all(np.isnan(v)):
                    raise ValueError("history recorded no GSC (train(..., gsc_samples=0))")
                v = v[..., -1]
            runs = _stack(v, "history", f"a History with {field} (T,) or (R, T)", 2)
            if runs.shape[1] != steps.shape[1]:
                raise ValueError(
                    f"history: {field} has {runs.shape[1]} records, steps {steps.shape[1]}"
                )
            plot_band(ax, steps[0], runs, label=label, style=_style(i), centre="median")
        ax.set_xscale("symlog", linthresh=1.0)
        if log:
            _log_scale(ax, "y")
        ax.set_xlabel("step (0 = initialization)")
        ax.set_ylabel(ylabel)
        _legend(ax)
    return ax


# -- remedies -----------------------------------------------------------------------------


_MISSING = object()


def _field(row, key: str):
    """``row[key]`` of a mapping, ``row.key`` of an object; :data:`_MISSING` if absent."""
    return row.get(key, _MISSING) if isinstance(row, Mapping) else getattr(row, key, _MISSING)


def remedies(
    rows: Sequence, ax: Axes | None = None, *, metrics: Sequence[str] | None = None
) -> Axes | Figure:
    """Each remedy's metrics before and after it, as paired points joined by a line.

    Input contract: ``rows`` is a sequence of mappings or objects, each with

    * ``name``: the remedy (a string; the row's tick label);
    * ``before``, ``after``: mappings from a metric name (e.g. ``"gsc"``,
      ``"growth_rate"``, ``"cosine"``) to a number, measured without and with the remedy;
    * optionally ``predicted``: a mapping of the same kind, what theory predicts ``after``
      to be (:class:`~jacobian_lab.inspection.Remedy`), drawn as a cross.

    A metric missing from a row, or NaN there, is left out for that row.

    Args:
        rows: the remedies, drawn top to bottom in this order.
        ax: draw into this Axes (then ``metrics`` must name one metric, or the rows must
            have only one), else into a new figure.
        metrics: the metrics to draw, one panel each; default every metric some row has,
            in order of first appearance.

    Returns:
        The Axes for one metric, the Figure for several (one panel per metric, sharing the
        rows). A metric whose values are all positive and span more than a factor of 10
        (the GSC) gets a log axis.
    """
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or not rows:
        raise ValueError("rows must be a non-empty sequence of remedies (name, before, after)")
    names, before, after, predicted = [], [], [], []
    for i, row in enumerate(rows):
        fields = {key: _field(row, key) for key in ("name", "before", "after")}
        missing = [key for key, v in fields.items() if v is _MISSING]
        if missing:
            raise ValueError(f"rows[{i}] needs name, before and after; it has no {missing}")
        name, b, a = fields.values()
        if not isinstance(b, Mapping) or not isinstance(a, Mapping):
            raise ValueError(f"rows[{i}] ({name!r}): before and after must be mappings")
        try:
            before.append({m: float(v) for m, v in b.items()})
            after.append({m: float(v) for m, v in a.items()})
            pr = _field(row, "predicted")
            predicted.append(
                {} if pr is _MISSING or pr is None else {m: float(v) for m, v in pr.items()}
            )
        except (TypeError, ValueError):
            raise ValueError(f"rows[{i}] ({name!r}): metric values must be numbers") from None
        names.append(str(name))
    known = list(dict.fromkeys(m for d in before + after for m in d))
    metrics = known if metrics is None else list(metrics)
    unknown = [m for m in metrics if m not in known]
    if unknown or not metrics:
        raise ValueError(f"metrics {unknown or metrics} not in the rows' metrics {known}")
    if ax is not None and len(metrics) != 1:
        raise ValueError(f"with ax=, metrics must name one metric of {known}")
    y = np.arange(len(names))
    if ax is None:
        size = (min(FULL_WIDTH, 1.2 + 1.9 * len(metrics)), 0.8 + 0.22 * len(names))
        fig, axes = _figure(size, len(metrics), sharey=True)
    else:
        fig, axes = ax.figure, [ax]
    with plt.rc_context(STYLE):
        for a, metric in zip(axes, metrics, strict=True):
            b = np.array([d.get(metric, np.nan) for d in before])
            c = np.array([d.get(metric, np.nan) for d in after])
            for yi, bi, ci in zip(y, b, c, strict=True):
                a.plot([bi, ci], [yi, yi], color="0.6", lw=0.8)
            a.plot(b, y, "o", ms=4, mfc="white", color=_style(1)["color"], label="before")
            a.plot(c, y, "o", ms=4, color=_style(0)["color"], label="after")
            pr = np.array([d.get(metric, np.nan) for d in predicted])
            if np.isfinite(pr).any():
                a.plot(pr, y, "x", ms=5, color=_style(2)["color"], label="predicted")
            v = np.concatenate([b, c, pr])
            v = v[np.isfinite(v)]
            if v.size and np.all(v > 0) and v.max() > 10 * v.min():
                _log_scale(a, "x")
            a.set_xlabel(metric)
            a.set_yticks(y, names)
            a.set_ylim(len(names) - 0.5, -0.5)  # the first row on top
        # above the first panel: paired points fill the panels' width
        handles = {h.get_label(): h for a in axes for h in a.get_lines() if h.get_label()[0] != "_"}
        axes[0].legend(
            handles.values(),
            handles.keys(),
            frameon=False,
            ncol=3,
            loc="lower left",
            bbox_to_anchor=(0.0, 1.0),
        )
    return axes[0] if len(metrics) == 1 else fig
