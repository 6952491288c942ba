"""The whole journey through `make`, real stages, as a user with their own checkpoint runs it: `make sft rm ppo eval`
on a bf16 Qwen2 with the Qwen2.5 chat template, every stage cut to a few steps. Each stage's own tests check what it
computes; this one checks that the stages fit together: each reads what the one before wrote (pairs, simulated
labels, export, reward model, policy, kept policies), the base stays bf16 throughout, and a second `make` finds
every stage up to date."""

from __future__ import annotations

import json
import sqlite3

import pytest

from pipeline.run import LIBRARY_NOISE
from tests.conftest import REPO, tiny_tokenizer_with
from tests.test_make import make

STAGES = ["sft", "pairs", "simulate", "label-export", "rm", "ppo", "eval"]
SMALL = [  # a few steps each; the story recipe's configs otherwise
    "SFT_ARGS=--max_steps 4 --per_device_train_batch_size 4 --sample_max_new_tokens 4",
    "PAIRS_ARGS=--max_prompts 8 --num_responses 4 --max_new_tokens 8",
    "RM_ARGS=--ensemble 1 --min_steps 4 --max_epochs 1 --evals 1 --per_device_train_batch_size 4",
    "PPO_ARGS=--total_updates 2 --response_length 8 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 "
    "--keep_policy_every 1 --save_every 1 --sample_every 1",
    "EVAL_ARGS=--max_prompts 8 --max_new_tokens 8 --gold_judge tests.judge_fixtures:length_judge",
    # a random model's babble is neutral to VADER (every pair a tie): the gold is a `module:function` judge here
    "SIMULATE_ARGS=--judge tests.judge_fixtures:length_judge",
]


def qwen_profile(root, dtype: str = "bfloat16"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer_with("qwen2_5", root)  # the tiny model's words, Qwen's special tokens and template
    model_dir = root / "qwen2_5"
    cfg = AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype)).save_pretrained(model_dir)
    profile = root / "qwen.yaml"
    profile.write_text(f"name_or_path: {model_dir}\ndtype: {dtype}\n"
                       "lora_target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]\n")
    return profile


def make_journey(runs_dir, profile, *launch):
    """`make sft rm ppo eval` as tests/test_make.py runs make, on the real stages, run `t`."""
    return make("sft", "rm", "ppo", "eval", f"MODEL={profile}", *SMALL, *launch, fake=False, runs_dir=runs_dir,
                timeout=900)


def cpu_config_with_bf16_autocast(root):
    """configs/accelerate/cpu.yaml with the GPU configs' `mixed_precision: bf16` (multi_gpu.yaml, fsdp.yaml)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs/accelerate/cpu.yaml").read_text())
    path = root / "cpu_bf16_autocast.yaml"
    path.write_text(yaml.safe_dump({**cfg, "mixed_precision": "bf16"}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint, bf16_autocast", [("bfloat16", False), ("float32", True)],
                         ids=["bf16-checkpoint", "fp32-checkpoint-under-bf16-autocast"])
def test_make_sft_rm_ppo_eval_on_a_checkpoint_with_its_own_template(checkpoint, bf16_autocast, tmp_path):
    """A bf16 checkpoint under the caller's launch (ACCELERATE_CONFIG, by default configs/accelerate/cpu.yaml); an
    fp32 one under bf16 autocast, as the GPU configs launch it (on an H200 that stopped `make rm` at its reload
    check, fixed since)."""
    import os

    import yaml

    runs_dir = tmp_path / "runs"
    profile = qwen_profile(tmp_path, checkpoint)
    config = (cpu_config_with_bf16_autocast(tmp_path) if bf16_autocast else
              REPO / os.environ.get("ACCELERATE_CONFIG", "configs/accelerate/cpu.yaml"))
    launch = [f"ACCELERATE_CONFIG={config}"] if bf16_autocast else []
    mixed_precision = yaml.safe_load(config.read_text()).get("mixed_precision", "no")
    mixed_precision = {False: "no"}.get(mixed_precision, mixed_precision)  # YAML reads a bare `no` as False
    first = make_journey(runs_dir, profile, *launch)
    assert first.returncode == 0, (first.stdout[-3000:], first.stderr[-5000:])
    for _, noise in LIBRARY_NOISE:  # the libraries' warnings nobody can act on are not shown (pipeline.run)
        assert noise.strip("`'") not in first.stderr, noise
    run = runs_dir / "t"
    manifests = {s: json.loads((run / s / "manifest.json").read_text()) for s in STAGES}

    # the base the user named, in its own dtype, under every training stage
    for stage in ("sft", "ppo"):
        assert manifests[stage]["config"]["run"]["model_config"] == str(profile), stage
    assert set(manifests["sft"]["metrics"]["base_dtypes"]) == {checkpoint}, manifests["sft"]["metrics"]
    # the launch's mixed precision in every stage: the reward model's reload check at its precision, PPO's forwards
    assert manifests["ppo"]["metrics"]["mixed_precision"] == mixed_precision
    reload_dtype = "bfloat16 (mixed precision)" if checkpoint == "float32" and mixed_precision == "bf16" else checkpoint
    assert {m["reload_check"]["dtype"] for m in manifests["rm"]["metrics"]["members"]} == {reload_dtype}
    # each stage read the one before it: pairs sampled from the SFT policy, labelled by the simulated annotators,
    # exported, the reward model trained on that export, PPO on the SFT policy and that reward model, eval on all
    assert manifests["pairs"]["metrics"]["policy"].endswith(manifests["sft"]["outputs"]["adapter"])
    assert manifests["pairs"]["metrics"]["pairs"] > 0 and manifests["pairs"]["metrics"]["prompts_too_long"] == 0
    with sqlite3.connect(run / "label" / "labels.sqlite") as con:
        annotators = {a for (a,) in con.execute("SELECT DISTINCT annotator FROM labels")}
    assert len(annotators) == 3 and all(a.startswith("sim:") for a in annotators), annotators
    assert manifests["rm"]["upstream"]["label-export"]["outputs"] == manifests["label-export"]["outputs"]
    for stage, upstream in (("ppo", "sft"), ("ppo", "rm"), ("eval", "ppo")):
        assert manifests[stage]["upstream"][upstream]["outputs"] == manifests[upstream]["outputs"], (stage, upstream)
    # the eval report: the gold judge's verdict beside the proxy's, along SFT, the kept policy and the final one
    metrics = manifests["eval"]["metrics"]
    assert metrics["gold_judge"] == "tests.judge_fixtures:length_judge" and metrics["gold_curve_points"] == 3
    assert 0 <= metrics["gold_win_rate_ci_low"] <= metrics["gold_win_rate"] <= metrics["gold_win_rate_ci_high"] <= 1
    assert "Gold win rate of PPO over SFT" in (run / "eval" / "report.md").read_text()
    assert [p.name for p in (run / "ppo" / "policies").iterdir()] == ["update-000001"]

    again = make_journey(runs_dir, profile, *launch)
    assert again.returncode == 0, again.stderr[-3000:]
    up_to_date = [line.split(":")[0] for line in again.stdout.splitlines() if "up to date, skipped" in line]
    assert up_to_date == ["sft", "pairs", "labels", "rm", "ppo", "eval"], again.stdout[-3000:]  # labels: simulate + export
    assert {s: json.loads((run / s / "manifest.json").read_text()) for s in STAGES} == manifests  # none rewritten
