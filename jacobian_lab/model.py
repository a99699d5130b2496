"""The one model representation: a sequence of stages applied to one sample.

::

    model  = (stage, stage, ...)                  applied in order to one sample
    stage  = Layer(apply)                         h -> apply(p, h)              1 layer output
           | Block(branch, skip=None, post=None)  h -> post(p, skip(p, h) + branch(p, h))
                                                                                1 layer output
           | Repeat(Layer | Block, n)             n copies with stacked params under
                                                  lax.scan                      n layer outputs
           | Repeat((unit, unit, ...), n)         a group of k units applied in turn,
                                                  n copies under lax.scan     n*k layer outputs

Every model, built in (:func:`~jacobian_lab.mlp`, :func:`~jacobian_lab.resmlp`,
:func:`~jacobian_lab.convnet`, :func:`~jacobian_lab.resconvnet`) or brought
(:func:`~jacobian_lab.chain` over plain JAX, Flax or Equinox layers), is a :class:`Model`:
its ``stages``, one name per layer output, ``batch_coupled`` and ``stage_params`` (the
params of each stage, a repeated stage's stacked on a leading axis of length ``n``). The
forward driver (:mod:`jacobian_lab.driver`) is the only code that walks stages; every
diagnostic reads what the driver records.

**Indexing** (the GSC paper, Philipp, Song & Carbonell, arXiv 1712.05577): the ``L``
layer outputs are counted from the output, ``f_0`` = output, ``f_{L-1}`` = the first
layer's output, ``f_L = x``; ``J_k^l = d f_l / d f_k`` for ``k >= l``.

**Samples.** Stage functions map one *sample* to one sample. For per-example models a
sample is one input (a vector, an image, a pytree); a batch-coupled model (batch
normalization with batch statistics) is a function of the whole batch, so one sample is a
batch ``(B, ...)`` and its Jacobians are taken with respect to the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = Any
"""A params pytree: a model's own layout (a dict for built-in networks, a tuple with one
entry per stage for :func:`~jacobian_lab.chain`)."""

Apply = Callable[[Any, Any], Any]


class Layer(NamedTuple):
    """A stage that is one layer, ``h -> apply(p, h)``.

    Fields:
        apply: ``(p, h) -> h'`` on one sample.
        preactivation: optional ``(p, h) -> (h', z)``, the same output together with the
            value ``z`` fed into the layer's nonlinearity (the collapsing-domain statistics
            of :func:`~jacobian_lab.domain_statistics` need it). ``None``: unknown.
        attention: optional ``(p, h) -> A`` for an attention layer: its attention weights
            ``(heads, T, T)``, row ``t`` the distribution of query ``t`` over the keys.
    """

    apply: Apply
    preactivation: Callable[[Any, Any], tuple[Any, Any]] | None = None
    attention: Apply | None = None


class Block(NamedTuple):
    """A residual block, ``h -> post(p, skip(p, h) + branch(p, h))``: one layer output.

    Fields:
        branch: ``(p, h) -> r`` (``p`` is the block's params; the branch picks its part).
        skip: ``(p, h) -> s``, or ``None`` for the identity ``s = h``.
        post: ``(p, z) -> h'`` after the sum ``z = s + r`` (the original ResNet's
            activation, a Post-LN transformer's layer norm with its params), or ``None``
            (a pre-activation block, output ``s + r``). With a post, the block's Jacobian
            is ``J_post (J_s + J_r)``, not ``J_s + J_r``.
        preactivation: optional ``(p, h) -> z``, the value fed into the branch's (last)
            elementwise nonlinearity, for the collapsing-domain statistics. ``None``:
            unknown (or the branch has none).
        attention: optional ``(p, h) -> A``, the attention weights ``(heads, T, T)`` of
            an attention branch (see :class:`Layer`).
    """

    branch: Apply
    skip: Apply | None = None
    post: Apply | None = None
    preactivation: Apply | None = None
    attention: Apply | None = None


class Repeat(NamedTuple):
    """``n`` copies of a :class:`Layer` or :class:`Block` whose params are stacked on a
    leading axis of length ``n``; the driver runs them under ``lax.scan`` (compile time
    does not grow with ``n``) when a copy's output has its input's shape, and one by one
    otherwise.

    ``stage`` may also be a tuple of ``k`` units applied in turn (a *group*, e.g. a
    transformer block's attention and MLP sublayers, each its own residual block); its
    params are then a tuple of ``k`` stacked pytrees, and it gives ``n * k`` layer
    outputs (copy by copy, unit by unit). The units of a group keep their input's shape.
    """

    stage: Layer | Block | tuple
    n: int


Stage = Layer | Block | Repeat


def units_of(stage: Stage) -> tuple:
    """The layers and blocks one copy of a stage applies, in order (one, or a group's)."""
    unit = stage.stage if isinstance(stage, Repeat) else stage
    return (unit,) if isinstance(unit, Layer | Block) else tuple(unit)


def layer_units(model) -> list:
    """The unit (:class:`Layer` or :class:`Block`) that makes each layer output of
    ``model``, from the input (one entry per layer, ``model.num_layers`` in all)."""
    out = []
    for s in model.stages:
        units = units_of(s)
        out += [units[j % len(units)] for j in range(stage_size(s))]
    return out


def stage_size(stage: Stage) -> int:
    """Number of layer outputs a stage produces."""
    return stage.n * len(units_of(stage)) if isinstance(stage, Repeat) else 1


def unit_of(stage: Stage) -> Layer | Block | tuple:
    """The layer or block a stage repeats (the stage itself when it is not a Repeat; a
    tuple for a group, see :func:`units_of`)."""
    return stage.stage if isinstance(stage, Repeat) else stage


class Model:
    """Base of every model: ``stages``, ``names`` (one per layer output, from the input),
    ``batch_coupled`` and :meth:`stage_params`. Subclasses: :class:`~jacobian_lab.Network`
    (built-in; also :class:`~jacobian_lab.ConvNetwork`) and :class:`~jacobian_lab.Chain`
    (brought)."""

    stages: tuple
    names: tuple
    batch_coupled: bool

    def stage_params(self, params: Params) -> tuple:
        """The params of each stage, in stage order."""
        raise NotImplementedError

    def samples(self, x: Any) -> Any:
        """Check ``x`` and split it into samples: a pytree whose leaves have a leading
        sample axis ``S`` (``S`` inputs, or ``S`` batches for a batch-coupled model)."""
        raise NotImplementedError

    params_spec: Any = None
    """The expected params: a pytree of ``jax.ShapeDtypeStruct`` (see :func:`spec_of`)."""

    def tie_gradients(self, grads: Params) -> Params:
        """Gradients with respect to the params, with tied copies of one array summed
        (see :meth:`~jacobian_lab.Chain.tie_gradients`); models without ties return them
        as they are."""
        return grads

    def embed_inputs(self, params: Params, x: Any) -> Any:
        """The analysed input ``f_L`` for the inputs ``x`` as given: ``x`` itself, except
        for a language model read from token ids (:meth:`~jacobian_lab.Chain.embed_inputs`),
        whose ids go through its embedding."""
        del params
        return x

    def init(self, key: jax.Array) -> Params:
        """Draw params (built-in models; a chain's come with it)."""
        raise TypeError(
            f"{type(self).__name__} has no initializer: its params come from the model it "
            "was built from"
        )

    @property
    def num_layers(self) -> int:
        """L: the number of layer outputs; ``f_L = x`` is the input, ``f_0`` the output."""
        return sum(stage_size(s) for s in self.stages)

    @property
    def block_outputs(self) -> tuple[int, ...]:
        """GSC-paper index ``l`` of every residual block's output ``f_l``, nearest the
        output first: the order of the block axis of the block diagnostics."""
        out, i = [], 0
        for s in self.stages:
            units = units_of(s)
            out += [i + j for j in range(stage_size(s)) if isinstance(units[j % len(units)], Block)]
            i += stage_size(s)
        return tuple(sorted(self.num_layers - 1 - j for j in out))

    @property
    def block_posts(self) -> tuple[bool, ...]:
        """For every residual block, in the order of :attr:`block_outputs` (nearest the
        output first): whether it has a ``post`` (a post-activation or a Post-LN norm),
        after which its output is not ``skip + branch``."""
        posts = []
        for s in self.stages:
            units = units_of(s)
            posts += [
                units[j % len(units)].post is not None
                for j in range(stage_size(s))
                if isinstance(units[j % len(units)], Block)
            ]
        return tuple(posts[::-1])

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Index (from the input, as in :attr:`names`) of every layer output made by a unit
        with attention weights (its ``attention``)."""
        return tuple(i for i, u in enumerate(layer_units(self)) if u.attention is not None)

    def layer_label(self, l: int) -> str:
        """A readable name of the layer whose output is ``f_l`` (GSC-paper index)."""
        L = self.num_layers
        i = L - 1 - l
        return f"f_{l} = output of {self.names[i]!r} (layer {i + 1} of {L} from the input)"


def spec_of(params: Params) -> Any:
    """The shapes and dtypes of a params pytree, as ``jax.ShapeDtypeStruct`` leaves."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), params
    )


def check_stage_params(model: Model, params: Params) -> tuple:
    """The per-stage params of ``model``, with a clear error when ``params`` has the wrong
    number of stages or a repeated stage's leading axis is not its number of copies."""
    try:
        per_stage = tuple(model.stage_params(params))
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(
            f"params do not fit this {type(model).__name__}: {type(err).__name__}: {err}. "
            "Pass the params made for it (model.init(key), or the params chain() returned)"
        ) from err
    if len(per_stage) != len(model.stages):
        raise ValueError(
            f"params has {len(per_stage)} entries for a model of {len(model.stages)} stages; "
            "pass the params made for this model (model.init(key), or those chain() returned)"
        )
    for i, (s, p) in enumerate(zip(model.stages, per_stage, strict=True)):
        if isinstance(s, Repeat):
            lead = {int(a.shape[0]) for a in jax.tree_util.tree_leaves(p) if a.ndim > 0}
            if lead and lead != {s.n}:
                raise ValueError(
                    f"stage {i} repeats {s.n} layers, but its params have leading axes "
                    f"{sorted(lead)}: pass the params made for this model"
                )
    return per_stage


# -- running the stages -------------------------------------------------------------


class LayerOutputError(TypeError):
    """A layer returned something other than float arrays."""


def apply_unit(unit: Layer | Block, p, h):
    """Output of one layer or block on one sample."""
    if isinstance(unit, Layer):
        return unit.apply(p, h)
    r = unit.branch(p, h)
    s = h if unit.skip is None else unit.skip(p, h)
    z = jax.tree_util.tree_map(jnp.add, s, r)
    return z if unit.post is None else unit.post(p, z)


def _apply_copy(units: tuple, ps: tuple, h):
    for unit, p in zip(units, ps, strict=True):
        h = apply_unit(unit, p, h)
    return h


def _tap_copy(tap, units: tuple, ps: tuple, h, e):
    """One copy of a repeated stage, unit by unit (a group has a few units); records
    stacked on a leading unit axis."""
    recs = []
    for j, (unit, p) in enumerate(zip(units, ps, strict=True)):
        h, rec = tap(unit, p, h, None if e is None else _index(e, j))
        recs.append(rec)
    return h, jax.tree_util.tree_map(_stack_ragged, *recs)


def _stack_ragged(*values):
    """Stack the units' values of one record field; vectors of different lengths (the
    pre-activations of an attention and an MLP sublayer) are padded with NaN at the end
    (NaN: not a value of that unit)."""
    n = max(v.shape[-1] for v in values) if values[0].ndim else 0
    if any(v.shape != values[0].shape for v in values) and all(v.ndim == 1 for v in values):
        values = [jnp.pad(v, (0, n - v.shape[0]), constant_values=jnp.nan) for v in values]
    return jnp.stack(values)


def require_float_arrays(out) -> None:
    """Raise :class:`LayerOutputError` unless ``out`` is a non-empty pytree of float arrays."""
    leaves = jax.tree_util.tree_leaves(out)
    if not leaves or not all(
        hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.inexact) for v in leaves
    ):
        raise LayerOutputError(
            f"returned {out!r}, but every layer must return a float array or a pytree of "
            "float arrays (wrap a layer that returns extra state, such as (y, state), so "
            "that it returns y alone)"
        )
    if any(v.size == 0 for v in leaves):
        raise LayerOutputError(
            f"returned an empty output {jax.tree_util.tree_map(jnp.shape, out)}: a layer "
            "needs at least one value (check its output size)"
        )


def _same_shapes(a, b) -> bool:
    la, lb = ([(v.shape, v.dtype) for v in jax.tree_util.tree_leaves(t)] for t in (a, b))
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and la == lb


def _index(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _lead(tree):
    return jax.tree_util.tree_map(lambda a: a[None], tree)


def _split(k: int):
    """``(n * k, ...) -> (n, k, ...)``: a group's per-layer values by copy and unit."""
    return lambda a: a.reshape(-1, k, *a.shape[1:])


Tap = Callable[[Layer | Block, Any, Any, Any], tuple[Any, Any]]


def walk(model: Model, params, x, tap: Tap, extras: list | None = None) -> tuple[Any, list]:
    """Run ``model`` on one sample ``x``, handing each layer to ``tap``: the one loop
    over stages (a Python loop over the few stages, ``lax.scan`` inside a repeated one).

    Args:
        tap: ``(unit, p, h, extra) -> (h_next, record)`` for one layer or block with its
            params ``p`` and input ``h``; ``record`` is any pytree.
        extras: per segment (as returned by an earlier walk of the same model and shapes),
            a pytree with a leading layer axis handed to ``tap`` layer by layer; ``None``
            hands ``None``.

    Returns:
        ``(f_0, records)`` with one record per segment, each stacked on a leading layer
        axis. Errors raised while tracing a layer name it.
    """
    per_stage = check_stage_params(model, params)
    h, records, first = x, [], 0

    def single(i, unit, p, h):  # layer i (from the input) as a segment of one
        e = None if extras is None else _index(extras[len(records)], 0)
        h, rec = _named(model, i, h, tap, unit, p, h, e)
        records.append(_lead(rec))
        return h

    for stage, p in zip(model.stages, per_stage, strict=True):
        if not isinstance(stage, Repeat):
            h = single(first, stage, p, h)
            first += 1
            continue
        units = units_of(stage)
        k = len(units)
        ps = (p,) if isinstance(stage.stage, Layer | Block) else p
        start = 0
        for attempt in range(2):  # the first copy may promote the carry (e.g. to float64)
            rest = ps if start == 0 else jax.tree_util.tree_map(lambda a: a[1:], ps)
            carried = _named(
                model, first, h, jax.eval_shape, partial(_apply_copy, units), _index(rest, 0), h
            )
            if _same_shapes(carried, h) or attempt == 1 or stage.n == 1:
                break
            for j, unit in enumerate(units):
                h = single(first + j, unit, _index(ps[j], 0), h)
            start = 1
        if _same_shapes(carried, h) and stage.n - start > 1:
            e = None if extras is None else extras[len(records)]
            e = None if e is None else jax.tree_util.tree_map(_split(k), e)

            def step(c, pe, units=units):
                return _tap_copy(tap, units, pe[0], c, pe[1])

            h, rec = _named(model, first + start * k, h, jax.lax.scan, step, h, (rest, e))
            records.append(jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), rec))
        else:  # the copies change the carried shape (e.g. strided convs): one at a time
            for i in range(start, stage.n):
                for j, unit in enumerate(units):
                    h = single(first + i * k + j, unit, _index(ps[j], i), h)
        first += stage.n * k
    return h, records


def _named(model: Model, i: int, h, fn, *args):
    """``fn(*args)`` for layer ``i`` (from the input) at input ``h``, re-raising an error
    with the layer's index, name and the shape of the sample it got."""
    try:
        return fn(*args)
    except jax.errors.UnexpectedTracerError as e:
        raise tracer_hint(e, i, model.names[i]) from e
    except LayerOutputError as e:
        raise LayerOutputError(f"layer {i} ({model.names[i]!r}) {e}") from None
    except Exception as e:
        shapes = jax.tree_util.tree_map(jnp.shape, h)
        raise ValueError(
            f"layer {i} ({model.names[i]!r}) failed on a sample of shape {shapes} "
            f"(x without its leading sample axis): {type(e).__name__}: {e}\nEach layer "
            "is applied to one sample (one batch for a batch-norm model): check the input's "
            "shape against what that layer expects."
        ) from e


def tracer_hint(e: Exception | None, i: int, name: str) -> Exception:
    said = f"\nJAX said: {e}" if e is not None else ""
    return jax.errors.UnexpectedTracerError(
        f"layer {i} ({name!r}) closes over a tracer: a value traced by another JAX "
        "transformation (e.g. a layer built inside jax.jit from that function's "
        "arguments), which is gone once that transformation returns. Pass the arrays the "
        "layer needs as its params, (apply, params) with apply(params, h), instead of "
        "closing over them." + said
    )


@partial(jax.jit, static_argnums=0)
def apply_batch(model: Model, params, x) -> Any:
    """``f_0`` of a batch ``x`` (one compiled program): every input on its own for a
    per-example model, the whole batch as one sample for a batch-coupled one."""
    if model.batch_coupled:
        return forward(model, params, x)[0]
    return jax.vmap(lambda v: forward(model, params, v)[0])(x)


def forward(model: Model, params, x, eps: list | None = None) -> tuple[Any, list]:
    """``model`` on one sample ``x`` with ``eps`` added to every layer's output.

    Args:
        eps: per segment, a pytree like that segment's stacked outputs (as returned by
            ``forward`` itself); ``None`` adds nothing.

    Returns:
        ``(f_0, outputs)``: outputs per segment, stacked on a leading layer axis, so that
        ``d f_0 / d eps`` is ``d f_0 / d f_l`` at every layer.
    """

    def tap(unit, p, h, e):
        out = apply_unit(unit, p, h)
        require_float_arrays(out)
        if e is not None:
            out = jax.tree_util.tree_map(jnp.add, out, e)
        return out, out

    return walk(model, params, x, tap, eps)
