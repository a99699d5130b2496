"""ResNet-18 for CIFAR-10, written with Flax linen the way Flax users write it
(``@nn.compact`` BasicBlocks with BatchNorm and projection shortcuts, a ``train`` flag),
read whole by ``jl.chain``.

With ``train=True`` (the call's default) every BatchNorm normalizes with the batch's own
statistics, so one sample is the whole batch; with ``kwargs={"train": False}`` it uses its
running averages and the model is per-example.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp


class BasicBlock(nn.Module):
    filters: int
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.kaiming_normal())
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        residual = x
        y = conv(self.filters, (3, 3), self.strides)(x)
        y = norm()(y)
        y = nn.relu(y)
        y = conv(self.filters, (3, 3))(y)
        y = norm()(y)
        if residual.shape != y.shape:
            residual = conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class ResNet18(nn.Module):
    num_classes: int = 10
    widths: Sequence[int] = (64, 128, 256, 512)
    blocks_per_stage: Sequence[int] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        for i, (width, blocks) in enumerate(zip(self.widths, self.blocks_per_stage, strict=True)):
            for j in range(blocks):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = BasicBlock(width, strides)(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


SIZES = {
    "tiny": {"widths": (4, 8, 8, 16), "image": 8, "batch": 2},
    "small": {"widths": (16, 32, 64, 128), "image": 32, "batch": 8},
}


def make(size: str = "tiny", key=None, dtype=jnp.float32):
    """``(model bound to its variables, x)``: CIFAR-shaped inputs ``(B, H, W, 3)``."""
    cfg = SIZES[size]
    key = jax.random.PRNGKey(0) if key is None else key
    model = ResNet18(widths=cfg["widths"])
    x = jax.random.normal(jax.random.fold_in(key, 1), (cfg["batch"], cfg["image"], cfg["image"], 3))
    x = x.astype(dtype)
    init = jax.jit(lambda k: jax.tree.map(lambda a: a.astype(dtype), model.init(k, x, train=False)))
    variables = init(key)
    return model.bind(variables), x
