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


def test_the_penalty_is_chosen_on_folds_of_whole_prompts(monkeypatch):
    """Cross-validation holds out whole prompts: a prompt's pairs never sit on both sides of a fold (they share the
    prompt's replies' words, and the held-out loss would flatter the lightest penalty)."""
    from bench import rm_ceiling

    groups = [f"prompt {i // 3}" for i in range(30)]  # 10 prompts of 3 pairs each
    diff = np.arange(30, dtype=float)[:, None]  # row i is recognisable by its one feature
    trained_on = []
    monkeypatch.setattr(rm_ceiling, "fit", lambda d, penalty: trained_on.append(set(d[:, 0].astype(int))) or np.zeros(1))
    rm_ceiling.choose_penalty(diff, groups)
    assert len(trained_on) == 5 * len(rm_ceiling.PENALTIES)
    for train in trained_on[:5]:
        held = set(range(30)) - train
        assert len(held) == 6 and {groups[i] for i in held}.isdisjoint({groups[i] for i in train})
    assert set.union(*(set(range(30)) - t for t in trained_on[:5])) == set(range(30))


def test_the_gold_order_flips_only_the_pairs_the_gold_reverses(monkeypatch):
    """gold_order: a pair whose gold prefers the rejected reply is flipped; one the gold scores equal keeps its label."""
    from bench import rm_ceiling

    seen = []
    monkeypatch.setattr(rm_ceiling, "choose_penalty", lambda diff, groups: 1.0)
    monkeypatch.setattr(rm_ceiling, "fit", lambda diff, penalty: seen.append(diff.copy()) or np.zeros(diff.shape[1]))
    train = {"chosen": ["joy", "joy", "joy"], "rejected": ["rain", "rain", "rain"], "groups": ["a", "b", "c"],
             "gold_chosen": [1.0, 0.0, 0.5], "gold_rejected": [0.0, 1.0, 0.5]}
    test = {"chosen": ["joy"], "rejected": ["rain"], "gold_chosen": [1.0], "gold_rejected": [0.0]}
    learner(["joy", "rain"], train, test, gold_order=True)
    assert seen[0].tolist() == [[1.0, -1.0], [-1.0, 1.0], [1.0, -1.0]]


def test_the_labels_agreement_with_the_gold_leaves_out_the_pairs_it_ties(tmp_path, monkeypatch):
    from pipeline import judges

    def gold(judge, prompts, texts):  # prompt 0: even k gold ties, odd k agrees; prompt 1: the gold reverses every label
        table = {"happy": (0.5, 1.0), "sad": (0.5, 0.0), "a good": (0.0, 0.0), "a bad": (1.0, 1.0), "fun": (1.0, 1.0)}
        return [next((v[int(t.split()[-1]) % 2] for k, v in table.items() if t.startswith(k)), 0.0) for t in texts]

    monkeypatch.setattr(judges, "judge_scores", gold)
    run = tmp_path / "run"
    write_run(run)
    assert main(["--from_run", str(run), "--output", str(tmp_path / "ceiling.json")]) == 0
    result = json.loads((tmp_path / "ceiling.json").read_text())
    assert result["train_labels_agree_with_gold"] == 0.3333  # 2 of the 6 pairs the gold orders; 2 ties left out


def test_fit_minimises_the_documented_objective():
    """fit: w minimises sum_i softplus(-diff_i . w) + penalty * |w|^2 (a sum over words, not a mean: the penalties
    chosen and reported are on that scale), so its gradient -sum_i diff_i sigmoid(-diff_i . w) + 2 penalty w is 0."""
    from bench.rm_ceiling import fit

    rng = np.random.RandomState(0)
    diff = rng.randint(-2, 3, size=(60, 4)).astype(float)
    diff[:, 0] = np.abs(diff[:, 0])  # a word the chosen replies carry more: its valence comes out positive
    for penalty in (0.3, 10.0):
        w = fit(diff, penalty)
        grad = -(diff * (1.0 / (1.0 + np.exp(diff @ w)))[:, None]).sum(0) + 2 * penalty * w
        np.testing.assert_allclose(grad, 0.0, atol=1e-4)
        assert w[0] > 0


def test_the_reward_models_figure_is_evals_agreement_on_the_held_out_pairs(tmp_path):
    """Beside the learners: the reward model's agreement with the gold on its own held-out pairs (eval's
    rm_agreement_heldout_pairs), the figure the learners are scored alike on, not its agreement on policy samples."""
    run = tmp_path / "run"
    write_run(run)
    (run / "eval").mkdir()
    gold = {"rm_agreement_heldout_pairs": {"agreement": 0.712345, "pairs": 40},
            "rm_agreement_policy_samples": {"agreement": 0.9, "pairs": 82}}
    (run / "eval" / "report.json").write_text(json.dumps({"gold": gold}))
    out = tmp_path / "ceiling.json"
    assert main(["--from_run", str(run), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["reward_models"] == {"agreement": 0.7123, "pairs": 40}
