"""Gradient carried by paths of each length through a residual network.

A residual network of ``n`` pre-activation blocks ``f -> f + r_l(f)`` has the Jacobian
``prod_l (I + J_l)`` with ``J_l = d r_l / d f``. Multiplying out gives ``2^n`` paths: a path
of length ``k`` passes through ``k`` branches and skips the other ``n - k`` blocks
(Veit, Wilber & Belongie, arXiv 1605.06431). Path lengths are Binomial(n, 1/2); Veit et al.
find that the gradient of one path shrinks exponentially with its length, so most of the
gradient comes from short paths.

Two measurements, both for the gradient ``g = J^T v`` of ``<v, f_0>`` at the input of the
first block, ``v`` a Gaussian direction at the output:

* **exact**: ``g = sum_k G_k`` with ``G_k`` the sum over all paths of length ``k``,
  computed by the recursion ``G_k <- G_k + J_l^T G_{k-1}`` applied block by block from the
  output down (O(n^2 d^2) per sample, no enumeration of paths);
* **per path** (Veit et al.'s measurement): the norm of the gradient along single paths of
  length ``k``, for randomly sampled sets of ``k`` branches; ``C(n, k)`` times it is the
  "total gradient magnitude" of length ``k`` that Veit et al. plot (it ignores cancellation
  between paths, which the exact ``||G_k||`` includes).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln, logsumexp

from jacobian_lab.checks import check_key
from jacobian_lab.driver import (
    check_finite,
    check_values,
    finite_layers,
    log_norm,
    norm,
    over_trace,
    prepare,
)
from jacobian_lab.initializers import normal
from jacobian_lab.model import Model, Params
from jacobian_lab.residual import require_blocks


class PathGradients(NamedTuple):
    """Gradient by path length; fields ``(S, n+1)`` over lengths ``k = 0 .. n``.

    Fields:
        exact: ``||G_k||``, the norm of the sum of the gradients of all paths of length k.
        per_path: mean over sampled paths of length ``k`` of the norm of one path's gradient.
        full: ``(S,)``; ``||J^T v||``, the norm of the whole gradient (``= ||sum_k G_k||``).
    """

    exact: jax.Array
    per_path: jax.Array
    full: jax.Array

    @property
    def num_paths(self) -> jax.Array:
        """``(n+1,)``: ``C(n, k)``, the number of paths of each length."""
        n = self.exact.shape[-1] - 1
        k = jnp.arange(n + 1, dtype=self.exact.dtype)
        return jnp.exp(gammaln(n + 1.0) - gammaln(k + 1) - gammaln(n - k + 1))

    @property
    def total(self) -> jax.Array:
        """``(S, n+1)``: ``C(n, k) * per_path``, Veit et al.'s total gradient magnitude of
        paths of length ``k``."""
        return self.num_paths * self.per_path


def path_decomposition(
    branch_jacobians: jax.Array, v: jax.Array, key: jax.Array, num_paths: int = 16
) -> tuple[jax.Array, jax.Array]:
    """Split the backpropagated gradient of a residual stack into path lengths.

    Args:
        branch_jacobians: ``(n, d, d)``; ``J_l = d r_l / d f`` of each block, block 0 the one
            nearest the output (GSC-paper indexing).
        v: ``(d,)``; the gradient at the output.
        key: PRNG key for sampling single paths.
        num_paths: paths sampled per length for the per-path norm.

    Returns:
        ``(G, per_path)``: ``G`` of shape ``(n+1, d)`` with ``G[k]`` the gradient summed over
        all paths of length ``k``, so ``G.sum(0) = (I + J_{n-1})^T ... (I + J_0)^T v`` (the
        transpose of the whole stack's Jacobian applied to ``v``), and
        ``per_path`` of shape ``(n+1,)``, the mean norm of one sampled path's gradient.
    """
    d = branch_jacobians.shape[-1]
    if num_paths < 1:
        raise ValueError(f"num_paths must be >= 1, got {num_paths}")
    if v.shape != (d,):
        raise ValueError(f"v must have shape ({d},) to match the Jacobians, got {v.shape}")
    G, log_c, per_path = _paths(branch_jacobians, v, key, num_paths)
    return G * jnp.exp(log_c), per_path


@partial(jax.jit, static_argnums=3)
def _paths(branch_jacobians: jax.Array, v: jax.Array, key: jax.Array, num_paths: int):
    """:func:`path_decomposition` with ``G`` returned as ``(G / c, log c)``: the sums are
    rescaled by a common factor at every block and the sampled paths one by one, so that
    no norm overflows or underflows where its value is representable."""
    n, d = branch_jacobians.shape[0], branch_jacobians.shape[-1]
    G0 = jnp.zeros((n + 1, d), v.dtype).at[0].set(v)

    def exact_step(carry, J):
        G, log_c = carry
        through = G @ J  # row k: (J^T G_k)^T
        G = G + jnp.concatenate([jnp.zeros_like(G[:1]), through[:-1]])
        c = jnp.max(norm(G))
        return (G / jnp.where(c > 0, c, 1), log_c + jnp.log(c)), None

    (G, log_c), _ = jax.lax.scan(exact_step, (G0, jnp.zeros((), v.dtype)), branch_jacobians)

    # A path of length k takes the branch at the blocks whose random rank is below k.
    keys = jax.random.split(key, num_paths)
    ranks = jax.vmap(lambda k: jax.random.permutation(k, n))(keys)  # (M, n)
    take = ranks[None, :, :] < jnp.arange(n + 1)[:, None, None]  # (n+1, M, n)
    n_v = norm(v)
    g0 = jnp.broadcast_to(v / jnp.where(n_v > 0, n_v, 1), (n + 1, num_paths, d))
    log0 = jnp.broadcast_to(jnp.log(n_v), (n + 1, num_paths))

    def path_step(carry, inp):  # every path kept at norm 1, its log scale aside
        g, log_s = carry
        J, take_l = inp
        g = jnp.where(take_l[..., None], g @ J, g)
        r = norm(g)
        return (g / jnp.where(r > 0, r, 1)[..., None], log_s + jnp.log(r)), None

    (_, log_s), _ = jax.lax.scan(
        path_step, (g0, log0), (branch_jacobians, jnp.moveaxis(take, -1, 0))
    )
    per_path = jnp.exp(logsumexp(log_s, axis=1) - jnp.log(num_paths))
    return G, log_c, per_path


@over_trace(jac=True, blocks=True, static_argnums=(3,))
def _path_gradients(model: Model, tr, key: jax.Array, num_paths):
    records = list(tr.records)
    first = next(i for i, r in enumerate(records) if r.branch is not None)
    n = sum(r.out.shape[1] for r in records[first:] if r.branch is not None)
    out0 = records[-1].out[:, -1]
    v = normal(key, out0.shape, out0.dtype)  # drawn in float32: the same in both precisions
    keys = jax.random.split(jax.random.fold_in(key, 1), out0.shape[0])

    def one(v, key, segments):
        ranks = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, num_paths))
        take = ranks[None, :, :] < jnp.arange(n + 1)[:, None, None]  # (n+1, M, n)
        n_v = norm(v)
        carry = (
            jnp.zeros((n + 1, v.shape[0]), v.dtype).at[0].set(v),  # G_k, rescaled
            jnp.zeros((), v.dtype),  # log of G's scale
            jnp.broadcast_to(v / jnp.where(n_v > 0, n_v, 1), (n + 1, num_paths, v.shape[0])),
            jnp.broadcast_to(jnp.log(n_v), (n + 1, num_paths)),  # log of each path's scale
            jnp.zeros((), jnp.int32),  # blocks passed so far, from the output
        )

        def step(carry, jacs):  # one layer, from the output down
            G, log_c, g, log_s, b = carry
            J, J_s, J_r, J_p = jacs
            if J_r is None:  # not a block: every path passes through it
                G, g = G @ J, g @ J
            else:
                if J_p is not None:
                    G, g = G @ J_p, g @ J_p
                skip_G, skip_g = (G, g) if J_s is None else (G @ J_s, g @ J_s)
                through = G @ J_r
                G = skip_G + jnp.concatenate([jnp.zeros_like(through[:1]), through[:-1]])
                g = jnp.where(take[:, :, b, None], g @ J_r, skip_g)
                b = b + 1
            c = jnp.max(norm(G))
            rn = norm(g)
            return (
                G / jnp.where(c > 0, c, 1),
                log_c + jnp.log(c),
                g / jnp.where(rn > 0, rn, 1)[..., None],
                log_s + jnp.log(rn),
                b,
            ), None

        for jacs in segments[::-1]:  # a Python loop over the few segments, a scan within
            if jacs[0].shape[0] == 1:
                carry, _ = step(carry, jax.tree_util.tree_map(lambda a: a[0], jacs))
            else:
                carry, _ = jax.lax.scan(
                    step, carry, jax.tree_util.tree_map(lambda a: a[::-1], jacs)
                )
        G, log_c, _, log_s, _ = carry
        per_path = jnp.exp(logsumexp(log_s, axis=1) - jnp.log(num_paths))
        return G, log_c, per_path

    segments = [(r.jac, r.skip_jac, r.branch_jac, r.post_jac) for r in records[first:]]
    G, log_c, per_path = jax.vmap(one)(v, keys, segments)
    exact = jnp.exp(log_norm(G) + log_c[:, None])
    full = jnp.exp(log_norm(G.sum(axis=1)) + log_c)
    return PathGradients(exact, per_path, full), finite_layers(tr)


def path_gradients(
    net: Model, params: Params, x, key: jax.Array, num_paths: int = 16
) -> PathGradients:
    """Gradient carried by residual paths of each length, per sample (Veit et al.).

    Args:
        net, params, x: as for every diagnostic (:func:`~jacobian_lab.driver.prepare`),
            ``net`` with residual blocks. A block ``post(s(f) + r(f))`` offers every path
            two ways, its skip (the identity, or a projection ``J_s``) and its branch
            ``J_r``, both followed by its post's Jacobian; a layer that is not a block
            after the first block (a head, a layer between stages) is on every path.
            Blocks may differ in size (a ResNet's stages).
        key: PRNG key for the output direction ``v`` and the sampled paths.
        num_paths: single paths sampled per length.

    Returns:
        :class:`PathGradients` over lengths ``0 .. n`` (``n`` blocks); the gradient is
        taken at the input of the first block; ``full`` is the whole gradient there, the
        sum over all ``2^n`` paths.
    """
    require_blocks(net)
    out, ok = _path_gradients(net, params, prepare(net, params, x), check_key(key), num_paths)
    check_finite(ok, net)
    if not bool(jnp.all(jnp.isfinite(out.exact) & jnp.isfinite(out.per_path))):
        check_values(out.exact, "the gradient summed over paths of one length")
        check_values(out.per_path, "the gradient of one path")
    return out
