"""Reward-model batches by prompt (stages/rm_groups.py): the same pairs, each response scored once, the same loss."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.adapters import pool_in_forward
from pipeline.models import load_base, load_tokenizer, profile_from
from stages.rm_groups import GroupCollator, group_by_prompt, group_collator, grouped_reward_trainer, pair_losses
from tests.conftest import ARCHS, SLIDING_WINDOW_ARCHS, random_model
from tests.test_rm import marker_data  # noqa: F401 (a fixture)


def pair(prompt, chosen, rejected, margin=0.0):
    return {"prompt": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "margin": margin}


def flattened(groups: list[dict]) -> list[tuple]:
    """Every group's pairs back as (winner ids, loser ids, margin), group by group."""
    return [(tuple(g["sequences"][w]), tuple(g["sequences"][l]), m)
            for g in groups for w, l, m in zip(g["winners"], g["losers"], g["margins"])]


def test_group_by_prompt_keeps_every_pair_and_each_response_once():
    a, b = [{"role": "user", "content": "A"}], [{"role": "user", "content": "B"}]
    rows = [pair(a, [1, 2, 3], [1, 2, 4], 0.5), pair(b, [1, 9], [1, 8, 8, 8]), pair(a, [1, 2, 5], [1, 2, 3]),
            pair(a, [1, 2, 4], [1, 2, 5], 1.0), pair(a, [1, 2, 3], [1, 2, 4], 0.5),  # the first pair again (weight 2)
            pair("", [7, 7], [6]), pair("", [7, 7], [6])]  # no prompt: a group each, however alike
    groups = group_by_prompt(rows)
    assert len(groups) == 4
    first = groups[0]
    assert first["sequences"] == [[1, 2, 3], [1, 2, 4], [1, 2, 5]]  # three responses, each once, first seen first
    assert (first["winners"], first["losers"], first["margins"]) == ([0, 2, 1, 0], [1, 0, 2, 1], [0.5, 0.0, 1.0, 0.5])
    assert groups[1]["length"] == 4 and first["length"] == 3
    by_group = [rows[0], rows[2], rows[3], rows[4], rows[1], rows[5], rows[6]]
    assert flattened(groups) == [(tuple(r["chosen_ids"]), tuple(r["rejected_ids"]), r["margin"]) for r in by_group]


def test_pair_losses_by_hand():
    rewards = torch.tensor([1.0, 0.0, 2.0])
    winners, losers = torch.tensor([0, 2, 1]), torch.tensor([1, 1, 2])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = -(math.log(sig(1.0)) + math.log(sig(2.0)) + math.log(sig(-2.0))) / 3  # a mean over pairs, not a sum
    assert pair_losses(rewards, winners, losers).mean().item() == pytest.approx(by_hand, rel=1e-6)
    margins = torch.tensor([0.5, 0.0, 1.0])
    with_margin = -(math.log(sig(0.5)) + math.log(sig(2.0)) + math.log(sig(-3.0))) / 3
    assert pair_losses(rewards, winners, losers, margins).mean().item() == pytest.approx(with_margin, rel=1e-6)


def test_collator_offsets_each_groups_pairs_to_its_rows():
    groups = [{"sequences": [[5, 6, 7], [5, 8]], "winners": [1], "losers": [0], "margins": [0.25]},
              {"sequences": [[9], [3, 3], [4, 4, 4, 4]], "winners": [0, 2], "losers": [2, 1], "margins": [0.0, 1.0]}]
    batch = GroupCollator(pad_token_id=0, with_margin=True)(groups)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 8, 0, 0], [9, 0, 0, 0], [3, 3, 0, 0], [4, 4, 4, 4]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 1, 2, 4]
    assert batch["winners"].tolist() == [1, 2, 4] and batch["losers"].tolist() == [0, 4, 3]
    assert batch["margin"].tolist() == [0.25, 0.0, 1.0]
    assert "margin" not in GroupCollator(pad_token_id=0, with_margin=False)(groups)


def test_collator_runs_each_groups_shared_tokens_once():
    """share_prefix: a group's common first tokens once (each sequence keeping at least one of its own), the rest
    after them; a batch with a group that shares no first token is collated whole."""
    groups = [{"sequences": [[5, 6, 7, 1], [5, 6, 8], [5, 6, 7]], "winners": [1], "losers": [0], "margins": [0.0]},
              {"sequences": [[9, 2], [9, 2, 3]], "winners": [0], "losers": [1], "margins": [0.0]}]
    batch = GroupCollator(pad_token_id=0, with_margin=False, share_prefix=True)(groups)
    # left-padded: a row's prefix runs straight on into its own tokens (see the sliding-window test)
    assert batch["prefix_ids"].tolist() == [[5, 6], [0, 9]] and batch["prefix_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["prefix_index"].tolist() == [0, 0, 0, 1, 1]
    assert batch["input_ids"].tolist() == [[7, 1], [8, 0], [7, 0], [2, 0], [2, 3]]
    assert batch["winners"].tolist() == [1, 3] and batch["losers"].tolist() == [0, 4]
    unshared = groups + [{"sequences": [[4, 4], [3]], "winners": [0], "losers": [1], "margins": [0.0]}]
    whole = GroupCollator(pad_token_id=0, with_margin=False, share_prefix=True)(unshared)
    assert "prefix_ids" not in whole and whole["input_ids"].shape == (7, 4)
    assert whole["input_ids"].tolist() == GroupCollator(pad_token_id=0, with_margin=False)(unshared)["input_ids"].tolist()


def shared_and_whole_rewards(model, rows: list[dict], pad_token_id: int, pooling: str):
    """The rows' grouped sequences scored with shared prefixes and whole: (shared, whole, the prefixes' lengths)."""
    from stages.rm_groups import shared_prefix_rewards

    groups = group_by_prompt(rows)
    whole = GroupCollator(pad_token_id, with_margin=False)(groups)
    shared = GroupCollator(pad_token_id, with_margin=False, share_prefix=True)(groups)
    with torch.no_grad():
        expected = model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"], use_cache=False).logits
        got = shared_prefix_rewards(model, shared["input_ids"], shared["attention_mask"], shared["prefix_ids"],
                                    shared["prefix_mask"], shared["prefix_index"], add_prefix_score=pooling == "sum")
    return got, expected.squeeze(-1), shared["prefix_mask"].sum(1).tolist()


@pytest.mark.parametrize("pooling", ["sum", "last"])
@pytest.mark.parametrize("arch", SLIDING_WINDOW_ARCHS)
def test_shared_prefixes_score_sliding_window_models_as_whole_sequences(arch, pooling):
    """A window of 3 positions, a group whose prefix (9 tokens) outgrows it and one whose prefix (2 tokens) is padded
    in the prefix batch: each row's reward from shared prefixes equals its whole sequence's. (Prefixes right-padded,
    the short group's rows differed by up to 0.09: a window counted in cache columns took in the pad columns.)"""
    model = pool_in_forward(random_model(arch, "score", sliding_window=3), pooling)
    g = torch.Generator().manual_seed(1)
    draw = lambda n: [int(t) for t in torch.randint(5, 60, (n,), generator=g)]  # noqa: E731
    long_head, short_head = draw(9), draw(2)
    a, b = [long_head + draw(n) for n in (3, 5, 2)], [short_head + draw(n) for n in (4, 2)]
    rows = [pair("a", a[0], a[1]), pair("a", a[2], a[0]), pair("b", b[0], b[1])]
    got, expected, prefix_lengths = shared_and_whole_rewards(model, rows, pad_token_id=0, pooling=pooling)
    assert prefix_lengths == [9, 2]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["sum", "last"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefixes_score_as_whole_sequences_when_pad_is_eos(arch, pooling):
    """pad == eos (Llama-3, Mistral and GPT-2 bases: load_tokenizer pads with the EOS), where a model reads a score
    at the last token that is not pad, the one before the final EOS. A reply that another reply starts with ("Yes."
    and "Yes. Because..."), an empty reply, and a prefix that ends in an EOS: each row's shared-prefix score is its
    whole sequence's. (Sharing all but the EOS, the short reply's own part was pad alone, read at the EOS: up to 6
    off in 'last'; an EOS ending the prefix dropped out of its 'sum'.)"""
    from stages.rm_groups import shared_prefix_length

    eos = 1
    model = pool_in_forward(random_model(arch, "score", pad_token_id=eos, eos_token_id=eos), pooling)
    prompt, separated = [5, 17, 23, 9], [5, 6, eos]
    yes, because, empty = prompt + [30, eos], prompt + [30, 41, 12, eos], prompt + [eos]
    rows = [pair("a", because, yes), pair("a", empty, because), pair("b", separated + [7, 8, eos], separated + [9, eos])]
    assert shared_prefix_length([yes, because], eos) == 4  # "30", where the short one is scored, stays its own
    assert shared_prefix_length([separated + [7, eos], separated + [9, eos]], eos) == 2  # not the separating EOS
    got, expected, prefix_lengths = shared_and_whole_rewards(model, rows, pad_token_id=eos, pooling=pooling)
    assert prefix_lengths == [3, 2]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_model_that_takes_no_cache_runs_whole_sequences(tiny_models, capsys, monkeypatch):
    """Shared prefixes pass the model a `cache`: every architecture's score model takes one and gets them; a forward
    without one (old remote code: `past_key_values`) gets whole sequences and a note, not a TypeError mid-training;
    the note once a run, not again for the next ensemble member."""
    import stages.rm_groups

    monkeypatch.setattr(stages.rm_groups, "_NOTED", set())
    groups = [{"sequences": [[5, 6, 7], [5, 6, 8]], "winners": [0], "losers": [1], "margins": [0.0]}]
    for arch in ARCHS:
        prof = profile_from(str(tiny_models[arch]))
        model = load_base(prof, load_tokenizer(prof), kind="score")
        assert "prefix_ids" in group_collator(model, 0, False, share_prefix=True)(groups), arch
        assert "prefix_ids" not in group_collator(model, 0, False, share_prefix=False)(groups), arch
    assert capsys.readouterr().out == ""

    class RemoteCode(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None):
            return input_ids

    batch = group_collator(RemoteCode(), 0, False, share_prefix=True)(groups)
    assert "prefix_ids" not in batch and batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 8]]
    assert capsys.readouterr().out.count("RemoteCode.forward takes no `cache`") == 1
    assert "prefix_ids" not in group_collator(RemoteCode(), 0, False, share_prefix=True)(groups)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pooling", ["sum", "last"])
def test_grouped_trainer_loss_and_gradient_equal_the_pairwise_trainers(tiny_models, tmp_path, arch, pooling):
    """TRL's RewardTrainer on every pair of two prompts' responses, and ours on the two prompts' groups: the same loss
    (margins and reward centering included) and the same gradient, from 5 forward rows instead of 12; and again with
    each prompt's shared tokens run once (prefixes of 4 and 1 tokens: padding inside the prefix batch)."""
    from trl import RewardConfig, RewardTrainer

    prof = profile_from(str(tiny_models[arch]))
    tok = load_tokenizer(prof)
    torch.manual_seed(0)
    model = pool_in_forward(load_base(prof, tok, kind="score"), pooling)
    g = torch.Generator().manual_seed(1)
    head = [int(t) for t in torch.randint(5, 60, (4,), generator=g)]
    replies = [[int(t) for t in torch.randint(5, 60, (n,), generator=g)] for n in (3, 5, 2)]
    rows = [pair("a", head + replies[0], head + replies[1], 0.5), pair("a", head + replies[2], head + replies[0], 0.0),
            pair("a", head + replies[1], head + replies[2], 1.0), pair("b", [3, 4, 5], [3, 6], 0.25),
            pair("a", head + replies[0], head + replies[1], 0.5), pair("b", [3, 6], [3, 4, 5], 0.0)]
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", center_rewards_coefficient=0.01,
                        per_device_train_batch_size=8, bf16=False)
    pairs = [{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"], "margin": r["margin"]} for r in rows]
    stock = RewardTrainer(model=model, args=args, train_dataset=_dataset(pairs), processing_class=tok)
    ours = grouped_reward_trainer()(model=model, args=args, train_dataset=_dataset(group_by_prompt(rows)),
                                    processing_class=tok, data_collator=GroupCollator(tok.pad_token_id, with_margin=True))
    shared = grouped_reward_trainer()(model=model, args=args, train_dataset=_dataset(group_by_prompt(rows)),
                                      processing_class=tok, score_pooling=pooling,
                                      data_collator=GroupCollator(tok.pad_token_id, with_margin=True, share_prefix=True))
    shared_batch = shared.data_collator(group_by_prompt(rows))
    assert shared_batch["prefix_mask"].sum(1).tolist() == [4, 1] and shared_batch["prefix_index"].tolist() == [0, 0, 0, 1, 1]
    losses, grads = [], []
    for trainer, batch in ((stock, stock.data_collator(pairs)),
                           (ours, ours.data_collator(group_by_prompt(rows))), (shared, shared_batch)):
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert ours.data_collator(group_by_prompt(rows))["input_ids"].shape[0] == 5  # 3 + 2 distinct responses
    for loss, grad in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(loss, losses[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad, grads[0], atol=1e-6, rtol=1e-4)


def test_a_step_is_the_mean_over_its_pairs_however_its_prompts_are_accumulated(tiny_models):
    """Prompts of 1 and 3 pairs in one batch, or one a micro-batch over 2 accumulation steps: the same update and
    loss (the step's mean over its 4 pairs). Each micro-batch's own pair mean, averaged, weighted the 1-pair prompt
    as much as the other three pairs (loss 0.88 against 0.68 on the same weights)."""
    from tests.rm_group_step_check import one_step

    whole, loss, _, figures = one_step(str(tiny_models["llama"]), batch=2, accumulation=1)
    accumulated, loss_accumulated, _, _ = one_step(str(tiny_models["llama"]), batch=1, accumulation=2)
    assert whole.abs().max() > 1e-3  # the step moved the weights: teeth
    torch.testing.assert_close(accumulated, whole, atol=1e-6, rtol=1e-5)
    assert loss_accumulated == pytest.approx(loss, abs=1e-6)
    # Held out one prompt a batch: the loss and accuracy over all 4 pairs (the loss picks the kept checkpoint), as in
    # one batch of both; the Trainer's loop averaged the batches' own means (1-pair prompt = 3-pair prompt).
    _, _, _, one_a_batch = one_step(str(tiny_models["llama"]), batch=2, accumulation=1, eval_batch=1)
    assert one_a_batch["eval_loss"] == pytest.approx(figures["eval_loss"], abs=1e-6)
    assert one_a_batch["eval_accuracy"] == figures["eval_accuracy"] and figures["eval_accuracy"] in (0, .25, .5, .75, 1)


def test_the_logged_training_figures_by_hand(tiny_models):
    """The step's logged mean reward (over its 8 distinct responses), margin and accuracy (over its 4 pairs), from the
    same fresh model's score of each sequence alone."""
    from pipeline.models import load_base, load_tokenizer, profile_from
    from tests.rm_group_step_check import one_step, step_rows

    _, _, _, figures = one_step(str(tiny_models["llama"]), batch=2, accumulation=1)
    profile = profile_from(str(tiny_models["llama"]))
    torch.manual_seed(0)  # one_step's fresh head
    model = load_base(profile, load_tokenizer(profile), kind="score").eval()
    with torch.no_grad():
        score = lambda ids: model(input_ids=torch.tensor([ids])).logits[0, 0].item()  # noqa: E731
        rows = step_rows()
        responses = {tuple(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids")}
        diffs = [score(r["chosen_ids"]) - score(r["rejected_ids"]) for r in rows]
        mean_reward = sum(score(list(x)) for x in responses) / len(responses)
        low, high = min(score(list(x)) for x in responses), max(score(list(x)) for x in responses)
    assert len(responses) == 8 and len(diffs) == 4
    assert figures["mean_reward"] == pytest.approx(mean_reward, abs=1e-5)
    assert (figures["min_reward"], figures["max_reward"]) == (pytest.approx(low, abs=1e-5), pytest.approx(high, abs=1e-5))
    assert figures["margin"] == pytest.approx(sum(diffs) / 4, abs=1e-5)
    assert figures["accuracy"] == sum(d > 0 for d in diffs) / 4


def test_a_held_out_tie_counts_as_wrong_with_the_loss_of_log_2(tiny_models, tmp_path):
    """A score head of zeros scores every response 0: each of the 5 held-out pairs is a tie, which is not ordered
    right (as rm_scoring counts a tie), and its loss is -log sigmoid(0) = log 2."""
    from datasets import Dataset
    from trl import RewardConfig

    from tests.rm_group_step_check import held_out_rows

    profile = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(profile)
    model = load_base(profile, tok, kind="score")
    with torch.no_grad():
        model.score.weight.zero_()
    groups = Dataset.from_list(group_by_prompt(held_out_rows()))
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", per_device_eval_batch_size=2, bf16=False,
                        remove_unused_columns=False, save_strategy="no", disable_tqdm=True)
    trainer = grouped_reward_trainer()(model=model, args=args, train_dataset=groups, processing_class=tok,
                                       data_collator=GroupCollator(tok.pad_token_id, with_margin=False))
    figures = trainer.evaluate(groups)
    assert figures["eval_accuracy"] == 0.0
    assert figures["eval_loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_a_tied_training_pair_is_not_ordered_right(tiny_models, tmp_path):
    """The logged training accuracy counts a pair right when its winner scores higher, as TRL's RewardTrainer and the
    held-out accuracy do: a score head of zeros ties all 4 pairs, accuracy 0 and margin 0 (mutant: `>=`, accuracy 1)."""
    from datasets import Dataset
    from trl import RewardConfig

    from tests.rm_group_step_check import step_rows

    profile = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(profile)
    model = load_base(profile, tok, kind="score")
    with torch.no_grad():
        model.score.weight.zero_()
    groups = group_by_prompt(step_rows())
    collator = GroupCollator(tok.pad_token_id, with_margin=False)
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False, remove_unused_columns=False,
                        save_strategy="no", disable_tqdm=True)
    trainer = grouped_reward_trainer()(model=model, args=args, train_dataset=Dataset.from_list(groups),
                                       processing_class=tok, data_collator=collator)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, collator(groups))
    logged = trainer._metrics["train"]
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert (logged["accuracy"], logged["margin"], logged["min_reward"], logged["max_reward"]) == ([0.0], [0.0], [0.0], [0.0])


def test_the_tokens_seen_count_a_shared_prefix_for_each_of_its_rows(tiny_models, tmp_path):
    """num_tokens counts every row's tokens, its shared prefix's included, as whole sequences do: step_rows' 2 + 6
    distinct responses are 5 + 18 = 23 tokens, the prefix ([3] and [7]) once for each of its 8 rows."""
    from datasets import Dataset
    from trl import RewardConfig

    from tests.rm_group_step_check import step_rows

    profile = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(profile)
    model = load_base(profile, tok, kind="score")
    groups = group_by_prompt(step_rows())
    seen = []
    for share_prefix in (True, False):
        collator = GroupCollator(tok.pad_token_id, with_margin=False, share_prefix=share_prefix)
        args = RewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False, remove_unused_columns=False,
                            save_strategy="no", disable_tqdm=True)
        trainer = grouped_reward_trainer()(model=model, args=args, train_dataset=Dataset.from_list(groups),
                                           processing_class=tok, data_collator=collator)
        batch = collator(groups)
        assert ("prefix_ids" in batch) == share_prefix
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        seen.append(trainer._metrics["train"]["num_tokens"])
    assert seen == [[23], [23]]


@pytest.mark.slow
def test_a_step_on_two_ranks_is_the_mean_over_all_their_pairs(tiny_models, tmp_path):
    """One prompt a rank (1 pair and 3 pairs): the update of one process given both prompts in one batch, where the
    average of the ranks' own pair means weighted the 1-pair prompt as much as the other three pairs."""
    from tests.conftest import run_module
    from tests.rm_group_step_check import one_step

    res = run_module("tests.rm_group_step_check", [str(tiny_models["llama"]), "1", "1", str(tmp_path / "step.pt")],
                     processes=2, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "step.pt")
    whole, loss, _, figures = one_step(str(tiny_models["llama"]), batch=2, accumulation=1)
    assert got["world"] == 2 and whole.abs().max() > 1e-3
    torch.testing.assert_close(got["update"], whole, atol=1e-6, rtol=1e-5)
    assert got["loss"] == pytest.approx(loss, abs=1e-6)
    # the logged training figures (4 pairs) and the held-out loss and accuracy (5 pairs in 3 batches: the second rank
    # scores a padding batch, weighted 0) are over all the pairs too, not each rank's own
    # mean averaged (accuracy 0.5 against 0.25, held-out loss 0.97 against 1.28, in a reviewer's case)
    assert got["figures"].keys() == figures.keys()
    for key, value in figures.items():
        assert got["figures"][key] == pytest.approx(value, abs=1e-5), key


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def test_held_out_scoring_scores_each_distinct_sequence_once(monkeypatch):
    """pair_scores (the stage's held-out figures and its reload check): every pair's scores as before, each distinct
    sequence (a response in K-1 pairs, a prompt in all of its pairs) through the model once."""
    import stages.rm_scoring as scoring

    seen = []

    def fake_score(model, sequences, pad_token_id, batch_size=16):
        seen.append([tuple(s) for s in sequences])
        return [float(sum(s) + 0.5 * len(s)) for s in sequences]  # any per-sequence function

    monkeypatch.setattr(scoring, "score", fake_score)
    rows = [{"chosen_ids": [1, 2, 3], "rejected_ids": [1, 2, 4], "reply_start": 2},
            {"chosen_ids": [1, 2, 5], "rejected_ids": [1, 2, 3], "reply_start": 2},
            {"chosen_ids": [1, 2, 4], "rejected_ids": [1, 2, 5], "reply_start": 2}]
    value = lambda s: sum(s) + 0.5 * len(s)  # noqa: E731
    whole = [value(r["chosen_ids"]) for r in rows] + [value(r["rejected_ids"]) for r in rows]
    assert scoring.pair_scores(None, rows, 0, 4, "last") == whole
    assert seen == [[(1, 2, 3), (1, 2, 5), (1, 2, 4)]]
    seen.clear()
    assert scoring.pair_scores(None, rows, 0, 4, "sum") == [w - value([1, 2]) for w in whole]
    assert seen == [[(1, 2, 3), (1, 2, 5), (1, 2, 4)], [(1, 2)]]  # the prompt once, not six times


def test_an_empty_sequence_scores_zero_without_a_forward(tiny_models):
    """A plain-text pair without a prompt, on a tokenizer without BOS, starts its reply at token 0: `sum` pooling
    subtracts the empty prefix's score, which is 0 (a batch of width 0 crashed the forward)."""
    from pipeline.models import load_base, load_tokenizer, profile_from
    from stages.rm_scoring import pair_scores, score

    prof = profile_from(str(tiny_models["gpt2"]))
    tok = load_tokenizer(prof)
    model = load_base(prof, tok, kind="score").eval()
    alone = score(model, [[5, 6, 7]], tok.pad_token_id, 2)
    assert score(model, [[5, 6, 7], [], []], tok.pad_token_id, 2) == alone + [0.0, 0.0]
    rows = [{"chosen_ids": [5, 6, 7], "rejected_ids": [8, 9], "reply_start": 0}]
    assert pair_scores(model, rows, tok.pad_token_id, 2, "sum") == score(model, [[5, 6, 7], [8, 9]], tok.pad_token_id, 2)


# ---------------------------------------------------------------- the stage with batch_by_prompt

def k_response_rows(n_prompts: int, k: int = 4, seed: int = 0) -> list[dict]:
    """K replies a prompt holding 0..K-1 times the word 'banana', every pair of them labelled: more bananas win."""
    import random

    from tests.test_rm import WORDS

    rng, rows = random.Random(seed), []
    for p in range(n_prompts):
        prompt = [{"role": "user", "content": f"Tell me about the {rng.choice(WORDS)}, number {p}."}]
        replies = [" ".join(rng.sample(WORDS, 5) + ["banana"] * n) for n in range(k)]
        for i in range(k):
            for j in range(i):
                rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": replies[i]}],
                             "rejected": [{"role": "assistant", "content": replies[j]}]})
    return rows


def test_one_pair_a_prompt_trains_exactly_as_pairwise(tiny_models, marker_data, tmp_path):
    """With one pair a prompt a group is a pair: the same batches in the same order, the same loss, so the same
    reward model as TRL's pairwise RewardTrainer, weight for weight."""
    from safetensors.torch import load_file

    from stages.rm import main, parse_args
    from tests.test_rm import fake_sft, rm_args

    runs_dir, arch, done = tmp_path / "runs", "llama", {}
    for flag in ("false", "true"):
        fake_sft(tiny_models[arch], runs_dir, flag)
        done[flag] = main(*parse_args(rm_args(tiny_models[arch], runs_dir, flag, "--dataset_name",
                                              str(marker_data["conversational"]), "--max_steps", "8", "--evals", "2",
                                              "--center_rewards_coefficient", "0.01", "--batch_by_prompt", flag)))
    pairwise, grouped = done["false"], done["true"]
    assert grouped["plan_steps_per_epoch"] == pairwise["plan_steps_per_epoch"] == 32  # 256 pairs = 256 prompts, 8 a batch
    weights = [load_file(runs_dir / flag / "rm" / "adapter" / "adapter_model.safetensors") for flag in ("false", "true")]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=2e-5, rtol=1e-4)
    assert grouped["eval_accuracy"] == pairwise["eval_accuracy"]
    assert [e["eval_loss"] for e in grouped["eval_curve"]] == pytest.approx([e["eval_loss"] for e in pairwise["eval_curve"]],
                                                                              abs=1e-4)


def test_k_responses_a_prompt_train_on_every_pair_by_prompt(tiny_models, tmp_path):
    """Four replies a prompt, all six pairs labelled: a batch is prompts (steps per epoch = prompts / batch), every
    pair still counts as one, and the reward model learns the rule on held-out prompts."""
    from stages.rm import main, parse_args
    from tests.test_rm import fake_sft, rm_args, write_jsonl

    runs_dir = tmp_path / "runs"
    fake_sft(tiny_models["qwen2"], runs_dir, "t")
    data = write_jsonl(tmp_path / "k4.jsonl", k_response_rows(100))
    m = main(*parse_args(rm_args(tiny_models["qwen2"], runs_dir, "t", "--dataset_name", str(data), "--batch_by_prompt",
                                 "true", "--per_device_train_batch_size", "4", "--num_train_epochs", "3")))
    assert (m["train_pairs"], m["eval_pairs"]) == (480, 120)  # 80 and 20 prompts, 6 pairs each
    assert (m["plan_steps_per_epoch"], m["plan_steps"]) == (20, 60)  # 80 prompts, 4 a batch, 3 epochs
    assert m["eval_accuracy"] >= 0.9, m
    assert m["reload_check"]["max_abs_diff"] <= 1e-4
