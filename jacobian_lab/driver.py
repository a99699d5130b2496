"""The forward driver: what every dense diagnostic reads, from one pass.

:func:`jacobian_lab.model.walk` runs any model on one sample (``lax.scan`` inside a
repeated stage) and hands every layer to a *tap*:

* :func:`trace` records what the dense diagnostics read, per sample and per layer: the
  flattened output, the Jacobian with respect to the layer below, the pre-activation, and
  for residual blocks the input, skip and branch with their Jacobians;
* :func:`jacobian_lab.model.forward` (the perturbation tap) runs the model with a
  perturbation added to every layer's output, so that one ``jax.vjp`` gives
  ``d f_0 / d f_l`` applied to a probe at every layer at once (the matrix-free
  estimators).

Records come per *segment*: a single layer or block gives a segment of one layer, a
repeated stage one segment of ``n`` layers (stacked by the scan), or ``n`` segments of one
when its copies change the shape of what they carry. Every field of a record has a leading
layer axis, in forward order; :func:`per_layer` joins a per-layer quantity over segments
and turns it into GSC-paper order (``f_0`` = output first). Layer outputs are flattened
with :func:`jax.flatten_util.ravel_pytree` (leaves in ``jax.tree_util`` order, each
row-major).
"""

from __future__ import annotations

from functools import wraps
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jacobian_lab.checks import is_traced, memory_checked
from jacobian_lab.model import (
    Layer,
    Model,
    Params,
    Tap,
    apply_unit,
    forward,
    require_float_arrays,
    walk,
)


class Record(NamedTuple):
    """What :func:`trace` keeps of each layer; every field has a leading layer axis ``n``
    (forward order within the segment), and a leading sample axis ``S`` once vmapped.
    Fields not asked for, or not defined for the layer, are ``None``.

    Fields:
        out: ``(n, d_out)``; the flattened layer output.
        jac: ``(n, d_out, d_in)``; its Jacobian with respect to the layer's input.
        pre: ``(n, d_pre)``; the value fed into the layer's nonlinearity (a block's:
            its branch's); NaN where the unit does not know it.
        inp: ``(n, d_in)``; the block's input ``h`` (blocks only).
        skip, branch: ``(n, d_out)``; ``s = skip(h)`` and ``r = branch(h)`` (blocks only).
        skip_jac: ``(n, d_z, d_in)``; ``d s / d h``, ``None`` for an identity skip.
        branch_jac: ``(n, d_z, d_in)``; ``d r / d h``.
        post_jac: ``(n, d_out, d_z)``; ``d post / d z`` at ``z = s + r``, ``None`` for a
            block without a post.
    """

    out: jax.Array
    jac: jax.Array | None = None
    pre: jax.Array | None = None
    inp: jax.Array | None = None
    skip: jax.Array | None = None
    branch: jax.Array | None = None
    skip_jac: jax.Array | None = None
    branch_jac: jax.Array | None = None
    post_jac: jax.Array | None = None


class Trace(NamedTuple):
    """One pass of :func:`trace`.

    Fields:
        x: ``(S, d_in)``; the flattened inputs ``f_L``.
        records: one :class:`Record` per segment, from the input to the output.
    """

    x: jax.Array
    records: tuple


# -- the dense record ------------------------------------------------------------------


def flat_jacobian(fn, flat: jax.Array):
    """``(J, out, aux)`` for ``fn(flat) -> (out, aux)`` with ``out`` any pytree:
    ``J = d ravel(out) / d flat`` of shape ``(size out, size flat)``, forward or reverse
    mode (whichever needs fewer passes), ``out`` and ``aux`` from the same pass."""

    def wrapped(v):
        out, aux = fn(v)
        require_float_arrays(out)
        return ravel_pytree(out)[0], (out, aux)

    m = jax.eval_shape(lambda v: wrapped(v)[0], flat).shape[0]
    jac = jax.jacfwd if flat.shape[0] <= m else jax.jacrev
    J, (out, aux) = jac(wrapped, has_aux=True)(flat)
    return J, out, aux


def _flat(tree) -> jax.Array:
    return ravel_pytree(tree)[0]


def _record_tap(jac: bool, blocks: bool, pre: bool) -> Tap:
    def value(fn, flat):
        if jac:
            return flat_jacobian(fn, flat)
        out, aux = fn(flat)
        require_float_arrays(out)
        return None, out, aux

    def unknown(out):  # a pre-activation the unit does not know: NaN, one per output
        return jnp.full_like(_flat(out), jnp.nan)

    def tap(unit, p, h, _):
        flat, unravel = ravel_pytree(h)
        if isinstance(unit, Layer):
            if pre and unit.preactivation is not None:
                J, out, z = value(lambda v: unit.preactivation(p, unravel(v)), flat)
                return out, Record(_flat(out), J, pre=_flat(z))
            J, out, _ = value(lambda v: (unit.apply(p, unravel(v)), None), flat)
            return out, Record(_flat(out), J, pre=unknown(out) if pre else None)
        pre_z = None
        if pre:
            pre_z = unknown(h) if unit.preactivation is None else _flat(unit.preactivation(p, h))
        if not blocks:
            J, out, _ = value(lambda v: (apply_unit(unit, p, unravel(v)), None), flat)
            return out, Record(_flat(out), J, pre=pre_z)
        J_r, r, _ = value(lambda v: (unit.branch(p, unravel(v)), None), flat)
        if unit.skip is None:
            J_s, s = None, h
        else:
            J_s, s, _ = value(lambda v: (unit.skip(p, unravel(v)), None), flat)
        z = jax.tree_util.tree_map(jnp.add, s, r)
        J = None
        if jac:
            J = (jnp.eye(flat.shape[0], dtype=J_r.dtype) if J_s is None else J_s) + J_r
        J_post = None
        if unit.post is None:
            out = z
        else:
            z_flat, unravel_z = ravel_pytree(z)
            J_post, out, _ = value(lambda v: (unit.post(p, unravel_z(v)), None), z_flat)
            J = None if J is None else J_post @ J
        return out, Record(_flat(out), J, pre_z, flat, _flat(s), _flat(r), J_s, J_r, J_post)

    return tap


_TRACE_STATIC = {"static_argnums": 0, "static_argnames": ("jac", "blocks", "pre")}


def _trace(
    model: Model, params, xs, *, jac: bool = True, blocks: bool = False, pre: bool = False
) -> Trace:
    """One pass over the samples ``xs`` (from ``model.samples(x)``), recording per layer
    its flattened output and, as asked, its Jacobian (``jac``), the residual blocks' parts
    (``blocks``) and the pre-activations (``pre``). See :class:`Record`.

    Cost with ``jac``: one forward-mode pass per layer with as many tangents as the layer
    has inputs (reverse mode where the output is smaller), memory ``S`` times the sum of
    the layers' Jacobian sizes.
    """
    tap = _record_tap(jac, blocks, pre)

    def one(x):
        _, records = walk(model, params, x, tap)
        return _flat(x), tuple(records)

    x_flat, records = jax.vmap(one)(xs)
    return Trace(x_flat, records)


trace = jax.jit(_trace, **_TRACE_STATIC)


def over_trace(*, static_argnums: tuple = (), memory: tuple[str, str] | None = None, **flags):
    """Decorator for a diagnostic written over one record: ``fn(model, tr, *args)``
    becomes ``fn(model, params, xs, *args)``, which runs :func:`trace` with ``flags`` and
    then ``fn`` under ``jax.jit`` (``model`` and ``static_argnums``, positions in ``fn``'s
    own signature, are static). With ``memory=(what, fix)`` both programs are
    :func:`~jacobian_lab.checks.memory_checked`: compiled first and refused with a
    ``MemoryError`` naming ``what`` and ``fix`` when their buffers cannot fit.

    The record is its own compiled program, so every diagnostic that reads the same
    record (say :func:`~jacobian_lab.gsc`, :func:`~jacobian_lab.gsc_matrix` and
    :func:`~jacobian_lab.block_jacobian_stats`, which read the layer Jacobians) shares
    it: the expensive compile, of the per-layer Jacobians, happens once per model and
    input shape, and each diagnostic compiles only its own reduction."""

    def wrap(fn):
        static = (0, *static_argnums)
        if memory is None:
            record, reduce = trace, jax.jit(fn, static_argnums=static)
        else:
            record = memory_checked(*memory, **_TRACE_STATIC)(_trace)
            reduce = memory_checked(*memory, static_argnums=static)(fn)

        @wraps(fn)
        def run(model, params, xs, *args):
            return reduce(model, record(model, params, xs, **flags), *args)

        return run

    return wrap


# -- per-layer bookkeeping, in GSC-paper order -----------------------------------------


def per_layer(values: list) -> jax.Array:
    """Join per-segment arrays ``(S, n_i, ...)`` (forward order) into ``(S, L, ...)`` in
    GSC-paper order (index ``l`` = ``f_l``, ``0`` = output)."""
    return jnp.concatenate(values, axis=1)[:, ::-1]


def scan_down(step, carry, jacs: list) -> jax.Array:
    """``step(carry, J) -> (carry, out)`` over the layer Jacobians of one sample from the
    output down (``jacs``: per segment ``(n, d_out, d_in)``, forward order): under
    ``lax.scan`` within a segment, one call for a segment of one layer (which may change
    the carry's shape). Returns the outputs ``(L, ...)``, output first."""
    outs = []
    for J in reversed(jacs):  # a Python loop over the few segments
        if J.shape[0] == 1:
            carry, out = step(carry, J[0])
            out = out[None]
        else:
            carry, out = jax.lax.scan(step, carry, J[::-1])
        outs.append(out)
    return jnp.concatenate(outs)


def log_norm(v: jax.Array, axis=-1) -> jax.Array:
    """``log ||v||`` over ``axis`` (an int or a tuple), computed on ``v / max|v|`` so that
    it neither overflows nor underflows where the logarithm is representable; ``-inf`` for
    an exactly zero ``v``."""
    m = jnp.max(jnp.abs(v), axis=axis, keepdims=True)
    safe = jnp.where(m > 0, m, 1)
    return jnp.log(jnp.squeeze(safe, axis)) + 0.5 * jnp.log(jnp.sum((v / safe) ** 2, axis))


def norm(v: jax.Array, axis=-1) -> jax.Array:
    """``||v||`` over ``axis`` without overflow or underflow of the squares."""
    return jnp.exp(log_norm(v, axis))


def log_lengths(tr: Trace) -> jax.Array:
    """``(S, L+1)``: ``log ||f_l||`` for ``l = 0 .. L`` (``f_L = x``), see :func:`log_norm`."""
    hidden = per_layer([log_norm(r.out) for r in tr.records])
    return jnp.concatenate([hidden, log_norm(tr.x)[:, None]], axis=1)


def check_values(values: jax.Array, what: str) -> None:
    """Raise ``FloatingPointError`` naming ``what`` when ``values``, which must be positive
    and finite, holds inf, NaN or exact zeros (an overflow or underflow; outside ``jit``)."""
    if is_traced(values):
        return
    if not bool(jnp.all(jnp.isfinite(values))):
        raise FloatingPointError(f"{what} overflowed: not representable in {values.dtype}")
    if not bool(jnp.all(values > 0)):
        raise FloatingPointError(f"{what} underflowed to 0: not representable in {values.dtype}")


def check_lengths(log_len: jax.Array, model: Model) -> None:
    """Raise ``FloatingPointError`` when a layer output ``f_l`` (``log_len``: ``(S, L+1)``
    from :func:`log_lengths`) is exactly zero for some sample: every GSC divides by
    ``||f_l||``, so it is undefined there. Names the first such layer from the input.
    Does nothing under tracing."""
    if is_traced(log_len):
        return
    zero = np.asarray(jnp.any(jnp.isneginf(log_len), axis=0))
    if not zero.any():
        return
    l = int(np.flatnonzero(zero)[-1])
    s = int(np.argmax(np.isneginf(np.asarray(log_len[:, l]))))
    where = "the input x" if l == zero.shape[0] - 1 else model.layer_label(l)
    raise FloatingPointError(
        f"{where} is exactly zero for sample {s}: the GSC divides by ||f_l||, so it is "
        "undefined there (0/0). Causes: dead ReLU units, zero weights (sigma_w=0), a layer "
        "norm over one feature, or identical inputs in a batch-norm batch; or a value that "
        "underflowed (try float64)."
    )


def layer_sizes(tr: Trace) -> tuple[int, ...]:
    """Flat sizes ``(d_0, ..., d_L)`` of ``f_0 .. f_L`` (static)."""
    sizes = [int(r.out.shape[-1]) for r in tr.records for _ in range(r.out.shape[1])]
    return (*sizes[::-1], int(tr.x.shape[-1]))


def finite_layers(tr: Trace) -> jax.Array:
    """``(L,)`` booleans in GSC-paper order: whether layer ``f_l``'s output and every
    recorded Jacobian of it are finite for every sample."""

    def ok(r: Record):
        axes = lambda a: tuple(i for i in range(a.ndim) if i != 1)  # noqa: E731
        fields = [a for a in (r.out, r.jac, r.skip_jac, r.branch_jac, r.post_jac) if a is not None]
        good = [jnp.all(jnp.isfinite(a), axis=axes(a)) for a in fields]
        if r.pre is not None:  # NaN marks a pre-activation the unit does not know
            good.append(jnp.all(~jnp.isinf(r.pre), axis=axes(r.pre)))
        return jnp.all(jnp.stack(good), 0)

    return jnp.concatenate([ok(r) for r in tr.records])[::-1]


def check_finite(ok: jax.Array, model: Model) -> None:
    """Raise ``FloatingPointError`` unless every entry of ``ok`` (GSC-paper order, from
    :func:`finite_layers`) holds, naming the first bad layer counted from the input.
    Does nothing under tracing."""
    if is_traced(ok):
        return
    ok = np.asarray(ok)
    if ok.all():
        return
    first = int(np.flatnonzero(~ok)[-1])  # the largest index is the closest to the input
    raise FloatingPointError(
        f"the network went non-finite first at {model.layer_label(first)} (GSC-paper "
        f"indexing, f_0 = output, f_{ok.shape[0]} = input): its output or Jacobian holds "
        "inf or NaN. Try float64, a smaller depth or a smaller weight scale."
    )


def output_sizes(model: Model, params: Params, xs) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` flat sizes of every layer of one sample, from the input (no
    computation: shapes only)."""
    one = jax.tree_util.tree_map(lambda v: v[0], xs)
    outs = jax.eval_shape(lambda v: forward(model, params, v)[1], one)
    sizes = [
        sum(int(a.size) // int(a.shape[0]) for a in jax.tree_util.tree_leaves(seg))
        for seg in outs
        for _ in range(jax.tree_util.tree_leaves(seg)[0].shape[0])
    ]
    x_size = sum(int(a.size) for a in jax.tree_util.tree_leaves(one))
    return list(zip([x_size, *sizes[:-1]], sizes, strict=True))


# -- the public boundary: inputs and params checked once ---------------------------------


def compute_dtype(model: Model):
    """The dtype the model computes in (``None``: whatever the inputs are): a built-in
    network's ``dtype``, a chain's params' float dtype. Inputs are cast to it."""
    dt = getattr(model, "dtype", None)
    return None if dt is None else jnp.dtype(dt)


def _path(keys) -> str:
    return "params" + "".join(f"[{k!r}]" if isinstance(k, str | int) else str(k) for k in keys)


def _key_names(path) -> list:
    out = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            out.append(str(k))
    return out


def check_params(model: Model, params) -> None:
    """Raise ``ValueError`` unless ``params`` has the structure, shapes and dtypes of the
    params made for ``model``, naming the first entry that differs and what was expected."""
    spec = model.params_spec
    if spec is None:
        return
    fix = "pass the params made for this model (net.init(key), or those chain() returned)"
    if params is None:
        raise ValueError(f"params is None; {fix}")
    got, got_def = jax.tree_util.tree_flatten_with_path(params)
    want, want_def = jax.tree_util.tree_flatten_with_path(spec)
    if got_def != want_def:
        got_paths = {tuple(_key_names(p)) for p, _ in got}
        want_paths = [tuple(_key_names(p)) for p, _ in want]
        missing = [p for p in want_paths if p not in got_paths]
        extra = sorted(got_paths - set(want_paths), key=str)
        what = "has another structure"
        if missing or extra:
            entry = _path(missing[0] if missing else extra[0])[6:]
            what = f"has no entry {entry}" if missing else f"has an entry {entry} this model lacks"
        raise ValueError(
            f"params do not fit this {type(model).__name__}: params {what} (expected the "
            f"structure {want_def}); {fix}"
        )
    for (path, a), (_, s) in zip(got, want, strict=True):
        shape, dtype = jnp.shape(a), jnp.result_type(a)
        if shape != s.shape:
            raise ValueError(
                f"params do not fit this {type(model).__name__}: {_path(_key_names(path))} "
                f"has shape {shape}, expected {s.shape}; {fix}"
            )
        if dtype != s.dtype:
            raise ValueError(
                f"{_path(_key_names(path))} is {dtype} but this model computes in {s.dtype}: "
                f"{fix}, or cast them with jax.tree.map(lambda a: a.astype('{s.dtype}'), params)"
            )


HOST_CHECK_SIZE = 2**24
"""Params of at most this many numbers are checked on the host (no kernel to compile for
each new shape); larger ones by one compiled reduction on the device."""


@jax.jit
def _nonfinite_counts(arrays: list) -> list:
    return [jnp.sum(~jnp.isfinite(a)) for a in arrays]


def check_params_finite(params) -> None:
    """Raise ``ValueError`` naming the first params entry that holds inf or NaN (concrete
    params only; traced ones are skipped)."""
    entries = [
        (path, a)
        for path, a in jax.tree_util.tree_flatten_with_path(params)[0]
        if not is_traced(a) and hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.inexact)
    ]
    if not entries:
        return
    arrays = [a for _, a in entries]
    if sum(int(np.size(a)) for a in arrays) <= HOST_CHECK_SIZE:
        # numpy: no compilation per shape, and concrete params closed over by a caller's
        # jit are read, not staged
        counts = [int(np.count_nonzero(~np.isfinite(np.asarray(a)))) for a in arrays]
    else:
        with jax.ensure_compile_time_eval():
            counts = [int(c) for c in _nonfinite_counts(arrays)]
    for (path, a), bad in zip(entries, counts, strict=True):
        if bad:
            raise ValueError(
                f"{_path(_key_names(path))} holds inf or NaN ({bad} of {int(np.size(a))} "
                "entries): every diagnostic needs finite params (an inf bias can still give "
                "a finite-looking GSC); draw them again (net.init(key)) or check the run "
                "that produced them"
            )


def check_input_scale(v, dtype, name: str) -> None:
    """Raise ``ValueError`` when a row of ``v`` (its leading axis) has a nonzero largest
    magnitude within a factor ``1/eps`` of the smallest normal number of ``dtype`` (the
    dtype it is computed in): products in the first layer then fall where XLA flushes
    denormals to zero, which changes the result (inputs of 1e-36 moved a float32 ReLU
    network's GSC by 8.5%, and denormal inputs read as exactly zero). Checked on the values
    as given, before a cast that would flush them. Nothing under tracing."""
    if is_traced(v):
        return
    info = jnp.finfo(dtype)
    floor = float(info.tiny) / float(info.eps)
    values = np.asarray(v)  # numpy: a concrete x captured by a caller's jit is not staged
    if values.size == 0 or not np.issubdtype(values.dtype, np.floating):
        return
    top = np.max(np.abs(values.reshape(values.shape[0], -1)), axis=1)
    small = (top > 0) & (top < floor)
    if small.any():
        s = int(np.argmax(small))
        raise ValueError(
            f"{name}[{s}] has largest magnitude {float(top[s]):.3g}, within 1/eps of the "
            f"smallest normal {info.dtype} number ({float(info.tiny):.3g}): below {floor:.3g} "
            "the layers' products reach the range that XLA flushes to zero, which changes "
            "the result (and a denormal input would read as exactly zero). Rescale x (a "
            "positively homogeneous network's GSC does not change) or use float64"
        )


def _check_input_leaf(v, dtype, name: str):
    if not hasattr(v, "dtype") or not hasattr(v, "shape"):
        raise TypeError(
            f"{name} must be an array (jax or numpy), got {type(v).__name__}: use "
            f"jnp.asarray({name.split('[')[0]})"
        )
    if jnp.issubdtype(v.dtype, jnp.integer) or jnp.issubdtype(v.dtype, jnp.bool_):
        raise TypeError(
            f"{name} holds {v.dtype} values, but the analysis differentiates with respect "
            "to its input, which must be real floats. Token ids: read the whole language "
            "model with jl.chain(model, ids) and the analysis starts at the embedding's "
            "output; or pass that output (the embedded tokens) as x yourself"
        )
    if not jnp.issubdtype(v.dtype, jnp.floating):
        kind = "complex" if jnp.issubdtype(v.dtype, jnp.complexfloating) else str(v.dtype)
        raise TypeError(
            f"{name} must hold real floating-point numbers, got {kind}: cast it, e.g. "
            f"{name.split('[')[0]}.astype(jnp.float32)"
        )
    if v.ndim == 0:
        raise ValueError(
            f"{name} is a scalar, but inputs need a leading sample axis: give shape "
            "(S, *sample_shape), e.g. x[None] for one sample"
        )
    if v.shape[0] == 0:
        raise ValueError(
            f"{name} holds no samples (shape {tuple(v.shape)}): give at least one input "
            "along the leading axis"
        )
    check_input_scale(v, v.dtype if dtype is None else dtype, name)
    return v if dtype is None or v.dtype == dtype else v.astype(dtype)


def prepare(model: Model, params, x):
    """Check ``params`` against ``model`` and ``x`` as inputs (arrays of real floats, at
    least one sample, finite), cast ``x`` to the model's dtype (the model's dtype wins),
    and split it into samples (:meth:`Model.samples`). Every public diagnostic starts here.

    The ``(net, params, x)`` of every diagnostic: any model (built in, or a
    :func:`~jacobian_lab.chain`), its params (``net.init(key)``, or those ``chain``
    returned), and inputs with a leading sample axis: ``(B, in_dim)``, images
    ``(B, H, W, C)`` for a conv net, a pytree for a chain; a batch-norm model takes one
    batch ``(B, ...)`` or ``S`` batches ``(S, B, ...)`` (one sample is a batch).
    """
    check_params(model, params)
    check_params_finite(params)
    x = model.embed_inputs(params, x)
    dtype = compute_dtype(model)
    if getattr(model, "example_shape", None) is not None and not hasattr(x, "shape"):
        raise TypeError(
            f"x must be an array (jax or numpy) for this {type(model).__name__}, of shape "
            f"(batch, {', '.join(map(str, model.example_shape))}), got {type(x).__name__}"
            + (": use jnp.asarray(x)" if isinstance(x, list | tuple) else "")
        )
    leaves = jax.tree_util.tree_flatten_with_path(x)[0]
    if not leaves:
        raise ValueError("x holds no arrays")
    checked = [
        _check_input_leaf(v, dtype, "x" + "".join(f"[{k!r}]" for k in _key_names(p)))
        for p, v in leaves
    ]
    x = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(x), checked)
    xs = model.samples(x)
    for v in jax.tree_util.tree_leaves(xs):
        if is_traced(v):
            continue
        # numpy, not jnp: a concrete x captured by a caller's jit would be staged by jnp
        ok = np.all(np.isfinite(np.asarray(v).reshape(v.shape[0], -1)), axis=1)
        if not ok.all():
            s = int(np.argmin(ok))
            what = "batch" if model.batch_coupled else "sample"
            raise ValueError(
                f"x holds inf or NaN in {what} {s} of {ok.size}: the inputs must be finite "
                "(non-finite inputs are rejected before any layer runs)"
            )
    return xs
