"""Mean-field maps against closed forms. Quadrature is float64 Gauss-Legendre split at
kinks, so agreement is to about 1e-12."""

import numpy as np
import pytest

from jacobian_lab import meanfield as mf


def _erf_q(q):  # E[erf(u)^2], u ~ N(0, q)
    return 2 / np.pi * np.arcsin(2 * q / (1 + 2 * q))


def test_relu_chi_is_half_sigma_w_squared_at_any_length():
    sigma_w = np.array([0.5, 1.0, np.sqrt(2), 3.0])
    np.testing.assert_allclose(mf.chi("relu", 0.7, sigma_w), sigma_w**2 / 2, rtol=1e-12)
    np.testing.assert_allclose(mf.chi("relu", 25.0, 1.3), 1.3**2 / 2, rtol=1e-12)


def test_linear_network_chi_is_sigma_w_squared_and_length_map_is_affine():
    np.testing.assert_allclose(mf.chi("linear", 0.3, 1.7), 1.7**2, rtol=1e-12)
    np.testing.assert_allclose(mf.length_map("linear", 0.3, 1.7, 0.2), 1.7**2 * 0.3 + 0.04)


@pytest.mark.parametrize("q", [0.05, 0.7, 3.0, 50.0])
def test_erf_length_and_correlation_maps_match_closed_forms(q):
    """Williams (1997): E[erf(u1) erf(u2)] = 2/pi asin(2 q12 / sqrt((1+2 q11)(1+2 q22)))."""
    np.testing.assert_allclose(
        mf.length_map("erf", q, 1.3, 0.1), 1.69 * _erf_q(q) + 0.01, rtol=1e-11
    )
    c = np.array([-0.9, -0.2, 0.3, 0.99])
    q12 = 2 / np.pi * np.arcsin(2 * q * c / (1 + 2 * q))
    expected = (1.69 * q12 + 0.01) / (1.69 * _erf_q(q) + 0.01)
    np.testing.assert_allclose(mf.correlation_map("erf", c, q, 1.3, 0.1), expected, rtol=1e-11)


def test_relu_correlation_map_is_the_arc_cosine_kernel():
    """Cho & Saul: for He-initialized ReLU, c -> (sqrt(1-c^2) + (pi - acos c) c) / pi."""
    c = np.array([-0.95, -0.5, 0.0, 0.4, 0.9])
    expected = (np.sqrt(1 - c**2) + (np.pi - np.arccos(c)) * c) / np.pi
    np.testing.assert_allclose(
        mf.correlation_map("relu", c, 1.7, np.sqrt(2), 0.0), expected, rtol=1e-11, atol=1e-14
    )


def test_fixed_points_and_depth_scales_are_self_consistent():
    sw, sb = np.array([1.2, 1.8]), np.array([0.05, 0.3])
    m = mf.mean_field("tanh", sw, sb)
    np.testing.assert_allclose(mf.length_map("tanh", m.q_star, sw, sb), m.q_star, rtol=1e-10)
    np.testing.assert_allclose(
        mf.correlation_map("tanh", m.c_star, m.q_star, sw, sb), m.c_star, rtol=1e-8
    )
    np.testing.assert_allclose(m.chi_1, mf.chi("tanh", m.q_star, sw), rtol=1e-12)
    assert np.all(np.isfinite(m.xi_q)) and np.all(m.xi_q > 0) and np.all(m.xi_c > 0)


def test_he_relu_is_critical_and_tanh_critical_line_has_chi_one():
    m = mf.mean_field("relu", np.sqrt(2), 0.0)
    assert float(m.chi_1) == pytest.approx(1.0, abs=1e-12)
    assert np.isinf(m.xi_q)  # q map is the identity: every q is a fixed point
    sb = np.array([0.05, 0.3])
    sw = mf.critical_sigma_w("tanh", sb)
    assert np.all(sw > 1) and sw[1] > sw[0]  # the critical line rises with sigma_b
    np.testing.assert_allclose(mf.mean_field("tanh", sw, sb).chi_1, 1.0, atol=1e-9)


def test_ordered_and_critical_networks_have_correlation_fixed_point_one():
    """chi_1 is the slope of the correlation map at c = 1: for chi_1 <= 1 the stable fixed
    point is c* = 1 with xi_c = -1/ln chi_1 (infinite at chi_1 = 1); chaotic networks have
    c* < 1."""
    he = mf.mean_field("relu", np.sqrt(2), 0.0)
    assert float(he.c_star) == 1.0 and np.isinf(he.xi_c)
    ordered = mf.mean_field("tanh", 0.8, 0.3)
    assert float(ordered.chi_1) < 1 and float(ordered.c_star) == 1.0
    assert float(ordered.xi_c) == pytest.approx(-1 / np.log(float(ordered.chi_1)), rel=1e-12)
    chaotic = mf.mean_field("tanh", 2.5, 0.1)
    assert float(chaotic.chi_1) > 1 and float(chaotic.c_star) < 0.9


def test_length_sequence_starts_at_q1_and_follows_the_map():
    q = mf.length_sequence("tanh", 1.0, 1.5, 0.1, 4)
    assert q.shape == (4,) and q[0] == 1.0
    np.testing.assert_allclose(q[1], mf.length_map("tanh", 1.0, 1.5, 0.1), rtol=1e-13)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown activation 'nope'"):
        mf.chi("nope", 1.0, 1.0)
