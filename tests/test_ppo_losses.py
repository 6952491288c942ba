"""PPO's arithmetic (stages/ppo/losses.py) against numbers worked out by hand (the comments show the working)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError
from stages.ppo import losses as L
from stages.ppo.config import PPOConfig

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])  # real entries: 1, 2, 4


def test_masked_whiten():
    w = L.masked_whiten(X, M)
    std = math.sqrt(7 / 3)
    assert w[0, 0].item() == pytest.approx((1 - 7 / 3) / std, abs=1e-6)  # -0.8729
    assert w[1, 0].item() == pytest.approx((4 - 7 / 3) / std, abs=1e-6)
    assert w[0, 2].item() == 0.0 and w[1, 1].item() == 0.0  # masked out -> 0
    kept = L.masked_whiten(X, M, shift_mean=False)
    assert kept[0, 1].item() == pytest.approx((2 - 7 / 3) / std + 7 / 3, abs=1e-6)


def test_masked_whiten_across_ranks_equals_whole_batch():
    """Two 'ranks' holding one row each, whitened with summed statistics, equal whitening the whole batch."""
    x = torch.tensor([[0.3, -1.2, 2.0, 0.7], [1.5, 0.1, -0.4, 9.9]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    whole = L.masked_whiten(x, m)

    def fake_reduce(other_x, other_m):
        state = {}

        def reduce(t):
            if "mean" not in state:  # first call: (sum, count)
                out = t + torch.stack([(other_x * other_m).sum(), other_m.sum().float()])
                state["mean"] = out[0] / out[1]
                return out
            return t + (((other_x - state["mean"]) * other_m) ** 2).sum()  # second call: squared deviations

        return reduce

    r0 = L.masked_whiten(x[:1], m[:1], reduce=fake_reduce(x[1:], m[1:]))
    r1 = L.masked_whiten(x[1:], m[1:], reduce=fake_reduce(x[:1], m[:1]))
    assert torch.allclose(torch.cat([r0, r1]), whole, atol=1e-6)


def test_gae_by_hand():
    # gamma 1, lambda 0.95, score 1 on the last token, values 0.5 0.6 0.7:
    # t2: delta = 1 + 0 - 0.7 = 0.3              A2 = 0.3
    # t1: delta = 0 + 0.7 - 0.6 = 0.1            A1 = 0.1 + 0.95 * 0.3 = 0.385
    # t0: delta = 0 + 0.6 - 0.5 = 0.1            A0 = 0.1 + 0.95 * 0.385 = 0.46575
    adv, ret = L.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.95)
    assert adv[0].tolist() == pytest.approx([0.46575, 0.385, 0.3])
    assert ret[0].tolist() == pytest.approx([0.96575, 0.985, 1.0])


def test_gae_stops_at_the_end_of_the_response():
    # Mask [1, 1, 0]: the pad slot's value (9.9) and reward (5) must not leak in; the step after t1 is terminal.
    # gamma 0.9, lambda 0.5:  t1: delta = 1 + 0.9 * 0 - 0.6 = 0.4, A1 = 0.4
    #                         t0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04, A0 = 0.04 + 0.45 * 0.4 = 0.22
    adv, ret = L.gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.6, 9.9]]), torch.tensor([[1, 1, 0]]), 0.9, 0.5)
    assert adv[0].tolist() == pytest.approx([0.22, 0.4, 0.0])
    assert ret[0].tolist() == pytest.approx([0.72, 1.0, 0.0])


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    assert L.kl_k1(lp, ref).tolist() == pytest.approx([1.0, 0.0])
    # k3 with r = ref/pi = e^-1: (r - 1) - log r = e^-1 - 1 + 1 = 0.367879
    assert L.kl_k3(lp, ref).tolist() == pytest.approx([math.exp(-1), 0.0])
    assert (L.kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()  # k3 is never negative


def test_only_k1_in_the_reward_is_a_kl_penalty():
    """A penalty in the reward acts through the score function: its expected gradient is E_pi[k * grad log pi], k held
    fixed. For k1 that is exactly grad KL(pi||ref). For k3 it is grad KL(pi||ref) - grad KL(ref||pi) (Tang & Munos
    2025), here pointing away from it: it does not pull the policy back, which is why the reward's KL is k1 and no
    setting offers k3 there (use_kl_loss puts k3 in the loss, where its gradient is KL(ref||pi)'s)."""
    torch.manual_seed(0)
    logits, ref = torch.randn(6, requires_grad=True), torch.randn(6).log_softmax(0)
    logp = logits.log_softmax(0)
    pi = logp.exp()

    def grad(f):
        return torch.autograd.grad(f, logits, retain_graph=True)[0]

    def as_reward(estimator):  # the REINFORCE / PPO gradient of E_pi[k], k computed from the rollout and held fixed
        return grad((pi.detach() * estimator(logp.detach(), ref) * logp).sum())

    forward, reverse = grad((pi * (logp - ref)).sum()), grad((ref.exp() * (ref - logp)).sum())
    torch.testing.assert_close(as_reward(L.kl_k1), forward)
    torch.testing.assert_close(as_reward(L.kl_k3), forward - reverse)
    assert torch.nn.functional.cosine_similarity(as_reward(L.kl_k3), forward, dim=0) < 0
    # use_kl_loss differentiates k3 itself at the sampled tokens: the gradient of KL(ref||pi), which does pull back
    torch.testing.assert_close(grad((pi.detach() * L.kl_k3(logp, ref)).sum()), reverse)
    assert not hasattr(PPOConfig(), "kl_estimator")  # k1 in the reward, k3 in the loss: nothing to choose


def test_per_token_rewards():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).float()
    r = L.per_token_rewards(torch.tensor([2.0, -1.0]), kl, 0.5, mask)
    # row 0: -0.5 * kl, score 2 on its last token (t2); row 1: ends at t0: -0.2 - 1
    assert r.tolist() == [pytest.approx([-0.05, -0.1, 1.85]), pytest.approx([-1.2, 0.0, 0.0])]
    assert L.per_token_rewards(torch.tensor([2.0, -1.0]), None, 0.5, mask).tolist() == [[0, 0, 2.0], [-1.0, 0, 0]]
    # the default's small coefficient (0.05) counts as any other
    small = L.per_token_rewards(torch.tensor([2.0, -1.0]), kl, 0.05, mask)
    assert small.tolist() == [pytest.approx([-0.005, -0.01, 1.985]), pytest.approx([-1.02, 0.0, 0.0])]


def test_policy_loss_by_hand():
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 0.5, 1.1]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([1.0, 1.0, -2.0])
    # t0: max(-1.5, -1.2) = -1.2 (clipped)   t1: max(-0.5, -0.8) = -0.5   t2: max(2.2, 2.2) = 2.2
    loss, st = L.policy_loss(new, old, adv, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert st["clipfrac"].item() == pytest.approx(1 / 3)
    logs = [math.log(1.5), math.log(0.5), math.log(1.1)]
    assert st["approx_kl"].item() == pytest.approx(0.5 * sum(v * v for v in logs) / 3, rel=1e-5)
    loss6, _ = L.policy_loss(new, old, adv, cliprange=0.2, denom=6)  # mini-batch token count as denominator
    assert loss6.item() == pytest.approx(0.5 / 6)


def test_policy_loss_gradient_is_zero_when_clipped():
    new = torch.log(torch.tensor([1.5])).requires_grad_()
    loss, _ = L.policy_loss(new, torch.zeros(1), torch.tensor([1.0]), cliprange=0.2)
    loss.backward()
    assert new.grad.item() == 0.0  # ratio above 1 + eps with A > 0: no push further


def test_policy_loss_clips_a_falling_ratio_of_a_negative_advantage():
    """The lower clip bound: A = -1 at ratio 0.5 (the policy already dropped the token) costs max(0.5, 0.8) = 0.8, a
    clipped token with no gradient to drop it further; a rising ratio at A = -1 (1.1, inside the range) is not clipped."""
    new = torch.log(torch.tensor([0.5, 1.1])).requires_grad_()
    loss, st = L.policy_loss(new, torch.zeros(2), torch.tensor([-1.0, -1.0]), cliprange=0.2)
    assert loss.item() == pytest.approx((0.8 + 1.1) / 2)
    assert st["clipfrac"].item() == 0.5
    loss.backward()
    assert new.grad.tolist() == pytest.approx([0.0, 1.1 / 2])  # d/dlogr of -A r / 2 = r / 2 where unclipped


def test_value_loss_by_hand():
    v, old, ret = torch.tensor([1.0, 0.0, 0.6]), torch.tensor([0.5, 0.5, 0.5]), torch.tensor([2.0, 0.0, 1.0])
    # t0: clip(1.0) = 0.7: max((1-2)^2, (0.7-2)^2) = 1.69   t1: clip(0.0) = 0.3: max(0, 0.09) = 0.09
    # t2: unclipped 0.6: max(0.16, 0.16) = 0.16
    loss, st = L.value_loss(v, old, ret, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09 + 0.16) / 3)
    assert st["clipfrac"].item() == pytest.approx(2 / 3)


def test_entropy_and_explained_variance():
    assert L.entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))
    p = torch.tensor([0.25, 0.75])
    assert L.entropy_from_logits(p.log()).item() == pytest.approx(-(p * p.log()).sum().item())  # 0.5623
    ret, m = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert L.explained_variance(ret, ret, m) == pytest.approx(1.0)
    assert L.explained_variance(torch.zeros(1, 3), ret, m) == pytest.approx(0.0)


def test_entropy_is_per_row_of_a_batch_and_a_constant_return_explains_nothing():
    """Each row of [B, T, V] logits has its own entropy over the vocabulary (the last dim, not the batch's); and a
    batch whose returns are all the same has no variance to explain: NaN (null in metrics.jsonl), not a crash."""
    p = torch.tensor([0.25, 0.75])
    logits = torch.stack([torch.zeros(2), p.log(), torch.tensor([0.0, -50.0])])[None]  # [1, 3, 2]
    h = L.entropy_from_logits(logits)
    assert h.shape == (1, 3)
    assert h[0].tolist() == pytest.approx([math.log(2), -(p * p.log()).sum().item(), 0.0], abs=1e-6)
    same = torch.full((2, 3), 0.7)
    assert math.isnan(L.explained_variance(torch.zeros(2, 3), same, torch.ones(2, 3)))


def test_kl_controllers():
    fixed = L.FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    ctl = L.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 100)  # error clip(9/6 - 1) = 0.2 -> 0.1 * (1 + 0.2 * 100 / 10000)
    assert ctl.value == pytest.approx(0.1002)
    ctl.load_state_dict({"value": 0.1})
    ctl.update(5.4, 100)  # error -0.1 -> 0.1 * (1 - 0.001)
    assert ctl.value == pytest.approx(0.0999)
    ctl.load_state_dict({"value": 0.1})
    ctl.update(0.0, 100)  # error clipped at -0.2
    assert ctl.value == pytest.approx(0.0998)
    assert ctl.state_dict() == {"value": pytest.approx(0.0998)}


def test_shape_scores_by_hand():
    """normalise with the RM's stats, clip, then the missing-EOS penalty: each step fails its own assertion."""
    raw = torch.tensor([3.0, -1.0, 41.0, -9.0])
    ended = torch.tensor([True, False, True, False])
    # (raw - 1) / 2 = [1, -1, 20, -5]; clip 5 -> [1, -1, 5, -5]; no EOS in rows 1 and 3 costs 0.5
    out = L.shape_scores(raw, ended, (1.0, 2.0), clip=5.0, missing_eos_penalty=0.5)
    assert out.tolist() == [1.0, -1.5, 5.0, -5.5]
    # without normalisation, clipping or penalty the score is the raw score
    assert L.shape_scores(raw, ended, None, clip=0.0, missing_eos_penalty=0.0).tolist() == raw.tolist()
    # clipping off: the outlier keeps its normalised value
    assert L.shape_scores(raw, ended, (1.0, 2.0), clip=0.0, missing_eos_penalty=0.0).tolist() == [1.0, -1.0, 20.0, -5.0]
    # an RM whose scores spread less than 1: dividing by its std stretches them (std 0.25 -> x4)
    assert L.shape_scores(raw, ended, (1.0, 0.25), clip=0.0, missing_eos_penalty=0.0).tolist() == [8.0, -8.0, 160.0, -40.0]


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[0.0, -0.1, 2.0, 9.0], [1.0, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # row 0, gamma 0.5: G2 = 2; G1 = -0.1 + 0.5 * 2 = 0.9; G0 = 0 + 0.5 * 0.9 = 0.45 (the masked 9 never counts)
    # row 1: G1 = 0.5; G0 = 1 + 0.25 = 1.25
    out = L.discounted_returns(rewards, mask, 0.5)
    assert torch.allclose(out, torch.tensor([[0.45, 0.9, 2.0, 0.0], [1.25, 0.5, 0.0, 0.0]]))
    assert L.discounted_returns(rewards, mask, 1.0)[0].tolist() == pytest.approx([1.9, 1.9, 2.0, 0.0])


def test_fit_affine_by_hand_and_across_ranks():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    y = 2 * x - 1
    m = torch.tensor([[1, 1, 1, 0]])  # the masked 100 must not count
    a, b = L.fit_affine(x, y + torch.tensor([[0.0, 0.0, 0.0, 55.0]]), m)
    assert (a, b) == pytest.approx((2.0, -1.0))
    # y = [0, 1, 1] on x = [0, 1, 2]: mean x 1, mean y 2/3, cov 1/3, var 2/3 -> a = 1/2, b = 1/6
    assert L.fit_affine(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.0, 1.0, 1.0]]), torch.ones(1, 3)) == \
        pytest.approx((0.5, 1 / 6))
    # constant x: no slope, the mean of y
    assert L.fit_affine(torch.ones(1, 3), torch.tensor([[1.0, 2.0, 6.0]]), torch.ones(1, 3)) == pytest.approx((0.0, 3.0))
    # a constant x whose float64 variance rounds to 1e-19, not 0, still has no slope (a near-0/near-0 slope is -64)
    const = torch.full((1, 3), 0.03, dtype=torch.float64)
    assert L.fit_affine(const, torch.tensor([[0.0, 2.0, 4.0]]), torch.ones(1, 3)) == pytest.approx((0.0, 2.0))
    # two "ranks" with summed statistics fit what one rank with both rows fits
    xs, ys = torch.tensor([[0.5, -1.0], [2.0, 3.0]]), torch.tensor([[1.0, 0.0], [4.0, 2.5]])
    whole = L.fit_affine(xs, ys, torch.ones(2, 2))
    other = torch.stack([torch.tensor(2.0), xs[1].sum(), ys[1].sum(), (xs[1] ** 2).sum(), (xs[1] * ys[1]).sum()]).double()
    split = L.fit_affine(xs[:1], ys[:1], torch.ones(1, 2), reduce=lambda t: t + other)
    assert split == pytest.approx(whole)


def test_global_statistics_across_ranks_equal_the_whole_batch():
    """Explained variance, std and means from summed statistics equal those of the concatenated batch; the mean of
    per-rank values (what a naive all-reduce of the metrics gives) does not."""
    v = torch.tensor([[0.1, 0.5, 0.0], [2.0, 1.0, 3.0]])
    r = torch.tensor([[0.0, 1.0, 0.0], [2.5, 0.5, 4.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])

    def stats(rows, reduce=L._identity):
        return (L.explained_variance(v[rows], r[rows], m[rows], reduce), L.global_std(r[rows], m[rows], reduce),
                L.global_mean(r[rows], m[rows], reduce))

    whole = stats(slice(0, 2))
    calls = []

    def reduce_with_row1(t):  # "rank 0" holds row 0; the other rank's identical call on row 1 is added
        calls.append(t)
        return t + L_reduce_other[len(calls) - 1]

    L_reduce_other = []
    recorder = lambda t: (L_reduce_other.append(t), t)[1]  # noqa: E731
    stats(slice(1, 2), recorder)
    split = stats(slice(0, 1), reduce_with_row1)
    assert split == pytest.approx(whole)
    per_rank_mean = [(a + b) / 2 for a, b in zip(stats(slice(0, 1)), stats(slice(1, 2)))]
    assert per_rank_mean[0] != pytest.approx(whole[0]) and per_rank_mean[1] != pytest.approx(whole[1])
    # a zero critic explains nothing: exactly 0
    assert L.explained_variance(torch.zeros_like(r), r, m) == pytest.approx(0.0, abs=1e-12)


def test_group_advantages_by_hand():
    """Groups of 4: [1, 2, 3, 6] (mean 3, unbiased std sqrt(14/3)), and a group whose answers score the same."""
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    std = math.sqrt(((1 - 3) ** 2 + 1 + 0 + 9) / 3)
    grpo = L.group_advantages(scores, 4, "grpo")
    assert grpo[:4].tolist() == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std], rel=1e-5)
    assert grpo[4:].tolist() == [0.0] * 4
    dr = L.group_advantages(scores, 4, "grpo", normalize_std=False)  # Dr. GRPO: centred only
    assert dr.tolist() == [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    # RLOO: the first answer's baseline is the mean of the other three, (2 + 3 + 6) / 3 = 11/3 -> 1 - 11/3 = -8/3
    rloo = L.group_advantages(scores, 4, "rloo")
    assert rloo[:4].tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3])
    assert rloo[4:].tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="at least 2 samples"):
        L.group_advantages(scores, 1, "grpo")


def test_reinforce_pp_advantages_by_hand():
    """Returns to the end (gamma 1), then whitened over the batch: [[0.5+2, 2, -], [1, -, -]] = [2.5, 2, 1]."""
    rewards = torch.tensor([[0.5, 2.0, 7.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = L.reinforce_pp_advantages(rewards, mask, 1.0)
    mean, std = 5.5 / 3, math.sqrt(((2.5 - 5.5 / 3) ** 2 + (2 - 5.5 / 3) ** 2 + (1 - 5.5 / 3) ** 2) / 2)
    assert adv[0, :2].tolist() == pytest.approx([(2.5 - mean) / std, (2 - mean) / std], rel=1e-5)
    assert adv[1, 0].item() == pytest.approx((1 - mean) / std, rel=1e-5)
    assert adv[0, 2].item() == 0.0


def test_kl_loss_is_k3_mean_with_gradient():
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -2.0])
    loss = L.kl_loss(lp, ref)
    # k3 = e^(ref-lp) - 1 - (ref-lp): e^-0.5 - 1 + 0.5 = 0.10653 and 0 -> mean 0.053265
    assert loss.item() == pytest.approx((math.exp(-0.5) - 0.5) / 2, rel=1e-5)
    loss.backward()
    # d/dlp [e^(ref-lp) - 1 - ref + lp] = 1 - e^(ref-lp): (1 - e^-0.5) / 2 for the first token
    assert lp.grad.tolist() == pytest.approx([(1 - math.exp(-0.5)) / 2, 0.0], abs=1e-6)


def test_kl_loss_clamps_a_token_the_reference_rates_far_above_the_policy():
    """verl's low_var_kl: one token at log(ref / pi) = 9.5 has k3 = e^9.5 - 10.5 = 13,349, clamped to 10 with no
    gradient; the other tokens keep their k3 and gradient. Below the clamp (2.0: k3 = e^2 - 3 = 4.389) nothing changes."""
    lp = torch.tensor([-10.5, -1.0, -3.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.5, -1.0])
    loss = L.kl_loss(lp, ref, denom=3)
    assert loss.item() == pytest.approx((10.0 + math.exp(-0.5) - 0.5 + math.exp(2.0) - 3.0) / 3, rel=1e-6)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([0.0, (1 - math.exp(-0.5)) / 3, (1 - math.exp(2.0)) / 3], abs=1e-6)


def test_k3_bounded_by_hand():
    """The KL loss's k3 is bounded: log-ratio +-20, term <= 10. log(ref / pi) = 7.5 gives
    k3 = e^7.5 - 8.5 = 1,799 -> 10; 2.0 gives e^2 - 3 = 4.389, kept; -30 (the policy far above the reference) clamps
    the log-ratio to -20: e^-20 + 19 = 19.0 -> 10."""
    lp = torch.tensor([-8.5, -3.0, 0.0])
    ref = torch.tensor([-1.0, -1.0, -30.0])
    assert L.kl_k3_bounded(lp, ref).tolist() == pytest.approx([10.0, math.exp(2.0) - 3.0, 10.0], rel=1e-6)
    assert L.kl_k3(lp, ref)[0].item() == pytest.approx(math.exp(7.5) - 8.5, rel=1e-5)  # the logged estimate: unbounded
    # the clamp of the log-ratio keeps the gradient finite where the term's own cap would not: at 94 nats exp() is inf,
    # and the capped term's zero gradient times inf is NaN
    far = torch.tensor([-95.0], requires_grad=True)
    L.kl_k3_bounded(far, torch.tensor([-1.0])).sum().backward()
    assert far.grad.tolist() == [0.0]


def test_loss_denominators_by_hand():
    """Rows of 2 and 4 response tokens in a mini-batch of 3 rows and 10 tokens (a rank's share), responses up to 8."""
    lengths = torch.tensor([2, 4])
    den = lambda mode: L.loss_denominators(lengths, mode, rows=3, tokens=10, max_len=8).tolist()  # noqa: E731
    assert den("token-mean") == [10, 10]
    assert den("seq-mean-token-mean") == [6, 12]  # 3 rows x each row's length
    assert den("seq-mean-token-sum-norm") == [24, 24]  # 3 rows x 8
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        den("token-sum")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_each_loss_agg_mode_weighs_answers_as_its_paper_says(mode):
    """Two answers of 1 and 3 tokens, each token's surrogate -A r at ratio 1 = -A. The gradient each token gets:
    token-mean 1/4 each; GRPO's per-answer mean 1/(2 x its length); Dr. GRPO 1/(2 x 8) whatever the lengths."""
    lengths = torch.tensor([1, 3])
    per_token = L.loss_denominators(lengths, mode, rows=2, tokens=4, max_len=8).repeat_interleave(lengths)
    new = torch.zeros(4, requires_grad=True)
    loss, _ = L.policy_loss(new, torch.zeros(4), torch.ones(4), cliprange=0.2, denom=per_token)
    loss.backward()
    expected = {"token-mean": [1 / 4] * 4, "seq-mean-token-mean": [1 / 2, 1 / 6, 1 / 6, 1 / 6],
                "seq-mean-token-sum-norm": [1 / 16] * 4}[mode]
    assert (-new.grad).tolist() == pytest.approx(expected)
    # Each answer's total weight: equal under GRPO's mean; proportional to its length under the others
    totals = [-new.grad[:1].sum().item(), -new.grad[1:].sum().item()]
    assert totals[1] / totals[0] == pytest.approx(1.0 if mode == "seq-mean-token-mean" else 3.0)
