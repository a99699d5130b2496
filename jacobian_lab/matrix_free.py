"""Matrix-free Jacobian statistics: the Jacobian as a linear operator, never materialized.

A Jacobian ``J = d fn / d x`` (``m x n`` after flattening, as in
:func:`jacobian_lab.jacobian`) is touched only through products: ``v -> J v`` by
:func:`jax.jvp` and ``u -> J^T u`` by the pullback of one :func:`jax.vjp`. Every estimator
returns its value with an error estimate (:class:`Estimate`).

* :func:`frobenius_norm_sq`: ``||J||_F^2 = tr(J^T J)``, by Hutchinson's estimator
  ``E_v ||J v||^2`` over Rademacher probes (standard error from the spread of the probes,
  Student-t interval on the log scale; see :class:`Estimate`)
  or by the leave-one-out XTrace-type estimator ``"xrownorms"`` (Epperly, arXiv
  2512.15929; the variance-reduced family of Hutch++), both from matfree.
* :func:`extreme_singular_values`: largest and smallest singular value by Golub-Kahan-
  Lanczos bidiagonalization (matfree), with the a-posteriori residual bound.
* :func:`slq_spectrum`: the spectral measure of ``J^T J`` by stochastic Lanczos quadrature
  (matfree's bidiagonalization per probe; nodes and weights).

The numerical linear algebra is matfree's (Kraemer et al.); this module builds the
operators and turns matfree's outputs into the quantities of the papers.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from jax.flatten_util import ravel_pytree
from matfree import decomp, stochtrace

from jacobian_lab.checks import is_traced

DEFAULT_MEMORY_BUDGET = 2**30
"""Bytes a dense Jacobian method may use before ``method="auto"`` goes matrix-free."""


MIN_PROBES_FOR_ERROR = 3
"""Fewest probes whose Monte-Carlo estimates get a finite error: one probe has no spread,
and intervals from two missed too often (92-95% coverage of a nominal 95% pooled over
layers, 86% for one ReLU layer; see :class:`Estimate`), so estimates from fewer probes
report ``error = inf``."""


class Estimate(NamedTuple):
    """A Monte-Carlo or iterative estimate and its error.

    Fields (same shape, or ``None``):
        value: the estimate.
        error: its standard error (Monte-Carlo estimators), or the Lanczos residual
            bound (some singular value lies within it; see
            :class:`ExtremeSingularValues`); 0 for an exact (dense) computation; ``inf``
            for a Monte-Carlo estimate from fewer than :data:`MIN_PROBES_FOR_ERROR` probes.
        dof: degrees of freedom of a Monte-Carlo standard error (see :func:`probe_dof`);
            ``None`` when ``error`` is a bound or 0 (exact).
        log_scale: ``True`` where the estimate is a positive Monte-Carlo mean, or a power
            of one (the GSC is the square root of one), whose interval is built for its
            logarithm; ``None``: linear.

    Calibration of ``interval()`` (95%), measured against dense values over 1000 probe
    draws for Hutchinson estimates on ``mlp(6, 16, "tanh")``, ``mlp(6, 16, "relu")`` and
    ``mlp(12, 24, "tanh", sigma_w=1.5)`` (float64; the GSC of every layer of 3 samples,
    ``||J||_F^2`` of one, SLQ ``frobenius_sq`` and second moment): 95-97.5% at 3 to 32
    probes pooled over layers, 91.5-95% for the worst single layer. The probe values
    ``||J v||^2`` are right-skewed (they follow the few largest singular values) and a
    small mean comes with a small spread, so the plain ``mean +- t se`` interval with
    ``P - 1`` degrees of freedom covered only 90-94% (single layers down to 84%); the log
    scale and the fewer degrees of freedom of :func:`probe_dof` make up for it.
    """

    value: jax.Array
    error: jax.Array
    dof: jax.Array | None = None
    log_scale: jax.Array | None = None

    def interval(
        self, level: float = 0.95, *, z: float | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """A ``level`` confidence interval ``(lower, upper)``, elementwise.

        * Monte-Carlo (``dof`` set): the Student-t interval with ``dof`` degrees of freedom;
          where ``log_scale``, for the logarithm: ``value * exp(-+ t error / value)`` (the
          delta method makes ``error / value`` the standard error of ``log value``; for the
          GSC this is the square root of the interval for the squared norm), else
          ``value -+ t error``. ``error = inf`` (too few probes): ``(0, inf)`` on the log
          scale.
        * ``dof`` None: ``error`` is a bound (Lanczos residual) or 0 (exact), and the
          interval is ``(value - error, value + error)`` whatever the level.
        * ``z`` given: ``(value - z error, value + z error)`` (the former behaviour of
          ``interval(z)``), ignoring ``dof`` and ``log_scale``.
        """
        if z is not None:
            return self.value - z * self.error, self.value + z * self.error
        if isinstance(level, bool) or not 0 < level < 1:
            raise ValueError(
                f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level!r}; "
                "for value +- a multiple of the error pass z=..."
            )
        value, error = jnp.asarray(self.value), jnp.asarray(self.error)
        if self.dof is None:
            return value - error, value + error
        q = _t_quantile((1 + level) / 2, self.dof, value.dtype)
        half = jnp.where(error == 0, 0.0, q * error)  # exact values stay points
        lo, hi = value - half, value + half
        if self.log_scale is None:
            return lo, hi
        positive = value > 0
        r = jnp.where(
            positive, half / jnp.where(positive, value, 1), jnp.where(half > 0, jnp.inf, 0)
        )
        log_lo, log_hi = value * jnp.exp(-r), jnp.where(r < jnp.inf, value * jnp.exp(r), jnp.inf)
        return jnp.where(self.log_scale, log_lo, lo), jnp.where(self.log_scale, log_hi, hi)


def _t_quantile(p: float, dof, dtype) -> jax.Array:
    """The ``p`` quantile of Student's t with ``dof`` (> 0, need not be an integer; ``inf``
    where ``dof <= 0``) degrees of freedom, any shape. scipy's, through a callback under
    ``jit``/``vmap``."""

    def quantile(d):
        d = np.asarray(d, np.float64)
        q = scipy.stats.t.ppf(p, np.where(d > 0, d, 1.0))
        return np.where(d > 0, q, np.inf).astype(dtype)

    if is_traced(dof):
        out = jax.ShapeDtypeStruct(jnp.shape(dof), dtype)
        return jax.pure_callback(quantile, out, dof, vmap_method="expand_dims")
    return jnp.asarray(quantile(dof))


def probe_dof(relative_error: jax.Array, num_probes: int) -> jax.Array:
    """Degrees of freedom of the standard error of a mean of ``num_probes`` quadratic forms
    ``||J v||^2``, from its relative standard error ``se / mean``.

    The sample variance of ``P`` values with excess kurtosis ``kappa`` has
    ``Var(s^2) / sigma^4 = 2 / (P - 1) + kappa / P``; matching a scaled chi-square gives
    ``nu = 2 / (2 / (P - 1) + kappa / P)`` (Satterthwaite), ``P - 1`` for normal values.
    A quadratic form in random signs is close to a scaled chi-square (a gamma variable), for
    which ``kappa = 6 CV^2`` and ``CV^2 = P (se / mean)^2``; so
    ``nu = 2 / (2 / (P - 1) + 6 (se / mean)^2)``. Skewed probes (few dominant singular
    values) get fewer degrees of freedom and a wider interval; an orthogonal ``J`` keeps
    ``P - 1``.
    """
    if num_probes < 2:
        return jnp.zeros_like(relative_error)
    return 2.0 / (2.0 / (num_probes - 1) + 6.0 * relative_error**2)


def mean_estimate(samples: jax.Array, axis: int = 0, *, log_scale: bool = True) -> Estimate:
    """:class:`Estimate` of the mean of i.i.d. ``samples`` along ``axis``: standard error
    ``std(ddof=1) / sqrt(P)`` (``inf`` below :data:`MIN_PROBES_FOR_ERROR` samples).
    ``log_scale``: positive samples, quadratic forms ``||J v||^2`` (degrees of freedom from
    :func:`probe_dof`, log-scale interval); else ``P - 1`` and a linear interval."""
    num = samples.shape[axis]
    mean = jnp.mean(samples, axis=axis)
    if num < MIN_PROBES_FOR_ERROR:
        error = jnp.full_like(mean, jnp.inf)
        return Estimate(mean, error, jnp.full(mean.shape, num - 1.0), jnp.full(mean.shape, True))
    error = jnp.std(samples, axis=axis, ddof=1) / jnp.sqrt(jnp.asarray(num, mean.dtype))
    if not log_scale:
        return Estimate(mean, error, jnp.full(mean.shape, num - 1.0))
    rel = jnp.where(mean > 0, error / jnp.where(mean > 0, mean, 1), 0.0)
    return Estimate(mean, error, probe_dof(rel, num), jnp.full(mean.shape, True))


def check_count(
    value: Any, name: str, minimum: int = 1, maximum: int | None = None, *, accepted: str = ""
) -> int:
    """``value`` as an ``int``, or a ``TypeError`` (not an integer; ``bool`` is refused) or
    ``ValueError`` (below ``minimum`` or above ``maximum``) naming the argument and what it
    accepts (``accepted``, default ``"an int >= minimum [and <= maximum]"``)."""
    if not accepted:
        accepted = f"an int >= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {accepted}, got the bool {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be {accepted}, got {value!r} ({type(value).__name__})"
        ) from None
    if count < minimum or (maximum is not None and count > maximum):
        raise ValueError(f"{name} must be {accepted}, got {count}")
    return count


class Operator(NamedTuple):
    """A Jacobian as a linear operator on flat vectors.

    Fields:
        matvec: ``v (n,) -> J v (m,)``.
        vecmat: ``u (m,) -> J^T u (n,)``.
        shape: ``(m, n)``.
        dtype: the dtype of ``fn``'s flat input.
    """

    matvec: Callable[[jax.Array], jax.Array]
    vecmat: Callable[[jax.Array], jax.Array]
    shape: tuple[int, int]
    dtype: Any


def jacobian_operator(fn: Callable[[Any], Any], x: Any) -> Operator:
    """The Jacobian of ``fn`` at ``x`` as an :class:`Operator`.

    Inputs and outputs may be pytrees; they are flattened as in :func:`jacobian_lab.jacobian`.
    ``J v`` is a :func:`jax.jvp` (forward pass and tangent together); ``J^T u`` is the
    pullback of one :func:`jax.vjp`, whose residuals (about one forward pass) serve every
    product. Never ``m x n`` memory.

    Why not :func:`jax.linearize` for ``J v``: applied repeatedly inside a loop (as Lanczos
    does) to a network under ``lax.scan``, its linear function ran 30x slower than
    ``jax.jvp`` on CPU (jax 0.10.1, width 1024, depth 10; ``jax.linear_transpose`` of it
    was as fast as the pullback), so the forward pass is recomputed instead.
    """
    flat_x, unravel = ravel_pytree(x)

    def flat_fn(v):
        return ravel_pytree(fn(unravel(v)))[0]

    out, pullback = jax.vjp(flat_fn, flat_x)

    def matvec(v):
        return jax.jvp(flat_fn, (flat_x,), (v,))[1]

    return Operator(matvec, lambda u: pullback(u)[0], (out.shape[0], flat_x.shape[0]), flat_x.dtype)


def dense_bytes(shape: tuple[int, int], dtype: Any, copies: int = 3) -> int:
    """Bytes a dense method needs for an ``m x n`` Jacobian: the matrix, and workspace of
    ``copies - 1`` more (an SVD's factors)."""
    m, n = shape
    return int(m) * int(n) * jnp.dtype(dtype).itemsize * copies


def choose_method(method: str, nbytes: int, memory_budget: int | None) -> str:
    """``"dense"`` or ``"matrix_free"``: ``method`` unless it is ``"auto"``, then dense
    when ``nbytes`` fits ``memory_budget`` (bytes, an ``int >= 0`` or ``None`` for
    :data:`DEFAULT_MEMORY_BUDGET`; checked whatever the method; 0 forces matrix-free)."""
    if method not in ("auto", "dense", "matrix_free"):
        raise ValueError(f"method must be 'auto', 'dense' or 'matrix_free', got {method!r}")
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    budget = check_count(budget, "memory_budget", 0, accepted="None or an int number of bytes >= 0")
    if method != "auto":
        return method
    return "dense" if nbytes <= budget else "matrix_free"


def _lanczos_dtype(dtype):
    """matfree's bidiagonalization allocates its vectors at JAX's default float type, so the
    Lanczos recursion runs there (float64 when 64-bit JAX is on) and products are cast."""
    return jnp.result_type(float) if jnp.dtype(dtype).itemsize < 8 else dtype


def _lanczos_matvec(op: Operator):
    """``v -> J v`` for matfree's bidiagonalization, which gets ``J^T u`` by differentiating
    it: a ``custom_vjp`` hands it :attr:`Operator.vecmat` (transposing the JVP of a scanned
    network instead ran 6-9x slower on CPU). Cast to the Lanczos dtype."""
    dt = _lanczos_dtype(op.dtype)

    @jax.custom_vjp
    def matvec(v):
        return op.matvec(v.astype(op.dtype)).astype(dt)

    matvec.defvjp(
        lambda v: (matvec(v), None), lambda _, u: (op.vecmat(u.astype(op.dtype)).astype(dt),)
    )
    return matvec, dt


def frobenius_norm_sq(
    fn: Callable[[Any], Any],
    x: Any,
    key: jax.Array,
    num_probes: int = 64,
    method: str = "hutchinson",
) -> Estimate:
    """Matrix-free estimate of ``||J||_F^2`` for ``J = d fn / d x``.

    Args:
        fn, x: the function and the point (pytrees allowed).
        key: PRNG key for the probes.
        num_probes: number of Jacobian-vector products, an ``int >= 1`` (``>= 2`` for
            ``"xrownorms"``). Fewer than :data:`MIN_PROBES_FOR_ERROR` Hutchinson probes
            give a point estimate with error ``inf``.
        method: ``"hutchinson"``: mean of ``||J v||^2`` over Rademacher ``v``, unbiased,
            standard error from the probes' spread, calibrated intervals
            (:meth:`Estimate.interval`, :func:`probe_dof`). ``"xrownorms"``:
            matfree's leave-one-out XRowNorm estimator, far more accurate when the singular
            values decay, slightly worse when they are flat; its standard error (matfree's
            spread of the leave-one-out estimates) tends to be optimistic by 1.3-2.5x, and
            a t interval from it covered 80-92% of a nominal 95% (``mlp(4, 64, "tanh")``,
            2-16 probes), so it comes with ``dof = 0``: ``interval()`` is ``(0, inf)``
            (use ``"hutchinson"`` for error bars). It needs ``2 <= num_probes <= n``, and
            ``3 num_probes < n`` to be an estimate (otherwise matfree computes ``J``
            exactly and reports error 0).

    Returns:
        :class:`Estimate` (scalars). The qm norm is ``sqrt(value / n)``.
    """
    if method not in ("hutchinson", "xrownorms"):
        raise ValueError(f"method must be 'hutchinson' or 'xrownorms', got {method!r}")
    if method == "hutchinson":
        num_probes = check_count(num_probes, "num_probes")
    else:
        n = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(x))
        num_probes = check_count(num_probes, "num_probes", 2, n)
    op = jacobian_operator(fn, x)
    like = jnp.zeros(op.shape[1], op.dtype)
    if method == "hutchinson":
        probes = stochtrace.sampler_signs(like, num=num_probes)(key)
        sq = jax.vmap(lambda v: jnp.sum(op.matvec(v) ** 2))(probes)
        return mean_estimate(sq)
    rows = stochtrace.leave_one_out_xrownorms_squared()
    est = stochtrace.estimator_leave_one_out_mean_and_sem(
        lambda mv, samples, *p: rows(mv, samples, *p).sum(axis=1),
        stochtrace.sampler_normal(like, num=num_probes),
    )
    mean, sem = est(op.matvec, key)
    return Estimate(mean, sem, jnp.zeros(mean.shape), jnp.full(mean.shape, True))


class ExtremeSingularValues(NamedTuple):
    """Largest and smallest singular value of a Jacobian, with condition number.

    Fields:
        largest: :class:`Estimate`; ``error`` bounds the distance from the Ritz value to
            *some* singular value of ``J`` (the residual bound), so with the Ritz value
            converged it is the largest one.
        smallest: :class:`Estimate` of ``sigma_min`` over ``min(m, n)`` values; the Ritz
            value is an upper bound that converges slowly (exact at ``num_matvecs = min(m,
            n)``); its ``error`` bounds the distance to *some* singular value, which is
            ``sigma_min`` only once the Ritz value has converged.
        condition_number: ``largest / smallest`` (their values).
        num_matvecs: Lanczos steps taken.
    """

    largest: Estimate
    smallest: Estimate
    condition_number: jax.Array
    num_matvecs: int


def _bidiagonalize(op: Operator, v0: jax.Array, num_matvecs: int):
    matvec, dt = _lanczos_matvec(op)
    k = min(num_matvecs, *op.shape)
    res = decomp.bidiag(k)(matvec, v0.astype(dt))
    return res, k


def extreme_singular_values(
    fn: Callable[[Any], Any], x: Any, key: jax.Array, num_matvecs: int = 64
) -> ExtremeSingularValues:
    """Largest and smallest singular value of ``J = d fn / d x`` by Golub-Kahan-Lanczos
    bidiagonalization (matfree ``decomp.bidiag``, full reorthogonalization).

    ``k = min(num_matvecs, m, n)`` steps give ``J V_k = U_k B_k`` and
    ``J^T U_k = V_k B_k^T + beta_{k+1} v_{k+1} e_k^T``; the singular values ``theta_i`` of
    the small bidiagonal ``B_k`` (Ritz values) lie in the range of ``J``'s. With
    ``B_k = P diag(theta) Q^T``, the residual bound: some singular value of ``J`` lies within
    ``beta_{k+1} |P[k, i]|`` of ``theta_i`` (the last entry of the *left* singular vector;
    ``beta_{k+1}`` is the norm of matfree's residual). A wide ``J`` (``m < n``) is
    bidiagonalized as ``J^T``, so that the smallest Ritz value approaches
    ``s_min(m, n)`` rather than the zeros of the null space.

    Returns:
        :class:`ExtremeSingularValues`. Costs ``k`` JVPs and ``k`` VJPs. ``num_matvecs``
        must be an ``int >= 1``.
    """
    num_matvecs = check_count(num_matvecs, "num_matvecs")
    op = jacobian_operator(fn, x)
    if op.shape[0] < op.shape[1]:  # wide: the same singular values, without the null space
        op = Operator(op.vecmat, op.matvec, op.shape[::-1], op.dtype)
    v0 = jax.random.normal(key, (op.shape[1],), op.dtype)
    res, k = _bidiagonalize(op, v0, num_matvecs)
    P, s, _ = jnp.linalg.svd(res.J_small)
    beta = jnp.linalg.norm(res.residual)
    beta = jnp.where(jnp.isfinite(beta), beta, 0.0)  # exhausted space: residual 0/0
    bound = beta * jnp.abs(P[-1, :])
    cast = lambda a: a.astype(op.dtype)  # noqa: E731
    largest = Estimate(cast(s[0]), cast(bound[0]))
    smallest = Estimate(cast(s[-1]), cast(bound[-1]))
    return ExtremeSingularValues(largest, smallest, cast(s[0] / s[-1]), k)


class SLQ(NamedTuple):
    """Stochastic Lanczos quadrature of the spectral measure of ``J^T J``.

    The measure ``(1/n) sum_i delta(lambda_i)`` over the ``n`` eigenvalues of ``J^T J``
    (squared singular values, with ``n - m`` zeros when ``J`` is wide) is approximated by
    ``(1/P) sum_p sum_j weights[p, j] delta(nodes[p, j])``.

    Fields:
        nodes: ``(P, k)`` Ritz values ``theta^2`` per probe.
        weights: ``(P, k)``, each row summing to 1.
    """

    nodes: jax.Array
    weights: jax.Array


def slq_spectrum(
    fn: Callable[[Any], Any],
    x: Any,
    key: jax.Array,
    num_probes: int = 16,
    num_matvecs: int = 32,
) -> SLQ:
    """Stochastic Lanczos quadrature for the squared singular values of ``J = d fn / d x``.

    For each Rademacher probe ``v`` (``||v||^2 = n``), ``k`` steps of Golub-Kahan-Lanczos
    (matfree ``decomp.bidiag``) from ``v`` give ``B_k``; with ``B_k = U S Y^T`` the nodes are
    ``S^2`` and the weights ``Y[0, :]^2`` (Gauss quadrature for ``v^T g(J^T J) v / n``).

    Returns:
        :class:`SLQ`. Cost: ``k`` steps, each one batched JVP and VJP over all probes
        (memory ``num_probes * k * (m + n)`` numbers for the Lanczos vectors). Moments
        ``E[lambda^j]`` of the measure are exact for ``j < 2k`` up to the probe's
        Monte-Carlo error. ``num_probes`` and ``num_matvecs`` must be ``int >= 1``.
    """
    num_probes = check_count(num_probes, "num_probes")
    num_matvecs = check_count(num_matvecs, "num_matvecs")
    op = jacobian_operator(fn, x)
    probes = stochtrace.sampler_signs(jnp.zeros(op.shape[1], op.dtype), num=num_probes)(key)

    def one(v):
        res, _ = _bidiagonalize(op, v, num_matvecs)
        _, s, Yt = jnp.linalg.svd(res.J_small)
        return s**2, Yt[:, 0] ** 2

    nodes, weights = jax.vmap(one)(probes)  # one product serves all probes per step
    return SLQ(nodes.astype(op.dtype), weights.astype(op.dtype))
