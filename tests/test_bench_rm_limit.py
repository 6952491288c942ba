"""bench/rm_limit.py: the split never puts a prompt on both sides, the gold relabeling and the half are what they say,
and the ensemble puts its members on one scale before averaging (hand-computed)."""

from __future__ import annotations

import pytest

from bench.rm_limit import (ensemble_mean, gold_ordered, label_agreement, main, mean_and_se, share_of_prompts, split_by_prompt,
                            standardised)


def rows_for(n_prompts: int, per_prompt: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"opening {p}"}],
             "chosen": [{"role": "assistant", "content": f"a{p}-{k}"}],
             "rejected": [{"role": "assistant", "content": f"b{p}-{k}"}]} for p in range(n_prompts) for k in range(per_prompt)]


def prompts_of(rows):
    return {r["prompt"][0]["content"] for r in rows}


def test_split_by_prompt_keeps_each_prompt_on_one_side_and_follows_its_seed():
    rows = rows_for(50, 3)
    train, test = split_by_prompt(rows, 0.2, seed=0)
    assert len(prompts_of(test)) == 10 and len(prompts_of(train)) == 40
    assert not prompts_of(train) & prompts_of(test) and len(train) + len(test) == len(rows)
    assert len(test) == 30  # every pair of a test prompt goes with it
    assert split_by_prompt(rows, 0.2, seed=0) == (train, test)
    assert prompts_of(split_by_prompt(rows, 0.2, seed=1)[1]) != prompts_of(test)


def test_gold_ordered_puts_the_gold_winner_first_and_keeps_gold_ties():
    rows = rows_for(3, 1)
    out = gold_ordered(rows, [0.5, -0.2, 0.1], [0.1, 0.3, 0.1])
    assert out[0] == rows[0]  # gold agrees with the label: unchanged
    assert out[1]["chosen"] == rows[1]["rejected"] and out[1]["rejected"] == rows[1]["chosen"]  # flipped
    assert out[2] == rows[2]  # equal gold: as labeled
    assert rows[1]["chosen"][0]["content"] == "a1-0"  # the input is not changed in place


def test_a_share_of_prompts_keeps_whole_prompts_and_the_quarter_lies_in_the_half():
    rows = rows_for(21, 2)
    half, quarter = share_of_prompts(rows, 0.5, seed=3), share_of_prompts(rows, 0.25, seed=3)
    assert len(prompts_of(half)) == 10 and len(half) == 20  # 21 prompts: 10.5 rounded down, both pairs of each
    assert len(prompts_of(quarter)) == 5 and len(quarter) == 10
    assert prompts_of(quarter) < prompts_of(half)  # one seeded order of prompts: the curve's points are nested
    assert half == share_of_prompts(rows, 0.5, seed=3) and prompts_of(half) != prompts_of(share_of_prompts(rows, 0.5, seed=4))


def test_standardised_and_ensemble_mean_by_hand():
    assert standardised([1.0, 2.0, 3.0]) == pytest.approx([-1.224744871, 0.0, 1.224744871])
    assert standardised([4.0, 4.0]) == [0.0, 0.0]
    # Members on different scales count alike: [0, 2] and [10, 30] both standardise to [-1, 1]
    assert ensemble_mean([[0.0, 2.0], [10.0, 30.0]]) == pytest.approx([-1.0, 1.0])
    # ... and they are averaged, not summed: [-1, 1] with [1, -1] cancels
    assert ensemble_mean([[0.0, 2.0], [30.0, 10.0]]) == pytest.approx([0.0, 0.0])
    # [0, 2, 4]: mean 2, std sqrt(8/3) -> [-1.2247, 0, 1.2247]; [0, 2, 1]: mean 1, std sqrt(2/3) -> [-1.2247, 1.2247, 0]
    assert ensemble_mean([[0.0, 2.0, 4.0], [0.0, 2.0, 1.0]]) == pytest.approx([-1.224744871, 0.612372436, 0.612372436])


def test_label_agreement_counts_only_pairs_the_gold_orders():
    assert label_agreement(rows_for(4, 1), [0.5, 0.1, 0.2, 0.0], [0.1, 0.4, 0.2, -0.3]) == {"agreement": 0.6667, "pairs": 3}


def test_a_run_without_labels_is_one_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "limit.json"
    assert main(["--from_run", str(tmp_path / "nowhere"), "--output", str(out), "--work_dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "make sft rm" in err[0]
    assert not out.exists() and not (tmp_path / "w").exists()


def test_mean_and_se_by_hand():
    # 0.6, 0.7, 0.8: mean 0.7, sample std 0.1, SE 0.1 / sqrt(3)
    assert mean_and_se([0.6, 0.7, 0.8]) == {"mean": 0.7, "se": 0.0577}
    assert mean_and_se([0.65]) == {"mean": 0.65, "se": None}  # one seed: no standard error, not an exact 0


def test_main_trains_each_condition_per_seed_and_scores_the_test_pairs_by_hand(tmp_path, monkeypatch):
    """The whole bench with the stage and the scoring faked: the run's ties are left out, the judge is the one its
    annotators used, every seed reaches the stage, the shares come from the training prompts only, the test pairs'
    scores are read chosen first, and an ensemble needs at least two members."""
    import json

    from datasets import Dataset

    from bench import rm_limit
    from pipeline import judges

    run = tmp_path / "run"
    n = 10
    rows = [{"prompt": [{"role": "user", "content": f"opening {p}"}],
             "chosen": [{"role": "assistant", "content": ("good " if p % 3 else "bad ") + str(p)}],
             "rejected": [{"role": "assistant", "content": ("bad " if p % 3 else "good ") + str(p)}], "is_tie": False}
            for p in range(n)]
    rows.append({**rows[1], "prompt": [{"role": "user", "content": "a tie"}], "is_tie": True})
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "export"))
    (run / "label-export").mkdir(parents=True)
    (run / "label-export" / "manifest.json").write_text(json.dumps({"outputs": {"dataset": str(tmp_path / "export")}}))
    (run / "simulate").mkdir()
    (run / "simulate" / "manifest.json").write_text(json.dumps({"config": {"simulate": {"judge": "my-judge"}}}))
    judged = []
    monkeypatch.setattr(judges, "load_judge", lambda spec: judged.append(spec) or spec)
    good = lambda texts: [1.0 if t.startswith("good") else 0.0 for t in texts]  # noqa: E731
    monkeypatch.setattr(judges, "judge_scores", lambda judge, prompts, texts: good(texts))
    stage = []

    def fake_run_stage(data_file, runs_dir, run_name, model_config, overrides):
        stage.append((run_name, [json.loads(line) for line in data_file.read_text().splitlines()], overrides))
        return 0, 1.0, ""

    monkeypatch.setattr(rm_limit, "no_op_sft", lambda runs_dir, run_name, model_config: None)
    monkeypatch.setattr(rm_limit, "run_stage", fake_run_stage)
    monkeypatch.setattr(rm_limit, "saved_adapter_scores",  # a reward model that agrees with the gold on every pair
                        lambda adapter, test: good([r["chosen"][-1]["content"] for r in test]
                                                   + [r["rejected"][-1]["content"] for r in test]))
    argv = ["--from_run", str(run), "--output", str(tmp_path / "out.json"), "--work_dir", str(tmp_path / "w"),
            "--seeds", "1", "2", "--conditions", "labels", "half", "--lr", "1e-4"]
    assert rm_limit.main(argv) == 0
    res = json.loads((tmp_path / "out.json").read_text())
    assert judged == ["my-judge"] and res["settings"]["judge"] == "my-judge"
    assert (res["data"]["pairs"], res["data"]["train_pairs"], res["data"]["test_pairs"]) == (10, 8, 2)
    assert [(name, o) for name, _, o in stage] == [
        ("limit-labels-seed1", ["--seed", "1", "--lr", "1e-4"]), ("limit-labels-seed2", ["--seed", "2", "--lr", "1e-4"]),
        ("limit-half-seed1", ["--seed", "1", "--lr", "1e-4"]), ("limit-half-seed2", ["--seed", "2", "--lr", "1e-4"])]
    train_prompts = prompts_of(stage[0][1])
    assert len(train_prompts) == 8 and len(prompts_of(stage[2][1])) == 4 and prompts_of(stage[2][1]) < train_prompts
    for name in ("labels", "half"):
        assert res["conditions"][name]["mean"] == 1.0 and res["conditions"][name]["seeds"]["1"]["agreement"] == 1.0
    assert res["conditions"]["ensemble"]["members"] == 2 and res["conditions"]["ensemble"]["agreement"] == 1.0
    assert rm_limit.main([*argv[:6], "--seeds", "1", "--conditions", "labels"]) == 0
    assert "ensemble" not in json.loads((tmp_path / "out.json").read_text())["conditions"]  # one member is no ensemble
