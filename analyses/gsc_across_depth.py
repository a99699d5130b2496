"""GSC across depth for every architecture family of the GSC paper.

    python analyses/gsc_across_depth.py [--size tiny|small|paper] [--depths 50] [--out ...]

A thin script over :mod:`jacobian_lab.experiments.gsc_across_depth`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.gsc_across_depth import ANALYSIS
from jacobian_lab.experiments.report import script_main

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
