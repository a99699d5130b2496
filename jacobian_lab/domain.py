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

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jacobian_lab.driver import check_lengths, log_lengths, over_trace, per_layer, prepare
from jacobian_lab.model import Layer, Model, Params, stage_size, unit_of


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
    inputs); returns shape ``(...)``. A neuron that is zero for every input counts 0."""
    P = jnp.sum(z > 0, axis=-2)
    N = jnp.sum(z < 0, axis=-2)
    ratio = jnp.minimum(P, N) / jnp.maximum(P + N, 1)
    return jnp.mean(ratio, axis=-1)


@over_trace(jac=False, pre=True, static_argnums=(2,))
def _domain_statistics(model: Model, tr, batch: int) -> DomainStats:
    acts, z = (per_layer([getattr(r, f) for r in tr.records]) for f in ("out", "pre"))
    x = tr.x
    if model.batch_coupled:  # one sample is the batch: its rows are the inputs
        acts, z = (a[0].reshape(a.shape[1], batch, -1) for a in (acts, z))
        x = x[0].reshape(batch, -1)
    else:
        acts, z = (jnp.swapaxes(a, 0, 1) for a in (acts, z))  # (L, B, size)
    stats = DomainStats(
        jnp.concatenate([mean_pairwise_cosine(acts), mean_pairwise_cosine(x)[None]]),
        sign_diversity(z),
        jnp.mean(jnp.std(z, axis=-2), axis=-1),
    )
    return stats, log_lengths(tr)


def domain_statistics(net: Model, params: Params, x) -> DomainStats:
    """Collapsing-domain measurements at every layer.

    Args:
        net: any model whose layers know their pre-activations: a plain built-in network
            (:func:`jacobian_lab.mlp`, :func:`jacobian_lab.convnet`), or a chain whose layers
            end in a parameter-free activation (``Linear, relu`` reads the ``Linear``
            output as the pre-activation); params: its parameters.
        x: a batch of at least 2 inputs ``(B, in_dim)`` (a batch-norm model: one batch).

    Returns:
        :class:`DomainStats` (shapes there). Images and pytrees count every scalar as a
        unit.
    """
    i = 0
    for stage in net.stages:
        unit = unit_of(stage)
        if not isinstance(unit, Layer) or unit.preactivation is None:
            raise ValueError(
                f"domain_statistics needs every layer's pre-activation, and layer {i} "
                f"({net.names[i]!r}) has none (a residual block, or a layer without a "
                "parameter-free activation after it). Give the chain layers that end in "
                "their activation (e.g. [Linear, relu, Linear, relu, ...]), or a plain "
                "built-in network"
            )
        i += stage_size(stage)
    xs = prepare(net, params, x)
    batch = int(jax.tree_util.tree_leaves(xs)[0].shape[1 if net.batch_coupled else 0])
    if batch < 2 or (net.batch_coupled and jax.tree_util.tree_leaves(xs)[0].shape[0] != 1):
        raise ValueError("domain_statistics needs one batch of at least 2 inputs")
    stats, log_len = _domain_statistics(net, params, xs, batch)
    check_lengths(log_len, net)  # a zero layer output makes its cosines 0/0
    return stats
