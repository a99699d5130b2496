"""Transformers at initialization: stacks of softmax self-attention and MLP sublayers.

A :class:`Transformer` (build it with :func:`transformer`) is a
:class:`~jacobian_lab.model.Model` like the built-in MLPs: one sample is one token
matrix ``X`` of shape ``(seq_len, width)`` (token embeddings; there is no vocabulary and
no positional encoding), and its stages are::

    Repeat((attn, mlp), num_blocks)     one group per transformer block, under lax.scan
    Layer(final_norm)                   norm="pre" only (the Pre-LN transformer's last LN)

so compile time does not grow with ``num_blocks``, and there are ``L = 2 num_blocks``
layer outputs (``num_blocks``, attention only, with ``mlp_ratio=0``; one more with the
final norm). Every sublayer ``F`` (attention or MLP) is its own residual
:class:`~jacobian_lab.model.Block`, so every block diagnostic reads it per sublayer::

    norm="pre"   (Pre-LN, Xiong et al. 2020, Fig. 1b):  h -> h + alpha F(LN(h))
    norm="post"  (Post-LN, Vaswani et al. 2017):        h -> LN(h + alpha F(h))
    norm="none":                                         h -> h + alpha F(h)

with ``alpha = residual_scale`` (e.g. ``num_blocks ** -0.5``, Noci et al. 2022). With
``skips=False`` the identity is dropped and each sublayer is a plain
:class:`~jacobian_lab.model.Layer`: ``LN(h) -> alpha F(LN(h))``, ``LN(alpha F(h))``,
``alpha F(h)``. ``LN`` normalizes each token (row of ``X``) to mean 0 and variance 1 over
its ``width`` features, without an affine part (its scale 1 and shift 0 at
initialization), as :func:`jacobian_lab.networks.normalize` does.

Sublayers on one token matrix ``X`` (``T = seq_len`` rows, ``D = width``; every dense map
is ``X @ W.T + b``; ``H = num_heads`` heads of ``d_h = D / H`` features, head ``i`` owning
features ``i d_h .. (i+1) d_h - 1`` of ``q``, ``k``, ``v`` and of the input of ``o``)::

    attention:  A_i = softmax(q_i k_i^T / sqrt(d_h))  (row-wise; causal: key s <= query t)
                F(X) = concat_i(A_i v_i) @ W_o.T + b_o        (Vaswani et al. 2017, eq. 1)
    mlp:        F(X) = act(X @ W_up.T + b_up) @ W_down.T + b_down

**Parameter layout** (``N = num_blocks``, ``M = mlp_ratio * width``; every array stacked
on a leading block axis ``N``)::

    {"blocks": {
        "attn": {"q": {"W": (N, D, D), "b": (N, D)},
                 "k": {"W": (N, D, D), "b": (N, D)},
                 "v": {"W": (N, D, D), "b": (N, D)},
                 "o": {"W": (N, D, D), "b": (N, D)}},
        "mlp":  {"up":   {"W": (N, M, D), "b": (N, M)},      (absent when mlp_ratio=0)
                 "down": {"W": (N, D, M), "b": (N, D)}}}}

Layer norms have no params. **Initialization**: every ``W`` i.i.d. ``N(0, 1/fan_in)``
(LeCun normal, the variance-preserving choice: the default kernel initializer of Flax's
``nnx.MultiHeadAttention`` and ``nnx.Linear``, and the ``sigma^2/d`` scaling of the
weights in the signal-propagation analysis of Noci et al. 2022, arXiv 2206.03126), every
``b`` zero (as in BERT and GPT-2), the attention logits scaled by ``1/sqrt(d_h)``
(Vaswani et al. 2017, eq. 1).

Layer outputs follow the GSC paper's indexing (``f_0`` = the output, ``f_L = x``).
Every dense and matrix-free diagnostic takes a transformer; of the block diagnostics,
:func:`~jacobian_lab.pythagorean_decomposition` takes every ``norm``,
:func:`~jacobian_lab.block_gsc` and :func:`~jacobian_lab.block_jacobian_stats` need the
block's output to be the plain sum (``"pre"``, ``"none"``), and
:func:`~jacobian_lab.path_gradients` also needs no layer after the blocks (``"none"``:
Pre-LN ends in its final norm). Token statistics: :mod:`jacobian_lab.tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, partial

import jax
import jax.numpy as jnp

from jacobian_lab.activations import get_activation
from jacobian_lab.checks import check_memory
from jacobian_lab.initializers import weight_matrix
from jacobian_lab.model import Block, Layer, Model, Params, Repeat, apply_batch
from jacobian_lab.networks import check_scales, normalize

TRANSFORMER_NORMS = ("pre", "post", "none")


@partial(jax.jit, static_argnums=0)
def _draw(net, key):
    """All the params in one compiled program (see :mod:`jacobian_lab.networks`)."""
    return net.draw(key)


@dataclass(frozen=True, kw_only=True)
class Transformer(Model):
    """Description of a transformer at initialization; build it with :func:`transformer`,
    which documents the fields (the module docstring gives the stages and params)."""

    num_blocks: int
    width: int
    num_heads: int
    seq_len: int
    norm: str = "pre"
    skips: bool = True
    mlp_ratio: int = 4
    residual_scale: float = 1.0
    causal: bool = False
    activation: str = "gelu"
    norm_eps: float = 1e-5
    dtype: str = "float32"
    name: str = field(default="", compare=False)

    batch_coupled = False

    def __post_init__(self) -> None:
        _validate(self)

    # -- structure ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Features per head, ``width // num_heads``."""
        return self.width // self.num_heads

    @property
    def example_shape(self) -> tuple[int, int]:
        """Shape of one sample, a token matrix ``(seq_len, width)``."""
        return (self.seq_len, self.width)

    @property
    def sublayers(self) -> tuple[str, ...]:
        """The sublayers of one transformer block, in order: ``("attn", "mlp")`` or
        ``("attn",)`` when ``mlp_ratio == 0``."""
        return ("attn", "mlp") if self.mlp_ratio else ("attn",)

    @cached_property
    def stages(self) -> tuple:
        """The stages (see the module docstring)."""
        units = tuple(self._unit(s) for s in self.sublayers)
        group = units if len(units) > 1 else units[0]
        blocks = (Repeat(group, self.num_blocks),)
        return (*blocks, Layer(self.final_norm)) if self.norm == "pre" else blocks

    @cached_property
    def names(self) -> tuple[str, ...]:
        """One name per layer output, from the input: ``block{i}.attn``, ``block{i}.mlp``
        (``i = 1 .. num_blocks``), then ``final_norm`` for Pre-LN."""
        names = tuple(
            f"block{i}.{s}" for i in range(1, self.num_blocks + 1) for s in self.sublayers
        )
        return (*names, "final_norm") if self.norm == "pre" else names

    def stage_params(self, params: Params) -> tuple:
        blocks = params["blocks"]
        per_block = tuple(blocks[s] for s in self.sublayers)
        group = per_block if len(per_block) > 1 else per_block[0]
        return (group, ()) if self.norm == "pre" else (group,)

    @cached_property
    def params_spec(self):
        """Shapes and dtypes of :meth:`init`'s params (nothing is drawn)."""
        return jax.eval_shape(self.init, jax.random.PRNGKey(0))

    def samples(self, x: jax.Array) -> jax.Array:
        """``x`` itself, a batch of token matrices ``(B, seq_len, width)``, after checking
        its shape."""
        if x.ndim != 3 or tuple(x.shape[1:]) != self.example_shape:
            raise ValueError(
                f"a transformer takes a batch of token matrices of shape (batch, seq_len="
                f"{self.seq_len}, width={self.width}), got {tuple(x.shape)}; for one token "
                "matrix use x[None]"
            )
        return x

    # -- parameters ----------------------------------------------------------------------
    def init(self, key: jax.Array) -> Params:
        """Draw parameters (layout and initialization in the module docstring)."""
        dtype = jnp.dtype(self.dtype)
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError(
                "dtype='float64' needs 64-bit JAX: call jax.config.update('jax_enable_x64', "
                "True) at start-up, set JAX_ENABLE_X64=1, or use `with jax.enable_x64(True):`"
            )
        D, M = self.width, self.mlp_ratio * self.width
        shapes = {"attn": {n: (D, D) for n in "qkvo"}}
        if self.mlp_ratio:
            shapes["mlp"] = {"up": (D, M), "down": (M, D)}
        count = self.num_blocks * sum(i * o + o for s in shapes.values() for i, o in s.values())
        check_memory(
            count * dtype.itemsize,
            f"the params of this transformer ({count:.3g} numbers) need",
            "choose a smaller num_blocks or width",
        )

        return _draw(self, key)

    def draw(self, key: jax.Array) -> Params:
        """The draw of :meth:`init`, without its checks (traceable)."""
        dtype = jnp.dtype(self.dtype)
        D, M = self.width, self.mlp_ratio * self.width
        shapes = {"attn": {n: (D, D) for n in "qkvo"}}
        if self.mlp_ratio:
            shapes["mlp"] = {"up": (D, M), "down": (M, D)}

        def dense(key, fan_in, fan_out):
            W = weight_matrix(key, "gaussian", fan_in, fan_out, dtype=dtype)
            return {"W": W, "b": jnp.zeros((fan_out,), dtype)}

        def block(key):
            out = {}
            for s, (sub, mats) in zip(jax.random.split(key, 2), shapes.items(), strict=False):
                keys = jax.random.split(s, len(mats))
                out[sub] = {n: dense(k, *io) for k, (n, io) in zip(keys, mats.items(), strict=True)}
            return out

        return {"blocks": jax.vmap(block)(jax.random.split(key, self.num_blocks))}

    # -- sublayers on one token matrix (seq_len, width) ------------------------------------
    def token_norm(self, h: jax.Array) -> jax.Array:
        """Layer norm of every token (row) over its features, no affine part."""
        return normalize(h, (-1,), self.norm_eps)

    def post_norm(self, p: Params, z: jax.Array) -> jax.Array:
        """A Post-LN sublayer's layer norm of ``z = h + alpha F(h)`` (no params)."""
        return self.token_norm(z)

    def final_norm(self, p: Params, h: jax.Array) -> jax.Array:
        """The Pre-LN transformer's final layer norm (``p`` is empty)."""
        return self.token_norm(h)

    def attention_weights(self, p: Params, h: jax.Array) -> jax.Array:
        """The attention matrices ``(num_heads, seq_len, seq_len)`` of one attention
        sublayer with params ``p`` (``p["q"]``, ``p["k"]``, ...) on its input ``h`` (the
        sublayer's input, normalized first for Pre-LN); row ``t`` holds the weights of
        query ``t`` over the keys and sums to 1."""
        if self.norm == "pre":
            h = self.token_norm(h)
        T, H = h.shape[0], self.num_heads
        q, k = (_dense(p[n], h).reshape(T, H, self.head_dim) for n in "qk")
        logits = jnp.einsum("thd,shd->hts", q, k) / jnp.sqrt(self.head_dim).astype(q.dtype)
        if self.causal:
            allowed = jnp.tril(jnp.ones((T, T), bool))
            logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
        return jax.nn.softmax(logits, axis=-1)

    def attention(self, p: Params, h: jax.Array) -> jax.Array:
        """``alpha F(h)`` of an attention sublayer (normalizing ``h`` first for Pre-LN)."""
        A = self.attention_weights(p, h)
        x = self.token_norm(h) if self.norm == "pre" else h
        T, H = x.shape[0], self.num_heads
        v = _dense(p["v"], x).reshape(T, H, self.head_dim)
        heads = jnp.einsum("hts,shd->thd", A, v).reshape(T, self.width)
        return self.residual_scale * _dense(p["o"], heads)

    def mlp(self, p: Params, h: jax.Array) -> jax.Array:
        """``alpha F(h)`` of an MLP sublayer (normalizing ``h`` first for Pre-LN)."""
        x = self.token_norm(h) if self.norm == "pre" else h
        up = get_activation(self.activation)(_dense(p["up"], x))
        return self.residual_scale * _dense(p["down"], up)

    def attention_layer(self, p: Params, h: jax.Array) -> jax.Array:
        """An attention sublayer without its skip (``skips=False``)."""
        out = self.attention(p, h)
        return self.token_norm(out) if self.norm == "post" else out

    def mlp_layer(self, p: Params, h: jax.Array) -> jax.Array:
        """An MLP sublayer without its skip (``skips=False``)."""
        out = self.mlp(p, h)
        return self.token_norm(out) if self.norm == "post" else out

    def _unit(self, sublayer: str) -> Layer | Block:
        branch, layer = {
            "attn": (self.attention, self.attention_layer),
            "mlp": (self.mlp, self.mlp_layer),
        }[sublayer]
        attention = self.attention_weights if sublayer == "attn" else None
        if not self.skips:
            return Layer(layer, attention=attention)
        post = self.post_norm if self.norm == "post" else None
        return Block(branch, None, post, attention=attention)

    # -- forward on a batch --------------------------------------------------------------
    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        """The output ``f_0`` for a batch of token matrices ``(B, seq_len, width)``."""
        self.samples(x)
        return apply_batch(self, params, x)


def _dense(p: Params, h: jax.Array) -> jax.Array:
    return h @ p["W"].T + p["b"]


def _validate(m: Transformer) -> None:
    get_activation(m.activation)
    for name in ("num_blocks", "width", "num_heads", "seq_len"):
        value = getattr(m, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if m.width % m.num_heads:
        raise ValueError(
            f"width ({m.width}) must be a multiple of num_heads ({m.num_heads}): each head "
            "gets width // num_heads features"
        )
    if not isinstance(m.mlp_ratio, int) or isinstance(m.mlp_ratio, bool) or m.mlp_ratio < 0:
        raise ValueError(
            f"mlp_ratio must be an integer >= 0 (0: attention-only blocks), got {m.mlp_ratio!r}"
        )
    if m.norm not in TRANSFORMER_NORMS:
        raise ValueError(
            f"unknown norm {m.norm!r} for a transformer; expected one of: "
            f"{', '.join(TRANSFORMER_NORMS)}"
        )
    if m.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {m.dtype!r}")
    check_scales(m)


def transformer(
    num_blocks: int,
    width: int,
    num_heads: int,
    seq_len: int,
    *,
    norm: str = "pre",
    skips: bool = True,
    mlp_ratio: int = 4,
    residual_scale: float = 1.0,
    causal: bool = False,
    activation: str = "gelu",
    dtype: str = "float32",
    name: str = "",
) -> Transformer:
    """A transformer of ``num_blocks`` blocks (attention then MLP sublayer, each a
    residual block), on token matrices ``(seq_len, width)``; see the module docstring
    for the sublayers, the parameter layout and the initialization.

    Args:
        num_blocks: transformer blocks (>= 1); ``L = 2 num_blocks`` layer outputs
            (``num_blocks`` with ``mlp_ratio=0``), one more for ``norm="pre"``.
        width: features per token ``D``.
        num_heads: attention heads (``width`` must be a multiple).
        seq_len: tokens per sample ``T``.
        norm: ``"pre"`` (Pre-LN, with a final layer norm), ``"post"`` (Post-LN) or
            ``"none"``.
        skips: ``False`` drops every identity skip (each sublayer a plain layer).
        mlp_ratio: hidden units of each MLP per feature; ``0`` gives attention-only
            blocks.
        residual_scale: alpha multiplying every sublayer's output ``F``, e.g.
            ``num_blocks ** -0.5`` (Noci et al. 2022).
        causal: mask the attention to keys at or before each query.
        activation: the MLP's nonlinearity, a name from
            :data:`jacobian_lab.activations.ACTIVATIONS` (default exact GELU).
        dtype: ``"float32"`` or ``"float64"`` (needs ``jax_enable_x64``).
        name: label used in tables and figures.
    """
    return Transformer(
        num_blocks=num_blocks,
        width=width,
        num_heads=num_heads,
        seq_len=seq_len,
        norm=norm,
        skips=skips,
        mlp_ratio=mlp_ratio,
        residual_scale=residual_scale,
        causal=causal,
        activation=activation,
        dtype=dtype,
        name=name,
    )
