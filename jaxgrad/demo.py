"""Train a Bernoulli RBM on bars and stripes with contrastive divergence and jaxgrad.

Run it with ``python -m jaxgrad.demo`` (``--help`` lists the options). The data set is
built in code: every 4x4 binary image whose rows are all equal (horizontal bars) or whose
columns are all equal (vertical stripes), 30 distinct patterns of 16 pixels.

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

With 16 visible units the partition function can be computed exactly (a sum over all
2**16 visible states), so each epoch reports the exact mean log-likelihood of the data
alongside the reconstruction error and `jaxgrad.grad_magnitude` of the CD gradient. A
model that puts all its mass evenly on the 30 patterns scores log(1/30) = -3.40; the
untrained model scores about 16 * log(1/2) = -11.09.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxgrad

from ._typing import Array, ArrayLike, PyTree

MAX_ENUMERATED_UNITS = 20
"""The largest layer `log_partition` sums over exactly (2**20 states)."""

_RICH_MISSING = "the demo needs rich: pip install 'jaxgrad[demo]' (or run it with --no-progress)"


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
    return reconstruction_error(params, data), mean_log_likelihood(params, data)


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """Metrics of one training epoch.

    Attributes:
        epoch: the epoch number, from 1.
        reconstruction_error: the mean squared reconstruction error on the data after
            the epoch.
        log_likelihood: the exact mean log-likelihood of the data after the epoch, in
            nats.
        grad_magnitude: the mean over the epoch's steps of `jaxgrad.grad_magnitude` of
            the CD gradient.
    """

    epoch: int
    reconstruction_error: float
    log_likelihood: float
    grad_magnitude: float


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` returns: the trained parameters and one `EpochStats` per epoch.

    Attributes:
        params: the trained RBM parameters, a `jaxgrad.Gradient`.
        history: the metrics of each epoch, in order.
    """

    params: PyTree
    history: list[EpochStats]


def train(
    data: ArrayLike | None = None,
    *,
    epochs: int = 20,
    hidden: int = 16,
    lr: float = 0.02,
    lr_decay: float = 0.85,
    batch_size: int = 10,
    k: int = 1,
    passes: int = 60,
    init_scale: float = 0.1,
    seed: int = 0,
    on_steps: Callable[[int], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Train a Bernoulli RBM with CD-k and ADAM; deterministic given `seed`.

    Each epoch makes `passes` passes over the data, each in a fresh random order and cut
    into batches of `batch_size` (a last, short batch is dropped), then evaluates the
    model on `data`. The learning rate of epoch `e` (from 1) is
    `lr * lr_decay**(e - 1)`: CD-1 is biased, and a decaying step lets the model settle
    instead of wandering. Nothing is printed; pass `on_steps` and `on_epoch` to report
    progress.

    Args:
        data: binary data of shape `(n, n_visible)`; by default `bars_and_stripes(4)`.
            It must have a layer small enough for `log_partition`.
        epochs: the number of epochs, at least 1.
        hidden: the number of hidden units, at least 1.
        lr: ADAM's learning rate in the first epoch.
        lr_decay: the factor applied to the learning rate after each epoch.
        batch_size: the number of samples per step, from 1 to `n`.
        k: the number of Gibbs steps in the CD gradient, at least 1.
        passes: the number of passes over the data per epoch, at least 1.
        init_scale: the standard deviation of the initial weights.
        seed: the seed of every random choice (initial weights, order, sampling).
        on_steps: called after each pass with the number of training steps it made.
        on_epoch: called with each epoch's `EpochStats`.

    Returns:
        A `TrainResult` with the final parameters and one `EpochStats` per epoch.

    Raises:
        ValueError: if `data` is not a non-empty 2-d array, an integer argument is out of
            range, or both layers are too large for `log_partition`.
    """
    samples = jnp.asarray(bars_and_stripes(4) if data is None else data, jnp.float32)
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise ValueError(f"`data` must have shape (n, n_visible) with n >= 1; got {samples.shape}.")
    n, n_visible = samples.shape
    for name, value in [("epochs", epochs), ("hidden", hidden), ("k", k), ("passes", passes)]:
        if value < 1:
            raise ValueError(f"`{name}` must be at least 1; got {value}.")
    if min(n_visible, hidden) > MAX_ENUMERATED_UNITS:
        raise ValueError(
            f"`data` or `hidden` must have at most {MAX_ENUMERATED_UNITS} units, so that the "
            f"exact log-likelihood can be computed; got {n_visible} visible and {hidden} hidden."
        )
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"`batch_size` must be from 1 to the number of samples, {n}; got {batch_size}."
        )

    init_key, train_key = jax.random.split(jax.random.key(seed))
    params = init_params(n_visible, hidden, init_key, scale=init_scale)
    state = adam_init(params)
    history = []
    for epoch in range(1, epochs + 1):
        epoch_key = jax.random.fold_in(train_key, epoch)
        epoch_lr = lr * lr_decay ** (epoch - 1)
        magnitudes = []
        for i in range(passes):
            params, state, pass_magnitudes = _train_pass(
                params, state, samples, epoch_key, i, epoch_lr, batch_size, k
            )
            magnitudes.append(pass_magnitudes)
            if on_steps is not None:
                on_steps(n // batch_size)
        error, log_likelihood = _evaluate(params, samples)
        stats = EpochStats(
            epoch=epoch,
            reconstruction_error=float(error),
            log_likelihood=float(log_likelihood),
            grad_magnitude=float(jnp.mean(jnp.concatenate(magnitudes))),
        )
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return TrainResult(params=params, history=history)


# Command line ---------------------------------------------------------------------------


def format_epoch(stats: EpochStats, epochs: int) -> str:
    """The line printed for one epoch.

    Args:
        stats: the epoch's metrics.
        epochs: the total number of epochs (sets the width of the epoch number).

    Returns:
        One line of text, without a newline.
    """
    width = len(str(epochs))
    return (
        f"epoch {stats.epoch:>{width}}/{epochs}  "
        f"recon mse {stats.reconstruction_error:.5f}  "
        f"log-likelihood {stats.log_likelihood:8.4f}  "
        f"grad magnitude {stats.grad_magnitude:.5f}"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxgrad.demo",
        description="Train an RBM on 4x4 bars and stripes with CD-k, ADAM and jaxgrad.",
    )
    add = parser.add_argument
    add("--epochs", type=_positive_int, default=20, help="epochs (default: 20)")
    add("--hidden", type=_positive_int, default=16, help="hidden units (default: 16)")
    add("--seed", type=int, default=0, help="random seed (default: 0)")
    add("--lr", type=float, default=0.02, help="ADAM learning rate of epoch 1 (default: 0.02)")
    add("--batch-size", type=_positive_int, default=10, help="batch size (default: 10)")
    add("--k", type=_positive_int, default=1, help="Gibbs steps per CD-k gradient (default: 1)")
    add(
        "--passes",
        type=_positive_int,
        default=60,
        help="passes over the data per epoch (default: 60)",
    )
    add("--no-progress", action="store_true", help="print epoch lines only, no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo from the command line: train, printing one line per epoch.

    Args:
        argv: the arguments, without the program name; by default `sys.argv[1:]`.

    Returns:
        The exit status: 0 on success, 1 if a progress bar was asked for and rich is not
        installed.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    data = bars_and_stripes(4)
    n, n_visible = data.shape
    if args.batch_size > n:
        parser.error(f"--batch-size must be at most {n}, the number of patterns")
    run = functools.partial(
        train,
        data,
        epochs=args.epochs,
        hidden=args.hidden,
        lr=args.lr,
        batch_size=args.batch_size,
        k=args.k,
        passes=args.passes,
        seed=args.seed,
    )

    header = (
        f"RBM with {n_visible} visible and {args.hidden} hidden units, CD-{args.k}, "
        f"ADAM (lr {args.lr}), on the {n} 4x4 bars-and-stripes patterns\n"
        f"exact mean log-likelihood of the data: {n_visible * math.log(0.5):.4f} for a "
        f"uniform model, {math.log(1 / n):.4f} at best"
    )
    if args.no_progress:
        print(header)
        result = run(on_epoch=lambda stats: print(format_epoch(stats, args.epochs)))
    else:
        try:
            from rich.progress import Progress
        except ImportError:
            print(_RICH_MISSING, file=sys.stderr)
            return 1
        print(header)
        with Progress(transient=True, disable=not sys.stdout.isatty()) as progress:
            task = progress.add_task(
                "training", total=args.epochs * args.passes * (n // args.batch_size)
            )
            result = run(
                on_steps=lambda steps: progress.advance(task, steps),
                on_epoch=lambda stats: progress.console.print(
                    format_epoch(stats, args.epochs), markup=False, highlight=False
                ),
            )
    first, last = result.history[0], result.history[-1]
    print(
        f"log-likelihood {first.log_likelihood:.4f} after epoch 1, "
        f"{last.log_likelihood:.4f} after epoch {last.epoch}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
