"""Vanishing gradients from saturating activations: the raw gradient norm beside the GSC.

    python analyses/vanishing_gradients.py [--size tiny|small|paper] [--depths 50] [--out ...]

For plain MLPs and pre-activation ResNets (no normalization; ``depth / 2`` blocks of two
dense layers) with sigmoid, tanh, hard tanh and ReLU, at the standard weight scale of
:data:`~jacobian_lab.experiments.constants.SIGMA_W` (LeCun's 1, He's sqrt(2) for ReLU),
and sigmoid once more at its critical ``sigma_w`` (:func:`jacobian_lab.critical_sigma_w`,
``chi_1 = 1``), two sizes of the gradient that reaches layer ``k`` from the output:

* the raw gradient norm :func:`jacobian_lab.gradient_norm`, ``||J_k^0||_F / sqrt(d_0)``,
  the root mean square of ``||J_k^0^T u||`` for a random unit gradient ``u`` at the
  output (root mean square over the inputs, per seed): what the vanishing-gradient
  discussions mean;
* the GSC ``GSC(k, 0) = ||J_k^0||_qm ||f_k|| / ||f_0||`` (Philipp et al., arXiv
  1712.05577), the relative change of the output per relative change of ``f_k`` (mean over
  the inputs, per seed): scale-free, so a layer whose outputs are small can have a small
  raw gradient and a large GSC.

The x axis counts dense layers from the output (a ResNet block is two). Plain networks get
the mean-field prediction (:func:`jacobian_lab.meanfield.gsc_profile`; the raw norm is
``prod_i chi(q_i)^(1/2)`` over the layers above ``k``, :func:`jacobian_lab.meanfield.chi`
at the variances of :func:`jacobian_lab.meanfield.length_sequence`).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from scipy.special import logsumexp

import jacobian_lab as jl
from jacobian_lab import meanfield
from jacobian_lab.experiments.constants import SIGMA_W, gaussian_inputs
from jacobian_lab.experiments.report import Analysis, Verdict, script_main
from jacobian_lab.plot import STYLE, plot_band, save_figure, series_style

FAMILIES = {
    "sigmoid": ("sigmoid", SIGMA_W["sigmoid"]),
    "tanh": ("tanh", SIGMA_W["tanh"]),
    "hard_tanh": ("hard_tanh", SIGMA_W["hard_tanh"]),
    "relu": ("relu", SIGMA_W["relu"]),
    "sigmoid-critical": ("sigmoid", None),
}
"""Family name -> (activation, sigma_w); None: the critical sigma_w at sigma_b = 0."""

GONE = 0.1
"""The raw gradient is "nearly gone" at a layer where it has fallen below this fraction of
its size at the output."""

UNCHANGED = 2.0
"""A gradient "flows back almost unchanged" when its size at the input is within this
factor of its size at the output."""

SIZES = {
    "tiny": {
        "families": ["sigmoid", "relu"],
        "depths": [8],
        "widths": [16],
        "seeds": 2,
        "batch": 4,
    },
    "small": {"families": list(FAMILIES), "depths": [50], "widths": [100], "seeds": 2, "batch": 4},
    "paper": {"families": list(FAMILIES), "depths": [50], "widths": [100], "seeds": 8, "batch": 16},
}
for _cfg in SIZES.values():
    _cfg["dtype"] = "float32"


def configs(config: dict) -> list[dict]:
    unknown = set(config["families"]) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; expected some of {list(FAMILIES)}")
    if any(d % 2 or d < 2 for d in config["depths"]):
        raise ValueError(
            f"vanishing_gradients needs even depths >= 2 (a ResNet of depth D has D/2 "
            f"two-layer blocks), got {config['depths']}"
        )
    return [
        {"family": f, "resnet": r, "depth": d, "width": w}
        | {k: config[k] for k in ("seeds", "batch", "dtype")}
        for d in config["depths"]
        for w in config["widths"]
        for r in (False, True)
        for f in config["families"]
    ]


@cache
def _critical_sigma_w(activation: str) -> float:
    return float(jl.critical_sigma_w(activation, 0.0, high=30.0))


def _sigma_w(family: str) -> float:
    act, sigma_w = FAMILIES[family]
    return _critical_sigma_w(act) if sigma_w is None else sigma_w


def _theory(activation: str, sigma_w: float, depth: int, q1: float) -> dict:
    """Mean-field log10 GSC(k, 0) and raw gradient norm, k = 0 .. depth, of a plain MLP."""
    q = meanfield.length_sequence(activation, q1, sigma_w, 0.0, depth)  # q_1 .. q_L
    log_chi = np.log(meanfield.chi(activation, q, sigma_w))
    raw = 0.5 * np.concatenate([[0.0], np.cumsum(log_chi[::-1])])
    gsc = meanfield.gsc_profile(activation, sigma_w, 0.0, depth, q1)
    return {
        "theory_log10_grad": (raw / np.log(10)).tolist(),
        "theory_log10_gsc": np.log10(gsc).tolist(),
    }


def compute(unit: dict) -> dict:
    act, _ = FAMILIES[unit["family"]]
    sigma_w, depth, width = _sigma_w(unit["family"]), unit["depth"], unit["width"]
    if unit["resnet"]:
        net = jl.resmlp(depth // 2, width, act, sigma_w=sigma_w, dtype=unit["dtype"])
        # blocks of two dense layers, then the stem (one linear layer) at the input
        x_layers = [2 * k for k in range(depth // 2 + 1)] + [depth + 1]
    else:
        net = jl.mlp(depth, width, act, sigma_w=sigma_w, dtype=unit["dtype"])
        x_layers = list(range(depth + 1))
    keys = jax.random.split(jax.random.PRNGKey(0), unit["seeds"])
    x = gaussian_inputs(jax.random.PRNGKey(10_000), (unit["batch"], width), net.dtype)
    g = np.asarray(jl.gsc_over_seeds(net, keys, x), float).mean(axis=1)  # (seeds, L+1)
    # seeds in a loop: gradient_norm checks and warns on concrete values; one compile
    log_grad = np.stack(
        [np.asarray(jl.gradient_norm(net, net.init(k), x, log=True), float) for k in keys]
    )
    # root mean square over the inputs, in logs (sigmoid's reach 1e-31)
    log_grad = 0.5 * (logsumexp(2 * log_grad, axis=1) - np.log(log_grad.shape[1]))
    per_layer = lambda rate: np.asarray(rate, float) ** (1 / (2 if unit["resnet"] else 1))  # noqa: E731
    fit = slice(None, -1) if unit["resnet"] else slice(None)  # the stem is not a block
    result = {
        "sigma_w": sigma_w,
        "layers": x_layers,
        "log10_gsc": np.log10(g).tolist(),
        "log10_grad": (log_grad / np.log(10)).tolist(),
        "gsc_rate": per_layer(jl.growth_rate(g[:, fit]).rate).tolist(),
        "grad_rate": per_layer(
            np.exp(np.polyfit(np.arange(len(x_layers))[fit], log_grad[:, fit].T, 1)[0])
        ).tolist(),
    }
    if not unit["resnet"]:
        q1 = sigma_w**2 * float(np.mean(np.asarray(x, float) ** 2))
        result |= _theory(act, sigma_w, depth, q1)
    return result


def _first_below(layers, log10_values, level: float):
    """The first layer (dense layers from the output) where the value is below ``level``."""
    below = np.asarray(log10_values) < np.log10(level)
    return int(np.asarray(layers)[np.argmax(below)]) if below.any() else None


def summarize(config: dict, records: list[dict]) -> dict:
    table, profiles = [], []
    for rec in records:
        c, r = rec["config"], rec["result"]
        grad = np.mean(r["log10_grad"], axis=0)  # geometric mean over seeds
        gsc = np.mean(r["log10_gsc"], axis=0)
        row = {
            "family": c["family"],
            "skip": "resnet" if c["resnet"] else "plain",
            "depth": c["depth"],
            "width": c["width"],
            "sigma_w": r["sigma_w"],
            "grad_input": float(10 ** grad[-1]),
            "grad_input_min": float(10 ** np.min(np.asarray(r["log10_grad"])[:, -1])),
            "grad_input_max": float(10 ** np.max(np.asarray(r["log10_grad"])[:, -1])),
            "gsc_input": float(10 ** gsc[-1]),
            "grad_rate": float(np.mean(r["grad_rate"])),
            "gsc_rate": float(np.mean(r["gsc_rate"])),
            "grad_gone_at_layer": _first_below(r["layers"], grad, GONE),
            "theory_grad_input": float(10 ** r["theory_log10_grad"][-1])
            if "theory_log10_grad" in r
            else None,
            "theory_gsc_input": float(10 ** r["theory_log10_gsc"][-1])
            if "theory_log10_gsc" in r
            else None,
        }
        table.append(row)
        profiles.append({**r, **row})
    return {"table": table, "profiles": profiles, "depth": max(config["depths"])}


def _deepest(data: dict) -> dict[tuple[str, str], dict]:
    return {
        (p["family"], p["skip"]): p
        for p in data["profiles"]
        if p["depth"] == data["depth"] and p["width"] == max(q["width"] for q in data["profiles"])
    }


ZOOM = (0.03, 30.0)
"""y range of the zoomed plain-MLP panels (sigmoid at sigma_w = 1 leaves it at once)."""


def plot(data: dict, folder: Path, formats) -> list[Path]:
    deepest = _deepest(data)
    families = list(dict.fromkeys(f for f, _ in deepest))
    panels = [("plain", False), ("plain", True), ("resnet", False)]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 3, figsize=(6.75, 4.6), sharex=True)
        for col, (skip, zoom) in enumerate(panels):
            for row, (key, what) in enumerate(
                (
                    ("log10_grad", "raw gradient norm ||J_k^0||_F / sqrt(d_0)"),
                    ("log10_gsc", "GSC(k, 0)"),
                )
            ):
                ax = axes[row, col]
                for i, f in enumerate(families):
                    p = deepest.get((f, skip))
                    if p is None:
                        continue
                    style = series_style(i)
                    plot_band(
                        ax,
                        p["layers"],
                        10.0 ** np.asarray(p[key]),
                        label=f"{f} (sigma_w = {p['sigma_w']:.3g})",
                        style=style,
                        log=True,
                    )
                    if f"theory_{key}" in p:
                        ax.plot(
                            p["layers"],
                            10.0 ** np.asarray(p[f"theory_{key}"]),
                            ":",
                            color=style["color"],
                            lw=1.5,
                        )
                ax.set_yscale("log")
                if zoom:
                    ax.set_ylim(*ZOOM)
                ax.axhline(1.0, color="0.6", lw=0.6)
                name = {"plain": "plain MLP", "resnet": "ResNet"}[skip] + (", zoom" if zoom else "")
                ax.set_title(
                    f"({'abcdef'[3 * row + col]}) {name}: {what.split(' ||')[0]}", fontsize=8
                )
                if col == 0:
                    ax.set_ylabel(what)
                if row == 1:
                    ax.set_xlabel("dense layers from the output")
        axes[0, 0].plot([], [], ":", color="0.3", lw=1.5, label="mean-field theory (plain)")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            ncol=3,
            frameon=False,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.02),
            fontsize=6,
        )
        fig.suptitle(
            f"depth {data['depth']}, no normalization (a ResNet block is 2 dense layers, its "
            "stem the last point); line: geometric mean over seeds, band: min-max",
            fontsize=7,
        )
        fig.tight_layout()
        return save_figure(fig, folder / "vanishing_gradients", formats)


def verdicts(data: dict) -> list[Verdict]:
    rows = _deepest(data)
    depth = data["depth"]
    out = []

    def row(f, s):
        return rows.get((f, s))

    plain = {f: r for (f, s), r in rows.items() if s == "plain"}
    at_input = ", ".join(
        f"{f} {r['grad_input']:.2g} (GSC {r['gsc_input']:.2g})" for f, r in plain.items()
    )
    vanish = lambda r: r["grad_input"] < GONE  # noqa: E731
    if {"sigmoid", "relu"} <= set(plain):
        sig, relu = plain["sigmoid"], plain["relu"]
        out.append(
            Verdict(
                f"Sigmoid makes the gradient vanish in a {depth}-layer plain MLP because of "
                "its derivative; ReLU does not",
                vanish(sig) and not vanish(relu),
                f"raw gradient norm at the input, output = 1: {at_input}. Sigmoid's falls "
                f"by {sig['grad_rate']:.3f} per layer (mean field sqrt(chi_1) = "
                f"{10 ** (np.log10(sig['theory_grad_input']) / depth):.3f}, sigma_w = "
                f"{sig['sigma_w']:g}; sigmoid' <= 1/4), ReLU's by {relu['grad_rate']:.3f}. "
                f"Vanished = below {GONE} at the input",
                claims=("D2.1",),
            )
        )
    if "tanh" in plain:
        tanh = plain["tanh"]
        out.append(
            Verdict(
                f"Tanh makes the gradient vanish in a {depth}-layer plain MLP",
                vanish(tanh),
                f"raw gradient norm at the input {tanh['grad_input']:.2g} (mean field "
                f"{tanh['theory_grad_input']:.2g}) at sigma_w = {tanh['sigma_w']:g}: a power "
                "law, not exponential (on tanh's critical line q_l ~ 1 / (2 l) and chi(q_l) ~ "
                "1 - 1 / l, so the norm falls like L^(-1/2)), while its GSC(L, 0) is "
                f"{tanh['gsc_input']:.2g}: the layer outputs shrink towards the output as fast, "
                "and the GSC divides that out",
                claims=("D2.1",),
            )
        )
    if "sigmoid-critical" in plain:
        c = plain["sigmoid-critical"]
        out.append(
            Verdict(
                "The vanishing comes from the derivative times the weight scale "
                "(chi_1 = sigma_w^2 E[phi'^2]), not the derivative alone",
                c["grad_input"] > GONE,
                f"sigmoid at its critical sigma_w = {c['sigma_w']:.3f} (chi_1 = 1): raw "
                f"gradient norm at the input {c['grad_input']:.2g} (mean field "
                f"{c['theory_grad_input']:.2g}), GSC(L, 0) {c['gsc_input']:.2g}"
                + (
                    f"; at sigma_w = {plain['sigmoid']['sigma_w']:g}: "
                    f"{plain['sigmoid']['grad_input']:.2g}"
                    if "sigmoid" in plain
                    else ""
                ),
            )
        )
    pairs = [f for f in dict.fromkeys(f for f, _ in rows) if row(f, "plain") and row(f, "resnet")]
    if pairs:
        gone = {f: row(f, "plain")["grad_gone_at_layer"] for f in pairs}
        flows = {f: row(f, "resnet") for f in pairs}
        unchanged = lambda v: 1 / UNCHANGED <= v <= UNCHANGED  # noqa: E731
        plain_gone = [f for f in pairs if gone[f] is not None and gone[f] <= depth // 4]
        res_raw = [f for f in pairs if unchanged(flows[f]["grad_input"])]
        res_gsc = [f for f in pairs if unchanged(flows[f]["gsc_input"])]
        out.append(
            Verdict(
                f"Without skips the gradient is nearly gone after ten or so of {depth} layers; "
                "with them it flows back almost unchanged",
                len(plain_gone) == len(pairs) and len(res_raw) == len(pairs),
                f"plain: raw norm below {GONE} from layer "
                + ", ".join(f"{f} {gone[f] if gone[f] is not None else 'never'}" for f in pairs)
                + f" (of {depth}); ResNet at the input: raw norm "
                + ", ".join(f"{f} {flows[f]['grad_input']:.3g}" for f in pairs)
                + ", GSC "
                + ", ".join(f"{f} {flows[f]['gsc_input']:.3g}" for f in pairs)
                + f". Within a factor {UNCHANGED:g} of the output: raw norm for "
                f"{', '.join(res_raw) or 'none'}, GSC for {', '.join(res_gsc) or 'none'}",
                claims=("D3.2",),
            )
        )
        larger = [f for f in pairs if flows[f]["grad_input"] > row(f, "plain")["grad_input"]]
        out.append(
            Verdict(
                "Skip connections let the gradient reach the early layers with larger magnitude",
                len(larger) == len(pairs),
                f"raw gradient norm at the input, ResNet vs plain ({depth} layers, output = 1): "
                + ", ".join(
                    f"{f} {flows[f]['grad_input']:.3g} vs {row(f, 'plain')['grad_input']:.3g}"
                    for f in pairs
                )
                + f"; larger with skips for {len(larger)} of {len(pairs)} families",
                claims=("D1.1",),
            )
        )
    return out


ANALYSIS = Analysis(
    name="vanishing_gradients",
    title="Vanishing gradients from saturating activations: raw gradient norm and GSC",
    claim="Sigmoid and tanh make the gradient vanish in deep networks because of their "
    "derivative; ReLU solves it; without skip connections the gradient is nearly gone after "
    "ten or so of fifty layers, with them it flows back almost unchanged (discussions 2 and 3 "
    "of the claims list).",
    sizes=SIZES,
    configs=configs,
    compute=compute,
    summarize=summarize,
    plot=plot,
    verdicts=verdicts,
    notes="Two measures answer two questions. The raw gradient norm ||J_k^0||_F / sqrt(d_0) "
    "is how big a gradient reaches layer k: it vanishes when the layer Jacobians shrink "
    "vectors (chi_1 = sigma_w^2 E[phi'^2] < 1, sigmoid at sigma_w = 1: about 0.056), and it "
    "grows in a no-norm ResNet because ||f_k||^2 grows along the stream. The GSC multiplies "
    "it by ||f_k|| / ||f_0||, so it measures the relative effect of a relative change: tanh "
    "and hard tanh at sigma_w = 1 have layer outputs that shrink towards the output (q -> 0 "
    "on the critical line), so their raw gradient decays while their GSC stays near 1 or "
    "grows; a ReLU ResNet's raw gradient grows by orders of magnitude while its GSC stays "
    "near 1. Only where the layer outputs keep their size (sigmoid, whose outputs have mean "
    "1/2) do both vanish together. The mean-field lines are the mean over weights of the "
    "squared norm; at finite width the squared gradient fluctuates, more so as beta = sum of "
    "1/width over the layers grows (Hanin, arXiv 1801.03744; beta = 0.49 at depth 50, width "
    "100), so the geometric mean over seeds sits below the line (ReLU: 0.70 vs 1 at the "
    "input at the small size). Gaussian inputs; no normalization; float32.",
)

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
