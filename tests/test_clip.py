import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import MIXED, as_f64, flat, make_tree, tolerance, trees
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxgrad as jg
from jaxgrad._clip import _clip


def _optax_clip(tree, max_norm, jit):
    tx = optax.clip_by_global_norm(max_norm)
    update = jax.jit(tx.update) if jit else tx.update
    return update(tree, tx.init(tree))[0]


def _assert_stats(stats, norm, rms, scale, clipped, finite):
    assert isinstance(stats, jg.ClipStats)
    np.testing.assert_allclose(stats.norm, norm, rtol=1e-6)
    np.testing.assert_allclose(stats.rms, rms, rtol=1e-6)
    np.testing.assert_allclose(stats.scale, scale, rtol=1e-6)
    assert bool(stats.clipped) is clipped and bool(stats.finite) is finite
    assert stats.clipped.dtype == jnp.bool_ and stats.finite.dtype == jnp.bool_
    assert stats.norm.dtype == stats.rms.dtype == stats.scale.dtype == jnp.float32


# -- agreement with optax ----------------------------------------------------------------


def test_clip_matches_jitted_optax_to_float32_rounding(tree_kind):
    tree = make_tree(tree_kind)
    norm = np.linalg.norm(flat(tree))
    dropped = jax.jit(lambda g, m: jg.grad_clip(g, m)[0])  # the natural pattern: stats unused
    for max_norm in (0.5, 1e3):  # clips, passes
        out, stats = jg.grad_clip(tree, max_norm)
        reference = _optax_clip(tree, max_norm, jit=True)
        chex.assert_trees_all_close(out, reference, rtol=2.5e-7, atol=0)
        chex.assert_trees_all_close(dropped(tree, max_norm), reference, rtol=2.5e-7, atol=0)
        assert type(out) is type(tree)
        assert bool(stats.clipped) is bool(norm > max_norm)
        np.testing.assert_allclose(stats.norm, norm, rtol=1e-6)


def test_clip_matches_eager_optax_to_an_ulp():
    tree = make_tree("nested", seed=4)
    out, _ = jg.grad_clip(tree, 0.5)
    chex.assert_trees_all_close(out, _optax_clip(tree, 0.5, jit=False), rtol=3e-7)


def test_clip_differs_from_optax_only_where_optax_gives_nan():
    zeros = {"w": jnp.zeros(3)}
    assert bool(jnp.all(jnp.isnan(_optax_clip(zeros, 0.0, jit=True)["w"])))
    chex.assert_trees_all_equal(jg.grad_clip(zeros, 0.0)[0], zeros)
    bad = {"w": jnp.array([1.0, jnp.nan])}
    assert bool(jnp.all(jnp.isnan(_optax_clip(bad, 1.0, jit=True)["w"])))
    chex.assert_trees_all_equal(jg.grad_clip(bad, 1.0)[0], bad)  # passed on as it was


# -- dtypes, structure, bound -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("fn", [jg.grad_clip, jg.grad_clip_by_rms])
def test_clip_keeps_structure_and_dtypes_and_meets_the_bound(fn, dtype):
    tree = make_tree("nested", dtype)
    x = flat(tree)
    out, stats = fn(tree, 0.3)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
    assert type(out) is type(tree)
    measure = (
        (lambda v: np.linalg.norm(v))
        if fn is jg.grad_clip
        else (lambda v: np.sqrt(np.mean(v**2)) if v.size else 0.0)
    )
    before, after = measure(x), measure(flat(out))
    np.testing.assert_allclose(stats.norm, np.linalg.norm(x), rtol=tolerance(dtype))
    assert after <= 0.3 * (1 + 2 * tolerance(dtype))
    scale = min(1.0, 0.3 / before) if before else 1.0
    np.testing.assert_allclose(stats.scale, scale, rtol=1e-5)
    np.testing.assert_allclose(flat(out), x * scale, rtol=2 * tolerance(dtype), atol=1e-6)


def test_clip_scales_in_float32_and_casts_back():
    g = {"w": jnp.full(1000, 300.0, jnp.float16)}  # squares overflow float16
    out, stats = jg.grad_clip(g, 1.0)
    assert out["w"].dtype == jnp.float16 and bool(stats.finite)
    np.testing.assert_allclose(stats.norm, 9486.833, rtol=1e-6)
    np.testing.assert_allclose(as_f64(out["w"]), 1 / np.sqrt(1000), rtol=1e-3)


def test_clip_below_the_bound_returns_the_input_bit_for_bit():
    g = {"w": jnp.array([0.1, -0.2], jnp.bfloat16), "b": jnp.array([1e-3])}
    out, stats = jg.grad_clip(g, 10.0)
    chex.assert_trees_all_equal(out, g)
    assert float(stats.scale) == 1.0 and not bool(stats.clipped)


def test_clip_at_exactly_the_bound_does_nothing():
    out, stats = jg.grad_clip({"w": jnp.array([3.0, 4.0])}, 5.0)
    chex.assert_trees_all_equal(out, {"w": jnp.array([3.0, 4.0])})
    _assert_stats(stats, 5.0, np.sqrt(12.5), 1.0, clipped=False, finite=True)


def test_clip_infinite_bound_never_clips():
    g = {"w": jnp.array([3e3, 4e3])}
    out, stats = jg.grad_clip(g, np.inf)
    chex.assert_trees_all_equal(out, g)
    assert not bool(stats.clipped)


# -- edge cases, each with its expected value -------------------------------------------


def test_zero_gradient_with_zero_bound_is_zeros_not_nan(maybe_jit):
    zeros = jg.zero_grad(make_tree("gradient"))
    out, stats = maybe_jit(jg.grad_clip)(zeros, 0.0)
    chex.assert_trees_all_equal(out, zeros)
    _assert_stats(stats, 0.0, 0.0, 1.0, clipped=False, finite=True)


def test_nonzero_gradient_with_zero_bound_is_zeros(maybe_jit):
    out, stats = maybe_jit(jg.grad_clip)({"w": jnp.array([3.0, 4.0])}, 0.0)
    chex.assert_trees_all_equal(out, {"w": jnp.zeros(2)})
    _assert_stats(stats, 5.0, np.sqrt(12.5), 0.0, clipped=True, finite=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("fn", [jg.grad_clip, jg.grad_clip_by_rms])
def test_nonfinite_gradient_is_passed_on_unchanged_with_a_flag(fn, bad, maybe_jit):
    g = {"w": jnp.array([1.0, bad], jnp.bfloat16), "b": jnp.full(3, 1e20)}
    out, stats = maybe_jit(fn)(g, 1.0)
    chex.assert_trees_all_equal(out, g)  # NaN/inf kept, so apply_if_finite skips the step
    assert not bool(stats.finite) and not bool(stats.clipped) and float(stats.scale) == 1.0
    assert np.isnan(stats.norm) if np.isnan(bad) else float(stats.norm) == np.inf


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_norm_whose_squares_overflow_float32_is_finite_and_clips(dtype):
    g = {"w": jnp.array([1e20, 1.0], dtype), "b": jnp.array([-1e20], dtype)}  # 2e40 > f32 max
    out, stats = jg.grad_clip(g, 1.0)
    x = flat(g)
    np.testing.assert_allclose(stats.norm, np.linalg.norm(x), rtol=1e-6)
    assert bool(stats.finite) and bool(stats.clipped)
    np.testing.assert_allclose(flat(out), x / np.linalg.norm(x), rtol=1e-2)


def test_empty_tree_is_returned_with_zero_norm(maybe_jit):
    for empty in ({}, [], None, jg.Gradient([], [])):
        out, stats = maybe_jit(jg.grad_clip)(empty, 1.0)
        assert out == empty or (isinstance(out, jg.Gradient) and jax.tree.leaves(out) == [])
        _assert_stats(stats, 0.0, 0.0, 1.0, clipped=False, finite=True)


def test_none_subtrees_zero_size_and_scalar_leaves(maybe_jit):
    g = {
        "none": None,
        "empty": jnp.zeros((0, 3), jnp.float16),
        "s": jnp.array(6.0),
        "v": [jnp.array([8.0], jnp.bfloat16)],
    }
    out, stats = maybe_jit(jg.grad_clip)(g, 5.0)
    assert out["none"] is None
    assert out["empty"].shape == (0, 3) and out["empty"].dtype == jnp.float16
    np.testing.assert_allclose(out["s"], 3.0, rtol=1e-6)
    assert out["v"][0].dtype == jnp.bfloat16 and float(out["v"][0][0]) == 4.0
    _assert_stats(stats, 10.0, np.sqrt(50.0), 0.5, clipped=True, finite=True)


def test_clip_by_magnitude_expected_values(maybe_jit):
    g = {"a": jnp.array([4.0, 0.0]), "b": jnp.array([0.0, 0.0])}  # rms 2, norm 4
    out, stats = maybe_jit(jg.grad_clip_by_rms)(g, 1.0)
    chex.assert_trees_all_close(out, {"a": jnp.array([2.0, 0.0]), "b": jnp.zeros(2)})
    _assert_stats(stats, 4.0, 2.0, 0.5, clipped=True, finite=True)
    zeros, stats = jg.grad_clip_by_rms({"a": jnp.zeros(2)}, 0.0)
    chex.assert_trees_all_equal(zeros, {"a": jnp.zeros(2)})
    _assert_stats(stats, 0.0, 0.0, 1.0, clipped=False, finite=True)


def test_complex_leaves_are_scaled_in_their_own_dtype():
    out, stats = jg.grad_clip({"z": jnp.array([3 + 4j], jnp.complex64)}, 1.0)
    assert out["z"].dtype == jnp.complex64
    np.testing.assert_allclose(out["z"], [0.6 + 0.8j], rtol=1e-6)
    assert float(stats.norm) == 5.0


# -- transformations ---------------------------------------------------------------------


def test_traced_bound_and_no_recompilation_per_bound():
    g = make_tree("dict", seed=3)
    out = jax.jit(lambda g, m: jg.grad_clip(g, m)[0])(g, jnp.float32(0.5))
    np.testing.assert_allclose(jg.grad_norm(out), 0.5, rtol=1e-5)
    jg.grad_clip(g, 0.1)
    before = _clip._cache_size()
    jg.grad_clip(g, 0.2)
    jg.grad_clip(g, 7)
    assert _clip._cache_size() == before


def test_derivative_is_finite_at_zero_and_through_the_clip():
    loss = lambda g, m: jg.grad_accumulate(jnp.sum, jg.grad_clip(g, m)[0])  # noqa: E731
    grad = jax.jit(jax.grad(loss))
    zeros = jg.zero_grad(make_tree("nested"))
    for m in (0.0, 1.0):
        d = grad(zeros, m)
        assert all(np.all(np.isfinite(as_f64(x))) for x in jax.tree.leaves(d))
    d = grad({"w": jnp.array([3.0, 4.0])}, 1.0)  # d/dx sum(x / |x|)
    np.testing.assert_allclose(d["w"], [(1 - 3 * 7 / 25) / 5, (1 - 4 * 7 / 25) / 5], rtol=1e-5)


def test_axis_name_clips_by_the_global_norm_of_the_shards():
    full = {"w": jnp.arange(8.0).reshape(2, 4), "b": jnp.array([[1.0], [2.0]])}
    shards = jax.jit(jax.vmap(lambda g: jg.grad_clip(g, 3.0, axis_name="i"), axis_name="i"))(full)
    expected, stats = jg.grad_clip(full, 3.0)
    chex.assert_trees_all_close(shards[0], expected, rtol=1e-6)
    np.testing.assert_allclose(shards[1].norm, [stats.norm] * 2, rtol=1e-6)
    np.testing.assert_allclose(shards[1].rms, [stats.rms] * 2, rtol=1e-6)


def test_stats_is_a_pytree_from_jit_and_scan():
    g = {"w": jnp.array([3.0, 4.0])}

    def body(carry, m):
        return carry, jg.grad_clip(g, m)[1]

    _, stats = jax.jit(lambda ms: jax.lax.scan(body, 0, ms))(jnp.array([1.0, 10.0]))
    assert isinstance(stats, jg.ClipStats)
    np.testing.assert_allclose(stats.scale, [0.2, 1.0])
    np.testing.assert_array_equal(stats.clipped, [True, False])


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1.0, ValueError, r"`max_norm` must be a non-negative number; got -1.0"),
        (np.nan, ValueError, r"`max_norm` must be a non-negative number; got nan"),
        (jnp.ones(2), ValueError, r"`max_norm` must be a scalar; got an array of shape \(2,\)"),
        ("1", TypeError, r"`max_norm` must be a real number; got str '1'"),
        (True, TypeError, r"`max_norm` must be a real number; got bool True"),
        (np.array(1 + 1j), TypeError, r"`max_norm` must be a real number; got dtype complex128"),
    ],
)
def test_bad_bound_raises(value, error, message):
    with pytest.raises(error, match=message):
        jg.grad_clip({"w": jnp.ones(2)}, value)


def test_bad_rms_bound_names_max_rms():
    with pytest.raises(ValueError, match="`max_rms` must be a non-negative number; got -2"):
        jg.grad_clip_by_rms({"w": jnp.ones(2)}, -2)


def test_integer_leaves_are_rejected():
    with pytest.raises(
        TypeError, match=r"`grad` must have floating-point .* at \['n'\] it has i32\[2\]"
    ):
        jg.grad_clip({"x": jnp.ones(2), "n": jnp.ones(2, jnp.int32)}, 1.0)


# -- laws on random trees -------------------------------------------------------------------


@settings(max_examples=16)
@given(trees(dtypes=MIXED, max_leaves=6), st.floats(0, 50, width=32), st.booleans())
def test_clip_on_random_trees(tree, max_norm, jit):
    x = flat(tree)
    norm = np.linalg.norm(x)
    out, stats = (jax.jit(jg.grad_clip) if jit else jg.grad_clip)(tree, max_norm)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
    assert bool(stats.finite)
    np.testing.assert_allclose(stats.norm, norm, rtol=1e-5, atol=1e-5)
    if not bool(stats.clipped):
        assert norm <= max_norm * (1 + 1e-6)
        chex.assert_trees_all_equal(out, tree)
    else:
        scale = max_norm / norm
        np.testing.assert_allclose(stats.scale, scale, rtol=1e-5)
        np.testing.assert_allclose(flat(out), x * scale, rtol=1e-2, atol=1e-5)
        assert np.linalg.norm(flat(out)) <= max_norm * (1 + 1e-2) + 1e-6


@settings(max_examples=16)
@given(
    trees(nonfinite=True, dtypes=MIXED, max_leaves=6),
    st.sampled_from([jg.grad_clip, jg.grad_clip_by_rms]),
    st.booleans(),
)
def test_clip_never_makes_nan_and_passes_nonfinite_gradients_on(tree, fn, jit):
    bad = not np.all(np.isfinite(flat(tree)))
    out, stats = (jax.jit(fn) if jit else fn)(tree, 1.0)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
    assert bool(stats.finite) is not bad
    if bad:
        chex.assert_trees_all_equal(out, tree)
        assert float(stats.scale) == 1.0 and not bool(stats.clipped)
    else:
        assert np.all(np.isfinite(flat(out)))
