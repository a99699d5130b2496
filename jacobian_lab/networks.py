"""Fully connected networks at initialization: plain MLPs and residual MLPs.

A :class:`Network` is a frozen, hashable description plus a params pytree made by
``net.init(key)``. It is a :class:`~jacobian_lab.model.Model` whose stages are::

    plain MLP, depth dense layers:      Layer(dense)          in_dim -> width
                                        Repeat(Layer(dense), depth - 1)
    residual MLP, num_blocks blocks:    Layer(linear)         in_dim -> width (the stem)
                                        Repeat(Block(branch, post), num_blocks)

The repeated stage runs under ``lax.scan`` over stacked params, so compile time does not
grow with depth. A block's output is ``f + alpha * r(f)`` (``block_order="pre"``, identity
stream) or ``act(f + alpha * r(f))`` (``block_order="post"``, the original ResNet order);
the branch ``r`` is ``block_layers`` dense layers and ``alpha = residual_scale``.

A **dense layer** applies ``"linear"`` (``h @ W.T + b``), ``"norm"`` and ``"act"`` in the
order given by ``order`` (default ``"linear-norm-act"``; ``"norm-act-linear"`` is the
pre-activation order). With ``norm="none"`` the ``"norm"`` step is skipped.

Normalization has no learnable affine part (at initialization it is the identity):
    ``"layer"``: each example's features to mean 0, variance 1;
    ``"batch"``: each feature to mean 0, variance 1 over the batch, with *batch
    statistics*. The network is then a function of the whole batch, and its Jacobian is
    taken with respect to the whole batch (``(B*width) x (B*width)``): one sample is a
    batch. ``net.batch_coupled`` says which case holds.

Layer outputs use the GSC paper's indexing (:mod:`jacobian_lab.model`): ``f_{L-1}`` is
the stem's output. The paper reserves ``f_0`` for the error (loss) layer; jacobian_lab
measures networks without a loss, so its ``f_0`` is the prediction layer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property, partial

import jax
import jax.numpy as jnp

from jacobian_lab.activations import get_activation
from jacobian_lab.checks import check_memory
from jacobian_lab.initializers import INITIALIZERS, normal, weight_matrix
from jacobian_lab.model import Block, Layer, Model, Params, Repeat, apply_batch, forward, walk

NORMS = ("none", "layer", "batch")
STEPS = ("linear", "norm", "act")
BLOCK_ORDERS = ("pre", "post")


@partial(jax.jit, static_argnums=0)
def _activations(net, params, x):
    one = lambda v: jnp.concatenate(forward(net, params, v)[1])[::-1]  # noqa: E731
    if net.batch_coupled:
        return one(x)
    return jnp.moveaxis(jax.vmap(one)(x), 0, 1)


@partial(jax.jit, static_argnums=0)
def _activations_and_preactivations(net, params, x):
    def one(v):
        tap = lambda unit, p, h, _: (lambda o: (o[0], o))(unit.preactivation(p, h))  # noqa: E731
        records = walk(net, params, v, tap)[1]
        return tuple(jnp.concatenate(f)[::-1] for f in zip(*records, strict=True))

    if net.batch_coupled:
        return one(x)
    return tuple(jnp.moveaxis(a, 0, 1) for a in jax.vmap(one)(x))


@partial(jax.jit, static_argnums=0)
def _draw(net, key):
    """One compiled program per network draws all its params (eagerly, every layer's
    draws and scalings would each compile a program of their own)."""
    return net.draw(key)


@dataclass(frozen=True, kw_only=True)
class Network(Model):
    """Description of a (residual) MLP at initialization; build it with :func:`mlp` or
    :func:`resmlp`, which document the fields. ``depth`` counts the dense layers of a
    plain network, ``num_blocks`` the blocks of a residual one (the other is 0)."""

    width: int
    activation: str
    depth: int = 0
    num_blocks: int = 0
    in_dim: int | None = None
    norm: str = "none"
    order: str = "linear-norm-act"
    weight_init: str = "gaussian"
    sigma_w: float = 1.0
    sigma_b: float = 0.0
    block_layers: int = 0
    residual_scale: float = 1.0
    block_order: str = "pre"
    norm_eps: float = 1e-5
    dtype: str = "float32"
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        validate(self)

    # -- structure ---------------------------------------------------------------------
    @property
    def input_dim(self) -> int:
        """Width of the input ``x`` (``in_dim``, defaulting to ``width``)."""
        return self.width if self.in_dim is None else self.in_dim

    @property
    def residual(self) -> bool:
        """True for a residual network: its units are blocks."""
        return self.num_blocks > 0

    @property
    def num_units(self) -> int:
        """Number of repeated units: ``depth - 1`` dense layers, or ``num_blocks``."""
        return self.num_blocks if self.residual else self.depth - 1

    @property
    def example_ndim(self) -> int:
        """Axes of one example (a feature vector: 1)."""
        return 1

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return (self.input_dim,)

    @property
    def batch_coupled(self) -> bool:
        """True for batch norm: outputs depend on the whole batch."""
        return self.norm == "batch"

    @cached_property
    def stages(self) -> tuple:
        """The stages (see the module docstring)."""
        if self.residual:
            post = self.post_activation if self.block_order == "post" else None
            unit = Block(self.branch, None, post, self.branch_preactivation)
            return (Layer(self._linear), Repeat(unit, self.num_blocks))
        dense = Layer(self.dense, self.dense_with_preactivation)
        return (dense,) if self.depth == 1 else (dense, Repeat(dense, self.depth - 1))

    @cached_property
    def names(self) -> tuple[str, ...]:
        """One name per layer output, from the input."""
        if self.residual:
            return ("stem", *(f"block{i}" for i in range(1, self.num_blocks + 1)))
        return tuple(f"dense{i}" for i in range(1, self.depth + 1))

    def stage_params(self, params: Params) -> tuple:
        return (params["stem"], params["units"]) if self.num_units else (params["stem"],)

    @cached_property
    def params_spec(self):
        """Shapes and dtypes of :meth:`init`'s params (nothing is drawn)."""
        return jax.eval_shape(self.init, jax.random.PRNGKey(0))

    def samples(self, x: jax.Array) -> jax.Array:
        if self.batch_coupled:
            xs = x[None] if x.ndim == self.example_ndim + 1 else x
            if xs.ndim != self.example_ndim + 2:
                raise ValueError(
                    "a batch-norm network takes one batch (B, *example_shape) or S batches "
                    f"(S, B, *example_shape), got {tuple(x.shape)}"
                )
            self.check_input(xs[0])
            return xs
        self.check_input(x)
        return x

    # -- parameters ----------------------------------------------------------------------
    def init(self, key: jax.Array) -> Params:
        """Draw parameters: ``{"stem": {"W": (width, in_dim), "b": (width,)},
        "units": {"W": (U, [k,] width, width), "b": (U, [k,] width)}}`` with U =
        ``num_units`` and k = ``block_layers`` for residual networks."""
        dtype = jnp.dtype(self.dtype)
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError(
                "dtype='float64' needs 64-bit JAX: call jax.config.update('jax_enable_x64', "
                "True) at start-up, set JAX_ENABLE_X64=1, or use `with jax.enable_x64(True):`"
            )
        n, d = self.width, self.input_dim
        per_unit = self.block_layers if self.residual else 1
        one = lambda fan_in: jax.eval_shape(  # noqa: E731
            lambda k: self._layer_params(k, fan_in, n, True), jax.random.PRNGKey(0)
        )
        size = lambda tree: sum(a.size for a in jax.tree_util.tree_leaves(tree))  # noqa: E731
        count = size(one(d)) + self.num_units * per_unit * size(one(n))
        check_memory(
            count * dtype.itemsize,
            f"the params of this {type(self).__name__} ({count:.3g} numbers) need",
            "choose a smaller depth, num_blocks or width",
        )
        return _draw(self, key)

    def draw(self, key: jax.Array) -> Params:
        """The draw of :meth:`init`, without its checks (traceable)."""
        n, d = self.width, self.input_dim
        per_unit = self.block_layers if self.residual else 1
        k_stem, k_units = jax.random.split(key)
        stem = self._layer_params(k_stem, d, n, paired_input=False)
        keys = jax.random.split(k_units, self.num_units * per_unit)
        units = jax.vmap(lambda k: self._layer_params(k, n, n, True))(keys)
        if self.residual:
            units = jax.tree_util.tree_map(
                lambda a: a.reshape(self.num_units, per_unit, *a.shape[1:]), units
            )
        return {"stem": stem, "units": units}

    # -- layers (on one sample, or a batch with a leading axis) -------------------------
    def dense_with_preactivation(self, p: Params, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One dense layer's output and the value fed into its nonlinearity."""
        phi = get_activation(self.activation)
        pre = h
        for step in self.order.split("-"):
            if step == "linear":
                h = self._linear(p, h)
            elif step == "act":
                pre = h
                h = phi(h)
            elif self.norm != "none":
                h = normalize(h, self._norm_axes(h), self.norm_eps)
        return h, pre

    def dense(self, p: Params, h: jax.Array) -> jax.Array:
        """One dense layer on ``h`` (one example, or a batch ``(B, ...)``)."""
        return self.dense_with_preactivation(p, h)[0]

    def branch(self, p: Params, h: jax.Array) -> jax.Array:
        """The scaled residual branch ``alpha * r(h)`` of one block with params ``p``
        (stacked over its ``block_layers`` layers)."""
        r, _ = jax.lax.scan(lambda c, q: (self.dense(q, c), None), h, p)
        return self.residual_scale * r

    def branch_preactivation(self, p: Params, h: jax.Array) -> jax.Array:
        """The value fed into the nonlinearity of the branch's last dense layer."""
        _, pres = jax.lax.scan(lambda c, q: self.dense_with_preactivation(q, c), h, p)
        return pres[-1]

    def stem(self, params: Params, x: jax.Array) -> jax.Array:
        """The stem on ``x``: the first dense layer, or a ResNet's linear projection."""
        if self.residual:
            return self._linear(params["stem"], x)
        return self.dense(params["stem"], x)

    def post_activation(self, unit_params: Params, z: jax.Array) -> jax.Array:
        """A post-activation block's activation on ``z = f + alpha r(f)`` (no params)."""
        return get_activation(self.activation)(z)

    def unit(self, unit_params: Params, h: jax.Array) -> jax.Array:
        """One repeated unit (dense layer or residual block) on ``h``."""
        if not self.residual:
            return self.dense(unit_params, h)
        skip, branch = self.block_parts(unit_params, h)
        z = skip + branch
        return get_activation(self.activation)(z) if self.block_order == "post" else z

    def block_parts(self, unit_params: Params, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Skip and (scaled) branch of one residual block: ``(f, alpha * r(f))``; the
        block's output is their sum (then the activation when ``block_order == "post"``)."""
        if not self.residual:
            raise ValueError("block_parts needs a residual network (resmlp)")
        return h, self.branch(unit_params, h)

    def _linear(self, p: Params, h: jax.Array) -> jax.Array:
        return h @ p["W"].T + p["b"]

    def _norm_axes(self, h: jax.Array) -> tuple[int, ...]:
        """Batch norm: every axis but the features (the batch, and an image's pixels);
        layer norm: the example's own axes."""
        if self.batch_coupled:
            return tuple(range(h.ndim - 1))
        return tuple(range(h.ndim - self.example_ndim, h.ndim))

    def _layer_params(self, key, fan_in: int, fan_out: int, paired_input: bool) -> Params:
        k_w, k_b = jax.random.split(key)
        dtype = jnp.dtype(self.dtype)
        W = weight_matrix(
            k_w,
            self.weight_init,
            fan_in,
            fan_out,
            sigma_w=self.sigma_w,
            paired_input=paired_input,
            dtype=dtype,
        )
        return {"W": W, "b": self.sigma_b * normal(k_b, (fan_out,), dtype)}

    # -- forward on a batch --------------------------------------------------------------
    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        """Network output ``f_0`` for a batch ``x`` of shape ``(B, *example_shape)``."""
        self.check_input(x)
        return apply_batch(self, params, x)

    def activations(self, params: Params, x: jax.Array) -> jax.Array:
        """Every layer's output for a batch ``x`` of shape ``(B, *example_shape)``.

        Returns:
            Array ``(L, B, *hidden_shape)`` in the GSC paper's indexing: ``acts[l] = f_l``,
            so ``acts[0]`` is the network output and ``acts[L-1]`` the stem's output
            (``f_L = x`` itself is not repeated). ``L = num_layers``.
        """
        self.check_input(x)
        return _activations(self, params, x)

    def preactivations(self, params: Params, x: jax.Array) -> jax.Array:
        """The values fed into each dense layer's nonlinearity, for a plain network:
        ``(L, B, *hidden_shape)``, GSC-paper indexing. Their spread across inputs
        measures a collapsing domain."""
        return self.activations_and_preactivations(params, x)[1]

    def activations_and_preactivations(
        self, params: Params, x: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """:meth:`activations` and :meth:`preactivations` of a plain network from one
        forward pass: two arrays ``(L, B, *hidden_shape)``, GSC-paper indexing."""
        if self.residual:
            raise ValueError(
                "preactivations is defined for plain networks; a residual network's stream "
                "is net.activations(params, x)"
            )
        self.check_input(x)
        return _activations_and_preactivations(self, params, x)

    @property
    def hidden_shape(self) -> tuple[int, ...]:
        """Shape of one example's hidden layer output."""
        return (self.width,)

    def check_input(self, x: jax.Array) -> None:
        """Raise ``ValueError`` unless ``x`` is a batch ``(B, *example_shape)``."""
        if x.ndim != self.example_ndim + 1 or tuple(x.shape[1:]) != self.example_shape:
            shape = ", ".join(map(str, self.example_shape))
            raise ValueError(
                f"expected a batch of inputs of shape (batch, {shape}), got "
                f"{tuple(x.shape)}; for one input use x[None]"
            )
        if self.batch_coupled and x.shape[0] < 2:
            raise ValueError("batch norm needs a batch of at least 2 inputs")


def normalize(h: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
    """``h`` centred and scaled to unit variance over ``axes`` (no affine part)."""
    centred = h - jnp.mean(h, axis=axes, keepdims=True)
    # c * c, not c ** 2 or jnp.square: with jax/jaxlib 0.10.2 on CPU, jit(vmap(jacfwd(.)))
    # of a normalization written with a square miscompiles at batch x width >= ~4096 and
    # returns wrong Jacobians for every batch element but the first (seen at width 256,
    # batch 16); tests/test_layered.py guards this.
    var = jnp.mean(centred * centred, axis=axes, keepdims=True)
    return centred / jnp.sqrt(var + eps)


def validate(net: Network, initializers: tuple[str, ...] = INITIALIZERS, positive=()) -> None:
    """Raise ``ValueError`` naming the first field of ``net`` that is out of range
    (``positive``: names of further fields that must be positive integers)."""
    get_activation(net.activation)
    count = ("num_blocks", net.num_blocks) if net.block_layers else ("depth", net.depth)
    more = ((name, getattr(net, name)) for name in positive)
    for name, value in (count, ("width", net.width), ("in_dim", net.input_dim), *more):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if net.block_layers and net.depth or not net.block_layers and net.num_blocks:
        raise ValueError(
            "give depth (dense layers) for a plain network, or num_blocks with block_layers "
            ">= 1 for a residual one"
        )
    if net.norm not in NORMS:
        raise ValueError(f"unknown norm {net.norm!r}; expected one of: {', '.join(NORMS)}")
    if net.weight_init not in initializers:
        raise ValueError(
            f"unknown weight_init {net.weight_init!r} for a {type(net).__name__}; expected "
            f"one of: {', '.join(initializers)}"
        )
    steps = net.order.split("-")
    if sorted(steps) != sorted(STEPS):
        raise ValueError(
            f"order must name each of linear, norm, act once, separated by '-', got {net.order!r}"
        )
    if net.weight_init == "looks_linear" and net.block_layers:
        raise ValueError("looks_linear initialization is defined for plain MLPs only")
    if net.block_layers < 0:
        raise ValueError(f"block_layers must be >= 0, got {net.block_layers}")
    if net.block_order not in BLOCK_ORDERS:
        raise ValueError(f"block_order must be 'pre' or 'post', got {net.block_order!r}")
    if net.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {net.dtype!r}")
    check_scales(net)


def check_scales(net) -> None:
    """Raise ``ValueError`` naming the first of ``sigma_w``, ``sigma_b`` (finite, >= 0),
    ``residual_scale`` (finite) and ``norm_eps`` (finite, >= 0) of ``net`` that is out of
    range: a NaN scale would give NaN weights and a NaN GSC only at measurement time."""
    rules = (
        ("sigma_w", 0.0, "a finite standard deviation scale >= 0"),
        ("sigma_b", 0.0, "a finite standard deviation >= 0"),
        ("residual_scale", None, "a finite number"),
        ("norm_eps", 0.0, "a finite number >= 0 (added to the variance before the root)"),
    )
    for name, low, want in rules:
        if not hasattr(net, name):
            continue
        value = getattr(net, name)
        try:
            ok = math.isfinite(value) and (low is None or value >= low)
        except TypeError:
            ok = False
        if not ok or isinstance(value, bool):
            raise ValueError(f"{name} must be {want}, got {value!r}")


def residual_fields(fn: str, fields: dict, width: str) -> dict:
    """The arguments ``fields`` of the residual constructor ``fn`` without the deprecated
    alias ``depth`` of ``num_blocks`` (``DeprecationWarning`` when given), once
    ``num_blocks``, ``width`` (the name of the width argument) and ``activation`` are given
    (``TypeError``) and ``block_layers >= 1`` (``ValueError``)."""
    depth, num_blocks = fields.pop("depth"), fields["num_blocks"]
    if depth is not None:
        warnings.warn(
            f"{fn}(depth=...) is deprecated: a residual network's number of blocks is "
            "num_blocks (depth counts dense layers of plain networks)",
            DeprecationWarning,
            stacklevel=3,
        )
        if num_blocks is not None:
            raise ValueError(f"{fn}: give num_blocks only (depth is its deprecated alias)")
        fields["num_blocks"] = depth
    elif num_blocks is None:
        raise TypeError(f"{fn}() missing the number of blocks, num_blocks")
    if fields[width] is None or fields["activation"] is None:
        raise TypeError(f"{fn}() needs num_blocks, {width} and activation")
    if fields["block_layers"] < 1:
        raise ValueError(
            f"a residual network needs block_layers >= 1, got {fields['block_layers']}"
        )
    return fields


def mlp(
    depth: int,
    width: int,
    activation: str,
    *,
    in_dim: int | None = None,
    norm: str = "none",
    order: str = "linear-norm-act",
    weight_init: str = "gaussian",
    sigma_w: float = 1.0,
    sigma_b: float = 0.0,
    dtype: str = "float32",
    name: str = "",
) -> Network:
    """A plain MLP of ``depth`` dense layers of ``width`` units.

    Args:
        depth: number of dense layers (>= 1).
        width: units per layer.
        activation: a name from :data:`jacobian_lab.activations.ACTIVATIONS`.
        in_dim: input width (default ``width``).
        norm: ``"none"``, ``"layer"`` or ``"batch"`` (batch statistics).
        order: order of the ``linear``, ``norm`` and ``act`` steps in each layer.
        weight_init: a name from :data:`jacobian_lab.initializers.INITIALIZERS`.
        sigma_w, sigma_b: weights ``N(0, sigma_w^2 / fan_in)``, biases ``N(0, sigma_b^2)``.
        dtype: ``"float32"`` or ``"float64"`` (needs ``jax_enable_x64``).
        name: label used in tables and figures.
    """
    return Network(**locals())  # every argument is the field of that name


def resmlp(
    num_blocks: int | None = None,
    width: int | None = None,
    activation: str | None = None,
    *,
    block_layers: int = 2,
    residual_scale: float = 1.0,
    block_order: str = "pre",
    in_dim: int | None = None,
    norm: str = "none",
    order: str = "norm-act-linear",
    weight_init: str = "gaussian",
    sigma_w: float = 1.0,
    sigma_b: float = 0.0,
    dtype: str = "float32",
    name: str = "",
    depth: int | None = None,
) -> Network:
    """A residual MLP of ``num_blocks`` blocks, each ``f -> f + residual_scale * r(f)``,
    after a linear stem ``in_dim -> width``.

    Args:
        num_blocks: number of residual blocks (>= 1); ``L = num_blocks + 1`` layer outputs.
        block_layers: dense layers in each residual branch (>= 1).
        residual_scale: alpha multiplying the branch, e.g. ``num_blocks ** -0.5``.
        block_order: ``"pre"``: output ``f + alpha r(f)`` (identity stream);
            ``"post"``: output ``act(f + alpha r(f))``.
        order: step order inside each branch layer; the default ``"norm-act-linear"``
            is the pre-activation ResNet of He et al. (2016).
        depth: deprecated alias of ``num_blocks``.

    Other arguments as in :func:`mlp`.
    """
    return Network(**residual_fields("resmlp", locals(), "width"))  # fields of these names
