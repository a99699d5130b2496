"""The analyses behind ``jacobian-lab report``, by name, in report order. Each is also a
script (``python analyses/<name>.py --help``) and defines one
:class:`jacobian_lab.experiments.report.Analysis` as ``ANALYSIS``."""

from jacobian_lab.experiments import (
    collapsing_domain,
    gsc_across_depth,
    jacobian_spectra,
    norm_preservation,
    normalization,
    path_lengths,
    pythagorean,
    residual_trick,
    theory_validation,
    trainability,
    transformers,
    vanishing_gradients,
)

ANALYSES = {
    m.ANALYSIS.name: m.ANALYSIS
    for m in (
        gsc_across_depth,
        normalization,
        vanishing_gradients,
        pythagorean,
        residual_trick,
        norm_preservation,
        path_lengths,
        collapsing_domain,
        jacobian_spectra,
        theory_validation,
        trainability,
        transformers,
    )
}
