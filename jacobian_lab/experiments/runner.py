"""Resumable sweeps: finished configurations are saved as they complete and skipped on re-run.

A sweep writes one JSON object per finished configuration to ``<out>/<name>.jsonl``. Each
record is one whole line written with a single ``os.write`` to a file opened for
appending, then synced, starting on a fresh line if the file ends in a line cut short by
a crash; so an interrupt loses at most the configuration in progress and never damages
the records before it. On reading, a corrupt line (invalid JSON, or JSON without
``"config"`` and ``"result"``) is skipped and reported; its configuration is recomputed.
Each record carries the version of jacobian_lab that wrote it (``"jacobian_lab"``); a
record from another version is skipped the same way (its result may have other fields).
A write that fails (a full disk) raises ``OSError`` naming the file (:func:`writing`).
A configuration is identified by its JSON-serialised config; re-running the same sweep
into the same folder reuses every record whose config matches exactly.

Stopping at a safe point: inside :func:`stop_on_interrupt`, the first Ctrl-C (SIGINT)
only sets a flag, and :func:`run_sweep` (given ``stop=``) raises :class:`SweepStopped`
before its next configuration, never in the middle of one (nor of an XLA compilation).

With several JAX processes, only process 0 writes (:func:`is_writer`); the others compute
the same and write nothing. They resume from the records process 0 wrote, so the output
folder should be shared by all processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax


def is_writer() -> bool:
    """Whether this process writes results: process 0 only (the only one on one host)."""
    return jax.process_index() == 0


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_output_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` (and parents) and check it is writable; raise ``OSError`` saying
    which path failed otherwise. Processes other than 0 write nothing: for them this only
    returns the path."""
    path = Path(out)
    if not is_writer():
        return path
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


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an ``OSError`` raised inside the block without a file name (``os.write`` on
    a full disk gives ``[Errno 28] No space left on device`` and nothing more) with
    ``path``, so that the message says which file could not be written."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, f"{err.strerror or err} (while writing)", str(path)) from err


def _version() -> str:
    from jacobian_lab import __version__

    return __version__


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def load_records(
    path: Path, *, log: Callable[[str], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Finished records of a sweep file, keyed by config.

    A corrupt line (invalid JSON, for instance a last line cut short by a crash
    mid-write, or JSON without ``"config"`` and ``"result"``) is skipped and reported
    through ``log`` (default: standard error) with its line number; the configuration it
    held is then recomputed by :func:`run_sweep`."""
    log = log or _log_stderr
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            cut = number == len(lines)  # the file does not end with a newline
            problem = ("a cut-short last line (a crash mid-write?): " if cut else "") + (
                f"invalid JSON ({err})"
            )
        else:
            if isinstance(rec, dict) and isinstance(rec.get("config"), dict) and "result" in rec:
                written_by = rec.get("jacobian_lab", _version())  # older records have none
                if written_by == _version():
                    records[_key(rec["config"])] = rec
                    continue
                problem = (
                    f"written by jacobian_lab {written_by} (this is {_version()}), whose "
                    "results may have other fields"
                )
            else:
                problem = 'JSON without "config" and "result"'
        log(
            f"warning: skipping line {number} of {path}: {problem}; "
            "the configuration it held, if any, will be recomputed"
        )
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``path`` as one whole JSON line (one ``os.write`` on a file
    opened with ``O_APPEND``, then fsync). If the file ends in a line cut short by a crash,
    the record starts on a fresh line, so the cut line stays the only corrupt one."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
    with writing(path):
        fd = os.open(path, flags, 0o644)
        try:
            if os.fstat(fd).st_size > 0:
                os.lseek(fd, -1, os.SEEK_END)
                if os.read(fd, 1) != b"\n":
                    data = b"\n" + data
            written = os.write(fd, data)
            while written < len(data):  # a short write (disk full, signal): finish the line
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)


class SweepStopped(Exception):
    """A stop was asked for (see :func:`stop_on_interrupt`) and :func:`run_sweep` stopped
    before its next configuration; ``saved`` of ``total`` configurations are in ``path``."""

    def __init__(self, path: Path, saved: int, total: int):
        self.path, self.saved, self.total = path, saved, total
        super().__init__(f"stopped: {saved} of {total} configurations are saved in {path}")


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[threading.Event]:
    """While active, the first Ctrl-C (SIGINT) sets the yielded event instead of raising
    ``KeyboardInterrupt`` mid-computation (where an interrupted XLA compilation can crash
    the process); pass ``stop=event.is_set`` to :func:`run_sweep` to stop at the next safe
    point. The first Ctrl-C restores the default handler, so a second one ends the process
    at once. Outside the main thread (where signals cannot be handled) this does nothing
    but yield the event. The previous handler is restored on exit."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum, frame):
        event.set()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # os.write, not print: the signal may have come in the middle of another print
        with contextlib.suppress(OSError):
            os.write(
                2,
                b"\ninterrupt: stopping after the configuration in progress "
                b"(press Ctrl-C again to abort at once)\n",
            )

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def run_sweep(
    configs: Iterable[dict[str, Any]],
    compute: Callable[[dict[str, Any]], dict[str, Any]],
    path: Path,
    *,
    log: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run ``compute(config)`` for every config not already finished in ``path``.

    Yields records ``{"config": config, "result": ..., "seconds": ...}`` in the order of
    ``configs`` (finished ones from the file, new ones as they complete), and reports
    progress (what runs, how far, time left) through ``log`` (default: standard error).
    Before computing each configuration it calls ``stop`` (if given) and, if that returns
    true, raises :class:`SweepStopped` saying how many configurations are saved. Only
    process 0 appends to ``path`` (:func:`is_writer`).
    """
    log = log or _log_stderr
    configs = list(configs)
    done = load_records(path, log=log)
    todo = sum(_key(c) not in done for c in configs)
    if todo < len(configs):
        log(f"resuming: {len(configs) - todo} of {len(configs)} configurations already in {path}")
    start, finished = time.perf_counter(), 0
    for config in configs:
        rec = done.get(_key(config))
        if rec is None:
            if stop is not None and stop():
                raise SweepStopped(path, len(configs) - todo + finished, len(configs))
            label = config.get("name") or " ".join(
                f"{k}={v}" for k, v in config.items() if not isinstance(v, (list, dict))
            )
            log(f"[{finished + 1}/{todo}] {label} ...")
            t0 = time.perf_counter()
            result = compute(config)
            rec = {
                "config": config,
                "result": result,
                "seconds": time.perf_counter() - t0,
                "jacobian_lab": _version(),
            }
            if is_writer():
                append_record(path, rec)
            finished += 1
            elapsed = time.perf_counter() - start
            eta = elapsed / finished * (todo - finished)
            log(f"[{finished}/{todo}] {label} done in {rec['seconds']:.1f}s; about {eta:.0f}s left")
        yield rec
