"""Many devices and many processes: collectives, `axis_name`, sharded `random_grad`.

This process has one CPU device. The 8-device checks (tests/distributed/mesh_checks.py)
run in a subprocess with `--xla_force_host_platform_device_count=8`, one pytest test per
check; the multi-process test runs examples/multihost.py as 2 processes x 2 CPU devices
with a coordinator on 127.0.0.1 and gloo collectives. Every wait is bounded and the
children are killed on failure.
"""

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cpu_env, flat, free_port, make_tree, run_processes, stop
from jax.sharding import PartitionSpec as P
from jax.sharding import SingleDeviceSharding

import jaxgrad as jg

ROOT = Path(__file__).resolve().parent.parent
MESH_CHECKS = ROOT / "tests" / "distributed" / "mesh_checks.py"
MULTIHOST = ROOT / "examples" / "multihost.py"
MESH_TIMEOUT_S = 300
MULTIHOST_TIMEOUT_S = 150


def _check_names() -> list[str]:
    spec = importlib.util.spec_from_file_location("_jaxgrad_mesh_checks", MESH_CHECKS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.CHECKS)


# -- the 8-device run, started with the module -------------------------------------------


class _MeshRun:
    """The subprocess that runs every 8-device check, started once, read once."""

    def __init__(self) -> None:
        self.output = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, str(MESH_CHECKS)],
            cwd=ROOT,
            env=cpu_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
            stdout=self.output,
            stderr=subprocess.STDOUT,
        )
        self.started = time.monotonic()
        self._results: dict[str, dict] | None = None

    def results(self) -> dict[str, dict]:
        if self._results is None:
            try:
                self.process.wait(timeout=max(1.0, MESH_TIMEOUT_S - self.elapsed()))
            except subprocess.TimeoutExpired:
                stop(self.process)
            self.output.seek(0)
            text = self.output.read()
            self._results = {
                r["name"]: r
                for r in (
                    json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")
                )
            }
            self._results["__output__"] = {"text": text, "returncode": self.process.returncode}
        return self._results

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def close(self) -> None:
        stop(self.process)
        self.output.close()


@pytest.fixture(scope="module", autouse=True)
def mesh_run():
    """Started with this module, the 8-device run goes on while the other tests run."""
    run = _MeshRun()
    yield run
    run.close()


# -- one device: grad_psum / grad_pmean under a named vmap -------------------------------


def _replicas(dtype=jnp.float32):
    """Three per-replica gradients stacked on axis 0 (a named vmap's replicas)."""
    return jax.tree.map(
        lambda *xs: jnp.stack(xs), *[make_tree("gradient", dtype, seed=i) for i in range(3)]
    )


@pytest.mark.parametrize(
    ("fn", "reduce"), [(jg.grad_psum, np.sum), (jg.grad_pmean, np.mean)], ids=["psum", "pmean"]
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_psum_and_pmean_over_a_named_axis(fn, reduce, dtype):
    stacked = _replicas(dtype)
    out = jax.jit(jax.vmap(lambda g: fn(g, "i"), axis_name="i"))(stacked)
    assert isinstance(out, jg.Gradient)
    assert jax.tree.structure(out) == jax.tree.structure(stacked)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(stacked), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        expected = reduce(np.asarray(y, np.float32), axis=0)
        for replica in np.asarray(x, np.float32):  # every replica gets the same result
            tol = 1e-6 if dtype == jnp.float32 else 2e-2
            np.testing.assert_allclose(replica, expected, rtol=tol, atol=tol)


def test_pmean_over_a_tuple_of_axes():
    grid = jnp.arange(24.0).reshape(2, 3, 4)  # 2 x 3 replicas of a 4-vector

    def nested(axis_name):
        inner = jax.vmap(lambda g: jg.grad_pmean({"w": g}, axis_name)["w"], axis_name="j")
        return jax.jit(jax.vmap(inner, axis_name="i"))(grid)

    mean = nested(("i", "j"))
    np.testing.assert_allclose(mean, np.broadcast_to(grid.mean((0, 1)), grid.shape))
    partial = nested("j")
    np.testing.assert_allclose(partial, np.broadcast_to(grid.mean(1, keepdims=True), grid.shape))


def test_pmean_and_psum_of_an_empty_tree_are_empty():
    mean, total, _ = jax.vmap(
        lambda x: (jg.grad_pmean({}, "i"), jg.grad_psum([None], "i"), x), axis_name="i"
    )(jnp.ones(2))
    assert mean == {} and total == [None]


def test_pmean_needs_floating_leaves():
    with pytest.raises(TypeError, match=r"at \['n'\] it has i32\[\]\. Use `grad_psum`"):
        jax.vmap(lambda g: jg.grad_pmean(g, "i"), axis_name="i")({"n": jnp.arange(2)})
    counts = jax.vmap(lambda g: jg.grad_psum(g, "i"), axis_name="i")({"n": jnp.arange(3)})
    np.testing.assert_array_equal(counts["n"], [3, 3, 3])


@pytest.mark.parametrize("bad", [None, 3, ["i"], (), ("i", 3)], ids=repr)
@pytest.mark.parametrize("fn", [jg.grad_psum, jg.grad_pmean], ids=["psum", "pmean"])
def test_axis_name_must_be_a_name_or_tuple_of_names(fn, bad):
    expected = "`axis_name` must be a mesh axis name (a str) or a non-empty tuple of names; got"
    with pytest.raises(TypeError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        jax.vmap(lambda g: fn(g, bad), axis_name="i")({"w": jnp.ones((2, 3))})


@pytest.mark.parametrize("fn", [jg.grad_norm, jg.grad_rms, jg.grad_normalize])
def test_reductions_check_axis_name_too(fn):
    with pytest.raises(TypeError, match=r"`axis_name` must be .*, or None; got list \['i'\]"):
        jax.vmap(lambda g: fn(g, axis_name=["i"]), axis_name="i")({"w": jnp.ones((2, 3))})


def test_reductions_with_axis_name_see_the_whole_gradient():
    """Under a named vmap each replica's leaves are shards of one larger gradient."""
    stacked = _replicas()
    entries = flat(stacked)
    norm, magnitude, total = jax.jit(
        jax.vmap(
            lambda g: (
                jg.grad_norm(g, axis_name="i"),
                jg.grad_rms(g, axis_name="i"),
                jg.grad_accumulate(jnp.sum, g, axis_name="i"),
            ),
            axis_name="i",
        )
    )(stacked)
    np.testing.assert_allclose(norm, np.full(3, np.sqrt(np.sum(entries**2))), rtol=1e-5)
    # the global count of entries: 3 x the local count
    np.testing.assert_allclose(magnitude, np.full(3, np.sqrt(np.mean(entries**2))), rtol=1e-5)
    np.testing.assert_allclose(total, np.full(3, np.sum(entries)), rtol=1e-5, atol=1e-5)


def _psums(jaxpr) -> list:
    """The psum equations of a jaxpr on the ordinary path, nested jaxprs (shard_map, jit) included.

    The branches of a `cond` are left out: the whole-gradient reductions keep their rare
    overflow-safe branch (NaN, inf or squares beyond float32) there, with its own psum.
    """
    found = []
    platform = {v for e in jaxpr.eqns if e.primitive.name == "platform_index" for v in e.outvars}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("psum"):
            found.append(eqn)
        if eqn.primitive.name == "cond":
            if eqn.invars and eqn.invars[0] in platform:  # `platform_dependent`: the
                found += _psums(eqn.params["branches"][-1].jaxpr)  # default (GPU) form
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds a Jaxpr
                if hasattr(sub, "eqns"):
                    found += _psums(sub)
    return found


@pytest.mark.parametrize(
    "reduction",
    [
        lambda g: jg.grad_norm(g, axis_name="data"),
        lambda g: jg.grad_rms(g, axis_name="data"),
        lambda g: jg.grad_rms(g, axis_name="data"),
        lambda g: jg.grad_accumulate(jnp.sum, g, axis_name="data"),
        lambda g: jg.grad_normalize(g, axis_name="data"),
        lambda g: jg.grad_normalize_(g, axis_name="data"),
    ],
    ids=["norm", "magnitude", "rms", "accumulate", "normalize", "normalize_"],
)
def test_one_float32_psum_per_reduction_whatever_the_leaves(reduction):
    """One psum of float32 partial sums (on the ordinary path of the GPU/TPU form: the
    plain and scaled sums of squares travel together), whatever the leaves."""
    mesh = jax.make_mesh((1,), ("data",))
    tree = make_tree("nested", jnp.bfloat16)  # 4 bfloat16 leaves
    # check_vma=False: every leaf is taken as a shard (replicated ones are not summed)
    run = jax.shard_map(reduction, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    psums = _psums(jax.make_jaxpr(run)(tree).jaxpr)
    assert len(psums) == 1
    # the float32 partials: the plain and the two scaled sums of squares of the whole
    # gradient (one group), in one vector
    (operand,) = psums[0].invars
    assert operand.aval.dtype == jnp.float32 and operand.aval.shape in [(), (1,), (3,)]


# -- one device: random_grad(out_shardings=...) --------------------------------------------


def test_random_grad_with_out_shardings_on_one_device():
    # (NamedSharding on a 1-device mesh: the docstring example; 8 devices: mesh_checks.py)
    model = make_tree("gradient", jnp.bfloat16)
    key = jax.random.key(3)
    one = SingleDeviceSharding(jax.devices()[0])
    out = jg.random_grad(model, key, out_shardings=one)
    assert isinstance(out, jg.Gradient)
    expected = jax.tree.leaves(jg.random_grad(model, key))
    for x, y in zip(jax.tree.leaves(out), expected, strict=True):
        assert x.dtype == y.dtype == jnp.bfloat16 and x.shape == y.shape and x.sharding == one
        np.testing.assert_array_equal(x, y)


def test_random_grad_out_shardings_must_match_the_structure():
    model = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    one = SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(
        ValueError,
        match=r"`out_shardings` and `zero_grad\(model\)` must have the same structure; they "
        r"first differ at the root",
    ):
        jg.random_grad(model, jax.random.key(0), out_shardings={"w": one})
    with pytest.raises(
        TypeError,
        match=r"`out_shardings` must be a `jax.sharding.Sharding` or a pytree of them; "
        r"at \['w'\] it has the PartitionSpec P\(\), which needs a mesh: "
        r"`NamedSharding\(mesh, spec\)`\.",
    ):
        jg.random_grad(model, jax.random.key(0), out_shardings={"w": P(), "b": one})


# -- 2 processes x 2 CPU devices, jax.distributed over 127.0.0.1 -----------------------------


def _run_two_processes() -> list[tuple[int | None, str]]:
    command = [sys.executable, str(MULTIHOST), "--num-processes", "2", "--port", str(free_port())]
    commands = [[*command, "--process-id", str(i), "--timeout", "60"] for i in range(2)]
    return run_processes(commands, env=cpu_env(), cwd=ROOT, timeout_s=MULTIHOST_TIMEOUT_S)


def test_two_processes_with_two_devices_each():
    results = _run_two_processes()
    if any("address already in use" in text.lower() for _, text in results):
        results = _run_two_processes()  # the free port was taken in between: once more
    for i, (returncode, text) in enumerate(results):
        assert returncode == 0, f"process {i} exited with {returncode}:\n{text[-4000:]}"
        assert f"process {i}/2: all checks passed" in text, text
        for check in ("grad_norm", "grad_rms", "grad_mapzip", "random_grad"):
            assert f"process {i}/2: {check}" in text, text


# -- 8 simulated devices, in a subprocess ----------------------------------------------------


@pytest.mark.parametrize("name", _check_names())
def test_on_8_devices(mesh_run, name):
    results = mesh_run.results()
    if name not in results:
        output = results["__output__"]
        pytest.fail(
            f"the 8-device run (exit status {output['returncode']}) did not report {name} "
            f"within {MESH_TIMEOUT_S} s:\n{output['text'][-4000:]}"
        )
    result = results[name]
    assert result["ok"], result["error"]
