"""optax bridge: gradient transformations built on jaxgrad (needs optax).

`import jaxgrad` never imports optax; `import jaxgrad.optax` does, and says how to
install it when it is missing.
"""

from typing import cast

import jax
import jax.numpy as jnp

from ._clip import GradStats, check_bound, grad_clip
from ._numerics import AxisName, accumulation_dtype, count_dtype
from ._stats import By, GroupStats, resolve_groups
from ._typing import ArrayLike, PyTree

try:
    import optax
except ImportError as error:  # pragma: no cover - exercised in a test with optax hidden
    raise ImportError(
        "`jaxgrad.optax` needs optax, which is not installed; install it with "
        '`pip install optax` (or, from a jaxgrad checkout, `pip install ".[optax]"`).'
    ) from error

__all__ = ["clip_with_stats"]


def _initial_stats(params: PyTree, by: By) -> GradStats:
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
    return GradStats(
        norm=zero,
        rms=zero,
        scale=jnp.ones((), acc),
        clipped=jnp.zeros((), bool),
        finite=jnp.ones((), bool),
        groups=groups,
    )


def clip_with_stats(
    max_norm: ArrayLike, *, by: By = None, axis_name: AxisName = None
) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` that keeps the pre-clip statistics in its state.

    An `optax.GradientTransformation` that clips updates with `jaxgrad.grad_clip` and
    stores the resulting `GradStats` (pre-clip `norm` and `rms`, `scale`, `clipped`,
    `finite`, and with `by` the per-group `GroupStats`) as its state, so the last
    statistics can be logged from the optimizer state, also inside `optax.chain`:
    `opt_state[0].norm`, or `optax.tree_utils.tree_get(opt_state, "norm")`. The state
    keeps the dtypes of `init` (those of the parameters), so it is a stable
    `jax.lax.scan` carry even when the updates have another dtype.

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
        An `optax.GradientTransformation` whose state is a `jaxgrad.GradStats`.

    Raises:
        ValueError: if `max_norm` is negative, NaN or not a scalar.
        TypeError: if `max_norm` is not a real number.

    Example:
        >>> import optax
        >>> from jaxgrad.optax import clip_with_stats
        >>> tx = optax.chain(clip_with_stats(1.0), optax.sgd(learning_rate=1.0))
        >>> params = {"w": jnp.array([3.0, 4.0])}
        >>> state = tx.init(params)
        >>> updates, state = tx.update(params, state, params)
        >>> updates["w"], state[0].norm
        (Array([-0.6, -0.8], dtype=float32), Array(5., dtype=float32))
    """
    bound = check_bound("max_norm", max_norm)

    def init_fn(params: PyTree) -> optax.OptState:
        return cast(optax.OptState, _initial_stats(params, by))

    def update_fn(
        updates: PyTree, state: optax.OptState, params: PyTree | None = None
    ) -> tuple[PyTree, optax.OptState]:
        del params
        clipped, stats = grad_clip(updates, bound, by=by, axis_name=axis_name)
        # The state keeps init's dtypes, so it is the same pytree type at every step.
        stats = jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype), stats, state)
        return clipped, cast(optax.OptState, stats)

    return optax.GradientTransformation(init_fn, update_fn)
