"""The packed reduction (`_numerics.reduce_tree`) directly, and exactness at the extremes.

Per-leaf results against float64 numpy on layouts that fill packed matrices (more than
`PACK_ROWS` leaves of one padded length), interleave packed and lone leaves and hold
empty ones; every whole-gradient op on tiny and huge inputs in every dtype, eager,
jitted, vmapped and constant-folded; the CUDA lowering has no data-dependent
conditional.
"""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import data_dependent_conditionals

import jaxgrad as jg
from jaxgrad._numerics import PACK_LIMIT, PACK_ROWS, Segments, layout, reduce_tree, shard_axes


def _leaves(seed: int = 0) -> list[jax.Array]:
    """More than `PACK_ROWS` leaves of 5 to 8 entries (one padded length), so that one
    matrix fills and another starts, 2 lone large ones, empty ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(PACK_ROWS + 24):
        out.append(jnp.asarray(rng.normal(size=5 + i % 4).astype(np.float32)))
        if i == 7:
            out.append(jnp.asarray(rng.normal(size=(PACK_LIMIT + 3,)).astype(np.float32)))
        if i == 20:
            out.append(jnp.zeros((0, 3), jnp.float32))
            out.append(jnp.asarray(rng.normal(size=(70, 70)).astype(np.float32)))
        if i == 30:
            out.append(jnp.asarray(np.float32(2.5)))
    out[3] = out[3].at[1].set(jnp.nan)
    out[12] = out[12].at[0].set(-jnp.inf)
    return out


def test_layout_fills_matrices_and_keeps_large_leaves_alone():
    leaves = _leaves()
    plan = layout(leaves, shard_axes(leaves, None))
    packed = [p for p in plan.pieces if p.length is not None]
    alone = [p for p in plan.pieces if p.length is None]
    assert max(len(p.leaves) for p in packed) == PACK_ROWS
    assert {p.length for p in packed} == {1, 8}
    assert sorted(i for p in alone for i in p.leaves) == [
        i for i, x in enumerate(leaves) if x.size > PACK_LIMIT or x.size == 0
    ]
    assert sorted(plan.order.tolist()) == list(range(len(leaves)))


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "alone"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_per_leaf_results_against_numpy(pack, jit):
    leaves = _leaves()

    def run(xs):
        found = reduce_tree(xs, [Segments.each(len(xs))], pack=pack, max_abs=True, nonfinite=True)
        return found.norms()[1], found.rms()[1], found.max_abs[1], found.nonfinite[1]

    norms, rms, max_abs, counts = (jax.jit(run) if jit else run)(leaves)
    for i, x in enumerate(leaves):
        v = np.asarray(x, np.float64).ravel()
        bad = int(np.count_nonzero(~np.isfinite(v)))
        assert int(counts[i]) == bad, i
        if bad:
            assert not np.isfinite(float(norms[i])), i
            continue
        norm = np.sqrt(np.sum(v * v))
        np.testing.assert_allclose(float(norms[i]), norm, rtol=2e-7, err_msg=str(i))
        np.testing.assert_allclose(
            float(rms[i]), norm / np.sqrt(max(v.size, 1)), rtol=2e-7, err_msg=str(i)
        )
        assert float(max_abs[i]) == (np.max(np.abs(v)) if v.size else 0.0), i


def test_groups_of_leaves_and_the_whole_against_numpy():
    leaves = [x for x in _leaves(1) if bool(jnp.all(jnp.isfinite(x)))]
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 5, size=len(leaves)).astype(np.int32)
    ids[ids == 4] = 5  # group 4 empty; leaves with id 5 left out of the groups
    segs = Segments(ids, 5)
    found = reduce_tree(leaves, [segs], max_abs=True, nonfinite=True)
    flat = [np.asarray(x, np.float64).ravel() for x in leaves]
    whole = np.concatenate(flat)
    np.testing.assert_allclose(float(found.norms()[0][0]), np.linalg.norm(whole), rtol=2e-7)
    for g in range(5):
        members = [f for f, i in zip(flat, ids, strict=True) if i == g]
        v = np.concatenate(members) if members else np.zeros(0)
        np.testing.assert_allclose(float(found.norms()[1][g]), np.linalg.norm(v), rtol=2e-7)
        assert float(found.max_abs[1][g]) == (np.max(np.abs(v)) if v.size else 0.0)
        assert int(found.entries[1][g]) == v.size


def test_max_abs_is_nan_where_a_group_holds_nan():
    x = jnp.arange(3000, dtype=jnp.float32).at[17].set(jnp.nan)
    stats = jg.grad_stats({"a": x, "b": jnp.ones(2)})
    assert np.isnan(stats.as_dict()["max_abs/a"]) and stats.as_dict()["max_abs/b"] == 1.0


def _written_arrays(text: str, entries: int) -> list[str]:
    """The instructions of a compiled module's entry that write an array of at least
    `entries` entries, other than its parameters and the free reshapes."""
    entry = text[text.index("ENTRY") :]
    found = []
    for line in entry.splitlines():
        match = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* ([\w-]+)\(", line)
        if not match or match.group(3) in ("parameter", "bitcast", "get-tuple-element"):
            continue
        size = int(np.prod([int(d) for d in match.group(2).split(",") if d]))
        if size >= entries:
            found.append(match.group(1))
    return found


def test_the_ordinary_path_reads_the_gradient_and_writes_nothing_of_its_size():
    """Each reduction reads the leaves where they are: nothing gradient-sized is written
    out first (a stacked, clamped or shared operand, a count's predicate), so that the
    exact sums cost reads only; a clip writes its outputs and nothing else."""
    grad = {"w": jnp.ones((256, 96)), "v": jnp.ones((300, 64)), "b": jnp.ones(96)}
    ops = {
        "grad_norm": jg.grad_norm,
        "grad_stats": jg.grad_stats,
        "grad_nonfinite_report": jg.grad_nonfinite_report,
        "recipe": lambda g: jg.grad_clip(g, 1.0, by="leaf"),
    }
    for name, op in ops.items():
        text = jax.jit(op).lower(grad).compile().as_text()
        written = _written_arrays(text, 96 * 64)
        outputs = 2 if name == "recipe" else 0  # the clipped w and v
        assert len(written) == outputs, (name, written)


def test_no_data_dependent_conditional_in_the_cuda_lowering():
    """XLA's GPU runtime runs a conditional by reading its predicate on the host; on CPU
    none is compiled either."""
    grad = {"a": jnp.ones(3), "b": jnp.ones((64, 80)), "c": jnp.ones((2, 2), jnp.bfloat16)}
    ops = {
        "grad_norm": jg.grad_norm,
        "grad_rms": jg.grad_rms,
        "grad_normalize": jg.grad_normalize,
        "grad_all_finite": jg.grad_all_finite,
        "grad_where_finite": lambda g: jg.grad_where_finite(g, 0.0),
        "grad_nonfinite_report": jg.grad_nonfinite_report,
        "grad_stats": jg.grad_stats,
        "grad_clip": lambda g: jg.grad_clip(g, 1.0),
        "grad_clip_by_rms": lambda g: jg.grad_clip_by_rms(g, 1.0),
        "recipe": lambda g: jg.grad_clip(g, 1.0, by="leaf"),
    }
    for name, op in ops.items():
        text = jax.export.export(jax.jit(op), platforms=["cuda"])(grad).mlir_module()
        assert data_dependent_conditionals(text) == [], name

    # and the check sees one where there is one
    def with_cond(g):
        return jax.lax.cond(jg.grad_norm(g) > 1, lambda: 1.0, lambda: 2.0)

    text = jax.export.export(jax.jit(with_cond), platforms=["cuda"])(grad).mlir_module()
    assert data_dependent_conditionals(text), "the check must find a data-dependent case"
    assert " conditional(" not in jax.jit(jg.grad_stats).lower(grad).compile().as_text()


# -- extremes -------------------------------------------------------------------------------

EXTREMES = {
    # dtype: entries whose squares underflow, entries whose squares overflow the sums
    "f32": (jnp.float32, [3e-25, 1e-30, 4e-37], [1e20, 3e30, 3e38]),
    "bf16": (jnp.bfloat16, [3e-25, 1e-30, 4e-37], [1e20, 3e30, 3e38]),
    "f16": (jnp.float16, [1e-4, 2e-3], [3e4, 6e4]),
    "f64": (jnp.float64, [3e-200, 1e-300], [1e200, 1e300]),
}


def _forms(fn):
    """The same op eager, jitted, vmapped over one row, and with its input a constant."""
    return {
        "eager": fn,
        "jit": jax.jit(fn),
        "vmap": lambda g: jax.tree.map(
            lambda x: x[0], jax.vmap(fn)(jax.tree.map(lambda x: x[None], g))
        ),
        "folded": lambda g: jax.jit(lambda: fn(g))(),
    }


def _reference(x: np.ndarray) -> tuple[float, float]:
    """float64 (exact for these entries) norm and RMS, by scaling first."""
    v = np.asarray(x, np.float64).ravel()
    big = np.max(np.abs(v))
    norm = big * np.sqrt(np.sum((v / big) ** 2))
    return norm, norm / np.sqrt(v.size)


@pytest.mark.parametrize("kind", EXTREMES)
@pytest.mark.parametrize("which", ["tiny", "huge"])
def test_norms_normalize_and_clips_are_exact_at_the_extremes(kind, which):
    dtype, tiny, huge = EXTREMES[kind]
    with jax.enable_x64(kind == "f64"):
        for scale in tiny if which == "tiny" else huge:
            x = jnp.asarray(np.array([3.0, 4.0, -4.0, 3.0]) * scale / 4, dtype)
            host = np.asarray(x.astype(jnp.float64) if kind == "f64" else x.astype(jnp.float32))
            norm, rms = _reference(host)
            g = {"w": x}
            ops = {
                "norm": lambda g: jg.grad_norm(g),
                "rms": lambda g: jg.grad_rms(g),
                "normalize": lambda g: jg.grad_normalize(g)["w"],
                "clip": lambda g, b=norm / 2: jg.grad_clip(g, b)[0]["w"],
                "clip_rms": lambda g, b=rms / 2: jg.grad_clip_by_rms(g, b)[0]["w"],
                "stats": lambda g: jg.grad_stats(g).rms[0],
            }
            unit = host / norm
            expected = {
                "norm": norm,
                "rms": rms,
                "normalize": unit,
                "clip": host / 2,
                "clip_rms": host / 2,
                "stats": rms,
            }
            tol = {"f32": 1e-6, "bf16": 1e-6, "f16": 1e-3, "f64": 1e-13}[kind]
            out_tol = {"f32": 2e-6, "bf16": 1e-2, "f16": 2e-3, "f64": 1e-13}[kind]
            largest = np.finfo(np.float64 if kind == "f64" else np.float32).max
            work = jnp.float64 if kind == "f64" else jnp.float32
            for name, op in ops.items():
                want = np.asarray(expected[name], np.float64)
                for form, fn in _forms(op).items():
                    got = np.asarray(jnp.asarray(fn(g)).astype(work), np.float64)
                    where = f"{kind} {scale} {name} {form}"
                    if name == "norm" and want > largest:
                        assert np.isinf(got), where  # beyond the dtype: inf, not NaN
                        continue
                    rtol = tol if name in ("norm", "rms", "stats") else out_tol
                    np.testing.assert_allclose(got, want, rtol=rtol, err_msg=where)


def test_a_finite_gradient_beyond_the_largest_norm_is_clipped_and_finite():
    g = {"w": jnp.full(4, 3e38)}
    for form, fn in _forms(lambda g: jg.grad_clip(g, 1.0)).items():
        clipped, stats = fn(g)
        np.testing.assert_allclose(clipped["w"], 0.5, rtol=1e-6, err_msg=form)
        assert bool(stats.finite) and bool(stats.clipped), form
        assert np.isinf(stats.norm) and np.isclose(float(stats.rms), 3e38, rtol=1e-6), form
    assert bool(jg.grad_all_finite(g))
    np.testing.assert_allclose(jg.grad_rms(g), 3e38, rtol=1e-6)


def test_derivatives_are_finite_at_the_extremes_and_at_zero():
    for x in (jnp.array([3e20, 4e20]), jnp.array([3e-25, 4e-25]), jnp.zeros(2)):
        grad = jax.grad(lambda g: jg.grad_norm(g))({"w": x})["w"]
        assert bool(jnp.all(jnp.isfinite(grad))), x
        expected = np.asarray(x, np.float64) / max(
            np.linalg.norm(np.asarray(x, np.float64)), 1e-300
        )
        if float(jnp.max(jnp.abs(x))) > 0:
            np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_huge_complex_entries_are_finite():
    z = {"z": jnp.array([3e38 + 3e38j, 1 + 0j], jnp.complex64)}
    assert bool(jg.grad_all_finite(z))
    assert int(jg.grad_nonfinite_report(z).total) == 0
    np.testing.assert_array_equal(jg.grad_where_finite(z, 0.0)["z"], z["z"])
    assert int(jg.grad_nonfinite_report({"z": jnp.array([complex(np.nan, np.nan)])}).total) == 1
    np.testing.assert_allclose(
        jg.grad_norm({"z": jnp.array([3e-30 + 4e-30j], jnp.complex64)}), 5e-30, rtol=1e-6
    )


def test_bfloat16_tiny_entries_survive():
    x = jnp.asarray(np.array([3e-30, 4e-30]), ml_dtypes.bfloat16)
    v = np.asarray(x, np.float64)
    np.testing.assert_allclose(jg.grad_norm({"w": x}), np.linalg.norm(v), rtol=1e-6)


def test_no_data_dependent_conditional_in_a_cuda_train_step_with_the_spike_guard():
    import optax

    from jaxgrad.optax import spike_guard

    params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8)}
    tx = spike_guard(optax.adamw(1e-3), max_norm=1.0, by="leaf")

    def step(params, state, x):
        grads = jax.grad(lambda p: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    with jax.numpy_dtype_promotion("standard"):  # optax's adam needs it
        args = (params, tx.init(params), jnp.ones((4, 16)))
        text = jax.export.export(jax.jit(step), platforms=["cuda"])(*args).mlir_module()
    assert data_dependent_conditionals(text) == []
    assert "stablehlo.select" in text
