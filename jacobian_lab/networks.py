"""Fully connected networks at initialization: plain MLPs and residual MLPs.

A network is a :class:`Network` (a frozen, hashable description) plus a params pytree made
by ``net.init(key)``. It is *layered*: a **stem** maps the input ``x`` (width ``in_dim``) to
the hidden width, then ``net.num_units`` identical **units** (plain layers, or residual
blocks) are applied under ``lax.scan`` over stacked parameters, so compile time does not
grow with depth.

    plain MLP (``block_layers == 0``), ``depth`` dense layers:
        stem = dense layer 1 (in_dim -> width), units = dense layers 2..depth.
    residual MLP (``block_layers >= 1``), ``depth`` residual blocks:
        stem = a linear projection in_dim -> width (weights drawn like every other layer),
        units = the blocks. Block output: ``f + alpha * r(f)`` (``block_order="pre"``,
        identity stream) or ``act(f + alpha * r(f))`` (``block_order="post"``, the
        original ResNet order), where the branch ``r`` is ``block_layers`` dense layers and
        ``alpha = residual_scale``.

A **dense layer** applies ``"linear"`` (``h @ W.T + b``), ``"norm"`` and ``"act"`` in the
order given by ``order`` (default ``"linear-norm-act"``; ``"norm-act-linear"`` is the
pre-activation order). With ``norm="none"`` the ``"norm"`` step is skipped.

Normalization has no learnable affine part (at initialization it is the identity):
    ``"layer"``: each example's features to mean 0, variance 1;
    ``"batch"``: each feature to mean 0, variance 1 over the batch, with *batch
    statistics*. The network is then a function of the whole batch, and its Jacobian is
    taken with respect to the whole batch (``(B*width) x (B*width)``), see
    :mod:`jacobian_lab.layered`. ``net.batch_coupled`` says which case holds.

Layer outputs use the GSC paper's indexing (Philipp, Song & Carbonell, arXiv 1712.05577),
which counts from the output towards the input: ``f_0`` is the network output, ``f_1`` the
layer below it, ..., ``f_{L-1}`` the stem's output and ``f_L = x`` the input, with
``L = net.num_layers``. The paper reserves ``f_0`` for the error (loss) layer; jacobian_lab
measures networks without a loss, so its ``f_0`` is the prediction layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from jacobian_lab.activations import get_activation
from jacobian_lab.initializers import INITIALIZERS, weight_matrix

Params = dict[str, Any]
NORMS = ("none", "layer", "batch")
STEPS = ("linear", "norm", "act")
BLOCK_ORDERS = ("pre", "post")


@dataclass(frozen=True)
class Network:
    """Description of a (residual) MLP at initialization; build it with :func:`mlp` or
    :func:`resmlp`, which document the fields."""

    depth: int
    width: int
    activation: str
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
        _validate(self)

    # -- structure ---------------------------------------------------------------------
    @property
    def input_dim(self) -> int:
        """Width of the input ``x`` (``in_dim``, defaulting to ``width``)."""
        return self.width if self.in_dim is None else self.in_dim

    @property
    def residual(self) -> bool:
        """True for a residual network (``block_layers >= 1``): its units are blocks."""
        return self.block_layers > 0

    @property
    def num_units(self) -> int:
        """Number of scanned units: ``depth - 1`` dense layers, or ``depth`` blocks."""
        return self.depth if self.residual else self.depth - 1

    @property
    def num_layers(self) -> int:
        """L: number of layer outputs above the input (stem + units); ``f_L = x``."""
        return self.num_units + 1

    @property
    def example_ndim(self) -> int:
        """Axes of one example (a feature vector: 1)."""
        return 1

    @property
    def batch_coupled(self) -> bool:
        """True for batch norm: outputs depend on the whole batch."""
        return self.norm == "batch"

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
        k_stem, k_units = jax.random.split(key)
        n, d = self.width, self.input_dim
        stem = self._layer_params(k_stem, d, n, paired_input=False)
        per_unit = self.block_layers if self.residual else 1
        keys = jax.random.split(k_units, self.num_units * per_unit)
        units = jax.vmap(lambda k: self._layer_params(k, n, n, True))(keys)
        if self.residual:
            units = jax.tree_util.tree_map(
                lambda a: a.reshape(self.num_units, per_unit, *a.shape[1:]), units
            )
        return {"stem": stem, "units": units}

    # -- forward -------------------------------------------------------------------------
    def stem(self, params: Params, x: jax.Array) -> jax.Array:
        """The stem on a batch ``x`` of shape ``(B, in_dim)``; returns ``(B, width)``."""
        if self.residual:
            return self._linear(params["stem"], x)
        return self._dense(params["stem"], x)

    def unit(self, unit_params: Params, h: jax.Array) -> jax.Array:
        """One unit (dense layer or residual block) on ``h`` of shape ``(B, width)``."""
        if not self.residual:
            return self._dense(unit_params, h)
        skip, branch = self.block_parts(unit_params, h)
        z = skip + branch
        return get_activation(self.activation)(z) if self.block_order == "post" else z

    def block_parts(self, unit_params: Params, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Skip and (scaled) branch of one residual block: ``(f, alpha * r(f))``, each of
        shape ``(B, width)``; the block's output is their sum (then the activation when
        ``block_order == "post"``)."""
        if not self.residual:
            raise ValueError("block_parts needs a residual network (block_layers >= 1)")

        def layer(carry, p):
            return self._dense(p, carry), None

        r, _ = jax.lax.scan(layer, h, unit_params)
        return h, self.residual_scale * r

    def activations(self, params: Params, x: jax.Array) -> jax.Array:
        """Every layer's output for a batch ``x`` of shape ``(B, in_dim)``.

        Returns:
            Array ``(L, B, width)`` in the GSC paper's indexing: ``acts[l] = f_l``, so
            ``acts[0]`` is the network output and ``acts[L-1]`` the stem's output
            (``f_L = x`` itself is not repeated). ``L = num_layers``.
        """
        self.check_input(x)
        h0 = self.stem(params, x)

        def step(h, p):
            h = self.unit(p, h)
            return h, h

        _, hs = jax.lax.scan(step, h0, params["units"])
        return jnp.concatenate([hs[::-1], h0[None]], axis=0)

    def preactivations(self, params: Params, x: jax.Array) -> jax.Array:
        """The values fed into each dense layer's nonlinearity, for a plain network.

        Returns:
            Array ``(L, B, width)`` in the GSC paper's indexing (``[0]`` belongs to the
            output layer, ``[L-1]`` to the first layer). These are the "pre-activations"
            whose spread across inputs measures a collapsing domain.
        """
        return self.activations_and_preactivations(params, x)[1]

    def activations_and_preactivations(
        self, params: Params, x: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """:meth:`activations` and :meth:`preactivations` of a plain network from one
        forward pass: two arrays ``(L, B, width)``, GSC-paper indexing."""
        if self.residual:
            raise ValueError(
                "preactivations is defined for plain networks; a residual network's stream "
                "is net.activations(params, x)"
            )
        self.check_input(x)
        h0, z0 = self._dense_with_preactivation(params["stem"], x)

        def step(h, p):
            h, z = self._dense_with_preactivation(p, h)
            return h, (h, z)

        _, (hs, zs) = jax.lax.scan(step, h0, params["units"])
        return (
            jnp.concatenate([hs[::-1], h0[None]], axis=0),
            jnp.concatenate([zs[::-1], z0[None]], axis=0),
        )

    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        """Network output ``f_0`` for a batch ``x`` of shape ``(B, in_dim)``; ``(B, width)``."""
        self.check_input(x)
        h, _ = jax.lax.scan(
            lambda h, p: (self.unit(p, h), None), self.stem(params, x), params["units"]
        )
        return h

    # -- internals -----------------------------------------------------------------------
    def _dense(self, p: Params, h: jax.Array) -> jax.Array:
        return self._dense_with_preactivation(p, h)[0]

    def _dense_with_preactivation(self, p: Params, h: jax.Array) -> tuple[jax.Array, jax.Array]:
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
                h = _normalize(h, axis=self._norm_axes(), eps=self.norm_eps)
        return h, pre

    def _linear(self, p: Params, h: jax.Array) -> jax.Array:
        return h @ p["W"].T + p["b"]

    def _norm_axes(self) -> int | tuple[int, ...]:
        """Axes normalized over: the batch (batch norm) or the features (layer norm)."""
        return 0 if self.batch_coupled else -1

    def _layer_params(self, key, fan_in: int, fan_out: int, paired_input: bool) -> Params:
        return _dense_params(key, self.weight_init, fan_in, fan_out, self, paired_input)

    def check_input(self, x: jax.Array) -> None:
        """Raise ``ValueError`` unless ``x`` is a batch ``(B, in_dim)`` this network takes."""
        if x.ndim != 2 or x.shape[-1] != self.input_dim:
            raise ValueError(
                f"expected a batch of inputs of shape (batch, {self.input_dim}), got "
                f"{tuple(x.shape)}; for one input use x[None]"
            )
        if self.batch_coupled and x.shape[0] < 2:
            raise ValueError("batch norm needs a batch of at least 2 inputs")


def _normalize(h: jax.Array, axis: int, eps: float) -> jax.Array:
    centred = h - jnp.mean(h, axis=axis, keepdims=True)
    # c * c, not c ** 2 or jnp.square: with jax/jaxlib 0.10.2 on CPU, jit(vmap(jacfwd(.)))
    # of a normalization written with a square miscompiles at batch x width >= ~4096 and
    # returns wrong Jacobians for every batch element but the first (seen at width 256,
    # batch 16); tests/test_layered.py guards this.
    var = jnp.mean(centred * centred, axis=axis, keepdims=True)
    return centred / jnp.sqrt(var + eps)


def _dense_params(key, init, fan_in, fan_out, net: Network, paired_input: bool) -> Params:
    k_w, k_b = jax.random.split(key)
    dtype = jnp.dtype(net.dtype)
    W = weight_matrix(
        k_w, init, fan_in, fan_out, sigma_w=net.sigma_w, paired_input=paired_input, dtype=dtype
    )
    b = net.sigma_b * jax.random.normal(k_b, (fan_out,), dtype)
    return {"W": W, "b": b}


def _validate(net: Network, initializers: tuple[str, ...] = INITIALIZERS) -> None:
    get_activation(net.activation)
    for name, value in (("depth", net.depth), ("width", net.width), ("in_dim", net.input_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
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
    return Network(
        depth,
        width,
        activation,
        in_dim,
        norm,
        order,
        weight_init,
        sigma_w,
        sigma_b,
        dtype=dtype,
        name=name,
    )


def resmlp(
    depth: int,
    width: int,
    activation: str,
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
) -> Network:
    """A residual MLP of ``depth`` blocks, each ``f -> f + residual_scale * r(f)``.

    Args:
        depth: number of residual blocks (>= 1).
        block_layers: dense layers in each residual branch (>= 1).
        residual_scale: alpha multiplying the branch, e.g. ``depth ** -0.5``.
        block_order: ``"pre"``: output ``f + alpha r(f)`` (identity stream);
            ``"post"``: output ``act(f + alpha r(f))``.
        order: step order inside each branch layer; the default ``"norm-act-linear"``
            is the pre-activation ResNet of He et al. (2016).
        Other arguments as in :func:`mlp`.
    """
    if block_layers < 1:
        raise ValueError(f"a residual network needs block_layers >= 1, got {block_layers}")
    return Network(
        depth,
        width,
        activation,
        in_dim,
        norm,
        order,
        weight_init,
        sigma_w,
        sigma_b,
        block_layers,
        residual_scale,
        block_order,
        dtype=dtype,
        name=name,
    )
