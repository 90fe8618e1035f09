import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import jaxgrad as jg
from conftest import flat_numpy, make_tree, trees


def test_flatten_concatenates_raveled_leaves(maybe_jit, tree_kind, dtype):
    tree = make_tree(tree_kind, dtype)
    vec = maybe_jit(jg.grad_flatten)(tree)
    assert vec.ndim == 1
    assert vec.dtype == (dtype if jax.tree.leaves(tree) else jnp.float32)
    np.testing.assert_array_equal(np.asarray(vec.astype(jnp.float32)), flat_numpy(tree))


def test_flatten_agrees_with_jax_ravel_pytree():
    from jax.flatten_util import ravel_pytree

    tree = make_tree("nested", seed=3)
    np.testing.assert_array_equal(jg.grad_flatten(tree), ravel_pytree(tree)[0])


def test_round_trip_is_exact(maybe_jit, tree_kind, dtype):
    tree = make_tree(tree_kind, dtype)
    back = maybe_jit(lambda t: jg.grad_unflatten(jg.grad_flatten(t), t))(tree)
    assert type(back) is type(tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, tree)
    chex.assert_trees_all_equal(back, tree)


def test_mixed_dtypes_are_promoted_and_cast_back():
    tree = {"a": jnp.array([1.5], jnp.bfloat16), "b": jnp.array([2.25], jnp.float16)}
    vec = jg.grad_flatten(tree)
    assert vec.dtype == jnp.float32
    back = jg.grad_unflatten(vec, tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, tree)
    chex.assert_trees_all_equal(back, tree)


def test_unflatten_accepts_shape_dtype_structs():
    like = {
        "w": jax.ShapeDtypeStruct((2, 2), jnp.bfloat16),
        "b": jax.ShapeDtypeStruct((), jnp.float32),
    }
    out = jg.grad_unflatten(jnp.arange(5.0), like)
    assert out["w"].dtype == jnp.bfloat16 and out["b"].shape == ()
    np.testing.assert_array_equal(out["b"], 0.0)  # leaf order: b, w
    np.testing.assert_array_equal(out["w"].astype(jnp.float32), [[1, 2], [3, 4]])


def test_unflatten_under_vmap():
    like = {"w": jnp.zeros((2,)), "b": jnp.zeros(())}
    out = jax.vmap(lambda v: jg.grad_unflatten(v, like))(jnp.arange(6.0).reshape(2, 3))
    assert out["w"].shape == (2, 2)
    np.testing.assert_array_equal(out["b"], [0.0, 3.0])


def test_unflatten_wrong_length_names_both():
    with pytest.raises(
        ValueError, match=r"`vector` has length 3, but `like` has 4 entries; they must be equal\."
    ):
        jg.grad_unflatten(jnp.zeros(3), {"a": jnp.zeros((2, 2))})


def test_unflatten_rejects_non_vector():
    with pytest.raises(ValueError, match=r"`vector` must be 1-D; got shape \(2, 2\)\."):
        jg.grad_unflatten(jnp.zeros((2, 2)), {"a": jnp.zeros(4)})


def test_flatten_is_differentiable():
    tree = make_tree("dict")
    d = jax.grad(lambda t: jnp.sum(jg.grad_flatten(t) ** 2))(tree)
    chex.assert_trees_all_close(d, jax.tree.map(lambda x: 2 * x, tree))


@given(trees)
def test_round_trip_law(tree):
    back = jg.grad_unflatten(jg.grad_flatten(tree), tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    chex.assert_trees_all_equal(back, tree)
    assert jg.grad_flatten(tree).shape == (sum(np.size(x) for x in jax.tree.leaves(tree)),)
