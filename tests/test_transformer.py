"""The built-in transformer (jacobian_lab.transformer) and the token diagnostics
(jacobian_lab.tokens)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_eqns

import jacobian_lab as jl
from jacobian_lab.model import Block, Layer, Repeat, forward

T, D, H = 5, 8, 2


def _x(n=2, seed=1, dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, T, D), dtype)


@pytest.mark.parametrize(
    "norm, skips, mlp_ratio, causal",
    [("pre", True, 2, False), ("post", True, 2, True), ("none", False, 0, False)],
)
def test_input_output_jacobian_matches_jacfwd_of_the_forward_pass(
    key, norm, skips, mlp_ratio, causal
):
    """The driver's Jacobian (layer by layer through the scanned groups) equals jax.jacfwd
    of the whole model; float64, so to rounding (1e-12 relative)."""
    m = jl.transformer(
        3, D, H, T, norm=norm, skips=skips, mlp_ratio=mlp_ratio, causal=causal, dtype="float64"
    )
    p = m.init(key)
    x = _x()
    J = jl.input_output_jacobian(m, p, x)
    ref = jax.vmap(jax.jacfwd(lambda v: m.apply(p, v[None])[0]))(x).reshape(2, T * D, T * D)
    np.testing.assert_allclose(J, ref, rtol=1e-12, atol=1e-12 * float(jnp.max(jnp.abs(ref))))


def test_stages_params_layout_and_initialization(key):
    """Stages: one scanned group (attn Block, mlp Block) per transformer block, then the
    Pre-LN final norm; params as the module docstring lays them out; weights with
    variance 1/fan_in (checked to 4 standard errors of the sample variance), zero biases."""
    m = jl.transformer(4, 16, 4, T, mlp_ratio=4)
    assert isinstance(m.stages[0], Repeat) and m.stages[0].n == 4
    assert all(isinstance(u, Block) for u in m.stages[0].stage)
    assert isinstance(m.stages[1], Layer) and m.num_layers == 9
    assert m.names[:3] == ("block1.attn", "block1.mlp", "block2.attn")
    assert m.block_outputs == tuple(range(1, 9)) and m.attention_layers == (0, 2, 4, 6)
    p = m.init(key)
    shapes = jax.tree_util.tree_map(jnp.shape, p)
    assert shapes == {
        "blocks": {
            "attn": {n: {"W": (4, 16, 16), "b": (4, 16)} for n in "qkvo"},
            "mlp": {
                "up": {"W": (4, 64, 16), "b": (4, 64)},
                "down": {"W": (4, 16, 64), "b": (4, 16)},
            },
        }
    }
    for W, fan_in in ((p["blocks"]["attn"]["q"]["W"], 16), (p["blocks"]["mlp"]["down"]["W"], 64)):
        var = float(jnp.var(W))
        assert abs(var * fan_in - 1) < 4 * np.sqrt(2 / W.size)
    assert all(float(jnp.max(jnp.abs(b))) == 0 for b in jax.tree_util.tree_leaves(p) if b.ndim == 2)
    attn_only = jl.transformer(3, 16, 4, T, mlp_ratio=0, norm="post", skips=False)
    assert isinstance(attn_only.stages[0].stage, Layer) and attn_only.num_layers == 3
    assert "mlp" not in attn_only.init(key)["blocks"]


def test_compile_size_does_not_grow_with_depth():
    """The traced program of a 2-block and a 16-block transformer has the same number of
    equations (the blocks run under lax.scan), forward and for the dense GSC."""

    def size(n, fn):
        m = jl.transformer(n, D, H, T, norm="post")
        x = jax.ShapeDtypeStruct((2, T, D), jnp.float32)
        return count_eqns(jax.make_jaxpr(lambda q, v: fn(m, q, v))(m.params_spec, x).jaxpr)

    apply = lambda m, q, v: m.apply(q, v)  # noqa: E731
    gsc = lambda m, q, v: jl.gsc(m, q, v, method="dense")  # noqa: E731
    for fn in (apply, gsc):
        assert size(2, fn) == size(16, fn) > 20


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        jl.transformer(2, 10, 3, T)
    with pytest.raises(ValueError, match="unknown norm"):
        jl.transformer(2, D, H, T, norm="layer")
    with pytest.raises(ValueError, match="mlp_ratio"):
        jl.transformer(2, D, H, T, mlp_ratio=-1)
    m = jl.transformer(2, D, H, T)
    with pytest.raises(ValueError, match="seq_len=5, width=8"):
        m.apply(m.init(jax.random.PRNGKey(0)), jnp.zeros((2, T + 1, D)))


def test_attention_rows_are_distributions_and_causal_masks_the_future(key):
    m = jl.transformer(1, D, H, T, causal=True, dtype="float64")
    p = jax.tree_util.tree_map(lambda a: a[0], m.init(key)["blocks"]["attn"])
    A = m.attention_weights(p, _x(1)[0])
    assert A.shape == (H, T, T)
    np.testing.assert_allclose(jnp.sum(A, -1), 1.0, rtol=1e-14)
    assert float(jnp.max(jnp.abs(jnp.triu(A, 1)))) == 0.0
    assert forward(m, m.init(key), _x(1)[0])[0].shape == (T, D)


# -- token diagnostics ---------------------------------------------------------------


def test_token_statistics_on_hand_computed_matrices():
    """Identical tokens: residual 0 and cosine 1; orthonormal tokens: cosine 0 and
    residual sqrt(1 - 1/T) (the mean e/T has norm^2 1/T per token, X has norm^2 1 per
    token); a two-token case by hand. Exact up to float64 rounding."""
    row = jnp.arange(1.0, D + 1)
    same = jnp.tile(row, (T, 1))
    assert float(jl.rank_collapse_residual(same)) == pytest.approx(0.0, abs=1e-15)
    assert float(jl.token_cosine(same)) == pytest.approx(1.0, rel=1e-14)
    eye = jnp.eye(T, D)
    assert float(jl.token_cosine(eye)) == pytest.approx(0.0, abs=1e-15)
    assert float(jl.rank_collapse_residual(eye)) == pytest.approx(np.sqrt(1 - 1 / T), rel=1e-14)
    two = jnp.array([[1.0, 0.0], [1.0, 1.0]])  # mean (1, 0.5): residual rows (0, -+0.5)
    assert float(jl.rank_collapse_residual(two)) == pytest.approx(np.sqrt(0.5 / 3), rel=1e-14)
    assert float(jl.token_cosine(two)) == pytest.approx(1 / np.sqrt(2), rel=1e-14)


def test_token_statistics_of_a_model_read_the_recorded_layers(key):
    """token_statistics equals the matrix functions applied to forward()'s layer outputs,
    for the built-in transformer and for the same blocks brought as a chain; the input
    column is the input's statistics."""
    m = jl.transformer(2, D, H, T, norm="post", dtype="float64")
    p = m.init(key)
    x = _x()
    st = jl.token_statistics(m, p, x)
    assert st.residual.shape == st.cosine.shape == (2, m.num_layers + 1)
    outs = jax.vmap(lambda v: jnp.concatenate(forward(m, p, v)[1])[::-1])(x)  # (S, L, T, D)
    np.testing.assert_allclose(st.residual[:, :-1], jl.rank_collapse_residual(outs), rtol=1e-12)
    np.testing.assert_allclose(st.cosine[:, :-1], jl.token_cosine(outs), rtol=1e-12)
    np.testing.assert_allclose(st.cosine[:, -1], jl.token_cosine(x), rtol=1e-12)
    one = lambda i, s: jax.tree_util.tree_map(lambda a: a[i], p["blocks"][s])  # noqa: E731
    layers = [
        (
            lambda q, h, s=s: m.token_norm(h + (m.attention if s == "attn" else m.mlp)(q, h)),
            one(i, s),
        )
        for i in range(2)
        for s in ("attn", "mlp")
    ]
    ch, cp = jl.chain(layers)
    st2 = jl.token_statistics(ch, cp, x)
    np.testing.assert_allclose(st2.residual, st.residual, rtol=1e-12)
    np.testing.assert_allclose(st2.cosine, st.cosine, rtol=1e-12)


def test_token_statistics_refuse_zero_tokens_and_odd_sizes(key):
    m = jl.transformer(1, D, H, T, norm="none", skips=False, mlp_ratio=0, dtype="float64")
    p = jax.tree_util.tree_map(jnp.zeros_like, m.init(key))
    with pytest.raises(FloatingPointError, match="exactly zero"):
        jl.token_statistics(m, p, _x())
    ch, cp = jl.chain([lambda h: h.reshape(-1)[:7]])
    with pytest.warns(jl.TokenWarning, match="'layer0' are not \\(5, features\\) token"):
        st = jl.token_statistics(ch, cp, _x())  # the input is a token matrix, layer0 not
    assert np.isnan(st.residual[:, 0]).all() and np.isnan(st.cosine[:, 0]).all()
    assert np.isfinite(st.residual[:, 1]).all() and np.isfinite(st.cosine[:, 1]).all()
    with pytest.raises(ValueError, match="none of this model's is: give seq_len="):
        jl.token_statistics(ch, cp, _x()[0])  # one flat sequence: no token matrix at all


def test_attention_entropy_uniform_and_one_hot(key):
    """Zero query/key weights give uniform attention: entropy log T exactly (causal: the
    mean of log t over queries t = 1..T); huge logits towards one key give entropy ~0."""
    m = jl.transformer(2, D, H, T, mlp_ratio=0, dtype="float64")
    p = m.init(key)
    zero_qk = jax.tree_util.tree_map(lambda a: a, p)
    for n in "qk":
        zero_qk["blocks"]["attn"][n] = jax.tree_util.tree_map(
            jnp.zeros_like, p["blocks"]["attn"][n]
        )
    e = jl.attention_entropy(m, zero_qk, _x())
    assert e.shape == (2, 2, H)
    np.testing.assert_allclose(e, np.log(T), rtol=1e-13)
    mc = jl.transformer(2, D, H, T, mlp_ratio=0, causal=True, dtype="float64")
    np.testing.assert_allclose(
        jl.attention_entropy(mc, zero_qk, _x()), np.mean(np.log(np.arange(1, T + 1))), rtol=1e-13
    )
    A = jl.attention_weights(m, p, _x())
    assert A.shape == (2, 2, H, T, T)
    h = _x()[0]
    ref = m.attention_weights(jax.tree_util.tree_map(lambda a: a[0], p["blocks"]["attn"]), h)
    np.testing.assert_allclose(A[0, 0], ref, rtol=1e-13)
