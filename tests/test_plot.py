"""`plot_layers`: the heatmap's rows, values and event marks (matplotlib's Agg backend)."""

import matplotlib
import numpy as np
import pytest

import jaxgrad as jg

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _history():
    return [
        (
            step,
            {
                "update/update_ratio": 0.01,
                "update/update_ratio/layers/0": 10.0 ** -(step + 1),
                "update/update_ratio/layers/1": [0.0, np.inf, 1.0, np.nan][step],
                "grad/clipped": step in (1, 3),
            },
        )
        for step in range(4)
    ]


def test_rows_are_the_groups_and_colours_the_log10_values():
    ax = jg.plot_layers(_history(), "update/update_ratio", events="grad/clipped")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layers/0", "layers/1"]
    values = np.ma.filled(ax.collections[0].get_array(), np.nan).reshape(2, 4)
    np.testing.assert_allclose(values[0], [-1, -2, -3, -4])
    np.testing.assert_array_equal(np.isnan(values[1]), [True, True, False, True])
    (marks,) = ax.lines
    np.testing.assert_array_equal(marks.get_xdata(), [1, 3])
    plt.close("all")


def test_linear_colours_and_a_given_axes():
    _, given = plt.subplots()
    ax = jg.plot_layers(_history(), "update/update_ratio", log=False, ax=given)
    assert ax is given and not ax.lines
    values = np.ma.filled(ax.collections[0].get_array(), np.nan).reshape(2, 4)
    np.testing.assert_allclose(values[0], [0.1, 0.01, 0.001, 0.0001])
    plt.close("all")


def test_an_unknown_key_names_what_the_logs_have():
    with pytest.raises(
        ValueError,
        match=r"`key` must name a per-group statistic of the logs \(keys `grad/norm/<group>`\); "
        r"got 'grad/norm', and the logs have the prefixes \['grad', 'update', ",
    ):
        jg.plot_layers(_history(), "grad/norm")
