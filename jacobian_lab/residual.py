"""Residual-block diagnostics: the Pythagorean decomposition and norm preservation.

For a residual block with input (skip) ``f`` and scaled branch output ``r = alpha r(f)``:

* **Pythagorean decomposition** (Philipp et al., arXiv 1712.05577):
  ``||f + r||^2 = ||f||^2 + ||r||^2 + 2 <f, r>`` exactly; the paper's "Pythagorean
  equation" is the claim that the cross term is negligible at initialization, i.e. that
  ``cos(f, r)`` is of order ``1/sqrt(width)``.
* **Norm preservation** (Zaeemzadeh, Rahnavard & Shah, arXiv 1805.07477): the singular
  values of the block Jacobian ``I + d r / d f`` concentrate around 1, and so does the ratio
  of gradient norms on the two sides of the block.

Blocks use the GSC paper's indexing: block ``l`` is the block whose output is ``f_l``
(``l = 0`` is the last block, ``l = depth - 1`` the first).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jacobian_lab.chain import Chain, chain_pass
from jacobian_lab.layered import (
    _layer_jacobians,
    chain_finite,
    check_layers_finite,
    layer_finite,
    samples,
)
from jacobian_lab.networks import Network, Params


class Pythagorean(NamedTuple):
    """Per-example, per-block terms of ``||f + r||^2 = ||f||^2 + ||r||^2 + 2 <f, r>``.

    Every field has shape ``(B, depth)``: example, block (GSC-paper indexing).

    Fields:
        skip_sq: ``||f||^2``, the squared length of the block input.
        branch_sq: ``||r||^2``, the squared length of the scaled branch output.
        sum_sq: ``||f + r||^2``, the squared length before any post-activation.
        cross: ``2 <f, r>``.
        cosine: ``<f, r> / (||f|| ||r||)``.
    """

    skip_sq: jax.Array
    branch_sq: jax.Array
    sum_sq: jax.Array
    cross: jax.Array
    cosine: jax.Array

    @property
    def relative_error(self) -> jax.Array:
        """``| ||f + r||^2 - ||f||^2 - ||r||^2 | / ||f + r||^2``: how far the Pythagorean
        equation is from exact."""
        return jnp.abs(self.sum_sq - self.skip_sq - self.branch_sq) / self.sum_sq

    @property
    def branch_ratio(self) -> jax.Array:
        """``||r|| / ||f||``: the branch's size relative to the skip (the inverse of the
        GSC paper's dilution)."""
        return jnp.sqrt(self.branch_sq / self.skip_sq)


def _require_residual(net: Network | Chain) -> None:
    if isinstance(net, Chain):
        if not net.residual_layers:
            raise ValueError(
                "this chain has no residual blocks: mark them with "
                "jacobian_lab.Residual(branch, skip) in chain([...])"
            )
    elif not net.residual:
        raise ValueError(
            f"{net.name or 'this network'} has no residual blocks; build one with "
            "jacobian_lab.resmlp(...)"
        )


def _blocks_from_output(chain: Chain) -> list[int]:
    """A chain's residual layers (indices from the input), the one nearest the output
    first, the order the block diagnostics report them in."""
    return sorted(chain.residual_layers, reverse=True)


def _block_input(cp, i: int) -> jax.Array:
    return cp.inputs if i == 0 else cp.outputs[i - 1]


def _pythagorean_terms(f, r) -> tuple:
    f, r = f.reshape(f.shape[0], -1), r.reshape(r.shape[0], -1)  # images: one vector each
    return (
        jnp.sum(f**2, -1),
        jnp.sum(r**2, -1),
        jnp.sum((f + r) ** 2, -1),
        2 * jnp.sum(f * r, -1),
    )


def _pythagorean_from_terms(ff, rr, ss, fr) -> Pythagorean:
    return Pythagorean(ff, rr, ss, fr, fr / (2 * jnp.sqrt(ff * rr)))


@partial(jax.jit, static_argnums=0)
def _chain_pythagorean(chain: Chain, params, xs):
    cp = chain_pass(chain, params, xs)
    terms = [_pythagorean_terms(cp.skips[i], cp.branches[i]) for i in _blocks_from_output(chain)]
    ff, rr, ss, fr = (jnp.stack(t, axis=1) for t in zip(*terms, strict=True))
    return _pythagorean_from_terms(ff, rr, ss, fr), chain_finite(cp)


@partial(jax.jit, static_argnums=0)
def _pythagorean(net: Network, params: Params, x: jax.Array) -> Pythagorean:
    def step(h, p):
        f, r = net.block_parts(p, h)
        return net.unit(p, h), _pythagorean_terms(f, r)

    _, (ff, rr, ss, fr) = jax.lax.scan(step, net.stem(params, x), params["units"])
    return _pythagorean_from_terms(*(a[::-1].T for a in (ff, rr, ss, fr)))


def pythagorean_decomposition(net: Network | Chain, params: Params, x: jax.Array) -> Pythagorean:
    """Split every block's output length into skip, branch and cross term.

    Args:
        net: a residual network (:func:`jacobian_lab.resmlp`), or a
            :class:`~jacobian_lab.Chain` with :class:`~jacobian_lab.Residual` layers
            (``f`` is then the skip's output, which is the block input for an identity
            skip).
        params: its parameters.
        x: inputs ``(B, in_dim)`` (a chain: a pytree with a leading sample axis).

    Returns:
        :class:`Pythagorean` with fields of shape ``(B, depth)`` (a chain: ``(S, number
        of residual layers)``, nearest the output first; ``chain.block_outputs`` gives
        each block's output layer ``l``).
    """
    _require_residual(net)
    if isinstance(net, Chain):
        out, ok = _chain_pythagorean(net, params, samples(net, x))
        check_layers_finite(ok, net)
        return out
    net.check_input(x)
    return _pythagorean(net, params, x)


class BlockJacobianStats(NamedTuple):
    """Norm preservation of each block, per sample.

    Fields:
        singular_values: ``(S, U, d)`` with ``U = net.num_units`` (``depth`` blocks, or
            ``depth - 1`` layers above the stem of a plain network); singular values of the
            unit's Jacobian
            ``d f_l / d f_{l+1}`` (``I + alpha dr/df`` for ``block_order="pre"``),
            descending.
        gradient_ratio: ``(S, U)``; ``||g_{l+1}|| / ||g_l||`` where ``g_l`` is the
            gradient with respect to ``f_l`` of the loss ``<v, f_0>`` for a random
            Gaussian direction ``v`` at the output: the factor by which the block scales the
            backpropagated gradient (1 = norm preserving).
    """

    singular_values: jax.Array
    gradient_ratio: jax.Array


@partial(jax.jit, static_argnums=0)
def _block_stats(net: Network, params: Params, xs: jax.Array, key: jax.Array):
    lj = _layer_jacobians(net, params, xs)
    v0 = jax.random.normal(key, lj.outputs[:, 0].shape, lj.outputs.dtype)

    def backprop(units, v):
        def step(g, D):
            g_next = D.T @ g
            return g_next, jnp.linalg.norm(g_next) / jnp.linalg.norm(g)

        return jax.lax.scan(step, v, units)[1]

    ratios = jax.vmap(backprop)(lj.units, v0)
    svals = jnp.linalg.svd(lj.units, compute_uv=False)
    return BlockJacobianStats(svals, ratios), layer_finite(lj)


@partial(jax.jit, static_argnums=0)
def _chain_block_stats(chain: Chain, params, xs, key):
    cp = chain_pass(chain, params, xs)
    blocks = _blocks_from_output(chain)
    if not blocks:  # a plain chain: every layer with a square Jacobian
        blocks = [i for i in range(chain.num_layers - 1, -1, -1) if _square(cp.units[i])]
    shapes = {cp.units[i].shape for i in blocks}
    if len(shapes) != 1:
        raise ValueError(
            "block_jacobian_stats stacks the blocks' singular values and needs every block "
            f"to have one size; got Jacobians of shapes {sorted(s[1:] for s in shapes)}"
        )
    g = jax.random.normal(key, cp.outputs[-1].shape, cp.outputs[-1].dtype)
    ratios = {}
    for i in range(chain.num_layers - 1, -1, -1):  # backpropagate from the output
        g_below = jnp.einsum("sij,si->sj", cp.units[i], g)
        ratios[i] = jnp.linalg.norm(g_below, axis=-1) / jnp.linalg.norm(g, axis=-1)
        g = g_below
    svals = jnp.linalg.svd(jnp.stack([cp.units[i] for i in blocks], axis=1), compute_uv=False)
    stats = BlockJacobianStats(svals, jnp.stack([ratios[i] for i in blocks], axis=1))
    return stats, chain_finite(cp)


def _square(J: jax.Array) -> bool:
    return J.shape[-1] == J.shape[-2]


def block_jacobian_stats(
    net: Network | Chain, params: Params, x: jax.Array, key: jax.Array
) -> BlockJacobianStats:
    """Singular values of every block's Jacobian and the gradient-norm ratio across it.

    Args:
        net: a residual network; params: its parameters. A plain network is accepted
            too: its "blocks" are its dense layers above the stem (the comparison
            Zaeemzadeh et al. draw between blocks with and without the skip). For a
            :class:`~jacobian_lab.Chain`, the blocks are its
            :class:`~jacobian_lab.Residual` layers (nearest the output first), or, in a
            chain without any, every layer with a square Jacobian.
        x: inputs ``(B, in_dim)`` (batch norm: one batch, or ``(S, B, in_dim)``; a chain:
            a pytree with a leading sample axis).
        key: PRNG key for the random output direction ``v``.

    Returns:
        :class:`BlockJacobianStats`; the block axis has length ``net.num_units``
        (``depth`` blocks; GSC-paper indexing, block 0 produces the output); for a chain,
        the number of its residual layers (or of its square layers when it has none),
        nearest the output first.
    """
    impl = _chain_block_stats if isinstance(net, Chain) else _block_stats
    stats, ok = impl(net, params, samples(net, x), key)
    check_layers_finite(ok, net)
    return stats


class BlockGSC(NamedTuple):
    """The GSC across each residual block and its prediction from the Pythagorean equation.

    Every field has shape ``(S, depth)`` (sample, block; GSC-paper indexing). For block
    ``l`` with input ``f = f_{l+1}``, branch ``r`` and output ``f_l = f + r``:

    Fields:
        gsc: ``GSC(l+1, l) = qm(I + J_r) ||f|| / ||f + r||``, measured.
        branch_gsc: ``qm(J_r) ||f|| / ||r||``, the GSC of the branch alone (NaN for a
            branch that is exactly zero).
        branch_ratio: ``rho = ||r|| / ||f||``.
        predicted: ``sqrt((1 + branch_gsc^2 rho^2) / (1 + rho^2))``.

    The prediction follows from ``||f + r||^2 = ||f||^2 + ||r||^2`` (the Pythagorean
    equation) and ``||I + J_r||_F^2 = d + ||J_r||_F^2`` (the trace of ``J_r`` negligible):
    the block's GSC is a mean of 1 (the skip) and the branch's GSC weighted by the branch's
    share of the squared length, so the skip dilutes an exploding branch (Philipp et al.,
    arXiv 1712.05577, the argument that ResNets reduce the gradient).
    """

    gsc: jax.Array
    branch_gsc: jax.Array
    branch_ratio: jax.Array
    predicted: jax.Array


@partial(jax.jit, static_argnums=0)
def _block_gsc(net: Network, params: Params, xs: jax.Array):
    lj = _layer_jacobians(net, params, xs)
    f_in, f_out = lj.outputs[:, 1:], lj.outputs[:, :-1]  # block l maps f_{l+1} to f_l
    J_r = lj.units - jnp.eye(lj.units.shape[-1], dtype=lj.units.dtype)
    d = lj.units.shape[-1]
    n_in = jnp.linalg.norm(f_in, axis=-1)
    n_r = jnp.linalg.norm(f_out - f_in, axis=-1)
    qm_block = jnp.sqrt(jnp.sum(lj.units**2, axis=(-2, -1)) / d)
    qm_r = jnp.sqrt(jnp.sum(J_r**2, axis=(-2, -1)) / d)
    gsc_block = qm_block * n_in / jnp.linalg.norm(f_out, axis=-1)
    rho = n_r / n_in
    branch = jnp.where(rho > 0, qm_r / jnp.where(rho > 0, rho, 1.0), jnp.nan)
    predicted = jnp.sqrt((1 + qm_r**2) / (1 + rho**2))  # qm_r = branch_gsc * rho
    return BlockGSC(gsc_block, branch, rho, predicted), layer_finite(lj)


@partial(jax.jit, static_argnums=0)
def _chain_block_gsc(chain: Chain, params, xs):
    cp = chain_pass(chain, params, xs)
    fields = []
    for i in _blocks_from_output(chain):
        h, out = _block_input(cp, i), cp.outputs[i]
        s, r = cp.skips[i], cp.branches[i]
        d = h.shape[-1]
        n_h, n_s, n_r = (jnp.linalg.norm(v, axis=-1) for v in (h, s, r))
        qm_block, qm_s, qm_r = (
            jnp.sqrt(jnp.sum(J**2, axis=(-2, -1)) / d)
            for J in (cp.units[i], cp.skip_units[i], cp.branch_units[i])
        )
        rho = n_r / n_s
        branch = jnp.where(n_r > 0, qm_r * n_h / jnp.where(n_r > 0, n_r, 1.0), jnp.nan)
        # skip GSC g_s = qm_s n_h / n_s and branch GSC g_r: sqrt((g_s^2 + g_r^2 rho^2) /
        # (1 + rho^2)), written without dividing by n_r.
        predicted = n_h / n_s * jnp.sqrt((qm_s**2 + qm_r**2) / (1 + rho**2))
        gsc_block = qm_block * n_h / jnp.linalg.norm(out, axis=-1)
        fields.append((gsc_block, branch, rho, predicted))
    return BlockGSC(*(jnp.stack(f, axis=1) for f in zip(*fields, strict=True))), chain_finite(cp)


def block_gsc(net: Network | Chain, params: Params, x: jax.Array) -> BlockGSC:
    """Measured and predicted GSC across every residual block (see :class:`BlockGSC`).

    Args:
        net: a residual network with ``block_order="pre"`` (output ``f + alpha r(f)``),
            or a :class:`~jacobian_lab.Chain` with :class:`~jacobian_lab.Residual` layers;
            params: its parameters.
        x: inputs ``(B, in_dim)`` (batch norm: one batch, or ``(S, B, in_dim)``; a chain:
            a pytree with a leading sample axis).

    Returns:
        :class:`BlockGSC`, fields ``(S, depth)`` (a chain: ``(S, number of residual
        layers)``, nearest the output first). With a skip ``s`` other than the identity
        (a projection), ``branch_ratio`` is ``||r|| / ||s||`` and the prediction weights
        the skip's own GSC ``qm(J_s) ||f|| / ||s||`` in place of 1.
    """
    _require_residual(net)
    if isinstance(net, Chain):
        out, ok = _chain_block_gsc(net, params, samples(net, x))
        check_layers_finite(ok, net)
        return out
    if net.block_order != "pre":
        raise ValueError(
            "block_gsc needs block_order='pre': with a post-activation the block's "
            "Jacobian is not I + J_r"
        )
    out, ok = _block_gsc(net, params, samples(net, x))
    check_layers_finite(ok, net)
    return out
