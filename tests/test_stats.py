import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MIXED, as_f64, flat, make_tree, trees
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxgrad as jg
from jaxgrad._naming import path_name
from jaxgrad._stats import _stats

GLOBAL = ["norm", "rms", "max_abs", "nonfinite"]


def _flat(stats):
    """A `GroupStats` as `{key: device array}`, keys as in `as_dict` (dtypes kept)."""
    assert isinstance(stats, jg.GroupStats)
    out = {}
    for stat in GLOBAL:
        values = getattr(stats, stat)
        assert values.shape[-1] == len(stats.names)
        for g, name in enumerate(stats.names):
            out[f"{stat}/{name}" if name else stat] = values[..., g]
    assert list(out) == list(stats.as_dict())
    return out


def _reference(leaves):
    """norm, rms, max_abs, nonfinite of a list of leaves, in numpy float64."""
    x = np.concatenate([as_f64(v).ravel() for v in leaves]) if leaves else np.zeros(0)
    with np.errstate(invalid="ignore", over="ignore"):
        norm = np.sqrt(np.sum(x**2))
        rms = np.sqrt(np.mean(x**2)) if x.size else 0.0
        max_abs = np.max(np.abs(x)) if x.size else 0.0
    return {"norm": norm, "rms": rms, "max_abs": max_abs, "nonfinite": int(np.sum(~np.isfinite(x)))}


def _check(stats, key_suffix, expected):
    for name, value in expected.items():
        key = name + key_suffix
        assert stats[key].shape == ()
        if name == "nonfinite":
            assert stats[key].dtype == jnp.int32 and int(stats[key]) == value
        else:
            assert stats[key].dtype == jnp.float32
            np.testing.assert_allclose(stats[key], value, rtol=1e-5, atol=1e-6)


# -- by leaf (the default) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree_kind", "dtype"),
    [("nested", jnp.float32), ("gradient", jnp.bfloat16), ("nnx_state", jnp.float16)],
    ids=["nested-f32", "gradient-bf16", "nnx_state-f16"],
)
def test_per_leaf_stats_match_numpy(tree_kind, dtype):
    tree = make_tree(tree_kind, dtype)
    stats = _flat(jg.grad_stats(tree))
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [path_name(p) for p, _ in pairs]
    assert not any("[" in n or "'" in n or n.endswith("/value") for n in names)
    assert set(stats) == set(GLOBAL) | {f"{s}/{n}" for s in GLOBAL for n in names}
    _check(stats, "", _reference([x for _, x in pairs]))
    for name, (_, leaf) in zip(names, pairs, strict=True):
        _check(stats, f"/{name}", _reference([leaf]))


def test_keys_are_stat_by_stat_whole_gradient_first_then_leaf_order():
    tree = {"b": jnp.ones(2), "a": [jnp.ones(1), jnp.zeros(3)]}
    stats = jg.grad_stats(tree)
    assert stats.names == ("", "a/0", "a/1", "b")
    assert list(stats.as_dict()) == [f"{s}{n}" for s in GLOBAL for n in ["", "/a/0", "/a/1", "/b"]]


def test_gradient_leaf_keys_are_logger_ready():
    g = jg.Gradient([{"bias": jnp.array([3.0, 4.0])}], [jnp.ones((2, 2))])
    logs = jg.grad_stats(g).as_dict()
    assert logs["norm/layers/0/bias"] == 5.0
    assert logs["rms/weights/0"] == 1.0


def test_flax_value_is_dropped_from_names():
    from flax import nnx

    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    stats = jg.grad_stats(nnx.state(model, nnx.Param))
    assert stats.names == ("", "bias", "kernel")


def test_four_device_arrays_however_many_leaves():
    tree = {f"p{i}": jnp.ones(3) for i in range(50)}
    stats = jax.jit(jg.grad_stats)(tree)
    assert len(jax.tree.leaves(stats)) == 4
    assert stats.norm.shape == (51,)


# -- by group, callable, None ----------------------------------------------------------------


def test_by_group_pools_each_layer_and_weight(maybe_jit):
    g = jg.Gradient(
        layers=[{"b": jnp.array([3.0]), "s": jnp.array([4.0])}, {"b": jnp.zeros(2)}],
        weights=[{"W": jnp.array([[1.0, jnp.nan]], jnp.bfloat16)}],
    )
    stats = _flat(maybe_jit(lambda g: jg.grad_stats(g, by="group"))(g))
    groups = ["layers/0", "layers/1", "weights/0"]
    assert set(stats) == set(GLOBAL) | {f"{s}/{n}" for s in GLOBAL for n in groups}
    _check(stats, "/layers/0", {"norm": 5.0, "rms": np.sqrt(12.5), "max_abs": 4.0, "nonfinite": 0})
    _check(stats, "/layers/1", {"norm": 0.0, "rms": 0.0, "max_abs": 0.0, "nonfinite": 0})
    assert int(stats["nonfinite/weights/0"]) == 1 and np.isnan(stats["max_abs/weights/0"])
    assert np.isnan(stats["norm"]) and int(stats["nonfinite"]) == 1


def test_by_callable_pools_by_name_and_none_leaves_a_leaf_out(maybe_jit):
    tree = {"w1": jnp.array([[3.0]]), "w2": jnp.array([[4.0]]), "b": jnp.array([12.0])}

    def by(path, leaf):
        return "matrices" if leaf.ndim == 2 else None

    stats = _flat(maybe_jit(lambda t: jg.grad_stats(t, by=by))(tree))
    assert set(stats) == set(GLOBAL) | {f"{s}/matrices" for s in GLOBAL}
    _check(stats, "/matrices", {"norm": 5.0, "rms": np.sqrt(12.5), "max_abs": 4.0, "nonfinite": 0})
    _check(stats, "", {"norm": 13.0, "rms": 13 / np.sqrt(3), "max_abs": 12.0, "nonfinite": 0})


def test_callable_by_runs_as_python_on_every_call_and_is_not_compiled():
    seen = []
    prefix = ["a"]

    def by(path, leaf):
        seen.append(jax.tree_util.keystr(path))
        return prefix[0]

    tree = {"x": jnp.ones(1), "y": jnp.ones(1)}
    assert jg.grad_stats(tree, by=by).names == ("", "a")
    prefix[0] = "b"  # a global the callable reads: the next call must see it
    assert "norm/b" in jg.grad_stats(tree, by=by).as_dict()
    assert seen == ["['x']", "['y']"] * 2


def test_one_compilation_per_structure_and_group_names():
    tree = {"x": jnp.ones(3), "y": jnp.ones(2)}
    jg.grad_stats(tree)
    before = _stats._cache_size()
    jg.grad_stats({"x": jnp.zeros(3), "y": 2 * jnp.ones(2)})
    jg.grad_stats(tree, by=lambda path, leaf: "all")
    jg.grad_stats(tree, by=lambda path, leaf: "all")  # a new lambda, the same names
    assert _stats._cache_size() == before + 1


def test_by_none_gives_global_values_only():
    stats = _flat(jg.grad_stats({"w": jnp.array([3.0, -4.0])}, by=None))
    assert list(stats) == GLOBAL
    _check(stats, "", {"norm": 5.0, "rms": np.sqrt(12.5), "max_abs": 4.0, "nonfinite": 0})


# -- edge cases ------------------------------------------------------------------------------


def test_empty_tree_gives_zeros():
    for empty in ({}, [], None, jg.Gradient([], [])):
        stats = _flat(
            jg.grad_stats(empty, by="group" if isinstance(empty, jg.Gradient) else "leaf")
        )
        assert list(stats) == GLOBAL
        _check(stats, "", {"norm": 0.0, "rms": 0.0, "max_abs": 0.0, "nonfinite": 0})


def test_single_array_has_no_per_leaf_keys():
    stats = _flat(jg.grad_stats(jnp.array([1.0, jnp.inf, jnp.nan])))
    assert list(stats) == GLOBAL
    assert int(stats["nonfinite"]) == 2 and np.isnan(stats["max_abs"]) and np.isnan(stats["norm"])


def test_none_subtrees_zero_size_scalars_and_mixed_dtypes():
    tree = {
        "none": None,
        "empty": jnp.zeros((0, 2), jnp.float16),
        "s": jnp.array(-2.0, jnp.bfloat16),
        "inf": jnp.array([jnp.inf, 1.0]),
        "n": jnp.array([3, -7], jnp.int32),
    }
    stats = _flat(jg.grad_stats(tree))
    assert not any("none" in k for k in stats)
    _check(stats, "/empty", {"norm": 0.0, "rms": 0.0, "max_abs": 0.0, "nonfinite": 0})
    _check(stats, "/s", {"norm": 2.0, "rms": 2.0, "max_abs": 2.0, "nonfinite": 0})
    _check(stats, "/n", {"norm": np.sqrt(58), "rms": np.sqrt(29), "max_abs": 7.0, "nonfinite": 0})
    _check(stats, "/inf", {"norm": np.inf, "rms": np.inf, "max_abs": np.inf, "nonfinite": 1})
    assert int(stats["nonfinite"]) == 1 and float(stats["max_abs"]) == np.inf


def test_axis_name_gives_global_values():
    full = {"w": jnp.array([[3.0, 0.0], [-4.0, jnp.inf]])}
    per_shard = _flat(
        jax.jit(jax.vmap(lambda g: jg.grad_stats(g, axis_name="i"), axis_name="i"))(full)
    )
    expected = _flat(jg.grad_stats(full))
    for key in expected:
        np.testing.assert_array_equal(per_shard[key], [expected[key]] * 2)


# -- errors ------------------------------------------------------------------------------


def test_bad_by_raises():
    tree = {"w": jnp.ones(2)}
    with pytest.raises(
        ValueError, match=r"`by` must be 'leaf', 'group', None or a callable .*; got 'layer'"
    ):
        jg.grad_stats(tree, by="layer")
    with pytest.raises(TypeError, match=r"`by` must be .*; got int 3"):
        jg.grad_stats(tree, by=3)
    with pytest.raises(ValueError, match=r"`by='group'` needs a `Gradient` .* got a dict"):
        jg.grad_stats(tree, by="group")
    with pytest.raises(
        TypeError,
        match=r"`by` must return a group name \(str\) or None .* at \['w'\] \(f32\[2\]\) it returned int 0",
    ):
        jg.grad_stats(tree, by=lambda path, leaf: 0)


# -- laws on random trees ------------------------------------------------------------------


@settings(max_examples=16)
@given(trees(nonfinite=True, dtypes=MIXED, max_leaves=6), st.booleans())
def test_stats_on_random_trees_match_numpy(tree, jit):
    stats = _flat((jax.jit(jg.grad_stats) if jit else jg.grad_stats)(tree))
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    expected = _reference([x for _, x in pairs])
    assert int(stats["nonfinite"]) == expected["nonfinite"]
    if np.all(np.isfinite(flat(tree))):
        _check(stats, "", expected)
    for path, leaf in pairs:
        if not path:  # a single array: no per-leaf keys
            assert len(stats) == 4
            continue
        name = path_name(path)
        leaf_expected = _reference([leaf])
        assert int(stats[f"nonfinite/{name}"]) == leaf_expected["nonfinite"]
        if leaf_expected["nonfinite"] == 0:
            _check(stats, f"/{name}", leaf_expected)
