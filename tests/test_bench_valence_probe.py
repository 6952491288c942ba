"""bench/valence_probe.py: the ridge probe fits what it should, scores only rows it never fitted, and picks its
penalty out of fold (hand-checked cases)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.valence_probe import fold_ids, main, out_of_fold, probe, ridge_fit


def test_ridge_fit_recovers_an_exact_linear_rule_and_its_intercept():
    rng = np.random.RandomState(0)
    x = rng.standard_normal((40, 3))
    y = x @ np.array([0.5, -2.0, 1.0]) + 3.0
    w, b = ridge_fit(x, y, penalty=1e-9)
    np.testing.assert_allclose(w, [0.5, -2.0, 1.0], atol=1e-6)
    assert b == pytest.approx(3.0, abs=1e-6)
    shrunk, _ = ridge_fit(x, y, penalty=1e4)  # the penalty shrinks the weights, never the intercept's job
    assert np.abs(shrunk).sum() < 0.1 * np.abs(w).sum()


def test_out_of_fold_predicts_each_row_without_it():
    """One-hot features: a fitted row is predicted exactly, an unseen one gets only the other folds' mean."""
    y = np.arange(10, dtype=float)
    folds = fold_ids(10, 5, seed=0)
    assert sorted(np.bincount(folds)) == [2] * 5
    pred = out_of_fold(np.eye(10), y, folds, penalty=1e-9)
    expected = [y[folds != folds[i]].mean() for i in range(10)]
    np.testing.assert_allclose(pred, expected, atol=1e-6)


def test_probe_tells_a_known_rule_from_noise():
    rng = np.random.RandomState(1)
    x = rng.standard_normal((200, 8))
    y = x[:, 0] - 0.5 * x[:, 3] + 0.1 * rng.standard_normal(200)
    folds = fold_ids(200, 10, seed=0)
    known = probe(x, y, folds)
    assert known["correlation"] > 0.95 and known["sign_accuracy"] > 0.9
    noise = probe(rng.standard_normal((200, 8)), y, folds)
    assert noise["correlation"] < 0.3


def test_runs_on_a_tiny_model(tiny_models, tmp_path):
    import json

    from pipeline.models import profile_from

    out = tmp_path / "probe.json"
    assert main(["--model", profile_from(str(tiny_models["llama"])).name_or_path, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["words"] > 0 and set(result["layers"]) == {str(i) for i in range(len(result["layers"]))}
    assert all(-1 <= row["correlation"] <= 1 for row in result["layers"].values())
