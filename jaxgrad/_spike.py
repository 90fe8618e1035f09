"""Spike guard: skip or clip a step whose gradient norm (or loss) is an outlier.

`spike_init` builds the guard's state, `spike_check` decides one step from the step's
norms (and loss) against statistics of the steps before it, and `keep_if_skipped` keeps
the old value of any pytree where the step was skipped. Every decision is a select,
never a `lax.cond`; the state has fixed shapes. See docs/spike_guard.md.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from ._checks import check_axis_name, check_same_structure
from ._clip import ClipStats
from ._naming import By, logger_dict, resolve_groups
from ._numerics import AxisName
from ._stats import GroupStats
from ._typing import Array, ArrayLike, PyTree

Statistics = Literal["window", "ema", "zclip"]
Mode = Literal["skip", "clip", "clip_reciprocal"]
Admit = Literal["none", "all", "scaled"]
LOSS = "loss"
"""The name of the loss entry of a guard that watches the loss."""


@dataclasses.dataclass(frozen=True)
class _Config:
    """The guard's settings: static, hashable, kept in the state (one compilation each)."""

    statistics: Statistics
    window: int
    decay: float
    z: float
    warmup: int
    patience: int
    mode: Mode
    admit: Admit
    watch: tuple[str, ...] | None
    loss: bool


def _float() -> Any:
    """float32, or float64 under x64: the dtype of the norms of float32 gradients."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


# -- what one step decided ------------------------------------------------------------------


def _entry_keys(field: str, names: tuple[str, ...]) -> list[str]:
    """Logger keys of a per-entry field: `field`, `field/<group>`, and `field/loss`."""
    return [f"{field}/{name}" if name else field for name in names]


@dataclasses.dataclass(frozen=True)
class SpikeDecision:
    """What the spike guard decided for one step, and the numbers it decided from.

    A pytree (the entry names are static): return it from `jax.jit`, stack it with
    `jax.lax.scan`, pass it to `keep_if_skipped`. Entry 0 of the per-entry arrays is the
    whole gradient (name `""`), then the groups of `by=` (as in `grad_stats`), then,
    when the guard watches the loss, the loss (name `"loss"`).

    Attributes:
        skipped: 0-d bool: do not apply this step (a non-finite gradient or loss, or an
            outlier in `mode="skip"`, or a loss outlier in a clip mode).
        clipped: 0-d bool: the gradient is to be multiplied by `scale` (< 1).
        finite: 0-d bool: every watched value (norms and loss) was finite.
        scale: 0-d float: the factor for the gradient, 1 unless `clipped`.
        value: the step's norm of each entry (and the loss), before any clip.
        zscore: `(value - mean) / std` of each entry against the statistics of the
            steps before this one (0 while they are empty).
        threshold: `mean + z * std` of each entry; `inf` during the warm-up.
        outlier: which entries exceeded their threshold (watched entries only).
        names: the static entry names.

    Example:
        >>> state = jaxgrad.spike_init(window=16, warmup=3)
        >>> for norm in [1.0, 1.2, 1.1, 9.0]:
        ...     decision, state = jaxgrad.spike_check(state, jnp.asarray(norm))
        >>> bool(decision.skipped), round(decision.as_dict()["threshold"], 2)
        (True, 1.59)
    """

    skipped: Array
    clipped: Array
    finite: Array
    scale: Array
    value: Array
    zscore: Array
    threshold: Array
    outlier: Array
    names: tuple[str, ...]

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """A flat dict for a logger, read from the device in one transfer.

        Keys: `skipped`, `clipped`, `finite`, `scale`, and per entry `norm`, `zscore`,
        `threshold` (`norm/<group>`, ..., and `loss`, `zscore/loss`, `threshold/loss`
        for the loss), each under `prefix`. Values are Python numbers, or numpy arrays
        for decisions stacked by `jax.lax.scan`.

        Args:
            prefix: prepended to every key, e.g. `"spike/"`.

        Returns:
            A dict from `str` to numbers or numpy arrays.

        Raises:
            TypeError: if called on traced values (inside `jax.jit`).

        Example:
            >>> state = jaxgrad.spike_init()
            >>> decision, _ = jaxgrad.spike_check(state, jnp.asarray(2.0))
            >>> decision.as_dict()
            {'skipped': False, 'clipped': False, 'finite': True, 'scale': 1.0, 'norm': 2.0, 'zscore': 0.0, 'threshold': inf}
        """  # noqa: E501
        flags = {"skipped": self.skipped, "clipped": self.clipped, "finite": self.finite}
        flags["scale"] = self.scale
        out = logger_dict("SpikeDecision", {k: v[..., None] for k, v in flags.items()}, ("",), "")
        per_entry = logger_dict(
            "SpikeDecision",
            {"norm": self.value, "zscore": self.zscore, "threshold": self.threshold},
            self.names,
            "",
        )
        if self.names and self.names[-1] == LOSS and len(self.names) > 1:
            per_entry[LOSS] = per_entry.pop(f"norm/{LOSS}")
        out.update(per_entry)
        return {f"{prefix}{key}": value for key, value in out.items()}


jax.tree_util.register_dataclass(
    SpikeDecision,
    data_fields=[
        "skipped",
        "clipped",
        "finite",
        "scale",
        "value",
        "zscore",
        "threshold",
        "outlier",
    ],
    meta_fields=["names"],
)


# -- the state --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpikeState:
    """The spike guard's statistics, counters and last decision, with fixed shapes.

    Built by `spike_init`, advanced by `spike_check` (or inside
    `jaxgrad.optax.spike_guard`). A pytree whose shapes and dtypes never change, so it
    can be a `jax.lax.scan` carry or a donated argument; the settings and entry names
    are static. Read it on the host with `as_dict()`.

    Attributes:
        history: `(window, entries)`: the last accepted values (ring buffer; empty
            for the moving-average statistics).
        position: the next slot of the ring buffer.
        count: how many values the statistics hold (at most `window` for the window).
        warm: whether the warm-up is over (it stays over after a re-baseline).
        moment1: the (bias-corrected) moving mean of the values, per entry (`"ema"`
            and `"zclip"`).
        moment2: their moving variance, per entry (`"ema"`: the bias-corrected average
            of the squares less the squared mean, updated without cancellation).
        pending: `(patience, entries)`: the outliers of the current run of outliers.
        run: how many consecutive outlier steps precede this one.
        steps: steps seen; skips: steps skipped; clips: steps clipped (0-d int32).
        last: the `SpikeDecision` of the last step.
        names: the static entry names; config: the static settings.

    Example:
        >>> state = jaxgrad.spike_init({"w": jnp.zeros(2), "b": jnp.zeros(1)}, by="leaf")
        >>> state.names, state.history.shape
        (('', 'b', 'w'), (128, 3))
    """

    history: Array
    position: Array
    count: Array
    warm: Array
    moment1: Array
    moment2: Array
    pending: Array
    run: Array
    steps: Array
    skips: Array
    clips: Array
    last: SpikeDecision
    names: tuple[str, ...]
    config: _Config

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """The counters and the last decision as a flat logger dict, in one transfer.

        Keys: `steps`, `skips`, `clips` (counts since `spike_init`), then the keys of
        `SpikeDecision.as_dict` for the last step, all under `prefix`.

        Args:
            prefix: prepended to every key, e.g. `"spike/"`.

        Returns:
            A dict from `str` to numbers or numpy arrays.

        Raises:
            TypeError: if called on traced values (inside `jax.jit`).

        Example:
            >>> state = jaxgrad.spike_init()
            >>> _, state = jaxgrad.spike_check(state, jnp.asarray(jnp.nan))
            >>> logs = state.as_dict(prefix="spike/")
            >>> logs["spike/steps"], logs["spike/skips"], logs["spike/skipped"]
            (1, 1, True)
        """
        counters = {"steps": self.steps, "skips": self.skips, "clips": self.clips}
        out = logger_dict("SpikeState", {k: v[..., None] for k, v in counters.items()}, ("",), "")
        out.update(self.last.as_dict())
        return {f"{prefix}{key}": value for key, value in out.items()}


jax.tree_util.register_dataclass(
    SpikeState,
    data_fields=[
        "history",
        "position",
        "count",
        "warm",
        "moment1",
        "moment2",
        "pending",
        "run",
        "steps",
        "skips",
        "clips",
        "last",
    ],
    meta_fields=["names", "config"],
)


class SpikeGuardState(NamedTuple):
    """The state of `jaxgrad.optax.spike_guard`: the guard's state and the inner state.

    A NamedTuple, as optax states are, so that
    `optax.tree_utils.tree_get(opt_state, "spike_guard")` finds the `SpikeState`
    wherever the guard sits (optax's tree utilities search NamedTuple fields).

    Attributes:
        spike_guard: the `SpikeState` (statistics, counters, last decision).
        inner_state: the state of the guarded transformation, untouched by a skipped
            step.

    Example:
        >>> import optax
        >>> from jaxgrad.optax import spike_guard
        >>> state = spike_guard(optax.sgd(0.1)).init({"w": jnp.zeros(2)})
        >>> optax.tree_utils.tree_get(state, "spike_guard").as_dict()["steps"]
        0
    """

    spike_guard: SpikeState
    inner_state: Any


# -- argument checks ----------------------------------------------------------------------------


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int; got {type(value).__name__} {value!r}.")
    if int(value) < low:
        raise ValueError(f"`{name}` must be at least {low}; got {value!r}.")
    return int(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}; got {value!r}.")
    return value


def _config(
    *,
    statistics: Any,
    window: Any,
    decay: Any,
    z: Any,
    warmup: Any,
    patience: Any,
    mode: Any,
    admit: Any,
    watch: Any,
    loss: Any,
) -> _Config:
    statistics = _check_choice("statistics", statistics, ("window", "ema", "zclip"))
    mode = _check_choice("mode", mode, ("skip", "clip", "clip_reciprocal"))
    admit = _check_choice("admit", admit, ("none", "all", "scaled"))
    window = _check_int("window", window, 1)
    warmup = _check_int("warmup", warmup, 1)
    patience = 0 if patience is None else _check_int("patience", patience, 1)
    if isinstance(decay, (bool, np.bool_)) or not isinstance(decay, numbers.Real):
        raise TypeError(f"`decay` must be a real number in (0, 1); got {decay!r}.")
    if not 0 < float(decay) < 1:
        raise ValueError(f"`decay` must be in (0, 1) (the weight of the past); got {decay!r}.")
    if isinstance(z, (bool, np.bool_)) or not isinstance(z, numbers.Real):
        raise TypeError(f"`z` must be a positive real number; got {z!r}.")
    if not 0 < float(z) < math.inf:
        raise ValueError(f"`z` must be a positive finite number; got {z!r}.")
    if statistics == "window" and warmup > window:
        raise ValueError(
            f"`warmup` must be at most `window` with `statistics='window'`; got "
            f"warmup={warmup}, window={window}."
        )
    if statistics == "window" and patience + 1 > window:
        raise ValueError(
            f"`patience` must be below `window` (a re-baseline refills the window with the "
            f"last `patience + 1` values); got patience={patience}, window={window}."
        )
    if not isinstance(loss, (bool, np.bool_)):
        raise TypeError(f"`loss` must be a bool; got {type(loss).__name__} {loss!r}.")
    if watch is not None:
        if isinstance(watch, str) or not all(isinstance(name, str) for name in watch):
            raise TypeError(
                f"`watch` must be a sequence of entry names (str) or None; got {watch!r}."
            )
        watch = tuple(watch)
    return _Config(
        statistics=statistics,
        window=window,
        decay=float(decay),
        z=float(z),
        warmup=warmup,
        patience=patience,
        mode=mode,
        admit=admit,
        watch=watch,
        loss=bool(loss),
    )


# -- init ---------------------------------------------------------------------------------------


def _empty_decision(names: tuple[str, ...]) -> SpikeDecision:
    """Distinct buffers for every field, so that the state can be donated."""
    dtype = _float()
    size = len(names)
    return SpikeDecision(
        skipped=jnp.zeros((), bool),
        clipped=jnp.zeros((), bool),
        finite=jnp.ones((), bool),
        scale=jnp.ones((), dtype),
        value=jnp.zeros(size, dtype),
        zscore=jnp.zeros(size, dtype),
        threshold=jnp.full(size, jnp.inf, dtype),
        outlier=jnp.zeros(size, bool),
        names=names,
    )


def spike_init(
    params: PyTree | None = None,
    *,
    by: By = None,
    statistics: Statistics = "window",
    window: int = 128,
    decay: float = 0.99,
    z: float = 6.0,
    warmup: int = 32,
    patience: int | None = 8,
    mode: Mode = "skip",
    admit: Admit = "none",
    watch: Sequence[str] | None = None,
    loss: bool = False,
) -> SpikeState:
    """An empty spike guard: no statistics yet, counters at zero, and its settings.

    The guard compares each step's gradient norm (the whole gradient's and, with `by`,
    each group's, as in `grad_stats`) and optionally its loss with the same values of
    the steps before it, and decides to take, clip or skip the step; `spike_check`
    advances it. The defaults, where they come from, and how each setting changes the
    guard are in docs/spike_guard.md.

    Args:
        params: the parameters (or a gradient like them), to read the groups of `by`
            from; not needed when `by` is None.
        by: per-group norms as in `grad_stats` (`"leaf"`, `"group"`, a callable, or
            None for the whole gradient only); `spike_check` then needs norms computed
            with the same `by`.
        statistics: `"window"` (mean and standard deviation of the last `window`
            accepted values), `"ema"` (bias-corrected moving averages of the value and
            its square, weight `decay`) or `"zclip"` (ZClip's: mean and variance of the
            first `warmup` values, then moving averages of the mean and the squared
            deviation from it).
        window: the length of the ring buffer (`"window"` only).
        decay: the weight of the past in the moving averages (`"ema"`, `"zclip"`).
        z: the threshold on the z-score: an entry is an outlier when it exceeds
            `mean + z * std` of the steps before it.
        warmup: nothing is an outlier until the statistics have seen this many values.
        patience: after this many consecutive outlier steps, the next outlier is taken
            as the new normal: the statistics restart from the last `patience + 1`
            values (a re-baseline) and the step is taken. None: never.
        mode: `"skip"` (the step is not applied), `"clip"` (the gradient is scaled
            down so that every outlier group is at its threshold) or
            `"clip_reciprocal"` (ZClip's rule: to `mean + z**2 * std / zscore`, lower
            the further out the outlier is).
        admit: what an outlier step puts into the statistics: `"none"` (nothing; the
            default), `"all"` (its raw value, as the windowed guards of OLMo-core and
            MaxText do) or `"scaled"` (the value after the guard's clip, as ZClip does).
            Non-finite values never enter.
        watch: the entries whose outliers trigger the guard (`""` for the whole
            gradient, group names, `"loss"`); None: all.
        loss: whether the guard also watches the loss (`spike_check(..., loss=...)`).

    Returns:
        A `SpikeState`.

    Raises:
        ValueError: if a setting is out of range or `watch` names an unknown entry.
        TypeError: if a setting has the wrong type, or `by` is given without `params`.

    Example:
        >>> state = jaxgrad.spike_init({"w": jnp.zeros(3)}, by="leaf", loss=True)
        >>> state.names
        ('', 'w', 'loss')
    """
    config = _config(
        statistics=statistics,
        window=window,
        decay=decay,
        z=z,
        warmup=warmup,
        patience=patience,
        mode=mode,
        admit=admit,
        watch=watch,
        loss=loss,
    )
    if by is not None and params is None:
        raise TypeError("`spike_init` needs `params` to read the groups of `by` from.")
    groups = () if by is None else resolve_groups(params, by)
    names = ("", *(name for name, _ in groups), *((LOSS,) if config.loss else ()))
    if config.watch is not None:
        unknown = [name for name in config.watch if name not in names]
        if unknown:
            raise ValueError(
                f"`watch` must name entries of the guard {list(names)}; got unknown {unknown}."
            )
    dtype = _float()
    entries = len(names)
    rows = config.window if config.statistics == "window" else 0
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 - one buffer per field
    return SpikeState(
        history=jnp.zeros((rows, entries), dtype),
        position=zero(),
        count=zero(),
        warm=jnp.zeros((), bool),
        moment1=jnp.zeros(entries, dtype),
        moment2=jnp.zeros(entries, dtype),
        pending=jnp.zeros((config.patience, entries), dtype),
        run=zero(),
        steps=zero(),
        skips=zero(),
        clips=zero(),
        last=_empty_decision(names),
        names=names,
        config=config,
    )


# -- the decision ---------------------------------------------------------------------------------


def _statistics(state: SpikeState) -> tuple[Array, Array]:
    """Mean and variance per entry of the values before this step."""
    config = state.config
    dtype = state.moment1.dtype
    count = state.count.astype(dtype)
    some = state.count > 0
    if config.statistics == "window":
        filled = (jnp.arange(config.window) < state.count)[:, None]
        total = jnp.sum(jnp.where(filled, state.history, 0), axis=0)
        mean = jnp.where(some, total / jnp.maximum(count, 1), 0)
        squares = jnp.where(filled, (state.history - mean) ** 2, 0)
        var = jnp.where(some, jnp.sum(squares, axis=0) / jnp.maximum(count, 1), 0)
    else:
        mean, var = state.moment1, state.moment2
    return mean, var


def _watched(state: SpikeState) -> np.ndarray:
    watch = state.config.watch
    return np.array([watch is None or name in watch for name in state.names])


def _admit(state: SpikeState, value: Array, take: Array) -> tuple[Array, ...]:
    """The statistics after `value` entered them (where `take`), else as they were."""
    config = state.config
    dtype = state.moment1.dtype
    count = state.count + 1
    history, position = state.history, state.position
    m1, m2 = state.moment1, state.moment2
    if config.statistics == "window":
        history = history.at[state.position].set(value, mode="promise_in_bounds")
        position = (state.position + 1) % config.window
        count = jnp.minimum(count, config.window)
    else:
        # Mean and variance updated in place (no cancellation): with weight `w` for the
        # new value, `mean += w * delta` and `var += w * ((1 - w) * delta**2 - var)`.
        # "ema": `w = (1 - decay) / (1 - decay**n)`, the bias-corrected moving averages
        # of the value and its square. "zclip": `w = 1 / n` over the first `warmup`
        # values (their mean and population variance), then ZClip's `w = 1 - decay`
        # with `var += w * ((value - new mean)**2 - var)`.
        n = count.astype(dtype)
        one_minus_beta = jnp.asarray(1 - config.decay, dtype)
        delta = value - m1
        if config.statistics == "ema":
            beta_n = jnp.asarray(config.decay, dtype) ** n
            weight = one_minus_beta / (1 - beta_n)
            m1 = m1 + weight * delta
            m2 = m2 + weight * ((1 - weight) * delta**2 - m2)
        else:
            in_warmup = count <= config.warmup
            weight = jnp.where(in_warmup, 1 / n, one_minus_beta)
            m1 = m1 + weight * delta
            welford = m2 + weight * ((1 - weight) * delta**2 - m2)
            zclip = m2 + weight * ((value - m1) ** 2 - m2)
            m2 = jnp.where(in_warmup, welford, zclip)
    pick = lambda new, old: jnp.where(take, new, old)  # noqa: E731
    return (
        pick(history, state.history),
        pick(position, state.position),
        pick(count, state.count),
        pick(m1, state.moment1),
        pick(m2, state.moment2),
    )


def _rebaseline(state: SpikeState, value: Array) -> tuple[Array, ...]:
    """The statistics of the last `patience + 1` values alone (the run and this step)."""
    config = state.config
    dtype = state.moment1.dtype
    block = jnp.concatenate([state.pending, value[None]])  # (patience + 1, entries)
    size = block.shape[0]
    history, position = state.history, state.position
    m1, m2 = state.moment1, state.moment2
    count = jnp.asarray(size, jnp.int32)
    if config.statistics == "window":
        history = jnp.zeros_like(history).at[:size].set(block)
        position = jnp.asarray(size % config.window, jnp.int32)
    elif config.statistics == "ema":
        # What `size` updates from an empty state give: the weighted mean and variance.
        weights = config.decay ** np.arange(size - 1, -1, -1)
        weights = jnp.asarray(weights / weights.sum(), dtype)[:, None]
        m1 = jnp.sum(weights * block, axis=0)
        m2 = jnp.sum(weights * (block - m1) ** 2, axis=0)
    else:
        m1 = jnp.mean(block, axis=0)
        m2 = jnp.mean((block - m1) ** 2, axis=0)
        count = jnp.asarray(max(size, config.warmup), jnp.int32)
    return history, position, count, m1, m2


def _values(state: SpikeState, norms: Any, loss: ArrayLike | None) -> Array:
    """The step's values, one per entry of the guard, as a float vector."""
    names = state.names
    groups = names[:-1] if state.config.loss else names
    if isinstance(norms, ClipStats):
        norms = norms.groups if norms.groups is not None else norms.norm
    if isinstance(norms, GroupStats):
        if norms.names != groups:
            raise ValueError(
                f"`norms` must have the groups of the guard's `by`; the guard has "
                f"{list(groups)}, `norms` has {list(norms.names)}. Give `spike_init` and "
                "the clip (or `grad_stats`) the same `by`."
            )
        norms = norms.norm
    norms = jnp.asarray(norms)
    if not jnp.issubdtype(norms.dtype, jnp.floating):
        raise TypeError(f"`norms` must be floating-point; got dtype {norms.dtype}.")
    allowed = {(len(groups),)} | ({()} if len(groups) == 1 else set())
    if norms.shape not in allowed:
        raise ValueError(
            f"`norms` must hold one norm per entry of the guard {list(groups)}; got shape "
            f"{norms.shape}."
        )
    norms = norms.reshape(len(groups)).astype(state.moment1.dtype)
    if state.config.loss:
        if loss is None:
            raise TypeError(
                "This guard watches the loss (`loss=True`): pass the step's loss, "
                "`spike_check(state, norms, loss=loss)`."
            )
        loss = jnp.asarray(loss)
        if loss.shape != ():
            raise ValueError(f"`loss` must be a scalar; got shape {loss.shape}.")
        norms = jnp.concatenate([norms, loss.astype(norms.dtype)[None]])
    elif loss is not None:
        raise TypeError(
            "`loss` was given but this guard does not watch the loss; build it with "
            "`spike_init(..., loss=True)`."
        )
    return norms


def _check(state: SpikeState, value: Array) -> tuple[SpikeDecision, SpikeState]:
    config = state.config
    dtype = value.dtype
    clip_mode = config.mode != "skip"
    grads = np.arange(len(state.names)) < len(state.names) - int(config.loss)  # not the loss
    mean, var = _statistics(state)
    std = jnp.sqrt(var)
    excess = value - mean
    z = jnp.asarray(config.z, dtype)
    finite = jnp.all(jnp.isfinite(value))
    warm = state.warm | (state.count >= config.warmup)
    threshold = jnp.where(warm, mean + z * std, jnp.inf)
    outlier = warm & jnp.asarray(_watched(state)) & (excess > z * std) & finite
    spike = jnp.any(outlier)
    rebase = spike & (state.run >= config.patience) if config.patience else jnp.zeros((), bool)
    held = spike & ~rebase  # an outlier the guard acts on
    positive = jnp.where(std > 0, std, 1)
    signed_inf = jnp.where(excess > 0, jnp.inf, jnp.where(excess < 0, -jnp.inf, 0))
    zscore = jnp.where(std > 0, excess / positive, signed_inf)
    zscore = jnp.where(state.count > 0, zscore, 0)
    target, ratio = threshold, jnp.ones_like(value)
    if clip_mode:
        if config.mode == "clip":
            target = threshold
        else:  # ZClip's reciprocal rule: mean + z**2 * std / zscore
            target = mean + z**2 * var / jnp.where(excess > 0, excess, 1)
        ratio = jnp.where(outlier & grads, target / jnp.where(value > 0, value, 1), 1)
        loss_spike = jnp.any(outlier & ~grads)
        skipped = ~finite | (held & loss_spike)
        clipped = held & ~skipped & jnp.any(outlier & grads)
        scale = jnp.where(clipped, jnp.min(ratio), 1).astype(dtype)
    else:
        skipped = ~finite | held
        clipped = jnp.zeros((), bool)
        scale = jnp.ones((), dtype)

    # What enters the statistics.
    if config.admit == "all":
        entering, take = value, finite
    elif config.admit == "scaled":
        # the clipped group enters at its target exactly, the others scaled with it
        at_target = clipped & outlier & grads & (ratio == scale)
        entering = jnp.where(at_target, target, jnp.where(grads, value * scale, value))
        take = finite & ~skipped
    else:
        entering, take = value, finite & ~held
    admitted = _admit(state, entering, take & ~rebase)
    if config.patience:
        rebased = _rebaseline(state, value)
        admitted = tuple(jnp.where(rebase, r, a) for r, a in zip(rebased, admitted, strict=True))
        slot = jnp.minimum(state.run, config.patience - 1)
        pending = jnp.where(held, state.pending.at[slot].set(value), state.pending)
    else:
        pending = state.pending
    run = jnp.where(held, state.run + 1, jnp.where(finite, 0, state.run))
    history, position, count, m1, m2 = admitted
    decision = SpikeDecision(
        skipped=skipped,
        clipped=clipped,
        finite=finite,
        scale=scale,
        value=value,
        zscore=zscore,
        threshold=threshold,
        outlier=outlier,
        names=state.names,
    )
    new = SpikeState(
        history=history,
        position=position.astype(jnp.int32),
        count=count.astype(jnp.int32),
        warm=warm,
        moment1=m1,
        moment2=m2,
        pending=pending,
        run=run.astype(jnp.int32),
        steps=state.steps + 1,
        skips=state.skips + skipped.astype(jnp.int32),
        clips=state.clips + clipped.astype(jnp.int32),
        last=decision,
        names=state.names,
        config=config,
    )
    return decision, new


_check_jit = jax.jit(_check)


def spike_check(
    state: SpikeState,
    norms: ArrayLike | GroupStats | ClipStats,
    *,
    loss: ArrayLike | None = None,
    axis_name: AxisName = None,
) -> tuple[SpikeDecision, SpikeState]:
    """Decide one step: take it, clip it or skip it, from its norms against the past.

    Each entry (the whole gradient's norm, each group's, and the loss when watched) is
    compared with the mean and standard deviation of the same entry over the steps
    before this one: it is an outlier when it exceeds `mean + z * std`. Any outlier
    among the watched entries makes the step skipped (`mode="skip"`) or clipped (the
    clip modes; a loss outlier is skipped, a loss cannot be clipped). A NaN or inf
    norm or loss always skips the step and never enters the statistics. After
    `patience` consecutive outlier steps the next outlier re-baselines the guard (see
    `spike_init`). The decision is made with selects, never `lax.cond`, so it runs on
    the device without a host round trip; the new state has the shapes of the old.

    Args:
        state: a `SpikeState` from `spike_init` or a previous `spike_check`.
        norms: the step's norms before any clip: the `ClipStats` of
            `grad_clip(grads, max_norm, by=...)`, the `GroupStats` of `grad_stats`
            (with the `by` of `spike_init`), or an array (one norm per entry, or a
            scalar for a guard without groups).
        loss: the step's loss, for a guard built with `loss=True`.
        axis_name: inside `shard_map`/`pmap`, the axis over which `loss` is averaged
            (the norms of `grad_clip(..., axis_name=...)` already are global), so that
            every replica takes the same decision; see docs/many_devices.md.

    Returns:
        `(decision, new_state)`: a `SpikeDecision` and the advanced `SpikeState`.

    Raises:
        TypeError: if `state` is not a `SpikeState`, `norms` is not floating-point,
            or `loss` is missing (or given to a guard that does not watch it).
        ValueError: if the groups or shape of `norms` differ from the guard's.

    Example:
        >>> state = jaxgrad.spike_init(window=16, warmup=4)
        >>> for norm in [1.0, 1.1, 0.9, 1.0, 1.05, 50.0, jnp.nan, 1.0]:
        ...     decision, state = jaxgrad.spike_check(state, jnp.asarray(norm))
        >>> state.as_dict()["skips"], bool(decision.skipped)
        (2, False)
    """
    if not isinstance(state, SpikeState):
        raise TypeError(
            f"`state` must be a `SpikeState` (from `spike_init`); got {type(state).__name__}."
        )
    check_axis_name(axis_name, optional=True)
    value = _values(state, norms, loss)
    if axis_name is not None and state.config.loss:
        value = value.at[-1].set(jax.lax.pmean(value[-1], axis_name))
    if isinstance(value, Tracer):
        return _check(state, value)
    return _check_jit(state, value)


def keep_if_skipped(skipped: SpikeDecision | ArrayLike, new: PyTree, old: PyTree) -> PyTree:
    """`old` where the step was skipped, else `new`: one select per leaf, on the device.

    For everything a train step changes besides what the optimizer guards: Flax
    BatchNorm statistics, RNG counts, metrics, or parameters and optimizer state in a
    loop without `jaxgrad.optax.spike_guard`. No `lax.cond`, so no host round trip.

    Args:
        skipped: a `SpikeDecision` (its `skipped` is used) or a 0-d bool.
        new: the values after the step.
        old: the values before it, with the structure and shapes of `new`.

    Returns:
        A pytree like `new`.

    Raises:
        ValueError: if `new` and `old` differ in structure.

    Example:
        >>> jaxgrad.keep_if_skipped(jnp.asarray(True), {"mean": jnp.ones(2)}, {"mean": jnp.zeros(2)})
        {'mean': Array([0., 0.], dtype=float32)}
    """  # noqa: E501
    flag = skipped.skipped if isinstance(skipped, SpikeDecision) else jnp.asarray(skipped)
    check_same_structure("new", new, "old", old)
    return jax.tree.map(lambda n, o: jnp.where(flag, o, n), new, old)
