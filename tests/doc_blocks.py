"""The ``python`` code blocks of README.md and the docs, and a runner that executes each.

    python tests/doc_blocks.py                  # run every block, print one line each
    python tests/doc_blocks.py docs/guides/chain.md

A block is the text of a fenced ```` ```python ```` block. One marked with the HTML comment
``<!-- no-test -->`` on the line just above its fence is not run (for code that needs
something a test cannot give, such as a multi-host launch). ``tests/test_docs.py`` runs the
blocks through :func:`run_blocks`: one process for all of them (one JAX start-up), each
block executed in a fresh namespace as a script would be, with 64-bit JAX off as in a fresh
interpreter, a time limit per block and the working directory a scratch folder. JAX's
persistent compilation cache is on, as for the rest of the suite (``JACOBIAN_LAB_CACHE=off``
runs cold).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
NO_TEST = "<!-- no-test -->"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
TIMEOUT_S = 120  # per block


class CodeBlock(NamedTuple):
    path: str  # relative to the repository root
    line: int  # of the opening fence
    code: str
    run: bool  # False: marked no-test

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def doc_files() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks_of(path: Path) -> list[CodeBlock]:
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        rel = str(path.relative_to(ROOT))
        out.append(CodeBlock(rel, line, m.group(1), before != NO_TEST))
    return out


def all_blocks(paths: list[Path] | None = None) -> list[CodeBlock]:
    return [b for p in (paths or doc_files()) for b in blocks_of(p)]


def _child(spec: str) -> None:
    """Run the blocks of the JSON file ``spec``; print one JSON line per block."""
    import signal
    import time
    import traceback

    import jax

    from jacobian_lab.compilation_cache import enable_compilation_cache

    enable_compilation_cache()  # as the test suite does (JACOBIAN_LAB_CACHE=off: cold)
    blocks = json.loads(Path(spec).read_text())

    def alarm(signum, frame):
        raise TimeoutError(f"the block ran longer than {TIMEOUT_S} s")

    signal.signal(signal.SIGALRM, alarm)
    for block in blocks:
        jax.config.update("jax_enable_x64", False)  # as in a fresh interpreter
        start = time.perf_counter()
        error = None
        signal.alarm(TIMEOUT_S)
        try:
            code = compile(block["code"], block["id"], "exec")
            exec(code, {"__name__": "__main__"})  # a fresh namespace per block
        except BaseException:  # noqa: BLE001 - reported to the test, which fails
            error = traceback.format_exc(limit=8)
        finally:
            signal.alarm(0)
        result = {"id": block["id"], "error": error, "seconds": time.perf_counter() - start}
        print("@@block " + json.dumps(result), flush=True)


def run_blocks(blocks: list[CodeBlock]) -> dict[str, dict]:
    """Run ``blocks`` (those not marked no-test) in one fresh Python process; returns
    ``id -> {"error": traceback or None, "seconds": float}``."""
    todo = [{"id": b.id, "code": b.code} for b in blocks if b.run]
    with tempfile.TemporaryDirectory() as scratch:
        spec = Path(scratch) / "blocks.json"
        spec.write_text(json.dumps(todo))
        env = {**os.environ, "MPLBACKEND": "Agg", "JAX_ENABLE_X64": "0"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(spec)],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S * max(len(todo), 1) + 60,
            env=env,
        )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("@@block "):
            r = json.loads(line[len("@@block ") :])
            results[r["id"]] = r
    for b in todo:  # a block that ended the process: the process's own error
        results.setdefault(
            b["id"],
            {
                "error": f"the runner died (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
                "seconds": 0.0,
            },
        )
    return results


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        _child(argv[1])
        return 0
    blocks = all_blocks([Path(a).resolve() for a in argv] or None)
    results = run_blocks(blocks)
    failed = 0
    for b in blocks:
        if not b.run:
            print(f"skip  {b.id} (no-test)")
            continue
        r = results[b.id]
        failed += r["error"] is not None
        print(f"{'FAIL' if r['error'] else 'ok  '}  {b.id} ({r['seconds']:.1f} s)")
        if r["error"]:
            print(r["error"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
