"""The RL estimators side by side on the story task: PPO, GRPO, RLOO, REINFORCE++ and DPO, each against SFT.

    make bench-estimators                              # seed 42 (the default run) -> bench/results/estimators.json
    python -m bench.estimators --seeds 42 1 2 --output /tmp/estimators.json

For each seed: the run's SFT policy and reward models (`make sft rm`, made first where the run has none), then each
estimator's own stage in turn (`make ppo`, `make grpo`, `make rloo`, `make reinforce_pp`, `make dpo`, each with its
config's defaults, its folder removed first so that its wall time is a whole run), then one `make eval`, which compares
every policy of the run with SFT on the same 82 held-out openings (one sampling seed). Seed 42 is the default run
itself (RUN=default, no seed flags: 42 is every config's seed); another seed s is RUN=seed-<s> with every stage seeded
as `make bench-story` seeds it. Wall times are per make call, on whatever else this machine was doing (load average
recorded beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.story_seeds import gain_summary, median_given, run_meta, write_result

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = ("ppo", "grpo", "rloo", "reinforce_pp", "dpo")
# The make variable of each stage's flags (Makefile: STAGES): every stage of a seeded run gets --seed.
STAGE_VARIABLES = ("SFT_ARGS", "PAIRS_ARGS", "SIMULATE_ARGS", "RM_ARGS", "PPO_ARGS", "GRPO_ARGS", "RLOO_ARGS",
                   "REINFORCE_PP_ARGS", "DPO_ARGS")
DEFAULT_SEED = 42  # every config's own seed: that seed's run is the default run, unflagged


def run_name(seed: int) -> str:
    return "default" if seed == DEFAULT_SEED else f"seed-{seed}"


def make(targets: list[str], run: str, runs_dir: Path, seed: int) -> float:
    """One make call with every stage seeded (none for the default seed); returns its wall seconds. Raises with make's
    last lines when it fails. The same flags go to every call: make reruns a stage whose flags differ from its
    manifest's."""
    seeded = [] if seed == DEFAULT_SEED else [f"{var}=--seed {seed}" for var in STAGE_VARIABLES]
    cmd = ["make", *targets, f"RUN={run}", f"RUNS_DIR={runs_dir}", *seeded]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return round(time.time() - start, 1)


def estimator_rows(comparison: dict) -> dict[str, dict]:
    """Per estimator in eval's comparison (report.json): its gold mean beside SFT's, the gain, its gold win rate over
    SFT with the Wilson interval (ties half), its reward-model score, KL to SFT, reply length and share without EOS."""
    by_policy, gold_wins = comparison["by_policy"], comparison["win_rate_gold"]
    sft_gold = by_policy["sft"]["gold_mean"]
    rows = {}
    for name in comparison["policies"]:
        if name == "sft":
            continue
        row, win = by_policy[name], gold_wins[name]["sft"]
        rows[name] = {"method": row["method"], "gold_sft_mean": sft_gold, "gold_mean": row["gold_mean"],
                      "gold_gain": row["gold_mean"] - sft_gold, "gold_win_rate": win["rate"],
                      "gold_win_rate_ci_low": win["ci_low"], "gold_win_rate_ci_high": win["ci_high"],
                      "wins_ties_losses": [win["wins"], win["ties"], win["losses"]],  # over the pairs
                      "pairs": win.get("pairs", win["n"]), "proxy_mean": row["proxy_mean"],
                      "kl_mean": row["kl_mean"], "length_mean": row["length_mean"], "no_eos": row["no_eos"]}
    return rows


def summary_over_seeds(per_seed: list[dict]) -> dict[str, dict]:
    """Per estimator, over the seeds that ran it: the mean gold gain with its standard error, the median gold win rate
    over SFT, KL and wall time."""
    out = {}
    for name in ESTIMATORS:
        runs = [s["estimators"][name] for s in per_seed if name in s["estimators"]]
        if not runs:
            continue
        out[name] = {"seeds": len(runs), **gain_summary([r["gold_gain"] for r in runs]),
                     "gold_win_rate_median": median_given(r["gold_win_rate"] for r in runs),
                     "kl_mean_median": median_given(r["kl_mean"] for r in runs),
                     # an earlier run's policy that eval compared, not trained by this bench: no wall time
                     "wall_s_median": median_given(r.get("wall_s") for r in runs)}
    return out


def one_seed(seed: int, runs_dir: Path, estimators: tuple[str, ...]) -> dict:
    run = run_name(seed)
    run_dir = ROOT / runs_dir / run  # runs_dir as make is given it: relative to the repository, or absolute
    load_before = os.getloadavg()[0]
    # The SFT policy and reward models every estimator starts from (skipped as up to date where the run has them).
    upstream_s = make(["sft", "rm"], run, runs_dir, seed)
    walls, loads = {}, {}
    for name in estimators:
        # A whole run each: a folder left by an earlier run would be resumed or skipped, and its time not counted.
        shutil.rmtree(run_dir / name, ignore_errors=True)
        loads[name] = round(os.getloadavg()[0], 2)
        walls[name] = make([name], run, runs_dir, seed)
        print(f"{run}: make {name} {walls[name]} s", flush=True)
    eval_s = make(["eval"], run, runs_dir, seed)
    rows = estimator_rows(json.loads((run_dir / "eval" / "report.json").read_text())["comparison"])
    for name in estimators:
        rows[name].update(wall_s=walls[name], load_average_at_start=loads[name])
    return {"seed": seed, "run": run, "estimators": rows, "sft_rm_wall_s": upstream_s, "eval_wall_s": eval_s,
            "n_prompts": json.loads((run_dir / "eval" / "manifest.json").read_text())["metrics"]["n_prompts"],
            "load_average_at_start": round(load_before, 2), "load_average_at_end": round(os.getloadavg()[0], 2)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[DEFAULT_SEED])
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    # Spelled as the run's stages were given it (make's default: runs): a stage's manifest records --runs_dir, and
    # the same folder spelled another way makes every stage rerun.
    parser.add_argument("--runs_dir", type=Path, default=Path("runs"))
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "estimators.json")
    args = parser.parse_args(argv)
    per_seed = []
    for seed in args.seeds:
        per_seed.append(one_seed(seed, args.runs_dir, tuple(args.estimators)))
        print(json.dumps(per_seed[-1]), flush=True)
    result = {
        "task": "story (default recipe): each estimator's policy against SFT on eval's held-out prompts; gold = VADER "
                "sentiment of the continuation, which no stage optimised",
        "settings": {name: f"configs/{name}.yaml as committed" for name in args.estimators},
        "seeds": per_seed,
        "summary": summary_over_seeds(per_seed),
        "meta": run_meta(),
    }
    write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()
