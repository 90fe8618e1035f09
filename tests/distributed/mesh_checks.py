"""jaxgrad on 8 simulated CPU devices: sharded leaves, shard_map, pmap, sharded random_grad.

`tests/test_distributed.py` runs this file in a subprocess with 8 CPU devices and turns
each check into one pytest test. To run it by hand:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        .venv/bin/python tests/distributed/mesh_checks.py [check names...]

It prints one `RESULT {json}` line per check and exits with 1 if any failed. Every
check compares with the same function on one device (or numpy on the whole gradient),
for each layout: data-parallel `P("data")`, model-parallel `P(None, "model")` and a 2-D
`("data", "model")` mesh, with explicit mesh axes (JAX's default), and the 2-D mesh with
auto axes too (XLA's sharding propagation).
"""

import functools
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxgrad as jg

CHECKS: dict[str, Callable[[], None]] = {}

# Collectives that move array data between devices; maps must compile to none of them.
MOVING = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


# -- layouts -----------------------------------------------------------------------------

# name: (mesh shape, mesh axis names, specs of the test gradient's leaves)
LAYOUTS = {
    "data": (
        (8,),
        ("data",),
        jg.Gradient([{"bias": P("data")}, {"bias": P("data")}], [{"W": P("data")}]),
    ),
    "model": (
        (8,),
        ("model",),
        jg.Gradient([{"bias": P()}, {"bias": P("model")}], [{"W": P(None, "model")}]),
    ),
    "2d": (
        (2, 4),
        ("data", "model"),
        jg.Gradient([{"bias": P("data")}, {"bias": P("model")}], [{"W": P("data", "model")}]),
    ),
}

# For shard_map: every leaf a shard along the same mesh axes (the reductions' contract).
SHARD_MAP_LAYOUTS = {
    "data": ("data", jg.Gradient([{"bias": P("data")}, {"bias": P("data")}], [{"W": P("data")}])),
    "model": (
        "model",
        jg.Gradient([{"bias": P("model")}, {"bias": P("model")}], [{"W": P(None, "model")}]),
    ),
    "2d": (
        ("data", "model"),
        jg.Gradient(
            [{"bias": P(("data", "model"))}, {"bias": P(("data", "model"))}],
            [{"W": P("data", "model")}],
        ),
    ),
}


def is_spec(x: Any) -> bool:
    return isinstance(x, P)


def make_grad(seed: int = 0) -> jg.Gradient:
    """The test gradient on one device: float32 and bfloat16 leaves, all divisible by 8."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    return jg.Gradient(
        layers=[{"bias": jnp.asarray(normal(16))}, {"bias": jnp.asarray(normal(8), jnp.bfloat16)}],
        weights=[{"W": jnp.asarray(normal(16, 8))}],
    )


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...], explicit: bool) -> jax.sharding.Mesh:
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


@functools.cache
def layouts() -> list[tuple[str, Any, jg.Gradient]]:
    """(label, shardings tree, sharded gradient): each layout with explicit mesh axes
    (JAX's default), and the 2-D one with auto axes too (sharding propagation by XLA)."""
    out = []
    for name, (shape, names, specs) in LAYOUTS.items():
        for explicit in (True, False) if name == "2d" else (True,):
            mesh = make_mesh(shape, names, explicit)
            shardings = jax.tree.map(partial(NamedSharding, mesh), specs, is_leaf=is_spec)
            label = f"{name}/{'explicit' if explicit else 'auto'}"
            out.append((label, shardings, jax.device_put(make_grad(), shardings)))
    return out


def flat64(tree: Any) -> np.ndarray:
    leaves = [
        np.asarray(jnp.asarray(x, jnp.float32), np.float64).ravel() for x in jax.tree.leaves(tree)
    ]
    return np.concatenate(leaves)


def assert_trees_close(
    actual: Any, expected: Any, label: str, rtol: float = 1e-6, atol: float = 1e-6
) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected), label
    for (path, a), e in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected), strict=True
    ):
        where = f"{label} at {jax.tree_util.keystr(path)}"
        assert a.dtype == e.dtype and a.shape == e.shape, (where, a.dtype, e.dtype, a.shape)
        np.testing.assert_allclose(
            np.asarray(a, np.float32),
            np.asarray(e, np.float32),
            rtol=rtol,
            atol=atol,
            err_msg=where,
        )


def assert_same_shardings(actual: Any, expected_shardings: Any, label: str) -> None:
    for (path, a), s in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0],
        jax.tree.leaves(expected_shardings),
        strict=True,
    ):
        assert a.sharding.is_equivalent_to(s, a.ndim), (
            f"{label} at {jax.tree_util.keystr(path)}: {a.sharding} is not {s}"
        )


def _ordinary_path(hlo: str) -> str:
    """The HLO text without the branches of conditionals (and what they call).

    The whole-gradient reductions keep a rare branch (a NaN, an inf or squares beyond
    float32) under a `conditional`, with collectives of its own; only the ordinary path
    runs on an ordinary step.
    """
    bodies = dict(re.findall(r"^(?:ENTRY )?%(\S+) [^\n]*\{\n(.*?)^\}", hlo, flags=re.S | re.M))

    def called(body):
        return re.findall(
            r"(?:computations=\{|computation=|calls=|to_apply=)([^,}\n]+(?:, %[^,}\n]+)*)", body
        )  # noqa: E731

    skip: set[str] = set()
    todo = [
        name.strip().lstrip("%")
        for body in bodies.values()
        for group in re.findall(r"branch_computations=\{([^}]*)\}", body)
        + re.findall(r"(?:true|false)_computation=(%\S+?)[,\s]", body)
        for name in group.split(",")
    ]
    while todo:
        name = todo.pop()
        if name in skip or name not in bodies:
            continue
        skip.add(name)
        for group in called(bodies[name]):
            todo += [n.strip().lstrip("%") for n in group.split(",")]
    return "\n".join(body for name, body in bodies.items() if name not in skip)


def collectives(hlo: str) -> dict[str, int]:
    """Number of each collective op on the ordinary path of a compiled HLO module's text.

    Async pairs count once; the branches of conditionals are left out (`_ordinary_path`).
    """
    ops = ("all-reduce", *MOVING)
    text = _ordinary_path(hlo)
    return {op: len(re.findall(rf"[\s)]{op}(?:-start)?\(", text)) for op in ops}


def jit_run(fn: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, int]]:
    """`jax.jit(fn)(*args)` and the collectives of its compiled HLO, from one compilation.

    `keep_unused`: `jnp.zeros_like` (in `zero_grad`) reads no input, and without it JAX
    would lose the device assignment of explicitly sharded inputs outside `jax.set_mesh`.
    """
    executable = jax.jit(fn, keep_unused=True).lower(*args).compile()
    return executable(*args), collectives(executable.as_text())


def count_psums(jaxpr: Any) -> int:
    """Number of psum equations in a jaxpr on the ordinary path (cond branches left out)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("psum"):
            total += 1
        if eqn.primitive.name == "cond":  # the rare overflow-safe branch: not the ordinary path
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds a Jaxpr
                if hasattr(sub, "eqns"):
                    total += count_psums(sub)
    return total


# -- checks ------------------------------------------------------------------------------


@check
def check_eight_devices() -> None:
    assert jax.device_count() == 8, jax.devices()
    assert jax.config.jax_threefry_partitionable, "expected the default of this JAX version"


# name: (function, whether the function is jaxgrad's own compiled dispatch when eager)
MAPS: dict[str, Callable[[Any], Any]] = {
    "grad_apply": lambda g: jg.grad_apply(lambda x: 2 * x + 1, g),
    "grad_apply_": lambda g: jg.grad_apply_(jnp.negative, g),
    "grad_mapzip": lambda g: jg.grad_mapzip(jnp.multiply, g, g),
    "grad_mapzip_": lambda g: jg.grad_mapzip_(lambda m, x: 0.9 * m + 0.1 * x, g, g),
    "Gradient arithmetic": lambda g: 2 * g - g / 4,
    "zero_grad": jg.zero_grad,
    "grad_normalize": jg.grad_normalize,
    "grad_normalize_": jg.grad_normalize_,
}
# Eager calls of these go through jaxgrad's own compiled dispatch; the others are
# `jax.tree.map` of the caller's function, JAX's own eager behaviour.
OWN_DISPATCH = ("zero_grad", "grad_normalize", "grad_normalize_")


@check
def check_maps_keep_each_leaf_sharding_and_never_gather() -> None:
    expected = {name: fn(make_grad()) for name, fn in MAPS.items()}
    normalizations = [name for name in MAPS if name.startswith("grad_normalize")]
    pure_maps = [name for name in MAPS if name not in normalizations]
    for label, shardings, g in layouts():
        # the maps in one compiled function: no collective at all
        jitted, ops = jit_run(lambda t: {name: MAPS[name](t) for name in pure_maps}, g)
        assert sum(ops.values()) == 0, (label, ops)
        # the normalizations: only the all-reduce of the norm
        normalized, ops = jit_run(lambda t: {name: MAPS[name](t) for name in normalizations}, g)
        assert all(ops[op] == 0 for op in MOVING) and ops["all-reduce"] >= 1, (label, ops)
        jitted |= normalized
        for name, fn in MAPS.items():
            where = f"{name} on {label}"
            modes = [("jit", jitted[name])]
            if name == "zero_grad" and label.endswith("auto"):
                # inside the caller's jit with auto axes, XLA places zeros (which read
                # no input) as it likes; only explicit axes carry the sharding there
                modes = []
            if name in OWN_DISPATCH:
                modes.append(("eager", fn(g)))
            for mode, out in modes:
                assert_same_shardings(out, shardings, f"{where} ({mode})")
                assert_trees_close(out, expected[name], f"{where} ({mode})", rtol=1e-2)


@check
def check_donated_maps_keep_shardings() -> None:
    for label, shardings, _ in layouts()[:3]:  # explicit axes, each mesh
        for name, call in {
            "grad_apply_": lambda g: jg.grad_apply_(jnp.negative, g, donate=True),
            "grad_mapzip_": lambda g: jg.grad_mapzip_(jnp.add, g, make_grad(1), donate=True),
            "grad_normalize_": lambda g: jg.grad_normalize_(g, donate=True),
        }.items():
            g = jax.device_put(make_grad(), shardings)
            out = call(g)
            assert all(x.is_deleted() for x in jax.tree.leaves(g)), (name, label)
            assert_same_shardings(out, shardings, f"{name} donated on {label}")
            assert_trees_close(out, call(make_grad()), f"{name} donated on {label}", rtol=1e-2)


@check
def check_accumulator_keeps_each_leaf_sharding() -> None:
    """`GradSum.zeros_like` sums where the parameters are; add and mean keep it, eager and jit."""
    grads = [make_grad(seed) for seed in (1, 2, 3)]
    expected = jax.tree.map(
        lambda *xs: jnp.mean(jnp.stack([x.astype(jnp.float32) for x in xs]), 0).astype(xs[0].dtype),
        *grads,
    )
    for label, shardings, params in layouts():
        sharded = [jax.device_put(g, shardings) for g in grads]
        state = jg.GradSum.zeros_like(params)
        assert_same_shardings(state.total, shardings, f"GradSum.zeros_like on {label}")
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.total)), label
        devices = params.layers[0]["bias"].sharding.device_set
        assert state.count.sharding.device_set == devices, (label, state.count.sharding)
        for i, (donate, g) in enumerate(zip((False, True, True), sharded, strict=True)):
            before = state
            state = jg.GradSum.add(state, g, donate=donate)
            assert all(x.is_deleted() for x in jax.tree.leaves(before)) == donate, (label, i)
            assert_same_shardings(state.total, shardings, f"GradSum.add #{i} on {label}")
        mean = jg.GradSum.mean(state)
        assert_same_shardings(mean, shardings, f"GradSum.mean on {label}")
        assert_trees_close(mean, expected, f"mean on {label}", rtol=1e-2, atol=1e-2)

        def inside(params, *gs):
            state = jg.GradSum.zeros_like(params)
            for g in gs:
                state = jg.GradSum.add(state, g)
            return jg.GradSum.mean(state)

        out, ops = jit_run(inside, params, *sharded)
        assert sum(ops.values()) == 0, (label, ops)  # no data moves between devices
        assert_same_shardings(out, shardings, f"accumulator inside jit on {label}")
        assert_trees_close(
            out, expected, f"accumulator inside jit on {label}", rtol=1e-2, atol=1e-2
        )


@check
def check_microbatches_of_sharded_params_keep_their_sharding() -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.float32)

    def loss(g: Any, x: Any) -> Any:
        w = g.weights[0]["W"].astype(jnp.float32)
        return jnp.mean(jnp.tanh(x @ w) ** 2) + jnp.sum(g.layers[0]["bias"] ** 2)

    single = jg.grad_microbatch_mean(jax.grad(loss), make_grad(), x)
    for label, shardings, params in layouts():
        for mode, run in (
            ("eager", jg.grad_microbatch_mean),
            ("jit", jax.jit(jg.grad_microbatch_mean, static_argnums=0)),
        ):
            if mode == "jit" and label.endswith("auto"):
                continue  # XLA places the result as it likes there
            out = run(jax.grad(loss), params, x)
            assert_same_shardings(out, shardings, f"microbatches {mode} on {label}")
            assert_trees_close(out, single, f"microbatches {mode} on {label}", rtol=1e-4, atol=1e-5)


def as_dict(g: jg.Gradient) -> dict[str, Any]:
    return {"a": g.layers[0]["bias"], "b": g.layers[1]["bias"], "c": g.weights[0]["W"]}


def on_different_devices(seed: int = 0) -> dict[str, Any]:
    """Leaves committed by hand: one on device 0, one on device 1, one sharded over 2-5."""
    devices = jax.devices()
    mesh = jax.make_mesh((4,), ("data",), devices=devices[2:6], axis_types=(AxisType.Explicit,))
    g = as_dict(make_grad(seed))
    return {
        "a": jax.device_put(g["a"], devices[0]),
        "b": jax.device_put(g["b"], devices[1]),
        "c": jax.device_put(g["c"], NamedSharding(mesh, P("data"))),
    }


def device_ids(tree: Any) -> dict[str, list[int]]:
    return jax.tree.map(lambda x: sorted(d.id for d in x.sharding.device_set), tree)


@check
def check_accumulator_with_leaves_on_different_devices() -> None:
    """No "incompatible devices": each sum stays where its leaf is, donated or not."""
    params = on_different_devices()
    where_params = device_ids(params)
    assert where_params == {"a": [0], "b": [1], "c": [2, 3, 4, 5]}, where_params
    state = jg.GradSum.zeros_like(params)
    assert device_ids(state.total) == where_params, device_ids(state.total)
    grads = [on_different_devices(seed) for seed in (1, 2)]
    # a gradient on other devices than its sums is moved to them
    grads.append(jax.device_put(as_dict(make_grad(3)), jax.devices()[7]))
    for i, (donate, g) in enumerate(zip((True, False, True), grads, strict=True)):
        before = state
        state = jg.GradSum.add(state, g, donate=donate)
        assert all(x.is_deleted() for x in jax.tree.leaves(before)) == donate, i
        assert device_ids(state.total) == where_params, (i, device_ids(state.total))
        assert not any(x.is_deleted() for x in jax.tree.leaves(g)), i
    assert int(state.count) == 3
    mean = jg.GradSum.mean(state)
    assert device_ids(mean) == where_params, device_ids(mean)
    # all sums on device 1 and the gradient committed to device 0: moved to the sums
    one = jg.GradSum.zeros_like(jax.device_put({"w": jnp.zeros(3)}, jax.devices()[1]))
    one = jg.GradSum.add(one, jax.device_put({"w": jnp.ones(3)}, jax.devices()[0]))
    assert device_ids(one.total) == {"w": [1]}, device_ids(one.total)
    np.testing.assert_array_equal(jg.GradSum.mean(one)["w"], np.ones(3))
    expected = jax.tree.map(
        lambda *xs: np.mean([np.asarray(x, np.float32) for x in xs], 0), *jax.device_get(grads)
    )
    for key in "abc":
        assert mean[key].dtype == params[key].dtype, key
        np.testing.assert_allclose(
            np.asarray(mean[key], np.float32), expected[key], rtol=1e-2, atol=1e-2, err_msg=key
        )


@check
def check_donated_maps_per_device_with_leaves_on_different_devices() -> None:
    """`grad_apply_`/`grad_mapzip_` with `donate=True` keep each leaf on its device.

    They raised XLA's "incompatible devices" on leaves committed to different devices;
    their donated kernel now runs once per device set and still donates every buffer.
    """
    tree = on_different_devices()
    where_tree = device_ids(tree)
    expected = jax.tree.map(lambda x: -np.asarray(x, np.float32), jax.device_get(tree))
    out = jg.grad_apply_(jnp.negative, tree, donate=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(tree))
    assert device_ids(out) == where_tree, device_ids(out)
    for key in "abc":
        np.testing.assert_allclose(np.asarray(out[key], np.float32), expected[key], err_msg=key)
    other = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[7]), on_different_devices(1))
    summed = jg.grad_mapzip_(jnp.add, out, other, donate=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(out))
    assert not any(x.is_deleted() for x in jax.tree.leaves(other))
    assert device_ids(summed) == where_tree, device_ids(summed)


def accumulate_sum(g: Any, axis_name: Any = None) -> Any:
    return jg.grad_accumulate(lambda x: jnp.sum(x.astype(jnp.float32)), g, axis_name=axis_name)


REDUCTIONS: dict[str, Callable[..., Any]] = {
    "grad_norm": jg.grad_norm,
    "grad_rms": jg.grad_rms,
    "grad_accumulate": accumulate_sum,
}


def numpy_reductions(tree: Any) -> dict[str, float]:
    flat = flat64(tree)
    return {
        "grad_norm": float(np.sqrt(np.sum(flat**2))),
        "grad_rms": float(np.sqrt(np.mean(flat**2))),
        "grad_accumulate": float(np.sum(flat)),
    }


@check
def check_reductions_are_global_and_replicated() -> None:
    expected = numpy_reductions(make_grad())
    for label, _, g in layouts():
        jitted, ops = jit_run(lambda t: {n: fn(t) for n, fn in REDUCTIONS.items()}, g)
        assert all(ops[op] == 0 for op in MOVING), (label, ops)
        for name, fn in REDUCTIONS.items():
            where = f"{name} on {label}"
            for mode, out in (("jit", jitted[name]), ("eager", fn(g))):
                assert out.shape == () and out.dtype == jnp.float32, (where, mode, out)
                assert out.sharding.is_fully_replicated, (where, mode, out.sharding)
                np.testing.assert_allclose(float(out), expected[name], rtol=1e-5, err_msg=where)
        if label.startswith("data"):
            # XLA combines the per-leaf partial sums into one (tuple) all-reduce
            _, ops = jit_run(jg.grad_norm, g)
            assert ops == {"all-reduce": 1} | {op: 0 for op in MOVING}, (label, ops)


@check
def check_flatten_and_unflatten_of_sharded_gradients() -> None:
    single = make_grad()
    expected = jg.grad_flatten(single)
    for label, _, g in layouts():
        jitted, _ = jit_run(jg.grad_flatten, g)
        for mode, vector in (("jit", jitted), ("eager", jg.grad_flatten(g))):
            assert vector.dtype == expected.dtype, (label, mode)
            np.testing.assert_array_equal(vector, expected, err_msg=f"{label} {mode}")
        back = jg.grad_unflatten(jitted, g)
        assert_trees_close(back, single, f"grad_unflatten on {label}", rtol=0)


def shard_map_cases() -> list[tuple[str, Any, Any, jg.Gradient, Any]]:
    """(label, axis_name, shard_map factory, sharded gradient, specs) for shard_map."""
    out = []
    for name, (axis_name, specs) in SHARD_MAP_LAYOUTS.items():
        shape, names, _ = LAYOUTS[name]
        for check_vma in (True, False) if name == "2d" else (True,):
            mesh = make_mesh(shape, names, explicit=True)
            shardings = jax.tree.map(partial(NamedSharding, mesh), specs, is_leaf=is_spec)
            g = jax.device_put(make_grad(), shardings)

            def smap(fn, out_specs, mesh=mesh, specs=specs, check_vma=check_vma):
                return jax.shard_map(
                    fn, mesh=mesh, in_specs=(specs,), out_specs=out_specs, check_vma=check_vma
                )

            out.append((f"{name}/check_vma={check_vma}", axis_name, smap, g, specs))
    return out


@check
def check_shard_map_reductions_one_psum_global_value_on_every_shard() -> None:
    expected = numpy_reductions(make_grad())
    for label, axis_name, smap, g, _ in shard_map_cases():
        axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
        for name, fn in REDUCTIONS.items():
            # one all-reduce per set of axes the leaves vary along, whatever the leaves
            one = smap(lambda t, fn=fn, a=axis_name: fn(t, axis_name=a), P())
            _, single = jit_run(one, g)
            assert 1 <= single["all-reduce"] <= 2, (f"{name} in shard_map on {label}", single)
        # every shard holds the global value: one row per shard
        per_shard = smap(
            lambda t, a=axis_name: jnp.stack([fn(t, axis_name=a) for fn in REDUCTIONS.values()])[
                None
            ],
            P(axes),
        )
        values, ops = jit_run(per_shard, g)
        assert values.shape == (8, len(REDUCTIONS)), (label, values.shape)
        for i, name in enumerate(REDUCTIONS):
            np.testing.assert_allclose(
                np.asarray(values[:, i]), expected[name], rtol=1e-5, err_msg=f"{name} on {label}"
            )
        assert 1 <= ops["all-reduce"] <= len(REDUCTIONS), (label, ops)
        assert all(ops[op] == 0 for op in MOVING), (label, ops)


@check
def check_shard_map_normalize_equals_single_device() -> None:
    expected = jg.grad_normalize(make_grad())
    for label, axis_name, smap, g, specs in shard_map_cases():
        for name, fn in {
            "grad_normalize": jg.grad_normalize,
            "grad_normalize_": jg.grad_normalize_,
        }.items():
            one = smap(lambda t, fn=fn, a=axis_name: fn(t, axis_name=a), specs)
            _, single = jit_run(one, g)
            assert 1 <= single["all-reduce"] <= 2, (name, label, single)
        both = smap(
            lambda t, a=axis_name: (
                jg.grad_normalize(t, axis_name=a),
                jg.grad_normalize_(t, axis_name=a),
            ),
            (specs, specs),
        )
        outs, ops = jit_run(both, g)
        assert all(ops[op] == 0 for op in MOVING), (label, ops)
        for name, out in zip(("grad_normalize", "grad_normalize_"), outs, strict=True):
            where = f"{name} in shard_map on {label}"
            assert_same_shardings(out, jax.tree.map(lambda x: x.sharding, g), where)
            assert_trees_close(out, expected, where, rtol=1e-2)


def per_replica_grads(mesh: Any, axes: tuple[str, ...]) -> tuple[Any, Any]:
    """Eight different whole gradients stacked on a leading axis sharded over `axes`."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[make_grad(i) for i in range(8)])
    return stacked, jax.device_put(stacked, NamedSharding(mesh, P(axes)))


def replica_reference(
    stacked: Any, shape: tuple[int, ...], axis_ids: tuple[int, ...], reduce: Any
) -> Any:
    """numpy `reduce` over the replicas that share the other mesh coordinates."""

    def one(x: Any) -> Any:
        grid = np.asarray(x, np.float32).reshape(*shape, *x.shape[1:])
        out = np.broadcast_to(reduce(grid, axis=axis_ids, keepdims=True), grid.shape)
        return jnp.asarray(out.reshape(x.shape)).astype(x.dtype)

    return jax.tree.map(one, stacked)


@check
def check_pmean_and_psum_across_replicas_in_shard_map() -> None:
    for shape, names, axis_names in (
        ((8,), ("data",), ["data"]),
        ((2, 4), ("data", "model"), [("data", "model"), "data"]),
    ):
        mesh = make_mesh(shape, names, explicit=True)
        stacked, sharded = per_replica_grads(mesh, names)
        for axis_name in axis_names:
            axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
            axis_ids = tuple(names.index(a) for a in axes)

            def body(t, axis_name=axis_name):
                local = jax.tree.map(lambda x: x[0], t)  # this replica's whole gradient
                out = (jg.grad_pmean(local, axis_name), jg.grad_psum(local, axis_name))
                return jax.tree.map(lambda x: x[None], out)

            run = jax.shard_map(body, mesh=mesh, in_specs=P(names), out_specs=P(names))
            (mean, total), ops = jit_run(run, sharded)
            where = f"axis_name={axis_name!r} on mesh {dict(zip(names, shape, strict=True))}"
            ref_mean = replica_reference(stacked, shape, axis_ids, np.mean)
            ref_sum = replica_reference(stacked, shape, axis_ids, np.sum)
            assert_trees_close(mean, ref_mean, "grad_pmean " + where, rtol=1e-2, atol=3e-2)
            assert_trees_close(total, ref_sum, "grad_psum " + where, rtol=1e-2, atol=3e-2)
            assert all(ops[op] == 0 for op in MOVING), (where, ops)
            # XLA's combiner fuses the leaves (f32, bf16, f32) of each call into one
            # tuple all-reduce; two calls (pmean, psum) of the same tree are combined too
            assert 1 <= ops["all-reduce"] <= 2, (where, ops)
            one = jax.shard_map(
                lambda t, axis_name=axis_name: jax.tree.map(
                    lambda x: x[None], jg.grad_pmean(jax.tree.map(lambda x: x[0], t), axis_name)
                ),
                mesh=mesh,
                in_specs=P(names),
                out_specs=P(names),
            )
            _, ops = jit_run(one, sharded)
            assert ops["all-reduce"] == 1, ("grad_pmean " + where, ops)


@check
def check_pmean_of_gradients_from_jax_grad_in_shard_map() -> None:
    """The data-parallel idioms of grad_pmean's docstring, and the pitfall it describes."""
    mesh = make_mesh((8,), ("data",), explicit=True)
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(64, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32)

    def loss(w, x):
        return jnp.mean((x @ w) ** 2)

    whole_batch = np.asarray(jax.grad(loss)(w, x))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ws = jax.device_put(w, NamedSharding(mesh, P()))

    def run(body, check_vma=True):
        smap = jax.shard_map(
            body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=check_vma
        )
        return np.asarray(jax.jit(smap)(ws, xs))

    def own(w):
        return jax.lax.pcast(w, "data", to="varying")

    # per-device gradients, averaged: the gradient of the whole batch
    mean = run(lambda w, x: jg.grad_pmean(jax.grad(loss)(own(w), x), "data"))
    np.testing.assert_allclose(mean, whole_batch, rtol=1e-5)
    mean = run(lambda w, x: jg.grad_pmean(jax.grad(loss)(w, x), "data"), check_vma=False)
    np.testing.assert_allclose(mean, whole_batch, rtol=1e-5)
    # with check_vma, the gradient for replicated `w` is already the sum over devices,
    # the same on every device, and averaging it leaves it as it is
    summed = run(lambda w, x: jg.grad_pmean(jax.grad(loss)(w, x), "data"))
    np.testing.assert_allclose(summed, 8 * whole_batch, rtol=1e-5)


@check
def check_pmap_axis_name() -> None:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[make_grad(i) for i in range(8)])
    norm, mean = jax.pmap(
        lambda g: (jg.grad_norm(g, axis_name="i"), jg.grad_pmean(g, "i")), axis_name="i"
    )(stacked)
    np.testing.assert_allclose(np.asarray(norm), np.linalg.norm(flat64(stacked)), rtol=1e-5)
    expected = jax.tree.map(lambda x: jnp.mean(x.astype(jnp.float32), 0).astype(x.dtype), stacked)
    for i in range(8):
        replica = jax.tree.map(lambda x, i=i: x[i], mean)
        assert_trees_close(replica, expected, f"pmap replica {i}", rtol=1e-2, atol=3e-2)


def largest_u32_array(hlo: str) -> int:
    shapes = re.findall(r"u32\[([\d,]*)\]", hlo)
    return max((int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes), default=0)


@check
def check_random_grad_generated_sharded_equals_unsharded() -> None:
    key = jax.random.key(42)
    model = make_grad()
    expected = jg.random_grad(model, key)
    for i, (label, shardings, _) in enumerate(layouts()):  # data, model, 2d, 2d/auto
        # eager calls for half the layouts, calls inside the caller's jit for the other
        if i in (0, 3):
            where = f"random_grad on {label}"
            out = jg.random_grad(model, key, out_shardings=shardings)
        else:
            where = f"random_grad inside jit on {label}"
            inside = jax.jit(lambda k, sh=shardings: jg.random_grad(model, k, out_shardings=sh))
            executable = inside.lower(key).compile()
            out, hlo = executable(key), executable.as_text()
            assert sum(collectives(hlo).values()) == 0, (where, collectives(hlo))
            # each device generates only its own shards: no array of random bits in the
            # compiled module is larger than the largest shard
            largest_shard = max(
                int(np.prod(s.shard_shape(x.shape)))
                for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(model), strict=True)
            )
            assert largest_u32_array(hlo) <= largest_shard < 128, (where, largest_u32_array(hlo))
        assert_same_shardings(out, shardings, where)
        assert_trees_close(out, expected, where, rtol=0)
    label, shardings, _ = layouts()[2]
    # another sampler
    expected = jg.random_grad(model, key, sampler=jax.random.normal)
    out = jg.random_grad(model, key, sampler=jax.random.normal, out_shardings=shardings)
    assert_same_shardings(out, shardings, f"normal on {label}")
    assert_trees_close(out, expected, f"normal on {label}", rtol=0)


@check
def check_random_grad_one_sharding_for_all_leaves_and_errors() -> None:
    key = jax.random.key(0)
    model = make_grad()
    mesh = make_mesh((8,), ("data",), explicit=True)
    rows = NamedSharding(mesh, P("data"))
    out = jg.random_grad(model, key, out_shardings=rows)
    assert all(x.sharding == rows for x in jax.tree.leaves(out))
    assert_trees_close(out, jg.random_grad(model, key), "one sharding", rtol=0)
    try:
        jg.random_grad({"w": jnp.zeros(6)}, key, out_shardings=rows)
    except ValueError as error:
        assert "`out_shardings` at ['w'] does not fit the leaf f32[6]" in str(error), error
    else:
        raise AssertionError("an indivisible sharding must raise")
    try:
        jg.random_grad({"w": jnp.zeros(())}, key, out_shardings=rows)
    except ValueError as error:
        assert "too many dimensions" in str(error), error
    else:
        raise AssertionError("a sharding of higher rank than its leaf must raise")


@check
def check_random_grad_without_partitionable_threefry_gives_the_same_numbers() -> None:
    key = jax.random.key(7)
    model = make_grad()
    label, shardings, _ = layouts()[2]
    jax.config.update("jax_threefry_partitionable", False)
    try:
        expected = jg.random_grad(model, key)
        out = jg.random_grad(model, key, out_shardings=shardings)
        assert_same_shardings(out, shardings, label)
        assert_trees_close(out, expected, f"partitionable=False on {label}", rtol=0)
    finally:
        jax.config.update("jax_threefry_partitionable", True)


# -- replicated leaves inside shard_map, collectives of every op --------------------------


def fsdp_tree(mesh: Any, n: int = 6, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """An FSDP-style gradient: kernels sharded along "data", biases and scales replicated."""
    rng = np.random.default_rng(seed)
    tree, specs = {}, {}
    for i in range(n):
        tree[f"l{i}/kernel"] = rng.normal(size=(16, 4 + i)).astype(np.float32)
        specs[f"l{i}/kernel"] = P("data")
        tree[f"l{i}/bias"] = rng.normal(size=(4 + i,)).astype(np.float32)
        specs[f"l{i}/bias"] = P()
    tree["l0/bias"][0] = 3e30  # a huge entry: the scaled sums, replicated leaves and all
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    return jax.device_put(tree, shardings), specs


WHOLE_GRADIENT_OPS: dict[str, Callable[..., Any]] = {
    "grad_norm": lambda t, a=None: jg.grad_norm(t, axis_name=a),
    "grad_rms": lambda t, a=None: jg.grad_rms(t, axis_name=a),
    "grad_norm_ord1": lambda t, a=None: jg.grad_norm(t, ord=1, axis_name=a),
    "grad_norm_inf": lambda t, a=None: jg.grad_norm(t, ord=np.inf, axis_name=a),
    "grad_clip_recipe": lambda t, a=None: jg.grad_clip(t, 1.0, by="leaf", axis_name=a)[1],
    "grad_clip_by_rms": lambda t, a=None: jg.grad_clip_by_rms(t, 1.0, axis_name=a)[1],
    "grad_stats": lambda t, a=None: jg.grad_stats(t, by="module", axis_name=a),
    "grad_nonfinite_report": lambda t, a=None: jg.grad_nonfinite_report(t, axis_name=a).counts,
    "grad_all_finite": lambda t, a=None: jg.grad_all_finite(t, axis_name=a),
}


@check
def check_replicated_leaves_are_counted_once_in_shard_map() -> None:
    """Under check_vma=True, leaves replicated along the axis count once, as under GSPMD."""
    mesh = make_mesh((8,), ("data",), explicit=True)
    g, specs = fsdp_tree(mesh)
    for name, op in WHOLE_GRADIENT_OPS.items():
        expected = jax.jit(op)(g)  # GSPMD on the global arrays: the reference
        run = jax.shard_map(
            partial(op, a="data"), mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=True
        )
        got = jax.jit(run)(g)
        assert_trees_close(got, expected, f"{name} in shard_map(check_vma=True)", rtol=2e-6)
    # the case: w sharded (zeros), b replicated (ones): norm 2, not 2 * sqrt(8)
    small = {"w": jnp.zeros((8, 4)), "b": jnp.ones(4)}
    small_specs = {"w": P("data"), "b": P()}
    small = jax.device_put(small, {k: NamedSharding(mesh, s) for k, s in small_specs.items()})
    for check_vma, expected in ((True, 2.0), (False, 2.0 * np.sqrt(8))):
        run = jax.shard_map(
            partial(jg.grad_norm, axis_name="data"),
            mesh=mesh,
            in_specs=(small_specs,),
            out_specs=P(),
            check_vma=check_vma,
        )
        # check_vma=False: JAX's types say nothing; every leaf is a shard (documented)
        np.testing.assert_allclose(float(jax.jit(run)(small)), expected, rtol=1e-6)


@check
def check_collectives_of_every_op_are_few_and_never_gather() -> None:
    """GSPMD jit on an FSDP mesh (Auto axes): no data-moving collective, and the
    all-reduces and the arrays they carry do not grow with the leaves. The leaves'
    placement is decided by the partitioner, and the per-leaf results of all of them are
    summed in one call that XLA partitions knowing their shardings, not one operand per
    leaf and kind; the recipe has one all-reduce for sums and counts, one for maxima.
    Each device reduces its shards, the small ones packed (as on one device), so the
    statistics cost a bounded number of kernels per leaf (a sharded kernel and a
    replicated bias: 3 now; 8 when each small leaf was reduced alone, 18 when each small
    leaf's sums were sliced apart one by one)."""
    mesh = make_mesh((8,), ("data",), explicit=False)
    counts: dict[str, list[tuple[int, int, int]]] = {}
    for n in (6, 12):
        g, _ = fsdp_tree(mesh, n=n)
        for name, op in WHOLE_GRADIENT_OPS.items():
            text = jax.jit(op).lower(g).compile().as_text()
            ops = collectives(text)
            assert all(ops[m] == 0 for m in MOVING), (name, n, ops)
            ordinary = _ordinary_path(text)
            kernels = ordinary.count(" fusion(") + ordinary.count(" reduce(")
            counts.setdefault(name, []).append(
                (ops["all-reduce"], all_reduce_operands(text), kernels)
            )
    for name, (small, large) in counts.items():
        assert large[0] <= small[0] and large[1] <= small[1] <= 6, (name, counts[name])
    assert counts["grad_clip_recipe"][1][0] <= 2, counts["grad_clip_recipe"]
    for name in ("grad_clip_recipe", "grad_stats"):
        (_, _, small), (_, _, large) = counts[name]
        assert (large - small) / 6 <= 4, (name, counts[name])


def all_reduce_operands(hlo: str) -> int:
    """Number of arrays all-reduced on the ordinary path (a tuple all-reduce counts each).

    XLA merges independent all-reduces into one of many operands; its CPU backend then
    meets all devices once per operand, so operands, not instructions, are the cost.
    """
    total = 0
    for line in _ordinary_path(hlo).splitlines():
        if re.search(r"[\s)]all-reduce(?:-start)?\(", line) and " = " in line:
            result = line.split(" = ", 1)[1].split(" all-reduce", 1)[0]
            total += result.count("[")
    return total


@check
def check_leaves_split_along_different_axes_two_all_reduces() -> None:
    """GSPMD jit, Auto or Explicit axes, a 4 x 2 mesh: leaves split along data, model,
    both or none are each counted once, in one all-reduce for the sums and counts and
    one for the maxima, whatever the axes."""
    rng = np.random.default_rng(1)
    specs = {"both": P("data", "model"), "data": P("data"), "model": P(None, "model"), "none": P()}
    tree = {k: rng.normal(size=(8, 6)).astype(np.float32) for k in specs}
    tree["data"][3, 1] = np.nan
    tree["none"][0, 0] = 3e30  # squares beyond float32: the scaled sums
    for explicit in (False, True):
        mesh = make_mesh((4, 2), ("data", "model"), explicit=explicit)
        g = jax.device_put(tree, {k: NamedSharding(mesh, s) for k, s in specs.items()})
        for name in ("grad_clip_recipe", "grad_stats", "grad_nonfinite_report", "grad_norm"):
            op = WHOLE_GRADIENT_OPS[name]
            got, ops = jit_run(op, g)
            label = f"{name} on a 4 x 2 mesh, explicit={explicit}"
            assert_trees_close(got, op(tree), label, rtol=2e-6)
            assert ops["all-reduce"] <= 2 and all(ops[m] == 0 for m in MOVING), (label, ops)


@check
def check_derivatives_vmap_and_no_shardy_under_auto_axes() -> None:
    """The partitioned reduction is, differentiated, vmapped, inside `lax.scan` or
    `lax.cond`, or partitioned by GSPMD without Shardy, the per-leaf reductions it stands
    for: the values of one device."""
    mesh = make_mesh((8,), ("data",), explicit=False)
    g, _ = fsdp_tree(mesh)
    host = {k: np.array(v) for k, v in jax.device_get(g).items()}
    host["l0/bias"][0] = 1.0  # squares in float32's range: the ordinary path's derivative
    g = jax.device_put(host, jax.tree.map(lambda x: x.sharding, g))
    got = jax.jit(jax.grad(jg.grad_norm))(g)
    assert_trees_close(got, jax.grad(jg.grad_norm)(host), "grad of grad_norm", rtol=2e-6)
    stacked = jax.device_put(
        np.stack([host["l1/kernel"] * k for k in (1.0, 2.0, 3.0)]),
        NamedSharding(mesh, P(None, "data")),
    )
    got = jax.jit(jax.vmap(lambda x: jg.grad_clip({"x": x}, 1.0, by="leaf")[1]))(stacked)
    want = jax.vmap(lambda x: jg.grad_clip({"x": x}, 1.0, by="leaf")[1])(np.asarray(stacked))
    assert_trees_close(got, want, "vmapped recipe", rtol=2e-6)
    # inside lax.scan and lax.cond (a microbatch loop, a guarded branch)
    steps = jnp.arange(1.0, 4.0, dtype=jnp.float32)
    scanned = jax.jit(
        lambda t: jax.lax.scan(
            lambda c, k: (c + jg.grad_norm(jax.tree.map(lambda x: x * k, t)), None), 0.0, steps
        )[0]
    )(g)
    want = sum(
        float(jg.grad_norm(jax.tree.map(lambda x, k=k: x * k, host))) for k in (1.0, 2.0, 3.0)
    )
    np.testing.assert_allclose(float(scanned), want, rtol=2e-6)
    branched = jax.jit(lambda t, p: jax.lax.cond(p, lambda: jg.grad_norm(t), lambda: 0.0))(g, True)
    np.testing.assert_allclose(float(branched), float(jg.grad_norm(host)), rtol=2e-6)
    shardy = jax.config.jax_use_shardy_partitioner  # type: ignore[attr-defined]
    try:
        jax.config.update("jax_use_shardy_partitioner", not shardy)
        for name in ("grad_clip_recipe", "grad_nonfinite_report"):
            got = jax.jit(WHOLE_GRADIENT_OPS[name])(g)
            assert_trees_close(got, WHOLE_GRADIENT_OPS[name](host), name, rtol=2e-6)
    finally:
        jax.config.update("jax_use_shardy_partitioner", shardy)


def main(names: list[str]) -> int:
    failed = 0
    for name in names or list(CHECKS):
        start = time.perf_counter()
        cpu = time.process_time()
        try:
            CHECKS[name]()
            result = {"name": name, "ok": True}
        except Exception:  # report every failure, run the remaining checks
            failed += 1
            result = {"name": name, "ok": False, "error": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["cpu_seconds"] = round(time.process_time() - cpu, 2)
        print("RESULT " + json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    sys.exit(main(sys.argv[1:]))
