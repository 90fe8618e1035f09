"""Shared fixtures: strict dtype promotion, jit/no-jit, tree shapes, dtypes (helpers.py)."""

from collections.abc import Callable
from typing import Any

import hypothesis
import jax
import pytest
from helpers import DTYPE_IDS, DTYPES, TREE_KINDS

jax.config.update("jax_numpy_dtype_promotion", "strict")

hypothesis.settings.register_profile("jaxgrad", deadline=None, max_examples=40, derandomize=True)
hypothesis.settings.load_profile("jaxgrad")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow",
        choices=("include", "exclude", "only"),
        default="include",
        help="tests marked slow (notebooks, benchmark runs): include (default), exclude, only",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mode = config.getoption("--slow")
    if mode == "include":
        return
    keep = [item for item in items if (item.get_closest_marker("slow") is None) == (mode != "only")]
    left = [item for item in items if item not in keep]
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = keep
        config.stash[_LEFT_OUT] = len(left)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if config.getoption("--slow") != "exclude":
        return
    # Under pytest-xdist the workers deselect, so the count is known only without it.
    count = config.stash.get(_LEFT_OUT, None)
    which = "The" if count is None else f"{count}"
    terminalreporter.write_line(
        f"{which} tests marked slow (each notebook executed, the benchmark smoke runs) were "
        "left out: `make test-slow` runs them, and CI (.ci/run) runs both."
    )


_LEFT_OUT = pytest.StashKey[int]()


@pytest.fixture(params=[False, True], ids=["eager", "jit"], scope="session")
def maybe_jit(request) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return jax.jit if request.param else (lambda f: f)


@pytest.fixture(params=DTYPES, ids=DTYPE_IDS)
def dtype(request):
    return request.param


@pytest.fixture(params=TREE_KINDS)
def tree_kind(request) -> str:
    return request.param
