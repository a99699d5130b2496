"""The gallery: five models written the way their libraries' users write them, each read
whole by one ``jl.chain(model, x)`` call and measured: the GSC at every layer output
(labelled by submodule path), the all-pairs GSC matrix, the Pythagorean decomposition and
the GSC across every residual sublayer with its prediction, and a matrix-free GSC estimate
with standard errors beside the exact values.

    python examples/gallery/run.py --size small --out results/gallery
    python examples/gallery/run.py --models vit_equinox gpt2_nnx --size tiny

    jacobian-lab inspect examples/gallery/run.py:vit_equinox --out results/inspect/vit

Writes, per model, ``<model>/numbers.json`` and the figures ``gsc_profile``,
``gsc_matrix`` and ``blocks`` (PDF and PNG); progress goes to standard error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jacobian_lab as jl

HERE = pathlib.Path(__file__).resolve().parent

# name -> (module file, how its model is read: extra jl.chain arguments)
MODELS = {
    "resnet18_linen": ("resnet18_linen", {"kwargs": {"train": False}}),
    "resnet18_linen_batch_stats": ("resnet18_linen", {"kwargs": {"train": True}}),
    "vit_equinox": ("vit_equinox", {}),
    "gpt2_nnx": ("gpt2_nnx", {}),
    "mlp_jax": ("mlp_jax", {}),
    "mixer_linen": ("mixer_linen", {}),
}


def load(module: str):
    """Import a gallery module by file (the gallery is not a package)."""
    spec = importlib.util.spec_from_file_location(f"gallery_{module}", HERE / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def read(name: str, size: str = "tiny", *, key=None, dtype="float32"):
    """Build one gallery model and read it: ``(model, x, net, params)``."""
    module, how = MODELS[name]
    key = jax.random.PRNGKey(0) if key is None else key
    model, x = load(module).make(size, key, dtype=jnp.dtype(dtype))
    net, params = jl.chain(model, x, **how)  # the one line that reads the model
    return model, x, net, params


def measure(net, params, x, *, key=None, probes: int = 32) -> dict:
    """Every gallery measurement of a read model, as JSON-ready numbers."""
    key = jax.random.PRNGKey(1) if key is None else key
    numbers = {
        "names": list(net.names),
        "report": list(net.report),
        "batch_coupled": net.batch_coupled,
        "gsc": np.asarray(jl.gsc(net, params, x)).tolist(),
        "gsc_matrix": np.asarray(jl.gsc_matrix(net, params, x)).tolist(),
        "block_outputs": list(net.block_outputs),
    }
    if net.block_outputs:
        pyth = jl.pythagorean_decomposition(net, params, x)
        with warnings.catch_warnings():  # Post-LN / post-activation blocks: NaN predictions
            warnings.simplefilter("ignore", jl.PostBlockWarning)
            bg = jl.block_gsc(net, params, x)
        numbers["pythagorean"] = {f: np.asarray(v).tolist() for f, v in pyth._asdict().items()}
        numbers["block_gsc"] = {f: np.asarray(v).tolist() for f, v in bg._asdict().items()}
    est = jl.gsc_estimate(net, params, x, key, probes)
    numbers["estimate"] = {
        "value": np.asarray(est.value).tolist(),
        "error": np.asarray(est.error).tolist(),
    }
    return numbers


def plot(numbers: dict, folder: pathlib.Path) -> list[pathlib.Path]:
    names = numbers["names"]
    L = len(names)
    est = numbers["estimate"]
    ax = jl.plot.gsc_profile(np.array(numbers["gsc"]), label="exact (median over samples)")
    jl.plot.gsc_profile(
        jl.Estimate(np.array(est["value"]), np.array(est["error"])),
        ax=ax,
        label="matrix-free estimate (mean), ±2 s.e.",
    )
    ax.figure.set_size_inches(jl.plot.FULL_WIDTH, 2.8)
    # index k = 0 (output) .. L (input)
    ax.set_xticks(np.arange(L + 1), [*names[::-1], "input"], rotation=60, ha="right", fontsize=5)
    ax.set_title(
        f"{numbers['model']} ({numbers['size']}): GSC from each layer to the output", fontsize=8
    )
    paths = jl.plot.save_figure(ax, folder / "gsc_profile")

    ax = jl.plot.gsc_matrix(np.array(numbers["gsc_matrix"]))
    ax.set_title("all-pairs GSC (median over samples)", fontsize=8)
    paths += jl.plot.save_figure(ax, folder / "gsc_matrix")

    if "block_gsc" in numbers:
        bg = jl.BlockGSC(**{f: np.array(v) for f, v in numbers["block_gsc"].items()})
        py = jl.Pythagorean(**{f: np.array(v) for f, v in numbers["pythagorean"].items()})
        blocks = [names[L - 1 - l] for l in numbers["block_outputs"]]
        with plt.rc_context(jl.plot.STYLE):
            fig, axes = plt.subplots(1, 2, figsize=(jl.plot.FULL_WIDTH, 2.6))
        jl.plot.block_gsc(bg, ax=axes[0])
        jl.plot.pythagorean(py, ax=axes[1])
        for ax in axes:
            ax.set_xticks(np.arange(len(blocks)), blocks, rotation=60, ha="right", fontsize=5)
        paths += jl.plot.save_figure(fig, folder / "blocks")
    return paths


# Factories for ``jacobian-lab inspect examples/gallery/run.py:NAME`` (each model at the
# tiny size, read as ``read`` reads it; the key builds the params, so ``--seeds`` works):
def _inspect_factory(name: str):
    def factory(key):
        _, x, net, params = read(name, "tiny", key=key)
        return net, params, x

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"The gallery's {name} at the tiny size, read: (net, params, x)."
    return factory


resnet18_linen = _inspect_factory("resnet18_linen")
resnet18_linen_batch_stats = _inspect_factory("resnet18_linen_batch_stats")
vit_equinox = _inspect_factory("vit_equinox")
gpt2_nnx = _inspect_factory("gpt2_nnx")
mlp_jax = _inspect_factory("mlp_jax")
mixer_linen = _inspect_factory("mixer_linen")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/gallery"))
    args = ap.parse_args(argv)
    for i, name in enumerate(args.models):
        start = time.perf_counter()
        print(f"[{i + 1}/{len(args.models)}] {name} ({args.size})...", file=sys.stderr, flush=True)
        _, x, net, params = read(name, args.size, dtype=args.dtype)
        numbers = {"model": name, "size": args.size, **measure(net, params, x)}
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "numbers.json").write_text(json.dumps(numbers))
        plot(numbers, folder)
        print(
            f"    {net.num_layers} layer outputs, {len(net.block_outputs)} residual units, "
            f"{len(net.stages)} stages; {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    main()
