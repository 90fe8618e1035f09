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


@pytest.fixture(params=[False, True], ids=["eager", "jit"], scope="session")
def maybe_jit(request) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return jax.jit if request.param else (lambda f: f)


@pytest.fixture(params=DTYPES, ids=DTYPE_IDS)
def dtype(request):
    return request.param


@pytest.fixture(params=TREE_KINDS)
def tree_kind(request) -> str:
    return request.param
