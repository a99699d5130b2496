"""Classification data for :func:`~jacobian_lab.train`: the shipped handwritten digits, a
user's ``.npz`` file, or Gaussian inputs with labels from a random linear teacher.

Nothing is downloaded. :func:`digits` reads ``jacobian_lab/data/digits.npz``, a copy of
scikit-learn's ``load_digits`` (1,797 8x8 images, 10 classes; UCI optdigits, BSD-3; see
``jacobian_lab/data/README.md``), split once into 1,437 training and 360 held-out images
by a fixed permutation. :func:`load_npz` reads any ``.npz`` holding ``x_train``,
``y_train``, ``x_test`` and ``y_test`` (CIFAR-10, say, converted once by the user).

Standardization (the default): every input feature is shifted and scaled by the mean and
standard deviation of the *training* split (features constant over the training split are
only shifted), and the same affine map is applied to the test split.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DIGITS_PATH = Path(__file__).resolve().parent / "data" / "digits.npz"
DIGITS_TEST_SIZE = 360
"""Held-out images of :func:`digits` (20% of 1,797, rounded)."""

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


class Dataset(NamedTuple):
    """A classification data set: ``x_train (N, *feature_shape)`` float32, ``y_train
    (N,)`` int32 labels in ``0 .. num_classes - 1``, likewise ``x_test (M, ...)`` and
    ``y_test (M,)``; ``name`` says where it came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one input."""
        return tuple(self.x_train.shape[1:])


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x - mean) / std`` per feature with the training split's mean and standard
    deviation (a feature constant on the training split keeps scale 1)."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def digits(*, standardize_inputs: bool = True) -> Dataset:
    """scikit-learn's handwritten digits, shipped with the package: 1,437 training and 360
    held-out 8x8 images as 64 features (pixel intensities 0-16), 10 classes. The split is
    a fixed permutation (``numpy.random.default_rng(0)``), the same on every machine."""
    with np.load(DIGITS_PATH) as f:
        x, y = f["x"].astype(np.float64), f["y"].astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return _finish(x[train], y[train], x[test], y[test], "digits", standardize_inputs)


def load_npz(path: str | os.PathLike, *, standardize_inputs: bool = True) -> Dataset:
    """A data set from a ``.npz`` file with arrays ``x_train (N, ...)``, ``y_train (N,)``,
    ``x_test (M, ...)`` and ``y_test (M,)`` (real inputs of one shape, integer labels from
    0). Raises ``ValueError`` naming the missing array or the bad shape or value."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {str(path)!r}: no such file (give a .npz with {NPZ_ARRAYS})")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a readable .npz file (not a zip archive: save with np.savez)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_ARRAYS if k not in f.files]
            if missing:
                raise ValueError(
                    f"{path}: missing array {missing[0]!r} (has {sorted(f.files)}; needs "
                    f"{', '.join(NPZ_ARRAYS)})"
                )
            arrays = {k: np.asarray(f[k]) for k in NPZ_ARRAYS}
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from err
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(
            f"{path}: cannot read its arrays ({err}); save plain numeric arrays"
        ) from err
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(
                f"{path}: x_{split} has shape {x.shape}; expected (samples, features...) "
                "with at least one sample"
            )
        if not (np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x)):
            raise ValueError(f"{path}: x_{split} has dtype {x.dtype}; expected real numbers")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{path}: x_{split} holds inf or NaN")
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"{path}: y_{split} has shape {y.shape}; expected ({x.shape[0]},), one "
                f"label per row of x_{split}"
            )
        if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
            raise ValueError(
                f"{path}: y_{split} must hold integer class labels 0, 1, ..., got dtype "
                f"{y.dtype}" + (f" with minimum {y.min()}" if y.size else "")
            )
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"{path}: x_train inputs have shape {arrays['x_train'].shape[1:]} but x_test "
            f"inputs {arrays['x_test'].shape[1:]}; they must match"
        )
    return _finish(
        arrays["x_train"].astype(np.float64),
        arrays["y_train"].astype(np.int32),
        arrays["x_test"].astype(np.float64),
        arrays["y_test"].astype(np.int32),
        path.name,
        standardize_inputs,
    )


def gaussian_data(
    key: jax.Array,
    *,
    num_train: int = 1000,
    num_test: int = 250,
    dim: int = 64,
    num_classes: int = 10,
) -> Dataset:
    """Standard Gaussian inputs ``(n, dim)`` labelled by a random linear teacher, ``y =
    argmax_c (W x)_c`` with Gaussian ``W (num_classes, dim)``: a linearly separable
    problem for comparison with real data."""
    kx, kt, kw = jax.random.split(key, 3)
    w = jax.random.normal(kw, (num_classes, dim), jnp.float32)
    draws = ((kx, num_train), (kt, num_test))
    xs = [np.asarray(jax.random.normal(k, (n, dim), jnp.float32)) for k, n in draws]
    ys = [np.asarray(jnp.argmax(x @ w.T, axis=1), dtype=np.int32) for x in xs]
    return Dataset(xs[0], ys[0], xs[1], ys[1], num_classes, f"gaussian-{dim}")


def _finish(x_train, y_train, x_test, y_test, name: str, standardize_inputs: bool) -> Dataset:
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if standardize_inputs:
        x_train, x_test = standardize(x_train, x_test)
    return Dataset(
        x_train.astype(np.float32),
        y_train,
        x_test.astype(np.float32),
        y_test,
        num_classes,
        name,
    )
