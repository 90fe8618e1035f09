"""`donate=True`: buffers reused, input consumed, output correct, clear aliasing errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_tree

import jaxgrad as jg
from jaxgrad import _maps


def _half(x):
    return x * 0.5


def _average(m, x):
    return 0.5 * m + 0.5 * x


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _deleted(tree):
    return [x.is_deleted() for x in jax.tree.leaves(tree)]


DONATING = [
    (
        "apply_",
        lambda t, o: jg.grad_apply_(_half, t, donate=True),
        lambda t, o: jax.tree.map(_half, t),
    ),
    (
        "mapzip_",
        lambda t, o: jg.grad_mapzip_(_average, t, o, donate=True),
        lambda t, o: jax.tree.map(_average, t, o),
    ),
    (
        "normalize_",
        lambda t, o: jg.grad_normalize_(t, donate=True),
        lambda t, o: jg.grad_normalize(t),
    ),
]


@pytest.mark.parametrize(("name", "donated", "reference"), DONATING, ids=[d[0] for d in DONATING])
@pytest.mark.parametrize("tree_kind", ["leaf", "dict", "nested", "gradient", "nnx_state"])
def test_donation_consumes_input_and_gives_the_right_result(
    name, donated, reference, tree_kind, dtype
):
    tree, other = make_tree(tree_kind, dtype, seed=1), make_tree(tree_kind, dtype, seed=2)
    expected = reference(_copy(tree), other)
    out = donated(tree, other)
    assert type(out) is type(tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, expected)
    chex.assert_trees_all_close(out, expected)
    assert all(_deleted(tree))
    assert not any(_deleted(other))
    assert not any(_deleted(out))


@pytest.mark.parametrize(("name", "donated", "reference"), DONATING, ids=[d[0] for d in DONATING])
def test_default_does_not_donate(name, donated, reference):
    tree, other = make_tree("dict", seed=1), make_tree("dict", seed=2)
    fn = {
        "apply_": lambda: jg.grad_apply_(_half, tree),
        "mapzip_": lambda: jg.grad_mapzip_(_average, tree, other),
        "normalize_": lambda: jg.grad_normalize_(tree),
    }[name]
    fn()
    fn()  # re-running a notebook cell is safe
    assert not any(_deleted(tree))


def test_donated_buffers_are_reused():
    x = jnp.arange(1024.0)
    pointer = x.unsafe_buffer_pointer()
    out = jg.grad_apply_(_half, {"x": x}, donate=True)
    assert out["x"].unsafe_buffer_pointer() == pointer


def test_donated_apply_compiles_once_per_function_object():
    before = _maps._apply_donated._cache_size()
    for _ in range(3):
        jg.grad_apply_(_half, {"w": jnp.ones((7, 3))}, donate=True)
    assert _maps._apply_donated._cache_size() == before + 1


def test_array_appearing_twice_is_a_clear_error():
    x = jnp.ones(3)
    with pytest.raises(
        ValueError,
        match=r"`grad` cannot be donated: the same array appears at \['a'\] and at \['b'\]",
    ):
        jg.grad_apply_(_half, {"a": x, "b": x}, donate=True)
    assert not x.is_deleted()
    with pytest.raises(
        ValueError,
        match=r"`grad` cannot be donated: the same array appears at \.layers\[0\] and at \.weights\[0\]",
    ):
        jg.grad_normalize_(jg.Gradient([x], [x]), donate=True)


def test_array_in_both_arguments_is_a_clear_error():
    x = jnp.ones(3)
    with pytest.raises(
        ValueError,
        match=r"`grad1` cannot be donated: its array at \['w'\] is also `grad2` at \['v'\]",
    ):
        jg.grad_mapzip_(
            _average, {"w": x, "v": jnp.ones(3)}, {"w": jnp.ones(3), "v": x}, donate=True
        )
    assert not x.is_deleted()


def test_donating_a_deleted_array_is_a_clear_error():
    tree = {"w": jnp.ones(3)}
    jg.grad_apply_(_half, tree, donate=True)
    with pytest.raises(
        ValueError, match=r"`grad` cannot be donated: its array at \['w'\] was already deleted"
    ):
        jg.grad_apply_(_half, tree, donate=True)


def test_donate_inside_user_jit_is_plain():
    tree = {"w": jnp.ones(3)}
    out = jax.jit(lambda t: jg.grad_apply_(_half, t, donate=True))(tree)
    np.testing.assert_array_equal(out["w"], 0.5)
    assert not tree["w"].is_deleted()


# -- the accumulator and the per-device helpers ------------------------------------------


def test_accumulator_donation_reuses_the_sum_buffers(dtype):
    like = make_tree("nested", dtype)
    state = jg.GradSum.zeros_like(like)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.total)]
    out = jg.GradSum.add(state, make_tree("nested", dtype, seed=1), donate=True)
    assert all(_deleted(state))
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(out.total)] == pointers
    chex.assert_trees_all_equal_shapes_and_dtypes(jg.GradSum.mean(out), like)


def test_accumulator_donation_with_a_module_as_the_gradient():
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
    state = jg.GradSum.zeros_like(model)
    out = jg.GradSum.add(state, model, donate=True)
    assert all(_deleted(state))
    assert not any(_deleted(nnx.state(model)))  # the module is only read
    chex.assert_trees_all_equal(jg.GradSum.mean(out), nnx.state(model, nnx.Param))


def test_per_device_on_one_device_is_one_call_on_the_whole_tree():
    from jaxgrad._donate import device_groups, per_device, placed

    tree, other = make_tree("nested", seed=1), make_tree("nested", seed=2)
    calls = []

    def fn(t, o):
        calls.append(t)
        return jax.tree.map(jnp.add, t, o)

    out = per_device(fn, tree, other)
    assert len(calls) == 1 and calls[0] is tree
    chex.assert_trees_all_close(out, jax.tree.map(jnp.add, tree, other))
    assert device_groups(jax.tree.leaves(tree)) == [[0, 1, 2, 3]]
    assert device_groups([]) == []
    assert not placed(jax.tree.leaves(tree))


def test_keep_only_keeps_the_key_paths_of_the_kept_leaves():
    from jaxgrad._donate import keep_only

    tree = jg.Gradient([{"bias": jnp.ones(2)}, {"bias": jnp.ones(3)}], [{"W": jnp.ones((2, 3))}])
    leaves, treedef = jax.tree.flatten(tree)
    part = keep_only(treedef, leaves, {2})
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(part)[0]]
    assert paths == [".weights[0]['W']"]
    assert treedef.flatten_up_to(part) == [None, None, leaves[2]]
