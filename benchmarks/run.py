"""jaxgrad against the alternatives: `make bench` prints markdown tables and the targets.

Every operation runs in several variants side by side in one process: jaxgrad eager and
under the user's `jax.jit`, `optax.tree_utils` eager and jitted where it has the
operation, a hand-written `jax.tree.map` eager and jitted, a paysage-style loop over numpy
arrays, and the roofline: the same arithmetic on one flat array of all the entries,
jitted. Runs are interleaved (one of each variant per round, in a shuffled order) and
the median over rounds is reported, since a shared machine is noisy.

Usage: python benchmarks/run.py [--rounds N] [--only A|B|compile|memory] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trees import tree_a, tree_b, wide_tree  # noqa: E402

import jaxgrad as jg  # noqa: E402

VARIANTS = [
    "jaxgrad eager",
    "jaxgrad jit",
    "optax eager",
    "optax jit",
    "tree.map eager",
    "tree.map jit",
    "numpy loop",
    "roofline",
]


def _half(x: Any) -> Any:
    return x * 0.5


@dataclass
class Case:
    """One variant of one operation: `run(*prepare())` is timed, `prepare` is not."""

    run: Callable[..., Any]
    prepare: Callable[[], tuple[Any, ...]]


@dataclass
class Row:
    """The cases of one operation, by variant name."""

    op: str
    cases: dict[str, Case] = field(default_factory=dict)


def _block(out: Any) -> None:
    for leaf in jax.tree.leaves(out):
        if isinstance(leaf, jax.Array):
            leaf.block_until_ready()


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.copy(), tree)


def _tree_sumsq(t: Any) -> Any:
    return sum(jax.tree.leaves(jax.tree.map(lambda x: jnp.sum(x * x), t)))


def _optax_tree_utils() -> Any:
    """`optax.tree_utils`, imported when a benchmark first needs it (so `--help` needs no optax)."""
    try:
        import optax.tree_utils as otu
    except ImportError as error:
        raise SystemExit(
            "benchmarks/run.py compares jaxgrad with optax, which is not installed: "
            "pip install -e '.[test]'"
        ) from error
    return otu


def build_rows(tree: Any) -> list[Row]:
    """Every operation with its variants, on `tree`."""
    otu = _optax_tree_utils()
    other = jax.tree.map(lambda x: x + 1, tree)
    flat = jg.grad_flatten(tree)
    flat2 = flat + 1
    size = flat.size
    np_leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    np_other = [np.asarray(x) for x in jax.tree.leaves(other)]
    key = jax.random.key(0)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    _, unravel = ravel_pytree(tree)
    rng = np.random.default_rng(0)
    same = lambda *args: lambda: args  # noqa: E731
    jit = jax.jit

    def tm_norm(t: Any) -> Any:
        return jnp.sqrt(_tree_sumsq(t))

    def tm_rms(t: Any) -> Any:
        return jnp.sqrt(_tree_sumsq(t) / size)

    def tm_normalize(t: Any) -> Any:
        n = tm_norm(t)
        return jax.tree.map(lambda x: x / n, t)

    def tm_random(t: Any, k: Any) -> Any:
        leaves, treedef = jax.tree.flatten(t)
        keys = jax.random.split(k, len(leaves))
        return jax.tree.unflatten(
            treedef,
            [jax.random.uniform(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves, strict=True)],
        )

    def tm_flatten(t: Any) -> Any:
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(t)])

    def np_norm(leaves: list[np.ndarray]) -> Any:
        return np.sqrt(sum(float(np.sum(x * x)) for x in leaves))

    def np_normalize(leaves: list[np.ndarray]) -> list[np.ndarray]:
        n = np_norm(leaves)
        return [x / n for x in leaves]

    def np_unflatten(v: np.ndarray) -> list[np.ndarray]:
        cuts = np.cumsum([x.size for x in np_leaves])[:-1]
        return [p.reshape(x.shape) for p, x in zip(np.split(v, cuts), np_leaves, strict=True)]

    rows = [
        Row(
            "norm",
            {
                "jaxgrad eager": Case(jg.grad_norm, same(tree)),
                "jaxgrad jit": Case(jit(jg.grad_norm), same(tree)),
                "optax eager": Case(otu.tree_norm, same(tree)),
                "optax jit": Case(jit(otu.tree_norm), same(tree)),
                "tree.map eager": Case(tm_norm, same(tree)),
                "tree.map jit": Case(jit(tm_norm), same(tree)),
                "numpy loop": Case(np_norm, same(np_leaves)),
                "roofline": Case(jit(lambda x: jnp.sqrt(jnp.sum(x * x))), same(flat)),
            },
        ),
        Row(
            "magnitude",
            {
                "jaxgrad eager": Case(jg.grad_rms, same(tree)),
                "jaxgrad jit": Case(jit(jg.grad_rms), same(tree)),
                "tree.map eager": Case(tm_rms, same(tree)),
                "tree.map jit": Case(jit(tm_rms), same(tree)),
                "numpy loop": Case(lambda ls: np_norm(ls) / np.sqrt(size), same(np_leaves)),
                "roofline": Case(jit(lambda x: jnp.sqrt(jnp.mean(x * x))), same(flat)),
            },
        ),
        Row(
            "accumulate sum",
            {
                "jaxgrad eager": Case(lambda t: jg.grad_accumulate(jnp.sum, t), same(tree)),
                "jaxgrad jit": Case(jit(lambda t: jg.grad_accumulate(jnp.sum, t)), same(tree)),
                "optax eager": Case(otu.tree_sum, same(tree)),
                "optax jit": Case(jit(otu.tree_sum), same(tree)),
                "tree.map eager": Case(
                    lambda t: sum(jax.tree.leaves(jax.tree.map(jnp.sum, t))), same(tree)
                ),
                "tree.map jit": Case(
                    jit(lambda t: sum(jax.tree.leaves(jax.tree.map(jnp.sum, t)))), same(tree)
                ),
                "numpy loop": Case(lambda ls: sum(float(np.sum(x)) for x in ls), same(np_leaves)),
                "roofline": Case(jit(jnp.sum), same(flat)),
            },
        ),
        Row(
            "mapzip add",
            {
                "jaxgrad eager": Case(
                    lambda a, b: jg.grad_mapzip(jnp.add, a, b), same(tree, other)
                ),
                "jaxgrad jit": Case(
                    jit(lambda a, b: jg.grad_mapzip(jnp.add, a, b)), same(tree, other)
                ),
                "optax eager": Case(otu.tree_add, same(tree, other)),
                "optax jit": Case(jit(otu.tree_add), same(tree, other)),
                "tree.map eager": Case(lambda a, b: jax.tree.map(jnp.add, a, b), same(tree, other)),
                "tree.map jit": Case(
                    jit(lambda a, b: jax.tree.map(jnp.add, a, b)), same(tree, other)
                ),
                "numpy loop": Case(
                    lambda a, b: [x + y for x, y in zip(a, b, strict=True)],
                    same(np_leaves, np_other),
                ),
                "roofline": Case(jit(jnp.add), same(flat, flat2)),
            },
        ),
        Row(
            "apply scale",
            {
                "jaxgrad eager": Case(lambda t: jg.grad_apply(_half, t), same(tree)),
                "jaxgrad jit": Case(jit(lambda t: jg.grad_apply(_half, t)), same(tree)),
                "optax eager": Case(lambda t: otu.tree_scale(0.5, t), same(tree)),
                "optax jit": Case(jit(lambda t: otu.tree_scale(0.5, t)), same(tree)),
                "tree.map eager": Case(lambda t: jax.tree.map(_half, t), same(tree)),
                "tree.map jit": Case(jit(lambda t: jax.tree.map(_half, t)), same(tree)),
                "numpy loop": Case(lambda ls: [x * 0.5 for x in ls], same(np_leaves)),
                "roofline": Case(jit(_half), same(flat)),
            },
        ),
        Row(
            "apply_ donated",
            {
                "jaxgrad eager": Case(
                    lambda t: jg.grad_apply_(_half, t, donate=True), lambda: (_copy(tree),)
                ),
                "jaxgrad jit": Case(
                    jit(lambda t: jg.grad_apply_(_half, t), donate_argnums=0),
                    lambda: (_copy(tree),),
                ),
                "tree.map jit": Case(
                    jit(lambda t: jax.tree.map(_half, t), donate_argnums=0), lambda: (_copy(tree),)
                ),
                "numpy loop": Case(
                    lambda ls: [np.multiply(x, 0.5, out=x) for x in ls],
                    lambda: ([x.copy() for x in np_leaves],),
                ),
                "roofline": Case(jit(_half, donate_argnums=0), lambda: (flat.copy(),)),
            },
        ),
        Row(
            "normalize",
            {
                "jaxgrad eager": Case(jg.grad_normalize, same(tree)),
                "jaxgrad jit": Case(jit(jg.grad_normalize), same(tree)),
                "tree.map eager": Case(tm_normalize, same(tree)),
                "tree.map jit": Case(jit(tm_normalize), same(tree)),
                "numpy loop": Case(np_normalize, same(np_leaves)),
                "roofline": Case(jit(lambda x: x / jnp.sqrt(jnp.sum(x * x))), same(flat)),
            },
        ),
        Row(
            "zero_grad",
            {
                "jaxgrad eager": Case(jg.zero_grad, same(tree)),
                "jaxgrad jit": Case(jit(jg.zero_grad), same(tree)),
                "optax eager": Case(otu.tree_zeros_like, same(tree)),
                "optax jit": Case(jit(otu.tree_zeros_like), same(tree)),
                "tree.map eager": Case(lambda t: jax.tree.map(jnp.zeros_like, t), same(tree)),
                "tree.map jit": Case(jit(lambda t: jax.tree.map(jnp.zeros_like, t)), same(tree)),
                "numpy loop": Case(lambda ls: [np.zeros_like(x) for x in ls], same(np_leaves)),
                "roofline": Case(jit(jnp.zeros_like), same(flat)),
            },
        ),
        Row(
            "random_grad",
            {
                "jaxgrad eager": Case(jg.random_grad, same(tree, key)),
                "jaxgrad jit": Case(jit(jg.random_grad), same(tree, key)),
                "optax eager": Case(lambda t, k: otu.tree_random_like(k, t), same(tree, key)),
                "optax jit": Case(jit(lambda t, k: otu.tree_random_like(k, t)), same(tree, key)),
                "tree.map eager": Case(tm_random, same(tree, key)),
                "tree.map jit": Case(jit(tm_random), same(tree, key)),
                "numpy loop": Case(
                    lambda ls: [rng.random(x.shape, np.float32) for x in ls], same(np_leaves)
                ),
                "roofline": Case(jit(lambda k: jax.random.uniform(k, (size,))), same(key)),
            },
        ),
        Row(
            "flatten",
            {
                "jaxgrad eager": Case(jg.grad_flatten, same(tree)),
                "jaxgrad jit": Case(jit(jg.grad_flatten), same(tree)),
                "tree.map eager": Case(tm_flatten, same(tree)),
                "tree.map jit": Case(jit(tm_flatten), same(tree)),
                "numpy loop": Case(
                    lambda ls: np.concatenate([x.ravel() for x in ls]), same(np_leaves)
                ),
                "roofline": Case(jit(jnp.negative), same(flat)),
            },
        ),
        Row(
            "unflatten",
            {
                "jaxgrad eager": Case(lambda v: jg.grad_unflatten(v, like), same(flat)),
                "jaxgrad jit": Case(jit(lambda v: jg.grad_unflatten(v, like)), same(flat)),
                "tree.map eager": Case(unravel, same(flat)),
                "tree.map jit": Case(jit(unravel), same(flat)),
                "numpy loop": Case(np_unflatten, same(np.asarray(flat))),
                "roofline": Case(jit(jnp.negative), same(flat)),
            },
        ),
    ]
    return rows


def time_rows(rows: list[Row], rounds: int, queue: int = 1) -> dict[str, dict[str, float]]:
    """Median seconds per (op, variant), interleaving every case in each round.

    With `queue` > 1, each sample is `queue` calls issued back to back and waited for
    once, divided by `queue`: on a GPU one call plus its synchronisation carries a fixed
    latency (about 0.6 ms on an H200) that a train step, which queues its work, never
    pays.
    """
    samples: dict[tuple[str, str], list[float]] = {}
    for row in rows:  # warm-up: compile everything once
        for case in row.cases.values():
            _block(case.run(*case.prepare()))
    order = random.Random(0)
    for _ in range(rounds):
        for row in rows:
            # A fresh order each round, so no variant always follows the same neighbour
            # (the allocator and cache state an operation leaves behind skews the next).
            for name, case in order.sample(list(row.cases.items()), len(row.cases)):
                batch = [case.prepare() for _ in range(queue)]
                _block(batch)
                start = time.perf_counter()
                _block([case.run(*args) for args in batch])
                elapsed = (time.perf_counter() - start) / queue
                samples.setdefault((row.op, name), []).append(elapsed)
    out: dict[str, dict[str, float]] = {}
    for (op, name), values in samples.items():
        out.setdefault(op, {})[name] = statistics.median(values)
    return out


def _fmt(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms >= 0.1 else f"{ms * 1e3:.3g} µs"


def table(times: dict[str, dict[str, float]]) -> str:
    """Markdown: time and ratio to the roofline for every op and variant."""
    lines = ["| op | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
    for op, row in times.items():
        roof = row["roofline"]
        cells = []
        for name in VARIANTS:
            if name not in row:
                cells.append("—")
            elif name == "roofline":
                cells.append(_fmt(row[name]))
            else:
                cells.append(f"{_fmt(row[name])} ({row[name] / roof:.2f}x)")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_times(leaves: int, rounds: int) -> tuple[float, float]:
    """Median seconds to trace, lower and compile a jitted norm: (jaxgrad, optax)."""
    otu = _optax_tree_utils()
    tree = wide_tree(leaves)
    got: dict[str, list[float]] = {"jaxgrad": [], "optax": []}
    for _ in range(rounds):
        for name, fn in (("jaxgrad", jg.grad_norm), ("optax", otu.tree_norm)):
            wrapped = jax.jit(lambda t, fn=fn: fn(t))  # a fresh function: no cache hit
            start = time.perf_counter()
            wrapped.lower(tree).compile()
            got[name].append(time.perf_counter() - start)
    return statistics.median(got["jaxgrad"]), statistics.median(got["optax"])


_MEMORY_SCRIPT = r"""
import sys
sys.path.insert(0, {bench!r})
import jax, jax.numpy as jnp
import jaxgrad as jg
from trees import tree_a
donate, op = {donate}, {op!r}


def update(tree, other):
    if op == "apply_":
        return jg.grad_apply_(jnp.negative, tree, donate=donate)
    if op == "mapzip_":
        return jg.grad_mapzip_(jnp.add, tree, other, donate=donate)
    return jg.grad_normalize_(tree, donate=donate)


def host_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


other = tree_a(1)
stats = jax.devices()[0].memory_stats()  # None on CPU: then the process's resident memory
if not stats:  # compiling grows host memory: do it before measuring
    jax.block_until_ready(update(tree_a(), other))
tree = tree_a()
jax.block_until_ready(tree)
if stats:  # device memory; its peak counter cannot be reset, so nothing ran before
    base = jax.devices()[0].memory_stats()["bytes_in_use"]
else:
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark VmHWM
        f.write("5")
    base = host_kib("VmRSS:") * 1024
for _ in range(3):
    tree = update(tree, other)
    jax.block_until_ready(tree)
stats = jax.devices()[0].memory_stats()
peak = stats["peak_bytes_in_use"] if stats else host_kib("VmHWM:") * 1024
print(peak - base)
"""


def peak_memory_mb(op: str, donate: bool) -> float:
    """Growth of peak memory (MiB) over three in-place updates of tree A, in a fresh process.

    Device memory where the backend reports it (GPU), else the process's peak RSS (CPU).
    """
    script = _MEMORY_SCRIPT.format(
        bench=os.path.dirname(os.path.abspath(__file__)), donate=donate, op=op
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
    )
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def print_compile() -> tuple[float, float]:
    """The compile-time row: jitted norm of a 2,000-leaf tree, jaxgrad against optax."""
    jg_c, optax_c = compile_times(2000, 5)
    print(
        f"## Compile time, jitted norm of a 2,000-leaf tree\n\njaxgrad {jg_c:.3f} s, "
        f"optax {optax_c:.3f} s, ratio {jg_c / optax_c:.2f}\n"
    )
    return jg_c, optax_c


def print_memory() -> None:
    """The peak-memory table of the in-place variants, with and without donation."""
    where = "device memory" if jax.devices()[0].memory_stats() else "peak RSS of the process"
    print(f"## Peak memory growth ({where}) over three in-place updates of tree A (160 MiB)\n")
    print("| op | donate=False | donate=True |\n|---|---|---|")
    for op in ("apply_", "mapzip_", "normalize_"):
        print(
            f"| grad_{op} | {peak_memory_mb(op, False):.0f} MiB | {peak_memory_mb(op, True):.0f} MiB |"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    """Run every benchmark and print the tables and the target checks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--only",
        choices=["A", "B", "compile", "memory"],
        help="one part alone: a tree's table, the compile time or the peak memory (no targets)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny trees, one round: a check that it runs"
    )
    parser.add_argument(
        "--queue",
        type=int,
        default=None,
        help="calls queued per timing sample (default: 30 on a GPU, 1 on a CPU)",
    )
    args = parser.parse_args(argv)
    queue = args.queue or (30 if jax.default_backend() == "gpu" else 1)
    if args.only == "memory":
        print_memory()
        return 0
    if args.only == "compile":
        print_compile()
        return 0

    print(
        f"# jaxgrad benchmarks\n\njax {jax.__version__}, {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"median of {args.rounds if not args.smoke else 1} interleaved rounds, "
        f"{queue} call(s) queued per sample.\n"
    )
    trees = {}
    if args.only in (None, "A") and not args.smoke:
        trees["A (145 leaves, 42M entries)"] = tree_a()
    if args.only in (None, "B"):
        trees["B (145 leaves x 4)"] = tree_b()
    results = {}
    for label, tree in trees.items():
        times = time_rows(build_rows(tree), 1 if args.smoke else args.rounds, queue)
        results[label] = times
        print(f"## Tree {label}\n\n{table(times)}\n")
    if args.smoke or args.only:
        return 0

    jg_c, optax_c = print_compile()
    print_memory()

    a, b = results["A (145 leaves, 42M entries)"], results["B (145 leaves x 4)"]
    checks = []
    for op in ("norm", "magnitude", "accumulate sum", "mapzip add"):
        checks.append(
            (
                f"jit {op} on A within 1.15x of roofline",
                a[op]["jaxgrad jit"] / a[op]["roofline"],
                1.15,
            )
        )
    for op in (
        "norm",
        "magnitude",
        "normalize",
        "zero_grad",
        "random_grad",
        "flatten",
        "unflatten",
    ):
        checks.append(
            (
                f"eager {op} on B within 1.5x of jit",
                b[op]["jaxgrad eager"] / b[op]["jaxgrad jit"],
                1.5,
            )
        )
        checks.append(
            (
                f"eager {op} on A within 1.15x of jit",
                a[op]["jaxgrad eager"] / a[op]["jaxgrad jit"],
                1.15,
            )
        )
    checks.append(
        (
            "eager norm on B at least 5x faster than eager optax (ratio shown)",
            b["norm"]["jaxgrad eager"] / b["norm"]["optax eager"],
            0.2,
        )
    )
    for label, row in (("A", a), ("B", b)):
        checks.append(
            (
                f"eager grad_apply on {label} within 1.1x of eager tree.map",
                row["apply scale"]["jaxgrad eager"] / row["apply scale"]["tree.map eager"],
                1.1,
            )
        )
    checks.append(
        (
            "donated grad_apply_ on A at most 0.7x of copying grad_apply",
            a["apply_ donated"]["jaxgrad eager"] / a["apply scale"]["jaxgrad eager"],
            0.7,
        )
    )
    checks.append(("compile time of jitted norm, 2,000 leaves, vs optax", jg_c / optax_c, 1.1))
    print("## Targets\n\n| target | measured | bound | |\n|---|---|---|---|")
    for name, value, bound in checks:
        print(f"| {name} | {value:.2f} | {bound} | {'ok' if value <= bound else 'MISSED'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
