"""jl.inspect on every architecture family of the GSC paper: which ones it finds exploding.

    python examples/inspect_zoo.py [--depth 50] [--width 100] [--seeds 2] [--json FILE]

One row per family: the fitted per-layer growth rate of GSC(k, 0) with its 5-95% interval
over seeds and samples, GSC(L, 0), the mean-field prediction where the theory covers the
family (plain networks), and the findings. The paper (arXiv 1712.05577, abstract) reports
exploding gradients at initialization in popular MLP architectures with batch norm, layer
norm and SeLU, and uses ReLU with He initialization and the looks-linear ReLU as the
families that avoid them (at the price of a collapsing domain, the findings' pseudo-linear
layers). At the report's small size (depth 50, width 100: the defaults) the families found
exploding are those of the report's ``gsc_across_depth`` verdict, and the mean-field rate
agrees: plain tanh with ``sigma_w = 1, sigma_b = 0`` is critical and does not explode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

import jacobian_lab as jl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.width))
    keys = jax.random.split(jax.random.PRNGKey(0), args.seeds)
    rows = []
    print("| family | growth rate (5-95%) | GSC(L, 0) | mean field | findings |")
    print("|---|---|---|---|---|")
    for name, net in jl.paper_architectures(depth=args.depth, width=args.width).items():
        t0 = time.perf_counter()
        ins = jl.inspect(net, None, x, keys=keys, remedies=())
        lo, hi = np.quantile(ins.growth, [0.05, 0.95])
        row = {
            "family": name,
            "growth_rate": float(np.median(ins.growth)),
            "interval": [float(lo), float(hi)],
            "gsc_L": float(np.median(ins.gsc[..., -1])),
            "theory": ins.theory.get("growth_rate"),
            "findings": [f.name for f in ins.findings],
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        theory = "" if row["theory"] is None else f"{row['theory']:.3f}"
        print(
            f"| {name} | {row['growth_rate']:.3f} ({lo:.3f}-{hi:.3f}) | {row['gsc_L']:.3g} | "
            f"{theory} | {', '.join(row['findings']) or '-'} |",
            flush=True,
        )
        print(f"{name}: {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
