"""jacobian_lab: Jacobians, spectra, gradient scale coefficients and residual-block
diagnostics of randomly initialized deep networks, in JAX.

Conventions used throughout (see each function's docstring):
layers are indexed as in the GSC paper (arXiv 1712.05577), ``f_0`` = output,
``f_L = x`` = input; ``J_k^l = d f_l / d f_k`` for ``k >= l``.
"""

from jacobian_lab.activations import ACTIVATIONS, get_activation
from jacobian_lab.domain import DomainStats, domain_statistics
from jacobian_lab.gsc import (
    GrowthRate,
    gradient_scale,
    growth_rate,
    gsc,
    gsc_matrix,
    gsc_over_seeds,
    qm_norm,
)
from jacobian_lab.initializers import INITIALIZERS, weight_matrix
from jacobian_lab.jacobians import jacobian
from jacobian_lab.layered import (
    LayerJacobians,
    PairJacobians,
    input_output_jacobian,
    input_to_layer_jacobians,
    layer_jacobians,
    layer_to_layer_jacobians,
)
from jacobian_lab.meanfield import MeanField, critical_sigma_w, gsc_growth_rate, mean_field
from jacobian_lab.networks import Network, mlp, resmlp
from jacobian_lab.paths import PathGradients, path_gradients
from jacobian_lab.random_matrix import (
    fuss_catalan_density,
    fuss_catalan_moments,
    jacobian_moments,
    jacobian_spectral_density,
    marchenko_pastur_density,
)
from jacobian_lab.residual import (
    BlockGSC,
    BlockJacobianStats,
    Pythagorean,
    block_gsc,
    block_jacobian_stats,
    pythagorean_decomposition,
)
from jacobian_lab.spectra import (
    SpectrumSummary,
    prefix_singular_values,
    singular_values,
    spectral_density,
    spectrum_summary,
)
from jacobian_lab.zoo import architecture, paper_architectures

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "INITIALIZERS",
    "BlockGSC",
    "BlockJacobianStats",
    "DomainStats",
    "GrowthRate",
    "LayerJacobians",
    "MeanField",
    "Network",
    "PairJacobians",
    "PathGradients",
    "Pythagorean",
    "SpectrumSummary",
    "architecture",
    "block_gsc",
    "block_jacobian_stats",
    "critical_sigma_w",
    "domain_statistics",
    "get_activation",
    "fuss_catalan_density",
    "fuss_catalan_moments",
    "gradient_scale",
    "growth_rate",
    "gsc",
    "gsc_growth_rate",
    "gsc_matrix",
    "gsc_over_seeds",
    "input_output_jacobian",
    "input_to_layer_jacobians",
    "jacobian",
    "jacobian_moments",
    "jacobian_spectral_density",
    "layer_jacobians",
    "layer_to_layer_jacobians",
    "marchenko_pastur_density",
    "mean_field",
    "mlp",
    "paper_architectures",
    "path_gradients",
    "prefix_singular_values",
    "pythagorean_decomposition",
    "qm_norm",
    "resmlp",
    "singular_values",
    "spectral_density",
    "spectrum_summary",
    "weight_matrix",
]
