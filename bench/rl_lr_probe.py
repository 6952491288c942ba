"""One side of bench-rl at another learning rate, gold-scored with its KL to SFT: where does each side's gold gain
sit on the gold-vs-KL curve? (The README's "not at equal KL" figures.) A probe, not a benchmark: no peer beside it,
no speed or memory verdict.

    python -m bench.bench_rl --from_run runs/default              # builds bench/out/rl/story first
    python -m bench.rl_lr_probe peer grpo 3e-3                      # TRL 1.16's GRPO at lr 3e-3, 3 seeds
    python -m bench.rl_lr_probe ours grpo 1e-4

Everything else is bench-rl's (bench/bench_rl.py COMMON and the story scale): the same prompts, seeds, batches and
gold measurement (bench/harness.py add_gold). Prints one JSON line: the gains and KLs by seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bench.bench_rl as rl
from bench.harness import GoldEval, add_gold


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("side", choices=["ours", "peer"])
    ap.add_argument("method", choices=sorted(rl.METHODS))
    ap.add_argument("lr", type=float)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work_dir", default=str(rl.OUT), help="bench-rl's work folder, with story/ built in it.")
    a = ap.parse_args(argv)
    work = Path(a.work_dir).resolve() / "story"
    if not (work / "BUILD_INFO.json").is_file():
        raise SystemExit(f"error: {work} has no built story models: run `python -m bench.bench_rl` first")
    rl.COMMON = {**rl.COMMON, "lr": a.lr}
    rl.OUT = Path(a.work_dir).resolve() / "lr-probe"  # run_side writes its logs and the peer's runs here
    s = rl.SCALES["story"]
    runs = {a.side: []}
    for rnd in range(1, a.rounds + 1):
        r = rl.run_side(a.side, a.method, work, s, rnd)
        r["round"] = rnd
        runs[a.side].append(r)
    add_gold(runs, GoldEval(work, s["gold_samples"], rl.COMMON), rl.OUT, f"{a.side}-{a.method}-lr{a.lr:g}", print)
    res = {"side": a.side, "method": a.method, "lr": a.lr, "gold_gain": [r["gold_gain"] for r in runs[a.side]],
           "kl_to_sft": [r["kl_to_sft"] for r in runs[a.side]]}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
