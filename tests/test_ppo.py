"""The PPO stage (stages/ppo/) on tiny random models: real main() on configs/ppo.yaml with tiny overrides.

Upstream is made here (the rm stage is written in parallel): an SFT adapter and a reward adapter with random,
non-zero LoRA weights (tests/fake_upstream.py), plus sft/rm manifests written by StageRun as the stages write them.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.run import StageRun
from stages.ppo import main, parse_args
from stages.ppo.trainer import TIMING_KEYS
from tests.conftest import (ARCHS, REPO, SLIDING_WINDOW_ARCHS, random_model, recorded_fsyncs, run_module, run_python,
                            yaml_with)
from tests.fake_upstream import METRIC_KEYS, _lora_adapter

PROMPTS = ["Tell me about rabbits.", "What is two plus two?", "Name a colour.", "Say hello.", "Why is the sky blue?",
           "Write one sentence about the sea.", "What do cats eat?", "Tell me a story.", "Who was Alice?",
           "Where do rabbits live?", "Is the sun hot?", "Count to three.", "Describe a garden.", "What is tea?",
           "Give me a name for a dog.", "What is a queen?", "How big is a mouse?", "Sing a song.", "Why do we sleep?",
           "What colour is grass?", "Tell me a joke.", "What is a book?", "Say something kind.", "What is rain?"]


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS))
    return path


_ADAPTERS: dict[str, tuple[Path, Path]] = {}


@pytest.fixture(scope="session")
def adapters(tiny_models, tmp_path_factory):
    """arch -> (sft adapter, reward adapter), built once per session on demand."""
    import yaml

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in _ADAPTERS:
            spec = yaml.safe_load(Path(tiny_models[arch]).read_text())
            root = tmp_path_factory.mktemp(f"adapters-{arch}")
            sft = _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], root / "sft", seed=1)
            rm = _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], root / "rm", seed=2, task_type="SEQ_CLS")
            _ADAPTERS[arch] = (sft, rm)
        return _ADAPTERS[arch]

    return get


TINY = ["--response_length", "12", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--num_ppo_epochs", "2", "--total_updates", "3", "--learning_rate", "3e-3", "--sample_every", "0",
        "--progress_bar", "false", "--max_prompt_length", "48"]


def ppo_args(profile, runs_dir, run, prompts_file, sft=None, rm=None, *extra) -> list[str]:
    args = ["--config", "configs/ppo.yaml", "--run", run, "--runs_dir", str(runs_dir), "--model_config", str(profile),
            "--dataset_name", str(prompts_file), *TINY]
    if sft:
        args += ["--sft_adapter", str(sft)]
    if rm:
        args += ["--reward_adapter", str(rm)]
    return args + [str(e) for e in extra]


def run_ppo(profile, runs_dir, run, prompts_file, sft=None, rm=None, *extra, reward_fn=None) -> dict:
    return main(*parse_args(ppo_args(profile, runs_dir, run, prompts_file, sft, rm, *extra)), reward_fn=reward_fn)


def read_metrics(runs_dir, run) -> list[dict]:
    return [json.loads(l) for l in (Path(runs_dir) / run / "ppo" / "metrics.jsonl").read_text().splitlines()]


def token_count_reward(token_id: int):
    """Toy reward a tiny model can learn: how often the response uses one given token (share x length)."""
    def reward_fn(prompts, response_ids, response_mask, texts):
        return ((response_ids == token_id) & response_mask.bool()).sum(1).float()
    return reward_fn


def varied_reward(prompts, response_ids, response_mask, texts):
    """Toy reward that differs between answers to one prompt (GRPO divides by the group's std): tokens divisible by 5."""
    return ((response_ids % 5 == 0) & response_mask.bool()).sum(1).float()


def zero_head_copy(rm_dir: Path, out: Path) -> Path:
    """The reward adapter with its score head zeroed: a critic that starts at 0, on the toy reward's scale (a random
    RM's per-token values would swamp a reward of a few tokens; a real RM is trained and normalised)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(rm_dir, out)
    sd = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if ".score." in k else v for k, v in sd.items()}, str(out / "adapter_model.safetensors"))
    return out


# ------------------------------------------------------------------------------------------------ config

def test_yaml_parses_and_rejects_unknown_keys(tmp_path):
    cfg, run = parse_args(["--config", "configs/ppo.yaml"])
    assert cfg.kl_coef == 0.25 and cfg.num_ppo_epochs == 4 and run.model_config == "configs/models/tiny.yaml"
    assert cfg.local_batch_size == cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    sizes = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--num_mini_batches", "3"]
    assert parse_args(["--config", "configs/ppo.yaml", *sizes])[0].local_batch_size == 4 * 2 * 3
    # a group of answers to one prompt must fit whole in a micro-batch, not only in the mini-batch (2 x 4 = 8 rows)
    group = ["--num_samples_per_prompt", "4", "--advantage_estimator", "grpo", "--gradient_accumulation_steps", "4"]
    assert parse_args(["--config", "configs/ppo.yaml", *group, "--per_device_train_batch_size", "4"])[0].prompt_group == 4
    with pytest.raises(ConfigError, match=r"num_samples_per_prompt=4 must divide per_device_train_batch_size \(2\)"):
        parse_args(["--config", "configs/ppo.yaml", *group, "--per_device_train_batch_size", "2"])
    bad = tmp_path / "ppo.yaml"
    bad.write_text(yaml_with((REPO / "configs/ppo.yaml").read_text(), "\nkl_coeff: 0.1\n"))
    with pytest.raises(ConfigError, match="kl_coeff.*did you mean 'kl_coef'"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match="long_prompts must be one of"):
        parse_args(["--config", "configs/ppo.yaml", "--long_prompts", "cut"])
    # kl_estimator had one value that could act (k1 in the reward; use_kl_loss's term is k3): removed, and said so
    for given in (["--kl_estimator", "k3"], ["--kl_estimator=k1"]):
        with pytest.raises(ConfigError, match="^--kl_estimator is no setting any more: the KL in PPO's reward is always "
                                              "k1"):
            parse_args(["--config", "configs/ppo.yaml", *given])
    old = tmp_path / "old.yaml"
    old.write_text(yaml_with((REPO / "configs/ppo.yaml").read_text(), "\nkl_estimator: k1\n"))
    with pytest.raises(ConfigError, match=f"^'kl_estimator' in {old} is no setting any more: .*use_kl_loss's term always k3"):
        parse_args(["--config", str(old)])
    # a setting the rest of the config keeps from acting, given on the command line: refused, naming why
    for flag, why in (("--vf_coef", "advantage_estimator grpo trains no value model"),
                      ("--value_learning_rate", "advantage_estimator grpo trains no value model"),
                      ("--lam", "advantage_estimator grpo trains no value model"),
                      ("--gamma", "advantage_estimator grpo compares each answer's summed reward")):
        with pytest.raises(ConfigError, match=f"^{flag} on the command line would have no effect: {why}"):
            parse_args(["--config", "configs/grpo.yaml", flag, "0.5"])
    with pytest.raises(ConfigError, match="^--whiten_advantages on the command line would have no effect: "
                                          "advantage_estimator rloo trains no value model"):
        parse_args(["--config", "configs/rloo.yaml", "--whiten_advantages", "false"])
    with pytest.raises(ConfigError, match="^--grpo_normalize_std on the command line would have no effect: "
                                          "advantage_estimator gae does not divide"):
        parse_args(["--config", "configs/ppo.yaml", "--grpo_normalize_std", "false"])
    with pytest.raises(ConfigError, match="^--kl_target on the command line would have no effect: adaptive_kl is off"):
        parse_args(["--config", "configs/ppo.yaml", "--kl_target", "3"])
    cfg, _ = parse_args(["--config", "configs/ppo.yaml", "--kl_target", "3", "--adaptive_kl", "true", "--vf_coef", "0.5"])
    assert (cfg.kl_target, cfg.vf_coef) == (3, 0.5)


# ------------------------------------------------------------------------------------------------ adapters

@pytest.fixture
def no_grad():
    """Comparisons only; the trainer turns gradients on for its own update."""
    prev = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    yield
    torch.set_grad_enabled(prev)


def test_one_base_four_adapters_equal_separate_models(tiny_models, adapters, prompts_file, tmp_path, no_grad):
    """Sampling log-probs, reference log-probs, values and rewards from the adapter stack equal those of separate
    SFT and reward models; after some updates the reference still equals the SFT model and the policy does not."""
    from accelerate import PartialState
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack, load_prompts
    from stages.ppo.rollout import collect
    from stages.ppo.trainer import PPOTrainer

    sft_dir, rm_dir = adapters("llama")
    cfg, run = parse_args(ppo_args(tiny_models["llama"], tmp_path, "x", prompts_file))
    profile = profile_from(run.model_config)
    tok = load_tokenizer(profile)
    prompts, ids, _, _ = load_prompts(cfg, tok)
    stack = build_stack(profile, tok, sft_dir, rm_dir, torch.device("cpu"), False)
    gen = torch.Generator().manual_seed(0)
    ro = collect(stack, tok, prompts[:6], ids[:6], cfg, gen)

    base_dir = profile.name_or_path
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(sft_dir)).eval()
    rm_base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    rm_base.config.pad_token_id = tok.pad_token_id
    rm = PeftModel.from_pretrained(rm_base, str(rm_dir)).eval()

    def sft_logprobs(ro):
        P, R = ro.query_ids.shape[1], ro.response_ids.shape[1]
        full = torch.cat([ro.query_ids, ro.response_ids], 1)
        mask = torch.cat([ro.query_mask, ro.response_mask], 1)
        logits = sft(input_ids=full, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        lp = torch.log_softmax(logits[:, P - 1 : P - 1 + R] / cfg.temperature, -1)
        return lp.gather(-1, ro.response_ids.unsqueeze(-1)).squeeze(-1) * ro.response_mask

    def rm_scores(ro):
        out = []
        for p, text in zip(ro.prompts, ro.texts):
            conv = tok.apply_chat_template(p + [{"role": "assistant", "content": text}], tokenize=True, return_dict=False)
            out.append(rm(input_ids=torch.tensor([list(conv)])).logits[0, 0].item())
        return torch.tensor(out)

    ref = sft_logprobs(ro)
    assert ro.response_mask.sum() > 20
    assert torch.allclose(ro.ref_logprobs, ref, atol=1e-5), "reference adapter != the SFT model"
    assert torch.allclose(ro.logprobs, ref, atol=1e-4), "sampling log-probs (KV cache) != a full forward of the policy"
    assert torch.allclose(ro.scores_raw, rm_scores(ro), atol=1e-5), "reward adapter != the reward model"
    # value at response step t = the RM's score of prompt + response[:t] (the value adapter starts as the RM)
    checked = 0
    for i in range(3):
        q = ro.query_ids[i][ro.query_mask[i].bool()].tolist()
        for t in range(int(ro.response_mask[i].sum())):
            prefix = q + ro.response_ids[i, :t].tolist()
            if prefix[-1] == tok.pad_token_id:  # a sampled pad token: HF's classifier reads before it, the value at it
                continue
            rm_score = rm(input_ids=torch.tensor([prefix])).logits[0, 0].item()
            assert ro.values[i, t].item() == pytest.approx(rm_score, abs=1e-5)
            checked += 1
    assert checked >= 20

    # reward_input tokens (prompts without a chat template): the RM reads the policy's own tokens
    cfg.reward_input = "tokens"
    ro_t = collect(stack, tok, prompts[:6], ids[:6], cfg, torch.Generator().manual_seed(0))
    for i in range(6):
        seq = ro_t.query_ids[i][ro_t.query_mask[i].bool()].tolist() + ro_t.response_ids[i][ro_t.response_mask[i].bool()].tolist()
        assert ro_t.scores_raw[i].item() == pytest.approx(rm(input_ids=torch.tensor([seq])).logits[0, 0].item(), abs=1e-5)
    cfg.reward_input = "chat"

    # Train a little; the reference and reward adapters must not move, the policy and value must.
    trainer = PPOTrainer(cfg, stack, tok, prompts, ids, tmp_path, PartialState(), reward_fn=token_count_reward(7))
    for _ in range(2):
        trainer.step()
    ro2 = collect(stack, tok, prompts[:6], ids[:6], cfg, torch.Generator().manual_seed(1))
    assert torch.allclose(ro2.ref_logprobs, sft_logprobs(ro2), atol=1e-5)
    assert torch.allclose(ro2.scores_raw, rm_scores(ro2), atol=1e-5)
    assert (ro2.logprobs - sft_logprobs(ro2)).abs().max() > 1e-3, "the policy did not change"

    # kl_coef 0: the reference forward is skipped entirely
    cfg.kl_coef = 0.0
    assert collect(stack, tok, prompts[:4], ids[:4], cfg, gen).ref_logprobs is None


# ------------------------------------------------------------------------------------------------ learning

def test_toy_reward_rises_and_kl_holds_the_policy_near_the_reference(tiny_models, adapters, prompts_file, runs_dir,
                                                                     tmp_path):
    from pipeline.models import load_tokenizer, profile_from

    sft, rm = adapters("llama")
    critic0 = zero_head_copy(rm, tmp_path / "rm0")
    token = load_tokenizer(profile_from(str(tiny_models["llama"]))).convert_tokens_to_ids("he")
    common = ["--total_updates", "24", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
              "--num_ppo_epochs", "4", "--missing_eos_penalty", "0", "--learning_rate", "5e-3", "--save_every", "0"]
    free = run_ppo(tiny_models["llama"], runs_dir, "free", prompts_file, sft, critic0, *common, "--kl_coef", "0.02",
                   reward_fn=token_count_reward(token))
    rows = read_metrics(runs_dir, "free")
    first = sum(r["reward_raw"] for r in rows[:5]) / 5
    last = sum(r["reward_raw"] for r in rows[-5:]) / 5
    assert last > first + 0.8, f"toy reward did not rise clearly: {first:.3f} -> {last:.3f}"  # 0.42 -> 1.94 here
    assert all(r["kl"] is not None and math.isfinite(r["kl"]) for r in rows)
    assert rows[-1]["kl"] > 1.0, "the policy should have moved away from the reference"
    assert free["reward_gain"] > 0.8

    tight = run_ppo(tiny_models["llama"], runs_dir, "tight", prompts_file, sft, critic0, *common, "--kl_coef", "1",
                    reward_fn=token_count_reward(token))
    tight_rows = read_metrics(runs_dir, "tight")
    assert max(r["kl"] for r in tight_rows[-5:]) < 0.5 * rows[-1]["kl"], (tight_rows[-1]["kl"], rows[-1]["kl"])
    assert tight["reward_gain"] < 0.5 * free["reward_gain"]


# ------------------------------------------------------------------------------------------------ resume

def test_resume_gives_the_same_metrics_as_a_straight_run(tiny_models, adapters, prompts_file, runs_dir):
    sft, rm = adapters("llama")
    args = (tiny_models["llama"], runs_dir)
    extra = ["--total_updates", "4", "--save_every", "0", "--adaptive_kl", "true", "--kl_target", "0.01",
             "--keep_policy_every", "2", "--sample_every", "3", "--num_samples", "2"]
    summary = run_ppo(*args, "straight", prompts_file, sft, rm, *extra)
    out = run_ppo(*args, "split", prompts_file, sft, rm, *extra, "--stop_after", "2")
    assert out == {"stopped": True, "update": 2}
    assert not (Path(runs_dir) / "split/ppo/manifest.json").exists()
    assert len(read_metrics(runs_dir, "split")) == 2
    resumed = run_ppo(*args, "split", prompts_file, sft, rm, *extra, "--resume")

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]

    straight, split = strip(read_metrics(runs_dir, "straight")), strip(read_metrics(runs_dir, "split"))
    assert [r["update"] for r in split] == [1, 2, 3, 4]
    assert split == straight  # exact: same floats, including the adaptive KL coefficient and the LR schedule
    assert len({r["kl_coef"] for r in straight}) > 1, "adaptive KL should have moved the coefficient"
    # the manifest's summary covers every update, those before the resume too
    same = ("reward_first", "reward_last", "reward_gain", "kl_last", "updates", "episodes", "response_length_last")
    assert {k: resumed[k] for k in same} == {k: summary[k] for k in same}
    # sample tables: the first update's, then every sample_every-th, num_samples rows each; kept across the resume
    samples = [[json.loads(l) for l in (Path(runs_dir) / r / "ppo/samples.jsonl").read_text().splitlines()]
               for r in ("straight", "split")]
    assert [s["update"] for s in samples[0]] == [1, 1, 3, 3] and samples[1] == samples[0]
    for name in ("adapter", "value_adapter"):
        a = (Path(runs_dir) / "straight/ppo" / name / "adapter_model.safetensors").read_bytes()
        b = (Path(runs_dir) / "split/ppo" / name / "adapter_model.safetensors").read_bytes()
        assert a == b, f"{name} differs after resume"
    # the critic's fitted offset (its head has no bias) travels with the value adapter, and survives the resume
    offsets = [json.loads((Path(runs_dir) / r / "ppo/value_adapter/value_offset.json").read_text()) for r in ("straight", "split")]
    assert offsets[0] == offsets[1] and offsets[0]["value_offset"] == offsets[0]["critic_fit"]["offset"] != 0.0
    # the policy kept at update 2 (for make eval's curve), identical too; the final one is adapter/, not kept twice
    kept = [sorted(p.name for p in (Path(runs_dir) / r / "ppo/policies").iterdir()) for r in ("straight", "split")]
    assert kept == [["update-000002"]] * 2
    outputs = json.loads((Path(runs_dir) / "straight/ppo/manifest.json").read_text())["outputs"]
    assert {"samples", "policies"} <= set(outputs)  # written, so named
    a, b = ((Path(runs_dir) / r / "ppo/policies/update-000002/adapter_model.safetensors").read_bytes()
            for r in ("straight", "split"))
    assert a == b and (Path(runs_dir) / "split/ppo/policies/update-000002/pipeline_base.json").exists()

    # A killed run is simply started again (no --resume): it continues from its last checkpoint.
    run_ppo(*args, "killed", prompts_file, sft, rm, *extra, "--stop_after", "3")
    run_ppo(*args, "killed", prompts_file, sft, rm, *extra)
    assert strip(read_metrics(runs_dir, "killed")) == straight


# ------------------------------------------------------------------------------------------------ architectures

@pytest.mark.parametrize("arch", ARCHS)
def test_runs_on_four_architectures(arch, tiny_models, adapters, prompts_file, runs_dir):
    from safetensors.torch import load_file

    sft, rm = adapters(arch)
    extra = ["--entropy_coef", "0.01"] if arch == "qwen2" else []  # the optional entropy bonus path
    metrics = run_ppo(tiny_models[arch], runs_dir, arch, prompts_file, sft, rm, "--total_updates", "2", *extra)
    out = Path(runs_dir) / arch / "ppo"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["updates"] == 2 and metrics["model_copies"] == 1
    rows = read_metrics(runs_dir, arch)
    assert set(METRIC_KEYS) <= set(rows[0])
    assert all(isinstance(rows[-1][k], (int, float)) for k in METRIC_KEYS), rows[-1]
    if extra:  # entropy of the sampling distribution == entropy recomputed by the update's forward (first update)
        assert rows[0]["entropy_update"] == pytest.approx(rows[0]["entropy"], abs=0.05)
    before, after = load_file(str(sft / "adapter_model.safetensors")), load_file(str(out / "adapter/adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "policy weights did not move"
    if arch == "llama":  # gradient checkpointing recomputes, it does not change the numbers
        run_ppo(tiny_models[arch], runs_dir, "gc", prompts_file, sft, rm, "--total_updates", "2",
                "--gradient_checkpointing", "true")
        strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
        assert strip(read_metrics(runs_dir, "gc")) == strip(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_value_top_layers_replay_equals_a_full_forward(arch, tiny_models, adapters, prompts_file, tmp_path, no_grad):
    """value_trainable_layers: the value adapter trains only its top layer(s); the update feeds the rollout's cached
    hidden states instead of rerunning the frozen layers below. Values must equal a full forward, before and after
    training; the frozen value layers and the reward adapter must not move, the trained top layer must."""
    from accelerate import PartialState

    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack, load_prompts
    from stages.ppo.rollout import collect, token_values
    from stages.ppo.trainer import PPOTrainer

    sft_dir, rm_dir = adapters(arch)
    cfg, run = parse_args(ppo_args(tiny_models[arch], tmp_path, "x", prompts_file, None, None,
                                   "--value_trainable_layers", "1"))
    profile = profile_from(run.model_config)
    tok = load_tokenizer(profile)
    prompts, ids, _, _ = load_prompts(cfg, tok)
    stack = build_stack(profile, tok, sft_dir, rm_dir, torch.device("cpu"), False)
    trainer = PPOTrainer(cfg, stack, tok, prompts, ids, tmp_path, PartialState(), reward_fn=token_count_reward(7))
    top, lm = trainer.top, stack.causal_lm
    assert top is not None and top.cut == 1  # the tiny models have 2 layers: layer 0 frozen, layer 1 trained
    snapshot = lambda a: {n: p.detach().clone() for n, p in stack.model.named_parameters() if a in n.split(".")}  # noqa: E731
    value0, reward0 = snapshot("value"), snapshot("reward")
    trained = {n for n, _ in trainer.named_params["value"]}
    assert trained and all(".layers.0." not in n and ".h.0." not in n for n in trained)

    def check(ro):
        for s in range(0, len(ro.texts), 3):
            idx = torch.arange(s, min(s + 3, len(ro.texts)))
            x = ro.rows(idx)
            stack.use("value")
            full = token_values(lm, x)
            replayed = token_values(lm, x, top, ro.cached_hidden(idx, x))
            assert torch.allclose(replayed, full, atol=1e-5), (replayed - full).abs().max()
            width = x.response_mask.shape[1]
            assert torch.allclose(ro.values[idx][:, :width][x.response_mask], full, atol=1e-5)

    check(collect(stack, tok, prompts[:7], ids[:7], cfg, torch.Generator().manual_seed(0), None, top))
    for _ in range(2):
        trainer.step()
    check(collect(stack, tok, prompts[:7], ids[:7], cfg, torch.Generator().manual_seed(1), None, top))
    # reward_input tokens: the reward pass replays the value's frozen layers (identical RM weights there)
    assert top.reward_shares_bottom
    cfg.reward_input = "tokens"
    shared = collect(stack, tok, prompts[:7], ids[:7], cfg, torch.Generator().manual_seed(2), None, top)
    full = collect(stack, tok, prompts[:7], ids[:7], cfg, torch.Generator().manual_seed(2))
    assert torch.equal(shared.response_ids, full.response_ids)
    assert torch.allclose(shared.scores_raw, full.scores_raw, atol=1e-5), (shared.scores_raw - full.scores_raw)
    value1, reward1 = snapshot("value"), snapshot("reward")
    moved = {n for n in value0 if not torch.equal(value0[n], value1[n])}
    assert moved and moved <= trained, moved - trained  # only the top layer's LoRA and the head moved
    assert all(torch.equal(reward0[n], reward1[n]) for n in reward0), "the reward adapter moved"


def test_value_trains_all_layers_when_the_layer_list_is_unknown(tiny_models, adapters, prompts_file, tmp_path,
                                                                  monkeypatch, capsys):
    from accelerate import PartialState

    import stages.ppo.trainer as T
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack, load_prompts

    sft_dir, rm_dir = adapters("llama")
    cfg, run = parse_args(ppo_args(tiny_models["llama"], tmp_path, "x", prompts_file))
    assert cfg.value_trainable_layers == 1
    profile = profile_from(run.model_config)
    tok = load_tokenizer(profile)
    prompts, ids, _, _ = load_prompts(cfg, tok)
    stack = build_stack(profile, tok, sft_dir, rm_dir, torch.device("cpu"), False)

    def unknown(lm):
        raise ValueError(f"cannot find the decoder layers of {type(lm).__name__}")

    monkeypatch.setattr(T, "decoder_layers", unknown)
    trainer = T.PPOTrainer(cfg, stack, tok, prompts, ids, tmp_path, PartialState(), reward_fn=token_count_reward(7))
    assert trainer.top is None and not stack.frozen
    assert len(trainer.named_params["value"]) == len(stack.adapter_parameters("value"))
    assert "the value adapter trains all its layers" in capsys.readouterr().err
    metrics, ro = trainer.step()
    assert ro.value_hidden is None and math.isfinite(metrics["value_loss"])


# ------------------------------------------------------------------------------------------------ two processes

def _upstream_manifests(runs_dir: Path, run: str, sft: Path, rm: Path, more_rms: tuple[Path, ...] = ()) -> None:
    """Finished sft and rm stages; `more_rms`: the rm stage is an ensemble of rm and these (made-up member stats)."""
    s = StageRun("sft", run, str(runs_dir))
    s.prepare({})
    s.finish({"adapter": sft}, {"train_loss": 1.0}, {})
    r = StageRun("rm", run, str(runs_dir))
    r.prepare({})
    members = [rm, *more_rms]
    r.finish({"adapter": rm, **({"members": json.dumps([str(m) for m in members])} if more_rms else {})},
             {"eval_accuracy": 0.6, "reward_mean": 0.1, "reward_std": 2.0,
              "members": [{"reward_mean": 0.1 * i, "reward_std": 1.0 + i} for i in range(len(members))]}, {})


def load_with_stock_peft(manifest: dict, cwd: Path):
    """The policy and value outputs of a PPO manifest, loaded by stock PEFT from another working directory."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

    here = os.getcwd()
    os.chdir(cwd)
    try:
        policy = AutoPeftModelForCausalLM.from_pretrained(manifest["outputs"]["adapter"])
        value = AutoPeftModelForSequenceClassification.from_pretrained(manifest["outputs"]["value_adapter"], num_labels=1)
    finally:
        os.chdir(here)
    return policy, value


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_outputs_load(tiny_models, adapters, prompts_file, runs_dir, tmp_path):
    sft, rm = adapters("llama")
    _upstream_manifests(runs_dir, "ddp", sft, rm)
    res = run_module("stages.ppo", ppo_args(tiny_models["llama"], runs_dir, "ddp", prompts_file), processes=2)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((Path(runs_dir) / "ddp/ppo/manifest.json").read_text())
    m = manifest["metrics"]
    assert m["world_size"] == 2
    assert m["episodes"] == 2 * 8 * 3  # both ranks' episodes count: 2 x (4 x 2) x 3 updates
    # and so do the rates: an update's episodes_per_s times its seconds is both ranks' 16 episodes, the run's 48
    rows = [json.loads(l) for l in Path(manifest["outputs"]["metrics_jsonl"]).read_text().splitlines()]
    assert [r["episodes_per_s"] * r["time_update_s"] for r in rows] == pytest.approx([16, 16, 16], rel=1e-9)
    assert m["episodes_per_s"] * m["train_wall_s"] == pytest.approx(48, rel=1e-9)
    assert len(m["rank_param_digests"]) == 2 and m["ranks_in_sync"], m["rank_param_digests"]
    checkpoints = sorted((Path(runs_dir) / "ddp/ppo/checkpoints").glob("checkpoint-*/checkpoint.json"))
    assert checkpoints and all(json.loads(c.read_text())["upstream"]["settings"]["world_size"] == 2 for c in checkpoints)
    for key in ("reward_first", "reward_last", "reward_gain", "kl_last", "updates", "episodes_per_s"):
        assert key in m
    assert set(manifest["outputs"]) >= {"adapter", "value_adapter", "metrics_jsonl", "heldout_prompts"}
    assert manifest["upstream"]["sft"]["outputs"]["adapter"] == str(sft)
    held = [json.loads(l)["prompt"] for l in Path(manifest["outputs"]["heldout_prompts"]).read_text().splitlines()]
    fraction = parse_args(["--config", "configs/ppo.yaml"])[0].heldout_fraction
    assert len(held) == int(len(PROMPTS) * fraction) and all(p[-1]["content"] in PROMPTS for p in held)
    assert m["prompts_train"] == len(PROMPTS) - len(held)

    policy, value = load_with_stock_peft(manifest, tmp_path)
    assert policy.active_adapter == "default" and value.active_adapter == "default"


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_inputs_are_refused_clearly(tiny_models, adapters, prompts_file, runs_dir, tmp_path):
    sft, rm = adapters("llama")
    _, gpt2_rm = adapters("gpt2")
    llama = tiny_models["llama"]
    with pytest.raises(ConfigError, match="reward adapter .* was trained on base .*model_type: adapter gpt2 vs base llama"):
        run_ppo(llama, runs_dir, "a", prompts_file, sft, gpt2_rm)
    with pytest.raises(ConfigError, match="not a reward model"):
        run_ppo(llama, runs_dir, "b", prompts_file, sft, sft)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        run_ppo(llama, runs_dir, "c", empty, sft, rm)
    with pytest.raises(ConfigError, match=r"(\d+) of \1 training prompts are longer than max_prompt_length=3 tokens"):
        run_ppo(llama, runs_dir, "d", prompts_file, sft, rm, "--max_prompt_length", "3", "--long_prompts", "error")
    with pytest.raises(ConfigError, match="none is left to train on"):
        run_ppo(llama, runs_dir, "d", prompts_file, sft, rm, "--max_prompt_length", "3")
    with pytest.raises(ConfigError, match="no checkpoint .* to continue from"):
        run_ppo(llama, runs_dir, "e", prompts_file, sft, rm, "--resume")
    with pytest.raises(ConfigError, match="needs the sft stage of run 'f'"):
        run_ppo(llama, runs_dir, "f", prompts_file)


def test_plain_text_prompts_record_the_reward_input_that_ran(tiny_models, adapters, tmp_path, runs_dir, capsys):
    """A tokenizer without a chat template (plain-text prompts) switches reward_input chat -> tokens; config.json and
    the manifest record what ran."""
    import shutil

    import yaml

    spec = yaml.safe_load(Path(tiny_models["llama"]).read_text())
    model = shutil.copytree(spec["name_or_path"], tmp_path / "no-template")
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    profile = tmp_path / "no-template.yaml"
    profile.write_text(yaml.safe_dump({**spec, "name_or_path": str(model)}))
    prompts = tmp_path / "plain.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    sft, rm = adapters("llama")
    run_ppo(profile, runs_dir, "plain", prompts, sft, rm, "--total_updates", "1")
    assert "reward_input: tokens" in capsys.readouterr().err
    out = Path(runs_dir) / "plain" / "ppo"
    assert json.loads((out / "config.json").read_text())["ppo"]["reward_input"] == "tokens"
    assert json.loads((out / "manifest.json").read_text())["config"]["ppo"]["reward_input"] == "tokens"


def test_bundled_prompts_after_sft_on_your_data_get_a_note(tiny_models, adapters, runs_dir, capsys):
    """SFT on your data (--dataset_name, or a mixture of your files) and PPO on the bundled story openings: PPO trains,
    and eval measures, on the story's task with no word of it. A note says so (from the SFT manifest the stage
    reads); your own prompts, or SFT on the bundled data, give none."""
    from stages.ppo import bundled_prompts_note

    cfg = parse_args(["--config", str(REPO / "configs/ppo.yaml")])[0]
    assert cfg.prompts_file.startswith("data/") and cfg.dataset_name is None
    mine = {"config": {"sft": {"dataset_name": "/home/me/chats.jsonl"}}}
    assert bundled_prompts_note(cfg, mine) == (
        f"note: ppo samples the bundled prompts {cfg.prompts_file} while SFT learned from your data "
        f"(/home/me/chats.jsonl): the policy is trained and evaluated on those; give your prompts with "
        f"PPO_ARGS=\"--dataset_name FILE\" (a 'prompt' column) or prompts_file in its config")
    mixture = {"config": {"sft": {"dataset_mixture": {"data/story/sft.jsonl": 0, "/home/me/more.jsonl": 0}}}}
    assert "(/home/me/more.jsonl)" in bundled_prompts_note(cfg, mixture)
    assert bundled_prompts_note(cfg, {"config": {"sft": {"dataset_mixture": {"data/story/sft.jsonl": 0}}}}) is None
    assert bundled_prompts_note(cfg, None) is None  # --sft_adapter: no SFT manifest read
    own = parse_args(["--config", str(REPO / "configs/ppo.yaml"), "--dataset_name", "/home/me/prompts.jsonl"])[0]
    assert bundled_prompts_note(own, mine) is None
    cfg.prompts_file = "/home/me/prompts.jsonl"  # your prompts as the config's file
    assert bundled_prompts_note(cfg, mine) is None
    # the stage prints it, once, from the SFT manifest it reads
    sft, rm = adapters("llama")
    folder = Path(runs_dir) / "noted" / "sft"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"outputs": {"adapter": str(sft)}, **mine}))
    args = ppo_args(tiny_models["llama"], runs_dir, "noted", "unused", None, rm, "--total_updates", "1")
    at = args.index("--dataset_name")
    main(*parse_args(args[:at] + args[at + 2:] + ["--prompts_file", "data/story/ppo_prompts.jsonl"]))
    assert capsys.readouterr().err.count("while SFT learned from your data (/home/me/chats.jsonl)") == 1


def test_long_prompts_truncated_with_a_note(tiny_models, adapters, prompts_file, runs_dir, capsys, monkeypatch):
    """The reward model reads the prompt the policy answered, cut as it was: it read the whole prompt (past a GPT-2
    base's positions: an IndexError mid-run, the run folder written)."""
    import stages.ppo.rollout as rollout

    read = []

    def recording(tokenizer, prompts, texts, max_prompt_tokens=None):
        ids, mask, starts = chat_reward_inputs(tokenizer, prompts, texts, max_prompt_tokens)
        read.extend(zip(prompts, texts, starts.tolist()))
        return ids, mask, starts

    from pipeline.generation import chat_reward_inputs

    monkeypatch.setattr(rollout, "chat_reward_inputs", recording)
    sft, rm = adapters("llama")
    m = run_ppo(tiny_models["llama"], runs_dir, "trunc", prompts_file, sft, rm, "--max_prompt_length", "12",
                "--long_prompts", "truncate", "--total_updates", "1")
    err = capsys.readouterr().err
    assert "longer than max_prompt_length=12 tokens" in err and "cut to 12 tokens: their end, after a leading BOS" in err
    assert m["prompts_long"] > 0 and m["prompts_train"] == m["prompts_total"] - m["prompts_heldout"]
    assert read and max(start for _, _, start in read) == 12  # the reply after 12 prompt tokens, long prompts too


def test_report_to_trackio_logs_every_update_and_a_missing_package_is_refused(tiny_models, adapters, prompts_file,
                                                                               runs_dir, monkeypatch):
    """`--report_to tensorboard` (or trackio) when the package is installed (README, PPO): each update's numeric
    metrics.jsonl figures under ppo/, at its update as the step, and the run closed; without the package, refused
    before the run folder."""
    import importlib.machinery
    import types

    calls = []
    trackio = types.ModuleType("trackio")
    trackio.__spec__ = importlib.machinery.ModuleSpec("trackio", None)  # libraries ask find_spec whether it is there
    trackio.init = lambda **kw: calls.append(("init", kw["project"]))
    trackio.log = lambda scalars, step=None: calls.append(("log", step, scalars))
    trackio.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    sft, rm = adapters("llama")
    run_ppo(tiny_models["llama"], runs_dir, "trackio", prompts_file, sft, rm, "--report_to", "trackio",
            "--total_updates", "2")
    rows = read_metrics(runs_dir, "trackio")
    assert calls == [("init", "rlhf-ppo"),
                     *(("log", row["update"], {f"ppo/{k}": v for k, v in row.items()
                                               if isinstance(v, (int, float)) and k != "update"}) for row in rows),
                     ("finish",)]
    assert [row["update"] for row in rows] == [1, 2]
    monkeypatch.setitem(sys.modules, "trackio", None)  # not installed: importing it raises ImportError
    with pytest.raises(ConfigError, match="--report_to on the command line names 'trackio', whose package is not "
                                          "installed"):
        run_ppo(tiny_models["llama"], runs_dir, "no-trackio", prompts_file, sft, rm, "--report_to", "trackio")
    assert not (Path(runs_dir) / "no-trackio").exists()


def test_report_to_tensorboard_with_tensorboardx_alone_writes_through_tensorboardx(monkeypatch, tmp_path):
    """The config accepts `--report_to tensorboard` with tensorboardX installed and tensorboard not (check_report_to
    asks transformers, whose TensorBoardCallback takes either): the loop's writer is then tensorboardX's. It was torch's
    alone, whose import needs tensorboard: an ImportError once the models had loaded and the run folder was written."""
    import importlib.machinery
    import types

    from stages.ppo.trainer import tensorboard_writer

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

    tensorboardx = types.ModuleType("tensorboardX")
    tensorboardx.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)  # find_spec finds it installed
    tensorboardx.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "tensorboardX", tensorboardx)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # torch's writer imports tensorboard
    cfg, _ = parse_args(["--config", str(REPO / "configs" / "ppo.yaml"), "--report_to", "tensorboard"])
    assert cfg.report_to == "tensorboard"  # accepted at parse
    writer = tensorboard_writer(tmp_path / "tensorboard")
    assert type(writer) is Writer and writer.log_dir == str(tmp_path / "tensorboard")


@pytest.mark.parametrize("template", ["llama3_2", "qwen2_5", "qwen3", "gemma", "phi3"])
def test_the_reward_model_reads_a_cut_prompt_as_the_policy_did(template, template_tokenizers):
    """chat_reward_inputs with max_prompt_tokens: the prompt part cut as the policy's prompt (keep_end: its BOS and
    its end), the reply and the template's closing tokens whole, the reply's start moved to the cut; a prompt that
    fits is read as before. reply_closing_tokens counts the tokens the template adds after a reply."""
    from transformers import AutoTokenizer

    from pipeline.generation import chat_ids, chat_reward_inputs, encode_prompts, keep_end, reply_closing_tokens

    tok = AutoTokenizer.from_pretrained(template_tokenizers[template])
    if tok.pad_token is None:  # as load_tokenizer gives it one
        tok.pad_token = tok.eos_token
    conv = [{"role": "user", "content": "a long question about rabbits and their burrows " * 6}]
    reply = "Hello there"
    for limit in (20, 1000):  # cut; fits
        whole = chat_ids(tok, conv + [{"role": "assistant", "content": reply}])
        ids, mask, starts = chat_reward_inputs(tok, [conv], [reply], limit)
        row, start = ids[0][mask[0].bool()].tolist(), int(starts[0])
        uncut_start = int(chat_reward_inputs(tok, [conv], [reply])[2][0])
        assert row[start:] == whole[uncut_start:]  # the reply and what closes it, whole
        assert row[:start] == keep_end(whole[:uncut_start], limit, tok.bos_token_id)
        assert (start == 20 and row[:start] == encode_prompts(tok, [conv], 20)[0]) if limit == 20 else row == whole
        reply_ids = tok(reply, add_special_tokens=False)["input_ids"]
    assert reply_closing_tokens(tok, conv) == len(whole) - uncut_start - len(reply_ids) >= 1


def test_a_cut_prompt_keeps_its_bos(tiny_models, prompts_file):
    """Cutting a long prompt to its end dropped the BOS the model always sees first (Llama 3's <|begin_of_text|>):
    PPO's long_prompts: truncate and eval's prompt limit now keep it in front, as the reward model's pairs do."""
    from pipeline.generation import chat_ids, encode_prompts, keep_end
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import PPOConfig, load_prompts

    assert keep_end([1, 5, 6, 7, 8], 3, 1) == [1, 7, 8] and keep_end([5, 6, 7, 8], 3, 1) == [6, 7, 8]
    assert keep_end([1, 5], 3, 1) == [1, 5] and keep_end([1, 5, 6, 7], 3, None) == [5, 6, 7]
    assert keep_end([1, 5, 6, 7], 1, 1) == [7]  # no room for BOS and the end: the end (the assistant header) wins
    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    conv = [{"role": "user", "content": "a long question about rabbits and their burrows " * 4}]
    full = chat_ids(tok, conv, add_generation_prompt=True)
    assert full[0] == tok.bos_token_id and len(full) > 12
    assert encode_prompts(tok, [conv], 12)[0] == [tok.bos_token_id, *full[-11:]]
    _, ids, _, notes = load_prompts(PPOConfig(prompts_file=str(prompts_file), max_prompt_length=12,
                                              long_prompts="truncate"), tok)
    assert notes["prompts_long"] > 0 and all(len(s) <= 12 and s[0] == tok.bos_token_id for s in ids)
    assert sum(len(s) == 12 for s in ids) >= notes["prompts_long"]  # a long prompt is cut to the limit, not below it


def test_a_repeated_prompt_is_never_both_trained_on_and_held_out(tiny_models, tmp_path):
    """A conversation dataset with three replies to each prompt: the held-out prompts (what eval scores the policies
    on) are split from the distinct prompts, so none of them is also a training prompt."""
    from dataclasses import replace

    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import load_prompts

    path = tmp_path / "convs.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]})
                            + "\n" for r in ("Yes.", "No.", "Maybe.") for p in PROMPTS))
    cfg, _ = parse_args(["--config", "configs/ppo.yaml", "--dataset_name", str(path), "--heldout_fraction", "0.25"])
    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    train, _, heldout, notes = load_prompts(cfg, tok)
    key = lambda c: json.dumps(c, sort_keys=True)  # noqa: E731
    assert (notes["prompts_total"], notes["prompts_repeated"], len(heldout), len(train)) == (24, 48, 6, 18)
    assert not {key(c) for c in heldout} & {key(c) for c in train}
    # the held-out share is drawn by the seed: the same seed holds out the same prompts, another seed others
    again, other = load_prompts(cfg, tok)[2], load_prompts(replace(cfg, seed=cfg.seed + 1), tok)[2]
    assert again == heldout and len(other) == 6 and {key(c) for c in other} != {key(c) for c in heldout}


def test_cli_error_is_one_line_with_exit_code_2(tiny_models, adapters, prompts_file, runs_dir):
    sft, rm = adapters("llama")
    res = run_python("stages.ppo", ppo_args(tiny_models["llama"], runs_dir, "cli", prompts_file, sft, rm, "--resume"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: --resume: there is no checkpoint")
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------------------ correctness

def _trainer(tiny_models, adapters, prompts_file, tmp_path, *extra, profile=None, reward_stats=None, reward_fn=None):
    from accelerate import PartialState

    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack, load_prompts
    from stages.ppo.trainer import PPOTrainer

    sft_dir, rm_dir = adapters("llama")
    cfg, run = parse_args(ppo_args(profile or tiny_models["llama"], tmp_path, "x", prompts_file, None, None, *extra))
    prof = profile_from(run.model_config)
    tok = load_tokenizer(prof)
    prompts, ids, _, _ = load_prompts(cfg, tok)
    torch.manual_seed(0)
    stack = build_stack(prof, tok, sft_dir, rm_dir, torch.device("cpu"), False, with_value=cfg.has_critic)
    return PPOTrainer(cfg, stack, tok, prompts, ids, tmp_path / "out", PartialState(), reward_stats=reward_stats,
                      reward_fn=reward_fn)


def test_critic_starts_on_the_shaped_reward_scale(tiny_models, adapters, prompts_file, tmp_path):
    """The value head starts as the RM's head (raw RM scale); the rewards are normalised. critic_init fit puts the
    critic on the shaped reward's scale at the first rollout: mean V(last token) within 0.1 sigma of the mean shaped
    score, and update 1's explained variance at least a zero critic's (0). The raw RM critic gives about -3 here."""
    from stages.ppo.rollout import collect

    extra = ["--gradient_accumulation_steps", "4"]
    probe = _trainer(tiny_models, adapters, prompts_file, tmp_path / "probe", *extra)
    ro = collect(probe.stack, probe.tokenizer, probe.prompts, probe.prompt_ids, probe.cfg, torch.Generator().manual_seed(99))
    stats = (ro.scores_raw.mean().item() + 0.5, ro.scores_raw.std().item())  # as from the RM's preference data

    ev = {}
    for init in ("fit", "rm"):
        trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path / init, *extra, "--critic_init", init,
                           reward_stats=stats)
        metrics, ro = trainer.step()
        ev[init] = metrics["explained_variance"]
        if init == "fit":
            last = ro.response_mask.sum(1).long() - 1
            v_last = ro.values[torch.arange(len(last)), last]
            shaped = trainer._scores(ro)
            assert abs(v_last.mean() - shaped.mean()) < 0.1 * shaped.std(), (v_last.mean(), shaped.mean(), shaped.std())
            assert trainer.critic_fit and trainer.value_offset == trainer.critic_fit["offset"]
    assert ev["fit"] > -0.01, ev  # >= a zero critic's 0, up to GAE's returns differing from the fitted MC returns
    assert ev["rm"] < -1.0, ev  # the defect this guards against (else the fixture no longer shows it)


def test_first_update_reproduces_the_sampling_distribution(tiny_models, adapters, prompts_file, tmp_path):
    """One epoch, one mini-batch: the update's forward sees the weights that sampled, at the sampling temperature, so
    the ratio is 1 everywhere (approx_kl ~ 0, nothing clipped). Dropping the temperature in the update breaks it."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--num_ppo_epochs", "1", "--num_mini_batches", "1",
                       "--temperature", "0.7")
    metrics, _ = trainer.step()
    assert metrics["approx_kl"] < 1e-8, metrics["approx_kl"]
    assert metrics["clipfrac_policy"] == 0.0


def test_the_sampled_entropy_is_the_entropy_of_the_distribution_that_drew_each_token(tiny_models, adapters,
                                                                                     prompts_file, tmp_path):
    """The rollout's entropy at each real token (logged as `entropy`, its token mean) is that of softmax(logits / T),
    the distribution the token was drawn from, as the update's forward gives it: positive, at most log(vocab).
    Mutant: its sign flipped in the sampling loop."""
    from stages.ppo import losses as L
    from stages.ppo.rollout import response_logits

    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--temperature", "0.7")
    ro = trainer.rollout()
    x = ro.rows(torch.arange(ro.response_ids.shape[0]))
    trainer.stack.use("policy")
    with torch.no_grad():
        expected = L.entropy_from_logits(response_logits(trainer.lm, x) / 0.7)
    sampled = ro.entropy[:, : x.response_mask.shape[1]][x.response_mask]
    assert 0 < expected.min() and expected.max() <= math.log(trainer.lm.config.vocab_size)
    assert torch.allclose(sampled, expected, atol=1e-4), (sampled - expected).abs().max()
    _, _, stats = trainer._advantages(ro)
    assert stats["entropy"] == pytest.approx(expected.double().mean().item(), rel=1e-5)


def test_the_critic_fit_targets_the_returns_at_the_configured_gamma(tiny_models, adapters, prompts_file, tmp_path):
    """critic_init fit: least squares of the rollout's Monte-Carlo returns on the head's outputs. With no KL term and
    gamma 0.5 the return at token t is 0.5^(last - t) x the shaped score; the fitted values satisfy the normal
    equations against it: their residuals sum to 0 and are orthogonal to the head's outputs. Mutant: the returns
    undiscounted (gamma 1, the default, where the two agree)."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--gamma", "0.5", "--kl_coef", "0",
                       "--whiten_rewards", "false", "--critic_init", "fit")
    ro = trainer.rollout()
    raw = ro.values.double()
    trainer._advantages(ro)
    mask = ro.response_mask.double()
    last = mask.sum(1, keepdim=True) - 1
    returns = trainer._scores(ro).double()[:, None] * 0.5 ** (last - torch.arange(mask.shape[1])) * mask
    residual = (returns - ro.values.double()) * mask
    scale = returns.abs().sum().item()
    assert scale > 1 and trainer.critic_fit["scale"] != 0
    assert abs(residual.sum().item()) < 1e-5 * scale, residual.sum()
    assert abs((residual * raw).sum().item()) < 1e-5 * scale * raw.abs().max().item(), (residual * raw).sum()


def test_critic_warmup_trains_only_the_value(tiny_models, adapters, prompts_file, tmp_path):
    """A warm-up update trains the value adapter alone, and logs the policy's statistics as null, the KL loss term's
    and the entropy bonus's too (docs/CONTRACTS.md: a statistic that does not apply is null, not a 0.0 nobody computed
    nor a missing key)."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--critic_warmup_updates", "1", "--use_kl_loss",
                       "true", "--entropy_coef", "0.01")
    policy0 = [p.detach().clone() for _, p in trainer.named_params["policy"]]
    value0 = [p.detach().clone() for _, p in trainer.named_params["value"]]
    metrics, _ = trainer.step()
    assert metrics["policy_loss"] is None and metrics["kl_loss"] is None and math.isfinite(metrics["value_loss"])
    assert "entropy_update" in metrics and metrics["entropy_update"] is None
    assert all(torch.equal(a, p) for a, (_, p) in zip(policy0, trainer.named_params["policy"]))
    assert any(not torch.equal(a, p) for a, (_, p) in zip(value0, trainer.named_params["value"]))
    metrics, _ = trainer.step()
    assert any(not torch.equal(a, p) for a, (_, p) in zip(policy0, trainer.named_params["policy"]))
    assert math.isfinite(metrics["policy_loss"]) and math.isfinite(metrics["kl_loss"]) and metrics["entropy_update"] > 0


def test_a_reward_that_is_not_finite_stops_the_update_before_the_adapters_step(tiny_models, adapters, prompts_file,
                                                                              tmp_path):
    """A NaN score (a broken reward model, an fp16 overflow, your function) went into the advantages, the update stepped
    every adapter on it, and the run then died in the progress bar's format of the NaN's metrics. Now one ConfigError
    naming the update and the count, and no parameter moved. Mutant: the check skipped."""
    def one_nan(prompts, ids, mask, texts):
        scores = varied_reward(prompts, ids, mask, texts)
        scores[1] = float("nan")
        return scores

    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, reward_fn=one_nan)
    before = _flat(p for _, p in trainer.named_params["policy"])
    with pytest.raises(ConfigError, match=rf"the reward gave 1 of the {trainer.cfg.local_batch_size} responses of "
                                          r"update 1 a score that is not a finite number"):
        trainer.step()
    assert torch.equal(before, _flat(p for _, p in trainer.named_params["policy"]))


@pytest.mark.parametrize("shape", ["one", "column", "short"])
def test_a_reward_function_must_give_one_score_per_response(tiny_models, adapters, prompts_file, tmp_path, shape):
    """PPO's reward_fn hook: a single score was broadcast to every reply, a [B, 1] column went on to a shape error
    mid-update, a short list to a traceback: each is one ConfigError before anything trains."""
    def bad(prompts, ids, mask, texts):
        scores = varied_reward(prompts, ids, mask, texts)
        return {"one": [1.0], "column": [[s] for s in scores], "short": scores[:-1]}[shape]

    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, reward_fn=bad)
    before = _flat(p for _, p in trainer.named_params["policy"])
    with pytest.raises(ConfigError, match=r"reward_fn gave scores of shape \(.*\) for \d+ responses: return one number"):
        trainer.step()
    assert torch.equal(before, _flat(p for _, p in trainer.named_params["policy"]))


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_a_gradient_that_is_not_finite_stops_the_run_before_the_adapters_step(tiny_models, adapters, prompts_file,
                                                                             tmp_path, estimator):
    """A diverged update (a learning rate far too high, logits over a tiny temperature): the gradient's norm is NaN, and
    the optimizer stepped on it, every weight of the adapter NaN, the run went on to save it and exit 0. Now one
    ConfigError naming the update, and no parameter moved."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--advantage_estimator", estimator,
                       *(["--num_samples_per_prompt", "2"] if estimator != "gae" else []))
    params = [p for _, p in trainer.named_params["policy"]]
    before = _flat(params)
    params[0].register_hook(lambda g: g * float("nan"))
    with pytest.raises(ConfigError, match=rf"{estimator} diverged at update 1: the gradient is nan .*lower learning_rate"):
        trainer.step()
    assert torch.equal(before, _flat(params))


def test_critic_warmup_holds_the_policys_lr_schedule_and_kl_controller_until_the_policy_trains(
        tiny_models, adapters, prompts_file, tmp_path):
    """The policy's linear decay runs over the updates it trains in (4 - 1 here), the value's over all 4; a frozen
    policy's KL (~0) does not move the adaptive controller. Before, one schedule stepped both groups from update 0."""
    lr = 1e-3
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--critic_warmup_updates", "1", "--total_updates",
                       "4", "--learning_rate", str(lr), "--lr_scheduler_type", "linear", "--warmup_updates", "0",
                       "--adaptive_kl", "true", "--kl_coef", "0.1")
    policy_lrs, value_lrs, kl_coefs = [], [], []
    for _ in range(3):
        policy_lrs.append(trainer.optimizer.param_groups[0]["lr"])
        value_lrs.append(trainer.optimizer.param_groups[1]["lr"])
        trainer.step()
        kl_coefs.append(trainer.kl_ctl.value)
    assert policy_lrs == pytest.approx([lr, lr, lr * 2 / 3]) and value_lrs == pytest.approx([lr, lr * 3 / 4, lr / 2])
    assert kl_coefs[0] == 0.1 and kl_coefs[1] != 0.1  # held during the warm-up, adapting once the policy trains


def test_critic_warmup_under_ranks_leaves_adamw_policy_state_alone(tiny_models, adapters, prompts_file, tmp_path):
    """Under several ranks the warm-up must step the policy's AdamW as one process does: not at all. A zero gradient
    summed across ranks would count as a step (weight decay moves the weights, bias correction shrinks the first real
    step). The rank sum is stood in for by identity (every rank holding the same rows: the global token mean is this
    rank's), so world 2 must give exactly world 1's parameters after a warm-up update and a real one."""
    from stages.ppo.rollout import collect

    args = ("--critic_warmup_updates", "1", "--optim", "adamw", "--weight_decay", "0.1", "--num_ppo_epochs", "1",
            "--critic_init", "rm")
    params = {}
    for world in (1, 2):
        trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path / str(world), *args)
        trainer.world, trainer._all_sum = world, lambda t: t.clone()
        ro = collect(trainer.stack, trainer.tokenizer, trainer.prompts[:4], trainer.prompt_ids[:4], trainer.cfg,
                     torch.Generator().manual_seed(0), None, trainer.top)
        policy0 = [p.detach().clone() for _, p in trainer.named_params["policy"]]
        for update in (0, 1):
            trainer.update = update
            trainer._optimise(ro, *trainer._advantages(ro)[:2])
            if update == 0:
                assert all(torch.equal(a, p) for a, (_, p) in zip(policy0, trainer.named_params["policy"]))
        assert any(not torch.equal(a, p) for a, (_, p) in zip(policy0, trainer.named_params["policy"]))
        params[world] = [p.detach().clone() for p in trainer.params]
    assert all(torch.equal(a, b) for a, b in zip(params[1], params[2]))


def test_vf_coef_scales_the_value_step(tiny_models, adapters, prompts_file, tmp_path):
    """The value loss enters the gradient times vf_coef. Under Adam that scale cancels (the policy and value adapters
    share no parameter), so plain SGD shows it: one step (critic warm-up: the policy stays put, and both runs sample
    the same rollout; critic_init rm: no least-squares refit of the head) moves the value adapter three times as far
    at vf_coef 0.3 as at 0.1."""
    steps = []
    for coef in ("0.1", "0.3"):
        trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path / coef, "--optim", "sgd", "--max_grad_norm", "0",
                           "--num_ppo_epochs", "1", "--critic_warmup_updates", "1", "--critic_init", "rm", "--vf_coef", coef)
        before = [p.detach().clone() for _, p in trainer.named_params["value"]]
        trainer.step()
        steps.append(torch.cat([(p.detach() - b).flatten() for b, (_, p) in zip(before, trainer.named_params["value"])]))
    assert steps[0].abs().max() > 1e-4  # far above the rounding allowed below
    torch.testing.assert_close(steps[1], 3 * steps[0], rtol=1e-3, atol=1e-7)  # float32 weights near 1: steps round at ~6e-8


@pytest.fixture
def bf16_profile(tiny_models, tmp_path):
    import yaml

    spec = yaml.safe_load(Path(tiny_models["llama"]).read_text())
    path = tmp_path / "llama-bf16.yaml"
    path.write_text(yaml.safe_dump({**spec, "dtype": "bfloat16"}))
    return path


def test_bf16_base_trains_fp32_adapters_and_heads(tiny_models, adapters, prompts_file, tmp_path, bf16_profile):
    """On a bf16 base every trainable tensor is fp32 (peft upcasts LoRA but not the value head), so one small AdamW
    step moves the head: in bf16 a 1e-5 step is below the weights' resolution and rounds away. With policy ==
    reference the logged KL is exactly 0, because the old log-probs are recomputed by the update's forward."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--learning_rate", "1e-5", profile=bf16_profile)
    lm = trainer.lm
    assert lm.get_input_embeddings().weight.dtype == torch.bfloat16  # the base really is bf16
    assert all(p.dtype == torch.float32 for p in trainer.params)
    head = lm.score.modules_to_save["value"].weight
    assert head.dtype == torch.float32 and trainer.cfg.recompute_old_logprobs is True
    head0 = head.detach().clone()
    trainer.cfg.critic_init, trainer.critic_fitted = "rm", True  # keep the head as loaded: only the step moves it
    metrics, _ = trainer.step()
    assert metrics["kl"] == 0.0, metrics["kl"]
    assert (head != head0).float().mean() > 0.9, "one lr 1e-5 step should move (nearly) every entry of the fp32 head"
    assert len(trainer.param_digest()) == 16


def test_old_logprobs_are_recomputed_unless_every_matmul_is_fp32():
    """recompute_old_logprobs: null turns on unless the policy computes in fp32: a bf16 base, a launch's autocast, and
    a 4-bit base (its matmuls run in bf16 even under a float32 profile, whose other layers stay fp32) all turn it on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.ppo.trainer import computes_in_fp32

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    assert computes_in_fp32(lm, "no")
    assert not computes_in_fp32(lm, "bf16")
    lm.hf_quantizer = object()  # what transformers sets on a model loaded with a quantization_config
    assert not computes_in_fp32(lm, "no")
    lm.hf_quantizer, lm.is_loaded_in_4bit = None, True
    assert not computes_in_fp32(lm, "no")
    lm.is_loaded_in_4bit = False
    assert computes_in_fp32(lm, "no") and not computes_in_fp32(lm.to(torch.bfloat16), "no")


def test_bf16_profile_runs_to_the_end(tiny_models, adapters, prompts_file, runs_dir, bf16_profile):
    """PPO on a bf16 base writes its outputs and manifest (it used to crash after the last update)."""
    sft, rm = adapters("llama")
    metrics = run_ppo(bf16_profile, runs_dir, "bf16", prompts_file, sft, rm, "--total_updates", "2")
    assert metrics["updates"] == 2 and metrics["ranks_in_sync"]
    outputs = json.loads((Path(runs_dir) / "bf16/ppo/manifest.json").read_text())["outputs"]
    # every output it names is there: 2 updates keep no policy (every 6th), and with sample_every 0 no samples are
    # written; `policies` and `samples` were named all the same
    assert "policies" not in outputs and [k for k, path in outputs.items() if not Path(path).exists()] == [], outputs
    assert all(math.isfinite(r["reward_raw"]) and math.isfinite(r["value_loss"]) for r in read_metrics(runs_dir, "bf16"))


def lm_head_output_dtypes(trainer) -> set:
    """Every dtype the policy's LM head gave while `trainer` ran one update (rollout, scoring, update)."""
    seen = set()
    handle = trainer.lm.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
    try:
        metrics, _ = trainer.step()
    finally:
        handle.remove()
    return seen, metrics


def test_the_launch_mixed_precision_runs_every_forward_under_bf16_autocast(tiny_models, adapters, prompts_file,
                                                                         tmp_path, monkeypatch):
    """The accelerate config's `mixed_precision: bf16` (configs/accelerate/multi_gpu.yaml), which the Trainer stages
    get from accelerate: PPO runs its rollout, scoring and update forwards under torch.autocast too. On the fp32 base,
    the LM head then gives bf16 logits (fp32 without it), the trained weights stay fp32 and move, and the old log-probs
    come from the update's own forward (recompute_old_logprobs), so with policy == reference the KL is exactly 0."""
    plain = _trainer(tiny_models, adapters, prompts_file, tmp_path / "no")
    assert lm_head_output_dtypes(plain)[0] == {torch.float32} and plain.cfg.recompute_old_logprobs is False
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path / "bf16")
    assert trainer.lm.get_input_embeddings().weight.dtype == torch.float32  # the base itself stays fp32
    before = [p.detach().clone() for p in trainer.params]
    seen, metrics = lm_head_output_dtypes(trainer)
    assert seen == {torch.bfloat16} and trainer.cfg.recompute_old_logprobs is True
    assert metrics["kl"] == 0.0 and math.isfinite(metrics["policy_loss"]) and math.isfinite(metrics["value_loss"])
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.params))


def test_fp16_mixed_precision_is_refused_before_the_run_folder(tiny_models, adapters, prompts_file, runs_dir,
                                                                monkeypatch):
    """fp16 autocast in training needs a loss scaler, which PPO's loop does not have: one error naming the fix, and
    nothing written."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    sft, rm = adapters("llama")
    with pytest.raises(ConfigError, match=r"fp16 mixed precision .*set `mixed_precision: bf16` or `no`"):
        run_ppo(tiny_models["llama"], runs_dir, "fp16", prompts_file, sft, rm, "--total_updates", "1")
    assert not (Path(runs_dir) / "fp16").exists()


def test_bf16_mixed_precision_runs_to_the_end_and_says_so(tiny_models, adapters, prompts_file, runs_dir, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    sft, rm = adapters("llama")
    metrics = run_ppo(tiny_models["llama"], runs_dir, "mixed", prompts_file, sft, rm, "--total_updates", "2")
    assert metrics["updates"] == 2 and metrics["mixed_precision"] == "bf16"
    assert all(math.isfinite(r["reward_raw"]) and math.isfinite(r["value_loss"]) for r in read_metrics(runs_dir, "mixed"))


# ------------------------------------------------------------------------------------------------ resume safety

def test_resume_only_from_the_same_upstream(tiny_models, adapters, prompts_file, runs_dir, tmp_path, capsys):
    sft, rm = adapters("llama")
    other_rm = _lora_adapter(yaml_model_dir(tiny_models["llama"]), ["q_proj", "v_proj"], tmp_path / "rm2", seed=5,
                             task_type="SEQ_CLS")
    args = (tiny_models["llama"], runs_dir, "up", prompts_file, sft)
    run_ppo(*args, rm, "--stop_after", "1")
    ckpt = Path(runs_dir) / "up/ppo/checkpoints/checkpoint-000001"
    assert json.loads((ckpt / "checkpoint.json").read_text())["upstream"]["rm"]
    with pytest.raises(ConfigError, match="--resume: checkpoint checkpoint-000001 was trained from other sft/rm adapters"
                                          ".*; run without --resume to start over, or resume with its settings$"):
        run_ppo(*args, other_rm, "--resume")
    assert ckpt.exists(), "a refused --resume must not delete the checkpoint"
    # an earlier version's checkpoint records nothing to resume with: the one fix is to start over
    info_file = ckpt / "checkpoint.json"
    kept = info_file.read_text()
    info_file.write_text(json.dumps({k: v for k, v in json.loads(kept).items() if k != "upstream"}))
    with pytest.raises(ConfigError, match="--resume: checkpoint checkpoint-000001 does not record what it was trained "
                                          "from; run without --resume to start over$"):
        run_ppo(*args, rm, "--resume")
    info_file.write_text(kept)
    capsys.readouterr()
    run_ppo(*args, other_rm)  # the retrained RM: start over, say why
    assert "trained from other sft/rm adapters" in capsys.readouterr().err
    assert [r["update"] for r in read_metrics(runs_dir, "up")] == [1, 2, 3]


def test_resume_only_with_the_same_settings_and_prompts(tiny_models, adapters, prompts_file, runs_dir, tmp_path, capsys):
    """An interrupted run started again with another kl_coef used to continue from the checkpoint, whose optimizer and
    KL controller kept the old values, while the manifest recorded the new ones. Now it starts over (and --resume is
    refused), as with other prompts; a change of how long it runs continues."""
    from pipeline.config import to_dict
    from stages.ppo import RESUME_SAFE, resume_mismatch, trained_from

    sft, rm = adapters("llama")
    args = (tiny_models["llama"], runs_dir, "set", prompts_file, sft, rm)
    run_ppo(*args, "--stop_after", "1", "--kl_coef", "0.25")
    with pytest.raises(ConfigError, match=r"--resume: checkpoint checkpoint-000001 was trained with other settings "
                                          r"\(kl_coef: 0.25 -> 0.05\)"):
        run_ppo(*args, "--kl_coef", "0.05", "--resume")
    capsys.readouterr()
    run_ppo(*args, "--kl_coef", "0.05")
    assert "was trained with other settings (kl_coef: 0.25 -> 0.05): starting over" in capsys.readouterr().err
    rows = read_metrics(runs_dir, "set")
    assert [r["update"] for r in rows] == [1, 2, 3] and {r["kl_coef"] for r in rows} == {0.05}
    # a longer run continues under a schedule that does not span total_updates; under linear (the default) the rate
    # would jump to the longer schedule's mid-run, so it starts over
    assert "total_updates" in RESUME_SAFE and "kl_coef" not in RESUME_SAFE and "seed" not in RESUME_SAFE
    before = json.loads((Path(runs_dir) / "set/ppo/checkpoints").glob("checkpoint-*").__next__().joinpath(
        "checkpoint.json").read_text())["upstream"]
    assert resume_mismatch(before, before) is None
    cfg, run = parse_args(ppo_args(*args[:4], *args[4:]))
    config = {"ppo": to_dict(cfg), "run": to_dict(run)}
    upstream = {k: before[k] for k in ("sft", "rm", "rm_members") if k in before}
    longer = lambda schedule, total: trained_from(upstream, {**config, "ppo": {**config["ppo"], "total_updates": total,  # noqa: E731
                                                            "lr_scheduler_type": schedule}}, [])
    assert resume_mismatch(longer("linear", 3), longer("linear", 6)) == \
        "was trained with other settings (total_updates: 3 -> 6)"
    assert resume_mismatch(longer("constant", 3), longer("constant", 6)) is None
    assert resume_mismatch(longer("constant_with_warmup", 3), longer("constant_with_warmup", 6)) is None
    assert resume_mismatch(before, {**before, "prompts": "0" * 16}) == \
        "was trained on other prompts (the prompt file's rows changed)"
    assert resume_mismatch({k: v for k, v in before.items() if k != "settings"}, before) == \
        "does not record the settings it was trained with"
    # a checkpoint of the version before the launch's mixed precision was recorded: it trained without autocast
    older = {**before, "settings": {k: v for k, v in before["settings"].items() if k != "mixed_precision"}}
    assert before["settings"]["mixed_precision"] == "no" and resume_mismatch(older, before) is None
    assert resume_mismatch(older, {**before, "settings": {**before["settings"], "mixed_precision": "bf16"}}) == \
        "was trained with other settings (mixed_precision: no -> bf16)"
    bf16 = {**before, "settings": {**before["settings"], "mixed_precision": "bf16"}}
    assert resume_mismatch(bf16, bf16) is None and resume_mismatch(bf16, before) == \
        "was trained with other settings (mixed_precision: bf16 -> no)"


def test_which_checkpoint_a_run_continues_from(tmp_path):
    """choose_resume: an interrupted run (a checkpoint, no manifest) continues when auto_resume is on, and starts
    over when it is off; a finished run (manifest written) starts over unless --resume; --resume onto a checkpoint
    trained from something else is refused, and without --resume that checkpoint is not used."""
    from types import SimpleNamespace

    from stages.ppo import PPOConfig, choose_resume

    stage = SimpleNamespace(dir=tmp_path, manifest_path=tmp_path / "manifest.json")
    upstream = {"sft": "s" * 16, "rm": "r" * 16, "settings": {"kl_coef": 0.05}, "prompts": "p" * 16}
    ckpt = tmp_path / "checkpoints/checkpoint-000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"")
    (ckpt / "checkpoint.json").write_text(json.dumps({"update": 2, "upstream": upstream}))
    cfg = lambda **kw: PPOConfig(total_updates=3, **kw)  # noqa: E731
    assert choose_resume(cfg(), stage, upstream) == ckpt
    assert choose_resume(cfg(auto_resume=False), stage, upstream) is None
    assert choose_resume(cfg(auto_resume=False, resume=True), stage, upstream) == ckpt
    other = {**upstream, "rm": "o" * 16}
    assert choose_resume(cfg(), stage, other) is None
    with pytest.raises(ConfigError, match="--resume: checkpoint checkpoint-000002 was trained from other sft/rm"):
        choose_resume(cfg(resume=True), stage, other)
    stage.manifest_path.write_text("{}")  # the run finished: a plain start trains afresh
    assert choose_resume(cfg(), stage, upstream) is None
    assert choose_resume(cfg(resume=True), stage, upstream) == ckpt
    empty = SimpleNamespace(dir=tmp_path / "empty", manifest_path=tmp_path / "empty/manifest.json")
    assert choose_resume(cfg(), empty, upstream) is None  # nothing to continue from: a fresh start
    with pytest.raises(ConfigError, match="--resume: there is no checkpoint under .* to continue from"):
        choose_resume(cfg(resume=True), empty, upstream)


def test_resume_checks_every_ensemble_member_the_profile_by_field_and_the_adapter_config(tmp_path):
    """A checkpoint trained against another ensemble member (its first, `rm`, the same) is not continued; a profile
    changed in one field is named by that field; an adapter's digest covers its adapter_config.json (another
    lora_alpha, the same weights, is another policy); disable_dropout zeroes every dropout PPO's ratio would see."""
    from stages.ppo import adapter_digest, disable_dropout, resume_mismatch

    settings = {"kl_coef": 0.05, "model_profile": {"dtype": "float32", "name_or_path": "models/tiny"}}
    before = {"sft": "s" * 16, "rm": "r" * 16, "rm_members": ["r" * 16, "m" * 16], "settings": settings,
              "prompts": "p" * 16}
    assert resume_mismatch(before, before) is None
    assert resume_mismatch(before, {**before, "rm_members": ["r" * 16, "n" * 16]}).startswith(
        "was trained from other sft/rm adapters")
    bf16 = {**before, "settings": {**settings, "model_profile": {**settings["model_profile"], "dtype": "bfloat16"}}}
    assert resume_mismatch(before, bf16) == "was trained with other settings (model_profile.dtype: float32 -> bfloat16)"

    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "adapter_config.json").write_text('{"lora_alpha": 16}')
    first = adapter_digest(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"lora_alpha": 32}')
    assert adapter_digest(tmp_path) != first

    model = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(2, 2))
    model[1].attention_dropout = 0.1
    disable_dropout(model)
    assert (model[0].p, model[1].attention_dropout) == (0.0, 0.0)


def test_a_longer_run_starts_over_under_every_schedule_that_spans_total_updates():
    """linear, cosine, cosine_with_restarts and polynomial are built over total_updates: rebuilt over another total, the
    rate would jump mid-run, so a changed total_updates is a mismatch; under constant (or inverse_sqrt) it continues."""
    from pipeline.config import to_dict
    from stages.ppo import PPOConfig, resume_mismatch, trained_from

    def record(schedule, total):
        config = {"ppo": to_dict(PPOConfig(lr_scheduler_type=schedule, total_updates=total)), "run": {}}
        return trained_from({"sft": "s" * 16, "rm": "r" * 16}, config, [])

    for schedule in ("linear", "cosine", "cosine_with_restarts", "polynomial"):
        assert resume_mismatch(record(schedule, 3), record(schedule, 6)) == \
            "was trained with other settings (total_updates: 3 -> 6)", schedule
    for schedule in ("constant", "constant_with_warmup", "inverse_sqrt"):
        assert resume_mismatch(record(schedule, 3), record(schedule, 6)) is None, schedule


def test_a_checkpoint_continues_only_under_its_number_of_processes():
    """Each process samples its own episodes: a run killed under one process and rerun under two resumed (a warning
    only), its first updates of 4 episodes and the rest of 8, its manifest saying two processes throughout. Another
    number of processes is a changed setting; a checkpoint that does not record it is taken as this run's."""
    from pipeline.config import to_dict
    from stages.ppo import PPOConfig, resume_mismatch, trained_from

    config = {"ppo": to_dict(PPOConfig()), "run": {}}
    record = lambda world: trained_from({"sft": "s" * 16, "rm": "r" * 16}, config, [], world)  # noqa: E731
    assert resume_mismatch(record(1), record(2)) == "was trained with other settings (world_size: 1 -> 2)"
    assert resume_mismatch(record(2), record(2)) is None
    older = record(1)
    del older["settings"]["world_size"]
    assert resume_mismatch(older, record(2)) is None


def test_a_log_line_cut_by_a_kill_does_not_stop_the_resume(tiny_models, adapters, prompts_file, runs_dir):
    """Killed while writing metrics.jsonl: its last line is half a row. The restarted run resumed into a JSONDecodeError
    traceback; now the cut line (past the checkpoint anyway) is dropped and the run ends as an uninterrupted one logs."""
    from stages.ppo.trainer import logged_rows

    sft, rm = adapters("llama")
    args = (tiny_models["llama"], runs_dir, "torn", prompts_file, sft, rm)
    run_ppo(*args, "--stop_after", "1")
    log = Path(runs_dir) / "torn/ppo/metrics.jsonl"
    with log.open("a") as f:
        f.write('{"update": 2, "reward_raw": 0.1')
    run_ppo(*args)
    assert [r["update"] for r in read_metrics(runs_dir, "torn")] == [1, 2, 3]
    log.write_text('{"update": 1}\n{"upd\n{"update": 2}\n')  # damage before the last line is not a kill's: refused
    with pytest.raises(ConfigError, match="metrics.jsonl line 2 is not JSON"):
        logged_rows(log)
    manifest = Path(runs_dir) / "torn/ppo/manifest.json"  # and by --resume before the finished run's manifest goes
    with pytest.raises(ConfigError, match="metrics.jsonl line 2 is not JSON"):
        run_ppo(*args, "--resume")
    assert manifest.is_file()
    # the error's other fix, a fresh start, reads no earlier line: it refused too, once the checkpoints were gone
    run_ppo(*args, "--auto_resume", "false")
    assert [r["update"] for r in read_metrics(runs_dir, "torn")] == [1, 2, 3]


def test_killed_after_the_last_checkpoint_writes_outputs_without_retraining(tiny_models, adapters, prompts_file,
                                                                           runs_dir, capsys):
    sft, rm = adapters("llama")
    args = (tiny_models["llama"], runs_dir, "late", prompts_file, sft, rm, "--total_updates", "2")
    run_ppo(*args)
    out = Path(runs_dir) / "late/ppo"
    adapter = (out / "adapter/adapter_model.safetensors").read_bytes()
    rows = read_metrics(runs_dir, "late")
    (out / "manifest.json").unlink()  # as if killed between the last checkpoint and the manifest
    capsys.readouterr()
    run_ppo(*args)
    assert "resumed from" in capsys.readouterr().err and (out / "checkpoints/checkpoint-000002").exists()
    assert read_metrics(runs_dir, "late") == rows and (out / "adapter/adapter_model.safetensors").read_bytes() == adapter


def test_the_edges_of_the_ranges_are_accepted():
    """The ranges are closed where the value still means something: no KL penalty, no discount, one-step GAE."""
    for flag, value in (("--kl_coef", "0"), ("--gamma", "1"), ("--gamma", "0"), ("--lam", "0"), ("--vf_coef", "0")):
        cfg = parse_args(["--config", "configs/ppo.yaml", f"{flag}={value}", "--total_updates", "3"])[0]
        assert getattr(cfg, flag[2:]) == float(value), flag


def yaml_model_dir(profile) -> str:
    import yaml

    return yaml.safe_load(Path(profile).read_text())["name_or_path"]


@pytest.mark.parametrize("flag,value,message", [
    ("--learning_rate", "-1e-3", "learning_rate must be > 0"), ("--kl_coef", "-0.1", "kl_coef must be >= 0"),
    ("--cliprange", "-0.2", "cliprange must be > 0"), ("--cliprange_value", "0", "cliprange_value must be > 0"),
    ("--vf_coef", "-1", "vf_coef must be >= 0"), ("--gamma", "-0.5", r"gamma must be in \[0, 1\]"),
    ("--gamma", "1.5", r"gamma must be in \[0, 1\]"),
    ("--lam", "1.5", r"lam must be in \[0, 1\]"), ("--reward_clip", "-1", "reward_clip must be >= 0"),
    ("--missing_eos_penalty", "-1", "missing_eos_penalty must be >= 0"), ("--max_grad_norm", "-1", "max_grad_norm must be >= 0"),
    ("--value_learning_rate", "0", "value_learning_rate must be > 0"), ("--critic_warmup_updates", "3",
                                                                        "critic_warmup_updates .* must be below total_updates"),
    ("--heldout_fraction", "1", r"heldout_fraction must be in \[0, 1\)"), ("--temperature", "0", r"temperature must be >= 0.0001 \(not 0.0\)"),
    ("--temperature", "1e-40", r"temperature must be >= 0.0001 .*logits divided by less overflow"),
    ("--advantage_estimator", "rloo", "compares answers to the same prompt: set num_samples_per_prompt to 2 or more"),
    ("--lr_scheduler_type", "bogus", "lr_scheduler_type 'bogus' is not a transformers scheduler PPO can step once per "
                                     r"update \(with no metric and no settings of its own\): use one of linear, cosine"),
    ("--lr_scheduler_type", "reduce_lr_on_plateau", "'reduce_lr_on_plateau' is not a transformers scheduler PPO can"),
    ("--lr_scheduler_type", "warmup_stable_decay", "'warmup_stable_decay' is not a transformers scheduler PPO can"),
    ("--response_length", "0", "response_length must be at least 1, got 0"),
    ("--forward_batch_size", "0", "forward_batch_size must be at least 1, got 0"),
    ("--kl_horizon", "0", "kl_horizon must be >= 1"),
    ("--value_trainable_layers", "-1", r"value_trainable_layers must be >= 0 \(0 = all layers\), got -1"),
    ("--learning_rate", "nan", "learning_rate must be a number, got nan"),
    ("--num_samples_per_prompt", "0", "num_samples_per_prompt must be at least 1, got 0"),
    ("--kl_target", "0", "kl_target must be > 0"), ("--adam_epsilon", "0", "adam_epsilon must be > 0"),
    ("--num_samples", "-1", "num_samples must be >= 0"),
    ("--heldout_fraction", "-0.1", r"heldout_fraction must be in \[0, 1\)"),
    ("--max_prompt_length", "0", "max_prompt_length must be at least 1, got 0"),
    ("--warmup_updates", "-1", "warmup_updates must be >= 0"), ("--entropy_coef", "-0.1", "entropy_coef must be >= 0"),
])
def test_out_of_range_hyperparameters_are_refused(flag, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", "configs/ppo.yaml", f"{flag}={value}", "--total_updates", "3"])


def test_settings_that_need_another_are_refused_without_it():
    """An adaptive KL controller starting from kl_coef 0 stays at 0 (it scales the coefficient), and a critic warm-up
    in a critic-free estimator warms nothing: each is one error at parse."""
    with pytest.raises(ConfigError, match="adaptive_kl needs kl_coef > 0 as its starting value"):
        parse_args(["--config", "configs/ppo.yaml", "--adaptive_kl", "true", "--kl_coef", "0"])
    with pytest.raises(ConfigError, match="critic_warmup_updates needs a critic: only advantage_estimator gae has one"):
        parse_args(["--config", "configs/grpo.yaml", "--critic_warmup_updates", "1"])
    assert parse_args(["--config", "configs/ppo.yaml", "--adaptive_kl", "true", "--kl_coef", "0.1"])[0].adaptive_kl


@pytest.mark.parametrize("config", ["configs/grpo.yaml", "configs/rloo.yaml", "configs/reinforce_pp.yaml"])
def test_whiten_rewards_is_refused_without_a_critic(config):
    """Unshifted reward whitening leaves every zero-reward token at mu (1 - 1/sigma): a critic-free estimator sums (or
    discounts) them, so a longer answer got a larger return and a group of equal scores non-zero advantages (k = 2:
    always +-1/sqrt(2)). Refused outside gae, which it is for (verl and TRL whiten only PPO's rewards)."""
    with pytest.raises(ConfigError, match="whiten_rewards needs a critic: only advantage_estimator gae has one"):
        parse_args(["--config", config, "--whiten_rewards", "true"])
    assert parse_args(["--config", "configs/ppo.yaml", "--whiten_rewards", "true"])[0].whiten_rewards


def test_bad_prompts_touch_nothing_of_an_earlier_run(tiny_models, adapters, prompts_file, runs_dir, tmp_path):
    sft, rm = adapters("llama")
    run_ppo(tiny_models["llama"], runs_dir, "keep", prompts_file, sft, rm, "--stop_after", "1")
    out = Path(runs_dir) / "keep/ppo"
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        run_ppo(tiny_models["llama"], runs_dir, "keep", empty, sft, rm)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    with pytest.raises(ConfigError, match="not a causal-LM policy adapter"):
        run_ppo(tiny_models["llama"], runs_dir, "keep", prompts_file, rm, rm)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_both_batches(tiny_models, adapters, prompts_file, tmp_path):
    """2 ranks x 4 episodes == 1 rank x 8 (the same episodes): advantages whitened globally, the loss a token mean over
    the global mini-batch (SGD parameter deltas equal), logged statistics global; for PPO (also whitening its
    rewards) and each critic-free estimator. Each rank samples its own prompts
    with its own generator. A checkpoint on nodes without a shared filesystem resumes exactly."""
    sft, rm = adapters("llama")
    out = tmp_path / "dist"
    args = [str(tiny_models["llama"]), str(sft), str(rm), str(prompts_file), str(out)]
    for n in (1, 2):
        res = run_module("tests.ppo_dist_check", args, processes=n)
        assert res.returncode == 0, "\n".join(l for l in res.stderr.splitlines() if "rank0" in l or n == 1)[-3000:]
    one = torch.load(out / "eq1-rank0.pt")
    two = [torch.load(out / f"eq2-rank{r}.pt") for r in (0, 1)]
    assert [t["rows"].tolist() for t in two] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # rows cut to 10, 9, ..., 3 tokens (ppo_dist_check.cut_rows_short): the ranks' token counts differ
    assert [int(t["mask"].sum()) for t in two] == [34, 18]
    m = one["mask"].bool()
    for t in two:  # advantages are whitened with global statistics: each rank's rows equal the single process's
        rows, w = t["rows"], t["mask"].shape[1]
        assert torch.allclose(t["adv"][t["mask"].bool()], one["adv"][rows][:, :w][m[rows][:, :w]], atol=1e-5)
    adv = one["adv"][m]
    assert abs(adv.mean()) < 1e-5 and abs(adv.std() - 1) < 1e-4  # globally mean 0, std 1
    assert two[0]["deltas"].keys() == one["deltas"].keys()
    moved = 0
    for name, d1 in one["deltas"].items():
        assert torch.equal(two[0]["deltas"][name], two[1]["deltas"][name]), f"ranks differ on {name}"
        # float32: weights near 1 round their steps at ~6e-8 (atol); seen at most 7.5e-8 apart
        assert torch.allclose(two[0]["deltas"][name], d1, rtol=1e-5, atol=1e-7), \
            f"{name}: 2 ranks moved {two[0]['deltas'][name].abs().max():.3g}, 1 rank {d1.abs().max():.3g}"
        moved += int(d1.abs().max() > 1e-6)
    assert moved > 10
    s1 = json.loads((out / "eq1-rank0.json").read_text())
    s2 = [json.loads((out / f"eq2-rank{r}.json").read_text()) for r in (0, 1)]
    assert s2[0] == s2[1]
    for key in ("reward_raw", "reward_std", "kl", "entropy", "explained_variance", "value_mean", "return_mean",
                "response_length", "no_eos_fraction", "policy_loss", "value_loss", "clipfrac_policy",
                "clipfrac_value", "approx_kl"):
        assert s2[0][key] == pytest.approx(s1[key], rel=1e-6, abs=1e-6), key  # seen: equal, or 1e-14 apart

    from tests.ppo_dist_check import VARIANTS

    for tag, flags in VARIANTS.items():  # whitening over every rank's episodes; grpo / rloo: whole groups per rank
        one = torch.load(out / f"{tag}1-rank0.pt")
        two = [torch.load(out / f"{tag}2-rank{r}.pt") for r in (0, 1)]
        m = one["mask"].bool()
        for t in two:
            rows, w = t["rows"], t["mask"].shape[1]
            assert torch.allclose(t["adv"][t["mask"].bool()], one["adv"][rows][:, :w][m[rows][:, :w]], atol=1e-5), tag
        assert one["adv"][m].abs().max() > 0.1, tag
        for name, d1 in one["deltas"].items():
            assert torch.equal(two[0]["deltas"][name], two[1]["deltas"][name]), f"{tag}: ranks differ on {name}"
            assert torch.allclose(two[0]["deltas"][name], d1, rtol=1e-5, atol=1e-7), f"{tag}: {name}"
        s1 = json.loads((out / f"{tag}1-rank0.json").read_text())
        s2 = json.loads((out / f"{tag}2-rank0.json").read_text())
        for key in ("reward_raw", "kl", "kl_k3", "entropy", "response_length", "policy_loss", "approx_kl"):
            assert s2[key] == pytest.approx(s1[key], rel=1e-6, abs=1e-6), (tag, key)
        if "--advantage_estimator" in flags:
            assert s1["kl"] > 0.01, tag  # the policy was moved off the reference: the KL terms matter

    streams = [json.loads((out / f"streams-rank{r}.json").read_text()) for r in (0, 1)]
    assert streams[0]["prompts"] + streams[1]["prompts"] == streams[0]["global_first_8"]  # disjoint slices, in order
    assert streams[0]["samples_of_one_prompt"] != streams[1]["samples_of_one_prompt"], "ranks sample with one seed"
    # groups of 2 answers per prompt: each rank holds whole groups, in the order of the global prompt stream
    groups = [s["group_prompts"] for s in streams]
    assert all(g[0::2] == g[1::2] for g in groups)
    assert groups[0][0::2] + groups[1][0::2] == streams[0]["global_first_4_groups"]

    ckpt = [json.loads((out / f"ckpt-rank{r}.json").read_text()) for r in (0, 1)]
    assert "trainer_state.pt" in ckpt[0]["files"] and ckpt[1]["files"] == ["rng_rank1.pt"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert [r["update"] for r in ckpt[0]["resumed"]] == [1, 2]
    assert strip(ckpt[0]["resumed"]) == strip(ckpt[0]["straight"])
    for c in ckpt:
        assert c["digests"][0] == c["digests"][1]
    assert ckpt[0]["digests"] == ckpt[1]["digests"]


def test_every_stop_id_ends_a_response(tiny_models, adapters, prompts_file, tmp_path, no_grad):
    """Instruct checkpoints list several EOS ids in generation_config (Llama 3: <|eot_id|>, <|eom_id|>, ...): any of
    them ends a PPO response and counts as ended. Here every token but one is made a stop id, so each response is
    exactly one token long and ended; with the tokenizer's EOS alone they run on."""
    from stages.ppo.rollout import collect

    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path)
    lm, tok = trainer.lm, trainer.tokenizer
    plain = collect(trainer.stack, tok, trainer.prompts[:6], trainer.prompt_ids[:6], trainer.cfg,
                    torch.Generator().manual_seed(0))
    assert plain.response_mask.sum(1).float().mean() > 2
    spare = tok.convert_tokens_to_ids("he")
    lm.generation_config.eos_token_id = [tok.eos_token_id] + [i for i in range(len(tok)) if i != spare]
    ro = collect(trainer.stack, tok, trainer.prompts[:6], trainer.prompt_ids[:6], trainer.cfg,
                 torch.Generator().manual_seed(0))
    lengths = ro.response_mask.sum(1).tolist()
    assert all(n == 1 or (n == 2 and r[0] == spare) for n, r in zip(lengths, ro.response_ids.tolist())), lengths
    assert bool(ro.ended.all())


# ------------------------------------------------------------------------------------------------ critic-free estimators

@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_build_no_value_adapter(estimator, tiny_models, adapters, prompts_file, runs_dir):
    """grpo / rloo / reinforce_pp: three adapters (no value), their own run folder, no value outputs; the toy
    reward's advantages are each group's (hand-checked formulas in test_ppo_losses.py) on whole groups."""
    sft, rm = adapters("llama")
    extra = ["--advantage_estimator", estimator, "--num_samples_per_prompt", "4", "--total_updates", "2"]
    if estimator == "grpo":
        extra += ["--use_kl_loss", "true"]
    metrics = run_ppo(tiny_models["llama"], runs_dir, "cf", prompts_file, sft, rm, *extra,
                      reward_fn=token_count_reward(7))
    out = Path(runs_dir) / "cf" / estimator
    manifest = json.loads((out / "manifest.json").read_text())
    assert "value_adapter" not in manifest["outputs"] and not (out / "value_adapter").exists()
    assert metrics["method"] == estimator and not (Path(runs_dir) / "cf/ppo").exists()
    assert not (out / "checkpoints/checkpoint-000002/value").exists()
    rows = read_metrics_of(out)
    assert all(r["value_loss"] is None and r["explained_variance"] is None for r in rows)
    if estimator == "grpo":
        assert all(r["kl_loss"] is not None for r in rows)


def test_a_jsonl_prompt_file_is_read_without_importing_datasets(tmp_path):
    """The RL stages read a .jsonl prompt file themselves: `datasets` (with pyarrow and pandas, ~100 MB resident for
    the process's life: the GRPO run's peak 760 -> ~670 MB) is never imported, and the rows are those datasets gives."""
    from tests.conftest import REPO

    script = (
        "import sys, json\n"
        "from transformers import AutoTokenizer\n"
        "from stages.ppo import PPOConfig, load_prompts\n"
        "tok = AutoTokenizer.from_pretrained('models/tiny')\n"
        "train, ids, held, notes = load_prompts(PPOConfig(prompts_file='data/story/ppo_prompts.jsonl', heldout_fraction=0.2), tok)\n"
        "print(json.dumps({'datasets': 'datasets' in sys.modules, 'train': train, 'held': held}))\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["datasets"] is False
    import datasets

    rows = datasets.load_dataset("json", data_files=str(REPO / "data/story/ppo_prompts.jsonl"), split="train")
    as_text = lambda conv: json.dumps([[m["role"], m["content"]] for m in conv])  # noqa: E731
    assert sorted(map(as_text, got["train"] + got["held"])) == sorted(as_text(r["prompt"]) for r in rows)


def read_metrics_of(stage_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_advantages_in_the_loop(estimator, tiny_models, adapters, prompts_file, tmp_path):
    from stages.ppo import losses as L

    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--advantage_estimator", estimator,
                       "--num_samples_per_prompt", "4", "--use_kl_loss", "true", reward_fn=token_count_reward(7))
    assert "value" not in trainer.stack.model.peft_config and trainer.trained == ("policy",)
    ro = trainer.rollout()
    assert [json.dumps(p) for p in ro.prompts[::4]] == [json.dumps(p) for p in ro.prompts[3::4]]  # groups of 4
    assert len({json.dumps(p) for p in ro.prompts[:4]}) == 1
    adv, returns, _ = trainer._advantages(ro)
    expected = L.group_advantages(trainer._scores(ro), 4, estimator)  # KL is a loss term: rewards = shaped scores
    mask = ro.response_mask.bool()
    assert torch.allclose(adv[mask], expected[:, None].expand_as(adv)[mask])
    assert trainer._optimise(ro, adv, returns)["value_loss"] is None


# ------------------------------------------------------------------------------------------------ shared prompts

def _grouped_rows(vocab: int, pad_id: int, k: int = 4):
    """Three prompts of different lengths (left-padded), each with k answers of lengths 1..12 (right-padded)."""
    from pipeline.generation import left_pad

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (9, 4, 14)]
    q_ids, q_mask = left_pad([p for p in prompts for _ in range(k)], pad_id)
    lengths = torch.tensor([1, 5, 12, 3, 7, 12, 2, 9, 4, 11, 6, 1][: len(prompts) * k])
    R = int(lengths.max())
    r_mask = (torch.arange(R)[None] < lengths[:, None]).long()
    r_ids = torch.where(r_mask.bool(), torch.randint(5, vocab, (len(lengths), R), generator=g), pad_id)
    return q_ids, q_mask, r_ids, r_mask


@pytest.mark.parametrize("arch", ARCHS)
def test_a_groups_prompt_runs_once_with_the_same_numbers(arch, tiny_models, adapters):
    """pack(group=k): each prompt runs once and its k answers continue from its KV cache. Log-probs, their
    gradients, rewards and values equal the row-by-row forward (stated tolerance 1e-5; gradients relative to their
    norm), for answers of 1..12 tokens after left-padded prompts of three lengths; rows that are not whole groups are
    refused."""
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack
    from stages.ppo.rollout import pack, response_logits, sample, sequence_scores, token_logprobs, token_values

    sft_dir, rm_dir = adapters(arch)
    profile = profile_from(tiny_models[arch])
    tok = load_tokenizer(profile)
    stack = build_stack(profile, tok, sft_dir, rm_dir, torch.device("cpu"), False, with_value=True)
    lm = stack.causal_lm
    rows = _grouped_rows(lm.config.vocab_size, tok.pad_token_id)
    single, shared = pack(*rows), pack(*rows, group=4)
    assert shared.group == 4 and torch.equal(single.tokens, shared.tokens)

    stack.use("policy")
    params = [p for n, p in stack.model.named_parameters() if p.requires_grad and ".policy." in n]
    assert params
    results = []
    for x in (single, shared):
        lp = token_logprobs(response_logits(lm, x), x.tokens, 0.7)
        stack.model.zero_grad()
        (lp * torch.linspace(-1, 1, lp.numel())).sum().backward()
        grads = [p.grad.clone() for p in params]
        with torch.no_grad():
            stack.use("reward")
            scores = torch.stack([sequence_scores(lm, x), sequence_scores(lm, x, "sum")])
            stack.use("value")
            values = token_values(lm, x)
            stack.use("policy")
        results.append((lp.detach(), grads, scores, values))
    (lp1, g1, s1, v1), (lp2, g2, s2, v2) = results
    assert lp1.shape == lp2.shape == (int(rows[3].sum()),)
    assert torch.allclose(lp1, lp2, atol=1e-5), (lp1 - lp2).abs().max()
    # Gradients reach 10 here: a float32 sum in another order rounds at ~1e-6 of that, so they are compared to their
    # norm (on one CPU the largest element differed by 2.2e-5 at a relative 1.3e-6)
    assert all((a - b).norm() <= 1e-5 * a.norm() for a, b in zip(g1, g2)), \
        [((a - b).norm() / a.norm()).item() for a, b in zip(g1, g2)]
    assert torch.allclose(s1, s2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)

    q_ids, q_mask, r_ids, r_mask = rows
    with pytest.raises(ValueError, match="not whole groups"):
        pack(q_ids[1:9], q_mask[1:9], r_ids[1:9], r_mask[1:9], group=4)

    # Sampling: the prefill runs each prompt once; same draws from the same generator, same log-probs.
    with torch.no_grad():
        drawn = [sample(lm, q_ids, q_mask, 12, 0.7, [tok.eos_token_id], tok.pad_token_id,
                        torch.Generator().manual_seed(3), group=g) for g in (1, 4)]
        with pytest.raises(ValueError, match="not whole groups"):
            sample(lm, q_ids[2:10], q_mask[2:10], 4, 0.7, [tok.eos_token_id], tok.pad_token_id, torch.Generator(), group=4)
    assert torch.equal(drawn[0].response_ids, drawn[1].response_ids)
    assert torch.allclose(drawn[0].logprobs, drawn[1].logprobs, atol=1e-5)


def test_a_groups_backward_adds_no_index_twice(tiny_models, adapters):
    """The grouped forward's backward adds into no element twice through an accumulating index_put_: on a CPU with
    2+ threads that adds repeated indices with atomics in an order thread timing decides, and two GRPO runs of one
    seed at once differed at ~1e-6 from update 2 (every prompt row was gathered once per answer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack
    from stages.ppo.rollout import pack, response_logits, token_logprobs

    arch = ARCHS[0]
    sft_dir, rm_dir = adapters(arch)
    profile = profile_from(tiny_models[arch])
    tok = load_tokenizer(profile)
    stack = build_stack(profile, tok, sft_dir, rm_dir, torch.device("cpu"), False, with_value=False)
    stack.use("policy")
    x = pack(*_grouped_rows(stack.causal_lm.config.vocab_size, tok.pad_token_id), group=4)

    class Accumulations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []  # (op, indices, unique indices) of every accumulating index_put_

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            accumulate = kwargs.get("accumulate", args[3] if len(args) > 3 else False)
            if name in ("index_put", "index_put_", "_index_put_impl_") and accumulate:
                idx = [i for i in args[1] if i is not None]
                if all(i.dtype != torch.bool for i in idx):  # a mask picks each element once
                    rows = torch.stack([i.reshape(-1) for i in torch.broadcast_tensors(*idx)])
                    self.seen.append((name, rows.shape[1], torch.unique(rows, dim=1).shape[1]))
            return func(*args, **kwargs)

    lp = token_logprobs(response_logits(stack.causal_lm, x), x.tokens, 0.7)
    with Accumulations() as mode:
        (lp * torch.linspace(-1, 1, lp.numel())).sum().backward()
    assert mode.seen, "no accumulating index_put_ ran: the probe sees nothing"
    assert all(n == unique for _, n, unique in mode.seen), mode.seen


def test_grpo_runs_each_prompt_once_in_scoring_and_update(tiny_models, adapters, prompts_file, tmp_path):
    """The loop uses the shared-prompt forward: the sampling prefill and every scoring and update forward that sees a
    prompt see each group's prompt once (a quarter of the rows); PPO with a critic (whole rows for its cached top
    layers) and gradient checkpointing (HF drops the KV cache there) keep row-by-row forwards, with the same
    numbers as the shared path."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--advantage_estimator", "grpo",
                       "--num_samples_per_prompt", "4", reward_fn=varied_reward)
    embed = trainer.lm.get_input_embeddings()
    seen: list[tuple[int, int, bool]] = []
    hook = embed.register_forward_hook(lambda m, inp, out: seen.append((*inp[0].shape, torch.is_grad_enabled())))
    ro = trainer.rollout()
    B = ro.response_ids.shape[0]
    prefill, *scoring = [s for s in seen if s[1] > 1]  # the sampling prefill is the first multi-token forward
    adv, returns, _ = trainer._advantages(ro)
    seen.clear()
    trainer._optimise(ro, adv, returns)
    hook.remove()
    micro = trainer.cfg.per_device_train_batch_size
    assert prefill[0] == B // 4 and scoring and {rows for rows, _, _ in scoring} == {B // 4, B}, (prefill, scoring)
    assert {(rows, grad) for rows, _, grad in seen} == {(micro // 4, True), (micro, True)}, seen

    gc = _trainer(tiny_models, adapters, prompts_file, tmp_path / "gc", "--advantage_estimator", "grpo",
                  "--num_samples_per_prompt", "4", "--gradient_checkpointing", "true", reward_fn=varied_reward)
    fresh = _trainer(tiny_models, adapters, prompts_file, tmp_path / "sh", "--advantage_estimator", "grpo",
                     "--num_samples_per_prompt", "4", reward_fn=varied_reward)
    assert gc.cfg.prompt_group == 1 and fresh.cfg.prompt_group == 4
    assert _trainer(tiny_models, adapters, prompts_file, tmp_path / "ppo").cfg.prompt_group == 1
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMING_KEYS}  # noqa: E731
    a, b = strip(fresh.step()[0]), strip(gc.step()[0])
    assert a.keys() == b.keys()
    for key, va in a.items():
        assert b[key] == (pytest.approx(va, rel=1e-5, abs=1e-5) if isinstance(va, float) else va), key  # seen: 1.5e-6


def test_a_sampling_call_takes_whole_groups(tiny_models, adapters, prompts_file, tmp_path):
    """generation_batch_size 6 with groups of 4 answers to one prompt: each sampling call takes whole groups (4 rows;
    6 would cut the second group in two, and the prefill runs each group's prompt once); so does each scoring
    forward at forward_batch_size 6 (the reference's and value's forwards run each prompt once too)."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--advantage_estimator", "grpo",
                       "--num_samples_per_prompt", "4", "--generation_batch_size", "6", "--forward_batch_size", "6",
                       reward_fn=varied_reward)
    ro = trainer.rollout()
    assert trainer.cfg.prompt_group == 4 and ro.response_ids.shape[0] == trainer.cfg.local_batch_size


def test_the_entropy_bonus_raises_the_entropy(tiny_models, adapters, prompts_file, tmp_path):
    """With every answer scoring the same, GRPO's advantages are 0 and the entropy bonus is the whole loss: the
    sampling entropy rises over updates (a bonus with its sign lost would lower it)."""
    same = lambda prompts, ids, mask, texts: torch.zeros(len(ids))  # noqa: E731
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--advantage_estimator", "grpo",
                       "--num_samples_per_prompt", "4", "--use_kl_loss", "false", "--kl_coef", "0",
                       "--entropy_coef", "1.0", "--learning_rate", "1e-2", "--num_ppo_epochs", "2", reward_fn=same)
    entropy = [trainer.step()[0]["entropy"] for _ in range(3)]
    assert entropy[2] > entropy[0] + 0.05, entropy


def test_the_entropy_bonus_keeps_the_kl_loss_term(tiny_models, adapters, prompts_file, tmp_path):
    """GRPO's KL loss term with the optional entropy bonus: both enter the loss. Update 1 starts at the reference
    (the k3 term's gradient is 0 there), so two runs that differ only in kl_coef part from update 2 on."""
    snapshots = []
    for kl_coef in ("0.2", "5.0"):
        trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path / kl_coef, "--advantage_estimator", "grpo",
                           "--num_samples_per_prompt", "4", "--use_kl_loss", "true", "--entropy_coef", "0.01",
                           "--num_ppo_epochs", "1", "--kl_coef", kl_coef, reward_fn=varied_reward)
        weights = lambda: torch.cat([p.detach().flatten() for _, p in trainer.named_params["policy"]])  # noqa: E731
        trainer.step()
        after_one = weights()
        trainer.step()
        snapshots.append((after_one, weights()))
    (one_a, two_a), (one_b, two_b) = snapshots
    assert (one_a - one_b).abs().max() < 1e-4  # only float noise: policy == reference during update 1
    assert (two_a - two_b).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ reward ensembles

def test_an_ensemble_reward_is_the_mean_of_its_standardised_members(tiny_models, adapters, prompts_file, runs_dir,
                                                                    tmp_path, no_grad):
    """With an rm stage of two members, the rollout's raw reward is (s0 - m0) / sd0 + (s1 - m1) / sd1, halved, where
    s_i is what each reward model alone gives by its own pooling (member 0 the last token, member 1 the sum), on
    the chat-formatted text and on the policy's own tokens (left-padded prompts); the stage trains from such a
    manifest and will resume only onto the same members."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from pipeline.adapters import pool_in_forward, read_pooling, reward_members, write_pooling
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack, load_prompts
    from stages.ppo.rollout import collect

    sft, rm = adapters("llama")
    other = _lora_adapter(yaml_model_dir(tiny_models["llama"]), ["q_proj", "v_proj"], tmp_path / "rm-b", seed=5,
                          task_type="SEQ_CLS")
    write_pooling(other, "sum")
    stats = [(0.5, 2.0), (-1.0, 0.5)]
    members = {"reward": rm, "reward-1": other}
    cfg, run = parse_args(ppo_args(tiny_models["llama"], tmp_path, "x", prompts_file))
    profile = profile_from(run.model_config)
    tok = load_tokenizer(profile)
    prompts, ids, _, _ = load_prompts(cfg, tok)
    stack = build_stack(profile, tok, sft, rm, torch.device("cpu"), False, reward_ensemble=(members, stats))
    alone = []
    for d in (rm, other):
        base = AutoModelForSequenceClassification.from_pretrained(profile.name_or_path, num_labels=1)
        base.config.pad_token_id = tok.pad_token_id
        alone.append(pool_in_forward(PeftModel.from_pretrained(base, str(d)).eval(), read_pooling(d)))
    assert stack.pooling == {"reference": "last", "policy": "last", "reward": "last", "reward-1": "sum", "value": "last"}

    def by_hand(seqs, prompt_lengths):
        """Each model alone, one unpadded sequence at a time; the summing member's score is the reply's: the whole
        sequence's less its prompt's (causal attention)."""
        one = lambda m, s: m(input_ids=torch.tensor([s])).logits[0, 0].item()  # noqa: E731
        each = [torch.tensor([one(alone[0], s) for s in seqs]),
                torch.tensor([one(alone[1], s) - one(alone[1], s[:n]) for s, n in zip(seqs, prompt_lengths)])]
        return ((each[0] - 0.5) / 2.0 + (each[1] + 1.0) / 0.5) / 2

    ro = collect(stack, tok, prompts[:5], ids[:5], cfg, torch.Generator().manual_seed(0))
    chats = [list(tok.apply_chat_template(p + [{"role": "assistant", "content": t}], tokenize=True, return_dict=False))
             for p, t in zip(ro.prompts, ro.texts)]
    headers = [len(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False))
               for p in ro.prompts]
    assert all(c[:n] == list(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False))
               for c, n, p in zip(chats, headers, ro.prompts))  # this template: the prompt is a prefix of the chat
    torch.testing.assert_close(ro.scores_raw, by_hand(chats, headers), atol=1e-5, rtol=1e-5)
    cfg.reward_input = "tokens"
    ro = collect(stack, tok, prompts[:5], ids[:5], cfg, torch.Generator().manual_seed(0))
    queries = [ro.query_ids[i][ro.query_mask[i].bool()].tolist() for i in range(5)]
    own = [q + ro.response_ids[i][ro.response_mask[i].bool()].tolist() for i, q in enumerate(queries)]
    torch.testing.assert_close(ro.scores_raw, by_hand(own, [len(q) for q in queries]), atol=1e-5, rtol=1e-5)

    # The stage, from an rm manifest that lists both members
    def upstream(second: Path):
        _upstream_manifests(runs_dir, "ens", sft, rm)
        r = StageRun("rm", "ens", str(runs_dir))
        r.prepare({})
        r.finish({"adapter": rm, "members": json.dumps([str(rm), str(second)])},
                 {"reward_mean": 0.1, "reward_std": 2.0,
                  "members": [{"reward_mean": m, "reward_std": s} for m, s in stats]}, {})
        return json.loads((r.dir / "manifest.json").read_text())

    assert reward_members(upstream(other)) == ({"reward": str(rm), "reward-1": str(other)}, stats)
    run_ppo(tiny_models["llama"], runs_dir, "ens", prompts_file, None, None, "--stop_after", "1")
    # normalize_reward: the shaped score is (raw - reward_mean) / reward_std with the rm manifest's (0.1, 2.0), less the
    # missing-EOS penalty (no score here comes near the clip)
    first = read_metrics(runs_dir, "ens")[0]
    assert first["reward"] == pytest.approx((first["reward_raw"] - 0.1) / 2.0
                                            - cfg.missing_eos_penalty * first["no_eos_fraction"], rel=1e-5, abs=1e-6)
    ckpt = Path(runs_dir) / "ens/ppo/checkpoints/checkpoint-000001"
    assert len(json.loads((ckpt / "checkpoint.json").read_text())["upstream"]["rm_members"]) == 2
    third = _lora_adapter(yaml_model_dir(tiny_models["llama"]), ["q_proj", "v_proj"], tmp_path / "rm-c", seed=6,
                          task_type="SEQ_CLS")
    upstream(third)  # member 1 retrained, member 0 the same: not the reward this checkpoint was trained on
    with pytest.raises(ConfigError, match="trained from other sft/rm adapters"):
        run_ppo(tiny_models["llama"], runs_dir, "ens", prompts_file, None, None, "--resume")


def test_a_reward_member_or_adapter_that_is_no_reward_model_is_refused_before_the_run_folder(tiny_models, adapters,
                                                                                              runs_dir, prompts_file,
                                                                                              tmp_path):
    """Every member of an rm ensemble is checked to be a SEQ_CLS adapter, not only the first (a policy adapter listed
    as member 2 would be summed into the reward); and a reward adapter whose config names no task but carries no score
    head is refused by build_stack, not trained on."""
    import shutil

    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack

    sft, rm = adapters("llama")
    _upstream_manifests(runs_dir, "wrong", sft, rm, more_rms=(sft,))
    with pytest.raises(ConfigError, match=rf"reward adapter {sft} is not a reward model"):
        run_ppo(tiny_models["llama"], runs_dir, "wrong", prompts_file)
    assert not (Path(runs_dir) / "wrong" / "ppo").exists()

    headless = Path(shutil.copytree(sft, tmp_path / "headless"))
    config = json.loads((headless / "adapter_config.json").read_text())
    config.pop("task_type", None)
    (headless / "adapter_config.json").write_text(json.dumps(config))
    profile = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(profile)
    with pytest.raises(ConfigError, match=r"carries no `score` head: it must be the rm stage's SEQ_CLS adapter"):
        build_stack(profile, tok, sft, headless, torch.device("cpu"), False)


# ------------------------------------------------------------------------------------------------ update rules

def _perturb(params, scale: float = 0.5, seed: int = 0) -> None:
    """Relative noise on adapter weights: each tensor moves by scale x its mean magnitude x N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))


def _move_off_the_reference(trainer) -> None:
    """A fresh trainer's policy is the reference, where every KL is 0 and the k3 term's gradient vanishes."""
    _perturb(p for _, p in trainer.named_params["policy"])


def _kl_per_answer(ro) -> tuple[torch.Tensor, torch.Tensor]:
    """Each answer's k1 (log-ratio) and k3 KL estimates to the reference, summed over its tokens."""
    from stages.ppo import losses as L

    m = ro.response_mask.float()
    return ((ro.logprobs - ro.ref_logprobs) * m).sum(1), (L.kl_k3(ro.logprobs, ro.ref_logprobs) * m).sum(1)


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in params])


def test_the_kl_loss_term_pulls_the_policy_towards_the_reference(tiny_models, adapters, prompts_file, tmp_path):
    """GRPO's use_kl_loss: the loss is the clipped surrogate + kl_coef * L.kl_loss (k3 summed / tokens). With every
    answer scoring the same the advantages are 0 and the surrogate gives no gradient, so one plain SGD step (its first
    step is the gradient itself; no clipping; one epoch, one mini-batch) moves the policy by exactly
    -lr * kl_coef * grad L.kl_loss(policy log-probs, reference log-probs, token count) on the rollout, i.e. down the
    KL; the logged kl_loss is that term's value. The policy starts off the reference (there the gradient is 0)."""
    from stages.ppo import losses as L
    from stages.ppo.rollout import response_logits, token_logprobs

    same = lambda prompts, ids, mask, texts: torch.zeros(len(ids))  # noqa: E731
    lr, kl_coef = 1e-2, 2.0
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--advantage_estimator", "grpo",
                       "--num_samples_per_prompt", "4", "--use_kl_loss", "true", "--kl_coef", str(kl_coef),
                       "--optim", "sgd", "--max_grad_norm", "0", "--num_ppo_epochs", "1", "--learning_rate", str(lr),
                       reward_fn=same)
    _move_off_the_reference(trainer)
    params = [p for _, p in trainer.named_params["policy"]]
    ro = trainer.rollout()
    adv, returns, _ = trainer._advantages(ro)
    assert not adv.any()
    x = ro.rows(torch.arange(ro.response_ids.shape[0]), trainer.cfg.prompt_group)
    width = x.response_mask.shape[1]
    trainer.stack.use("policy")
    with torch.enable_grad():
        new_lp = token_logprobs(response_logits(trainer.lm, x), x.tokens, trainer.cfg.temperature)
        term = L.kl_loss(new_lp, ro.ref_logprobs[:, :width][x.response_mask], x.num_tokens)
        grads = torch.autograd.grad(term, params, allow_unused=True)
    expected = -lr * kl_coef * torch.cat([(torch.zeros_like(p) if g is None else g).double().flatten()
                                          for g, p in zip(grads, params)])
    assert term.item() > 0.05 and expected.norm() > 1e-4  # really off the reference
    before = _flat(params)
    out = trainer._optimise(ro, adv, returns)
    step = _flat(params) - before
    assert (step - expected).norm() <= 1e-3 * expected.norm(), ((step - expected).norm(), expected.norm())
    assert out["kl_loss"] == pytest.approx(term.item(), rel=1e-4)


def test_the_value_update_adds_the_fitted_offset(tiny_models, adapters, prompts_file, tmp_path):
    """critic_init fit: the first rollout's least-squares fit scales the head by a and adds b (value_offset) to its
    output from then on, in the rollout and in the update alike. At the first mini-batch nothing has moved yet, so the
    update's predictions are the rollout's values: with one epoch and one mini-batch the logged value loss equals
    L.value_loss(values, values, returns) over the rollout's tokens."""
    from stages.ppo import losses as L

    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--num_ppo_epochs", "1",
                       reward_fn=varied_reward)
    ro = trainer.rollout()
    adv, returns, _ = trainer._advantages(ro)
    assert abs(trainer.value_offset) > 0.1, trainer.value_offset  # an offset that matters
    m = ro.response_mask.bool()
    expected, _ = L.value_loss(ro.values[m], ro.values[m], returns[m], trainer.cfg.cliprange_value)
    out = trainer._optimise(ro, adv, returns)
    assert out["value_loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_critic_free_advantages_sum_each_answers_token_rewards(tiny_models, adapters, prompts_file, tmp_path):
    """rloo / grpo with the KL penalty in the reward (use_kl_loss false): an answer's sequence score is the *sum* of
    its per-token rewards, shaped score - kl_coef * sum_t k1_t (longer answers pay more KL), and its advantage is
    L.group_advantages of those sums, on every real token. The logged kl is k1 summed per answer and averaged over
    the answers (kl_k3 the same of k3)."""
    from stages.ppo import losses as L

    kl_coef = 0.5
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--advantage_estimator", "rloo",
                       "--num_samples_per_prompt", "4", "--use_kl_loss", "false", "--kl_coef", str(kl_coef),
                       reward_fn=varied_reward)
    _move_off_the_reference(trainer)
    tok = trainer.tokenizer  # every 7th token id also ends an answer: answers of many lengths
    trainer.lm.generation_config.eos_token_id = [tok.eos_token_id] + list(range(7, len(tok), 7))
    ro = trainer.rollout()
    m = ro.response_mask.float()
    k1, k3 = _kl_per_answer(ro)
    lengths = m.sum(1).view(-1, 4)
    assert (lengths.max(1).values > lengths.min(1).values).any() and k1.abs().mean() > 0.1  # the rule matters here
    for estimator in ("rloo", "grpo"):
        trainer.cfg.advantage_estimator = estimator
        adv, _, stats = trainer._advantages(ro)
        expected = L.group_advantages(trainer._scores(ro) - kl_coef * k1, 4, estimator)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(adv, expected[:, None] * m, atol=1e-5, rtol=1e-5)
        assert stats["kl"] == pytest.approx(k1.mean().item(), rel=1e-5)
        assert stats["kl_k3"] == pytest.approx(k3.mean().item(), rel=1e-5)


def test_whitened_gae_advantages_have_mean_0_and_std_1(tiny_models, adapters, prompts_file, tmp_path):
    """whiten_advantages: the GAE advantages are (A - mean) / std over the response tokens (unbiased std), so they
    have mean 0 and std 1 there, and 0 on padding. critic_init rm (the raw RM head, not refitted) keeps the raw
    advantages' mean clearly away from 0."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--critic_init", "rm", reward_fn=varied_reward)
    ro = trainer.rollout()
    adv, _, _ = trainer._advantages(ro)
    trainer.cfg.whiten_advantages = False
    raw, _, _ = trainer._advantages(ro)
    m = ro.response_mask.bool()
    assert abs(raw[m].mean()) > 0.05, raw[m].mean()
    torch.testing.assert_close(adv[m], (raw[m] - raw[m].mean()) / raw[m].std(), atol=1e-4, rtol=1e-4)
    assert abs(adv[m].mean()) < 1e-5 and abs(adv[m].std() - 1) < 1e-4 and not adv[~m].any()


def test_the_adaptive_kl_controller_follows_the_logged_k1_kl(tiny_models, adapters, prompts_file, tmp_path):
    """adaptive_kl: after an update beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * episodes / horizon), KL the
    update's logged kl: the k1 log-ratio summed per answer, averaged over the rollout (not k3's). The target is set
    near the rollout's KL, so the error is not clipped and k1 and k3 give different coefficients."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--adaptive_kl", "true", "--kl_coef", "0.1",
                       "--kl_horizon", "100", "--num_ppo_epochs", "1", reward_fn=varied_reward)
    _move_off_the_reference(trainer)
    ro = trainer.rollout()
    k1, k3 = (k.mean().item() for k in _kl_per_answer(ro))
    target = k1 * 1.1
    assert k1 > 0.1 and abs(k3 - k1) > 0.02 * k1, (k1, k3)
    trainer.kl_ctl.target = target
    trainer.rollout = lambda: ro  # this update trains on the rollout measured above
    metrics, _ = trainer.step()
    assert metrics["kl"] == pytest.approx(k1, rel=1e-6)
    n = trainer.cfg.local_batch_size
    assert trainer.kl_ctl.value == pytest.approx(0.1 * (1 + max(min(k1 / target - 1, 0.2), -0.2) * n / 100), rel=1e-6)


def test_the_missing_eos_penalty_holds_with_and_without_stop_at_eos(tiny_models, adapters, prompts_file, tmp_path):
    """stop_at_eos false: every response runs response_length tokens, and one with no stop token anywhere in them pays
    missing_eos_penalty, as in TRL (`scores[~contain_eos_token] -= missing_eos_penalty`); with stop_at_eos true, one
    that never stopped pays it."""
    from pipeline.generation import stop_token_ids
    from stages.ppo import losses as L

    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--stop_at_eos", "false",
                       "--missing_eos_penalty", "0.75", reward_fn=varied_reward)
    cfg = trainer.cfg
    ro = trainer.rollout()
    assert (ro.response_mask.sum(1) == cfg.response_length).all() and (~ro.ended).any()
    stop_ids = torch.tensor(stop_token_ids(trainer.tokenizer, trainer.lm))
    assert torch.equal(ro.ended, torch.isin(ro.response_ids, stop_ids).any(1))
    unpenalised = L.shape_scores(ro.scores_raw, ro.ended, None, cfg.reward_clip, 0.0)
    assert torch.equal(trainer._scores(ro), unpenalised - 0.75 * (~ro.ended).float())
    cfg.stop_at_eos = True
    assert torch.equal(trainer._scores(ro), unpenalised - 0.75 * (~ro.ended).float())


def test_the_value_adapter_has_its_own_learning_rate(tiny_models, adapters, prompts_file, tmp_path):
    """value_learning_rate: the optimizer's second parameter group holds exactly the value adapter's trainable
    tensors at that rate; the first holds the policy's at learning_rate (and without it, the value uses learning_rate)."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--learning_rate", "3e-3",
                       "--value_learning_rate", "2e-4", "--adam_epsilon", "1e-3")
    policy, value = trainer.optimizer.param_groups
    assert policy["eps"] == value["eps"] == 1e-3  # the config's adam_epsilon (1e-5 by default), not torch's 1e-8
    assert [id(p) for p in policy["params"]] == [id(p) for _, p in trainer.named_params["policy"]]
    assert [id(p) for p in value["params"]] == [id(p) for _, p in trainer.named_params["value"]]
    assert policy["lr"] == 3e-3 and value["lr"] == 2e-4
    same = _trainer(tiny_models, adapters, prompts_file, tmp_path / "same", "--learning_rate", "3e-3")
    assert [g["lr"] for g in same.optimizer.param_groups] == [3e-3, 3e-3]


def test_warmup_updates_ramp_both_learning_rates_up_from_0(tiny_models, adapters, prompts_file, tmp_path):
    """warmup_updates: the schedule's warm-up (transformers' get_scheduler) starts each parameter group at 0 and
    reaches its rate after that many updates; without it the first update runs at the full rate."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--learning_rate", "4e-3", "--value_learning_rate",
                       "2e-3", "--warmup_updates", "2", "--lr_scheduler_type", "constant_with_warmup")
    seen = []
    for _ in range(3):
        seen.append([g["lr"] for g in trainer.optimizer.param_groups])
        trainer.scheduler.step()
    assert seen == [[0.0, 0.0], [pytest.approx(2e-3), pytest.approx(1e-3)], [pytest.approx(4e-3), pytest.approx(2e-3)]]
    none = _trainer(tiny_models, adapters, prompts_file, tmp_path / "none", "--learning_rate", "4e-3",
                    "--lr_scheduler_type", "constant_with_warmup")
    assert [g["lr"] for g in none.optimizer.param_groups] == [4e-3, 4e-3]


def test_the_joint_gradient_is_clipped_to_max_grad_norm(tiny_models, adapters, prompts_file, tmp_path):
    """max_grad_norm clips the joint policy + value gradient: with plain SGD (first step = the gradient), one epoch
    and one mini-batch, a gradient far above the limit moves all trainable tensors together by exactly
    lr * max_grad_norm (L2), and the logged grad_norm is the norm before clipping."""
    lr, limit = 1.0, 0.02
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--optim", "sgd", "--learning_rate", str(lr),
                       "--max_grad_norm", str(limit), "--num_ppo_epochs", "1", reward_fn=varied_reward)
    ro = trainer.rollout()
    adv, returns, _ = trainer._advantages(ro)  # the critic fit rescales the head: before the snapshot
    before = _flat(trainer.params)
    out = trainer._optimise(ro, adv, returns)
    assert out["grad_norm"] > 20 * limit, out["grad_norm"]
    assert (_flat(trainer.params) - before).norm().item() == pytest.approx(lr * limit, rel=1e-3)
    # max_grad_norm 0 (no clipping): the whole gradient is the step, and grad_norm still logs its norm (it read 0)
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path / "off", "--optim", "sgd", "--learning_rate",
                       str(lr), "--max_grad_norm", "0", "--num_ppo_epochs", "1", reward_fn=varied_reward)
    ro = trainer.rollout()
    adv, returns, _ = trainer._advantages(ro)
    before = _flat(trainer.params)
    out = trainer._optimise(ro, adv, returns)
    assert out["grad_norm"] > 20 * limit
    assert (_flat(trainer.params) - before).norm().item() == pytest.approx(lr * out["grad_norm"], rel=1e-3)


def test_each_pass_over_the_prompts_has_its_own_permutation(tiny_models, adapters, prompts_file, tmp_path):
    """Episode i's prompt is randperm(n, seed + 1_000_003 x pass)[i mod n] with pass = i // n: each pass visits every
    prompt once, in a new order, and no pass of one seed is a pass of the next seed (seed + pass would make seed s's
    second pass seed s + 1's first: a seed sweep sharing its prompt orders)."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path)
    n = len(trainer.prompt_ids)
    got = [trainer._prompt_index(i) for i in range(3 * n)]
    for e in range(3):
        expected = torch.randperm(n, generator=torch.Generator().manual_seed(trainer.cfg.seed + 1_000_003 * e)).tolist()
        assert got[e * n : (e + 1) * n] == expected
    assert got[:n] != got[n : 2 * n]
    trainer.cfg.seed, trainer._perm_cache = trainer.cfg.seed + 1, {}
    next_seed = [trainer._prompt_index(i) for i in range(3 * n)]
    assert all(next_seed[:n] != got[e * n : (e + 1) * n] for e in range(3))


def test_the_mini_batches_of_an_epoch_partition_the_batch(tiny_models, adapters, prompts_file, tmp_path, monkeypatch):
    """num_mini_batches > 1: every epoch draws a permutation of the batch (torch.randperm from the trainer's
    permutation generator) and mini-batch m trains rows perm[m * size : (m + 1) * size], so each row is trained once
    per epoch, in a different split every epoch. The logged policy loss and grad norm are means over the optimizer
    steps (4 here), not sums."""
    from stages.ppo import losses as L
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--gradient_accumulation_steps", "1",
                       "--num_mini_batches", "2", "--num_ppo_epochs", "2", "--cliprange_value", "1e-4",
                       reward_fn=varied_reward)  # a narrow value clip: the second epoch's values clip (clipfrac > 0)
    ro = trainer.rollout()
    adv, returns, _ = trainer._advantages(ro)
    B, micro = ro.response_ids.shape[0], trainer.cfg.per_device_train_batch_size
    gen = torch.Generator()
    gen.set_state(trainer.perm_gen.get_state())
    expected = []
    for _ in range(2):
        perm = torch.randperm(B, generator=gen).tolist()
        expected += [sorted(perm[: B // 2]), sorted(perm[B // 2 :])]
    seen: list[list[int]] = []
    rows = ro.rows
    ro.rows = lambda idx, group=1: seen.append(idx.tolist()) or rows(idx, group)  # noqa: E731
    norms, losses, value_losses, tokens = [], [], [], []
    clip, policy_loss, value_loss = torch.nn.utils.clip_grad_norm_, L.policy_loss, L.value_loss
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: norms.append(float(clip(*a, **k))) or norms[-1])
    monkeypatch.setattr(L, "policy_loss", lambda *a, **k: tokens.append(a[0].numel()) or losses.append(policy_loss(*a, **k))
                        or losses[-1])
    monkeypatch.setattr(L, "value_loss", lambda *a, **k: value_losses.append(value_loss(*a, **k)) or value_losses[-1])
    out = trainer._optimise(ro, adv, returns)
    assert B // 2 == micro and len(seen) == 4  # one micro-batch per mini-batch: seen[i] is mini-batch i
    assert len(norms) == len(losses) == len(value_losses) == 4 and out["grad_norm"] == pytest.approx(sum(norms) / 4)
    assert out["policy_loss"] == pytest.approx(sum(pg.item() for pg, _ in losses) / 4)
    assert out["value_loss"] == pytest.approx(sum(vl.item() for vl, _ in value_losses) / 4)
    # the clip fractions and approx_kl are token means over the update's micro-batches, not means over its steps
    assert any(s["clipfrac"] > 0 for _, s in losses[1:]) and any(s["approx_kl"] > 0 for _, s in losses[1:])
    assert any(s["clipfrac"] > 0 for _, s in value_losses[1:])
    for key, recorded, stat in (("clipfrac_policy", losses, "clipfrac"), ("clipfrac_value", value_losses, "clipfrac"),
                                ("approx_kl", losses, "approx_kl")):
        by_hand = sum(s[stat].item() * n for (_, s), n in zip(recorded, tokens)) / sum(tokens)
        assert out[key] == pytest.approx(by_hand, rel=1e-9, abs=1e-12)
    assert [sorted(s) for s in seen] == expected
    assert expected[0] != expected[2] or expected[1] != expected[3]  # the seed gives different splits per epoch


def test_chunks_with_different_prompt_widths_stay_left_padded(tiny_models, adapters, prompts_file, tmp_path, no_grad):
    """Sampling in chunks (generation_batch_size) whose prompts have different widths: the rollout's queries are left
    padded to the widest, exactly as one left_pad of all prompts, and the reference (= policy here) log-probs of that
    layout equal the sampling ones."""
    from pipeline.generation import left_pad
    from stages.ppo.rollout import _cat_left, _cat_right, collect

    a, b = torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5, 6]])
    assert _cat_left([a, b], 0).tolist() == [[0, 0, 1, 2], [3, 4, 5, 6]]
    assert _cat_right([a, b], 9).tolist() == [[1, 2, 9, 9], [3, 4, 5, 6]]  # responses: padded after their tokens
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--generation_batch_size", "2")
    ids = trainer.prompt_ids[:6]
    assert len({max(len(p) for p in ids[s : s + 2]) for s in (0, 2, 4)}) > 1  # chunks of different widths
    ro = collect(trainer.stack, trainer.tokenizer, trainer.prompts[:6], ids, trainer.cfg, torch.Generator().manual_seed(0))
    q_ids, q_mask = left_pad(ids, trainer.tokenizer.pad_token_id)
    assert torch.equal(ro.query_ids, q_ids) and torch.equal(ro.query_mask, q_mask)
    assert torch.allclose(ro.ref_logprobs, ro.logprobs, atol=1e-4)


def test_a_chunk_whose_rows_all_ended_early_is_padded_and_masked_after_its_responses(tiny_models, adapters,
                                                                                      prompts_file, tmp_path, no_grad,
                                                                                      monkeypatch):
    """Sampling in chunks: a chunk whose rows all stopped early returns fewer columns than the others. The rollout
    pads its responses on the right with pad and a mask of 0, so the update never trains on, and the KL never reads,
    columns that chunk did not sample (here its sampling call is cut to 3 tokens, as if all its rows had ended)."""
    from stages.ppo import rollout as R

    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--generation_batch_size", "2")
    real, calls = R.sample, []

    def first_chunk_short(*a, **k):
        s = real(*a, **k)
        if not calls:
            s = R.Sampled(s.response_ids[:, :3], s.response_mask[:, :3], s.logprobs[:, :3], s.entropy[:, :3], s.ended)
        calls.append(1)
        return s

    monkeypatch.setattr(R, "sample", first_chunk_short)
    ro = R.collect(trainer.stack, trainer.tokenizer, trainer.prompts[:6], trainer.prompt_ids[:6], trainer.cfg,
                   torch.Generator().manual_seed(0))
    pad = trainer.tokenizer.pad_token_id
    assert len(calls) == 3 and ro.response_ids.shape[1] > 3 and bool(ro.response_mask[2:, 3:].any())
    assert not ro.response_mask[:2, 3:].any() and bool((ro.response_ids[:2, 3:] == pad).all())
    assert not ro.logprobs[:2, 3:].any() and not ro.ref_logprobs[:2, 3:].any() and not ro.values[:2, 3:].any()
    assert torch.allclose(ro.ref_logprobs, ro.logprobs, atol=1e-4)


def test_value_hidden_states_land_in_each_rows_columns_when_chunks_are_trimmed(tiny_models, adapters, prompts_file,
                                                                                tmp_path, no_grad):
    """collect's value pass runs chunks of rows trimmed to their own longest prompt (forward_batch_size 2 here, prompts
    of several lengths): the hidden states TopLayers keeps must land in each row's columns of the rollout's layout,
    so that a later forward over other rows (another trim; shorter responses, whose kept positions causal attention
    leaves unchanged) replays exactly what a full forward computes."""
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack, load_prompts
    from stages.ppo.rollout import TopLayers, collect, token_values

    sft_dir, rm_dir = adapters("llama")
    cfg, run = parse_args(ppo_args(tiny_models["llama"], tmp_path, "x", prompts_file, None, None,
                                   "--forward_batch_size", "2"))
    profile = profile_from(run.model_config)
    tok = load_tokenizer(profile)
    prompts, ids, _, _ = load_prompts(cfg, tok)
    stack = build_stack(profile, tok, sft_dir, rm_dir, torch.device("cpu"), False)
    lm = stack.causal_lm
    top = TopLayers(lm, 1)
    ro = collect(stack, tok, prompts[:7], ids[:7], cfg, torch.Generator().manual_seed(0), token_count_reward(7), top)
    assert len(set(ro.query_mask.sum(1).tolist())) > 2  # chunks of 2 trimmed to different widths

    def check():
        stack.use("value")
        for i in range(len(ro.texts)):  # one row a forward: trimmed to its own prompt and response
            idx = torch.tensor([i])
            x = ro.rows(idx)
            full = token_values(lm, x)
            replayed = token_values(lm, x, top, ro.cached_hidden(idx, x))
            assert torch.allclose(replayed, full, atol=1e-5), (i, (replayed - full).abs().max())

    check()
    cut = ro.response_mask.clone()
    cut[1::2, 3:] = 0  # odd rows end after 3 tokens
    ro.response_ids, ro.response_mask = torch.where(cut.bool(), ro.response_ids, tok.pad_token_id), cut
    assert bool((cut.sum(1) < cut.shape[1]).any())
    check()


def test_the_reward_replays_the_value_layers_only_when_they_are_the_same(tiny_models, adapters, prompts_file,
                                                                          tmp_path, no_grad):
    """value_trainable_layers with reward_input tokens: the reward pass replays the value's frozen bottom layers only
    if the reward adapter's weights there are identical (TopLayers.same_below). Once the reward's bottom layer
    differs, the trainer must not replay, and the rollout's scores equal a full reward forward."""
    from accelerate import PartialState

    from pipeline.adapters import adapter_of
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack, load_prompts
    from stages.ppo.rollout import collect
    from stages.ppo.trainer import PPOTrainer

    sft_dir, rm_dir = adapters("llama")
    cfg, run = parse_args(ppo_args(tiny_models["llama"], tmp_path, "x", prompts_file, None, None,
                                   "--value_trainable_layers", "1", "--reward_input", "tokens"))
    profile = profile_from(run.model_config)
    tok = load_tokenizer(profile)
    prompts, ids, _, _ = load_prompts(cfg, tok)
    stack = build_stack(profile, tok, sft_dir, rm_dir, torch.device("cpu"), False)
    bottom = [p for n, p in stack.model.named_parameters() if adapter_of(n) == "reward" and ".layers.0." in n]
    assert bottom
    _perturb(bottom)
    trainer = PPOTrainer(cfg, stack, tok, prompts, ids, tmp_path, PartialState(), reward_fn=None)
    assert trainer.top is not None and not trainer.top.same_below("value", "reward")
    assert not trainer.top.reward_shares_bottom
    with_top = collect(stack, tok, prompts[:6], ids[:6], cfg, torch.Generator().manual_seed(2), None, trainer.top)
    full = collect(stack, tok, prompts[:6], ids[:6], cfg, torch.Generator().manual_seed(2))
    assert torch.equal(with_top.response_ids, full.response_ids)
    assert torch.allclose(with_top.scores_raw, full.scores_raw, atol=1e-5), with_top.scores_raw - full.scores_raw


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampled_logprobs_of_left_padded_prompts_equal_an_unpadded_forward(arch, tiny_models):
    """sample() on prompts of different lengths (left-padded in one batch): each recorded log-prob is what one forward
    of that prompt alone + its sampled tokens gives at the sampling temperature. GPT-2's positions are absolute, so the
    padded rows must count their positions from their first real token."""
    from pipeline.generation import encode_prompts, left_pad
    from pipeline.models import load_base, load_tokenizer, profile_from
    from stages.ppo.rollout import sample

    profile = profile_from(str(tiny_models[arch]))
    tok = load_tokenizer(profile)
    lm = load_base(profile, tok).eval()
    prompts = encode_prompts(tok, [[{"role": "user", "content": t}] for t in
                                   ("Hi", "The rabbit ran into the garden and hid under a big green leaf.")])
    ids, mask = left_pad(prompts, tok.pad_token_id)
    out = sample(lm, ids, mask, 6, 0.7, [tok.eos_token_id], tok.pad_token_id, torch.Generator().manual_seed(0),
                 stop_at_eos=False)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            seq = torch.tensor([p + out.response_ids[i].tolist()])
            logits = lm(seq).logits[0, len(p) - 1: -1].float() / 0.7
            expected = torch.log_softmax(logits, -1).gather(1, out.response_ids[i].unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(out.logprobs[i], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("arch", SLIDING_WINDOW_ARCHS)
def test_sampling_and_the_update_forward_of_sliding_window_models_equal_unpadded_forwards(arch, group):
    """A window of 3 positions, a prompt of 7 tokens and one of 2 (left-padded), 6 sampled tokens, and with group 2
    each prompt run once for its two answers: the log-probs sample() records, and those the update's forward
    (pack, response_logits) gives, are each row's own unpadded forward's, where the window sees real tokens only."""
    from pipeline.generation import left_pad
    from stages.ppo.rollout import pack, response_logits, sample, token_logprobs, unflatten

    lm = random_model(arch, "causal", sliding_window=3)
    g = torch.Generator().manual_seed(1)
    prompts = [[int(t) for t in torch.randint(5, 60, (n,), generator=g)] for n in (7, 2)]
    prompts = [p for p in prompts for _ in range(group)]
    ids, mask = left_pad(prompts, 0)
    out = sample(lm, ids, mask, 6, 0.7, [1], 0, torch.Generator().manual_seed(3), stop_at_eos=False, group=group)
    x = pack(ids, mask, out.response_ids, out.response_mask, group=group)
    with torch.no_grad():
        update = unflatten(token_logprobs(response_logits(lm, x), x.tokens, 0.7), x.response_mask, 6)
        for i, p in enumerate(prompts):
            logits = lm(torch.tensor([p + out.response_ids[i].tolist()])).logits[0, len(p) - 1: -1].float() / 0.7
            expected = torch.log_softmax(logits, -1).gather(1, out.response_ids[i].unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(out.logprobs[i], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(update[i], expected, atol=1e-5, rtol=1e-5)


def test_a_row_stays_ended_and_the_update_forward_sees_the_sampling_positions(tiny_models):
    """Three rules of sample() and pack(), on GPT-2 (absolute positions): a row that produced a stop token stays
    ended while the others run on, so the loop stops at the step the last row ends; with stop_at_eos false, `ended`
    says whether a stop token appears anywhere in the row; and pack()'s update-time forward gives back the sampled
    log-probs of left-padded prompts (its positions count from each row's first real token, as sampling's do).
    The stop ids are tokens of a free-running sample with the same seed: stop ids change nothing before a row ends."""
    from pipeline.generation import encode_prompts, left_pad
    from pipeline.models import load_base, load_tokenizer, profile_from
    from stages.ppo.rollout import pack, response_logits, sample, token_logprobs

    profile = profile_from(str(tiny_models["gpt2"]))
    tok = load_tokenizer(profile)
    lm = load_base(profile, tok).eval()
    prompts = encode_prompts(tok, [[{"role": "user", "content": t}] for t in
                                   ("Hi", "The rabbit ran into the garden and hid under a big green leaf.")])
    ids, mask = left_pad(prompts, tok.pad_token_id)
    draw = lambda stops, at_eos: sample(lm, ids, mask, 8, 0.7, stops, tok.pad_token_id,  # noqa: E731
                                        torch.Generator().manual_seed(0), stop_at_eos=at_eos)
    free = draw([tok.eos_token_id], False)
    rows = free.response_ids.tolist()
    with torch.no_grad():
        x = pack(ids, mask, free.response_ids, free.response_mask)
        again = token_logprobs(response_logits(lm, x), x.tokens, 0.7)
    torch.testing.assert_close(again, free.logprobs[free.response_mask.bool()], atol=1e-4, rtol=1e-4)

    stop = [rows[0][1], rows[1][4]]  # row 0 has a stop by step 1, row 1 by step 4
    first = [min(t for t, tok_id in enumerate(r) if tok_id in stop) for r in rows]
    assert first[0] <= 1 and first[1] <= 4 and first[0] < first[1], (rows, stop)
    ended = draw(stop, True)
    assert ended.response_ids.shape[1] == max(first) + 1  # the loop ran until the last row ended, no longer
    assert ended.response_mask.sum(1).tolist() == [n + 1 for n in first] and bool(ended.ended.all())
    assert ended.response_ids[0, : first[0] + 1].tolist() == rows[0][: first[0] + 1]
    assert draw([rows[0][0]], False).ended.tolist() == [True, rows[0][0] in rows[1]]  # the token stays in the reply
    # stop_at_eos false: every sampled token is the reply's, one equal to the pad id too (a base without a pad token
    # pads with its EOS, which such a run samples and trains on)
    as_pad = rows[0][2]
    again = sample(lm, ids, mask, 8, 0.7, [tok.eos_token_id], as_pad, torch.Generator().manual_seed(0),
                   stop_at_eos=False)
    assert torch.equal(again.response_ids, free.response_ids) and bool(again.response_mask.bool().all())
    assert torch.equal(again.logprobs, free.logprobs) and bool(again.logprobs[0, 2] != 0)


# ------------------------------------------------- resume digests, kept policies, rank slices, offsets, dropout, logs

def test_a_checkpoint_resumes_only_on_the_same_model_profile_and_adapter_bytes(tiny_models, adapters, tmp_path,
                                                                               bf16_profile):
    """What a checkpoint records and a resume compares: the model profile (a bf16 profile of the same base is another
    run), and the adapters' weights, not only their configs (a retrained RM keeps its adapter_config.json)."""
    import shutil

    from stages.ppo import adapter_digest, resume_mismatch, trained_from

    sft, rm = adapters("llama")
    retrained = zero_head_copy(rm, tmp_path / "rm-retrained")  # same adapter_config.json, other weights
    copy = shutil.copytree(rm, tmp_path / "rm-copy")
    assert (retrained / "adapter_config.json").read_bytes() == (rm / "adapter_config.json").read_bytes()
    assert adapter_digest(copy) == adapter_digest(rm) != adapter_digest(retrained)

    def upstream(profile, rm_dir):
        cfg, run = parse_args(["--config", "configs/ppo.yaml", "--model_config", str(profile)])
        from pipeline.config import to_dict

        return trained_from({"sft": adapter_digest(sft), "rm": adapter_digest(rm_dir)},
                            {"ppo": to_dict(cfg), "run": to_dict(run)}, PROMPTS)

    before = upstream(tiny_models["llama"], rm)
    assert resume_mismatch(before, upstream(tiny_models["llama"], copy)) is None
    assert resume_mismatch(before, upstream(bf16_profile, rm)) == \
        f"was trained with other settings (model_config: {tiny_models['llama']} -> {bf16_profile}, " \
        f"model_profile.dtype: float32 -> bfloat16)"
    # the same profile file edited in place: its dtype, then a chat template file of its own, then that file's text
    edited = tmp_path / "profile.yaml"
    edited.write_text(Path(tiny_models["llama"]).read_text())
    here = upstream(edited, rm)
    edited.write_text(Path(bf16_profile).read_text())
    assert resume_mismatch(here, upstream(edited, rm)) == \
        "was trained with other settings (model_profile.dtype: float32 -> bfloat16)"
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    edited.write_text(yaml_with(Path(tiny_models["llama"]).read_text(), f"\nchat_template: {template}\n"))
    with_template = upstream(edited, rm)
    assert "model_profile.chat_template: None ->" in resume_mismatch(here, with_template)
    template.write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    assert resume_mismatch(with_template, upstream(edited, rm)).startswith(
        "was trained with other settings (model_profile.chat_template_digest: ")
    assert resume_mismatch(before, upstream(tiny_models["llama"], retrained)).startswith(
        "was trained from other sft/rm adapters")
    with pytest.MonkeyPatch.context() as mp:  # the same run under another launch's mixed precision
        mp.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        assert resume_mismatch(before, upstream(tiny_models["llama"], rm)) == \
            "was trained with other settings (mixed_precision: no -> bf16)"


def test_a_fresh_run_removes_the_policies_an_earlier_run_kept(tiny_models, adapters, prompts_file, runs_dir):
    """make eval plots every policies/update-N/ of the run folder: a run that starts over (no checkpoint to resume)
    must not leave an earlier run's kept policies among its own."""
    sft, rm = adapters("llama")
    stale = Path(runs_dir) / "fresh/ppo/policies/update-000009"
    stale.mkdir(parents=True)
    (stale / "adapter_config.json").write_text("{}")
    m = run_ppo(tiny_models["llama"], runs_dir, "fresh", prompts_file, sft, rm, "--total_updates", "2",
                "--keep_policy_every", "1")
    assert m["updates"] == 2
    kept = sorted(p.name for p in (Path(runs_dir) / "fresh/ppo/policies").iterdir())
    assert kept == ["update-000001"]


def test_each_rank_takes_its_own_slice_of_the_prompt_stream():
    """2 ranks x B == 1 rank x 2B: rank r's groups are the global prompt stream's groups [r * B/k, (r + 1) * B/k) of
    this update, so the ranks' prompts together are one process's with the doubled batch, update after update."""
    from types import SimpleNamespace

    from stages.ppo.trainer import PPOTrainer

    prompts = [f"p{i}" for i in range(40)]

    def take(world_rank, local_batch, k, episodes):
        fake = SimpleNamespace(cfg=SimpleNamespace(num_samples_per_prompt=k, local_batch_size=local_batch),
                               episodes=episodes, rank=world_rank, _prompt_index=lambda i: (7 * i) % len(prompts),
                               prompts=prompts, prompt_ids=[[i] for i in range(len(prompts))])
        return PPOTrainer._local_prompts(fake)[0]

    for k in (1, 2):
        for update in range(3):
            one = take(0, 8, k, episodes=update * 8)
            two = take(0, 4, k, episodes=update * 8) + take(1, 4, k, episodes=update * 8)
            assert two == one, (k, update)
            assert all(len(set(one[g : g + k])) == 1 for g in range(0, 8, k))  # a group: k copies of one prompt
        assert take(0, 4, k, 0) != take(1, 4, k, 0)
        # each update continues the stream where the last one stopped: update u takes groups [u * 8/k, (u + 1) * 8/k)
        n = 8 // k
        for update in range(3):
            expected = [prompts[(7 * i) % 40] for i in range(update * n, (update + 1) * n) for _ in range(k)]
            assert take(0, 8, k, episodes=update * 8) == expected, (k, update)


def test_a_checkpoint_missing_a_trained_tensor_is_one_error_naming_the_fix(tiny_models, adapters, prompts_file,
                                                                          tmp_path):
    """A checkpoint whose trained tensors do not match the adapters in use (hand-edited, or written by a peft that
    names parameters otherwise) is one ConfigError naming the tensor and the fix, not a KeyError traceback; the
    trainer's weights are left as they were."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path)
    path = trainer.save_checkpoint()
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    gone = sorted(state["trainable"]["policy"])[0]
    del state["trainable"]["policy"][gone]
    torch.save(state, path / "trainer_state.pt")
    before = [p.detach().clone() for p in trainer.params]
    with pytest.raises(ConfigError, match=rf"checkpoint .* does not match the adapters in use \(no {re.escape(gone)}\): "
                                          r"start over with --auto_resume false"):
        trainer.load_checkpoint(path)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))


def test_the_newest_complete_checkpoint_resumes_and_a_promoted_one_replaces_the_others(tmp_path):
    """latest_checkpoint: the highest update among complete checkpoints (trainer_state.pt, written last, marks one
    complete); _promote renames the finished temporary folder and removes every other checkpoint (one kept)."""
    from stages.ppo.trainer import PPOTrainer, latest_checkpoint

    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) is None
    for n in (2, 10, 4):
        (root / f"checkpoint-{n:06d}").mkdir(parents=True)
        (root / f"checkpoint-{n:06d}/trainer_state.pt").write_bytes(b"old")
    (root / "checkpoint-000012").mkdir()  # killed before its trainer_state.pt was written
    assert latest_checkpoint(tmp_path) == root / "checkpoint-000010"
    tmp = root / ".tmp-checkpoint-000014"
    tmp.mkdir()
    (tmp / "trainer_state.pt").write_bytes(b"new")
    PPOTrainer._promote(tmp, root / "checkpoint-000014")
    assert [p.name for p in root.iterdir()] == ["checkpoint-000014"]
    assert latest_checkpoint(tmp_path) == root / "checkpoint-000014"
    assert (root / "checkpoint-000014/trainer_state.pt").read_bytes() == b"new"


def test_a_promoted_checkpoint_is_on_disk_before_its_rename_and_the_rename_before_the_old_ones_go(tmp_path,
                                                                                                  monkeypatch):
    """A rename can reach the disk before the files' data: a power cut after it could leave a complete-looking
    checkpoint of empty files, the older ones already deleted. _promote fsyncs every file and folder of the new
    checkpoint under its temporary name, then the checkpoints folder after the rename (before the old go)."""
    from stages.ppo.trainer import PPOTrainer

    root = tmp_path / "checkpoints"
    (root / "checkpoint-000002").mkdir(parents=True)
    tmp = root / ".tmp-checkpoint-000004"
    (tmp / "policy").mkdir(parents=True)
    for f in ("trainer_state.pt", "rng_rank0.pt", "policy/adapter_model.safetensors"):
        (tmp / f).write_bytes(b"x")
    removed, rmtree = [], __import__("shutil").rmtree
    monkeypatch.setattr("shutil.rmtree", lambda p, **kw: (removed.append((str(p), len(calls))), rmtree(p, **kw)))
    calls = recorded_fsyncs(monkeypatch)
    PPOTrainer._promote(tmp, root / "checkpoint-000004")
    files = {str(tmp / f) for f in ("trainer_state.pt", "rng_rank0.pt", "policy/adapter_model.safetensors")}
    assert files | {str(tmp), str(tmp / "policy")} == set(calls[:-1]), calls
    assert calls[-1] == str(root)
    old = [n for p, n in removed if p.endswith("checkpoint-000002")]
    assert old == [len(calls)], (removed, calls)  # the old checkpoint went after the last fsync


def test_the_run_summary_by_hand():
    """The manifest's summary of metrics.jsonl: the reward averaged over the first and last tenth of the updates,
    rates as totals over totals (episodes and tokens over wall time, not a mean of per-update rates), the
    generation-only token rate over generation time, and the last update's KL and lengths."""
    from types import SimpleNamespace

    from stages.ppo.trainer import PPOTrainer

    rows = []
    for u in range(1, 21):
        wall = 2.0 if u % 2 else 1.0  # odd updates take twice as long
        rows.append({"update": u, "episodes": 8 * u, "reward_raw": float(u), "kl": 0.1 * u, "kl_coef": 0.05,
                     "time_update_s": wall, "episodes_per_s": 8 / wall, "gen_tokens_per_s": 40 / wall,
                     "time_generate_s": 0.5, "time_score_s": 0.25, "time_train_s": 1.0, "response_length": 5.0 + u,
                     "no_eos_fraction": 0.5})
    s = PPOTrainer.summary(SimpleNamespace(history=rows))
    assert s["reward_window_updates"] == 2  # a tenth of 20 updates
    assert (s["reward_first"], s["reward_last"], s["reward_gain"]) == (1.5, 19.5, 18.0)  # (1 + 2) / 2, (19 + 20) / 2
    assert s["train_wall_s"] == 30.0 and s["episodes_per_s"] == pytest.approx(160 / 30)  # mean of rates: 6
    assert s["gen_tokens_per_s"] == pytest.approx(800 / 30) and s["gen_only_tokens_per_s"] == pytest.approx(800 / 10)
    assert (s["kl_last"], s["updates"], s["episodes"], s["response_length_last"]) == (pytest.approx(2.0), 20, 160, 25.0)
    assert (s["time_generate_s"], s["time_score_s"], s["time_train_s"]) == (10.0, 5.0, 20.0)
    assert PPOTrainer.summary(SimpleNamespace(history=rows[:3]))["reward_first"] == 1.0  # under 10 updates: 1 each


def test_a_prompt_exactly_max_prompt_length_long_is_kept(tiny_models, prompts_file):
    """max_prompt_length is the longest prompt allowed: a prompt of exactly that many tokens trains, one token more
    does not."""
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import PPOConfig, load_prompts

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))

    def kept(limit: int):  # the prompts' token ids that train, and how many were too long
        _, ids, _, notes = load_prompts(PPOConfig(prompts_file=str(prompts_file), max_prompt_length=limit,
                                                  heldout_fraction=0.0), tok)
        return ids, notes["prompts_long"]

    ids, _ = kept(1000)
    longest = max(len(s) for s in ids)
    n_longest = sum(len(s) == longest for s in ids)
    assert kept(longest) == (ids, 0)
    below, too_long = kept(longest - 1)
    assert too_long == n_longest and len(below) == len(ids) - n_longest
    with pytest.raises(ConfigError, match=f"{n_longest} of {len(ids)} training prompts are longer than "
                                          f"max_prompt_length={longest - 1} tokens .*: raise max_prompt_length"):
        load_prompts(PPOConfig(prompts_file=str(prompts_file), max_prompt_length=longest - 1, heldout_fraction=0.0,
                               long_prompts="error"), tok)  # error: refused, though drop would keep the others


def test_every_later_rollout_carries_the_fitted_value_offset(tiny_models, adapters, prompts_file, tmp_path):
    """The fitted offset b is part of the critic's value in every rollout, not only the first (where the fit adds it):
    at the first mini-batch of update 2 nothing has moved since its rollout, so with one epoch the logged value loss
    equals L.value_loss(values, values, returns) over that rollout, and its values are the head's output + b."""
    from stages.ppo import losses as L
    from stages.ppo.rollout import token_values

    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--num_ppo_epochs", "1",
                       "--value_learning_rate", "6e-3", reward_fn=varied_reward)
    metrics, _ = trainer.step()
    # the LR schedule (linear, no warm-up, 3 updates) steps once per update: update 1 logs the policy's 3e-3 (not the
    # value's 6e-3), update 2 runs at 2e-3 and 4e-3
    assert metrics["lr"] == 3e-3 and [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([2e-3, 4e-3])
    assert trainer.critic_fitted and abs(trainer.value_offset) > 0.1, trainer.value_offset
    ro = trainer.rollout()
    m = ro.response_mask.bool()
    x = ro.rows(torch.arange(len(ro.texts)))
    trainer.stack.use("value")
    with torch.no_grad():
        head = token_values(trainer.lm, x)
    assert torch.allclose(ro.values[:, : x.response_mask.shape[1]][x.response_mask], head + trainer.value_offset,
                          atol=1e-5)
    adv, returns, _ = trainer._advantages(ro)
    expected, _ = L.value_loss(ro.values[m], ro.values[m], returns[m], trainer.cfg.cliprange_value)
    out = trainer._optimise(ro, adv, returns)
    assert out["value_loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_dropout_is_off_even_when_the_model_trains(tiny_models, adapters):
    """PPO's ratio compares two forwards of the same weights: with gradient checkpointing the update runs in train
    mode, so the stack's dropout (GPT-2's 0.1 here) must be 0, or two forwards of the same rows differ."""
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack

    sft_dir, rm_dir = adapters("gpt2")
    profile = profile_from(str(tiny_models["gpt2"]))
    tok = load_tokenizer(profile)
    stack = build_stack(profile, tok, sft_dir, rm_dir, torch.device("cpu"), False)
    lm = stack.causal_lm
    assert lm.config.resid_pdrop > 0  # the fixture's model has dropout to turn off
    ids = torch.tensor([tok("Tell me about rabbits and the sea.")["input_ids"]] * 2)
    lm.train()
    stack.use("policy")
    with torch.no_grad():
        a, b = lm(input_ids=ids).logits, lm(input_ids=ids).logits
    assert torch.equal(a, b)
    assert all(m.p == 0.0 for m in lm.modules() if isinstance(m, torch.nn.Dropout))


def test_the_logged_length_and_no_eos_share_by_hand(tiny_models, adapters, prompts_file, tmp_path):
    """metrics.jsonl's response_length and no_eos_fraction (the manifest's *_last, what tells a missing EOS penalty
    at work) are this batch's mean response tokens and share of responses without EOS."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--response_length", "6")
    ro = trainer.rollout()
    ro.ended = torch.tensor([True, False, False, False, True, False, False, False])  # 2 of 8 ended (the tiny random
    # model rarely samples EOS by itself)
    stats = trainer._advantages(ro)[2]
    assert stats["no_eos_fraction"] == pytest.approx(0.75)
    assert stats["response_length"] == pytest.approx(ro.response_mask.sum(1).float().mean().item())


def test_the_logged_shaped_reward_value_and_return_means_by_hand(tiny_models, adapters, prompts_file, tmp_path):
    """metrics.jsonl's reward is the mean *shaped* score (what PPO maximises: (raw - mean) / std with the RM's stats,
    here (1, 2)), beside reward_raw; value_mean and return_mean are means over every response token (not per answer,
    not of the first token). Scores and values set by hand."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--critic_init", "rm", reward_stats=(1.0, 2.0),
                       reward_fn=varied_reward)
    ro = trainer.rollout()
    B, T = ro.response_mask.shape
    lengths = torch.tensor([T, 3, 7, T, 1, 5, 9, 2])  # answers of many lengths (the tiny model rarely ends one)
    ro.response_mask = (torch.arange(T)[None] < lengths[:, None]).to(ro.response_mask.dtype)
    m = ro.response_mask.float()
    ro.scores_raw = torch.tensor([0.5 * i - 1.0 for i in range(B)])
    ro.ended = torch.ones(B, dtype=torch.bool)  # no missing-EOS penalty
    ro.values = (torch.arange(B * T, dtype=torch.float32).view(B, T) / 10) * m
    _, returns, stats = trainer._advantages(ro)
    assert stats["reward"] == pytest.approx(sum((0.5 * i - 2.0) / 2 for i in range(B)) / B, rel=1e-6)
    assert stats["value_mean"] == pytest.approx(float((ro.values * m).sum() / m.sum()), rel=1e-6)
    assert stats["return_mean"] == pytest.approx(float((returns * m).sum() / m.sum()), rel=1e-6)
    assert float((returns * m).sum() / m.sum()) != pytest.approx(float(returns[:, 0].mean()), rel=1e-3)


def test_the_samples_log_records_each_answers_raw_score_and_whether_it_ended(tiny_models, adapters, prompts_file,
                                                                            tmp_path):
    """samples.jsonl: the first num_samples answers of the update, each with its raw score and its own ended flag."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--num_samples", "3", reward_fn=varied_reward)
    ro = trainer.rollout()
    ro.ended = torch.tensor([True, False, False, True, True, True, True, True])
    ro.scores_raw = torch.arange(8, dtype=torch.float32) / 4
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    trainer.update = 5
    trainer._samples(ro)
    rows = [json.loads(line) for line in trainer.samples_path.read_text().splitlines()]
    assert [(r["update"], r["ended"], r["reward_raw"]) for r in rows] == [(5, True, 0.0), (5, False, 0.25),
                                                                        (5, False, 0.5)]
    assert [r["response"] for r in rows] == ro.texts[:3]


def test_the_episode_count_advances_by_every_ranks_batch(tiny_models, adapters, prompts_file, tmp_path):
    """An update of 2 ranks consumes 2 x local_batch_size episodes of the global prompt stream: the counter (the
    data position of the next update, logged as episodes) advances by all of them, or the next update's rank 0
    would take the groups rank 1 has just trained on. Two ranks emulated on one process (sums across ranks: as is)."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--response_length", "4", "--num_ppo_epochs", "1",
                       reward_fn=varied_reward)
    trainer.world = 2
    trainer._all_sum = lambda t: t  # noqa: E731  one rank's sums stand for both
    local = trainer.cfg.local_batch_size
    metrics, _ = trainer.step()
    assert trainer.episodes == metrics["episodes"] == 2 * local
    trainer.rank = 0
    expected = [trainer.prompts[trainer._prompt_index(i)] for i in range(2 * local, 3 * local)]
    assert trainer._local_prompts()[0] == expected


@pytest.mark.parametrize("arch", [*ARCHS, "opt"])
def test_decoder_layers_are_the_trunks_outermost_list_of_layers(arch):
    """TopLayers and the sharding units find the decoder blocks: `model.layers`, `transformer.h`, `gpt_neox.layers`,
    and OPT's one level down (`model.decoder.layers`), not a list inside a block."""
    from stages.ppo.rollout import decoder_layers

    lm = random_model(arch, "causal")
    expected = {"gpt2": lambda: lm.transformer.h, "gpt_neox": lambda: lm.gpt_neox.layers,
                "opt": lambda: lm.model.decoder.layers}.get(arch, lambda: lm.model.layers)()
    assert decoder_layers(lm) is expected and len(expected) == 2


def gemma3_vision_language_config():
    """A tiny Gemma3ForConditionalGeneration (Gemma 3 4B and up): a 2-layer text model beside a 1-layer vision tower."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "gemma3", text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=63, boi_token_index=62, eoi_token_index=61)


def test_a_vision_language_base_is_read_by_its_text_model(tmp_path):
    """Gemma 3 4B and up load as Gemma3ForConditionalGeneration, whose config holds the text model's sizes under
    text_config: the heads' width, the decoder layers and the adapters' fingerprint are the text model's (the top
    config has no hidden_size: PPO's stack and `make pairs` stopped with an AttributeError)."""
    from transformers import AutoModelForCausalLM

    from pipeline.models import fingerprint, hidden_size_of
    from stages.ppo.rollout import decoder_layers

    cfg = gemma3_vision_language_config()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg)
    assert not hasattr(lm.config, "hidden_size") and hidden_size_of(lm.config) == 32
    assert decoder_layers(lm) is lm.model.language_model.layers
    assert fingerprint(lm.config) == {"model_type": "gemma3", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "intermediate_size": 64}
    assert hidden_size_of(random_model("gpt2", "causal").config) == 32  # n_embd
    # an adapter an earlier version trained on this base saved its type alone: still taken, another type still refused
    from pipeline.models import FINGERPRINT_FILE, check_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / FINGERPRINT_FILE).write_text(json.dumps({"base_model": "g", "fingerprint": {"model_type": "gemma3"}}))
    assert check_adapter(adapter, lm.config, "SFT") == adapter
    (adapter / FINGERPRINT_FILE).write_text(json.dumps({"base_model": "g", "fingerprint": {"model_type": "llama"}}))
    with pytest.raises(ConfigError, match=r"model_type: adapter llama vs base gemma3"):
        check_adapter(adapter, lm.config, "SFT")


def test_lora_on_a_vision_language_base_wraps_its_text_model_alone(tmp_path):
    """Gemma 3's vision tower has q_proj ... too: LoRA wrapped them (never trained on text, a quarter of the modules
    of a 4B). lora_config leaves out the vision tower and projector of a vision-language base, and only of one."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.models import lora_config, profile_from

    cfg = gemma3_vision_language_config()
    cfg.save_pretrained(tmp_path / "gemma3")
    targets = "[q_proj, k_proj, v_proj, o_proj]"
    (tmp_path / "gemma3.yaml").write_text(f"name_or_path: {tmp_path / 'gemma3'}\nlora_target_modules: {targets}\n")
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_config(cfg), lora_config(profile_from(str(tmp_path / "gemma3.yaml")), 4, 8, 0.0))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft.named_parameters() if ".lora_A" in n}
    assert len(wrapped) == 8 and all(".language_model." in n for n in wrapped), sorted(wrapped)
    assert lora_config(profile_from("configs/models/tiny.yaml"), 4, 8, 0.0).exclude_modules is None


def test_rows_that_are_not_a_whole_number_of_groups_are_refused_by_name():
    """Six copies of one prompt are not whole groups of 4: refused with the rule, not a bare reshape error."""
    from stages.ppo.rollout import check_groups

    same = torch.tensor([[0, 5, 6]] * 6)
    check_groups(same, 3)  # two whole groups of 3
    with pytest.raises(ValueError, match="6 rows are not whole groups of 4"):
        check_groups(same, 4)


def test_top_layers_train_at_least_one_layer_and_leave_at_least_one_frozen():
    """TopLayers(lm, n) trains the top n of L layers: n = 0 (no trained layer) and n = L (nothing to replay) are
    refused; on 2 layers, n = 1 freezes layer 0 and trains from layer 1."""
    from stages.ppo.rollout import TopLayers

    lm = random_model("llama", "causal")
    top = TopLayers(lm, 1)
    assert top.cut == 1 and top.frozen_modules() == [lm.model.layers[0]]
    for n in (0, 2):
        with pytest.raises(ValueError, match=rf"value_trainable_layers={n} must be in 1\.\.1"):
            TopLayers(lm, n)


def test_decoder_layers_are_not_a_list_of_as_many_modules_inside_each_block():
    """A block that holds a list of its own as long as the layer count (sub-modules, experts) must not be taken for
    the layers: the outermost list is, whatever lies deeper."""
    import torch

    from stages.ppo.rollout import decoder_layers

    lm = random_model("llama", "causal")
    for layer in lm.model.layers:
        layer.inner = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    assert decoder_layers(lm) is lm.model.layers and len(lm.model.layers) == 2


def test_the_logged_reward_std_is_the_raw_scores_sample_std(tiny_models, adapters, prompts_file, tmp_path):
    """metrics.jsonl's reward_std sits beside reward_raw: the spread of the reward model's raw scores (n - 1 in the
    denominator), not of the normalised and clipped ones PPO maximises. Scores set by hand, reward stats (1, 2)."""
    trainer = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--num_ppo_epochs", "1", reward_stats=(1.0, 2.0),
                       reward_fn=varied_reward)
    ro = trainer.rollout()
    raw = [0.5 * i - 1.0 for i in range(ro.scores_raw.shape[0])]
    ro.scores_raw = torch.tensor(raw)
    _, _, stats = trainer._advantages(ro)
    mean = sum(raw) / len(raw)
    by_hand = (sum((x - mean) ** 2 for x in raw) / (len(raw) - 1)) ** 0.5
    assert stats["reward_std"] == pytest.approx(by_hand, rel=1e-6)
    assert stats["reward_raw"] == pytest.approx(mean, rel=1e-6, abs=1e-9)
    assert float(trainer._scores(ro).std()) == pytest.approx(by_hand / 2, rel=1e-5)  # the shaped ones: a std of 2 apart


@pytest.mark.parametrize("mode", ["truncate", "drop"])
def test_the_long_prompts_note_comes_from_the_main_process_only(mode, tiny_models, prompts_file, capsys, monkeypatch):
    """Every rank reads the prompts: the note about long ones is printed by the main process, once, not once a rank
    (it came twice under two processes). Mutant: printed on every rank."""
    import stages.ppo as ppo
    from pipeline.models import load_tokenizer, profile_from

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    lengths = sorted(len(s) for s in ppo.load_prompts(ppo.PPOConfig(prompts_file=str(prompts_file)), tok)[1])
    limit = lengths[len(lengths) // 2]  # half of them are longer: some dropped, some kept
    cfg = ppo.PPOConfig(prompts_file=str(prompts_file), max_prompt_length=limit, long_prompts=mode)
    for main, notes in ((True, 1), (False, 0)):
        monkeypatch.setattr(ppo, "is_main_process", lambda: main)
        capsys.readouterr()
        ppo.load_prompts(cfg, tok)
        assert capsys.readouterr().err.count(f"longer than max_prompt_length={limit} tokens") == notes


@pytest.mark.parametrize("stage,extra", [("ppo", []), ("grpo", ["--advantage_estimator", "grpo",
                                                                 "--num_samples_per_prompt", "2"])])
def test_the_update_bar_draws_no_more_often_than_tqdm_is_told(stage, extra, tiny_models, adapters, prompts_file,
                                                              runs_dir):
    """In a log, make paces tqdm's redraws (TQDM_MININTERVAL=10): PPO's bar still redrew on every update, its
    set_postfix refreshing past the interval (48 redraws in the default run's log). Told 1000 s, a 3-update run draws
    its bar twice: when it opens and when it closes. The bar is named by the stage (GRPO's read "ppo")."""
    import re

    from tests.conftest import run_module

    sft, rm = adapters("llama")
    _upstream_manifests(runs_dir, "bar", sft, rm)
    res = run_module("stages.ppo", ppo_args(tiny_models["llama"], runs_dir, "bar", prompts_file, None, None,
                                            "--progress_bar", "true", *extra), env={"TQDM_MININTERVAL": "1000"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(re.findall(rf"(?m)^(?:.*\r)?{stage}:\s+\d+%", res.stderr)) == 2, res.stderr[-3000:]


def test_a_held_out_prompt_the_template_refuses_stops_ppo_not_eval(tiny_models, tmp_path):
    """PPO encoded its training prompts only: a held-out prompt the chat template refuses passed PPO and stopped
    `make eval` once the RL run was over. Now load_prompts encodes the held-out share too: one ConfigError naming the
    prompt set, before anything trains; the training prompts' ids are the same. Mutant: the held-out prompts not
    encoded."""
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import load_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Opening {i}."}) + "\n" for i in range(20)))
    cfg, run = parse_args(ppo_args(tiny_models["llama"], tmp_path, "x", prompts, None, None, "--heldout_fraction", "0.25"))
    tok = load_tokenizer(profile_from(run.model_config))
    train, ids, heldout, _ = load_prompts(cfg, tok)
    refused = heldout[0][0]["content"]
    tok.chat_template = ("{% if messages[0]['content'] == '" + refused + "' %}{{ raise_exception('no such opening') }}"
                         "{% endif %}" + tok.chat_template)  # it refuses that one prompt
    with pytest.raises(ConfigError, match=rf"prompt set {prompts}: .*no such opening"):
        load_prompts(cfg, tok)
    tok.chat_template = tok.chat_template.replace(refused, "a prompt nobody gave")
    assert load_prompts(cfg, tok)[1] == ids  # the training prompts' ids as before


def test_an_extended_run_keeps_every_policy_a_straight_run_keeps(tiny_models, adapters, prompts_file, runs_dir, capsys):
    """Under a constant schedule a finished run of 2 updates extended to 4 (`--resume --total_updates 4`) ends as a
    straight run of 4: the same metrics, and the same kept policies (update 2's was missing: a run keeps none at its
    last update, the stage's adapter being that point). A checkpoint past a lowered total_updates is refused by
    --resume (it trained nothing and reported 4 updates under total_updates 3), and an interrupted one starts over
    with a note. Mutants: no policy kept at the resumed update; the checkpoint past total_updates resumed."""
    sft, rm = adapters("llama")
    common = ("--lr_scheduler_type", "constant", "--keep_policy_every", "2", "--save_every", "2")
    run_ppo(tiny_models["llama"], runs_dir, "straight", prompts_file, sft, rm, *common, "--total_updates", "4")
    args = (tiny_models["llama"], runs_dir, "extended", prompts_file, sft, rm, *common)
    run_ppo(*args, "--total_updates", "2")
    run_ppo(*args, "--total_updates", "4", "--resume")
    kept = {run: sorted(p.name for p in (Path(runs_dir) / run / "ppo" / "policies").iterdir())
            for run in ("straight", "extended")}
    assert kept["straight"] == kept["extended"] == ["update-000002"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(read_metrics(runs_dir, "extended")) == strip(read_metrics(runs_dir, "straight"))
    with pytest.raises(ConfigError, match=r"--resume: checkpoint \S+ holds 4 updates, past total_updates 3: give "
                                          r"--total_updates 4 or more"):
        run_ppo(*args, "--total_updates", "3", "--resume")
    (Path(runs_dir) / "extended" / "ppo" / "manifest.json").unlink()  # an interrupted run's folder
    capsys.readouterr()
    run_ppo(*args, "--total_updates", "3")
    assert "holds 4 updates, past total_updates 3: starting over instead of resuming" in capsys.readouterr().err
    assert [r["update"] for r in read_metrics(runs_dir, "extended")] == [1, 2, 3]


def test_rewards_are_standardised_with_the_rm_manifests_stats_unless_its_std_is_zero():
    from stages.ppo import rm_score_stats

    assert rm_score_stats({"reward_mean": -0.5, "reward_std": 0.25}) == (-0.5, 0.25)
    assert rm_score_stats({"reward_mean": 0.0, "reward_std": 2}) == (0.0, 2.0)  # a mean of 0 is a mean
    # A reward model that scored every pair alike: standardising would divide by 0 (then 1e-8)
    assert rm_score_stats({"reward_mean": 1.5, "reward_std": 0.0}) is None
    assert rm_score_stats({"reward_std": 1.0}) is None
    assert rm_score_stats({}) is None


def test_normalize_reward_false_or_a_reward_function_gives_raw_scores_and_the_note_is_said_once(capsys):
    """`normalize_reward: false` (bench-ppo gives it, to match its peers) must leave the scores raw; a reward function
    of your own replaces the reward model and its stats; a manifest without stats is said once, by the main process."""
    from stages.ppo import reward_normalisation

    stats = {"reward_mean": -0.5, "reward_std": 0.25}
    assert reward_normalisation(True, None, stats, True) == (-0.5, 0.25)
    assert reward_normalisation(False, None, stats, True) is None
    assert reward_normalisation(True, lambda prompts, replies: [0.0] * len(replies), stats, True) is None
    capsys.readouterr()
    assert reward_normalisation(True, None, {}, False) is None and capsys.readouterr().err == ""
    assert reward_normalisation(True, None, {}, True) is None
    assert capsys.readouterr().err.startswith("note: normalize_reward is on but the rm manifest gives no reward_mean")


def test_a_profile_holding_its_template_text_is_recorded_by_that_text_and_a_template_file_by_its_digest(tmp_path):
    """The record a checkpoint resumes against: `chat_template:` may hold the template text itself, as the other stages
    read it (pipeline.models.template_text). PPO hashed it as a file's path: a real template, longer than a file name
    may be, crashed every RL stage with "File name too long"."""
    import yaml

    from stages.ppo import profile_record

    text = "{% for m in messages %}<|" + "turn" * 80 + "|>{{ m['content'] }}{% endfor %}"  # 348 characters, no '/'
    inline = tmp_path / "inline.yaml"
    inline.write_text(yaml.safe_dump({"name_or_path": "models/tiny", "chat_template": text}))
    record = profile_record(str(inline))
    assert record["chat_template"] == text and "chat_template_digest" not in record
    (tmp_path / "t.jinja").write_text(text)
    from_file = tmp_path / "file.yaml"
    from_file.write_text(yaml.safe_dump({"name_or_path": "models/tiny", "chat_template": str(tmp_path / "t.jinja")}))
    digest = profile_record(str(from_file))["chat_template_digest"]
    (tmp_path / "t.jinja").write_text(text + " ")  # the file edited in place: another record
    assert digest and profile_record(str(from_file))["chat_template_digest"] != digest


def test_a_checkpoint_is_promoted_once_a_node_by_its_first_process(tmp_path, monkeypatch):
    """A node without a shared filesystem holds its own copy of the new checkpoint: its first process promotes it, after
    the main process has promoted the main node's. Every rank of such a node did, at once: ranks crashed on the
    rename and the node could lose every checkpoint it had."""
    from types import SimpleNamespace

    from stages.ppo.trainer import PPOTrainer

    promoted = []
    monkeypatch.setattr(PPOTrainer, "_promote", staticmethod(lambda tmp, final: promoted.append((tmp, final))))
    tmp, final = tmp_path / ".tmp-checkpoint-000004", tmp_path / "checkpoint-000004"
    tmp.mkdir()  # this node's copy, still there after the main process's promote (another node's filesystem)

    def promotes(is_main: bool, is_local_main: bool) -> bool:
        promoted.clear()
        rank = object.__new__(PPOTrainer)
        rank.is_main, rank.state, rank._barrier = is_main, SimpleNamespace(is_local_main_process=is_local_main), lambda: None
        rank._promote_on_each_node(tmp, final)
        assert len(promoted) <= 1
        return promoted == [(tmp, final)]

    assert promotes(True, True)  # the main process, once
    assert promotes(False, True)  # the first process of another node that holds its own copy
    assert not promotes(False, False)  # the node's other processes leave it to that one
    tmp.rmdir()
    assert not promotes(False, True)  # a shared filesystem: the main process has promoted it already


def test_a_checkpoints_random_streams_come_back_on_a_rank_that_sees_other_devices(monkeypatch, capsys):
    """_restore_rng: a sampling stream saved on a GPU cannot go into a CPU generator (it raised, and the resume
    crashed): it starts afresh with a warning. A GPU rank takes its own GPU's state, from this version's one state or
    from an earlier version's list of every visible GPU's (set_rng_state_all raised IndexError with fewer GPUs)."""
    import random as py_random
    from types import SimpleNamespace

    import numpy as np

    from stages.ppo.trainer import PPOTrainer

    def rank(device: str) -> PPOTrainer:
        r = object.__new__(PPOTrainer)
        r.rank, r.device = 0, torch.device(device)
        r.sample_gen, r.perm_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        return r

    saved = rank("cpu")
    saved.sample_gen.manual_seed(11), saved.perm_gen.manual_seed(12)
    rng = {"sample": saved.sample_gen.get_state(), "perm": saved.perm_gen.get_state(), "torch": torch.get_rng_state(),
           "python": py_random.getstate(), "numpy": np.random.get_state()}
    resumed = rank("cpu")
    resumed._restore_rng(rng)
    assert torch.equal(resumed.sample_gen.get_state(), rng["sample"]) and torch.equal(resumed.perm_gen.get_state(), rng["perm"])
    on_gpu = {**rng, "sample": torch.zeros(16, dtype=torch.uint8), "cuda": [torch.tensor([0])]}  # a CUDA generator's
    fresh = rank("cpu")
    before = fresh.sample_gen.get_state()
    fresh._restore_rng(on_gpu)
    assert torch.equal(fresh.sample_gen.get_state(), before) and torch.equal(fresh.perm_gen.get_state(), rng["perm"])
    assert "sampling stream is of another device than this run's cpu" in capsys.readouterr().err
    set_states = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_states.append((int(state[0]), device)))
    gpu_rank = rank("cpu")
    gpu_rank.device = SimpleNamespace(type="cuda", index=1)  # this rank's GPU, cuda:1
    gpu_rank._restore_rng({**rng, "cuda": [torch.tensor([i]) for i in range(8)]})  # written seeing 8 GPUs
    gpu_rank._restore_rng({**rng, "cuda": [torch.tensor([0])]})  # one GPU seen then: none of this rank's
    gpu_rank._restore_rng({**rng, "cuda_device": torch.tensor([5])})
    assert set_states == [(1, gpu_rank.device), (5, gpu_rank.device)]


def test_samples_are_kept_at_the_first_update_and_every_nth():
    """sample_every 8: updates 1, 8, 16 (update 1 is the earliest look at the policy); 1: every update; 0: none."""
    from stages.ppo.trainer import samples_due

    assert [u for u in range(1, 20) if samples_due(u, 8)] == [1, 8, 16]
    assert [u for u in range(1, 5) if samples_due(u, 1)] == [1, 2, 3, 4]
    assert not any(samples_due(u, 0) for u in range(1, 20))


def test_kl_horizon_counts_every_ranks_episodes():
    """adaptive_kl moves kl_coef by up to 20% x the update's episodes / kl_horizon, and an update holds every rank's
    episodes: 32 a rank (the defaults) with kl_horizon 10 move it by up to 64% on one process, and are refused on two
    (64 episodes: 128%, a coefficient below 0)."""
    from stages.ppo.config import PPOConfig

    cfg = PPOConfig(adaptive_kl=True, kl_horizon=10)
    assert cfg.local_batch_size == 32
    cfg.check_kl_horizon(1)
    with pytest.raises(ConfigError, match=r"an update of 64 episodes would move kl_coef by up to 128%.*above 12\.8"):
        cfg.check_kl_horizon(2)
