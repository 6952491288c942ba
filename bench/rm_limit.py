"""What limits the reward model's agreement with the gold judge? The same held-out pairs, four kinds of training data.

    make sft rm                                   # a run with pairs and labels (the default chain makes them)
    make bench-rm-limit                           # -> bench/results/rm_limit.json (about 16 minutes on 2 CPU cores)
    python -m bench.rm_limit --from_run runs/default --seeds 1 2 3 --output /tmp/rm_limit.json [stage overrides]

Issue 11 asks the reward model to order 85% of held-out pairs as the gold judge does; it reaches about 74%. This
bench tells the candidate causes apart on a run's own pairs and labels (its label export):

- labels:    the run's labels as exported (the annotators' majority);
- gold:      the same pairs ordered by the gold judge itself: what noise-free labels would give;
- half:      the labels of a seeded half of the training prompts: what halving the data costs, so what doubling it
             might buy; quarter (not in the default `--conditions`): a seeded quarter, the curve's third point;
- ensemble:  the mean of the `labels` reward models' standardised scores (Coste et al. 2023's reward-model ensemble).

Each of labels, gold and half trains one reward model per seed (its init, batch order and checkpoint split), reported
per seed and as mean +- SE: one seed's spread (about 0.04) is as large as the effects measured.

One split by prompt, seeded and fixed (test_fraction of the prompts), serves every condition: no test prompt is
trained on. Each condition runs the stage exactly as `make rm ARGS="--dataset_name FILE"` runs it (accelerate
launch, configs/rm.yaml), which holds a further 20% of its training prompts out to choose its checkpoint, so a
reward model here sees 64% of the prompts where `make rm` sees 80%. Agreement is counted as `make eval` counts it
(stages/eval.gold_agreement): over test pairs whose gold scores differ, a tie in the reward half a point.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from bench.rm_rules import no_op_sft, run_stage, saved_adapter_scores
from pipeline.config import REPO_ROOT
from pipeline.run import atomic_write_json, git_commit, package_versions
from stages.rm_data import prompt_key


def split_by_prompt(rows: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) rows; every prompt's pairs land on one side: `make rm`'s own split (train_eval_split by prompt)."""
    from datasets import Dataset

    from pipeline.data import train_eval_split

    index = Dataset.from_dict({"i": list(range(len(rows))), "group": [prompt_key(r, i) for i, r in enumerate(rows)]})
    train, test = train_eval_split(index, test_fraction, seed, group_by=lambda r: r["group"])
    return [rows[i] for i in train["i"]], [rows[i] for i in test["i"]]


def reply_text(reply) -> str:
    return reply if isinstance(reply, str) else reply[-1]["content"]


def gold_ordered(rows: list[dict], gold_chosen: list[float], gold_rejected: list[float]) -> list[dict]:
    """The same pairs with the gold judge's winner as `chosen`; pairs the gold scores equal keep their order."""
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if gc < gr else dict(r)
            for r, gc, gr in zip(rows, gold_chosen, gold_rejected)]


# The conditions that train on a seeded share of the training prompts, and that share: a learning curve on one test set
SHARES = {"half": 0.5, "quarter": 0.25}
CONDITIONS = ("labels", "gold", *SHARES)


def share_of_prompts(rows: list[dict], share: float, seed: int) -> list[dict]:
    """The pairs of a seeded share of the prompts (their count rounded down)."""
    keys = sorted({prompt_key(r, i) for i, r in enumerate(rows)})
    random.Random(seed).shuffle(keys)
    kept = set(keys[: int(len(keys) * share)])
    return [r for i, r in enumerate(rows) if prompt_key(r, i) in kept]


def standardised(scores: list[float]) -> list[float]:
    """(s - mean) / std over all of one reward model's scores: members of an ensemble on one scale."""
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    return [(s - mean) / std if std > 0 else 0.0 for s in scores]


def ensemble_mean(members: list[list[float]]) -> list[float]:
    """Per item, the mean of the members' standardised scores."""
    scaled = [standardised(m) for m in members]
    return [sum(col) / len(col) for col in zip(*scaled)]


def mean_and_se(values: list[float]) -> dict:
    """Mean over seeds with its standard error (sample std / sqrt(n); None for one seed: not measured, where 0.0 read
    as exact)."""
    n = len(values)
    mean = sum(values) / n
    se = round((sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5, 4) if n > 1 else None
    return {"mean": round(mean, 4), "se": se}


def label_agreement(rows: list[dict], gold_chosen: list[float], gold_rejected: list[float]) -> dict:
    """How often the training labels' `chosen` is the gold's winner, over pairs the gold scores differently."""
    decided = [(gc > gr) for gc, gr in zip(gold_chosen, gold_rejected) if gc != gr]
    return {"agreement": round(sum(decided) / len(decided), 4) if decided else None, "pairs": len(decided)}


def read_run(run_dir: Path) -> tuple[list[dict], str]:
    """The run's exported preference rows (prompt, chosen, rejected) and the gold judge its annotators used."""
    from datasets import load_from_disk

    export = json.loads((run_dir / "label-export" / "manifest.json").read_text())
    ds = load_from_disk(export["outputs"]["dataset"])
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in ds if not r.get("is_tie")]
    simulate = run_dir / "simulate" / "manifest.json"
    judge = json.loads(simulate.read_text())["config"]["simulate"]["judge"] if simulate.is_file() else "sentiment"
    return rows, judge


def parse_bench_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from_run", default="runs/default", help="A run with a label export (make sft rm makes one).")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="Reward-model seeds, each condition trained once per seed.")
    p.add_argument("--test_fraction", type=float, default=0.2)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--model_config", default="configs/models/tiny.yaml")
    p.add_argument("--work_dir", default="bench/out/rm_limit")
    p.add_argument("--output", default="bench/results/rm_limit.json")
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=["labels", "gold", "half"],
                   help="What to train on: the run's labels, the gold's order, or the labels of a share of the prompts "
                        "(half, quarter).")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    from pipeline.judges import judge_scores, load_judge
    from stages.eval_ppo import gold_agreement

    args, overrides = parse_bench_args(argv)
    run_dir = REPO_ROOT / args.from_run
    if not (run_dir / "label-export" / "manifest.json").is_file():
        print(f"error: {args.from_run} has no label export: run `make sft rm` first (or pass --from_run)", file=sys.stderr)
        return 2
    rows, judge_spec = read_run(run_dir)
    judge = load_judge(judge_spec)
    train, test = split_by_prompt(rows, args.test_fraction, args.split_seed)
    gold = {}
    for name, part in (("train", train), ("test", test)):
        prompts = [r["prompt"] for r in part]
        gold[name] = (judge_scores(judge, prompts, [reply_text(r["chosen"]) for r in part]),
                      judge_scores(judge, prompts, [reply_text(r["rejected"]) for r in part]))
    every = {"labels": train, "gold": gold_ordered(train, *gold["train"]),
             **{name: share_of_prompts(train, share, args.split_seed) for name, share in SHARES.items()}}
    data = {name: every[name] for name in args.conditions}

    work, runs_dir = REPO_ROOT / args.work_dir, REPO_ROOT / args.work_dir / "runs"
    result = {"settings": {**vars(args), "overrides": overrides, "judge": judge_spec},
              "data": {"pairs": len(rows), "train_pairs": len(train), "test_pairs": len(test),
                       "train_label_gold_agreement": label_agreement(train, *gold["train"])},
              "conditions": {}, "versions": package_versions(), "git_commit": git_commit()}
    labels_scores = []
    for name, rows_of in data.items():
        data_file = work / f"{name}.jsonl"
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows_of))
        per_seed = {}
        for seed in args.seeds:
            run = f"limit-{name}-seed{seed}"
            no_op_sft(runs_dir, run, args.model_config)
            rc, wall, err = run_stage(data_file, runs_dir, run, args.model_config, ["--seed", str(seed), *overrides])
            if rc != 0:  # bad input (exit 2): the stage's own line alone
                print(err if rc == 2 else f"{name}, seed {seed}: the stage failed ({rc}):\n{err}", file=sys.stderr)
                return rc if rc == 2 else 1
            s = saved_adapter_scores(runs_dir / run / "rm" / "adapter", test)
            labels_scores += [s] if name == "labels" else []
            per_seed[seed] = {"wall_s": wall, **gold_agreement(s[: len(test)], s[len(test):], *gold["test"])}
            print(f"{name}, seed {seed}: {json.dumps(per_seed[seed])}", flush=True)
        result["conditions"][name] = {"train_pairs": len(rows_of), **mean_and_se([v["agreement"] for v in per_seed.values()]),
                                      "seeds": per_seed}
    if len(labels_scores) > 1:
        mean = ensemble_mean(labels_scores)
        result["conditions"]["ensemble"] = {"members": len(labels_scores),
                                            **gold_agreement(mean[: len(test)], mean[len(test):], *gold["test"])}
    for name, row in result["conditions"].items():
        print(f"{name}: agreement {row.get('mean', row.get('agreement'))}", flush=True)
    atomic_write_json(REPO_ROOT / args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
