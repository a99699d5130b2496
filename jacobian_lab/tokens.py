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

import warnings
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
from jacobian_lab.model import Model, Params, apply_unit, forward, walk


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
        model: any per-example model whose layer outputs are token matrices ``(T, D)``
            (a :func:`~jacobian_lab.transformer`, a ViT or a language model read by
            :func:`~jacobian_lab.chain`, a chain of layers mapping ``(T, D)`` to
            ``(T, D')``); params: its params.
        x: its inputs (token matrices ``(S, T, D)``, images, token ids).
        seq_len: ``T``; default: the number of rows of most of the two-dimensional layer
            outputs (and the input). Given, flat layer outputs whose size is a multiple of
            it count as token matrices too.

    Returns:
        :class:`TokenStats`, fields ``(S, L+1)`` in GSC-paper order; NaN at a layer output
        (or the input) that is not a ``(T, features)`` token matrix (an image, a
        classifier's output), with one :class:`TokenWarning` naming them. Raises
        ``FloatingPointError`` naming the layer where a layer output or one of its tokens is
        exactly zero (the residual or cosine would be 0/0), ``ValueError`` when no layer
        output is a token matrix.
    """
    if model.batch_coupled:
        raise ValueError(
            "token_statistics takes per-example models (one sample = one token matrix); this "
            "model is batch-coupled"
        )
    xs = prepare(model, params, x)
    one = jax.tree_util.tree_map(lambda v: v[0], xs)
    segments = jax.eval_shape(lambda v: forward(model, params, v)[1], one)
    # per record segment (one stage, or one copy of it), a layer's output shape
    shapes = [tuple(g.shape[1:]) if hasattr(g, "shape") else None for g in segments]
    counts = [jax.tree_util.tree_leaves(g)[0].shape[0] for g in segments]
    x_shape = tuple(one.shape) if hasattr(one, "shape") else None
    flat_ok = seq_len is not None  # given: flat outputs of a multiple of it are tokens too
    if seq_len is None:
        candidates = [t[0] for t in (x_shape, *shapes) if t is not None and len(t) == 2]
        if not candidates:
            raise ValueError(
                "token_statistics needs layer outputs that are token matrices (seq_len, "
                "features); none of this model's is: give seq_len= for flat outputs"
            )
        seq_len = max(dict.fromkeys(candidates), key=candidates.count)
    if seq_len < 2:
        raise ValueError(f"token statistics need at least 2 tokens, got seq_len={seq_len}")

    def is_tokens(t):
        return t is not None and (
            (len(t) == 2 and t[0] == seq_len) or (flat_ok and len(t) == 1 and t[0] % seq_len == 0)
        )

    mask = tuple(is_tokens(t) for t in shapes)
    x_ok = is_tokens(x_shape)
    stats, log_len = _token_statistics(model, params, xs, seq_len, mask, x_ok)
    check_lengths(log_len, model)
    layer_ok = [ok for ok, n in zip(mask, counts, strict=True) for _ in range(n)]
    _check_cosines(stats.cosine, model, np.array([*layer_ok[::-1], x_ok]))
    skipped = [repr(model.names[i]) for i, ok in enumerate(layer_ok) if not ok]
    skipped += [] if x_ok else ["the input"]
    if skipped:
        more = f" and {len(skipped) - 4} more" if len(skipped) > 4 else ""
        warnings.warn(
            f"token_statistics: {', '.join(skipped[:4])}{more} are not ({seq_len}, "
            "features) token matrices: their residual and cosine are NaN",
            TokenWarning,
            stacklevel=2,
        )
    return stats


class TokenWarning(UserWarning):
    """Some layer outputs are not token matrices: their token statistics are NaN."""


@over_trace(jac=False, static_argnums=(2, 3, 4))
def _token_statistics(model: Model, tr, seq_len: int, mask: tuple, x_ok: bool):
    res, cos = [], []
    for r, ok in zip(tr.records, mask, strict=True):
        if ok:
            X = _tokens(r.out, seq_len, "a layer")
            res.append(rank_collapse_residual(X))
            cos.append(token_cosine(X))
        else:
            nan = jnp.full(r.out.shape[:2], jnp.nan, r.out.dtype)
            res.append(nan)
            cos.append(nan)
    if x_ok:
        X = _tokens(tr.x, seq_len, "the input x")
        x_res, x_cos = rank_collapse_residual(X), token_cosine(X)
    else:
        x_res = x_cos = jnp.full(tr.x.shape[:1], jnp.nan, tr.x.dtype)
    stats = TokenStats(
        jnp.concatenate([per_layer(res), x_res[:, None]], axis=1),
        jnp.concatenate([per_layer(cos), x_cos[:, None]], axis=1),
    )
    return stats, log_lengths(tr)


def _check_cosines(cos: jax.Array, model: Model, measured: np.ndarray) -> None:
    """Raise naming the first layer (GSC order columns of ``cos``) that was ``measured``
    and whose cosine is not finite."""
    if is_traced(cos):
        return
    bad = ~np.all(np.isfinite(np.asarray(cos)), axis=0) & measured
    if bad.any():
        l = int(np.flatnonzero(bad)[-1])
        where = "the input x" if l == bad.size - 1 else model.layer_label(l)
        raise FloatingPointError(
            f"a token of {where} is exactly zero (or not finite), so its cosine with the "
            "other tokens is undefined (0/0)"
        )


@partial(jax.jit, static_argnums=0)
def _attention_weights(model: Model, params: Params, xs, shape) -> jax.Array:
    def tap(unit, p, h, _):
        out = apply_unit(unit, p, h)
        # every unit records an array of one shape: the scan stacks a group's records
        A = None if unit.attention is None else unit.attention(p, h)
        return out, jnp.zeros(shape.shape, shape.dtype) if A is None else A

    def one(x):
        return jnp.concatenate(walk(model, params, x, tap)[1])[jnp.array(model.attention_layers)]

    return jax.vmap(one)(xs)


def attention_weights(model: Model, params: Params, x) -> jax.Array:
    """The attention matrices of every attention layer of a model.

    Args:
        model: a model with attention layers: a :func:`~jacobian_lab.transformer`, or a
            model read whole by :func:`~jacobian_lab.chain` whose sublayers compute a
            softmax attention (Flax linen ``MultiHeadDotProductAttention``, Flax NNX
            ``MultiHeadAttention``, Equinox ``MultiheadAttention``, a layer calling
            ``jax.nn.dot_product_attention`` or ``jax.nn.softmax`` of query-key scores);
            params: its params.
        x: its inputs (token matrices ``(S, T, width)``; token ids for a read language
            model).

    Returns:
        ``(S, A, heads, T, T)`` over the ``A`` attention layers (``model.attention_layers``,
        from the input); ``[s, a, i, t]`` is the distribution of query ``t``'s attention
        over the keys in head ``i`` of attention layer ``a`` (the built-in transformer's
        is ``softmax(q k^T / sqrt(d_h))``, see :mod:`jacobian_lab.transformer`). In a read
        model the weights are the output of the first softmax of the sublayer's branch
        (exponentials divided by their sum over the keys), the leading singleton axes
        dropped.

    Raises:
        TypeError: the model has no attention layer; ValueError: its attention layers
            differ in shape (heads or tokens).
    """
    if not model.attention_layers:
        raise TypeError(
            f"this {type(model).__name__} has no attention layers (none of its units "
            "computes attention weights): attention_weights reads a jl.transformer, or a "
            "model read by jl.chain(model, x) whose sublayers compute a softmax attention"
        )
    xs = prepare(model, params, x)
    shapes: set = set()

    def tap(unit, p, h, _):  # the weights' shapes, traced without computing anything
        if unit.attention is not None:
            A = unit.attention(p, h)
            shapes.add(jax.ShapeDtypeStruct(A.shape, A.dtype))
        return apply_unit(unit, p, h), jnp.zeros(())

    jax.eval_shape(
        lambda v: walk(model, params, v, tap), jax.tree_util.tree_map(lambda v: v[0], xs)
    )
    if len(shapes) != 1:
        raise ValueError(
            f"the attention layers differ in shape ({sorted(str(s.shape) for s in shapes)}); "
            "attention_weights stacks them: pass a model with one attention shape"
        )
    return _attention_weights(model, params, xs, shapes.pop())


def attention_entropy(model: Model, params: Params, x) -> jax.Array:
    """Entropy of the attention per sample, block and head: the mean over queries ``t``
    of ``H(A_t) = -sum_s A_ts log A_ts`` in nats (``0 log 0 = 0``).

    Args: as :func:`attention_weights` (any model with attention layers).

    Returns:
        ``(S, A, heads)`` over the attention layers, from the input; ``log T`` for uniform
        attention (non-causal), 0 when every query attends to one key.
    """
    A = attention_weights(model, params, x)
    return jnp.mean(-jnp.sum(jax.scipy.special.xlogy(A, A), axis=-1), axis=-1)
