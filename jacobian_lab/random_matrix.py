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

from jacobian_lab.meanfield import derivative_moments, length_sequence

WEIGHT_VARIANCE = {"gaussian": 1.0, "orthogonal": 0.0}
"""Normalized variance ``var / mean^2`` of the eigenvalues of ``W^T W`` for a square
``W``: 1 for Gaussian (Marchenko-Pastur, ratio 1), 0 for orthogonal."""


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
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    k = np.asarray(k)
    return comb((depth + 1) * k, k, exact=False) / (depth * k + 1)


def fuss_catalan_density(depth: int, x) -> np.ndarray:
    """Density of the Fuss-Catalan law of order ``L = depth`` at ``x`` (support
    ``(0, (L+1)^(L+1) / L^L)``), from its parametrization by ``t`` in ``(0, pi/(L+1))``:
    ``x(t) = sin((L+1)t)^(L+1) / (sin t sin(Lt)^L)`` and
    ``density = sin(t)^2 sin(Lt)^(L-1) / (pi sin((L+1)t)^L)`` (Haagerup & Moller; Neuschel).
    ``x(t)`` decreases monotonically, so ``t(x)`` is found by bisection.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    L = depth
    x = np.asarray(x, np.float64)
    top = (L + 1) ** (L + 1) / L**L

    def x_of(t):
        return np.sin((L + 1) * t) ** (L + 1) / (np.sin(t) * np.sin(L * t) ** L)

    lo = np.full(x.shape, 1e-300)
    hi = np.full(x.shape, np.pi / (L + 1))
    for _ in range(200):  # bisection to double precision in t
        mid = 0.5 * (lo + hi)
        right = x_of(mid) > x  # x(t) decreasing: the root lies to the right of mid
        lo, hi = np.where(right, mid, lo), np.where(right, hi, mid)
    t = 0.5 * (lo + hi)
    rho = np.sin(t) ** 2 * np.sin(L * t) ** (L - 1) / (np.pi * np.sin((L + 1) * t) ** L)
    return np.where((x > 0) & (x < top), rho, 0.0)


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
    if weights not in WEIGHT_VARIANCE:
        raise ValueError(f"unknown weights {weights!r}; expected one of {tuple(WEIGHT_VARIANCE)}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    q1 = sigma_w**2 + sigma_b**2 if q1 is None else q1
    q = length_sequence(activation, q1, sigma_w, sigma_b, depth)
    mu1, mu2 = derivative_moments(activation, q)
    mean = np.cumprod(sigma_w**2 * mu1)
    v = np.cumsum(WEIGHT_VARIANCE[weights] + mu2 / mu1**2 - 1)
    return mean, v * mean**2
