"""Layer-to-layer Jacobians of any :class:`~jacobian_lab.model.Model`.

One forward pass (:func:`jacobian_lab.driver.trace`) yields every layer's output and the
Jacobian of every layer with respect to the layer below it; every J_k^l = df_l / df_k is
then a product of those, accumulated in a second pass rather than by differentiating each
sub-network again.

Indexing and samples as in :mod:`jacobian_lab.model`: ``J_k^l = d f_l / d f_k`` for
``k >= l`` is a ``d_l x d_k`` matrix; a batch-norm model's sample is a whole batch, so
there ``d_l = B * width`` (row-major: index ``b * width + i``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jacobian_lab.checks import is_traced, memory_checked
from jacobian_lab.driver import (
    Trace,
    check_finite,
    finite_layers,
    flat_jacobian,
    over_trace,
    per_layer,
    prepare,
)
from jacobian_lab.model import Model, Params, forward


class LayerJacobians(NamedTuple):
    """Jacobians of each layer with respect to the layer below it, per sample.

    Fields:
        units: ``(S, L-1, d, d)``; ``units[s, l] = d f_l / d f_{l+1}`` for
            ``l = 0 .. L-2`` (``units[s, 0]`` is the last layer's Jacobian).
        stem: ``(S, d, d_in)``; ``d f_{L-1} / d x``, the first layer's.
        outputs: ``(S, L, d)``; the flattened layer outputs ``f_0 .. f_{L-1}``.
        inputs: ``(S, d_in)``; the flattened input ``f_L = x``.

    ``d`` is the largest layer size: a layer of size ``d_l < d`` (a read-out head, a
    ResNet's stages) fills the top-left ``d_l x d_{l+1}`` corner of its Jacobian and the
    first ``d_l`` entries of its output, and the rest is NaN (:meth:`layer` returns each
    layer's own).
    """

    units: jax.Array
    stem: jax.Array
    outputs: jax.Array
    inputs: jax.Array

    def layer(self, l: int) -> jax.Array:
        """``(S, d_l, d_{l+1})``: ``d f_l / d f_{l+1}``, padding removed (``l = L-1``: the
        first layer's, with respect to ``x``)."""
        J = self.stem if l == self.units.shape[1] else self.units[:, l]
        d_in = self.inputs.shape[-1] if l == self.units.shape[1] else _size(self.outputs[:, l + 1])
        return J[:, : _size(self.outputs[:, l]), :d_in]


def _size(v: jax.Array) -> int:
    """How many leading entries of a padded vector ``(S, d)`` are not padding."""
    finite = ~np.all(np.isnan(np.asarray(v)), axis=0)
    return int(finite.nonzero()[0].max()) + 1 if finite.any() else 0


def pad(a: jax.Array, shape: tuple) -> jax.Array:
    """``a`` padded with NaN at the end of its trailing axes to ``shape`` (those axes):
    the stacked form of values of several sizes (NaN: no entry of that layer)."""
    extra = [(0, 0)] * (a.ndim - len(shape)) + [
        (0, n - m) for n, m in zip(shape, a.shape[a.ndim - len(shape) :], strict=True)
    ]
    return jnp.pad(a, extra, constant_values=jnp.nan) if any(e[1] for e in extra) else a


def stacked_jacobians(model: Model, tr: Trace) -> LayerJacobians:
    """The Jacobians of a trace as :class:`LayerJacobians` (layers of several sizes:
    padded with NaN to the largest, see there)."""
    jacs = [r.jac for r in tr.records]  # forward order, (S, n, d_out, d_in)
    stem = jacs[0][:, 0]
    rest = [J for J in (jacs[0][:, 1:], *jacs[1:]) if J.shape[1]]
    d = max([stem.shape[1], *(max(J.shape[2:]) for J in rest)])
    rest = [pad(J, (d, d)) for J in rest]
    units = (
        jnp.concatenate(rest, axis=1)[:, ::-1]
        if rest
        else jnp.zeros((stem.shape[0], 0, d, d), stem.dtype)
    )
    outputs = per_layer([pad(r.out, (d,)) for r in tr.records])
    return LayerJacobians(units, pad(stem, (d, stem.shape[-1])), outputs, tr.x)


_MEM_LAYER_JACOBIANS = (
    "layer_jacobians keeps every layer's Jacobian for every sample and",
    "pass fewer samples per call (gsc(..., method='matrix_free') and jacobian_spectrum("
    "..., method='matrix_free') measure without them)",
)


@over_trace(jac=True, memory=_MEM_LAYER_JACOBIANS)
def _layer_jacobians(model: Model, tr) -> tuple[LayerJacobians, jax.Array]:
    return stacked_jacobians(model, tr), finite_layers(tr)


def layer_jacobians(net: Model, params: Params, x) -> LayerJacobians:
    """Every layer's Jacobian with respect to the layer below it, from one forward pass.

    Args:
        net, params, x: any model, its params and inputs (as for every diagnostic:
            :func:`~jacobian_lab.driver.prepare`); layers of several sizes are padded
            (see :class:`LayerJacobians`).

    Returns:
        :class:`LayerJacobians` (shapes there; ``d`` is the flat size of a layer's value).
        Raises ``FloatingPointError`` naming the first layer (from the input) whose output
        or Jacobian is not finite.
    """
    lj, ok = _layer_jacobians(net, params, prepare(net, params, x))
    check_finite(ok, net)
    return lj


def accumulate(
    jacs: list,
    emit: Callable[[jax.Array, list], object],
    pairs: bool = True,
    rescale: bool = False,
) -> object:
    """Products of layer Jacobians from the input upwards, for one sample.

    Walks the layers from the input keeping ``P_in = d h / d x`` and, with ``pairs``,
    ``P_k = d h / d f_k`` for every layer ``k`` already passed (grouped per segment, so
    layers of different sizes are allowed), where ``h`` is the current layer's output.

    Args:
        jacs: per segment, ``(n, d_out, d_in)`` Jacobians in forward order.
        emit: called at every layer with ``(P_in, stacks)``, ``stacks`` the per-segment
            ``(n_j, d_h, d_j)`` products (zero for layers not yet reached, identity for the
            current one; ``[]`` without ``pairs``). With ``rescale``, every product is kept
            divided by its Frobenius norm, and ``emit`` gets the logarithms of the norms
            instead: a scalar and ``(n_j,)`` arrays (``-inf`` for a zero product), which
            cannot overflow or underflow.

    Returns:
        The emitted values stacked over layers, in forward order.
    """

    def times(D, P, lg, batched):
        P = jnp.einsum("ij,kjl->kil", D, P) if batched else D @ P
        if not rescale:
            return P, lg
        # P had unit norm before this layer, so its squares stay in range unless one
        # layer's Jacobian alone leaves it (then the log is +-inf and the caller's checks
        # report it); cheaper to compile than a max-scaled norm on every step
        sq = jnp.sum(P * P, axis=(-2, -1))
        inv = jnp.where(sq > 0, jax.lax.rsqrt(jnp.where(sq > 0, sq, 1)), 1)
        return P * (inv[:, None, None] if batched else inv), lg + 0.5 * jnp.log(sq)

    def emitted(P_in, below):
        if rescale:
            return emit(P_in[1], [lg for _, lg in below])
        return emit(P_in[0], [P for P, _ in below])

    d_x = jacs[0].shape[-1]
    eye_x = jnp.eye(d_x, dtype=jacs[0].dtype)
    if rescale:  # the identity at unit Frobenius norm, its log norm aside
        P_in = (eye_x / jnp.sqrt(1.0 * d_x), jnp.asarray(0.5 * jnp.log(1.0 * d_x), eye_x.dtype))
    else:
        P_in = (eye_x, None)
    below: list = []
    out_all = []

    def advance(P_in, below, D):
        P_in = times(D, P_in[0], P_in[1], False)
        below = [times(D, P, lg, True) for P, lg in below]
        return P_in, below

    def fresh(n, d, dtype):
        own = jnp.zeros((n, d, d), dtype)
        lg = jnp.full((n,), -jnp.inf, dtype) if rescale else None
        return own, lg

    for J in jacs:
        n, d = J.shape[0], J.shape[1]
        eye = jnp.eye(d, dtype=J.dtype)
        log_eye = 0.5 * jnp.log(1.0 * d)

        def set_current(own, lg, j, eye=eye, d=d, log_eye=log_eye):
            if rescale:
                return own.at[j].set(eye / jnp.sqrt(1.0 * d)), lg.at[j].set(log_eye)
            return own.at[j].set(eye), lg

        if n == 1 or J.shape[1] != J.shape[2]:  # a single (maybe size-changing) layer
            P_in, below = advance(P_in, below, J[0])
            own = set_current(*fresh(1, d, J.dtype), 0) if pairs else None
            out = emitted(P_in, [*below, own] if pairs else [])
            out = jax.tree_util.tree_map(lambda a: a[None], out)
        else:

            def step(carry, inp, set_current=set_current):
                P_in, below, own = carry
                D, j = inp
                P_in, below = advance(P_in, below, D)
                if own is not None:  # the earlier layers of this segment, then this one
                    own = set_current(*times(D, *own, True), j)
                return (P_in, below, own), emitted(P_in, [*below, own] if pairs else [])

            own = fresh(n, d, J.dtype) if pairs else None
            (P_in, below, own), out = jax.lax.scan(step, (P_in, below, own), (J, jnp.arange(n)))
        below = [*below, own] if pairs else []
        out_all.append(out)
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *out_all)


class PairJacobians(NamedTuple):
    """All layer-to-layer Jacobians J_k^l = d f_l / d f_k, per sample (paper indexing).

    Fields:
        hidden: ``(S, L, L, d, d)``; ``hidden[s, l, k] = d f_l / d f_k`` for
            ``0 <= l <= k <= L-1`` (identity on the diagonal, zero for ``k < l``).
        from_input: ``(S, L, d, d_in)``; ``from_input[s, l] = d f_l / d x``.

    Layers of several sizes: ``d`` is the largest, and each Jacobian fills the top-left
    ``d_l x d_k`` corner, NaN elsewhere (as :class:`LayerJacobians`).
    """

    hidden: jax.Array
    from_input: jax.Array


_MEM_PAIR_JACOBIANS = (
    "layer_to_layer_jacobians keeps every layer-to-layer Jacobian (S L^2 d^2 numbers) and",
    "use gsc_matrix (norms only), or fewer samples or layers",
)


@over_trace(jac=True, memory=_MEM_PAIR_JACOBIANS)
def _pair_jacobians(model: Model, tr):
    L = model.num_layers
    d = max(max(r.jac.shape[2:]) for r in tr.records)
    d_in = tr.x.shape[-1]

    def one(jacs):
        def emit(P_in, stacks):  # d h / d f_k for every layer k, zero above h
            P = jnp.concatenate([pad(a, (d, d)) for a in stacks])
            zero = jnp.zeros((L - P.shape[0], *P.shape[1:]), P.dtype)
            return jnp.concatenate([P, zero]), pad(P_in, (d, d_in))

        P, P_in = accumulate(list(jacs), emit)  # (L, L, d, d) forward, (L, d, d_in)
        return P[::-1, ::-1], P_in[::-1]

    return PairJacobians(*jax.vmap(one)([r.jac for r in tr.records])), finite_layers(tr)


def layer_to_layer_jacobians(net: Model, params: Params, x) -> PairJacobians:
    """Every layer-to-layer Jacobian J_k^l of ``net`` at ``x``, from one pass.

    Memory is ``S * L^2 * d^2`` numbers: for large depths use :func:`jacobian_lab.gsc_matrix`,
    which keeps only the norms. Shapes and indexing: :class:`PairJacobians`.
    """
    pj, ok = _pair_jacobians(net, params, prepare(net, params, x))
    check_finite(ok, net)
    return pj


_MEM_INPUT_TO_LAYER_JACOBIANS = (
    "input_to_layer_jacobians keeps the Jacobian of every layer with respect to the input "
    "for every sample and",
    "pass fewer samples per call, or take a prefix network's spectrum matrix-free "
    "(jacobian_spectrum(fn, x, method='matrix_free'))",
)


@over_trace(jac=True, memory=_MEM_INPUT_TO_LAYER_JACOBIANS)
def _input_to_layer_jacobians(model: Model, tr):
    d = max(r.jac.shape[2] for r in tr.records)
    emit = lambda P_in, _: pad(P_in, (d, P_in.shape[-1]))  # noqa: E731
    one = lambda jacs: accumulate(list(jacs), emit, pairs=False)[::-1]  # noqa: E731
    return jax.vmap(one)([r.jac for r in tr.records]), finite_layers(tr)


def input_to_layer_jacobians(net: Model, params: Params, x) -> jax.Array:
    """The Jacobian of every layer with respect to the input, from one pass.

    ``result[s, l] = d f_l / d x`` is the input-output Jacobian of the prefix network of
    depth ``L - l`` (its first ``L - l`` layers), so one call gives the input-output
    Jacobian at every depth of a deep network.

    Returns:
        ``(S, L, d, d_in)``, GSC-paper indexing (``l = 0`` is the whole network); a
        layer of size ``d_l`` below the largest ``d`` fills the first ``d_l`` rows, NaN
        after.
        Memory ``S * L * d * d_in`` numbers; for the whole network alone use
        :func:`input_output_jacobian`.
    """
    P, ok = _input_to_layer_jacobians(net, params, prepare(net, params, x))
    check_finite(ok, net)
    return P


@memory_checked(
    "input_output_jacobian keeps the network's Jacobian for every sample and",
    "pass fewer samples per call, or use jacobian_spectrum(fn, x, method='matrix_free') or "
    "jl.frobenius_norm_sq, which keep no Jacobian",
    static_argnums=0,
)
def _input_output_jacobian(model: Model, params: Params, xs) -> jax.Array:
    def one(s):
        flat, unravel = ravel_pytree(s)
        return flat_jacobian(lambda v: (forward(model, params, unravel(v))[0], None), flat)[0]

    return jax.vmap(one)(xs)


def input_output_jacobian(net: Model, params: Params, x) -> jax.Array:
    """The Jacobian d f_0 / d x of the whole network, per sample: ``(S, size f_0, size x)``
    (any sizes), forward or reverse mode through the stages, checked finite."""
    xs = prepare(net, params, x)
    J = _input_output_jacobian(net, params, xs)
    if not is_traced(J) and not bool(jnp.all(jnp.isfinite(J))):
        check_finite(_layer_jacobians_finite(net, params, xs), net)
        raise FloatingPointError("the input-output Jacobian holds inf or NaN")
    return J


@over_trace(jac=True)
def _layer_jacobians_finite(model: Model, tr) -> jax.Array:
    return finite_layers(tr)


@partial(jax.jit, static_argnums=0)
def _layer_outputs(model: Model, params: Params, xs) -> list:
    segments = jax.vmap(lambda v: forward(model, params, v)[1])(xs)
    layers = [
        jax.tree_util.tree_map(lambda a, i=i: a[:, i], seg)
        for seg in segments
        for i in range(jax.tree_util.tree_leaves(seg)[0].shape[1])
    ]
    return [*layers[::-1], xs]


def layer_outputs(net: Model, params: Params, x) -> tuple:
    """Every layer output ``f_0, ..., f_L`` of any model (built in, or read by
    :func:`~jacobian_lab.chain`) on the inputs ``x``, from one forward pass.

    Args:
        net, params, x: as for every diagnostic (:func:`~jacobian_lab.driver.prepare`).

    Returns:
        A tuple of ``L + 1`` entries in the GSC paper's indexing: entry ``l`` is ``f_l``
        (``0`` the output, ``L`` the analysed input, after a token-id model's embedding),
        each with the layer's own shape (a pytree for pytree outputs) and a leading
        sample axis ``S`` (``S`` batches of ``B`` for a batch-norm model: ``(S, B, ...)``).
        :meth:`~jacobian_lab.Network.activations` is the stacked form for built-in
        networks, whose hidden layers share one shape.
    """
    return tuple(_layer_outputs(net, params, prepare(net, params, x)))
