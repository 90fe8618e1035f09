import ast
import importlib.metadata
import inspect
import re
from pathlib import Path

import pytest

import jaxgrad as jg
from jaxgrad import gradient_util as gu

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
API = ROOT / "docs" / "api.md"


PAYSAGE_API = [
    "Gradient",
    "grad_accumulate",
    "grad_apply",
    "grad_apply_",
    "grad_flatten",
    "grad_fold",
    "grad_magnitude",
    "grad_mapzip",
    "grad_mapzip_",
    "grad_norm",
    "grad_normalize",
    "grad_normalize_",
    "grad_rms",
    "grad_unflatten",
    "null_grad",
    "random_grad",
    "zero_grad",
]


def test_paysage_module_exposes_the_paysage_api_as_the_same_objects():
    assert gu.__all__ == PAYSAGE_API
    for name in gu.__all__:
        if name == "grad_magnitude":  # paysage's first name, kept for porting only
            assert gu.grad_magnitude is jg.grad_rms and not hasattr(jg, name)
            continue
        assert name in jg.__all__
        assert getattr(gu, name) is getattr(jg, name)


def test_the_top_level_has_one_name_per_object():
    objects = [id(getattr(jg, name)) for name in jg.__all__]
    assert len(objects) == len(set(objects))


def test_all_is_sorted_and_complete():
    public = {
        n
        for n, v in vars(jg).items()
        if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
    }
    assert public == set(jg.__all__)
    assert jg.__all__[1:] == sorted(jg.__all__[1:])


@pytest.mark.parametrize("name", jg.__all__)
def test_every_public_name_has_a_docstring_with_an_example(name):
    doc = inspect.getdoc(getattr(jg, name)) or ""
    assert doc.splitlines()[0].endswith("."), name
    assert "Example:" in doc and ">>> " in doc, name


@pytest.mark.parametrize("name", jg.__all__)
def test_every_public_name_is_in_the_api_table(name):
    assert re.search(rf"^\| `{re.escape(name)}[(`]", API.read_text(), re.M), name


def test_the_readme_stays_short():
    assert len(README.read_bytes()) <= 10_000


def test_no_module_imports_another_modules_private_name():
    """The house rule: modules share only the base layer's public names (STYLE.md, rule 1)."""
    offenders = []
    for path in sorted((ROOT / "jaxgrad").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                offenders += [
                    f"{path.name}: from {'.' * node.level}{node.module or ''} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert not offenders, offenders


BASE = {"_typing", "_checks", "_gradient", "_donate", "_naming", "_numerics"}
"""The shared base layer: types, checks, the Gradient pytree, placement, naming and
grouping, numerics. A base module imports only base modules."""

COMPOSES = {
    "_clip": {"_stats"},  # the clip returns grad_stats' statistics from the same pass
    "_spike": {"_clip", "_stats"},  # the guard measures and clips with grad_clip
    "_noise": {"_accumulator", "_collectives"},  # the accumulator's scan, grad_pmean's psum
}
"""Feature modules that build on another feature's public function (composition); every
other feature module imports only the base layer. `optax`, `gradient_util` and
`__init__` are the front of the package and may import anything."""


def test_feature_modules_import_only_the_base_layer_or_what_they_compose():
    offenders = []
    for path in sorted((ROOT / "jaxgrad").glob("*.py")):
        name = path.stem
        if name in ("__init__", "optax", "gradient_util"):
            continue
        allowed = BASE | COMPOSES.get(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module:
                if node.module not in allowed:
                    offenders.append(f"{name} imports {node.module}")
    assert not offenders, offenders


def test_version_comes_from_the_package_metadata():
    assert jg.__version__ == importlib.metadata.version("jaxgrad")
