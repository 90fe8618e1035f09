"""Numerics shared by every whole-gradient reduction: dtypes, partial sums, norms, psum.

Cost model (see docs/performance.md). A whole-gradient op must compile to HLO that grows
linearly with the number of leaves and read the gradient as few times as optax does:

- Per-leaf partial results are computed on *packed* leaves: every leaf with at most
  `PACK_LIMIT` entries is raveled, zero-padded to a power-of-two length and stacked
  with the other small leaves of that length into one matrix, so a model's hundreds of
  biases and norm scales cost a few row reductions, not hundreds of fusions (and
  seconds of compilation, not a minute, at thousands of leaves). Larger leaves are
  reduced one by one, as rows of length `size`. Every transform used is zero at zero,
  so the padding changes nothing.
- The global norms come out of one `lax.cond`: an ordinary gradient takes the plain
  float32 sum of squares; only a gradient whose sum is not finite (a NaN or inf entry,
  or squares beyond float32's range) runs the second branch, which sums the squares
  again with every entry scaled down by a fixed power of two (so finite inputs always
  get a finite, correct norm) and counts the non-finite entries. The conditional is
  also a hard boundary for XLA's fusion: the O(leaves) chain of partial sums is
  computed once, and each leaf's output fusion reads one scalar, as in optax's
  `clip_by_global_norm`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from ._typing import Array, PyTree

AxisName = str | tuple[str, ...] | None

PACK_LIMIT = 4096
"""Leaves with at most this many entries are packed into shared matrices."""

PACK_ROWS = 16
"""Leaves per packed matrix: XLA's compile time of a concatenation grows faster than its
number of operands, so many small ones compile faster than one large one (2,000 leaves
of 8 entries on a 2-core CPU: about 3x faster in matrices of 16 or 64 rows than in one;
16 rows compile fastest at 200 leaves)."""


def accumulation_dtype(dtypes: Any) -> np.dtype:
    """float64 if any dtype is 64-bit (float or complex), else float32.

    Low-precision floats (float16, bfloat16) and integers accumulate in float32, so sums
    of squares do not overflow; float64 stays float64 (it only exists under x64).
    """
    wide = any(np.dtype(d) in (np.dtype(np.float64), np.dtype(np.complex128)) for d in dtypes)
    return np.dtype(np.float64 if wide else np.float32)


def count_dtype(entries: int) -> np.dtype:
    """The dtype that counts up to `entries` exactly: int32, else int64 (x64) or float32."""
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


def axis_size(axis_name: AxisName) -> int:
    """The number of shards along `axis_name` (1 for None); a constant, no collective."""
    return 1 if axis_name is None else int(jax.lax.psum(1, axis_name))


# Packed per-leaf reductions ----------------------------------------------------------


class Layout(NamedTuple):
    """Where each leaf goes: `(row length, leaf indices)` per piece, then the order.

    A piece with a row length packs its leaves into one matrix; a piece whose length is
    `None` is one leaf reduced as it is. `inverse` puts the concatenated per-piece
    results back in leaf order.
    """

    pieces: tuple[tuple[int | None, tuple[int, ...]], ...]
    inverse: np.ndarray


def may_pack(tree: PyTree, axis_name: AxisName) -> bool:
    """Whether small leaves may be packed together without moving data between devices.

    Always on one device, and inside `shard_map`/`pmap` (`axis_name`: the leaves are
    local). Otherwise only when every leaf is a concrete array on one device or fully
    replicated: inside the user's `jax.jit` on several devices a leaf's placement is not
    known, so leaves are reduced where they are.
    """
    if axis_name is not None or jax.device_count() == 1:
        return True
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, Tracer):
            return False
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and not (
            len(sharding.device_set) == 1 or sharding.is_fully_replicated
        ):
            return False
    return True


def _packable(leaf: Array) -> bool:
    """Small, and not split over explicit mesh axes (whose data a reshape would move)."""
    if leaf.size > PACK_LIMIT:
        return False
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return True
    spec = getattr(getattr(typeof(leaf), "sharding", None), "spec", ())
    return all(entry is None for entry in spec)


def layout(leaves: Sequence[Array], pack: bool = True) -> Layout:
    """Pack small leaves by padded length (a power of two); others stay alone."""
    buckets: dict[int, list[int]] = {}
    alone: list[tuple[int | None, tuple[int, ...]]] = []
    for i, leaf in enumerate(leaves):
        if pack and _packable(leaf):
            buckets.setdefault(1 << max(leaf.size - 1, 0).bit_length(), []).append(i)
        else:
            alone.append((None, (i,)))
    pieces = [
        (length, tuple(idx[start : start + PACK_ROWS]))
        for length, idx in sorted(buckets.items())
        for start in range(0, len(idx), PACK_ROWS)
    ] + alone
    order = np.array([i for _, idx in pieces for i in idx], dtype=np.int64)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return Layout(tuple(pieces), inverse)


def magnitudes(leaves: Sequence[Array], acc: np.dtype) -> list[Array]:
    """Each leaf as real values in `acc`: `|x|` for complex leaves, `x` otherwise."""
    return [
        (jnp.abs(x) if jnp.iscomplexobj(x) else x).astype(acc) for x in map(jnp.asarray, leaves)
    ]


def rows(values: Sequence[Array], plan: Layout) -> list[Array]:
    """The pieces of `values` (from `magnitudes`): packed matrices, one row per small leaf.

    A leaf that is alone in its piece stays as it is (any shape, any sharding): it is
    reduced over all its axes, so no reshape has to move sharded data.
    """
    out = []
    for length, idx in plan.pieces:
        if length is None:
            out.append(values[idx[0]])
        else:
            out.append(
                jnp.stack([jnp.pad(values[i].ravel(), (0, length - values[i].size)) for i in idx])
            )
    return out


def per_leaf(
    pieces: Sequence[Array],
    plan: Layout,
    transform: Callable[[Array], Array],
    reduce: Callable[..., Array],
) -> Array:
    """`reduce(transform(leaf))` for every leaf, as one vector in leaf order.

    `transform` must map 0 to 0 (the padding) and `reduce` take `axis` (1 for a packed
    matrix, all axes for a leaf alone).
    """
    if not plan.pieces:
        return jnp.zeros((0,), pieces[0].dtype if pieces else jnp.float32)
    parts = []
    for piece, (length, _) in zip(pieces, plan.pieces, strict=True):
        if length is None:
            parts.append(reduce(transform(piece), axis=tuple(range(piece.ndim))).reshape(1))
        else:
            parts.append(reduce(transform(piece), axis=1))
    out = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    if np.array_equal(plan.inverse, np.arange(plan.inverse.size)):
        return out
    return out[plan.inverse]


def _square(m: Array) -> Array:
    return m * m


def abs_max(m: Array, axis: Any) -> Array:
    """The largest absolute value along `axis` (0 for none); NaN propagates."""
    return jnp.max(jnp.abs(m), axis=axis, initial=0)


def count_nonfinite(dtype: np.dtype) -> Callable[[Array, int], Array]:
    """A `reduce` for `per_leaf`: the number of NaN and inf entries along `axis`, in `dtype`."""

    def count(m: Array, axis: int) -> Array:
        return jnp.sum(~jnp.isfinite(m), axis=axis, dtype=dtype)

    return count


# Grouped norms with the overflow-safe branch -----------------------------------------


class Segments(NamedTuple):
    """A static grouping of leaves: `ids[i]` is the group of leaf i (`groups` = left out)."""

    ids: np.ndarray
    groups: int

    @classmethod
    def whole(cls, leaves: int) -> Segments:
        """One group holding every leaf."""
        return cls(np.zeros(leaves, np.int32), 1)

    @classmethod
    def from_groups(cls, groups: Sequence[tuple[str, Sequence[int]]], leaves: int) -> Segments:
        """The user's groups (`(name, leaf indices)` each); leaves in none are left out."""
        ids = np.full(leaves, len(groups), np.int32)
        for g, (_, indices) in enumerate(groups):
            ids[list(indices)] = g
        return cls(ids, len(groups))

    def is_identity(self) -> bool:
        """Whether every leaf is its own group, in order."""
        return self.groups == self.ids.size and bool(
            np.array_equal(self.ids, np.arange(self.ids.size))
        )

    def sum(self, values: Array) -> Array:
        """Per-group sums of per-leaf `values`."""
        if self.is_identity():
            return values
        if self.groups == 1 and not (self.ids != 0).any():
            return jnp.sum(values, keepdims=True, dtype=values.dtype)
        return jax.ops.segment_sum(values, self.ids, self.groups + 1)[: self.groups]

    def max(self, values: Array) -> Array:
        """Per-group maxima of per-leaf non-negative `values`; NaN propagates."""
        if self.is_identity():
            return values
        out = []
        for g in range(self.groups):
            idx = np.flatnonzero(self.ids == g)
            out.append(jnp.max(values[idx], initial=0) if idx.size else jnp.zeros((), values.dtype))
        return jnp.stack(out) if out else jnp.zeros((0,), values.dtype)

    def sizes(self, leaf_sizes: Sequence[int]) -> np.ndarray:
        """Static entry counts per group."""
        counts = np.zeros(self.groups + 1, np.int64)
        np.add.at(counts, self.ids, np.asarray(leaf_sizes, np.int64))
        return counts[: self.groups]


class Norms(NamedTuple):
    """What `norms` computes: per segmentation, the group norms; non-finite counts; extra.

    `extra` is what the `epilogue` made of the norms, inside the conditional.
    """

    norms: list[Array]
    nonfinite: list[Array] | None
    extra: Any = None


def norms(
    leaves: Sequence[Array],
    segments: Sequence[Segments],
    *,
    axis_name: AxisName = None,
    nonfinite: bool = False,
    pack: bool = True,
    matrices: list[Array] | None = None,
    plan: Layout | None = None,
    epilogue: Callable[[list[Array]], Any] | None = None,
) -> Norms:
    """L2 norms of groups of leaves, exact for every finite input; one read when ordinary.

    `segments[0]` must hold every leaf (its total decides the branch). With
    `nonfinite=True` the NaN/inf entries of each group are counted too (zeros without
    reading the gradient again when the sum of squares is finite).

    `epilogue(norms)` runs inside both branches and its result comes out of the
    conditional as `extra`: the scalars that every leaf's output fusion reads (a scale,
    a flag) are then computed once and passed in, never re-derived in each fusion.
    """
    leaves = [jnp.asarray(x) for x in leaves]
    acc = accumulation_dtype(x.dtype for x in leaves)
    sizes = [x.size for x in leaves]
    plan = plan or layout(leaves, pack)
    if matrices is None:
        matrices = rows(magnitudes(leaves, acc), plan)
    sq = per_leaf(matrices, plan, _square, jnp.sum)
    sums = psum([seg.sum(sq) for seg in segments], axis_name)
    counting = count_dtype(int(sum(sizes)) * axis_size(axis_name))

    def finish(result: Norms) -> Norms:
        return result._replace(extra=None if epilogue is None else epilogue(result.norms))

    def ordinary(matrices: list[Array]) -> Norms:
        counts = [jnp.zeros(seg.groups, counting) for seg in segments] if nonfinite else None
        return finish(Norms([safe_sqrt(s) for s in sums], counts))

    def rescued(matrices: list[Array]) -> Norms:
        return finish(_rescued(matrices, plan, segments, sums, axis_name, nonfinite, counting))

    if not leaves:
        return ordinary(matrices)
    return jax.lax.cond(jnp.isfinite(sums[0][0]), ordinary, rescued, matrices)


def _rescued(
    matrices: list[Array],
    plan: Layout,
    segments: Sequence[Segments],
    sums: list[Array],
    axis_name: AxisName,
    nonfinite: bool,
    counting: np.dtype,
) -> Norms:
    """The rare branch: the sums of squares again, every entry scaled down first.

    A group whose plain sum of squares is not finite is summed again with each entry
    scaled by a fixed power of two (`2**-80` in float32, `2**-600` in float64), so that no
    square of a finite entry overflows.

    Where the plain sum overflowed, the group's largest entries are beyond about 1e19, and
    the entries that the scaling sends below the smallest normal number contribute less
    than a rounding error: the result is exact to float32 rounding. NaN and inf entries
    keep the group's norm NaN or inf. One more read of the gradient, on a bad step only.
    """
    exponent = 600 if matrices and matrices[0].dtype == np.dtype(np.float64) else 80

    def scaled_square(m: Array) -> Array:
        # The factor passes an optimization barrier: with a known constant c, XLA rewrites
        # (m*c)*(m*c) as (m*m)*(c*c), which overflows (m*m) and underflows (c*c) to 0,
        # giving NaN (tests/test_reliability.py pins it). ldexp would be exact too, but
        # compiles to a dozen integer ops per leaf.
        small = m * jax.lax.optimization_barrier(jnp.asarray(2.0**-exponent, m.dtype))
        return small * small

    scaled = per_leaf(matrices, plan, scaled_square, jnp.sum)
    up = 2.0**exponent
    rescaled = psum([seg.sum(scaled) for seg in segments], axis_name)
    out = [
        jnp.where(jnp.isfinite(plain), safe_sqrt(plain), safe_sqrt(small) * up)
        for plain, small in zip(sums, rescaled, strict=True)
    ]
    counts = None
    if nonfinite:
        bad = per_leaf(matrices, plan, lambda m: m, count_nonfinite(counting))
        counts = psum([seg.sum(bad) for seg in segments], axis_name)
    return Norms(out, counts)


def global_norm(leaves: Sequence[Array], *, axis_name: AxisName = None, pack: bool = True) -> Array:
    """The L2 norm of all entries of `leaves` (0-d), exact for every finite input."""
    return from_global_norm(leaves, lambda norm: norm, axis_name=axis_name, pack=pack)


def from_global_norm(
    leaves: Sequence[Array],
    epilogue: Callable[[Array], Any],
    *,
    axis_name: AxisName = None,
    pack: bool = True,
) -> Any:
    """`epilogue(global L2 norm)`, computed once inside the norms' conditional."""
    segments = [Segments.whole(len(leaves))]
    result = norms(
        leaves,
        segments,
        axis_name=axis_name,
        pack=pack,
        epilogue=lambda found: epilogue(found[0][0]),
    )
    return result.extra


def rms(norm: Array, entries: Any, axis_name: AxisName) -> Array:
    """`norm / sqrt(N)`, with `N` the static entry count(s) over all shards; 0 for none."""
    n = np.asarray(entries, np.float64) * axis_size(axis_name)
    return norm / jnp.asarray(np.sqrt(np.where(n > 0, n, 1)), norm.dtype)


def tree_leaves(tree: PyTree) -> list[Array]:
    """`jax.tree.leaves(tree)` as arrays."""
    return [jnp.asarray(x) for x in jax.tree.leaves(tree)]
