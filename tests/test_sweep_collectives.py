"""grad_psum / grad_pmean precision and `axis_name` checks, on one device (a named vmap)."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import make_tree

import jaxgrad as jg


def _over_replicas(fn, stacked, maybe_jit=lambda f: f):
    """`fn(grad, "i")` on each replica of `stacked` (replicas along axis 0)."""
    return maybe_jit(jax.vmap(lambda g: fn(g, "i"), axis_name="i"))(stacked)


def test_pmean_of_float16_does_not_overflow(maybe_jit):
    replicas = {
        "w": jnp.full((2, 3), 60000, jnp.float16),
        "b": [jnp.full((2,), -60000, jnp.float16)],
    }
    mean = _over_replicas(jg.grad_pmean, replicas, maybe_jit)
    assert mean["w"].dtype == jnp.float16 and mean["b"][0].dtype == jnp.float16
    np.testing.assert_array_equal(mean["w"], 60000)
    np.testing.assert_array_equal(mean["b"][0], -60000)


def test_pmean_of_bfloat16_sums_in_float32(maybe_jit):
    # In bfloat16, 256 + 1 rounds back to 256, so a bfloat16 sum gives 256/3 -> 85.5;
    # the float32 sum is 258 and 258/3 = 86 exactly in bfloat16.
    replicas = jnp.array([[256.0], [1.0], [1.0]], jnp.bfloat16)
    mean = _over_replicas(jg.grad_pmean, {"w": replicas}, maybe_jit)["w"]
    assert mean.dtype == jnp.bfloat16
    np.testing.assert_array_equal(mean.astype(jnp.float32), np.full((3, 1), 86.0))


@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"]
)
def test_pmean_is_the_float32_mean_rounded_once(dtype):
    """Against numpy: the float64 mean of the replicas, rounded to the leaf dtype once."""
    stacked = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[make_tree("nested", dtype, seed=s) for s in range(5)]
    )
    mean = _over_replicas(jg.grad_pmean, stacked, jax.jit)
    assert jax.tree.structure(mean) == jax.tree.structure(stacked)
    numpy_dtype = {
        jnp.float32: np.float32,
        jnp.bfloat16: ml_dtypes.bfloat16,
        jnp.float16: np.float16,
    }
    for got, leaf in zip(jax.tree.leaves(mean), jax.tree.leaves(stacked), strict=True):
        assert got.dtype == dtype and got.shape == leaf.shape
        exact = np.asarray(leaf.astype(jnp.float32), np.float64).mean(axis=0)
        expected = exact.astype(np.float32).astype(numpy_dtype[dtype]).astype(np.float64)
        for replica in np.asarray(got.astype(jnp.float32), np.float64):
            np.testing.assert_allclose(replica, expected, rtol=1e-6 if dtype == jnp.float32 else 0)


def test_psum_sums_in_the_leaf_dtype():
    """As documented: `grad_psum` keeps the leaf dtype for the sum, as `jax.lax.psum` does."""
    total = _over_replicas(jg.grad_psum, {"w": jnp.full((2, 1), 60000, jnp.float16)})["w"]
    assert total.dtype == jnp.float16
    assert bool(jnp.all(jnp.isinf(total)))
    exact = _over_replicas(jg.grad_psum, {"w": jnp.full((2, 1), 60000, jnp.float32)})["w"]
    np.testing.assert_array_equal(exact, 120000)


@pytest.mark.parametrize("fn", [jg.grad_psum, jg.grad_pmean], ids=["psum", "pmean"])
@pytest.mark.parametrize(
    ("bad", "hint"),
    [
        (["i"], "A list is not accepted (JAX needs a hashable name); pass ('i',)."),
        (["i", "j"], "A list is not accepted (JAX needs a hashable name); pass ('i', 'j')."),
        ([], None),
        ([3], None),
    ],
    ids=["one", "two", "empty", "not-str"],
)
def test_axis_name_list_is_a_type_error_that_names_the_tuple(fn, bad, hint):
    expected = (
        "`axis_name` must be a mesh axis name (a str) or a non-empty tuple of names; "
        f"got list {bad!r}."
    )
    with pytest.raises(TypeError, match=re.escape(expected + (f" {hint}" if hint else ""))) as info:
        _over_replicas(lambda g, _: fn(g, bad), {"w": jnp.ones((2, 3))})
    if hint is None:  # no tuple to suggest for an empty list or non-str names
        assert "A list is not accepted" not in str(info.value)


def test_reductions_axis_name_list_gets_the_hint_too():
    with pytest.raises(TypeError, match=r", or None; got list \['i'\]\. A list is not accepted"):
        _over_replicas(lambda g, _: jg.grad_norm(g, axis_name=["i"]), {"w": jnp.ones((2, 3))})


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (
            lambda g: jax.vmap(lambda x: jg.grad_pmean(x, "i"), axis_name="i")(
                jax.tree.map(lambda x: jnp.stack([x, x]), g)
            ),
            "grad",
        ),
        (lambda g: jg.GradSum.zeros_like({"w": jnp.zeros(2)}).add(g), "grad"),
        (lambda g: jg.random_grad(g, jax.random.key(0), sampler=jax.random.normal), "model"),
    ],
    ids=["grad_pmean", "GradSum.add", "random_grad"],
)
def test_one_wording_for_a_leaf_of_the_wrong_dtype(call, name):
    """grad_pmean, GradSum.add and random_grad said it three ways; now one check says it."""
    with pytest.raises(
        TypeError,
        match=rf"^`{name}` must have floating-point or complex leaves; at \['w'\] it has "
        r"i32\[2\]\.",
    ):
        call({"w": jnp.ones(2, jnp.int32)})
