"""Bring your own model: a network given as a chain of layers.

:func:`chain` reads any layered JAX function (plain callables, ``(apply, params)`` pairs,
Equinox modules, Flax linen or NNX modules, containers of these, :class:`Residual` blocks)
into a :class:`Chain`: a :class:`~jacobian_lab.model.Model` like the built-in networks,
which every function taking ``(net, params, x)`` takes the same way.

**Layers and indexing.** ``chain([g_1, ..., g_L])`` computes ``f_L = x`` and
``f_{L-i} = g_i(f_{L-i+1})``: GSC-paper indexing, ``f_0`` is the output of the last layer.
A layer's output may be any pytree of float arrays (a dict, a tuple, an image with a
channel axis); it is flattened by :func:`jax.flatten_util.ravel_pytree` (leaves in
``jax.tree_util`` order, dict keys sorted, each leaf row-major), so ``J_k^l`` is a
``(size f_l, size f_k)`` matrix in that ordering.

**Repeated layers.** Consecutive layers that compute the same function of params of the
same structure and shapes (an ``eqx.nn.MLP``'s hidden layers, a list of identical Flax or
NNX blocks, the same ``apply`` with params of one shape) are stacked into one
:class:`~jacobian_lab.model.Repeat` stage and run under ``lax.scan``, so compile time does
not grow with their number. :func:`repeat` says it explicitly (and fails when the layers
cannot be stacked); ``chain(..., stack=False)`` turns the automatic stacking off.

**Samples.** ``x`` is a pytree whose leaves all carry a leading sample axis ``S``; every
layer is applied to one sample at a time (no batch axis), so the Jacobians are per
sample, as for the built-in per-example networks. For Flax modules that expect a batch
axis, write the layer to take one sample (Flax's ``Dense`` and ``Conv`` accept one).

**Batch normalization with batch statistics.** A model holding a Flax linen
``BatchNorm(use_running_average=False)``, a Flax NNX ``BatchNorm`` in training mode or an
Equinox ``BatchNorm`` (``inference=False``), anywhere (inside containers, custom modules,
residual branches), is a function of the whole batch, as the built-in ``norm="batch"``
networks are: the chain is ``batch_coupled``, ``x`` is *one* batch whose leaves are
``(B, ...)``, and every layer takes that whole batch, so the Jacobians are with respect to
the whole batch. Flax modules take the batch as they are (their updated running
statistics are computed and thrown away; the modules are not changed); Equinox modules,
which work on one example, are vmapped over the batch with the BatchNorm's
``axis_name``, and a model holding state needs it: ``jl.chain(model, state=state)`` with
``model, state = eqx.nn.make_with_state(Model)(...)``. A BatchNorm with running averages
(linen ``use_running_average=True``, NNX ``.eval()``, Equinox ``inference=True``) is a
per-example affine map and leaves the chain per-example. A BatchNorm without scale and
bias has no params, so like an activation it joins the layer before it
(``Dense, BatchNorm, relu`` is one layer). ``chain(..., batch_coupled=True)`` makes any
chain batch-coupled (e.g. plain ``(apply, params)`` layers computing batch statistics);
it is needed where the mode cannot be read without running the model (a linen BatchNorm
made inside ``@nn.compact``, or ``use_running_average`` given only at call time).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jacobian_lab.adapters import (
    Adapted,
    Coupling,
    Mode,
    as_layer,
    batch_coupling,
    children,
    same_ident,
)
from jacobian_lab.checks import is_traced
from jacobian_lab.model import (
    Block,
    Layer,
    Model,
    Params,
    Repeat,
    forward,
    spec_of,
    stage_size,
    tracer_hint,
    unit_of,
)


class Residual(NamedTuple):
    """A residual block ``h -> skip(h) + branch(h)``: mark a layer of :func:`chain`.

    Fields:
        branch: the residual branch ``r``, a layer in any form :func:`chain` accepts (a
            container is applied as one function).
        skip: the skip connection (a layer, e.g. a projection), or ``None`` for the
            identity.
    """

    branch: Any
    skip: Any = None


class repeat(NamedTuple):  # noqa: N801 - used as a function, jl.repeat([...])
    """Mark layers to stack into one repeated stage: ``jl.repeat([layer, layer, ...])``.

    The layers must compute the same function of params with the same structure and
    shapes (``ValueError`` otherwise); their params are stacked and they run under
    ``lax.scan``. Without it, :func:`chain` finds such runs by itself.
    """

    layers: Sequence[Any]


@dataclass(frozen=True, eq=False)
class Chain(Model):
    """A brought model (build it with :func:`chain`).

    Fields:
        stages: the stages (:mod:`jacobian_lab.model`).
        names: one name per layer output, from the input.
        batch_coupled: whether one sample is a whole batch (batch statistics; see the
            module docstring).
    """

    stages: tuple
    names: tuple[str, ...]
    batch_coupled: bool = False
    params_spec: Any = field(default=None, compare=False)

    @property
    def dtype(self) -> str | None:
        """The float dtype of the params (inputs are cast to it), or None without any."""
        dts = {str(a.dtype) for a in jax.tree_util.tree_leaves(self.params_spec)}
        floats = sorted(d for d in dts if jnp.issubdtype(d, jnp.floating))
        return floats[-1] if floats else None

    def stage_params(self, params: Params) -> tuple:
        if not isinstance(params, tuple | list):
            raise TypeError(
                f"a chain's params are a tuple with one entry per stage, got "
                f"{type(params).__name__}"
            )
        return tuple(params)

    def samples(self, x: Any) -> Any:
        """``x`` split into samples: for a per-example chain ``x`` itself (leaves
        ``(S, ...)``, ``S`` samples); for a batch-coupled chain ``x`` is *one* batch (leaves
        ``(B, ...)``, ``B >= 2``), returned with a leading sample axis of 1."""
        leaves, batch = jax.tree_util.tree_leaves(x), self.batch_coupled
        if not leaves or any(jnp.ndim(v) == 0 for v in leaves):
            raise ValueError(
                "a batch-coupled chain (batch statistics) takes x as one batch: a pytree of "
                "arrays with a leading batch axis (shape (B, *example_shape))"
                if batch
                else "a chain takes x as a pytree of arrays with a leading sample axis (shape "
                "(S, *sample_shape)); for one sample use jax.tree.map(lambda v: v[None], x)"
            )
        sizes = {int(jnp.shape(v)[0]) for v in leaves}
        if len(sizes) != 1:
            raise ValueError(
                f"every leaf of x needs the same leading {'batch' if batch else 'sample'} axis; "
                f"got sizes {sorted(sizes)}"
            )
        if batch and sizes.pop() < 2:
            raise ValueError("batch norm needs a batch of at least 2 inputs")
        if not any(is_traced(v) for v in leaves):
            check_no_leaked_tracers(self)
        return jax.tree_util.tree_map(lambda v: jnp.asarray(v)[None], x) if batch else x

    def apply(self, params: Params, x: Any) -> Any:
        """The chain on one sample ``x`` (no sample axis; a whole batch ``(B, ...)`` for a
        batch-coupled chain); returns ``f_0``."""
        return forward(self, params, x)[0]


class _Piece(NamedTuple):
    unit: Layer | Block
    params: Any
    ident: Any
    run: int | None = None  # the jl.repeat marker it came from: stacked with its run


def chain(
    layers: Sequence[Any],
    names: Sequence[str] | None = None,
    *,
    stack: bool = True,
    state: Any = None,
    batch_coupled: bool | None = None,
) -> tuple[Chain, tuple]:
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
              ``Linear, relu`` counts as one layer as in the GSC paper, whose
              pre-activation is the ``Linear`` output (give it as ``(apply, ())`` to keep
              it a layer of its own);
            * :class:`Residual` ``(branch, skip)`` of any of these;
            * :func:`repeat` ``([layer, ...])``: layers to stack into one scanned stage.
        names: one name per layer after expansion (default ``"layer<i>"`` /
            ``"block<i>"``). These name the layers in error messages.
        stack: stack runs of identical consecutive layers into scanned stages.
        state: the ``equinox.nn.State`` of an Equinox model holding state (a
            ``BatchNorm``; see the module docstring). Each stateful layer is called as
            ``layer(x, state) -> (y, new_state)`` on a fresh copy of it and ``new_state``
            is thrown away. (A ``BatchNorm(mode="ema")`` mixes the batch's statistics with
            the running ones in ``state`` unless it is fresh from ``make_with_state``;
            ``mode="batch"`` uses the batch's alone.)
        batch_coupled: ``None`` finds out (see the module docstring); ``True`` makes one
            sample a whole batch whatever the layers are; ``False`` fails if a layer
            normalizes with batch statistics.

    Returns:
        ``(chain, params)``: the description and a tuple with one params pytree per
        stage (a repeated stage's params stacked on a leading axis; a residual block's
        ``{"branch": ..., "skip": ...}``). Pass both to any function that takes
        ``(net, params, x)``.

    Raises:
        TypeError: a layer of a kind jacobian_lab cannot read, with what it accepts; an
            Equinox model holding state without ``state``.
        ValueError: ``batch_coupled`` is needed and not given, or contradicts a layer.
    """
    if not isinstance(layers, list | tuple) or isinstance(layers, repeat):
        layers = [layers]
    mode = _mode(list(layers), state, batch_coupled)
    pieces = _expand(list(layers), mode)
    if not pieces:
        raise ValueError("chain() needs at least one layer; got an empty list")
    stages, params = _group(pieces, stack)
    if names is None:
        names = [
            ("block" if isinstance(p.unit, Block) else "layer") + str(i)
            for i, p in enumerate(pieces)
        ]
    names = tuple(str(n) for n in names)
    if len(names) != len(pieces):
        raise ValueError(
            f"got {len(names)} names for {len(pieces)} layers (after expanding containers "
            "and merging parameter-free layers into the layer before them)"
        )
    return Chain(tuple(stages), names, mode.batch, spec_of(tuple(params))), tuple(params)


def _mode(layers: list, state: Any, batch_coupled: bool | None) -> Mode:
    """Whether the chain is batch-coupled (see :func:`chain`), and the Equinox batch axis."""
    found: list[Coupling] = []

    def visit(layer):
        if isinstance(layer, repeat):
            parts = list(layer.layers)
        elif isinstance(layer, Residual):
            parts = [p for p in (layer.branch, layer.skip) if p is not None]
        else:
            parts = children(layer)
        if parts is not None:
            for p in parts:
                visit(p)
            return
        c = batch_coupling(layer)
        if c.coupled is not False:
            found.append(c)

    for layer in layers:
        visit(layer)
    coupled = [c for c in found if c.coupled]
    if batch_coupled is None:
        unknown = [c for c in found if c.coupled is None]
        if unknown and not coupled:
            raise ValueError(
                f"chain() cannot tell whether {unknown[0].what} normalizes with the batch's "
                "statistics without running it: pass batch_coupled=True (batch statistics: "
                "one sample is a whole batch) or batch_coupled=False (running averages)"
            )
        batch_coupled = bool(coupled)
    elif not batch_coupled and coupled:
        raise ValueError(
            f"batch_coupled=False, but the model holds {coupled[0].what}, which normalizes "
            "with the statistics of the batch it is given; leave batch_coupled unset, or "
            "switch the BatchNorm to its running averages"
        )
    axes = {a if isinstance(a, str) else _hashable_axis(a) for c in coupled for a in c.axis_names}
    if len(axes) > 1:
        raise ValueError(
            f"the Equinox BatchNorms use several axis names {sorted(map(str, axes))}; "
            "chain() vmaps the batch under one name: give them all the same axis_name"
        )
    return Mode(batch=bool(batch_coupled), state=state, axis_name=axes.pop() if axes else None)


def _hashable_axis(name):
    if isinstance(name, list | tuple):
        raise ValueError(
            f"an Equinox BatchNorm normalizes over several named axes {name!r}; chain() "
            "vmaps the batch under one axis name: give BatchNorm(..., axis_name=<one name>)"
        )
    return name


def _expand(layers: list, mode: Mode, run: int | None = None) -> list[_Piece]:
    out: list[_Piece] = []
    for layer in layers:
        if isinstance(layer, repeat):
            out.extend(_expand(list(layer.layers), mode, run=id(layer)))
            continue
        if isinstance(layer, Residual):
            out.append(_block(layer, run, mode))
            continue
        inner = children(layer)
        if inner is not None:
            out.extend(_expand(inner, mode, run))
            continue
        a = as_layer(layer, mode)
        if a.params is None and out and isinstance(out[-1].unit, Layer):
            out[-1] = _merge(out[-1], a)  # an activation joins the layer before it
        else:
            unit = Layer(a.apply)
            out.append(_Piece(unit, () if a.params is None else a.params, a.ident, run))
    return out


def _merge(piece: _Piece, act: Adapted) -> _Piece:
    first = piece.unit.apply

    def apply(p, h):
        return act.apply(None, first(p, h))

    def preactivation(p, h):
        z = first(p, h)
        return act.apply(None, z), z

    ident = None if piece.ident is None or act.ident is None else (piece.ident, act.ident)
    return piece._replace(unit=Layer(apply, preactivation), ident=ident)


def _single(layer, what: str, mode: Mode) -> Adapted:
    """One function for a layer that may itself be a container."""
    pieces = _expand([layer], mode)
    if any(isinstance(p.unit, Block) for p in pieces):
        raise TypeError(f"{what} may not itself contain Residual blocks")
    if len(pieces) == 1:
        return Adapted(pieces[0].unit.apply, pieces[0].params, pieces[0].ident)
    applies = tuple(p.unit.apply for p in pieces)

    def apply(params, h):
        for a, p in zip(applies, params, strict=True):
            h = a(p, h)
        return h

    idents = tuple(p.ident for p in pieces)
    ident = None if any(i is None for i in idents) else ("seq", idents)
    return Adapted(apply, tuple(p.params for p in pieces), ident)


def _block(layer: Residual, run: int | None, mode: Mode) -> _Piece:
    b = _single(layer.branch, "the branch of a Residual", mode)
    s = None if layer.skip is None else _single(layer.skip, "the skip of a Residual", mode)
    branch = lambda p, h: b.apply(p["branch"], h)  # noqa: E731
    skip = None if s is None else (lambda p, h: s.apply(p["skip"], h))
    params = {"branch": b.params, "skip": None if s is None else s.params}
    ident = None
    if b.ident is not None and (s is None or s.ident is not None):
        ident = ("block", b.ident, None if s is None else s.ident)
    return _Piece(Block(branch, skip), params, ident, run)


def _group(pieces: list[_Piece], stack: bool) -> tuple[list, list]:
    """Stages and their params: a jl.repeat run, or (with ``stack``) a run of pieces with
    the same ident, becomes a Repeat."""
    stages, params, i = [], [], 0
    while i < len(pieces):
        run = pieces[i].run
        j = i + 1
        if run is not None:
            while j < len(pieces) and pieces[j].run == run:
                if not same_ident(pieces[i].ident, pieces[j].ident):
                    raise ValueError(
                        f"jl.repeat: layer {j} differs from layer {i} (another function, or "
                        "params of another structure or shape), so they cannot be stacked"
                    )
                j += 1
        elif stack:
            while (
                j < len(pieces)
                and pieces[j].run is None
                and same_ident(pieces[i].ident, pieces[j].ident)
            ):
                j += 1
        if j - i == 1:
            stages.append(pieces[i].unit)
            params.append(pieces[i].params)
        else:
            stages.append(Repeat(pieces[i].unit, j - i))
            params.append(
                jax.tree_util.tree_map(lambda *a: jnp.stack(a), *(p.params for p in pieces[i:j]))
            )
        i = j
    return stages, params


def check_no_leaked_tracers(model: Model) -> None:
    """Raise ``UnexpectedTracerError`` naming the first layer whose function closes over a
    JAX tracer. Call it only outside any JAX transformation, where every tracer found is
    one that escaped the transformation that made it."""
    i = 0
    for stage in model.stages:
        unit = unit_of(stage)
        fns = (unit.apply,) if isinstance(unit, Layer) else (unit.branch, unit.skip, unit.post)
        if any(_holds_tracer(f, depth=6) for f in fns if f is not None):
            raise tracer_hint(None, i, model.names[i])
        i += stage_size(stage)


def _holds_tracer(obj, depth: int) -> bool:
    if isinstance(obj, jax.core.Tracer):
        return True
    if depth == 0:
        return False
    inner: list = []
    if callable(obj) and hasattr(obj, "__code__"):
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
