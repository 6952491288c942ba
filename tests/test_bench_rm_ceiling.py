"""bench/rm_ceiling.py: the bag-of-words learners learn a known valence rule from labels (and not its mirror image),
the noise-free condition really orders pairs by the gold, the penalty follows the noise, and the run's split is the
reward model's own (hand-made cases)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.rm_ceiling import choose_penalty, counts, learner, lexicon_sum, main, words

VALENCE = {"joy": 2.0, "sun": 1.0, "the": 0.0, "cat": 0.0, "rain": -1.0, "grief": -2.0}


def test_words_are_lower_case_with_inner_apostrophes():
    assert words("Happy\u2019s day, SAD! don't 'quoted' x2") == ["happy's", "day", "sad", "don't", "quoted", "x"]


def test_counts_by_hand():
    np.testing.assert_array_equal(counts(["joy joy rain", "The cat, the sun."], ["joy", "sun", "the", "rain"]),
                                  [[2, 0, 0, 1], [0, 1, 2, 0]])


def pairs(n: int, seed: int) -> dict:
    """Random 4-word replies; `chosen` is the one whose valences sum higher (the gold's winner), ties left out."""
    rng = np.random.RandomState(seed)
    vocab = list(VALENCE)
    out = {"chosen": [], "rejected": [], "gold_chosen": [], "gold_rejected": [], "groups": []}
    while len(out["chosen"]) < n:
        a, b = (" ".join(rng.choice(vocab, 4)) for _ in range(2))
        ga, gb = (sum(VALENCE[w] for w in t.split()) for t in (a, b))
        if ga == gb:
            continue
        (c, gc), (r, gr) = sorted([(a, ga), (b, gb)], key=lambda x: -x[1])
        for key, value in (("chosen", c), ("rejected", r), ("gold_chosen", gc), ("gold_rejected", gr)):
            out[key].append(value)
        out["groups"].append(f"prompt {len(out['chosen']) % 40}")
    return out


def swapped(p: dict) -> dict:
    """Every label reversed (the gold's loser as `chosen`); the gold scores stay with their replies."""
    return {**p, "chosen": p["rejected"], "rejected": p["chosen"],
            "gold_chosen": p["gold_rejected"], "gold_rejected": p["gold_chosen"]}


def test_a_learner_learns_a_valence_rule_from_labels_and_the_gold_order_undoes_wrong_labels():
    train, test = pairs(400, seed=0), pairs(300, seed=1)
    vocab = list(VALENCE)
    assert learner(vocab, train, test, gold_order=False)["agreement"] > 0.95
    assert learner(vocab, swapped(train), test, gold_order=False)["agreement"] < 0.05  # it learns what it is told
    assert learner(vocab, swapped(train), test, gold_order=True)["agreement"] > 0.95   # noise-free: the gold's order
    # a learner that may not see the words that matter knows nothing: every test pair is a tie, half a point
    assert learner(["the", "cat"], train, test, gold_order=False)["agreement"] == pytest.approx(0.5, abs=0.05)


def test_the_penalty_follows_the_noise():
    rng = np.random.RandomState(0)
    groups = [f"g{i % 30}" for i in range(300)]
    clean = rng.standard_normal((300, 5)) * np.sign(rng.standard_normal((300, 1)))
    clean = clean * np.sign(clean @ np.array([1.0, -1.0, 0.5, 0.0, 2.0]))[:, None]  # labels a clean linear rule gives
    assert choose_penalty(clean, groups) == 0.1
    noise = rng.standard_normal((300, 40))  # labels unrelated to the features: shrink everything
    assert choose_penalty(noise, groups) == 100.0


def test_lexicon_sum_by_hand():
    assert lexicon_sum(["Joy, joy and grief.", "nothing"], VALENCE) == [2.0, 0.0]


def write_run(root, judge: str | None = "sentiment"):
    """A run as `make sft rm` leaves it, as far as the bench reads it: 3 prompts of labels, one held out by the rm."""
    import datasets

    rows = []
    for p, (good, bad) in enumerate([("happy love", "sad ugly"), ("a good day", "a bad day"), ("fun joy", "grim")]):
        prompt = [{"role": "user", "content": f"opening {p}"}]
        for k in range(4):
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"{good} {k}"}],
                         "rejected": [{"role": "assistant", "content": f"{bad} {k}"}], "is_tie": False})
    rows.append({**rows[0], "is_tie": True})  # ties stay out, as the reward model's held-out pairs leave them out
    (root / "label-export").mkdir(parents=True)
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "label-export" / "dataset"))
    (root / "label-export" / "manifest.json").write_text(json.dumps({"outputs": {"dataset": str(root / "label-export" / "dataset")}}))
    (root / "rm").mkdir()
    (root / "rm" / "eval_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:12]))
    if judge is not None:
        (root / "simulate").mkdir()
        (root / "simulate" / "manifest.json").write_text(json.dumps({"config": {"simulate": {"judge": judge}}}))


def test_a_run_gives_the_figures_on_the_reward_models_split(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    out = tmp_path / "ceiling.json"
    assert main(["--from_run", str(run), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["train_pairs"], result["test_pairs"], result["test_pairs_gold_differs"]) == (8, 4, 4)
    assert result["train_labels_agree_with_gold"] == 1.0
    assert result["lexicon_oracle"] == 1.0  # fun/joy against grim: VADER's own lexicon orders every held-out pair
    assert result["learners"]["lexicon_words"]["labels"]["words"] == 6  # happy love sad ugly good bad
    # the held-out words (fun, joy, grim) were never in a training reply: the learners can only tie, half a point
    assert result["learners"]["all_words"]["labels"]["agreement"] == 0.5


def test_bad_runs_are_one_error_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "ceiling.json"
    assert main(["--from_run", str(tmp_path / "none"), "--output", str(out)]) == 2
    assert "has no label-export/manifest.json: run `make sft rm` first" in capsys.readouterr().err
    run = tmp_path / "other"
    write_run(run, judge="module:my_judge")
    assert main(["--from_run", str(run), "--output", str(out)]) == 2
    assert "needs the sentiment judge" in capsys.readouterr().err
    assert not out.exists()
