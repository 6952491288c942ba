"""Bad input and disk faults (issue 13, "Trust"): each case is exactly one `error:` line on stderr and exit code 2, and
the run folder is left as it was (an earlier run's files all still there, nothing new). The stages run in-process
through pipeline.run.main_guard, as `python -m stages.X` runs them, on tiny models and a fake upstream run; a few
cases also go through `make`, whose launcher must not add argparse's usage dump or a traceback."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from pipeline.config import ConfigError, parse
from pipeline.run import check_launched_folder, main_guard
from tests.conftest import REPO, yaml_with
from tests.fake_upstream import build_upstream
from tests.test_make import make

BAD_UTF8 = b'{"prompt": "caf\xe9", "messages": [{"role": "user", "content": "caf\xe9"}], "chosen": "a\xff", "rejected": "b"}\n'
CHAT = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there, friend."}]


def write_text(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def write_jsonl(path: Path, rows: list) -> str:
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def files(tmp: Path) -> dict[str, str]:
    """The input files the cases point at."""
    (tmp / "bad_utf8.jsonl").write_bytes(BAD_UTF8)
    (tmp / "empty.jsonl").write_bytes(b"")
    (tmp / "blank.jsonl").write_bytes(b"\n \n")
    (tmp / "adapter").mkdir(exist_ok=True)  # a LoRA folder given as the base
    (tmp / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "/models/my-base"}')
    return {
        "bad_utf8": str(tmp / "bad_utf8.jsonl"), "empty": str(tmp / "empty.jsonl"), "blank": str(tmp / "blank.jsonl"),
        "chats": write_jsonl(tmp / "chats.jsonl", [{"messages": [{**CHAT[0], "content": f"Say hi, {i}."}, CHAT[1]]}
                                                   for i in range(8)]),  # 8 prompts: SFT holds out whole prompts
        "empty_chats": write_jsonl(tmp / "empty_chats.jsonl",
                                   [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}] * 8),
        "prefs": write_jsonl(tmp / "prefs.jsonl", [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
                                                    "chosen": [{"role": "assistant", "content": "A good answer."}],
                                                    "rejected": [{"role": "assistant", "content": "Bad."}]} for i in range(8)]),
        "empty_prompt": write_jsonl(tmp / "empty_prompt.jsonl", [{"prompt": "Fine."}, {"prompt": ""}]),
        # ShareGPT's roles: a template renders 'human' as a turn of its own, and rows of 'human' and 'gpt' had no reply
        "sharegpt_chats": write_jsonl(tmp / "sharegpt_chats.jsonl", [{"messages": [{**CHAT[0], "content": f"Hi {i}."},
                                                                                  CHAT[1]]} for i in range(3)] + [
            {"messages": [{"role": "human", "content": "Hi."}, {"role": "gpt", "content": "Hello."}]}]),
        "sharegpt_prefs": write_jsonl(tmp / "sharegpt_prefs.jsonl", [{"prompt": [{"role": "human", "content": "Q?"}],
                                                                      "chosen": [CHAT[1]], "rejected": [CHAT[1]]}]),
        "sharegpt_prompts": write_jsonl(tmp / "sharegpt_prompts.jsonl",
                                        [{"prompt": [{"role": "human", "content": "Tell me a story."}]}]),
        "fp16_profile": write_text(tmp / "fp16.yaml", "name_or_path: models/tiny\ndtype: fp16\n"),
        "adapter_profile": write_text(tmp / "adapter.yaml", f"name_or_path: {tmp / 'adapter'}\n"),
        "file_profile": write_text(tmp / "file.yaml", f"name_or_path: {tmp / 'adapter' / 'adapter_config.json'}\n"),
        "sft_lora_float": write_text(tmp / "sft.yaml", yaml_with((REPO / "configs/sft.yaml").read_text(), "\nlora_r: 2.5\n")),
        # replies of 700 words, past the tiny bases' 512 positions
        "long_chats": write_jsonl(tmp / "long_chats.jsonl", [{"messages": [{**CHAT[0], "content": f"Say hi, {i}."},
                                                                          {**CHAT[1], "content": "hi " * 700}]}
                                                             for i in range(8)]),
        # long in held-out rows only, and in the rejected reply: the checks read both splits and both replies
        "long_held_out_chats": write_jsonl(tmp / "long_held_out_chats.jsonl", held_out_long_chats()),
        # the seventh row opens with a reply: the error names row 7 of the file, not its place in the split
        "reply_first_chats": write_jsonl(tmp / "reply_first_chats.jsonl", [
            {"messages": [{**CHAT[0], "content": f"Say hi, {i}."}, CHAT[1]]} for i in range(6)] + [
            {"messages": [{**CHAT[1], "content": "I start."}, CHAT[0], CHAT[1]]}]),
        # ShareGPT's own layout (conversations of from/value) and a preference row without its rejected reply
        "sharegpt_layout": write_jsonl(tmp / "sharegpt_layout.jsonl", [{"conversations": [
            {"from": "human", "value": f"Hi {i}."}, {"from": "gpt", "value": "Hello."}]} for i in range(4)]),
        "prefs_without_rejected": write_jsonl(tmp / "prefs_without_rejected.jsonl", [
            {"prompt": f"Question {i}?", "chosen": "Good.", "rejected": "Bad."} for i in range(3)] + [
            {"prompt": "Question 3?", "chosen": "Good."}]),
        "long_held_out_prefs": write_jsonl(tmp / "long_held_out_prefs.jsonl", held_out_long_prefs()),
        "long_prefs": write_jsonl(tmp / "long_prefs.jsonl", [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
                                                              "chosen": [{"role": "assistant", "content": "yes " * 700}],
                                                              "rejected": [{"role": "assistant", "content": "Bad."}]}
                                                             for i in range(8)]),
    }


def held_out_long_chats() -> list[dict]:
    """16 conversations, of which the 4 that SFT holds out (eval_fraction 0.25, seed 42: datasets' seeded split by row)
    have a reply of 700 words."""
    from datasets import Dataset

    rows = [{"messages": [{**CHAT[0], "content": f"Say hi, {i}."}, CHAT[1]]} for i in range(16)]
    held_out = {r["messages"][0]["content"] for r in
                Dataset.from_list(rows).train_test_split(test_size=0.25, seed=42)["test"]}
    return [{"messages": [r["messages"][0], {**CHAT[1], "content": "hi " * 700}]}
            if r["messages"][0]["content"] in held_out else r for r in rows]


def held_out_long_prefs() -> list[dict]:
    """16 prompts' pairs, of which the 4 prompts the reward model and DPO hold out (eval_fraction 0.25, seed 42: the
    prompts' JSON sorted, shuffled by random.Random(42), the first quarter) have a rejected reply of 700 words."""
    import random

    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(16)]
    keys = sorted(json.dumps(p, sort_keys=True) for p in prompts)
    random.Random(42).shuffle(keys)
    return [{"prompt": p, "chosen": [{"role": "assistant", "content": "A good answer."}],
             "rejected": [{"role": "assistant", "content": "no " * 700 if json.dumps(p, sort_keys=True) in keys[:4]
                           else "Bad."}]} for p in prompts]


SFT = ["--config", "configs/sft.yaml", "--dataset_name", "{chats}", "--max_steps", "1", "--per_device_train_batch_size", "2",
       "--sample_max_new_tokens", "4"]
RM = ["--config", "configs/rm.yaml", "--dataset_name", "{prefs}", "--max_steps", "1", "--per_device_train_batch_size", "2"]
SFT_MIXTURE = [a for a in SFT if a not in ("--dataset_name", "{chats}")]  # a mixture of its own, no dataset beside it
RM_MIXTURE = [a for a in RM if a not in ("--dataset_name", "{prefs}")]
PAIRS = ["--config", "configs/pairs.yaml", "--max_new_tokens", "4", "--max_prompts", "2"]
PPO = ["--config", "configs/ppo.yaml", "--total_updates", "1"]
EVAL = ["--config", "configs/eval.yaml", "--max_new_tokens", "4"]

# (id, stage module, arguments, words the error line must hold)
CASES = [
    ("sft-non-utf8", "stages.sft", SFT + ["--dataset_name", "{bad_utf8}"], ["bad_utf8.jsonl line 1", "UTF-8"]),
    ("rm-non-utf8", "stages.rm", RM + ["--dataset_name", "{bad_utf8}"], ["bad_utf8.jsonl line 1", "UTF-8"]),
    ("ppo-non-utf8", "stages.ppo", PPO + ["--dataset_name", "{bad_utf8}"], ["bad_utf8.jsonl line 1", "UTF-8"]),
    ("pairs-non-utf8", "stages.pairs", PAIRS + ["--dataset_name", "{bad_utf8}"], ["bad_utf8.jsonl line 1", "UTF-8"]),
    ("sft-eval-with-nothing-held-out", "stages.sft", SFT + ["--eval_fraction", "0", "--eval_strategy", "steps"],
     ["eval_strategy steps evaluates held-out rows, but eval_fraction is 0"]),
    ("sft-sample-past-the-positions", "stages.sft", SFT + ["--sample_prompts", "hi " * 600],
     ["--sample_max_new_tokens 4 make", "more than the base model's 512", "--sample_prompts"]),
    ("sft-batch-0", "stages.sft", SFT + ["--per_device_train_batch_size", "0"], ["--per_device_train_batch_size", ">= 1"]),
    ("sft-row-number-of-the-file", "stages.sft", SFT + ["--dataset_name", "{reply_first_chats}", "--eval_fraction", "0.5"],
     ["row 7 of", "reply_first_chats.jsonl: a conversation starts with an assistant turn"]),
    # your dataset beside a mixture: the mixture was set aside without a word
    ("sft-dataset-beside-mixture", "stages.sft", SFT + ["--dataset_mixture", '{{"data/story/sft.jsonl": 0}}'],
     ["--dataset_mixture has no effect beside --dataset_name", "give one of them"]),
    ("rm-dataset-beside-mixture", "stages.rm", RM + ["--dataset_mixture={{}}"], ["--dataset_mixture has no effect beside"]),
    # the story config's mixture is the run's label export alone: a run with none said "mixture of : read and dropped {}"
    ("rm-only-a-missing-label-export", "stages.rm", ["--config", "configs/rm.yaml", "--max_steps", "1"],
     ["no preference data: dataset_mixture names only the label export", "make pairs label RUN=t`, then `make label-export",
      "--dataset_name"]),
    ("sft-sharegpt-layout", "stages.sft", SFT + ["--dataset_name", "{sharegpt_layout}"],
     ["has no column(s) ['messages']", "ShareGPT rows", "human -> user, gpt -> assistant"]),
    ("rm-row-without-rejected", "stages.rm", RM + ["--dataset_name", "{prefs_without_rejected}"],
     ["'rejected' is missing (or null): every row needs both 'chosen' and 'rejected'"]),
    ("sft-lr-negative", "stages.sft", SFT + ["--learning_rate", "-1"], ["--learning_rate", "> 0"]),
    ("sft-grad-accum-0", "stages.sft", SFT + ["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps"]),
    ("sft-max-steps-negative", "stages.sft", SFT + ["--max_steps", "-5"], ["--max_steps", "-1"]),
    ("sft-sample-tokens-0", "stages.sft", SFT + ["--sample_max_new_tokens", "0"], ["--sample_max_new_tokens"]),
    ("sft-max-length-too-small", "stages.sft", SFT + ["--max_length", "2"], ["max_length 2 is too small", "chats.jsonl"]),
    ("sft-all-empty-replies", "stages.sft", SFT + ["--dataset_name", "{empty_chats}"], ["no row", "assistant reply"]),
    ("sft-one-row-with-eval-split", "stages.sft", SFT + ["--dataset_name", "{chats}", "--eval_fraction", "0.9"],
     ["too few", "eval_fraction"]),
    ("rm-batch-0", "stages.rm", RM + ["--per_device_train_batch_size", "0"], ["--per_device_train_batch_size"]),
    ("rm-eval-batch-0", "stages.rm", RM + ["--per_device_eval_batch_size", "0"], ["--per_device_eval_batch_size"]),
    ("rm-lr-0", "stages.rm", RM + ["--learning_rate", "0"], ["--learning_rate", "> 0"]),
    ("rm-ensemble-0", "stages.rm", RM + ["--ensemble", "0"], ["--ensemble 0", "at least 1"]),
    ("rm-evals-0", "stages.rm", RM + ["--evals", "0"], ["--evals", "must be positive"]),  # plan_steps divided by it
    # nothing held out: refused after loading, as "too few distinct prompts ... give more pairs", which cannot help
    ("rm-eval-fraction-0", "stages.rm", RM + ["--eval_fraction", "0"], ["eval_fraction 0.0 must be above 0 and below 1"]),
    ("dpo-eval-fraction-1", "stages.dpo", ["--config", "configs/dpo.yaml", "--eval_fraction", "1"],
     ["eval_fraction 1.0 must be above 0 and below 1"]),
    ("rm-max-length-too-small", "stages.rm", RM + ["--max_length", "2", "--max_prompt_length", "1"],
     ["max_length 2 is too small", "prefs.jsonl"]),
    ("rm-dataset-empty", "stages.rm", RM + ["--dataset_name", ""], ["--dataset_name on the command line is empty"]),
    # min_steps and max_epochs size the run only when max_steps and num_train_epochs do not: given, they were ignored
    ("rm-min-steps-beside-max-steps", "stages.rm", RM + ["--min_steps", "3"],
     ["--min_steps on the command line would have no effect: max_steps 1 fixes", "--max_steps -1"]),
    ("rm-max-epochs-beside-epochs", "stages.rm", RM + ["--max_steps", "-1", "--num_train_epochs", "1", "--max_epochs", "2"],
     ["--max_epochs on the command line would have no effect: num_train_epochs 1 fixes", "--num_train_epochs 0"]),
    ("rm-share-prefix-without-groups", "stages.rm", RM + ["--batch_by_prompt", "false", "--share_prefix", "false"],
     ["--share_prefix on the command line would have no effect", "--batch_by_prompt true"]),
    ("rm-margin-column-without-scale", "stages.rm", RM + ["--margin_column", "score"],
     ["--margin_column on the command line would have no effect: margin_scale 0", "--margin_scale"]),
    ("rm-eval-steps-beside-evals", "stages.rm", RM + ["--eval_steps", "5"],
     ["--eval_steps on the command line would have no effect: plan_steps sets it from evals", "--evals"]),
    ("rm-evals-without-steps", "stages.rm", RM + ["--eval_strategy", "no", "--save_strategy", "no", "--evals", "3"],
     ["--evals on the command line would have no effect: eval_strategy is no"]),
    # TRL's disable_dropout (on) zeroes every dropout once the LoRA layers are in: the adapters were bit-identical to 0's
    ("rm-lora-dropout-under-disable-dropout", "stages.rm", RM + ["--lora_dropout", "0.3"],
     ["--lora_dropout on the command line would have no effect: TRL's disable_dropout", "--disable_dropout false"]),
    ("dpo-share-prefix-without-groups", "stages.dpo", ["--config", "configs/dpo.yaml", "--batch_by_prompt", "false",
                                                       "--share_prefix", "true"],
     ["--share_prefix on the command line would have no effect", "--batch_by_prompt true"]),
    ("dpo-share-prefix-under-checkpointing", "stages.dpo", ["--config", "configs/dpo.yaml", "--share_prefix", "true",
                                                            "--activation_checkpointing", "true"],
     ["--share_prefix on the command line would have no effect: activation checkpointing", "--activation_checkpointing false"]),
    ("dpo-lora-dropout-under-disable-dropout", "stages.dpo", ["--config", "configs/dpo.yaml", "--lora_dropout", "0.1"],
     ["--lora_dropout on the command line would have no effect: TRL's disable_dropout", "--disable_dropout false"]),
    # Ziegler's controller moved kl_coef 0.25 to -0.07 in one update of 32 episodes over a horizon of 5
    ("ppo-kl-horizon-past-zero", "stages.ppo", PPO + ["--adaptive_kl", "true", "--kl_horizon", "5"],
     ["kl_horizon 5 with adaptive_kl: an update of 32 episodes would move kl_coef by up to 128%, below 0",
      "give a kl_horizon above 6.4"]),
    ("eval-length-ratio-at-1", "stages.eval", EVAL + ["--hacking_length_ratio", "1"],
     ["--hacking_length_ratio on the command line is 1.0: it must be > 1"]),
    ("eval-hacking-kl-negative", "stages.eval", EVAL + ["--hacking_kl", "-1"],
     ["--hacking_kl on the command line is -1.0: it must be > 0"]),
    # a split without your own data: the bundled data was read as before, with no word
    ("ppo-split-without-dataset", "stages.ppo", PPO + ["--dataset_split", "test"],
     ["--dataset_split on the command line would have no effect: it picks the split of --dataset_name"]),
    ("ppo-prompts-file-empty", "stages.ppo", PPO + ["--prompts_file", " "], ["--prompts_file on the command line is empty"]),
    ("pairs-empty-file", "stages.pairs", PAIRS + ["--dataset_name", "{empty}"], ["empty.jsonl", "empty"]),
    ("pairs-empty-prompt", "stages.pairs", PAIRS + ["--dataset_name", "{empty_prompt}"], ["row 2", "the prompt is empty"]),
    ("pairs-max-new-tokens-0", "stages.pairs", PAIRS + ["--max_new_tokens", "0"], ["--max_new_tokens", ">= 1"]),
    ("pairs-generation-batch-0", "stages.pairs", PAIRS + ["--generation_batch_size", "0"], ["--generation_batch_size"]),
    ("pairs-num-responses-1", "stages.pairs", PAIRS + ["--num_responses", "1"], ["num_responses"]),
    ("pairs-top-p-0", "stages.pairs", PAIRS + ["--top_p", "0"], ["--top_p", "(0, 1]"]),
    ("ppo-empty-file", "stages.ppo", PPO + ["--dataset_name", "{blank}"], ["blank.jsonl is empty"]),
    ("ppo-empty-prompt", "stages.ppo", PPO + ["--dataset_name", "{empty_prompt}"], ["row 2", "the prompt is empty"]),
    ("sft-sharegpt-roles", "stages.sft", SFT + ["--dataset_name", "{sharegpt_chats}"],
     ["row 4 of", "role 'human' is not one of system, user, assistant", "ShareGPT's 'human' is 'user'"]),
    ("rm-sharegpt-roles", "stages.rm", RM + ["--dataset_name", "{sharegpt_prefs}"],
     ["sharegpt_prefs.jsonl row 1", "'prompt': role 'human'", "is 'user'"]),
    ("ppo-sharegpt-roles", "stages.ppo", PPO + ["--dataset_name", "{sharegpt_prompts}"], ["role 'human'", "is 'user'"]),
    ("eval-max-new-tokens-0", "stages.eval", EVAL + ["--max_new_tokens", "0"], ["--max_new_tokens", ">= 1"]),
    ("eval-score-batch-0", "stages.eval", EVAL + ["--score_batch_size", "0"], ["--score_batch_size"]),
    ("eval-generation-batch-0", "stages.eval", EVAL + ["--generation_batch_size", "0"], ["--generation_batch_size"]),
    ("eval-max-prompt-tokens-0", "stages.eval", EVAL + ["--max_prompt_tokens", "0"], ["--max_prompt_tokens", ">= 1"]),
    ("eval-gold-batch-0", "stages.eval", EVAL + ["--gold_batch_size", "0"], ["--gold_batch_size", ">= 1"]),
    ("eval-max-prompts-negative", "stages.eval", EVAL + ["--max_prompts", "-1"], ["--max_prompts", ">= 0"]),
    ("eval-samples-per-prompt-0", "stages.eval", EVAL + ["--samples_per_prompt", "0"], ["--samples_per_prompt", ">= 1"]),
    ("eval-temperature-negative", "stages.eval", EVAL + ["--temperature", "-1"], ["--temperature", ">= 0"]),
    ("wrong-type-flag", "stages.sft", SFT + ["--learning_rate", "abc"], ["--learning_rate", "on the command line", "number"]),
    ("wrong-type-int-flag", "stages.rm", RM + ["--per_device_train_batch_size", "1.5"],
     ["--per_device_train_batch_size", "whole number"]),
    ("dpo-mixture-unknown-key", "stages.dpo", ["--config", "configs/dpo.yaml", "--dataset_mixture", '{{"a.jsonl": {{"wieght": 1}}}}'],  # {{ }}: the args are str.format()ed
     ["--dataset_mixture", "on the command line", "unknown key(s) ['wieght']"]),
    ("dpo-mixture-bad-json", "stages.dpo", ["--config", "configs/dpo.yaml", "--dataset_mixture", "{{bad"],
     ["--dataset_mixture", "on the command line", "JSON object"]),
    ("missing-model-profile", "stages.sft", SFT + ["--model_config", "configs/models/nope.yaml"],
     ["nope.yaml does not exist", "configs/models/tiny.yaml"]),
    ("model-profile-an-adapter", "stages.sft", SFT + ["--model_config", "{adapter_profile}"],
     ["adapter is a LoRA adapter, not a base model", "the base it was trained on (/models/my-base)"]),
    ("model-profile-a-file", "stages.sft", SFT + ["--model_config", "{file_profile}"],
     ["adapter_config.json is a file, not a folder", "holds config.json"]),
    ("model-profile-dtype", "stages.sft", SFT + ["--model_config", "{fp16_profile}"],
     ["fp16.yaml", "dtype is 'fp16'", "float32, bfloat16, float16"]),
    ("yaml-float-for-int", "stages.sft", ["--config", "{sft_lora_float}"] + SFT[2:], ["'lora_r' in", "whole number"]),
    ("sft-mixture-rows-text", "stages.sft", SFT_MIXTURE + ["--dataset_mixture", '{{"data/story/sft.jsonl": "abc"}}'],
     ["--dataset_mixture", "whole number"]),
    ("rm-mixture-not-a-mapping", "stages.rm", RM_MIXTURE + ["--dataset_mixture", '{{"label-export": 5}}'],
     ["--dataset_mixture", "weight: W"]),
    ("sft-seed-negative", "stages.sft", SFT + ["--seed", "-1"], ["--seed", "[0, 4294967296)"]),
    ("ppo-seed-negative", "stages.ppo", PPO + ["--seed", "-1"], ["--seed", "[0, 4294967296)"]),
    ("ppo-scheduler-unknown", "stages.ppo", PPO + ["--lr_scheduler_type", "bogus"], ["lr_scheduler_type 'bogus'"]),
    ("dpo-beta-0", "stages.dpo", ["--config", "configs/dpo.yaml", "--beta", "0"], ["--beta", "> 0"]),
    # TRL's DPO failed in its first step, after the run folder was written, with two tracebacks
    ("dpo-loss-type-unknown", "stages.dpo", ["--config", "configs/dpo.yaml", "--loss_type", "foo"],
     ["--loss_type foo: TRL's DPO knows sigmoid, hinge, ipo"]),
    # batches by prompt (configs/dpo.yaml) train the sigmoid loss alone: TRL's other losses need its pairwise batches
    ("dpo-loss-type-by-prompt", "stages.dpo", ["--config", "configs/dpo.yaml", "--loss_type", "ipo"],
     ["--loss_type ipo: batch_by_prompt trains DPO's sigmoid loss alone", "(--batch_by_prompt false)"]),
    # 0 epochs under max_steps -1 trained no step and saved the untrained adapter, exit 0
    ("dpo-zero-epochs", "stages.dpo", ["--config", "configs/dpo.yaml", "--num_train_epochs", "0"],
     ["num_train_epochs 0 with max_steps -1 trains nothing", "--num_train_epochs above 0"]),
    ("sft-zero-epochs", "stages.sft", SFT + ["--max_steps", "-1", "--num_train_epochs", "0"],
     ["num_train_epochs 0 with max_steps -1 trains nothing"]),
    # past an index's size: a torch traceback after the run folder was prepared
    ("sft-batch-past-an-index", "stages.sft", SFT + ["--per_device_train_batch_size", "100000000000000000000"],
     ["--per_device_train_batch_size", "it must be below 2147483648"]),
    # make gives --run and --runs_dir: a second one in ARGS won, writing another folder than make checked and cleans
    ("run-given-twice", "stages.sft", SFT + ["--run", "other"], ["--run is given more than once (other, t)", "RUN="]),
    ("runs-dir-given-twice", "stages.rm", RM + ["--runs_dir=elsewhere"], ["--runs_dir is given more than once", "RUNS_DIR="]),
    ("rm-max-epochs-0", "stages.rm", RM + ["--max_epochs", "0"], ["invalid value of --max_epochs", "max_epochs must be"]),
    # a prompt and its reply past the base's 512 positions (the tiny models'): GPT-2 fails mid-sampling, after prepare
    ("pairs-past-the-positions", "stages.pairs", PAIRS + ["--max_new_tokens", "600"],
     ["--max_new_tokens 600 make", "more than the base model's 512", "--max_prompt_tokens"]),
    ("ppo-past-the-positions", "stages.ppo", PPO + ["--response_length", "600"],
     ["--response_length 600 and the chat template's", "closing tokens after the reply make",
      "more than the base model's 512", "--max_prompt_length"]),
    ("eval-past-the-positions", "stages.eval", EVAL + ["--max_new_tokens", "600"],
     ["--max_new_tokens 600 and the chat template's", "closing tokens after the reply make",
      "more than the base model's 512", "--max_prompt_tokens"]),
    # training rows past them: GPT-2 failed mid-training, after prepare (cut to a max_length that fits, they train)
    ("sft-past-the-positions", "stages.sft", SFT + ["--dataset_name", "{long_chats}", "--max_length", "900"],
     ["training rows of up to ", "max_length 900", "the base model's 512 positions", "--max_length 512 or less"]),
    ("rm-past-the-positions", "stages.rm", RM + ["--dataset_name", "{long_prefs}", "--max_length", "900"],
     ["training rows of up to ", "max_length 900", "the base model's 512 positions", "--max_length 512 or less"]),
    ("sft-held-out-past-the-positions", "stages.sft", SFT + ["--dataset_name", "{long_held_out_chats}", "--max_length",
                                                             "900", "--eval_fraction", "0.25"],
     ["training rows of up to ", "max_length 900", "the base model's 512 positions"]),
    ("rm-held-out-past-the-positions", "stages.rm", RM + ["--dataset_name", "{long_held_out_prefs}", "--max_length",
                                                          "900", "--eval_fraction", "0.25"],
     ["training rows of up to ", "max_length 900", "the base model's 512 positions"]),
    ("dpo-held-out-past-the-positions", "stages.dpo", ["--config", "configs/dpo.yaml", "--dataset_name",
                                                       "{long_held_out_prefs}", "--max_length", "900", "--max_steps", "1",
                                                       "--eval_fraction", "0.25"],
     ["training rows of up to ", "max_length 900", "the base model's 512 positions"]),
    ("dpo-past-the-positions", "stages.dpo", ["--config", "configs/dpo.yaml", "--dataset_name", "{long_prefs}",
                                              "--max_length", "900", "--max_steps", "1"],
     ["training rows of up to ", "max_length 900", "the base model's 512 positions", "--max_length 512 or less"]),
]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_models):
    """A run with sft, rm and ppo outputs (fake but loadable), built once; each case works on a copy."""
    return build_upstream(tmp_path_factory.mktemp("upstream") / "runs", tiny_models["llama"])


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def run_stage(module: str, argv: list[str], capsys) -> tuple[int, list[str], str]:
    mod = importlib.import_module(module)
    parse_args = getattr(mod, "parse_args", None) or (lambda a: parse(mod.CONFIG_CLASSES(), a))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main_guard(lambda: mod.main(*parse_args(argv)))
    err = capsys.readouterr().err
    return stop.value.code, [line for line in err.splitlines() if line.startswith("error:")], err


@pytest.mark.parametrize("case, module, args, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_exit_2_with_the_run_folder_unchanged(case, module, args, words, upstream,
                                                                               tiny_models, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(upstream, runs)
    stage = {"stages.sft": "sft", "stages.rm": "rm", "stages.ppo": "ppo", "stages.pairs": "pairs", "stages.eval": "eval",
             "stages.dpo": "dpo"}[module]
    (runs / "t" / stage).mkdir(exist_ok=True)
    (runs / "t" / stage / "manifest.json").write_text('{"stage": "an earlier run"}')  # must survive, as must the rest
    before = tree(runs)
    named = files(tmp_path)
    argv = [a.format(**named) for a in args] + ["--run", "t", "--runs_dir", str(runs),
                                                 "--model_config", str(tiny_models["llama"])]
    if "--model_config" in args:  # the case's own profile comes last, so it wins
        i = args.index("--model_config")
        argv += ["--model_config", args[i + 1].format(**named)]
    code, errors, err = run_stage(module, argv, capsys)
    assert code == 2, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    assert all(w in errors[0] for w in words), errors[0]
    assert "Traceback" not in err and "usage:" not in err
    assert tree(runs) == before




@pytest.mark.parametrize("launched_as, config", [("ppo", "configs/grpo.yaml"), ("grpo", "configs/ppo.yaml")])
def test_an_rl_stage_launched_as_another_estimators_folder_is_refused(launched_as, config, upstream,
                                                                      tiny_models, tmp_path, capsys, monkeypatch):
    """pipeline.launch locks and checks the folder make named (PIPELINE_STAGE): the stage refuses to write another
    (a recipe's ppo.yaml that picks grpo, reached through a chain, is not parsed by make's check). Started without
    make (no PIPELINE_STAGE, or make's check of a stage module it does not launch) it writes its estimator's own."""
    runs = tmp_path / "runs"
    shutil.copytree(upstream, runs)
    before = tree(runs)
    monkeypatch.setenv("PIPELINE_STAGE", launched_as)
    argv = ["--config", config, "--total_updates", "1", "--run", "t", "--runs_dir", str(runs),
            "--model_config", str(tiny_models["llama"])]
    code, errors, err = run_stage("stages.ppo", argv, capsys)
    assert code == 2 and len(errors) == 1 and f"this is `make {launched_as}`" in errors[0], err[-2000:]
    assert tree(runs) == before
    check_launched_folder("grpo", "advantage_estimator grpo", "grpo")  # its own folder
    for unset in ("", None):
        monkeypatch.setenv("PIPELINE_STAGE", unset) if unset is not None else monkeypatch.delenv("PIPELINE_STAGE")
        check_launched_folder("grpo", "advantage_estimator grpo")


def test_an_adapter_save_killed_midway_leaves_nothing_the_next_save_does_not_clear(upstream, tiny_models, tmp_path):
    """PPO's adapters are written into a temporary folder beside their own, then copied: `kill -9` during that left a
    tmpXXXX folder in the run for good. Its name is now fixed, so the next save (the rerun's) clears it; and the new
    folder replaces the old one whole (files were copied in one by one, beside an earlier run's). The kill is real: a
    process that exits at once after the library wrote the files."""
    import sys
    import textwrap

    out = tmp_path / "ppo" / "adapter"
    script = textwrap.dedent(f"""
        import os, sys
        from pipeline.adapters import AdapterStack
        from pipeline.models import load_tokenizer, profile_from
        prof = profile_from({str(tiny_models["llama"])!r})
        stack = AdapterStack.build(prof, load_tokenizer(prof), {{"policy": {str(upstream / "t" / "sft" / "adapter")!r}}})
        if sys.argv[1] == "kill":
            save = type(stack.model).save_pretrained
            type(stack.model).save_pretrained = lambda self, *a, **k: (save(self, *a, **k), os._exit(9))
        stack.save("policy", {str(out)!r})
    """)
    out.mkdir(parents=True)
    (out / "adapter_model.bin").write_text("an earlier run's")  # a rewrite replaces the folder whole
    killed = subprocess.run([sys.executable, "-c", script, "kill"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9 and any((tmp_path / "ppo").iterdir()), killed.stderr[-2000:]
    saved = subprocess.run([sys.executable, "-c", script, "save"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert saved.returncode == 0, saved.stderr[-2000:]
    assert [p.name for p in (tmp_path / "ppo").iterdir()] == ["adapter"]
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def test_ppo_refusing_a_reward_adapter_of_another_base_leaves_the_finished_run_as_it_was(upstream, tiny_models,
                                                                                         tmp_path, capsys):
    """The adapters are checked against the base only when the stack is built (AdapterStack.build): that must come
    before the stage drops the earlier run's manifest, its checkpoints (what a crashed run resumes from) and its kept
    policies."""
    from pipeline.models import FINGERPRINT_FILE

    runs = tmp_path / "runs"
    shutil.copytree(upstream, runs)
    ppo = runs / "t" / "ppo"
    for kept in (ppo / "checkpoints" / "checkpoint-000001", ppo / "policies" / "update-000001"):
        shutil.copytree(ppo / "adapter", kept)
    (ppo / "checkpoints" / "checkpoint-000001" / "trainer_state.pt").write_bytes(b"optimizer state")
    (ppo / "checkpoints" / "checkpoint-000001" / "checkpoint.json").write_text('{"update": 1}')
    other = shutil.copytree(runs / "t" / "rm" / "adapter", tmp_path / "other_base_rm")  # outside the run folder
    fp = json.loads((other / FINGERPRINT_FILE).read_text())
    fp["fingerprint"]["hidden_size"] = 999
    (other / FINGERPRINT_FILE).write_text(json.dumps(fp))
    before = tree(runs)
    assert {"t/ppo/manifest.json", "t/ppo/checkpoints/checkpoint-000001/trainer_state.pt",
            "t/ppo/policies/update-000001/adapter_model.safetensors"} <= set(before)

    argv = PPO + ["--reward_adapter", str(other), "--run", "t", "--runs_dir", str(runs),
                  "--model_config", str(tiny_models["llama"])]
    code, errors, err = run_stage("stages.ppo", argv, capsys)
    assert code == 2, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    assert str(other) in errors[0] and "hidden_size: adapter 999" in errors[0], errors[0]
    assert "Traceback" not in err
    assert tree(runs) == before
# ---------------------------------------------------------------- disk faults: one line naming the path and the fix

@pytest.mark.parametrize("key,theirs", [("vocab_size", 600), ("hidden_size", 64), ("num_hidden_layers", 3),
                                        ("num_attention_heads", 8), ("intermediate_size", 128)])
def test_an_adapter_of_a_base_with_another_shape_is_refused_naming_what_differs(key, theirs, tiny_models, tmp_path):
    """A LoRA on the attention projections loads onto a base with another vocabulary without a size mismatch (it holds
    no embedding), and then scores other tokens: every shape of the base is part of its fingerprint."""
    from transformers import AutoConfig

    from pipeline.config import load_model_profile
    from pipeline.models import check_adapter, save_fingerprint

    base = AutoConfig.from_pretrained(load_model_profile(tiny_models["llama"]).name_or_path)
    other = AutoConfig.from_pretrained(load_model_profile(tiny_models["llama"]).name_or_path, **{key: theirs})
    (tmp_path / "adapter_config.json").write_text("{}")
    save_fingerprint(tmp_path, other, "other-base")
    with pytest.raises(ConfigError, match=rf"reward adapter {tmp_path} was trained on base 'other-base', which differs "
                                          rf"from the base in use \({key}: adapter {theirs} vs base {getattr(base, key)}\)"):
        check_adapter(tmp_path, base, "reward")
    save_fingerprint(tmp_path, base, "same-base")
    assert check_adapter(tmp_path, base, "reward") == tmp_path
    with pytest.raises(ConfigError, match=rf"SFT \(policy\) adapter {tmp_path / 'gone'} is missing \(no adapter_config"
                                          rf"\.json\): rerun the stage that makes it with FORCE=1 \(`make` takes"):
        check_adapter(tmp_path / "gone", base, "SFT (policy)")


def test_run_folder_under_a_regular_file_is_one_error_line(tiny_models, tmp_path, capsys):
    """A real fault, also as root: the runs folder's parent is a file, so nothing can be created under it."""
    (tmp_path / "not_a_folder").write_text("a file")
    runs = tmp_path / "not_a_folder" / "runs"
    chats = files(tmp_path)["chats"]
    code, errors, err = run_stage("stages.sft", [a.format(chats=chats) for a in SFT] + [
        "--run", "t", "--runs_dir", str(runs), "--model_config", str(tiny_models["llama"])], capsys)
    assert code == 2 and len(errors) == 1, err[-2000:]
    assert str(runs) in errors[0] and "is a file, not a folder" in errors[0]
    assert (tmp_path / "not_a_folder").read_text() == "a file"


@pytest.mark.parametrize("module, args, cut", [("stages.pairs", PAIRS, "sft"), ("stages.ppo", PPO, "rm")])
def test_a_cut_short_upstream_adapter_is_one_line_naming_it_and_force(module, args, cut, tiny_models, tmp_path, capsys):
    """An upstream adapter cut short (a copy, a full disk): `make` takes its stage as up to date (a manifest records
    its inputs, not its outputs' bytes), and the next stage crashed in safetensors with every rank's traceback."""
    runs = build_upstream(tmp_path / "runs", tiny_models["llama"])  # its own: the manifests name their adapters' paths
    weights = runs / "t" / cut / "adapter" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    before = tree(runs)
    code, errors, err = run_stage(module, args + ["--run", "t", "--runs_dir", str(runs),
                                                  "--model_config", str(tiny_models["llama"])], capsys)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert errors[0].endswith(
        f" adapter {weights.parent} is damaged: adapter_model.safetensors cannot be read (Error while deserializing "
        f"header: incomplete metadata, file not fully covered; cut short by a copy or a full disk?): rerun the stage "
        f"that makes it with FORCE=1"), errors[0]
    assert "could not put" not in errors[0]  # PPO's line for an adapter of another base does not wrap it
    assert tree(runs) == before


@pytest.mark.parametrize("flag", ["--sft_adapter", "--reward_adapter"])
def test_an_adapter_named_by_a_flag_is_checked_naming_the_flag_not_a_stage_to_rerun(flag, tiny_models, tmp_path, capsys):
    """PPO's --sft_adapter and --reward_adapter name your folders, which no stage makes: a folder without a PEFT adapter
    (the stage's folder for its adapter/) or with weights cut short is one line naming the flag and what to give it,
    not 'rerun the stage that makes it with FORCE=1' (FORCE=1 would redo a stage that never made it)."""
    runs = build_upstream(tmp_path / "runs", tiny_models["llama"])
    given = runs / "t" / ("sft" if flag == "--sft_adapter" else "rm")  # the stage's folder, not its adapter/
    before = tree(runs)
    argv = PPO + [flag, str(given), "--run", "t", "--runs_dir", str(runs), "--model_config", str(tiny_models["llama"])]
    code, errors, err = run_stage("stages.ppo", argv, capsys)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert errors[0] == (f"error: {flag} {given} is not a PEFT adapter folder (no adapter_config.json): give {flag} the "
                         f"folder that holds adapter_config.json and the adapter's weights (a stage's adapter/)"), errors[0]

    weights = given / "adapter" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    before = tree(runs)
    argv[argv.index(flag) + 1] = str(weights.parent)
    code, errors, err = run_stage("stages.ppo", argv, capsys)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert errors[0] == (f"error: {flag} {weights.parent} is damaged: adapter_model.safetensors cannot be read (Error "
                         f"while deserializing header: incomplete metadata, file not fully covered; cut short by a copy "
                         f"or a full disk?): copy the adapter again, or give {flag} another one"), errors[0]
    assert "FORCE=1" not in errors[0] and tree(runs) == before


@pytest.mark.parametrize("fault", ["read-only", "disk-full"])
def test_disk_fault_is_one_error_line_naming_the_path_and_the_fix(fault, tiny_models, tmp_path, capsys, monkeypatch):
    """Read-only: a folder without write permission (as root, which chmod does not stop, the write raises EROFS as a
    read-only mount would). Full: the write raises ENOSPC. Both reach main_guard as OSError, and leave one line."""
    runs = tmp_path / "runs"
    (runs / "t").mkdir(parents=True)
    target = runs / "t" / "sft"
    if fault == "read-only" and os.geteuid() != 0:
        (runs / "t").chmod(0o555)
    else:
        code, text = (errno.EROFS, "Read-only file system") if fault == "read-only" else (errno.ENOSPC, "No space left on device")
        real_mkdir = Path.mkdir

        def failing_mkdir(self, *a, **k):
            if self == target:
                raise OSError(code, text, str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", failing_mkdir)
    chats = files(tmp_path)["chats"]
    try:
        code, errors, err = run_stage("stages.sft", [a.format(chats=chats) for a in SFT] + [
            "--run", "t", "--runs_dir", str(runs), "--model_config", str(tiny_models["llama"])], capsys)
    finally:
        (runs / "t").chmod(0o755)
    assert code == 2 and len(errors) == 1, err[-2000:]
    # a folder that is not writable is named, not the one the stage could not make in it (not_writable_path)
    named = runs / "t" if fault == "read-only" and os.geteuid() != 0 else target
    assert f" {named}: " in errors[0] and "Traceback" not in err
    fix = "free space" if fault == "disk-full" else "writable"
    assert fix in errors[0] and "RUNS_DIR=" in errors[0], errors[0]
    assert not target.exists()


def test_a_refused_write_names_the_folder_the_user_makes_writable_not_the_stages_temporary(tmp_path, monkeypatch):
    """A read-only stage folder (`chmod -R a-w runs/RUN/sft`, then FORCE=1) refused the stage's first write, the atomic
    write of started.json, and the line named its temporary (`started.json.tmp32192`), which the user cannot chmod;
    eval's refused `mkdir sampled` named a folder that does not exist. The line names the folder to make writable; a
    write refused in a writable folder (a read-only file, a read-only disk) keeps the name the system gave."""
    from pipeline.run import disk_problem

    fix = ("make it writable (chmod u+w, or remount the disk read-write), or point RUNS_DIR= (--runs_dir) at a writable "
           "folder, and run the same command again")
    stage = tmp_path / "runs" / "t" / "sft"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text("{}")
    unwritable = {str(stage), str(stage / "manifest.json")}  # as chmod -R a-w to a user who is not root
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not (mode & os.W_OK and str(path) in unwritable)
                        and real_access(path, mode))
    for refused in (stage / "started.json.tmp32192", stage / "sampled" / "sft" / "batch-000000.part",
                    stage / "manifest.json"):
        err = PermissionError(errno.EACCES, "Permission denied", str(refused))
        assert disk_problem(err) == f"no access to {stage}: Permission denied: {fix}", refused
    unwritable.discard(str(stage))  # the folder is writable, its manifest is not
    err = PermissionError(errno.EACCES, "Permission denied", str(stage / "manifest.json"))
    assert disk_problem(err) == f"no access to {stage / 'manifest.json'}: Permission denied: {fix}"


def test_a_rank_whose_peer_left_waits_to_be_stopped_before_its_traceback(monkeypatch, capsys):
    """`make pairs` / `make eval` (two CPU ranks) on a read-only run folder: the main process's first write was
    refused, it said so in one line and exited, and rank 1, waiting at a barrier, printed gloo's "Connection closed by
    peer" traceback beside it. A rank whose peer left waits as refuse does, for the launcher to stop it; one not
    stopped by then still raises, and any other error raises at once."""
    import time

    import pipeline.run as run

    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(run, "end_with_launcher", lambda: None)
    peer_left = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4005. This is "
                             "typically caused by a remote worker crashing.")

    def fails(err):
        def main_fn():
            raise err
        return main_fn

    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        main_guard(fails(peer_left))
    assert waits == [run.OTHER_RANKS_WAIT_S] and capsys.readouterr().err == ""
    waits.clear()
    with pytest.raises(RuntimeError, match="the model diverged"):
        main_guard(fails(RuntimeError("the model diverged")))
    assert waits == []
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        main_guard(fails(peer_left))
    assert waits == []


def test_bad_input_is_said_at_once_by_rank_0_and_after_the_wait_by_another_rank(monkeypatch, capsys):
    """refuse: rank 0 of a two-process stage prints its one line and exits 2 at once (then the launcher stops the other
    rank); rank 1 waits OTHER_RANKS_WAIT_S first, in case rank 0 says it; a stage of one process never waits."""
    import time

    import pipeline.run as run

    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    for rank, world, waited in (("0", "2", []), ("1", "2", [run.OTHER_RANKS_WAIT_S]), ("0", "1", [])):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        waits.clear()
        with pytest.raises(SystemExit) as stopped:
            run.refuse("--lr is -1: it must be > 0")
        assert (stopped.value.code, waits) == (2, waited), (rank, world)
        assert capsys.readouterr().err == "error: --lr is -1: it must be > 0\n"


def test_a_library_writer_failing_on_a_full_or_read_only_disk_is_one_line_naming_its_file(tmp_path, monkeypatch):
    """torch.save (a checkpoint's optimizer, the kept batches of pairs and eval) and safetensors (adapters) fail on a
    full disk without an errno: a RuntimeError of torch's zip writer, a SafetensorError whose message holds it. Each
    was two screens of traceback (two ranks' in `make pairs`); now the line a full disk gives, naming the file."""
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from pipeline.run import disk_problem

    full = ("free space on that disk, or point RUNS_DIR= (--runs_dir) at a disk with room, and run the same command "
            "again")
    optimizer = tmp_path / "checkpoint-2" / "optimizer.pt"
    optimizer.parent.mkdir()
    limit, on_limit = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, limit[1]))  # torch's own failure: its writes refused at 64 KiB
    try:
        with pytest.raises(RuntimeError) as torch_failed:
            torch.save({"w": torch.zeros(100_000)}, str(optimizer))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, on_limit)

    class Disk:  # the file's disk as statvfs reports it
        f_flag, f_frsize, f_bavail = 0, 4096, 255

    monkeypatch.setattr(os, "statvfs", lambda path: Disk)
    assert disk_problem(torch_failed.value) == f"cannot write {optimizer}: No space left on device: {full}"
    Disk.f_flag = os.ST_RDONLY
    assert disk_problem(torch_failed.value) == (
        f"cannot write {optimizer}: Read-only file system: make it writable (chmod u+w, or remount the disk read-write), "
        "or point RUNS_DIR= (--runs_dir) at a writable folder, and run the same command again")
    Disk.f_flag, Disk.f_bavail = 0, 256  # 1 MiB free: the write did not run out of room, so the traceback is kept
    assert disk_problem(torch_failed.value) is None

    def no_room(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "serialize_file", no_room)
    target = tmp_path / "adapter" / "adapter_model.safetensors"
    with pytest.raises(SafetensorError) as safetensors_failed:
        safetensors.torch.save_file({"w": torch.zeros(3)}, str(target))
    assert disk_problem(safetensors_failed.value) == f"cannot write {target}: No space left on device: {full}"
    assert disk_problem(RuntimeError("basic_ios::clear: iostream error")) is None  # no writer's frame: not a disk's


# ---------------------------------------------------------------- through make: no usage dump, the flag or file named

def make_errors(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


def test_wrong_type_through_make_is_one_line_naming_the_flag_not_a_usage_dump(tmp_path):
    res = make("sft", "ARGS=--per_device_train_batch_size two", fake=False, runs_dir=tmp_path / "runs")
    assert res.returncode == 2, res.stderr[-2000:]
    errors = make_errors(res)
    assert len(errors) == 1 and "--per_device_train_batch_size on the command line is 'two'" in errors[0], res.stderr
    assert "usage:" not in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_yaml_value_is_blamed_on_the_yaml_key_and_a_cli_value_on_the_flag(tmp_path, capsys):
    """The same bad value, once from a YAML file, once from the command line: each names where it came from."""
    yaml_file = tmp_path / "sft.yaml"
    yaml_file.write_text(yaml_with((REPO / "configs/sft.yaml").read_text(), "\nlearning_rate: fast\n"))
    from stages.sft import parse_args

    with pytest.raises(Exception) as from_yaml:
        parse_args(["--config", str(yaml_file)])
    assert f"'learning_rate' in {yaml_file}" in str(from_yaml.value) and "--learning_rate" not in str(from_yaml.value)
    with pytest.raises(Exception) as from_cli:
        parse_args(["--config", str(yaml_file), "--learning_rate", "quick"])
    assert "--learning_rate on the command line is 'quick'" in str(from_cli.value)
    # a class's own check (PPOConfig) is blamed on the flag given, not on the YAML
    from stages.ppo import parse_args as ppo_args

    with pytest.raises(Exception) as ppo_cli:
        ppo_args(["--config", "configs/ppo.yaml", "--lam", "2"])
    assert "--lam on the command line" in str(ppo_cli.value) and "configs/ppo.yaml" not in str(ppo_cli.value)
    yaml_lam = tmp_path / "ppo.yaml"
    yaml_lam.write_text(yaml_with((REPO / "configs/ppo.yaml").read_text(), "\nlam: 2\n"))
    with pytest.raises(Exception) as ppo_yaml:
        ppo_args(["--config", str(yaml_lam)])
    assert f"'lam' in {yaml_lam}" in str(ppo_yaml.value)


def test_missing_model_profile_through_make_names_it_and_lists_the_shipped_ones(tmp_path):
    res = make("sft", "MODEL=configs/models/nope.yaml", fake=False, runs_dir=tmp_path / "runs")
    assert res.returncode == 2, res.stderr[-2000:]
    errors = make_errors(res)
    assert len(errors) == 1 and "configs/models/nope.yaml does not exist" in errors[0], res.stderr
    assert "configs/models/tiny.yaml" in errors[0] and "--config" not in errors[0]
    assert not (tmp_path / "runs").exists()


def test_a_training_row_is_checked_against_the_bases_positions_as_the_trainer_will_cut_it():
    """check_training_length by hand, on a GPT-2-like config of 512 positions: a row longer than them is refused
    unless max_length cuts it to fit; max_length alone is checked where the trainer tokenizes or packs (longest None);
    a base that names no positions is not checked. Mutant: the row's length taken before max_length's cut."""
    from types import SimpleNamespace

    from pipeline.config import ConfigError
    from pipeline.models import check_context, check_training_length

    gpt2 = SimpleNamespace(n_positions=512)
    for max_length, longest in ((900, 700), (600, None), (None, 600), (513, 513)):
        with pytest.raises(ConfigError, match=r"the base model's 512 positions: set --max_length 512 or less$"):
            check_training_length(gpt2, max_length, longest)
    for max_length, longest in ((400, 700), (900, 300), (512, 900), (None, None), (None, 512)):
        check_training_length(gpt2, max_length, longest)
    check_training_length(SimpleNamespace(), 5000, 5000)
    # a sampled prompt and its reply: 512 positions (0-511) fit, 513 do not
    check_context(gpt2, 500, 12, "--max_new_tokens", "--max_prompt_tokens")
    with pytest.raises(ConfigError, match="make 513 positions, more than the base model's 512"):
        check_context(gpt2, 500, 13, "--max_new_tokens", "--max_prompt_tokens")
    # the reward model reads the template's end-of-turn after the longest reply: 500 + 12 + 1 do not fit
    with pytest.raises(ConfigError, match="--response_length 12 and the chat template's 1 closing tokens after the "
                                          "reply make 513 positions, more than the base model's 512"):
        check_context(gpt2, 500, 12, "--response_length", "--max_prompt_length", 1)
    check_context(gpt2, 499, 12, "--response_length", "--max_prompt_length", 1)


def test_a_base_folder_without_config_json_is_one_error_naming_it(tmp_path):
    """A checkpoint folder that lost its config.json (a partial copy): transformers' AutoConfig raised ValueError
    ("Unrecognized model ...") out of every stage as a traceback, exit 1, instead of one error line."""
    from pipeline.config import ModelProfile
    from pipeline.models import base_config, load_base

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    profile = ModelProfile(name_or_path=str(folder), lora_target_modules=["q_proj"])
    for read in (lambda: base_config(profile), lambda: load_base(profile, tokenizer=None)):
        with pytest.raises(ConfigError, match=f"base model folder {folder} has no config.json: point name_or_path"):
            read()


def test_a_base_folder_that_does_not_exist_is_refused_not_taken_for_a_hub_id(tmp_path):
    """A name_or_path with two slashes or more (models/x/base), or one that starts with . or /, names a folder, never a
    Hub id (user/name): one that does not exist is one ConfigError naming it, before anything asks the Hub."""
    import re

    from pipeline.models import resolve_base

    for missing in ("models/no_such/base", "./no_such_base", str(tmp_path / "gone")):
        with pytest.raises(ConfigError, match=f"base model folder {re.escape(missing)} does not exist"):
            resolve_base(missing)
