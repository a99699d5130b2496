"""The analyses behind ``jacobian-lab report``, by name, in report order. Each is also a
script (``python analyses/<name>.py --help``) and defines one
:class:`jacobian_lab.experiments.report.Analysis` as ``ANALYSIS``."""

from jacobian_lab.experiments import (
    collapsing_domain,
    gsc_across_depth,
    jacobian_spectra,
    norm_preservation,
    path_lengths,
    pythagorean,
    theory_validation,
)

ANALYSES = {
    m.ANALYSIS.name: m.ANALYSIS
    for m in (
        gsc_across_depth,
        pythagorean,
        norm_preservation,
        collapsing_domain,
        jacobian_spectra,
        path_lengths,
        theory_validation,
    )
}
