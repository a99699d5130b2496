"""Paper-style figures drawn from saved numbers (never recomputed here).

Figures are written as both PDF and PNG, sized for a single column, with a colour-blind
safe palette (Okabe & Ito) and line styles that also separate series in greyscale.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

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


FIGURE_FORMATS = ("pdf", "png", "svg")


def save_figure(
    fig: plt.Figure, path: str | Path, formats: Sequence[str] = ("pdf", "png")
) -> list[Path]:
    """Save ``fig`` as ``path`` with each suffix in ``formats`` (of :data:`FIGURE_FORMATS`);
    returns the paths written."""
    unknown = set(formats) - set(FIGURE_FORMATS)
    if unknown:
        raise ValueError(f"unknown figure format(s) {sorted(unknown)}; use {FIGURE_FORMATS}")
    base = Path(path).with_suffix("")
    paths = [base.with_suffix(f".{fmt}") for fmt in formats]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def series_style(i: int) -> dict:
    """Colour and line style of the ``i``-th series: 7 Okabe-Ito colours (yellow left out,
    too faint on white) times 4 line styles, unique for up to 28 series."""
    return {"color": OKABE_ITO[i % 7], "linestyle": LINESTYLES[i % 4]}


def plot_band(ax: plt.Axes, x, values, *, label: str, style: dict, log: bool = False) -> None:
    """Mean over seeds as a line and the min-max range over seeds as a shaded band.

    Args:
        values: ``(seeds, len(x))``. With ``log=True`` the line is the geometric mean
            (for quantities plotted on a log axis).
    """
    v = np.asarray(values, dtype=float)
    centre = np.exp(np.log(v).mean(axis=0)) if log else v.mean(axis=0)
    ax.plot(x, centre, label=label, **style)
    if v.shape[0] > 1:
        ax.fill_between(x, v.min(axis=0), v.max(axis=0), color=style["color"], alpha=0.2, lw=0)
