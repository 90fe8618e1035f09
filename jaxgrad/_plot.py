"""A run at a glance: one per-layer statistic over steps as a heatmap (needs matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def plot_layers(
    history: Sequence[tuple[int, dict[str, Any]]],
    key: str,
    *,
    events: str | None = None,
    log: bool = True,
    ax: Any = None,
) -> Any:
    """A heatmap of one statistic, groups (layers) by steps, with events marked.

    `history` is what a `MetricsLog` callback that keeps `(step, logs)` pairs collects.
    The rows are the groups found under `key` (the keys `<key>/<group>`, e.g.
    `update/update_ratio/layers/0` for `key="update/update_ratio"`), in order of first
    appearance; the colour is the value (its log10 with `log=True`, where zeros, infs and
    NaNs are left blank). With `events`, the steps whose `logs[events]` is true (e.g.
    `"grad/clipped"`) are marked by ticks above the map. Needs matplotlib
    (`pip install matplotlib`), which is imported only when this is called.

    Args:
        history: `(step, logs)` pairs, logs being flat dicts of numbers.
        key: the statistic, without the group suffix.
        events: the key of a boolean log to mark, or `None`.
        log: colour by log10 of the value.
        ax: a matplotlib `Axes` to draw on; a new figure when `None`.

    Returns:
        The matplotlib `Axes`.

    Raises:
        ImportError: if matplotlib is not installed.
        ValueError: if no log holds a key `<key>/<group>`.

    Example:
        >>> history = [(s, {"ratio/a": 1e-3 * (s + 1), "ratio/b": 1e-2, "clipped": s == 1}) for s in range(3)]
        >>> ax = jaxgrad.plot_layers(history, "ratio", events="clipped")
        >>> [label.get_text() for label in ax.get_yticklabels()]
        ['a', 'b']
    """  # noqa: E501
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - exercised with matplotlib hidden
        raise ImportError(
            "`jaxgrad.plot_layers` needs matplotlib, which is not installed; install it with "
            '`pip install matplotlib` (or, from a jaxgrad checkout, `pip install ".[notebooks]"`).'
        ) from error
    prefix = f"{key}/"
    groups: dict[str, None] = {}
    for _, logs in history:
        groups.update((name[len(prefix) :], None) for name in logs if name.startswith(prefix))
    if not groups:
        found = sorted({name.rsplit("/", 1)[0] for _, logs in history for name in logs})
        raise ValueError(
            f"`key` must name a per-group statistic of the logs (keys `{key}/<group>`); "
            f"got {key!r}, and the logs have the prefixes {found[:8]}."
        )
    names = list(groups)
    steps = np.array([step for step, _ in history])
    values = np.array(
        [[float(logs.get(prefix + name, np.nan)) for _, logs in history] for name in names]
    )
    label = key
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(np.isfinite(values) & (values > 0), np.log10(values), np.nan)
        label = f"log10 {key}"
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    edges = np.concatenate([steps, [steps[-1] + 1]]) - 0.5 if steps.size else np.zeros(1)
    mesh = ax.pcolormesh(edges, np.arange(len(names) + 1) - 0.5, values, shading="flat")
    ax.figure.colorbar(mesh, ax=ax, label=label)
    ax.set_yticks(np.arange(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("step")
    if events is not None:
        marked = steps[[bool(logs.get(events, False)) for _, logs in history]]
        ax.plot(marked, np.full(marked.shape, -0.5), "v", color="red", clip_on=False, label=events)
        if marked.size:
            ax.legend(loc="upper right", bbox_to_anchor=(1.0, 1.12), frameon=False)
    return ax
