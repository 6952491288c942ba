"""bench/estimators.py: each estimator's figures read from eval's comparison, the summary over seeds (hand-computed),
and the make calls it builds for a seed."""
import json
import subprocess

import pytest

from bench import estimators


def comparison(sft_gold: float, policies: dict[str, tuple]) -> dict:
    """An eval comparison (report.json) of SFT and policies: name -> (gold mean, KL, wins, ties, losses)."""
    by_policy = {"sft": {"method": "sft", "gold_mean": sft_gold, "proxy_mean": 0.0, "kl_mean": 0.0,
                         "length_mean": 17.0, "no_eos": 0.1}}
    gold = {"sft": {}}
    for name, (gold_mean, kl, wins, ties, losses) in policies.items():
        by_policy[name] = {"method": name, "gold_mean": gold_mean, "proxy_mean": 1.0, "kl_mean": kl,
                           "length_mean": 20.0, "no_eos": 0.2}
        n = wins + ties + losses
        gold[name] = {"sft": {"rate": (wins + ties / 2) / n, "ci_low": 0.1, "ci_high": 0.9, "wins": wins,
                              "ties": ties, "losses": losses, "n": n}}
        gold["sft"][name] = {"rate": (losses + ties / 2) / n, "ci_low": 0.0, "ci_high": 0.5, "wins": losses,
                             "ties": ties, "losses": wins, "n": n}
    return {"policies": ["sft", *policies], "by_policy": by_policy, "win_rate_gold": gold}


def test_an_estimators_row_is_its_gold_against_sfts_and_its_win_rate_over_sft():
    rows = estimators.estimator_rows(comparison(0.25, {"grpo": (0.75, 3.5, 6, 2, 2), "dpo": (0.125, 8.0, 1, 0, 3)}))
    assert list(rows) == ["grpo", "dpo"]  # SFT is the baseline, not a row
    grpo = rows["grpo"]
    assert grpo["gold_sft_mean"] == 0.25 and grpo["gold_mean"] == 0.75 and grpo["gold_gain"] == 0.5
    assert grpo["gold_win_rate"] == 0.7  # (6 + 2/2) / 10: the estimator over SFT, not SFT over it (0.3)
    assert (grpo["gold_win_rate_ci_low"], grpo["gold_win_rate_ci_high"]) == (0.1, 0.9)
    assert grpo["wins_ties_losses"] == [6, 2, 2] and grpo["kl_mean"] == 3.5 and grpo["method"] == "grpo"
    assert rows["dpo"]["gold_gain"] == -0.125 and rows["dpo"]["gold_win_rate"] == 0.25
    assert grpo["pairs"] == 10  # an eval of one sample a prompt: its n; of several, its pairs
    four = comparison(0.25, {"grpo": (0.75, 3.5, 6, 2, 2)})
    four["win_rate_gold"]["grpo"]["sft"].update(n=5, pairs=10)  # 5 prompts x 2 samples
    assert estimators.estimator_rows(four)["grpo"]["pairs"] == 10


def test_the_summary_over_seeds_by_hand():
    """Per estimator: the mean gain with its SE (sample std / sqrt(n)), medians of win rate, KL and wall time; an
    estimator a seed did not run is summarised over the seeds that did."""
    def seed(rows):
        return {"estimators": {name: {"gold_gain": g, "gold_win_rate": w, "kl_mean": k, "wall_s": t}
                               for name, (g, w, k, t) in rows.items()}}

    per_seed = [seed({"ppo": (0.5, 0.9, 7.0, 150.0), "rloo": (0.2, 0.6, 2.0, 100.0)}),
                seed({"ppo": (0.7, 0.8, 6.0, 160.0)}),
                seed({"ppo": (0.6, 0.95, 9.0, 400.0), "rloo": (-0.1, 0.4, 3.0, 120.0)})]
    got = estimators.summary_over_seeds(per_seed)
    assert list(got) == ["ppo", "rloo"]  # ESTIMATORS' order; none ran grpo
    ppo = got["ppo"]
    assert ppo["seeds"] == 3 and ppo["gold_gain_mean"] == pytest.approx(0.6)
    assert ppo["gold_gain_se"] == pytest.approx(0.1 / 3 ** 0.5)  # sample std 0.1
    assert ppo["gold_win_rate_median"] == 0.9 and ppo["kl_mean_median"] == 7.0 and ppo["wall_s_median"] == 160.0
    rloo = got["rloo"]
    assert rloo["seeds"] == 2 and rloo["gold_gain_mean"] == pytest.approx(0.05)
    assert rloo["gold_gain_se"] == pytest.approx(0.15) and rloo["every_seed_positive"] is False
    assert rloo["gold_win_rate_median"] == pytest.approx(0.5) and rloo["wall_s_median"] == 110.0
    # `--estimators dpo` on a run with other policies: eval compares them all, and theirs have no wall time here
    untimed = [{"estimators": {"ppo": {"gold_gain": 0.5, "gold_win_rate": 0.9, "kl_mean": 7.0},
                               "dpo": {"gold_gain": 0.4, "gold_win_rate": 0.8, "kl_mean": 8.0, "wall_s": 180.0}}}]
    got = estimators.summary_over_seeds(untimed)
    assert got["ppo"]["wall_s_median"] is None and got["dpo"]["wall_s_median"] == 180.0


def test_the_default_seed_is_the_default_run_unflagged_and_another_seeds_every_stage(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(estimators.subprocess, "run",
                        lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    estimators.make(["grpo"], estimators.run_name(42), tmp_path, 42)
    assert seen[-1] == ["make", "grpo", "RUN=default", f"RUNS_DIR={tmp_path}"]
    estimators.make(["eval"], estimators.run_name(7), tmp_path, 7)
    assert seen[-1][:4] == ["make", "eval", "RUN=seed-7", f"RUNS_DIR={tmp_path}"]
    assert seen[-1][4:] == [f"{var}=--seed 7" for var in ("SFT_ARGS", "PAIRS_ARGS", "SIMULATE_ARGS", "RM_ARGS", "PPO_ARGS",
                                                          "GRPO_ARGS", "RLOO_ARGS", "REINFORCE_PP_ARGS", "DPO_ARGS")]


def test_each_estimator_runs_from_an_empty_folder_and_eval_comes_last(monkeypatch, tmp_path):
    """An estimator's folder left by an earlier run would be resumed or skipped and its wall time not a whole run: it
    is removed before its make call; the run's SFT and reward models are kept, and eval runs once, after them all."""
    run_dir = tmp_path / "seed-5"
    for stage in ("sft", "rm", "grpo", "rloo"):
        (run_dir / stage).mkdir(parents=True)
    calls = []

    def fake_make(targets, run, runs_dir, seed):
        calls.append((targets, sorted(p.name for p in (runs_dir / run).iterdir())))
        if targets == ["eval"]:
            (run_dir / "eval").mkdir()
            (run_dir / "eval" / "report.json").write_text(json.dumps(
                {"comparison": comparison(0.1, {"grpo": (0.6, 2.0, 3, 0, 1), "rloo": (0.3, 4.0, 2, 0, 2)})}))
            (run_dir / "eval" / "manifest.json").write_text(json.dumps({"metrics": {"n_prompts": 4}}))
            return 30.0
        (run_dir / targets[0]).mkdir(exist_ok=True)
        return {"grpo": 100.0, "rloo": 120.0}.get(targets[0], 5.0)

    monkeypatch.setattr(estimators, "make", fake_make)
    got = estimators.one_seed(5, tmp_path, ("grpo", "rloo"))
    assert calls == [(["sft", "rm"], ["grpo", "rloo", "rm", "sft"]), (["grpo"], ["rloo", "rm", "sft"]),
                     (["rloo"], ["grpo", "rm", "sft"]), (["eval"], ["grpo", "rloo", "rm", "sft"])]
    assert got["estimators"]["grpo"]["wall_s"] == 100.0 and got["estimators"]["rloo"]["wall_s"] == 120.0
    assert got["estimators"]["grpo"]["gold_gain"] == pytest.approx(0.5) and got["eval_wall_s"] == 30.0
    assert got["sft_rm_wall_s"] == 5.0 and got["n_prompts"] == 4 and got["run"] == "seed-5"


def test_main_gives_make_the_runs_folder_as_spelled_and_writes_what_it_returns(monkeypatch, tmp_path):
    """A stage's manifest records --runs_dir: the default run's folder spelled absolute (/repo/runs, not make's runs)
    would rerun SFT and everything after it. main hands the folder on as given; the file written is the result."""
    from pathlib import Path

    seen = []

    def fake_one_seed(seed, runs_dir, names):
        seen.append((seed, runs_dir, names))
        return {"seed": seed, "estimators": {"ppo": {"gold_gain": 0.5, "gold_win_rate": 0.9, "kl_mean": 7.0,
                                                     "wall_s": 150.0}}}

    monkeypatch.setattr(estimators, "one_seed", fake_one_seed)
    out = tmp_path / "estimators.json"
    got = estimators.main(["--estimators", "ppo", "grpo", "--output", str(out)])
    assert seen == [(42, Path("runs"), ("ppo", "grpo"))]
    assert got["summary"]["ppo"]["gold_win_rate_median"] == 0.9 and json.loads(out.read_text()) == got
