import importlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import pytest
from helpers import make_tree

import jaxgrad as jg
from jaxgrad.optax import ClipWithStatsState, clip_with_stats


@pytest.mark.parametrize("max_norm", [0.5, 100.0], ids=["clips", "passes"])
def test_clip_with_stats_matches_clip_by_global_norm_in_a_chain(max_norm):
    params = make_tree("gradient")
    grads = [make_tree("gradient", seed=s) for s in (1, 2, 3)]
    ours = optax.chain(clip_with_stats(max_norm), optax.sgd(0.1, momentum=0.9))
    theirs = optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(0.1, momentum=0.9))

    @jax.jit
    def steps(params):
        p1, p2 = params, params
        s1, s2 = ours.init(params), theirs.init(params)
        norms = []
        for g in grads:
            u1, s1 = ours.update(g, s1, p1)
            u2, s2 = theirs.update(g, s2, p2)
            p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
            norms.append(otu.tree_get(s1, "clip_stats").norm)
        return p1, p2, s1, norms

    p1, p2, state, norms = steps(params)
    chex.assert_trees_all_close(p1, p2, rtol=1e-6)  # the norms agree to float32 rounding
    assert isinstance(state[0], ClipWithStatsState) and isinstance(
        state[0].clip_stats, jg.ClipStats
    )
    np.testing.assert_allclose(norms, [jg.grad_norm(g) for g in grads], rtol=1e-6)
    assert bool(state[0].clip_stats.clipped) is bool(jg.grad_norm(grads[-1]) > max_norm)


def test_init_state_has_the_update_state_structure_for_scan():
    tx = clip_with_stats(1.0)
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    state = tx.init(params)
    chex.assert_trees_all_equal(
        state,
        ClipWithStatsState(
            jg.ClipStats(
                jnp.float32(0), jnp.float32(0), jnp.float32(1), jnp.bool_(False), jnp.bool_(True)
            )
        ),
    )

    def body(state, g):
        updates, state = tx.update({"w": g}, state)
        return state, updates["w"]

    gs = jnp.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.5]], jnp.bfloat16)
    last, updates = jax.jit(lambda s: jax.lax.scan(body, s, gs))(state)
    chex.assert_trees_all_equal_shapes_and_dtypes(last, state)
    assert float(last.clip_stats.norm) == 0.5 and not bool(last.clip_stats.clipped)
    np.testing.assert_allclose(
        np.asarray(updates, np.float32), [[0.6, 0.8, 0.0], [0.0, 0.0, 0.5]], rtol=1e-2
    )


def test_zero_update_with_zero_bound_and_nonfinite_updates():
    tx = clip_with_stats(0.0)
    zeros = {"w": jnp.zeros(2)}
    updates, state = tx.update(zeros, tx.init(zeros))
    chex.assert_trees_all_equal(updates, zeros)
    bad = {"w": jnp.array([jnp.nan, 1.0])}
    updates, state = clip_with_stats(1.0).update(bad, state)
    chex.assert_trees_all_equal(updates, bad)  # passed on, for apply_if_finite to skip
    assert not bool(state.clip_stats.finite) and np.isnan(state.clip_stats.norm)


def test_bad_max_norm_is_rejected_when_the_transformation_is_built():
    with pytest.raises(ValueError, match="`max_norm` must be a non-negative number; got -1"):
        clip_with_stats(-1)


def test_import_jaxgrad_does_not_import_optax():
    code = "import sys, jaxgrad; assert 'optax' not in sys.modules, 'optax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_optax_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "optax", None)  # `import optax` now raises ImportError
    monkeypatch.delitem(sys.modules, "jaxgrad.optax")
    with pytest.raises(
        ImportError,
        match=r'`pip install optax` \(or, from a jaxgrad checkout, `pip install "\.\[optax\]"`',
    ):
        importlib.import_module("jaxgrad.optax")


def _with_nan(tree):
    leaves, treedef = jax.tree.flatten(tree)
    leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(jnp.nan)
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("placement", ["clip inside apply_if_finite", "clip before it"])
def test_a_nan_step_is_a_real_skip_with_apply_if_finite(placement):
    """After a NaN gradient, parameters and adam's moments and count are bit-identical."""
    inner = optax.adamw(1e-2, weight_decay=0.1)
    if placement == "clip inside apply_if_finite":
        tx = optax.apply_if_finite(optax.chain(clip_with_stats(1.0), inner), 5)
    else:
        tx = optax.chain(clip_with_stats(1.0), optax.apply_if_finite(inner, 5))

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = make_tree("gradient")
    with jax.numpy_dtype_promotion("standard"):
        params, state = step(params, tx.init(params), make_tree("gradient", seed=1))
        after, state_after = step(params, state, _with_nan(make_tree("gradient", seed=2)))
    chex.assert_trees_all_equal(after, params)
    for name in ("mu", "nu", "count"):
        chex.assert_trees_all_equal(otu.tree_get(state_after, name), otu.tree_get(state, name))
    assert int(otu.tree_get(state_after, "notfinite_count")) == 1  # the bad step is on record


def test_state_dtypes_follow_params_under_x64_in_a_scan():
    tx = clip_with_stats(1.0, by="leaf")
    with jax.enable_x64(True):
        params = {"w": jnp.ones(3, jnp.float64), "b": jnp.ones(2, jnp.float64)}
        state = tx.init(params)

        def body(state, g):
            updates, state = tx.update({"w": g[:3], "b": g[3:]}, state)
            return state, updates["w"]

        gs = jnp.ones((2, 5), jnp.float32)  # float32 updates for float64 params
        last, _ = jax.lax.scan(body, state, gs)
        chex.assert_trees_all_equal_shapes_and_dtypes(last, state)
        groups = last.clip_stats.groups
        assert groups is not None and groups.names == ("", "b", "w")


def test_clip_with_stats_by_leaf_logs_per_leaf_stats():
    tx = clip_with_stats(1.0, by="leaf")
    params = {"a": jnp.ones(2), "b": jnp.zeros(3)}
    state = tx.init(params)
    _, state = tx.update({"a": jnp.array([3.0, 4.0]), "b": jnp.zeros(3)}, state)
    logs = state.as_dict()
    assert logs["norm/a"] == 5.0 and logs["norm/b"] == 0.0 and logs["clipped"] is True


# -- issue 18 items 11 and 14: a stateless call, a lookup that works under nnx.Optimizer ---


@pytest.mark.parametrize("by", [None, "leaf"])
def test_update_with_state_none_is_accepted_like_clip_by_global_norm(by):
    grads = make_tree("nested")
    ours, state = clip_with_stats(0.5, by=by).update(grads, None)  # was a raw structure error
    theirs, _ = optax.clip_by_global_norm(0.5).update(grads, None)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6)
    assert isinstance(state, ClipWithStatsState)
    np.testing.assert_allclose(state.clip_stats.norm, jg.grad_norm(grads), rtol=1e-6)
    with pytest.raises(
        TypeError,
        match=r"`state` must be the `ClipWithStatsState` from this transformation's `init` "
        r"\(or None\); got tuple\.",
    ):
        clip_with_stats(0.5).update(grads, ())


@pytest.mark.parametrize("by", [None, "leaf"])
@pytest.mark.parametrize("wrap", [False, True], ids=["chain", "apply_if_finite"])
def test_the_documented_lookup_works_in_optax_and_under_nnx_optimizer(by, wrap):
    from flax import nnx

    def tx():
        inner = optax.chain(clip_with_stats(1.0, by=by), optax.adam(1e-2))
        return optax.apply_if_finite(inner, 3) if wrap else inner

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3))) ** 2))(model)
    with jax.numpy_dtype_promotion("standard"):
        optimizer.update(model, grads)
        plain = tx()
        params = nnx.state(model, nnx.Param)
        _, plain_state = plain.update(grads, plain.init(params), params)
    want = float(jg.grad_norm(grads))
    # "norm" was ambiguous under nnx.state(optimizer): KeyError "Found multiple values"
    found = [
        otu.tree_get(plain_state, "clip_stats").norm,
        otu.tree_get(optimizer.opt_state, "clip_stats").norm[...],
        otu.tree_get(nnx.state(optimizer), "clip_stats")["norm"][...],
    ]
    np.testing.assert_allclose([float(x) for x in found], want, rtol=1e-6)
    logs = otu.tree_get(plain_state, "clip_stats").as_dict()
    assert logs["norm"] == pytest.approx(want, rel=1e-6)
    if by == "leaf":
        assert {"norm/kernel", "norm/bias"} <= set(logs)
