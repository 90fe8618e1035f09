"""Entrywise maps over one gradient or the zip of two: `grad_apply`, `grad_mapzip`."""

import functools
from collections.abc import Callable
from typing import Any

import jax

from ._checks import (
    check_callable,
    check_donatable,
    check_hashable,
    check_same_structure,
    is_traced,
    nnx_params,
    where,
)
from ._donate import per_device
from ._typing import PyTree


def _map_new_leaves(
    fn: str, name: str, func_: Callable[..., Any], grad: PyTree, *rest: PyTree
) -> PyTree:
    """`jax.tree.map(func_, grad, *rest)`, refusing a `None` result (paysage's in-place style).

    paysage's in-place functions returned `None`; `jax.tree.map` would put that `None`
    where the leaf was, silently dropping it. Checking each result costs one comparison.
    """
    leaves, treedef = jax.tree.flatten(grad)
    others = [treedef.flatten_up_to(tree) for tree in rest]
    results = [func_(*args) for args in zip(leaves, *others, strict=True)]
    if any(result is None for result in results):
        index = next(i for i, result in enumerate(results) if result is None)
        path = jax.tree_util.tree_flatten_with_path(grad)[0][index][0]
        raise TypeError(
            f"`func_` must return the new leaf; at {where(path)} it returned None. JAX arrays "
            f"are immutable, so `{fn}` builds a new tree from what `func_` returns instead "
            f"of updating `{name}` in place as paysage did."
        )
    return jax.tree.unflatten(treedef, results)


@functools.partial(jax.jit, static_argnames=("func",), donate_argnames=("grad",))
def _apply_donated(func: Callable[[Any], Any], grad: PyTree) -> PyTree:
    return _map_new_leaves("grad_apply_", "grad", func, grad)


@functools.partial(jax.jit, static_argnames=("func",), donate_argnames=("grad1",))
def _mapzip_donated(func: Callable[[Any, Any], Any], grad1: PyTree, grad2: PyTree) -> PyTree:
    return _map_new_leaves("grad_mapzip_", "grad1", func, grad1, grad2)


_WHY_HASHABLE = "with `donate=True`, which compiles it once per function object"


def grad_apply(func: Callable[[Any], Any], grad: PyTree) -> PyTree:
    """Apply a function to every leaf of a gradient.

    The result has the structure of `grad` (a `Gradient` stays a `Gradient`, an
    `nnx.State` an `nnx.State`); leaf shapes and dtypes are whatever `func` returns.
    `None` subtrees are empty, as in `jax.tree.map`; an empty tree maps to itself.
    `func` is called as plain Python, so it sees the current value of any global it
    reads; wrap the call in `jax.jit` for speed.

    Args:
        func: a function of one array.
        grad: a `Gradient` or any pytree of arrays.

    Returns:
        A pytree with the structure of `grad`.

    Raises:
        TypeError: if `func` is not callable.

    Example:
        >>> jaxgrad.grad_apply(jnp.square, {"w": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])})
        {'b': Array([9.], dtype=float32), 'w': Array([1., 4.], dtype=float32)}
    """
    grad = nnx_params(grad)
    check_callable("func", func)
    return jax.tree.map(func, grad)


def grad_apply_(func_: Callable[[Any], Any], grad: PyTree, *, donate: bool = False) -> PyTree:
    """Apply a function to every leaf of a gradient: paysage's in-place variant.

    paysage's `grad_apply_` modified `grad` in place and returned `None`. JAX arrays are
    immutable, so here `func_` must return the new leaf and the result is a new tree
    with the structure of `grad`, equal to `grad_apply(func_, grad)`. A `func_` written
    for paysage, which updates its argument in place and returns `None`, is refused
    (a `TypeError` naming the leaf) rather than silently giving a tree of `None`s.

    With `donate=False` (the default, safe in notebooks that re-run cells) `grad` is
    left as it was and `func_` runs as plain Python. With `donate=True` the buffers of
    `grad` are reused for the result (JAX buffer donation), so peak memory does not
    double; like paysage's in-place update, `grad` is consumed: its arrays are deleted
    afterwards. Donation needs a compiled call, so `donate=True` opts in to `jax.jit`
    semantics for `func_`: it is compiled once per function object, tree structure,
    shapes and dtypes, and must be pure (a global it reads is frozen at compile time).
    Pass the same function object each call (not a fresh `lambda`) to reuse the
    compilation. Inside `jax.jit` donation is the outer function's business, so there
    `donate` changes nothing.

    Args:
        func_: a function of one array that returns the updated array.
        grad: a `Gradient` or any pytree of arrays.
        donate: reuse (and delete) the buffers of `grad`.

    Returns:
        A pytree with the structure of `grad`.

    Raises:
        TypeError: if `func_` is not callable, or returns `None` for a leaf (paysage's
            in-place style; the message names the key path), or, with `donate=True`, is
            not hashable. With `donate=True` this is raised before anything is donated.
        ValueError: with `donate=True`, if one array appears twice in `grad`.

    Example:
        >>> g = jaxgrad.Gradient([jnp.array([1.0, -2.0])], [])
        >>> jaxgrad.grad_apply_(lambda x: x * 0.5, g).layers[0]
        Array([ 0.5, -1. ], dtype=float32)
        >>> jaxgrad.grad_apply_(jnp.negative, g, donate=True).layers[0]
        Array([-1.,  2.], dtype=float32)
        >>> g.layers[0].is_deleted()
        True
    """
    grad = nnx_params(grad)
    check_callable("func_", func_)
    if donate and not is_traced(grad):
        check_hashable("func_", func_, _WHY_HASHABLE)
        check_donatable("grad", grad)
        return per_device(functools.partial(_apply_donated, func_), grad)
    return _map_new_leaves("grad_apply_", "grad", func_, grad)


def grad_mapzip(func: Callable[[Any, Any], Any], grad1: PyTree, grad2: PyTree) -> PyTree:
    """Apply a function of two arrays over the zip of two gradients, leaf by leaf.

    Calls `func(leaf1, leaf2)` for each pair of corresponding leaves; the result has the
    structure of `grad1`. The two trees must have the same structure (`None` subtrees
    included); leaves are passed as they are, so broadcasting between them is `func`'s
    business.

    Args:
        func: a function of two arrays.
        grad1: a `Gradient` or any pytree of arrays.
        grad2: a pytree with the same structure as `grad1`.

    Returns:
        A pytree with the structure of `grad1`.

    Raises:
        TypeError: if `func` is not callable.
        ValueError: if the structures differ; the message names the first differing
            key path and what each side has there.

    Example:
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([1.0])}
        >>> b = {"w": jnp.array([10.0, 20.0]), "b": jnp.array([2.0])}
        >>> jaxgrad.grad_mapzip(jnp.add, a, b)
        {'b': Array([3.], dtype=float32), 'w': Array([11., 22.], dtype=float32)}
    """
    grad1, grad2 = nnx_params(grad1), nnx_params(grad2)
    check_callable("func", func)
    check_same_structure("grad1", grad1, "grad2", grad2)
    return jax.tree.map(func, grad1, grad2)


def grad_mapzip_(
    func_: Callable[[Any, Any], Any], grad1: PyTree, grad2: PyTree, *, donate: bool = False
) -> PyTree:
    """Apply a function of two arrays over the zip of two gradients: the in-place variant.

    paysage's `grad_mapzip_` updated `grad1` in place. Here `func_(leaf1, leaf2)` must
    return the updated `leaf1` (a `None` result, paysage's in-place style, is a
    `TypeError` naming the leaf), and the result is a new tree with the structure of
    `grad1`, equal to `grad_mapzip(func_, grad1, grad2)`.

    With `donate=False` (the default) neither input is modified and `func_` runs as
    plain Python. With `donate=True` the buffers of `grad1` are reused for the result
    and `grad1` is consumed (its arrays are deleted afterwards); `grad2` is only read.
    As for `grad_apply_`, donation compiles `func_` once per function object, tree
    structure, shapes and dtypes, so it must be pure.

    Args:
        func_: a function of two arrays returning the updated first one.
        grad1: a `Gradient` or any pytree of arrays; consumed with `donate=True`.
        grad2: a pytree with the same structure as `grad1`.
        donate: reuse (and delete) the buffers of `grad1`.

    Returns:
        A pytree with the structure of `grad1`.

    Raises:
        TypeError: if `func_` is not callable, or returns `None` for a leaf (paysage's
            in-place style; the message names the key path), or, with `donate=True`, is
            not hashable. With `donate=True` this is raised before anything is donated.
        ValueError: if the structures differ (the message names the first differing
            key path), or, with `donate=True`, if an array of `grad1` appears twice in
            it or also in `grad2`.

    Example:
        >>> mean = {"w": jnp.zeros(2)}
        >>> g = {"w": jnp.array([1.0, 2.0])}
        >>> jaxgrad.grad_mapzip_(lambda m, x: 0.9 * m + 0.1 * x, mean, g)
        {'w': Array([0.1, 0.2], dtype=float32)}
    """
    grad1, grad2 = nnx_params(grad1), nnx_params(grad2)
    check_callable("func_", func_)
    check_same_structure("grad1", grad1, "grad2", grad2)
    if donate and not is_traced((grad1, grad2)):
        check_hashable("func_", func_, _WHY_HASHABLE)
        check_donatable("grad1", grad1, grad2=grad2)
        return per_device(functools.partial(_mapzip_donated, func_), grad1, grad2)
    return _map_new_leaves("grad_mapzip_", "grad1", func_, grad1, grad2)
