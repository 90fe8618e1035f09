"""`update_stats` and `jaxgrad.optax.track_update_stats` against a float64 numpy reference."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import as_f64, make_tree
from jax.sharding import PartitionSpec as P

import jaxgrad as jg
from jaxgrad._naming import resolve_groups
from jaxgrad.optax import track_update_stats

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("update_norm", "param_norm", "update_ratio", "update_rms", "param_rms")


def _reference(updates, params, by):
    """Every statistic in float64 numpy, from the flattened leaves of each group."""
    u = [as_f64(x).ravel() for x in jax.tree.leaves(updates)]
    p = [as_f64(x).ravel() for x in jax.tree.leaves(params)]
    groups = [("", tuple(range(len(u))))] + list(resolve_groups(params, by))
    out = {field: [] for field in FIELDS}
    for _, idx in groups:
        uu = np.concatenate([u[i] for i in idx]) if idx else np.zeros(0)
        pp = np.concatenate([p[i] for i in idx]) if idx else np.zeros(0)
        un, pn = np.linalg.norm(uu), np.linalg.norm(pp)
        out["update_norm"].append(un)
        out["param_norm"].append(pn)
        out["update_ratio"].append(un / pn if pn else (0.0 if un == 0 else np.inf))
        out["update_rms"].append(un / np.sqrt(max(uu.size, 1)))
        out["param_rms"].append(pn / np.sqrt(max(pp.size, 1)))
    return {k: np.array(v) for k, v in out.items()}, tuple(name for name, _ in groups)


def _check(stats, updates, params, by, rtol):
    expected, names = _reference(updates, params, by)
    assert stats.names == names
    for field in FIELDS:
        got = getattr(stats, field)
        assert got.dtype == jnp.float32 and got.shape == (len(names),), field
        np.testing.assert_allclose(np.asarray(got, np.float64), expected[field], rtol=rtol)


def _updates_for(params, seed=7):
    """An update 1e-3 times the size of a random tree like `params`."""
    return jax.tree.map(
        lambda x: (x.astype(jnp.float32) * 1e-3).astype(x.dtype), make_tree_like(params, seed)
    )


def make_tree_like(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape).astype(np.float32)).astype(x.dtype), params
    )


@pytest.mark.parametrize("by", [None, "leaf", "module"])
def test_matches_numpy(tree_kind, dtype, by, maybe_jit):
    params = make_tree(tree_kind, dtype)
    updates = _updates_for(params)
    stats = maybe_jit(lambda u, p: jg.update_stats(u, p, by=by))(updates, params)
    _check(stats, updates, params, by, rtol=1e-5)


def test_gradient_by_group_and_module():
    params = make_tree("gradient")
    updates = _updates_for(params)
    for by in ("group", "module", jg.by_depth(1)):
        _check(jg.update_stats(updates, params, by=by), updates, params, by, rtol=1e-5)


def test_zero_parameter_groups_have_a_defined_ratio():
    params = {"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(2), "c": jnp.zeros(1), "e": jnp.zeros(0)}
    updates = {"w": jnp.array([0.3, 0.4]), "b": jnp.array([1.0, 0.0]), "c": jnp.zeros(1)}
    updates["e"] = jnp.zeros(0)
    stats = jg.update_stats(updates, params, by="leaf")
    ratio = dict(zip(stats.names, np.asarray(stats.update_ratio), strict=True))
    assert ratio == {
        "": pytest.approx(np.sqrt(1.25) / 5),
        "b": np.inf,
        "c": 0.0,
        "e": 0.0,
        "w": pytest.approx(0.1),
    }


def test_huge_norms_are_exact_on_both_sides():
    params = {"w": jnp.full(4, 1e20), "b": jnp.ones(2)}
    updates = {"w": jnp.full(4, 1e19), "b": jnp.full(2, 1e-3)}
    stats = jax.jit(lambda u, p: jg.update_stats(u, p, by="leaf"))(updates, params)
    _check(stats, updates, params, "leaf", rtol=1e-6)
    small = {"w": jnp.full(4, 1e-3), "b": jnp.ones(2)}
    _check(jg.update_stats(small, params, by="leaf"), small, params, "leaf", rtol=1e-6)


def test_nonfinite_update_gives_nonfinite_norms():
    params = {"w": jnp.ones(2), "b": jnp.ones(1)}
    updates = {"w": jnp.array([jnp.nan, 1.0]), "b": jnp.ones(1)}
    stats = jg.update_stats(updates, params, by="leaf")
    assert np.isnan(stats.update_norm[0]) and np.isnan(stats.update_ratio[2])
    assert stats.update_ratio[1] == 1.0 and np.isfinite(stats.param_norm).all()


def test_empty_trees():
    stats = jg.update_stats({}, {}, by="leaf")
    assert stats.names == ("",)
    np.testing.assert_array_equal(np.stack([getattr(stats, f) for f in FIELDS]), 0)


def test_float64_under_x64():
    with jax.enable_x64(True):
        params = {"w": jnp.array([3.0, 4.0], jnp.float64), "b": jnp.array([1e-200], jnp.float64)}
        updates = {"w": jnp.array([3e-9, 4e-9], jnp.float64), "b": jnp.zeros(1, jnp.float64)}
        stats = jg.update_stats(updates, params, by="leaf")
        assert stats.update_norm.dtype == jnp.float64
        np.testing.assert_allclose(stats.update_ratio, [1e-9, 0.0, 1e-9], rtol=1e-15)


def test_nnx_module_and_its_updates():
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    updates = jax.tree.map(lambda x: 0.01 * x, state)
    stats = jg.update_stats(updates, model, by="module")
    assert stats.names == ("", "layers/0", "layers/1")
    np.testing.assert_allclose(stats.update_ratio, 0.01, rtol=1e-6)


def test_as_dict_keys():
    params = {"layers": [{"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}]}
    stats = jg.update_stats(jax.tree.map(lambda x: 0.5 * x, params), params, by="module")
    logs = stats.as_dict(prefix="opt/")
    expected = [
        f"opt/{key}{group}"
        for key in ("update/norm", "param/norm", "update_ratio", "update/rms", "param/rms")
        for group in ("", "/layers/0")
    ]
    assert list(logs) == expected
    assert logs["opt/update_ratio/layers/0"] == 0.5 and logs["opt/param/rms"] == 1.0
    stacked = jax.tree.map(lambda *x: jnp.stack(x), stats, stats)  # as from lax.scan
    np.testing.assert_array_equal(stacked.as_dict()["update_ratio"], [0.5, 0.5])


@pytest.mark.parametrize(
    ("updates", "params", "error", "match"),
    [
        (
            {"w": jnp.ones(2)},
            {"v": jnp.ones(2)},
            ValueError,
            r"`updates` and `params` must have the same structure; they first differ at the root",
        ),
        (
            {"w": jnp.ones(2)},
            {"w": jnp.ones(3)},
            ValueError,
            r"`updates` and `params` must have leaves of the same shapes; at \['w'\] `updates` "
            r"has f32\[2\], `params` has f32\[3\]",
        ),
        (
            {"w": "x"},
            {"w": jnp.ones(2)},
            TypeError,
            r"`updates` must be a pytree of numeric arrays; at \['w'\]",
        ),
    ],
    ids=["structure", "shapes", "leaf"],
)
def test_errors(updates, params, error, match):
    with pytest.raises(error, match=match):
        jg.update_stats(updates, params)


def test_axis_name_is_checked():
    with pytest.raises(TypeError, match=r"`axis_name` must be .*, or None; got list"):
        jg.update_stats({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, axis_name=["i"])


# -- vmap, named axes ------------------------------------------------------------------------


def _stacked(n=3):
    params = [make_tree("nested", seed=s) for s in range(n)]
    updates = [_updates_for(p, seed=10 + s) for s, p in enumerate(params)]
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
    return params, updates, stack(params), stack(updates)


def test_vmap_gives_each_row_its_own_statistics():
    params, updates, p, u = _stacked()
    stats = jax.jit(jax.vmap(lambda u, p: jg.update_stats(u, p, by="module")))(u, p)
    for row in range(3):
        one = jax.tree.map(lambda x: x[row], stats)  # noqa: B023
        _check(one, updates[row], params[row], "module", rtol=1e-5)


def test_named_vmap_with_axis_name_sees_the_whole_trees():
    """Under a named vmap each row's leaves are shards of one larger tree."""
    _, _, p, u = _stacked()
    stats = jax.jit(
        jax.vmap(lambda u, p: jg.update_stats(u, p, by="module", axis_name="i"), axis_name="i")
    )(u, p)
    # the whole tree: each leaf is the concatenation of its 3 shards (order is irrelevant)
    whole_u = jax.tree.map(lambda x: x.reshape(-1), u)
    whole_p = jax.tree.map(lambda x: x.reshape(-1), p)
    for row in range(3):
        _check(jax.tree.map(lambda x: x[row], stats), whole_u, whole_p, "module", rtol=1e-5)  # noqa: B023


def _psums(params):
    mesh = jax.make_mesh((1,), ("data",))
    run = jax.shard_map(
        lambda u, p: jg.update_stats(u, p, by="leaf", axis_name="data"),
        mesh=mesh,
        in_specs=P(),
        out_specs=P(),
    )
    jaxpr = jax.make_jaxpr(run)(params, params).jaxpr
    psums = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name.startswith("psum"):
                psums.append(eqn)
            if eqn.primitive.name == "cond":
                continue
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr)
    return psums


def test_collectives_do_not_grow_with_leaves_or_groups():
    """Both trees are reduced together: a fixed number of float32 psums (one per
    segmentation of the shared sums of squares), however many leaves and groups."""
    small = _psums(make_tree("nested", jnp.bfloat16))
    large = _psums({f"layer{i}": make_tree("dict", jnp.bfloat16, seed=i) for i in range(20)})
    assert len(small) == len(large) <= 3
    assert all(v.aval.dtype == jnp.float32 for eqn in small + large for v in eqn.invars)


# -- 8 devices: shard_map with axis_name, GSPMD jit with replicated and sharded leaves -------

EIGHT_DEVICES = textwrap.dedent(
    """
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jaxgrad as jg

    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(16, 4)).astype(np.float32), "b": rng.normal(size=8).astype(np.float32)}
    updates = {k: (1e-3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
    out = {}

    def put(tree, specs):
        return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}

    def fields(stats):
        return {f: np.asarray(getattr(stats, f)).tolist() for f in
                ("update_norm", "param_norm", "update_ratio", "update_rms", "param_rms")}

    sharded = {"w": P("data"), "b": P("data")}
    for check_vma in (True, False):
        run = jax.jit(jax.shard_map(
            lambda u, p: jg.update_stats(u, p, by="leaf", axis_name="data"),
            mesh=mesh, in_specs=(sharded, sharded), out_specs=P(), check_vma=check_vma,
        ))
        out[f"shard_map_vma_{check_vma}"] = fields(run(put(updates, sharded), put(params, sharded)))
    mixed = {"w": P("data"), "b": P()}  # GSPMD: a sharded and a replicated leaf
    gspmd = jax.jit(lambda u, p: jg.update_stats(u, p, by="leaf"))
    out["gspmd"] = fields(gspmd(put(updates, mixed), put(params, mixed)))
    out["replicated_in_shard_map"] = fields(jax.jit(jax.shard_map(
        lambda u, p: jg.update_stats(u, p, by="leaf", axis_name="data"),
        mesh=mesh, in_specs=(mixed, mixed), out_specs=P(), check_vma=True,
    ))(put(updates, mixed), put(params, mixed)))
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    script = tmp_path_factory.mktemp("eight") / "eight_devices.py"
    script.write_text(EIGHT_DEVICES)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    rng = np.random.default_rng(0)
    params = {
        "w": rng.normal(size=(16, 4)).astype(np.float32),
        "b": rng.normal(size=8).astype(np.float32),
    }
    updates = {k: (1e-3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
    return json.loads(line[7:]), _reference(updates, params, "leaf")[0]


def _compare(got, expected):
    for field in FIELDS:
        np.testing.assert_allclose(got[field], expected[field], rtol=1e-5, err_msg=field)


@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_with_axis_name_on_8_devices(eight_devices, check_vma):
    results, expected = eight_devices
    _compare(results[f"shard_map_vma_{check_vma}"], expected)


def test_gspmd_jit_with_replicated_and_sharded_leaves_on_8_devices(eight_devices):
    results, expected = eight_devices
    _compare(results["gspmd"], expected)


def test_replicated_leaf_inside_shard_map_is_counted_once(eight_devices):
    results, expected = eight_devices
    _compare(results["replicated_in_shard_map"], expected)


# -- the optax transformation ----------------------------------------------------------------


def test_track_update_stats_keeps_the_last_statistics():
    params = {"layers": [{"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}], "s": jnp.ones(())}
    tx = optax.chain(optax.sgd(learning_rate=0.1), track_update_stats(by="module"))
    state = tx.init(params)
    empty = optax.tree_utils.tree_get(state, "update_stats")
    assert isinstance(empty, jg.UpdateStats) and empty.names == ("", "layers/0", "s")
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    stats = optax.tree_utils.tree_get(state, "update_stats")
    expected = jg.update_stats(updates, params, by="module")
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(stats, field), getattr(expected, field))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    np.testing.assert_allclose(updates["s"], -0.1, rtol=1e-6)  # the updates pass through


def test_track_update_stats_state_is_a_stable_scan_carry():
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    tx = optax.chain(optax.sgd(learning_rate=0.1), track_update_stats(by="leaf"))

    def step(carry, _):
        params, state = carry
        grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, tx.init(params)), length=3)
    stats = optax.tree_utils.tree_get(state, "update_stats")
    assert stats.update_norm.dtype == jnp.float32


def test_track_update_stats_needs_params():
    tx = track_update_stats()
    state = tx.init({"w": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"`track_update_stats` measures the updates against"):
        tx.update({"w": jnp.ones(2)}, state)


def test_track_update_stats_under_nnx_optimizer():
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
    tx = optax.chain(optax.sgd(0.1), track_update_stats(by="module"))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 2))) ** 2))(model)
        optimizer.update(model, grads)

    step(model, optimizer)
    stats = optax.tree_utils.tree_get(optimizer.opt_state, "update_stats")
    assert stats.names == ("", "layers/0", "layers/1")
    logs = stats.as_dict()
    assert all(logs[f"update_ratio/layers/{i}"] > 0 for i in range(2))
