"""What the benchmarks against a peer share: child processes measured by wait4, medians over rounds, the meta block,
and the gold gain (before vs after training, scored by the gold judge on held-out prompts the same way for every
side). bench/bench_ppo.py and bench/bench_rl.py drive their workloads through these functions."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import REPO_ROOT
from pipeline.run import git_commit, package_versions

ENV_DEFAULTS = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_TELEMETRY": "1"}
MEASUREMENT = ("episodes/s and gen tokens/s over training wall time (no imports/loading); peak_rss_mb = child ru_maxrss "
               "via os.wait4; medians over rounds; rounds alternate which side goes first")


def logger(name: str):
    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    return log


def env() -> dict:
    e = dict(os.environ)
    for k, v in ENV_DEFAULTS.items():
        e.setdefault(k, v)
    # The peers train on the CPU (use_cpu=True); ours, run without a launch, would take a GPU it sees: both on the CPU.
    e["ACCELERATE_USE_CPU"] = "1"
    return e


def run_child(cmd: list[str], logfile: Path, want_json: bool = True) -> tuple[dict, float, float]:
    """Run one side; (its last-line JSON, its peak RSS in MB from wait4, wall s). Output goes to logfile."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = "".join(logfile.read_text().splitlines(True)[-25:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (rc {p.returncode}); see {logfile}:\n{tail}")
    lines = [ln for ln in logfile.read_text().splitlines() if ln.startswith("{")] if want_json else []
    return (json.loads(lines[-1]) if lines else {}), ru.ru_maxrss / 1024.0, wall


def summarise(runs: list[dict], metrics: tuple[str, ...]) -> dict:
    """Medians over rounds of each metric, and the runs themselves."""
    out = {}
    for k in metrics:
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = round(statistics.median(vals), 4) if vals else None
    out["runs"] = runs
    return out


def speed_memory_ratio(ours: dict, peer: dict, keys=("episodes_per_s", "gen_tokens_per_s", "peak_rss_mb")) -> dict:
    ratio = {}
    for k in keys:
        a, b = ours.get(k), peer.get(k)
        ratio[k] = round(a / b, 3) if a and b else None
    return ratio


def paired_ratios(ours: list[dict], peer: list[dict], key: str) -> dict:
    """ours / peer of `key` within each round (the two ran back to back, under about the same load from other jobs),
    and their median: steadier than the ratio of the two medians when the machine's load swings between rounds."""
    by_round = {r["round"]: r[key] for r in peer if r.get(key)}
    ratios = [round(r[key] / by_round[r["round"]], 3) for r in ours if r.get(key) and r["round"] in by_round]
    return {f"{key}_per_round": ratios, f"{key}_median_of_rounds": round(statistics.median(ratios), 3) if ratios else None}


def meta(targets: dict, t0: float, **extra) -> dict:
    return {"targets": targets, "wall_s": round(time.perf_counter() - t0, 1),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_1m_5m_15m_end": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
            "machine": platform.platform(), "env": {k: env()[k] for k in (*ENV_DEFAULTS, "ACCELERATE_USE_CPU")},
            "versions_ours": package_versions(), "git_commit": git_commit(), "measurement": MEASUREMENT, **extra}


# ------------------------------------------------------------------------------------------------------ gold gain
def gold_gain(before: list[float], after: list[float]) -> dict:
    """One run's gold gain: mean gold score after training minus before, on the same held-out prompts and sample
    slots (paired), with the standard error of that mean difference (sd of the paired differences / sqrt(n))."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"gold_gain needs two paired lists of >= 2 scores, got {len(before)} and {len(after)}")
    diffs = [a - b for a, b in zip(after, before)]
    return {"gold_before": round(statistics.fmean(before), 4), "gold_after": round(statistics.fmean(after), 4),
            "gold_gain": round(statistics.fmean(diffs), 4),
            "gold_gain_paired_se": round(statistics.stdev(diffs) / math.sqrt(len(diffs)), 4)}


def gain_over_rounds(gains: list[float]) -> dict:
    """The gold gain over rounds (seeds): median, mean, and the standard error of the mean over rounds (sd/sqrt(n));
    one round has no spread to measure, so its SE is None."""
    if not gains:
        return {"gold_gain": None, "gold_gain_mean": None, "gold_gain_se": None, "rounds": 0}
    se = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else None
    return {"gold_gain": round(statistics.median(gains), 4), "gold_gain_mean": round(statistics.fmean(gains), 4),
            "gold_gain_se": round(se, 4) if se is not None else None, "rounds": len(gains)}


def gold_summary(runs: list[dict], metrics: tuple[str, ...]) -> dict:
    """summarise(), plus the gold gain's mean and SE over rounds."""
    out = summarise(runs, metrics)
    out.update({k: v for k, v in gain_over_rounds([r["gold_gain"] for r in runs]).items() if k != "gold_gain"})
    return out


def gain_verdict(ours: dict, peer: dict, figure: str = "gold_gain", mean: str = "gold_gain_mean") -> dict:
    """Is our gain (`figure`: the gold's; bench-ppo's reward gain too) at least the peer's within SE? Ours passes
    unless it lies below the peer's by more than the standard error of the difference of the two means
    (sqrt(se_ours^2 + se_peer^2), from each side's `{figure}_se`); no SE (one round): no verdict. `mean`: the key of
    each side's gain."""
    a, b = ours.get(mean), peer.get(mean)
    sa, sb = ours.get(f"{figure}_se"), peer.get(f"{figure}_se")
    if a is None or b is None:
        return {f"{figure}_diff": None, f"{figure}_diff_se": None, f"meets_{figure}_target": None}
    se = math.sqrt(sa ** 2 + sb ** 2) if sa is not None and sb is not None else None
    return {f"{figure}_diff": round(a - b, 4), f"{figure}_diff_se": round(se, 4) if se is not None else None,
            f"meets_{figure}_target": (a - b >= -se) if se is not None else None}


@dataclass
class GoldEval:
    """How the gold is measured: a built story work folder (bench/story.py: heldout.jsonl, sft/), samples per
    held-out prompt, and the sampling settings (response_length, temperature, gold_seed, gold_judge)."""
    work: Path
    samples: int
    common: dict

    def command(self) -> list[str]:
        c = self.common
        return [sys.executable, "-m", "bench.gold", "--prompts", str(self.work / "heldout.jsonl"),
                "--samples", str(self.samples), "--seed", str(c["gold_seed"]), "--max-new-tokens",
                str(c["response_length"]), "--temperature", str(c["temperature"]), "--judge", c["gold_judge"]]


def add_gold(runs: dict[str, list[dict]], gold: GoldEval, out: Path, name: str, log) -> list[float]:
    """Every trained policy (each run's "policy": [base, adapter]) and the SFT start, gold-scored in one process
    with one seed; each run gets its gold gain (gold_gain) and its mean KL to the SFT start on those samples
    (kl_to_sft, nats per response): how far it moved for the gain. Returns the SFT policy's scores."""
    from bench.story import base_of

    policies = {"sft": (base_of(gold.work), gold.work / "sft")}
    for side, rs in runs.items():
        for r in rs:
            policies[f"{side}-r{r['round']}"] = tuple(Path(p) for p in r["policy"])
    measured = gold_scores(gold.command() + ["--reference", "sft"], policies, out / "gold" / f"{name}.json",
                           out / "logs" / f"gold-{name}.log")
    for side, rs in runs.items():
        for r in rs:
            policy = measured[f"{side}-r{r['round']}"]
            r.update(gold_gain(measured["sft"]["scores"], policy["scores"]))
            r["kl_to_sft"] = round(statistics.fmean(policy["kl"]), 4)
            log(f"  {name} {side} round {r['round']}: gold {r['gold_before']} -> {r['gold_after']} "
                f"(gain {r['gold_gain']} +- {r['gold_gain_paired_se']}) at KL {r['kl_to_sft']}")
    return measured["sft"]["scores"]


def gold_scores(cmd_prefix: list[str], policies: dict[str, tuple[Path, Path | None]], out: Path,
                logfile: Path) -> dict[str, dict]:
    """Gold scores (and with --reference, KL) of each policy (name -> (base, adapter or None)) on the held-out
    prompts, from one process of bench/gold.py: its memory and time never count towards a side's figures."""
    args = [a for name, (base, adapter) in policies.items()
            for a in ("--policy", f"{name}={base}" + (f",{adapter}" if adapter else ""))]
    run_child(cmd_prefix + args + ["--out", str(out)], logfile, want_json=False)
    return json.loads(out.read_text())
