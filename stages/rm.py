"""Stage 2: reward model, a LoRA adapter plus a scalar `score` head (TRL RewardTrainer, Bradley-Terry loss).

    make rm                                    # accelerate launch ... -m stages.rm --config configs/rm.yaml
    make rm ARGS="--dataset_name my_prefs.jsonl --learning_rate 1e-4"
    python -m stages.rm --reload-check EVAL_PAIRS.jsonl DTYPE BATCH 4BIT TRUST ADAPTER_DIR...   # the stage's last check

Reads: the SFT manifest of the run (the reward model must sit on the policy's base, so that PPO can stack both
adapters on one model), the mixture its config names
(configs/rm.yaml: this run's label export alone; RECIPE=assistant: it, when present, and the bundled human
preferences in data/preferences/), or --dataset_name (any TRL preference format). Writes runs/<run>/rm/: adapter/ (PEFT SEQ_CLS:
LoRA + `score` head, tokenizer, pipeline_base.json), eval_pairs.jsonl (the held-out pairs), reload_check.json,
config.json, manifest.json (last). The stage ends by reloading the adapter (each member's, in one process) with stock
`AutoPeftModelForSequenceClassification` in a fresh process; if that copy does not reproduce the held-out
scores (e.g. a head that was not saved), the stage fails. The data steps are in stages/rm_data.py, the scoring and
the reload check in stages/rm_scoring.py.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from pipeline.config import RunArgs, lora_dropout_inert, parse, stream_seed, to_dict
from pipeline.models import (base_config, check_adapter, check_training_length, free_memory, load_base, load_tokenizer,
                             lora_config, profile_from, refuse_tokenizer_options, resolve_base, save_fingerprint,
                             require_score_class, score_head_name)
from pipeline.adapters import POOLINGS, ensemble_score, fp32_head, pool_in_forward, write_pooling
from pipeline.report import finish_distributed, peak_memory_mb, print_table
from pipeline.run import StageRun, end_with_launcher, main_guard
from pipeline.sharding import require_shared_runs_dir, sharding_report, take_over_from_accelerate
from stages.resume import build_trainer, step_of, train_resuming
from stages.rm_groups import group_by_prompt, group_collator, grouped_reward_trainer, share_prefix_inert
from stages.rm_data import check_eval_fraction, checked_mixture, data_record, longest_pair, prepare_data
from stages.rm_scoring import (check_reload, check_reload_sharded, heldout_metrics, pair_scores, reload_scores,
                               require_saved_head)


@dataclass
class RMArgs:
    # Data
    dataset_name: str | None = field(default=None, metadata={
        "help": "Your own preference data (file, folder or Hub id) in any TRL preference format; replaces the mixture."})
    dataset_split: str = field(default="train", metadata={"help": "The split of --dataset_name to read (a Hub id's, e.g. train_sft, or a folder's by its files' names)."})
    dataset_mixture: dict = field(default_factory=dict, metadata={
        "help": "Source -> {weight, max_rows}; 'label-export' is this run's labels, when present. JSON on the CLI."})
    eval_fraction: float = field(default=0.2, metadata={"help": "Share of prompts held out (no prompt, nor conversation, in both halves)."})
    margin_scale: float = field(default=0.0, metadata={"help": "0: plain Bradley-Terry; >0: margin = scale x strength."})
    margin_column: str = field(default="strength", metadata={"help": "Label strength column (a number, or slightly/much)."})
    max_prompt_length: int = field(default=64, metadata={
        "help": "A pair longer than max_length keeps at least this many of its prompt's last tokens (when the prompt "
                "has them); the responses get the rest, each keeping its beginning and its end."})
    # Training length follows the data (num_train_epochs 0 and max_steps -1 in configs/rm.yaml)
    min_steps: int = field(default=200, metadata={
        "help": "Train at least this many optimizer steps (a few hundred pairs get several epochs), at least one epoch."})
    max_epochs: float = field(default=10.0, metadata={"help": "...but never more than this many epochs."})
    evals: int = field(default=4, metadata={
        "help": "Held-out evaluations spread over the run; the adapter with the best one is kept (metric_for_best_model)."})
    ensemble: int = field(default=1, metadata={
        "help": "Reward models to train, each with its own seed (the first: seed) on the same pairs and held-out "
                "prompts; PPO and eval then use the mean of their standardised scores (Coste et al. 2023). 1: one model."})
    batch_by_prompt: bool = field(default=False, metadata={
        "help": "Batch whole prompts: each distinct response scored once, all the prompt's pairs in the loss (InstructGPT; "
                "stages/rm_groups.py). per_device_train_batch_size then counts prompts."})
    share_prefix: bool = field(default=True, metadata={
        "help": "With batch_by_prompt: the tokens all of a prompt's responses begin with (prompt, template) run once, "
                "each response after them from their cache: the same loss and gradients for less compute."})
    pooling: str = field(default="last", metadata={
        "help": "How the head's per-token outputs become the score: last (the last real token, stock "
                "*ForSequenceClassification) or sum (over the reply's tokens, / 16; pipeline.adapters.pool_scores)."})
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0

    def inert_settings(self, parsed: list) -> dict[str, str]:
        """The settings that would not act with the rest of the config (pipeline.config.parse refuses them when they
        are given on the command line): min_steps and max_epochs size the run only when neither max_steps nor
        num_train_epochs does (the assistant recipe sets num_train_epochs 1); share_prefix acts only with
        batch_by_prompt and without activation checkpointing, margin_column only with a margin_scale; under
        eval_strategy steps, `evals` sets eval_steps and save_steps (and acts under no other)."""
        train = next(c for c in parsed if hasattr(c, "num_train_epochs"))
        fixed = ("max_steps" if train.max_steps > 0 else "num_train_epochs" if train.num_train_epochs > 0 else None)
        inert = lora_dropout_inert(self.lora_dropout, parsed)
        inert |= share_prefix_inert(self.batch_by_prompt, self.share_prefix, train.gradient_checkpointing)
        if not self.margin_scale:
            inert["margin_column"] = "margin_scale 0 reads no label strength: set --margin_scale above 0 too"
        if train.eval_strategy == "steps":  # plan_steps sets both, `evals` evaluations spread over the run
            inert.update({key: f"plan_steps sets it from evals ({self.evals} over the run): give --evals instead"
                          for key in ("eval_steps", "save_steps")})
        else:
            strategy = getattr(train.eval_strategy, "value", train.eval_strategy)  # TrainingArguments' enum
            inert["evals"] = f"eval_strategy is {strategy}: evals spreads evaluations only under steps"
        if fixed is None:
            return inert
        why = (f"{fixed} {getattr(train, fixed):g} fixes the training length (plan_steps): set --{fixed} "
               f"{-1 if fixed == 'max_steps' else 0} too, for min_steps and max_epochs to size it")
        return {**inert, "min_steps": why, "max_epochs": why}

    def __post_init__(self):
        self.dataset_mixture = checked_mixture(self.dataset_mixture)
        check_eval_fraction(self.eval_fraction)
        for name, positive in (("min_steps", self.min_steps >= 1), ("max_epochs", self.max_epochs > 0),
                               ("evals", self.evals >= 1)):
            if not positive:  # one name per message: the error blames the key its text names (pipeline.config.parse)
                raise ValueError(f"{name} must be positive")
        if self.ensemble < 1:
            raise ValueError(f"--ensemble {self.ensemble}: the number of reward models to train must be at least 1")
        if self.pooling not in POOLINGS:
            raise ValueError(f"--pooling {self.pooling}: one of {', '.join(POOLINGS)}")


def plan_steps(n_train: int, train_cfg, args: RMArgs, world_size: int) -> dict:
    """Optimizer steps for this much data, set on train_cfg. max_steps or num_train_epochs when set (> 0); else at
    least min_steps and one epoch, at most max_epochs: 300 pairs get ~3 epochs at min_steps 100, the bundled mixture one.
    With eval_strategy "steps", `evals` held-out evaluations (and checkpoints) spread evenly, the last at the end."""
    per_epoch = math.ceil(n_train / (train_cfg.per_device_train_batch_size * train_cfg.gradient_accumulation_steps
                                     * world_size))
    if train_cfg.max_steps > 0:
        steps = train_cfg.max_steps
    elif train_cfg.num_train_epochs > 0:
        steps = math.ceil(train_cfg.num_train_epochs * per_epoch)
    else:
        steps = min(max(per_epoch, args.min_steps), math.ceil(args.max_epochs * per_epoch))
    eval_steps = None
    if train_cfg.eval_strategy == "steps":
        eval_steps = max(1, math.ceil(steps / args.evals))
        steps = eval_steps * math.ceil(steps / eval_steps)  # the last step is evaluated too
        train_cfg.eval_steps = train_cfg.save_steps = eval_steps
    train_cfg.max_steps = steps
    return {"steps": steps, "steps_per_epoch": per_epoch, "epochs": round(steps / per_epoch, 2), "eval_steps": eval_steps}


def check_args(train_cfg, args: RMArgs, run: RunArgs) -> None:
    """What the flags alone can tell (make runs it before any stage, so not after SFT and the labels)."""
    refuse_tokenizer_options(train_cfg, "rm", run.model_config)
    require_score_class(run.model_config)


def main(train_cfg, args: RMArgs, run: RunArgs) -> dict:
    from accelerate import PartialState
    from datasets import Dataset

    check_args(train_cfg, args, run)
    state = PartialState()
    shard = take_over_from_accelerate()  # FSDP config: the base is loaded sharded over the ranks (pipeline.sharding)
    stage = StageRun("rm", run.run, run.runs_dir)
    require_shared_runs_dir(run.runs_dir, "rm")  # several machines: one RUNS_DIR for all, or one line
    if args.dataset_name:  # your pairs replace the mixture: its files are not inputs of this run
        stage.not_inputs(args.dataset_mixture, args.dataset_name)
    train_cfg.output_dir = str(stage.dir / "trainer")
    # Keep the `length` column for train_sampling_strategy=group_by_length (the sampler is built after unused columns
    # are removed); the preference collator reads only its own keys, so extra columns are harmless.
    train_cfg.remove_unused_columns = False
    config = {"rm": to_dict(args), "train": train_cfg.to_dict(), "run": to_dict(run)}
    profile = profile_from(run.model_config)
    base_path = resolve_base(profile.name_or_path)

    # 0. Upstream: the SFT adapter must sit on this very base (PPO stacks policy and reward adapters on one model).
    sft, base = stage.need("sft"), base_config(profile)
    check_adapter(sft["outputs"]["adapter"], base, what="SFT (policy)")

    # 1. Data and tokenizer, all checked before anything in the run folder is touched.
    tokenizer = load_tokenizer(profile)
    train_rows, eval_rows, counts, data_name = prepare_data(args, train_cfg, stage, tokenizer)
    check_training_length(base, train_cfg.max_length, longest_pair(train_rows + eval_rows))
    stage.prepare(config, is_main=state.is_main_process)

    def as_dataset(rows):  # already tokenized: RewardTrainer only pads and batches
        if args.batch_by_prompt:
            return Dataset.from_list(group_by_prompt(rows))
        cols = {"chosen_ids": [r["chosen_ids"] for r in rows], "rejected_ids": [r["rejected_ids"] for r in rows],
                "length": [max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]}
        if args.margin_scale:  # RewardTrainer subtracts a `margin` column inside the log-sigmoid
            cols["margin"] = [r["margin"] for r in rows]
        return Dataset.from_dict(cols)

    # 2. Model: the policy's base as a 1-output sequence classifier, LoRA on the profile's layers. Task SEQ_CLS makes
    #    peft put the `score` head in modules_to_save: trained in full and saved with the LoRA weights.
    # 3. Train (Bradley-Terry: -log sigmoid(r_chosen - r_rejected [- margin]) [+ centering]) for as many steps as the
    #    data needs (plan_steps), evaluating on the held-out prompts along the way; the best adapter is kept
    #    (load_best_model_at_end, metric_for_best_model in configs/rm.yaml). With `ensemble` > 1, the same again with
    #    a seed of its own per member (stream_seed): same pairs, same held-out prompts, another head init and batch
    #    order.
    peft_config = lora_config(profile, args.lora_r, args.lora_alpha, args.lora_dropout, task_type="SEQ_CLS")
    train_set, eval_set = as_dataset(train_rows), as_dataset(eval_rows)
    plan = plan_steps(len(train_set), train_cfg, args, state.num_processes)  # pairs, or prompts with batch_by_prompt
    n, seed, trainer_root = len(eval_rows), train_cfg.seed, Path(train_cfg.output_dir)
    run_key = {**stage.inputs(config), "config": config}  # an interrupted run of the same command resumes each member
    members, member_seeds = [], [stream_seed(seed, i) for i in range(args.ensemble)]  # trained with, and recorded
    for i, member_seed in enumerate(member_seeds):
        train_cfg.seed, train_cfg.output_dir = member_seed, str(trainer_root / f"member-{i}")
        adapter_dir = stage.dir / "adapter" if i == 0 else stage.dir / f"member-{i}" / "adapter"
        if args.ensemble > 1 and state.is_main_process:
            print(f"reward model {i + 1} of {args.ensemble} (seed {member_seed}) -> {adapter_dir}", flush=True)
        # a config of its own: peft adds the score head to the modules_to_save of the config it is given, in place
        members.append(train_member(train_cfg, plan, profile, tokenizer, shard, copy.deepcopy(peft_config), train_set, eval_set, eval_rows,
                                    adapter_dir, args, {**run_key, "member": i}))
    train_cfg.seed, train_cfg.output_dir = seed, str(trainer_root)

    # 4. The held-out pairs, each member's reload check (the same scores from a fresh process; on a sharded base from
    #    every rank, the base sharded again: a base that needs sharding may not fit whole on one device) and, on the
    #    main process, the figures of the ensemble's score (one member: its own score), the score PPO gets.
    metrics, pairs_file = {}, stage.dir / "eval_pairs.jsonl"
    adapters, scores = [m["adapter"] for m in members], [(m["scores"][:n], m["scores"][n:]) for m in members]
    if state.is_main_process:
        with open(pairs_file, "w") as f:  # with the token ids as scored (truncated as trained)
            for r in eval_rows:
                keys = ("prompt", "chosen", "rejected", "source", "margin", "chosen_ids", "rejected_ids", "reply_start")
                f.write(json.dumps({k: r[k] for k in keys}) + "\n")
        for m in members:
            complete_folder(m, tokenizer, base_path)
    state.wait_for_everyone()  # the folders are complete before a rank reads them
    if shard:
        reloads, reload_seconds = check_reload_sharded(adapters, profile, tokenizer, eval_rows, scores,
                                                       train_cfg.per_device_eval_batch_size, train_cfg.mixed_precision)
    elif state.is_main_process:
        reloads, reload_seconds = check_reload(adapters, pairs_file, scores, profile.dtype,
                                               train_cfg.per_device_eval_batch_size, profile.load_in_4bit,
                                               train_cfg.mixed_precision, profile.trust_remote_code)
    if state.is_main_process:
        member_rows = [member_row(m, member_seed, eval_rows, reload)
                       for m, member_seed, reload in zip(members, member_seeds, reloads)]
        joint = ensemble_score(torch.tensor([m["scores"] for m in members]),
                               [(r["reward_mean"], r["reward_std"]) for r in member_rows]).tolist()
        metrics = {**heldout_metrics(eval_rows, joint[:n], joint[n:]),
                   **members[0]["record"],  # the first member's training curve
                   **data_record(counts, len(train_rows), n),
                   "reload_check": member_rows[0]["reload_check"], "reload_check_s": reload_seconds,
                   "ensemble": len(members), "members": member_rows,
                   "train_time_s": round(sum(m["train_time"] for m in members), 1), "peak_memory_mb": peak_memory_mb(train_cfg.device),
                   "world_size": state.num_processes, "sharding": members[0]["sharding"], "data": data_name}
        title = "RM" if len(members) == 1 else (f"RM: an ensemble of {len(members)}; the held-out eval_ figures are the "
                                                 f"ensemble's, the training ones (loss, accuracy, best) its first member's")
        print_table(title, {k: v for k, v in metrics.items()
                           if k not in ("loss_curve", "eval_curve", "eval_by_source", "pairs_by_source", "sharding", "members")})
        for r in member_rows if len(member_rows) > 1 else []:
            print(f"  member seed {r['seed']}: held-out accuracy {r['eval_accuracy']}, best step {r['best_step']}, "
                  f"{r['train_time_s']} s")
        for source, c in sorted(counts.items()):
            m = metrics["eval_by_source"].get(source, {})
            print(f"  {source:>14}: read {c['read']}, dropped {c['equal']} equal / {c['empty']} empty, cut {c['prompt_cut']} "
                  f"prompts / {c['response_cut']} responses; train {c['train']}, eval {c['eval']}: accuracy "
                  f"{m.get('accuracy')} {m.get('ci95', '')} (longer wins: {m.get('longer_wins_accuracy')})")
        stage.finish({"adapter": members[0]["adapter"], "members": json.dumps([str(m["adapter"]) for m in members]),
                      "eval_pairs": pairs_file, "base_model": base_path}, metrics, config)
        tidy(stage.dir, trainer_root, len(members))
    finish_distributed()
    return metrics


def train_member(train_cfg, plan: dict, profile, tokenizer, shard, peft_config, train_set, eval_set, eval_rows,
                 adapter_dir: Path, args: RMArgs, resume_key: dict) -> dict:
    """One reward model: train (from its newest checkpoint when an interrupted run of the same command left one:
    stages/resume.py), save its adapter (every rank: on a sharded base the Trainer gathers it whole), then its
    held-out scores (every rank: score() spreads the batches and gathers the scores), chosen then rejected."""
    from transformers import set_seed
    from trl import RewardTrainer

    # The head is freshly initialised at load time, before the Trainer seeds anything: seed first, or every run of
    # the same config starts from a different head and ends with different metrics.
    set_seed(train_cfg.seed)
    model = load_base(profile, tokenizer, kind="score", shard=shard)
    trainer_class, collator = RewardTrainer, None
    if args.batch_by_prompt:
        trainer_class = partial(grouped_reward_trainer(), score_pooling=args.pooling)
        collator = group_collator(model, tokenizer.pad_token_id, bool(args.margin_scale), args.share_prefix,
                                  train_cfg.gradient_checkpointing)
    trainer = build_trainer(lambda: trainer_class(model=model, args=train_cfg, train_dataset=train_set, eval_dataset=eval_set,
                                                  processing_class=tokenizer, peft_config=peft_config, data_collator=collator),
                            train_cfg, shard)
    pool_in_forward(trainer.model, args.pooling)  # the loss, the held-out passes and score() all read the pooled score
    # The head in fp32 (peft leaves it in the base's dtype: on a bf16 base small AdamW steps round away), its input
    # cast up to it: trained, saved and scored in fp32. An fp32 base is unchanged.
    classifier = trainer.model.get_base_model()
    fp32_head(getattr(classifier, score_head_name(classifier)))
    t0 = time.time()
    result, resume_from = train_resuming(trainer, resume_key)
    train_time = time.time() - t0
    trainer.save_model(str(adapter_dir))
    scores = pair_scores(trainer.model, eval_rows, tokenizer.pad_token_id, train_cfg.per_device_eval_batch_size,
                         args.pooling)
    kept = {"adapter": adapter_dir, "scores": scores, "pooling": args.pooling, "train_time": train_time, "config": trainer.model.config,
            "head": score_head_name(trainer.model), "sharding": sharding_report(trainer.model),
            "record": training_record(trainer.state, result, plan, train_cfg),
            "resumed_from_step": step_of(resume_from) if resume_from else None}
    del trainer, model  # the next member loads its own base: free this one first
    free_memory()
    return kept


def tidy(stage_dir: Path, trainer_root: Path, members: int) -> None:
    """Once the manifest is written: each member's Trainer folder (its checkpoints: the best ones are the adapters
    now; a crash in the reload check or before the manifest still resumes every member from them instead of training
    it again), but for the Trainer's logs (`runs/`, with `--report_to tensorboard`); and the members an earlier,
    larger ensemble left in the folder, whose adapters are no part of this reward model."""
    for member in trainer_root.glob("member-*"):
        for path in member.iterdir():
            if path.name != "runs":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    for folder in [*trainer_root.glob("member-*"), trainer_root]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # nothing was logged there
    for folder in stage_dir.glob("member-*"):
        if folder.name.removeprefix("member-").isdigit() and int(folder.name.removeprefix("member-")) >= members:
            shutil.rmtree(folder)


def complete_folder(member: dict, tokenizer, base_path) -> None:
    """A trained member's folder completed: tokenizer, base fingerprint, pooling; its head checked."""
    adapter = member["adapter"]
    tokenizer.save_pretrained(adapter)
    save_fingerprint(adapter, member["config"], base_path)
    require_saved_head(adapter, member["head"])
    write_pooling(adapter, member["pooling"])


def member_row(member: dict, seed: int, eval_rows: list[dict], reload: dict) -> dict:
    """A member's row of the manifest: held-out figures, the statistics that standardise it in an ensemble, timing,
    its reload check (the same scores from a fresh process)."""
    s, n = member["scores"], len(eval_rows)
    own = heldout_metrics(eval_rows, s[:n], s[n:])
    return {"adapter": str(member["adapter"]), "seed": seed,
            **{k: own[k] for k in ("eval_accuracy", "eval_loss", "reward_mean", "reward_std")},
            "best_step": member["record"]["best_step"], "train_time_s": round(member["train_time"], 1),
            "resumed_from_step": member["resumed_from_step"], "reload_check": reload}


def training_record(state, result, plan: dict, train_cfg) -> dict:
    """The training curve, the held-out evaluations along it, and which one was kept."""
    logs = state.log_history
    evals = [{"step": h["step"], "eval_loss": round(h["eval_loss"], 4), "eval_accuracy": round(h.get("eval_accuracy", 0), 4)}
             for h in logs if "eval_loss" in h]
    best = state.best_model_checkpoint
    return {"train_loss": result.training_loss, "loss_curve": [h["loss"] for h in logs if "loss" in h],
            "train_accuracy_last": next((h["accuracy"] for h in reversed(logs) if "accuracy" in h), None),
            "steps": state.global_step, **{f"plan_{k}": v for k, v in plan.items()}, "eval_curve": evals,
            "best_step": int(best.rsplit("-", 1)[-1]) if best else None,
            "best_metric": {train_cfg.metric_for_best_model: state.best_metric} if best else None}


def CONFIG_CLASSES():
    from trl import RewardConfig

    return (RewardConfig, RMArgs, RunArgs)


def parse_args(argv=None):
    return parse(CONFIG_CLASSES(), argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reload-check"]:
        end_with_launcher()  # started by the stage: it ends with the stage, which ends with the launcher
        reload_scores(*sys.argv[2:])
    else:
        main_guard(lambda: main(*parse_args()))
