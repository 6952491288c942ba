"""The reward model's scores: per token sequence and per pair (with `sum` pooling the reply's own), the held-out
figures, and the check that ends the stage: the saved adapter reloaded with stock peft in a fresh process must
give the same held-out scores (`python -m stages.rm --reload-check ...` runs reload_scores)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.config import resolve_path
from pipeline.models import MIXED_PRECISION_DTYPE
from pipeline.data import score_each_once
from pipeline import stats
from pipeline.adapters import pool_in_forward, read_pooling
from pipeline.run import atomic_write_json
from pipeline.sharding import is_sharded, reshard, spread
from stages.rm_data import encode_pair, reply_start


def pair_scores(model, rows: list[dict], pad_token_id: int, batch_size: int, pooling: str) -> list[float]:
    """Every row's chosen score, then every rejected one, from a model whose forward pools (pool_in_forward). With
    `sum` the reply's own: the whole sequence's less its first reply_start tokens' (causal attention)."""
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    scores = score_distinct(model, seqs, pad_token_id, batch_size)
    if pooling != "sum":
        return scores
    prompts = [s[: r["reply_start"]] for s, r in zip(seqs, rows + rows)]
    return [a - b for a, b in zip(scores, score_distinct(model, prompts, pad_token_id, batch_size))]


def score_distinct(model, sequences: list[list[int]], pad_token_id: int, batch_size: int) -> list[float]:
    """score() of each distinct sequence once: K responses a prompt make K-1 pairs per response and one prompt."""
    return score_each_once(sequences, lambda distinct: score(model, distinct, pad_token_id, batch_size), key=tuple)


@torch.no_grad()
def score(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 16) -> list[float]:
    """Reward per token sequence, right-padded batches sorted by length (same batching in every process). With several
    processes every rank calls it: the batches are spread over the ranks (pipeline.sharding.spread) and every rank
    gets all the scores, so a sharded model runs the same forwards on every rank. An empty sequence scores 0 without a
    forward: the empty prompt of a plain-text pair (no prompt, no BOS) that `sum` pooling subtracts sums over nothing."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted((i for i in range(len(sequences)) if sequences[i]), key=lambda i: len(sequences[i]))
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


# ---------------------------------------------------------------- the fresh-process reload check

def reload_scores(pairs_file: str, dtype: str = "float32", batch_size: str = "16", load_in_4bit: str = "0",
                  trust_remote_code: str = "0", *adapter_dirs: str):
    """Runs in a fresh process: each adapter folder in turn (an ensemble's members share the process and its imports),
    its scores written to reload_check.json beside the folder."""
    read = [json.loads(line) for line in open(pairs_file)]
    for adapter_dir in adapter_dirs:
        pairs = [dict(p) for p in read]  # each adapter's own tokenizer encodes the pairs that carry no ids
        scores = reloaded_pair_scores(adapter_dir, pairs, dtype, int(batch_size), load_in_4bit == "1",
                                      trust_remote_code == "1")
        atomic_write_json(Path(adapter_dir).parent / "reload_check.json",
                          {"chosen": scores[: len(pairs)], "rejected": scores[len(pairs) :]})


def reloaded_pair_scores(adapter_dir: str, pairs: list[dict], dtype: str, batch_size: int, quantized: bool,
                         trust_remote_code: bool = False) -> list[float]:
    """Stock peft + the tokenizer saved beside the adapter + the pooling its score_pooling.json names
    (pipeline.adapters.pool_in_forward), nothing else of ours. The base is loaded as the stage loaded it: in the
    profile's dtype, in 4-bit when the profile says so, with its code when the profile trusts it."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from pipeline.models import bnb_4bit_config

    extra = {"quantization_config": bnb_4bit_config(dtype), "device_map": {"": "cuda"}} if quantized else {}
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    model = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir, num_labels=1, dtype=getattr(torch, dtype),
                                                                   trust_remote_code=trust_remote_code, **extra)
    if model.config.pad_token_id is None:  # bases without a pad id in config.json
        model.config.pad_token_id = tokenizer.pad_token_id
    pooling = read_pooling(adapter_dir)
    pool_in_forward(model, pooling)
    if torch.cuda.is_available() and not quantized:
        model.to("cuda")
    for p in pairs:  # the stage's eval_pairs.jsonl carries the ids as scored; other pair files are encoded here
        if "reply_start" not in p:
            p["chosen_ids"], p["rejected_ids"] = encode_pair(tokenizer, p)
            p["reply_start"] = reply_start(tokenizer, p, p["chosen_ids"], p["rejected_ids"])
    return pair_scores(model, pairs, tokenizer.pad_token_id, batch_size, pooling)


# How far a reloaded score may drift from the stage's (absolute, relative to the score): the same batches in the same
# dtype agree to ~1e-6 in float32; bf16 keeps 8 bits of mantissa (relative steps of 2^-8 = 0.4%) and a 4-bit base
# dequantizes on the fly, so rounding differences in a score head kept in another dtype show there.
RELOAD_TOLERANCE = {"float32": (1e-4, 0.0), "float16": (1e-2, 1e-2), "bfloat16": (5e-2, 3e-2)}


def reload_verdict(chosen: list[float], rejected: list[float], again_chosen: list[float], again_rejected: list[float],
                   dtype: str = "float32", load_in_4bit: bool = False, mixed_precision: str = "no") -> dict:
    """Do the reloaded scores reproduce the stage's? Within the tolerance of the coarser of the dtype the reload
    computes in and the one the stage did (`mixed_precision`: the launch's autocast, e.g. bf16 under
    configs/accelerate/multi_gpu.yaml), and no held-out pair changes order unless its margin was within that
    tolerance. On failure, `problem` says why: scores that still follow the stage's (correlation >= 0.99) point at the
    dtype; scores that do not point at a head that was not saved."""
    precision = "bfloat16" if load_in_4bit and dtype == "float32" else dtype  # 4-bit computes in bf16 (fp16: fp16)
    autocast = MIXED_PRECISION_DTYPE.get(mixed_precision)
    tolerance = lambda p: RELOAD_TOLERANCE.get(p, RELOAD_TOLERANCE["bfloat16"])  # noqa: E731
    mixed = autocast is not None and tolerance(autocast)[0] > tolerance(precision)[0]
    precision = autocast if mixed else precision
    atol, rtol = tolerance(precision)
    before, after = torch.tensor(chosen + rejected, dtype=torch.float64), torch.tensor(again_chosen + again_rejected, dtype=torch.float64)
    allowed = atol + rtol * torch.maximum(before.abs(), after.abs())
    diff = float((before - after).abs().max())
    n = len(chosen)
    margin, margin_again = before[:n] - before[n:], after[:n] - after[n:]
    flipped = int((((margin > 0) != (margin_again > 0)) & (margin.abs() > 2 * allowed[:n].maximum(allowed[n:]))).sum())
    ok = bool(((before - after).abs() <= allowed).all()) and flipped == 0
    accuracy = (pair_metrics(chosen, rejected)["accuracy"], pair_metrics(again_chosen, again_rejected)["accuracy"])
    verdict = {"eval_accuracy": accuracy[1], "max_abs_diff": diff,
               "dtype": precision + (" (mixed precision)" if mixed else " (4-bit base)" if load_in_4bit else ""),
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


def check_reload(adapter_dirs: list[Path], pairs_file: Path, scores: list[tuple[list[float], list[float]]],
                 dtype: str = "float32", batch_size: int = 16, load_in_4bit: bool = False,
                 mixed_precision: str = "no", trust_remote_code: bool = False) -> tuple[list[dict], float]:
    """Reload each saved adapter in one fresh process, in the profile's dtype (and 4-bit; its code run when the profile
    says trust_remote_code); each one's held-out scores (chosen, rejected; computed under the launch's
    `mixed_precision`) must come back (the head was saved). Each one's verdict, and the process's seconds."""
    # A clean environment for the child: no torch.distributed variables from `accelerate launch`.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("ACCELERATE_")}
    t0 = time.time()
    cmd = [sys.executable, "-m", "stages.rm", "--reload-check", pairs_file, dtype, batch_size, int(bool(load_in_4bit)),
           int(bool(trust_remote_code)), *adapter_dirs]
    proc = subprocess.run([str(c) for c in cmd], cwd=resolve_path("."), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reloading the reward adapters {', '.join(map(str, adapter_dirs))} in a fresh process "
                           f"failed:\n{proc.stderr[-3000:]}")
    verdicts = []
    for adapter_dir, (chosen, rejected) in zip(adapter_dirs, scores, strict=True):
        again = json.loads((adapter_dir.parent / "reload_check.json").read_text())
        verdicts.append(reload_verdict_or_raise(adapter_dir, chosen, rejected, again["chosen"], again["rejected"], dtype,
                                                load_in_4bit, mixed_precision, "in a fresh process") | {"sharded": False})
    return verdicts, round(time.time() - t0, 1)


def check_reload_sharded(adapter_dirs: list[Path], profile, tokenizer, rows: list[dict],
                         scores: list[tuple[list[float], list[float]]], batch_size: int = 16,
                         mixed_precision: str = "no") -> tuple[list[dict], float]:
    """check_reload where the base is sharded: a base that needs sharding may not fit whole on one device, so every
    rank (each must call this) loads the base sharded again and each saved adapter on it with stock peft, pooled as
    its folder says, and scores the held-out pairs (`rows`, with their token ids). In the stage's processes, not a
    fresh one: the model is new, built from the saved files alone."""
    from peft import PeftModel

    from pipeline.models import free_memory, load_base

    t0 = time.time()
    verdicts, n = [], len(rows)
    for adapter_dir, (chosen, rejected) in zip(adapter_dirs, scores, strict=True):
        model = PeftModel.from_pretrained(load_base(profile, tokenizer, kind="score", shard=True), str(adapter_dir))
        pooling = read_pooling(adapter_dir)
        pool_in_forward(model, pooling)
        again = pair_scores(model, rows, tokenizer.pad_token_id, batch_size, pooling)
        sharded = is_sharded(model)
        del model  # the next member loads its own base: free this one first
        free_memory()
        verdicts.append(reload_verdict_or_raise(adapter_dir, chosen, rejected, again[:n], again[n:], profile.dtype,
                                                profile.load_in_4bit, mixed_precision, "on a base sharded again")
                        | {"sharded": sharded})
    return verdicts, round(time.time() - t0, 1)


def reload_verdict_or_raise(adapter_dir, chosen, rejected, again_chosen, again_rejected, dtype: str, load_in_4bit: bool,
                            mixed_precision: str, where: str) -> dict:
    """reload_verdict's figures for the manifest, or a RuntimeError saying why the reload does not reproduce them."""
    verdict = reload_verdict(chosen, rejected, again_chosen, again_rejected, dtype, load_in_4bit, mixed_precision)
    if not verdict["ok"]:
        raise RuntimeError(f"the reward adapter saved in {adapter_dir} does not reproduce its held-out scores when "
                           f"reloaded {where}: {verdict['problem']}")
    return {k: verdict[k] for k in ("eval_accuracy", "max_abs_diff", "dtype", "pairs_flipped")}
