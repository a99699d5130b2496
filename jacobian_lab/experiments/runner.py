"""Resumable sweeps: finished configurations are saved as they complete and skipped on re-run.

A sweep writes one JSON object per finished configuration to ``<out>/<name>.jsonl``
(appended and flushed, so an interrupt loses at most the configuration in progress).
A configuration is identified by its JSON-serialised config; re-running the same sweep
into the same folder reuses every record whose config matches exactly.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


def prepare_output_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` (and parents) and check it is writable; raise ``OSError`` saying
    which path failed otherwise."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OSError(
            f"cannot write to output folder {str(path)!r}: {err.strerror or err}"
        ) from err
    return path


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    """Finished records of a sweep file, keyed by config; a truncated last line (from an
    interrupt mid-write) is ignored."""
    records: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[_key(rec["config"])] = rec
    return records


def run_sweep(
    configs: Iterable[dict[str, Any]],
    compute: Callable[[dict[str, Any]], dict[str, Any]],
    path: Path,
    *,
    log: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run ``compute(config)`` for every config not already finished in ``path``.

    Yields records ``{"config": config, "result": ..., "seconds": ...}`` in the order of
    ``configs`` (finished ones from the file, new ones as they complete), and reports
    progress (what runs, how far, time left) through ``log`` (default: standard error).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    configs = list(configs)
    done = load_records(path)
    todo = sum(_key(c) not in done for c in configs)
    if todo < len(configs):
        log(f"resuming: {len(configs) - todo} of {len(configs)} configurations already in {path}")
    start, finished = time.perf_counter(), 0
    for config in configs:
        rec = done.get(_key(config))
        if rec is None:
            label = config.get("name") or " ".join(
                f"{k}={v}" for k, v in config.items() if not isinstance(v, (list, dict))
            )
            log(f"[{finished + 1}/{todo}] {label} ...")
            t0 = time.perf_counter()
            result = compute(config)
            rec = {"config": config, "result": result, "seconds": time.perf_counter() - t0}
            with path.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
            finished += 1
            elapsed = time.perf_counter() - start
            eta = elapsed / finished * (todo - finished)
            log(f"[{finished}/{todo}] {label} done in {rec['seconds']:.1f}s; about {eta:.0f}s left")
        yield rec
