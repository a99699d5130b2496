"""Analyses with verdicts, and the report page that collects them.

An :class:`Analysis` (one per module of :mod:`jacobian_lab.experiments`, each also a
script in ``analyses/``) states an experiment: its configurations at a few sizes, how to
compute one configuration (the unit that is saved as soon as it finishes and skipped when
a run resumes), how to summarize the records into the numbers that are saved, how to plot
from those saved numbers, and which verdicts they decide. :func:`run_analysis` runs one
into ``<out>/<name>/``; :func:`write_report` collects several into ``report.md`` and
``report.html``.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax

from jacobian_lab.experiments.claims import claims_table
from jacobian_lab.experiments.runner import (
    SweepStopped,
    is_writer,
    prepare_output_dir,
    run_sweep,
    stop_on_interrupt,
    writing,
)
from jacobian_lab.plot import FIGURE_FORMATS

SIZES = ("tiny", "small", "paper")
"""``tiny``: seconds, for tests; ``small``: minutes on a 2-core CPU (the default);
``paper``: the sizes of the papers' experiments."""

OVERRIDABLE = ("depths", "widths", "seeds", "batch", "dtype", "data")


class Verdict(NamedTuple):
    """One claim, whether the measurement supports it, and the numbers that decide it.

    ``claims``: the ids of the source claims this verdict decides (``D1.1`` ... ``P5``, see
    :data:`jacobian_lab.experiments.claims.CLAIMS`); the report's claims table is built
    from them."""

    claim: str
    holds: bool
    measured: str
    claims: tuple[str, ...] = ()

    @property
    def line(self) -> str:
        return f"{self.claim}: {self.measured} [{'holds' if self.holds else 'does not hold'}]"


class Analysis(NamedTuple):
    """An experiment as data and pure functions (see the module docstring).

    Fields:
        name: short identifier, also the output sub-folder.
        title: one-line title for the report.
        claim: the paper's claim being checked, with its reference.
        sizes: for each of :data:`SIZES`, the default config (a JSON-able dict).
        configs: ``config -> [unit config]``; each unit is computed and saved on its own.
        compute: ``unit config -> result`` (JSON-able dict).
        summarize: ``(config, records) -> data``; ``data["table"]``, if present, is a list
            of flat dicts also written as CSV.
        plot: ``(data, folder, formats) -> [paths]``; draws only from ``data``.
        verdicts: ``data -> [Verdict]``.
        notes: what a reader should know to interpret the verdicts (departures from the
            papers' setups, known finite-size effects); shown in the report.
    """

    name: str
    title: str
    claim: str
    sizes: Mapping[str, dict]
    configs: Callable[[dict], list[dict]]
    compute: Callable[[dict], dict]
    summarize: Callable[[dict, list[dict]], dict]
    plot: Callable[[dict, Path, Sequence[str]], list[Path]]
    verdicts: Callable[[dict], list[Verdict]]
    notes: str = ""


class AnalysisResult(NamedTuple):
    name: str
    title: str
    claim: str
    notes: str
    config: dict
    files: list[Path]
    figures: list[Path]
    verdicts: list[Verdict]
    seconds: float


def analysis_config(analysis: Analysis, size: str = "small", **overrides: Any) -> dict:
    """The config of ``analysis`` at ``size``, with ``overrides`` (those not None) applied
    to the keys the analysis has; other overrides are ignored (not every analysis sweeps
    widths, say). A list given twice over (``--depths 2 2``) keeps its first occurrence of
    each value: a configuration is computed once and counted once in the verdicts.
    Checked here, before any work, for every analysis: positive depths and widths, seeds
    >= 1, batch >= 2, and :func:`check_batch_norm`."""
    if size not in analysis.sizes:
        raise ValueError(f"unknown size {size!r}; expected one of {tuple(analysis.sizes)}")
    config = json.loads(json.dumps(analysis.sizes[size]))
    for key, value in overrides.items():
        if value is not None and key in config:
            value = list(value) if isinstance(value, tuple) else value
            config[key] = list(dict.fromkeys(value)) if isinstance(value, list) else value
    for key in ("depths", "widths"):
        if key in config and any(int(v) < 1 for v in config[key]):
            raise ValueError(f"{key} must be positive integers, got {config[key]}")
    if config.get("seeds", 1) < 1 or config.get("batch", 2) < 2:
        raise ValueError("seeds must be >= 1 and batch >= 2")
    check_batch_norm(analysis, config)
    return config


def uses_batch_norm(unit: dict) -> bool:
    """Whether a unit config runs a batch-norm network: a zoo architecture with ``batch``
    among the dash-separated parts of its name, or ``norm="batch"``."""
    return unit.get("norm") == "batch" or "batch" in str(unit.get("arch", "")).split("-")


def check_batch_norm(analysis: Analysis, config: dict) -> None:
    """Raise ``ValueError`` when a unit of ``analysis`` at ``config`` runs a batch-norm
    network on batches of fewer than :data:`jacobian_lab.meanfield.MIN_BATCH_SIZE` inputs:
    its backward pass divides by the batch variance, whose inverse has infinite mean below
    4 (no mean-field prediction), and a batch of 2 normalizes every unit to +-1 (a
    degenerate network that used to get a "holds" verdict). The one check for every
    analysis."""
    from jacobian_lab.meanfield import MIN_BATCH_SIZE

    for unit in analysis.configs(config):
        batch = unit.get("batch")
        if isinstance(batch, int) and batch < MIN_BATCH_SIZE and uses_batch_norm(unit):
            which = unit.get("arch") or f"norm={unit.get('norm')}"
            raise ValueError(
                f"--batch {batch}: {analysis.name} runs batch-norm networks ({which}), which "
                f"need batches of at least {MIN_BATCH_SIZE} inputs (batch norm divides by the "
                "batch variance); use --batch 4 or more, or analyses without batch norm"
            )


def jsonable(value: Any) -> Any:
    """Nested lists/dicts of plain floats, with non-finite floats as None (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def environment() -> dict:
    """Library versions and the device, saved beside every result."""
    from jacobian_lab import __version__

    return {
        "jacobian_lab": __version__,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "device": str(jax.devices()[0]),
        "platform": jax.default_backend(),
    }


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_analysis(
    analysis: Analysis,
    config: dict,
    out: str | Path,
    *,
    formats: Sequence[str] = ("pdf", "png"),
    log: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> AnalysisResult:
    """Run ``analysis`` with ``config`` into ``<out>/<analysis.name>/``.

    Writes ``records.jsonl`` (one line per finished unit; re-running resumes from it),
    ``<name>.json`` (config, environment, summarized numbers and verdicts), ``<name>.csv``
    when the summary has a table, and the figures (plotted from the saved JSON). ``stop``
    is passed to :func:`~jacobian_lab.experiments.runner.run_sweep` (which raises
    :class:`~jacobian_lab.experiments.runner.SweepStopped` when it returns true). Only
    JAX process 0 writes files; the others compute the same numbers and verdicts (their
    result lists the files process 0 writes, but no figures).
    """
    log = log or _log_stderr
    writer = is_writer()
    folder = prepare_output_dir(Path(out) / analysis.name)
    t0 = time.perf_counter()
    units = analysis.configs(config)
    path = folder / "records.jsonl"
    resumed = path.exists() and path.stat().st_size > 0
    records = list(run_sweep(units, analysis.compute, path, log=log, stop=stop))
    try:
        data = jsonable(analysis.summarize(config, records))
    except (KeyError, TypeError, IndexError) as err:
        if not resumed:
            raise
        # records reused from the file whose results lack what this version reads (another
        # version's, without a version stamp): set the file aside and compute afresh
        stale = path.with_name(f"records.stale-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        if writer:
            path.rename(stale)
        log(
            f"warning: the records in {path} do not fit this version of {analysis.name} "
            f"({type(err).__name__}: {err}); moved them to {stale.name} and recomputing"
        )
        records = list(run_sweep(units, analysis.compute, path, log=log, stop=stop))
        data = jsonable(analysis.summarize(config, records))
    payload = {"analysis": analysis.name, "config": config, **environment(), "data": data}
    json_path = folder / f"{analysis.name}.json"
    files = [json_path]
    if not writer:  # judge the numbers as they would be saved, and write nothing
        saved = json.loads(json.dumps(data))
        if data.get("table"):
            files.append(folder / f"{analysis.name}.csv")
        return AnalysisResult(
            analysis.name,
            analysis.title,
            analysis.claim,
            analysis.notes,
            config,
            files,
            [],
            analysis.verdicts(saved),
            time.perf_counter() - t0,
        )
    with writing(json_path):
        json_path.write_text(json.dumps(payload, indent=1))
    if data.get("table"):
        csv_path = folder / f"{analysis.name}.csv"
        with writing(csv_path), csv_path.open("w", newline="") as fh:
            columns = dict.fromkeys(k for row in data["table"] for k in row)
            writer = csv.DictWriter(fh, fieldnames=list(columns), restval="")
            writer.writeheader()
            writer.writerows(data["table"])
        files.append(csv_path)

    saved = json.loads(json_path.read_text())["data"]  # plot and judge the saved numbers
    with writing(folder):  # the figures' file names are in matplotlib's errors
        figures = analysis.plot(saved, folder, formats)
    verdicts = analysis.verdicts(saved)
    payload["verdicts"] = jsonable([v._asdict() for v in verdicts])
    with writing(json_path):
        json_path.write_text(json.dumps(payload, indent=1))
    seconds = time.perf_counter() - t0
    return AnalysisResult(
        analysis.name,
        analysis.title,
        analysis.claim,
        analysis.notes,
        config,
        files,
        figures,
        verdicts,
        seconds,
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def write_report(out: str | Path, results: Sequence[AnalysisResult]) -> list[Path]:
    """Write ``report.md`` and ``report.html`` in ``out``: per analysis its claim, verdicts,
    figures (PNG), data files and config. Returns both paths (written by JAX process 0
    only)."""
    out = Path(out)
    md_path, html_path = out / "report.md", out / "report.html"
    if not is_writer():
        return [md_path, html_path]
    env = environment()
    held = sum(v.holds for r in results for v in r.verdicts)
    total = sum(len(r.verdicts) for r in results)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    env_line = ", ".join(f"{k} {v}" for k, v in env.items())

    md = [
        "# jacobian_lab report",
        "",
        f"{stamp}; {env_line}. {held} of {total} verdicts hold.",
        "",
        "## Claims",
        "",
        "| id | claim | measured by | verdict | key number |",
        "|---|---|---|---|---|",
    ]
    rows = claims_table(results)
    md += [
        f"| {c.id} | {_md_cell(c.text)} ({c.source}) | {', '.join(c.analyses) or '-'} | "
        f"{c.status} | {_md_cell(c.evidence)} |"
        for c in rows
    ]
    md += [""]
    table = "".join(
        f"<tr><td>{c.id}</td><td>{html.escape(c.text)} ({html.escape(c.source)})</td>"
        f"<td>{html.escape(', '.join(c.analyses) or '-')}</td><td>{html.escape(c.status)}</td>"
        f"<td>{html.escape(c.evidence)}</td></tr>"
        for c in rows
    )
    body = [
        "<section><h2>Claims</h2><table><tr><th>id</th><th>claim</th><th>measured by</th>"
        f"<th>verdict</th><th>key number</th></tr>{table}</table></section>"
    ]
    for r in results:
        md += [f"## {r.title}", "", f"**Claim.** {r.claim}", ""]
        md += [f"*Notes.* {r.notes}", ""] if r.notes else []
        md += [f"- {'✔' if v.holds else '✘'} {v.line}" for v in r.verdicts]
        md += [""]
        md += [f"![{r.name}]({p.relative_to(out)})" for p in r.figures if p.suffix == ".png"]
        links = ", ".join(f"[{p.name}]({p.relative_to(out)})" for p in r.files + r.figures)
        md += ["", f"Files: {links}. Run time {r.seconds:.1f} s.", ""]
        md += ["Config: `" + json.dumps(r.config) + "`", ""]

        items = "".join(
            f'<li class="{"ok" if v.holds else "no"}">{"✔" if v.holds else "✘"} '
            f"{html.escape(v.line)}</li>"
            for v in r.verdicts
        )
        imgs = "".join(
            f'<img src="{html.escape(str(p.relative_to(out)))}" alt="{html.escape(r.name)}">'
            for p in r.figures
            if p.suffix == ".png"
        )
        file_links = ", ".join(
            f'<a href="{html.escape(str(p.relative_to(out)))}">{html.escape(p.name)}</a>'
            for p in r.files + r.figures
        )
        body.append(
            f"<section><h2>{html.escape(r.title)}</h2>"
            f"<p><b>Claim.</b> {html.escape(r.claim)}</p>"
            + (f"<p><i>Notes.</i> {html.escape(r.notes)}</p>" if r.notes else "")
            + f"<ul>{items}</ul>{imgs}"
            f"<p>Files: {file_links}. Run time {r.seconds:.1f} s.</p>"
            f"<details><summary>config</summary><pre>{html.escape(json.dumps(r.config, indent=1))}"
            f"</pre></details></section>"
        )
    with writing(md_path):
        md_path.write_text("\n".join(md))
    with writing(html_path):
        html_path.write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>jacobian_lab report</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
            "img{max-width:100%;display:block;margin:1em 0}li.ok{color:#006d4f}"
            "li.no{color:#a63d00}section{border-top:1px solid #ccc;margin-top:2em}"
            "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;"
            "padding:0.2em 0.4em;vertical-align:top}</style>"
            f"</head><body><h1>jacobian_lab report</h1><p>{html.escape(stamp)}; "
            f"{html.escape(env_line)}. {held} of {total} verdicts hold.</p>"
            + "".join(body)
            + "</body></html>"
        )
    return [md_path, html_path]


def add_analysis_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """The flags every analysis takes (``--size`` and the overrides of its config)."""
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="small",
        help="preset: tiny (seconds, for tests), small (minutes on 2 CPU cores; default), "
        "paper (the papers' sizes; long)",
    )
    parser.add_argument(
        "--depths",
        type=int,
        nargs="+",
        help="depths to sweep: dense layers in gsc_across_depth, collapsing_domain and "
        "jacobian_spectra (ResNets there get depth/2 two-layer blocks); residual blocks in "
        "pythagorean, norm_preservation and path_lengths; spectrum depths in "
        "theory_validation",
    )
    parser.add_argument("--widths", type=int, nargs="+", help="widths to sweep")
    parser.add_argument("--seeds", type=int, help="random initializations per configuration")
    parser.add_argument("--batch", type=int, help="Gaussian inputs per configuration (>= 2)")
    parser.add_argument("--dtype", choices=("float32", "float64"), help="precision")
    parser.add_argument(
        "--data",
        metavar="FILE.npz",
        help="training data of the trainability analysis: a .npz with arrays x_train, "
        "y_train, x_test, y_test (default: the shipped handwritten digits; 'gaussian': "
        "Gaussian inputs labelled by a random linear teacher); nothing is downloaded",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=FIGURE_FORMATS,
        default=["pdf", "png"],
        help="figure formats (default: pdf png)",
    )
    parser.add_argument(
        "--out",
        default=default_out,
        action=_OutFolder,
        help=f"output folder (default {default_out})",
    )


class _OutFolder(argparse.Action):
    """``--out``: a folder name; an empty one (``--out ""``) is a usage error."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not str(values).strip():
            parser.error(f"{option_string} must name a folder, e.g. {option_string} {self.default}")
        setattr(namespace, self.dest, values)


def overrides(args: argparse.Namespace) -> dict:
    """The config overrides given on the command line."""
    return {key: getattr(args, key) for key in OVERRIDABLE}


def enable_precision(args: argparse.Namespace) -> None:
    """Turn on 64-bit JAX when float64 is asked for (before any array is made)."""
    if getattr(args, "dtype", None) == "float64":
        jax.config.update("jax_enable_x64", True)


def error_line(err: BaseException) -> str:
    """The one-line message of an error the command line reports (exit status 2): its text,
    with its kind where the text alone would not say it (a MemoryError)."""
    return f"out of memory: {err}" if isinstance(err, MemoryError) else str(err)


INTERRUPTED = 130
"""Exit status after a Ctrl-C (128 + SIGINT), as a shell reports for an interrupted command."""


def stopped_message(prog: str, stopped: SweepStopped, name: str, report: Path | None) -> str:
    """What an interrupted command kept, and how to resume (for standard error)."""
    lines = [
        f"{prog}: interrupted; stopped at a safe point, between two configurations.",
        f"  kept: {stopped.saved} of {stopped.total} configurations of {name} are saved in "
        f"{stopped.path}",
    ]
    if report is not None:
        lines.append(f"  partial report (analyses finished before the interrupt): {report}")
    lines.append("  re-running the same command resumes from there.")
    return "\n".join(lines)


def script_main(analysis: Analysis, argv: Sequence[str] | None = None) -> int:
    """Command line of a single analysis script: runs it and prints its verdict lines.

    A first Ctrl-C stops after the configuration in progress (exit status 130, saying
    what was kept); a second one ends the process at once."""
    parser = argparse.ArgumentParser(description=f"{analysis.title}. {analysis.claim}")
    add_analysis_arguments(parser, default_out=f"results/{analysis.name}")
    args = parser.parse_args(argv)
    enable_precision(args)
    try:
        config = analysis_config(analysis, args.size, **overrides(args))
        with stop_on_interrupt() as stop:
            result = run_analysis(
                analysis, config, args.out, formats=args.formats, stop=stop.is_set
            )
    except SweepStopped as stopped:
        print(stopped_message(analysis.name, stopped, analysis.name, None), file=sys.stderr)
        return INTERRUPTED
    except (ValueError, OSError, ArithmeticError, MemoryError) as err:
        print(f"{analysis.name}: error: {error_line(err)}", file=sys.stderr)
        return 2
    for v in result.verdicts:
        print(v.line)
    print("wrote", *map(str, result.files + result.figures))
    return 0
