"""Reductions of a gradient to a scalar: accumulate, fold, norm, RMS; and normalization."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._collectives import check_axis_name
from ._dispatch import call_jitted, compiled, has_tracer
from ._donate import check_donatable
from ._structure import check_array_leaves, check_callable, describe_leaf, where
from ._typing import Array, ArrayLike, PyTree

AxisName = str | tuple[str, ...] | None


def accumulation_dtype(dtypes: Any) -> np.dtype:
    """float64 if any dtype is 64-bit (float or complex), else float32.

    Low-precision floats (float16, bfloat16) and integers accumulate in float32, so sums
    of squares do not overflow; float64 stays float64 (it only exists under x64).
    """
    wide = any(np.dtype(d) in (np.dtype(np.float64), np.dtype(np.complex128)) for d in dtypes)
    return np.dtype(np.float64 if wide else np.float32)


def _leaves(grad: PyTree) -> list[Array]:
    check_array_leaves("grad", grad)
    return [jnp.asarray(x) for x in jax.tree.leaves(grad)]


def _safe_sqrt(x: Array) -> Array:
    """`sqrt(x)` whose derivative at 0 is 0 rather than inf (so `jax.grad` stays finite)."""
    zero = x == 0  # NaN and inf are not zero, so they propagate
    return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, x)))


def _sum_of_squares(leaves: list[Array], dtype: np.dtype) -> Array:
    total = jnp.zeros((), dtype)
    for x in leaves:
        if jnp.iscomplexobj(x):
            re, im = jnp.real(x).astype(dtype), jnp.imag(x).astype(dtype)
            total = total + jnp.sum(re * re + im * im)
        else:
            x = x.astype(dtype)
            total = total + jnp.sum(x * x)
    return total


def _psum(value: Array, axis_name: AxisName) -> Array:
    check_axis_name(axis_name, optional=True)
    return value if axis_name is None else jax.lax.psum(value, axis_name)


def grad_accumulate(
    func: Callable[[Any], ArrayLike], grad: PyTree, *, axis_name: AxisName = None
) -> Array:
    """Sum over the leaves of a gradient of a scalar function of each leaf.

    `func` must return a scalar for every leaf. Results of float16 or bfloat16 dtype
    are summed in float32, float64 in float64, integers as integers (the widest dtype
    among the results). An empty gradient gives `0.0` (float32). `func` runs as plain
    Python, never compiled behind your back (see `grad_apply`).

    Inside `shard_map` or `pmap`, `axis_name` names the mesh axes along which the local
    leaves are shards of one larger gradient: the local sum is combined with one
    `psum`, so every shard gets the global value.

    paysage's early versions overwrote the running value instead of summing; the sum is
    the documented intent and what this returns.

    Args:
        func: a function of one array returning a scalar.
        grad: a `Gradient` or any pytree of arrays.
        axis_name: a mesh axis name or tuple of names, or `None` (no collective).

    Returns:
        A 0-d array; `float()` works on it outside `jax.jit`.

    Raises:
        TypeError: if `func` is not callable.
        ValueError: if `func` returns a non-scalar for some leaf (the message names it).

    Example:
        >>> g = jaxgrad.Gradient([jnp.ones(3)], [jnp.ones((2, 2))])
        >>> jaxgrad.grad_accumulate(jnp.sum, g)
        Array(7., dtype=float32)
    """
    check_callable("func", func)
    leaves = jax.tree.leaves(grad)
    values = [func(leaf) for leaf in leaves]
    for i, value in enumerate(values):
        if jnp.ndim(value) != 0:
            path = jax.tree_util.tree_flatten_with_path(grad)[0][i][0]
            raise ValueError(
                f"`func` must return a scalar for every leaf of `grad`; at "
                f"{where(path)} it returned {describe_leaf(jnp.asarray(value))}."
            )
    return _sum_scalars(values, dtype=_sum_dtype(values), axis_name=axis_name)


def _sum_dtype(values: list[Any]) -> np.dtype:
    """The widest dtype among `values`, with float16 and bfloat16 widened to float32."""
    if not values:
        return np.dtype(np.float32)
    with jax.numpy_dtype_promotion("standard"):
        dtype = np.dtype(jnp.result_type(*values))
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return np.dtype(np.float32)
    return dtype


@compiled(static_argnames=("dtype", "axis_name"))
def _sum_scalars(values: list[Any], *, dtype: np.dtype, axis_name: AxisName) -> Array:
    """One compiled dispatch to cast and add the per-leaf results (not a user callable)."""
    total = jnp.zeros((), dtype)
    for value in values:
        total = total + jnp.asarray(value).astype(dtype)
    return _psum(total, axis_name)


def grad_fold(func: Callable[[Any, Any], Any], grad: PyTree, initial: Any = 0.0) -> Any:
    """Left fold over the leaves of a gradient: `func(...func(func(initial, l0), l1)..., ln)`.

    Leaves come in `jax.tree.leaves` order. The accumulator can be anything `func`
    accepts and returns (a scalar, a tuple, a tree). An empty gradient returns
    `initial` unchanged. `func` runs as plain Python (see `grad_apply`).

    Args:
        func: a function `(accumulator, leaf) -> accumulator`.
        grad: a `Gradient` or any pytree of arrays.
        initial: the starting accumulator.

    Returns:
        The final accumulator.

    Raises:
        TypeError: if `func` is not callable.

    Example:
        >>> g = {"a": jnp.array([1.0, -5.0]), "b": jnp.array([3.0])}
        >>> jaxgrad.grad_fold(lambda acc, x: jnp.maximum(acc, jnp.max(jnp.abs(x))), g)
        Array(5., dtype=float32)
    """
    check_callable("func", func)
    return functools.reduce(func, jax.tree.leaves(grad), initial)


@compiled(static_argnames=("axis_name",))
def grad_norm(grad: PyTree, *, axis_name: AxisName = None) -> Array:
    """L2 norm of all entries of a gradient, as if flattened into one vector.

    Squares are summed in float32 whatever the leaf dtypes (float64 if any leaf is
    float64 or complex128, under x64), so float16 and bfloat16 gradients do not
    overflow: 1000 float16 entries of 300 give 9486.8, not inf. Complex entries
    contribute `abs(x)**2`. An empty gradient has norm 0, and the derivative of the
    norm at a zero gradient is 0 (finite), so `jax.grad` of it never gives NaN. NaN
    and inf entries propagate. Called eagerly it is one compiled dispatch, cached per
    tree structure, shapes and dtypes.

    Args:
        grad: a `Gradient` or any pytree of arrays.
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the local leaves are shards of one larger gradient;
            partial sums are combined with a single `psum`, so every shard gets the
            global value. `None` (the default) means no collective.

    Returns:
        A float32 (or float64) scalar array.

    Example:
        >>> jaxgrad.grad_norm({"w": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)})
        Array(5., dtype=float32)
    """
    leaves = _leaves(grad)
    dtype = accumulation_dtype(x.dtype for x in leaves)
    return _safe_sqrt(_psum(_sum_of_squares(leaves, dtype), axis_name))


@compiled(static_argnames=("axis_name",))
def grad_magnitude(grad: PyTree, *, axis_name: AxisName = None) -> Array:
    """Root-mean-square of all entries of a gradient: `sqrt(sum(x**2) / N)`.

    `N` is the total number of entries over all leaves (over all shards, with
    `axis_name`). paysage computed the mean square per tensor and divided the sum of
    those by the number of groups, which weighs small tensors as much as large ones and
    is not an RMS; this is the true RMS of the flattened gradient. Accumulates like
    `grad_norm`. A zero or empty gradient gives 0, with a finite (zero) derivative.
    `grad_rms` is the same function.

    Args:
        grad: a `Gradient` or any pytree of arrays.
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the local leaves are shards of one larger gradient;
            partial sums are combined with a single `psum`, so every shard gets the
            global value. `None` (the default) means no collective.

    Returns:
        A float32 (or float64) scalar array.

    Example:
        >>> jaxgrad.grad_magnitude(jaxgrad.Gradient([jnp.array([3.0, 4.0])], [jnp.zeros(2)]))
        Array(2.5, dtype=float32)
    """
    leaves = _leaves(grad)
    dtype = accumulation_dtype(x.dtype for x in leaves)
    total = _sum_of_squares(leaves, dtype)
    count = sum(x.size for x in leaves)
    if axis_name is not None:  # one collective for both partials
        total, count = _psum(jnp.stack([total, jnp.asarray(count, dtype)]), axis_name)
    elif count == 0:
        return jnp.zeros((), dtype)
    return _safe_sqrt(total / jnp.where(count == 0, 1, count).astype(dtype))


def grad_rms(grad: PyTree, *, axis_name: AxisName = None) -> Array:
    """Root-mean-square of all entries of a gradient; the same function as `grad_magnitude`.

    paysage's history has both names; they compute the same value.

    Args:
        grad: a `Gradient` or any pytree of arrays.
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the local leaves are shards of one larger gradient;
            partial sums are combined with a single `psum`, so every shard gets the
            global value. `None` (the default) means no collective.

    Returns:
        A float32 (or float64) scalar array.

    Example:
        >>> jaxgrad.grad_rms({"w": jnp.array([1.0, -1.0, 1.0, -1.0])})
        Array(1., dtype=float32)
    """
    return grad_magnitude(grad, axis_name=axis_name)


def _check_inexact(name: str, grad: PyTree) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(grad)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"`{name}` must have floating-point or complex leaves; at "
                f"{where(path)} it has {describe_leaf(jnp.asarray(leaf))}."
            )


def _normalize(grad: PyTree, axis_name: AxisName) -> PyTree:
    check_array_leaves("grad", grad)
    _check_inexact("grad", grad)
    norm = grad_norm(grad, axis_name=axis_name)
    nonzero = norm != 0
    scale = jnp.where(nonzero, 1 / jnp.where(nonzero, norm, 1), 0)

    def rescale(x: Any) -> Array:
        x = jnp.asarray(x)
        wide = x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x
        return (wide * scale.astype(wide.dtype)).astype(x.dtype)

    return jax.tree.map(rescale, grad)


_normalize_jit = jax.jit(_normalize, static_argnames=("axis_name",))
_normalize_donated = jax.jit(_normalize, static_argnames=("axis_name",), donate_argnames=("grad",))


def grad_normalize(grad: PyTree, *, axis_name: AxisName = None) -> PyTree:
    """Scale a gradient to unit L2 norm: `grad / grad_norm(grad)`.

    Each leaf keeps its dtype; the division is done in float32 (or wider) and the
    result cast back, so bfloat16 leaves lose no more than their own rounding. A zero
    gradient comes back as zeros, not NaN; a gradient holding NaN stays NaN. Called
    eagerly it is one compiled dispatch.

    Args:
        grad: a `Gradient` or any pytree of floating-point arrays.
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the local leaves are shards of one larger gradient;
            partial sums are combined with a single `psum`, so every shard gets the
            global value. `None` (the default) means no collective.

    Returns:
        A pytree with the structure, shapes and dtypes of `grad`.

    Raises:
        TypeError: if a leaf is not floating-point or complex.

    Example:
        >>> jaxgrad.grad_normalize({"w": jnp.array([3.0, 4.0])})
        {'w': Array([0.6, 0.8], dtype=float32)}
    """
    if has_tracer(grad):
        return _normalize(grad, axis_name)
    return call_jitted(_normalize_jit, _normalize, grad, axis_name=axis_name)


def grad_normalize_(grad: PyTree, *, axis_name: AxisName = None, donate: bool = False) -> PyTree:
    """Scale a gradient to unit L2 norm: paysage's in-place variant.

    The result equals `grad_normalize(grad)`. With `donate=False` (the default, safe in
    notebooks that re-run cells) `grad` is left as it was. With `donate=True` its
    buffers are reused for the result (JAX buffer donation), so peak memory does not
    double: like paysage's in-place update, `grad` is consumed, and its arrays are
    deleted afterwards. Inside `jax.jit` donation is the outer function's business
    (`donate_argnums`), so there `donate` changes nothing.

    Args:
        grad: a `Gradient` or any pytree of floating-point arrays.
        axis_name: inside `shard_map` or `pmap`, the mesh axis name (or tuple of
            names) along which the local leaves are shards of one larger gradient;
            partial sums are combined with a single `psum`, so every shard gets the
            global value. `None` (the default) means no collective.
        donate: reuse (and delete) the buffers of `grad`.

    Returns:
        A pytree with the structure, shapes and dtypes of `grad`.

    Raises:
        TypeError: if a leaf is not floating-point or complex.
        ValueError: with `donate=True`, if one array appears twice in `grad`.

    Example:
        >>> g = jaxgrad.Gradient([jnp.array([0.0, 2.0])], [])
        >>> jaxgrad.grad_normalize_(g, donate=True).layers[0]
        Array([0., 1.], dtype=float32)
        >>> g.layers[0].is_deleted()
        True
    """
    if has_tracer(grad):
        return _normalize(grad, axis_name)
    if donate:
        check_donatable("grad", grad)
        return call_jitted(_normalize_donated, _normalize, grad, axis_name=axis_name)
    return call_jitted(_normalize_jit, _normalize, grad, axis_name=axis_name)
