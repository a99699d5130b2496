"""Batch normalization with batch statistics in brought models: the built-in batch-norm
MLP rebuilt in Flax linen, Flax NNX and Equinox with the same weights gives the same
numbers, with one sample being the whole batch."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl
from jacobian_lab.model import Repeat

WIDTH, DEPTH, EPS, BATCH = 8, 4, 1e-5, 5
F64 = jnp.float64


@pytest.fixture(scope="module")
def builtin():
    net = jl.mlp(DEPTH, WIDTH, "relu", norm="batch", dtype="float64")
    assert net.norm_eps == EPS
    return net, net.init(jax.random.PRNGKey(0))


def _weights(params):
    """(W, b) of each dense layer, W of shape (out, in)."""
    units = [jax.tree_util.tree_map(lambda a, i=i: a[i], params["units"]) for i in range(3)]
    return [(p["W"], p["b"]) for p in [params["stem"], *units]]


def _x():
    return jax.random.normal(jax.random.PRNGKey(7), (BATCH, WIDTH), F64)


def _assert_same(net, params, ch, cp, x=None):
    """GSC, GSC matrix, layer-to-layer Jacobians and block statistics agree."""
    x = _x() if x is None else x
    assert ch.batch_coupled and ch.num_layers == net.num_layers
    rtol, atol = 1e-9, 1e-12
    for fn in (jl.gsc, jl.gsc_matrix):
        np.testing.assert_allclose(fn(ch, cp, x), fn(net, params, x), rtol=rtol, atol=atol)
    a, b = jl.layer_to_layer_jacobians(ch, cp, x), jl.layer_to_layer_jacobians(net, params, x)
    assert a.hidden.shape == (1, DEPTH, DEPTH, BATCH * WIDTH, BATCH * WIDTH)
    np.testing.assert_allclose(a.hidden, b.hidden, rtol=rtol, atol=atol)
    np.testing.assert_allclose(a.from_input, b.from_input, rtol=rtol, atol=atol)
    k = jax.random.PRNGKey(3)
    a, b = jl.block_jacobian_stats(ch, cp, x, k), jl.block_jacobian_stats(net, params, x, k)
    np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=rtol, atol=atol)
    np.testing.assert_allclose(a.gradient_ratio, b.gradient_ratio, rtol=rtol, atol=atol)


def _stacked(ch):
    """Dense + BatchNorm + relu four times with 8 -> 8 weights: one repeated stage."""
    return len(ch.stages) == 1 and isinstance(ch.stages[0], Repeat) and ch.stages[0].n == DEPTH


def test_flax_linen_batch_norm_matches_the_builtin_network(builtin):
    nn = pytest.importorskip("flax.linen")
    net, params = builtin

    def bn(**kw):
        return nn.BatchNorm(epsilon=EPS, param_dtype=F64, **kw)

    def load(variables, name):
        v = jax.tree_util.tree_map(lambda a: a, dict(variables))
        for i, (W, b) in enumerate(_weights(params)):
            v["params"][name(i)] = {"kernel": W.T, "bias": b}
        return v

    x = _x()
    layers = []
    for _ in range(DEPTH):
        no_affine = bn(use_running_average=False, use_scale=False, use_bias=False)
        layers += [nn.Dense(WIDTH, param_dtype=F64), no_affine, nn.relu]
    seq = nn.Sequential(layers)
    bound = seq.bind(load(seq.init(jax.random.PRNGKey(1), x), lambda i: f"layers_{3 * i}"))
    ch, cp = jl.chain(bound)
    assert _stacked(ch)  # the parameter-free BatchNorm joined its Dense, like relu
    _assert_same(net, params, ch, cp)
    ch, cp = jl.chain(bound, stack=False)
    assert len(ch.stages) == DEPTH
    _assert_same(net, params, ch, cp)

    # BatchNorm defined in setup(), inside blocks; and with scale 1 and bias 0 (params).
    class Block(nn.Module):
        affine: bool = False

        def setup(self):
            self.dense = nn.Dense(WIDTH, param_dtype=F64)
            a = self.affine
            self.bn = bn(use_running_average=False, use_scale=a, use_bias=a)

        def __call__(self, h):
            return nn.relu(self.bn(self.dense(h)))

    for affine in (False, True):

        class Net(nn.Module):
            def setup(self):
                self.blocks = [Block(affine) for _ in range(DEPTH)]  # noqa: B023

            def __call__(self, h):
                for blk in self.blocks:
                    h = blk(h)
                return h

        v = Net().init(jax.random.PRNGKey(2), x)
        if affine:
            assert set(v["params"]["blocks_0"]["bn"]) == {"scale", "bias"}
        v["params"] = {
            k: {**v["params"][k], "dense": {"kernel": W.T, "bias": b}}
            for k, (W, b) in zip(v["params"], _weights(params), strict=True)
        }
        model = Net().bind(v)
        ch, cp = jl.chain(list(model.blocks))
        assert _stacked(ch)
        _assert_same(net, params, ch, cp)


def test_flax_linen_batch_norm_modes_it_cannot_see_and_running_averages(builtin, key):
    nn = pytest.importorskip("flax.linen")
    net, params = builtin
    x = _x()

    class Compact(nn.Module):  # the mode is decided inside @nn.compact
        train: bool = True

        @nn.compact
        def __call__(self, h):
            for _ in range(DEPTH):
                h = nn.Dense(WIDTH, param_dtype=F64)(h)
                h = nn.BatchNorm(
                    use_running_average=not self.train,
                    use_scale=False,
                    use_bias=False,
                    epsilon=EPS,
                )(h)
                h = nn.relu(h)
            return h

    v = Compact().init(jax.random.PRNGKey(1), x)
    for i, (W, b) in enumerate(_weights(params)):
        v["params"][f"Dense_{i}"] = {"kernel": W.T, "bias": b}
    bound = Compact().bind(v)
    with pytest.raises(ValueError, match="batch_coupled=True"):
        jl.chain([bound])  # as one layer of a list, the mode cannot be read
    # Read whole on a batch, the BatchNorms are seen updating their statistics: one
    # sample is the batch, and the layers (Dense + BatchNorm + relu) are the built-in's.
    ch, cp = jl.chain(bound, x)
    assert ch.batch_coupled and ch.num_layers == DEPTH
    np.testing.assert_allclose(jl.gsc(ch, cp, x), jl.gsc(net, params, x), rtol=1e-9)
    np.testing.assert_allclose(
        jl.input_output_jacobian(ch, cp, x),
        jl.input_output_jacobian(net, params, x),
        rtol=1e-9,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="batch_coupled=False, but"):
        jl.chain(bound, x, batch_coupled=False)

    # Running averages: a per-example affine map, an ordinary layer.
    norm = nn.BatchNorm(use_running_average=True, use_scale=False, use_bias=False, epsilon=EPS)
    var = jnp.linspace(0.5, 2.0, WIDTH)
    stats = {"batch_stats": {"mean": jnp.linspace(-1.0, 1.0, WIDTH), "var": var}}
    ch, cp = jl.chain([(lambda p, h: h @ p, jnp.eye(WIDTH)), norm.bind(stats)])
    assert not ch.batch_coupled and ch.num_layers == 1
    J = jl.input_output_jacobian(ch, cp, x)
    np.testing.assert_allclose(J, np.broadcast_to(np.diag(1 / np.sqrt(var + EPS)), J.shape))
    train = nn.BatchNorm(use_running_average=False, use_scale=False, use_bias=False)
    with pytest.raises(ValueError, match="batch_coupled=False, but"):
        jl.chain([train.bind(train.init(key, x))], batch_coupled=False)


def test_flax_nnx_batch_norm_matches_the_builtin_network(builtin):
    nnx = pytest.importorskip("flax.nnx")
    net, params = builtin
    layers = []
    for W, b in _weights(params):
        lin = nnx.Linear(WIDTH, WIDTH, param_dtype=F64, rngs=nnx.Rngs(0))
        lin.kernel[...], lin.bias[...] = W.T, b
        norm = nnx.BatchNorm(
            WIDTH,
            use_running_average=False,
            use_scale=False,
            use_bias=False,
            epsilon=EPS,
            rngs=nnx.Rngs(0),
        )
        layers += [lin, norm, nnx.relu]
    model = nnx.Sequential(*layers)
    mean = np.asarray(model.layers[1].mean[...])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no unsafe float64 -> float32 writes
        ch, cp = jl.chain(model)
        assert _stacked(ch)
        _assert_same(net, params, ch, cp)
    np.testing.assert_array_equal(model.layers[1].mean[...], mean)  # the model is unchanged

    model.eval()  # running averages: per-example
    ch, _ = jl.chain(model)
    assert not ch.batch_coupled

    class CallTime(nnx.Module):  # training mode chosen at call time: not seen by chain()
        def __init__(self):
            self.norm = nnx.BatchNorm(WIDTH, use_running_average=True, rngs=nnx.Rngs(0))

        def __call__(self, h):
            return self.norm(h, use_running_average=False)

    ch, cp = jl.chain([CallTime()])
    with pytest.raises(ValueError, match="batch_coupled=True"):
        jl.gsc(ch, cp, _x())
    ch, cp = jl.chain([CallTime()], batch_coupled=True)
    J = jl.input_output_jacobian(ch, cp, _x())
    assert J.shape == (1, BATCH * WIDTH, BATCH * WIDTH)


def test_equinox_batch_norm_matches_the_builtin_network(builtin):
    eqx = pytest.importorskip("equinox")
    net, params = builtin

    def make():
        layers = []
        for W, b in _weights(params):
            lin = eqx.nn.Linear(WIDTH, WIDTH, key=jax.random.PRNGKey(0), dtype=F64)
            lin = eqx.tree_at(lambda m: (m.weight, m.bias), lin, (W, b))
            norm = eqx.nn.BatchNorm(
                WIDTH, "batch", eps=EPS, channelwise_affine=False, mode="batch", dtype=F64
            )
            layers += [lin, norm, eqx.nn.Lambda(jax.nn.relu)]
        return eqx.nn.Sequential(layers)

    model, state = eqx.nn.make_with_state(make)()
    with pytest.raises(TypeError, match="state=state"):
        jl.chain(model)
    ch, cp = jl.chain(model, state=state)
    assert _stacked(ch)
    _assert_same(net, params, ch, cp)
    ch, cp = jl.chain(model, state=state, stack=False)
    _assert_same(net, params, ch, cp)
    # inference mode: running averages, per-example
    ch, _ = jl.chain(eqx.nn.inference_mode(model), state=state)
    assert not ch.batch_coupled


def test_batch_norm_inside_residual_branches(key):
    """A ResNet whose only batch norms sit in the residual branches (Equinox, with the
    batch norm inside a custom stateful module; Flax NNX)."""
    eqx = pytest.importorskip("equinox")
    nnx = pytest.importorskip("flax.nnx")
    net = jl.resmlp(3, WIDTH, "relu", norm="batch", block_layers=2, dtype="float64")
    params = net.init(key)
    unit = lambda i, j: jax.tree_util.tree_map(lambda a: a[i, j], params["units"])  # noqa: E731
    x = _x()

    def eqx_linear(p):
        lin = eqx.nn.Linear(WIDTH, WIDTH, key=jax.random.PRNGKey(0), dtype=F64)
        return eqx.tree_at(lambda m: (m.weight, m.bias), lin, (p["W"], p["b"]))

    class Branch(eqx.Module):  # norm-act-linear twice; (y, state) = branch(x, state)
        norms: list
        linears: list

        def __init__(self, i):
            self.norms = [
                eqx.nn.BatchNorm(WIDTH, "b", eps=EPS, channelwise_affine=False, mode="batch")
                for _ in range(2)
            ]
            self.linears = [eqx_linear(unit(i, j)) for j in range(2)]

        def __call__(self, h, state):
            for norm, lin in zip(self.norms, self.linears, strict=True):
                h, state = norm(h, state)
                h = lin(jax.nn.relu(h))
            return h, state

    make = lambda: [eqx_linear(params["stem"]), *[jl.Residual(Branch(i)) for i in range(3)]]  # noqa: E731
    model, state = eqx.nn.make_with_state(make)()
    ch, cp = jl.chain(model, state=state)
    assert ch.batch_coupled and ch.block_outputs == net.block_outputs
    assert isinstance(ch.stages[1], Repeat) and ch.stages[1].n == 3
    for fn in (jl.gsc, jl.block_gsc):
        for a, b in zip(
            jax.tree.leaves(fn(ch, cp, x)), jax.tree.leaves(fn(net, params, x)), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)

    def nnx_linear(p):
        lin = nnx.Linear(WIDTH, WIDTH, param_dtype=F64, rngs=nnx.Rngs(0))
        lin.kernel[...], lin.bias[...] = p["W"].T, p["b"]
        return lin

    def nnx_norm():
        return nnx.BatchNorm(WIDTH, use_scale=False, use_bias=False, epsilon=EPS, rngs=nnx.Rngs(0))

    blocks = [
        jl.Residual(
            nnx.Sequential(
                *[m for j in range(2) for m in (nnx_norm(), nnx.relu, nnx_linear(unit(i, j)))]
            )
        )
        for i in range(3)
    ]
    ch, cp = jl.chain([nnx_linear(params["stem"]), *blocks])
    assert ch.batch_coupled
    for fn in (jl.gsc, jl.block_gsc, jl.pythagorean_decomposition):
        for a, b in zip(
            jax.tree.leaves(fn(ch, cp, x)), jax.tree.leaves(fn(net, params, x)), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_batch_coupled_chain_takes_one_batch():
    ch, cp = jl.chain([jnp.tanh], batch_coupled=True)
    x = _x()
    assert jax.tree.leaves(ch.samples({"a": x}))[0].shape == (1, BATCH, WIDTH)
    assert jl.input_output_jacobian(ch, cp, x).shape == (1, BATCH * WIDTH, BATCH * WIDTH)
    with pytest.raises(ValueError, match="at least 2"):
        ch.samples(x[:1])
    with pytest.raises(ValueError, match="same leading batch axis"):
        ch.samples({"a": x, "b": x[:2]})
