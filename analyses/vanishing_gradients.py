"""Vanishing gradients from saturating activations: raw gradient norm and GSC.

    python analyses/vanishing_gradients.py [--size tiny|small|paper] [--depths 50] [--out ...]

A thin script over :mod:`jacobian_lab.experiments.vanishing_gradients`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.report import script_main
from jacobian_lab.experiments.vanishing_gradients import ANALYSIS

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
