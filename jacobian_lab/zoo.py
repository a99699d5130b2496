"""The architecture families of the GSC paper's experiments, by name.

Philipp, Song & Carbonell (arXiv 1712.05577) measure MLPs of depth 50 and width 100 with
ReLU, tanh and SeLU, each with no normalization, layer norm or batch norm; a ReLU network
with the looks-linear initialization; and the ResNet versions of these. The full text was
not available to this project (see README, "Fidelity to the papers"): the variance
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


def paper_architectures(
    *, depth: int = 50, width: int = 100, dtype: str = "float32"
) -> dict[str, Network]:
    """Every architecture family of the GSC paper, keyed by name (see module docstring).

    Args:
        depth: number of dense layers (50 in the paper); ResNets get ``depth // 2`` blocks
            of two layers, so ``depth`` must be even for them to match.
        width: units per layer (100 in the paper); the input also has this width.
        dtype: ``"float32"`` or ``"float64"``.
    """
    kinds = [
        (a, s, n, p + a) for a, s in ACTIVATION_SIGMA_W.items() for n, p in _NORM_PREFIX.items()
    ]
    archs = {
        name: mlp(depth, width, act, norm=norm, sigma_w=s, dtype=dtype, name=name)
        for act, s, norm, name in kinds
    }
    name = "looks-linear-relu"
    archs[name] = mlp(depth, width, "relu", weight_init="looks_linear", dtype=dtype, name=name)
    for act, s, norm, plain in kinds:
        name = "resnet-" + plain  # depth // 2 blocks of block_layers=2 dense layers
        archs[name] = resmlp(
            max(depth // 2, 1), width, act, norm=norm, sigma_w=s, dtype=dtype, name=name
        )
    return archs


def architecture(
    name: str, *legacy, depth: int = 50, width: int = 100, dtype: str = "float32"
) -> Network:
    """One architecture of :func:`paper_architectures` by name; ``ValueError`` lists the
    names when ``name`` is unknown. ``depth`` counts dense layers (a ResNet gets
    ``depth // 2`` two-layer blocks). Passing depth, width and dtype by position is
    deprecated."""
    if legacy:
        warnings.warn(
            "architecture(name, depth, width, dtype) by position is deprecated: pass "
            "depth=, width=, dtype= by keyword",
            DeprecationWarning,
            stacklevel=2,
        )
        depth, width, dtype = (*legacy, *(depth, width, dtype)[len(legacy) :])[:3]
    archs = paper_architectures(depth=depth, width=width, dtype=dtype)
    if name not in archs:
        raise ValueError(f"unknown architecture {name!r}; expected one of: {', '.join(archs)}")
    return archs[name]
