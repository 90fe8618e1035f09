"""Root conftest: names for the doctests in `jaxgrad/` and README.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, np=np, jaxgrad=jaxgrad, jg=jaxgrad)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Code blocks of README.md and docs/ run as a user runs them: standard dtype promotion.

    `tests/conftest.py` makes promotion strict for the test suite, and optax's adam does not
    run under strict promotion.
    """
    if item.get_closest_marker("markdown-docs") is not None:
        with jax.numpy_dtype_promotion("standard"):
            yield
    else:
        yield
