"""jl.to_records: every result type as long-format rows keyed by layer name and sample,
checked entry by entry against the arrays they came from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl


@pytest.fixture(scope="module")
def res():
    net = jl.resmlp(3, 8, "relu", dtype="float64")
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8), jnp.float64)
    return net, net.init(jax.random.PRNGKey(0)), x


def _value(rows, **where):
    (row,) = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
    return row["value"]


def test_profile_rows_are_keyed_by_layer_name_and_sample(res):
    """GSC(k, 0) per sample: S x (L+1) rows, entry (s, l) is g[s, l], layer l = 0 the
    output, l = L the input."""
    net, p, x = res
    g = np.asarray(jl.gsc(net, p, x))
    rows = jl.to_records(g, net, quantity="gsc")
    L = net.num_layers
    assert len(rows) == g.size
    assert {r["quantity"] for r in rows} == {"gsc"}
    assert _value(rows, sample=2, l=1) == g[2, 1]
    assert [r["layer"] for r in rows if r["sample"] == 0] == [
        *(net.names[L - 1 - l] for l in range(L)),
        "input",
    ]


def test_result_types_with_layer_and_block_fields(res):
    """DomainStats mixes (L+1,) and (L,) fields; Pythagorean and BlockGSC are per block,
    labelled by the block's output layer; a seed sweep gets a seed column."""
    net, p, x = res
    dom = jl.domain_statistics(net, p, x)
    rows = jl.to_records(dom, net)
    assert _value(rows, quantity="cosine", layer="input") == pytest.approx(float(dom.cosine[-1]))
    L = net.num_layers
    assert len([r for r in rows if r["quantity"] == "sign_diversity"]) == L
    py = jl.pythagorean_decomposition(net, p, x)
    rows = jl.to_records(py, net)
    blocks = net.block_outputs
    for j, l in enumerate(blocks):
        label = net.names[L - 1 - l]
        assert _value(rows, quantity="skip_sq", sample=3, layer=label) == pytest.approx(
            float(py.skip_sq[3, j])
        )
    est = jl.gsc_estimate(net, p, x, jax.random.PRNGKey(2), 8)
    rows = jl.to_records(est, net)
    assert {"value", "error"} <= {r["quantity"] for r in rows}
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    sweep = np.asarray(jl.gsc_over_seeds(net, keys, x))
    rows = jl.to_records(sweep, net)
    assert _value(rows, seed=1, sample=0, l=L) == sweep[1, 0, L]


def test_all_pairs_matrix_rows_carry_k_and_l(res):
    net, p, x = res
    G = np.asarray(jl.gsc_matrix(net, p, x))
    rows = jl.to_records(G, net, quantity="gsc")
    assert len(rows) == G.size
    assert _value(rows, sample=1, k=3, l=1) == G[1, 3, 1]


def test_a_field_of_another_size_is_refused(res):
    net, _, _ = res
    with pytest.raises(ValueError, match="last axis of 7, which is neither"):
        jl.to_records(np.zeros((2, 7)), net)
