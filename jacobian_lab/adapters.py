"""Library objects as pure layers: ``(apply(p, h), params, ident)`` for plain JAX pairs,
Equinox modules and Flax (linen or NNX) modules.

Each adapter looks its library up in ``sys.modules``, so jacobian_lab imports neither
Flax nor Equinox. ``ident`` describes the function a layer computes apart from its
params (its class, static fields and param shapes): two consecutive layers with equal
idents compute the same function of their params, so :func:`~jacobian_lab.chain` can
stack them into one repeated stage.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, NamedTuple

import jax
import numpy as np

Ident = tuple


class Adapted(NamedTuple):
    """One layer read from a library object.

    Fields:
        apply: ``(p, h) -> h'`` on one sample.
        params: its params pytree, ``None`` for a parameter-free layer.
        ident: what the function is apart from its params (see the module docstring);
            ``None`` when unknown (the layer is never stacked with another).
    """

    apply: Any
    params: Any
    ident: Ident | None


def _array_shapes(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((np.shape(v), np.result_type(v).str) for v in leaves))


def same_ident(a: Ident | None, b: Ident | None) -> bool:
    """Whether two idents describe the same function (arrays compared by value)."""
    if a is None or b is None:
        return False
    return _equal(a, b)


def _equal(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "shape") or hasattr(b, "shape"):
        return (
            hasattr(a, "shape")
            and hasattr(b, "shape")
            and np.shape(a) == np.shape(b)
            and bool(np.all(np.asarray(a) == np.asarray(b)))
        )
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a truth value
        return False


def is_pair(layer) -> bool:
    """Whether ``layer`` is an ``(apply, params)`` pair."""
    return (
        isinstance(layer, tuple)
        and len(layer) == 2
        and callable(layer[0])
        and not (callable(layer[1]) or is_library_module(layer[1]))
    )


def is_library_module(obj) -> bool:
    """Whether ``obj`` is an Equinox, Flax linen or Flax NNX module."""
    return any(
        (mod := sys.modules.get(name)) is not None and isinstance(obj, getattr(mod, attr))
        for name, attr in (("equinox", "Module"), ("flax.linen", "Module"), ("flax.nnx", "Module"))
    )


def children(layer) -> list | None:
    """The layers inside a container (a list, ``eqx.nn.Sequential``, ``eqx.nn.MLP``, a
    bound ``flax.linen.Sequential``, ``flax.nnx.Sequential``), or ``None``."""
    if isinstance(layer, list | tuple) and not is_pair(layer):
        return list(layer)
    eqx = sys.modules.get("equinox")
    if eqx is not None:
        if isinstance(layer, eqx.nn.Sequential):
            return list(layer.layers)
        if isinstance(layer, eqx.nn.MLP):
            act, final = layer.activation, layer.final_activation
            acts = [act] * (len(layer.layers) - 1) + [final]
            return [x for lin, a in zip(layer.layers, acts, strict=True) for x in (lin, a)]
    linen = sys.modules.get("flax.linen")
    if linen is not None and isinstance(layer, linen.Sequential):
        require_bound(layer)
        return list(layer.layers)
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(layer, nnx.Sequential):
        return list(layer.layers)
    return None


def require_bound(module) -> None:
    """Raise ``TypeError`` unless a Flax linen module is bound to its variables."""
    if module.scope is None:
        raise TypeError(
            f"the Flax linen module {type(module).__name__} is not bound to its variables: "
            "pass model.bind(variables) (or a submodule of a bound model) to chain()"
        )


def _linen_config(module) -> tuple:
    return tuple(
        (f.name, getattr(module, f.name))
        for f in dataclasses.fields(module)
        if f.name not in ("parent", "name")
    )


def as_layer(layer) -> Adapted:
    """Read one layer (not a container); see :func:`jacobian_lab.chain` for the kinds."""
    if is_pair(layer):
        apply, params = layer
        return Adapted(apply, params, ("pair", apply, _array_shapes(params)))
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(layer, eqx.Module):
        params, static = eqx.partition(layer, eqx.is_inexact_array)
        if not jax.tree_util.tree_leaves(params):
            return Adapted(lambda p, h: layer(h), None, ("eqx-fn", layer))
        s_leaves, s_def = jax.tree_util.tree_flatten(static)
        ident = ("eqx", s_def, tuple(s_leaves), _array_shapes(params))
        return Adapted(lambda p, h: eqx.combine(p, static)(h), params, ident)
    linen = sys.modules.get("flax.linen")
    if linen is not None and isinstance(layer, linen.Module):
        require_bound(layer)
        module, variables = layer.unbind()
        if not jax.tree_util.tree_leaves(variables):
            return Adapted(lambda p, h: module.apply({}, h), None, None)
        ident = ("linen", type(module), _linen_config(module), _array_shapes(variables))
        return Adapted(lambda p, h: module.apply(p, h), variables, ident)
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(layer, nnx.Module):
        graphdef, state = nnx.split(layer)
        if not jax.tree_util.tree_leaves(state):
            return Adapted(lambda p, h: layer(h), None, None)
        ident = ("nnx", graphdef, _array_shapes(state))
        return Adapted(lambda p, h: nnx.merge(graphdef, p)(h), state, ident)
    if callable(layer):
        return Adapted(lambda p, h: layer(h), None, ("fn", layer))
    raise TypeError(
        f"chain() cannot read a layer of type {type(layer).__name__}: give a callable "
        "h -> h', a pair (apply, params) with apply(params, h) -> h', an Equinox module, a "
        "bound Flax linen module, a Flax NNX module, a container of these, a "
        "jacobian_lab.Residual or a jacobian_lab.repeat"
    )
