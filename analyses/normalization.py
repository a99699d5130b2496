"""Where the normalization goes: layer order, and skip connection x normalization.

    python analyses/normalization.py [--size tiny|small|paper] [--depths 50] [--out ...]

A thin script over :mod:`jacobian_lab.experiments.normalization`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.normalization import ANALYSIS
from jacobian_lab.experiments.report import script_main

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
