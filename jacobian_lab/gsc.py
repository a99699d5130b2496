"""The quadratic-mean norm and the gradient scale coefficient (GSC).

Definitions (Philipp, Song & Carbonell, "The exploding gradient problem demystified",
arXiv 1712.05577, Section 3):

* qm norm of a ``d_out x d_in`` matrix ``A``: the quadratic mean of its singular values
  taken over the input dimension, ``||A||_qm = sqrt(sum_i s_i^2 / d_in) = ||A||_F /
  sqrt(d_in)``. Equivalently ``||A||_qm^2 = E_u ||A u||^2`` for ``u`` uniform on the unit
  sphere of R^{d_in}, which is why the input dimension is the divisor.
* ``GSC(k, l) = ||J_k^l||_qm * ||f_k||_2 / ||f_l||_2`` with ``J_k^l = d f_l / d f_k`` and
  ``k >= l`` (layer ``k`` below layer ``l``; layer 0 is the output). It is the relative
  change of ``f_l`` per relative change of ``f_k`` under a small perturbation of ``f_k``
  in a random direction, so it does not depend on the widths or on rescaling a layer.
* Gradients *explode* with rate ``r > 1`` and intercept ``c`` when
  ``GSC(k, l) >= c * r^(k - l)``; :func:`growth_rate` fits ``r`` and ``c``.

The GSC is a per-input quantity; the functions here return it per sample (see
:mod:`jacobian_lab.model` for what a sample is) and leave averaging to the caller.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jacobian_lab.checks import check_key, is_traced, memory_checked
from jacobian_lab.driver import (
    check_finite,
    check_lengths,
    finite_layers,
    layer_sizes,
    log_lengths,
    log_norm,
    output_sizes,
    over_trace,
    per_layer,
    prepare,
    scan_down,
)
from jacobian_lab.layered import accumulate
from jacobian_lab.matrix_free import (
    DEFAULT_MEMORY_BUDGET,
    MIN_PROBES_FOR_ERROR,
    Estimate,
    check_count,
    choose_method,
    probe_dof,
)
from jacobian_lab.model import Model, Params, apply_unit, forward, walk
from jacobian_lab.sharding import map_over_devices


def qm_norm(A: jax.Array) -> jax.Array:
    """Quadratic-mean norm ``||A||_F / sqrt(d_in)`` of ``A`` with shape ``(..., d_out, d_in)``.

    Returns an array of the batch shape ``(...)``.
    """
    if A.ndim < 2:
        raise ValueError(f"qm_norm needs a matrix (..., d_out, d_in), got shape {A.shape}")
    return jnp.exp(log_norm(A, axis=(-2, -1)) - 0.5 * jnp.log(A.shape[-1]))


def gradient_scale(J: jax.Array, f_k: jax.Array, f_l: jax.Array) -> jax.Array:
    """GSC of one Jacobian: ``||J||_qm * ||f_k|| / ||f_l||``.

    Use it for any callable: with ``f_l = fn(f_k)`` and ``J = jacobian(fn, f_k)``
    (shape ``(d_l, d_k)``), this is GSC(k, l) of ``fn`` at ``f_k``. Batched over leading
    axes of ``J``; ``f_k`` and ``f_l`` are flattened over their trailing axes to match.
    """
    batch = J.shape[:-2]
    lk = log_norm(jnp.reshape(f_k, (*batch, -1)))
    ll = log_norm(jnp.reshape(f_l, (*batch, -1)))
    return jnp.exp(log_norm(J, axis=(-2, -1)) - 0.5 * jnp.log(J.shape[-1]) + lk - ll)


def _log_gsc(log_fro: jax.Array, sizes, log_len: jax.Array) -> jax.Array:
    """``log GSC(k, 0) = log ||J_k^0||_F - log sqrt(d_k) + log ||f_k|| - log ||f_0||`` from
    logarithms ``(..., L+1)``: finite wherever the factors are, even where ``GSC(k, 0)``
    itself is beyond the dtype's range (``-inf`` for a zero Jacobian product)."""
    log_d = jnp.log(jnp.asarray(sizes, log_fro.dtype))
    return log_fro - 0.5 * log_d + log_len - log_len[..., :1]


def backward_log_norms(jacs: list) -> jax.Array:
    """``log ||d f_0 / d f_k||_F`` for ``k = 0 .. L`` of one sample from its per-segment
    layer Jacobians ``(n, d_out, d_in)`` (forward order), by the running product
    ``G <- G D`` from the output down, rescaled at every step: ``(L+1,)``."""
    d0 = jacs[-1].shape[1]
    log_g = 0.5 * jnp.log(jnp.asarray(d0, jacs[-1].dtype))

    def step(carry, D):  # the product is exp(log_g) * G with ||G||_F = 1 (0 stays 0)
        G = carry[0] @ D
        n = jnp.exp(log_norm(G, axis=(-2, -1)))
        log_g = carry[1] + jnp.log(n)
        return (jnp.where(n > 0, G / jnp.where(n > 0, n, 1), G), log_g), log_g

    G = jnp.eye(d0, dtype=jacs[-1].dtype) / jnp.sqrt(d0)
    return jnp.concatenate([log_g[None], scan_down(step, (G, log_g), jacs)])


_MEM_GSC_DENSE = (
    "gsc(method='dense') keeps every layer's Jacobian for every sample and",
    "use gsc(..., method='matrix_free') or gsc_estimate, which keep no Jacobian, or pass "
    "fewer samples per call",
)


@over_trace(jac=True, memory=_MEM_GSC_DENSE)
def _gsc_dense(model: Model, tr):
    log_fro = jax.vmap(backward_log_norms)([r.jac for r in tr.records])
    log_len = log_lengths(tr)
    return _log_gsc(log_fro, layer_sizes(tr), log_len), finite_layers(tr), log_len


class AutoMethodWarning(UserWarning):
    """``method="auto"`` chose the matrix-free estimator: the value is an estimate, not the
    exact number (the message gives the memory figure that decided it)."""


class UnderflowWarning(RuntimeWarning):
    """A value is zero or below the dtype's range: an underflow or a dead network, not a
    measured gradient scale."""


def check_log_range(
    log_g: jax.Array, model: Model, *, log: bool, call: str = "gsc", name: str = "GSC({k}, 0)"
) -> None:
    """Check a profile of logarithms ``log_g`` ``(..., L+1)`` (entry ``k``: ``name`` with
    ``{k}`` filled in) before it is returned as values (``log=False``) or logarithms:

    * ``-inf`` at some ``k >= 1``: the Jacobian product is exactly zero. Warns
      (:class:`UnderflowWarning`) naming the layer whose Jacobian made it zero;
    * (values only) a finite logarithm whose value is below the smallest normal number of
      the dtype: ``exp`` returns 0 or a denormal (which XLA may flush to 0), an underflow
      of the *result*, not of any layer. Warns saying so, with the logarithm's size and
      ``call(..., log=True)`` as the fix;
    * (values only) a finite logarithm beyond the largest number: ``OverflowError``.

    Nothing under tracing."""
    if is_traced(log_g):
        return
    lg = np.asarray(log_g, np.float64).reshape(-1, log_g.shape[-1])
    zero = np.isneginf(lg[:, 1:]).any(axis=0)
    if zero.any():
        k = int(np.argmax(zero)) + 1
        warnings.warn(
            f"{name.format(k='k')} is exactly 0 for k >= {k}: the Jacobian of "
            f"{model.layer_label(k - 1)} "
            f"with respect to f_{k} is zero or underflowed to zero (saturated units, e.g. "
            "tanh'(x) rounds to 0 for |x| > 9 in float32 and > 19 in float64, or dead ReLUs). "
            "These zeros are not measurements of the gradient scale: try float64 or a smaller "
            "weight scale.",
            UnderflowWarning,
            stacklevel=3,
        )
    if log:
        return
    info = jnp.finfo(log_g.dtype)
    finite = np.isfinite(lg)
    over = finite & (lg > np.log(float(info.max)))
    under = finite & (lg < np.log(float(info.tiny)))
    for bad, where in ((over, "above the largest"), (under, "below the smallest normal")):
        if not bad.any():
            continue
        k = int(np.argmax(bad.any(axis=0)))
        power = lg[:, k][bad[:, k]][0] / np.log(10)
        message = (
            f"{name.format(k=k)} is about 1e{power:.0f}, {where} {info.dtype} number "
            f"({float(info.max if bad is over else info.tiny):.3g}): the value cannot be "
            f"returned in {info.dtype} although every layer is finite; {call}(..., "
            "log=True) returns its logarithm (exact), or measure in float64"
        )
        if bad is over:
            raise OverflowError(message)
        warnings.warn(
            message + "; it comes back as 0 (or a denormal), not a measurement",
            UnderflowWarning,
            stacklevel=3,
        )


def gsc(
    net: Model,
    params: Params,
    x,
    *,
    method: str = "auto",
    key: jax.Array | None = None,
    num_probes: int = 64,
    memory_budget: int | None = None,
    log: bool = False,
) -> jax.Array:
    """GSC from every layer to the output, per sample.

    Args:
        net, params, x: any model (layers of any sizes), its params and inputs, as for
            every diagnostic (:func:`~jacobian_lab.driver.prepare`).
        method: ``"dense"`` (exact, from every layer's Jacobian), ``"matrix_free"``
            (:func:`gsc_estimate`, its point estimate), or ``"auto"``: dense when the
            per-layer Jacobians of all samples fit ``memory_budget`` bytes (default
            :data:`jacobian_lab.matrix_free.DEFAULT_MEMORY_BUDGET`, 1 GiB); when they do
            not, the matrix-free point estimate with one :class:`AutoMethodWarning` that
            gives the memory figure (the return type stays an array: the standard errors
            come from :func:`gsc_estimate`).
        key, num_probes: for the matrix-free method (default key ``PRNGKey(0)``); use
            :func:`gsc_estimate` for the standard errors.
        log: return ``log GSC(k, 0)`` instead, finite wherever the GSC itself is beyond
            the dtype's range (it is computed in logs throughout).

    Returns:
        ``(S, L+1)`` array ``g`` with ``g[s, k] = GSC(k, 0)`` at sample ``s``, for
        ``k = 0`` (the output; always 1) up to ``k = L`` (the input), in the GSC paper's
        indexing. ``S = B`` for per-example networks, the number of batches for batch norm.

    Raises:
        MemoryError: the dense method's Jacobians cannot fit in the device's memory
            (before anything is allocated; use ``method="matrix_free"``).
        OverflowError: with ``log=False``, a GSC beyond the dtype's range.
    Warns :class:`UnderflowWarning` naming the layer when a Jacobian product is exactly
    zero, and saying so when a GSC is below the dtype's range (:func:`check_log_range`).

    Cost (dense): one forward pass with per-layer Jacobians plus ``L`` matrix products per
    sample, memory ``S * L * d^2`` numbers. Matrix-free: ``num_probes`` backward passes.
    """
    xs = prepare(net, params, x)
    nbytes = dense_gsc_bytes(net, params, xs)
    if choose_method(method, nbytes, memory_budget) != "dense":
        if method == "auto":
            budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
            warnings.warn(
                f"gsc(method='auto') returns a matrix-free estimate: the dense per-layer "
                f"Jacobians would need {nbytes / 2**30:.3g} GiB, more than the memory budget "
                f"of {budget / 2**30:.3g} GiB. It is the mean of {num_probes} probes, without "
                "its standard errors: jl.gsc_estimate gives them; method='dense' or a larger "
                "memory_budget computes the exact values",
                AutoMethodWarning,
                stacklevel=2,
            )
        key = jax.random.PRNGKey(0) if key is None else check_key(key)
        log_q, _, log_len = _gsc_probes(net, params, xs, key, check_count(num_probes, "num_probes"))
        check_finite(_estimate_finite(log_q, log_len), net)
        log_g = _log_gsc(0.5 * log_q, gsc_sizes(net, params, xs), log_len)
    else:
        log_g, ok, log_len = _gsc_dense(net, params, xs)
        check_finite(ok, net)
    check_lengths(log_len, net)
    check_log_range(log_g, net, log=log)
    return log_g if log else jnp.exp(log_g)


_MEM_LOG_GRADIENT_NORMS = (
    "gradient_norm(method='dense') keeps every layer's Jacobian for every sample and",
    "use gradient_norm(..., method='matrix_free'), which keeps no Jacobian, or pass fewer "
    "samples per call",
)


@over_trace(jac=True, memory=_MEM_LOG_GRADIENT_NORMS)
def _log_gradient_norms(model: Model, tr):
    log_fro = jax.vmap(backward_log_norms)([r.jac for r in tr.records])
    return log_fro - 0.5 * jnp.log(1.0 * layer_sizes(tr)[0]), finite_layers(tr)


def gradient_norm(
    net: Model,
    params: Params,
    x,
    *,
    log: bool = False,
    method: str = "auto",
    key: jax.Array | None = None,
    num_probes: int = 64,
    memory_budget: int | None = None,
) -> jax.Array:
    """The raw size of the backpropagated gradient at every layer, per sample:
    ``||J_k^0||_F / sqrt(d_0)``, the root mean square of ``||J_k^0^T u||`` over ``u``
    uniform on the unit sphere of the output space (``d_0`` its size), since
    ``E_u ||J^T u||^2 = ||J||_F^2 / d_0``.

    This is the gradient that reaches ``f_k`` when the loss sends a random unit gradient
    into the output: the quantity of the vanishing-gradient discussions. Unlike the GSC
    (Philipp et al., arXiv 1712.05577, Section 3) it is not scale-free: rescaling ``f_k``
    rescales it, while ``GSC(k, 0) = gradient_norm_k * sqrt(d_0 / d_k) * ||f_k|| / ||f_0||``
    does not change. So a gradient can vanish in this norm while the GSC grows, when the
    layer outputs shrink towards the output faster (e.g. tanh with ``sigma_w = 1``).

    Args:
        net, params, x: as in :func:`gsc` (any model).
        log: return the natural log instead, finite wherever the norm itself would
            overflow or underflow the dtype (it is carried in logs throughout).
        method, key, num_probes, memory_budget: as in :func:`gsc`: ``"dense"`` from every
            layer's Jacobian (memory ``S * L * d^2`` numbers), ``"matrix_free"`` from
            ``num_probes`` backward passes (Hutchinson: ``E ||J_k^0^T u||^2 =
            ||J_k^0||_F^2`` over Rademacher ``u``, every layer from one pass per probe, as
            :func:`gsc_estimate`), ``"auto"`` dense within the memory budget.

    Returns:
        ``(S, L+1)``; ``[s, k]`` for ``k = 0`` (the output, always 1) up to ``k = L`` (the
        input), GSC-paper indexing.

    Raises:
        FloatingPointError: a layer's output or Jacobian is not finite (names the layer).
        MemoryError: the dense method's Jacobians cannot fit (before anything is
            allocated; use ``method="matrix_free"``).
        OverflowError: with ``log=False``, a norm beyond the dtype's range (use ``log=True``).
    Warns :class:`UnderflowWarning` when a norm is exactly zero (dead or saturated units),
    or, with ``log=False``, is below the dtype's range (:func:`check_log_range`).
    """
    xs = prepare(net, params, x)
    if choose_method(method, dense_gsc_bytes(net, params, xs), memory_budget) != "dense":
        key = jax.random.PRNGKey(0) if key is None else check_key(key)
        log_q, _, log_len = _gsc_probes(net, params, xs, key, check_count(num_probes, "num_probes"))
        check_finite(_estimate_finite(log_q, log_len), net)
        log_g = 0.5 * log_q - 0.5 * jnp.log(1.0 * gsc_sizes(net, params, xs)[0])
    else:
        log_g, ok = _log_gradient_norms(net, params, xs)
        check_finite(ok, net)
    check_log_range(log_g, net, log=log, call="gradient_norm", name="the gradient norm at f_{k}")
    return log_g if log else jnp.exp(log_g)


def gsc_sizes(model: Model, params: Params, xs) -> list[int]:
    """Flat sizes ``d_0 .. d_L`` of ``f_0 .. f_L`` (GSC order): the qm norms' divisors."""
    sizes = output_sizes(model, params, xs)
    return [o for _, o in sizes][::-1] + [sizes[0][0]]


def dense_gsc_bytes(model: Model, params: Params, xs) -> int:
    """Memory of the dense GSC: every layer's Jacobian and the running product
    ``d f_0 / d f_k``, for all samples, twice over for the forward-mode intermediates."""
    sizes = output_sizes(model, params, xs)
    layer_jacobians = sum(i * o for i, o in sizes)
    running = sizes[-1][1] * max(i for i, _ in sizes)
    leaf = jax.tree_util.tree_leaves(xs)[0]
    return 2 * leaf.shape[0] * jnp.dtype(leaf.dtype).itemsize * (layer_jacobians + running)


@jax.custom_vjp
def _rescale_tap(h, s):
    """The identity on ``h``; backwards it divides the incoming cotangent by its norm and
    returns the log of that norm as the cotangent of the scalar ``s``, so that one backward
    pass measures every layer's gradient norm without overflow or underflow."""
    del s
    return h


def _rescale_fwd(h, s):
    return h, jnp.zeros((), s.dtype)


def _rescale_bwd(zero, g):
    leaves = jax.tree_util.tree_leaves(g)
    m = jnp.max(jnp.stack([jnp.max(jnp.abs(a)) for a in leaves]))
    safe = jnp.where(m > 0, m, 1)
    log_n = jnp.log(safe) + 0.5 * jnp.log(sum(jnp.sum((a / safe) ** 2) for a in leaves))
    n = jnp.exp(log_n)
    g = jax.tree_util.tree_map(lambda a: a / jnp.where(n > 0, n, 1).astype(a.dtype), g)
    return g, (log_n + zero).astype(zero.dtype)


_rescale_tap.defvjp(_rescale_fwd, _rescale_bwd)


def _probe_log_norms(model: Model, params: Params, x, key, num_probes: int):
    """For one sample: ``log ||J_k^0^T u||`` per probe ``u`` and layer ``k = 0 .. L``
    ``(P, L+1)`` and ``log ||f_k||`` ``(L+1,)``, from one backward pass per probe (the
    cotangent rescaled at every layer by :func:`_rescale_tap`)."""

    def tap(unit, p, h, s):
        return (lambda out: (out, out))(_rescale_tap(apply_unit(unit, p, h), s))

    segments = jax.eval_shape(lambda v: forward(model, params, v)[1], x)
    firsts = [jax.tree_util.tree_leaves(seg)[0] for seg in segments]
    s0 = [jnp.zeros(a.shape[:1], a.dtype) for a in firsts]
    (out, outs), vjp = jax.vjp(lambda v, s: walk(model, params, v, tap, s), x, s0)
    treedef = jax.tree_util.tree_structure(out)  # a chain's output may be a pytree
    keys = treedef.unflatten(list(jax.random.split(key, treedef.num_leaves)))
    draw = lambda k, v: jax.random.rademacher(k, (num_probes, *v.shape), v.dtype)  # noqa: E731
    probes = jax.tree_util.tree_map(draw, keys, out)
    zero_outs = jax.tree_util.tree_map(jnp.zeros_like, outs)
    g_x, log_steps = jax.vmap(lambda u: vjp((u, zero_outs)))(probes)
    steps = jnp.concatenate(log_steps, axis=-1)[:, ::-1]  # (P, L), from the output down
    log_fro = jnp.cumsum(steps, axis=-1)
    log_x = log_fro[:, -1] + jax.vmap(lambda g: log_norm(ravel_pytree(g)[0]))(g_x)
    hidden = [log_norm(jax.vmap(lambda o: ravel_pytree(o)[0])(seg)) for seg in outs]
    log_len = jnp.concatenate([jnp.concatenate(hidden)[::-1], log_norm(ravel_pytree(x)[0])[None]])
    return jnp.concatenate([log_fro, log_x[:, None]], axis=1), log_len


@memory_checked(
    "the matrix-free GSC keeps num_probes copies of every layer's output per sample and",
    "use fewer num_probes or pass fewer samples per call",
    static_argnums=(0, 4),
)
def _gsc_probes(model: Model, params: Params, xs, key, num_probes: int):
    """Per sample and layer: ``log Q`` with ``Q`` the mean of ``||J_k^0^T u||^2`` over the
    probes, the relative standard error ``se(Q) / Q`` (``ddof=1``; ``inf`` for one probe)
    and ``log ||f_k||``; all from probe norms kept in logs, so nothing overflows."""

    num_probes = check_count(num_probes, "num_probes")
    keys = jax.random.split(key, jax.tree_util.tree_leaves(xs)[0].shape[0])
    log_n, log_len = jax.vmap(lambda x, k: _probe_log_norms(model, params, x, k, num_probes))(
        xs, keys
    )
    top = jnp.max(2 * log_n, axis=1, keepdims=True)  # (S, 1, L+1)
    live = jnp.isfinite(top)
    w = jnp.where(live, jnp.exp(2 * log_n - jnp.where(live, top, 0)), 0.0)  # in [0, 1]
    mean = w.mean(1)
    log_q = jnp.where(live[:, 0], top[:, 0] + jnp.log(mean), top[:, 0])
    if num_probes == 1:
        return log_q, jnp.full_like(mean, jnp.inf), log_len
    se = w.std(1, ddof=1) / jnp.sqrt(num_probes)
    return log_q, jnp.where(mean > 0, se / jnp.where(mean > 0, mean, 1), 0.0), log_len


def _estimate_finite(log_q: jax.Array, log_len: jax.Array) -> jax.Array:
    """``(L,)`` per-layer finiteness (GSC order, as :func:`~jacobian_lab.driver.finite_layers`)
    for the matrix-free pass: a layer whose output went non-finite in the forward pass;
    else, the layer whose Jacobian first made the backward pass non-finite, counted from
    the output (everything below it inherits the NaN, so only the first counts)."""
    ok = jnp.all(~jnp.isnan(log_len[:, :-1]) & (log_len[:, :-1] < jnp.inf), axis=0)
    bad_back = ~jnp.all(~jnp.isnan(log_q) & (log_q < jnp.inf), axis=0)  # g_k = J^T g_{k-1}
    if is_traced(log_q) or not bool(jnp.all(ok)) or not bool(jnp.any(bad_back)):
        return ok
    k = int(jnp.argmax(bad_back))  # g_{k-1} finite, g_k not: the layer making f_{k-1}
    return ok.at[k - 1].set(False)


def gsc_estimate(net: Model, params: Params, x, key: jax.Array, num_probes: int = 64) -> Estimate:
    """Matrix-free GSC from every layer to the output, with standard errors.

    Hutchinson's estimator on the transposed Jacobians, all layers from one backward
    pass per probe: for a Rademacher ``u`` at the output, a backward pass gives
    ``J_k^0^T u`` at every layer ``k`` at once, and ``E ||J_k^0^T u||^2 = ||J_k^0||_F^2``.
    So ``num_probes`` backward passes estimate every ``||J_k^0||_qm^2``; then
    ``GSC(k, 0) = ||J_k^0||_qm ||f_k|| / ||f_0||``. (matfree's estimators take one operator
    at a time; here one probe serves all ``L`` operators, which is ``L`` times cheaper.)

    Args:
        net, params, x: as in :func:`gsc` (any model).
        key: PRNG key for the probes (each sample gets its own).
        num_probes: backward passes per sample, an ``int >= 1``; fewer than
            :data:`~jacobian_lab.matrix_free.MIN_PROBES_FOR_ERROR` (3) give a point
            estimate with error ``inf`` (one probe has no spread; intervals from two miss
            too often).

    Returns:
        :class:`~jacobian_lab.matrix_free.Estimate` with fields ``(S, L+1)``: the GSC, its
        standard error (delta method from the probes' spread, ``ddof=1``: ``se(GSC) = GSC
        se(Q) / (2 Q)`` with ``Q`` the squared Frobenius norm), degrees of freedom
        (:func:`~jacobian_lab.matrix_free.probe_dof`) and ``log_scale``:
        ``interval(level)`` is the Student-t interval for ``log Q`` mapped through the
        square root (95%: 95-96% coverage of the dense GSC at 3 to 32 probes, pooled over
        layers, 91.5-95% for the worst layer; see
        :class:`~jacobian_lab.matrix_free.Estimate`). ``GSC(0, 0) = 1`` with
        error 0. With few outputs (``d_0 <= 6``) the Rademacher probes take few distinct
        values and a handful of them can agree by chance, giving a too-short interval.
        Memory: ``num_probes`` copies of every layer's output per sample, never a
        Jacobian.
    """

    num_probes = check_count(num_probes, "num_probes")
    key = check_key(key)
    xs = prepare(net, params, x)
    log_q, rel, log_len = _gsc_probes(net, params, xs, key, num_probes)
    sizes = gsc_sizes(net, params, xs)
    check_finite(_estimate_finite(log_q, log_len), net)
    check_lengths(log_len, net)
    log_g = _log_gsc(0.5 * log_q, sizes, log_len)
    check_log_range(log_g, net, log=False, call="gsc")
    value = jnp.exp(log_g)
    if num_probes < MIN_PROBES_FOR_ERROR:
        rel = jnp.full_like(rel, jnp.inf)
    rel = rel.at[:, 0].set(0.0)  # GSC(0, 0) = 1 exactly
    error = jnp.where(jnp.isinf(rel), jnp.inf, value * rel / 2)
    return Estimate(value, error, probe_dof(rel, num_probes), jnp.full(value.shape, True))


_MEM_GSC_MATRIX = (
    "gsc_matrix keeps every layer's Jacobian and the products below each layer and",
    "pass fewer samples per call; gsc(..., method='matrix_free') gives GSC(k, 0) without "
    "Jacobians (GSC(k, l) for every pair has no matrix-free form here)",
)


@over_trace(jac=True, memory=_MEM_GSC_MATRIX)
def _gsc_matrix(model: Model, tr):
    L = model.num_layers
    sizes = layer_sizes(tr)

    def one(jacs):
        def emit(log_in, log_stacks):  # log ||d h / d f_p||_F over p = x, layer 0 .. L-1
            row = jnp.concatenate([log_in[None], *log_stacks])
            return jnp.concatenate([row, jnp.full(L + 1 - row.shape[0], -jnp.inf, row.dtype)])

        rows = accumulate(list(jacs), emit, rescale=True)  # (L, L+1): forward q, forward p
        first = jnp.full((1, L + 1), -jnp.inf, rows.dtype)
        first = first.at[0, 0].set(0.5 * jnp.log(1.0 * sizes[-1]))  # ||I||_F of the input
        return jnp.concatenate([first, rows])[::-1, ::-1]  # [l, k], GSC-paper order

    log_fro = jax.vmap(one)([r.jac for r in tr.records])  # (S, l, k)
    log_len = log_lengths(tr)
    log_d = jnp.log(jnp.asarray(sizes, log_fro.dtype))
    log_g = log_fro - 0.5 * log_d + log_len[:, None, :] - log_len[:, :, None]
    k_idx = jnp.arange(L + 1)
    log_g = jnp.where(k_idx[None, :] >= k_idx[:, None], log_g, jnp.nan)
    in_range = jnp.all(jnp.isfinite(log_fro) | (log_fro == -jnp.inf))  # -inf: a zero product
    return jnp.swapaxes(log_g, 1, 2), finite_layers(tr), log_len, in_range


def gsc_matrix(net: Model, params: Params, x, *, log: bool = False) -> jax.Array:
    """GSC(k, l) for every pair of layers, per sample, from one pass.

    Row ``k`` is the layer perturbed, column ``l`` the layer observed. Column ``l`` is the
    GSC profile of the prefix network whose output is ``f_l``, so one call gives the GSC
    from every layer to the output for every depth of the network. Layers may have any
    sizes.

    Returns:
        ``(S, L+1, L+1)`` array ``G`` with ``G[s, k, l] = GSC(k, l)`` for ``k >= l``
        (1 on the diagonal) and NaN for ``k < l``; GSC-paper indexing (0 = output,
        ``L`` = input). With ``log=True``, ``log GSC(k, l)`` (finite where the GSC is
        beyond the dtype's range; see :func:`gsc`).

    Cost: ``O(L^2 d^3)`` per sample and ``O(L d^2)`` memory (only norms are kept).
    """
    log_g, ok, log_len, in_range = _gsc_matrix(net, params, prepare(net, params, x))
    check_finite(ok, net)
    check_lengths(log_len, net)
    if not is_traced(in_range) and not bool(in_range):
        raise FloatingPointError(
            "gsc_matrix: a product of layer Jacobians left the float range within one layer "
            "(a single layer's Jacobian norm beyond about 1e19 in float32); use "
            "dtype='float64'"
        )
    # every column l is the profile of a prefix network: rows k as its last axis
    check_log_range(jnp.swapaxes(log_g, 1, 2), net, log=log, call="gsc_matrix", name="GSC({k}, l)")
    return log_g if log else jnp.exp(log_g)


_MEM_LAYER_GSC = (
    "layer_gsc keeps every layer's Jacobian for every sample and",
    "pass fewer samples per call",
)


@over_trace(jac=True, memory=_MEM_LAYER_GSC)
def _layer_log_gsc(model: Model, tr):
    log_q = per_layer(
        [log_norm(r.jac, axis=(-2, -1)) - 0.5 * jnp.log(1.0 * r.jac.shape[-1]) for r in tr.records]
    )
    log_len = log_lengths(tr)
    return log_q + log_len[:, 1:] - log_len[:, :-1], finite_layers(tr), log_len


def layer_gsc(net: Model, params: Params, x, *, log: bool = False) -> jax.Array:
    """The GSC across each single layer, ``GSC(l+1, l) = qm(J_l) ||f_{l+1}|| / ||f_l||``
    (Philipp et al., arXiv 1712.05577, Definition 1, for adjacent layers), per sample.

    The diagonal ``G[:, l+1, l]`` of :func:`gsc_matrix` at ``O(L d^2)`` cost instead of
    ``O(L^2 d^3)``: one Jacobian per layer and no products.

    Returns:
        ``(S, L)``; ``[s, l]`` for the layer whose output is ``f_l`` (``l = 0`` the last
        layer), GSC-paper indexing. With ``log=True``, the natural log.

    Raises:
        FloatingPointError: a layer's output or Jacobian is not finite (names the layer).
        MemoryError: the layers' Jacobians cannot fit (before anything is allocated).
        OverflowError: with ``log=False``, a value beyond the dtype's range.
    Warns :class:`UnderflowWarning` where a layer's Jacobian is exactly zero (saturated or
    dead units), naming the first such layer, or (values) below the dtype's range.
    """
    log_g, ok, log_len = _layer_log_gsc(net, params, prepare(net, params, x))
    check_finite(ok, net)
    check_lengths(log_len, net)
    # column k = l + 1 holds layer l, as a profile's column k holds GSC(k, 0)
    padded = jnp.concatenate([jnp.zeros_like(log_g[:, :1]), log_g], axis=1)
    check_log_range(padded, net, log=log, call="layer_gsc", name="GSC(l+1, l) at l+1 = {k}")
    return log_g if log else jnp.exp(log_g)


class GrowthRate(NamedTuple):
    """Exponential growth of the GSC with distance, ``GSC(k, 0) ~ c * r^k``.

    Fields (batch shape of the input):
        rate: r, fitted by least squares of ``log GSC(k, 0)`` on ``k``.
        intercept: c of that fit.
        endpoint_rate: ``GSC(L, 0)^(1/L)``, the geometric-mean ratio per layer from the
            input to the output.
    """

    rate: jax.Array
    intercept: jax.Array
    endpoint_rate: jax.Array


def growth_rate(g: jax.Array, *, log: bool = False) -> GrowthRate:
    """Per-layer growth rate of a GSC profile ``g`` of shape ``(..., L+1)``, ``g[..., k] =
    GSC(k, 0)`` (as from :func:`gsc`; average over samples first if you want one number).
    With ``log=True``, ``g`` holds ``log GSC(k, 0)`` (as from ``gsc(..., log=True)``, finite
    where the GSC is beyond the dtype's range) and the fields are still rates, not logs.

    Gradients explode (Definition in Section 3 of arXiv 1712.05577) when the rate is above 1.
    """
    g = jnp.asarray(g)  # a float64 numpy profile is float32 unless x64 is on
    L = g.shape[-1] - 1
    if L < 1:
        raise ValueError("growth_rate needs GSC values for at least two layers")
    if log:
        if not is_traced(g) and not bool(jnp.all(jnp.isfinite(g))):
            k = int(np.argmax(~np.isfinite(np.asarray(g).reshape(-1, L + 1)).any(axis=0)))
            raise ValueError(
                f"growth_rate(log=True) needs finite log GSC(k, 0), but log GSC({k}, 0) is "
                "not: -inf is an exactly zero Jacobian product (gsc warns with the layer), NaN "
                "a failed measurement; fit the layers before it"
            )
    elif not is_traced(g) and not bool(jnp.all((g > 0) & jnp.isfinite(g))):
        bad = ~(np.asarray(g).reshape(-1, L + 1) > 0)  # zero, negative or NaN
        bad |= ~np.isfinite(np.asarray(g).reshape(-1, L + 1))  # or beyond the dtype's range
        k = int(np.argmax(bad.any(axis=0)))
        raise ValueError(
            f"growth_rate fits log GSC(k, 0) and needs positive finite values, but GSC({k}, 0) "
            f"is {float(np.asarray(g).reshape(-1, L + 1)[:, k][bad[:, k]][0])}: exact zeros "
            "come from an underflowed or dead Jacobian (gsc warns with the layer), NaN from a "
            "failed measurement, inf from a value beyond the dtype (float32 unless x64 is on); "
            "fit the layers before it, or measure in float64"
        )
    k = jnp.arange(L + 1, dtype=g.dtype)
    y = g if log else jnp.log(g)
    k_c = k - k.mean()
    slope = jnp.sum(k_c * (y - y.mean(axis=-1, keepdims=True)), axis=-1) / jnp.sum(k_c**2)
    intercept = y.mean(axis=-1) - slope * k.mean()
    endpoint = jnp.exp(y[..., -1] / L) if log else g[..., -1] ** (1.0 / L)
    return GrowthRate(jnp.exp(slope), jnp.exp(intercept), endpoint)


def stacked_draws(init, keys) -> Params:
    """``init(k)`` for each key, stacked on a leading seed axis: the params of a seed
    sweep. Drawn one key at a time (init compiles once): a batched draw, ``vmap(init)``,
    makes XLA's compile of the looks-linear initializer's batched QR hang on CPU."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[init(k) for k in keys])


def check_keys(keys) -> None:
    """Raise ``TypeError`` unless ``keys`` is a stack of PRNG keys, one per seed."""
    typed = hasattr(keys, "dtype") and jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    raw = hasattr(keys, "dtype") and keys.dtype == jnp.uint32 and jnp.ndim(keys) == 2
    if not ((typed and jnp.ndim(keys) == 1) or raw):
        got = (
            f"{type(keys).__name__} of shape {keys.shape}" if hasattr(keys, "shape") else repr(keys)
        )
        raise TypeError(
            f"keys must be PRNG keys with a leading seed axis, e.g. "
            f"jax.random.split(jax.random.PRNGKey(0), n_seeds); got {got}"
        )


def gsc_over_seeds(
    net: Model,
    keys: jax.Array,
    x,
    *,
    init: Callable[[jax.Array], Params] | None = None,
    devices: Sequence[jax.Device] | None = None,
    method: str = "auto",
    key: jax.Array | None = None,
    num_probes: int = 64,
    memory_budget: int | None = None,
) -> jax.Array:
    """:func:`gsc` for one model initialized with each of several PRNG keys.

    Args:
        net: the model.
        keys: ``(n_seeds, ...)`` PRNG keys, e.g. ``jax.random.split(key, n_seeds)``.
        x: inputs, shared by every seed (as in :func:`gsc`).
        init: ``key -> params`` for the model (default ``net.init``; a brought model
            passes the function that builds its params from a key, e.g.
            ``lambda k: jl.chain(make_model(k))[1]``).
        devices: devices the seeds are sharded over (default: all local devices; see
            :func:`jacobian_lab.sharding.map_over_devices`).
        method, key, num_probes, memory_budget: as in :func:`gsc` (the budget is per
            seed; the matrix-free probes use ``key``, default ``PRNGKey(0)``).

    Returns:
        ``(n_seeds, S, L+1)``; ``[i, s, k] = GSC(k, 0)`` of seed ``i`` at sample ``s``.
        Seeds run in parallel under ``vmap``, split over the devices; a non-finite result
        is re-run alone to name the layer that went non-finite.
    """
    if init is None:
        if type(net).init is Model.init:
            raise TypeError(
                "gsc_over_seeds draws each seed's params with init(key), and this model has "
                "no initializer: pass init=lambda key: params_for(key) (e.g. the params of "
                "jl.chain(make_model(key)))"
            )
        init = net.init
    check_keys(keys)
    if jnp.shape(keys)[0] == 0:
        raise ValueError(
            "keys holds no seeds (a leading axis of length 0): pass "
            "jax.random.split(jax.random.PRNGKey(0), n_seeds) with n_seeds >= 1"
        )
    # Parameters are drawn outside the sharded program, one seed at a time (stacked_draws).
    params = stacked_draws(init, keys)
    params0 = jax.tree_util.tree_map(lambda a: a[0], params)
    xs = prepare(net, params0, x)
    if choose_method(method, dense_gsc_bytes(net, params0, xs), memory_budget) == "dense":
        g = map_over_devices(lambda p: jnp.exp(_gsc_dense(net, p, xs)[0]), params, devices=devices)
    else:
        sizes = gsc_sizes(net, params0, xs)
        probe_key = jax.random.PRNGKey(0) if key is None else key

        def one(p):
            log_q, _, log_len = _gsc_probes(net, p, xs, probe_key, num_probes)
            return jnp.exp(_log_gsc(0.5 * log_q, sizes, log_len))

        g = map_over_devices(one, params, devices=devices)
    bad = ~jnp.all(jnp.isfinite(g), axis=(1, 2))
    if bool(jnp.any(bad)):
        i = int(jnp.argmax(bad))
        gsc(net, jax.tree_util.tree_map(lambda a: a[i], params), x)  # raises, naming the layer
        raise FloatingPointError(f"the GSC of seed {i} is not finite")
    return g
