"""Collapsing domain: exploding gradients traded against representations that become alike.

    python analyses/collapsing_domain.py [--size tiny|small|paper] [--depths 50]

A thin script over :mod:`jacobian_lab.experiments.collapsing_domain`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.collapsing_domain import ANALYSIS
from jacobian_lab.experiments.report import script_main

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
