"""Gradient statistics for logging: norm, RMS, max-abs and non-finite count, by group."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from ._checks import check_array_leaves, checked_call, nnx_params
from ._naming import By, Groups, groups_of, logger_dict, static_by
from ._numerics import AxisName, Reduced, Segments, reduce_tree, tree_leaves
from ._typing import Array, PyTree


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Statistics of a gradient: one array per statistic, one entry per group.

    Entry 0 is the whole gradient (its name is `""`); entries 1 onwards are the groups
    chosen by `by` (`names[1:]`, logger-ready: `hidden1/kernel`, `layers/0/bias`). A
    pytree whose four arrays are the statistics (the names are static), so it can be
    returned from `jax.jit`, carried or stacked by `jax.lax.scan` (a leading step axis
    is then kept by `as_dict`) and reduced across devices.

    Attributes:
        norm: the L2 norm of each group (float32, or float64 under x64); NaN or inf when
            an entry is.
        rms: the root-mean-square of each group's entries.
        max_abs: the largest absolute entry of each group; NaN when an entry is NaN.
        nonfinite: the number of NaN and inf entries of each group (int32; int64 under
            x64 or float32 beyond 2**31 entries, where int32 would overflow).
        names: the static group names; `names[0] == ""` is the whole gradient.

    Example:
        >>> stats = jaxgrad.grad_stats({"w": jnp.array([3.0, -4.0]), "b": jnp.array([jnp.inf])})
        >>> stats.names
        ('', 'b', 'w')
        >>> stats.norm
        Array([inf, inf,  5.], dtype=float32)
        >>> stats.as_dict()["max_abs/w"], stats.as_dict()["nonfinite"]
        (4.0, 1)
    """

    norm: Array
    rms: Array
    max_abs: Array
    nonfinite: Array
    names: tuple[str, ...]

    STATISTICS = ("norm", "rms", "max_abs", "nonfinite")

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """A flat `{key: value}` dict for a logger, read from the device in one transfer.

        Keys are `<prefix><stat>` for the whole gradient and `<prefix><stat>/<group>`
        for each group. Values are Python numbers, or numpy arrays when the statistics
        have leading axes (stacked by `jax.lax.scan`: one value per step). Call it on
        the stats a jitted function returned, not inside the traced function.

        Args:
            prefix: prepended to every key, e.g. `"grad/"`.

        Returns:
            A dict from `str` to numbers or numpy arrays.

        Raises:
            TypeError: if called on traced values (inside `jax.jit`).

        Example:
            >>> stats = jaxgrad.grad_stats({"w": jnp.array([3.0, 4.0])}, by=None)
            >>> stats.as_dict(prefix="grad/")
            {'grad/norm': 5.0, 'grad/rms': 3.535533905029297, 'grad/max_abs': 4.0, 'grad/nonfinite': 0}
        """  # noqa: E501
        arrays = {stat: getattr(self, stat) for stat in self.STATISTICS}
        return logger_dict("GroupStats", arrays, self.names, prefix)


jax.tree_util.register_dataclass(
    GroupStats, data_fields=["norm", "rms", "max_abs", "nonfinite"], meta_fields=["names"]
)


def measure(
    leaves: list[Array], groups: Groups | None, axis_name: AxisName, pack: bool = True
) -> tuple[Reduced, GroupStats | None]:
    """The packed reduction of `leaves` and, for `groups`, their `GroupStats`: one read.

    Without groups only the norms are computed (the whole gradient's, for a clip); with
    groups (`()` for the whole gradient alone) the max-abs and non-finite counts too.
    """
    if groups is None:
        return reduce_tree(leaves, axis_name=axis_name, pack=pack), None
    user = Segments.from_groups(groups, len(leaves))
    found = reduce_tree(
        leaves, [user], axis_name=axis_name, pack=pack, max_abs=True, nonfinite=True
    )
    assert found.max_abs is not None and found.nonfinite is not None
    stats = GroupStats(
        norm=jnp.concatenate(found.norms()),
        rms=jnp.concatenate(found.rms()),
        max_abs=jnp.concatenate(found.max_abs),
        nonfinite=jnp.concatenate(found.nonfinite),
        names=("", *(name for name, _ in groups)),
    )
    return found, stats


@functools.partial(jax.jit, static_argnames=("by", "axis_name", "pack"))
def _stats(
    grad: PyTree, *, by: str | Groups | None, axis_name: AxisName, pack: bool = True
) -> GroupStats:
    check_array_leaves("grad", grad)
    stats = measure(tree_leaves(grad), groups_of(grad, by), axis_name, pack)[1]
    assert stats is not None
    return stats


def grad_stats(grad: PyTree, *, by: By = "leaf", axis_name: AxisName = None) -> GroupStats:
    """Norm, RMS, max-abs and non-finite count of a gradient, overall and per group.

    Returns a `GroupStats`: four small arrays (one entry for the whole gradient, then
    one per group) and the static group names, so a jitted step returns four device
    buffers however many leaves the model has. `stats.as_dict()` makes the flat dict a
    logger wants (`norm`, `norm/hidden1/kernel`, ...) on the host, in one transfer.
    The groups are chosen by `by`:

    - `"leaf"` (the default): one group per leaf, named by its key path joined with `/`
      (`enc/0/w`, `layers/0/bias`; Flax's `.value` dropped). A gradient that is a single
      array has no per-leaf groups (they would repeat the whole gradient).
    - `"group"`: for a `Gradient`, one group per layer and per weight group, named
      `layers/i` and `weights/j`.
    - a callable `by(path, leaf) -> str | None`: the group name of each leaf (leaves
      with the same name are pooled; `None` leaves a leaf out of the groups, not out of
      the whole). It runs as plain Python on every call, never compiled.
    - `None`: the whole gradient only.

    Norms and RMS accumulate in float32 (float64 under x64), exactly for every finite
    input, and are NaN or inf when an entry is; `max_abs` is NaN when an entry is NaN;
    `nonfinite` counts NaN and inf entries. Empty groups and empty gradients give zeros.
    The gradient is read once for the sums of squares and once for max-abs; to clip in
    the same pass use `grad_clip(grad, max_norm, by=...)`, which returns these
    statistics too.

    Args:
        grad: a `Gradient` or any pytree of numeric arrays.
        by: `"leaf"`, `"group"`, a callable `(path, leaf) -> str | None`, or `None`.
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of one larger gradient; see docs/many_devices.md.

    Returns:
        A `GroupStats`.

    Raises:
        ValueError: if `by` is an unknown string, or `"group"` for a tree that is not a
            `Gradient`.
        TypeError: if `by` is neither a string, a callable nor `None`, the callable
            returns something other than a string or `None`, or a leaf is not a numeric
            array.

    Example:
        >>> g = jaxgrad.Gradient([{"b": jnp.array([3.0, 4.0])}], [{"W": jnp.array([[0.0, jnp.inf]])}])
        >>> stats = jaxgrad.grad_stats(g, by="group")
        >>> stats.names
        ('', 'layers/0', 'weights/0')
        >>> logs = stats.as_dict()
        >>> logs["norm/layers/0"], logs["nonfinite"], logs["nonfinite/weights/0"]
        (5.0, 1, 1)
    """  # noqa: E501
    return checked_call(
        _stats, "grad", grad, by=static_by(nnx_params(grad), by), axis_name=axis_name
    )
