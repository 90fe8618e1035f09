"""The gradient noise scale: `grad_microbatch_noise`, `grad_pmean_noise`, the smoothing state.

References: a linear regression whose per-example gradient covariance is known in
closed form (the estimates must converge to it), and numpy in float64 on the stacked
small-batch gradients (the estimates must equal the formulas of docs/noise_scale.md to
float32 rounding). The 8-device check runs this file as a script in a subprocess with
`--xla_force_host_platform_device_count=8` (`python tests/test_noise.py --mesh`).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad as jg

ROOT = Path(__file__).resolve().parent.parent
MESH_TIMEOUT_S = 240


# -- references --------------------------------------------------------------------------


def reference(stacked, b_small: float, groups=None):
    """float64 numpy: (|G|^2, tr Sigma) from small-batch gradients stacked on axis 0.

    `groups` is a list of lists of leaf indices (entry 0 of the result is every leaf).
    """
    leaves = [
        np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64) for x in jax.tree.leaves(stacked)
    ]
    count = leaves[0].shape[0] if leaves else 1
    b_big = b_small * count
    out_g, out_t, scales_g, scales_t = [], [], [], []
    for idx in [list(range(len(leaves))), *(groups or [])]:
        flat = [leaves[i].reshape(count, -1) for i in idx]
        rows = np.concatenate(flat, axis=1) if flat else np.zeros((count, 0))
        small = np.mean(np.sum(rows**2, axis=1))
        big = np.sum(np.mean(rows, axis=0) ** 2)
        out_g.append((b_big * big - b_small * small) / (b_big - b_small))
        out_t.append((small - big) / (1 / b_small - 1 / b_big))
        # the size of the terms whose difference is taken: the scale of float32 rounding
        scales_g.append((b_big * big + b_small * small) / (b_big - b_small))
        scales_t.append((small + big) / (1 / b_small - 1 / b_big))
    return np.array(out_g), np.array(out_t), np.array(scales_g), np.array(scales_t)


def assert_matches_reference(noise, stacked, b_small, groups=None, rel=2e-6):
    grad_sq, trace_cov, scale_g, scale_t = reference(stacked, b_small, groups)
    np.testing.assert_allclose(
        np.asarray(noise.grad_sq, np.float64), grad_sq, rtol=0, atol=rel * scale_g.max() + 1e-30
    )
    np.testing.assert_allclose(
        np.asarray(noise.trace_cov, np.float64), trace_cov, rtol=0, atol=rel * scale_t.max() + 1e-30
    )


def stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def identity_grad(params, batch):
    """A `grad_fn` whose micro-batch gradient is the batch itself: any gradients we like."""
    del params
    return batch


def pmean_noise(stacked, b, by=None, axis_size=None):
    """`grad_pmean_noise` over the leading axis, as replicas of a named vmap."""
    f = lambda g: jg.grad_pmean_noise(g, "i", batch_per_replica=b, by=by)  # noqa: E731
    return jax.vmap(f, axis_name="i", axis_size=axis_size)(stacked)


def first(tree):
    """Replica 0 of a vmapped result (every replica holds the same)."""
    return jax.tree.map(lambda x: x[0], tree)


# -- linear regression with a known gradient covariance -----------------------------------
#
# Examples x ~ N(0, I_d), y = x . w* + sigma * eps; loss 0.5 (x . w - y)^2 at w, delta = w - w*.
# The per-example gradient x (x . delta - sigma eps) has mean G = delta and covariance
# Sigma = (|delta|^2 + sigma^2) I + delta delta^T (Isserlis), so |G|^2 = |delta|^2 and
# tr(Sigma) = (d + 1) |delta|^2 + d sigma^2; per coordinate group S: |delta_S|^2 and
# (|delta|^2 + sigma^2) |S| + |delta_S|^2.

W_STAR = np.array([1.0, -1.0, 0.5, 2.0], np.float32)
SIGMA = 1.0
LINEAR_PARAMS = {"a": jnp.zeros(2), "b": jnp.zeros(2)}  # coordinates 0-1 and 2-3


def linear_truth():
    delta = -W_STAR.astype(np.float64)
    d, total = delta.size, float(delta @ delta)
    parts = [delta[:2], delta[2:]]
    grad_sq = [total] + [float(p @ p) for p in parts]
    trace = [(d + 1) * total + d * SIGMA**2] + [
        (total + SIGMA**2) * p.size + float(p @ p) for p in parts
    ]
    return np.array(grad_sq), np.array(trace)


def linear_loss(params, batch):
    w = jnp.concatenate([params["a"], params["b"]])
    return 0.5 * jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


def linear_batches(key, shape):
    """Examples with a leading `shape` (e.g. (micro-batches, examples))."""
    kx, ke = jax.random.split(key)
    x = jax.random.normal(kx, (*shape, W_STAR.size))
    y = x @ jnp.asarray(W_STAR) + SIGMA * jax.random.normal(ke, shape)
    return {"x": x, "y": y}


@jax.jit
def linear_steps(keys):
    """Estimates at `LINEAR_PARAMS` from fresh batches (8 micro-batches of 16), one per key."""

    def one(key):
        batches = linear_batches(key, (8, 16))
        return jg.grad_microbatch_noise(jax.grad(linear_loss), LINEAR_PARAMS, batches, by="leaf")[1]

    return jax.vmap(one)(keys)


def test_linear_regression_estimates_converge_to_the_closed_form():
    steps = 4000
    noise = linear_steps(jax.random.split(jax.random.key(0), steps))
    assert noise.names == ("", "a", "b")
    true_g, true_t = linear_truth()  # |G|^2 = 6.25, tr(Sigma) = 35.25 (B_simple = 5.64)
    for got, true in ((np.asarray(noise.grad_sq), true_g), (np.asarray(noise.trace_cov), true_t)):
        mean, stderr = got.mean(0), got.std(0) / np.sqrt(steps)
        # unbiased: within 5 standard errors of the truth, and (stated tolerance) 3%
        assert np.all(np.abs(mean - true) < 5 * stderr), (mean, true, stderr)
        np.testing.assert_allclose(mean, true, rtol=0.03)
    # a single step is noisy: the spread is what the smoothing is for
    assert np.asarray(noise.trace_cov)[:, 0].std() > 0.2 * true_t[0]


def test_smoothed_b_simple_converges_to_the_closed_form_in_a_scan():
    true_g, true_t = linear_truth()
    state = jg.noise_scale_init(LINEAR_PARAMS, by="leaf")

    @jax.jit
    def run(state, keys):
        def step(state, key):
            batches = linear_batches(key, (8, 16))
            _, noise = jg.grad_microbatch_noise(
                jax.grad(linear_loss), LINEAR_PARAMS, batches, by="leaf"
            )
            state = jg.noise_scale_update(state, noise, decay=0.99)
            return state, state.b_simple

        return jax.lax.scan(step, state, keys)

    final, history = run(state, jax.random.split(jax.random.key(1), 3000))
    assert int(final.count) == 3000
    assert final.b_simple.dtype == jnp.float32 and final.b_simple.shape == (3,)
    # the last state: the EMAs (about 100 steps) within 10% of the truth
    np.testing.assert_allclose(final.grad_sq, true_g, rtol=0.1)
    np.testing.assert_allclose(final.trace_cov, true_t, rtol=0.1)
    np.testing.assert_allclose(final.b_simple, true_t / true_g, rtol=0.1)
    # after the first 500 steps, the smoothed B_simple averages to the truth within 3%
    np.testing.assert_allclose(np.asarray(history)[500:].mean(0), true_t / true_g, rtol=0.03)


def test_replicas_give_the_estimates_of_the_same_micro_batches():
    batches = linear_batches(jax.random.key(2), (8, 16))
    grads = jax.vmap(jax.grad(linear_loss), in_axes=(None, 0))(LINEAR_PARAMS, batches)
    mean_r, noise_r = first(jax.jit(lambda g: pmean_noise(g, 16, by="leaf"))(grads))
    micro = jax.jit(lambda p, b: jg.grad_microbatch_noise(jax.grad(linear_loss), p, b, by="leaf"))
    mean_m, noise_m = micro(LINEAR_PARAMS, batches)
    for a, b in zip(
        jax.tree.leaves((mean_r, noise_r)), jax.tree.leaves((mean_m, noise_m)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert noise_r.names == noise_m.names == ("", "a", "b")
    assert_matches_reference(noise_m, grads, 16, groups=[[0], [1]])


# -- exact formulas: trees, dtypes, groups ----------------------------------------------


def _stacked(kind, dtype, count=4):
    from helpers import make_tree

    return stack([make_tree(kind, dtype, seed=i) for i in range(count)])


KINDS = ["leaf", "nested", "gradient", "nnx_state"]


@pytest.mark.parametrize("kind", KINDS)
def test_microbatch_noise_equals_the_float64_formulas(kind, dtype):
    stacked = _stacked(kind, dtype)
    params = jax.tree.map(lambda x: x[0], stacked)
    run = jax.jit(
        lambda p, s: jg.grad_microbatch_noise(identity_grad, p, s, microbatch_size=3, by="leaf")
    )
    mean, noise = run(params, stacked)
    assert jax.tree.structure(mean) == jax.tree.structure(params)
    for m, p in zip(jax.tree.leaves(mean), jax.tree.leaves(params), strict=True):
        assert m.dtype == p.dtype and m.shape == p.shape
    assert noise.grad_sq.dtype == noise.trace_cov.dtype == jnp.float32
    leaves = len(jax.tree.leaves(params))
    groups = [[i] for i in range(leaves)] if kind != "leaf" else None
    assert len(noise.names) == 1 + (len(groups) if groups else 0)
    assert_matches_reference(noise, stacked, 3, groups)
    expected_mean = jg.grad_microbatch_mean(identity_grad, params, stacked)
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(expected_mean), strict=True):
        np.testing.assert_array_equal(
            np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
        )


@pytest.mark.parametrize("kind", KINDS)
def test_pmean_noise_equals_grad_pmean_and_the_formulas(kind, dtype):
    stacked = _stacked(kind, dtype)
    mean, noise = jax.jit(lambda s: pmean_noise(s, 3, by="leaf"))(stacked)
    expected = jax.vmap(lambda g: jg.grad_pmean(g, "i"), axis_name="i")(stacked)
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(
            np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
        )
    leaves = len(jax.tree.leaves(stacked))
    groups = [[i] for i in range(leaves)] if kind != "leaf" else None
    noise = first(noise)
    assert noise.grad_sq.dtype == jnp.float32
    assert_matches_reference(noise, stacked, 3, groups)


def test_bfloat16_gradients_are_summed_and_squared_in_float32():
    # micro-batch gradients 1 and 1 + 2**-7 (both bfloat16): their mean 1 + 2**-8 is not a
    # bfloat16, and tr(Sigma) hangs on the difference between |G_small|^2 and |G_big|^2
    one, next_up = 1.0, 1.0 + 2.0**-7
    values = np.array([one, next_up] * 32, np.float32).reshape(64, 1) * np.ones(
        (1, 256), np.float32
    )
    stacked = jnp.asarray(values, jnp.bfloat16)
    params = jnp.zeros(256, jnp.bfloat16)
    mean, noise = jax.jit(
        lambda p, s: jg.grad_microbatch_noise(identity_grad, p, s, microbatch_size=8)
    )(params, stacked)
    assert mean.dtype == jnp.bfloat16
    grad_sq, trace_cov, _, _ = reference(stacked, 8)
    # exact in float64: mean square (1 + (1 + 2**-7)**2) / 2 * 256, mean (1 + 2**-8)
    np.testing.assert_allclose(float(noise.trace_cov[0]), trace_cov[0], rtol=1e-3)
    np.testing.assert_allclose(float(noise.grad_sq[0]), grad_sq[0], rtol=1e-6)
    assert trace_cov[0] > 0
    # what a bfloat16 mean would have given instead: no noise at all, or negative noise
    b16_mean = float(jnp.asarray((one + next_up) / 2, jnp.bfloat16))
    small = (one**2 + next_up**2) / 2 * 256
    naive = (small - b16_mean**2 * 256) / (1 / 8 - 1 / (8 * 64))
    assert abs(naive - trace_cov[0]) > 0.5 * trace_cov[0]


def test_groups_partition_the_whole_so_their_estimates_sum_to_it():
    from helpers import make_tree

    stacked = stack([make_tree("gradient", seed=i) for i in range(5)])
    params = jax.tree.map(lambda x: x[0], stacked)
    for by in ("leaf", "group", lambda path, leaf: "even" if leaf.size % 2 == 0 else "odd"):
        _, noise = jg.grad_microbatch_noise(
            identity_grad, params, stacked, microbatch_size=2, by=by
        )
        _, _, scale_g, scale_t = reference(stacked, 2)
        np.testing.assert_allclose(
            noise.grad_sq[1:].sum(), noise.grad_sq[0], atol=1e-5 * float(scale_g[0])
        )
        np.testing.assert_allclose(
            noise.trace_cov[1:].sum(), noise.trace_cov[0], atol=1e-5 * float(scale_t[0])
        )
    assert noise.names == ("", "even", "odd")  # in order of first appearance


def test_groups_that_leave_leaves_out_cover_only_theirs():
    from helpers import make_tree

    stacked = stack([make_tree("dict", seed=i) for i in range(3)])
    params = jax.tree.map(lambda x: x[0], stacked)
    by = lambda path, leaf: "w" if jg.path_name(path) == "w" else None  # noqa: E731
    _, noise = jg.grad_microbatch_noise(identity_grad, params, stacked, microbatch_size=1, by=by)
    assert noise.names == ("", "w")
    assert_matches_reference(noise, stacked, 1, groups=[[1]])  # leaves in key order: b, w


def test_law_per_leaf_estimates_sum_to_the_whole_on_random_trees():
    from helpers import trees
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=8, deadline=None)
    @given(trees(), st.integers(2, 4), st.floats(0.5, 64))
    def law(tree, count, b):
        leaves = jax.tree.leaves(tree)
        if not leaves:
            return
        stacked = stack([jax.tree.map(lambda x, i=i: x * (i + 1) - i, tree) for i in range(count)])
        _, noise = first(pmean_noise(stacked, b, by="leaf"))
        groups = [[i] for i in range(len(leaves))] if len(noise.names) > 1 else None
        assert_matches_reference(noise, stacked, b, groups, rel=1e-5)
        if groups:
            _, _, scale_g, scale_t = reference(stacked, b)
            np.testing.assert_allclose(
                noise.grad_sq[1:].sum(), noise.grad_sq[0], atol=1e-5 * scale_g[0] + 1e-30
            )
            np.testing.assert_allclose(
                noise.trace_cov[1:].sum(), noise.trace_cov[0], atol=1e-5 * scale_t[0] + 1e-30
            )

    law()


def test_an_empty_gradient_has_zero_estimates():
    mean, noise = pmean_noise({}, 4, axis_size=3)
    assert mean == {}
    np.testing.assert_array_equal(noise.grad_sq, np.zeros((3, 1)))
    np.testing.assert_array_equal(noise.trace_cov, np.zeros((3, 1)))


def test_identical_small_batches_have_zero_noise():
    g = {"w": jnp.array([1.0, -2.0, 3.0])}
    _, noise = first(pmean_noise(stack([g] * 4), 16))
    np.testing.assert_allclose(noise.trace_cov, [0.0], atol=1e-5)
    np.testing.assert_allclose(noise.grad_sq, [14.0], rtol=1e-6)


def test_estimates_scale_with_the_gradient_and_the_batch_size():
    # |G|^2 and tr(Sigma) are quadratic in the gradient; tr(Sigma) is linear in B_small
    stacked = _stacked("dict", jnp.float32)
    _, a = first(pmean_noise(stacked, 4))
    _, b = first(pmean_noise(jax.tree.map(lambda x: 3 * x, stacked), 4))
    _, c = first(pmean_noise(stacked, 8))
    np.testing.assert_allclose(b.grad_sq, 9 * a.grad_sq, rtol=1e-5)
    np.testing.assert_allclose(b.trace_cov, 9 * a.trace_cov, rtol=1e-5)
    np.testing.assert_allclose(c.grad_sq, a.grad_sq, rtol=1e-6)
    np.testing.assert_allclose(c.trace_cov, 2 * a.trace_cov, rtol=1e-6)


def test_microbatch_noise_over_replicas_adds_every_micro_batch():
    # 3 replicas x 2 micro-batches each == 6 micro-batches on one device
    stacked = _stacked("gradient", jnp.bfloat16, count=6)
    params = jax.tree.map(lambda x: x[0], stacked)
    per_replica = jax.tree.map(lambda x: x.reshape(3, 2, *x.shape[1:]), stacked)

    def run(s):
        return jg.grad_microbatch_noise(
            identity_grad, params, s, microbatch_size=5, by="group", axis_name="i"
        )

    mean_r, noise_r = first(jax.vmap(run, axis_name="i")(per_replica))
    mean_1, noise_1 = jg.grad_microbatch_noise(
        identity_grad, params, stacked, microbatch_size=5, by="group"
    )
    for a, b in zip(jax.tree.leaves(mean_r), jax.tree.leaves(mean_1), strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2)
    np.testing.assert_allclose(noise_r.grad_sq, noise_1.grad_sq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(noise_r.trace_cov, noise_1.trace_cov, rtol=1e-5, atol=1e-4)
    # and one micro-batch per replica is defined too: B_small is the micro-batch
    single = jax.tree.map(lambda x: x.reshape(6, 1, *x.shape[1:]), stacked)
    _, noise_s = first(jax.vmap(run, axis_name="i")(single))
    np.testing.assert_allclose(noise_s.trace_cov, noise_1.trace_cov, rtol=1e-5, atol=1e-4)


def test_has_aux_stacks_the_aux_and_the_mean_is_that_of_the_accumulator():
    batches = linear_batches(jax.random.key(3), (4, 8))
    grad_fn = jax.grad(lambda p, b: (linear_loss(p, b), b["y"].mean()), has_aux=True)
    (mean, aux), noise = jg.grad_microbatch_noise(grad_fn, LINEAR_PARAMS, batches, has_aux=True)
    expected, expected_aux = jg.grad_microbatch_mean(grad_fn, LINEAR_PARAMS, batches, has_aux=True)
    assert aux.shape == (4,)
    np.testing.assert_array_equal(aux, expected_aux)
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    assert noise.names == ("",)


def test_microbatch_size_is_read_from_axis_1():
    batches = linear_batches(jax.random.key(4), (4, 8))
    _, read = jg.grad_microbatch_noise(jax.grad(linear_loss), LINEAR_PARAMS, batches)
    _, given = jg.grad_microbatch_noise(
        jax.grad(linear_loss), LINEAR_PARAMS, batches, microbatch_size=8
    )
    np.testing.assert_array_equal(read.trace_cov, given.trace_cov)
    _, tokens = jg.grad_microbatch_noise(
        jax.grad(linear_loss), LINEAR_PARAMS, batches, microbatch_size=np.int64(80)
    )
    np.testing.assert_allclose(tokens.trace_cov, 10 * given.trace_cov, rtol=1e-6)
    np.testing.assert_array_equal(tokens.grad_sq, given.grad_sq)


def test_derivative_is_finite_at_zero():
    stacked = {"w": jnp.zeros((3, 4)), "b": jnp.zeros((3, 2))}

    def total(s):
        _, noise = pmean_noise(s, 2, by="leaf")
        return jnp.sum(noise.grad_sq) + jnp.sum(noise.trace_cov)

    grads = jax.grad(total)(stacked)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))


# -- undefined and invalid ---------------------------------------------------------------


def test_a_single_micro_batch_is_a_clear_error_not_a_division_by_zero():
    batches = linear_batches(jax.random.key(5), (1, 16))
    with pytest.raises(
        ValueError,
        match=r"single micro-batch: the small and the big batch coincide \(B_small = B_big = 16 examples\), so the gradient noise scale is undefined",
    ):
        jg.grad_microbatch_noise(jax.grad(linear_loss), LINEAR_PARAMS, batches)
    run = lambda b: jg.grad_microbatch_noise(jax.grad(linear_loss), LINEAR_PARAMS, b, axis_name="i")  # noqa: E731
    with pytest.raises(ValueError, match=r"single micro-batch on a single replica along 'i'"):
        jax.vmap(run, axis_name="i")(jax.tree.map(lambda x: x[None], batches))


def test_a_single_replica_is_a_clear_error():
    g = {"w": jnp.ones((1, 3))}
    with pytest.raises(
        ValueError,
        match=r"single replica along 'i': the small and the big batch coincide \(B_small = B_big = 32 examples\).*Use `grad_pmean`",
    ):
        pmean_noise(g, 32)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, r"`microbatch_size` must be a positive number of examples; got 0\."),
        (-4, ValueError, r"got -4\."),
        (float("nan"), ValueError, r"got nan\."),
        (float("inf"), ValueError, r"got inf\."),
        (
            True,
            TypeError,
            r"`microbatch_size` must be a positive number of examples known at trace time .*; got bool True\.",
        ),
        (
            "16",
            TypeError,
            r"`microbatch_size` must be a positive number of examples; got str '16'\.",
        ),
        (jnp.ones(2), TypeError, r"got ArrayImpl"),
    ],
)
def test_bad_microbatch_size(value, error, match):
    batches = linear_batches(jax.random.key(6), (2, 4))
    with pytest.raises(error, match=match):
        jg.grad_microbatch_noise(
            jax.grad(linear_loss), LINEAR_PARAMS, batches, microbatch_size=value
        )


def test_a_traced_batch_size_is_refused():
    g = {"w": jnp.ones((2, 3))}
    f = jax.jit(
        lambda g, b: jax.vmap(
            lambda x: jg.grad_pmean_noise(x, "i", batch_per_replica=b), axis_name="i"
        )(g)
    )
    with pytest.raises(
        TypeError,
        match=r"`batch_per_replica` must be a positive number of examples known at trace time .*; got a traced value\.",
    ):
        f(g, 4)


def test_microbatch_size_that_cannot_be_read():
    with pytest.raises(
        ValueError,
        match=r"`microbatch_size` was not given and cannot be read from `batches`: at \['y'\] the leaf f32\[3\] has no example axis \(axis 1\)\. Pass `microbatch_size=`",
    ):
        jg.grad_microbatch_noise(
            identity_grad,
            {"x": jnp.zeros(2), "y": jnp.zeros(())},
            {"x": jnp.ones((3, 2)), "y": jnp.ones(3)},
        )
    with pytest.raises(
        ValueError,
        match=r"disagree on the examples per micro-batch \(axis 1\): \['x'\] has 4, \['y'\] has 5\. Pass `microbatch_size=`",
    ):
        jg.grad_microbatch_noise(identity_grad, {}, {"x": jnp.ones((3, 4)), "y": jnp.ones((3, 5))})


def test_bad_batches_and_grad_fn():
    with pytest.raises(ValueError, match=r"`batches` must have at least one leaf"):
        jg.grad_microbatch_noise(identity_grad, {}, {})
    with pytest.raises(
        ValueError, match=r"`batches` must hold at least one micro-batch; its leading axis is 0\."
    ):
        jg.grad_microbatch_noise(identity_grad, {}, {"x": jnp.ones((0, 2))})
    with pytest.raises(
        ValueError,
        match=r"`batches` leaves must share the leading micro-batch axis; \['x'\] has 2 micro-batches, \['y'\] has 3\.",
    ):
        jg.grad_microbatch_noise(identity_grad, {}, {"x": jnp.ones((2, 2)), "y": jnp.ones((3, 2))})
    with pytest.raises(TypeError, match=r"`grad_fn` must be callable; got int 3\."):
        jg.grad_microbatch_noise(3, {}, {"x": jnp.ones((2, 2))})
    with pytest.raises(
        ValueError,
        match=r"`params` and `grad_fn\(params, batch\)` must have the same structure; they first differ at the root: `params` has a dict with keys \['a'\], `grad_fn\(params, batch\)` has a dict with keys \['x'\]\.",
    ):
        jg.grad_microbatch_noise(identity_grad, {"a": jnp.ones(2)}, {"x": jnp.ones((2, 2))})
    with pytest.raises(
        ValueError,
        match=r"must have leaves of the same shapes; at \['x'\] `params` has f32\[3\], `grad_fn\(params, batch\)` has f32\[2\]\.",
    ):
        jg.grad_microbatch_noise(identity_grad, {"x": jnp.ones(3)}, {"x": jnp.ones((2, 2))})
    with pytest.raises(
        TypeError,
        match=r"`like` must have floating-point or complex leaves; at \['x'\] it has i32\[\d*\]\.",
    ):
        jg.grad_microbatch_noise(
            identity_grad, {"x": jnp.ones(2, jnp.int32)}, {"x": jnp.ones((2, 2), jnp.int32)}
        )
    with pytest.raises(ValueError, match=r"`by` must be 'leaf', 'group', None or a callable"):
        jg.grad_microbatch_noise(
            identity_grad, {"x": jnp.ones(2)}, {"x": jnp.ones((2, 2))}, by="layer"
        )
    with pytest.raises(
        TypeError,
        match=r"`axis_name` must be a mesh axis name .*; got list \['i'\]\. A list is not accepted",
    ):
        jg.grad_microbatch_noise(
            identity_grad, {"x": jnp.ones(2)}, {"x": jnp.ones((2, 2))}, axis_name=["i"]
        )


def test_bad_pmean_arguments():
    with pytest.raises(
        TypeError,
        match=r"`grad` must have floating-point or complex leaves; at \['n'\] it has i32\[3\]\.",
    ):
        jax.vmap(lambda g: jg.grad_pmean_noise(g, "i", batch_per_replica=2), axis_name="i")(
            {"n": jnp.ones((2, 3), jnp.int32)}
        )
    with pytest.raises(
        TypeError,
        match=r"`axis_name` must be a mesh axis name \(a str\) or a non-empty tuple of names; got NoneType None\.",
    ):
        jg.grad_pmean_noise({"w": jnp.ones(2)}, None, batch_per_replica=2)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"`batch_per_replica` must be a positive number of examples; got 0\."
    ):
        pmean_noise({"w": jnp.ones((2, 3))}, 0)
    with pytest.raises(ValueError, match=r"`by='group'` needs a `Gradient`"):
        pmean_noise({"w": jnp.ones((2, 3))}, 2, by="group")


# -- smoothing ---------------------------------------------------------------------------


def numpy_ema(values, decay):
    """Debiased EMA, the textbook way: m = d m + (1 - d) x, then m / (1 - d**t)."""
    m, out = 0.0, []
    for t, x in enumerate(values, start=1):
        m = decay * m + (1 - decay) * x
        out.append(m / (1 - decay**t))
    return np.array(out)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.99])
def test_update_is_the_debiased_ema_and_b_simple_the_ratio_of_the_emas(decay, maybe_jit):
    rng = np.random.default_rng(0)
    g = rng.normal(2.0, 3.0, size=(30, 2)).astype(np.float32)  # some steps negative
    t = rng.normal(20.0, 15.0, size=(30, 2)).astype(np.float32)
    state = jg.noise_scale_init({"w": jnp.zeros(3)}, by=lambda path, leaf: "w")
    update = maybe_jit(lambda s, n: jg.noise_scale_update(s, n, decay=decay))
    history = []
    for gs, ts in zip(g, t, strict=True):
        state = update(state, jg.NoiseScale(jnp.asarray(gs), jnp.asarray(ts), ("", "w")))
        history.append(state)
    ema_g, ema_t = numpy_ema(g.astype(np.float64), decay), numpy_ema(t.astype(np.float64), decay)
    got_g = np.array([s.grad_sq for s in history])
    got_t = np.array([s.trace_cov for s in history])
    got_b = np.array([s.b_simple for s in history])
    np.testing.assert_allclose(got_g, ema_g, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_t, ema_t, rtol=1e-4, atol=1e-3)
    expected_b = np.where(ema_g > 0, np.maximum(ema_t, 0) / np.where(ema_g > 0, ema_g, 1), np.nan)
    np.testing.assert_allclose(got_b, expected_b, rtol=1e-3)
    assert int(state.count) == 30
    np.testing.assert_allclose(history[0].grad_sq, g[0], rtol=1e-6)  # debiased: step 1 = estimate 1


def test_b_simple_is_nan_while_the_signal_is_not_positive_and_never_negative():
    state = jg.noise_scale_init({"w": jnp.zeros(3)})
    assert np.isnan(state.b_simple).all()
    state = jg.noise_scale_update(
        state, jg.NoiseScale(jnp.array([-1.0]), jnp.array([5.0]), ("",)), decay=0.9
    )
    assert np.isnan(state.b_simple).all() and int(state.count) == 1
    state = jg.noise_scale_update(
        state, jg.NoiseScale(jnp.array([0.0]), jnp.array([5.0]), ("",)), decay=0.0
    )
    assert np.isnan(state.b_simple).all()  # |G|^2 = 0: the ratio is unbounded, not inf
    state = jg.noise_scale_update(
        state, jg.NoiseScale(jnp.array([2.0]), jnp.array([-3.0]), ("",)), decay=0.0
    )
    assert state.b_simple.tolist() == [0.0]  # noise below its resolution: B_simple 0, not negative
    np.testing.assert_allclose(state.trace_cov, [-3.0])  # the average itself is kept as it is


def test_steps_with_non_finite_estimates_are_skipped():
    state = jg.noise_scale_init({"a": jnp.zeros(1), "b": jnp.zeros(1)}, by="leaf")
    good = jg.NoiseScale(jnp.array([3.0, 1.0, 2.0]), jnp.array([30.0, 10.0, 20.0]), ("", "a", "b"))
    state = jg.noise_scale_update(state, good, decay=0.9)
    for bad in (jnp.array([jnp.nan, 1.0, 2.0]), jnp.array([3.0, 1.0, jnp.inf])):
        after = jax.jit(lambda s, n: jg.noise_scale_update(s, n, decay=0.9))(
            state, jg.NoiseScale(bad, good.trace_cov, good.names)
        )
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_state_keeps_its_dtypes_and_is_a_scan_carry():
    state = jg.noise_scale_init({"w": jnp.zeros(3, jnp.bfloat16)})
    assert state.grad_sq.dtype == jnp.float32 and state.count.dtype == jnp.int32
    stacked = jg.NoiseScale(
        jnp.arange(1.0, 6.0, dtype=jnp.bfloat16)[:, None],
        jnp.full((5, 1), 10.0, jnp.bfloat16),
        ("",),
    )
    final, _ = jax.lax.scan(
        lambda s, n: (jg.noise_scale_update(s, n, decay=0.5), None), state, stacked
    )
    assert jax.tree.structure(final) == jax.tree.structure(state)
    assert final.grad_sq.dtype == jnp.float32 and int(final.count) == 5
    # a traced decay is used as it is
    traced = jax.jit(lambda s, n, d: jg.noise_scale_update(s, n, decay=d))(
        state, first(stacked), jnp.float32(0.5)
    )
    np.testing.assert_allclose(traced.grad_sq, [1.0])


def test_init_takes_modules_and_shape_structs():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    state = jg.noise_scale_init(model, by="leaf")
    assert state.names == ("", "bias", "kernel")
    shapes = jax.eval_shape(lambda: {"w": jnp.zeros((2, 2), jnp.float16)})
    assert jg.noise_scale_init(shapes, by="leaf").names == ("", "w")
    assert jg.noise_scale_init(shapes, by=lambda p, x: "all").names == ("", "all")


def test_as_dict_stacked_and_traced():
    stacked = jg.NoiseScale(jnp.ones((4, 2)), jnp.zeros((4, 2)), ("", "w"))
    logs = stacked.as_dict(prefix="noise/")
    assert list(logs) == [
        "noise/grad_sq",
        "noise/grad_sq/w",
        "noise/trace_cov",
        "noise/trace_cov/w",
    ]
    assert logs["noise/grad_sq/w"].shape == (4,)
    with pytest.raises(
        TypeError,
        match=r"`NoiseScale(State)?\.as_dict` reads the values on the host; call it on what `jax.jit` returned",
    ):
        jax.jit(lambda n: n.as_dict())(stacked)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"decay": 1.0},
            ValueError,
            r"`decay` must be in \[0, 1\) \(the weight of the past in the moving average\); got 1\.0\.",
        ),
        ({"decay": -0.1}, ValueError, r"got -0\.1\."),
        ({"decay": float("nan")}, ValueError, r"got nan\."),
        (
            {"decay": "0.9"},
            TypeError,
            r"`decay` must be a real number in \[0, 1\); got str '0\.9'\.",
        ),
        ({"decay": jnp.ones(2)}, TypeError, r"got ArrayImpl"),
    ],
)
def test_bad_decay(kwargs, error, match):
    state = jg.noise_scale_init({"w": jnp.zeros(2)})
    with pytest.raises(error, match=match):
        jg.noise_scale_update(state, jg.NoiseScale(jnp.ones(1), jnp.ones(1), ("",)), **kwargs)


def test_bad_update_arguments():
    state = jg.noise_scale_init({"w": jnp.zeros(2)}, by="leaf")
    noise = jg.NoiseScale(jnp.ones(1), jnp.ones(1), ("",))
    with pytest.raises(
        ValueError,
        match=r"`state` and `noise` must have the same groups; `state` has \['', 'w'\], `noise` has \[''\]\. Give `noise_scale_init` the `by` of the estimating function\.",
    ):
        jg.noise_scale_update(state, noise)
    with pytest.raises(
        TypeError,
        match=r"`state` must be a `NoiseScaleState` \(from `noise_scale_init`\); got dict\.",
    ):
        jg.noise_scale_update({}, noise)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"`noise` must be a `NoiseScale` \(from `grad_microbatch_noise` or `grad_pmean_noise`\); got NoiseScaleState\.",
    ):
        jg.noise_scale_update(state, state)  # type: ignore[arg-type]


# -- optax: an nnx step and a linen step ------------------------------------------------


def _regression_batches(seed, micro=4, size=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(micro, size, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3 * rng.normal(size=(micro, size))).astype(
        np.float32
    )
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def test_track_noise_scale_in_an_nnx_train_step():
    import optax
    from flax import nnx

    from jaxgrad.optax import TrackNoiseScaleState, track_noise_scale

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 8, rngs=rngs)
            self.out = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x)))[..., 0]

    model = MLP(nnx.Rngs(0))
    tx = optax.chain(track_noise_scale(decay=0.9, by="leaf"), optax.sgd(0.05, momentum=0.9))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batches):
        graphdef, params = nnx.split(model, nnx.Param)

        def grad_fn(params, batch):
            loss = lambda p: jnp.mean((nnx.merge(graphdef, p)(batch["x"]) - batch["y"]) ** 2)  # noqa: E731
            return jax.grad(loss)(params)

        grads, noise = jg.grad_microbatch_noise(grad_fn, params, batches, by="leaf")
        optimizer.update(model, grads, noise_scale=noise)
        return noise

    expected = jg.noise_scale_init(model, by="leaf")
    for step in range(6):
        noise = train_step(model, optimizer, _regression_batches(step))
        expected = jg.noise_scale_update(expected, noise, decay=0.9)
    tracked = optax.tree_utils.tree_get(optimizer.opt_state, "noise_scale")
    assert isinstance(optimizer.opt_state[0], TrackNoiseScaleState)
    assert tracked.names == ("", "hidden/bias", "hidden/kernel", "out/bias", "out/kernel")
    logs, reference_logs = tracked.as_dict(prefix="noise/"), expected.as_dict(prefix="noise/")
    assert list(logs) == list(reference_logs)
    np.testing.assert_allclose(list(logs.values()), list(reference_logs.values()), rtol=1e-6)
    assert int(tracked.count[...]) == 6 and np.isfinite(logs["noise/b_simple"])


def test_track_noise_scale_in_a_linen_train_step():
    import flax.linen as nn
    import optax

    from jaxgrad.optax import track_noise_scale

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.relu(nn.Dense(8)(x)))[..., 0]

    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    by = lambda path, leaf: jg.path_name(path).split("/")[0]  # noqa: E731 - one group per layer
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), track_noise_scale(decay=0.8, by=by), optax.sgd(0.05)
    )
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batches):
        def grad_fn(params, batch):
            return jax.grad(
                lambda p: jnp.mean((model.apply({"params": p}, batch["x"]) - batch["y"]) ** 2)
            )(params)

        grads, noise = jg.grad_microbatch_noise(grad_fn, params, batches, by=by)
        updates, opt_state = tx.update(grads, opt_state, params, noise_scale=noise)
        return optax.apply_updates(params, updates), opt_state, noise

    expected = jg.noise_scale_init(params, by=by)
    for step in range(6):
        params, opt_state, noise = train_step(params, opt_state, _regression_batches(10 + step))
        expected = jg.noise_scale_update(expected, noise, decay=0.8)
    tracked = optax.tree_utils.tree_get(opt_state, "noise_scale")
    assert tracked.names == ("", "Dense_0", "Dense_1")
    for a, b in zip(jax.tree.leaves(tracked), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert int(tracked.count) == 6
    # the updates are those of the chain without it
    plain = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05))
    grads, noise = jg.grad_microbatch_noise(
        jax.grad(lambda p, b: jnp.mean((model.apply({"params": p}, b["x"]) - b["y"]) ** 2)),
        params,
        _regression_batches(99),
        by=by,
    )
    ours, _ = tx.update(grads, opt_state, params, noise_scale=noise)
    theirs, _ = plain.update(grads, plain.init(params), params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)


def test_track_noise_scale_errors():
    import optax

    from jaxgrad.optax import track_noise_scale

    params = {"w": jnp.zeros(2)}
    tx = track_noise_scale(by="leaf")
    state = tx.init(params)
    with pytest.raises(
        TypeError,
        match=r"`track_noise_scale` needs the step's estimates: call `tx.update\(grads, opt_state, params, noise_scale=noise\)`",
    ):
        tx.update(params, state, params)
    with pytest.raises(
        TypeError, match=r"`noise_scale` must be a `jaxgrad.NoiseScale`.*; got dict\."
    ):
        tx.update(params, state, params, noise_scale={})
    with pytest.raises(
        ValueError,
        match=r"`noise_scale` must have the groups of `track_noise_scale\(by=...\)`; the state has \['', 'w'\], `noise_scale` has \[''\]",
    ):
        tx.update(params, state, params, noise_scale=jg.NoiseScale(jnp.ones(1), jnp.ones(1), ("",)))
    with pytest.raises(
        TypeError,
        match=r"`state` must be the `TrackNoiseScaleState` from this transformation's `init`; got tuple\.",
    ):
        tx.update(params, (), params, noise_scale=jg.NoiseScale(jnp.ones(1), jnp.ones(1), ("",)))
    with pytest.raises(ValueError, match=r"`decay` must be in \[0, 1\)"):
        track_noise_scale(decay=1.5)
    assert isinstance(optax.chain(tx), optax.GradientTransformationExtraArgs)


# -- one mechanism, many callers (issue 16) -----------------------------------------------


def _calls(module) -> set[str]:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    return {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}


def test_the_noise_estimates_reuse_the_accumulator_scan_and_the_pmean_all_reduce():
    import jaxgrad._accumulator as accumulator
    import jaxgrad._constructors as constructors
    import jaxgrad._noise as noise

    calls = _calls(noise)
    assert not {"jax.lax.scan", "jax.lax.psum", "GradSum"} & calls, calls  # no own scan/psum
    assert {"scan_gradients", "pmean_wide", "wide_mean", "gradient_of"} <= calls
    # placement-aware zeros are written once, in the placement module
    for module in (accumulator, constructors):
        assert "zeros_where" in _calls(module)
        assert "jnp.zeros_like" not in _calls(module)


# -- 8 CPU devices: shard_map against one device ----------------------------------------


def test_shard_map_on_8_devices_equals_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    }
    process = subprocess.run(
        [sys.executable, __file__, "--mesh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=MESH_TIMEOUT_S,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, process.stdout + process.stderr
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["devices"] == 8
    for name, gap in result["gaps"].items():
        assert gap <= 1e-5, (name, gap, result)
    # one psum carries the mean and the squared norms: the leaves (w, b) and one vector
    # (JAX binds one psum equation per operand; XLA's combiner makes them one all-reduce)
    psums = result["psums"]
    assert len(psums["pmean"]) == 2, result
    assert (
        len(psums["pmean_noise/check_vma=True"]) == len(psums["pmean_noise/check_vma=False"]) == 3
    ), result
    assert len(psums["microbatch_noise"]) == 3, result
    assert result["all_reduces"] == dict.fromkeys(
        result["all_reduces"], result["all_reduces"]["pmean"]
    ), result
    assert result["trace_cov"] > 0 and result["grad_sq"] > 0, result
    # gradients of replicated parameters (already summed over the replicas) are refused, by
    # both estimators in the same words (grad_pmean_noise gave a trace of exactly 0)
    for name, what in [("refused", "grad_fn(params, batch)"), ("pmean_refused", "grad")]:
        assert re.fullmatch(
            rf"`{re.escape(what)}` is the same on every replica along 'data': inside `shard_map` "
            r"with `check_vma=True`, `jax.grad` with respect to replicated parameters already sums "
            r"over the replicas, so the noise between them is lost\. Differentiate with respect "
            r"to `jax.lax.pcast\(params, axis_name, to='varying'\)`\.",
            result[name],
        ), result[name]
    # with check_vma=False nothing tells a summed gradient apart: no error there
    assert result["pmean_unchecked"] == "ran", result


def _relative_gap(a, b) -> float:
    a, b = (np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64) for x in (a, b))
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def mesh_main() -> None:
    """8 replicas under shard_map, against one device with the same micro-batches."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(0)
    d = 6
    x = rng.normal(size=(64, d)).astype(np.float32)
    y = (x @ rng.normal(size=d) + 0.5 * rng.normal(size=64)).astype(np.float32)
    params = {
        "w": jnp.asarray(rng.normal(size=d).astype(np.float32)),
        "b": jnp.zeros(1, jnp.bfloat16),
    }
    params = jax.device_put(params, NamedSharding(mesh, P()))

    def loss(p, batch):
        pred = batch["x"] @ p["w"] + p["b"].astype(jnp.float32)[0]
        return 0.5 * jnp.mean((pred - batch["y"]) ** 2)

    def one_device(micro):
        batches = {"x": x.reshape(micro, -1, d), "y": y.reshape(micro, -1)}
        return jax.jit(lambda p, b: jg.grad_microbatch_noise(jax.grad(loss), p, b, by="leaf"))(
            params, batches
        )

    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    gaps, all_reduces, psums = {}, {}, {}

    def compare(name, got, want):
        for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
            gaps[f"{name}/{i}"] = _relative_gap(a, b)

    def run(body, name, check_vma=True):
        smap = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=P(),
            check_vma=check_vma,
        )
        fn = jax.jit(smap)
        text = fn.lower(params, xs, ys).compile().as_text()
        all_reduces[name] = text.count(" all-reduce(") + text.count(" all-reduce-start(")
        psums[name] = [
            len(eqn.invars)
            for eqn in _equations(jax.make_jaxpr(smap)(params, xs, ys).jaxpr)
            if eqn.primitive.name.startswith("psum")
        ]
        return fn(params, xs, ys)

    def own(p):
        return jax.lax.pcast(p, "data", to="varying")

    # grad_pmean_noise: each replica's gradient of its 8 examples, == 8 micro-batches of 8
    want = one_device(8)
    for check_vma in (True, False):

        def pmean_body(p, xb, yb, check_vma=check_vma):
            g = jax.grad(loss)(own(p) if check_vma else p, {"x": xb, "y": yb})
            return jg.grad_pmean_noise(g, "data", batch_per_replica=8, by="leaf")

        got = run(pmean_body, f"pmean_noise/check_vma={check_vma}", check_vma)
        compare(f"pmean_noise/check_vma={check_vma}", got, want)

    def pmean_only(p, xb, yb):
        return jg.grad_pmean(jax.grad(loss)(own(p), {"x": xb, "y": yb}), "data")

    run(pmean_only, "pmean")

    # grad_microbatch_noise with axis_name: 2 micro-batches of 4 per replica == 16 of 4
    want = one_device(16)

    def micro_body(p, xb, yb):
        batches = {"x": xb.reshape(2, 4, d), "y": yb.reshape(2, 4)}
        return jg.grad_microbatch_noise(
            jax.grad(loss), own(p), batches, by="leaf", axis_name="data"
        )

    got = run(micro_body, "microbatch_noise")
    compare("microbatch_noise", got, want)

    def summed_body(p, xb, yb):  # replicated params: jax.grad already sums over replicas
        batches = {"x": xb.reshape(2, 4, d), "y": yb.reshape(2, 4)}
        return jg.grad_microbatch_noise(jax.grad(loss), p, batches, axis_name="data")

    def refusal(body, name, check_vma=True):
        try:
            run(body, name, check_vma)
            return "ran"
        except ValueError as error:
            return str(error)

    def summed_pmean_body(p, xb, yb):  # replicated params: the same summed gradient
        g = jax.grad(loss)(p, {"x": xb, "y": yb})
        return jg.grad_pmean_noise(g, "data", batch_per_replica=8)

    refused = refusal(summed_body, "summed")
    pmean_refused = refusal(summed_pmean_body, "summed_pmean")
    pmean_unchecked = refusal(summed_pmean_body, "summed_pmean_unchecked", check_vma=False)
    result = {
        "devices": jax.device_count(),
        "gaps": gaps,
        "all_reduces": all_reduces,
        "psums": psums,
        "grad_sq": float(want[1].grad_sq[0]),
        "trace_cov": float(want[1].trace_cov[0]),
        "refused": refused,
        "pmean_refused": pmean_refused,
        "pmean_unchecked": pmean_unchecked,
    }
    print("RESULT " + json.dumps(result))


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (shard_map, scan, pjit, cond)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


if __name__ == "__main__" and "--mesh" in sys.argv:
    mesh_main()
