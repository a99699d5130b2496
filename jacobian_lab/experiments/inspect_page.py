"""``jacobian-lab inspect FILE.py:FACTORY``: a researcher's model through
:func:`jacobian_lab.inspect`, written as a page with figures, JSON and CSV.

The factory is any function in the file. It is called with a PRNG key when it takes an
argument (so ``--seeds`` can rebuild the model once per seed), and returns one of

* ``(model, params, x)`` with ``model`` a :class:`jacobian_lab.Model` (a built-in network,
  a chain already read);
* ``(model, x)`` with the model as written (a bound Flax linen module, an NNX or Equinox
  module, a plain-JAX ``(apply_fn, params)`` pair): read by ``jl.chain(model, x, at=...)``;
* ``(apply_fn, params, x)`` for a plain-JAX model with ``jl.tap`` marks.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import inspect as pyinspect
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jacobian_lab as jl
from jacobian_lab import plot
from jacobian_lab.experiments.report import jsonable
from jacobian_lab.experiments.runner import prepare_output_dir, writing


def load_factory(spec: str) -> Callable:
    """The function ``FACTORY`` of ``FILE.py`` for ``spec = "FILE.py:FACTORY"``."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"expected FILE.py:FACTORY (a file and a function in it), got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"model file {str(file)!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_jl_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.resolve().parent))  # the file may import its neighbours
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if not callable(factory):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ValueError(
            f"{file.name} has no function {name!r}; its functions: {', '.join(found) or 'none'}"
        )
    return factory


def takes_key(factory: Callable) -> bool:
    """Whether ``factory`` takes an argument (the PRNG key)."""
    try:
        params = pyinspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        and p.default is p.empty
        for p in params
    )


def build(factory: Callable, key, *, at=None, dtype: str | None = None):
    """``(model, params, x)`` from the factory's return value (see the module docstring),
    with float leaves of ``params`` and ``x`` cast to ``dtype`` where given."""
    made = factory(key) if takes_key(factory) else factory()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise ValueError(
            "the factory must return (model, params, x), (model, x) or (apply_fn, params, x); "
            f"got {type(made).__name__}"
            + (f" of length {len(made)}" if isinstance(made, tuple) else "")
        )
    if dtype is not None:
        made = tuple(_cast(m, dtype) if i else m for i, m in enumerate(made))
    if len(made) == 3 and isinstance(made[0], jl.Model):
        if at is not None:
            raise ValueError("--at applies to a model read whole, not to a jl.Model")
        return made
    if len(made) == 3:
        model, params = jl.chain((made[0], made[1]), made[2], at=at)
        return model, params, made[2]
    model, params = jl.chain(made[0], made[1], at=at)
    return model, params, made[1]


def _cast(tree, dtype: str):
    def one(a):
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.asarray(a, dtype)
        return a

    return jax.tree_util.tree_map(one, tree)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def write_outputs(
    out: Path, ins: jl.Inspection, model, params, x, *, title: str, formats, seconds: float
) -> list[Path]:
    """The page (``inspection.html``), ``inspection.json``, ``layers.csv``,
    ``remedies.csv`` and the figures under ``out``; returns the paths written."""
    written = []
    data = ins.to_json()
    data["title"] = title
    data["seconds"] = seconds
    with writing(out / "inspection.json"):
        (out / "inspection.json").write_text(json.dumps(jsonable(data), indent=1))
    written.append(out / "inspection.json")
    rows = ins.to_records()
    with writing(out / "layers.csv"), open(out / "layers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    written.append(out / "layers.csv")
    metrics = sorted({k for r in ins.remedies for k in (*r.before, *r.after)})
    with writing(out / "remedies.csv"), open(out / "remedies.csv", "w", newline="") as f:
        w = csv.writer(f)
        kinds = ("before", "after", "predicted")
        w.writerow(["remedy", "applies", *[f"{m}_{t}" for m in metrics for t in kinds]])
        for r in ins.remedies:
            w.writerow(
                [r.name, r.applies] + [getattr(r, t).get(m, "") for m in metrics for t in kinds]
            )
    written.append(out / "remedies.csv")

    figures = _figures(out, ins, model, params, x, formats)
    written += [p for ps in figures.values() for p in ps]
    _write_page(out, ins, title, figures, seconds)
    written.append(out / "inspection.html")
    return written


def _figures(out, ins, model, params, x, formats) -> dict[str, list[Path]]:
    """name -> paths. Drawn from the inspection; the block and token panels from the
    block and token diagnostics of the first seed."""
    figs = {}
    theory = None
    if "growth_rate" in ins.theory:
        r = ins.theory["growth_rate"]
        theory = lambda k: np.asarray(r, float) ** np.asarray(k, float)  # noqa: E731
    ax = plot.gsc_profile(ins.gsc, theory=theory, label="measured")
    ax.set_title("GSC(k, 0): the gradient from layer k to the output")
    figs["gsc_profile"] = plot.save_figure(ax, out / "gsc_profile", formats)
    if ins.spectrum is not None:
        ax = plot.spectrum(ins.spectrum)
        ax.set_title("input-output Jacobian: squared singular values")
        figs["spectrum"] = plot.save_figure(ax, out / "spectrum", formats)
    if model.block_outputs:
        ax = plot.pythagorean(jl.pythagorean_decomposition(model, params, x))
        figs["pythagorean"] = plot.save_figure(ax, out / "pythagorean", formats)
        if "block_gsc" in ins.columns:
            with_warnings_kept = jl.block_gsc(model, params, x)
            ax = plot.block_gsc(with_warnings_kept)
            figs["block_gsc"] = plot.save_figure(ax, out / "block_gsc", formats)
    if "token_residual" in ins.columns:
        ax = plot.tokens(jl.token_statistics(model, params, x))
        figs["tokens"] = plot.save_figure(ax, out / "tokens", formats)
    applied = [r for r in ins.remedies if r.applies and r.after]
    if applied:
        fig = plot.remedies(applied, metrics=["log10_gsc_L", "growth_rate", "output_cosine"])
        figs["remedies"] = plot.save_figure(fig, out / "remedies", formats)
    return figs


def _write_page(out: Path, ins: jl.Inspection, title: str, figures: dict, seconds: float):
    rows = ins.to_records()
    cols = [c for c in rows[0] if c not in ("layer", "l", "block")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["layer", "l", *cols])
    body = "".join(
        "<tr>"
        + f"<td>{html.escape(r['layer'])}{' (block)' if r['block'] else ''}</td><td>{r['l']}</td>"
        + "".join(f"<td>{_fmt(r[c])}</td>" for c in cols)
        + "</tr>"
        for r in rows
    )
    findings = (
        "".join(
            f"<li><b>{html.escape(f.name)}</b>: {html.escape(f.message)} (threshold {f.threshold:g}"
            + (f"; mean-field prediction {f.theory:.4g}" if f.theory is not None else "")
            + ")"
            + (f"<br><small>{html.escape(', '.join(f.layers))}</small>" if f.layers else "")
            + "</li>"
            for f in ins.findings
        )
        or "<li>none of the documented thresholds is crossed</li>"
    )
    remedy_rows = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{'yes' if r.applies else 'no'}</td>"
        f"<td>{html.escape(r.why)}</td>"
        + "".join(
            f"<td>{_fmt(r.before.get(m, math.nan))} &rarr; {_fmt(r.after.get(m, math.nan))}"
            + (f"<br><small>predicted {_fmt(r.predicted[m])}</small>" if m in r.predicted else "")
            + "</td>"
            for m in ("gsc_L", "growth_rate", "output_cosine", "length_ratio")
        )
        + f"<td><pre>{html.escape(json.dumps(jsonable(r.setting), indent=1))}</pre>"
        + (f"<small>{html.escape(r.prediction)}</small>" if r.prediction else "")
        + "</td></tr>"
        for r in ins.remedies
    )
    imgs = "".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(n)}"></figure>'
        for n, ps in figures.items()
        for p in ps
        if p.suffix == ".png"
    )
    spec = ins.spectrum_summary()
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto;line-height:1.4}"
        "img{max-width:100%;display:block;margin:1em 0}section{border-top:1px solid #ccc;"
        "margin-top:2em}table{border-collapse:collapse;font-size:85%}td,th{border:1px solid "
        "#ccc;padding:0.2em 0.4em;vertical-align:top}pre{margin:0}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{ins.num_layers} layer outputs; GSC method "
        f"{html.escape(ins.method)}; {ins.gsc.shape[0]} seed(s) of {ins.gsc.shape[1]} sample(s); "
        f"{seconds:.1f} s. Indexing of the GSC paper (arXiv 1712.05577): l = 0 is the output, "
        f"l = L the input.</p>"
        f"<section><h2>Findings</h2><ul>{findings}</ul>"
        + (f"<p>Mean field: {html.escape(json.dumps(ins.theory))}</p>" if ins.theory else "")
        + "</section><section><h2>Remedies, applied and measured again, beside their "
        "predictions</h2><table><tr>"
        "<th>remedy</th><th>applies</th><th>what</th><th>GSC(L, 0)</th><th>growth rate</th>"
        "<th>output cosine</th><th>||f_0|| / ||f_L||</th><th>setting; how the prediction "
        f"was made</th></tr>{remedy_rows}"
        "</table></section>"
        f"<section><h2>Figures</h2>{imgs}</section>"
        f"<section><h2>Input-output Jacobian</h2><pre>{html.escape(json.dumps(spec, indent=1))}"
        "</pre></section>"
        f"<section><h2>Layers</h2><table><tr>{head}</tr>{body}</table></section>"
        + (
            "<section><h2>Notes</h2><ul>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in ins.notes)
            + "</ul></section>"
            if ins.notes
            else ""
        )
        + "</body></html>"
    )
    with writing(out / "inspection.html"):
        (out / "inspection.html").write_text(page)


def run(args, log: Callable[[str], None]) -> int:
    """The ``inspect`` command (see :func:`jacobian_lab.experiments.cli.build_parser`)."""
    factory = load_factory(args.factory)
    remedies = tuple(dict.fromkeys(args.remedies)) if args.remedies != ["none"] else ()
    at = args.at
    key = jax.random.PRNGKey(args.seed)
    if args.seeds > 1 and not takes_key(factory):
        raise ValueError("--seeds needs a factory that takes a PRNG key (to rebuild the model)")
    t0 = time.perf_counter()
    log(f"reading the model from {args.factory}")
    model, params, x = build(factory, key, at=at, dtype=args.dtype)
    keys = init = None
    if args.seeds > 1:
        keys = jax.random.split(key, args.seeds)
        init = lambda k: build(factory, k, at=at, dtype=args.dtype)[1]  # noqa: E731
    ins = jl.inspect(
        model,
        params,
        x,
        keys=keys,
        init=init,
        method=args.method,
        remedies=remedies,
        alpha=args.alpha,
        progress=lambda line: log(f"   {line}"),
    )
    out = prepare_output_dir(args.out)
    seconds = time.perf_counter() - t0
    log("writing the page, figures, JSON and CSV")
    formats = list(dict.fromkeys([*args.formats, "png"]))
    written = write_outputs(
        out,
        ins,
        model,
        params,
        x,
        title=f"jacobian_lab inspect {args.factory}",
        formats=formats,
        seconds=seconds,
    )
    for f in ins.findings:
        print(f"finding: {f.message}")
    for r in ins.remedies:
        if r.applies:
            print(
                f"remedy {r.name}: GSC(L, 0) {r.before.get('gsc_L', math.nan):.4g} -> "
                f"{r.after.get('gsc_L', math.nan):.4g}, growth rate "
                f"{r.before.get('growth_rate', math.nan):.4f} -> "
                f"{r.after.get('growth_rate', math.nan):.4f}"
                + (
                    f" (predicted {r.predicted['growth_rate']:.4f})"
                    if "growth_rate" in r.predicted
                    else ""
                )
            )
        else:
            print(f"remedy {r.name}: does not apply ({r.why})")
    print(f"inspection: {out / 'inspection.html'} ({len(written)} files) in {seconds:.0f}s")
    return 0
