"""jl.inspect and the remedies: findings against known answers (an orthogonal linear
network has nothing to explode; a batch-norm ReLU network explodes at the mean-field rate),
each remedy against the same network written by hand, and the weight-scale search against
the mean-field critical point."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jacobian_lab as jl
from jacobian_lab.model import apply_unit

WIDTH = 16


def _x(n=6, d=WIDTH, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, d), jnp.float64)


def test_orthogonal_linear_network_has_nothing_to_explode(key):
    """Orthogonal weights, no activation: every Jacobian is orthogonal, so GSC(k, 0) = 1,
    the growth rate is 1 and every singular value of the input-output Jacobian is 1; the
    layers are linear (linear share 1), which is the only finding."""
    net = jl.mlp(5, WIDTH, "linear", weight_init="orthogonal", dtype="float64")
    ins = jl.inspect(net, net.init(key), _x(), remedies=())
    np.testing.assert_allclose(ins.gsc, 1.0, rtol=1e-10)
    np.testing.assert_allclose(ins.growth, 1.0, rtol=1e-10)
    s = ins.spectrum_summary()
    assert s["method"] == "dense"
    assert s["largest"] == pytest.approx(1.0, rel=1e-10)
    assert s["smallest"] == pytest.approx(1.0, rel=1e-10)
    assert [f.name for f in ins.findings] == ["pseudo_linear_layers"]
    rows = ins.to_records()
    assert [r["layer"] for r in rows] == ["input", *net.names]
    assert [r["l"] for r in rows] == list(range(5, -1, -1))
    np.testing.assert_allclose([r["gsc_layer"] for r in rows[1:]], 1.0, rtol=1e-10)
    np.testing.assert_allclose([r["length"] for r in rows], rows[0]["length"], rtol=1e-10)
    json.dumps(ins.to_json(), allow_nan=False)  # NaN cells become null


def test_batch_norm_relu_network_explodes_at_the_mean_field_rate(key):
    """A batch-norm ReLU MLP (width 64, 12 layers, batch 16): the finding is exploding
    gradients, its measured rate within 0.05 of gsc_growth_rate (which agrees to 0.1% at
    width 128, test_meanfield; 3 seeds at width 64 spread by about 0.02), the prediction
    stated beside it."""
    B, L = 16, 12
    net = jl.mlp(L, 64, "relu", norm="batch", sigma_w=np.sqrt(2), dtype="float64")
    x = _x(B, 64)
    ins = jl.inspect(net, None, x, keys=jax.random.split(key, 3), remedies=())
    theory = float(jl.gsc_growth_rate("relu", np.sqrt(2), 0.0, "batch", batch_size=B))
    found = {f.name: f for f in ins.findings}
    assert "exploding_gradients" in found
    f = found["exploding_gradients"]
    assert f.theory == pytest.approx(theory, rel=1e-12)
    assert f.value == pytest.approx(theory, abs=0.05)
    assert ins.columns["gsc"].shape == (3, L + 1)
    rows = ins.to_records()
    assert rows[0]["gsc_lo"] <= rows[0]["gsc"] <= rows[0]["gsc_hi"]


def test_branch_scale_is_the_residual_scale_of_the_same_network(key):
    """Remedied(scale_branches) with alpha is resmlp(residual_scale=alpha) on the same
    params: the GSC agrees to rounding."""
    net = jl.resmlp(4, WIDTH, "relu", dtype="float64")
    p, x = net.init(key), _x()
    m = jl.Remedied(net, scale_branches=True)
    got = jl.gsc(m, (p, m.knobs(alpha=0.5)), x)
    want = jl.gsc(jl.resmlp(4, WIDTH, "relu", residual_scale=0.5, dtype="float64"), p, x)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_weight_scale_is_the_params_scaled_by_hand(key):
    """Remedied(scale_weights) with c per stage is the network whose weight matrices of
    that stage are multiplied by c (biases untouched)."""
    net = jl.mlp(4, WIDTH, "tanh", sigma_b=0.3, dtype="float64")
    p, x = net.init(key), _x()
    m = jl.Remedied(net, scale_weights=True)
    c = [1.0] * len(net.stages)
    c[-1] = 1.7
    got = jl.gsc(m, (p, m.knobs(c)), x)
    stacked = net.stages[-1]
    assert isinstance(stacked, jl.Repeat)
    by_hand = jax.tree_util.tree_map(lambda a: a, p)
    by_hand["units"] = {**p["units"], "W": 1.7 * p["units"]["W"]}
    np.testing.assert_allclose(got, jl.gsc(net, by_hand, x), rtol=1e-10)


def test_skips_add_the_input_of_each_same_shape_layer(key):
    """Remedied(skips) makes each plain layer h -> h + layer(h): its outputs computed by
    hand from the network's own units."""
    net = jl.mlp(3, WIDTH, "tanh", dtype="float64")
    p, x = net.init(key), _x()
    ins = jl.inspect(net, p, x, remedies=("skips",), method="dense")
    (row,) = ins.remedies
    assert row.applies and len(row.setting["layers"]) == 3
    assert all(r["dilution_k"] > 0 for r in row.setting["layers"])
    m = jl.Remedied(net, skips=((1, 0),))
    outs = jl.layer_outputs(m, (p, m.knobs()), x)
    assert net.names == ("dense1", "dense2", "dense3")  # a stem layer, then a stage of 2
    unit = net.stages[1].stage
    np.testing.assert_allclose(outs[2], jl.layer_outputs(net, p, x)[2], rtol=1e-12)  # no skip
    h = outs[2]  # f_2: the stem's output, the stacked stage's input
    for l, i in ((1, 0), (0, 1)):
        q = jax.tree_util.tree_map(lambda a, i=i: a[i], p["units"])
        h = h + jax.vmap(lambda v, q=q: apply_unit(unit, q, v))(h)
        np.testing.assert_allclose(outs[l], h, rtol=1e-10)


def test_weight_scale_search_finds_the_critical_tanh_network(key):
    """A chaotic tanh network (sigma_w = 2.5, sigma_b = 0): the search puts the weight
    scale of the repeated stage where the GSC grows by a factor closest to 1 per layer;
    in mean field that is the critical sigma_w = 1 (chi_1 = 1), given beside it. At width
    64 and 10 layers the found sigma_w * c lies within 25% of it (finite width moves the
    fitted rate by a few percent per layer, and the rate is flat near criticality)."""
    net = jl.mlp(10, 64, "tanh", sigma_w=2.5, dtype="float64")
    ins = jl.inspect(net, net.init(key), _x(8, 64), remedies=("weight_scale",), method="dense")
    (row,) = ins.remedies
    assert row.applies
    (stage,) = [v for k, v in row.setting.items() if k.startswith("stage")]
    assert row.setting["mean_field_critical_c"] == pytest.approx(1 / 2.5, rel=1e-6)
    assert 0.75 < 2.5 * stage["c"] < 1.25
    assert abs(math.log(row.after["growth_rate"])) < abs(math.log(row.before["growth_rate"]))
    assert "exploding_gradients" in {f.name for f in ins.findings}
    assert ins.theory["growth_rate"] > 1
    # the prediction beside it: the mean-field rate at the scale found
    want = jl.gsc_growth_rate("tanh", 2.5 * stage["c"], 0.0, "none")
    assert row.predicted["growth_rate"] == pytest.approx(float(want), rel=1e-9)


@pytest.mark.parametrize("remedy", ["branch_scale", "skips"])
def test_pythagorean_prediction_of_a_remedy_that_changes_one_block(key, remedy):
    """Where a remedy changes one block, the last (a tanh ResNet of one block; a tanh MLP
    whose only same-shape layer is its last), no later layer sees a changed input and the
    prediction of the remedy is the Pythagorean equation alone, exact up to the cross terms
    it drops (the Jacobian's trace, the skip-branch inner product: O(1/sqrt(width))).
    Width 256, 8 samples, a chaotic tanh (sigma_w = 2.5): within 3% in GSC(L, 0), while
    the remedy itself changes it by more than 10%. (Past the first block a remedy also
    changes the inputs of the layers after it, which the first-order prediction leaves
    out: its documented limit.)"""
    width = 256
    if remedy == "branch_scale":
        net = jl.resmlp(1, width, "tanh", sigma_w=2.5, in_dim=64, dtype="float64")
    else:
        net = jl.mlp(2, width, "tanh", sigma_w=2.5, in_dim=64, dtype="float64")
    x = _x(8, 64)
    ins = jl.inspect(net, net.init(key), x, remedies=(remedy,), alpha=0.2, method="dense")
    (row,) = ins.remedies
    assert row.applies and row.predicted, row.prediction
    before, after, pred = row.before["gsc_L"], row.after["gsc_L"], row.predicted["gsc_L"]
    assert abs(math.log(after / before)) > math.log(1.1)  # the remedy changes the GSC ...
    assert pred == pytest.approx(after, rel=0.03)  # ... and the prediction follows it
    if remedy == "skips":
        (layer,) = row.setting["layers"]
        assert layer["predicted_k"] == pytest.approx(layer["dilution_k"], rel=0.1)


def test_a_remedy_that_does_not_apply_says_why(key):
    net = jl.mlp(3, WIDTH, "relu", dtype="float64")
    ins = jl.inspect(net, net.init(key), _x(), remedies=("branch_scale", "weight_scale"))
    branch, weight = ins.remedies
    assert not branch.applies and "no residual blocks" in branch.why
    assert weight.applies
    (stage,) = [v for k, v in weight.setting.items() if k.startswith("stage")]
    # ReLU without biases: the GSC is invariant to the scale; c keeps the lengths, which in
    # mean field grow by sigma_w c / sqrt(2) per layer: He's sqrt(2) (width 16: within 15%)
    assert "invariant to rescaling" in stage["note"]
    assert stage["c"] == pytest.approx(np.sqrt(2), rel=0.15)
    assert weight.after["gsc_L"] == pytest.approx(weight.before["gsc_L"], rel=1e-6)


def test_a_model_read_whole_is_inspected_under_its_own_names(key):
    """A plain-JAX MLP read by jl.chain: the table is keyed by the read layer names and
    the seeds are the model rebuilt from each key."""

    def make(k):
        ks = jax.random.split(k, 3)
        return [
            {"W": jax.random.normal(kk, (WIDTH, WIDTH), jnp.float64) / np.sqrt(WIDTH)} for kk in ks
        ]

    def apply(params, x):
        for layer in params:
            x = jl.tap(jnp.tanh(x @ layer["W"]))
        return x

    x = _x()
    model, params = jl.chain((apply, make(key)), x)
    ins = jl.inspect(
        model,
        None,
        x,
        keys=jax.random.split(key, 2),
        init=lambda k: jl.chain((apply, make(k)), x)[1],
        remedies=("skips",),
    )
    assert [r["layer"] for r in ins.to_records()][1:] == list(model.names)
    assert ins.columns["gsc"].shape == (2, model.num_layers + 1)
    assert ins.remedies[0].applies


def test_bad_arguments_name_the_fix(key):
    net = jl.mlp(2, WIDTH, "relu", dtype="float64")
    with pytest.raises(ValueError, match="remedies: unknown \\['skip'\\]"):
        jl.inspect(net, net.init(key), _x(), remedies=("skip",))
    with pytest.raises(ValueError, match="params is None"):
        jl.inspect(net, None, _x())
    with pytest.raises(ValueError, match="method must be"):
        jl.inspect(net, net.init(key), _x(), method="exact")


def test_a_saturated_network_is_inspected_without_a_growth_rate(key):
    """tanh at sigma_w = 1e4 in float32: tanh' rounds to 0, so GSC(k, 0) is exactly 0
    beyond the first layer. No rate can be fitted: the growth is NaN, no gradient finding
    is made, and the notes carry the underflow warning naming the layer."""
    net = jl.mlp(4, WIDTH, "tanh", sigma_w=1e4)
    x = _x().astype(jnp.float32)
    ins = jl.inspect(net, net.init(key), x, remedies=())
    assert np.isnan(ins.growth).all()
    assert not {"exploding_gradients", "vanishing_gradients"} & {f.name for f in ins.findings}
    assert any(n.startswith("UnderflowWarning") and "f_" in n for n in ins.notes)
    assert any("no growth rate" in n for n in ins.notes)
