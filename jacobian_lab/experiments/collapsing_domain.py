"""Collapsing domain: exploding gradients traded against representations that become alike.

    python analyses/collapsing_domain.py [--size tiny|small|paper] [--depths 50]

For every plain architecture family of the GSC paper, at every layer and for a batch of
independent Gaussian inputs (pairwise cosine about 0): the mean pairwise cosine of the
layer outputs, the sign diversity and the standard deviation of the pre-activations
(:func:`jacobian_lab.domain_statistics`), beside the family's GSC(L, 0) and growth rate.
Philipp et al. (arXiv 1712.05577) argue that architectures can avoid exploding gradients
only at the price of a collapsing domain (layers acting pseudo-linearly on a shrinking
domain), which batch normalization prevents by re-spreading each neuron over the batch.
"""

from __future__ import annotations

from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import spearmanr

import jacobian_lab as jl
from jacobian_lab.experiments.constants import gaussian_inputs
from jacobian_lab.experiments.report import Analysis, Verdict, script_main
from jacobian_lab.plot import STYLE, save_figure, series_style

EXPLODING_RATE = 1.02  # per layer, as in gsc_across_depth

PLAIN = [a for a in jl.paper_architectures(depth=4, width=4) if not a.startswith("resnet-")]
SIZES = {
    "tiny": {"depths": [8], "widths": [16], "seeds": 2, "batch": 6},
    "small": {"depths": [50], "widths": [100], "seeds": 2, "batch": 8},
    "paper": {"depths": [50], "widths": [100], "seeds": 8, "batch": 32},
}
for _cfg in SIZES.values():
    _cfg |= {"archs": PLAIN, "dtype": "float32"}


def configs(config: dict) -> list[dict]:
    common = {k: config[k] for k in ("seeds", "batch", "dtype")}
    return [
        {"arch": a, "depth": d, "width": w, **common}
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
    stats = [jl.domain_statistics(net, net.init(k), x) for k in keys]
    g = jl.gsc_over_seeds(net, keys, x).mean(axis=1)  # (seeds, L+1)

    def mean_from_input(field):
        return np.mean([np.asarray(getattr(s, field), float) for s in stats], axis=0)[::-1]

    return {
        "cosine": mean_from_input("cosine").tolist(),  # from the input (index 0) up
        "sign_diversity": mean_from_input("sign_diversity").tolist(),
        "preact_std": mean_from_input("preact_std").tolist(),
        "gsc_input_output": float(np.mean(np.asarray(g[:, -1]))),
        "rate": float(np.mean(np.asarray(jl.growth_rate(g).rate))),
    }


def summarize(config: dict, records: list[dict]) -> dict:
    table = [
        {
            **{k: rec["config"][k] for k in ("arch", "depth", "width")},
            "gsc_input_output": rec["result"]["gsc_input_output"],
            "rate": rec["result"]["rate"],
            "output_cosine": rec["result"]["cosine"][-1],
            "output_sign_diversity": rec["result"]["sign_diversity"][-1],
            "output_preact_std": rec["result"]["preact_std"][-1],
            "first_preact_std": rec["result"]["preact_std"][0],
        }
        for rec in records
    ]
    depth, width = max(config["depths"]), max(config["widths"])
    profiles = {
        rec["config"]["arch"]: rec["result"]
        for rec in records
        if rec["config"]["depth"] == depth and rec["config"]["width"] == width
    }
    return {"table": table, "depth": depth, "width": width, "profiles": profiles}


def plot(data: dict, folder: Path, formats) -> list[Path]:
    profiles = data["profiles"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 4, figsize=(6.75, 2.2))
        for i, (name, p) in enumerate(profiles.items()):
            style = series_style(i)
            axes[0].plot(range(len(p["cosine"])), p["cosine"], label=name, **style)
            axes[1].plot(range(1, len(p["sign_diversity"]) + 1), p["sign_diversity"], **style)
            axes[2].semilogy(range(1, len(p["preact_std"]) + 1), p["preact_std"], **style)
            axes[3].scatter(p["gsc_input_output"], p["cosine"][-1], color=style["color"], s=8)
            axes[3].annotate(
                name,
                (p["gsc_input_output"], p["cosine"][-1]),
                fontsize=4,
                xytext=(2, 2),
                textcoords="offset points",
            )
        for ax, ylabel, title in zip(
            axes[:3],
            ("mean pairwise cosine", "sign diversity min(P,N)/(P+N)", "pre-activation std"),
            ("(a) alignment of inputs", "(b) pre-activation signs", "(c) pre-activation spread"),
            strict=True,
        ):
            ax.set_xlabel("layer from the input")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=7)
        axes[3].set_xscale("log")
        axes[3].set_xlabel("GSC(L, 0)")
        axes[3].set_ylabel("output cosine")
        axes[3].set_title("(d) trade-off", fontsize=7)
        fig.legend(
            *axes[0].get_legend_handles_labels(),
            ncol=5,
            frameon=False,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
        )
        fig.tight_layout()
        return save_figure(fig, folder / "collapsing_domain", formats)


def collapsed(row: dict) -> bool:
    """The domain has collapsed at the output: independent inputs map to nearly the same
    direction (cosine > 0.9; ReLU's way), or the pre-activations shrank 4-fold from the first
    layer so the nonlinearity acts in its linear range (tanh's way)."""
    return row["output_cosine"] > 0.9 or row["output_preact_std"] < row["first_preact_std"] / 4


def verdicts(data: dict) -> list[Verdict]:
    rows = [r for r in data["table"] if r["depth"] == data["depth"] and r["width"] == data["width"]]
    if len(rows) < 3:
        return []
    calm = [r for r in rows if r["rate"] <= EXPLODING_RATE]
    intact_calm = [r["arch"] for r in calm if not collapsed(r)]
    exploding = [r for r in rows if r["rate"] > EXPLODING_RATE]
    rho = float(
        spearmanr(
            np.log([r["gsc_input_output"] for r in rows]), [r["output_cosine"] for r in rows]
        ).statistic
    )
    return [
        Verdict(
            "Avoiding exploding gradients comes with a collapsing domain",
            set(intact_calm) <= {"looks-linear-relu"},
            f"{len(calm) - len(intact_calm)} of {len(calm)} families with GSC growth <= "
            f"{EXPLODING_RATE}/layer have a collapsed domain "
            f"({', '.join(r['arch'] for r in calm if collapsed(r)) or 'none'}); intact: "
            f"{', '.join(intact_calm) or 'none'} (looks-linear ReLU is a linear map at "
            f"initialization); {sum(not collapsed(r) for r in exploding)} of {len(exploding)} "
            f"exploding families keep their domain; Spearman(log GSC, output cosine) = {rho:.2f}",
            claims=("P3",),
        )
    ]


ANALYSIS = Analysis(
    name="collapsing_domain",
    title="Collapsing domain versus exploding gradients",
    claim="Architectures that avoid exploding gradients can do so through a collapsing "
    "domain: the representations of different inputs become aligned with depth, while "
    "architectures that keep them apart (batch normalization) have exploding gradients "
    "(Philipp et al., arXiv 1712.05577).",
    sizes=SIZES,
    configs=configs,
    compute=compute,
    summarize=summarize,
    plot=plot,
    verdicts=verdicts,
    notes="Batch norm centres every neuron over the batch, so its pairwise cosine sits near "
    "-1/(B-1). ReLU collapses by alignment (cosine -> 1, sign diversity -> 0), tanh at "
    "sigma_b = 0 by shrinking pre-activations into its linear range.",
)

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
