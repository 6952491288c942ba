"""DPO batches by prompt: each distinct response's log-probs once, under the policy and the reference, and every
labelled pair of them in the loss.

`make pairs` samples K responses a prompt and labels all K(K-1)/2 pairs of them. TRL's DPOTrainer batches pairs: each
pair's two sequences go through the policy and the reference, so every response runs K-1 times an epoch (7 times at
K = 8), twice. Batched by prompt (`batch_by_prompt` in configs/dpo.yaml), as the reward model's batches are
(stages/rm_groups.py, after InstructGPT's section 3.5), each response runs once under each, and the loss of a batch
is the mean over its pairs of DPO's -log sigmoid(beta * ((log pi(w) - log ref(w)) - (log pi(l) - log ref(l))))
(Rafailov et al. 2023, eq. 7): TRL's `sigmoid` loss of the same pairs, for a fraction of the compute. A batch is then
`per_device_train_batch_size` *prompts*, however many pairs they hold. With `share_prefix` the tokens a prompt's
responses begin with run once under each model, and each response after them from their cache (reply_logps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.rm_data import prompt_key
from stages.rm_groups import (GroupCollator, group_by_prompt, held_out_sums, pairs_in_step, prefix_pass_in_loss,
                              prefix_then_rows, tokens_seen)

# TRL settings the grouped loss does not apply, with the value that means "off": it trains DPO's sigmoid loss alone.
PAIRWISE_ONLY = {"loss_type": ["sigmoid"], "loss_weights": None, "ld_alpha": None, "use_weighting": False,
                 "f_divergence_type": "reverse_kl", "precompute_ref_log_probs": False, "padding_free": False,
                 "pad_to_multiple_of": None, "use_liger_kernel": False}


def pairwise_only_settings(train_cfg) -> list[str]:
    """The flags set on `train_cfg` (a DPOConfig) that only TRL's pairwise batches apply, as `--flag value`."""
    found = []
    for name, off in PAIRWISE_ONLY.items():
        if not hasattr(train_cfg, name):  # a TRL without the option
            continue
        value = getattr(train_cfg, name)
        if name == "f_divergence_type":
            value = getattr(value, "value", value)  # an enum in some TRL versions
        if value != off and not (name == "loss_weights" and value == [1.0]):  # sigmoid's own weight
            found.append(f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return found


def group_pairs(rows: list[dict]) -> list[dict]:
    """Tokenized pairs (rm_data.prepare_data rows) -> one row per prompt (rm_groups.group_by_prompt: its distinct
    sequences once, its pairs as indices into them), with `reply_starts`: where each sequence's reply begins."""
    groups = group_by_prompt(rows)
    # Per group, keyed and ordered as group_by_prompt's. A plain-text pair's reply starts where its two texts part, so
    # a text in two such pairs (a group each) starts its reply in two places.
    starts: dict[str, dict[tuple, int]] = {}
    for i, r in enumerate(rows):
        own = starts.setdefault(prompt_key(r, i), {})
        for ids in (r["chosen_ids"], r["rejected_ids"]):
            own.setdefault(tuple(ids), r["reply_start"])
    for g, own in zip(groups, starts.values(), strict=True):
        g["reply_starts"] = [own[tuple(s)] for s in g["sequences"]]
    return groups


class DPOGroupCollator(GroupCollator):
    """Groups -> one right-padded batch of all their sequences (rm_groups.GroupCollator: `winners`/`losers` index its
    rows, `row_group` names each row's group), with `completion_mask`: 1 on each sequence's reply tokens, as TRL's
    DataCollatorForPreference marks them. With share_prefix, each group's shared tokens once (GroupCollator's
    `prefix_ids`, `prefix_mask`, `prefix_index`), ending before the token whose logits give the first reply token's
    log-prob: every reply token is read from its own row's pass."""

    def __init__(self, pad_token_id: int, share_prefix: bool = False):
        super().__init__(pad_token_id, with_margin=False, share_prefix=share_prefix)

    def prefix_cut(self, group: dict) -> int:
        return min(super().prefix_cut(group), min(group["reply_starts"]) - 1)

    def __call__(self, groups: list[dict]) -> dict:
        batch = super().__call__(groups)
        cuts = batch["prefix_mask"].sum(1).tolist() if "prefix_ids" in batch else [0] * len(groups)
        completion_mask = torch.zeros_like(batch["attention_mask"])
        row = 0
        for g, cut in zip(groups, cuts):
            for sequence, start in zip(g["sequences"], g["reply_starts"]):
                completion_mask[row, start - cut:len(sequence) - cut] = 1
                row += 1
        batch["completion_mask"] = completion_mask
        return batch


def reply_logps(model, inputs: dict, **extra):
    """`model`'s outputs (TRL's fused LM head: `log_probs`, each next token's log-prob, 0 off the replies) over a
    DPOGroupCollator batch. With shared prefixes the prefixes run once (their last position's logits alone), their
    keys and values copied to each of their rows (gradients flow back to the one pass), then the rows' own tokens
    after them at positions that continue their prefix (rm_groups.prefix_then_rows)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    kwargs = {"labels": ids.masked_fill(inputs["completion_mask"] == 0, -100), "fused_lm_head": True, **extra}
    if "prefix_ids" not in inputs:
        return model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    shared, outputs = prefix_then_rows(model, ids, mask, inputs["prefix_ids"], inputs["prefix_mask"],
                                       inputs["prefix_index"], prefix_kwargs={"logits_to_keep": 1}, **kwargs)
    outputs.log_probs = outputs.log_probs + prefix_pass_in_loss(shared.logits)  # FSDP2's backward (rm_groups)
    return outputs


def dpo_pair_losses(logratios: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * (logratio_winner - logratio_loser)) of each pair, from each sequence's log pi - log ref."""
    return -F.logsigmoid(beta * (logratios[winners] - logratios[losers]))


# TRL's logged DPO figures, each a mean over pairs: the sums pair_sums gives, in its order.
PAIR_FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


def pair_sums(logps: torch.Tensor, logratios: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor,
              beta: float) -> torch.Tensor:
    """Sums over the pairs of PAIR_FIGURES' quantities (implicit rewards beta * logratio, a tie not ordered right, as
    TRL counts), then the number of pairs."""
    logps, logratios = logps.float(), logratios.float()  # a bf16 policy's sums, and counts past 256, in float32
    chosen, rejected = beta * logratios[winners], beta * logratios[losers]
    return torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum().float(), (chosen - rejected).sum(),
                        logps[winners].sum(), logps[losers].sum(), chosen.new_tensor(float(len(winners)))])


def grouped_dpo_trainer(base_class):
    """`base_class` (a TRL DPOTrainer taking the token ids it is given) taking DPOGroupCollator batches: the sigmoid
    loss over each batch's pairs, each sequence's log-probs computed once, and TRL's logged figures (rewards,
    accuracies, margins, log-probs) over its pairs."""
    from transformers import Trainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    class GroupedDPOTrainer(base_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_is_scaled_for_ga = True  # compute_loss divides by the optimizer step's pairs itself

        def _get_num_items_in_batch(self, batch_samples, device):
            return pairs_in_step(self.accelerator, batch_samples, device)

        def sequence_logps(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, object]:
            """(each row's reply log-prob under the policy, the same under the reference, the policy's outputs), as
            TRL sums them: over the reply's tokens, the reference with DPO's LoRA disabled."""
            outputs = reply_logps(model, inputs, **({"output_router_logits": True} if self.aux_loss_enabled else {}))
            unwrapped = self.accelerator.unwrap_model(self.model)
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                    use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                ref_logps = reply_logps(self.model, inputs).log_probs.sum(dim=1)
            return outputs.log_probs.sum(dim=1), ref_logps, outputs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Training: this micro-batch's share of the optimizer step's mean over all its pairs (every rank's);
            called alone (no num_items_in_batch), the batch's mean."""
            mode = "train" if self.model.training else "eval"
            counted = inputs.pop("row_counted", None)  # the rows of the epoch's own groups (stages/epoch_end.py)
            winners, losers = inputs.pop("winners"), inputs.pop("losers")
            inputs.pop("row_group")
            logps, ref_logps, outputs = self.sequence_logps(model, inputs)
            logratios = logps - ref_logps
            losses = dpo_pair_losses(logratios, winners, losers, self.beta)
            if num_items_in_batch is None:
                loss = losses.mean()
            else:  # the ranks' gradients are averaged, hence x ranks
                loss = losses.sum() * self.accelerator.num_processes / num_items_in_batch
            if self.aux_loss_enabled:
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            counted = torch.ones_like(logps, dtype=torch.bool) if counted is None else counted
            if mode == "train":
                tokens = self.accelerator.gather(tokens_seen(inputs, counted).reshape(1)).sum().item()
                self._total_train_tokens += tokens // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            self.log_pair_metrics(mode, logps.detach(), logratios.detach(), winners, losers)
            return (loss, outputs) if return_outputs else loss

        def log_pair_metrics(self, mode: str, logps, logratios, winners, losers) -> None:
            """TRL's DPO figures, means over every rank's pairs (ranks hold different numbers of them: sums and counts
            are gathered)."""
            local = pair_sums(logps, logratios, winners, losers, self.beta)
            *sums, pairs = self.accelerator.gather(local.unsqueeze(0)).sum(0)
            for name, value in zip(PAIR_FIGURES, sums):
                self._metrics[mode][name].append((value / pairs).item() if pairs else float("nan"))

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """The held-out loss and TRL's figures over every held-out pair, on one rank or several
            (rm_groups.held_out_sums): the Trainer's loop averaged each batch's own mean, so a prompt of one pair
            weighed as much as one of twenty-eight."""
            def batch_sums(inputs):  # the pairs' losses, then pair_sums
                logps, ref_logps, _ = self.sequence_logps(self.model, inputs)
                w, l = inputs["winners"], inputs["losers"]
                logratios = logps - ref_logps
                return torch.cat([dpo_pair_losses(logratios, w, l, self.beta).sum().float().reshape(1),
                                  pair_sums(logps, logratios, w, l, self.beta)])

            loss, *totals, pairs = held_out_sums(self, self.eval_dataset if eval_dataset is None else eval_dataset,
                                                 batch_sums)
            metrics = {f"{metric_key_prefix}_{name}": total / pairs if pairs else float("nan")
                       for name, total in zip(("loss", *PAIR_FIGURES), (loss, *totals))}
            self._metrics["eval"].clear()
            Trainer.log(self, dict(metrics))  # the Trainer's own: TRL's adds its per-batch averages of the mode
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return GroupedDPOTrainer
