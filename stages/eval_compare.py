"""`make eval`'s comparison of every policy a run has: SFT, PPO, GRPO, RLOO, REINFORCE++ and DPO on the same held-out
prompts with the same seed. Pure helpers (statistics, the win-rate matrix, the per-policy table, the markdown) plus
the two that read the run folder: which policy stages exist, and which held-out prompts they share.

The stage (stages/eval.py) samples and scores; everything here is computed from the per-prompt scores it hands over,
so report.json's figures can be recomputed from its samples.
"""

from __future__ import annotations

import math
import statistics
import sys
from statistics import NormalDist
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data import jsonl_objects
from pipeline.stats import student_t_isf, wilson

RL_STAGES = ("ppo", "grpo", "rloo", "reinforce_pp")  # the one RL loop (stages/ppo/): trained on prompts, some held out
POLICY_STAGES = RL_STAGES + ("dpo",)  # every stage whose manifest holds a policy adapter on the run's base


# ---------------------------------------------------------------------------------------------------- statistics

def same_replies(a: list[str], b: list[str]) -> list[bool]:
    """Per prompt: did the two policies write the same reply? (win_rate counts that a tie, whatever the scores.)"""
    return [x == y for x, y in zip(a, b)]


def win_rate(ppo: list[float], sft: list[float], tie_eps: float = 1e-6, same_text: list[bool] | None = None,
             group: int = 1) -> dict:
    """The first policy beats the second on a row when its score is higher; a tie (scores within tie_eps, or the
    same text: `same_text`, whose scores a batch's padding can move by ~1e-7) counts half. Named for its first use:
    PPO over SFT. `group`: rows per prompt (eval's samples_per_prompt, row j of a prompt's against row j), in prompt
    order; the rate is each prompt's share of wins, averaged. A prompt's rows are not independent trials (some
    prompts are easy), so the Wilson interval takes the rows' effective number (effective_trials), between the
    prompts and the rows."""
    if group < 1 or len(ppo) % group:
        raise ValueError(f"{len(ppo)} rows are not whole groups of {group} (one per prompt)")
    same = same_text or [False] * len(ppo)
    outcomes = [1.0 if p > s + tie_eps and not t else 0.0 if p < s - tie_eps and not t else 0.5
                for p, s, t in zip(ppo, sft, same)]
    wins, losses = outcomes.count(1.0), outcomes.count(0.0)
    ties = len(ppo) - wins - losses
    rate = (wins + 0.5 * ties) / len(ppo) if ppo else float("nan")
    shares = per_prompt(outcomes, group)
    n = effective_trials(shares, group)
    low, high = wilson(rate * n if ppo else 0, n)
    return {"rate": rate, "ci_low": low, "ci_high": high,
            "ci": "Wilson 95%, ties counted half" + (f", over the effective trials of {len(shares)} prompts x {group} "
                                                     f"pairs" if group > 1 else ""),
            "wins": wins, "ties": ties, "losses": losses, "n": len(shares), "pairs": len(ppo), "n_effective": n}


def per_prompt(xs: list[float], group: int) -> list[float]:
    """Each prompt's mean over its `group` rows (eval's samples_per_prompt), in prompt order."""
    return [statistics.fmean(xs[i:i + group]) for i in range(0, len(xs), group)]


def effective_trials(shares: list[float], group: int) -> float:
    """How many independent trials `shares` (each prompt's share of wins over its `group` pairs) are worth: Kish's
    effective sample size, the prompts times p(1-p) over the shares' variance, so that p(1-p)/n is the variance of
    their mean. Between the prompts (every prompt's pairs alike: a share varies as one trial does) and the pairs
    (independent pairs); one pair a prompt is exactly the prompts. On the default run's 82 prompts x 4 pairs: ~300."""
    prompts, pairs = len(shares), len(shares) * group
    if group == 1 or prompts < 2:
        return float(prompts)
    p, var = statistics.fmean(shares), statistics.variance(shares)
    if var == 0:  # every prompt's share the same: nothing says its pairs are alike
        return float(pairs)
    return min(float(pairs), max(float(prompts), prompts * p * (1 - p) / var))


def win_rate_matrix(scores: dict[str, list[float]], tie_eps: float = 1e-6,
                    texts: dict[str, list[str]] | None = None, group: int = 1) -> dict[str, dict[str, dict]]:
    """matrix[a][b]: the win rate of policy a over policy b on the same prompts (win_rate: Wilson 95%, ties half; the
    same text is a tie when `texts` are given), for every ordered pair a != b. matrix[a][b]["rate"] +
    matrix[b][a]["rate"] == 1, and a's wins over b are b's losses to a. `group`: rows per prompt (win_rate)."""
    lengths = {len(v) for v in scores.values()}
    if len(lengths) > 1:
        raise ValueError(f"policies scored on different numbers of prompts: { {k: len(v) for k, v in scores.items()} }")
    return {a: {b: win_rate(scores[a], scores[b], tie_eps, same_replies(texts[a], texts[b]) if texts else None, group)
                for b in scores if b != a} for a in scores}


def responses_per_prompt(figures: dict) -> str:
    """How many responses each policy sampled, in words (eval's samples_per_prompt; reports before it had one)."""
    k = figures.get("samples_per_prompt", 1)
    return "one sampled response per policy" if k == 1 else f"{k} sampled responses per prompt and policy"


def describe(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"n": len(xs), "mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "min": min(xs),
            "p25": q[0], "median": q[1], "p75": q[2], "max": max(xs)}


def policy_row(method: str, proxy: list[float], gold: list[float] | None, kl: list[float], lengths: list[float],
               ended: list[bool]) -> dict:
    """One line of the comparison table: means over the held-out prompts."""
    kl_mean = statistics.fmean(kl)
    return {"method": method, "proxy_mean": statistics.fmean(proxy), "gold_mean": statistics.fmean(gold) if gold else None,
            "kl_mean": kl_mean, "sqrt_kl": math.sqrt(max(kl_mean, 0.0)), "length_mean": statistics.fmean(lengths),
            "no_eos": 1 - statistics.fmean(ended)}


GOLD_DROP_Z = 2.0  # the gold "fell" when its paired drop exceeds 2 standard errors: 64 prompts make single means noisy


def gold_drop_z(points: int, prompts: int) -> float:
    """The threshold for a curve of `points` measured on `prompts` prompts: the peak is the best of the points - 1
    before the last, and the best of several noisy means falls back by chance more often than one does. Bonferroni
    over them keeps a flat gold curve's chance of a flag at one comparison's at GOLD_DROP_Z under a normal (2.3%), and
    the standard error, estimated from the prompts' paired drops, makes it Student's t on prompts - 1 degrees of
    freedom: 2.03 for two points on the default's 82 prompts, 2.84 for its nine; 3.31 for two on 4 prompts (the normal's
    2.0 flagged a flat curve of 3 prompts 9.5% of the time)."""
    tail = (1 - NormalDist().cdf(GOLD_DROP_Z)) / max(points - 1, 1)
    return student_t_isf(tail, prompts - 1)


def overoptimisation_flag(points: list[dict]) -> str | None:
    """Goodhart's sign (Gao et al. 2022): from the checkpoint where the gold was best to the last one, the proxy
    rose while the gold fell by more than gold_drop_z paired standard errors (same prompts at every point)."""
    points = sorted(points, key=lambda p: p["update"])
    peak, last = max(points, key=lambda p: p["gold_mean"]), points[-1]
    if peak is last:
        return None
    drops = [b - a for a, b in zip(peak["gold"], last["gold"])]
    if len(drops) < 2:  # one prompt: no standard error to measure a drop in (any drop at all was flagged)
        return None
    z = gold_drop_z(len(points), len(drops))
    se = statistics.stdev(drops) / math.sqrt(len(drops))
    gold_fell = statistics.fmean(drops) < -z * se and statistics.fmean(drops) < 0
    proxy_rose = last["proxy_mean"] > peak["proxy_mean"]
    if not (gold_fell and proxy_rose):
        return None
    return (f"over-optimisation: from update {peak['update']} ({peak['policy']}) to update {last['update']} the reward "
            f"model's score rose ({peak['proxy_mean']:.3f} -> {last['proxy_mean']:.3f}) while the gold judge's fell "
            f"({peak['gold_mean']:.3f} -> {last['gold_mean']:.3f}, more than {z:.2f} standard errors): "
            f"the policy is exploiting the reward model (reward hacking)")


def policy_flags(by_policy: dict[str, dict], hacking_kl: float, length_ratio: float,
                 curves: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Each policy's signs of reward hacking, against SFT's row (the PPO report's held-out flags, for every policy): a
    mean KL to the reference above hacking_kl; a reward-model score above SFT's reached with responses length_ratio
    times as long; and along its gold curve (`curves`, points with their per-prompt proxy and gold scores; {} without
    a gold judge) the proxy rising while the gold fell (overoptimisation_flag)."""
    sft = by_policy["sft"]
    flags = {}
    for name, row in by_policy.items():
        if name == "sft":
            continue
        flags[name] = []
        if row["kl_mean"] > hacking_kl:
            flags[name].append(f"mean KL to the reference {row['kl_mean']:.2f} nats (threshold {hacking_kl:g})")
        if row["proxy_mean"] > sft["proxy_mean"] and row["length_mean"] >= length_ratio * sft["length_mean"] > 0:
            flags[name].append(f"a higher reward-model score with responses {row['length_mean'] / sft['length_mean']:.1f}x "
                               f"as long as SFT's ({sft['length_mean']:.1f} -> {row['length_mean']:.1f} tokens)")
        sign = overoptimisation_flag(curves[name]) if len(curves.get(name, ())) > 1 else None
        if sign:
            flags[name].append(sign)
    return flags


# ---------------------------------------------------------------------------------------------------- the run folder

def policy_method(stage: str, manifest: dict) -> str:
    """What made the policy: the RL loop records its estimator's stage name as `method`; DPO's stage is its method."""
    return (manifest.get("metrics") or {}).get("method") or stage


def find_policy_stages(stage_run) -> dict[str, dict]:
    """The manifests of the run's policy stages that hold an adapter, in POLICY_STAGES order. Every one is read when
    present (StageRun.may_read), so one that appears later makes `make eval` run again."""
    from pipeline.models import is_main_process
    from pipeline.run import STARTED, stage_dir

    found = {}
    for name in POLICY_STAGES:
        stage_run.may_read(name)
        folder = stage_dir(stage_run.runs_dir, stage_run.run, name)
        if (folder / "manifest.json").is_file():
            manifest = stage_run.need(name)
            if (manifest.get("outputs") or {}).get("adapter"):
                found[name] = manifest
        elif (folder / STARTED).is_file() and is_main_process():  # left out unsaid, it read as never run
            print(f"note: {name} did not finish (interrupted; {folder} has no manifest): it is not compared; "
                  f"`make {name} RUN={stage_run.run}` finishes it", file=sys.stderr)
    if not found:
        raise ConfigError(f"`make eval` needs a trained policy in run '{stage_run.run}', but it has none of "
                          f"{', '.join(POLICY_STAGES)}: run `make ppo RUN={stage_run.run}` first (or make grpo, rloo, dpo)")
    return found


def read_prompt_rows(path: Path) -> list:
    if not path.is_file():
        raise ConfigError(f"held-out prompts {path} are missing: rerun the stage that wrote them (`make ppo`)")
    rows = jsonl_objects(path)  # a damaged line: one ConfigError naming the file and the line
    missing = [n for n, row in enumerate(rows, 1) if "prompt" not in row]
    if missing:
        raise ConfigError(f"held-out prompts {path}: row {missing[0]} has no 'prompt': rerun the stage that wrote them")
    return [row["prompt"] for row in rows]


def shared_heldout_prompts(policies: dict[str, dict]) -> Path:
    """The held-out prompts every policy is compared on: those the RL stages set aside. Several RL stages (ppo, grpo,
    ...) read the same prompts file and split it with the same seed and share, so their held-out files hold the same
    prompts; they are compared, and prompts that differ are refused (a policy trained on another's held-out prompts
    would be compared on prompts it saw). DPO sets no prompts aside: it needs an RL stage beside it."""
    rl = [name for name in RL_STAGES if name in policies]
    if not rl:
        raise ConfigError(f"`make eval` takes its held-out prompts from an RL stage ({', '.join(RL_STAGES)}), and the "
                          f"run has only {', '.join(policies)}: run `make ppo` (or make grpo, rloo) first")
    paths = {name: Path(policies[name]["outputs"]["heldout_prompts"]) for name in rl}
    first = rl[0]
    reference = read_prompt_rows(paths[first])
    for name in rl[1:]:
        if read_prompt_rows(paths[name]) != reference:
            raise ConfigError(f"the held-out prompts of {first} ({paths[first]}) and {name} ({paths[name]}) differ, so "
                              f"their policies cannot be compared on prompts neither trained on: train both with the "
                              f"same prompts_file, seed and heldout_fraction, or move one run folder aside")
    return paths[first]


# ---------------------------------------------------------------------------------------------------- the report

def comparison_figures(comparison: dict) -> dict:
    """The manifest's share: the policies and each one's means (the matrices stay in report.json)."""
    return {"policies": comparison["policies"], "comparison": comparison["by_policy"],
            "flagged_policies": sorted(n for n, f in comparison["flags"].items() if f)}


def matrix_markdown(matrix: dict[str, dict[str, dict]], what: str) -> list[str]:
    names = list(matrix)
    lines = [f"Win rate of the row's policy over the column's, {what} (Wilson 95% interval; ties count half):", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        cells = ["–" if a == b else f"{matrix[a][b]['rate']:.0%} ({matrix[a][b]['ci_low']:.0%}–{matrix[a][b]['ci_high']:.0%})"
                 for b in names]
        lines.append(f"| **{a}** | " + " | ".join(cells) + " |")
    return lines + [""]


def comparison_markdown(comparison: dict) -> list[str]:
    num = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = ["## Every policy of the run", "",
             f"{comparison['n_prompts']} held-out prompts, {responses_per_prompt(comparison)} with the same seed "
             f"({comparison['seed']}); KL to the SFT reference on each policy's own responses.", "",
             "| policy | method | reward model (proxy) | gold | KL to SFT (nats) | length (tokens) | share without EOS |",
             "|---|---|---|---|---|---|---|"]
    for name, row in comparison["by_policy"].items():
        lines.append(f"| {name} | {row['method']} | {row['proxy_mean']:.3f} | {num(row['gold_mean'], '.3f')} "
                     f"| {row['kl_mean']:.3f} | {row['length_mean']:.1f} | {row['no_eos']:.1%} |")
    flagged = {n: f for n, f in comparison["flags"].items() if f}
    lines += ["", f"Signs of reward hacking (a mean KL above {comparison['hacking_kl']:g} nats, a higher reward with responses "
              f"{comparison['hacking_length_ratio']:g}x as long as SFT's, the reward model's score rising along an RL run "
              "while the gold fell from its best point by more than about 2 paired standard errors, a Bonferroni-corrected t "
              "test over the run's points): " + ("none." if not flagged else ""), ""]
    lines += [f"- **{n}**: " + "; ".join(f) for n, f in flagged.items()] + ([""] if flagged else [])
    if comparison.get("win_rate_gold"):
        lines += matrix_markdown(comparison["win_rate_gold"], f"judged by the gold judge `{comparison['gold_judge']}`")
    lines += matrix_markdown(comparison["win_rate_proxy"], "judged by the run's reward model")
    if comparison.get("curves"):
        lines += ["![gold score against KL](plots/gold_vs_kl.png)", ""]
    else:
        lines += ["No gold judge (`gold_judge:` in configs/eval.yaml): no gold-against-KL plot.", ""]
    return lines
