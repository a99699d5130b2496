"""Brought transformers: the built-in Pre-LN transformer written with Flax NNX and with
Equinox, with the same weights, gives the same diagnostics through ``jl.chain``.

Each transformer sublayer (``LN -> attention`` and ``LN -> MLP``) is one ``jl.Residual``
whose branch is a user module, and the final layer norm one more layer, so the chain has
the built-in model's layer outputs and residual blocks in the same places
(``block_outputs`` agree) and every per-sublayer block diagnostic lines up.

Precision: the Equinox model computes in float64 throughout and agrees to rounding.
Flax NNX's ``MultiHeadAttention`` with its default ``attention_fn`` and no dropout calls
``jax.nn.dot_product_attention``, whose softmax is always computed in float32 (JAX
casts the logits to float32, whatever the input dtype), so that model agrees only to
float32 precision; with ``attention_fn`` computing the weights in the input's dtype
(Flax's own ``dot_product_attention_weights``) it agrees to rounding.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn.attention import dot_product_attention_weights

import jacobian_lab as jl

N, D, H, T, RATIO = 2, 8, 2, 4, 4  # blocks, width, heads, tokens, MLP hidden units / width
EPS = 1e-5  # the built-in layer norm's epsilon
F64 = jnp.float64


def gelu(z):
    return jax.nn.gelu(z, approximate=False)  # the built-in "gelu" is the exact one


def float64_attention(query, key, value, **kwargs):
    """Flax's attention with the softmax in the inputs' dtype (no dropout, no mask)."""
    weights = dot_product_attention_weights(query, key)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)


# -- the same network in Flax NNX ----------------------------------------------------


class NNXAttention(nnx.Module):
    def __init__(self, float64_softmax: bool, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(D, epsilon=EPS, use_bias=False, use_scale=False, rngs=rngs)
        extra = {"attention_fn": float64_attention} if float64_softmax else {}
        self.attn = nnx.MultiHeadAttention(H, D, decode=False, param_dtype=F64, rngs=rngs, **extra)

    def __call__(self, h):
        return self.attn(self.norm(h))


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(D, epsilon=EPS, use_bias=False, use_scale=False, rngs=rngs)
        self.up = nnx.Linear(D, RATIO * D, param_dtype=F64, rngs=rngs)
        self.down = nnx.Linear(RATIO * D, D, param_dtype=F64, rngs=rngs)

    def __call__(self, h):
        return self.down(gelu(self.up(self.norm(h))))


def nnx_layers(params, float64_softmax: bool) -> list:
    """The chain's layers, with the built-in params copied in (``W`` is ``(out, in)``;
    an NNX kernel is ``(in, out)``, the attention's split by head)."""
    blocks, rngs, d_h, layers = params["blocks"], nnx.Rngs(0), D // H, []
    for i in range(N):
        a, m = NNXAttention(float64_softmax, rngs), NNXMLP(rngs)
        attn = blocks["attn"]
        for n, dense in zip("qkv", (a.attn.query, a.attn.key, a.attn.value), strict=True):
            dense.kernel[...] = attn[n]["W"][i].T.reshape(D, H, d_h)
            dense.bias[...] = attn[n]["b"][i].reshape(H, d_h)
        a.attn.out.kernel[...] = attn["o"]["W"][i].T.reshape(H, d_h, D)
        a.attn.out.bias[...] = attn["o"]["b"][i]
        for n, dense in (("up", m.up), ("down", m.down)):
            dense.kernel[...] = blocks["mlp"][n]["W"][i].T
            dense.bias[...] = blocks["mlp"][n]["b"][i]
        layers += [jl.Residual(a), jl.Residual(m)]
    return [*layers, nnx.LayerNorm(D, epsilon=EPS, use_bias=False, use_scale=False, rngs=rngs)]


# -- the same network in Equinox (its layers take one token: vmapped over tokens) -------


class EqxAttention(eqx.Module):
    norm: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention

    def __call__(self, h):
        z = jax.vmap(self.norm)(h)
        return self.attn(z, z, z)


class EqxMLP(eqx.Module):
    norm: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __call__(self, h):
        return jax.vmap(lambda t: self.down(gelu(self.up(self.norm(t)))))(h)


class EqxFinalNorm(eqx.Module):
    norm: eqx.nn.LayerNorm

    def __call__(self, h):
        return jax.vmap(self.norm)(h)


def eqx_layers(params) -> list:
    """The chain's layers, with the built-in params copied in (an ``eqx.nn.Linear``
    weight is ``(out, in)`` like ``W``)."""
    blocks, key = params["blocks"], jax.random.PRNGKey(0)
    norm = eqx.nn.LayerNorm(D, eps=EPS, use_weight=False, use_bias=False)

    def linear(p, i):
        W = p["W"][i]
        lin = eqx.nn.Linear(W.shape[1], W.shape[0], key=key, dtype=F64)
        return eqx.tree_at(lambda m: (m.weight, m.bias), lin, (W, p["b"][i]))

    layers = []
    for i in range(N):
        attn = eqx.nn.MultiheadAttention(
            H,
            D,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=key,
            dtype=F64,
        )
        attn = eqx.tree_at(
            lambda m: (m.query_proj, m.key_proj, m.value_proj, m.output_proj),
            attn,
            tuple(linear(blocks["attn"][n], i) for n in "qkvo"),
        )
        mlp = EqxMLP(norm, linear(blocks["mlp"]["up"], i), linear(blocks["mlp"]["down"], i))
        layers += [jl.Residual(EqxAttention(norm, attn)), jl.Residual(mlp)]
    return [*layers, EqxFinalNorm(norm)]


# -- diagnostics -----------------------------------------------------------------------


ALL = ("output", "gsc", "jacobians", "tokens", "blocks")


def diagnostics(net, params, x, which=ALL) -> dict:
    """The outputs, GSC, layer-to-layer Jacobians, token statistics and per-sublayer block
    GSC (``which`` of them), as NumPy arrays by name."""
    out = {}
    if "output" in which:
        if isinstance(net, jl.Chain):  # a chain's apply takes one sample
            out["output"] = jax.vmap(lambda v: net.apply(params, v))(x)
        else:
            out["output"] = net.apply(params, x)
    if "gsc" in which:
        out["gsc"] = jl.gsc(net, params, x)
    if "jacobians" in which:
        pj = jl.layer_to_layer_jacobians(net, params, x)
        out |= {"jacobians_hidden": pj.hidden, "jacobians_from_input": pj.from_input}
    if "tokens" in which:
        tok = jl.token_statistics(net, params, x)
        out |= {"token_residual": tok.residual, "token_cosine": tok.cosine}
    if "blocks" in which:
        bg = jl.block_gsc(net, params, x)
        out |= {"block_gsc": bg.gsc, "branch_gsc": bg.branch_gsc, "rho": bg.branch_ratio}
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def builtin():
    model = jl.transformer(N, D, H, T, mlp_ratio=RATIO, norm="pre", dtype="float64")
    params = model.init(jax.random.PRNGKey(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (2, T, D), F64)
    return model, params, x, diagnostics(model, params, x)


def assert_same(got: dict, ref: dict, rtol: float) -> None:
    assert got.keys() <= ref.keys()
    for name, g in got.items():
        r = ref[name]
        scale = float(np.max(np.abs(r)))
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize(
    "library, which",
    [("equinox", ALL), ("nnx-float64-softmax", ("output", "gsc", "jacobians", "tokens"))],
)
def test_brought_transformer_matches_builtin_in_float64(builtin, library, which):
    """Equinox, and NNX with a float64 softmax: every diagnostic agrees with the built-in
    model to 1e-9 relative (float64 arithmetic in a different order: rounding is ~1e-15,
    and the Jacobian products and GSC of 5 layers of condition ~10 keep it far below
    1e-9). The chain has the built-in model's layer outputs and residual blocks."""
    model, params, x, ref = builtin
    layers = eqx_layers(params) if library == "equinox" else nnx_layers(params, True)
    net, p = jl.chain(layers)
    assert net.num_layers == model.num_layers
    assert net.block_outputs == model.block_outputs
    got = diagnostics(net, p, x, which)
    assert got["gsc"].dtype == np.float64
    assert_same(got, ref, rtol=1e-9)


def test_nnx_default_attention_agrees_to_float32_precision(builtin):
    """NNX's default attention computes its softmax in float32 under x64 (through
    jax.nn.dot_product_attention): the diagnostics agree to 1e-5 relative (~100 float32
    roundings of 6e-8 each through 5 layers), and the outputs differ by more than float64
    rounding, which shows the float32 step is there."""
    model, params, x, ref = builtin
    net, p = jl.chain(nnx_layers(params, False))
    got = diagnostics(net, p, x, ("output", "gsc"))
    assert_same(got, ref, rtol=1e-5)
    assert float(np.max(np.abs(got["output"] - ref["output"]))) > 1e-12
