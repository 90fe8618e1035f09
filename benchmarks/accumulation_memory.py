"""Peak memory of micro-batch gradient accumulation, against the size of the gradient.

`jaxgrad.grad_microbatch_mean` scans over micro-batches with a float32 running
sum as the carry, so it should need one float32 copy of the gradient on top of what one
micro-batch's gradient needs, however many micro-batches there are. This script measures
it with XLA's compiled memory analysis (`jax.jit(f).lower(...).compile()
.memory_analysis()`: the temporary buffers plus the output, the arguments being the
same for every variant), for an MLP whose parameters dominate its activations, in
float32 and bfloat16, and prints a markdown table. Variants:

- `one micro-batch`: `jax.grad(loss)(params, batches[0])`, the baseline;
- `jaxgrad scan`: `grad_microbatch_mean(jax.grad(loss), params, batches)`;
- `vmap then mean`: every micro-batch gradient at once, then their mean;
- `full batch`: `jax.grad(loss)` on all the micro-batches as one batch.

`extra` is (temp + output) minus the baseline's, in units of one float32 copy of the
gradient (4 bytes per parameter).

Usage: python benchmarks/accumulation_memory.py [--width N] [--depth N] [--batch N]
       [--micro K [K ...]]
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxgrad as jg


def mlp(width: int, depth: int, dtype: Any) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(0), depth)
    return {
        f"layer{i}": {
            "w": (jax.random.normal(k, (width, width)) / np.sqrt(width)).astype(dtype),
            "b": jnp.zeros(width, dtype),
        }
        for i, k in enumerate(keys)
    }


def loss(params: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
    h = batch["x"]
    for layer in params.values():
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return jnp.mean((h.astype(jnp.float32) - batch["y"].astype(jnp.float32)) ** 2)


def measured(fn: Callable[..., Any], *args: Any) -> tuple[int, int]:
    """(temp bytes, output bytes) of `jax.jit(fn)` compiled for `args`."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes, stats.output_size_in_bytes


def variants() -> dict[str, Callable[..., Any]]:
    grad = jax.grad(loss)

    def scan(params, batches):
        return jg.grad_microbatch_mean(grad, params, batches)

    def vmap_mean(params, batches):
        grads = jax.vmap(grad, in_axes=(None, 0))(params, batches)
        return jax.tree.map(lambda g: jnp.mean(g.astype(jnp.float32), 0).astype(g.dtype), grads)

    def full(params, batches):
        return grad(params, jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), batches))

    return {"jaxgrad scan": scan, "vmap then mean": vmap_mean, "full batch": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="examples per micro-batch")
    parser.add_argument(
        "--micro", type=int, nargs="+", default=[4, 16], help="numbers of micro-batches"
    )
    args = parser.parse_args()

    mib = 2**20
    n_params = args.depth * (args.width + 1) * args.width
    f32_grad = 4 * n_params
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.machine()}); "
        f"MLP of {args.depth} layers {args.width}x{args.width}: {n_params:,} parameters, "
        f"{f32_grad / mib:.1f} MiB as float32; micro-batches of {args.batch} examples.\n"
    )
    print("| dtype | variant | micro-batches | temp MiB | output MiB | extra (f32 gradients) |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype in (jnp.float32, jnp.bfloat16):
        params = mlp(args.width, args.depth, dtype)

        def batches(k: int, dtype: Any = dtype) -> dict[str, jax.Array]:
            shape = (k, args.batch, args.width)
            return {"x": jnp.ones(shape, dtype), "y": jnp.zeros(shape, dtype)}

        def row(name: str, k: int, temp: int, out: int, base: int, dtype: Any = dtype) -> None:
            extra = (temp + out - base) / f32_grad
            print(
                f"| {jnp.dtype(dtype).name} | {name} | {k} | {temp / mib:.1f} | "
                f"{out / mib:.1f} | {extra:+.2f} |"
            )

        one = jax.grad(loss)
        temp, out = measured(one, params, jax.tree.map(lambda a: a[0], batches(1)))
        base = temp + out
        row("one micro-batch (baseline)", 1, temp, out, base)
        for name, fn in variants().items():
            for k in args.micro:
                row(name, k, *measured(fn, params, batches(k)), base)


if __name__ == "__main__":
    main()
