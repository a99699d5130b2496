"""Matrix-free vs dense: time, accuracy and memory of the GSC and the spectral density
against width and number of probes, the crossover, and a CIFAR-shaped conv Jacobian.

Run by hand:  python benchmarks/matrix_free_vs_dense.py [--widths 64 256 1024 2048]
              [--probes 16 64 256] [--depth 10] [--skip-conv] [--skip-mlp]

MLP part (tanh, sigma_w = 1, depth 10, one input, float32):
* GSC(L, 0) to the output, dense (``jl.gsc(method="dense")``) vs matrix-free
  (``jl.gsc_estimate``: one backward pass per probe): the first eager call (compile
  included), the run time of the public function compiled under ``jax.jit`` (e.g.
  ``jax.jit(lambda p, x, k: jl.gsc_estimate(net, p, x, k, P).value)``, median of 3),
  relative error of the matrix-free value against dense, its reported standard error,
  and the peak temporary memory XLA reports for that compiled program;
* the spectral density of the input-output Jacobian, dense SVD vs stochastic Lanczos
  quadrature (16 probes x 32 Golub-Kahan steps): time (first and second eager call of
  ``jl.jacobian_spectrum``), XLA's buffer size, and the Kolmogorov-Smirnov distance
  between the two CDFs of the squared singular values.

Conv part: a residual CNN on 32 x 32 x 3 images with 16 channels (every hidden layer has
16384 numbers); the 16384 x 16384 Jacobian from the stem's output to the network's
output, its spectral density by SLQ and its largest singular value by Lanczos; and the
matrix-free GSC of every layer.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jacobian_lab as jl


def timed(fn, repeats=3):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, first, float(np.median(times))


def temp_mib(jitted, *args) -> float:
    return mib_of(jitted.lower(*args).compile())


def mib_of(compiled) -> float:
    """XLA's temporary plus output buffers of a compiled program, in MiB."""
    mem = compiled.memory_analysis()
    return (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20 if mem else float("nan")


def first_and_compiled(eager, jitted, *args, repeats=3):
    """The first eager call (compile included) of a public function, then the median of
    ``repeats`` calls of the same function compiled under ``jax.jit`` and its MiB."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(eager())
    first = time.perf_counter() - t0
    compiled = jitted.lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return out, first, float(np.median(times)), mib_of(compiled)


def ks(spec_a, spec_b, top: float) -> float:
    t = jnp.linspace(0.0, top, 400)
    return float(jnp.max(jnp.abs(spec_a.cdf(t) - spec_b.cdf(t))))


def mlp_part(widths, probes, depth):
    print(f"\nMLP, tanh, depth {depth}, one input, float32")
    print(
        f"{'width':>6}{'method':>14}{'run s':>9}{'first s':>9}{'rel err':>9}{'rel se':>8}{'MiB':>9}"
    )
    key = jax.random.PRNGKey(2)
    for d in widths:
        mlp_width(d, probes, depth, key)


def mlp_width(d, probes, depth, key):
    net = jl.mlp(depth, d, "tanh")
    p = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, d), jnp.float32)
    dense, first, run, mib = first_and_compiled(
        lambda: jl.gsc(net, p, x, method="dense"),
        jax.jit(lambda p, x: jl.gsc(net, p, x, method="dense")),
        p,
        x,
    )
    ref = float(dense[0, -1])
    print(f"{d:>6}{'dense':>14}{run:>9.4f}{first:>9.3f}{0:>9.1e}{0:>8.1e}{mib:>9.1f}")
    for P in probes:
        est, first, run, mib = first_and_compiled(
            lambda P=P: jl.gsc_estimate(net, p, x, key, P),
            jax.jit(lambda p, x, k, P=P: jl.gsc_estimate(net, p, x, k, P).value),
            p,
            x,
            key,
        )
        rel = abs(float(est.value[0, -1]) - ref) / ref
        se = float(est.error[0, -1]) / ref
        print(
            f"{d:>6}{f'probes {P}':>14}{run:>9.4f}{first:>9.3f}{rel:>9.1e}{se:>8.1e}{mib:>9.1f}",
            flush=True,
        )

    def fn(v):
        return net.apply(p, v[None])[0]

    sd, first_d, run_d = timed(lambda: jl.jacobian_spectrum(fn, x[0], method="dense"), 1)
    sm, first_m, run_m = timed(
        lambda: jl.jacobian_spectrum(fn, x[0], method="matrix_free", key=key), 1
    )
    top = float(sd.largest.value) ** 2
    mib_d = temp_mib(jax.jit(lambda v: jl.jacobian_spectrum(fn, v, method="dense").nodes), x[0])
    mib_m = temp_mib(
        jax.jit(lambda v: jl.jacobian_spectrum(fn, v, method="matrix_free", key=key).nodes),
        x[0],
    )
    print(f"{d:>6}{'density dense':>14}{run_d:>9.4f}{first_d:>9.3f}{'':>17}{mib_d:>9.1f}")
    print(
        f"{d:>6}{'density SLQ':>14}{run_m:>9.4f}{first_m:>9.3f}{'':>17}{mib_m:>9.1f}  KS distance "
        f"{ks(sm, sd, top):.3f}; sigma_max rel err "
        f"{abs(float(sm.largest.value / sd.largest.value) - 1):.1e}",
        flush=True,
    )


def conv_part():
    print("\nResidual CNN, 32 x 32 x 3 inputs, 16 channels, 4 blocks, layer norm, ReLU, float32")
    net = jl.resconvnet(4, 16, "relu", norm="layer")
    p = net.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 32, 3), jnp.float32)
    h0 = net.stem(p, x)  # (1, 32, 32, 16): 16384 numbers

    def body(h):
        return jax.lax.scan(lambda h, u: (net.unit(u, h), None), h, p["units"])[0]

    key = jax.random.PRNGKey(3)
    spec, first, run = timed(
        lambda: jl.jacobian_spectrum(body, h0, key=key, num_probes=16, num_matvecs=32), 1
    )
    print(
        f"Jacobian f_stem -> f_0: 16384 x 16384 ({16384**2 * 4 / 2**30:.0f} GiB dense in "
        f"float32); method chosen: {spec.method}"
    )
    print(
        f"SLQ density (16 probes x 32 steps) + Lanczos sigma_max: {first:.1f} s first call, "
        f"{run:.1f} s compiled; sigma_max = {float(spec.largest.value):.4f} "
        f"+- {float(spec.largest.error):.1e}; ||J||_F^2 / n = "
        f"{float(spec.frobenius_sq.value) / 16384:.4f} +- "
        f"{float(spec.frobenius_sq.error) / 16384:.4f}"
    )
    est, first, run = timed(lambda: jl.gsc_estimate(net, p, x, key, 64), 1)
    print(
        f"matrix-free GSC, all {net.num_layers + 1} layers, 64 probes: {first:.1f} s first "
        f"call, {run:.2f} s compiled; GSC(L, 0) = {float(est.value[0, -1]):.4f} "
        f"+- {float(est.error[0, -1]):.4f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 2048])
    ap.add_argument("--probes", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--skip-conv", action="store_true")
    ap.add_argument("--skip-mlp", action="store_true")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    if not args.skip_mlp:
        mlp_part(args.widths, args.probes, args.depth)
    if not args.skip_conv:
        conv_part()


if __name__ == "__main__":
    main()
