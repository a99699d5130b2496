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

from jacobian_lab.layered import _layer_jacobians, check_layers_finite, layer_finite, samples
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


def _require_residual(net: Network) -> None:
    if not net.residual:
        raise ValueError(
            f"{net.name or 'this network'} has no residual blocks; build one with "
            "jacobian_lab.resmlp(...)"
        )


@partial(jax.jit, static_argnums=0)
def _pythagorean(net: Network, params: Params, x: jax.Array) -> Pythagorean:
    def step(h, p):
        f, r = net.block_parts(p, h)
        terms = (
            jnp.sum(f**2, -1),
            jnp.sum(r**2, -1),
            jnp.sum((f + r) ** 2, -1),
            2 * jnp.sum(f * r, -1),
        )
        return net.unit(p, h), terms

    _, (ff, rr, ss, fr) = jax.lax.scan(step, net.stem(params, x), params["units"])
    ff, rr, ss, fr = (a[::-1].T for a in (ff, rr, ss, fr))
    return Pythagorean(ff, rr, ss, fr, fr / (2 * jnp.sqrt(ff * rr)))


def pythagorean_decomposition(net: Network, params: Params, x: jax.Array) -> Pythagorean:
    """Split every block's output length into skip, branch and cross term.

    Args:
        net: a residual network (:func:`jacobian_lab.resmlp`).
        params: its parameters.
        x: inputs ``(B, in_dim)``.

    Returns:
        :class:`Pythagorean` with fields of shape ``(B, depth)``.
    """
    _require_residual(net)
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


def block_jacobian_stats(
    net: Network, params: Params, x: jax.Array, key: jax.Array
) -> BlockJacobianStats:
    """Singular values of every block's Jacobian and the gradient-norm ratio across it.

    Args:
        net: a residual network; params: its parameters. A plain network is accepted
            too: its "blocks" are its dense layers above the stem (the comparison
            Zaeemzadeh et al. draw between blocks with and without the skip).
        x: inputs ``(B, in_dim)`` (batch norm: one batch, or ``(S, B, in_dim)``).
        key: PRNG key for the random output direction ``v``.

    Returns:
        :class:`BlockJacobianStats`; the block axis has length ``net.num_units``
        (``depth`` blocks; GSC-paper indexing, block 0 produces the output).
    """
    stats, ok = _block_stats(net, params, samples(net, x), key)
    check_layers_finite(ok)
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


def block_gsc(net: Network, params: Params, x: jax.Array) -> BlockGSC:
    """Measured and predicted GSC across every residual block (see :class:`BlockGSC`).

    Args:
        net: a residual network with ``block_order="pre"`` (output ``f + alpha r(f)``);
            params: its parameters.
        x: inputs ``(B, in_dim)`` (batch norm: one batch, or ``(S, B, in_dim)``).

    Returns:
        :class:`BlockGSC`, fields ``(S, depth)``.
    """
    _require_residual(net)
    if net.block_order != "pre":
        raise ValueError(
            "block_gsc needs block_order='pre': with a post-activation the block's "
            "Jacobian is not I + J_r"
        )
    out, ok = _block_gsc(net, params, samples(net, x))
    check_layers_finite(ok)
    return out
