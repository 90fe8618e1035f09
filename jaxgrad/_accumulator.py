"""Sums of gradients over micro-batches: `GradSum` (a running sum and a count), a scan."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import (
    check_array_leaves,
    check_callable,
    check_casts,
    check_donatable,
    check_same_shapes,
    check_same_structure,
    describe_leaf,
    describe_node,
    first_difference,
    is_traced,
    micro_batch_count,
    nnx_params,
)
from ._donate import moved_to, per_device, placed, replicated, sharding_of, zeros_where
from ._typing import Array, DTypeLike, PyTree

COUNT_MAX = 2**31 - 1
"""Where a `GradSum` count stops: the largest int32 (the count saturates, never wraps)."""


@dataclasses.dataclass(frozen=True)
class GradSum:
    """A running sum of gradients and their count: micro-batch accumulation.

    (jaxgrad's `grad_accumulate` is paysage's sum over the leaves of one gradient; this
    is the other kind of accumulation, over gradients.) Build it with
    `GradSum.zeros_like(params)`, add gradients with `.add(grad)` and read their mean with
    `.mean()`. Sums are kept in float32 (or wider), so bfloat16 and float16 gradients lose
    none of their small contributions, and the mean comes back in the dtypes of the
    parameters. A pytree whose arrays are `total` and `count` (the dtypes of the mean are
    static), with shapes and dtypes that never change as gradients are added: the carry
    of `jax.lax.scan` or `jax.lax.fori_loop`, or an argument donated to a jitted step so
    that the sum is updated in place. Each sum lives where its leaf of the parameters
    lives (with its sharding), so adding and averaging never move data between devices.

    Attributes:
        total: the sum of the gradients added, with the structure of the parameters, each
            leaf in float32 (or wider: float64 and complex leaves keep their dtype).
        count: how many gradients were added (0-d int32), exact up to 2**31 - 2. It
            saturates at 2**31 - 1 rather than wrapping: a sum whose count has reached
            that bound no longer knows how many gradients it holds, and its `mean` is NaN.
        dtypes: the dtype of each leaf of the parameters, in `jax.tree.leaves` order.

    Example:
        >>> params = {"w": jnp.zeros(2, jnp.bfloat16)}
        >>> total = jaxgrad.GradSum.zeros_like(params)
        >>> total.total, total.count
        ({'w': Array([0., 0.], dtype=float32)}, Array(0, dtype=int32))
        >>> for g in [jnp.array([1.0, 2.0], jnp.bfloat16), jnp.array([2.0, 3.0], jnp.bfloat16)]:
        ...     total = total.add({"w": g})
        >>> total.mean()
        {'w': Array([1.5, 2.5], dtype=bfloat16)}
    """

    total: PyTree
    count: Array
    dtypes: tuple[Any, ...]

    @classmethod
    def zeros_like(cls, like: PyTree, *, dtype: DTypeLike = jnp.float32) -> GradSum:
        """An empty sum for gradients shaped like `like`: zero sums, count 0.

        Sums are kept in `dtype` (float32 by default) or the leaf's own dtype if wider;
        the sum costs one `dtype` copy of the gradient.

        Args:
            like: a `Gradient`, any pytree of floating-point arrays, or of
                `jax.ShapeDtypeStruct` (`jax.eval_shape` output): usually the parameters.
                An `nnx.Module` stands for its `nnx.Param` state (what `nnx.grad` returns).
            dtype: the least precision to accumulate in; a floating-point dtype.

        Returns:
            A `GradSum`.

        Raises:
            ValueError: if `dtype` is not a floating-point dtype.
            TypeError: if a leaf of `like` is not a floating-point or complex array (an
                integer counter, a PRNG key, a string...); the message names its key path.

        Example:
            >>> jaxgrad.GradSum.zeros_like([jnp.zeros(2)]).total
            [Array([0., 0.], dtype=float32)]
        """
        return _new("like", nnx_params(like), dtype)

    def add(self, grad: PyTree, *, donate: bool = False) -> GradSum:
        """This sum plus one gradient: `total + grad` (in the sum dtype), `count + 1`.

        Works eagerly (one compiled dispatch), under `jax.jit` and as the body of
        `jax.lax.scan`; the new sum has the shapes and dtypes of the old one. With
        `donate=True` an eager call reuses the buffers of this sum for the new one (JAX
        buffer donation), so no second copy is made; this sum is consumed (its arrays are
        deleted). Inside `jax.jit` donation is the outer function's business
        (`donate_argnums`), so there `donate` changes nothing. Sums on different devices
        are added by one compiled call per device set (a leaf of `grad` on another device
        than its sum is moved to it).

        Args:
            grad: a gradient with the structure and leaf shapes of the parameters; any
                floating-point dtypes (cast to the sum dtype). An `nnx.Module` stands for
                its `nnx.Param` state.
            donate: reuse (and delete) the buffers of this sum.

        Returns:
            The new `GradSum`.

        Raises:
            TypeError: if a leaf of `grad` is not a floating-point or complex array, or
                is complex where the sum is real (the cast would drop its imaginary
                part; the message names its key path).
            ValueError: if the structure or a leaf shape of `grad` differs from the sum's
                (the message names the first differing key path), or, with
                `donate=True`, if an array of this sum also appears in `grad`.

        Example:
            >>> total = jaxgrad.GradSum.zeros_like([jnp.zeros(2)])
            >>> total = total.add([jnp.array([1.0, 2.0])], donate=True)
            >>> total.total, total.count
            ([Array([1., 2.], dtype=float32)], Array(1, dtype=int32))
        """
        return _add_checked(self, grad, donate)

    def mean(self) -> PyTree:
        """The mean of the gradients added, in the dtypes of the parameters.

        The division is done in the sum dtype (float32 or wider) and the result cast
        back to each leaf's dtype, so a bfloat16 model gets a bfloat16 gradient. A sum
        with nothing added gives zeros (not NaN); a sum whose count has saturated at
        2**31 - 1 gives NaN (the number of gradients is no longer known). Works eagerly
        (one compiled dispatch) and under `jax.jit`; each mean lives where its sum does.

        Returns:
            A pytree with the structure and shapes of the parameters and their dtypes.

        Example:
            >>> total = jaxgrad.GradSum.zeros_like({"w": jnp.zeros(1)})
            >>> total.mean()
            {'w': Array([0.], dtype=float32)}
            >>> total.add({"w": jnp.array([3.0])}).add({"w": jnp.array([4.0])}).mean()
            {'w': Array([3.5], dtype=float32)}
        """
        return _mean_checked(self)


jax.tree_util.register_dataclass(GradSum, data_fields=["total", "count"], meta_fields=["dtypes"])


def _check_like(name: str, like: PyTree) -> None:
    """The house error for a template leaf that is not floating-point (shape-only leaves pass)."""

    def arrays(x: Any) -> Any:
        inexact = isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact)
        return None if inexact else x

    check_array_leaves(name, jax.tree.map(arrays, like), inexact=True)


def _new(name: str, like: PyTree, dtype: DTypeLike) -> GradSum:
    """`GradSum.zeros_like(like, dtype=dtype)`, its errors naming the argument `name`."""
    if not jnp.issubdtype(np.dtype(dtype), jnp.floating):
        raise ValueError(
            f"`dtype` must be a floating-point dtype to accumulate in; got {np.dtype(dtype).name}."
        )
    _check_like(name, like)
    leaves, treedef = jax.tree.flatten(like)
    dtypes = tuple(np.dtype(x.dtype if hasattr(x, "dtype") else jnp.result_type(x)) for x in leaves)
    with jax.numpy_dtype_promotion("standard"):
        sums = [np.dtype(jnp.promote_types(d, dtype)) for d in dtypes]
    zeros = zeros_where(leaves, sums)
    count = jnp.zeros((), jnp.int32)
    if not is_traced(like) and placed(leaves):  # the count goes with the first placed leaf
        first = next(s for s in map(sharding_of, leaves) if s is not None)
        count = jnp.zeros((), jnp.int32, device=replicated(first))
    return GradSum(total=jax.tree.unflatten(treedef, zeros), count=count, dtypes=dtypes)


def _next_count(count: Array) -> Array:
    """`count + 1`, saturating at `COUNT_MAX` (an int32 would wrap to a negative count)."""
    return count + (count < COUNT_MAX).astype(count.dtype)


def _sum(total: PyTree, grad: PyTree) -> PyTree:
    return jax.tree.map(lambda s, g: s + jnp.asarray(g).astype(s.dtype), total, grad)


def _added(state: GradSum, grad: PyTree) -> GradSum:
    return GradSum(
        total=_sum(state.total, grad), count=_next_count(state.count), dtypes=state.dtypes
    )


def _add(total: PyTree, count: Array | None, grad: PyTree) -> tuple[PyTree, Array | None]:
    """The compiled kernel: the sums of one set of devices, and the count if it is given."""
    return _sum(total, grad), None if count is None else _next_count(count)


_add_compiled = jax.jit(_add)
_add_donated = jax.jit(_add, donate_argnames=("total", "count"))


def _count_next_to(count: Array, total: PyTree) -> Array:
    """The count on the devices of the first sum of `total` (where it is already, usually)."""
    if jax.device_count() == 1:
        return count
    first = jax.tree.leaves(total)[:1]
    return moved_to(count, first[0]) if first else count


def _add_in_place(kernel: Callable[..., Any], state: GradSum, grad: PyTree) -> GradSum:
    """`kernel(state.total, state.count, grad)`, once per set of devices the sums live on.

    The count goes with the first call (moved next to the first sum if it lives
    elsewhere); the other calls get `None` for it.
    """
    counts: list[Any] = []

    def add(total: PyTree, grad: PyTree) -> PyTree:
        count = None if counts else _count_next_to(state.count, total)
        total, new = kernel(total, count, grad)
        counts.append(new)
        return total

    total = per_device(add, state.total, grad)
    return GradSum(total=total, count=counts[0], dtypes=state.dtypes)


def _check_state(state: Any) -> None:
    if not isinstance(state, GradSum):
        raise TypeError(
            f"`state` must be a `GradSum` (from `GradSum.zeros_like`); got {type(state).__name__}."
        )


def _add_checked(state: GradSum, grad: PyTree, donate: bool) -> GradSum:
    """`GradSum.add`: the checks in front, then one compiled call per device set."""
    _check_state(state)
    grad = nnx_params(grad)
    check_same_structure("state.total", state.total, "grad", grad)
    check_array_leaves("grad", grad, inexact=True)
    check_same_shapes("state.total", state.total, "grad", grad)
    check_casts("grad", grad, "state.total", state.total)
    if is_traced((state, grad)):
        return _added(state, grad)
    if donate:
        check_donatable("state", state, grad=grad)
    return _add_in_place(_add_donated if donate else _add_compiled, state, grad)


def wide_mean(state: GradSum) -> PyTree:
    """The mean of the gradients added, in the sum dtypes (float32 or wider).

    Zeros when nothing was added; NaN once the count has saturated at `COUNT_MAX`.
    """
    count = state.count

    def mean(s: Array) -> Array:
        n = jnp.maximum(count, 1).astype(s.dtype)
        return jnp.where(count < COUNT_MAX, s / n, jnp.nan)

    return jax.tree.map(mean, state.total)


def narrow(wide: PyTree, dtypes: tuple[Any, ...]) -> PyTree:
    """Each leaf of `wide` cast to its dtype in `dtypes` (`jax.tree.leaves` order)."""
    leaves, treedef = jax.tree.flatten(wide)
    return jax.tree.unflatten(treedef, [x.astype(d) for x, d in zip(leaves, dtypes, strict=True)])


@functools.partial(jax.jit, static_argnames=("dtypes",))
def _mean(total: PyTree, count: Array, dtypes: tuple[Any, ...]) -> PyTree:
    return narrow(wide_mean(GradSum(total=total, count=count, dtypes=dtypes)), dtypes)


def _mean_checked(state: GradSum) -> PyTree:
    """`GradSum.mean`: one compiled call per device set, each mean where its sum is."""
    _check_state(state)
    dtypes = jax.tree.unflatten(jax.tree.structure(state.total), list(state.dtypes))

    def mean(total: PyTree, dtypes: PyTree) -> PyTree:
        count = _count_next_to(state.count, total)
        return _mean(total, count, dtypes=tuple(jax.tree.leaves(dtypes)))

    return per_device(mean, state.total, dtypes)


def _pair(out: Any) -> bool:
    return type(out) in (tuple, list) and len(out) == 2


def gradient_of(out: Any, has_aux: bool, like: PyTree) -> tuple[PyTree, Any]:
    """`(grad, aux)` from what `grad_fn` returned, checked against the parameters `like`.

    The one check of a `grad_fn` result for every micro-batch function: a pair with
    `has_aux=True`, then a gradient with the structure, shapes and floating dtypes of
    `like`; a mismatch that looks like a known mistake (a `(grad, aux)` pair without
    `has_aux`, a `(value, grad)` pair as `jax.value_and_grad` returns) says so.
    """
    if has_aux:
        if not _pair(out):
            raise TypeError(
                "`grad_fn` must return a pair `(grad, aux)` when `has_aux=True`, as "
                f"`jax.grad(loss, has_aux=True)` does; it returned {describe_node(out)}."
            )
        (grad, aux), name = out, "grad_fn(params, batch)[0]"
    else:
        grad, aux, name = out, None, "grad_fn(params, batch)"
    if grad is None:
        raise TypeError(
            f"`grad_fn` must return the gradient, with the structure of `params`; `{name}` is None."
        )
    if first_difference(like, grad) is not None:
        if _pair(out) and first_difference(like, out[1]) is None:
            raise ValueError(
                "`grad_fn` returned a pair whose second entry has the structure of `params`, "
                "as `jax.value_and_grad` and `nnx.value_and_grad` return `(value, grad)`; "
                "`grad_fn` must return the gradient (`jax.grad`, `nnx.grad`), or "
                "`(grad, aux)` with `has_aux=True`."
            )
        if not has_aux and _pair(out) and first_difference(like, out[0]) is None:
            raise ValueError(
                "`grad_fn` returned a pair whose first entry has the structure of `params`; "
                "if it is `(grad, aux)`, pass `has_aux=True`."
            )
        check_same_structure("params", like, name, grad)
    check_array_leaves(name, grad, inexact=True)
    check_same_shapes("params", like, name, grad)
    return grad, aux


def call_grad_fn(grad_fn: Callable[[Any, PyTree], Any], params: Any, batch: PyTree) -> Any:
    """`grad_fn(params, batch)` on one micro-batch; an error it raises gets a note on `batches`.

    A batch passed without the micro-batch axis fails deep inside the model (a shape
    error about some layer); the note (Python 3.11+: `BaseException.add_note`) says
    what `grad_fn` was given and how `batches` must be laid out. The error itself is
    re-raised unchanged: this diagnoses a failure, it never retries.
    """
    try:
        return grad_fn(params, batch)
    except Exception as error:
        add_note = getattr(error, "add_note", None)  # Python 3.11+
        if add_note is not None:
            shapes = jax.tree.map(describe_leaf, batch)
            add_note(
                "jaxgrad: this error came from `grad_fn` called on one micro-batch, "
                f"`batches` without its leading micro-batch axis: {shapes}. If `batches` is "
                "a single batch, stack its micro-batches along a new leading axis first, "
                "e.g. `x.reshape(4, -1, *x.shape[1:])` for 4 micro-batches."
            )
        raise


Fold = Callable[[Any, PyTree], Any]


def scan_gradients(
    grad_fn: Callable[[Any, PyTree], Any],
    params: Any,
    batches: PyTree,
    init: GradSum,
    *,
    has_aux: bool,
    fold: Fold | None = None,
    carry: Any = None,
) -> tuple[GradSum, Any, Any]:
    """The micro-batch scan: `init` plus `grad_fn(params, batch)` for every micro-batch.

    The one scan of every micro-batch function. Each micro-batch's gradient is checked
    (`gradient_of`), added to the sum, and given to `fold(carry, grad) -> carry`, which
    keeps anything else per micro-batch (the noise scale's squared norms). An
    `nnx.Module` as `params` is split: `grad_fn` gets a module rebuilt in the body from
    the same parameters and the carried non-`Param` state, which is written back into
    `params` at the end. Returns `(sum, carry, stacked aux)`.
    """
    like = nnx_params(params)
    if like is not params:
        return _module_scan(grad_fn, params, batches, init, has_aux, fold, carry)

    def body(state: tuple[GradSum, Any], batch: PyTree) -> tuple[Any, Any]:
        total, extra = state
        grad, aux = gradient_of(call_grad_fn(grad_fn, params, batch), has_aux, params)
        if fold is not None:
            extra = fold(extra, grad)
        return (_added(total, grad), extra), aux

    (total, extra), aux = jax.lax.scan(body, (init, carry), batches)
    return total, extra, aux


def _module_scan(
    grad_fn: Callable[[Any, PyTree], Any],
    module: Any,
    batches: PyTree,
    init: GradSum,
    has_aux: bool,
    fold: Fold | None,
    carry: Any,
) -> tuple[GradSum, Any, Any]:
    """`scan_gradients` for an `nnx.Module`: its other state in the carry."""
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def body(state: tuple[GradSum, Any, Any], batch: PyTree) -> tuple[Any, Any]:
        total, extra, rest = state
        # A module of variables made in this trace, which grad_fn may use and mutate (nnx
        # refuses variables made outside a scan body inside it); `rest` is new already.
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x, params), rest)
        grad, aux = gradient_of(call_grad_fn(grad_fn, model, batch), has_aux, params)
        after = nnx.split(model, nnx.Param, ...)[2]
        diff = first_difference(rest, after)
        if diff is not None:
            path, before_has, after_has = diff
            raise ValueError(
                "`grad_fn` must not add or remove variables of the module: its "
                "non-`Param` state is carried from one micro-batch to the next. At "
                f"{path} the state had {before_has} and has {after_has} after `grad_fn`."
            )
        if fold is not None:
            extra = fold(extra, grad)
        return (_added(total, grad), extra, after), aux

    (total, extra, rest), aux = jax.lax.scan(body, (init, carry, rest), batches)
    nnx.update(module, rest)
    return total, extra, aux


def grad_microbatch_mean(
    grad_fn: Callable[[Any, PyTree], Any],
    params: Any,
    batches: PyTree,
    *,
    has_aux: bool = False,
    dtype: DTypeLike = jnp.float32,
) -> Any:
    """The mean of `grad_fn(params, batch)` over micro-batches, one at a time under `lax.scan`.

    `batches` is a pytree whose leaves all have a leading micro-batch axis:
    `batches[i]` (leaf by leaf) is the i-th micro-batch. The scan carries a
    `GradSum.zeros_like(params, dtype=dtype)`, so memory holds one micro-batch's
    gradient and activations plus one float32 copy of the gradient, however many
    micro-batches there are; bfloat16 and float16 gradients are summed in float32 and
    the mean returned in the dtypes of `params`. When the loss is a mean over examples
    and the micro-batches are the same size, the result is the full-batch gradient.

    `grad_fn` is traced once by `jax.lax.scan` (it must be a pure JAX function, as for
    any scan body); it is not otherwise compiled or cached by jaxgrad. Eagerly, the scan
    is traced and compiled at every call: put the whole step under `jax.jit` (`nnx.jit`
    for a module).

    A Flax `nnx.Module` as `params` gives what an unrolled loop of
    `nnx.grad(loss)(model, batch)` calls gives: `grad_fn(model, batch)` gets a copy of the
    module with the same parameters and with the current non-`Param` state (batch
    statistics, RNG counts, ...), which the scan carries from one micro-batch to the
    next, so BatchNorm statistics and dropout RNG streams advance once per micro-batch.
    At the end that state is written back into `params` in place, as `nnx.jit` does;
    the result is an `nnx.State` of `nnx.Param`s, as `nnx.grad` returns. `grad_fn` must
    not add or remove variables (no `sow`); changes it makes to `nnx.Param` variables
    are discarded. Call it eagerly or under `nnx.jit` (under `jax.jit` the write-back,
    as any nnx update, stays inside the trace).

    Args:
        grad_fn: `(params, batch) -> grad` with the structure of `params` (for a
            module, `(model, batch) -> grad` for its `nnx.Param`s, e.g.
            `nnx.grad(loss)`), or with `has_aux=True`, `(params, batch) -> (grad, aux)`
            as `jax.grad(loss, has_aux=True)` returns.
        params: the parameters, passed unchanged to every call; or an `nnx.Module`.
        batches: a pytree of arrays with a common leading micro-batch axis.
        has_aux: whether `grad_fn` returns `(grad, aux)`; the `aux` values are stacked
            along a new leading axis, one entry per micro-batch.
        dtype: the least precision to accumulate in (see `GradSum.zeros_like`).

    Returns:
        The mean gradient, with the structure, shapes and dtypes of `params` (of its
        `nnx.Param` state for a module); with `has_aux=True`, `(mean gradient,
        stacked aux)`.

    Raises:
        TypeError: if `grad_fn` is not callable; if a leaf of `params` is not a
            floating-point array (for a module, of its `nnx.Param` state); or if
            `grad_fn` returns `None`, a gradient with a leaf that is not floating-point,
            or, with `has_aux=True`, anything but a pair `(grad, aux)`.
        ValueError: if `batches` has no leaves, a scalar leaf, leaves whose leading axes
            differ, or zero micro-batches; if `grad_fn` returns a gradient whose
            structure or shapes differ from those of `params` (the message names the
            first differing key path, or says that a pair looks like `(value, grad)`
            from `jax.value_and_grad`, or like `(grad, aux)` without `has_aux=True`);
            or if it adds or removes module variables. An error raised inside
            `grad_fn` is re-raised with a note on the micro-batch it was given (a batch
            without the micro-batch axis fails there).

    Example:
        >>> loss = lambda w, batch: jnp.mean((batch["x"] * w - batch["y"]) ** 2)
        >>> x = jnp.arange(8.0)
        >>> batches = {"x": x.reshape(4, 2), "y": (3 * x).reshape(4, 2)}
        >>> w = jnp.array(1.0)
        >>> jaxgrad.grad_microbatch_mean(jax.grad(loss), w, batches)
        Array(-70., dtype=float32)
        >>> float(jax.grad(loss)(w, {"x": x, "y": 3 * x}))  # the full-batch gradient
        -70.0

        A Flax model in training mode, 4 micro-batches of 8 examples:

        >>> from flax import nnx
        >>> model = nnx.Sequential(
        ...     nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
        ...     nnx.BatchNorm(4, rngs=nnx.Rngs(0)),
        ...     nnx.Dropout(0.5, rngs=nnx.Rngs(1)),
        ... )
        >>> def loss(model, x):
        ...     return jnp.mean(model(x) ** 2)
        >>> @nnx.jit
        ... def mean_grad(model, xs):
        ...     return jaxgrad.grad_microbatch_mean(nnx.grad(loss), model, xs)
        >>> grads = mean_grad(model, jax.random.normal(jax.random.key(2), (4, 8, 3)))
        >>> type(grads).__name__, grads["layers"][0]["kernel"].shape
        ('State', (3, 4))
        >>> int(model.layers[2].rngs.count[...])  # one dropout draw per micro-batch
        4
        >>> bool(jnp.any(model.layers[1].mean[...] != 0))  # BatchNorm statistics moved
        True
    """
    check_callable("grad_fn", grad_fn)
    micro_batch_count(batches)
    init = _new("params", nnx_params(params), dtype)
    state, _, aux = scan_gradients(grad_fn, params, batches, init, has_aux=has_aux)
    mean = GradSum.mean(state)
    return (mean, aux) if has_aux else mean
