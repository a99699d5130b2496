"""Settings shared by several analyses."""

import jax
import jax.numpy as jnp

from jacobian_lab.zoo import ACTIVATION_SIGMA_W

SIGMA_W = {"linear": 1.0, "sigmoid": 1.0, "hard_tanh": 1.0, **ACTIVATION_SIGMA_W}
"""Weight scale per activation: sigma_w = sqrt(2) for ReLU (He), 1 for tanh and SeLU
(LeCun), as in :data:`jacobian_lab.zoo.ACTIVATION_SIGMA_W`, and 1 for a linear network.
Sigmoid and hard tanh get LeCun's 1 too, the variance 1/fan_in that Glorot's 2/(fan_in +
fan_out) is for equal widths: the standard initialization the vanishing-gradient claims are
about. (Hard tanh with sigma_w = 1 sits on its critical line, like tanh; sigmoid's critical
sigma_w at sigma_b = 0 is about 10.15, see :func:`jacobian_lab.critical_sigma_w`.)"""


def gaussian_inputs(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Standard Gaussian inputs of ``shape``, drawn in float32 and cast to ``dtype``: the
    same numbers at every precision, so ``--dtype float64`` changes only the rounding."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)
