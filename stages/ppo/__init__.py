"""Stage: PPO with LoRA adapters on ONE frozen base model (our own; TRL removed its PPOTrainer in 1.13).

    make ppo                          # accelerate launch ... -m stages.ppo --config configs/ppo.yaml --run default
    make ppo ARGS="--total_updates 100 --kl_coef 0.1"
    make ppo ARGS="--resume"          # continue from the last checkpoint (a killed run also continues by itself)

Reads: runs/<run>/sft/manifest.json (policy + reference adapter), runs/<run>/rm/manifest.json (reward adapter +
score head, and its reward_mean/reward_std), the prompts its config names (configs/ppo.yaml: data/story/ppo_prompts.jsonl;
RECIPE=assistant: data/prompts/oasst_ppo_prompts.jsonl) or --dataset_name. Writes runs/<run>/ppo/: adapter/ (the policy: stock PEFT + tokenizer + pipeline_base.json),
value_adapter/, metrics.jsonl (one line per update), samples.jsonl (with sample_every), policies/ (every
keep_policy_every updates), heldout_prompts.jsonl, checkpoints/, config.json, manifest.json (last).

One base, its adapters (pipeline.adapters.AdapterStack): policy (trainable, from SFT), reference (SFT, frozen), value
(trainable, LoRA + scalar head initialised from the RM: Stiennon et al. 2020; GAE only, the critic-free estimators
have none) and one reward adapter per member of the RM's ensemble (frozen; three in the default run).
rollout.py samples and scores, losses.py holds the PPO arithmetic, trainer.py the loop and checkpoints.
Launched with an FSDP accelerate config (or --shard_base true), the frozen base is loaded sharded across the processes
with torch FSDP2 (pipeline/sharding.py, the engine of every stage; sharding.py decides): each rank holds ~1/world
of it, so a base larger than one GPU trains.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import torch

from pipeline.adapters import fp32_head, reward_members
from pipeline.config import ConfigError, RunArgs, parse, resolve_path, to_dict
from pipeline.generation import keep_end, reply_closing_tokens
from pipeline.models import is_main_process, launch_mixed_precision
from pipeline.run import StageRun
from pipeline.report import finish_distributed, peak_memory_mb, print_table
from pipeline.sharding import process_state, requested as fsdp_requested, take_over_from_accelerate

from .config import SCHEDULERS_OVER_TOTAL, PPOConfig
from .sharding import base_numel, sharding_wanted
from .trainer import PPOTrainer, checkpoint_info, latest_checkpoint


def print_once(note: str) -> None:
    """A note about the prompts, which every rank reads alike: from the main process only."""
    if is_main_process():
        print(note, file=sys.stderr)


def bundled_prompts_note(cfg: PPOConfig, sft: dict | None) -> str | None:
    """A note when SFT learned from your data and PPO samples the bundled prompts (no --dataset_name; the config's
    prompts_file under data/): the policy is trained, and eval measures it, on the story's openings, not your task."""
    from pipeline.data import own_files

    sft_config = ((sft or {}).get("config") or {}).get("sft") or {}
    yours = sft_config.get("dataset_name") or ", ".join(own_files(sft_config.get("dataset_mixture") or {}))
    if not yours or cfg.dataset_name or own_files([cfg.prompts_file]):
        return None
    return (f"note: {cfg.stage_name} samples the bundled prompts {cfg.prompts_file} while SFT learned from your data "
            f"({yours}): the policy is trained and evaluated on those; give your prompts with "
            f"{cfg.stage_name.upper()}_ARGS=\"--dataset_name FILE\" (a 'prompt' column) or prompts_file in its config")


def load_prompts(cfg: PPOConfig, tokenizer):
    """(train conversations, their token ids, held-out conversations, notes). Held-out = a seeded fixed share."""
    from pipeline.data import load_rows, prompt_of, prompt_problem
    from pipeline.generation import chat_ids

    source = cfg.dataset_name or cfg.prompts_file
    rows, columns = load_rows(source, cfg.dataset_split if cfg.dataset_name else "train")  # an empty .jsonl: one error
    if not rows:
        raise ConfigError(f"prompt set {source} is empty: give at least one prompt")
    if "prompt" in columns or "messages" in columns:
        raw = [prompt_of(row) for row in rows]  # conversations: the prompt is everything before the last assistant turn
    else:
        raise ConfigError(f"prompt set {source} has no 'prompt' (or 'messages') column, only {columns}: "
                          "give rows like {\"prompt\": [{\"role\": \"user\", \"content\": \"...\"}]} or {\"prompt\": \"...\"}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    convs = []
    for i, p in enumerate(raw):
        problem = prompt_problem(p)
        if problem:
            raise ConfigError(f"prompt set {source} row {i + 1}: {problem}: give a text or a list of "
                              f"{{\"role\", \"content\"}} messages")
        if isinstance(p, str):
            convs.append([{"role": "user", "content": p}] if has_template else p)
        else:
            if not has_template:
                raise ConfigError("the tokenizer has no chat template, so conversational prompts cannot be encoded: "
                                  "set chat_template in the model profile, or give plain-text prompts")
            convs.append([{"role": m["role"], "content": m["content"]} for m in p])

    # A prompt given several times (a conversation dataset with several replies to one prompt) is one prompt: split
    # after removing the repeats, or the held-out prompts eval scores would also be training prompts.
    distinct = list({json.dumps(c, sort_keys=True): c for c in convs}.values())
    repeats, convs = len(convs) - len(distinct), distinct
    order = list(range(len(convs)))
    random.Random(cfg.seed).shuffle(order)
    n_held = int(len(convs) * cfg.heldout_fraction)
    heldout = [convs[i] for i in sorted(order[:n_held])]
    train = [convs[i] for i in sorted(order[n_held:])]
    if not train:
        raise ConfigError(f"no training prompts left after holding out {n_held} of {len(convs)}: lower heldout_fraction")

    ids = []
    for c in train + heldout:  # the held-out ones too: a prompt the template refuses stopped `make eval`, after PPO
        if isinstance(c, str):
            ids.append(list(tokenizer(c)["input_ids"]))
        else:
            try:
                ids.append(chat_ids(tokenizer, c, add_generation_prompt=True))
            except ConfigError as err:
                raise ConfigError(f"prompt set {source}: {err}") from None
    ids = ids[:len(train)]
    limit = cfg.max_prompt_length
    long = [i for i, s in enumerate(ids) if len(s) > limit]
    notes = {"prompts_total": len(convs), "prompts_heldout": n_held, "prompts_long": len(long),
             "prompts_repeated": repeats}
    if long:
        what = (f"{len(long)} of {len(ids)} training prompts are longer than max_prompt_length={limit} tokens "
                f"(longest {max(len(ids[i]) for i in long)})")
        if cfg.long_prompts == "error":
            raise ConfigError(f"{what}: raise max_prompt_length, or set long_prompts to drop or truncate")
        if cfg.long_prompts == "truncate":
            ids = [keep_end(s, limit, tokenizer.bos_token_id) for s in ids]  # latest turn + assistant header
            print_once(f"note: {what}; they were cut to {limit} tokens: their end, after a leading BOS (long_prompts: "
                       f"truncate)")
        else:
            keep = [i for i in range(len(ids)) if i not in set(long)]
            if not keep:
                raise ConfigError(f"{what}: none is left to train on; raise max_prompt_length or set long_prompts: truncate")
            train, ids = [train[i] for i in keep], [ids[i] for i in keep]
            print_once(f"note: {what}; they were dropped (long_prompts: drop; truncate keeps their end instead)")
    notes["prompts_train"] = len(ids)
    return train, ids, heldout, notes


def disable_dropout(model) -> None:
    """PPO's ratio compares two forwards of the same weights: dropout would make it noise (Ziegler et al. 2019)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def upcast_trainable(stack) -> None:
    """Every trainable tensor in fp32, whatever the base dtype: peft upcasts LoRA weights but not `modules_to_save`
    heads, and on a bf16 base a small AdamW step on a bf16 head rounds away. The scalar heads
    (reward's too) run in fp32: the hidden state is cast up to them (pipeline.adapters.fp32_head, head_output)."""
    fp32_head(stack.causal_lm.score)
    for name in stack.trainable:
        for _, p in stack.adapter_parameters(name):
            p.data = p.data.float()


def check_adapter_kinds(sft_dir: Path, rm_dir: Path) -> None:
    """The policy must be a causal-LM adapter and the reward a SEQ_CLS one (swapped, PPO would train nonsense)."""
    for what, folder, expected in (("reward", rm_dir, "SEQ_CLS"), ("sft", sft_dir, "CAUSAL_LM")):
        cfg_file = Path(folder) / "adapter_config.json"
        task = json.loads(cfg_file.read_text()).get("task_type") if cfg_file.is_file() else None
        if task is not None and task != expected:
            kind = "a reward model (SEQ_CLS with a score head)" if expected == "SEQ_CLS" else "a causal-LM policy adapter"
            raise ConfigError(f"{what} adapter {folder} is not {kind}: its task_type is {task}")


def build_stack(profile, tokenizer, sft_dir: Path, rm_dir: Path, device, gradient_checkpointing: bool,
                shard: bool = False, with_value: bool = True, reward_ensemble=None):
    """The base with its adapters (no value adapter for critic-free estimators). `shard`: the base loaded sharded over
    all ranks (pipeline.sharding: each rank keeps only its shard of each weight, on its device); the adapters and
    heads put on it afterwards stay whole.
    `reward_ensemble` (adapters.reward_members of the rm manifest): an ensemble's other members are loaded too, and
    stack.scores("reward") is then their ensemble_score; the value starts from rm_dir, the first member."""
    from pipeline.adapters import AdapterStack
    from pipeline.models import load_base

    check_adapter_kinds(sft_dir, rm_dir)
    base = load_base(profile, tokenizer, shard=shard)
    if not profile.load_in_4bit and not shard:  # a 4-bit base is placed on its GPU when loaded, a sharded one too
        base.to(device)
    try:
        members, member_stats = reward_ensemble or ({"reward": rm_dir}, [(0.0, 1.0)])
        adapters = {"policy": sft_dir, "reference": sft_dir, "value": rm_dir, "reward": rm_dir,
                    **{name: path for name, path in members.items() if name != "reward"}}
        if not with_value:  # critic-free estimators (grpo, rloo, reinforce_pp): three adapters (+ reward members)
            del adapters["value"]
        stack = AdapterStack.build(profile, tokenizer, adapters, trainable=("policy", "value"), base_model=base)
        stack.add_ensemble("reward", list(members), member_stats)
    except ConfigError:  # check_adapter's own line (a missing or damaged adapter) names the adapter and the fix
        raise
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatches of an adapter made for another base
        raise ConfigError(f"could not put the sft adapter {sft_dir} and reward adapter {rm_dir} on base "
                          f"{profile.name_or_path}: {str(err).splitlines()[0]}") from None
    head = stack.causal_lm.score
    if "reward" not in getattr(head, "modules_to_save", {}):
        raise ConfigError(f"reward adapter {rm_dir} carries no `score` head: it must be the rm stage's SEQ_CLS adapter")
    upcast_trainable(stack)
    disable_dropout(stack.model)
    if gradient_checkpointing:
        lm = stack.causal_lm
        enable = getattr(lm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stack.sharded = shard  # rollout: the sampling loops then end together on every rank (lockstep)
    return stack


def adapter_digest(folder: Path) -> str:
    """sha256 of an adapter's weights and config: what a PPO checkpoint was trained from."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        f = Path(folder) / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# Settings a run may change and still continue from its checkpoint: how long it runs and what it logs. Any other change
# (a rate, kl_coef, the seed, the prompts, keep_policy_every) would leave the checkpoint's optimizer, KL controller and
# data order in charge while the manifest records the new values: such a run starts over instead. total_updates is
# safe only under a schedule that does not span it (constant, ...): the default linear decay rebuilt over another total
# would jump to the new schedule's rate mid-run (update 25 of 48 at 0.5x learning_rate -> 0.74x of 96).
RESUME_SAFE = ("total_updates", "stop_after", "resume", "auto_resume", "save_every", "sample_every", "progress_bar",
               "report_to")


def trained_from(upstream: dict, config: dict, prompts: list, world_size: int = 1) -> dict:
    """What a checkpoint records and a resume must match: the sft/rm adapters' digests, the settings that shape
    training (config["ppo"] less RESUME_SAFE, the model profile, and the number of processes: each samples its own
    episodes, so a rerun under another launch changed the batch mid-run) and the training prompts' digest."""
    settings = {k: v for k, v in config["ppo"].items() if k not in RESUME_SAFE}
    settings["world_size"] = world_size
    if config["ppo"]["lr_scheduler_type"] in SCHEDULERS_OVER_TOTAL:
        settings["total_updates"] = config["ppo"]["total_updates"]
    settings["model_config"] = config["run"].get("model_config")
    settings["model_profile"] = profile_record(config["run"].get("model_config"))
    settings["mixed_precision"] = launch_mixed_precision()  # the launch's autocast changes every forward
    digest = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:16]
    return {**upstream, "settings": settings, "prompts": digest}


def profile_record(path: str | None) -> dict | None:
    """The model profile's contents, not only its path: a profile edited in place (dtype, base, chat template) makes
    another run. A chat template file counts by its digest."""
    if not path:
        return None
    from dataclasses import asdict

    from pipeline.models import is_template_text, profile_from
    from pipeline.run import file_digest

    record = asdict(profile_from(path))
    record.pop("description", None)  # words about the base, not the base
    if record.get("chat_template") and not is_template_text(record["chat_template"]):  # the text is in the record
        record["chat_template_digest"] = file_digest(resolve_path(record["chat_template"]))
    return record


def resume_mismatch(before: dict | None, now: dict) -> str | None:
    """Why a checkpoint trained from `before` (checkpoint.json's "upstream") cannot continue as `now`; None if it can."""
    if not before:
        return "does not record what it was trained from"
    if any(before.get(k) != now.get(k) for k in ("sft", "rm", "rm_members")):
        adapters = lambda u: {k: u.get(k) for k in ("sft", "rm")}  # noqa: E731
        return f"was trained from other sft/rm adapters ({adapters(before)} vs now {adapters(now)})"
    old, new = before.get("settings"), now["settings"]
    if old is None:
        return "does not record the settings it was trained with"
    # Checkpoints written before the launch's mixed precision was recorded ran without autocast: PPO ignored it then.
    # Those written before the number of processes was recorded say nothing of it: taken as this run's.
    old, new = ({"mixed_precision": "no", "world_size": new.get("world_size"), **settings} for settings in (old, new))
    flat = lambda settings: {**{k: v for k, v in settings.items() if k != "model_profile"},  # noqa: E731
                             **{f"model_profile.{k}": v for k, v in (settings.get("model_profile") or {}).items()}}
    old, new = flat(old), flat(new)  # a profile's changes name its fields, not the whole record
    changed = [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        return f"was trained with other settings ({', '.join(changed)})"
    if before.get("prompts") != now["prompts"]:
        return "was trained on other prompts (the prompt file's rows changed)"
    return None


def choose_resume(cfg: PPOConfig, stage: StageRun, upstream: dict) -> Path | None:
    """The checkpoint to continue from, or None to start over (with a note saying why). `upstream`: trained_from().
    The logs a resume keeps are read here too: a damaged one is refused before the run folder is touched (the trainer
    reads them only after, when a finished run's manifest is gone)."""
    from .trainer import logged_rows

    chosen = checkpoint_to_resume(cfg, stage, upstream)
    if chosen is not None:
        for log in ("metrics.jsonl", "samples.jsonl"):
            if (stage.dir / log).exists():
                logged_rows(stage.dir / log)
    return chosen


def checkpoint_to_resume(cfg: PPOConfig, stage: StageRun, upstream: dict) -> Path | None:
    ckpt = latest_checkpoint(stage.dir)
    if ckpt is None:
        if cfg.resume:
            raise ConfigError(f"--resume: there is no checkpoint under {stage.dir / 'checkpoints'} to continue from; "
                              f"run without --resume to start training")
        return None
    mismatch = resume_mismatch(checkpoint_info(ckpt).get("upstream"), upstream)
    if mismatch:
        why = f"checkpoint {ckpt.name} {mismatch}"
        if cfg.resume:
            # a checkpoint that records nothing (an earlier version's) has no settings to resume with
            fix = "" if mismatch.startswith("does not record") else ", or resume with its settings"
            raise ConfigError(f"--resume: {why}; run without --resume to start over{fix}")
        if cfg.auto_resume and not stage.manifest_path.exists():
            print(f"note: {why}: starting over instead of resuming", file=sys.stderr)
        return None
    done = checkpoint_info(ckpt).get("update", 0)
    if done > cfg.total_updates:  # a schedule that does not span total_updates lets it change, not below what is done
        why = f"checkpoint {ckpt.name} holds {done} updates, past total_updates {cfg.total_updates}"
        if cfg.resume:
            raise ConfigError(f"--resume: {why}: give --total_updates {done} or more, or run without --resume to start "
                              f"over")
        if cfg.auto_resume and not stage.manifest_path.exists():
            print(f"note: {why}: starting over instead of resuming", file=sys.stderr)
        return None
    if cfg.resume:
        return ckpt
    # An interrupted run: no manifest. A checkpoint that already holds every update (killed before the manifest) is
    # resumed too: it writes the outputs without training again.
    return ckpt if cfg.auto_resume and not stage.manifest_path.exists() else None


def rm_score_stats(rm_metrics: dict) -> tuple[float, float] | None:
    """(reward_mean, reward_std) of the reward model's scores, from its manifest, to standardise PPO's rewards with;
    None without them, or with a std of 0 (a reward model scoring every pair alike: dividing by it would blow the
    scores up to the clip)."""
    mean, std = rm_metrics.get("reward_mean"), rm_metrics.get("reward_std")
    if mean is None or not std:
        return None
    return float(mean), float(std)


def reward_normalisation(normalize: bool, reward_fn, rm_metrics: dict, is_main: bool) -> tuple[float, float] | None:
    """The (mean, std) PPO standardises its scores with: the rm manifest's, under `normalize_reward`, unless a reward
    function of your own replaces the reward model; None (raw scores) otherwise, said once when the manifest has none."""
    if not normalize or reward_fn is not None:
        return None
    stats = rm_score_stats(rm_metrics)
    if stats is None and is_main:
        print("note: normalize_reward is on but the rm manifest gives no reward_mean and reward_std (or a std of "
              "0): raw scores are used", file=sys.stderr)
    return stats


def broadcast(state, obj):
    """Rank 0's `obj` on every rank."""
    if state.num_processes == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main(cfg: PPOConfig, run: RunArgs, reward_fn=None) -> dict:
    """Run the stage. `reward_fn(prompts, response_ids, response_mask, texts) -> [B] scores` replaces the reward
    adapter's score (tests use a toy reward a tiny model can learn); the manifest then says so."""
    from transformers import set_seed

    from pipeline.models import (base_config, check_adapter, check_context, load_tokenizer, profile_from, resolve_base,
                                 save_fingerprint)

    # An FSDP config: this stage shards the base itself when it loads it (pipeline.sharding), accelerate must not.
    take_over_from_accelerate()
    fsdp_config = fsdp_requested()
    state = process_state()  # CPU ranks counted (ACCELERATE_USE_CPU), the Trainer stages' collective timeout
    stage = StageRun(cfg.stage_name, run.run, run.runs_dir)  # ppo, or grpo / rloo / reinforce_pp
    if cfg.dataset_name:  # your prompts replace the bundled ones: not an input of this run
        stage.not_inputs([cfg.prompts_file], cfg.dataset_name)
    check_args(cfg, run)
    profile = profile_from(run.model_config)
    base_path = resolve_base(profile.name_or_path)

    # 0. Upstream: the SFT adapter (policy + reference) and the reward model (reward + value init)
    sft = None if cfg.sft_adapter else stage.need("sft")
    sft_dir = resolve_path(cfg.sft_adapter) if cfg.sft_adapter else Path(sft["outputs"]["adapter"])
    if cfg.sft_adapter:  # your folder, which no stage makes: its errors name the flag (a stage's output: FORCE=1)
        check_adapter(sft_dir, base_config(profile), "SFT (policy)", flag="--sft_adapter")
    note = bundled_prompts_note(cfg, sft)
    if note:
        print_once(note)
    rm_metrics = {}
    if cfg.reward_adapter:
        rm_dir = resolve_path(cfg.reward_adapter)
        check_adapter(rm_dir, base_config(profile), "reward", flag="--reward_adapter")
        rewards, reward_member_stats = {"reward": rm_dir}, [(0.0, 1.0)]
    else:  # the rm stage's reward model: one adapter, or an ensemble of them (its `ensemble` setting)
        rm = stage.need("rm")
        rm_dir, rm_metrics = Path(rm["outputs"]["adapter"]), rm.get("metrics", {})
        rewards, reward_member_stats = reward_members(rm)
    reward_stats = reward_normalisation(cfg.normalize_reward, reward_fn, rm_metrics, state.is_main_process)

    # 1. Tokenizer and prompts, checked before the run folder is touched (a fixed held-out share is written for
    #    make eval and never trained on)
    tokenizer = load_tokenizer(profile)
    prompts, prompt_ids, heldout, notes = load_prompts(cfg, tokenizer)
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    check_context(base_config(profile), len(prompt_ids[longest]), cfg.response_length, "--response_length",
                  "--max_prompt_length", reply_closing_tokens(tokenizer, prompts[longest]))
    cfg.check_kl_horizon(state.num_processes)
    shard = sharding_wanted(cfg, state.num_processes, profile)
    if cfg.reward_input == "chat" and (not getattr(tokenizer, "chat_template", None) or isinstance(prompts[0], str)):
        cfg.reward_input = "tokens"
        if state.is_main_process:
            print("note: no chat template / plain-text prompts: the reward model reads the policy's tokens "
                  "(reward_input: tokens)", file=sys.stderr)
    config = {"ppo": to_dict(cfg), "run": to_dict(run)}  # as run: reward_input after the switch above

    # Resume: --resume, or a run that was interrupted (checkpoint, no manifest) and is simply started again, but only
    # from a checkpoint trained from these same sft and rm adapters. Rank 0 decides for all (on nodes without a shared
    # filesystem the others may hold no trainer state).
    for member in rewards.values():
        check_adapter_kinds(sft_dir, Path(member))
    upstream = {"sft": adapter_digest(sft_dir), "rm": adapter_digest(rm_dir)}
    if len(rewards) > 1:  # resume only onto the very same ensemble
        upstream["rm_members"] = [adapter_digest(Path(d)) for d in rewards.values()]
    upstream = trained_from(upstream, config, prompts, state.num_processes)
    decision = None
    if state.is_main_process:
        try:
            decision = ("resume", choose_resume(cfg, stage, upstream))
        except ConfigError as err:  # every rank must stop with it, not wait for rank 0 forever
            decision = ("error", str(err))
    kind, resume_from = broadcast(state, decision)
    if kind == "error":
        raise ConfigError(resume_from)

    # 2. One base, four adapters, built before the run folder is touched too: an adapter made for another base, or a
    #    reward adapter without a score head, is refused here (ConfigError) and must not cost the last finished run
    set_seed(cfg.seed)
    stack = build_stack(profile, tokenizer, sft_dir, rm_dir, state.device, cfg.gradient_checkpointing, shard,
                        with_value=cfg.has_critic, reward_ensemble=(rewards, reward_member_stats))
    trainer = PPOTrainer(cfg, stack, tokenizer, prompts, prompt_ids, stage.dir, state, reward_stats=reward_stats,
                         reward_fn=reward_fn, config=config, upstream=upstream)
    trainer.on_keep = lambda folder: (tokenizer.save_pretrained(folder),
                                      save_fingerprint(folder, stack.causal_lm.config, base_path))

    # Only now the run folder: this run replaces the earlier one's manifest, checkpoints and kept policies (unless it
    # resumes from them)
    stage.prepare(config, is_main=state.is_main_process)
    if state.is_main_process and resume_from is None:
        shutil.rmtree(stage.dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(stage.dir / "policies", ignore_errors=True)  # kept policies of an earlier, other run
    state.wait_for_everyone()
    heldout_path = stage.dir / "heldout_prompts.jsonl"
    if state.is_main_process:
        heldout_path.write_text("".join(json.dumps({"prompt": p if isinstance(p, list) else [{"role": "user", "content": p}]})
                                        + "\n" for p in heldout))
    n_base = sum(p.numel() for p in stack.model.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in trainer.params)
    base_full, base_mine, base_stored = base_numel(stack)
    base_per_rank, stored_per_rank = trainer.gather(base_mine), trainer.gather(base_stored)
    if state.is_main_process and not shard and state.num_processes > 1 and (fsdp_config or state.distributed_type.name == "DEEPSPEED"):
        print(f"note: {'FSDP' if fsdp_config else state.distributed_type.name} config with shard_base: {cfg.shard_base}: every rank holds the whole "
              "frozen base (data parallel); PPO shards it with torch FSDP2 under an FSDP config or --shard_base true",
              file=sys.stderr)
    if state.is_main_process:
        print_table(cfg.stage_name.upper(), {
            "processes": state.num_processes, "episodes per update": cfg.local_batch_size * state.num_processes,
            "base": f"sharded (FSDP2): {base_mine:,} of {base_full:,} weights on rank 0" if shard else "whole on every rank",
            "updates": cfg.total_updates, "prompts (train / held out)": f"{notes['prompts_train']} / {notes['prompts_heldout']}",
            "frozen / trainable params": f"{n_base:,} / {n_train:,} (one base, {len(stack.model.peft_config)} adapters)",
            "advantage estimator": cfg.advantage_estimator + (f", {cfg.num_samples_per_prompt} samples per prompt"
                                                              if cfg.num_samples_per_prompt > 1 else ""),
            "reward": "reward_fn (test hook)" if reward_fn else f"{rm_dir} ({cfg.reward_input})" + (
                f", mean of an ensemble of {len(rewards)}" if len(rewards) > 1 else ""),
            "resume from": resume_from or "-"})

    # 3. Train
    result = trainer.train(resume_from)
    digests = trainer.rank_digests()
    peak_per_rank = trainer.gather(peak_memory_mb(state.device))  # a sharded base: what each rank held, not only the first
    if result["stopped"]:
        if state.is_main_process:
            print(f"stopped after {cfg.stop_after} update(s) (stop_after) at update {result['update']}; "
                  f"start the same command again to continue", file=sys.stderr)
        finish_distributed()
        return {"stopped": True, "update": result["update"]}

    # 4. Save: the policy adapter (what users publish) + the value adapter, then the manifest, last
    metrics = {}
    if state.is_main_process:
        outputs = {"adapter": stage.dir / "adapter", "metrics_jsonl": trainer.metrics_path, "heldout_prompts": heldout_path,
                   "base_model": base_path}
        # what a run wrote, not what it might have: no samples with sample_every 0, no policy kept in a run shorter than
        # keep_policy_every
        outputs |= {name: path for name, path in (("samples", trainer.samples_path), ("policies", stage.dir / "policies"))
                    if path.exists() and (path.is_dir() or path.stat().st_size)}  # an earlier run's, emptied: none
        saved = [("policy", "adapter")]
        if cfg.has_critic:
            outputs["value_adapter"] = stage.dir / "value_adapter"
            saved.append(("value", "value_adapter"))
        for name, key in saved:
            stack.model.peft_config[name].base_model_name_or_path = base_path  # stock AutoPeftModel* loads it anywhere
            stack.save(name, outputs[key])
            tokenizer.save_pretrained(outputs[key])
            save_fingerprint(outputs[key], stack.causal_lm.config, base_path)
        if cfg.has_critic:
            trainer.write_value_offset(outputs["value_adapter"])
        metrics = {**trainer.summary(), "peak_memory_mb": peak_memory_mb(state.device), "peak_memory_mb_per_rank": peak_per_rank, "world_size": state.num_processes,
                   "model_copies": 1, "frozen_params": n_base, "trainable_params": n_train, "base_sharded": shard,
                   "base_numel": base_full, "base_numel_per_rank": base_per_rank, "base_stored_numel_per_rank": stored_per_rank,
                   "rank_param_digests": digests, "ranks_in_sync": len(set(digests)) == 1,
                   "reward_source": "reward_fn" if reward_fn else "reward_adapter", **notes,
                   "data": cfg.dataset_name or cfg.prompts_file, "advantage_estimator": cfg.advantage_estimator,
                   "method": cfg.stage_name, "mixed_precision": trainer.mixed_precision}
        print_table(f"{cfg.stage_name.upper()} result", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()})
        if not metrics["ranks_in_sync"]:
            print(f"warning: ranks ended with different weights {digests}", file=sys.stderr)
        stage.finish(outputs, metrics, config)
    finish_distributed()
    return metrics


def CONFIG_CLASSES():
    return (PPOConfig, RunArgs)


def check_args(cfg: PPOConfig, run: RunArgs) -> None:
    """What make's check refuses before the upstream stages train (main checks it again): a float16 base. The RL loop
    has no loss scaler (fp16 mixed precision is refused for it too, pipeline.launch.rl_precision_problem), and its
    gradients through fp16 activations underflow: off by 1-6% against float32 on a tiny Llama, worse as the loss's
    per-token weight (1 / tokens) shrinks."""
    from pipeline.models import profile_from, require_score_class

    profile = profile_from(run.model_config)
    if profile.dtype == "float16":
        raise ConfigError(f"{cfg.stage_name} cannot train a float16 base (model profile {run.model_config}): its loop "
                          f"has no loss scaler; set `dtype: bfloat16` (or float32) in the profile")
    if not cfg.reward_adapter:  # the run's `make rm` first, which a base with no score class cannot have
        require_score_class(run.model_config)


def parse_args(argv=None) -> tuple[PPOConfig, RunArgs]:
    cfg, run = parse(CONFIG_CLASSES(), argv)
    return cfg, run


__all__ = ["PPOConfig", "main", "parse_args"]
