"""The residual trick: every layer as a diluted nonlinearity, and the add node of a block.

    python analyses/residual_trick.py [--size tiny|small|paper]

Philipp et al. (arXiv 1712.05577) say that any network is a residual network: a layer
splits into a linear part and a nonlinear remainder, ``f(v) = S v + rho(v)``. Its dilution
``k = Q||S v|| / Q||rho||`` pulls its GSC towards the linear part's:
``GSC^2 = (k^2 GSC_S^2 + GSC_rho^2) / (k^2 + 1)`` (:func:`jacobian_lab.dilution`).
This analysis measures:

* for every plain family of the paper: ``k`` of each layer with ``S`` fitted by least
  squares to the layer's recorded inputs and outputs, beside the family's GSC growth rate
  and how far its domain has collapsed (output cosine of independent inputs). The paper
  says that the families that avoid exploding gradients pay with a collapsing domain.
  Here we check whether they are also the pseudo-linear (high ``k``) ones;
* for the ResNet families: ``k`` of each block (fitted), of its branch alone (the block
  without its skip), and the paper's ``Q||s|| / Q||r||`` (skip as the linear part);
* for every unit without batch norm, with ``S = E[J]``: the measured GSC across the unit
  beside the prediction of formula (*);
* the add node of every block (:func:`jacobian_lab.add_node_split`): the backpropagated
  gradient's skip part and branch part, their sizes and their cosine across depth.
"""

from __future__ import annotations

from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

import jacobian_lab as jl
from jacobian_lab.experiments.constants import gaussian_inputs
from jacobian_lab.experiments.report import Analysis, Verdict, script_main
from jacobian_lab.plot import OKABE_ITO, STYLE, save_figure, series_style

EXPLODING_RATE = 1.02  # per layer, as in gsc_across_depth
COLLAPSED_COSINE = 0.9
PLAIN = [a for a in jl.paper_architectures(depth=4, width=4) if not a.startswith("resnet-")]
RESNETS = ["resnet-relu", "resnet-layer-relu", "resnet-tanh", "resnet-layer-tanh"]
JACOBIAN_PLAIN = ["relu", "tanh", "layer-tanh"]  # plain families whose GSC prediction is drawn

SIZES = {
    "tiny": {"depth": 6, "width": 8, "fit_factor": 10, "jac_samples": 16, "batch": 8, "seeds": 1},
    "small": {
        "depth": 50,
        "width": 48,
        "fit_factor": 10,
        "jac_samples": 32,
        "batch": 8,
        "seeds": 2,
    },
    "paper": {
        "depth": 50,
        "width": 100,
        "fit_factor": 20,
        "jac_samples": 64,
        "batch": 16,
        "seeds": 4,
    },
}
for _cfg in SIZES.values():
    _cfg |= {"archs": PLAIN + RESNETS, "dtype": "float32"}
SIZES["tiny"]["archs"] = ["batch-relu", "resnet-layer-relu"]  # batch-norm rows; blocks


def configs(config: dict) -> list[dict]:
    keys = ("depth", "width", "fit_factor", "jac_samples", "batch", "dtype", "seeds")
    return [{"arch": a, **{k: config[k] for k in keys}} for a in config["archs"]]


def _from_input(a) -> list[float]:
    return np.asarray(a, dtype=float)[::-1].tolist()


def compute(unit: dict) -> dict:
    """Every seed's numbers, combined: per-layer lists by their median over seeds, numbers
    by their median (the largest for the add node's worst deviation). Seeds run in a loop:
    each computes several diagnostics that share one compiled program per shape."""
    runs = [_one_seed(unit, s) for s in range(unit["seeds"])]
    out = {}
    for key, value in runs[0].items():
        values = [r[key] for r in runs]
        if isinstance(value, list):
            out[key] = np.median(np.asarray(values, dtype=float), axis=0).tolist()
        elif isinstance(value, float):
            combine = np.max if key == "skip_equals_arriving" else np.median
            out[key] = float(combine(values))
        else:
            out[key] = value
    return out


def _one_seed(unit: dict, seed: int) -> dict:
    net = jl.architecture(
        unit["arch"], depth=unit["depth"], width=unit["width"], dtype=unit["dtype"]
    )
    params = net.init(jax.random.fold_in(jax.random.PRNGKey(0), seed))
    n_fit = unit["fit_factor"] * unit["width"]
    x = gaussian_inputs(
        jax.random.fold_in(jax.random.PRNGKey(1), seed), (n_fit, net.input_dim), net.dtype
    )
    batch = x[: unit["batch"]]
    out = {"residual": bool(net.residual), "norm": net.norm}
    if net.batch_coupled:  # rows of n_fit / B batches, each through its own batch statistics
        fit_x = x.reshape(-1, unit["batch"], net.input_dim)
        g = jl.gsc(net, params, batch)
    else:
        fit_x = x
        g = jl.gsc(net, params, x[: unit["jac_samples"]])
    lstsq = jl.dilution(net, params, fit_x, fit="lstsq")
    g = np.asarray(g).mean(axis=0)  # in the model dtype (growth_rate fits in it)
    out |= {
        "lstsq_share": _from_input(lstsq.linear_share),
        "rate": float(jl.growth_rate(g).rate),
        "gsc_input_output": float(g[-1]),
    }
    if not net.residual:  # domain statistics read plain layers' pre-activations
        out["output_cosine"] = float(np.asarray(jl.domain_statistics(net, params, batch).cosine)[0])
    if net.residual or unit["arch"] in JACOBIAN_PLAIN:
        d = jl.dilution(net, params, x[: unit["jac_samples"]], fit="jacobian")
        med = lambda a: _from_input(np.median(np.asarray(a, float), axis=0))  # noqa: E731
        out |= {
            "share": _from_input(d.linear_share),
            "skip_share": _from_input(d.skip_share),
            "branch_share": _from_input(d.branch_share),
            "gsc": med(d.gsc),
            "predicted_gsc": med(d.predicted_gsc),
            "remainder_gsc": med(d.remainder_gsc),
            "prediction_error": float(np.median(np.abs(np.asarray(d.predicted_gsc / d.gsc) - 1))),
        }
    if net.residual:
        split = jl.add_node_split(
            net, params, batch, jax.random.fold_in(jax.random.PRNGKey(2), seed)
        )
        med = lambda a: _from_input(np.median(np.asarray(a, float), axis=0))  # noqa: E731
        out |= {
            "add_skip": med(split.skip),
            "add_branch": med(split.branch),
            "add_cosine": med(split.cosine),
            "add_total": med(split.total),
            "skip_equals_arriving": float(
                np.max(np.abs(np.asarray(split.skip / split.arriving) - 1))
            ),
        }
    return out


def summarize(config: dict, records: list[dict]) -> dict:
    table = []
    for rec in records:
        r = rec["result"]
        k = _k(r["lstsq_share"])
        row = {
            "arch": rec["config"]["arch"],
            "rate": r["rate"],
            "gsc_input_output": r["gsc_input_output"],
            "output_cosine": r.get("output_cosine", float("nan")),
            "median_k_lstsq": float(np.median(k[1:])) if len(k) > 1 else float(k[0]),
        }
        if "share" in r:
            row["prediction_error"] = r["prediction_error"]
        if r["residual"]:
            kb, kr, ks = (_k(r[f])[1:] for f in ("share", "branch_share", "skip_share"))
            row |= {
                "median_k_block": float(np.median(kb)),
                "median_k_branch": float(np.median(kr)),
                "median_k_skip": float(np.median(ks)),
                "blocks_raised": float(np.mean(kb > kr)),
                "median_branch_ratio": float(
                    np.median(np.array(r["add_branch"]) / np.array(r["add_skip"]))
                ),
                "median_abs_cosine": float(np.median(np.abs(r["add_cosine"]))),
            }
        table.append(row)
    return {"table": table, "profiles": {rec["config"]["arch"]: rec["result"] for rec in records}}


def _k(share) -> np.ndarray:
    s = np.asarray(share, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(s / (1 - s))


def _styles_key(ax, labels: dict) -> None:
    """Grey proxy lines naming what each line style means."""
    for style, label in labels.items():
        ax.plot([], [], color="0.4", linestyle=style, label=label)


def plot(data: dict, folder: Path, formats) -> list[Path]:
    prof = data["profiles"]
    rates = {r["arch"]: r["rate"] for r in data["table"]}
    resnets = [(a, p) for a, p in prof.items() if p["residual"]]
    colour = {a: OKABE_ITO[(i + 1) % len(OKABE_ITO)] for i, (a, _) in enumerate(resnets)}
    plain = [a for a, p in prof.items() if not p["residual"]]
    colour |= {a: series_style(i)["color"] for i, a in enumerate(plain)}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(6.75, 6.4))
        below = {
            "frameon": False,
            "fontsize": 5,
            "loc": "upper center",
            "bbox_to_anchor": (0.5, -0.17),
            "ncol": 3,
        }
        ax = axes[0, 0]
        for arch in plain:
            k = _k(prof[arch]["lstsq_share"])
            ax.semilogy(
                np.arange(1, len(k) + 1),
                k,
                color=colour[arch],
                linestyle="-" if rates[arch] > EXPLODING_RATE else ":",
                lw=1,
                label=f"{arch} ({rates[arch]:.3f})",
            )
        ax.set_xlabel("layer, from the input")
        ax.set_ylabel("dilution k = Q||Sv|| / Q||rho|| (least squares)")
        ax.set_title("(a) plain layers; dotted: GSC rate <= 1.02", fontsize=8)
        ax.legend(title="family (GSC rate per layer)", title_fontsize=5, **below)

        ax = axes[0, 1]
        for arch, p in resnets:
            n = np.arange(1, len(p["share"]))
            c = colour[arch]
            ax.semilogy(n, _k(p["share"])[1:], "-", color=c, label=arch)
            ax.semilogy(n, _k(p["skip_share"])[1:], "--", color=c)
            ax.semilogy(n, _k(p["branch_share"])[1:], ":", color=c)
        _styles_key(
            ax, {"-": "block, S = E[J]", "--": "Q||s|| / Q||r||", ":": "branch alone, S = E[J]"}
        )
        ax.set_xlabel("block, from the input")
        ax.set_ylabel("dilution k")
        ax.set_title("(b) the skip dilutes each block", fontsize=8)
        ax.legend(**below)

        ax = axes[1, 0]
        lo, hi = np.inf, 0.0
        markers = iter("^vsDP*XhH<>")
        for arch, p in ((a, p) for a, p in prof.items() if "gsc" in p):
            m, q = np.array(p["gsc"]), np.array(p["predicted_gsc"])
            c, marker = (colour[arch], "o") if p["residual"] else ("0.3", next(markers))
            ax.plot(m, q, marker, ms=2.5, alpha=0.7, color=c, label=arch, lw=0)
            lo, hi = min(lo, m.min(), q.min()), max(hi, m.max(), q.max())
        ax.plot([lo, hi], [lo, hi], ":", color="0.3", lw=1, label="predicted = measured")
        ax.set_xlabel("GSC across the unit (median over inputs), measured")
        ax.set_ylabel("predicted from k, formula (*)")
        ax.set_title("(c) GSC per layer (grey) or block (colour)", fontsize=8)
        ax.legend(**below)

        ax = axes[1, 1]
        for arch, p in resnets:
            n = np.arange(1, len(p["add_skip"]) + 1)
            ratio = np.array(p["add_branch"]) / np.array(p["add_skip"])
            ax.semilogy(n, ratio, "-", color=colour[arch], label=arch)
            ax.semilogy(n, np.abs(p["add_cosine"]), ":", color=colour[arch])
        _styles_key(ax, {"-": "||branch part|| / ||skip part||", ":": "|cos(skip, branch part)|"})
        ax.set_xlabel("block, from the input")
        ax.set_ylabel("median over inputs")
        ax.set_title("(d) the gradient at each add node", fontsize=8)
        ax.legend(**below)
        fig.tight_layout(h_pad=2.5)
        return save_figure(fig, folder / "residual_trick", formats)


def _pair(res: dict, plain: dict) -> str:
    return f"{plain['arch']} {res['gsc_input_output']:.3g} vs {plain['gsc_input_output']:.3g}"


def _named_k(row: dict) -> str:
    return f"{row['arch']} {row['median_k_lstsq']:.2f}"


def verdicts(data: dict) -> list[Verdict]:
    rows = {r["arch"]: r for r in data["table"]}
    res = [r for r in rows.values() if "blocks_raised" in r]
    plain = [r for a, r in rows.items() if not a.startswith("resnet-")]
    out = []
    if res:
        raised = np.mean([r["blocks_raised"] for r in res])
        out.append(
            Verdict(
                "Skip connections raise the dilution of each block (residual trick)",
                raised == 1.0,
                f"k of the block > k of its branch alone in {100 * raised:.0f}% of blocks; "
                + "; ".join(
                    f"{r['arch']}: median k block {r['median_k_block']:.2f} vs branch "
                    f"{r['median_k_branch']:.2f} (skip/branch {r['median_k_skip']:.2f})"
                    for r in res
                ),
                claims=("P5",),
            )
        )
    calm = [
        r for r in plain if r["rate"] <= EXPLODING_RATE and r["output_cosine"] > COLLAPSED_COSINE
    ]
    wild = [r for r in plain if r["rate"] > EXPLODING_RATE]
    if calm and wild:
        k_calm = float(np.median([r["median_k_lstsq"] for r in calm]))
        k_wild = float(np.median([r["median_k_lstsq"] for r in wild]))
        out.append(
            Verdict(
                "The families that avoid exploding gradients with a collapsed domain are the "
                "pseudo-linear ones (high dilution k)",
                min(r["median_k_lstsq"] for r in calm) > max(r["median_k_lstsq"] for r in wild),
                f"median k per layer {k_calm:.2f} for "
                f"{', '.join(r['arch'] for r in calm)} (rate <= {EXPLODING_RATE}, output cosine "
                f"> {COLLAPSED_COSINE}) vs {k_wild:.2f} for the {len(wild)} exploding families "
                f"({', '.join(_named_k(r) for r in wild)})",
                claims=("P3", "P5"),
            )
        )
    pred = [r for r in rows.values() if "prediction_error" in r]
    if pred:
        err_res = [r["prediction_error"] for r in pred if r["arch"].startswith("resnet-")]
        err_plain = [r["prediction_error"] for r in pred if not r["arch"].startswith("resnet-")]
        out.append(
            Verdict(
                "Diluting the remainder by k reduces the GSC as (k^2 GSC_S^2 + GSC_rho^2) / "
                "(k^2 + 1) predicts",
                bool(err_res) and max(err_res) < 0.05,
                f"median |predicted / measured - 1| per unit: ResNet blocks "
                f"{', '.join(f'{e:.3f}' for e in err_res)}; plain layers "
                f"{', '.join(f'{e:.3f}' for e in err_plain)} (S = E[J])",
                claims=("P5",),
            )
        )
    if res:
        worst = max(data["profiles"][r["arch"]]["skip_equals_arriving"] for r in res)
        out.append(
            Verdict(
                "The add node passes the gradient unchanged through the skip; the branch adds "
                "a smaller, nearly orthogonal part",
                worst < 1e-5 and all(r["median_branch_ratio"] < 1 for r in res),
                f"||skip part|| = ||arriving gradient|| to {worst:.1e}; "
                + "; ".join(
                    f"{r['arch']}: ||branch|| / ||skip|| {r['median_branch_ratio']:.3f}, "
                    f"|cos| {r['median_abs_cosine']:.3f}"
                    for r in res
                ),
                claims=("D3.1",),
            )
        )
        pairs = [(r, rows.get(r["arch"].removeprefix("resnet-"))) for r in res]
        pairs = [(r, p) for r, p in pairs if p is not None]
        wild_pairs = [(r, p) for r, p in pairs if p["rate"] > EXPLODING_RATE]
        if wild_pairs:
            out.append(
                Verdict(
                    "A large gradient through the skip makes explosion worse (ResNet GSC above "
                    "the exploding plain net's)",
                    all(r["gsc_input_output"] > p["gsc_input_output"] for r, p in wild_pairs),
                    "GSC(L, 0) ResNet vs plain, where the plain family explodes: "
                    + "; ".join(_pair(r, p) for r, p in wild_pairs)
                    + "; where it does not: "
                    + (
                        "; ".join(_pair(r, p) for r, p in pairs if (r, p) not in wild_pairs)
                        or "none"
                    )
                    + ". The skip part equals the arriving gradient, and the branch part is nearly "
                    "orthogonal to it, so a block grows the gradient by about sqrt(1 + ratio^2)",
                    claims=("D1.2",),
                )
            )
    return out


ANALYSIS = Analysis(
    name="residual_trick",
    title="The residual trick: dilution of every layer and the add node",
    claim="Any network is a residual network: each layer is a linear part plus a "
    "nonlinear remainder, and its dilution k = Q||Sv|| / Q||rho|| pulls its GSC towards "
    "the linear part's. Skip connections raise k. The families that avoid exploding "
    "gradients are pseudo-linear (Philipp et al., arXiv 1712.05577). At every block the "
    "add node sends the gradient unchanged through the skip and a modified part through "
    "the branch (discussion 3).",
    sizes=SIZES,
    configs=configs,
    compute=compute,
    summarize=summarize,
    plot=plot,
    verdicts=verdicts,
    notes="k of plain layers: S fitted by least squares to the recorded inputs and outputs "
    "(fit_factor x width samples, rows of batches for batch norm). k of blocks and the GSC "
    "prediction: S = E[J] over jac_samples inputs. The paper's full text was not available: "
    "the fitting rule for S is this project's choice (see jacobian_lab/dilution.py).",
)

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
