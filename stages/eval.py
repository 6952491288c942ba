"""Stage: did RLHF help? The PPO policy against the SFT policy on prompts PPO never trained on.

    make eval                        # accelerate launch ... -m stages.eval --config configs/eval.yaml --run $(RUN)
    make eval ARGS="--max_prompts 32 --temperature 0"

Reads the run's sft, rm and ppo manifests: the SFT adapter (also the KL reference), the PPO policy adapter, the
reward adapter, PPO's metrics.jsonl and its heldout_prompts.jsonl. All three adapters sit on one frozen base
(pipeline.adapters.AdapterStack). For every held-out prompt it samples one response from each policy (same seed),
scores both with the reward model, and measures the PPO policy's KL to the SFT reference on its own response.
Writes runs/<run>/eval/: report.md (numbers, flags, plots, samples), report.json (every figure and the samples
they were computed from), plots/*.png, manifest.json (last, with the headline figures).
"""

from __future__ import annotations

import json
import math
import sqlite3
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.adapters import AdapterStack
from pipeline.config import ConfigError, RunArgs, parse, resolve_path, to_dict
from pipeline.generation import SamplingConfig, chat_reward_inputs, encode_prompts, generate
from pipeline.models import load_base, load_tokenizer, profile_from, require_chat_template, to_device
from pipeline.report import finish_distributed, print_table
from pipeline.run import StageRun, atomic_write_json, main_guard
from pipeline.sharding import is_sharded, process_state, reshard, sharding_report, spread, take_over_from_accelerate

TRAINING_CURVES = [  # (metrics.jsonl keys, panel title): one panel each, first key solid, others dashed
    (("reward_raw", "reward"), "reward (RM score / shaped)"),
    (("kl", "kl_k3"), "KL to reference (nats)"),
    (("entropy",), "entropy (nats/token)"),
    (("response_length",), "response length (tokens)"),
]


@dataclass
class EvalArgs:
    # Prompts
    max_prompts: int = field(default=0, metadata={"help": "Held-out prompts to use (0 = all that PPO set aside)."})
    max_prompt_tokens: int = field(default=256, metadata={"help": "Longer prompts keep their end (the latest turn)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed; both policies sample with it."})
    score_batch_size: int = field(default=16, metadata={"help": "Rows per reward / KL forward pass."})
    # Report
    report_samples: int = field(default=8, metadata={"help": "Rows of the sample table in report.md (report.json keeps all)."})
    # Reward-hacking flags
    hacking_length_ratio: float = field(default=2.0, metadata={"help": "Flag a reward gain that came with responses this many times longer."})
    hacking_kl: float = field(default=10.0, metadata={"help": "Flag a KL to the reference above this many nats per response."})
    # Optional human win rate, read from the label store when SFT-vs-PPO pairs were labeled
    label_store: str = field(default="", metadata={"help": "labels.sqlite to read human SFT-vs-PPO labels from ('' = runs/<run>/label/labels.sqlite)."})


# ---------------------------------------------------------------------------------------------------- statistics

def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson 1927): sane at 0, 1 and small n, unlike p +- z*se."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(ppo: list[float], sft: list[float], tie_eps: float = 1e-6) -> dict:
    """PPO beats SFT on a prompt when its reward is higher; a tie (same text, same score) counts half."""
    wins = sum(p > s + tie_eps for p, s in zip(ppo, sft))
    losses = sum(p < s - tie_eps for p, s in zip(ppo, sft))
    ties = len(ppo) - wins - losses
    rate = (wins + 0.5 * ties) / len(ppo) if ppo else float("nan")
    low, high = wilson(wins + 0.5 * ties, len(ppo))
    return {"rate": rate, "ci_low": low, "ci_high": high, "ci": "Wilson 95%, ties counted half",
            "wins": wins, "ties": ties, "losses": losses, "n": len(ppo)}


def describe(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"n": len(xs), "mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "min": min(xs),
            "p25": q[0], "median": q[1], "p75": q[2], "max": max(xs)}


# ---------------------------------------------------------------------------------------------------- model work

@torch.no_grad()
def rollout(stack: AdapterStack, policy: str, tokenizer, prompts: list, prompt_ids, sampling: SamplingConfig, seed: int,
            batch: int) -> dict:
    """Sample one response per prompt from `policy`, then score it with the reward adapter."""
    stack.use(policy)
    gens = generate(stack.model, tokenizer, prompt_ids, sampling, generator_seed=seed)
    device = next(stack.model.parameters()).device
    # What the reward model reads: prompt + reply as an assistant turn, chat-templated as RewardTrainer trained it
    # and as PPO scored its rollouts (reward_input: chat).
    r_ids, r_mask = chat_reward_inputs(tokenizer, prompts, gens.texts)
    rewards = torch.cat(on_every_rank(stack.model, len(r_ids), batch, lambda i: stack.scores(
        "reward", r_ids[i:i + batch].to(device), r_mask[i:i + batch].to(device)).float().cpu()))
    return {"gens": gens, "rewards": rewards.tolist(), "texts": gens.texts,
            "lengths": gens.response_mask.sum(1).tolist(), "ended": gens.ended.tolist()}


@torch.no_grad()
def sequence_kl(stack: AdapterStack, policy: str, reference: str, ro: dict, batch: int, temperature: float) -> list[float]:
    """KL(policy || reference) of each response, in nats: the exact per-token KL over the vocabulary at every
    response position (given the sampled prefix), summed over the response. Lower variance than PPO's log-ratio
    estimate, same quantity: both distributions at the sampling temperature, as PPO's KL penalty compares them."""
    device = next(stack.model.parameters()).device
    gens = ro["gens"]
    all_ids = torch.cat([gens.prompt_ids, gens.response_ids], dim=1)
    all_mask = torch.cat([gens.prompt_mask, gens.response_mask], dim=1)
    start = gens.prompt_ids.shape[1]  # logits at start-1 .. T-2 predict the response tokens
    resp_mask = gens.response_mask
    t = temperature if temperature > 0 else 1.0

    def one_batch(i: int) -> list[float]:
        ids, mask = all_ids[i:i + batch].to(device), all_mask[i:i + batch].to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as generate() used them
        logp = torch.log_softmax(stack.logits(policy, ids, mask, position_ids=pos)[:, start - 1:-1].float() / t, -1)
        logq = torch.log_softmax(stack.logits(reference, ids, mask, position_ids=pos)[:, start - 1:-1].float() / t, -1)
        per_token = (logp.exp() * (logp - logq)).sum(-1)
        return (per_token * resp_mask[i:i + batch].to(device)).sum(1).cpu().tolist()

    return [kl for part in on_every_rank(stack.model, len(all_ids), batch, one_batch) for kl in part]


def on_every_rank(model, n_rows: int, batch: int, run_rows) -> list:
    """run_rows(first_row) for each batch of `batch` rows, spread over the ranks and gathered in order on every rank
    (pipeline.sharding.spread); a sharded model is left resharded."""
    starts = list(range(0, n_rows, batch))
    out = spread(len(starts), lambda b: run_rows(starts[b]))
    if is_sharded(model):
        reshard(model)
    return out


# ---------------------------------------------------------------------------------------------------- training curves

def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"PPO metrics file {path} is missing: rerun `make ppo`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def hacking_flags(train: dict, figures: dict, args: EvalArgs) -> list[str]:
    """Signs that the policy found a way to please the reward model rather than to answer better."""
    flags = []
    r0, r1 = train.get("reward_raw_first", train.get("reward_first")), train.get("reward_raw_last", train.get("reward_last"))
    l0, l1 = train.get("response_length_first"), train.get("response_length_last")
    if None not in (r0, r1, l0, l1) and r1 > r0 and l0 > 0 and l1 >= args.hacking_length_ratio * l0:
        flags.append(f"training: the reward rose ({r0:.3f} -> {r1:.3f}) while responses grew {l1 / l0:.1f}x "
                     f"({l0:.1f} -> {l1:.1f} tokens): likely reward hacking through length")
    if train.get("kl_max") is not None and train["kl_max"] > args.hacking_kl:
        flags.append(f"training: KL to the reference reached {train['kl_max']:.2f} nats (threshold {args.hacking_kl}): "
                     f"the policy drifted far from SFT; read the samples before trusting the reward")
    ls, lp = figures["length_sft_mean"], figures["length_ppo_mean"]
    if figures["reward_ppo_mean"] > figures["reward_sft_mean"] and ls > 0 and lp >= args.hacking_length_ratio * ls:
        flags.append(f"held-out: PPO scores higher but its responses are {lp / ls:.1f}x as long as SFT's "
                     f"({ls:.1f} -> {lp:.1f} tokens): likely reward hacking through length")
    if figures["kl_mean"] > args.hacking_kl:
        flags.append(f"held-out: mean KL to the reference is {figures['kl_mean']:.2f} nats (threshold {args.hacking_kl})")
    return flags


# ---------------------------------------------------------------------------------------------------- human labels

def pair_id(prompt, sft: str, ppo: str) -> str:
    """Stable id of one SFT-vs-PPO pair, so labels given to exactly these texts can be found again."""
    import hashlib

    return "eval-" + hashlib.sha1(json.dumps([prompt, sft, ppo]).encode()).hexdigest()[:16]


def human_win_rate(store: Path, pairs: dict[str, int]) -> dict | None:
    """Win rate of PPO judged by people: labels in the label store on our pairs (responses = [SFT, PPO]).
    `pairs` maps pair_id -> index of the PPO response. Ties and 'both bad' count half. None when nobody labeled."""
    if not store.is_file() or not pairs:
        return None
    con = sqlite3.connect(store, timeout=30.0)  # read only; the labeling app may be writing (WAL)
    try:
        marks = ",".join("?" * len(pairs))
        rows = con.execute(f"SELECT pair_id, preferred FROM labels WHERE pair_id IN ({marks})", list(pairs)).fetchall()
    except sqlite3.Error:
        return None
    finally:
        con.close()
    if not rows:
        return None
    wins = sum(p is not None and p == pairs[pid] for pid, p in rows)
    ties = sum(p is None for _, p in rows)
    low, high = wilson(wins + 0.5 * ties, len(rows))
    return {"rate": (wins + 0.5 * ties) / len(rows), "ci_low": low, "ci_high": high, "labels": len(rows),
            "pairs": len({pid for pid, _ in rows}), "wins": wins, "ties_or_both_bad": ties}


# ---------------------------------------------------------------------------------------------------- plots

def plot_training(ax_list, rows: list[dict]) -> None:
    x = [r.get("update", i) for i, r in enumerate(rows)]
    for ax, (keys, title) in zip(ax_list, TRAINING_CURVES):
        for j, key in enumerate(keys):
            ys = [r.get(key) for r in rows]
            if any(isinstance(y, (int, float)) for y in ys):
                ax.plot(x, [y if isinstance(y, (int, float)) else float("nan") for y in ys],
                        linestyle="-" if j == 0 else "--", label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO update")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)


def plot_hist(ax, sft: list[float], ppo: list[float], what: str = "reward", unit: str = "reward-model score") -> None:
    lo, hi = min(sft + ppo), max(sft + ppo)
    bins = [lo + (hi - lo) * i / 20 for i in range(21)] if hi > lo else 10
    ax.hist(sft, bins=bins, alpha=0.55, label=f"SFT (mean {statistics.fmean(sft):.3f})")
    ax.hist(ppo, bins=bins, alpha=0.55, label=f"PPO (mean {statistics.fmean(ppo):.3f})")
    ax.set_title(f"{what} on held-out prompts", fontsize=10)
    ax.set_xlabel(unit)
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)


def save_plots(rows: list[dict], sft: dict, ppo: dict, out: Path) -> dict[str, Path]:
    """`sft`, `ppo`: the rollouts (rewards and lengths per held-out prompt)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training boxes
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"training_curves": out / "training_curves.png", "reward_distribution": out / "reward_distribution.png",
             "overview": out / "overview.png"}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    plot_training(axes.flat, rows)
    fig.tight_layout()
    fig.savefig(paths["training_curves"], dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_hist(ax, sft["rewards"], ppo["rewards"])
    fig.tight_layout()
    fig.savefig(paths["reward_distribution"], dpi=110)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))  # everything in one picture, for the README
    plot_training([axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]], rows)
    plot_hist(axes[0, 2], sft["rewards"], ppo["rewards"])
    plot_hist(axes[1, 2], [float(x) for x in sft["lengths"]], [float(x) for x in ppo["lengths"]], "response length", "tokens")
    fig.tight_layout()
    fig.savefig(paths["overview"], dpi=80)
    plt.close("all")
    return paths


# ---------------------------------------------------------------------------------------------------- report

def cell(text, limit: int = 160) -> str:
    text = str(text).replace("\n", " ").replace("|", "\\|").strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def render_markdown(report: dict, n_rows: int) -> str:
    f, w, t = report["figures"], report["win_rate"], report["training"]
    lines = [f"# Evaluation of run `{report['run']}`", "",
             f"{f['n_prompts']} held-out prompts (never used in PPO), one sampled response per policy "
             f"(temperature {report['sampling']['temperature']}, at most {report['sampling']['max_new_tokens']} new tokens, "
             f"seed {report['seed']}), scored by the run's reward model.", "",
             "| | SFT | PPO |", "|---|---|---|",
             f"| reward (mean ± std) | {f['reward_sft_mean']:.3f} ± {report['reward']['sft']['std']:.3f} "
             f"| {f['reward_ppo_mean']:.3f} ± {report['reward']['ppo']['std']:.3f} |",
             f"| reward (median) | {report['reward']['sft']['median']:.3f} | {report['reward']['ppo']['median']:.3f} |",
             f"| response length (tokens, mean) | {f['length_sft_mean']:.1f} | {f['length_ppo_mean']:.1f} |",
             f"| share without EOS | {f['no_eos_sft']:.1%} | {f['no_eos_ppo']:.1%} |",
             f"| KL to the SFT reference (nats/response) | 0 | {f['kl_mean']:.3f} |", "",
             f"**Win rate of PPO over SFT under the reward model: {w['rate']:.1%}** "
             f"(95% CI {w['ci_low']:.1%} – {w['ci_high']:.1%}, Wilson; {w['wins']} wins, {w['ties']} ties counted half, "
             f"{w['losses']} losses).", ""]
    h = report.get("human")
    lines += [f"**Win rate judged by people: {h['rate']:.1%}** (95% CI {h['ci_low']:.1%} – {h['ci_high']:.1%}; "
              f"{h['labels']} labels on {h['pairs']} pairs)." if h else
              f"Win rate judged by people: none yet. To get one, label the SFT-vs-PPO pairs of human_pairs.jsonl "
              f"(`make label RUN={report['run']} ARGS=\"--pairs_dataset runs/{report['run']}/eval/human_pairs.jsonl\"`), "
              f"then delete runs/{report['run']}/eval/manifest.json and `make eval` again: it reads the labels back.", ""]
    lines += ["## Reward hacking check", ""]
    lines += [f"- ⚠️ {flag}" for flag in report["flags"]] or ["No sign of it: the reward did not rise together with a "
                                                              "doubled length, and KL stayed below the threshold."]
    if t.get("updates"):
        lines += ["", f"Training ({t['updates']} updates): reward {t.get('reward_raw_first', t.get('reward_first', float('nan'))):.3f} → "
                      f"{t.get('reward_raw_last', t.get('reward_last', float('nan'))):.3f}, "
                      f"KL {t.get('kl_first', float('nan')):.3f} → {t.get('kl_last', float('nan')):.3f}, "
                      f"length {t.get('response_length_first', float('nan')):.1f} → {t.get('response_length_last', float('nan')):.1f} "
                      "(means of the first and last tenth of the updates)."]
    lines += ["", "## Plots", "", "![training curves](plots/training_curves.png)", "",
              "![reward distribution](plots/reward_distribution.png)", "", "## Samples", "",
              "| prompt | SFT response | PPO response | reward SFT | reward PPO |", "|---|---|---|---|---|"]
    for s in report["samples"][:n_rows]:
        lines.append(f"| {cell(s['prompt_text'], 100)} | {cell(s['sft'])} | {cell(s['ppo'])} "
                     f"| {s['reward_sft']:.3f} | {s['reward_ppo']:.3f} |")
    lines += ["", f"All {len(report['samples'])} samples are in report.json."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- the stage

def load_prompts(path: Path, max_prompts: int) -> list[list[dict]]:
    if not path.is_file():
        raise ConfigError(f"held-out prompts {path} are missing: rerun `make ppo`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}] for r in rows]
    if not prompts:
        raise ConfigError(f"{path} holds no prompts: PPO set none aside (raise its held-out share) and rerun `make ppo`")
    return prompts[:max_prompts] if max_prompts > 0 else prompts


def main(args: EvalArgs, sampling: SamplingConfig, run: RunArgs) -> dict:
    state = process_state()
    shard = take_over_from_accelerate()  # FSDP config: the base is loaded sharded over the ranks (pipeline.sharding)
    stage = StageRun("eval", run.run, run.runs_dir)
    config = {"eval": to_dict(args), "sampling": to_dict(sampling), "run": to_dict(run)}
    ppo = stage.need("ppo")  # first: the missing stage named in the error is the one `make eval` depends on
    sft, rm = stage.need("sft"), stage.need("rm")
    prompts = load_prompts(Path(ppo["outputs"]["heldout_prompts"]), args.max_prompts)
    rows = read_metrics(Path(ppo["outputs"]["metrics_jsonl"]))
    trained = (ppo.get("config") or {}).get("ppo", {})
    for ours, theirs in (("max_new_tokens", "response_length"), ("temperature", "temperature")):
        if theirs in trained and trained[theirs] != getattr(sampling, ours) and state.is_main_process:
            print(f"note: eval samples with {ours}={getattr(sampling, ours)}, PPO's rollouts used {theirs}={trained[theirs]}: "
                  f"length, no-EOS share and KL are not comparable with the training curves", file=sys.stderr)
    profile = profile_from(run.model_config)
    tokenizer = load_tokenizer(profile)
    require_chat_template(tokenizer, profile)  # prompts are chats: refuse a template-less base before writing anything
    stage.prepare(config, is_main=state.is_main_process)

    # 1. The three adapters on one frozen base (sharded under the FSDP config), on this process's accelerator. Every
    #    rank takes part from here: the batches of generation, scoring and KL are spread over the ranks.
    stack = AdapterStack.build(profile, tokenizer, {"ppo": ppo["outputs"]["adapter"], "sft": sft["outputs"]["adapter"],
                                                    "reward": rm["outputs"]["adapter"]},
                               base_model=load_base(profile, tokenizer, shard=shard))
    to_device(stack.model, state.device)
    prompt_ids = encode_prompts(tokenizer, prompts, args.max_prompt_tokens)

    # 2. Sample and score both policies; KL of PPO to the reference on PPO's own responses
    ro_sft = rollout(stack, "sft", tokenizer, prompts, prompt_ids, sampling, args.seed, args.score_batch_size)
    ro_ppo = rollout(stack, "ppo", tokenizer, prompts, prompt_ids, sampling, args.seed, args.score_batch_size)
    kl = sequence_kl(stack, "ppo", "sft", ro_ppo, args.score_batch_size, sampling.temperature)
    sharding = sharding_report(stack.model)
    if not state.is_main_process:  # the main process writes the report
        finish_distributed()
        return {}

    # 3. Figures, all computed from the per-prompt samples that report.json keeps
    samples = [{"pair_id": pair_id(p, s, q), "prompt": p, "prompt_text": p[-1]["content"], "sft": s, "ppo": q,
                "reward_sft": rs, "reward_ppo": rp, "kl": k, "length_sft": ls, "length_ppo": lp,
                "eos_sft": es, "eos_ppo": ep}
               for p, s, q, rs, rp, k, ls, lp, es, ep in zip(prompts, ro_sft["texts"], ro_ppo["texts"], ro_sft["rewards"],
                                                              ro_ppo["rewards"], kl, ro_sft["lengths"], ro_ppo["lengths"],
                                                              ro_sft["ended"], ro_ppo["ended"])]
    wr = win_rate(ro_ppo["rewards"], ro_sft["rewards"])
    figures = {"n_prompts": len(samples), "win_rate": wr["rate"], "win_rate_ci_low": wr["ci_low"], "win_rate_ci_high": wr["ci_high"],
               "reward_sft_mean": statistics.fmean(ro_sft["rewards"]), "reward_ppo_mean": statistics.fmean(ro_ppo["rewards"]),
               "kl_mean": statistics.fmean(kl),
               "length_sft_mean": statistics.fmean(ro_sft["lengths"]), "length_ppo_mean": statistics.fmean(ro_ppo["lengths"]),
               "no_eos_sft": 1 - statistics.fmean(ro_sft["ended"]), "no_eos_ppo": 1 - statistics.fmean(ro_ppo["ended"])}
    train = training_summary(rows)
    flags = hacking_flags(train, figures, args)
    store = resolve_path(args.label_store) if args.label_store else stage.dir.parent / "label" / "labels.sqlite"
    human = human_win_rate(store, {s["pair_id"]: 1 for s in samples})
    figures.update(reward_hacking_suspected=bool(flags), human_win_rate=human["rate"] if human else None)

    # 4. Plots, report, the SFT-vs-PPO pairs for people to label (responses = [SFT, PPO]), manifest
    plots = save_plots(rows, ro_sft, ro_ppo, stage.dir / "plots")
    report = {"run": run.run, "seed": args.seed, "sampling": to_dict(sampling), "figures": figures, "win_rate": wr,
              "reward": {"sft": describe(ro_sft["rewards"]), "ppo": describe(ro_ppo["rewards"])}, "kl": describe(kl),
              "training": train, "flags": flags, "human": human,
              "plots": {k: str(v.relative_to(stage.dir)) for k, v in plots.items()}, "samples": samples}
    atomic_write_json(stage.dir / "report.json", report)
    (stage.dir / "report.md").write_text(render_markdown(report, args.report_samples))
    with open(stage.dir / "human_pairs.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps({"pair_id": s["pair_id"], "prompt": s["prompt"], "responses": [s["sft"], s["ppo"]],
                                "policies": ["sft", "ppo"]}) + "\n")
    print_table("eval", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()})
    for flag in flags:
        print(f"warning: {flag}")
    stage.finish({"report": stage.dir / "report.md", "report_json": stage.dir / "report.json",
                  "human_pairs": stage.dir / "human_pairs.jsonl", **{f"plot_{k}": v for k, v in plots.items()}},
                 {**figures, "world_size": state.num_processes, "sharding": sharding}, config)
    finish_distributed()
    return figures


def CONFIG_CLASSES():
    return (EvalArgs, SamplingConfig, RunArgs)


def parse_args(argv=None):
    return parse(CONFIG_CLASSES(), argv)


if __name__ == "__main__":
    main_guard(lambda: main(*parse_args()))
