"""jaxgrad across processes: one sharded `Gradient` over the devices of several processes.

Each process is one "host" with its own CPU devices; JAX's distributed runtime connects
them (a coordinator on 127.0.0.1, gloo for the CPU collectives). The script builds a
`Gradient` sharded over all global devices, then checks in every process that jaxgrad's
results equal numpy's on the whole (gathered) gradient: `grad_norm`, `grad_rms`,
`grad_mapzip`, `grad_normalize`, the reductions with `axis_name` inside `shard_map`,
`grad_pmean`, and `random_grad(..., out_shardings=...)`.

Run two processes with two CPU devices each, from the repository root:

    python examples/multihost.py --num-processes 2 --process-id 0 --port 12355 &
    python examples/multihost.py --num-processes 2 --process-id 1 --port 12355
    wait

Each prints its checks and `process i/2: all checks passed`. tests/test_distributed.py
runs exactly this, on a free port.
"""

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line: which process this is, of how many, and where to meet."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="coordinator port on 127.0.0.1")
    parser.add_argument("--devices-per-process", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=60, help="seconds to wait for the others")
    return parser.parse_args(argv)


def initialize(args: argparse.Namespace) -> None:
    """Join the other processes: CPU devices, gloo collectives, coordinator on 127.0.0.1."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = f"127.0.0.1:{args.port}"
    jax.distributed.initialize(
        coordinator_address=address,
        coordinator_bind_address=address,  # listen on the loopback interface only
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=args.timeout,
        heartbeat_timeout_seconds=args.timeout,
        shutdown_timeout_seconds=args.timeout,
    )


def run_checks(say: Callable[[str], None]) -> None:
    """Build a gradient sharded over all global devices; compare with numpy everywhere."""
    import jax.numpy as jnp
    from jax.experimental.multihost_utils import process_allgather
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxgrad as jg

    n = jax.device_count()
    assert n == jax.process_count() * jax.local_device_count() and jax.process_count() > 1
    mesh = jax.make_mesh((n,), ("data",))
    say(f"{n} devices, {jax.local_device_count()} here; mesh {dict(mesh.shape)}")

    # The same host data in every process (a fixed seed); each process holds its shards.
    rng = np.random.default_rng(0)
    host = jg.Gradient(
        layers=[{"bias": rng.normal(size=(4 * n,)).astype(np.float32)}],
        weights=[{"W": rng.normal(size=(6, 2 * n)).astype(np.float32)}],
    )
    specs = jg.Gradient([{"bias": P("data")}], [{"W": P(None, "data")}])
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )
    grad = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
        host,
        shardings,
    )
    assert not any(x.is_fully_addressable for x in jax.tree.leaves(grad))
    flat = np.concatenate([x.astype(np.float64).ravel() for x in jax.tree.leaves(host)])

    def gathered(tree: Any) -> Any:
        return jax.tree.map(lambda x: np.asarray(process_allgather(x, tiled=True)), tree)

    def close(actual: Any, expected: Any, what: str) -> None:
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=1e-6, err_msg=what)
        say(f"{what}: equal to numpy")

    # Reductions: the global value, replicated on every device of every process.
    norm = jax.jit(jg.grad_norm)(grad)
    magnitude = jg.grad_rms(grad)  # eager: jaxgrad's own compiled dispatch
    assert norm.sharding.is_fully_replicated and magnitude.sharding.is_fully_replicated
    close(norm, np.sqrt(np.sum(flat**2)), f"grad_norm = {float(norm):.6f}")
    close(magnitude, np.sqrt(np.mean(flat**2)), f"grad_rms = {float(magnitude):.6f}")

    # Maps: each leaf keeps its sharding; gathered, the values are numpy's.
    momentum = jax.jit(lambda m, g: jg.grad_mapzip(lambda a, b: 0.9 * a + 0.1 * b, m, g))(
        grad, grad
    )
    for x, s in zip(jax.tree.leaves(momentum), jax.tree.leaves(shardings), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    close(gathered(momentum), host, "grad_mapzip, sharding kept")
    zeros = jg.zero_grad(grad)
    for x, s in zip(jax.tree.leaves(zeros), jax.tree.leaves(shardings), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    close(gathered(zeros), jax.tree.map(np.zeros_like, host), "zero_grad, sharding kept")
    unit = jax.jit(jg.grad_normalize)(grad)
    close(
        gathered(unit), jax.tree.map(lambda x: x / np.sqrt(np.sum(flat**2)), host), "grad_normalize"
    )

    # Inside shard_map: the local leaves are shards; one psum gives the global value.
    local = jax.jit(
        jax.shard_map(
            lambda g: jnp.stack(
                [jg.grad_norm(g, axis_name="data"), jg.grad_rms(g, axis_name="data")]
            )[None],
            mesh=mesh,
            in_specs=(specs,),
            out_specs=P("data"),
        )
    )(grad)
    per_device = np.asarray(process_allgather(local, tiled=True))
    assert per_device.shape == (n, 2)
    close(per_device[:, 0], np.sqrt(np.sum(flat**2)), "grad_norm(axis_name='data') on every device")
    close(
        per_device[:, 1],
        np.sqrt(np.mean(flat**2)),
        "grad_rms(axis_name='data') on every device",
    )

    # Data parallelism: every device holds a whole gradient; grad_pmean averages them.
    replicas = rng.normal(size=(n, 5)).astype(np.float32)
    stacked = jax.make_array_from_callback(
        replicas.shape, NamedSharding(mesh, P("data")), lambda index: replicas[index]
    )
    mean = jax.jit(
        jax.shard_map(
            lambda x: jg.grad_pmean({"w": x[0]}, "data")["w"][None],
            mesh=mesh,
            in_specs=P("data"),
            out_specs=P("data"),
        )
    )(stacked)
    close(gathered(mean), np.broadcast_to(replicas.mean(0), replicas.shape), "grad_pmean")

    # random_grad generated sharded across processes: the numbers of the unsharded call.
    key = jax.random.key(0)
    sharded = jg.random_grad(host, key, out_shardings=shardings)
    close(gathered(sharded), jg.random_grad(host, key), "random_grad(out_shardings=...)")


def main(argv: list[str]) -> int:
    """Initialize, run the checks, report; exit status 0 when every check passed."""
    args = parse_args(argv)
    name = f"process {args.process_id}/{args.num_processes}"

    def say(message: str) -> None:
        print(f"{name}: {message}", flush=True)

    initialize(args)
    try:
        run_checks(say)
    except Exception:
        say("FAILED\n" + traceback.format_exc())
        return 1
    finally:
        jax.distributed.shutdown()
    say("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
