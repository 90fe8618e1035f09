"""The command line: `python -m examples.rbm_digits [--data bars] [options]`.

Every option is checked before anything is loaded or trained (JAX is not even imported
until then), so a bad option is an argparse error in a fraction of a second.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .data import TRAINING_SAMPLES, MissingExtraError, require

DEFAULTS = {
    "digits": {"epochs": 20, "hidden": 128, "lr": 0.05, "batch_size": 10, "k": 1, "passes": 1},
    "bars": {"epochs": 10, "hidden": 16, "lr": 0.05, "batch_size": 10, "k": 1, "passes": 50},
}
"""The settings of each data set that a command-line option leaves unset."""

FIGURE_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff")
"""The file types `--out` may have: formats matplotlib writes with its default backend."""

MAX_SEED = 2**32 - 1
"""The largest seed: scikit-learn's `random_state` is a 32-bit unsigned integer."""


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a positive, finite number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number; got {text!r}")
    return value


def seed(text: str) -> int:
    """An argparse type: an integer from 0 to `MAX_SEED`."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_SEED}; got {text!r}")
    return value


def figure_path(text: str) -> Path:
    """An argparse type: a new or existing file, in an existing folder we may write to."""
    path = Path(text)
    folder = path.parent
    if path.suffix.lower() not in FIGURE_FORMATS:
        raise argparse.ArgumentTypeError(
            f"must end with one of {', '.join(FIGURE_FORMATS)}; got {text!r}"
        )
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"must be a file, not the folder {text!r}")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(
            f"must be in an existing folder; {str(folder)!r} does not exist"
        )
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"must be a file we may write; {text!r} is not")
    return path


def parser() -> argparse.ArgumentParser:
    """The argument parser of `main`."""
    result = argparse.ArgumentParser(
        prog="python -m examples.rbm_digits",
        description=(
            "Train a Bernoulli RBM with CD-k, ADAM and jaxgrad, and compare it with "
            "scikit-learn's BernoulliRBM trained with the same settings."
        ),
    )
    add = result.add_argument
    add(
        "--data",
        choices=sorted(DEFAULTS),
        default="digits",
        help="binarized 8x8 handwritten digits (default) or 4x4 bars and stripes",
    )
    add("--epochs", type=positive_int, help="epochs (digits: 20, bars: 10)")
    add("--hidden", type=positive_int, help="hidden units (digits: 128, bars: 16)")
    add("--lr", type=positive_float, help="learning rate of both models (default: 0.05)")
    add("--batch-size", type=positive_int, help="batch size (default: 10)")
    add("--k", type=positive_int, help="Gibbs steps per CD-k gradient (default: 1)")
    add("--passes", type=positive_int, help="passes over the data per epoch (digits: 1, bars: 50)")
    add("--seed", type=seed, default=0, help="random seed (default: 0)")
    add("--out", type=figure_path, help="where to write the figure (default: rbm_<data>.png)")
    add("--no-progress", action="store_true", help="no progress bar, epoch lines only")
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the example from the command line.

    Checks every option, then trains jaxgrad's RBM with a progress bar and one line per
    epoch, then scikit-learn's `BernoulliRBM` with the same settings, prints a table of
    both and the headline, and writes a figure (`report.plot_results`).

    Args:
        argv: the arguments, without the program name; by default `sys.argv[1:]`.

    Returns:
        The exit status: 0 on success, 1 if a package of the `demo` extra is missing.
        A bad option exits with argparse's status 2 and message.
    """
    args_parser = parser()
    args = args_parser.parse_args(argv)
    settings = {
        name: default if (value := getattr(args, name)) is None else value
        for name, default in DEFAULTS[args.data].items()
    }
    n = TRAINING_SAMPLES[args.data]
    if settings["batch_size"] > n:
        args_parser.error(
            f"argument --batch-size: must be at most {n}, the number of training samples "
            f"of --data {args.data}; got {settings['batch_size']}"
        )
    out = args.out
    if out is None:
        try:
            out = figure_path(f"rbm_{args.data}.png")
        except argparse.ArgumentTypeError as error:
            args_parser.error(f"argument --out (default): {error}")
    try:
        progress_module = require("rich.progress", "rich")
        console = require("rich.console", "rich").Console(highlight=False)
        table_module = require("rich.table", "rich")
        require("sklearn.neural_network", "scikit-learn")
        require("matplotlib.figure", "matplotlib")
    except MissingExtraError as error:
        print(error, file=sys.stderr)
        return 1
    # Only now the modules that import JAX, and the data.
    from . import data, report, sklearn_rbm, train

    if not console.is_terminal:
        console.width = 110  # rich's 80 for a pipe or a file cuts the table
    if args.data == "digits":
        samples, held_out = data.binary_digits(seed=args.seed)
        what = f"{len(samples)} binarized 8x8 digits, scored on {len(held_out)} held-out ones"
        best_possible = None
    else:
        samples, held_out = data.bars_and_stripes(), None
        what = f"the {len(samples)} 4x4 bars-and-stripes patterns, scored on themselves"
        best_possible = data.best_log_likelihood(samples)
    n_visible = samples.shape[1]

    def say(text: str) -> None:
        console.print(text, markup=False, soft_wrap=True)

    epochs, k = settings["epochs"], settings["k"]
    say(
        f"RBM with {n_visible} visible and {settings['hidden']} hidden units on {what}: "
        f"jaxgrad (CD-{k}, ADAM) against scikit-learn's BernoulliRBM (PCD-1, SGD), "
        f"both with learning rate {settings['lr']}, batch size {settings['batch_size']}, "
        f"{epochs} epochs of {settings['passes']} pass(es)"
    )
    sk_settings = {key: value for key, value in settings.items() if key != "k"}
    steps_per_epoch = settings["passes"] * (n // settings["batch_size"])
    sk_steps_per_epoch = settings["passes"] * math.ceil(n / settings["batch_size"])
    with progress_module.Progress(
        console=console, transient=True, disable=args.no_progress or not console.is_terminal
    ) as progress:
        task = progress.add_task("jaxgrad", total=epochs * steps_per_epoch)
        jax_result = train.train(
            samples,
            held_out=held_out,
            seed=args.seed,
            on_steps=lambda steps: progress.advance(task, steps),
            on_epoch=lambda stats: say(report.format_epoch(stats, epochs)),
            **settings,
        )
        sk_task = progress.add_task("scikit-learn", total=epochs * sk_steps_per_epoch)
        sk_result = sklearn_rbm.fit_sklearn(
            samples,
            held_out=held_out,
            seed=args.seed,
            on_steps=lambda steps: progress.advance(sk_task, steps),
            **sk_settings,
        )
    results = {"jaxgrad": jax_result, "scikit-learn": sk_result}

    scored_on = "held-out" if held_out is not None else "training"
    rows = report.comparison_rows(results, k=k)
    legend = "LL: exact log-likelihood, " if report.has_exact(results) else ""
    table = table_module.Table(
        title=f"After {epochs} epochs, on the {scored_on} data, in nats: "
        f"{legend}PLL: pseudo-log-likelihood"
    )
    for column in rows[0]:
        table.add_column(column, justify="left" if column in ("model", "training") else "right")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    for line in report.headline(results, scored_on=scored_on, k=k, lr=settings["lr"]):
        say(line)
    figure = report.plot_results(
        results, seed=args.seed, scored_on=scored_on, best_possible=best_possible
    )
    figure.savefig(out, dpi=100)
    say(f"figure: {out.resolve()}")
    return 0
