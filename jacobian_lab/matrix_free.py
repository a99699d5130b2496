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
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from jax.flatten_util import ravel_pytree
from matfree import decomp, stochtrace

from jacobian_lab.checks import check_float_input, check_key, is_traced

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
    check_float_input(x)
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
    key = check_key(key)
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
            *some* singular value of ``J`` (the residual bound plus the rounding floor of
            :func:`bidiagonalize`), so with the Ritz value converged it is the largest one.
        smallest: :class:`Estimate` of ``sigma_min`` over ``min(m, n)`` values; the Ritz
            value is an upper bound that converges slowly (exact once the Krylov space is
            exhausted: ``num_matvecs = min(m, n)``, or an invariant subspace found); its
            ``error`` bounds the distance to *some* singular value, which is ``sigma_min``
            only once the Ritz value has converged.
        condition_number: ``largest / smallest`` (their values; ``inf`` where the smallest
            is 0, including the zero operator).
        num_matvecs: Lanczos steps whose vectors were kept (fewer than asked where an
            invariant subspace was found, see :func:`bidiagonalize`).
    """

    largest: Estimate
    smallest: Estimate
    condition_number: jax.Array
    num_matvecs: jax.Array


class Bidiagonal(NamedTuple):
    """A Golub-Kahan-Lanczos factorization cut where it stays valid (:func:`bidiagonalize`).

    Fields:
        singular_values: ``(k,)`` Ritz values, descending; entries past ``steps`` are 0.
        right: ``(k, k)`` right singular vectors of the kept bidiagonal (zero past the cut)
            as columns: ``right[0, j]^2`` is the Gauss quadrature weight of node ``j``.
        left_last: ``(k,)`` the last kept row of the left singular vectors, ``P[steps-1, j]``.
        residual: the norm ``beta`` of the kept factorization's residual: 0 at an invariant
            subspace.
        dropped: the size of the entry set to 0 to close an invariant subspace (rounding
            noise; 0 when none).
        floor: the rounding floor of the Ritz values (see :func:`bidiagonalize`).
        steps: Lanczos steps kept (an int array).
        finite: ``False`` when the operator's products held inf or NaN.
    """

    singular_values: jax.Array
    right: jax.Array
    left_last: jax.Array
    residual: jax.Array
    dropped: jax.Array
    floor: jax.Array
    steps: jax.Array
    finite: jax.Array


def _first(bad: jax.Array) -> jax.Array:
    """Index of the first true entry of ``bad`` (its length when none)."""
    return jnp.where(jnp.any(bad), jnp.argmax(bad), bad.shape[0])


def bidiagonalize(op: Operator, v0: jax.Array, num_matvecs: int) -> Bidiagonal:
    """``k = min(num_matvecs, m, n)`` steps of Golub-Kahan-Lanczos bidiagonalization of
    ``op`` from ``v0`` (matfree's ``decomp.bidiag``, full reorthogonalization), cut where
    the factorization stops being valid, and the SVD of the kept bidiagonal.

    matfree runs a fixed number of steps. When the Krylov space becomes invariant (an
    isometric ``J``, a few distinct singular values, a rank below ``k``, a zero ``J``), the
    next Lanczos vector is 0 (matfree then divides 0 by 0: NaN) or rounding noise, and
    noise normalized and reorthogonalized against a space it lies in loses orthogonality;
    the steps after that are garbage (Ritz values beyond ``||J||``: 2e3 against 7 on a
    depth-30 ReLU Jacobian). So the factorization is cut at the first step ``i`` whose
    vector is not finite or not orthogonal to the earlier ones (overlap above
    ``eps^(3/4)`` of the Lanczos dtype; two reorthogonalization passes keep valid vectors
    within a few ``eps``):

    * a bad right vector ``v_i``: ``V_i`` spans an invariant subspace of ``J^T J`` up to
      ``beta_i`` (0, or rounding noise), kept with residual ``beta_i``;
    * a bad left vector ``u_i`` (``J v_i`` already in the span of the ``u``'s): ``V_{i+1}``
      is invariant once ``alpha_i`` is set to 0 (``dropped``; a singular value of 0).

    A finite ``alpha`` or ``beta`` at the cut is an invariant subspace; a non-finite one
    means the operator's products are not finite (``finite`` is then false).

    Rounding: the products ``J v`` carry errors up to about ``eps sqrt(n) ||J||`` in the
    operator's dtype (a sum of ``n`` rounded products) and the kept vectors have overlaps
    up to ``delta`` (measured; at most ``eps_L^(3/4)``), so no Ritz value is resolved
    better than ``floor = (eps sqrt(min(m, n)) + sqrt(k) delta) theta_1`` (``theta_1`` the
    largest Ritz value). Every error bound adds it. A wide ``J`` should be passed as
    ``J^T`` (a smaller Krylov space, the same nonzero singular values).

    Returns:
        :class:`Bidiagonal`. Costs ``k`` products with ``J`` and ``k`` with ``J^T``.
    """
    matvec, dt = _lanczos_matvec(op)
    k = min(num_matvecs, *op.shape)
    res = decomp.bidiag(k)(matvec, v0.astype(dt))
    U, V = res.Q_tall  # (k, m), (k, n): one Lanczos vector per row
    eps = float(jnp.finfo(op.dtype).eps)
    return _cut(U, V, res.J_small, jnp.linalg.norm(res.residual), eps, min(op.shape))


@partial(jax.jit, static_argnums=(4, 5))
def _cut(U, V, B, end, eps: float, min_dim: int) -> Bidiagonal:
    """The cut and the SVD of :func:`bidiagonalize` (one compiled program per shape)."""
    k = B.shape[0]
    tol = jnp.finfo(B.dtype).eps ** 0.75
    alphas = jnp.diagonal(B)
    betas = jnp.concatenate([jnp.zeros(1, B.dtype), jnp.diagonal(B, 1)])  # betas[i]: of v_i
    below = jnp.tril(jnp.ones((k, k), bool), -1)

    def bad_rows(Q):
        overlap = jnp.max(jnp.where(below, jnp.abs(Q @ Q.T), 0.0), axis=1)
        return ~(jnp.all(jnp.isfinite(Q), axis=1) & (overlap <= tol))  # NaN fails too

    first_v = _first(bad_rows(V))
    first_u = _first(bad_rows(U) | ~(alphas > 0))
    u_cut = first_u < first_v  # J v_i lies in span(U): close with alpha_i = 0
    steps = jnp.where(u_cut, first_u + 1, first_v)
    index = jnp.arange(k)
    at_cut = jnp.minimum(jnp.where(u_cut, first_u, first_v), k - 1)
    finite = jnp.where(
        u_cut,
        jnp.isfinite(alphas[at_cut]),
        jnp.where(first_v < k, jnp.isfinite(betas[at_cut]), True),
    )
    finite &= jnp.all(jnp.isfinite(jnp.where(index < steps, alphas, 0.0)))
    residual = jnp.where(
        u_cut, 0.0, jnp.where(first_v < k, betas[at_cut], jnp.where(jnp.isfinite(end), end, 0.0))
    )
    dropped = jnp.where(u_cut & jnp.isfinite(alphas[at_cut]), jnp.abs(alphas[at_cut]), 0.0)
    keep = index < steps
    kept = jnp.where(keep[:, None] & keep[None, :], B, 0.0)
    kept = jnp.where(u_cut & (index == first_u)[:, None] & (index == first_u)[None, :], 0.0, kept)
    kept = jnp.where(jnp.isfinite(kept), kept, 0.0)
    # past the cut the matrix is 0, so the kept block's singular values are the first
    # `steps` of the descending SVD; the rest are 0, whose right vectors give node 0 its
    # weight even where a kept 0 and the cut-off zeros mix
    P, sv, Yt = jnp.linalg.svd(kept)
    Y = Yt.T
    left_last = P[jnp.maximum(steps - 1, 0)]
    overlap = jnp.max(  # the kept vectors' largest overlap, measured
        jnp.where(below & keep[:, None] & keep[None, :], jnp.abs(V @ V.T) + jnp.abs(U @ U.T), 0.0)
    )
    overlap = jnp.where(jnp.isfinite(overlap), overlap, tol)
    floor = (eps * np.sqrt(min_dim) + np.sqrt(k) * overlap) * sv[0]
    return Bidiagonal(sv, Y, left_last, residual, dropped, floor, steps, finite)


def require_finite_products(finite: jax.Array, what: str) -> None:
    """Raise ``FloatingPointError`` (outside ``jit``) when a Krylov method met inf or NaN in
    the operator's products: ``fn`` itself is not finite at ``x`` along the probes."""
    if is_traced(finite) or bool(jnp.all(finite)):
        return
    raise FloatingPointError(
        f"{what}: the Jacobian-vector products of fn at x hold inf or NaN (fn or its "
        "derivative is not finite there); check fn(x) and jl.jacobian(fn, x), or use float64"
    )


def extreme_singular_values(
    fn: Callable[[Any], Any], x: Any, key: jax.Array, num_matvecs: int = 64
) -> ExtremeSingularValues:
    """Largest and smallest singular value of ``J = d fn / d x`` by Golub-Kahan-Lanczos
    bidiagonalization (:func:`bidiagonalize`: matfree ``decomp.bidiag``, full
    reorthogonalization, cut at an invariant subspace).

    ``k <= min(num_matvecs, m, n)`` steps give ``J V_k = U_k B_k`` and
    ``J^T U_k = V_k B_k^T + beta_{k+1} v_{k+1} e_k^T``; the singular values ``theta_i`` of
    the small bidiagonal ``B_k`` (Ritz values) lie in the range of ``J``'s. With
    ``B_k = P diag(theta) Q^T``, the residual bound: some singular value of ``J`` lies within
    ``beta_{k+1} |P[k, i]|`` of ``theta_i`` (the last entry of the *left* singular vector;
    ``beta_{k+1}`` is the norm of matfree's residual); the reported error adds the entry
    dropped at an invariant subspace and the rounding floor of :func:`bidiagonalize`. A
    wide ``J`` (``m < n``) is bidiagonalized as ``J^T``, so that the smallest Ritz value
    approaches ``s_min(m, n)`` rather than the zeros of the null space. A zero ``J`` gives
    0 and 0 (condition number ``inf``).

    Returns:
        :class:`ExtremeSingularValues`. Costs ``k`` JVPs and ``k`` VJPs. ``num_matvecs``
        must be an ``int >= 1``; ``x`` real floats (``TypeError`` naming ``x`` otherwise).

    Raises:
        FloatingPointError: the products hold inf or NaN.
    """
    num_matvecs = check_count(num_matvecs, "num_matvecs")
    key = check_key(key)
    op = jacobian_operator(fn, x)
    if op.shape[0] < op.shape[1]:  # wide: the same singular values, without the null space
        op = Operator(op.vecmat, op.matvec, op.shape[::-1], op.dtype)
    v0 = jax.random.normal(key, (op.shape[1],), op.dtype)
    bd = bidiagonalize(op, v0, num_matvecs)
    require_finite_products(bd.finite, "extreme_singular_values")
    bound = bd.residual * jnp.abs(bd.left_last) + bd.dropped + bd.floor
    last = jnp.maximum(bd.steps - 1, 0)
    cast = lambda a: a.astype(op.dtype)  # noqa: E731
    largest = Estimate(cast(bd.singular_values[0]), cast(bound[0]))
    smallest = Estimate(cast(bd.singular_values[last]), cast(bound[last]))
    s_min = bd.singular_values[last]
    cond = jnp.where(s_min > 0, bd.singular_values[0] / jnp.where(s_min > 0, s_min, 1), jnp.inf)
    return ExtremeSingularValues(largest, smallest, cast(cond), bd.steps)


class SLQ(NamedTuple):
    """Stochastic Lanczos quadrature of the spectral measure of ``J^T J``.

    The measure ``(1/n) sum_i delta(lambda_i)`` over the ``n`` eigenvalues of ``J^T J``
    (squared singular values, with ``n - m`` zeros when ``J`` is wide) is approximated by
    ``(1/P) sum_p sum_j weights[p, j] delta(nodes[p, j])``.

    Fields:
        nodes: ``(P, k)`` Ritz values ``theta^2`` per probe (``(P, k + 1)`` for a wide
            ``J``: the last column is the null space's 0).
        weights: same shape, each row summing to 1; nodes past a probe's kept steps
            (an invariant subspace, see :func:`bidiagonalize`) are 0 with weight 0.
        steps: ``(P,)`` Lanczos steps kept per probe.
    """

    nodes: jax.Array
    weights: jax.Array
    steps: jax.Array | None = None


def slq_spectrum(
    fn: Callable[[Any], Any],
    x: Any,
    key: jax.Array,
    num_probes: int = 16,
    num_matvecs: int = 32,
) -> SLQ:
    """Stochastic Lanczos quadrature for the squared singular values of ``J = d fn / d x``.

    For each Rademacher probe ``v`` (``||v||^2 = n``), ``k`` steps of Golub-Kahan-Lanczos
    (:func:`bidiagonalize`, cut at an invariant subspace) from ``v`` give ``B_k``; with
    ``B_k = U S Y^T`` the nodes are ``S^2`` and the weights ``Y[0, :]^2`` (Gauss quadrature
    for ``v^T g(J^T J) v / n``). A wide ``J`` (``m < n``) is probed from its smaller side:
    ``J J^T`` (``m x m``) has the nonzero eigenvalues of ``J^T J``, which has ``n - m`` more
    zeros, so the measure is ``m / n`` times the quadrature of ``J J^T`` plus an atom
    ``(n - m) / n`` at 0, exactly (no Monte-Carlo error on the null space, and a Krylov
    space of size ``m``).

    Returns:
        :class:`SLQ`. Cost: ``k`` steps, each one batched JVP and VJP over all probes
        (memory ``num_probes * k * (m + n)`` numbers for the Lanczos vectors). Moments
        ``E[lambda^j]`` of the measure are exact for ``j < 2k`` up to the probe's
        Monte-Carlo error, and the whole measure once ``k = min(m, n)``.
        ``num_probes`` and ``num_matvecs`` must be ``int >= 1``.

    Raises:
        FloatingPointError: the products hold inf or NaN.
    """
    num_probes = check_count(num_probes, "num_probes")
    num_matvecs = check_count(num_matvecs, "num_matvecs")
    key = check_key(key)
    op = jacobian_operator(fn, x)
    m, n = op.shape
    if m < n:  # wide: J J^T, then the null space's atom
        op = Operator(op.vecmat, op.matvec, (n, m), op.dtype)
    probes = stochtrace.sampler_signs(jnp.zeros(op.shape[1], op.dtype), num=num_probes)(key)

    def one(v):
        bd = bidiagonalize(op, v, num_matvecs)
        return bd.singular_values**2, bd.right[0, :] ** 2, bd.steps, bd.finite

    nodes, weights, steps, finite = jax.vmap(one)(probes)  # one product serves all probes
    require_finite_products(finite, "slq_spectrum")
    if m < n:
        nodes = jnp.concatenate([nodes, jnp.zeros((num_probes, 1), nodes.dtype)], axis=1)
        weights = jnp.concatenate(
            [weights * (m / n), jnp.full((num_probes, 1), (n - m) / n, weights.dtype)], axis=1
        )
    return SLQ(nodes.astype(op.dtype), weights.astype(op.dtype), steps)
