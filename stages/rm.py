"""Stage 2: reward model, a LoRA adapter plus a scalar `score` head (TRL RewardTrainer, Bradley-Terry loss).

    make rm                                    # accelerate launch ... -m stages.rm --config configs/rm.yaml
    make rm ARGS="--dataset_name my_prefs.jsonl --learning_rate 1e-4"
    python -m stages.rm --reload-check ADAPTER_DIR EVAL_PAIRS.jsonl OUT.json [DTYPE BATCH]   # the stage's last check

Reads: the SFT manifest of the run (the reward model must sit on the policy's base, so that PPO can stack both
adapters on one model), this run's label export when present, and the bundled human preferences in
data/preferences/ (or --dataset_name, any TRL preference format). Writes runs/<run>/rm/: adapter/ (PEFT SEQ_CLS:
LoRA + `score` head, tokenizer, pipeline_base.json), eval_pairs.jsonl (the held-out pairs), reload_check.json,
config.json, manifest.json (last). The stage ends by reloading the adapter with stock
`AutoPeftModelForSequenceClassification` in a fresh process; if that copy does not reproduce the held-out
scores (e.g. a head that was not saved), the stage fails.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import torch

from pipeline.config import ConfigError, RunArgs, parse, resolve_path, to_dict
from pipeline.data import load_any, messages_problem, require_columns, text_problem, train_eval_split
from pipeline.models import (check_adapter, load_base, load_tokenizer, lora_config, profile_from, resolve_base,
                             save_fingerprint, score_head_name)
from pipeline import stats
from pipeline.generation import chat_ids, common_prefix
from pipeline.adapters import POOLINGS, ensemble_score, pool_in_forward, read_pooling, write_pooling
from pipeline.report import finish_distributed, peak_memory_mb, print_table
from pipeline.run import StageRun, atomic_write_json, main_guard, read_manifest, stage_dir
from pipeline.sharding import is_sharded, reshard, sharding_report, spread, take_over_from_accelerate

LABEL_EXPORT = "label-export"  # mixture key for this run's own labels (runs/<run>/label-export/manifest.json)
# Llama 2's small-margin scale (Touvron et al. 2023, table 28): "much better" 1, "slightly better" 1/3.
STRENGTH_WORDS = {"much": 1.0, "significantly": 1.0, "better": 2 / 3, "slightly": 1 / 3, "slight": 1 / 3,
                  "negligibly": 0.0, "unsure": 0.0}


@dataclass
class RMArgs:
    # Data
    dataset_name: str | None = field(default=None, metadata={
        "help": "Your own preference data (file, folder or Hub id) in any TRL preference format; replaces the mixture."})
    dataset_mixture: dict = field(default_factory=dict, metadata={
        "help": "Source -> {weight, max_rows}; 'label-export' is this run's labels, when present. JSON on the CLI."})
    eval_fraction: float = field(default=0.2, metadata={"help": "Share of prompts held out (no prompt in both halves)."})
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
        "help": "Reward models to train, with seeds seed, seed+1, ... on the same pairs and held-out prompts; PPO and "
                "eval then use the mean of their standardised scores (Coste et al. 2023). 1: one model."})
    pooling: str = field(default="last", metadata={
        "help": "How the head's per-token outputs become the score: last (the last real token, stock "
                "*ForSequenceClassification) or sum (over the reply's tokens, / 16; pipeline.adapters.pool_scores)."})
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0

    def __post_init__(self):
        self.dataset_mixture = checked_mixture(self.dataset_mixture)
        if self.min_steps < 1 or self.max_epochs <= 0 or self.evals < 1:
            raise ValueError("min_steps, max_epochs and evals must be positive")
        if self.ensemble < 1:
            raise ValueError(f"--ensemble {self.ensemble}: the number of reward models to train must be at least 1")
        if self.pooling not in POOLINGS:
            raise ValueError(f"--pooling {self.pooling}: one of {', '.join(POOLINGS)}")


def checked_mixture(mixture: dict | str) -> dict:
    """dataset_mixture (a dict, or JSON from the command line) with only known keys and no negative weight; a
    ValueError the argument parser turns into one line naming the flag or the YAML key. DPO shares it."""
    if isinstance(mixture, str):
        mixture = json.loads(mixture)
    for key, spec in mixture.items():
        unknown = set(spec or {}) - {"weight", "max_rows"}
        if unknown:
            raise ValueError(f"dataset_mixture['{key}'] has unknown key(s) {sorted(unknown)}: use weight, max_rows")
        if float((spec or {}).get("weight", 1.0)) < 0:
            raise ValueError(f"dataset_mixture['{key}'] has a negative weight")
    return mixture


# ---------------------------------------------------------------- data: any TRL preference format -> explicit pairs

def is_empty(response) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return not response or all(not str(m.get("content") or "").strip() for m in response)


def strength_value(value, column: str) -> float:
    if value is None or value == "":
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    words = str(value).strip().lower().split()
    word = words[0] if words else ""
    if word not in STRENGTH_WORDS:
        raise ConfigError(f"label strength {value!r} in column '{column}' is neither a number nor one of "
                          f"{sorted(STRENGTH_WORDS)}")
    return STRENGTH_WORDS[word]


def is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def preference_problem(row: dict) -> str | None:
    """Why a row is not a preference pair, or None: chosen and rejected each a text or a conversation (a list of
    {"role": text, "content": text}), the prompt (optional) too, all of one kind."""
    for key in ("prompt", "chosen", "rejected"):
        value = row.get(key)
        if key == "prompt" and value is None:
            continue
        problem = text_problem(value) if isinstance(value, str) else messages_problem(value)
        if problem:
            return f"'{key}': {problem}"
    return None


def to_pairs(ds, source: str, args: RMArgs, counts: dict, source_column: bool = False) -> list[dict]:
    """Rows -> {prompt, chosen, rejected, source, margin, tie}; equal or empty pairs dropped, counted per source.

    Implicit-prompt rows (chosen/rejected hold the whole conversation or text) get their shared prefix as the
    prompt, as TRL does, so that every pair has a prompt to split on."""
    from trl.data_utils import maybe_extract_prompt

    pairs = []
    for i, row in enumerate(ds):
        problem = preference_problem(row)
        if problem:
            raise ConfigError(f"{source} row {i + 1}: {problem}: give 'chosen' and 'rejected' (and optionally 'prompt') "
                              f"as texts or as lists of {{'role', 'content'}} messages")
        name = str(row["source"]) if source_column else source
        counts[name]["read"] += 1
        if row["chosen"] == row["rejected"]:
            counts[name]["equal"] += 1
            continue
        ex = maybe_extract_prompt({k: row[k] for k in ("prompt", "chosen", "rejected") if row.get(k) is not None})
        if is_empty(ex["chosen"]) or is_empty(ex["rejected"]):
            counts[name]["empty"] += 1
            continue
        fields = [ex["chosen"], ex["rejected"]] + ([ex["prompt"]] if ex["prompt"] else [])
        if len({is_messages(f) for f in fields}) > 1:
            raise ConfigError(f"{source} row {i} mixes plain-text and conversational fields: give prompt, chosen and "
                              f"rejected all as strings or all as lists of {{'role', 'content'}} messages")
        strength = strength_value(row.get(args.margin_column), args.margin_column) if args.margin_scale else 0.0
        # A tie exported in both orders (label-export's is_tie) trains the rewards together; it has no right answer.
        pairs.append({"prompt": ex["prompt"], "chosen": ex["chosen"], "rejected": ex["rejected"], "source": name,
                      "margin": args.margin_scale * strength, "tie": bool(row.get("is_tie"))})
    return pairs


def load_pairs(args: RMArgs, stage: StageRun, seed: int) -> tuple[list[dict], dict, dict, str]:
    """All usable pairs, the per-source weights, per-source counts (read, dropped), and a readable name of the data."""
    fix = "give preference rows with 'chosen' and 'rejected' (and optionally 'prompt') in a TRL preference format"
    counts: dict = defaultdict(Counter)
    if args.dataset_name:
        ds = load_any(args.dataset_name)
        require_columns(ds, ["chosen", "rejected"], args.dataset_name, fix)
        name = Path(args.dataset_name).stem if resolve_path(args.dataset_name).exists() else args.dataset_name
        pairs = to_pairs(ds, name, args, counts, source_column="source" in ds.column_names)
        return pairs, {}, counts, args.dataset_name
    if not args.dataset_mixture:
        raise ConfigError("no preference data: set dataset_mixture in configs/rm.yaml or pass --dataset_name")
    pairs, weights, used = [], {}, []
    for key, spec in args.dataset_mixture.items():
        spec = spec or {}
        if key == LABEL_EXPORT:
            manifest_path = stage_dir(stage.runs_dir, stage.run, LABEL_EXPORT) / "manifest.json"
            if not manifest_path.is_file():
                from stages.label.store import count_labels  # stdlib only

                db = stage_dir(stage.runs_dir, stage.run, "label") / "labels.sqlite"
                n_labels = count_labels(db)
                if n_labels:  # people labeled this run: training without their labels must not look fine
                    raise ConfigError(f"run '{stage.run}' has {n_labels} human labels in {db} but no label "
                                      f"export ({manifest_path} is missing): run `make label-export RUN={stage.run}`, "
                                      f"or drop '{LABEL_EXPORT}' from dataset_mixture to train without them")
                print(f"rm: no label export for run '{stage.run}' ({manifest_path}); training on the bundled data only")
                continue
            manifest = read_manifest(stage.runs_dir, stage.run, LABEL_EXPORT, needed_by="`make rm`")
            stage.upstream[LABEL_EXPORT] = manifest
            path, name = (manifest.get("outputs") or {}).get("dataset") or "", LABEL_EXPORT
            if not path or not Path(path).is_dir():
                raise ConfigError(f"the label export of run '{stage.run}' is broken: {manifest_path} names {path}, "
                                  f"which does not exist: rerun `make label-export RUN={stage.run}`")
        else:
            path, name = key, Path(key).stem if resolve_path(key).exists() else key
        ds = load_any(path)
        require_columns(ds, ["chosen", "rejected"], path, fix)
        rows = to_pairs(ds, name, args, counts)
        if spec.get("max_rows"):
            random.Random(seed).shuffle(rows)
            rows = rows[: int(spec["max_rows"])]
        pairs += rows
        weights[name] = float(spec.get("weight", 1.0))
        used.append(name)
    return pairs, weights, counts, "mixture of " + ", ".join(used)


def encode_pair(tokenizer, pair: dict) -> tuple[list[int], list[int]]:
    """prompt + response -> token ids, exactly as RewardTrainer tokenizes (conversational: chat template;
    plain text: EOS appended). Shared by training, held-out scoring and the fresh-process reload check. A pair that
    carries its token ids (eval_pairs.jsonl: as scored, after truncate_pair) keeps them."""
    if "chosen_ids" in pair:
        return pair["chosen_ids"], pair["rejected_ids"]
    out = []
    for key in ("chosen", "rejected"):
        if isinstance(pair[key], str):
            text = pair[key] if pair[key].endswith(tokenizer.eos_token) else pair[key] + tokenizer.eos_token
            out.append(tokenizer(text=pair["prompt"] + text)["input_ids"])
        else:
            try:
                ids = tokenizer.apply_chat_template(pair["prompt"] + pair[key], tokenize=True, return_dict=True)["input_ids"]
            except (jinja2.TemplateError, ValueError) as err:  # e.g. the template's raise_exception on roles out of order
                raise ConfigError(f"a pair of {pair.get('source', 'the data')} that the chat template refuses "
                                  f"({type(err).__name__}: {err}): {json.dumps(pair['prompt'] + pair[key])[:80]}: fix "
                                  f"the pair or the model profile's chat_template") from None
            out.append(ids)
    return out[0], out[1]


# Of a response longer than its share of max_length, this share is taken from its end: how it ends (a question, a
# sign-off, the EOS where the score is read) stays in view, as does its beginning.
RESPONSE_END_SHARE = 0.25


def reply_start(tokenizer, pair: dict, chosen: list[int], rejected: list[int]) -> int:
    """Where a pair's replies begin in its token ids: after the prompt as templated with its generation prompt (where
    PPO and eval start a `sum`-pooled reply), never past where chosen and rejected part. A prompt cut by
    truncate_pair matches less: its kept part then counts in both scores alike."""
    shared = common_prefix(chosen, rejected)
    prompt = pair.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    elif isinstance(prompt, str) and prompt:
        prompt_ids = tokenizer(text=prompt)["input_ids"]
    else:  # implicit prompt: what both sequences share
        return shared
    return min(common_prefix(chosen, prompt_ids), shared)


def cut_middle(ids: list[int], cap: int) -> list[int]:
    if len(ids) <= cap:
        return ids
    end = max(1, int(cap * RESPONSE_END_SHARE))
    return ids[: cap - end] + ids[len(ids) - end :]


def truncate_pair(chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int,
                  bos_token_id: int | None) -> tuple[list[int], list[int], bool, bool] | None:
    """Fit a pair into max_length tokens instead of dropping it: (chosen, rejected, prompt_cut, response_cut), or None
    when max_length leaves fewer than 2 tokens per response after the prompt's kept tokens.

    The shared start of both sequences is the prompt (with the chat template's headers and any words both replies
    begin with); what follows are the two responses. The prompt keeps its END (the question being answered) and at
    least max_prompt_length tokens of it; each response is capped at what is left, losing the middle of its text, so
    its beginning and its end (and EOS) are still seen. A leading BOS stays in place."""
    if max(len(chosen), len(rejected)) <= max_length:
        return chosen, rejected, False, False
    n = common_prefix(chosen, rejected)
    keep = 1 if n and chosen[0] == bos_token_id else 0
    head, prompt = chosen[:keep], chosen[keep:n]
    cap = max_length - keep - min(len(prompt), max_prompt_length)
    if cap < 2:  # no room for a response's beginning and end (where the score is read): the pair does not fit
        return None
    c, r = cut_middle(chosen[n:], cap), cut_middle(rejected[n:], cap)
    room = max_length - keep - max(len(c), len(r))
    kept_prompt = prompt[len(prompt) - room :] if room < len(prompt) else prompt
    response_cut = len(c) + len(r) < len(chosen) + len(rejected) - 2 * n
    return head + kept_prompt + c, head + kept_prompt + r, len(kept_prompt) < len(prompt), response_cut


def weighted(rows: list[dict], weights: dict, seed: int) -> list[dict]:
    """Per-source weight on the training rows: 2.0 = every pair twice, 0.5 = a random half."""
    rng, out = random.Random(seed), []
    by_source = defaultdict(list)
    for r in rows:
        by_source[r["source"]].append(r)
    for source, group in by_source.items():
        w = weights.get(source, 1.0)
        out += group * int(w) + rng.sample(group, round((w - int(w)) * len(group)))
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------- scoring and metrics

def pair_scores(model, rows: list[dict], pad_token_id: int, batch_size: int, pooling: str) -> list[float]:
    """Every row's chosen score, then every rejected one, from a model whose forward pools (pool_in_forward). With
    `sum` the reply's own: the whole sequence's less its first reply_start tokens' (causal attention)."""
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    scores = score(model, seqs, pad_token_id, batch_size)
    if pooling != "sum":
        return scores
    prompts = [s[: r["reply_start"]] for s, r in zip(seqs, rows + rows)]
    return [a - b for a, b in zip(scores, score(model, prompts, pad_token_id, batch_size))]


@torch.no_grad()
def score(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 16) -> list[float]:
    """Reward per token sequence, right-padded batches sorted by length (same batching in every process). With several
    processes every rank calls it: the batches are spread over the ranks (pipeline.sharding.spread) and every rank
    gets all the scores, so a sharded model runs the same forwards on every rank."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [0.0] * len(sequences)
    starts = list(range(0, len(order), batch_size))

    def one_batch(b: int) -> torch.Tensor:
        idx = order[starts[b] : starts[b] + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu()

    for b, logits in enumerate(spread(len(starts), one_batch)):
        for row, i in enumerate(order[starts[b] : starts[b] + batch_size]):
            out[i] = logits[row].item()
    if is_sharded(model):
        reshard(model)
    return out


def wilson(k: int, n: int) -> list[float]:
    """95% interval of an accuracy measured on n pairs: a few dozen held-out pairs give +-0.1 or more."""
    return [round(x, 3) for x in stats.wilson(k, n)]


def pair_metrics(chosen: list[float], rejected: list[float]) -> dict:
    diffs = [c - r for c, r in zip(chosen, rejected)]
    right = sum(d > 0 for d in diffs)  # a tie counts as wrong
    return {"accuracy": round(right / len(diffs), 4), "ci95": wilson(right, len(diffs)),
            "mean_margin": round(sum(diffs) / len(diffs), 4),
            "loss": round(sum(-torch.nn.functional.logsigmoid(torch.tensor(d)).item() for d in diffs) / len(diffs), 4),
            "pairs": len(diffs)}


# ---------------------------------------------------------------- the fresh-process reload check

def reload_scores(adapter_dir: str, pairs_file: str, out_file: str, dtype: str = "float32", batch_size: str = "16",
                  load_in_4bit: str = "0"):
    """Runs in a fresh process: stock peft + the tokenizer saved beside the adapter + the pooling its
    score_pooling.json names (pipeline.adapters.pool_in_forward), nothing else of ours. The base is loaded as the stage
    loaded it: in the profile's dtype, and in 4-bit when the profile says so."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from pipeline.models import bnb_4bit_config

    quantized = load_in_4bit == "1"
    extra = {"quantization_config": bnb_4bit_config(), "device_map": {"": "cuda"}} if quantized else {}
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir, num_labels=1, dtype=getattr(torch, dtype),
                                                                   **extra)
    if model.config.pad_token_id is None:  # bases without a pad id in config.json (STACK-NOTES 3)
        model.config.pad_token_id = tokenizer.pad_token_id
    pooling = read_pooling(adapter_dir)
    pool_in_forward(model, pooling)
    if torch.cuda.is_available() and not quantized:
        model.to("cuda")
    pairs = [json.loads(line) for line in open(pairs_file)]
    for p in pairs:  # the stage's eval_pairs.jsonl carries the ids as scored; other pair files are encoded here
        if "reply_start" not in p:
            p["chosen_ids"], p["rejected_ids"] = encode_pair(tokenizer, p)
            p["reply_start"] = reply_start(tokenizer, p, p["chosen_ids"], p["rejected_ids"])
    scores = pair_scores(model, pairs, tokenizer.pad_token_id, int(batch_size), pooling)
    atomic_write_json(Path(out_file), {"chosen": scores[: len(pairs)], "rejected": scores[len(pairs) :]})


# How far a reloaded score may drift from the stage's (absolute, relative to the score): the same batches in the same
# dtype agree to ~1e-6 in float32; bf16 keeps 8 bits of mantissa (relative steps of 2^-8 = 0.4%) and a 4-bit base
# dequantizes on the fly, so rounding differences in a score head kept in another dtype show there.
RELOAD_TOLERANCE = {"float32": (1e-4, 0.0), "float16": (1e-2, 1e-2), "bfloat16": (5e-2, 3e-2)}


def reload_verdict(chosen: list[float], rejected: list[float], again_chosen: list[float], again_rejected: list[float],
                   dtype: str = "float32", load_in_4bit: bool = False) -> dict:
    """Do the reloaded scores reproduce the stage's? Within the dtype's tolerance, and no held-out pair changes order
    unless its margin was within that tolerance. On failure, `problem` says why: scores that still follow the stage's
    (correlation >= 0.99) point at the dtype; scores that do not point at a head that was not saved."""
    precision = "bfloat16" if load_in_4bit and dtype == "float32" else dtype  # 4-bit computes in bf16
    atol, rtol = RELOAD_TOLERANCE.get(precision, RELOAD_TOLERANCE["bfloat16"])
    before, after = torch.tensor(chosen + rejected, dtype=torch.float64), torch.tensor(again_chosen + again_rejected, dtype=torch.float64)
    allowed = atol + rtol * torch.maximum(before.abs(), after.abs())
    diff = float((before - after).abs().max())
    n = len(chosen)
    margin, margin_again = before[:n] - before[n:], after[:n] - after[n:]
    flipped = int((((margin > 0) != (margin_again > 0)) & (margin.abs() > 2 * allowed[:n].maximum(allowed[n:]))).sum())
    ok = bool(((before - after).abs() <= allowed).all()) and flipped == 0
    accuracy = (pair_metrics(chosen, rejected)["accuracy"], pair_metrics(again_chosen, again_rejected)["accuracy"])
    verdict = {"eval_accuracy": accuracy[1], "max_abs_diff": diff, "dtype": precision + (" (4-bit base)" if load_in_4bit else ""),
               "tolerance": {"atol": atol, "rtol": rtol}, "pairs_flipped": flipped, "ok": ok}
    if ok:
        return verdict
    correlation = float(torch.corrcoef(torch.stack([before, after]))[0, 1]) if before.std() > 0 and after.std() > 0 else 0.0
    if correlation >= 0.99:
        verdict["problem"] = (f"its scores follow the stage's (correlation {correlation:.4f}, eval accuracy {accuracy[0]} -> "
                              f"{accuracy[1]}) but differ by up to {diff:.3g}, more than {verdict['dtype']} rounding "
                              f"allows (atol {atol}, rtol {rtol}): the head was saved; the reload computes in "
                              f"{verdict['dtype']} and the stage's scores did not (a head or adapter kept in another "
                              f"dtype while training); set dtype: float32 in the model profile to confirm")
    else:
        verdict["problem"] = (f"eval accuracy {accuracy[0]} -> {accuracy[1]}, max score difference {diff:.3g}, "
                              f"correlation {correlation:.3f}: the score head was probably not saved with the adapter")
    return verdict


def require_saved_head(adapter_dir: Path, head: str) -> None:
    """The known failure elsewhere: LoRA saved without the head, so a reloaded reward model scores at random."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        if not any(k.split(".")[-2] == head for k in f.keys()):
            raise RuntimeError(f"{adapter_dir} holds LoRA weights but no '{head}' head: it would score at random")


def check_reload(adapter_dir: Path, pairs_file: Path, chosen: list[float], rejected: list[float], dtype: str = "float32",
                 batch_size: int = 16, load_in_4bit: bool = False) -> dict:
    """Reload the saved adapter in a fresh process, in the profile's dtype (and 4-bit); the held-out scores must come
    back (the head was saved)."""
    out_file = adapter_dir.parent / "reload_check.json"
    # A clean environment for the child: no torch.distributed variables from `accelerate launch`.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("ACCELERATE_")}
    t0 = time.time()
    cmd = [sys.executable, "-m", "stages.rm", "--reload-check", adapter_dir, pairs_file, out_file, dtype, batch_size,
           int(bool(load_in_4bit))]
    proc = subprocess.run([str(c) for c in cmd], cwd=resolve_path("."), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reloading the reward adapter {adapter_dir} in a fresh process failed:\n{proc.stderr[-3000:]}")
    again = json.loads(out_file.read_text())
    verdict = reload_verdict(chosen, rejected, again["chosen"], again["rejected"], dtype, load_in_4bit)
    if not verdict["ok"]:
        raise RuntimeError(f"the reward adapter saved in {adapter_dir} does not reproduce its held-out scores when "
                           f"reloaded in a fresh process: {verdict['problem']}")
    return {k: verdict[k] for k in ("eval_accuracy", "max_abs_diff", "dtype", "pairs_flipped")} | {"seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------- the stage

def prepare_data(args: RMArgs, train_cfg, stage: StageRun, tokenizer):
    """Pairs -> token ids (once: training, held-out scoring and the reload check all use these) -> pairs over max_length
    truncated (truncate_pair: prompt end, response beginnings and ends), counted per source -> a split by prompt ->
    per-source weights on the training half."""
    from datasets import Dataset

    if train_cfg.max_length and not 0 <= args.max_prompt_length <= train_cfg.max_length // 2:
        raise ConfigError(f"max_prompt_length {args.max_prompt_length} must be between 0 and half of max_length "
                          f"({train_cfg.max_length}): the responses need the rest")
    pairs, weights, counts, data_name = load_pairs(args, stage, train_cfg.seed)
    if train_cfg.max_length:  # the whole pair is tokenized first, then cut to max_length here: no need to warn
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    kept = []
    for p in pairs:
        chosen, rejected = encode_pair(tokenizer, p)
        p["full_lengths"] = [len(chosen), len(rejected)]  # before truncation: what "the longer reply wins" compares
        c = counts[p["source"]]
        if train_cfg.max_length:
            fitted = truncate_pair(chosen, rejected, train_cfg.max_length, args.max_prompt_length, tokenizer.bos_token_id)
            if fitted is None:
                c["no_room"] += 1
                continue
            chosen, rejected, prompt_cut, response_cut = fitted
            c["prompt_cut"] += prompt_cut
            c["response_cut"] += response_cut
        if chosen == rejected:  # they differed only in a middle that was cut
            c["equal_after_cut"] += 1
            continue
        p["chosen_ids"], p["rejected_ids"] = chosen, rejected
        p["reply_start"] = reply_start(tokenizer, p, chosen, rejected)
        kept.append(p)
    no_room = sum(c["no_room"] for c in counts.values())
    if not kept and no_room:
        raise ConfigError(f"max_length {train_cfg.max_length} is too small for {data_name}: {no_room} pair(s) leave "
                          f"fewer than 2 tokens per response after the template and the prompt's kept tokens "
                          f"(max_prompt_length {args.max_prompt_length}): raise max_length")
    if not kept:
        raise ConfigError(f"no usable preference pairs in {data_name}: read and dropped {json.dumps(counts)} (equal "
                          f"chosen/rejected, empty responses)")
    groups = [json.dumps(p["prompt"], sort_keys=True) if p["prompt"] else f"row {i}" for i, p in enumerate(kept)]
    index = Dataset.from_dict({"i": list(range(len(kept))), "group": groups})
    train_idx, eval_idx = train_eval_split(index, args.eval_fraction, train_cfg.seed, group_by=lambda r: r["group"])
    eval_rows = [kept[i] for i in eval_idx["i"] if not kept[i]["tie"]] if eval_idx is not None else []
    train_rows = weighted([kept[i] for i in train_idx["i"]], weights, train_cfg.seed)
    if not train_rows or not eval_rows:
        raise ConfigError(f"{data_name} has {len(set(groups))} distinct prompt(s) after filtering: too few to hold "
                          f"whole prompts out (eval_fraction={args.eval_fraction}); give more pairs")
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        for r in rows:
            counts[r["source"]][split] += 1
    return train_rows, eval_rows, counts, data_name


def plan_steps(n_train: int, train_cfg, args: RMArgs, world_size: int) -> dict:
    """Optimizer steps for this much data, set on train_cfg. max_steps or num_train_epochs when set (> 0); else at
    least min_steps and one epoch, at most max_epochs: 300 pairs get ~7 epochs, the bundled mixture one.
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


def longer_wins(rows: list[dict]) -> float:
    """Accuracy of the rule "the longer reply (in tokens, before truncation) wins"; equal lengths count half."""
    right = [(c > r) + 0.5 * (c == r) for c, r in (row["full_lengths"] for row in rows)]
    return round(sum(right) / len(right), 4)


def heldout_metrics(eval_rows: list[dict], chosen: list[float], rejected: list[float]) -> dict:
    overall, scores = pair_metrics(chosen, rejected), chosen + rejected
    by_source = {}
    for source in sorted({r["source"] for r in eval_rows}):
        idx = [i for i, r in enumerate(eval_rows) if r["source"] == source]
        by_source[source] = {**pair_metrics([chosen[i] for i in idx], [rejected[i] for i in idx]),
                             "longer_wins_accuracy": longer_wins([eval_rows[i] for i in idx])}
    mean = sum(scores) / len(scores)
    return {"eval_accuracy": overall["accuracy"], "eval_accuracy_ci95": overall["ci95"],
            "eval_mean_margin": overall["mean_margin"], "eval_loss": overall["loss"],  # plain Bradley-Terry loss
            # Over every held-out response, chosen and rejected: PPO normalizes its rewards with these.
            "reward_mean": round(mean, 4),
            "reward_std": round(math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)), 4),
            "eval_by_source": by_source,
            "eval_longer_wins_accuracy": longer_wins(eval_rows)}  # what "prefer the longer reply" scores


def main(train_cfg, args: RMArgs, run: RunArgs) -> dict:
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoConfig

    state = PartialState()
    shard = take_over_from_accelerate()  # FSDP config: the base is loaded sharded over the ranks (pipeline.sharding)
    stage = StageRun("rm", run.run, run.runs_dir)
    train_cfg.output_dir = str(stage.dir / "trainer")
    # Keep the `length` column for train_sampling_strategy=group_by_length (the sampler is built after unused columns
    # are removed); the preference collator reads only its own keys, so extra columns are harmless.
    train_cfg.remove_unused_columns = False
    config = {"rm": to_dict(args), "train": train_cfg.to_dict(), "run": to_dict(run)}
    profile = profile_from(run.model_config)
    base_path = resolve_base(profile.name_or_path)

    # 0. Upstream: the SFT adapter must sit on this very base (PPO stacks policy and reward adapters on one model).
    sft = stage.need("sft")
    check_adapter(sft["outputs"]["adapter"], AutoConfig.from_pretrained(base_path), what="SFT (policy)")

    # 1. Data and tokenizer, all checked before anything in the run folder is touched.
    if not args.dataset_name and LABEL_EXPORT in args.dataset_mixture:
        stage.may_read(LABEL_EXPORT)  # a label export that appears later makes this reward model out of date
    tokenizer = load_tokenizer(profile)
    train_rows, eval_rows, counts, data_name = prepare_data(args, train_cfg, stage, tokenizer)
    stage.prepare(config, is_main=state.is_main_process)

    def as_dataset(rows):  # already tokenized: RewardTrainer only pads and batches
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
    #    seeds seed+1, seed+2, ...: same pairs, same held-out prompts, another head init and batch order.
    plan = plan_steps(len(train_rows), train_cfg, args, state.num_processes)
    peft_config = lora_config(profile, args.lora_r, args.lora_alpha, args.lora_dropout, task_type="SEQ_CLS")
    train_set, eval_set = as_dataset(train_rows), as_dataset(eval_rows)
    n, seed, trainer_root = len(eval_rows), train_cfg.seed, Path(train_cfg.output_dir)
    members = []
    for i in range(args.ensemble):
        train_cfg.seed, train_cfg.output_dir = seed + i, str(trainer_root / f"member-{i}")
        adapter_dir = stage.dir / "adapter" if i == 0 else stage.dir / f"member-{i}" / "adapter"
        if args.ensemble > 1 and state.is_main_process:
            print(f"reward model {i + 1} of {args.ensemble} (seed {seed + i}) -> {adapter_dir}", flush=True)
        members.append(train_member(train_cfg, plan, profile, tokenizer, shard, peft_config, train_set, eval_set, eval_rows,
                                    adapter_dir, args.pooling))
    train_cfg.seed, train_cfg.output_dir = seed, str(trainer_root)

    # 4. On the main process: the held-out pairs, each member's reload check (the same scores from a fresh process)
    #    and the figures of the ensemble's score (one member: its own score), the score PPO gets.
    metrics = {}
    if state.is_main_process:
        shutil.rmtree(trainer_root, ignore_errors=True)  # the checkpoints: the best ones are the adapters now
        pairs_file = stage.dir / "eval_pairs.jsonl"
        with open(pairs_file, "w") as f:  # with the token ids as scored (truncated as trained)
            for r in eval_rows:
                keys = ("prompt", "chosen", "rejected", "source", "margin", "chosen_ids", "rejected_ids", "reply_start")
                f.write(json.dumps({k: r[k] for k in keys}) + "\n")
        member_rows = [finish_member(m, seed + i, tokenizer, base_path, pairs_file, eval_rows, profile,
                                     train_cfg.per_device_eval_batch_size) for i, m in enumerate(members)]
        joint = ensemble_score(torch.tensor([m["scores"] for m in members]),
                               [(r["reward_mean"], r["reward_std"]) for r in member_rows]).tolist()
        metrics = {**heldout_metrics(eval_rows, joint[:n], joint[n:]),
                   **members[0]["record"],  # the first member's training curve
                   **data_record(counts, len(train_rows), n),
                   "reload_check": member_rows[0]["reload_check"], "ensemble": len(members), "members": member_rows,
                   "train_time_s": round(sum(m["train_time"] for m in members), 1), "peak_memory_mb": peak_memory_mb(),
                   "world_size": state.num_processes, "sharding": members[0]["sharding"], "data": data_name}
        print_table("RM", {k: v for k, v in metrics.items()
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
    finish_distributed()
    return metrics


def train_member(train_cfg, plan: dict, profile, tokenizer, shard, peft_config, train_set, eval_set, eval_rows,
                 adapter_dir: Path, pooling: str) -> dict:
    """One reward model: train, save its adapter (every rank: on a sharded base the Trainer gathers it whole), then
    its held-out scores (every rank: score() spreads the batches and gathers the scores), chosen then rejected."""
    from transformers import set_seed
    from trl import RewardTrainer

    # The head is freshly initialised at load time, before the Trainer seeds anything: seed first, or every run of
    # the same config starts from a different head and ends with different metrics.
    set_seed(train_cfg.seed)
    model = load_base(profile, tokenizer, kind="score", shard=shard)
    trainer = RewardTrainer(model=model, args=train_cfg, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer, peft_config=peft_config)
    pool_in_forward(trainer.model, pooling)  # the loss, the held-out passes and score() all read the pooled score
    t0 = time.time()
    result = trainer.train()
    train_time = time.time() - t0
    trainer.save_model(str(adapter_dir))
    scores = pair_scores(trainer.model, eval_rows, tokenizer.pad_token_id, train_cfg.per_device_eval_batch_size, pooling)
    kept = {"adapter": adapter_dir, "scores": scores, "pooling": pooling, "train_time": train_time, "config": trainer.model.config,
            "head": score_head_name(trainer.model), "sharding": sharding_report(trainer.model),
            "record": training_record(trainer.state, result, plan, train_cfg)}
    del trainer, model  # the next member loads its own base: free this one first
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return kept


def finish_member(member: dict, seed: int, tokenizer, base_path, pairs_file: Path, eval_rows: list[dict], profile,
                  batch_size: int) -> dict:
    """A trained member's folder completed (tokenizer, base fingerprint, its head checked) and reloaded in a fresh
    process; its row of the manifest: held-out figures, the statistics that standardise it in an ensemble, timing."""
    adapter, s, n = member["adapter"], member["scores"], len(eval_rows)
    tokenizer.save_pretrained(adapter)
    save_fingerprint(adapter, member["config"], base_path)
    require_saved_head(adapter, member["head"])
    write_pooling(adapter, member["pooling"])
    reload = check_reload(adapter, pairs_file, s[:n], s[n:], profile.dtype, batch_size, profile.load_in_4bit)
    own = heldout_metrics(eval_rows, s[:n], s[n:])
    return {"adapter": str(adapter), "seed": seed,
            **{k: own[k] for k in ("eval_accuracy", "eval_loss", "reward_mean", "reward_std")},
            "best_step": member["record"]["best_step"], "train_time_s": round(member["train_time"], 1),
            "reload_check": reload}


def training_record(state, result, plan: dict, train_cfg) -> dict:
    """The training curve, the held-out evaluations along it, and which one was kept."""
    logs = state.log_history
    evals = [{"step": h["step"], "eval_loss": round(h["eval_loss"], 4), "eval_accuracy": round(h.get("eval_accuracy", 0), 4)}
             for h in logs if "eval_loss" in h]
    best = state.best_model_checkpoint
    return {"train_loss": round(result.training_loss, 4), "loss_curve": [h["loss"] for h in logs if "loss" in h],
            "train_accuracy_last": next((h["accuracy"] for h in reversed(logs) if "accuracy" in h), None),
            "steps": state.global_step, **{f"plan_{k}": v for k, v in plan.items()}, "eval_curve": evals,
            "best_step": int(best.rsplit("-", 1)[-1]) if best else None,
            "best_metric": {train_cfg.metric_for_best_model: state.best_metric} if best else None}


def data_record(counts: dict, n_train: int, n_eval: int) -> dict:
    total = {k: sum(c[k] for c in counts.values()) for k in ("read", "equal", "empty", "equal_after_cut", "prompt_cut",
                                                             "response_cut", "no_room")}
    return {"pairs_read": total["read"], "train_pairs": n_train, "eval_pairs": n_eval,
            "dropped_equal": total["equal"] + total["equal_after_cut"], "dropped_empty": total["empty"],
            "dropped_no_room": total["no_room"],
            "truncated_prompts": total["prompt_cut"], "truncated_responses": total["response_cut"],
            "pairs_by_source": {k: dict(v) for k, v in sorted(counts.items())}}


def CONFIG_CLASSES():
    from trl import RewardConfig

    return (RewardConfig, RMArgs, RunArgs)


def parse_args(argv=None):
    return parse(CONFIG_CLASSES(), argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reload-check"]:
        reload_scores(*sys.argv[2:])
    else:
        main_guard(lambda: main(*parse_args()))
