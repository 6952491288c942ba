"""Stage: DPO (Rafailov et al. 2023) from the run's SFT policy, with TRL DPOTrainer and a LoRA adapter.

    make dpo                                   # accelerate launch ... -m stages.dpo --config configs/dpo.yaml
    make dpo ARGS="--beta 0.05 --dataset_name my_prefs.jsonl"

Reads: the SFT manifest of the run, and the reward model's preference data: the mixture of
the recipe's rm.yaml (rm_config: the story's label export alone; the assistant recipe's with the bundled human
preferences), or its own --dataset_mixture / --dataset_name, loaded, filtered, cut to
max_length and split by stages/rm_data.py's own functions, so DPO and the reward model see the same token ids and
hold out the same prompts.
Writes runs/<run>/dpo/: adapter/ (the DPO policy: one stock PEFT LoRA on the raw base, tokenizer, pipeline_base.json),
eval_pairs.jsonl (the held-out pairs with their implicit rewards), config.json, manifest.json (last).

With batch_by_prompt (configs/dpo.yaml) a batch is whole prompts, each distinct response's log-probs computed once and
the sigmoid loss taken over all the prompt's pairs (stages/dpo_groups.py); without it, TRL's batches of pairs.

One model in memory: the base with the SFT LoRA merged in. DPOTrainer puts a fresh LoRA on it and computes the
reference log-probs with that LoRA disabled: the reference is exactly the SFT policy. Under an FSDP accelerate config
the base is loaded sharded over the ranks (pipeline.sharding) and the SFT LoRA merged into each rank's shard. At the
end both LoRAs become one LoRA of rank r_sft + r_dpo on the raw base (pipeline/lora_combine.py), which eval and
publish read like PPO's policy; the stage reloads it with stock peft and fails if it does not give the trained
policy's log-probs.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import ConfigError, RunArgs, lora_dropout_inert, parse, refuse_training_nothing, resolve_path, to_dict
from pipeline.generation import right_pad
from pipeline.lora_combine import combine_loras, merge_into_base, require_combinable, save_lora
from pipeline.models import (MIXED_PRECISION_DTYPE, base_config, check_adapter, check_training_length, load_base,
                             load_tokenizer, lora_config, profile_from, resolve_base, save_fingerprint, to_device)
from pipeline.report import finish_distributed, peak_memory_mb, print_table
from pipeline.run import StageRun, main_guard
from pipeline.sharding import is_sharded, require_shared_runs_dir, sharding_report, take_over_from_accelerate
from stages.dpo_groups import DPOGroupCollator, group_pairs, grouped_dpo_trainer, pairwise_only_settings
from stages.resume import build_trainer, drop_checkpoints, step_of, train_resuming
from stages.rm import RMArgs
from stages.rm_data import check_eval_fraction, checked_mixture, data_record, longest_pair, prepare_data
from stages.rm_groups import share_prefix_inert, shares_prefix
from stages.rm_scoring import heldout_metrics

# Largest difference in a held-out sequence log-prob (a sum over ~100 tokens) between the trained policy and the saved
# adapter reloaded on the raw base, in float32; merging and unmerging only reorders float32 sums (~1e-5 seen).
RELOAD_ATOL_FP32 = 1e-3
RELOAD_CHECK_PAIRS = 32  # a wrong combination changes every pair's log-probs; 32 pairs cost ~1/6 of a held-out pass


@dataclass
class DPOArgs:
    # Data
    dataset_name: str | None = field(default=None, metadata={
        "help": "Your own preference data (file, folder or Hub id) in any TRL preference format; replaces the mixture."})
    dataset_split: str = field(default="train", metadata={"help": "The split of --dataset_name to read (a Hub id's, e.g. train_sft, or a folder's by its files' names)."})
    dataset_mixture: dict = field(default_factory=dict, metadata={
        "help": "Source -> {weight, max_rows} as in rm.yaml; empty: rm_config's mixture. JSON on the CLI."})
    rm_config: str = field(default="configs/rm.yaml", metadata={
        "help": "The recipe's reward-model config: its max_prompt_length cuts DPO's pairs, and an empty dataset_mixture "
                "means its dataset_mixture."})
    eval_fraction: float = field(default=0.2, metadata={"help": "Share of prompts held out (no prompt, nor conversation, in both halves)."})
    batch_by_prompt: bool = field(default=False, metadata={
        "help": "Batch whole prompts: each distinct response's log-probs once under the policy and the reference, all "
                "the prompt's pairs in the loss (stages/dpo_groups.py; the sigmoid loss alone). "
                "per_device_train_batch_size then counts prompts."})
    share_prefix: bool = field(default=True, metadata={
        "help": "With batch_by_prompt: the tokens all of a prompt's responses begin with (prompt, template) run once, "
                "each response after them from their cache: the same loss and gradients for less compute."})
    # LoRA (DPO's own, on the SFT-merged base)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0

    def inert_settings(self, parsed: list) -> dict[str, str]:
        """What pipeline.config.parse refuses on the command line: lora_dropout under TRL's disable_dropout;
        share_prefix without batch_by_prompt, or under activation checkpointing (as the reward model's)."""
        train = next(c for c in parsed if hasattr(c, "gradient_checkpointing"))
        return (lora_dropout_inert(self.lora_dropout, parsed)
                | share_prefix_inert(self.batch_by_prompt, self.share_prefix, train.gradient_checkpointing))

    def __post_init__(self):
        self.dataset_mixture = checked_mixture(self.dataset_mixture)  # the reward model's rules: one error at parse
        check_eval_fraction(self.eval_fraction)
        if not resolve_path(self.rm_config).is_file():  # read for its max_prompt_length and mixture
            raise ValueError(f"rm_config {self.rm_config} does not exist: give the recipe's reward-model config (its "
                             f"max_prompt_length cuts DPO's pairs, its dataset_mixture is DPO's data unless "
                             f"--dataset_mixture is given)")


def preference_args(args: DPOArgs, max_length: int | None = None) -> RMArgs:
    """The reward model's data options for our data: same loader, same filters, same split by prompt, same cut (its
    max_prompt_length). rm_config is parsed as `make rm` parses it: a variant's base_config: counts (read as plain
    YAML, a variant holding only max_length gave no mixture, and every prompt was cut at the default 64 tokens)."""
    from stages.rm import parse_args as rm_parse_args

    rm = rm_parse_args(["--config", str(resolve_path(args.rm_config))])[1]
    if max_length and not 0 <= rm.max_prompt_length <= max_length // 2:  # rm_data would name neither file
        raise ConfigError(f"max_prompt_length {rm.max_prompt_length} (from rm_config {args.rm_config}) must be between "
                          f"0 and half of DPO's max_length ({max_length}): lower it there, raise --max_length, or give "
                          f"another --rm_config")
    mixture = args.dataset_mixture or rm.dataset_mixture
    return RMArgs(dataset_name=args.dataset_name, dataset_split=args.dataset_split, dataset_mixture=mixture,
                  eval_fraction=args.eval_fraction, max_prompt_length=rm.max_prompt_length,
                  margin_scale=0.0)  # DPO's loss has no margin term


def as_token_ids(rows: list[dict]):
    """The pairs as the reward model's loader tokenized and cut them (rm_data.prepare_data: chat template or text +
    EOS, truncate_pair into max_length), split at reply_start into DPOTrainer's prompt / chosen / rejected ids."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt_ids": r["chosen_ids"][:r["reply_start"]],
                               "chosen_ids": r["chosen_ids"][r["reply_start"]:],
                               "rejected_ids": r["rejected_ids"][r["reply_start"]:],
                               "length": max(len(r["chosen_ids"]), len(r["rejected_ids"]))} for r in rows])


def trainer_on_token_ids():
    """DPOTrainer that trains on the token ids it is given. Its own preparation would tokenize the text again and drop
    every pair whose prompt alone fills max_length (and cut long replies' ends, EOS included), where the reward model
    keeps them cut by truncate_pair: DPO would then learn from other pairs than the reward model, and fewer than the
    manifest says. On pairs that fit, the ids are TRL's own (tests/test_dpo.py)."""
    from trl import DPOTrainer

    class DPOTrainerOnTokenIds(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return DPOTrainerOnTokenIds


def sft_policy(profile, tokenizer, sft_dir, shard: bool = False):
    """The base with the SFT LoRA merged in: DPO's starting policy, and its reference once DPO's LoRA is disabled.
    `shard`: the base sharded over every rank (FSDP2), the SFT update merged into each rank's shard."""
    from peft import PeftModel

    if profile.load_in_4bit:
        raise ConfigError("dpo merges the SFT adapter into the base in memory, which a 4-bit base cannot hold exactly: "
                          "set load_in_4bit: false in the model profile")
    return merge_into_base(PeftModel.from_pretrained(load_base(profile, tokenizer, shard=shard), str(sft_dir)))


@torch.no_grad()
def completion_logps(model, dataset, pad_token_id: int, batch_size: int) -> tuple[list[float], list[float]]:
    """Sum of log pi(token) over each completion of DPOTrainer's tokenized pairs -> (chosen, rejected), in order. Each
    distinct sequence (prompt + completion) runs once, in batches of `batch_size` pairs' worth (2 x batch_size
    sequences) of similar length: a prompt's K responses make K(K-1)/2 pairs, and pair by pair each ran K-1 times."""
    model.eval()
    device = next(model.parameters()).device
    rows = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    where: dict[tuple, int] = {}
    ends = [[where.setdefault((tuple(r["prompt_ids"]), tuple(r[k])), len(where)) for k in ("chosen_ids", "rejected_ids")]
            for r in rows]
    distinct = sorted(where, key=lambda key: len(key[0]) + len(key[1]))
    logps = [0.0] * len(distinct)
    for start in range(0, len(distinct), 2 * batch_size):
        keys = distinct[start:start + 2 * batch_size]
        ids, mask = right_pad([list(p + c) for p, c in keys], pad_token_id)
        completion = torch.zeros_like(mask)
        for i, (p, c) in enumerate(keys):
            completion[i, len(p):len(p) + len(c)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        token_logps = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        seq = (token_logps * completion[:, 1:].to(device)).sum(dim=1).cpu()
        for key, value in zip(keys, seq.tolist()):
            logps[where[key]] = value
    return [logps[c] for c, _ in ends], [logps[r] for _, r in ends]


def dpo_lora(policy) -> tuple[dict, dict]:
    """DPO's trained LoRA (state dict on the CPU, config). Called on every rank, so that nothing in a sharded model's
    state_dict() runs on one rank alone (the LoRA matrices themselves are whole on each rank: pipeline.sharding)."""
    from peft import get_peft_model_state_dict

    return ({k: v.detach().cpu() for k, v in get_peft_model_state_dict(policy).items()},
            policy.peft_config["default"].to_dict())


def save_policy(dpo_state: dict, dpo_config: dict, sft_dir, adapter_dir, base_path: str):
    """SFT LoRA + DPO LoRA -> one stock LoRA on the raw base."""
    from safetensors.torch import load_file

    sft_config = json.loads((sft_dir / "adapter_config.json").read_text())
    state, config = combine_loras(load_file(str(sft_dir / "adapter_model.safetensors")), sft_config, dpo_state,
                                  dpo_config)
    return save_lora(adapter_dir, state, config, base_path)


def check_reload(adapter_dir, profile, tokenizer, dataset, batch_size: int, chosen: list[float],
                 rejected: list[float], mixed_precision: str = "no", shard: bool = False) -> dict:
    """The saved adapter, loaded with stock peft on the raw base (as eval loads policies), must give the trained
    policy's log-probs on the first held-out pairs. Checked in float32; in other dtypes the merged SFT weights were
    rounded, and under the launch's `mixed_precision` (bf16 autocast: configs/accelerate/multi_gpu.yaml) the trained
    policy's log-probs were, so the difference is only reported. `shard`: on a base sharded over every rank, as it
    trained (every rank calls it): a base that needs sharding may not fit on one device whole."""
    from peft import PeftModel

    n = min(RELOAD_CHECK_PAIRS, len(dataset))
    model = PeftModel.from_pretrained(load_base(profile, tokenizer, shard=shard), str(adapter_dir))
    again = completion_logps(model if shard else to_device(model), dataset.select(range(n)), tokenizer.pad_token_id,
                             batch_size)
    diff = max(abs(a - b) for a, b in zip(chosen[:n] + rejected[:n], again[0] + again[1]))
    autocast = MIXED_PRECISION_DTYPE.get(mixed_precision)
    checked = profile.dtype == "float32" and autocast is None
    if checked and diff > RELOAD_ATOL_FP32:
        raise RuntimeError(f"the DPO policy saved in {adapter_dir} does not reproduce the trained policy on the raw base: "
                           f"held-out log-probs differ by up to {diff:.3g} (> {RELOAD_ATOL_FP32}): the SFT and DPO "
                           f"adapters were not combined into the policy that was trained")
    dtype = f"{autocast} (mixed precision)" if profile.dtype == "float32" and autocast else profile.dtype
    return {"max_abs_logp_diff": diff, "pairs": n, "dtype": dtype, "checked": checked, "sharded": is_sharded(model)}


def dpo_losses() -> list[str]:
    """The loss types TRL's DPOTrainer knows, as its DPOConfig's help lists them (`'sigmoid'`, `'ipo'`, ...)."""
    import re

    from trl import DPOConfig

    return re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])


def check_args(train_cfg, args: DPOArgs, run: RunArgs) -> None:
    """What the flags alone can tell (make runs it before any stage): an unknown loss type failed in TRL's first
    training step, after the run folder was written; zero epochs trained nothing and exited 0."""
    known = dpo_losses()
    unknown = [loss for loss in train_cfg.loss_type if loss not in known]
    if unknown:
        raise ConfigError(f"--loss_type {', '.join(unknown)}: TRL's DPO knows {', '.join(known)}")
    pairwise_only = pairwise_only_settings(train_cfg) if args.batch_by_prompt else []
    if pairwise_only:
        raise ConfigError(f"{', '.join(pairwise_only)}: batch_by_prompt trains DPO's sigmoid loss alone; these need "
                          f"TRL's pairwise batches (--batch_by_prompt false)")
    refuse_training_nothing(train_cfg)


def main(train_cfg, args: DPOArgs, run: RunArgs) -> dict:
    from accelerate import PartialState
    from datasets import Dataset

    check_args(train_cfg, args, run)
    shard = take_over_from_accelerate()  # FSDP config: the base is loaded sharded over the ranks (pipeline.sharding)
    state = PartialState()
    stage = StageRun("dpo", run.run, run.runs_dir)
    require_shared_runs_dir(run.runs_dir, "dpo")  # several machines: one RUNS_DIR for all, or one line
    if args.dataset_name:  # your pairs replace the mixture (its own, or rm_config's): its files are not inputs
        stage.not_inputs(preference_args(args).dataset_mixture, args.dataset_name)
    train_cfg.output_dir = str(stage.dir / "trainer")
    # Keep the `length` column for train_sampling_strategy=group_by_length (as stages/rm.py); the preference collator
    # reads only its own keys, so the other columns are harmless.
    train_cfg.remove_unused_columns = False
    profile = profile_from(run.model_config)
    base_path = resolve_base(profile.name_or_path)
    data_args = preference_args(args, train_cfg.max_length)
    config = {"dpo": to_dict(args) | {"dataset_mixture": data_args.dataset_mixture,  # as read from rm_config
                                      "max_prompt_length": data_args.max_prompt_length},
              "train": train_cfg.to_dict(), "run": to_dict(run)}

    # 0. Upstream: the SFT adapter, on this base, and combinable with DPO's LoRA (same targets, plain LoRA).
    sft, base = stage.need("sft"), base_config(profile)
    sft_dir = check_adapter(sft["outputs"]["adapter"], base, what="SFT (policy)")
    require_combinable(sft_dir, list(profile.lora_target_modules), what="SFT (policy)")

    # 1. Data (the reward model's loader, filters and split), tokenizer and model, all checked before the run folder
    #    is touched.
    tokenizer = load_tokenizer(profile)
    train_rows, eval_rows, counts, data_name = prepare_data(data_args, train_cfg, stage, tokenizer)
    check_training_length(base, train_cfg.max_length, longest_pair(train_rows + eval_rows))
    model = sft_policy(profile, tokenizer, sft_dir, shard)
    stage.prepare(config, is_main=state.is_main_process)

    # 2. Train: -log sigmoid(beta * (log-ratio chosen - log-ratio rejected)), log-ratios against the SFT reference
    #    over batches of pairs (TRL's), or of prompts (batch_by_prompt: each distinct response once; dpo_groups.py)
    peft_config = lora_config(profile, args.lora_r, args.lora_alpha, args.lora_dropout)
    trainer_class, as_dataset, collator = trainer_on_token_ids(), as_token_ids, None
    if args.batch_by_prompt:
        trainer_class = grouped_dpo_trainer(trainer_class)
        share = shares_prefix(model, args.share_prefix, train_cfg.gradient_checkpointing,
                              router_loss=getattr(model.config, "output_router_logits", False))
        as_dataset, collator = (lambda rows: Dataset.from_list(group_pairs(rows))), DPOGroupCollator(tokenizer.pad_token_id, share)
    trainer = build_trainer(lambda: trainer_class(model=model, args=train_cfg, train_dataset=as_dataset(train_rows),
                                                  eval_dataset=as_dataset(eval_rows), processing_class=tokenizer,
                                                  peft_config=peft_config, data_collator=collator),
                            train_cfg, shard)
    t0 = time.time()  # an interrupted run of the same command continues from its last checkpoint (stages/resume.py)
    result, resume_from = train_resuming(trainer, {**stage.inputs(config), "config": config})
    train_time = time.time() - t0
    trl_eval = trainer.evaluate()  # every process: TRL's held-out loss, reward accuracy and margins

    # 3. Held-out implicit rewards beta * log(pi / pi_ref), per pair, from the trained policy and the reference: on the
    #    main process, or on every rank of a sharded base (each forward gathers the weights from every rank).
    metrics = {}
    policy, eval_ds, pad = trainer.accelerator.unwrap_model(trainer.model), as_token_ids(eval_rows), tokenizer.pad_token_id
    batch = train_cfg.per_device_eval_batch_size
    if shard or state.is_main_process:
        chosen, rejected = completion_logps(policy, eval_ds, pad, batch)
        with policy.disable_adapter():
            ref_chosen, ref_rejected = completion_logps(policy, eval_ds, pad, batch)
    sharding = sharding_report(policy)  # every rank (it gathers each rank's share; it reshards the model too)
    dpo_state, dpo_config = dpo_lora(policy)

    # 4. Save the policy as one LoRA on the raw base, then reload it with stock peft (after freeing the trained model):
    #    on the main process, or on every rank of a sharded base, sharded again.
    adapter_dir = stage.dir / "adapter"
    if state.is_main_process:
        save_policy(dpo_state, dpo_config, sft_dir, adapter_dir, base_path)
        tokenizer.save_pretrained(adapter_dir)
        save_fingerprint(adapter_dir, policy.config, base_path)
    logs, steps = trainer.state.log_history, trainer.state.global_step
    del trainer, model, policy
    gc.collect()
    state.wait_for_everyone()  # the adapter is saved before a rank reads it
    if shard or state.is_main_process:
        reload = check_reload(adapter_dir, profile, tokenizer, eval_ds, batch, chosen, rejected,
                              train_cfg.mixed_precision, shard)
    if state.is_main_process:
        reward_chosen = [train_cfg.beta * (p - r) for p, r in zip(chosen, ref_chosen)]
        reward_rejected = [train_cfg.beta * (p - r) for p, r in zip(rejected, ref_rejected)]
        pairs_file = stage.dir / "eval_pairs.jsonl"
        with open(pairs_file, "w") as f:
            for r, c, j in zip(eval_rows, reward_chosen, reward_rejected):
                f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected", "source")}
                                   | {"reward_chosen": c, "reward_rejected": j}) + "\n")

        def curve(key):  # TRL logs its batch metrics with each training loss (the run's summary has no "loss")
            return [round(h[key], 4) for h in logs if "loss" in h and key in h]

        metrics = {
            **heldout_metrics(eval_rows, reward_chosen, reward_rejected),  # rewards here are beta * log(pi / pi_ref)
            "trl_eval": {k.removeprefix("eval_"): round(v, 4) for k, v in trl_eval.items()
                         if k.startswith(("eval_loss", "eval_rewards/", "eval_logps/"))},
            "train_loss": result.training_loss, "loss_curve": curve("loss"),
            "train_accuracy_curve": curve("rewards/accuracies"), "train_margin_curve": curve("rewards/margins"),
            "beta": train_cfg.beta, **data_record(counts, len(train_rows), len(eval_rows)),
            "reload_check": reload, "steps": steps, "train_time_s": round(train_time, 1),
            "resumed_from_step": step_of(resume_from) if resume_from else None,
            "peak_memory_mb": peak_memory_mb(train_cfg.device), "world_size": state.num_processes, "sharding": sharding, "data": data_name,
        }
        print_table("DPO", {k: v for k, v in metrics.items()
                            if k not in ("loss_curve", "train_accuracy_curve", "train_margin_curve", "eval_by_source",
                                         "pairs_by_source", "sharding")})
        stage.finish({"adapter": adapter_dir, "eval_pairs": pairs_file, "base_model": base_path}, metrics, config)
        drop_checkpoints(Path(train_cfg.output_dir))
    finish_distributed()
    return metrics


def CONFIG_CLASSES():
    from trl import DPOConfig

    return (DPOConfig, DPOArgs, RunArgs)


def parse_args(argv=None):
    return parse(CONFIG_CLASSES(), argv)


if __name__ == "__main__":
    main_guard(lambda: main(*parse_args(sys.argv[1:])))
