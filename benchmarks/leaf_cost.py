"""Cost per leaf: compiled size and compile time of each whole-gradient op, and first calls.

Part 1 compiles every op alone (under `jax.jit`) on a tree of N small leaves, next to the
reference `optax.clip_by_global_norm`. Compile times are measured fairly: every compile
is of a fresh function object after `jax.clear_caches()`, so that no trace, lowering or
executable cached by an earlier compile (jaxgrad's kernels are themselves jitted) is
reused, as in a fresh process; each op is compiled in interleaved pairs with the
reference (the two in a random order, back to back), and the table gives the median of
the per-pair ratios (with their range), since a shared machine's load drifts. The HLO
text size (deterministic) is compared to the reference's and to the same op's at 2N
leaves: an op whose cost grows with the square of the leaf count shows a 2N/N ratio
near 4.

Part 2 times the first eager call of `grad_norm`, `grad_clip` and `grad_stats` on 2,000
small leaves, each in a fresh process (so the first call pays every compilation, as in
a notebook), and then the median of repeated calls.

Usage: python benchmarks/leaf_cost.py [--leaves N] [--rounds R] [--first-leaves M]
       [--only OP[,OP...]] [--skip-first-call] [--smoke]

About 3 minutes on 2 quiet CPU cores with the defaults (200 leaves, 5 pairs per op);
`--rounds 2` for a quicker, noisier look.
"""

from __future__ import annotations

import argparse
import json
import os
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


REFERENCE = "optax.clip_by_global_norm"


def _compile(fn: Callable[[Any], Any], tree: Any) -> tuple[int, float]:
    """HLO text size and seconds of lower + compile of a fresh jit, after clearing caches."""
    jax.clear_caches()
    jitted = jax.jit(lambda t: fn(t))  # a fresh function object: no cache entry to hit
    start = time.perf_counter()
    compiled = jitted.lower(tree).compile()
    return len(compiled.as_text()), time.perf_counter() - start


def compile_table(leaves: int, rounds: int, ops: list[str] | None = None) -> str:
    """Markdown: HLO chars at N and 2N leaves and paired compile-time ratios to optax."""
    names = [name for name in OPS if name != REFERENCE and (ops is None or name in ops)]
    small, large = small_tree(leaves), small_tree(2 * leaves)
    jax.block_until_ready((small, large))
    _compile(OPS[REFERENCE], small)  # untimed: the process's one-time costs
    hlo = {name: _compile(OPS[name], small)[0] for name in [REFERENCE, *names]}
    hlo_2n = {name: _compile(OPS[name], large)[0] for name in [REFERENCE, *names]}
    seconds: dict[str, list[float]] = {name: [] for name in [REFERENCE, *names]}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            pair = {}
            for member in order.sample([REFERENCE, name], 2):
                pair[member] = _compile(OPS[member], small)[1]
                seconds[member].append(pair[member])
            ratios[name].append(pair[name] / pair[REFERENCE])
    lines = [
        f"| op | HLO chars, {leaves} leaves | HLO / optax | HLO {2 * leaves} / {leaves} | "
        f"compile s, {leaves} leaves | compile / optax (median of pairs) | range |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [REFERENCE, *names]:
        t = statistics.median(seconds[name])
        if name == REFERENCE:
            ratio, spread = "1.00", "—"
        else:
            ratio = f"{statistics.median(ratios[name]):.2f}"
            spread = f"{min(ratios[name]):.2f}–{max(ratios[name]):.2f}"
        lines.append(
            f"| {name} | {hlo[name]:,} | {hlo[name] / hlo[REFERENCE]:.2f} | "
            f"{hlo_2n[name] / hlo[name]:.2f} | {t:.2f} | {ratio} | {spread} |"
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
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--leaves", type=int, default=200, help="N for the compile table")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved pairs (op, optax) per op (default 5)"
    )
    parser.add_argument("--first-leaves", type=int, default=2000, help="leaves for part 2")
    parser.add_argument("--only", metavar="OP[,OP]", help=f"a subset of: {', '.join(OPS)}")
    parser.add_argument("--skip-first-call", action="store_true", help="part 1 only")
    parser.add_argument("--smoke", action="store_true", help="20 leaves, 1 pair: a check")
    args = parser.parse_args(argv)
    if args.smoke:
        args.leaves, args.rounds, args.first_leaves = 20, 1, 50
    if min(args.leaves, args.rounds, args.first_leaves) < 1:
        parser.error("--leaves, --rounds and --first-leaves must be positive")
    ops = None
    if args.only is not None:
        ops = [op.strip() for op in args.only.split(",") if op.strip()]
        unknown = sorted(set(ops) - set(OPS))
        if unknown or not ops:
            parser.error(f"--only: unknown op(s) {unknown}; choose from {list(OPS)}")
    header = (
        f"# Cost per leaf\n\n{time.strftime('%Y-%m-%d %H:%M')}, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores; compile time: {args.rounds} "
        f"interleaved pair{'s' if args.rounds != 1 else ''} with optax per op, each compile of a fresh function after "
        "jax.clear_caches(); the ratio is the median of the pairs' ratios."
    )
    parts = [header, compile_table(args.leaves, args.rounds, ops)]
    if not args.skip_first_call:
        parts.append(first_call_table(args.first_leaves))
    text = "\n\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
