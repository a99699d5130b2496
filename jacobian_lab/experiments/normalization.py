"""Where the normalization goes: the GSC for every order of linear, norm and activation,
and a two-way table skip connection x normalization.

    python analyses/normalization.py [--size tiny|small|paper] [--depths 50] [--out ...]

Two parts, at initialization:

* **order**: plain MLPs whose dense layers apply ``linear``, ``norm`` and ``act`` in each of
  the 6 orders (the ``order`` option of :func:`jacobian_lab.mlp`), with batch norm and with
  layer norm: the GSC from every layer to the output, ``GSC(k, 0)`` (Philipp et al., arXiv
  1712.05577), and its growth rate per layer. In a deep stack an order is a rotation of one
  of two cycles, ``... linear norm act linear norm act ...`` (the activation right *after*
  the norm: orders linear-norm-act, norm-act-linear, act-linear-norm) and ``... linear act
  norm ...`` (the activation right *before* it: the other three); rotations of one cycle
  differ only at the two ends and in which point of the cycle is called a layer output, so
  they should share a growth rate.
* **table**: plain MLPs (order linear-norm-act) and pre-activation ResNets (``depth / 2``
  blocks of two dense layers, order norm-act-linear) without normalization, with layer norm
  and with batch norm: the growth rate per dense layer in each cell (a ResNet's rate per
  block, square-rooted; its stem is left out of the fit), mean and standard error over
  seeds, beside the mean-field rate of :func:`jacobian_lab.gsc_growth_rate` where it has one
  (plain, linear-norm-act; batch norm once it predicts it).

Batch-norm networks are functions of a whole batch (their GSC is over the batch, see
:mod:`jacobian_lab.layered`); their GSC is the matrix-free estimate
(:func:`jacobian_lab.gsc_over_seeds` with ``method="matrix_free"``), the others dense.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

import jacobian_lab as jl
from jacobian_lab import meanfield
from jacobian_lab.experiments.constants import SIGMA_W, gaussian_inputs
from jacobian_lab.experiments.gsc_across_depth import EXPLODING_RATE
from jacobian_lab.experiments.report import Analysis, Verdict, script_main
from jacobian_lab.plot import (
    LINESTYLES,
    OKABE_ITO,
    STYLE,
    plot_band,
    save_figure,
)

ORDERS = ["-".join(p) for p in itertools.permutations(("linear", "norm", "act"))]
NORM_THEN_ACT = ("linear-norm-act", "norm-act-linear", "act-linear-norm")
"""The orders whose cycle puts the activation right after the norm."""

SIZES = {
    "tiny": {
        "activations": ["relu"],
        "norms": ["batch"],
        "orders": ["linear-norm-act", "linear-act-norm"],
        "table_activations": ["relu"],
        "depths": [6],
        "widths": [16],
        "seeds": 2,
        "batch": 8,
        "probes": 8,
    },
    "small": {
        "activations": ["relu"],
        "norms": ["batch", "layer"],
        "orders": ORDERS,
        "table_activations": ["relu", "tanh"],
        "depths": [50],
        "widths": [100],
        "seeds": 2,
        "batch": 16,
        "probes": 16,
    },
    "paper": {
        "activations": ["relu", "tanh"],
        "norms": ["batch", "layer"],
        "orders": ORDERS,
        "table_activations": ["relu", "tanh", "selu"],
        "depths": [50],
        "widths": [100],
        "seeds": 6,
        "batch": 32,
        "probes": 32,
    },
}
for _cfg in SIZES.values():
    _cfg["dtype"] = "float32"

SKIPS = ("plain", "resnet")
NORMS = ("none", "layer", "batch")


def cycle(order: str) -> str:
    """``"norm -> act"`` or ``"act -> norm"``: which cycle a layer order is a rotation of."""
    return "norm -> act" if order in NORM_THEN_ACT else "act -> norm"


def configs(config: dict) -> list[dict]:
    bad = set(config["orders"]) - set(ORDERS)
    if bad:
        raise ValueError(f"unknown orders {sorted(bad)}; expected some of {ORDERS}")
    if any(d % 2 or d < 2 for d in config["depths"]):
        raise ValueError(
            f"normalization needs even depths >= 2 (a ResNet of depth D has D/2 two-layer "
            f"blocks), got {config['depths']}"
        )
    common = {k: config[k] for k in ("seeds", "batch", "probes", "dtype")}
    units = []
    for d, w in itertools.product(config["depths"], config["widths"]):
        units += [
            {"part": "order", "activation": a, "skip": "plain", "norm": n, "order": o}
            | {"depth": d, "width": w, **common}
            for a in config["activations"]
            for n in config["norms"]
            for o in config["orders"]
        ]
        units += [
            {"part": "table", "activation": a, "skip": s, "norm": n}
            | {"order": "linear-norm-act" if s == "plain" else "norm-act-linear"}
            | {"depth": d, "width": w, **common}
            for a in config["table_activations"]
            for s in SKIPS
            for n in NORMS
        ]
    return units


def _predicted(unit: dict, sigma_w: float, q1: float) -> float | None:
    """Mean-field growth rate per layer of a plain linear-norm-act MLP, where one exists."""
    if unit["skip"] != "plain" or unit["order"] != "linear-norm-act":
        return None
    act, norm = unit["activation"], unit["norm"]
    if norm == "none":  # the transient from q1 matters on critical lines (tanh)
        profile = meanfield.gsc_profile(act, sigma_w, 0.0, unit["depth"], q1)
        return float(np.asarray(jl.growth_rate(profile).rate))
    extra = {"batch_size": unit["batch"]} if norm == "batch" else {}
    if norm == "batch" and unit["batch"] < meanfield.MIN_BATCH_SIZE:
        return None  # no batch-norm mean field below 4 (an infinite rate)
    return float(jl.gsc_growth_rate(act, sigma_w, 0.0, norm, **extra))


def compute(unit: dict) -> dict:
    act, depth, width, norm = unit["activation"], unit["depth"], unit["width"], unit["norm"]
    sigma_w = SIGMA_W[act]
    common = {"norm": norm, "order": unit["order"], "sigma_w": sigma_w, "dtype": unit["dtype"]}
    if unit["skip"] == "resnet":
        net, per_layer, fit = jl.resmlp(depth // 2, width, act, **common), 2, slice(None, -1)
    else:
        net, per_layer, fit = jl.mlp(depth, width, act, **common), 1, slice(None)
    # one batch per seed for batch norm (its sample is the batch), else `batch` samples
    shape = (1, unit["batch"], width) if norm == "batch" else (unit["batch"], width)
    x = gaussian_inputs(jax.random.PRNGKey(10_000), shape, net.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), unit["seeds"])
    method = "matrix_free" if norm == "batch" else "auto"
    g = jl.gsc_over_seeds(net, keys, x, method=method, num_probes=unit["probes"])
    g = np.asarray(g, float).mean(axis=1)  # (seeds, L+1), mean over samples
    rates = np.asarray(jl.growth_rate(g[:, fit]).rate, float) ** (1 / per_layer)
    q1 = sigma_w**2 * float(np.mean(np.asarray(x, float) ** 2))
    return {
        "layers": [per_layer * k for k in range(g.shape[1] - 1)] + [depth + per_layer - 1],
        "log10_gsc": np.log10(g).tolist(),
        "rate": rates.tolist(),
        "predicted_rate": _predicted(unit, sigma_w, q1),
    }


def summarize(config: dict, records: list[dict]) -> dict:
    table, profiles = [], []
    for rec in records:
        c, r = rec["config"], rec["result"]
        rates = np.asarray(r["rate"])
        row = {
            "part": c["part"],
            "activation": c["activation"],
            "skip": c["skip"],
            "norm": c["norm"],
            "order": c["order"],
            "cycle": cycle(c["order"]) if c["norm"] != "none" else "",
            "depth": c["depth"],
            "width": c["width"],
            "batch": c["batch"],
            "rate": float(rates.mean()),
            "rate_se": float(rates.std(ddof=1) / np.sqrt(len(rates))) if len(rates) > 1 else None,
            "gsc_input": float(10 ** np.mean(np.asarray(r["log10_gsc"])[:, -1])),
            "predicted_rate": r["predicted_rate"],
        }
        table.append(row)
        profiles.append({**r, **row})
    return {"table": table, "profiles": profiles, "depth": max(config["depths"])}


def _rows(data: dict, part: str) -> list[dict]:
    return [p for p in data["profiles"] if p["part"] == part and p["depth"] == data["depth"]]


def _fmt(r: dict) -> str:
    se = f" +- {r['rate_se']:.1g}" if r["rate_se"] is not None else ""
    return f"{r['rate']:.3f}{se}"


def plot(data: dict, folder: Path, formats) -> list[Path]:
    paths = []
    orders = _rows(data, "order")
    cells = _rows(data, "table")
    with plt.rc_context(STYLE):
        panels = list(dict.fromkeys((p["activation"], p["norm"]) for p in orders))
        if panels:
            fig, axes = plt.subplots(
                1, len(panels), figsize=(3.4 * len(panels), 2.9), sharey=True, squeeze=False
            )
            for ax, (act, norm) in zip(axes[0], panels, strict=True):
                for p in (p for p in orders if (p["activation"], p["norm"]) == (act, norm)):
                    i = ORDERS.index(p["order"])
                    style = {
                        "color": OKABE_ITO[[5, 1, 6, 4, 3, 2][i]],
                        "linestyle": LINESTYLES[0 if p["cycle"] == "norm -> act" else 1],
                    }
                    plot_band(
                        ax,
                        p["layers"],
                        10.0 ** np.asarray(p["log10_gsc"]),
                        label=f"{p['order']} (r = {p['rate']:.3f})",
                        style=style,
                        log=True,
                    )
                    if p["predicted_rate"] is not None:
                        k = np.asarray(p["layers"])
                        ax.plot(k, p["predicted_rate"] ** k, ":", color="0.2", lw=1.5)
                ax.set_yscale("log")
                ax.axhline(1.0, color="0.6", lw=0.6)
                ax.set_title(f"{act}, {norm} norm", fontsize=8)
                ax.set_xlabel("layer k from the output")
                ax.legend(frameon=False, fontsize=5.5, loc="upper left")
            axes[0, 0].set_ylabel("GSC(k, 0)")
            fig.suptitle(
                f"plain MLP, depth {data['depth']}; solid: activation right after the norm, "
                "dashed: right before it; dotted: mean-field rate (linear-norm-act)",
                fontsize=7,
            )
            fig.tight_layout()
            paths += save_figure(fig, folder / "normalization_order", formats)
        acts = list(dict.fromkeys(p["activation"] for p in cells))
        if acts:
            fig, axes = plt.subplots(
                1, len(acts), figsize=(3.2 * len(acts), 2.6), sharey=True, squeeze=False
            )
            for ax, act in zip(axes[0], acts, strict=True):
                for j, (skip, marker) in enumerate((("plain", "o"), ("resnet", "s"))):
                    picked = [
                        p
                        for n in NORMS
                        for p in cells
                        if (p["activation"], p["skip"], p["norm"]) == (act, skip, n)
                    ]
                    xs = np.array([NORMS.index(p["norm"]) for p in picked]) + (j - 0.5) * 0.2
                    colour = OKABE_ITO[5 if skip == "plain" else 4]
                    ax.errorbar(
                        xs,
                        [p["rate"] for p in picked],
                        yerr=[p["rate_se"] or 0.0 for p in picked],
                        fmt=marker,
                        color=colour,
                        ms=4,
                        capsize=2,
                        label="plain MLP" if skip == "plain" else "ResNet (pre-activation)",
                    )
                    pred = [(x, p["predicted_rate"]) for x, p in zip(xs, picked, strict=True)]
                    pred = [(x, v) for x, v in pred if v is not None]
                    if pred:
                        ax.plot(
                            *zip(*pred, strict=True),
                            "_",
                            color="0.1",
                            ms=12,
                            mew=1.5,
                            label="mean field (plain)",
                        )
                ax.axhline(1.0, color="0.6", lw=0.6)
                ax.axhline(EXPLODING_RATE, color=OKABE_ITO[5], lw=0.6, ls=":")
                ax.set_xticks(
                    range(len(NORMS)), [f"{n} norm" if n != "none" else "no norm" for n in NORMS]
                )
                ax.set_xlim(-0.5, len(NORMS) - 0.5)
                ax.set_title(act, fontsize=8)
                ax.legend(frameon=False, fontsize=6)
            axes[0, 0].set_ylabel("GSC growth rate per dense layer")
            fig.suptitle(
                f"depth {data['depth']}; mean +- standard error over seeds; dotted: "
                f"{EXPLODING_RATE} (exploding above)",
                fontsize=7,
            )
            fig.tight_layout()
            paths += save_figure(fig, folder / "skip_by_normalization", formats)
    return paths


def verdicts(data: dict) -> list[Verdict]:
    out = []
    orders = _rows(data, "order")
    for act, norm in dict.fromkeys((p["activation"], p["norm"]) for p in orders):
        rows = [p for p in orders if (p["activation"], p["norm"]) == (act, norm)]
        after = [p for p in rows if p["cycle"] == "norm -> act"]
        before = [p for p in rows if p["cycle"] == "act -> norm"]
        if not (after and before):
            continue
        spread = max(
            max(p["rate"] for p in group) - min(p["rate"] for p in group)
            for group in (after, before)
        )
        gap = abs(np.mean([p["rate"] for p in before]) - np.mean([p["rate"] for p in after]))
        if len(after) > 1 or len(before) > 1:
            out.append(
                Verdict(
                    f"With {norm} norm ({act}), the orders that are rotations of one cycle "
                    "share a growth rate",
                    spread < gap,
                    f"largest spread of the rate within a cycle {spread:.3f}, difference "
                    f"between the cycles {gap:.3f}",
                )
            )
        worst_after = max(p["rate"] for p in after)
        best_before = min(p["rate"] for p in before)
        out.append(
            Verdict(
                f"With {norm} norm ({act}), the activation after the norm keeps the gradient "
                "from exploding and the activation before it makes it explode",
                worst_after <= EXPLODING_RATE < best_before,
                "GSC growth rate per layer, activation after the norm: "
                + ", ".join(f"{p['order']} {_fmt(p)}" for p in after)
                + "; before it: "
                + ", ".join(f"{p['order']} {_fmt(p)}" for p in before)
                + f" (exploding above {EXPLODING_RATE}; GSC(L, 0) "
                f"{min(p['gsc_input'] for p in after):.3g} to "
                f"{max(p['gsc_input'] for p in after):.3g} vs "
                f"{min(p['gsc_input'] for p in before):.3g} to "
                f"{max(p['gsc_input'] for p in before):.3g})",
                claims=("D1.4",),
            )
        )
    cells = {(p["activation"], p["skip"], p["norm"]): p for p in _rows(data, "table")}
    acts = list(dict.fromkeys(a for a, _, _ in cells))
    if not acts:
        return out
    measured = lambda c: c.get("rate") is not None and np.isfinite(c["rate"])  # noqa: E731
    full = [
        a
        for a in acts
        if all((a, s, n) in cells and measured(cells[(a, s, n)]) for s in SKIPS for n in NORMS)
    ]
    if not full:  # a missing or non-finite cell: no verdict rather than a vacuous one
        return out
    table = "; ".join(
        f"{a}: " + ", ".join(f"{s}/{n} {_fmt(cells[(a, s, n)])}" for s in SKIPS for n in NORMS)
        for a in full
    )
    explodes = lambda a, s, n: cells[(a, s, n)]["rate"] > EXPLODING_RATE  # noqa: E731
    out.append(
        Verdict(
            "ResNets explode without normalization",
            all(explodes(a, "resnet", "none") for a in full),
            "GSC growth rate per dense layer of the no-norm ResNet: "
            + ", ".join(f"{a} {_fmt(cells[(a, 'resnet', 'none')])}" for a in full)
            + f" (exploding above {EXPLODING_RATE})",
            claims=("D1.3",),
        )
    )
    out.append(
        Verdict(
            "Plain nets do not explode with properly placed BatchNorm (linear-norm-act)",
            not any(explodes(a, "plain", "batch") for a in full),
            "GSC growth rate per layer of the plain batch-norm MLP: "
            + ", ".join(
                f"{a} {_fmt(cells[(a, 'plain', 'batch')])} (no norm "
                f"{_fmt(cells[(a, 'plain', 'none')])})"
                for a in full
            ),
            claims=("D1.3",),
        )
    )
    out.append(
        Verdict(
            "It is normalization, not skip connections, that prevents exploding gradients",
            all(
                cells[(a, "plain", "batch")]["rate"] <= EXPLODING_RATE
                and cells[(a, "resnet", "none")]["rate"] > EXPLODING_RATE
                for a in full
            ),
            "rate per dense layer, skip/norm: "
            + table
            + ". Skips lower the rate in "
            + str(
                sum(
                    cells[(a, "resnet", n)]["rate"] < cells[(a, "plain", n)]["rate"]
                    for a in full
                    for n in NORMS
                )
            )
            + f" of {3 * len(full)} (activation, norm) cells; batch norm lowers the plain "
            "rate for "
            + (
                ", ".join(
                    a
                    for a in full
                    if cells[(a, "plain", "batch")]["rate"] < cells[(a, "plain", "none")]["rate"]
                )
                or "none"
            ),
            claims=("D1.3",),
        )
    )
    return out


ANALYSIS = Analysis(
    name="normalization",
    title="Where the normalization goes: layer order, and skip connection x normalization",
    claim="Discussion 1: an activation after BatchNorm may be crucial to prevent exploding "
    "gradients (with the activation before BatchNorm the loss blew up); it is normalization "
    "like BatchNorm, not skip connections, that prevents explosion (ResNets explode without "
    "it, plain nets do not with it).",
    sizes=SIZES,
    configs=configs,
    compute=compute,
    summarize=summarize,
    plot=plot,
    verdicts=verdicts,
    notes="At initialization only: the discussion's observations are about training loss, "
    "which this analysis does not measure. The 6 orders are rotations of two cycles (the "
    "activation right after the norm, or right before it), so in a deep stack they come in "
    "two groups of three with nearly the same rate; the order names where a 'layer output' "
    "is read. Batch norm uses batch statistics (no running averages) and no affine part; "
    "its GSC is over the whole batch (matrix-free estimate), so it depends on the batch "
    "size. Rates per dense layer (a ResNet block has two); standard errors over seeds, few "
    "seeds at the small size. sigma_w: He sqrt(2) for ReLU, LeCun 1 otherwise.",
)

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
