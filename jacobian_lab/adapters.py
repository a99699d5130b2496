"""Library objects as pure layers: ``(apply(p, h), params, ident)`` for plain JAX pairs,
Equinox modules and Flax (linen or NNX) modules.

Each adapter looks its library up in ``sys.modules``, so jacobian_lab imports neither
Flax nor Equinox. ``ident`` describes the function a layer computes apart from its
params (its class, static fields and param shapes): two consecutive layers with equal
idents compute the same function of their params, so :func:`~jacobian_lab.chain` can
stack them into one repeated stage.

**Batch statistics** (see :mod:`jacobian_lab.chain`): :func:`batch_coupling` finds a
batch normalization with the statistics of the batch it is given; :func:`as_layer` with
``Mode(batch=True)`` then builds every layer to take the whole batch ``(B, ...)``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Ident = tuple


class Adapted(NamedTuple):
    """One layer read from a library object.

    Fields:
        apply: ``(p, h) -> h'`` on one sample (a whole batch for a batch-coupled chain).
        params: its params pytree, ``None`` for a parameter-free layer.
        ident: what the function is apart from its params (see the module docstring);
            ``None`` when unknown (the layer is never stacked with another).
    """

    apply: Any
    params: Any
    ident: Ident | None


class Mode(NamedTuple):
    """How :func:`as_layer` builds a layer.

    Fields:
        batch: one sample is a whole batch ``(B, ...)`` (a batch-coupled chain); Equinox
            modules are vmapped over its leading axis.
        state: the ``equinox.nn.State`` of the Equinox model (from
            ``eqx.nn.make_with_state``), for stateful Equinox layers such as ``BatchNorm``.
        axis_name: the name of that vmapped axis (the Equinox BatchNorms' ``axis_name``).
    """

    batch: bool = False
    state: Any = None
    axis_name: Any = None


PER_EXAMPLE = Mode()


class Coupling(NamedTuple):
    """What :func:`batch_coupling` found in one layer.

    Fields:
        coupled: ``True``: a batch normalization with batch statistics; ``False``: none;
            ``None``: the layer holds batch statistics whose mode cannot be read without
            running it (a BatchNorm defined inside a ``@nn.compact`` method, or
            ``use_running_average`` given only at call time).
        what: the batch normalization found (for messages).
        axis_names: the ``axis_name`` of each Equinox BatchNorm in training mode.
    """

    coupled: bool | None
    what: str = ""
    axis_names: tuple = ()


def _array_shapes(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (
        treedef,
        tuple(
            (np.shape(v), np.dtype(v.dtype if hasattr(v, "dtype") else np.result_type(v)).str)
            for v in leaves
        ),
    )


def same_ident(a: Ident | None, b: Ident | None) -> bool:
    """Whether two idents describe the same function (arrays compared by value)."""
    return a is not None and b is not None and _equal(a, b)


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


# -- batch statistics --------------------------------------------------------------------


def batch_coupling(layer) -> Coupling:
    """Whether one layer (not a container of :func:`children`) normalizes with batch
    statistics; see :class:`Coupling`. Reads the modules' settings, runs nothing."""
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(layer, eqx.Module):
        bns = [m for m in _eqx_batch_norms(eqx, layer) if not m.inference]
        if not bns:
            return Coupling(False)
        return Coupling(
            True, "an equinox.nn.BatchNorm with inference=False", tuple(m.axis_name for m in bns)
        )
    linen = sys.modules.get("flax.linen")
    if linen is not None and isinstance(layer, linen.Module):
        return _linen_coupling(linen, layer) if layer.scope is not None else Coupling(False)
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(layer, nnx.Module):
        modes = [
            m.use_running_average
            for _, m in nnx.iter_modules(layer)
            if isinstance(m, nnx.BatchNorm)
        ]
        what = "a flax.nnx.BatchNorm"
        if any(m is False for m in modes):
            return Coupling(True, f"{what} in training mode (use_running_average=False)")
        if any(m is None for m in modes):
            return Coupling(None, f"{what} with use_running_average=None")
    return Coupling(False)


def _eqx_batch_norms(eqx, layer) -> list:
    is_bn = lambda x: isinstance(x, eqx.nn.BatchNorm)  # noqa: E731
    return [m for m in jax.tree_util.tree_leaves(layer, is_leaf=is_bn) if is_bn(m)]


def _linen_coupling(linen, module) -> Coupling:
    """Batch norms of a bound linen module: the module itself, its ``setup`` submodules
    and its submodule fields, recursively. Batch statistics held by a submodule that cannot
    be reached this way (defined inside ``@nn.compact``) leave the answer open."""
    stats = module.variables.get("batch_stats", {})
    if not jax.tree_util.tree_leaves(stats):
        return Coupling(False)
    found, seen = [], set()

    def visit(m):
        if id(m) in seen or m.scope is None:
            return
        seen.add(id(m))
        if isinstance(m, linen.BatchNorm):
            found.append(m)
            return
        try:
            m._try_setup()  # builds the submodules that setup() defines
        except Exception:  # noqa: BLE001 - then only its fields are read
            pass
        is_mod = lambda x: isinstance(x, linen.Module)  # noqa: E731
        for name, value in vars(m).items():
            if name.startswith("_") or name in ("scope", "parent", "name"):
                continue
            for leaf in jax.tree_util.tree_leaves(value, is_leaf=is_mod):
                if is_mod(leaf):
                    visit(leaf)

    visit(module)
    root = len(module.path)
    owned = [tuple(m.path[root:]) for m in found]
    paths = [
        tuple(getattr(k, "key", k) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(stats)[0]
    ]
    explained = all(any(p[: len(o)] == o for o in owned) for p in paths)
    what = "a flax.linen.BatchNorm"
    if any(m.use_running_average is False for m in found):
        return Coupling(True, f"{what} with use_running_average=False")
    if not explained or any(m.use_running_average is None for m in found):
        return Coupling(
            None,
            f"{what} (or another module with batch_stats) whose use_running_average is set "
            "inside @nn.compact or at call time",
        )
    return Coupling(False)


# -- layers -------------------------------------------------------------------------------


def as_layer(layer, mode: Mode = PER_EXAMPLE) -> Adapted:
    """Read one layer (not a container); see :func:`jacobian_lab.chain` for the kinds.

    ``mode`` says whether the layer takes one example or a whole batch, and carries the
    Equinox state (:class:`Mode`).
    """
    if is_pair(layer):
        apply, params = layer
        return Adapted(apply, params, ("pair", apply, _array_shapes(params)))
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(layer, eqx.Module):
        return _eqx_layer(eqx, layer, mode)
    linen = sys.modules.get("flax.linen")
    if linen is not None and isinstance(layer, linen.Module):
        return _linen_layer(layer, mode)
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(layer, nnx.Module):
        return _nnx_layer(nnx, layer, mode)
    if callable(layer):
        return Adapted(lambda p, h: layer(h), None, ("fn", layer))
    raise TypeError(
        f"chain() cannot read a layer of type {type(layer).__name__}: give a callable "
        "h -> h', a pair (apply, params) with apply(params, h) -> h', an Equinox module, a "
        "bound Flax linen module, a Flax NNX module, a container of these, a "
        "jacobian_lab.Residual or a jacobian_lab.repeat"
    )


_STATE_SLOT = object()  # stands for a StateIndex whose values do not change the output


def _eqx_layer(eqx, layer, mode: Mode) -> Adapted:
    is_index = lambda x: isinstance(x, eqx.nn.StateIndex)  # noqa: E731
    params, static = eqx.partition(layer, eqx.is_inexact_array, is_leaf=is_index)
    indices = [x for x in jax.tree_util.tree_leaves(layer, is_leaf=is_index) if is_index(x)]
    call = _eqx_call(eqx, layer, mode) if indices else (lambda m, x: m(x))
    if mode.batch:
        per_example = call

        def call(m, x):
            return jax.vmap(lambda v: per_example(m, v), axis_name=mode.axis_name)(x)

    has_params = bool(jax.tree_util.tree_leaves(params))
    if not (has_params or indices or mode.batch):
        return Adapted(lambda p, h: layer(h), None, ("eqx-fn", layer))
    # A batch-statistics BatchNorm's output does not read its running statistics: its
    # state slots are left out of the ident, so identical layers still stack.
    free = {
        id(i)
        for m in _eqx_batch_norms(eqx, layer)
        if m.mode == "batch" and not m.inference
        for i in (m.batch_counter, m.batch_state_index)
    }
    described = jax.tree_util.tree_map(
        lambda x: _STATE_SLOT if is_index(x) and id(x) in free else x, static, is_leaf=is_index
    )
    s_leaves, s_def = jax.tree_util.tree_flatten(described)
    if not has_params:
        return Adapted(lambda p, h: call(layer, h), None, ("eqx-fn", s_def, tuple(s_leaves)))
    ident = ("eqx", s_def, tuple(s_leaves), _array_shapes(params))
    return Adapted(lambda p, h: call(eqx.combine(p, static), h), params, ident)


def _eqx_call(eqx, layer, mode: Mode):
    """``(module, x) -> y`` on one example for a layer that holds state (``StateIndex``):
    called as ``module(x, state) -> (y, new_state)`` with a fresh copy of the state each
    time (a State is spent once used); ``new_state`` is thrown away."""
    if isinstance(layer, eqx.nn.StatefulLayer) and not layer.is_stateful():
        return lambda m, x: m(x)
    if mode.state is None:
        raise TypeError(
            f"the Equinox layer {type(layer).__name__} holds state (e.g. a BatchNorm), so "
            "chain() needs the model's state: build the model with "
            "`model, state = eqx.nn.make_with_state(Model)(...)` and pass "
            "jl.chain(model, state=state)"
        )
    leaves, treedef = jax.tree_util.tree_flatten(mode.state)

    def call(m, x):
        out = m(x, jax.tree_util.tree_unflatten(treedef, leaves))
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"the stateful Equinox layer {type(layer).__name__} returned "
                f"{type(out).__name__}; chain() calls a layer holding state as "
                "layer(x, state) -> (y, new_state), the Equinox convention"
            )
        return out[0]

    return call


def _linen_layer(layer, mode: Mode) -> Adapted:
    linen = sys.modules["flax.linen"]
    require_bound(layer)
    module, variables = layer.unbind()
    if not jax.tree_util.tree_leaves(variables):
        return Adapted(lambda p, h: module.apply({}, h), None, None)
    others = [c for c in variables if c != "params"]
    mutable = others if mode.batch and others else False
    name = type(module).__name__

    def run(p, h):
        try:
            out = module.apply(p, h, mutable=mutable)
        except sys.modules["flax"].errors.ModifyScopeVariableError as e:
            raise TypeError(
                f"the Flax linen module {name} updates its batch statistics (a BatchNorm "
                "with use_running_average=False) although chain() did not find it in "
                "training mode: pass jl.chain(..., batch_coupled=True) so that one sample "
                "is a whole batch"
            ) from e
        return out[0] if mutable else out

    ident = ("linen", type(module), _linen_config(module), _array_shapes(variables))
    if not jax.tree_util.tree_leaves(variables.get("params", {})) and others == ["batch_stats"]:
        # a BatchNorm without scale and bias: parameter-free, so that it joins the layer
        # before it like an activation. Its running statistics are constants of the
        # function unless it uses the batch's statistics.
        if not (isinstance(module, linen.BatchNorm) and module.use_running_average is False):
            ident = (*ident, tuple(jax.tree_util.tree_leaves(variables)))
        return Adapted(lambda p, h: run(variables, h), None, ident)
    return Adapted(run, variables, ident)


def _nnx_layer(nnx, layer, mode: Mode) -> Adapted:
    graphdef, state = nnx.split(layer)
    if not jax.tree_util.tree_leaves(state):
        return Adapted(lambda p, h: layer(h), None, None)
    name = type(layer).__name__

    def run(p, h):
        # a copy, so that its statistics update is dropped and the layer never changes
        m = nnx.merge(graphdef, _nnx_widen_stats(nnx, p, h), copy=True)
        before = jax.tree_util.tree_leaves(nnx.state(m, nnx.BatchStat))
        out = m(h)
        after = jax.tree_util.tree_leaves(nnx.state(m, nnx.BatchStat))
        if not mode.batch and any(a is not b for a, b in zip(before, after, strict=True)):
            raise TypeError(
                f"the Flax NNX module {name} updated its batch statistics (a BatchNorm "
                "running with use_running_average=False) although chain() did not find "
                "it in training mode: pass jl.chain(..., batch_coupled=True) so that one "
                "sample is a whole batch"
            )
        return out

    ident = ("nnx", graphdef, _array_shapes(state))
    params, rest = nnx.split_state(state, nnx.Param, ...)
    stats, others = nnx.split_state(rest, nnx.BatchStat, ...)
    if not jax.tree_util.tree_leaves(params) and not jax.tree_util.tree_leaves(others):
        # a BatchNorm without scale and bias: parameter-free (see _linen_layer)
        if not (isinstance(layer, nnx.BatchNorm) and layer.use_running_average is False):
            ident = (*ident, tuple(jax.tree_util.tree_leaves(state)))
        return Adapted(lambda p, h: run(state, h), None, ident)
    return Adapted(run, state, ident)


def _nnx_widen_stats(nnx, state, h):
    """Cast the batch statistics to the dtype of their sum with the input, so that
    writing their update (computed in the input's dtype; NNX keeps them in float32
    whatever the params' dtype) is a safe cast. A widening cast is exact, and NNX computes
    in the dtype promoted from the input and the statistics anyway."""
    dtypes = [v.dtype for v in jax.tree_util.tree_leaves(h) if jnp.issubdtype(v.dtype, jnp.inexact)]
    if not dtypes:
        return state
    stats, others = nnx.split_state(state, nnx.BatchStat, ...)
    stats = jax.tree_util.tree_map(lambda a: a.astype(jnp.result_type(a, *dtypes)), stats)
    return nnx.merge_state(stats, others)
