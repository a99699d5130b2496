"""The gallery's five models, written as their libraries' users write them and read whole
by ``jl.chain(model, x)``: the read model reproduces the model's output, and its GSC at
every layer output equals the GSC computed directly with ``jax.jacfwd`` through the
model's own submodules, applied by hand one layer output after another (float64, 1e-9).

Each ``_by_hand_*`` function writes the model out as a list of functions
``g_1, ..., g_L`` (``f_{L-i} = g_i(f_{L-i+1})``) that call the model's own submodules
(Flax classes applied to the variables' subtrees, Equinox and NNX submodules called
directly), independently of how ``jl.chain`` reads the model.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl

GALLERY = pathlib.Path(__file__).resolve().parents[1] / "examples" / "gallery"
F64 = jnp.float64


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gallery_{name}", GALLERY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


RUN = _load("run")
# an "rbg" key: Flax's init of a ResNet-18 compiles in seconds instead of a minute on CPU
KEY = jax.random.key(0, impl="rbg")


def _read(name: str):
    """``(gallery module, model, x, net, params, numbers)``: the gallery's own reading and
    measurements at the tiny size in float64."""
    model, x, net, params = RUN.read(name, "tiny", key=KEY, dtype="float64")
    numbers = RUN.measure(net, params, x, key=jax.random.PRNGKey(3))
    return _load(RUN.MODELS[name][0]), model, x, net, params, numbers


def _gsc_by_hand(layers, xs) -> np.ndarray:
    """``(S, L+1)``: ``GSC(k, 0)``, ``k = 0 .. L``, of the composition of ``layers`` at each
    sample of ``xs`` (stacked on a leading axis). ``d f_0 / d f_k`` for every ``k`` comes
    from one ``jax.jacrev`` with respect to a perturbation added to every layer output."""

    def one(x0):
        values = [x0]
        for g in layers:
            values.append(g(values[-1]))

        def f0(x, deltas):
            h = x
            for g, d in zip(layers, deltas, strict=True):
                h = g(h) + d
            return h

        zeros = [jnp.zeros_like(v) for v in values[1:]]
        J_x, J_f = jax.jacrev(f0, argnums=(0, 1))(x0, zeros)
        jacs = [*J_f[::-1], J_x]  # d f_0 / d f_k for k = 0 .. L
        fk = values[::-1]
        size0 = values[-1].size
        return jnp.stack(
            [
                jnp.linalg.norm(J.reshape(size0, -1))
                / jnp.sqrt(f.size)
                * jnp.linalg.norm(f)
                / jnp.linalg.norm(values[-1])
                for J, f in zip(jacs, fk, strict=True)
            ]
        )

    return np.asarray(jax.jit(jax.vmap(one))(xs))


def _check(numbers, layers_of_sample, samples, rtol=1e-9):
    """The gallery's GSC against the GSC by hand, and its other measurements against each
    other: the all-pairs matrix's column ``l = 0`` is the GSC profile, the GSC across each
    residual unit is the matrix's entry ``GSC(l+1, l)``, the matrix-free estimate is
    within 5 standard errors of the exact value (summed over samples)."""
    g = np.asarray(numbers["gsc"])
    want = _gsc_by_hand(layers_of_sample, samples)
    assert g.shape == want.shape, (g.shape, want.shape)
    np.testing.assert_allclose(g, want, rtol=rtol)
    G = np.asarray(numbers["gsc_matrix"])
    np.testing.assert_allclose(G[:, :, 0], g, rtol=1e-9)
    if numbers["block_outputs"]:
        ls = np.array(numbers["block_outputs"])
        across = np.asarray(numbers["block_gsc"]["gsc"])
        np.testing.assert_allclose(across, G[:, ls + 1, ls], rtol=1e-9)
    est, err = (np.asarray(numbers["estimate"][f]) for f in ("value", "error"))
    z = (est - g).sum(0)[1:] / np.sqrt((err**2).sum(0)[1:])
    assert np.all(np.abs(z) < 5), z


# -- plain JAX ----------------------------------------------------------------------------


def test_plain_jax_loop_mlp_with_taps():
    _, (apply, params), x, net, p, numbers = _read("mlp_jax")
    assert net.names == ("tap0", "tap1", "tap2", "tap3", "head")
    assert p is params  # the model's own params
    np.testing.assert_allclose(
        jax.vmap(lambda xi: net.apply(p, xi))(x), apply(params, x), rtol=1e-12
    )
    layers = [lambda h, q=q: jnp.tanh(h @ q["W"] + q["b"]) for q in params[:-1]]
    layers.append(lambda h: h @ params[-1]["W"] + params[-1]["b"])
    _check(numbers, layers, x)


# -- Flax linen ResNet-18 ------------------------------------------------------------------


def _resnet_by_hand(mod, bound, train: bool):
    import flax.linen as nn

    v = bound.variables
    P, S = v["params"], v["batch_stats"]
    model = bound.unbind()[0]

    def run(module, name, h, **kw):
        variables = (
            {"params": P[name], "batch_stats": S[name]} if name in S else {"params": P[name]}
        )
        if train and name in S:
            return module.apply(variables, h, mutable=["batch_stats"], **kw)[0]
        return module.apply(variables, h, **kw)

    def stem(h):
        h = run(nn.Conv(model.widths[0], (3, 3), use_bias=False), "Conv_0", h)
        h = run(nn.BatchNorm(use_running_average=not train, momentum=0.9), "BatchNorm_0", h)
        return nn.relu(h)

    layers = [stem]
    i = 0
    for s, (width, n) in enumerate(zip(model.widths, model.blocks_per_stage, strict=True)):
        for j in range(n):
            strides = (2, 2) if s > 0 and j == 0 else (1, 1)
            block = mod.BasicBlock(width, strides)
            layers.append(lambda h, block=block, i=i: run(block, f"BasicBlock_{i}", h, train=train))
            i += 1
    layers.append(lambda h: run(nn.Dense(10), "Dense_0", jnp.mean(h, axis=(1, 2))))
    return layers


@pytest.mark.parametrize("train", [False, True], ids=["running-average", "batch-statistics"])
def test_flax_linen_resnet18_compact_with_batchnorm(train):
    mod, bound, x, net, params, numbers = _read(
        "resnet18_linen_batch_stats" if train else "resnet18_linen"
    )
    assert net.batch_coupled == train
    assert net.names == ("stem", *(f"BasicBlock_{i}" for i in range(8)), "head")
    assert net.block_outputs == tuple(range(1, 9))
    layers = _resnet_by_hand(mod, bound, train)
    if train:  # one sample is the whole batch
        _check(numbers, layers, x[None])
    else:
        _check(numbers, [lambda h, g=g: g(h[None])[0] for g in layers], x)


# -- Equinox ViT -----------------------------------------------------------------------------


def test_equinox_vit_with_class_token_and_positions():
    _, model, x, net, params, numbers = _read("vit_equinox")
    assert net.names == (
        "stem",
        "blocks.0.attention",
        "blocks.0.[linear1,linear2]",
        "blocks.1.attention",
        "blocks.1.[linear1,linear2]",
        "head",
    )
    import equinox as eqx

    np.testing.assert_allclose(
        jax.vmap(lambda xi: net.apply(params, xi))(x),
        jax.vmap(eqx.nn.inference_mode(model))(x),
        rtol=1e-12,
    )

    def stem(img):
        h = model.patch_embedding(img)
        return jnp.concatenate([model.cls_token, h], axis=0) + model.positional_embedding

    layers = [stem]
    for b in model.blocks:
        layers.append(lambda h, b=b: h + b.attention(*[jax.vmap(b.norm1)(h)] * 3))
        layers.append(
            lambda h, b=b: (
                h + jax.vmap(b.linear2)(jax.nn.gelu(jax.vmap(b.linear1)(jax.vmap(b.norm2)(h))))
            )
        )
    layers.append(lambda h: model.head(model.norm(h[0])))
    _check(numbers, layers, x)


# -- Flax NNX GPT-2, Post-LN, tied embedding, token ids ------------------------------------


def test_flax_nnx_post_ln_gpt_on_token_ids():
    from flax import nnx

    _, model, ids, net, params, numbers = _read("gpt2_nnx")
    assert net.names == (
        "blocks.0.attn",
        "blocks.0.[fc,proj]",
        "blocks.1.attn",
        "blocks.1.[fc,proj]",
        "head",
    )
    # the tied embedding is one leaf, read by the embedding and by the output layer
    assert any(isinstance(s, jl.Layer) for s in net.stages)
    T = ids.shape[1]
    mask = nnx.make_causal_mask(ids[:1])

    def embed(t):
        return model.wte(t) + model.wpe(jnp.arange(T))

    def attn(b, h):
        return b.ln_1(h + b.attn(h[None], mask=mask, deterministic=True)[0])

    def mlp(b, h):
        return b.ln_2(h + b.proj(nnx.gelu(b.fc(h))))

    layers = []
    for b in model.blocks:
        layers += [lambda h, b=b: attn(b, h), lambda h, b=b: mlp(b, h)]
    layers.append(lambda h: model.wte.attend(h))
    want = jax.vmap(lambda t: _compose(layers, embed(t)))(ids)
    np.testing.assert_allclose(
        jax.vmap(lambda t: net.apply(params, embed(t)))(ids), want, rtol=1e-12
    )
    _check(numbers, layers, jax.vmap(embed)(ids))


def _compose(layers, h):
    for g in layers:
        h = g(h)
    return h


# -- Flax linen MLP-Mixer ---------------------------------------------------------------------


def test_flax_linen_mlp_mixer_written_for_a_batch():
    import flax.linen as nn

    mod, bound, x, net, params, numbers = _read("mixer_linen")
    assert net.names == (
        "stem",
        "MixerBlock_0.token_mixing",
        "MixerBlock_0.channel_mixing",
        "MixerBlock_1.token_mixing",
        "MixerBlock_1.channel_mixing",
        "head",
    )
    P = bound.variables["params"]
    model = bound.unbind()[0]

    def stem(img):
        h = nn.Conv(model.hidden_dim, model.patches, strides=model.patches).apply(
            {"params": P["stem"]}, img[None]
        )
        return h.reshape(-1, h.shape[-1])

    def ln(name):
        return lambda h: nn.LayerNorm().apply({"params": name}, h)

    layers = [stem]
    for i in range(model.num_blocks):
        b = P[f"MixerBlock_{i}"]
        tok = mod.MlpBlock(model.tokens_mlp_dim)
        chan = mod.MlpBlock(model.channels_mlp_dim)
        layers.append(
            lambda h, b=b, tok=tok: (
                h + tok.apply({"params": b["token_mixing"]}, ln(b["LayerNorm_0"])(h).T).T
            )
        )
        layers.append(
            lambda h, b=b, chan=chan: (
                h + chan.apply({"params": b["channel_mixing"]}, ln(b["LayerNorm_1"])(h))
            )
        )
    layers.append(
        lambda h: nn.Dense(10).apply(
            {"params": P["head"]}, jnp.mean(ln(P["pre_head_layer_norm"])(h), axis=0)
        )
    )
    _check(numbers, layers, x)
