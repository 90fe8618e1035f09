import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flat, make_tree, trees
from hypothesis import given

import jaxgrad as jg


def test_flatten_concatenates_raveled_leaves(maybe_jit, tree_kind, dtype):
    tree = make_tree(tree_kind, dtype)
    vec = maybe_jit(jg.grad_flatten)(tree)
    assert vec.ndim == 1
    assert vec.dtype == (dtype if jax.tree.leaves(tree) else jnp.float32)
    np.testing.assert_array_equal(np.asarray(vec.astype(jnp.float32)), flat(tree))


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


@given(trees())
def test_round_trip_law(tree):
    back = jg.grad_unflatten(jg.grad_flatten(tree), tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    chex.assert_trees_all_equal(back, tree)
    assert jg.grad_flatten(tree).shape == (sum(np.size(x) for x in jax.tree.leaves(tree)),)


# -- integer leaves among floating ones: never rounded ---------------------------------


@pytest.mark.parametrize(
    ("float_dtype", "int_dtype", "flat_dtype"),
    [
        (jnp.bfloat16, jnp.int8, jnp.bfloat16),  # 8 significand bits hold |n| <= 256
        (jnp.bfloat16, jnp.uint8, jnp.bfloat16),
        (jnp.bfloat16, jnp.bool_, jnp.bfloat16),
        (jnp.float16, jnp.uint8, jnp.float16),
        (jnp.float16, jnp.int16, jnp.float32),  # float16 holds only |n| <= 2048
        (jnp.bfloat16, jnp.uint16, jnp.float32),
        (jnp.float32, jnp.int16, jnp.float32),
        (jnp.complex64, jnp.int16, jnp.complex64),
    ],
    ids=lambda d: jnp.dtype(d).name,
)
def test_mixed_integer_and_float_leaves_are_exact(float_dtype, int_dtype, flat_dtype, maybe_jit):
    info = jnp.iinfo(int_dtype) if int_dtype != jnp.bool_ else None
    ints = [info.min, info.max, info.max - 1] if info else [True, False, True]
    tree = {"n": jnp.array(ints, int_dtype), "w": jnp.array([0.5, -1.5], float_dtype)}
    vec = maybe_jit(jg.grad_flatten)(tree)
    assert vec.dtype == flat_dtype
    np.testing.assert_array_equal(
        np.real(np.asarray(vec[:3])).astype(np.float64), np.array(ints, np.float64)
    )
    back = maybe_jit(jg.grad_unflatten)(vec, tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, tree)
    chex.assert_trees_all_equal(back, tree)


@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"]
)
def test_int32_among_floats_is_refused_without_x64(dtype, maybe_jit):
    tree = {"w": jnp.ones(2, dtype), "steps": [jnp.array([2**24 + 1], jnp.int32)]}
    with pytest.raises(
        TypeError,
        match=r"`grad` mixes integer and floating-point leaves, and no floating-point dtype holds "
        r"the integer leaf at \['steps'\]\[0\] \(i32\[1\]\) exactly \(float64 would, with "
        r"`jax_enable_x64`\); cast it first",
    ):
        maybe_jit(jg.grad_flatten)(tree)


def test_int32_among_floats_gives_float64_with_x64():
    with jax.enable_x64(True):
        tree = {"n": jnp.array([2**31 - 1, -(2**31)], jnp.int32), "w": jnp.ones(2, jnp.float32)}
        vec = jg.grad_flatten(tree)
        assert vec.dtype == jnp.float64
        back = jg.grad_unflatten(vec, tree)
        chex.assert_trees_all_equal_shapes_and_dtypes(back, tree)
        chex.assert_trees_all_equal(back, tree)
        with pytest.raises(
            TypeError, match=r"the integer leaf at \['n'\] \(i64\[1\]\) exactly; cast"
        ):
            jg.grad_flatten({"n": jnp.array([2**40 + 1], jnp.int64), "w": jnp.ones(1)})


def test_same_kind_trees_keep_jax_promotion():
    ints = {"a": jnp.array([1, -2], jnp.int8), "b": jnp.array([2**30], jnp.int32)}
    vec = jg.grad_flatten(ints)
    assert vec.dtype == jnp.int32
    np.testing.assert_array_equal(vec, [1, -2, 2**30])
    chex.assert_trees_all_equal(jg.grad_unflatten(vec, ints), ints)
    floats = {"a": jnp.ones(1, jnp.bfloat16), "b": jnp.ones(1, jnp.float16)}
    assert jg.grad_flatten(floats).dtype == jnp.float32


# -- grad_unflatten: casts that would lose values --------------------------------------


@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"]
)
def test_unflatten_complex_vector_into_real_leaves_is_refused(dtype, maybe_jit):
    like = {"a": jnp.zeros(1, dtype), "b": jax.ShapeDtypeStruct((2,), dtype)}
    short = {jnp.float32: "f32", jnp.bfloat16: "bf16", jnp.float16: "f16"}[dtype]
    with pytest.raises(
        TypeError,
        match=rf"`vector` has dtype c64, but the leaf of `like` at \['a'\] is {short}\[1\]; the "
        r"cast would lose its imaginary part\. Cast `vector` first",
    ):
        maybe_jit(lambda v: jg.grad_unflatten(v, like))(jnp.array([1j, 2, 3], jnp.complex64))


def test_unflatten_float_vector_into_int_leaves_it_does_not_hold_is_refused():
    like = {"n": jnp.zeros(2, jnp.int32), "w": jnp.zeros(1)}
    with pytest.raises(
        TypeError,
        match=r"`vector` has dtype f32, but the leaf of `like` at \['n'\] is i32\[2\]; the cast "
        r"would lose integers that f32 does not hold exactly\.",
    ):
        jg.grad_unflatten(jnp.array([2.0**24 + 2, 1.0, 0.5]), like)
    small = {"n": jnp.zeros(2, jnp.int16), "w": jnp.zeros(1)}
    out = jg.grad_unflatten(jnp.array([-3.0, 30000.0, 0.5]), small)
    np.testing.assert_array_equal(out["n"], [-3, 30000])


@pytest.mark.parametrize(
    "tree",
    [
        {"z": jnp.array([1 + 2j], jnp.complex64), "w": jnp.array([3.5, -1.0])},
        {"z": jnp.array([1 - 2j], jnp.complex64), "n": jnp.array([-7, 300], jnp.int16)},
    ],
    ids=["complex-and-real", "complex-and-int"],
)
def test_round_trip_of_complex_trees_with_real_or_int_leaves(tree):
    vec = jg.grad_flatten(tree)
    assert vec.dtype == jnp.complex64
    back = jg.grad_unflatten(vec, tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(back, tree)
    chex.assert_trees_all_equal(back, tree)
