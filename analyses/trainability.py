"""Trainability: GSC at initialization against the training loss, on real data.

    python analyses/trainability.py [--size tiny|small|paper] [--depths ...] [--data FILE.npz]

A thin script over :mod:`jacobian_lab.experiments.trainability`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.report import script_main
from jacobian_lab.experiments.trainability import ANALYSIS

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
