"""Train a Bernoulli RBM on handwritten digits with jaxgrad, and compare it with scikit-learn.

Run it with ``python -m jaxgrad.demo`` (``--help`` lists the options; ``make demo`` does
it). The data are the 1,797 8x8 handwritten digits that scikit-learn bundles
(`sklearn.datasets.load_digits`, no download), binarized at half the ink scale and split
into 1,437 training and 360 held-out images. ``--data bars`` uses the 30 4x4
bars-and-stripes patterns instead: small enough that the exact log-likelihood can be
computed, and fast.

The model is a restricted Boltzmann machine with binary visible and hidden units, kept
as paysage kept it: a `jaxgrad.Gradient` with one entry per layer (the visible and hidden
biases) and one per weight matrix. Training follows paysage's recipe, written with
jaxgrad functions inside one `jax.jit`-compiled step:

* the contrastive-divergence (CD-k) gradient of the log-likelihood, positive phase (the
  data) minus negative phase (k steps of block Gibbs sampling), is a `Gradient` of the
  same layout as the parameters;
* ADAM keeps its first and second moments as two more such trees, started with
  `jaxgrad.zero_grad` and updated leaf by leaf with `jaxgrad.grad_mapzip`; as CD gives
  an ascent direction, the step is added to the parameters.

The peer is `sklearn.neural_network.BernoulliRBM` (persistent CD-1 with plain SGD),
trained on the same data with the same number of hidden units, learning rate, batch
size and epochs. Both are scored by the same function, `pseudo_log_likelihood`, on the
held-out images: the exact average over all visible units of the log-probability of
each unit given the others (scikit-learn's own `score_samples` draws one unit at random
per image instead, a noisier estimate of the same quantity).

scikit-learn, matplotlib and rich are imported only when needed (the comparison, the
figure, the progress bar); ``pip install 'jaxgrad[demo]'`` installs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxgrad

from ._typing import Array, ArrayLike, PyTree

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time
    from matplotlib.figure import Figure

MAX_ENUMERATED_UNITS = 20
"""The largest layer `log_partition` sums over exactly (2**20 states)."""

INSTALL_HINT = "pip install 'jaxgrad[demo]'"
"""How to install what the demo imports lazily (scikit-learn, matplotlib, rich)."""


class MissingExtraError(ImportError):
    """A package of the `demo` extra is not installed; the message says how to get it."""


def _require(module: str, package: str) -> Any:
    """Import `module`, or raise `MissingExtraError` naming `package` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"the demo needs {package}, which is not installed: {INSTALL_HINT}"
        ) from error


# Data -----------------------------------------------------------------------------------


def bars_and_stripes(side: int = 4) -> np.ndarray:
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


def binary_digits(*, held_out: int = 360, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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
    digits = _require("sklearn.datasets", "scikit-learn").load_digits().data
    if not 1 <= held_out < len(digits):
        raise ValueError(f"`held_out` must be from 1 to {len(digits) - 1}; got {held_out}.")
    images = (digits >= 8).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order[held_out:]], images[order[:held_out]]


# The model ------------------------------------------------------------------------------


def init_params(n_visible: int, n_hidden: int, key: Array, *, scale: float = 0.1) -> PyTree:
    """Initial RBM parameters: zero biases and small random normal weights.

    The weights come from `jaxgrad.random_grad` with a normal sampler, so the same key
    gives the same model.

    Args:
        n_visible: the number of visible units.
        n_hidden: the number of hidden units.
        key: a `jax.random` key.
        scale: the standard deviation of the weights.

    Returns:
        `Gradient(layers=[{"bias": a}, {"bias": b}], weights=[{"W": W}])` of float32
        arrays, with `a` of shape `(n_visible,)`, `b` of shape `(n_hidden,)` and `W` of
        shape `(n_visible, n_hidden)`.
    """

    def sampler(k: Array, shape: tuple[int, ...], dtype: jax.typing.DTypeLike) -> Array:
        return scale * jax.random.normal(k, shape, dtype)

    weights = jaxgrad.random_grad(
        [{"W": jnp.zeros((n_visible, n_hidden), jnp.float32)}], key, sampler=sampler
    )
    layers = [
        {"bias": jnp.zeros(n_visible, jnp.float32)},
        {"bias": jnp.zeros(n_hidden, jnp.float32)},
    ]
    return jaxgrad.Gradient(layers=layers, weights=weights)


def _unpack(params: PyTree) -> tuple[Array, Array, Array]:
    return params.layers[0]["bias"], params.layers[1]["bias"], params.weights[0]["W"]


def free_energy(params: PyTree, visible: Array) -> Array:
    """The free energy of visible states: `-log sum_h exp(-E(v, h))`.

    With energy `E(v, h) = -a.v - b.h - v.W.h`, summing out the binary hidden units gives
    `F(v) = -a.v - sum_j softplus(b_j + (v W)_j)`.

    Args:
        params: RBM parameters as made by `init_params`.
        visible: an array of shape `(batch, n_visible)`.

    Returns:
        An array of shape `(batch,)`.
    """
    a, b, w = _unpack(params)
    return -(visible @ a) - jnp.sum(jax.nn.softplus(visible @ w + b), axis=-1)


def _binary_states(n: int) -> Array:
    """All `2**n` binary vectors of length `n`, as float32 rows."""
    codes = jnp.arange(2**n, dtype=jnp.int32)[:, None]
    return ((codes >> jnp.arange(n, dtype=jnp.int32)) & 1).astype(jnp.float32)


def log_partition(params: PyTree) -> Array:
    """The exact log partition function `log Z` of an RBM, by enumerating one layer.

    Sums over every state of the smaller layer with the other layer summed out in closed
    form, so it is exact and cheap while that layer has at most
    `MAX_ENUMERATED_UNITS` units.

    Args:
        params: RBM parameters as made by `init_params`.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: if both layers have more than `MAX_ENUMERATED_UNITS` units.
    """
    a, b, w = _unpack(params)
    n_visible, n_hidden = w.shape
    if min(n_visible, n_hidden) > MAX_ENUMERATED_UNITS:
        raise ValueError(
            f"`params` must have a layer of at most {MAX_ENUMERATED_UNITS} units to sum over; "
            f"it has {n_visible} visible and {n_hidden} hidden units."
        )
    if n_visible <= n_hidden:
        return jax.nn.logsumexp(-free_energy(params, _binary_states(n_visible)))
    hidden = _binary_states(n_hidden)
    return jax.nn.logsumexp(hidden @ b + jnp.sum(jax.nn.softplus(hidden @ w.T + a), axis=-1))


def _bernoulli(key: Array, probs: Array) -> Array:
    return (jax.random.uniform(key, probs.shape, probs.dtype) < probs).astype(probs.dtype)


def cd_gradient(params: PyTree, batch: Array, key: Array, k: int = 1) -> PyTree:
    """The contrastive-divergence (CD-k) estimate of the log-likelihood gradient.

    The positive phase uses the data and the hidden probabilities given the data; the
    negative phase starts block Gibbs sampling at the data and runs it for `k` steps.
    Each entry is the mean over the batch of positive minus negative statistics, so the
    result is an ascent direction on the log-likelihood.

    Args:
        params: RBM parameters as made by `init_params`.
        batch: binary data of shape `(batch, n_visible)`.
        key: a `jax.random` key for the Gibbs sampling.
        k: the number of Gibbs steps, at least 1 (a Python int: static under `jax.jit`).

    Returns:
        A `Gradient` with the structure, shapes and dtypes of `params`.

    Raises:
        ValueError: if `k` is less than 1.
    """
    if k < 1:
        raise ValueError(f"`k` must be at least 1; got {k}.")
    a, b, w = _unpack(params)
    hidden_probs_data = jax.nn.sigmoid(batch @ w + b)

    def gibbs_step(chain: tuple[Array, Array], keys: Array) -> tuple[tuple[Array, Array], None]:
        _, hidden_probs = chain
        hidden = _bernoulli(keys[0], hidden_probs)
        visible = _bernoulli(keys[1], jax.nn.sigmoid(hidden @ w.T + a))
        return (visible, jax.nn.sigmoid(visible @ w + b)), None

    chain = (batch, hidden_probs_data)
    (visible, hidden_probs), _ = jax.lax.scan(gibbs_step, chain, jax.random.split(key, (k, 2)))
    n = batch.shape[0]
    return jaxgrad.Gradient(
        layers=[
            {"bias": jnp.mean(batch - visible, axis=0)},
            {"bias": jnp.mean(hidden_probs_data - hidden_probs, axis=0)},
        ],
        weights=[{"W": (batch.T @ hidden_probs_data - visible.T @ hidden_probs) / n}],
    )


def reconstruction_error(params: PyTree, data: Array) -> Array:
    """Mean squared error of a deterministic (mean-field) up-down pass over the data.

    Args:
        params: RBM parameters as made by `init_params`.
        data: binary data of shape `(batch, n_visible)`.

    Returns:
        A float32 scalar.
    """
    a, b, w = _unpack(params)
    reconstruction = jax.nn.sigmoid(jax.nn.sigmoid(data @ w + b) @ w.T + a)
    return jnp.mean(jnp.square(data - reconstruction))


def mean_log_likelihood(params: PyTree, data: Array) -> Array:
    """The exact mean log-likelihood of the data, `mean(-F(v)) - log Z`, in nats.

    Args:
        params: RBM parameters as made by `init_params`.
        data: binary data of shape `(batch, n_visible)`.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: if `log_partition` cannot sum over either layer.
    """
    return jnp.mean(-free_energy(params, data)) - log_partition(params)


def pseudo_log_likelihood(params: PyTree, data: Array) -> Array:
    """The mean pseudo-log-likelihood of the data: `sum_i log P(v_i | v_-i)`, averaged.

    For each sample and each visible unit `i`, the log-probability of the unit's value
    given all the other units is `log sigmoid(F(v with unit i flipped) - F(v))`, with `F`
    the `free_energy`. The sum over all units is averaged over the samples: an exact,
    deterministic estimator, where scikit-learn's `BernoulliRBM.score_samples` flips one
    random unit per sample and multiplies by the number of units (the same quantity in
    expectation, with sampling noise). Any RBM can be scored: pass
    `params_from_sklearn(model)` for a scikit-learn model.

    Args:
        params: RBM parameters as made by `init_params`.
        data: binary data of shape `(batch, n_visible)`.

    Returns:
        A float32 scalar, in nats (0 at best; `-n_visible * log 2` for a model that
        ignores its input).
    """
    a, b, w = _unpack(params)
    pre_activation = data @ w + b  # (batch, n_hidden)
    sign = 1 - 2 * data  # flipping unit i adds sign_i * W_i to the pre-activation
    flipped = pre_activation[:, None, :] + sign[:, :, None] * w  # (batch, n_visible, n_hidden)
    softplus_sum = jnp.sum(jax.nn.softplus(pre_activation), axis=-1)
    energy_gap = -sign * a - jnp.sum(jax.nn.softplus(flipped), axis=-1) + softplus_sum[:, None]
    return jnp.mean(jnp.sum(jax.nn.log_sigmoid(energy_gap), axis=-1))


def params_from_sklearn(model: Any) -> PyTree:
    """The parameters of a fitted `sklearn.neural_network.BernoulliRBM`, in this layout.

    Args:
        model: a fitted `BernoulliRBM`.

    Returns:
        `Gradient(layers=[{"bias": intercept_visible_}, {"bias": intercept_hidden_}],
        weights=[{"W": components_.T}])`, as float32 arrays.
    """
    return jaxgrad.Gradient(
        layers=[
            {"bias": jnp.asarray(model.intercept_visible_, jnp.float32)},
            {"bias": jnp.asarray(model.intercept_hidden_, jnp.float32)},
        ],
        weights=[{"W": jnp.asarray(model.components_.T, jnp.float32)}],
    )


# The optimizer --------------------------------------------------------------------------


class AdamState(NamedTuple):
    """ADAM's state: the step count and two trees shaped like the parameters.

    Attributes:
        step: the number of updates done, an int32 scalar.
        mean: the running mean of the gradient.
        mean_square: the running mean of the squared gradient.
    """

    step: Array
    mean: PyTree
    mean_square: PyTree


def adam_init(params: PyTree) -> AdamState:
    """ADAM's initial state: step 0 and zero moments, from `jaxgrad.zero_grad`.

    Args:
        params: the parameters to optimize (any pytree of float arrays).

    Returns:
        An `AdamState` whose moments have the structure, shapes and dtypes of `params`.
    """
    return AdamState(
        step=jnp.zeros((), jnp.int32),
        mean=jaxgrad.zero_grad(params),
        mean_square=jaxgrad.zero_grad(params),
    )


def adam_update(
    params: PyTree,
    grad: PyTree,
    state: AdamState,
    *,
    lr: ArrayLike,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[PyTree, AdamState]:
    """One ADAM step along an ascent direction, written with `jaxgrad.grad_mapzip`.

    With `t` the new step count, `m = beta1 m + (1 - beta1) g`,
    `v = beta2 v + (1 - beta2) g**2`, and the parameters move by
    `lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)`. The step is added,
    because `grad` (a CD gradient) points uphill on the log-likelihood; pass the
    negative of a loss gradient to minimize a loss.

    Args:
        params: the parameters (any pytree of float arrays).
        grad: the ascent direction, with the structure of `params`.
        state: the current `AdamState`.
        lr: the learning rate.
        beta1: the decay of the running mean.
        beta2: the decay of the running mean square.
        eps: added to the root mean square to avoid dividing by zero.

    Returns:
        The new parameters and the new state.
    """
    step = state.step + 1
    t = step.astype(jnp.float32)
    mean_correction = 1 - beta1**t
    square_correction = 1 - beta2**t
    mean = jaxgrad.grad_mapzip(lambda m, g: beta1 * m + (1 - beta1) * g, state.mean, grad)
    mean_square = jaxgrad.grad_mapzip(
        lambda v, g: beta2 * v + (1 - beta2) * jnp.square(g), state.mean_square, grad
    )
    direction = jaxgrad.grad_mapzip(
        lambda m, v: (m / mean_correction) / (jnp.sqrt(v / square_correction) + eps),
        mean,
        mean_square,
    )
    params = jaxgrad.grad_mapzip(lambda p, d: p + lr * d, params, direction)
    return params, AdamState(step=step, mean=mean, mean_square=mean_square)


# Training -------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k",))
def train_step(
    params: PyTree, state: AdamState, batch: Array, key: Array, lr: ArrayLike, k: int = 1
) -> tuple[PyTree, AdamState, Array]:
    """One compiled training step: a CD-k gradient and an ADAM update.

    Args:
        params: RBM parameters as made by `init_params`.
        state: the `AdamState` for `params`.
        batch: binary data of shape `(batch, n_visible)`.
        key: a `jax.random` key for the Gibbs sampling.
        lr: the learning rate.
        k: the number of Gibbs steps (static: each value compiles once).

    Returns:
        The new parameters, the new ADAM state, and `jaxgrad.grad_magnitude` of the CD
        gradient.
    """
    grad = cd_gradient(params, batch, key, k)
    params, state = adam_update(params, grad, state, lr=lr)
    return params, state, jaxgrad.grad_magnitude(grad)


@functools.partial(jax.jit, static_argnames=("batch_size", "k"))
def _train_pass(
    params: PyTree,
    state: AdamState,
    data: Array,
    key: Array,
    index: ArrayLike,
    lr: ArrayLike,
    batch_size: int,
    k: int,
) -> tuple[PyTree, AdamState, Array]:
    """Pass number `index` over the data: shuffle, batch, then `train_step` under `lax.scan`."""
    order_key, sample_key = jax.random.split(jax.random.fold_in(key, index))
    steps = data.shape[0] // batch_size
    order = jax.random.permutation(order_key, data.shape[0])[: steps * batch_size]
    batches = data[order].reshape(steps, batch_size, data.shape[1])

    def body(
        carry: tuple[PyTree, AdamState], xs: tuple[Array, Array]
    ) -> tuple[tuple[PyTree, AdamState], Array]:
        params, state, magnitude = train_step(*carry, xs[0], xs[1], lr, k)
        return (params, state), magnitude

    (params, state), magnitudes = jax.lax.scan(
        body, (params, state), (batches, jax.random.split(sample_key, steps))
    )
    return params, state, magnitudes


@jax.jit
def _evaluate(params: PyTree, data: Array) -> tuple[Array, Array]:
    return pseudo_log_likelihood(params, data), reconstruction_error(params, data)


_exact_log_likelihood = jax.jit(mean_log_likelihood)


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """Metrics of one training epoch, measured on the evaluation data after the epoch.

    The evaluation data are the held-out data when `train` or `fit_sklearn` is given
    some, else the training data.

    Attributes:
        epoch: the epoch number, from 1.
        pseudo_log_likelihood: `pseudo_log_likelihood` of the evaluation data, in nats.
        reconstruction_error: `reconstruction_error` of the evaluation data.
        grad_magnitude: the mean over the epoch's steps of `jaxgrad.grad_magnitude` of
            the CD gradient; `None` for scikit-learn, which does not expose it.
        log_likelihood: the exact mean log-likelihood of the evaluation data, in nats,
            where a layer has at most `MAX_ENUMERATED_UNITS` units; else `None`.
    """

    epoch: int
    pseudo_log_likelihood: float
    reconstruction_error: float
    grad_magnitude: float | None
    log_likelihood: float | None


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` and `fit_sklearn` return.

    Attributes:
        params: the trained RBM parameters, a `jaxgrad.Gradient` laid out as by
            `init_params`.
        history: the metrics of each epoch, in order.
        grad_magnitudes: `jaxgrad.grad_magnitude` of the CD gradient of every training
            step, in order (empty for scikit-learn).
        train_seconds: the wall time of the training steps, evaluation excluded (for
            jaxgrad, compilation excluded too).
        compile_seconds: the time XLA took to compile the training pass, or `None`.
    """

    params: PyTree
    history: list[EpochStats]
    grad_magnitudes: np.ndarray
    train_seconds: float
    compile_seconds: float | None


def _as_data(name: str, data: ArrayLike, n_visible: int | None = None) -> Array:
    samples = jnp.asarray(data, jnp.float32)
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise ValueError(
            f"`{name}` must have shape (n, n_visible) with n >= 1; got {samples.shape}."
        )
    if n_visible is not None and samples.shape[1] != n_visible:
        raise ValueError(
            f"`{name}` must have {n_visible} columns, as the training data; got {samples.shape}."
        )
    return samples


def _check_settings(n: int, **values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"`{name}` must be at least 1; got {value}.")
    if values["batch_size"] > n:
        raise ValueError(
            f"`batch_size` must be from 1 to the number of samples, {n}; "
            f"got {values['batch_size']}."
        )


def _epoch_stats(
    epoch: int, params: PyTree, data: Array, grad_magnitude: float | None
) -> EpochStats:
    pll, error = _evaluate(params, data)
    _, _, w = _unpack(params)
    exact = None
    if min(w.shape) <= MAX_ENUMERATED_UNITS:
        exact = float(_exact_log_likelihood(params, data))
    return EpochStats(
        epoch=epoch,
        pseudo_log_likelihood=float(pll),
        reconstruction_error=float(error),
        grad_magnitude=grad_magnitude,
        log_likelihood=exact,
    )


def train(
    data: ArrayLike,
    *,
    held_out: ArrayLike | None = None,
    epochs: int = 20,
    hidden: int = 128,
    lr: float = 0.05,
    lr_decay: float = 1.0,
    batch_size: int = 10,
    k: int = 1,
    passes: int = 1,
    init_scale: float = 0.01,
    seed: int = 0,
    on_steps: Callable[[int], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Train a Bernoulli RBM with CD-k and ADAM; deterministic given `seed`.

    Each epoch makes `passes` passes over the data, each in a fresh random order and cut
    into batches of `batch_size` (a last, short batch is dropped), then evaluates the
    model (see `EpochStats`). The learning rate of epoch `e` (from 1) is
    `lr * lr_decay**(e - 1)`. The training pass (shuffle, then the steps under
    `jax.lax.scan`) is compiled once before training starts. Nothing is printed; pass
    `on_steps` and `on_epoch` to report progress.

    Args:
        data: binary training data of shape `(n, n_visible)`.
        held_out: binary data of shape `(m, n_visible)` to evaluate on, or `None` to
            evaluate on `data`.
        epochs: the number of epochs, at least 1.
        hidden: the number of hidden units, at least 1.
        lr: ADAM's learning rate in the first epoch.
        lr_decay: the factor applied to the learning rate after each epoch.
        batch_size: the number of samples per step, from 1 to `n`.
        k: the number of Gibbs steps in the CD gradient, at least 1.
        passes: the number of passes over the data per epoch, at least 1.
        init_scale: the standard deviation of the initial weights (scikit-learn's 0.01
            by default; the biases start at zero, as scikit-learn's).
        seed: the seed of every random choice (initial weights, order, sampling).
        on_steps: called after each pass with the number of training steps it made.
        on_epoch: called with each epoch's `EpochStats`.

    Returns:
        A `TrainResult`.

    Raises:
        ValueError: if `data` or `held_out` is not a non-empty 2-d array with the same
            number of columns, or an integer argument is out of range.
    """
    samples = _as_data("data", data)
    n, n_visible = samples.shape
    evaluation = samples if held_out is None else _as_data("held_out", held_out, n_visible)
    _check_settings(n, epochs=epochs, hidden=hidden, k=k, passes=passes, batch_size=batch_size)

    init_key, train_key = jax.random.split(jax.random.key(seed))
    params = init_params(n_visible, hidden, init_key, scale=init_scale)
    state = adam_init(params)
    start = time.perf_counter()
    train_pass = _train_pass.lower(
        params, state, samples, train_key, 0, lr, batch_size=batch_size, k=k
    ).compile()
    compile_seconds = time.perf_counter() - start

    history, magnitudes, train_seconds = [], [], 0.0
    for epoch in range(1, epochs + 1):
        epoch_key = jax.random.fold_in(train_key, epoch)
        epoch_lr = lr * lr_decay ** (epoch - 1)
        epoch_magnitudes = []
        for i in range(passes):
            start = time.perf_counter()
            params, state, pass_magnitudes = train_pass(
                params, state, samples, epoch_key, i, epoch_lr
            )
            jax.block_until_ready(params)
            train_seconds += time.perf_counter() - start
            epoch_magnitudes.append(np.asarray(pass_magnitudes))
            if on_steps is not None:
                on_steps(n // batch_size)
        magnitudes.extend(epoch_magnitudes)
        stats = _epoch_stats(
            epoch, params, evaluation, float(np.mean(np.concatenate(epoch_magnitudes)))
        )
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return TrainResult(
        params=params,
        history=history,
        grad_magnitudes=np.concatenate(magnitudes),
        train_seconds=train_seconds,
        compile_seconds=compile_seconds,
    )


def fit_sklearn(
    data: ArrayLike,
    *,
    held_out: ArrayLike | None = None,
    epochs: int = 20,
    hidden: int = 128,
    lr: float = 0.05,
    batch_size: int = 10,
    passes: int = 1,
    seed: int = 0,
    replay: bool = True,
    on_steps: Callable[[int], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Train scikit-learn's `BernoulliRBM` with the settings of `train`, and score it alike.

    The model is `BernoulliRBM(n_components=hidden, learning_rate=lr,
    batch_size=batch_size, n_iter=epochs * passes, random_state=seed)`, fitted with
    `fit` on the data as float64 (scikit-learn's own type); `train_seconds` is the wall
    time of that call. To give the per-epoch metrics as well, the same training is then
    replayed batch by batch with `partial_fit`, which draws the same random numbers in
    the same order, so it passes through the same parameters (the test suite checks
    that it ends where `fit` did); each epoch is scored with the same functions as
    `train`.

    Args:
        data: binary training data of shape `(n, n_visible)`.
        held_out: binary data to evaluate on, or `None` to evaluate on `data`.
        epochs: the number of epochs, at least 1.
        hidden: the number of hidden units, at least 1.
        lr: the SGD learning rate.
        batch_size: the number of samples per step, from 1 to `n`.
        passes: the number of passes over the data per epoch, at least 1.
        seed: scikit-learn's `random_state`.
        replay: whether to replay the training for the metrics of every epoch; if
            `False`, `history` holds the last epoch only, and `on_steps` is not called.
        on_steps: called after each pass of the replay with the number of steps it made.
        on_epoch: called with each epoch's `EpochStats`.

    Returns:
        A `TrainResult` with the parameters of the fitted model (`params_from_sklearn`),
        an empty `grad_magnitudes` and `compile_seconds` of `None`.

    Raises:
        ValueError: as `train`.
        MissingExtraError: if scikit-learn is not installed.
    """
    neural_network = _require("sklearn.neural_network", "scikit-learn")
    gen_even_slices = _require("sklearn.utils", "scikit-learn").gen_even_slices
    samples = _as_data("data", data)
    n, n_visible = samples.shape
    evaluation = samples if held_out is None else _as_data("held_out", held_out, n_visible)
    _check_settings(n, epochs=epochs, hidden=hidden, passes=passes, batch_size=batch_size)
    x = np.asarray(samples, np.float64)

    def model() -> Any:
        return neural_network.BernoulliRBM(
            n_components=hidden,
            learning_rate=lr,
            batch_size=batch_size,
            n_iter=epochs * passes,
            random_state=seed,
        )

    fitted = model()
    start = time.perf_counter()
    fitted.fit(x)
    train_seconds = time.perf_counter() - start

    history = []
    if replay:
        replayed = model()
        n_batches = math.ceil(n / batch_size)
        batches = list(gen_even_slices(n_batches * batch_size, n_batches, n_samples=n))
        for epoch in range(1, epochs + 1):
            for _ in range(passes):
                for batch in batches:
                    replayed.partial_fit(x[batch])
                if on_steps is not None:
                    on_steps(len(batches))
            stats = _epoch_stats(epoch, params_from_sklearn(replayed), evaluation, None)
            history.append(stats)
            if on_epoch is not None:
                on_epoch(stats)
    else:
        stats = _epoch_stats(epochs, params_from_sklearn(fitted), evaluation, None)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return TrainResult(
        params=params_from_sklearn(fitted),
        history=history,
        grad_magnitudes=np.zeros(0, np.float32),
        train_seconds=train_seconds,
        compile_seconds=None,
    )


# Reporting ------------------------------------------------------------------------------


def format_epoch(stats: EpochStats, epochs: int) -> str:
    """The line printed for one epoch.

    Args:
        stats: the epoch's metrics.
        epochs: the total number of epochs (sets the width of the epoch number).

    Returns:
        One line of text, without a newline.
    """
    width = len(str(epochs))
    line = (
        f"epoch {stats.epoch:>{width}}/{epochs}  "
        f"pseudo-log-likelihood {stats.pseudo_log_likelihood:8.3f}  "
        f"recon mse {stats.reconstruction_error:.4f}"
    )
    if stats.grad_magnitude is not None:
        line += f"  grad magnitude {stats.grad_magnitude:.5f}"
    if stats.log_likelihood is not None:
        line += f"  log-likelihood {stats.log_likelihood:8.4f}"
    return line


COMPARISON_COLUMNS = (
    "model",
    "training",
    "PLL",
    "recon mse",
    "train s",
    "compile s",
)
"""The columns of `comparison_rows`: PLL is the final pseudo-log-likelihood (nats), recon
mse the final reconstruction error, then the training and compilation wall times; a last
column, "exact LL" (the exact mean log-likelihood), is added where every model has one."""


def comparison_rows(results: Mapping[str, TrainResult], *, k: int = 1) -> list[dict[str, str]]:
    """One formatted row per model: final metrics and wall times.

    Args:
        results: the results by model name; a name starting with "scikit-learn" is
            labelled as scikit-learn's training (persistent CD-1, SGD), any other as
            `train`'s (CD-k, ADAM).
        k: the number of Gibbs steps `train` used.

    Returns:
        A list of dicts with the keys `COMPARISON_COLUMNS` (and "exact LL" where
        every model has one), values as text.
    """
    exact = all(result.history[-1].log_likelihood is not None for result in results.values())
    rows = []
    for name, result in results.items():
        last = result.history[-1]
        sklearn = name.startswith("scikit-learn")
        compile_seconds = result.compile_seconds
        rows.append(
            {
                "model": name,
                "training": "PCD-1, SGD" if sklearn else f"CD-{k}, ADAM",
                "PLL": f"{last.pseudo_log_likelihood:.2f}",
                "recon mse": f"{last.reconstruction_error:.4f}",
                "train s": f"{result.train_seconds:.2f}",
                "compile s": "-" if compile_seconds is None else f"{compile_seconds:.2f}",
            }
        )
        if exact:
            rows[-1]["exact LL"] = f"{last.log_likelihood:.3f}"
    return rows


def markdown_table(rows: Sequence[Mapping[str, str]]) -> str:
    """Rows of text (dicts with the same keys) as a Markdown table.

    Args:
        rows: at least one row; the keys of the first are the columns.

    Returns:
        The table, one line per row after the header and the rule.
    """
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _mosaic(weights: np.ndarray, shape: tuple[int, int], count: int, columns: int) -> np.ndarray:
    """The first `count` filters (columns of `weights`) as one image of tiles, NaN between."""
    count = min(count, weights.shape[1])
    rows = math.ceil(count / columns)
    height, width = shape
    image = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1), np.nan)
    for j in range(count):
        tile = weights[:, j].reshape(shape)
        scale = np.abs(tile).max() or 1.0
        r, c = divmod(j, columns)
        image[
            r * (height + 1) : r * (height + 1) + height, c * (width + 1) : c * (width + 1) + width
        ] = tile / scale
    return image


def plot_results(
    results: Mapping[str, TrainResult],
    *,
    image_shape: tuple[int, int] | None = None,
    filters: int = 32,
) -> Figure:
    """A figure of the learned filters of each model, the learning curves and the gradient.

    The top row shows the weights into the first `filters` hidden units of each model,
    each as an image scaled to its own largest absolute value (red positive, blue
    negative). Below, the pseudo-log-likelihood of every model after each epoch, and
    `jaxgrad.grad_magnitude` of every training step of the models that record it.

    Args:
        results: the results by model name, in the order to show them.
        image_shape: the shape of an image, by default the square of the number of
            visible units.
        filters: the number of filters to show per model.

    Returns:
        A `matplotlib.figure.Figure` (not attached to pyplot: save it with `savefig`, or
        show it as a notebook cell's value).

    Raises:
        MissingExtraError: if matplotlib is not installed.
    """
    figure_module = _require("matplotlib.figure", "matplotlib")
    n_visible = int(next(iter(results.values())).params.weights[0]["W"].shape[0])
    side = math.isqrt(n_visible)
    shape = image_shape or (side, n_visible // side)
    figure = figure_module.Figure(figsize=(10, 7), layout="constrained")
    grid = figure.add_gridspec(2, max(2, len(results)))
    for i, (name, result) in enumerate(results.items()):
        ax = figure.add_subplot(grid[0, i])
        weights = np.asarray(result.params.weights[0]["W"], np.float64)
        ax.imshow(_mosaic(weights, shape, filters, 8), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"{name}: first {min(filters, weights.shape[1])} filters")
        ax.set_axis_off()
    curves = figure.add_subplot(grid[1, 0])
    for name, result in results.items():
        epochs = [s.epoch for s in result.history]
        curves.plot(epochs, [s.pseudo_log_likelihood for s in result.history], "o-", label=name)
    curves.set_xlabel("epoch")
    curves.xaxis.set_major_locator(
        _require("matplotlib.ticker", "matplotlib").MaxNLocator(integer=True)
    )
    curves.set_ylabel("pseudo-log-likelihood (nats)")
    curves.set_title("pseudo-log-likelihood after each epoch")
    curves.legend()
    magnitude = figure.add_subplot(grid[1, 1])
    for name, result in results.items():
        steps = len(result.grad_magnitudes)
        if steps:
            magnitude.plot(result.grad_magnitudes, lw=0.5, alpha=0.5, label=f"{name}, each step")
            per_epoch = steps // len(result.history)
            if per_epoch:
                means = result.grad_magnitudes[: per_epoch * len(result.history)]
                means = means.reshape(len(result.history), per_epoch).mean(axis=1)
                centers = (np.arange(len(means)) + 0.5) * per_epoch
                magnitude.plot(centers, means, "o-", label=f"{name}, epoch mean")
    magnitude.set_xlabel("training step")
    magnitude.set_ylabel("grad_magnitude of the CD gradient")
    magnitude.set_yscale("log")
    magnitude.set_title("gradient magnitude")
    magnitude.legend()
    return figure


# Command line ---------------------------------------------------------------------------

DEFAULTS = {
    "digits": {"epochs": 20, "hidden": 128, "lr": 0.05, "batch_size": 10, "k": 1, "passes": 1},
    "bars": {"epochs": 10, "hidden": 16, "lr": 0.05, "batch_size": 10, "k": 1, "passes": 50},
}
"""The settings of each data set that a command-line option leaves unset."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxgrad.demo",
        description=(
            "Train a Bernoulli RBM with CD-k, ADAM and jaxgrad, and compare it with "
            "scikit-learn's BernoulliRBM trained with the same settings."
        ),
    )
    add = parser.add_argument
    add(
        "--data",
        choices=sorted(DEFAULTS),
        default="digits",
        help="binarized 8x8 handwritten digits (default) or 4x4 bars and stripes",
    )
    add("--epochs", type=_positive_int, help="epochs (digits: 20, bars: 10)")
    add("--hidden", type=_positive_int, help="hidden units (digits: 128, bars: 16)")
    add("--lr", type=float, help="learning rate of both models (default: 0.05)")
    add("--batch-size", type=_positive_int, help="batch size (default: 10)")
    add("--k", type=_positive_int, help="Gibbs steps per CD-k gradient (default: 1)")
    add("--passes", type=_positive_int, help="passes over the data per epoch (digits: 1, bars: 50)")
    add("--seed", type=int, default=0, help="random seed (default: 0)")
    add("--out", type=Path, help="where to write the figure (default: rbm_<data>.png)")
    add("--no-progress", action="store_true", help="no progress bar, epoch lines only")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo from the command line.

    Trains jaxgrad's RBM with a progress bar and one line per epoch, then scikit-learn's
    `BernoulliRBM` with the same settings, prints a table of both, and writes a figure
    (`plot_results`) to the working folder.

    Args:
        argv: the arguments, without the program name; by default `sys.argv[1:]`.

    Returns:
        The exit status: 0 on success, 1 if a package of the `demo` extra is missing.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    settings = {
        name: value if (value := getattr(args, name)) is not None else default
        for name, default in DEFAULTS[args.data].items()
    }
    try:
        progress_module = _require("rich.progress", "rich")
        console = _require("rich.console", "rich").Console(highlight=False)
        if not console.is_terminal:
            console.width = 100  # rich's 80 for a pipe or a file cuts the table
        table_module = _require("rich.table", "rich")
        _require("sklearn.neural_network", "scikit-learn")
        _require("matplotlib.figure", "matplotlib")
        if args.data == "digits":
            data, held_out = binary_digits(seed=args.seed)
            what = f"{len(data)} binarized 8x8 digits, scored on {len(held_out)} held-out ones"
        else:
            data, held_out = bars_and_stripes(4), None
            what = f"the {len(bars_and_stripes(4))} 4x4 bars-and-stripes patterns"
    except MissingExtraError as error:
        print(error, file=sys.stderr)
        return 1
    n, n_visible = data.shape
    if settings["batch_size"] > n:
        parser.error(f"--batch-size must be at most {n}, the number of training samples")
    out = args.out or Path(f"rbm_{args.data}.png")

    epochs, k = settings["epochs"], settings["k"]
    console.print(
        f"RBM with {n_visible} visible and {settings['hidden']} hidden units on {what}: "
        f"jaxgrad (CD-{k}, ADAM) against scikit-learn's BernoulliRBM (PCD-1, SGD), "
        f"both with learning rate {settings['lr']}, batch size {settings['batch_size']}, "
        f"{epochs} epochs of {settings['passes']} pass(es)",
        markup=False,
        soft_wrap=True,
    )
    jax_settings = dict(settings)
    sk_settings = {key: value for key, value in settings.items() if key != "k"}
    steps_per_epoch = settings["passes"] * (n // settings["batch_size"])
    sk_steps_per_epoch = settings["passes"] * math.ceil(n / settings["batch_size"])
    with progress_module.Progress(
        console=console, transient=True, disable=args.no_progress or not console.is_terminal
    ) as progress:
        task = progress.add_task("jaxgrad", total=epochs * steps_per_epoch)
        jax_result = train(
            data,
            held_out=held_out,
            seed=args.seed,
            on_steps=lambda steps: progress.advance(task, steps),
            on_epoch=lambda stats: console.print(
                format_epoch(stats, epochs), markup=False, soft_wrap=True
            ),
            **jax_settings,
        )
        task = progress.add_task("scikit-learn", total=epochs * sk_steps_per_epoch)
        sk_result = fit_sklearn(
            data,
            held_out=held_out,
            seed=args.seed,
            on_steps=lambda steps: progress.advance(task, steps),
            **sk_settings,
        )
    results = {"jaxgrad": jax_result, "scikit-learn": sk_result}

    scored_on = "held-out" if held_out is not None else "training"
    table = table_module.Table(
        title=f"After {epochs} epochs; PLL: pseudo-log-likelihood of the {scored_on} data"
    )
    rows = comparison_rows(results, k=k)
    for column in rows[0]:
        table.add_column(column, justify="left" if column in ("model", "training") else "right")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    gap = jax_result.history[-1].pseudo_log_likelihood - sk_result.history[-1].pseudo_log_likelihood
    console.print(
        f"jaxgrad's pseudo-log-likelihood is {abs(gap):.2f} nats "
        f"{'above' if gap >= 0 else 'below'} scikit-learn's.",
        markup=False,
        soft_wrap=True,
    )
    figure = plot_results(results)
    figure.savefig(out, dpi=100)
    console.print(f"figure: {out.resolve()}", markup=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
