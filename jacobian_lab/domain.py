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

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jacobian_lab.networks import Network, Params


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


@partial(jax.jit, static_argnums=0)
def _domain_statistics(net: Network, params: Params, x: jax.Array) -> DomainStats:
    acts, z = net.activations_and_preactivations(params, x)  # one forward pass
    # images (conv nets): every pixel-channel is a unit
    acts, z = (a.reshape(*a.shape[:2], -1) for a in (acts, z))
    cos_layers = mean_pairwise_cosine(acts)
    return DomainStats(
        jnp.concatenate([cos_layers, mean_pairwise_cosine(x.reshape(x.shape[0], -1))[None]]),
        sign_diversity(z),
        jnp.mean(jnp.std(z, axis=-2), axis=-1),
    )


def domain_statistics(net: Network, params: Params, x: jax.Array) -> DomainStats:
    """Collapsing-domain measurements of a plain network at every layer.

    Args:
        net: a plain network (:func:`jacobian_lab.mlp`); params: its parameters.
        x: a batch of at least 2 inputs ``(B, in_dim)``.

    Returns:
        :class:`DomainStats` (shapes there).
    """
    if not isinstance(net, Network) or net.residual:
        raise ValueError(
            "domain_statistics takes a plain network (jacobian_lab.mlp): it needs each "
            "layer's pre-activations"
        )
    net.check_input(x)
    if x.shape[0] < 2:
        raise ValueError("domain_statistics needs a batch of at least 2 inputs")
    return _domain_statistics(net, params, x)
