"""Transformers at initialization: rank collapse, skips and normalization.

    python analyses/transformers.py [--size tiny|small|paper] [--widths ...] [--depths ...]

Built-in transformers (:func:`jacobian_lab.transformer`) on Gaussian token matrices
(``seq_len`` tokens of ``width`` i.i.d. N(0, 1) features), per seed and layer:

1. **Rank collapse** (Dong, Cordonnier & Loukas 2021, arXiv 2103.03404): the relative
   residual ``||X - 1 mean(X)^T||_F / ||X||_F`` of the token matrix
   (:func:`jacobian_lab.token_statistics`) along attention-only stacks without skips, with
   skips, and without skips but with MLPs (no normalization, in float64 so that the
   residual can be followed down to 1e-13). Doubly exponential decay means
   ``log r_{l+1} / log r_l`` stays above 1 (the paper's Theorem 2.2 bounds it by a cubic
   rate, exponent 3); a single exponential gives ratios tending to 1.
2. **GSC and dilution per sublayer** for Pre-LN, Post-LN and no-norm blocks (attention and
   MLP sublayers, ``mlp_ratio=4``): ``GSC(k, 0)`` across depth (:func:`jacobian_lab.gsc`),
   the Pythagorean decomposition of every sublayer
   (:func:`jacobian_lab.pythagorean_decomposition`) and, where the block's output is the
   plain sum (Pre-LN, no norm), the GSC across each sublayer against its branch's
   (:func:`jacobian_lab.block_gsc`). Theory: with ``|cos(f, r)|`` small,
   ``||f_l||^2 = ||f_{l+1}||^2 + ||r||^2``; a Pre-LN branch sees a normalized input, so
   ``||r||`` is the same at every sublayer and ``rho_l = ||r|| / ||f||`` falls like
   ``l^(-1/2)`` (the GSC paper's dilution, Philipp et al. arXiv 1712.05577), while Post-LN
   renormalizes the stream to ``||f||_F^2 = seq_len * width`` after every sublayer, so
   ``rho`` stays at its first value and the skip never dilutes the branch further.
3. **Residual scaling** (Noci et al. 2022, arXiv 2206.03126): the mean pairwise cosine of
   the output's tokens with ``residual_scale`` 1 and ``1/sqrt(num_blocks)``, Pre-LN and
   Post-LN, across depths.

Inputs ``x``: ``batch`` token matrices; seeds draw the params.
"""

from __future__ import annotations

from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

import jacobian_lab as jl
from jacobian_lab.experiments.constants import gaussian_inputs
from jacobian_lab.experiments.report import Analysis, Verdict, script_main
from jacobian_lab.plot import OKABE_ITO, STYLE, plot_band, save_figure

SIZES = {
    "tiny": {"widths": [8], "depths": [2, 4], "seq_len": 4, "heads": 2, "seeds": 2},
    "small": {"widths": [16, 32], "depths": [4, 12], "seq_len": 8, "heads": 4, "seeds": 2},
    "paper": {"widths": [32, 64], "depths": [4, 16, 48], "seq_len": 16, "heads": 4, "seeds": 4},
}
# the residual-scale sweep compiles two models per depth: at tiny and small on the widest
# width only, so that the report stays within a minute
for _size, _cfg in SIZES.items():
    _cfg["scale_widths"] = _cfg["widths"] if _size == "paper" else _cfg["widths"][-1:]
for _cfg in SIZES.values():
    _cfg |= {"batch": 2, "dtype": "float32"}

COLLAPSE = {  # variant -> (skips, mlp_ratio); no normalization
    "attention only": (False, 0),
    "attention + skips": (True, 0),
    "attention + MLP": (False, 4),
}
NORMS = ("pre", "post", "none")
FLOOR = 1e-13
"""Residuals below this are float64 rounding, not signal: excluded from the exponents."""


def configs(config: dict) -> list[dict]:
    common = {k: config[k] for k in ("seq_len", "heads", "seeds", "batch", "dtype")}
    deepest = max(config["depths"])
    units = [
        {"part": "collapse", "variant": v, "width": w, "blocks": deepest, **common}
        for v in COLLAPSE
        for w in config["widths"]
    ]
    units += [
        {"part": "norms", "norm": n, "width": w, "blocks": deepest, **common}
        for n in NORMS
        for w in config["widths"]
    ]
    units += [
        {"part": "scale", "norm": n, "width": w, "blocks": d, **common}
        for n in ("pre", "post")
        for w in config["scale_widths"]
        for d in config["depths"]
    ]
    return units


def _from_input(a) -> list:
    """``(seeds, batch, L+1)`` in GSC order -> per seed, median over the batch, from the
    input (index 0 = the input ``x``)."""
    return np.median(np.asarray(a, dtype=float), axis=1)[:, ::-1].tolist()


def compute(unit: dict) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(0), unit["seeds"])
    shape = (unit["batch"], unit["seq_len"], unit["width"])
    kw = {"num_heads": unit["heads"], "seq_len": unit["seq_len"]}
    if unit["part"] == "collapse":
        skips, mlp_ratio = COLLAPSE[unit["variant"]]
        with jax.enable_x64(True):  # the residual falls below float32's resolution
            m = jl.transformer(
                unit["blocks"], unit["width"], norm="none", skips=skips, mlp_ratio=mlp_ratio,
                dtype="float64", **kw,
            )  # fmt: skip
            x = gaussian_inputs(jax.random.PRNGKey(1), shape, m.dtype)
            st = jax.vmap(lambda k: jl.token_statistics(m, m.init(k), x))(keys)
            return {"residual": _from_input(st.residual), "names": list(m.names)}
    if unit["part"] == "scale":
        out = {}
        for label, scale in (("1", 1.0), ("1/sqrt(N)", unit["blocks"] ** -0.5)):
            m = jl.transformer(
                unit["blocks"], unit["width"], norm=unit["norm"], residual_scale=scale,
                dtype=unit["dtype"], **kw,
            )  # fmt: skip
            x = gaussian_inputs(jax.random.PRNGKey(1), shape, m.dtype)
            st = jax.vmap(lambda k, m=m, x=x: jl.token_statistics(m, m.init(k), x))(keys)
            out[label] = _from_input(st.cosine)
        return out
    m = jl.transformer(unit["blocks"], unit["width"], norm=unit["norm"], dtype=unit["dtype"], **kw)
    x = gaussian_inputs(jax.random.PRNGKey(1), shape, m.dtype)
    g = jax.vmap(lambda k: jl.gsc(m, m.init(k), x, method="dense"))(keys)
    d = jax.vmap(lambda k: jl.pythagorean_decomposition(m, m.init(k), x))(keys)
    # blocks nearest the output first -> from the input
    blocks = lambda a: np.median(np.asarray(a, float), axis=1)[:, ::-1].tolist()  # noqa: E731
    out = {
        "gsc": _from_input(g),
        "abs_cos": blocks(np.abs(np.asarray(d.cosine))),
        "branch_ratio": blocks(d.branch_ratio),
        "names": list(m.names),
    }
    if unit["norm"] != "post":  # Post-LN blocks end in a norm: not skip + branch
        b = jax.vmap(lambda k: jl.block_gsc(m, m.init(k), x))(keys)
        out |= {
            "block_gsc": blocks(b.gsc),
            "branch_gsc": blocks(b.branch_gsc),
            "predicted_gsc": blocks(b.predicted),
        }
    return out


def summarize(config: dict, records: list[dict]) -> dict:
    data = {"collapse": [], "norms": [], "scale": [], "table": []}
    for rec in records:
        c, r = rec["config"], rec["result"]
        data[c["part"]].append({**c, **r})
        row = {k: c.get(k, "") for k in ("part", "variant", "norm", "width", "blocks")}
        if c["part"] == "collapse":
            row |= {"final_residual": float(np.median(np.asarray(r["residual"])[:, -1]))}
            row |= {"median_exponent": _exponent(r["residual"])}
        elif c["part"] == "norms":
            row |= {
                "gsc_input": float(np.median(np.asarray(r["gsc"])[:, 0])),
                "rho_first": float(np.median(np.asarray(r["branch_ratio"])[:, 0])),
                "rho_last": float(np.median(np.asarray(r["branch_ratio"])[:, -1])),
                "median_abs_cos": float(np.median(r["abs_cos"])),
            }
        else:
            row |= {
                f"output_cosine_scale_{k}": float(np.median(np.asarray(r[k])[:, -1]))
                for k in ("1", "1/sqrt(N)")
            }
        data["table"].append(row)
    return data


def _exponent(residual) -> float:
    """Median over seeds and layers of ``log r_{l+1} / log r_l`` where ``r_l < 0.5`` (well
    inside the contracting regime, so the ratio is well conditioned) and ``r_{l+1}`` is
    above the rounding floor; NaN when no layer qualifies."""
    r = np.asarray(residual, dtype=float)
    a, b = r[:, :-1], r[:, 1:]
    ok = (a < 0.5) & (b > FLOOR)
    if not ok.any():
        return float("nan")
    return float(np.median(np.log(b[ok]) / np.log(a[ok])))


def pre_ln_ratio(rho_1, l):
    """``rho_l = rho_1 / sqrt(1 + (l - 1) rho_1^2)``: a Pre-LN branch sees a normalized
    input, so every branch has about the same ``||r||^2 = rho_1^2 ||x||^2``, and with the
    Pythagorean equation ``||f_l||^2 = ||x||^2 + (l - 1) ||r||^2`` before sublayer ``l``."""
    l = np.asarray(l, dtype=float)
    return rho_1 / np.sqrt(1 + (l - 1) * rho_1**2)


def _attn_positions(names) -> np.ndarray:
    """Index (from the input, 0 = x) of the layer after each attention sublayer."""
    return np.array([0] + [i + 1 for i, n in enumerate(names) if n.endswith(".attn")])


def plot(data: dict, folder: Path, formats) -> list[Path]:
    widths = sorted({u["width"] for u in data["norms"]})
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(6.75, 5.2))
        below = {"frameon": False, "fontsize": 5.5}

        ax = axes[0, 0]
        for i, (variant, _) in enumerate(COLLAPSE.items()):
            for j, u in enumerate(
                sorted(
                    (u for u in data["collapse"] if u["variant"] == variant),
                    key=lambda u: u["width"],
                )
            ):
                r = np.asarray(u["residual"], dtype=float)
                r = np.where(r > FLOOR, r, np.nan)  # rounding, or exactly equal tokens
                style = {"color": OKABE_ITO[4 + i if i < 3 else i], "linestyle": ("-", "--")[j % 2]}
                label = f"{variant}, width {u['width']}"
                plot_band(ax, np.arange(r.shape[1]), r, label=label, style=style, log=True)
        ax.set_yscale("log")
        ax.set_ylim(FLOOR / 3, 2)
        ax.set_xlabel("layer output, from the input (0 = x)")
        ax.set_ylabel("||X - 1 mean(X)^T||_F / ||X||_F")
        ax.set_title("(a) rank collapse, no normalization", fontsize=8)
        ax.legend(loc="lower left", **below)

        ax = axes[0, 1]
        for i, norm in enumerate(NORMS):
            for j, u in enumerate(
                sorted((u for u in data["norms"] if u["norm"] == norm), key=lambda u: u["width"])
            ):
                g = np.asarray(u["gsc"])
                style = {"color": OKABE_ITO[[4, 5, 3][i]], "linestyle": ("-", "--")[j % 2]}
                plot_band(
                    ax,
                    np.arange(g.shape[1]),
                    g,
                    label=f"{norm}-LN, width {u['width']}"
                    if norm != "none"
                    else f"no norm, width {u['width']}",
                    style=style,
                    log=True,
                )
        ax.set_yscale("log")
        ax.set_xlabel("layer k, from the input (0 = x)")
        ax.set_ylabel("GSC(k, 0)")
        ax.set_title("(b) GSC from each layer to the output", fontsize=8)
        ax.legend(**below)

        ax = axes[1, 0]
        for i, norm in enumerate(NORMS):
            for j, u in enumerate(
                sorted((u for u in data["norms"] if u["norm"] == norm), key=lambda u: u["width"])
            ):
                rho = np.asarray(u["branch_ratio"])
                n = np.arange(1, rho.shape[1] + 1)
                style = {"color": OKABE_ITO[[4, 5, 3][i]], "linestyle": ("-", "--")[j % 2]}
                lab = f"{norm}-LN" if norm != "none" else "no norm"
                plot_band(ax, n, rho, label=f"{lab}, width {u['width']}", style=style, log=True)
                if norm == "pre" and j == len(widths) - 1:
                    rho_1 = float(np.exp(np.log(rho[:, 0]).mean()))
                    theory = "theory (Pre-LN): rho_1 / sqrt(1 + (l-1) rho_1^2)"
                    ax.plot(n, pre_ln_ratio(rho_1, n), ":", color=OKABE_ITO[0], label=theory)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sublayer l, from the input")
        ax.set_ylabel("rho = ||r|| / ||f||")
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100) if t <= rho.shape[1]]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yticks([0.1, 0.2, 0.5, 1.0], ["0.1", "0.2", "0.5", "1"])
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(NullFormatter())
        ax.set_title("(c) branch size relative to the stream", fontsize=8)
        ax.legend(ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.22), **below)

        ax = axes[1, 1]
        for i, norm in enumerate(("pre", "post")):
            for j, w in enumerate(sorted({u["width"] for u in data["scale"]})):
                us = sorted(
                    (u for u in data["scale"] if u["norm"] == norm and u["width"] == w),
                    key=lambda u: u["blocks"],
                )
                if not us:
                    continue
                n = [u["blocks"] for u in us]
                for s, label in enumerate(("1", "1/sqrt(N)")):
                    v = np.stack([np.asarray(u[label])[:, -1] for u in us], axis=1)
                    style = {
                        "color": OKABE_ITO[[4, 5][i] if s == 0 else [2, 1][i]],
                        "linestyle": ("-", "--")[j % 2],
                        "marker": "o",
                        "ms": 3,
                    }
                    plot_band(ax, n, v, label=f"{norm}-LN, alpha = {label}, width {w}", style=style)
        ax.set_xscale("log")
        ax.set_xticks(
            sorted({u["blocks"] for u in data["scale"]}),
            [str(b) for b in sorted({u["blocks"] for u in data["scale"]})],
        )
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("transformer blocks N")
        ax.set_ylabel("mean pairwise token cosine at the output")
        ax.set_title("(d) residual scaling alpha (Noci et al.)", fontsize=8)
        ax.legend(ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.22), **below)
        fig.tight_layout()
        return save_figure(fig, folder / "transformers", formats)


def _pooled(units, field) -> float:
    return float(np.median(np.concatenate([np.ravel(u[field]) for u in units])))


def _med(units, field, index):
    return float(np.median([np.asarray(u[field])[:, index] for u in units]))


def verdicts(data: dict) -> list[Verdict]:
    out = []
    by = {v: [u for u in data["collapse"] if u["variant"] == v] for v in COLLAPSE}
    if all(by.values()):
        pure, skip, mlp = by["attention only"], by["attention + skips"], by["attention + MLP"]
        exps = [_exponent(u["residual"]) for u in pure]
        final = _med(pure, "residual", -1)
        out.append(
            Verdict(
                "Pure attention (no skips, no MLP, no norm) loses rank doubly exponentially "
                "(Dong et al. 2021)",
                bool(np.all(np.array(exps) > 1.5)) and final < 1e-6,
                f"per-layer exponent log r_(l+1) / log r_l = "
                f"{', '.join(f'{e:.2f}' for e in exps)} (widths {[u['width'] for u in pure]}; "
                f"> 1 is doubly exponential, 1 a single exponential; theory: Dong et al. "
                f"Theorem 2.2 bounds it with exponent 3); residual {final:.2e} after "
                f"{pure[0]['blocks']} layers (from {_med(pure, 'residual', 0):.3f} at x)",
            )
        )
        r_skip = _med(skip, "residual", -1)
        out.append(
            Verdict(
                "Skip connections stop the rank collapse of attention-only stacks",
                r_skip > 1e-3 and r_skip > 1e3 * final,
                f"residual after {skip[0]['blocks']} attention layers {r_skip:.3g} with skips "
                f"vs {final:.2e} without (no closed form for the rate with skips at this "
                "initialization: Dong et al. bound pure attention only)",
            )
        )
        # compare after the same number of attention sublayers
        pos = _attn_positions(mlp[0]["names"])
        k = min(len(pos) - 1, 2)
        r_mlp, r_pure = _med(mlp, "residual", int(pos[k])), _med(pure, "residual", k)
        out.append(
            Verdict(
                "MLPs slow the rank collapse of attention without skips (Dong et al. 2021)",
                r_mlp > r_pure,
                f"residual after {k} attention sublayers: {r_mlp:.3g} with an MLP after each "
                f"vs {r_pure:.3g} without (no skips, no norm, GELU MLP of ratio 4, LeCun "
                "init; the paper's bound grows with the MLP's Lipschitz constant, an upper "
                "bound only, no closed form for the rate)",
            )
        )
    norms = {n: [u for u in data["norms"] if u["norm"] == n] for n in NORMS}
    if all(norms.values()):
        for n in ("pre", "none"):
            us = norms[n]
            block, branch = _pooled(us, "block_gsc"), _pooled(us, "branch_gsc")
            err = max(
                float(np.median(np.abs(np.divide(u["predicted_gsc"], u["block_gsc"]) - 1)))
                for u in us
            )
            rho0, rho1 = _med(us, "branch_ratio", 0), _med(us, "branch_ratio", -1)
            theory = pre_ln_ratio(rho0, np.asarray(us[0]["branch_ratio"]).shape[1])
            out.append(
                Verdict(
                    "The skip dilutes each sublayer's branch, as in the GSC paper "
                    f"({'Pre-LN' if n == 'pre' else 'no normalization'})",
                    abs(np.log(block)) <= abs(np.log(branch)) and err < 0.1,
                    f"median GSC across a sublayer {block:.3f} vs {branch:.3f} for its branch; "
                    f"Pythagorean prediction within {100 * err:.1f}% (median); median "
                    f"|cos(f, r)| {_pooled(us, 'abs_cos'):.3f}; rho = ||r||/||f|| from "
                    f"{rho0:.3f} (first sublayer) to {rho1:.3f} (last)"
                    + (
                        f", theory rho_1 / sqrt(1 + (l-1) rho_1^2) = {theory:.3f}"
                        if n == "pre"
                        else ""
                    )
                    + f"; GSC(input, output) {_med(us, 'gsc', 0):.3g}",
                )
            )
        post, pre = norms["post"], norms["pre"]
        p0, p1 = _med(post, "branch_ratio", 0), _med(post, "branch_ratio", -1)
        q0, q1 = _med(pre, "branch_ratio", 0), _med(pre, "branch_ratio", -1)
        out.append(
            Verdict(
                "Post-LN renormalizes the stream, so the skip does not dilute deep branches "
                "(Xiong et al. 2020; Liu et al. 2020)",
                p1 > 0.5 * p0 and p1 > 2 * q1,
                f"rho = ||r||/||f|| from {p0:.3f} to {p1:.3f} along Post-LN sublayers (theory: "
                "the stream is reset to norm sqrt(seq_len * width) after every sublayer, so rho "
                f"does not fall), vs {q0:.3f} to {q1:.3f} for Pre-LN; GSC(input, output) "
                f"{_med(post, 'gsc', 0):.3g} Post-LN, {_med(pre, 'gsc', 0):.3g} Pre-LN, "
                f"{_med(norms['none'], 'gsc', 0):.3g} no norm (Xiong et al.'s Theorem 1 is "
                "about the gradient of the last layers' weights, not measured here)",
            )
        )
    if data["scale"]:
        deepest = max(u["blocks"] for u in data["scale"])
        shallow = min(u["blocks"] for u in data["scale"])
        for n in ("pre", "post"):
            deep = [u for u in data["scale"] if u["norm"] == n and u["blocks"] == deepest]
            flat = [u for u in data["scale"] if u["norm"] == n and u["blocks"] == shallow]
            if not deep:
                continue
            c1, cs = _med(deep, "1", -1), _med(deep, "1/sqrt(N)", -1)
            s1, ss = _med(flat, "1", -1), _med(flat, "1/sqrt(N)", -1)
            out.append(
                Verdict(
                    "Scaling the residual branches by 1/sqrt(N) keeps the tokens apart with "
                    f"depth ({n}-LN, Noci et al. 2022)",
                    cs < c1 and (cs - ss) < (c1 - s1),
                    f"mean token cosine at the output: {c1:.3f} (alpha = 1) vs {cs:.3f} "
                    f"(alpha = 1/sqrt(N)) at N = {deepest}; {s1:.3f} vs {ss:.3f} at N = "
                    f"{shallow}; input {_med(deep, '1', 0):.3f} (no closed form used here: the "
                    "paper's correlation recursion is for a simplified attention model, not "
                    "reproduced)",
                )
            )
    return out


ANALYSIS = Analysis(
    name="transformers",
    title="Transformers at initialization: rank collapse, skips and normalization",
    claim="Pure self-attention loses rank doubly exponentially with depth and skips stop it "
    "(Dong et al., arXiv 2103.03404); residual branches scaled by 1/sqrt(depth) keep the "
    "tokens from aligning (Noci et al., arXiv 2206.03126); Pre-LN and Post-LN propagate "
    "gradients differently at initialization (Xiong et al., arXiv 2002.04745; Liu et al., "
    "arXiv 2004.08249).",
    sizes=SIZES,
    configs=configs,
    compute=compute,
    summarize=summarize,
    plot=plot,
    verdicts=verdicts,
    notes="Built-in transformers, LeCun-normal weights, zero biases, Gaussian token inputs, "
    "no positional encoding. The rank-collapse part runs in float64 whatever --dtype says. The "
    "residual uses the Frobenius norm (Dong et al. bound the l_(1,inf) composite norm). "
    "Exponents are medians over layers with 1e-13 < r_(l+1) and r_l < 0.5.",
)

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
