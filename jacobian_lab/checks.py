"""Checks shared by the public functions: traced values, finiteness."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
    """True when ``x`` is an abstract value inside ``jit``/``vmap``, where values can't be read."""
    return isinstance(x, jax.core.Tracer)


def require_finite(values: jax.Array, what: str, axis_name: str = "layer") -> None:
    """Raise ``FloatingPointError`` if ``values`` holds inf or NaN.

    ``values`` may carry a leading axis indexed by ``axis_name``; the message then names the
    first index along it that went non-finite. Does nothing under tracing (inside ``jit``),
    where the values are not known.
    """
    if is_traced(values):
        return
    finite = np.asarray(jnp.isfinite(values))
    if finite.all():
        return
    if finite.ndim == 0:
        raise FloatingPointError(f"{what} is not finite")
    bad = ~finite.reshape(finite.shape[0], -1).all(axis=1)
    first = int(np.argmax(bad))
    raise FloatingPointError(
        f"{what} went non-finite first at {axis_name} {first} "
        f"({int(bad.sum())} of {bad.size} {axis_name}s affected); "
        "try float64, a smaller depth, or a smaller weight scale"
    )


def available_memory() -> int:
    """Bytes the default device can hold: an accelerator's memory limit, or the host's
    physical memory for the CPU."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports memory
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Raise ``MemoryError`` when ``what`` needs more bytes than the device has, with the
    sizes and ``fix``, before anything is allocated."""
    limit = available_memory()
    if nbytes > limit:
        raise MemoryError(
            f"{what} {nbytes / 2**30:.3g} GiB, more than the {limit / 2**30:.3g} GiB "
            f"this device has; {fix}"
        )
