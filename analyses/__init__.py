"""The analyses behind ``jacobian-lab report``; each module is also a script
(``python analyses/<name>.py --help``) and defines one :class:`jacobian_lab.report.Analysis`
as ``ANALYSIS``."""

from analyses import (
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
