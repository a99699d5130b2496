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
    their module runs alone); the modules share no compiled programs, so this costs
    nothing."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Free every compiled program after each test module: a worker process runs many
    modules, and their programs kept alive together ran it out of memory for LLVM's code
    (a crash in a late module); the persistent cache serves a program needed again."""
    yield
    jax.clear_caches()
