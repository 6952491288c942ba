"""bench/bench_shard.py: the check that sharding changed no logged figure."""

from __future__ import annotations

from bench.bench_shard import same_figures


def test_same_figures_is_equal_to_rel_1e5_key_by_key_and_row_by_row():
    rows = [{"update": 1, "reward": 0.5, "kl": 1e-3}, {"update": 2, "reward": -0.25, "kl": 2e-3}]
    assert same_figures(rows, [dict(r) for r in rows])
    assert same_figures(rows, [rows[0], {**rows[1], "reward": -0.25 * (1 + 5e-6)}])  # within rel 1e-5
    assert not same_figures(rows, [rows[0], {**rows[1], "reward": -0.25 * (1 + 3e-5)}])  # past it
    assert not same_figures(rows, [rows[0], {**rows[1], "update": 3}])  # a count differs
    assert not same_figures(rows, [rows[0], {"update": 2, "reward": -0.25}])  # a figure missing
    assert not same_figures(rows, rows[:1])  # a row missing
    # A figure near 0 is compared on the scale 1e-2: 1e-9 against 0 is equal, 1e-6 is not.
    assert same_figures([{"x": 0.0}], [{"x": 1e-9}]) and not same_figures([{"x": 0.0}], [{"x": 1e-6}])
