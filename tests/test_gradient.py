import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_tree

import jaxgrad as jg


def _grad(scale=1.0, dtype=jnp.float32):
    return jg.Gradient(
        layers=[{"bias": jnp.arange(3.0, dtype=dtype) * scale}, {"bias": jnp.ones(2, dtype)}],
        weights=[{"W": jnp.full((3, 2), scale, dtype)}],
    )


def test_positional_and_keyword_construction_agree():
    a = jg.Gradient([1.0], [2.0])
    b = jg.Gradient(layers=[1.0], weights=[2.0])
    assert (a.layers, a.weights) == (b.layers, b.weights)


def test_is_frozen_and_replace_returns_new():
    g = _grad()
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.layers = []  # type: ignore[misc]
    h = g.replace(weights=[])
    assert h is not g and h.weights == [] and g.weights[0]["W"].shape == (3, 2)
    assert h.layers is g.layers


def test_key_paths_name_the_fields():
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(_grad())[0]]
    assert paths == [".layers[0]['bias']", ".layers[1]['bias']", ".weights[0]['W']"]


def test_is_a_pytree_under_jit_vmap_grad():
    g = _grad()
    doubled = jax.jit(lambda t: jax.tree.map(lambda x: 2 * x, t))(g)
    assert isinstance(doubled, jg.Gradient)
    chex.assert_trees_all_close(doubled, jax.tree.map(lambda x: 2 * x, g))
    batched = jax.vmap(lambda s: g * s)(jnp.arange(4.0))
    assert isinstance(batched, jg.Gradient) and batched.weights[0]["W"].shape == (4, 3, 2)
    dg = jax.grad(lambda t: jnp.sum(t.weights[0]["W"] ** 2))(g)
    assert isinstance(dg, jg.Gradient)
    np.testing.assert_allclose(dg.weights[0]["W"], 2 * g.weights[0]["W"])


@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"]
)
def test_arithmetic_matches_leafwise(maybe_jit, dtype):
    a, b = _grad(1.0, dtype), _grad(3.0, dtype)
    cases = {
        "add": (lambda a, b: a + b, lambda x, y: x + y),
        "sub": (lambda a, b: a - b, lambda x, y: x - y),
        "neg": (lambda a, b: -a, lambda x, y: -x),
        "mul": (lambda a, b: a * 2.0, lambda x, y: x * 2.0),
        "rmul": (lambda a, b: 0.5 * a, lambda x, y: 0.5 * x),
        "div": (lambda a, b: a / 4.0, lambda x, y: x / 4.0),
        "add_scalar": (lambda a, b: a + 1.0, lambda x, y: x + 1.0),
        "rsub_scalar": (lambda a, b: 1.0 - a, lambda x, y: 1.0 - x),
    }
    for name, (op, ref) in cases.items():
        out = maybe_jit(op)(a, b)
        assert isinstance(out, jg.Gradient), name
        expected = jax.tree.map(ref, a, b)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, expected)
        chex.assert_trees_all_close(out, expected, custom_message=name)


def test_scalar_array_operands_work_under_jit():
    g = _grad()
    out = jax.jit(lambda g, s: g * s)(g, jnp.float32(3.0))
    np.testing.assert_allclose(out.weights[0]["W"], 3.0)


def test_gradient_times_gradient_is_a_clear_type_error():
    with pytest.raises(TypeError, match=r"`Gradient \* Gradient` is not defined.*grad_mapzip"):
        _ = _grad() * _grad()
    with pytest.raises(TypeError, match=r"`Gradient / Gradient` is not defined"):
        _ = _grad() / _grad()


def test_non_scalar_operand_is_rejected():
    with pytest.raises(
        TypeError, match=r"`Gradient \* array` needs a scalar \(0-d\) array; got f64\[3\]"
    ):
        _ = _grad() * np.ones(3)
    with pytest.raises(TypeError, match=r"`Gradient \+ array` needs a scalar"):
        _ = jnp.ones(2) + _grad()
    with pytest.raises(TypeError, match=r"needs a scalar"):
        _ = np.ones(3) * _grad()
    with pytest.raises(TypeError):
        _ = _grad() + "a"


def test_adding_different_structures_names_the_path():
    other = _grad().replace(layers=[{"scale": jnp.zeros(3)}, {"bias": jnp.ones(2)}])
    with pytest.raises(
        ValueError,
        match=r"first differ at \.layers\[0\]: `self` has a dict with keys \['bias'\], `other` has a dict with keys \['scale'\]",
    ):
        _ = _grad() + other


def test_adding_different_shapes_names_the_leaf():
    other = _grad().replace(weights=[{"W": jnp.ones((3, 1))}])
    with pytest.raises(
        ValueError,
        match=r"same shapes; at \.weights\[0\]\['W'\] `self` has f32\[3,2\], `other` has f32\[3,1\]",
    ):
        _ = _grad() + other


def test_repr_shows_shapes_and_dtypes_never_values():
    g = jg.Gradient([jnp.full((1000, 1000), 7.0)], [{"b": jnp.zeros(3, jnp.bfloat16)}])
    text = repr(g)
    assert text == "Gradient(layers=[f32[1000,1000]], weights=[{'b': bf16[3]}])"
    assert "7" not in text


def test_repr_of_tracers_and_non_arrays():
    seen = []
    jax.jit(lambda g: seen.append(repr(g)) or 0)(jg.Gradient([jnp.ones(2)], []))
    assert seen == ["Gradient(layers=[f32[2]], weights=[])"]
    assert repr(jg.Gradient([], None)) == "Gradient(layers=[], weights=None)"


@pytest.mark.parametrize("kind", ["leaf", "dict", "nested"])
def test_fields_hold_any_pytree(kind):
    g = jg.Gradient(make_tree(kind), make_tree(kind, seed=1))
    assert len(jax.tree.leaves(g)) == 2 * len(jax.tree.leaves(make_tree(kind)))
    chex.assert_trees_all_close(g - g, jax.tree.map(jnp.zeros_like, g))
