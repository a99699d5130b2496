"""Norm preservation of residual blocks as more blocks are stacked.

    python analyses/norm_preservation.py [--size tiny|small|paper] [--depths 4 16 64]

A thin script over :mod:`jacobian_lab.experiments.norm_preservation`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.norm_preservation import ANALYSIS
from jacobian_lab.experiments.report import script_main

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
