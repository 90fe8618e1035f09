import dataclasses
import re
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
import pytest
from flax import linen, nnx
from helpers import make_tree

import jaxgrad as jg


@dataclasses.dataclass
class Layer:
    params: Any


@dataclasses.dataclass
class LayeredModel:
    """paysage's model protocol: layers and weights, each item carrying `params`."""

    layers: list
    weights: list


def _rbm(num_visible=4, num_hidden=3, dtype=jnp.float32):
    return LayeredModel(
        layers=[
            Layer({"bias": jnp.ones(num_visible, dtype)}),
            Layer({"bias": jnp.ones(num_hidden, dtype)}),
        ],
        weights=[Layer({"W": jnp.ones((num_visible, num_hidden), dtype)})],
    )


@dataclasses.dataclass
class Connection:
    """Later paysage: a connection carries a weights layer, which carries `params`."""

    weights: Layer


@dataclasses.dataclass
class ConnectedModel:
    """Later paysage's model protocol: layers and connections."""

    layers: Any
    connections: Any


def _connected_rbm(num_visible=4, num_hidden=3, dtype=jnp.float32):
    rbm = _rbm(num_visible, num_hidden, dtype)
    return ConnectedModel(layers=rbm.layers, connections=[Connection(w) for w in rbm.weights])


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.conv = nnx.Conv(4, 3, kernel_size=(3,), rngs=rngs)
        self.norm = nnx.BatchNorm(3, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, ids):
        x = self.conv(self.embed(ids))
        return self.out(self.drop(self.norm(x)))


# -- zero_grad ------------------------------------------------------------------------


def test_zero_grad_of_pytree_keeps_structure_shapes_dtypes(maybe_jit, tree_kind, dtype):
    tree = make_tree(tree_kind, dtype)
    out = maybe_jit(jg.zero_grad)(tree)
    assert type(out) is type(tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))
    chex.assert_trees_all_equal(out, otu.tree_zeros_like(tree))


def test_zero_grad_of_layered_model_is_a_gradient():
    out = jg.zero_grad(_rbm(dtype=jnp.bfloat16))
    assert isinstance(out, jg.Gradient)
    assert (
        repr(out)
        == "Gradient(layers=[{'bias': bf16[4]}, {'bias': bf16[3]}], weights=[{'W': bf16[4,3]}])"
    )
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))


def test_zero_grad_of_later_paysage_layout_is_a_gradient(dtype):
    out = jg.zero_grad(_connected_rbm(dtype=dtype))
    assert isinstance(out, jg.Gradient)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, jg.zero_grad(_rbm(dtype=dtype)))
    assert len(out.layers) == 2 and len(out.weights) == 1  # one entry per connection
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))


@pytest.mark.parametrize(
    "model",
    [
        LayeredModel(layers={"v": Layer(jnp.ones(2))}, weights=[]),
        LayeredModel(layers=[Layer(jnp.ones(2)), object()], weights=[]),
        LayeredModel(layers=[Layer(jnp.ones(2))], weights=[object()]),
        ConnectedModel(layers=[Layer(jnp.ones(2))], connections=[Layer(jnp.ones(2))]),
        ConnectedModel(layers=[Layer(jnp.ones(2))], connections=[Connection(object())]),  # type: ignore[arg-type]
        Layer(params=jnp.ones(2)),
    ],
    ids=[
        "layers-dict",
        "layer-without-params",
        "weight-without-params",
        "connection-without-weights",
        "weights-without-params",
        "no-layers",
    ],
)
def test_model_fitting_no_layout_names_both_and_what_is_missing(model, request):
    missing = {
        "layers-dict": r"`model\.layers` is a dict, not a list or tuple",
        "layer-without-params": r"`model\.layers\[1\]` has no `params`",
        "weight-without-params": r"`model\.weights\[0\]` has no `params`",
        "connection-without-weights": r"`model\.connections\[0\]` has no `weights`",
        "weights-without-params": r"`model\.connections\[0\]\.weights` has no `params`",
        "no-layers": "",
    }[request.node.callspec.id]
    both = (
        r"`model\.layers\[i\]\.params` with `model\.weights\[i\]\.params`, as in paysage 0\.2, "
        r"or with `model\.connections\[i\]\.weights\.params`, as in later paysage\)"
    )
    for fn in (jg.zero_grad, lambda m: jg.random_grad(m, jax.random.key(0)), jg.null_grad):
        if not missing:  # no `layers` at all: not a paysage model, a plain object
            with pytest.raises(TypeError, match=r"at the root it has a Layer|got a Layer\.$"):
                fn(model)
            continue
        with pytest.raises(TypeError, match=rf"{both}.*; got a \w+, and {missing}\.$") as info:
            fn(model)
        assert "zero_grad" not in str(info.value)


def test_zero_grad_dtype_matches_optax(tree_kind, dtype):
    tree = make_tree(tree_kind)
    if tree_kind == "dict":
        tree["n"] = jnp.arange(3)  # an integer leaf gets `dtype` too
    out = jg.zero_grad(tree, dtype=dtype)
    expected = otu.tree_zeros_like(tree, dtype)
    assert jax.tree.structure(out) == jax.tree.structure(expected)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, expected)
    assert all(x.dtype == dtype for x in jax.tree.leaves(out))
    chex.assert_trees_all_equal(out, expected)


def test_zero_grad_dtype_under_jit_and_for_models(dtype):
    out = jax.jit(lambda t: jg.zero_grad(t, dtype=dtype))({"w": jnp.ones(3, jnp.int8)})
    assert out["w"].dtype == dtype
    layered = jg.zero_grad(_connected_rbm(), dtype=dtype)
    assert all(x.dtype == dtype for x in jax.tree.leaves(layered))
    state = jg.zero_grad(_Net(nnx.Rngs(0)), dtype=dtype)
    assert type(state) is nnx.State and all(x.dtype == dtype for x in jax.tree.leaves(state))


def test_zero_grad_rejects_a_non_dtype():
    with pytest.raises(
        TypeError, match=r"`dtype` must be a dtype such as `jnp\.float32`, or None; got str 'f33'\."
    ):
        jg.zero_grad({"w": jnp.ones(2)}, dtype="f33")


def test_zero_grad_rejects_prng_key_leaves():
    tree = {"w": jnp.ones(2), "rng": [jax.random.key(0)]}
    with pytest.raises(
        TypeError,
        match=r"`model` must be a pytree of numeric arrays; at \['rng'\]\[0\] it has the PRNG key "
        r"key<fry>\[\], which has no gradient\.",
    ):
        jg.zero_grad(tree)


def test_zero_grad_of_nnx_module_matches_nnx_grad():
    model = _Net(nnx.Rngs(0))
    expected = nnx.grad(lambda m: jnp.sum(m(jnp.array([[1, 2, 3, 4]]))))(model)
    out = jg.zero_grad(model)
    assert type(out) is nnx.State
    assert jax.tree.structure(out) == jax.tree.structure(expected)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, expected)
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(out)[0]}
    assert not any("mean" in p or "var" in p or "rngs" in p for p in paths)  # Params only


def test_zero_grad_of_linen_params():
    params = linen.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    out = jg.zero_grad(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
    expected = jax.grad(
        lambda p: 0.0 * jnp.sum(linen.Dense(3).apply({"params": p}, jnp.ones((1, 2))))
    )(params)
    assert jax.tree.structure(out) == jax.tree.structure(expected)


def test_zero_grad_rejects_non_array_leaves():
    with pytest.raises(
        TypeError,
        match=r"`model` must be a pytree of numeric arrays; at \['name'\] it has a str: 'dense'",
    ):
        jg.zero_grad({"name": "dense", "w": jnp.ones(2)})
    with pytest.raises(
        TypeError, match=r"`model` must be a pytree of numeric arrays; at the root it has a object"
    ):
        jg.zero_grad(object())


# -- random_grad ----------------------------------------------------------------------


def test_random_grad_structure_and_range(maybe_jit, tree_kind, dtype):
    tree = make_tree(tree_kind, dtype)
    out = maybe_jit(jg.random_grad)(tree, jax.random.key(0))
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
    for x in jax.tree.leaves(out):
        assert bool(jnp.all((x >= 0) & (x < 1)))


def test_random_grad_is_deterministic_and_key_dependent():
    tree = make_tree("gradient")
    a = jg.random_grad(tree, jax.random.key(1))
    b = jg.random_grad(tree, jax.random.key(1))
    c = jg.random_grad(tree, jax.random.key(2))
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(a.weights[0]["W"], c.weights[0]["W"])


def test_random_grad_uses_an_independent_key_per_leaf():
    tree = {"a": jnp.zeros(64), "b": jnp.zeros(64)}
    out = jg.random_grad(tree, jax.random.key(0))
    assert not np.allclose(out["a"], out["b"])
    keys = jax.random.split(jax.random.key(0), 2)
    np.testing.assert_array_equal(out["a"], jax.random.uniform(keys[0], (64,)))
    np.testing.assert_array_equal(out["b"], jax.random.uniform(keys[1], (64,)))


def test_random_grad_accepts_raw_keys_and_custom_sampler():
    tree = {"w": jnp.zeros((500,))}
    out = jg.random_grad(tree, jax.random.PRNGKey(0), sampler=jax.random.normal)
    assert float(jnp.min(out["w"])) < 0 < float(jnp.max(out["w"]))
    calls = []

    def sampler(key, shape, dtype):
        calls.append((shape, jnp.dtype(dtype)))
        return jnp.full(shape, 7, dtype)

    out = jg.random_grad({"w": jnp.zeros((2, 3), jnp.float16)}, jax.random.key(0), sampler=sampler)
    assert calls == [((2, 3), jnp.dtype(jnp.float16))]
    np.testing.assert_array_equal(out["w"], 7)


def test_random_grad_of_layered_model_and_nnx_module():
    g = jg.random_grad(_rbm(), jax.random.key(0))
    assert isinstance(g, jg.Gradient) and g.weights[0]["W"].shape == (4, 3)
    model = _Net(nnx.Rngs(0))
    r = jg.random_grad(model, jax.random.key(0))
    assert jax.tree.structure(r) == jax.tree.structure(jg.zero_grad(model))


def test_random_grad_under_vmap_over_keys():
    keys = jax.random.split(jax.random.key(0), 3)
    out = jax.vmap(lambda k: jg.random_grad({"w": jnp.zeros(4)}, k))(keys)
    assert out["w"].shape == (3, 4)
    assert not np.allclose(out["w"][0], out["w"][1])


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        (0, "int 0"),
        (jnp.ones(2), r"f32\[2\]"),
        (jax.random.split(jax.random.key(0), 2), r"key<fry>\[2\]"),
    ],
    ids=["int", "float-array", "batched-keys"],
)
def test_random_grad_rejects_bad_keys(key, shown):
    with pytest.raises(
        TypeError,
        match=rf"`key` must be a single JAX PRNG key such as `jax.random.key\(0\)`; got {shown}\.",
    ):
        jg.random_grad({"w": jnp.zeros(2)}, key)


def test_random_grad_of_later_paysage_layout(dtype):
    g = jg.random_grad(_connected_rbm(dtype=dtype), jax.random.key(0))
    assert isinstance(g, jg.Gradient)
    chex.assert_trees_all_equal(g, jg.random_grad(_rbm(dtype=dtype), jax.random.key(0)))


@pytest.mark.parametrize(
    ("leaf", "shown"),
    [
        (jnp.arange(3), r"i32\[3\]"),
        (jnp.array([True, False]), r"bool\[2\]"),
        (7, r"i32\[\]"),
        (jax.random.key(0), r"key<fry>\[\]"),
    ],
    ids=["int", "bool", "python-int", "prng-key"],
)
@pytest.mark.parametrize(
    "sampler", [jax.random.uniform, jax.random.normal], ids=["uniform", "normal"]
)
def test_random_grad_rejects_leaves_that_are_not_floating(leaf, shown, sampler, maybe_jit):
    tree = {"w": jnp.zeros(2), "x": [leaf]}
    kinds = "floating-point" if sampler is jax.random.uniform else "floating-point or complex"
    expected = (  # the one wording for a leaf of the wrong dtype (jaxgrad._checks)
        rf"`model` must have {kinds} leaves; at \['x'\]\[0\] it has {shown}\. Leave integer "
        r"and boolean leaves out of the tree, or cast them first"
    )
    if "key" in shown:  # refused earlier, with every function that takes a model
        expected = rf"`model` must be a pytree of numeric arrays; at \['x'\]\[0\] it has the PRNG key {shown}, which has no gradient"
    with pytest.raises(TypeError, match=expected):
        maybe_jit(lambda t: jg.random_grad(t, jax.random.key(0), sampler=sampler))(tree)


def test_random_grad_complex_leaves_need_a_complex_sampler():
    tree = {"z": jnp.zeros(3, jnp.complex64)}
    with pytest.raises(
        TypeError,
        match=r"`model` must have floating-point leaves; at \['z'\] it has c64\[3\]\. .*for "
        r"complex leaves pass `sampler=jax\.random\.normal` \(`jax\.random\.uniform` draws "
        r"real numbers\)\.",
    ):
        jg.random_grad(tree, jax.random.key(0))
    out = jg.random_grad(tree, jax.random.key(0), sampler=jax.random.normal)
    assert out["z"].dtype == jnp.complex64 and bool(jnp.any(out["z"].imag != 0))


def _ignores_dtype(key, shape, dtype):
    return jax.random.normal(key, shape)  # always float32


def _scalar(key, shape, dtype):
    return jax.random.normal(key, (), dtype)


_SHORT = {jnp.float32: "f32", jnp.bfloat16: "bf16", jnp.float16: "f16"}


def _sampler_message(given: str, returned: str) -> str:
    return re.escape(
        f"`sampler` must return an array of the shape and dtype it is given; for the leaf at "
        f"['a'] it was given {given} and returned {returned}."
    )


@pytest.mark.parametrize("sharded", [False, True], ids=["default", "out_shardings"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_random_grad_sampler_that_ignores_dtype_is_a_type_error(sharded, dtype):
    tree = {"a": jnp.zeros((2, 3), dtype), "b": [jnp.zeros((2, 3), dtype)]}
    shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if sharded else None
    with pytest.raises(TypeError, match=_sampler_message(f"{_SHORT[dtype]}[2,3]", "f32[2,3]")):
        jg.random_grad(tree, jax.random.key(0), sampler=_ignores_dtype, out_shardings=shardings)


@pytest.mark.parametrize("sharded", [False, True], ids=["default", "out_shardings"])
def test_random_grad_sampler_that_returns_a_scalar_is_a_value_error(sharded, dtype):
    tree = {"a": jnp.zeros((2, 3), dtype), "b": [jnp.zeros((2, 3), dtype)]}
    shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if sharded else None
    short = _SHORT[dtype]
    with pytest.raises(ValueError, match=_sampler_message(f"{short}[2,3]", f"{short}[]")):
        jg.random_grad(tree, jax.random.key(0), sampler=_scalar, out_shardings=shardings)


def test_random_grad_sampler_check_runs_the_sampler_once_per_leaf():
    calls = []

    def sampler(key, shape, dtype):
        calls.append(shape)
        return jax.random.normal(key, shape, dtype)

    jg.random_grad({"a": jnp.zeros(2), "b": jnp.zeros((1, 3))}, jax.random.key(0), sampler=sampler)
    assert calls == [(2,), (1, 3)]


def test_random_grad_sampler_returning_a_non_array_names_the_leaf():
    with pytest.raises(
        TypeError,
        match=r"`sampler` must return an array; for the leaf at \['b'\]\[0\] \(f32\[2\]\) it returned a list\.",
    ):
        jg.random_grad(
            {"b": [jnp.zeros(2)]}, jax.random.key(0), sampler=lambda k, shape, d: [0.0, 0.0]
        )


def test_random_grad_rejects_non_callable_sampler():
    with pytest.raises(TypeError, match="`sampler` must be callable"):
        jg.random_grad({"w": jnp.zeros(2)}, jax.random.key(0), sampler="normal")  # type: ignore[arg-type]


def test_paysage_rbm_random_grad_norm_and_normalize():
    """A 1000x1000 RBM: uniform [0, 1) entries have mean square 1/3, so norm ~ sqrt(N/3)."""
    model = _rbm(1000, 1000)
    g = jg.random_grad(model, jax.random.key(0))
    n = 1000 * 1000 + 2000
    np.testing.assert_allclose(jg.grad_norm(g), np.sqrt(n / 3), rtol=2e-3)
    np.testing.assert_allclose(jg.grad_rms(g), np.sqrt(1 / 3), rtol=2e-3)
    np.testing.assert_allclose(jg.grad_norm(jg.grad_normalize(g)), 1.0, rtol=1e-5)


# -- null_grad --------------------------------------------------------------------------


def test_null_grad_of_layered_model_has_no_leaves():
    out = jg.null_grad(_rbm())
    assert isinstance(out, jg.Gradient)
    assert out.layers == [[], []] and out.weights == [[]]
    assert jax.tree.leaves(out) == []


def test_null_grad_of_gradient_mirrors_its_layout():
    out = jg.null_grad(jg.zero_grad(_rbm()))
    assert (out.layers, out.weights) == ([[], []], [[]])
    assert jg.grad_norm(out) == 0.0


def test_null_grad_of_later_paysage_layout_has_one_entry_per_connection():
    model = _connected_rbm()
    model.connections.append(Connection(Layer({"W": jnp.ones((3, 3))})))
    out = jg.null_grad(model)
    assert isinstance(out, jg.Gradient)
    assert (out.layers, out.weights) == ([[], []], [[], []])


@pytest.mark.parametrize(
    ("model", "got"),
    [
        ({"w": jnp.ones(2)}, "a dict"),
        (jnp.ones(3), "a ArrayImpl"),
        (jg.Gradient({"a": 1.0}, []), "a Gradient whose `layers` is a dict"),
    ],
    ids=["dict", "array", "gradient-with-dict"],
)
def test_null_grad_rejects_other_inputs(model, got):
    with pytest.raises(
        TypeError,
        match=r"`model` must be a paysage model \(.*\) or a `Gradient` whose fields are sequences; "
        rf"got {got}\. Use `zero_grad` for other pytrees\.",
    ):
        jg.null_grad(model)


@pytest.mark.parametrize(
    "model",
    [object(), {"name": "dense"}, {"rng": jax.random.key(0)}],
    ids=["object", "str-leaf", "prng-key"],
)
def test_null_grad_sends_to_zero_grad_only_where_it_works(model):
    with pytest.raises(
        TypeError, match=r"or a `Gradient` whose fields are sequences; got a \w+\.$"
    ):
        jg.null_grad(model)
    with pytest.raises(TypeError):
        jg.zero_grad(model)
