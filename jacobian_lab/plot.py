"""Paper-ready figures of the library's results, and the paper style they share.

Figures are drawn from saved numbers (never recomputed here) and written as both PDF and
PNG (:func:`save_figure`), sized for a single column (:data:`COLUMN_WIDTH`), with a
colour-blind safe palette (Okabe & Ito) and line styles that also separate series in
greyscale.

matplotlib is imported only here, so ``import jacobian_lab`` does not load it;
``jacobian_lab.plot`` is loaded on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

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
