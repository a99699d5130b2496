"""A Vision Transformer written with Equinox the way Equinox users write it: a
convolutional patch embedding, a class token and a learned positional embedding, Pre-LN
blocks of ``eqx.nn.MultiheadAttention`` and an MLP with dropout, each block written for
one image (``jax.vmap`` over tokens inside), read whole by ``jl.chain``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp


class PatchEmbedding(eqx.Module):
    conv: eqx.nn.Conv2d

    def __init__(self, channels: int, dim: int, patch: int, key):
        self.conv = eqx.nn.Conv2d(channels, dim, patch, stride=patch, key=key)

    def __call__(self, x):  # (C, H, W) -> (patches, dim)
        y = self.conv(x)
        return y.reshape(y.shape[0], -1).T


class AttentionBlock(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm1 = eqx.nn.LayerNorm(dim)
        self.attention = eqx.nn.MultiheadAttention(heads, dim, key=k1)
        self.norm2 = eqx.nn.LayerNorm(dim)
        self.linear1 = eqx.nn.Linear(dim, hidden, key=k2)
        self.linear2 = eqx.nn.Linear(hidden, dim, key=k3)
        self.dropout = eqx.nn.Dropout(dropout)

    def __call__(self, x, key=None):
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        y = jax.vmap(self.norm1)(x)
        x = x + self.dropout(self.attention(y, y, y), key=k1)
        y = jax.vmap(self.norm2)(x)
        y = jax.nn.gelu(jax.vmap(self.linear1)(y))
        x = x + self.dropout(jax.vmap(self.linear2)(y), key=k2)
        return x


class VisionTransformer(eqx.Module):
    patch_embedding: PatchEmbedding
    cls_token: jax.Array
    positional_embedding: jax.Array
    blocks: list
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, *, image, patch, channels, dim, depth, heads, hidden, classes, key):
        keys = jax.random.split(key, depth + 4)
        patches = (image // patch) ** 2
        self.patch_embedding = PatchEmbedding(channels, dim, patch, keys[0])
        self.cls_token = jax.random.normal(keys[1], (1, dim), jnp.float32)
        self.positional_embedding = jax.random.normal(keys[2], (patches + 1, dim), jnp.float32)
        self.blocks = [AttentionBlock(dim, heads, hidden, 0.1, k) for k in keys[4:]]
        self.norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, classes, key=keys[3])
        self.dropout = eqx.nn.Dropout(0.1)

    def __call__(self, x, key=None):  # one image (C, H, W)
        keys = (
            [None] * (len(self.blocks) + 1)
            if key is None
            else jax.random.split(key, len(self.blocks) + 1)
        )
        x = self.patch_embedding(x)
        x = jnp.concatenate([self.cls_token, x], axis=0)
        x = x + self.positional_embedding
        x = self.dropout(x, key=keys[0])
        for block, k in zip(self.blocks, keys[1:], strict=True):
            x = block(x, key=k)
        return self.head(self.norm(x[0]))


SIZES = {
    "tiny": {"image": 8, "patch": 4, "dim": 8, "depth": 2, "heads": 2, "hidden": 16, "batch": 3},
    "small": {
        "image": 32,
        "patch": 4,
        "dim": 64,
        "depth": 6,
        "heads": 4,
        "hidden": 128,
        "batch": 8,
    },
}


def make(size: str = "tiny", key=None, dtype=jnp.float32):
    """``(model, x)``: images ``(B, 3, H, W)`` (the model takes one image at a time)."""
    cfg = dict(SIZES[size])
    key = jax.random.PRNGKey(0) if key is None else key
    batch = cfg.pop("batch")

    @eqx.filter_jit
    def create(key):
        model = VisionTransformer(channels=3, classes=10, key=key, **cfg)
        return jax.tree_util.tree_map(
            lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model
        )

    model = create(key)
    shape = (batch, 3, cfg["image"], cfg["image"])
    x = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32).astype(dtype)
    return model, x
