"""GSC and residual-block diagnostics of a Flax (linen) ResNet at initialization, beside
the same architecture from jacobian_lab's zoo.

The model is written the way a Flax user writes it; ``jacobian_lab.chain`` reads its stem
and blocks from the bound module. Its weights follow the zoo's ``resnet-layer-relu``
(pre-activation blocks LayerNorm -> ReLU -> Dense, twice; He-normal weights, zero biases),
so the two sets of curves estimate the same quantities from independent draws.

    python examples/flax_resnet.py --out results/examples/flax_resnet

Writes ``gsc_profile`` and ``block_gsc`` figures (PDF and PNG) and ``numbers.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import flax.linen as nn
import jax
import matplotlib.pyplot as plt
import numpy as np

import jacobian_lab as jl
from jacobian_lab.plot import STYLE, plot_band, save_figure, series_style


class Branch(nn.Module):
    """Pre-activation residual branch: (LayerNorm -> ReLU -> Dense) x 2."""

    width: int

    @nn.compact
    def __call__(self, h):
        he = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
        for _ in range(2):
            h = nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False)(h)
            h = nn.Dense(self.width, kernel_init=he)(nn.relu(h))
        return h


class ResNet(nn.Module):
    width: int
    blocks: int

    def setup(self):
        self.stem = nn.Dense(
            self.width, kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal")
        )
        self.branches = [Branch(self.width) for _ in range(self.blocks)]

    def __call__(self, x):
        h = self.stem(x)
        for branch in self.branches:
            h = h + branch(h)
        return h


def flax_chain(model: ResNet, variables):
    """The model as a jacobian_lab chain: the stem, then one Residual per block."""
    bound = model.bind(variables)
    return jl.chain([bound.stem, *[jl.Residual(b) for b in bound.branches]])


def measure(width: int, blocks: int, seeds: int, batch: int) -> dict:
    model = ResNet(width, blocks)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, width))
    zoo = jl.architecture("resnet-layer-relu", depth=2 * blocks, width=width)
    ch = None
    out = {"flax": {"gsc": [], "block_gsc": [], "predicted": [], "cosine": []}}
    out["zoo"] = {k: [] for k in out["flax"]}
    for seed in range(seeds):
        key = jax.random.PRNGKey(100 + seed)
        variables = model.init(key, x[0])
        c, params = flax_chain(model, variables)
        ch = ch or c  # params of any seed fit the first chain: one compile serves all
        zp = zoo.init(key)
        for name, (net, p) in {"flax": (ch, params), "zoo": (zoo, zp)}.items():
            bg = jl.block_gsc(net, p, x)
            out[name]["gsc"].append(np.exp(np.log(jl.gsc(net, p, x)).mean(0)).tolist())
            out[name]["block_gsc"].append(np.median(bg.gsc, 0).tolist())
            out[name]["predicted"].append(np.median(bg.predicted, 0).tolist())
            cos = jl.pythagorean_decomposition(net, p, x).cosine
            out[name]["cosine"].append(np.median(np.abs(cos), 0).tolist())
        print(f"seed {seed + 1}/{seeds} done", flush=True)
    return {"width": width, "blocks": blocks, "seeds": seeds, "batch": batch, **out}


def plot(data: dict, folder: Path) -> list[Path]:
    ax = None
    for name in ("flax", "zoo"):
        ax = jl.plot.gsc_profile(np.array(data[name]["gsc"]), ax=ax, label=name)
    ax.set_title(f"ResNet, {data['blocks']} blocks, width {data['width']}", fontsize=8)
    paths = save_figure(ax, folder / "gsc_profile")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(6.75, 2.5))
        for i, name in enumerate(("flax", "zoo")):
            st = series_style(i)
            blocks = np.arange(len(data[name]["block_gsc"][0]))
            plot_band(
                axes[0],
                blocks,
                np.array(data[name]["block_gsc"]),
                label=f"{name} measured",
                style=st,
            )
            axes[0].plot(
                blocks,
                np.mean(data[name]["predicted"], 0),
                "o",
                ms=2,
                color=st["color"],
                label=f"{name} Pythagorean prediction",
            )
            plot_band(axes[1], blocks, np.array(data[name]["cosine"]), label=name, style=st)
        axes[1].axhline(
            0.6745 / np.sqrt(data["width"]), color="0.5", ls=":", label="0.6745/sqrt(width)"
        )
        axes[0].set_ylabel("GSC across the block")
        axes[1].set_ylabel("median |cos(f, r)|")
        for ax in axes:
            ax.set_xlabel("block (0 = nearest the output)")
            ax.legend(frameon=False, fontsize=6)
        paths += save_figure(fig, folder / "block_gsc")
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("results/examples/flax_resnet"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = measure(args.width, args.blocks, args.seeds, args.batch)
    (args.out / "numbers.json").write_text(json.dumps(data))
    for p in plot(data, args.out):
        print(p)


if __name__ == "__main__":
    main()
