"""Does the suite catch a broken rule? Hand-made mutants of the arithmetic the results rest on, each run against the
tests that guard it (`make mutants`: about two hours on 2 CPU cores for the whole list, 14-24 s a mutant in its
last runs; name some to run only those; writes bench/results/mutants.json).

    python -m tools.mutants                              # every mutant
    python -m tools.mutants loss-k3 eval-kl-direction    # some of them

Each mutant is one textual change to one file (a sign flipped, a temperature dropped, a mean turned into a sum, a
rank's sum kept local) in a throw-away git worktree of HEAD; the tests it names run with -x. A mutant the tests pass
is a hole in the suite: the run exits 1 and names it. The selected tests first run unmutated, so a failure means
the mutant, not a broken checkout. tests/test_mutants.py keeps the list honest: every `old` text must occur exactly
once in its file, so a refactor cannot turn a mutant into a silent no-op.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EVAL = "tests/test_eval.py tests/test_eval_compare.py"
SIMULATE = "tests/test_simulate.py"
LOSSES = "tests/test_ppo_losses.py"
JUDGES = "tests/test_judges.py"
BENCH = "tests/test_bench_rl.py"
RM_LIMIT = "tests/test_bench_rm_limit.py"
RM = "tests/test_rm.py -k 'by_hand or truncate or data_formats'"
PPO_UPDATE = "tests/test_ppo.py -k 'vf_coef or entropy or four_adapters or sampling_distribution'"
PPO_RANKS = "tests/test_ppo.py -k 'two_ranks_equal_one_rank'"
ENSEMBLE = "tests/test_rm.py tests/test_ppo.py -k ensemble"
POOLING = "tests/test_rm.py tests/test_judges.py -k 'pool or pipelines_reward'"
PEER_POOLING = "tests/test_bench_rl.py -k peers"
GENERATION = "tests/test_generation.py"
WIRING = "tests/test_ppo_wiring.py"
CEILING = "tests/test_bench_rm_ceiling.py"
EXPORT = "tests/test_label_export.py -k 'earlier or store_loaded'"
PAIRS = "tests/test_pairs.py -k 'own_prompt or key_repeats'"
RM_DATA = "tests/test_rm.py -k 'reply_start_is or strength_margin or leave_ties'"
RM_GROUPS = "tests/test_rm_groups.py -k 'not trains'"
LABELS = "tests/test_label_store.py"
EVAL_BY_HAND = "tests/test_eval.py -k 'human_win_rate_counts or no_eos_figures or training_flags_by_hand'"
PPO_UNITS = ("tests/test_ppo.py -k 'own_slice or newest_complete or summary_by_hand or which_checkpoint or yaml_parses "
             "or out_of_range'")
PPO_STEPS = "tests/test_ppo.py -k 'later_rollout_carries or mini_batches_of_an_epoch'"
PPO_PROMPTS = "tests/test_ppo.py -k 'repeated_prompt or exactly_max_prompt_length'"
PPO_LOOP = ("tests/test_ppo.py -k 'kl_loss_term_pulls or value_update_adds or critic_free_advantages_sum' "
            "-m 'not slow'")

# (name, file, old text, new text, the tests that guard the rule)
MUTANTS: list[tuple[str, str, str, str, str]] = [
    # PPO's arithmetic (stages/ppo/losses.py)
    ("loss-gae-lam", "stages/ppo/losses.py", "last = delta + gamma * lam * last", "last = delta + gamma * last", LOSSES),
    ("loss-k3", "stages/ppo/losses.py", "return torch.expm1(log_r) - log_r", "return torch.expm1(log_r) + log_r", LOSSES),
    ("loss-clip-min", "stages/ppo/losses.py", "loss = torch.max(unclipped, clipped).sum() / denom",
     "loss = torch.min(unclipped, clipped).sum() / denom", LOSSES),
    ("loss-vf-half", "stages/ppo/losses.py", "loss = 0.5 * torch.max(err, err_clipped).sum() / denom",
     "loss = 1.0 * torch.max(err, err_clipped).sum() / denom", LOSSES),
    ("loss-rloo-scale", "stages/ppo/losses.py", "adv = centred * group_size / (group_size - 1)", "adv = centred", LOSSES),
    ("loss-grpo-std", "stages/ppo/losses.py",
     "adv = centred / (g.std(1, keepdim=True) + eps) if normalize_std else centred", "adv = centred", LOSSES),
    ("loss-eos-penalty", "stages/ppo/losses.py", "scores - missing_eos_penalty * (~ended.bool())",
     "scores - missing_eos_penalty * (ended.bool())", LOSSES),
    ("loss-kl-sign", "stages/ppo/losses.py", "rewards = -kl_coef * kl * mask", "rewards = kl_coef * kl * mask", LOSSES),
    ("loss-whiten-unbiased", "stages/ppo/losses.py", "var = ss / (sums[1] - 1).clamp(min=1)",
     "var = ss / sums[1].clamp(min=1)", LOSSES),
    ("loss-fit-intercept", "stages/ppo/losses.py", "return a, sy / n - a * sx / n", "return a, sy / n", LOSSES),
    ("loss-explained-variance", "stages/ppo/losses.py",
     "return float(1.0 - global_std(returns - values, mask, reduce) ** 2 / var_returns)",
     "return float(1.0 - global_std(returns - values, mask, reduce) / var_returns)", LOSSES),
    ("loss-reward-norm", "stages/ppo/losses.py", "scores = (scores - mean) / max(std, 1e-8)", "scores = (scores - mean)",
     LOSSES),
    ("loss-reward-clip", "stages/ppo/losses.py", "scores = scores.clamp(-clip, clip)",
     "scores = scores.clamp(-clip, 2 * clip)", LOSSES),
    # PPO's update loop and rollout
    ("rollout-temperature", "stages/ppo/rollout.py", "    logits = logits / temperature\n    return logits.gather",
     "    return logits.gather", PPO_UPDATE),
    ("update-vf-coef", "stages/ppo/trainer.py", "(cfg.vf_coef * vl).backward()", "vl.backward()", PPO_UPDATE),
    ("update-entropy-sign", "stages/ppo/trainer.py", "loss = loss - cfg.entropy_coef * ent.sum() / denom",
     "loss = loss + cfg.entropy_coef * ent.sum() / denom", PPO_UPDATE),
    ("update-denom-local", "stages/ppo/trainer.py",
     "denom = self._all_sum(ro.response_mask[mb].sum().float()).clamp(min=1)",
     "denom = ro.response_mask[mb].sum().float().clamp(min=1)", PPO_RANKS),
    ("update-warmup-zero-grads", "stages/ppo/trainer.py", "self._sum_grads(trained_now)", "self._sum_grads(self.params)",
     "tests/test_ppo.py -k critic_warmup_under_ranks"),
    # eval: gold figures, KL, the over-optimisation flag
    ("eval-agree-proxy-tie", "stages/eval_ppo.py", "1.0 if p * g > 0", "1.0 if p * g >= 0", EVAL),
    ("eval-agree-gold-ties", "stages/eval_ppo.py",
     "for pa, pb, ga, gb in zip(proxy_a, proxy_b, gold_a, gold_b) if ga != gb]",
     "for pa, pb, ga, gb in zip(proxy_a, proxy_b, gold_a, gold_b)]", EVAL),
    ("eval-flag-proxy", "stages/eval_compare.py", 'proxy_rose = last["proxy_mean"] > peak["proxy_mean"]',
     'proxy_rose = last["proxy_mean"] < peak["proxy_mean"]', EVAL),
    ("eval-flag-z", "stages/eval_compare.py", "GOLD_DROP_Z = 2.0", "GOLD_DROP_Z = 0.0", EVAL),
    ("eval-flag-sign", "stages/eval_compare.py", "statistics.fmean(drops) < -z * se",
     "statistics.fmean(drops) > -z * se", EVAL),
    ("eval-flag-bonferroni", "stages/eval_compare.py", "(1 - one.cdf(GOLD_DROP_Z)) / max(points - 1, 1))",
     "(1 - one.cdf(GOLD_DROP_Z)) / 1)", EVAL),
    ("eval-human-counts-sim", "stages/eval_ppo.py", 'WHERE pair_id IN ({marks}) AND {PERSON}"',
     'WHERE pair_id IN ({marks})"', EVAL),
    ("eval-flag-every-kl", "stages/eval_compare.py", 'if row["kl_mean"] > hacking_kl:', 'if row["kl_mean"] > 2 * hacking_kl:',
     EVAL),
    ("eval-flag-every-curve", "stages/eval_compare.py", "        if sign:\n            flags[name].append(sign)",
     "        pass", EVAL),
    ("eval-ppo-heldout-flags", "stages/eval.py", 'report["flags"] += [f"held-out: {flag}" for flag in comparison["flags"]["ppo"]]',
     "pass", EVAL),
    ("eval-kl-temperature", "stages/eval.py", "    t = temperature if temperature > 0 else 1.0\n", "    t = 1.0\n", EVAL),
    ("eval-kl-direction", "stages/eval.py", "per_token = (logp.exp() * (logp - logq)).sum(-1)",
     "per_token = (logq.exp() * (logq - logp)).sum(-1)", EVAL),
    ("winrate-ties-half", "stages/eval_compare.py", "rate = (wins + 0.5 * ties) / len(ppo)",
     "rate = (wins + 1.0 * ties) / len(ppo)", EVAL),
    ("winrate-interval-ties", "stages/eval_compare.py", "low, high = wilson(wins + 0.5 * ties, len(ppo))",
     "low, high = wilson(wins, len(ppo))", EVAL),
    # simulated annotators
    ("sim-temperature", "stages/simulate.py", "return sigmoid(diff / temperature + position_bias)",
     "return sigmoid(diff * temperature + position_bias)", SIMULATE),
    ("sim-bias-sign", "stages/simulate.py", "return sigmoid(diff / temperature + position_bias)",
     "return sigmoid(diff / temperature - position_bias)", SIMULATE),
    ("sim-tie-band", "stages/simulate.py", "if abs(diff) < tie_band:", "if abs(diff) < 2 * tie_band:", SIMULATE),
    ("sim-expected-bias", "stages/simulate.py", "p_left(abs(d), temperature, -position_bias)) / 2",
     "p_left(abs(d), temperature, position_bias)) / 2", SIMULATE),
    ("sim-calibration", "stages/simulate.py",
     "if expected_agreement(diffs, math.exp(mid), position_bias) > target:",
     "if expected_agreement(diffs, math.exp(mid), position_bias) < target:", SIMULATE),
    ("sim-seed", "stages/simulate.py", "uniform(args.seed, name, pair_id)", "uniform(0, name, pair_id)", SIMULATE),
    ("sim-rerun-keeps-old", "stages/simulate.py", "if before != (choice, left):", "if before is None:", SIMULATE),
    ("sim-rerun-keeps-others", "stages/simulate.py", "removed = store.save_simulated(gone, labels)",
     "removed = store.save_simulated([], labels)", SIMULATE),
    # make's rerun rule
    ("make-launch-ignored", "pipeline/run.py", 'if "launch" in inputs and inputs["launch"] != launch:', "if False:",
     "tests/test_make.py -k 'accelerate_config_reruns'"),
    # gold judges
    ("judge-non-finite", "pipeline/judges.py", "or not math.isfinite(value):", "or False:", JUDGES),
    ("judge-count", "pipeline/judges.py", "if len(got) != len(batch_r):", "if len(got) < len(batch_r):", JUDGES),
    # reward model figures
    ("rm-accuracy-tie", "stages/rm_scoring.py", "right = sum(d > 0 for d in diffs)", "right = sum(d >= 0 for d in diffs)", RM),
    ("rm-longer-wins-half", "stages/rm_scoring.py", "right = [(c > r) + 0.5 * (c == r)", "right = [(c > r) + 1.0 * (c == r)", RM),
    ("rm-reward-std", "stages/rm_scoring.py", "for s in scores) / len(scores)), 4)", "for s in scores) / (len(scores) - 1)), 4)",
     RM),
    ("rm-truncate-bos", "stages/rm_data.py", "keep = 1 if n and chosen[0] == bos_token_id else 0", "keep = 0", RM),
    ("rm-truncate-end", "stages/rm_data.py", "return ids[: cap - end] + ids[len(ids) - end :]", "return ids[:cap]", RM),
    ("rm-weight-fraction", "stages/rm_data.py",
     "out += group * int(w) + rng.sample(group, round((w - int(w)) * len(group)))", "out += group * int(w)", RM),
    # reward-model ensembles (pipeline/adapters.py, make rm's members, PPO's rollout and resume guard)
    ("ensemble-sum", "pipeline/adapters.py", "return ((member_scores - mean) / std).mean(dim=0)",
     "return ((member_scores - mean) / std).sum(dim=0)", ENSEMBLE),
    ("ensemble-unscaled", "pipeline/adapters.py", "return ((member_scores - mean) / std).mean(dim=0)",
     "return (member_scores - mean).mean(dim=0)", ENSEMBLE),
    ("ensemble-member-seed", "stages/rm.py", "train_cfg.seed, train_cfg.output_dir = seed + i,",
     "train_cfg.seed, train_cfg.output_dir = seed,", ENSEMBLE),
    ("ensemble-tokens-first-only", "stages/ppo/rollout.py", "scores[idx] = ensemble_score(torch.stack(each), member_stats)",
     "scores[idx] = each[0]", ENSEMBLE),
    ("ensemble-resume-guard", "stages/ppo/__init__.py", "upstream[\"rm_members\"] = [adapter_digest(Path(d)) for d in rewards.values()]",
     "pass", ENSEMBLE),
    ("ensemble-reload-first-only", "stages/rm_scoring.py", "    for adapter_dir in adapter_dirs:\n",
     "    for adapter_dir in adapter_dirs[:1]:\n", ENSEMBLE),
    ("ensemble-reload-against-first", "stages/rm_scoring.py", "zip(adapter_dirs, scores, strict=True)",
     "zip(adapter_dirs, [scores[0]] * len(scores), strict=True)", ENSEMBLE),
    # reward pooling (pipeline/adapters.py: the rule, its in-forward twin; the stack, the rollout and make rm using it)
    ("pool-no-divisor", "pipeline/adapters.py", "return (per_token.float() * counted).sum(dim=1) / SUM_DIVISOR",
     "return (per_token.float() * counted).sum(dim=1)", POOLING),
    ("pool-unmasked", "pipeline/adapters.py", "counted = (positions <= index.unsqueeze(1)) & attention_mask.bool()",
     "counted = positions <= index.unsqueeze(1)", POOLING),
    ("pool-forward-unmasked", "pipeline/adapters.py", "return ((output.float() * mask).cumsum(dim=1) / SUM_DIVISOR)",
     "return (output.float().cumsum(dim=1) / SUM_DIVISOR)", POOLING),
    ("pool-stack-last", "pipeline/adapters.py", 'self.causal_lm.config.pad_token_id, self.pooling.get(name, "last"), starts)',
     'self.causal_lm.config.pad_token_id, "last", starts)', POOLING),
    ("pool-whole-sequence", "pipeline/adapters.py", "counted &= positions >= starts.to(per_token.device).unsqueeze(1)",
     "pass", POOLING),
    ("pool-chat-no-starts", "stages/ppo/rollout.py", 'r_mask.to(device), r_starts).float()', 'r_mask.to(device)).float()',
     ENSEMBLE),
    ("pool-tokens-from-0", "stages/ppo/rollout.py", "starts = torch.full((x.ids.shape[0],), x.prompt_width,",
     "starts = torch.full((x.ids.shape[0],), 0,", ENSEMBLE),
    ("pool-stage-with-prompt", "stages/rm_scoring.py", "return [a - b for a, b in zip(scores, score_distinct(model, prompts, pad_token_id, batch_size))]",
     "return scores", ENSEMBLE),
    ("pool-rollout-last", "stages/ppo/rollout.py", 'pooling = stack.pooling.get(member, "last")', 'pooling = "last"', ENSEMBLE),
    ("pool-not-trained", "stages/rm.py", "pool_in_forward(trainer.model, args.pooling)  #", "pass  #", ENSEMBLE),
    ("pool-not-reloaded", "stages/rm_scoring.py", "    pool_in_forward(model, pooling)\n    if torch.cuda", "    if torch.cuda", ENSEMBLE),
    # the benchmarks' peers score with the reward model's pooling (bench/peer/peer_common.py, bench/story.py)
    ("peer-pool-no-divisor", "bench/peer/peer_common.py", "output.cumsum(dim=1) / divisor)", "output.cumsum(dim=1))",
     PEER_POOLING),
    ("peer-pool-prompt-kept", "bench/peer/peer_common.py", "score = score - logits[:, context_length - 1].squeeze(-1)",
     "score = score", PEER_POOLING),
    ("peer-pool-not-copied", "bench/story.py", "        write_pooling(out, read_pooling(adapter))", "        pass",
     PEER_POOLING),
    # the benchmarks' verdicts
    ("bench-gain-se", "bench/harness.py", "round(statistics.stdev(diffs) / math.sqrt(len(diffs)), 4)",
     "round(statistics.stdev(diffs), 4)", BENCH),
    ("bench-verdict", "bench/harness.py", '"meets_gold_gain_target": (a - b >= -se)', '"meets_gold_gain_target": (a - b >= se)',
     BENCH),
    ("bench-verdict-se", "bench/harness.py", "se = math.sqrt(sa ** 2 + sb ** 2)", "se = sa + sb", BENCH),
    # how far each side moved: the trained policy's KL to the SFT start on its gold samples (bench/gold.py)
    ("bench-kl-temperature", "bench/gold.py", '{"gens": gens}, 16, temperature)', '{"gens": gens}, 16, 1.0)', BENCH),
    ("bench-kl-direction", "bench/gold.py", 'sequence_kl(pair, "policy", "reference",', 'sequence_kl(pair, "reference", "policy",',
     BENCH),
    ("bench-kl-mean", "bench/harness.py", 'round(statistics.fmean(policy["kl"]), 4)', 'round(sum(policy["kl"]), 4)', BENCH),
    # the reward-model limit bench (bench/rm_limit.py)
    ("limit-ensemble-sum", "bench/rm_limit.py", "return [sum(col) / len(col) for col in zip(*scaled)]",
     "return [sum(col) for col in zip(*scaled)]", RM_LIMIT),
    ("limit-ensemble-unscaled", "bench/rm_limit.py", "scaled = [standardised(m) for m in members]", "scaled = members",
     RM_LIMIT),
    ("limit-gold-order", "bench/rm_limit.py", '"rejected": r["chosen"]} if gc < gr else dict(r)',
     '"rejected": r["chosen"]} if gc <= gr else dict(r)', RM_LIMIT),
    # the sampler behind SFT's samples, make pairs and make eval (pipeline/generation.py)
    ("gen-temperature", "pipeline/generation.py", "sampling = dict(do_sample=True, temperature=cfg.temperature,",
     "sampling = dict(do_sample=True, temperature=1.0,", GENERATION),
    ("gen-response-start", "pipeline/generation.py", "resp = out[:, ids.shape[1]:].cpu()",
     "resp = out[:, ids.shape[1] - 1:].cpu()", GENERATION),
    ("gen-batch-seed", "pipeline/generation.py", "return generator_seed + 1_000_003 * batch_index",
     "return generator_seed", GENERATION),
    # the data people and simulated annotators label (stages/pairs.py, stages/simulate.py, stages/label/)
    ("pairs-interleaved", "stages/pairs.py", "[ids for ids in encoded for _ in range(k)]",
     "[ids for _ in range(k) for ids in encoded]", PAIRS),
    ("sim-gold-loser", "stages/simulate.py", "diff = scores[pair_id][left] - scores[pair_id][1 - left]",
     "diff = scores[pair_id][1 - left] - scores[pair_id][left]", SIMULATE),
    ("sim-scores-shifted", "stages/simulate.py", "flat_scores[2 * i:2 * i + 2]", "flat_scores[i:i + 2]", SIMULATE),
    ("export-strength-losers", "stages/label/export.py", 'if v == outcome and lab["strength"])', 'if lab["strength"])',
     LABELS),
    ("judge-own-rm-by-name", "pipeline/judges.py",
     "return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))", "return a == b", JUDGES),
    # the reward model's data (stages/rm_data.py)
    ("rm-reply-start-header", "stages/rm_data.py", "prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)",
     "prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=False)", RM_DATA),
    ("rm-margin-unscaled", "stages/rm_data.py", '"margin": args.margin_scale * strength,', '"margin": strength,', RM_DATA),
    ("rm-ties-held-out", "stages/rm_data.py", 'eval_rows = [kept[i] for i in eval_idx["i"] if not kept[i]["tie"]]',
     'eval_rows = [kept[i] for i in eval_idx["i"]]', RM_DATA),
    # the reward model's batches by prompt and its scoring of each distinct sequence once (stages/rm_groups.py)
    ("rm-group-offset-lost", "stages/rm_groups.py", 'winners += [offset + i for i in g["winners"]]',
     'winners += [i for i in g["winners"]]', RM_GROUPS),
    ("rm-group-loss-sum", "stages/rm_groups.py", "return -F.logsigmoid(diff).mean()", "return -F.logsigmoid(diff).sum()",
     RM_GROUPS),
    ("rm-group-winner-loser", "stages/rm_groups.py", 'g["winners"].append(ends[0])', 'g["winners"].append(ends[1])',
     RM_GROUPS),
    ("rm-group-center-each", "stages/rm_groups.py", "torch.mean((rewards[winners] + rewards[losers]) ** 2)",
     "torch.mean(rewards ** 2)", RM_GROUPS),
    # make pairs on the CPU default: two processes of one thread (the Makefile's SAMPLING_ACCELERATE_CONFIG)
    ("make-sampling-config-unused", "Makefile", "stage_config = $(if $(filter pairs eval,$(1)),",
     "stage_config = $(if $(filter none,$(1)),", "tests/test_make.py -k sampling"),
    ("make-sampling-eval-one-process", "Makefile", "stage_config = $(if $(filter pairs eval,$(1)),",
     "stage_config = $(if $(filter pairs,$(1)),", "tests/test_make.py -k sampling"),
    ("make-sampling-threads-whole", "Makefile",
     "OMP_NUM_THREADS=$(call threads_for,$(call processes_of,$(call stage_config,$(1)))))",
     "OMP_NUM_THREADS=$(CPU_COUNT))", "tests/test_make.py -k sampling"),
    # a prompt's shared tokens run once (share_prefix): the same rewards and gradients as whole sequences
    ("rm-prefix-cache-not-checked", "stages/rm_groups.py", "if share_prefix and not takes_cache(model):",
     "if False:", RM_GROUPS),
    ("rm-prefix-positions-restart", "stages/rm_groups.py",
     "positions = prefix_lengths.unsqueeze(1) + (attention_mask.cumsum(1) - 1).clamp(min=0)",
     "positions = (attention_mask.cumsum(1) - 1).clamp(min=0)", RM_GROUPS),
    ("rm-prefix-padding-attended", "stages/rm_groups.py",
     "attention_mask=torch.cat([prefix_mask[prefix_index], attention_mask], dim=1)",
     "attention_mask=torch.cat([torch.ones_like(prefix_mask[prefix_index]), attention_mask], dim=1)", RM_GROUPS),
    ("ppo-decoder-layers-top-level-only", "stages/ppo/rollout.py",
     "lists = {name: m for name, m in body.named_modules()", "lists = {name: m for name, m in body.named_children()",
     "tests/test_ppo.py -k decoder_layers"),
    ("rm-prefix-right-padded", "stages/rm_groups.py", 'batch["prefix_mask"] = left_pad(',
     'batch["prefix_mask"] = right_pad(', RM_GROUPS),
    ("rm-prefix-pad-positions", "stages/rm_groups.py",
     "position_ids=(prefix_mask.cumsum(1) - 1).clamp(min=0),", "position_ids=None,", RM_GROUPS),
    ("rm-prefix-wrong-group", "stages/rm_groups.py", "cache.reorder_cache(prefix_index)",
     "cache.reorder_cache(torch.arange(len(prefix_index)) % len(prefix_ids))", RM_GROUPS),
    ("rm-prefix-score-dropped", "stages/rm_groups.py", "rewards = rewards + shared.logits.squeeze(-1)[prefix_index]",
     "rewards = rewards", RM_GROUPS),
    ("rm-prefix-takes-all", "stages/rm_groups.py", "first, limit = sequences[0], min(scored(s) for s in sequences)",
     "first, limit = sequences[0], min(len(s) for s in sequences)", RM_GROUPS),
    ("rm-prefix-takes-the-scored-token", "stages/rm_groups.py",
     "first, limit = sequences[0], min(scored(s) for s in sequences)",
     "first, limit = sequences[0], min(len(s) for s in sequences) - 1", RM_GROUPS),
    ("rm-prefix-ends-in-pad", "stages/rm_groups.py", "while n > 0 and first[n - 1] == pad_token_id:",
     "while False:", RM_GROUPS),
    ("rm-prefix-pad-unknown", "stages/rm_groups.py",
     "cuts = [shared_prefix_length(g[\"sequences\"], self.pad_token_id) for g in groups]",
     "cuts = [shared_prefix_length(g[\"sequences\"]) for g in groups]", RM_GROUPS),
    ("rm-prefix-head-mask-whole", "pipeline/adapters.py", "seen[\"mask\"] = mask[:, -ids.shape[1]:] if mask is not None",
     "seen[\"mask\"] = mask if mask is not None", RM_GROUPS),
    ("rm-distinct-first-score", "pipeline/data.py", "return [scores[where[key(item)]] for item in items]",
     "return [scores[min(i, len(scores) - 1)] for i in range(len(items))]",
     "tests/test_data.py tests/test_rm_groups.py tests/test_eval.py -k distinct"),
    # the bag-of-words ceiling bench (bench/rm_ceiling.py)
    ("ceiling-loss-sign", "bench/rm_ceiling.py", "softplus(-torch.sparse.mm(x, w[:, None]).squeeze(1))",
     "softplus(torch.sparse.mm(x, w[:, None]).squeeze(1))", CEILING),
    ("ceiling-gold-order-lost", "bench/rm_ceiling.py", "diff[flip] *= -1", "diff[flip] *= 1", CEILING),
    ("ceiling-heldout-trained", "bench/rm_ceiling.py",
     "train_rows = [r for i, r in enumerate(rows) if prompt_key(r, i) not in held_prompts]", "train_rows = rows", CEILING),
    ("ceiling-penalty-max", "bench/rm_ceiling.py", "return min(PENALTIES, key=cv_loss)", "return max(PENALTIES, key=cv_loss)",
     CEILING),
    # the label export's current pairs (stages/label/export.py)
    ("export-earlier-pairs-kept", "stages/label/export.py", "labels = [lab for lab in labels if is_current(lab)]",
     "labels = list(labels)", EXPORT),
    ("export-store-current-ignored", "stages/label/export.py",
     'if current is not None else (lambda lab: lab["current"])', 'if current is not None else (lambda lab: True)', EXPORT),
    ("export-new-pairs-unseen", "stages/label/export.py", 'stage.may_read("pairs")', "None", EXPORT),
    # whose labels the export holds, and when `make rm` exports again (stages/label/, the Makefile's labels step)
    ("export-sources-outvoted", "stages/label/export.py", 'sources = "people" if people else "simulated"',
     'sources = "all"', "tests/test_label_export.py -k people_labels"),
    ("export-digest-current-lost", "stages/label/store.py", '"strength", "current")', '"strength")',
     "tests/test_label_export.py -k records_the_store"),
    ("export-rewrites-unchanged", "stages/label/export.py",
     'if export.refresh and last_rows_digest(stage) == rows_state:', "if False:",
     "tests/test_label_export.py -k rows_leaves"),
    ("export-unchanged-unrecorded", "stages/label/export.py", "        write_store_record(stage.dir, store_state, read_files, pairs_state)\n", "\n",
     "tests/test_label_export.py -k rows_leaves"),
    ("export-refresh-not-replayed", "stages/label/export.py", "argv = last_command_line(argv)", "argv = list(argv)",
     "tests/test_label_export.py -k last_export_did"),
    ("fresh-export-files-ignored", "stages/label/fresh_export.py",
     "not inputs_changed(files, {}, str(run_dir.parent), run_dir.name)", "True",
     "tests/test_label_export.py -k last_export_did"),
    ("fresh-export-pairs-ignored", "stages/label/fresh_export.py", "        return NEW_PAIRS\n    same =",
     "        pass\n    same =", "tests/test_label_export.py -k rows_leaves"),
    ("make-labels-store-ignored", "Makefile", "if [ $$fresh = 3 ]", "if [ $$fresh = 9 ]",
     "tests/test_make.py -k labels_export_again"),
    # eval's PPO section and the RL loop's less travelled options
    ("eval-human-sft-index", "stages/eval_ppo.py", 'human = human_win_rate(store, {s["pair_id"]: 1 for s in samples})',
     'human = human_win_rate(store, {s["pair_id"]: 0 for s in samples})', EVAL_BY_HAND),
    ("update-kl-loss-sign", "stages/ppo/trainer.py", "loss = loss + self.kl_ctl.value * kl_term",
     "loss = loss - self.kl_ctl.value * kl_term", PPO_LOOP),
    ("update-value-offset", "stages/ppo/trainer.py",
     "new_v = token_values(lm, x, self.top, ro.cached_hidden(idx, x)) + self.value_offset",
     "new_v = token_values(lm, x, self.top, ro.cached_hidden(idx, x))", PPO_LOOP),
    ("update-group-mean", "stages/ppo/trainer.py", "adv = L.group_advantages(rewards.sum(1),",
     "adv = L.group_advantages(rewards.mean(1),", PPO_LOOP),
    # how the loop passes its options to the losses (tests/test_ppo_wiring.py)
    ("wiring-kl-estimator", "stages/ppo/trainer.py", '(kl3 if cfg.kl_estimator == "k3" else kl1)', "(kl1)", WIRING),
    ("wiring-whiten-rewards-shift", "stages/ppo/trainer.py",
     "rewards = L.masked_whiten(rewards, mask, shift_mean=False, reduce=g)",
     "rewards = L.masked_whiten(rewards, mask, shift_mean=True, reduce=g)", WIRING),
    ("wiring-entropy-temperature", "stages/ppo/trainer.py", "ent = L.entropy_from_logits(logits / cfg.temperature)",
     "ent = L.entropy_from_logits(logits)", WIRING),
    ("wiring-entropy-local-mean", "stages/ppo/trainer.py", "loss = loss - cfg.entropy_coef * ent.sum() / denom",
     "loss = loss - cfg.entropy_coef * ent.mean()", WIRING),
    ("wiring-dr-grpo", "stages/ppo/trainer.py", "cfg.grpo_normalize_std)[:, None] * mask", "True)[:, None] * mask",
     WIRING),
    ("wiring-gae-lam", "stages/ppo/trainer.py", "L.gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)",
     "L.gae(rewards, ro.values, mask, cfg.gamma, 1.0)", WIRING),
    ("wiring-value-clip", "stages/ppo/trainer.py", "L.value_loss(new_v, old_v, ret, cfg.cliprange_value, denom)",
     "L.value_loss(new_v, old_v, ret, cfg.cliprange, denom)", WIRING),
    ("wiring-policy-clip", "stages/ppo/trainer.py", "L.policy_loss(new_lp, old_lp, a, cfg.cliprange, denom)",
     "L.policy_loss(new_lp, old_lp, a, cfg.cliprange_value, denom)", WIRING),
    ("wiring-adaptive-kl-world", "stages/ppo/trainer.py",
     'self.kl_ctl.update(stats["kl"], cfg.local_batch_size * self.world)',
     'self.kl_ctl.update(stats["kl"], cfg.local_batch_size)', WIRING),
    ("publish-private-dropped", "stages/publish.py", "private=True if args.private else None", "private=None",
     "tests/test_publish.py -k upload_end_to_end"),
    ("report-reward-ci-swapped", "stages/eval_ppo.py",
     "f\"(95% CI {w['ci_low']:.1%} – {w['ci_high']:.1%}, Wilson; {w['wins']} wins, {w['ties']} ties counted half, \"",
     "f\"(95% CI {w['ci_high']:.1%} – {w['ci_low']:.1%}, Wilson; {w['wins']} wins, {w['ties']} ties counted half, \"",
     "tests/test_eval.py -k intervals"),
    ("report-gold-ci-rate", "stages/eval_ppo.py",
     "f\"**Gold win rate of PPO over SFT: {w['rate']:.1%}** (95% CI {w['ci_low']:.1%} – {w['ci_high']:.1%}, \"",
     "f\"**Gold win rate of PPO over SFT: {w['rate']:.1%}** (95% CI {w['ci_low']:.1%} – {w['rate']:.1%}, \"",
     "tests/test_eval.py -k intervals"),
    ("report-samples-all", "stages/eval_ppo.py", "*sample_table(report[\"samples\"][:n_rows])",
     "*sample_table(report[\"samples\"])", "tests/test_eval.py -k report_samples"),
    ("eval-max-prompts-ignored", "stages/eval.py", "return prompts[:max_prompts] if max_prompts > 0 else prompts",
     "return prompts", "tests/test_eval.py -k max_prompts"),
    ("eval-label-store-ignored", "stages/eval_ppo.py",
     "store = resolve_path(args.label_store) if args.label_store else",
     "store = ppo_dir.parent / \"label\" / \"labels.sqlite\" if args.label_store else",
     "tests/test_eval.py -k label_store_flag"),
    ("label-export-unwatched", "stages/rm_data.py",
     "        stage.may_read(LABEL_EXPORT)  # a label export that appears later makes the stage out of date",
     "        pass", "tests/test_dpo.py -k appears_later"),
    ("ppo-resume-other-settings", "stages/ppo/__init__.py", "    if changed:\n        return f\"was trained with other settings",
     "    if False:\n        return f\"was trained with other settings", "tests/test_ppo.py -k same_settings"),
    ("template-date-from-clock", "pipeline/chat.py", "TEMPLATE_KWARGS = {\"date_string\": \"26 Jul 2024\"}",
     "TEMPLATE_KWARGS = {}", "tests/test_chat_templates.py -k fixed_date"),
    ("sft-trl-render-date-from-clock", "stages/sft.py", "    elif \"messages\" in ds.column_names:  # TRL renders",
     "    elif False:  # TRL renders", "tests/test_chat_templates.py -k fixed_date"),
    ("inputs-digested-at-finish", "pipeline/run.py", "            \"inputs\": self.inputs_as_read(config),",
     "            \"inputs\": self.inputs(config),", "tests/test_make.py -k edited_while"),
    ("ppo-log-cut-line-refused", "stages/ppo/trainer.py", "            if n < len(lines):", "            if True:",
     "tests/test_ppo.py -k cut_by_a_kill"),
    ("simulate-label-by-label", "stages/simulate.py", "removed = store.save_simulated(gone, labels)",
     "removed = sum(store.remove_simulated(a) for a in gone) + sum(0 * len(store.save_label(*lab)) for lab in labels)",
     "tests/test_simulate.py -k killed_midway"),
    ("publish-merged-error-unmeasured", "stages/publish.py",
     "error += float((merged.to(target).float() - merged).pow(2).sum())", "error += 0.0",
     "tests/test_publish.py -k merged_bf16"),
    ("launch-dataset-unchecked", "pipeline/launch.py", "                    check_dataset_exists(getattr(cfg, flag), f\"--{flag}\")",
     "                    pass", "tests/test_make.py -k missing_dataset"),
    ("publish-private-public-repo", "stages/publish.py", "            check_private(api, folders)", "            pass",
     "tests/test_publish.py -k existing_public_repo"),
    ("publish-message-ppo-always", "stages/publish.py", "    message = commit_message(args, policy_method(args.policy, policy))",
     "    message = commit_message(args, \"ppo\")", "tests/test_publish.py -k which_method"),
    ("ranks-whiten-rewards-local", "stages/ppo/trainer.py",
     "rewards = L.masked_whiten(rewards, mask, shift_mean=False, reduce=g)",
     "rewards = L.masked_whiten(rewards, mask, shift_mean=False)", PPO_RANKS),
    ("ranks-reinforce-pp-local", "stages/ppo/trainer.py",
     "adv = L.reinforce_pp_advantages(rewards, mask, cfg.gamma, reduce=g)",
     "adv = L.reinforce_pp_advantages(rewards, mask, cfg.gamma)", PPO_RANKS),
    ("inputs-profile-contents-unread", "pipeline/run.py",
     "        files = sorted(named | named_in_yamls(named, own_dir))", "        files = sorted(named)",
     "tests/test_make.py -k base_checkpoint"),
    ("inputs-judge-rm-unread", "pipeline/run.py", "            v = v.removeprefix(JUDGE_RM_PREFIX)", "            v = v",
     "tests/test_make.py -k base_checkpoint"),
    ("publish-stale-eval-figures", "stages/publish.py", "    if rerun:  # `make publish` reruns eval first",
     "    if False:  # `make publish` reruns eval first", "tests/test_publish.py -k after_eval"),
    # the chat mask, sampling, data loading, SFT, pairs and DPO
    ('chat-eot-untrained', 'pipeline/chat.py', 'spans.append((start, end + len(eot)))', 'spans.append((start, end))', "tests/test_chat_templates.py -k 'exactly_each_reply and (qwen2_5 or llama3_2 or gemma3 or phi3)'"),
    ('chat-mask-overlap-inclusive', 'pipeline/chat.py', 'mask = [int(any(s < b and a < e for s, e in spans))', 'mask = [int(any(s <= b and a <= e for s, e in spans))', "tests/test_chat_templates.py -k 'exactly_each_reply and (qwen2_5 or llama3_2 or gemma3 or phi3)'"),
    ('chat-no-generation-prompt-accepted', 'pipeline/chat.py', 'if render(tokenizer, user, add_generation_prompt=True) == render(tokenizer, user):', 'if False:', 'tests/test_chat_templates.py -k cannot_mask'),
    ('chat-leading-assistant-accepted', 'pipeline/chat.py', '        if i == 0:\n            raise ConfigError("a conversation starts with an assistant turn', '        if False:\n            raise ConfigError("a conversation starts with an assistant turn', 'tests/test_chat_templates.py -k cannot_mask'),
    ('chat-eot-stop-unchecked', 'pipeline/chat.py', 'if not eot_ids or eot_ids[-1] not in stops:', 'if not eot_ids:', 'tests/test_chat_templates.py -k cannot_stop_at'),
    ('gen-top-p-dropped', 'pipeline/generation.py', 'temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)', 'temperature=cfg.temperature, top_p=1.0, top_k=cfg.top_k)', 'tests/test_generation.py'),
    ('gen-top-k-dropped', 'pipeline/generation.py', 'temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)', 'temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)', 'tests/test_generation.py'),
    ('gen-keep-start', 'pipeline/generation.py', '    return list(ids[len(ids) - limit:])', '    return list(ids[:limit])', 'tests/test_ppo.py -k cut_prompt_keeps_its_bos'),
    ('gen-stop-token-unmasked', 'pipeline/generation.py', 'mask = (positions <= first.unsqueeze(1)).long()', 'mask = (positions < first.unsqueeze(1)).long()', 'tests/test_chat_templates.py -k truncate_after'),
    ('gen-reward-start-no-header', 'pipeline/generation.py', 'starts.append(common_prefix(seqs[-1], chat_ids(tokenizer, list(m), add_generation_prompt=True)))', 'starts.append(common_prefix(seqs[-1], chat_ids(tokenizer, list(m), add_generation_prompt=False)))', 'tests/test_rm.py -k reply_start_is'),
    ('data-mixture-first-rows', 'pipeline/data.py', 'ds = ds.shuffle(seed=seed).select(range(min(int(src["max_rows"]), len(ds))))', 'ds = ds.select(range(min(int(src["max_rows"]), len(ds))))', "tests/test_data.py -k 'mixture or max_rows'"),
    ('data-split-floor', 'pipeline/data.py', 'n_eval = max(1, int(round(len(keys) * eval_fraction)))', 'n_eval = max(1, int(len(keys) * eval_fraction))', 'tests/test_data.py -k split'),
    ('data-row-split-unchecked', 'pipeline/data.py', '        if n_eval >= len(ds):', '        if False:', 'tests/test_data.py -k row_split'),
    ('sft-split-seed-ignored', 'stages/sft.py', 'train_ds, eval_ds = held_out_split(ds, args.eval_fraction, train_cfg.seed)', 'train_ds, eval_ds = held_out_split(ds, args.eval_fraction, 42)', 'tests/test_sft.py -k runs_seed'),
    ('sft-max-length-unchecked', 'stages/sft.py', 'if max_length and rows and not any(start < max_length for start in starts):', 'if False:', 'tests/test_sft.py -k cuts_every_assistant_token'),
    ('sft-max-length-boundary', 'stages/sft.py', 'if max_length and rows and not any(start < max_length for start in starts):', 'if max_length and rows and not any(start <= max_length for start in starts):', 'tests/test_sft.py -k cuts_every_assistant_token'),
    ('sft-masking-left-to-trl', 'stages/sft.py', '        train_cfg.assistant_only_loss = False\n', '\n', "tests/test_chat_templates.py -k 'exactly_each_reply and llama3_2'"),
    ('sft-whitespace-reply-kept', 'stages/sft.py', 'if any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):', 'if any(m["role"] == "assistant" and m["content"] for m in row["messages"]):', 'tests/test_sft.py -k without_an_assistant'),
    ('pairs-prompt-limit-exclusive', 'stages/pairs.py', 'keep = [i for i, ids in enumerate(encoded) if len(ids) <= args.max_prompt_tokens]', 'keep = [i for i, ids in enumerate(encoded) if len(ids) < args.max_prompt_tokens]', 'tests/test_pairs.py -k max_prompt_tokens_is_kept'),
    ('pairs-shuffle-seed-ignored', 'stages/pairs.py', 'ds = ds.shuffle(seed=args.seed)', 'ds = ds.shuffle(seed=42)', 'tests/test_pairs.py -k max_prompt_tokens_is_kept'),
    ('pairs-sampling-seed-ignored', 'stages/pairs.py', 'generator_seed=args.seed, progress=True)', 'generator_seed=42, progress=True)', 'tests/test_pairs.py -k max_prompt_tokens_is_kept'),
    ('pairs-one-response-accepted', 'stages/pairs.py', 'if args.num_responses < 2:', 'if args.num_responses < 1:', 'tests/test_pairs.py -k refuses'),
    ('dpo-reward-beta-dropped', 'stages/dpo.py', 'reward_chosen = [train_cfg.beta * (p - r) for p, r in zip(chosen, ref_chosen)]', 'reward_chosen = [(p - r) for p, r in zip(chosen, ref_chosen)]', "tests/test_dpo.py -k 'learns and llama'"),
    ('dpo-completion-mask-shifted', 'stages/dpo.py', 'batch["completion_mask"][:, 1:]', 'batch["completion_mask"][:, :-1]', "tests/test_dpo.py -k 'learns and llama'"),
    ('dpo-reference-chosen-for-rejected', 'stages/dpo.py', 'for p, r in zip(rejected, ref_rejected)]', 'for p, r in zip(rejected, ref_chosen)]', "tests/test_dpo.py -k 'learns and llama'"),
    ('dpo-reference-raw-base', 'stages/dpo.py', 'return PeftModel.from_pretrained(load_base(profile, tokenizer), str(sft_dir)).merge_and_unload()', 'return load_base(profile, tokenizer)', "tests/test_dpo.py -k 'learns and llama'"),
    ('sft-root-without-first-user', 'stages/sft.py', 'return json.dumps(msgs[: first_user + 1], sort_keys=True)', 'return json.dumps(msgs[: first_user], sort_keys=True)', 'tests/test_sft.py -k held_out'),
    ('sft-after-samples-unseeded', 'stages/sft.py', 'after = generate(trainer.model, tokenizer, prompts, sampling, generator_seed=0).texts', 'after = generate(trainer.model, tokenizer, prompts, sampling).texts', 'tests/test_sft.py -k bf16'),
    ('sft-samples-greedy', 'stages/sft.py', 'sampling = SamplingConfig(max_new_tokens=args.sample_max_new_tokens, temperature=0.7, top_k=50)', 'sampling = SamplingConfig(max_new_tokens=args.sample_max_new_tokens, temperature=0, top_k=50)', 'tests/test_sft.py -k bf16'),
    ('sft-sample-length-ignored', 'stages/sft.py', 'sampling = SamplingConfig(max_new_tokens=args.sample_max_new_tokens, temperature=0.7, top_k=50)', 'sampling = SamplingConfig(max_new_tokens=48, temperature=0.7, top_k=50)', 'tests/test_sft.py -k bf16'),
    ('gen-eot-not-a-stop', 'pipeline/generation.py', '            ids.append(eot_ids[0])', '            pass', 'tests/test_chat_templates.py -k stop_ids'),
    ('gen-prompt-no-header', 'pipeline/generation.py', 'ids = chat_ids(tokenizer, messages, add_generation_prompt=True)\n        out.append', 'ids = chat_ids(tokenizer, messages, add_generation_prompt=False)\n        out.append', 'tests/test_ppo.py -k cut_prompt_keeps_its_bos'),
    ('data-jsonl-blank-line-refused', 'pipeline/data.py', '            if not line.strip():\n                continue\n', '', 'tests/test_data.py -k blank_lines'),
    ('data-jsonl-line-numbers-from-0', 'pipeline/data.py', 'for n, raw in enumerate(f, 1):', 'for n, raw in enumerate(f):', 'tests/test_data.py -k byte_order_mark'),
    ('dpo-eval-fraction-ignored', 'stages/dpo.py', 'eval_fraction=args.eval_fraction,', 'eval_fraction=0.2,', 'tests/test_dpo.py -k default_data'),
    ('sft-bad-row-unnamed', 'stages/sft.py', '            raise ConfigError(f"row {i} of {data_name}: {err}") from None',
     '            raise', "tests/test_chat_templates.py -k cannot_mask"),
    # the label store, its stats and app, logins, and publishing
    ('store-undo-deletes-others', 'stages/label/store.py', 'con.execute("DELETE FROM labels WHERE pair_id = ? AND annotator = ?", (pair_id, annotator))', 'con.execute("DELETE FROM labels WHERE pair_id = ?", (pair_id,))', 'tests/test_label_store.py -k undo'),
    ('store-undo-reverts-to-undone', 'stages/label/store.py', '"AND undone = 0 AND id < ? ORDER BY id DESC LIMIT 1"', '"AND id < ? ORDER BY id DESC LIMIT 1"', 'tests/test_label_store.py -k undo'),
    ('store-undo-anyones-last', 'stages/label/store.py', '"SELECT * FROM label_history WHERE annotator = ? AND action IN (\'new\', \'change\', \'skip\') AND undone = 0 "', '"SELECT * FROM label_history WHERE (annotator = ? OR 1) AND action IN (\'new\', \'change\', \'skip\') AND undone = 0 "', 'tests/test_label_store.py -k undo'),
    ('store-remove-people', 'stages/label/store.py', '        if not is_simulated(annotator):\n            raise ValueError(f"only simulated', '        if False:\n            raise ValueError(f"only simulated', 'tests/test_simulate.py -k rerun_with_other'),
    ('store-simulate-writes-people', 'stages/label/store.py', 'if not all(is_simulated(a) for a in [*remove, *(lab[0] for lab in labels)]):', 'if not all(is_simulated(a) for a in remove):', 'tests/test_simulate.py -k killed_midway'),
    ('store-progress-labels-inactive', 'stages/label/store.py', 'one(f"SELECT COUNT(*) FROM labels l JOIN items i USING (pair_id) WHERE i.active = 1 AND {PERSON}")', 'one(f"SELECT COUNT(*) FROM labels l JOIN items i USING (pair_id) WHERE {PERSON}")', "tests/test_label_store.py -k 'progress or overlap'"),
    ('store-note-limit-inclusive', 'stages/label/store.py', 'if len(note) > self.max_note_chars:', 'if len(note) >= self.max_note_chars:', "tests/test_label_guards.py -m 'not slow'"),
    ('stats-people-vs-sim-by-side', 'stages/label/stats.py', 'per_pair[lab["pair_id"]][is_simulated(lab["annotator"])].append(category(lab))', 'per_pair[lab["pair_id"]][is_simulated(lab["annotator"])].append(lab["choice"])', "tests/test_label_store.py tests/test_simulate.py -k 'human_vs_simulated or stats'"),
    ('stats-mean-kappa-sum', 'stages/label/stats.py', 'round(sum(k["kappa"] for k in kappas.values()) / len(kappas), 3)', 'round(sum(k["kappa"] for k in kappas.values()), 3)', "tests/test_label_store.py -k 'kappa or summarize or stats'"),
    ('stats-per-hour-first-24', 'stages/label/stats.py', 'dict(sorted(hours.items())[-24:])', 'dict(sorted(hours.items())[:24])', "tests/test_label_store.py -k 'kappa or summarize or stats'"),
    ('stats-cell-unescaped', 'stages/label/stats.py', 'return f"<{tag}{align}>{html.escape(str(v))}</{tag}>"', 'return f"<{tag}{align}>{str(v)}</{tag}>"', "tests/test_label_store.py -k 'escaped or stats_tab'"),
    ('stats-sim-names-unescaped', 'stages/label/stats.py', "({e(', '.join(sim['annotators']))})", "({', '.join(sim['annotators'])})", "tests/test_label_store.py -k 'escaped or stats_tab'"),
    ('app-progress-name-unescaped', 'stages/label/app.py', 'who = f" ({html.escape(annotator)})" if annotator else ""', 'who = f" ({annotator})" if annotator else ""', "tests/test_label_store.py -k 'escaped or stats_tab'"),
    ('app-done-name-unescaped', 'stages/label/app.py', 'Nothing is left for you, {html.escape(me)}', 'Nothing is left for you, {me}', 'tests/test_label_api.py -k on_load'),
    ('app-role-unescaped', 'stages/label/app.py', '<div class="role">{html.escape(m["role"])}</div>', '<div class="role">{m["role"]}</div>', 'tests/test_label_browser.py -k plain_text'),
    ('app-saved-name-over-login', 'stages/label/app.py', 'annotator = request.username if use_login else clean_name(saved)', 'annotator = (clean_name(saved) or request.username) if use_login else clean_name(saved)', "tests/test_label_api.py -k 'on_load or login_cannot'"),
    ('config-hostname-is-loopback', 'stages/label/config.py', 'return False  # a hostname: it may resolve to anything', 'return True  # a hostname: it may resolve to anything', "tests/test_label_store.py -k 'auth or hostname or users'"),
    ('config-empty-password', 'stages/label/config.py', 'if not sep or not name.strip() or not password:', 'if not sep or not name.strip():', "tests/test_label_store.py -k 'auth or hostname or users'"),
    ('config-min-agreement-unchecked', 'stages/label/config.py', 'if not 0 <= self.min_agreement <= 1:', 'if not 0 <= self.min_agreement:', 'tests/test_label_store.py -k min_agreement'),
    ('card-reward-means-swapped', 'stages/publish_card.py', 'f"| reward-model score (mean) | {ev[\'reward_sft_mean\']:.3f} | {ev[\'reward_ppo_mean\']:.3f} |"', 'f"| reward-model score (mean) | {ev[\'reward_ppo_mean\']:.3f} | {ev[\'reward_sft_mean\']:.3f} |"', "tests/test_publish.py -k 'card_leads or card_credits or commit_message or by_hand'"),
    ('card-kl-wrong-field', 'stages/publish_card.py', '| 0 | {ev[\'kl_mean\']:.3f} |"', '| 0 | {ev[\'length_ppo_mean\']:.3f} |"', "tests/test_publish.py -k 'card_leads or card_credits or commit_message or by_hand'"),
    ('card-hacking-flag-dropped', 'stages/publish_card.py', 'if ev.get("reward_hacking_suspected"):', 'if False:', "tests/test_publish.py -k 'card_leads or card_credits or commit_message or by_hand'"),
    ('card-policy-flag-dropped', 'stages/publish_card.py', '] if policy in ev.get("flagged_policies", []) else [])', '] if False else [])', "tests/test_publish.py -k 'card_leads or card_credits or commit_message or by_hand'"),
    ('card-reward-first-is-last', 'stages/publish_card.py', "reward {fmt(trained.get('reward_first'))} → ", "reward {fmt(trained.get('reward_last'))} → ", "tests/test_publish.py -k 'card_leads or card_credits or commit_message or by_hand'"),
    ('card-dataset-license-is-model-license', 'stages/publish_card.py', '| {args.dataset_license} |")', '| {args.license} |")', "tests/test_publish.py -k 'card_leads or card_credits or commit_message or by_hand'"),
    ('publish-dataset-card-license', 'stages/publish.py', 'DatasetCardData(license=args.dataset_license,', 'DatasetCardData(license=args.license,', "tests/test_publish.py -k 'card_leads or card_credits or commit_message or by_hand'"),
    ('publish-read-token-accepted', 'stages/publish.py', '(who.get("auth", {}).get("accessToken", {}) or {}).get("role") == "read":', '(who.get("auth", {}).get("accessToken", {}) or {}).get("role") == "none":', "tests/test_publish.py -k 'token or permission'"),
    ('publish-token-in-manifest', 'stages/publish.py', 'config = {"publish": to_dict(args), "run": to_dict(run)}', 'config = {"publish": {**to_dict(args), "token": token}, "run": to_dict(run)}', 'tests/test_publish.py -k upload_end_to_end'),
    # sharding, LoRA combining, models, config ranges and make base
    ('fsdp-version-1-accepted', 'pipeline/sharding.py', 'if version != "2":', 'if False:', "tests/test_sharding.py -m 'not slow'"),
    ('fsdp-head-not-a-unit', 'pipeline/sharding.py', 'if child is not trunk and any(True for _ in child.parameters()):', 'if False:', "tests/test_sharding.py -m 'not slow'"),
    ('fsdp-accelerate-left-on', 'pipeline/sharding.py', '    os.environ["ACCELERATE_USE_FSDP"] = "false"\n', '\n', "tests/test_sharding.py -m 'not slow'"),
    ('spread-rank-offset', 'pipeline/sharding.py', 'b = min(r * world + rank, n_batches - 1)', 'b = min(r * world, n_batches - 1)', 'tests/test_sharding.py -k spread'),
    ('spread-repeat-kept', 'pipeline/sharding.py', 'if r * world + rank < n_batches:', 'if True:', 'tests/test_sharding.py -k spread'),
    ('fsdp-local-numel-whole', 'pipeline/sharding.py', 'local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()', 'local += p.numel()', 'tests/test_sharding.py -k sft_fsdp2'),
    ('ppo-shard-auto-without-launch', 'stages/ppo/sharding.py', '(cfg.shard_base == "auto" and fsdp_launch())', '(cfg.shard_base == "auto")', "tests/test_ppo_sharding.py -m 'not slow'"),
    ('ppo-shard-one-process', 'stages/ppo/sharding.py', 'if world_size < 2:', 'if world_size < 1:', "tests/test_ppo_sharding.py -m 'not slow'"),
    ('ppo-base-numel-adapters', 'stages/ppo/sharding.py', 'base = [p for n, p in stack.model.named_parameters() if adapter_of(n) is None]', 'base = list(stack.model.parameters())', "tests/test_ppo_sharding.py -m 'not slow'"),
    ('ppo-shard-tied-split', 'stages/ppo/sharding.py', 'shared = next((owner[i] for i in ids if i in owner), None)', 'shared = None', "tests/test_ppo_sharding.py -m 'not slow'"),
    ('ppo-every-rank-any', 'stages/ppo/sharding.py', 'return int(t.item()) == 0', 'return int(t.item()) < 2', 'tests/test_ppo_sharding.py -k every_rank_is_true'),
    ('combine-rslora-dropped', 'pipeline/lora_combine.py', 'return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r', 'return alpha / r', "tests/test_dpo.py -k 'combined_adapter or uncombinable or by_hand_keeps or trained_bias'"),
    ('combine-second-unscaled', 'pipeline/lora_combine.py', 'b2.double() * s2', 'b2.double()', "tests/test_dpo.py -k 'combined_adapter or uncombinable or by_hand_keeps or trained_bias'"),
    ('combine-other-weights-kept', 'pipeline/lora_combine.py', '    if other:\n', '    if False:\n', "tests/test_dpo.py -k 'combined_adapter or uncombinable or by_hand_keeps or trained_bias'"),
    ('combine-bias-accepted', 'pipeline/lora_combine.py', ' or config.get("bias", "none") != "none" or extras:', ' or extras:', "tests/test_dpo.py -k 'combined_adapter or uncombinable or by_hand_keeps or trained_bias'"),
    ('combine-b-left-float64', 'pipeline/lora_combine.py', 'combined[m + ".lora_B.weight"] = scaled.to(dtype).contiguous()', 'combined[m + ".lora_B.weight"] = scaled.contiguous()', "tests/test_dpo.py -k 'combined_adapter or uncombinable or by_hand_keeps or trained_bias'"),
    ('models-fingerprint-ignored', 'pipeline/models.py', '        if diff:\n', '        if False:\n', 'tests/test_ppo.py -k bad_inputs_are_refused'),
    ('models-fingerprint-vocab-dropped', 'pipeline/models.py', 'FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size",', 'FINGERPRINT_KEYS = ("model_type", "hidden_size",', 'tests/test_trust_errors.py -k another_shape'),
    ('models-pad-is-bos', 'pipeline/models.py', 'tok.pad_token = tok.eos_token', 'tok.pad_token = tok.bos_token', 'tests/test_chat_templates.py -k without_a_pad'),
    ('models-pad-id-not-set', 'pipeline/models.py', '    model.config.pad_token_id = tokenizer.pad_token_id\n', '\n', 'tests/test_chat_templates.py -k without_a_pad'),
    ('models-target-bare-suffix', 'pipeline/models.py', 'n == t or n.endswith("." + t)', 'n == t or n.endswith(t)', "tests/test_sft.py -k 'wrong_lora_targets or whole_module_name'"),
    ('models-bf16-as-fp16', 'pipeline/models.py', '"bfloat16": torch.bfloat16,', '"bfloat16": torch.float16,', 'tests/test_rm.py -k bf16'),
    ('config-variant-overrides-lost', 'pipeline/config.py', 'yaml_values = {**base_values, **yaml_values}', 'yaml_values = {**yaml_values, **base_values}', 'tests/test_config.py'),
    ('config-seed-top-inclusive', 'pipeline/config.py', '(v >= high if name != "top_p" else v > high)', '(v > high)', 'tests/test_config.py'),
    ('config-nan-accepted', 'pipeline/config.py', 'if v != v or (v < low', 'if (v < low', 'tests/test_config.py'),
    ('config-top-p-zero', 'pipeline/config.py', '"top_p": (0, 1, False),', '"top_p": (0, 1, True),', 'tests/test_config.py'),
    ('config-base-file-unnamed', 'pipeline/config.py', 'yaml_file = {**{key: str(base_path) for key in base_values}, **yaml_file}', 'yaml_file = {**{key: config_path for key in base_values}, **yaml_file}', 'tests/test_config.py'),
    ('config-max-steps-zero', 'pipeline/config.py', 'steps != -1 and steps < 1:', 'steps < -1:', 'tests/test_config.py'),
    ('adapters-last-token-ignores-pad', 'pipeline/adapters.py', '        keep = keep & (input_ids != pad_token_id)\n', '        keep = keep\n', 'tests/test_rm.py -k pool_scores_by_hand'),
    ('adapters-head-not-fp32', 'pipeline/adapters.py', 'base.score = nn.Linear(hidden, 1, bias=False, dtype=torch.float32,', 'base.score = nn.Linear(hidden, 1, bias=False, dtype=first.dtype,', 'tests/test_rm.py -k bf16'),
    ('base-warmup-from-zero', 'stages/base.py', 'return cfg.learning_rate * (step + 1) / cfg.warmup_steps', 'return cfg.learning_rate * step / cfg.warmup_steps', 'tests/test_base.py'),
    ('base-heldout-trained-on', 'stages/base.py', 'train_texts = [t for name, t in books.items() if name not in cfg.heldout_books]', 'train_texts = list(books.values())', 'tests/test_base.py'),
    ('base-norms-decayed', 'stages/base.py', 'decay = [p for n, p in model.named_parameters() if p.dim() >= 2]', 'decay = [p for n, p in model.named_parameters() if p.dim() >= 1]', 'tests/test_base.py'),
    ('base-config-no-pad', 'stages/base.py', 'pad_token_id=tokenizer.pad_token_id,\n    )', ')', 'tests/test_base.py'),
    # eval's intervals, tables, plots and KL; the judges' row numbers
    ('eval-curve-point-kl-not-sqrt', 'stages/eval_ppo.py', '"sqrt_kl": math.sqrt(max(mean_kl, 0.0)),', '"sqrt_kl": max(mean_kl, 0.0),', 'tests/test_eval.py -k gold_figures_are_the_judges'),
    ('eval-kept-final-measured-twice', 'stages/eval.py', 'if update == 0 or update >= final_update:', 'if update == 0 or update > final_update:', 'tests/test_eval.py -k checkpoint_curve_and_rm_agreement'),
    ('winrate-tie-as-loss', 'stages/eval_compare.py', 'losses = sum(p < s - tie_eps for p, s in zip(ppo, sft))', 'losses = sum(p < s + tie_eps for p, s in zip(ppo, sft))', 'tests/test_eval.py -k wilson_interval_and_ties'),
    ('human-interval-ties-dropped', 'stages/eval_ppo.py', 'low, high = wilson(wins + 0.5 * ties, len(rows))', 'low, high = wilson(wins, len(rows))', 'tests/test_eval.py -k interval_is_of_wins'),
    ('agreement-interval-counts-gold-ties', 'stages/eval_ppo.py', 'low, high = wilson(agree, len(pairs))', 'low, high = wilson(agree, len(proxy_a))', 'tests/test_eval.py -k gold_agreement_by_hand'),
    ('kept-policies-by-folder-name', 'stages/eval.py', '    return sorted(found)\n', '    return sorted(found, key=lambda f: f[1].name)\n', 'tests/test_eval.py -k ordered_by_update'),
    ('plot-gold-vs-kl-axes-swapped', 'stages/eval_plots.py', 'x, y = [p["sqrt_kl"] for p in points], [p["gold_mean"] for p in points]', 'x, y = [p["gold_mean"] for p in points], [p["sqrt_kl"] for p in points]', 'tests/test_eval_compare.py -k sqrt_kl_and_gold'),
    ('plot-overopt-proxy-is-gold', 'stages/eval_plots.py', 'twin.plot(x, [p["proxy_mean"] for p in points]', 'twin.plot(x, [p["gold_mean"] for p in points]', 'tests/test_eval.py -k draw_each_series'),
    ('plot-training-x-row-index', 'stages/eval_plots.py', 'x = [r.get("update", i) for i, r in enumerate(rows)]', 'x = list(range(len(rows)))', 'tests/test_eval.py -k draw_each_series'),
    ('plot-hist-lengths-swapped', 'stages/eval_plots.py', '[float(x) for x in sft["lengths"]], [float(x) for x in ppo["lengths"]]', '[float(x) for x in ppo["lengths"]], [float(x) for x in sft["lengths"]]', 'tests/test_eval.py -k draw_each_series'),
    ('sample-table-gold-swapped', 'stages/eval_ppo.py', '(f" {s[\'gold_sft\']:.3f} | {s[\'gold_ppo\']:.3f} |" if gold else "")', '(f" {s[\'gold_ppo\']:.3f} | {s[\'gold_sft\']:.3f} |" if gold else "")', 'tests/test_eval.py -k sections_tables'),
    ('matrix-md-transposed', 'stages/eval_compare.py', 'f"{matrix[a][b][\'rate\']:.0%} ({matrix[a][b][\'ci_low\']:.0%}–{matrix[a][b][\'ci_high\']:.0%})"', 'f"{matrix[b][a][\'rate\']:.0%} ({matrix[b][a][\'ci_low\']:.0%}–{matrix[b][a][\'ci_high\']:.0%})"', 'tests/test_eval_compare.py -k row_over_column'),
    ('report-curve-table-kl-not-sqrt', 'stages/eval_ppo.py', 'f"| {p[\'update\']} | {p[\'policy\']} | {p[\'sqrt_kl\']:.3f} |', 'f"| {p[\'update\']} | {p[\'policy\']} | {p[\'kl_mean\']:.3f} |', 'tests/test_eval.py -k sections_tables'),
    ('report-median-swapped', 'stages/eval_ppo.py', 'f"| reward (median) | {report[\'reward\'][\'sft\'][\'median\']:.3f} | {report[\'reward\'][\'ppo\'][\'median\']:.3f} |"', 'f"| reward (median) | {report[\'reward\'][\'ppo\'][\'median\']:.3f} | {report[\'reward\'][\'sft\'][\'median\']:.3f} |"', 'tests/test_eval.py -k sections_tables'),
    ('judge-bad-row-offset-lost', 'pipeline/judges.py', 'gave {value!r} for row {start + i}:', 'gave {value!r} for row {i}:', 'tests/test_judges.py -k whole_list'),
    ('overopt-se-n-minus-1', 'stages/eval_compare.py', 'se = statistics.stdev(drops) / math.sqrt(len(drops))', 'se = statistics.stdev(drops) / math.sqrt(len(drops) - 1)', 'tests/test_eval_compare.py -k standard_errors_of_the_mean'),
    ('eval-judge-allows-reward-adapter', 'stages/eval.py', 'own = [p for p in (*members, *(c.get("reward_adapter") for c in trained_configs)) if p]', 'own = [p for p in members if p]', 'tests/test_eval.py -k given_is_refused'),
    ('eval-kl-positions-ignored', 'stages/eval.py', 'pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding', 'pos = None  # left padding', 'tests/test_eval.py -k left_padded_or_alone'),
    ('judge-failed-rows-offset-lost', 'pipeline/judges.py', 'failed on rows {start}-{start + len(batch_r) - 1}: ', 'failed on rows 0-{len(batch_r) - 1}: ', 'tests/test_judges.py -k whole_list'),
    ('plot-hist-sft-drawn-as-ppo', 'stages/eval_plots.py', 'ax.hist(sft, bins=bins, alpha=0.55, label=f"SFT', 'ax.hist(ppo, bins=bins, alpha=0.55, label=f"SFT', 'tests/test_eval.py -k draw_each_series'),
    ('gold-markdown-means-swapped', 'stages/eval_ppo.py', 'f"| gold score (mean) | {figures[\'gold_sft_mean\']:.3f} | {figures[\'gold_ppo_mean\']:.3f} |"', 'f"| gold score (mean) | {figures[\'gold_ppo_mean\']:.3f} | {figures[\'gold_sft_mean\']:.3f} |"', 'tests/test_eval.py -k sections_tables'),
    # the reward model's plan, margin, interval, reload tolerance, head, cut; each annotator's own draw
    ('rm-plan-world-size', 'stages/rm.py', '* world_size))', '))', 'tests/test_rm.py -k plan_steps'),
    ('rm-plan-epoch-floor', 'stages/rm.py', 'per_epoch = math.ceil(n_train / (train_cfg.per_device_train_batch_size * train_cfg.gradient_accumulation_steps', 'per_epoch = math.floor(n_train / (train_cfg.per_device_train_batch_size * train_cfg.gradient_accumulation_steps', 'tests/test_rm.py -k plan_steps'),
    ('rm-plan-no-epoch-floor', 'stages/rm.py', 'steps = min(max(per_epoch, args.min_steps),', 'steps = min(args.min_steps,', 'tests/test_rm.py -k plan_steps'),
    ('rm-plan-evals-floor', 'stages/rm.py', 'eval_steps = max(1, math.ceil(steps / args.evals))', 'eval_steps = max(1, steps // args.evals)', 'tests/test_rm.py -k plan_steps'),
    ('rm-margin-not-trained', 'stages/rm.py', 'if args.margin_scale:  # RewardTrainer subtracts', 'if False:  # RewardTrainer subtracts', "tests/test_rm.py -k 'margin_the_training_loss and false'"),
    ('rm-group-margin-not-trained', 'stages/rm.py', 'tokenizer.pad_token_id, bool(args.margin_scale), args.share_prefix', 'tokenizer.pad_token_id, False, args.share_prefix', "tests/test_rm.py -k 'margin_the_training_loss and true'"),
    ('rm-ci95-wrong-count', 'stages/rm_scoring.py', '"ci95": wilson(right, len(diffs))', '"ci95": wilson(len(diffs) - right, len(diffs))', 'tests/test_rm.py -k heldout_metrics_and_weights'),
    ('rm-reload-bf16-loose', 'stages/rm_scoring.py', '"bfloat16": (5e-2, 3e-2)', '"bfloat16": (5e-1, 3e-2)', 'tests/test_rm_reload.py -k tolerance_is_rounding'),
    ('rm-reload-flip-any', 'stages/rm_scoring.py', '& (margin.abs() > 2 * allowed[:n].maximum(allowed[n:]))', '& (margin.abs() > 0)', "tests/test_rm_reload.py -k 'not fresh_process'"),
    ('rm-saved-head-unchecked', 'stages/rm_scoring.py', 'if not any(k.split(".")[-2] == head for k in f.keys()):', 'if False:', 'tests/test_rm_reload.py -k without_the_score_head'),
    ('rm-max-rows-first', 'stages/rm_data.py', '            random.Random(seed).shuffle(rows)\n', '', "tests/test_rm.py -k 'leave_ties_out'"),
    ('rm-no-room-one-token', 'stages/rm_data.py', 'if cap < 2:', 'if cap < 1:', 'tests/test_rm.py -k truncate_pair_keeps'),
    ('rm-strength-last-word', 'stages/rm_data.py', 'word = words[0] if words else ""', 'word = words[-1] if words else ""', 'tests/test_rm.py -k strength_margin'),
    ('rm-split-by-row', 'stages/rm_data.py', 'return json.dumps(row["prompt"], sort_keys=True) if row.get("prompt") else f"row {index}"', 'return f"row {index}"', 'tests/test_rm.py -k data_formats'),
    ('rm-group-losers-offset', 'stages/rm_groups.py', 'losers += [offset + i for i in g["losers"]]', 'losers += [i for i in g["losers"]]', "tests/test_rm_groups.py -k 'not trains'"),
    ('sim-members-share-draws', 'stages/simulate.py', 'uniform(args.seed, name, pair_id)', 'uniform(args.seed, annotator, pair_id)', 'tests/test_simulate.py -k own_annotators_draw'),
    ('sim-members-share-order', 'stages/simulate.py', 'left = store.shown_left(pair_id, name)', 'left = store.shown_left(pair_id, annotator)', 'tests/test_simulate.py -k own_annotators_draw'),
    ('sim-calibrated-on-ties', 'stages/simulate.py', 'outside = [abs(s[0] - s[1]) for s in scores.values() if abs(s[0] - s[1]) >= max(args.tie_band, 1e-12)]', 'outside = [abs(s[0] - s[1]) for s in scores.values()]', "tests/test_simulate.py -k 'wide_tie_band or own_annotators_draw'"),
    ('sim-people-other-pairs', 'stages/simulate.py', 'return db.is_file() and any(not is_simulated(lab["annotator"]) and lab["pair_id"] in pair_ids', 'return db.is_file() and any(not is_simulated(lab["annotator"])', 'tests/test_simulate.py -k share_a_store'),
    ('export-no-majority-kept', 'stages/label/export.py', 'if len(ranked) > 1 and ranked[1][1] == n_top:', 'if False:', 'tests/test_label_store.py -k export'),
    ('export-strength-least-common', 'stages/label/export.py', 'strength=strengths.most_common(1)[0][0] if strengths', 'strength=strengths.most_common()[-1][0] if strengths', 'tests/test_label_store.py -k export'),
    ('export-agreement-before-both-bad', 'stages/label/export.py', '        if both_bad == "tie":\n            votes = ["tie" if v == "both_bad" else v for v in votes]\n', '', 'tests/test_label_store.py -k export'),
    ('fresh-rows-digest-order', 'stages/label/fresh_export.py', 'hashlib.sha256("\\n".join(sorted(json.dumps(r, sort_keys=True) for r in rows)).encode())', 'hashlib.sha256("\\n".join([json.dumps(r, sort_keys=True) for r in rows]).encode())', 'tests/test_label_export.py -k rows_leaves'),
    ('fresh-push-replayed', 'stages/label/fresh_export.py', 'NOT_REPLAYED = ("--push_to_hub", "--hub_private", "--refresh")', 'NOT_REPLAYED = ("--refresh",)', 'tests/test_label_export.py -k last_exports_flags'),
    # PPO's resume digests, kept policies, rank slices, value offset, dropout; launch; run folders
    ('ppo-reference-pass-is-policy', 'stages/ppo/rollout.py', '            stack.use("reference")\n', '            stack.use("policy")\n', 'tests/test_ppo.py -k one_base_four_adapters'),
    ('ppo-value-pass-is-reward', 'stages/ppo/rollout.py', '        else:\n            stack.use("value")\n            store', '        else:\n            stack.use("reward")\n            store', 'tests/test_ppo.py -k value_top_layers'),
    ('ppo-resume-log-drops-checkpointed-update', 'stages/ppo/trainer.py', 'rows = [r for r in logged_rows(path) if r["update"] <= self.update]', 'rows = [r for r in logged_rows(path) if r["update"] < self.update]', 'tests/test_ppo.py -k cut_by_a_kill'),
    ('ppo-finished-checkpoint-retrains', 'stages/ppo/__init__.py', 'checkpoint_info(ckpt).get("update", 0) <= cfg.total_updates', 'checkpoint_info(ckpt).get("update", 0) < cfg.total_updates', 'tests/test_ppo.py -k killed_after_the_last_checkpoint'),
    ('ppo-resume-model-profile-unrecorded', 'stages/ppo/__init__.py', '    settings["model_config"] = config["run"].get("model_config")\n', '', 'tests/test_ppo.py -k model_profile_and_adapter_bytes'),
    ('ppo-adapter-digest-config-only', 'stages/ppo/__init__.py', 'for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):', 'for name in ("adapter_config.json", "adapter_model.bin"):', 'tests/test_ppo.py -k model_profile_and_adapter_bytes'),
    ('ppo-earlier-runs-policies-kept', 'stages/ppo/__init__.py', '        shutil.rmtree(stage.dir / "policies", ignore_errors=True)', '        pass', 'tests/test_ppo.py -k policies_an_earlier_run'),
    ('ppo-rank-prompt-offset-dropped', 'stages/ppo/trainer.py', 'start = (self.episodes // k) + self.rank * n_groups', 'start = (self.episodes // k)', 'tests/test_ppo.py -k own_slice_of_the_prompt_stream'),
    ('ppo-long-prompt-at-the-limit-dropped', 'stages/ppo/__init__.py', 'long = [i for i, s in enumerate(ids) if len(s) > limit]', 'long = [i for i, s in enumerate(ids) if len(s) >= limit]', 'tests/test_ppo.py -k exactly_max_prompt_length'),
    ('ppo-critic-fit-head-unscaled', 'stages/ppo/trainer.py', '            p.mul_(a)\n', '            pass\n', 'tests/test_ppo.py -k value_update_adds'),
    ('ppo-rollout-value-offset-dropped', 'stages/ppo/trainer.py', 'if self.critic_fitted and self.value_offset:', 'if False:', 'tests/test_ppo.py -k later_rollout_carries'),
    ('ppo-dropout-left-on', 'stages/ppo/__init__.py', '            m.p = 0.0\n', '            pass\n', 'tests/test_ppo.py -k dropout_is_off'),
    ('ppo-kl-coef-zero-refused', 'stages/ppo/config.py', '"kl_coef": (0, None, True)', '"kl_coef": (0, None, False)', 'tests/test_ppo.py -k "out_of_range or edges_of_the_ranges"'),
    ('ppo-gamma-above-1-accepted', 'stages/ppo/config.py', '"gamma": (0, 1, True)', '"gamma": (0, None, True)', 'tests/test_ppo.py -k "out_of_range or edges_of_the_ranges"'),
    ('launch-own-config-gets-all-gpus', 'pipeline/launch.py', '    if path.parent != SHIPPED_CONFIGS:\n        return []', '    if False:\n        return []', 'tests/test_make.py -k all_gpu_configs'),
    ('launch-chained-stale-files-refused', 'pipeline/launch.py', 'if chained and why.startswith("the command line changed"):', 'if chained:', 'tests/test_make.py -k label_export_rm_ppo_chain'),
    ('launch-force-in-args-ignored', 'pipeline/launch.py', 'force = "--force" in ours or "--force" in stage_args', 'force = "--force" in ours', 'tests/test_make.py -k label_export_rm_ppo_chain'),
    ('launch-one-rank-config-error-hides-crash', 'pipeline/launch.py', 'if failures and all(f.exitcode == CONFIG_ERROR_EXIT', 'if failures and any(f.exitcode == CONFIG_ERROR_EXIT', 'tests/test_make.py -k crashed_rank'),
    ('run-stale-manifest-kept', 'pipeline/run.py', '            if self.manifest_path.exists():\n                self.manifest_path.unlink()', '            if False:\n                self.manifest_path.unlink()', 'tests/test_make.py -k drops_the_old_manifest'),
    ('run-optional-absence-unrecorded', 'pipeline/run.py', '        manifests = {name: None for name in self.optional}\n', '        manifests = {}\n', 'tests/test_make.py -k label_export_rm_ppo_chain'),
    ('run-big-file-size-only', 'pipeline/run.py', 'h.update(f"{size}:{f.stat().st_mtime_ns}".encode())', 'h.update(f"{size}".encode())', 'tests/test_make.py -k same_size_is_a_change'),
    ('run-folder-digest-names-dropped', 'pipeline/run.py', '        h.update(str(f.relative_to(path)).encode() + b"\\0")\n', '', 'tests/test_make.py -k covers_its_file_names'),
    ('adapters-prompt-part-inclusive', 'pipeline/adapters.py', '.unsqueeze(0) < starts.unsqueeze(1)', '.unsqueeze(0) <= starts.unsqueeze(1)', 'tests/test_rm.py -k pool_scores_by_hand'),
    ('ppo-no-eos-fraction-inverted', 'stages/ppo/trainer.py', '"no_eos_fraction": L.global_mean((~ro.ended).float(), rows, g)', '"no_eos_fraction": L.global_mean((ro.ended).float(), rows, g)', 'tests/test_ppo.py -k no_eos_share'),
    # the benchmarks' figures and verdicts (bench/harness.py, bench_ppo.py, bench_rl.py, bench_sft.py, story*.py,
    # run_ours.py) and the shared statistics (pipeline/stats.py, pipeline/report.py)
    ('bench-summarise-mean', 'bench/harness.py', 'out[k] = round(statistics.median(vals), 4) if vals else None', 'out[k] = round(statistics.fmean(vals), 4) if vals else None', 'tests/test_bench_rl.py -k summarise_is_the_median'),
    ('bench-summarise-zero-dropped', 'bench/harness.py', 'vals = [r[k] for r in runs if r.get(k) is not None]', 'vals = [r[k] for r in runs if r.get(k)]', 'tests/test_bench_rl.py -k summarise_is_the_median'),
    ('bench-speed-ratio-inverted', 'bench/harness.py', 'ratio[k] = round(a / b, 3) if a and b else None', 'ratio[k] = round(b / a, 3) if a and b else None', 'tests/test_bench_rl.py -k speed_memory_ratio'),
    ('bench-paired-ratio-mean', 'bench/harness.py', 'round(statistics.median(ratios), 3) if ratios else None', 'round(statistics.fmean(ratios), 3) if ratios else None', 'tests/test_bench_rl.py -k paired_ratios'),
    ('bench-gold-summary-after-not-gain', 'bench/harness.py', 'gain_over_rounds([r["gold_gain"] for r in runs])', 'gain_over_rounds([r["gold_after"] for r in runs])', 'tests/test_bench_rl.py -k gold_summary'),
    ('bench-verdict-strict', 'bench/harness.py', '"meets_gold_gain_target": (a - b >= -se)', '"meets_gold_gain_target": (a - b > -se)', 'tests/test_bench_rl.py -k exactly_one_standard_error'),
    ('bench-verdict-sides-swapped', 'bench/harness.py', 'a, b = ours.get("gold_gain_mean"), peer.get("gold_gain_mean")', 'b, a = ours.get("gold_gain_mean"), peer.get("gold_gain_mean")', 'tests/test_bench_rl.py -k gain_verdict'),
    ('bench-add-gold-before-after-swapped', 'bench/harness.py', 'r.update(gold_gain(measured["sft"]["scores"], policy["scores"]))', 'r.update(gold_gain(policy["scores"], measured["sft"]["scores"]))', 'tests/test_bench_rl.py -k add_gold'),
    ('bench-gold-temperature-lost', 'bench/harness.py', ' "--temperature", str(c["temperature"]),', '', 'tests/test_bench_rl.py -k gold_eval_command'),
    ('bench-rss-kb-not-mb', 'bench/harness.py', 'return (json.loads(lines[-1]) if lines else {}), ru.ru_maxrss / 1024.0, wall', 'return (json.loads(lines[-1]) if lines else {}), ru.ru_maxrss, wall', 'tests/test_bench_rl.py -k run_child'),
    ('bench-child-first-json', 'bench/harness.py', 'return (json.loads(lines[-1]) if lines else {})', 'return (json.loads(lines[0]) if lines else {})', 'tests/test_bench_rl.py -k run_child'),
    ('rl-bench-order-fixed', 'bench/bench_rl.py', 'for side in (["ours", "peer"] if rnd % 2 else ["peer", "ours"]):', 'for side in ["ours", "peer"]:', 'tests/test_bench_rl.py -k alternates_the_sides'),
    ('rl-bench-seed-not-per-round', 'bench/bench_rl.py', 'seed = COMMON["seed"] + rnd - 1', 'seed = COMMON["seed"]', 'tests/test_bench_rl.py -k seed_both_sides'),
    ('rl-bench-speed-target-flipped', 'bench/bench_rl.py', 'ratio["episodes_per_s"] >= 1.5', 'ratio["episodes_per_s"] <= 1.5', 'tests/test_bench_rl.py -k alternates_the_sides'),
    ('rl-bench-rss-target-flipped', 'bench/bench_rl.py', 'ratio["peak_rss_mb"] <= 0.7', 'ratio["peak_rss_mb"] >= 0.7', 'tests/test_bench_rl.py -k alternates_the_sides'),
    ('rl-bench-verdict-peer-first', 'bench/bench_rl.py', '**gain_verdict(res["ours"], res["peer"])', '**gain_verdict(res["peer"], res["ours"])', 'tests/test_bench_rl.py -k alternates_the_sides'),
    ('ppo-bench-seed-not-per-round', 'bench/bench_ppo.py', '"--seed", str(COMMON["seed"] + rnd - 1)]', '"--seed", str(COMMON["seed"])]', 'tests/test_bench_ppo.py -k side_args'),
    ('ppo-bench-story-lr-lost', 'bench/bench_ppo.py', 'lr = s.get("lr", COMMON["lr"])', 'lr = COMMON["lr"]', 'tests/test_bench_ppo.py -k side_args'),
    ('ppo-bench-last-minus-first-swapped', 'bench/bench_ppo.py', 'round(scores[-1] - scores[0], 4)', 'round(scores[0] - scores[-1], 4)', 'tests/test_bench_ppo.py -k side_result'),
    ('ppo-bench-order-fixed', 'bench/bench_ppo.py', 'order = ["ours", "peer"] if rnd % 2 else ["peer", "ours"]', 'order = ["ours", "peer"]', 'tests/test_bench_ppo.py -k alternates_the_sides'),
    ('ppo-bench-gain-diff-swapped', 'bench/bench_ppo.py', 'ratio["reward_gain_diff"] = round(a - b, 4)', 'ratio["reward_gain_diff"] = round(b - a, 4)', 'tests/test_bench_ppo.py -k alternates_the_sides'),
    ('ppo-bench-rss-target-rl', 'bench/bench_ppo.py', 'ratio["peak_rss_mb"] <= 0.6', 'ratio["peak_rss_mb"] <= 0.7', 'tests/test_bench_ppo.py -k alternates_the_sides'),
    ('ppo-bench-story-no-gold-verdict', 'bench/bench_ppo.py', '        if scale == "story":\n            ratio.update(gain_verdict(', '        if False:\n            ratio.update(gain_verdict(', 'tests/test_bench_ppo.py -k alternates_the_sides'),
    ('ours-grad-accum-is-batch', 'bench/run_ours.py', '"--gradient_accumulation_steps", str(a.batch_size // a.per_device_batch)', '"--gradient_accumulation_steps", str(a.batch_size)', 'tests/test_bench_ppo.py -k peers_batch'),
    ('ours-reward-normalised', 'bench/run_ours.py', '"--normalize_reward", "false"', '"--normalize_reward", "true"', 'tests/test_bench_ppo.py -k peers_batch'),
    ('ours-stop-at-eos-lost', 'bench/run_ours.py', '"--stop_at_eos", str(a.stop_at_eos).lower()', '"--stop_at_eos", "false"', 'tests/test_bench_ppo.py -k peers_batch'),
    ('sft-bench-mean-not-median', 'bench/bench_sft.py', 'ours = statistics.median(e["ours"]["tokens_per_s"] for e in rounds)', 'ours = statistics.fmean(e["ours"]["tokens_per_s"] for e in rounds)', 'tests/test_bench_sft.py -k summary_medians'),
    ('sft-bench-target-strict', 'bench/bench_sft.py', '"meets_target": ratio >= TARGET_RATIO', '"meets_target": ratio > TARGET_RATIO', 'tests/test_bench_sft.py -k summary_medians'),
    ('sft-bench-unequal-loss-judged', 'bench/bench_sft.py', 'if same_tokens and same_loss else None,', 'if same_tokens else None,', 'tests/test_bench_sft.py -k summary_medians'),
    ('sft-bench-tokens-over-wall', 'bench/bench_sft.py', 'round(metrics["num_input_tokens_seen"] / metrics["train_runtime"], 1)', 'round(metrics["num_input_tokens_seen"] / wall, 1)', 'tests/test_bench_sft.py -k run_side_tokens'),
    ('story-seed-gain-sft-minus-ppo', 'bench/story_seeds.py', '"gold_gain": ev["gold_ppo_mean"] - ev["gold_sft_mean"]', '"gold_gain": ev["gold_sft_mean"] - ev["gold_ppo_mean"]', 'tests/test_bench_story.py -k gold_gain_is'),
    ('story-heldout-trained-on', 'bench/story.py', 'train = sorted(order[n_held:])', 'train = sorted(order)', 'tests/test_bench_story.py -k split_prompts'),
    ('story-split-unseeded', 'bench/story.py', 'random.Random(SPLIT_SEED).shuffle(order)', 'random.shuffle(order)', 'tests/test_bench_story.py -k split_prompts'),
    ('wilson-empty-guard-lost', 'pipeline/stats.py', '    if n == 0:\n        return 0.0, 1.0', '    if False:\n        return 0.0, 1.0', 'tests/test_eval.py -k no_trials'),
    ('peak-rss-linux-as-darwin', 'pipeline/report.py', '2**20 if sys.platform == "darwin" else 2**10', '2**20', 'tests/test_eval.py -k peak_memory_mb'),
    ('eval-different-rewards-accepted', 'stages/eval.py', 'if len(set(given.values())) > 1:', 'if False:', 'tests/test_eval.py -k optimised_reward'),
    # the label store's rules, the app's handlers and `make label`'s wiring (stages/label/)
    ('label-pairs-rows-from-0', 'stages/label/pairs.py', 'numbered = [(f"row {i + 1}", row)', 'numbered = [(f"row {i}", row)', 'tests/test_label_guards.py -k row_from_1'),
    ('store-synchronous-normal', 'stages/label/store.py', 'con.execute("PRAGMA synchronous=FULL")', 'con.execute("PRAGMA synchronous=NORMAL")', 'tests/test_label_store.py -k fsyncs'),
    ('store-begin-deferred', 'stages/label/store.py', 'con.execute("BEGIN IMMEDIATE")', 'con.execute("BEGIN")', 'tests/test_label_store.py -k many_annotators'),
    ('store-seed-ignored', 'stages/label/store.py', 'f"{self.seed}\\0{pair_id}\\0{annotator}"', 'f"{pair_id}\\0{annotator}"', 'tests/test_label_store.py -k fsyncs'),
    ('store-undo-strength-kept', 'stages/label/store.py', '(before["choice"], before["shown_left"], before["preferred"], before["strength"],', '(before["choice"], before["shown_left"], before["preferred"], last["strength"],', 'tests/test_label_store.py -k undo'),
    ('store-undo-note-kept', 'stages/label/store.py', 'before["note"], now, pair_id, annotator))', 'last["note"], now, pair_id, annotator))', 'tests/test_label_store.py -k undo'),
    ('store-undo-newest-lease-last', 'stages/label/store.py', 'ORDER BY a.assigned_at DESC, a.rowid DESC LIMIT 1', 'ORDER BY a.assigned_at, a.rowid LIMIT 1', 'tests/test_label_store.py -k undo'),
    ('store-late-lease-kept', 'stages/label/store.py', 'con.execute("DELETE FROM assignments WHERE annotator = ? AND (SELECT COUNT(*) FROM labels l WHERE "', 'con.execute("DELETE FROM assignments WHERE annotator = ? AND 0 AND (SELECT COUNT(*) FROM labels l WHERE "', 'tests/test_label_store.py -k undo'),
    ('store-label-keeps-lease', 'stages/label/store.py', '        con.execute("DELETE FROM assignments WHERE pair_id = ? AND annotator = ?", (pair_id, annotator))\n        con.execute("DELETE FROM skips', '        con.execute("DELETE FROM skips', "tests/test_label_store.py -k 'others_started or overlap'"),
    ('store-expired-lease-kept', 'stages/label/store.py', '"DELETE FROM assignments WHERE expires_at <= ?"', '"DELETE FROM assignments WHERE expires_at < ?"', 'tests/test_label_store.py -k expiry_time'),
    ('store-my-labels-by-creation', 'stages/label/store.py', 'ORDER BY l.updated_at DESC, l.id DESC', 'ORDER BY l.created_at DESC, l.id DESC', 'tests/test_label_store.py -k latest_changed'),
    ('store-open-to-me-skips-ignored', 'stages/label/store.py', '"AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.pair_id = i.pair_id AND s.annotator = ?) "', '"AND ? IS NOT NULL "', 'tests/test_label_store.py -k takes_back_a_skip'),
    ('store-digest-choice-lost', 'stages/label/store.py', 'DIGEST_FIELDS = ("pair_id", "annotator", "choice", "shown_left",', 'DIGEST_FIELDS = ("pair_id", "annotator", "shown_left",', 'tests/test_label_store.py -k side_clicked'),
    ('store-digest-side-lost', 'stages/label/store.py', 'DIGEST_FIELDS = ("pair_id", "annotator", "choice", "shown_left",', 'DIGEST_FIELDS = ("pair_id", "annotator", "choice",', 'tests/test_label_store.py -k side_clicked'),
    ('store-blank-pair-id', 'stages/label/store.py', 'if not isinstance(pair_id, str) or not pair_id.strip():', 'if not isinstance(pair_id, str):', "tests/test_label_guards.py -k 'bad_pairs_file and blank'"),
    ('store-quick-check-skipped', 'stages/label/store.py', 'if existed and con.execute("PRAGMA quick_check")', 'if False and con.execute("PRAGMA quick_check")', 'tests/test_label_guards.py -k garbage'),
    ('app-text-unescaped', 'stages/label/app.py', 'return f\'<{tag} class="plain">{html.escape(text)}</{tag}>\'', 'return f\'<{tag} class="plain">{text}</{tag}>\'', 'tests/test_label_store.py -k reach_the_page_as_text'),
    ('app-session-trusts-page', 'stages/label/app.py', 'if use_login and st.get("annotator") != request.username:', 'if use_login and not st.get("annotator"):', 'tests/test_label_store.py -k click_labels_as_the_login'),
    ('app-side-shown-ignored', 'stages/label/app.py', 'store.save_label(st["annotator"], st["pair_id"], choice, st["shown_left"],', 'store.save_label(st["annotator"], st["pair_id"], choice, 0,', 'tests/test_label_store.py -k click_labels_as_the_login'),
    ('app-strength-dropped', 'stages/label/app.py', 'strength_value or None, note_value)', 'None, note_value)', 'tests/test_label_store.py -k click_labels_as_the_login'),
    ('app-skip-while-editing', 'stages/label/app.py', '            if st.get("editing"):\n                return view({"annotator": st["annotator"]}, "Left your', '            if False:\n                return view({"annotator": st["annotator"]}, "Left your', 'tests/test_label_store.py -k switch_hands'),
    ('app-switch-keeps-lease', 'stages/label/app.py', 'store.release(st["annotator"], st["pair_id"])  # hand', 'pass  # hand', 'tests/test_label_store.py -k switch_hands'),
    ('app-progress-bar-max', 'stages/label/app.py', 'mine_total = mine + p.get("open_to_me", 0)', 'mine_total = p.get("open_to_me", 0)', 'tests/test_label_store.py -k bars_by_hand'),
    ('app-overall-share-of-labels', 'stages/label/app.py', 'pct = p["pairs_done"] / p["pairs"] if p["pairs"] else 1.0', 'pct = p["labels"] / p["pairs"] if p["pairs"] else 1.0', 'tests/test_label_store.py -k bars_by_hand'),
    ('main-login-off', 'stages/label/__main__.py', 'use_login=bool(users)', 'use_login=False', 'tests/test_label_guards.py -k logins_and_the_store'),
    ('main-auth-dropped', 'stages/label/__main__.py', 'auth=users or None', 'auth=None', 'tests/test_label_guards.py -k logins_and_the_store'),
    ('main-filter-flag-ignored', 'stages/label/__main__.py', 'word_filter(args.offensive_words if args.filter_offensive else [])', 'word_filter(args.offensive_words)', 'tests/test_label_guards.py -k logins_and_the_store'),
    ('main-seed-ignored', 'stages/label/__main__.py', 'seed=args.seed,', 'seed=0,', 'tests/test_label_guards.py -k logins_and_the_store'),
    ('main-lease-ignored', 'stages/label/__main__.py', 'lease_s=args.lease_timeout_s', 'lease_s=900.0', 'tests/test_label_guards.py -k logins_and_the_store'),
    ('config-ties-unchecked', 'stages/label/config.py', 'if self.ties not in TIE_POLICIES:', 'if False:', 'tests/test_label_store.py -k export_policies'),
    ('stats-last-hour-open', 'stages/label/stats.py', '"last_hour": sum(now - t <= 3600 for t in times)', '"last_hour": sum(now - t < 3600 for t in times)', 'tests/test_label_store.py -k short_session'),
    ('fresh-no-export-is-stale', 'stages/label/fresh_export.py', '        return NEW_PAIRS\n    try:', '        return STALE\n    try:', 'tests/test_label_export.py -k records_the_store'),
    ('fresh-flag-equals-form', 'stages/label/fresh_export.py', 'name = lambda flag: flag.split("=", 1)[0]', 'name = lambda flag: flag', 'tests/test_label_export.py -k last_exports_flags'),
    # PPO's sampling loop, prompt stream, checkpoints, summary, schedule, resume choice and config guards
    ('ppo-pack-positions-from-1', 'stages/ppo/rollout.py', 'pos = (attn.cumsum(1) - 1).clamp(min=0)', 'pos = attn.cumsum(1).clamp(min=0)', "tests/test_ppo.py -k a_row_stays_ended"),
    ('ppo-sample-done-forgets', 'stages/ppo/rollout.py', 'done = done | torch.isin(tok, stops)', 'done = torch.isin(tok, stops)', "tests/test_ppo.py -k a_row_stays_ended"),
    ('ppo-no-stop-ended-false', 'stages/ppo/rollout.py', 'ended = torch.isin(tokens, stops).any(1)', 'ended = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)', "tests/test_ppo.py -k a_row_stays_ended"),
    ('ppo-pack-keep-shifted', 'stages/ppo/rollout.py', 'keep[:, p - 1 : p - 1 + r_eff] = resp_mask', 'keep[:, p : p + r_eff] = resp_mask', "tests/test_ppo.py -k 'one_base_four_adapters or first_update_reproduces'"),
    ('ppo-sample-positions-stall', 'stages/ppo/rollout.py', 'next_pos = next_pos + 1', 'next_pos = next_pos', "tests/test_ppo.py -k sampled_logprobs_of_left_padded"),
    ('ppo-reward-replays-other-bottom', 'stages/ppo/rollout.py', 'if other is None or not torch.equal(p, other):', 'if other is None:', "tests/test_ppo.py -k reward_replays_the_value_layers_only"),
    ('ppo-group-start-in-episodes', 'stages/ppo/trainer.py', 'start = (self.episodes // k) + self.rank * n_groups', 'start = self.episodes + self.rank * n_groups', PPO_UNITS),
    ('ppo-latest-checkpoint-oldest', 'stages/ppo/trainer.py', 'return done[-1].parent if done else None', 'return done[0].parent if done else None', PPO_UNITS),
    ('ppo-promote-keeps-old', 'stages/ppo/trainer.py', '            if old != final:\n', '            if False:\n', PPO_UNITS),
    ('ppo-summary-window-one', 'stages/ppo/trainer.py', 'w = max(1, len(h) // 10)', 'w = 1', PPO_UNITS),
    ('ppo-summary-rate-mean', 'stages/ppo/trainer.py', '"episodes_per_s": episodes / wall,', '"episodes_per_s": sum(r["episodes_per_s"] for r in h) / len(h),', PPO_UNITS),
    ('ppo-summary-gen-rate-over-wall', 'stages/ppo/trainer.py', 'gen_tokens / gen_time if gen_time else None', 'gen_tokens / wall if gen_time else None', PPO_UNITS),
    ('ppo-auto-resume-ignored', 'stages/ppo/__init__.py', 'return ckpt if cfg.auto_resume and unfinished else None', 'return ckpt if unfinished else None', PPO_UNITS),
    ('ppo-finished-run-resumed', 'stages/ppo/__init__.py', '<= cfg.total_updates and not stage.manifest_path.exists()', '<= cfg.total_updates', PPO_UNITS),
    ('ppo-resume-flag-ignored', 'stages/ppo/__init__.py', '    if cfg.resume:\n        return ckpt\n', '', PPO_UNITS),
    ('ppo-heldout-fraction-1-accepted', 'stages/ppo/config.py', 'if not 0 <= self.heldout_fraction < 1:', 'if not 0 <= self.heldout_fraction <= 1:', PPO_UNITS),
    ('ppo-temperature-zero-accepted', 'stages/ppo/config.py', 'if self.temperature <= 0:', 'if self.temperature < 0:', PPO_UNITS),
    ('ppo-grpo-one-sample-accepted', 'stages/ppo/config.py', 'in ("grpo", "rloo") and k < 2', 'in ("grpo", "rloo") and k < 1', PPO_UNITS),
    ('ppo-group-split-by-micro-batch', 'stages/ppo/config.py', '(self.per_device_train_batch_size % k or ', '(', PPO_UNITS),
    ('ppo-local-batch-no-minibatches', 'stages/ppo/config.py', 'self.gradient_accumulation_steps * self.num_mini_batches', 'self.gradient_accumulation_steps', PPO_UNITS),
    ('ppo-first-samples-not-kept', 'stages/ppo/trainer.py', ' or self.update == 1)', ')', "tests/test_ppo.py -k resume_gives"),
    ('ppo-samples-num-ignored', 'stages/ppo/trainer.py', 'range(min(self.cfg.num_samples, len(ro.texts)))', 'range(len(ro.texts))', "tests/test_ppo.py -k resume_gives"),
    ('ppo-history-not-reloaded', 'stages/ppo/trainer.py', 'self.history = [json.loads(l) for l in self.metrics_path.read_text().splitlines() if l.strip()]', 'self.history = []', "tests/test_ppo.py -k resume_gives"),
    ('ppo-resume-sample-rng-dropped', 'stages/ppo/trainer.py', '            self.sample_gen.set_state(rng["sample"])\n', '', "tests/test_ppo.py -k resume_gives"),
    ('ppo-scheduler-not-stepped', 'stages/ppo/trainer.py', '        self.scheduler.step()\n', '', PPO_STEPS),
    ('ppo-grad-norm-summed', 'stages/ppo/trainer.py', '"grad_norm": grad_norm / n_steps}', '"grad_norm": grad_norm}', PPO_STEPS),
    ('ppo-policy-loss-summed', 'stages/ppo/trainer.py', '"policy_loss": total["policy_loss"] / n_steps if train_policy', '"policy_loss": total["policy_loss"] if train_policy', PPO_STEPS),
    ('ppo-heldout-seed-ignored', 'stages/ppo/__init__.py', 'random.Random(cfg.seed).shuffle(order)', 'random.Random(0).shuffle(order)', PPO_PROMPTS),
    ('ppo-heldout-also-trained', 'stages/ppo/__init__.py', 'train = [convs[i] for i in sorted(order[n_held:])]', 'train = [convs[i] for i in sorted(order)]', PPO_PROMPTS),
    ('ppo-long-prompts-error-ignored', 'stages/ppo/__init__.py', 'if cfg.long_prompts == "error":', 'if False:', PPO_PROMPTS),
    ('ppo-drop-keeps-long', 'stages/ppo/__init__.py', 'keep = [i for i in range(len(ids)) if i not in set(long)]', 'keep = list(range(len(ids)))', PPO_PROMPTS),
]


def pytest(worktree: Path, selection: str) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(selection)],
                         cwd=worktree, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = (res.stdout.strip().splitlines() or [""])[-1]
    return res.returncode, last, round(time.perf_counter() - t0, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="Mutants to run (default: all).")
    ap.add_argument("--output", default=str(REPO / "bench" / "results" / "mutants.json"))
    a = ap.parse_args(argv)
    unknown = set(a.names) - {m[0] for m in MUTANTS}
    if unknown:
        print(f"error: unknown mutants {sorted(unknown)}: see tools/mutants.py", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not a.names or m[0] in a.names]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    results, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), "HEAD"], cwd=REPO, check=True)
        try:
            for selection in dict.fromkeys(m[4] for m in chosen):  # the tests pass as they are
                rc, last, _ = pytest(tree, selection)
                if rc:
                    print(f"error: the unmutated tests fail ({selection}): {last}", file=sys.stderr)
                    return 2
            for name, rel, old, new, selection in chosen:
                path = tree / rel
                source = path.read_text()
                if source.count(old) != 1:
                    print(f"error: mutant {name}: its text occurs {source.count(old)} times in {rel}", file=sys.stderr)
                    return 2
                path.write_text(source.replace(old, new))
                try:
                    rc, last, seconds = pytest(tree, selection)
                finally:
                    path.write_text(source)
                verdict = "killed" if rc else "SURVIVED"
                print(f"{name:26s} {verdict:9s} {seconds:6.1f} s  {last}", flush=True)
                results.append({"mutant": name, "file": rel, "tests": selection, "killed": bool(rc), "seconds": seconds})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    survivors = [r["mutant"] for r in results if not r["killed"]]
    out = {"git_commit": commit, "wall_s": round(time.perf_counter() - t0, 1), "mutants": len(results),
           "killed": len(results) - len(survivors), "survived": survivors, "results": results}
    Path(a.output).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{out['killed']} of {len(results)} mutants killed in {out['wall_s']} s; wrote {a.output}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
