"""PPO's arithmetic (stages/ppo/losses.py) against numbers worked out by hand (the comments show the working)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.ppo import losses as L

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])  # real entries: 1, 2, 4


def test_masked_mean_and_var():
    assert L.masked_mean(X, M).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    assert L.masked_mean(X, M, dim=1).tolist() == pytest.approx([1.5, 4.0])
    # deviations from 7/3: -4/3, -1/3, 5/3 -> squares sum to 42/9 = 14/3
    assert L.masked_var(X, M).item() == pytest.approx(14 / 3 / 2)  # unbiased: / (n - 1)
    assert L.masked_var(X, M, unbiased=False).item() == pytest.approx(14 / 9)


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


def test_per_token_rewards():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).float()
    r = L.per_token_rewards(torch.tensor([2.0, -1.0]), kl, 0.5, mask)
    # row 0: -0.5 * kl, score 2 on its last token (t2); row 1: ends at t0: -0.2 - 1
    assert r.tolist() == [pytest.approx([-0.05, -0.1, 1.85]), pytest.approx([-1.2, 0.0, 0.0])]
    assert L.per_token_rewards(torch.tensor([2.0, -1.0]), None, 0.5, mask).tolist() == [[0, 0, 2.0], [-1.0, 0, 0]]


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
