"""optax bridge: gradient transformations built on jaxgrad (needs optax).

`clip_with_stats` (a clip whose state holds its statistics), `track_noise_scale` (a
transformation whose state smooths the gradient noise scale), `track_update_stats` (a
transformation whose state holds the update-to-parameter statistics) and `spike_guard`
(an optimizer wrapper that skips or clips outlier steps). Each state holds its values
under a name no other state uses (`clip_stats`, `noise_scale`, `update_stats`,
`spike_guard`), so that `optax.tree_utils.tree_get(opt_state, name)` finds them
wherever the transformation sits, in a plain optax state as in the state of an
`nnx.Optimizer`.

`import jaxgrad` never imports optax; `import jaxgrad.optax` does, and says how to
install it when it is missing.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp

from ._checks import check_bound, check_decay, nnx_params, vary_along, varying_axes
from ._clip import ClipStats, grad_clip
from ._naming import By, resolve_groups
from ._noise import NoiseScale, NoiseScaleState, noise_scale_init, noise_scale_update
from ._numerics import AxisName, accumulation_dtype, count_dtype
from ._stats import GroupStats
from ._typing import ArrayLike, PyTree
from ._update_stats import UpdateStats, update_stats

try:
    import optax
except ImportError as error:  # pragma: no cover - exercised in a test with optax hidden
    raise ImportError(
        "`jaxgrad.optax` needs optax, which is not installed; install it with "
        '`pip install optax` (or, from a jaxgrad checkout, `pip install ".[optax]"`).'
    ) from error

__all__ = [
    "ClipWithStatsState",
    "TrackNoiseScaleState",
    "clip_with_stats",
    "spike_guard",
    "track_noise_scale",
    "track_update_stats",
]


def _initial_stats(params: PyTree, by: By) -> ClipStats:
    """The state before any update: zeros with the dtypes and group names of later states."""
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(params)]
    acc = accumulation_dtype(x.dtype for x in leaves)
    zero = jnp.zeros((), acc)
    groups = None
    if by is not None:
        names = ("", *(name for name, _ in resolve_groups(params, by)))
        counts = count_dtype(int(sum(x.size for x in leaves)))
        rows = jnp.zeros(len(names), acc)
        groups = GroupStats(
            norm=rows,
            rms=rows,
            max_abs=rows,
            nonfinite=jnp.zeros(len(names), counts),
            names=names,
        )
    return ClipStats(
        norm=zero,
        rms=zero,
        scale=jnp.ones((), acc),
        clipped=jnp.zeros((), bool),
        finite=jnp.ones((), bool),
        groups=groups,
    )


class ClipWithStatsState(NamedTuple):
    """The state of `clip_with_stats`: the last `ClipStats`, under an optax-findable name.

    A NamedTuple with one field, `clip_stats`, a name no other state uses:
    `optax.tree_utils.tree_get(opt_state, "clip_stats")` finds it wherever the clip sits
    in a chain, also in `nnx.state(optimizer)` of an `nnx.Optimizer`. (Looking up
    `"norm"` is ambiguous as soon as `by` is given: `ClipStats.norm` and
    `GroupStats.norm` share the name.)

    Attributes:
        clip_stats: the `jaxgrad.ClipStats` of the last update (before any update: zero
            norms, scale 1, with the dtypes and group names of later states).

    Example:
        >>> import optax
        >>> from jaxgrad.optax import clip_with_stats
        >>> tx = optax.chain(clip_with_stats(1.0, by="leaf"), optax.sgd(learning_rate=0.1))
        >>> state = tx.init({"w": jnp.zeros(2)})
        >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
        >>> optax.tree_utils.tree_get(state, "clip_stats").norm
        Array(5., dtype=float32)
        >>> state[0].as_dict()["norm/w"]
        5.0
    """

    clip_stats: ClipStats

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """`self.clip_stats.as_dict(prefix)`: the flat dict of `ClipStats.as_dict` for a logger.

        Args:
            prefix: prepended to every key, e.g. `"clip/"`.

        Returns:
            A dict from `str` to numbers (numpy arrays for stacked states).

        Example:
            >>> from jaxgrad.optax import clip_with_stats
            >>> clip_with_stats(1.0).init({"w": jnp.zeros(2)}).as_dict()["scale"]
            1.0
        """
        return self.clip_stats.as_dict(prefix)


def clip_with_stats(
    max_norm: ArrayLike, *, by: By = None, axis_name: AxisName = None
) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` that keeps the pre-clip statistics in its state.

    An `optax.GradientTransformation` that clips updates with `jaxgrad.grad_clip` and
    keeps the resulting `ClipStats` (pre-clip `norm` and `rms`, `scale`, `clipped`,
    `finite`, and with `by` the per-group `GroupStats`) in its state, a
    `ClipWithStatsState`, so the last statistics can be logged from the optimizer state
    wherever the clip sits: `optax.tree_utils.tree_get(opt_state, "clip_stats")` (also in
    `nnx.state(optimizer)` of an `nnx.Optimizer`), or `opt_state[0].clip_stats` when it
    comes first in a chain. The state keeps the dtypes of `init` (those of the
    parameters), so it is a stable `jax.lax.scan` carry even when the updates have
    another dtype. Like `optax.clip_by_global_norm`, `update` also accepts `state=None`
    (a stateless call, as optax's own tests make); it then returns a state built from
    the updates.

    The clipped updates are those of `optax.clip_by_global_norm(max_norm)`, except that
    a zero update with `max_norm=0` stays zero. Updates holding NaN or inf are passed on
    unchanged (see `jaxgrad.grad_clip`), so `optax.apply_if_finite` skips the step
    whether it wraps this transformation or comes after it in a chain: parameters and
    the whole inner optimizer state stay bit for bit as they were.

    Args:
        max_norm: the bound, a non-negative real scalar (`inf` never clips).
        by: per-group statistics as in `jaxgrad.grad_stats` (`"leaf"`, `"group"`, a
            callable), or `None`; the groups are read from the parameters at `init`.
        axis_name: the mesh axis name (or tuple of names) along which the updates are
            shards of one larger tree; see docs/many_devices.md.

    Returns:
        An `optax.GradientTransformation` whose state is a `ClipWithStatsState`.

    Raises:
        ValueError: if `max_norm` is negative, NaN or not a scalar.
        TypeError: if `max_norm` is not a real number; at `update`, if `state` is
            neither `None` nor the `ClipWithStatsState` of `init`.

    Example:
        >>> import optax
        >>> from jaxgrad.optax import clip_with_stats
        >>> tx = optax.chain(clip_with_stats(1.0), optax.sgd(learning_rate=1.0))
        >>> params = {"w": jnp.array([3.0, 4.0])}
        >>> state = tx.init(params)
        >>> updates, state = tx.update(params, state, params)
        >>> updates["w"], optax.tree_utils.tree_get(state, "clip_stats").norm
        (Array([-0.6, -0.8], dtype=float32), Array(5., dtype=float32))
    """
    bound = check_bound("max_norm", max_norm)

    def init_fn(params: PyTree) -> optax.OptState:
        return cast(optax.OptState, ClipWithStatsState(_initial_stats(params, by)))

    def update_fn(
        updates: PyTree, state: optax.OptState, params: PyTree | None = None
    ) -> tuple[PyTree, optax.OptState]:
        del params
        if state is None:  # stateless, as optax.clip_by_global_norm allows: init's dtypes
            state = init_fn(updates)
        if not isinstance(state, ClipWithStatsState):
            raise TypeError(
                "`state` must be the `ClipWithStatsState` from this transformation's `init` "
                f"(or None); got {type(state).__name__}."
            )
        clipped, stats = grad_clip(updates, bound, by=by, axis_name=axis_name)
        # The state keeps init's dtypes, so it is the same pytree type at every step.
        old = state.clip_stats
        stats = jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype), stats, old)
        return clipped, cast(optax.OptState, ClipWithStatsState(stats))

    return optax.GradientTransformation(init_fn, update_fn)


class TrackNoiseScaleState(NamedTuple):
    """The state of `track_noise_scale`: the smoothed noise scale, under an optax-findable name.

    A NamedTuple, as optax states are, so that
    `optax.tree_utils.tree_get(opt_state, "noise_scale")` finds it wherever the
    transformation sits in a chain (optax's tree utilities search NamedTuple fields
    and dict keys).

    Attributes:
        noise_scale: a `jaxgrad.NoiseScaleState`: the moving averages of `|G|^2` and
            `tr(Sigma)`, and `b_simple`.

    Example:
        >>> from jaxgrad.optax import track_noise_scale
        >>> state = track_noise_scale().init({"w": jnp.zeros(2)})
        >>> state.noise_scale.b_simple
        Array([nan], dtype=float32)
    """

    noise_scale: NoiseScaleState


def track_noise_scale(
    decay: ArrayLike = 0.99, *, by: By = None
) -> optax.GradientTransformationExtraArgs:
    """An identity transformation whose state is the smoothed gradient noise scale.

    Its state holds a `jaxgrad.NoiseScaleState`, advanced at every update by
    `jaxgrad.noise_scale_update` with the step's estimates, which the caller passes as
    the extra keyword argument `noise_scale` (what `jaxgrad.grad_microbatch_noise` or
    `jaxgrad.grad_pmean_noise` returned beside the gradient). The updates pass through
    unchanged, so it can sit anywhere in an `optax.chain`; `optax.chain` hands extra
    arguments to the transformations that take them, and `nnx.Optimizer.update(model,
    grads, noise_scale=noise)` hands them to its `tx`. The smoothed `B_simple` is then
    read from the optimizer state wherever the transformation sits:
    `optax.tree_utils.tree_get(opt_state, "noise_scale").b_simple` (entry 0 is the
    whole gradient, the others the groups of `by`), or `.as_dict()` of that for a
    logger. See docs/noise_scale.md.

    Args:
        decay: the weight of the past in the moving averages, in [0, 1).
        by: the grouping given to the estimating function (`"leaf"`, `"group"`, a
            callable, or `None`); the groups are read from the parameters at `init`.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose state is a
        `TrackNoiseScaleState`; `update` requires `noise_scale=`.

    Raises:
        TypeError: if `decay` is not a real number; at `update`, if `noise_scale` is
            missing or not a `jaxgrad.NoiseScale`.
        ValueError: if `decay` is outside [0, 1); at `update`, if the groups of
            `noise_scale` differ from those of the state.

    Example:
        >>> import optax
        >>> from jaxgrad.optax import track_noise_scale
        >>> tx = optax.chain(track_noise_scale(decay=0.9), optax.sgd(learning_rate=0.1))
        >>> params = {"w": jnp.zeros(2)}
        >>> state = tx.init(params)
        >>> loss = lambda w, batch: jnp.mean((batch @ w["w"] - 1.0) ** 2)
        >>> batches = jnp.array([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 0.0]]])
        >>> grads, noise = jaxgrad.grad_microbatch_noise(jax.grad(loss), params, batches)
        >>> updates, state = tx.update(grads, state, params, noise_scale=noise)
        >>> optax.tree_utils.tree_get(state, "noise_scale").as_dict()
        {'grad_sq': 4.0, 'trace_cov': 4.0, 'b_simple': 1.0}
    """
    decay = check_decay(decay)

    def init_fn(params: PyTree) -> optax.OptState:
        return cast(optax.OptState, TrackNoiseScaleState(noise_scale_init(params, by=by)))

    def update_fn(
        updates: PyTree,
        state: Any,
        params: PyTree | None = None,
        *,
        noise_scale: NoiseScale | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, optax.OptState]:
        del params, extra_args
        if noise_scale is None:
            raise TypeError(
                "`track_noise_scale` needs the step's estimates: call "
                "`tx.update(grads, opt_state, params, noise_scale=noise)` with the "
                "`NoiseScale` from `jaxgrad.grad_microbatch_noise` or "
                "`jaxgrad.grad_pmean_noise` (with `nnx.Optimizer`: "
                "`optimizer.update(model, grads, noise_scale=noise)`)."
            )
        if not isinstance(state, TrackNoiseScaleState):
            raise TypeError(
                "`state` must be the `TrackNoiseScaleState` from this transformation's "
                f"`init`; got {type(state).__name__}."
            )
        smoothed = state.noise_scale
        if not isinstance(noise_scale, NoiseScale):
            raise TypeError(
                "`noise_scale` must be a `jaxgrad.NoiseScale` (from "
                "`jaxgrad.grad_microbatch_noise` or `jaxgrad.grad_pmean_noise`); got "
                f"{type(noise_scale).__name__}."
            )
        if smoothed.names != noise_scale.names:
            raise ValueError(
                "`noise_scale` must have the groups of `track_noise_scale(by=...)`; the "
                f"state has {list(smoothed.names)}, `noise_scale` has "
                f"{list(noise_scale.names)}. Give both the same `by`."
            )
        new = TrackNoiseScaleState(noise_scale_update(smoothed, noise_scale, decay=decay))
        return updates, cast(optax.OptState, new)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def track_update_stats(
    *, by: By = None, axis_name: AxisName = None
) -> optax.GradientTransformation:
    """An identity transformation whose state is the last step's `jaxgrad.UpdateStats`.

    Put it last in an `optax.chain`, where the updates are those added to the
    parameters: at every update it measures them against the parameters (which
    `update` must be given) with `jaxgrad.update_stats` (update and parameter norms,
    RMS, and the update-to-parameter ratio, overall and per group) and keeps the result
    as its state, a dict `{"update_stats": UpdateStats}`. Read it wherever the
    transformation sits with `optax.tree_utils.tree_get(opt_state, "update_stats")`,
    and `.as_dict()` of that for a logger. The state keeps `init`'s dtypes (those of
    the parameters' accumulation), so it is a stable `jax.lax.scan` carry.

    Args:
        by: the grouping, as in `jaxgrad.update_stats` (`"module"` gives one group per
            layer); the groups are read from the parameters at `init`.
        axis_name: the mesh axis name (or tuple of names) along which the updates and
            parameters are shards of larger trees; see docs/many_devices.md.

    Returns:
        An `optax.GradientTransformation`; its `update` requires `params`.

    Raises:
        TypeError: at `update`, if `params` is missing.

    Example:
        >>> import optax
        >>> from jaxgrad.optax import track_update_stats
        >>> tx = optax.chain(optax.sgd(learning_rate=0.1), track_update_stats(by="leaf"))
        >>> params = {"w": jnp.array([3.0, 4.0])}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.array([0.6, 0.8])}, state, params)
        >>> stats = optax.tree_utils.tree_get(state, "update_stats")
        >>> stats.as_dict()["update_ratio/w"]
        0.019999999552965164
    """

    def init_fn(params: PyTree) -> optax.OptState:
        params = nnx_params(params)
        names = ("", *(name for name, _ in resolve_groups(params, by)))
        acc = accumulation_dtype(jnp.asarray(x).dtype for x in jax.tree.leaves(params))
        zeros = jnp.zeros(len(names), acc)
        empty = UpdateStats(zeros, zeros, zeros, zeros, zeros, names=names)
        return cast(optax.OptState, {"update_stats": empty})

    def update_fn(
        updates: PyTree, state: optax.OptState, params: PyTree | None = None
    ) -> tuple[PyTree, optax.OptState]:
        if params is None:
            raise TypeError(
                "`track_update_stats` measures the updates against the parameters: call "
                "`tx.update(updates, opt_state, params)` with `params`."
            )
        stats = update_stats(updates, params, by=by, axis_name=axis_name)
        # The state keeps init's dtypes, so it is the same pytree type at every step.
        old = cast(dict, state)["update_stats"]
        stats = jax.tree.map(lambda new, was: new.astype(was.dtype), stats, old)
        return updates, cast(optax.OptState, {"update_stats": stats})

    return optax.GradientTransformation(init_fn, update_fn)


def _unless(
    skip: jax.Array, step: Callable[[], tuple[PyTree, PyTree]], updates: PyTree, state: PyTree
) -> tuple[PyTree, PyTree]:
    """`step()`'s updates and state, or zero updates and `state` where `skip`.

    `step` is an optax update of `updates`; a skip keeps `state` bit for bit, and its zero
    updates take the structure, dtypes and varying axes of `step()`'s where these are not
    those of `updates` (`optax.lookahead` returns `LookaheadParams`). On every platform
    but CPU both are computed and selected: XLA's GPU runtime runs a conditional by
    copying its predicate to the host and waiting for the stream, in the middle of the
    step. On CPU a conditional costs nothing of the kind and is the cheaper form: with
    the state donated, a select makes XLA's CPU backend copy every moment of the old
    state first (both the select and the parameter update read it), 1.3x the optax-clip
    train step against 1.0x. The update is the conditional's true branch: the other way
    round, XLA copies the new state out of it.
    """

    def select() -> tuple[PyTree, PyTree]:
        new_updates, new_state = step()
        return (
            jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates),
            jax.tree.map(lambda n, o: jnp.where(skip, o, n), new_state, state),
        )

    def kept(like: Any = None) -> tuple[PyTree, PyTree]:
        if like is None and not jax.sharding.get_abstract_mesh().manual_axes:
            return jax.tree.map(jnp.zeros_like, updates), state
        # The branches' types must agree: structure and dtypes, and inside `shard_map`
        # the mesh axes along which each leaf varies.
        like = jax.eval_shape(step) if like is None else like
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), like[0])
        out = (zeros, jax.tree.map(lambda x, s: jnp.asarray(x, s.dtype), state, like[1]))
        return jax.tree.map(lambda x, s: vary_along(x, varying_axes(s)), out, like)

    def branch() -> tuple[PyTree, PyTree]:
        take = jnp.logical_not(skip)
        try:
            return jax.lax.cond(take, step, kept)
        except (TypeError, ValueError):
            # `inner`'s updates are not like its input (a dtype, or a structure such as
            # `optax.lookahead`'s): the kept branch takes the update's types
            like = jax.eval_shape(step)
            return jax.lax.cond(take, step, lambda: kept(like))

    return jax.lax.platform_dependent(cpu=branch, default=select)


def spike_guard(
    inner: optax.GradientTransformation,
    *,
    max_norm: ArrayLike = float("inf"),
    by: By = None,
    axis_name: AxisName = None,
    statistics: str = "window",
    window: int = 128,
    decay: float = 0.99,
    z: float = 6.0,
    warmup: int = 32,
    patience: int | None = 8,
    mode: str = "skip",
    admit: str = "none",
    watch: Any = None,
    loss: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Guard `inner` against gradient-norm (and loss) spikes: take, clip or skip each step.

    Each update measures the incoming gradient once with `jaxgrad.grad_clip(updates,
    max_norm, by=by)` (the pre-clip norms of the whole gradient and of each group, and
    the clip to `max_norm` in the same pass), decides with `jaxgrad.spike_check`
    against the statistics of the steps before, and then runs `inner`. A skipped step
    (an outlier in `mode="skip"`, a NaN or inf gradient or loss in every mode) gives
    zero updates and leaves `inner`'s state bit for bit as it was, as
    `optax.apply_if_finite` does (with a select on GPU and TPU, where a conditional
    would stop the host every step; with a conditional on CPU, where a select makes XLA
    copy the donated state); the guard's own state still records it. In the clip modes
    the gradient is scaled down before `inner`. The settings are those of
    `jaxgrad.spike_init`; see docs/spike_guard.md for the defaults and where they come
    from.

    Read the guard with `optax.tree_utils.tree_get(opt_state, "spike_guard")`: a
    `jaxgrad.SpikeState`, whose `as_dict()` gives the counters and the last decision
    for a logger, and whose `.last` is the `SpikeDecision` to hand to
    `jaxgrad.keep_if_skipped` for model state outside the optimizer (BatchNorm).

    Args:
        inner: the transformation to guard (e.g. `optax.adamw(1e-3)`); extra
            arguments other than `loss` are passed on to it.
        max_norm: clip the gradient to this global norm before `inner` (`inf`: no
            clip); the guard watches the norm before this clip.
        by: per-group norms as in `jaxgrad.grad_stats`; the groups are read from the
            parameters at `init`.
        axis_name: the mesh axis name (or names) along which the updates are shards
            or replicas; the norms and the loss are reduced over it so that every
            replica takes the same decision (docs/many_devices.md).
        statistics: see `jaxgrad.spike_init`.
        window: see `jaxgrad.spike_init`.
        decay: see `jaxgrad.spike_init`.
        z: see `jaxgrad.spike_init`.
        warmup: see `jaxgrad.spike_init`.
        patience: see `jaxgrad.spike_init`.
        mode: see `jaxgrad.spike_init`.
        admit: see `jaxgrad.spike_init`.
        watch: see `jaxgrad.spike_init`.
        loss: watch the loss too; `update` then needs `loss=` (optax's extra
            arguments: `tx.update(grads, state, params, loss=loss)`). Without it, a
            `loss=` given to `update` is ignored.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose state is a
        `jaxgrad.SpikeGuardState`.

    Raises:
        ValueError: if a setting is out of range (as `jaxgrad.spike_init`) or
            `max_norm` is negative.
        TypeError: if a setting has the wrong type; at `update`, if `loss` is missing
            for a guard that watches it.

    Example:
        >>> import optax
        >>> from jaxgrad.optax import spike_guard
        >>> tx = spike_guard(optax.sgd(0.1), warmup=3, window=16)
        >>> params = {"w": jnp.zeros(2)}
        >>> state = tx.init(params)
        >>> for g in [1.0, 1.1, 0.9, 30.0]:
        ...     updates, state = tx.update({"w": jnp.full(2, g)}, state, params)
        >>> updates["w"], optax.tree_utils.tree_get(state, "spike_guard").as_dict()["skips"]
        (Array([0., 0.], dtype=float32), 1)
    """
    from ._spike import SpikeGuardState, spike_check, spike_init

    bound = check_bound("max_norm", max_norm)
    settings: dict[str, Any] = dict(
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
    spike_init(None, **settings)  # check the settings now, not at `init`
    guarded = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> optax.OptState:
        guard = spike_init(params, by=by, **settings)
        return cast(optax.OptState, SpikeGuardState(guard, guarded.init(params)))

    def update_fn(
        updates: PyTree,
        state: Any,
        params: PyTree | None = None,
        *,
        loss: ArrayLike | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, optax.OptState]:
        if not isinstance(state, SpikeGuardState):
            raise TypeError(
                "`state` must be the `SpikeGuardState` from this transformation's "
                f"`init`; got {type(state).__name__}."
            )
        clipped, stats = grad_clip(updates, bound, by=by, axis_name=axis_name)
        watched = loss if settings["loss"] else None  # a chain may pass `loss` to everyone
        decision, guard = spike_check(state.spike_guard, stats, loss=watched, axis_name=axis_name)
        if mode != "skip":  # the guard's scale on top of the clip to `max_norm`
            extra = jnp.where(decision.scale < stats.scale, decision.scale / stats.scale, 1).astype(
                stats.scale.dtype
            )
            clipped = jax.tree.map(lambda x: x * extra.astype(x.dtype), clipped)
        new_updates, new_inner = _unless(
            decision.skipped,
            lambda: guarded.update(clipped, state.inner_state, params, **extra_args),
            clipped,
            state.inner_state,
        )
        return new_updates, cast(optax.OptState, SpikeGuardState(guard, new_inner))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
