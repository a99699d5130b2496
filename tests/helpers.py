"""Helpers shared by the tests."""

import contextlib
import logging

import jax


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


@contextlib.contextmanager
def compiled_programs():
    """Collect the names of the programs XLA compiles inside the block (from JAX's
    ``log_compiles`` messages): ``with compiled_programs() as names: ...``."""
    names: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("Compiling "):
                names.append(msg.split(" ")[1])

    handler = Collect()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield names
    finally:
        logger.removeHandler(handler)
