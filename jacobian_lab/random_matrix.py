"""Random-matrix and free-probability predictions for Jacobian spectra at initialization.

All laws are for the eigenvalues ``lambda = sigma^2`` of ``J J^T`` (squared singular
values of the Jacobian ``J``) in the limit of infinite width:

* one Gaussian layer ``W`` with ``N(0, sigma_w^2 / n)`` entries, square: Marchenko-Pastur
  with ratio 1 on ``[0, 4 sigma_w^2]``;
* ``L`` Gaussian layers of a linear network: the Fuss-Catalan law, moments
  ``C((L+1)k, k) / (Lk + 1)`` (``sigma_w = 1``);
* ``L`` orthogonal layers of a linear network: every eigenvalue equals ``sigma_w^(2L)``;
* a deep nonlinear network ``J = D_L W_L ... D_1 W_1``: by free probability the spectrum
  of ``J J^T`` is the free multiplicative convolution of the spectra of ``W_l^T W_l`` and
  ``D_l^2`` (Pennington, Schoenholz & Ganguli, arXiv 1711.04735). Its S-transform is the
  product of theirs, and the first two coefficients give the mean and variance in closed
  form (:func:`jacobian_moments`).
"""

from __future__ import annotations

import numpy as np
from scipy.special import comb

from jacobian_lab.meanfield import (
    check_arguments,
    derivative_distribution,
    derivative_moments,
    length_sequence,
    mean_field,
)

WEIGHT_VARIANCE = {"gaussian": 1.0, "orthogonal": 0.0}
"""Normalized variance ``var / mean^2`` of the eigenvalues of ``W^T W`` for a square
``W``: 1 for Gaussian (Marchenko-Pastur, ratio 1), 0 for orthogonal."""


def _check(depth: int, weights: str = "gaussian") -> None:
    if weights not in WEIGHT_VARIANCE:
        raise ValueError(f"unknown weights {weights!r}; expected one of {tuple(WEIGHT_VARIANCE)}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")


def marchenko_pastur_density(x, sigma_w: float = 1.0) -> np.ndarray:
    """Density of the eigenvalues of ``W W^T`` for a square ``W`` with ``N(0, sigma_w^2 /
    n)`` entries: ``sqrt(x (4 s - x)) / (2 pi s x)`` on ``(0, 4 s)``, ``s = sigma_w^2``."""
    x = np.asarray(x, np.float64)
    s = sigma_w**2
    inside = (x > 0) & (x < 4 * s)
    safe = np.where(inside, x, 1.0)
    return np.where(inside, np.sqrt(safe * (4 * s - safe)) / (2 * np.pi * s * safe), 0.0)


def fuss_catalan_moments(depth: int, k) -> np.ndarray:
    """``E[lambda^k] = C((L+1)k, k) / (Lk + 1)`` for a depth-``L`` Gaussian linear network
    with ``sigma_w = 1`` (k = 1 gives 1, k = 2 gives L + 1)."""
    _check(depth)
    k = np.asarray(k)
    return comb((depth + 1) * k, k, exact=False) / (depth * k + 1)


def fuss_catalan_density(depth: int, x) -> np.ndarray:
    """Density of the Fuss-Catalan law of order ``L = depth`` at ``x`` (support
    ``(0, (L+1)^(L+1) / L^L)``), from its parametrization by ``t`` in ``(0, pi/(L+1))``:
    ``x(t) = sin((L+1)t)^(L+1) / (sin t sin(Lt)^L)`` and
    ``density = sin(t)^2 sin(Lt)^(L-1) / (pi sin((L+1)t)^L)`` (Haagerup & Moller; Neuschel).
    ``x(t)`` decreases monotonically, so ``t(x)`` is found by bisection.
    """
    _check(depth)
    L = depth
    x = np.asarray(x, np.float64)
    top = (L + 1) ** (L + 1) / L**L

    def x_of(t):
        return np.sin((L + 1) * t) ** (L + 1) / (np.sin(t) * np.sin(L * t) ** L)

    inside = (x > 0) & (x < top)
    target = np.where(inside, x, 1.0)  # points outside the support get 0 below
    lo = np.full(x.shape, 1e-300)
    hi = np.full(x.shape, np.pi / (L + 1))
    with np.errstate(divide="ignore", invalid="ignore"):  # x(t) -> 0/0 at the far end
        for _ in range(200):  # bisection to double precision in t
            mid = 0.5 * (lo + hi)
            right = x_of(mid) > target  # x(t) decreasing: the root lies right of mid
            lo, hi = np.where(right, mid, lo), np.where(right, hi, mid)
        t = 0.5 * (lo + hi)
        rho = np.sin(t) ** 2 * np.sin(L * t) ** (L - 1) / (np.pi * np.sin((L + 1) * t) ** L)
    return np.where(inside, rho, 0.0)


def jacobian_moments(
    activation: str,
    sigma_w: float,
    sigma_b: float,
    depth: int,
    weights: str = "gaussian",
    q1: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ``lambda = sigma^2`` for the input-output Jacobian of every
    prefix depth ``1 .. depth`` of a wide random MLP, by free probability.

    The S-transform of a free product is the product of the S-transforms; writing
    ``S(z) = (1 / m_1) (1 - v z + O(z^2))`` with ``v = var / mean^2``, the mean multiplies
    and ``v`` adds over the factors ``W_l^T W_l`` and ``D_l^2``:
    ``mean_D = prod_l sigma_w^2 mu_1(q_l)`` and
    ``var_D / mean_D^2 = sum_l (v_W + mu_2(q_l) / mu_1(q_l)^2 - 1)``, with
    ``mu_k = E[phi'(u)^(2k)]`` at the layer's pre-activation variance ``q_l`` (from the
    length map, so transients before the fixed point are included) and ``v_W`` from
    :data:`WEIGHT_VARIANCE`.

    Args:
        q1: pre-activation variance of the first layer; default ``sigma_w^2 + sigma_b^2``
            (inputs with ``||x||^2 = n``, as for standard Gaussian inputs).

    Returns:
        ``(mean, variance)``, each of shape ``(depth,)``, entry ``D - 1`` for depth ``D``.
    """
    _check(depth, weights)
    check_arguments(sigma_w=sigma_w, sigma_b=sigma_b, q1=q1)
    q1 = sigma_w**2 + sigma_b**2 if q1 is None else q1
    q = length_sequence(activation, q1, sigma_w, sigma_b, depth)
    mu1, mu2 = derivative_moments(activation, q)
    mean = np.cumprod(sigma_w**2 * mu1)
    v = np.cumsum(WEIGHT_VARIANCE[weights] + mu2 / mu1**2 - 1)
    return mean, v * mean**2


def jacobian_spectral_density(
    activation: str,
    sigma_w: float,
    sigma_b: float,
    depth: int,
    x,
    weights: str = "gaussian",
    *,
    q: float | None = None,
    eta: float = 1e-7,
    newton_steps: int = 60,
) -> np.ndarray:
    """Density of ``lambda = sigma^2`` for the input-output Jacobian of a deep random MLP
    whose layers all sit at the fixed point, by free probability (Pennington, Schoenholz &
    Ganguli, arXiv 1711.04735, Section 3), solved numerically.

    With ``M(lambda) = lambda G(lambda) - 1`` (``G`` the Stieltjes transform) and
    ``S(z) = (1 + z) / (z M^{-1}(z))``, the spectrum of ``J J^T`` has
    ``S = (S_W S_D)^L``: ``S_W(z) = 1 / (sigma_w^2 (1 + z))`` for Gaussian and ``1 / sigma_w^2``
    for orthogonal weights, and ``S_D(z) = (1 + z) / (z zeta)`` where ``zeta`` solves
    ``M_D(zeta) = E[t / (zeta - t)] = z`` over the law of ``t = phi'(u)^2``. Parametrizing
    by ``zeta`` makes every step explicit: ``z = M_D(zeta)``, then
    ``lambda(zeta) = (1 + z) / (z S(z))``. For each ``x`` (descending, by continuation from
    beyond the support, where ``z ~ m_1 / lambda``) Newton's method solves
    ``lambda(zeta) = x + i eta``, and ``density = -Im[(1 + z) / lambda] / pi``.

    Args:
        x: points ``> 0`` at which to evaluate the density (any order).
        eta: the density is evaluated at ``x (1 + i eta)``: a Lorentzian smoothing of
            relative width ``eta``.
        q: pre-activation variance of every layer; default the fixed point ``q*``.

    Returns:
        Density values at ``x``; NaN where Newton's method found no solution on the physical
        branch (none in the tests here). Accuracy is limited near the edges of the support
        and near 0, where the density may diverge; check it against
        :func:`jacobian_moments`.
    """
    _check(depth, weights)
    check_arguments(sigma_w=sigma_w, sigma_b=sigma_b, q=q)
    x = np.asarray(x, np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError("jacobian_spectral_density takes finite points x > 0")
    q = float(mean_field(activation, sigma_w, sigma_b).q_star) if q is None else float(q)
    t, w = (np.asarray(a, np.float64) for a in derivative_distribution(activation, q))
    keep = w > 1e-300
    t, w = t[keep], w[keep]
    s2 = sigma_w**2
    mu1 = float(np.sum(w * t))
    m1 = (s2 * mu1) ** depth

    def lam(zeta):
        z = np.sum(w * t / (zeta - t))
        s_d = (1 + z) / (z * zeta)
        s_w = 1 / (s2 * (1 + z)) if weights == "gaussian" else 1 / s2
        return (1 + z) / (z * (s_w * s_d) ** depth), z

    order = np.argsort(-x.ravel())
    points = x.ravel()[order]
    mean, var = jacobian_moments(activation, sigma_w, sigma_b, depth, weights, q1=q)
    # far enough out that the series z ~ m_1 / lambda gives Newton a good first guess
    start = 1e3 * float(points[0] + mean[-1] + 10 * np.sqrt(var[-1]) + 1)

    def newton(zeta, target):
        for _ in range(newton_steps):
            value, _ = lam(zeta)
            h = 1e-7 * (1 + abs(zeta))
            slope = (lam(zeta + h)[0] - lam(zeta - h)[0]) / (2 * h)
            step = (value - target) / slope
            zeta = zeta - step
            if abs(step) < 1e-13 * (1 + abs(zeta)):
                return zeta, True
        return zeta, False

    # Continuation from far outside the support, in steps of at most 1% (relative), so that
    # Newton follows one branch. On the physical branch Im G(x + i y) <= -y |G|^2 (y > 0);
    # a step that lands elsewhere (e.g. a real root inside the support) is retried from a
    # guess pushed off the real axis.
    zeta = complex(mu1 * start / m1 + t.max())  # z = M_D(zeta) ~ mu1 / zeta ~ m1 / lambda
    density = np.empty(points.size)
    previous, lost = start, False
    for i, point in enumerate(points):
        n_sub = max(1, int(np.ceil(np.log(previous / max(point, 1e-300)) / np.log(1.01))))
        for sub in np.geomspace(previous, point, n_sub + 1)[1:]:
            target = sub + 1j * eta * max(sub, 1e-12)
            best = None
            for guess in (zeta, zeta + 0.1j * abs(zeta), zeta - 0.1j * abs(zeta)):
                candidate, ok = newton(guess, target)
                g = (1 + lam(candidate)[1]) / target
                # physical: Im G(x + i y) = -y int rho / |x + i y - t|^2 <= -y |G|^2
                if ok and g.imag <= -0.5 * target.imag * abs(g) ** 2:
                    best = candidate
                    break
            lost = best is None
            zeta = candidate if lost else best
        previous = point
        z = lam(zeta)[1]
        g = (1 + z) / (point + 1j * eta * point)
        density[i] = np.nan if lost else max(-g.imag / np.pi, 0.0)
    out = np.empty(x.size)
    out[order] = density
    return out.reshape(x.shape)


def cdf_from_density(grid, density) -> np.ndarray:
    """The distribution function on ``grid`` (ascending) of a law whose density on
    ``[grid[0], grid[-1]]`` is ``density`` and whose mass above ``grid[-1]`` is negligible:
    ``F(x) = 1 - int_x^top density`` (trapezoid rule). Mass below ``grid[0]`` (an atom at
    0, or a density that diverges there) is thus kept at the bottom, not spread by
    renormalizing."""
    grid, density = np.asarray(grid, np.float64), np.asarray(density, np.float64)
    pieces = 0.5 * (density[1:] + density[:-1]) * np.diff(grid)
    above = np.concatenate([np.cumsum(pieces[::-1])[::-1], [0.0]])
    return 1.0 - above


def ks_distance(samples, grid, cdf) -> float:
    """Kolmogorov-Smirnov distance between the empirical law of ``samples`` and a law given
    by its distribution function ``cdf`` on ``grid`` (ascending, e.g. from
    :func:`cdf_from_density`). Samples below ``grid[0]``, where ``cdf`` is not resolved,
    enter only through the empirical fraction at ``grid[0]``."""
    x = np.sort(np.asarray(samples, np.float64).ravel())
    n = x.size
    rank = np.arange(1, n + 1)
    resolved = x >= grid[0]
    f = np.interp(x[resolved], grid, cdf)
    above = np.abs(f - rank[resolved] / n)
    below = np.abs(f - (rank[resolved] - 1) / n)
    at_bottom = abs(cdf[0] - np.count_nonzero(~resolved) / n)
    return float(max(above.max(initial=0.0), below.max(initial=0.0), at_bottom))
