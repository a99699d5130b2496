"""Command line: ``jacobian-lab report --help``."""

from __future__ import annotations

import argparse
import sys
import time

import jax

from jacobian_lab import REMEDIES, __version__
from jacobian_lab.compilation_cache import enable_compilation_cache
from jacobian_lab.experiments.report import (
    INTERRUPTED,
    add_analysis_arguments,
    analysis_config,
    enable_precision,
    error_line,
    overrides,
    run_analysis,
    stopped_message,
    write_report,
)
from jacobian_lab.experiments.runner import SweepStopped, prepare_output_dir, stop_on_interrupt
from jacobian_lab.plot import FIGURE_FORMATS


def _analyses() -> dict:
    from jacobian_lab.experiments.registry import ANALYSES  # imports every analysis

    return ANALYSES


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_report(args: argparse.Namespace) -> int:
    registry = _analyses()
    names = args.analyses or list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown analysis {unknown[0]!r}; expected one of: {', '.join(registry)}")
    formats = list(dict.fromkeys([*args.formats, "png"]))  # the report page shows PNGs
    chosen = [
        (registry[n], analysis_config(registry[n], args.size, **overrides(args))) for n in names
    ]  # bad flags fail before any work
    out = prepare_output_dir(args.out)
    t0 = time.perf_counter()
    results = []
    # Ctrl-C: stop at a safe point (after the configuration in progress), not inside XLA
    with stop_on_interrupt() as stop:
        for i, (analysis, config) in enumerate(chosen, 1):
            _log(
                f"== [{i}/{len(chosen)}] {analysis.name}: {analysis.title} "
                f"({time.perf_counter() - t0:.0f}s elapsed)"
            )
            try:
                result = run_analysis(
                    analysis, config, out, formats=formats, log=_log, stop=stop.is_set
                )
            except SweepStopped as stopped:
                pages = write_report(out, results)
                _log(stopped_message("jacobian-lab", stopped, analysis.name, pages[1]))
                return INTERRUPTED
            results.append(result)
            for v in result.verdicts:
                _log(f"   {v.line}")
            write_report(out, results)  # a partial report survives an interrupt
            # free the finished analysis's compiled programs: kept all through the report,
            # their code mappings ran the process out of memory for LLVM (a crash in the
            # last analysis); a later analysis needing one loads it from the disk cache
            jax.clear_caches()
    pages = write_report(out, results)
    print(f"jacobian_lab report ({args.size}) in {time.perf_counter() - t0:.0f}s")
    for r in results:
        for v in r.verdicts:
            print(f"[{r.name}] {v.line}")
    held = sum(v.holds for r in results for v in r.verdicts)
    print(
        f"{held} of {sum(len(r.verdicts) for r in results)} verdicts hold; report: "
        f"{pages[1]} (also {pages[0].name}); figures and data under {out}/<analysis>/"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jacobian-lab",
        description="Jacobians, spectra and gradient scale coefficients of random networks.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "report",
        help="run the analyses and write figures, data and a report page",
        description="Run the analyses of analyses/ (each checks a claim of the papers) and "
        "write <out>/report.html and report.md with every figure, its claim and the measured "
        "verdict; numbers go to <out>/<analysis>/ as JSON and CSV. Each finished "
        "configuration is saved at once: re-running into the same --out resumes. "
        "Flags override the chosen --size preset where an analysis has that setting.",
    )
    p.add_argument(
        "--analyses",
        nargs="+",
        metavar="NAME",
        help="which analyses (default: all): gsc_across_depth, normalization, "
        "vanishing_gradients, pythagorean, residual_trick, norm_preservation, path_lengths, "
        "collapsing_domain, jacobian_spectra, theory_validation, trainability, transformers",
    )
    add_analysis_arguments(p, default_out="results/report")
    p.set_defaults(func=cmd_report)
    _add_cache_flag(p)
    q = sub.add_parser(
        "inspect",
        help="inspect your model: per-layer table, findings, remedies, figures",
        description="Import FILE.py, call FACTORY (with a PRNG key if it takes one) and "
        "inspect the model it returns: (model, params, x) for a jacobian_lab model, (model, x) "
        "for a Flax linen (bound), NNX, Equinox or (apply_fn, params) model as written, read "
        "by jl.chain. Writes <out>/inspection.html with the findings, the remedies measured "
        "before and after, figures (PDF and PNG), inspection.json, layers.csv and "
        "remedies.csv.",
    )
    q.add_argument("factory", metavar="FILE.py:FACTORY", help="the file and the function in it")
    q.add_argument(
        "--seeds", type=int, default=1, help="initializations (the factory is called per key)"
    )
    q.add_argument("--seed", type=int, default=0, help="the first PRNG key (default 0)")
    q.add_argument(
        "--at",
        metavar="CLASS",
        help="where to cut a model read whole: the name of its block class (default: its "
        "repeated blocks; 'all' cuts at every submodule call)",
    )
    q.add_argument(
        "--dtype", choices=("float32", "float64"), help="cast the params and inputs to this"
    )
    q.add_argument(
        "--method",
        choices=("auto", "dense", "matrix_free"),
        default="auto",
        help="GSC method (default auto: dense within the memory budget)",
    )
    q.add_argument(
        "--remedies",
        nargs="+",
        default=list(REMEDIES),
        choices=[*REMEDIES, "none"],
        help="remedies to try (default: all; 'none' for none)",
    )
    q.add_argument(
        "--alpha", type=float, help="branch scale (default 1/sqrt(number of residual blocks))"
    )
    q.add_argument(
        "--formats", nargs="+", choices=FIGURE_FORMATS, default=["pdf", "png"], help="figures"
    )
    q.add_argument("--out", default="results/inspect", help="output folder")
    q.set_defaults(func=cmd_inspect)
    _add_cache_flag(q)
    return parser


def _add_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (on by default, in "
        "$JACOBIAN_LAB_CACHE or ~/.cache/jacobian_lab/jax; JACOBIAN_LAB_CACHE=off also "
        "turns it off): a second run loads its compiled programs instead of compiling them",
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    from jacobian_lab.experiments.inspect_page import run  # matplotlib: only when inspecting

    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    return run(args, _log)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0; 2 for a usage or input error, a
    numerical error, an unwritable file or a computation that cannot fit in memory, each
    reported as one line; 130 after a Ctrl-C, which stops at a safe point and keeps the
    finished work)."""
    args = build_parser().parse_args(argv)
    enable_precision(args)
    if not getattr(args, "no_cache", False):
        folder = enable_compilation_cache()
        if folder is not None:
            _log(f"compilation cache: {folder} (--no-cache to turn it off)")
    try:
        return args.func(args)
    except (ValueError, OSError, ArithmeticError, MemoryError) as err:
        print(f"jacobian-lab: error: {error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
