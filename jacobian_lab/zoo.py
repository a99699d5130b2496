"""The architecture families of the GSC paper's experiments, by name.

Philipp, Song & Carbonell (arXiv 1712.05577) measure MLPs of depth 50 and width 100 with
ReLU, tanh and SeLU, each with no normalization, layer norm or batch norm; a ReLU network
with the looks-linear initialization; and the ResNet versions of these. The full text was
not available to this project (see docs/fidelity.md): the variance
choices and block layout below are the standard ones and are stated here so that results
can be compared knowing exactly what was run:

* plain ``"{act}"``, ``"layer-{act}"``, ``"batch-{act}"``: ``depth`` dense layers in the
  order linear -> norm -> activation, Gaussian weights with sigma_w^2 = 2 for ReLU (He)
  and 1 for tanh and SeLU (LeCun), zero biases;
* ``"looks-linear-relu"``: ReLU with the looks-linear orthogonal initialization;
* ``"resnet-{act}"``, ``"resnet-layer-{act}"``, ``"resnet-batch-{act}"``: ``depth / 2``
  pre-activation blocks of two layers (norm -> activation -> linear), identity skip,
  residual scale 1, same weight variances; so the number of dense layers is ``depth``.
"""

from __future__ import annotations

import warnings

from jacobian_lab.networks import Network, mlp, resmlp

ACTIVATION_SIGMA_W = {"relu": 2.0**0.5, "tanh": 1.0, "selu": 1.0}
_NORM_PREFIX = {"none": "", "layer": "layer-", "batch": "batch-"}


def _names() -> list[tuple[str, str, str, str]]:
    """``(name, activation, norm, kind)`` of every family, in report order."""
    kinds = [(p + a, a, n) for a in ACTIVATION_SIGMA_W for n, p in _NORM_PREFIX.items()]
    plain = [(name, a, n, "plain") for name, a, n in kinds]
    resnets = [("resnet-" + name, a, n, "resnet") for name, a, n in kinds]
    return [*plain, ("looks-linear-relu", "relu", "none", "looks-linear"), *resnets]


def _check_depth(name: str, depth) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer (dense layers), got {depth!r}")
    if name.startswith("resnet-") and depth % 2:
        raise ValueError(
            f"architecture {name!r}: depth counts dense layers and a ResNet has depth / 2 "
            f"blocks of two, so depth must be even; got {depth} (use {depth - 1} or "
            f"{depth + 1}, or jl.resmlp(num_blocks, ...) for any number of blocks)"
        )


def _build(name: str, act: str, norm: str, kind: str, depth: int, width: int, dtype: str):
    s = ACTIVATION_SIGMA_W[act]
    if kind == "plain":
        return mlp(depth, width, act, norm=norm, sigma_w=s, dtype=dtype, name=name)
    if kind == "looks-linear":
        return mlp(depth, width, "relu", weight_init="looks_linear", dtype=dtype, name=name)
    return resmlp(depth // 2, width, act, norm=norm, sigma_w=s, dtype=dtype, name=name)


def paper_architectures(
    *, depth: int = 50, width: int = 100, dtype: str = "float32"
) -> dict[str, Network]:
    """Every architecture family of the GSC paper, keyed by name (see module docstring).

    Args:
        depth: number of dense layers (50 in the paper), even: ResNets get ``depth // 2``
            blocks of two layers (``ValueError`` for an odd depth, which no ResNet has).
        width: units per layer (100 in the paper); the input also has this width.
        dtype: ``"float32"`` or ``"float64"``.
    """
    if isinstance(depth, int) and not isinstance(depth, bool) and depth % 2:
        raise ValueError(
            f"paper_architectures: depth counts dense layers and its ResNets have depth / 2 "
            f"blocks of two, so depth must be even; got {depth} (architecture(name, "
            "depth=...) builds one plain family at any depth)"
        )
    for name, *_ in _names():
        _check_depth(name, depth)
    return {name: _build(name, *rest, depth, width, dtype) for name, *rest in _names()}


def architecture(
    name: str, *legacy, depth: int = 50, width: int = 100, dtype: str = "float32"
) -> Network:
    """One architecture of :func:`paper_architectures` by name; ``ValueError`` lists the
    names when ``name`` is unknown. ``depth`` counts dense layers: a ResNet gets
    ``depth // 2`` two-layer blocks, so its depth must be even (``ValueError`` otherwise:
    an odd depth used to build one layer less, silently). Passing depth, width and dtype
    by position is deprecated."""
    if legacy:
        warnings.warn(
            "architecture(name, depth, width, dtype) by position is deprecated: pass "
            "depth=, width=, dtype= by keyword",
            DeprecationWarning,
            stacklevel=2,
        )
        depth, width, dtype = (*legacy, *(depth, width, dtype)[len(legacy) :])[:3]
    families = {name: rest for name, *rest in _names()}
    if name not in families:
        raise ValueError(f"unknown architecture {name!r}; expected one of: {', '.join(families)}")
    _check_depth(name, depth)
    return _build(name, *families[name], depth, width, dtype)
