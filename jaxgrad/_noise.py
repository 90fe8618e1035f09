"""The gradient noise scale B_simple (McCandlish et al., 2018) from micro-batches or replicas.

Where jaxgrad sums gradients it sees two batch sizes at once: the small batch (one
micro-batch, or one replica's part of the batch) and the big one (their mean). The
squared norms at the two sizes give unbiased per-step estimates of `|G|^2` and
`tr(Sigma)`; an exponential moving average of each, then their ratio, is `B_simple`.
The formulas, the usage and the citation are on one page: docs/noise_scale.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._accumulator import (
    GradSum,
    call_grad_fn,
    gradient_of,
    narrow,
    scan_gradients,
    wide_mean,
)
from ._checks import (
    check_array_leaves,
    check_axis_name,
    check_batch_size,
    check_callable,
    check_decay,
    check_varies,
    examples_per_micro_batch,
    micro_batch_count,
    nnx_params,
    vary_along,
    varying_axes,
)
from ._collectives import pmean_wide
from ._naming import By, Groups, logger_dict, resolve_groups
from ._numerics import (
    AxisName,
    Segments,
    accumulation_dtype,
    axis_size,
    reduce_tree,
)
from ._typing import Array, ArrayLike, DTypeLike, PyTree

# -- the pytrees -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NoiseScale:
    """One step's unbiased estimates of `|G|^2` and `tr(Sigma)`, overall and per group.

    What `grad_microbatch_noise` and `grad_pmean_noise` return beside the mean gradient,
    and what `noise_scale_update` smooths. Entry 0 is the whole gradient (name `""`),
    entries 1 onwards the groups chosen by `by` (the names of `grad_stats`). `Sigma` is
    the covariance of the gradient of a single example, so `tr(Sigma) / |G|^2` is a
    number of examples. Each estimate is a difference of two squared norms and is often
    negative on a single step when the noise (or the signal) is small: smooth before
    dividing (`noise_scale_update`). A pytree (the names are static): it can be
    returned from `jax.jit`, stacked by `jax.lax.scan` and passed to an optax
    transformation (`jaxgrad.optax.track_noise_scale`).

    Attributes:
        grad_sq: the estimate of `|G|^2`, the squared norm of the true (whole-data)
            gradient, per group; float32 (float64 under x64).
        trace_cov: the estimate of `tr(Sigma)`, the summed variance of the per-example
            gradient, per group.
        names: the static group names; `names[0] == ""` is the whole gradient.

    Example:
        >>> noise = jaxgrad.NoiseScale(jnp.array([4.0]), jnp.array([32.0]), ("",))
        >>> noise.as_dict(prefix="noise/")
        {'noise/grad_sq': 4.0, 'noise/trace_cov': 32.0}
    """

    grad_sq: Array
    trace_cov: Array
    names: tuple[str, ...]

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """A flat `{key: value}` dict for a logger, read from the device in one transfer.

        Keys are `<prefix><field>` for the whole gradient and `<prefix><field>/<group>`
        for each group; values are Python numbers, or numpy arrays for estimates stacked
        by `jax.lax.scan`. Call it outside `jax.jit`.

        Args:
            prefix: prepended to every key, e.g. `"noise/"`.

        Returns:
            A dict from `str` to numbers or numpy arrays.

        Raises:
            TypeError: if called on traced values (inside `jax.jit`).

        Example:
            >>> noise = jaxgrad.NoiseScale(jnp.array([4.0, 1.0]), jnp.array([32.0, 8.0]), ("", "w"))
            >>> noise.as_dict()
            {'grad_sq': 4.0, 'grad_sq/w': 1.0, 'trace_cov': 32.0, 'trace_cov/w': 8.0}
        """
        arrays = {"grad_sq": self.grad_sq, "trace_cov": self.trace_cov}
        return logger_dict("NoiseScale", arrays, self.names, prefix)


jax.tree_util.register_dataclass(
    NoiseScale, data_fields=["grad_sq", "trace_cov"], meta_fields=["names"]
)


@dataclasses.dataclass(frozen=True)
class NoiseScaleState:
    """Smoothed noise-scale estimates: EMAs of `|G|^2` and `tr(Sigma)`, and `B_simple`.

    Built by `noise_scale_init`, advanced by `noise_scale_update`. Its shapes and dtypes
    never change, so it can be a `jax.lax.scan` carry or (through
    `jaxgrad.optax.track_noise_scale`) an optax state. The averages are
    bias-corrected (the first step gives the first estimate itself, as optax's
    `ema(debias=True)`), and `b_simple` is the ratio of the two averages, not an
    average of ratios: see docs/noise_scale.md.

    Attributes:
        grad_sq: the moving average of the `|G|^2` estimates, per group.
        trace_cov: the moving average of the `tr(Sigma)` estimates, per group.
        b_simple: `max(trace_cov, 0) / grad_sq` per group: the simple noise scale, a
            number of examples; NaN while `grad_sq` is not positive (before the first
            step, or while the signal is below the noise of its own estimate).
        count: the number of steps averaged (0-d int32); steps whose estimates were not
            finite are skipped. It saturates at 2**31 - 1 (the weights are then
            `1 - decay` for good, as they were long before), never wraps.
        names: the static group names; `names[0] == ""` is the whole gradient.

    Example:
        >>> state = jaxgrad.noise_scale_init({"w": jnp.zeros(3)})
        >>> noise = jaxgrad.NoiseScale(jnp.array([4.0]), jnp.array([32.0]), ("",))
        >>> jaxgrad.noise_scale_update(state, noise, decay=0.9).as_dict()
        {'grad_sq': 4.0, 'trace_cov': 32.0, 'b_simple': 8.0}
    """

    grad_sq: Array
    trace_cov: Array
    b_simple: Array
    count: Array
    names: tuple[str, ...]

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """A flat `{key: value}` dict for a logger: `grad_sq`, `trace_cov`, `b_simple`.

        Keys are `<prefix><field>` for the whole gradient and `<prefix><field>/<group>`
        for each group, read from the device in one transfer; call it outside `jax.jit`.

        Args:
            prefix: prepended to every key, e.g. `"noise/"`.

        Returns:
            A dict from `str` to numbers (numpy arrays for stacked states).

        Raises:
            TypeError: if called on traced values (inside `jax.jit`).

        Example:
            >>> jaxgrad.noise_scale_init({"w": jnp.zeros(2)}).as_dict(prefix="noise/")
            {'noise/grad_sq': 0.0, 'noise/trace_cov': 0.0, 'noise/b_simple': nan}
        """
        arrays = {"grad_sq": self.grad_sq, "trace_cov": self.trace_cov, "b_simple": self.b_simple}
        return logger_dict("NoiseScaleState", arrays, self.names, prefix)


jax.tree_util.register_dataclass(
    NoiseScaleState,
    data_fields=["grad_sq", "trace_cov", "b_simple", "count"],
    meta_fields=["names"],
)


# -- argument checks ---------------------------------------------------------------------


def _undefined(what: str, small: float, hint: str) -> ValueError:
    return ValueError(
        f"{what}: the small and the big batch coincide (B_small = B_big = {small:g} "
        f"examples), so the gradient noise scale is undefined. {hint}"
    )


# -- the estimates -----------------------------------------------------------------------


def _segments(groups: Groups, leaves: int) -> list[Segments]:
    """The whole gradient, then the user's groups (if any)."""
    out = [Segments.whole(leaves)]
    if groups:
        out.append(Segments.from_groups(groups, leaves))
    return out


def squared_norms(leaves: Sequence[Array], segments: Sequence[Segments], acc: np.dtype) -> Array:
    """Squared L2 norms of the leaves per segment group, concatenated: one read of the leaves.

    `segments[0]` is the whole gradient. The norms are those of the packed reduction
    (exact for every finite input; squared, they overflow only where the square of the
    norm is beyond the dtype's range).
    """
    count = sum(seg.groups for seg in segments)
    if not leaves:
        return jnp.zeros(count, acc)
    found = reduce_tree(leaves, segments[1:])
    return jnp.concatenate([(n * n).astype(acc) for n in found.norms()])


def estimates(
    small_sq: Array, big_sq: Array, b_small: float, count: int, names: tuple[str, ...]
) -> NoiseScale:
    """The unbiased estimates from the mean squared norm at `b_small` and at `count * b_small`.

    With `E|G_B|^2 = |G|^2 + tr(Sigma) / B` at both sizes (`b_big = count * b_small`), the
    two linear equations give `|G|^2 = (b_big |G_big|^2 - b_small |G_small|^2) / (b_big -
    b_small)` and `tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)`.
    Written with the ratio `count`, the coefficients are `count / (count - 1)`,
    `1 / (count - 1)` and `b_small * count / (count - 1)`: none overflows for a batch
    size the estimates' dtype holds (`check_batch_size` with that dtype).
    """
    ratio = count / (count - 1)
    grad_sq = ratio * big_sq - small_sq / (count - 1)
    trace_cov = ((small_sq - big_sq) * b_small) * ratio
    return NoiseScale(grad_sq=grad_sq, trace_cov=trace_cov, names=names)


def grad_microbatch_noise(
    grad_fn: Callable[[PyTree, PyTree], Any],
    params: PyTree,
    batches: PyTree,
    *,
    microbatch_size: float | None = None,
    by: By = None,
    axis_name: AxisName = None,
    has_aux: bool = False,
    dtype: DTypeLike = jnp.float32,
) -> tuple[Any, NoiseScale]:
    """Mean gradient over micro-batches, and the step's noise-scale estimates, in one scan.

    The mean is that of `grad_microbatch_mean` (a float32 running sum under
    `jax.lax.scan`, returned in the dtypes of `params`); beside the sum the scan carries
    one small float32 vector, the running sum of each micro-batch gradient's squared
    norm (overall, and per group with `by`). After the scan, the squared norm of the
    mean and these sums give the unbiased estimates of `|G|^2` and `tr(Sigma)` with
    `B_small` = one micro-batch and `B_big` = all of them (see docs/noise_scale.md).
    Smooth them over steps with `noise_scale_update`.

    With `axis_name`, inside `shard_map` or `pmap` where each replica holds its own
    micro-batches, the sum and the squared norms are added over the replicas in one
    `psum` (16-bit leaves summed in float32): the mean is the gradient of the whole
    global batch, and `B_big` is every micro-batch on every replica. Differentiate with
    respect to per-replica parameters (`jax.lax.pcast(params, axis_name,
    to="varying")` with `check_vma=True`), as for `grad_pmean`.

    Args:
        grad_fn: `(params, batch) -> grad` with the structure of `params`, or with
            `has_aux=True`, `(params, batch) -> (grad, aux)`. Each micro-batch gradient
            must be the mean over its examples (a mean loss), as in the paper.
        params: the parameters, passed unchanged to every call.
        batches: a pytree of arrays with a common leading micro-batch axis.
        microbatch_size: the number of examples in one micro-batch (`B_small`); by
            default axis 1 of the leaves of `batches`, which must then agree. Pass it
            when examples are counted otherwise (tokens, or a batch without an example
            axis).
        by: per-group estimates as in `grad_stats` (`"leaf"`, `"group"`, a callable
            `(path, leaf) -> str | None`), or `None` for the whole gradient only; the
            groups are read from `params`.
        axis_name: the mesh axis name (or tuple of names) of the data-parallel replicas
            to average over, or `None`.
        has_aux: whether `grad_fn` returns `(grad, aux)`; the `aux` values are stacked
            along a new leading axis, one entry per micro-batch.
        dtype: the least precision to sum the gradients in (see `GradSum.zeros_like`).

    Returns:
        `(mean, noise)`: the mean gradient with the structure, shapes and dtypes of
        `params` (with `has_aux=True`, `(mean, stacked aux)`), and a `NoiseScale`.

    Raises:
        TypeError: if `grad_fn` is not callable, `axis_name` or `microbatch_size` has
            the wrong type, `by` is not a valid grouping, or a leaf of `params` is not
            floating-point.
        ValueError: if `batches` has no leaves, a scalar leaf or leading axes that
            differ; if there is a single micro-batch (and no other replica), where the
            estimate is undefined; if `microbatch_size` is not given and cannot be read
            from axis 1 of `batches`, or is more than the estimates' dtype holds
            (1e39 in float32); if `grad_fn` returns a gradient whose structure or shapes
            differ from those of `params` (the checks of `grad_microbatch_mean`); or
            if, inside `shard_map` with `check_vma=True`, the gradients do not vary
            along `axis_name` (`jax.grad` of replicated parameters, already summed).

    Example:
        >>> loss = lambda w, batch: jnp.mean((batch["x"] * w - batch["y"]) ** 2) / 2
        >>> x = jnp.array([[1.0, -1.0], [2.0, 0.0]])  # 2 micro-batches of 2 examples
        >>> batches = {"x": x, "y": jnp.zeros_like(x)}
        >>> mean, noise = jaxgrad.grad_microbatch_noise(jax.grad(loss), jnp.array(1.0), batches)
        >>> mean
        Array(1.5, dtype=float32)
        >>> noise.as_dict()  # |G|^2 = (4 * 1.5**2 - 2 * 2.5) / 2, tr(Sigma) = 4 * (2.5 - 1.5**2)
        {'grad_sq': 2.0, 'trace_cov': 1.0}
    """
    check_callable("grad_fn", grad_fn)
    check_axis_name(axis_name, optional=True)
    micro = micro_batch_count(batches)
    init = GradSum.zeros_like(params, dtype=dtype)
    leaves_of = jax.tree.leaves(init.total)
    acc = accumulation_dtype([*(x.dtype for x in leaves_of), np.dtype(dtype)])
    b_small = (
        float(examples_per_micro_batch(batches))
        if microbatch_size is None
        else check_batch_size("microbatch_size", microbatch_size, acc)
    )
    replicas = axis_size(axis_name)
    if micro * replicas == 1:
        raise _undefined(
            "`batches` holds a single micro-batch"
            + ("" if axis_name is None else f" on a single replica along {axis_name!r}"),
            b_small,
            "Split the batch into at least 2 micro-batches (or use `grad_microbatch_mean` "
            "where no estimate is wanted).",
        )
    groups = resolve_groups(params, by)
    segments = _segments(groups, len(leaves_of))
    names = ("", *(name for name, _ in groups))
    sq_init = jnp.zeros(len(names), acc)
    if axis_name is not None or any(varying_axes(x) for x in jax.tree.leaves((params, batches))):
        init, sq_init = _varying_like_grads(
            grad_fn, params, batches, has_aux, init, sq_init, axis_name
        )

    def fold(sq: Array, grad: PyTree) -> Array:
        leaves = [jnp.asarray(x) for x in jax.tree.leaves(grad)]
        return sq + squared_norms(leaves, segments, acc)

    state, sq, aux = scan_gradients(
        grad_fn, params, batches, init, has_aux=has_aux, fold=fold, carry=sq_init
    )
    count = micro * replicas
    if axis_name is not None:  # one all-reduce: the replicas' mean sums, and the squares
        total, sq = pmean_wide(state.total, axis_name, sq)
        state = dataclasses.replace(state, total=total)
    wide = wide_mean(state)
    big = squared_norms(jax.tree.leaves(wide), segments, acc)
    noise = estimates(sq / count, big, b_small, count, names)
    mean = narrow(wide, state.dtypes)
    return ((mean, aux) if has_aux else mean), noise


def _varying_like_grads(
    grad_fn: Callable[[PyTree, PyTree], Any],
    params: PyTree,
    batches: PyTree,
    has_aux: bool,
    init: GradSum,
    sq: Array,
    axis_name: AxisName,
) -> tuple[GradSum, Array]:
    """The scan's initial carry, varying along the mesh axes that the gradients vary along.

    Inside `shard_map` (`check_vma=True`) a carry must keep its type: zeros are the same
    on every device, while per-replica gradients vary, so the zeros are cast to the
    gradients' variance (read from an abstract evaluation of `grad_fn`; nothing runs).
    Gradients that do not vary along `axis_name` while the batches do were already
    summed over the replicas by `jax.grad`: that is refused, since every replica would
    then see the same gradient and the noise between them would be lost.
    """

    def first(params: PyTree, batches: PyTree) -> Any:
        out = call_grad_fn(grad_fn, params, jax.tree.map(lambda x: x[0], batches))
        return gradient_of(out, has_aux, params)[0]

    shapes = jax.eval_shape(first, params, batches)
    axes = [varying_axes(x) for x in jax.tree.leaves(shapes)]
    if axis_name is not None:
        check_varies("grad_fn(params, batch)", shapes, axis_name)

    # (a carry made by zeros_like may vary already: `vary_along` adds only what is missing)
    leaves, treedef = jax.tree.flatten(init.total)
    total = jax.tree.unflatten(
        treedef, [vary_along(x, v) for x, v in zip(leaves, axes, strict=True)]
    )
    state = dataclasses.replace(init, total=total)
    return state, vary_along(sq, frozenset().union(*axes))


def grad_pmean_noise(
    grad: PyTree,
    axis_name: str | tuple[str, ...],
    *,
    batch_per_replica: float,
    by: By = None,
) -> tuple[PyTree, NoiseScale]:
    """`grad_pmean`, and the step's noise-scale estimates from the same `psum`.

    The data-parallel all-reduce of `grad_pmean` (float16 and bfloat16 leaves summed in
    float32, the mean returned in each leaf's dtype), with each replica's squared
    gradient norm (one float32 scalar, or one per group with `by`) added to the same
    `psum`. The mean of the replicas' squared norms (`B_small = batch_per_replica`) and
    the squared norm of the mean (`B_big` = every replica's examples) give the unbiased
    estimates of `|G|^2` and `tr(Sigma)`; see docs/noise_scale.md. Smooth them over
    steps with `noise_scale_update`.

    Each replica's `grad` must be the gradient of its own part of the batch (a mean
    over its examples): inside `shard_map` with `check_vma=True`, differentiate with
    respect to `jax.lax.pcast(params, axis_name, to="varying")`, since `jax.grad` with
    respect to replicated parameters already sums over the replicas (every replica then
    holds the same gradient, and the noise between them is lost): such a gradient is
    refused, read from JAX's types. With `check_vma=False` JAX does not track what
    varies, and nothing can be checked.

    Args:
        grad: this replica's gradient: a `Gradient` or any pytree of floating-point
            arrays.
        axis_name: the mesh axis name, or a tuple of names, to average over.
        batch_per_replica: the number of examples behind each replica's gradient.
        by: per-group estimates as in `grad_stats` (`"leaf"`, `"group"`, a callable), or
            `None` for the whole gradient only.

    Returns:
        `(mean, noise)`: the mean gradient, with the structure, shapes and dtypes of
        `grad`, and a `NoiseScale` (the same on every replica).

    Raises:
        TypeError: if `axis_name` is not a str or a non-empty tuple of str, a leaf is
            not floating-point or complex, `batch_per_replica` is not a number, or `by`
            is not a valid grouping.
        ValueError: if `batch_per_replica` is not positive or more than float32 (the
            estimates' dtype) holds; if there is one replica along `axis_name` (the
            estimate is undefined); or if, inside `shard_map` with `check_vma=True`,
            `grad` does not vary along `axis_name` (the gradient of replicated
            parameters, already summed over the replicas: the noise would read 0).

    Example:
        >>> per_replica = {"w": jnp.array([[1.0], [3.0]])}  # 2 replicas, 4 examples each
        >>> mean, noise = jax.vmap(
        ...     lambda g: jaxgrad.grad_pmean_noise(g, "i", batch_per_replica=4), axis_name="i"
        ... )(per_replica)
        >>> mean["w"][0], noise.grad_sq[0].tolist(), noise.trace_cov[0].tolist()
        (Array([2.], dtype=float32), [3.0], [8.0])
    """
    check_axis_name(axis_name)
    check_array_leaves("grad", grad, inexact=True)
    leaves, treedef = jax.tree.flatten(grad)
    leaves = [jnp.asarray(x) for x in leaves]
    acc = accumulation_dtype(x.dtype for x in leaves)
    b_small = check_batch_size("batch_per_replica", batch_per_replica, acc)
    replicas = axis_size(axis_name)
    if replicas == 1:
        raise _undefined(
            f"`grad_pmean_noise` has a single replica along {axis_name!r}",
            b_small,
            "Use `grad_pmean` on one device, or `grad_microbatch_noise` to measure the noise "
            "scale from micro-batches.",
        )
    check_varies("grad", leaves, axis_name)
    groups = resolve_groups(grad, by)
    segments = _segments(groups, len(leaves))
    names = ("", *(name for name, _ in groups))
    sq = squared_norms(leaves, segments, acc)
    wide, sq = pmean_wide(leaves, axis_name, sq)  # grad_pmean's all-reduce, squares riding
    big = squared_norms(wide, segments, acc)
    noise = estimates(sq / replicas, big, b_small, replicas, names)
    mean = [m.astype(x.dtype) for m, x in zip(wide, leaves, strict=True)]
    return jax.tree.unflatten(treedef, mean), noise


# -- smoothing ---------------------------------------------------------------------------


def noise_scale_init(params: PyTree, *, by: By = None) -> NoiseScaleState:
    """The smoothing state before any step: zero averages, `b_simple` NaN, count 0.

    The groups are read from `params` with `by`, as `grad_microbatch_noise` and
    `grad_pmean_noise` read them from the parameters or the gradient, so the state
    matches their estimates. The averages are kept in float32 (float64 under x64).

    Args:
        params: the parameters (or a gradient, or an `nnx.Module`): any pytree of
            arrays or of `jax.ShapeDtypeStruct`.
        by: `"leaf"`, `"group"`, a callable `(path, leaf) -> str | None`, or `None`,
            as given to the estimating function.

    Returns:
        A `NoiseScaleState`.

    Raises:
        ValueError, TypeError: if `by` is not a valid grouping (as in `grad_stats`).

    Example:
        >>> state = jaxgrad.noise_scale_init({"w": jnp.zeros(3), "b": jnp.zeros(1)}, by="leaf")
        >>> state.names, state.b_simple, state.count
        (('', 'b', 'w'), Array([nan, nan, nan], dtype=float32), Array(0, dtype=int32))
    """
    params = nnx_params(params)
    groups = resolve_groups(params, by)
    leaves = jax.tree.leaves(params)
    acc = accumulation_dtype(
        np.dtype(getattr(x, "dtype", None) or jnp.result_type(x)) for x in leaves
    )
    size = 1 + len(groups)
    return NoiseScaleState(
        grad_sq=jnp.zeros(size, acc),
        trace_cov=jnp.zeros(size, acc),
        b_simple=jnp.full(size, jnp.nan, acc),
        count=jnp.zeros((), jnp.int32),
        names=("", *(name for name, _ in groups)),
    )


_COUNT_MAX = 2**31 - 1  # the int32 step count saturates here (the weights no longer change)


@jax.jit
def _update(state: NoiseScaleState, noise: NoiseScale, rate: Array) -> NoiseScaleState:
    acc = state.grad_sq.dtype
    grad_sq, trace_cov = noise.grad_sq.astype(acc), noise.trace_cov.astype(acc)
    finite = jnp.all(jnp.isfinite(grad_sq)) & jnp.all(jnp.isfinite(trace_cov))
    count = state.count + (finite & (state.count < _COUNT_MAX)).astype(jnp.int32)
    # The debiased EMA in one recursion: weight (1 - d) / (1 - d**t) on the new value,
    # from the rate r = 1 - d (exact for a Python decay, whose float32 value may be 1.0):
    # 1 - d**t = -expm1(t log1p(-r)) loses nothing as r -> 0, and at r = 0 the weight is
    # its limit 1 / t, the plain running mean.
    rate = jnp.asarray(rate, acc)
    t = jnp.maximum(count, 1).astype(acc)
    unbiased = rate / -jnp.expm1(t * jnp.log1p(-rate))
    weight = jnp.where(rate > 0, unbiased, 1 / t)
    weight = jnp.where(finite, weight, 0)
    new_grad_sq = state.grad_sq + weight * (jnp.where(finite, grad_sq, 0) - state.grad_sq)
    new_trace = state.trace_cov + weight * (jnp.where(finite, trace_cov, 0) - state.trace_cov)
    resolved = new_grad_sq > 0
    b_simple = jnp.where(
        resolved, jnp.maximum(new_trace, 0) / jnp.where(resolved, new_grad_sq, 1), jnp.nan
    )
    return NoiseScaleState(new_grad_sq, new_trace, b_simple.astype(acc), count, state.names)


def noise_scale_update(
    state: NoiseScaleState, noise: NoiseScale, *, decay: ArrayLike = 0.99
) -> NoiseScaleState:
    """Fold one step's estimates into the moving averages and recompute `B_simple`.

    Each average is an exponential moving average with weight `decay` on the past,
    bias-corrected (the first step sets it to the first estimate), so it is an unbiased
    average of the recent unbiased estimates; `b_simple` is `max(trace_cov, 0) /
    grad_sq` of the averages, NaN while the average of `|G|^2` is not positive. A step
    whose estimates are not all finite (a NaN or inf gradient) is skipped: the state is
    returned unchanged, `count` included. Jittable; the state keeps its dtypes.

    Args:
        state: a `NoiseScaleState` from `noise_scale_init` or a previous update.
        noise: the step's `NoiseScale`, with the same group names as `state`.
        decay: the weight of the past, in [0, 1); the averages span about
            `1 / (1 - decay)` steps (100 for the default 0.99). A Python number is
            checked, and a decay so close to 1 that float32 rounds it to 1.0 still
            works (the weights use `1 - decay`, computed in float64 on the host); a
            traced scalar is used as it is, and one equal to 1.0 gives the plain
            running mean (the limit of the debiased average).

    Returns:
        The updated `NoiseScaleState`.

    Raises:
        TypeError: if `state` or `noise` has the wrong type, or `decay` is not a real
            number.
        ValueError: if the group names differ, or `decay` is outside [0, 1).

    Example:
        >>> state = jaxgrad.noise_scale_init({"w": jnp.zeros(3)})
        >>> for grad_sq, trace_cov in [(4.0, 40.0), (-1.0, 20.0)]:  # a negative estimate
        ...     noise = jaxgrad.NoiseScale(jnp.array([grad_sq]), jnp.array([trace_cov]), ("",))
        ...     state = jaxgrad.noise_scale_update(state, noise, decay=0.5)
        >>> state.as_dict(), int(state.count)
        ({'grad_sq': 0.667, 'trace_cov': 26.667, 'b_simple': 40.0}, 2)
    """
    if not isinstance(state, NoiseScaleState):
        raise TypeError(
            "`state` must be a `NoiseScaleState` (from `noise_scale_init`); got "
            f"{type(state).__name__}."
        )
    if not isinstance(noise, NoiseScale):
        raise TypeError(
            "`noise` must be a `NoiseScale` (from `grad_microbatch_noise` or "
            f"`grad_pmean_noise`); got {type(noise).__name__}."
        )
    if state.names != noise.names:
        raise ValueError(
            "`state` and `noise` must have the same groups; `state` has "
            f"{list(state.names)}, `noise` has {list(noise.names)}. Give "
            "`noise_scale_init` the `by` of the estimating function."
        )
    return _update(state, noise, 1 - check_decay(decay))
