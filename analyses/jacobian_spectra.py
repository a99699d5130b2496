"""Singular value spectra of the input-output Jacobian across depth.

    python analyses/jacobian_spectra.py [--size tiny|small|paper] [--depths 1 4 16 64]

A thin script over :mod:`jacobian_lab.experiments.jacobian_spectra`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.jacobian_spectra import ANALYSIS
from jacobian_lab.experiments.report import script_main

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
