"""The residual trick: dilution of every layer and block, and the add node's split of the
backpropagated gradient.

    python analyses/residual_trick.py [--size tiny|small|paper]

A thin script over :mod:`jacobian_lab.experiments.residual_trick`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.report import script_main
from jacobian_lab.experiments.residual_trick import ANALYSIS

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
