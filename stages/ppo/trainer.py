"""The PPO loop: rollout -> rewards and advantages -> several epochs of clipped updates -> metrics, checkpoints.

    trainer = PPOTrainer(cfg, stack, tokenizer, prompts, out_dir, reward_stats=..., reward_fn=None)
    summary = trainer.train(resume_from=None)       # or a checkpoint folder

Distributed: every rank samples its own episodes (its own slice of the prompt stream, its own sampling seed);
after each mini-batch the gradients of the trainable adapters are summed across ranks with one all-reduce (each
rank's loss is already divided by the global token count), so ranks stay identical without wrapping the
adapter-switching model in DDP. Whitening statistics, the KL used by the adaptive controller and the logged
metrics are global (all ranks agree on them). With the base sharded (sharding.py: FSDP2 over the frozen base, the
adapters whole on every rank) all of this is unchanged; only the base's weights are all-gathered per module.

Exact resume: a checkpoint holds the trainable tensors, optimizer, scheduler, KL controller, every rank's RNG
states and the episode counter (the data position: the prompt order is a pure function of seed and episode
index). On CPU, N updates + resume + M updates gives the same metrics.jsonl as N + M straight.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ConfigError, stream_seed, to_dict
from pipeline.models import launch_autocast, launch_mixed_precision
from pipeline.run import atomic_write_text, replace_folder

from . import losses as L
from .rollout import Rollout, TopLayers, by_group_length, collect, decoder_layers, response_logits, token_logprobs, token_values

# Keys whose values depend on the machine's speed; everything else in metrics.jsonl is reproducible.
TIMING_KEYS = ("episodes_per_s", "gen_tokens_per_s", "time_generate_s", "time_score_s", "time_train_s", "time_update_s")
VALUE_OFFSET_FILE = "value_offset.json"  # beside a saved value adapter: what its head output needs added


def tensorboard_writer(log_dir: Path):
    """A TensorBoard SummaryWriter: torch's, which needs the tensorboard package, else tensorboardX's (same API). The
    config accepts report_to tensorboard when either is installed (pipeline.config.check_report_to, as transformers'
    own TensorBoardCallback), so with tensorboardX alone torch's import failed, after the models had loaded."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    return SummaryWriter(str(log_dir))


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = sorted((out_dir / "checkpoints").glob("checkpoint-*/trainer_state.pt"))
    return done[-1].parent if done else None


def checkpoint_info(path: Path) -> dict:
    """What a checkpoint was trained from: {"update": N, "upstream": {"sft": digest, "rm": digest, "settings": {...},
    "prompts": digest}} (stages.ppo.trained_from; {} if unknown)."""
    f = Path(path) / "checkpoint.json"
    return json.loads(f.read_text()) if f.exists() else {}


def logged_rows(path: Path) -> list[dict]:
    """The rows of a metrics or samples log. A last line cut short (the run was killed while writing it) is dropped:
    it lies past the checkpoint a resume continues from. A damaged line before it is refused."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ConfigError(f"{path} line {n} is not JSON: restore the file, or start over with --auto_resume "
                                  f"false") from None
    return rows


def computes_in_fp32(lm, mixed_precision: str) -> bool:
    """Every matmul of the policy in fp32: an fp32 base, no autocast, and no quantized layers (a 4-bit base computes
    in bf16, or fp16, whatever dtype the profile gives the rest of it)."""
    quantized = getattr(lm, "hf_quantizer", None) is not None or getattr(lm, "is_loaded_in_4bit", False)
    return lm.get_input_embeddings().weight.dtype == torch.float32 and mixed_precision == "no" and not quantized


def samples_due(update: int, sample_every: int) -> bool:
    """Whether update `update` (counted from 1) prints and keeps sample responses: every `sample_every`-th, and the
    first, the earliest look at the policy; 0: none."""
    return bool(sample_every) and (update % sample_every == 0 or update == 1)


class PPOTrainer:
    def __init__(self, cfg, stack, tokenizer, prompts: list, prompt_ids: list[list[int]], out_dir: Path, state,
                 reward_stats: tuple[float, float] | None = None, reward_fn=None, config: dict | None = None,
                 upstream: dict | None = None):
        self.cfg, self.stack, self.tokenizer = cfg, stack, tokenizer
        self.prompts, self.prompt_ids = prompts, prompt_ids
        self.out_dir, self.state, self.reward_fn = Path(out_dir), state, reward_fn
        self.config = config or {"ppo": to_dict(cfg)}
        self.reward_stats = reward_stats
        self.on_keep = None  # called with each kept policy folder (the stage adds the tokenizer and base fingerprint)
        self.upstream = upstream or {}  # digests of the sft/rm adapters: a checkpoint only resumes on the same ones
        self.world, self.rank, self.is_main = state.num_processes, state.process_index, state.is_main_process
        self.lm = stack.causal_lm
        self.device = next(self.lm.parameters()).device
        self.mixed_precision = launch_mixed_precision()
        # torch.autocast, or nothing under 'no'; built here so that what it cannot run is refused before any update
        self.autocast = launch_autocast(self.device, cfg.stage_name, training=True)
        if cfg.recompute_old_logprobs is None:  # auto: the sampling loop's log-probs are exact enough only in fp32
            cfg.recompute_old_logprobs = not computes_in_fp32(self.lm, self.mixed_precision)

        # The value adapter may train only its top layers (TopLayers): freeze the rest before collecting parameters.
        self.top = None
        try:
            n_layers = len(decoder_layers(self.lm)) if cfg.value_trainable_layers else 0
        except ValueError as err:  # an architecture whose layer list we cannot find: train the whole value adapter
            n_layers = 0
            if self.is_main:
                print(f"note: {err}; the value adapter trains all its layers", file=sys.stderr)
        self.trained = ("policy", "value") if cfg.has_critic else ("policy",)  # critic-free: no value adapter at all
        if cfg.has_critic and 0 < cfg.value_trainable_layers < n_layers:
            self.top = TopLayers(self.lm, cfg.value_trainable_layers)
            stack.freeze("value", self.top.frozen_modules())
            self.top.reward_shares_bottom = self.top.same_below("value", "reward")
        self.named_params = {a: [(n, p) for n, p in stack.adapter_parameters(a) if id(p) not in stack.frozen]
                             for a in self.trained}
        for a, ps in self.named_params.items():
            if not ps:
                raise ConfigError(f"the {a} adapter has no trainable parameters: check the sft/rm adapters")
        self.params = [p for a in self.trained for _, p in self.named_params[a]]
        groups = [{"params": [p for _, p in self.named_params["policy"]], "lr": cfg.learning_rate}]
        if cfg.has_critic:
            groups.append({"params": [p for _, p in self.named_params["value"]],
                           "lr": cfg.value_learning_rate or cfg.learning_rate})
        if cfg.optim == "adamw":  # eps 1e-5: Huang et al. 2024 (lm-human-preferences' Adam epsilon)
            self.optimizer = torch.optim.AdamW(groups, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        elif cfg.optim == "sgd":
            self.optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.RMSprop(groups, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer, num_warmup_steps=cfg.warmup_updates,
                                       num_training_steps=cfg.total_updates)
        if cfg.critic_warmup_updates:  # the policy's schedule (its warm-up, its decay) starts when the policy does
            self.scheduler = self._policy_schedule_after_critic_warmup(get_scheduler)
        self.kl_ctl = (L.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else L.FixedKLController(cfg.kl_coef))
        # Each rank samples differently; the minibatch order only needs to be reproducible.
        self.sample_gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + self.rank)
        self.perm_gen = torch.Generator().manual_seed(cfg.seed * 1000 + 500 + self.rank)
        self.update, self.episodes = 0, 0
        # The value head starts as the RM's score head, on the RM's raw scale; the first rollout fits it to the shaped
        # reward's scale (critic_init: fit). value_offset is added to the head's output from then on.
        self.critic_fitted = cfg.critic_init != "fit" or not cfg.has_critic
        self.value_offset = 0.0
        self.critic_fit: dict = {}
        self.history: list[dict] = []
        self._perm_cache: dict[int, list[int]] = {}
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.samples_path = self.out_dir / "samples.jsonl"
        self.writer = None

    # ---------------------------------------------------------------- distributed helpers
    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            t = t.clone()
            dist.all_reduce(t)
        return t

    def _all_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean across ranks, for per-rank quantities such as timings (statistics of the data use global sums)."""
        if self.world == 1:
            return values
        keys = list(values)
        vec = torch.tensor([float("nan") if values[k] is None else values[k] for k in keys], dtype=torch.float64,
                           device=self.device)
        vec = self._all_sum(vec) / self.world
        return {k: (None if math.isnan(v) else v) for k, v in zip(keys, vec.tolist())}

    def _sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients of the adapters trained this step across ranks. Every rank's loss is already divided by
        the token count of the *global* mini-batch, so the sum is the gradient of the global token mean: 2 ranks x B ==
        1 rank x 2B. Only `params` (the same on every rank). A parameter no rank gave a gradient stays at grad None, the
        optimizer skipping it as on one process (a zero gradient would count as an AdamW step: bias correction, weight
        decay); one some rank left at None counts zero there."""
        if self.world == 1:
            return
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = self._all_sum(torch.cat([p.grad.reshape(-1) for p in params] + [has_grad.to(params[0].grad.dtype)]))
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        for p, ranks_with_grad in zip(params, flat[offset:].tolist()):
            if ranks_with_grad == 0:
                p.grad = None

    def _barrier(self) -> None:
        self.state.wait_for_everyone()

    # ---------------------------------------------------------------- data
    def _prompt_index(self, episode: int) -> int:
        """The prompt of global episode i: a fresh permutation of the prompt set every pass, each pass its own seed."""
        n = len(self.prompt_ids)
        epoch = episode // n
        if epoch not in self._perm_cache:
            pass_seed = stream_seed(self.cfg.seed, epoch)
            self._perm_cache = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(pass_seed)).tolist()}
        return self._perm_cache[epoch][episode % n]

    def _local_prompts(self) -> tuple[list, list[list[int]]]:
        """This rank's prompts: its slice of the global prompt stream, each repeated num_samples_per_prompt times in
        consecutive rows (a group stays on one rank)."""
        k = self.cfg.num_samples_per_prompt
        n_groups = self.cfg.local_batch_size // k
        start = (self.episodes // k) + self.rank * n_groups
        idx = [self._prompt_index(i) for i in range(start, start + n_groups) for _ in range(k)]
        return [self.prompts[i] for i in idx], [self.prompt_ids[i] for i in idx]

    # ---------------------------------------------------------------- one update
    def _scores(self, ro: Rollout) -> torch.Tensor:
        cfg = self.cfg
        return L.shape_scores(ro.scores_raw, ro.ended, self.reward_stats if cfg.normalize_reward else None,
                              cfg.reward_clip, cfg.missing_eos_penalty)

    def _value_head(self) -> torch.nn.Module:
        return self.lm.score.modules_to_save["value"]

    @torch.no_grad()
    def _fit_critic(self, ro: Rollout, rewards: torch.Tensor, mask: torch.Tensor) -> None:
        """Put the critic on the shaped reward's scale before its first use. The value head starts as the RM's score
        head, which predicts *raw* RM scores; the rewards are normalised, clipped and penalised, so the raw critic is
        off by the RM's mean and scaled by its std, which biases every advantage (the EOS token takes most of it).
        Least squares of this rollout's Monte-Carlo returns on the head's outputs gives (a, b): the head's weights are
        multiplied by a (it keeps learning at its own scale) and b is added to its output from now on."""
        targets = L.discounted_returns(rewards, mask, self.cfg.gamma)
        a, b = L.fit_affine(ro.values, targets, mask, reduce=self._all_sum)
        for p in self._value_head().parameters():
            p.mul_(a)
        self.value_offset = b
        ro.values = (ro.values * a + b) * mask
        self.critic_fitted = True
        self.critic_fit = {"scale": a, "offset": b}

    def _advantages(self, ro: Rollout):
        cfg, g = self.cfg, self._all_sum
        mask = ro.response_mask.float()
        scores = self._scores(ro)
        kl1 = kl3 = None
        if ro.ref_logprobs is not None:
            kl1 = L.kl_k1(ro.logprobs, ro.ref_logprobs) * mask
            kl3 = L.kl_k3(ro.logprobs, ro.ref_logprobs) * mask  # logged as it is: the estimate of the KL
        kl_coef = self.kl_ctl.value
        # k1 in the reward: the one estimator whose score-function gradient is the gradient of KL(policy||ref)
        kl_in_reward = None if cfg.use_kl_loss else kl1
        rewards = L.per_token_rewards(scores, kl_in_reward, kl_coef, mask)
        if cfg.whiten_rewards:
            rewards = L.masked_whiten(rewards, mask, shift_mean=False, reduce=g)
        if cfg.advantage_estimator == "gae":
            if not self.critic_fitted:
                self._fit_critic(ro, rewards, mask)
            adv, returns = L.gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = L.masked_whiten(adv, mask, shift_mean=True, reduce=g)
        elif cfg.advantage_estimator == "reinforce_pp":
            adv = L.reinforce_pp_advantages(rewards, mask, cfg.gamma, reduce=g)
            returns = L.discounted_returns(rewards, mask, cfg.gamma)
        else:  # grpo / rloo: one advantage per answer from its group; the KL penalty (if in the reward) per sequence
            returns = L.discounted_returns(rewards, mask, cfg.gamma)
            adv = L.group_advantages(rewards.sum(1), cfg.num_samples_per_prompt, cfg.advantage_estimator,
                                     cfg.grpo_normalize_std)[:, None] * mask
        # Every statistic is over all ranks' episodes (global sums), so it means what it means on one process.
        rows = torch.ones_like(scores)
        stats = {
            "reward_raw": L.global_mean(ro.scores_raw, rows, g), "reward": L.global_mean(scores, rows, g),
            "reward_std": L.global_std(ro.scores_raw, rows, g),
            "kl": L.global_mean(kl1.sum(1), rows, g) if kl1 is not None else None,
            "kl_k3": L.global_mean(kl3.sum(1), rows, g) if kl3 is not None else None,
            "kl_coef": kl_coef,
            "entropy": L.global_mean(ro.entropy, mask, g),
            "explained_variance": L.explained_variance(ro.values, returns, mask, g) if cfg.has_critic else None,
            "value_mean": L.global_mean(ro.values, mask, g) if cfg.has_critic else None,
            "return_mean": L.global_mean(returns, mask, g),
            "response_length": L.global_mean(mask.sum(1), rows, g),
            "no_eos_fraction": L.global_mean((~ro.ended).float(), rows, g),
        }
        return adv, returns, stats

    def _policy_schedule_after_critic_warmup(self, get_scheduler):
        """One LR schedule per parameter group: the value's over every update, the policy's over the updates after the
        critic warm-up (as verl's actor scheduler, which does not step while the actor is frozen), so that the
        policy's warm-up and decay are not spent before it trains."""
        from torch.optim.lr_scheduler import LambdaLR

        cfg, wait = self.cfg, self.cfg.critic_warmup_updates

        def multiplier(total: int):  # the schedule's LR factor by step, as transformers builds it for `total` steps
            probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            built = get_scheduler(cfg.lr_scheduler_type, probe, num_warmup_steps=cfg.warmup_updates,
                                  num_training_steps=total)
            if not isinstance(built, LambdaLR):
                raise ConfigError(f"lr_scheduler_type '{cfg.lr_scheduler_type}' cannot be combined with "
                                  f"critic_warmup_updates: give linear, cosine, constant or another per-step schedule")
            return built.lr_lambdas[0]

        policy, value = multiplier(cfg.total_updates - wait), multiplier(cfg.total_updates)
        # Param groups: the policy's, then the value's (a critic warm-up needs a critic). Each group keeps the base LR
        # the first scheduler recorded (initial_lr), so this one starts from it.
        return LambdaLR(self.optimizer, [lambda step: policy(max(0, step - wait)), value])

    @torch.enable_grad()
    def _optimise(self, ro: Rollout, adv: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        cfg, lm, stack = self.cfg, self.lm, self.stack
        B = ro.response_ids.shape[0]
        mb_size, micro = B // cfg.num_mini_batches, cfg.per_device_train_batch_size
        train_policy = self.update >= cfg.critic_warmup_updates  # critic warm-up: the value learns alone at first
        trained_now = self.params if train_policy else [p for _, p in self.named_params["value"]]
        # Token-weighted sums on this rank; summed across ranks once at the end.
        sums = dict.fromkeys(("policy_loss", "value_loss", "clipfrac_policy", "clipfrac_value", "approx_kl",
                              "entropy_update", "kl_loss", "tokens"), 0.0)
        grad_norm, n_steps = 0.0, 0
        if cfg.gradient_checkpointing:
            lm.train()  # HF checkpoints only in train mode; dropout is off everywhere (disable_dropout)
        k = cfg.num_samples_per_prompt  # rows move in whole groups (k = 1: single rows)
        row_denom = torch.ones(B, device=self.device)  # each row's policy-loss denominator in its mini-batch
        token_denom = row_denom[:, None].expand_as(ro.response_mask)  # a view: filled in with row_denom
        for _ in range(cfg.num_ppo_epochs):
            perm = (torch.randperm(B // k, generator=self.perm_gen)[:, None] * k + torch.arange(k)).reshape(-1)
            for m in range(cfg.num_mini_batches):
                mb = perm[m * mb_size : (m + 1) * mb_size].to(self.device)
                # The losses are over the *global* mini-batch (every rank's rows): each rank divides its tokens'
                # terms by global denominators and the gradients are summed across ranks. The value loss is a token
                # mean; the policy's terms are aggregated as loss_agg_mode says.
                tokens, rows = self._all_sum(torch.stack([ro.response_mask[mb].sum().float(),
                                                          torch.tensor(float(len(mb)), device=self.device)]))
                denom = tokens.clamp(min=1)
                row_denom[mb] = L.loss_denominators(ro.response_mask[mb].sum(1), cfg.loss_agg_mode, rows, denom,
                                                    cfg.response_length)
                # How a mini-batch's rows are split into micro-batches changes nothing but padding: group similar
                # lengths (whole groups, by their longest row).
                mb = mb[by_group_length(ro.lengths[mb], k)]
                for j in range(0, mb_size, micro):
                    idx = mb[j : j + micro]
                    x = ro.rows(idx, cfg.prompt_group)
                    width = x.response_mask.shape[1]
                    pick = lambda t: t[idx][:, :width][x.response_mask]  # noqa: E731  [N] real tokens
                    old_lp, a, ret, old_v = pick(ro.logprobs), pick(adv), pick(returns), pick(ro.values)
                    d = pick(token_denom)
                    nt = x.num_tokens

                    if train_policy:
                        stack.use("policy")
                        logits = response_logits(lm, x)
                        new_lp = token_logprobs(logits, x.tokens, cfg.temperature)
                        pg, pst = L.policy_loss(new_lp, old_lp, a, cfg.cliprange, d)
                        loss = pg
                        if cfg.use_kl_loss and ro.ref_logprobs is not None:  # GRPO: KL as a loss term, not a reward
                            kl_term = L.kl_loss(new_lp, pick(ro.ref_logprobs), d)
                            loss = loss + self.kl_ctl.value * kl_term
                            sums["kl_loss"] += kl_term.item()
                        if cfg.entropy_coef:  # optional bonus; the logged entropy is the sampling distribution's
                            ent = L.entropy_from_logits(logits / cfg.temperature)
                            loss = loss - cfg.entropy_coef * (ent / d).sum()
                            sums["entropy_update"] += ent.detach().sum().item()
                        loss.backward()
                        del logits, loss
                        sums["policy_loss"] += pg.item()
                        sums["clipfrac_policy"] += pst["clipfrac"].item() * nt
                        sums["approx_kl"] += pst["approx_kl"].item() * nt

                    if cfg.has_critic:
                        stack.use("value")
                        new_v = token_values(lm, x, self.top, ro.cached_hidden(idx, x)) + self.value_offset
                        vl, vst = L.value_loss(new_v, old_v, ret, cfg.cliprange_value, denom)
                        (cfg.vf_coef * vl).backward()
                        sums["value_loss"] += vl.item()
                        sums["clipfrac_value"] += vst["clipfrac"].item() * nt
                    sums["tokens"] += nt
                self._sum_grads(trained_now)
                # The gradients are global now: every rank computes the same norm. max_grad_norm 0 (no clipping)
                # still measures it: an infinite limit scales nothing.
                norm = float(torch.nn.utils.clip_grad_norm_(trained_now, cfg.max_grad_norm or math.inf))
                if not math.isfinite(norm):  # a NaN step makes every weight NaN, and the run would save that
                    raise ConfigError(f"{cfg.advantage_estimator} diverged at update {self.update + 1}: the gradient is {norm} "
                                      f"(policy loss {sums['policy_loss']:.4g}); that step was not taken, nothing of this "
                                      f"update is saved, and the last checkpoint is kept: lower learning_rate (now {cfg.learning_rate}), or "
                                      f"check the reward's scale")
                grad_norm += norm
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                n_steps += 1
        lm.eval()
        keys = list(sums)
        total = dict(zip(keys, self._all_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                                          device=self.device)).tolist()))
        tokens = max(total["tokens"], 1.0)
        out = {"policy_loss": total["policy_loss"] / n_steps if train_policy else None,
               "value_loss": total["value_loss"] / n_steps if cfg.has_critic else None,
               "clipfrac_policy": total["clipfrac_policy"] / tokens if train_policy else None,
               "clipfrac_value": total["clipfrac_value"] / tokens if cfg.has_critic else None,
               "approx_kl": total["approx_kl"] / tokens if train_policy else None,
               "grad_norm": grad_norm / n_steps}
        if cfg.use_kl_loss:
            out["kl_loss"] = total["kl_loss"] / n_steps if train_policy else None  # a critic warm-up computes none
        if cfg.entropy_coef:
            out["entropy_update"] = total["entropy_update"] / tokens if train_policy else None
        return out

    def step(self) -> tuple[dict, Rollout]:
        """One PPO update: rollout, advantages, optimisation, under the launch's mixed precision (torch.autocast, as
        accelerate gives the Trainer stages; bf16 in configs/accelerate/multi_gpu.yaml). Returns the (global) metrics
        of this update."""
        with self.autocast:
            return self._update()

    def _update(self) -> tuple[dict, Rollout]:
        cfg = self.cfg
        t0 = time.perf_counter()
        ro = self.rollout()
        bad = int(self._all_sum((~torch.isfinite(ro.scores_raw)).sum().double()))  # every rank stops, or none
        if bad:  # before the adapters step on it: a NaN spreads through every advantage and weight
            raise ConfigError(f"the reward gave {bad} of the {cfg.local_batch_size * self.world} responses of update "
                              f"{self.update + 1} a score that is not a finite number (nan or inf): check the reward "
                              f"model (or your reward function) on them, and its precision (an fp16 overflow)")
        t_score0 = time.perf_counter()
        adv, returns, stats = self._advantages(ro)
        time_score = ro.time_score_s + (time.perf_counter() - t_score0)
        lr = self.optimizer.param_groups[0]["lr"]
        t_train0 = time.perf_counter()
        stats.update(self._optimise(ro, adv, returns))
        time_train = time.perf_counter() - t_train0
        gen_tokens = float(self._all_sum(ro.response_mask.sum().double()))
        if stats["kl"] is not None and self.update >= cfg.critic_warmup_updates:  # a frozen policy's KL says nothing
            self.kl_ctl.update(stats["kl"], cfg.local_batch_size * self.world)
        self.scheduler.step()
        self.update += 1
        G = cfg.local_batch_size * self.world
        self.episodes += G
        # Timings are per rank: their mean across ranks.
        timing = self._all_mean({"time_generate_s": ro.time_generate_s, "time_score_s": time_score,
                                 "time_train_s": time_train, "wall": time.perf_counter() - t0})
        wall = timing.pop("wall")
        metrics = {"update": self.update, "episodes": self.episodes, "lr": lr, **stats, **timing,
                   "episodes_per_s": G / wall, "gen_tokens_per_s": gen_tokens / wall, "time_update_s": wall}
        # NaN (e.g. explained variance of a constant batch) is not JSON: write null
        metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        return metrics, ro

    def rollout(self) -> Rollout:
        """This rank's episodes of the next update, with the critic's values on the shaped reward's scale."""
        prompts, ids = self._local_prompts()
        ro = collect(self.stack, self.tokenizer, prompts, ids, self.cfg, self.sample_gen, self.reward_fn, self.top)
        if self.critic_fitted and self.value_offset:
            ro.values = (ro.values + self.value_offset) * ro.response_mask
        return ro

    # ---------------------------------------------------------------- the loop
    def train(self, resume_from: Path | None = None) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self._open_logs()
        start = self.update
        if cfg.keep_policy_every and 0 < start < cfg.total_updates and start % cfg.keep_policy_every == 0:
            # A finished run extended (--resume --total_updates more): its last update kept no policy (the stage's
            # adapter was the last point); the policy just loaded is that update's. A killed run kept it already:
            # the same bytes again.
            self.keep_policy()
        bar = tqdm(total=cfg.total_updates, initial=start, desc=cfg.stage_name, dynamic_ncols=True,
                   disable=not (self.is_main and cfg.progress_bar), file=sys.stderr)
        stopped = False
        while self.update < cfg.total_updates:
            metrics, ro = self.step()
            self.history.append(metrics)
            self._log(metrics)
            if samples_due(self.update, cfg.sample_every):
                self._samples(ro)
            # refresh=False: the figures show at the bar's next draw, which tqdm's mininterval paces (make sets
            # 10 s in a log); refreshing here redrew the bar on every update
            bar.set_postfix(reward=f"{metrics['reward_raw']:.3f}",
                            kl=f"{metrics['kl']:.3f}" if metrics["kl"] is not None else "-",
                            eps=f"{metrics['episodes_per_s']:.1f}", refresh=False)
            bar.update(1)
            done_now = self.update - start
            last = self.update == cfg.total_updates
            stopped = bool(cfg.stop_after) and done_now >= cfg.stop_after and not last
            if cfg.keep_policy_every and self.update % cfg.keep_policy_every == 0 and not last:
                self.keep_policy()
            if last or stopped or (cfg.save_every and self.update % cfg.save_every == 0):
                self.save_checkpoint()
            if stopped:
                break
        bar.close()
        self._close_logs()
        return {"stopped": stopped, "update": self.update}

    # ---------------------------------------------------------------- logging
    def _open_logs(self) -> None:
        if not self.is_main:
            return
        # Keep the lines of updates we resumed past; a killed run may have logged beyond its last checkpoint. A fresh
        # start keeps none, and reads none: an earlier run's damaged line would refuse it (its checkpoints already gone).
        for path in (self.metrics_path, self.samples_path):
            if path.exists():
                rows = [r for r in logged_rows(path) if r["update"] <= self.update] if self.update else []
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))  # a kill now loses no line
        if self.metrics_path.exists():
            self.history = [json.loads(l) for l in self.metrics_path.read_text().splitlines() if l.strip()]
        # The config refused a report_to whose package is not installed (pipeline.config.check_report_to).
        if self.cfg.report_to == "tensorboard":
            self.writer = ("tensorboard", tensorboard_writer(self.out_dir / "tensorboard"))
        elif self.cfg.report_to == "trackio":
            import trackio

            trackio.init(project="rlhf-ppo", name=self.out_dir.parent.name, config=self.config,
                         resume="allow" if self.update else "never")
            self.writer = ("trackio", trackio)

    def _log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            kind, w = self.writer
            scalars = {f"ppo/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "update"}
            if kind == "tensorboard":
                for k, v in scalars.items():
                    w.add_scalar(k, v, metrics["update"])
            else:
                w.log(scalars, step=metrics["update"])

    def _close_logs(self) -> None:
        if self.writer is not None:
            kind, w = self.writer
            w.close() if kind == "tensorboard" else w.finish()
            self.writer = None

    def _samples(self, ro: Rollout) -> None:
        if not self.is_main:
            return
        rows = []
        for i in range(min(self.cfg.num_samples, len(ro.texts))):
            p = ro.prompts[i]
            prompt = p[-1]["content"] if isinstance(p, list) else str(p)
            rows.append({"update": self.update, "prompt": prompt, "response": ro.texts[i],
                         "reward_raw": round(float(ro.scores_raw[i]), 4), "ended": bool(ro.ended[i])})
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        clip = lambda s, n: (s[: n - 1] + "…") if len(s) > n else s  # noqa: E731
        lines = [f"\n-- samples at update {self.update} --", f"{'reward':>8}  {'prompt':<40}  response"]
        lines += [f"{r['reward_raw']:>8.3f}  {clip(r['prompt'].replace(chr(10), ' '), 40):<40}  "
                  f"{clip(r['response'].replace(chr(10), ' '), 70)}" for r in rows]
        from tqdm.auto import tqdm

        tqdm.write("\n".join(lines), file=sys.stderr)

    # ---------------------------------------------------------------- checkpoints
    def keep_policy(self) -> Path:
        """policies/update-N/: the policy now, as a stock PEFT folder (make eval plots gold and proxy score against
        KL along these). The final policy is adapter/, so it is not kept twice."""
        out = self.out_dir / "policies" / f"update-{self.update:06d}"
        if self.is_main:
            self.stack.save("policy", out)
            if self.on_keep is not None:
                self.on_keep(out)
        self._barrier()
        return out

    def _rng_state(self) -> dict:
        state = {"sample": self.sample_gen.get_state(), "perm": self.perm_gen.get_state(), "torch": torch.get_rng_state(),
                 "python": random.getstate(), "numpy": np.random.get_state()}
        if self.device.type == "cuda":  # this rank's GPU only: a rerun may see fewer GPUs (each rank one, say)
            state["cuda_device"] = torch.cuda.get_rng_state(self.device)
        return state

    def _restore_rng(self, rng: dict) -> None:
        """The streams of _rng_state back. The sampling stream lives on the rank's device: one saved on another kind
        of device (a GPU checkpoint resumed on the CPU) cannot be restored into it and starts afresh, as a changed
        world size does. Checkpoints of earlier versions hold every visible GPU's state ("cuda"): this rank's is
        taken from it."""
        if rng["sample"].numel() == self.sample_gen.get_state().numel():
            self.sample_gen.set_state(rng["sample"])
        else:
            print(f"warning: rank {self.rank}: the checkpoint's sampling stream is of another device than this run's "
                  f"{self.device.type}: sampling continues from this run's seed", file=sys.stderr)
        self.perm_gen.set_state(rng["perm"])
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if self.device.type == "cuda":
            index = self.device.index or 0
            saved = rng.get("cuda_device", rng["cuda"][index] if index < len(rng.get("cuda", [])) else None)
            if saved is not None:
                torch.cuda.set_rng_state(saved, self.device)

    def write_value_offset(self, folder: Path) -> None:
        """The critic's value is its head's output plus value_offset (critic_init: fit; the head has no bias to fold
        it into), so a saved value adapter carries the offset beside it."""
        (folder / VALUE_OFFSET_FILE).write_text(json.dumps(
            {"value_offset": self.value_offset, "critic_fit": self.critic_fit,
             "note": "value = the value adapter's score head output + value_offset"}, indent=1) + "\n")

    def save_checkpoint(self) -> Path:
        """checkpoint-N/: policy/ and value/ (PEFT folders), trainer_state.pt (rank 0: trainable tensors, optimizer,
        scheduler, KL controller, critic fit), checkpoint.json (what it was trained from) and rng_rank<r>.pt (one per
        rank). Each rank creates the folders it writes, so nodes without a shared filesystem each keep their own
        copy of checkpoint-N/ (rank 0's holds the state, every node holds its ranks' RNG files)."""
        root = self.out_dir / "checkpoints"
        final = root / f"checkpoint-{self.update:06d}"
        tmp = root / f".tmp-checkpoint-{self.update:06d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(self._rng_state(), tmp / f"rng_rank{self.rank}.pt")
        self._barrier()
        if self.is_main:
            # PEFT folders: a checkpoint's adapters load like the final ones (handy to inspect a long run).
            self.stack.save("policy", tmp / "policy")
            if self.cfg.has_critic:
                self.stack.save("value", tmp / "value")
                self.write_value_offset(tmp / "value")
            state = {
                "update": self.update, "episodes": self.episodes, "world_size": self.world,
                "trainable": {a: {n: p.detach().cpu().clone() for n, p in ps} for a, ps in self.named_params.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(), "config": self.config,
                "critic": {"fitted": self.critic_fitted, "value_offset": self.value_offset, "fit": self.critic_fit},
            }
            (tmp / "checkpoint.json").write_text(json.dumps({"update": self.update, "upstream": self.upstream}))
            torch.save(state, tmp / "trainer_state.pt")  # written last: its presence marks a complete checkpoint
        self._barrier()
        self._promote_on_each_node(tmp, final)
        return final

    def _promote_on_each_node(self, tmp: Path, final: Path) -> None:
        """The main process promotes the checkpoint; then, on a node without a shared filesystem, which holds its own
        copy of the folder, that node's first process: one a node (all its ranks at once raced one rename, and could
        delete every checkpoint the node had)."""
        if self.is_main:
            self._promote(tmp, final)
        self._barrier()
        if not self.is_main and self.state.is_local_main_process and tmp.exists():
            self._promote(tmp, final)
        self._barrier()

    @staticmethod
    def _promote(tmp: Path, final: Path) -> None:
        # On disk before the rename makes it the checkpoint to resume, and the rename on disk before the older
        # checkpoints go (replace_folder): a power cut leaves one complete checkpoint, never only a truncated one.
        replace_folder(tmp, final)
        for old in final.parent.glob("checkpoint-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Rank 0 reads trainer_state.pt and sends it to the others (their node may have no copy); each rank reads its
        own RNG file where it has one."""
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False) if self.is_main else None
        if self.world > 1:
            import torch.distributed as dist

            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        with torch.no_grad():
            for a, ps in self.named_params.items():
                saved = state["trainable"][a]
                missing = [n for n, _ in ps if n not in saved]
                if missing:
                    raise ConfigError(f"checkpoint {path} does not match the adapters in use (no {missing[0]}): "
                                      f"start over with --auto_resume false, or restore the original sft/rm adapters")
                for n, p in ps:
                    p.copy_(saved[n].to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        critic = state.get("critic", {"fitted": True, "value_offset": 0.0, "fit": {}})
        self.critic_fitted, self.value_offset, self.critic_fit = critic["fitted"], critic["value_offset"], critic["fit"]
        self.update, self.episodes = state["update"], state["episodes"]
        rng_file = path / f"rng_rank{self.rank}.pt"
        if state["world_size"] != self.world or not rng_file.exists():
            print(f"warning: rank {self.rank}: checkpoint {path.name} was written by {state['world_size']} process(es), "
                  f"this run has {self.world}{'' if rng_file.exists() else ', and this node has no RNG file for it'}: "
                  "training continues, but not bit-for-bit as an uninterrupted run would", file=sys.stderr)
        if rng_file.exists():
            self._restore_rng(torch.load(rng_file, weights_only=False))
        if self.is_main:
            print(f"resumed from {path} (update {self.update}, {self.episodes} episodes)", file=sys.stderr)

    # ---------------------------------------------------------------- summary
    def param_digest(self) -> str:
        h = hashlib.sha256()
        for p in self.params:
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())  # any dtype, bf16 included
        return h.hexdigest()[:16]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def rank_digests(self) -> list[str]:
        return self.gather(self.param_digest())

    def summary(self) -> dict:
        h = self.history
        if not h:
            return {}
        w = max(1, len(h) // 10)  # one update's batch is noisy: average the first and last tenth (as make eval does)
        first = sum(r["reward_raw"] for r in h[:w]) / w
        last = sum(r["reward_raw"] for r in h[-w:]) / w
        wall = sum(r["time_update_s"] for r in h)
        episodes = sum(r["episodes_per_s"] * r["time_update_s"] for r in h)
        gen_time = sum(r["time_generate_s"] for r in h)
        gen_tokens = sum(r["gen_tokens_per_s"] * r["time_update_s"] for r in h)
        return {
            "reward_first": first, "reward_last": last, "reward_gain": last - first, "reward_window_updates": w,
            "kl_last": h[-1]["kl"], "kl_coef_last": h[-1]["kl_coef"], "updates": h[-1]["update"],
            "episodes": h[-1]["episodes"], "episodes_per_s": episodes / wall, "gen_tokens_per_s": gen_tokens / wall,
            "gen_only_tokens_per_s": gen_tokens / gen_time if gen_time else None,
            "response_length_last": h[-1]["response_length"], "no_eos_fraction_last": h[-1]["no_eos_fraction"],
            "time_generate_s": sum(r["time_generate_s"] for r in h), "time_score_s": sum(r["time_score_s"] for r in h),
            "time_train_s": sum(r["time_train_s"] for r in h), "train_wall_s": wall,
        }
