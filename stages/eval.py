"""Stage: did RLHF help, and which method helped most? Every policy of the run against SFT and each other, on prompts
none of them trained on.

    make eval                        # accelerate launch ... -m stages.eval --config configs/eval.yaml --run $(RUN)
    make eval ARGS="--max_prompts 32 --temperature 0"

Reads the run's sft and rm manifests and every policy stage's that exists (ppo, grpo, rloo, reinforce_pp, dpo;
stages/eval_compare.py), with the held-out prompts the RL stages set aside (identical across them, or refused). All
adapters sit on one frozen base (pipeline.adapters.AdapterStack). For every held-out prompt it samples
`samples_per_prompt` responses from each policy (same seed), scores each with the reward model and measures the
policy's KL to the SFT reference on its own response. The comparison: each policy's proxy (reward model) and gold mean, KL, length and share without EOS,
the pairwise win-rate matrices (Wilson intervals) and one plot of gold score against sqrt(KL) with a series per method
(stages/eval_plots.py). With PPO it also writes the SFT-vs-PPO report of earlier versions (stages/eval_ppo.py):
training curves, reward-hacking flags, the human win rate's pairs. Writes runs/<run>/eval/: report.md, report.json (every figure and the
samples it was computed from; for a kept policy along a gold curve, its per-prompt proxy and gold scores and mean KL,
not its responses), plots/*.png, manifest.json (last, with the headline figures).

With a gold judge (`gold_judge:`, pipeline/judges.py; never a reward model the run optimised) it also reports the gold
win rate of PPO over SFT, how often the reward model orders held-out pairs as the gold does, and over-optimisation
curves: gold and proxy score against sqrt(KL) for SFT, every policy an RL stage kept under
runs/<run>/<stage>/policies/update-N/, and its final policy. PPO's proxy rising while its gold falls is flagged.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.adapters import AdapterStack, fp32_head, reward_members
from pipeline.config import ConfigError, RunArgs, parse, resolve_path, to_dict
from pipeline.data import prompt_problem, read_jsonl, score_each_once
from pipeline.generation import (SamplingConfig, chat_reward_inputs, encode_prompts, generate, reply_closing_tokens,
                                 right_pad)
from pipeline.models import (base_config, check_context, launch_autocast, load_base, load_tokenizer, profile_from, require_chat_template,
                             to_device)
from pipeline.report import finish_distributed, print_table
from pipeline.run import StageRun, atomic_write_json, main_guard
from pipeline.sharding import (is_sharded, process_state, require_shared_runs_dir, reshard, sharding_report, spread,
                              take_over_from_accelerate)
from stages.eval_compare import (RL_STAGES, comparison_figures, comparison_markdown, find_policy_stages, policy_flags,
                                 policy_method, policy_row, responses_per_prompt, shared_heldout_prompts, win_rate_matrix)
from stages.eval_plots import plot_gold_vs_kl, plot_overoptimisation, save_plots
from stages.eval_ppo import checkpoint_curve, curve_point, final_update, ppo_markdown, sft_vs_ppo
from stages.resume import drop_sampled_batches, sampled_batches

@dataclass
class EvalArgs:
    # Prompts
    max_prompts: int = field(default=0, metadata={"help": "Held-out prompts to use (0 = all that PPO set aside)."})
    max_prompt_tokens: int = field(default=256, metadata={"help": "Longer prompts keep their end (the latest turn)."})
    samples_per_prompt: int = field(default=1, metadata={"help": "Responses each policy samples per prompt: win rates "
                                    "average each prompt's pairs (row j of one policy against row j of the other), "
                                    "their intervals take the pairs' effective number (a prompt's pairs are alike)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed; both policies sample with it."})
    score_batch_size: int = field(default=16, metadata={"help": "Rows per reward / KL forward pass."})
    # Report
    report_samples: int = field(default=8, metadata={"help": "Rows of the sample table in report.md (report.json keeps all)."})
    # Reward-hacking flags
    hacking_length_ratio: float = field(default=2.0, metadata={"help": "Flag a reward gain that came with responses this many times longer."})
    hacking_kl: float = field(default=10.0, metadata={"help": "Flag a KL to the reference above this many nats per response."})
    # Optional human win rate, read from the label store when SFT-vs-PPO pairs were labeled
    label_store: str = field(default="", metadata={"help": "labels.sqlite to read human SFT-vs-PPO labels from ('' = runs/<run>/label/labels.sqlite)."})
    # Gold judge: a measure of learning that is not the reward model PPO optimised (pipeline/judges.py)
    gold_judge: str = field(default="", metadata={"help": "sentiment, rm:<adapter or checkpoint>, module:function; '' = none."})
    gold_batch_size: int = field(default=64, metadata={"help": "Responses per gold judge call."})

    def __post_init__(self):
        if self.label_store and not resolve_path(self.label_store).is_file():  # named, so the human win rate is wanted
            raise ValueError(f"label_store {self.label_store} does not exist: give the labels.sqlite that `make label` "
                             f"wrote, or leave it empty for the run's own")


# ---------------------------------------------------------------------------------------------------- model work

@torch.no_grad()
def rollout(stack: AdapterStack, policy: str, tokenizer, prompts: list, prompt_ids, sampling: SamplingConfig, seed: int,
            batch: int, batches_store=None, max_prompt_tokens: int | None = None) -> dict:
    """Sample one response per row of `prompts` from `policy` (the batches an interrupted run kept: `batches_store`,
    stages.resume.SampledBatches), then score it with the reward adapter."""
    stack.use(policy)
    gens = generate(stack.model, tokenizer, prompt_ids, sampling, generator_seed=seed, progress=True,
                    batches_store=batches_store)
    device = next(stack.model.parameters()).device
    # What the reward model reads: prompt + reply as an assistant turn, chat-templated as RewardTrainer trained it
    # and as PPO scored its rollouts (reward_input: chat).
    r_ids, r_mask, r_starts = chat_reward_inputs(tokenizer, prompts, gens.texts, max_prompt_tokens)  # as sampled from
    rewards = torch.cat(on_every_rank(stack.model, len(r_ids), batch, lambda i: stack.scores(
        "reward", r_ids[i:i + batch].to(device), r_mask[i:i + batch].to(device), r_starts[i:i + batch]).float().cpu()))
    return {"gens": gens, "rewards": finite(rewards.tolist(), f"the reward model's score of {policy}'s response"),
            "texts": gens.texts, "lengths": gens.response_mask.sum(1).tolist(), "ended": gens.ended.tolist()}


def finite(values: list[float], what: str) -> list[float]:
    """`values`, each a finite number: a NaN compared as a tie in every win rate and agreement, and switched the KL
    and over-optimisation flags off, under a report of normal-looking numbers."""
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise ConfigError(f"{what} {bad} is {values[bad]}: the adapters that computed it are broken (a diverged "
                          f"training run, or an overflow in half precision): retrain them, or evaluate in float32")
    return values


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
    t = temperature if temperature > 0 else 1.0  # greedy: no sampling distribution; the report says so (GREEDY_KL_NOTE)

    def one_batch(i: int) -> list[float]:
        ids, mask = all_ids[i:i + batch].to(device), all_mask[i:i + batch].to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as generate() used them
        logp = torch.log_softmax(stack.logits(policy, ids, mask, position_ids=pos)[:, start - 1:-1].float() / t, -1)
        logq = torch.log_softmax(stack.logits(reference, ids, mask, position_ids=pos)[:, start - 1:-1].float() / t, -1)
        per_token = (logp.exp() * (logp - logq)).sum(-1)
        return (per_token * resp_mask[i:i + batch].to(device)).sum(1).cpu().tolist()

    return finite([kl for part in on_every_rank(stack.model, len(all_ids), batch, one_batch) for kl in part],
                  f"the KL of {policy} to {reference} on response")


def on_every_rank(model, n_rows: int, batch: int, run_rows) -> list:
    """run_rows(first_row) for each batch of `batch` rows, spread over the ranks and gathered in order on every rank
    (pipeline.sharding.spread); a sharded model is left resharded."""
    starts = list(range(0, n_rows, batch))
    out = spread(len(starts), lambda b: run_rows(starts[b]))
    if is_sharded(model):
        reshard(model)
    return out


# ---------------------------------------------------------------------------------------------------- gold judge: model work

def read_rm_eval_pairs(rm: dict) -> list[dict]:
    """The reward model's held-out preference pairs (rm stage's eval_pairs.jsonl): prompts it never trained on."""
    path = rm.get("outputs", {}).get("eval_pairs")
    if not path or not Path(path).is_file():
        return []
    text = lambda x: x if isinstance(x, str) else x[-1]["content"]  # noqa: E731 (a reply: text or [assistant message])
    pairs = []
    for n, r in read_jsonl(Path(path)):  # a damaged line: one ConfigError naming the file and the line
        try:
            pairs.append({"prompt": r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}],
                          "chosen": text(r["chosen"]), "rejected": text(r["rejected"])})
            if "chosen_ids" in r:  # as the rm stage scored them: templated as it trained, cut to its max_length
                pairs[-1].update(chosen_ids=[int(t) for t in r["chosen_ids"]],
                                 rejected_ids=[int(t) for t in r["rejected_ids"]], reply_start=int(r["reply_start"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise ConfigError(f"the reward model's held-out pairs {path} line {n} is not a preference pair: rerun "
                              f"`make rm`") from None
    return pairs


@torch.no_grad()
def padded_reward_scores(stack: AdapterStack, ids, mask, starts, batch: int) -> list[float]:
    """The reward model's score of right-padded rows, each reply from its `starts`, in batches over every rank."""
    device = next(stack.model.parameters()).device
    return torch.cat(on_every_rank(stack.model, len(ids), batch, lambda i: stack.scores(
        "reward", ids[i:i + batch].to(device), mask[i:i + batch].to(device), starts[i:i + batch]).float().cpu())).tolist()


def reward_scores(stack: AdapterStack, tokenizer, prompts: list, texts: list[str], batch: int) -> list[float]:
    return padded_reward_scores(stack, *chat_reward_inputs(tokenizer, prompts, texts), batch)


def token_scores(stack: AdapterStack, seqs: list[list[int]], starts: list[int], pad_id: int, batch: int) -> list[float]:
    """The reward model's score of token sequences as given (each reply starting at its `starts`)."""
    return padded_reward_scores(stack, *right_pad(seqs, pad_id), torch.tensor(starts, dtype=torch.long), batch)


def heldout_pair_rewards(stack: AdapterStack, tokenizer, rm: dict, batch: int) -> tuple[list[dict], list[float], list[float]]:
    """The reward model's held-out pairs (rm stage's eval_pairs.jsonl) and its scores of their chosen and rejected
    replies: the model work of the RM-vs-gold agreement, done by every rank. Scored as the rm stage scored them, from
    the token ids it kept: templated again from the text, a pair past its max_length was scored on tokens it never
    trained on, and past the base's positions (a long assistant-recipe reply on GPT-2) crashed. Pairs without ids
    (another tool's file) are templated here."""
    held = read_rm_eval_pairs(rm)
    if not held:
        return [], [], []
    if all("chosen_ids" in r for r in held):
        asked = [(r[f"{side}_ids"], r["reply_start"]) for side in ("chosen", "rejected") for r in held]
        scored = score_each_once(asked, lambda distinct: token_scores(
            stack, [s for s, _ in distinct], [start for _, start in distinct], tokenizer.pad_token_id, batch),
            key=json.dumps)
    else:
        asked = [(r["prompt"], r[side]) for side in ("chosen", "rejected") for r in held]
        scored = score_each_once(asked, lambda distinct: reward_scores(stack, tokenizer, [p for p, _ in distinct],
                                                                       [t for _, t in distinct], batch), key=json.dumps)
    finite(scored, "the reward model's score of held-out reply")
    return held, scored[:len(held)], scored[len(held):]


def policy_checkpoints(ppo_dir: Path) -> list[tuple[int, Path]]:
    """PPO policies kept during training: runs/<run>/ppo/policies/update-N/ (stock PEFT folders), by update."""
    found = []
    for d in (ppo_dir / "policies").glob("update-*"):
        tail = d.name.split("-", 1)[1]
        if tail.isdigit() and (d / "adapter_config.json").is_file():
            found.append((int(tail), d))
    return sorted(found)


def kept_policy_samples(stack: AdapterStack, tokenizer, prompts, prompt_ids, sampling: SamplingConfig, args: EvalArgs,
                        stage_dir: Path, final_update: int, keep=lambda name: None) -> list[tuple[int, str, dict, list[float]]]:
    """(update, name, samples, KL to SFT) of each policy an RL stage kept (`stage_dir`: ppo, grpo, ...) between SFT and
    its final policy: the model work of its over-optimisation curve, done by every rank. `keep`: name -> where that
    policy's sampled batches are kept (rollout)."""
    from pipeline.models import check_adapter

    kept = []
    for update, path in policy_checkpoints(stage_dir):
        if update == 0 or update >= final_update:  # SFT and the final policy are the two ends, measured already
            continue
        name = f"update-{update}"
        check_adapter(path, stack.causal_lm.config, what=f"kept policy {path}")
        stack.model.load_adapter(str(path), adapter_name=name)  # on a sharded base: whole on every rank, as the others
        ro = rollout(stack, name, tokenizer, prompts, prompt_ids, sampling, args.seed, args.score_batch_size,
                     keep(f"{stage_dir.name}-{name}"), args.max_prompt_tokens)
        kept.append((update, name, ro, sequence_kl(stack, name, "sft", ro, args.score_batch_size, sampling.temperature)))
        stack.use("sft")
        stack.model.delete_adapter(name)
    return kept


def optimised_reward(rm: dict, trained: dict[str, dict]) -> tuple[dict, list, str | None]:
    """The reward model the RL stages optimised, which eval scores with (its "proxy"): the rm stage's (one model, or
    its ensemble scored as PPO scored it), or the `reward_adapter` they were given instead (unnormalised, as PPO takes
    it). Returns (adapters, their score stats, that reward_adapter or None). Stages rewarded by different models
    cannot share one reward column: refused."""
    given = {name: cfg.get("reward_adapter") or None for name, cfg in trained.items()}
    if len(set(given.values())) > 1:
        raise ConfigError("the run's RL stages were rewarded by different reward models ("
                          + ", ".join(f"{n}: {a or 'the rm stage'}" for n, a in given.items()) + "): eval scores them all "
                          "with one, so evaluate them in separate runs, or retrain them with the same reward")
    adapter = next(iter(given.values()), None)
    if adapter:
        return {"reward": resolve_path(adapter)}, [(0.0, 1.0)], adapter
    return (*reward_members(rm), None)


def started_from(sft: dict, trained: dict[str, dict], policies: dict) -> tuple[str, str | None]:
    """The SFT policy the run's policies started from, which eval compares them with (win rates, KL to the reference):
    the sft stage's adapter, or the `sft_adapter` the RL stages were given instead. Returns (that adapter, the given
    one or None). Policies that started from different SFT policies (DPO starts from the sft stage's) cannot share one
    baseline: refused."""
    given = {name: cfg.get("sft_adapter") or None for name, cfg in trained.items()}
    given.update({name: None for name in policies if name not in trained})  # DPO: the run's own SFT
    if len({*given.values()}) > 1:
        raise ConfigError("the run's policies started from different SFT adapters ("
                          + ", ".join(f"{n}: {a or 'the sft stage'}" for n, a in given.items()) + "): eval compares "
                          "them all with one, so evaluate them in separate runs, or retrain them from the same one")
    adapter = next(iter(given.values()), None)
    return (str(resolve_path(adapter)), adapter) if adapter else (sft["outputs"]["adapter"], None)


def load_gold_judge(args: EvalArgs, rm: dict, trained_configs: list[dict], prompts: list):
    """The configured gold judge, refusing the reward model any RL stage optimised, tried on two rows so that a judge
    that fails says so before anything is written. None without one."""
    from pipeline.judges import judge_scores, load_judge

    if not args.gold_judge:
        return None
    members = list(reward_members(rm)[0].values()) if rm.get("outputs", {}).get("adapter") else []
    own = [p for p in (*members, *(c.get("reward_adapter") for c in trained_configs)) if p]
    judge = load_judge(args.gold_judge, forbidden_rm=[resolve_path(p) for p in own])
    judge_scores(judge, prompts[:2], ["It was a lovely day.", "It was a dreadful day."][:len(prompts[:2])])
    return judge


# ---------------------------------------------------------------------------------------------------- report

GREEDY_KL_NOTE = ("Greedy decoding (temperature 0) samples from no distribution: the KL figures here are those of "
                  "the temperature-1 distributions, summed along the greedy responses, not the KL the policy trained "
                  "under.")

TRUNCATED_KL_NOTE = ("Sampled with top_p {top_p} / top_k {top_k}: the responses come from the truncated distributions, "
                     "while the KL figures (and the KL flag) are those of the whole softmax(logits / T), summed along "
                     "these responses: the KL the policy trained under only with top_p 1 and top_k 0.")


def render_markdown(report: dict, n_rows: int) -> str:
    lines = [f"# Evaluation of run `{report['run']}`", "",
             f"{report['figures']['n_prompts']} held-out prompts (never trained on), {responses_per_prompt(report['figures'])} "
             f"(temperature {report['sampling']['temperature']}, at most {report['sampling']['max_new_tokens']} new tokens, "
             f"seed {report['seed']}), scored by "
             + (f"the reward model the RL stages were given (`{report['reward_adapter']}`)" if report.get("reward_adapter")
                else "the run's reward model")
             + (f" (the mean of its {report['reward_models']} members' standardised scores, as PPO was rewarded)"
                if report.get("reward_models", 1) > 1 else "")
             + (", each summing its head over the reply's tokens (pooling `sum`)" if report.get("reward_pooling") == "sum" else "")
             + "." + (f" SFT here is the adapter the RL stages started from, given as `sft_adapter` "
                      f"(`{report['sft_adapter']}`), not the run's sft stage." if report.get("sft_adapter") else ""), ""]
    sampling = report["sampling"]
    if sampling["temperature"] == 0:
        lines += [GREEDY_KL_NOTE, ""]
    elif sampling.get("top_p", 1.0) < 1 or sampling.get("top_k", 0) > 0:
        lines += [TRUNCATED_KL_NOTE.format(top_p=sampling.get("top_p", 1.0), top_k=sampling.get("top_k", 0)), ""]
    lines += comparison_markdown(report["comparison"])
    if "win_rate" in report:  # the run has PPO
        lines += ppo_markdown(report, n_rows)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- the stage

def load_prompts(path: Path, max_prompts: int) -> list[list[dict]]:
    if not path.is_file():
        raise ConfigError(f"held-out prompts {path} are missing: rerun the RL stage that wrote them (`make ppo`)")
    prompts = []
    for n, row in read_jsonl(path):  # PPO wrote it; a file edited or damaged since is refused line by line
        prompt = row.get("prompt") if isinstance(row, dict) else None
        problem = prompt_problem(prompt)
        if problem:
            raise ConfigError(f"{path} line {n}: {problem}: fix that line, or rerun `make ppo` to write the file again")
        prompts.append([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                       else [{"role": m["role"], "content": m["content"]} for m in prompt])
    if not prompts:
        raise ConfigError(f"{path} holds no prompts: its RL stage set none aside (it holds out int(prompts x "
                          f"heldout_fraction), none of a few prompts: raise heldout_fraction or give it more prompts) "
                          f"and rerun it")
    return prompts[:max_prompts] if max_prompts > 0 else prompts


def compare_policies(judge, prompts, args: EvalArgs, policies: dict[str, dict], ro: dict, kl: dict, gold: dict | None,
                     kept: dict[str, list], ppo_curve: list[dict] | None, final_updates: dict[str, int]) -> dict:
    """Every policy on the same prompts: the table, the win-rate matrices (proxy, and gold with a judge) and the
    gold-vs-KL curves (an RL run's kept policies included, `kept`: kept_policy_samples by stage; PPO's curve is
    `ppo_curve` when already measured; `final_updates`: each RL stage's last update, where its final policy sits)."""
    names, group = ["sft", *policies], args.samples_per_prompt
    methods = {"sft": "sft", **{n: policy_method(n, m) for n, m in policies.items()}}
    comparison = {"policies": names, "n_prompts": len(prompts) // group, "samples_per_prompt": group, "seed": args.seed,
                  "hacking_kl": args.hacking_kl, "hacking_length_ratio": args.hacking_length_ratio,
                  "gold_judge": judge.spec if judge is not None else None,
                  "by_policy": {n: policy_row(methods[n], ro[n]["rewards"], gold[n] if gold else None, kl[n],
                                              ro[n]["lengths"], ro[n]["ended"]) for n in names},
                  "win_rate_proxy": win_rate_matrix({n: ro[n]["rewards"] for n in names},
                                                    texts={n: ro[n]["texts"] for n in names}, group=group),
                  "win_rate_gold": win_rate_matrix({n: gold[n] for n in names}, 0.0,
                                                   {n: ro[n]["texts"] for n in names}, group) if gold else None,
                  "samples": [{"prompt_text": p[-1]["content"], **{key: {n: vals[n][i] for n in names} for key, vals in
                               (("responses", {n: ro[n]["texts"] for n in names}), ("proxy", {n: ro[n]["rewards"] for n in names}),
                                ("gold", gold or {n: [None] * len(prompts) for n in names}), ("kl", kl))}}
                              for i, p in enumerate(prompts)]}
    curves: dict[str, list[dict]] = {}  # with a gold judge: each policy's gold-vs-KL points, per-prompt scores kept
    if gold is not None:
        sft_point = curve_point(0, "sft", ro["sft"]["rewards"], gold["sft"], kl["sft"], group)
        curves["sft"] = [sft_point]
        for name in policies:
            final = curve_point(final_updates.get(name, 1), f"{name} (final)", ro[name]["rewards"],
                                gold[name], kl[name], group)
            if name == "ppo" and ppo_curve is not None:
                curves[name] = ppo_curve
            elif name in RL_STAGES:
                curves[name] = checkpoint_curve(judge, prompts, args, kept[name], (sft_point, final))
            else:  # DPO keeps no policies along the way: its final one only
                curves[name] = [final]
        comparison["curves"] = curves  # with each point's per-prompt proxy and gold: its flag can be recomputed
    comparison["flags"] = policy_flags(comparison["by_policy"], args.hacking_kl, args.hacking_length_ratio, curves)
    return comparison


def main(args: EvalArgs, sampling: SamplingConfig, run: RunArgs) -> dict:
    state = process_state()
    shard = take_over_from_accelerate()  # FSDP config: the base is loaded sharded over the ranks (pipeline.sharding)
    stage = StageRun("eval", run.run, run.runs_dir)
    require_shared_runs_dir(run.runs_dir, "eval")  # several machines: one RUNS_DIR for all, or one line
    config = {"eval": to_dict(args), "sampling": to_dict(sampling), "run": to_dict(run)}
    policies = find_policy_stages(stage)  # first: with none, the error names `make ppo`, which `make eval` depends on
    sft, rm = stage.need("sft"), stage.need("rm")
    prompts = load_prompts(shared_heldout_prompts(policies), args.max_prompts)  # the same for every policy, or refused
    # From here a prompt is `samples_per_prompt` rows in a row: every policy samples each of them once (one sample a
    # prompt made the gold win rate of one policy move 0.80-0.92 with eval's seed alone)
    prompts = [p for p in prompts for _ in range(args.samples_per_prompt)]
    ppo = policies.get("ppo")
    trained = {n: (m.get("config") or {}).get("ppo", {}) for n, m in policies.items() if n in RL_STAGES}
    rewards, reward_stats, reward_adapter = optimised_reward(rm, trained)  # what the RL stages optimised: eval's proxy
    sft_adapter, sft_given = started_from(sft, trained, policies)  # eval's SFT: what the policies started from
    for name, cfg in trained.items():
        for ours, theirs in (("max_new_tokens", "response_length"), ("temperature", "temperature")):
            if theirs in cfg and cfg[theirs] != getattr(sampling, ours) and state.is_main_process:
                print(f"note: eval samples with {ours}={getattr(sampling, ours)}, {name}'s rollouts used {theirs}={cfg[theirs]}: "
                      f"length, no-EOS share and KL are not comparable with the training curves", file=sys.stderr)
    profile = profile_from(run.model_config)
    tokenizer = load_tokenizer(profile)
    require_chat_template(tokenizer, profile)  # prompts are chats: refuse a template-less base before writing anything
    judge = load_gold_judge(args, rm, list(trained.values()), prompts)  # checked before the run folder is touched
    prompt_ids = encode_prompts(tokenizer, prompts, args.max_prompt_tokens)  # a prompt the template refuses: here too
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    check_context(base_config(profile), len(prompt_ids[longest]), sampling.max_new_tokens, "--max_new_tokens",
                  "--max_prompt_tokens", reply_closing_tokens(tokenizer, prompts[longest]))
    final = {name: final_update(m) for name, m in policies.items() if name in RL_STAGES}  # their metrics files: read

    # 1. Every policy adapter, the SFT adapter (also the KL reference) and the reward adapter on one frozen base (sharded
    #    under the FSDP config), on this process's accelerator. Every rank takes part from here: the batches of
    #    generation, scoring and KL are spread over the ranks.
    adapters = {name: m["outputs"]["adapter"] for name, m in policies.items()}
    stack = AdapterStack.build(profile, tokenizer, {**adapters, "sft": sft_adapter, **rewards},
                               base_model=load_base(profile, tokenizer, shard=shard))
    stack.add_ensemble("reward", list(rewards), reward_stats)
    fp32_head(stack.causal_lm.score)  # as the rm stage and PPO score: in fp32, under a launch's bf16 autocast too
    to_device(stack.model, state.device)

    # 2. Sample and score every policy with the same seed; KL of each to the reference on its own responses. An
    #    interrupted run of the same command keeps the batches each policy had sampled (stages/resume.py).
    stores, made_eval_folder = [], not stage.dir.exists()

    def keep(name: str):
        stores.append(sampled_batches(stage, config, state, name))
        return stores[-1]

    try:  # a damaged upstream file met during the model work (the RM's held-out pairs, a kept policy's adapter)
        with launch_autocast(state.device, "eval"):  # the launch's mixed precision, as the Trainer stages get it
            ro = {name: rollout(stack, name, tokenizer, prompts, prompt_ids, sampling, args.seed, args.score_batch_size,
                                keep(name), args.max_prompt_tokens) for name in ["sft", *policies]}
            kl = {"sft": [0.0] * len(prompts), **{name: sequence_kl(stack, name, "sft", ro[name], args.score_batch_size,
                                                                    sampling.temperature) for name in policies}}
            # The gold report's model work, on every rank (a sharded base needs them all in lockstep): the reward model's
            # scores of its held-out pairs and the policies each RL stage kept along the way. The judge runs on the main
            # process.
            heldout, kept = ([], [], []), {}
            if judge is not None:
                if ppo:
                    heldout = heldout_pair_rewards(stack, tokenizer, rm, args.score_batch_size)
                kept = {name: kept_policy_samples(stack, tokenizer, prompts, prompt_ids, sampling, args,
                                                  stage.dir.parent / name, final[name], keep) for name in final}
    except ConfigError:  # is bad input too: the batches this command kept go, and an eval folder it made (every
        if state.is_main_process:  # rank meets the same file: one of them removes the folder)
            drop_sampled_batches(stage.dir, made_eval_folder)
        raise
    sharding = sharding_report(stack.model)
    if not state.is_main_process:  # the main process writes the report
        finish_distributed()
        return {}

    # 3. Figures, all computed from the per-prompt samples that report.json keeps: PPO against SFT when the run has
    #    PPO, then every policy against every other
    from pipeline.judges import judge_scores

    try:  # the judge meets the real samples here: a judge that fails on them is bad input, which writes nothing
        gold = {n: judge_scores(judge, prompts, ro[n]["texts"], args.gold_batch_size) for n in ro} if judge is not None else None
        report = {"run": run.run, "seed": args.seed, "sampling": to_dict(sampling), "reward_models": len(rewards),
                  "reward_adapter": reward_adapter,
                  "sft_adapter": sft_given,
                  "reward_pooling": stack.pooling["reward"]}
        figures, plots, outputs = {}, {}, {}
        if ppo:
            report.update(sft_vs_ppo(judge, prompts, args, ppo, stage.dir.parent / "ppo", ro["sft"], ro["ppo"], kl["ppo"], gold,
                                     heldout, kept.get("ppo", [])))
            figures = report["figures"]
        comparison = compare_policies(judge, prompts, args, policies, ro, kl, gold, kept,
                                      report["gold"]["curve"] if report.get("gold") else None, final)
    except ConfigError:  # not even the batches kept for a rerun, which the fix would not reuse
        drop_sampled_batches(stage.dir, made_eval_folder)
        raise
    # Every figure is in: only now is the run folder touched, so that a judge failing on the real samples (not the
    # two rows load_gold_judge tries) or a damaged upstream file leaves the last finished eval as it was.
    stage.prepare(config)
    shutil.rmtree(stage.dir / "plots", ignore_errors=True)  # an earlier eval's (another judge, a policy gone) would be published
    if ppo:
        plots = save_plots(report.pop("metrics_rows"), ro["sft"], ro["ppo"], stage.dir / "plots")
        if report["gold"] is not None:
            plots["overoptimisation"] = plot_overoptimisation(report["gold"]["curve"], stage.dir / "plots" / "overoptimisation.png")
    if ppo:  # PPO's held-out signs (KL, length, its gold curve) are the comparison's: one rule for every policy
        report["flags"] += [f"held-out: {flag}" for flag in comparison["flags"]["ppo"]]
        figures["reward_hacking_suspected"] = bool(report["flags"])
    if "curves" in comparison:
        plots["gold_vs_kl"] = stage.dir / "plots" / "gold_vs_kl.png"
        comparison["plot_series"] = plot_gold_vs_kl(comparison["curves"], plots["gold_vs_kl"])
    figures = {**figures, "n_prompts": comparison["n_prompts"], "samples_per_prompt": args.samples_per_prompt,
               **comparison_figures(comparison)}
    report.update(figures=figures, comparison=comparison, plots={k: str(v.relative_to(stage.dir)) for k, v in plots.items()})

    # 4. Report, the SFT-vs-PPO pairs for people to label (responses = [SFT, PPO]), manifest
    atomic_write_json(stage.dir / "report.json", report)
    (stage.dir / "report.md").write_text(render_markdown(report, args.report_samples))
    if ppo:
        outputs["human_pairs"] = stage.dir / "human_pairs.jsonl"
        with open(outputs["human_pairs"], "w") as f:  # a prompt's first pair: people's labels then count prompts
            for s in report["samples"][::args.samples_per_prompt]:
                f.write(json.dumps({"pair_id": s["pair_id"], "prompt": s["prompt"], "responses": [s["sft"], s["ppo"]],
                                    "policies": ["sft", "ppo"]}) + "\n")
    # the gold figures first (the measure PPO did not optimise; `win_rate` is the reward model's), none left empty
    shown = sorted((k for k, v in figures.items() if k != "comparison" and v is not None),
                   key=lambda k: not k.startswith("gold"))
    print_table("eval", {k: (round(figures[k], 4) if isinstance(figures[k], float) else figures[k]) for k in shown})
    for flag in report.get("flags", []):
        print(f"warning: {flag}")
    stage.finish({"report": stage.dir / "report.md", "report_json": stage.dir / "report.json", **outputs,
                  **{f"plot_{k}": v for k, v in plots.items()}},
                 {**figures, "world_size": state.num_processes, "sharding": sharding,
                  "batches_kept_from_an_interrupted_run": sum(s.kept for s in stores)}, config)
    drop_sampled_batches(stage.dir)
    finish_distributed()
    return figures


def CONFIG_CLASSES():
    return (EvalArgs, SamplingConfig, RunArgs)


def parse_args(argv=None):
    return parse(CONFIG_CLASSES(), argv)


if __name__ == "__main__":
    main_guard(lambda: main(*parse_args()))
