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
    deviation (a feature constant on the training split keeps scale 1), as float32.

    Each feature is first divided by its largest magnitude on the training split, which
    changes nothing in exact arithmetic but keeps the squares of the standard deviation in
    range: inputs near 1e300 (finite) would otherwise give an infinite standard deviation
    and come back as zeros. Raises ``ValueError`` when a standardized test value is beyond
    float32 (test inputs far outside the training split's spread)."""
    x_train = np.asarray(x_train, np.float64)
    x_test = np.asarray(x_test, np.float64)
    scale = np.max(np.abs(x_train), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    x_train, x_test = x_train / scale, x_test / scale
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    with np.errstate(over="ignore"):
        out = (
            ((x_train - mean) / std).astype(np.float32),
            ((x_test - mean) / std).astype(np.float32),
        )
    for split, a in zip(("x_train", "x_test"), out, strict=True):
        if not np.all(np.isfinite(a)):
            raise ValueError(
                f"{split} standardized by the training split's mean and spread is beyond "
                "float32 (its values lie far outside the training split's range): check the "
                "data, or pass standardize_inputs=False"
            )
    return out


def check_dataset_arrays(
    x_train, y_train, x_test, y_test, num_classes: int | None, where: str = "data"
) -> int:
    """Check a classification data set and return its number of classes (inferred as the
    largest label + 1 when ``num_classes`` is None). Raises ``ValueError`` (``TypeError``
    for a wrong type) naming ``where`` and the array: inputs ``(samples, features...)``
    with at least one sample per split, of real finite numbers and one feature shape;
    labels ``(samples,)``, one per input row, integers in ``0 .. num_classes - 1``;
    ``num_classes`` a positive int. An inferred number of classes beyond the number of
    labelled examples (one stray label of 10^9) is refused: it would build a readout with
    that many outputs. Shared by :func:`load_npz` and :func:`~jacobian_lab.train`."""
    for split in ("train", "test"):
        x = np.asarray(x_train if split == "train" else x_test)
        y = np.asarray(y_train if split == "train" else y_test)
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(
                f"{where}: x_{split} has shape {x.shape}; expected (samples, features...) "
                "with at least one sample"
            )
        if not (np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x)):
            raise ValueError(f"{where}: x_{split} has dtype {x.dtype}; expected real numbers")
        finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
        if not finite.all():
            raise ValueError(
                f"{where}: x_{split} holds inf or NaN (first in row {int(np.argmin(finite))} "
                f"of {x.shape[0]}); the inputs must be finite"
            )
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"{where}: y_{split} has shape {y.shape}; expected ({x.shape[0]},), one "
                f"label per row of x_{split}"
            )
        if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
            raise ValueError(
                f"{where}: y_{split} must hold integer class labels 0, 1, ..., got dtype "
                f"{y.dtype}: cast them with y.astype(np.int32) if they are whole numbers"
            )
        if y.min() < 0:
            raise ValueError(
                f"{where}: y_{split} must hold integer class labels 0, 1, ..., got "
                f"{int(y.min())} in row {int(np.argmin(y))} (a negative label would wrap "
                "around to the last class)"
            )
    if np.shape(x_train)[1:] != np.shape(x_test)[1:]:
        raise ValueError(
            f"{where}: x_train inputs have shape {np.shape(x_train)[1:]} but x_test inputs "
            f"{np.shape(x_test)[1:]}; they must match"
        )
    top = max(int(np.max(y_train)), int(np.max(y_test)))
    if num_classes is None:
        labelled = len(y_train) + len(y_test)
        if top + 1 > labelled:
            split = "y_train" if int(np.max(y_train)) == top else "y_test"
            row = int(np.argmax(np.asarray(y_train if split == "y_train" else y_test)))
            raise ValueError(
                f"{where}: {split}[{row}] = {top} implies {top + 1} classes, more than the "
                f"{labelled} labelled examples: labels must number the classes 0, 1, ..., "
                "C-1 (remap them, e.g. np.unique(y, return_inverse=True)[1])"
            )
        return top + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise TypeError(f"{where}: num_classes must be an int, got {num_classes!r}")
    if num_classes < 1 or top >= num_classes:
        split = "y_train" if int(np.max(y_train)) == top else "y_test"
        raise ValueError(
            f"{where}: labels must lie in 0 .. num_classes - 1 = {num_classes - 1}, but "
            f"{split} holds {top}: raise num_classes or fix the labels"
        )
    return int(num_classes)


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
    num_classes = check_dataset_arrays(*(arrays[k] for k in NPZ_ARRAYS), None, where=str(path))
    return _finish(
        arrays["x_train"].astype(np.float64),
        arrays["y_train"].astype(np.int32),
        arrays["x_test"].astype(np.float64),
        arrays["y_test"].astype(np.int32),
        path.name,
        standardize_inputs,
        num_classes,
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


def _finish(
    x_train, y_train, x_test, y_test, name: str, standardize_inputs: bool, num_classes=None
) -> Dataset:
    if num_classes is None:
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
