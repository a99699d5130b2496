"""Layer-to-layer Jacobians of a layered :class:`~jacobian_lab.networks.Network`.

One forward pass (a ``lax.scan`` over the stacked units) yields every layer's output and
the Jacobian of every layer with respect to the layer below it; every J_k^l = df_l / df_k
is then a product of those, accumulated in a second scan rather than by differentiating
each sub-network again.

**Indexing** follows the GSC paper (arXiv 1712.05577): ``f_0`` is the output,
``f_L = x`` the input, ``L = net.num_layers``; ``J_k^l = d f_l / d f_k`` for ``k >= l``
(``k`` below ``l``), a ``d_l x d_k`` matrix.

**Samples.** For per-example networks every input row is its own sample: ``x`` of shape
``(B, in_dim)`` gives ``S = B`` samples and ``d_l = width``. A batch-norm network is a
function of the whole batch, so its Jacobians are taken with respect to the whole batch:
``x`` of shape ``(B, in_dim)`` is one sample (``S = 1``) and ``(S, B, in_dim)`` is ``S``
batches, with ``d_l = B * width`` (row-major: index ``b * width + i``).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jacobian_lab._checks import is_traced
from jacobian_lab.chain import Chain, chain_pass, check_no_leaked_tracers
from jacobian_lab.networks import Network, Params


class LayerJacobians(NamedTuple):
    """Jacobians of each layer with respect to the layer below it, per sample.

    Fields:
        units: ``(S, L-1, d, d)``; ``units[s, l] = d f_l / d f_{l+1}`` for
            ``l = 0 .. L-2`` (``units[s, 0]`` is the last unit's Jacobian).
        stem: ``(S, d, d_in)``; ``d f_{L-1} / d x``.
        outputs: ``(S, L, d)``; the flattened layer outputs ``f_0 .. f_{L-1}``.
        inputs: ``(S, d_in)``; the flattened input ``f_L = x``.
    """

    units: jax.Array
    stem: jax.Array
    outputs: jax.Array
    inputs: jax.Array


def samples(net: Network | Chain, x: jax.Array) -> jax.Array:
    """Split ``x`` into the samples the Jacobians are taken over: ``(S, b, in_dim)`` with
    ``b = 1`` for per-example networks and ``b = B`` for batch-coupled ones. For a
    :class:`~jacobian_lab.chain.Chain`, ``x`` is returned after checking that every leaf
    has the same leading (sample) axis."""
    if isinstance(net, Chain):
        return _chain_samples(net, x)
    if net.batch_coupled:
        xs = x[None] if x.ndim == net.example_ndim + 1 else x
        if xs.ndim != net.example_ndim + 2:
            raise ValueError(
                "a batch-norm network takes one batch (B, *example_shape) or S batches "
                f"(S, B, *example_shape), got {tuple(x.shape)}"
            )
        net.check_input(xs[0])
        return xs
    net.check_input(x)
    return x[:, None]


def _chain_samples(chain: Chain, x):
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or any(jnp.ndim(v) == 0 for v in leaves):
        raise ValueError(
            "a chain takes x as a pytree of arrays with a leading sample axis "
            "(shape (S, *sample_shape)); for one sample use jax.tree.map(lambda v: v[None], x)"
        )
    if not any(is_traced(v) for v in leaves):
        check_no_leaked_tracers(chain)
    sizes = {int(jnp.shape(v)[0]) for v in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"every leaf of x needs the same leading sample axis; got sizes {sorted(sizes)}"
        )
    return x


def _flat_jacobian(fn, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(J, fn(h))`` with ``J`` the Jacobian as a ``(size out, size in)`` matrix; the value
    comes from the same forward-mode pass (no second evaluation of ``fn``)."""

    def with_value(v):
        out = fn(v)
        return out, out

    J, out = jax.jacfwd(with_value, has_aux=True)(h)
    return J.reshape(out.size, h.size), out


def _sample_jacobians(net: Network, params: Params, xs: jax.Array):
    """Forward pass of one sample ``xs`` (b, in_dim) with every layer's Jacobian."""
    D_stem, h0 = _flat_jacobian(lambda v: net.stem(params, v), xs)

    def step(h, p):
        D, h_next = _flat_jacobian(lambda v: net.unit(p, v), h)
        return h_next, (D, h_next.ravel())

    _, (D_units, hs) = jax.lax.scan(step, h0, params["units"])
    outputs = jnp.concatenate([hs[::-1], h0.ravel()[None]], axis=0)
    return D_units[::-1], D_stem, outputs, xs.ravel()


@partial(jax.jit, static_argnums=0)
def _layer_jacobians(net: Network | Chain, params: Params, xs: jax.Array) -> LayerJacobians:
    if isinstance(net, Chain):
        return _stack_chain(net, chain_pass(net, params, xs))
    return LayerJacobians(*jax.vmap(lambda s: _sample_jacobians(net, params, s))(xs))


def _stack_chain(chain: Chain, cp) -> LayerJacobians:
    """A chain's pass as :class:`LayerJacobians`: needs every layer above the first to
    keep one size (square Jacobians of one side), as the stacked layout does."""
    sizes = [u.shape[1:] for u in cp.units]
    d = sizes[0][0]
    if any(sz != (d, d) for sz in sizes[1:]):
        listing = ", ".join(
            f"{n}: {sz[1]} -> {sz[0]}" for n, sz in zip(chain.names, sizes, strict=True)
        )
        raise ValueError(
            "this function stacks the layers' Jacobians and needs every layer after the "
            f"first to map size {d} to size {d}; this chain's layers are ({listing}). "
            "gsc, gsc_matrix, input_output_jacobian and the block diagnostics take any "
            "sizes; for other Jacobians split the chain where the size changes."
        )
    units = (
        jnp.stack(cp.units[1:][::-1], axis=1)
        if len(cp.units) > 1
        else (jnp.zeros((cp.inputs.shape[0], 0, d, d), cp.inputs.dtype))
    )
    outputs = jnp.stack(cp.outputs[::-1], axis=1)
    return LayerJacobians(units, cp.units[0], outputs, cp.inputs)


def layer_jacobians(net: Network | Chain, params: Params, x: jax.Array) -> LayerJacobians:
    """Every layer's Jacobian with respect to the layer below it, from one forward pass.

    Args:
        net: the network description (a :class:`~jacobian_lab.Network` or
            :class:`~jacobian_lab.ConvNetwork`; or a :class:`~jacobian_lab.Chain` whose
            layers after the first all keep one size).
        params: its parameters (``net.init(key)``, or the params from ``chain``).
        x: inputs ``(B, in_dim)`` (or ``(S, B, in_dim)`` batches for batch norm; images
            ``(B, H, W, C)`` for a conv net; a pytree with a leading sample axis for a
            chain).

    Returns:
        :class:`LayerJacobians` (shapes there; ``d`` is the flat size of a layer's value).
        Raises ``FloatingPointError`` naming the first layer (from the input) whose output
        or Jacobian is not finite.
    """
    lj = _layer_jacobians(net, params, samples(net, x))
    check_layers_finite(layer_finite(lj), net)
    return lj


def layer_finite(lj: LayerJacobians) -> jax.Array:
    """``(L,)`` booleans, GSC-paper indexing: whether layer ``f_l``'s output and its
    Jacobian with respect to the layer below are finite for every sample. Cheap to return
    from a jitted function instead of the Jacobians themselves."""
    units_ok = jnp.all(jnp.isfinite(lj.units), axis=(0, 2, 3)) & jnp.all(
        jnp.isfinite(lj.outputs[:, :-1]), axis=(0, 2)
    )
    stem_ok = jnp.all(jnp.isfinite(lj.stem)) & jnp.all(jnp.isfinite(lj.outputs[:, -1]))
    return jnp.concatenate([units_ok, stem_ok[None]])


def chain_finite(cp) -> jax.Array:
    """:func:`layer_finite` for a chain's :class:`~jacobian_lab.chain.ChainPass`: ``(L,)``
    booleans in GSC-paper indexing."""
    ok = [
        jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(o))
        for u, o in zip(cp.units, cp.outputs, strict=True)
    ]
    return jnp.stack(ok[::-1])


def check_layers_finite(ok: jax.Array, net: Network | Chain | None = None) -> None:
    """Raise ``FloatingPointError`` unless every entry of ``ok`` (from :func:`layer_finite`)
    holds, naming the first bad layer counted from the input (outside ``jit`` only)."""
    if is_traced(ok):
        return
    ok = np.asarray(ok)
    if ok.all():
        return
    L = ok.shape[0]
    first = int(np.flatnonzero(~ok)[-1])  # the largest index is the closest to the input
    which = f"dense layer/block {L - first} counted from the input"
    if isinstance(net, Chain):
        which = f"layer {L - 1 - first} ({net.names[L - 1 - first]!r}) of the chain"
    raise FloatingPointError(
        f"the network went non-finite first at layer f_{first} (GSC-paper indexing, f_0 = "
        f"output, f_{L} = input; that is {which}): its output or Jacobian holds inf or "
        "NaN. Try float64, a smaller depth or a smaller weight scale."
    )


def _accumulate(lj_one, emit):
    """Scan from the input upwards keeping ``P[k] = d f_l / d f_k`` for every k below the
    current layer l (hidden layers) and ``P_in = d f_l / d x``; ``emit(P, P_in)`` is
    stacked over l. Returned in forward order (stem's output first)."""
    units_fwd = lj_one.units[::-1]
    L = lj_one.outputs.shape[0]
    d = lj_one.stem.shape[0]
    eye = jnp.eye(d, dtype=lj_one.stem.dtype)
    P0 = jnp.zeros((L, d, d), eye.dtype).at[L - 1].set(eye)

    def step(carry, inp):
        P, P_in = carry
        D, i = inp
        P = jnp.einsum("ij,kjl->kil", D, P).at[i].set(eye)
        P_in = D @ P_in
        return (P, P_in), emit(P, P_in)

    first = emit(P0, lj_one.stem)
    idx = jnp.arange(L - 2, -1, -1)
    _, rest = jax.lax.scan(step, (P0, lj_one.stem), (units_fwd, idx))
    return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)


class PairJacobians(NamedTuple):
    """All layer-to-layer Jacobians J_k^l = d f_l / d f_k, per sample (paper indexing).

    Fields:
        hidden: ``(S, L, L, d, d)``; ``hidden[s, l, k] = d f_l / d f_k`` for
            ``0 <= l <= k <= L-1`` (identity on the diagonal, zero for ``k < l``).
        from_input: ``(S, L, d, d_in)``; ``from_input[s, l] = d f_l / d x``.
    """

    hidden: jax.Array
    from_input: jax.Array


@partial(jax.jit, static_argnums=0)
def _pair_jacobians(net: Network, params: Params, xs: jax.Array):
    lj = _layer_jacobians(net, params, xs)

    def one(lj_one):
        P, P_in = _accumulate(lj_one, lambda P, P_in: (P, P_in))
        return P[::-1], P_in[::-1]  # scan runs upwards; flip to l = 0 first

    return PairJacobians(*jax.vmap(one)(lj)), layer_finite(lj)


def layer_to_layer_jacobians(net: Network | Chain, params: Params, x: jax.Array) -> PairJacobians:
    """Every layer-to-layer Jacobian J_k^l of ``net`` at ``x``, from one pass.

    Memory is ``S * L^2 * d^2`` numbers: for large depths use :func:`jacobian_lab.gsc_matrix`,
    which keeps only the norms. Shapes and indexing: :class:`PairJacobians`.
    """
    pj, ok = _pair_jacobians(net, params, samples(net, x))
    check_layers_finite(ok, net)
    return pj


@partial(jax.jit, static_argnums=0)
def _input_to_layer_jacobians(net: Network, params: Params, xs: jax.Array):
    lj = _layer_jacobians(net, params, xs)

    def one(units, stem):
        def step(P, D):
            P = D @ P
            return P, P

        _, Ps = jax.lax.scan(step, stem, units[::-1])
        return jnp.concatenate([Ps[::-1], stem[None]], axis=0)

    return jax.vmap(one)(lj.units, lj.stem), layer_finite(lj)


def input_to_layer_jacobians(net: Network | Chain, params: Params, x: jax.Array) -> jax.Array:
    """The Jacobian of every layer with respect to the input, from one pass.

    ``result[s, l] = d f_l / d x`` is the input-output Jacobian of the prefix network of
    depth ``L - l`` (its first ``L - l`` layers), so one call gives the input-output
    Jacobian at every depth of a deep network.

    Returns:
        ``(S, L, d, d_in)``, GSC-paper indexing (``l = 0`` is the whole network).
        Memory ``S * L * d * d_in`` numbers; for the whole network alone use
        :func:`input_output_jacobian`.
    """
    P, ok = _input_to_layer_jacobians(net, params, samples(net, x))
    check_layers_finite(ok, net)
    return P


def input_output_jacobian(net: Network | Chain, params: Params, x: jax.Array) -> jax.Array:
    """The Jacobian d f_0 / d x of the whole network, per sample: ``(S, d, d_in)``
    (for a :class:`~jacobian_lab.chain.Chain`: ``(S, size f_0, size x)``, any sizes).

    Computed with forward mode through the scan (``jax.jacfwd``), checked finite.
    """
    xs = samples(net, x)
    J = _input_output_jacobian(net, params, xs)
    if not is_traced(J) and not bool(jnp.all(jnp.isfinite(J))):
        if isinstance(net, Chain):
            check_layers_finite(chain_finite(chain_pass(net, params, xs)), net)
        else:
            layer_jacobians(net, params, x)  # names the layer
        raise FloatingPointError("the input-output Jacobian holds inf or NaN")
    return J


@partial(jax.jit, static_argnums=0)
def _input_output_jacobian(net: Network | Chain, params: Params, xs: jax.Array) -> jax.Array:
    def one(s):
        if isinstance(net, Chain):
            flat, unravel = ravel_pytree(s)
            return _flat_jacobian(lambda v: ravel_pytree(net.apply(params, unravel(v)))[0], flat)[0]
        return _flat_jacobian(lambda v: net.apply(params, v), s)[0]

    return jax.vmap(one)(xs)
