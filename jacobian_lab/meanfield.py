"""Mean-field signal propagation in wide random fully connected networks.

For weights ``N(0, sigma_w^2 / n)`` and biases ``N(0, sigma_b^2)`` (Poole et al.,
arXiv 1606.05340; Schoenholz et al., arXiv 1611.01232), the pre-activations of a layer are
Gaussian in the wide limit, with

* the **length map** ``q_l = V(q_{l-1}) = sigma_w^2 E_z[phi(sqrt(q_{l-1}) z)^2] + sigma_b^2``
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

**Outside a finite nonzero fixed point.** The length map need not have one: with
``sigma_b = 0`` and ``phi(0) = 0`` lengths may shrink to ``q* = 0`` (tanh with
``sigma_w < 1``, ReLU with ``sigma_w < sqrt(2)``), and for an unbounded activation they
may grow without bound, ``q* = inf`` (ReLU with ``sigma_w > sqrt(2)``, or ``sigma_w =
sqrt(2)`` and ``sigma_b > 0``; SELU, GELU and swish at large ``sigma_w``). ``q*`` is then
reported as 0 or ``inf``, and every other quantity is its limit there, derived as
follows. Near ``q = 0`` an activation acts as its one-sided linearization ``phi_0(u) = a u``
(``u > 0``), ``b u`` (``u < 0``) with ``a, b = phi'(0+), phi'(0-)``; near ``q = inf`` as its
homogeneous asymptote ``phi_inf(u) = lim_s phi(s u) / s``, of the same form with
``a, b = phi'(+inf), phi'(-inf)`` (ReLU and GELU: 1, 0; SELU: lambda, 0). For such a
positively homogeneous ``phi``:

* ``E[phi'(sqrt(q) z)^2] = E[phi(z)^2] = (a^2 + b^2) / 2`` for every ``q``, so
  ``chi_1 = sigma_w^2 (a^2 + b^2) / 2``, and the lengths change by the same factor per
  layer, ``rho = q_{l+1} / q_l = chi_1`` (field ``q_ratio``; 1 at a finite fixed point);
* ``xi_q`` is the e-folding depth of the approach to ``q*`` in the coordinate where it is
  finite (``q`` for ``q* = 0``, ``1 / q`` for ``q* = inf``): ``1 / |ln rho|``, infinite
  for ``rho = 1`` (lengths growing linearly, e.g. ReLU at ``sigma_w = sqrt(2)``,
  ``sigma_b > 0``);
* the correlation map loses ``sigma_b`` (negligible against ``q -> inf``; zero when
  ``q* = 0``) and ``sigma_w`` (a common factor) and becomes the kernel of ``phi``: writing
  ``phi(u) = p u + m |u|`` with ``p = (a + b) / 2``, ``m = (a - b) / 2``,
  ``K(c) = (p^2 c + m^2 (2/pi) (sqrt(1 - c^2) + c asin c)) / (p^2 + m^2)`` (Cho & Saul's
  arc-cosine kernel for ReLU). ``K'(1) = 1``, so correlations approach ``c* = 1``
  polynomially, not exponentially: ``xi_c = inf``; and ``K(c) >= c`` with equality only at
  ``c = 1`` when ``m != 0``. When ``m = 0`` (``phi`` linear there: a linear network, or tanh
  shrinking to ``q* = 0``) ``K`` is the identity and every correlation is kept: ``c*`` is
  then NaN (undefined), the only NaN these functions return for valid arguments;
* so the GSC, which divides by the lengths, grows by ``sqrt(chi_1 / rho) = 1`` per layer
  (:func:`gsc_growth_rate`): a positively homogeneous network's GSC is scale free.

Arguments are checked (:func:`check_arguments`): a NaN, infinite or negative ``sigma_w``
or ``sigma_b``, a NaN or negative length, a correlation outside ``[-1, 1]`` raise
``ValueError`` naming the argument.

Gaussian expectations use Gauss-Legendre quadrature against the Gaussian density on
``[-12, 12]``, split at the activation's kinks (:data:`KINKS`, e.g. 0 for ReLU; in two
dimensions, also along the oblique line where the second variable crosses a kink), so every
piece is smooth and converges exponentially: about 1e-13 in float64 for every activation
here. They are computed in float64 whatever the global JAX precision. Functions broadcast
over their numeric arguments and return NumPy float64 arrays.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jacobian_lab.activations import get_activation

KINKS = {"relu": (0.0,), "selu": (0.0,), "hard_tanh": (-1.0, 1.0)}
"""Points where an activation (or its derivative) is not smooth; integrals are split there."""

HOMOGENEOUS = ("linear", "relu")
"""Activations that are positively homogeneous of degree 1, ``phi(s u) = s phi(u)`` for
``s > 0``: their length map is linear, ``V(q) = sigma_w^2 E[phi(z)^2] q + sigma_b^2``, so
``q*`` has a closed form (:func:`fixed_length`)."""

TAIL = 12.0
"""Integrals over z ~ N(0, 1) are taken on [-TAIL, TAIL] (the rest has mass < 1e-32)."""

NODES = 24
"""Gauss-Legendre nodes per piece of an integral."""

Z_BREAKS = (-5.0, -2.0, 0.0, 2.0, 5.0)
"""Fixed splits in z, where the Gaussian weight changes."""

U_BREAKS = (-6.0, -2.0, -0.5, 0.5, 2.0, 6.0)
"""Splits in the activation's argument u = sqrt(q) z, where activations change; they
resolve narrow features when q is large."""

EDGE = 1e300
"""The limits ``q -> 0`` and ``q -> inf`` are read off the activation at ``|u| = 1 / EDGE``
and ``|u| = EDGE``, where every activation here equals its one-sided limit (value and
derivatives) to rounding."""

MARGINAL = 1e-12
"""A map whose slope is within this of 1 is marginal (its depth scale is infinite)."""

SEARCH_STEP = 0.5
SEARCH_STEPS = 1400
""":func:`fixed_length` scans ``ln q`` from 0 in steps of ``SEARCH_STEP`` for at most
``SEARCH_STEPS`` steps (``q`` from ``e^-700`` to ``e^700``), then bisects."""


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


def _interior(q: jax.Array) -> jax.Array:
    """Where ``0 < q < inf``: the quadrature applies; elsewhere a limit is taken."""
    return (q > 0) & (q < jnp.inf)


def _edge_point(q: jax.Array) -> jax.Array:
    """The ``|u|`` at which the limit ``q -> 0`` (``1 / EDGE``) or ``q -> inf`` (``EDGE``)
    is read off an activation."""
    return jnp.where(q == 0, 1 / EDGE, EDGE)


def _expect(f, q: jax.Array, activation: str) -> jax.Array:
    """``E_z[f(sqrt(q) z)]`` broadcast over ``q``; ``f`` is smooth away from the kinks of
    ``activation``. At ``q = 0`` and ``q = inf`` the limit: each half of the Gaussian sends
    ``sqrt(q) z`` to one side, so the limit is ``(f(0+) + f(0-)) / 2`` or
    ``(f(+inf) + f(-inf)) / 2`` (``inf`` for an unbounded ``f``)."""
    q = jnp.asarray(q)
    inside = _interior(q)
    s = jnp.sqrt(jnp.where(inside, q, 1.0))[..., None]
    z, w = _pieces(_kinks(activation) / s)
    u = _edge_point(q)
    return jnp.where(inside, jnp.sum(w * f(s * z), axis=-1), 0.5 * (f(u) + f(-u)))


def _expect2(f, g, q: jax.Array, c: jax.Array, activation: str) -> jax.Array:
    """``E[f(u_1) g(u_2)]`` for Gaussians of variance ``q`` and correlation ``c``
    (broadcast together): ``u_1 = sqrt(q) z_1``, ``u_2 = sqrt(q) (c z_1 + sqrt(1-c^2) z_2)``;
    both integrals are split at the points where ``u_1`` or ``u_2`` crosses a kink. At
    ``q = 0`` and ``q = inf`` the limit through the orthant probabilities,
    ``P(u_1 > 0, u_2 > 0) = 1/4 + asin(c) / (2 pi)`` (for ``f``, ``g`` with one-sided limits
    there)."""
    q, c = jnp.broadcast_arrays(jnp.asarray(q), jnp.asarray(c))
    inside = _interior(q)
    kinks = _kinks(activation)
    s = jnp.sqrt(jnp.where(inside, q, 1.0))[..., None]
    z1, w1 = _pieces(kinks / s)  # (..., n1)
    cc = c[..., None]
    r = jnp.sqrt(jnp.clip(1 - cc**2, 0.0))
    safe_r = jnp.where(r > 0, r, 1.0)[..., None]
    # inner kinks: sqrt(q) (c z1 + r z2) = k  ->  z2 = (k / sqrt(q) - c z1) / r
    inner = (kinks / s[..., None] - (cc * z1)[..., None]) / safe_r
    z2, w2 = _pieces(inner)  # (..., n1, n2)
    u1 = (s * z1)[..., None]
    u2 = s[..., None] * ((cc * z1)[..., None] + r[..., None] * z2)
    interior = jnp.sum(w1[..., None] * w2 * f(u1) * g(u2), axis=(-2, -1))
    u = _edge_point(q)
    same = 0.25 + jnp.arcsin(jnp.clip(c, -1, 1)) / (2 * np.pi)
    edge = same * (f(u) * g(u) + f(-u) * g(-u)) + (0.5 - same) * (f(u) * g(-u) + f(-u) * g(u))
    return jnp.where(inside, interior, edge)


def _check_values(name: str, value, *, low: float | None, high: float | None, finite: bool):
    if value is None or isinstance(value, jax.core.Tracer):  # values unknown under tracing
        return
    try:
        a = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or an array of numbers, got {value!r}") from None
    bad = np.isnan(a) | (~np.isfinite(a) if finite else False)
    if low is not None:
        bad |= a < low
    if high is not None:
        bad |= a > high
    if not np.any(bad):
        return
    want = {
        "sigma_w": "finite and >= 0 (the weights' standard deviation times sqrt(fan_in))",
        "sigma_b": "finite and >= 0 (the biases' standard deviation)",
        "q": ">= 0 (a pre-activation variance; inf for the limit of large lengths)",
        "q1": ">= 0 (the first layer's pre-activation variance)",
        "c": "in [-1, 1] (a correlation)",
        "residual_scale": "finite",
    }[name]
    first = a.ravel()[np.argmax(np.ravel(bad))] if a.ndim else float(a)
    where = f" (entry {int(np.argmax(np.ravel(bad)))} of {a.size})" if a.ndim else ""
    raise ValueError(f"{name} must be {want}, got {first!r}{where}")


def check_arguments(**named) -> None:
    """Raise ``ValueError`` naming the first argument out of range: ``sigma_w``,
    ``sigma_b`` finite and ``>= 0`` (and ``sigma_w^2`` a float64 number), lengths ``q``,
    ``q1`` not NaN and ``>= 0`` (``inf`` allowed: the limit), a correlation ``c`` in
    ``[-1, 1]``, ``residual_scale`` finite. Arguments given as ``None`` and traced values
    are skipped."""
    rules = {
        "sigma_w": (0.0, 1e150, True),  # sigma_w^2 must stay a float64 number
        "sigma_b": (0.0, 1e150, True),
        "q": (0.0, None, False),
        "q1": (0.0, None, False),
        "c": (-1.0, 1.0, True),
        "residual_scale": (None, None, True),
    }
    for name, value in named.items():
        low, high, finite = rules[name]
        _check_values(name, value, low=low, high=high, finite=finite)


_CHECKED = ("sigma_w", "sigma_b", "q", "q1", "c", "residual_scale")


def _float64(fn):
    """Check the arguments (:func:`check_arguments`), run ``fn`` in 64-bit JAX and hand back
    NumPy arrays."""
    signature = inspect.signature(fn)

    def wrapped(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        check_arguments(**{k: v for k, v in bound.arguments.items() if k in _CHECKED})
        with jax.enable_x64(True):
            args = [jnp.asarray(a, jnp.float64) if not isinstance(a, str) else a for a in args]
            out = fn(*args, **kwargs)
            return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), out)

    wrapped.__doc__ = fn.__doc__
    wrapped.__name__ = fn.__name__
    wrapped.__signature__ = signature
    return wrapped


def _slopes(activation: str, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(a, b) = (phi'(0+), phi'(0-))`` where ``q = 0``, ``(phi'(+inf), phi'(-inf))``
    where ``q = inf`` (elsewhere the latter): the slopes of the positively homogeneous
    activation that ``phi`` acts as in that limit (module docstring)."""
    _, d1, _ = _derivatives(activation)
    u = _edge_point(jnp.asarray(q))
    return d1(u), d1(-u)


def _kernel(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """The correlation map of the positively homogeneous ``phi(u) = a u`` (``u > 0``),
    ``b u`` (``u < 0``) without bias: ``E[phi(z_1) phi(z_2)] / E[phi(z)^2]`` at correlation
    ``c``. With ``phi(u) = p u + m |u|``, ``E[z_1 |z_2|] = 0`` and ``E|z_1 z_2| = (2 / pi)
    (sqrt(1 - c^2) + c asin c)``."""
    p, m = (a + b) / 2, (a - b) / 2
    c = jnp.clip(c, -1, 1)
    abs_pair = 2 / np.pi * (jnp.sqrt(jnp.clip(1 - c**2, 0.0)) + c * jnp.arcsin(c))
    total = p**2 + m**2
    return jnp.where(total > 0, (p**2 * c + m**2 * abs_pair) / jnp.where(total > 0, total, 1), c)


@_float64
def length_map(activation: str, q, sigma_w, sigma_b):
    """One step of the length map: ``sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2`` (its
    limit at ``q = 0`` or ``inf``)."""
    phi, _, _ = _derivatives(activation)
    return sigma_w**2 * _expect(lambda u: phi(u) ** 2, q, activation) + sigma_b**2


@_float64
def correlation_map(activation: str, c, q, sigma_w, sigma_b):
    """One step of the correlation map at length ``q`` (usually ``q*``):
    ``(sigma_w^2 E[phi(u_1) phi(u_2)] + sigma_b^2) / (sigma_w^2 E[phi(u)^2] + sigma_b^2)``.
    At ``q = 0`` or ``inf``, where that ratio is ``0/0`` or ``inf/inf``, its limit: the
    kernel of the activation's homogeneous limit (module docstring)."""
    return _correlation_map(activation, c, q, sigma_w, sigma_b)


def _correlation_map(activation: str, c, q, sigma_w, sigma_b):
    phi, _, _ = _derivatives(activation)
    q12 = sigma_w**2 * _expect2(phi, phi, q, c, activation) + sigma_b**2
    q11 = sigma_w**2 * _expect(lambda u: phi(u) ** 2, q, activation) + sigma_b**2
    ratio = q12 / jnp.where((q11 > 0) & (q11 < jnp.inf), q11, 1.0)
    a, b = _slopes(activation, q)
    degenerate = ~((q11 > 0) & (q11 < jnp.inf))
    return jnp.where(degenerate, _kernel(a, b, c), ratio)


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
    """Pre-activation lengths ``q_1 .. q_depth`` of a network whose first layer has ``q_1``
    (``inf`` once they pass float64's range).

    Returns:
        ``(depth, *broadcast shape)``.
    """
    return _lengths(activation, q1, sigma_w, sigma_b, int(depth))


@partial(jax.jit, static_argnums=0)
def _search_fixed_length(activation, sigma_w, sigma_b):
    """``q*`` reached from ``q = 1`` by a scan of ``h(t) = ln V(e^t) - t`` (``V`` the
    length map) from ``t = 0`` in the direction of ``sign h(0)``, the direction in which
    iterating ``V`` moves ``q`` (``V`` increases with ``q``), to the first sign change,
    then bisection; no sign change: ``inf`` (lengths grow) or 0 (they shrink)."""
    phi, _, _ = _derivatives(activation)
    shape = jnp.broadcast_shapes(jnp.shape(sigma_w), jnp.shape(sigma_b))
    sw, sb = jnp.broadcast_to(sigma_w, shape), jnp.broadcast_to(sigma_b, shape)

    def h(t):
        V = sw**2 * _expect(lambda u: phi(u) ** 2, jnp.exp(t), activation) + sb**2
        return jnp.log(V) - t

    h0 = h(jnp.zeros(shape))
    up = h0 > 0
    step = jnp.where(up, SEARCH_STEP, -SEARCH_STEP)

    def crossed(value):
        return jnp.where(up, value <= 0, value >= 0)

    def scan_cond(state):
        j, _, _, found = state
        return (j < SEARCH_STEPS) & ~jnp.all(found)

    def scan_body(state):
        j, lo, hi, found = state
        t_next = (j + 1) * step
        new = crossed(h(t_next)) & ~found
        lo = jnp.where(new, j * step, lo)
        hi = jnp.where(new, t_next, hi)
        return j + 1, lo, hi, found | new

    zeros = jnp.zeros(shape)
    start = (jnp.asarray(0), zeros, zeros, h0 == 0)
    _, lo, hi, found = jax.lax.while_loop(scan_cond, scan_body, start)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        keep_lo = crossed(h(mid))
        return jnp.where(keep_lo, lo, mid), jnp.where(keep_lo, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 60, bisect, (lo, hi))
    q = jnp.where(found, jnp.exp(0.5 * (lo + hi)), jnp.where(up, jnp.inf, 0.0))
    return jnp.where(h0 == 0, 1.0, q)


@_float64
def fixed_length(activation: str, sigma_w, sigma_b):
    """The fixed point ``q*`` of the length map reached from ``q = 1``: finite, 0 (lengths
    shrink to 0, possible only for ``sigma_b = 0`` and ``phi(0) = 0``) or ``inf`` (they grow
    without bound, possible only for unbounded activations).

    For the positively homogeneous activations (:data:`HOMOGENEOUS`), ``V(q) = A q +
    sigma_b^2`` with ``A = sigma_w^2 E[phi(z)^2]``: ``q* = sigma_b^2 / (1 - A)`` for
    ``A < 1``, ``inf`` for ``A >= 1`` and ``sigma_b > 0`` (for ``A = 1`` lengths grow
    linearly); without bias ``0`` (``A < 1``), ``inf`` (``A > 1``) or, for ``A = 1``
    (within :data:`MARGINAL`; e.g. He-initialized ReLU), 1: the map is the identity and
    every length is a fixed point. Otherwise :func:`_search_fixed_length`: ``q*`` to about
    1e-13 relative (the quadrature's accuracy); near a marginal fixed point at 0 (tanh with
    ``sigma_w = 1``, ``sigma_b = 0``, where ``V(q) = q - 2 q^2 + ...``) that means ``q*``
    of order 1e-13 or 0.
    """
    return _fixed_length(activation, sigma_w, sigma_b)


def _fixed_length(activation: str, sigma_w, sigma_b):
    if activation not in HOMOGENEOUS:
        return _search_fixed_length(activation, sigma_w, sigma_b)
    a, b = _slopes(activation, 1.0)
    A = sigma_w**2 * (a**2 + b**2) / 2
    marginal = jnp.abs(A - 1) <= MARGINAL
    with_bias = jnp.where(
        A < 1 - MARGINAL, sigma_b**2 / jnp.where(A < 1 - MARGINAL, 1 - A, 1.0), jnp.inf
    )
    no_bias = jnp.where(marginal, 1.0, jnp.where(A < 1, 0.0, jnp.inf))
    return jnp.where(sigma_b > 0, with_bias, no_bias)


@partial(jax.jit, static_argnums=0)
def _chi_1(activation: str, sigma_w, sigma_b):
    """``chi_1`` at :func:`fixed_length` (its limit at ``q* = 0`` or ``inf``)."""
    _, d1, _ = _derivatives(activation)
    q = _fixed_length(activation, sigma_w, sigma_b)
    return sigma_w**2 * _expect(lambda u: d1(u) ** 2, q, activation)


@partial(jax.jit, static_argnums=(0, 4))
def _c_star(activation, q, sigma_w, sigma_b, iterations):
    phi, _, _ = _derivatives(activation)
    q11 = sigma_w**2 * _expect(lambda u: phi(u) ** 2, q, activation) + sigma_b**2

    def step(c, _):
        return (sigma_w**2 * _expect2(phi, phi, q, c, activation) + sigma_b**2) / q11, None

    return jax.lax.scan(step, jnp.zeros_like(q), None, length=iterations)[0]


class MeanField(NamedTuple):
    """Mean-field quantities at the fixed point (arrays of the broadcast parameter shape).

    Fields:
        q_star: fixed point of the length map reached from ``q = 1`` (pre-activation
            variance per unit): finite, 0 or ``inf`` (:func:`fixed_length`).
        c_star: stable fixed point of the correlation map: 1 in the ordered phase and on
            the critical line (``chi_1 <= 1``), below 1 in the chaotic phase; at ``q* = 0``
            or ``inf``, 1, or NaN where the correlation map is the identity (module
            docstring).
        chi_1: ``sigma_w^2 E[phi'(sqrt(q*) z)^2]`` (its limit at ``q* = 0`` or ``inf``).
        xi_q: depth scale of the length map (layers): the e-folding depth of the approach
            to ``q*``; infinite when marginal.
        xi_c: depth scale of the correlation map (layers; infinite on the critical line,
            and at ``q* = 0`` or ``inf``, where correlations approach 1 polynomially).
        q_ratio: ``q_{l+1} / q_l`` deep in the network: 1 at a finite nonzero ``q*``, the
            factor by which lengths shrink (``q* = 0``) or grow (``q* = inf``) per layer
            otherwise (``chi_1`` there).
    """

    q_star: np.ndarray
    c_star: np.ndarray
    chi_1: np.ndarray
    xi_q: np.ndarray
    xi_c: np.ndarray
    q_ratio: np.ndarray


@_float64
def mean_field(activation: str, sigma_w, sigma_b, *, iterations: int = 2000) -> MeanField:
    """Fixed points, ``chi_1`` and depth scales for ``phi = activation`` at
    ``(sigma_w, sigma_b)`` (broadcast together; finite and ``>= 0``, else ``ValueError``).

    ``q*`` is :func:`fixed_length`. At a finite nonzero ``q*``: the slope of the
    correlation map at ``c = 1`` is ``chi_1``, so for ``chi_1 <= 1`` the stable fixed point
    is ``c* = 1`` and ``xi_c = -1 / ln chi_1`` (infinite on the critical line); for
    ``chi_1 > 1`` ``c*`` comes from iterating the correlation map ``iterations`` times from
    0, and ``xi_q = -1 / ln V'(q*)`` with ``V'(q*) = chi_1 + sigma_w^2 E[phi'' phi]``.
    Where the correlation map is the identity (a linear network without bias at
    ``sigma_w = 1``) ``c*`` is NaN. At ``q* = 0`` or ``inf``: the limits of the module
    docstring (``chi_1 = q_ratio = sigma_w^2 (a^2 + b^2) / 2``, ``xi_q = 1 / |ln q_ratio|``,
    ``c*`` = 1 or NaN, ``xi_c = inf``).

    Convergence of ``c*`` is geometric except where ``chi_1`` is just above 1: there the
    result is only as close to the fixed point as ``iterations`` layers of a network get.
    """
    return MeanField(*_mean_field(activation, sigma_w, sigma_b, int(iterations)))


@partial(jax.jit, static_argnums=(0, 3))
def _mean_field(activation: str, sigma_w, sigma_b, iterations: int):
    _, d1, d2 = _derivatives(activation)
    phi = get_activation(activation)
    q_found = _fixed_length(activation, sigma_w, sigma_b)
    edge = ~_interior(q_found)
    q = jnp.where(edge, 1.0, q_found)  # the interior formulas, kept finite at the edges
    chi_1 = sigma_w**2 * _expect(lambda u: d1(u) ** 2, q, activation)
    ordered = chi_1 <= 1 + MARGINAL
    # the correlation map is the identity: slope 1 at c = 1 and K(0) = 0, where K(0) =
    # (sigma_w^2 E[phi(u)]^2 + sigma_b^2) / q* (u_1, u_2 independent at c = 0)
    k0 = sigma_w**2 * _expect(phi, q, activation) ** 2 + sigma_b**2
    identity = (jnp.abs(chi_1 - 1) <= MARGINAL) & (k0 <= MARGINAL * q)
    chaotic = ~ordered & ~edge
    c = jax.lax.cond(  # iterate the correlation map only where it is needed
        jnp.any(chaotic),
        lambda: jnp.where(chaotic, _c_star(activation, q, sigma_w, sigma_b, iterations), 1.0),
        lambda: jnp.ones_like(q),
    )
    c = jnp.where(identity, jnp.nan, c)
    slope_q = chi_1 + sigma_w**2 * _expect(lambda u: d2(u) * phi(u), q, activation)
    slope_c = jnp.where(
        ordered, chi_1, sigma_w**2 * _expect2(d1, d1, q, jnp.where(identity, 1.0, c), activation)
    )
    # the limits q* = 0, inf: a positively homogeneous phi of slopes a, b
    a, b = _slopes(activation, q_found)
    rho = sigma_w**2 * (a**2 + b**2) / 2
    c_edge = jnp.where(jnp.abs(a - b) > 0, 1.0, jnp.nan)
    xi_q_edge = _depth_scale(jnp.where(q_found == 0, rho, 1 / jnp.where(rho > 0, rho, 1.0)))
    return (
        q_found,
        jnp.where(edge, c_edge, c),
        jnp.where(edge, rho, chi_1),
        jnp.where(edge, xi_q_edge, _depth_scale(slope_q)),
        jnp.where(edge, jnp.inf, _depth_scale(slope_c)),
        jnp.where(edge, rho, 1.0),
    )


def _depth_scale(slope: jax.Array) -> jax.Array:
    """``-1 / ln|slope|``; infinite for a marginal map (slope 1 up to :data:`MARGINAL`)."""
    slope = jnp.abs(slope)
    return jnp.where(jnp.abs(slope - 1) < MARGINAL, jnp.inf, -1 / jnp.log(slope))


@_float64
def chi(activation: str, q, sigma_w):
    """``sigma_w^2 E[phi'(sqrt(q) z)^2]``: the mean squared singular value of a layer's
    Jacobian ``D W`` when its pre-activations have variance ``q`` (``chi_1`` at ``q*``; at
    ``q = 0`` or ``inf`` the limit, ``sigma_w^2 (phi'(0+)^2 + phi'(0-)^2) / 2`` or the same
    at infinity: ``sigma_w^2 / 2`` for ReLU at every ``q``)."""
    _, d1, _ = _derivatives(activation)
    return sigma_w**2 * _expect(lambda u: d1(u) ** 2, q, activation)


@_float64
def derivative_moments(activation: str, q):
    """``(mu_1, mu_2) = (E[phi'(u)^2], E[phi'(u)^4])`` for ``u ~ N(0, q)``: the first two
    moments of the squared activation derivatives, ``D^2`` in a layer's Jacobian ``D W``
    (limits at ``q = 0`` and ``inf``)."""
    _, d1, _ = _derivatives(activation)
    return _expect(lambda u: d1(u) ** 2, q, activation), _expect(
        lambda u: d1(u) ** 4, q, activation
    )


@_float64
def derivative_distribution(activation: str, q):
    """The law of ``phi'(u)^2`` for ``u ~ N(0, q)`` (scalar ``q``) as weighted atoms:
    ``(values, weights)`` with ``E[g(phi'(u)^2)] ~ sum_i weights_i g(values_i)`` for smooth
    ``g`` (the quadrature rule of this module; weights sum to 1 up to 1e-32). At ``q = 0``
    or ``inf`` the limit law: two atoms of weight 1/2 at the one-sided values."""
    _, d1, _ = _derivatives(activation)
    if not bool(_interior(q)):
        u = _edge_point(q)
        return jnp.stack([d1(u), d1(-u)]) ** 2, jnp.full(2, 0.5)
    s = jnp.sqrt(q)
    z, w = _pieces(_kinks(activation) / s)
    return d1(s * z) ** 2, w


def critical_sigma_w(
    activation: str, sigma_b, *, low: float = 0.05, high: float = 8.0, steps: int = 60
) -> np.ndarray:
    """The critical line: for each ``sigma_b``, the ``sigma_w`` with ``chi_1 = 1``.

    For a positively homogeneous activation (:data:`HOMOGENEOUS`) ``chi_1 = sigma_w^2
    E[phi'(z)^2]`` at every ``q*``, finite or not, so the line is ``sigma_w =
    E[phi'(z)^2]^(-1/2)`` for every ``sigma_b``: ``sqrt(2)`` for ReLU (with ``sigma_b > 0``
    the lengths then grow linearly, ``q* = inf``), 1 for a linear network. Otherwise by
    bisection on ``[low, high]`` (``chi_1`` increases with ``sigma_w`` for the activations
    here); NaN where ``chi_1 - 1`` does not change sign on the interval (widen it).
    """
    check_arguments(sigma_b=sigma_b)
    sb = np.asarray(sigma_b, np.float64)
    if activation in HOMOGENEOUS:
        return np.broadcast_to(1 / np.sqrt(float(chi(activation, 1.0, 1.0))), sb.shape).copy()
    lo = np.full(sb.shape, low)
    hi = np.full(sb.shape, high)

    def excess(sigma_w):
        with jax.enable_x64(True):
            return np.asarray(_chi_1(activation, jnp.asarray(sigma_w), jnp.asarray(sb))) - 1

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
    the order linear -> norm -> activation at its fixed point:

    * ``norm="none"``: ``r = sqrt(chi_1 / q_ratio)`` (:func:`mean_field`). At a finite
      nonzero ``q*`` the lengths are stationary (``q_ratio = 1``) and the GSC grows like
      the qm norm of the Jacobian, ``sqrt(chi_1)``. At ``q* = 0`` or ``inf`` the layer
      outputs shrink or grow by ``q_ratio`` per layer, which the GSC divides out: since
      ``q_ratio = chi_1`` there, ``r = 1`` (e.g. ReLU without bias at any ``sigma_w``: a
      positively homogeneous network's GSC is scale free);
    * ``norm="layer"``: the pre-activations are normalized to variance 1 and the layer norm
      divides by the standard deviation of ``W x + b`` across units,
      ``sqrt(sigma_w^2 E[phi(z)^2] + sigma_b^2)``, so
      ``r^2 = sigma_w^2 E[phi'(z)^2] / (sigma_w^2 E[phi(z)^2] + sigma_b^2)``, ``z ~ N(0, 1)``
      (``ValueError`` when ``sigma_w = sigma_b = 0``: every layer output is 0);
    * ``norm="batch"`` with ``batch_size=B`` (an int >= :data:`MIN_BATCH_SIZE`):
      ``r = sqrt(lambda_G(B))``, the batch-norm gradient explosion rate of
      :func:`batchnorm_mean_field` (Yang et al., arXiv 1902.08129). Batch norm removes
      the scale of the weights and the biases, so ``sigma_w`` and ``sigma_b`` only set the
      shape of the result. The GSC grows like the gradient norm because batch norm fixes
      the length of every layer output.

    ``kwargs`` go to :func:`mean_field`. Returns an array of the broadcast shape of
    ``sigma_w`` and ``sigma_b``.
    """
    check_arguments(sigma_w=sigma_w, sigma_b=sigma_b)
    if norm != "batch" and batch_size is not None:
        raise ValueError(f"batch_size is for norm='batch' only, got norm={norm!r}")
    if norm == "none":
        m = mean_field(activation, sigma_w, sigma_b, **kwargs)
        return np.sqrt(m.chi_1 / m.q_ratio)
    if norm == "layer":
        phi_sq = length_map(activation, 1.0, 1.0, 0.0)  # E[phi(z)^2]
        sw2 = np.asarray(sigma_w, np.float64) ** 2
        spread = sw2 * phi_sq + np.asarray(sigma_b, np.float64) ** 2
        if np.any(spread == 0):
            raise ValueError(
                "norm='layer' with sigma_w = sigma_b = 0: every pre-activation is 0 and layer "
                "norm divides 0 by 0; give sigma_w > 0 or sigma_b > 0"
            )
        return np.sqrt(chi(activation, 1.0, sigma_w) / spread)
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

    Raises:
        ValueError: an argument out of range (:func:`check_arguments`), or lengths beyond
            float64's range within ``depth`` layers (the ratio ``P_{L-k} / P_L`` is then
            ``inf / inf``).
    """
    if any(np.ndim(a) for a in (sigma_w, sigma_b, q1)):
        raise ValueError("gsc_profile takes scalar sigma_w, sigma_b and q1")
    check_arguments(sigma_w=sigma_w, sigma_b=sigma_b, q1=q1)
    q1 = sigma_w**2 + sigma_b**2 if q1 is None else q1
    q = length_sequence(activation, q1, sigma_w, sigma_b, depth)  # q_1 .. q_L
    chis = chi(activation, q, sigma_w)
    P = np.concatenate([[1.0], (length_map(activation, q, 1.0, 0.0))])  # P_0 .. P_L
    if not np.all(np.isfinite(P) & (P > 0)):
        bad = int(np.argmax(~(np.isfinite(P) & (P > 0))))
        raise ValueError(
            f"gsc_profile: the layer outputs' mean square is {P[bad]} at layer {bad} of "
            f"{int(depth)}: beyond float64's range (the lengths grow or shrink by a constant "
            "factor per layer), or zero; use fewer layers (or gsc_growth_rate)"
        )
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
    check_arguments(sigma_w=sigma_w, sigma_b=sigma_b, residual_scale=residual_scale)
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
