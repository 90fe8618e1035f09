"""The cost of jaxgrad's gradient processing inside a real jitted train step.

A stack of residual blocks (LayerNorm + MLP, 6 parameter leaves each: `ln_scale`,
`ln_bias`, `w1`, `b1`, `w2`, `b2`) as a plain nested dict, a mean-squared-error loss
against a random target, and the step a user writes:

    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    grads, logs = <variant>(grads)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

jitted with `donate_argnums=(0, 1)` (params and optimizer state donated), returning
`(params, opt_state, loss, logs)` so that nothing the variant computes is dead code.
The variants (the gradient processing; the optimizer is `optax.adamw(1e-3)`):

- `plain`: nothing;
- `optax clip`: `optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))`;
- `jaxgrad clip`: `jaxgrad.grad_clip(grads, 1.0)`, its `ClipStats` as the logs;
- `jaxgrad full diagnostics`: `jaxgrad.grad_clip(grads, 1.0, by="leaf")`, one pass with
  per-leaf norm / RMS / max-abs / non-finite counts; where `grad_clip` has no `by=`
  keyword yet, the three calls below (the notes under the table say which ran);
- `jaxgrad clip+stats+report (3 calls)`: `grad_clip`, `grad_stats(grads, by="leaf")` and
  `grad_nonfinite_report(grads)`, the old way.

For each variant: the compile time (`jax.jit(step, donate_argnums=(0, 1)).lower(...)
.compile()` wall time, a fresh `jax.jit` of a fresh function, after one untimed compile
that pays the process's one-time costs), the size of the compiled HLO text, and the
median step time over interleaved rounds (every variant once per round, in a shuffled
order, each timed up to `jax.block_until_ready` of its outputs, after a few warm-up
steps). Every variant feeds its own donated params and optimizer state back to itself.
Ratios are to `optax clip`.

Sizes: 24 blocks, D=128, batch 128 on CPU; 48 blocks, D=1024, batch 512 (`--gpu-size`,
the default when JAX's backend is a GPU and no size option is given).

Usage: python benchmarks/train_step.py [--blocks N] [--dim D] [--batch B] [--rounds N]
       [--gpu-size | --smoke] [--only NAME[,NAME...]]
"""

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxgrad as jg

PyTree = Any
Batch = dict[str, jax.Array]
GradFn = Callable[[PyTree], tuple[PyTree, PyTree]]

BASELINE = "optax clip"
VARIANTS = [
    "plain",
    "optax clip",
    "jaxgrad clip",
    "jaxgrad full diagnostics",
    "jaxgrad clip+stats+report (3 calls)",
]
LEAVES_PER_BLOCK = 6
WARMUP_STEPS = 3

# name: (blocks, dim, batch, rounds)
PRESETS = {
    "cpu": (24, 128, 128, 20),
    "gpu": (48, 1024, 512, 20),
    "smoke": (2, 16, 8, 3),
}

# Which form `jaxgrad full diagnostics` was traced with (set while tracing its step).
_FULL_FORM: dict[str, str] = {}


# --- the model ---------------------------------------------------------------------------


def init_params(blocks: int, dim: int, seed: int = 0) -> dict[str, dict[str, jax.Array]]:
    """`blocks` residual blocks of LayerNorm + MLP (D -> 4D -> D), 6 float32 leaves each."""
    hidden = 4 * dim
    params = {}
    for i, key in enumerate(jax.random.split(jax.random.key(seed), blocks)):
        k1, k2 = jax.random.split(key)
        params[f"block{i:02d}"] = {
            "ln_scale": jnp.ones((dim,), jnp.float32),
            "ln_bias": jnp.zeros((dim,), jnp.float32),
            "w1": jax.random.normal(k1, (dim, hidden), jnp.float32) / np.sqrt(dim),
            "b1": jnp.zeros((hidden,), jnp.float32),
            # Small output weights keep the residual stream tame however deep the stack.
            "w2": jax.random.normal(k2, (hidden, dim), jnp.float32) / np.sqrt(hidden * blocks),
            "b2": jnp.zeros((dim,), jnp.float32),
        }
    return params


def make_batch(batch: int, dim: int, seed: int = 1) -> Batch:
    """A random input `x` and target `y`, both (batch, D) float32."""
    kx, ky = jax.random.split(jax.random.key(seed))
    return {
        "x": jax.random.normal(kx, (batch, dim), jnp.float32),
        "y": jax.random.normal(ky, (batch, dim), jnp.float32),
    }


def forward(params: dict[str, dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    """The residual stack: `h + MLP(LayerNorm(h))` for every block, in key order."""
    h = x
    for name in sorted(params):
        p = params[name]
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        normed = (h - mean) * jax.lax.rsqrt(var + 1e-5) * p["ln_scale"] + p["ln_bias"]
        h = h + jax.nn.gelu(normed @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return h


def loss_fn(params: dict[str, dict[str, jax.Array]], batch: Batch) -> jax.Array:
    """Mean squared error of the stack's output against the batch's target."""
    return jnp.mean(jnp.square(forward(params, batch["x"]) - batch["y"]))


# --- the variants ------------------------------------------------------------------------


def process_plain(grads: PyTree) -> tuple[PyTree, PyTree]:
    """No processing (also `optax clip`, whose clip is in the optimizer chain)."""
    return grads, {}


def process_jaxgrad_clip(grads: PyTree) -> tuple[PyTree, PyTree]:
    """`jaxgrad.grad_clip` to norm 1, its `ClipStats` as the logs."""
    return jg.grad_clip(grads, 1.0)


def process_three_calls(grads: PyTree) -> tuple[PyTree, PyTree]:
    """Clip, per-leaf statistics and non-finite report as three calls on the raw gradient."""
    stats = jg.grad_stats(grads, by="leaf")
    report = jg.grad_nonfinite_report(grads)
    clipped, clip_stats = jg.grad_clip(grads, 1.0)
    return clipped, {"clip": clip_stats, "stats": stats, "nonfinite": report}


def process_full_diagnostics(grads: PyTree) -> tuple[PyTree, PyTree]:
    """The one-pass `grad_clip(grads, 1.0, by="leaf")`, or the three calls where no `by=`."""
    try:
        clipped, stats = jg.grad_clip(grads, 1.0, by="leaf")  # type: ignore[call-arg]
    except TypeError as err:
        if "'by'" not in str(err):  # a TypeError about something else is a real error
            raise
        _FULL_FORM["form"] = (
            "3 calls (grad_clip + grad_stats + grad_nonfinite_report): "
            "grad_clip has no by= keyword in this jaxgrad"
        )
        return process_three_calls(grads)
    _FULL_FORM["form"] = 'one call, grad_clip(grads, 1.0, by="leaf")'
    return clipped, stats


PROCESS: dict[str, GradFn] = {
    "plain": process_plain,
    "optax clip": process_plain,
    "jaxgrad clip": process_jaxgrad_clip,
    "jaxgrad full diagnostics": process_full_diagnostics,
    "jaxgrad clip+stats+report (3 calls)": process_three_calls,
}


def make_optimizer(variant: str) -> optax.GradientTransformation:
    """`adamw(1e-3)`, behind `clip_by_global_norm(1.0)` for `optax clip`."""
    if variant == "optax clip":
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    return optax.adamw(1e-3)


def make_step(process: GradFn, opt: optax.GradientTransformation) -> Callable[..., Any]:
    """A fresh (never cached) train step function: grads, `process`, optimizer update."""

    def step(params: PyTree, opt_state: PyTree, batch: Batch) -> tuple[Any, Any, Any, Any]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        grads, logs = process(grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, logs

    return step


# --- measuring ---------------------------------------------------------------------------


@dataclass
class Runner:
    """One variant: its compiled step and the params and state it feeds back to itself."""

    name: str
    compiled: Any
    params: PyTree
    opt_state: PyTree
    compile_s: float
    hlo_chars: int
    times: list[float] = field(default_factory=list)
    compile_times: list[float] = field(default_factory=list)

    def step(self, batch: Batch) -> float:
        """Run one step, keep its new params and state; the wall time in seconds."""
        start = time.perf_counter()
        out = self.compiled(self.params, self.opt_state, batch)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - start
        self.params, self.opt_state = out[0], out[1]
        return elapsed


def _copy(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x.copy(), tree)


def _compile(name: str, params: PyTree, opt_state: PyTree, batch: Batch) -> tuple[Any, float]:
    """`name`'s step compiled with a fresh `jax.jit` of a fresh function, and the seconds."""
    jitted = jax.jit(make_step(PROCESS[name], make_optimizer(name)), donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = jitted.lower(params, opt_state, batch).compile()
    return compiled, time.perf_counter() - start


def build(name: str, params: PyTree, batch: Batch) -> Runner:
    """Compile `name`'s step on its own copy of `params` (timed), with a fresh `jax.jit`."""
    own = _copy(params)
    opt_state = make_optimizer(name).init(own)
    jax.block_until_ready((own, opt_state))
    compiled, compile_s = _compile(name, own, opt_state, batch)
    runner = Runner(name, compiled, own, opt_state, compile_s, len(compiled.as_text()))
    runner.compile_times.append(compile_s)
    return runner


def measure(
    names: list[str], params: PyTree, batch: Batch, rounds: int, compile_rounds: int = 1
) -> list[Runner]:
    """Compile every variant (`compile_rounds` times, interleaved), then time `rounds` rounds.

    A shared machine's load drifts over minutes, so the compiles are interleaved in a
    shuffled order like the steps, and the median is reported.
    """
    # One untimed compile first, so that the first variant does not pay the process's
    # one-time costs (lowering rules, jnp's own jitted helpers at these shapes).
    warm = make_optimizer("plain")
    jax.jit(make_step(process_plain, warm), donate_argnums=(0, 1)).lower(
        params, warm.init(params), batch
    ).compile()
    runners = [build(name, params, batch) for name in names]
    shuffle = random.Random(1)
    for _ in range(compile_rounds - 1):
        for runner in shuffle.sample(runners, len(runners)):
            _, seconds = _compile(runner.name, runner.params, runner.opt_state, batch)
            runner.compile_times.append(seconds)
    for runner in runners:
        runner.compile_s = statistics.median(runner.compile_times)
    for runner in runners:
        for _ in range(WARMUP_STEPS):
            runner.step(batch)
    order = random.Random(0)
    for _ in range(rounds):
        for runner in order.sample(runners, len(runners)):
            runner.times.append(runner.step(batch))
    return runners


# --- reporting ---------------------------------------------------------------------------


def _ratio(value: float, base: float | None) -> str:
    return "—" if base is None else f"{value / base:.2f}"


def table(runners: list[Runner]) -> str:
    """Markdown: compile time, HLO size and median step time, with ratios to optax clip."""
    by_name = {r.name: r for r in runners}
    base = by_name.get(BASELINE)
    base_compile = base.compile_s if base else None
    base_step = statistics.median(base.times) if base else None
    lines = [
        "| variant | compile s | compile / optax clip | HLO chars | step ms | step / optax clip |",
        "|---|---|---|---|---|---|",
    ]
    for r in runners:
        step = statistics.median(r.times)
        lines.append(
            f"| {r.name} | {r.compile_s:.3f} | {_ratio(r.compile_s, base_compile)} | "
            f"{r.hlo_chars} | {step * 1e3:.3f} | {_ratio(step, base_step)} |"
        )
    return "\n".join(lines)


def _parse_only(parser: argparse.ArgumentParser, value: str | None) -> list[str]:
    if value is None:
        return list(VARIANTS)
    known = {v.lower(): v for v in VARIANTS}
    wanted = [v.strip().lower() for v in value.split(",") if v.strip()]
    bad = [v for v in wanted if v not in known]
    if bad or not wanted:
        parser.error(f"--only: unknown variant(s) {bad}; choose from {VARIANTS}")
    return [v for v in VARIANTS if v.lower() in wanted]  # in table order


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print the markdown report and return its text."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, help="residual blocks (default 24; GPU 48)")
    parser.add_argument("--dim", type=int, help="model width D (default 128; GPU 1024)")
    parser.add_argument("--batch", type=int, help="batch size (default 128; GPU 512)")
    parser.add_argument("--rounds", type=int, help="timed interleaved rounds (default 20)")
    parser.add_argument(
        "--compile-rounds",
        type=int,
        default=None,
        help="compiles per variant, interleaved; the median is reported (default 3, smoke 1)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--gpu-size",
        action="store_true",
        help="the GPU configuration: 48 blocks, D=1024, batch 512",
    )
    size.add_argument(
        "--smoke", action="store_true", help="2 blocks, D=16, batch 8, 3 rounds: a check it runs"
    )
    parser.add_argument(
        "--only", metavar="NAME[,NAME]", help=f"a subset of the variants: {', '.join(VARIANTS)}"
    )
    args = parser.parse_args(argv)
    names = _parse_only(parser, args.only)

    backend = jax.default_backend()
    if args.smoke:
        preset = "smoke"
    elif args.gpu_size:
        preset = "gpu"
    elif backend == "gpu" and args.blocks is None and args.dim is None and args.batch is None:
        preset = "gpu"
    else:
        preset = "cpu"
    blocks, dim, batch_size, rounds = PRESETS[preset]
    blocks = args.blocks if args.blocks is not None else blocks
    dim = args.dim if args.dim is not None else dim
    batch_size = args.batch if args.batch is not None else batch_size
    rounds = args.rounds if args.rounds is not None else rounds
    if min(blocks, dim, batch_size, rounds) < 1:
        parser.error("--blocks, --dim, --batch and --rounds must be positive")

    params = init_params(blocks, dim)
    batch = make_batch(batch_size, dim)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_leaves = len(jax.tree.leaves(params))
    _FULL_FORM.clear()
    compile_rounds = args.compile_rounds or (1 if preset == "smoke" else 3)
    runners = measure(names, params, batch, rounds, compile_rounds)

    header = (
        f"# jaxgrad in a jitted train step\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M')}, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind} ({backend}), {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}; {blocks} blocks, {n_leaves} leaves, "
        f"D={dim}, batch {batch_size}, {n_params:,} parameters; adamw(1e-3), "
        f"params and state donated; median of {rounds} interleaved rounds after "
        f"{WARMUP_STEPS} warm-up steps; compile time: median of {compile_rounds} "
        "interleaved compiles."
    )
    notes = []
    if "jaxgrad full diagnostics" in names:
        notes.append(f"- jaxgrad full diagnostics: {_FULL_FORM.get('form', 'unknown')}.")
    notes.append("- ratios are to optax clip; compile s is lower + compile of a fresh jax.jit.")
    text = f"{header}\n\n{table(runners)}\n\n" + "\n".join(notes)
    print(text)
    return text


if __name__ == "__main__":
    main()
