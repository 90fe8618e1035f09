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
