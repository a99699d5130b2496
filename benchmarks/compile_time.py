"""Compile time and run time vs depth: layers under lax.scan compile in constant time.

Run by hand:  python benchmarks/compile_time.py [--depths 10 1000] [--width 100]
              [--brought-depths 8 64] [--transformer-blocks 4 16]

Built-in MLP (tanh + layer norm): one row per (function, depth): compile seconds (lower +
compile of the public function under ``jax.jit`` after ``jax.clear_caches()``, the
fastest of --repeats) and the median run seconds of the compiled function over 3 runs.
Functions: the dense GSC to the output (``jl.gsc(method="dense")``), the matrix-free GSC
(``jl.gsc_estimate``, 16 probes), and the all-pairs GSC matrix (``jl.gsc_matrix``,
O(L^2), run up to --matrix-max-depth).

Brought models, through ``jl.chain``: an ``eqx.nn.MLP`` of depth D and a Python list of
D identical ``flax.nnx`` blocks (Linear + tanh), stacked (the default: identical
consecutive layers become one ``lax.scan`` stage) and unrolled (``stack=False``). Per row:
the seconds of ``jl.chain`` itself, of tracing + lowering and of XLA's compile of
``jax.jit(lambda p, x: jl.gsc(net, p, x, method="dense"))``, and the wall time of the
first eager ``jl.gsc(net, params, x)`` (what a new user waits for), each the fastest of
--repeats. Each measurement uses a fresh chain object (jit caches are keyed by it) after
``jax.clear_caches()``, and one untimed depth-2 run of each kind goes first, so that
one-time costs (imports, Flax's and Equinox's first-use set-up) fall on no row. Prints
the ratios of the largest depth to the smallest.

Whole brought transformers, read by ``jl.chain(model, ids)``: the gallery's Flax NNX
GPT-2-style decoder (``examples/gallery/gpt2_nnx.py``: Post-LN, causal attention, tied
embedding, token ids) with --transformer-blocks blocks, width 64, 4 heads, 32 tokens.
Each block gives two layer outputs (its attention and MLP sublayers), stacked as one
alternating group under ``lax.scan``. Per row: the seconds of ``jl.chain`` (the trace and
the check against the model's output), of the first ``jl.gsc`` (compile included), of
``jl.gsc`` on a second read of the same architecture with other weights (the compiled
program is shared: no compile), and XLA's compile of the jitted dense GSC.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jacobian_lab as jl

try:
    import equinox as eqx
except ImportError:  # pragma: no cover - optional
    eqx = None
try:
    from flax import nnx
except ImportError:  # pragma: no cover - optional
    nnx = None


def _time(fn, *args, repeats=3):
    fn(*args)  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def built_in(depths, width, batch, matrix_max_depth, repeats) -> None:
    print(f"{'function':<14}{'depth':>6}{'compile s':>11}{'run s':>10}")
    for depth in depths:
        net = jl.mlp(depth, width, "tanh", norm="layer")
        params = net.init(jax.random.PRNGKey(0))
        x = jax.random.normal(jax.random.PRNGKey(1), (batch, width), jnp.float32)
        key = jax.random.PRNGKey(2)
        fns = {
            "gsc": (lambda p, x, net=net: jl.gsc(net, p, x, method="dense"), (params, x)),
            "gsc_estimate": (
                lambda p, x, k, net=net: jl.gsc_estimate(net, p, x, k, 16).value,
                (params, x, key),
            ),
        }
        if depth <= matrix_max_depth:
            fns["gsc_matrix"] = (lambda p, x, net=net: jl.gsc_matrix(net, p, x), (params, x))
        for name, (fn, args) in fns.items():
            compile_s = float("inf")
            for _ in range(repeats):  # the fastest of fresh compiles: the least disturbed
                jax.clear_caches()
                t0 = time.perf_counter()
                compiled = jax.jit(fn).lower(*args).compile()
                compile_s = min(compile_s, time.perf_counter() - t0)
            run_s = _time(compiled, *args)
            print(f"{name:<14}{depth:>6}{compile_s:>11.3f}{run_s:>10.4f}", flush=True)


# -- brought models ----------------------------------------------------------------------

if nnx is not None:

    class TanhBlock(nnx.Module):
        """One brought layer: ``tanh(Linear(h))``."""

        def __init__(self, width: int, rngs: nnx.Rngs):
            self.linear = nnx.Linear(width, width, rngs=rngs)

        def __call__(self, h):
            return jnp.tanh(self.linear(h))


def make_model(kind: str, depth: int, width: int):
    """The object handed to ``jl.chain``: an Equinox MLP, or a list of NNX blocks."""
    if kind == "eqx.nn.MLP":
        return eqx.nn.MLP(
            in_size=width,
            out_size=width,
            width_size=width,
            depth=depth,
            activation=jnp.tanh,
            key=jax.random.PRNGKey(depth),
        )
    rngs = nnx.Rngs(depth)
    return [TanhBlock(width, rngs) for _ in range(depth)]


def _stages(net) -> str:
    """``R64+1``: a scanned stage of 64 layers, then a single layer; ``65x1``: unrolled."""
    if not any(isinstance(s, jl.Repeat) for s in net.stages):
        return f"{len(net.stages)}x1"
    return "+".join(f"R{s.n}" if isinstance(s, jl.Repeat) else "1" for s in net.stages)


def measure_brought(model, x, stack: bool) -> dict:
    """Compile of the jitted dense GSC and the first eager call, each on a fresh chain."""
    jax.clear_caches()
    t0 = time.perf_counter()
    net, params = jl.chain(model, stack=stack)
    chain_s = time.perf_counter() - t0
    fn = jax.jit(lambda p, x: jl.gsc(net, p, x, method="dense"))
    t0 = time.perf_counter()
    lowered = fn.lower(params, x)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - t0

    jax.clear_caches()
    net, params = jl.chain(model, stack=stack)  # a fresh object: no jit cache hit
    t0 = time.perf_counter()
    g = jax.block_until_ready(jl.gsc(net, params, x))
    first_s = time.perf_counter() - t0
    return {
        "stages": _stages(net),
        "chain": chain_s,
        "lower": lower_s,
        "compile": compile_s,
        "jit": lower_s + compile_s,
        "first": first_s,
        "g": np.asarray(g),
    }


def best_of(model, x, stack: bool, repeats: int) -> dict:
    """Per quantity, the smallest over ``repeats`` measurements (each on fresh objects
    after ``jax.clear_caches()``): the least disturbed by other work on the machine."""
    runs = [measure_brought(model, x, stack) for _ in range(repeats)]
    best = {k: min(r[k] for r in runs) for k in ("chain", "lower", "compile", "jit", "first")}
    return {**best, "stages": runs[0]["stages"], "g": runs[0]["g"]}


def brought(depths, width, batch, repeats) -> None:
    kinds = [k for k, mod in (("eqx.nn.MLP", eqx), ("nnx list", nnx)) if mod is not None]
    if not kinds:
        print("brought models: neither equinox nor flax is installed; skipped")
        return
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, width), jnp.float32)
    print(
        f"\nbrought models via jl.chain, width {width}, {batch} inputs; jl.gsc(method='dense')"
        "\n(jit = trace/lower + XLA compile of jax.jit(lambda p, x: jl.gsc(...)); first = "
        f"first eager jl.gsc call; each the fastest of {repeats})"
    )
    print(
        f"{'model':<12}{'stack':>7}{'depth':>6}{'stages':>9}{'chain s':>9}{'lower s':>9}"
        f"{'XLA s':>8}{'jit s':>8}{'first s':>9}"
    )
    for kind in kinds:
        for stack in (True, False):  # untimed warm-up: one-time costs fall on no row
            measure_brought(make_model(kind, 2, width), x, stack)
    ratios = []
    for kind in kinds:
        rows = {}
        for depth in depths:
            model = make_model(kind, depth, width)
            for stack in (True, False):
                r = best_of(model, x, stack, repeats)
                rows[stack, depth] = r
                print(
                    f"{kind:<12}{str(stack):>7}{depth:>6}{r['stages']:>9}{r['chain']:>9.3f}"
                    f"{r['lower']:>9.3f}{r['compile']:>8.3f}{r['jit']:>8.3f}{r['first']:>9.3f}",
                    flush=True,
                )
            diff = np.max(np.abs(rows[True, depth]["g"] / rows[False, depth]["g"] - 1))
            assert diff < 1e-4, f"stacked and unrolled GSC differ by {diff:.1e}"
        lo, hi = min(depths), max(depths)
        for stack in (True, False):
            a, b = rows[stack, lo], rows[stack, hi]
            ratios.append(
                f"{kind:<12}{str(stack):>7}  jit {b['jit'] / a['jit']:5.2f}x  "
                f"first call {b['first'] / a['first']:5.2f}x  "
                f"(lower {b['lower'] / a['lower']:.2f}x, XLA {b['compile'] / a['compile']:.2f}x, "
                f"chain {b['chain'] / a['chain']:.2f}x)"
            )
    print(f"\nratios depth {max(depths)} / depth {min(depths)}:")
    print("\n".join(ratios))


def transformers(blocks, repeats) -> None:
    if nnx is None:
        print("brought transformers: flax is not installed; skipped")
        return
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "gallery" / "gpt2_nnx.py"
    spec = importlib.util.spec_from_file_location("gallery_gpt2_nnx", path)
    gpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpt)

    def make(depth, seed):
        model = gpt.GPT(256, 32, 64, depth, 4, rngs=nnx.Rngs(seed))
        ids = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 0, 256)
        return model, ids

    print(
        "\nwhole brought transformer (gallery gpt2_nnx: width 64, 4 heads, 32 tokens, 4 "
        f"sequences), jl.chain(model, ids); each the fastest of {repeats}"
    )
    print(
        f"{'blocks':>6}{'layers':>8}{'stages':>8}{'chain s':>9}{'first gsc s':>13}"
        f"{'2nd read s':>12}{'XLA s':>8}"
    )
    make(2, 0)  # warm-up: one-time costs fall on no row
    rows = {}
    for depth in blocks:
        best = {}
        for _ in range(repeats):
            jax.clear_caches()
            model, ids = make(depth, 0)
            t0 = time.perf_counter()
            net, params = jl.chain(model, ids)
            chain_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            jax.block_until_ready(jl.gsc(net, params, ids))
            first_s = time.perf_counter() - t0
            other, ids2 = make(depth, 1)
            net2, params2 = jl.chain(other, ids2)
            t0 = time.perf_counter()
            jax.block_until_ready(jl.gsc(net2, params2, ids2))
            second_s = time.perf_counter() - t0
            xs = jax.vmap(lambda t, p=params, n=net: n.embed(p, t))(ids)
            lowered = jax.jit(lambda p, x, n=net: jl.gsc(n, p, x, method="dense")).lower(params, xs)
            t0 = time.perf_counter()
            lowered.compile()
            xla_s = time.perf_counter() - t0
            r = {"chain": chain_s, "first": first_s, "second": second_s, "xla": xla_s}
            best = {k: min(best.get(k, np.inf), v) for k, v in r.items()}
        rows[depth] = best
        print(
            f"{depth:>6}{net.num_layers:>8}{_stages(net):>8}{best['chain']:>9.3f}"
            f"{best['first']:>13.3f}{best['second']:>12.3f}{best['xla']:>8.3f}",
            flush=True,
        )
    lo, hi = min(blocks), max(blocks)
    a, b = rows[lo], rows[hi]
    print(
        f"ratios {hi} / {lo} blocks: first gsc {b['first'] / a['first']:.2f}x, XLA "
        f"{b['xla'] / a['xla']:.2f}x, chain {b['chain'] / a['chain']:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="*", default=[10, 1000])
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--matrix-max-depth",
        type=int,
        default=200,
        help="run the O(L^2) all-pairs GSC only up to this depth",
    )
    parser.add_argument(
        "--brought-depths",
        type=int,
        nargs="*",
        default=[8, 64],
        help="depths of the brought Equinox / Flax NNX models (none: skip them)",
    )
    parser.add_argument(
        "--transformer-blocks",
        type=int,
        nargs="*",
        default=[4, 16],
        help="blocks of the whole brought transformer (none: skip it)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measure each compile this many times (fresh, caches cleared); keep the fastest",
    )
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({cpu})")
    if args.depths:
        built_in(args.depths, args.width, args.batch, args.matrix_max_depth, args.repeats)
    if args.brought_depths:
        brought(args.brought_depths, args.width, args.batch, args.repeats)
    if args.transformer_blocks:
        transformers(args.transformer_blocks, args.repeats)


if __name__ == "__main__":
    main()
