"""Singular values of Jacobians and their summary statistics.

All functions take batches: any leading axes (inputs, seeds, layers) are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jacobian_lab.jacobians import jacobian
from jacobian_lab.layered import input_to_layer_jacobians
from jacobian_lab.matrix_free import (
    Estimate,
    choose_method,
    dense_bytes,
    extreme_singular_values,
    slq_spectrum,
)


def singular_values(J: jax.Array) -> jax.Array:
    """Singular values of a matrix, or of a batch of matrices, in descending order.

    Args:
        J: array of shape ``(..., m, n)``.

    Returns:
        Array of shape ``(..., min(m, n))``, exact (dense SVD).
    """
    if J.ndim < 2:
        raise ValueError(f"singular_values needs a matrix (..., m, n), got shape {J.shape}")
    return jnp.linalg.svd(J, compute_uv=False)


class SpectrumSummary(NamedTuple):
    """Summary statistics of singular values; each field has the batch shape of the input.

    Fields:
        max: largest singular value s_1.
        min: smallest singular value s_r, r = min(m, n).
        condition_number: s_1 / s_r (inf when s_r = 0).
        mean_sq: mean squared singular value (1/r) sum_i s_i^2 = ||J||_F^2 / r.
        var_sq: variance of the squared singular values, (1/r) sum_i (s_i^2 - mean_sq)^2.
            Pennington et al. (arXiv 1711.04735) use mean_sq and var_sq as the first two
            moments of the spectrum of J J^T; var_sq = 0 is dynamical isometry.
        log_spread: standard deviation of log s_i (log-scale width of the spectrum).
    """

    max: jax.Array
    min: jax.Array
    condition_number: jax.Array
    mean_sq: jax.Array
    var_sq: jax.Array
    log_spread: jax.Array


def spectrum_summary(s: jax.Array) -> SpectrumSummary:
    """Summary statistics of singular values ``s`` of shape ``(..., r)`` (from
    :func:`singular_values`); see :class:`SpectrumSummary` for the definitions."""
    s_max = jnp.max(s, axis=-1)
    s_min = jnp.min(s, axis=-1)
    sq = s**2
    mean_sq = jnp.mean(sq, axis=-1)
    var_sq = jnp.mean((sq - mean_sq[..., None]) ** 2, axis=-1)
    return SpectrumSummary(
        max=s_max,
        min=s_min,
        condition_number=s_max / s_min,
        mean_sq=mean_sq,
        var_sq=var_sq,
        log_spread=jnp.std(jnp.log(s), axis=-1),
    )


def spectral_density(
    s: jax.Array,
    grid: jax.Array,
    *,
    bandwidth: float | None = None,
    squared: bool = True,
) -> jax.Array:
    """Gaussian kernel density estimate of the (squared) singular values, pooled over batches.

    Args:
        s: singular values of any shape; all entries are pooled into one sample.
        grid: points of shape ``(g,)`` at which to evaluate the density.
        bandwidth: kernel width; default Silverman's rule 1.06 * std * N^(-1/5).
        squared: estimate the density of s^2 (the eigenvalues of J J^T, the quantity that
            random-matrix laws such as Marchenko-Pastur describe) rather than of s.

    Returns:
        Density values of shape ``(g,)``; integrates to 1 over the real line.
    """
    values = jnp.ravel(s**2 if squared else s)
    n = values.shape[0]
    if bandwidth is None:
        bandwidth = 1.06 * jnp.std(values) * n ** (-0.2)
    z = (grid[:, None] - values[None, :]) / bandwidth
    return jnp.mean(jnp.exp(-0.5 * z**2), axis=1) / (bandwidth * jnp.sqrt(2 * jnp.pi))


def prefix_singular_values(net, params, x: jax.Array, depths) -> jax.Array:
    """Singular values of the input-output Jacobian of the first ``D`` layers of ``net``
    (the prefix network of depth ``D``), for each ``D`` in ``depths``, from one pass.

    Args:
        net, params: any model whose layers after the first keep one size, and its
            parameters (prefixes of ``net.num_layers`` layers at most).
        x: inputs ``(B, in_dim)`` (batch norm: one batch, or ``(S, B, in_dim)``).
        depths: prefix depths, each in ``1 .. net.num_layers``.

    Returns:
        ``(S, len(depths), min(d, d_in))``, descending: the singular values of
        ``d f_{L-D} / d x`` (GSC-paper indexing) for sample ``s`` and depth ``depths[j]``.
    """
    L = net.num_layers
    depths = [int(D) for D in depths]
    if not depths or min(depths) < 1 or max(depths) > L:
        raise ValueError(f"depths must lie in 1..{L} (the network's layers), got {depths}")
    P = input_to_layer_jacobians(net, params, x)  # (S, L, d, d_in); [s, l] = d f_l / d x
    return singular_values(P[:, [L - D for D in depths]])


class Spectrum(NamedTuple):
    """The squared singular values of a Jacobian ``J`` (``m x n``) as a spectral measure,
    exact or estimated, with its extreme values.

    The measure is the eigenvalue distribution of ``J^T J``, ``(1/n) sum_i delta(lambda_i)``
    over its ``n`` eigenvalues (the ``min(m, n)`` squared singular values and ``n - m``
    zeros when ``J`` is wide), written as ``(1/P) sum_p sum_j weights[p, j]
    delta(nodes[p, j])``. Dense: ``P = 1``, the eigenvalues with weights ``1/n``.
    Matrix-free: stochastic Lanczos quadrature over ``P`` probes.

    Fields:
        nodes, weights: ``(P, k)``; each row of ``weights`` sums to 1.
        frobenius_sq: ``||J||_F^2`` (:class:`~jacobian_lab.matrix_free.Estimate`; error 0
            when dense, else the standard error over the SLQ probes).
        largest, smallest: singular values ``s_1`` and ``s_min(m, n)`` (Estimates; the
            matrix-free errors are Lanczos residual bounds).
        method: ``"dense"`` or ``"matrix_free"``.
    """

    nodes: jax.Array
    weights: jax.Array
    frobenius_sq: Estimate
    largest: Estimate
    smallest: Estimate
    method: str

    @property
    def condition_number(self) -> jax.Array:
        """``s_1 / s_min`` (point values)."""
        return self.largest.value / self.smallest.value

    def cdf(self, t: jax.Array) -> jax.Array:
        """Fraction of the ``n`` eigenvalues of ``J^T J`` at most ``t`` (any shape)."""
        t = jnp.asarray(t)
        below = self.nodes[None] <= t.reshape(-1, 1, 1)
        return (jnp.sum(below * self.weights, axis=(1, 2)) / self.nodes.shape[0]).reshape(t.shape)

    def moment(self, j: int) -> jax.Array:
        """``(1/n) tr (J^T J)^j``; SLQ with ``k`` steps is exact for ``j < 2k`` up to the
        probes' Monte-Carlo error."""
        return jnp.sum(self.weights * self.nodes**j) / self.nodes.shape[0]

    def density(self, grid: jax.Array, bandwidth: float) -> jax.Array:
        """Gaussian-kernel smoothed density of the squared singular values at ``grid``."""
        z = (jnp.asarray(grid)[:, None, None] - self.nodes[None]) / bandwidth
        k = jnp.exp(-0.5 * z**2) / (bandwidth * jnp.sqrt(2 * jnp.pi))
        return jnp.sum(k * self.weights[None], axis=(1, 2)) / self.nodes.shape[0]


def jacobian_spectrum(
    fn: Callable[[Any], Any],
    x: Any,
    *,
    method: str = "auto",
    key: jax.Array | None = None,
    num_probes: int = 16,
    num_matvecs: int = 32,
    memory_budget: int | None = None,
) -> Spectrum:
    """The spectrum of ``J = d fn / d x`` for any callable: exact where the Jacobian fits
    in memory, matrix-free where it does not.

    Args:
        fn, x: the function and the point (pytrees flattened as in
            :func:`jacobian_lab.jacobian`).
        method: ``"dense"`` (full Jacobian and SVD), ``"matrix_free"`` (stochastic Lanczos
            quadrature over ``num_probes`` Rademacher probes with ``num_matvecs``
            Golub-Kahan steps each, plus one Lanczos run for the extreme values; matfree),
            or ``"auto"``: dense when ``3 m n`` numbers fit ``memory_budget`` bytes
            (default 1 GiB).
        key: PRNG key for the probes (default ``PRNGKey(0)``).

    Returns:
        :class:`Spectrum`.
    """
    shape_in = sum(math.prod(jnp.shape(v)) for v in jax.tree_util.tree_leaves(x))
    out = jax.eval_shape(fn, x)
    shape_out = sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(out))
    dtype = jax.tree_util.tree_leaves(x)[0].dtype
    chosen = choose_method(method, dense_bytes((shape_out, shape_in), dtype), memory_budget)
    key = jax.random.PRNGKey(0) if key is None else key
    if chosen == "dense":
        J = jacobian(fn, x)
        s = singular_values(J)
        n = J.shape[1]
        nodes = jnp.concatenate([s**2, jnp.zeros(n - s.shape[0], s.dtype)])[None]
        zero = jnp.zeros((), s.dtype)
        return Spectrum(
            nodes,
            jnp.full_like(nodes, 1.0 / n),
            Estimate(jnp.sum(s**2), zero),
            Estimate(s[0], zero),
            Estimate(s[-1], zero),
            "dense",
        )
    k_slq, k_ext = jax.random.split(key)
    slq = slq_spectrum(fn, x, k_slq, num_probes, num_matvecs)
    n = shape_in
    per_probe = n * jnp.sum(slq.weights * slq.nodes, axis=1)  # = ||J v_p||^2, ||v_p||^2 = n
    frob = Estimate(per_probe.mean(), per_probe.std() / jnp.sqrt(num_probes))
    ext = extreme_singular_values(fn, x, k_ext, num_matvecs)
    return Spectrum(slq.nodes, slq.weights, frob, ext.largest, ext.smallest, "matrix_free")
