"""Sweeps across devices: the seed / configuration axis sharded with ``jax.sharding``.

:func:`map_over_devices` applies a function to every slice of a leading axis (seeds,
configurations), vmapped, with that axis split over a 1-D device mesh, so ``n`` devices
each run ``1/n`` of the slices in one compiled program. No scheduler: XLA partitions the
vmapped computation (GSPMD), and the result is one array sharded the same way.

On CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX starts)
gives four host devices, which is how the tests check that the sharded sweep returns the
unsharded numbers. On several hosts, call ``jax.distributed.initialize()`` first on every
process and pass ``devices=jax.devices()`` (all processes' devices); every process must
pass the same inputs (see docs/scale.md, "Sweeps across hosts"). ``tests/test_multihost.py``
runs that with two processes on localhost (CPU collectives over gloo, JAX's default) and
checks the gathered result against one process's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jacobian_lab.checks import check_compiled_memory, is_traced


def device_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "sweep") -> Mesh:
    """A 1-D mesh over ``devices`` (default: this process's local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("device_mesh needs at least one device")
    return Mesh(np.array(devices), (axis,))


def map_over_devices(
    fn: Callable[[Any], Any],
    xs: Any,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Any:
    """``jax.vmap(fn)(xs)`` with the leading axis of ``xs`` sharded over ``devices``.

    Args:
        fn: a JAX-traceable function of one slice (e.g. of one PRNG key: draw the
            parameters and measure); it must be pure (no Python-side checks on values).
        xs: a pytree whose leaves share a leading axis of length ``n`` (seeds, configs).
        devices: devices to shard over (default all local devices). When ``n`` is not a
            multiple of their number, the axis is padded with copies of the last slice
            and the padding is dropped from the result.

    Returns:
        The stacked results, leading axis ``n``, sharded over the devices (read it with
        ``np.asarray``). With several processes (``jax.distributed``) and ``devices``
        spanning them, it is one global array that no process can read alone: gather it
        with ``jax.experimental.multihost_utils.process_allgather(out, tiled=True)``.
        There ``xs`` must be host data or uncommitted arrays (not placed with
        ``jax.device_put``), equal on every process: ``jax.device_put`` onto the global
        sharding checks that they agree, and each process places its own slices.
    """
    mesh = device_mesh(devices)
    leaves = jax.tree_util.tree_leaves(xs)
    if not leaves:
        raise ValueError("map_over_devices needs xs with at least one array")
    n = int(jnp.shape(leaves[0])[0])
    if any(int(jnp.shape(v)[0]) != n for v in leaves):
        raise ValueError("every leaf of xs needs the same leading axis length")
    k = mesh.devices.size
    padded = -(-n // k) * k
    if padded != n:
        xs = jax.tree_util.tree_map(
            lambda v: jnp.concatenate([v, jnp.repeat(v[-1:], padded - n, axis=0)]), xs
        )
    spec = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    xs = jax.device_put(xs, spec)
    program = jax.jit(jax.vmap(fn), out_shardings=spec)
    if not any(is_traced(v) for v in jax.tree_util.tree_leaves(xs)):
        check_compiled_memory(  # compiled first (cached), refused before allocating
            program.lower(xs).compile(),
            f"map_over_devices over {n} slices on {k} device(s)",
            "use fewer slices (seeds) per call or more devices; for the GSC, "
            "method='matrix_free' keeps no Jacobian",
        )
    out = program(xs)
    return jax.tree_util.tree_map(lambda v: v[:n], out) if padded != n else out
