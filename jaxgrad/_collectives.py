"""Collectives across data-parallel replicas: `grad_psum`, `grad_pmean`; `axis_name` checks."""

from typing import Any

import jax
import jax.numpy as jnp

from ._checks import check_array_leaves, check_axis_name
from ._numerics import widen
from ._typing import PyTree

AxisNames = str | tuple[str, ...]


def grad_psum(grad: PyTree, axis_name: AxisNames) -> PyTree:
    """Sum a gradient over data-parallel replicas: every replica gets the total.

    For use inside `shard_map`, `pmap` or a named `vmap`, where each replica (device)
    holds a whole gradient of its own, e.g. computed on its part of the batch. Each
    leaf is summed over the mesh axes `axis_name` by one `jax.lax.psum` of the whole
    tree; JAX emits an all-reduce per leaf and XLA's all-reduce combiner fuses them into
    a few tuple all-reduces (on CPU: one for all float32 and bfloat16 leaves). The
    result has the structure, shapes and dtypes of `grad`; sums are taken in each
    leaf's dtype, as `jax.lax.psum` does, so a float16 sum can overflow (two replicas of
    60000 give inf) and a bfloat16 sum keeps 8 significant bits; cast first if the
    total needs more (`grad_pmean` sums float16 and bfloat16 leaves in float32). For
    leaves that are shards of one larger gradient, use the reductions' `axis_name`
    instead (`grad_norm(grad, axis_name=...)`).

    Args:
        grad: a `Gradient` or any pytree of arrays.
        axis_name: the mesh axis name, or a tuple of names, to sum over.

    Returns:
        A pytree with the structure, shapes and dtypes of `grad`.

    Raises:
        TypeError: if `axis_name` is not a str or a non-empty tuple of str (a list is
            not accepted; the message shows the tuple to pass).

    Example:
        >>> per_replica = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}  # 2 replicas
        >>> jax.vmap(lambda g: jaxgrad.grad_psum(g, "i"), axis_name="i")(per_replica)
        {'w': Array([[4., 6.],
               [4., 6.]], dtype=float32)}
    """
    check_axis_name(axis_name)
    return jax.lax.psum(grad, axis_name)


def grad_pmean(grad: PyTree, axis_name: AxisNames) -> PyTree:
    """Average a gradient over data-parallel replicas: every replica gets the mean.

    The data-parallel all-reduce: inside `shard_map`, `pmap` or a named `vmap`, each
    replica holds the gradient of its part of the batch, and `grad_pmean` makes every
    replica hold the gradient of the whole batch (for a loss that is a mean over
    examples and equal-sized parts). Leaves are summed with one `jax.lax.psum` over the
    whole tree (see `grad_psum`) and divided by the number of replicas; float16 and
    bfloat16 leaves are cast to float32 before the sum and the mean is cast back, so
    the sum neither overflows nor rounds in the narrow dtype (two float16 replicas of
    60000 average to 60000, not inf). Each leaf keeps its dtype; the all-reduce of
    those leaves moves float32, twice their bytes.

    Inside `shard_map` with `check_vma=True` (the default), `jax.grad` with respect to
    replicated parameters already returns the sum of the replicas' gradients (it is the
    same on every device, and averaging it changes nothing). For per-replica gradients
    to average, differentiate with respect to `jax.lax.pcast(params, axis_name,
    to="varying")`, or use `check_vma=False`.

    Args:
        grad: a `Gradient` or any pytree of floating-point or complex arrays.
        axis_name: the mesh axis name, or a tuple of names, to average over.

    Returns:
        A pytree with the structure, shapes and dtypes of `grad`.

    Raises:
        TypeError: if `axis_name` is not a str or a non-empty tuple of str (a list is
            not accepted; the message shows the tuple to pass), or if a leaf is not
            floating-point or complex (the message names it).

    Example:
        >>> per_replica = jaxgrad.Gradient([jnp.array([[1.0], [3.0]])], [])  # 2 replicas
        >>> mean = jax.vmap(lambda g: jaxgrad.grad_pmean(g, "i"), axis_name="i")(per_replica)
        >>> mean.layers[0]
        Array([[2.],
               [2.]], dtype=float32)
        >>> half = {"w": jnp.full((2, 1), 60000.0, jnp.float16)}  # 2 replicas of 60000
        >>> jax.vmap(lambda g: jaxgrad.grad_pmean(g, "i"), axis_name="i")(half)["w"]
        Array([[60000.],
               [60000.]], dtype=float16)
    """
    check_axis_name(axis_name)
    check_array_leaves("grad", grad, inexact=True, hint="Use `grad_psum` for integer leaves.")
    mean, _ = pmean_wide(grad, axis_name)
    return jax.tree.map(lambda m, x: m.astype(jnp.result_type(x)), mean, grad)


def pmean_wide(grad: PyTree, axis_name: AxisNames, riders: Any = None) -> tuple[PyTree, Any]:
    """The all-reduce of `grad_pmean`: the mean in float32 (or wider), and `riders` summed.

    float16 and bfloat16 leaves are widened to float32 before the one `jax.lax.psum`,
    which also carries `riders` (any pytree, e.g. per-replica squared norms, summed as
    they are), so a caller that needs more than the mean adds no second collective.
    Returns `(mean in the widened dtypes, summed riders)`. No checks: callers check.
    """
    wide = jax.tree.map(lambda x: widen(jnp.asarray(x)), grad)
    total, riders = jax.lax.psum((wide, riders), axis_name)
    count = jax.lax.psum(1, axis_name)  # the number of replicas, a constant: no collective
    return jax.tree.map(lambda t: t / count, total), riders
