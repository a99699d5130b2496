"""Random weight matrices at initialization, looked up by name.

Every initializer draws a weight matrix ``W`` of shape ``(fan_out, fan_in)``, applied as
``h @ W.T``. The scale convention is mean-field's: a Gaussian ``W`` has i.i.d. entries
``N(0, sigma_w^2 / fan_in)``, so ``E ||W u||^2 = sigma_w^2 ||u||^2 * fan_out / fan_in``.

Names:
    ``"gaussian"``: entries N(0, sigma_w^2 / fan_in).
    ``"he"``: Gaussian with sigma_w^2 = 2 (He et al. 2015), whatever sigma_w is passed.
    ``"lecun"``: Gaussian with sigma_w^2 = 1.
    ``"glorot"``: Gaussian with variance 2 / (fan_in + fan_out) (Glorot & Bengio 2010).
    ``"orthogonal"``: sigma_w times a Haar-random (semi-)orthogonal matrix, so every
        singular value equals sigma_w (Saxe et al. 2014).
    ``"looks_linear"``: the mirrored initialization of Balduzzi et al. (arXiv 1702.08591):
        with an orthogonal ``W0`` of shape ``(fan_out/2, fan_in/2)``,
        ``W = sigma_w [[W0, -W0], [-W0, W0]]``, so units come in pairs (u, -u) and a ReLU
        network computes ``relu(u) - relu(-u) = u``: it is linear (and, with orthogonal W0,
        norm preserving) at initialization. For the first layer, whose input is not made of
        pairs, ``W = sigma_w [[W0], [-W0]]`` with ``W0`` of shape ``(fan_out/2, fan_in)``.
        Needs an even width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INITIALIZERS = ("gaussian", "he", "lecun", "glorot", "orthogonal", "looks_linear")


def effective_sigma_w(init: str, sigma_w: float, fan_in: int, fan_out: int) -> float:
    """The sigma_w (in the N(0, sigma_w^2 / fan_in) convention) that ``init`` uses."""
    if init == "glorot":
        return (2.0 * fan_in / (fan_in + fan_out)) ** 0.5
    return {"he": 2.0**0.5, "lecun": 1.0}.get(init, float(sigma_w))


def normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Standard normal draws made in float32 and cast to ``dtype``: a float64 model draws
    the numbers of its float32 twin (same key), so the two differ by rounding only."""
    # the barrier keeps XLA from folding the caller's scaling into the draw under jit, so
    # that a jitted init draws bit for bit what an eager one does
    return jax.lax.optimization_barrier(jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def orthogonal(key: jax.Array, shape: tuple[int, int], scale: float, dtype) -> jax.Array:
    """``scale`` times a Haar-random matrix of ``shape`` with orthonormal rows or columns
    (whichever are fewer): the QR factor of a Gaussian matrix (:func:`normal`, so the draw
    does not depend on ``dtype``) with the signs of ``diag(R)`` taken out (Mezzadri,
    arXiv math-ph/0609050); the factorization runs in ``dtype``, so float64 is orthogonal
    to float64 precision."""
    rows, cols = shape
    Q, R = jnp.linalg.qr(normal(key, (max(rows, cols), min(rows, cols)), dtype))
    Q = Q * jnp.sign(jnp.diagonal(R))
    return scale * (Q.T if rows < cols else Q)


def weight_matrix(
    key: jax.Array,
    init: str,
    fan_in: int,
    fan_out: int,
    *,
    sigma_w: float = 1.0,
    paired_input: bool = True,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Draw one weight matrix of shape ``(fan_out, fan_in)``; see the module docstring.

    Args:
        key: PRNG key.
        init: one of :data:`INITIALIZERS`.
        fan_in, fan_out: input and output dimension.
        sigma_w: weight scale (ignored by ``"he"``, ``"lecun"``, ``"glorot"``).
        paired_input: for ``"looks_linear"`` only: whether the input is made of mirrored
            pairs (every layer but the first).
        dtype: floating dtype of the result.
    """
    if init not in INITIALIZERS:
        raise ValueError(f"unknown init {init!r}; expected one of: {', '.join(INITIALIZERS)}")
    scale = effective_sigma_w(init, sigma_w, fan_in, fan_out)
    if init == "orthogonal":
        return orthogonal(key, (fan_out, fan_in), scale, dtype)
    if init == "looks_linear":
        if fan_out % 2 or (paired_input and fan_in % 2):
            raise ValueError(
                f"looks_linear needs even widths (units come in mirrored pairs), "
                f"got fan_in={fan_in}, fan_out={fan_out}"
            )
        half_in = fan_in // 2 if paired_input else fan_in
        W0 = orthogonal(key, (fan_out // 2, half_in), scale, dtype)
        top = jnp.concatenate([W0, -W0], axis=1) if paired_input else W0
        return jnp.concatenate([top, -top], axis=0)
    std = scale / fan_in**0.5
    return std * normal(key, (fan_out, fan_in), dtype)
