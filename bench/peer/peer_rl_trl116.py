"""Peer for make bench-rl: TRL 1.16's GRPOTrainer or RLOOTrainer with LoRA on the story task, CPU, one process.

    python bench/peer/peer_rl_trl116.py --method grpo --work bench/out/rl/story --out-dir DIR [--updates 8 ...]

Runs in the project's own venv (TRL 1.16 is what we ship with). Reads from --work (bench/story.py): peer_policy/
(our SFT adapter merged into a standalone model: the starting policy; with the LoRA adapter disabled it is the
reference, as TRL does for a PEFT model), peer_reward/ (our reward adapter merged into a standalone sequence
classifier, passed as reward_funcs) and prompts.jsonl (conversational story prompts; TRL applies the chat
template). Saves the trained LoRA adapter to <out-dir>/policy for the harness's gold evaluation, and prints one
JSON object as its last line.

Batch mapping (one update of ours = one generation here, used for exactly one optimizer step):
  per_device_train_batch_size x gradient_accumulation_steps = episodes per update (prompts per update x
  num_generations); steps_per_generation = gradient_accumulation_steps, so TRL's generation_batch_size (derived:
  per_device_train_batch_size x processes x steps_per_generation; setting both is refused) is the same episodes
  and every generation feeds one optimizer step; num_iterations = 1 (our num_ppo_epochs 1); max_steps = updates.
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

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["grpo", "rloo"], required=True)
    ap.add_argument("--work", required=True, help="bench/story.py's folder")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--updates", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32, help="episodes (completions) per update")
    ap.add_argument("--per-device-batch", type=int, default=16)
    ap.add_argument("--samples-per-prompt", type=int, default=4, help="num_generations")
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl-coef", type=float, default=0.05, help="beta")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--adam-epsilon", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=42)
    return ap.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    if a.batch_size % a.per_device_batch or a.batch_size % a.samples_per_prompt:
        raise SystemExit("--batch-size must be a multiple of --per-device-batch and of --samples-per-prompt")
    work = Path(a.work).resolve()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    transformers.set_seed(a.seed)
    Trainer, Config = (trl.GRPOTrainer, trl.GRPOConfig) if a.method == "grpo" else (trl.RLOOTrainer, trl.RLOOConfig)
    tok = AutoTokenizer.from_pretrained(work / "peer_policy", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(work / "peer_policy")
    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines() if line.strip()]
    ds = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    grad_accum = a.batch_size // a.per_device_batch
    method_args = (dict(loss_type="dapo", scale_rewards="group") if a.method == "grpo"  # TRL's defaults, named
                   else dict(normalize_advantages=False))
    cfg = Config(
        output_dir=a.out_dir, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
        seed=a.seed, learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=0, adam_epsilon=a.adam_epsilon,
        weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        per_device_train_batch_size=a.per_device_batch, gradient_accumulation_steps=grad_accum,
        steps_per_generation=grad_accum, num_generations=a.samples_per_prompt,
        num_iterations=1, max_steps=a.updates, max_completion_length=a.response_length, temperature=a.temperature,
        top_p=1.0, top_k=0, beta=a.kl_coef, disable_dropout=True, dataloader_num_workers=0, **method_args,
    )
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                             bias="none", target_modules=PROJ)
    history = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs is not None:
                history.append(dict(logs))

    # Our reward model merged, scoring by the pooling it was trained with (pc.pool_reward_model: with 'sum' TRL's
    # rewards add the prompt's part, which each group's baseline cancels, so the advantages are ours).
    reward = AutoModelForSequenceClassification.from_pretrained(work / "peer_reward", num_labels=1)
    pooling = pc.pool_reward_model(reward, work / "peer_reward")
    reward_tok = AutoTokenizer.from_pretrained(work / "peer_reward")
    trainer = Trainer(model=policy, reward_funcs=reward, reward_processing_classes=reward_tok, args=cfg,
                      train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=[Keep()])
    gen = pc.GenCounter()
    gen.wrap(trainer.model)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    load_start = pc.load_1m()
    t_setup = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t_setup
    trainer.model.save_pretrained(Path(a.out_dir) / "policy")  # the LoRA adapter on peer_policy: gold-evaluated

    if cfg.generation_batch_size != a.batch_size:
        raise SystemExit(f"TRL derived generation_batch_size {cfg.generation_batch_size}, not {a.batch_size}")
    steps = [h for h in history if "reward" in h]
    episodes = trainer.state.global_step * a.batch_size
    res = {
        "peer": f"trl116-{a.method}-lora", "trl": trl.__version__, "transformers": transformers.__version__,
        "peft": __import__("peft").__version__, **pc.git_free_env_info(),
        "total_wall_s": round(time.perf_counter() - T0, 3), "setup_wall_s": round(t_setup - T0, 3),
        "train_wall_s": round(t_train, 3), "updates": trainer.state.global_step, "episodes": episodes,
        "episodes_per_s": round(episodes / t_train, 3),
        "generated_tokens": gen.tokens, "gen_tokens_per_s": round(gen.tokens / t_train, 2),
        "gen_only_tokens_per_s": round(gen.tokens / gen.seconds, 2) if gen.seconds else None,
        "generate_calls": gen.calls, "load_1m_start": load_start, "load_1m_end": pc.load_1m(),
        "peak_rss_mb": round(pc.peak_rss_mb(), 1), "trainable_params": trainable,
        "ref_is": "adapter-disabled policy" if getattr(trainer, "ref_model", None) is None else "separate copy",
        "config": {k: getattr(cfg, k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                 "steps_per_generation", "generation_batch_size", "num_generations",
                                                 "num_iterations", "max_steps", "max_completion_length", "beta",
                                                 "temperature", "learning_rate", "adam_epsilon", *method_args)},
        "kl_last": steps[-1].get("kl") if steps else None,
        "scores": [h["reward"] for h in steps],  # mean reward of each update's generation
        "reward_pooling": pooling, "seed": a.seed, "torch_threads": torch.get_num_threads(),
        "world_size": trainer.accelerator.num_processes,
    }
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
