"""Every argument and tree check, one wording per kind of error (the house style).

Trees: structure and shapes (naming the first differing key path), numeric and
floating-point leaves, modules, tracers, donation. Arguments: `axis_name`, bounds.
"""

import numbers
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from ._typing import PyTree

_PathEntry = Any


def short_dtype(dtype: Any) -> str:
    """Short dtype name in the style of `jax.ShapeDtypeStruct` (`f32`, `bf16`, `i32`)."""
    name = np.dtype(dtype).name
    for long, short in (
        ("bfloat", "bf"),
        ("float", "f"),
        ("complex", "c"),
        ("uint", "u"),
        ("int", "i"),
    ):
        if name.startswith(long):
            return short + name[len(long) :]
    return name


def describe_leaf(leaf: Any) -> str:
    """`f32[3,4]` for anything with a shape and dtype, else the type name."""
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is not None and dtype is not None:
        try:
            return f"{short_dtype(dtype)}[{','.join(str(d) for d in shape)}]"
        except TypeError:  # a dtype numpy does not know, e.g. a PRNG key
            return f"{dtype}[{','.join(str(d) for d in shape)}]"
    return type(leaf).__name__


def where(path: tuple[Any, ...]) -> str:
    """A key path as text for error messages: `['a'][0]`, or `the root` for `()`."""
    return jax.tree_util.keystr(path) or "the root"


def _key_name(key: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def _one_level(node: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """Children of `node` with their key entries, and the one-level treedef."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return [(path[0], child) for path, child in pairs if path], treedef


def describe_node(node: Any) -> str:
    """One phrase saying what a tree node is, for error messages."""
    if node is None:
        return "None"
    children, treedef = _one_level(node)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1 and not children:
        return f"a leaf {describe_leaf(node)}"
    keys = [_key_name(k) for k, _ in children]
    return f"a {type(node).__name__} with keys {keys}"


def first_difference(a: PyTree, b: PyTree) -> tuple[str, str, str] | None:
    """The first key path where two trees differ, with a description of each side.

    Returns `None` when the trees have the same structure.
    """
    if jax.tree.structure(a) == jax.tree.structure(b):
        return None

    def walk(x: Any, y: Any, path: tuple[_PathEntry, ...]) -> tuple[str, str, str] | None:
        cx, tx = _one_level(x)
        cy, ty = _one_level(y)
        if tx != ty or (x is None) != (y is None):
            return where(path), describe_node(x), describe_node(y)
        for (kx, vx), (_, vy) in zip(cx, cy, strict=True):
            found = walk(vx, vy, (*path, kx))
            if found is not None:
                return found
        return None

    found = walk(a, b, ())
    assert found is not None  # different treedefs differ at some node
    return found


def check_same_structure(name1: str, tree1: PyTree, name2: str, tree2: PyTree) -> None:
    """Raise `ValueError` naming the first differing key path if the structures differ."""
    diff = first_difference(tree1, tree2)
    if diff is None:
        return
    path, d1, d2 = diff
    raise ValueError(
        f"`{name1}` and `{name2}` must have the same structure; they first differ at "
        f"{path}: `{name1}` has {d1}, `{name2}` has {d2}."
    )


def check_same_shapes(name1: str, tree1: PyTree, name2: str, tree2: PyTree) -> None:
    """After `check_same_structure`: raise `ValueError` at the first leaf whose shapes differ."""
    pairs = jax.tree_util.tree_flatten_with_path(tree1)[0]
    for (path, x), y in zip(pairs, jax.tree.leaves(tree2), strict=True):
        if np.shape(x) != np.shape(y):
            raise ValueError(
                f"`{name1}` and `{name2}` must have leaves of the same shapes; at "
                f"{where(path)} `{name1}` has {describe_leaf(x)}, "
                f"`{name2}` has {describe_leaf(y)}."
            )


def check_callable(name: str, func: Any) -> None:
    """Raise `TypeError` unless `func` is callable."""
    if not callable(func):
        raise TypeError(f"`{name}` must be callable; got {type(func).__name__} {func!r}.")


def check_array_leaves(
    name: str, tree: PyTree, *, inexact: bool = False, real: bool = False, hint: str = ""
) -> None:
    """Raise `TypeError` at the first leaf that is not a numeric array or a scalar number.

    Numeric means boolean, integer, floating-point or complex: PRNG keys, strings and
    object arrays are refused, as are shape-only leaves such as `jax.ShapeDtypeStruct`.
    With `inexact=True` only floating-point and complex leaves pass; with `real=True`
    only floating-point ones. This is the one wording for a leaf of the wrong dtype;
    `hint` (a sentence) is appended to it. The check is a type test per leaf (key paths
    are only computed to name a bad one).
    """
    kind = "floating" if real else "inexact" if inexact else "numeric"
    if all(_is_kind(leaf, kind) for leaf in jax.tree.leaves(tree)):  # the fast path
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_numeric_leaf(leaf) and not _is_kind(leaf, kind):
            kinds = "floating-point" if real else "floating-point or complex"
            found = describe_leaf(jnp.asarray(leaf) if _is_number(leaf) else leaf)
            raise TypeError(
                f"`{name}` must have {kinds} leaves; at {where(path)} it has {found}."
                + (f" {hint}" if hint else "")
            )
        if not _is_kind(leaf, kind):
            if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                what = f"the PRNG key {describe_leaf(leaf)}, which has no gradient"
            elif isinstance(leaf, (jax.Array, np.ndarray)):
                what = f"an array of dtype {describe_leaf(leaf)}"
            else:
                what = f"a {type(leaf).__name__}: {leaf!r:.80}"
            raise TypeError(
                f"`{name}` must be a pytree of numeric arrays; at {where(path)} it has {what}."
            )


def is_numeric(value: Any) -> bool:
    """Whether `value` is a numeric (bool, integer, float, complex) array or Python number."""
    return _is_numeric_leaf(value)


def check_array(name: str, value: Any) -> None:
    """Raise `TypeError` unless `value` is a numeric array, number or nested list of numbers.

    Arrays are tested by their dtype (nothing is transferred); anything else by the
    dtype NumPy gives it, so `None`, strings and ragged lists are refused here rather
    than deep inside `jnp.asarray`.
    """
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        dtype = value.dtype
    elif isinstance(value, (str, bytes)) or value is None:
        dtype = None
    else:
        try:
            dtype = np.asarray(value).dtype
        except ValueError:  # a ragged list: no dtype to speak of
            dtype = None
    if dtype is None or not _dtype_is(dtype, "numeric"):
        raise TypeError(
            f"`{name}` must be a numeric array; got {type(value).__name__} {value!r:.60}."
        )


def check_hashable(name: str, func: Any, why: str) -> None:
    """Raise `TypeError` unless `func` is hashable; `why` says what needs the hash."""
    try:
        hash(func)
    except TypeError:
        raise TypeError(
            f"`{name}` must be hashable {why}; got an unhashable {type(func).__name__}. Pass "
            "a function (or a `functools.partial` of hashable arguments), or `donate=False`."
        ) from None


def _integer_bits(dtype: np.dtype) -> int:
    """Bits of magnitude of an integer or boolean dtype: its values all have |n| <= 2**bits."""
    if dtype == np.bool_:
        return 1
    info = np.iinfo(dtype)
    return info.bits - 1 if info.min < 0 else info.bits


def holds_exactly(inexact: np.dtype, integer: np.dtype) -> bool:
    """Whether every value of the integer (or boolean) dtype is exact in the float dtype.

    A float with a significand of p bits (`nmant + 1`) holds every integer up to 2**p.
    """
    return int(jnp.finfo(inexact).nmant) + 1 >= _integer_bits(integer)


def cast_loss(source: Any, target: Any) -> str | None:
    """What casting `source`-dtype values to `target` would lose, or `None` if nothing.

    Only losses of a different kind count: the imaginary part of a complex value cast to
    a real dtype, and integers a floating dtype does not hold exactly. (Rounding to a
    narrower float of the same kind is what a cast to the leaf's dtype is for.)
    """
    if jnp.issubdtype(source, jnp.complexfloating) and not jnp.issubdtype(
        target, jnp.complexfloating
    ):
        return "its imaginary part"
    if (
        jnp.issubdtype(source, jnp.inexact)
        and not jnp.issubdtype(target, jnp.inexact)
        and not holds_exactly(np.dtype(source), np.dtype(target))
    ):
        return f"integers that {short_dtype(source)} does not hold exactly"
    return None


def check_casts(name: str, tree: PyTree, target_name: str, targets: PyTree) -> None:
    """Raise `TypeError` at the first leaf of `tree` whose cast to its target would lose values.

    `targets` has the structure of `tree` (checked before); its leaves are arrays (or
    templates) whose dtypes the leaves of `tree` are cast to. See `cast_loss`.
    """
    pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(targets), strict=True)
    if all(cast_loss(_dtype_of(x), t.dtype) is None for x, t in pairs):
        return
    for (path, x), t in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(targets), strict=True
    ):
        loss = cast_loss(_dtype_of(x), t.dtype)
        if loss is not None:
            found = f"{describe_leaf(x)} at {where(path)}"
            raise cast_error(name, found, target_name, where(path), describe_leaf(t), loss)


def cast_error(
    name: str, found: str, target_name: str, path: str, leaf: str, loss: str
) -> TypeError:
    """The one wording for a cast that would lose values (`cast_loss`)."""
    return TypeError(
        f"`{name}` has {found}, but the leaf of `{target_name}` at {path} is {leaf}; the "
        f"cast would lose {loss}. Cast `{name}` first if that is meant."
    )


_KINDS: dict[tuple[Any, str], bool] = {}


def _dtype_of(leaf: Any) -> Any:
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        return leaf.dtype
    if isinstance(leaf, (bool, int, float, complex)):
        return np.dtype(type(leaf)) if not isinstance(leaf, bool) else np.dtype(bool)
    return None


def _is_number(leaf: Any) -> bool:
    return isinstance(leaf, (bool, int, float, complex))


def _is_kind(leaf: Any, kind: str) -> bool:
    """Whether `leaf` is an array or number of a `"numeric"`, `"inexact"`, `"floating"` kind."""
    dtype = _dtype_of(leaf)
    return dtype is not None and _dtype_is(dtype, kind)


def _dtype_is(dtype: Any, kind: str) -> bool:
    """Whether `dtype` is `"numeric"` (bool, integer, float, complex), `"inexact"` or `"floating"`.

    Cached per dtype: a model has a handful, and the test is per leaf on every call.
    """
    known = _KINDS.get((dtype, kind))
    if known is None:
        try:
            if kind == "floating":
                known = bool(jnp.issubdtype(dtype, jnp.floating))
            elif kind == "inexact":
                known = bool(jnp.issubdtype(dtype, jnp.inexact))
            else:
                known = bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))
        except TypeError:  # a dtype numpy does not know, e.g. a PRNG key
            known = False
        _KINDS[dtype, kind] = known
    return known


def _is_numeric_leaf(leaf: Any) -> bool:
    return _is_kind(leaf, "numeric")


def _is_inexact_leaf(leaf: Any) -> bool:
    return _is_kind(leaf, "inexact")


def nnx_params(tree: Any) -> Any:
    """A Flax `nnx.Module` as its `nnx.Param` state (what `nnx.grad` returns); else `tree`.

    Every function that takes a gradient or a template accepts a module this way, as
    `zero_grad` does. Flax is never imported here: a module can only exist if it is.
    """
    if "flax" not in sys.modules:
        return tree
    from flax import nnx

    if isinstance(tree, nnx.Module):
        return nnx.state(tree, nnx.Param)
    return tree


def is_traced(tree: Any) -> bool:
    """Whether a leaf of `tree` is a tracer (we are inside the user's `jax.jit` or `grad`)."""
    return any(isinstance(leaf, Tracer) for leaf in jax.tree.leaves(tree))


def check_axis_name(axis_name: Any, *, optional: bool = False) -> None:
    """Raise `TypeError` unless `axis_name` is a str or a non-empty tuple of str.

    With `optional=True`, `None` (no collective) is accepted too.
    """
    if axis_name is None and optional:
        return
    if isinstance(axis_name, str):
        return
    if (
        isinstance(axis_name, tuple)
        and axis_name
        and all(isinstance(name, str) for name in axis_name)
    ):
        return
    expected = "a mesh axis name (a str) or a non-empty tuple of names"
    if optional:
        expected += ", or None"
    hint = ""
    if isinstance(axis_name, list) and axis_name and all(isinstance(n, str) for n in axis_name):
        hint = f" A list is not accepted (JAX needs a hashable name); pass {tuple(axis_name)!r}."
    raise TypeError(
        f"`axis_name` must be {expected}; got {type(axis_name).__name__} {axis_name!r}.{hint}"
    )


def check_bound(name: str, value: Any) -> Any:
    """`value` as a Python float (one compilation for every bound), or a tracer as it is.

    Accepts any real scalar: Python and numpy numbers, `fractions.Fraction`, 0-d arrays
    of any integer or floating dtype (bfloat16 included). Raises unless it is
    non-negative (NaN excluded); tracers pass unchecked.
    """
    if isinstance(value, Tracer):
        if np.ndim(value) != 0:
            raise ValueError(f"`{name}` must be a scalar; got an array of shape {value.shape}.")
        return value
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a real number; got bool {value!r}.")
    if isinstance(value, numbers.Real):
        number = float(value)
    elif isinstance(value, (np.ndarray, jax.Array)):
        if np.ndim(value) != 0:
            raise ValueError(
                f"`{name}` must be a scalar; got an array of shape {tuple(value.shape)}."
            )
        dtype = value.dtype
        if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
            raise TypeError(f"`{name}` must be a real number; got dtype {np.dtype(dtype).name}.")
        number = float(value)
    else:
        raise TypeError(f"`{name}` must be a real number; got {type(value).__name__} {value!r}.")
    if not number >= 0:  # also catches NaN
        raise ValueError(f"`{name}` must be a non-negative number; got {number!r}.")
    return number


def _array_paths(tree: PyTree) -> list[tuple[str, jax.Array]]:
    return [
        (where(path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if isinstance(leaf, jax.Array)
    ]


def check_donatable(name: str, tree: PyTree, **others: Any) -> None:
    """Raise `ValueError` if an array of `tree` appears twice in it or in any of `others`.

    Donating such an array would delete a buffer that another part of the call still
    reads; XLA's own error for it does not say where the array is.
    """
    seen: dict[int, str] = {}
    for path, leaf in _array_paths(tree):
        if leaf.is_deleted():
            raise ValueError(
                f"`{name}` cannot be donated: its array at {path} was already deleted "
                "(donated by an earlier call)."
            )
        first = seen.setdefault(id(leaf), path)
        if first != path:
            raise ValueError(
                f"`{name}` cannot be donated: the same array appears at {first} and at {path}; "
                "pass a copy or use `donate=False`."
            )
    for other_name, other in others.items():
        for path, leaf in _array_paths(other):
            if id(leaf) in seen:
                raise ValueError(
                    f"`{name}` cannot be donated: its array at {seen[id(leaf)]} is also "
                    f"`{other_name}` at {path}; pass a copy or use `donate=False`."
                )


def _shared_axis(batches: PyTree, axis: int, missing: str, disagree: str) -> int:
    """The length of axis `axis` shared by every leaf of `batches` (at least one leaf).

    `missing` and `disagree` are the sentences of the two errors, formatted with `path`,
    `leaf` (and `first_path`, `first`, `size`, `first_size` for a disagreement).
    """
    pairs = jax.tree_util.tree_flatten_with_path(batches)[0]
    if not pairs:
        raise ValueError("`batches` must have at least one leaf with a leading micro-batch axis.")
    first_path, first = pairs[0]
    first_size = None
    for path, leaf in pairs:
        if np.ndim(leaf) <= axis:
            raise ValueError(missing.format(path=where(path), leaf=describe_leaf(leaf)))
        size = np.shape(leaf)[axis]
        if first_size is None:
            first_size = size
        elif size != first_size:
            raise ValueError(
                disagree.format(
                    first_path=where(first_path), first_size=first_size, path=where(path), size=size
                )
            )
    return int(np.shape(first)[axis])


def micro_batch_count(batches: PyTree) -> int:
    """The length of the leading (micro-batch) axis shared by every leaf of `batches`."""
    n = _shared_axis(
        batches,
        0,
        "`batches` leaves must have a leading micro-batch axis; at {path} it has a scalar.",
        "`batches` leaves must share the leading micro-batch axis; {first_path} has "
        "{first_size} micro-batches, {path} has {size}.",
    )
    if n == 0:
        raise ValueError("`batches` must hold at least one micro-batch; its leading axis is 0.")
    return n


def examples_per_micro_batch(batches: PyTree) -> int:
    """Axis 1 of every leaf of `batches` (they must agree): the examples in one micro-batch.

    For `microbatch_size=None`; call `micro_batch_count` first (it checks axis 0).
    """
    size = _shared_axis(
        batches,
        1,
        "`microbatch_size` was not given and cannot be read from `batches`: at {path} the "
        "leaf {leaf} has no example axis (axis 1). Pass `microbatch_size=`, the number of "
        "examples in one micro-batch.",
        "`microbatch_size` was not given and `batches` leaves disagree on the examples per "
        "micro-batch (axis 1): {first_path} has {first_size}, {path} has {size}. Pass "
        "`microbatch_size=`.",
    )
    if size == 0:
        raise ValueError("`batches` micro-batches hold no examples: axis 1 of its leaves is 0.")
    return size


def varying_axes(x: Any) -> frozenset[str]:
    """The mesh axes along which `x` varies inside `shard_map` (empty elsewhere)."""
    if not hasattr(x, "dtype"):
        return frozenset()
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def vary_along(x: Any, axes: frozenset[str]) -> Any:
    """`x`, made to vary along `axes` inside `shard_map` where it does not already."""
    missing = axes - varying_axes(x)
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def _axis_names(axis_name: str | tuple[str, ...]) -> frozenset[str]:
    return frozenset((axis_name,) if isinstance(axis_name, str) else axis_name)


def tracks_variance(axis_name: str | tuple[str, ...]) -> bool:
    """Whether JAX's types say what varies along `axis_name`: `shard_map` with `check_vma=True`.

    Read from the type of a zero cast to varying along the axes (the cast is dead code,
    removed by XLA); False outside `shard_map` (a named `vmap`, `pmap`) and with
    `check_vma=False`, where nothing is known.
    """
    names = _axis_names(axis_name)
    if not names <= set(jax.sharding.get_abstract_mesh().manual_axes):
        return False
    probe = jax.lax.pcast(jnp.zeros((), jnp.float32), tuple(sorted(names)), to="varying")
    return names <= varying_axes(probe)


def check_varies(name: str, tree: PyTree, axis_name: str | tuple[str, ...]) -> None:
    """Raise `ValueError` if no leaf of `tree` varies along `axis_name` where JAX tracks it.

    Per-replica gradients vary along the data axis. Inside `shard_map` with
    `check_vma=True`, the gradient with respect to replicated parameters is already the
    sum over the replicas, the same on every one: the noise between the replicas is lost,
    and an estimate of it would be a silent zero. Elsewhere nothing is known: no error.
    """
    leaves = jax.tree.leaves(tree)
    names = _axis_names(axis_name)
    if not leaves or any(names <= varying_axes(x) for x in leaves):
        return
    if not tracks_variance(axis_name):
        return
    raise ValueError(
        f"`{name}` is the same on every replica along {axis_name!r}: inside `shard_map` with "
        "`check_vma=True`, `jax.grad` with respect to replicated parameters already sums "
        "over the replicas, so the noise between them is lost. Differentiate with respect "
        "to `jax.lax.pcast(params, axis_name, to='varying')`."
    )


def check_template_leaves(name: str, tree: PyTree) -> None:
    """Raise `TypeError` at the first leaf that is neither a numeric array nor a template.

    A template is anything with a `shape` and a numeric `dtype` (`jax.ShapeDtypeStruct`).
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_numeric_leaf(leaf):
            continue
        dtype, shape = getattr(leaf, "dtype", None), getattr(leaf, "shape", None)
        if dtype is not None and shape is not None:
            if _dtype_is(dtype, "numeric"):
                continue
            kind = "an array" if isinstance(leaf, (jax.Array, np.ndarray)) else "a template"
            what = f"{kind} of dtype {describe_leaf(leaf)}"
        else:
            what = f"a {type(leaf).__name__}: {leaf!r:.80}"
        raise TypeError(
            f"`{name}` must be a pytree of numeric arrays or `jax.ShapeDtypeStruct`s; at "
            f"{where(path)} it has {what}."
        )


def check_batch_size(name: str, value: Any, dtype: Any = None) -> float:
    """`value` as a positive finite Python float (a number of examples), else raise.

    With `dtype`, the number must also be finite in that dtype (the one the estimates
    are computed in: 1e39 examples is infinite in float32).
    """
    if isinstance(value, (bool, np.bool_)) or isinstance(value, Tracer):
        kind = "a traced value" if isinstance(value, Tracer) else f"bool {value!r}"
        raise TypeError(
            f"`{name}` must be a positive number of examples known at trace time (a Python "
            f"or numpy number); got {kind}."
        )
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a positive number of examples; got {type(value).__name__} {value!r}."
        )
    number = float(value)
    if not (number > 0 and np.isfinite(number)):
        raise ValueError(f"`{name}` must be a positive number of examples; got {value!r}.")
    if dtype is not None and number > float(jnp.finfo(dtype).max):
        raise ValueError(
            f"`{name}` must be a number of examples that {np.dtype(dtype).name} holds (at "
            f"most {float(jnp.finfo(dtype).max):.4g}), the dtype of the estimates; got {value!r}."
        )
    return number


def check_decay(decay: Any) -> Any:
    """`decay` as a Python float in [0, 1), or a 0-d tracer as it is; else raise."""
    if isinstance(decay, Tracer):
        if np.ndim(decay) != 0:
            raise ValueError(f"`decay` must be a scalar; got an array of shape {decay.shape}.")
        return decay
    if isinstance(decay, (np.ndarray, jax.Array)) and np.ndim(decay) == 0:
        decay = decay.item()
    if isinstance(decay, (bool, np.bool_)) or not isinstance(decay, numbers.Real):
        raise TypeError(
            f"`decay` must be a real number in [0, 1); got {type(decay).__name__} {decay!r}."
        )
    number = float(decay)
    if not 0 <= number < 1:  # also catches NaN
        raise ValueError(
            f"`decay` must be in [0, 1) (the weight of the past in the moving average); "
            f"got {decay!r}."
        )
    return number


def checked_call(
    kernel: Any, name: str, grad: PyTree, *args: Any, inexact: bool = False, **static: Any
) -> Any:
    """The front door of a whole-gradient op: `kernel(grad, *args, **static)`, house errors.

    `grad` may be an `nnx.Module` (its Params are used). The kernel is a `jax.jit` function
    that checks its own leaves at trace time (`check_array_leaves` on the traced leaves'
    dtypes), so a repeated eager call with the same tree structure, shapes and dtypes
    costs one compiled dispatch and no Python walk of the leaves. A leaf that `jax.jit`
    itself refuses (a string, an object) is diagnosed after the failure, by the same
    check on the concrete leaves, and reported with its key path; nothing is retried.
    """
    check_axis_name(static.get("axis_name"), optional=True)
    grad = nnx_params(grad)
    try:
        return kernel(grad, *args, **static)
    except (TypeError, ValueError):
        try:
            check_array_leaves(name, grad, inexact=inexact)
        except (TypeError, ValueError) as house:
            raise house from None
        raise
