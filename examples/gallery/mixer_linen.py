"""MLP-Mixer written with Flax linen as in its reference implementation (token mixing on
``jnp.swapaxes(y, 1, 2)``, which assumes a leading batch axis), read whole by
``jl.chain``. The head uses Flax's default initialization (the reference zero-initializes
it for fine-tuning, which makes the output 0 and the GSC undefined at initialization).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.mlp_dim)(x)
        y = nn.gelu(y)
        return nn.Dense(x.shape[-1])(y)


class MixerBlock(nn.Module):
    tokens_mlp_dim: int
    channels_mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = jnp.swapaxes(y, 1, 2)
        y = MlpBlock(self.tokens_mlp_dim, name="token_mixing")(y)
        y = jnp.swapaxes(y, 1, 2)
        x = x + y
        y = nn.LayerNorm()(x)
        return x + MlpBlock(self.channels_mlp_dim, name="channel_mixing")(y)


class MlpMixer(nn.Module):
    patches: tuple[int, int]
    num_classes: int
    num_blocks: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int

    @nn.compact
    def __call__(self, inputs, *, train=False):
        x = nn.Conv(self.hidden_dim, self.patches, strides=self.patches, name="stem")(inputs)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        for _ in range(self.num_blocks):
            x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim)(x)
        x = nn.LayerNorm(name="pre_head_layer_norm")(x)
        x = jnp.mean(x, axis=1)
        return nn.Dense(self.num_classes, name="head")(x)


SIZES = {
    "tiny": {
        "image": 8,
        "patch": 4,
        "hidden": 8,
        "blocks": 2,
        "tokens": 8,
        "channels": 16,
        "batch": 3,
    },
    "small": {
        "image": 32,
        "patch": 4,
        "hidden": 64,
        "blocks": 8,
        "tokens": 32,
        "channels": 128,
        "batch": 8,
    },
}


def make(size: str = "tiny", key=None, dtype=jnp.float32):
    """``(model bound to its variables, x)``: images ``(B, H, W, 3)``."""
    cfg = SIZES[size]
    key = jax.random.PRNGKey(0) if key is None else key
    p = cfg["patch"]
    model = MlpMixer((p, p), 10, cfg["blocks"], cfg["hidden"], cfg["tokens"], cfg["channels"])
    shape = (cfg["batch"], cfg["image"], cfg["image"], 3)
    x = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32).astype(dtype)
    init = jax.jit(lambda k: jax.tree.map(lambda a: a.astype(dtype), model.init(k, x)))
    variables = init(key)
    return model.bind(variables), x
