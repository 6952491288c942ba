"""Does the suite catch a broken rule? Hand-made mutants of the arithmetic the results rest on, each run against the
tests that guard it (`make mutants`, 6-13 minutes on 2 CPU cores; writes bench/results/mutants.json).

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
