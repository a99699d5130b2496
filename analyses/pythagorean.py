"""Pythagorean decomposition of residual blocks across widths and depths.

    python analyses/pythagorean.py [--size tiny|small|paper] [--widths ...] [--depths ...]

A thin script over :mod:`jacobian_lab.experiments.pythagorean`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.pythagorean import ANALYSIS
from jacobian_lab.experiments.report import script_main

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
