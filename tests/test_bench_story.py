"""bench/story_seeds.py: the seed summary (hand-computed) and the make call it builds for a seed."""
import subprocess

import pytest

from bench import story_seeds


def test_gain_summary_mean_and_standard_error_by_hand():
    s = story_seeds.gain_summary([0.1, 0.3, 0.2])
    assert s["gold_gain_mean"] == pytest.approx(0.2)
    assert s["gold_gain_se"] == pytest.approx(0.1 / 3 ** 0.5)  # sample std 0.1
    assert s["every_seed_positive"] is True
    assert story_seeds.gain_summary([0.1, -0.01, 0.2])["every_seed_positive"] is False
    assert story_seeds.gain_summary([0.0, 0.1])["every_seed_positive"] is False  # no gain is not a gain


def test_a_seed_without_a_figure_leaves_it_out_of_the_median():
    assert story_seeds.median_given([0.7, None, 0.8, 0.75]) == 0.75
    assert story_seeds.median_given([None, None]) is None


def test_every_training_stage_gets_the_seed(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(story_seeds.subprocess, "run", fake_run)
    story_seeds.make(["sft", "rm", "ppo"], "seed-7", tmp_path, 7)
    cmd = seen["cmd"]
    assert cmd[:4] == ["make", "sft", "rm", "ppo"]
    for var in ("SFT_ARGS", "PAIRS_ARGS", "SIMULATE_ARGS", "RM_ARGS", "PPO_ARGS"):
        assert f"{var}=--seed 7" in cmd
    assert "RUN=seed-7" in cmd and f"RUNS_DIR={tmp_path}" in cmd
    story_seeds.make(["sft", "rm", "ppo"], "seed-7", tmp_path, 7, rm_args="--ensemble 1", ppo_args="--kl_coef 0.15")
    assert "RM_ARGS=--seed 7 --ensemble 1" in seen["cmd"] and "PPO_ARGS=--seed 7 --kl_coef 0.15" in seen["cmd"]


def test_a_seed_starts_from_an_empty_run_folder(monkeypatch, tmp_path):
    """A seed's folder left by an earlier bench would make `make sft rm ppo` skip its stages as up to date, and the
    recorded wall time would leave them out: the bench deletes it before the first make call."""
    stale = tmp_path / "seed-5" / "sft" / "manifest.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    seen = []

    def fake_make(targets, run, runs_dir, seed, rm_args="", ppo_args=""):
        seen.append(((runs_dir / run).exists(), targets))
        raise SystemExit("stop after the first call")

    monkeypatch.setattr(story_seeds, "make", fake_make)
    with pytest.raises(SystemExit):
        story_seeds.one_seed(5, tmp_path, samples=1)
    assert seen == [(False, ["sft", "rm", "ppo"])]


def test_a_variants_stage_flags_go_to_every_make_call(monkeypatch, tmp_path):
    """`make eval` would retrain a stage whose flags differ from its manifest's: the variant's flags go to both calls."""
    calls = []

    def fake_make(targets, run, runs_dir, seed, rm_args="", ppo_args=""):
        calls.append((targets, rm_args, ppo_args))
        if targets == ["eval"]:
            raise SystemExit("stop after the eval call")
        return 1.0

    monkeypatch.setattr(story_seeds, "make", fake_make)
    with pytest.raises(SystemExit):
        story_seeds.one_seed(5, tmp_path, samples=1, rm_args="--ensemble 1", ppo_args="--kl_coef 0.15")
    assert calls == [(["sft", "rm", "ppo"], "--ensemble 1", "--kl_coef 0.15"), (["eval"], "--ensemble 1", "--kl_coef 0.15")]


def test_one_seeds_gold_gain_is_ppo_minus_sft(monkeypatch, tmp_path):
    """A seed's gold gain is eval's PPO gold mean minus its SFT one; its samples are the first n of the report's."""
    import json

    ev = {"gold_sft_mean": 0.25, "gold_ppo_mean": 0.75, "gold_win_rate": 0.6}

    def fake_make(targets, run, runs_dir, seed, rm_args="", ppo_args=""):
        if targets == ["eval"]:
            for stage, metrics in (("eval", ev), ("rm", {"eval_accuracy": 0.7}), ("simulate", {"agreement_with_gold": 0.8})):
                (runs_dir / run / stage).mkdir(parents=True, exist_ok=True)
                (runs_dir / run / stage / "manifest.json").write_text(json.dumps({"metrics": metrics}))
            rows = [{"prompt_text": f"p{i}", "gold_ppo": i} for i in range(3)]
            (runs_dir / run / "eval" / "report.json").write_text(json.dumps({"samples": rows}))
        return 1.0

    monkeypatch.setattr(story_seeds, "make", fake_make)
    got = story_seeds.one_seed(5, tmp_path, samples=2)
    assert got["gold_gain"] == 0.5 and got["rm_heldout_accuracy"] == 0.7 and got["gold_win_rate"] == 0.6
    assert [s["prompt_text"] for s in got["samples"]] == ["p0", "p1"]


def test_split_prompts_holds_out_a_seeded_fifth_nothing_trains_on(tmp_path):
    """bench/story.py: one seeded split (the same every build), a fifth held out, disjoint from the training prompts
    and together all of them; --limit shortens the held-out file only."""
    from bench.story import split_prompts

    source = tmp_path / "prompts.jsonl"
    rows = [f'{{"prompt": "p{i}"}}' for i in range(50)]
    source.write_text("\n".join(rows) + "\n")
    splits = []
    for name, limit in (("a", None), ("b", None), ("c", 3)):
        (tmp_path / name).mkdir()
        split_prompts(tmp_path / name, source, limit)
        splits.append([(tmp_path / name / f).read_text().splitlines() for f in ("heldout.jsonl", "prompts.jsonl")])
    (held, train), again, (short, train_c) = splits
    assert len(held) == 10 and len(train) == 40 and not set(held) & set(train) and sorted(held + train) == sorted(rows)
    assert again == [held, train] and held != rows[:10] and held != rows[-10:]
    assert short == held[:3] and train_c == train
