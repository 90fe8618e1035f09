"""Hypothesis strategies and numpy references for the training-loop toolkit tests.

Random pytrees (dicts, lists, tuples, `Gradient`s, `None` subtrees) whose leaves are
scalars, 0-size or small arrays of mixed dtypes (float32, bfloat16, float16), optionally
holding NaN and inf.
"""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import jaxgrad as jg
from conftest import extend_tree

LEAF_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
_FINITE = st.floats(-100, 100, width=32)
_SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf])


def leaves(nonfinite: bool = False) -> st.SearchStrategy:
    elements = st.one_of(_FINITE, _SPECIAL) if nonfinite else _FINITE
    arrays = hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        elements=elements,
    )
    # Cast in numpy: a jnp cast would compile once per random shape.
    return st.tuples(arrays, st.sampled_from(LEAF_DTYPES)).map(
        lambda t: jnp.asarray(t[0].astype(t[1]))
    )


def trees(nonfinite: bool = False) -> st.SearchStrategy:
    """Random pytrees of mixed-dtype leaves; with `nonfinite`, entries may be NaN or inf."""
    return st.recursive(st.one_of(leaves(nonfinite), st.none()), extend_tree, max_leaves=6)


def as_f64(x) -> np.ndarray:
    """A leaf as float64 numpy, converted on the host (no JAX op, so nothing compiles)."""
    return np.asarray(x).astype(np.float64)


def flat(tree) -> np.ndarray:
    parts = [as_f64(x).ravel() for x in jax.tree.leaves(tree)]
    return np.concatenate(parts) if parts else np.zeros(0)


def paths(tree) -> list[str]:
    return [jg.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
