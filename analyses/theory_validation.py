"""Theory beside measurement: a validation table of mean-field and free-probability
predictions against measured Jacobians, over activations, weights, depths and widths.

    python analyses/theory_validation.py [--size tiny|small|paper] [--widths 64 256]

A thin script over :mod:`jacobian_lab.experiments.theory_validation`,
which ``jacobian-lab report`` runs with the others.
"""

from jacobian_lab.experiments.report import script_main
from jacobian_lab.experiments.theory_validation import ANALYSIS

if __name__ == "__main__":
    raise SystemExit(script_main(ANALYSIS))
