"""Settings shared by several analyses."""

from jacobian_lab.zoo import ACTIVATION_SIGMA_W

SIGMA_W = {"linear": 1.0, **ACTIVATION_SIGMA_W}
"""Weight scale per activation: sigma_w = sqrt(2) for ReLU (He), 1 for tanh and SeLU
(LeCun), as in :data:`jacobian_lab.zoo.ACTIVATION_SIGMA_W`, and 1 for a linear network."""
