"""DPO batches by prompt (stages/dpo_groups.py): each response's log-probs once, TRL's sigmoid loss over the same pairs."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.models import load_base, load_tokenizer, profile_from
from stages.dpo_groups import (DPOGroupCollator, dpo_pair_losses, group_pairs, grouped_dpo_trainer, pairwise_only_settings,
                               reply_logps)
from tests.conftest import ARCHS, SLIDING_WINDOW_ARCHS, random_model
from tests.test_dpo import LN2, dpo_args, marker_data, one_by_8_and_two_by_4  # noqa: F401 (a fixture)
from tests.test_rm import fake_sft, write_jsonl
from tests.test_rm_groups import k_response_rows


def pair(prompt, chosen, rejected, reply_start):
    return {"prompt": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "reply_start": reply_start, "margin": 0.0}


def test_group_pairs_keeps_where_each_sequences_reply_starts():
    a, b = [{"role": "user", "content": "A"}], [{"role": "user", "content": "B"}]
    rows = [pair(a, [1, 2, 3], [1, 2, 4, 4], 2), pair(b, [1, 9, 9, 9], [1, 9, 8], 3), pair(a, [1, 2, 5], [1, 2, 3], 2)]
    groups = group_pairs(rows)
    assert [g["sequences"] for g in groups] == [[[1, 2, 3], [1, 2, 4, 4], [1, 2, 5]], [[1, 9, 9, 9], [1, 9, 8]]]
    assert [g["reply_starts"] for g in groups] == [[2, 2, 2], [3, 3]]
    assert (groups[0]["winners"], groups[0]["losers"]) == ([0, 2], [1, 0])
    # plain-text pairs (no prompt) are a group each, and one text's reply starts where it parts from its pair's other
    plain = group_pairs([pair("", [5, 6, 7, 8], [5, 6, 9], 2), pair("", [5, 6, 7, 8], [5, 6, 7, 1], 3)])
    assert [g["reply_starts"] for g in plain] == [[2, 2], [3, 3]]


def test_collator_marks_each_reply_and_offsets_each_groups_pairs():
    groups = [{"sequences": [[5, 6, 7], [5, 8]], "reply_starts": [1, 1], "winners": [1], "losers": [0], "margins": [0.0]},
              {"sequences": [[9, 1], [3, 3, 3], [4, 4, 4, 4]], "reply_starts": [1, 2, 3], "winners": [0, 2],
               "losers": [2, 1], "margins": [0.0, 0.0]}]
    batch = DPOGroupCollator(pad_token_id=0)(groups)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 8, 0, 0], [9, 1, 0, 0], [3, 3, 3, 0], [4, 4, 4, 4]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert batch["winners"].tolist() == [1, 2, 4] and batch["losers"].tolist() == [0, 4, 3]
    assert batch["row_group"].tolist() == [0, 0, 1, 1, 1] and "margin" not in batch


def test_shared_prefixes_stop_before_the_token_that_predicts_the_reply():
    """share_prefix: a group's common first tokens once, up to but not including its prompt's last token (its logits
    give the first reply token's log-prob, so it runs in each row), and each reply marked in its row's own tokens; a
    batch with a group whose reply starts at its first token (nothing to share) is collated whole."""
    groups = [{"sequences": [[5, 6, 7, 1], [5, 6, 7, 8, 8]], "reply_starts": [3, 3], "winners": [0], "losers": [1],
               "margins": [0.0]},
              {"sequences": [[9, 4, 2], [9, 4, 3, 3]], "reply_starts": [2, 2], "winners": [1], "losers": [0],
               "margins": [0.0]}]
    batch = DPOGroupCollator(pad_token_id=0, share_prefix=True)(groups)
    assert batch["prefix_ids"].tolist() == [[5, 6], [0, 9]] and batch["prefix_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["prefix_index"].tolist() == [0, 0, 1, 1]
    assert batch["input_ids"].tolist() == [[7, 1, 0], [7, 8, 8], [4, 2, 0], [4, 3, 3]]
    assert batch["completion_mask"].tolist() == [[0, 1, 0], [0, 1, 1], [0, 1, 0], [0, 1, 1]]
    assert batch["winners"].tolist() == [0, 3] and batch["losers"].tolist() == [1, 2]
    unshared = groups + [{"sequences": [[9, 1], [9, 2]], "reply_starts": [1, 1], "winners": [0], "losers": [1],
                          "margins": [0.0]}]
    whole = DPOGroupCollator(pad_token_id=0, share_prefix=True)(unshared)
    assert "prefix_ids" not in whole
    for key in ("input_ids", "completion_mask"):
        assert whole[key].tolist() == DPOGroupCollator(pad_token_id=0)(unshared)[key].tolist()


@pytest.mark.parametrize("arch", SLIDING_WINDOW_ARCHS)
def test_shared_prefixes_give_each_reply_its_whole_sequences_log_probs(arch):
    """A window of 3 positions, pad == eos (replies end in it), a group whose prefix (8 tokens) outgrows the window
    and one whose prefix (1 token) is padded in the prefix batch: each reply's log-prob from shared prefixes equals its
    whole sequence's, under gradients too (the policy's pass)."""
    from trl.trainer.utils import add_fused_lm_head

    eos = 1
    model = random_model(arch, "causal", sliding_window=3, pad_token_id=eos, eos_token_id=eos).train()
    add_fused_lm_head(model)
    g = torch.Generator().manual_seed(1)
    draw = lambda n: [int(t) for t in torch.randint(5, 60, (n,), generator=g)]  # noqa: E731
    long_head, short_head = draw(9), draw(2)
    a, b = [long_head + draw(n) + [eos] for n in (3, 5, 1)], [short_head + draw(n) + [eos] for n in (4, 2)]
    groups = group_pairs([pair("a", a[0], a[1], 9), pair("a", a[2], a[0], 9), pair("b", b[0], b[1], 2)])
    whole, shared = DPOGroupCollator(eos)(groups), DPOGroupCollator(eos, share_prefix=True)(groups)
    assert shared["prefix_mask"].sum(1).tolist() == [8, 1]
    expected = reply_logps(model, whole).log_probs.sum(1)
    got = reply_logps(model, shared).log_probs.sum(1)
    assert got.requires_grad and (expected < -1).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dpo_pair_losses_by_hand():
    logratios = torch.tensor([1.0, -0.5, 2.0])  # log pi - log ref of each sequence
    winners, losers = torch.tensor([0, 2, 1]), torch.tensor([1, 1, 2])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    beta = 0.2
    by_hand = [-math.log(sig(beta * 1.5)), -math.log(sig(beta * 2.5)), -math.log(sig(beta * -2.5))]
    assert dpo_pair_losses(logratios, winners, losers, beta).tolist() == pytest.approx(by_hand, rel=1e-6)


def test_only_the_sigmoid_loss_is_trained_by_prompt(tmp_path):
    from stages.dpo import check_args, parse_args

    def refused(*flags):
        train_cfg, args, run = parse_args(["--config", "configs/dpo.yaml", "--batch_by_prompt", "true", *flags])
        return pairwise_only_settings(train_cfg)

    assert refused() == [] and refused("--loss_weights", "1.0") == []
    assert refused("--loss_type", "ipo") == ["--loss_type ipo"]
    assert refused("--ld_alpha", "0.5", "--use_weighting", "true") == ["--ld_alpha 0.5", "--use_weighting True"]
    train_cfg, args, run = parse_args(["--config", "configs/dpo.yaml", "--batch_by_prompt", "true", "--loss_type",
                                       "sigmoid", "hinge"])
    with pytest.raises(ConfigError, match=r"--loss_type sigmoid hinge: batch_by_prompt trains DPO's sigmoid loss alone.*"
                                          r"--batch_by_prompt false"):
        check_args(train_cfg, args, run)
    train_cfg, args, run = parse_args(["--config", "configs/dpo.yaml", "--batch_by_prompt", "false", "--loss_type", "ipo"])
    check_args(train_cfg, args, run)  # TRL's pairwise batches apply them


def step_rows():
    """Two prompts: three responses of the first in three pairs (one of them twice), two of the second in one (twice,
    in both orders). Their prompts are 4 and 2 tokens long."""
    g = torch.Generator().manual_seed(1)
    head = [int(t) for t in torch.randint(5, 60, (4,), generator=g)]
    replies = [[int(t) for t in torch.randint(5, 60, (n,), generator=g)] for n in (3, 5, 2)]
    return [pair("a", head + replies[0], head + replies[1], 4), pair("a", head + replies[2], head + replies[0], 4),
            pair("a", head + replies[1], head + replies[2], 4), pair("b", [3, 7, 4, 5], [3, 7, 6], 2),
            pair("a", head + replies[0], head + replies[1], 4), pair("b", [3, 7, 6], [3, 7, 4, 5], 2)]


def dpo_trainer(arch: str, tiny_models, args, dataset, grouped: bool, share_prefix: bool = False):
    """A DPO trainer (TRL's pairwise, or ours by prompt, with shared prefixes or not) putting a fresh LoRA on a tiny
    base, as the stage does, with LoRA B then drawn at random (the same in every call): the policy differs from its
    reference (the LoRA disabled)."""
    from stages.dpo import trainer_on_token_ids

    from pipeline.models import lora_config

    prof = profile_from(str(tiny_models[arch]))
    tok = load_tokenizer(prof)
    torch.manual_seed(0)
    base = load_base(prof, tok)
    trainer_class = grouped_dpo_trainer(trainer_on_token_ids()) if grouped else trainer_on_token_ids()
    trainer = trainer_class(model=base, args=args, train_dataset=dataset, processing_class=tok,
                            peft_config=lora_config(prof, 4, 8, 0.0),
                            data_collator=DPOGroupCollator(tok.pad_token_id, share_prefix) if grouped else None)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return trainer.model.train(), trainer


def trainable_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_loss_gradient_and_figures_equal_trls_pairwise(tiny_models, tmp_path, arch):
    """TRL's DPOTrainer on every pair of two prompts' responses, and ours on the two prompts' groups: the same loss,
    the same gradient and the same logged rewards, accuracy, margin and log-probs, from 5 sequences a pass instead of
    12; and again with each prompt's shared tokens run once (prefixes of 3 and 1 tokens: padding inside the prefix
    batch; each stops one token short of its prompt, whose logits give the first reply token)."""
    from trl import DPOConfig

    rows = step_rows()
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=8, bf16=False, beta=0.3)
    pairs = [{"prompt_ids": r["chosen_ids"][:r["reply_start"]], "chosen_ids": r["chosen_ids"][r["reply_start"]:],
              "rejected_ids": r["rejected_ids"][r["reply_start"]:]} for r in rows]
    losses, grads, figures = [], [], []
    for grouped, share, data in ((False, False, pairs), (True, False, group_pairs(rows)), (True, True, group_pairs(rows))):
        model, trainer = dpo_trainer(arch, tiny_models, args, _dataset(data), grouped, share)
        loss = trainer.compute_loss(model, trainer.data_collator(data))
        loss.backward()
        losses.append(loss.detach())
        grads.append(trainable_grad(model))
        figures.append({k: v[-1] for k, v in trainer._metrics["train"].items()})
    shared = trainer.data_collator(group_pairs(rows))
    assert shared["input_ids"].shape[0] == 5  # 3 + 2 distinct responses
    assert shared["prefix_mask"].sum(1).tolist() == [3, 1] and shared["prefix_index"].tolist() == [0, 0, 0, 1, 1]
    assert grads[0].abs().max() > 0 and abs(losses[0].item() - LN2) > 1e-3  # the policy is not its reference
    for ours in (1, 2):
        torch.testing.assert_close(losses[ours], losses[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grads[ours], grads[0], atol=1e-6, rtol=1e-4)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected"):
            assert figures[ours][key] == pytest.approx(figures[0][key], abs=1e-5), key
    assert figures[2]["num_tokens"] == figures[1]["num_tokens"]  # a shared prefix's tokens counted for each of its rows


def test_a_step_is_the_mean_over_its_pairs_however_its_prompts_are_accumulated(tiny_models, tmp_path):
    """A 4-pair prompt and a 2-pair prompt in one batch, or one a micro-batch over 2 accumulation steps: the same loss
    and the same summed gradient (the step's mean over its 6 pairs), where each micro-batch's own mean weighs the
    2-pair prompt as much as the 4-pair one."""
    from trl import DPOConfig

    groups = group_pairs(step_rows())
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, beta=0.3)
    model, trainer = dpo_trainer("llama", tiny_models, args, _dataset(groups), grouped=True)
    collate = trainer.data_collator

    def step(batches):
        model.zero_grad()
        items = trainer._get_num_items_in_batch(batches, "cpu")
        loss = sum(trainer.compute_loss(model, dict(b), num_items_in_batch=items) for b in batches)
        loss.backward()
        return loss.detach(), trainable_grad(model)

    whole_loss, whole = step([collate(groups)])
    loss, accumulated = step([collate(groups[:1]), collate(groups[1:])])
    assert int(trainer._get_num_items_in_batch([collate(groups)], "cpu")) == 6
    torch.testing.assert_close(loss, whole_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(accumulated, whole, atol=1e-6, rtol=1e-4)
    micro_means = sum(trainer.compute_loss(model, dict(collate([g]))) for g in groups).item() / 2
    assert abs(micro_means - whole_loss.item()) > 1e-3  # what the plain mean of means would have been


def test_one_pair_a_prompt_trains_exactly_as_pairwise(tiny_models, marker_data, tmp_path):  # noqa: F811
    """With one pair a prompt a group is a pair: the same batches, the same loss, so the same DPO policy as TRL's
    pairwise DPOTrainer, weight for weight, and the same held-out figures."""
    from safetensors.torch import load_file

    from stages.dpo import main, parse_args

    runs_dir, done = tmp_path / "runs", {}
    for flag in ("false", "true"):
        fake_sft(tiny_models["qwen2"], runs_dir, flag)
        done[flag] = main(*parse_args(dpo_args(tiny_models["qwen2"], runs_dir, flag, "--dataset_name",
                                               str(marker_data["conversational"]), "--max_steps", "8",
                                               "--batch_by_prompt", flag)))
    pairwise, grouped = done["false"], done["true"]
    weights = [load_file(runs_dir / flag / "dpo" / "adapter" / "adapter_model.safetensors") for flag in ("false", "true")]
    assert weights[0].keys() == weights[1].keys()
    moved = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0])
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=2e-5, rtol=1e-4)
    assert grouped["steps"] == pairwise["steps"] == 8 and moved < 2e-5
    assert grouped["loss_curve"] == pytest.approx(pairwise["loss_curve"], abs=1e-4)
    assert grouped["eval_accuracy"] == pairwise["eval_accuracy"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):  # 32 held-out pairs in one batch
        assert grouped["trl_eval"][key] == pytest.approx(pairwise["trl_eval"][key], abs=2e-4), key


def test_k_responses_a_prompt_train_on_every_pair_by_prompt(tiny_models, tmp_path):
    """Four replies a prompt, all six pairs labelled: a step is 4 prompts (24 pairs), and the policy learns the rule
    on held-out prompts; the held-out loss is the mean over every held-out pair, in batches of one prompt or many."""
    from stages.dpo import main, parse_args

    runs_dir = tmp_path / "runs"
    fake_sft(tiny_models["llama"], runs_dir, "t")
    data = write_jsonl(tmp_path / "k4.jsonl", k_response_rows(60))
    m = main(*parse_args(dpo_args(tiny_models["llama"], runs_dir, "t", "--dataset_name", str(data), "--batch_by_prompt",
                                  "true", "--per_device_train_batch_size", "4", "--num_train_epochs", "3",
                                  "--per_device_eval_batch_size", "1")))
    assert (m["train_pairs"], m["eval_pairs"]) == (288, 72)  # 48 and 12 prompts, 6 pairs each
    assert m["steps"] == 36  # 48 prompts, 4 a batch, 3 epochs
    assert m["eval_accuracy"] >= 0.9 and m["reload_check"]["max_abs_logp_diff"] <= 1e-3, m
    assert m["trl_eval"]["loss"] == pytest.approx(m["eval_loss"], abs=1e-5)  # one prompt a batch, weighed by its pairs
    assert m["trl_eval"]["rewards/accuracies"] == pytest.approx(m["eval_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_two_processes_match_one_process_across_an_epochs_end(tiny_models, tmp_path):
    """Batches by prompt, 1 x 8 prompts against 2 x 4 over an epoch whose last batch holds 4 of its own prompts:
    accelerate fills rank 1's last batch with 4 prompts from the epoch's start, which weigh nothing here
    (stages/epoch_end.py), where pairwise DPO trains them. Every logged loss agrees, through the second epoch."""
    runs_dir = tmp_path / "runs"
    for run in ("one", "two"):
        fake_sft(tiny_models["llama"], runs_dir, run)
    data = write_jsonl(tmp_path / "k3.jsonl", k_response_rows(35, k=3))  # 28 training prompts: 3 steps + 4 prompts
    common = ["--dataset_name", str(data), "--max_steps", "6", "--logging_steps", "1", "--learning_rate", "2e-3",
              "--train_sampling_strategy", "random", "--batch_by_prompt", "true"]
    (m1, m2), (_, two) = one_by_8_and_two_by_4(tiny_models, runs_dir, common)
    assert m1["train_pairs"] == m2["train_pairs"] == 84, m1
    assert len(m1["loss_curve"]) == len(m2["loss_curve"]) == 6  # step 4 ends the first epoch
    diffs = [abs(a - b) for a, b in zip(m1["loss_curve"], m2["loss_curve"])]  # rounded to 4 places by the stage
    assert max(diffs) <= 1e-4 and abs(m1["train_loss"] - m2["train_loss"]) < 1e-5, (m1["loss_curve"], m2["loss_curve"])
    assert abs(m1["eval_loss"] - m2["eval_loss"]) < 1e-5 and "repeats" not in two.stderr


def test_held_out_log_probs_run_each_distinct_sequence_once(tiny_models):
    """completion_logps: two prompts' three responses in all six of their pairs run as six sequences, not twelve, and
    give each pair what the pair alone gives (its prompt + completion scored by hand)."""
    from datasets import Dataset

    from stages.dpo import completion_logps

    prof = profile_from(str(tiny_models["gpt2"]))
    tok = load_tokenizer(prof)
    torch.manual_seed(0)
    model = load_base(prof, tok).eval()
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(5, 300, (n,), generator=g).tolist()  # noqa: E731
    prompts, rows = [rand(4), rand(6)], []
    for p in prompts:
        replies = [rand(n) for n in (2, 5, 3)]
        rows += [{"prompt_ids": p, "chosen_ids": replies[i], "rejected_ids": replies[j]} for i, j in ((0, 1), (2, 0), (1, 2))]
    forward, rows_run = model.forward, []

    def counted(*args, **kwargs):
        rows_run.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    model.forward = counted
    chosen, rejected = completion_logps(model, Dataset.from_list(rows), tok.pad_token_id, batch_size=2)
    assert rows_run == [4, 2]  # 6 distinct sequences, 4 a batch (2 pairs' worth)
    model.forward = forward
    with torch.no_grad():
        def by_hand(prompt, reply):
            logits = model(input_ids=torch.tensor([prompt + reply])).logits[0, :-1].log_softmax(-1)
            return sum(logits[len(prompt) - 1 + t, tok_id].item() for t, tok_id in enumerate(reply))

        expected = [(by_hand(r["prompt_ids"], r["chosen_ids"]), by_hand(r["prompt_ids"], r["rejected_ids"])) for r in rows]
    assert chosen == pytest.approx([c for c, _ in expected], abs=1e-4)
    assert rejected == pytest.approx([r for _, r in expected], abs=1e-4)


def test_held_out_figures_of_an_untrained_policy_are_ties(tiny_models, tmp_path):
    """DPO's fresh LoRA is zero, so the policy is its reference: every held-out pair's implicit rewards are 0, its loss
    log 2, and a tie is not ordered right (TRL's accuracy counts chosen > rejected), over pairs of any batching."""
    from trl import DPOConfig

    from stages.dpo import trainer_on_token_ids

    prof = profile_from(str(tiny_models["qwen2"]))
    tok = load_tokenizer(prof)
    groups = group_pairs(step_rows())
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, beta=0.3, per_device_eval_batch_size=1)
    trainer = grouped_dpo_trainer(trainer_on_token_ids())(
        model=load_base(prof, tok), args=args, train_dataset=_dataset(groups), eval_dataset=_dataset(groups),
        processing_class=tok, peft_config=lora_config_of(prof), data_collator=DPOGroupCollator(tok.pad_token_id))
    m = trainer.evaluate()
    assert m["eval_loss"] == pytest.approx(LN2, abs=1e-6)
    assert m["eval_rewards/accuracies"] == 0 and m["eval_rewards/margins"] == 0 and m["eval_rewards/chosen"] == 0
    assert m["eval_logps/chosen"] < 0 and m["eval_logps/rejected"] < 0


def lora_config_of(prof):
    from pipeline.models import lora_config

    return lora_config(prof, 4, 8, 0.0)


def test_accumulated_micro_batches_train_as_one_batch(tiny_models, tmp_path):
    """2 prompts a step in one batch, or one a micro-batch over 2 accumulation steps, through the Trainer's own loop:
    the same logged losses and the same policy. Prompts hold 3 or 6 pairs, so a mean of the micro-batches' own means
    would differ, and the Trainer's division of an unscaled loss by the accumulation steps would halve the logged loss."""
    from safetensors.torch import load_file

    from stages.dpo import main, parse_args

    runs_dir, done = tmp_path / "runs", {}
    data = write_jsonl(tmp_path / "k34.jsonl", k_response_rows(20, k=3) + k_response_rows(20, k=4, seed=1))
    for run, batch, accumulation in (("whole", "2", "1"), ("accumulated", "1", "2")):
        fake_sft(tiny_models["llama"], runs_dir, run)
        done[run] = main(*parse_args(dpo_args(
            tiny_models["llama"], runs_dir, run, "--dataset_name", str(data), "--batch_by_prompt", "true",
            "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", accumulation, "--max_steps", "4",
            "--logging_steps", "1", "--learning_rate", "2e-3", "--train_sampling_strategy", "random")))
    whole, accumulated = done["whole"], done["accumulated"]
    assert len(whole["loss_curve"]) == 4 and abs(whole["loss_curve"][0] - LN2) < 0.05
    assert accumulated["loss_curve"] == pytest.approx(whole["loss_curve"], abs=1e-4)
    a, b = (load_file(runs_dir / run / "dpo" / "adapter" / "adapter_model.safetensors") for run in ("whole", "accumulated"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, tokenizer_dir):
    """A tiny Mixtral (4 experts, 2 a token) with our tokenizer, whose config asks for the router's auxiliary loss."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok, root = AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path_factory.mktemp("moe")
    cfg = AutoConfig.for_model("mixtral", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                               output_router_logits=True, max_position_embeddings=512, initializer_range=0.3,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    profile = root / "mixtral.yaml"
    profile.write_text(f"name_or_path: {root / 'model'}\nlora_target_modules: [q_proj, k_proj, v_proj, o_proj]\n")
    return profile


def test_activation_checkpointing_and_a_routers_loss_train_whole_sequences(tiny_models, tiny_moe, tmp_path, capsys,
                                                                           monkeypatch):
    """The stage's batches by prompt share prefixes (configs/dpo.yaml). transformers drops the cache in a checkpointed
    layer, and a MoE's router loss (output_router_logits) is taken over whole sequences: with either, they run whole
    sequences and say so once. Under checkpointing they train what shared prefixes train: the same losses and
    held-out figures."""
    import stages.rm_groups
    from stages.dpo import main, parse_args

    import stages.dpo_groups

    stages.rm_groups._NOTED.clear()
    shared_batches, forward = [], stages.dpo_groups.reply_logps

    def spied(model, inputs, **extra):
        shared_batches.append("prefix_ids" in inputs)
        return forward(model, inputs, **extra)

    monkeypatch.setattr(stages.dpo_groups, "reply_logps", spied)
    runs_dir = tmp_path / "runs"
    data = write_jsonl(tmp_path / "k3.jsonl", k_response_rows(20, k=3))
    common = ["--dataset_name", str(data), "--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "2"]
    done = {}
    for run, extra in (("shared", []), ("checkpointed", ["--activation_checkpointing", "true"])):
        fake_sft(tiny_models["llama"], runs_dir, run)
        done[run] = main(*parse_args(dpo_args(tiny_models["llama"], runs_dir, run, *common, *extra)))
        said = capsys.readouterr().out.count("note: activation checkpointing drops the cache a shared prefix runs from: "
                                             "whole sequences, not shared prefixes")
        assert said == (run == "checkpointed"), run
        assert set(shared_batches) == {run == "shared"}, run  # every training and held-out batch
        shared_batches.clear()
    shared, checkpointed = done["shared"], done["checkpointed"]
    assert len(shared["loss_curve"]) == 3 and checkpointed["loss_curve"] == pytest.approx(shared["loss_curve"], abs=1e-5)
    assert checkpointed["eval_loss"] == pytest.approx(shared["eval_loss"], abs=1e-5)
    fake_sft(tiny_moe, runs_dir, "moe")
    moe = main(*parse_args(dpo_args(tiny_moe, runs_dir, "moe", *common)))
    assert capsys.readouterr().out.count("note: the router's auxiliary loss (output_router_logits) is taken over whole "
                                         "sequences: whole sequences, not shared prefixes") == 1
    assert set(shared_batches) == {False}
    assert moe["steps"] == 3 and all(math.isfinite(x) for x in moe["loss_curve"])
