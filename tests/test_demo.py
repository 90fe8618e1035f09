"""The RBM example in examples/rbm_digits/, imported as the package `examples.rbm_digits`."""

import importlib.util
import itertools
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad as jg

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # as `python -m examples.rbm_digits` run from the root
    sys.path.insert(0, str(ROOT))

from examples.rbm_digits import cli, rbm, report, sklearn_rbm  # noqa: E402
from examples.rbm_digits import data as datasets  # noqa: E402
from examples.rbm_digits import train as training  # noqa: E402

EXAMPLE = ROOT / "examples" / "rbm_digits"

# One shape for every bars-and-stripes run, so that the training pass compiles once.
BARS = dict(hidden=16, batch_size=10)


def test_bars_and_stripes_patterns():
    data = datasets.bars_and_stripes(4)
    assert data.shape == (30, 16)
    assert data.dtype == np.float32
    assert set(np.unique(data)) == {0.0, 1.0}
    assert len(np.unique(data, axis=0)) == 30
    images = data.reshape(-1, 4, 4)
    rows_constant = (images == images[:, :, :1]).all(axis=(1, 2))
    columns_constant = (images == images[:, :1, :]).all(axis=(1, 2))
    assert (rows_constant | columns_constant).all()
    assert rows_constant.sum() == 16 and columns_constant.sum() == 16
    assert datasets.bars_and_stripes(3).shape == (14, 9)


def test_bars_and_stripes_rejects_bad_side():
    with pytest.raises(ValueError, match="`side` must be at least 1"):
        datasets.bars_and_stripes(0)


def test_binary_digits_split():
    train, held_out = datasets.binary_digits()
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
    again, _ = datasets.binary_digits()
    other, _ = datasets.binary_digits(seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    with pytest.raises(ValueError, match="`held_out` must be from 1 to 1796"):
        datasets.binary_digits(held_out=0)


def test_train_on_bars_improves_log_likelihood():
    result = training.train(datasets.bars_and_stripes(4), epochs=3, passes=40, lr=0.05, **BARS)
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
        rbm.init_params(16, 16, jax.random.key(0))
    )
    assert result.grad_magnitudes.shape == (3 * 40 * 3,)  # 30 patterns in batches of 10
    epoch_means = result.grad_magnitudes.reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(epoch_means, [s.grad_magnitude for s in history], rtol=1e-5)
    assert result.train_seconds > 0 and result.compile_seconds > 0


def test_train_is_deterministic_and_calls_hooks():
    steps, epochs = [], []
    kwargs = dict(epochs=1, passes=2, seed=3, **BARS)
    first = training.train(
        datasets.bars_and_stripes(4), **kwargs, on_steps=steps.append, on_epoch=epochs.append
    )
    second = training.train(datasets.bars_and_stripes(4), **kwargs)
    assert steps == [3, 3]  # 30 patterns in batches of 10
    assert epochs == first.history == second.history
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_rejects_bad_arguments():
    data = datasets.bars_and_stripes(4)
    with pytest.raises(
        ValueError, match="`batch_size` must be from 1 to the number of samples, 30; got 31"
    ):
        training.train(data, epochs=1, batch_size=31)
    with pytest.raises(ValueError, match="`k` must be at least 1"):
        training.train(data, epochs=1, k=0)
    with pytest.raises(ValueError, match="`data` must have shape"):
        training.train(np.zeros(5, np.float32), epochs=1)
    with pytest.raises(ValueError, match="`held_out` must have 16 columns"):
        training.train(data, held_out=np.zeros((3, 9), np.float32), epochs=1)
    with pytest.raises(ValueError, match="`epochs` must be at least 1"):
        sklearn_rbm.fit_sklearn(data, epochs=0)


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
    params = rbm.init_params(6, 4, jax.random.key(4), scale=1.0)
    params = params.replace(
        layers=[{"bias": jnp.linspace(-1, 1, 6)}, {"bias": jnp.linspace(0.5, -0.5, 4)}]
    )
    data = jnp.asarray(np.random.default_rng(0).integers(0, 2, (7, 6)), jnp.float32)
    pll = jax.jit(rbm.pseudo_log_likelihood)
    got = pll(params, data)
    assert got.shape == () and got.dtype == jnp.float32
    a, b = (layer["bias"] for layer in params.layers)
    np.testing.assert_allclose(
        float(got), _numpy_pll(params.weights[0]["W"], a, b, data), rtol=1e-5
    )
    # A model that ignores its input: each unit is a coin flip.
    zero = jg.zero_grad(params)
    np.testing.assert_allclose(
        float(rbm.pseudo_log_likelihood(zero, data)), 6 * math.log(0.5), rtol=1e-6
    )


def test_fit_sklearn_replays_fit_and_scores_with_sklearn_energies():
    from sklearn.neural_network import BernoulliRBM

    train, held_out = datasets.bars_and_stripes(4), datasets.bars_and_stripes(4)[::3]
    epochs = []
    settings = dict(held_out=held_out, epochs=3, passes=2, hidden=8, lr=0.1, batch_size=7, seed=5)
    result = sklearn_rbm.fit_sklearn(train, **settings, on_epoch=epochs.append)
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
    final = jax.jit(rbm.pseudo_log_likelihood)(
        sklearn_rbm.params_from_sklearn(reference), jnp.asarray(held_out)
    )
    np.testing.assert_allclose(result.history[-1].pseudo_log_likelihood, float(final), rtol=1e-6)
    # Without the replay, only the last epoch is scored, from the fitted model itself.
    short = sklearn_rbm.fit_sklearn(train, **settings, replay=False)
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
    train, held_out = datasets.binary_digits()
    result = training.train(train[:400], held_out=held_out, epochs=2, hidden=32, lr=0.05)
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
    state = training.adam_init(params)
    assert jax.tree.structure(state.mean) == jax.tree.structure(params)
    new = params
    for grad in grads:
        new, state = jax.jit(training.adam_update)(new, grad, state, lr=0.1)
    assert int(state.step) == 2
    expected = _numpy_adam(jax.tree.leaves(params), [jax.tree.leaves(g) for g in grads], lr=0.1)
    for got, want in zip(jax.tree.leaves(new), expected, strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_visible, n_hidden", [(5, 3), (3, 5)])
def test_log_partition_matches_brute_force(n_visible, n_hidden):
    params = rbm.init_params(n_visible, n_hidden, jax.random.key(1), scale=1.0)
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
    np.testing.assert_allclose(float(jax.jit(rbm.log_partition)(params)), expected, rtol=1e-5)


def test_cd_gradient_approximates_exact_gradient():
    # With many chains and long Gibbs runs, CD-k tends to the exact log-likelihood gradient
    # (`jax.grad` of the exact mean log-likelihood): this pins the signs and the scaling.
    params = rbm.init_params(4, 3, jax.random.key(2), scale=0.5)
    params = params.replace(
        layers=[{"bias": jnp.array([-1.0, 1.0, 0.0, 0.5])}, {"bias": jnp.array([1.0, -1.0, 0.5])}]
    )
    data = jnp.asarray(np.tile([[1, 0, 1, 0], [0, 1, 1, 1]], (2000, 1)), jnp.float32)
    exact = jax.jit(jax.grad(rbm.mean_log_likelihood))(params, data)
    cd = jax.jit(rbm.cd_gradient, static_argnames="k")(params, data, jax.random.key(3), k=20)
    assert isinstance(cd, jg.Gradient)
    assert jax.tree.structure(cd) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(cd), jax.tree.leaves(exact), strict=True):
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.025)
    assert float(jg.grad_norm(exact)) > 0.5  # the comparison is not about near-zeros


def test_cd_gradient_rejects_bad_k():
    params = rbm.init_params(4, 3, jax.random.key(0))
    with pytest.raises(ValueError, match="`k` must be at least 1"):
        rbm.cd_gradient(params, jnp.zeros((2, 4), jnp.float32), jax.random.key(0), k=0)


def test_comparison_rows_and_markdown_table():
    stats = training.EpochStats(1, -12.345, 0.05, 0.01, None)
    result = training.TrainResult(
        rbm.init_params(4, 2, jax.random.key(0)), [stats], np.ones(3), 1.5, 2.25
    )
    sk = training.TrainResult(result.params, [stats], np.zeros(0), 0.5, None)
    rows = report.comparison_rows({"jaxgrad": result, "scikit-learn": sk}, k=2)
    assert [list(row) for row in rows] == [list(report.COMPARISON_COLUMNS)] * 2
    assert rows[0]["training"] == "CD-2, ADAM" and rows[1]["training"] == "PCD-1, SGD"
    assert (
        rows[0]["PLL"] == "-12.35"
        and rows[0]["compile s"] == "2.25"
        and rows[1]["compile s"] == "-"
    )
    table = report.markdown_table(rows).splitlines()
    assert table[0] == "| " + " | ".join(report.COMPARISON_COLUMNS) + " |"
    assert table[1] == "|---|---|---|---|---|---|" and len(table) == 4
    assert table[2].startswith("| jaxgrad | CD-2, ADAM | -12.35 | 0.0500 | 1.50 | 2.25 |")


def test_main_on_bars_prints_epochs_table_headline_and_figure(capsys, tmp_path, monkeypatch):
    figures = []
    plot = report.plot_results
    monkeypatch.setattr(
        report, "plot_results", lambda *a, **kw: figures.append(plot(*a, **kw)) or figures[-1]
    )
    out = tmp_path / "figure.png"
    args = ["--data", "bars", "--epochs", "2", "--passes", "3", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line[:9] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    for line in lines:  # the exact log-likelihood leads where it is computed
        assert line[9:].split()[0] == "log-likelihood"
        for metric in ["pseudo-log-likelihood", "recon mse", "grad magnitude"]:
            assert metric in line
    table = [line for line in text.splitlines() if "jaxgrad" in line or "scikit-learn" in line]
    assert any("CD-1, ADAM" in line for line in table) and any(
        "PCD-1, SGD" in line for line in table
    )
    header = next(line for line in text.splitlines() if "model" in line and "training" in line)
    assert header.index("exact LL") < header.index("best LL (epoch)") < header.index("PLL")
    assert "compile s" in header
    # The headline names what is compared: each recipe and the shared learning rate.
    assert (
        "jaxgrad (CD-1, ADAM) against scikit-learn (PCD-1, SGD), both at learning rate 0.05: "
        "jaxgrad's exact log-likelihood of the training data is"
    ) in text
    assert "this compares training recipes at one learning rate, not the libraries" in text
    assert f"figure: {out.resolve()}" in text
    assert out.read_bytes().startswith(b"\x89PNG")
    # The figure: colorbars on the filters and the samples, the exact log-likelihood curves.
    (figure,) = figures
    labels = [ax.get_ylabel() for ax in figure.axes]
    assert labels.count("weight") == 2 and labels.count("P(pixel on)") == 2
    # Axis labels in words, no code names (was "grad_magnitude of the CD gradient").
    words = [ax.get_xlabel() for ax in figure.axes] + labels
    assert "root-mean-square entry of the gradient" in labels
    assert not [label for label in words if "_" in label or "grad_" in label], words
    titles = " ".join(ax.get_title() for ax in figure.axes)
    assert "jaxgrad: 32 samples" in titles and "scikit-learn: 32 samples" in titles
    curves = next(ax for ax in figure.axes if ax.get_xlabel() == "epoch")
    legend = [t.get_text() for t in curves.get_legend().get_texts()]
    assert {"jaxgrad, exact LL", "scikit-learn, exact LL", "best possible exact LL"} <= set(legend)
    (ceiling,) = [
        line for line in curves.get_lines() if line.get_label() == "best possible exact LL"
    ]
    np.testing.assert_allclose(ceiling.get_ydata(), [-math.log(30)] * 2, rtol=1e-6)


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
    assert cli.main(["--data", "bars", "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert f"the demo needs {package}" in err and datasets.INSTALL_HINT in err


def _history(lls, plls):
    return [
        training.EpochStats(epoch, pll, 0.1, None, ll)
        for epoch, (ll, pll) in enumerate(zip(lls, plls, strict=True), start=1)
    ]


def _zero_rbm(n_visible, n_hidden):
    return jg.Gradient(
        layers=[{"bias": jnp.zeros(n_visible)}, {"bias": jnp.zeros(n_hidden)}],
        weights=[{"W": jnp.zeros((n_visible, n_hidden))}],
    )


def test_headline_leads_with_the_exact_log_likelihood_and_its_peak():
    params = _zero_rbm(16, 4)
    ours = training.TrainResult(
        params, _history([-9.0, -5.5, -7.0], [-9, -2, -1]), np.ones(3), 1.0, 1.0
    )
    theirs = training.TrainResult(
        params, _history([-10.0, -9.5, -9.0], [-11, -10, -9]), np.zeros(0), 1.0, None
    )
    results = {"jaxgrad": ours, "scikit-learn": theirs}
    assert report.best_epoch(ours.history).epoch == 2
    assert report.best_epoch(theirs.history).epoch == 3
    rows = report.comparison_rows(results)
    assert list(rows[0])[2:4] == list(report.EXACT_COLUMNS)
    assert rows[0]["exact LL"] == "-7.000" and rows[0]["best LL (epoch)"] == "-5.500 (2)"
    assert report.headline(results, scored_on="training", k=2, lr=0.05) == [
        "jaxgrad (CD-2, ADAM) against scikit-learn (PCD-1, SGD), both at learning rate 0.05: "
        "jaxgrad's exact log-likelihood of the training data is 2.00 nats above scikit-learn's "
        "(-7.000 against -9.000). The two differ in sampler and optimizer: this compares "
        "training recipes at one learning rate, not the libraries.",
        "jaxgrad's exact log-likelihood peaked at -5.500 at epoch 2 of 3 and ended 1.50 nats "
        "lower, while its pseudo-log-likelihood kept rising.",
    ]
    assert report.format_epoch(ours.history[1], 3).startswith("epoch 2/3  log-likelihood  -5.5000")
    # Without an exact log-likelihood (digits: 64 visible, 128 hidden), the pseudo one leads.
    big = _zero_rbm(64, 128)
    pll_only = {
        name: training.TrainResult(big, _history([None, None], [-20.0, p]), np.zeros(0), 1.0, None)
        for name, p in [("jaxgrad", -15.0), ("scikit-learn", -17.5)]
    }
    assert list(report.comparison_rows(pll_only)[0]) == list(report.COMPARISON_COLUMNS)
    lines = report.headline(pll_only)
    assert lines[0].startswith(
        "jaxgrad (CD-1, ADAM) against scikit-learn (PCD-1, SGD): "
        "jaxgrad's pseudo-log-likelihood of the held-out data is 2.50 nats above"
    )
    assert "at most 20 units; these models have 64 visible and 128 hidden units" in lines[1]
    assert report.format_epoch(pll_only["jaxgrad"].history[0], 2).startswith(
        "epoch 1/2  pseudo-log-likelihood"
    )


def test_plot_results_without_exact_log_likelihood():
    params = rbm.init_params(64, 24, jax.random.key(0))
    result = training.TrainResult(
        params, _history([None] * 2, [-30.0, -25.0]), np.ones(4), 1.0, 1.0
    )
    figure = report.plot_results({"jaxgrad": result}, filters=8, samples=4, gibbs_steps=2)
    labels = [ax.get_ylabel() for ax in figure.axes]
    assert labels.count("weight") == 1 and labels.count("P(pixel on)") == 1
    curves = next(ax for ax in figure.axes if ax.get_xlabel() == "epoch")
    assert [t.get_text() for t in curves.get_legend().get_texts()] == ["jaxgrad, pseudo-LL"]
    assert "held-out data" in curves.get_title()


def test_sample_draws_from_the_model():
    params = rbm.init_params(6, 3, jax.random.key(0), scale=0.0)
    params = params.replace(layers=[{"bias": jnp.array([9.0, -9.0] * 3)}, {"bias": jnp.zeros(3)}])
    drawn = jax.jit(rbm.sample, static_argnames=("chains", "steps"))(
        params, jax.random.key(1), chains=5, steps=3
    )
    assert drawn.shape == (5, 6) and drawn.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(drawn), np.tile([1.0, 0.0] * 3, (5, 1)), atol=1e-3)
    with pytest.raises(ValueError, match="`chains` and `steps` must be at least 1"):
        rbm.sample(params, jax.random.key(1), steps=0)


def test_best_log_likelihood_is_minus_the_empirical_entropy():
    assert datasets.best_log_likelihood(datasets.bars_and_stripes()) == pytest.approx(-math.log(30))
    doubled = np.array([[0, 1], [0, 1], [1, 1]], np.float32)
    expected = (2 * math.log(2 / 3) + math.log(1 / 3)) / 3
    assert datasets.best_log_likelihood(doubled) == pytest.approx(expected)


BAD_OPTIONS = [
    (["--lr", "0"], "argument --lr: must be a positive, finite number; got '0'"),
    (["--lr", "-1"], "argument --lr: must be a positive, finite number; got '-1'"),
    (["--lr", "nan"], "argument --lr: must be a positive, finite number; got 'nan'"),
    (["--lr", "inf"], "argument --lr: must be a positive, finite number; got 'inf'"),
    (["--lr", "fast"], "argument --lr: must be a positive, finite number; got 'fast'"),
    (["--seed", "-3"], "argument --seed: must be an integer from 0 to 4294967295; got '-3'"),
    (["--seed", "2**40"], "argument --seed: must be an integer from 0 to 4294967295"),
    (["--epochs", "1.5"], "argument --epochs: must be a positive integer; got '1.5'"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer; got '0'"),
    (["--hidden", "-4"], "argument --hidden: must be a positive integer; got '-4'"),
    (["--k", "two"], "argument --k: must be a positive integer; got 'two'"),
    (["--passes", "0"], "argument --passes: must be a positive integer; got '0'"),
    (
        ["--data", "bars", "--batch-size", "31"],
        "argument --batch-size: must be at most 30, the number of training samples of --data bars; got 31",
    ),
    (["--batch-size", "1438"], "argument --batch-size: must be at most 1437"),
    (
        ["--out", "{tmp}/missing/figure.png"],
        "argument --out: must be in an existing folder; '{tmp}/missing' does not exist",
    ),
    (["--out", "{tmp}/figure.gif"], "argument --out: must end with one of .png, .pdf, .svg"),
    (
        ["--out", "{tmp}/folder.png"],
        "argument --out: must be a file, not the folder '{tmp}/folder.png'",
    ),
    (["--data", "letters"], "argument --data: invalid choice: 'letters'"),
]


@pytest.mark.parametrize(
    "args, message", BAD_OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else ""
)
def test_main_rejects_bad_options_before_any_work(args, message, capsys, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("trained or loaded data with a bad option")

    for module, name in [
        (training, "train"),
        (sklearn_rbm, "fit_sklearn"),
        (datasets, "binary_digits"),
    ]:
        monkeypatch.setattr(module, name, no_work)
    (tmp_path / "folder.png").mkdir()
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert time.perf_counter() - start < 0.5
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m examples.rbm_digits")
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert "_positive" not in err and "invalid" not in err.replace("invalid choice", "")


def test_training_sizes_are_those_of_the_data():
    assert datasets.TRAINING_SAMPLES["bars"] == len(datasets.bars_and_stripes())
    # digits: checked against the data in test_binary_digits_split
    assert datasets.TRAINING_SAMPLES["digits"] == 1437


def test_runs_as_a_module_from_the_repository_root():
    # The command of `make demo`; a bad option exits at once, before JAX is imported.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [sys.executable, "-X", "importtime", "-m", "examples.rbm_digits", "--lr", "0"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "argument --lr: must be a positive, finite number; got '0'" in done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "examples.rbm_digits.cli" in imported and "jax" not in imported


def test_uses_only_the_public_api_and_left_the_package():
    assert importlib.util.find_spec("jaxgrad.demo") is None
    for path in EXAMPLE.glob("*.py"):
        text = path.read_text()
        assert "jaxgrad._" not in text and "from jaxgrad import _" not in text, path
        assert len(text.splitlines()) <= 400, path


def test_benchmarks_help_works_without_optax():
    # benchmarks/run.py imports optax only when a benchmark runs; `--help` needs none.
    script = (
        "import runpy, sys; sys.modules['optax'] = sys.modules['optax.tree_utils'] = None; "
        "sys.argv = ['benchmarks/run.py', '--help']; "
        "runpy.run_path('benchmarks/run.py', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: run.py")
