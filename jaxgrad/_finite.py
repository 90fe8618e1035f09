"""Finiteness checks that work inside `jax.jit`: all-finite, per-leaf report, fallback."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._dispatch import compiled
from ._reduce import AxisName, _psum
from ._structure import check_same_shapes, check_same_structure
from ._typing import Array, ArrayLike, PyTree


def _nonfinite_counts(grad: PyTree) -> list[Array]:
    return [jnp.sum(~jnp.isfinite(jnp.asarray(x)), dtype=jnp.int32) for x in jax.tree.leaves(grad)]


@compiled(static_argnames=("axis_name",))
def grad_all_finite(grad: PyTree, *, axis_name: AxisName = None) -> Array:
    """Whether every entry of a gradient is finite (no NaN, no inf), as a bool array.

    Works inside `jax.jit` (no host round trip, unlike a Python `if` on the values):
    combine it with `jax.lax.cond` or `grad_where_finite` to skip a bad step. An empty
    gradient and integer leaves count as finite. Called eagerly it is one compiled
    dispatch.

    Args:
        grad: a `Gradient` or any pytree of arrays.
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the local leaves are shards of one larger gradient; the
            answer is the global one (one `psum`). `None` (the default) means no
            collective.

    Returns:
        A 0-d bool array.

    Example:
        >>> jaxgrad.grad_all_finite({"w": jnp.array([1.0, 2.0]), "b": jnp.array(jnp.nan)})
        Array(False, dtype=bool)
        >>> jaxgrad.grad_all_finite({})
        Array(True, dtype=bool)
    """
    bad = sum(_nonfinite_counts(grad), jnp.zeros((), jnp.int32))
    return _psum(bad, axis_name) == 0


@dataclasses.dataclass(frozen=True)
class NonfiniteReport:
    """Non-finite entries of a gradient, counted per leaf; returned by `grad_nonfinite_report`.

    A pytree (its one array is `counts`; `paths` is static), so it can be returned
    from `jax.jit` or carried through `jax.lax.scan`. `total` works anywhere; the
    methods `first_path`, `as_dict` and `summary` read the counts on the host, so call
    them on the report that `jax.jit` returned, not inside the traced function.

    Attributes:
        counts: int32 array of shape `(number of leaves,)`: NaN and inf entries of each
            leaf, in `jax.tree.leaves` order.
        paths: the key path of each leaf (`jax.tree_util.keystr`; `""` for a gradient
            that is a single array).

    Example:
        >>> report = jaxgrad.grad_nonfinite_report({"a": jnp.ones(2), "b": jnp.array([jnp.inf, jnp.nan])})
        >>> report.counts, report.paths
        (Array([0, 2], dtype=int32), ("['a']", "['b']"))
        >>> report.first_path()
        "['b']"
    """  # noqa: E501

    counts: Array
    paths: tuple[str, ...]

    @property
    def total(self) -> Array:
        """The number of non-finite entries in the whole gradient (a 0-d int32 array).

        Example:
            >>> jaxgrad.grad_nonfinite_report([jnp.array([jnp.nan, jnp.inf])]).total
            Array(2, dtype=int32)
        """
        return jnp.sum(self.counts, dtype=jnp.int32)

    def _host_counts(self, method: str) -> np.ndarray:
        try:
            return np.asarray(self.counts)
        except jax.errors.TracerArrayConversionError:
            raise TypeError(
                f"`NonfiniteReport.{method}` reads the counts on the host; call it on the "
                "report returned from `jax.jit`, not inside the traced function "
                "(use `report.total` or `report.counts` there)."
            ) from None

    def first_path(self) -> str | None:
        """The key path of the first leaf (in leaf order) with a non-finite entry, or `None`.

        Example:
            >>> jaxgrad.grad_nonfinite_report({"w": [jnp.ones(1), jnp.array([jnp.nan])]}).first_path()
            "['w'][1]"
        """  # noqa: E501
        bad = np.flatnonzero(self._host_counts("first_path"))
        return self.paths[int(bad[0])] if bad.size else None

    def as_dict(self) -> dict[str, int]:
        """`{path: count}` for the leaves with non-finite entries, in leaf order.

        Example:
            >>> jaxgrad.grad_nonfinite_report({"a": jnp.array([jnp.nan]), "b": jnp.ones(1)}).as_dict()
            {"['a']": 1}
        """  # noqa: E501
        counts = self._host_counts("as_dict")
        return {p: int(c) for p, c in zip(self.paths, counts, strict=True) if c}

    def summary(self) -> str:
        """One line for a log: how many non-finite entries, and where the first one is.

        Example:
            >>> jaxgrad.grad_nonfinite_report({"a": jnp.array([jnp.nan, 1.0])}).summary()
            "1 non-finite entry in 1 of 1 leaf; first at ['a']"
            >>> jaxgrad.grad_nonfinite_report({"a": jnp.ones(2), "b": jnp.ones(1)}).summary()
            'no non-finite entries in 2 leaves'
        """
        counts = self._host_counts("summary")
        total = int(counts.sum())
        leaves = f"{len(self.paths)} leaf" if len(self.paths) == 1 else f"{len(self.paths)} leaves"
        if total == 0:
            return f"no non-finite entries in {leaves}"
        first = self.paths[int(np.flatnonzero(counts)[0])] or "the root"
        entries = "entry" if total == 1 else "entries"
        return (
            f"{total} non-finite {entries} in {int(np.count_nonzero(counts))} of {leaves}; "
            f"first at {first}"
        )


jax.tree_util.register_dataclass(NonfiniteReport, data_fields=["counts"], meta_fields=["paths"])


@compiled(static_argnames=("axis_name",))
def _counts(grad: PyTree, *, axis_name: AxisName) -> Array:
    counts = _nonfinite_counts(grad)
    stacked = jnp.stack(counts) if counts else jnp.zeros((0,), jnp.int32)
    return _psum(stacked, axis_name)


def grad_nonfinite_report(grad: PyTree, *, axis_name: AxisName = None) -> NonfiniteReport:
    """Count the NaN and inf entries of every leaf of a gradient, inside `jax.jit` or not.

    The counts are computed on the device in one pass, with no host round trip, so the
    report can be returned from a jitted training step (or stacked by `jax.lax.scan`)
    and read afterwards: `report.total`, `report.first_path()` (the key path of the
    first offending leaf), `report.as_dict()`, `report.summary()`. No `chex.chexify`
    or checkify needed. Integer leaves count 0; an empty gradient gives an empty report.

    Args:
        grad: a `Gradient` or any pytree of arrays.
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the local leaves are shards of one larger gradient;
            the counts are global (one `psum`). `None` (the default) means no collective.

    Returns:
        A `NonfiniteReport`.

    Example:
        >>> g = jaxgrad.Gradient([jnp.ones(3)], [jnp.array([[1.0, jnp.nan]])])
        >>> report = jax.jit(jaxgrad.grad_nonfinite_report)(g)
        >>> report.counts
        Array([0, 1], dtype=int32)
        >>> report.first_path()
        '.weights[0]'
    """
    paths = tuple(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grad)[0])
    return NonfiniteReport(counts=_counts(grad, axis_name=axis_name), paths=paths)


def _fallback_leaves(grad: PyTree, fallback: Any) -> list[Any]:
    if isinstance(fallback, (int, float, complex)) or (
        isinstance(fallback, (jax.Array, np.ndarray, np.generic)) and np.ndim(fallback) == 0
    ):
        return [fallback] * len(jax.tree.leaves(grad))
    check_same_structure("grad", grad, "fallback", fallback)
    check_same_shapes("grad", grad, "fallback", fallback)
    return jax.tree.leaves(fallback)


@compiled(static_argnames=("axis_name",))
def _where_finite(grad: PyTree, fallback_leaves: list[Any], *, axis_name: AxisName) -> PyTree:
    ok = grad_all_finite(grad, axis_name=axis_name)
    leaves, treedef = jax.tree.flatten(grad)

    def pick(x: Any, y: Any) -> Array:
        x = jnp.asarray(x)
        return jnp.where(ok, x, jnp.broadcast_to(jnp.asarray(y).astype(x.dtype), x.shape))

    return jax.tree.unflatten(
        treedef, [pick(x, y) for x, y in zip(leaves, fallback_leaves, strict=True)]
    )


def grad_where_finite(
    grad: PyTree, fallback: PyTree | ArrayLike, *, axis_name: AxisName = None
) -> PyTree:
    """`grad` if every entry of it is finite, else `fallback`: skip a bad step inside jit.

    The choice is made for the whole gradient at once (one NaN anywhere selects
    `fallback` everywhere), on the device, so it works inside `jax.jit` and
    `jax.lax.scan`. `fallback` is a scalar (`0.0` gives zeros, a skipped update) or a
    tree with the structure and shapes of `grad` (the previous gradient, say). The
    result has the structure, shapes and dtypes of `grad`; `fallback` values are cast
    to each leaf's dtype. To replace only the non-finite entries use
    `grad_apply(jnp.nan_to_num, grad)` instead. Called eagerly it is one compiled
    dispatch.

    Args:
        grad: a `Gradient` or any pytree of arrays.
        fallback: a scalar, or a pytree with the structure and leaf shapes of `grad`.
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the local leaves are shards of one larger gradient;
            finiteness is decided globally (one `psum`). `None` means no collective.

    Returns:
        A pytree with the structure, shapes and dtypes of `grad`.

    Raises:
        ValueError: if `fallback` is a tree whose structure or leaf shapes differ from
            those of `grad` (the message names the first differing key path).

    Example:
        >>> jaxgrad.grad_where_finite({"w": jnp.array([1.0, jnp.nan])}, 0.0)
        {'w': Array([0., 0.], dtype=float32)}
        >>> jaxgrad.grad_where_finite({"w": jnp.array([1.0, 2.0])}, 0.0)
        {'w': Array([1., 2.], dtype=float32)}
    """
    return _where_finite(grad, _fallback_leaves(grad, fallback), axis_name=axis_name)
