"""A finished sft -> rm -> ppo run, made in seconds, for the eval and publish tests.

The adapters are stock PEFT folders with random (non-zero) LoRA weights on a tiny fixture model, so the SFT and PPO
policies really differ and the reward adapter gives real, varied scores. The manifests are written by
pipeline.run.StageRun exactly as the stages write them (docs/CONTRACTS.md), so eval and publish read them the same
way as in a real run. A fake metrics.jsonl has a reward that rises while the length doubles: eval must flag it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.models import save_fingerprint
from pipeline.run import StageRun

HELDOUT = ["Tell me about rabbits.", "What is two plus two?", "Name a colour.", "Write one short sentence about the sea.",
           "Say hello.", "Why is the sky blue?"]
METRIC_KEYS = ["update", "episodes", "reward_raw", "reward", "kl", "kl_k3", "kl_coef", "entropy", "policy_loss",
               "value_loss", "clipfrac_policy", "clipfrac_value", "approx_kl", "explained_variance", "response_length",
               "no_eos_fraction", "episodes_per_s", "gen_tokens_per_s", "time_generate_s", "time_score_s", "time_train_s", "lr"]


def _lora_adapter(model_dir: str, targets: list[str], out: Path, seed: int, task_type: str = "CAUSAL_LM") -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    if task_type == "SEQ_CLS":
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
        base.config.pad_token_id = tok.pad_token_id
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir)
    # init_lora_weights=False: random A and B, so the adapter changes the model (the default B=0 would not)
    model = get_peft_model(base, LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules=targets,
                                            init_lora_weights=False))
    if task_type == "CAUSAL_LM":  # small deltas: a policy near its reference, as after real training
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.3)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    save_fingerprint(out, base.config, model_dir)
    return out


def fake_metrics(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        row = {k: 0.0 for k in METRIC_KEYS}
        row.update(update=i, episodes=16 * (i + 1), reward_raw=-1.0 + 0.15 * i, reward=-1.1 + 0.14 * i, kl=0.05 * i,
                   kl_k3=0.04 * i, kl_coef=0.05, entropy=3.0 - 0.1 * i, response_length=10.0 + 1.2 * i,
                   no_eos_fraction=0.5, lr=1e-4)
        rows.append(row)
    return rows


def build_upstream(runs_dir: Path, profile: Path, run: str = "t", reward_members: int = 1) -> Path:
    """Write runs_dir/run/{sft,rm,ppo}/ as the real stages would (an rm stage of `ensemble: reward_members`); returns
    runs_dir."""
    spec = yaml.safe_load(Path(profile).read_text())
    model_dir, targets = spec["name_or_path"], spec["lora_target_modules"]

    sft = StageRun("sft", run, str(runs_dir))
    sft.prepare({})
    _lora_adapter(model_dir, targets, sft.dir / "adapter", seed=1)
    sft.finish({"adapter": sft.dir / "adapter", "samples": sft.dir / "samples.json", "base_model": model_dir},
               {"train_loss": 2.5, "eval_loss": 2.6}, {"sft": {"lora_r": 4, "lora_alpha": 8, "dataset_mixture":
               {"data/sft/oasst.jsonl": 0, "data/sft/gsm8k.jsonl": 150}},
                                                        "train": {"learning_rate": 2e-3, "max_steps": 2}})

    rm = StageRun("rm", run, str(runs_dir))
    rm.prepare({})
    rm.need("sft")
    members = [rm.dir / "adapter"] + [rm.dir / f"member-{i}" / "adapter" for i in range(1, reward_members)]
    for i, folder in enumerate(members):
        _lora_adapter(model_dir, targets, folder, seed=2 + 10 * i, task_type="SEQ_CLS")
    rm.finish({"adapter": rm.dir / "adapter", "members": json.dumps([str(m) for m in members])},
              {"eval_accuracy": 0.61, "eval_mean_margin": 0.2, "reward_mean": 0.0, "reward_std": 1.0,
               "ensemble": reward_members,
               "members": [{"reward_mean": 0.1 * i, "reward_std": 1.0 + i} for i in range(reward_members)]},
              {"rm": {"dataset_mixture": {"data/preferences/oasst.jsonl": 0, "data/preferences/pandalm.jsonl": 0}},
               "train": {"learning_rate": 1e-3}})

    ppo = StageRun("ppo", run, str(runs_dir))
    ppo.prepare({})
    ppo.need("sft"), ppo.need("rm")
    _lora_adapter(model_dir, targets, ppo.dir / "adapter", seed=3)
    with open(ppo.dir / "metrics.jsonl", "w") as f:
        for row in fake_metrics():
            f.write(json.dumps(row) + "\n")
    with open(ppo.dir / "heldout_prompts.jsonl", "w") as f:
        for text in HELDOUT:
            f.write(json.dumps({"prompt": [{"role": "user", "content": text}]}) + "\n")
    ppo.finish({"adapter": ppo.dir / "adapter", "value_adapter": rm.dir / "adapter", "metrics_jsonl": ppo.dir / "metrics.jsonl",
                "heldout_prompts": ppo.dir / "heldout_prompts.jsonl"},
               {"reward_first": -1.0, "reward_last": 0.65, "reward_gain": 1.65, "kl_last": 0.55, "updates": 12},
               {"ppo": {"learning_rate": 1e-4, "kl_coef": 0.05, "prompts": "data/prompts/oasst_ppo_prompts.jsonl"}})
    return runs_dir


_EVALUATED: dict[str, Path] = {}


def evaluated_run(tmp_path_factory, profile: Path, run: str = "t") -> Path:
    """build_upstream + the real eval stage (main() on configs/eval.yaml, tiny overrides, one sample a prompt: a row a
    prompt, which the tests of each figure read; tests/test_eval.py has several), once per test session."""
    key = str(profile)
    if key not in _EVALUATED:
        from stages.eval import main, parse_args

        runs_dir = build_upstream(tmp_path_factory.mktemp("runs"), profile, run)
        main(*parse_args(["--config", "configs/eval.yaml", "--run", run, "--runs_dir", str(runs_dir),
                          "--model_config", str(profile), "--max_new_tokens", "12", "--samples_per_prompt", "1"]))
        _EVALUATED[key] = runs_dir
    return _EVALUATED[key]


def build_label_export(runs_dir: Path, run: str = "t") -> Path:
    """A label-export stage: a few preference rows in TRL's conversational format, saved with save_to_disk; and the
    pairs stage whose prompts (the bundled story openings) they are of."""
    import datasets

    pairs = StageRun("pairs", run, str(runs_dir))
    pairs.prepare({})
    pairs.finish({}, {}, {"pairs": {"prompts_file": "data/story/pairs_prompts.jsonl", "dataset_name": None}})

    stage = StageRun("label-export", run, str(runs_dir))
    stage.need("pairs")  # as current_pair_ids reads it: its digest in the export's inputs
    stage.prepare({})
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": [{"role": "assistant", "content": "Good."}],
             "rejected": [{"role": "assistant", "content": "Bad."}], "annotator": "ann", "strength": "much", "agreement": 1.0}
            for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(stage.dir / "dataset"))
    stage.finish({"dataset": stage.dir / "dataset"}, {"pairs": len(rows)}, {})
    return stage.dir / "dataset"


def add_policy_stage(runs_dir: Path, profile: Path, stage: str, run: str = "t", adapter_from: Path | None = None,
                     seed: int = 4, heldout: list[str] = HELDOUT, kept: dict[int, Path] | None = None) -> Path:
    """Another policy stage beside build_upstream's PPO, written as its stage writes it: an RL stage of the same loop
    (grpo, rloo, reinforce_pp: adapter, metrics.jsonl, heldout_prompts.jsonl, `method` in the metrics, kept policies
    under policies/update-N/) or dpo (adapter only). `adapter_from`: copy that adapter (an identical policy) instead
    of a fresh random one. Returns the stage folder."""
    import shutil

    spec = yaml.safe_load(Path(profile).read_text())
    st = StageRun(stage, run, str(runs_dir))
    st.prepare({})
    st.need("sft")
    if adapter_from is not None:
        shutil.copytree(adapter_from, st.dir / "adapter")
    else:
        _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], st.dir / "adapter", seed=seed)
    outputs = {"adapter": st.dir / "adapter", "base_model": spec["name_or_path"]}
    if stage == "dpo":
        st.finish(outputs, {"eval_accuracy": 0.6, "beta": 0.1}, {"dpo": {"beta": 0.1}})
        return st.dir
    st.need("rm")
    for update, src in (kept or {}).items():
        shutil.copytree(src, st.dir / "policies" / f"update-{update:06d}")
    with open(st.dir / "metrics.jsonl", "w") as f:
        for row in fake_metrics():
            f.write(json.dumps(row) + "\n")
    with open(st.dir / "heldout_prompts.jsonl", "w") as f:
        for text in heldout:
            f.write(json.dumps({"prompt": [{"role": "user", "content": text}]}) + "\n")
    outputs.update(metrics_jsonl=st.dir / "metrics.jsonl", heldout_prompts=st.dir / "heldout_prompts.jsonl")
    st.finish(outputs, {"reward_first": -1.0, "reward_last": 0.5, "updates": 12, "advantage_estimator": stage,
                        "method": stage},
              {"ppo": {"learning_rate": 1e-4, "kl_coef": 0.05, "advantage_estimator": stage, "num_samples_per_prompt": 4}})
    return st.dir
