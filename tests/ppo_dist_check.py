"""Run under `accelerate launch` with 1 or 2 processes by tests/test_ppo.py: PPO's distributed rules, checked on the
same episodes. Writes <out>/<mode>-rank<r>.json (and .pt tensors) for the test to compare.

    python -m tests.ppo_dist_check PROFILE SFT RM PROMPTS OUT

- equivalence: every process makes the same rollout of 8 episodes; with 2 ranks, rank r keeps rows 4r..4r+3. One
  SGD update (1 epoch, 1 mini-batch, no clipping of the gradient norm) then gives parameter deltas, advantages and
  logged statistics that must equal the single process's: PPO's (eq-*), and each of VARIANTS'.
- streams: each rank's prompts (its slice of the global episode stream) and its sampling generator.
- checkpoints on nodes without a shared filesystem: each rank writes under its own folder <out>/node<r>; a run
  stopped after 1 update and resumed equals a straight 2-update run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch


def build(profile, sft, rm, prompts, out_dir, *extra):
    from accelerate import PartialState

    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack, load_prompts, parse_args
    from stages.ppo.trainer import PPOTrainer

    state = PartialState(cpu=True)
    cfg, run = parse_args(["--config", "configs/ppo.yaml", "--model_config", profile, "--dataset_name", prompts,
                           "--response_length", "10", "--max_prompt_length", "48", "--sample_every", "0",
                           "--progress_bar", "false", *extra])
    prof = profile_from(run.model_config)
    tok = load_tokenizer(prof)
    train, ids, _, _ = load_prompts(cfg, tok)
    torch.manual_seed(0)
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # what StageRun.prepare does for the stage
    stack = build_stack(prof, tok, Path(sft), Path(rm), state.device, False, with_value=cfg.has_critic)
    return PPOTrainer(cfg, stack, tok, train, ids, Path(out_dir), state, reward_stats=(0.3, 1.7)), state


def rows_of(ro, idx: torch.Tensor):
    """The rollout restricted to some rows (the other fields are per-row tensors or lists)."""
    pick = lambda v: v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == len(ro.texts) else v  # noqa: E731
    out = replace(ro, **{k: pick(v) for k, v in vars(ro).items() if isinstance(v, torch.Tensor)})
    out.prompts, out.texts = [ro.prompts[i] for i in idx.tolist()], [ro.texts[i] for i in idx.tolist()]
    return out


def cut_rows_short(ro, pad_id: int) -> None:
    """Row i keeps its first 10 - i response tokens, as if it had ended there: the ranks then hold unequal token
    counts (rows 0-3: 34, rows 4-7: 18), so a token mean over each rank's own tokens, averaged over the ranks,
    differs from the global mini-batch's (the sampled rows all run to response_length, where the two agree)."""
    keep = torch.arange(ro.response_ids.shape[1]) < (ro.response_ids.shape[1] - torch.arange(len(ro.texts)))[:, None]
    ro.response_mask = ro.response_mask * keep
    ro.response_ids = torch.where(keep, ro.response_ids, torch.full_like(ro.response_ids, pad_id))
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        if getattr(ro, name) is not None:
            setattr(ro, name, getattr(ro, name) * keep)


def equivalence(args, out: Path, tag: str = "eq", *extra: str) -> None:
    """One update on 8 episodes; `extra` picks the estimator. The critic-free ones first move the policy off the
    reference (seeded), so that their KL terms (in the reward, or GRPO's loss term) are not zero."""
    from stages.ppo.rollout import collect

    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    accum = "2" if world == 1 else "1"  # 8 episodes per update either way: 1 x (4 x 2) or 2 x (4 x 1)
    trainer, state = build(*args, out / tag, "--optim", "sgd", "--learning_rate", "0.05", "--num_ppo_epochs", "1",
                           "--num_mini_batches", "1", "--max_grad_norm", "0", "--per_device_train_batch_size", "4",
                           "--gradient_accumulation_steps", accum, "--kl_coef", "0.1", *extra)
    adapters = [a for a in ("policy", "value") if a in trainer.named_params]
    if not trainer.cfg.has_critic:
        with torch.no_grad():
            g = torch.Generator().manual_seed(5)
            for _, p in trainer.named_params["policy"]:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    k = trainer.cfg.num_samples_per_prompt  # whole groups: 8 / k prompts, each k times in a row
    full = collect(trainer.stack, trainer.tokenizer, [trainer.prompts[i // k] for i in range(8)],
                   [trainer.prompt_ids[i // k] for i in range(8)], trainer.cfg,
                   torch.Generator().manual_seed(123), None, trainer.top)
    cut_rows_short(full, trainer.tokenizer.pad_token_id)
    idx = torch.arange(8) if world == 1 else torch.arange(4 * state.process_index, 4 * state.process_index + 4)
    ro = rows_of(full, idx)
    before = {n: p.detach().clone() for a in adapters for n, p in trainer.named_params[a]}
    adv, returns, stats = trainer._advantages(ro)
    stats.update(trainer._optimise(ro, adv, returns))
    deltas = {n: (p.detach() - before[n]) for a in adapters for n, p in trainer.named_params[a]}
    name = f"{tag}{world}-rank{state.process_index}"
    torch.save({"rows": idx, "adv": adv, "returns": returns, "mask": ro.response_mask, "deltas": deltas},
               out / f"{name}.pt")
    (out / f"{name}.json").write_text(json.dumps({k: v for k, v in stats.items() if "time" not in k}))


VARIANTS = {  # tag: flags. The critic-free estimators (KL in the reward for reinforce_pp and rloo, a loss term for
    # grpo), and PPO whitening its rewards (over every rank's tokens, as its advantages)
    "whiten_rewards": ["--whiten_rewards", "true"],
    "reinforce_pp": ["--advantage_estimator", "reinforce_pp"],
    "grpo": ["--advantage_estimator", "grpo", "--num_samples_per_prompt", "2", "--use_kl_loss", "true", "--kl_coef", "0.5"],
    "rloo": ["--advantage_estimator", "rloo", "--num_samples_per_prompt", "2", "--use_kl_loss", "false", "--kl_coef", "0.5"],
    # Dr. GRPO: its loss divides by every rank's rows x response_length
    "dr_grpo": ["--advantage_estimator", "grpo", "--num_samples_per_prompt", "2", "--grpo_normalize_std", "false",
                "--loss_agg_mode", "seq-mean-token-sum-norm", "--use_kl_loss", "true", "--kl_coef", "0.5"],
}


def streams(args, out: Path) -> None:
    from stages.ppo.rollout import collect

    trainer, state = build(*args, out / "st", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1")
    prompts, _ = trainer._local_prompts()
    same_prompt = collect(trainer.stack, trainer.tokenizer, [trainer.prompts[0]] * 4, [trainer.prompt_ids[0]] * 4,
                          trainer.cfg, trainer.sample_gen)
    stream = [trainer._prompt_index(i) for i in range(8)]
    grouped, _ = build(*args, out / "gr", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                       "--advantage_estimator", "rloo", "--num_samples_per_prompt", "2")
    group_prompts, _ = grouped._local_prompts()
    (out / f"streams-rank{state.process_index}.json").write_text(json.dumps({
        "prompts": [json.dumps(p) for p in prompts], "global_first_8": [json.dumps(trainer.prompts[i]) for i in stream],
        "samples_of_one_prompt": same_prompt.texts, "group_prompts": [json.dumps(p) for p in group_prompts],
        "global_first_4_groups": [json.dumps(grouped.prompts[grouped._prompt_index(i)]) for i in range(4)]}))


def checkpoints(args, out: Path) -> None:
    """Straight 2 updates vs 1 + resume + 1, each rank under its own folder (no shared filesystem)."""
    import os

    from accelerate import PartialState

    rank = int(os.environ.get("RANK", "0"))
    PartialState().local_process_index = 0  # each rank a node of its own, so each its node's first process
    common = ["--total_updates", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--num_ppo_epochs", "2", "--save_every", "0"]
    straight, _ = build(*args, out / f"straight-node{rank}", *common)
    straight.train()
    stopped, _ = build(*args, out / f"split-node{rank}", *common, "--stop_after", "1")
    assert stopped.train()["stopped"]
    ckpt = out / f"split-node{rank}" / "checkpoints" / "checkpoint-000001"
    files = sorted(p.name for p in ckpt.iterdir())  # this node's copy (the resumed run replaces it at update 2)
    resumed, _ = build(*args, out / f"split-node{rank}", *common)
    resumed.train(resume_from=ckpt)
    (out / f"ckpt-rank{rank}.json").write_text(json.dumps({
        "files": files,
        "straight": straight.history, "resumed": resumed.history, "digests": [straight.param_digest(), resumed.param_digest()]}))


if __name__ == "__main__":
    from pipeline.report import destroy_distributed, finish_distributed

    *args, out = sys.argv[1:]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    equivalence(args, out)
    for tag, flags in VARIANTS.items():
        equivalence(args, out, tag, *flags)
    if int(__import__("os").environ.get("WORLD_SIZE", "1")) == 2:
        streams(args, out)
        checkpoints(args, out)
    finish_distributed()
    destroy_distributed()
