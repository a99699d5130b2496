"""Residual-block diagnostics: the Pythagorean decomposition and norm preservation.

For a residual block with input (skip) ``f`` and scaled branch output ``r = alpha r(f)``:

* **Pythagorean decomposition** (Philipp et al., arXiv 1712.05577):
  ``||f + r||^2 = ||f||^2 + ||r||^2 + 2 <f, r>`` exactly; the paper's "Pythagorean
  equation" is the claim that the cross term is negligible at initialization, i.e. that
  ``cos(f, r)`` is of order ``1/sqrt(width)``.
* **Norm preservation** (Zaeemzadeh, Rahnavard & Shah, arXiv 1805.07477): the singular
  values of the block Jacobian ``I + d r / d f`` concentrate around 1, and so does the ratio
  of gradient norms on the two sides of the block.

Blocks are the :class:`~jacobian_lab.model.Block` stages of any model (built-in ResNets,
:class:`~jacobian_lab.Residual` layers of a chain), reported nearest the output first:
block ``j`` has its output at ``f_l`` with ``l = model.block_outputs[j]`` (GSC-paper
indexing).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jacobian_lab.checks import check_key
from jacobian_lab.driver import (
    Record,
    check_finite,
    check_lengths,
    check_values,
    finite_layers,
    log_lengths,
    norm,
    over_trace,
    per_layer,
    prepare,
    scan_down,
)
from jacobian_lab.gsc import qm_norm
from jacobian_lab.initializers import normal
from jacobian_lab.model import Block, Model, Params, units_of


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


def require_blocks(model: Model, *, pre: bool = False) -> None:
    """Raise ``ValueError`` unless ``model`` has residual blocks (and, with ``pre``, none
    with a post-activation, whose Jacobian is not ``skip + branch``)."""
    blocks = [u for s in model.stages for u in units_of(s) if isinstance(u, Block)]
    if not blocks:
        raise ValueError(
            f"{getattr(model, 'name', '') or 'this model'} has no residual blocks: build one "
            "with jacobian_lab.resmlp(...), or mark them with jacobian_lab.Residual(branch, "
            "skip) in chain([...])"
        )
    if pre and any(b.post is not None for b in blocks):
        raise ValueError(
            "this diagnostic needs blocks without a post-activation (block_order='pre'): "
            "with one, the block's Jacobian is not skip + branch"
        )


def _blocks(tr) -> list[Record]:
    """The block segments of a trace (their records have a branch)."""
    return [r for r in tr.records if r.branch is not None]


def _sq(a: jax.Array) -> jax.Array:
    return jnp.sum(a**2, axis=-1)


_MEM_PYTHAGOREAN = (
    "pythagorean_decomposition keeps every block's input, skip and branch for every sample and",
    "pass fewer samples per call",
)


@over_trace(jac=False, blocks=True, memory=_MEM_PYTHAGOREAN)
def _pythagorean(model: Model, tr):
    terms = []
    for r in _blocks(tr):
        # on f / m and r / m (m the largest entry of either), so that neither the squares
        # nor the cosine overflow or underflow; the squared lengths are m^2 times these
        m = jnp.maximum(jnp.max(jnp.abs(r.skip), -1), jnp.max(jnp.abs(r.branch), -1))
        m = jnp.where(m > 0, m, 1)[..., None]
        f, b = r.skip / m, r.branch / m
        ff, rr, ss, fr = _sq(f), _sq(b), _sq(f + b), 2 * jnp.sum(f * b, axis=-1)
        cos = fr / (2 * jnp.sqrt(ff * rr))
        terms.append((*(t * m[..., 0] ** 2 for t in (ff, rr, ss, fr)), cos))
    joined = (per_layer(list(t)) for t in zip(*terms, strict=True))
    return Pythagorean(*joined), finite_layers(tr), log_lengths(tr)


def pythagorean_decomposition(net: Model, params: Params, x) -> Pythagorean:
    """Split every block's output length into skip, branch and cross term.

    Args:
        net, params, x: as for every diagnostic (:func:`~jacobian_lab.driver.prepare`),
            ``net`` with residual blocks (:func:`jacobian_lab.resmlp`, a chain with
            :class:`~jacobian_lab.Residual` layers); ``f`` is the skip's output, which is
            the block input for an identity skip.

    Returns:
        :class:`Pythagorean` with fields of shape ``(S, number of blocks)``, nearest the
        output first (``net.block_outputs`` gives each block's output layer ``l``).
    """
    require_blocks(net)
    out, ok, log_len = _pythagorean(net, params, prepare(net, params, x))
    check_finite(ok, net)
    check_lengths(log_len, net)
    check_values(out.sum_sq, "the squared lengths ||f + r||^2 (try float64)")
    return out


class BlockJacobianStats(NamedTuple):
    """Norm preservation of each block, per sample.

    Fields:
        singular_values: ``(S, U, d)`` over the ``U`` blocks (see
            :func:`block_jacobian_stats`): singular values of the block's Jacobian
            ``d f_l / d f_{l+1}`` (``I + alpha dr/df`` without post-activation), descending.
            A block whose Jacobian is ``d_out x d_in`` has ``min(d_out, d_in)`` of them;
            when the blocks differ in size (a ResNet's stages, projection shortcuts), ``d``
            is the largest and each block's row is padded with NaN after its own values
            (:attr:`sizes`).
        gradient_ratio: ``(S, U)``; ``||g_{l+1}|| / ||g_l||`` where ``g_l`` is the
            gradient with respect to ``f_l`` of the loss ``<v, f_0>`` for a random
            Gaussian direction ``v`` at the output: the factor by which the block scales the
            backpropagated gradient (1 = norm preserving).
    """

    singular_values: jax.Array
    gradient_ratio: jax.Array

    @property
    def sizes(self) -> jax.Array:
        """``(S, U)``: how many singular values each block has (the rest is NaN padding)."""
        return jnp.sum(~jnp.isnan(self.singular_values), axis=-1)


def block_layers(model: Model, tr) -> list[int]:
    """GSC-paper indices ``l`` of the layers the block diagnostics report, nearest the
    output first: the residual blocks, or, in a model without any, every layer after the
    first whose Jacobian is square."""
    if model.block_outputs:
        return list(model.block_outputs)
    shapes = [r.jac.shape[2:] for r in tr.records for _ in range(r.jac.shape[1])]
    L = len(shapes)
    return [L - 1 - i for i in range(L - 1, 0, -1) if shapes[i][0] == shapes[i][1]]


def backward_ratios(jacs: list, g: jax.Array) -> jax.Array:
    """``||g_{l+1}|| / ||g_l||`` for every layer of one sample, GSC order ``(L,)``, where
    ``g_0 = g`` and ``g_{l+1} = J_l^T g_l`` (``jacs``: per segment, forward order)."""

    def step(g, D):  # g has norm 1: the ratio is ||D^T g||, then g is rescaled
        below = D.T @ g
        n = norm(below)
        return below / jnp.where(n > 0, n, 1), n

    return scan_down(step, g / norm(g), jacs)


_MEM_BLOCK_STATS = (
    "block_jacobian_stats keeps every layer's Jacobian for every sample and",
    "pass fewer samples per call",
)


@over_trace(jac=True, memory=_MEM_BLOCK_STATS)
def _block_stats(model: Model, tr, key):
    idx = block_layers(model, tr)
    jacs = [r.jac for r in tr.records]
    out0 = tr.records[-1].out[:, -1]
    g0 = normal(key, out0.shape, out0.dtype)  # drawn in float32: the same in both precisions
    ratios = jax.vmap(backward_ratios)(jacs, g0)
    shapes = {r.jac.shape[2:] for r in tr.records}
    if len(shapes) == 1:
        svals = jnp.linalg.svd(per_layer(jacs)[:, jnp.array(idx)], compute_uv=False)
    else:  # blocks of several sizes (a ResNet's stages): each its own, padded with NaN
        chosen = [J for r in tr.records for J in jnp.moveaxis(r.jac, 1, 0)][::-1]
        each = [jnp.linalg.svd(chosen[l], compute_uv=False) for l in idx]
        width = max(v.shape[-1] for v in each)
        pad = lambda v: jnp.pad(v, ((0, 0), (0, width - v.shape[-1])), constant_values=jnp.nan)  # noqa: E731
        svals = jnp.stack([pad(v) for v in each], axis=1)
    return BlockJacobianStats(svals, ratios[:, jnp.array(idx)]), finite_layers(tr)


def block_jacobian_stats(net: Model, params: Params, x, key: jax.Array) -> BlockJacobianStats:
    """Singular values of every block's Jacobian and the gradient-norm ratio across it.

    Args:
        net, params, x: as for every diagnostic (:func:`~jacobian_lab.driver.prepare`).
            The blocks are the residual blocks (nearest the output first); in a model
            without any (a plain network), every layer after the first with a square
            Jacobian (the comparison Zaeemzadeh et al. draw between blocks with and without
            the skip).
        key: PRNG key for the random output direction ``v``.

    Returns:
        :class:`BlockJacobianStats`; the block axis follows ``net.block_outputs`` (or the
        square layers, nearest the output first).
    """
    stats, ok = _block_stats(net, params, prepare(net, params, x), check_key(key))
    check_finite(ok, net)
    return stats


class BlockGSC(NamedTuple):
    """The GSC across each residual block and its prediction from the Pythagorean equation.

    Every field has shape ``(S, number of blocks)`` (sample, block nearest the output
    first). For the block with input ``f = f_{l+1}``, branch ``r`` and output
    ``f_l = f + r``:

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


class PostBlockWarning(UserWarning):
    """A diagnostic's prediction assumes a block's output is ``skip + branch``, and some
    blocks have a ``post`` (a post-activation, a Post-LN norm): those predictions are NaN."""


def warn_post_blocks(model: Model, what: str) -> None:
    """One :class:`PostBlockWarning` naming the blocks with a ``post``, if any."""
    posts = [l for l, p in zip(model.block_outputs, model.block_posts, strict=True) if p]
    if posts:
        names = ", ".join(repr(model.names[model.num_layers - 1 - l]) for l in posts[:4])
        more = f" and {len(posts) - 4} more" if len(posts) > 4 else ""
        warnings.warn(
            f"{what} assumes a block's output is skip + branch; {len(posts)} block(s) have a "
            f"post (a post-activation or a Post-LN norm: {names}{more}), so their {what} is "
            "NaN; the measured values are given",
            PostBlockWarning,
            stacklevel=3,
        )


_MEM_BLOCK_GSC = (
    "block_gsc keeps every block's Jacobian, skip and branch Jacobians for every sample and",
    "pass fewer samples per call; gsc(..., method='matrix_free') gives the GSC across the "
    "blocks without Jacobians",
)


@over_trace(jac=True, blocks=True, memory=_MEM_BLOCK_GSC)
def _block_gsc(model: Model, tr):
    fields = []
    for r in _blocks(tr):
        n_h, n_s, n_r, n_out = (norm(v) for v in (r.inp, r.skip, r.branch, r.out))
        qm_block, qm_r = qm_norm(r.jac), qm_norm(r.branch_jac)
        qm_s = jnp.ones_like(qm_r) if r.skip_jac is None else qm_norm(r.skip_jac)
        rho = n_r / n_s
        branch = jnp.where(n_r > 0, qm_r * n_h / jnp.where(n_r > 0, n_r, 1.0), jnp.nan)
        # skip GSC g_s = qm_s n_h / n_s and branch GSC g_r: sqrt((g_s^2 + g_r^2 rho^2) /
        # (1 + rho^2)), written without dividing by n_r.
        predicted = n_h / n_s * jnp.sqrt((qm_s**2 + qm_r**2) / (1 + rho**2))
        fields.append((qm_block * n_h / n_out, branch, rho, predicted))
    gsc, branch, rho, predicted = (per_layer(list(f)) for f in zip(*fields, strict=True))
    post = jnp.asarray(model.block_posts)
    predicted = jnp.where(post, jnp.nan, predicted)
    return BlockGSC(gsc, branch, rho, predicted), finite_layers(tr), log_lengths(tr)


def block_gsc(net: Model, params: Params, x) -> BlockGSC:
    """Measured and predicted GSC across every residual block (see :class:`BlockGSC`).

    Args:
        net, params, x: as for every diagnostic (:func:`~jacobian_lab.driver.prepare`),
            ``net`` with residual blocks (a :func:`~jacobian_lab.resmlp`, a chain with
            :class:`~jacobian_lab.Residual` layers, a model read whole).

    Returns:
        :class:`BlockGSC`, fields ``(S, number of blocks)``, nearest the output first.
        With a skip ``s`` other than the identity (a projection), ``branch_ratio`` is
        ``||r|| / ||s||`` and the prediction weights the skip's own GSC
        ``qm(J_s) ||f|| / ||s||`` in place of 1. For a block with a ``post`` (a
        post-activation ResNet block, a Post-LN sublayer: output ``post(s + r)``),
        ``gsc`` is measured across the whole block (post included), ``branch_gsc`` and
        ``branch_ratio`` are the branch's, and ``predicted`` is NaN, since the
        Pythagorean prediction needs the output to be ``s + r``
        (:class:`PostBlockWarning` names those blocks).
    """
    require_blocks(net)
    warn_post_blocks(net, "the Pythagorean prediction of the block GSC")
    out, ok, log_len = _block_gsc(net, params, prepare(net, params, x))
    check_finite(ok, net)
    check_lengths(log_len, net)
    return out
