"""Convolutional networks at initialization: plain CNNs and residual CNNs on images.

A :class:`ConvNetwork` is a :class:`~jacobian_lab.networks.Network` whose "linear" step is
a 2-D convolution (stride 1, ``SAME`` zero padding, so every layer keeps the image size)
and whose inputs are images ``(B, H, W, C_in)`` (NHWC). Everything else is inherited:
the stages (stem, repeated units under ``lax.scan``), the layer order, normalization, residual
blocks, GSC-paper layer indexing. So every function that takes a ``Network`` takes a
``ConvNetwork``; a layer's value ``f_l`` is the image ``(H, W, channels)`` flattened in
row-major order (index ``(h * W + w) * C + c``), and one layer-to-layer Jacobian of a
CIFAR-shaped layer with 16 channels is ``16384 x 16384``. Use the matrix-free methods
(:func:`jacobian_lab.gsc` with ``method="auto"``, :func:`jacobian_lab.gsc_estimate`,
:func:`jacobian_lab.jacobian_spectrum`) at that size.

Weights: a kernel ``(k, k, C_in, C_out)`` (HWIO), applied as a cross-correlation; fan-in is
``k^2 C_in``. Initializers (``weight_init``):
    ``"gaussian"``: i.i.d. N(0, sigma_w^2 / fan_in);
    ``"he"``, ``"lecun"``: Gaussian with sigma_w^2 = 2 or 1;
    ``"orthogonal"``: sigma_w times a Haar (semi-)orthogonal matrix of shape
        ``(C_out, k^2 C_in)``, reshaped to the kernel (Saxe et al.);
    ``"delta_orthogonal"``: every tap zero except the centre, which is sigma_w times a Haar
        (semi-)orthogonal ``C_in x C_out`` matrix (Xiao et al., arXiv 1806.05393). A linear
        delta-orthogonal layer is then an exact isometry (times sigma_w) on images with
        ``C_out >= C_in``.

Normalization: ``"layer"`` normalizes each example over ``(H, W, C)``; ``"batch"`` each
channel over ``(B, H, W)`` with batch statistics (the network is then a function of the
whole batch, as for MLPs).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jacobian_lab.initializers import effective_sigma_w, normal, orthogonal
from jacobian_lab.model import Params
from jacobian_lab.networks import Network, residual_fields, validate

CONV_INITIALIZERS = ("gaussian", "he", "lecun", "orthogonal", "delta_orthogonal")


@dataclass(frozen=True, kw_only=True)
class ConvNetwork(Network):
    """A (residual) CNN at initialization; build it with :func:`convnet` or
    :func:`resconvnet`. ``width`` is the number of channels, ``in_dim`` the input's
    channels."""

    image_size: int = 32
    kernel_size: int = 3

    def __post_init__(self) -> None:
        validate(self, CONV_INITIALIZERS, ("image_size", "kernel_size"))
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a centred tap), got {self.kernel_size}")

    @property
    def channels(self) -> int:
        """Channels of every hidden layer (``width``)."""
        return self.width

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one input image ``(H, W, C_in)``."""
        return (self.image_size, self.image_size, self.input_dim)

    @property
    def example_ndim(self) -> int:
        """Axes of one example (an image: 3)."""
        return 3

    @property
    def example_shape(self) -> tuple[int, int, int]:
        """Shape of one input image ``(H, W, C_in)``."""
        return self.image_shape

    @property
    def hidden_shape(self) -> tuple[int, int, int]:
        """Shape of one hidden image ``(H, W, channels)``."""
        return (self.image_size, self.image_size, self.width)

    def _linear(self, p: Params, h: jax.Array) -> jax.Array:
        one = h.ndim == 3  # one image; the driver's samples carry no batch axis
        h = h[None] if one else h
        dt = jnp.result_type(h, p["W"])  # promote as a matmul would
        out = jax.lax.conv_general_dilated(
            h.astype(dt),
            p["W"].astype(dt),
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        out = out + p["b"]
        return out[0] if one else out

    def _layer_params(self, key, fan_in: int, fan_out: int, paired_input: bool) -> Params:
        k_w, k_b = jax.random.split(key)
        dtype = jnp.dtype(self.dtype)
        W = conv_kernel(
            k_w, self.weight_init, self.kernel_size, fan_in, fan_out, self.sigma_w, dtype
        )
        return {"W": W, "b": self.sigma_b * normal(k_b, (fan_out,), dtype)}


def conv_kernel(
    key: jax.Array,
    init: str,
    kernel_size: int,
    c_in: int,
    c_out: int,
    sigma_w: float = 1.0,
    dtype=jnp.float32,
) -> jax.Array:
    """Draw one convolution kernel ``(k, k, c_in, c_out)`` (HWIO); see the module docstring
    for the initializers."""
    k = kernel_size
    fan_in = k * k * c_in
    if init == "delta_orthogonal":
        centre = orthogonal(key, (c_in, c_out), sigma_w, dtype)
        return jnp.zeros((k, k, c_in, c_out), dtype).at[k // 2, k // 2].set(centre)
    if init == "orthogonal":
        M = orthogonal(key, (c_out, fan_in), sigma_w, dtype)
        return M.T.reshape(k, k, c_in, c_out)
    scale = effective_sigma_w(init, sigma_w, fan_in, c_out)
    if init not in CONV_INITIALIZERS:
        raise ValueError(
            f"unknown conv init {init!r}; expected one of: {', '.join(CONV_INITIALIZERS)}"
        )
    return scale / fan_in**0.5 * normal(key, (k, k, c_in, c_out), dtype)


def convnet(
    depth: int,
    channels: int,
    activation: str,
    *,
    image_size: int = 32,
    in_channels: int = 3,
    kernel_size: int = 3,
    norm: str = "none",
    order: str = "linear-norm-act",
    weight_init: str = "he",
    sigma_w: float = 1.0,
    sigma_b: float = 0.0,
    dtype: str = "float32",
    name: str = "",
) -> ConvNetwork:
    """A plain CNN of ``depth`` conv layers (the first maps ``in_channels`` to
    ``channels``), each conv -> norm -> activation in the order given, on
    ``image_size x image_size`` images.

    Args:
        weight_init: one of :data:`CONV_INITIALIZERS` (default He); ``sigma_w`` scales
            ``"gaussian"``, ``"orthogonal"`` and ``"delta_orthogonal"``.

    Other arguments as in :func:`jacobian_lab.mlp`.
    """
    fields = locals()  # every argument is the field of that name, but these two
    return ConvNetwork(width=fields.pop("channels"), in_dim=fields.pop("in_channels"), **fields)


def resconvnet(
    num_blocks: int | None = None,
    channels: int | None = None,
    activation: str | None = None,
    *,
    block_layers: int = 2,
    residual_scale: float = 1.0,
    block_order: str = "pre",
    image_size: int = 32,
    in_channels: int = 3,
    kernel_size: int = 3,
    norm: str = "none",
    order: str = "norm-act-linear",
    weight_init: str = "he",
    sigma_w: float = 1.0,
    sigma_b: float = 0.0,
    dtype: str = "float32",
    name: str = "",
    depth: int | None = None,
) -> ConvNetwork:
    """A residual CNN: a conv stem (``in_channels -> channels``, no activation), then
    ``num_blocks`` blocks ``f -> f + residual_scale * r(f)`` whose branch is
    ``block_layers`` conv layers (default pre-activation order norm -> act -> conv, He et
    al. 2016). Arguments as in :func:`convnet` and :func:`jacobian_lab.resmlp` (``depth``
    is the deprecated alias of ``num_blocks``)."""
    fields = residual_fields("resconvnet", locals(), "channels")  # as in convnet
    return ConvNetwork(width=fields.pop("channels"), in_dim=fields.pop("in_channels"), **fields)
