"""benchmarks/train_step.py runs at its smoke size and prints a complete table."""

import importlib.util
import sys
from pathlib import Path

import jax

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_step.py"


def _load():
    spec = importlib.util.spec_from_file_location("_jaxgrad_bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_smoke_table_has_every_variant_with_positive_numbers(capsys):
    bench = _load()
    # tests/conftest.py makes dtype promotion strict, but optax's adamw (`decay ** count`)
    # promotes implicitly; a user's train step runs with the standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        text = bench.main(["--smoke", "--rounds", "1"])
    assert capsys.readouterr().out.strip() == text.strip()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in bench.VARIANTS:
            rows[cells[0]] = cells[1:]
    assert set(rows) == set(bench.VARIANTS)
    for name in bench.VARIANTS:
        assert name in text
        values = [float(c) for c in rows[name]]  # compile s, ratio, HLO chars, step ms, ratio
        assert len(values) == 5 and all(v > 0 for v in values), (name, rows[name])
    assert float(rows["optax clip"][1]) == 1.0 and float(rows["optax clip"][4]) == 1.0
    assert "jaxgrad full diagnostics: " in text and "2 blocks, 12 leaves" in text
