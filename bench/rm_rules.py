"""Does `make rm` learn a simple, consistent preference from a few hundred pairs? Four rule sets, the stage's defaults.

    make bench-rm                                 # -> bench/results/rm.json (about 10 minutes on 2 CPU cores)
    python -m bench.rm_rules --rules question --train_pairs 100 --test_pairs 50 --output /tmp/rm.json [stage overrides]

Each rule set has `train_pairs` training pairs (the stage holds 20% of their prompts out for its own evaluation and
checkpoint choice) and `test_pairs` test pairs that the stage never sees: other prompts, other sentences. The chosen
and rejected replies differ only by the rule:

- word:      the chosen reply contains "certainly"; the rejected one has another common word in the same place
- shorter:   the chosen reply has fewer words (one sentence against two to four, at least 5 words more)
- question:  the chosen reply ends with a question mark; the rejected one is the same text ending with a full stop
- capitals:  the chosen reply is in capitals; the rejected one is the same text as written

Replies are sentences from the bundled public-domain books (data/pretrain/texts), prompts from data/prompts/. The
stage runs exactly as `make rm ARGS="--dataset_name FILE"` runs it (accelerate launch, configs/rm.yaml), on a run
whose SFT stage is a no-op adapter on the base (the reward model trains on the base; SFT only has to exist). The test
pairs are then scored with the saved adapter, loaded as stock peft would load it. Any further `--key value` is a stage
override.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

from pipeline.config import REPO_ROOT
from pipeline.launch import ACCELERATE_LAUNCH
from pipeline.run import StageRun, atomic_write_json, git_commit, package_versions

RULES = ("word", "shorter", "question", "capitals")
WORD = "certainly"
OTHER_WORDS = "then also still just quite only even soon here there now once again always never often".split()
# One thread per process: on the shared 2-core box torch's default threading is many times slower.
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
for _key, _value in ENV.items():  # this process scores the test pairs: the same settings as the stage's
    os.environ.setdefault(_key, _value)


def sentences() -> list[str]:
    """Plain sentences of 6 to 20 words from the bundled books, each once, in a fixed order."""
    out = []
    for f in sorted((REPO_ROOT / "data/pretrain/texts").glob("*.txt")):
        text = re.sub(r"\s+", " ", f.read_text())
        for s in re.split(r"(?<=[.!?])\s+", text):
            words = s.split()
            if 6 <= len(words) <= 20 and s[0].isupper() and s.endswith(".") and '"' not in s and "_" not in s:
                out.append(s)
    return list(dict.fromkeys(out))  # some sentences recur; once each, so that no test sentence is a training one


def prompts() -> list[str]:
    rows = [json.loads(line) for name in ("oasst_pairs_prompts", "oasst_ppo_prompts")
            for line in open(REPO_ROOT / f"data/prompts/{name}.jsonl")]
    return list(dict.fromkeys(r["prompt"][0]["content"] for r in rows if len(r["prompt"][0]["content"]) < 300))


def make_pair(rule: str, rng: random.Random, pool: list[str]) -> tuple[str, str]:
    """(chosen, rejected) replies that differ only by the rule."""
    reply = rng.choice(pool)
    while WORD in reply.lower():  # a reply that has the word already would break the rule
        reply = rng.choice(pool)
    if rule == "word":
        words = reply.split()
        i = rng.randrange(1, len(words))
        return " ".join(words[:i] + [WORD] + words[i:]), " ".join(words[:i] + [rng.choice(OTHER_WORDS)] + words[i:])
    if rule == "shorter":  # two to four other sentences, at least 5 words more than the chosen reply
        longer = [rng.choice(pool) for _ in range(rng.randint(2, 4))]
        while len(" ".join(longer).split()) < len(reply.split()) + 5:
            longer.append(rng.choice(pool))
        return reply, " ".join(longer)
    if rule == "question":
        return reply[:-1] + "?", reply
    if rule == "capitals":
        return reply.upper(), reply
    raise ValueError(f"unknown rule {rule!r}: use one of {RULES}")


def rule_pairs(rule: str, n: int, seed: int, pool: list[str], prompt_pool: list[str]) -> list[dict]:
    rng, rows = random.Random(seed), []
    for i in range(n):
        chosen, rejected = make_pair(rule, rng, pool)
        prompt = prompt_pool[i % len(prompt_pool)]
        rows.append({"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def split_pools(seed: int) -> dict:
    """Sentences and prompts split once: training pairs and test pairs never share one."""
    rng = random.Random(seed)
    sents, asks = sentences(), prompts()
    rng.shuffle(sents)
    rng.shuffle(asks)
    return {"train": (sents[: len(sents) // 2], asks[: len(asks) // 2]),
            "test": (sents[len(sents) // 2 :], asks[len(asks) // 2 :])}


def no_op_sft(runs_dir: Path, run: str, model_config: str) -> None:
    """The SFT stage the reward model stage needs: a LoRA that changes nothing (B = 0) on the profile's base."""
    from peft import get_peft_model

    from pipeline.models import load_base, load_tokenizer, lora_config, profile_from, resolve_base, save_fingerprint

    profile = profile_from(model_config)
    tok = load_tokenizer(profile)
    base = load_base(profile, tok)
    stage = StageRun("sft", run, str(runs_dir))
    stage.prepare({})
    model = get_peft_model(base, lora_config(profile, r=4, alpha=8, dropout=0.0))
    model.save_pretrained(stage.dir / "adapter")
    tok.save_pretrained(stage.dir / "adapter")
    save_fingerprint(stage.dir / "adapter", base.config, resolve_base(profile.name_or_path))
    stage.finish({"adapter": stage.dir / "adapter"}, {}, {"note": "bench.rm_rules: a no-op SFT adapter"})


def saved_adapter_scores(adapter_dir: Path, rows: list[dict]) -> list[float]:
    """The saved reward adapter, loaded as a user would (stock peft, with the pooling it names), scores every row's
    chosen reply, then every rejected one."""
    import torch
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from stages.rm_data import encode_pair, reply_start
    from stages.rm_scoring import pair_scores

    from pipeline.adapters import pool_in_forward, read_pooling
    from pipeline.models import without_load_report

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    with without_load_report():  # the expected LM head / score head swap
        model = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    pooling = read_pooling(adapter_dir)
    pool_in_forward(model, pooling)
    encoded = []
    for r in rows:
        chosen, rejected = encode_pair(tok, r)
        encoded.append({"chosen_ids": chosen, "rejected_ids": rejected, "reply_start": reply_start(tok, r, chosen, rejected)})
    return pair_scores(model, encoded, tok.pad_token_id, 16, pooling)


def test_accuracy(adapter_dir: Path, rows: list[dict]) -> dict:
    """Accuracy of the saved reward adapter on pairs it never saw."""
    from stages.rm_scoring import pair_metrics

    scores = saved_adapter_scores(adapter_dir, rows)
    return pair_metrics(scores[: len(rows)], scores[len(rows) :])


def run_stage(data_file: Path, runs_dir: Path, run: str, model_config: str, overrides: list[str],
              stage: str = "rm") -> tuple[int, float, str]:
    """`stage` (rm, or dpo) as make runs it, with its config, on `data_file`: (exit code, wall s, its error)."""
    import subprocess

    cmd = [*ACCELERATE_LAUNCH, "--config_file", "configs/accelerate/cpu.yaml", "-m", f"stages.{stage}",
           "--config", f"configs/{stage}.yaml", "--run", run, "--runs_dir", str(runs_dir), "--model_config", model_config,
           *(["--dataset_name", str(data_file)] if data_file else []),
           *(["--ensemble", "1"] if stage == "rm" else []),  # one reward model per run (these benches score each alone)
           *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, **ENV})
    # Bad input is the stage's one `error:` line; accelerate's launcher adds its own traceback after it, which says
    # only that the stage failed.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    return proc.returncode, round(time.time() - t0, 1), "\n".join(errors) if errors else proc.stderr[-3000:]


def parse_bench_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--train_pairs", type=int, default=300)
    p.add_argument("--test_pairs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model_config", default="configs/models/tiny.yaml")
    p.add_argument("--mixture", action="store_true", help="Also run the stage on the bundled mixture (configs/rm.yaml).")
    p.add_argument("--work_dir", default="bench/out/rm_rules")
    p.add_argument("--output", default="bench/results/rm.json")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, overrides = parse_bench_args(argv)
    work = REPO_ROOT / args.work_dir
    runs_dir = work / "runs"
    pools = split_pools(args.seed)
    result = {"settings": {**vars(args), "overrides": overrides, "word": WORD}, "rules": {},
              "versions": package_versions(), "git_commit": git_commit()}
    failed = False
    jobs = [(rule, rule) for rule in args.rules] + ([("mixture", None)] if args.mixture else [])
    for name, rule in jobs:
        run = f"rules-{name}"
        no_op_sft(runs_dir, run, args.model_config)
        data_file, test_rows = None, None
        if rule:
            data_file = work / f"{rule}_train.jsonl"
            train_rows = rule_pairs(rule, args.train_pairs, args.seed + 1, *pools["train"])
            test_rows = rule_pairs(rule, args.test_pairs, args.seed + 2, *pools["test"])
            data_file.parent.mkdir(parents=True, exist_ok=True)
            data_file.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
        rc, wall, err = run_stage(data_file, runs_dir, run, args.model_config, overrides)
        if rc != 0:
            print(f"{name}: the stage failed ({rc}):\n{err}", file=sys.stderr)
            result["rules"][name] = {"returncode": rc}
            failed = True
            continue
        m = json.loads((runs_dir / run / "rm" / "manifest.json").read_text())["metrics"]
        row = {"wall_s": wall, "train_pairs": m["train_pairs"], "stage_eval_pairs": m["eval_pairs"],
               "stage_eval_accuracy": m["eval_accuracy"], "steps": m["steps"], "epochs": m["plan_epochs"],
               "best_step": m["best_step"], "truncated_responses": m["truncated_responses"]}
        if test_rows:
            row["test"] = test_accuracy(runs_dir / run / "rm" / "adapter", test_rows)
        else:
            row["eval_by_source"] = {s: {k: v[k] for k in ("accuracy", "ci95", "pairs", "longer_wins_accuracy")}
                                     for s, v in m["eval_by_source"].items()}
            row["eval_longer_wins_accuracy"] = m["eval_longer_wins_accuracy"]
            row["pairs_read"], row["dropped_equal"], row["dropped_empty"] = m["pairs_read"], m["dropped_equal"], m["dropped_empty"]
            row["truncated_prompts"] = m["truncated_prompts"]
        result["rules"][name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)
    atomic_write_json(REPO_ROOT / args.output, result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
