"""Pythagorean decomposition of residual blocks across widths and depths.

    python analyses/pythagorean.py [--size tiny|small|paper] [--widths ...] [--depths ...]

Per block of the GSC paper's pre-activation ResNets (:mod:`jacobian_lab.zoo`):
``||f + r||^2 = ||f||^2 + ||r||^2 + 2 <f, r>``; the cosine of skip and branch; the
relative error of the Pythagorean equation; the branch's relative size ``||r|| / ||f||``
along the stream; and the GSC across each block beside its prediction from the Pythagorean
equation, ``sqrt((1 + GSC_r^2 rho^2) / (1 + rho^2))`` (:class:`jacobian_lab.residual.BlockGSC`).

Reference: the branch ends in a Gaussian linear layer independent of the skip, so its
direction is uniform and the median of ``|cos|`` is ``0.6745 / sqrt(width)`` (the median
of ``|z|``, ``z ~ N(0, 1)``, scaled).
"""

from __future__ import annotations

from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

import jacobian_lab as jl
from jacobian_lab.experiments.constants import gaussian_inputs
from jacobian_lab.experiments.report import Analysis, Verdict, script_main
from jacobian_lab.plot import (
    LINESTYLES,
    OKABE_ITO,
    STYLE,
    save_figure,
    series_style,
)

MEDIAN_ABS_NORMAL = 0.6745

SIZES = {
    "tiny": {
        "archs": ["resnet-layer-relu"],
        "widths": [16, 256],
        "width_sweep_depth": 4,
        "depths": [2, 8],
        "depth_sweep_width": 32,
        "seeds": 2,
        "batch": 4,
    },
    "small": {
        "archs": ["resnet-layer-relu", "resnet-layer-tanh"],
        "widths": [32, 64, 128, 256, 512],
        "width_sweep_depth": 16,
        "depths": [4, 16, 64, 256],
        "depth_sweep_width": 128,
        "seeds": 2,
        "batch": 4,
    },
    "paper": {
        "archs": ["resnet-layer-relu", "resnet-layer-tanh"],
        "widths": [32, 64, 128, 256, 512, 1024],
        "width_sweep_depth": 25,
        "depths": [4, 16, 64, 256, 1000],
        "depth_sweep_width": 100,
        "seeds": 4,
        "batch": 8,
    },
}
for _cfg in SIZES.values():
    _cfg["dtype"] = "float32"


def configs(config: dict) -> list[dict]:
    common = {k: config[k] for k in ("seeds", "batch", "dtype")}
    units = [
        {"sweep": "width", "arch": a, "blocks": config["width_sweep_depth"], "width": w, **common}
        for a in config["archs"]
        for w in config["widths"]
    ]
    units += [
        {"sweep": "depth", "arch": a, "blocks": n, "width": config["depth_sweep_width"], **common}
        for a in config["archs"]
        for n in config["depths"]
    ]
    return units


def _from_input(a) -> list[float]:
    """Median over samples of a ``(..., blocks)`` array, blocks reordered from the input."""
    a = np.asarray(a, dtype=float)
    return np.median(a.reshape(-1, a.shape[-1]), axis=0)[::-1].tolist()


def compute(unit: dict) -> dict:
    net = jl.architecture(
        unit["arch"], depth=2 * unit["blocks"], width=unit["width"], dtype=unit["dtype"]
    )
    keys = jax.random.split(jax.random.PRNGKey(0), unit["seeds"])
    x = gaussian_inputs(jax.random.PRNGKey(1), (unit["batch"], net.input_dim), net.dtype)
    d = jax.vmap(lambda k: jl.pythagorean_decomposition(net, net.init(k), x))(keys)
    cos = np.abs(np.asarray(d.cosine, dtype=float))
    result = {
        "median_abs_cos": float(np.median(cos)),
        "mean_width_cos_sq": float(np.mean(unit["width"] * cos**2)),
        "median_relative_error": float(np.median(np.asarray(d.relative_error))),
    }
    if unit["sweep"] == "depth":
        b = [jl.block_gsc(net, net.init(k), x) for k in keys]  # seeds in a loop: 1 compile
        result |= {
            "abs_cos": _from_input(cos),
            "relative_error": _from_input(d.relative_error),
            "branch_ratio": _from_input(d.branch_ratio),
            "block_gsc": _from_input(np.stack([g.gsc for g in b])),
            "branch_gsc": _from_input(np.stack([g.branch_gsc for g in b])),
            "predicted_gsc": _from_input(np.stack([g.predicted for g in b])),
            "prediction_error": float(
                np.median(np.abs(np.stack([g.predicted / g.gsc - 1 for g in b])))
            ),
        }
    return result


def summarize(config: dict, records: list[dict]) -> dict:
    table = [
        {
            **{k: rec["config"][k] for k in ("sweep", "arch", "blocks", "width")},
            **{k: v for k, v in rec["result"].items() if not isinstance(v, list)},
        }
        for rec in records
    ]
    profiles = [
        {"arch": rec["config"]["arch"], "blocks": rec["config"]["blocks"], **rec["result"]}
        for rec in records
        if rec["config"]["sweep"] == "depth"
    ]
    return {"table": table, "depth_profiles": profiles}


def _width_rows(data: dict, arch: str) -> list[dict]:
    return sorted(
        (r for r in data["table"] if r["sweep"] == "width" and r["arch"] == arch),
        key=lambda r: r["width"],
    )


def _slope(rows: list[dict], key: str) -> float:
    w = np.array([r["width"] for r in rows], dtype=float)
    return float(np.polyfit(np.log(w), np.log([r[key] for r in rows]), 1)[0])


def plot(data: dict, folder: Path, formats) -> list[Path]:
    archs = list(dict.fromkeys(r["arch"] for r in data["table"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(6.75, 3.0))
        below = {
            "frameon": False,
            "fontsize": 5,
            "loc": "upper center",
            "bbox_to_anchor": (0.5, -0.25),
        }
        ax = axes[0]
        for i, arch in enumerate(archs):
            rows = _width_rows(data, arch)
            w = np.array([r["width"] for r in rows])
            colour = OKABE_ITO[4 + i]
            ax.loglog(
                w,
                [r["median_abs_cos"] for r in rows],
                "o-",
                color=colour,
                ms=3,
                label=f"|cos(f, r)|, {arch}",
            )
            ax.loglog(
                w,
                [r["median_relative_error"] for r in rows],
                "s--",
                color=colour,
                ms=3,
                label=f"relative error, {arch}",
            )
        if archs:
            w = np.array([r["width"] for r in _width_rows(data, archs[0])])
            ax.loglog(
                w,
                MEDIAN_ABS_NORMAL / np.sqrt(w),
                ":",
                color=OKABE_ITO[0],
                label="0.6745 / sqrt(width)",
            )
            ax.set_xticks(w, [str(v) for v in w])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("width (units)")
        ax.set_ylabel("median over blocks")
        ax.set_title("(a) Pythagorean equation vs width", fontsize=8)
        ax.legend(**below)

        ax = axes[1]
        blocks = sorted({p["blocks"] for p in data["depth_profiles"]})
        for p in data["depth_profiles"]:
            a = archs.index(p["arch"])
            ax.loglog(
                np.arange(1, p["blocks"] + 1),
                p["branch_ratio"],
                color=series_style(blocks.index(p["blocks"]))["color"],
                linestyle=LINESTYLES[a % len(LINESTYLES)],
                label=f"{p['blocks']} blocks" if a == 0 else None,
            )
        for a, arch in enumerate(archs):
            ax.plot([], [], color="0.4", linestyle=LINESTYLES[a % len(LINESTYLES)], label=arch)
        ax.set_xlabel("block, counted from the input")
        ax.set_ylabel("||r|| / ||f||")
        ax.set_title("(b) branch size along the stream", fontsize=8)
        ax.legend(ncol=2, **below)

        ax = axes[2]
        deepest = {}
        for p in data["depth_profiles"]:
            if p["blocks"] >= deepest.get(p["arch"], {"blocks": 0})["blocks"]:
                deepest[p["arch"]] = p
        for i, p in enumerate(deepest.values()):
            n = np.arange(1, p["blocks"] + 1)
            colour = OKABE_ITO[4 + i]
            ax.semilogx(n, p["branch_gsc"], "--", color=colour, label=f"branch GSC, {p['arch']}")
            ax.semilogx(n, p["block_gsc"], "-", color=colour, label="block GSC, measured")
            ax.semilogx(
                n,
                p["predicted_gsc"],
                ":",
                color=OKABE_ITO[0],
                lw=1.5,
                label="block GSC, Pythagorean prediction" if i == 0 else None,
            )
        ax.set_xlabel("block, counted from the input")
        ax.set_ylabel("GSC across one block")
        ax.set_title("(c) the skip dilutes the branch", fontsize=8)
        ax.legend(**below)
        fig.tight_layout()
        return save_figure(fig, folder / "pythagorean", formats)


def verdicts(data: dict) -> list[Verdict]:
    out = []
    for arch in dict.fromkeys(r["arch"] for r in data["table"]):
        rows = _width_rows(data, arch)
        if len(rows) >= 2:
            s_cos, s_err = _slope(rows, "median_abs_cos"), _slope(rows, "median_relative_error")
            last = rows[-1]
            out.append(
                Verdict(
                    f"Pythagorean equation ({arch})",
                    abs(s_cos + 0.5) < 0.15 and s_err < -0.3,
                    f"median |cos(f, r)| = {last['median_abs_cos']:.4f} at width "
                    f"{last['width']}, 0.6745/sqrt(width) = "
                    f"{MEDIAN_ABS_NORMAL / np.sqrt(last['width']):.4f}; log-log slope vs width "
                    f"{s_cos:.2f} (theory -0.50); relative error "
                    f"{last['median_relative_error']:.4f}, slope {s_err:.2f}",
                )
            )
        deep = [p for p in data["depth_profiles"] if p["arch"] == arch]
        if deep:
            worst = max(p["prediction_error"] for p in deep)
            branch = np.median(np.concatenate([p["branch_gsc"] for p in deep]))
            block = np.median(np.concatenate([p["block_gsc"] for p in deep]))
            out.append(
                Verdict(
                    f"The skip pulls the GSC across a block towards 1, as the Pythagorean "
                    f"equation predicts ({arch})",
                    worst < 0.05 and abs(np.log(block)) <= abs(np.log(branch)),
                    f"median GSC across a block {block:.3f} vs {branch:.3f} for its branch "
                    f"alone; prediction sqrt((1 + GSC_r^2 rho^2) / (1 + rho^2)) within "
                    f"{100 * worst:.1f}% (median over blocks, worst of "
                    f"{[p['blocks'] for p in deep]} blocks)",
                    claims=("P4",),
                )
            )
    return out


ANALYSIS = Analysis(
    name="pythagorean",
    title="Pythagorean decomposition of residual blocks",
    claim="At initialization the skip f and the branch r(f) of a residual block are nearly "
    "orthogonal (cosine ~ 1/sqrt(width)), so ||f + r||^2 = ||f||^2 + ||r||^2, and the GSC "
    "across a block is the branch's GSC diluted by the skip: this is why ResNets reduce the "
    "gradient (Philipp et al., arXiv 1712.05577).",
    sizes=SIZES,
    configs=configs,
    compute=compute,
    summarize=summarize,
    plot=plot,
    verdicts=verdicts,
    notes="Layer-norm ResNets of the zoo (the no-norm ones double ||f||^2 per block and leave "
    "float32 range after about 120 blocks). With layer norm the branch has a fixed size while "
    "||f||^2 grows by it every block, so ||r|| / ||f|| falls like block^(-1/2).",
)

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
