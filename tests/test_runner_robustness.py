"""Robustness of the report runner: damaged records files, ``--out ""``, Ctrl-C (stop at a
safe point, exit 130, resume), precision-only ``--dtype float64``, and writing from JAX
process 0 only."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jacobian_lab.experiments import cli, runner
from jacobian_lab.experiments.gsc_across_depth import SIZES
from jacobian_lab.experiments.report import (
    Analysis,
    Verdict,
    run_analysis,
    script_main,
    write_report,
)
from jacobian_lab.experiments.runner import SweepStopped, load_records, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def _rec(i):
    return json.dumps({"config": {"i": i}, "result": {"square": i * i}, "seconds": 0.0})


def _square(config):
    return {"square": config["i"] ** 2}


def _toy(calls, signal_at=None, needs_square=False):
    """A fast analysis whose unit ``signal_at`` presses Ctrl-C (SIGINT) while it runs
    (``needs_square``: its summary reads each result's ``square``)."""

    def compute(unit):
        if unit["i"] == signal_at:
            signal.raise_signal(signal.SIGINT)
        calls.append(unit["i"])
        return {"square": unit["i"] ** 2}

    return Analysis(
        name="toy",
        title="Toy analysis",
        claim="squares are non-negative",
        sizes={"tiny": {"n": 4, "seeds": 1}, "small": {"n": 4, "seeds": 1}},
        configs=lambda c: [{"i": i} for i in range(c["n"])],
        compute=compute,
        summarize=lambda c, recs: {
            "table": [
                {"square": r["result"]["square"]} if needs_square else r["result"] for r in recs
            ]
        },
        plot=lambda data, folder, formats: [],
        verdicts=lambda d: [Verdict("non-negative", True, f"{len(d['table'])} squares")],
    )


# -- records.jsonl -------------------------------------------------------------------------


def test_corrupt_lines_are_skipped_reported_and_recomputed(tmp_path):
    path = tmp_path / "records.jsonl"
    lines = [_rec(0), "{not json", _rec(1), '{"something": "else"}', "[1, 2]", _rec(2)]
    path.write_text("\n".join(lines) + "\n")
    messages = []
    assert sorted(load_records(path, log=messages.append)) == [
        json.dumps({"i": i}) for i in range(3)
    ]
    assert len(messages) == 3
    for number, message in zip((2, 4, 5), messages, strict=True):
        assert f"line {number} of {path}" in message and "recomputed" in message

    path.write_text(_rec(0) + "\n" + '{"result": 1}\n')  # no config: i=1 is not finished
    calls = []
    records = list(
        run_sweep(
            [{"i": 0}, {"i": 1}],
            lambda c: calls.append(c["i"]) or _square(c),
            path,
            log=messages.append,
        )
    )
    assert calls == [1] and [r["result"]["square"] for r in records] == [0, 1]


def test_truncated_last_line_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(_rec(0) + "\n" + _rec(1)[:20])  # a crash while writing record 1
    messages = []
    list(run_sweep([{"i": i} for i in range(3)], _square, path, log=messages.append))
    assert any("line 2 of" in m and "cut-short last line" in m for m in messages)
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 4  # the new records on fresh lines
    assert [json.loads(line)["config"] for line in text.splitlines()[2:]] == [{"i": 1}, {"i": 2}]
    assert sorted(load_records(path, log=messages.append)) == [
        json.dumps({"i": i}) for i in range(3)
    ]
    calls = []
    list(run_sweep([{"i": i} for i in range(3)], lambda c: calls.append(c) or {}, path))
    assert calls == []  # every record survived, nothing is recomputed


def test_each_record_is_one_write_of_a_whole_line(tmp_path, monkeypatch):
    writes = []
    real_write = os.write

    def spy(fd, data):
        if fd > 2:
            writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(runner.os, "write", spy)
    path = tmp_path / "records.jsonl"
    list(run_sweep([{"i": 0}, {"i": 1}], _square, path, log=lambda m: None))
    assert b"".join(writes) == path.read_bytes()
    assert len(writes) == 2 and all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)


# -- --out "" ------------------------------------------------------------------------------


def test_empty_out_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # "--analyses nope" / "--seeds 0": the old code failed on these, not on --out
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", "--size", "tiny", "--analyses", "nope", "--out", ""])
    assert exc.value.code == 2
    assert "--out must name a folder, e.g. --out results/report" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        script_main(_toy([]), ["--size", "tiny", "--seeds", "0", "--out", " "])
    assert exc.value.code == 2
    assert "--out must name a folder, e.g. --out results/toy" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- Ctrl-C --------------------------------------------------------------------------------


def test_stop_request_ends_a_sweep_between_configurations(tmp_path):
    path = tmp_path / "records.jsonl"
    calls = []

    def compute(config):
        calls.append(config["i"])
        return _square(config)

    with pytest.raises(SweepStopped) as exc:
        list(run_sweep([{"i": i} for i in range(4)], compute, path, stop=lambda: bool(calls)))
    assert calls == [0]
    assert (exc.value.saved, exc.value.total, exc.value.path) == (1, 4, path)


def _main(argv):
    """``cli.main``, with an unhandled Ctrl-C a test failure rather than the end of pytest."""
    try:
        return cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C raised KeyboardInterrupt instead of stopping at a safe point")


def test_ctrl_c_in_the_cli_stops_after_the_configuration_and_resumes(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_analyses", lambda: {"toy": _toy(calls, signal_at=1)})
    before = signal.getsignal(signal.SIGINT)
    assert _main(["report", "--size", "tiny", "--out", str(tmp_path)]) == 130
    assert signal.getsignal(signal.SIGINT) is before  # the handler is removed afterwards
    assert calls == [0, 1]  # the interrupted configuration finished, no new one started
    err = capsys.readouterr().err
    records = tmp_path / "toy" / "records.jsonl"
    assert f"kept: 2 of 4 configurations of toy are saved in {records}" in err
    assert "re-running the same command resumes" in err
    assert (tmp_path / "report.html").exists()  # the partial report

    monkeypatch.setattr(cli, "_analyses", lambda: {"toy": _toy(calls)})
    assert cli.main(["report", "--size", "tiny", "--out", str(tmp_path)]) == 0
    assert calls == [0, 1, 2, 3]
    assert "resuming: 2 of 4" in capsys.readouterr().err

    calls.clear()
    toy = _toy(calls, signal_at=0)
    assert script_main(toy, ["--size", "tiny", "--out", str(tmp_path / "script")]) == 130
    assert calls == [0]
    assert "kept: 1 of 4 configurations of toy" in capsys.readouterr().err


def _wait_for(predicate, proc, timeout=90.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_sigint_to_the_report_command_exits_130_and_resumes(tmp_path):
    out = tmp_path / "out"
    records = out / "gsc_across_depth" / "records.jsonl"
    command = [sys.executable, "-m", "jacobian_lab.experiments.cli", "report", "--size", "tiny"]
    command += ["--analyses", "gsc_across_depth", "--depths", "2", "--widths", "4"]
    command += ["--seeds", "1", "--batch", "4", "--formats", "png", "--out", str(out)]

    def lines():
        return records.read_text().count("\n") if records.exists() else 0

    def interrupted_run(wait):
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            _wait_for(wait, proc)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        return err

    n = len(SIZES["tiny"]["archs"])  # one configuration per architecture at one depth
    err = interrupted_run(lambda: lines() >= 1)
    kept = lines()
    assert 1 <= kept < n
    assert f"kept: {kept} of {n} configurations of gsc_across_depth are saved in {records}" in err
    assert "re-running the same command resumes" in err
    assert (out / "report.html").exists()

    err = interrupted_run(lambda: lines() > kept)  # the re-run computes only new ones
    assert f"resuming: {kept} of {n} configurations already in {records}" in err
    assert len(load_records(records)) == lines() > kept


# -- precision only ------------------------------------------------------------------------


def test_float64_changes_only_the_rounding_of_gsc_across_depth():
    from jacobian_lab.experiments import gsc_across_depth as g

    profiles = {}
    for dtype in ("float32", "float64"):
        config = {**g.SIZES["tiny"], "archs": ["batch-tanh"], "dtype": dtype}
        profiles[dtype] = [np.array(g.compute(u)["profiles"]) for u in g.configs(config)]
    for p32, p64 in zip(profiles["float32"], profiles["float64"], strict=True):
        assert np.max(np.abs(p32 - p64) / np.abs(p64)) < 1e-4


# -- multi-host: process 0 writes ----------------------------------------------------------


def test_only_process_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda *args, **kwargs: 1)
    calls = []
    result = run_analysis(_toy(calls), {"n": 3}, tmp_path / "out", log=lambda m: None)
    assert calls == [0, 1, 2]  # computed ...
    assert result.verdicts[0].measured == "3 squares"
    write_report(tmp_path / "out", [result])
    list(run_sweep([{"i": 0}], _square, tmp_path / "r.jsonl", log=lambda m: None))
    assert list(tmp_path.iterdir()) == []  # ... but nothing written


# -- issue 21: flags checked once for every analysis, records of other versions, full disks,
# -- memory errors ---------------------------------------------------------------------------


def test_duplicate_depths_are_computed_and_counted_once():
    from jacobian_lab.experiments.gsc_across_depth import ANALYSIS
    from jacobian_lab.experiments.report import analysis_config

    twice = analysis_config(ANALYSIS, "tiny", depths=(8, 8, 4, 8))
    assert twice["depths"] == [8, 4]
    once = analysis_config(ANALYSIS, "tiny", depths=(8, 4))
    assert ANALYSIS.configs(twice) == ANALYSIS.configs(once)


def test_a_batch_below_four_is_refused_by_every_analysis_that_runs_batch_norm(tmp_path, capsys):
    """One check (report.check_batch_norm) for every analysis, before any work: batch norm
    over 2 inputs normalizes every unit to +-1, and gsc_across_depth gave such a network a
    "holds" verdict while normalization alone refused it."""
    from jacobian_lab.experiments.registry import ANALYSES
    from jacobian_lab.experiments.report import analysis_config

    refused = []
    for name, analysis in ANALYSES.items():
        try:
            analysis_config(analysis, "small", batch=2)
        except ValueError as err:
            assert "need batches of at least 4 inputs" in str(err)
            refused.append(name)
    assert {"gsc_across_depth", "normalization", "collapsing_domain", "residual_trick"} <= set(
        refused
    )
    assert "jacobian_spectra" not in refused and "transformers" not in refused
    argv = ["report", "--size", "tiny", "--analyses", "jacobian_spectra", "gsc_across_depth"]
    assert cli.main([*argv, "--batch", "2", "--out", str(tmp_path)]) == 2
    assert "--batch 2: gsc_across_depth runs batch-norm networks" in capsys.readouterr().err
    assert not (tmp_path / "jacobian_spectra").exists()  # refused before any work


def _stamped(i, version, field="square"):
    return json.dumps(
        {"config": {"i": i}, "result": {field: i * i}, "seconds": 0.0, "jacobian_lab": version}
    )


def test_records_of_another_version_are_skipped_with_a_warning_not_a_key_error(tmp_path):
    from jacobian_lab import __version__

    calls, messages = [], []
    folder = tmp_path / "toy"
    folder.mkdir()
    path = folder / "records.jsonl"
    # line 2: stamped by another version (and with another field): skipped, recomputed
    path.write_text(_stamped(0, __version__) + "\n" + _stamped(1, "0.0.1", "sq") + "\n")
    result = run_analysis(_toy(calls), {"n": 2, "seeds": 1}, tmp_path, log=messages.append)
    assert calls == [1] and result.verdicts[0].holds
    assert any("line 2 of" in m and "written by jacobian_lab 0.0.1" in m for m in messages)
    assert json.loads(path.read_text().splitlines()[-1])["jacobian_lab"] == __version__
    # unstamped records (older files) whose results lack a field this version reads: the
    # file is set aside and everything recomputed, with a warning
    path.write_text("\n".join(json.dumps({"config": {"i": i}, "result": {}}) for i in (0, 1)))
    calls.clear()
    messages.clear()
    result = run_analysis(_toy(calls, needs_square=True), {"n": 2, "seeds": 1}, tmp_path,
                          log=messages.append)  # fmt: skip
    assert calls == [0, 1] and result.verdicts[0].holds
    assert any("do not fit this version of toy (KeyError" in m for m in messages)
    assert len(list(folder.glob("records.stale-*.jsonl"))) == 1


def test_a_full_disk_is_reported_with_the_file_name(tmp_path, capsys, monkeypatch):
    """A full disk fails os.write with ENOSPC and an error that names no file (simulated:
    every write to a file fails so); the runner adds the file's name, and the command line
    reports it as its error line."""
    real_write = os.write

    def full(fd, data):
        if fd > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(runner.os, "write", full)
    path = tmp_path / "records.jsonl"
    with pytest.raises(OSError, match=r"No space left on device.*records\.jsonl"):
        runner.append_record(path, {"config": {}, "result": {}})
    assert script_main(_toy([]), ["--size", "tiny", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "toy: error:" in err and "No space left on device" in err
    assert str(tmp_path / "out" / "toy" / "records.jsonl") in err


def test_a_memory_error_is_the_command_lines_error_line(tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError("gsc(method='dense') ... needs 26 GiB, more than the 16 GiB")

    monkeypatch.setattr(cli, "_analyses", lambda: {"toy": _toy([])})
    monkeypatch.setattr(cli, "run_analysis", out_of_memory)
    assert cli.main(["report", "--size", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "jacobian-lab: error: out of memory: gsc(method='dense') ... needs 26 GiB" in err
    assert "Traceback" not in err
