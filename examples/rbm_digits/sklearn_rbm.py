"""The peer: scikit-learn's `BernoulliRBM`, trained with the same settings and scored alike.

scikit-learn trains with persistent CD-1 and plain SGD; `fit_sklearn` gives it the data,
hidden units, learning rate, batch size and epochs of `train.train`, and scores every
epoch with `train.epoch_stats`, so the two models are compared on the same measures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxgrad

from . import train
from .data import require
from .rbm import PyTree


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


def fit_sklearn(
    data: jax.typing.ArrayLike,
    *,
    held_out: jax.typing.ArrayLike | None = None,
    epochs: int = 20,
    hidden: int = 128,
    lr: float = 0.05,
    batch_size: int = 10,
    passes: int = 1,
    seed: int = 0,
    replay: bool = True,
    on_steps: Callable[[int], None] | None = None,
    on_epoch: Callable[[train.EpochStats], None] | None = None,
) -> train.TrainResult:
    """Train scikit-learn's `BernoulliRBM` with the settings of `train.train`; score it alike.

    The model is `BernoulliRBM(n_components=hidden, learning_rate=lr,
    batch_size=batch_size, n_iter=epochs * passes, random_state=seed)`, fitted with
    `fit` on the data as float64; `train_seconds` is the wall time of that call. For
    the per-epoch metrics, the same training is then replayed batch by batch with
    `partial_fit`, which draws the same random numbers in the same order, so it passes
    through the same parameters (the tests check that it ends where `fit` did).

    Args:
        data: binary training data of shape `(n, n_visible)`.
        held_out: binary data to evaluate on, or `None` to evaluate on `data`.
        epochs: the number of epochs, at least 1.
        hidden: the number of hidden units, at least 1.
        lr: the SGD learning rate, positive and finite.
        batch_size: the number of samples per step, from 1 to `n`.
        passes: the number of passes over the data per epoch, at least 1.
        seed: scikit-learn's `random_state`.
        replay: whether to replay the training for the metrics of every epoch; if
            `False`, `history` holds the last epoch only, and `on_steps` is not called.
        on_steps: called after each pass of the replay with the number of steps it made.
        on_epoch: called with each epoch's `EpochStats`.

    Returns:
        A `TrainResult` with the parameters of the fitted model
        (`params_from_sklearn`), an empty `grad_magnitudes` and no `compile_seconds`.

    Raises:
        ValueError: as `train.train`.
        MissingExtraError: if scikit-learn is not installed.
    """
    neural_network = require("sklearn.neural_network", "scikit-learn")
    gen_even_slices = require("sklearn.utils", "scikit-learn").gen_even_slices
    samples = train.as_data("data", data)
    n, n_visible = samples.shape
    evaluation = samples if held_out is None else train.as_data("held_out", held_out, n_visible)
    train.check_settings(n, lr, epochs=epochs, hidden=hidden, passes=passes, batch_size=batch_size)
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

    def report(epoch: int, params: PyTree) -> None:
        stats = train.epoch_stats(epoch, params, evaluation, None)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)

    history: list[train.EpochStats] = []
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
            report(epoch, params_from_sklearn(replayed))
    else:
        report(epochs, params_from_sklearn(fitted))
    params = params_from_sklearn(fitted)
    return train.TrainResult(params, history, np.zeros(0, np.float32), train_seconds, None)
