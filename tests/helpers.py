"""Test helpers: the tree factory, hypothesis strategies and the numpy references.

`make_tree(kind, dtype, seed)` builds the deterministic trees every test parameterises
over; `trees(...)` is the one hypothesis strategy for random pytrees; `flat(tree)` is the
one independent reference (every entry as a float64 numpy vector, converted on the host).
`cpu_env`, `free_port`, `stop` and `run_processes` start the multi-process runs.
"""

import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import jaxgrad as jg

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
TREE_KINDS = ["leaf", "dict", "nested", "empty", "gradient", "nnx_state"]


def _values(seed: int, shape: tuple[int, ...], dtype) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape).astype(np.float32)).astype(dtype)


def make_tree(kind: str, dtype=jnp.float32, seed: int = 0) -> Any:
    """A tree of the given kind with normal(0, 1) entries, deterministic in `seed`."""
    v = lambda i, shape: _values(seed * 100 + i, shape, dtype)  # noqa: E731
    if kind == "leaf":
        return v(0, (3, 4))
    if kind == "dict":
        return {"w": v(0, (3, 4)), "b": v(1, (4,))}
    if kind == "nested":
        return {"enc": [{"w": v(0, (2, 3)), "b": v(1, (3,))}, v(2, ())], "dec": (v(3, (5,)), None)}
    if kind == "empty":
        return {}
    if kind == "gradient":
        return jg.Gradient(
            layers=[{"bias": v(0, (4,))}, {"bias": v(1, (3,))}], weights=[{"W": v(2, (4, 3))}]
        )
    if kind == "nnx_state":
        from flax import nnx

        model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=dtype)
        state = nnx.state(model, nnx.Param)
        return jax.tree.map(lambda x: _values(seed, x.shape, dtype), state)
    raise ValueError(kind)


def tolerance(dtype) -> float:
    return {
        jnp.dtype(jnp.float32): 1e-5,
        jnp.dtype(jnp.bfloat16): 1e-2,
        jnp.dtype(jnp.float16): 1e-3,
    }[jnp.dtype(dtype)]


def as_f64(x) -> np.ndarray:
    """A leaf as float64 numpy, converted on the host (no JAX op, so nothing compiles)."""
    return np.asarray(x).astype(np.float64)


def flat(tree: Any) -> np.ndarray:
    """All entries of a tree as one float64 numpy vector: the independent reference."""
    parts = [as_f64(x).ravel() for x in jax.tree.leaves(tree)]
    return np.concatenate(parts) if parts else np.zeros(0)


def paths(tree: Any) -> list[str]:
    """The logger-ready name of every leaf (`jaxgrad.path_name`)."""
    return [jg.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def extend_tree(children: st.SearchStrategy) -> st.SearchStrategy:
    """Hypothesis: one level of containers (list, tuple, dict, Gradient) over `children`."""
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text("abcdef", min_size=1, max_size=3), children, max_size=3),
        st.tuples(children, children).map(lambda t: jg.Gradient(layers=[t[0]], weights=[t[1]])),
    )


def _leaves(nonfinite: bool, dtypes: tuple) -> st.SearchStrategy:
    finite = st.floats(-100, 100, width=32)
    elements = (
        st.one_of(finite, st.sampled_from([np.nan, np.inf, -np.inf])) if nonfinite else finite
    )
    arrays = hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        elements=elements,
    )
    # Cast in numpy: a jnp cast would compile once per random shape.
    return st.tuples(arrays, st.sampled_from(dtypes)).map(lambda t: jnp.asarray(t[0].astype(t[1])))


def trees(
    *, nonfinite: bool = False, dtypes: tuple = (jnp.float32,), max_leaves: int = 8
) -> st.SearchStrategy:
    """Random pytrees (dicts, lists, tuples, `Gradient`s, `None` subtrees) of small arrays.

    Leaves are scalars, 0-size or small arrays of the given `dtypes`; with `nonfinite`,
    entries may be NaN or inf.
    """
    leaf = st.one_of(_leaves(nonfinite, tuple(dtypes)), st.none())
    return st.recursive(leaf, extend_tree, max_leaves=max_leaves)


MIXED = tuple(DTYPES)
"""The dtypes of the toolkit's random trees."""


# -- subprocesses --------------------------------------------------------------------------


def cpu_env(**extra: str) -> dict[str, str]:
    """This environment for a CPU-only JAX subprocess (without this process's XLA_FLAGS)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return env | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"} | extra


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Kill `process` if it still runs (only processes a test started, by their handles)."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def run_processes(
    commands: list[list[str]], *, env: dict[str, str], cwd: Path, timeout_s: float
) -> list[tuple[int | None, str]]:
    """Run `commands` at once and wait for all of them, `timeout_s` in all; each one's
    return code (None if it was stopped) and its output (stdout and stderr)."""
    outputs = [tempfile.TemporaryFile(mode="w+") for _ in commands]
    processes = [
        subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        for command, out in zip(commands, outputs, strict=True)
    ]
    deadline = time.monotonic() + timeout_s
    try:
        for process in processes:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for process in processes:
            stop(process)
    results = []
    for process, output in zip(processes, outputs, strict=True):
        output.seek(0)
        results.append((process.returncode, output.read()))
        output.close()
    return results


def data_dependent_conditionals(text: str) -> list[str]:
    """`stablehlo.case`/`if` ops whose index is not a compile-time constant.

    `jax.lax.platform_dependent` selects its branch with a case on the platform index, a
    constant when lowering for one platform (XLA removes it); any other case runs.
    """
    lines = text.splitlines()
    static = set(re.findall(r"(%[\w#]+) = stablehlo\.constant", text))
    found = []
    head = re.compile(r'^(\s*)(%[\w#]+)(?::\d+)? = "stablehlo\.(case|if)"\((%[\w#]+)\)')
    for i, line in enumerate(lines):
        match = head.match(line)
        if not match:
            continue
        indent, result, kind, index = match.groups()
        body = []
        for following in lines[i + 1 :]:
            if following.startswith(indent + "})"):
                break
            body.append(following.strip())
        trivial = all(
            b == "}, {" or re.fullmatch(r"stablehlo\.return (%[\w#]+) : .*", b) for b in body
        ) and all(
            re.fullmatch(r"stablehlo\.return (%[\w#]+) : .*", b).group(1) in static
            for b in body
            if b.startswith("stablehlo.return")
        )
        if index in static and trivial:
            static.add(result)  # the platform index, a constant
        elif index not in static:
            found.append(f"{kind} on {index}")
    return found
