"""`make eval`'s SFT-vs-PPO report, computed from the samples and scores the stage hands over (no model work here):
the win rate under the reward model, PPO's training curves and their reward-hacking signs, the human win rate read
from the label store, the gold judge's figures (gold win rate, the reward model's agreement with the gold, the
over-optimisation curve over the policies PPO kept) and the report's markdown."""

from __future__ import annotations

import json
import math
import sqlite3
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import ConfigError, resolve_path
from pipeline.data import jsonl_objects
from pipeline.judges import describe_judge
from stages.eval_compare import describe, overoptimisation_flag, per_prompt, same_replies, wilson, win_rate
from stages.label.export import markdown_literal

if TYPE_CHECKING:
    from stages.eval import EvalArgs


# ---------------------------------------------------------------------------------------------------- training curves

def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"PPO metrics file {path} is missing: rerun `make ppo`")
    return jsonl_objects(path)  # a damaged line: one ConfigError naming the file and the line


def training_summary(rows: list[dict]) -> dict:
    """First and last values of the curves, each the mean of a tenth of the updates (one update is noisy)."""
    if not rows:
        return {"updates": 0}
    k = max(1, len(rows) // 10)
    out = {"updates": len(rows)}
    for key in ("reward_raw", "reward", "kl", "entropy", "response_length", "no_eos_fraction"):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            out[f"{key}_first"] = statistics.fmean(vals[:k])
            out[f"{key}_last"] = statistics.fmean(vals[-k:])
            out[f"{key}_max"] = max(vals)
    return out


def training_flags(train: dict, args: EvalArgs) -> list[str]:
    """Signs in PPO's training curves that the policy found a way to please the reward model rather than to answer
    better. The held-out signs are the comparison's (eval_compare.policy_flags), one rule for every policy."""
    flags = []
    r0, r1 = train.get("reward_raw_first", train.get("reward_first")), train.get("reward_raw_last", train.get("reward_last"))
    l0, l1 = train.get("response_length_first"), train.get("response_length_last")
    if None not in (r0, r1, l0, l1) and r1 > r0 and l0 > 0 and l1 >= args.hacking_length_ratio * l0:
        flags.append(f"training: the reward rose ({r0:.3f} -> {r1:.3f}) while responses grew {l1 / l0:.1f}x "
                     f"({l0:.1f} -> {l1:.1f} tokens): likely reward hacking through length")
    if train.get("kl_max") is not None and train["kl_max"] > args.hacking_kl:
        flags.append(f"training: KL to the reference reached {train['kl_max']:.2f} nats (threshold {args.hacking_kl}): "
                     f"the policy drifted far from SFT; read the samples before trusting the reward")
    return flags


# ---------------------------------------------------------------------------------------------------- human labels

def pair_id(prompt, sft: str, ppo: str) -> str:
    """Stable id of one SFT-vs-PPO pair, so labels given to exactly these texts can be found again."""
    import hashlib

    return "eval-" + hashlib.sha1(json.dumps([prompt, sft, ppo]).encode()).hexdigest()[:16]


def human_win_rate(store: Path, pairs: dict[str, int]) -> dict | None:
    """Win rate of PPO judged by people: labels in the label store on our pairs (responses = [SFT, PPO]).
    `pairs` maps pair_id -> index of the PPO response. Ties and 'both bad' count half. None when nobody labeled.
    Simulated annotators' labels (make simulate on these pairs) are not people's: left out.
    Each pair counts once, as the mean of its labels: people labeling the same pair agree more than pairs do, so
    the rate is over prompts and the Wilson interval counts pairs, not labels (three people on 20 pairs are 20
    trials, not 60)."""
    from stages.label.store import PERSON  # a label row `l` of a person's

    if not store.is_file() or not pairs:
        return None
    con = sqlite3.connect(store, timeout=30.0)  # read only; the labeling app may be writing (WAL)
    try:
        marks = ",".join("?" * len(pairs))
        rows = con.execute(f"SELECT pair_id, preferred FROM labels l WHERE pair_id IN ({marks}) AND {PERSON}",
                           list(pairs)).fetchall()
    except sqlite3.Error:
        return None
    finally:
        con.close()
    if not rows:
        return None
    by_pair: dict[str, list[float]] = {}
    for pid, p in rows:
        by_pair.setdefault(pid, []).append(0.5 if p is None else float(p == pairs[pid]))
    won = sum(statistics.fmean(scores) for scores in by_pair.values())  # each pair's share of its labels' win
    low, high = wilson(won, len(by_pair))
    return {"rate": won / len(by_pair), "ci_low": low, "ci_high": high, "labels": len(rows), "pairs": len(by_pair),
            "wins": sum(p is not None and p == pairs[pid] for pid, p in rows),
            "ties_or_both_bad": sum(p is None for _, p in rows)}


# ---------------------------------------------------------------------------------------------------- gold judge

def gold_agreement(proxy_a: list[float], proxy_b: list[float], gold_a: list[float], gold_b: list[float],
                   same_text: list[bool] | None = None, group: int = 1) -> dict:
    """How often the proxy (reward model) orders a pair as the gold judge does, over pairs whose gold scores differ
    and whose two replies differ (`same_text`: one reply has no order, though an `rm:` judge's scores of it can differ
    by a batch's padding); a proxy tie counts half. `group`: rows per prompt (eval's samples_per_prompt, prompt-major):
    the Wilson interval then counts the prompts with a counted pair, as win_rate's does, not the pairs."""
    same = same_text or [False] * len(proxy_a)
    kept = [(i // group, pa - pb, ga - gb) for i, (pa, pb, ga, gb, t) in enumerate(zip(proxy_a, proxy_b, gold_a, gold_b, same))
            if ga != gb and not t]
    agree = sum(1.0 if p * g > 0 else 0.5 if p == 0 else 0.0 for _, p, g in kept)
    prompts = len({i for i, _, _ in kept})
    low, high = wilson(agree / len(kept) * prompts if kept else 0, prompts)
    return {"agreement": agree / len(kept) if kept else None, "ci_low": low, "ci_high": high, "pairs": len(kept),
            "prompts": prompts}


def curve_point(update: int, label: str, rewards: list[float], gold: list[float], kl: list[float], group: int = 1) -> dict:
    """One policy on the gold-vs-KL curve. Its per-prompt proxy and gold are each prompt's mean over its `group` rows:
    the over-optimisation flag pairs prompts, and a prompt's samples are not independent of each other."""
    mean_kl = statistics.fmean(kl)
    proxy, gold = per_prompt(rewards, group), per_prompt(gold, group)
    return {"update": update, "policy": label, "kl_mean": mean_kl, "sqrt_kl": math.sqrt(max(mean_kl, 0.0)),
            "proxy_mean": statistics.fmean(proxy), "gold_mean": statistics.fmean(gold), "proxy": proxy, "gold": gold}


def checkpoint_curve(judge, prompts, args: EvalArgs, kept: list[tuple[int, str, dict, list[float]]],
                     ends: tuple[dict, dict]) -> list[dict]:
    """Gold and proxy score against sqrt(KL to SFT): SFT (update 0), each kept policy (kept_policy_samples), the final
    policy. `ends`: the SFT and final points, already measured."""
    from pipeline.judges import judge_scores

    points = [curve_point(update, name, ro["rewards"], judge_scores(judge, prompts, ro["texts"], args.gold_batch_size), kl,
                          args.samples_per_prompt) for update, name, ro, kl in kept]
    return [ends[0], *points, ends[1]]


def gold_report(judge, prompts, args: EvalArgs, heldout: tuple[list[dict], list[float], list[float]],
                kept: list, final_update: int, ro_sft: dict, ro_ppo: dict, kl: list[float],
                gold_sft: list[float], gold_ppo: list[float]) -> dict:
    """Everything the gold judge says about PPO: gold scores of both policies' samples (given), the gold win rate,
    the reward model's agreement with the gold on its held-out pairs (`heldout`: heldout_pair_rewards), and the
    over-optimisation curve over PPO's kept policies (`kept`: kept_policy_samples) with its flag."""
    from pipeline.judges import judge_scores

    held, rm_chosen, rm_rejected = heldout
    if held:
        hp = [r["prompt"] for r in held]
        g_chosen = judge_scores(judge, hp, [r["chosen"] for r in held], args.gold_batch_size)
        g_rejected = judge_scores(judge, hp, [r["rejected"] for r in held], args.gold_batch_size)
        rm_heldout = gold_agreement(rm_chosen, rm_rejected, g_chosen, g_rejected)
    else:
        rm_heldout = {"agreement": None, "pairs": 0, "note": "the rm stage kept no eval_pairs.jsonl"}
    group = args.samples_per_prompt
    ends = (curve_point(0, "sft", ro_sft["rewards"], gold_sft, [0.0] * len(gold_sft), group),
            curve_point(final_update, "ppo (final)", ro_ppo["rewards"], gold_ppo, kl, group))
    curve = checkpoint_curve(judge, prompts, args, kept, ends)
    return {"judge": judge.spec, "sft": gold_sft, "ppo": gold_ppo,
            "win_rate": win_rate(gold_ppo, gold_sft, 0.0, same_replies(ro_ppo["texts"], ro_sft["texts"]), group),
            "rm_agreement_heldout_pairs": rm_heldout,
            "rm_agreement_policy_samples": gold_agreement(ro_ppo["rewards"], ro_sft["rewards"], gold_ppo, gold_sft,
                                                          same_replies(ro_ppo["texts"], ro_sft["texts"]), group),
            "curve": curve, "flag": overoptimisation_flag(curve)}

def gold_figures(gold: dict) -> dict:
    w = gold["win_rate"]
    return {"gold_judge": gold["judge"], "gold_sft_mean": statistics.fmean(gold["sft"]),
            "gold_ppo_mean": statistics.fmean(gold["ppo"]), "gold_win_rate": w["rate"],
            "gold_win_rate_ci_low": w["ci_low"], "gold_win_rate_ci_high": w["ci_high"],
            "rm_gold_agreement": gold["rm_agreement_heldout_pairs"]["agreement"],
            "rm_gold_pairs": gold["rm_agreement_heldout_pairs"]["pairs"],
            "rm_gold_agreement_policy_samples": gold["rm_agreement_policy_samples"]["agreement"],
            "gold_curve_points": len(gold["curve"]), "overoptimisation_suspected": gold["flag"] is not None}


def counts_text(w: dict) -> str:
    """A win rate's counts in words: "81 wins, 1 loss", and its ties only when there are some."""
    plural = lambda n, one, many: f"{n} {one if n == 1 else many}"  # noqa: E731
    grouped = w.get("pairs", w.get("n")) != w.get("n")  # several pairs a prompt: the interval counts the prompts
    return (f"over {w['n']} prompts; of their {w['pairs']} pairs " if grouped else "") + ", ".join([plural(w["wins"], "win", "wins"), plural(w["losses"], "loss", "losses")]
                     + ([plural(w["ties"], "tie", "ties") + " counted half"] if w["ties"] else []))


def gold_markdown(gold: dict, figures: dict, reward_adapter: str | None = None) -> list[str]:
    """`reward_adapter`: the reward model the RL stages were given, which eval scores with: the held-out pairs are
    then the run's reward model's, which it may have trained on."""
    w, rm_h, rm_p = gold["win_rate"], gold["rm_agreement_heldout_pairs"], gold["rm_agreement_policy_samples"]
    pct = lambda v: f"{v:.1%}" if v is not None else "–"  # noqa: E731
    held_out = ("of the run's reward model's held-out pairs (the one the RL stages were given may have trained on "
                "them)" if reward_adapter else "of its held-out pairs")
    lines = ["## Gold judge", "",
             f"Judge `{gold['judge']}` ({describe_judge(gold['judge'])}): not the reward model PPO optimised, so it "
             f"measures learning independently.", "",
             "| | SFT | PPO |", "|---|---|---|",
             f"| gold score (mean) | {figures['gold_sft_mean']:.3f} | {figures['gold_ppo_mean']:.3f} |", "",
             f"**Gold win rate of PPO over SFT: {w['rate']:.1%}** (95% CI {w['ci_low']:.1%} – {w['ci_high']:.1%}, "
             f"Wilson; {counts_text(w)}).", "",
             f"Reward model agrees with the gold on {pct(rm_h['agreement'])} {held_out} whose gold scores "
             f"differ ({rm_h['pairs']} pairs), and on {pct(rm_p['agreement'])} of the SFT-vs-PPO pairs above "
             f"({rm_p['pairs']} pairs).", "",
             "| PPO update | policy | sqrt(KL) | reward model (proxy) | gold |", "|---|---|---|---|---|"]
    lines += [f"| {p['update']} | {p['policy']} | {p['sqrt_kl']:.3f} | {p['proxy_mean']:.3f} | {p['gold_mean']:.3f} |"
              for p in gold["curve"]]
    lines += ["", "![over-optimisation](plots/overoptimisation.png)", ""]
    return lines

# ---------------------------------------------------------------------------------------------------- report

def cell(text, limit: int = 160) -> str:
    """Model or prompt text as a table cell: on one line, cut to `limit` characters, then shown as itself (a reply's
    `*sigh*` or `<img src=...>` is text, not italics or an image; the report is published with the adapters)."""
    text = " ".join(str(text).split())
    return markdown_literal(text if len(text) <= limit else text[:limit - 1] + "…")


def sample_table(samples: list[dict]) -> list[str]:
    """The samples with their reward-model scores, and the gold judge's beside them when there is one."""
    gold = bool(samples) and "gold_sft" in samples[0]
    lines = ["| prompt | SFT response | PPO response | reward SFT | reward PPO |" + (" gold SFT | gold PPO |" if gold else ""),
             "|---|---|---|---|---|" + ("---|---|" if gold else "")]
    for s in samples:
        lines.append(f"| {cell(s['prompt_text'], 100)} | {cell(s['sft'])} | {cell(s['ppo'])} "
                     f"| {s['reward_sft']:.3f} | {s['reward_ppo']:.3f} |"
                     + (f" {s['gold_sft']:.3f} | {s['gold_ppo']:.3f} |" if gold else ""))
    return lines

def ppo_markdown(report: dict, n_rows: int) -> list[str]:
    f, w, t = report["figures"], report["win_rate"], report["training"]
    lines = ["## PPO against SFT", "",
             "| | SFT | PPO |", "|---|---|---|",
             f"| reward (mean ± std) | {f['reward_sft_mean']:.3f} ± {report['reward']['sft']['std']:.3f} "
             f"| {f['reward_ppo_mean']:.3f} ± {report['reward']['ppo']['std']:.3f} |",
             f"| reward (median) | {report['reward']['sft']['median']:.3f} | {report['reward']['ppo']['median']:.3f} |",
             f"| response length (tokens, mean) | {f['length_sft_mean']:.1f} | {f['length_ppo_mean']:.1f} |",
             f"| share without EOS | {f['no_eos_sft']:.1%} | {f['no_eos_ppo']:.1%} |",
             f"| KL to the SFT reference (nats/response) | 0.000 | {f['kl_mean']:.3f} |", ""]
    h = report.get("human")
    human = ([f"**Win rate judged by people: {h['rate']:.1%}** (95% CI {h['ci_low']:.1%} – {h['ci_high']:.1%}; "
              f"{h['pairs']} pairs, each counted once: the mean of its labels, {h['labels']} in all)." if h else
              f"Win rate judged by people: none yet. To get one, label the SFT-vs-PPO pairs of human_pairs.jsonl "
              f"(`make label RUN={report['run']} ARGS=\"--pairs_dataset runs/{report['run']}/eval/human_pairs.jsonl\"`), "
              f"then `make eval RUN={report['run']} FORCE=1`: it reads the labels back.", ""])
    if report.get("gold"):  # the measures PPO did not optimise first; the reward model's own verdict after them
        lines += gold_markdown(report["gold"], f, report.get("reward_adapter")) + human + ["## Under the reward model", ""]
    lines += [f"**Win rate of PPO over SFT under the reward model: {w['rate']:.1%}** "
              f"(95% CI {w['ci_low']:.1%} – {w['ci_high']:.1%}, Wilson; {counts_text(w)})"
              + (": the proxy PPO was trained to raise, so high by construction; the gold win rate above is the "
                 "measure of learning." if report.get("gold") else "."), ""]
    if not report.get("gold"):
        lines += human
    lines += ["## Reward hacking check", ""]
    c = report.get("comparison", {})
    ratio = f"{c['hacking_length_ratio']:g} times the" if "hacking_length_ratio" in c else "a multiplied"
    kl = f" ({c['hacking_kl']:g} nats)" if "hacking_kl" in c else ""
    lines += [f"- ⚠️ {flag}" for flag in report["flags"]] or [f"No sign of it: the reward did not rise together with "
                                                              f"{ratio} length, and KL stayed below the threshold{kl}"
                                                              + (", and the gold did not fall from its best point by "
                                                                 "more than about 2 paired standard errors while the "
                                                                 "reward model's score rose (the over-optimisation "
                                                                 "table above)." if report.get("gold") else ".")]
    if t.get("updates"):
        lines += ["", f"Training ({t['updates']} updates): reward {t.get('reward_raw_first', t.get('reward_first', float('nan'))):.3f} → "
                      f"{t.get('reward_raw_last', t.get('reward_last', float('nan'))):.3f}, "
                      + (f"KL {t['kl_first']:.3f} → {t['kl_last']:.3f}, " if "kl_first" in t else
                         "KL not measured (kl_coef 0: no reference model), ") +
                      f"length {t.get('response_length_first', float('nan')):.1f} → {t.get('response_length_last', float('nan')):.1f} "
                      "(means of the first and last tenth of the updates)."]
    lines += ["", "## Plots", "", "![training curves](plots/training_curves.png)", "",
              "![reward distribution](plots/reward_distribution.png)", "", "## Samples", "",
              *sample_table(report["samples"][::f.get("samples_per_prompt", 1)][:n_rows])]  # a prompt's first pair
    lines += ["", f"All {len(report['samples'])} samples are in report.json."]
    return lines

# ---------------------------------------------------------------------------------------------------- the PPO section

def final_update(manifest: dict) -> int:
    """The last update an RL stage logged (its final policy's place on the curve)."""
    rows = read_metrics(Path(manifest["outputs"]["metrics_jsonl"]))
    trained = (manifest.get("config") or {}).get("ppo", {})
    return max([r["update"] for r in rows if isinstance(r.get("update"), int)] or [trained.get("total_updates", 1)])


def sft_vs_ppo(judge, prompts, args: EvalArgs, ppo: dict, ppo_dir: Path, ro_sft: dict, ro_ppo: dict, kl: list[float],
               gold: dict | None, heldout: tuple, kept: list) -> dict:
    """The PPO report: figures, reward-hacking flags, gold report with PPO's over-optimisation curve, samples and the
    human win rate. `gold`: every policy's gold scores (None without a judge); `heldout`, `kept`: the gold report's
    model work (heldout_pair_rewards, kept_policy_samples). Returns report.json's PPO keys."""
    samples = [{"pair_id": pair_id(p, s, q), "prompt": p, "prompt_text": p[-1]["content"], "sft": s, "ppo": q,
                "reward_sft": rs, "reward_ppo": rp, "kl": k, "length_sft": ls, "length_ppo": lp,
                "eos_sft": es, "eos_ppo": ep}
               for p, s, q, rs, rp, k, ls, lp, es, ep in zip(prompts, ro_sft["texts"], ro_ppo["texts"], ro_sft["rewards"],
                                                              ro_ppo["rewards"], kl, ro_sft["lengths"], ro_ppo["lengths"],
                                                              ro_sft["ended"], ro_ppo["ended"])]
    wr = win_rate(ro_ppo["rewards"], ro_sft["rewards"], same_text=same_replies(ro_ppo["texts"], ro_sft["texts"]),
                  group=args.samples_per_prompt)
    figures = {"n_prompts": wr["n"], "samples_per_prompt": args.samples_per_prompt, "win_rate": wr["rate"], "win_rate_ci_low": wr["ci_low"], "win_rate_ci_high": wr["ci_high"],
               "reward_sft_mean": statistics.fmean(ro_sft["rewards"]), "reward_ppo_mean": statistics.fmean(ro_ppo["rewards"]),
               "kl_mean": statistics.fmean(kl),
               "length_sft_mean": statistics.fmean(ro_sft["lengths"]), "length_ppo_mean": statistics.fmean(ro_ppo["lengths"]),
               "no_eos_sft": 1 - statistics.fmean(ro_sft["ended"]), "no_eos_ppo": 1 - statistics.fmean(ro_ppo["ended"])}
    rows = read_metrics(Path(ppo["outputs"]["metrics_jsonl"]))
    train = training_summary(rows)
    flags = training_flags(train, args)  # main adds the held-out ones from the comparison
    gold_ppo = None
    if gold is not None:  # the gold judge: learning measured by something PPO did not optimise
        gold_ppo = gold_report(judge, prompts, args, heldout, kept, final_update(ppo), ro_sft, ro_ppo, kl, gold["sft"],
                               gold["ppo"])
        figures.update(gold_figures(gold_ppo))
        for sample, gs, gp in zip(samples, gold["sft"], gold["ppo"]):
            sample.update(gold_sft=gs, gold_ppo=gp)
    store = resolve_path(args.label_store) if args.label_store else ppo_dir.parent / "label" / "labels.sqlite"
    human = human_win_rate(store, {s["pair_id"]: 1 for s in samples[::args.samples_per_prompt]})  # the pairs written
    figures.update(human_win_rate=human["rate"] if human else None)
    return {"figures": figures, "win_rate": wr, "reward": {"sft": describe(ro_sft["rewards"]), "ppo": describe(ro_ppo["rewards"])},
            "kl": describe(kl), "training": train, "flags": flags, "human": human, "gold": gold_ppo, "samples": samples,
            "metrics_rows": rows}
