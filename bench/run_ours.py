"""Our side of `make bench-ppo` and `make bench-rl`: stages.ppo on the peer workload (bench/peer/peer_common.py
models and prompts), or on the story task's folder (bench/story.py writes the same layout; --config picks ppo, grpo
or rloo).

    python -m bench.run_ours prepare --model-dir bench/out/models/tiny --work bench/out/ours/tiny
    python -m bench.run_ours run --model-dir ... --work ... --run r1 [--updates 12 --batch-size 32 ...]

`prepare` (its own process, so its memory never counts) writes into --work: a model profile on the peer's policy
base, a fresh seeded LoRA SFT adapter (CAUSAL_LM; B = 0, so policy = reference = the peer's base at the start),
a seeded LoRA SEQ_CLS reward adapter on the same base (LoRA B random, `score` head = the peer reward model's head),
both fingerprinted, the same reward model merged into one standalone model (peer_reward/: the peer's reward and
value model, so both sides maximise one reward function), and prompts.jsonl (the peer's 256 prompts). `run` calls the stage exactly as `make ppo` does
(main(*parse_args([...]))) with the peer's batch layout and prints one JSON object as its last stdout line.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

from bench.adapters import PROJ  # noqa: E402

LORA_R = 16  # the peer's --lora-r default; alpha = 2r, dropout 0, all 7 projections (bench/peer/peer_ppo_trl112.py)


def prepare(model_dir: Path, work: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoTokenizer

    from bench.adapters import seeded_sft_and_reward

    if (work / "DONE").exists() and (work / "peer_reward").exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    base_dir = (model_dir / "policy").resolve()
    (work / "profile.yaml").write_text(f"name_or_path: {base_dir}\nlora_target_modules: {PROJ}\ndtype: float32\n"
                                       "description: bench-ppo peer workload base (bench/peer/peer_common.py)\n")
    lora = dict(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules=PROJ)
    m = seeded_sft_and_reward(base_dir, work, lora, seed, score_from=model_dir / "reward")  # the peer's head
    tok = AutoTokenizer.from_pretrained(base_dir)
    # The same reward function as one standalone model, for the peer (its reward model, and its value model's start):
    # both sides then maximise the same reward, and their reward gains are in the same units.
    probe = tok(json.loads((model_dir / "prompts.json").read_text())[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = m(**probe).logits
        merged = m.merge_and_unload()
        after = merged(**probe).logits
    if not torch.allclose(before, after, atol=1e-4):
        raise SystemExit(f"merged reward model differs from the adapter: {before.flatten()} vs {after.flatten()}")
    merged.save_pretrained(work / "peer_reward")
    tok.save_pretrained(work / "peer_reward")
    prompts = json.loads((model_dir / "prompts.json").read_text())
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (work / "DONE").write_text("ok\n")


def stage_args(a) -> list[str]:
    w = Path(a.work).resolve()
    extra = [] if a.samples_per_prompt is None else ["--num_samples_per_prompt", str(a.samples_per_prompt)]
    return ["--config", a.config, "--run", a.run, "--runs_dir", str(w / "runs"),
            "--model_config", str(w / "profile.yaml"), "--sft_adapter", str(w / "sft"), "--reward_adapter", str(w / "rm"),
            "--dataset_name", str(w / "prompts.jsonl"), "--heldout_fraction", "0", "--max_prompt_length", "64",
            "--per_device_train_batch_size", str(a.per_device_batch),
            "--gradient_accumulation_steps", str(a.batch_size // a.per_device_batch), "--num_mini_batches", "1",
            "--num_ppo_epochs", str(a.ppo_epochs), "--total_updates", str(a.updates),
            "--response_length", str(a.response_length), "--temperature", str(a.temperature),
            "--learning_rate", str(a.lr), "--kl_coef", str(a.kl_coef), "--normalize_reward", "false", "--reward_clip", "0",
            "--stop_at_eos", str(a.stop_at_eos).lower(), "--missing_eos_penalty", "0", "--save_every", "0",
            "--sample_every", "0", "--keep_policy_every", "0", "--progress_bar", "false", "--seed", str(a.seed),
            "--auto_resume", "false", "--reward_input", a.reward_input, *extra]


def run(a) -> dict:
    import torch

    from stages.ppo import main, parse_args

    argv = stage_args(a)
    m = main(*parse_args(argv))
    res = {"side": "ours (stages.ppo)", "stage_args": argv,
           "total_wall_s": round(time.perf_counter() - T0, 3), "torch_threads": torch.get_num_threads()}
    for k in ("episodes", "updates", "episodes_per_s", "gen_tokens_per_s", "gen_only_tokens_per_s", "train_wall_s",
              "time_generate_s", "time_score_s", "time_train_s", "reward_first", "reward_last", "reward_gain",
              "reward_window_updates", "kl_last", "peak_memory_mb", "model_copies", "frozen_params", "trainable_params",
              "world_size", "advantage_estimator", "method"):
        v = m.get(k)
        res[k] = round(v, 4) if isinstance(v, float) else v
    stage_dir = Path(a.work).resolve() / "runs" / a.run / m["method"]
    res["adapter"] = str(stage_dir / "adapter")  # the trained policy, for the harness's gold evaluation
    metrics_jsonl = stage_dir / "metrics.jsonl"
    res["scores"] = [json.loads(l)["reward_raw"] for l in metrics_jsonl.read_text().splitlines() if l.strip()]
    return res


def cli_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["prepare", "run"])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--run", default="bench")
    ap.add_argument("--updates", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--per-device-batch", type=int, default=8)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=3e-6)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--config", default="configs/ppo.yaml", help="The stage config: ppo, grpo or rloo (bench-rl).")
    ap.add_argument("--samples-per-prompt", type=int, default=None, help="num_samples_per_prompt (default: the config's).")
    ap.add_argument("--stop-at-eos", action="store_true", help="Stop responses at EOS (bench-ppo's peer never stops).")
    ap.add_argument("--reward-input", choices=["chat", "tokens"], default="chat",
                    help="What the reward model reads (the stage's reward_input): chat = the decoded reply re-templated, "
                         "as TRL 1.16's GRPO/RLOO do (bench-rl); tokens = the policy's own token ids, as TRL 1.12's "
                         "PPOTrainer does (bench-ppo). A chat-template-free prompt (tiny, 125m) always reads tokens.")
    return ap


def main_cli(argv=None) -> None:
    a = cli_parser().parse_args(argv)
    if a.cmd == "prepare":
        prepare(Path(a.model_dir), Path(a.work))
        return
    if a.batch_size % a.per_device_batch:
        raise SystemExit("--batch-size must be a multiple of --per-device-batch")
    print(json.dumps(run(a)), flush=True)


if __name__ == "__main__":
    sys.exit(main_cli())
