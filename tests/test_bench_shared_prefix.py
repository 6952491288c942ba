"""bench/shared_prefix.py: the reward model and DPO stages with and without shared prefixes, as `make rm` and `make dpo`
run them. The two train on the same batches with the same gradients, so they must end at the same held-out figures;
the bench records both times. A run without a label export is refused."""

from __future__ import annotations

import json

import pytest

from bench.shared_prefix import main
from tests.test_dpo import LN2
from tests.test_rm import write_jsonl
from tests.test_rm_groups import k_response_rows


def test_shared_and_whole_prefixes_train_the_same_reward_model(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "k4.jsonl", k_response_rows(40))
    out = tmp_path / "rm_prefix.json"
    code = main(["--dataset_name", str(data), "--model_config", str(tiny_models["llama"]), "--repeats", "1",
                 "--work_dir", str(tmp_path / "work"), "--output", str(out),
                 "--max_steps", "6", "--evals", "1", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"])
    assert code == 0
    result = json.loads(out.read_text())
    shared, whole = result["runs"]["true"][0], result["runs"]["false"][0]
    assert shared["steps"] == whole["steps"] == 6
    assert shared["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-4)
    assert shared["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-4)
    assert result["speedup"] == round(whole["train_time_s"] / shared["train_time_s"], 2)
    manifest = json.loads((tmp_path / "work/runs/share-true-0/rm/manifest.json").read_text())
    assert manifest["config"]["rm"]["share_prefix"] is True and manifest["config"]["rm"]["batch_by_prompt"] is True


def test_shared_and_whole_prefixes_train_the_same_dpo_policy(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "k4.jsonl", k_response_rows(40))
    out = tmp_path / "dpo_prefix.json"
    code = main(["--stage", "dpo", "--dataset_name", str(data), "--model_config", str(tiny_models["qwen2"]),
                 "--repeats", "1", "--work_dir", str(tmp_path / "work"), "--output", str(out),
                 "--max_steps", "4", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2"])
    assert code == 0
    result = json.loads(out.read_text())
    shared, whole = result["runs"]["true"][0], result["runs"]["false"][0]
    assert shared["steps"] == whole["steps"] == 4
    assert shared["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-4) and shared["eval_loss"] != pytest.approx(LN2)
    assert shared["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-4)
    manifest = json.loads((tmp_path / "work/runs/share-true-0/dpo/manifest.json").read_text())
    assert manifest["config"]["dpo"]["share_prefix"] is True and manifest["config"]["dpo"]["batch_by_prompt"] is True
    assert json.loads((tmp_path / "work/runs/share-false-0/dpo/manifest.json").read_text())["config"]["dpo"]["share_prefix"] is False


def test_a_run_without_labels_is_refused(tmp_path, capsys):
    assert main(["--from_run", str(tmp_path / "nothing"), "--output", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "x.json").exists()


def test_the_order_alternates_the_flags_reach_the_stage_and_the_times_are_medians(tmp_path, monkeypatch):
    """With the stage stood in for: repeat 0 runs shared then whole, repeat 1 whole then shared, repeat 2 shared then
    whole again (so neither way always runs on a warmer machine); each run gets the run's label export, --share_prefix
    and the bench's stage overrides; the figures are the medians of the stage's own train_time_s (10, 20, 90 -> 20,
    not their mean 40) and a failed stage stops the bench with exit code 1. `--stage dpo` reaches the stage, whose
    manifest is read; the results file is named after it."""
    import bench.shared_prefix as shared_prefix

    export = tmp_path / "from/label-export"
    export.mkdir(parents=True)
    (export / "manifest.json").write_text(json.dumps({"outputs": {"dataset": str(tmp_path / "exported")}}))
    times = {"true": [10.0, 20.0, 90.0], "false": [30.0, 50.0, 40.0]}
    calls = []

    def stage(data, runs_dir, run, model_config, overrides, stage):
        share = overrides[overrides.index("--share_prefix") + 1]
        calls.append((run, str(data), overrides, stage))
        folder = runs_dir / run / stage
        folder.mkdir(parents=True)
        t = times[share][int(run.rsplit("-", 1)[1])]
        (folder / "manifest.json").write_text(json.dumps({"metrics": {
            "train_time_s": t, "steps": 3, "eval_accuracy": 0.5, "eval_loss": 0.7, "train_loss": 0.6}}))
        return 0, t + 1, ""

    monkeypatch.setattr(shared_prefix, "no_op_sft", lambda runs_dir, run, model_config: None)
    monkeypatch.setattr(shared_prefix, "run_stage", stage)
    out = tmp_path / "dpo_prefix.json"
    assert main(["--stage", "dpo", "--from_run", str(tmp_path / "from"), "--repeats", "3", "--work_dir",
                 str(tmp_path / "work"), "--output", str(out), "--max_steps", "3"]) == 0
    assert [run for run, _, _, _ in calls] == ["share-true-0", "share-false-0", "share-false-1", "share-true-1",
                                               "share-true-2", "share-false-2"]
    assert all(data == str(tmp_path / "exported") and overrides[2:] == ["--max_steps", "3"] and stage == "dpo"
               for _, data, overrides, stage in calls)
    result = json.loads(out.read_text())
    assert result["median_train_time_s"] == {"true": 20.0, "false": 40.0} and result["speedup"] == 2.0
    assert [r["train_time_s"] for r in result["runs"]["true"]] == [10.0, 20.0, 90.0]

    monkeypatch.setattr(shared_prefix, "run_stage", lambda *args, **kwargs: (1, 0.0, "boom"))
    assert main(["--dataset_name", str(tmp_path / "x.jsonl"), "--work_dir", str(tmp_path / "work2"),
                 "--output", str(tmp_path / "failed.json")]) == 1
    assert not (tmp_path / "failed.json").exists()
    monkeypatch.setattr(shared_prefix, "run_stage", lambda *args, **kwargs: (2, 0.0, "error: unknown command-line argument(s)"))
    assert main(["--dataset_name", str(tmp_path / "x.jsonl"), "--work_dir", str(tmp_path / "work3"),
                 "--output", str(tmp_path / "failed.json")]) == 2  # bad input: make's exit 2


def test_each_stage_writes_its_own_results_file():
    from bench.shared_prefix import parse_bench_args

    rm, _ = parse_bench_args([])
    dpo, overrides = parse_bench_args(["--stage", "dpo", "--max_steps", "3"])
    assert (rm.stage, rm.output, rm.work_dir) == ("rm", "bench/results/rm_prefix.json", "bench/out/rm_prefix")
    assert (dpo.output, dpo.work_dir, overrides) == ("bench/results/dpo_prefix.json", "bench/out/dpo_prefix", ["--max_steps", "3"])
