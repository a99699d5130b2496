"""GSC across depth for every architecture family of the GSC paper.

    python analyses/gsc_across_depth.py [--size tiny|small|paper] [--depths 50] [--out ...]

For each family of Philipp, Song & Carbonell (arXiv 1712.05577; :mod:`jacobian_lab.zoo`),
the GSC from every layer to the output, GSC(k, 0), at initialization (mean over Gaussian
inputs, per seed), and its growth rate r per dense layer (least-squares fit of
log GSC(k, 0) on k; for ResNets, whose layers k are blocks of two dense layers, the square
root of the rate per block, so that plain and residual rates compare per dense layer).

Beside every measured profile, its mean-field prediction (dotted), for the same inputs:

* plain, no norm: :func:`jacobian_lab.meanfield.gsc_profile` (length-map transient);
* plain, layer norm: ``r^k`` with ``r`` from :func:`jacobian_lab.gsc_growth_rate`;
* plain, batch norm: :func:`jacobian_lab.meanfield.batchnorm_gsc_profile` at the batch size
  (Yang et al., arXiv 1902.08129);
* looks-linear ReLU: 1 (an orthogonal linear map at initialization);
* ResNets: :func:`jacobian_lab.meanfield.residual_gsc_profile` (mean-field residual
  networks, Yang & Schoenholz arXiv 1712.08969; the Pythagorean equation per block).
"""

from __future__ import annotations

from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

import jacobian_lab as jl
from jacobian_lab import meanfield
from jacobian_lab.experiments.constants import gaussian_inputs
from jacobian_lab.experiments.report import Analysis, Verdict, script_main
from jacobian_lab.plot import STYLE, save_figure, series_style

EXPLODING_RATE = 1.02
"""A family explodes when its fitted GSC growth rate per layer exceeds this (a factor
e^(0.02 * 50) = 2.7 over the paper's 50 layers, and growing exponentially beyond)."""

THEORY_TOLERANCE = 0.02
"""Largest relative deviation of a fitted rate from the mean-field one that counts as
agreement at the paper's width 100 (finite-width corrections are of order 1/width, and
batch size / width for batch norm; theory_validation tests the predictions with errors)."""

ALL = list(jl.paper_architectures(depth=4, width=4))
# tiny (tests): exploding and calm plain families, the ResNets of the exploding ones
TINY_ARCHS = ["relu", "batch-relu", "layer-tanh", "batch-tanh", "looks-linear-relu"]
TINY_ARCHS += ["resnet-batch-relu", "resnet-layer-tanh", "resnet-batch-tanh"]
SIZES = {
    "tiny": {"archs": TINY_ARCHS, "depths": [8], "widths": [16], "seeds": 2, "batch": 4},
    "small": {"archs": ALL, "depths": [50], "widths": [100], "seeds": 3, "batch": 8},
    "paper": {"archs": ALL, "depths": [50], "widths": [100], "seeds": 10, "batch": 32},
}
for _cfg in SIZES.values():
    _cfg["dtype"] = "float32"


def configs(config: dict) -> list[dict]:
    if any(a.startswith("resnet-") for a in config["archs"]) and any(
        d % 2 for d in config["depths"]
    ):
        raise ValueError(
            f"gsc_across_depth needs even depths: a ResNet of depth D has D/2 two-layer "
            f"blocks, got {config['depths']}"
        )
    return [
        {"arch": a, "depth": d, "width": w, **{k: config[k] for k in ("seeds", "batch", "dtype")}}
        for d in config["depths"]
        for w in config["widths"]
        for a in config["archs"]
    ]


def compute(unit: dict) -> dict:
    net = jl.architecture(
        unit["arch"], depth=unit["depth"], width=unit["width"], dtype=unit["dtype"]
    )
    keys = jax.random.split(jax.random.PRNGKey(0), unit["seeds"])
    x = gaussian_inputs(jax.random.PRNGKey(10_000), (unit["batch"], net.input_dim), net.dtype)
    profiles = jl.gsc_over_seeds(net, keys, x).mean(axis=1)  # (seeds, L+1), mean over inputs
    per_unit = max(net.block_layers, 1)  # a ResNet's unit is a block of dense layers
    # a ResNet's stem is one linear projection, not a block: fit its rate over the blocks
    fitted = profiles[:, :-1] if net.residual else profiles
    theory = theory_profile(net, np.asarray(x, dtype=float))
    fitted_theory = theory[:-1] if net.residual else theory
    return {
        "layers": net.num_layers,
        "dense_layers_per_unit": per_unit,
        "profiles": np.asarray(profiles, dtype=float).tolist(),
        "rate": (np.asarray(jl.growth_rate(fitted).rate, dtype=float) ** (1 / per_unit)).tolist(),
        "theory": theory.tolist(),
        "theory_rate": (
            float(np.asarray(jl.growth_rate(fitted_theory).rate) ** (1 / per_unit))
            if np.all(np.isfinite(fitted_theory))
            else None
        ),
    }


def theory_profile(net: jl.Network, x: np.ndarray) -> np.ndarray:
    """Mean-field GSC(k, 0), ``k = 0 .. L``, of a zoo network on the inputs ``x`` (see the
    module docstring for which theory)."""
    gram = x @ x.T / x.shape[1]  # the inputs' Gram over the batch, per input unit
    act, sw, sb, L = net.activation, net.sigma_w, net.sigma_b, net.num_layers
    batch = net.norm == "batch"
    if batch and x.shape[0] < meanfield.MIN_BATCH_SIZE:
        return np.full(L + 1, np.nan)  # no batch-norm mean field below 4 (infinite rate)
    if net.residual:
        return meanfield.residual_gsc_profile(
            act,
            sw,
            sb,
            net.num_blocks,
            norm=net.norm,
            block_layers=net.block_layers,
            residual_scale=net.residual_scale,
            batch_size=x.shape[0] if batch else None,
            input_gram=gram,
        )
    if net.weight_init == "looks_linear":
        return np.ones(L + 1)
    if batch:
        return meanfield.batchnorm_gsc_profile(act, L, x.shape[0], input_gram=gram)
    if net.norm == "layer":
        return float(jl.gsc_growth_rate(act, sw, sb, "layer")) ** np.arange(L + 1.0)
    q1 = sw**2 * float(np.mean(np.diag(gram))) + sb**2
    return meanfield.gsc_profile(act, sw, sb, L, q1)


def _plain(arch: str) -> str | None:
    return arch.removeprefix("resnet-") if arch.startswith("resnet-") else None


def summarize(config: dict, records: list[dict]) -> dict:
    table = []
    for rec in records:
        c, r = rec["config"], rec["result"]
        g = np.array(r["profiles"])[:, -1]
        table.append(
            {
                "architecture": c["arch"],
                "depth": c["depth"],
                "width": c["width"],
                "layers": r["layers"],
                "gsc_input_output_mean": float(g.mean()),
                "gsc_input_output_min": float(g.min()),
                "gsc_input_output_max": float(g.max()),
                "rate_mean": float(np.mean(r["rate"])),
                "rate_std": float(np.std(r["rate"])),
                "rate_theory": r.get("theory_rate"),
                "gsc_input_output_theory": (r["theory"][-1] if "theory" in r else None),
            }
        )
    depth, width = max(config["depths"]), max(config["widths"])
    profiles = {
        rec["config"]["arch"]: rec["result"]["profiles"]
        for rec in records
        if rec["config"]["depth"] == depth and rec["config"]["width"] == width
    }
    theory = {
        rec["config"]["arch"]: rec["result"].get("theory")
        for rec in records
        if rec["config"]["depth"] == depth and rec["config"]["width"] == width
    }
    return {
        "table": table,
        "profile_depth": depth,
        "profile_width": width,
        "profiles": profiles,
        "theory": theory,
    }


def _headline(data: dict) -> dict[str, dict]:
    return {
        row["architecture"]: row
        for row in data["table"]
        if row["depth"] == data["profile_depth"] and row["width"] == data["profile_width"]
    }


def plot(data: dict, folder: Path, formats) -> list[Path]:
    profiles = data["profiles"]
    rows = _headline(data)
    paths = []
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(6.75, 2.8), sharey=True)
        for ax, resnet in zip(axes, (False, True), strict=True):
            names = [n for n in profiles if n.startswith("resnet-") == resnet]
            for i, name in enumerate(names):
                # measured solid (dashed after 7 colours); its theory dotted, same colour
                style = {"color": series_style(i)["color"], "linestyle": "-" if i < 7 else "--"}
                theory = data.get("theory", {}).get(name)
                if theory is not None:
                    theory = np.asarray(theory, dtype=float)  # None (no theory) -> NaN
                jl.plot.gsc_profile(
                    np.array(profiles[name]), ax, theory=theory, label=name, style=style
                )
            ax.plot([], [], ":", color="0.3", lw=1.3, label="mean-field theory")
            ax.set_xlabel(("block" if resnet else "layer") + " k (0 = output, L = input)")
            ax.set_ylabel("")
            ax.set_title("ResNets" if resnet else "plain MLPs", fontsize=8)
            ax.legend(ncol=2, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.25))
        axes[0].set_ylabel("GSC(k, 0) (dimensionless)")
        fig.suptitle(
            f"depth {data['profile_depth']}, width {data['profile_width']}; line: median, "
            "band: min-max over seeds; dotted: mean-field prediction for the same inputs",
            fontsize=7,
        )
        paths += save_figure(fig, folder / "gsc_profiles", formats)

        families = [a for a in rows if not a.startswith("resnet-")]
        fig, ax = plt.subplots(figsize=(3.3, 2.6))
        xs = np.arange(len(families))
        for offset, (label, marker, colour, pick) in enumerate(
            [
                ("plain MLP", "o", series_style(5)["color"], lambda a: a),
                ("ResNet version", "s", series_style(4)["color"], lambda a: f"resnet-{a}"),
            ]
        ):
            picked = [(i, rows[pick(a)]) for i, a in enumerate(families) if pick(a) in rows]
            if not picked:
                continue
            i, r = zip(*picked, strict=True)
            centre = np.array([row["gsc_input_output_mean"] for row in r])
            lo = centre - np.array([row["gsc_input_output_min"] for row in r])
            hi = np.array([row["gsc_input_output_max"] for row in r]) - centre
            ax.errorbar(
                xs[list(i)] + (offset - 0.5) * 0.25,
                centre,
                yerr=[lo, hi],
                fmt=marker,
                color=colour,
                ms=3,
                capsize=1.5,
                label=label,
            )
        ax.set_yscale("log")
        ax.set_xticks(xs, families, rotation=60, ha="right")
        ax.set_ylabel("GSC(L, 0), input to output")
        ax.legend(frameon=False)
        paths += save_figure(fig, folder / "gsc_plain_vs_resnet", formats)
    return paths


def verdicts(data: dict) -> list[Verdict]:
    rows = _headline(data)
    plain = [a for a in rows if not a.startswith("resnet-")]
    exploding = [a for a in plain if rows[a]["rate_mean"] > EXPLODING_RATE]
    out = []
    if plain:
        rates = ", ".join(f"{a} {rows[a]['rate_mean']:.3f}" for a in exploding)
        out.append(
            Verdict(
                "Most plain MLPs have exploding gradients at initialization",
                2 * len(exploding) >= len(plain),
                f"{len(exploding)} of {len(plain)} families grow faster than "
                f"{EXPLODING_RATE}/layer at depth {data['profile_depth']} (r: {rates or 'none'})",
                claims=("P1",),
            )
        )
    pairs = [(a, f"resnet-{a}") for a in exploding if f"resnet-{a}" in rows]
    if pairs:
        ratios = [
            rows[a]["gsc_input_output_mean"] / rows[b]["gsc_input_output_mean"] for a, b in pairs
        ]
        lower = sum(q > 1 for q in ratios)
        out.append(
            Verdict(
                "ResNets have far lower GSC than their plain versions",
                lower == len(pairs),
                f"the ResNet version is lower for {lower} of {len(pairs)} exploding families; "
                f"median ratio plain/ResNet of GSC(L, 0) = {np.median(ratios):.3g} "
                f"(range {min(ratios):.3g} to {max(ratios):.3g})",
                claims=("P4", "D1.5", "-D1.2"),
            )
        )
    with_theory = [a for a in rows if rows[a].get("rate_theory") is not None]
    if with_theory:
        dev = {a: rows[a]["rate_mean"] / rows[a]["rate_theory"] - 1 for a in with_theory}
        worst = sorted(with_theory, key=lambda a: -abs(dev[a]))[:3]
        out.append(
            Verdict(
                "Mean-field theory predicts the GSC growth of every family, batch norm and "
                "ResNets included",
                all(abs(d) < THEORY_TOLERANCE for d in dev.values()),
                f"{sum(abs(d) < THEORY_TOLERANCE for d in dev.values())} of {len(dev)} fitted "
                f"rates within {100 * THEORY_TOLERANCE:.0f}% of the theory's at width "
                f"{data['profile_width']}; largest deviations: "
                + ", ".join(
                    f"{a} {rows[a]['rate_mean']:.4f} vs {rows[a]['rate_theory']:.4f}" for a in worst
                ),
            )
        )
    return out


ANALYSIS = Analysis(
    name="gsc_across_depth",
    title="Gradient scale coefficient across depth, per GSC-paper architecture",
    claim="Most plain MLPs have exploding gradients at initialization (GSC(k, 0) grows "
    "exponentially in k) while their ResNet versions have far lower GSC (Philipp et al., "
    "arXiv 1712.05577).",
    sizes=SIZES,
    configs=configs,
    compute=compute,
    summarize=summarize,
    plot=plot,
    verdicts=verdicts,
    notes="The reference notes hold no GSC values reported by the paper and its full text "
    "was not retrievable here, so there is no column of paper values or ratios. Gaussian "
    "inputs stand in for CIFAR10. Batch-norm Jacobians are over the whole batch, so their GSC "
    "depends on the batch size; so does the dotted batch-norm prediction (Yang et al. "
    "1902.08129, derived here under its assumptions). Rates are per dense layer (a ResNet "
    "block has two). Dotted lines are mean-field predictions for the same inputs at infinite "
    "width: looks-linear ReLU is an orthogonal linear map at initialization (GSC 1); ResNets "
    "follow the Pythagorean recursion of jacobian_lab.meanfield.residual_gsc_profile. "
    "Finite-width drifts (He-ReLU and tanh without norm) are not in the theory.",
)

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
