"""Checks before buffer donation, with errors that name key paths instead of XLA's."""

from typing import Any

import jax

from ._structure import where
from ._typing import PyTree


def _array_paths(tree: PyTree) -> list[tuple[str, jax.Array]]:
    return [
        (where(path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if isinstance(leaf, jax.Array)
    ]


def check_donatable(name: str, tree: PyTree, **others: Any) -> None:
    """Raise `ValueError` if an array of `tree` appears twice in it or in any of `others`.

    Donating such an array would delete a buffer that another part of the call still
    reads; XLA's own error for it does not say where the array is.
    """
    seen: dict[int, str] = {}
    for path, leaf in _array_paths(tree):
        if leaf.is_deleted():
            raise ValueError(
                f"`{name}` cannot be donated: its array at {path} was already deleted "
                "(donated by an earlier call)."
            )
        first = seen.setdefault(id(leaf), path)
        if first != path:
            raise ValueError(
                f"`{name}` cannot be donated: the same array appears at {first} and at {path}; "
                "pass a copy or use `donate=False`."
            )
    for other_name, other in others.items():
        for path, leaf in _array_paths(other):
            if id(leaf) in seen:
                raise ValueError(
                    f"`{name}` cannot be donated: its array at {seen[id(leaf)]} is also "
                    f"`{other_name}` at {path}; pass a copy or use `donate=False`."
                )
