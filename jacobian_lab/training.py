"""A small training loop for any model, recording signal-propagation diagnostics.

:func:`train` (one run) and :func:`train_runs` (several runs under ``vmap``: seeds and
learning rates in one compiled program) train a :class:`~jacobian_lab.Model`, built in
or brought through :func:`~jacobian_lab.chain`, on a classification
:class:`~jacobian_lab.Dataset` with SGD or Adam from optax (``optax.sgd`` and
``optax.adam`` with their defaults; the learning rate is a traced hyperparameter through
``optax.inject_hyperparams``, so one compiled program serves every learning rate).

**Readout.** A model's output ``f_0`` (flattened to ``d_0`` numbers per example) is mapped
to class logits by a trained linear head, ``logits = c * f_0 @ W + b`` with ``W (d_0, C)``
and ``b (C,)`` initialized to zero and trained with the model, and ``c`` a constant fixed
at initialization: one over the root mean square of ``f_0`` over the training inputs at
the initial params. So every model starts at the same loss ``log C`` whatever the scale of
its output, and the scale of ``f_0`` (which the GSC ignores) does not decide how large the
head's first SGD steps are. The diagnostics (GSC, per-layer norms) are those of the model
alone, ``f_0`` = its output, as everywhere in jacobian_lab.

**Batch norm** (batch-coupled models): each training step normalizes over its mini-batch
(the whole training set when full-batch); the recorded losses and accuracies use the
statistics of the whole split being evaluated (no running averages are kept).

**Recording.** At each step ``t`` of ``record_at`` (``0`` = initialization) the loop
records, at the params ``theta_t`` (before step ``t + 1``): the mean cross-entropy and the
accuracy on the whole training split and on the held-out split; the GSC profile
``GSC(k, 0)`` of the model, ``k = 0 .. L`` (:func:`~jacobian_lab.gsc` with
``method="auto"``: exact from the layer Jacobians when they fit its memory budget,
matrix-free with ``gsc_probes`` probes otherwise), averaged over the first
``gsc_samples`` training inputs; per layer, the norm
of the full-batch gradient of the training loss and the size of the update the optimizer
makes from that gradient relative to the layer's params, ``||delta theta_l|| /
||theta_l||`` (for full-batch training exactly the update of step ``t + 1``). Per-layer
arrays are in the GSC paper's indexing: entry ``l`` is the layer whose output is ``f_l``,
``l = 0`` the layer nearest the output; a layer without params gets NaN.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jacobian_lab.checks import check_key, check_memory, is_traced
from jacobian_lab.datasets import Dataset, check_dataset_arrays
from jacobian_lab.driver import compute_dtype
from jacobian_lab.gsc import gsc
from jacobian_lab.model import Model, Params, Repeat, apply_unit, forward, units_of, walk

OPTIMIZERS = {"sgd": optax.sgd, "adam": optax.adam}


class History(NamedTuple):
    """What :func:`train` records (see the module docstring). ``T`` record steps, ``L``
    layers; :func:`train_runs` adds a leading run axis ``R`` to every array field.

    Fields:
        steps: ``(T,)`` the recorded steps (``0`` = initialization).
        train_loss, train_accuracy, test_loss, test_accuracy: ``(T,)``.
        gsc: ``(T, L+1)`` ``GSC(k, 0)`` of the model, GSC-paper indexing.
        grad_norm: ``(T, L)`` norm of the full-batch gradient per layer.
        update_ratio: ``(T, L)`` ``||delta theta_l|| / ||theta_l||`` per layer.
        head_grad_norm, head_update_ratio: ``(T,)`` the same for the readout head.
        params, head: the final model params and readout head ``{"W", "b"}``.
        readout_scale: the constant ``c`` of the readout (scalar).
    """

    steps: Any
    train_loss: Any
    train_accuracy: Any
    test_loss: Any
    test_accuracy: Any
    gsc: Any
    grad_norm: Any
    update_ratio: Any
    head_grad_norm: Any
    head_update_ratio: Any
    params: Any
    head: Any
    readout_scale: Any


def model_outputs(model: Model, params: Params, x) -> jax.Array:
    """The model's output ``f_0`` for a batch ``x (B, ...)``, flattened to ``(B, d_0)``
    (a batch-coupled model sees ``x`` as one batch)."""
    x = model.embed_inputs(params, x)  # token ids through a read language model's stem
    xs = x[None] if model.batch_coupled else x
    f0 = jax.vmap(lambda s: forward(model, params, s)[0])(xs)
    if not isinstance(f0, jax.Array):
        raise TypeError("train needs a model whose output f_0 is one array, not a pytree")
    return f0.reshape(x.shape[0], -1)


def logits(model: Model, params: Params, head: dict, x, *, readout_scale) -> jax.Array:
    """Class logits ``(B, C)``: ``readout_scale * f_0 @ head["W"] + head["b"]``."""
    return readout_scale * model_outputs(model, params, x) @ head["W"] + head["b"]


def cross_entropy(model: Model, params: Params, head: dict, x, y, *, readout_scale):
    """Mean softmax cross-entropy (natural log) of the labels ``y (B,)``."""
    z = logits(model, params, head, x, readout_scale=readout_scale)
    return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def norm_per_layer(model: Model, tree: Params) -> jax.Array:
    """``(L,)`` Euclidean norm of each layer's entries of ``tree`` (params, or a gradient
    or update shaped like them), GSC-paper order (entry ``l``: the layer producing
    ``f_l``). A repeated stage's leading axis indexes its copies (a group of ``k`` units
    per copy: layers copy by copy, params a tuple of ``k`` stacked trees); a layer with no
    params gets 0."""

    def per_copy(p, n):  # (n,) squared norms of a stacked tree (n = 1: one layer)
        total = jnp.zeros((n,))
        for a in jax.tree_util.tree_leaves(p):
            total = total + jnp.sum(jnp.square(a.reshape(n, -1).astype(jnp.float32)), axis=1)
        return total

    sq = []
    for stage, p in zip(model.stages, model.stage_params(tree), strict=True):
        if not isinstance(stage, Repeat):
            sq.append(per_copy(p, 1))
        elif len(units_of(stage)) == 1:
            sq.append(per_copy(p, stage.n))
        else:  # (n, k) -> copy by copy
            sq.append(jnp.stack([per_copy(q, stage.n) for q in p], axis=1).reshape(-1))
    return jnp.sqrt(jnp.concatenate(sq))[::-1]


def _tree_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree)))


def check_data(model: Model, data: Dataset, batch_size: int | None) -> None:
    """Raise ``ValueError`` when ``data`` is not a valid data set (the checks of
    :func:`~jacobian_lab.load_npz`, :func:`~jacobian_lab.datasets.check_dataset_arrays`:
    finite inputs, integer labels in ``0 .. num_classes - 1``, one per input, non-empty
    splits) or does not fit ``model`` or ``batch_size``."""
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a jacobian_lab.Dataset, got {type(data).__name__}")
    check_dataset_arrays(*data[:4], data.num_classes, where=f"data ({data.name or 'Dataset'})")
    shape = getattr(model, "example_shape", None)
    if shape is not None and tuple(data.feature_shape) != tuple(shape):
        raise ValueError(
            f"data inputs have shape {data.feature_shape} but the model takes {tuple(shape)}: "
            f"build the model with in_dim={int(np.prod(data.feature_shape))} (flat inputs) "
            "or reshape the data"
        )
    n = data.x_train.shape[0]
    if batch_size is not None and not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in 1 .. {n} (training examples), got {batch_size}")
    if model.batch_coupled and batch_size is not None and batch_size < 2:
        raise ValueError("a batch-norm model needs batch_size >= 2")


def check_trainable(params: Params) -> None:
    """Raise ``TypeError`` naming the first params leaf that is not a float array: training
    differentiates every leaf (``jax.grad`` refuses integers)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            name = "params" + jax.tree_util.keystr(path)
            raise TypeError(
                f"{name} is {dtype if dtype is not None else type(leaf).__name__}, but train "
                "differentiates every leaf of params and needs floats: cast it (e.g. "
                f"jax.tree.map(lambda a: a.astype(jnp.float32), params)) or keep integer "
                "state out of params"
            )


def check_head(model: Model, params: Params, data: Dataset, runs: int) -> None:
    """Raise ``MemoryError`` before training when the readout head (``d_0 x num_classes``
    weights per run, and the optimizer's two copies) cannot fit in the device's memory."""
    one = jax.tree_util.tree_map(lambda a: a[0], params)
    sample = jnp.zeros((1, *data.feature_shape), compute_dtype(model) or jnp.float32)
    try:
        d0 = int(np.prod(jax.eval_shape(lambda v: model_outputs(model, one, v), sample).shape[1:]))
    except Exception:  # noqa: BLE001 - a model that does not run says so in training
        return
    count = 3 * runs * (d0 + 1) * int(data.num_classes)
    check_memory(
        4 * count,
        f"the readout head ({d0} x {data.num_classes} weights per run, with the optimizer's "
        f"state: {count:.3g} numbers) needs",
        "check num_classes and the labels (they must number the classes 0 .. C-1)",
    )


def record_steps(steps: int, record_at=None) -> tuple[int, ...]:
    """The steps to record: ``record_at`` checked (sorted, unique, within ``0 .. steps``)
    or by default 0, ``steps`` and about 8 steps spaced geometrically between."""
    if record_at is None:
        record_at = np.unique(np.round(np.geomspace(1, max(steps, 1), 8)).astype(int))
        record_at = [0, *[int(s) for s in record_at if s <= steps]]
    out = tuple(sorted({int(s) for s in record_at}))
    if not out or out[0] < 0 or out[-1] > steps:
        raise ValueError(f"record_at must be steps in 0 .. {steps}, got {list(record_at)}")
    return out


def train(
    model: Model,
    params: Params,
    data: Dataset,
    *,
    key: jax.Array,
    optimizer: str = "sgd",
    learning_rate: float = 0.1,
    steps: int = 100,
    batch_size: int | None = None,
    record_at=None,
    gsc_samples: int = 16,
    gsc_probes: int = 8,
) -> History:
    """Train ``model`` from ``params`` on ``data`` and record diagnostics (module docstring).

    Args:
        model, params: any model and its initial params.
        data: a :class:`~jacobian_lab.Dataset` whose inputs fit the model.
        key: PRNG key for the mini-batches and the GSC probes (the params are given).
        optimizer: ``"sgd"`` (``optax.sgd``) or ``"adam"`` (``optax.adam``), defaults.
        learning_rate: step size.
        steps: optimizer steps.
        batch_size: examples per step, drawn without replacement afresh each step; ``None``:
            full batch.
        record_at: steps to record (default :func:`record_steps`).
        gsc_samples, gsc_probes: training inputs of the GSC profile (0: not recorded,
            NaN) and probes when it is estimated matrix-free.

    Returns:
        :class:`History`; the same inputs give the same numbers bit for bit.
    """
    hist = train_runs(
        model,
        jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], params),
        data,
        keys=jnp.asarray(check_key(key))[None],
        learning_rates=[learning_rate],
        optimizer=optimizer,
        steps=steps,
        batch_size=batch_size,
        record_at=record_at,
        gsc_samples=gsc_samples,
        gsc_probes=gsc_probes,
    )
    return jax.tree_util.tree_map(lambda a: a[0], hist)


def train_runs(
    model: Model,
    params: Params,
    data: Dataset,
    *,
    keys: jax.Array,
    learning_rates,
    optimizer: str = "sgd",
    steps: int = 100,
    batch_size: int | None = None,
    record_at=None,
    gsc_samples: int = 16,
    gsc_probes: int = 8,
) -> History:
    """``R`` runs of :func:`train` at once under ``vmap``, one compiled program for all.

    Args:
        params: the initial params of each run, stacked on a leading axis ``R`` (e.g.
            ``jax.vmap(model.init)(seed_keys)``, repeated for each learning rate).
        keys: ``(R,)`` PRNG keys (``(R, 2)`` raw keys), one per run.
        learning_rates: ``(R,)`` one per run (traced: changing them does not recompile).
        optimizer: one name for all runs, or one per run (SGD and Adam runs then share
            one compiled program).

    Other arguments as in :func:`train`.

    Returns:
        :class:`History` with a leading axis ``R`` on every field.
    """
    lrs = jnp.asarray(learning_rates, dtype=jnp.float32).reshape(-1)
    runs = lrs.shape[0]
    per_run = [optimizer] * runs if isinstance(optimizer, str) else list(optimizer)
    bad = [o for o in per_run if o not in OPTIMIZERS]
    if bad or len(per_run) != runs:
        raise ValueError(
            f"optimizer must be one of {tuple(OPTIMIZERS)} or a sequence of them, one per "
            f"run ({runs}), got {optimizer!r}"
        )
    names = tuple(sorted(set(per_run)))
    which = jnp.asarray([names.index(o) for o in per_run], jnp.int32)
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    check_data(model, data, batch_size)
    check_trainable(params)
    check_head(model, params, data, runs)
    keys = jnp.asarray(keys)
    leads = {int(a.shape[0]) for a in jax.tree_util.tree_leaves(params)}
    if leads != {runs} or keys.shape[0] != runs:
        raise ValueError(
            f"params (leading axes {sorted(leads)}), keys ({keys.shape[0]}) and "
            f"learning_rates ({runs}) must have the same number of runs"
        )
    if not bool(jnp.all(jnp.isfinite(lrs) & (lrs > 0))):
        raise ValueError(f"learning rates must be positive and finite, got {lrs.tolist()}")
    for name, value in (("gsc_samples", gsc_samples), ("gsc_probes", gsc_probes)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    gsc_samples = min(int(gsc_samples), data.x_train.shape[0])
    dtype = compute_dtype(model)
    arrays = tuple(
        jnp.asarray(a, dtype if i % 2 == 0 else jnp.int32) for i, a in enumerate(data[:4])
    )
    hist = _train_runs(
        model,
        names,
        steps,
        batch_size,
        record_steps(steps, record_at),
        gsc_samples,
        int(gsc_probes),
        data.num_classes,
        params,
        keys,
        lrs,
        which,
        arrays,
    )
    if not is_traced(hist.train_loss):
        bad = ~np.isfinite(np.asarray(hist.train_loss)).all(axis=-1)
        if bad.any():
            warnings.warn(
                f"training loss became inf or NaN in run(s) {np.flatnonzero(bad).tolist()} of "
                f"{runs} (learning rates {np.asarray(lrs)[bad].tolist()}): the run diverged, "
                "or the model's output at initialization is zero or not finite",
                RuntimeWarning,
                stacklevel=2,
            )
    return hist


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))
def _train_runs(
    model,
    names,
    steps,
    batch_size,
    record_at,
    gsc_samples,
    gsc_probes,
    classes,
    params,
    keys,
    lrs,
    which,
    arrays,
):
    x_train, y_train, x_test, y_test = arrays
    n = x_train.shape[0]

    def one_run(params, key, lr, which):
        batch_key, probe_key = jax.random.split(key)
        f0 = model_outputs(model, params, x_train)
        scale = 1.0 / jnp.sqrt(jnp.mean(jnp.square(f0)))
        head = {"W": jnp.zeros((f0.shape[1], classes), f0.dtype), "b": jnp.zeros(classes, f0.dtype)}
        opt = _optimizer(names, lr, which)
        both = (params, head)

        def loss(both, x, y):
            z = logits(model, *both, x, readout_scale=scale)
            return optax.softmax_cross_entropy_with_integer_labels(z, y).mean(), z

        def step(t, carry):
            both, state = carry
            if batch_size is None:
                x, y = x_train, y_train
            else:
                idx = jax.random.permutation(jax.random.fold_in(batch_key, t), n)[:batch_size]
                x, y = x_train[idx], y_train[idx]
            grads = jax.grad(loss, has_aux=True)(both, x, y)[0]
            grads = (model.tie_gradients(grads[0]), grads[1])  # tied copies stay equal
            updates, state = opt.update(grads, state, both)
            return optax.apply_updates(both, updates), state

        def measure(both, state, t):
            (value, z_train), grads = jax.value_and_grad(loss, has_aux=True)(both, x_train, y_train)
            grads = (model.tie_gradients(grads[0]), grads[1])
            updates, _ = opt.update(grads, state, both)
            p, h = both
            z_test = logits(model, p, h, x_test, readout_scale=scale)
            if gsc_samples:
                k = jax.random.fold_in(probe_key, t)
                g = gsc(model, p, x_train[:gsc_samples], key=k, num_probes=gsc_probes)
                g = g.mean(axis=0)
            else:
                g = jnp.full((model.num_layers + 1,), jnp.nan)
            p_norm = norm_per_layer(model, p)
            ratio = jnp.where(p_norm > 0, norm_per_layer(model, updates[0]) / p_norm, jnp.nan)
            grad_norm = jnp.where(p_norm > 0, norm_per_layer(model, grads[0]), jnp.nan)
            return {
                "train_loss": value,
                "train_accuracy": jnp.mean(jnp.argmax(z_train, 1) == y_train),
                "test_loss": optax.softmax_cross_entropy_with_integer_labels(z_test, y_test).mean(),
                "test_accuracy": jnp.mean(jnp.argmax(z_test, 1) == y_test),
                "gsc": g,
                "grad_norm": grad_norm,
                "update_ratio": ratio,
                "head_grad_norm": _tree_norm(grads[1]),
                "head_update_ratio": jnp.where(
                    _tree_norm(h) > 0, _tree_norm(updates[1]) / _tree_norm(h), jnp.nan
                ),
            }

        def segment(carry, bounds):
            start, stop = bounds
            carry = jax.lax.fori_loop(start, stop, step, carry)
            return carry, measure(*carry, stop)

        starts = jnp.asarray((0, *record_at[:-1]))
        (both, _), rec = jax.lax.scan(
            segment, (both, opt.init(both)), (starts, jnp.asarray(record_at))
        )
        return rec, both, scale

    rec, (params, head), scale = jax.vmap(one_run)(params, keys, lrs, which)
    steps_arr = jnp.broadcast_to(jnp.asarray(record_at), (lrs.shape[0], len(record_at)))
    return History(steps=steps_arr, params=params, head=head, readout_scale=scale, **rec)


def _optimizer(names: tuple[str, ...], lr, which) -> optax.GradientTransformation:
    """The optax optimizer ``names[which]`` at learning rate ``lr`` (both traced). With
    several names, every optimizer keeps its state and ``which`` selects the update, so
    runs of SGD and Adam share one compiled program (each run's update and state are
    exactly those of its own optimizer; the others' are computed and ignored)."""
    txs = [optax.inject_hyperparams(OPTIMIZERS[o])(learning_rate=lr) for o in names]
    if len(txs) == 1:
        return txs[0]

    def init(params):
        return tuple(t.init(params) for t in txs)

    def update(grads, state, params=None):
        outs = [t.update(grads, s, params) for t, s in zip(txs, state, strict=True)]
        chosen = jax.tree_util.tree_map(
            lambda *u: jnp.select([which == i for i in range(len(u))], u), *[u for u, _ in outs]
        )
        return chosen, tuple(s for _, s in outs)

    return optax.GradientTransformation(init, update)


def linearized_outputs(model: Model, params0: Params, params: Params, x, mask) -> jax.Array:
    """``f_0 (B, d_0)`` of ``model`` at ``params`` with the layers where ``mask`` holds
    replaced by their first-order expansion in the weights around ``params0``:
    ``f(theta_0, h) + d f / d theta (theta_0, h) (theta - theta_0)``, each at its actual
    input ``h`` (the reconstruction of the GSC paper's effective-depth experiment, see
    :mod:`jacobian_lab.experiments.trainability`).

    Args:
        params0, params: initial and trained params of ``model``.
        x: a batch ``(B, ...)``.
        mask: ``(L,)`` booleans in GSC-paper order (entry ``l``: the layer producing
            ``f_l``; ``l = 0`` is nearest the output).
    """
    mask = jnp.asarray(mask, bool)
    if any(isinstance(s, Repeat) and len(units_of(s)) > 1 for s in model.stages):
        raise NotImplementedError(
            "linearized_outputs does not yet take a Repeat of a group of units (e.g. "
            "jl.transformer's blocks): give a model whose repeated stages repeat one layer "
            "or block"
        )
    if mask.shape != (model.num_layers,):
        raise ValueError(f"mask must have shape ({model.num_layers},), got {mask.shape}")
    # the initial params and flags of each layer, per segment of the walk (its segments,
    # not the stages: a repeated stage whose first copy changes the shape is two segments)
    sample = jax.tree_util.tree_map(lambda a: a[0], x[None] if model.batch_coupled else x)
    outs = jax.eval_shape(lambda s: forward(model, params, s)[1], sample)
    sizes = [jax.tree_util.tree_leaves(seg)[0].shape[0] for seg in outs]
    from_input = mask[::-1]
    extras, seg, first = [], 0, 0
    for stage, p0 in zip(model.stages, model.stage_params(params0), strict=True):
        if not isinstance(stage, Repeat):
            p0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], p0)
        n, used = (stage.n if isinstance(stage, Repeat) else 1), 0
        while used < n:
            m, lo = sizes[seg], used
            part = jax.tree_util.tree_map(lambda a, lo=lo, m=m: a[lo : lo + m], p0)
            extras.append((part, from_input[first + lo : first + lo + m]))
            used, seg = used + m, seg + 1
        first += n

    def tap(unit, p, h, extra):
        p0, flag = extra
        delta = jax.tree_util.tree_map(jnp.subtract, p, p0)
        out0, tangent = jax.jvp(lambda q: apply_unit(unit, q, h), (p0,), (delta,))
        lin = jax.tree_util.tree_map(jnp.add, out0, tangent)
        exact = apply_unit(unit, p, h)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, a, b), lin, exact), None

    xs = x[None] if model.batch_coupled else x
    f0 = jax.vmap(lambda s: walk(model, params, s, tap, extras)[0])(xs)
    return f0.reshape(x.shape[0], -1)
