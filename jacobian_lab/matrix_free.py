"""Matrix-free Jacobian statistics: the Jacobian as a linear operator, never materialized.

A Jacobian ``J = d fn / d x`` (``m x n`` after flattening, as in
:func:`jacobian_lab.jacobian`) is touched only through products: ``v -> J v`` by
:func:`jax.jvp` and ``u -> J^T u`` by the pullback of one :func:`jax.vjp`. Every estimator
returns its value with an error estimate (:class:`Estimate`).

* :func:`frobenius_norm_sq`: ``||J||_F^2 = tr(J^T J)``, by Hutchinson's estimator
  ``E_v ||J v||^2`` over Rademacher probes (standard error from the spread of the probes)
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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from matfree import decomp, stochtrace

DEFAULT_MEMORY_BUDGET = 2**30
"""Bytes a dense Jacobian method may use before ``method="auto"`` goes matrix-free."""


class Estimate(NamedTuple):
    """A Monte-Carlo or iterative estimate and its error.

    Fields (same shape):
        value: the estimate.
        error: its standard error (Monte-Carlo estimators), or the Lanczos residual
            bound (some singular value lies within it; see
            :class:`ExtremeSingularValues`); 0 for an exact (dense) computation.
    """

    value: jax.Array
    error: jax.Array

    def interval(self, z: float = 1.96) -> tuple[jax.Array, jax.Array]:
        """``(value - z error, value + z error)``: a 95% confidence interval for a standard
        error with the default ``z``; for a Lanczos residual bound use ``z=1`` (an interval
        that surely holds a singular value)."""
        return self.value - z * self.error, self.value + z * self.error


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
    when ``nbytes`` fits ``memory_budget`` (default :data:`DEFAULT_MEMORY_BUDGET`)."""
    if method not in ("auto", "dense", "matrix_free"):
        raise ValueError(f"method must be 'auto', 'dense' or 'matrix_free', got {method!r}")
    if method != "auto":
        return method
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
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
        num_probes: number of Jacobian-vector products.
        method: ``"hutchinson"``: mean of ``||J v||^2`` over Rademacher ``v``, unbiased,
            standard error from the probes' spread (well calibrated). ``"xrownorms"``:
            matfree's leave-one-out XRowNorm estimator, far more accurate when the singular
            values decay, slightly worse when they are flat; its standard error tends to be
            optimistic by 1.3-2.5x. It needs ``num_probes <= n``, and ``3 num_probes < n``
            to be an estimate (otherwise matfree computes ``J`` exactly and reports error 0).

    Returns:
        :class:`Estimate` (scalars). The qm norm is ``sqrt(value / n)``.
    """
    op = jacobian_operator(fn, x)
    like = jnp.zeros(op.shape[1], op.dtype)
    if method == "hutchinson":
        est = stochtrace.estimator_monte_carlo_mean_and_sem(
            stochtrace.monte_carlo_frobeniusnorm_squared(),
            stochtrace.sampler_signs(like, num=num_probes),
        )
    elif method == "xrownorms":
        rows = stochtrace.leave_one_out_xrownorms_squared()
        est = stochtrace.estimator_leave_one_out_mean_and_sem(
            lambda mv, samples, *p: rows(mv, samples, *p).sum(axis=1),
            stochtrace.sampler_normal(like, num=num_probes),
        )
    else:
        raise ValueError(f"method must be 'hutchinson' or 'xrownorms', got {method!r}")
    mean, sem = est(op.matvec, key)
    return Estimate(mean, sem)


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
        :class:`ExtremeSingularValues`. Costs ``k`` JVPs and ``k`` VJPs.
    """
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
        Monte-Carlo error.
    """
    op = jacobian_operator(fn, x)
    probes = stochtrace.sampler_signs(jnp.zeros(op.shape[1], op.dtype), num=num_probes)(key)

    def one(v):
        res, _ = _bidiagonalize(op, v, num_matvecs)
        _, s, Yt = jnp.linalg.svd(res.J_small)
        return s**2, Yt[:, 0] ** 2

    nodes, weights = jax.vmap(one)(probes)  # one product serves all probes per step
    return SLQ(nodes.astype(op.dtype), weights.astype(op.dtype))
