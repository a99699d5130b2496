"""Tidy tables of results: one row per quantity, sample and layer, keyed by layer name.

:func:`to_records` turns the result of any per-layer or per-block diagnostic (an array
like :func:`~jacobian_lab.gsc`'s, or a result type like
:class:`~jacobian_lab.DomainStats`, :class:`~jacobian_lab.Pythagorean`,
:class:`~jacobian_lab.BlockGSC`, :class:`~jacobian_lab.TokenStats`,
:class:`~jacobian_lab.Dilution`, :class:`~jacobian_lab.Estimate`) into long-format
rows; :func:`to_frame` makes them a ``pandas.DataFrame`` (the optional ``pandas`` extra),
ready for ``pivot`` or ``groupby``.

Which axis is the layer axis is read from the sizes: a last axis of ``L + 1`` entries is
every layer output ``f_0 .. f_L`` (``f_L`` the input, named ``"input"``), ``L`` entries the
layers, the number of residual blocks the blocks (``model.block_outputs``); the axes before
it are samples (``sample``) and, for a seed sweep, seeds (``seed``). An ``(..., L+1,
L+1)`` array is the all-pairs GSC (:func:`~jacobian_lab.gsc_matrix`): its rows carry
``k`` and ``l``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jacobian_lab.model import Model


def _labels(model: Model, n: int, what: str) -> tuple[list, list]:
    """``(names, l)`` for a layer axis of length ``n``, in the GSC paper's order."""
    L = model.num_layers
    if n == L + 1:
        return [model.names[L - 1 - l] for l in range(L)] + ["input"], list(range(L + 1))
    if n == L:
        return [model.names[L - 1 - l] for l in range(L)], list(range(L))
    blocks = list(model.block_outputs)
    if blocks and n == len(blocks):
        return [model.names[L - 1 - l] for l in blocks], blocks
    raise ValueError(
        f"to_records: {what} has a last axis of {n}, which is neither the model's {L + 1} "
        f"layer outputs, its {L} layers nor its {len(blocks)} residual blocks; pass the "
        "model the result was measured on"
    )


def _fields(result: Any) -> list[tuple[str, Any]]:
    if hasattr(result, "_asdict"):
        items = list(result._asdict().items())
    else:
        items = [("value", result)]
    out = []
    for name, v in items:
        if v is None or isinstance(v, str | int | float | bool):
            continue  # absent fields and scalars (a sample count, a method name)
        if hasattr(v, "_asdict"):  # an Estimate inside a result
            out += [(f"{name}.{k}", w) for k, w in _fields(v)]
        else:
            out.append((name, v))
    return out


def to_records(result: Any, model: Model, *, quantity: str | None = None) -> list[dict]:
    """Long-format rows of a diagnostic's result (see the module docstring).

    Args:
        result: an array or a result type (a ``NamedTuple`` of arrays) from a diagnostic
            of ``model``.
        model: the model it was measured on (its layer names and blocks).
        quantity: the name of a bare array's quantity (default ``"value"``).

    Returns:
        One dict per entry: ``quantity`` (the field), ``layer`` (name), ``l`` (GSC-paper
        index: 0 the output), ``k`` for the all-pairs matrix, ``seed`` and ``sample`` where
        the result has those axes, and ``value`` (a float; NaN kept).

    Raises:
        ValueError: a field whose last axis matches no layer axis of ``model``.
    """
    rows = []
    L = model.num_layers
    for name, value in _fields(result):
        if quantity is not None and name == "value":
            name = quantity
        a = np.asarray(value, np.float64)
        if a.ndim == 0:
            continue
        pairs = a.ndim >= 2 and a.shape[-2:] == (L + 1, L + 1)
        layer_axes = 2 if pairs else 1
        names, ls = _labels(model, a.shape[-1], name)
        lead = a.shape[: a.ndim - layer_axes]
        if len(lead) > 2:
            raise ValueError(
                f"to_records: {name} has shape {a.shape}: at most a seed and a sample axis "
                "before the layer axis"
            )
        keys = ("seed", "sample")[-len(lead) :] if lead else ()
        flat = a.reshape(-1, *a.shape[len(lead) :])
        for i, block in enumerate(flat):
            where = dict(zip(keys, np.unravel_index(i, lead), strict=True)) if lead else {}
            where = {k: int(v) for k, v in where.items()}
            if pairs:
                for k in range(L + 1):
                    for j in range(L + 1):
                        rows.append(
                            {"quantity": name, "layer": names[j], "l": ls[j], "k": k, **where}
                            | {"value": float(block[k, j])}
                        )
            else:
                for j, v in enumerate(block):
                    rows.append(
                        {"quantity": name, "layer": names[j], "l": ls[j], **where}
                        | {"value": float(v)}
                    )
    return rows


def to_frame(result: Any, model: Model, *, quantity: str | None = None):
    """:func:`to_records` as a ``pandas.DataFrame`` (``pip install pandas``: the optional
    ``pandas`` extra)."""
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("to_frame needs pandas: pip install pandas (or use to_records)") from e
    return pd.DataFrame(to_records(result, model, quantity=quantity))
