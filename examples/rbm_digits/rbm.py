"""The Bernoulli RBM: parameters as a `jaxgrad.Gradient`, its CD-k gradient and its scores.

The parameters keep paysage's layout: `Gradient(layers=[{"bias": a}, {"bias": b}],
weights=[{"W": W}])`, the visible biases `a`, the hidden biases `b` and the weights `W`
of shape `(n_visible, n_hidden)`, with energy `E(v, h) = -a.v - b.h - v.W.h`. The
contrastive-divergence gradient has the same layout, so the optimizer (in `train`) is a
few `jaxgrad.grad_mapzip` calls over such trees.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import jax
import jax.numpy as jnp

import jaxgrad

PyTree: TypeAlias = Any
"""RBM parameters or a gradient: a `jaxgrad.Gradient` laid out as by `init_params`."""

MAX_ENUMERATED_UNITS = 20
"""The largest layer `log_partition` sums over exactly (2**20 states)."""


def init_params(n_visible: int, n_hidden: int, key: jax.Array, *, scale: float = 0.1) -> PyTree:
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

    def sampler(k: jax.Array, shape: tuple[int, ...], dtype: jax.typing.DTypeLike) -> jax.Array:
        return scale * jax.random.normal(k, shape, dtype)

    weights = jaxgrad.random_grad(
        [{"W": jnp.zeros((n_visible, n_hidden), jnp.float32)}], key, sampler=sampler
    )
    layers = [
        {"bias": jnp.zeros(n_visible, jnp.float32)},
        {"bias": jnp.zeros(n_hidden, jnp.float32)},
    ]
    return jaxgrad.Gradient(layers=layers, weights=weights)


def unpack(params: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The visible biases, hidden biases and weights `(a, b, W)` of RBM parameters."""
    return params.layers[0]["bias"], params.layers[1]["bias"], params.weights[0]["W"]


def free_energy(params: PyTree, visible: jax.Array) -> jax.Array:
    """The free energy of visible states: `-log sum_h exp(-E(v, h))`.

    Summing out the binary hidden units gives `F(v) = -a.v - sum_j softplus(b_j + (v W)_j)`.

    Args:
        params: RBM parameters as made by `init_params`.
        visible: an array of shape `(batch, n_visible)`.

    Returns:
        An array of shape `(batch,)`.
    """
    a, b, w = unpack(params)
    return -(visible @ a) - jnp.sum(jax.nn.softplus(visible @ w + b), axis=-1)


def _binary_states(n: int) -> jax.Array:
    """All `2**n` binary vectors of length `n`, as float32 rows."""
    codes = jnp.arange(2**n, dtype=jnp.int32)[:, None]
    return ((codes >> jnp.arange(n, dtype=jnp.int32)) & 1).astype(jnp.float32)


def log_partition(params: PyTree) -> jax.Array:
    """The exact log partition function `log Z` of an RBM, by enumerating one layer.

    Sums over every state of the smaller layer with the other layer summed out in closed
    form, so it is exact and cheap while that layer has at most `MAX_ENUMERATED_UNITS`
    units.

    Args:
        params: RBM parameters as made by `init_params`.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: if both layers have more than `MAX_ENUMERATED_UNITS` units.
    """
    a, b, w = unpack(params)
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


def is_enumerable(params: PyTree) -> bool:
    """Whether `log_partition` (hence the exact log-likelihood) can be computed."""
    return min(unpack(params)[2].shape) <= MAX_ENUMERATED_UNITS


def _bernoulli(key: jax.Array, probs: jax.Array) -> jax.Array:
    return (jax.random.uniform(key, probs.shape, probs.dtype) < probs).astype(probs.dtype)


def cd_gradient(params: PyTree, batch: jax.Array, key: jax.Array, k: int = 1) -> PyTree:
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
    a, b, w = unpack(params)
    hidden_probs_data = jax.nn.sigmoid(batch @ w + b)

    def gibbs_step(chain: tuple[jax.Array, jax.Array], keys: jax.Array) -> tuple[Any, None]:
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


def sample(params: PyTree, key: jax.Array, *, chains: int = 16, steps: int = 1000) -> jax.Array:
    """Samples of the model: block Gibbs chains started from coin flips.

    Each chain starts at visible units drawn with probability 1/2 and alternates hidden
    and visible draws `steps` times; the result is the probability of each visible unit
    given the last hidden state (smoother to look at than the binary draw).

    Args:
        params: RBM parameters as made by `init_params`.
        key: a `jax.random` key.
        chains: the number of independent chains.
        steps: the number of Gibbs steps per chain, at least 1.

    Returns:
        A float32 array of shape `(chains, n_visible)` with entries in [0, 1].

    Raises:
        ValueError: if `chains` or `steps` is less than 1.
    """
    if chains < 1 or steps < 1:
        raise ValueError(f"`chains` and `steps` must be at least 1; got {chains} and {steps}.")
    a, b, w = unpack(params)
    start_key, chain_key = jax.random.split(key)
    visible = _bernoulli(start_key, jnp.full((chains, w.shape[0]), 0.5, jnp.float32))

    def gibbs_step(visible: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        hidden = _bernoulli(keys[0], jax.nn.sigmoid(visible @ w + b))
        probs = jax.nn.sigmoid(hidden @ w.T + a)
        return _bernoulli(keys[1], probs), probs

    _, probs = jax.lax.scan(gibbs_step, visible, jax.random.split(chain_key, (steps, 2)))
    return probs[-1]


def reconstruction_error(params: PyTree, data: jax.Array) -> jax.Array:
    """Mean squared error of a deterministic (mean-field) up-down pass over the data.

    Args:
        params: RBM parameters as made by `init_params`.
        data: binary data of shape `(batch, n_visible)`.

    Returns:
        A float32 scalar.
    """
    a, b, w = unpack(params)
    reconstruction = jax.nn.sigmoid(jax.nn.sigmoid(data @ w + b) @ w.T + a)
    return jnp.mean(jnp.square(data - reconstruction))


def mean_log_likelihood(params: PyTree, data: jax.Array) -> jax.Array:
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


def pseudo_log_likelihood(params: PyTree, data: jax.Array) -> jax.Array:
    """The mean pseudo-log-likelihood of the data: `sum_i log P(v_i | v_-i)`, averaged.

    For each sample and each visible unit `i`, the log-probability of the unit's value
    given all the other units is `log sigmoid(F(v with unit i flipped) - F(v))`, with `F`
    the `free_energy`. The sum over all units is averaged over the samples: an exact,
    deterministic estimator, where scikit-learn's `BernoulliRBM.score_samples` flips one
    random unit per sample and multiplies by the number of units (the same quantity in
    expectation, with sampling noise). It rewards a model that predicts each unit from
    the others, which is not the same as a good density: on bars and stripes it climbs
    to 0 while the exact log-likelihood falls.

    Args:
        params: RBM parameters as made by `init_params`.
        data: binary data of shape `(batch, n_visible)`.

    Returns:
        A float32 scalar, in nats (0 at best; `-n_visible * log 2` for a model that
        ignores its input).
    """
    a, b, w = unpack(params)
    pre_activation = data @ w + b  # (batch, n_hidden)
    sign = 1 - 2 * data  # flipping unit i adds sign_i * W_i to the pre-activation
    flipped = pre_activation[:, None, :] + sign[:, :, None] * w  # (batch, n_visible, n_hidden)
    softplus_sum = jnp.sum(jax.nn.softplus(pre_activation), axis=-1)
    energy_gap = -sign * a - jnp.sum(jax.nn.softplus(flipped), axis=-1) + softplus_sum[:, None]
    return jnp.mean(jnp.sum(jax.nn.log_sigmoid(energy_gap), axis=-1))
