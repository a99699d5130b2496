"""Reading whole models with ``jl.chain(model, x)``: what is found (layer outputs,
residual units, stacked and scanned stages), what is refused and how, call conventions,
and shared compiled programs. The five gallery architectures are checked against the
GSC computed by hand in ``test_gallery.py``.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import compiled_programs

import jacobian_lab as jl
from jacobian_lab.driver import trace

D = 6
F64 = jnp.float64


def _x(n=3, d=D, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), F64)


def _f64(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(F64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


class Branch(nn.Module):
    @nn.compact
    def __call__(self, h):
        return nn.Dense(h.shape[-1])(jnp.tanh(nn.Dense(h.shape[-1])(h)))


class ResMLP(nn.Module):
    """A stem, ``blocks`` residual blocks written in the parent (``h + Branch(h)``) and a
    read-out, optionally with ``glue`` between the blocks."""

    blocks: int = 3
    glue: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D)(x)
        for _ in range(self.blocks):
            h = h + Branch()(h)
            if self.glue:
                h = 0.5 * h
        return nn.Dense(2)(h)


def _linen(model, x):
    return model.bind(_f64(model.init(jax.random.PRNGKey(0), x)))


def test_residual_adds_in_the_parent_make_blocks_and_glue_joins_the_block_before():
    x = _x()
    net, params = jl.chain(_linen(ResMLP(), x), x)
    assert net.names == ("stem", "Branch_0", "Branch_1", "Branch_2", "head")
    assert net.block_outputs == (1, 2, 3)
    assert isinstance(net.stages[1], jl.Repeat) and net.stages[1].n == 3
    # the scale after each block is that block's post: still one layer output per block
    net2, params2 = jl.chain(_linen(ResMLP(glue=True), x), x)
    assert net2.names == net.names
    post = net2.stages[1].stage.post
    h = jnp.arange(D, dtype=F64)
    assert np.allclose(post(None, h), 0.5 * h)


class NormMLP(nn.Module):
    @nn.compact
    def __call__(self, h):
        for _ in range(3):
            h = nn.relu(nn.LayerNorm()(nn.Dense(D)(h)))
        return h


def test_at_chooses_the_layer_outputs_and_says_what_it_found():
    x = _x()
    mlp = _linen(NormMLP(), x)
    default, _ = jl.chain(mlp, x)  # Dense and LayerNorm both repeat: the first called
    assert default.names == ("Dense_0", "Dense_1", "Dense_2")
    norms, _ = jl.chain(mlp, x, at=nn.LayerNorm)  # Dense_0 is the stem now
    assert norms.names == ("stem", "LayerNorm_0", "LayerNorm_1", "LayerNorm_2")
    every, _ = jl.chain(mlp, x, at="all")
    assert every.num_layers == 6
    picked, _ = jl.chain(mlp, x, at=lambda path: path in ("Dense_0", "Dense_2"))
    assert picked.names == ("Dense_0", "Dense_2", "head")  # LayerNorm_2 is not glue here
    bound = _linen(ResMLP(), x)
    by_path, _ = jl.chain(bound, x, at=lambda path: path in ("Branch_0", "Branch_2"))
    # every residual add is a unit of its own: Branch_1's block is found inside Branch_0's
    assert by_path.names == ("stem", "Branch_0", "Branch_1", "Branch_2", "head")
    # every Dense: the skip of each block bypasses the branch's inner layer output
    with pytest.raises(jl.ReadError, match="bypasses a layer output"):
        jl.chain(bound, x, at=nn.Dense)
    with pytest.raises(jl.ReadError, match="matched no submodule call"):
        jl.chain(bound, x, at=nn.Conv)
    with pytest.raises(TypeError, match="at= must be"):
        jl.chain(bound, x, at=3)


def test_a_skip_past_a_layer_output_is_refused_by_name():
    class Dense2(nn.Module):  # DenseNet style: the last block reads the stem's output
        @nn.compact
        def __call__(self, x):
            h0 = nn.Dense(D)(x)
            h1 = Branch()(h0)
            h2 = Branch()(h1)
            return Branch()(jnp.concatenate([h2, h0], -1)[..., :D] + h1)

    x = _x()
    with pytest.raises(jl.ReadError, match="bypasses a layer output"):
        jl.chain(_linen(Dense2(), x), x)


def test_a_whole_model_needs_x_and_at_least_two_layer_outputs():
    x = _x()
    bound = _linen(ResMLP(), x)
    with pytest.raises(TypeError, match=r"jl.chain\(model, x\)"):
        jl.chain(bound)
    with pytest.raises(TypeError, match="jl.tap"):
        jl.chain((lambda p, h: p * h, 2.0))

    def one_layer(p, h):
        return jl.tap(jnp.tanh(p * h))

    with pytest.raises(jl.ReadError, match="at least two"):
        jl.chain((one_layer, jnp.float64(2.0)), x)
    with pytest.raises(jl.ReadError, match="jl.tap"):
        jl.chain((lambda p, h: p * h, jnp.float64(2.0)), x)


def test_randomness_is_switched_off_or_refused():
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            for _ in range(2):
                x = nn.Dropout(0.5, deterministic=not train)(nn.Dense(D)(x))
            return x

    x = _x()
    bound = _linen(Drop(), x)
    with pytest.raises(jl.ReadError, match="train"):
        jl.chain(bound, x, at=nn.Dense)
    net, params = jl.chain(bound, x, at=nn.Dense, kwargs={"train": False})
    assert net.num_layers == 2

    def noisy(p, h):
        h = jl.tap(h * p)
        return jl.tap(h + jax.random.normal(jax.random.PRNGKey(0), h.shape))

    with pytest.raises(jl.ReadError, match="random numbers"):
        jl.chain((noisy, jnp.float64(2.0)), x)


def test_nnx_dropout_runs_deterministically_and_the_users_model_is_unchanged():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(D, D, rngs=rngs) for _ in range(3)])
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            for layer in self.layers:
                x = self.drop(jnp.tanh(layer(x)))
            return x

    model = Net(nnx.Rngs(0))
    x = _x().astype(jnp.float32)
    net, params = jl.chain(model, x)
    assert net.names == ("layers.0", "layers.1", "layers.2")
    assert model.drop.deterministic is False
    model.drop.deterministic = True
    np.testing.assert_allclose(
        jax.vmap(lambda xi: net.apply(params, xi))(x), model(x), rtol=1e-5, atol=1e-6
    )


def test_token_ids_start_at_the_embedding_and_integer_x_elsewhere_points_there():
    vocab, T = 11, 5

    class LM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, D, param_dtype=F64, rngs=rngs)
            self.blocks = nnx.List([nnx.Linear(D, D, param_dtype=F64, rngs=rngs) for _ in range(2)])

        def __call__(self, ids):
            x = self.embed(ids)
            for b in self.blocks:
                x = x + jnp.tanh(b(x))
            return self.embed.attend(x)

    model = LM(nnx.Rngs(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (3, T), 0, vocab)
    net, params = jl.chain(model, ids)
    assert net.names == ("blocks.0", "blocks.1", "head")
    g = jl.gsc(net, params, ids)
    assert g.shape == (3, 4)
    emb = jax.vmap(model.embed)(ids)
    np.testing.assert_allclose(g, jl.gsc(net, params, emb), rtol=1e-12)
    ch, cp = jl.chain([(lambda W, h: h @ W, jnp.eye(D))])
    with pytest.raises(TypeError, match=r"chain\(model, ids\)"):
        jl.gsc(ch, cp, ids)


def test_tied_params_are_one_leaf_whose_gradient_is_summed():
    def apply(p, x):  # W used by two layers
        h = jl.tap(jnp.tanh(x @ p["W"]))
        h = jl.tap(jnp.tanh(h @ p["V"]))
        return h @ p["W"]

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    p = {"W": jax.random.normal(k1, (D, D), F64) / 3, "V": jax.random.normal(k2, (D, D), F64) / 3}
    x = _x()
    net, params = jl.chain((apply, p), x)
    ours = jax.grad(lambda q: jnp.sum(jax.vmap(lambda xi: net.apply(q, xi))(x) ** 2))(params)
    want = jax.grad(lambda q: jnp.sum(apply(q, x) ** 2))(p)
    np.testing.assert_allclose(ours["W"], want["W"], rtol=1e-12)
    np.testing.assert_allclose(ours["V"], want["V"], rtol=1e-12)


def test_batched_false_reads_a_function_written_for_one_input():
    def per_input(p, x):  # x (D,): no batch axis
        h = jl.tap(jnp.tanh(p @ x))
        return jl.tap(jnp.tanh(p @ h)).sum(keepdims=True)

    W = jax.random.normal(jax.random.PRNGKey(0), (D, D), F64) / 3
    x = _x()
    net, params = jl.chain((per_input, W), x, batched=False)
    np.testing.assert_allclose(
        jax.vmap(lambda xi: net.apply(params, xi))(x), jax.vmap(lambda xi: per_input(W, xi))(x)
    )
    with pytest.raises(jl.ReadError, match="batched=False"):
        jl.chain((per_input, W), x)  # read with a batch axis it does not expect


def test_post_ln_blocks_and_residual_post():
    """A Post-LN block found in a model equals jl.Residual(branch, post=LN) in a list."""

    class PostLN(nnx.Module):
        def __init__(self, rngs):
            self.lins = nnx.List([nnx.Linear(D, D, param_dtype=F64, rngs=rngs) for _ in range(2)])
            self.lns = nnx.List([nnx.LayerNorm(D, param_dtype=F64, rngs=rngs) for _ in range(2)])

        def __call__(self, x):
            for lin, ln in zip(self.lins, self.lns, strict=True):
                x = ln(x + jnp.tanh(lin(x)))
            return x

    model = PostLN(nnx.Rngs(0))
    x = _x()
    net, params = jl.chain(model, x, at=nnx.Linear)
    assert all(isinstance(u, jl.Block) and u.post is not None for u in _units(net))
    listed, lp = jl.chain(
        [
            jl.Residual(lambda h, lin=lin: jnp.tanh(lin(h)), post=ln)
            for lin, ln in zip(model.lins, model.lns, strict=True)
        ]
    )
    np.testing.assert_allclose(jl.gsc(net, params, x), jl.gsc(listed, lp, x), rtol=1e-10)
    np.testing.assert_allclose(
        jl.gsc_matrix(net, params, x), jl.gsc_matrix(listed, lp, x), rtol=1e-10
    )


def _units(net):
    from jacobian_lab.model import units_of

    return [u for s in net.stages for u in units_of(s)]


def test_scanned_stacks_stay_one_scanned_stage():
    class Block(eqx.Module):
        lin: eqx.nn.Linear

        def __call__(self, x):
            return x + jnp.tanh(self.lin(x))

    class Scanned(eqx.Module):
        blocks: Block

        def __call__(self, x):
            dyn, static = eqx.partition(self.blocks, eqx.is_array)
            x, _ = jax.lax.scan(lambda h, d: (eqx.combine(d, static)(h), None), x, dyn)
            return x

    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    stacked = eqx.filter_vmap(lambda k: Block(eqx.nn.Linear(D, D, key=k)))(keys)
    scanned = _f64(Scanned(stacked))
    x = _x()
    net, params = jl.chain(scanned, x)
    assert len(net.stages) == 1 and net.stages[0].n == 5
    assert net.report == ("blocks: a scanned stack of 5 blocks, kept one stage",)
    unrolled = [
        jax.tree_util.tree_map(lambda a, i=i: a[i] if eqx.is_array(a) else a, scanned.blocks)
        for i in range(5)
    ]
    listed, lp = jl.chain([jl.Residual(lambda h, b=b: jnp.tanh(b.lin(h))) for b in unrolled])
    np.testing.assert_allclose(jl.gsc(net, params, x), jl.gsc(listed, lp, x), rtol=1e-12)


def test_alternating_sublayers_stack_and_compile_time_does_not_grow_with_depth():
    def counted(blocks):
        class Block(nnx.Module):
            def __init__(self, rngs):
                self.a = nnx.Linear(D, D, param_dtype=F64, rngs=rngs)
                self.m = nnx.Linear(D, 2 * D, param_dtype=F64, rngs=rngs)
                self.o = nnx.Linear(2 * D, D, param_dtype=F64, rngs=rngs)

            def __call__(self, x):
                x = x + jnp.tanh(self.a(x))
                return x + self.o(jnp.tanh(self.m(x)))

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.blocks = nnx.List([Block(rngs) for _ in range(blocks)])

            def __call__(self, x):
                for b in self.blocks:
                    x = b(x)
                return x

        net, params = jl.chain(Net(nnx.Rngs(0)), _x())
        xs = net.samples(_x())
        jaxpr = jax.make_jaxpr(lambda p: trace(net, p, xs))(params)
        return net, len(jaxpr.jaxpr.eqns)

    net4, eqns4 = counted(4)
    net16, eqns16 = counted(16)
    assert net16.num_layers == 32
    assert net16.names[:2] == ("blocks.0.a", "blocks.0.[m,o]")
    assert isinstance(net16.stages[0], jl.Repeat) and len(net16.stages[0].stage) == 2
    assert eqns4 == eqns16  # one scanned stage: the traced program does not grow


def test_two_reads_of_one_architecture_share_compiled_programs():
    x = _x()
    a, pa = jl.chain(_linen(ResMLP(), x), x)
    model = ResMLP()
    b, pb = jl.chain(model.bind(_f64(model.init(jax.random.PRNGKey(5), x))), x)
    assert a == b and hash(a) == hash(b) and a is not b
    ga = jl.gsc(a, pa, x)
    with compiled_programs() as names:
        gb = jl.gsc(b, pb, x)
    assert names == []  # the second chain reuses the first one's programs
    assert not np.allclose(ga, gb)  # another seed's numbers
    c, _ = jl.chain(_linen(ResMLP(blocks=2), x), x)
    assert c != a


def test_layer_outputs_of_any_model():
    """jl.layer_outputs gives every f_l with its own shape; the built-in activations are
    its stacked form."""
    x = _x()
    net = jl.resmlp(3, D, "relu", dtype="float64")
    params = net.init(jax.random.PRNGKey(0))
    outs = jl.layer_outputs(net, params, x)
    assert len(outs) == net.num_layers + 1
    np.testing.assert_allclose(jnp.stack(outs[:-1]), net.activations(params, x), rtol=1e-12)
    np.testing.assert_allclose(outs[-1], x)
    bound = _linen(ResMLP(), x)
    read, rp = jl.chain(bound, x)
    outs = jl.layer_outputs(read, rp, x)
    assert [o.shape for o in outs] == [(3, 2)] + [(3, D)] * 4 + [(3, D)]
    np.testing.assert_allclose(outs[0], ResMLP().apply(bound.variables, x), rtol=1e-12)
