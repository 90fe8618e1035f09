"""Reductions of a gradient to a scalar: accumulate, fold, norm, RMS; and normalization."""

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import (
    check_array_leaves,
    check_axis_name,
    check_callable,
    check_donatable,
    checked_call,
    describe_leaf,
    is_numeric,
    is_traced,
    nnx_params,
    where,
)
from ._numerics import (
    AxisName,
    apply_factors,
    global_norm,
    psum,
    reduce_tree,
    scale_factors,
    tree_leaves,
)
from ._typing import Array, ArrayLike, PyTree


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
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of one larger gradient; see docs/many_devices.md.

    Returns:
        A 0-d array; `float()` works on it outside `jax.jit`.

    Raises:
        TypeError: if `func` is not callable, a leaf is not a numeric array, or `func`
            returns something that is not a number or numeric array for some leaf (a
            str, None...; the message names the key path).
        ValueError: if `func` returns a non-scalar for some leaf (the message names it).

    Example:
        >>> g = jaxgrad.Gradient([jnp.ones(3)], [jnp.ones((2, 2))])
        >>> jaxgrad.grad_accumulate(jnp.sum, g)
        Array(7., dtype=float32)
    """
    grad = nnx_params(grad)
    check_callable("func", func)
    check_array_leaves("grad", grad)
    leaves = jax.tree.leaves(grad)
    values = [func(leaf) for leaf in leaves]
    for i, value in enumerate(values):
        if not is_numeric(value):
            path = jax.tree_util.tree_flatten_with_path(grad)[0][i][0]
            raise TypeError(
                f"`func` must return a numeric scalar for every leaf of `grad`; at "
                f"{where(path)} it returned {type(value).__name__} {value!r:.60}."
            )
        if jnp.ndim(value) != 0:
            path = jax.tree_util.tree_flatten_with_path(grad)[0][i][0]
            raise ValueError(
                f"`func` must return a scalar for every leaf of `grad`; at "
                f"{where(path)} it returned {describe_leaf(jnp.asarray(value))}."
            )
    check_axis_name(axis_name, optional=True)
    return _sum_scalars(values, dtype=_sum_dtype(values), axis_name=axis_name)


def _sum_dtype(values: list[Any]) -> np.dtype:
    """The widest dtype among `values`: float16 and bfloat16 widen to float32, bool to int32."""
    if not values:
        return np.dtype(np.float32)
    with jax.numpy_dtype_promotion("standard"):
        dtype = np.dtype(jnp.result_type(*values))
    if dtype == np.dtype(bool):
        return np.dtype(np.int32)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return np.dtype(np.float32)
    return dtype


@functools.partial(jax.jit, static_argnames=("dtype", "axis_name"))
def _sum_scalars(values: list[Any], *, dtype: np.dtype, axis_name: AxisName) -> Array:
    """One compiled dispatch to cast and add the per-leaf results (not a user callable)."""
    if not values:
        return psum(jnp.zeros((), dtype), axis_name)
    return psum(jnp.sum(jnp.stack([jnp.asarray(v).astype(dtype) for v in values])), axis_name)


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
    grad = nnx_params(grad)
    check_callable("func", func)
    return functools.reduce(func, jax.tree.leaves(grad), initial)


Ord = int | float | str | None


def _check_ord(ord: Any) -> str:
    if ord is None or (not isinstance(ord, bool) and ord in (2, 2.0)):
        return "2"
    if not isinstance(ord, bool) and ord in (1, 1.0):
        return "1"
    if ord in (math.inf, "inf", "infinity"):
        return "inf"
    raise ValueError(f"`ord` must be 1, 2, inf or None (meaning 2); got {ord!r}.")


@functools.partial(jax.jit, static_argnames=("ord", "squared", "axis_name", "pack"))
def _norm(
    grad: PyTree, *, ord: str, squared: bool, axis_name: AxisName, pack: bool = True
) -> Array:
    check_array_leaves("grad", grad)
    leaves = tree_leaves(grad)
    if ord == "2":
        norm = global_norm(leaves, axis_name=axis_name, pack=pack).norm
    elif ord == "1":
        found = reduce_tree(leaves, axis_name=axis_name, pack=pack, norms=False, abs_sums=True)
        norm = found.abs_sums[0][0]  # type: ignore[index]
    else:
        found = reduce_tree(leaves, axis_name=axis_name, pack=pack, norms=False, max_abs=True)
        norm = found.max_abs[0][0]  # type: ignore[index]
    return norm * norm if squared else norm


def grad_norm(
    grad: PyTree, *, ord: Ord = 2, squared: bool = False, axis_name: AxisName = None
) -> Array:
    """The norm of all entries of a gradient, as if flattened into one vector.

    The L2 norm by default; `ord=1` gives the sum of absolute values and `ord=inf` the
    largest absolute value, and `squared=True` returns the square of the norm, as
    `optax.tree_utils.tree_norm` does. Sums accumulate in float32 whatever the leaf
    dtypes (float64 if any leaf is float64 or complex128, under x64), so float16 and
    bfloat16 gradients do not overflow: 1000 float16 entries of 300 give 9486.8, not
    inf. The L2 norm of any finite gradient is finite and correct, even when the squares
    overflow float32 (entries beyond about 1e19 are rescaled, in a branch that ordinary
    gradients never run). Complex entries contribute `abs(x)`. An empty gradient has
    norm 0, and the derivative of the L2 norm at a zero gradient is 0 (finite), so
    `jax.grad` of it never gives NaN. NaN and inf entries propagate. Called eagerly it
    is one compiled dispatch; see docs/performance.md for the cost model.

    Args:
        grad: a `Gradient` or any pytree of numeric arrays.
        ord: 2 (or None), 1, or `inf` (also `"inf"`).
        squared: return the square of the norm.
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of one larger gradient; see docs/many_devices.md.

    Returns:
        A float32 (or float64) scalar array.

    Raises:
        TypeError: if a leaf is not a numeric array (the message names its key path).
        ValueError: if `ord` is not 1, 2, inf or None.

    Example:
        >>> g = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(-4.0)}
        >>> jaxgrad.grad_norm(g)
        Array(5., dtype=float32)
        >>> jaxgrad.grad_norm(g, ord=1), jaxgrad.grad_norm(g, ord=jnp.inf, squared=True)
        (Array(7., dtype=float32), Array(16., dtype=float32))
        >>> jaxgrad.grad_norm({"w": jnp.full(4, 1e20)})  # squares overflow float32
        Array(2.e+20, dtype=float32)
    """
    ord = _check_ord(ord)
    return checked_call(_norm, "grad", grad, ord=ord, squared=bool(squared), axis_name=axis_name)


@functools.partial(jax.jit, static_argnames=("axis_name", "pack"))
def _magnitude(grad: PyTree, *, axis_name: AxisName, pack: bool = True) -> Array:
    check_array_leaves("grad", grad)
    return reduce_tree(tree_leaves(grad), axis_name=axis_name, pack=pack).rms()[0][0]


def grad_rms(grad: PyTree, *, axis_name: AxisName = None) -> Array:
    """Root-mean-square of all entries of a gradient: `sqrt(sum(x**2) / N)`.

    `N` is the total number of entries over all leaves (over all shards, with
    `axis_name`), counted exactly at any size. paysage computed the mean square of each
    tensor, summed those and divided by the number of tensors, which weighs a small
    tensor as much as a large one and is not an RMS; this is the true RMS of the
    flattened gradient. Accumulates like `grad_norm` (finite and correct for every
    finite input). A zero or empty gradient gives 0, with a finite (zero) derivative.
    paysage's first name for it, `grad_magnitude`, is kept in `jaxgrad.gradient_util`.

    Args:
        grad: a `Gradient` or any pytree of numeric arrays.
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of one larger gradient; see docs/many_devices.md.

    Returns:
        A float32 (or float64) scalar array.

    Raises:
        TypeError: if a leaf is not a numeric array (the message names its key path).

    Example:
        >>> jaxgrad.grad_rms(jaxgrad.Gradient([jnp.array([3.0, 4.0])], [jnp.zeros(2)]))
        Array(2.5, dtype=float32)
    """
    return checked_call(_magnitude, "grad", grad, axis_name=axis_name)


def _normalize(grad: PyTree, axis_name: AxisName, pack: bool = True) -> PyTree:
    check_array_leaves("grad", grad, inexact=True)
    leaves = tree_leaves(grad)
    norm = global_norm(leaves, axis_name=axis_name, pack=pack)
    # a zero gradient is left as it is (zeros, not NaN): both factors are then 1
    factors = scale_factors(norm, norm.root != 0, jnp.ones((), norm.root.dtype))

    def rescale(x: Any) -> Array:
        return apply_factors(x, factors)

    return jax.tree.map(rescale, grad)


_normalize_jit = jax.jit(_normalize, static_argnames=("axis_name", "pack"))
_normalize_donated = jax.jit(
    _normalize, static_argnames=("axis_name", "pack"), donate_argnames=("grad",)
)


def grad_normalize(grad: PyTree, *, axis_name: AxisName = None) -> PyTree:
    """Scale a gradient to unit L2 norm: `grad / grad_norm(grad)`.

    Each leaf keeps its dtype; the division is done in float32 (or wider) and the
    result cast back, so bfloat16 leaves lose no more than their own rounding. A zero
    gradient comes back as zeros, not NaN; a gradient holding NaN stays NaN; a finite
    gradient whose squares overflow float32 is normalized correctly. Called eagerly it
    is one compiled dispatch.

    Args:
        grad: a `Gradient` or any pytree of floating-point arrays.
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of one larger gradient; see docs/many_devices.md.

    Returns:
        A pytree with the structure, shapes and dtypes of `grad`.

    Raises:
        TypeError: if a leaf is not floating-point or complex.

    Example:
        >>> jaxgrad.grad_normalize({"w": jnp.array([3.0, 4.0])})
        {'w': Array([0.6, 0.8], dtype=float32)}
    """
    return checked_call(_normalize_jit, "grad", grad, inexact=True, axis_name=axis_name)


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
        axis_name: the mesh axis name (or tuple of names) along which the leaves are
            shards of one larger gradient; see docs/many_devices.md.
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
    kernel = _normalize_jit
    if donate and not is_traced(nnx_params(grad)):
        check_donatable("grad", nnx_params(grad))
        kernel = _normalize_donated
    return checked_call(kernel, "grad", grad, inexact=True, axis_name=axis_name)
