"""Buffer donation and placement: checks that name key paths, calls that keep leaves in place.

A jitted call takes all its committed arguments on one set of devices: leaves committed
to different devices (a model placed layer by layer by hand) make it fail with XLA's
"incompatible devices". `per_device` calls a leafwise kernel once per set of devices,
where the leaves are, so that donation reuses every buffer in place. A compiled call
that reads no input (zeros) runs on the default device; `placed` says when the leaves
live elsewhere, so that their zeros must be placed one by one (`zeros_where`).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from ._typing import PyTree


def sharding_of(leaf: Any) -> jax.sharding.Sharding | None:
    """The sharding of a concrete array or of a `jax.ShapeDtypeStruct` that has one, else None.

    Tracers (whose placement is the compiler's business), numpy arrays and Python
    numbers have none.
    """
    if isinstance(leaf, Tracer):
        return None
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return leaf.sharding
    return None


def placed(leaves: Sequence[Any]) -> bool:
    """Whether a leaf lives elsewhere than the default device: on several, or another one.

    Arrays that a compiled call makes from nothing land on the default device; when this
    is True they must be placed leaf by leaf to sit where their leaves are. Always False
    on one device. (An array merely put on the default device by the user counts as not
    placed; one under `jax.default_device(other)` counts as placed, which costs speed,
    never correctness.)
    """
    if jax.device_count() == 1:
        return False
    default = jax.devices()[0]
    for leaf in leaves:
        sharding = sharding_of(leaf)
        if sharding is not None and sharding.device_set != {default}:
            return True
    return False


@functools.partial(jax.jit, static_argnums=0)
def _zeros(specs: tuple[tuple[tuple[int, ...], Any], ...]) -> list[jax.Array]:
    return [jnp.zeros(shape, dtype) for shape, dtype in specs]


def zeros_where(leaves: Sequence[Any], dtypes: Sequence[Any]) -> list[jax.Array]:
    """Zeros shaped like each leaf, of the matching dtype, each where its leaf lives.

    Leaves may be arrays, numbers or `jax.ShapeDtypeStruct`s. Three cases, one answer:
    traced leaves (inside the user's `jax.jit`) get `zeros_like`, which keeps a traced
    leaf's sharding in its type (explicit mesh axes); leaves placed off the default
    device get their zeros op by op, each with its leaf's sharding (one compiled call
    that reads nothing would put them all on the default device); otherwise one
    compiled call makes them all.
    """
    dtypes = [jax.dtypes.canonicalize_dtype(d) for d in dtypes]
    specs = tuple(
        (tuple(x.shape) if hasattr(x, "shape") else np.shape(x), d)
        for x, d in zip(leaves, dtypes, strict=True)
    )
    if any(isinstance(x, Tracer) for x in leaves):
        return [
            jnp.zeros_like(x, d) if isinstance(x, jax.Array) else jnp.zeros(shape, d)
            for x, (shape, d) in zip(leaves, specs, strict=True)
        ]
    if placed(leaves):
        return [
            jnp.zeros(shape, d, device=sharding_of(x))
            for x, (shape, d) in zip(leaves, specs, strict=True)
        ]
    return _zeros(specs)


def replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding | None:
    """A sharding that puts a whole array on every device of `sharding` (None if unknown)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    if len(sharding.device_set) == 1:
        return SingleDeviceSharding(next(iter(sharding.device_set)))
    return None


def device_groups(leaves: Sequence[Any]) -> list[list[int]]:
    """Indices of `leaves` grouped by the set of devices each lives on, in order of appearance.

    Leaves without a sharding (tracers, numpy arrays, Python numbers) join the first
    group: a jitted call moves them where it runs. One group (or none, for no leaves)
    means one call can take every leaf, which is always so on one device.
    """
    if jax.device_count() == 1 or len(leaves) <= 1:
        return [list(range(len(leaves)))] if leaves else []
    groups: dict[frozenset[Any], list[int]] = {}
    loose: list[int] = []
    for i, leaf in enumerate(leaves):
        sharding = sharding_of(leaf)
        if sharding is None:
            loose.append(i)
        else:
            groups.setdefault(frozenset(sharding.device_set), []).append(i)
    if not groups:
        return [loose]
    out = list(groups.values())
    out[0] = sorted(out[0] + loose)
    return out


def moved_to(x: Any, leaf: Any) -> Any:
    """`x` on the devices of `leaf` (with its sharding if the shapes agree, else replicated).

    Unchanged when `x` already lives on the same devices or either has no sharding.
    """
    if jax.device_count() == 1:
        return x
    target, own = sharding_of(leaf), sharding_of(x)
    if target is None or own is None or own.device_set == target.device_set:
        return x
    if x.shape != leaf.shape:
        whole = replicated(target)
        if whole is None:  # an exotic sharding: leave the transfer to JAX (or its error)
            return x
        target = whole
    return jax.device_put(x, target)


def keep_only(treedef: Any, leaves: Sequence[Any], keep: set[int]) -> PyTree:
    """The tree with the leaves whose indices are in `keep` and `None` elsewhere.

    `None` is an empty subtree, so the key paths of the kept leaves are unchanged.
    """
    return jax.tree.unflatten(treedef, [x if i in keep else None for i, x in enumerate(leaves)])


def per_device(fn: Callable[..., PyTree], tree: PyTree, *others: PyTree) -> PyTree:
    """`fn(tree, *others)` for a leafwise `fn`, computed where the leaves of `tree` live.

    The leaves of `others` are first moved to the devices of the corresponding leaf of
    `tree` when they live elsewhere. With one set of devices it is then one call.
    Otherwise `fn` runs once per set of devices, on the trees with `None` in place of
    the leaves that live elsewhere (so key paths, and the error messages that name
    them, stay those of `tree`), and the results are put back together. `fn` must
    return a tree whose structure, down to the leaves of `tree`, is that of `tree` (a
    leaf may become a subtree), as `jax.tree.map` over `tree` does; `others` must have
    that structure too. On one device this is just `fn(tree, *others)`.
    """
    if jax.device_count() == 1:
        return fn(tree, *others)
    leaves, treedef = jax.tree.flatten(tree)
    groups = device_groups(leaves)
    other_leaves = [treedef.flatten_up_to(other) for other in others]
    moved = [[moved_to(x, leaf) for x, leaf in zip(xs, leaves, strict=True)] for xs in other_leaves]
    if len(groups) <= 1:
        pairs = zip(sum(moved, []), sum(other_leaves, []), strict=True)
        if all(m is x for m, x in pairs):  # nothing had to move: the trees as they are
            return fn(tree, *others)
        return fn(tree, *(jax.tree.unflatten(treedef, ms) for ms in moved))
    out: list[Any] = [None] * len(leaves)
    for indices in groups:
        keep = set(indices)
        parts = [keep_only(treedef, ms, keep) for ms in moved]
        result = treedef.flatten_up_to(fn(keep_only(treedef, leaves, keep), *parts))
        for i in indices:
            out[i] = result[i]
    return jax.tree.unflatten(treedef, out)
