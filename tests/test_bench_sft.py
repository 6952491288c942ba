"""bench/bench_sft.py: a one-round smoke run on a tiny random Llama (both sides launched for real), and its parser."""

from __future__ import annotations

import json

import pytest

from bench.bench_sft import final_metrics
from tests.conftest import run_python

SMALL_DATA = '{"data/sft/self_instruct.jsonl": 48}'


def test_final_metrics_reads_the_end_of_train_dict():
    out = ("  5/5 [00:06<00:00] {'loss': '6.9', 'num_input_tokens_seen': 100, 'train_runtime': '1.0'}\r"
           "{'train_runtime': '13.5', 'train_samples_per_second': '5.924', 'train_loss': '6.859', 'epoch': '0.1053', "
           "'num_input_tokens_seen': 30008}\n✅ Training completed.")
    m = final_metrics(out)
    assert m["train_runtime"] == 13.5 and m["num_input_tokens_seen"] == 30008 and m["train_loss"] == 6.859
    assert final_metrics("Traceback ...") == {}


def test_bench_sft_smoke(tiny_models, tmp_path):
    out = tmp_path / "sft.json"
    res = run_python("bench.bench_sft", [
        "--rounds", "1", "--max_steps", "2", "--model_config", str(tiny_models["llama"]), "--output", str(out),
        # stage overrides: they must reach both sides
        "--learning_rate", "1e-3", "--max_length", "128", "--dataset_mixture", SMALL_DATA,
        "--sample_max_new_tokens", "4", "--logging_steps", "1",
    ], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("ours_tokens_per_s", "trl_tokens_per_s", "ratio", "rounds", "settings", "versions", "machine", "metric"):
        assert key in r, key
    assert len(r["rounds"]) == 1 and r["settings"]["rounds"] == 1 and r["settings"]["max_steps"] == 2
    round1 = r["rounds"][0]
    for side in ("ours", "trl"):
        assert round1[side]["tokens_per_s"] > 0 and round1[side]["num_input_tokens_seen"] > 0
        assert round1[side]["train_runtime_s"] > 0 and len(round1[side]["loadavg_before"]) == 3
    assert r["ratio"] == pytest.approx(r["ours_tokens_per_s"] / r["trl_tokens_per_s"], rel=1e-3)
    # same model, data and hyper-parameters on both sides: same tokens, same loss, overrides carried to TRL
    assert r["same_tokens_every_run"] and r["same_train_loss_each_round"], round1
    trl = r["settings"]["trl_config"]
    assert trl["learning_rate"] == 1e-3 and trl["max_length"] == 128 and trl["max_steps"] == 2
    assert trl["assistant_only_loss"] is True and trl["use_peft"] is True and trl["lora_r"] == 16
    assert trl["model_name_or_path"] == r["settings"]["base_model"] and r["settings"]["train_rows"] > 0
    assert r["versions"]["trl"] and len(r["machine"]["loadavg_start"]) == 3


def _round(ours: float, trl: float, tokens=(500, 500), loss=(1.5, 1.5)) -> dict:
    return {"ours": {"tokens_per_s": ours, "num_input_tokens_seen": tokens[0], "train_loss": loss[0]},
            "trl": {"tokens_per_s": trl, "num_input_tokens_seen": tokens[1], "train_loss": loss[1]},
            "ratio": round(ours / trl, 4)}


def test_summary_medians_ratio_and_verdict_by_hand():
    """Medians over rounds (not means) of each side's tokens/s; ratio = ours / trl, the target met at 0.95 itself;
    no verdict when the two sides did different work (tokens or train loss)."""
    from bench.bench_sft import summary

    s = summary([_round(95.0, 100.0), _round(90.0, 100.0), _round(200.0, 100.0)])
    assert (s["ours_tokens_per_s"], s["trl_tokens_per_s"], s["ratio"]) == (95.0, 100.0, 0.95)
    assert s["meets_target"] is True and s["median_of_round_ratios"] == 0.95
    assert s["same_tokens_every_run"] is True and s["same_train_loss_each_round"] is True
    assert summary([_round(94.0, 100.0)])["meets_target"] is False
    other_loss = summary([_round(95.0, 100.0), _round(95.0, 100.0, loss=(1.5, 1.6))])
    assert other_loss["same_train_loss_each_round"] is False and other_loss["meets_target"] is None
    other_tokens = summary([_round(95.0, 100.0), _round(95.0, 100.0, tokens=(500, 501))])
    assert other_tokens["same_tokens_every_run"] is False and other_tokens["meets_target"] is None


def test_run_side_tokens_per_s_is_over_the_trainers_runtime_not_the_commands_wall():
    import os
    import sys

    from bench.bench_sft import run_side

    line = "{'train_runtime': '2.0', 'train_loss': '1.5', 'num_input_tokens_seen': 300}"
    cmd = [sys.executable, "-c", f"import time; time.sleep(0.3); print({line!r})"]
    r = run_side("fake", cmd, dict(os.environ), timeout=60)
    assert r["tokens_per_s"] == 150.0 and r["num_input_tokens_seen"] == 300 and r["train_loss"] == 1.5
    assert r["train_runtime_s"] == 2.0 and r["wall_s"] >= 0.3
    with pytest.raises(SystemExit, match="fake failed"):
        run_side("fake", [sys.executable, "-c", "print('no metrics')"], dict(os.environ), timeout=60)
