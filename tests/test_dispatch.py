"""One compiled dispatch per eager call; nothing added inside the user's jit; no stale results."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad as jg
from jaxgrad import _clip, _constructors, _donate, _finite, _flatten, _reduce, _stats


def _tree(n: int, size: int = 3):
    """A tree whose shapes no other test uses, so compilation counts start fresh."""
    return {f"p{i}": jnp.full((size, n), float(i + 1)) for i in range(n)}


CACHED = [
    ("grad_norm", lambda t: jg.grad_norm(t), lambda: _reduce._norm),
    ("grad_rms", lambda t: jg.grad_rms(t), lambda: _reduce._magnitude),
    ("grad_clip", lambda t: jg.grad_clip(t, 1.0), lambda: _clip._clip),
    ("grad_stats", lambda t: jg.grad_stats(t), lambda: _stats._stats),
    ("grad_all_finite", lambda t: jg.grad_all_finite(t), lambda: _finite._all_finite),
    ("grad_normalize", lambda t: jg.grad_normalize(t), lambda: _reduce._normalize_jit),
    ("grad_normalize_", lambda t: jg.grad_normalize_(t), lambda: _reduce._normalize_jit),
    ("zero_grad", lambda t: jg.zero_grad(t), lambda: _donate._zeros),
    (
        "random_grad",
        lambda t: jg.random_grad(t, jax.random.key(0)),
        lambda: _constructors._random_like_jit,
    ),
    ("grad_flatten", lambda t: jg.grad_flatten(t), lambda: _flatten._flatten),
    (
        "grad_unflatten",
        lambda t: jg.grad_unflatten(jg.grad_flatten(t), t),
        lambda: _flatten._unflatten_jit,
    ),
    (
        "grad_accumulate",
        lambda t: jg.grad_accumulate(jnp.sum, t),
        lambda: _reduce._sum_scalars,
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


# `grad_unflatten` and `random_grad` (built-in samplers) call their plain function on
# tracers and a cached jit eagerly: nothing of theirs nests in the user's trace.
OURS = re.compile(r"jit\[\s*name=(_unflatten|_random_like)")


def test_inside_user_jit_unflatten_and_random_add_no_call():
    tree = _tree(2)
    assert not OURS.search(_jaxpr_text(lambda v: jg.grad_unflatten(v, tree), jnp.zeros(12)))
    assert not OURS.search(_jaxpr_text(lambda k: jg.random_grad(tree, k), jax.random.key(0)))
    # and the check would see one: a call of the compiled function itself shows up
    spec = (((3, 2), jnp.dtype(jnp.float32)),) * 2
    treedef = jax.tree.structure(tree)
    assert OURS.search(
        _jaxpr_text(lambda v: _flatten._unflatten_jit(v, treedef, spec), jnp.zeros(12))
    )


def _fusions(hlo: str) -> list[str]:
    """The fused computations of compiled HLO text, without names and metadata."""
    bodies = re.findall(r"^%fused\S* \((.*?)^}", hlo, flags=re.S | re.M)
    strip = lambda b: re.sub(r"(%[\w.\-]+|metadata=\{[^}]*\}|, op_name=\S+)", "", b)  # noqa: E731
    return sorted(strip(b) for b in bodies)


@pytest.mark.parametrize(
    ("public", "kernel"),
    [
        (
            lambda t: jg.grad_norm(t),
            lambda t: _reduce._norm(t, ord="2", squared=False, axis_name=None, pack=True),
        ),
        (
            lambda t: jg.grad_clip(t, 1.0, by="leaf"),
            lambda t: _clip._clip(
                t,
                1.0,
                measure="norm",
                by="leaf",
                axis_name=None,
                pack=True,
            ),
        ),
        (
            lambda t: jg.grad_stats(t),
            lambda t: _stats._stats(t, by="leaf", axis_name=None, pack=True),
        ),
        (jg.grad_flatten, _flatten._flatten),
    ],
    ids=["norm", "clip", "stats", "flatten"],
)
def test_nested_jit_compiles_to_the_eager_kernel(public, kernel):
    """Inside the user's jit the kernel's nested `jax.jit` is inlined: the same fusions."""
    tree = _tree(6)
    user = jax.jit(public).lower(tree).compile().as_text()
    eager = kernel.__wrapped__ if hasattr(kernel, "__wrapped__") else kernel
    own = jax.jit(eager).lower(tree).compile().as_text()
    assert _fusions(user) == _fusions(own)
    assert len(_fusions(user)) > 0


def test_eager_results_equal_jitted_results():
    tree = _tree(4)
    for fn in (jg.grad_norm, jg.grad_rms, jg.grad_flatten, jg.grad_normalize):
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


@pytest.mark.parametrize("fn", [jg.grad_norm, jg.grad_rms, jg.grad_normalize, jg.grad_flatten])
def test_eager_non_array_leaf_gets_the_house_error(fn):
    with pytest.raises(
        TypeError,
        match=r"`grad` must be a pytree of numeric arrays; at \['step'\] it has a str: 'seven'",
    ):
        fn({"w": jnp.ones(2), "step": "seven"})
