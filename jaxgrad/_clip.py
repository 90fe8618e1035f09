"""Clipping that reports: `grad_clip`, `grad_clip_by_rms` and their `ClipStats`."""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_array_leaves, check_bound, checked_call, nnx_params
from ._naming import By, Groups, groups_of, static_by
from ._numerics import (
    AxisName,
    Root,
    accumulation_dtype,
    apply_factors,
    scale_factors,
    tree_leaves,
)
from ._stats import GroupStats
from ._stats import measure as measure_groups
from ._typing import Array, ArrayLike, PyTree


class ClipStats(NamedTuple):
    """What a clip did: the pre-clip norm and RMS, the scale applied, two flags, and groups.

    A `NamedTuple`, hence a pytree of 0-d arrays (and, with `by`, a `GroupStats`): return
    it from `jax.jit`, carry it through `jax.lax.scan`, keep it in an optax state, and
    log `stats.as_dict()` on the host.

    Attributes:
        norm: the L2 norm of the gradient before clipping (float32, or float64 under
            x64), NaN or inf when the gradient holds NaN or inf.
        rms: the root-mean-square of all entries before clipping (same dtype).
        scale: the factor every entry was multiplied by: `bound / norm` (or
            `bound / rms`) when the gradient was clipped, else 1.
        clipped: whether the gradient was changed, i.e. `scale < 1`.
        finite: whether every entry was finite. When it is False nothing was scaled:
            the NaN or inf entries are passed on, so that `optax.apply_if_finite` or
            `grad_where_finite` skip the step.
        groups: with `grad_clip(..., by=...)`, the `GroupStats` of the gradient before
            clipping, computed in the same pass; else `None`.

    Example:
        >>> _, stats = jaxgrad.grad_clip({"w": jnp.array([3.0, 4.0])}, 1.0)
        >>> stats.norm, stats.scale, stats.clipped
        (Array(5., dtype=float32), Array(0.2, dtype=float32), Array(True, dtype=bool))
        >>> stats.as_dict()
        {'norm': 5.0, 'rms': 3.535533905029297, 'scale': 0.2, 'clipped': True, 'finite': True}
    """

    norm: Array
    rms: Array
    scale: Array
    clipped: Array
    finite: Array
    groups: GroupStats | None = None

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """A flat dict for a logger, read from the device in one transfer.

        The clip's own values under `<prefix>norm`, `rms`, `scale`, `clipped` and
        `finite`, then, with groups, every key of `GroupStats.as_dict`. Values are Python
        numbers, or numpy arrays for stats stacked by `jax.lax.scan`.

        Args:
            prefix: prepended to every key, e.g. `"grad/"`.

        Returns:
            A dict from `str` to numbers or numpy arrays.

        Example:
            >>> _, stats = jaxgrad.grad_clip({"a": jnp.ones(2), "b": jnp.ones(2)}, 1.0, by="leaf")
            >>> sorted(stats.as_dict())  # doctest: +NORMALIZE_WHITESPACE
            ['clipped', 'finite', 'max_abs', 'max_abs/a', 'max_abs/b', 'nonfinite',
             'nonfinite/a', 'nonfinite/b', 'norm', 'norm/a', 'norm/b', 'rms', 'rms/a',
             'rms/b', 'scale']
        """
        fields = ("norm", "rms", "scale", "clipped", "finite")
        try:
            host = jax.device_get([getattr(self, f) for f in fields])
        except jax.errors.TracerArrayConversionError:
            raise TypeError(
                "`ClipStats.as_dict` reads the statistics on the host; call it on the stats "
                "returned from `jax.jit`, not inside the traced function."
            ) from None
        out = {} if self.groups is None else self.groups.as_dict(prefix)
        for name, value in zip(fields, host, strict=True):
            value = np.asarray(value)
            out[f"{prefix}{name}"] = value.item() if value.ndim == 0 else value
        return out


@functools.partial(jax.jit, static_argnames=("measure", "by", "axis_name", "pack"))
def _clip(
    grad: PyTree,
    bound: Any,
    *,
    measure: str,
    by: str | Groups | None,
    axis_name: AxisName,
    pack: bool = True,
) -> tuple[PyTree, ClipStats]:
    check_array_leaves("grad", grad, inexact=True)
    leaves = tree_leaves(grad)
    acc = accumulation_dtype(x.dtype for x in leaves)
    bound = jnp.asarray(bound).astype(acc)
    groups = None if by is None else groups_of(grad, by)
    found, group_stats = measure_groups(leaves, groups, axis_name, pack)
    norm = Root(found.roots[0].root[0], found.roots[0].up[0])
    sqrt_n = np.sqrt(max(float(found.entries[0][0]), 1.0))
    rms = Root(norm.root / jnp.asarray(sqrt_n, acc), norm.up)
    value = norm if measure == "norm" else rms
    finite = found.finite if found.finite is not None else jnp.isfinite(norm.root)
    # value.root * up > bound, compared as value.root > bound / up: no overflow.
    over = finite & (value.root > bound / value.up)
    factors = scale_factors(value, over, bound)

    def rescale(x: Any) -> Array:
        # x / measure * bound as optax.clip_by_global_norm scales (x / norm * max_norm),
        # with x / measure as (x / up) / root: exact where the measure overflows.
        return apply_factors(x, factors)

    stats = ClipStats(
        norm=norm.norm,
        rms=rms.norm,
        scale=jnp.where(over, (bound / value.up) / jnp.where(over, value.root, 1), 1),
        clipped=over,
        finite=finite,
        groups=group_stats,
    )
    return jax.tree.map(rescale, grad), stats


def grad_clip(
    grad: PyTree, max_norm: ArrayLike, *, by: By = None, axis_name: AxisName = None
) -> tuple[PyTree, ClipStats]:
    """Scale a gradient so that its L2 norm is at most `max_norm`, and say what was done.

    When `grad_norm(grad) > max_norm` every entry is multiplied by `max_norm / norm`;
    otherwise `grad` comes back unchanged, bit for bit. Structure, shapes and dtypes are
    kept: the norm is accumulated and the scaling done in float32 (float64 under x64),
    then cast back to each leaf's dtype. For float32 gradients the values are those of
    `optax.clip_by_global_norm(max_norm)`, computed in the same order (`x / norm *
    max_norm`) from a norm that can differ from optax's in the last bit (the partial
    sums are added in another order), so the two agree to float32 rounding.

    Non-finite gradients: when an entry is NaN or inf, nothing is scaled and the
    gradient comes back as it was, NaN and inf included, with `stats.finite == False`,
    so that `optax.apply_if_finite` (or `grad_where_finite`) skips the whole step.
    A finite gradient always has a finite norm, even when its squares overflow float32.

    With `by` (as in `grad_stats`: `"leaf"`, `"group"` or a callable) `stats.groups`
    holds the `GroupStats` of the gradient before clipping: per-group norm, RMS, max-abs
    and non-finite counts, computed from the same partial sums as the clip in one pass.
    This is the recommended train-step recipe (docs/toolkit.md).

    Edge cases where optax gives NaN: a zero gradient with `max_norm=0` comes back as
    zeros (`scale` 1, not clipped). An empty gradient has norm 0 and is returned as it
    is. The derivative through the clip is finite everywhere, zero gradient included.

    Args:
        grad: a `Gradient` or any pytree of floating-point arrays.
        max_norm: the bound, a non-negative real scalar (`inf` never clips). A traced
            value (a schedule inside `jax.jit`) is accepted and not checked.
        by: `None` (no per-group statistics), `"leaf"`, `"group"` or a callable
            `(path, leaf) -> str | None`, as in `grad_stats`.
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of one larger gradient; see docs/many_devices.md.

    Returns:
        `(clipped, stats)`: a pytree with the structure, shapes and dtypes of `grad`, and
        a `ClipStats`.

    Raises:
        ValueError: if `max_norm` is negative, NaN or not a scalar, or `by` is invalid.
        TypeError: if `max_norm` is not a real number, or a leaf of `grad` is not
            floating-point or complex.

    Example:
        >>> clipped, stats = jaxgrad.grad_clip({"w": jnp.array([3.0, 4.0])}, 1.0)
        >>> clipped
        {'w': Array([0.6, 0.8], dtype=float32)}
        >>> float(stats.norm), bool(stats.clipped)
        (5.0, True)
        >>> g = {"w": jnp.array([3.0, jnp.nan])}
        >>> jaxgrad.grad_clip(g, 1.0)[0]                     # passed on, so the step is skipped
        {'w': Array([ 3., nan], dtype=float32)}
        >>> _, stats = jaxgrad.grad_clip(g, 1.0, by="leaf")  # one pass: clip and statistics
        >>> bool(stats.finite), stats.groups.as_dict()["nonfinite/w"]
        (False, 1)
    """
    bound = check_bound("max_norm", max_norm)
    return _checked_clip(grad, bound, "norm", by, axis_name)


def _checked_clip(
    grad: PyTree, bound: Any, measure: str, by: By, axis_name: AxisName
) -> tuple[PyTree, ClipStats]:
    static = static_by(nnx_params(grad), by)
    return checked_call(
        _clip, "grad", grad, bound, inexact=True, measure=measure, by=static, axis_name=axis_name
    )


def grad_clip_by_rms(
    grad: PyTree, max_rms: ArrayLike, *, by: By = None, axis_name: AxisName = None
) -> tuple[PyTree, ClipStats]:
    """Scale a gradient so that its RMS (`grad_rms`) is at most `max_rms`.

    The same as `grad_clip` with the root-mean-square of all entries in place of the
    norm: when `grad_rms(grad) > max_rms` every entry is multiplied by
    `max_rms / rms`, otherwise `grad` comes back unchanged. A bound on the RMS does not
    depend on the number of parameters, so one value suits models of any size. Dtypes,
    non-finite gradients (passed on unchanged, `finite=False`), `by` and `axis_name`
    are handled as in `grad_clip`; `stats` holds both the pre-clip norm and RMS.

    Args:
        grad: a `Gradient` or any pytree of floating-point arrays.
        max_rms: the bound, a non-negative real scalar (`inf` never clips); a traced
            value is accepted and not checked.
        by: per-group statistics, as in `grad_clip`.
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of one larger gradient; see docs/many_devices.md.

    Returns:
        `(clipped, stats)`: a pytree with the structure, shapes and dtypes of `grad`, and
        a `ClipStats`.

    Raises:
        ValueError: if `max_rms` is negative, NaN or not a scalar, or `by` is invalid.
        TypeError: if `max_rms` is not a real number, or a leaf of `grad` is not
            floating-point or complex.

    Example:
        >>> g = {"w": jnp.array([3.0, -3.0, 3.0, -3.0])}
        >>> clipped, stats = jaxgrad.grad_clip_by_rms(g, 1.5)
        >>> clipped["w"], float(stats.rms), float(stats.scale)
        (Array([ 1.5, -1.5,  1.5, -1.5], dtype=float32), 3.0, 0.5)
    """
    bound = check_bound("max_rms", max_rms)
    return _checked_clip(grad, bound, "rms", by, axis_name)
