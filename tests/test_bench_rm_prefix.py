"""bench/rm_prefix.py: the reward model stage with and without shared prefixes, as `make rm` runs it. The two train on
the same batches with the same gradients, so they must end at the same held-out figures; the bench records both
times. A run without a label export is refused."""

from __future__ import annotations

import json

import pytest

from bench.rm_prefix import main
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


def test_a_run_without_labels_is_refused(tmp_path, capsys):
    assert main(["--from_run", str(tmp_path / "nothing"), "--output", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "x.json").exists()
