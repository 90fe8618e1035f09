"""The spike guard: `spike_init`, `spike_check`, `keep_if_skipped`, `jaxgrad.optax.spike_guard`.

Three NumPy oracles, written from the published descriptions of the guards (not from
their code), are run next to jaxgrad on a 400-step synthetic trace with injected x10
spikes: a windowed z-score guard (OLMo-core, MaxText), a moving-average guard (axlearn)
and ZClip's clipping rule. Then the known failure modes of those guards, each on its own
synthetic trace, against jaxgrad's defaults; bit-identical skips for optax and Flax; the
exported CUDA module without a conditional; and 8 host devices under `shard_map`.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import data_dependent_conditionals

import jaxgrad as jg
from jaxgrad.optax import spike_guard

ROOT = Path(__file__).resolve().parent.parent
STEPS = 400


# -- synthetic traces ----------------------------------------------------------------------------


def make_trace(seed: int = 0, steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
    """A decaying, noisy gradient norm and loss, with x10 spikes at fixed steps."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    norms = (1.0 + 0.5 * np.exp(-t / 100)) * np.exp(0.05 * rng.standard_normal(steps))
    losses = (2.0 + 3.0 * np.exp(-t / 150)) * np.exp(0.02 * rng.standard_normal(steps))
    for step in (20, 90, 160, 161, 240, 320, 390):
        norms[step] *= 10
    for step in (200, 280, 320):
        losses[step] *= 10
    return norms.astype(np.float32), losses.astype(np.float32)


def run_guard(state, norms, losses=None):
    """`spike_check` over a trace under `lax.scan` (the state as carry): decisions stacked."""

    def step(state, xs):
        norm, loss = xs
        decision, state = jg.spike_check(state, norm, loss=loss if state.config.loss else None)
        return state, decision

    losses = np.zeros(len(norms), np.float32) if losses is None else losses
    xs = (jnp.asarray(norms, jnp.float32), jnp.asarray(losses, jnp.float32))
    return jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(state, xs)


# -- oracles, from the published descriptions ----------------------------------------------------


def windowed_oracle(values, *, window, z, warmup):
    """A windowed z-score guard as OLMo-core and MaxText describe theirs.

    Every value (outliers, and NaN too) enters a window of the last `window` values;
    once the window holds `warmup` values, a step is kept only while `value - mean <=
    z * std` for every watched series (population std of the window, before the step).
    `values`: (steps, series). Returns the skip flags and thresholds (steps, series).
    """
    values = np.asarray(values, np.float64)
    steps, series = values.shape
    skips = np.zeros(steps, bool)
    thresholds = np.full((steps, series), np.inf)
    history: list[np.ndarray] = []
    for t in range(steps):
        if len(history) >= warmup:
            past = np.array(history[-window:])
            mean, std = past.mean(axis=0), past.std(axis=0)
            thresholds[t] = mean + z * std
            skips[t] = not np.all(values[t] - mean <= z * std)
        history.append(values[t])
    return skips, thresholds


def ema_oracle(norms, *, decay, z, min_count):
    """A moving-average guard as axlearn describes its drop-norm statistics.

    Bias-corrected moving averages of the norm and its square over the accepted steps;
    after `min_count` accepted steps a step whose norm exceeds `mean + z * std` (or is
    not finite) is dropped and leaves the averages as they were.
    """
    m1 = m2 = 0.0
    count = 0
    skips = np.zeros(len(norms), bool)
    thresholds = np.full(len(norms), np.inf)
    for t, g in enumerate(np.asarray(norms, np.float64)):
        if count >= min_count:
            c = 1 - decay**count
            mean = m1 / c
            std = np.sqrt(max(m2 / c - mean**2, 0.0))
            thresholds[t] = mean + z * std
        skips[t] = not np.isfinite(g) or g > thresholds[t]
        if not skips[t]:
            m1 = decay * m1 + (1 - decay) * g
            m2 = decay * m2 + (1 - decay) * g**2
            count += 1
    return skips, thresholds


def zclip_oracle(norms, *, alpha, z, warmup):
    """ZClip (Kumar et al., 2025) as its paper describes it, adaptive-scaling rule.

    The first `warmup` norms set the mean and (population) variance; after that a norm
    whose z-score exceeds `z` is clipped to `mean + z**2 * std / zscore` (continuous at
    the threshold, lower the further out), and the moving averages are updated with the
    clipped norm: `mean = a * mean + (1 - a) * g`, then `var = a * var + (1 - a) *
    (g - mean)**2` with the new mean.
    """
    mean = var = 0.0
    seen: list[float] = []
    scales = np.ones(len(norms))
    thresholds = np.full(len(norms), np.inf)
    for t, g in enumerate(np.asarray(norms, np.float64)):
        if len(seen) < warmup:
            seen.append(g)
            if len(seen) == warmup:
                mean, var = float(np.mean(seen)), float(np.var(seen))
            continue
        std = np.sqrt(var)
        thresholds[t] = mean + z * std
        score = (g - mean) / std
        if score > z:
            clipped = mean + z**2 * std / score
            scales[t] = clipped / g
            g = clipped
        mean = alpha * mean + (1 - alpha) * g
        var = alpha * var + (1 - alpha) * (g - mean) ** 2
    return scales, thresholds


def assert_thresholds(got, expected, rtol):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=rtol)


# -- against the oracles -------------------------------------------------------------------------


def test_windowed_guard_matches_the_windowed_oracle():
    norms, losses = make_trace()
    skips, thresholds = windowed_oracle(np.stack([norms, losses], 1), window=128, z=6, warmup=64)
    state = jg.spike_init(window=128, warmup=64, z=6, admit="all", patience=None, loss=True)
    final, decisions = run_guard(state, norms, losses)
    np.testing.assert_array_equal(decisions.skipped, skips)
    assert_thresholds(decisions.threshold, thresholds, rtol=1e-6)
    assert skips.sum() >= 6 and int(final.skips) == skips.sum() and int(final.steps) == STEPS


def test_ema_guard_matches_the_ema_oracle():
    norms, _ = make_trace()
    skips, thresholds = ema_oracle(norms, decay=0.95, z=6, min_count=30)
    state = jg.spike_init(statistics="ema", decay=0.95, z=6, warmup=30, patience=None)
    _, decisions = run_guard(state, norms)
    np.testing.assert_array_equal(decisions.skipped, skips)
    assert_thresholds(decisions.threshold[:, 0], thresholds, rtol=1e-6)
    assert skips.sum() == 6  # every spike after the warm-up, nothing else


def test_zclip_mode_matches_zclip():
    norms, _ = make_trace()
    scales, thresholds = zclip_oracle(norms, alpha=0.97, z=2.5, warmup=25)
    state = jg.spike_init(
        statistics="zclip",
        decay=0.97,
        z=2.5,
        warmup=25,
        mode="clip_reciprocal",
        admit="scaled",
        patience=None,
    )
    final, decisions = run_guard(state, norms)
    np.testing.assert_array_equal(decisions.clipped, scales < 1)
    assert not np.any(decisions.skipped)
    assert_thresholds(decisions.threshold[:, 0], thresholds, rtol=1e-6)
    np.testing.assert_allclose(decisions.scale, scales, rtol=1e-5)
    assert int(final.clips) == np.sum(scales < 1) >= 6


def test_the_oracle_decisions_are_not_borderline():
    """The exact comparisons above mean something: no decision is within 1e-4 of the edge."""
    norms, losses = make_trace()
    _, thresholds = windowed_oracle(np.stack([norms, losses], 1), window=128, z=6, warmup=64)
    for got, edge in [
        (norms, thresholds[:, 0]),
        (losses, thresholds[:, 1]),
        (norms, ema_oracle(norms, decay=0.95, z=6, min_count=30)[1]),
        (norms, zclip_oracle(norms, alpha=0.97, z=2.5, warmup=25)[1]),
    ]:
        finite = np.isfinite(edge)
        assert np.all(np.abs(got[finite] - edge[finite]) > 1e-4 * edge[finite])


# -- the known failure modes, against a windowed z-score guard -----------------------------------


def quiet_trace(steps=STEPS, seed=1):
    rng = np.random.default_rng(seed)
    return (1.0 + 0.05 * rng.standard_normal(steps)).astype(np.float32)


def test_a_nan_stays_out_of_the_statistics():
    norms = quiet_trace()
    norms[150] = np.nan
    reference, _ = windowed_oracle(norms[:, None], window=128, z=6, warmup=64)
    assert reference[150:279].all() and reference.sum() == 129  # until it leaves the window
    _, decisions = run_guard(jg.spike_init(), norms)
    np.testing.assert_array_equal(np.flatnonzero(decisions.skipped), [150])
    assert not decisions.finite[150] and np.all(np.isfinite(decisions.threshold[151:, 0]))


def test_two_adjacent_spikes_are_both_caught():
    norms = quiet_trace()
    norms[200], norms[201] = 20.0, 8.0
    reference, _ = windowed_oracle(norms[:, None], window=128, z=6, warmup=64)
    assert reference[200] and not reference[201]  # the first inflates the window's std
    _, decisions = run_guard(jg.spike_init(), norms)
    np.testing.assert_array_equal(np.flatnonzero(decisions.skipped), [200, 201])


@pytest.mark.parametrize("mode", ["skip", "clip"])
def test_a_lasting_level_shift_costs_at_most_patience_steps(mode):
    norms = quiet_trace()
    norms[200:] *= 3
    ema_skips, _ = ema_oracle(norms, decay=0.99, z=6, min_count=32)
    assert ema_skips[200:].all()  # statistics that exclude outliers never adapt
    window_skips, _ = windowed_oracle(norms[:, None], window=128, z=6, warmup=64)
    state = jg.spike_init(mode=mode)  # patience 8
    final, decisions = run_guard(state, norms)
    acted = np.asarray(decisions.skipped | decisions.clipped)
    np.testing.assert_array_equal(np.flatnonzero(acted), np.arange(200, 208))
    assert int(final.skips + final.clips) == 8 <= window_skips.sum() + 8
    assert decisions.threshold[-1, 0] > 3.0  # the baseline moved to the new level


def test_the_guard_watches_the_norm_before_the_clip():
    """Norms always above `max_norm`: after the clip every norm is 1, so a spike is invisible."""
    norms = 5 * quiet_trace(120)
    norms[100] *= 10
    after_clip = np.minimum(norms, 1.0)
    reference, _ = windowed_oracle(after_clip[:, None], window=128, z=6, warmup=64)
    assert not reference.any()
    tx = spike_guard(optax.sgd(0.1), max_norm=1.0)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    skipped = []
    for g in norms:
        updates, state = update({"w": jnp.full(4, g / 2)}, state, params)
        skipped.append(bool(optax.tree_utils.tree_get(state, "spike_guard").last.skipped))
        if not skipped[-1]:
            np.testing.assert_allclose(np.linalg.norm(updates["w"]), 0.1, rtol=1e-5)
    assert np.flatnonzero(skipped).tolist() == [100]


# -- the decision itself -------------------------------------------------------------------------


def test_warmup_and_the_statistics_before_the_step(maybe_jit):
    state = jg.spike_init(window=16, warmup=3)
    check = maybe_jit(lambda s, n: jg.spike_check(s, n))
    history = []
    for norm in [1.0, 1.2, 1.1, 1.15, 9.0]:
        decision, state = check(state, jnp.asarray(norm))
        if len(history) >= 3:
            expected = np.mean(history) + 6 * np.std(history)
            np.testing.assert_allclose(decision.threshold[0], expected, rtol=1e-6)
        else:
            assert decision.threshold[0] == np.inf and not decision.skipped
        if not decision.skipped:
            history.append(norm)
    assert bool(decision.skipped) and history == [1.0, 1.2, 1.1, 1.15]
    logs = state.as_dict()
    assert logs["steps"] == 5 and logs["skips"] == 1 and logs["clips"] == 0
    assert logs["skipped"] is True and logs["norm"] == 9.0 and logs["zscore"] > 6


@pytest.mark.parametrize("mode", ["clip", "clip_reciprocal"])
def test_clip_modes_scale_to_the_threshold(mode):
    state = jg.spike_init(window=16, warmup=4, mode=mode)
    for norm in [1.0, 1.2, 1.1, 0.9]:
        _, state = jg.spike_check(state, jnp.asarray(norm))
    decision, state = jg.spike_check(state, jnp.asarray(20.0))
    mean, std = np.mean([1.0, 1.2, 1.1, 0.9]), np.std([1.0, 1.2, 1.1, 0.9])
    score = (20.0 - mean) / std
    target = mean + 6 * std if mode == "clip" else mean + 36 * std / score
    assert bool(decision.clipped) and not bool(decision.skipped)
    np.testing.assert_allclose(20.0 * decision.scale, target, rtol=1e-5)
    assert int(state.clips) == 1


def test_a_loss_spike_is_skipped_even_in_clip_mode():
    state = jg.spike_init(window=16, warmup=4, mode="clip", loss=True)
    for norm, loss in [(1.0, 2.0), (1.1, 2.1), (0.9, 1.9), (1.0, 2.0)]:
        _, state = jg.spike_check(state, jnp.asarray(norm), loss=jnp.asarray(loss))
    decision, state = jg.spike_check(state, jnp.asarray(1.0), loss=jnp.asarray(20.0))
    assert bool(decision.skipped) and not bool(decision.clipped)
    assert decision.outlier.tolist() == [False, True]
    logs = decision.as_dict(prefix="spike/")
    assert logs["spike/loss"] == 20.0 and logs["spike/threshold/loss"] < 3
    decision, _ = jg.spike_check(state, jnp.asarray(1.0), loss=jnp.asarray(jnp.inf))
    assert bool(decision.skipped) and not bool(decision.finite)


def grouped_grads(scale_w=1.0, scale_b=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(scale_w * (1 + 0.05 * rng.standard_normal((3, 4))), jnp.float32),
        "b": jnp.asarray(scale_b * (0.01 + 0.0005 * rng.standard_normal(4)), jnp.float32),
    }


@pytest.mark.parametrize("source", ["grad_stats", "grad_clip", "array"])
def test_a_spike_in_one_group_triggers(source):
    grads = grouped_grads()
    state = jg.spike_init(grads, by="leaf", window=32, warmup=8)
    assert state.names == ("", "b", "w")

    def norms(g):
        if source == "grad_stats":
            return jg.grad_stats(g, by="leaf")
        if source == "grad_clip":
            return jg.grad_clip(g, 1e9, by="leaf")[1]
        return jg.grad_stats(g, by="leaf").norm

    for seed in range(10):
        _, state = jg.spike_check(state, norms(grouped_grads(seed=seed)))
    # the bias is tiny: x20 in it barely moves the whole norm, but its own group spikes
    decision, _ = jg.spike_check(state, norms(grouped_grads(scale_b=20.0, seed=11)))
    assert decision.outlier.tolist() == [False, True, False] and bool(decision.skipped)
    assert set(decision.as_dict()) >= {"norm/b", "zscore/w", "threshold/b"}
    # with `watch`, only the whole gradient can trigger
    watched = jg.spike_init(grads, by="leaf", window=32, warmup=8, watch=[""])
    for seed in range(10):
        _, watched = jg.spike_check(watched, norms(grouped_grads(seed=seed)))
    decision, _ = jg.spike_check(watched, norms(grouped_grads(scale_b=20.0, seed=11)))
    assert not decision.outlier.any() and not bool(decision.skipped)


@pytest.mark.parametrize("statistics", ["window", "ema", "zclip"])
def test_the_state_is_a_fixed_shape_scan_carry(statistics):
    norms, losses = make_trace()
    state = jg.spike_init(statistics=statistics, loss=True)
    final, decisions = run_guard(state, norms, losses)
    assert jax.tree.structure(final) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(state), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert decisions.skipped.shape == (STEPS,) and decisions.threshold.shape == (STEPS, 2)
    # the same as a Python loop of eager calls
    loop = state
    for norm, loss in zip(norms[:60], losses[:60], strict=True):
        decision, loop = jg.spike_check(loop, jnp.asarray(norm), loss=jnp.asarray(loss))
    head, _ = run_guard(state, norms[:60], losses[:60])
    for a, b in zip(jax.tree.leaves(loop), jax.tree.leaves(head), strict=True):
        np.testing.assert_array_equal(a, b)
    stacked = decisions.as_dict()
    assert stacked["skipped"].shape == (STEPS,) and stacked["threshold/loss"].shape == (STEPS,)


def test_the_state_can_be_donated():
    state = jg.spike_init(window=16, warmup=2)
    step = jax.jit(lambda s, n: jg.spike_check(s, n)[1], donate_argnums=0)
    for norm in [1.0, 1.1, 1.2]:
        state = step(state, jnp.asarray(norm))
    assert int(state.steps) == 3


def test_bfloat16_norms_are_read_in_float32():
    state = jg.spike_init()
    decision, state = jg.spike_check(state, jnp.asarray(3.0, jnp.bfloat16))
    assert decision.value.dtype == jnp.float32 and state.moment1.dtype == jnp.float32


# -- argument errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"statistics": "median"}, ValueError, r"`statistics` must be one of"),
        ({"mode": "drop"}, ValueError, r"`mode` must be one of"),
        ({"window": 0}, ValueError, r"`window` must be at least 1; got 0"),
        ({"window": 2.5}, TypeError, r"`window` must be an int"),
        ({"warmup": 200}, ValueError, r"`warmup` must be at most `window`"),
        ({"patience": 200}, ValueError, r"`patience` must be below `window`"),
        ({"decay": 1.0}, ValueError, r"`decay` must be in \(0, 1\)"),
        ({"z": -1}, ValueError, r"`z` must be a positive finite number"),
        ({"watch": "loss"}, TypeError, r"`watch` must be a sequence"),
        ({"watch": ["nope"]}, ValueError, r"`watch` must name entries"),
        ({"by": "leaf"}, TypeError, r"needs `params`"),
    ],
)
def test_settings_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        jg.spike_init(**kwargs)


def test_norms_and_loss_are_checked():
    state = jg.spike_init({"w": jnp.zeros(2), "b": jnp.zeros(1)}, by="leaf")
    with pytest.raises(ValueError, match=r"the guard has \['', 'b', 'w'\], `norms` has \[''\]"):
        jg.spike_check(state, jg.grad_stats({"w": jnp.zeros(2), "b": jnp.zeros(1)}, by=None))
    with pytest.raises(ValueError, match=r"one norm per entry .* got shape \(2,\)"):
        jg.spike_check(state, jnp.zeros(2))
    with pytest.raises(TypeError, match=r"does not watch the loss"):
        jg.spike_check(state, jnp.zeros(3), loss=1.0)
    with pytest.raises(TypeError, match=r"pass the step's loss"):
        jg.spike_check(jg.spike_init(loss=True), jnp.asarray(1.0))
    with pytest.raises(TypeError, match=r"`state` must be a `SpikeState`"):
        jg.spike_check({"steps": 0}, jnp.asarray(1.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`SpikeDecision.as_dict` reads the values on the host"):
        jax.jit(lambda s: jg.spike_check(s, jnp.asarray(1.0))[0].as_dict())(jg.spike_init())


def test_keep_if_skipped():
    new, old = {"a": jnp.ones(2), "n": jnp.asarray(3)}, {"a": jnp.zeros(2), "n": jnp.asarray(2)}
    kept = jg.keep_if_skipped(jnp.asarray(True), new, old)
    assert kept["a"].tolist() == [0.0, 0.0] and int(kept["n"]) == 2
    taken = jax.jit(jg.keep_if_skipped)(jnp.asarray(False), new, old)
    assert taken["a"].tolist() == [1.0, 1.0] and int(taken["n"]) == 3
    with pytest.raises(ValueError, match=r"`new` and `old` must have the same structure"):
        jg.keep_if_skipped(jnp.asarray(True), new, {"a": jnp.zeros(2)})


# -- optax: bit-identical skips ------------------------------------------------------------------


def bits(tree):
    """Every leaf's bytes (PRNG keys by their key data)."""
    leaves = jax.tree.leaves(tree)
    return [
        np.asarray(
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        ).tobytes()
        for x in leaves
    ]


@pytest.fixture(params=["cpu-conditional", "select"])
def skip_form(request, monkeypatch):
    """The guard's two forms of a skip: a conditional on CPU, a select elsewhere (GPU,
    TPU), which this CPU-only suite reaches by making `platform_dependent` take its
    default branch."""
    if request.param == "select":

        def default_only(*args, default, **_):
            return default(*args)

        monkeypatch.setattr(jax.lax, "platform_dependent", default_only)
    return request.param


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_a_skipped_step_leaves_adamw_and_the_params_bit_identical(maybe_jit, dtype, skip_form):
    tx = spike_guard(optax.adamw(1e-2), max_norm=1.0, window=32, warmup=8, loss=True)
    params = {"w": jnp.ones((3, 4), dtype), "b": jnp.zeros(4, dtype)}
    state = tx.init(params)
    update = maybe_jit(tx.update)
    rng = np.random.default_rng(0)

    def grads(scale):
        return jax.tree.map(
            lambda p: jnp.asarray(scale * rng.normal(1, 0.05, p.shape), dtype), params
        )

    for _ in range(12):
        with jax.numpy_dtype_promotion("standard"):  # optax's adamw needs it
            updates, state = update(grads(1.0), state, params, loss=jnp.asarray(2.0))
        params = optax.apply_updates(params, updates)
    for bad, loss in [(grads(50.0), 2.0), (grads(1.0), 40.0), (grads(jnp.nan), 2.0)]:
        before_params, before_inner = bits(params), bits(state.inner_state)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = update(bad, state, params, loss=jnp.asarray(loss))
        new_params = optax.apply_updates(params, updates)
        guard = optax.tree_utils.tree_get(state, "spike_guard")
        assert bool(guard.last.skipped)
        assert bits(new_params) == before_params and bits(state.inner_state) == before_inner
        assert all(x.dtype == dtype for x in jax.tree.leaves(new_params))
    adam = state.inner_state[0]
    assert int(adam.count) == 12 and optax.tree_utils.tree_get(state, "count") == 12
    assert guard.as_dict()["skips"] == 3 and guard.as_dict()["steps"] == 15


def test_an_inner_that_changes_the_dtype_is_skipped_in_its_dtype(skip_form):
    to_bf16 = optax.stateless(lambda u, p=None: jax.tree.map(lambda x: x.astype(jnp.bfloat16), u))
    tx = spike_guard(optax.chain(optax.adamw(1e-2), to_bf16), warmup=2, window=8, patience=2)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for scale in [1.0, 1.1, 0.9, 100.0]:
        with jax.numpy_dtype_promotion("standard"):  # optax's adamw needs it
            updates, state = update({"w": jnp.full(3, scale)}, state, params)
        assert updates["w"].dtype == jnp.bfloat16
    assert int(state.spike_guard.skips) == 1 and not updates["w"].any()


def test_an_inner_whose_updates_change_structure_is_skipped(skip_form):
    """`optax.lookahead` takes the fast parameters' updates and returns `LookaheadParams`."""
    tx = spike_guard(optax.lookahead(optax.sgd(0.1), 2, 0.5), warmup=2, window=8, patience=2)
    params = optax.LookaheadParams.init_synced({"w": jnp.ones(3)})
    state = tx.init(params)
    update = jax.jit(tx.update)
    for scale in [1.0, 1.1, 0.9, 100.0]:
        before = bits(state.inner_state)
        with jax.numpy_dtype_promotion("standard"):  # optax's lookahead needs it
            updates, state = update({"w": jnp.full(3, scale)}, state, params)
        assert isinstance(updates, optax.LookaheadParams)
    assert int(state.spike_guard.skips) == 1
    assert not updates.fast["w"].any() and not updates.slow["w"].any()
    assert bits(state.inner_state) == before


def test_vmapped_guards_decide_each_for_itself(maybe_jit, skip_form):
    tx = spike_guard(optax.sgd(0.1), warmup=2, window=8, patience=2)
    params = {"w": jnp.ones(3)}
    state = jax.tree.map(lambda x: jnp.stack([x, x]), tx.init(params))
    update = maybe_jit(jax.vmap(lambda g, s: tx.update(g, s, params)))
    for scale in [(1.0, 1.0), (1.1, 1.1), (0.9, 0.9), (1.0, 100.0)]:
        grads = {"w": jnp.stack([jnp.full(3, x) for x in scale])}
        updates, state = update(grads, state)
    np.testing.assert_array_equal(updates["w"], np.float32([[-0.1] * 3, [0.0] * 3]))
    assert state.spike_guard.skips.tolist() == [0, 1]


def test_optax_chain_hands_the_loss_to_the_guard():
    tx = optax.chain(optax.identity(), spike_guard(optax.sgd(0.1), loss=True, warmup=2))
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones(2)}, state, params, loss=jnp.asarray(1.0))
    guard = optax.tree_utils.tree_get(state, "spike_guard")
    assert guard.as_dict()["loss"] == 1.0 and isinstance(guard, jg.SpikeState)
    assert isinstance(optax.tree_utils.tree_get(state, "SpikeGuardState"), jg.SpikeGuardState)


def test_clip_mode_in_optax_scales_the_update():
    tx = spike_guard(optax.sgd(1.0), mode="clip", window=16, warmup=4)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    for g in [1.0, 1.1, 0.9, 1.0]:
        _, state = tx.update({"w": jnp.full(4, g / 2)}, state, params)
    updates, state = tx.update({"w": jnp.full(4, 10.0)}, state, params)
    decision = optax.tree_utils.tree_get(state, "spike_guard").last
    assert bool(decision.clipped)
    np.testing.assert_allclose(np.linalg.norm(updates["w"]), decision.threshold[0], rtol=1e-6)


# -- Flax: BatchNorm, dropout and the optimizer kept on a skipped step ---------------------------


def test_flax_batchnorm_state_is_kept_on_a_skipped_step():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(4, 8, rngs=rngs)
            self.norm = nnx.BatchNorm(8, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)
            self.head = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            return self.head(self.drop(nnx.relu(self.norm(self.linear(x)))))

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer, guard, x, y):
        before = nnx.clone(nnx.state((model, optimizer)))
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        grads, stats = jg.grad_clip(grads, 1.0, by="leaf")
        decision, guard = jg.spike_check(guard, stats, loss=loss)
        optimizer.update(model, grads)
        after = nnx.state((model, optimizer))
        nnx.update((model, optimizer), jg.keep_if_skipped(decision, after, before))
        return guard

    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    guard = jg.spike_init(nnx.state(model, nnx.Param), by="leaf", window=16, warmup=4, loss=True)
    x = jax.random.normal(jax.random.key(1), (16, 4))
    y = jnp.sum(x, axis=1, keepdims=True)
    with jax.numpy_dtype_promotion("standard"):
        for i in range(6):
            guard = train_step(model, optimizer, guard, x + 0.01 * i, y)
        assert not bool(guard.last.skipped)
        for bad_x, bad_y in [(x.at[0, 0].set(jnp.nan), y), (x, 100.0 * y)]:
            snapshot = bits(nnx.state((model, optimizer)))
            guard = train_step(model, optimizer, guard, bad_x, bad_y)
            assert bool(guard.last.skipped)
            assert bits(nnx.state((model, optimizer))) == snapshot  # BatchStat, RNG, adam
        assert int(guard.skips) == 2


# -- no conditional on the step's path -----------------------------------------------------------


def test_the_exported_cuda_module_has_no_conditional():
    """The whole guarded step (`spike_guard` around adamw, per-leaf norms, the loss
    watched, `keep_if_skipped` for the rest) exported for CUDA: selects only."""
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    tx = spike_guard(optax.adamw(1e-3), max_norm=1.0, by="leaf", loss=True)
    state = tx.init(params)

    def step(params, state, grads, loss):
        updates, new_state = tx.update(grads, state, params, loss=loss)
        decision = optax.tree_utils.tree_get(new_state, "spike_guard").last
        new_params = optax.apply_updates(params, updates)
        return jg.keep_if_skipped(decision, new_params, params), new_state

    args = (params, state, params, jnp.asarray(1.0))
    with jax.numpy_dtype_promotion("standard"):
        cuda = jax.export.export(jax.jit(step), platforms=["cuda"])(*args).mlir_module()
        cpu = jax.export.export(jax.jit(step), platforms=["cpu"])(*args).mlir_module()
    assert data_dependent_conditionals(cuda) == []
    assert "stablehlo.select" in cuda
    assert data_dependent_conditionals(cpu) != []  # CPU: the cheaper conditional


def test_a_donated_guarded_step_on_cpu_does_not_copy_the_optimizer_state():
    """With the state donated, a select that keeps the old moments makes XLA's CPU
    backend copy each of them before the step (1.3x the optax-clip train step); the
    conditional does not. Read from the compiled HLO: no copy of a moment."""
    params = {f"w{i}": jnp.ones((64, 32)) for i in range(4)}
    tx = spike_guard(optax.adamw(1e-3), max_norm=1.0, by="leaf")

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    with jax.numpy_dtype_promotion("standard"):
        compiled = (
            jax.jit(step, donate_argnums=(0, 1))
            .lower(params, tx.init(params), params)
            .compile()
            .as_text()
        )
    entry = compiled[compiled.index("\nENTRY") :]
    copies = re.findall(r"= (\S+) copy\(", entry)
    assert not [c for c in copies if c.startswith("f32[64,32]")], copies


# -- 8 host devices under shard_map --------------------------------------------------------------

MESH_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jaxgrad as jg
    from jaxgrad.optax import spike_guard

    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("d",))
    rng = np.random.default_rng(0)
    steps = 80
    scale = 1 + 0.05 * rng.standard_normal(steps)
    scale[[50, 51, 65]] *= 10
    grads = rng.normal(size=(steps, 64)) * scale[:, None]        # sharded along the vector
    losses = rng.normal(2.0, 0.02, size=(steps, 8))              # one loss per replica
    losses[70, 3] = 200.0                                        # one replica's loss spikes
    kwargs = dict(window=32, warmup=8, loss=True)
    tx = spike_guard(optax.sgd(0.1), axis_name="d", **kwargs)

    def per_replica(g, loss):
        params = {"w": jnp.zeros(g.shape[1:], jnp.float32)}
        state = tx.init(params)
        def body(state, xs):
            g, loss = xs
            _, state = tx.update({"w": g}, state, params, loss=loss[0])
            return state, optax.tree_utils.tree_get(state, "spike_guard").last.skipped
        _, skipped = jax.lax.scan(body, state, (g, loss))
        return skipped[None]

    spec = P(None, "d")
    run = jax.jit(jax.shard_map(per_replica, mesh=mesh, in_specs=(spec, spec), out_specs=P("d"),
                                check_vma=False))
    put = lambda x: jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, spec))
    skipped = np.asarray(run(put(grads), put(losses)))
    single = jg.spike_init(**kwargs)
    expected = []
    for g, loss in zip(grads, losses.mean(axis=1)):
        d, single = jg.spike_check(single, jnp.asarray(np.linalg.norm(g), jnp.float32),
                                   loss=jnp.asarray(loss, jnp.float32))
        expected.append(bool(d.skipped))

    # check_vma=True, adamw: replicated parameters, gradients that vary along "d" (the
    # kept branch of a skip must vary like the taken one)
    tx2 = spike_guard(optax.adamw(0.1), axis_name="d", window=16, warmup=2)
    def one(g):
        params = {"w": jnp.zeros(g.shape[1:], jnp.float32)}
        updates, _ = tx2.update({"w": g[0]}, tx2.init(params), params)
        return updates["w"][None]
    vma = jax.jit(jax.shard_map(one, mesh=mesh, in_specs=spec, out_specs=P("d"), check_vma=True))
    updates = np.asarray(vma(put(grads)))
    print("RESULT " + json.dumps({"skipped": skipped.tolist(), "expected": expected,
                                  "vma_updates": updates.tolist()}))
    """
)


def test_every_replica_takes_the_same_decision_under_shard_map():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    result = json.loads(lines[0][7:])
    skipped = np.array(result["skipped"])
    assert skipped.shape == (8, 80)
    assert (skipped == skipped[0]).all()  # every replica decided the same
    np.testing.assert_array_equal(skipped[0], result["expected"])
    assert np.flatnonzero(skipped[0]).tolist() == [50, 51, 65, 70]
    updates = np.array(result["vma_updates"])
    assert updates.shape == (8, 8) and np.isfinite(updates).all() and (updates != 0).all()
