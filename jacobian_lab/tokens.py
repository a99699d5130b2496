"""Token-level diagnostics: how alike the tokens of one sample become with depth.

For any model whose samples are token matrices ``X`` of shape ``(T, D)`` (``T`` tokens of
``D`` features; the built-in :func:`~jacobian_lab.transformer`, or a brought
:func:`~jacobian_lab.chain` whose layers map token matrices to token matrices), per layer
output ``f_l`` (reshaped to ``(T, -1)``, row-major) and per sample:

* **rank-collapse residual** (Dong, Cordonnier & Loukas 2021, arXiv 2103.03404, Sec. 2:
  ``res(X) = X - 1 x^T`` with ``x = argmin_x ||X - 1 x^T||``, the distance of ``X`` from
  the nearest matrix with identical rows). The paper bounds it in the composite norm
  ``||X||_{1,inf} = sqrt(||X||_1 ||X||_inf)`` (its Theorem 2.2: a pure self-attention
  network of ``L`` single-head layers has ``||res(SAN(X))|| <= (4 gamma beta /
  sqrt(d_qk))^{(3^L - 1)/2} ||res(X)||^{3^L}``, a cubic, doubly exponential rate). Here the
  Frobenius norm is used, for which the minimizer is the token mean ``x = X^T 1 / T``
  in closed form, and the residual is reported relative to the matrix's own norm:
  ``r(X) = ||X - 1 mean(X)^T||_F / ||X||_F`` in ``[0, 1]``; 0 exactly when all tokens are
  equal. (The paper's full text could not be read here; the definition above is
  reconstructed from its abstract and Sec. 2 as recalled, and the equation number of the
  bound is not checked.)
* **mean pairwise token cosine**: the mean of ``cos(x_s, x_t)`` over ordered pairs of
  distinct tokens ``s != t`` (the quantity whose growth with depth Noci et al. 2022,
  arXiv 2206.03126, Fig. 1 and Sec. 3, call rank collapse): 1 when every token points the
  same way, 0 for orthogonal tokens.
* for the built-in transformer, the **attention entropy** per head: the mean over queries
  ``t`` of ``-sum_s A_ts log A_ts`` (nats); ``log T`` for uniform attention, 0 for
  one-hot attention.

Every statistic of the layer outputs is computed from one recorded forward pass
(:func:`jacobian_lab.driver.trace`), so brought models work the same way.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jacobian_lab.checks import is_traced
from jacobian_lab.domain import mean_pairwise_cosine
from jacobian_lab.driver import (
    check_lengths,
    log_lengths,
    norm,
    over_trace,
    per_layer,
    prepare,
)
from jacobian_lab.model import Block, Model, Params, apply_unit, walk
from jacobian_lab.transformer import Transformer


class TokenStats(NamedTuple):
    """Token statistics per sample and layer, GSC-paper indexing (``l = 0`` the output,
    ``l = L`` the input ``x``).

    Fields:
        residual: ``(S, L+1)``; the relative rank-collapse residual
            ``||X - 1 mean(X)^T||_F / ||X||_F`` of ``f_l`` (see the module docstring).
        cosine: ``(S, L+1)``; the mean pairwise cosine of ``f_l``'s tokens.
    """

    residual: jax.Array
    cosine: jax.Array


def rank_collapse_residual(X: jax.Array) -> jax.Array:
    """``||X - 1 mean(X)^T||_F / ||X||_F`` for token matrices ``X`` of shape
    ``(..., T, D)`` (the mean over the ``T`` tokens); returns shape ``(...)``. The
    Frobenius-norm form of Dong et al.'s ``res(X)`` (module docstring); 0 when all tokens
    are equal, NaN for an all-zero ``X``."""
    centred = X - jnp.mean(X, axis=-2, keepdims=True)
    return norm(centred, (-2, -1)) / norm(X, (-2, -1))


def token_cosine(X: jax.Array) -> jax.Array:
    """Mean cosine between distinct tokens (rows) of ``X`` of shape ``(..., T, D)``,
    ``T >= 2``; returns shape ``(...)``. NaN when a token is zero."""
    return mean_pairwise_cosine(X)


def _tokens(v: jax.Array, seq_len: int, what: str) -> jax.Array:
    """``(S, ..., d) -> (S, ..., T, d / T)``, or a ValueError naming ``what``."""
    d = v.shape[-1]
    if d % seq_len:
        raise ValueError(
            f"{what} has {d} values per sample, not a multiple of seq_len={seq_len}: token "
            "statistics need every layer output to be a (seq_len, features) token matrix"
        )
    return v.reshape(*v.shape[:-1], seq_len, d // seq_len)


def token_statistics(model: Model, params: Params, x, *, seq_len: int | None = None) -> TokenStats:
    """Rank-collapse residual and mean token cosine of every layer output, per sample.

    Args:
        model: any per-example model whose layer outputs are token matrices: a
            :func:`~jacobian_lab.transformer`, or a chain of layers mapping ``(T, D)`` to
            ``(T, D')``; params: its params.
        x: token matrices ``(S, T, D)``.
        seq_len: ``T``; default ``x.shape[1]`` (give it for pytree inputs).

    Returns:
        :class:`TokenStats`, fields ``(S, L+1)`` in GSC-paper order. Raises
        ``FloatingPointError`` naming the layer where a layer output or one of its tokens is
        exactly zero (the residual or cosine would be 0/0).
    """
    if model.batch_coupled:
        raise ValueError(
            "token_statistics takes per-example models (one sample = one token matrix); this "
            "model is batch-coupled"
        )
    xs = prepare(model, params, x)
    if seq_len is None:
        leaves = jax.tree_util.tree_leaves(xs)
        if len(leaves) != 1 or leaves[0].ndim != 3:
            raise ValueError(
                "token_statistics needs x of shape (S, seq_len, width), or seq_len= for "
                "other inputs"
            )
        seq_len = int(leaves[0].shape[1])
    if seq_len < 2:
        raise ValueError(f"token statistics need at least 2 tokens, got seq_len={seq_len}")
    stats, log_len = _token_statistics(model, params, xs, seq_len)
    check_lengths(log_len, model)
    _check_cosines(stats.cosine, model)
    return stats


@over_trace(jac=False, static_argnums=(2,))
def _token_statistics(model: Model, tr, seq_len: int):
    first, res, cos = 0, [], []
    for r in tr.records:
        X = _tokens(r.out, seq_len, f"layer {first} ({model.names[first]!r})")
        res.append(rank_collapse_residual(X))
        cos.append(token_cosine(X))
        first += r.out.shape[1]
    X = _tokens(tr.x, seq_len, "the input x")
    stats = TokenStats(
        jnp.concatenate([per_layer(res), rank_collapse_residual(X)[:, None]], axis=1),
        jnp.concatenate([per_layer(cos), token_cosine(X)[:, None]], axis=1),
    )
    return stats, log_lengths(tr)


def _check_cosines(cos: jax.Array, model: Model) -> None:
    if is_traced(cos):
        return
    bad = np.asarray(jnp.any(~jnp.isfinite(cos), axis=0))
    if bad.any():
        l = int(np.flatnonzero(bad)[-1])
        where = "the input x" if l == bad.size - 1 else model.layer_label(l)
        raise FloatingPointError(
            f"a token of {where} is exactly zero (or not finite), so its cosine with the "
            "other tokens is undefined (0/0)"
        )


def _is_attention(model: Transformer, unit) -> bool:
    fn = unit.branch if isinstance(unit, Block) else unit.apply
    return fn in (model.attention, model.attention_layer)


@partial(jax.jit, static_argnums=0)
def _attention_weights(model: Transformer, params: Params, xs: jax.Array) -> jax.Array:
    T, H = model.seq_len, model.num_heads

    def tap(unit, p, h, _):
        out = apply_unit(unit, p, h)
        # every unit records an array of one shape: the scan stacks a group's records
        A = model.attention_weights(p, h) if _is_attention(model, unit) else None
        return out, jnp.zeros((H, T, T), out.dtype) if A is None else A

    def one(x):
        return jnp.concatenate(walk(model, params, x, tap)[1])[jnp.array(model.attention_layers)]

    return jax.vmap(one)(xs)


def attention_weights(model: Transformer, params: Params, x: jax.Array) -> jax.Array:
    """The attention matrices of every attention sublayer of a built-in transformer.

    Args:
        model: a :func:`~jacobian_lab.transformer`; params: its params.
        x: token matrices ``(S, seq_len, width)``.

    Returns:
        ``(S, num_blocks, num_heads, T, T)``, blocks from the input; ``[s, b, i, t]`` is
        the distribution of query ``t``'s attention over the keys in head ``i`` of block
        ``b + 1`` (``softmax(q k^T / sqrt(d_h))``, see :mod:`jacobian_lab.transformer`).
    """
    if not isinstance(model, Transformer):
        raise TypeError(
            "attention_weights reads the built-in transformer's attention "
            f"(jacobian_lab.transformer), got {type(model).__name__}"
        )
    return _attention_weights(model, params, prepare(model, params, x))


def attention_entropy(model: Transformer, params: Params, x: jax.Array) -> jax.Array:
    """Entropy of the attention per sample, block and head: the mean over queries ``t``
    of ``H(A_t) = -sum_s A_ts log A_ts`` in nats (``0 log 0 = 0``).

    Returns:
        ``(S, num_blocks, num_heads)``, blocks from the input; ``log seq_len`` for uniform
        attention (non-causal), 0 when every query attends to one key.
    """
    A = attention_weights(model, params, x)
    return jnp.mean(-jnp.sum(jax.scipy.special.xlogy(A, A), axis=-1), axis=-1)
