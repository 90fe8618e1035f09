"""Type aliases shared by the jaxgrad modules."""

from typing import Any, TypeAlias

import jax

PyTree: TypeAlias = Any
"""Any JAX pytree of arrays: a `Gradient`, dict, list, `nnx.State`, optax updates, ..."""

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
DTypeLike: TypeAlias = jax.typing.DTypeLike
