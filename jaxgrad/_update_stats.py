"""Update-to-parameter statistics: update and parameter norms, RMS and ratio, by group."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import (
    check_array_leaves,
    check_axis_name,
    check_same_shapes,
    check_same_structure,
    nnx_params,
)
from ._naming import By, Groups, logger_dict, resolve_groups
from ._numerics import AxisName, Segments, reduce_tree, tree_leaves
from ._typing import Array, PyTree


@dataclasses.dataclass(frozen=True)
class UpdateStats:
    """Norms and RMS of an optimizer's update and of the parameters, and their ratio, by group.

    Entry 0 of each array is the whole tree (its name is `""`); entries 1 onwards are the
    groups chosen by `by` (`names[1:]`, logger-ready: `layers/0`, `head`). A pytree whose
    five arrays are the statistics (the names are static), so it can be returned from
    `jax.jit`, carried or stacked by `jax.lax.scan`, and kept in an optax state (see
    `jaxgrad.optax.track_update_stats`).

    `update_ratio` is `update_norm / param_norm`, the relative size of the step. A group
    whose parameters are all zero (a bias at initialisation, or an empty group) has the
    ratio `inf` when its update is not zero and `0` when it is (`0 / 0` is taken as 0).

    Attributes:
        update_norm: the L2 norm of the update in each group (float32, or float64 under
            x64); NaN or inf when an entry is.
        param_norm: the L2 norm of the parameters in each group.
        update_ratio: `update_norm / param_norm` in each group (see above for zero).
        update_rms: the root-mean-square of the update's entries in each group.
        param_rms: the root-mean-square of the parameters' entries in each group.
        names: the static group names; `names[0] == ""` is the whole tree.

    Example:
        >>> params = {"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(1)}
        >>> updates = {"w": jnp.array([0.03, 0.04]), "b": jnp.zeros(1)}
        >>> stats = jaxgrad.update_stats(updates, params, by="leaf")
        >>> stats.names, stats.update_ratio
        (('', 'b', 'w'), Array([0.01, 0.  , 0.01], dtype=float32))
        >>> stats.as_dict()["update_ratio/w"], stats.as_dict()["param/norm"]
        (0.009999999776482582, 5.0)
    """

    update_norm: Array
    param_norm: Array
    update_ratio: Array
    update_rms: Array
    param_rms: Array
    names: tuple[str, ...]

    KEYS = (
        ("update/norm", "update_norm"),
        ("param/norm", "param_norm"),
        ("update_ratio", "update_ratio"),
        ("update/rms", "update_rms"),
        ("param/rms", "param_rms"),
    )

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """A flat `{key: value}` dict for a logger, read from the device in one transfer.

        Keys are `<prefix>update/norm`, `param/norm`, `update_ratio`, `update/rms` and
        `param/rms` for the whole tree, each followed by `/<group>` for the groups
        (`update_ratio/layers/0`). Values are Python numbers, or numpy arrays when the
        statistics have leading axes (stacked by `jax.lax.scan`: one value per step).
        Call it on the stats a jitted function returned, not inside the traced function.

        Args:
            prefix: prepended to every key, e.g. `"opt/"`.

        Returns:
            A dict from `str` to numbers or numpy arrays.

        Raises:
            TypeError: if called on traced values (inside `jax.jit`).

        Example:
            >>> stats = jaxgrad.update_stats({"w": jnp.array([0.3, 0.4])}, {"w": jnp.array([3.0, 4.0])})
            >>> stats.as_dict()
            {'update/norm': 0.5, 'param/norm': 5.0, 'update_ratio': 0.1, 'update/rms': 0.3535533845424652, 'param/rms': 3.535533905029297}
        """  # noqa: E501
        arrays = {key: getattr(self, field) for key, field in self.KEYS}
        return logger_dict("UpdateStats", arrays, self.names, prefix)


jax.tree_util.register_dataclass(
    UpdateStats,
    data_fields=["update_norm", "param_norm", "update_ratio", "update_rms", "param_rms"],
    meta_fields=["names"],
)


def _norms_and_rms(
    update_leaves: list[Array],
    param_leaves: list[Array],
    groups: Groups,
    axis_name: AxisName,
    pack: bool,
) -> tuple[Array, Array, Array, Array]:
    """Norms and RMS of the update and of the parameters: whole, then each group.

    Every call into the numerics core is here. One packed pass over both trees: the
    leaves are `updates + params`, and three segmentations share their sums of squares:
    everything (it decides the overflow-safe branch, so a huge parameter norm is as exact
    as a huge update norm), the two sides, and each group on each side.
    """
    n = len(update_leaves)
    leaves = [*update_leaves, *param_leaves]
    user = Segments.from_groups(groups, n)
    g = user.groups
    out = 2 * g  # the id of "in no group"
    update_ids = np.where(user.ids < g, user.ids, out)
    param_ids = np.where(user.ids < g, user.ids + g, out)
    sides = Segments(np.repeat(np.arange(2, dtype=np.int32), n), 2)
    both = Segments(np.concatenate([update_ids, param_ids]).astype(np.int32), 2 * g)
    found = reduce_tree(leaves, [sides, both], axis_name=axis_name, pack=pack)
    _, side, group = found.norms()
    _, side_rms, group_rms = found.rms()
    return (
        jnp.concatenate([side[:1], group[:g]]),
        jnp.concatenate([side[1:], group[g:]]),
        jnp.concatenate([side_rms[:1], group_rms[:g]]),
        jnp.concatenate([side_rms[1:], group_rms[g:]]),
    )


@functools.partial(jax.jit, static_argnames=("groups", "axis_name", "pack"))
def _update_stats(
    updates: PyTree, params: PyTree, *, groups: Groups, axis_name: AxisName, pack: bool = True
) -> UpdateStats:
    update_norm, param_norm, update_rms, param_rms = _norms_and_rms(
        tree_leaves(updates), tree_leaves(params), groups, axis_name, pack
    )
    zero = param_norm == 0
    ratio = jnp.where(
        zero,
        jnp.where(update_norm == 0, 0, jnp.inf).astype(update_norm.dtype),
        update_norm / jnp.where(zero, 1, param_norm).astype(param_norm.dtype),
    )
    return UpdateStats(
        update_norm=update_norm,
        param_norm=param_norm,
        update_ratio=ratio,
        update_rms=update_rms,
        param_rms=param_rms,
        names=("", *(name for name, _ in groups)),
    )


def update_stats(
    updates: PyTree, params: PyTree, *, by: By = None, axis_name: AxisName = None
) -> UpdateStats:
    """The norms of an update and of the parameters, and their ratio, overall and per group.

    The update-to-parameter ratio `|update| / |params|` per layer is the usual health
    signal for a learning rate (too small and a layer does not learn, too large and it
    thrashes). Returns an `UpdateStats`: five small arrays (one entry for the whole
    tree, then one per group) and the static group names; `stats.as_dict()` gives the
    flat logger dict (`update/norm`, `param/norm/layers/0`, `update_ratio/layers/0`) on
    the host in one transfer. Both trees are read in one packed pass, and every norm is
    accumulated in float32 (float64 under x64) and exact for every finite input, as
    `grad_norm` is. A zero-parameter group has the ratio `inf` (or 0 when its update is
    zero too). The groups are chosen by `by`, as in `grad_stats`, and read from
    `params`: `"module"` gives one group per layer (`layers/0`: kernel and bias).

    Args:
        updates: the optimizer's update (what is added to the parameters), a pytree
            with the structure and shapes of `params`.
        params: the parameters the update is applied to (before the step), or a Flax
            `nnx.Module`.
        by: `"leaf"`, `"module"`, `"group"`, `jaxgrad.by_depth(d)`, a callable
            `(path, leaf) -> str | None`, or `None` (the whole tree only).
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of larger trees; see docs/many_devices.md.

    Returns:
        An `UpdateStats`.

    Raises:
        ValueError: if the trees differ in structure or leaf shapes, or `by` is not a
            valid grouping (see `grad_stats`).
        TypeError: if a leaf is not a numeric array, or `by` or `axis_name` has the
            wrong type.

    Example:
        >>> params = {"layers": [{"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}]}
        >>> updates = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
        >>> stats = jaxgrad.update_stats(updates, params, by="module")
        >>> stats.names
        ('', 'layers/0')
        >>> logs = stats.as_dict()
        >>> round(logs["update_ratio/layers/0"], 4), logs["param/norm/layers/0"]
        (0.0122, 2.0)
    """
    updates = nnx_params(updates)
    params = nnx_params(params)
    check_array_leaves("updates", updates)
    check_array_leaves("params", params)
    check_same_structure("updates", updates, "params", params)
    check_same_shapes("updates", updates, "params", params)
    check_axis_name(axis_name, optional=True)
    groups = resolve_groups(params, by)
    return _update_stats(updates, params, groups=groups, axis_name=axis_name)
