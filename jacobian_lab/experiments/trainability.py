"""Does the GSC at initialization matter for training? Trainability on real data.

    python analyses/trainability.py [--size tiny|small|paper] [--depths ...] [--data FILE.npz]

Every GSC-paper family (:mod:`jacobian_lab.zoo`) at several depths is trained with
:func:`jacobian_lab.train` on scikit-learn's handwritten digits (shipped with the package,
:func:`jacobian_lab.digits`; ``--data FILE.npz`` for any other set, ``--data gaussian`` for
Gaussian inputs labelled by a random linear teacher) with SGD and with Adam, each at a
small sweep of learning rates, a few seeds each, for a fixed number of mini-batch steps.
All runs of one family and depth (both optimizers, every learning rate and seed) are one
``vmap`` over one compiled program. The model's input layer takes the data's features
(the stem of a ResNet, the first dense layer of an MLP); a trained zero-initialized linear
readout maps the model's output ``f_0`` to the 10 classes (:mod:`jacobian_lab.training`).

Measured per family, depth and optimizer, at the best learning rate (the lowest median
final training loss over seeds, so that no family is judged at a bad learning rate):
the training loss after the budget against ``GSC(L, 0)`` at initialization (exact, mean over
16 training inputs) as a Spearman rank correlation over all
families and depths; the GSC profile during training; per-layer gradient norms and
relative update sizes (figure ``update_ratios``: per layer, a few steps in); and an
effective depth.

**Effective depth (reconstructed).** The GSC paper defines an effective depth from its
"residual trick" (arXiv 1712.05577; the full text could not be read here, see
``/work/shared/reference/philipp_gsc.md``). This analysis runs instead the experiment the
issue describes from the paper's reviews: after training, replace the ``k`` layers
nearest the output by their first-order expansion in the weights around the initial
weights (:func:`jacobian_lab.linearized_outputs`; each layer still sees its actual input)
and measure the training error. The effective depth reported is ``L - k*``, with ``k*``
the largest ``k`` of the sweep whose training error exceeds the unmodified network's by at
most :data:`EFFECTIVE_DEPTH_TOLERANCE`: the number of layers (nearest the input) whose
trained change must be kept beyond first order. This is a reconstruction, not the
paper's definition.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter
from scipy import stats

import jacobian_lab as jl
from jacobian_lab.experiments.report import Analysis, Verdict, script_main
from jacobian_lab.gsc import stacked_draws
from jacobian_lab.plot import STYLE, plot_band, save_figure, series_style

EXPLODING_RATE = 1.02
"""A plain family explodes when ``GSC(L, 0)^(1/L)`` at initialization exceeds this (the
threshold of :mod:`jacobian_lab.experiments.gsc_across_depth`)."""

EFFECTIVE_DEPTH_TOLERANCE = 0.02
"""Training-error increase (absolute, fraction of examples) allowed by the linearization."""

CLAIMS = ("P2",)

_SMALL_ARCHS = [
    "relu",
    "batch-relu",
    "layer-tanh",
    "resnet-relu",
    "resnet-batch-relu",
    "resnet-layer-tanh",
]
SIZES = {
    "tiny": {
        "archs": ["layer-tanh", "resnet-layer-tanh"],
        "depths": [6],
        "widths": [8],
        "seeds": 2,
        "steps": 20,
        "batch": 32,
        "lrs": {"sgd": [0.1, 1.0], "adam": [0.01]},
    },
    "small": {
        "archs": _SMALL_ARCHS,
        "depths": [10, 30],
        "widths": [32],
        "seeds": 2,
        "steps": 300,
        "batch": 64,
        "lrs": {"sgd": [0.03, 0.3, 3.0], "adam": [3e-4, 3e-3, 3e-2]},
    },
    "paper": {
        "archs": list(jl.paper_architectures(depth=4, width=4)),
        "depths": [10, 26, 50],
        "widths": [100],
        "seeds": 3,
        "steps": 2000,
        "batch": 128,
        "lrs": {"sgd": [0.01, 0.03, 0.1, 0.3, 1.0], "adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]},
    },
}
for _cfg in SIZES.values():
    _cfg.update({"data": None, "gsc_samples": 16, "gsc_probes": 8, "dtype": "float32"})


def load_data(spec: str | None) -> jl.Dataset:
    """The data of a config: ``None`` the shipped digits, ``"gaussian"`` Gaussian inputs
    (64 features, 10 classes, a random linear teacher), otherwise an ``.npz`` file. Inputs
    are flattened to feature vectors (the families are MLPs)."""
    if spec is None:
        data = jl.digits()
    elif spec == "gaussian":
        data = jl.gaussian_data(jax.random.PRNGKey(20_000), num_train=1437, num_test=360)
    else:
        data = jl.load_npz(spec)
    flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
    return data._replace(x_train=flat(data.x_train), x_test=flat(data.x_test))


def _fingerprint(spec: str | None) -> str | None:
    if spec in (None, "gaussian"):
        return spec
    return hashlib.sha256(Path(spec).read_bytes()).hexdigest()[:16]


def configs(config: dict) -> list[dict]:
    if any(a.startswith("resnet-") for a in config["archs"]) and any(
        d % 2 for d in config["depths"]
    ):
        raise ValueError(
            f"trainability needs even depths: a ResNet of depth D has D/2 two-layer blocks, "
            f"got {config['depths']}"
        )
    load_data(config["data"])  # a bad --data file fails before any work
    data = {"data": config["data"], "data_sha256": _fingerprint(config["data"])}
    keep = ("seeds", "steps", "batch", "lrs", "gsc_samples", "gsc_probes", "dtype")
    return [
        {
            "arch": a,
            "depth": d,
            "width": w,
            **{k: config[k] for k in keep},
            **data,
            "effective_depth": d == max(config["depths"]),
        }
        for d in config["depths"]
        for w in config["widths"]
        for a in config["archs"]
    ]


def compute(unit: dict) -> dict:
    data = load_data(unit["data"])
    net = jl.architecture(
        unit["arch"], depth=unit["depth"], width=unit["width"], dtype=unit["dtype"]
    )
    net = dataclasses.replace(net, in_dim=data.x_train.shape[1])
    seeds = unit["seeds"]
    init_keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    init = stacked_draws(net.init, init_keys)
    runs = [(o, lr, s) for o, lrs in unit["lrs"].items() for lr in lrs for s in range(seeds)]
    pick = np.array([s for _, _, s in runs])
    params = jax.tree_util.tree_map(lambda a: a[pick], init)
    run_keys = jax.random.split(jax.random.PRNGKey(1), seeds)[pick]
    with warnings.catch_warnings():  # a learning-rate sweep diverges on purpose: counted
        warnings.filterwarnings("ignore", "training loss became inf or NaN", RuntimeWarning)
        h = jl.train_runs(
            net,
            params,
            data,
            keys=run_keys,
            learning_rates=[lr for _, lr, _ in runs],
            optimizer=[o for o, _, _ in runs],
            steps=unit["steps"],
            batch_size=min(unit["batch"], data.x_train.shape[0]),
            gsc_samples=unit["gsc_samples"],
            gsc_probes=unit["gsc_probes"],
        )
    f = lambda a: np.asarray(a, dtype=float).tolist()  # noqa: E731
    result = {
        "layers": net.num_layers,
        "steps": f(h.steps[0]),
        "runs": [{"optimizer": o, "lr": lr, "seed": s} for o, lr, s in runs],
        **{
            k: f(getattr(h, k))
            for k in (
                "train_loss",
                "train_accuracy",
                "test_loss",
                "test_accuracy",
                "gsc",
                "grad_norm",
                "update_ratio",
            )
        },
    }
    if unit["effective_depth"]:
        result["effective"] = _effective_depth(net, data, init, h, runs, unit)
    return result


def _effective_depth(net, data, init, h, runs, unit) -> dict:
    """Training error with the ``k`` layers nearest the output linearized in the weights,
    for the best learning rate of each optimizer, per seed (module docstring)."""
    L = net.num_layers
    ks = sorted({int(round(q * L)) for q in np.linspace(0, 1, 6)})
    masks = jnp.asarray([np.arange(L) < k for k in ks])
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    def errors(p0, p1, head, scale):
        def one(mask):
            f0 = jl.linearized_outputs(net, p0, p1, x, mask)
            z = scale * f0 @ head["W"] + head["b"]
            return 1.0 - jnp.mean(jnp.argmax(z, 1) == y)

        return jax.lax.map(one, masks)

    errors = jax.jit(jax.vmap(errors))
    out = {"ks": ks}
    final = np.asarray(h.train_loss)[:, -1]
    for opt, lrs in unit["lrs"].items():
        best = _best_lr(
            {lr: final[[i for i, r in enumerate(runs) if r[:2] == (opt, lr)]] for lr in lrs}
        )
        idx = np.array([i for i, r in enumerate(runs) if r[:2] == (opt, best)])
        take = lambda t, idx=idx: jax.tree_util.tree_map(lambda a: a[idx], t)  # noqa: E731
        seeds = np.array([runs[i][2] for i in idx])
        p0 = jax.tree_util.tree_map(lambda a, seeds=seeds: a[seeds], init)
        err = errors(p0, take(h.params), take(h.head), h.readout_scale[idx])
        out[opt] = {"lr": best, "train_error": np.asarray(err, dtype=float).tolist()}
    return out


def _best_lr(final_by_lr: dict) -> float:
    """The learning rate with the lowest median final loss over seeds (non-finite: worst)."""

    def score(v):
        v = np.asarray(v, dtype=float)
        return float(np.median(np.where(np.isfinite(v), v, np.inf)))

    return min(final_by_lr, key=lambda lr: (score(final_by_lr[lr]), lr))


def _finite(v) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in v], dtype=float)


def summarize(config: dict, records: list[dict]) -> dict:
    table, curves = [], {}
    for rec in records:
        c, r = rec["config"], rec["result"]
        L, steps = r["layers"], r["steps"]
        loss = np.array([_finite(v) for v in r["train_loss"]])
        gsc_L = np.array([[np.nan if g[-1] is None else g[-1] for g in run] for run in r["gsc"]])
        for opt, lrs in c["lrs"].items():
            of = {
                lr: [
                    i
                    for i, run in enumerate(r["runs"])
                    if (run["optimizer"], run["lr"]) == (opt, lr)
                ]
                for lr in lrs
            }
            best = _best_lr({lr: loss[i, -1] for lr, i in of.items()})
            i = of[best]
            g0 = gsc_L[i, 0]
            early = min(range(len(steps)), key=lambda t: abs(steps[t] - 0.05 * steps[-1]))
            row = {
                "architecture": c["arch"],
                "depth": c["depth"],
                "layers": L,
                "optimizer": opt,
                "best_lr": best,
                "gsc_init": float(np.exp(np.nanmean(np.log(g0)))),
                "gsc_rate_init": float(np.exp(np.nanmean(np.log(g0)) / L)),
                "final_train_loss": float(
                    np.median(np.where(np.isfinite(loss[i, -1]), loss[i, -1], np.inf))
                ),
                "final_train_loss_min": float(np.nanmin(loss[i, -1]))
                if np.isfinite(loss[i, -1]).any()
                else None,
                "final_train_loss_max": float(np.nanmax(loss[i, -1]))
                if np.isfinite(loss[i, -1]).any()
                else None,
                "final_train_accuracy": float(
                    np.median(_finite([r["train_accuracy"][j][-1] for j in i]))
                ),
                "final_test_accuracy": float(
                    np.median(_finite([r["test_accuracy"][j][-1] for j in i]))
                ),
                "diverged_runs": int(sum(not np.isfinite(loss[j, -1]) for j in i)),
                "early_step": steps[early],
                "gsc_ratio_early": float(np.nanmedian(gsc_L[i, early] / g0)),
                "gsc_ratio_final": float(np.nanmedian(gsc_L[i, -1] / g0)),
            }
            eff = r.get("effective", {}).get(opt)
            if eff:
                err = np.median(np.array(eff["train_error"]), axis=0)  # per k, over seeds
                ok = [
                    k
                    for k, e in zip(r["effective"]["ks"], err, strict=True)
                    if e <= err[0] + EFFECTIVE_DEPTH_TOLERANCE
                ]
                row["effective_depth"] = L - max(ok)
                curves.setdefault("effective", {})[f"{c['arch']}|{opt}"] = {
                    "ks": r["effective"]["ks"],
                    "layers": L,
                    "train_error": eff["train_error"],
                }
            table.append(row)
            curves.setdefault("loss", {})[f"{c['arch']}|{c['depth']}|{opt}"] = {
                "steps": steps,
                "train_loss": [list(loss[j]) for j in i],
                "gsc_ratio": [list(gsc_L[j] / gsc_L[j, 0]) for j in i],
                "lr": best,
                "update_step": steps[early],
                "update_ratio": [list(_finite(r["update_ratio"][j][early])) for j in i],
            }
    correlation = {}
    for opt in dict.fromkeys(row["optimizer"] for row in table):
        rows = [row for row in table if row["optimizer"] == opt]
        g = np.log([row["gsc_init"] for row in rows])
        final = np.array([row["final_train_loss"] for row in rows])
        rho, p = stats.spearmanr(g, final) if len(rows) > 2 else (np.nan, np.nan)
        correlation[opt] = {"spearman": float(rho), "p_value": float(p), "points": len(rows)}
    return {
        "table": table,
        "curves": curves,
        "correlation": correlation,
        "max_depth": max(config["depths"]),
        "steps": config["steps"],
        "data": config["data"] or "digits",
    }


def _loss(row: dict) -> float:
    """The final training loss of a table row (a diverged run is saved as None: inf)."""
    v = row["final_train_loss"]
    return np.inf if v is None else float(v)


def _is_exploding_plain(row: dict) -> bool:
    return not row["architecture"].startswith("resnet-") and row["gsc_rate_init"] > EXPLODING_RATE


def _pairs(data: dict, opt: str) -> list[tuple[dict, dict]]:
    """(plain exploding row, its ResNet version's row) at the largest depth."""
    rows = {
        r["architecture"]: r
        for r in data["table"]
        if r["optimizer"] == opt and r["depth"] == data["max_depth"]
    }
    return [
        (row, rows[f"resnet-{a}"])
        for a, row in rows.items()
        if _is_exploding_plain(row) and f"resnet-{a}" in rows
    ]


def verdicts(data: dict) -> list[Verdict]:
    out = []
    for opt, c in data["correlation"].items():
        if c["points"] > 2 and c["spearman"] is not None:
            out.append(
                Verdict(
                    f"The GSC at initialization ranks the training loss after the budget ({opt})",
                    bool(c["spearman"] > 0 and c["p_value"] < 0.05),
                    f"Spearman rho = {c['spearman']:.2f} (p = {c['p_value']:.2g}) between "
                    f"log GSC(L, 0) at init and the final training loss at the best learning "
                    f"rate, over {c['points']} family/depth points, {data['steps']} steps on "
                    f"{data['data']}",
                    CLAIMS,
                )
            )
    for opt in data["correlation"]:
        pairs = _pairs(data, opt)
        if not pairs:
            continue
        worse = sum(_loss(p) > _loss(r) for p, r in pairs)
        detail = "; ".join(
            f"{p['architecture']} {_loss(p):.3g} (acc {p['final_train_accuracy']:.2f}) "
            f"vs {_loss(r):.3g} (acc {r['final_train_accuracy']:.2f})"
            for p, r in pairs
        )
        what = (
            "Adam does not remove it: with Adam too, exploding plain MLPs"
            if opt == "adam"
            else f"Exploding plain MLPs ({opt})"
        )
        out.append(
            Verdict(
                f"{what} reach a higher training loss than their ResNet versions at depth "
                f"{data['max_depth']}",
                2 * worse > len(pairs),
                f"{worse} of {len(pairs)} families, final training loss plain vs ResNet at "
                f"the best learning rate of each: {detail}",
                CLAIMS,
            )
        )
    rows = [r for r in data["table"] if _is_exploding_plain(r)]
    if rows:
        ratios = np.array([r["gsc_ratio_early"] for r in rows])
        final = np.array([r["gsc_ratio_final"] for r in rows])
        out.append(
            Verdict(
                "The GSC of exploding plain MLPs falls during the first steps of training",
                bool(np.nanmedian(ratios) < 1),
                f"median GSC(L, 0) at step {int(rows[0]['early_step'])} / at init = "
                f"{np.nanmedian(ratios):.3g} (range {np.nanmin(ratios):.3g} to "
                f"{np.nanmax(ratios):.3g}); at the end {np.nanmedian(final):.3g}, over "
                f"{len(rows)} family/depth/optimizer rows at the best learning rate",
                CLAIMS,
            )
        )
    eff = [
        (p, r)
        for opt in data["correlation"]
        for p, r in _pairs(data, opt)
        if "effective_depth" in p and "effective_depth" in r
    ]
    if eff:
        # a ResNet of depth D has D/2 + 1 layer outputs (blocks and stem): compare fractions
        share = lambda row: row["effective_depth"] / row["layers"]  # noqa: E731
        shallower = sum(share(p) < share(r) for p, r in eff)
        detail = "; ".join(
            f"{p['architecture']} ({p['optimizer']}) {p['effective_depth']}/{p['layers']} vs "
            f"{r['effective_depth']}/{r['layers']}"
            for p, r in eff
        )
        out.append(
            Verdict(
                "Exploding plain MLPs are effectively shallower than their ResNet versions "
                "(reconstructed effective depth, as a fraction of the layer outputs)",
                2 * shallower > len(eff),
                f"{shallower} of {len(eff)}; layers whose trained change is needed beyond "
                f"first order, of all layer outputs, plain vs ResNet: {detail}",
                CLAIMS,
            )
        )
    return out


def plot(data: dict, folder: Path, formats) -> list[Path]:
    paths = []
    table = data["table"]
    opts = list(data["correlation"])
    depths = sorted({r["depth"] for r in table})
    markers = dict(zip(depths, "o^sDv", strict=False))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(opts), figsize=(3.3 * len(opts), 2.8), squeeze=False)
        for ax, opt in zip(axes[0], opts, strict=True):
            for row in (r for r in table if r["optimizer"] == opt):
                resnet = row["architecture"].startswith("resnet-")
                lo, hi = row["final_train_loss_min"], row["final_train_loss_max"]
                y = _loss(row)
                colour = series_style(4 if resnet else 5)["color"]
                if not np.isfinite(y):
                    ax.plot(row["gsc_init"], 10.0, marker="x", color=colour, ls="none", ms=4)
                    continue
                ax.errorbar(
                    row["gsc_init"],
                    y,
                    yerr=[[y - lo], [hi - y]] if lo is not None else None,
                    fmt=markers[row["depth"]],
                    color=colour,
                    ms=3,
                    capsize=1.5,
                    lw=0.6,
                )
            c = data["correlation"][opt]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("GSC(L, 0) at initialization")
            rho = "n/a" if c["spearman"] is None else f"{c['spearman']:.2f}"
            ax.set_title(f"{opt}: Spearman rho = {rho}", fontsize=8)
        axes[0][0].set_ylabel(f"training loss after {data['steps']} steps")
        handles = [
            plt.Line2D(
                [], [], color=series_style(5)["color"], marker="o", ls="none", label="plain MLP"
            ),
            plt.Line2D(
                [], [], color=series_style(4)["color"], marker="o", ls="none", label="ResNet"
            ),
            *[
                plt.Line2D([], [], color="0.4", marker=markers[d], ls="none", label=f"depth {d}")
                for d in depths
            ],
        ]
        fig.legend(
            handles=handles,
            frameon=False,
            loc="lower center",
            ncol=len(handles),
            bbox_to_anchor=(0.5, -0.14),
        )
        fig.suptitle(
            f"{data['data']}: best learning rate per family; bar: min-max over seeds; x: diverged",
            fontsize=7,
            y=1.04,
        )
        paths += save_figure(fig, folder / "gsc_init_vs_loss", formats)

        fig, axes = plt.subplots(2, len(opts), figsize=(3.3 * len(opts), 5.0), squeeze=False)
        for j, opt in enumerate(opts):
            keys = [k for k in data["curves"]["loss"] if k.endswith(f"|{data['max_depth']}|{opt}")]
            for i, key in enumerate(keys):
                cur = data["curves"]["loss"][key]
                x = np.array(cur["steps"]) + 1
                style = series_style(i)
                label = f"{key.split('|')[0]} (lr {cur['lr']:g})"
                loss = np.array([_finite(v) for v in cur["train_loss"]])
                ratio = np.array([_finite(v) for v in cur["gsc_ratio"]])
                if np.isfinite(loss).all():
                    plot_band(axes[0][j], x, loss, label=label, style=style, log=True)
                if np.isfinite(ratio).all() and (ratio > 0).all():
                    plot_band(axes[1][j], x, ratio, label=label, style=style, log=True)
            for ax in axes[:, j]:
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())
            axes[0][j].legend(frameon=False, fontsize=5, loc="lower left")
            axes[0][j].set_title(f"{opt}, depth {data['max_depth']}", fontsize=8)
            axes[1][j].set_xlabel("step + 1")
            axes[1][j].axhline(1.0, color="0.6", lw=0.5)
        axes[0][0].set_ylabel("training loss")
        axes[1][0].set_ylabel("GSC(L, 0) / GSC(L, 0) at init")
        fig.suptitle(
            "best learning rate per family; band: min-max over seeds (diverged runs not drawn)",
            fontsize=7,
        )
        paths += save_figure(fig, folder / "training_curves", formats)

        fig, axes = plt.subplots(1, len(opts), figsize=(3.3 * len(opts), 2.6), squeeze=False)
        for j, opt in enumerate(opts):
            keys = [k for k in data["curves"]["loss"] if k.endswith(f"|{data['max_depth']}|{opt}")]
            for i, key in enumerate(keys):
                cur = data["curves"]["loss"][key]
                ratio = np.array([_finite(v) for v in cur["update_ratio"]])
                keep = np.all(np.isfinite(ratio) & (ratio > 0), axis=0)
                if keep.any():
                    layers = np.flatnonzero(keep)
                    plot_band(axes[0][j], layers, ratio[:, keep], label=key.split("|")[0],
                              style=series_style(i), log=True)  # fmt: skip
            axes[0][j].set_yscale("log")
            axes[0][j].set_xlabel("layer l (ResNets: block; 0 = nearest the output)")
            step = data["curves"]["loss"][keys[0]]["update_step"] if keys else 0
            axes[0][j].set_title(f"{opt}, depth {data['max_depth']}, step {int(step)}", fontsize=8)
        axes[0][0].set_ylabel("||update_l|| / ||theta_l||")
        axes[0][-1].legend(frameon=False, fontsize=5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        paths += save_figure(fig, folder / "update_ratios", formats)

        if "effective" in data["curves"]:
            eff = data["curves"]["effective"]
            fig, axes = plt.subplots(1, len(opts), figsize=(3.3 * len(opts), 2.6), squeeze=False)
            for j, opt in enumerate(opts):
                keys = [k for k in eff if k.endswith(f"|{opt}")]
                for i, key in enumerate(keys):
                    e = eff[key]
                    plot_band(
                        axes[0][j],
                        np.array(e["ks"]) / e["layers"],
                        np.array(e["train_error"]),
                        label=key.split("|")[0],
                        style=series_style(i),
                    )
                axes[0][j].set_xlabel("fraction of layers linearized (nearest the output)")
                axes[0][j].set_title(f"{opt}, depth {data['max_depth']}", fontsize=8)
            axes[0][0].set_ylabel("training error")
            axes[0][-1].legend(
                frameon=False, fontsize=5, loc="upper left", bbox_to_anchor=(1.0, 1.0)
            )
            paths += save_figure(fig, folder / "effective_depth", formats)
    return paths


ANALYSIS = Analysis(
    name="trainability",
    title="Trainability: GSC at initialization against the training loss, on real data",
    claim="Exploding gradients limit the depth to which networks can be effectively trained, "
    "and Adam and batch normalization do not solve them (Philipp et al., arXiv 1712.05577).",
    sizes=SIZES,
    configs=configs,
    compute=compute,
    summarize=summarize,
    plot=plot,
    verdicts=verdicts,
    notes="Data: scikit-learn's handwritten digits (8x8, 1,437 training / 360 held-out "
    "images, standardized), shipped with the package, in place of the paper's CIFAR10; "
    "--data FILE.npz brings another set. A trained, zero-initialized linear readout maps the "
    "model output to the classes, scaled by one over the output's RMS at initialization. "
    "Learning rates are swept per optimizer and each family is judged at its best. The "
    "effective depth is a reconstruction (the paper's full text was not available; see the "
    "module docstring). Batch norm: each step normalizes over its mini-batch, evaluation over "
    "the whole split; pre-norm biases get no true gradient, so Adam's normalized steps on "
    "them follow rounding noise.",
)

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
