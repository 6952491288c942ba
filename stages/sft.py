"""Stage 1: supervised fine-tuning with a LoRA adapter (TRL SFTTrainer), loss on assistant tokens only.

    make sft                         # accelerate launch ... -m stages.sft --config configs/sft.yaml
    make sft ARGS="--learning_rate 1e-4 --dataset_name my_chats.jsonl"

Reads: the base model named by the model profile (configs/models/tiny.yaml by default) and the data its
config names (configs/sft.yaml: the story openings of data/story/sft.jsonl; RECIPE=assistant: the conversational
mixture in data/sft/), or --dataset_name. Writes runs/<run>/sft/: adapter/ (PEFT + tokenizer),
samples.json (before/after generations on fixed prompts, `sample_prompts`), config.json, manifest.json (last).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.chat import TEMPLATE_KWARGS, require_end_of_turn, tokenize_with_assistant_mask
from pipeline.config import ConfigError, RunArgs, parse, refuse_training_nothing, to_dict
from pipeline.data import (check_dataset_exists, conversation_root, load_any, load_mixture, messages_problem, own_files,
                           require_columns, train_eval_split)
from pipeline.generation import SamplingConfig, encode_prompts, generate
from pipeline.models import (base_config, check_context, check_training_length, launch_autocast, load_base,
                             load_tokenizer, lora_config, position_limit, profile_from, refuse_tokenizer_options,
                             require_chat_template, resolve_base, save_fingerprint, to_device)
from pipeline.run import StageRun, _flag, atomic_write_json, main_guard  # _flag: a flag's value as the parser reads it
from pipeline.report import peak_memory_mb, print_table, finish_distributed
from pipeline.sharding import require_shared_runs_dir, sharding_report, take_over_from_accelerate
from stages.resume import build_trainer, drop_checkpoints, step_of, tokens_seen_by, train_resuming

FIXED_PROMPTS = [
    "Tell me a short story about a rabbit.",
    "What is 12 plus 30?",
    "Give me three tips for a good night's sleep.",
    "Rewrite this sentence more simply: The weather was exceedingly inclement.",
]


@dataclass
class SFTArgs:
    # Data
    dataset_name: str | None = field(default=None, metadata={"help": "Your own data (file, folder or Hub id); replaces the mixture."})
    dataset_split: str = field(default="train", metadata={"help": "The split of --dataset_name to read (a Hub id's, e.g. train_sft, or a folder's by its files' names)."})
    dataset_mixture: dict = field(default_factory=dict, metadata={"help": "Bundled files -> max rows (0 = all); JSON on the CLI."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Held-out share for eval loss (overfitting shows here)."})
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # Samples before/after
    sample_prompts: list[str] = field(default_factory=lambda: list(FIXED_PROMPTS), metadata={
        "help": "User turns that SFT answers before and after training (samples.json). A --dataset_name given on the "
                "command line without them: the openings of its first held-out conversations."})
    sample_max_new_tokens: int = 48

    def __post_init__(self):
        if not self.sample_prompts:
            raise ValueError("sample_prompts is empty: give at least one user turn to sample before and after training")
        if isinstance(self.dataset_mixture, str):
            self.dataset_mixture = json.loads(self.dataset_mixture)
        for path, rows in self.dataset_mixture.items():
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
                raise ValueError(f"dataset_mixture['{path}'] is {rows!r}: give the rows to take from it, a whole "
                                 f"number (0 = all)")
            check_dataset_exists(path, "--dataset_mixture")  # at parse: `make` says so before any stage trains


def load_data(args: SFTArgs, seed: int):
    if args.dataset_name:
        ds, name = load_any(args.dataset_name, args.dataset_split), args.dataset_name
    else:
        if not args.dataset_mixture:
            raise ConfigError("no SFT data: set dataset_mixture in configs/sft.yaml or pass --dataset_name")
        ds = load_mixture([{"path": p, "max_rows": n} for p, n in args.dataset_mixture.items()], seed)
        bundled = not own_files(args.dataset_mixture)
        name = ("the bundled mixture (" if bundled else "the mixture (") + ", ".join(args.dataset_mixture) + ")"
    if "prompt" in ds.column_names and "completion" in ds.column_names and "messages" not in ds.column_names:
        ds = prompt_completion_as_messages(ds, name)  # (a file with both formats is read as conversations)
    require_columns(ds, ["messages"], name, "give conversational rows {'messages': [{'role', 'content'}, ...]} or "
                                            "{'prompt', 'completion'}")
    return with_replies(ds.select_columns([c for c in ("messages", "first_trained") if c in ds.column_names]), name), name


def prompt_completion_as_messages(ds, name: str):
    """TRL's prompt-completion rows as conversations: the prompt (text: a user turn; or a list of messages), then the
    completion (text: an assistant turn; or a list of messages). Passed to TRL as they were, plain text trained
    without the chat template that pairs, PPO and eval prompt with, and with assistant_only_loss TRL refused them
    (after the run folder was prepared); as conversations they train like every other row, through the template and
    our assistant mask."""
    from datasets import Dataset

    rows = []
    for i, row in enumerate(ds.select_columns(["prompt", "completion"]).to_list()):
        turns = []
        for key, role in (("prompt", "user"), ("completion", "assistant")):
            value = row[key]
            if isinstance(value, str):
                value = [{"role": role, "content": value}]
            if not isinstance(value, list):
                raise ConfigError(f"row {i + 1} of {name}: its {key} is {type(value).__name__}: give text or a list "
                                  f"of messages {{'role', 'content'}}")
            if key == "prompt":
                first_trained = len(value)  # the loss is on the completion: a prompt's own assistant turns are context
            turns += value
        rows.append({"messages": turns, "first_trained": first_trained})
    return Dataset.from_list(rows)


def with_replies(ds, name: str):
    """The rows with something to learn, as plain conversations: each row must be one (else one ConfigError naming
    it); a row whose assistant turns are all empty (or absent) would teach only "stop at once", so it is left out, with
    a note; none left is an error. The rows are rebuilt from the checked Python objects: a JSON file whose rows mix
    shapes comes out of Arrow with columns merged and padded, and what trains must be what was checked."""
    import pyarrow
    from datasets import Dataset

    try:
        rows = ds.to_list()
    except (ValueError, TypeError, pyarrow.ArrowException) as err:  # e.g. messages with duplicate keys
        raise ConfigError(f"{name}: its rows cannot be read back as conversations ({type(err).__name__}: {err}): give "
                          f"every row {{'messages': [{{'role', 'content'}}, ...]}}") from None
    keep = []
    for i, row in enumerate(rows):
        problem = messages_problem(row["messages"])
        if problem:
            raise ConfigError(f"row {i + 1} of {name}: {problem}: give rows {{'messages': [{{'role', 'content'}}, ...]}}")
        first = row.get("first_trained") or 0  # prompt-completion rows: the completion's turns only
        if any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"][first:]):
            keep.append({"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]],
                         "row": i + 1,  # its row in the file, for the errors after the split (with_assistant_masks)
                         "first_trained": first})
    if not keep:
        raise ConfigError(f"no row of {name} has an assistant reply with text ({len(rows)} rows, every assistant turn "
                          f"empty or missing): SFT would have nothing to learn; give rows with assistant replies")
    if len(keep) < len(rows):
        print(f"note: {len(rows) - len(keep)} of {len(rows)} rows of {name} have no assistant reply with text: left out",
              file=sys.stderr)
    return Dataset.from_list(keep)


def held_out_split(ds, eval_fraction: float, seed: int):
    """Held-out rows whose conversation root no training row has, so eval_loss is not measured on replies (or whole
    turns) seen in training. Data whose roots are all distinct (the story recipe's) splits by row, as it always has."""
    roots = [conversation_root(row) for row in ds]
    if len(set(roots)) == len(roots):
        return train_eval_split(ds, eval_fraction, seed)
    return train_eval_split(ds, eval_fraction, seed, group_by=conversation_root)


def split_and_tokenize(ds, tokenizer, train_cfg, args: SFTArgs, data_name: str):
    """The train and held-out splits, as TRL will read them. With conversational rows and assistant_only_loss, they
    are tokenized here with our own assistant mask instead of TRL's, which refuses every template it cannot patch
    (Llama 3.1/3.2, SmolLM2's ChatML); TRL then takes the mask from the rows, so its own masking is switched off."""
    train_ds, eval_ds = held_out_split(ds, args.eval_fraction, train_cfg.seed)
    if "messages" in ds.column_names and train_cfg.assistant_only_loss:
        eot = require_end_of_turn(tokenizer)
        train_ds, eval_ds = (with_assistant_masks(d, tokenizer, eot, data_name, train_cfg.max_length,
                                                  train_cfg.truncation_mode) for d in (train_ds, eval_ds))
        train_cfg.assistant_only_loss = False
    elif "messages" in ds.column_names:  # TRL renders the template: with the same fixed kwargs as every other render
        train_ds, eval_ds = (d.select_columns(["messages"]).add_column("chat_template_kwargs", [TEMPLATE_KWARGS] * len(d))
                             if d is not None else None for d in (train_ds, eval_ds))
    return train_ds, eval_ds


def with_assistant_masks(ds, tokenizer, eot: str, data_name: str, max_length: int | None = None,
                         truncation_mode: str = "keep_start"):
    """Conversations -> token ids + a mask of the assistant's tokens (each reply and its end-of-turn token), for any
    chat template (pipeline.chat). TRL builds its labels from the mask, truncates to max_length (keeping each row's
    first or, with truncation_mode keep_end, last max_length tokens) and drops rows left with no assistant token: a
    max_length that leaves no row any is an error here, not a crash inside TRL."""
    import jinja2
    from datasets import Dataset

    if ds is None:
        return None
    rows = []
    for i, row in enumerate(ds):
        number = row.get("row") or i + 1  # the file's row (with_replies), not its place in this split
        try:
            rows.append(tokenize_with_assistant_mask(tokenizer, row["messages"], eot, row.get("first_trained") or 0))
        except jinja2.TemplateError as err:
            raise ConfigError(f"row {number} of {data_name}: the chat template refuses it ({err}): fix the row or the "
                              f"template (model profile `chat_template:`)") from None
        except ConfigError as err:  # a row the mask cannot be built for: say which, in which file
            raise ConfigError(f"row {number} of {data_name}: {err}") from None
    if max_length and rows and not any(1 in kept(r["assistant_masks"], max_length, truncation_mode) for r in rows):
        need = min((n for r in rows if (n := tokens_to_keep_a_reply(r["assistant_masks"], truncation_mode))),
                   default=None)
        raise ConfigError(f"max_length {max_length} is too small for {data_name}: no row has an assistant token within "
                          f"its {'last' if truncation_mode == 'keep_end' else 'first'} {max_length} tokens, so every row "
                          f"would be dropped" + (f": raise max_length to at least {need}" if need else ""))
    return Dataset.from_list(rows)


def kept(tokens: list, max_length: int, truncation_mode: str) -> list:
    """What TRL keeps of a row longer than max_length: its start (keep_start, the default) or its end (keep_end)."""
    return tokens[-max_length:] if truncation_mode == "keep_end" else tokens[:max_length]


def tokens_to_keep_a_reply(assistant_mask: list[int], truncation_mode: str) -> int | None:
    """The shortest max_length that keeps one assistant token of this row; None for a row without any."""
    if 1 not in assistant_mask:
        return None
    if truncation_mode == "keep_end":
        return len(assistant_mask) - max(i for i, bit in enumerate(assistant_mask) if bit)
    return assistant_mask.index(1) + 1


def longest_row(train_ds, eval_ds, packing: bool) -> int | None:
    """The longest row tokenized here (with_assistant_masks); None where TRL tokenizes the rows, or packs them into
    rows of max_length."""
    if packing or "input_ids" not in train_ds.column_names:
        return None
    return max(len(ids) for d in (train_ds, eval_ds) if d is not None for ids in d["input_ids"])


def rows_over(ds, max_length: int | None) -> int | None:
    """How many rows tokenized here (with_assistant_masks) are longer than max_length, which TRL cuts to it; None
    for rows TRL tokenizes itself (text, or conversations without assistant_only_loss): not counted."""
    if "input_ids" not in ds.column_names:
        return None
    return sum(len(ids) > max_length for ids in ds["input_ids"]) if max_length else 0


def param_dtypes(model, trainable: bool) -> list[str]:
    """The dtypes of the trainable (LoRA: peft keeps them in float32) or frozen (the base: the profile's) tensors."""
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad == trainable})


def check_args(train_cfg, args: SFTArgs, run: RunArgs) -> None:
    """What the flags alone can tell (make runs it before any stage): the Trainer refused an evaluation with nothing
    held out only once the run folder was prepared; TRL's tokenizer options only once the upstream stages had run."""
    if args.eval_fraction == 0 and str(getattr(train_cfg.eval_strategy, "value", train_cfg.eval_strategy)) != "no":
        raise ConfigError(f"eval_strategy {getattr(train_cfg.eval_strategy, 'value', train_cfg.eval_strategy)} "
                          f"evaluates held-out rows, but eval_fraction is 0: hold some out (--eval_fraction 0.05) or "
                          f"set --eval_strategy no")
    refuse_tokenizer_options(train_cfg, "sft", run.model_config)
    refuse_training_nothing(train_cfg)


def main(train_cfg, args: SFTArgs, run: RunArgs) -> dict:
    from accelerate import PartialState
    from trl import SFTTrainer

    check_args(train_cfg, args, run)

    state = PartialState()
    shard = take_over_from_accelerate()  # FSDP config: the base is loaded sharded over the ranks (pipeline.sharding)
    stage = StageRun("sft", run.run, run.runs_dir)
    require_shared_runs_dir(run.runs_dir, "sft")  # several machines: one RUNS_DIR for all, or one line
    if args.dataset_name:  # your data replaces the bundled mixture: its files are not inputs of this run
        stage.not_inputs(args.dataset_mixture, args.dataset_name)
    train_cfg.output_dir = str(stage.dir / "trainer")
    train_cfg.include_num_input_tokens_seen = "all"  # tokens/s is one of the stage's reported metrics
    if 1 <= train_cfg.max_steps < train_cfg.logging_steps:  # a short run would log no loss at all (first/last: None)
        train_cfg.logging_steps = train_cfg.max_steps
    config = {"sft": to_dict(args), "train": train_cfg.to_dict(), "run": to_dict(run)}
    profile = profile_from(run.model_config)
    base_path = resolve_base(profile.name_or_path)

    # 1. Data, tokenizer and base model, all checked before anything in the run folder is touched (bad input loses
    #    nothing already written)
    ds, data_name = load_data(args, train_cfg.seed)
    tokenizer = load_tokenizer(profile)
    if "messages" in ds.column_names:
        require_chat_template(tokenizer, profile)
    train_ds, eval_ds = split_and_tokenize(ds, tokenizer, train_cfg, args, data_name)
    base = base_config(profile)
    check_training_length(base, train_cfg.max_length, longest_row(train_ds, eval_ds, train_cfg.packing))
    conversations, prompts = sample_prompts_that_fit(args, ds, tokenizer, base, train_cfg.seed)
    rows_cut = rows_over(train_ds, train_cfg.max_length)
    if rows_cut and state.is_main_process:
        print(f"note: {rows_cut} of {len(train_ds)} training rows of {data_name} are longer than max_length="
              f"{train_cfg.max_length} tokens (with the chat template): " + (
                  "TRL cuts their starts (truncation_mode keep_end), the prompts' openings with them, so replies are "
                  "learned without all they answer" if train_cfg.truncation_mode == "keep_end" else
                  "TRL cuts their ends, the reply's end-of-turn token with them, so the model learns less of when to "
                  "stop") + "; raise --max_length", file=sys.stderr)
    model = load_base(profile, tokenizer, shard=shard)  # also checks the profile's LoRA targets against the model
    autocast = launch_autocast(state.device, "sft")  # a mixed precision it cannot run under: refused before the folder
    stage.prepare(config, is_main=state.is_main_process)

    # 2. Before training: samples on fixed prompts, on this process's accelerator. Every rank takes part (a sharded
    #    base runs each forward on all ranks together); generate() spreads the prompts and gathers the texts.
    # Sampled, not greedy, with a fixed seed: greedy decoding of a tiny model collapses to "\n" + EOS.
    sampling = SamplingConfig(max_new_tokens=args.sample_max_new_tokens, temperature=0.7, top_k=50)
    to_device(model, state.device)
    with autocast:  # the launch's mixed precision, as the training gets it
        before = generate(model, tokenizer, prompts, sampling, generator_seed=0).texts

    # 3. Train; an interrupted run of the same command continues from its last checkpoint (save_strategy: steps)
    peft_config = lora_config(profile, args.lora_r, args.lora_alpha, args.lora_dropout)
    trainer = build_trainer(lambda: SFTTrainer(model=model, args=train_cfg, train_dataset=train_ds, eval_dataset=eval_ds,
                                               processing_class=tokenizer, peft_config=peft_config),
                            train_cfg, shard)
    # TRL leaves out the rows with no reply token within max_length; packed, its rows are packs of them (not counted)
    rows_left_out = None if train_cfg.packing else len(train_ds) - len(trainer.train_dataset)
    if rows_left_out and state.is_main_process:
        print(f"note: TRL left out {rows_left_out} of {len(train_ds)} training rows of {data_name}: no reply token of "
              f"theirs is within max_length={train_cfg.max_length}; raise --max_length to train on them", file=sys.stderr)
    t0 = time.time()
    result, resume_from = train_resuming(trainer, {**stage.inputs(config), "config": config})
    train_time = time.time() - t0
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}

    # 4. Save adapter + tokenizer side by side (AutoPeftModel looks for the tokenizer in the adapter folder).
    adapter_dir = stage.dir / "adapter"
    trainer.save_model(str(adapter_dir))  # every rank: on a sharded base the Trainer gathers the adapter whole
    with autocast:
        after = generate(trainer.model, tokenizer, prompts, sampling, generator_seed=0).texts  # every rank, as before
    sharding = sharding_report(trainer.model)
    metrics = {}
    if state.is_main_process:
        tokenizer.save_pretrained(adapter_dir)
        save_fingerprint(adapter_dir, model.config, base_path)
        samples = [{"prompt": c[-1]["content"], **({"conversation": c} if len(c) > 1 else {}), "before": b, "after": a}
                   for c, b, a in zip(conversations, before, after)]
        atomic_write_json(stage.dir / "samples.json", samples)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        # tokens this run trained on (a resumed run's state counts those before the checkpoint too)
        tokens = (trainer.state.num_input_tokens_seen or 0) - (tokens_seen_by(resume_from) if resume_from else 0)
        metrics = {
            "train_loss": result.training_loss,
            "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None,
            "loss_curve": losses,
            "eval_loss": round(eval_metrics["eval_loss"], 4) if "eval_loss" in eval_metrics else None,
            "train_rows": len(train_ds) - (rows_left_out or 0), "rows_left_out": rows_left_out,
            **({"packed_rows": len(trainer.train_dataset)} if train_cfg.packing else {}),
            "eval_rows": len(eval_ds) if eval_ds is not None else 0,
            "steps": trainer.state.global_step, "train_time_s": round(train_time, 1),
            "tokens_per_s": round(tokens / train_time, 1) if tokens else None,
            "peak_memory_mb": peak_memory_mb(train_cfg.device), "world_size": state.num_processes, "sharding": sharding,
            "base_dtypes": param_dtypes(trainer.model, False), "trainable_dtypes": param_dtypes(trainer.model, True),
            "data": data_name, "rows_over_max_length": rows_cut,
            "resumed_from_step": step_of(resume_from) if resume_from else None,
        }
        print_table("SFT", {k: v for k, v in metrics.items() if k != "loss_curve"})
        cut = lambda t: repr(t[:120]) + (" …" if len(t) > 120 else "")  # noqa: E731 (samples.json has them whole)
        for s in samples:
            print(f"\n>>> {s['prompt']}\n  before: {cut(s['before'])}\n  after:  {cut(s['after'])}")
        stage.finish({"adapter": adapter_dir, "samples": stage.dir / "samples.json", "base_model": base_path},
                     metrics, config)
        drop_checkpoints(Path(train_cfg.output_dir))
    finish_distributed()
    return metrics


def CONFIG_CLASSES():
    from trl import SFTConfig

    return (SFTConfig, SFTArgs, RunArgs)


def parse_args(argv=None):
    train_cfg, args, run = parse(CONFIG_CLASSES(), argv)
    given = sys.argv[1:] if argv is None else argv
    if _flag(given, "--dataset_name", None) is not None and _flag(given, "--sample_prompts", None) is None:
        args.sample_prompts = []  # your data's own openings (sample_conversations), not the config's story openings
    elif data_named_above_sample_prompts(given, args):
        args.sample_prompts = []  # a recipe YAML (or --dataset_mixture) naming its data: the base config's prompts are
        #                           of the base config's task (configs/sft.yaml: the story's book openings), not of it
    return train_cfg, args, run


def data_named_above_sample_prompts(given: list[str], args: SFTArgs) -> bool:
    """Whether the data was named at a later level than the sample prompts it would be sampled on: levels are a YAML's
    base_config (1), the --config YAML itself (2) and the command line (3). A variant YAML `base_config:
    configs/sft.yaml` + `dataset_mixture: {my_chats.jsonl: 0}` (or `--dataset_mixture` on the command line) gave your
    model the story's book openings to answer in samples.json (and in the published card's example). The default
    prompts (none set anywhere) stay: they are generic; so do a mixture of bundled files' (data/)."""
    from pipeline.config import read_yaml, resolve_path

    path = _flag(given, "--config", None)
    levels: dict[str, int] = {}
    if path:
        own = read_yaml(path)
        if isinstance(own.get("base_config"), str) and own["base_config"].strip():
            levels = {key: 1 for key in read_yaml(resolve_path(own["base_config"]))}
        levels.update({key: 2 for key in own})
    level = lambda key: 3 if _flag(given, f"--{key}", None) is not None else levels.get(key, 0)  # noqa: E731
    data_keys = (["dataset_mixture"] if own_files(args.dataset_mixture) else []) + \
        (["dataset_name"] if args.dataset_name else [])
    if not data_keys:
        return False
    prompts_level = level("sample_prompts")
    return prompts_level > 0 and max(level(key) for key in data_keys) > prompts_level


SAMPLES_FROM_DATA = 4
ROWS_SCANNED = 4 * SAMPLES_FROM_DATA  # rows that open with a reply, or too long to sample, are passed over


def sample_conversations(args: SFTArgs, ds, eval_fraction: float, seed: int, fits=lambda opening: True
                         ) -> list[list[dict]]:
    """What samples.json answers before and after training: each of `sample_prompts` as a user turn; with none (your
    --dataset_name on the command line, no --sample_prompts: the config's prompts are of its own task, the story
    recipe's book openings), the openings of the data's first held-out conversations (their turns before the first
    reply) that `fits`, or of its first rows when nothing is held out."""
    if args.sample_prompts:
        return [[{"role": "user", "content": p}] for p in args.sample_prompts]
    _, held_out = held_out_split(ds, eval_fraction, seed)
    rows = held_out if held_out is not None and len(held_out) else ds
    openings = []
    for row in rows.select(range(min(len(rows), ROWS_SCANNED))):
        first_reply = next(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        if first_reply and fits(row["messages"][:first_reply]):
            openings.append(row["messages"][:first_reply])
        if len(openings) == SAMPLES_FROM_DATA:
            break
    return openings or [[{"role": "user", "content": p}] for p in FIXED_PROMPTS]


def sample_prompts_that_fit(args: SFTArgs, ds, tokenizer, config, seed: int) -> tuple[list[list[dict]], list[list[int]]]:
    """samples.json's conversations and their token ids, checked against the base's positions before the run folder
    is touched (past them a GPT-2 base fails mid-sampling): openings from your data that do not fit with
    sample_max_new_tokens are passed over; prompts you gave are refused (check_context)."""
    limit, new = position_limit(config), args.sample_max_new_tokens
    fits = lambda opening: limit is None or len(encode_prompts(tokenizer, [opening])[0]) + new <= limit  # noqa: E731
    conversations = sample_conversations(args, ds, args.eval_fraction, seed, fits)
    prompts = encode_prompts(tokenizer, conversations)
    check_context(config, max(len(p) for p in prompts), new, "--sample_max_new_tokens", "--sample_prompts")
    return conversations, prompts


if __name__ == "__main__":
    main_guard(lambda: main(*parse_args()))
