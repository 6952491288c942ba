# Copied from the shared peer scripts (bench/ of the peer-baselines workspace, see PEERS.md there) for make bench-ppo;
# changes: the JSON line also carries `scores` (objective/scores of every update), from which bench/bench_ppo.py
# fits the reward gain the same way for both sides; --save-policy keeps the trained LoRA policy (story scale: the
# harness gold-evaluates it). Run by bench/bench_ppo.py with --model-dir/--out-dir under bench/out/.
"""Peer baseline: TRL 1.12.0's PPOTrainer (trl.experimental.ppo) on tiny, locally built Llama-style models, CPU.

Run in .venv-trl112 (torch 2.13.0 CPU, trl 1.12.0). Prints one JSON object as its last line.
  .venv-trl112/bin/python peer_ppo_trl112.py                 # full fine-tuning: policy, ref, value, reward
  .venv-trl112/bin/python peer_ppo_trl112.py --lora          # LoRA policy; ref = adapter-disabled policy
"""

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "DISABLE_MLFLOW_INTEGRATION": "TRUE"}.items():
    os.environ.setdefault(k, v)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=12, help="PPO updates (rollout+optimise rounds)")
    ap.add_argument("--batch-size", type=int, default=32, help="episodes (prompts) per PPO update")
    ap.add_argument("--per-device-batch", type=int, default=8, help="micro-batch for the PPO optimisation passes")
    ap.add_argument("--num-mini-batches", type=int, default=1)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--rollout-batch", type=int, default=64, help="local_rollout_forward_batch_size")
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=3e-6)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lora", action="store_true", help="wrap the policy with a LoRA peft_config")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (default: fp32)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--model-dir", default=str(pc.DEFAULT_MODEL_DIR))
    ap.add_argument("--out-dir", default=str(pc.HERE / "out" / "ppo_trl112"))
    ap.add_argument("--save-policy", default=None, help="save the trained policy (its LoRA adapter) here")
    return ap.parse_args()


def main():
    a = parse()
    if a.batch_size % a.per_device_batch:
        raise SystemExit("--batch-size must be a multiple of --per-device-batch")
    model_dir = pc.ensure_models(Path(a.model_dir))

    import transformers
    import trl
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    transformers.set_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(model_dir / "policy", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(model_dir / "policy")
    value = AutoModelForSequenceClassification.from_pretrained(model_dir / "value", num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir / "reward", num_labels=1)
    # The story scale's reward model sums its head over the reply (score_pooling.json): score the response only.
    pooling = pc.pool_reward_model(reward, model_dir / "reward")
    if pooling == "sum":
        import trl.experimental.ppo.ppo_trainer as ppo_module

        ppo_module.get_reward = pc.reply_only_reward(ppo_module.get_reward)

    prompts = pc.load_prompts(model_dir)
    ds = Dataset.from_dict({"input_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]})
    eval_ds = ds.select(range(16))

    peft_config = None
    if a.lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, bias="none",
                                 task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])

    cfg = PPOConfig(
        output_dir=a.out_dir, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
        seed=a.seed, learning_rate=a.lr, bf16=a.bf16, fp16=False, use_cpu=True,
        gradient_checkpointing=a.gradient_checkpointing,
        per_device_train_batch_size=a.per_device_batch,
        gradient_accumulation_steps=a.batch_size // a.per_device_batch,
        num_mini_batches=a.num_mini_batches, num_ppo_epochs=a.ppo_epochs,
        total_episodes=a.updates * a.batch_size, local_rollout_forward_batch_size=a.rollout_batch,
        response_length=a.response_length, temperature=a.temperature, kl_coef=a.kl_coef,
        stop_token=None, missing_eos_penalty=None, num_sample_generations=0,
        sft_model_path=str(model_dir / "policy"), reward_model_path=str(model_dir / "reward"),
    )

    logs = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs_=None, **kw):
            if kw.get("logs") is not None:
                logs.append(dict(kw["logs"]))

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=ds, eval_dataset=eval_ds, peft_config=peft_config,
                         callbacks=[Keep()])
    gen = pc.GenCounter()
    gen.wrap(trainer.model.policy)

    copies = [("policy", trainer.model.policy), ("ref", trainer.ref_model), ("value", trainer.model.value_model),
              ("reward", trainer.reward_model)]
    n_copies, copy_names, total_params = pc.count_copies(copies)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    load_start = pc.load_1m()
    c0 = pc.cpu_seconds()
    t_setup = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t_setup
    cpu_train = pc.cpu_seconds() - c0
    if a.save_policy:
        trainer.model.policy.save_pretrained(a.save_policy)

    episodes = trainer.state.episode
    updates = trainer.state.global_step
    res = {
        "peer": "trl112-ppo" + ("-lora" if a.lora else ""),
        "trl": trl.__version__, "transformers": transformers.__version__,
        "peft": __import__("peft").__version__, "accelerate": __import__("accelerate").__version__,
        **pc.git_free_env_info(),
        "total_wall_s": round(time.perf_counter() - T0, 3),
        "setup_wall_s": round(t_setup - T0, 3),
        "train_wall_s": round(t_train, 3),
        "ppo_updates": updates,
        "episodes": episodes,
        "episodes_per_s": round(episodes / t_train, 3),
        "train_cpu_s": round(cpu_train, 2),
        "cpu_util": round(cpu_train / t_train, 2),
        "episodes_per_cpu_s": round(episodes / cpu_train, 3),
        "load_1m_start": load_start, "load_1m_end": pc.load_1m(),
        "generated_tokens": gen.tokens,
        "gen_tokens_per_s": round(gen.tokens / t_train, 2),
        "gen_only_tokens_per_s": round(gen.tokens / gen.seconds, 2) if gen.seconds else None,
        "gen_share_of_train": round(gen.seconds / t_train, 3),
        "peak_rss_mb": round(pc.peak_rss_mb(), 1),
        "model_copies": n_copies, "model_copy_names": copy_names,
        "ref_is": "adapter-disabled policy" if trainer.ref_model is None else "separate deep copy",
        "total_params": total_params, "trainable_params": trainable,
        "optimizer_steps_per_update": a.ppo_epochs * a.num_mini_batches,
        "batch_size": a.batch_size, "per_device_batch": a.per_device_batch,
        "grad_accum": a.batch_size // a.per_device_batch, "num_mini_batches": a.num_mini_batches,
        "ppo_epochs": a.ppo_epochs, "response_length": a.response_length, "lora": a.lora,
        "lora_r": a.lora_r if a.lora else None,
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "grad_ckpt_requested": a.gradient_checkpointing,
        "grad_ckpt_active": bool(getattr(trainer.model.policy, "is_gradient_checkpointing", False)),
        "score_first": logs[0].get("objective/scores") if logs else None,
        "score_last": logs[-1].get("objective/scores") if logs else None,
        "kl_last": logs[-1].get("objective/kl") if logs else None,
        "scores": [l["objective/scores"] for l in logs if "objective/scores" in l],  # per update (bench_ppo's gain)
        "seed": a.seed, "reward_pooling": pooling,
    }
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
