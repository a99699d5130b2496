"""jacobian_lab: Jacobians, spectra, gradient scale coefficients and residual-block
diagnostics of randomly initialized deep networks, in JAX.

Conventions used throughout (see each function's docstring):
layers are indexed as in the GSC paper (arXiv 1712.05577), ``f_0`` = output,
``f_L = x`` = input; ``J_k^l = d f_l / d f_k`` for ``k >= l``.

Axis letters in the docstrings: ``S`` samples (inputs, or batches for batch-coupled
models), ``B`` inputs in a batch, ``L`` layer outputs (``L + 1`` with the input), ``d``
the flat size of a layer's value, ``P`` probes, ``n`` layers of a repeated stage.

Every model is one representation (:mod:`jacobian_lab.model`): stages (a layer, a
residual block, a repeated stage under ``lax.scan``) that one forward driver
(:mod:`jacobian_lab.driver`) walks for every diagnostic. Modules by level: helpers
(``checks``) -> activations, initializers -> models (``model``, ``networks``,
``convnets``, ``chain``, ``adapters``, ``zoo``) -> driver, Jacobians, matrix-free ->
diagnostics -> theory (``meanfield``, ``random_matrix``; imports activations only) ->
figures (``plot``, over the result types) -> ``experiments`` (public API only).

``jacobian_lab.plot`` (paper-ready figures of the result types) is loaded on first use,
``jl.plot`` or ``import jacobian_lab.plot``, so that ``import jacobian_lab`` does not
import matplotlib.
"""

from jacobian_lab.activations import ACTIVATIONS, get_activation
from jacobian_lab.chain import Chain, Residual, chain, repeat
from jacobian_lab.compilation_cache import enable_compilation_cache
from jacobian_lab.convnets import CONV_INITIALIZERS, ConvNetwork, convnet, resconvnet
from jacobian_lab.datasets import Dataset, digits, gaussian_data, load_npz
from jacobian_lab.dilution import AddNodeSplit, Dilution, add_node_split, dilution
from jacobian_lab.domain import DomainStats, DomainWarning, domain_statistics
from jacobian_lab.gsc import (
    AutoMethodWarning,
    GrowthRate,
    gradient_norm,
    gradient_scale,
    growth_rate,
    gsc,
    gsc_estimate,
    gsc_matrix,
    gsc_over_seeds,
    layer_gsc,
    qm_norm,
)
from jacobian_lab.initializers import INITIALIZERS, weight_matrix
from jacobian_lab.inspection import (
    REMEDIES,
    THRESHOLDS,
    Finding,
    Inspection,
    Remedied,
    Remedy,
    inspect,
    summary_metrics,
)
from jacobian_lab.jacobians import jacobian
from jacobian_lab.layered import (
    LayerJacobians,
    PairJacobians,
    input_output_jacobian,
    input_to_layer_jacobians,
    layer_jacobians,
    layer_outputs,
    layer_to_layer_jacobians,
)
from jacobian_lab.matrix_free import (
    SLQ,
    Estimate,
    ExtremeSingularValues,
    Operator,
    extreme_singular_values,
    frobenius_norm_sq,
    jacobian_operator,
    slq_spectrum,
)
from jacobian_lab.meanfield import (
    BatchNormMeanField,
    MeanField,
    batchnorm_mean_field,
    critical_sigma_w,
    gsc_growth_rate,
    mean_field,
)
from jacobian_lab.model import Block, Layer, Model, Repeat
from jacobian_lab.networks import Network, mlp, resmlp
from jacobian_lab.paths import PathGradients, path_gradients
from jacobian_lab.random_matrix import (
    fuss_catalan_density,
    fuss_catalan_moments,
    jacobian_moments,
    jacobian_spectral_density,
    marchenko_pastur_density,
)
from jacobian_lab.reading import ReadError, tap
from jacobian_lab.residual import (
    BlockGSC,
    BlockJacobianStats,
    PostBlockWarning,
    Pythagorean,
    block_gsc,
    block_jacobian_stats,
    pythagorean_decomposition,
)
from jacobian_lab.sharding import device_mesh, map_over_devices
from jacobian_lab.spectra import (
    Spectrum,
    SpectrumSummary,
    jacobian_spectrum,
    prefix_singular_values,
    singular_values,
    spectral_density,
    spectrum_summary,
)
from jacobian_lab.tables import to_frame, to_records
from jacobian_lab.tokens import (
    TokenStats,
    TokenWarning,
    attention_entropy,
    attention_weights,
    rank_collapse_residual,
    token_cosine,
    token_statistics,
)
from jacobian_lab.training import (
    History,
    linearized_outputs,
    logits,
    norm_per_layer,
    train,
    train_runs,
)
from jacobian_lab.transformer import Transformer, transformer
from jacobian_lab.zoo import architecture, paper_architectures

__version__ = "0.1.0"


def __getattr__(name: str):
    # PEP 562: the figures load matplotlib, so they are imported when first asked for
    if name == "plot":
        import importlib

        return importlib.import_module("jacobian_lab.plot")
    raise AttributeError(f"module 'jacobian_lab' has no attribute {name!r}")


__all__ = [
    "ACTIVATIONS",
    "AddNodeSplit",
    "AutoMethodWarning",
    "BatchNormMeanField",
    "Block",
    "BlockGSC",
    "BlockJacobianStats",
    "CONV_INITIALIZERS",
    "Chain",
    "ConvNetwork",
    "Dataset",
    "Dilution",
    "DomainStats",
    "DomainWarning",
    "Estimate",
    "ExtremeSingularValues",
    "Finding",
    "GrowthRate",
    "History",
    "INITIALIZERS",
    "Inspection",
    "Layer",
    "LayerJacobians",
    "MeanField",
    "Model",
    "Network",
    "Operator",
    "PairJacobians",
    "PathGradients",
    "PostBlockWarning",
    "Pythagorean",
    "REMEDIES",
    "ReadError",
    "Remedied",
    "Remedy",
    "Repeat",
    "Residual",
    "SLQ",
    "Spectrum",
    "SpectrumSummary",
    "THRESHOLDS",
    "TokenStats",
    "TokenWarning",
    "Transformer",
    "add_node_split",
    "architecture",
    "attention_entropy",
    "attention_weights",
    "batchnorm_mean_field",
    "block_gsc",
    "block_jacobian_stats",
    "chain",
    "convnet",
    "critical_sigma_w",
    "device_mesh",
    "digits",
    "dilution",
    "domain_statistics",
    "enable_compilation_cache",
    "extreme_singular_values",
    "frobenius_norm_sq",
    "fuss_catalan_density",
    "fuss_catalan_moments",
    "gaussian_data",
    "get_activation",
    "gradient_norm",
    "gradient_scale",
    "growth_rate",
    "gsc",
    "gsc_estimate",
    "gsc_growth_rate",
    "gsc_matrix",
    "gsc_over_seeds",
    "input_output_jacobian",
    "input_to_layer_jacobians",
    "inspect",
    "layer_gsc",
    "jacobian",
    "jacobian_moments",
    "jacobian_operator",
    "jacobian_spectral_density",
    "jacobian_spectrum",
    "layer_jacobians",
    "layer_outputs",
    "layer_to_layer_jacobians",
    "linearized_outputs",
    "load_npz",
    "logits",
    "map_over_devices",
    "marchenko_pastur_density",
    "mean_field",
    "mlp",
    "norm_per_layer",
    "paper_architectures",
    "path_gradients",
    "prefix_singular_values",
    "pythagorean_decomposition",
    "qm_norm",
    "rank_collapse_residual",
    "repeat",
    "resconvnet",
    "resmlp",
    "singular_values",
    "slq_spectrum",
    "spectral_density",
    "spectrum_summary",
    "summary_metrics",
    "tap",
    "to_frame",
    "to_records",
    "token_cosine",
    "token_statistics",
    "train",
    "train_runs",
    "transformer",
    "weight_matrix",
]
