"""How the RL loop wires its options into the losses (tests/test_ppo*.py check the losses and the loop's outcomes):
each test fails under the one-line mutant of stages/ppo/trainer.py named in its docstring (tools/mutants.py)."""
import pytest
import torch

from stages.ppo import losses as L
from tests.test_ppo import (_flat, _kl_per_answer, _move_off_the_reference, _trainer, adapters, prompts_file,  # noqa: F401
                            varied_reward)


def test_dr_grpo_flag_reaches_the_loop(tiny_models, adapters, prompts_file, tmp_path):
    """grpo_normalize_std false (Dr. GRPO): centred scores, no division by the group std.
    Mutant: trainer passes True instead of cfg.grpo_normalize_std."""
    t = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--advantage_estimator", "grpo", "--num_samples_per_prompt",
                 "4", "--use_kl_loss", "true", "--grpo_normalize_std", "false", reward_fn=varied_reward)
    ro = t.rollout()
    adv, _, _ = t._advantages(ro)
    expected = L.group_advantages(t._scores(ro), 4, "grpo", normalize_std=False)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(adv, expected[:, None] * ro.response_mask.float())


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_gae_in_the_loop_is_losses_gae_with_the_configured_gamma_lam(whiten_rewards, tiny_models, adapters, prompts_file,
                                                                    tmp_path):
    """The loop's advantages are L.gae(rewards, values, mask, gamma, lam) of its per-token rewards (whitened with
    shift_mean=False when whiten_rewards). Mutants: lam (or gamma) not passed; whiten_rewards shifting the mean."""
    gamma, lam, coef = 0.9, 0.5, 0.3
    t = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--gamma", str(gamma), "--lam", str(lam), "--kl_coef",
                 str(coef), "--whiten_advantages", "false", "--whiten_rewards", str(whiten_rewards).lower(),
                 "--critic_init", "rm", reward_fn=varied_reward)
    _move_off_the_reference(t)
    ro = t.rollout()
    m = ro.response_mask.float()
    rewards = L.per_token_rewards(t._scores(ro), L.kl_k1(ro.logprobs, ro.ref_logprobs) * m, coef, m)
    if whiten_rewards:
        rewards = L.masked_whiten(rewards, m, shift_mean=False)
    exp_adv, exp_ret = L.gae(rewards, ro.values, m, gamma, lam)
    adv, ret, _ = t._advantages(ro)
    torch.testing.assert_close(adv, exp_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, exp_ret, atol=1e-5, rtol=1e-5)
    other, _ = L.gae(rewards, ro.values, m, gamma, 1.0)
    assert (other - exp_adv).abs().max() > 1e-2  # lam matters on this batch


def test_each_clip_range_reaches_its_own_loss(tiny_models, adapters, prompts_file, tmp_path, monkeypatch):
    """cliprange clips the policy ratio and cliprange_value the value change. Both default to 0.2, so a swap passes
    every other test. Mutants: value_loss given cfg.cliprange, or policy_loss given cfg.cliprange_value."""
    seen = {}
    pl, vl = L.policy_loss, L.value_loss
    monkeypatch.setattr(L, "policy_loss", lambda *a, **k: (seen.setdefault("policy", a[3]), pl(*a, **k))[1])
    monkeypatch.setattr(L, "value_loss", lambda *a, **k: (seen.setdefault("value", a[3]), vl(*a, **k))[1])
    t = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--cliprange", "0.3", "--cliprange_value", "0.05",
                 "--num_ppo_epochs", "1", reward_fn=varied_reward)
    t.step()
    assert seen == {"policy": 0.3, "value": 0.05}


def assert_the_update_is_one_sgd_step(t, ro, adv, returns, params, grads, lr: float) -> None:
    """t._optimise moves `params` by -lr x `grads`, the gradient of the loss the test computed by hand (plain SGD, one
    epoch, one mini-batch, no clipping)."""
    expected = -lr * torch.cat([(torch.zeros_like(p) if g is None else g).double().flatten() for g, p in zip(grads, params)])
    before = _flat(params)
    t._optimise(ro, adv, returns)
    step = _flat(params) - before
    assert expected.norm() > 1e-5
    assert (step - expected).norm() <= 1e-3 * expected.norm(), ((step - expected).norm(), expected.norm())


def test_entropy_bonus_is_the_sampling_distributions_token_mean(tiny_models, adapters, prompts_file, tmp_path):
    """With equal scores and no KL the advantages are 0, so one plain SGD step is -lr * grad(-coef * token mean of the
    entropy of softmax(logits / T)) over the mini-batch. Mutants: entropy of logits without T; ent.mean() per micro."""
    from stages.ppo.rollout import response_logits

    same = lambda prompts, ids, mask, texts: torch.zeros(len(ids))  # noqa: E731
    lr, coef = 1e-2, 0.5
    t = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--advantage_estimator", "grpo", "--num_samples_per_prompt",
                 "4", "--use_kl_loss", "false", "--kl_coef", "0", "--entropy_coef", str(coef), "--optim", "sgd",
                 "--max_grad_norm", "0", "--num_ppo_epochs", "1", "--learning_rate", str(lr), "--temperature", "0.5",
                 reward_fn=same)
    params = [p for _, p in t.named_params["policy"]]
    ro = t.rollout()
    adv, returns, _ = t._advantages(ro)
    assert not adv.any()
    x = ro.rows(torch.arange(ro.response_ids.shape[0]), t.cfg.prompt_group)
    t.stack.use("policy")
    with torch.enable_grad():
        ent = L.entropy_from_logits(response_logits(t.lm, x) / t.cfg.temperature)
        grads = torch.autograd.grad(-coef * ent.sum() / x.num_tokens, params, allow_unused=True)
    assert_the_update_is_one_sgd_step(t, ro, adv, returns, params, grads, lr)


def test_adaptive_kl_counts_every_ranks_episodes(tiny_models, adapters, prompts_file, tmp_path):
    """n_steps of the adaptive controller is the global batch. Stood in for by world 2 with an identity rank sum (both
    ranks hold the same rows). Mutant: cfg.local_batch_size alone."""
    t = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--adaptive_kl", "true", "--kl_coef", "0.1",
                 "--kl_horizon", "100", "--num_ppo_epochs", "1", reward_fn=varied_reward)
    t.world, t._all_sum = 2, (lambda x: x.clone())
    _move_off_the_reference(t)
    metrics, _ = t.step()
    kl, n = metrics["kl"], 2 * t.cfg.local_batch_size
    err = max(min(kl / t.cfg.kl_target - 1, 0.2), -0.2)
    assert t.kl_ctl.value == pytest.approx(0.1 * (1 + err * n / 100), rel=1e-9)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_agg_mode_sets_each_tokens_weight_in_the_update(mode, tiny_models, adapters, prompts_file, tmp_path):
    """One plain SGD step at ratio 1 is -lr * grad of sum((-A r + c k3 - e H) / d) over the mini-batch, with d by hand:
    the token count; the row count x the row's length (GRPO's paper); the row count x response_length (Dr. GRPO). The
    KL loss term (c = kl_coef) and the entropy bonus (e = entropy_coef) are aggregated as the policy term is (verl's
    agg_loss). Mutants: the mode not passed (token-mean always); the longest answer for response_length; tokens for
    rows; the KL term or the entropy bonus divided by the token count whatever the mode."""
    from stages.ppo.rollout import response_logits, token_logprobs

    lr, length, kl_coef, entropy_coef = 1e-2, 12, 0.3, 0.05
    t = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--advantage_estimator", "grpo", "--num_samples_per_prompt",
                 "4", "--use_kl_loss", "true", "--kl_coef", str(kl_coef), "--entropy_coef", str(entropy_coef),
                 "--optim", "sgd", "--max_grad_norm", "0", "--num_ppo_epochs", "1", "--learning_rate", str(lr),
                 "--response_length", str(length), "--loss_agg_mode", mode, reward_fn=varied_reward)
    _move_off_the_reference(t)  # at the reference the k3 term's gradient is 0, whatever divides it
    params = [p for _, p in t.named_params["policy"]]
    ro = t.rollout()
    B = ro.response_ids.shape[0]
    # The tiny policy seldom says EOS: cut the answers to lengths 1, 6, 11, 5, ... below response_length (the modes
    # differ only when lengths do; Dr. GRPO's constant is response_length, not the longest answer)
    cut = 1 + (torch.arange(B) * 5) % (length - 1)
    ro.response_mask &= torch.arange(ro.response_mask.shape[1]) < cut[:, None]
    adv, returns, _ = t._advantages(ro)
    x = ro.rows(torch.arange(B), t.cfg.prompt_group)
    m = x.response_mask
    lengths = m.sum(1).double()
    assert lengths.min() < lengths.max()  # the modes differ only when the answers' lengths do
    den = {"token-mean": lengths.sum().expand(B), "seq-mean-token-mean": B * lengths,
           "seq-mean-token-sum-norm": torch.full((B,), float(B * length), dtype=torch.float64)}[mode]
    t.stack.use("policy")
    with torch.enable_grad():
        logits = response_logits(t.lm, x)
        lp = token_logprobs(logits, x.tokens, t.cfg.temperature)
        ratio = torch.exp(lp - ro.logprobs[:, :m.shape[1]][m])
        d = den[:, None].expand_as(m)[m]
        k3 = L.kl_k3_bounded(lp, ro.ref_logprobs[:, :m.shape[1]][m])
        entropy = L.entropy_from_logits(logits / t.cfg.temperature)
        surrogate = ((-adv[:, :m.shape[1]][m] * ratio + kl_coef * k3 - entropy_coef * entropy) / d).sum()
        grads = torch.autograd.grad(surrogate, params, allow_unused=True)
    assert_the_update_is_one_sgd_step(t, ro, adv, returns, params, grads, lr)


def test_rank_sum_of_gradients_leaves_a_parameter_no_rank_reached_at_none():
    """2 ranks: a parameter with no gradient on any rank stays at grad None (AdamW skips it, as on one process: a zero
    would count as a step); one with a gradient on one rank only gets that rank's. The other rank's flat gradient
    vector (and its has-gradient flags) is added by hand. Mutant: the None not restored after the sum."""
    from types import SimpleNamespace

    from stages.ppo.trainer import PPOTrainer

    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (2, 3, 1))
    a.grad = torch.tensor([1.0, 2.0])
    other_rank = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 0.0, 1.0, 1.0, 0.0])  # a's and b's gradients; flags 1, 1, 0
    ranks = SimpleNamespace(world=2, _all_sum=lambda t: t + other_rank)
    PPOTrainer._sum_grads(ranks, [a, b, c])
    assert a.grad.tolist() == [11.0, 22.0] and b.grad.tolist() == [30.0, 40.0, 50.0] and c.grad is None


def test_the_value_step_is_the_token_mean_over_the_mini_batch_not_each_micro_batch(tiny_models, adapters, prompts_file,
                                                                                   tmp_path):
    """Micro-batches of 4 rows in a mini-batch of 8: one plain SGD step of the value adapter is -lr * grad of
    vf_coef x the clipped value loss summed over the mini-batch's tokens / its token count, however it is split.
    Mutant: each micro-batch's value loss divided by its own token count (the step about doubles)."""
    from stages.ppo.rollout import token_values

    lr, vf_coef = 1e-2, 0.5
    t = _trainer(tiny_models, adapters, prompts_file, tmp_path, "--optim", "sgd", "--max_grad_norm", "0",
                 "--num_ppo_epochs", "1", "--learning_rate", str(lr), "--vf_coef", str(vf_coef),
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", reward_fn=varied_reward)
    params = [p for _, p in t.named_params["value"]]
    ro = t.rollout()
    adv, returns, _ = t._advantages(ro)  # fits the critic: ro.values and value_offset on the shaped reward's scale
    B = ro.response_ids.shape[0]
    assert B == 2 * t.cfg.per_device_train_batch_size and t.cfg.num_mini_batches == 1
    idx = torch.arange(B)
    x = ro.rows(idx, t.cfg.prompt_group)
    m = x.response_mask
    t.stack.use("value")
    with torch.enable_grad():
        new_v = token_values(t.lm, x, t.top, ro.cached_hidden(idx, x)) + t.value_offset
        vl, _ = L.value_loss(new_v, ro.values[:, :m.shape[1]][m], returns[:, :m.shape[1]][m], t.cfg.cliprange_value)
        grads = torch.autograd.grad(vf_coef * vl, params, allow_unused=True)
    assert_the_update_is_one_sgd_step(t, ro, adv, returns, params, grads, lr)
