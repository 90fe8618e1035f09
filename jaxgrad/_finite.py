"""Finiteness checks that work inside `jax.jit`: all-finite, per-leaf report, fallback."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import (
    check_array_leaves,
    check_same_shapes,
    check_same_structure,
    checked_call,
    describe_leaf,
    nnx_params,
    where,
)
from ._naming import leaf_names
from ._numerics import AxisName, Segments, flag_once, reduce_tree, tree_leaves
from ._typing import Array, ArrayLike, PyTree


@functools.partial(jax.jit, static_argnames=("axis_name", "pack"))
def _all_finite(grad: PyTree, *, axis_name: AxisName, pack: bool = True) -> Array:
    check_array_leaves("grad", grad)
    leaves = tree_leaves(grad)
    if not leaves:
        return jnp.asarray(True)
    found = reduce_tree(leaves, axis_name=axis_name, pack=pack, norms=False, nonfinite=True)
    assert found.finite is not None
    return found.finite


def grad_all_finite(grad: PyTree, *, axis_name: AxisName = None) -> Array:
    """Whether every entry of a gradient is finite (no NaN, no inf), as a bool array.

    Works inside `jax.jit` (no host round trip, unlike a Python `if` on the values):
    combine it with `jax.lax.cond` or `grad_where_finite` to skip a bad step. An empty
    gradient and integer leaves count as finite, and so do huge finite entries whose
    squares overflow. It reads the gradient once (its sum of squares).

    Args:
        grad: a `Gradient` or any pytree of arrays.
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of one larger gradient; see docs/many_devices.md.

    Returns:
        A 0-d bool array.

    Raises:
        TypeError: if a leaf is not a numeric array (the message names its key path).

    Example:
        >>> jaxgrad.grad_all_finite({"w": jnp.array([1.0, 2.0]), "b": jnp.array(jnp.nan)})
        Array(False, dtype=bool)
        >>> jaxgrad.grad_all_finite({})
        Array(True, dtype=bool)
    """
    return checked_call(_all_finite, "grad", grad, axis_name=axis_name)


@dataclasses.dataclass(frozen=True)
class NonfiniteReport:
    """Non-finite entries of a gradient, counted per leaf; returned by `grad_nonfinite_report`.

    A pytree (its one array is `counts`; `paths` is static), so it can be returned
    from `jax.jit` or stacked by `jax.lax.scan` (one report per step: `counts` then has
    a leading step axis, which every method below understands). `total` works anywhere;
    `first_path`, `as_dict` and `summary` read the counts on the host, so call them on
    the report that `jax.jit` returned, not inside the traced function.

    Attributes:
        counts: array of shape `(..., number of leaves)`: NaN and inf entries of each
            leaf, in `jax.tree.leaves` order (int32; int64 under x64 or float32 for a
            leaf beyond 2**31 entries).
        paths: the logger-ready name of each leaf (`enc/0/w`; `(root)` for a gradient
            that is a single array).

    Example:
        >>> report = jaxgrad.grad_nonfinite_report({"a": jnp.ones(2), "b": jnp.array([jnp.inf, jnp.nan])})
        >>> report.counts, report.paths
        (Array([0, 2], dtype=int32), ('a', 'b'))
        >>> report.first_path()
        'b'
    """  # noqa: E501

    counts: Array
    paths: tuple[str, ...]

    @property
    def total(self) -> Array:
        """The number of non-finite entries in the whole gradient (per step, if stacked).

        Example:
            >>> jaxgrad.grad_nonfinite_report([jnp.array([jnp.nan, jnp.inf])]).total
            Array(2, dtype=int32)
        """
        return jnp.sum(self.counts, axis=-1, dtype=self.counts.dtype)

    def _host_counts(self, method: str) -> np.ndarray:
        """The counts as a `(steps, leaves)` numpy array (one step for a single report)."""
        try:
            counts = np.asarray(self.counts)
        except jax.errors.TracerArrayConversionError:
            raise TypeError(
                f"`NonfiniteReport.{method}` reads the counts on the host; call it on the "
                "report returned from `jax.jit`, not inside the traced function "
                "(use `report.total` or `report.counts` there)."
            ) from None
        steps = int(np.prod(counts.shape[:-1], dtype=np.int64)) if counts.ndim > 1 else 1
        return counts.reshape(steps, len(self.paths))

    @property
    def _stacked(self) -> bool:
        return np.ndim(self.counts) > 1

    def first_path(self) -> str | None:
        """The name of the first leaf with a non-finite entry, or `None` if there is none.

        For stacked reports, the first such leaf of the earliest step that has one.

        Example:
            >>> jaxgrad.grad_nonfinite_report({"w": [jnp.ones(1), jnp.array([jnp.nan])]}).first_path()
            'w/1'
            >>> print(jaxgrad.grad_nonfinite_report({"w": jnp.ones(1)}).first_path())
            None
        """  # noqa: E501
        bad = np.flatnonzero(self._host_counts("first_path"))
        return self.paths[int(bad[0]) % len(self.paths)] if bad.size else None

    def as_dict(self) -> dict[str, int | np.ndarray]:
        """`{path: count}` for the leaves with non-finite entries, in leaf order.

        For stacked reports each value is the array of counts per step.

        Example:
            >>> jaxgrad.grad_nonfinite_report({"a": jnp.array([jnp.nan]), "b": jnp.ones(1)}).as_dict()
            {'a': 1}
        """  # noqa: E501
        counts = self._host_counts("as_dict")
        return {
            path: (counts[:, i] if self._stacked else int(counts[0, i]))
            for i, path in enumerate(self.paths)
            if counts[:, i].any()
        }

    def summary(self) -> str:
        """One line for a log: how many non-finite entries, and where the first one is.

        Example:
            >>> jaxgrad.grad_nonfinite_report({"a": jnp.array([jnp.nan, 1.0])}).summary()
            '1 non-finite entry in 1 of 1 leaf; first at a'
            >>> jaxgrad.grad_nonfinite_report({"a": jnp.ones(2), "b": jnp.ones(1)}).summary()
            'no non-finite entries in 2 leaves'
        """
        counts = self._host_counts("summary")
        total = int(counts.sum())
        n = len(self.paths)
        leaves = f"{n} leaf" if n == 1 else f"{n} leaves"
        steps = f" over {counts.shape[0]} steps" if self._stacked else ""
        if total == 0:
            return f"no non-finite entries in {leaves}{steps}"
        first = self.first_path()
        entries = "entry" if total == 1 else "entries"
        bad_leaves = int(np.count_nonzero(counts.any(axis=0)))
        where_first = f"first at {first}"
        if self._stacked:
            step = int(np.flatnonzero(counts.any(axis=1))[0])
            where_first += f" (step {step})"
        return f"{total} non-finite {entries} in {bad_leaves} of {leaves}{steps}; {where_first}"


jax.tree_util.register_dataclass(NonfiniteReport, data_fields=["counts"], meta_fields=["paths"])


@functools.partial(jax.jit, static_argnames=("axis_name", "pack"))
def _counts(grad: PyTree, *, axis_name: AxisName, pack: bool = True) -> Array:
    check_array_leaves("grad", grad)
    leaves = tree_leaves(grad)
    each = Segments.each(len(leaves))
    found = reduce_tree(
        leaves, [each], axis_name=axis_name, pack=pack, norms=False, nonfinite=True
    ).nonfinite
    assert found is not None
    return found[1]


def grad_nonfinite_report(grad: PyTree, *, axis_name: AxisName = None) -> NonfiniteReport:
    """Count the NaN and inf entries of every leaf of a gradient, inside `jax.jit` or not.

    The counts are computed on the device in one pass, with no host round trip, so the
    report can be returned from a jitted training step (or stacked by `jax.lax.scan`)
    and read afterwards: `report.total`, `report.first_path()` (the key path of the
    first offending leaf), `report.as_dict()`, `report.summary()`. No `chex.chexify`
    or checkify needed. Integer leaves count 0; an empty gradient gives an empty report.

    Args:
        grad: a `Gradient` or any pytree of arrays.
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of one larger gradient; see docs/many_devices.md.

    Returns:
        A `NonfiniteReport`.

    Example:
        >>> g = jaxgrad.Gradient([jnp.ones(3)], [jnp.array([[1.0, jnp.nan]])])
        >>> report = jax.jit(jaxgrad.grad_nonfinite_report)(g)
        >>> report.counts
        Array([0, 1], dtype=int32)
        >>> report.first_path()
        'weights/0'
    """
    counts = checked_call(_counts, "grad", grad, axis_name=axis_name)
    return NonfiniteReport(counts=counts, paths=leaf_names(nnx_params(grad)))


def _fallback_leaves(grad: PyTree, fallback: Any) -> list[Any]:
    """The fallback value of every leaf, refusing values the leaf's dtype cannot hold."""
    pairs = jax.tree_util.tree_flatten_with_path(grad)[0]
    if isinstance(fallback, (int, float, complex)) or (
        isinstance(fallback, (jax.Array, np.ndarray, np.generic)) and np.ndim(fallback) == 0
    ):
        values = [fallback] * len(pairs)
    else:
        check_same_structure("grad", grad, "fallback", fallback)
        check_same_shapes("grad", grad, "fallback", fallback)
        values = jax.tree.leaves(fallback)
    for (path, leaf), value in zip(pairs, values, strict=True):
        if np.iscomplexobj(value) and not jnp.iscomplexobj(leaf):
            raise TypeError(
                "`fallback` must be real where `grad` is real; at "
                f"{where(path)} `grad` has {describe_leaf(jnp.asarray(leaf))} and "
                f"`fallback` is complex: {value!r:.60}."
            )
    return values


@functools.partial(jax.jit, static_argnames=("axis_name", "pack"))
def _where_finite(
    grad: PyTree, fallback_leaves: list[Any], *, axis_name: AxisName, pack: bool = True
) -> PyTree:
    check_array_leaves("grad", grad)
    leaves, treedef = jax.tree.flatten(grad)
    ok = jnp.asarray(True)
    if leaves:
        found = reduce_tree(
            tree_leaves(grad), axis_name=axis_name, pack=pack, norms=False, nonfinite=True
        )
        assert found.finite is not None
        ok = flag_once(found.finite) == 1  # computed once, not in every leaf's fusion

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
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of one larger gradient; see docs/many_devices.md.

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
    grad = nnx_params(grad)
    check_array_leaves("grad", grad)
    fallback_leaves = _fallback_leaves(grad, fallback)
    return checked_call(_where_finite, "grad", grad, fallback_leaves, axis_name=axis_name)
