"""Names and groups of leaves: logger-ready key paths, `by=` groupings, logger dicts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.core import Tracer

from ._checks import describe_leaf, where
from ._gradient import Gradient
from ._typing import Array, PyTree

By = str | Callable[[tuple[Any, ...], Any], str | None] | None
Groups = tuple[tuple[str, tuple[int, ...]], ...]
"""Static grouping: `(name, indices of the leaves in the group)` for each group."""

ROOT = "(root)"
"""The name of the leaf of a gradient that is a single array."""

_DROPPED_ATTRS = ("value", "raw_value")  # Flax `Variable` wrappers, not part of the name


def path_name(path: tuple[Any, ...]) -> str:
    """A key path as a logger-ready name: entries joined by `/`, no brackets or quotes.

    `(DictKey('enc'), SequenceKey(0), DictKey('w'))` gives `enc/0/w`; Flax's trailing
    `.value` is dropped; the empty path (a gradient that is one array) is `(root)`.
    These are the group names of `grad_stats` and the paths of `NonfiniteReport`.

    Args:
        path: a key path, as from `jax.tree_util.tree_flatten_with_path`.

    Returns:
        The name, a `str`.

    Example:
        >>> g = jaxgrad.Gradient([{"bias": jnp.zeros(2)}], [])
        >>> [jaxgrad.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(g)[0]]
        ['layers/0/bias']
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    while len(parts) > 1 and isinstance(path[len(parts) - 1], jax.tree_util.GetAttrKey):
        if parts[-1] not in _DROPPED_ATTRS:
            break
        parts.pop()
    return "/".join(parts) or ROOT


def leaf_names(tree: PyTree) -> tuple[str, ...]:
    """`path_name` of every leaf of `tree`, in `jax.tree.leaves` order."""
    return tuple(path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def resolve_groups(grad: PyTree, by: By) -> Groups:
    """Leaf indices per group, in order of first appearance; runs a callable `by` as Python."""
    if by is None:
        return ()
    pairs = jax.tree_util.tree_flatten_with_path(grad)[0]
    if isinstance(by, str):
        if by == "leaf":
            if len(pairs) == 1 and not pairs[0][0]:
                return ()  # a single array: its one group would repeat the whole gradient
            return tuple((path_name(path), (i,)) for i, (path, _) in enumerate(pairs))
        if by == "group":
            if not isinstance(grad, Gradient):
                raise ValueError(
                    "`by='group'` needs a `Gradient` (groups `layers/i` and `weights/j`); "
                    f"got a {type(grad).__name__}. For other trees pass a callable, e.g. "
                    "`by=lambda path, leaf: jaxgrad.path_name(path[:1])`."
                )
            names: list[str | None] = [path_name(path[:2]) for path, _ in pairs]
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


def logger_dict(
    owner: str, arrays: dict[str, Array], names: tuple[str, ...], prefix: str
) -> dict[str, Any]:
    """`{<prefix><field>[/<group>]: value}` of per-group arrays, read in one transfer.

    The last axis of each array is the group (`names`, `""` for the whole gradient);
    leading axes (a `lax.scan` of steps) are kept, as numpy arrays. `owner` names the
    class in the error for traced values.
    """
    if any(isinstance(x, Tracer) for x in arrays.values()):
        raise TypeError(
            f"`{owner}.as_dict` reads the values on the host; call it on what `jax.jit` "
            "returned, not inside the traced function."
        )
    host = jax.device_get(list(arrays.values()))
    out: dict[str, Any] = {}
    for field, values in zip(arrays, host, strict=True):
        values = np.asarray(values)
        for g, name in enumerate(names):
            value = values[..., g]
            key = f"{prefix}{field}/{name}" if name else f"{prefix}{field}"
            out[key] = value.item() if value.ndim == 0 else value
    return out
