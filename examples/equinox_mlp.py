"""GSC and layer-Jacobian diagnostics of an Equinox MLP at initialization, beside the same
architecture from jacobian_lab's zoo and the mean-field prediction.

The model is an ``equinox.nn.MLP`` (50 dense layers of width 100, tanh after every layer,
the GSC paper's setting) with its weights redrawn from N(0, 1/fan_in) and zero biases, the
zoo's ``tanh`` family. ``jacobian_lab.chain`` reads its layers (each Linear joined with
the activation after it).

    python examples/equinox_mlp.py --out results/examples/equinox_mlp

Writes ``gsc_profile`` and ``layer_spectra`` figures (PDF and PNG) and ``numbers.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jacobian_lab as jl
from jacobian_lab.meanfield import gsc_profile
from jacobian_lab.plot import STYLE, plot_band, save_figure, series_style


def equinox_mlp(depth: int, width: int, key: jax.Array) -> eqx.nn.MLP:
    """``depth`` dense layers, tanh after each, weights N(0, 1/fan_in), zero biases."""
    k_model, k_weights = jax.random.split(key)
    model = eqx.nn.MLP(
        width,
        width,
        width,
        depth - 1,
        activation=jnp.tanh,
        final_activation=jnp.tanh,
        key=k_model,
    )
    keys = jax.random.split(k_weights, depth)

    def redraw(layer, k):
        W = jax.random.normal(k, layer.weight.shape) / np.sqrt(layer.in_features)
        return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (W, jnp.zeros_like(layer.bias)))

    return eqx.tree_at(
        lambda m: m.layers,
        model,
        tuple(redraw(lin, k) for lin, k in zip(model.layers, keys, strict=True)),
    )


def measure(depth: int, width: int, seeds: int, batch: int) -> dict:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, width))
    zoo = jl.architecture("tanh", depth=depth, width=width)
    ch = None
    out = {name: {"gsc": [], "rms_sigma_minus_1": []} for name in ("equinox", "zoo")}
    for seed in range(seeds):
        key = jax.random.PRNGKey(100 + seed)
        c, params = jl.chain(equinox_mlp(depth, width, key))
        ch = ch or c  # params of any seed fit the first chain: one compile serves all
        for name, (net, p) in {"equinox": (ch, params), "zoo": (zoo, zoo.init(key))}.items():
            out[name]["gsc"].append(np.exp(np.log(jl.gsc(net, p, x)).mean(0)).tolist())
            s = jl.block_jacobian_stats(net, p, x, key).singular_values
            out[name]["rms_sigma_minus_1"].append(np.sqrt(((s - 1) ** 2).mean((0, 2))).tolist())
        print(f"seed {seed + 1}/{seeds} done", flush=True)
    theory = gsc_profile("tanh", 1.0, 0.0, depth, q1=float(jnp.mean(x**2)))
    return {
        "depth": depth,
        "width": width,
        "seeds": seeds,
        "batch": batch,
        "mean_field_gsc": np.asarray(theory).tolist(),
        **out,
    }


def plot(data: dict, folder: Path) -> list[Path]:
    ax = jl.plot.gsc_profile(np.array(data["equinox"]["gsc"]), label="equinox")
    theory = np.array(data["mean_field_gsc"])  # mean field
    jl.plot.gsc_profile(np.array(data["zoo"]["gsc"]), ax=ax, label="zoo", theory=theory)
    ax.set_title(f"tanh MLP, depth {data['depth']}, width {data['width']}", fontsize=8)
    paths = save_figure(ax, folder / "gsc_profile")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(3.3, 2.5))
        for i, name in enumerate(("equinox", "zoo")):
            r = np.array(data[name]["rms_sigma_minus_1"])
            plot_band(ax, np.arange(r.shape[1]), r, label=name, style=series_style(i))
        ax.set_xlabel("layer (0 = output)")
        ax.set_ylabel("RMS(sigma - 1), one layer's Jacobian")
        ax.legend(frameon=False)
        paths += save_figure(fig, folder / "layer_spectra")
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("results/examples/equinox_mlp"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = measure(args.depth, args.width, args.seeds, args.batch)
    (args.out / "numbers.json").write_text(json.dumps(data))
    for p in plot(data, args.out):
        print(p)


if __name__ == "__main__":
    main()
