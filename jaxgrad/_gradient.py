"""The `Gradient` pytree: paysage's `Gradient(layers, weights)` container for JAX."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import check_same_shapes, check_same_structure, describe_leaf
from ._typing import PyTree


def _is_scalar(value: Any, symbol: str) -> bool:
    """Whether `value` is a scalar operand; raises for arrays that are not 0-d."""
    if isinstance(value, numbers.Number):
        return True
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if np.ndim(value) != 0:
            raise TypeError(
                f"`Gradient {symbol} array` needs a scalar (0-d) array; got "
                f"{describe_leaf(value)}. Use `grad_apply` or `grad_mapzip` for leafwise "
                "operations with arrays."
            )
        return True
    return False


@dataclasses.dataclass(frozen=True, eq=False)
class Gradient:
    """A gradient of a layered model: one entry per layer and one per weight group.

    `Gradient` is a JAX pytree whose two children are the fields `layers` and `weights`,
    each any pytree (in paysage, a list with one parameter tree per layer and one per
    weight matrix). Key paths name the fields, e.g. `.layers[0]['bias']`, so every
    `jax.tree` function, `jax.jit`, `jax.grad` and `jax.vmap` work on it as on a dict.

    It is immutable: `replace(**fields)` returns a new one. Arithmetic is elementwise:
    `+` and `-` with another `Gradient` of the same structure and shapes or with a
    scalar, `*` and `/` by a scalar, and unary `-`, each returning a `Gradient`. Dtypes
    follow `jax.numpy`'s promotion rules. `repr` shows structure, shapes and dtypes,
    never values.

    Args:
        layers: a pytree with one entry per layer.
        weights: a pytree with one entry per weight group.

    Example:
        >>> g = jaxgrad.Gradient(layers=[{"bias": jnp.ones(2)}], weights=[{"w": jnp.ones((2, 3))}])
        >>> g
        Gradient(layers=[{'bias': f32[2]}], weights=[{'w': f32[2,3]}])
        >>> (2 * g - g).layers[0]["bias"]
        Array([1., 1.], dtype=float32)
        >>> [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(g)[0]]
        [".layers[0]['bias']", ".weights[0]['w']"]
    """

    layers: PyTree
    weights: PyTree

    # numpy defers to our reflected operators instead of broadcasting over the object.
    __array_ufunc__ = None

    def replace(self, **fields: PyTree) -> Gradient:
        """A new `Gradient` with the given fields replaced.

        Example:
            >>> g = jaxgrad.Gradient([jnp.zeros(2)], [])
            >>> g.replace(weights=[jnp.ones(1)])
            Gradient(layers=[f32[2]], weights=[f32[1]])
        """
        return dataclasses.replace(self, **fields)

    def __repr__(self) -> str:
        layers = jax.tree.map(_Summary, self.layers)
        weights = jax.tree.map(_Summary, self.weights)
        return f"Gradient(layers={layers!r}, weights={weights!r})"

    # Arithmetic -----------------------------------------------------------------

    def _zip(self, other: Any, op: Any, symbol: str) -> Gradient:
        if isinstance(other, Gradient):
            check_same_structure("self", self, "other", other)
            check_same_shapes("self", self, "other", other)
            return jax.tree.map(op, self, other)
        if _is_scalar(other, symbol):
            return jax.tree.map(lambda x: op(x, other), self)
        return NotImplemented

    def _scale(self, other: Any, op: Any, symbol: str) -> Gradient:
        if isinstance(other, Gradient):
            raise TypeError(
                f"`Gradient {symbol} Gradient` is not defined: `{symbol}` takes a scalar; "
                "for an elementwise product use `grad_mapzip(jnp.multiply, grad1, grad2)`."
            )
        if _is_scalar(other, symbol):
            return jax.tree.map(lambda x: op(x, other), self)
        return NotImplemented

    def __add__(self, other: Any) -> Gradient:
        return self._zip(other, jnp.add, "+")

    def __radd__(self, other: Any) -> Gradient:
        return self._zip(other, lambda x, y: jnp.add(y, x), "+")

    def __sub__(self, other: Any) -> Gradient:
        return self._zip(other, jnp.subtract, "-")

    def __rsub__(self, other: Any) -> Gradient:
        return self._zip(other, lambda x, y: jnp.subtract(y, x), "-")

    def __mul__(self, other: Any) -> Gradient:
        return self._scale(other, jnp.multiply, "*")

    def __rmul__(self, other: Any) -> Gradient:
        return self._scale(other, lambda x, y: jnp.multiply(y, x), "*")

    def __truediv__(self, other: Any) -> Gradient:
        return self._scale(other, jnp.divide, "/")

    def __neg__(self) -> Gradient:
        return jax.tree.map(jnp.negative, self)


class _Summary:
    """Stands in for a leaf in `Gradient.__repr__`: prints `f32[3,4]`, never values."""

    __slots__ = ("text",)

    def __init__(self, leaf: Any) -> None:
        self.text = describe_leaf(leaf)

    def __repr__(self) -> str:
        return self.text


jax.tree_util.register_dataclass(Gradient, data_fields=["layers", "weights"], meta_fields=[])
