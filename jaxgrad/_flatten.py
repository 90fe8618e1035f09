"""A gradient as one flat vector and back: `grad_flatten`, `grad_unflatten`."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ._dispatch import compiled, has_tracer
from ._structure import check_array_leaves
from ._typing import Array, ArrayLike, PyTree


def _common_dtype(dtypes: list[np.dtype]) -> np.dtype:
    if not dtypes:
        return np.dtype(np.float32)
    with jax.numpy_dtype_promotion("standard"):
        return np.dtype(jnp.result_type(*dtypes))


@compiled()
def grad_flatten(grad: PyTree) -> Array:
    """All entries of a gradient as one 1-D vector.

    Leaves come in `jax.tree.leaves` order, each raveled in C order and concatenated.
    Leaves of one dtype keep it; mixed dtypes are promoted by JAX's standard rules
    (float16 with bfloat16 gives float32), and `grad_unflatten` casts them back. An
    empty gradient gives a float32 vector of length 0.

    Args:
        grad: a `Gradient` or any pytree of arrays.

    Returns:
        A 1-D array of length equal to the total number of entries.

    Example:
        >>> jaxgrad.grad_flatten({"a": jnp.ones((2, 2)), "b": jnp.zeros(1)})
        Array([1., 1., 1., 1., 0.], dtype=float32)
    """
    check_array_leaves("grad", grad)
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(grad)]
    dtype = _common_dtype([x.dtype for x in leaves])
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
    if not hasattr(jax, "typeof"):  # a JAX without explicit sharding
        return leaves
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
    `grad_unflatten(grad_flatten(g), g)` is `g` exactly.

    Args:
        vector: a 1-D array with as many entries as `like` has.
        like: the template: a `Gradient` or any pytree of arrays or shape-dtype structs.

    Returns:
        A pytree with the structure, shapes and dtypes of `like`.

    Raises:
        ValueError: if `vector` is not 1-D or its length differs from the number of
            entries of `like` (both lengths are named).

    Example:
        >>> like = jaxgrad.Gradient([jnp.zeros(2)], [jnp.zeros((1, 2))])
        >>> jaxgrad.grad_unflatten(jnp.arange(4.0), like).weights[0]
        Array([[2., 3.]], dtype=float32)
    """
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
    if has_tracer(vector):
        return _unflatten(vector, treedef, spec)
    return _unflatten_jit(vector, treedef, spec)


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
        leaves.append(piece.reshape(shape).astype(dtype))
        start += size
    return jax.tree.unflatten(treedef, leaves)


_unflatten_jit = jax.jit(_unflatten, static_argnums=(1, 2))
