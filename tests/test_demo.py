import itertools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad as jg
from jaxgrad import demo

# One shape for every bars-and-stripes run, so that the training pass compiles once.
BARS = dict(hidden=16, batch_size=10)


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


def test_binary_digits_split():
    train, held_out = demo.binary_digits()
    assert train.shape == (1437, 64) and held_out.shape == (360, 64)
    assert train.dtype == held_out.dtype == np.float32
    assert set(np.unique(train)) == set(np.unique(held_out)) == {0.0, 1.0}
    from sklearn.datasets import load_digits

    everything = (load_digits().data >= 8).astype(np.float32)
    # A split of the whole set: sorted rows of both parts together are the sorted rows of all.
    both = np.concatenate([train, held_out])
    assert np.array_equal(np.unique(both, axis=0, return_counts=True)[1].sum(), 1797)
    assert np.array_equal(
        np.sort(both.view(np.dtype((np.void, 64 * 4))).ravel()),
        np.sort(everything.view(np.dtype((np.void, 64 * 4))).ravel()),
    )
    again, _ = demo.binary_digits()
    other, _ = demo.binary_digits(seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    with pytest.raises(ValueError, match="`held_out` must be from 1 to 1796"):
        demo.binary_digits(held_out=0)


def test_train_on_bars_improves_log_likelihood():
    result = demo.train(demo.bars_and_stripes(4), epochs=3, passes=40, lr=0.05, **BARS)
    history = result.history
    assert [s.epoch for s in history] == [1, 2, 3]
    for stats in history:
        values = [
            stats.reconstruction_error,
            stats.log_likelihood,
            stats.pseudo_log_likelihood,
            stats.grad_magnitude,
        ]
        assert all(math.isfinite(v) for v in values)
        assert stats.log_likelihood < 0 and stats.pseudo_log_likelihood < 0
    # An untrained model scores 16 log(1/2) = -11.09 on both measures.
    assert history[-1].log_likelihood > max(history[0].log_likelihood + 1.0, -9.0)
    assert history[-1].pseudo_log_likelihood > history[0].pseudo_log_likelihood + 1.0
    assert history[-1].reconstruction_error < history[0].reconstruction_error
    assert isinstance(result.params, jg.Gradient)
    assert jax.tree.structure(result.params) == jax.tree.structure(
        demo.init_params(16, 16, jax.random.key(0))
    )
    assert result.grad_magnitudes.shape == (3 * 40 * 3,)  # 30 patterns in batches of 10
    epoch_means = result.grad_magnitudes.reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(epoch_means, [s.grad_magnitude for s in history], rtol=1e-5)
    assert result.train_seconds > 0 and result.compile_seconds > 0


def test_train_is_deterministic_and_calls_hooks():
    steps, epochs = [], []
    kwargs = dict(epochs=1, passes=2, seed=3, **BARS)
    first = demo.train(
        demo.bars_and_stripes(4), **kwargs, on_steps=steps.append, on_epoch=epochs.append
    )
    second = demo.train(demo.bars_and_stripes(4), **kwargs)
    assert steps == [3, 3]  # 30 patterns in batches of 10
    assert epochs == first.history == second.history
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_rejects_bad_arguments():
    data = demo.bars_and_stripes(4)
    with pytest.raises(
        ValueError, match="`batch_size` must be from 1 to the number of samples, 30; got 31"
    ):
        demo.train(data, epochs=1, batch_size=31)
    with pytest.raises(ValueError, match="`k` must be at least 1"):
        demo.train(data, epochs=1, k=0)
    with pytest.raises(ValueError, match="`data` must have shape"):
        demo.train(np.zeros(5, np.float32), epochs=1)
    with pytest.raises(ValueError, match="`held_out` must have 16 columns"):
        demo.train(data, held_out=np.zeros((3, 9), np.float32), epochs=1)
    with pytest.raises(ValueError, match="`epochs` must be at least 1"):
        demo.fit_sklearn(data, epochs=0)


def _numpy_pll(w, a, b, data):
    """Reference: flip each unit in turn and compare free energies, in float64."""
    w, a, b, data = (np.asarray(x, np.float64) for x in (w, a, b, data))

    def free_energy(v):
        return -(v @ a) - np.logaddexp(0, v @ w + b).sum(axis=-1)

    total = np.zeros(len(data))
    for i in range(data.shape[1]):
        flipped = data.copy()
        flipped[:, i] = 1 - flipped[:, i]
        total += -np.logaddexp(0, free_energy(data) - free_energy(flipped))
    return total.mean()


def test_pseudo_log_likelihood_matches_flipping_each_unit():
    params = demo.init_params(6, 4, jax.random.key(4), scale=1.0)
    params = params.replace(
        layers=[{"bias": jnp.linspace(-1, 1, 6)}, {"bias": jnp.linspace(0.5, -0.5, 4)}]
    )
    data = jnp.asarray(np.random.default_rng(0).integers(0, 2, (7, 6)), jnp.float32)
    pll = jax.jit(demo.pseudo_log_likelihood)
    got = pll(params, data)
    assert got.shape == () and got.dtype == jnp.float32
    a, b = (layer["bias"] for layer in params.layers)
    np.testing.assert_allclose(
        float(got), _numpy_pll(params.weights[0]["W"], a, b, data), rtol=1e-5
    )
    # A model that ignores its input: each unit is a coin flip.
    zero = jg.zero_grad(params)
    np.testing.assert_allclose(
        float(demo.pseudo_log_likelihood(zero, data)), 6 * math.log(0.5), rtol=1e-6
    )


def test_fit_sklearn_replays_fit_and_scores_with_sklearn_energies():
    from sklearn.neural_network import BernoulliRBM

    train, held_out = demo.bars_and_stripes(4), demo.bars_and_stripes(4)[::3]
    epochs = []
    settings = dict(held_out=held_out, epochs=3, passes=2, hidden=8, lr=0.1, batch_size=7, seed=5)
    result = demo.fit_sklearn(train, **settings, on_epoch=epochs.append)
    assert result.compile_seconds is None and result.grad_magnitudes.size == 0
    assert epochs == result.history and [s.epoch for s in epochs] == [1, 2, 3]
    reference = BernoulliRBM(
        n_components=8, learning_rate=0.1, batch_size=7, n_iter=6, random_state=5
    )
    reference.fit(train.astype(np.float64))
    np.testing.assert_allclose(
        np.asarray(result.params.weights[0]["W"]), reference.components_.T, rtol=1e-6
    )
    # The replay ends where `fit` did: its last epoch scores the fitted parameters.
    final = jax.jit(demo.pseudo_log_likelihood)(
        demo.params_from_sklearn(reference), jnp.asarray(held_out)
    )
    np.testing.assert_allclose(result.history[-1].pseudo_log_likelihood, float(final), rtol=1e-6)
    # Without the replay, only the last epoch is scored, from the fitted model itself.
    short = demo.fit_sklearn(train, **settings, replay=False)
    assert short.history == [result.history[-1]]
    # The conversion keeps scikit-learn's energy: score with its own free energy.
    x = held_out.astype(np.float64)
    expected = np.zeros(len(x))
    for i in range(x.shape[1]):
        flipped = x.copy()
        flipped[:, i] = 1 - flipped[:, i]
        expected += -np.logaddexp(0, reference._free_energy(x) - reference._free_energy(flipped))
    np.testing.assert_allclose(float(final), expected.mean(), rtol=1e-5)


def test_train_on_digits_beats_an_untrained_model():
    train, held_out = demo.binary_digits()
    result = demo.train(train[:400], held_out=held_out, epochs=2, hidden=32, lr=0.05)
    first, last = result.history
    assert last.log_likelihood is None  # 64 visible and 32 hidden units: not enumerable
    assert -64 * math.log(2) + 10 < first.pseudo_log_likelihood < last.pseudo_log_likelihood < 0
    assert last.reconstruction_error < first.reconstruction_error


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


def test_comparison_rows_and_markdown_table():
    stats = demo.EpochStats(1, -12.345, 0.05, 0.01, None)
    result = demo.TrainResult(
        demo.init_params(4, 2, jax.random.key(0)), [stats], np.ones(3), 1.5, 2.25
    )
    sk = demo.TrainResult(result.params, [stats], np.zeros(0), 0.5, None)
    rows = demo.comparison_rows({"jaxgrad": result, "scikit-learn": sk}, k=2)
    assert [list(row) for row in rows] == [list(demo.COMPARISON_COLUMNS)] * 2
    assert rows[0]["training"] == "CD-2, ADAM" and rows[1]["training"] == "PCD-1, SGD"
    assert (
        rows[0]["PLL"] == "-12.35"
        and rows[0]["compile s"] == "2.25"
        and rows[1]["compile s"] == "-"
    )
    table = demo.markdown_table(rows).splitlines()
    assert table[0] == "| " + " | ".join(demo.COMPARISON_COLUMNS) + " |"
    assert table[1] == "|---|---|---|---|---|---|" and len(table) == 4
    assert table[2].startswith("| jaxgrad | CD-2, ADAM | -12.35 | 0.0500 | 1.50 | 2.25 |")


def test_main_on_bars_prints_epochs_table_and_writes_figure(capsys, tmp_path):
    out = tmp_path / "figure.png"
    args = ["--data", "bars", "--epochs", "2", "--passes", "3", "--no-progress", "--out", str(out)]
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line[:9] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    for line in lines:
        for metric in ["pseudo-log-likelihood", "recon mse", "grad magnitude", "log-likelihood"]:
            assert metric in line
    table = [line for line in text.splitlines() if "jaxgrad" in line or "scikit-learn" in line]
    assert any("CD-1, ADAM" in line for line in table) and any(
        "PCD-1, SGD" in line for line in table
    )
    header = next(line for line in text.splitlines() if "model" in line and "training" in line)
    assert "exact LL" in header and "compile s" in header
    assert f"figure: {out.resolve()}" in text
    assert out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "module, package",
    [
        ("rich.progress", "rich"),
        ("sklearn.neural_network", "scikit-learn"),
        ("matplotlib.figure", "matplotlib"),
    ],
)
def test_main_names_the_missing_extra(monkeypatch, capsys, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    assert demo.main(["--data", "bars", "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert f"the demo needs {package}" in err and "pip install 'jaxgrad[demo]'" in err
