"""A seed sweep over two JAX processes on localhost (``jax.distributed``, CPU collectives
over gloo) gathers to the single-process numbers; the docs' multi-host recipe
(docs/scale.md, "Sweeps across hosts") is the code the processes run."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

import jacobian_lab as jl

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multihost_worker.py"
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(tmp_path):
    """Start both workers, wait for both (killing both on a failure or after TIMEOUT_S),
    and return their parsed stdout lines and output paths."""
    port = _free_port()
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    procs, logs, outs = [], [], []
    timed_out = False
    try:
        for i in range(2):
            out = tmp_path / f"g{i}.npy"
            logs.append(open(tmp_path / f"log{i}.txt", "w+"))
            cmd = [sys.executable, str(WORKER), "--process-id", str(i), "--port", str(port)]
            procs.append(
                subprocess.Popen(
                    [*cmd, "--out", str(out)], cwd=ROOT, env=env, stdout=logs[i], stderr=logs[i]
                )
            )
            outs.append(out)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            codes = [p.poll() for p in procs]
            if None not in codes or any(c not in (None, 0) for c in codes):
                break  # both done, or one failed (the other would wait for it: killed below)
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    report = "\n".join(
        f"--- process {i} (exit {p.returncode}):\n{t[-2000:]}"
        for i, (p, t) in enumerate(zip(procs, texts, strict=True))
    )
    assert not timed_out, f"workers killed after {TIMEOUT_S} s\n{report}"
    assert all(p.returncode == 0 for p in procs), report
    infos = [json.loads(t.strip().splitlines()[-1]) for t in texts]
    return infos, outs


def test_two_process_sweep_gathers_to_the_single_process_one(tmp_path):
    infos, outs = _run_two_processes(tmp_path)
    for i, info in enumerate(infos):
        assert info == {
            "process_index": i,
            "process_count": 2,
            "device_count": 4,
            "local_device_count": 2,
            "fully_addressable": False,  # the sweep really spanned both processes
            "local_shards": 2,
        }
    net = jl.mlp(3, 8, "tanh", dtype="float64")
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    single = np.asarray(jl.gsc_over_seeds(net, keys, x))
    assert single.shape == (6, 3, 4) and single.dtype == np.float64
    for out in outs:
        np.testing.assert_allclose(np.load(out), single, rtol=1e-12)


def test_docs_multihost_recipe_is_the_worker():
    """The multi-host code block of docs/scale.md is the worker's recipe block, verbatim."""
    page = (ROOT / "docs" / "scale.md").read_text()
    section = page[page.index("**Sweeps across hosts.**") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    worker = WORKER.read_text()
    recipe = worker[worker.index("# recipe start\n") : worker.index("# recipe end")]
    recipe = recipe.split("\n", 1)[1]
    assert block.strip() == recipe.strip()
