"""The full input-output Jacobian: jacobian_lab vs jax.jacfwd / jax.jacrev (and PyTorch's
torch.func.jacrev on the same weights, when torch is installed), with the achieved
GFLOP/s against the machine's measured matmul peak.

Run by hand:  python benchmarks/full_jacobian.py [--widths 256 512 1024 2048] [--depth 10]

The network is a plain tanh MLP (no normalization, so PyTorch computes exactly the same
function). Forward-mode accumulation of a d x d Jacobian through L dense layers costs
2 L d^3 flops (one d x d x d matmul per layer); that count over the run time is the
achieved rate, and the float32 matmul of the same size measured here is the physical
limit. Ours is ``jax.jit(lambda p, x: jl.input_output_jacobian(net, p, x))``. Run times
are medians of 20 runs of compiled code, the JAX contenders (ours, jacfwd, jacrev, the
matmul) taking turns within each of the 20 rounds so that other load on the machine
falls on all alike (torch runs after them, on its own); compile times (lower + compile)
are separate.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jacobian_lab as jl


def interleaved_medians(fns: dict, repeats: int = 20) -> dict:
    """Median seconds of each zero-argument callable over ``repeats`` rounds, the callables
    taking turns within each round (after one warm call each), so that load from other
    work on the machine falls on all of them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def torch_jacobian(net, params, x):
    """``() -> torch.func.jacrev`` of the same network on the same weights (checked
    against ours), or ``None`` without torch."""
    try:
        import torch
        from torch.func import jacrev
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    Ws = [torch.from_numpy(np.array(params["stem"]["W"]))] + [
        torch.from_numpy(np.array(w)) for w in params["units"]["W"]
    ]
    bs = [torch.from_numpy(np.array(params["stem"]["b"]))] + [
        torch.from_numpy(np.array(b)) for b in params["units"]["b"]
    ]

    def f(v):
        for W, b in zip(Ws, bs, strict=True):
            v = torch.tanh(W @ v + b)
        return v

    xt = torch.from_numpy(np.array(x[0]))
    J = jacrev(f)(xt)
    ref = np.asarray(jl.input_output_jacobian(net, params, x))[0]
    assert np.allclose(J.numpy(), ref, rtol=1e-3, atol=1e-4), "torch Jacobian differs"
    return lambda: jacrev(f)(xt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--depth", type=int, default=10)
    args = ap.parse_args()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; "
        f"tanh MLP depth {args.depth}, float32, one input"
    )
    print(
        f"{'width':>6}{'ours s':>10}{'jacfwd s':>10}{'jacrev s':>10}{'torch s':>10}"
        f"{'ours/fwd':>10}{'GFLOP/s':>9}{'peak':>8}{'of peak':>9}{'compile s':>10}"
    )
    for d in args.widths:
        net = jl.mlp(args.depth, d, "tanh")
        params = net.init(jax.random.PRNGKey(0))
        x = jax.random.normal(jax.random.PRNGKey(1), (1, d), jnp.float32)
        ours = jax.jit(lambda p, x, net=net: jl.input_output_jacobian(net, p, x))
        t0 = time.perf_counter()
        ours_c = ours.lower(params, x).compile()
        compile_s = time.perf_counter() - t0
        f = lambda v, p, net=net: net.apply(p, v[None])[0]  # noqa: E731
        fwd, rev, dot = jax.jit(jax.jacfwd(f)), jax.jit(jax.jacrev(f)), jax.jit(jnp.dot)
        a = jax.random.normal(jax.random.PRNGKey(0), (d, d), jnp.float32)
        fns = {
            "ours": partial(ours_c, params, x),
            "fwd": partial(fwd, x[0], params),
            "rev": partial(rev, x[0], params),
            "peak": partial(dot, a, a),  # the float32 d x d matmul
        }
        t = interleaved_medians(fns)
        t_ours, t_fwd, t_rev = t["ours"], t["fwd"], t["rev"]
        # torch on its own: its OpenMP threads keep spinning after a call and would slow
        # whatever JAX call came next
        torch_fn = torch_jacobian(net, params, x)
        t_torch = None if torch_fn is None else interleaved_medians({"torch": torch_fn})["torch"]
        np.testing.assert_allclose(
            np.asarray(ours_c(params, x))[0],
            np.asarray(jax.jacfwd(f)(x[0], params)),
            rtol=1e-4,
            atol=1e-6,
        )
        gflops = 2 * args.depth * d**3 / t_ours / 1e9
        peak = 2 * d**3 / t["peak"] / 1e9
        torch_s = f"{t_torch:10.4f}" if t_torch is not None else f"{'-':>10}"
        print(
            f"{d:>6}{t_ours:>10.4f}{t_fwd:>10.4f}{t_rev:>10.4f}{torch_s}"
            f"{t_ours / t_fwd:>10.2f}{gflops:>9.1f}{peak:>8.1f}{gflops / peak:>9.2f}"
            f"{compile_s:>10.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
