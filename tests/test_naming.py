"""Names and groups: `path_name`, `by="module"`, `by_depth`, unique keys, the host read."""

import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from helpers import cpu_env, free_port, run_processes

import jaxgrad as jg
from jaxgrad._naming import host_read, leaf_names, resolve_groups

ROOT = Path(__file__).resolve().parent.parent


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.dense = nnx.Linear(3, 3, rngs=rngs)
        self.norm = nnx.LayerNorm(3, rngs=rngs)


class Model(nnx.Module):
    """A list of layers, a dict of nested blocks, a head and a bare parameter."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(2, 3, rngs=rngs), nnx.Linear(3, 3, rngs=rngs)])
        self.blocks = nnx.Dict({"a": Block(rngs), "b": Block(rngs)})
        self.head = nnx.Linear(3, 1, rngs=rngs)
        self.temperature = nnx.Param(jnp.ones(()))


MODULES = ["blocks/a/dense", "blocks/a/norm", "blocks/b/dense", "blocks/b/norm"]
MODULES += ["head", "layers/0", "layers/1", "temperature"]


def _names(tree, by):
    return [name for name, _ in resolve_groups(tree, by)]


def _sorted(groups):
    return sorted(name for name, _ in groups)


# -- path_name -----------------------------------------------------------------------------


def test_path_name_drops_flax_value_and_never_gives_an_empty_name():
    state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
    assert sorted(leaf_names(state)) == ["bias", "kernel"]
    assert leaf_names(jnp.ones(2)) == ("(root)",)
    assert leaf_names({"": jnp.ones(1), "(root)": jnp.ones(1)}) == ("['']", "(root)")
    assert leaf_names({"a": {"": jnp.ones(1)}}) == ("a/",)


# -- by="module" ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["module", "state", "grads"])
def test_module_groups_an_nnx_model_by_layer(form):
    model = Model(nnx.Rngs(0))
    if form == "module":
        tree = model
    elif form == "state":
        tree = nnx.state(model, nnx.Param)
    else:
        tree = nnx.grad(lambda m: sum(jnp.sum(p) for p in jax.tree.leaves(nnx.state(m))))(model)
    stats = jg.grad_stats(tree, by="module")
    assert sorted(stats.names[1:]) == MODULES
    logs = stats.as_dict()
    state = nnx.state(model, nnx.Param)
    kernel, bias = state["layers"][0]["kernel"][...], state["layers"][0]["bias"][...]
    if form != "grads":
        expected = np.sqrt(np.sum(np.square(kernel)) + np.sum(np.square(bias)))
        np.testing.assert_allclose(logs["norm/layers/0"], expected, rtol=1e-6)
    # a parameter directly under the root is its own group
    assert dict(resolve_groups(nnx.state(model, nnx.Param), "module"))["temperature"] == (
        len(jax.tree.leaves(nnx.state(model, nnx.Param))) - 1,
    )


def test_module_on_plain_nested_dicts_and_lists():
    tree = {
        "encoder": [{"w": jnp.ones(2), "b": jnp.ones(1)}, {"w": jnp.ones(2)}],
        "scale": jnp.ones(()),
        "deep": {"a": {"b": {"c": jnp.ones(1), "d": jnp.ones(1)}}},
    }
    groups = dict(resolve_groups(tree, "module"))
    assert sorted(groups) == ["deep/a/b", "encoder/0", "encoder/1", "scale"]
    assert len(groups["encoder/0"]) == 2 and len(groups["deep/a/b"]) == 2


def test_module_on_linen_params_and_optax_updates():
    class Mlp(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(1)(linen.relu(linen.Dense(4)(x)))

    variables = Mlp().init(jax.random.key(0), jnp.ones((1, 2)))
    assert _names(variables, "module") == ["params/Dense_0", "params/Dense_1"]
    assert _names(variables["params"], "module") == ["Dense_0", "Dense_1"]
    tx = optax.adam(1e-3)
    with jax.numpy_dtype_promotion("standard"):  # optax's adam promotes implicitly
        updates, _ = tx.update(variables["params"], tx.init(variables["params"]))
    assert _names(updates, "module") == ["Dense_0", "Dense_1"]


def test_module_on_a_gradient_is_the_same_as_group():
    g = jg.Gradient([{"bias": jnp.ones(2)}, {"bias": jnp.ones(1)}], [{"W": jnp.ones((2, 1))}])
    assert resolve_groups(g, "module") == resolve_groups(g, "group")
    assert _names(g, "module") == ["layers/0", "layers/1", "weights/0"]


def test_module_on_a_single_array_has_no_groups():
    assert resolve_groups(jnp.ones(3), "module") == ()
    assert jg.grad_stats(jnp.ones(3), by="module").names == ("",)


# -- by_depth ------------------------------------------------------------------------------


def test_by_depth_on_an_nnx_model():
    state = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
    assert _sorted(resolve_groups(state, jg.by_depth(1))) == [
        "blocks",
        "head",
        "layers",
        "temperature",
    ]
    assert _sorted(resolve_groups(state, jg.by_depth(2))) == [
        "blocks/a",
        "blocks/b",
        "head/bias",
        "head/kernel",
        "layers/0",
        "layers/1",
        "temperature",
    ]
    deep = resolve_groups(state, jg.by_depth(10))
    assert deep == resolve_groups(state, "leaf")


def test_by_depth_is_a_callable_too():
    by = jg.by_depth(1)
    path = jax.tree_util.tree_flatten_with_path({"a": {"b": jnp.ones(1)}})[0][0][0]
    assert by(path, None) == "a"


@pytest.mark.parametrize(
    ("depth", "error", "match"),
    [
        (0, ValueError, r"`depth` must be at least 1; got 0\."),
        (1.5, TypeError, r"`depth` must be an int; got float 1\.5\."),
        (True, TypeError, r"`depth` must be an int; got bool True\."),
    ],
)
def test_by_depth_checks_its_argument(depth, error, match):
    with pytest.raises(error, match=match):
        jg.by_depth(depth)


# -- the same groupings everywhere `by=` is accepted -----------------------------------------


@pytest.mark.parametrize("by", ["leaf", "module", jg.by_depth(1)], ids=["leaf", "module", "d1"])
def test_every_function_with_by_gets_the_same_groups(by):
    from jaxgrad.optax import clip_with_stats, track_update_stats

    params = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
    names = jg.grad_stats(params, by=by).names
    assert jg.grad_clip(params, 1.0, by=by)[1].groups.names == names
    assert jg.update_stats(params, params, by=by).names == names
    assert jg.noise_scale_init(params, by=by).names == names
    assert clip_with_stats(1.0, by=by).init(params).clip_stats.groups.names == names
    assert track_update_stats(by=by).init(params)["update_stats"].names == names


# -- every group under its own key (issue 18, item 4) --------------------------------------


def test_leaf_names_that_collide_raise_naming_both_paths():
    tree = {"a/b": jnp.ones(1), "a": {"b": jnp.full(1, 2.0)}}
    match = (
        r"`by='leaf'` gives two different key paths the same name 'a/b': \['a'\]\['b'\] "
        r"and \['a/b'\]"
    )
    with pytest.raises(ValueError, match=match):
        jg.grad_stats(tree)
    with pytest.raises(ValueError, match=match):
        jg.grad_clip(tree, 1.0, by="leaf")
    with pytest.raises(
        ValueError, match=r"`path_name` gives two different key paths the same name 'a/b'"
    ):
        jg.grad_nonfinite_report(tree)


@pytest.mark.parametrize(
    ("by", "tree", "shown"),
    [
        ("module", {"a/b": {"w": jnp.ones(1)}, "a": {"b": {"w": jnp.ones(1)}}}, "by='module'"),
        (jg.by_depth(2), {"a/b": jnp.ones(1), "a": {"b": {"c": jnp.ones(1)}}}, "by=by_depth(2)"),
        ("leaf", {"x": [jnp.ones(1)], "x/0": jnp.ones(1)}, "by='leaf'"),
    ],
    ids=["module", "depth", "list-index"],
)
def test_group_names_that_collide_raise(by, tree, shown):
    with pytest.raises(ValueError, match=rf"`{re_escape(shown)}` gives two different key paths"):
        resolve_groups(tree, by)


def re_escape(text):
    import re

    return re.escape(text)


def test_empty_key_and_root_key_come_out_apart():
    stats = jg.grad_stats({"": jnp.array([3.0, 4.0]), "(root)": jnp.array([1.0])})
    logs = stats.as_dict()
    assert logs["norm/['']"] == 5.0 and logs["norm/(root)"] == 1.0
    assert len(logs) == 4 * 3


def test_by_returning_the_empty_name_raises():
    tree = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
    match = (
        r"`by` must not return '' \(the name of the whole-gradient entries\); at \['b'\] "
        r"\(f32\[1\]\) it did"
    )
    with pytest.raises(ValueError, match=match):
        jg.grad_stats(tree, by=lambda path, leaf: "")
    with pytest.raises(ValueError, match=match):
        jg.update_stats(tree, tree, by=lambda path, leaf: "")


def test_a_callable_pools_leaves_by_name_and_none_leaves_out():
    tree = {"w": jnp.array([3.0]), "b": jnp.array([4.0]), "c": jnp.array([1.0])}
    by = lambda path, leaf: None if jg.path_name(path) == "c" else "wb"  # noqa: E731
    stats = jg.grad_stats(tree, by=by)
    assert stats.names == ("", "wb")
    np.testing.assert_allclose(stats.norm, [np.sqrt(26.0), 5.0])


# -- the host read ---------------------------------------------------------------------------


def test_host_read_reads_arrays_numbers_and_numpy_in_order():
    values = host_read("X.as_dict", [jnp.arange(3), np.ones(2), 2.5, jnp.array(1, jnp.int8)])
    assert [type(v) for v in values] == [np.ndarray] * 4
    np.testing.assert_array_equal(values[0], [0, 1, 2])
    assert values[2] == 2.5 and values[3].dtype == np.int8


def test_host_read_refuses_tracers():
    with pytest.raises(TypeError, match=r"`X\.as_dict` reads the values on the host; call it on"):
        jax.jit(lambda x: host_read("X.as_dict", [x])[0])(jnp.ones(1))
    with pytest.raises(TypeError, match=r"`GroupStats\.as_dict` reads the values on the host"):
        jax.jit(lambda g: jg.grad_stats(g).as_dict()["norm"])({"w": jnp.ones(2)})


# 2 processes x 2 CPU devices: statistics replicated and sharded across processes.
TWO_PROCESSES = textwrap.dedent(
    """
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    process_id, port = int(sys.argv[1]), int(sys.argv[2])
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = f"127.0.0.1:{port}"
    jax.distributed.initialize(
        coordinator_address=address, coordinator_bind_address=address, num_processes=2,
        process_id=process_id, initialization_timeout=60, heartbeat_timeout_seconds=60,
        shutdown_timeout_seconds=60,
    )
    import jaxgrad as jg

    mesh = jax.make_mesh((4,), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    rows = np.arange(16.0, dtype=np.float32).reshape(4, 4)
    w = jax.make_array_from_callback(rows.shape, sharded, lambda index: rows[index])
    # replicated across processes: GSPMD statistics of a sharded gradient
    stats = jax.jit(lambda g: jg.grad_stats(g, by="leaf"))({"w": w})
    assert not stats.norm.is_fully_addressable and stats.norm.is_fully_replicated
    logs = stats.as_dict()
    assert np.isclose(logs["norm/w"], np.linalg.norm(rows)), logs
    # sharded across processes: one row of statistics per device, from shard_map
    per_device = jax.jit(
        jax.shard_map(
            lambda g: jax.tree.map(lambda x: x[None], jg.grad_stats(g, by=None)),
            mesh=mesh, in_specs=P("data"), out_specs=P("data"),
            check_vma=False,  # grad_stats's cond and check_vma: the core's business
        )
    )({"w": w})
    assert not per_device.norm.is_fully_addressable
    norms = per_device.as_dict()["norm"]
    np.testing.assert_allclose(norms, np.linalg.norm(rows, axis=1), rtol=1e-6)
    seen = []
    log = jg.MetricsLog(lambda step, logs: seen.append(logs))
    log.add(0, {"grad": stats, "rows": per_device})
    log.flush()
    np.testing.assert_allclose(seen[0]["rows/norm"], norms)
    print(f"process {process_id}: ok", flush=True)
    jax.distributed.shutdown()
    """
)


def test_as_dict_across_two_processes(tmp_path):
    script = tmp_path / "two_processes.py"
    script.write_text(TWO_PROCESSES)
    port = free_port()
    commands = [[sys.executable, str(script), str(i), str(port)] for i in range(2)]
    env = cpu_env(PYTHONPATH=str(ROOT))
    for i, (code, text) in enumerate(run_processes(commands, env=env, cwd=ROOT, timeout_s=150)):
        assert code == 0, f"process {i}:\n{text[-4000:]}"
        assert f"process {i}: ok" in text, text
