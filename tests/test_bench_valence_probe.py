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


def test_the_folds_follow_the_seed():
    """--seed draws the folds: each seed's permutation of the rows, taken modulo the folds."""
    for seed in (0, 1):
        np.testing.assert_array_equal(fold_ids(12, 4, seed), np.random.RandomState(seed).permutation(12) % 4)
    assert not np.array_equal(fold_ids(12, 4, 0), fold_ids(12, 4, 1))


def test_the_probe_keeps_the_penalty_of_the_least_out_of_fold_error():
    """A near-exact linear rule: the smallest penalty predicts best out of fold (the largest would shrink the
    predictions towards the mean), and the probe reports that penalty and its predictions' figures."""
    from bench.valence_probe import PENALTIES

    rng = np.random.RandomState(2)
    x = rng.standard_normal((30, 2))
    y = 3.0 * x[:, 0] + 0.01 * rng.standard_normal(30)
    folds = fold_ids(30, 5, seed=0)
    errors = {p: float(np.mean((out_of_fold(x, y, folds, p) - y) ** 2)) for p in PENALTIES}
    assert min(errors, key=errors.get) == PENALTIES[0] and errors[PENALTIES[0]] < errors[PENALTIES[-1]]
    result = probe(x, y, folds)
    pred = out_of_fold(x, y, folds, PENALTIES[0])
    assert result == {"correlation": round(float(np.corrcoef(pred, y)[0, 1]), 4),
                      "sign_accuracy": round(float(np.mean(np.sign(pred) == np.sign(y))), 4), "penalty": PENALTIES[0]}


def test_the_lexicon_keeps_one_token_words_with_a_valence_in_their_frame():
    """Words are spelled after a space (as inside the frame), kept only as one token and with a non-zero valence; the
    representation of each is the hidden state at its own token, the last of FRAME + word, at every layer."""
    import torch

    from bench.valence_probe import FRAME, layer_states, one_token_lexicon

    vocab = {" good": [7], " bad": [8], " meh": [9], " unhappy": [10, 11], "good": [1, 2], "bad": [3, 4]}

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [100 + len(w) for w in text.split()] if text == FRAME else vocab[text]

    words, ids, valence = one_token_lexicon(Tok(), {"good": 1.9, "bad": -2.5, "meh": 0.0, "unhappy": -1.8})
    assert (words, ids, valence.tolist()) == (["bad", "good"], [8, 7], [-2.5, 1.9])

    class Model:  # two "layers": the token ids themselves and their doubles
        def __call__(self, input_ids, output_hidden_states):
            seen.append(input_ids.tolist())
            h = input_ids.double().unsqueeze(-1)
            return type("Out", (), {"hidden_states": (h, 2 * h)})

    seen = []
    states = layer_states(Model(), Tok(), ids)
    assert seen == [[[103, 104, 102, 103, 104, 8], [103, 104, 102, 103, 104, 7]]]
    assert [s.tolist() for s in states] == [[[8.0], [7.0]], [[16.0], [14.0]]]
