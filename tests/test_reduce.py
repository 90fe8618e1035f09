import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
import pytest
from helpers import flat, make_tree, tolerance, trees
from hypothesis import given
from hypothesis import strategies as st

import jaxgrad as jg


def _size(tree):
    return sum(np.size(x) for x in jax.tree.leaves(tree))


# -- norm, magnitude, rms ---------------------------------------------------------------


@pytest.mark.parametrize("fn", [jg.grad_norm, jg.grad_rms, jg.grad_rms])
def test_norms_match_numpy(fn, maybe_jit, tree_kind, dtype):
    tree = make_tree(tree_kind, dtype)
    entries = flat(tree)
    if fn is jg.grad_norm:
        expected = np.sqrt(np.sum(entries**2))
    else:
        expected = np.sqrt(np.mean(entries**2)) if entries.size else 0.0
    out = maybe_jit(fn)(tree)
    assert out.shape == () and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_norm_accumulates_float16_in_float32():
    out = jg.grad_norm(jnp.full(1000, 300.0, jnp.float16))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, 9486.833, rtol=1e-6)
    naive = jnp.sqrt(jnp.sum(jnp.full(1000, 300.0, jnp.float16) ** 2))
    assert not jnp.isfinite(naive)  # the overflow that accumulation in float32 avoids


def test_magnitude_is_true_rms_not_paysage_mean_of_means():
    g = jg.Gradient([jnp.full(1, 3.0)], [jnp.zeros(99)])
    np.testing.assert_allclose(jg.grad_rms(g), np.sqrt(9.0 / 100))
    paysage_style = np.sqrt((9.0 + 0.0) / 2)  # per-tensor mean squares, averaged over groups
    assert not np.isclose(float(jg.grad_rms(g)), paysage_style)


def test_rms_and_magnitude_are_the_same_value():
    tree = make_tree("nested", seed=5)
    assert float(jg.grad_rms(tree)) == float(jg.grad_rms(tree))


def test_complex_leaves_use_abs_squared():
    tree = {"z": jnp.array([3 + 4j, 0 + 1j], jnp.complex64)}
    np.testing.assert_allclose(jg.grad_norm(tree), np.sqrt(26.0), rtol=1e-6)
    assert jg.grad_norm(tree).dtype == jnp.float32


def test_float64_under_x64():
    with jax.enable_x64(True):
        tree = {"a": jnp.array([1e200, 1e200], jnp.float64), "b": jnp.ones(2, jnp.float32)}
        assert jg.grad_norm(tree).dtype == jnp.float64
        assert jg.grad_rms(tree).dtype == jnp.float64
        np.testing.assert_allclose(jg.grad_norm({"a": jnp.array([3.0, 4.0], jnp.float64)}), 5.0)


@pytest.mark.parametrize("fn", [jg.grad_norm, jg.grad_rms, jg.grad_rms])
@pytest.mark.parametrize("tree_kind", ["dict", "nested", "gradient", "nnx_state"])
def test_derivative_is_finite_at_zero(fn, tree_kind):
    zeros = jg.zero_grad(make_tree(tree_kind))
    d = jax.grad(fn)(zeros)
    assert jax.tree.structure(d) == jax.tree.structure(zeros)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(d))


@pytest.mark.parametrize("fn", [jg.grad_norm, jg.grad_rms])
def test_derivative_away_from_zero(fn):
    tree = make_tree("dict", seed=7)
    d = jax.grad(fn)(tree)
    entries = flat(tree)
    n = (
        np.sqrt(np.sum(entries**2))
        if fn is jg.grad_norm
        else np.sqrt(np.sum(entries**2)) * np.sqrt(entries.size)
    )
    np.testing.assert_allclose(flat(d), entries / n, rtol=1e-5)


def test_norm_agrees_with_optax(tree_kind):
    tree = make_tree(tree_kind)
    np.testing.assert_allclose(jg.grad_norm(tree), otu.tree_norm(tree), rtol=1e-6)


def test_norm_under_vmap():
    batch = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((3, 2))}
    out = jax.vmap(jg.grad_norm)(batch)
    expected = [np.linalg.norm(np.r_[np.arange(4.0) + 4 * i, 1, 1]) for i in range(3)]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


# -- accumulate and fold ------------------------------------------------------------------


def test_accumulate_sums_per_leaf_results(maybe_jit, tree_kind, dtype):
    tree = make_tree(tree_kind, dtype)
    out = maybe_jit(lambda t: jg.grad_accumulate(jnp.sum, t))(tree)
    assert out.shape == () and out.dtype == jnp.float32
    expected = sum(float(jnp.sum(x).astype(jnp.float32)) for x in jax.tree.leaves(tree))
    np.testing.assert_allclose(out, expected, rtol=tolerance(dtype), atol=1e-5)
    assert isinstance(float(jg.grad_accumulate(jnp.sum, tree)), float)


def test_accumulate_keeps_integer_results():
    out = jg.grad_accumulate(jnp.size, {"a": jnp.ones((2, 3)), "b": jnp.ones(4)})
    assert int(out) == 10 and jnp.issubdtype(out.dtype, jnp.integer)


def test_accumulate_of_empty_is_zero():
    out = jg.grad_accumulate(jnp.sum, {})
    assert out.shape == () and out.dtype == jnp.float32 and float(out) == 0.0


def test_accumulate_rejects_non_scalar_results():
    with pytest.raises(
        ValueError,
        match=r"`func` must return a scalar for every leaf of `grad`; at \['w'\] it returned f32\[3\]",
    ):
        jg.grad_accumulate(lambda x: x, {"w": jnp.ones(3)})
    with pytest.raises(TypeError, match="`func` must be callable"):
        jg.grad_accumulate("sum", {"w": jnp.ones(3)})


def test_fold_runs_left_to_right_in_leaf_order(maybe_jit):
    tree = {"b": jnp.array([2.0]), "a": jnp.array([1.0]), "c": jnp.array([3.0])}
    out = maybe_jit(lambda t: jg.grad_fold(lambda acc, x: acc * 10 + x[0], t))(tree)
    np.testing.assert_allclose(out, 123.0)  # leaves in sorted key order: a, b, c


def test_fold_of_empty_returns_initial_and_accepts_any_accumulator():
    assert jg.grad_fold(lambda acc, x: acc, {}, initial="start") == "start"
    count, total = jg.grad_fold(
        lambda acc, x: (acc[0] + x.size, acc[1] + jnp.sum(x)), make_tree("nested"), initial=(0, 0.0)
    )
    assert count == _size(make_tree("nested"))
    np.testing.assert_allclose(total, flat(make_tree("nested")).sum(), rtol=1e-5)


# -- normalize ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn", [jg.grad_normalize, jg.grad_normalize_], ids=["normalize", "normalize_"]
)
@pytest.mark.parametrize("tree_kind", ["leaf", "dict", "nested", "gradient", "nnx_state"])
def test_normalize_gives_unit_norm_and_keeps_dtypes(fn, maybe_jit, tree_kind, dtype):
    tree = make_tree(tree_kind, dtype)
    out = maybe_jit(fn)(tree)
    assert type(out) is type(tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
    np.testing.assert_allclose(jg.grad_norm(out), 1.0, rtol=tolerance(dtype) * 3)
    entries = flat(tree)
    np.testing.assert_allclose(flat(out), entries / np.linalg.norm(entries), atol=tolerance(dtype))


@pytest.mark.parametrize(
    "fn", [jg.grad_normalize, jg.grad_normalize_], ids=["normalize", "normalize_"]
)
def test_normalize_of_zero_is_zero_not_nan(fn, maybe_jit):
    zeros = jg.zero_grad(make_tree("gradient"))
    out = maybe_jit(fn)(zeros)
    chex.assert_trees_all_equal(out, zeros)
    d = jax.grad(lambda t: jg.grad_accumulate(jnp.sum, fn(t)))(zeros)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(d))


def test_normalize_of_empty_is_empty():
    assert jg.grad_normalize({}) == {}


@pytest.mark.parametrize("fn", [jg.grad_norm, jg.grad_rms])
def test_norms_propagate_nan_and_inf(fn):
    assert bool(jnp.isnan(fn({"w": jnp.array([1.0, jnp.nan])})))
    assert float(fn({"w": jnp.array([1.0, -jnp.inf])})) == np.inf


def test_normalize_propagates_nan():
    out = jg.grad_normalize({"w": jnp.array([1.0, jnp.nan])})
    assert bool(jnp.all(jnp.isnan(out["w"])))


def test_normalize_rejects_integer_leaves():
    with pytest.raises(
        TypeError,
        match=r"`grad` must have floating-point or complex leaves; at \['n'\] it has i32\[2\]",
    ):
        jg.grad_normalize({"x": jnp.ones(2), "n": jnp.ones(2, jnp.int32)})


# -- laws -------------------------------------------------------------------------------


@given(trees(), st.floats(-10, 10))
def test_norm_scales_with_absolute_value(tree, c):
    scaled = jg.grad_apply(lambda x: x * c, tree)
    np.testing.assert_allclose(
        jg.grad_norm(scaled), abs(c) * float(jg.grad_norm(tree)), rtol=1e-4, atol=1e-3
    )


@given(trees())
def test_norm_magnitude_accumulate_agree(tree):
    n = _size(tree)
    norm, rms = float(jg.grad_norm(tree)), float(jg.grad_rms(tree))
    np.testing.assert_allclose(rms * np.sqrt(n), norm, rtol=1e-4, atol=1e-4)
    sq = float(jg.grad_accumulate(lambda x: jnp.sum(x * x), tree))
    np.testing.assert_allclose(np.sqrt(sq), norm, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(norm, np.linalg.norm(flat(tree)), rtol=1e-4, atol=1e-4)
