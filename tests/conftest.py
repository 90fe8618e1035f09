"""Shared fixtures: strict dtype promotion, jit/no-jit, tree shapes, dtypes."""

from collections.abc import Callable
from typing import Any

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import jaxgrad as jg

jax.config.update("jax_numpy_dtype_promotion", "strict")

hypothesis.settings.register_profile("jaxgrad", deadline=None, max_examples=40, derandomize=True)
hypothesis.settings.load_profile("jaxgrad")

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
TREE_KINDS = ["leaf", "dict", "nested", "empty", "gradient", "nnx_state"]


@pytest.fixture(params=[False, True], ids=["eager", "jit"], scope="session")
def maybe_jit(request) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return jax.jit if request.param else (lambda f: f)


@pytest.fixture(params=DTYPES, ids=DTYPE_IDS)
def dtype(request):
    return request.param


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


@pytest.fixture(params=TREE_KINDS)
def tree_kind(request) -> str:
    return request.param


def flat_numpy(tree: Any) -> np.ndarray:
    """All entries of a tree as one float64 numpy vector: the independent reference."""
    leaves = [
        np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64).ravel()
        for x in jax.tree.leaves(tree)
    ]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def tolerance(dtype) -> float:
    return {
        jnp.dtype(jnp.float32): 1e-5,
        jnp.dtype(jnp.bfloat16): 1e-2,
        jnp.dtype(jnp.float16): 1e-3,
    }[jnp.dtype(dtype)]


# Hypothesis: random pytrees of float32 arrays (dicts, lists, tuples, None, Gradient).
_leaf = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    elements=st.floats(-100, 100, width=32),
).map(jnp.asarray)


def extend_tree(children: st.SearchStrategy) -> st.SearchStrategy:
    """Hypothesis: one level of containers (list, tuple, dict, Gradient) over `children`."""
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text("abcdef", min_size=1, max_size=3), children, max_size=3),
        st.tuples(children, children).map(lambda t: jg.Gradient(layers=[t[0]], weights=[t[1]])),
    )


trees = st.recursive(st.one_of(_leaf, st.none()), extend_tree, max_leaves=8)
