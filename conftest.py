"""Root conftest: names for the doctests in `jaxgrad/` and README.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, np=np, jaxgrad=jaxgrad, jg=jaxgrad)
