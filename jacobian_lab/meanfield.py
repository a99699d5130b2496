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


def gsc_growth_rate(activation: str, sigma_w, sigma_b, norm: str = "none", **kwargs):
    """Predicted growth of the GSC per dense layer, ``GSC(k, 0) ~ r^k``, for a plain MLP in
    the order linear -> norm -> activation at its fixed point (lengths stationary, so the
    GSC grows like the qm norm of the Jacobian):

    * ``norm="none"``: ``r = sqrt(chi_1)`` at ``q*``;
    * ``norm="layer"``: the pre-activations are normalized to variance 1 and the layer norm
      divides by the standard deviation of ``W x + b`` across units,
      ``sqrt(sigma_w^2 E[phi(z)^2] + sigma_b^2)``, so
      ``r^2 = sigma_w^2 E[phi'(z)^2] / (sigma_w^2 E[phi(z)^2] + sigma_b^2)``, ``z ~ N(0, 1)``.

    Batch norm couples the examples of a batch; its explosion rate depends on the batch
    size (Yang et al., arXiv 1902.08129) and is not predicted here (``ValueError``).
    ``kwargs`` go to :func:`mean_field`.
    """
    if norm == "none":
        return np.sqrt(mean_field(activation, sigma_w, sigma_b, **kwargs).chi_1)
    if norm == "layer":
        phi_sq = length_map(activation, 1.0, 1.0, 0.0)  # E[phi(z)^2]
        sw2 = np.asarray(sigma_w, np.float64) ** 2
        return np.sqrt(chi(activation, 1.0, sigma_w) / (sw2 * phi_sq + np.asarray(sigma_b) ** 2))
    raise ValueError(
        f"no mean-field GSC prediction for norm={norm!r}: use 'none' or 'layer' (batch "
        "norm's rate depends on the batch size)"
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
