"""The default story run under several seeds: does PPO improve the gold judge's score every time?

    make bench-story                                  # seeds 1 2 3 -> bench/results/story.json
    python -m bench.story_seeds --eval_only           # eval changed: make eval on the last result's runs again
    python -m bench.story_seeds --seeds 1 --output /tmp/story.json

Each seed is a fresh run folder (RUN=seed-<s> under --runs_dir) of exactly what a new user runs, `make sft rm ppo`
then `make eval`, with every training stage's seed set to s (SFT, pairs, the simulated annotator, the reward model,
PPO); eval's own sampling seed stays the config's, so the seeds differ only in what was trained. Wall times are
per make call, on whatever else this machine was doing (load average recorded beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the result keeps of eval's manifest (metrics) and of the upstream stages'.
EVAL_KEYS = ("n_prompts", "samples_per_prompt", "gold_sft_mean", "gold_ppo_mean", "gold_win_rate", "gold_win_rate_ci_low",
             "gold_win_rate_ci_high", "kl_mean", "win_rate", "rm_gold_agreement", "rm_gold_pairs",
             "rm_gold_agreement_policy_samples", "overoptimisation_suspected", "reward_hacking_suspected",
             "length_sft_mean", "length_ppo_mean", "no_eos_sft", "no_eos_ppo")


def make(targets: list[str], run: str, runs_dir: Path, seed: int, rm_args: str = "", ppo_args: str = "",
         force: bool = False) -> float:
    """One make call; returns its wall seconds. Raises with make's last lines when it fails. `rm_args`, `ppo_args`:
    more flags for those stages (a variant of the default run, e.g. "--ensemble 1" and "--kl_coef 0.15"). `force`:
    FORCE=1, the named targets redone though their inputs are unchanged (make does not watch the code)."""
    seeded = f"--seed {seed}"
    cmd = ["make", *targets, f"RUN={run}", f"RUNS_DIR={runs_dir}", f"SFT_ARGS={seeded}", f"PAIRS_ARGS={seeded}",
           f"SIMULATE_ARGS={seeded}", f"RM_ARGS={seeded} {rm_args}".strip(), f"PPO_ARGS={seeded} {ppo_args}".strip(),
           *(["FORCE=1"] if force else [])]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return round(time.time() - start, 1)


def metrics_of(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]


def samples_of(run_dir: Path, n: int) -> list[dict]:
    """The first n held-out prompts with the SFT and the PPO response and their gold scores (eval's report.json: a
    prompt's first pair of its samples_per_prompt)."""
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    keys = ("prompt_text", "sft", "ppo", "gold_sft", "gold_ppo", "reward_sft", "reward_ppo")
    every = report.get("figures", {}).get("samples_per_prompt", 1)
    return [{k: row.get(k) for k in keys} for row in report.get("samples", [])[::every][:n]]


def run_meta() -> dict:
    """What a result was measured on: Python, platform, cores, date, threads and the commit."""
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "the Makefile's: cores / processes"),
            "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True).stdout.strip()}


def write_result(output: Path, result: dict) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


def gain_summary(gains: list[float]) -> dict:
    """Mean gold gain over seeds with its standard error (sample std / sqrt(n)); every_seed_positive is the target."""
    mean = statistics.fmean(gains)
    se = statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else None
    return {"gold_gain_mean": mean, "gold_gain_se": se, "every_seed_positive": all(g > 0 for g in gains)}


def median_given(values) -> float | None:
    """The median of the values a seed has (a run whose reward model kept no held-out pairs has no agreement)."""
    given = [v for v in values if v is not None]
    return statistics.median(given) if given else None


def one_seed(seed: int, runs_dir: Path, samples: int, rm_args: str = "", ppo_args: str = "",
             trained_s: float | None = None) -> dict:
    """`trained_s`: evaluate the seed's finished run again (eval changed, the training did not), recording this as
    its training's wall time (the last result's); None trains it afresh."""
    run = f"seed-{seed}"
    run_dir = runs_dir / run
    load_before = os.getloadavg()[0]
    evaluate_again = trained_s is not None
    if trained_s is None:
        # A fresh folder: stages an earlier bench left would count as up to date and be missing from the wall time.
        shutil.rmtree(run_dir, ignore_errors=True)
        trained_s = make(["sft", "rm", "ppo"], run, runs_dir, seed, rm_args, ppo_args)
    wall = {"sft_rm_ppo_s": trained_s}
    # The same stage flags again: make reruns a stage whose flags differ from the ones its manifest records.
    wall["eval_s"] = make(["eval"], run, runs_dir, seed, rm_args, ppo_args, force=evaluate_again)
    ev = metrics_of(run_dir, "eval")
    rm, sim = metrics_of(run_dir, "rm"), metrics_of(run_dir, "simulate")
    return {
        "seed": seed, **{k: ev.get(k) for k in EVAL_KEYS},
        "gold_gain": ev["gold_ppo_mean"] - ev["gold_sft_mean"],
        "rm_heldout_accuracy": rm.get("eval_accuracy"), "simulator_agreement_with_gold": sim.get("agreement_with_gold"),
        "wall_s": wall, "load_average_at_start": round(load_before, 2), "load_average_at_end": round(os.getloadavg()[0], 2),
        "samples": samples_of(run_dir, samples),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "runs" / "bench-story")
    parser.add_argument("--samples", type=int, default=4, help="before/after samples kept per seed")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "story.json")
    parser.add_argument("--rm_args", default="", help='more make rm flags, e.g. "--ensemble 1"')
    parser.add_argument("--ppo_args", default="", help='more make ppo flags, e.g. "--kl_coef 0.15"')
    parser.add_argument("--eval_only", action="store_true",
                        help="after a change to eval alone: `make eval` on the seeds' runs of the last result (--output), "
                             "whose training wall times it keeps")
    args = parser.parse_args(argv)
    trained = {}
    if args.eval_only:
        last = json.loads(args.output.read_text()) if args.output.is_file() else {}
        trained = {s["seed"]: s["wall_s"]["sft_rm_ppo_s"] for s in last.get("seeds", [])}
        missing = [s for s in args.seeds if s not in trained or not (args.runs_dir / f"seed-{s}" / "ppo").is_dir()]
        if missing or last.get("stage_args") != {"rm": args.rm_args, "ppo": args.ppo_args}:
            raise SystemExit(f"error: --eval_only needs {args.output} and {args.runs_dir} to hold the same stage flags' "
                             f"finished runs of seeds {missing or args.seeds}: run without --eval_only")
    per_seed = []
    for seed in args.seeds:
        per_seed.append(one_seed(seed, args.runs_dir.resolve(), args.samples, args.rm_args, args.ppo_args,
                                 trained.get(seed)))
        print(json.dumps({k: v for k, v in per_seed[-1].items() if k != "samples"}), flush=True)
    result = {
        "task": "story (default recipe): gold = VADER sentiment of the continuation; PPO against SFT on held-out prompts",
        "stage_args": {"rm": args.rm_args, "ppo": args.ppo_args},  # beyond the seed: "" is the default run
        "seeds": per_seed,
        "summary": {
            **gain_summary([s["gold_gain"] for s in per_seed]),
            "gold_win_rate_median": median_given(s["gold_win_rate"] for s in per_seed),
            "rm_gold_agreement_median": median_given(s["rm_gold_agreement"] for s in per_seed),
            "kl_mean_median": median_given(s["kl_mean"] for s in per_seed),
            "sft_rm_ppo_wall_s_median": statistics.median(s["wall_s"]["sft_rm_ppo_s"] for s in per_seed),
        },
        "meta": run_meta(),
    }
    write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()
