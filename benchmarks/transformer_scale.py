"""Transformer at scale: the matrix-free GSC of every layer and the SLQ spectral density of
the input-output Jacobian of a GPT-2-small-sized stack at initialization, timed, checked
against the dense computation on a small stack, and counted in FLOPs against the
machine's measured matmul peak.

Run by hand (the full GPT-2-small size: 12 blocks, width 768, 12 heads, 128 tokens, a
98,304 x 98,304 Jacobian; on an idle machine):

    python benchmarks/transformer_scale.py

Smoke test at a reduced size:

    python benchmarks/transformer_scale.py --blocks 2 --width 128 --heads 4 --tokens 16

Parts (float32, one token matrix of i.i.d. N(0, 1) embeddings, Pre-LN ``jl.transformer``,
GELU MLPs of 4 x width, LeCun-normal weights, zero biases):

* **peak**: the float32 matmul rate of this machine, measured in this process with a
  jitted ``jnp.dot`` of two ``n x n`` matrices (``--peak-size``; the fastest of 5 calls).
* **GSC**: ``jl.gsc_estimate`` with ``--probes`` (64) Rademacher probes: GSC(k, 0) of every
  layer with standard errors; time of the first call (compile included) and of the
  second call (compiled program reused); beside it the plain-JAX alternative with the
  same FLOPs, a jitted ``jax.vmap`` of one ``jax.vjp`` of the stack over the probes,
  giving ``||J^T u||^2`` at the input only.
* **SLQ**: ``jl.slq_spectrum`` (``--slq-probes`` (4) probes x ``--slq-matvecs`` (32)
  Golub-Kahan-Lanczos steps) of ``J = d f_0 / d x``, under ``jax.jit``, first and second
  call (4 probes: each probe's quadrature already averages over ``n = 98,304``
  directions, so the probe-to-probe spread of the density is small, and every probe
  costs 64 passes through the stack); the spectral measure's mean
  ``E[sigma^2] = ||J||_F^2 / n`` and its largest node.
* **FLOPs**: counted analytically from the matmuls (elementwise ops, layer norms, softmax
  and Lanczos reorthogonalization are left out, all below 1% here). Per block, for
  ``T`` tokens of width ``D`` and MLP width ``M = 4 D``:
  forward ``F = 2 T D (4 D) + 2 (2 T D M) + 2 (2 T^2 D)`` (q, k, v, o; up, down; the logits
  ``Q K^T`` and ``A V``); a backward pass to the input only (no weight gradients)
  ``B = 2 T D (4 D) + 2 (2 T D M) + 4 (2 T^2 D)`` (both factors of ``Q K^T`` and ``A V``
  get a gradient); a JVP tangent costs the same as ``B``. ``gsc_estimate``: one forward
  pass and one backward pass per probe, ``N (F + P B)``. SLQ: every Golub-Kahan step is
  one JVP (the primal forward shared by all probes, a tangent per probe) and one VJP per
  probe, ``N k (F + 2 P B)`` plus one forward for the VJP's residuals. The forward count
  is cross-checked against XLA's cost analysis of a one-block stack (XLA counts a
  ``lax.scan`` body once, so the stack itself cannot be counted that way). The fraction of
  peak is ``FLOPs / second-call time / peak``.
* **check** (``--check-blocks 2 --check-width 64 --check-tokens 16``, a 1024 x 1024
  Jacobian): dense ``jl.gsc`` against ``gsc_estimate`` (each layer's deviation in units of
  its standard error, and the share of layers whose 95% interval holds the dense value),
  and SLQ against the dense singular values (Kolmogorov-Smirnov distance between the
  CDFs of sigma^2, and the mean of sigma^2).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jacobian_lab as jl


def timed_twice(fn):
    """``fn()``'s result, the time of the first call (compile included) and of the second."""
    times, out = [], None
    for _ in range(2):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, times[0], times[1]


def matmul_peak(n: int) -> float:
    """Measured float32 matmul rate, FLOP/s: a jitted ``n x n`` by ``n x n`` product."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    times = []
    for _ in range(5):  # the fastest call: the rate the machine reaches
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def block_flops(T: int, D: int, M: int) -> tuple[float, float]:
    """Matmul FLOPs of one transformer block: forward ``F``, backward to the input ``B``
    (also a JVP tangent); see the module docstring."""
    dense = 2 * T * D * (4 * D) + 2 * (2 * T * D * M)
    attn = 2 * T * T * D
    return dense + 2 * attn, dense + 4 * attn


def xla_forward_flops(width: int, heads: int, tokens: int) -> float:
    """XLA's cost analysis of one block's forward pass (a one-block stack)."""
    one = jl.transformer(1, width, heads, tokens)
    p = one.init(jax.random.PRNGKey(0))
    x = jnp.zeros((1, tokens, width), jnp.float32)
    cost = jax.jit(one.apply).lower(p, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def setup(blocks, width, heads, tokens):
    model = jl.transformer(blocks, width, heads, tokens)
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, tokens, width), jnp.float32)
    return model, params, x


def slq_program(model, num_probes: int, num_matvecs: int):
    """``(params, x0, key) -> SLQ`` of ``J = d f_0 / d x`` at one token matrix, jitted."""

    def run(params, x0, key):
        fn = lambda v: model.apply(params, v[None])[0]  # noqa: E731
        return jl.slq_spectrum(fn, x0, key, num_probes, num_matvecs)

    return jax.jit(run)


def plain_backward(model, num_probes: int):
    """The alternative: ``jax.vmap`` of one ``jax.vjp`` of the whole stack over Rademacher
    probes, returning only ``||J^T u||^2`` at the input (no per-layer norms, no rescaling,
    no errors), jitted: the same FLOPs as ``gsc_estimate``."""

    def run(params, x0, key):
        y, vjp = jax.vjp(lambda v: model.apply(params, v[None])[0], x0)
        u = jax.random.rademacher(key, (num_probes, *y.shape), y.dtype)
        return jax.vmap(lambda c: jnp.sum(vjp(c)[0] ** 2))(u)

    return jax.jit(run)


def scale_part(args, peak: float) -> None:
    N, D, H, T = args.blocks, args.width, args.heads, args.tokens
    n = T * D
    print(
        f"\nPre-LN transformer: {N} blocks, width {D}, {H} heads, {T} tokens, MLP {4 * D}, "
        f"float32; Jacobian {n:,} x {n:,} ({n * n * 4 / 2**30:.1f} GiB dense)"
    )
    model, params, x = setup(N, D, H, T)
    F, B = block_flops(T, D, 4 * D)
    xla_f = xla_forward_flops(D, H, T)
    print(
        f"forward matmul FLOPs per block: {F:.3e} analytic, {xla_f:.3e} XLA cost analysis "
        f"(all ops of one block)"
    )
    key = jax.random.PRNGKey(2)
    P = args.probes
    est, first, second = timed_twice(lambda: jl.gsc_estimate(model, params, x, key, P))
    flops = N * (F + P * B)
    g, e = np.asarray(est.value[0]), np.asarray(est.error[0])
    print(
        f"\n{'diagnostic':<34}{'first s':>9}{'second s':>10}{'GFLOP':>10}{'GFLOP/s':>10}"
        f"{'of peak':>9}"
    )
    row = lambda name, a, b, fl: print(  # noqa: E731
        f"{name:<34}{a:>9.2f}{b:>10.2f}{fl / 1e9:>10.1f}{fl / b / 1e9:>10.1f}{fl / b / peak:>9.1%}",
        flush=True,
    )
    row(f"GSC, {model.num_layers + 1} layers, {P} probes", first, second, flops)
    plain = plain_backward(model, P)
    _, first_b, second_b = timed_twice(lambda: plain(params, x[0], key))
    row("  plain JAX vmap(vjp), input only", first_b, second_b, flops)

    Ps, K = args.slq_probes, args.slq_matvecs
    slq_run = slq_program(model, Ps, K)
    slq, first, second = timed_twice(lambda: slq_run(params, x[0], key))
    flops = N * (K * (F + 2 * Ps * B) + F)
    row(f"SLQ density, {Ps} probes x {K} steps", first, second, flops)

    print(f"\nGSC(k, 0) +- standard error, k = layers below the output (L = {model.num_layers}):")
    for k in range(len(g)):
        label = "input x" if k == len(g) - 1 else f"output of {model.names[-1 - k]}"
        print(f"  k={k:>3}  {label:<26}{g[k]:.4f} +- {e[k]:.4f}")
    mean_sq = float(jnp.mean(jnp.sum(slq.weights * slq.nodes, axis=1)))
    print(
        f"SLQ: E[sigma^2] = ||J||_F^2 / n = {mean_sq:.4f}; largest node sigma^2 = "
        f"{float(jnp.max(slq.nodes)):.4f}"
    )


def check_part(args) -> None:
    N, D, H, T = args.check_blocks, args.check_width, args.check_heads, args.check_tokens
    n = T * D
    print(f"\nCheck on a small stack: {N} blocks, width {D}, {H} heads, {T} tokens ({n} x {n})")
    model, params, x = setup(N, D, H, T)
    key = jax.random.PRNGKey(3)
    dense = np.asarray(jl.gsc(model, params, x, method="dense")[0])
    est = jl.gsc_estimate(model, params, x, key, args.probes)
    lo, hi = (np.asarray(a[0]) for a in est.interval())
    value, error = np.asarray(est.value[0]), np.asarray(est.error[0])
    z = (value[1:] - dense[1:]) / error[1:]  # GSC(0, 0) = 1 exactly, error 0
    inside = np.mean((lo[1:] <= dense[1:]) & (dense[1:] <= hi[1:]))
    rel = np.abs(value[1:] / dense[1:] - 1)
    print(
        f"GSC, {args.probes} probes, {len(z)} layers: max |estimate - dense| / error = "
        f"{np.max(np.abs(z)):.2f}; 95% intervals holding the dense value: {inside:.0%}; "
        f"relative error median {np.median(rel):.1e}, max {np.max(rel):.1e} (relative "
        f"standard error median {np.median(error[1:] / value[1:]):.1e})"
    )

    def fn(v):
        return model.apply(params, v[None])[0]

    s = np.asarray(jl.singular_values(jl.jacobian(fn, x[0])))
    slq = slq_program(model, args.slq_probes, args.slq_matvecs)(params, x[0], key)
    grid = np.linspace(0.0, float(s[0] ** 2) * 1.05, 2000)
    nodes, weights = np.asarray(slq.nodes), np.asarray(slq.weights)
    cdf_slq = np.array([np.mean(np.sum(weights * (nodes <= t), axis=1)) for t in grid])
    cdf_dense = np.searchsorted(np.sort(s**2), grid, side="right") / s.size
    mean_slq = float(np.mean(np.sum(weights * nodes, axis=1)))
    print(
        f"SLQ ({args.slq_probes} probes x {args.slq_matvecs} steps) vs dense SVD: "
        f"Kolmogorov-Smirnov distance of the sigma^2 CDFs "
        f"{np.max(np.abs(cdf_slq - cdf_dense)):.3f}; "
        f"E[sigma^2] {mean_slq:.4f} vs {float(np.mean(s**2)):.4f}; largest sigma^2 "
        f"{float(nodes.max()):.4f} vs {float(s[0] ** 2):.4f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--probes", type=int, default=64, help="gsc_estimate probes")
    ap.add_argument("--slq-probes", type=int, default=4)
    ap.add_argument("--slq-matvecs", type=int, default=32)
    ap.add_argument("--peak-size", type=int, default=4096)
    ap.add_argument("--check-blocks", type=int, default=2)
    ap.add_argument("--check-width", type=int, default=64)
    ap.add_argument("--check-heads", type=int, default=4)
    ap.add_argument("--check-tokens", type=int, default=16)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    peak = matmul_peak(args.peak_size)
    print(f"measured float32 matmul peak ({args.peak_size}^2 jnp.dot): {peak / 1e9:.1f} GFLOP/s")
    if not args.skip_scale:
        scale_part(args, peak)
    if not args.skip_check:
        check_part(args)


if __name__ == "__main__":
    main()
