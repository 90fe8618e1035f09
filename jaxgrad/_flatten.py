"""A gradient as one flat vector and back: `grad_flatten`, `grad_unflatten`."""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ._checks import (
    cast_error,
    cast_loss,
    check_array,
    check_array_leaves,
    check_template_leaves,
    describe_leaf,
    holds_exactly,
    is_traced,
    nnx_params,
    short_dtype,
    where,
)
from ._typing import Array, ArrayLike, PyTree


def _common_dtype(dtypes: list[np.dtype]) -> np.dtype:
    if not dtypes:
        return np.dtype(np.float32)
    with jax.numpy_dtype_promotion("standard"):
        return np.dtype(jnp.result_type(*dtypes))


def _x64() -> bool:
    return jax.dtypes.canonicalize_dtype(np.float64) == np.float64


def _widenings(dtype: np.dtype) -> list[np.dtype]:
    """`dtype` and the wider floating dtypes of its kind available now (64-bit with x64)."""
    complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
    ladder = [np.dtype(np.complex64), np.dtype(np.complex128)] if complex_ else []
    ladder = ladder or [np.dtype(np.float32), np.dtype(np.float64)]
    bits = jnp.finfo(dtype).bits
    wider = [d for d in ladder if jnp.finfo(d).bits > bits and (_x64() or d.itemsize < 8)]
    return [dtype, *wider]


def _flat_dtype(dtypes: list[np.dtype]) -> np.dtype | None:
    """The dtype of `grad_flatten` for leaves of these dtypes, or `None` if there is none.

    Cached on the set of distinct dtypes (a model has a handful), so an eager call costs
    a set per call, not a promotion per leaf.
    """
    return _flat_dtype_of(frozenset(dtypes), _x64())


@functools.lru_cache(maxsize=256)
def _flat_dtype_of(distinct: frozenset[np.dtype], x64: bool) -> np.dtype | None:
    """`_flat_dtype` for a set of dtypes (`x64`: the cache key of the x64 flag).

    Leaves of one kind (all inexact, or all integer and boolean) are promoted by JAX's
    standard rules. Integer leaves among floating ones never round: the vector gets the
    narrowest floating dtype, at least the floating leaves' promoted one, that holds
    every integer leaf exactly; `None` if no available dtype does.
    """
    del x64
    dtypes = sorted(distinct, key=str)
    inexact = [d for d in dtypes if jnp.issubdtype(d, jnp.inexact)]
    integer = [d for d in dtypes if not jnp.issubdtype(d, jnp.inexact)]
    if not inexact or not integer:
        return _common_dtype(dtypes)
    for candidate in _widenings(_common_dtype(inexact)):
        if all(holds_exactly(candidate, d) for d in integer):
            return candidate
    return None


def _mixed_kinds_error(grad: PyTree, leaves: list[Array]) -> TypeError:
    """The error for integer leaves that no floating dtype holds together with the rest."""
    inexact = [np.dtype(x.dtype) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    widest = _widenings(_common_dtype(inexact))[-1]
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(grad)[0]]
    path, leaf = next(
        (path, x)
        for path, x in zip(paths, leaves, strict=True)
        if not jnp.issubdtype(x.dtype, jnp.inexact) and not holds_exactly(widest, x.dtype)
    )
    x64 = "" if _x64() else " (float64 would, with `jax_enable_x64`)"
    return TypeError(
        f"`grad` mixes integer and floating-point leaves, and no floating-point dtype holds "
        f"the integer leaf at {where(path)} ({describe_leaf(leaf)}) exactly{x64}; cast it "
        "first, e.g. with `grad_apply`, or leave it out."
    )


def grad_flatten(grad: PyTree) -> Array:
    """All entries of a gradient as one 1-D vector.

    Leaves come in `jax.tree.leaves` order, each raveled in C order and concatenated.
    No value is ever rounded. Leaves of one dtype keep it; mixed floating-point dtypes,
    or mixed integer ones, are promoted by JAX's standard rules (float16 with bfloat16
    gives float32), and `grad_unflatten` casts them back. Integer (and boolean) leaves
    among floating-point ones give the narrowest floating dtype, at least the floating
    leaves' promoted one, that holds every integer exactly: int8 with bfloat16 stays
    bfloat16, int16 with float16 gives float32, int32 with float32 gives float64 (with
    `jax_enable_x64`). Where no such dtype exists (int32 without x64, int64) this raises
    rather than rounding; cast the integer leaves first. An empty gradient gives a
    float32 vector of length 0.

    Args:
        grad: a `Gradient` or any pytree of arrays.

    Returns:
        A 1-D array of length equal to the total number of entries.

    Raises:
        TypeError: if a leaf is not an array, or if integer leaves are mixed with
            floating-point ones that no available dtype holds together exactly (the
            message names the first integer leaf that does not fit).

    Example:
        >>> jaxgrad.grad_flatten({"a": jnp.ones((2, 2)), "b": jnp.zeros(1)})
        Array([1., 1., 1., 1., 0.], dtype=float32)
        >>> jaxgrad.grad_flatten({"n": jnp.array([255], jnp.uint8), "w": jnp.ones(1, jnp.bfloat16)})
        Array([255, 1], dtype=bfloat16)
    """
    grad = nnx_params(grad)
    check_array_leaves("grad", grad)
    leaves = jax.tree.leaves(grad)
    if (
        _flat_dtype([np.dtype(getattr(x, "dtype", None) or jnp.result_type(x)) for x in leaves])
        is None
    ):
        raise _mixed_kinds_error(grad, [jnp.asarray(x) for x in leaves])
    return _flatten(grad)


@jax.jit
def _flatten(grad: PyTree) -> Array:
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(grad)]
    dtypes = [np.dtype(x.dtype) for x in leaves]
    dtype = _flat_dtype(dtypes)
    assert dtype is not None  # checked in front, by `grad_flatten`
    if not leaves:
        return jnp.zeros((0,), dtype)
    return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in _ravelable(leaves)])


def _ravelable(leaves: list[Array]) -> list[Array]:
    """Leaves that `ravel` and `concatenate` accept under explicit sharding.

    With explicit mesh axes, `concatenate` needs one sharding for all pieces and `ravel`
    cannot merge a sharded trailing dimension; unless every leaf is sharded only along
    its first dimension, and all alike, the sharded leaves are replicated first. Without
    explicit axes every spec is empty and the leaves pass unchanged.
    """
    specs = [tuple(jax.typeof(x).sharding.spec) for x in leaves]
    firsts = {spec[0] if spec else None for spec in specs}
    if len(firsts) == 1 and all(entry is None for spec in specs for entry in spec[1:]):
        return leaves
    return [
        jax.sharding.reshard(x, NamedSharding(jax.typeof(x).sharding.mesh, PartitionSpec()))
        if any(entry is not None for entry in spec)
        else x
        for x, spec in zip(leaves, specs, strict=True)
    ]


def grad_unflatten(vector: ArrayLike, like: PyTree) -> PyTree:
    """The inverse of `grad_flatten`: a vector cut back into a gradient shaped like `like`.

    The result has the structure, shapes and dtypes of `like`, whose leaves may be
    arrays or anything with `shape` and `dtype` (such as `jax.ShapeDtypeStruct`).
    `grad_unflatten(grad_flatten(g), g)` is `g` exactly. Each piece is cast to its
    leaf's dtype. A vector of the dtype `grad_flatten(like)` has is always accepted;
    another one is refused where the cast could lose values: the imaginary part of a
    complex vector cast to real leaves, or integers that a floating vector's dtype does
    not hold exactly.

    Args:
        vector: a 1-D array with as many entries as `like` has.
        like: the template: a `Gradient` or any pytree of arrays or shape-dtype structs.

    Returns:
        A pytree with the structure, shapes and dtypes of `like`.

    Raises:
        TypeError: if `vector` is not a numeric array (`None`, a string...), or if the
            cast to a leaf's dtype could lose values: a complex `vector`
            into real leaves (the imaginary part), or a floating-point `vector` into
            integer leaves that its dtype does not hold exactly (float32 into int32;
            float32 into int16 is fine). A `vector` of the dtype `grad_flatten(like)`
            has passes (the round trip). The message names the first such leaf.
        ValueError: if `vector` is not 1-D or its length differs from the number of
            entries of `like` (both lengths are named).

    Example:
        >>> like = jaxgrad.Gradient([jnp.zeros(2)], [jnp.zeros((1, 2))])
        >>> jaxgrad.grad_unflatten(jnp.arange(4.0), like).weights[0]
        Array([[2., 3.]], dtype=float32)
    """
    like = nnx_params(like)
    check_template_leaves("like", like)
    check_array("vector", vector)
    vector = jnp.asarray(vector)
    if vector.ndim != 1:
        raise ValueError(f"`vector` must be 1-D; got shape {tuple(vector.shape)}.")
    templates, treedef = jax.tree.flatten(like)
    spec = tuple((_shape_of(t), _dtype_of(t)) for t in templates)
    total = sum(math.prod(shape) for shape, _ in spec)
    if vector.shape[0] != total:
        raise ValueError(
            f"`vector` has length {vector.shape[0]}, but `like` has {total} entries; "
            "they must be equal."
        )
    _check_casts(np.dtype(vector.dtype), like, [dtype for _, dtype in spec])
    if is_traced(vector):
        return _unflatten(vector, treedef, spec)
    return _unflatten_jit(vector, treedef, spec)


def _check_casts(source: np.dtype, like: PyTree, targets: list[np.dtype]) -> None:
    """Raise `TypeError` at the first leaf of `like` that `source` values cannot fill exactly.

    A vector of the dtype `grad_flatten(like)` would have passes: its pieces are exact in
    their leaves' dtypes when it comes from `grad_flatten` (the round trip).
    """
    if all(cast_loss(source, target) is None for target in set(targets)):
        return
    if source == _flat_dtype(targets):
        return
    for (path, template), target in zip(
        jax.tree_util.tree_flatten_with_path(like)[0], targets, strict=True
    ):
        loss = cast_loss(source, target)
        if loss is not None:
            leaf = describe_leaf(jax.ShapeDtypeStruct(_shape_of(template), target))
            found = f"dtype {short_dtype(source)}"
            raise cast_error("vector", found, "like", where(path), leaf, loss)


def _shape_of(template: Any) -> tuple[int, ...]:
    shape = getattr(template, "shape", None)  # np.shape would convert a ShapeDtypeStruct
    return tuple(np.shape(template) if shape is None else shape)


def _dtype_of(template: Any) -> np.dtype:
    dtype = getattr(template, "dtype", None)
    return np.dtype(jnp.result_type(template) if dtype is None else dtype)


def _unflatten(vector: Array, treedef: Any, spec: tuple[tuple[tuple[int, ...], Any], ...]) -> Any:
    leaves = []
    start = 0
    for shape, dtype in spec:
        size = math.prod(shape)
        piece = jax.lax.slice_in_dim(vector, start, start + size)
        if jnp.iscomplexobj(piece) and not jnp.issubdtype(dtype, jnp.complexfloating):
            piece = jnp.real(piece)  # checked: a round trip, whose imaginary parts are 0
        leaves.append(piece.reshape(shape).astype(dtype))
        start += size
    return jax.tree.unflatten(treedef, leaves)


_unflatten_jit = jax.jit(_unflatten, static_argnums=(1, 2))
