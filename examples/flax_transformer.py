"""Signal propagation through a Flax NNX transformer at initialization, beside
jacobian_lab's built-in transformer: GSC profile, Pythagorean decomposition per sublayer,
token cosine and rank-collapse residual per layer.

The model is written the way an NNX user writes a GPT-style Pre-LN transformer
(``nnx.MultiHeadAttention``, ``nnx.LayerNorm``, ``nnx.Linear``, exact GELU, Flax's default
initializers: LeCun-normal kernels, zero biases, LayerNorm scale 1 and bias 0). To analyse
it, :func:`nnx_chain` hands ``jacobian_lab.chain`` one ``jl.Residual`` per sublayer (the
branch ``LN -> attention`` or ``LN -> MLP``, the identity skip) and the final LayerNorm, so
the chain has the same layer outputs and residual blocks as ``jl.transformer(...)`` with
``norm="pre"``, and every per-sublayer diagnostic lines up with it. The built-in model
draws its own weights with the same variances (Flax's LeCun normal is truncated at two
standard deviations and rescaled, the built-in one is not), so the two sets of curves
estimate the same quantities from independent draws (bands: min to max over seeds, one fixed input
batch; with 3 seeds the curves of the two models can sit apart, while over 12 seeds the
output token cosine is 0.552 +- 0.013 for NNX and 0.549 +- 0.012 built in).
tests/test_brought_transformer.py copies the weights across and checks the diagnostics
agree to 1e-9 in float64.

    python examples/flax_transformer.py --out results/examples/flax_transformer

Writes ``gsc_profile``, ``sublayers`` and ``tokens`` figures (PDF and PNG) and
``numbers.json``. (NNX's attention computes its softmax in float32 whatever the params'
dtype, through ``jax.nn.dot_product_attention``; this example runs in float32 anyway.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from matplotlib.ticker import MaxNLocator

import jacobian_lab as jl
from jacobian_lab.plot import STYLE, plot_band, save_figure, series_style


def gelu(z):
    return jax.nn.gelu(z, approximate=False)


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(width, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, width, rngs=rngs)

    def __call__(self, h):
        return self.down(gelu(self.up(h)))


class Block(nnx.Module):
    """Pre-LN transformer block: ``h + attn(LN(h))``, then ``h + mlp(LN(h))``."""

    def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, width, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.mlp = MLP(width, 4 * width, rngs)

    def __call__(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class Transformer(nnx.Module):
    def __init__(self, blocks: int, width: int, heads: int, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(blocks)])
        self.ln_f = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)

    def __call__(self, h):  # h: (..., tokens, width) token embeddings
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)


def nnx_chain(model: Transformer):
    """The model as a jacobian_lab chain: each sublayer a residual block whose branch is
    ``LN -> attention`` or ``LN -> MLP``, then the final LayerNorm."""
    layers = []
    for b in model.blocks:
        layers += [
            jl.Residual(nnx.Sequential(b.ln1, b.attn)),
            jl.Residual(nnx.Sequential(b.ln2, b.mlp)),
        ]
    names = [f"block{i}.{s}" for i in range(1, len(model.blocks) + 1) for s in ("attn", "mlp")]
    return jl.chain([*layers, model.ln_f], names=[*names, "final_norm"])


def diagnostics(net, params, x) -> dict:
    """Per seed: GSC(k, 0) (geometric mean over samples), per sublayer the median
    |cos(f, r)| and rho = ||r|| / ||f||, per layer the mean token cosine and rank-collapse
    residual; all ordered from the input (index 0 = x or the first sublayer)."""
    g = np.exp(np.log(np.asarray(jl.gsc(net, params, x))).mean(0))[::-1]
    py = jl.pythagorean_decomposition(net, params, x)
    tok = jl.token_statistics(net, params, x)
    rho = np.sqrt(np.asarray(py.branch_sq) / np.asarray(py.skip_sq))
    return {
        "gsc": g.tolist(),
        "cosine": np.median(np.abs(np.asarray(py.cosine)), 0)[::-1].tolist(),
        "rho": np.median(rho, 0)[::-1].tolist(),
        "token_cosine": np.asarray(tok.cosine).mean(0)[::-1].tolist(),
        "token_residual": np.asarray(tok.residual).mean(0)[::-1].tolist(),
    }


def measure(blocks: int, width: int, heads: int, tokens: int, seeds: int, batch: int) -> dict:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, tokens, width))
    builtin = jl.transformer(blocks, width, heads, tokens, norm="pre")
    ch = None
    out = {"nnx": [], "built-in": []}
    for seed in range(seeds):
        c, params = nnx_chain(Transformer(blocks, width, heads, nnx.Rngs(100 + seed)))
        ch = ch or c  # params of any seed fit the first chain: one compile serves all
        out["nnx"].append(diagnostics(ch, params, x))
        p = builtin.init(jax.random.PRNGKey(100 + seed))
        out["built-in"].append(diagnostics(builtin, p, x))
        print(f"seed {seed + 1}/{seeds} done", flush=True)
    return {
        "blocks": blocks,
        "width": width,
        "heads": heads,
        "tokens": tokens,
        "seeds": seeds,
        "batch": batch,
        "sublayers": list(builtin.names[:-1]),
        **out,
    }


def _series(data: dict, name: str, field: str) -> np.ndarray:
    return np.array([d[field] for d in data[name]])


def plot(data: dict, folder: Path) -> list[Path]:
    paths, names = [], ("nnx", "built-in")
    title = (
        f"Pre-LN, {data['blocks']} blocks, width {data['width']}, {data['heads']} heads, "
        f"{data['tokens']} tokens"
    )
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(3.3, 2.5))
        for i, name in enumerate(names):
            g = _series(data, name, "gsc")
            plot_band(ax, np.arange(g.shape[1]), g, label=name, style=series_style(i), log=True)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer from the input (0 = x, last = output)")
        ax.set_ylabel("GSC(layer, output)")
        ax.axhline(1.0, color="0.5", lw=0.5, ls=":")
        ax.set_title(title, fontsize=7)
        ax.legend(frameon=False)
        paths += save_figure(fig, folder / "gsc_profile")

        fig, axes = plt.subplots(1, 2, figsize=(6.75, 2.5))
        subs = np.arange(1, len(data["sublayers"]) + 1)
        attn = np.array(["attn" in s for s in data["sublayers"]])
        for i, name in enumerate(names):
            st = series_style(i)
            for ax, field in zip(axes, ("cosine", "rho"), strict=True):
                v = _series(data, name, field)
                plot_band(ax, subs, v, label=name, style=st)
                m = v.mean(0)
                ax.plot(subs[attn], m[attn], "o", ms=3, color=st["color"])
                ax.plot(subs[~attn], m[~attn], "s", ms=3, color=st["color"], mfc="none")
        axes[0].axhline(
            0.6745 / np.sqrt(data["tokens"] * data["width"]),
            color="0.5",
            ls=":",
            label="0.6745/sqrt(tokens x width)",
        )
        axes[0].set_ylabel("median |cos(f, r)|")
        axes[1].set_ylabel("median ||r|| / ||f||")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("sublayer from the input (o attention, □ MLP)")
            ax.legend(frameon=False, fontsize=6)
        fig.suptitle(f"Skip f and branch r per sublayer; {title}", fontsize=7)
        fig.subplots_adjust(wspace=0.35)
        paths += save_figure(fig, folder / "sublayers")

        fig, axes = plt.subplots(1, 2, figsize=(6.75, 2.5))
        for i, name in enumerate(names):
            for ax, field in zip(axes, ("token_cosine", "token_residual"), strict=True):
                v = _series(data, name, field)
                plot_band(ax, np.arange(v.shape[1]), v, label=name, style=series_style(i))
        axes[0].set_ylabel("mean pairwise token cosine")
        axes[1].set_ylabel("rank-collapse residual\n||X - 1 mean(X)||_F / ||X||_F")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("layer from the input (0 = x)")
            ax.legend(frameon=False, fontsize=6)
        fig.suptitle(f"Token statistics per layer; {title}", fontsize=7)
        fig.subplots_adjust(wspace=0.4)
        paths += save_figure(fig, folder / "tokens")
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("results/examples/flax_transformer"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = measure(args.blocks, args.width, args.heads, args.tokens, args.seeds, args.batch)
    (args.out / "numbers.json").write_text(json.dumps(data))
    for p in plot(data, args.out):
        print(p)


if __name__ == "__main__":
    main()
