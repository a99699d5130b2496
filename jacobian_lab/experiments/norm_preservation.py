"""Norm preservation of residual blocks as more blocks are stacked.

    python analyses/norm_preservation.py [--size tiny|small|paper] [--depths 4 16 64]

For residual networks of increasing depth, and a plain network with as many layers as the
residual one has blocks: the singular values of every block's Jacobian ``I + d r / d f``
(of every layer's Jacobian for the plain network) and the factor by which the block scales
a backpropagated gradient (:func:`jacobian_lab.block_jacobian_stats`). Zaeemzadeh,
Rahnavard & Shah (arXiv 1805.07477) argue that identity skips make blocks norm preserving,
and more so the more blocks are stacked.

Summary per network: the root mean square of ``sigma - 1`` over all singular values of all
blocks (0 = every block norm preserving) and the mean of ``|log|| g_in || / || g_out |||``.
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
from jacobian_lab.plot import STYLE, save_figure, series_style

SIZES = {
    "tiny": {"depths": [2, 8], "widths": [16], "seeds": 2, "batch": 4},
    "small": {"depths": [4, 16, 64], "widths": [64], "seeds": 2, "batch": 4},
    "paper": {"depths": [4, 16, 64], "widths": [100], "seeds": 8, "batch": 8},
}
for _cfg in SIZES.values():
    _cfg |= {"archs": ["resnet-layer-relu", "resnet-relu", "layer-relu"], "dtype": "float32"}


def configs(config: dict) -> list[dict]:
    common = {k: config[k] for k in ("seeds", "batch", "dtype")}
    return [
        {"arch": a, "blocks": n, "width": w, **common}
        for a in config["archs"]
        for w in config["widths"]
        for n in config["depths"]
    ]


def _network(unit: dict) -> jl.Network:
    n = unit["blocks"]
    # ResNets of the zoo have depth // 2 two-layer blocks; a plain net of depth n + 1 has
    # n layers above its stem, one per residual block.
    depth = 2 * n if unit["arch"].startswith("resnet-") else n + 1
    return jl.architecture(unit["arch"], depth=depth, width=unit["width"], dtype=unit["dtype"])


def compute(unit: dict) -> dict:
    net = _network(unit)
    x = gaussian_inputs(jax.random.PRNGKey(1), (unit["batch"], net.input_dim), net.dtype)
    stats = [
        jl.block_jacobian_stats(net, net.init(k), x, jax.random.fold_in(k, 7))
        for k in jax.random.split(jax.random.PRNGKey(0), unit["seeds"])
    ]  # seeds in a loop: the jitted function compiles once
    s = np.stack([np.asarray(st.singular_values, dtype=float) for st in stats])  # (seed,S,n,d)
    ratio = np.stack([np.asarray(st.gradient_ratio, dtype=float) for st in stats])
    per_block = s.reshape(-1, *s.shape[-2:])  # (samples, n, d)
    return {
        "rms_deviation": float(np.sqrt(np.mean((s - 1) ** 2))),
        "mean_abs_log_gradient_ratio": float(np.mean(np.abs(np.log(ratio)))),
        # per block, counted from the input: median over samples of the extreme values
        "sigma_max": np.median(per_block.max(-1), axis=0)[::-1].tolist(),
        "sigma_min": np.median(per_block.min(-1), axis=0)[::-1].tolist(),
        "block_rms_deviation": np.sqrt(np.mean((per_block - 1) ** 2, axis=(0, 2)))[::-1].tolist(),
    }


def summarize(config: dict, records: list[dict]) -> dict:
    rows = [
        {
            **{k: rec["config"][k] for k in ("arch", "blocks", "width")},
            **{k: v for k, v in rec["result"].items() if not isinstance(v, list)},
        }
        for rec in records
    ]
    profiles = [{**rec["config"], **rec["result"]} for rec in records]
    return {"table": rows, "profiles": profiles}


def _series(data: dict, arch: str) -> tuple[np.ndarray, np.ndarray]:
    rows = sorted((r for r in data["table"] if r["arch"] == arch), key=lambda r: r["blocks"])
    return (
        np.array([r["blocks"] for r in rows], dtype=float),
        np.array([r["rms_deviation"] for r in rows]),
    )


def plot(data: dict, folder: Path, formats) -> list[Path]:
    archs = list(dict.fromkeys(r["arch"] for r in data["table"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(6.75, 2.5))
        ax = axes[0]
        for i, arch in enumerate(archs):
            n, dev = _series(data, arch)
            ax.loglog(n, dev, "o", label=arch, ms=3, **series_style(i))
        depths = sorted({r["blocks"] for r in data["table"]})
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("blocks stacked (layers, for the plain network)")
        ax.set_ylabel("RMS of (sigma - 1), all blocks")
        ax.set_title("(a) deviation from norm preservation", fontsize=8)
        ax.legend(frameon=False)

        ax = axes[1]
        deepest = {}
        for p in data["profiles"]:
            if p["blocks"] >= deepest.get(p["arch"], {"blocks": 0})["blocks"]:
                deepest[p["arch"]] = p
        for i, p in enumerate(deepest.values()):
            n = np.arange(1, p["blocks"] + 1)
            style = series_style(i)
            ax.plot(n, p["sigma_max"], label=f"{p['arch']} ({p['blocks']})", **style)
            ax.plot(n, p["sigma_min"], **style)
        ax.axhline(1.0, color="0.5", lw=0.6)
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("block, counted from the input")
        ax.set_ylabel("block Jacobian: sigma_min to sigma_max")
        ax.set_title("(b) singular value range per block (median)", fontsize=8)
        ax.legend(frameon=False)
        fig.tight_layout()
        return save_figure(fig, folder / "norm_preservation", formats)


def verdicts(data: dict) -> list[Verdict]:
    out = []
    archs = list(dict.fromkeys(r["arch"] for r in data["table"]))
    resnets = [a for a in archs if a.startswith("resnet-")]
    plains = [a for a in archs if not a.startswith("resnet-")]
    trend = {}
    for arch in resnets:
        n, dev = _series(data, arch)
        if len(n) >= 2:
            trend[arch] = (float(np.polyfit(np.log(n), np.log(dev), 1)[0]), n, dev)
    for arch, (slope, n, dev) in trend.items():
        out.append(
            Verdict(
                f"Blocks become more norm preserving as more are stacked ({arch})",
                slope < -0.2,
                f"RMS(sigma - 1) of the block Jacobians {dev[0]:.3f} at {n[0]:.0f} blocks, "
                f"{dev[-1]:.3f} at {n[-1]:.0f}; log-log slope {slope:.2f}",
                claims=("D2.3",),
            )
        )
    for plain in plains:
        n_p, dev_p = _series(data, plain)
        n_max = n_p[-1]
        res = {a: _series(data, a)[1][-1] for a in resnets if _series(data, a)[0][-1] == n_max}
        if res:
            best = min(res, key=res.get)
            out.append(
                Verdict(
                    f"Residual blocks are closer to norm preserving than plain layers ({plain})",
                    dev_p[-1] > 2 * res[best],
                    f"at {n_max:.0f} blocks RMS(sigma - 1) = {dev_p[-1]:.3f} for {plain} vs "
                    + ", ".join(f"{v:.3f} for {a}" for a, v in res.items()),
                )
            )
    return out


ANALYSIS = Analysis(
    name="norm_preservation",
    title="Norm preservation of residual blocks",
    claim="Identity skips make each block's Jacobian I + dr/df nearly norm preserving "
    "(singular values near 1), increasingly so as more blocks are stacked; plain layers are "
    "not (Zaeemzadeh, Rahnavard & Shah, arXiv 1805.07477).",
    sizes=SIZES,
    configs=configs,
    compute=compute,
    summarize=summarize,
    plot=plot,
    verdicts=verdicts,
    notes="At initialization the concentration comes from normalized branches of fixed size "
    "on a stream whose length grows with depth. The no-norm ResNet's branch grows with the "
    "stream and its blocks do not concentrate; Zaeemzadeh et al.'s bound concerns blocks "
    "near an optimum, not random ones. Plain ReLU layers have about half their singular "
    "values at 0 (inactive units).",
)

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
