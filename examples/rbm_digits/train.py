"""Training: CD-k with paysage's ADAM, written with `jaxgrad.grad_mapzip`.

`train` runs CD-k and ADAM inside one `jax.jit`-compiled pass over the data (the steps
under `jax.lax.scan`) and scores each epoch (`epoch_stats`); `sklearn_rbm.fit_sklearn`
trains scikit-learn's peer with the same settings and scores it with the same function.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxgrad

from . import rbm
from .rbm import PyTree


class AdamState(NamedTuple):
    """ADAM's state: the step count and two trees shaped like the parameters.

    Attributes:
        step: the number of updates done, an int32 scalar.
        mean: the running mean of the gradient.
        mean_square: the running mean of the squared gradient.
    """

    step: jax.Array
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
    lr: jax.typing.ArrayLike,
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


@functools.partial(jax.jit, static_argnames=("k",))
def train_step(
    params: PyTree,
    state: AdamState,
    batch: jax.Array,
    key: jax.Array,
    lr: jax.typing.ArrayLike,
    k: int = 1,
) -> tuple[PyTree, AdamState, jax.Array]:
    """One compiled training step: a CD-k gradient and an ADAM update.

    Args:
        params: RBM parameters as made by `rbm.init_params`.
        state: the `AdamState` for `params`.
        batch: binary data of shape `(batch, n_visible)`.
        key: a `jax.random` key for the Gibbs sampling.
        lr: the learning rate.
        k: the number of Gibbs steps (static: each value compiles once).

    Returns:
        The new parameters, the new ADAM state, and `jaxgrad.grad_rms` of the CD
        gradient.
    """
    grad = rbm.cd_gradient(params, batch, key, k)
    params, state = adam_update(params, grad, state, lr=lr)
    return params, state, jaxgrad.grad_rms(grad)


@functools.partial(jax.jit, static_argnames=("batch_size", "k"))
def _train_pass(
    params: PyTree,
    state: AdamState,
    data: jax.Array,
    key: jax.Array,
    index: jax.typing.ArrayLike,
    lr: jax.typing.ArrayLike,
    batch_size: int,
    k: int,
) -> tuple[PyTree, AdamState, jax.Array]:
    """Pass number `index` over the data: shuffle, batch, then `train_step` under `lax.scan`."""
    order_key, sample_key = jax.random.split(jax.random.fold_in(key, index))
    steps = data.shape[0] // batch_size
    order = jax.random.permutation(order_key, data.shape[0])[: steps * batch_size]
    batches = data[order].reshape(steps, batch_size, data.shape[1])

    def body(carry: tuple[PyTree, AdamState], xs: tuple[jax.Array, jax.Array]) -> Any:
        params, state, magnitude = train_step(*carry, xs[0], xs[1], lr, k)
        return (params, state), magnitude

    (params, state), magnitudes = jax.lax.scan(
        body, (params, state), (batches, jax.random.split(sample_key, steps))
    )
    return params, state, magnitudes


@jax.jit
def _evaluate(params: PyTree, data: jax.Array) -> tuple[jax.Array, jax.Array]:
    return rbm.pseudo_log_likelihood(params, data), rbm.reconstruction_error(params, data)


_exact_log_likelihood = jax.jit(rbm.mean_log_likelihood)


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """Metrics of one training epoch, measured on the evaluation data after the epoch.

    The evaluation data are the held-out data when `train` or `sklearn_rbm.fit_sklearn`
    is given some, else the training data.

    Attributes:
        epoch: the epoch number, from 1.
        pseudo_log_likelihood: `rbm.pseudo_log_likelihood` of the evaluation data (nats).
        reconstruction_error: `rbm.reconstruction_error` of the evaluation data.
        grad_magnitude: the mean over the epoch's steps of `jaxgrad.grad_rms` of
            the CD gradient; `None` for scikit-learn, which does not expose it.
        log_likelihood: the exact mean log-likelihood of the evaluation data, in nats,
            where `rbm.is_enumerable`; else `None`.
    """

    epoch: int
    pseudo_log_likelihood: float
    reconstruction_error: float
    grad_magnitude: float | None
    log_likelihood: float | None


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` and `sklearn_rbm.fit_sklearn` return.

    Attributes:
        params: the trained RBM parameters, laid out as by `rbm.init_params`.
        history: the metrics of each epoch, in order.
        grad_magnitudes: `jaxgrad.grad_rms` of the CD gradient of every training
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


def as_data(name: str, data: jax.typing.ArrayLike, n_visible: int | None = None) -> jax.Array:
    """`data` as a float32 array of shape `(n, n_visible)`, n >= 1; else a `ValueError`."""
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


def check_settings(n: int, lr: float, **values: int) -> None:
    """Raise a `ValueError` unless `lr` > 0, every value >= 1 and `batch_size` <= `n`."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"`lr` must be a positive, finite number; got {lr}.")
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"`{name}` must be at least 1; got {value}.")
    if values["batch_size"] > n:
        raise ValueError(
            f"`batch_size` must be from 1 to the number of samples, {n}; "
            f"got {values['batch_size']}."
        )


def epoch_stats(
    epoch: int, params: PyTree, data: jax.Array, grad_magnitude: float | None
) -> EpochStats:
    """The `EpochStats` of `params` on `data` (the exact log-likelihood where enumerable)."""
    pll, error = _evaluate(params, data)
    exact = float(_exact_log_likelihood(params, data)) if rbm.is_enumerable(params) else None
    return EpochStats(
        epoch=epoch,
        pseudo_log_likelihood=float(pll),
        reconstruction_error=float(error),
        grad_magnitude=grad_magnitude,
        log_likelihood=exact,
    )


def train(
    data: jax.typing.ArrayLike,
    *,
    held_out: jax.typing.ArrayLike | None = None,
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
    `lr * lr_decay**(e - 1)`. The training pass is compiled once before training
    starts. Nothing is printed; pass `on_steps` and `on_epoch` to report progress.

    Args:
        data: binary training data of shape `(n, n_visible)`.
        held_out: binary data of shape `(m, n_visible)` to evaluate on, or `None` to
            evaluate on `data`.
        epochs: the number of epochs, at least 1.
        hidden: the number of hidden units, at least 1.
        lr: ADAM's learning rate in the first epoch, positive and finite.
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
            number of columns, or a setting is out of range.
    """
    samples = as_data("data", data)
    n, n_visible = samples.shape
    evaluation = samples if held_out is None else as_data("held_out", held_out, n_visible)
    check_settings(n, lr, epochs=epochs, hidden=hidden, k=k, passes=passes, batch_size=batch_size)

    init_key, train_key = jax.random.split(jax.random.key(seed))
    params = rbm.init_params(n_visible, hidden, init_key, scale=init_scale)
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
        mean_magnitude = float(np.mean(np.concatenate(epoch_magnitudes)))
        stats = epoch_stats(epoch, params, evaluation, mean_magnitude)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return TrainResult(params, history, np.concatenate(magnitudes), train_seconds, compile_seconds)
