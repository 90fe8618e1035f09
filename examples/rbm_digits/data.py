"""The data sets of the example: bars and stripes, and scikit-learn's binarized digits.

This module imports numpy only (scikit-learn when the digits are loaded), so the command
line can check its options against the sizes of the data sets before importing JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

INSTALL_HINT = "pip install -e '.[demo]'"
"""How to install what the example imports lazily (scikit-learn, matplotlib, rich)."""

DIGITS = 1797
"""The number of images in `sklearn.datasets.load_digits`."""

HELD_OUT = 360
"""The number of digits `binary_digits` keeps apart by default."""

BARS_SIDE = 4
"""The side of the bars-and-stripes images of `--data bars`."""

TRAINING_SAMPLES = {"digits": DIGITS - HELD_OUT, "bars": 2 * 2**BARS_SIDE - 2}
"""The number of training samples of each data set of the command line."""


class MissingExtraError(ImportError):
    """A package of the `demo` extra is not installed; the message says how to get it."""


def require(module: str, package: str) -> Any:
    """Import `module`, or raise `MissingExtraError` naming `package` and the extra.

    Args:
        module: the module to import, e.g. "sklearn.datasets".
        package: the name of the distribution that provides it, e.g. "scikit-learn".

    Returns:
        The module.

    Raises:
        MissingExtraError: if the import fails.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"the demo needs {package}, which is not installed: {INSTALL_HINT}"
        ) from error


def bars_and_stripes(side: int = BARS_SIDE) -> np.ndarray:
    """All distinct bars-and-stripes images of a given side, flattened to rows of 0s and 1s.

    A horizontal-bar image has every row constant, a vertical-stripe image every column
    constant; each is fixed by `side` bits, giving `2**side` of each kind. The all-zero
    and all-one images are both, so there are `2 * 2**side - 2` distinct images.

    Args:
        side: the height and width of the images, at least 1.

    Returns:
        A float32 array of shape `(2 * 2**side - 2, side * side)` with entries 0 and 1
        (for `side == 1`, the two images `[0]` and `[1]`).

    Raises:
        ValueError: if `side` is less than 1.
    """
    if side < 1:
        raise ValueError(f"`side` must be at least 1; got {side}.")
    bits = (np.arange(2**side)[:, None] >> np.arange(side)) & 1  # (2**side, side)
    bars = np.repeat(bits[:, :, None], side, axis=2)  # row i of image n is bits[n, i]
    stripes = np.repeat(bits[:, None, :], side, axis=1)  # column j of image n is bits[n, j]
    images = np.concatenate([bars, stripes]).reshape(-1, side * side)
    return np.unique(images, axis=0).astype(np.float32)


def binary_digits(*, held_out: int = HELD_OUT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits, binarized and split into training and held-out.

    The 1,797 images of `sklearn.datasets.load_digits` (bundled with scikit-learn, no
    download) have pixels from 0 to 16; a pixel is 1 where it is at least 8. The images
    are shuffled with `numpy.random.default_rng(seed)` and the first `held_out` are kept
    apart.

    Args:
        held_out: the number of held-out images, from 1 to 1,796.
        seed: the seed of the shuffle.

    Returns:
        `(train, held_out)`: float32 arrays of shape `(1797 - held_out, 64)` and
        `(held_out, 64)` with entries 0 and 1.

    Raises:
        ValueError: if `held_out` is out of range.
        MissingExtraError: if scikit-learn is not installed.
    """
    if not 1 <= held_out < DIGITS:
        raise ValueError(f"`held_out` must be from 1 to {DIGITS - 1}; got {held_out}.")
    digits = require("sklearn.datasets", "scikit-learn").load_digits().data
    images = (digits >= 8).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order[held_out:]], images[order[:held_out]]


def best_log_likelihood(data: np.ndarray) -> float:
    """The highest mean log-likelihood any model can give `data`: minus its entropy.

    A model scores best on a sample by putting on each distinct row its frequency in
    the sample; for bars and stripes (30 distinct rows) that is `log(1/30)`, -3.40 nats.

    Args:
        data: samples, one per row.

    Returns:
        The mean over rows of the log of each row's frequency, in nats.
    """
    _, inverse, counts = np.unique(data, axis=0, return_inverse=True, return_counts=True)
    return float(np.mean(np.log(counts[np.ravel(inverse)] / len(data))))
