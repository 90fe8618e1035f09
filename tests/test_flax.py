"""jaxgrad inside real Flax training code: nnx modules and optimizers, linen params and TrainState."""

import functools
import importlib.util
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import jaxgrad as jg

BATCH, SIDE, TOKENS, VOCAB, CLASSES = 8, 6, 3, 10, 3
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _standard_promotion():
    # tests/conftest.py makes dtype promotion strict to catch jaxgrad's silent upcasts, but
    # optax's adam (`decay ** count`) and flax's BatchNorm on bfloat16 promote implicitly.
    with jax.numpy_dtype_promotion("standard"):
        yield


def make_batch(seed: int, n: int = BATCH) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(n, SIDE, SIDE, 1)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (n, TOKENS)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, CLASSES, n), jnp.int32)
    return images, tokens, labels


def leaves_with_paths(tree: Any) -> list[tuple[str, jax.Array]]:
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_same_layout(got: Any, want: Any) -> None:
    """Same tree structure (so the same container types and keys), shapes and dtypes."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), (_, b) in zip(leaves_with_paths(got), leaves_with_paths(want), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), path


def assert_trees_close(got: Any, want: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), (_, b) in zip(leaves_with_paths(got), leaves_with_paths(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=path)


def clip_by_magnitude(grads: Any, max_rms: float) -> tuple[Any, jax.Array]:
    """Scale `grads` so that its RMS is at most `max_rms`; the user-side recipe in jaxgrad."""
    rms = jg.grad_rms(grads)
    scale = jnp.minimum(1.0, max_rms / rms)  # a zero gradient gives inf, hence scale 1
    return jg.grad_apply(lambda g: g * scale.astype(g.dtype), grads), rms


def size(tree: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# nnx -------------------------------------------------------------------------------------


class Net(nnx.Module):
    """Conv -> BatchNorm -> Dropout on an image, and an Embed of tokens, into a Linear head."""

    def __init__(self, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=param_dtype)
        # No conv bias: BatchNorm cancels it, so its gradient is rounding noise that adam
        # would amplify into arbitrary steps.
        self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), use_bias=False, **kw)
        self.norm = nnx.BatchNorm(4, **kw)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.embed = nnx.Embed(VOCAB, 5, **kw)
        self.head = nnx.Linear(SIDE * SIDE * 4 + 5, CLASSES, **kw)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
        h = nnx.relu(self.norm(self.conv(images)))
        h = self.drop(h.reshape(h.shape[0], -1))
        e = self.embed(tokens).mean(axis=1)
        return self.head(jnp.concatenate([h, e.astype(h.dtype)], axis=-1))


def nnx_loss(model: Net, images: jax.Array, tokens: jax.Array, labels: jax.Array) -> jax.Array:
    logits = model(images, tokens).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


nnx_grad = nnx.jit(nnx.grad(nnx_loss))

_NETS: dict[Any, Net] = {}


def make_net(param_dtype: Any = jnp.float32) -> Net:
    """A fresh copy of one `Net` per dtype (built once, compiled: initialisation is slow)."""
    if param_dtype not in _NETS:
        _NETS[param_dtype] = nnx.jit(lambda: Net(nnx.Rngs(0), param_dtype))()
    return nnx.clone(_NETS[param_dtype])


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_nnx_zero_and_random_grad_match_nnx_grad(param_dtype):
    model = make_net(param_dtype)
    grads = nnx_grad(model, *make_batch(0))
    zeros = jg.zero_grad(model)
    noise = jg.random_grad(model, jax.random.key(1))
    for tree in (zeros, noise):
        assert type(tree) is type(grads)  # an nnx.State, as nnx.grad returns
        assert_same_layout(tree, grads)
        assert_same_layout(tree, nnx.state(model, nnx.Param))
    paths = [path for path, _ in leaves_with_paths(zeros)]
    assert len(paths) == 6  # conv kernel, norm scale and bias, embedding, head kernel and bias
    assert not any(name in path for path in paths for name in ("mean", "var", "rngs", "count"))
    assert all(not np.asarray(x, np.float32).any() for x in jax.tree.leaves(zeros))
    values = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(noise)])
    assert values.min() >= 0 and values.max() < 1 and values.std() > 0.2
    again = jg.random_grad(model, jax.random.key(1))
    assert all(
        np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        for a, b in zip(jax.tree.leaves(noise), jax.tree.leaves(again), strict=True)
    )
    # The zeros are a valid gradient: an optimizer takes them as it takes nnx.grad's.
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))(optimizer, model, zeros)
    assert_trees_close(nnx.state(model, nnx.Param), before, rtol=0, atol=0)


def test_nnx_jit_train_step_with_optimizer_matches_optax_clipping():
    max_rms = 0.01  # small enough that every step clips
    model = make_net()
    n = size(nnx.state(model, nnx.Param))
    reference = nnx.clone(model)  # same parameters, batch statistics and dropout RNG state
    optimizer = nnx.Optimizer(model, optax.adam(0.01), wrt=nnx.Param)
    ref_optimizer = nnx.Optimizer(
        reference,
        optax.chain(optax.clip_by_global_norm(max_rms * math.sqrt(n)), optax.adam(0.01)),
        wrt=nnx.Param,
    )

    @nnx.jit
    def step(model, optimizer, images, tokens, labels):
        loss, grads = nnx.value_and_grad(nnx_loss)(model, images, tokens, labels)
        clipped, rms = clip_by_magnitude(grads, max_rms)
        optimizer.update(model, clipped)
        return loss, rms, jg.grad_rms(clipped), jg.grad_norm(grads)

    @nnx.jit
    def ref_step(model, optimizer, images, tokens, labels):
        loss, grads = nnx.value_and_grad(nnx_loss)(model, images, tokens, labels)
        optimizer.update(model, grads)
        return loss, optax.tree.norm(grads)

    losses = []
    for i in range(12):
        batch = make_batch(i % 3)
        loss, rms, clipped_rms, norm = step(model, optimizer, *batch)
        ref_loss, ref_norm = ref_step(reference, ref_optimizer, *batch)
        assert float(rms) > max_rms  # clipping was active
        np.testing.assert_allclose(float(clipped_rms), max_rms, rtol=1e-5)
        np.testing.assert_allclose(float(norm), float(ref_norm), rtol=1e-5)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        losses.append(float(loss))
    assert_trees_close(
        nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param), rtol=1e-4, atol=1e-6
    )
    # Batch statistics moved too, identically (the step mutates the module inside nnx.jit).
    assert_trees_close(nnx.state(model, nnx.BatchStat), nnx.state(reference, nnx.BatchStat))
    assert int(optimizer.step[...]) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def nnx_microbatch_lax_scan(model: Net, images, tokens, labels, micro: int):
    """Mean micro-batch gradient with `jax.lax.scan`, on the pure state of an nnx module."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(params, images, tokens, labels):
        return nnx_loss(nnx.merge(graphdef, params, rest), images, tokens, labels)

    def body(total, batch):
        return jg.grad_mapzip(jnp.add, total, jax.grad(loss_of)(params, *batch)), None

    batches = jax.tree.map(lambda x: x.reshape(micro, -1, *x.shape[1:]), (images, tokens, labels))
    total, _ = jax.lax.scan(body, jg.zero_grad(params), batches)
    return jg.grad_apply(lambda g: g / micro, total)


def nnx_microbatch_nnx_scan(model: Net, images, tokens, labels, micro: int):
    """The same with `nnx.scan`, the module broadcast to every step."""

    @nnx.scan(in_axes=(nnx.Carry, None, 0), out_axes=nnx.Carry)
    def body(total, model, batch):
        return jg.grad_mapzip(jnp.add, total, nnx.grad(nnx_loss)(model, *batch))

    batches = jax.tree.map(lambda x: x.reshape(micro, -1, *x.shape[1:]), (images, tokens, labels))
    total = body(jg.zero_grad(model), model, batches)
    return jg.grad_apply(lambda g: g / micro, total)


@pytest.mark.parametrize(
    "accumulate", [nnx_microbatch_lax_scan, nnx_microbatch_nnx_scan], ids=["lax.scan", "nnx.scan"]
)
def test_nnx_microbatch_accumulation_equals_full_batch(accumulate):
    model = make_net()
    # Batch statistics and dropout make a micro-batch gradient differ from the full one in
    # training mode; in evaluation mode the mean loss is a mean over samples.
    model.eval()
    batch = make_batch(1, n=32)
    full = nnx_grad(model, *batch)
    accumulated = nnx.jit(accumulate, static_argnames="micro")(model, *batch, micro=4)
    assert type(accumulated) is type(full)
    assert_same_layout(accumulated, full)
    assert_trees_close(accumulated, full, rtol=1e-5, atol=1e-7)
    assert float(jg.grad_norm(full)) > 0.1


def split_batches(batch: tuple[jax.Array, ...], micro: int) -> tuple[jax.Array, ...]:
    """(images, tokens, labels) with a leading micro-batch axis of length `micro`."""
    return jax.tree.map(lambda x: x.reshape(micro, -1, *x.shape[1:]), batch)


def plain(tree: Any) -> list[tuple[str, np.ndarray]]:
    """The leaves of a model state as numpy arrays (PRNG keys as their key data), by path."""

    def value(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return [(path, value(x)) for path, x in leaves_with_paths(tree)]


def assert_bit_identical(got: Any, want: Any) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), (_, b) in zip(plain(got), plain(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path  # NaN-safe and bit for bit


def nnx_grad_of(model: Net, batch: tuple[jax.Array, ...]) -> Any:
    return nnx.grad(nnx_loss)(model, *batch)


@nnx.jit
def nnx_unrolled(model: Net, batches: tuple[jax.Array, ...]) -> Any:
    """The reference: one `nnx.grad` per micro-batch on the module, summed by the accumulator."""
    state = jg.GradSum.zeros_like(model)
    for i in range(batches[0].shape[0]):
        state = jg.GradSum.add(state, nnx_grad_of(model, [x[i] for x in batches]))
    return jg.GradSum.mean(state)


def nnx_scanned(model: Net, batches: tuple[jax.Array, ...]) -> Any:
    return jg.grad_microbatch_mean(nnx_grad_of, model, batches)


@pytest.mark.parametrize(
    "param_dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"]
)
@pytest.mark.parametrize("mode", ["eager", "nnx.jit"])
def test_nnx_microbatches_in_train_mode_equal_the_unrolled_loop(mode, param_dtype):
    model = make_net(param_dtype)  # train mode: BatchNorm statistics move, Dropout draws
    reference = nnx.clone(model)
    params = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    start = nnx.clone(nnx.state(model, nnx.Not(nnx.Param)))
    batches = split_batches(make_batch(4, n=32), 4)
    accumulate = nnx.jit(nnx_scanned) if mode == "nnx.jit" else nnx_scanned
    got = accumulate(model, batches)
    want = nnx_unrolled(reference, batches)
    assert type(got) is type(want)
    assert_same_layout(got, want)
    assert_same_layout(got, params)  # the parameter dtypes
    rtol, atol = (1e-5, 1e-6) if param_dtype == jnp.float32 else (1e-2, 1e-2)
    assert_trees_close(got, want, rtol, atol)
    assert float(jg.grad_norm(got)) > 0.1
    # The module's other state moved as in the loop: batch statistics, RNG counts and keys.
    after = nnx.state(model, nnx.Not(nnx.Param))
    assert jax.tree.structure(after) == jax.tree.structure(start)
    assert_trees_close(
        nnx.state(model, nnx.BatchStat), nnx.state(reference, nnx.BatchStat), rtol, atol
    )
    assert_bit_identical(nnx.state(model, nnx.RngState), nnx.state(reference, nnx.RngState))
    assert not np.allclose(
        np.asarray(model.norm.mean[...], np.float32),
        np.asarray(start["norm"]["mean"][...], np.float32),
    )
    assert int(model.drop.rngs.count[...]) == int(start["drop"]["rngs"]["count"][...]) + 4
    assert_bit_identical(nnx.state(model, nnx.Param), params)  # parameters untouched


def test_nnx_microbatches_with_aux_return_what_the_unrolled_loop_sees():
    model = make_net()
    reference = nnx.clone(model)
    batches = split_batches(make_batch(5, n=16), 2)

    def grad_fn(model, batch):
        return nnx.grad(lambda m: (nnx_loss(m, *batch),) * 2, has_aux=True)(model)

    step = nnx.jit(lambda m, b: jg.grad_microbatch_mean(grad_fn, m, b, has_aux=True))
    got, losses = step(model, batches)
    assert losses.shape == (2,) and losses.dtype == jnp.float32
    want = nnx_unrolled(nnx.clone(reference), batches)
    assert_trees_close(got, want)
    # the losses of the loop, each micro-batch with its own dropout mask and statistics
    loss = nnx.jit(nnx_loss)
    expected = [loss(reference, *[x[i] for x in batches]) for i in range(2)]
    np.testing.assert_allclose(np.asarray(losses), np.asarray(expected), rtol=1e-6)
    assert_bit_identical(nnx.state(model, nnx.RngState), nnx.state(reference, nnx.RngState))


class Counting(nnx.Module):
    """Adds a variable on its first call (as `sow` adds intermediates)."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if not hasattr(self, "calls"):
            self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.calls[...] += 1
        return self.linear(x)


def test_nnx_microbatches_refuse_a_grad_fn_that_adds_variables():
    model = Counting(nnx.Rngs(0))
    grad_fn = nnx.grad(lambda m, x: jnp.sum(m(x)))
    with pytest.raises(
        ValueError,
        match=r"`grad_fn` must not add or remove variables of the module: its non-`Param` state "
        r"is carried from one micro-batch to the next\. At the root the state had a State with "
        r"keys \[\] and has a State with keys \['calls'\] after `grad_fn`\.",
    ):
        jg.grad_microbatch_mean(grad_fn, model, jnp.ones((2, 3, 2)))
    model(jnp.ones((3, 2)))  # with the variable in place from the start, it is carried
    jg.grad_microbatch_mean(grad_fn, model, jnp.ones((2, 3, 2)))
    assert int(model.calls[...]) == 3


def test_nnx_microbatches_name_the_key_path_of_a_wrong_gradient():
    model = make_net()
    batches = split_batches(make_batch(0), 2)

    def wrong(model, batch):  # the gradient w.r.t. the batch statistics too
        return nnx.grad(nnx_loss, argnums=nnx.DiffState(0, nnx.Any(nnx.Param, nnx.BatchStat)))(
            model, *batch
        )

    with pytest.raises(
        ValueError,
        match=r"`params` and `grad_fn\(params, batch\)` must have the same structure; they first "
        r"differ at \['norm'\]: `params` has a dict with keys \['bias', 'scale'\], "
        r"`grad_fn\(params, batch\)` has a dict with keys \['bias', 'mean', 'scale', 'var'\]\.",
    ):
        jg.grad_microbatch_mean(wrong, model, batches)


# Skipping a bad step: keep the whole model state, not only the parameters ----------------


@nnx.jit
def nnx_skip_step(model: Net, optimizer: nnx.Optimizer, images, tokens, labels):
    """The recipe: a non-finite gradient leaves params, batch stats, RNG and optimizer as they were."""
    # nnx.state is live (it holds the module's variables): clone it to keep today's values.
    model_before, optimizer_before = nnx.clone(nnx.state(model)), nnx.clone(nnx.state(optimizer))
    loss, grads = nnx.value_and_grad(nnx_loss)(model, images, tokens, labels)  # BatchNorm moves
    grads, stats = jg.grad_clip(grads, 1.0, by="leaf")  # NaN/inf passed on, stats.finite False

    optimizer.update(model, grads)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(stats.finite, n, o), new, old)

    nnx.update(model, keep_if_finite(nnx.state(model), model_before))
    nnx.update(optimizer, keep_if_finite(nnx.state(optimizer), optimizer_before))
    return loss, stats


def with_nan(batch: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    images, tokens, labels = batch
    return images.at[0, 2, 3, 0].set(jnp.nan), tokens, labels


def test_nnx_skip_step_keeps_everything_bit_identical_after_a_nan_batch():
    model = make_net()  # train mode: BatchNorm and Dropout
    optimizer = nnx.Optimizer(model, optax.adam(0.01), wrt=nnx.Param)
    reference = nnx.clone(model)  # trained on the same batches without the bad one
    ref_optimizer = nnx.Optimizer(reference, optax.adam(0.01), wrt=nnx.Param)
    batches = [make_batch(i) for i in range(4)]
    for i, batch in enumerate(batches):
        if i == 2:
            before = nnx.clone((nnx.state(model), nnx.state(optimizer)))
            loss, stats = nnx_skip_step(model, optimizer, *with_nan(batch))
            assert np.isnan(float(loss)) and not bool(stats.finite)
            assert stats.groups.as_dict()["nonfinite/conv/kernel"] > 0  # where it came from
            assert_bit_identical((nnx.state(model), nnx.state(optimizer)), before)
        loss, stats = nnx_skip_step(model, optimizer, *batch)
        ref_loss, _ = nnx_skip_step(reference, ref_optimizer, *batch)
        assert bool(stats.finite)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    # The bad step left no trace: parameters, batch statistics, dropout RNG, adam state.
    # (Close rather than bit for bit: a GPU may sum the embedding gradient in any order.)
    numbers = nnx.Any(nnx.Param, nnx.BatchStat)
    assert_trees_close(nnx.state(model, numbers), nnx.state(reference, numbers), 1e-6, 1e-7)
    assert_bit_identical(nnx.state(model, nnx.RngState), nnx.state(reference, nnx.RngState))
    assert_trees_close(nnx.state(optimizer), nnx.state(ref_optimizer), 1e-6, 1e-7)
    assert int(optimizer.step[...]) == 4


def test_nnx_apply_if_finite_alone_keeps_the_parameters_but_not_the_batch_statistics():
    """Why the recipe keeps the whole state: BatchNorm updates during the forward pass."""
    model = make_net()
    optimizer = nnx.Optimizer(model, optax.apply_if_finite(optax.adam(0.01), 3), wrt=nnx.Param)
    params = nnx.clone(nnx.state(model, nnx.Param))

    @nnx.jit
    def step(model, optimizer, *batch):
        grads, _ = jg.grad_clip(nnx.grad(nnx_loss)(model, *batch), 1.0)
        optimizer.update(model, grads)

    step(model, optimizer, *with_nan(make_batch(0)))
    assert_bit_identical(nnx.state(model, nnx.Param), params)  # the update was skipped
    assert np.isnan(np.asarray(model.norm.mean[...])).any()  # the statistics were not


def test_example_flax_skip_step_runs():
    spec = importlib.util.spec_from_file_location("flax_skip_step", EXAMPLES / "flax_skip_step.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(steps=4, bad_step=1)


# linen -----------------------------------------------------------------------------------


class LinenNet(nn.Module):
    """The same network in linen."""

    @nn.compact
    def __call__(self, images, tokens, *, train: bool):
        h = nn.Conv(4, kernel_size=(3, 3), use_bias=False)(images)
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
        h = nn.Dropout(0.25, deterministic=not train)(h.reshape(h.shape[0], -1))
        e = nn.Embed(VOCAB, 5)(tokens).mean(axis=1)
        return nn.Dense(CLASSES)(jnp.concatenate([h, e], axis=-1))


@functools.cache
def linen_init() -> tuple[LinenNet, Any, Any]:
    model = LinenNet()
    images, tokens, _ = make_batch(0)
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.key(0), images, tokens)
    return model, variables["params"], variables["batch_stats"]


def linen_loss(model, params, batch_stats, images, tokens, labels, key=None):
    """Training-mode loss (dropout with `key`, batch statistics updated) or evaluation loss."""
    variables = {"params": params, "batch_stats": batch_stats}
    if key is None:
        logits = model.apply(variables, images, tokens, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), batch_stats
    logits, updates = model.apply(
        variables, images, tokens, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates["batch_stats"]


def test_linen_zero_and_random_grad_match_jax_grad():
    model, params, batch_stats = linen_init()
    grad_fn = jax.jit(jax.grad(linen_loss, argnums=1, has_aux=True), static_argnums=0)
    grads, _ = grad_fn(model, params, batch_stats, *make_batch(0), jax.random.key(1))
    zeros = jg.zero_grad(params)
    noise = jg.random_grad(params, jax.random.key(2), sampler=jax.random.normal)
    for tree in (zeros, noise):
        assert_same_layout(tree, grads)
    assert sorted(params) == ["BatchNorm_0", "Conv_0", "Dense_0", "Embed_0"]
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(zeros))
    assert 0.5 < float(jg.grad_rms(noise)) < 1.5  # standard normal entries
    # jaxgrad reductions agree with optax's on the gradient itself.
    np.testing.assert_allclose(float(jg.grad_norm(grads)), float(optax.tree.norm(grads)), rtol=1e-6)
    np.testing.assert_allclose(
        float(jg.grad_rms(grads)),
        float(optax.tree.norm(grads)) / math.sqrt(size(grads)),
        rtol=1e-6,
    )


class StateWithStats(train_state.TrainState):
    batch_stats: Any


def test_linen_train_state_step_matches_optax_clipping():
    model, params, batch_stats = linen_init()
    max_rms = 0.02
    max_norm = max_rms * math.sqrt(size(params))
    ours = StateWithStats.create(
        apply_fn=model.apply, params=params, tx=optax.adam(0.01), batch_stats=batch_stats
    )
    theirs = StateWithStats.create(
        apply_fn=model.apply,
        params=params,
        tx=optax.chain(optax.clip_by_global_norm(max_norm), optax.adam(0.01)),
        batch_stats=batch_stats,
    )

    def step(state, batch, key, clip):
        (loss, stats), grads = jax.value_and_grad(linen_loss, argnums=1, has_aux=True)(
            model, state.params, state.batch_stats, *batch, key
        )
        if clip:
            grads, _ = clip_by_magnitude(grads, max_rms)
        return state.apply_gradients(grads=grads, batch_stats=stats), loss, jg.grad_rms(grads)

    step = jax.jit(step, static_argnames="clip")
    losses = []
    for i in range(12):
        batch, key = make_batch(i % 3), jax.random.key(100 + i)
        ours, loss, rms = step(ours, batch, key, clip=True)
        theirs, their_loss, _ = step(theirs, batch, key, clip=False)
        np.testing.assert_allclose(float(loss), float(their_loss), rtol=1e-5)
        assert float(rms) <= max_rms * (1 + 1e-5)
        losses.append(float(loss))
    assert int(ours.step) == 12
    assert_trees_close(ours.params, theirs.params, rtol=1e-4, atol=1e-6)
    assert_trees_close(ours.batch_stats, theirs.batch_stats)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def linen_skip_step(model, state: StateWithStats, batch, key):
    """The recipe for linen: the whole `TrainState` (step, params, opt_state, batch_stats)."""
    (loss, batch_stats), grads = jax.value_and_grad(linen_loss, argnums=1, has_aux=True)(
        model, state.params, state.batch_stats, *batch, key
    )
    grads, stats = jg.grad_clip(grads, 1.0, by="leaf")
    new = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    new = jax.tree.map(lambda n, o: jnp.where(stats.finite, n, o), new, state)
    return new, loss, stats


def test_linen_skip_step_keeps_the_train_state_bit_identical_after_a_nan_batch():
    model, params, batch_stats = linen_init()
    step = jax.jit(linen_skip_step, static_argnums=0)
    tx = optax.adam(0.01)
    ours = theirs = StateWithStats.create(
        apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats
    )
    for i in range(4):
        batch, key = make_batch(i), jax.random.key(100 + i)
        if i == 2:
            before = ours
            ours, loss, stats = step(model, ours, with_nan(batch), key)
            assert np.isnan(float(loss)) and not bool(stats.finite)
            assert_bit_identical(ours, before)
            # without the recipe the batch statistics would be NaN
            _, stats_of_bad_step = jax.jit(linen_loss, static_argnums=0)(
                model, params, batch_stats, *with_nan(batch), key
            )
            assert any(np.isnan(np.asarray(x)).any() for x in jax.tree.leaves(stats_of_bad_step))
        ours, loss, stats = step(model, ours, batch, key)
        theirs, their_loss, _ = step(model, theirs, batch, key)
        assert bool(stats.finite)
        np.testing.assert_allclose(float(loss), float(their_loss), rtol=1e-6)
    assert int(ours.step) == int(theirs.step) == 4
    assert_trees_close(ours, theirs, 1e-6, 1e-7)


def test_linen_microbatch_accumulation_equals_full_batch():
    model, params, batch_stats = linen_init()
    images, tokens, labels = make_batch(2, n=32)

    def grad_of(params, images, tokens, labels):
        return jax.grad(lambda p: linen_loss(model, p, batch_stats, images, tokens, labels)[0])(
            params
        )

    @jax.jit
    def accumulate(params, images, tokens, labels):
        batches = jax.tree.map(lambda x: x.reshape(4, -1, *x.shape[1:]), (images, tokens, labels))

        def body(total, batch):
            return jg.grad_mapzip(jnp.add, total, grad_of(params, *batch)), None

        total, _ = jax.lax.scan(body, jg.zero_grad(params), batches)
        return jg.grad_apply(lambda g: g / 4, total)

    full = jax.jit(grad_of)(params, images, tokens, labels)
    accumulated = accumulate(params, images, tokens, labels)
    assert_same_layout(accumulated, full)
    assert_trees_close(accumulated, full, rtol=1e-5, atol=1e-7)
    assert float(jg.grad_norm(full)) > 0.1


# Clipping by magnitude and optax.clip_by_global_norm --------------------------------------


@jax.jit
def optax_clip(grads: Any, max_norm: jax.Array) -> Any:
    transform = optax.clip_by_global_norm(max_norm)  # a traced bound: one compilation
    return transform.update(grads, transform.init(grads))[0]


@pytest.mark.parametrize("max_rms", [0.0, 1e-3, 0.3, 10.0])
@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_clip_by_magnitude_equals_clip_by_global_norm(kind, max_rms):
    if kind == "nnx":
        params = nnx.state(make_net(), nnx.Param)
    else:
        params = linen_init()[1]
    grads = jg.random_grad(params, jax.random.key(3), sampler=jax.random.normal)
    grads = jg.grad_apply(lambda g: 0.5 * g, grads)  # RMS about 0.5: 0.3 clips, 10 does not
    want = optax_clip(grads, max_rms * math.sqrt(size(grads)))
    got, rms = jax.jit(clip_by_magnitude)(grads, max_rms)
    assert_same_layout(got, want)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(jg.grad_rms(got)), min(max_rms, float(rms)), rtol=1e-5)


def test_clip_by_magnitude_keeps_a_zero_gradient_and_its_derivative_finite():
    params = linen_init()[1]
    zeros = jg.zero_grad(params)
    clipped, rms = clip_by_magnitude(zeros, 0.1)
    assert float(rms) == 0.0
    assert all(
        not np.asarray(x).any() and np.isfinite(np.asarray(x)).all()
        for x in jax.tree.leaves(clipped)
    )
    derivative = jax.grad(lambda g: jg.grad_rms(g))(zeros)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(derivative))
