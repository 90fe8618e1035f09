"""Numerics shared by every whole-gradient reduction: dtypes, the packed reduction, psum.

The one entry point is `reduce_tree`: every norm, RMS, clip, statistic, non-finite count
and noise estimate of jaxgrad is computed by it. Its cost model (docs/performance.md):

- **Packing.** Per-leaf partial results are computed on packed leaves: every leaf of at
  most `PACK_LIMIT` entries is raveled, zero-padded to a power-of-two length and stacked
  with up to `PACK_ROWS - 1` other leaves of that padded length into one matrix, so that
  a model's hundreds of biases and norm scales cost a few row reductions rather than
  hundreds of fusions. Powers of two bound the padding (less than 2x) while keeping the
  number of distinct lengths, hence of matrices, logarithmic in the largest leaf. Every
  per-entry transform used maps 0 to 0 and every reduction has 0 as its identity (sums,
  counts, maxima of non-negative values), so the padding changes no result. Larger
  leaves are reduced one by one over all their axes, in place, whatever their sharding.
- **No conditional, and cheap on CPU.** Sums of squares are exact for every finite
  input: each piece gives three sibling sums, of the squares of the entries as they
  are, scaled down and scaled up (by the powers of two below), and each group picks
  afterwards, with a select, the first that is neither overflowed nor at risk of
  underflow. Each sum has its own producer from the entries (no shared `abs`, no
  stacked operand): XLA's CPU backend then makes each one a vectorized reduction that
  reads the gradient and writes nothing else (a shared or stacked operand is first
  written out in full), and on GPU XLA fuses the siblings into one kernel. The maximum
  and the non-finite count, exact in any order, are one variadic reduction (a count
  alone would write its predicate out first on CPU); the sums are not, as XLA's CPU loop
  for a variadic reduction sums in sequence (1% off on 16M entries). There is no
  `lax.cond`: XLA's GPU runtime would copy the predicate to the host and wait for the
  stream in every step, on CPU a conditional over the gradient's leaves cost more in a
  train step (1.3x optax's clip) than the sibling sums (1.05x), and under `vmap` a
  conditional becomes a select that runs both branches anyway.
- **Scalars once.** The global scalars that every leaf's output reads (a clip scale, a
  finite flag) come out of a division (`scale_factors`, `flag_once`): XLA never
  duplicates a division into the fusions that read it, so the chain of partial sums
  behind it is computed once, not inside every leaf's fusion (it would duplicate a
  select or a compare, and the whole chain with it; an optimization barrier does not
  help, as XLA removes it before fusion).
- **Under GSPMD.** In a multi-device `jax.jit`, the leaves that the mesh may split
  (Auto axes, or Explicit axes that split them) are reduced by one custom-partitioned
  call (`partitioned_results`) that sees their shardings when XLA partitions the step:
  each device reduces its shards, packed as above, and two all-reduces combine all of
  them, where reducing each leaf alone gives one all-reduce operand per leaf and kind.
- **Shards.** With `axis_name`, only the leaves that vary along an axis are summed over
  it; leaves that JAX's types say are invariant (replicated) are counted once. When the
  types carry no variance information (`shard_map(check_vma=False)`, `pmap`) every leaf
  is taken as a shard, the documented meaning of `axis_name`.

Why the scales (float32; float64 in brackets): a sum of squares is trusted when it is
finite and at least `2**-64` [`2**-600`]. Below that every entry is below `2**-32`
[`2**-300`], so scaled up by `2**64` [`2**600`] its square is at most `2**64` and a sum of
2**31 of them stays finite, while the smallest normal entry, `2**-126` [`2**-1022`],
still has a normal square; above it, the squares lost to underflow (each below
`2**-126`) are below one rounding error of the sum. A sum that overflowed is taken from
the entries scaled down by `2**-80` [`2**-600`]: the largest float32, about `2**128`,
becomes `2**48`, whose square times 2**31 entries is still finite. Scaled-up values are
clipped at `2**62` [`2**510`], which no value the picked sum reads ever reaches, and
whose square is finite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from ._checks import tracks_variance, varying_axes
from ._typing import Array, PyTree

AxisName = str | tuple[str, ...] | None

PACK_LIMIT = 4096
"""Leaves with at most this many entries are packed into shared matrices."""

PACK_ROWS = 256
"""Leaves per packed matrix. Each matrix costs its own reductions, so fewer matrices
compile faster, but XLA's compile time of a concatenation grows faster than its number
of operands. Measured on a 2-core CPU (compile of `grad_clip` / `grad_stats`): 200
leaves, 0.50 / 0.70 s in matrices of 16 rows, 0.38 / 0.40 s of 256, 0.38 / 0.39 s of
1024; 2,000 leaves, 3.7 / 2.4 s of 16, 3.3 / 1.6 s of 256, 3.7 / 1.9 s of 1024."""


def accumulation_dtype(dtypes: Any) -> np.dtype:
    """float64 if any dtype is 64-bit (float or complex), else float32.

    Low-precision floats (float16, bfloat16) and integers accumulate in float32, so sums
    of squares do not overflow; float64 stays float64 (it only exists under x64).
    """
    wide = any(np.dtype(d) in (np.dtype(np.float64), np.dtype(np.complex128)) for d in dtypes)
    return np.dtype(np.float64 if wide else np.float32)


def count_dtype(entries: int) -> np.dtype:
    """The one rule for counters: int32 up to 2**31 - 1 entries, else int64 (x64) or float32.

    `entries` is the number of entries that may be counted, over all shards.
    """
    if entries < 2**31:
        return np.dtype(np.int32)
    wide = jax.dtypes.canonicalize_dtype(np.int64) == np.dtype(np.int64)  # x64 is on
    return np.dtype(np.int64) if wide else np.dtype(np.float32)


def widen(x: Array) -> Array:
    """`x` in float32 if it is a float16 or bfloat16 array, else unchanged."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        return x.astype(jnp.float32)
    return x


@jax.custom_jvp
def safe_sqrt(x: Array) -> Array:
    """`sqrt(x)` for `x >= 0` whose derivative at 0 is 0 rather than inf."""
    return jnp.sqrt(x)


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (dx,) = primals, tangents
    y = jnp.sqrt(x)
    positive = x > 0
    return y, jnp.where(positive, dx / (2 * jnp.where(positive, y, 1)), 0)


def psum(value: Any, axis_name: AxisName) -> Any:
    """`jax.lax.psum(value, axis_name)`, or `value` when `axis_name` is None."""
    return value if axis_name is None else jax.lax.psum(value, axis_name)


def axis_names(axis_name: AxisName) -> tuple[str, ...]:
    """`axis_name` as a tuple of names (empty for None)."""
    if axis_name is None:
        return ()
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def axis_size(axis_name: AxisName) -> int:
    """The number of shards along `axis_name` (1 for None); a constant, no collective."""
    return 1 if axis_name is None else int(jax.lax.psum(1, axis_name))


def shard_axes(leaves: Sequence[Any], axis_name: AxisName) -> list[tuple[str, ...]]:
    """For each leaf, the axes of `axis_name` along which it is a shard (to be summed over).

    Inside `shard_map(check_vma=True)` JAX's types say which leaves vary along which axes:
    a leaf invariant along an axis is the same on every shard and counted once. Without
    that information (`check_vma=False`, `pmap`, `vmap` with an axis name) every leaf is
    a shard along every axis.
    """
    axes = axis_names(axis_name)
    if not axes:
        return [()] * len(leaves)
    if not tracks_variance(axes):
        return [axes] * len(leaves)
    return [tuple(a for a in axes if a in varying_axes(x)) for x in leaves]


def tree_leaves(tree: PyTree) -> list[Array]:
    """`jax.tree.leaves(tree)` as arrays."""
    return [jnp.asarray(x) for x in jax.tree.leaves(tree)]


# Packing ------------------------------------------------------------------------------


def _one_device() -> bool:
    return jax.device_count() == 1


def _packable(leaf: Array, local: bool) -> bool:
    """Small, real, and packing it moves no data between devices.

    On one device, and inside `shard_map`/`pmap` (`local`: the leaves are the device's
    own), every small leaf packs. Otherwise a concrete array packs when it is on one
    device or replicated, and a traced leaf when its type says it is not split over a
    mesh axis (Explicit or Manual axes; under Auto axes a leaf's placement is not known,
    so it is reduced where it is).
    """
    if leaf.size > PACK_LIMIT or jnp.iscomplexobj(leaf):
        return False
    return _whole_here(leaf, local)


def _whole_here(leaf: Array, local: bool) -> bool:
    """Whether no mesh axis splits `leaf`, so that reducing it moves no data (see `_packable`)."""
    if local or _one_device():
        return True
    if isinstance(leaf, Tracer):
        sharding = getattr(jax.typeof(leaf), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        types: tuple[Any, ...] = tuple(getattr(mesh, "axis_types", None) or ())
        known = (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Manual)
        if not types or not all(t in known for t in types):
            return False
        explicit = {
            name
            for name, t in zip(mesh.axis_names, types, strict=True)  # type: ignore[union-attr]
            if t == jax.sharding.AxisType.Explicit
        }
        return not (_spec_axes(sharding) & explicit)
    sharding = getattr(leaf, "sharding", None)
    return sharding is None or len(sharding.device_set) == 1 or sharding.is_fully_replicated


def _spec_axes(sharding: Any) -> set[str]:
    """The mesh axes that a sharding's partition spec splits along (none without a spec)."""
    spec = getattr(sharding, "spec", None) or ()
    return {n for entry in spec if entry is not None for n in np.atleast_1d(entry)}


def _placed_later(leaf: Array, local: bool) -> bool:
    """A traced leaf under GSPMD `jax.jit` that may be split over the mesh.

    Its type names no mesh or only Auto axes, so nothing at trace time says how it is
    split (the partitioner decides it later), or it names Explicit axes that split it.
    Such leaves are reduced by `partitioned_results`, which sees their shardings when
    XLA partitions the step: one all-reduce for all of them, where reducing each alone
    gives the all-reduces one operand per leaf and kind. (With Shardy, JAX's default
    partitioner; without it they are reduced one by one where they are. Inside
    `shard_map` (Manual axes) the leaves are local and never reach here.)
    """
    if local or _one_device() or not isinstance(leaf, Tracer):
        return False
    if not jax.config.jax_use_shardy_partitioner:  # type: ignore[attr-defined]
        return False
    mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
    types = tuple(getattr(mesh, "axis_types", None) or ())
    known = (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit)
    return all(t in known for t in types) and not _whole_here(leaf, local)


class Piece(NamedTuple):
    """One unit of reduction: a packed matrix (`length` set) or a leaf alone (`None`)."""

    length: int | None
    leaves: tuple[int, ...]
    axes: tuple[str, ...]


class Layout(NamedTuple):
    """The pieces of a list of leaves, and the leaves' order within them."""

    pieces: tuple[Piece, ...]
    order: np.ndarray
    """`order[k]` is the leaf index of the k-th entry of the pieces' concatenated results."""


def layout(
    leaves: Sequence[Array],
    axes: Sequence[tuple[str, ...]],
    pack: bool = True,
    local: bool = False,
    skip: Sequence[int] = (),
) -> Layout:
    """Pack small leaves by (padded length, shard axes); the others stay alone.

    Leaves that are summed over different mesh axes never share a matrix, so that each
    piece's results are summed over the axes of its own leaves only. The leaves `skip`
    are in no piece (the caller reduces them otherwise).
    """
    buckets: dict[tuple[int, tuple[str, ...]], list[int]] = {}
    alone: list[Piece] = []
    skipped = set(skip)
    for i, leaf in enumerate(leaves):
        if i in skipped:
            continue
        if pack and leaf.size and _packable(leaf, local):
            length = 1 << max(leaf.size - 1, 0).bit_length()
            buckets.setdefault((length, axes[i]), []).append(i)
        else:
            alone.append(Piece(None, (i,), axes[i]))
    pieces = [
        Piece(length, tuple(idx[start : start + PACK_ROWS]), leaf_axes)
        for (length, leaf_axes), idx in sorted(buckets.items())
        for start in range(0, len(idx), PACK_ROWS)
    ] + alone
    order = np.array([i for piece in pieces for i in piece.leaves], dtype=np.int64)
    return Layout(tuple(pieces), order)


def _values(x: Array, acc: np.dtype) -> Array:
    """`x` in `acc`; a complex leaf as its real and imaginary parts.

    The squares of the parts sum to `|x|**2`. Signs are kept: `abs` is applied to the
    packed matrix, after the stacking, so that XLA keeps one matrix instead of splitting
    it back into per-leaf reductions.
    """
    if jnp.iscomplexobj(x):
        x = jnp.stack([x.real, x.imag])
    return x.astype(acc)


def _piece_values(piece: Piece, values: Sequence[Array]) -> Array:
    if piece.length is None:
        return values[piece.leaves[0]]
    return jnp.stack(
        [jnp.pad(values[i].ravel(), (0, piece.length - values[i].size)) for i in piece.leaves]
    )


# Exact sums of squares ----------------------------------------------------------------


class _Scales(NamedTuple):
    down: int  # exponent removed when the plain sum overflowed
    up: int  # exponent added when the plain sum may have underflowed
    trusted: float  # smallest plain sum of squares taken as it is
    cap: float  # scaled values are clipped here (its square is finite; see `_producers`)


_SCALES = {
    np.dtype(np.float32): _Scales(80, 64, 2.0**-64, 2.0**62),
    np.dtype(np.float64): _Scales(600, 600, 2.0**-600, 2.0**510),
}


def _producers(
    m: Array, leaf: Array, spec: _Scales, counting: Any
) -> dict[str, Callable[[], Array]]:
    """What each kind of reduction reads, entry by entry, from the piece's values `m`.

    A complex leaf alone is counted and maxed on its entries (`leaf`), its squares summed
    on the parts in `m`. The scaled-up values are clipped at `spec.cap`, which keeps an
    inf out of that sum's derivative where the sum is not used (it is used only when
    every entry is below `2**-(up/2)`, see the module docstring). Scaled-down values are
    clipped at the dtype's largest value, which changes only infinities and NaN (XLA's
    CPU reductions take `min(NaN, c)` as `c`) and makes both infinite once squared: the
    finite flag reads this sum. Either clip also stops XLA from rewriting the square
    `(x*c)*(x*c)` of a one-entry leaf as `(x*x)*(c*c)`, which overflows. Clips are a
    `minimum` of an `abs`, not `jnp.clip`: XLA's CPU backend cannot fuse a clamp into a
    vectorized reduction and would write it out first. Each sum has its own producer
    from `m` alone (no `abs` shared between them), so that on CPU each becomes one
    vectorized reduction reading the gradient, with nothing materialized.
    """
    down = jnp.asarray(2.0**-spec.down, m.dtype)
    up = jnp.asarray(2.0**spec.up, m.dtype)
    cap = jnp.asarray(spec.cap, m.dtype)
    top = jnp.asarray(np.finfo(m.dtype).max, m.dtype)
    entries = leaf if jnp.iscomplexobj(leaf) else m
    return {
        "plain": lambda: m * m,
        "small": lambda: _square(jnp.minimum(jnp.abs(m * down), top)),
        "large": lambda: _square(jnp.minimum(jnp.abs(m * up), cap)),
        "count": lambda: (~jnp.isfinite(entries)).astype(counting),
        "max": lambda: jnp.abs(entries).astype(m.dtype),
        "abs": lambda: jnp.abs(entries).astype(m.dtype),
    }


def _piece_results(
    piece: Piece,
    m: Array,
    leaf: Array,
    names: Sequence[str],
    spec: _Scales,
    counting: Any,
    fused: bool,
) -> dict[str, Array]:
    """The reductions `names` of one piece, per leaf of the piece (vectors of its leaves).

    The sums are one reduction each (on CPU, XLA's vectorized reductions, which sum in a
    tree; on GPU, sibling reductions that XLA fuses into one kernel). With `fused`, the
    maximum and an integer count, exact in any order, are one variadic reduction: one
    kernel that reads the piece once, where a count alone would first write its
    predicate out in full on CPU. `fused` is for pieces whose data is all on this
    device: under GSPMD XLA all-gathers a variadic reduction's partial results rather
    than all-reducing them. (A variadic reduction is not used for the sums: XLA's CPU
    loop for it sums in sequence, 1% off on 16M entries.)
    """
    make = _producers(m, leaf, spec, counting)
    axes_of = (lambda x: (1,)) if piece.length is not None else (lambda x: tuple(range(x.ndim)))
    found = {}
    # An integer count is exact in any order; a float32 one (beyond 2**31 entries
    # without x64) needs XLA's summation tree.
    integer = np.issubdtype(np.dtype(counting), np.integer)
    if fused and integer and "count" in names and isinstance(m, Tracer):
        largest = make["max"]()  # of the entries: a complex leaf's, not its parts'
        largest, count = _max_and_count(largest, make["count"](), axes_of(largest))
        if "max" not in names:
            # Read the maximum (never below 0), or XLA drops it from the reduction and
            # writes the count's predicate out first.
            count = count + (largest < 0).astype(count.dtype)
        found.update(max=largest.reshape(-1), count=count.reshape(-1))
    for name in names:
        if name in found:
            continue
        x = make[name]()
        if name == "max":
            # `initial` only where needed: it is a separate `maximum` after the reduction,
            # one more kernel per piece (the entries' `abs` is never below 0)
            initial = 0 if x.size == 0 else None
            found[name] = jnp.max(x, axis=axes_of(x), initial=initial).reshape(-1)
        else:
            found[name] = jnp.sum(x, axis=axes_of(x), dtype=x.dtype).reshape(-1)
    return found


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _max_and_count(largest: Array, bad: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """`max(largest)` and `sum(bad)` over `axes` in one variadic reduction.

    The derivative of the maximum is JAX's for `jnp.max` (shared equally between tied
    entries); the count has none. (JAX's own rule for a variadic reduction fails on the
    count's symbolic-zero tangent.)
    """

    def combine(a: tuple[Array, Array], b: tuple[Array, Array]) -> tuple[Array, Array]:
        return jnp.maximum(a[0], b[0]), a[1] + b[1]

    inits = (jnp.zeros((), largest.dtype), jnp.zeros((), bad.dtype))
    out = jax.lax.reduce((largest, bad), inits, combine, axes)
    return out[0], out[1]


@_max_and_count.defjvp
def _max_and_count_jvp(
    axes: tuple[int, ...], primals: tuple[Array, Array], tangents: tuple[Array, Array]
) -> tuple[tuple[Array, Array], tuple[Array, Any]]:
    largest, bad = primals
    found = _max_and_count(largest, bad, axes)
    at = largest == jnp.expand_dims(found[0], axes)
    ties = jnp.maximum(jnp.sum(at, axis=axes, dtype=largest.dtype), 1)
    slope = jnp.sum(jnp.where(at, tangents[0], 0), axis=axes) / ties
    return found, (slope, np.zeros(found[1].shape, jax.dtypes.float0))


def _square(m: Array) -> Array:
    return m * m


class Root(NamedTuple):
    """A norm as `root * up`, with `root` in a safe range and `up` a power of two.

    `norm` overflows to inf where the norm is beyond the dtype's range, but `root` and
    `up` stay finite, so that ratios such as `x / norm` or `norm / sqrt(N)` are computed
    exactly as `(x / up) / root` or `(root / sqrt(N)) * up`.
    """

    root: Array
    up: Array

    @property
    def norm(self) -> Array:
        """The norm itself (inf beyond the dtype's range)."""
        return self.root * self.up


def _pick(plain: Array, small: Array, large: Array, spec: _Scales) -> Root:
    """Per group: the plain sum, or a scaled one where it overflowed or may have underflowed.

    NaN where the plain sum is NaN (an entry is), which the scaled sums need not keep.
    """
    dtype = plain.dtype
    tiny = plain < spec.trusted
    overflowed = plain == jnp.inf
    root = jnp.where(
        tiny, safe_sqrt(large), jnp.where(overflowed, safe_sqrt(small), safe_sqrt(plain))
    )
    up = jnp.where(
        tiny,
        jnp.asarray(2.0**-spec.up, dtype),
        jnp.where(overflowed, jnp.asarray(2.0**spec.down, dtype), jnp.ones((), dtype)),
    )
    return Root(root, up)


class Factors(NamedTuple):
    """What `scale_factors` gives every leaf: `x` becomes `(x * pre) * ratio` where `applied`."""

    pre: Array
    ratio: Array
    applied: Array  # 1.0 where the factors apply, else 0.5 (see `flag_once`)


def scale_factors(value: Root, where: Array, numerator: Array) -> Factors:
    """The factors that turn `x` into `x / value * numerator` where `where` holds.

    Elsewhere `x` comes back bit for bit (subnormal entries included, which a
    multiplication by 1 would flush to 0). `x / value` is computed as `(x / up) / root`,
    exact where `1 / value` would be subnormal. Every factor comes out of a division: XLA
    never duplicates a division into the fusions that read it, so the chain of partial
    sums behind them is computed once, not inside every leaf's fusion (it would
    duplicate a select or a compare, and the whole chain with it; an optimization
    barrier does not help, XLA removes it before fusion).
    """
    one = jnp.ones((), value.root.dtype)
    pre = one / jnp.where(where, value.up, one)
    ratio = jnp.where(where, numerator.astype(one.dtype), one) / jnp.where(where, value.root, one)
    return Factors(pre, ratio, flag_once(where))


def apply_factors(x: Array, factors: Factors) -> Array:
    """`(x * pre) * ratio` where the factors apply, else `x`; in `x`'s dtype.

    Computed in float32 (or wider) for 16-bit floats; complex leaves have their real and
    imaginary parts scaled alike.
    """
    x = jnp.asarray(x)
    pre, ratio = factors.pre, factors.ratio

    def scale(part: Array) -> Array:
        work = part.dtype
        if jnp.finfo(part.dtype).bits < pre.dtype.itemsize * 8:
            work = pre.dtype
        return ((part.astype(work) * pre.astype(work)) * ratio.astype(work)).astype(part.dtype)

    out = jax.lax.complex(scale(x.real), scale(x.imag)) if jnp.iscomplexobj(x) else scale(x)
    return jnp.where(factors.applied == 1, out, x)


def flag_once(flag: Array) -> Array:
    """`flag` as a float scalar out of a division (`1.0` where true, `0.5` where false).

    Read `flag_once(f) == 1` in a per-leaf fusion: the division is computed once and the
    chain behind it is not duplicated into every leaf's fusion (see `scale_factors`).
    """
    one = jnp.ones((), jnp.float32)
    return one / jnp.where(flag, one, 2 * one)


# Groupings ------------------------------------------------------------------------------


class Segments(NamedTuple):
    """A static grouping of leaves: `ids[i]` is the group of leaf i (`groups` = left out)."""

    ids: np.ndarray
    groups: int

    @classmethod
    def whole(cls, leaves: int) -> Segments:
        """One group holding every leaf."""
        return cls(np.zeros(leaves, np.int32), 1)

    @classmethod
    def each(cls, leaves: int) -> Segments:
        """One group per leaf, in order."""
        return cls(np.arange(leaves, dtype=np.int32), leaves)

    @classmethod
    def from_groups(cls, groups: Sequence[tuple[str, Sequence[int]]], leaves: int) -> Segments:
        """The user's groups (`(name, leaf indices)` each); leaves in none are left out."""
        ids = np.full(leaves, len(groups), np.int32)
        for g, (_, indices) in enumerate(groups):
            ids[list(indices)] = g
        return cls(ids, len(groups))

    def reduce(self, values: Array, leaves: np.ndarray, op: str) -> Array:
        """Per-group `op` ("sum" or "max") of `values`, the results of the leaves `leaves`."""
        ids = self.ids[leaves]
        if self.groups == 0:
            return jnp.zeros((0,), values.dtype)
        if self.groups == 1 and (ids == 0).all():
            if op == "sum":
                return jnp.sum(values, keepdims=True, dtype=values.dtype)
            return jnp.max(values, keepdims=True, initial=0)
        if ids.size == self.groups and np.array_equal(np.sort(ids), np.arange(self.groups)):
            return values[np.argsort(ids)]  # one leaf per group: a permutation
        if op == "sum":
            return jax.ops.segment_sum(values, ids, self.groups + 1)[: self.groups]
        out = jax.ops.segment_max(values, ids, self.groups + 1)[: self.groups]
        return jnp.maximum(out, 0)  # empty groups: 0, not -inf

    def sizes(self, leaf_sizes: Sequence[int]) -> np.ndarray:
        """Static entry counts per group."""
        counts = np.zeros(self.groups + 1, np.int64)
        np.add.at(counts, self.ids, np.asarray(leaf_sizes, np.int64))
        return counts[: self.groups]


# The packed reduction -------------------------------------------------------------------


class Reduced(NamedTuple):
    """What `reduce_tree` computed; each list has one array per segmentation, whole first.

    Attributes:
        roots: the L2 norms of the groups, as `Root`s (`root * up`), exact for every
            finite input; NaN or inf where an entry is.
        entries: the static number of entries of each group, over all shards.
        finite: whether every entry of the whole gradient is finite (0-d bool).
        max_abs: the largest absolute entry of each group (NaN where an entry is NaN
            and the norms were computed; else as XLA's maximum gives it).
        nonfinite: the number of NaN and inf entries of each group.
        abs_sums: the sum of the absolute entries of each group (the L1 norm).
    """

    roots: list[Root]
    entries: list[np.ndarray]
    finite: Array | None
    max_abs: list[Array] | None
    nonfinite: list[Array] | None
    abs_sums: list[Array] | None = None

    def norms(self) -> list[Array]:
        """The group norms (inf beyond the dtype's range)."""
        return [r.norm for r in self.roots]

    def rms(self) -> list[Array]:
        """The groups' root-mean-squares, exact even where the norm overflows; 0 for none."""
        out = []
        for r, n in zip(self.roots, self.entries, strict=True):
            sqrt_n = np.sqrt(np.where(n > 0, n, 1).astype(np.float64))
            out.append((r.root / jnp.asarray(sqrt_n, r.root.dtype)) * r.up)
        return out


def reduce_tree(
    leaves: Sequence[Any],
    segments: Sequence[Segments] = (),
    *,
    axis_name: AxisName = None,
    pack: bool = True,
    norms: bool = True,
    max_abs: bool = False,
    nonfinite: bool = False,
    abs_sums: bool = False,
) -> Reduced:
    """Norms, max-abs, non-finite counts and L1 norms of groups of leaves, in one read.

    The whole gradient is always the first segmentation; `segments` are the others (see
    `Segments`). With `axis_name`, each leaf's partial results are summed (or maxed) over
    the axes along which it is a shard (`shard_axes`), one collective per set of axes
    and kind of reduction. See the module docstring for the invariants.

    The scaled sums (and the non-finite counts) are siblings of the plain sum, read in
    the same pass, then selected: no conditional, on any platform. (A `lax.cond` that
    computed them only when needed cost 1.3x the optax-clip train step on CPU, against
    1.05x for the siblings, and on GPU a conditional reads its predicate on the host.)
    """
    leaves = [jnp.asarray(x) for x in leaves]
    acc = accumulation_dtype(x.dtype for x in leaves)
    spec = _SCALES[acc]
    segs = [Segments.whole(len(leaves)), *segments]
    leaf_axes = shard_axes(leaves, axis_name)
    shards = {a: int(np.prod([axis_size(n) for n in a], dtype=np.int64)) for a in set(leaf_axes)}
    global_sizes = [x.size * shards[a] for x, a in zip(leaves, leaf_axes, strict=True)]
    entries = [seg.sizes(global_sizes) for seg in segs]
    counting = count_dtype(int(sum(global_sizes)))
    local = axis_name is not None
    later = [i for i, x in enumerate(leaves) if _placed_later(x, local)]
    plan = layout(leaves, leaf_axes, pack, local=local, skip=later)
    values = [_values(x, acc) for x in leaves]
    matrices = [_piece_values(piece, values) for piece in plan.pieces]
    classes: dict[tuple[str, ...], list[int]] = {}
    for p, piece in enumerate(plan.pieces):
        classes.setdefault(piece.axes, []).append(p)
    if later:  # reduced by the partitioner's call, summed over no axis_name
        classes.setdefault((), [])

    def results(p: int, names: Sequence[str]) -> dict[str, Array]:
        piece = plan.pieces[p]
        leaf = leaves[piece.leaves[0]]
        fused = piece.length is not None or _whole_here(leaf, local)
        return _piece_results(piece, matrices[p], leaf, names, spec, counting, fused)

    def grouped(names: Sequence[str]) -> dict[str, list[Array]]:
        """Per-group results of the kinds `names`, combined over each leaf's shard axes."""
        totals: dict[str, list[Array]] = {}
        for axes, members in classes.items():
            raw = [results(p, names) for p in members]
            idx = [np.asarray(plan.pieces[p].leaves) for p in members]
            if not axes and later:
                sub = [leaves[i] for i in later]
                raw.append(partitioned_results(sub, names, spec, counting, acc, pack))
                idx.append(np.asarray(later))
            order = np.concatenate(idx)
            found: dict[str, list[Array]] = {}
            for name in names:
                parts = [piece_found[name] for piece_found in raw]
                vector = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
                op = "max" if name == "max" else "sum"
                found[name] = [seg.reduce(vector, order, op) for seg in segs]
            summed = {k: v for k, v in found.items() if k != "max"}
            if axes and summed:
                found.update(_psum_packed(summed, axes))
            for name, groups in found.items():
                if name not in totals:
                    totals[name] = groups
                elif name == "max":
                    pairs = zip(totals[name], groups, strict=True)
                    totals[name] = [jnp.maximum(a, b) for a, b in pairs]
                else:
                    totals[name] = [a + b for a, b in zip(totals[name], groups, strict=True)]
        for name in names:
            dtype = counting if name == "count" else acc
            totals.setdefault(name, [jnp.zeros((seg.groups,), dtype) for seg in segs])
        if "max" in totals and any(leaf_axes):
            totals["max"] = jax.lax.pmax(totals["max"], axis_names(axis_name))
        return totals

    totals = grouped(
        (["plain", "small", "large"] if norms else [])
        + (["count"] if nonfinite else [])
        + (["max"] if max_abs else [])
        + (["abs"] if abs_sums else [])
    )

    roots: list[Root] = []
    finite = None
    if norms:
        parts = zip(totals["plain"], totals["small"], totals["large"], strict=True)
        roots = [_pick(plain, small, large, spec) for plain, small, large in parts]
        # the scaled-down sum is inf or NaN where an entry is, and never overflows otherwise
        finite = jnp.isfinite(totals["small"][0][0])
    if nonfinite and not norms:
        finite = totals["count"][0][0] == 0
    maxima = None
    if max_abs:
        maxima = totals["max"]
        if norms:  # NaN wherever a group holds one (XLA's max may skip it)
            maxima = [
                jnp.where(jnp.isnan(s), jnp.nan, m)
                for s, m in zip(totals["plain"], maxima, strict=True)
            ]
    return Reduced(
        roots=roots,
        entries=entries,
        finite=finite,
        max_abs=maxima,
        nonfinite=totals["count"] if nonfinite else None,
        abs_sums=totals["abs"] if abs_sums else None,
    )


def _psum_packed(values: dict[str, list[Array]], axes: tuple[str, ...]) -> dict[str, list[Array]]:
    """`jax.lax.psum(values, axes)` as one psum per dtype: the vectors concatenated first."""
    leaves, treedef = jax.tree.flatten(values)
    out: list[Array | None] = [None] * len(leaves)
    for dtype in {x.dtype for x in leaves}:
        idx = [i for i, x in enumerate(leaves) if x.dtype == dtype]
        total = jax.lax.psum(jnp.concatenate([leaves[i] for i in idx]), axes)
        bounds = np.cumsum([leaves[i].size for i in idx])[:-1]
        for i, part in zip(idx, jnp.split(total, bounds), strict=True):
            out[i] = part
    return jax.tree.unflatten(treedef, out)


# Under GSPMD: one call that the partitioner places ---------------------------------------


def partitioned_results(
    leaves: Sequence[Array],
    names: Sequence[str],
    spec: _Scales,
    counting: Any,
    acc: Any,
    pack: bool = True,
) -> dict[str, Array]:
    """Per-leaf results `names` of leaves that GSPMD may split over the mesh (`_placed_later`).

    One call of `jax.experimental.custom_partitioning` for all of them: when XLA
    partitions the step it gives each leaf's sharding to `partition`, which reduces
    every device's shards where they are (the small ones packed, as on one device) and
    sums the results over the mesh axes that split any leaf, whatever the number of
    leaves and the axes: one all-reduce for the sums and counts (the counts in float
    where every count is exact, up to 2**24 entries in float32; else one more, in
    integers) and one for the maxima. A leaf that an axis does not split is counted on
    that axis's first device only, hence once. (Left to the partitioner, each leaf's
    reduction gets its own all-reduce, which XLA merges into collectives of one operand
    per leaf and kind: on its CPU backend a rendezvous of every device per operand.)
    Moving no data, the call keeps every leaf's sharding. Differentiated or vmapped, it
    is the per-leaf reductions it stands for, traced as they are.

    Returns:
        For each name, the vector of the leaves' results in `leaves`' order, the same on
        every device.
    """
    from jax.experimental.custom_partitioning import (
        ArrayMapping,
        SdyShardingRule,
        custom_partitioning,
    )

    names = tuple(names)
    whole = Piece(None, (0,), ())
    # counts below 2**24 (float32's exact integers) travel with the sums
    exact_count = sum(x.size for x in leaves) <= 2 ** (np.finfo(acc).nmant + 1)

    def reference(*xs: Array) -> tuple[Array, ...]:
        found = [
            _piece_results(whole, _values(x, acc), x, names, spec, counting, fused=False)
            for x in xs
        ]
        return tuple(jnp.concatenate([f[n] for f in found]) for n in names)

    def on_shards(axes: list[tuple[str, ...]], *xs: Array) -> tuple[Array, ...]:
        plan = layout(xs, axes, pack, local=True)
        values = [_values(x, acc) for x in xs]
        found = [
            _piece_results(
                p, _piece_values(p, values), xs[p.leaves[0]], names, spec, counting, True
            )
            for p in plan.pieces
        ]
        joined = {n: jnp.concatenate([f[n] for f in found]) for n in names}
        split = tuple(sorted({a for leaf_axes in axes for a in leaf_axes}))
        if split:
            # One psum and one pmax over every axis that splits a leaf. Along an axis that
            # does not split it, a leaf is the same on every device: its sums are kept on
            # the first device of that axis only, so that it counts once.
            need = [tuple(a for a in split if a not in axes[i]) for i in plan.order]
            distinct = sorted(set(need))  # the sets of axes a leaf is replicated along
            first = {a: jax.lax.axis_index(a) == 0 for a in split}
            table = jnp.stack(
                [
                    functools.reduce(jnp.logical_and, [first[a] for a in k], jnp.bool_(True))
                    for k in distinct
                ]
            )
            keep = table[np.asarray([distinct.index(k) for k in need], np.int32)]
            summed = {
                n: [jnp.where(keep, v, jnp.zeros((), v.dtype))]
                for n, v in joined.items()
                if n != "max"
            }
            if "count" in summed and exact_count:  # summed with the sums, in one psum
                summed["count"] = [summed["count"][0].astype(acc)]
            if summed:
                joined.update({n: v[0] for n, v in _psum_packed(summed, split).items()})
            if "count" in joined:
                joined["count"] = joined["count"].astype(counting)
            if "max" in joined:  # equal along the axes that do not split a leaf
                joined["max"] = jax.lax.pmax(joined["max"], split)
        back = np.argsort(plan.order)  # the pieces' order -> the leaves' order
        return tuple(joined[n][back] for n in names)

    def partition(mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        shardings, axes = [], []
        for arg in arg_shapes:
            sharding = arg.sharding
            spec_ = getattr(sharding, "spec", None)
            if spec_ is None and not sharding.is_fully_replicated:
                sharding = replicated  # not readable: gathered (never seen with Shardy)
            shardings.append(sharding)
            used = _spec_axes(sharding)
            axes.append(tuple(n for n in mesh.axis_names if n in used))
        results_ = tuple(replicated for _ in names)
        return mesh, functools.partial(on_shards, axes), results_, tuple(shardings)

    op = custom_partitioning(reference)
    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=lambda mesh, *_: tuple(
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) for _ in names
        ),
        sharding_rule=SdyShardingRule(
            operand_mappings=tuple(
                ArrayMapping(*(f"x{k}d{d}" for d in range(x.ndim))) for k, x in enumerate(leaves)
            ),
            result_mappings=tuple(ArrayMapping(f"r{j}") for j in range(len(names))),
        ),
    )

    batched = jax.custom_batching.custom_vmap(lambda *xs: op(*xs))

    @batched.def_vmap
    def _(size: int, in_batched: list[bool], *xs: Array) -> tuple[tuple[Array, ...], Any]:
        axes_in = [0 if b else None for b in in_batched]
        return jax.vmap(reference, in_axes=axes_in)(*xs), tuple(True for _ in names)

    call = jax.custom_jvp(lambda *xs: batched(*xs))
    call.defjvp(lambda primals, tangents: jax.jvp(reference, primals, tangents))
    return dict(zip(names, call(*leaves), strict=True))


def global_norm(leaves: Sequence[Any], *, axis_name: AxisName = None, pack: bool = True) -> Root:
    """The L2 norm of all entries of `leaves`, as a 0-d `Root`; exact for every finite input."""
    root = reduce_tree(leaves, axis_name=axis_name, pack=pack).roots[0]
    return Root(root.root[0], root.up[0])
