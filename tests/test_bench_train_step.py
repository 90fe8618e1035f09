"""benchmarks/train_step.py runs at its smoke size and prints complete tables.

The MLP and the GPT run in this process; the many-device path runs in a subprocess,
since the number of host-platform devices is fixed before JAX starts. The collective
counter and the sharding rule are checked on their own, without devices.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "train_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("_jaxgrad_bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load()


def _run(bench, argv):
    # tests/conftest.py makes dtype promotion strict, but optax's adam (`decay ** count`)
    # promotes implicitly; a user's train step runs with the standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        return bench.main(argv)


def _tables(text, variants):
    """Every markdown table of `text` as a list of {variant: cells}, in order."""
    tables, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "variant":
            current = {}
            tables.append(current)
        elif current is not None and cells[0] in variants:
            current[cells[0]] = cells[1:]
    return tables


def _check_times(rows, names):
    assert list(rows) == names
    for name in names:
        values = [float(c) for c in rows[name]]  # compile s, ratio, HLO chars, step ms, ratio
        assert len(values) == 5 and all(v > 0 for v in values), (name, rows[name])
    assert float(rows["optax clip"][1]) == 1.0 and float(rows["optax clip"][4]) == 1.0


@pytest.mark.slow
def test_smoke_table_has_every_variant_with_positive_numbers(bench, capsys):
    text = _run(bench, ["--smoke", "--rounds", "1"])
    assert capsys.readouterr().out.strip() == text.strip()
    (rows,) = _tables(text, bench.VARIANTS)
    _check_times(rows, bench.VARIANTS)
    assert "jaxgrad full diagnostics: " in text and "2 blocks, 12 leaves" in text
    assert "collective" not in text.lower().split("- ratios")[0]  # one device: no such table


@pytest.mark.slow
def test_gpt_smoke(bench):
    names = ["optax clip", "jaxgrad full diagnostics"]
    text = _run(
        bench,
        ["--model", "gpt", "--smoke", "--blocks", "1", "--rounds", "1", "--only", ",".join(names)],
    )
    (rows,) = _tables(text, bench.VARIANTS)
    _check_times(rows, names)
    assert "GPT (miniGPT shape, Flax NNX): 1 blocks, 20 leaves" in text
    assert 'one call, grad_clip(grads, 1.0, by="leaf")' in text


def test_gpt_default_size_is_the_issues_model(bench):
    # 2 embeddings + 4 blocks x 16 leaves + the head's kernel and bias; nothing is computed.
    size = bench.PRESETS["gpt"]["cpu"]
    model = nnx.eval_shape(lambda: bench.GPT(size, rngs=nnx.Rngs(0)))
    shapes = [x.shape for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert len(shapes) == 68
    assert max(shapes, key=np.prod) in {(4096, 128), (128, 4096)}
    assert shapes.count((4096, 128)) == 1 and shapes.count((128, 4096)) == 1  # untied head


@pytest.mark.slow
def test_many_devices_in_a_subprocess(bench):
    names = ["optax clip", "jaxgrad full diagnostics"]
    argv = [
        "--smoke",
        "--blocks",
        "1",
        "--rounds",
        "1",
        "--devices",
        "4",
        "--only",
        ",".join(names),
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "4 x cpu" in text
    assert "## fsdp, 4 devices (mesh data: 4)" in text
    assert "## 2d, 2 x 2 devices (mesh data: 2, model: 2)" in text
    tables = _tables(text, bench.VARIANTS)
    assert len(tables) == 4  # times and collectives, for each mesh
    for times, counts in (tables[0:2], tables[2:4]):
        _check_times(times, names)
        assert list(counts) == names
        for name in names:
            cells = counts[name]
            assert len(cells) == len(bench.COLLECTIVES) + 2  # + total bytes, arrays
            for cell in cells[:-2]:
                count, size = cell.replace(",", "").replace("(", "").replace(")", "").split()
                assert int(count) >= 0 and int(size) >= 0
            # each all-reduce carries at least one array
            assert int(cells[-1]) >= int(cells[0].split()[0])
        # The global norm of a sharded gradient needs at least one all-reduce.
        assert int(counts["optax clip"][0].split()[0]) >= 1


def test_too_few_devices_is_a_clear_exit(bench):
    with pytest.raises(SystemExit, match="JAX sees"):
        _run(bench, ["--smoke", "--devices", "4096"])


HLO = """
ENTRY %main {
  %p = f32[8,4]{1,0} parameter(0)
  %all-reduce = f32[] all-reduce(%x), channel_id=1, to_apply=%add
  %all-reduce.1 = (f32[4]{0}, bf16[2,2]{1,0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %all-gather = f32[32,4]{1,0} all-gather(%p), channel_id=3, dimensions={0}
  %ags = (f32[8,4]{1,0}, f32[32,4]{1,0}) all-gather-start(%p), channel_id=4, dimensions={0}
  %agd = f32[32,4]{1,0} all-gather-done(%ags)
  %ars = pred[3]{0} all-reduce-start(%q), channel_id=5, to_apply=%or
  %ard = pred[3]{0} all-reduce-done(%ars)
  %fusion = f32[] fusion(%all-reduce.1), kind=kLoop, calls=%fused
  ROOT %cp = s32[2,16,1]{2,1,0} collective-permute(%y), source_target_pairs={{0,1}}
}
"""


def test_collectives_are_counted_with_their_result_bytes(bench):
    found = bench.collectives(HLO)
    assert found["all-reduce"] == (3, 4 + (16 + 8) + 3)
    assert found["all-gather"] == (2, 512 + 512)
    assert found["collective-permute"] == (1, 128)
    assert found["reduce-scatter"] == (0, 0) and found["all-to-all"] == (0, 0)
    assert bench.all_reduced_arrays(HLO) == 1 + 2 + 1  # a tuple all-reduce counts each array


def test_sharding_rule(bench):
    P = jax.sharding.PartitionSpec
    fsdp = bench.Placement("fsdp", jax.sharding.AbstractMesh((8,), ("data",)))
    assert fsdp.spec((4096, 128)) == P("data", None)
    assert fsdp.spec((4, 16)) == P(None, "data")
    assert fsdp.spec((3, 5)) == P(None, None)
    assert fsdp.spec((128,)) == P() and fsdp.spec(()) == P()
    grid = bench.Placement("2d", jax.sharding.AbstractMesh((4, 2), ("data", "model")))
    assert grid.spec((128, 512)) == P("data", "model")
    assert grid.spec((128, 8, 16)) == P("data", None, "model")
    assert grid.spec((6, 3)) == P(None, None)
    assert grid.spec((512,)) == P()
    one = bench.Placement("one device")
    tree = {"w": np.ones((4, 4), np.float32)}
    assert one.put(tree) is tree and one.pin(tree) is tree
