"""Every public diagnostic on every kind of model: the coverage table.

Rows are the diagnostics, columns the models: the built-in MLP, ResNet, conv ResNet and
transformer, and the gallery's five models read whole by ``jl.chain(model, x)``
(``examples/gallery/``). Each cell is one of

* ``value``: computed and checked against a second method (the check is named in
  :data:`CHECKS`);
* ``nan``: the quantity is defined but part of it is not for that model: those fields are
  NaN, with one warning naming the layers and the reason;
* ``undefined``: the quantity is not defined for that model (block diagnostics of a
  network without residual blocks, token statistics of a model whose layer outputs are
  not token matrices): an error that says so.

The table is :data:`EXPECT`; the README's coverage table is generated from it
(``python tests/test_coverage.py`` prints it; a test keeps the README in step). The table
runs in float64; ``test_float32_agrees_with_float64`` checks every model's GSC profile and
layer outputs in float32 against float64.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl
from jacobian_lab.initializers import normal
from jacobian_lab.model import apply_batch

ROOT = pathlib.Path(__file__).resolve().parents[1]
GALLERY = ROOT / "examples" / "gallery"
KEY = jax.random.key(0, impl="rbg")  # Flax's init of a ResNet-18 compiles fast with it


@functools.cache
def _gallery_run():
    spec = importlib.util.spec_from_file_location("gallery_run_coverage", GALLERY / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


MODELS = (
    "mlp",
    "resmlp",
    "resconvnet",
    "transformer",
    "resnet18_linen",
    "vit_equinox",
    "gpt2_nnx",
    "mlp_jax",
    "mixer_linen",
)
TOKEN_MODELS = ("transformer", "vit_equinox", "gpt2_nnx", "mixer_linen")
ATTENTION_MODELS = ("transformer", "vit_equinox", "gpt2_nnx")
PLAIN = ("mlp", "mlp_jax")  # no residual blocks


SOURCES: dict = {}  # (name, dtype) -> the gallery model as its library's user holds it


def _draw(shape, dtype):
    """Inputs drawn in float32 (the float64 columns are their float32 twins, rounded)."""
    return jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32).astype(dtype)


@functools.cache
def model(name: str, dtype: str = "float64"):
    """``(net, params, x)`` of one column, built once per process."""
    key = jax.random.PRNGKey(0)
    if name == "mlp":
        net = jl.mlp(4, 8, "tanh", dtype=dtype)
        x = _draw((4, 8), dtype)
    elif name == "resmlp":
        net = jl.resmlp(3, 8, "relu", block_order="post", dtype=dtype)
        x = _draw((4, 8), dtype)
    elif name == "resconvnet":
        net = jl.resconvnet(2, 3, "relu", image_size=5, in_channels=2, dtype=dtype)
        x = _draw((3, 5, 5, 2), dtype)
    elif name == "transformer":
        net = jl.transformer(2, 8, 2, 4, norm="post", dtype=dtype)
        x = _draw((3, 4, 8), dtype)
    else:
        source, x, net, params = _gallery_run().read(name, "tiny", key=KEY, dtype=dtype)
        SOURCES[name, dtype] = source
        return net, params, x
    return net, net.init(key), x


# -- the table ------------------------------------------------------------------------------

V, N, U = "value", "nan", "undefined"


def _row(default, **cells):
    return {m: cells.get(m, default) for m in MODELS}


BLOCKS = {m: U for m in PLAIN}
EXPECT = {
    "gsc": _row(V),
    "gsc_estimate": _row(V),
    "gsc_matrix": _row(V),
    "gradient_norm": _row(V),
    "layer_outputs": _row(V),
    "layer_jacobians": _row(V),
    "layer_to_layer_jacobians": _row(V),
    "input_to_layer_jacobians": _row(V),
    "input_output_jacobian": _row(V),
    "jacobian_spectrum": _row(V),
    "domain_statistics": _row(N, mlp=V, mlp_jax=N),
    "pythagorean_decomposition": _row(V, **BLOCKS),
    "block_gsc": _row(V, **BLOCKS, resmlp=N, transformer=N, resnet18_linen=N, gpt2_nnx=N),
    "block_jacobian_stats": _row(V),
    "dilution": _row(V, resnet18_linen=V),
    "add_node_split": _row(V, **BLOCKS),
    "path_gradients": _row(V, **BLOCKS),
    "token_statistics": _row(U, transformer=V, gpt2_nnx=V, vit_equinox=N, mixer_linen=N),
    "attention_weights": _row(U, **dict.fromkeys(ATTENTION_MODELS, V)),
    "attention_entropy": _row(U, **dict.fromkeys(ATTENTION_MODELS, V)),
}

CHECKS = {
    "gsc": "equals the all-pairs matrix's column 0; the matrix-free estimate within 5 s.e.",
    "gsc_estimate": "within 5 standard errors of the dense GSC (summed over samples)",
    "gsc_matrix": "GSC(k, k) = 1, NaN for k < l, column 0 = the GSC profile",
    "gradient_norm": "GSC(k, 0) = gradient norm · sqrt(d_0 / d_k) ‖f_k‖ / ‖f_0‖",
    "layer_outputs": "f_0 is the model's output (net.apply), f_L its input",
    "layer_jacobians": "the product of the layer Jacobians is jax.jacrev of the model",
    "layer_to_layer_jacobians": "d f_0 / d x is jax.jacrev of the model",
    "input_to_layer_jacobians": "d f_0 / d x is jax.jacrev of the model",
    "input_output_jacobian": "jax.jacrev of the model's own output",
    "jacobian_spectrum": "dense singular values of jax.jacrev of the model; matrix-free moments",
    "domain_statistics": "the cosine from the layer outputs computed directly",
    "pythagorean_decomposition": "skip² + branch² + cross = ‖s + r‖² of the recorded parts",
    "block_gsc": "the measured GSC is the all-pairs matrix's GSC(l+1, l)",
    "block_jacobian_stats": "singular values of the layer Jacobians at the blocks",
    "dilution": "its measured GSC per unit is the all-pairs matrix's GSC(l+1, l)",
    "add_node_split": "an identity skip passes the arriving gradient on unchanged",
    "path_gradients": "the sum over all paths is ‖Jᵀv‖ from the layer Jacobians",
    "token_statistics": "residual and cosine computed directly from the layer outputs",
    "attention_weights": "rows are distributions (sum to 1, causal masks respected)",
    "attention_entropy": "-sum A log A of the attention weights",
}
assert set(CHECKS) == set(EXPECT)


# -- computing and checking one cell ---------------------------------------------------------


@functools.cache
def run(name: str, diag: str):
    """``(result, warnings)`` of one diagnostic on one model (float64), computed once."""
    net, params, x = model(name)
    key = jax.random.PRNGKey(7)
    call = {
        "gsc_estimate": lambda: jl.gsc_estimate(net, params, x, key, 32),
        "block_jacobian_stats": lambda: jl.block_jacobian_stats(net, params, x, key),
        "add_node_split": lambda: jl.add_node_split(net, params, x, key),
        "path_gradients": lambda: jl.path_gradients(net, params, x, key, 8),
        "jacobian_spectrum": lambda: jl.jacobian_spectrum(
            lambda v: _output(net, params, v), _embedded(name)[0], method="dense"
        ),
    }.get(diag, lambda: getattr(jl, diag)(net, params, x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [w for w in caught if not issubclass(w.category, DeprecationWarning)]


def _output(net, params, v):
    """The model's output ``f_0`` for one input ``v`` (no sample axis)."""
    return apply_batch(net, params, jax.tree_util.tree_map(lambda a: a[None], v))[0]


def _embedded(name):
    """The analysed inputs f_L (after a token-id model's embedding)."""
    net, params, x = model(name)
    return net.embed_inputs(params, x)


def _reference_jacobian(name):
    """``(S, d_0, d_L)``: jax.jacrev of the model's own forward, per sample."""
    net, params, _ = model(name)
    xs = net.samples(_embedded(name))

    def one(v):
        J = jax.jacrev(lambda u: _output(net, params, u))(v)
        out = jax.eval_shape(lambda u: _output(net, params, u), v)
        return J.reshape(int(np.prod(out.shape)), -1)

    return np.asarray(jax.vmap(one)(xs))


def _flat_layers(name):
    """Every layer output, flattened per sample: a list over l = 0 .. L of (S, d_l)."""
    outs, _ = run(name, "layer_outputs")
    net = model(name)[0]
    per = [jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(o) for o in outs]
    if net.batch_coupled:
        per = [p.reshape(p.shape[0], -1) for p in per]
    return per


def _z(est, exact):
    return (est.value - exact).sum(0)[1:] / np.sqrt((est.error**2).sum(0)[1:])


def check(name: str, diag: str) -> None:
    """The second method of :data:`CHECKS` for a cell whose quantity is computed."""
    net, params, x = model(name)
    out, _ = run(name, diag)
    G = np.asarray(run(name, "gsc_matrix")[0])
    g = np.asarray(run(name, "gsc")[0])
    L = net.num_layers
    if diag == "gsc":
        np.testing.assert_allclose(g, G[:, :, 0], rtol=1e-9)
    elif diag == "gsc_estimate":
        assert np.all(np.abs(_z(out, g)) < 5)
    elif diag == "gsc_matrix":
        np.testing.assert_allclose(np.diagonal(out, axis1=1, axis2=2), 1.0, rtol=1e-9)
        k, l = np.triu_indices(L + 1, 1)  # k < l: the layer perturbed above the observed
        assert np.all(np.isnan(np.asarray(out)[:, k, l]))
    elif diag == "gradient_norm":
        f = _flat_layers(name)
        d = np.array([a.shape[-1] for a in f])
        n = np.stack([np.linalg.norm(a, axis=-1) for a in f], axis=1)
        want = np.asarray(out) * np.sqrt(d[0] / d) * n / n[:, :1]
        np.testing.assert_allclose(want, g, rtol=1e-9)
    elif diag == "layer_outputs":
        assert len(out) == L + 1
        np.testing.assert_allclose(
            jax.flatten_util.ravel_pytree(out[-1])[0],
            jax.flatten_util.ravel_pytree(net.samples(_embedded(name)))[0],
        )
        f0 = jax.vmap(lambda v: _output(net, params, v))(net.samples(_embedded(name)))
        np.testing.assert_allclose(out[0], f0, rtol=1e-12, atol=1e-12)
    elif diag in ("layer_jacobians", "layer_to_layer_jacobians", "input_to_layer_jacobians"):
        J = _reference_jacobian(name)
        if diag == "layer_jacobians":
            prod = None
            for l in range(L - 1, -1, -1):  # from the input up: J_{l+1}^l @ ... @ J_L^{L-1}
                Jl = np.asarray(out.layer(l))
                prod = Jl if prod is None else Jl @ prod
            np.testing.assert_allclose(prod, J, rtol=1e-8, atol=1e-10 * np.abs(J).max())
        elif diag == "layer_to_layer_jacobians":
            d0 = J.shape[1]
            got = np.asarray(out.from_input[:, 0, :d0])
            np.testing.assert_allclose(got, J, rtol=1e-8, atol=1e-10 * np.abs(J).max())
        else:
            got = np.asarray(out[:, 0, : J.shape[1]])
            np.testing.assert_allclose(got, J, rtol=1e-8, atol=1e-10 * np.abs(J).max())
    elif diag == "input_output_jacobian":
        J = _reference_jacobian(name)
        np.testing.assert_allclose(out, J, rtol=1e-8, atol=1e-10 * np.abs(J).max())
    elif diag == "jacobian_spectrum":
        J = _reference_jacobian(name)[0]
        s = np.linalg.svd(J, compute_uv=False)
        np.testing.assert_allclose(float(out.largest.value), s[0], rtol=1e-9)
        np.testing.assert_allclose(float(out.frobenius_sq.value), (s**2).sum(), rtol=1e-9)
    elif diag == "domain_statistics":
        f = _flat_layers(name)
        for l, a in enumerate(f):
            u = a / np.linalg.norm(a, axis=-1, keepdims=True)
            B = u.shape[0]
            cos = (u @ u.T).sum() - B
            np.testing.assert_allclose(out.cosine[l], cos / (B * (B - 1)), rtol=1e-9, atol=1e-12)
    elif diag == "pythagorean_decomposition":
        np.testing.assert_allclose(out.skip_sq + out.branch_sq + out.cross, out.sum_sq, rtol=1e-9)
    elif diag in ("block_gsc", "dilution"):
        ls = np.array(net.block_outputs if diag == "block_gsc" else range(L))
        measured = np.asarray(out.gsc)
        np.testing.assert_allclose(measured, G[:, ls + 1, ls], rtol=1e-9)
    elif diag == "block_jacobian_stats":
        lj = run(name, "layer_jacobians")[0]
        layers = net.block_outputs or [  # a plain network: its square layers
            l for l in range(L - 1) if lj.layer(l).shape[1] == lj.layer(l).shape[2]
        ]
        for b, l in enumerate(layers):
            s = np.linalg.svd(np.asarray(lj.layer(l)), compute_uv=False)
            k = s.shape[-1]
            np.testing.assert_allclose(out.singular_values[:, b, :k], s, rtol=1e-8, atol=1e-12)
    elif diag == "add_node_split":
        skip, arriving = np.asarray(out.skip), np.asarray(out.arriving)
        mask = np.array([u.skip is None for u in _block_units(net)])
        assert mask.any()
        np.testing.assert_allclose(skip[:, mask], arriving[:, mask], rtol=1e-12)
    elif diag == "path_gradients":
        assert out.exact.shape[1] == len(net.block_outputs) + 1
        lj = run(name, "layer_jacobians")[0]
        k = max(net.block_outputs) + 1  # the first block's input f_k
        J = lj.layer(0)
        for l in range(1, k):
            J = J @ lj.layer(l)
        d0 = J.shape[1]
        v = np.asarray(normal(jax.random.PRNGKey(7), (J.shape[0], d0), J.dtype))
        want = np.linalg.norm(np.einsum("sij,si->sj", J, v), axis=-1)
        np.testing.assert_allclose(out.full, want, rtol=1e-9)
    elif diag == "token_statistics":
        outs = run(name, "layer_outputs")[0]
        T = _tokens(name)
        for l, X in enumerate(outs):  # the layers that are (T, features) token matrices
            X = np.asarray(X)
            if X.ndim != 3 or X.shape[1] != T:
                assert np.all(np.isnan(out.residual[:, l]))
                continue
            centred = X - X.mean(1, keepdims=True)
            res = np.linalg.norm(centred, axis=(1, 2)) / np.linalg.norm(X, axis=(1, 2))
            np.testing.assert_allclose(out.residual[:, l], res, rtol=1e-9)
    elif diag == "attention_weights":
        A = np.asarray(out)
        np.testing.assert_allclose(A.sum(-1), 1.0, rtol=1e-9)
        if name == "gpt2_nnx":  # causal: no weight on later keys
            assert np.all(np.triu(np.ones(A.shape[-2:]), 1)[None, None, None] * A == 0)
    elif diag == "attention_entropy":
        A = np.asarray(run(name, "attention_weights")[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            H = -np.nansum(np.where(A > 0, A * np.log(A), 0.0), axis=-1).mean(-1)
        np.testing.assert_allclose(out, H, rtol=1e-9, atol=1e-12)
    else:  # pragma: no cover - every row has a check
        raise AssertionError(diag)


def _block_units(net):
    from jacobian_lab.model import layer_units

    units = layer_units(net)
    return [units[net.num_layers - 1 - l] for l in net.block_outputs]


def _tokens(name):
    """The number of tokens: the rows of the first token-matrix layer output."""
    outs = run(name, "layer_outputs")[0]
    return next(np.shape(o)[1] for o in outs if np.ndim(o) == 3)


CELLS = [(m, d) for d in EXPECT for m in MODELS]


@pytest.mark.parametrize("name, diag", CELLS, ids=[f"{d}-{m}" for m, d in CELLS])
def test_cell(name, diag):
    expected = EXPECT[diag][name]
    if expected == U:
        with pytest.raises((ValueError, TypeError)):
            run(name, diag)
        return
    out, caught = run(name, diag)
    if expected == N:
        assert caught, f"{diag} on {name}: expected a warning with the NaN fields"
        leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(out)]
        assert any(np.isnan(a).any() for a in leaves)
    check(name, diag)


def test_float32_agrees_with_float64():
    """Every model in float32 gives the float64 GSC profile and layer outputs to float32
    precision (the same weights, rounded)."""
    for name in MODELS:
        net, params, x = model(name, "float32")
        g32 = np.asarray(jl.gsc(net, params, x))
        np.testing.assert_allclose(g32, run(name, "gsc")[0], rtol=2e-3, err_msg=name)


# -- the README's table ----------------------------------------------------------------------

MARK = ("<!-- coverage table: python tests/test_coverage.py -->", "<!-- end coverage table -->")
SYMBOL = {V: "✓", N: "NaN part", U: "—"}


def markdown() -> str:
    head = "| diagnostic | " + " | ".join(MODELS) + " | checked against |"
    rule = "|---" * (len(MODELS) + 2) + "|"
    rows = [
        f"| `{d}` | " + " | ".join(SYMBOL[EXPECT[d][m]] for m in MODELS) + f" | {CHECKS[d]} |"
        for d in EXPECT
    ]
    return "\n".join([head, rule, *rows])


def test_readme_shows_this_table():
    text = (ROOT / "README.md").read_text()
    m = re.search(re.escape(MARK[0]) + r"\n(.*?)\n" + re.escape(MARK[1]), text, flags=re.S)
    assert m, "README.md lacks the coverage table markers"
    assert m.group(1).strip() == markdown(), "run python tests/test_coverage.py --write"


if __name__ == "__main__":
    table = markdown()
    if "--write" in sys.argv:
        path = ROOT / "README.md"
        text = path.read_text()
        new = re.sub(
            re.escape(MARK[0]) + r"\n.*?\n" + re.escape(MARK[1]),
            lambda _: f"{MARK[0]}\n{table}\n{MARK[1]}",
            text,
            flags=re.S,
        )
        path.write_text(new)
    print(table)


# -- the gallery's models against the same network written out by hand -----------------------
#
# Each test writes one gallery model out as a list of functions ``g_1, ..., g_L``
# (``f_{L-i} = g_i(f_{L-i+1})``) calling the model's own submodules (Flax classes applied to
# the variables' subtrees, Equinox and NNX submodules called directly), independently of how
# ``jl.chain`` reads the model, and checks the read model's output and its GSC at every layer
# output against ``jax.jacrev`` through them (float64, 1e-9). The gallery's own measurements
# (examples/gallery/run.py: measure) run on the same read models.

F64 = jnp.float64
RUN = _gallery_run()


def _read(name: str):
    """``(gallery module, model, x, net, params, numbers)`` at the tiny size in float64: the
    gallery's reading (shared with the table) and its measurements."""
    module = RUN.load(RUN.MODELS[name][0])
    net, params, x = model(name)
    numbers = RUN.measure(net, params, x, key=jax.random.PRNGKey(3))
    return module, _source(name), x, net, params, numbers


def _source(name: str):
    """The gallery model itself, as its library's user holds it (the one model() read)."""
    model(name)
    return SOURCES[name, "float64"]


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
        jax.vmap(lambda t: net.apply(params, embed(t)))(ids),
        want,
        rtol=1e-12,
        atol=1e-12 * float(np.abs(want).max()),
    )
    _check(numbers, layers, jax.vmap(embed)(ids))

    # the attention weights read from the model are those of its own projections
    def weights(b, h):  # h (T, D): softmax(q k^T / sqrt(d_h)) under the causal mask
        q, k = b.attn.query(h), b.attn.key(h)  # (T, heads, d_h)
        logits = jnp.einsum("qhd,khd->hqk", q, k) / jnp.sqrt(q.shape[-1])
        logits = jnp.where(mask[0], logits, jnp.finfo(logits.dtype).min)
        return jax.nn.softmax(logits, axis=-1)

    def by_hand(t):
        h, out = embed(t), []
        for b in model.blocks:
            out.append(weights(b, h))
            h = mlp(b, attn(b, h))
        return jnp.stack(out)

    A = jl.attention_weights(net, params, ids)
    # NNX's attention takes its softmax in float32 whatever the input dtype (see
    # tests/test_brought_transformer.py): agreement to float32 precision
    np.testing.assert_allclose(A, jax.vmap(by_hand)(ids), rtol=1e-5, atol=1e-7)


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
