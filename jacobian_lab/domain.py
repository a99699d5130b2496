"""Collapsing domain: how the representations of different inputs become alike with depth.

Philipp et al. (arXiv 1712.05577) show that some architectures avoid exploding gradients
only because their domain collapses: deep layers see nearly the same input whatever the
network's input, so each nonlinearity acts on a small region where it is close to linear
("pseudo-linear") and the network computes a nearly linear function. Three measurements
per layer, over a batch of inputs:

* **cosine**: the mean cosine similarity between the layer outputs of two different
  inputs (near 1 when the domain has collapsed to a ray);
* **sign diversity** of the pre-activations: for each neuron, ``min(P, N) / (P + N)`` with
  ``P`` and ``N`` the number of inputs giving a positive and a negative value, averaged over
  neurons (0 when every neuron is on one side of ReLU's kink for all inputs; 1/2 at most);
* **pre-activation standard deviation**: per neuron, the standard deviation across inputs,
  averaged over neurons (small values put tanh in its linear regime).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jacobian_lab.driver import check_lengths, log_lengths, over_trace, prepare
from jacobian_lab.model import Model, Params, layer_units


class DomainStats(NamedTuple):
    """Collapsing-domain measurements, GSC-paper indexing (0 = output).

    Fields:
        cosine: ``(L+1,)``; mean pairwise cosine between the representations ``f_l`` of
            distinct inputs, for ``l = 0 .. L`` (``l = L``: the inputs themselves).
        sign_diversity: ``(L,)``; mean over neurons of ``min(P, N) / (P + N)`` for the
            pre-activations of layer ``l`` (zeros count as neither sign).
        preact_std: ``(L,)``; mean over neurons of the standard deviation across inputs of
            the pre-activations of layer ``l``.
    """

    cosine: jax.Array
    sign_diversity: jax.Array
    preact_std: jax.Array


def mean_pairwise_cosine(h: jax.Array) -> jax.Array:
    """Mean cosine similarity between distinct rows of ``h`` of shape ``(..., B, d)``;
    returns shape ``(...)``. Needs ``B >= 2``."""
    B = h.shape[-2]
    if B < 2:
        raise ValueError("the pairwise cosine needs at least 2 inputs")
    # scaled by each row's largest entry first: a row whose norm overflows (entries finite)
    # keeps its direction instead of becoming 0; a zero row stays 0/0 = NaN
    m = jnp.max(jnp.abs(h), axis=-1, keepdims=True)
    h = h / jnp.where(m > 0, m, 1)
    u = h / jnp.linalg.norm(h, axis=-1, keepdims=True)
    gram = u @ jnp.swapaxes(u, -1, -2)
    off_diagonal = jnp.sum(gram, axis=(-2, -1)) - jnp.trace(gram, axis1=-2, axis2=-1)
    return off_diagonal / (B * (B - 1))


def sign_diversity(z: jax.Array) -> jax.Array:
    """Mean over neurons of ``min(P, N) / (P + N)`` for pre-activations ``z`` of shape
    ``(..., B, d)`` (``P``, ``N``: counts of positive and negative values over the ``B``
    inputs); returns shape ``(...)``. A neuron that is zero for every input counts 0; a
    neuron with a NaN pre-activation (not known, or padding) is left out, and the result
    is NaN when every neuron is."""
    P = jnp.sum(z > 0, axis=-2)
    N = jnp.sum(z < 0, axis=-2)
    ratio = jnp.minimum(P, N) / jnp.maximum(P + N, 1)
    ratio = jnp.where(jnp.any(jnp.isnan(z), axis=-2), jnp.nan, ratio)  # NaN: not known
    return jnp.nanmean(ratio, axis=-1)


@over_trace(jac=False, pre=True, static_argnums=(2,))
def _domain_statistics(model: Model, tr, batch: int) -> DomainStats:
    def rows(a):  # (S, n, d) -> (n, B, d): per layer, one row per input
        if model.batch_coupled:  # one sample is the batch: its rows are the inputs
            return a[0].reshape(a.shape[1], batch, -1)
        return jnp.swapaxes(a, 0, 1)

    cos, div, std = [], [], []
    for r in tr.records:  # segment by segment: layers of different sizes
        acts, z = rows(r.out), rows(r.pre)
        cos.append(mean_pairwise_cosine(acts))
        div.append(sign_diversity(z))
        std.append(jnp.nanmean(jnp.std(z, axis=-2), axis=-1))  # NaN neurons: not known
    x = tr.x[0].reshape(batch, -1) if model.batch_coupled else tr.x
    stats = DomainStats(
        jnp.concatenate([jnp.concatenate(cos)[::-1], mean_pairwise_cosine(x)[None]]),
        jnp.concatenate(div)[::-1],
        jnp.concatenate(std)[::-1],
    )
    return stats, log_lengths(tr)


def domain_statistics(net: Model, params: Params, x) -> DomainStats:
    """Collapsing-domain measurements at every layer.

    Args:
        net: any model; params: its parameters. The pre-activation statistics need the
            value fed into each layer's nonlinearity, which built-in networks give (a
            residual block: its branch's last nonlinearity), a chain's layers give when
            they end in a parameter-free activation (``Linear, relu`` reads the ``Linear``
            output), and a model read whole by ``jl.chain(model, x)`` gives where a unit
            ends in an elementwise nonlinearity (a block: where its branch has one).
        x: a batch of at least 2 inputs ``(B, in_dim)`` (a batch-norm model: one batch).

    Returns:
        :class:`DomainStats` (shapes there). Images and pytrees count every scalar as a
        unit. The cosine is defined for every layer; ``sign_diversity`` and
        ``preact_std`` are NaN at a layer whose pre-activation is unknown (an attention
        sublayer, a layer that does not end in a nonlinearity), with one
        :class:`DomainWarning` naming those layers.
    """
    xs = prepare(net, params, x)
    batch = int(jax.tree_util.tree_leaves(xs)[0].shape[1 if net.batch_coupled else 0])
    if batch < 2 or (net.batch_coupled and jax.tree_util.tree_leaves(xs)[0].shape[0] != 1):
        raise ValueError("domain_statistics needs one batch of at least 2 inputs")
    stats, log_len = _domain_statistics(net, params, xs, batch)
    check_lengths(log_len, net)  # a zero layer output makes its cosines 0/0
    unknown = [net.names[i] for i, u in enumerate(layer_units(net)) if u.preactivation is None]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:4])
        more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        warnings.warn(
            f"domain_statistics: {len(unknown)} layer(s) have no known pre-activation "
            f"({shown}{more}): their sign_diversity and preact_std are NaN (the cosine is "
            "measured at every layer)",
            DomainWarning,
            stacklevel=2,
        )
    return stats


class DomainWarning(UserWarning):
    """Some layers have no known pre-activation: their pre-activation statistics are NaN."""
