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
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import jacobian_lab.frontends as frontends
import jacobian_lab.reading as reading
from jacobian_lab.adapters import (
    Adapted,
    Coupling,
    Mode,
    as_layer,
    batch_coupling,
    children,
    is_pair,
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
    units_of,
)


class Residual(NamedTuple):
    """A residual block ``h -> post(skip(h) + branch(h))``: mark a layer of :func:`chain`.

    Fields:
        branch: the residual branch ``r``, a layer in any form :func:`chain` accepts (a
            container is applied as one function).
        skip: the skip connection (a layer, e.g. a projection), or ``None`` for the
            identity.
        post: what follows the sum, or ``None``: the activation of a post-activation
            block (the original ResNet's), or a Post-LN transformer sublayer's layer norm
            ``LN(h + F(h))`` with its params. The block's Jacobian is then
            ``J_post (J_skip + J_branch)``; the diagnostics whose prediction assumes
            ``skip + branch`` say so.
    """

    branch: Any
    skip: Any = None
    post: Any = None


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
        names: one name per layer output, from the input (the submodule paths for a
            whole model read by ``chain(model, x)``).
        batch_coupled: whether one sample is a whole batch (batch statistics; see the
            module docstring).
        params_spec: the expected params (shapes and dtypes).
        layout: ``None``: the params are a tuple with one entry per stage (a list of
            layers). For a whole model read by ``chain(model, x)``, the params are the
            model's own, and ``layout`` says which of their leaves each stage reads
            (:class:`~jacobian_lab.reading.Read`); a leaf read by several layers (a tied
            embedding) is one leaf, so its gradient is summed and training keeps it tied.
        sample: a read model's analysed input ``f_L``, one sample (shapes and dtypes).
        ids: the token ids a read language model takes, one sample, or ``None``.
        embed: for token ids, ``(params, ids) -> f_L`` on one sample (the stem).
        ident: what the model computes apart from its params, for a read model: two
            chains with equal idents are equal (and hash alike), so compiled programs are
            shared between them (one per seed, or one rebuilt). ``None``: equal only to
            itself.
        report: one line per automatic choice made in reading the model (what was
            stacked, what not and why).
        ties: for a list of layers, groups of positions (in ``jax.tree_util.tree_leaves``
            order of the params) holding one array that several layers use: the copies
            are tied (:meth:`tie_gradients`).
    """

    stages: tuple
    names: tuple[str, ...]
    batch_coupled: bool = False
    params_spec: Any = field(default=None, compare=False)
    layout: tuple | None = None
    sample: Any = None
    ids: Any = None
    embed: Any = None
    ident: Any = None
    report: tuple = ()
    ties: tuple = ()

    def tie_gradients(self, grads: Params) -> Params:
        """``grads`` (shaped like the params) with each group of tied leaves (:attr:`ties`:
        one array that several layers of a list use) given the sum of the group's
        gradients: the gradient of the one shared array, so training keeps the copies
        equal. A read model's tied arrays are one leaf already (nothing to do)."""
        if not self.ties:
            return grads
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        for group in self.ties:
            total = sum(leaves[i] for i in group)
            for i in group:
                leaves[i] = total
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def __eq__(self, other) -> bool:
        if self.ident is None or not isinstance(other, Chain):
            return self is other
        return self.ident == other.ident

    def __hash__(self) -> int:
        return id(self) if self.ident is None else hash(self.ident)

    @property
    def dtype(self) -> str | None:
        """The float dtype of the params (inputs are cast to it), or None without any."""
        dts = {str(a.dtype) for a in jax.tree_util.tree_leaves(self.params_spec)}
        floats = sorted(d for d in dts if jnp.issubdtype(d, jnp.floating))
        return floats[-1] if floats else None

    def stage_params(self, params: Params) -> tuple:
        if self.layout is not None:
            return reading.stage_params(self.layout, self.stages, params)
        if not isinstance(params, tuple | list):
            raise TypeError(
                f"a chain's params are a tuple with one entry per stage, got "
                f"{type(params).__name__}"
            )
        return tuple(params)

    def embed_inputs(self, params: Params, x: Any) -> Any:
        """Token ids (integer ``x``, leaves ``(S, *ids_shape)``) through the stem of a read
        language model, one sample at a time: ``f_L`` with leaves ``(S, *sample_shape)``.
        Anything else is returned as it is."""
        if self.embed is None or not any(
            hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.integer)
            for v in jax.tree_util.tree_leaves(x)
        ):
            return x
        _check_sample_shapes(x, self.ids, "token ids x")
        return jax.vmap(lambda xi: self.embed(params, xi))(x)

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
        if self.sample is not None:
            _check_sample_shapes(x, self.sample, "x")
        if not any(is_traced(v) for v in leaves):
            check_no_leaked_tracers(self)
        return jax.tree_util.tree_map(lambda v: jnp.asarray(v)[None], x) if batch else x

    def apply(self, params: Params, x: Any) -> Any:
        """The chain on one sample ``x`` (no sample axis; a whole batch ``(B, ...)`` for a
        batch-coupled chain); returns ``f_0``."""
        return _apply_one(self, params, x)


@partial(jax.jit, static_argnums=0)
def _apply_one(model: Model, params: Params, x: Any) -> Any:
    return forward(model, params, x)[0]


def _check_sample_shapes(x, spec, what: str) -> None:
    """Raise ``ValueError`` unless the leaves of ``x`` are ``(S, *shape)`` for the shapes of
    one sample in ``spec`` (a read model is specialized to its example's shapes)."""
    got = [tuple(jnp.shape(v))[1:] for v in jax.tree_util.tree_leaves(x)]
    want = [tuple(s.shape) for s in jax.tree_util.tree_leaves(spec)]
    if jax.tree_util.tree_structure(x) != jax.tree_util.tree_structure(spec) or got != want:
        raise ValueError(
            f"{what} has samples of shape {got[0] if len(got) == 1 else got}, but this model "
            f"was read at {want[0] if len(want) == 1 else want}: a model read by "
            "jl.chain(model, x) is specialized to the sample shape of its example x (and "
            "the batch size, for batch statistics); read it again with an x of this shape"
        )


class _Piece(NamedTuple):
    unit: Layer | Block
    params: Any
    ident: Any
    run: int | None = None  # the jl.repeat marker it came from: stacked with its run


def chain(
    model: Any,
    x: Any = None,
    *,
    names: Sequence[str] | None = None,
    at: Any = None,
    stack: bool = True,
    state: Any = None,
    batch_coupled: bool | None = None,
    batched: bool | None = None,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
) -> tuple[Chain, Any]:
    """Read a model into a :class:`Chain` and collect its params.

    Two ways in:

    * ``chain(model, x)``: **a whole model, as written** (see "Reading a whole model"
      below): a Flax linen module bound to its variables (``Net().bind(variables)``, or
      ``(Net(), variables)``), a Flax NNX module, an Equinox module, or a plain-JAX
      ``(apply, params)`` pair whose ``apply`` marks its layer outputs with
      :func:`~jacobian_lab.tap`. ``x`` is example inputs with a leading sample axis (one
      batch for a model with batch statistics; integer token ids for a language model).
    * ``chain([layer, ...])``: **a list of layers** you name yourself (below).

    **Reading a whole model** (:mod:`jacobian_lab.reading`). The model is traced once on
    ``x`` with every submodule call marked, and its program is cut at the *layer
    outputs*: by default the inputs of its repeated blocks (the submodules of one class
    called in sequence at the shallowest level where some class repeats: BasicBlocks,
    transformer blocks, Mixer blocks, the Dense layers of an MLP), or those chosen by
    ``at``. What runs before the first block is the *stem* (one layer), after the last
    the *head* (one layer); a stem or head without params joins the block next to it;
    code between two blocks joins the block before it. Inside a block, each residual add
    (``x + branch(x)``, in the block or in its parent, found in the program) makes a
    residual unit :class:`~jacobian_lab.model.Block` with its own layer output, so a
    transformer block gives an attention and an MLP sublayer; what follows an add up to
    the next unit is its ``post`` (a Post-LN norm, a post-activation); a projection
    shortcut is the skip. Identical units are stacked and scanned (also alternating
    groups). The layer names are the submodule paths (``blocks.3.attn``). The read model
    is checked to reproduce the model's own output on ``x`` (to ``1e-10`` of its
    largest entry in float64, ``1e-4`` in float32), and a value that bypasses a layer
    output (a DenseNet or U-Net skip) is refused by name. Its params are **the model's
    own** (``variables`` for linen, the float ``nnx.State`` for NNX, the inexact arrays
    of an Equinox model, ``params`` of a pair): another seed's params of the same
    structure fit the same chain. A read model is specialized to the sample shape of
    ``x`` (and the batch size for batch statistics).

    Args:
        model: a whole model (with ``x``), or a list of layers (without it). Each layer
            of a list is one of:

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
            * :class:`Residual` ``(branch, skip, post)`` of any of these;
            * :func:`repeat` ``([layer, ...])``: layers to stack into one scanned stage.

            A container may also be passed alone, without a list.
        x: example inputs, to read a whole model (leaves ``(S, *sample_shape)``).
        names: one name per layer output (default: the submodule paths of a read model;
            ``"layer<i>"`` / ``"block<i>"`` for a list). These name the layers in results
            and error messages.
        at: which submodule calls are the layer outputs of a read model: a module class,
            a tuple of classes, a predicate on the submodule path
            (``lambda path: path.startswith("blocks.")``), or ``"all"`` (every call of a
            module that calls no other); for a plain-JAX model, a predicate on the
            :func:`~jacobian_lab.tap` names. Default: the repeated blocks, or every tap.
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
        batched: whether a whole model takes a batch (a leading axis over inputs, as
            Flax models are written: the default for Flax and plain JAX) or one input
            (as Equinox models are written: the default for Equinox). A batched model is
            read on one input at a time with a batch axis of 1.
        args, kwargs: more positional and keyword arguments of the model's call
            (``kwargs={"train": False}``, ``{"deterministic": True}``, a mask). Dropout is
            off by default (:mod:`jacobian_lab.frontends`).

    Returns:
        ``(chain, params)``: the description and its params: for a read model the
        model's own params; for a list, a tuple with one params pytree per stage (a
        repeated stage's params stacked on a leading axis; a residual block's
        ``{"branch": ..., "skip": ...}``, with ``"post"`` when given). Pass both to any
        function that takes ``(net, params, x)``.

    Raises:
        TypeError: a layer or model of a kind jacobian_lab cannot read, with what it
            accepts; a whole model without ``x``; an Equinox model holding state
            without ``state``.
        ValueError: ``batch_coupled`` is needed and not given, or contradicts a layer;
            :class:`~jacobian_lab.reading.ReadError` (a ``ValueError``): a model that
            cannot be read as asked (fewer than two layer outputs, a skip that bypasses
            a layer output, layer outputs out of sequence, a model drawing random
            numbers, a read model that does not reproduce the model's output), naming
            the submodules and the argument that changes it.
    """
    if x is not None:
        return _read(model, x, names, at, stack, state, batch_coupled, batched, args, kwargs)
    if at is not None or batched is not None or args or kwargs:
        raise TypeError(
            "at=, batched=, args= and kwargs= are for reading a whole model: pass example "
            "inputs too, jl.chain(model, x, ...)"
        )
    layers = model
    if not isinstance(layers, list | tuple | Residual | repeat) and children(layers) is None:
        raise TypeError(
            f"jl.chain(model) got one {type(layers).__name__}: to read a whole model, pass "
            "example inputs with a leading sample axis, jl.chain(model, x); to list the "
            "layers yourself, pass a list, jl.chain([layer, ...])"
        )
    if is_pair(layers):
        raise TypeError(
            "jl.chain((apply, params)) reads a whole plain-JAX model: pass example inputs, "
            "jl.chain((apply, params), x), and mark the layer outputs inside apply with "
            "jl.tap(h); for a one-layer chain pass a list, jl.chain([(apply, params)])"
        )
    if not isinstance(layers, list | tuple) or isinstance(layers, repeat | Residual):
        layers = [layers]
    mode = _mode(list(layers), state, batch_coupled)
    pieces = _expand(list(layers), mode)
    if not pieces:
        raise ValueError("chain() needs at least one layer; got an empty list")
    pieces, shared = _untie_stacking(pieces)
    stages, params, unknown = _group(pieces, stack)
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
    leaves = jax.tree_util.tree_leaves(tuple(params))
    ties = tuple(
        tuple(i for i, a in enumerate(leaves) if id(a) == key)
        for key in dict.fromkeys(id(a) for a in leaves if id(a) in shared)
    )
    report = []
    if len(unknown) > 1:
        report.append(
            "not stacked (their functions cannot be compared: plain callables, or modules "
            f"of unknown structure): {', '.join(names[k] for k in unknown)}; "
            "jl.repeat([...]) stacks identical layers"
        )
    if ties:
        report.append(
            f"{len(ties)} array(s) used by several layers: kept tied (their gradients are "
            "summed in training); those layers are not stacked"
        )
    net = Chain(
        tuple(stages), names, mode.batch, spec_of(tuple(params)), ties=ties, report=tuple(report)
    )
    return net, tuple(params)


def _untie_stacking(pieces: list) -> tuple[list, set]:
    """The ids of arrays that several layers share (a tied weight), and the pieces with
    those kept out of stacking (a stacked copy would untie them)."""
    seen: dict = {}
    for i, p in enumerate(pieces):
        for a in jax.tree_util.tree_leaves(p.params):
            seen.setdefault(id(a), set()).add(i)
    shared = {k for k, owners in seen.items() if len(owners) > 1}
    if not shared:
        return pieces, shared
    out = []
    for p in pieces:
        if any(id(a) in shared for a in jax.tree_util.tree_leaves(p.params)):
            p = p._replace(ident=("tied", object()), run=None)  # equal to no other
        out.append(p)
    return out, shared


def _read(model, x, names, at, stack, state, batch_coupled, batched, args, kwargs):
    """A whole model read by :mod:`jacobian_lab.reading` (see :func:`chain`)."""
    if isinstance(model, list | Residual | repeat) or (
        isinstance(model, tuple) and not (len(model) == 2 and callable(model[0]))
    ):
        raise TypeError(
            "x is for reading a whole model, jl.chain(model, x); a list of layers is read "
            "without it, jl.chain([layer, ...])"
        )
    mf = frontends.function_of(
        model, batched=batched, state=state, args=tuple(args), kwargs=dict(kwargs or {})
    )
    found = reading.read_model(mf, x, at=at, batch_coupled=batch_coupled, stack=stack)
    read = found.read
    labels = read.names if names is None else tuple(str(n) for n in names)
    if len(labels) != len(read.names):
        raise ValueError(
            f"got {len(labels)} names for the {len(read.names)} layer outputs found "
            f"({', '.join(read.names)})"
        )
    spec = spec_of(mf.params)

    def shapes(tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return treedef, tuple((tuple(a.shape), str(a.dtype)) for a in leaves)

    ident = (
        mf.library,
        read.key,
        labels,
        found.batch_coupled,
        shapes(spec),
        shapes(found.sample),
        None if found.ids is None else shapes(found.ids),
    )
    net = Chain(
        read.stages,
        labels,
        found.batch_coupled,
        spec,
        layout=read.layout,
        sample=found.sample,
        ids=found.ids,
        embed=found.embed,
        ident=ident,
        report=found.report,
    )
    return net, mf.params


def _mode(layers: list, state: Any, batch_coupled: bool | None) -> Mode:
    """Whether the chain is batch-coupled (see :func:`chain`), and the Equinox batch axis."""
    found: list[Coupling] = []

    def visit(layer):
        if isinstance(layer, repeat):
            parts = list(layer.layers)
        elif isinstance(layer, Residual):
            parts = [p for p in (layer.branch, layer.skip, layer.post) if p is not None]
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
    q = None if layer.post is None else _single(layer.post, "the post of a Residual", mode)
    branch = lambda p, h: b.apply(p["branch"], h)  # noqa: E731
    skip = None if s is None else (lambda p, h: s.apply(p["skip"], h))
    post = None if q is None else (lambda p, z: q.apply(p["post"], z))
    params = {"branch": b.params, "skip": None if s is None else s.params}
    if q is not None:
        params["post"] = q.params
    parts = (b, s, q)
    ident = None
    if all(a is None or a.ident is not None for a in parts):
        ident = ("block", *(None if a is None else a.ident for a in parts))
    return _Piece(Block(branch, skip, post), params, ident, run)


def _group(pieces: list[_Piece], stack: bool) -> tuple[list, list, list]:
    """Stages, their params, and the pieces that could not be compared for stacking: a
    jl.repeat run, or (with ``stack``) a run of pieces with the same ident, becomes a
    Repeat."""
    stages, params, i = [], [], 0
    unknown = [k for k, p in enumerate(pieces) if p.ident is None and p.run is None]
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
    return stages, params, unknown if stack else []


def check_no_leaked_tracers(model: Model) -> None:
    """Raise ``UnexpectedTracerError`` naming the first layer whose function closes over a
    JAX tracer. Call it only outside any JAX transformation, where every tracer found is
    one that escaped the transformation that made it."""
    i = 0
    for stage in model.stages:
        for unit in units_of(stage):
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
