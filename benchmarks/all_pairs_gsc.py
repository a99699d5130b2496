"""All-pairs GSC of a depth-50, width-100 MLP: jacobian_lab vs a hand-written jacrev loop.

Run by hand:  python benchmarks/all_pairs_gsc.py [--depth 50] [--width 100]

Both sides compute GSC(k, l) for every pair k >= l of one input, compile time included,
in one process:

* jacobian_lab: ``jl.gsc_matrix`` (one pass: every layer's Jacobian, then the products,
  under ``lax.scan``): its first eager call, compile included, and (for reference) the
  median of 5 calls of ``jax.jit(lambda p, x: jl.gsc_matrix(net, p, x))`` once compiled;
* hand-written: what a user writes without the library: for each pair, the sub-network
  from layer k to layer l as a Python loop over layers, its Jacobian by ``jax.jacrev``,
  and the qm norm. Two variants: ``jit`` (one compiled function per pair: the natural
  way to make jacrev fast, each pair a new program) and ``eager`` (no jit).

Prints the seconds of each and the ratio; both must agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jacobian_lab as jl


def hand_written(net, params, x, jit: bool, max_seconds: float):
    """GSC(k, l) for all pairs by jacrev of each sub-network. Returns the matrix (NaN
    where not reached) and the seconds taken; stops after ``max_seconds`` (the caller
    extrapolates from the pairs done)."""
    L = net.num_layers
    units = [jax.tree_util.tree_map(lambda a, i=i: a[i], params["units"]) for i in range(L - 1)]

    def layer(i, h):  # forward index i: 0 = stem, 1.. = units
        return net.stem(params, h[None])[0] if i == 0 else net.unit(units[i - 1], h[None])[0]

    def values(x0):  # f_L = x, ..., f_0 (GSC-paper order)
        hs = [x0]
        for i in range(L):
            hs.append(layer(i, hs[-1]))
        return hs[::-1]

    t0 = time.perf_counter()
    f = values(x)
    G = np.full((L + 1, L + 1), np.nan)
    done = 0
    for l in range(L + 1):
        for k in range(l, L + 1):

            def sub(h, k=k, l=l):  # f_k -> f_l: forward layers L-k .. L-l-1
                for i in range(L - k, L - l):
                    h = layer(i, h)
                return h

            jac = jax.jacrev(sub)
            if jit:
                jac = jax.jit(jac)
            J = jac(f[k])
            qm = jnp.linalg.norm(J) / np.sqrt(J.shape[1])
            G[k, l] = float(qm * jnp.linalg.norm(f[k]) / jnp.linalg.norm(f[l]))
            done += 1
            if time.perf_counter() - t0 > max_seconds:
                return G, time.perf_counter() - t0, done
    return G, time.perf_counter() - t0, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="stop a hand-written variant after this long and extrapolate",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=("jit", "eager"),
        default=["jit", "eager"],
        help="which hand-written variants to run",
    )
    args = ap.parse_args()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; depth {args.depth}, "
        f"width {args.width}, tanh + layer norm, float32, one input"
    )
    net = jl.mlp(args.depth, args.width, "tanh", norm="layer")
    params = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, args.width), jnp.float32)

    t0 = time.perf_counter()
    ours = np.asarray(jax.block_until_ready(jl.gsc_matrix(net, params, x)))[0]
    t_ours = time.perf_counter() - t0
    compiled = jax.jit(lambda p, x: jl.gsc_matrix(net, p, x)).lower(params, x).compile()
    jax.block_until_ready(compiled(params, x))  # warm
    times = []
    for _ in range(5):
        t1 = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - t1)
    t_run = float(np.median(times))
    print(f"jacobian_lab gsc_matrix: {t_ours:.3f} s with compile ({t_run:.4f} s compiled)")
    n_pairs = (net.num_layers + 1) * (net.num_layers + 2) // 2
    for variant in args.variants:
        G, t, done = hand_written(net, params, x[0], variant == "jit", args.max_seconds)
        total = t * n_pairs / done
        tag = "" if done == n_pairs else f" (extrapolated from {done} of {n_pairs} pairs)"
        mask = ~np.isnan(G)
        err = np.max(np.abs(G[mask] - ours[mask]) / ours[mask])
        print(
            f"hand-written jacrev loop ({variant}): {total:.1f} s{tag}; "
            f"ratio {total / t_ours:.0f}x; max relative difference {err:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
