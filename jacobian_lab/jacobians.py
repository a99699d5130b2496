"""Jacobians of arbitrary JAX callables, as matrices.

For layered networks (all layer-to-layer Jacobians from one pass) see
:mod:`jacobian_lab.layered`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jacobian_lab.checks import (
    check_compiled_memory,
    check_float_input,
    is_traced,
    require_finite,
    well_within_memory,
)

Mode = Literal["auto", "fwd", "rev"]


def jacobian(fn: Callable[[Any], Any], x: Any, *, mode: Mode = "auto") -> jax.Array:
    """Full Jacobian of ``fn`` at ``x``, as a matrix.

    Inputs and outputs may be any pytrees of arrays. Both are flattened with
    :func:`jax.flatten_util.ravel_pytree`: leaves in ``jax.tree_util`` order (dict keys
    sorted), each leaf in row-major (C) order. So for ``fn: (n,) -> (m,)`` the result is the
    usual ``(m, n)`` matrix ``J[i, j] = d fn(x)_i / d x_j``, and for an image ``(H, W, C)``
    the flat index is ``(h * W + w) * C + c``.

    Args:
        fn: a JAX-traceable function of one argument.
        x: the point, a pytree of arrays.
        mode: ``"fwd"`` (``jax.jacfwd``, one JVP per input dimension), ``"rev"``
            (``jax.jacrev``, one VJP per output dimension), or ``"auto"``: forward mode when
            the input has no more dimensions than the output, else reverse mode.

    Returns:
        Array of shape ``(out_size, in_size)``.

    Raises:
        ValueError: unknown ``mode``; ``x`` without numbers.
        TypeError: ``x`` not real floats (derivatives need them).
        MemoryError: the Jacobian, with the workspace XLA plans for it, cannot fit in the
            device's memory (checked before anything is allocated; the message gives the
            sizes and the matrix-free alternatives).
        FloatingPointError: the Jacobian holds inf or NaN (outside ``jit``); the message
            names the first output row that went non-finite.
    """
    if mode not in ("auto", "fwd", "rev"):
        raise ValueError(f"mode must be 'auto', 'fwd' or 'rev', got {mode!r}")
    check_float_input(x)
    flat_x, unravel = ravel_pytree(x)

    def flat_fn(v: jax.Array) -> jax.Array:
        return ravel_pytree(fn(unravel(v)))[0]

    jaxpr = jax.make_jaxpr(flat_fn)(flat_x)
    out_size = int(np.prod(jaxpr.out_avals[0].shape))
    if mode == "auto":
        mode = "fwd" if flat_x.shape[0] <= out_size else "rev"
    jac = jax.jacfwd(flat_fn) if mode == "fwd" else jax.jacrev(flat_fn)
    J = None
    tangents = flat_x.shape[0] if mode == "fwd" else out_size
    bound = jnp.dtype(flat_x.dtype).itemsize * (
        out_size * flat_x.shape[0] + tangents * _intermediate_size(jaxpr.jaxpr)
    )
    if not is_traced(flat_x) and not well_within_memory(bound):
        # large enough to matter: compiled first, so that XLA's plan for its memory is
        # checked before anything is allocated (small ones run as before, uncompiled)
        jitted = jax.jit(jac)
        try:
            compiled = jitted.lower(flat_x).compile()
        except jax.errors.UnexpectedTracerError:  # fn closes over a caller's tracer
            compiled = None
        if compiled is not None:
            check_compiled_memory(
                compiled,
                f"the {out_size} x {flat_x.shape[0]} Jacobian",
                "use jacobian_spectrum(fn, x, method='matrix_free') or "
                "extreme_singular_values / frobenius_norm_sq (Lanczos and Hutchinson: no "
                "matrix), or a smaller x",
            )
            J = compiled(flat_x)
    if J is None:
        J = jac(flat_x)
    require_finite(J, "the Jacobian", axis_name="output row")
    return J


def _intermediate_size(jaxpr) -> int:
    """Numbers in every value a jaxpr computes, nested jaxprs (scan and loop bodies)
    included: with one copy per tangent, a generous bound on what differentiating it keeps
    alive."""
    total = 0
    for eqn in jaxpr.eqns:
        total += sum(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _intermediate_size(inner)
    return total


def flat_size(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or shapes (the side of its Jacobian)."""
    return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(tree))
