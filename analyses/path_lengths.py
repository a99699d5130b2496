"""Gradient carried by paths of each length through residual networks.

    python analyses/path_lengths.py [--size tiny|small|paper] [--depths 54]

A thin script over :mod:`jacobian_lab.experiments.path_lengths`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.path_lengths import ANALYSIS
from jacobian_lab.experiments.report import script_main

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
