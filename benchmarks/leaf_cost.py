"""Cost per leaf: compiled size and compile time of each whole-gradient op, and first calls.

Part 1 compiles every op alone (under `jax.jit`) on a tree of N small leaves and on 2N,
next to `optax.clip_by_global_norm`: the HLO text size (deterministic) and the compile
time (median of interleaved compiles, since a shared machine's load drifts), with ratios
to optax. An op whose cost grows with the square of the leaf count shows a 2N/N ratio
near 4.

Part 2 times the first eager call of `grad_norm`, `grad_clip` and `grad_stats` on 2,000
small leaves, each in a fresh process (so the first call pays every compilation, as in
a notebook), and then the median of repeated calls.

Usage: python benchmarks/leaf_cost.py [--leaves N] [--rounds R] [--first-leaves M] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jaxgrad as jg


def small_tree(n: int) -> dict[str, jax.Array]:
    """`n` small float32 leaves of a few shapes (biases and norm scales)."""
    shapes = [(8,), (16,), (8, 4), (32,)]
    return {f"p{i:05d}": jnp.full(shapes[i % 4], 1.0 + i % 3) for i in range(n)}


def _optax_clip(g: Any) -> Any:
    import optax

    tx = optax.clip_by_global_norm(1.0)
    return tx.update(g, tx.init(g))[0]


OPS: dict[str, Callable[[Any], Any]] = {
    "optax.clip_by_global_norm": _optax_clip,
    "grad_norm": jg.grad_norm,
    "grad_rms": jg.grad_rms,
    "grad_normalize": jg.grad_normalize,
    "grad_clip": lambda g: jg.grad_clip(g, 1.0),
    "grad_clip_by_rms": lambda g: jg.grad_clip_by_rms(g, 1.0),
    "grad_clip(by='leaf')": lambda g: jg.grad_clip(g, 1.0, by="leaf"),
    "grad_stats": jg.grad_stats,
    "grad_all_finite": jg.grad_all_finite,
    "grad_nonfinite_report": jg.grad_nonfinite_report,
    "grad_where_finite": lambda g: jg.grad_where_finite(g, 0.0),
}


def _compile(fn: Callable[[Any], Any], tree: Any) -> tuple[int, float]:
    """HLO text size and seconds of `jax.jit` lower + compile of a fresh wrapper of `fn`."""
    start = time.perf_counter()
    compiled = jax.jit(lambda t: fn(t)).lower(tree).compile()
    return len(compiled.as_text()), time.perf_counter() - start


def compile_table(leaves: int, rounds: int) -> str:
    """Markdown: HLO chars and compile time per op at N and 2N leaves, ratios to optax."""
    trees = {n: small_tree(n) for n in (leaves, 2 * leaves)}
    hlo: dict[tuple[str, int], int] = {}
    times: dict[tuple[str, int], list[float]] = {}
    jobs = [(name, n) for name in OPS for n in trees]
    shuffle = random.Random(0)
    for _ in range(rounds):
        for name, n in shuffle.sample(jobs, len(jobs)):
            size, seconds = _compile(OPS[name], trees[n])
            hlo[name, n] = size
            times.setdefault((name, n), []).append(seconds)
    base = "optax.clip_by_global_norm"
    lines = [
        f"| op | HLO chars, {leaves} leaves | HLO / optax | HLO {2 * leaves} / {leaves} | "
        f"compile s, {leaves} leaves | compile / optax |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in OPS:
        t = statistics.median(times[name, leaves])
        t_base = statistics.median(times[base, leaves])
        lines.append(
            f"| {name} | {hlo[name, leaves]:,} | {hlo[name, leaves] / hlo[base, leaves]:.2f} | "
            f"{hlo[name, 2 * leaves] / hlo[name, leaves]:.2f} | {t:.2f} | {t / t_base:.2f} |"
        )
    return "\n".join(lines)


_FIRST_CALL = """
import json, sys, time
import jax, jaxgrad as jg
sys.path.insert(0, {here!r})
from leaf_cost import small_tree
op = {op!r}
fn = {{"grad_norm": jg.grad_norm, "grad_clip": lambda g: jg.grad_clip(g, 1.0),
       "grad_stats": jg.grad_stats}}[op]
tree = small_tree({leaves})
jax.block_until_ready(tree)
start = time.perf_counter(); jax.block_until_ready(fn(tree)); first = time.perf_counter() - start
again = []
for _ in range(20):
    start = time.perf_counter(); jax.block_until_ready(fn(tree)); again.append(time.perf_counter() - start)
again.sort()
print(json.dumps({{"first": first, "again": again[len(again) // 2]}}))
"""


def first_call_table(leaves: int) -> str:
    """Markdown: the first eager call (fresh process) and the median repeated call."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    lines = [
        f"| op, eager, {leaves} leaves | first call s (fresh process) | repeated call ms |",
        "|---|---:|---:|",
    ]
    for op in ("grad_norm", "grad_clip", "grad_stats"):
        code = _FIRST_CALL.format(here=here, op=op, leaves=leaves)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        got = json.loads(out.strip().splitlines()[-1])
        lines.append(f"| {op} | {got['first']:.2f} | {got['again'] * 1e3:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Print (and return) both tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=200, help="N for the compile table")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved compiles per op")
    parser.add_argument("--first-leaves", type=int, default=2000, help="leaves for part 2")
    parser.add_argument("--smoke", action="store_true", help="20 leaves, 1 round: a check")
    args = parser.parse_args(argv)
    if args.smoke:
        args.leaves, args.rounds, args.first_leaves = 20, 1, 50
    if min(args.leaves, args.rounds, args.first_leaves) < 1:
        parser.error("--leaves, --rounds and --first-leaves must be positive")
    header = (
        f"# Cost per leaf\n\n{time.strftime('%Y-%m-%d %H:%M')}, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}; compile time: median of {args.rounds} "
        "interleaved compiles."
    )
    text = "\n\n".join(
        [header, compile_table(args.leaves, args.rounds), first_call_table(args.first_leaves)]
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
