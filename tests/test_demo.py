import itertools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad as jg
from jaxgrad import demo


def test_bars_and_stripes_patterns():
    data = demo.bars_and_stripes(4)
    assert data.shape == (30, 16)
    assert data.dtype == np.float32
    assert set(np.unique(data)) == {0.0, 1.0}
    assert len(np.unique(data, axis=0)) == 30
    images = data.reshape(-1, 4, 4)
    rows_constant = (images == images[:, :, :1]).all(axis=(1, 2))
    columns_constant = (images == images[:, :1, :]).all(axis=(1, 2))
    assert (rows_constant | columns_constant).all()
    assert rows_constant.sum() == 16 and columns_constant.sum() == 16
    assert demo.bars_and_stripes(3).shape == (14, 9)


def test_bars_and_stripes_rejects_bad_side():
    with pytest.raises(ValueError, match="`side` must be at least 1"):
        demo.bars_and_stripes(0)


def test_train_improves_log_likelihood():
    result = demo.train(epochs=3, seed=0)
    history = result.history
    assert [s.epoch for s in history] == [1, 2, 3]
    for stats in history:
        values = [stats.reconstruction_error, stats.log_likelihood, stats.grad_magnitude]
        assert all(math.isfinite(v) for v in values)
        assert stats.log_likelihood < 0 and stats.reconstruction_error >= 0
    assert history[-1].log_likelihood > history[0].log_likelihood + 1.0
    assert history[-1].reconstruction_error < history[0].reconstruction_error
    assert isinstance(result.params, jg.Gradient)
    assert jax.tree.structure(result.params) == jax.tree.structure(
        demo.init_params(16, 16, jax.random.key(0))
    )


def test_train_is_deterministic_and_calls_hooks():
    steps, epochs = [], []
    kwargs = dict(epochs=1, passes=2, seed=3)
    first = demo.train(**kwargs, on_steps=steps.append, on_epoch=epochs.append)
    second = demo.train(**kwargs)
    assert steps == [3, 3]  # 30 patterns in batches of 10
    assert epochs == first.history == second.history


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`batch_size` must be from 1 to the number of samples"):
        demo.train(epochs=1, batch_size=31)
    with pytest.raises(ValueError, match="`k` must be at least 1"):
        demo.train(epochs=1, k=0)
    with pytest.raises(ValueError, match="`data` must have shape"):
        demo.train(np.zeros(5, np.float32), epochs=1)


def test_main_prints_epoch_lines(capsys):
    assert demo.main(["--epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2") and lines[1].startswith("epoch 2/2")
    for line in lines:
        assert "recon mse" in line and "log-likelihood" in line and "grad magnitude" in line


def test_main_without_rich(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich.progress", None)  # makes the import fail
    assert demo.main(["--epochs", "1"]) == 1
    assert "pip install 'jaxgrad[demo]'" in capsys.readouterr().err


def _numpy_adam(params, grads, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    params = [np.asarray(p, np.float64) for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t, grad in enumerate(grads, start=1):
        for i, g in enumerate(np.asarray(x, np.float64) for x in grad):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            mhat, vhat = m[i] / (1 - beta1**t), v[i] / (1 - beta2**t)
            params[i] = params[i] + lr * mhat / (np.sqrt(vhat) + eps)
    return params


def test_adam_matches_numpy():
    rng = np.random.default_rng(0)
    params = jg.Gradient(
        layers=[{"bias": jnp.asarray(rng.normal(size=3), jnp.float32)}],
        weights=[{"W": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}],
    )
    grads = [
        jg.grad_apply(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        for _ in range(2)
    ]
    state = demo.adam_init(params)
    assert jax.tree.structure(state.mean) == jax.tree.structure(params)
    new = params
    for grad in grads:
        new, state = jax.jit(demo.adam_update)(new, grad, state, lr=0.1)
    assert int(state.step) == 2
    expected = _numpy_adam(jax.tree.leaves(params), [jax.tree.leaves(g) for g in grads], lr=0.1)
    for got, want in zip(jax.tree.leaves(new), expected, strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_visible, n_hidden", [(5, 3), (3, 5)])
def test_log_partition_matches_brute_force(n_visible, n_hidden):
    params = demo.init_params(n_visible, n_hidden, jax.random.key(1), scale=1.0)
    params = params.replace(
        layers=[
            {"bias": jnp.linspace(-1, 1, n_visible)},
            {"bias": jnp.linspace(0.5, -0.5, n_hidden)},
        ]
    )
    a, b = (np.asarray(layer["bias"], np.float64) for layer in params.layers)
    w = np.asarray(params.weights[0]["W"], np.float64)
    energies = [
        -(np.dot(a, v) + np.dot(b, h) + np.asarray(v) @ w @ np.asarray(h))
        for v in itertools.product([0, 1], repeat=n_visible)
        for h in itertools.product([0, 1], repeat=n_hidden)
    ]
    expected = np.log(np.sum(np.exp(-np.asarray(energies))))
    np.testing.assert_allclose(float(jax.jit(demo.log_partition)(params)), expected, rtol=1e-5)


def test_cd_gradient_approximates_exact_gradient():
    # With many chains and long Gibbs runs, CD-k tends to the exact log-likelihood gradient
    # (`jax.grad` of the exact mean log-likelihood): this pins the signs and the scaling.
    params = demo.init_params(4, 3, jax.random.key(2), scale=0.5)
    params = params.replace(
        layers=[{"bias": jnp.array([-1.0, 1.0, 0.0, 0.5])}, {"bias": jnp.array([1.0, -1.0, 0.5])}]
    )
    data = jnp.asarray(np.tile([[1, 0, 1, 0], [0, 1, 1, 1]], (2000, 1)), jnp.float32)
    exact = jax.jit(jax.grad(demo.mean_log_likelihood))(params, data)
    cd = jax.jit(demo.cd_gradient, static_argnames="k")(params, data, jax.random.key(3), k=20)
    assert isinstance(cd, jg.Gradient)
    assert jax.tree.structure(cd) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(cd), jax.tree.leaves(exact), strict=True):
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.025)
    assert float(jg.grad_norm(exact)) > 0.5  # the comparison is not about near-zeros


def test_cd_gradient_rejects_bad_k():
    params = demo.init_params(4, 3, jax.random.key(0))
    with pytest.raises(ValueError, match="`k` must be at least 1"):
        demo.cd_gradient(params, jnp.zeros((2, 4), jnp.float32), jax.random.key(0), k=0)
