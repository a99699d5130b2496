"""Theory beside measurement: a validation table of mean-field and free-probability
predictions against measured Jacobians, over activations, weights, depths and widths.

    python analyses/theory_validation.py [--size tiny|small|paper] [--widths 64 256]

Rows (``<out>/theory_validation/theory_validation.csv``):

* ``mean_sq`` and ``norm_var``: the mean and the normalized variance (var / mean^2) of the
  squared singular values of the input-output Jacobian, for linear / ReLU / tanh MLPs with
  Gaussian or orthogonal weights, against :func:`jacobian_lab.jacobian_moments` (free
  probability with the length-map transient);
* ``q``: the pre-activation variance of the last layer against the length map
  (:func:`jacobian_lab.meanfield.length_sequence`);
* ``ks_distance``: the Kolmogorov-Smirnov distance between measured sigma^2 of networks
  whose inputs sit at q* and :func:`jacobian_lab.jacobian_spectral_density` (z = 3 at the
  95% critical value of an i.i.d. sample of that size);
* ``gsc_rate``: the fitted per-layer growth of GSC(k, 0) of the GSC paper's plain families
  (no norm and layer norm) against :func:`jacobian_lab.gsc_growth_rate` and the transient-
  aware profile :func:`jacobian_lab.meanfield.gsc_profile`; of batch-norm MLPs at several
  batch sizes against :func:`jacobian_lab.meanfield.batchnorm_gsc_profile` (Yang et al.,
  arXiv 1902.08129); of ResNets (rate per dense layer, fitted over the blocks) against
  :func:`jacobian_lab.meanfield.residual_gsc_profile` (the Pythagorean equation per block).
  Both fit the predicted profile exactly as the measured one.

Each row has the Monte-Carlo standard error (over seeds) and the discrepancy in units of
it, z. A row *agrees* when |z| <= 3; otherwise it is a *finite-width* deviation when its
deviation falls from the smallest to the largest width by more than twice the standard
error of that fall; *chance* when |z| is within the family-wise 5% bound for the table's
number of rows (3.46 for 94 rows: among many true predictions a few exceed 3); and
*disagrees* if none of these holds.
"""

from __future__ import annotations

from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import norm

import jacobian_lab as jl
from jacobian_lab import meanfield
from jacobian_lab.experiments.constants import SIGMA_W, gaussian_inputs
from jacobian_lab.experiments.gsc_across_depth import theory_profile
from jacobian_lab.experiments.report import Analysis, Verdict, script_main
from jacobian_lab.plot import OKABE_ITO, STYLE, save_figure, series_style

Q_SETTINGS = {"tanh": (1.5, 0.3), "relu": (SIGMA_W["relu"], 0.3), "erf": (1.5, 0.3)}
DENSITY_SETTINGS = {  # (activation, weights): (sigma_w, sigma_b, depth), inputs at q*
    ("tanh", "orthogonal"): (1.2, 0.1, 4),
    ("tanh", "gaussian"): (1.2, 0.1, 4),
}
LOG10_LAMBDA_BINS = np.linspace(-4.0, 2.0, 49)
GSC_FAMILIES = ["relu", "layer-relu", "tanh", "layer-tanh", "selu", "layer-selu"]
BATCH_FAMILIES = ["batch-relu", "batch-tanh", "batch-selu"]
RESNET_FAMILIES = ["resnet-tanh", "resnet-batch-relu"]
RESNET_BATCH = 8
"""Batch size of the batch-norm ResNet rows (the plain rows use 2 inputs per seed)."""
LAMBDA_BINS = {1: np.linspace(0, 4.5, 31), 4: np.linspace(0, 12, 41)}
Z_AGREE = 3.0

SIZES = {
    "tiny": {
        "depths": [1, 4],
        "widths": [16, 48],
        "seeds": 3,
        "batch": 2,
        "gsc_depth": 8,
        "q_depth": 6,
        "batch_sizes": [8],
        "bn_depth": 8,
        "bn_seeds": 3,
        "batch_families": ["batch-relu"],
        "resnet_families": [],  # gsc_across_depth's tiny run draws ResNet theory
        "gsc_families": ["relu", "layer-tanh"],  # seconds: the others at small size
    },
    "small": {
        "depths": [1, 4, 16],
        "widths": [64, 256],
        "seeds": 8,
        "batch": 2,
        "gsc_depth": 50,
        "q_depth": 20,
        "batch_sizes": [8, 16],
        "bn_depth": 20,
        "bn_seeds": 12,
        "batch_families": BATCH_FAMILIES,
        "resnet_families": RESNET_FAMILIES,
    },
    "paper": {
        "depths": [1, 4, 16, 64],
        "widths": [64, 256, 1024],
        "seeds": 8,
        "batch": 2,
        "gsc_depth": 50,
        "q_depth": 30,
        "batch_sizes": [8, 32, 128],
        "bn_depth": 50,
        "bn_seeds": 16,
        "batch_families": BATCH_FAMILIES,
        "resnet_families": RESNET_FAMILIES,
    },
}
for _cfg in SIZES.values():
    _cfg |= {
        "activations": ["linear", "relu", "tanh"],
        "inits": ["gaussian", "orthogonal"],
        "dtype": "float32",
    }


def configs(config: dict) -> list[dict]:
    if config["seeds"] < 2:
        raise ValueError("theory_validation needs seeds >= 2 for its standard errors")
    common = {k: config[k] for k in ("seeds", "batch", "dtype")}
    units = [
        {
            "kind": "spectrum",
            "activation": a,
            "init": i,
            "width": w,
            "depths": config["depths"],
            **common,
        }
        for w in config["widths"]
        for a in config["activations"]
        for i in config["inits"]
    ]
    units += [
        {"kind": "q", "activation": a, "width": w, "depth": config["q_depth"], **common}
        for w in config["widths"]
        for a in Q_SETTINGS
    ]
    units += [
        {"kind": "density", "activation": a, "init": i, "width": w, **common}
        for w in config["widths"]
        for a, i in DENSITY_SETTINGS
    ]
    # A fitted GSC rate has a heavy-tailed seed-to-seed spread (16 seeds at width 256 gave
    # means from 1.033 to 1.047 for layer-selu, whose theory is 1.035): four times the seeds.
    gsc_common = {**common, "seeds": 4 * config["seeds"]}
    units += [
        {"kind": "gsc", "arch": f, "width": w, "depth": config["gsc_depth"], **gsc_common}
        for w in config["widths"]
        for f in config.get("gsc_families", GSC_FAMILIES)
    ]
    # batch norm: one sample is a batch; its rate's seed-to-seed spread is largest at small
    # batches (standard error 0.004 over 8 seeds at batch 8, width 64), hence bn_seeds;
    # matrix-free GSC (dense Jacobians are B * width wide)
    units += [
        {
            "kind": "gsc",
            "arch": f,
            "width": w,
            "depth": config["bn_depth"],
            **common,
            "seeds": config["bn_seeds"],
            "batch": B,
        }
        for w in config["widths"]
        for B in config["batch_sizes"]
        for f in config["batch_families"]
    ]
    units += [
        {
            "kind": "gsc",
            "arch": f,
            "width": w,
            "depth": config["gsc_depth"],
            **common,
            "batch": RESNET_BATCH if "batch" in f else common["batch"],
        }
        for w in config["widths"]
        for f in config["resnet_families"]
    ]
    return units


def _inputs(unit: dict, dim: int, dtype) -> jax.Array:
    return gaussian_inputs(jax.random.PRNGKey(1), (unit["batch"], dim), dtype)


def _seeds(unit: dict):
    return jax.random.split(jax.random.PRNGKey(0), unit["seeds"])


def _spectrum(unit: dict) -> dict:
    depths = sorted(set(unit["depths"]))
    act, width = unit["activation"], unit["width"]
    net = jl.mlp(
        max(depths), width, act, weight_init=unit["init"], sigma_w=SIGMA_W[act], dtype=unit["dtype"]
    )
    x = _inputs(unit, width, net.dtype)
    per_seed_mean, per_seed_var, lams = [], [], []
    for k in _seeds(unit):  # seeds in a loop: one compile
        lam = np.asarray(jl.prefix_singular_values(net, net.init(k), x, depths), float) ** 2
        m = lam.mean(-1)  # (batch, depths)
        per_seed_mean.append(m.mean(0))
        per_seed_var.append((lam.var(-1) / m**2).mean(0))
        lams.append(lam)
    lam = np.concatenate(lams)  # (seeds * batch, depths, width)
    q1 = SIGMA_W[act] ** 2 * float(np.mean(np.asarray(x, float) ** 2))
    mean, var = jl.jacobian_moments(act, SIGMA_W[act], 0.0, max(depths), unit["init"], q1=q1)
    out = {
        "depths": depths,
        "measured_mean": np.mean(per_seed_mean, 0).tolist(),
        "se_mean": (np.std(per_seed_mean, 0, ddof=1) / np.sqrt(unit["seeds"])).tolist(),
        "measured_norm_var": np.mean(per_seed_var, 0).tolist(),
        "se_norm_var": (np.std(per_seed_var, 0, ddof=1) / np.sqrt(unit["seeds"])).tolist(),
        "predicted_mean": [float(mean[D - 1]) for D in depths],
        "predicted_norm_var": [float(var[D - 1] / mean[D - 1] ** 2) for D in depths],
    }
    if act == "linear" and unit["init"] == "gaussian":
        out["histograms"] = {
            str(D): np.histogram(lam[:, j].ravel(), bins=LAMBDA_BINS[D], density=True)[0].tolist()
            for j, D in enumerate(depths)
            if D in LAMBDA_BINS
        }
    return out


def _q(unit: dict) -> dict:
    act = unit["activation"]
    sigma_w, sigma_b = Q_SETTINGS[act]
    net = jl.mlp(
        unit["depth"], unit["width"], act, sigma_w=sigma_w, sigma_b=sigma_b, dtype=unit["dtype"]
    )
    x = _inputs(unit, unit["width"], net.dtype)
    measured = [
        float(np.mean(np.asarray(net.preactivations(net.init(k), x)[0], float) ** 2))
        for k in _seeds(unit)
    ]
    q1 = sigma_w**2 * float(np.mean(np.asarray(x, float) ** 2)) + sigma_b**2
    q = meanfield.length_sequence(act, q1, sigma_w, sigma_b, unit["depth"])
    return {
        "measured": float(np.mean(measured)),
        "se": float(np.std(measured, ddof=1) / np.sqrt(unit["seeds"])),
        "predicted": float(q[-1]),
    }


def _gsc(unit: dict) -> dict:
    net = jl.architecture(
        unit["arch"], depth=unit["depth"], width=unit["width"], dtype=unit["dtype"]
    )
    x = _inputs(unit, net.input_dim, net.dtype)
    if net.norm == "batch" or net.residual:
        g = jl.gsc_over_seeds(net, _seeds(unit), x, method="matrix_free", num_probes=4)
        g = np.asarray(g.mean(axis=1), float)
        theory = theory_profile(net, np.asarray(x, float))
        if net.residual:  # per dense layer, fitted over the blocks (the stem left out)
            g, theory = g[:, :-1], theory[:-1]
        per = max(net.block_layers, 1)
        rates = np.asarray(jl.growth_rate(g).rate, float) ** (1 / per)
        return {
            "measured": float(rates.mean()),
            "se": float(rates.std(ddof=1) / np.sqrt(len(rates))),
            "predicted": float(np.asarray(jl.growth_rate(theory).rate)) ** (1 / per),
        }
    g = np.asarray(jl.gsc_over_seeds(net, _seeds(unit), x).mean(axis=1), float)  # (seeds, L+1)
    rates = np.asarray(jl.growth_rate(g).rate, float)
    if net.norm == "layer":
        predicted = float(jl.gsc_growth_rate(net.activation, net.sigma_w, net.sigma_b, "layer"))
    else:
        q1 = net.sigma_w**2 * float(np.mean(np.asarray(x, float) ** 2)) + net.sigma_b**2
        profile = meanfield.gsc_profile(
            net.activation, net.sigma_w, net.sigma_b, net.num_layers, q1
        )
        predicted = float(np.asarray(jl.growth_rate(profile).rate))
    return {
        "measured": float(rates.mean()),
        "se": float(rates.std(ddof=1) / np.sqrt(len(rates))),
        "predicted": predicted,
    }


def _density(unit: dict) -> dict:
    """Measured sigma^2 of a network whose inputs sit at the fixed point q*, against the
    free-probability density: KS distance and histograms of log10 sigma^2."""
    act, init, width = unit["activation"], unit["init"], unit["width"]
    sw, sb, depth = DENSITY_SETTINGS[(act, init)]
    q_star = float(jl.mean_field(act, sw, sb).q_star)
    net = jl.mlp(depth, width, act, weight_init=init, sigma_w=sw, sigma_b=sb, dtype=unit["dtype"])
    x = _inputs(unit, width, net.dtype)
    x = (
        x
        / jax.numpy.linalg.norm(x, axis=1, keepdims=True)
        * np.sqrt(width * (q_star - sb**2) / sw**2)
    )
    lam = np.sort(
        np.concatenate(
            [
                np.asarray(
                    jl.singular_values(jl.input_output_jacobian(net, net.init(k), x)), float
                ).ravel()
                ** 2
                for k in _seeds(unit)
            ]
        )
    )
    grid = np.geomspace(1e-6, 1.5 * lam.max(), 1500)  # float32 resolves sigma^2 above ~1e-6
    density = jl.jacobian_spectral_density(act, sw, sb, depth, grid, init, q=q_star)
    ks = jl.random_matrix.ks_distance(lam, grid, jl.random_matrix.cdf_from_density(grid, density))
    centres = 10 ** (0.5 * (LOG10_LAMBDA_BINS[1:] + LOG10_LAMBDA_BINS[:-1]))
    theory = jl.jacobian_spectral_density(act, sw, sb, depth, centres, init, q=q_star)
    return {
        "setting": f"{act}, {init}, sigma_w {sw}, sigma_b {sb}, depth {depth}, at q*",
        "ks": ks,
        "eigenvalues": int(lam.size),
        "measured_log10_density": np.histogram(
            np.log10(np.maximum(lam, 1e-30)), bins=LOG10_LAMBDA_BINS, density=True
        )[0].tolist(),
        "theory_log10_density": (theory * centres * np.log(10)).tolist(),
    }


def compute(unit: dict) -> dict:
    kinds = {"spectrum": _spectrum, "q": _q, "gsc": _gsc, "density": _density}
    return kinds[unit["kind"]](unit)


def _rows(records: list[dict]) -> list[dict]:
    rows = []
    for rec in records:
        c, r = rec["config"], rec["result"]
        if c["kind"] == "spectrum":
            for j, D in enumerate(r["depths"]):
                setting = f"{c['activation']}, {c['init']}, depth {D}"
                rows.append(
                    _row(
                        "mean_sq",
                        setting,
                        c["width"],
                        r["predicted_mean"][j],
                        r["measured_mean"][j],
                        r["se_mean"][j],
                        c["dtype"],
                    )
                )
                rows.append(
                    _row(
                        "norm_var",
                        setting,
                        c["width"],
                        r["predicted_norm_var"][j],
                        r["measured_norm_var"][j],
                        r["se_norm_var"][j],
                        c["dtype"],
                    )
                )
        elif c["kind"] == "density":
            # z = 3 at the 95% Kolmogorov-Smirnov critical value of i.i.d. samples of this
            # size; eigenvalues repel, so this band is wider than their actual scatter
            band = 1.36 / np.sqrt(r["eigenvalues"]) / Z_AGREE
            rows.append(
                _row("ks_distance", r["setting"], c["width"], 0.0, r["ks"], band, c["dtype"])
            )
        elif c["kind"] == "q":
            sw, sb = Q_SETTINGS[c["activation"]]
            setting = f"{c['activation']}, sigma_w {sw:.3g}, sigma_b {sb}, layer {c['depth']}"
            rows.append(
                _row("q", setting, c["width"], r["predicted"], r["measured"], r["se"], c["dtype"])
            )
        else:
            batch = f", batch {c['batch']}" if c["arch"].startswith("batch-") else ""
            setting = f"{c['arch']}{batch}, depth {c['depth']}"
            rows.append(
                _row(
                    "gsc_rate",
                    setting,
                    c["width"],
                    r["predicted"],
                    r["measured"],
                    r["se"],
                    c["dtype"],
                )
            )
    return rows


ROUNDING = {"float32": 1e-5, "float64": 1e-12}
"""Floor on the standard error, relative to max(|prediction|, 1): float rounding through the
layers. It matters only for exact laws (orthogonal linear networks), measured without
Monte-Carlo scatter."""


def _row(quantity, setting, width, predicted, measured, se, dtype) -> dict:
    dev = measured - predicted
    scale = max(abs(predicted), 1e-12)
    se = max(se, ROUNDING[dtype] * max(abs(predicted), 1.0))
    z = dev / se
    return {
        "quantity": quantity,
        "setting": setting,
        "width": width,
        "predicted": predicted,
        "measured": measured,
        "se": se,
        "z": float(z),
        "relative_deviation": dev / scale,
    }


def family_z(n_rows: int) -> float:
    """|z| that one of ``n_rows`` true predictions exceeds with probability 5% (two-sided
    Bonferroni): 3.46 for 94 rows. Beyond |z| = 3 but within it, a row is what chance gives
    among many rows (0.27% each: 0.25 expected in 94)."""
    return float(norm.isf(0.025 / max(n_rows, 1)))


def _status(rows: list[dict]) -> None:
    """Label each row: agrees (|z| <= 3), finite width (the deviation shrinks with width),
    chance (|z| within :func:`family_z`) or disagrees."""
    z_family = family_z(len(rows))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["quantity"], r["setting"]), []).append(r)
    for group in groups.values():
        group.sort(key=lambda r: r["width"])
        # the deviation must fall from the smallest to the largest width by more than twice
        # the standard error of that fall, so seed noise alone rarely earns the label
        small, large = group[0], group[-1]
        fall = abs(small["measured"] - small["predicted"]) - abs(
            large["measured"] - large["predicted"]
        )
        shrinking = len(group) > 1 and fall > 2 * np.hypot(small["se"], large["se"])
        for r in group:
            if abs(r["z"]) <= Z_AGREE:
                r["status"] = "agrees"
            elif shrinking:
                r["status"] = "finite width"
            elif abs(r["z"]) <= z_family:
                r["status"] = "chance"
            else:
                r["status"] = "disagrees"


def summarize(config: dict, records: list[dict]) -> dict:
    table = _rows(records)
    _status(table)
    width = max(config["widths"])
    hist = next(
        (
            rec["result"]["histograms"]
            for rec in records
            if rec["config"]["kind"] == "spectrum"
            and "histograms" in rec["result"]
            and rec["config"]["width"] == width
        ),
        {},
    )
    overlays = []
    for D, h in hist.items():  # Gaussian linear: Marchenko-Pastur (depth 1), Fuss-Catalan
        bins = LAMBDA_BINS[int(D)]
        x = np.linspace(bins[0] + 1e-3, bins[-1], 400)
        overlays.append(
            {
                "title": f"Gaussian linear, depth {D}",
                "xlabel": "sigma^2",
                "bins": bins.tolist(),
                "measured": h,
                "theory_x": x.tolist(),
                "theory": jl.fuss_catalan_density(int(D), x).tolist(),
                "theory_label": "Marchenko-Pastur" if D == "1" else f"Fuss-Catalan, L = {D}",
            }
        )
    for rec in records:
        c, r = rec["config"], rec["result"]
        if c["kind"] == "density" and c["width"] == width:
            centres = 0.5 * (LOG10_LAMBDA_BINS[1:] + LOG10_LAMBDA_BINS[:-1])
            overlays.append(
                {
                    "title": r["setting"].split(", sigma_w")[0] + ", at q*",
                    "xlabel": "log10 sigma^2",
                    "bins": LOG10_LAMBDA_BINS.tolist(),
                    "measured": r["measured_log10_density"],
                    "theory_x": centres.tolist(),
                    "theory": r["theory_log10_density"],
                    "theory_label": "free probability",
                }
            )
    return {"table": table, "overlays": overlays, "overlay_width": width}


def plot(data: dict, folder: Path, formats) -> list[Path]:
    paths = []
    table = data["table"]
    widths = sorted({r["width"] for r in table})
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(6.75, 2.4))
        for ax, quantity, title in zip(
            axes,
            ("mean_sq", "norm_var", "gsc_rate"),
            ("(a) mean of sigma^2", "(b) var / mean^2 of sigma^2", "(c) GSC rate per dense layer"),
            strict=True,
        ):
            for i, w in enumerate(widths):
                rows = [r for r in table if r["quantity"] == quantity and r["width"] == w]
                if not rows:
                    continue
                ax.errorbar(
                    [r["predicted"] for r in rows],
                    [r["measured"] for r in rows],
                    yerr=[r["se"] for r in rows],
                    fmt="o",
                    ms=2.5,
                    capsize=1,
                    color=series_style(i + 4)["color"],
                    label=f"width {w}",
                )
            values = [
                v
                for r in table
                if r["quantity"] == quantity
                for v in (r["predicted"], r["measured"])
            ]
            if not values:
                continue
            lo, hi = min(values), max(values)
            if quantity == "mean_sq":
                ax.set_xscale("log")
                ax.set_yscale("log")
                lims = [lo / 1.5, hi * 1.5]
            elif quantity == "norm_var":  # orthogonal linear sits at 0: linear near 0
                ax.set_xscale("symlog", linthresh=0.1)
                ax.set_yscale("symlog", linthresh=0.1)
                lims = [0.0, hi * 1.5]
            else:
                pad = 0.1 * (hi - lo)
                lims = [lo - pad, hi + pad]
            ax.plot(lims, lims, ":", color=OKABE_ITO[0], lw=0.8)
            ax.set_xlim(lims)
            ax.set_ylim(lims)
            ax.set_xlabel("predicted")
            ax.set_ylabel("measured")
            ax.set_title(title, fontsize=8)
            ax.legend(frameon=False)
        fig.tight_layout()
        paths += save_figure(fig, folder / "theory_vs_measured", formats)

        overlays = data["overlays"]
        if overlays:
            fig, axes = plt.subplots(
                1, len(overlays), figsize=(1.7 * len(overlays), 2.2), squeeze=False
            )
            for ax, o in zip(axes[0], overlays, strict=True):
                ax.stairs(
                    o["measured"],
                    o["bins"],
                    color=OKABE_ITO[5],
                    fill=True,
                    alpha=0.4,
                    label=f"measured, width {data['overlay_width']}",
                )
                ax.plot(
                    o["theory_x"], o["theory"], color=OKABE_ITO[0], lw=0.9, label=o["theory_label"]
                )
                ax.set_yscale("log")
                ax.set_ylim(1e-3, None)
                ax.set_xlabel(o["xlabel"])
                ax.set_title(o["title"], fontsize=6)
                ax.legend(frameon=False, fontsize=4.5, loc="lower center")
            axes[0, 0].set_ylabel("density")
            fig.tight_layout()
            paths += save_figure(fig, folder / "spectrum_overlays", formats)
    return paths


def verdicts(data: dict) -> list[Verdict]:
    table = data["table"]
    counts = {
        s: sum(r["status"] == s for r in table)
        for s in ("agrees", "finite width", "chance", "disagrees")
    }
    chance = [
        f"{r['quantity']} ({r['setting']}, width {r['width']}, z = {r['z']:.2f})"
        for r in table
        if r["status"] == "chance"
    ]
    bad = sorted({f"{r['quantity']} ({r['setting']})" for r in table if r["status"] == "disagrees"})
    out = [
        Verdict(
            "Every prediction agrees with its measurement, or deviates less at larger width",
            counts["disagrees"] == 0,
            f"{counts['agrees']} of {len(table)} rows agree (|z| <= 3), "
            f"{counts['finite width']} are finite-width deviations that shrink with width, "
            f"{counts['chance']} lie between 3 and the family-wise 5% bound |z| = "
            f"{family_z(len(table)):.2f}"
            + (f" ({'; '.join(chance)})" if chance else "")
            + f", {counts['disagrees']} disagree"
            + (f": {'; '.join(bad)}" if bad else ""),
        )
    ]
    rates = [r for r in table if r["quantity"] == "gsc_rate"]
    plain = [r for r in rates if not r["setting"].startswith(("batch-", "resnet-"))]
    if plain:
        w = max(r["width"] for r in plain)
        worst = max(
            (r for r in plain if r["width"] == w), key=lambda r: abs(r["relative_deviation"])
        )
        out.append(
            Verdict(
                "Mean field predicts the GSC growth of plain MLPs without batch norm",
                abs(worst["relative_deviation"]) < 0.02,
                f"largest relative deviation of the per-layer rate at width {w}: "
                f"{100 * worst['relative_deviation']:.2f}% ({worst['setting']}: predicted "
                f"{worst['predicted']:.4f}, measured {worst['measured']:.4f} +- "
                f"{worst['se']:.4f})",
            )
        )
    for prefix, claim, ids in (
        (
            "batch-",
            "Batch-norm mean field (Yang et al. 1902.08129) predicts the GSC growth of "
            "batch-normalized MLPs at every batch size",
            (),
        ),
        (
            "resnet-",
            "Mean-field residual theory (the Pythagorean equation per block) predicts the GSC "
            "growth of ResNets",
            ("P4",),
        ),
    ):
        group = [r for r in rates if r["setting"].startswith(prefix)]
        if not group:
            continue
        w = max(r["width"] for r in group)
        wide = [r for r in group if r["width"] == w]
        statuses = {st: sum(r["status"] == st for r in group) for st in ("agrees", "finite width")}
        bad = [r for r in group if r["status"] == "disagrees"]
        out.append(
            Verdict(
                claim,
                not bad,
                f"{statuses['agrees']} of {len(group)} rows agree (|z| <= 3), "
                f"{statuses['finite width']} deviate less at larger width, {len(bad)} disagree; "
                f"at width {w}: "
                + "; ".join(
                    f"{r['setting'].rsplit(', depth', 1)[0]} {r['measured']:.4f} +- "
                    f"{r['se']:.4f} vs {r['predicted']:.4f}"
                    for r in wide
                ),
                claims=ids,
            )
        )
    return out


ANALYSIS = Analysis(
    name="theory_validation",
    title="Theory beside measurement: mean-field and free-probability predictions",
    claim="Wide random networks follow mean-field signal propagation (length map, chi_1) and "
    "free probability (moments of the Jacobian spectrum), with finite-width deviations that "
    "shrink as the width grows (Poole et al. 1606.05340; Schoenholz et al. 1611.01232; "
    "Pennington et al. 1711.04735).",
    sizes=SIZES,
    configs=configs,
    compute=compute,
    summarize=summarize,
    plot=plot,
    verdicts=verdicts,
    notes="Standard errors are over seeds (examples of one seed share its weights; a "
    "batch-norm sample is a whole batch). The spectrum moments use the length-map transient "
    "from the inputs' measured length. Batch-norm and ResNet GSC are matrix-free (4 probes "
    "per seed); their predicted profiles include the transients at both ends, and the "
    "batch-norm theory's finite-width corrections grow with batch size / width. The batch-"
    "norm rate was derived here under the paper's assumptions (its full text could not be "
    "read); see jacobian_lab.meanfield.batchnorm_mean_field.",
)

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
