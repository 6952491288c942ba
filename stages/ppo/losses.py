"""PPO's arithmetic as pure functions on tensors; tests/test_ppo_losses.py checks each against hand-computed numbers.

Shapes: per-token tensors are [B, T] with a 0/1 `mask` (1 = a real response token, up to and including EOS), or
flat [N] vectors of the real tokens only (what the update loop uses). Nothing here knows about models.

Conventions follow Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (the clean reading of
OpenAI's lm-human-preferences code by Ziegler et al. 2019), with one deliberate difference noted in `gae`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor across ranks (identity on one process)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce = _identity,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries come back as 0.

    `shift_mean=False` keeps the mean (reward whitening only rescales, as in lm-human-preferences). `reduce` sums
    across ranks so that every rank whitens with the same global statistics (two passes, unbiased variance).
    """
    m = mask.to(x.dtype)
    sums = reduce(torch.stack([(x * m).sum(), m.sum()]))
    mean = sums[0] / sums[1].clamp(min=1)
    ss = reduce((((x - mean) * m) ** 2).sum())
    var = ss / (sums[1] - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response (Schulman et al. 2016), [B, T] -> (advantages, returns).

    The step after the last real token is terminal (value 0), so the score placed on the last token (the EOS) is
    not bootstrapped past. TRL 1.12 instead puts the score one slot *after* the last token and keeps that pad
    slot's value; we keep the episode inside the mask.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    T = values.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + values) * m


def shape_scores(raw: torch.Tensor, ended: torch.Tensor, reward_stats: tuple[float, float] | None, clip: float,
                 missing_eos_penalty: float) -> torch.Tensor:
    """The sequence score PPO maximises, from the reward model's raw score [B]:
    (raw - mean) / std with the RM's own statistics (Stiennon et al. 2020, Ouyang et al. 2022), clipped to +-clip
    (0 = off), minus `missing_eos_penalty` for a response that never produced a stop token (Huang et al. 2024's
    "EOS trick"; applied after clipping, so a clipped score still pays it)."""
    scores = raw
    if reward_stats is not None:
        mean, std = reward_stats
        scores = (scores - mean) / max(std, 1e-8)
    if clip > 0:
        scores = scores.clamp(-clip, clip)
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~ended.bool()).to(scores.dtype)
    return scores


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Monte-Carlo return of every response token, sum_k gamma^k r_{t+k} to the end of its response, [B, T]."""
    m = mask.to(rewards.dtype)
    rewards = rewards * m
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * m


def fit_affine(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _identity) -> tuple[float, float]:
    """Least-squares (a, b) minimising sum over masked entries of (a x + b - y)^2, from global sums (`reduce` sums
    across ranks, so every rank gets the same fit). A constant x gives a = 0, b = mean(y)."""
    m = mask.to(torch.float64)
    x, y = x.to(torch.float64) * m, y.to(torch.float64) * m
    n, sx, sy, sxx, sxy = reduce(torch.stack([m.sum(), x.sum(), y.sum(), (x * x).sum(), (x * y).sum()])).tolist()
    if n == 0:
        return 1.0, 0.0
    var_x = sxx / n - (sx / n) ** 2
    a = 0.0 if var_x <= 1e-12 * max(1.0, sxx / n) else (sxy / n - sx * sy / n ** 2) / var_x
    return a, sy / n - a * sx / n


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Critic-free advantages of [B] sequence scores, rows in consecutive groups of `group_size` answers to one prompt.

    grpo (Shao et al. 2024, DeepSeekMath): (r - mean of the group) / (std of the group + eps); with
      normalize_std=False it is Dr. GRPO (Liu et al. 2025): no division by the std, which
      up-weights the groups whose scores barely differ (too easy or too hard prompts).
    rloo (Ahmadian et al. 2024): r minus the mean of the *other* answers, = k / (k - 1) * (r - group mean).
    A group whose answers all score the same gets 0 under both.
    """
    if group_size < 2:
        raise ValueError(f"{estimator} needs at least 2 samples per prompt, got {group_size}")
    g = scores.view(-1, group_size)
    centred = g - g.mean(1, keepdim=True)
    if estimator == "rloo":
        adv = centred * group_size / (group_size - 1)
    elif estimator == "grpo":
        adv = centred / (g.std(1, keepdim=True) + eps) if normalize_std else centred
    else:
        raise ValueError(f"unknown group estimator {estimator!r}")
    return adv.reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, reduce: Reduce = _identity
                            ) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): the return of every token (per-token KL penalty plus the score at the end), whitened
    over the whole global batch instead of against a critic or a group."""
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask, shift_mean=True, reduce=reduce)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token log-ratio log pi(a|s) - log pi_ref(a|s): unbiased for KL(pi || ref) under samples of pi."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 = (r - 1) - log r with r = pi_ref / pi: unbiased, never negative, lower variance."""
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def kl_k3_bounded(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 with the log-ratio clamped to +-20 and each token's term to at most 10, as verl's low_var_kl and OpenRLHF's k3,
    for the KL loss (use_kl_loss): exp(log_r) is unbounded, and one token the reference rates 7.5 nats above the policy
    (k3 ~ 1,800) would swamp the loss of the whole batch; the clamp of the log-ratio keeps its gradient finite."""
    log_r = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)
    return torch.clamp(torch.expm1(log_r) - log_r, max=10.0)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor | None, kl_coef: float, mask: torch.Tensor
                      ) -> torch.Tensor:
    """-kl_coef * KL on every response token, plus the sequence score on its last real token (Ziegler et al. 2019)."""
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    if kl is not None and kl_coef != 0:
        rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores * (mask.sum(1) > 0)
    return rewards


def loss_denominators(response_lengths: torch.Tensor, mode: str, rows: float | torch.Tensor,
                      tokens: float | torch.Tensor, max_len: int) -> torch.Tensor:
    """The denominator of each row's token terms in the policy loss, [n] from the rows' response lengths [n]: the loss
    is sum over tokens of term / denominator, over the whole mini-batch of `rows` rows and `tokens` tokens (every
    rank's). The modes are verl's loss_agg_mode:
      token-mean: tokens. Every token weighs the same (DAPO; TRL's "dapo"/"bnpo").
      seq-mean-token-mean: rows x the row's length. Each row's token mean, averaged over rows: every answer weighs the
        same, a long one's tokens less each (GRPO as DeepSeekMath wrote it; TRL's "grpo").
      seq-mean-token-sum-norm: rows x max_len, one constant: no length normalisation at all (Dr. GRPO, Liu et al.
        2025; TRL's "dr_grpo" divides by batch size x max_completion_length)."""
    lengths = response_lengths.to(torch.float32)
    if mode == "token-mean":
        return torch.full_like(lengths, float(tokens))
    if mode == "seq-mean-token-mean":
        return float(rows) * lengths.clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        return torch.full_like(lengths, float(rows) * max_len)
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, cliprange: float,
                denom: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al. 2017) on flat token vectors: sum(max(-A r, -A clip(r)) / denom).

    `denom` defaults to the number of tokens; the update loop passes each token's denominator over the whole
    mini-batch (`loss_denominators`: the mini-batch's token count by default), so that summing micro-batch gradients
    gives the mini-batch's loss, however it is split.
    Returns the loss and detached stats: clipped fraction and approx_kl = 0.5 * mean((log r)^2).
    """
    denom = logprobs.numel() if denom is None else denom
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = (torch.max(unclipped, clipped) / denom).sum()
    with torch.no_grad():
        stats = {"clipfrac": (clipped > unclipped).float().mean(), "approx_kl": 0.5 * (log_ratio ** 2).mean()}
    return loss, stats


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, denom: float | torch.Tensor | None = None
            ) -> torch.Tensor:
    """KL to the reference as a loss term (GRPO's use_kl_loss): the bounded k3 estimator per token (kl_k3_bounded),
    sum(k3 / denom). Its gradient flows through the current log-probs; a token at the bound has none: one token the
    reference rates 10 nats above the policy (a term of ~2e4 x the others) would take the whole clipped gradient norm."""
    denom = logprobs.numel() if denom is None else denom
    return (kl_k3_bounded(logprobs, ref_logprobs) / denom).sum()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float,
               denom: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2), summed / denom (flat vectors)."""
    denom = values.numel() if denom is None else denom
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * torch.max(err, err_clipped).sum() / denom
    with torch.no_grad():
        stats = {"clipfrac": (err_clipped > err).float().mean()}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last dim: logsumexp(l) - sum(p * l)."""
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def global_mean(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _identity) -> float:
    """Mean over the masked entries of every rank (`reduce` sums across ranks)."""
    m = mask.to(torch.float64)
    n, total = reduce(torch.stack([m.sum(), (x.to(torch.float64) * m).sum()])).tolist()
    return total / n if n else float("nan")


def global_std(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _identity) -> float:
    """Unbiased standard deviation over the masked entries of every rank."""
    m = mask.to(torch.float64)
    x = x.to(torch.float64)
    n, s, ss = reduce(torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])).tolist()
    return math.sqrt(max(ss - s * s / n, 0.0) / (n - 1)) if n > 1 else 0.0


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _identity
                       ) -> float:
    """1 - Var(returns - values) / Var(returns) over every rank's tokens: 1 is a perfect critic, 0 no better than a
    constant (a zero critic scores exactly 0), negative worse than one."""
    var_returns = global_std(returns, mask, reduce) ** 2
    if var_returns <= 0:
        return float("nan")
    return float(1.0 - global_std(returns - values, mask, reduce) ** 2 / var_returns)


class FixedKLController:
    """A constant KL coefficient (Stiennon et al. 2020, Ouyang et al. 2022)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, sec. 2.2: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    `current_kl` is the mean per-sequence KL of the batch just collected; `n_steps` its number of episodes.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
