"""Bring your own model: a network given as a chain of layers.

A :class:`Chain` describes any layered JAX function: plain callables, Equinox modules and
Flax (linen or NNX) modules, possibly wrapped in :class:`Residual` blocks. Build one with
:func:`chain`, which returns the description and its params pytree; every function that
takes ``(net, params, x)`` (the GSC, the Jacobians, the block diagnostics) then takes
``(chain, params, x)`` the same way.

**Layers and indexing.** ``chain([g_1, ..., g_L])`` computes ``f_L = x`` and
``f_{L-i} = g_i(f_{L-i+1})``: GSC-paper indexing, ``f_0`` is the output of the last layer.
A layer's output may be any pytree of float arrays (a dict, a tuple, an image with a
channel axis). Each layer output is flattened to a vector by
:func:`jax.flatten_util.ravel_pytree`: leaves in ``jax.tree_util`` order (dict keys
sorted), each leaf in row-major order, so ``J_k^l = d f_l / d f_k`` is a
``(size f_l, size f_k)`` matrix in that ordering.

**Samples.** ``x`` is a pytree whose leaves all carry a leading sample axis ``S``; every
layer is applied to one sample at a time (no batch axis), so the Jacobians are per
sample, as for the built-in per-example networks. For Flax modules that expect a batch
axis, write the layer to take one sample (Flax's ``Dense`` and ``Conv`` accept one).

**Residual blocks.** ``Residual(branch, skip=None)`` is the block ``h -> skip(h) +
branch(h)`` (``skip=None`` is the identity). The block diagnostics
(:func:`~jacobian_lab.pythagorean_decomposition`, :func:`~jacobian_lab.block_gsc`,
:func:`~jacobian_lab.block_jacobian_stats`) look at the :class:`Residual` layers.

Unlike :class:`~jacobian_lab.Network`, whose identical layers are stacked and scanned, a
chain's layers may all differ, so they are traced one by one: compile time grows with the
number of layers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

Apply = Callable[[Any, Any], Any]


class Residual(NamedTuple):
    """A residual block ``h -> skip(h) + branch(h)``: mark a layer of :func:`chain`.

    Fields:
        branch: the residual branch ``r``, a layer in any form :func:`chain` accepts.
        skip: the skip connection (a layer, e.g. a projection), or ``None`` for the
            identity.
    """

    branch: Any
    skip: Any = None


@dataclass(frozen=True, eq=False)
class Chain:
    """Description of a chain of layers (build it with :func:`chain`).

    Fields:
        applies: per layer, from the input: ``apply(p, h) -> h'`` for a plain layer, or
            ``(branch_apply, skip_apply)`` for a residual one (``skip_apply`` is ``None``
            for the identity).
        names: one name per layer.
    """

    applies: tuple
    names: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        """L: number of layers; ``f_L = x`` and ``f_0`` is the output."""
        return len(self.applies)

    @property
    def residual_layers(self) -> tuple[int, ...]:
        """Indices (from the input, 0-based) of the :class:`Residual` layers."""
        return tuple(i for i, a in enumerate(self.applies) if isinstance(a, tuple))

    @property
    def block_outputs(self) -> tuple[int, ...]:
        """GSC-paper index ``l`` of each residual block's output ``f_l``, in the order the
        block diagnostics report blocks (nearest the output first)."""
        L = self.num_layers
        return tuple(sorted(L - 1 - i for i in self.residual_layers))

    def apply(self, params: Sequence[Any], x: Any) -> Any:
        """The chain on one sample ``x`` (no sample axis); returns ``f_0``."""
        return forward(self, params, x)[0]


def _apply_layer(a, p, h):
    """Output of one layer, with its skip and branch for a residual one."""
    if not isinstance(a, tuple):
        return a(p, h), None, None
    branch, skip = a
    r = branch(p["branch"], h)
    s = h if skip is None else skip(p["skip"], h)
    return jax.tree_util.tree_map(jnp.add, s, r), s, r


def chain(layers: Sequence[Any], names: Sequence[str] | None = None) -> tuple[Chain, tuple]:
    """Describe a layered model as a :class:`Chain` and collect its params.

    Args:
        layers: the layers, from the input to the output. Each is one of:

            * a callable ``h -> h'`` without parameters (e.g. ``jax.nn.relu``);
            * a pair ``(apply, params)`` with ``apply(params, h) -> h'``: a plain JAX
              function over explicit parameters;
            * an Equinox module, a *bound* Flax linen module (``model.bind(variables)``,
              or a submodule of one), or a Flax NNX module;
            * a container of layers: a list or tuple, ``equinox.nn.Sequential``,
              ``equinox.nn.MLP``, ``flax.linen.Sequential`` (bound) or
              ``flax.nnx.Sequential``. It is expanded into its layers, and a layer
              without parameters (an activation) joins the layer before it, so
              ``Linear, relu`` counts as one layer as in the GSC paper (give it as
              ``(apply, ())`` to keep it a layer of its own);
            * :class:`Residual` ``(branch, skip)`` of any of these.
        names: one name per layer after expansion (default ``"layer<i>"`` /
            ``"block<i>"``). These name the layers in error messages.

    Returns:
        ``(chain, params)``: the description and a tuple with one params pytree per
        layer (``{"branch": ..., "skip": ...}`` for a residual layer). Pass both to any
        function that takes ``(net, params, x)``.

    Raises:
        TypeError: a layer of a kind jacobian_lab cannot read, with what it accepts.
    """
    if not isinstance(layers, list | tuple):
        layers = [layers]
    stages = _expand(list(layers))
    if not stages:
        raise ValueError("chain() needs at least one layer; got an empty list")
    if names is None:
        names = [
            f"block{i}" if isinstance(s[0], tuple) else f"layer{i}" for i, s in enumerate(stages)
        ]
    names = tuple(str(n) for n in names)
    if len(names) != len(stages):
        raise ValueError(
            f"got {len(names)} names for {len(stages)} layers (after expanding containers "
            "and merging parameter-free layers into the layer before them)"
        )
    return Chain(tuple(s[0] for s in stages), names), tuple(s[1] for s in stages)


# -- turning library objects into (apply, params) ------------------------------------------


def _expand(layers: list) -> list:
    """``(apply, params)`` per layer, containers expanded, parameter-free layers merged."""
    out: list = []
    for layer in layers:
        if isinstance(layer, Residual):
            b_apply, b_params = _single(layer.branch, "the branch of a Residual")
            if layer.skip is None:
                s_apply, s_params = None, None
            else:
                s_apply, s_params = _single(layer.skip, "the skip of a Residual")
            out.append(((b_apply, s_apply), {"branch": b_params, "skip": s_params}))
            continue
        inner = _children(layer)
        if inner is not None:
            out.extend(_expand(inner))
            continue
        apply, params = _as_layer(layer)
        if params is None and out and not isinstance(out[-1][0], tuple):
            out[-1] = (_compose(out[-1][0], apply), out[-1][1])  # activation joins its layer
        else:
            out.append((apply, params))
    return out


def _single(layer, what: str):
    """One ``(apply, params)`` for a layer that may itself be a container."""
    inner = _expand([layer])
    if len(inner) == 1 and not isinstance(inner[0][0], tuple):
        return inner[0]
    applies, params = tuple(s[0] for s in inner), tuple(s[1] for s in inner)
    if any(isinstance(a, tuple) for a in applies):
        raise TypeError(f"{what} may not itself contain Residual blocks")
    return partial(_sequence, applies), params


def _sequence(applies, params, h):
    for a, p in zip(applies, params, strict=True):
        h = a(p, h)
    return h


def _compose(first: Apply, then: Apply) -> Apply:
    return lambda p, h: then(None, first(p, h))


def _children(layer) -> list | None:
    """The layers inside a container, or None for a single layer."""
    if isinstance(layer, list | tuple) and not _is_pair(layer):
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
        _require_bound(layer)
        return list(layer.layers)
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(layer, nnx.Sequential):
        return list(layer.layers)
    return None


def _is_pair(layer) -> bool:
    return (
        isinstance(layer, tuple)
        and len(layer) == 2
        and callable(layer[0])
        and not (callable(layer[1]) or _is_library_module(layer[1]))
    )


def _is_library_module(obj) -> bool:
    return any(
        (mod := sys.modules.get(name)) is not None and isinstance(obj, getattr(mod, attr))
        for name, attr in (("equinox", "Module"), ("flax.linen", "Module"), ("flax.nnx", "Module"))
    )


def _require_bound(module) -> None:
    if module.scope is None:
        raise TypeError(
            f"the Flax linen module {type(module).__name__} is not bound to its variables: "
            "pass model.bind(variables) (or a submodule of a bound model) to chain()"
        )


def _as_layer(layer) -> tuple[Apply, Any]:
    """``(apply(p, h), params)`` for one layer; params None for a parameter-free one."""
    if _is_pair(layer):
        return layer[0], layer[1]
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(layer, eqx.Module):
        params, static = eqx.partition(layer, eqx.is_inexact_array)
        if not jax.tree_util.tree_leaves(params):
            return (lambda p, h: layer(h)), None
        return (lambda p, h: eqx.combine(p, static)(h)), params
    linen = sys.modules.get("flax.linen")
    if linen is not None and isinstance(layer, linen.Module):
        _require_bound(layer)
        module, variables = layer.unbind()
        if not jax.tree_util.tree_leaves(variables):
            return (lambda p, h: module.apply({}, h)), None
        return (lambda p, h: module.apply(p, h)), variables
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(layer, nnx.Module):
        graphdef, state = nnx.split(layer)
        if not jax.tree_util.tree_leaves(state):
            return (lambda p, h: layer(h)), None
        return (lambda p, h: nnx.merge(graphdef, p)(h)), state
    if callable(layer):
        return (lambda p, h: layer(h)), None
    raise TypeError(
        f"chain() cannot read a layer of type {type(layer).__name__}: give a callable "
        "h -> h', a pair (apply, params) with apply(params, h) -> h', an Equinox module, a "
        "bound Flax linen module, a Flax NNX module, a container of these, or a Residual"
    )


# -- one forward pass with every layer's Jacobian ----------------------------------------


class ChainPass(NamedTuple):
    """Every layer's Jacobian and output for each sample, from the input upwards.

    Fields (tuples with one entry per layer ``i = 0 .. L-1``, from the input):
        units: ``(S, size out_i, size in_i)``; the Jacobian of layer ``i``.
        outputs: ``(S, size out_i)``; flattened layer outputs.
        inputs: ``(S, size x)``; the flattened input.
        skips, branches: for residual layers ``(S, size out_i)`` (skip output ``s`` and
            branch output ``r``), else None.
        skip_units, branch_units: for residual layers, the Jacobians of skip and branch
            (``units[i] = skip_units[i] + branch_units[i]``), else None.
    """

    units: tuple
    outputs: tuple
    inputs: jax.Array
    skips: tuple
    branches: tuple
    skip_units: tuple
    branch_units: tuple


def _flat_jacobian(fn, h):
    """``(J, fn(h))`` for ``fn`` from a flat vector to any pytree, with ``J`` of shape
    ``(size out, size h)``; forward or reverse mode, whichever needs fewer passes."""

    def with_value(v):
        out = fn(v)
        return ravel_pytree(out)[0], out

    out_size = jax.eval_shape(lambda v: with_value(v)[0], h).shape[0]
    jac = jax.jacfwd if h.shape[0] <= out_size else jax.jacrev
    return jac(with_value, has_aux=True)(h)


def _one_sample(chain: Chain, params, x):
    h, unravel = ravel_pytree(x)
    inputs = h
    _check_params(chain, params)
    units, outs, skips, branches, s_units, b_units = [], [], [], [], [], []
    for i, (a, p) in enumerate(zip(chain.applies, params, strict=True)):
        D, h_next, unravel_next, terms = _named(chain, i, unravel(h), _layer_pass, a, p, h, unravel)
        for acc, v in zip(
            (units, outs, skips, branches, s_units, b_units), (D, h_next, *terms), strict=True
        ):
            acc.append(v)
        h, unravel = h_next, unravel_next
    return ChainPass(
        tuple(units),
        tuple(outs),
        inputs,
        tuple(skips),
        tuple(branches),
        tuple(s_units),
        tuple(b_units),
    )


def _named(chain: Chain, i: int, h, fn, *args):
    """``fn(*args)`` for layer ``i`` at input ``h`` (a pytree), re-raising any error with the
    layer's index, name and the shape of the sample it got."""
    shapes = jax.tree_util.tree_map(jnp.shape, h)
    try:
        return fn(*args)
    except jax.errors.UnexpectedTracerError as e:
        raise _tracer_hint(e, i, chain.names[i]) from e
    except LayerOutputError as e:
        raise LayerOutputError(f"layer {i} ({chain.names[i]!r}) {e}") from None
    except Exception as e:
        raise ValueError(
            f"layer {i} ({chain.names[i]!r}) failed on a sample of shape {shapes} "
            f"(x without its leading sample axis): {type(e).__name__}: {e}\nEach layer "
            "is applied to one sample: check the input's shape against what that layer "
            "expects."
        ) from e


def _check_params(chain: Chain, params) -> None:
    if len(params) != chain.num_layers:
        raise ValueError(
            f"params has {len(params)} entries for a chain of {chain.num_layers} layers; "
            "pass the params that chain() returned with it"
        )


def forward(chain: Chain, params, x, eps=None) -> tuple[Any, list]:
    """The chain on one sample ``x`` with ``eps[i]`` (a pytree like layer ``i``'s output)
    added to layer ``i``'s output (``eps=None``: nothing added). Returns ``f_0`` and every
    layer's output in forward order; errors name the layer."""

    def run(a, p, h):
        out = _apply_layer(a, p, h)[0]
        _require_float_arrays(out)
        return out

    _check_params(chain, params)
    h, outs = x, []
    for i, (a, p) in enumerate(zip(chain.applies, params, strict=True)):
        h = _named(chain, i, h, run, a, p, h)
        if eps is not None:
            h = jax.tree_util.tree_map(jnp.add, h, eps[i])
        outs.append(h)
    return h, outs


def _tracer_hint(e: Exception | None, i: int, name: str) -> Exception:
    said = f"\nJAX said: {e}" if e is not None else ""
    return jax.errors.UnexpectedTracerError(
        f"layer {i} ({name!r}) closes over a tracer: a value traced by another JAX "
        "transformation (e.g. a layer built inside jax.jit from that function's "
        "arguments), which is gone once that transformation returns. Pass the arrays the "
        "layer needs as its params, (apply, params) with apply(params, h), instead of "
        "closing over them." + said
    )


def check_no_leaked_tracers(chain: Chain) -> None:
    """Raise ``UnexpectedTracerError`` naming the first layer whose function closes over a
    JAX tracer. Call it only outside any JAX transformation, where every tracer found is
    one that escaped the transformation that made it."""
    for i, a in enumerate(chain.applies):
        fns = a if isinstance(a, tuple) else (a,)
        if any(_holds_tracer(f, depth=4) for f in fns if f is not None):
            raise _tracer_hint(None, i, chain.names[i])


def _holds_tracer(obj, depth: int) -> bool:
    if isinstance(obj, jax.core.Tracer):
        return True
    if depth == 0:
        return False
    inner: list = []
    if isinstance(obj, partial):
        inner = [obj.func, *obj.args, *obj.keywords.values()]
    elif callable(obj) and hasattr(obj, "__code__"):
        inner = [c.cell_contents for c in (obj.__closure__ or ()) if _cell_full(c)]
        inner += list(obj.__defaults__ or ())
    elif isinstance(obj, list | tuple):
        inner = list(obj)
    return any(_holds_tracer(o, depth - 1) for o in inner)


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


def _layer_pass(a, p, h, unravel):
    """``(D, flat output, unravel, (s, r, J_s, J_r))`` of one layer at the flat input ``h``."""
    _require_float_arrays(jax.eval_shape(lambda v: _apply_layer(a, p, unravel(v))[0], h))
    if not isinstance(a, tuple):
        D, out = _flat_jacobian(lambda v: a(p, unravel(v)), h)
        s = r = J_s = J_r = None
    else:
        branch, skip = a
        J_r, r = _flat_jacobian(lambda v: branch(p["branch"], unravel(v)), h)
        if skip is None:
            J_s, s = jnp.eye(h.shape[0], dtype=h.dtype), unravel(h)
        else:
            J_s, s = _flat_jacobian(lambda v: skip(p["skip"], unravel(v)), h)
        D, out = J_s + J_r, jax.tree_util.tree_map(jnp.add, s, r)
        s, r = ravel_pytree(s)[0], ravel_pytree(r)[0]
    h_next, unravel_next = ravel_pytree(out)
    return D, h_next, unravel_next, (s, r, J_s, J_r)


class LayerOutputError(TypeError):
    """A layer returned something other than float arrays."""


def _require_float_arrays(out) -> None:
    leaves = jax.tree_util.tree_leaves(out)
    if not leaves or not all(
        hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.inexact) for v in leaves
    ):
        raise LayerOutputError(
            f"returned {out!r}, but every layer must return a float array or a pytree of "
            "float arrays (wrap a layer that returns extra state, such as (y, state), so "
            "that it returns y alone)"
        )


@partial(jax.jit, static_argnums=0)
def chain_pass(chain: Chain, params, xs) -> ChainPass:
    """:class:`ChainPass` of ``chain`` at the samples ``xs`` (leading axis ``S``)."""
    return jax.vmap(lambda x: _one_sample(chain, params, x))(xs)
