"""Helpers shared by the tests."""


def count_eqns(jaxpr) -> int:
    """Equations in a jaxpr, including those of nested jaxprs (jit, scan bodies)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += count_eqns(inner)
    return total
