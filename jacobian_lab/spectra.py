"""Singular values of Jacobians and their summary statistics.

All functions take batches: any leading axes (inputs, seeds, layers) are kept.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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
        net, params: a network and its parameters (prefixes of ``net.num_layers`` layers
            at most).
        x: inputs ``(B, in_dim)`` (batch norm: one batch, or ``(S, B, in_dim)``).
        depths: prefix depths, each in ``1 .. net.num_layers``.

    Returns:
        ``(S, len(depths), min(d, d_in))``, descending: the singular values of
        ``d f_{L-D} / d x`` (GSC-paper indexing) for sample ``s`` and depth ``depths[j]``.
    """
    from jacobian_lab.layered import input_to_layer_jacobians

    L = net.num_layers
    depths = [int(D) for D in depths]
    if not depths or min(depths) < 1 or max(depths) > L:
        raise ValueError(f"depths must lie in 1..{L} (the network's layers), got {depths}")
    P = input_to_layer_jacobians(net, params, x)  # (S, L, d, d_in); [s, l] = d f_l / d x
    return singular_values(P[:, [L - D for D in depths]])
