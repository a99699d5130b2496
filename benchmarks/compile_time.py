"""Compile time and run time vs depth: layers under lax.scan compile in constant time.

Run by hand:  python benchmarks/compile_time.py [--depths 10 1000] [--width 100]
Prints one row per (function, depth): compile seconds (lower + compile, no cache) and the
median run seconds of the compiled function over a few repeats. Functions: the dense GSC
to the output, the matrix-free GSC (16 probes), and the all-pairs GSC matrix (O(L^2),
run up to --matrix-max-depth).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp

import jacobian_lab as jl
from jacobian_lab.gsc import _gsc_estimate, _gsc_matrix, _gsc_to_output
from jacobian_lab.layered import samples


def _time(fn, *args, repeats=3):
    fn(*args)  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--matrix-max-depth",
        type=int,
        default=200,
        help="run the O(L^2) all-pairs GSC only up to this depth",
    )
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({cpu})")
    print(f"{'function':<14}{'depth':>6}{'compile s':>11}{'run s':>10}")
    for depth in args.depths:
        net = jl.mlp(depth, args.width, "tanh", norm="layer")
        params = net.init(jax.random.PRNGKey(0))
        x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.width), jnp.float32)
        xs = samples(net, x)
        key = jax.random.PRNGKey(2)
        fns = {
            "gsc": (_gsc_to_output, (net, params, xs), (params, xs)),
            "gsc_estimate": (_gsc_estimate, (net, params, xs, key, 16), (params, xs, key)),
        }
        if depth <= args.matrix_max_depth:
            fns["gsc_matrix"] = (_gsc_matrix, (net, params, xs), (params, xs))
        for name, (fn, lower_args, call_args) in fns.items():
            t0 = time.perf_counter()
            compiled = fn.lower(*lower_args).compile()
            compile_s = time.perf_counter() - t0
            run_s = _time(compiled, *call_args)
            print(f"{name:<14}{depth:>6}{compile_s:>11.3f}{run_s:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
