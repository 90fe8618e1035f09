"""The reliability sweep: no silent wrong answer at any size or dtype, a house error per bad leaf.

Each case was observed failing on the main of 2026-11-28; the numbers in the comments are
what it gave then.
"""

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad as jg

BIG = 2**25


# -- accurate reductions at size ----------------------------------------------------------


def test_stats_norm_and_magnitude_agree_with_float64_numpy_on_one_big_leaf():
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1e-3, BIG).astype(np.float32)
    reference = np.sqrt(np.sum(x.astype(np.float64) ** 2))
    leaf = jnp.asarray(x)
    stats = jg.grad_stats({"embed": leaf})  # was 20% low: a sequential float32 sum
    np.testing.assert_allclose(jg.grad_norm(leaf), reference, rtol=1e-5)
    np.testing.assert_allclose(stats.norm, [reference, reference], rtol=1e-5)
    np.testing.assert_allclose(jg.grad_rms(leaf), reference / np.sqrt(BIG), rtol=1e-5)
    np.testing.assert_allclose(stats.rms, reference / np.sqrt(BIG), rtol=1e-5)


def test_stats_of_ones_big_leaf_are_exact():
    stats = jg.grad_stats(jnp.ones(BIG))  # was norm 4096 (true 5792.6), rms 0.707
    np.testing.assert_allclose(stats.norm[0], np.sqrt(BIG), rtol=1e-6)
    np.testing.assert_allclose(stats.rms[0], 1.0, rtol=1e-6)


def test_entry_counts_beyond_int32_are_exact():
    n = 2**31 + 8  # was OverflowError (magnitude) and a NaN RMS (stats)
    spec = {"w": jax.ShapeDtypeStruct((n,), jnp.float32)}
    assert jax.eval_shape(jg.grad_rms, spec).dtype == jnp.float32
    assert jax.eval_shape(jg.grad_stats, spec).nonfinite.dtype != jnp.int32

    @jax.jit
    def broadcast():  # a 2**31-entry leaf that XLA never materializes
        leaf = jnp.broadcast_to(jnp.float32(2.0), (n,))
        return jg.grad_rms(leaf), jg.grad_stats({"w": leaf}).rms

    magnitude, rms = broadcast()
    np.testing.assert_allclose(magnitude, 2.0, rtol=1e-6)
    np.testing.assert_allclose(rms, [2.0, 2.0], rtol=1e-6)


def test_nonfinite_counts_beyond_int32_never_wrap():
    n = 2**31 + 8

    @jax.jit
    def broadcast():
        leaf = jnp.broadcast_to(jnp.float32(jnp.nan), (n,))
        return jg.grad_nonfinite_report({"w": leaf}).total

    total = broadcast()  # was negative (int32 wrapped)
    assert float(total) > 2**31 - 1 and float(total) == pytest.approx(n, rel=1e-6)


# -- squares beyond float32 ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_finite_inputs_whose_squares_overflow_get_finite_correct_results(dtype):
    g = {"w": jnp.full(4, 1e20, dtype), "b": jnp.array([3e19, -1.0], dtype)}
    x = np.concatenate([np.asarray(v.astype(jnp.float32), np.float64) for v in jax.tree.leaves(g)])
    norm = np.linalg.norm(x)  # was inf
    np.testing.assert_allclose(jg.grad_norm(g), norm, rtol=1e-6)
    np.testing.assert_allclose(jg.grad_rms(g), norm / np.sqrt(x.size), rtol=1e-6)
    normalized = jg.grad_normalize(g)  # was zeros
    np.testing.assert_allclose(jg.grad_norm(normalized), 1.0, rtol=1e-2)
    clipped, stats = jg.grad_clip(g, 1.0, by="leaf")
    assert bool(stats.finite) and bool(stats.clipped)
    np.testing.assert_allclose(stats.norm, norm, rtol=1e-6)
    np.testing.assert_allclose(jg.grad_norm(clipped), 1.0, rtol=1e-2)
    np.testing.assert_allclose(stats.groups.norm[0], norm, rtol=1e-6)
    np.testing.assert_allclose(stats.groups.norm[2], np.linalg.norm(x[2:]), rtol=1e-6)
    assert bool(jg.grad_all_finite(g))
    assert int(stats.groups.nonfinite[0]) == 0


def test_the_overflow_branch_keeps_nan_and_inf():
    for bad, check in ((jnp.nan, np.isnan), (jnp.inf, np.isinf)):
        g = {"w": jnp.array([1e20, bad]), "b": jnp.ones(2)}
        stats = jg.grad_stats(g)
        assert check(float(jg.grad_norm(g))) and check(float(stats.norm[0]))
        assert float(stats.norm[1]) == pytest.approx(np.sqrt(2))
        assert int(stats.nonfinite[0]) == 1


# -- integers, bools, casts ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32])
def test_max_abs_of_the_integer_minimum(dtype):
    low = jnp.iinfo(dtype).min  # was 1: abs overflowed
    stats = jg.grad_stats({"n": jnp.array([low, 1], dtype)})
    assert float(stats.max_abs[0]) == -float(low)


def test_accumulate_of_a_bool_function_counts():
    tree = {"a": jnp.ones(2), "b": jnp.zeros(3), "c": jnp.ones(1)}
    total = jg.grad_accumulate(lambda x: jnp.all(x > 0), tree)  # was True
    assert int(total) == 2 and jnp.issubdtype(total.dtype, jnp.integer)


def test_where_finite_refuses_a_complex_fallback_for_real_leaves():
    with pytest.raises(
        TypeError, match=r"`fallback` must be real where `grad` is real; at \['w'\]"
    ):
        jg.grad_where_finite({"w": jnp.ones(2)}, 1j)
    assert jg.grad_where_finite({"z": jnp.ones(2, jnp.complex64)}, 1j)["z"].dtype == jnp.complex64


# -- a house error for every bad leaf ------------------------------------------------------

BAD_LEAVES = {
    "string": ("abc", r"a str: 'abc'"),
    "object array": (np.array([object()]), r"an array of dtype object\[1\]"),
    "shape only": (jax.ShapeDtypeStruct((2,), jnp.float32), r"a ShapeDtypeStruct"),
    "prng key": (jax.random.key(0), r"the PRNG key key<fry>\[\], which has no gradient"),
    "none function": (print, r"a builtin_function_or_method"),
}

GRAD_FUNCTIONS = {
    "grad_norm": jg.grad_norm,
    "grad_rms": jg.grad_rms,
    "grad_normalize": jg.grad_normalize,
    "grad_clip": lambda g: jg.grad_clip(g, 1.0),
    "grad_clip_by_rms": lambda g: jg.grad_clip_by_rms(g, 1.0),
    "grad_stats": jg.grad_stats,
    "grad_all_finite": jg.grad_all_finite,
    "grad_nonfinite_report": jg.grad_nonfinite_report,
    "grad_where_finite": lambda g: jg.grad_where_finite(g, 0.0),
    "grad_flatten": jg.grad_flatten,
}


@pytest.mark.parametrize("leaf", list(BAD_LEAVES), ids=list(BAD_LEAVES))
@pytest.mark.parametrize("fn", list(GRAD_FUNCTIONS), ids=list(GRAD_FUNCTIONS))
def test_every_whole_gradient_function_names_the_bad_leaf(fn, leaf):
    value, shown = BAD_LEAVES[leaf]
    with pytest.raises(TypeError, match=rf"`grad` must be .* at \['bad'\] it has {shown}"):
        GRAD_FUNCTIONS[fn]({"ok": jnp.ones(2), "bad": value})


@pytest.mark.parametrize(
    "fn",
    [jg.grad_clip, jg.grad_clip_by_rms, jg.grad_normalize],
    ids=["clip", "clip_by_magnitude", "normalize"],
)
def test_rewriting_functions_refuse_integer_leaves_by_key_path(fn):
    args = (1.0,) if fn is not jg.grad_normalize else ()
    with pytest.raises(
        TypeError, match=r"`grad` must have floating-point or complex leaves; at \['n'\] it has i32"
    ):
        fn({"w": jnp.ones(2), "n": jnp.ones(2, jnp.int32)}, *args)


@pytest.mark.parametrize(
    "call",
    [
        lambda: jg.grad_norm({"w": jnp.ones(2)}, axis_name=["x"]),
        lambda: jg.grad_stats({"w": jnp.ones(2)}, axis_name=["x"]),
        lambda: jg.grad_clip({"w": jnp.ones(2)}, 1.0, axis_name=["x"]),
        lambda: jg.grad_pmean({"w": jnp.ones(2)}, ["x"]),
    ],
    ids=["norm", "stats", "clip", "pmean"],
)
def test_an_axis_name_list_gets_a_clear_error(call):
    with pytest.raises(TypeError, match=r"`axis_name` must be a mesh axis name \(a str\)"):
        call()


@pytest.mark.parametrize(
    "bound",
    [jnp.array(1.0, jnp.bfloat16), fractions.Fraction(1, 1), np.float16(1.0), jnp.int32(1)],
    ids=["bf16-array", "fraction", "np-f16", "int32-array"],
)
def test_any_real_scalar_is_a_bound(bound):
    clipped, stats = jg.grad_clip({"w": jnp.array([3.0, 4.0])}, bound)
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8], rtol=1e-6)
    assert float(stats.scale) == pytest.approx(0.2)


def test_ord_is_checked():
    with pytest.raises(ValueError, match=r"`ord` must be 1, 2, inf or None \(meaning 2\); got 3"):
        jg.grad_norm({"w": jnp.ones(2)}, ord=3)


# -- transformations -----------------------------------------------------------------------


def test_jax_grad_through_stats_at_a_zero_gradient():
    def loss(params):
        stats = jg.grad_stats(params)
        return jnp.sum(stats.norm) + jnp.sum(stats.rms) + jnp.sum(stats.max_abs)

    g = jax.grad(loss)({"w": jnp.zeros(3), "b": jnp.zeros(2)})  # was ad_util.Zero in reshape
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))

    def with_aux(params):
        return jnp.sum(params["w"] ** 2), jg.grad_stats(params)

    grads, stats = jax.grad(with_aux, has_aux=True)({"w": jnp.zeros(3)})
    assert isinstance(stats, jg.GroupStats) and float(stats.norm[0]) == 0.0


def test_modules_are_taken_by_their_param_state():
    from flax import nnx

    model = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1))
    )  # the Dropout's RNG state (a key and a uint32 count) is not a gradient
    params = nnx.state(model, nnx.Param)
    np.testing.assert_allclose(jg.grad_norm(model), jg.grad_norm(params))
    assert jg.grad_stats(model).names == jg.grad_stats(params).names
    assert jg.grad_stats(model).names[1:] == ("layers/0/bias", "layers/0/kernel")
    clipped, _ = jg.grad_clip(model, 1.0)
    assert isinstance(clipped, nnx.State)
    assert bool(jg.grad_all_finite(model))
    np.testing.assert_array_equal(jg.grad_flatten(model), jg.grad_flatten(params))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_one_huge_entry_is_not_folded_into_nan(jit):
    """XLA rewrites (x*c)*(x*c) as (x*x)*(c*c): inf * 0 for one entry of 1e20 (seen here)."""
    fn = jax.jit(jg.grad_norm) if jit else jg.grad_norm
    for leaf in (jnp.array([-1e20]), jnp.array(3e25), jnp.array([1e20, 1.0])):
        np.testing.assert_allclose(
            fn(leaf), np.linalg.norm(np.asarray(leaf, np.float64)), rtol=1e-6
        )


@pytest.mark.parametrize("ord", [1, 2, np.inf, None])
@pytest.mark.parametrize("squared", [False, True])
def test_grad_norm_ord_and_squared_match_optax(ord, squared):
    import optax.tree_utils as otu

    tree = {"a": jnp.array([3.0, -4.0]), "b": [jnp.array([[1.0, -12.0]]), jnp.array(0.5)]}
    expected = otu.tree_norm(tree, ord=ord, squared=squared)
    np.testing.assert_allclose(jg.grad_norm(tree, ord=ord, squared=squared), expected, rtol=1e-6)
    jitted = jax.jit(lambda t: jg.grad_norm(t, ord=ord, squared=squared))
    np.testing.assert_allclose(jitted(tree), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda bad: jg.grad_accumulate(jnp.sum, {"ok": jnp.ones(2), "bad": bad}),
        lambda bad: jg.grad_unflatten(jnp.zeros(2), {"ok": jnp.ones(2), "bad": bad}),
    ],
    ids=["grad_accumulate", "grad_unflatten"],
)
def test_accumulate_and_unflatten_name_a_bad_leaf(call):
    with pytest.raises(
        TypeError, match=r"must be a pytree of numeric arrays.* at \['bad'\] it has a str: 'abc'"
    ):
        call("abc")
    with pytest.raises(TypeError, match=r"at \['bad'\] it has "):
        call(jax.random.key(0))


# -- issue 18: arguments that round, complex casts, counters, the last raw errors -----------
# Each test below failed on the main of 2026-12-04 (what it gave is in the comment).

PARAM_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, "float64"]
PARAM_IDS = ["f32", "bf16", "f16", "f64-x64"]


def _x64_if(dtype):
    """`jax.enable_x64` for the float64 case, else a context that does nothing."""
    return jax.enable_x64(dtype == "float64")


def _dtype(dtype):
    return jnp.float64 if dtype == "float64" else dtype


def _debiased_ema(values, decay):
    """The debiased EMA in float64 (numpy), the reference of `noise_scale_update`."""
    mean, weight_sum = 0.0, 0.0
    for v in values:
        mean, weight_sum = decay * mean + (1 - decay) * v, decay * weight_sum + (1 - decay)
    return mean / weight_sum


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=PARAM_IDS)
@pytest.mark.parametrize("traced", [False, True], ids=["python-decay", "traced-decay"])
def test_a_decay_that_rounds_to_one_gives_the_running_mean(dtype, traced):
    with _x64_if(dtype):
        state = jg.noise_scale_init({"w": jnp.zeros(3, _dtype(dtype))})
        decay = 1 - 1e-8  # 1.0 in float32 (from 1 - 2**-25 up): the state was NaN for good
        update = jax.jit(lambda s, n, d: jg.noise_scale_update(s, n, decay=d))
        grad_sqs, traces = [4.0, 2.0, 3.0], [40.0, 10.0, 16.0]
        for g, t in zip(grad_sqs, traces, strict=True):
            noise = jg.NoiseScale(jnp.array([g]), jnp.array([t]), ("",))
            if traced:
                state = update(state, noise, jnp.asarray(decay, state.grad_sq.dtype))
            else:
                state = jg.noise_scale_update(state, noise, decay=decay)
        rtol = 1e-6 if state.grad_sq.dtype == jnp.float32 else 1e-12
        if traced and state.grad_sq.dtype == jnp.float32:
            decay = 1.0  # what the traced float32 decay is: the limit, the plain mean
            want_g, want_t = np.mean(grad_sqs), np.mean(traces)
        else:
            want_g, want_t = _debiased_ema(grad_sqs, decay), _debiased_ema(traces, decay)
        np.testing.assert_allclose(state.grad_sq, [want_g], rtol=rtol)
        np.testing.assert_allclose(state.trace_cov, [want_t], rtol=rtol)
        np.testing.assert_allclose(state.b_simple, [want_t / want_g], rtol=rtol)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.99, 1 - 1e-7])
def test_noise_scale_update_matches_the_float64_debiased_ema(decay):
    state = jg.noise_scale_init({"w": jnp.zeros(2)})
    values = [3.0, -1.0, 5.0, 2.0]
    for v in values:
        state = jg.noise_scale_update(
            state, jg.NoiseScale(jnp.array([v]), jnp.array([1.0]), ("",)), decay=decay
        )
    np.testing.assert_allclose(state.grad_sq, [_debiased_ema(values, decay)], rtol=2e-6)


def _noise_batches(dtype):
    x = jnp.array([[1.0, -1.0], [2.0, 0.0], [0.5, 3.0]], _dtype(dtype))
    return {"x": x, "y": jnp.zeros_like(x)}


def _half_square(w, batch):
    return jnp.mean((batch["x"] * w - batch["y"]) ** 2) / 2


@pytest.mark.parametrize("dtype", PARAM_DTYPES[:3], ids=PARAM_IDS[:3])
def test_a_batch_size_beyond_the_estimates_dtype_is_refused(dtype):
    w = jnp.array(1.0, dtype)
    with pytest.raises(
        ValueError, match=r"`microbatch_size` must be a number of examples that float32 holds"
    ):  # was an infinite estimate
        jg.grad_microbatch_noise(
            jax.grad(_half_square), w, _noise_batches(dtype), microbatch_size=1e39
        )
    with pytest.raises(ValueError, match=r"`batch_per_replica` must be a number of examples"):
        jax.vmap(lambda g: jg.grad_pmean_noise(g, "i", batch_per_replica=1e39), axis_name="i")(
            {"w": jnp.ones((2, 3), dtype)}
        )


def test_a_huge_batch_size_is_exact_where_the_dtype_holds_it():
    with jax.enable_x64(True):
        w = jnp.array(1.0, jnp.float64)
        batches = _noise_batches("float64")
        _, one = jg.grad_microbatch_noise(jax.grad(_half_square), w, batches, microbatch_size=1)
        _, huge = jg.grad_microbatch_noise(jax.grad(_half_square), w, batches, microbatch_size=1e39)
        assert np.all(np.isfinite(huge.trace_cov))
        np.testing.assert_allclose(huge.trace_cov, one.trace_cov * 1e39, rtol=1e-12)
        np.testing.assert_allclose(huge.grad_sq, one.grad_sq, rtol=1e-12)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_grad_sum_refuses_to_drop_imaginary_parts(jit):
    total = jg.GradSum.zeros_like({"a": jnp.zeros(2)})
    add = jax.jit(lambda s, g: s.add(g)) if jit else (lambda s, g: s.add(g))
    with pytest.raises(  # was total [0, 2]: the imaginary parts dropped
        TypeError,
        match=r"`grad` has c64\[2\] at \['a'\], but the leaf of `state.total` at \['a'\] is "
        r"f32\[2\]; the cast would lose its imaginary part\. Cast `grad` first",
    ):
        add(total, {"a": jnp.array([1j, 2 + 1j], jnp.complex64)})
    complex_sum = jg.GradSum.zeros_like({"a": jnp.zeros(2, jnp.complex64)})
    out = add(complex_sum, {"a": jnp.array([1j, 2 + 1j], jnp.complex64)}).total["a"]
    np.testing.assert_array_equal(out, [1j, 2 + 1j])


def test_grad_unflatten_refuses_the_same_cast_with_the_same_words():
    with pytest.raises(
        TypeError, match=r"`vector` has dtype c64, but the leaf of `like` at \['a'\] is f32\[2\]; "
    ):
        jg.grad_unflatten(jnp.array([1j, 2 + 1j], jnp.complex64), {"a": jnp.zeros(2)})


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=PARAM_IDS)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_grad_sum_count_saturates_instead_of_wrapping(dtype, jit):
    with _x64_if(dtype):
        start = jg.GradSum.zeros_like({"w": jnp.zeros(2, _dtype(dtype))})
        total = jax.tree.map(lambda t: t + (2**31 - 3), start.total)  # as many ones added
        near = jg.GradSum(total=total, count=jnp.asarray(2**31 - 3, jnp.int32), dtypes=start.dtypes)
        add = jax.jit(lambda s, g: s.add(g)) if jit else (lambda s, g: s.add(g))
        mean = jax.jit(lambda s: s.mean()) if jit else (lambda s: s.mean())
        g = {"w": jnp.ones(2, _dtype(dtype))}
        last_known = add(near, g)  # 2**31 - 2 gradients: the most a GradSum counts exactly
        assert int(last_known.count) == 2**31 - 2
        np.testing.assert_allclose(np.asarray(mean(last_known)["w"], np.float64), 1.0, rtol=1e-2)
        full = add(last_known, g)
        beyond = add(full, g)  # was count -2**31 and a mean of total / 1
        assert int(full.count) == int(beyond.count) == 2**31 - 1
        for state in (full, beyond):  # the count is no longer known: NaN, not a wrong mean
            assert mean(state)["w"].dtype == _dtype(dtype)
            assert np.all(np.isnan(np.asarray(mean(state)["w"], np.float64)))


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=PARAM_IDS)
def test_noise_scale_count_saturates_and_the_average_keeps_its_weight(dtype):
    with _x64_if(dtype):
        state = jg.noise_scale_init({"w": jnp.zeros(2, _dtype(dtype))})
        acc = state.grad_sq.dtype
        state = jg.NoiseScaleState(
            grad_sq=jnp.array([2.0], acc),
            trace_cov=jnp.array([8.0], acc),
            b_simple=jnp.array([4.0], acc),
            count=jnp.asarray(2**31 - 1, jnp.int32),
            names=("",),
        )
        noise = jg.NoiseScale(jnp.array([4.0], acc), jnp.array([8.0], acc), ("",))
        new = jg.noise_scale_update(state, noise, decay=0.5)
        assert int(new.count) == 2**31 - 1  # was -2**31, and the average reset to 4.0
        np.testing.assert_allclose(new.grad_sq, [3.0], rtol=1e-6)


# -- issue 18 item 9: a house error where a raw one was ------------------------------------


@pytest.mark.parametrize("returned", ["abc", None], ids=["str", "None"])
def test_accumulate_names_a_non_numeric_result(returned):
    with pytest.raises(  # was a raw error from jnp.stack / jnp.asarray
        TypeError,
        match=r"`func` must return a numeric scalar for every leaf of `grad`; at \['w'\] it "
        rf"returned {type(returned).__name__}",
    ):
        jg.grad_accumulate(lambda x: returned, {"w": jnp.ones(2)})


@pytest.mark.parametrize("vector", [None, "abc", ["a", "b"]], ids=["None", "str", "str-list"])
def test_unflatten_names_a_vector_that_is_not_an_array(vector):
    with pytest.raises(TypeError, match=r"`vector` must be a numeric array; got "):
        jg.grad_unflatten(vector, {"w": jnp.ones(2)})  # was "None is not a valid value..."


class _Unhashable:
    """A callable that defines `__eq__` and so no `__hash__`."""

    def __eq__(self, other):
        return self is other

    def __call__(self, *leaves):
        return leaves[0] * 2


@pytest.mark.parametrize("fn", ["grad_apply_", "grad_mapzip_"])
def test_an_unhashable_function_with_donate_gets_a_house_error(fn):
    grad = {"w": jnp.ones(2)}
    call = {
        "grad_apply_": lambda: jg.grad_apply_(_Unhashable(), grad, donate=True),
        "grad_mapzip_": lambda: jg.grad_mapzip_(
            _Unhashable(), grad, {"w": jnp.ones(2)}, donate=True
        ),
    }[fn]
    with pytest.raises(  # was JAX's "Non-hashable static arguments are not supported"
        TypeError,
        match=r"`func_` must be hashable with `donate=True`, which compiles it once per "
        r"function object; got an unhashable _Unhashable\.",
    ):
        call()
    assert not grad["w"].is_deleted()  # refused before anything was donated
    np.testing.assert_array_equal(jg.grad_apply_(_Unhashable(), grad)["w"], [2.0, 2.0])
