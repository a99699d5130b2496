"""Tests run with 64-bit JAX enabled so float64 cases are available; float32 cases pass
``dtype="float32"`` explicitly (the library's default)."""

import gc
import os

# pytest-xdist runs two test processes (pyproject's addopts): on a GPU, neither may take
# the default 75% of its memory up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest

jax.config.update("jax_enable_x64", True)

from jacobian_lab.compilation_cache import enable_compilation_cache  # noqa: E402

# a second run of the suite loads its compiled programs from disk
# (JACOBIAN_LAB_CACHE=off runs it cold; see jacobian_lab/compilation_cache.py)
enable_compilation_cache()


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drop JAX's compiled programs after each test module. One process compiling the whole
    suite (~250 tests, thousands of programs) ended twice in a crash inside XLA's CPU
    compiler near the end (a segfault, then an abort, in trivial programs that pass when
    their module runs alone), and an xdist worker's programs kept alive together ran it out
    of memory for LLVM's code; the modules share no compiled programs, and the persistent
    cache serves one needed again, so this costs nothing."""
    yield
    jax.clear_caches()
    gc.collect()
