"""One optimizer step of the reward model's trainer on batches by prompt (stages.rm_groups), as tests/test_rm_groups.py
runs it in-process and under `accelerate launch` on two ranks: the step's update of every weight, and the logged
training and held-out figures after it (the same two prompts held out), saved by the main process, for the test to
compare across batch layouts.

    python -m tests.rm_group_step_check PROFILE PER_DEVICE_BATCH GRAD_ACCUMULATION OUT.pt [EVAL_BATCH]
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile

import torch


def pair(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "margin": 0.0}


def step_rows() -> list[dict]:
    """Two prompts, one of 1 pair and one of 3: a micro-batch's pair mean is not the step's when they are apart."""
    return [pair("a", [3, 4, 5], [3, 6])] + [pair("b", [7, 8, c], [7, 9, r]) for c, r in ((10, 11), (12, 13), (14, 15))]


def held_out_rows() -> list[dict]:
    """The two training prompts and a third of one pair: held out a prompt a batch, three batches, which two ranks
    share as two rounds (the second rank's second round scores a padding batch, weighted 0)."""
    return step_rows() + [pair("c", [16, 17, 18], [16, 19])]


def one_step(profile: str, batch: int, accumulation: int, eval_batch: int | None = None
             ) -> tuple[torch.Tensor, float, int, dict]:
    """(every weight's update, the logged training loss, the processes, the logged training figures and the held-out
    ones after the step) after one SGD step at learning rate 1."""
    from datasets import Dataset
    from trl import RewardConfig

    from pipeline.models import load_base, load_tokenizer, profile_from
    from stages.rm_groups import GroupCollator, group_by_prompt, grouped_reward_trainer

    prof = profile_from(profile)
    tok = load_tokenizer(prof)
    torch.manual_seed(0)  # the same fresh head in every process and on every rank
    model = load_base(prof, tok, kind="score")
    before = [p.detach().clone() for p in model.parameters()]
    out = tempfile.mkdtemp()  # TrainingArguments needs one (nothing is saved there): gone as the process ends
    atexit.register(shutil.rmtree, out, True)
    args = RewardConfig(output_dir=out, report_to="none", per_device_train_batch_size=batch,
                        gradient_accumulation_steps=accumulation, max_steps=1,
                        per_device_eval_batch_size=eval_batch or batch, learning_rate=1.0, optim="sgd",
                        lr_scheduler_type="constant", warmup_steps=0, train_sampling_strategy="sequential", bf16=False,
                        remove_unused_columns=False, save_strategy="no", logging_steps=1, disable_tqdm=True)
    groups = Dataset.from_list(group_by_prompt(step_rows()))
    trainer = grouped_reward_trainer()(model=model, args=args, train_dataset=groups, processing_class=tok,
                                       data_collator=GroupCollator(tok.pad_token_id, with_margin=False))
    loss = trainer.train().training_loss
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])  # trained in place
    logged = next(h for h in trainer.state.log_history if "accuracy" in h)
    figures = {k: logged[k] for k in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward")} | trainer.evaluate(
        Dataset.from_list(group_by_prompt(held_out_rows())))
    return update, loss, trainer.accelerator.num_processes, figures


def main(profile: str, batch: str, accumulation: str, out: str, eval_batch: str = "0") -> None:
    from accelerate import PartialState

    update, loss, world, figures = one_step(profile, int(batch), int(accumulation), int(eval_batch) or None)
    if PartialState().is_main_process:
        torch.save({"update": update, "loss": loss, "world": world, "figures": figures}, out)


if __name__ == "__main__":
    from pipeline.report import destroy_distributed

    main(*sys.argv[1:])
    destroy_distributed()  # as the stages' main_guard: a gloo rank exiting with its group can SIGABRT
