"""Mean-field signal propagation in wide random fully connected networks.

For weights ``N(0, sigma_w^2 / n)`` and biases ``N(0, sigma_b^2)`` (Poole et al.,
arXiv 1606.05340; Schoenholz et al., arXiv 1611.01232), the pre-activations of a layer are
Gaussian in the wide limit, with

* the **length map** ``q_l = sigma_w^2 E_z[phi(sqrt(q_{l-1}) z)^2] + sigma_b^2``
  (``z ~ N(0, 1)``) and its fixed point ``q*``;
* the **correlation map** ``c_l = (sigma_w^2 E[phi(u_1) phi(u_2)] + sigma_b^2) / q*`` with
  ``u_1 = sqrt(q*) z_1``, ``u_2 = sqrt(q*) (c z_1 + sqrt(1 - c^2) z_2)``, and its fixed
  point ``c*`` (the stable one reached from ``c = 0``);
* ``chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2]``, the mean squared singular value of one
  layer's Jacobian at the fixed point, and the slope of the correlation map at ``c = 1``:
  ``chi_1 < 1`` is the ordered phase, ``> 1`` the chaotic one, ``= 1`` the critical line;
* the **depth scales** ``xi_q = -1 / ln(chi_1 + sigma_w^2 E[phi''(u) phi(u)])`` and
  ``xi_c = -1 / ln(sigma_w^2 E[phi'(u_1) phi'(u_2)])`` at ``c*`` (Schoenholz et al., eqs. 5
  and 9), over which lengths and correlations approach their fixed points.

Gaussian expectations use Gauss-Legendre quadrature against the Gaussian density on
``[-12, 12]``, split at the activation's kinks (:data:`KINKS`, e.g. 0 for ReLU; in two
dimensions, also along the oblique line where the second variable crosses a kink), so every
piece is smooth and converges exponentially: about 1e-13 in float64 for every activation
here. They are computed in float64 whatever the global JAX precision. Functions broadcast
over their numeric arguments and return NumPy float64 arrays.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jacobian_lab.activations import get_activation

KINKS = {"relu": (0.0,), "selu": (0.0,), "hard_tanh": (-1.0, 1.0)}
"""Points where an activation (or its derivative) is not smooth; integrals are split there."""

TAIL = 12.0
"""Integrals over z ~ N(0, 1) are taken on [-TAIL, TAIL] (the rest has mass < 1e-32)."""

NODES = 24
"""Gauss-Legendre nodes per piece of an integral."""

Z_BREAKS = (-5.0, -2.0, 0.0, 2.0, 5.0)
"""Fixed splits in z, where the Gaussian weight changes."""

U_BREAKS = (-6.0, -2.0, -0.5, 0.5, 2.0, 6.0)
"""Splits in the activation's argument u = sqrt(q) z, where activations change; they
resolve narrow features when q is large."""


def _pieces(breaks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nodes and weights of ``int_{-TAIL}^{TAIL} f(z) N(z) dz`` split at ``breaks``
    (``(..., K)``, any order, clipped to the range): shapes ``(..., (K+1) * NODES)``."""
    t, w = np.polynomial.legendre.leggauss(NODES)
    fixed = jnp.broadcast_to(jnp.asarray(Z_BREAKS), breaks.shape[:-1] + (len(Z_BREAKS),))
    edges = jnp.sort(jnp.clip(jnp.concatenate([breaks, fixed], -1), -TAIL, TAIL), axis=-1)
    lo = jnp.concatenate([jnp.full(edges.shape[:-1] + (1,), -TAIL), edges], axis=-1)
    hi = jnp.concatenate([edges, jnp.full(edges.shape[:-1] + (1,), TAIL)], axis=-1)
    half = (hi - lo)[..., None] / 2
    z = (lo + hi)[..., None] / 2 + half * t
    weight = half * w * jnp.exp(-0.5 * z**2) / np.sqrt(2 * np.pi)
    return z.reshape(*z.shape[:-2], -1), weight.reshape(*z.shape[:-2], -1)


def _derivatives(activation: str):
    """``phi``, ``phi'`` and ``phi''`` as elementwise functions of arrays."""
    phi = get_activation(activation)
    d1 = jax.grad(lambda x: phi(x))
    d2 = jax.grad(d1)
    return phi, jnp.vectorize(d1), jnp.vectorize(d2)


def _kinks(activation: str) -> jax.Array:
    """Points in ``u`` where integrals are split: the kinks and :data:`U_BREAKS`."""
    return jnp.asarray(KINKS.get(activation, ()) + U_BREAKS, jnp.float64)


def _expect(f, q: jax.Array, activation: str) -> jax.Array:
    """``E_z[f(sqrt(q) z)]`` broadcast over ``q``; ``f`` is smooth away from the kinks of
    ``activation``."""
    q = jnp.asarray(q)
    s = jnp.sqrt(q)[..., None]
    z, w = _pieces(_kinks(activation) / jnp.where(s > 0, s, 1.0))
    return jnp.sum(w * f(s * z), axis=-1)


def _expect2(f, g, q: jax.Array, c: jax.Array, activation: str) -> jax.Array:
    """``E[f(u_1) g(u_2)]`` for Gaussians of variance ``q`` and correlation ``c``
    (broadcast together): ``u_1 = sqrt(q) z_1``, ``u_2 = sqrt(q) (c z_1 + sqrt(1-c^2) z_2)``;
    both integrals are split at the points where ``u_1`` or ``u_2`` crosses a kink."""
    q, c = jnp.broadcast_arrays(jnp.asarray(q), jnp.asarray(c))
    kinks = _kinks(activation)
    s = jnp.sqrt(q)[..., None]
    safe_s = jnp.where(s > 0, s, 1.0)
    z1, w1 = _pieces(kinks / safe_s)  # (..., n1)
    cc = c[..., None]
    r = jnp.sqrt(jnp.clip(1 - cc**2, 0.0))
    safe_r = jnp.where(r > 0, r, 1.0)[..., None]
    # inner kinks: sqrt(q) (c z1 + r z2) = k  ->  z2 = (k / sqrt(q) - c z1) / r
    inner = (kinks / safe_s[..., None] - (cc * z1)[..., None]) / safe_r
    z2, w2 = _pieces(inner)  # (..., n1, n2)
    u1 = (s * z1)[..., None]
    u2 = s[..., None] * ((cc * z1)[..., None] + r[..., None] * z2)
    return jnp.sum(w1[..., None] * w2 * f(u1) * g(u2), axis=(-2, -1))


def _float64(fn):
    """Run ``fn`` in 64-bit JAX and hand back NumPy arrays."""

    def wrapped(*args, **kwargs):
        with jax.enable_x64(True):
            args = [jnp.asarray(a, jnp.float64) if not isinstance(a, str) else a for a in args]
            out = fn(*args, **kwargs)
            return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), out)

    wrapped.__doc__ = fn.__doc__
    wrapped.__name__ = fn.__name__
    return wrapped


@_float64
def length_map(activation: str, q, sigma_w, sigma_b):
    """One step of the length map: ``sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2``."""
    phi, _, _ = _derivatives(activation)
    return sigma_w**2 * _expect(lambda u: phi(u) ** 2, q, activation) + sigma_b**2


@_float64
def correlation_map(activation: str, c, q, sigma_w, sigma_b):
    """One step of the correlation map at length ``q`` (usually ``q*``):
    ``(sigma_w^2 E[phi(u_1) phi(u_2)] + sigma_b^2) / (sigma_w^2 E[phi(u)^2] + sigma_b^2)``."""
    phi, _, _ = _derivatives(activation)
    q12 = sigma_w**2 * _expect2(phi, phi, q, c, activation) + sigma_b**2
    q11 = sigma_w**2 * _expect(lambda u: phi(u) ** 2, q, activation) + sigma_b**2
    return q12 / q11


@partial(jax.jit, static_argnums=(0, 4))
def _lengths(activation: str, q1, sigma_w, sigma_b, depth: int):
    phi, _, _ = _derivatives(activation)

    def step(q, _):
        q_next = sigma_w**2 * _expect(lambda u: phi(u) ** 2, q, activation) + sigma_b**2
        return q_next, q

    return jax.lax.scan(
        step,
        jnp.broadcast_to(
            q1, jnp.broadcast_shapes(jnp.shape(q1), jnp.shape(sigma_w), jnp.shape(sigma_b))
        ),
        None,
        length=depth,
    )[1]


@_float64
def length_sequence(activation: str, q1, sigma_w, sigma_b, depth: int):
    """Pre-activation lengths ``q_1 .. q_depth`` of a network whose first layer has ``q_1``.

    Returns:
        ``(depth, *broadcast shape)``.
    """
    return _lengths(activation, q1, sigma_w, sigma_b, int(depth))


@partial(jax.jit, static_argnums=(0, 3))
def _q_star(activation, sigma_w, sigma_b, iterations):
    phi, _, _ = _derivatives(activation)
    q0 = jnp.ones(jnp.broadcast_shapes(jnp.shape(sigma_w), jnp.shape(sigma_b)))

    def step(q, _):
        return sigma_w**2 * _expect(lambda u: phi(u) ** 2, q, activation) + sigma_b**2, None

    return jax.lax.scan(step, q0, None, length=iterations)[0]


@partial(jax.jit, static_argnums=(0, 4))
def _c_star(activation, q, sigma_w, sigma_b, iterations):
    phi, _, _ = _derivatives(activation)
    q11 = sigma_w**2 * _expect(lambda u: phi(u) ** 2, q, activation) + sigma_b**2

    def step(c, _):
        return (sigma_w**2 * _expect2(phi, phi, q, c, activation) + sigma_b**2) / q11, None

    return jax.lax.scan(step, jnp.zeros_like(q), None, length=iterations)[0]


@_float64
def _fixed_length(activation: str, sigma_w, sigma_b, iterations: int = 2000):
    return _q_star(activation, sigma_w, sigma_b, iterations)


class MeanField(NamedTuple):
    """Mean-field quantities at the fixed point (arrays of the broadcast parameter shape).

    Fields:
        q_star: fixed point of the length map (pre-activation variance per unit).
        c_star: stable fixed point of the correlation map: 1 in the ordered phase and on
            the critical line (``chi_1 <= 1``), below 1 in the chaotic phase.
        chi_1: ``sigma_w^2 E[phi'(sqrt(q*) z)^2]``.
        xi_q: depth scale of the length map (layers).
        xi_c: depth scale of the correlation map (layers; infinite on the critical line).
    """

    q_star: np.ndarray
    c_star: np.ndarray
    chi_1: np.ndarray
    xi_q: np.ndarray
    xi_c: np.ndarray


@_float64
def mean_field(activation: str, sigma_w, sigma_b, *, iterations: int = 2000) -> MeanField:
    """Fixed points, ``chi_1`` and depth scales for ``phi = activation`` at
    ``(sigma_w, sigma_b)`` (broadcast together).

    ``q*`` comes from iterating the length map ``iterations`` times from ``q = 1``. The
    slope of the correlation map at ``c = 1`` is ``chi_1``, so for ``chi_1 <= 1`` the
    stable fixed point is ``c* = 1`` and ``xi_c = -1 / ln chi_1`` (infinite on the critical
    line); for ``chi_1 > 1`` ``c*`` comes from iterating the correlation map from 0.

    Convergence is geometric except where a fixed point is marginal (e.g. ``sigma_b = 0``
    with ``sigma_w^2 phi'(0)^2 = 1``, where ``q`` decays like ``1/l``, or ``chi_1`` just
    above 1): there the result is only as close to the fixed point as ``iterations`` layers
    of a network get.
    """
    _, d1, d2 = _derivatives(activation)
    phi = get_activation(activation)
    q = _q_star(activation, sigma_w, sigma_b, iterations)
    chi_1 = sigma_w**2 * _expect(lambda u: d1(u) ** 2, q, activation)
    ordered = chi_1 <= 1 + 1e-12
    c = jnp.where(ordered, 1.0, _c_star(activation, q, sigma_w, sigma_b, iterations))
    slope_q = chi_1 + sigma_w**2 * _expect(lambda u: d2(u) * phi(u), q, activation)
    slope_c = jnp.where(ordered, chi_1, sigma_w**2 * _expect2(d1, d1, q, c, activation))
    return MeanField(q, c, chi_1, _depth_scale(slope_q), _depth_scale(slope_c))


def _depth_scale(slope: jax.Array) -> jax.Array:
    """``-1 / ln|slope|``; infinite for a marginal map (slope 1 up to rounding)."""
    slope = jnp.abs(slope)
    return jnp.where(jnp.abs(slope - 1) < 1e-12, jnp.inf, -1 / jnp.log(slope))


@_float64
def chi(activation: str, q, sigma_w):
    """``sigma_w^2 E[phi'(sqrt(q) z)^2]``: the mean squared singular value of a layer's
    Jacobian ``D W`` when its pre-activations have variance ``q`` (``chi_1`` at ``q*``)."""
    _, d1, _ = _derivatives(activation)
    return sigma_w**2 * _expect(lambda u: d1(u) ** 2, q, activation)


@_float64
def derivative_moments(activation: str, q):
    """``(mu_1, mu_2) = (E[phi'(u)^2], E[phi'(u)^4])`` for ``u ~ N(0, q)``: the first two
    moments of the squared activation derivatives, ``D^2`` in a layer's Jacobian ``D W``."""
    _, d1, _ = _derivatives(activation)
    return _expect(lambda u: d1(u) ** 2, q, activation), _expect(
        lambda u: d1(u) ** 4, q, activation
    )


@_float64
def derivative_distribution(activation: str, q):
    """The law of ``phi'(u)^2`` for ``u ~ N(0, q)`` (scalar ``q``) as weighted atoms:
    ``(values, weights)`` with ``E[g(phi'(u)^2)] ~ sum_i weights_i g(values_i)`` for smooth
    ``g`` (the quadrature rule of this module; weights sum to 1 up to 1e-32)."""
    _, d1, _ = _derivatives(activation)
    s = jnp.sqrt(q)
    z, w = _pieces(_kinks(activation) / jnp.where(s > 0, s, 1.0))
    return d1(s * z) ** 2, w


def critical_sigma_w(
    activation: str, sigma_b, *, low: float = 0.05, high: float = 8.0, steps: int = 60
) -> np.ndarray:
    """The critical line: for each ``sigma_b``, the ``sigma_w`` with ``chi_1 = 1``, by
    bisection on ``[low, high]`` (``chi_1`` increases with ``sigma_w`` for the activations
    here). Returns NaN where ``chi_1 - 1`` does not change sign on the interval."""
    sb = np.asarray(sigma_b, np.float64)
    lo = np.full(sb.shape, low)
    hi = np.full(sb.shape, high)

    def excess(sigma_w):
        return chi(activation, _fixed_length(activation, sigma_w, sb), sigma_w) - 1

    f_lo, f_hi = excess(lo), excess(hi)
    bracketed = np.sign(f_lo) != np.sign(f_hi)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        f_mid = excess(mid)
        left = np.sign(f_mid) == np.sign(f_lo)
        lo, f_lo = np.where(left, mid, lo), np.where(left, f_mid, f_lo)
        hi = np.where(left, hi, mid)
    return np.where(bracketed, 0.5 * (lo + hi), np.nan)


def gsc_growth_rate(
    activation: str,
    sigma_w,
    sigma_b,
    norm: str = "none",
    *,
    batch_size: int | None = None,
    **kwargs,
):
    """Predicted growth of the GSC per dense layer, ``GSC(k, 0) ~ r^k``, for a plain MLP in
    the order linear -> norm -> activation at its fixed point (lengths stationary, so the
    GSC grows like the qm norm of the Jacobian):

    * ``norm="none"``: ``r = sqrt(chi_1)`` at ``q*``;
    * ``norm="layer"``: the pre-activations are normalized to variance 1 and the layer norm
      divides by the standard deviation of ``W x + b`` across units,
      ``sqrt(sigma_w^2 E[phi(z)^2] + sigma_b^2)``, so
      ``r^2 = sigma_w^2 E[phi'(z)^2] / (sigma_w^2 E[phi(z)^2] + sigma_b^2)``, ``z ~ N(0, 1)``;
    * ``norm="batch"`` with ``batch_size=B`` (an int >= :data:`MIN_BATCH_SIZE`):
      ``r = sqrt(lambda_G(B))``, the batch-norm gradient explosion rate of
      :func:`batchnorm_mean_field` (Yang et al., arXiv 1902.08129). Batch norm removes
      the scale of the weights and the biases, so ``sigma_w`` and ``sigma_b`` only set the
      shape of the result. The GSC grows like the gradient norm because batch norm fixes
      the length of every layer output.

    ``kwargs`` go to :func:`mean_field`. Returns an array of the broadcast shape of
    ``sigma_w`` and ``sigma_b``.
    """
    if norm != "batch" and batch_size is not None:
        raise ValueError(f"batch_size is for norm='batch' only, got norm={norm!r}")
    if norm == "none":
        return np.sqrt(mean_field(activation, sigma_w, sigma_b, **kwargs).chi_1)
    if norm == "layer":
        phi_sq = length_map(activation, 1.0, 1.0, 0.0)  # E[phi(z)^2]
        sw2 = np.asarray(sigma_w, np.float64) ** 2
        return np.sqrt(chi(activation, 1.0, sigma_w) / (sw2 * phi_sq + np.asarray(sigma_b) ** 2))
    if norm == "batch":
        if batch_size is None:
            raise ValueError(
                "norm='batch' needs batch_size=B: batch norm's explosion rate depends on the "
                "batch size"
            )
        shape = np.broadcast_shapes(np.shape(sigma_w), np.shape(sigma_b))
        rate = np.sqrt(batchnorm_mean_field(activation, batch_size).lambda_g)
        return np.broadcast_to(rate, shape).copy()
    raise ValueError(
        f"no mean-field GSC prediction for norm={norm!r}: use 'none', 'layer' or 'batch'"
    )


def gsc_profile(activation: str, sigma_w, sigma_b, depth: int, q1=None) -> np.ndarray:
    """Predicted ``GSC(k, 0)`` for ``k = 0 .. depth`` of a plain MLP without normalization
    (GSC-paper indexing, ``k = depth`` the input), including the transient before the fixed
    point: with ``q_1 .. q_L`` from the length map and ``P_i = E[phi(sqrt(q_i) z)^2]``
    (``P_0 = 1`` for inputs with ``||x||^2 = n``),
    ``GSC(k, 0)^2 = prod_{i > L-k} chi(q_i) * P_{L-k} / P_L``: the mean squared singular
    value of the Jacobian from layer ``k`` to the output times the squared length ratio.

    Args:
        sigma_w, sigma_b, q1: scalars; ``q1`` is the first layer's pre-activation variance,
            default ``sigma_w^2 + sigma_b^2``.
    """
    if any(np.ndim(a) for a in (sigma_w, sigma_b, q1)):
        raise ValueError("gsc_profile takes scalar sigma_w, sigma_b and q1")
    q1 = sigma_w**2 + sigma_b**2 if q1 is None else q1
    q = length_sequence(activation, q1, sigma_w, sigma_b, depth)  # q_1 .. q_L
    chis = chi(activation, q, sigma_w)
    P = np.concatenate([[1.0], (length_map(activation, q, 1.0, 0.0))])  # P_0 .. P_L
    L = int(depth)
    log_chi_from_top = np.concatenate([[0.0], np.cumsum(np.log(chis[::-1]))])  # k = 0 .. L
    k = np.arange(L + 1)
    return np.sqrt(np.exp(log_chi_from_top) * P[L - k] / P[L])


# -- batch normalization (Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz, 1902.08129) --

MIN_BATCH_SIZE = 4
"""Smallest batch with a finite mean-field explosion rate: the backward pass through batch
norm divides by the batch variance, ``E[1 / chi^2_{B-1}] = 1 / (B - 3)``."""


def _batch_size(batch_size) -> int:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < MIN_BATCH_SIZE
    ):
        raise ValueError(
            f"batch_size must be an int >= {MIN_BATCH_SIZE} (the batch-norm rate is infinite "
            f"below it), got {batch_size!r}"
        )
    return int(batch_size)


class BatchNormMeanField(NamedTuple):
    """Mean-field batch norm at its fixed point, for batches of ``B`` examples.

    In a wide network in the order linear -> batch norm -> activation, each unit's
    pre-activations over the batch are Gaussian; batch norm centres them and scales them
    to ``sum_b h_b^2 = B``, so at the fixed point (whose centred covariance is isotropic,
    the paper's BSB1 point) the normalized vector ``h`` is uniform on the sphere of radius
    ``sqrt(B)`` in the hyperplane ``sum_b h_b = 0``. All fields are expectations over it.

    Fields (NumPy float64 scalars):
        batch_size: ``B``.
        q_star: ``E[phi(h_a)^2]``, the diagonal of the fixed-point Gram ``Sigma*`` of the
            layer outputs (per unit, over the batch).
        c_star: ``E[phi(h_a) phi(h_b)] / q_star`` (``a != b``), its correlation.
        centred: ``q_star (1 - c_star)``, the eigenvalue of ``Sigma*`` on the vectors
            summing to zero (``G Sigma* G = centred * G``, ``G = I - 11^T / B``).
        lambda_g: the gradient explosion rate: per layer, the squared gradient norm
            (summed over the batch) grows by ``lambda_g``, so the GSC grows by
            ``sqrt(lambda_g)``.
        mu: the backward map sends the batch-mean direction ``11^T`` to ``mu * G``
            (the one-layer transient at the output, where the gradient is isotropic).
    """

    batch_size: int
    q_star: np.ndarray
    c_star: np.ndarray
    centred: np.ndarray
    lambda_g: np.ndarray
    mu: np.ndarray


def _legendre(lo, hi, breaks):
    """Gauss-Legendre nodes and weights of ``int_lo^hi`` split at ``breaks`` (``(..., K)``,
    clipped to the interval): shapes ``(..., (K+1) * NODES)``."""
    t, w = np.polynomial.legendre.leggauss(NODES)
    lo = jnp.broadcast_to(jnp.asarray(lo), breaks.shape[:-1])[..., None]
    hi = jnp.broadcast_to(jnp.asarray(hi), breaks.shape[:-1])[..., None]
    edges = jnp.sort(jnp.clip(breaks, lo, hi), axis=-1)
    a = jnp.concatenate([lo, edges], axis=-1)
    b = jnp.concatenate([edges, hi], axis=-1)
    half = (b - a)[..., None] / 2
    x = (a + b)[..., None] / 2 + half * t
    return x.reshape(*x.shape[:-2], -1), (half * w).reshape(*x.shape[:-2], -1)


def _sphere_pairs(activation: str, B: int):
    """Nodes and weights for ``E[f(h_a)]`` and ``E[f(h_a) g(h_b)]``, ``a != b``, with ``h``
    uniform on the sphere ``|h|^2 = B`` in the hyperplane ``sum h = 0``.

    ``h_a = sqrt(B-1) y_1`` and ``h_b = sqrt(B-1) (rho y_1 + sqrt(1 - rho^2) y_2)`` with
    ``rho = -1/(B-1)`` and ``(y_1, y_2)`` two coordinates of a uniform point of the unit
    sphere in ``R^(B-1)``; with ``y_1 = sin(theta)``, ``y_2 = cos(theta) sin(psi)`` the
    density is ``cos(theta)^(B-3) cos(psi)^(B-4)`` on ``[-pi/2, pi/2]^2``: analytic, so
    Gauss-Legendre split where ``h_a`` or ``h_b`` crosses a kink converges exponentially.
    """
    R = jnp.sqrt(B - 1.0)
    rho = -1.0 / (B - 1.0)
    points = jnp.asarray(KINKS.get(activation, ()) + U_BREAKS + Z_BREAKS, jnp.float64)
    top = jnp.arcsin(jnp.minimum(1.0, TAIL / R))  # beyond |h| = TAIL the mass is below 1e-30
    # the inner integral has a kink in theta where the line h_b = kink touches the
    # circle's edge: rho sin(theta) +- sqrt(1 - rho^2) cos(theta) = sin(theta +- beta)
    beta = jnp.arccos(rho)
    kinks = jnp.arcsin(jnp.clip(jnp.asarray(KINKS.get(activation, ()), jnp.float64) / R, -1, 1))
    edges = jnp.concatenate(
        [kinks - beta, kinks + beta, np.pi - kinks - beta, np.pi - kinks + beta]
    )
    edges = jnp.mod(edges + np.pi, 2 * np.pi) - np.pi
    outer = jnp.concatenate([jnp.arcsin(jnp.clip(points / R, -1, 1)), edges])
    theta, w1 = _legendre(-top, top, outer)
    w1 = w1 * jnp.cos(theta) ** (B - 3)
    w1 = w1 / jnp.sum(w1)
    inner = (points / R - rho * jnp.sin(theta)[:, None]) / (
        jnp.sqrt(1 - rho**2) * jnp.cos(theta)[:, None]
    )
    psi, w2 = _legendre(-top, top, jnp.arcsin(jnp.clip(inner, -1, 1)))
    w2 = w2 * jnp.cos(psi) ** (B - 4)
    w2 = w2 / jnp.sum(w2, axis=-1, keepdims=True)
    h_a = R * jnp.sin(theta)
    h_b = R * (
        rho * jnp.sin(theta)[:, None]
        + jnp.sqrt(1 - rho**2) * jnp.cos(theta)[:, None] * jnp.sin(psi)
    )
    return h_a, w1, h_b, w1[:, None] * w2


def _batchnorm_moments(activation: str, B: int) -> dict:
    with jax.enable_x64(True):
        out = _moments(activation, jnp.asarray(B, jnp.float64))
        return {k: np.asarray(v, np.float64) for k, v in out.items()}


@partial(jax.jit, static_argnums=0)
def _moments(activation: str, B: jax.Array):
    phi, d1, _ = _derivatives(activation)
    h_a, w1, h_b, w2 = _sphere_pairs(activation, B)

    def m1(f):
        return jnp.sum(w1 * f(h_a))

    def m2(f):
        return jnp.sum(w2 * f(h_a)[:, None] * f(h_b))

    def dh(h):
        return d1(h) * h

    return {
        "phi_sq": m1(lambda h: phi(h) ** 2),
        "phi_pair": m2(phi),
        "d_sq": m1(lambda h: d1(h) ** 2),
        "d_pair": m2(d1),
        "dh_sq": m1(lambda h: dh(h) ** 2),
        "dh_pair": m2(dh),
    }


def batchnorm_mean_field(activation: str, batch_size: int) -> BatchNormMeanField:
    """Fixed point and gradient explosion rate of wide batch-normalized MLPs (order linear
    -> batch norm -> activation, batch statistics, no affine part) for batches of
    ``batch_size`` examples (Yang, Pennington, Rao, Sohl-Dickstein & Schoenholz, "A Mean
    Field Theory of Batch Normalization", arXiv 1902.08129). See
    :class:`BatchNormMeanField` for the fields.

    Derivation (the paper's full text could not be read here; its abstract and secondary
    sources give the setting and the ReLU limit ``pi / (pi - 1)``; what follows was
    derived for this library under the paper's assumptions: infinite width, the gradient
    independence assumption): with ``u = h / sqrt(B)``, ``P_u = G - u u^T`` and
    ``D = diag(phi'(h))``, a layer maps the gradient's batch Gram ``Pi`` to
    ``T(Pi) = B / ((B - 3) centred) E[P_u D Pi D P_u]`` (the ``1 / (B - 3)`` is
    ``E[B / |G h_raw|^2]`` for the raw pre-activations). ``T(G) = lambda_g G`` by symmetry,
    and ``G`` is the top eigenvector (checked by Monte Carlo of the whole map in the tests).
    In terms of ``m1(f) = E[f(h_a)]`` and ``m2(f, g) = E[f(h_a) g(h_b)]``, ``a != b``,
    ``C(f) = m1(f^2) - m2(f, f)``::

        lambda_g = ((B-1) m1(phi'^2) + m2(phi', phi') - C(phi'(h) h)) / ((B-3) C(phi))

    The two-coordinate marginals are integrated by quadrature in float64 (see
    ``_sphere_pairs``): about 1e-12 relative error, checked against
    :func:`relu_batchnorm_lambda_g`. ``lambda_g`` decreases with ``B`` towards its
    ``B -> infinity`` limit (``pi / (pi - 1)`` for ReLU). It does not depend on the
    weight or bias variance. For ``B < 6`` a single unit's factor ``B / |G h|^2`` has
    infinite variance, and finite-width networks grow markedly slower than this.
    """
    B = _batch_size(batch_size)
    get_activation(activation)
    m = _batchnorm_moments(activation, B)
    centred = m["phi_sq"] - m["phi_pair"]
    if not centred > 1e-12 * max(float(m["phi_sq"]), 1e-300):
        raise ValueError(
            f"activation {activation!r} has no batch-norm fixed point with spread "
            "(its outputs are constant over the batch)"
        )
    C_dh = m["dh_sq"] - m["dh_pair"]
    lam = ((B - 1) * m["d_sq"] + m["d_pair"] - C_dh) / ((B - 3) * centred)
    trace_ones = ((B - 1) * (m["d_sq"] - m["d_pair"]) - m["dh_sq"] - (B - 1) * m["dh_pair"]) * (
        B / ((B - 3) * centred)
    )
    return BatchNormMeanField(
        B,
        m["phi_sq"],
        m["phi_pair"] / m["phi_sq"],
        centred,
        lam,
        trace_ones / (B - 1),
    )


def _relu_pair(rho):
    """``E[relu(x) relu(y)]`` for unit-variance Gaussians of correlation ``rho``."""
    return (np.sqrt(1 - rho**2) + (np.pi - np.arccos(rho)) * rho) / (2 * np.pi)


def relu_batchnorm_lambda_g(batch_size) -> np.ndarray:
    """Closed form of :func:`batchnorm_mean_field`'s ``lambda_g`` for ReLU.

    For ReLU every expectation over the sphere reduces to Gaussian ones: ``phi'(h) h =
    phi(h)`` is homogeneous of degree 2, so ``m2`` is the arc-cosine kernel at
    ``rho = -1/(B-1)``, and ``m2(phi', phi')`` is the orthant probability
    ``1/4 - asin(1/(B-1)) / (2 pi)``. With ``k = (sqrt(1 - rho^2) + (pi - acos rho) rho) /
    (2 pi)``::

        lambda_g = ((B-1)/2 + 1/4 - asin(1/(B-1))/(2 pi) - (1/2 - k)) / ((B-3) (1/2 - k))

    which tends to ``pi / (pi - 1) = 1.467`` as ``B -> infinity`` (the GSC rate
    ``sqrt(pi / (pi - 1)) = 1.211``). Broadcasts over ``batch_size`` (ints >= 4).
    """
    B = np.asarray(batch_size)
    for b in np.ravel(B):
        _batch_size(b.item() if hasattr(b, "item") else b)
    B = B.astype(np.float64)
    k = _relu_pair(-1 / (B - 1))
    both_on = 0.25 - np.arcsin(1 / (B - 1)) / (2 * np.pi)
    return ((B - 1) / 2 + both_on - (0.5 - k)) / ((B - 3) * (0.5 - k))


def _input_stats(input_gram, B: int) -> tuple[float, float]:
    """``(centred, mean square)`` of the inputs' batch Gram ``x x^T / in_dim``: its mean
    eigenvalue on the zero-sum vectors and its mean diagonal (identity: ``(1, 1)``)."""
    if input_gram is None:
        return 1.0, 1.0
    S = np.asarray(input_gram, np.float64)
    if S.shape != (B, B):
        raise ValueError(f"input_gram must have shape ({B}, {B}) (batch_size), got {S.shape}")
    G = np.eye(B) - 1.0 / B
    centred = float(np.trace(G @ S @ G) / (B - 1))
    if not np.isfinite(S).all() or centred <= 0:
        raise ValueError(
            "input_gram has no spread across the batch (its centred variance is "
            f"{centred}): batch norm divides by it; give a batch of distinct inputs"
        )
    return centred, float(np.trace(S) / B)


def batchnorm_gsc_profile(
    activation: str, depth: int, batch_size: int, *, input_gram=None
) -> np.ndarray:
    """Predicted ``GSC(k, 0)``, ``k = 0 .. depth``, of a plain batch-normalized MLP (order
    linear -> batch norm -> activation, GSC-paper indexing: ``k = depth`` is the input),
    from :func:`batchnorm_mean_field`, with both ends' transients:

    * at the output the gradient is isotropic, ``Pi_0 = I = G + 11^T / B``: the first step
      gives ``(lambda_g + mu / B) G`` and every later one a factor ``lambda_g``;
    * the first layer sees the inputs, whose centred variance ``s_x`` differs from the
      fixed point's ``centred``: its factor is ``lambda_g * centred / s_x``, and
      ``||f_depth|| / ||f_0||`` is the input's length over the fixed point's.

    So ``GSC(k, 0)^2 = (B-1)/B (lambda_g + mu/B) lambda_g^(k-1)`` for ``1 <= k < depth``.

    Args:
        input_gram: the inputs' batch Gram ``x x^T / in_dim``, ``(B, B)``; default the
            identity (independent unit-variance inputs). Its centred part is taken as
            isotropic (true for wide inputs).
    """
    B = _batch_size(batch_size)
    L = int(depth)
    if L < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    mf = batchnorm_mean_field(activation, B)
    s_x, mean_sq_x = _input_stats(input_gram, B)
    # s of each layer's input, from the output (k = 1) to the first layer (k = L)
    s_in = np.full(L, float(mf.centred))
    s_in[-1] = s_x
    steps = mf.lambda_g * mf.centred / s_in
    steps[0] = (mf.lambda_g + mf.mu / B) * mf.centred / s_in[0]
    pi = np.concatenate([[1.0], (B - 1) / B * np.cumprod(steps)])  # mean square gradient
    mean_sq = np.full(L + 1, float(mf.q_star))
    mean_sq[-1] = mean_sq_x
    return np.sqrt(pi * mean_sq / mean_sq[0])


# -- residual networks (Yang & Schoenholz, arXiv 1712.08969; the Pythagorean equation) --


def residual_gsc_profile(
    activation: str,
    sigma_w,
    sigma_b,
    num_blocks: int,
    *,
    norm: str = "none",
    block_layers: int = 2,
    residual_scale: float = 1.0,
    batch_size: int | None = None,
    input_gram=None,
) -> np.ndarray:
    """Predicted ``GSC(k, 0)`` of a residual MLP (:func:`~jacobian_lab.resmlp` with
    ``block_order="pre"``: a linear stem, then ``num_blocks`` blocks ``f + alpha r(f)``
    whose branch is ``block_layers`` dense layers in the order norm -> activation ->
    linear). GSC-paper indexing: ``k = 0`` the output, ``k = num_blocks`` the stem's output,
    ``k = num_blocks + 1`` the input; shape ``(num_blocks + 2,)``.

    Mean field of residual networks (Yang & Schoenholz, arXiv 1712.08969, whose full text
    could not be read here; the recursions below are derived for this library under the
    same assumptions: infinite width, gradient independence). The branch is independent
    of the stream, so lengths and squared gradients add with no cross term (the
    Pythagorean equation of Philipp et al., arXiv 1712.05577): per block, the stream's
    per-unit variance ``q <- q + alpha^2 v_out`` and the mean squared gradient
    ``pi <- pi (1 + alpha^2 prod_j chi_j)``, with for the branch's layer ``j`` (input
    variance ``v_j``):

    * ``norm="none"``: ``chi_j = sigma_w^2 E[phi'(sqrt(v_j) z)^2]``,
      ``v_{j+1} = sigma_w^2 E[phi(sqrt(v_j) z)^2] + sigma_b^2``;
    * ``"layer"``: ``chi_j = sigma_w^2 E[phi'(z)^2] / v_j``, ``v_{j+1} = sigma_w^2
      E[phi(z)^2] + sigma_b^2``;
    * ``"batch"`` (``batch_size`` required): the batch Gram's centred variance ``s`` and
      mean square take the place of ``v``, ``chi_j = sigma_w^2 lambda_g centred / s_j`` on
      the zero-sum part of the gradient (:func:`batchnorm_mean_field`); the batch-mean
      part passes the skips unchanged and enters a branch through ``mu``.

    ``GSC(k, 0)^2 = pi_k q_k / q_0``. The stem is linear: ``q = sigma_w^2 q_x + sigma_b^2``
    and ``pi`` times ``sigma_w^2``. ``input_gram`` is the inputs' ``x x^T / in_dim``
    (``(B, B)`` with batch norm, else any ``(S, S)``: only its mean diagonal is used);
    default the identity.
    """
    get_activation(activation)
    nb = int(num_blocks)
    if nb < 1 or int(block_layers) < 1:
        raise ValueError(
            f"num_blocks and block_layers must be positive, got {num_blocks!r}, {block_layers!r}"
        )
    if any(np.ndim(a) for a in (sigma_w, sigma_b, residual_scale)):
        raise ValueError("residual_gsc_profile takes scalar sigma_w, sigma_b and residual_scale")
    sw2, sb2, a2 = float(sigma_w) ** 2, float(sigma_b) ** 2, float(residual_scale) ** 2
    if norm not in ("none", "layer", "batch"):
        raise ValueError(f"norm must be 'none', 'layer' or 'batch', got {norm!r}")
    if norm != "batch" and batch_size is not None:
        raise ValueError(f"batch_size is for norm='batch' only, got norm={norm!r}")
    if norm == "batch":
        if batch_size is None:
            raise ValueError("norm='batch' needs batch_size=B")
        B = _batch_size(batch_size)
        mf = batchnorm_mean_field(activation, B)
        s_x, q_x = _input_stats(input_gram, B)
    else:
        q_x = 1.0 if input_gram is None else float(np.mean(np.diag(np.asarray(input_gram))))
    # Forward from the stem: the stream's state at each block input (a Python loop over
    # blocks of scalar recursions; num_blocks calls of cheap jitted quadratures).
    q = sw2 * q_x + sb2
    s = sw2 * s_x if norm == "batch" else None
    gains, q_stream = [], [q]  # per block (input to output): gradient gain
    e_phi, e_dphi = length_map(activation, 1.0, 1.0, 0.0), chi(activation, 1.0, 1.0)
    for _ in range(nb):
        if norm == "batch":
            s_j, chis = s, []
            for _ in range(int(block_layers)):
                chis.append(sw2 * mf.lambda_g * mf.centred / s_j)
                s_j = sw2 * mf.centred
            # the batch-mean gradient enters the branch through its top layer (mu)
            top_mean = sw2 * mf.mu * mf.centred / (sw2 * mf.centred if block_layers > 1 else s)
            gains.append((a2 * np.prod(chis), a2 * np.prod(chis[:-1]) * top_mean))
            s = s + a2 * sw2 * mf.centred
            q = q + a2 * (sw2 * mf.q_star + sb2)
        else:
            v, prod = q, 1.0
            for _ in range(int(block_layers)):
                if norm == "none":
                    prod *= float(chi(activation, v, sigma_w))
                    v = sw2 * float(length_map(activation, v, 1.0, 0.0)) + sb2
                else:
                    prod *= sw2 * float(e_dphi) / v
                    v = sw2 * float(e_phi) + sb2
            gains.append((a2 * prod, 0.0))
            q = q + a2 * v
        q_stream.append(q)
    # Backward from the output: zero-sum part a and batch-mean part c of the gradient Gram
    # (per-example norms: c = 0 and a is the mean square gradient).
    a, c = 1.0, 1.0 if norm == "batch" else 0.0
    B_ = B if norm == "batch" else None
    pis = [1.0]
    for g_a, g_c in reversed(gains):
        a = a * (1 + g_a) + c * g_c / (B_ or 1)
        pis.append((a * (B_ - 1) + c) / B_ if norm == "batch" else a)
    pis.append(sw2 * pis[-1])  # the linear stem
    mean_sq = list(reversed(q_stream)) + [q_x]  # k = 0 .. num_blocks, then the input
    pis, mean_sq = np.asarray(pis), np.asarray(mean_sq)
    return np.sqrt(pis * mean_sq / mean_sq[0])
