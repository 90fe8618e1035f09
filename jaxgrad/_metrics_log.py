"""Logging that never stalls the step: the previous step's values, read while this one runs."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.core import Tracer

from ._checks import where
from ._naming import host_read, path_name
from ._typing import PyTree


class LogFailure(NamedTuple):
    """A step whose logs the callback raised on: kept, so that nothing is lost."""

    step: int
    logs: dict[str, Any]
    error: Exception


def _has_as_dict(x: Any) -> bool:
    return not isinstance(x, type) and callable(getattr(x, "as_dict", None))


def flat_logs(tree: PyTree) -> dict[str, Any]:
    """The flat `{key: value}` dict of host values (numbers, numpy arrays, stats objects).

    An object with `as_dict` (`ClipStats`, `GroupStats`, `UpdateStats`, ...) gives its
    own keys under its path (`grad/norm/layers/0`); any other leaf is one key, its path
    name (`loss`, `metrics/accuracy`), or `value` for a bare array.
    """
    out: dict[str, Any] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_has_as_dict)[0]:
        name = path_name(path) if path else ""
        if _has_as_dict(value):
            items = [(f"{name}/{key}" if name else key, v) for key, v in value.as_dict().items()]
        else:
            array = np.asarray(value)
            items = [(name or "value", array.item() if array.ndim == 0 else array)]
        for key, v in items:
            if key in out:
                raise ValueError(
                    f"`metrics` gives two values the same log key {key!r} (the second at "
                    f"{where(path)}); rename one of them."
                )
            out[key] = v
    return out


class MetricsLog:
    """Hands each step's statistics to a logger one step late, so the host never waits.

    Reading a value computed on the device (`float(loss)`, `stats.as_dict()`) blocks the
    host until the step that computes it has finished, and the next step is not queued
    meanwhile: JAX's asynchronous dispatch no longer overlaps the host's work (data
    loading, dispatch, logging) with the device's. `add(step, metrics)` instead keeps
    this step's arrays on the device and reads the *previous* kept step's, which has
    finished (or is about to) while this one is already queued, then calls
    `callback(step, logs)` with its flat dict: keys from `as_dict` for `ClipStats`,
    `GroupStats`, `UpdateStats`, `NoiseScaleState` and the like (under their path:
    `grad/norm/layers/0`), and the path name of any other array (`loss`), with Python
    numbers (numpy arrays for non-scalars). One transfer per logged step. Call `flush()`
    after the loop (or use the log as a context manager) to deliver the last step.

    With `every=k` only the steps whose number is a multiple of `k` are kept; the others
    are dropped without a read. A callback that raises does not stop training or lose
    anything: a `RuntimeWarning` is issued and the step, its logs and the exception are
    kept in `failures`. Calls may come from several threads: deliveries happen one at a
    time, in the order of the calls. In a multi-process run, statistics replicated across
    processes are read from the local copy and sharded ones are gathered (a collective),
    so every process calls `add`, as the training loop does; the callback can check
    `jax.process_index()`.

    Args:
        callback: `callback(step, logs)`, e.g. clu's `writer.write_scalars`,
            `lambda step, logs: wandb.log(logs, step=step)`, or `print`.
        every: keep every `every`-th step (a positive int).

    Raises:
        TypeError: if `callback` is not callable or `every` is not an int.
        ValueError: if `every` is less than 1.

    Example:
        >>> seen = []
        >>> log = jaxgrad.MetricsLog(lambda step, logs: seen.append((step, logs)))
        >>> step = jax.jit(lambda w: (w * 0.5, {"loss": jnp.sum(w**2), "grad": jaxgrad.grad_stats({"w": w}, by=None)}))
        >>> w = jnp.array([3.0, 4.0])
        >>> for i in range(3):
        ...     w, metrics = step(w)
        ...     log.add(i, metrics)  # reads step i - 1, while step i runs
        >>> [s for s, _ in seen]
        [0, 1]
        >>> log.flush()
        >>> seen[-1]
        (2, {'grad/norm': 1.25, 'grad/rms': 0.8838834762573242, 'grad/max_abs': 1.0, 'grad/nonfinite': 0, 'loss': 1.5625})
    """  # noqa: E501

    def __init__(self, callback: Callable[[int, dict[str, Any]], Any], *, every: int = 1) -> None:
        """See the class docstring."""
        if not callable(callback):
            raise TypeError(
                f"`callback` must be callable as `callback(step, logs)`; got "
                f"{type(callback).__name__} {callback!r}."
            )
        if isinstance(every, bool) or not isinstance(every, int | np.integer):
            raise TypeError(f"`every` must be an int; got {type(every).__name__} {every!r}.")
        if every < 1:
            raise ValueError(f"`every` must be at least 1; got {every}.")
        self.callback = callback
        self.every = int(every)
        self.failures: list[LogFailure] = []
        self._pending: tuple[int, list[Any], Any] | None = None
        self._lock = threading.RLock()

    def add(self, step: int, metrics: PyTree) -> None:
        """Keep this step's `metrics` (if `step` is kept) and log the previous kept step.

        Args:
            step: the step number, a Python int (a device array would have to be read,
                which waits for the step).
            metrics: a pytree of arrays and statistics objects (a dict such as
                `{"loss": loss, "grad": clip_stats, "update": update_stats}`), as a
                jitted step returned them.

        Raises:
            TypeError: if `step` is not an int, or a leaf of `metrics` is traced (`add`
                was called inside `jax.jit`).
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer):
            raise TypeError(
                f"`step` must be a Python int (the loop counter); got "
                f"{type(step).__name__} {step!r}. Reading a device array would wait for "
                "the step."
            )
        leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(metrics)
        for path, leaf in leaves_with_paths:
            if isinstance(leaf, Tracer):
                raise TypeError(
                    "`MetricsLog.add` reads the values on the host, one step later; call it "
                    f"on what `jax.jit` returned, not inside the traced function (`metrics` "
                    f"is traced at {where(path)})."
                )
        if step % self.every:
            return
        leaves = [leaf for _, leaf in leaves_with_paths]
        with self._lock:
            previous, self._pending = self._pending, (int(step), leaves, treedef)
            if previous is not None:
                self._deliver(previous)

    def flush(self) -> None:
        """Read and log the last kept step now (this waits for it); nothing if none is left.

        Example:
            >>> log = jaxgrad.MetricsLog(print)
            >>> log.add(0, {"loss": jnp.array(0.5)})
            >>> log.flush()
            0 {'loss': 0.5}
        """
        with self._lock:
            previous, self._pending = self._pending, None
            if previous is not None:
                self._deliver(previous)

    def __enter__(self) -> MetricsLog:
        """The log itself; `flush()` on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """`flush()`, also when the loop raised."""
        self.flush()

    def _deliver(self, entry: tuple[int, list[Any], Any]) -> None:
        step, leaves, treedef = entry
        host = host_read("MetricsLog.add", leaves)
        logs = flat_logs(jax.tree.unflatten(treedef, host))
        try:
            self.callback(step, logs)
        except Exception as error:  # noqa: BLE001 - reported and kept, training goes on
            self.failures.append(LogFailure(step, logs, error))
            warnings.warn(
                f"`MetricsLog` callback raised {type(error).__name__}: {error} at step "
                f"{step}; its logs are kept in `.failures`.",
                RuntimeWarning,
                stacklevel=3,
            )
