"""Stage 2: sample K responses per prompt from the SFT policy, as pairs for people to label (`make label`).

    make pairs                        # accelerate launch ... -m stages.pairs --config configs/pairs.yaml
    make pairs ARGS="--num_responses 3 --temperature 1.0 --dataset_name my_prompts.jsonl"

Reads: the SFT manifest of the run (outputs.adapter, on the base of the model profile) and the prompts its
config names (configs/pairs.yaml: data/story/pairs_prompts.jsonl; RECIPE=assistant: the OASST prompts of
data/prompts/, Apache-2.0, see data/sources/) or --dataset_name (rows with a `prompt`: messages or a string; or
`messages`, whose last assistant turn is dropped).
Writes runs/<run>/pairs/: dataset/ (save_to_disk), config.json, manifest.json (last). One row per pair:
pair_id (hash of prompt + responses: stable across reruns, unlike an index), prompt_id, prompt (messages),
responses [two strings], response_indices, ended (a stop token reached: pipeline.generation.stop_token_ids), generation (settings + seed), policy (provenance).
With K > 2 each prompt gives all K*(K-1)/2 pairs of its responses. With several processes the batches of prompts are
spread over them (the main process writes); under the FSDP config the base is sharded over them (pipeline.sharding).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from itertools import combinations

from pipeline.config import ConfigError, RunArgs, parse, to_dict
from pipeline.data import load_any, prompt_of, prompt_problem, require_columns
from pipeline.generation import SamplingConfig, encode_prompts, generate
from pipeline.models import (base_config, check_adapter, check_context, launch_autocast, load_tokenizer, profile_from, require_chat_template,
                             resolve_base, to_device)
from pipeline.report import print_table
from pipeline.run import StageRun, main_guard
from pipeline.sharding import process_state, require_shared_runs_dir, sharding_report, take_over_from_accelerate
from stages.resume import drop_sampled_batches, sampled_batches


@dataclass
class PairsArgs:
    # Data
    dataset_name: str | None = field(default=None, metadata={"help": "Your own prompts (file, folder or Hub id)."})
    dataset_split: str = field(default="train", metadata={"help": "The split of --dataset_name to read (a Hub id's, or a folder's by its files' names)."})
    prompts_file: str = field(default="data/prompts/oasst_pairs_prompts.jsonl", metadata={"help": "Bundled prompts."})
    max_prompts: int = field(default=0, metadata={"help": "Use the first N prompts after shuffling (0 = all)."})
    max_prompt_tokens: int = field(default=192, metadata={
        "help": "Longer prompts are left out (not cut: annotators must see the prompt the model saw)."})
    # Sampling (temperature, top_p, top_k, max_new_tokens, generation_batch_size: SamplingConfig)
    num_responses: int = field(default=2, metadata={"help": "K responses per prompt; K > 2 gives every pair of them."})
    drop_identical: bool = field(default=True, metadata={"help": "Leave out pairs whose two responses are the same text."})
    seed: int = 42


def sha(obj, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:n]


def as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def load_prompts(args: PairsArgs) -> tuple[list[list[dict]], str]:
    """Every prompt checked (a row that is not a usable prompt is one ConfigError naming it), repeats dropped."""
    name = args.dataset_name or args.prompts_file
    ds = load_any(name, args.dataset_split if args.dataset_name else "train",
                  flag="--dataset_name" if args.dataset_name else "--prompts_file")
    if "prompt" not in ds.column_names:
        require_columns(ds, ["messages"], name, "give rows with a `prompt` (messages or text) or `messages`")
    for i, row in enumerate(ds):
        problem = prompt_problem(prompt_of(row))
        if problem:
            raise ConfigError(f"prompt set {name} row {i + 1}: {problem}: give a text or a list of "
                              f'{{"role", "content"}} messages')
    ds = ds.shuffle(seed=args.seed)
    prompts, seen = [], set()
    for row in ds:
        msgs = as_messages(prompt_of(row))
        if sha(msgs) not in seen:  # the same prompt twice would give near-duplicate pairs
            seen.add(sha(msgs))
            prompts.append(msgs)
        if args.max_prompts and len(prompts) >= args.max_prompts:
            break
    if not prompts:
        raise ConfigError(f"no prompts in {name}")
    return prompts, name


def pair_rows(prompts: list, texts: list[str], ended: list[bool], k: int, drop_identical: bool, extra: dict):
    """All K*(K-1)/2 pairs of each prompt's K responses (texts[p*k:(p+1)*k]). A pair whose two texts are equal is left
    out (drop_identical), and so is a repeat of a pair already made for the prompt, in either order: two equal samples
    among the K would otherwise give the same pair twice, under one pair_id, which the label store refuses.
    Returns (rows, {"identical": n, "repeated": n})."""
    rows, dropped, seen = [], {"identical": 0, "repeated": 0}, set()
    for p, msgs in enumerate(prompts):
        for i, j in combinations(range(k), 2):
            a, b = texts[p * k + i], texts[p * k + j]
            if drop_identical and a == b:
                dropped["identical"] += 1
                continue
            if (p, min(a, b), max(a, b)) in seen:
                dropped["repeated"] += 1
                continue
            seen.add((p, min(a, b), max(a, b)))
            rows.append({"pair_id": sha({"prompt": msgs, "responses": [a, b]}), "prompt_id": sha(msgs), "prompt": msgs,
                         "responses": [a, b], "response_indices": [i, j], "ended": [ended[p * k + i], ended[p * k + j]],
                         **extra})
    return rows, dropped


def check_args(args: PairsArgs, sampling: SamplingConfig, run: RunArgs) -> None:
    """The flags together, also in make's check before SFT trains (pipeline.launch.check): sampling that cannot make
    two different responses to a prompt."""
    if args.num_responses < 2:
        raise ConfigError(f"num_responses must be at least 2 to make pairs, got {args.num_responses}")
    if sampling.temperature <= 0:
        raise ConfigError("temperature 0 is greedy decoding: every response to a prompt would be the same; use > 0")
    if sampling.top_k == 1:
        raise ConfigError("top_k 1 is greedy decoding: every response to a prompt would be the same; use 0 (off) or > 1")


def main(args: PairsArgs, sampling: SamplingConfig, run: RunArgs) -> dict:
    from pipeline.adapters import AdapterStack
    from pipeline.models import load_base
    from pipeline.report import finish_distributed

    state = process_state()
    shard = take_over_from_accelerate()
    stage = StageRun("pairs", run.run, run.runs_dir)
    require_shared_runs_dir(run.runs_dir, "pairs")  # several machines: one RUNS_DIR for all, or one line
    if args.dataset_name:  # your prompts replace the bundled ones: not an input of this run
        stage.not_inputs([args.prompts_file], args.dataset_name)
    config = {"pairs": to_dict(args), "sampling": to_dict(sampling), "run": to_dict(run)}
    check_args(args, sampling, run)
    autocast = launch_autocast(state.device, "pairs")  # the launch's mixed precision, as the Trainer stages get it
    sft = stage.need("sft")
    profile = profile_from(run.model_config)
    adapter = sft["outputs"]["adapter"]  # on this very base, checked before the run folder is touched
    base = base_config(profile)  # the SFT adapter checked against it here, the prompts' length below
    check_adapter(adapter, base, what="SFT")
    tokenizer = load_tokenizer(profile)
    require_chat_template(tokenizer, profile)  # prompts are chats: refuse a template-less base before writing anything
    # 1. Prompts, read, checked and encoded before the run folder is touched (bad input loses nothing already written)
    prompts, data_name = load_prompts(args)
    try:
        encoded = encode_prompts(tokenizer, prompts)
    except ConfigError as err:
        raise ConfigError(f"prompt set {data_name}: {err}") from None
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= args.max_prompt_tokens]
    n_long, longest = len(encoded) - len(keep), max(map(len, encoded), default=0)
    prompts, encoded = [prompts[i] for i in keep], [encoded[i] for i in keep]
    if not prompts:
        raise ConfigError(f"all {n_long} prompts of {data_name} are longer than max_prompt_tokens="
                          f"{args.max_prompt_tokens} tokens (with the chat template): raise --max_prompt_tokens, or give "
                          f"shorter prompts")
    if n_long and state.is_main_process:  # said, not only counted in the summary: a template's long system prompt
        print(f"note: {n_long} of {n_long + len(prompts)} prompts of {data_name} are longer than max_prompt_tokens="
              f"{args.max_prompt_tokens} tokens (with the chat template; longest {longest}): they "
              f"were left out; raise --max_prompt_tokens to keep them", file=sys.stderr)
    check_context(base, max(map(len, encoded)), sampling.max_new_tokens, "--max_new_tokens", "--max_prompt_tokens")
    stage.prepare(config, is_main=state.is_main_process)

    # 2. Policy: the frozen base (sharded under the FSDP config) + the run's SFT adapter, on this process's accelerator
    base = load_base(profile, tokenizer, shard=shard)
    stack = AdapterStack.build(profile, tokenizer, {"policy": adapter}, base_model=base)
    to_device(stack.model, state.device)

    # 3. Generate: each prompt K times in a row, seeded per batch (same config + seed -> same pairs on CPU, with any
    #    number of processes: every rank calls generate(), which spreads the batches and gathers the responses)
    #    An interrupted run of the same command keeps the batches it had finished (stages/resume.py).
    k = args.num_responses
    store = sampled_batches(stage, config, state)
    t0 = time.time()
    with autocast:
        gens = generate(stack.model, tokenizer, [ids for ids in encoded for _ in range(k)], sampling,
                        generator_seed=args.seed, progress=True, batches_store=store)
    gen_time = time.time() - t0
    new_tokens = int(gens.response_mask[gens.sampled_now].sum())  # tokens/s of what this run sampled, not what it kept
    sharding = sharding_report(stack.model)

    metrics: dict = {}
    if state.is_main_process:
        # 4. Pairs
        generation = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                      "max_new_tokens": sampling.max_new_tokens, "seed": args.seed, "num_responses": k}
        policy = {"base_model": resolve_base(profile.name_or_path), "adapter": str(adapter),
                  "sft_git_commit": str(sft.get("git_commit")), "model_config": run.model_config}
        rows, dropped = pair_rows(prompts, gens.texts, gens.ended.tolist(), k, args.drop_identical,
                                  {"generation": generation, "policy": policy})
        if not rows:
            raise ConfigError("every pair had two identical responses: raise temperature, top_k, top_p or max_new_tokens")

        # 5. Save
        import datasets

        out = stage.dir / "dataset"
        datasets.Dataset.from_list(rows).save_to_disk(str(out))
        metrics = {
            "pairs": len(rows), "prompts": len(prompts), "prompts_too_long": n_long,
            "identical_dropped": dropped["identical"], "repeated_dropped": dropped["repeated"],
            "no_eos_fraction": round(1 - float(gens.ended.float().mean()), 3),
            "generation_time_s": round(gen_time, 1), "new_tokens": new_tokens,
            "new_tokens_per_s": round(new_tokens / gen_time, 1),
            "policy": f"{policy['base_model']} + {adapter}", "data": data_name,
            "world_size": state.num_processes, "sharding": sharding,
            "batches_kept_from_an_interrupted_run": store.kept,
        }
        print_table("pairs", metrics)
        for row in rows[:2]:
            print(f"\n>>> {row['prompt'][-1]['content'][:100]!r}")
            for r in row["responses"]:
                print(f"  - {r[:120]!r}")
        stage.finish({"dataset": out}, metrics, config)
        drop_sampled_batches(stage.dir)
    finish_distributed()
    return metrics


def CONFIG_CLASSES():
    return (PairsArgs, SamplingConfig, RunArgs)


if __name__ == "__main__":
    main_guard(lambda: main(*parse(CONFIG_CLASSES())))
