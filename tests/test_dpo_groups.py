"""DPO batches by prompt (stages/dpo_groups.py): each response's log-probs once, TRL's sigmoid loss over the same pairs."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.models import load_base, load_tokenizer, profile_from
from stages.dpo_groups import DPOGroupCollator, dpo_pair_losses, group_pairs, grouped_dpo_trainer, pairwise_only_settings
from tests.conftest import ARCHS
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
    """Two prompts: three responses of the first in three pairs (one of them twice), two of the second in one."""
    g = torch.Generator().manual_seed(1)
    head = [int(t) for t in torch.randint(5, 60, (4,), generator=g)]
    replies = [[int(t) for t in torch.randint(5, 60, (n,), generator=g)] for n in (3, 5, 2)]
    return [pair("a", head + replies[0], head + replies[1], 4), pair("a", head + replies[2], head + replies[0], 4),
            pair("a", head + replies[1], head + replies[2], 4), pair("b", [3, 4, 5], [3, 6], 1),
            pair("a", head + replies[0], head + replies[1], 4), pair("b", [3, 6], [3, 4, 5], 1)]


def dpo_trainer(arch: str, tiny_models, args, dataset, grouped: bool):
    """A DPO trainer (TRL's pairwise, or ours by prompt) putting a fresh LoRA on a tiny base, as the stage does, with
    LoRA B then drawn at random (the same in every call): the policy differs from its reference (the LoRA disabled)."""
    from stages.dpo import trainer_on_token_ids

    from pipeline.models import lora_config

    prof = profile_from(str(tiny_models[arch]))
    tok = load_tokenizer(prof)
    torch.manual_seed(0)
    base = load_base(prof, tok)
    trainer_class = grouped_dpo_trainer(trainer_on_token_ids()) if grouped else trainer_on_token_ids()
    trainer = trainer_class(model=base, args=args, train_dataset=dataset, processing_class=tok,
                            peft_config=lora_config(prof, 4, 8, 0.0),
                            data_collator=DPOGroupCollator(tok.pad_token_id) if grouped else None)
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
    12."""
    from trl import DPOConfig

    rows = step_rows()
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=8, bf16=False, beta=0.3)
    pairs = [{"prompt_ids": r["chosen_ids"][:r["reply_start"]], "chosen_ids": r["chosen_ids"][r["reply_start"]:],
              "rejected_ids": r["rejected_ids"][r["reply_start"]:]} for r in rows]
    losses, grads, figures = [], [], []
    for grouped, data in ((False, pairs), (True, group_pairs(rows))):
        model, trainer = dpo_trainer(arch, tiny_models, args, _dataset(data), grouped)
        loss = trainer.compute_loss(model, trainer.data_collator(data))
        loss.backward()
        losses.append(loss.detach())
        grads.append(trainable_grad(model))
        figures.append({k: v[-1] for k, v in trainer._metrics["train"].items()})
    ours = trainer
    assert ours.data_collator(group_pairs(rows))["input_ids"].shape[0] == 5  # 3 + 2 distinct responses
    assert grads[0].abs().max() > 0 and abs(losses[0].item() - LN2) > 1e-3  # the policy is not its reference
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert figures[1][key] == pytest.approx(figures[0][key], abs=1e-5), key


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
