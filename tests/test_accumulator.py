import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from toolkit_trees import flat, trees

import jaxgrad as jg
from conftest import make_tree

# -- the accumulator state ---------------------------------------------------------------


def test_accumulator_starts_at_zero_in_float32():
    like = {
        "w": jnp.ones((2, 3), jnp.bfloat16),
        "b": jnp.ones(3, jnp.float16),
        "s": jnp.ones(()),
        "n": None,
    }
    state = jg.grad_accumulator(like)
    assert isinstance(state, jg.GradAccumulator)
    chex.assert_trees_all_equal(
        state.total, {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3), "s": jnp.zeros(()), "n": None}
    )
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    assert state.dtypes == (jnp.dtype(jnp.float16), jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def test_accumulator_from_shape_dtype_structs_and_in_a_wider_dtype():
    like = jax.eval_shape(lambda: {"w": jnp.ones(2, jnp.bfloat16), "e": jnp.ones((0, 4))})
    state = jg.grad_accumulator(like)
    assert state.total["w"].dtype == jnp.float32 and state.total["e"].shape == (0, 4)
    with jax.enable_x64(True):
        wide = jg.grad_accumulator({"w": jnp.ones(2, jnp.float32)}, dtype=jnp.float64)
        assert wide.total["w"].dtype == jnp.float64 and wide.dtypes == (jnp.dtype(jnp.float32),)
        assert jg.grad_accumulator({"w": jnp.ones(2, jnp.float64)}).total["w"].dtype == jnp.float64


def test_accumulator_of_empty_tree():
    state = jg.grad_accumulator({})
    state = jg.grad_accumulator_add(state, {})
    assert int(state.count) == 1 and jg.grad_accumulator_mean(state) == {}


def test_mean_of_nothing_is_zeros_not_nan():
    state = jg.grad_accumulator(jg.Gradient([jnp.ones(2, jnp.bfloat16)], []))
    out = jg.grad_accumulator_mean(state)
    assert isinstance(out, jg.Gradient)
    chex.assert_trees_all_equal(out, jg.Gradient([jnp.zeros(2, jnp.bfloat16)], []))


def test_add_and_mean_match_numpy_and_return_the_parameter_dtypes(dtype):
    like = make_tree("gradient", dtype)
    grads = [make_tree("gradient", dtype, seed=s) for s in range(1, 4)]
    state = jg.grad_accumulator(like)
    for g in grads:
        state = jg.grad_accumulator_add(state, g)
    assert int(state.count) == 3
    chex.assert_trees_all_equal_shapes_and_dtypes(
        state.total, jax.tree.map(lambda x: x.astype(jnp.float32), like)
    )
    mean = jg.grad_accumulator_mean(state)
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
            lambda s, g: (jg.grad_accumulator_add(s, [g]), None),
            jg.grad_accumulator([grads[0]]),
            grads,
        )
        naive, _ = jax.lax.scan(lambda s, g: (s + g, None), jnp.zeros(1, jnp.bfloat16), grads)
        return jg.grad_accumulator_mean(state), naive

    (mean,), naive = jax.jit(run)(grads)
    assert float(naive[0]) == 1.0  # what accumulating in bfloat16 would give
    assert mean.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(mean[0]), 2 / 257, rtol=4e-3)


# -- donation and loops ---------------------------------------------------------------


def test_donate_reuses_the_state_buffers():
    state = jg.grad_accumulator({"w": jnp.zeros(3)})
    old = state.total["w"]
    new = jg.grad_accumulator_add(state, {"w": jnp.ones(3)}, donate=True)
    assert old.is_deleted() and state.count.is_deleted()
    chex.assert_trees_all_equal(new.total, {"w": jnp.ones(3)})
    kept = jg.grad_accumulator_add(new, {"w": jnp.ones(3)})  # donate=False leaves `new` alone
    assert not new.total["w"].is_deleted() and int(kept.count) == 2


def test_donate_refuses_a_grad_that_is_the_state():
    state = jg.grad_accumulator({"w": jnp.zeros(3)})
    with pytest.raises(
        ValueError,
        match=r"`state` cannot be donated: its array at .total\['w'\] is also `grad` at \['w'\]",
    ):
        jg.grad_accumulator_add(state, state.total, donate=True)
    jg.grad_accumulator_add(state, {"w": jnp.ones(3)}, donate=True)
    with pytest.raises(ValueError, match="was already deleted"):
        jg.grad_accumulator_add(state, {"w": jnp.ones(3)}, donate=True)


def test_state_is_a_scan_carry_in_a_donating_jitted_step():
    @jax.jit
    def accumulate(state, grads):
        return jax.lax.fori_loop(
            0,
            4,
            lambda i, s: jg.grad_accumulator_add(s, jax.tree.map(lambda g: g[i], grads)),
            state,
        )

    step = jax.jit(accumulate, donate_argnums=0)
    grads = {"w": jnp.arange(8.0, dtype=jnp.float16).reshape(4, 2)}
    state = step(jg.grad_accumulator({"w": jnp.zeros(2, jnp.float16)}), grads)
    state = step(state, grads)
    assert int(state.count) == 8
    chex.assert_trees_all_equal(
        jg.grad_accumulator_mean(state), {"w": jnp.array([3.0, 4.0], jnp.float16)}
    )


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
    out = maybe_jit(lambda p, b: jg.grad_accumulate_microbatches(jax.grad(_mlp_loss), p, b))(
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

    out, sizes = jax.jit(lambda p, b: jg.grad_accumulate_microbatches(grad_fn, p, b, has_aux=True))(
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
    out = jg.grad_accumulate_microbatches(grad_fn, params, batches)
    chex.assert_trees_all_close(out, jg.Gradient([jnp.array([3.0, 3.0])], [jnp.array(3.0)]))


def test_microbatch_errors():
    params = {"w": jnp.ones(2)}
    g = lambda p, b: p  # noqa: E731
    with pytest.raises(TypeError, match="`grad_fn` must be callable"):
        jg.grad_accumulate_microbatches("grad", params, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="`batches` must have at least one leaf"):
        jg.grad_accumulate_microbatches(g, params, {})
    with pytest.raises(ValueError, match=r"leading micro-batch axis; at \['s'\] it has a scalar"):
        jg.grad_accumulate_microbatches(g, params, {"x": jnp.ones((2, 1)), "s": jnp.ones(())})
    with pytest.raises(ValueError, match=r"\['x'\] has 2 micro-batches, \['y'\] has 3"):
        jg.grad_accumulate_microbatches(g, params, {"x": jnp.ones((2, 1)), "y": jnp.ones((3, 1))})
    with pytest.raises(ValueError, match="at least one micro-batch; its leading axis is 0"):
        jg.grad_accumulate_microbatches(g, params, jnp.ones((0, 4)))
    with pytest.raises(ValueError, match=r"`state.total` and `grad` must have the same structure"):
        jg.grad_accumulate_microbatches(lambda p, b: {"v": p["w"]}, params, jnp.ones((2, 1)))


# -- errors ---------------------------------------------------------------------------


def test_accumulator_errors():
    state = jg.grad_accumulator({"w": jnp.ones(2)})
    with pytest.raises(TypeError, match="`state` must be a `GradAccumulator`"):
        jg.grad_accumulator_add({"w": jnp.ones(2)}, {"w": jnp.ones(2)})
    with pytest.raises(TypeError, match="`state` must be a `GradAccumulator`"):
        jg.grad_accumulator_mean({"w": jnp.ones(2)})
    with pytest.raises(
        ValueError,
        match=r"they first differ at the root: `state.total` has a dict with keys \['w'\], `grad` has a dict with keys \['v'\]",
    ):
        jg.grad_accumulator_add(state, {"v": jnp.ones(2)})
    with pytest.raises(
        ValueError, match=r"at \['w'\] `state.total` has f32\[2\], `grad` has f32\[3\]"
    ):
        jg.grad_accumulator_add(state, {"w": jnp.ones(3)})
    with pytest.raises(
        TypeError,
        match=r"`grad` must have floating-point or complex leaves; at \['w'\] it has i32\[2\]",
    ):
        jg.grad_accumulator_add(state, {"w": jnp.ones(2, jnp.int32)})
    with pytest.raises(
        ValueError, match="`dtype` must be a floating-point dtype to accumulate in; got int32"
    ):
        jg.grad_accumulator({"w": jnp.ones(2)}, dtype=jnp.int32)
    with pytest.raises(
        TypeError,
        match=r"`like` must have floating-point or complex leaves; at \['n'\] it has dtype int32",
    ):
        jg.grad_accumulator({"n": jnp.ones(2, jnp.int32)})


# -- laws on random trees ------------------------------------------------------------------


@settings(max_examples=16)
@given(trees(), st.lists(st.floats(-4, 4, width=32), min_size=1, max_size=4), st.booleans())
def test_mean_of_scaled_copies_on_random_trees(tree, coefficients, jit):
    # Scaled on the host (numpy), so that only the accumulator compiles.
    grads = [
        jax.tree.map(lambda x, c=c: jnp.asarray(np.asarray(x) * np.asarray(c, x.dtype)), tree)
        for c in coefficients
    ]
    maybe = jax.jit if jit else (lambda f: f)

    def run(tree, grads):
        state = jg.grad_accumulator(tree)
        for g in grads:
            state = jg.grad_accumulator_add(state, g)
        return state, jg.grad_accumulator_mean(state)

    state, mean = maybe(run)(tree, grads)
    assert int(state.count) == len(coefficients)
    chex.assert_trees_all_equal_shapes_and_dtypes(mean, tree)
    expected_sum = np.sum([flat(g) for g in grads], axis=0)
    np.testing.assert_allclose(flat(state.total), expected_sum, rtol=1e-6, atol=1e-5)
    expected = expected_sum / len(coefficients)
    assert np.all(np.abs(flat(mean) - expected) <= np.abs(expected) * 2**-7 + 1e-6)
