"""One compiled dispatch per eager call; nothing added inside the user's jit; no stale results."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad as jg
from jaxgrad import _constructors, _flatten, _reduce


def _tree(n: int, size: int = 3):
    """A tree whose shapes no other test uses, so compilation counts start fresh."""
    return {f"p{i}": jnp.full((size, n), float(i + 1)) for i in range(n)}


CACHED = [
    ("grad_norm", lambda t: jg.grad_norm(t), lambda: jg.grad_norm.jitted),
    ("grad_magnitude", lambda t: jg.grad_magnitude(t), lambda: jg.grad_magnitude.jitted),
    ("grad_rms", lambda t: jg.grad_rms(t), lambda: jg.grad_magnitude.jitted),
    ("grad_normalize", lambda t: jg.grad_normalize(t), lambda: _reduce._normalize_jit),
    ("grad_normalize_", lambda t: jg.grad_normalize_(t), lambda: _reduce._normalize_jit),
    ("zero_grad", lambda t: jg.zero_grad(t), lambda: _constructors._zeros_like.jitted),
    (
        "random_grad",
        lambda t: jg.random_grad(t, jax.random.key(0)),
        lambda: _constructors._random_like_jit,
    ),
    ("grad_flatten", lambda t: jg.grad_flatten(t), lambda: jg.grad_flatten.jitted),
    (
        "grad_unflatten",
        lambda t: jg.grad_unflatten(jg.grad_flatten(t), t),
        lambda: _flatten._unflatten_jit,
    ),
    (
        "grad_accumulate",
        lambda t: jg.grad_accumulate(jnp.sum, t),
        lambda: _reduce._sum_scalars.jitted,
    ),
]


@pytest.mark.parametrize(("name", "call", "jitted"), CACHED, ids=[c[0] for c in CACHED])
def test_eager_calls_compile_once_per_shape(name, call, jitted):
    n = 5 + [c[0] for c in CACHED].index(name)
    call(_tree(n))
    after_first = jitted()._cache_size()
    call(_tree(n))  # new arrays, same structure, shapes and dtypes
    call(jax.tree.map(lambda x: x + 1, _tree(n)))
    assert jitted()._cache_size() == after_first
    call(_tree(n) | {"extra": jnp.ones(2)})  # a new structure: one more compilation
    assert jitted()._cache_size() == after_first + 1


def _jaxpr_text(fn, *args):
    return str(jax.make_jaxpr(fn)(*args))


# A nested call of one of jaxgrad's own compiled functions would show as `jit[name=...]`
# (jax.numpy's own helpers, such as `_where`, are nested jits too, and allowed).
OURS = re.compile(r"jit\[name=(grad_|_zeros_like|_normalize|_unflatten|_random_like|_sum_scalars)")


@pytest.mark.parametrize(
    ("public", "plain"),
    [
        (jg.grad_norm, jg.grad_norm.__wrapped__),
        (jg.grad_magnitude, jg.grad_magnitude.__wrapped__),
        (jg.grad_flatten, jg.grad_flatten.__wrapped__),
        (jg.zero_grad, lambda t: jax.tree.map(jnp.zeros_like, t)),
        (jg.grad_normalize, lambda t: _reduce._normalize(t, None)),
    ],
    ids=["norm", "magnitude", "flatten", "zero_grad", "normalize"],
)
def test_inside_user_jit_there_is_no_nested_jit(public, plain):
    tree = _tree(3)
    text = _jaxpr_text(public, tree)
    assert text == _jaxpr_text(plain, tree)
    assert not OURS.search(text)


def test_inside_user_jit_unflatten_and_random_add_no_call():
    tree = _tree(2)
    assert not OURS.search(_jaxpr_text(lambda v: jg.grad_unflatten(v, tree), jnp.zeros(12)))
    assert not OURS.search(_jaxpr_text(lambda k: jg.random_grad(tree, k), jax.random.key(0)))
    assert not OURS.search(_jaxpr_text(lambda t: jg.grad_accumulate(jnp.sum, t), tree))
    # and the check would see one: a call of the compiled function itself shows up
    assert OURS.search(_jaxpr_text(jg.grad_norm.jitted, tree))


def test_eager_results_equal_jitted_results():
    tree = _tree(4)
    for fn in (jg.grad_norm, jg.grad_magnitude, jg.grad_flatten, jg.grad_normalize):
        np.testing.assert_array_equal(
            np.asarray(jax.tree.leaves(fn(tree))[0]),
            np.asarray(jax.tree.leaves(jax.jit(fn)(tree))[0]),
        )


GLOBAL_SCALE = 2.0


def _scaled(x):
    return x * GLOBAL_SCALE


@pytest.mark.parametrize(
    "call",
    [
        lambda t: jg.grad_apply(_scaled, t)["a"],
        lambda t: jg.grad_apply_(_scaled, t)["a"],
        lambda t: jg.grad_mapzip(lambda x, y: _scaled(x) + 0 * y, t, t)["a"],
        lambda t: jg.grad_mapzip_(lambda x, y: _scaled(x) + 0 * y, t, t)["a"],
        lambda t: jg.grad_accumulate(lambda x: jnp.sum(_scaled(x)), t),
        lambda t: jg.grad_fold(lambda acc, x: acc + jnp.sum(_scaled(x)), t),
        lambda t: jg.random_grad(
            t, jax.random.key(0), sampler=lambda k, s, d: jnp.full(s, GLOBAL_SCALE, d)
        )["a"],
    ],
    ids=["apply", "apply_", "mapzip", "mapzip_", "accumulate", "fold", "sampler"],
)
def test_user_callables_never_return_stale_results(call):
    """A cached trace would keep the old global; plain semantics see the new one."""
    global GLOBAL_SCALE
    tree = {"a": jnp.ones(2)}
    try:
        GLOBAL_SCALE = 2.0
        first = np.asarray(call(tree))
        GLOBAL_SCALE = 5.0
        second = np.asarray(call(tree))
    finally:
        GLOBAL_SCALE = 2.0
    np.testing.assert_allclose(second, first * 2.5)


@pytest.mark.parametrize(
    "fn", [jg.grad_norm, jg.grad_magnitude, jg.grad_normalize, jg.grad_flatten]
)
def test_eager_non_array_leaf_gets_the_house_error(fn):
    with pytest.raises(
        TypeError, match=r"`grad` must be a pytree of arrays; at \['step'\] it has a str: 'seven'"
    ):
        fn({"w": jnp.ones(2), "step": "seven"})
