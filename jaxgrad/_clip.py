"""Clipping that reports: `grad_clip`, `grad_clip_by_magnitude` and their `GradStats`."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from ._dispatch import compiled
from ._reduce import (
    AxisName,
    _check_inexact,
    _psum,
    _safe_sqrt,
    _sum_of_squares,
    accumulation_dtype,
)
from ._typing import Array, ArrayLike, PyTree


class GradStats(NamedTuple):
    """What a clip did: the pre-clip norm and RMS, the scale applied, and two flags.

    A `NamedTuple`, hence a pytree of 0-d arrays: return it from `jax.jit`, carry it
    through `jax.lax.scan`, keep it in an optax state, or log `stats._asdict()`.

    Attributes:
        norm: the L2 norm of the gradient before clipping (float32, or float64 under
            x64), NaN or inf when the gradient holds NaN or inf.
        rms: the root-mean-square of all entries before clipping (same dtype).
        scale: the factor every entry was multiplied by: 1 when nothing was clipped,
            `bound / norm` (or `bound / rms`) when it was, 0 when the norm was not finite.
        clipped: whether the gradient was changed, i.e. `scale < 1`.
        finite: whether the pre-clip norm was finite.

    Example:
        >>> _, stats = jaxgrad.grad_clip({"w": jnp.array([3.0, 4.0])}, 1.0)
        >>> stats
        GradStats(norm=Array(5., dtype=float32), rms=Array(3.535534, dtype=float32), scale=Array(0.2, dtype=float32), clipped=Array(True, dtype=bool), finite=Array(True, dtype=bool))
        >>> {k: float(v) for k, v in stats._asdict().items()}
        {'norm': 5.0, 'rms': 3.535533905029297, 'scale': 0.2, 'clipped': 1.0, 'finite': 1.0}
    """  # noqa: E501

    norm: Array
    rms: Array
    scale: Array
    clipped: Array
    finite: Array


def check_bound(name: str, value: ArrayLike) -> ArrayLike:
    """`value` as a Python float (one compilation for every bound), or a tracer as it is.

    Raises unless `value` is a non-negative real scalar (NaN excluded); tracers pass.
    """
    if isinstance(value, Tracer):
        if np.ndim(value) != 0:
            raise ValueError(f"`{name}` must be a scalar; got an array of shape {value.shape}.")
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.number, np.ndarray, jax.Array)
    ):
        raise TypeError(f"`{name}` must be a real number; got {type(value).__name__} {value!r}.")
    array = np.asarray(value)
    if array.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar; got an array of shape {array.shape}.")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"`{name}` must be a real number; got dtype {array.dtype}.")
    if not array >= 0:  # also catches NaN
        raise ValueError(f"`{name}` must be a non-negative number; got {array.item()!r}.")
    return float(array)


def _work_dtype(dtype: Any, acc: np.dtype) -> Any:
    """The dtype to scale a leaf in: its own if complex or at least as wide as `acc`."""
    if jnp.issubdtype(dtype, jnp.complexfloating) or jnp.finfo(dtype).bits >= acc.itemsize * 8:
        return dtype
    return acc


@compiled(static_argnames=("measure", "axis_name"))
def _clip(
    grad: PyTree, bound: ArrayLike, *, measure: str, axis_name: AxisName
) -> tuple[PyTree, GradStats]:
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(grad)]
    acc = accumulation_dtype(x.dtype for x in leaves)
    total = _sum_of_squares(leaves, acc)
    count = jnp.asarray(sum(x.size for x in leaves), acc)
    if axis_name is not None:  # one collective for both partials
        total, count = _psum(jnp.stack([total, count]), axis_name)
    norm = _safe_sqrt(total)
    rms = _safe_sqrt(total / jnp.where(count == 0, 1, count))
    value = norm if measure == "norm" else rms
    bound = jnp.asarray(bound).astype(acc)
    finite = jnp.isfinite(total)
    over = finite & (value > bound)
    divisor = jnp.where(over, value, 1)  # never 0 where it is used, so no NaN in derivatives
    scale = jnp.where(over, bound / divisor, jnp.where(finite, 1, 0).astype(acc))

    def rescale(x: Any) -> Array:
        x = jnp.asarray(x)
        work = _work_dtype(x.dtype, acc)
        # (x / value) * bound in this order, as optax.clip_by_global_norm computes it.
        clipped = ((x.astype(work) / divisor.astype(work)) * bound.astype(work)).astype(x.dtype)
        return jnp.where(finite, jnp.where(over, clipped, x), jnp.zeros_like(x))

    stats = GradStats(norm=norm, rms=rms, scale=scale, clipped=scale < 1, finite=finite)
    return jax.tree.map(rescale, grad), stats


def grad_clip(
    grad: PyTree, max_norm: ArrayLike, *, axis_name: AxisName = None
) -> tuple[PyTree, GradStats]:
    """Scale a gradient so that its L2 norm is at most `max_norm`, and say what was done.

    When `grad_norm(grad) > max_norm` every entry is multiplied by `max_norm / norm`;
    otherwise `grad` comes back unchanged, bit for bit. Structure, shapes and dtypes are
    kept: the norm is accumulated and the scaling done in float32 (float64 under x64),
    then cast back to each leaf's dtype. For float32 gradients the values are those of
    `optax.clip_by_global_norm(max_norm)` under `jax.jit`, bit for bit, whenever the
    norm differs from `max_norm` (at equality optax multiplies by `max_norm / norm`,
    here nothing is done). Called eagerly it is one compiled dispatch.

    Edge cases, where optax gives NaN:

    - a zero gradient with `max_norm=0` comes back as zeros (`scale` 1, not clipped);
    - a norm that is NaN or inf (a NaN or inf entry, or squares overflowing float32,
      entries beyond about 1e19) gives zeros of every leaf's shape and dtype, with
      `finite=False`, `clipped=True` and `scale=0`: a skipped step rather than NaN
      spreading into the parameters. Check `stats.finite` to count such steps.

    An empty gradient has norm 0 and is returned as it is. The derivative through the
    clip is finite everywhere, zero gradient included.

    Args:
        grad: a `Gradient` or any pytree of floating-point arrays.
        max_norm: the bound, a non-negative real scalar (`inf` never clips). A traced
            value (a schedule inside `jax.jit`) is accepted and not checked.
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the local leaves are shards of one larger gradient; the
            norm is the global one (one `psum`). `None` (the default) means no collective.

    Returns:
        `(clipped, stats)`: a pytree with the structure, shapes and dtypes of `grad`, and
        a `GradStats` of 0-d arrays.

    Raises:
        ValueError: if `max_norm` is negative, NaN or not a scalar.
        TypeError: if `max_norm` is not a real number, or a leaf of `grad` is not
            floating-point or complex.

    Example:
        >>> clipped, stats = jaxgrad.grad_clip({"w": jnp.array([3.0, 4.0])}, 1.0)
        >>> clipped
        {'w': Array([0.6, 0.8], dtype=float32)}
        >>> float(stats.norm), bool(stats.clipped)
        (5.0, True)
        >>> jaxgrad.grad_clip({"w": jnp.zeros(2)}, 0.0)[0]
        {'w': Array([0., 0.], dtype=float32)}
    """
    bound = check_bound("max_norm", max_norm)
    _check_inexact("grad", grad)
    return _clip(grad, bound, measure="norm", axis_name=axis_name)


def grad_clip_by_magnitude(
    grad: PyTree, max_rms: ArrayLike, *, axis_name: AxisName = None
) -> tuple[PyTree, GradStats]:
    """Scale a gradient so that its RMS (`grad_magnitude`) is at most `max_rms`.

    The same as `grad_clip` with the root-mean-square of all entries in place of the
    norm: when `grad_magnitude(grad) > max_rms` every entry is multiplied by
    `max_rms / rms`, otherwise `grad` comes back unchanged. A bound on the RMS does not
    depend on the number of parameters, so one value suits models of any size.
    Dtypes, the zero and non-finite cases (zeros with `finite=False`) and `axis_name`
    are handled as in `grad_clip`; `stats` holds both the pre-clip norm and RMS.

    Args:
        grad: a `Gradient` or any pytree of floating-point arrays.
        max_rms: the bound, a non-negative real scalar (`inf` never clips); a traced
            value is accepted and not checked.
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the local leaves are shards of one larger gradient; the
            RMS is the global one (one `psum`). `None` (the default) means no collective.

    Returns:
        `(clipped, stats)`: a pytree with the structure, shapes and dtypes of `grad`, and
        a `GradStats` of 0-d arrays.

    Raises:
        ValueError: if `max_rms` is negative, NaN or not a scalar.
        TypeError: if `max_rms` is not a real number, or a leaf of `grad` is not
            floating-point or complex.

    Example:
        >>> g = {"w": jnp.array([3.0, -3.0, 3.0, -3.0])}
        >>> clipped, stats = jaxgrad.grad_clip_by_magnitude(g, 1.5)
        >>> clipped["w"], float(stats.rms), float(stats.scale)
        (Array([ 1.5, -1.5,  1.5, -1.5], dtype=float32), 3.0, 0.5)
    """
    bound = check_bound("max_rms", max_rms)
    _check_inexact("grad", grad)
    return _clip(grad, bound, measure="rms", axis_name=axis_name)
