import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MIXED, as_f64, paths, trees
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxgrad as jg

NAN, INF = jnp.nan, jnp.inf


def _bad_counts(tree):
    return [int(np.sum(~np.isfinite(as_f64(x)))) for x in jax.tree.leaves(tree)]


# -- grad_all_finite -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        ({}, True),
        (None, True),
        ({"a": None, "b": [None]}, True),
        (jnp.zeros((0, 3)), True),
        (jnp.array(1.0, jnp.bfloat16), True),
        (jnp.array(NAN), False),
        ({"a": jnp.ones(2), "b": jnp.array([1.0, INF], jnp.float16)}, False),
        ({"a": jnp.ones(2), "b": jnp.array([-INF], jnp.bfloat16)}, False),
        ({"n": jnp.array([1, 2], jnp.int32), "x": jnp.ones(2)}, True),
        (jg.Gradient([jnp.ones(2)], [jnp.array([[NAN]])]), False),
    ],
    ids=[
        "empty",
        "none",
        "none-subtrees",
        "zero-size",
        "scalar",
        "nan-scalar",
        "inf-f16",
        "neg-inf-bf16",
        "int",
        "gradient",
    ],
)
def test_all_finite_expected_values(tree, expected, maybe_jit):
    out = maybe_jit(jg.grad_all_finite)(tree)
    assert out.shape == () and out.dtype == jnp.bool_ and bool(out) is expected


def test_all_finite_in_a_lax_cond_inside_jit():
    @jax.jit
    def safe_step(params, grad):
        return jax.lax.cond(
            jg.grad_all_finite(grad),
            lambda: jax.tree.map(jnp.subtract, params, grad),
            lambda: params,
        )

    params = {"w": jnp.ones(2)}
    chex.assert_trees_all_equal(safe_step(params, {"w": jnp.array([1.0, NAN])}), params)
    chex.assert_trees_all_equal(safe_step(params, {"w": jnp.ones(2)}), {"w": jnp.zeros(2)})


def test_all_finite_axis_name_is_global():
    shards = {"w": jnp.array([[1.0, 2.0], [INF, 0.0]])}  # only shard 1 is bad
    out = jax.jit(jax.vmap(lambda g: jg.grad_all_finite(g, axis_name="i"), axis_name="i"))(shards)
    np.testing.assert_array_equal(out, [False, False])


# -- grad_nonfinite_report -----------------------------------------------------------------


def test_report_counts_paths_and_first_path(maybe_jit):
    g = jg.Gradient(
        layers=[{"b": jnp.ones(3)}, None, {"b": jnp.array([NAN, 1.0, INF], jnp.bfloat16)}],
        weights=[jnp.zeros((0, 2)), jnp.array([[-INF]], jnp.float16)],
    )
    report = maybe_jit(jg.grad_nonfinite_report)(g)
    assert isinstance(report, jg.NonfiniteReport)
    assert report.counts.dtype == jnp.int32
    np.testing.assert_array_equal(report.counts, [0, 2, 0, 1])
    assert report.paths == ("layers/0/b", "layers/2/b", "weights/0", "weights/1")
    assert int(report.total) == 3
    assert report.first_path() == "layers/2/b"
    assert report.as_dict() == {"layers/2/b": 2, "weights/1": 1}
    assert report.summary() == "3 non-finite entries in 2 of 4 leaves; first at layers/2/b"


def test_report_of_a_finite_gradient():
    report = jg.grad_nonfinite_report({"a": jnp.ones(2), "b": jnp.array(1.0)})
    assert report.first_path() is None and report.as_dict() == {} and int(report.total) == 0
    assert report.summary() == "no non-finite entries in 2 leaves"


def test_report_of_empty_and_single_array():
    empty = jg.grad_nonfinite_report({})
    assert empty.counts.shape == (0,) and empty.paths == () and int(empty.total) == 0
    assert empty.first_path() is None and empty.summary() == "no non-finite entries in 0 leaves"
    root = jg.grad_nonfinite_report(jnp.array([NAN, NAN]))
    assert root.paths == ("(root)",) and root.first_path() == "(root)"
    assert bool(root.first_path())  # `if report.first_path():` sees the bad root leaf
    assert root.summary() == "2 non-finite entries in 1 of 1 leaf; first at (root)"


def test_report_is_a_pytree_stacked_by_scan():
    grads = {"w": jnp.array([[1.0, 2.0], [NAN, 3.0], [INF, NAN]])}

    def body(carry, g):
        report = jg.grad_nonfinite_report(g)
        return carry + report.total, report

    total, reports = jax.jit(lambda gs: jax.lax.scan(body, jnp.int32(0), gs))(grads)
    assert int(total) == 3
    assert isinstance(reports, jg.NonfiniteReport) and reports.paths == ("w",)
    np.testing.assert_array_equal(reports.counts, [[0], [1], [2]])
    # the host methods read a stacked report: the first bad step, counts per step
    np.testing.assert_array_equal(reports.total, [0, 1, 2])
    assert reports.first_path() == "w"
    np.testing.assert_array_equal(reports.as_dict()["w"], [0, 1, 2])
    assert (
        reports.summary() == "3 non-finite entries in 1 of 1 leaf over 3 steps; first at w (step 1)"
    )


def test_report_host_methods_inside_jit_raise_a_clear_error():
    def inside(g):
        jg.grad_nonfinite_report(g).first_path()

    with pytest.raises(
        TypeError, match=r"`NonfiniteReport.first_path` reads the counts on the host"
    ):
        jax.jit(inside)({"w": jnp.ones(2)})


def test_report_axis_name_counts_globally():
    shards = {"w": jnp.array([[NAN, 2.0], [INF, NAN]])}
    counts = jax.jit(
        jax.vmap(lambda g: jg.grad_nonfinite_report(g, axis_name="i").counts, axis_name="i")
    )(shards)
    np.testing.assert_array_equal(counts, [[3], [3]])


# -- grad_where_finite ---------------------------------------------------------------------


def test_where_finite_scalar_fallback(maybe_jit):
    good = {"w": jnp.array([1.0, 2.0], jnp.bfloat16), "b": jnp.array(3.0), "n": None}
    bad = {"w": jnp.array([1.0, NAN], jnp.bfloat16), "b": jnp.array(3.0), "n": None}
    where = maybe_jit(jg.grad_where_finite)
    chex.assert_trees_all_equal(where(good, 0.0), good)
    out = where(bad, 0.0)
    chex.assert_trees_all_equal(
        out, {"w": jnp.zeros(2, jnp.bfloat16), "b": jnp.array(0.0), "n": None}
    )
    chex.assert_trees_all_equal(
        where(bad, jnp.float32(7)),
        {"w": jnp.full(2, 7, jnp.bfloat16), "b": jnp.array(7.0), "n": None},
    )


def test_where_finite_tree_fallback_keeps_grad_dtypes(maybe_jit):
    bad = {"w": jnp.array([INF, 1.0], jnp.float16)}
    previous = {"w": jnp.array([0.5, 0.25], jnp.float32)}
    out = maybe_jit(jg.grad_where_finite)(bad, previous)
    chex.assert_trees_all_equal(out, {"w": jnp.array([0.5, 0.25], jnp.float16)})


def test_where_finite_of_empty_and_zero_size():
    assert jg.grad_where_finite({}, 0.0) == {}
    out = jg.grad_where_finite({"e": jnp.zeros((0, 2))}, 1.0)
    assert out["e"].shape == (0, 2)


def test_where_finite_fallback_structure_errors():
    with pytest.raises(
        ValueError,
        match=r"`grad` and `fallback` must have the same structure; they first differ at the root",
    ):
        jg.grad_where_finite({"w": jnp.ones(2)}, {"v": jnp.ones(2)})
    with pytest.raises(
        ValueError,
        match=r"`grad` and `fallback` must have leaves of the same shapes; at \['w'\] `grad` has f32\[2\], `fallback` has f32\[3\]",
    ):
        jg.grad_where_finite({"w": jnp.ones(2)}, {"w": jnp.ones(3)})


# -- laws on random trees ------------------------------------------------------------------


@settings(max_examples=16)
@given(trees(nonfinite=True, dtypes=MIXED, max_leaves=6), st.booleans())
def test_finite_checks_on_random_trees(tree, jit):
    maybe = jax.jit if jit else (lambda f: f)
    counts = _bad_counts(tree)
    ok, report, kept = maybe(
        lambda t: (jg.grad_all_finite(t), jg.grad_nonfinite_report(t), jg.grad_where_finite(t, 0.0))
    )(tree)
    assert bool(ok) is (sum(counts) == 0)
    np.testing.assert_array_equal(report.counts, np.array(counts, np.int32))
    assert report.paths == tuple(paths(tree))
    first = next((p for p, c in zip(paths(tree), counts, strict=True) if c), None)
    assert report.first_path() == first
    chex.assert_trees_all_equal_shapes_and_dtypes(kept, tree)
    if sum(counts) == 0:
        chex.assert_trees_all_equal(kept, tree)
    else:
        assert all(not np.any(as_f64(x)) for x in jax.tree.leaves(kept))
