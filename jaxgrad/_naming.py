"""Names and groups of leaves: logger-ready key paths, `by=` groupings, host reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
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

_BY_VALUES = (
    "'leaf', 'group', None or a callable `(path, leaf) -> str | None` (or 'module', or "
    "`jaxgrad.by_depth(d)`)"
)


def _kept(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """`path` without the trailing Flax `.value` (kept when it is the whole path)."""
    end = len(path)
    while (
        end > 1
        and isinstance(path[end - 1], jax.tree_util.GetAttrKey)
        and path[end - 1].name in _DROPPED_ATTRS
    ):
        end -= 1
    return tuple(path[:end])


def _entry(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_name(path: tuple[Any, ...]) -> str:
    """A key path as a logger-ready name: entries joined by `/`, no brackets or quotes.

    `(DictKey('enc'), SequenceKey(0), DictKey('w'))` gives `enc/0/w`; Flax's trailing
    `.value` is dropped; the empty path (a gradient that is one array) is `(root)`, and a
    path whose entries are all empty strings keeps its brackets (`['']`), so that no
    name is empty. These are the group names of `grad_stats` and the paths of
    `NonfiniteReport`; two different paths can still share a name (`{"a/b": x}` and
    `{"a": {"b": y}}`), which the functions that group leaves refuse.

    Args:
        path: a key path, as from `jax.tree_util.tree_flatten_with_path`.

    Returns:
        The name, a non-empty `str`.

    Example:
        >>> g = jaxgrad.Gradient([{"bias": jnp.zeros(2)}], [])
        >>> [jaxgrad.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(g)[0]]
        ['layers/0/bias']
    """
    if not path:
        return ROOT
    kept = _kept(path)
    return "/".join(_entry(key) for key in kept) or jax.tree_util.keystr(kept)


def _check_unique(
    names: Sequence[str], paths: Sequence[tuple[Any, ...]], what: str, hint: str = ""
) -> None:
    """Raise `ValueError` naming both key paths when two different paths share a name."""
    seen: dict[str, tuple[Any, ...]] = {}
    for name, path in zip(names, paths, strict=True):
        first = seen.setdefault(name, path)
        if first != path:
            raise ValueError(
                f"{what} gives two different key paths the same name {name!r}: "
                f"{where(first)} and {where(path)}. Rename one of the keys (a `/` in a key "
                f"reads as a level){hint}."
            )


def leaf_names(tree: PyTree) -> tuple[str, ...]:
    """`path_name` of every leaf of `tree`, in `jax.tree.leaves` order; all different.

    Raises:
        ValueError: if two leaves have the same name (`{"a/b": x, "a": {"b": y}}`).
    """
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    names = tuple(path_name(path) for path in paths)
    if len(set(names)) < len(names):
        _check_unique(names, paths, "`path_name`")
    return names


@dataclasses.dataclass(frozen=True)
class ByDepth:
    """`by=jaxgrad.by_depth(depth)`: groups named by the first `depth` entries of a name."""

    depth: int

    def __repr__(self) -> str:
        """`by_depth(d)`, as it was made."""
        return f"by_depth({self.depth})"

    def __call__(self, path: tuple[Any, ...], leaf: Any) -> str:
        """The group name of the leaf at `path` (what `resolve_groups` computes too)."""
        del leaf
        return path_name(_kept(path)[: self.depth]) if path else ROOT


def by_depth(depth: int) -> Callable[[tuple[Any, ...], Any], str]:
    """A `by=` grouping that pools the leaves sharing the first `depth` entries of their names.

    For coarser views than `by="module"` (one group per innermost module): with a model
    `{"encoder": {"layers": [...]}, "head": {...}}`, `by_depth(1)` gives the groups
    `encoder` and `head`, `by_depth(2)` gives `encoder/layers` and `head/kernel`,
    `head/bias`. Depth counts the entries of the logger-ready name (`path_name`, so
    Flax's `.value` does not count); a leaf shallower than `depth` is its own group.
    Accepted wherever `by=` is (`grad_stats`, `grad_clip`, `update_stats`, the noise
    scale, the optax transformations); two different key paths that would share a group
    name raise a `ValueError` naming both.

    Args:
        depth: the number of leading name entries that name the group, at least 1.

    Returns:
        A callable `(path, leaf) -> str`, to pass as `by`.

    Raises:
        TypeError: if `depth` is not an int.
        ValueError: if `depth` is less than 1.

    Example:
        >>> grads = {"enc": {"0": {"w": jnp.ones(2), "b": jnp.ones(2)}, "1": {"w": jnp.ones(1)}}}
        >>> jaxgrad.grad_stats(grads, by=jaxgrad.by_depth(1)).names
        ('', 'enc')
        >>> jaxgrad.grad_stats(grads, by=jaxgrad.by_depth(2)).names
        ('', 'enc/0', 'enc/1')
    """
    if isinstance(depth, bool) or not isinstance(depth, int | np.integer):
        raise TypeError(f"`depth` must be an int; got {type(depth).__name__} {depth!r}.")
    if depth < 1:
        raise ValueError(f"`depth` must be at least 1; got {depth}.")
    return ByDepth(int(depth))


def _prefixes(
    pairs: list[tuple[tuple[Any, ...], Any]], by: str | ByDepth
) -> list[tuple[Any, ...]] | None:
    """The key-path prefix that names each leaf's group, for the built-in groupings."""
    if len(pairs) == 1 and not pairs[0][0]:
        return None  # a single array: its one group would repeat the whole gradient
    kept = [_kept(path) for path, _ in pairs]
    if isinstance(by, ByDepth):
        return [path[: by.depth] for path in kept]
    if by == "leaf":
        return kept
    if by == "module":
        return [path[:-1] if len(path) > 1 else path for path in kept]
    return [path[:2] for path in kept]  # "group"


def resolve_groups(grad: PyTree, by: By) -> Groups:
    """Leaf indices per group, in order of first appearance; runs a callable `by` as Python.

    Every group has its own non-empty name: two different key paths that would share a
    name, or a callable that returns `''` (the name of the whole-gradient entries), raise
    a `ValueError`.
    """
    if by is None:
        return ()
    pairs = jax.tree_util.tree_flatten_with_path(grad)[0]
    names: list[str | None]
    if isinstance(by, str | ByDepth):
        if by == "group" and not isinstance(grad, Gradient):
            raise ValueError(
                "`by='group'` needs a `Gradient` (groups `layers/i` and `weights/j`); "
                f"got a {type(grad).__name__}. For other trees use `by='module'` (one group "
                "per layer) or `by=jaxgrad.by_depth(d)`."
            )
        if isinstance(by, str) and by not in ("leaf", "module", "group"):
            raise ValueError(f"`by` must be {_BY_VALUES}; got {by!r}.")
        prefixes = _prefixes(pairs, by)
        if prefixes is None:
            return ()
        built = [path_name(prefix) for prefix in prefixes]
        names = list(built)
        shown = f"`by={by!r}`" if isinstance(by, str) else f"`by=by_depth({by.depth})`"
        _check_unique(built, prefixes, shown, ", or pass a callable `by` that names them apart")
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
            if name == "":
                raise ValueError(
                    f"`by` must not return '' (the name of the whole-gradient entries); at "
                    f"{where(path)} ({describe_leaf(leaf)}) it did. Return another name, "
                    "or None to leave the leaf out of the groups."
                )
            names.append(name)
    else:
        raise TypeError(f"`by` must be {_BY_VALUES}; got {type(by).__name__} {by!r}.")
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        if name is not None:
            groups.setdefault(name, []).append(i)
    return tuple((name, tuple(indices)) for name, indices in groups.items())


def host_read(owner: str, arrays: Sequence[Any]) -> list[np.ndarray]:
    """`arrays` as numpy arrays on this host: the one device-to-host read of the package.

    Arrays that this process holds whole are read in one transfer. An array that spans
    several processes (a multi-process `jax.distributed` run) is read from the local
    copy when it is replicated, and otherwise gathered from every process with
    `jax.experimental.multihost_utils.process_allgather`: a collective, so every
    process must make the same call (as a training loop does), not only process 0.
    `owner` (e.g. `GroupStats.as_dict`) names the caller in the error for traced values.

    Raises:
        TypeError: if a value is traced (the read was called inside `jax.jit`).
    """
    if any(isinstance(x, Tracer) for x in arrays):
        raise TypeError(
            f"`{owner}` reads the values on the host; call it on what `jax.jit` "
            "returned, not inside the traced function."
        )
    out: list[Any] = list(arrays)
    local = []
    for i, x in enumerate(arrays):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                out[i] = x.addressable_data(0)
            else:
                from jax.experimental import multihost_utils

                out[i] = multihost_utils.process_allgather(x, tiled=True)
        else:
            local.append(i)
    for i, value in zip(local, jax.device_get([out[i] for i in local]), strict=True):
        out[i] = value
    return [np.asarray(x) for x in out]


def logger_dict(
    owner: str, arrays: dict[str, Array], names: tuple[str, ...], prefix: str
) -> dict[str, Any]:
    """`{<prefix><field>[/<group>]: value}` of per-group arrays, read in one transfer.

    The last axis of each array is the group (`names`, `""` for the whole gradient);
    leading axes (a `lax.scan` of steps) are kept, as numpy arrays. `owner` names the
    class in the error for traced values (see `host_read`).
    """
    host = host_read(f"{owner}.as_dict", list(arrays.values()))
    out: dict[str, Any] = {}
    for field, values in zip(arrays, host, strict=True):
        for g, name in enumerate(names):
            value = values[..., g]
            key = f"{prefix}{field}/{name}" if name else f"{prefix}{field}"
            out[key] = value.item() if value.ndim == 0 else value
    return out


def static_by(grad: PyTree, by: By) -> str | Groups | None:
    """`by` as a static argument of a kernel.

    A name is kept, and the groups are found at trace time, at no cost per call; a
    callable is run now, as plain Python, and its groups passed on.
    """
    if by is None or by in ("leaf", "group", "module"):
        return by  # type: ignore[return-value]
    return resolve_groups(grad, by)


def groups_of(grad: PyTree, by: str | Groups | None) -> Groups:
    """The groups of a static `by` (see `static_by`)."""
    return by if isinstance(by, tuple) else resolve_groups(grad, by)
