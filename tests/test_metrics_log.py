"""`MetricsLog`: one step late, `every`, `flush`, threads, failing callbacks, tracers."""

import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgrad as jg
from jaxgrad._metrics_log import flat_logs


class Recorder:
    """An array-like leaf that records when it is read on the host (`__array__`)."""

    reads: list[int] = []

    def __init__(self, step: int) -> None:
        self.step = step

    def __array__(self, dtype=None, copy=None):
        Recorder.reads.append(self.step)
        return np.asarray(float(self.step), dtype=dtype)


@pytest.fixture(autouse=True)
def _clear_reads():
    Recorder.reads = []


def _collect(**kwargs):
    seen = []
    return seen, jg.MetricsLog(lambda step, logs: seen.append((step, logs)), **kwargs)


def test_each_step_is_read_one_step_late():
    seen, log = _collect()
    log.add(0, {"loss": Recorder(0)})
    assert Recorder.reads == [] and seen == []
    log.add(1, {"loss": Recorder(1)})
    assert Recorder.reads == [0]  # the previous step only: this one is never waited for
    assert seen == [(0, {"loss": 0.0})]
    log.add(2, {"loss": Recorder(2)})
    assert Recorder.reads == [0, 1]
    log.flush()
    assert Recorder.reads == [0, 1, 2]
    assert [step for step, _ in seen] == [0, 1, 2]
    log.flush()  # nothing left: nothing happens
    assert len(seen) == 3


def test_values_of_a_jitted_step():
    seen, log = _collect()

    @jax.jit
    def step(w):
        clipped, stats = jg.grad_clip({"a": w, "b": 2 * w}, 1.0, by="leaf")
        return clipped["a"], {"loss": jnp.sum(w**2), "grad": stats, "w": w}

    w = jnp.array([3.0, 4.0])
    expected = []
    for i in range(4):
        w, metrics = step(w)
        expected.append({"loss": float(metrics["loss"]), **metrics["grad"].as_dict("grad/")})
        expected[-1]["w"] = np.asarray(metrics["w"])
        log.add(i, metrics)
    log.flush()
    assert [step for step, _ in seen] == [0, 1, 2, 3]
    for (_, logs), want in zip(seen, expected, strict=True):
        assert set(logs) == set(want)
        for key, value in want.items():
            np.testing.assert_array_equal(logs[key], value)
        assert isinstance(logs["loss"], float) and isinstance(logs["grad/clipped"], bool)
        assert isinstance(logs["w"], np.ndarray)


def test_every_keeps_only_multiples_and_reads_nothing_else():
    seen, log = _collect(every=3)
    for i in range(10):
        log.add(i, {"x": Recorder(i)})
    assert [step for step, _ in seen] == [0, 3, 6]
    log.flush()
    assert [step for step, _ in seen] == [0, 3, 6, 9]
    assert Recorder.reads == [0, 3, 6, 9]


def test_context_manager_flushes_also_on_error():
    seen, log = _collect()
    with pytest.raises(RuntimeError, match="boom"), log:
        log.add(0, {"x": jnp.array(1.0)})
        raise RuntimeError("boom")
    assert seen == [(0, {"x": 1.0})]


def test_a_failing_callback_is_reported_and_nothing_is_lost():
    delivered = []

    def callback(step, logs):
        if step == 1:
            raise OSError("disk full")
        delivered.append(step)

    log = jg.MetricsLog(callback)
    with pytest.warns(RuntimeWarning, match=r"callback raised OSError: disk full at step 1"):
        for i in range(4):
            log.add(i, {"x": jnp.array(float(i))})
    log.flush()
    assert delivered == [0, 2, 3]
    (failure,) = log.failures
    assert failure.step == 1 and failure.logs == {"x": 1.0}
    assert isinstance(failure.error, OSError)


def test_calls_from_many_threads_deliver_every_step_once_one_at_a_time():
    seen = []
    inside = []
    overlap = []

    def callback(step, logs):
        inside.append(step)
        if len(inside) > 1:
            overlap.append(step)
        assert logs["x"] == float(step)
        seen.append(step)
        inside.remove(step)

    log = jg.MetricsLog(callback)
    values = {i: np.float32(i) for i in range(400)}

    def worker(start):
        for i in range(start, 400, 8):
            log.add(i, {"x": values[i]})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.flush()
    assert sorted(seen) == list(range(400)) and not overlap


def test_refuses_traced_values():
    log = jg.MetricsLog(print)
    with pytest.raises(
        TypeError,
        match=r"`MetricsLog\.add` reads the values on the host, one step later; call it on "
        r"what `jax\.jit` returned, not inside the traced function \(`metrics` is traced at "
        r"\['loss'\]\)",
    ):
        jax.jit(lambda x: log.add(0, {"loss": x}))(jnp.ones(()))


@pytest.mark.parametrize(
    ("kwargs", "step", "error", "match"),
    [
        ({}, jnp.array(1), TypeError, r"`step` must be a Python int \(the loop counter\); got"),
        ({}, True, TypeError, r"`step` must be a Python int"),
        ({"every": 0}, 0, ValueError, r"`every` must be at least 1; got 0\."),
        ({"every": 2.0}, 0, TypeError, r"`every` must be an int; got float 2\.0\."),
    ],
    ids=["array-step", "bool-step", "every-0", "every-float"],
)
def test_argument_errors(kwargs, step, error, match):
    with pytest.raises(error, match=match):
        jg.MetricsLog(print, **kwargs).add(step, {"x": 1.0})


def test_callback_must_be_callable():
    with pytest.raises(TypeError, match=r"`callback` must be callable as `callback\(step, logs\)`"):
        jg.MetricsLog("wandb")  # type: ignore[arg-type]


# -- the flat dict ---------------------------------------------------------------------------


def test_flat_logs_of_every_kind_of_statistics():
    grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([jnp.nan])}
    params = {"w": jnp.ones(2), "b": jnp.ones(1)}
    _, clip = jg.grad_clip(grads, 1.0, by="leaf")
    metrics = {
        "loss": jnp.array(0.5),
        "clip": clip,
        "stats": jg.grad_stats(grads, by=None),
        "update": jg.update_stats(params, params, by="leaf"),
        "report": jg.grad_nonfinite_report(grads),
        "eval": {"accuracy": np.float32(0.25), "per_class": jnp.arange(3)},
    }
    logs = flat_logs(jax.device_get(metrics))
    assert logs["loss"] == 0.5 and logs["eval/accuracy"] == 0.25
    np.testing.assert_array_equal(logs["eval/per_class"], [0, 1, 2])
    assert logs["clip/finite"] is False and logs["clip/nonfinite/b"] == 1
    assert logs["stats/norm"] != logs["stats/norm"]  # NaN
    assert logs["update/update_ratio/w"] == 1.0
    assert logs["report/b"] == 1
    assert flat_logs(np.float32(2.0)) == {"value": 2.0}
    assert flat_logs(jg.grad_stats({"w": jnp.ones(1)}, by=None))["norm"] == 1.0


def test_flat_logs_refuses_two_values_under_one_key():
    stats = jg.grad_stats({"w": jnp.ones(1)}, by=None)
    with pytest.raises(ValueError, match=r"`metrics` gives two values the same log key 'g/norm'"):
        flat_logs({"g": stats, "g/norm": np.float32(1.0)})


def test_stacked_statistics_give_one_value_per_step():
    def body(w, _):
        return w * 0.5, {"loss": jnp.sum(w), "grad": jg.grad_stats({"w": w}, by=None)}

    _, metrics = jax.lax.scan(body, jnp.ones(2), length=3)
    seen, log = _collect()
    log.add(0, metrics)
    log.flush()
    logs = seen[0][1]
    np.testing.assert_allclose(logs["loss"], [2.0, 1.0, 0.5])
    np.testing.assert_allclose(logs["grad/norm"], np.sqrt(2) * np.array([1.0, 0.5, 0.25]))


def test_no_warning_when_all_is_well():
    seen, log = _collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(3):
            log.add(i, {"x": jnp.array(1.0)})
        log.flush()
    assert len(seen) == 3
