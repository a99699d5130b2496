"""A plain-JAX MLP written as a ``for`` loop over a list of ``{"W", "b"}`` dicts, its layer
outputs marked with ``jl.tap`` (the identity outside an analysis), read whole by
``jl.chain``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jacobian_lab as jl


def init(key, sizes, dtype=jnp.float32):
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True):
        params.append(
            {
                "W": (jax.random.normal(k, (m, n), jnp.float32) / jnp.sqrt(m)).astype(dtype),
                "b": jnp.zeros(n, dtype),
            }
        )
    return params


def apply(params, x):
    for layer in params[:-1]:
        x = jl.tap(jnp.tanh(x @ layer["W"] + layer["b"]))
    return x @ params[-1]["W"] + params[-1]["b"]


SIZES = {
    "tiny": {"width": 8, "depth": 4, "batch": 4},
    "small": {"width": 100, "depth": 20, "batch": 16},
}


def make(size: str = "tiny", key=None, dtype=jnp.float32):
    """``((apply, params), x)``: inputs ``(B, width)``, ``depth`` tanh layers and a linear
    read-out."""
    cfg = SIZES[size]
    key = jax.random.PRNGKey(0) if key is None else key
    sizes = [cfg["width"]] * (cfg["depth"] + 1) + [10]
    shape = (cfg["batch"], cfg["width"])
    x = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32).astype(dtype)
    return (apply, init(key, sizes, dtype)), x
