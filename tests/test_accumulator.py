import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MIXED, flat, make_tree, trees
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxgrad as jg

# -- the accumulator state ---------------------------------------------------------------


def test_accumulator_starts_at_zero_in_float32():
    like = {
        "w": jnp.ones((2, 3), jnp.bfloat16),
        "b": jnp.ones(3, jnp.float16),
        "s": jnp.ones(()),
        "n": None,
    }
    state = jg.GradSum.zeros_like(like)
    assert isinstance(state, jg.GradSum)
    chex.assert_trees_all_equal(
        state.total, {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3), "s": jnp.zeros(()), "n": None}
    )
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    assert state.dtypes == (jnp.dtype(jnp.float16), jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def test_accumulator_from_shape_dtype_structs_and_in_a_wider_dtype():
    like = jax.eval_shape(lambda: {"w": jnp.ones(2, jnp.bfloat16), "e": jnp.ones((0, 4))})
    state = jg.GradSum.zeros_like(like)
    assert state.total["w"].dtype == jnp.float32 and state.total["e"].shape == (0, 4)
    with jax.enable_x64(True):
        wide = jg.GradSum.zeros_like({"w": jnp.ones(2, jnp.float32)}, dtype=jnp.float64)
        assert wide.total["w"].dtype == jnp.float64 and wide.dtypes == (jnp.dtype(jnp.float32),)
        assert (
            jg.GradSum.zeros_like({"w": jnp.ones(2, jnp.float64)}).total["w"].dtype == jnp.float64
        )


def test_accumulator_of_empty_tree():
    state = jg.GradSum.zeros_like({})
    state = jg.GradSum.add(state, {})
    assert int(state.count) == 1 and jg.GradSum.mean(state) == {}


def test_mean_of_nothing_is_zeros_not_nan():
    state = jg.GradSum.zeros_like(jg.Gradient([jnp.ones(2, jnp.bfloat16)], []))
    out = jg.GradSum.mean(state)
    assert isinstance(out, jg.Gradient)
    chex.assert_trees_all_equal(out, jg.Gradient([jnp.zeros(2, jnp.bfloat16)], []))


def test_add_and_mean_match_numpy_and_return_the_parameter_dtypes(dtype):
    like = make_tree("gradient", dtype)
    grads = [make_tree("gradient", dtype, seed=s) for s in range(1, 4)]
    state = jg.GradSum.zeros_like(like)
    for g in grads:
        state = jg.GradSum.add(state, g)
    assert int(state.count) == 3
    chex.assert_trees_all_equal_shapes_and_dtypes(
        state.total, jax.tree.map(lambda x: x.astype(jnp.float32), like)
    )
    mean = jg.GradSum.mean(state)
    chex.assert_trees_all_equal_shapes_and_dtypes(mean, like)
    expected = np.mean([flat(g) for g in grads], axis=0)
    np.testing.assert_allclose(
        flat(mean), expected, rtol=1e-2 if dtype != jnp.float32 else 1e-6, atol=1e-2
    )
    np.testing.assert_allclose(flat(state.total), 3 * expected, rtol=1e-6, atol=1e-6)


def test_bfloat16_gradients_are_summed_in_float32():
    # 1 + 256 * 2**-8 = 2; a bfloat16 running sum stays at 1 (2**-8 is below its spacing at 1).
    grads = jnp.concatenate([jnp.ones((1, 1)), jnp.full((256, 1), 2.0**-8)]).astype(jnp.bfloat16)

    def run(grads):
        state, _ = jax.lax.scan(
            lambda s, g: (jg.GradSum.add(s, [g]), None),
            jg.GradSum.zeros_like([grads[0]]),
            grads,
        )
        naive, _ = jax.lax.scan(lambda s, g: (s + g, None), jnp.zeros(1, jnp.bfloat16), grads)
        return jg.GradSum.mean(state), naive

    (mean,), naive = jax.jit(run)(grads)
    assert float(naive[0]) == 1.0  # what accumulating in bfloat16 would give
    assert mean.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(mean[0]), 2 / 257, rtol=4e-3)


# -- donation and loops ---------------------------------------------------------------


def test_donate_reuses_the_state_buffers():
    state = jg.GradSum.zeros_like({"w": jnp.zeros(3)})
    old = state.total["w"]
    new = jg.GradSum.add(state, {"w": jnp.ones(3)}, donate=True)
    assert old.is_deleted() and state.count.is_deleted()
    chex.assert_trees_all_equal(new.total, {"w": jnp.ones(3)})
    kept = jg.GradSum.add(new, {"w": jnp.ones(3)})  # donate=False leaves `new` alone
    assert not new.total["w"].is_deleted() and int(kept.count) == 2


def test_donate_refuses_a_grad_that_is_the_state():
    state = jg.GradSum.zeros_like({"w": jnp.zeros(3)})
    with pytest.raises(
        ValueError,
        match=r"`state` cannot be donated: its array at .total\['w'\] is also `grad` at \['w'\]",
    ):
        jg.GradSum.add(state, state.total, donate=True)
    jg.GradSum.add(state, {"w": jnp.ones(3)}, donate=True)
    with pytest.raises(ValueError, match="was already deleted"):
        jg.GradSum.add(state, {"w": jnp.ones(3)}, donate=True)


def test_state_is_a_scan_carry_in_a_donating_jitted_step():
    @jax.jit
    def accumulate(state, grads):
        return jax.lax.fori_loop(
            0,
            4,
            lambda i, s: jg.GradSum.add(s, jax.tree.map(lambda g: g[i], grads)),
            state,
        )

    step = jax.jit(accumulate, donate_argnums=0)
    grads = {"w": jnp.arange(8.0, dtype=jnp.float16).reshape(4, 2)}
    state = step(jg.GradSum.zeros_like({"w": jnp.zeros(2, jnp.float16)}), grads)
    state = step(state, grads)
    assert int(state.count) == 8
    chex.assert_trees_all_equal(jg.GradSum.mean(state), {"w": jnp.array([3.0, 4.0], jnp.float16)})


# -- micro-batches ---------------------------------------------------------------------


def _mlp_loss(params, batch):
    # Full-precision products, so that on a GPU (TF32 by default) the sums still agree.
    dot = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    h = jnp.tanh(dot(batch["x"], params["w1"]) + params["b1"])
    return jnp.mean((dot(h, params["w2"]) - batch["y"]) ** 2)


def _mlp(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(4, 8)),
        "b1": rng.normal(size=(8,)),
        "w2": rng.normal(size=(8, 1)),
    }
    data = {"x": rng.normal(size=(32, 4)), "y": rng.normal(size=(32, 1))}
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a.astype(np.float32)).astype(dtype), t)  # noqa: E731
    return cast(params), cast(data)


def test_microbatches_equal_the_full_batch_gradient(maybe_jit):
    params, data = _mlp()
    batches = jax.tree.map(lambda a: a.reshape(4, 8, *a.shape[1:]), data)
    out = maybe_jit(lambda p, b: jg.grad_microbatch_mean(jax.grad(_mlp_loss), p, b))(
        params, batches
    )
    full = jax.jit(jax.grad(_mlp_loss))(params, data)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
    chex.assert_trees_all_close(out, full, rtol=1e-5, atol=1e-6)


def test_microbatches_with_aux_and_bfloat16_params():
    params, data = _mlp(jnp.bfloat16)
    batches = jax.tree.map(lambda a: a.reshape(4, 8, *a.shape[1:]), data)

    def grad_fn(p, batch):
        return jax.grad(lambda p: (_mlp_loss(p, batch), batch["x"].shape[0]), has_aux=True)(p)

    out, sizes = jax.jit(lambda p, b: jg.grad_microbatch_mean(grad_fn, p, b, has_aux=True))(
        params, batches
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(out, params)
    np.testing.assert_array_equal(sizes, [8, 8, 8, 8])
    full = jax.jit(jax.grad(_mlp_loss))(
        jax.tree.map(lambda a: a.astype(jnp.float32), params),
        jax.tree.map(lambda a: a.astype(jnp.float32), data),
    )
    np.testing.assert_allclose(flat(out), flat(full), rtol=0.1, atol=0.05)


def test_microbatches_of_a_gradient_pytree_and_a_single_micro_batch():
    params = jg.Gradient([jnp.array([1.0, 2.0])], [jnp.array(3.0)])
    batches = jnp.ones((1, 2))
    grad_fn = jax.grad(lambda p, x: jnp.sum(p.layers[0] * x) * p.weights[0])
    out = jg.grad_microbatch_mean(grad_fn, params, batches)
    chex.assert_trees_all_close(out, jg.Gradient([jnp.array([3.0, 3.0])], [jnp.array(3.0)]))


def test_microbatch_errors():
    params = {"w": jnp.ones(2)}
    g = lambda p, b: p  # noqa: E731
    with pytest.raises(TypeError, match="`grad_fn` must be callable"):
        jg.grad_microbatch_mean("grad", params, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="`batches` must have at least one leaf"):
        jg.grad_microbatch_mean(g, params, {})
    with pytest.raises(ValueError, match=r"leading micro-batch axis; at \['s'\] it has a scalar"):
        jg.grad_microbatch_mean(g, params, {"x": jnp.ones((2, 1)), "s": jnp.ones(())})
    with pytest.raises(ValueError, match=r"\['x'\] has 2 micro-batches, \['y'\] has 3"):
        jg.grad_microbatch_mean(g, params, {"x": jnp.ones((2, 1)), "y": jnp.ones((3, 1))})
    with pytest.raises(ValueError, match="at least one micro-batch; its leading axis is 0"):
        jg.grad_microbatch_mean(g, params, jnp.ones((0, 4)))
    with pytest.raises(
        ValueError,
        match=r"`params` and `grad_fn\(params, batch\)` must have the same structure; they first "
        r"differ at the root: `params` has a dict with keys \['w'\], `grad_fn\(params, batch\)` "
        r"has a dict with keys \['v'\]\.",
    ):
        jg.grad_microbatch_mean(lambda p, b: {"v": p["w"]}, params, jnp.ones((2, 1)))
    with pytest.raises(
        ValueError,
        match=r"`params` and `grad_fn\(params, batch\)` must have leaves of the same shapes; at "
        r"\['w'\] `params` has f32\[2\], `grad_fn\(params, batch\)` has f32\[\]",
    ):
        jg.grad_microbatch_mean(lambda p, b: {"w": p["w"].sum()}, params, jnp.ones((2, 1)))


def test_microbatch_gradient_structure_errors_name_the_first_differing_key_path():
    params = {"enc": [{"w": jnp.ones(2), "b": jnp.ones(())}], "dec": jnp.ones(3)}

    def grad_fn(p, batch):
        return {"enc": [{"w": p["enc"][0]["w"], "scale": p["enc"][0]["b"]}], "dec": p["dec"]}

    with pytest.raises(
        ValueError,
        match=r"they first differ at \['enc'\]\[0\]: `params` has a dict with keys \['b', 'w'\], "
        r"`grad_fn\(params, batch\)` has a dict with keys \['scale', 'w'\]\.",
    ):
        jg.grad_microbatch_mean(grad_fn, params, jnp.ones((2, 1)))
    with pytest.raises(
        ValueError, match=r"`params` and `grad_fn\(params, batch\)\[0\]` must have the same"
    ):
        jg.grad_microbatch_mean(
            lambda p, b: (grad_fn(p, b), b), params, jnp.ones((2, 1)), has_aux=True
        )


@pytest.mark.parametrize(
    "out",
    [
        {"grad": {"w": 1.0}, "aux": 2.0},
        {"w": 1.0},
        1.0,
        ({"w": 1.0}, 2.0, 3.0),
        None,
    ],
    ids=["dict of two", "the gradient alone", "a scalar", "a triple", "None"],
)
def test_has_aux_needs_a_pair(out):
    params = {"w": jnp.ones(())}
    out = jax.tree.map(jnp.asarray, out)
    with pytest.raises(
        TypeError,
        match=r"`grad_fn` must return a pair `\(grad, aux\)` when `has_aux=True`, as "
        r"`jax.grad\(loss, has_aux=True\)` does; it returned ",
    ):
        jg.grad_microbatch_mean(lambda p, b: out, params, jnp.ones((2, 1)), has_aux=True)


def test_has_aux_pairs_and_what_they_return():
    params = {"w": jnp.ones(2)}
    with pytest.raises(TypeError, match=r"it returned a dict with keys \['aux', 'grad'\]\."):
        jg.grad_microbatch_mean(
            lambda p, b: {"grad": p, "aux": b}, params, jnp.ones((2, 1)), has_aux=True
        )
    # a list pair is a pair too
    out, aux = jg.grad_microbatch_mean(
        lambda p, b: [p, b.sum()], params, jnp.ones((2, 3)), has_aux=True
    )
    chex.assert_trees_all_equal(out, params)
    np.testing.assert_array_equal(aux, [3.0, 3.0])
    # a (grad, aux) pair without has_aux gets a hint, not a structure error about a tuple
    with pytest.raises(
        ValueError, match=r"a pair whose first entry has the structure of `params`; .*has_aux=True"
    ):
        jg.grad_microbatch_mean(lambda p, b: (p, b), params, jnp.ones((2, 1)))


def test_grad_fn_returning_none_is_a_clear_error():
    # paysage's in-place style: update something and return nothing
    with pytest.raises(
        TypeError,
        match=r"`grad_fn` must return the gradient, with the structure of `params`; "
        r"`grad_fn\(params, batch\)` is None\.",
    ):
        jg.grad_microbatch_mean(lambda p, b: None, {"w": jnp.ones(2)}, jnp.ones((2, 1)))
    with pytest.raises(TypeError, match=r"`grad_fn\(params, batch\)\[0\]` is None"):
        jg.grad_microbatch_mean(
            lambda p, b: (None, b), {"w": jnp.ones(2)}, jnp.ones((2, 1)), has_aux=True
        )


# -- errors ---------------------------------------------------------------------------


def test_accumulator_errors():
    state = jg.GradSum.zeros_like({"w": jnp.ones(2)})
    with pytest.raises(TypeError, match="`state` must be a `GradSum`"):
        jg.GradSum.add({"w": jnp.ones(2)}, {"w": jnp.ones(2)})
    with pytest.raises(TypeError, match="`state` must be a `GradSum`"):
        jg.GradSum.mean({"w": jnp.ones(2)})
    with pytest.raises(
        ValueError,
        match=r"they first differ at the root: `state.total` has a dict with keys \['w'\], `grad` has a dict with keys \['v'\]",
    ):
        jg.GradSum.add(state, {"v": jnp.ones(2)})
    with pytest.raises(
        ValueError, match=r"at \['w'\] `state.total` has f32\[2\], `grad` has f32\[3\]"
    ):
        jg.GradSum.add(state, {"w": jnp.ones(3)})
    with pytest.raises(
        TypeError,
        match=r"`grad` must have floating-point or complex leaves; at \['w'\] it has i32\[2\]",
    ):
        jg.GradSum.add(state, {"w": jnp.ones(2, jnp.int32)})
    with pytest.raises(
        ValueError, match="`dtype` must be a floating-point dtype to accumulate in; got int32"
    ):
        jg.GradSum.zeros_like({"w": jnp.ones(2)}, dtype=jnp.int32)
    with pytest.raises(
        TypeError,
        match=r"`like` must have floating-point or complex leaves; at \['n'\] it has i32\[2\]\.",
    ):
        jg.GradSum.zeros_like({"n": jnp.ones(2, jnp.int32)})


# Leaves that are not floating-point arrays, each with what the house error says of it.
BAD_LEAVES = {
    "PRNG key": (
        lambda: jax.random.key(0),
        r"must be a pytree of numeric arrays; at \['bad'\] it has the PRNG key key<fry>\[\], "
        r"which has no gradient\.",
    ),
    "raw uint32 key": (
        lambda: jax.random.PRNGKey(0),
        r"must have floating-point or complex leaves; at \['bad'\] it has u32\[2\]\.",
    ),
    "int counter": (
        lambda: jnp.zeros((), jnp.int32),
        r"must have floating-point or complex leaves; at \['bad'\] it has i32\[\]\.",
    ),
    "bool mask": (
        lambda: np.ones(3, bool),
        r"must have floating-point or complex leaves; at \['bad'\] it has bool\[3\]\.",
    ),
    "string": (
        lambda: "relu",
        r"must be a pytree of numeric arrays; at \['bad'\] it has a str: 'relu'\.",
    ),
    "object array": (
        lambda: np.array([object()]),
        r"must be a pytree of numeric arrays; at \['bad'\] it has an array of dtype object\[1\]\.",
    ),
    "function": (
        lambda: _returns_none,
        r"must be a pytree of numeric arrays; at \['bad'\] it has a function: <function _returns_none",
    ),
    "int ShapeDtypeStruct": (
        lambda: jax.ShapeDtypeStruct((2,), jnp.int32),
        r"must be a pytree of numeric arrays; at \['bad'\] it has a ShapeDtypeStruct",
    ),
}


def _returns_none(*args):
    return None


@pytest.mark.parametrize(("make", "message"), BAD_LEAVES.values(), ids=list(BAD_LEAVES))
def test_non_float_leaves_get_the_house_error_naming_the_key_path(make, message):
    good = {"w": jnp.ones(2)}
    with pytest.raises(TypeError, match="`like` " + message):
        jg.GradSum.zeros_like(good | {"bad": make()})
    state = jg.GradSum.zeros_like(good | {"bad": jnp.ones(2)})
    if "ShapeDtypeStruct" not in message:  # a shape alone is no gradient either way
        with pytest.raises(TypeError, match="`grad` " + message):
            jg.GradSum.add(state, good | {"bad": make()})
    with pytest.raises(TypeError, match="`params` " + message):
        jg.grad_microbatch_mean(jax.grad(_sum_loss), good | {"bad": make()}, jnp.ones((2, 1)))


def _sum_loss(params, batch):
    return jnp.sum(params["w"]) * jnp.sum(batch)


@pytest.mark.parametrize("bad", [jnp.int32, jnp.uint32, jnp.bool_])
def test_microbatch_gradients_with_non_float_leaves_name_the_key_path(bad):
    params = {"w": jnp.ones(2), "n": jnp.ones(3)}

    def grad_fn(p, batch):
        return {"w": p["w"] * batch.sum(), "n": p["n"].astype(bad)}

    name = jnp.dtype(bad).name.replace("int", "i").replace("ui", "u")
    with pytest.raises(
        TypeError,
        match=r"`grad_fn\(params, batch\)` must have floating-point or complex leaves; at "
        rf"\['n'\] it has {name}\[3\]\.",
    ):
        jg.grad_microbatch_mean(grad_fn, params, jnp.ones((2, 1)))


# -- laws on random trees ------------------------------------------------------------------


@settings(max_examples=16)
@given(
    trees(dtypes=MIXED, max_leaves=6),
    st.lists(st.floats(-4, 4, width=32), min_size=1, max_size=4),
    st.booleans(),
)
def test_mean_of_scaled_copies_on_random_trees(tree, coefficients, jit):
    # Scaled on the host (numpy), so that only the accumulator compiles.
    grads = [
        jax.tree.map(lambda x, c=c: jnp.asarray(np.asarray(x) * np.asarray(c, x.dtype)), tree)
        for c in coefficients
    ]
    maybe = jax.jit if jit else (lambda f: f)

    def run(tree, grads):
        state = jg.GradSum.zeros_like(tree)
        for g in grads:
            state = jg.GradSum.add(state, g)
        return state, jg.GradSum.mean(state)

    state, mean = maybe(run)(tree, grads)
    assert int(state.count) == len(coefficients)
    chex.assert_trees_all_equal_shapes_and_dtypes(mean, tree)
    expected_sum = np.sum([flat(g) for g in grads], axis=0)
    np.testing.assert_allclose(flat(state.total), expected_sum, rtol=1e-6, atol=1e-5)
    expected = expected_sum / len(coefficients)
    assert np.all(np.abs(flat(mean) - expected) <= np.abs(expected) * 2**-7 + 1e-6)


# -- Flax modules --------------------------------------------------------------------------


def test_a_module_stands_for_its_param_state(dtype):
    from flax import nnx

    model = nnx.Sequential(
        nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=dtype),
        nnx.Dropout(0.5, rngs=nnx.Rngs(1)),  # a uint32 RNG count and a PRNG key: no gradient
    )
    params = nnx.state(model, nnx.Param)
    state = jg.GradSum.zeros_like(model)
    assert jax.tree.structure(state.total) == jax.tree.structure(params)
    assert state.dtypes == (jnp.dtype(dtype),) * 2
    state = jg.GradSum.add(state, model)  # a module as the gradient: its Params
    state = jg.GradSum.add(state, params)
    mean = jg.GradSum.mean(state)
    assert type(mean) is type(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(mean, params)
    chex.assert_trees_all_equal(mean, params)


# -- one check of what grad_fn returns, shared by the mean and the noise estimate -----------


def _noise_mean(grad_fn, params, batches, **kwargs):
    return jg.grad_microbatch_noise(grad_fn, params, batches, **kwargs)[0]


ESTIMATORS = {"grad_microbatch_mean": jg.grad_microbatch_mean, "grad_microbatch_noise": _noise_mean}


def _square_loss(params, batch):
    return jnp.mean((batch @ params["w"]) ** 2)


@pytest.mark.parametrize("fn", list(ESTIMATORS), ids=list(ESTIMATORS))
def test_has_aux_with_a_bare_gradient_says_a_pair_is_needed(fn):
    params = {"w": jnp.ones(2)}
    with pytest.raises(  # the noise estimate said "has a leaf str"
        TypeError, match=r"`grad_fn` must return a pair `\(grad, aux\)` when `has_aux=True`"
    ):
        ESTIMATORS[fn](jax.grad(_square_loss), params, jnp.ones((2, 3, 2)), has_aux=True)


@pytest.mark.parametrize("fn", list(ESTIMATORS), ids=list(ESTIMATORS))
def test_a_grad_aux_pair_without_has_aux_gets_the_hint(fn):
    params = {"w": jnp.ones(2)}
    grad_fn = jax.grad(lambda p, b: (_square_loss(p, b), b.sum()), has_aux=True)
    with pytest.raises(  # the noise estimate gave no hint
        ValueError, match=r"a pair whose first entry has the structure of `params`; .*has_aux=True"
    ):
        ESTIMATORS[fn](grad_fn, params, jnp.ones((2, 3, 2)))


@pytest.mark.parametrize("has_aux", [False, True])
@pytest.mark.parametrize("fn", list(ESTIMATORS), ids=list(ESTIMATORS))
def test_a_value_and_grad_function_is_named(fn, has_aux):
    params = {"w": jnp.ones(2)}
    grad_fn = jax.value_and_grad(_square_loss)
    with pytest.raises(  # was "the structures differ at the root"
        ValueError,
        match=r"`grad_fn` returned a pair whose second entry has the structure of `params`, as "
        r"`jax.value_and_grad` and `nnx.value_and_grad` return `\(value, grad\)`; `grad_fn` "
        r"must return the gradient",
    ):
        ESTIMATORS[fn](grad_fn, params, jnp.ones((2, 3, 2)), has_aux=has_aux)


def test_nnx_value_and_grad_is_named_for_a_module():
    from flax import nnx

    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    grad_fn = nnx.value_and_grad(lambda m, x: jnp.mean(m(x) ** 2))
    with pytest.raises(ValueError, match=r"`grad_fn` must return the gradient \(`jax.grad`"):
        jg.grad_microbatch_mean(grad_fn, model, jnp.ones((2, 3, 2)))


@pytest.mark.parametrize("fn", list(ESTIMATORS), ids=list(ESTIMATORS))
def test_a_batch_without_the_micro_batch_axis_gets_a_note(fn):
    params = {"w": jnp.ones((4, 2))}

    def loss(p, batch):  # a model that needs (examples, 4) inputs
        return jnp.mean(jnp.einsum("ni,ij->nj", batch, p["w"]) ** 2)

    one_batch = jnp.ones((6, 4))  # 6 examples, no micro-batch axis: each "micro-batch" is (4,)
    extra = {"microbatch_size": 6} if fn == "grad_microbatch_noise" else {}
    with pytest.raises(ValueError) as info:  # what einsum raises on a 1-D operand
        ESTIMATORS[fn](jax.grad(loss), params, one_batch, **extra)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "jaxgrad: this error came from `grad_fn` called on one micro-batch" in notes
    assert "f32[4]" in notes and "x.reshape(4, -1, *x.shape[1:])" in notes
