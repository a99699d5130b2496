"""JAX's persistent compilation cache: a second run of the same work loads its compiled
programs from disk instead of compiling them again.

The command line (``jacobian-lab``) and the test suite turn it on by default; in your own
code call :func:`enable_compilation_cache` once, before the first computation. The cache
lives in ``$JACOBIAN_LAB_CACHE`` if that is a path, else in
``$XDG_CACHE_HOME/jacobian_lab/jax`` (``~/.cache/jacobian_lab/jax``);
``JACOBIAN_LAB_CACHE=off`` (or the CLI's ``--no-cache``) turns it off. Entries are keyed by
the program, the JAX version and the device, so a stale entry is never used; delete the
folder to reclaim the disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "JACOBIAN_LAB_CACHE"
_OFF = {"off", "0", "false", "no", "none"}


def default_cache_dir() -> Path | None:
    """The cache folder the environment asks for (``None``: turned off)."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() in _OFF:
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jacobian_lab" / "jax"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache for this process.

    Args:
        path: the cache folder; default :func:`default_cache_dir` (which may say off).

    Returns:
        The folder in use, or ``None`` when the environment turned the cache off. Every
        program is cached, however quickly it compiled: the library's first contact is
        many small programs.
    """
    folder = Path(path).expanduser() if path is not None else default_cache_dir()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
