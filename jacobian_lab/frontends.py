"""Front-ends that read a whole model as its author wrote it: a Flax linen module (bound,
or with its variables), a Flax NNX module, an Equinox module, or a plain-JAX
``(apply, params)`` pair, each turned into a pure function ``fn(params, x)`` of the
model's own params in which submodule calls mark their inputs and outputs (see
:mod:`jacobian_lab.reading`).

* **Flax linen**: ``flax.linen.intercept_methods`` sees every ``__call__`` of every
  submodule, ``@nn.compact`` children included; params are the variables dict.
* **Flax NNX** and **Equinox**: the ``__call__`` of every module class in the model is
  wrapped for the duration of one trace (the classes are restored afterwards); params are
  the model's floating-point state (NNX ``Param``, ``BatchStat`` and other float
  variables; Equinox's inexact arrays), everything else (RNG state, integer buffers) is
  held fixed.
* **Plain JAX**: no module tree; :func:`~jacobian_lab.tap` marks the layer outputs.

Each library is looked up in ``sys.modules``: jacobian_lab imports neither Flax nor
Equinox.

**Determinism.** Dropout is switched off: NNX modules with a ``deterministic`` attribute
and Equinox ``Dropout`` layers are set deterministic on a copy of the model (the user's
model is not changed); a linen model gets no ``dropout`` RNG, so pass its flag
(``kwargs={"train": False}``). A model that still draws random numbers is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jacobian_lab.reading import ReadError, mark


class Call(NamedTuple):
    """One submodule call seen while tracing: its ``path`` in the model (``blocks.3.attn``),
    the module's class ``cls``, the index of the call it is made in (``parent``, ``-1`` for
    the model's own call) and its ``depth`` (``0`` for the model's own call)."""

    path: str
    cls: type
    parent: int
    depth: int


class Recorder:
    """Records submodule calls during one trace and marks their inputs and outputs."""

    def __init__(self, tree: dict | None = None) -> None:
        self.calls: list[Call] = []
        self._stack: list[tuple[int, int]] = []  # (call index, id of the module)
        self._tree = tree or {}  # id(module) -> (path, module) for the model's modules
        self._called: set = set()

    def path_of_new(self, module) -> str:
        """The path of a module made during the call (one copy of a scanned stack of
        blocks, rebuilt from its slice of the stacked params): the path of a module of
        its class in the model that is never called itself (the stacked blocks), else the
        calling module's path and the class name."""
        for key, (path, m) in self._tree.items():
            if type(m) is type(module) and key not in self._called:
                return path
        parent = self.calls[self._stack[-1][0]].path if self._stack else ""
        return f"{parent}.{type(module).__name__}" if parent else type(module).__name__

    def call(self, module, path: str, run: Callable, args: tuple, kwargs: dict):
        """``run(*args, **kwargs)`` as call ``i`` of ``module``: inside
        ``jax.named_scope("jlcall<i>")``, its first argument marked ``in`` and its output
        ``out``. A module re-entering its own call (``super().__call__``) is one call."""
        if self._stack and self._stack[-1][1] == id(module):
            return run(*args, **kwargs)
        self._called.add(id(module))
        i = len(self.calls)
        parent = self._stack[-1][0] if self._stack else -1
        self.calls.append(Call(path, type(module), parent, len(self._stack)))
        self._stack.append((i, id(module)))
        try:
            with jax.named_scope(f"jlcall{i}"):
                if args:
                    args = (mark(args[0], "in", i), *args[1:])
                elif kwargs:
                    first = next(iter(kwargs))
                    kwargs = {**kwargs, first: mark(kwargs[first], "in", i)}
                return mark(run(*args, **kwargs), "out", i)
        finally:
            self._stack.pop()


class ModelFunction(NamedTuple):
    """A model as a pure function (see the module docstring).

    Fields:
        fn: ``(params, x) -> output``; tracing it fills ``info["calls"]`` (the
            :class:`Call` list) and ``info["coupled"]`` (whether it updated batch
            statistics, i.e. normalized with the batch's own statistics).
        params: the model's own params pytree.
        info: what the last trace found.
        batched: whether ``fn`` takes a batch (a leading axis over inputs) or one input.
        library: ``"flax.linen"``, ``"flax.nnx"``, ``"equinox"`` or ``"jax"``.
        coupled: batch coupling known without tracing (Equinox's BatchNorm mode), or
            ``None``.
        per_sample_batch: for a batch-coupled per-input function, ``fn`` vmapped over the
            batch (with the BatchNorms' axis name).
    """

    fn: Callable
    params: Any
    info: dict
    batched: bool
    library: str
    coupled: bool | None = None
    per_sample_batch: Callable | None = None


@contextlib.contextmanager
def wrapped_calls(classes, hook: Callable):
    """Replace ``__call__`` of each class by ``hook(self, original, args, kwargs)`` for the
    duration of the block (the originals are read before any is replaced)."""
    classes = list(dict.fromkeys(classes))
    originals = {c: c.__call__ for c in classes}
    own = {c: c.__dict__.get("__call__") for c in classes}

    def make(original):
        def __call__(self, *args, **kwargs):  # noqa: N807
            return hook(self, original, args, kwargs)

        return __call__

    try:
        for c in classes:
            type.__setattr__(c, "__call__", make(originals[c]))
        yield
    finally:
        for c in classes:
            if own[c] is None:
                type.__delattr__(c, "__call__")
            else:
                type.__setattr__(c, "__call__", own[c])


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def function_of(model, *, batched, state, args: tuple, kwargs: dict) -> ModelFunction:
    """The :class:`ModelFunction` of a whole model (any kind :func:`~jacobian_lab.chain`
    reads with an example ``x``)."""
    linen = sys.modules.get("flax.linen")
    nnx = sys.modules.get("flax.nnx")
    eqx = sys.modules.get("equinox")
    if (
        isinstance(model, tuple)
        and len(model) == 2
        and linen is not None
        and isinstance(model[0], linen.Module)
    ):
        return _linen(linen, model[0], model[1], batched, args, kwargs)
    if linen is not None and isinstance(model, linen.Module):
        if model.scope is None:
            raise TypeError(
                f"the Flax linen module {type(model).__name__} is not bound to its variables: "
                "pass model.bind(variables) or (model, variables) to chain()"
            )
        module, variables = model.unbind()
        return _linen(linen, module, variables, batched, args, kwargs)
    if nnx is not None and isinstance(model, nnx.Module):
        return _nnx(nnx, model, batched, args, kwargs)
    if eqx is not None and isinstance(model, eqx.Module):
        return _equinox(eqx, model, batched, state, args, kwargs)
    if isinstance(model, tuple) and len(model) == 2 and callable(model[0]):
        apply, params = model
        info: dict = {"calls": []}

        def fn(p, x):
            return apply(p, x, *args, **kwargs)

        return ModelFunction(fn, params, info, True if batched is None else batched, "jax")
    raise TypeError(
        f"chain() cannot read a model of type {type(model).__name__}: give a bound Flax "
        "linen module (model.bind(variables)) or (module, variables), a Flax NNX module, an "
        "Equinox module, or a plain-JAX (apply, params) pair whose apply marks its layer "
        "outputs with jl.tap"
    )


def _linen(linen, module, variables, batched, args, kwargs) -> ModelFunction:
    flax = sys.modules["flax"]
    stats = "batch_stats" in variables
    info: dict = {}

    def fn(params, x):
        rec = Recorder()

        def intercept(next_fun, a, k, ctx):
            if ctx.method_name != "__call__":
                return next_fun(*a, **k)
            return rec.call(ctx.module, _dotted(ctx.module.path), next_fun, a, k)

        try:
            with linen.intercept_methods(intercept):
                if stats:
                    out, new = module.apply(params, x, *args, mutable=["batch_stats"], **kwargs)
                    old = jax.tree_util.tree_leaves(params["batch_stats"])
                    new = jax.tree_util.tree_leaves(new.get("batch_stats", {}))
                    info["coupled"] = any(a is not b for a, b in zip(old, new, strict=False))
                else:
                    out = module.apply(params, x, *args, **kwargs)
                    info["coupled"] = False
        except flax.errors.InvalidRngError as e:
            raise ReadError(
                f"the Flax model {type(module).__name__} asks for random numbers ({e}): "
                "jacobian_lab analyses it as a deterministic function. Pass the call "
                "argument that turns dropout off, e.g. jl.chain(model, x, kwargs="
                "{'train': False}) or kwargs={'deterministic': True}"
            ) from None
        info["calls"] = rec.calls
        return out

    return ModelFunction(fn, variables, info, True if batched is None else batched, "flax.linen")


def _nnx(nnx, model, batched, args, kwargs) -> ModelFunction:
    model = nnx.merge(*nnx.split(model))  # a copy: the user's model is not changed
    if "deterministic" not in kwargs:
        for _, m in nnx.iter_graph(model):
            if isinstance(m, nnx.Module) and getattr(m, "deterministic", True) in (False, None):
                m.deterministic = True
    graphdef, state = nnx.split(model)

    def is_float(path, v):
        value = v.get_value() if hasattr(v, "get_value") else v
        return hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.inexact)

    params, rest = nnx.split_state(state, is_float, ...)
    info: dict = {}

    def fn(p, x):
        m = nnx.merge(graphdef, p, rest)
        tree = {id(n): (_dotted(p), n) for p, n in nnx.iter_graph(m) if isinstance(n, nnx.Module)}
        paths = {k: v[0] for k, v in tree.items()}
        modules = [n for _, n in tree.values()]
        rec = Recorder(tree)

        def hook(self, original, a, k):
            path = paths[id(self)] if id(self) in paths else rec.path_of_new(self)
            return rec.call(self, path, lambda *a, **k: original(self, *a, **k), a, k)

        before = jax.tree_util.tree_leaves(nnx.state(m, nnx.BatchStat))
        with wrapped_calls([type(n) for n in modules], hook):
            out = m(x, *args, **kwargs)
        after = jax.tree_util.tree_leaves(nnx.state(m, nnx.BatchStat))
        info["coupled"] = any(a is not b for a, b in zip(before, after, strict=False))
        info["calls"] = rec.calls
        return out

    return ModelFunction(fn, params, info, True if batched is None else batched, "flax.nnx")


def _eqx_paths(eqx, root) -> dict:
    """``{id(module): path}`` for every Equinox module in ``root`` (fields, lists, tuples,
    dicts), the first path that reaches it."""
    out: dict = {}

    def visit(obj, path):
        if isinstance(obj, eqx.Module):
            if id(obj) in out:
                return
            out[id(obj)] = (_dotted(path), obj)
            for f in dataclasses.fields(obj):
                visit(getattr(obj, f.name, None), (*path, f.name))
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                visit(v, (*path, i))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, (*path, k))

    visit(root, ())
    return out


def _equinox(eqx, model, batched, state, args, kwargs) -> ModelFunction:
    is_dropout = lambda m: isinstance(m, eqx.nn.Dropout)  # noqa: E731
    drops = [m for m in jax.tree_util.tree_leaves(model, is_leaf=is_dropout) if is_dropout(m)]
    if drops and "inference" not in kwargs:
        model = eqx.tree_at(
            lambda m: [
                d.inference
                for d in jax.tree_util.tree_leaves(m, is_leaf=is_dropout)
                if is_dropout(d)
            ],
            model,
            [True] * len(drops),
        )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    is_bn = lambda m: isinstance(m, eqx.nn.BatchNorm)  # noqa: E731
    bns = [m for m in jax.tree_util.tree_leaves(model, is_leaf=is_bn) if is_bn(m)]
    training = [m for m in bns if not m.inference]
    if training and state is None:
        raise TypeError(
            f"the Equinox model {type(model).__name__} holds a BatchNorm, so chain() needs "
            "its state: build it with `model, state = eqx.nn.make_with_state(Model)(...)` "
            "and pass jl.chain(model, x, state=state)"
        )
    axis_names = {m.axis_name for m in training}
    if len(axis_names) > 1:
        raise ValueError(
            f"the Equinox BatchNorms use several axis names {sorted(map(str, axis_names))}; "
            "chain() vmaps the batch under one name: give them all the same axis_name"
        )
    info: dict = {}

    def fn(p, x):
        m = eqx.combine(p, static)
        found = _eqx_paths(eqx, m)
        rec = Recorder(found)

        def hook(self, original, a, k):
            path = found[id(self)][0] if id(self) in found else rec.path_of_new(self)
            return rec.call(self, path, lambda *a, **k: original(self, *a, **k), a, k)

        with wrapped_calls([type(o) for _, o in found.values()], hook):
            if state is None:
                out = m(x, *args, **kwargs)
            else:
                out = m(x, state, *args, **kwargs)
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        f"the Equinox model {type(m).__name__} was given its state but "
                        f"returned {type(out).__name__}; chain() calls a model holding state "
                        "as model(x, state) -> (y, new_state), the Equinox convention"
                    )
                out = out[0]
        info["calls"] = rec.calls
        info["coupled"] = bool(training)
        return out

    per_batch = None
    if training:
        (axis,) = axis_names

        def per_batch(p, xb):
            return jax.vmap(lambda xi: fn(p, xi), axis_name=axis)(xb)

    return ModelFunction(
        fn,
        params,
        info,
        False if batched is None else batched,
        "equinox",
        coupled=bool(training),
        per_sample_batch=per_batch,
    )
