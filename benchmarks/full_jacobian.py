"""The full input-output Jacobian: jacobian_lab vs jax.jacfwd / jax.jacrev (and PyTorch's
torch.func.jacrev on the same weights, when torch is installed), with the achieved
GFLOP/s against the machine's measured matmul peak.

Run by hand:  python benchmarks/full_jacobian.py [--widths 256 512 1024 2048] [--depth 10]

The network is a plain tanh MLP (no normalization, so PyTorch computes exactly the same
function). Forward-mode accumulation of a d x d Jacobian through L dense layers costs
2 L d^3 flops (one d x d x d matmul per layer); that count over the run time is the
achieved rate, and the float32 matmul of the same size measured here is the physical
limit. Run times are medians of 20 runs of compiled code; compile times are separate.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jacobian_lab as jl
from jacobian_lab.layered import _input_output_jacobian, samples


def median_seconds(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_peak(n: int) -> float:
    """GFLOP/s of a float32 n x n matmul (jit, median of 20)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    t = median_seconds(jax.jit(jnp.dot), a, a)
    return 2 * n**3 / t / 1e9


def torch_seconds(net, params, x) -> float | None:
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
    ref = np.asarray(_input_output_jacobian(net, params, samples(net, x)))[0]
    assert np.allclose(J.numpy(), ref, rtol=1e-3, atol=1e-4), "torch Jacobian differs"
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        jacrev(f)(xt)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


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
        xs = samples(net, x)
        t0 = time.perf_counter()
        ours_c = _input_output_jacobian.lower(net, params, xs).compile()
        compile_s = time.perf_counter() - t0
        t_ours = median_seconds(ours_c, params, xs)
        f = lambda v, p, net=net: net.apply(p, v[None])[0]  # noqa: E731
        t_fwd = median_seconds(jax.jit(jax.jacfwd(f)), x[0], params)
        t_rev = median_seconds(jax.jit(jax.jacrev(f)), x[0], params)
        t_torch = torch_seconds(net, params, x)
        np.testing.assert_allclose(
            np.asarray(ours_c(params, xs))[0],
            np.asarray(jax.jacfwd(f)(x[0], params)),
            rtol=1e-4,
            atol=1e-6,
        )
        gflops = 2 * args.depth * d**3 / t_ours / 1e9
        peak = matmul_peak(d)
        torch_s = f"{t_torch:10.4f}" if t_torch is not None else f"{'-':>10}"
        print(
            f"{d:>6}{t_ours:>10.4f}{t_fwd:>10.4f}{t_rev:>10.4f}{torch_s}"
            f"{t_ours / t_fwd:>10.2f}{gflops:>9.1f}{peak:>8.1f}{gflops / peak:>9.2f}"
            f"{compile_s:>10.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
