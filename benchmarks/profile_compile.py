"""Where first contact spends its time: tracing, lowering, XLA compiling, running.

Run by hand:
    python benchmarks/profile_compile.py readme            # each python block of README, docs/
    python benchmarks/profile_compile.py analyses [--size small] [--analyses NAME ...]
    python benchmarks/profile_compile.py tests [tests/test_x.py ...]
    ... [--cache DIR]   # with JAX's persistent compilation cache in DIR (run twice: warm)

Every item runs in a fresh Python process (a code block of README.md or docs/ as a script,
those marked ``<!-- no-test -->`` left out, as tests/test_docs.py does; an analysis as
``jacobian-lab report --analyses NAME`` into a fresh ``build/profile_runs/NAME``, whose
JSON a profile of other code can be compared with; a test module under ``pytest -n 0``)
with JAX's ``log_compiles`` messages collected, and one row is printed per item: its wall seconds,
the seconds JAX spent tracing (jaxpr building, ``Finished tracing``), lowering to MLIR and
compiling with XLA (``Finished XLA compilation``), the rest ("run": executing, Python,
imports), and the number of distinct programs XLA compiled (and, with a cache, how many
came from it). Rows go to standard output as a Markdown table; ``--json FILE`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
_TIMES = {
    "trace": re.compile(r"^Finished tracing .* in ([0-9.e-]+) sec"),
    "lower": re.compile(r"^Finished jaxpr to MLIR module conversion .* in ([0-9.e-]+) sec"),
    "compile": re.compile(r"^Finished XLA compilation of .* in ([0-9.e-]+) sec"),
}


class Collector(logging.Handler):
    """Sums JAX's compile-time log messages."""

    def __init__(self) -> None:
        super().__init__()
        self.totals = {"trace": 0.0, "lower": 0.0, "compile": 0.0, "programs": 0, "cached": 0}
        self.names: dict[str, int] = {}

    def emit(self, record) -> None:
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            self.totals["programs"] += 1
            name = msg.split(" ")[1]
            self.names[name] = self.names.get(name, 0) + 1
        elif "compilation cache hit" in msg.lower():
            self.totals["cached"] += 1
        for key, pattern in _TIMES.items():
            m = pattern.match(msg)
            if m:
                self.totals[key] += float(m.group(1))


def _child(kind: str, item: str, out: str, size: str) -> None:
    """Run one item in this process with the collector on; write its totals to ``out``."""
    import jax

    collector = Collector()
    logging.getLogger("jax").addHandler(collector)
    logging.getLogger("jax").setLevel(logging.DEBUG)
    jax.config.update("jax_log_compiles", True)
    start = time.perf_counter()
    if kind == "readme":
        code = pathlib.Path(item).read_text()
        exec(compile(code, item, "exec"), {"__name__": "__main__"})  # noqa: S102
    elif kind == "analyses":
        from jacobian_lab.experiments.cli import main

        # a fresh folder: the report resumes from finished work in an old one
        folder = pathlib.Path(out).parent / "profile_runs" / item
        shutil.rmtree(folder, ignore_errors=True)
        main(["report", "--analyses", item, "--size", size, "--out", str(folder)])
    else:
        import pytest

        code = pytest.main(["-q", "-n", "0", "-p", "no:cacheprovider", item])
        if code not in (0, 5):
            raise SystemExit(f"{item}: pytest exit code {code}")
    top = sorted(collector.names.items(), key=lambda kv: -kv[1])[:20]
    totals = {**collector.totals, "wall": time.perf_counter() - start, "top": top}
    pathlib.Path(out).write_text(json.dumps(totals))


def readme_blocks() -> list[pathlib.Path]:
    """The ``python`` blocks of README.md and docs/ (not those marked ``<!-- no-test -->``
    on the line above), each written to a file under build/."""
    fence = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
    folder = ROOT / "build" / "readme_blocks"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text()
        for m in fence.finditer(text):
            if text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip() == "<!-- no-test -->":
                continue
            line = text.count("\n", 0, m.start()) + 1
            name = str(page.relative_to(ROOT)).replace("/", "_").removesuffix(".md")
            p = folder / f"{name}_{line}.py"
            p.write_text(m.group(1))
            paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["readme", "analyses", "tests", "_child"])
    ap.add_argument("items", nargs="*")
    ap.add_argument("--size", default="small")
    ap.add_argument("--cache", help="JAX persistent compilation cache directory")
    ap.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--child-kind", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kind == "_child":
        _child(args.child_kind, args.items[0], args.out, args.size)
        return
    if args.kind == "readme":
        items = [str(p) for p in readme_blocks()]
    elif args.kind == "analyses":
        from jacobian_lab.experiments.registry import ANALYSES

        items = args.items or list(ANALYSES)
    else:
        items = args.items or sorted(str(p) for p in (ROOT / "tests").glob("test_*.py"))
    env = dict(os.environ)
    if args.cache:
        env["JACOBIAN_LAB_CACHE"] = args.cache
    else:
        env["JACOBIAN_LAB_CACHE"] = "off"
    rows = []
    print("| item | wall s | trace s | lower s | XLA compile s | run s | programs | cached |")
    print("|---|---|---|---|---|---|---|---|")
    for item in items:
        out = ROOT / "build" / "profile_item.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "_child", item, "--child-kind", args.kind]
        cmd += ["--out", str(out), "--size", args.size]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        outer = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"| {item} | failed: {proc.stderr.strip().splitlines()[-1:]} |||||||")
            continue
        t = json.loads(out.read_text())
        run = t["wall"] - t["trace"] - t["lower"] - t["compile"]
        name = pathlib.Path(item).name
        rows.append({"item": name, "process_wall": outer, **t, "run": run})
        print(
            f"| {name} | {outer:.1f} | {t['trace']:.1f} | {t['lower']:.1f} | "
            f"{t['compile']:.1f} | {run:.1f} | {t['programs']} | {t['cached']} |",
            flush=True,
        )
    total = {k: sum(r[k] for r in rows) for k in ("process_wall", "trace", "lower", "compile")}
    print(
        f"| **all** | {total['process_wall']:.1f} | {total['trace']:.1f} | {total['lower']:.1f} "
        f"| {total['compile']:.1f} | | {sum(r['programs'] for r in rows)} | "
        f"{sum(r['cached'] for r in rows)} |"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
