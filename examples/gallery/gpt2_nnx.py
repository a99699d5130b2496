"""A GPT-2-style decoder written with Flax NNX the way NNX users write it: token and
position embeddings with dropout, Post-LN blocks (``LN(x + attn(x))``, then
``LN(x + mlp(x))``) with causal ``nnx.MultiHeadAttention`` and dropout, and an output
layer tied to the token embedding (``wte.attend``). It takes integer token ids; read whole
by ``jl.chain``, the analysis starts at the embedding's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, dropout: float, *, rngs: nnx.Rngs, dtype):
        kw = {"param_dtype": jnp.float32, "dtype": dtype, "rngs": rngs}
        self.attn = nnx.MultiHeadAttention(heads, dim, dropout_rate=dropout, decode=False, **kw)
        self.ln_1 = nnx.LayerNorm(dim, **kw)
        self.fc = nnx.Linear(dim, 4 * dim, **kw)
        self.proj = nnx.Linear(4 * dim, dim, **kw)
        self.ln_2 = nnx.LayerNorm(dim, **kw)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x, mask):
        x = self.ln_1(x + self.dropout(self.attn(x, mask=mask)))
        x = self.ln_2(x + self.dropout(self.proj(nnx.gelu(self.fc(x)))))
        return x


class GPT(nnx.Module):
    def __init__(self, vocab, context, dim, depth, heads, dropout=0.1, *, rngs, dtype=jnp.float32):
        self.wte = nnx.Embed(vocab, dim, param_dtype=jnp.float32, dtype=dtype, rngs=rngs)
        self.wpe = nnx.Embed(context, dim, param_dtype=jnp.float32, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.blocks = nnx.List(
            [Block(dim, heads, dropout, rngs=rngs, dtype=dtype) for _ in range(depth)]
        )

    def __call__(self, ids):  # (B, T) token ids
        mask = nnx.make_causal_mask(ids)
        x = self.wte(ids) + self.wpe(jnp.arange(ids.shape[-1]))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, mask)
        return self.wte.attend(x)


SIZES = {
    "tiny": {"vocab": 32, "context": 8, "dim": 8, "depth": 2, "heads": 2, "batch": 3},
    "small": {"vocab": 256, "context": 32, "dim": 64, "depth": 6, "heads": 4, "batch": 4},
}


def make(size: str = "tiny", key=None, dtype=jnp.float32):
    """``(model, ids)``: token ids ``(B, T)``."""
    cfg = dict(SIZES[size])
    key = jax.random.PRNGKey(0) if key is None else key
    batch = cfg.pop("batch")

    @nnx.jit
    def create(key):
        rngs = nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 7))
        model = GPT(**cfg, rngs=rngs, dtype=dtype)
        # drawn in float32 (param_dtype), computed in dtype: a float64 model has its
        # float32 twin's weights
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda a: a.astype(dtype), params))
        return model

    model = create(key)
    ids = jax.random.randint(jax.random.fold_in(key, 1), (batch, cfg["context"]), 0, cfg["vocab"])
    return model, ids
