"""Transformers at initialization: rank collapse, skips and normalization.

    python analyses/transformers.py [--size tiny|small|paper] [--widths ...] [--depths ...]

A thin script over :mod:`jacobian_lab.experiments.transformers`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.report import script_main
from jacobian_lab.experiments.transformers import ANALYSIS

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
