"""Gradient statistics for logging: norm, RMS, max-abs and non-finite count, by group."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._dispatch import compiled
from ._gradient import Gradient
from ._reduce import AxisName, _psum, _safe_sqrt, accumulation_dtype
from ._structure import describe_leaf, where
from ._typing import Array, PyTree

STATS = ("norm", "rms", "max_abs", "nonfinite")
By = str | Callable[[tuple[Any, ...], Any], str | None] | None
Groups = tuple[tuple[str, tuple[int, ...]], ...]
"""Static grouping: `(name, indices of the leaves in the group)` for each group."""


def _name(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path).lstrip(".")


def _groups(grad: PyTree, by: By) -> Groups:
    """Leaf indices per group, in order of first appearance; runs a callable `by` as Python."""
    pairs = jax.tree_util.tree_flatten_with_path(grad)[0]
    if by is None:
        return ()
    if isinstance(by, str):
        if by == "leaf":
            return tuple((_name(path), (i,)) for i, (path, _) in enumerate(pairs) if path)
        if by == "group":
            if not isinstance(grad, Gradient):
                raise ValueError(
                    "`by='group'` needs a `Gradient` (groups `layers[i]` and `weights[j]`); "
                    f"got a {type(grad).__name__}. For other trees pass a callable, e.g. "
                    "`by=lambda path, leaf: jax.tree_util.keystr(path[:1])`."
                )
            names = [_name(path[:2]) for path, _ in pairs]
        else:
            raise ValueError(
                f"`by` must be 'leaf', 'group', None or a callable `(path, leaf) -> str | None`; "
                f"got {by!r}."
            )
    elif callable(by):
        names = []
        for path, leaf in pairs:
            name = by(path, leaf)
            if name is not None and not isinstance(name, str):
                raise TypeError(
                    f"`by` must return a group name (str) or None for every leaf; at "
                    f"{where(path)} ({describe_leaf(leaf)}) it returned "
                    f"{type(name).__name__} {name!r}."
                )
            names.append(name)
    else:
        raise TypeError(
            "`by` must be 'leaf', 'group', None or a callable `(path, leaf) -> str | None`; "
            f"got {type(by).__name__} {by!r}."
        )
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None:
            groups.setdefault(name, []).append(i)
    return tuple((name, tuple(indices)) for name, indices in groups.items())


def stat_keys(groups: Groups) -> list[str]:
    """The dict keys of `grad_stats`, in order: global ones, then `stat/group` stat by stat."""
    return [*STATS, *(f"{stat}/{name}" for stat in STATS for name, _ in groups)]


def _partials(x: Array, acc: Any) -> tuple[Array, Array, Array]:
    """Sum of squares, max-abs and non-finite count of one leaf, in one variadic reduce."""
    a = jnp.abs(x).astype(acc)  # |x| is real for complex x, so a*a is |x|**2
    bad = (~jnp.isfinite(x)).astype(jnp.int32)
    zero = jnp.zeros((), acc)
    total, largest, count = jax.lax.reduce(
        (a * a, a, bad),
        (zero, zero, jnp.zeros((), jnp.int32)),
        lambda p, q: (p[0] + q[0], jnp.maximum(p[1], q[1]), p[2] + q[2]),  # max keeps NaN
        tuple(range(x.ndim)),
    )
    return total, largest, count


@compiled(static_argnames=("groups", "axis_name"))
def _stats(grad: PyTree, *, groups: Groups, axis_name: AxisName) -> tuple[Array, Array]:
    """`(norm, rms and max_abs of (global, *groups), concatenated; nonfinite of the same)`."""
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(grad)]
    acc = accumulation_dtype(x.dtype for x in leaves)
    rows = len(groups) + 1
    if leaves:
        sq, mx, nf = (jnp.stack(v) for v in zip(*(_partials(x, acc) for x in leaves), strict=True))
    else:
        sq, mx, nf = jnp.zeros(1, acc), jnp.zeros(1, acc), jnp.zeros(1, jnp.int32)
    member = np.zeros((rows, max(len(leaves), 1)), bool)  # static: which leaves in which row
    member[0, : len(leaves)] = True
    for row, (_, indices) in enumerate(groups, start=1):
        member[row, list(indices)] = True
    sizes = np.array([x.size for x in leaves] or [0])
    mask = jnp.asarray(member)
    # Masked sums, not a 0/1 matmul: 0 * inf would turn other groups' values into NaN.
    sq = jnp.sum(jnp.where(mask, sq, 0), axis=1)
    mx = jnp.max(jnp.where(mask, mx, 0), axis=1)
    nf = jnp.sum(jnp.where(mask, nf, 0), axis=1)
    counts = jnp.asarray(member @ sizes, jnp.int32)
    if axis_name is not None:
        sq = _psum(sq, axis_name)
        mx = jax.lax.pmax(mx, axis_name)
        nf, counts = _psum(jnp.stack([nf, counts]), axis_name)
    n = counts.astype(acc)
    rms = _safe_sqrt(sq / jnp.where(n == 0, 1, n))
    return jnp.concatenate([_safe_sqrt(sq), rms, mx]), nf


def grad_stats(grad: PyTree, *, by: By = "leaf", axis_name: AxisName = None) -> dict[str, Array]:
    """Norm, RMS, max-abs and non-finite count of a gradient, overall and per group.

    A flat dict of 0-d arrays, ready for any logger (TensorBoard, W&B, a pandas row):
    `norm`, `rms`, `max_abs` and `nonfinite` for the whole gradient, then
    `norm/<group>`, `rms/<group>`, `max_abs/<group>` and `nonfinite/<group>` for every
    group, where the groups are chosen by `by`:

    - `"leaf"` (the default): one group per leaf, named by its key path
      (`jax.tree_util.keystr` without a leading dot: `['enc'][0]['w']`,
      `layers[0]['bias']`). A gradient that is a single array has no per-leaf keys
      (they would repeat the global ones).
    - `"group"`: for a `Gradient`, one group per layer and per weight group, named
      `layers[i]` and `weights[j]`.
    - a callable `by(path, leaf) -> str | None`: the group name of each leaf (leaves
      with the same name are pooled; `None` leaves a leaf out of the groups, not out of
      the global values). It runs as plain Python on every call, never compiled; only
      the names it returns are part of the compiled computation.
    - `None`: the global values only.

    Norms and RMS accumulate in float32 (float64 under x64) and are NaN or inf when an
    entry is; `max_abs` is NaN when an entry is NaN; `nonfinite` counts NaN and inf
    entries (int32). Empty groups and empty gradients give zeros. Called eagerly, the
    gradient is read in one compiled dispatch (cached per structure, shapes, dtypes and
    group names) that returns two small vectors, which are then split into the dict's
    0-d arrays; `jax.device_get(stats)` brings every value to the host in one transfer.
    Under `jax.jit` the returned dict comes back with its keys sorted, as JAX does for
    every dict.

    Args:
        grad: a `Gradient` or any pytree of arrays.
        by: `"leaf"`, `"group"`, a callable `(path, leaf) -> str | None`, or `None`.
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the local leaves are shards of one larger gradient;
            every value is the global one. `None` (the default) means no collective.

    Returns:
        A dict from `str` keys to 0-d arrays, global keys first, then the per-group keys
        statistic by statistic, groups in leaf order.

    Raises:
        ValueError: if `by` is an unknown string, or `"group"` for a tree that is not a
            `Gradient`.
        TypeError: if `by` is neither a string, a callable nor `None`, or the callable
            returns something other than a string or `None`.

    Example:
        >>> g = jaxgrad.Gradient([{"b": jnp.array([3.0, 4.0])}], [{"W": jnp.array([[0.0, jnp.inf]])}])
        >>> stats = jaxgrad.grad_stats(g, by="group")
        >>> list(stats)  # doctest: +NORMALIZE_WHITESPACE
        ['norm', 'rms', 'max_abs', 'nonfinite', 'norm/layers[0]', 'norm/weights[0]',
         'rms/layers[0]', 'rms/weights[0]', 'max_abs/layers[0]', 'max_abs/weights[0]',
         'nonfinite/layers[0]', 'nonfinite/weights[0]']
        >>> float(stats["norm/layers[0]"]), int(stats["nonfinite"])
        (5.0, 1)
        >>> jaxgrad.grad_stats({"w": jnp.array([-2.0])})["max_abs/['w']"]
        Array(2., dtype=float32)
    """  # noqa: E501
    groups = _groups(grad, by)
    floats, counts = _stats(grad, groups=groups, axis_name=axis_name)
    # Two vectors came back; `list` splits each into 0-d arrays (one dispatch each).
    rows = len(groups) + 1
    flat = list(floats)
    columns = [flat[:rows], flat[rows : 2 * rows], flat[2 * rows :], list(counts)]
    values = [c[0] for c in columns] + [v for c in columns for v in c[1:]]
    return dict(zip(stat_keys(groups), values, strict=True))
