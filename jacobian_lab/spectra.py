"""Singular values of Jacobians and their summary statistics.

All functions take batches: any leading axes (inputs, seeds, layers) are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jacobian_lab.checks import is_traced, memory_checked
from jacobian_lab.jacobians import flat_size, jacobian
from jacobian_lab.layered import input_to_layer_jacobians
from jacobian_lab.matrix_free import (
    Estimate,
    check_count,
    choose_method,
    dense_bytes,
    extreme_singular_values,
    mean_estimate,
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
    return _svd_values(J)


@memory_checked(
    "the SVD of the Jacobians (the matrices and LAPACK's workspace)",
    "use jacobian_spectrum(fn, x, method='matrix_free') (Lanczos: the spectral measure and "
    "the extreme singular values without the matrix), or fewer matrices per call",
)
def _svd_values(J: jax.Array) -> jax.Array:
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
        bandwidth: kernel width. Default: Silverman's rule ``1.06 * std * N^(-1/5)``,
            floored per value at the grid step around it (see :func:`_kernel_widths`), so
            that a (near) point mass, whose rule-of-thumb width is (near) 0, is a kernel the
            grid resolves rather than a spike or ``0/0``. An explicit bandwidth is used as
            given.
        squared: estimate the density of s^2 (the eigenvalues of J J^T, the quantity that
            random-matrix laws such as Marchenko-Pastur describe) rather than of s.

    Returns:
        Density values of shape ``(g,)``; integrates to 1 over the real line, and (default
        bandwidth) to 1 within ``1e-6`` by the trapezoid rule on a ``grid`` that covers
        the values by 5 kernel widths.
    """
    s = jnp.asarray(s)
    if s.size == 0:
        raise ValueError(
            f"s holds no singular values (shape {s.shape}): the density of an empty sample is "
            "undefined; pass the output of singular_values on a non-empty Jacobian"
        )
    if not is_traced(s) and not bool(jnp.all(jnp.isfinite(s))):
        raise ValueError("s holds inf or NaN: a density of failed measurements is undefined")
    return _kernel_density(jnp.ravel(s**2 if squared else s), None, grid, bandwidth)


def _kernel_density(values, weights, grid, bandwidth):
    """Gaussian kernel density at ``grid`` ``(g,)`` of ``values`` with ``weights`` summing
    to 1 (``None``: equal weights), kernel widths from :func:`_kernel_widths`."""
    grid = jnp.asarray(grid)
    if grid.ndim != 1:
        raise ValueError(f"grid must be one-dimensional (g,), got shape {grid.shape}")
    w = jnp.full(values.shape, 1.0 / values.shape[0]) if weights is None else weights
    h = _kernel_widths(values, w, grid, bandwidth)
    k = jnp.exp(-0.5 * ((grid[:, None] - values[None]) / h) ** 2) / (h * jnp.sqrt(2 * jnp.pi))
    return jnp.mean(k, axis=1) if weights is None else jnp.sum(k * weights[None], axis=1)


def _kernel_widths(values, weights, grid, bandwidth):
    """Per-value Gaussian kernel widths for a density of ``values`` (weights summing to 1).

    An explicit ``bandwidth`` (> 0) is used for every value. The default is Silverman's
    rule ``1.06 * std * n_eff^(-1/5)`` (weighted std, Kish effective sample size
    ``1 / sum w^2``), floored at the grid step around each value: a kernel narrower than
    the step cannot be integrated on the grid (the trapezoid rule is exact to ~1e-8 for a
    Gaussian at least one step wide, and off by orders of magnitude for a spike between two
    points), and the rule gives 0 for a point mass. A grid of one point has no step, and
    then the floor is ``1e-3`` times the values' scale (1 for all zeros).
    """
    if bandwidth is not None:
        if not is_traced(bandwidth) and not float(bandwidth) > 0:
            raise ValueError(f"bandwidth must be a positive number or None, got {bandwidth!r}")
        return jnp.full(values.shape, bandwidth, jnp.result_type(values, float))
    mean = jnp.sum(weights * values)
    std = jnp.sqrt(jnp.sum(weights * (values - mean) ** 2))
    n_eff = 1.0 / jnp.sum(weights**2)
    h = 1.06 * std * n_eff ** (-0.2)
    if grid.shape[0] < 2:
        scale = jnp.max(jnp.abs(values))
        return jnp.full(values.shape, jnp.maximum(h, 1e-3 * jnp.where(scale > 0, scale, 1.0)))
    g = jnp.sort(grid)
    step = jnp.diff(g)  # (g-1,): the step of the interval containing each value and its
    i = jnp.clip(jnp.searchsorted(g, values) - 1, 0, step.shape[0] - 1)  # neighbours
    local = jnp.maximum(
        step[i],
        jnp.maximum(step[jnp.maximum(i - 1, 0)], step[jnp.minimum(i + 1, step.shape[0] - 1)]),
    )
    return jnp.maximum(h, local)


def prefix_singular_values(net, params, x: jax.Array, depths) -> jax.Array:
    """Singular values of the input-output Jacobian of the first ``D`` layers of ``net``
    (the prefix network of depth ``D``), for each ``D`` in ``depths``, from one pass.

    Args:
        net, params, x: any model whose layers after the first keep one size, its params
            and inputs (:func:`~jacobian_lab.driver.prepare`).
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
            when dense, else the standard error over the SLQ probes, with degrees of
            freedom and a calibrated ``interval()``; see :meth:`moment_estimate`).
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
        """``s_1 / s_min`` (point values); ``inf`` where ``s_min = 0`` (also for a zero
        Jacobian, where the ratio would be 0/0)."""
        s_min = jnp.asarray(self.smallest.value)
        positive = s_min > 0
        return jnp.where(positive, self.largest.value / jnp.where(positive, s_min, 1), jnp.inf)

    def cdf(self, t: jax.Array) -> jax.Array:
        """Fraction of the ``n`` eigenvalues of ``J^T J`` at most ``t`` (any shape). NaN
        where ``t`` is NaN, and everywhere if a node or weight is NaN: a failed measurement
        is never counted as a probability."""
        t = jnp.asarray(t)
        below = self.nodes[None] <= t.reshape(-1, 1, 1)
        value = jnp.sum(below * self.weights, axis=(1, 2)) / self.nodes.shape[0]
        broken = jnp.any(jnp.isnan(self.nodes) | jnp.isnan(self.weights))
        value = jnp.where(broken | jnp.isnan(t.reshape(-1)), jnp.nan, value)
        return value.reshape(t.shape)

    def moment(self, j: int) -> jax.Array:
        """``(1/n) tr (J^T J)^j``; SLQ with ``k`` steps is exact for ``j < 2k`` up to the
        probes' Monte-Carlo error (:meth:`moment_estimate` gives it)."""
        return jnp.sum(self.weights * self.nodes**j) / self.nodes.shape[0]

    def moment_estimate(self, j: int) -> Estimate:
        """:meth:`moment` with its error: exact (error 0) when dense; matrix-free, the mean
        over the ``P`` probes of their quadratures ``sum_k w_pk nodes_pk^j`` (each an
        unbiased ``v^T (J^T J)^j v / n`` for ``j < 2k``), its standard error (``inf``
        below 3 probes), degrees of freedom and a log-scale interval
        (:func:`~jacobian_lab.matrix_free.mean_estimate`)."""
        j = check_count(j, "j", 0)
        per_probe = jnp.sum(self.weights * self.nodes**j, axis=1)
        if self.method == "dense":
            return Estimate(per_probe.mean(), jnp.zeros((), per_probe.dtype))
        return mean_estimate(per_probe)

    def density(self, grid: jax.Array, bandwidth: float | None = None) -> jax.Array:
        """Gaussian-kernel smoothed density of the squared singular values at ``grid``
        ``(g,)``: each node a kernel of its weight. ``bandwidth`` as in
        :func:`spectral_density` (default: Silverman's rule on the measure, floored at the
        grid step), so it integrates to 1 on a grid covering the nodes."""
        w = jnp.ravel(self.weights) / self.nodes.shape[0]
        return _kernel_density(jnp.ravel(self.nodes), w, grid, bandwidth)


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
        num_probes, num_matvecs: ``int >= 1`` (checked whatever the method); fewer than
            3 probes give ``frobenius_sq`` with error ``inf``.
        memory_budget: bytes, an ``int >= 0``, or ``None``.

    Returns:
        :class:`Spectrum`.
    """
    num_probes = check_count(num_probes, "num_probes")
    num_matvecs = check_count(num_matvecs, "num_matvecs")
    n = flat_size(x)
    dtype = jax.tree_util.tree_leaves(x)[0].dtype
    chosen = choose_method(
        method, dense_bytes((flat_size(jax.eval_shape(fn, x)), n), dtype), memory_budget
    )
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
    per_probe = n * jnp.sum(slq.weights * slq.nodes, axis=1)  # = ||J v_p||^2, ||v_p||^2 = n
    frob = mean_estimate(per_probe)
    ext = extreme_singular_values(fn, x, k_ext, num_matvecs)
    return Spectrum(slq.nodes, slq.weights, frob, ext.largest, ext.smallest, "matrix_free")
