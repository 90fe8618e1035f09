"""Gradients built from a model: `zero_grad`, `random_grad`, `null_grad`."""

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec, Sharding

from ._checks import (
    check_array_leaves,
    check_callable,
    check_same_structure,
    describe_leaf,
    is_traced,
    where,
)
from ._donate import zeros_where
from ._gradient import Gradient
from ._typing import Array, DTypeLike, PyTree

Sampler = Callable[[Array, tuple[int, ...], DTypeLike], Array]


def _nnx_module_type() -> type | None:
    """`flax.nnx.Module` if Flax is already imported (a model cannot be one otherwise)."""
    if "flax" not in sys.modules:
        return None
    from flax import nnx

    return nnx.Module


_LAYOUTS = (
    "a paysage model (`model.layers[i].params` with `model.weights[i].params`, as in "
    "paysage 0.2, or with `model.connections[i].weights.params`, as in later paysage)"
)


def _looks_layered(model: Any) -> bool:
    """Whether `model` claims paysage's protocol: it has `layers` or `connections`."""
    if isinstance(model, Gradient):
        return False
    return hasattr(model, "layers") or hasattr(model, "connections")


def _item_params(name: str, items: Any, attrs: tuple[str, ...]) -> list[Any] | str:
    """`item.<attrs>` for each item of the sequence `items`, or a phrase saying what is missing."""
    if not isinstance(items, Sequence) or isinstance(items, str):
        return f"`{name}` is a {type(items).__name__}, not a list or tuple"
    found = []
    for i, item in enumerate(items):
        value, at = item, f"{name}[{i}]"
        for attr in attrs:
            if not hasattr(value, attr):
                return f"`{at}` has no `{attr}`"
            value, at = getattr(value, attr), f"{at}.{attr}"
        found.append(value)
    return found


def _layered_params(model: Any) -> Gradient | str:
    """The parameters of a paysage model as a `Gradient`, or a phrase saying what it lacks.

    Two layouts: `layers[i].params` with `weights[i].params` (paysage 0.2), and
    `layers[i].params` with `connections[i].weights.params` (later paysage); either way
    the result has one `layers` entry per layer and one `weights` entry per weight group
    or connection.
    """
    if not hasattr(model, "layers"):
        return "`model` has no `layers`"
    layers = _item_params("model.layers", model.layers, ("params",))
    if isinstance(layers, str):
        return layers
    weights: list[Any] | str = "`model` has neither `weights` nor `connections`"
    if hasattr(model, "weights"):
        weights = _item_params("model.weights", model.weights, ("params",))
    if isinstance(weights, str) and hasattr(model, "connections"):
        weights = _item_params("model.connections", model.connections, ("weights", "params"))
    if isinstance(weights, str):
        return weights
    return Gradient(layers=layers, weights=weights)


def _is_opaque(model: Any) -> bool:
    """Whether JAX sees `model` as a single leaf that is not an array (a plain object)."""
    return jax.tree_util.treedef_is_leaf(jax.tree.structure(model)) and _leaf_dtype(model) is None


def _layout_error(model: Any, expected: str, problem: str) -> TypeError:
    return TypeError(f"`model` must be {expected}; got a {type(model).__name__}, and {problem}.")


def _leaf_dtype(leaf: Any) -> Any:
    """The dtype of an array-like leaf (an array, a numpy or Python scalar), else `None`."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and hasattr(leaf, "shape"):
        return dtype
    if isinstance(leaf, (bool, int, float, complex)):
        return jnp.result_type(leaf)
    return None


def _is_key(dtype: Any) -> bool:
    """Whether `dtype` is a PRNG key dtype (`jax.random.key`); numpy dtypes never are."""
    if dtype is None or isinstance(dtype, np.dtype):
        return False
    return jnp.issubdtype(dtype, jax.dtypes.prng_key)


def parameters(model: Any) -> PyTree:
    """The trainable parameters of `model`, as the pytree that its gradient mirrors."""
    module_type = _nnx_module_type()
    if module_type is not None and isinstance(model, module_type):
        from flax import nnx

        return nnx.state(model, nnx.Param)
    if _looks_layered(model):
        found = _layered_params(model)
        if isinstance(found, Gradient):
            return found
        if _is_opaque(model):
            expected = f"a pytree of arrays, an `nnx.Module` or {_LAYOUTS}"
            raise _layout_error(model, expected, found)
    check_array_leaves("model", model)
    return model


def _check_no_keys(params: PyTree) -> None:
    """Raise `TypeError` at the first PRNG-key leaf: a key has no gradient."""
    if not any(_is_key(_leaf_dtype(x)) for x in jax.tree.leaves(params)):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if _is_key(_leaf_dtype(leaf)):
            raise TypeError(
                f"`model` must be a pytree of numeric arrays; at {where(path)} it has the "
                f"PRNG key {describe_leaf(leaf)}, which has no gradient. Leave keys out of "
                "the tree (an `nnx.Module` is reduced to its `nnx.Param`s already)."
            )


def zero_grad(model: Any, *, dtype: DTypeLike | None = None) -> PyTree:
    """A gradient of zeros shaped like the trainable parameters of `model`.

    `model` may be:

    * a pytree of arrays (dict, list, `Gradient`, linen params, optax updates): the
      result has its structure, shapes and dtypes;
    * a paysage model, in either of paysage's layouts: `model.layers[i].params` with
      `model.weights[i].params` (paysage 0.2), or `model.layers[i].params` with
      `model.connections[i].weights.params` (later paysage). The result is
      `Gradient([zeros_like(l.params), ...], [zeros_like(w.params), ...])`, one `weights`
      entry per weight group or connection;
    * a Flax `nnx.Module`: the result is an `nnx.State` with exactly the structure
      `nnx.grad` returns for it (only `nnx.Param` variables: no batch statistics, no
      RNG state).

    With `dtype`, every leaf's zeros have that dtype instead of the leaf's, as in
    `optax.tree_utils.tree_zeros_like(tree, dtype)`. Integer and boolean leaves give
    zeros of their dtype; PRNG-key leaves have no gradient and are refused.

    Zeros of a sharded array get its sharding (not inside your own `jax.jit` with
    auto mesh axes: there XLA places arrays that depend on no input).

    Args:
        model: a pytree of arrays, a paysage model, or an `nnx.Module`.
        dtype: the dtype of every leaf of the result; `None` (the default) keeps each
            leaf's dtype.

    Returns:
        A pytree of zeros.

    Raises:
        TypeError: if a leaf of a pytree `model` is not an array or is a PRNG key (the
            message names its key path), if `model` is a plain object that fits neither
            paysage layout (the message names the missing attribute), or if `dtype` is
            not a dtype.

    Example:
        >>> jaxgrad.zero_grad({"w": jnp.ones((2, 2)), "b": jnp.ones(2, jnp.bfloat16)})
        {'b': Array([0, 0], dtype=bfloat16), 'w': Array([[0., 0.],
               [0., 0.]], dtype=float32)}
        >>> jaxgrad.zero_grad({"w": jnp.ones(2), "n": jnp.ones(2, jnp.int32)}, dtype=jnp.bfloat16)
        {'n': Array([0, 0], dtype=bfloat16), 'w': Array([0, 0], dtype=bfloat16)}
    """
    dtype = _check_dtype(dtype)
    params = parameters(model)
    _check_no_keys(params)
    leaves, treedef = jax.tree.flatten(params)
    dtypes = [jnp.result_type(x) if dtype is None else dtype for x in leaves]
    return jax.tree.unflatten(treedef, zeros_where(leaves, dtypes))


def _check_dtype(dtype: Any) -> Any:
    """`dtype` as a `numpy.dtype` (hashable, for a static argument), or `None`."""
    if dtype is None:
        return None
    try:
        return jnp.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"`dtype` must be a dtype such as `jnp.float32`, or None; got "
            f"{type(dtype).__name__} {dtype!r:.60}."
        ) from None


def random_grad(
    model: Any,
    key: Array,
    *,
    sampler: Sampler = jax.random.uniform,
    out_shardings: Sharding | PyTree | None = None,
) -> PyTree:
    """A gradient of random numbers shaped like the trainable parameters of `model`.

    The structure, shapes and dtypes are those of `zero_grad(model)`. Each leaf is
    `sampler(subkey, shape, dtype)` with its own subkey, split from `key` in
    `jax.tree.leaves` order. The default is uniform on [0, 1), as in paysage; pass
    `sampler=jax.random.normal` (or any function of that signature) for another law.
    The same key gives the same values; there is no global random state.

    Every leaf must be floating-point (complex too, with a sampler that draws complex
    numbers such as `jax.random.normal`): integer, boolean and PRNG-key leaves have no
    random gradient and are refused. `sampler` must return exactly the shape and dtype
    it is given; that is checked on its result (a static check, so the sampler runs
    once per leaf).

    With `out_shardings` (one `jax.sharding.Sharding` for every leaf, or a tree of them
    with the structure of `zero_grad(model)`) the values are generated already sharded,
    each device computing only its own shards, and they are the same numbers as without
    `out_shardings`. This needs a compiled call, so `sampler` is compiled too (it must
    be pure; a sampler of your own then gives the numbers of its call under `jax.jit`,
    which may differ in the last bit from its op-by-op call). It works across processes
    with `jax.distributed`. Each device generates only its own shards when the flag
    `jax_threefry_partitionable` is on (the default of recent JAX); with it off the
    values are the same, but every device computes whole leaves.

    Args:
        model: a pytree of arrays, a paysage model, or an `nnx.Module` (see `zero_grad`).
        key: a `jax.random` key (`jax.random.key(0)` or `jax.random.PRNGKey(0)`).
        sampler: a function `(key, shape, dtype) -> array`.
        out_shardings: `None` (the default placement), a `Sharding` for all leaves, or
            a pytree of `Sharding`s with the structure of `zero_grad(model)`.

    Returns:
        A pytree of random arrays.

    Raises:
        TypeError: if `key` is not a PRNG key, `sampler` is not callable, a leaf of
            `model` is not a floating-point array, `sampler` returns another dtype than
            it is given or no array, or a leaf of `out_shardings` is not a `Sharding`
            (the message names the key path).
        ValueError: if `sampler` returns another shape than it is given, `out_shardings`
            has another structure than `zero_grad(model)`, or a sharding does not fit
            the shape of its leaf (the message names the key path).

    Example:
        >>> g = jaxgrad.random_grad({"w": jnp.zeros((2, 3))}, jax.random.key(0))
        >>> g["w"].shape, bool((g["w"] >= 0).all() & (g["w"] < 1).all())
        ((2, 3), True)
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        >>> s = jaxgrad.random_grad({"w": jnp.zeros((2, 3))}, jax.random.key(0), out_shardings=rows)
        >>> s["w"].sharding.spec, bool((s["w"] == g["w"]).all())
        (P('data',), True)
    """
    check_callable("sampler", sampler)
    _check_key(key)
    params = parameters(model)
    _check_inexact(params, sampler)
    if out_shardings is not None:
        shardings = _check_shardings(out_shardings, params)
        leaves, treedef = jax.tree.flatten(params)
        spec = tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)
        generate = _random_sharded(treedef, tuple(jax.tree.leaves(shardings)))
        return generate(key, treedef, spec, sampler)
    if any(sampler is s for s in _PURE_SAMPLERS) and not is_traced((params, key)):
        return _random_like_jit(params, key, sampler)
    return _random_like(params, key, sampler)


def _check_inexact(params: PyTree, sampler: Sampler) -> None:
    """Raise `TypeError` at the first leaf that `sampler` cannot fill with random values.

    Integer, boolean and PRNG-key leaves have no random gradient, and
    `jax.random.uniform` draws only real numbers.
    """
    if sampler is jax.random.uniform:
        hint = (
            "Leave integer and boolean leaves out of the tree, or cast them first; for "
            "complex leaves pass `sampler=jax.random.normal` (`jax.random.uniform` draws "
            "real numbers)."
        )
        check_array_leaves("model", params, real=True, hint=hint)
    else:
        hint = "Leave integer and boolean leaves out of the tree, or cast them first."
        check_array_leaves("model", params, inexact=True, hint=hint)


def _sample(
    sampler: Sampler, key: Array, shape: tuple[int, ...], dtype: Any, treedef: Any, index: int
) -> Array:
    """`sampler(key, shape, dtype)`, checked to have that shape and dtype.

    The check reads only the result's shape and dtype (static, also under `jax.jit`), so
    the sampler runs once per leaf and nothing is computed twice.
    """
    value = sampler(key, shape, dtype)
    got_shape, got_dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if got_shape is not None and tuple(got_shape) == shape and got_dtype == dtype:
        return value
    at = where(_leaf_path(treedef, index))
    expected = describe_leaf(jax.ShapeDtypeStruct(shape, dtype))
    if got_shape is None or got_dtype is None:
        raise TypeError(
            f"`sampler` must return an array; for the leaf at {at} ({expected}) it returned "
            f"a {type(value).__name__}."
        )
    error = ValueError if tuple(got_shape) != shape else TypeError
    raise error(
        f"`sampler` must return an array of the shape and dtype it is given; for the leaf "
        f"at {at} it was given {expected} and returned {describe_leaf(value)}."
    )


def _leaf_path(treedef: Any, index: int) -> tuple[Any, ...]:
    """The key path of leaf number `index` of `treedef` (for error messages only)."""
    numbered = jax.tree.unflatten(treedef, range(treedef.num_leaves))
    return jax.tree_util.tree_flatten_with_path(numbered)[0][index][0]


def _random_like(params: PyTree, key: Array, sampler: Sampler) -> PyTree:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves)) if leaves else []
    values = [
        _sample(sampler, k, tuple(jnp.shape(x)), jnp.result_type(x), treedef, i)
        for i, (k, x) in enumerate(zip(keys, leaves, strict=True))
    ]
    return jax.tree.unflatten(treedef, values)


# Samplers known to be pure, so their compilation can be cached; a user's own sampler
# runs as plain Python, as with every other user callable.
_PURE_SAMPLERS = (jax.random.uniform, jax.random.normal)
_random_like_jit = jax.jit(_random_like, static_argnums=2)


def _random_from_spec(
    key: Array, treedef: Any, spec: tuple[tuple[tuple[int, ...], Any], ...], sampler: Sampler
) -> PyTree:
    """`_random_like` from shapes and dtypes only: the same subkeys, the same numbers."""
    keys = jax.random.split(key, len(spec)) if spec else []
    values = [
        _sample(sampler, k, shape, dtype, treedef, i)
        for i, (k, (shape, dtype)) in enumerate(zip(keys, spec, strict=True))
    ]
    return jax.tree.unflatten(treedef, values)


@functools.lru_cache(maxsize=64)
def _random_sharded(treedef: Any, shardings: tuple[Sharding, ...]) -> Callable[..., Any]:
    """`_random_from_spec` compiled to output `shardings`, cached per tree and shardings.

    Only the key is an argument (no parameter arrays travel), so each device computes
    its own shards, also when the shardings span several processes.
    """
    out_shardings = jax.tree.unflatten(treedef, shardings)
    return jax.jit(_random_from_spec, static_argnums=(1, 2, 3), out_shardings=out_shardings)


def _check_shardings(out_shardings: Any, params: PyTree) -> PyTree:
    """`out_shardings` as a full tree of `Sharding`s matching `params`, or raise."""
    if isinstance(out_shardings, Sharding):
        out_shardings = jax.tree.map(lambda _: out_shardings, params)
    else:
        check_same_structure("out_shardings", out_shardings, "zero_grad(model)", params)
    paths = jax.tree_util.tree_flatten_with_path(out_shardings)[0]
    for (path, sharding), leaf in zip(paths, jax.tree.leaves(params), strict=True):
        if not isinstance(sharding, Sharding):
            found = f"{type(sharding).__name__} {sharding!r:.60}"
            if isinstance(sharding, PartitionSpec):
                found = (
                    f"the PartitionSpec {sharding}, which needs a mesh: `NamedSharding(mesh, spec)`"
                )
            raise TypeError(
                f"`out_shardings` must be a `jax.sharding.Sharding` or a pytree of them; at "
                f"{where(path)} it has {found}."
            )
        try:
            sharding.shard_shape(tuple(jnp.shape(leaf)))
        except (ValueError, IndexError) as error:  # IndexError: more axes than dimensions
            reason = str(error) if isinstance(error, ValueError) else "too many dimensions"
            raise ValueError(
                f"`out_shardings` at {where(path)} does not fit the leaf "
                f"{describe_leaf(jnp.asarray(leaf))} of `zero_grad(model)`: {reason}."
            ) from None
    return out_shardings


def _check_key(key: Any) -> None:
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", (None,)))
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return
    if dtype is not None and not jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if jnp.dtype(dtype) == jnp.uint32 and shape == (2,):
            return
    raise TypeError(
        "`key` must be a single JAX PRNG key such as `jax.random.key(0)`; got "
        + (describe_leaf(key) if dtype is not None else f"{type(key).__name__} {key!r:.60}")
        + "."
    )


def null_grad(model: Any) -> Gradient:
    """A `Gradient` with one empty list per layer and per weight group: no leaves.

    As in paysage, this is a placeholder with the layout of a paysage model and nothing
    in it, e.g. to be filled layer by layer with `replace`. It is defined for paysage
    models in either layout (see `zero_grad`; with `connections`, one `weights` entry per
    connection) and for `Gradient`s whose fields are sequences; other pytrees have no
    layers to mirror, so they raise (use `zero_grad`, or `jax.tree.map(lambda _: None,
    tree)` for an empty tree of the same layout).

    Args:
        model: a paysage model, or a `Gradient` whose `layers` and `weights` are
            sequences.

    Returns:
        `Gradient(layers=[[], ...], weights=[[], ...])`.

    Raises:
        TypeError: for any other input; for an object that fits neither paysage layout
            the message names the missing attribute, and it suggests `zero_grad` only
            where `zero_grad` accepts `model`.

    Example:
        >>> g = jaxgrad.Gradient([jnp.zeros(2), jnp.zeros(3)], [jnp.zeros((2, 3))])
        >>> jaxgrad.null_grad(g)
        Gradient(layers=[[], []], weights=[[]])
    """
    if isinstance(model, Gradient):
        if isinstance(model.layers, Sequence) and isinstance(model.weights, Sequence):
            return Gradient(layers=[[] for _ in model.layers], weights=[[] for _ in model.weights])
    elif _looks_layered(model):
        found = _layered_params(model)
        if isinstance(found, Gradient):
            return Gradient(layers=[[] for _ in found.layers], weights=[[] for _ in found.weights])
        if _is_opaque(model):
            raise _layout_error(model, _NULL_EXPECTED, found)
    got = f"a {type(model).__name__}"
    if isinstance(model, Gradient):
        field = "layers" if not isinstance(model.layers, Sequence) else "weights"
        got += f" whose `{field}` is a {type(getattr(model, field)).__name__}"
    hint = " Use `zero_grad` for other pytrees." if _zero_grad_accepts(model) else ""
    raise TypeError(f"`model` must be {_NULL_EXPECTED}; got {got}.{hint}")


_NULL_EXPECTED = f"{_LAYOUTS} or a `Gradient` whose fields are sequences"


def _zero_grad_accepts(model: Any) -> bool:
    """Whether `zero_grad(model)` returns (so that an error may point to it)."""
    module_type = _nnx_module_type()
    if module_type is not None and isinstance(model, module_type):
        return True
    dtypes = [_leaf_dtype(x) for x in jax.tree.leaves(model)]
    return all(dtype is not None and not _is_key(dtype) for dtype in dtypes)
