"""optax bridge: gradient transformations built on jaxgrad (needs the `optax` extra).

`import jaxgrad` never imports optax; `import jaxgrad.optax` does, and says how to
install it when it is missing.
"""

import jax
import jax.numpy as jnp

from ._clip import GradStats, check_bound, grad_clip
from ._reduce import AxisName, accumulation_dtype
from ._typing import ArrayLike, PyTree

try:
    import optax
except ImportError as error:  # pragma: no cover - exercised in a test with optax hidden
    raise ImportError(
        "`jaxgrad.optax` needs optax, which is not installed; install it with "
        "`pip install 'jaxgrad[optax]'` (or `pip install optax`)."
    ) from error

__all__ = ["clip_with_stats"]


def clip_with_stats(
    max_norm: ArrayLike, *, axis_name: AxisName = None
) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` that keeps the pre-clip norm in its state.

    An `optax.GradientTransformation` that clips updates with `jaxgrad.grad_clip` and
    stores the resulting `GradStats` (pre-clip `norm` and `rms`, `scale`, `clipped`,
    `finite`) as its state, so the last norm can be logged from the optimizer state,
    also inside `optax.chain`: `opt_state[0].norm`, or
    `optax.tree_utils.tree_get(opt_state, "norm")`. The clipped updates are those of
    `optax.clip_by_global_norm(max_norm)`, except that a zero update with
    `max_norm=0` stays zero, and a non-finite norm gives zero updates with
    `finite=False` rather than NaN (see `jaxgrad.grad_clip`).

    Args:
        max_norm: the bound, a non-negative real scalar (`inf` never clips).
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the updates are shards of one larger tree; the norm is
            the global one. `None` (the default) means no collective.

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

    def init_fn(params: PyTree) -> GradStats:
        acc = accumulation_dtype(jnp.result_type(x) for x in jax.tree.leaves(params))
        zero = jnp.zeros((), acc)
        return GradStats(
            norm=zero,
            rms=zero,
            scale=jnp.ones((), acc),
            clipped=jnp.zeros((), bool),
            finite=jnp.ones((), bool),
        )

    def update_fn(
        updates: PyTree, state: optax.OptState, params: PyTree | None = None
    ) -> tuple[PyTree, GradStats]:
        del state, params
        return grad_clip(updates, bound, axis_name=axis_name)

    return optax.GradientTransformation(init_fn, update_fn)
