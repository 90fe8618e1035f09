"""Reporting: the epoch lines, the comparison table, the headline and the figure.

The headline metric is the exact log-likelihood wherever it is computed (a layer of at
most `rbm.MAX_ENUMERATED_UNITS` units, as on bars and stripes), else the
pseudo-log-likelihood. The two can disagree: on bars and stripes the pseudo-likelihood
keeps rising while the exact log-likelihood peaks after a few epochs and falls, so the
headline names the best epoch too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from . import rbm
from .data import require
from .train import EpochStats, TrainResult

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time
    from matplotlib.figure import Figure

COMPARISON_COLUMNS = ("model", "training", "PLL", "recon mse", "train s", "compile s")
"""The columns of `comparison_rows`: PLL is the final pseudo-log-likelihood (nats), recon
mse the final reconstruction error, then the training and compilation wall times."""

EXACT_COLUMNS = ("exact LL", "best LL (epoch)")
"""The columns `comparison_rows` inserts after "training" where every model has an exact
log-likelihood: its final value and its best value with the epoch it was reached."""


def has_exact(results: Mapping[str, TrainResult]) -> bool:
    """Whether every epoch of every result has an exact log-likelihood."""
    return all(s.log_likelihood is not None for r in results.values() for s in r.history)


def best_epoch(history: Sequence[EpochStats]) -> EpochStats:
    """The epoch of highest exact log-likelihood (pseudo-log-likelihood where there is none)."""
    if all(s.log_likelihood is not None for s in history):
        return max(history, key=lambda s: s.log_likelihood or 0.0)
    return max(history, key=lambda s: s.pseudo_log_likelihood)


def format_epoch(stats: EpochStats, epochs: int) -> str:
    """The line printed for one epoch: the exact log-likelihood first where there is one.

    Args:
        stats: the epoch's metrics.
        epochs: the total number of epochs (sets the width of the epoch number).

    Returns:
        One line of text, without a newline.
    """
    line = f"epoch {stats.epoch:>{len(str(epochs))}}/{epochs}  "
    if stats.log_likelihood is not None:
        line += f"log-likelihood {stats.log_likelihood:8.4f}  "
    line += (
        f"pseudo-log-likelihood {stats.pseudo_log_likelihood:8.3f}  "
        f"recon mse {stats.reconstruction_error:.4f}"
    )
    if stats.grad_magnitude is not None:
        line += f"  grad magnitude {stats.grad_magnitude:.5f}"
    return line


def training_of(name: str, k: int = 1) -> str:
    """How the model `name` was trained: scikit-learn's persistent CD-1 with SGD, or `train`'s.

    Args:
        name: the model name; one starting with "scikit-learn" is scikit-learn's.
        k: the number of Gibbs steps `train` used.

    Returns:
        "PCD-1, SGD" or "CD-<k>, ADAM".
    """
    return "PCD-1, SGD" if name.startswith("scikit-learn") else f"CD-{k}, ADAM"


def comparison_rows(results: Mapping[str, TrainResult], *, k: int = 1) -> list[dict[str, str]]:
    """One formatted row per model: final metrics and wall times.

    Args:
        results: the results by model name; a name starting with "scikit-learn" is
            labelled as scikit-learn's training (persistent CD-1, SGD), any other as
            `train`'s (CD-k, ADAM).
        k: the number of Gibbs steps `train` used.

    Returns:
        A list of dicts with the keys `COMPARISON_COLUMNS`, with `EXACT_COLUMNS` after
        "training" where `has_exact`; values as text.
    """
    exact = has_exact(results)
    rows = []
    for name, result in results.items():
        last, best = result.history[-1], best_epoch(result.history)
        row = {"model": name, "training": training_of(name, k)}
        if exact:
            row["exact LL"] = f"{last.log_likelihood:.3f}"
            row["best LL (epoch)"] = f"{best.log_likelihood:.3f} ({best.epoch})"
        compile_seconds = result.compile_seconds
        row |= {
            "PLL": f"{last.pseudo_log_likelihood:.2f}",
            "recon mse": f"{last.reconstruction_error:.4f}",
            "train s": f"{result.train_seconds:.2f}",
            "compile s": "-" if compile_seconds is None else f"{compile_seconds:.2f}",
        }
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, str]]) -> str:
    """Rows of text (dicts with the same keys) as a Markdown table.

    Args:
        rows: at least one row; the keys of the first are the columns.

    Returns:
        The table, one line per row after the header and the rule.
    """
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def headline(
    results: Mapping[str, TrainResult],
    *,
    scored_on: str = "held-out",
    k: int = 1,
    lr: float | None = None,
) -> list[str]:
    """The summary sentences: the first model against the second, then each model's peak.

    The comparison names what is compared: each model's training (sampler and
    optimizer, `training_of`) and the learning rate they share, and says that the
    difference is one of training recipes, not of libraries. The metric is the exact
    log-likelihood where `has_exact`, else the pseudo-log-likelihood. A model whose
    exact log-likelihood ended more than 0.01 nats below its best epoch gets a sentence
    saying so.

    Args:
        results: the results by model name; the first two are compared.
        scored_on: the data the metrics were measured on, for the wording.
        k: the number of Gibbs steps `train` used.
        lr: the learning rate both models used, if it is to be named.

    Returns:
        A list of sentences.
    """
    exact = has_exact(results)
    metric = "exact log-likelihood" if exact else "pseudo-log-likelihood"

    def value(stats: EpochStats) -> float:
        return (stats.log_likelihood or 0.0) if exact else stats.pseudo_log_likelihood

    lines = []
    names = list(results)
    if len(names) >= 2:
        ours, theirs = (value(results[name].history[-1]) for name in names[:2])
        recipes = [f"{name} ({training_of(name, k)})" for name in names[:2]]
        rate = "" if lr is None else f", both at learning rate {lr:g}"
        lines.append(
            f"{recipes[0]} against {recipes[1]}{rate}: {names[0]}'s {metric} of the "
            f"{scored_on} data is {abs(ours - theirs):.2f} nats "
            f"{'above' if ours >= theirs else 'below'} {names[1]}'s ({ours:.3f} against "
            f"{theirs:.3f}). The two differ in sampler and optimizer: this compares "
            "training recipes at one learning rate, not the libraries."
        )
    if not exact:
        params = next(iter(results.values())).params
        n_visible, n_hidden = rbm.unpack(params)[2].shape
        lines.append(
            f"(The exact log-likelihood needs a layer of at most {rbm.MAX_ENUMERATED_UNITS} "
            f"units; these models have {n_visible} visible and {n_hidden} hidden units.)"
        )
        return lines
    for name, result in results.items():
        last, best = result.history[-1], best_epoch(result.history)
        drop = value(best) - value(last)
        if drop > 0.01:
            rose = last.pseudo_log_likelihood > best.pseudo_log_likelihood
            lines.append(
                f"{name}'s exact log-likelihood peaked at {value(best):.3f} at epoch "
                f"{best.epoch} of {last.epoch} and ended {drop:.2f} nats lower"
                + (", while its pseudo-log-likelihood kept rising." if rose else ".")
            )
    return lines


def _mosaic(tiles: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rows of `tiles` as images of `shape` in a grid (8 columns, fewer if square), NaN between."""
    columns = 8 if len(tiles) > 16 else math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    height, width = shape
    image = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1), np.nan)
    for j, tile in enumerate(tiles):
        r, c = divmod(j, columns)
        top, left = r * (height + 1), c * (width + 1)
        image[top : top + height, left : left + width] = tile.reshape(shape)
    return image


_sample = jax.jit(rbm.sample, static_argnames=("chains", "steps"))


def plot_results(
    results: Mapping[str, TrainResult],
    *,
    image_shape: tuple[int, int] | None = None,
    filters: int = 32,
    samples: int = 32,
    gibbs_steps: int = 1000,
    seed: int = 0,
    scored_on: str = "held-out",
    best_possible: float | None = None,
) -> Figure:
    """A figure of each model's filters and samples, the learning curves and the gradient.

    Top row: the weights into the first `filters` hidden units of each model, on one
    colour scale per model (its colorbar, in weight units). Middle row: `samples` model
    samples of each model (`rbm.sample`: Gibbs chains from coin flips), as the
    probability of each pixel. Bottom left: after each epoch, the exact log-likelihood
    (solid, where it is computed, with its best epoch starred) and the
    pseudo-log-likelihood (dashed). Bottom right: `jaxgrad.grad_rms` of every
    training step of the models that record it.

    Args:
        results: the results by model name, in the order to show them.
        image_shape: the shape of an image, by default the square of the number of
            visible units.
        filters: the number of filters to show per model.
        samples: the number of samples to show per model.
        gibbs_steps: the number of Gibbs steps of each sample's chain.
        seed: the seed of the sampling.
        scored_on: the data the curves were measured on, for the title.
        best_possible: if given, drawn as a dotted line: the highest log-likelihood any
            model could reach on those data (`data.best_log_likelihood`).

    Returns:
        A `matplotlib.figure.Figure` (not attached to pyplot: save it with `savefig`, or
        show it as a notebook cell's value).

    Raises:
        MissingExtraError: if matplotlib is not installed.
    """
    figure_module = require("matplotlib.figure", "matplotlib")
    ticker = require("matplotlib.ticker", "matplotlib")
    colormaps = require("matplotlib", "matplotlib").colormaps
    n_visible = int(rbm.unpack(next(iter(results.values())).params)[2].shape[0])
    side = math.isqrt(n_visible)
    shape = image_shape or (side, n_visible // side)
    columns = max(2, len(results))
    figure = figure_module.Figure(figsize=(5.5 * columns, 11), layout="constrained")
    grid = figure.add_gridspec(3, columns, height_ratios=[1, 1, 1.3])
    signed = colormaps["RdBu_r"].with_extremes(bad="0.75")
    gray = colormaps["gray_r"].with_extremes(bad="lightsteelblue")
    colors = {name: f"C{i}" for i, name in enumerate(results)}
    for i, (name, result) in enumerate(results.items()):
        weights = np.asarray(rbm.unpack(result.params)[2], np.float64).T[:filters]
        scale = float(np.abs(weights).max()) or 1.0
        ax = figure.add_subplot(grid[0, i])
        shown = ax.imshow(_mosaic(weights, shape), cmap=signed, vmin=-scale, vmax=scale)
        ax.set_title(f"{name}: weights into {len(weights)} hidden units", fontsize="medium")
        ax.set_axis_off()
        figure.colorbar(shown, ax=ax, shrink=0.9, label="weight")
        key = jax.random.key(seed)
        drawn = np.asarray(_sample(result.params, key, chains=samples, steps=gibbs_steps))
        ax = figure.add_subplot(grid[1, i])
        shown = ax.imshow(_mosaic(drawn, shape), cmap=gray, vmin=0, vmax=1)
        ax.set_title(
            f"{name}: {samples} samples\n({gibbs_steps} Gibbs steps from coin flips)",
            fontsize="medium",
        )
        ax.set_axis_off()
        figure.colorbar(shown, ax=ax, shrink=0.9, label="P(pixel on)")

    curves = figure.add_subplot(grid[2, 0])
    exact = has_exact(results)
    for name, result in results.items():
        epochs = [s.epoch for s in result.history]
        pll = [s.pseudo_log_likelihood for s in result.history]
        if exact:
            ll = [s.log_likelihood for s in result.history]
            curves.plot(epochs, ll, "o-", color=colors[name], label=f"{name}, exact LL")
            best = best_epoch(result.history)
            curves.plot(best.epoch, best.log_likelihood, "*", ms=16, color=colors[name])
        style = "--" if exact else "o-"
        curves.plot(epochs, pll, style, color=colors[name], label=f"{name}, pseudo-LL")
    if exact and best_possible is not None:
        curves.axhline(best_possible, ls=":", color="k", label="best possible exact LL")
    curves.set_xlabel("epoch")
    curves.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    curves.set_ylabel("nats per image")
    what = (
        "exact log-likelihood (solid, best epoch starred) and\npseudo-log-likelihood (dashed)"
        if exact
        else "pseudo-log-likelihood"
    )
    curves.set_title(f"{what}, {scored_on} data", fontsize="medium")
    curves.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncols=2)

    magnitude = figure.add_subplot(grid[2, 1])
    for name, result in results.items():
        steps = len(result.grad_magnitudes)
        if steps:
            magnitude.plot(result.grad_magnitudes, lw=0.5, alpha=0.4, color=colors[name])
            per_epoch = steps // len(result.history)
            means = result.grad_magnitudes[: per_epoch * len(result.history)]
            means = means.reshape(len(result.history), per_epoch).mean(axis=1)
            centers = (np.arange(len(means)) + 0.5) * per_epoch
            magnitude.plot(centers, means, "o-", color=colors[name], label=f"{name}, epoch mean")
    magnitude.set_xlabel("training step")
    magnitude.set_ylabel("root-mean-square entry of the gradient")
    magnitude.set_yscale("log")
    magnitude.set_title(
        "size of the contrastive-divergence gradient\n(thin: each step)", fontsize="medium"
    )
    if magnitude.get_legend_handles_labels()[0]:
        magnitude.legend(fontsize="small")
    return figure
