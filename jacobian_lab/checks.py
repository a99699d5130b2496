"""Checks shared by the public functions: traced values, finiteness, memory, keys and
inputs."""

from __future__ import annotations

import functools
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


def well_within_memory(nbytes: int) -> bool:
    """Whether ``nbytes`` is under a quarter of the device's memory: a bound that small
    needs no exact (compiled) check."""
    return 4 * nbytes <= available_memory()


def compiled_memory(compiled) -> tuple[int, int] | None:
    """``(workspace, results)`` bytes of a compiled XLA program, as XLA's memory analysis
    plans its buffers (results less what aliases the arguments); ``None`` where the backend
    gives no analysis."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend analyses memory
        return None
    if stats is None:
        return None
    out = int(getattr(stats, "output_size_in_bytes", 0))
    alias = int(getattr(stats, "alias_size_in_bytes", 0))
    return int(getattr(stats, "temp_size_in_bytes", 0)), out - alias


def require_memory(sizes: tuple[int, int] | None, what: str, fix: str) -> None:
    """Raise ``MemoryError`` when a program's ``(workspace, results)`` bytes (from
    :func:`compiled_memory`) exceed the device's memory, naming ``what`` with the sizes and
    ``fix``."""
    if sizes is None:
        return
    temp, out = sizes
    limit = available_memory()
    if temp + out > limit:
        raise MemoryError(
            f"{what} needs {(temp + out) / 2**30:.3g} GiB ({temp / 2**30:.3g} GiB of workspace "
            f"and {out / 2**30:.3g} GiB of results, as XLA plans the program for these "
            f"shapes), more than the {limit / 2**30:.3g} GiB this device has; {fix}"
        )


def check_compiled_memory(compiled, what: str, fix: str) -> None:
    """Raise ``MemoryError`` before running a compiled XLA program whose buffers (its
    workspace and its results) do not fit in the device's memory, naming ``what`` with the
    sizes and ``fix``. Does nothing where the backend gives no memory analysis."""
    require_memory(compiled_memory(compiled), what, fix)


def _signature(static, dynamic):
    """A hashable key of a call: its static values, and the structure, shapes and dtypes
    of its dynamic arguments (a Python scalar by its type, as ``jax.jit`` keys it)."""
    leaves, treedef = jax.tree_util.tree_flatten(dynamic)
    return (
        static,
        treedef,
        tuple(
            (tuple(a.shape), str(a.dtype), bool(getattr(a, "weak_type", False)))
            if hasattr(a, "shape") and hasattr(a, "dtype")
            else type(a)
            for a in leaves
        ),
    )


def memory_checked(what: str, fix: str, *, static_argnums=(), static_argnames=()):
    """``jax.jit`` for the programs that materialize dense Jacobians: called with concrete
    arguments, the program is compiled first (``lower(...).compile()``) and refused with a
    ``MemoryError`` naming ``what``, the sizes and ``fix`` (the matrix-free alternative)
    when its buffers cannot fit (:func:`require_memory`), before anything is allocated.
    The measured sizes are kept per static values and argument shapes, so a repeated call
    costs a dictionary look-up (the first call traces the program twice: the check's
    compile is reused from JAX's cache).
    Under a transformation (traced arguments) it is plain ``jax.jit``: the enclosing
    program is what gets allocated."""
    argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)

    def wrap(fn):
        jitted = jax.jit(fn, static_argnums=argnums, static_argnames=argnames)
        sizes: dict = {}

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if any(is_traced(a) for a in jax.tree_util.tree_leaves((args, kwargs))):
                return jitted(*args, **kwargs)
            dynamic = [a for i, a in enumerate(args) if i not in argnums]
            dynamic_kw = {k: v for k, v in kwargs.items() if k not in argnames}
            static = (
                tuple(a for i, a in enumerate(args) if i in argnums),
                tuple(sorted((k, v) for k, v in kwargs.items() if k in argnames)),
            )
            try:
                key = _signature(static, (dynamic, dynamic_kw))
                hash(key)
            except TypeError:  # an unhashable static value: jax.jit would refuse it too
                key = None
            if key is None or key not in sizes:
                measured = compiled_memory(jitted.lower(*args, **kwargs).compile())
                if key is not None:
                    if len(sizes) > 4096:
                        sizes.clear()
                    sizes[key] = measured
            require_memory(measured if key is None else sizes[key], what, fix)
            # the call finds the program compiled above in JAX's cache; only its sizes are
            # kept here, so that jax.clear_caches() frees every compiled program
            return jitted(*args, **kwargs)

        call.lower = jitted.lower
        return call

    return wrap


def check_key(key, name: str = "key"):
    """``key`` if it is one PRNG key (a typed key of shape ``()``, or raw ``uint32`` key data
    like ``jax.random.PRNGKey(0)``), else a ``TypeError`` naming the argument and the fix:
    an int seed, a stack of keys, or an array of another dtype or shape. Traced keys are
    checked by dtype and shape only."""
    raw_shape = jax.random.PRNGKey(0).shape
    typed = hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if typed and jnp.shape(key) == ():
        return key
    if (
        hasattr(key, "dtype")
        and not typed
        and key.dtype == jnp.uint32
        and tuple(jnp.shape(key)) == tuple(raw_shape)
    ):
        return key
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        got = f"the int {key!r}"
        fix = f"jax.random.PRNGKey({key!r})"
    else:
        got = (
            f"{type(key).__name__} of dtype {key.dtype} and shape {tuple(jnp.shape(key))}"
            if hasattr(key, "dtype")
            else repr(key)
        )
        fix = "jax.random.PRNGKey(seed), or one row of jax.random.split(key, n)"
    raise TypeError(f"{name} must be one PRNG key, got {got}: pass {fix}")


def check_float_input(x, name: str = "x") -> None:
    """Raise ``TypeError`` naming ``name`` unless every leaf of the pytree ``x`` is an array
    of real floating-point numbers (derivatives need them), ``ValueError`` if it holds no
    numbers: the check the matrix-free estimators and :func:`jacobian_lab.jacobian` make
    before differentiating."""
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves:
        raise ValueError(f"{name} holds no arrays: give the point to differentiate at")
    for leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            raise TypeError(
                f"{name} must be an array (or a pytree of arrays) of real floats, got "
                f"{type(leaf).__name__}: use jnp.asarray({name}, jnp.float32)"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} must hold real floating-point numbers to be differentiated, got "
                f"{dtype}: cast it, e.g. {name}.astype(jnp.float32)"
            )
    if sum(int(np.size(leaf)) for leaf in leaves) == 0:
        raise ValueError(f"{name} holds no numbers (size 0): give a point to differentiate at")
