"""Gradients built from a model: `zero_grad`, `random_grad`, `null_grad`."""

import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._dispatch import compiled, has_tracer
from ._gradient import Gradient
from ._structure import check_array_leaves, check_callable, describe_leaf
from ._typing import Array, DTypeLike, PyTree

Sampler = Callable[[Array, tuple[int, ...], DTypeLike], Array]


def _nnx_module_type() -> type | None:
    """`flax.nnx.Module` if Flax is already imported (a model cannot be one otherwise)."""
    if "flax" not in sys.modules:
        return None
    from flax import nnx

    return nnx.Module


def _is_layered(model: Any) -> bool:
    """Paysage's model protocol: `layers` and `weights` sequences of objects with `params`."""
    if isinstance(model, Gradient):
        return False
    layers = getattr(model, "layers", None)
    weights = getattr(model, "weights", None)
    return (
        isinstance(layers, Sequence)
        and isinstance(weights, Sequence)
        and all(hasattr(item, "params") for item in (*layers, *weights))
    )


def parameters(model: Any) -> PyTree:
    """The trainable parameters of `model`, as the pytree that its gradient mirrors."""
    module_type = _nnx_module_type()
    if module_type is not None and isinstance(model, module_type):
        from flax import nnx

        return nnx.state(model, nnx.Param)
    if _is_layered(model):
        return Gradient(
            layers=[layer.params for layer in model.layers],
            weights=[weight.params for weight in model.weights],
        )
    check_array_leaves("model", model)
    return model


def zero_grad(model: Any) -> PyTree:
    """A gradient of zeros shaped like the trainable parameters of `model`.

    `model` may be:

    * a pytree of arrays (dict, list, `Gradient`, linen params, optax updates): the
      result has its structure, shapes and dtypes;
    * a layered model in paysage's style (an object with `layers` and `weights`
      sequences whose items carry a `params` pytree): the result is
      `Gradient([zeros_like(l.params), ...], [zeros_like(w.params), ...])`;
    * a Flax `nnx.Module`: the result is an `nnx.State` with exactly the structure
      `nnx.grad` returns for it (only `nnx.Param` variables: no batch statistics, no
      RNG state).

    Args:
        model: a pytree of arrays, a layered model, or an `nnx.Module`.

    Returns:
        A pytree of zeros.

    Raises:
        TypeError: if a leaf of a pytree `model` is not an array (the message names it).

    Example:
        >>> jaxgrad.zero_grad({"w": jnp.ones((2, 2)), "b": jnp.ones(2, jnp.bfloat16)})
        {'b': Array([0, 0], dtype=bfloat16), 'w': Array([[0., 0.],
               [0., 0.]], dtype=float32)}
    """
    return _zeros_like(parameters(model))


@compiled()
def _zeros_like(params: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, params)


def random_grad(model: Any, key: Array, *, sampler: Sampler = jax.random.uniform) -> PyTree:
    """A gradient of random numbers shaped like the trainable parameters of `model`.

    The structure, shapes and dtypes are those of `zero_grad(model)`. Each leaf is
    `sampler(subkey, shape, dtype)` with its own subkey, split from `key` in
    `jax.tree.leaves` order. The default is uniform on [0, 1), as in paysage; pass
    `sampler=jax.random.normal` (or any function of that signature) for another law.
    The same key gives the same values; there is no global random state.

    Args:
        model: a pytree of arrays, a layered model, or an `nnx.Module` (see `zero_grad`).
        key: a `jax.random` key (`jax.random.key(0)` or `jax.random.PRNGKey(0)`).
        sampler: a function `(key, shape, dtype) -> array`.

    Returns:
        A pytree of random arrays.

    Raises:
        TypeError: if `key` is not a PRNG key, `sampler` is not callable, or a leaf of
            `model` is not an array.

    Example:
        >>> g = jaxgrad.random_grad({"w": jnp.zeros((2, 3))}, jax.random.key(0))
        >>> g["w"].shape, bool((g["w"] >= 0).all() & (g["w"] < 1).all())
        ((2, 3), True)
    """
    check_callable("sampler", sampler)
    _check_key(key)
    params = parameters(model)
    if any(sampler is s for s in _PURE_SAMPLERS) and not has_tracer((params, key)):
        return _random_like_jit(params, key, sampler)
    return _random_like(params, key, sampler)


def _random_like(params: PyTree, key: Array, sampler: Sampler) -> PyTree:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves)) if leaves else []
    values = [
        sampler(k, tuple(jnp.shape(x)), jnp.result_type(x))
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, values)


# Samplers known to be pure, so their compilation can be cached; a user's own sampler
# runs as plain Python, as with every other user callable.
_PURE_SAMPLERS = (jax.random.uniform, jax.random.normal)
_random_like_jit = jax.jit(_random_like, static_argnums=2)


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

    As in paysage, this is a placeholder with the layout of a layered model and nothing
    in it, e.g. to be filled layer by layer with `replace`. It is defined for layered
    models (see `zero_grad`) and for `Gradient`s whose fields are sequences; other
    pytrees have no layers to mirror, so they raise (use `zero_grad`, or
    `jax.tree.map(lambda _: None, tree)` for an empty tree of the same layout).

    Args:
        model: a layered model, or a `Gradient` whose `layers` and `weights` are
            sequences.

    Returns:
        `Gradient(layers=[[], ...], weights=[[], ...])`.

    Raises:
        TypeError: for any other input.

    Example:
        >>> g = jaxgrad.Gradient([jnp.zeros(2), jnp.zeros(3)], [jnp.zeros((2, 3))])
        >>> jaxgrad.null_grad(g)
        Gradient(layers=[[], []], weights=[[]])
    """
    if _is_layered(model) or (
        isinstance(model, Gradient)
        and isinstance(model.layers, Sequence)
        and isinstance(model.weights, Sequence)
    ):
        return Gradient(layers=[[] for _ in model.layers], weights=[[] for _ in model.weights])
    raise TypeError(
        "`model` must be a layered model (with `layers` and `weights` sequences of "
        "objects with `params`) or a `Gradient` with sequence fields; got "
        f"{type(model).__name__}. Use `zero_grad` for other pytrees."
    )
