"""JAX's persistent compilation cache (jacobian_lab/compilation_cache.py): a second run
of the same work loads its programs from disk, and the environment turns it off."""

import os
import subprocess
import sys

SCRIPT = """
import logging, sys
import jax
from jacobian_lab.compilation_cache import enable_compilation_cache

hits = []
class Hits(logging.Handler):
    def emit(self, record):
        if "cache hit" in record.getMessage().lower():
            hits.append(record.getMessage())
logging.getLogger("jax").addHandler(Hits())
logging.getLogger("jax").setLevel(logging.DEBUG)
print(enable_compilation_cache())
import jacobian_lab as jl
net = jl.mlp(3, 8, "tanh")
x = jax.random.normal(jax.random.PRNGKey(1), (2, 8))
jl.gsc(net, net.init(jax.random.PRNGKey(0)), x)
print(len(hits))
"""


def _run(env_value: str) -> list[str]:
    env = {**os.environ, "JACOBIAN_LAB_CACHE": env_value}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_a_second_run_loads_its_programs_from_the_cache(tmp_path):
    folder, first = _run(str(tmp_path))
    assert folder == str(tmp_path) and int(first) == 0
    assert any(tmp_path.iterdir())  # programs were written
    _, second = _run(str(tmp_path))
    assert int(second) >= 5  # the network's init and the GSC's programs came from disk


def test_the_environment_chooses_the_folder_or_turns_it_off(monkeypatch, tmp_path):
    from jacobian_lab.compilation_cache import default_cache_dir

    monkeypatch.setenv("JACOBIAN_LAB_CACHE", "off")
    assert default_cache_dir() is None
    monkeypatch.setenv("JACOBIAN_LAB_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("JACOBIAN_LAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "jacobian_lab" / "jax"
