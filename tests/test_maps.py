import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
import pytest
from helpers import make_tree, trees
from hypothesis import given

import jaxgrad as jg
from jaxgrad import gradient_util as gu


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


@pytest.mark.parametrize("fn", [jg.grad_apply, jg.grad_apply_], ids=["apply", "apply_"])
def test_apply_maps_every_leaf(fn, maybe_jit, tree_kind, dtype):
    tree = make_tree(tree_kind, dtype)
    before = _copy(tree)
    out = maybe_jit(lambda t: fn(lambda x: x * 2 + 1, t))(tree)
    expected = jax.tree.map(lambda x: x * 2 + 1, tree)
    assert type(out) is type(tree)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, expected)
    chex.assert_trees_all_close(out, expected)
    chex.assert_trees_all_equal(tree, before)  # input untouched


@pytest.mark.parametrize("fn", [jg.grad_mapzip, jg.grad_mapzip_], ids=["mapzip", "mapzip_"])
def test_mapzip_zips_leaves(fn, maybe_jit, tree_kind, dtype):
    a, b = make_tree(tree_kind, dtype, seed=1), make_tree(tree_kind, dtype, seed=2)
    before_a, before_b = _copy(a), _copy(b)
    out = maybe_jit(lambda x, y: fn(lambda u, v: 0.9 * u + 0.1 * v, x, y))(a, b)
    expected = jax.tree.map(lambda u, v: 0.9 * u + 0.1 * v, a, b)
    assert type(out) is type(a)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, expected)
    chex.assert_trees_all_close(out, expected)
    chex.assert_trees_all_equal(a, before_a)
    chex.assert_trees_all_equal(b, before_b)


@pytest.mark.parametrize("tree_kind", ["dict", "nested", "gradient", "nnx_state"])
def test_mapzip_add_agrees_with_optax(tree_kind):
    a, b = make_tree(tree_kind, seed=3), make_tree(tree_kind, seed=4)
    chex.assert_trees_all_close(jg.grad_mapzip(jnp.add, a, b), otu.tree_add(a, b))
    chex.assert_trees_all_close(jg.grad_apply(lambda x: 0.5 * x, a), otu.tree_scale(0.5, a))


@pytest.mark.parametrize(
    ("tree1", "tree2", "message"),
    [
        (
            jg.Gradient([{"bias": 1.0}], []),
            jg.Gradient([{"scale": 1.0}], []),
            r"`grad1` and `grad2` must have the same structure; they first differ at "
            r"\.layers\[0\]: `grad1` has a dict with keys \['bias'\], `grad2` has a dict with keys \['scale'\]\.",
        ),
        (
            {"a": 1.0},
            [1.0],
            r"first differ at the root: `grad1` has a dict with keys \['a'\], `grad2` has a list with keys \[0\]",
        ),
        (
            {"a": [1.0, 2.0]},
            {"a": [1.0]},
            r"first differ at \['a'\]: `grad1` has a list with keys \[0, 1\], `grad2` has a list with keys \[0\]",
        ),
        (
            {"a": {"b": jnp.ones(2)}},
            {"a": {"b": None}},
            r"first differ at \['a'\]\['b'\]: `grad1` has a leaf f32\[2\], `grad2` has None",
        ),
        (
            jg.Gradient([1.0], [2.0]),
            {"layers": [1.0], "weights": [2.0]},
            r"at the root: `grad1` has a Gradient with keys \['layers', 'weights'\], `grad2` has a dict",
        ),
    ],
    ids=["keys", "type", "length", "leaf-vs-none", "gradient-vs-dict"],
)
@pytest.mark.parametrize("fn", [jg.grad_mapzip, jg.grad_mapzip_], ids=["mapzip", "mapzip_"])
def test_mapzip_structure_mismatch_names_first_path(fn, tree1, tree2, message):
    with pytest.raises(ValueError, match=message):
        fn(jnp.add, tree1, tree2)


def test_mapzip_structure_error_is_raised_at_trace_time():
    with pytest.raises(ValueError, match=r"first differ at \['b'\]"):
        jax.jit(lambda a, b: jg.grad_mapzip(jnp.add, a, b))({"b": 1.0}, {"b": (1.0,)})


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: jg.grad_apply(3, {"a": 1.0}), "func"),
        (lambda: jg.grad_apply_(None, {"a": 1.0}), "func_"),
        (lambda: jg.grad_mapzip("add", {"a": 1.0}, {"a": 1.0}), "func"),
        (lambda: jg.grad_mapzip_(1.0, {"a": 1.0}, {"a": 1.0}), "func_"),
    ],
)
def test_non_callable_func_is_a_type_error(call, name):
    with pytest.raises(TypeError, match=rf"`{name}` must be callable; got"):
        call()


def test_none_subtrees_are_empty_as_in_jax():
    tree = {"a": None, "b": [jnp.ones(2), None]}
    out = jg.grad_apply(lambda x: x + 1, tree)
    assert out["a"] is None and out["b"][1] is None
    np.testing.assert_array_equal(out["b"][0], 2.0)
    zipped = jg.grad_mapzip(jnp.add, tree, tree)
    assert zipped["a"] is None


def test_user_callable_is_not_cached_sees_current_globals():
    scale = {"value": 2.0}
    tree = {"w": jnp.ones(2)}
    first = jg.grad_apply(lambda x: x * scale["value"], tree)
    scale["value"] = 5.0
    second = jg.grad_apply(lambda x: x * scale["value"], tree)
    np.testing.assert_array_equal(first["w"], 2.0)
    np.testing.assert_array_equal(second["w"], 5.0)


def test_paysage_path_exposes_the_same_functions():
    assert gu.grad_mapzip is jg.grad_mapzip and gu.Gradient is jg.Gradient


@given(trees())
def test_apply_is_linear(tree):
    """grad_apply of a linear map equals the linear combination of the maps."""
    left = jg.grad_apply(lambda x: 3.0 * x - 2.0 * x, tree)
    right = jg.grad_mapzip(
        jnp.subtract, jg.grad_apply(lambda x: 3.0 * x, tree), jg.grad_apply(lambda x: 2.0 * x, tree)
    )
    chex.assert_trees_all_close(left, right, atol=1e-4)
    chex.assert_trees_all_close(left, tree, atol=1e-4)


# -- paysage's in-place style: `func_` returning None -----------------------------------


def _scale_in_place(x):
    """paysage style: update the argument, return nothing (a no-op on JAX arrays)."""
    x * 2.0


def _add_in_place(x, y):
    x + y


@pytest.mark.parametrize("donate", [False, True], ids=["copy", "donate"])
def test_apply_in_place_style_func_returning_none_names_the_leaf(donate, maybe_jit, dtype):
    grad = jg.Gradient([{"bias": jnp.ones(2, dtype)}], [{"W": jnp.ones((2, 2), dtype)}])
    with pytest.raises(
        TypeError,
        match=r"`func_` must return the new leaf; at \.layers\[0\]\['bias'\] it returned None\. "
        r"JAX arrays are immutable, so `grad_apply_` builds a new tree from what `func_` "
        r"returns instead of updating `grad` in place as paysage did\.",
    ):
        maybe_jit(lambda g: jg.grad_apply_(_scale_in_place, g, donate=donate))(grad)
    assert not grad.layers[0]["bias"].is_deleted()  # refused before anything was donated


@pytest.mark.parametrize("donate", [False, True], ids=["copy", "donate"])
def test_mapzip_in_place_style_func_returning_none_names_the_leaf(donate, maybe_jit, dtype):
    grad1 = {"a": jnp.ones(2, dtype), "b": [jnp.ones(3, dtype), None]}
    grad2 = {"a": jnp.ones(2, dtype), "b": [jnp.ones(3, dtype), None]}
    with pytest.raises(
        TypeError,
        match=r"`func_` must return the new leaf; at \['a'\] it returned None\. .*`grad_mapzip_` "
        r"builds a new tree .* instead of updating `grad1` in place as paysage did\.",
    ):
        maybe_jit(lambda a, b: jg.grad_mapzip_(_add_in_place, a, b, donate=donate))(grad1, grad2)
    assert not grad1["a"].is_deleted()


def test_none_for_a_later_leaf_is_found_too():
    grad = {"a": jnp.ones(2), "b": jnp.zeros(2), "c": None}
    with pytest.raises(TypeError, match=r"at \['b'\] it returned None"):
        jg.grad_apply_(lambda x: None if bool(jnp.all(x == 0)) else x, grad)


def test_none_subtrees_of_the_input_stay_allowed_in_place_variants():
    tree = {"a": None, "b": [jnp.ones(2), None]}
    out = jg.grad_apply_(lambda x: x + 1, tree)
    assert out["a"] is None and out["b"][1] is None
    zipped = jg.grad_mapzip_(jnp.add, tree, tree)
    assert zipped["a"] is None and zipped["b"][1] is None
    np.testing.assert_array_equal(zipped["b"][0], 2.0)
