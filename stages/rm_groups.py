"""Reward-model batches by prompt: each distinct response scored once, every labelled pair of it in the loss.

`make pairs` samples K responses a prompt and labels all K(K-1)/2 pairs of them, so in pairwise batches every response
is scored K-1 times an epoch (3 times at K = 4, 7 at K = 8). InstructGPT (Ouyang et al. 2022, section 3.5) trains on
all of a prompt's comparisons as one batch element instead: one forward pass per response, and the loss over the
prompt's pairs. The loss of a batch is the mean of -log sigmoid(r_winner - r_loser [- margin]) over its pairs: the
pairwise loss of the same pairs, for a fraction of the compute (`batch_by_prompt` in configs/rm.yaml). With it a
batch is `per_device_train_batch_size` *prompts*, however many pairs they hold.

A prompt's responses all begin with the same tokens (the prompt, the template's assistant header). With `share_prefix`
those run once a prompt, and each response runs after them from their keys and values (the cache generation uses):
the same scores and gradients, from the prompt's tokens once instead of K times (shared_prefix_rewards).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from accelerate import PartialState

from pipeline.adapters import last_token_index
from pipeline.generation import left_pad, right_pad
from stages.rm_data import prompt_key


def group_by_prompt(rows: list[dict]) -> list[dict]:
    """Tokenized pairs (rm_data.prepare_data rows) -> one row per prompt: its distinct token sequences once each, in
    first-seen order, and its pairs as indices into them (`winners[i]` beat `losers[i]`), with their margins. A pair
    that appears twice (a mixture weight > 1) stays twice. `length` (the longest sequence) serves group_by_length."""
    groups: dict[str, dict] = {}
    for i, r in enumerate(rows):
        g = groups.setdefault(prompt_key(r, i), {"sequences": [], "winners": [], "losers": [], "margins": [], "where": {}})
        ends = []
        for ids in (r["chosen_ids"], r["rejected_ids"]):
            key = tuple(ids)
            if key not in g["where"]:
                g["where"][key] = len(g["sequences"])
                g["sequences"].append(list(ids))
            ends.append(g["where"][key])
        g["winners"].append(ends[0])
        g["losers"].append(ends[1])
        g["margins"].append(float(r.get("margin", 0.0)))
    return [{"sequences": g["sequences"], "winners": g["winners"], "losers": g["losers"], "margins": g["margins"],
             "length": max(len(s) for s in g["sequences"])} for g in groups.values()]


def pair_losses(rewards: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor,
                margins: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigmoid(r_winner - r_loser [- margin]) of each pair."""
    diff = rewards[winners] - rewards[losers]
    if margins is not None:
        diff = diff - margins
    return -F.logsigmoid(diff)


def shared_prefix_length(sequences: list[list[int]], pad_token_id: int) -> int:
    """How many first tokens all of a group's sequences have in common, leaving each the token its score is read at
    as its own (last_token_index: the last one that is not pad; with pad == eos, the one before a final EOS), so that
    a *ForSequenceClassification reads each row's own pass where it reads the whole sequence."""
    ids, mask = right_pad(sequences, pad_token_id)
    first, limit = sequences[0], int(last_token_index(ids, mask, pad_token_id).min())
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    while n > 0 and first[n - 1] == pad_token_id:  # the prefix pass reads its score at its last non-pad token
        n -= 1
    return n


class GroupCollator:
    """Groups -> one right-padded batch of all their sequences, each group's pair indices offset to its rows. With
    share_prefix, and every group's sequences sharing a first token, each group's shared tokens once (`prefix_ids`,
    `prefix_mask`, a row a group) and the sequences' own tokens after them (`input_ids`, `attention_mask`), with
    `prefix_index`: each row's group. `row_group`: each row's group, always."""

    def __init__(self, pad_token_id: int, with_margin: bool, share_prefix: bool = False):
        self.pad_token_id, self.with_margin, self.share_prefix = pad_token_id, with_margin, share_prefix

    def __call__(self, groups: list[dict]) -> dict:
        sequences, winners, losers, margins, prefix_index = [], [], [], [], []
        for index, g in enumerate(groups):
            offset = len(sequences)
            sequences += g["sequences"]
            winners += [offset + i for i in g["winners"]]
            losers += [offset + i for i in g["losers"]]
            margins += g["margins"]
            prefix_index += [index] * len(g["sequences"])
        cuts = [self.prefix_cut(g) for g in groups] if self.share_prefix else [0]
        batch = {}
        if min(cuts) > 0:  # a group without a shared first token (no template, no BOS) runs the batch whole
            # Left-padded, so that each row's real tokens run on without a gap from its prefix into its own: a
            # sliding-window layer measures its window in cache columns, and pad columns between them would count.
            batch["prefix_ids"], batch["prefix_mask"] = left_pad(
                [g["sequences"][0][:cut] for g, cut in zip(groups, cuts)], self.pad_token_id)
            batch["prefix_index"] = torch.tensor(prefix_index)
            sequences = [s[cuts[prefix_index[row]]:] for row, s in enumerate(sequences)]
        batch["input_ids"], batch["attention_mask"] = right_pad(sequences, self.pad_token_id)
        batch["row_group"] = torch.tensor(prefix_index)  # stages/epoch_end.py drops the pairs of filled-in groups
        batch["winners"], batch["losers"] = torch.tensor(winners), torch.tensor(losers)
        if self.with_margin:
            batch["margin"] = torch.tensor(margins, dtype=torch.float)
        return batch

    def prefix_cut(self, group: dict) -> int:
        """How many of the group's first tokens run once, as its prefix."""
        return shared_prefix_length(group["sequences"], self.pad_token_id)


def takes_cache(model) -> bool:
    """Whether the model's forward takes a `cache` (shared_prefix_rewards passes one): every transformers model does;
    older remote code (trust_remote_code) takes `past_key_values` instead."""
    return "cache" in inspect.signature(model.forward).parameters


def share_prefix_inert(batch_by_prompt: bool, share_prefix: bool, checkpointing: bool) -> dict[str, str]:
    """{"share_prefix": why} when it would not act (for inert_settings): TRL's batches of pairs run each pair's
    sequences whole, and activation checkpointing drops the cache (shares_prefix)."""
    if not batch_by_prompt:
        return {"share_prefix": "it shares a prompt's tokens within batch_by_prompt's batches: set --batch_by_prompt "
                                "true too"}
    if share_prefix and checkpointing:
        return {"share_prefix": "activation checkpointing drops the cache a shared prefix runs from: set "
                                "--activation_checkpointing false too, or leave share_prefix out"}
    return {}


def group_collator(model, pad_token_id: int, with_margin: bool, share_prefix: bool,
                   checkpointing: bool = False) -> GroupCollator:
    """The reward model's collator for `model`, with shared prefixes where shares_prefix says."""
    return GroupCollator(pad_token_id, with_margin, shares_prefix(model, share_prefix, checkpointing))


def shares_prefix(model, share_prefix: bool, checkpointing: bool, router_loss: bool = False) -> bool:
    """Whether batches by prompt run shared prefixes: when asked for and the model can take them from a cache. A model
    that cannot, a run with activation checkpointing (`checkpointing`: transformers drops the cache in a checkpointed
    layer, and the responses would run without their prompt), or a router's auxiliary loss over whole sequences
    (`router_loss`: DPO's on a MoE model) runs whole sequences (the same loss and gradients, more compute), and says
    so."""
    why = None
    if share_prefix and not takes_cache(model):
        why = f"{type(model).__name__}.forward takes no `cache`"
    elif share_prefix and checkpointing:
        why = "activation checkpointing drops the cache a shared prefix runs from"
    elif share_prefix and router_loss:
        why = "the router's auxiliary loss (output_router_logits) is taken over whole sequences"
    if why:
        if why not in _NOTED and PartialState().is_main_process:  # once a run, not once a rank and ensemble member
            print(f"note: {why}: whole sequences, not shared prefixes "
                  "(share_prefix: false gives the same without this note)")
        _NOTED.add(why)
    return share_prefix and why is None


_NOTED: set[str] = set()  # the reasons shares_prefix has given for whole sequences


def shared_prefix_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_ids: torch.Tensor,
                          prefix_mask: torch.Tensor, prefix_index: torch.Tensor, add_prefix_score: bool) -> torch.Tensor:
    """Each row's reward from a GroupCollator batch with shared prefixes (through `prefix_then_rows`).
    `add_prefix_score`: the score is a sum over tokens (`sum` pooling counts the prefix's tokens too), so the prefix's
    part is added; `last` reads the row's last token alone."""
    shared, own = prefix_then_rows(model, input_ids, attention_mask, prefix_ids, prefix_mask, prefix_index)
    rewards = own.logits.squeeze(-1)
    if add_prefix_score:
        rewards = rewards + shared.logits.squeeze(-1)[prefix_index]
    else:  # a gradient into the prefix pass through the cache alone found FSDP2's layers resharded (prefix_pass_in_loss)
        rewards = rewards + prefix_pass_in_loss(shared.logits)
    return rewards


def prefix_then_rows(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_ids: torch.Tensor,
                     prefix_mask: torch.Tensor, prefix_index: torch.Tensor, prefix_kwargs: dict | None = None,
                     **row_kwargs):
    """`model`'s outputs over a batch with shared prefixes, (the prefixes', the rows'): the (left-padded) prefixes
    through the model once, their keys and values copied to each of their rows (`prefix_index`: each row's prefix;
    gradients flow back to the one pass), then the rows' own tokens after them at positions that continue their
    prefix, attending to its real tokens. The reward model's and DPO's batches by prompt both run this way."""
    shared = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=(prefix_mask.cumsum(1) - 1).clamp(min=0),
                   use_cache=True, **(prefix_kwargs or {}))
    cache = shared.cache
    cache.reorder_cache(prefix_index)
    positions = prefix_mask.sum(1)[prefix_index].unsqueeze(1) + (attention_mask.cumsum(1) - 1).clamp(min=0)
    own = model(input_ids=input_ids, attention_mask=torch.cat([prefix_mask[prefix_index], attention_mask], dim=1),
                position_ids=positions, cache=cache, use_cache=True, **row_kwargs)
    return shared, own


def prefix_pass_in_loss(prefix_output: torch.Tensor) -> torch.Tensor:
    """0, as a function of the prefix pass's output. FSDP2 gathers a layer's weights again for its backward when the
    gradient reaches the layer's output; when the loss reads the prefix pass only through the cache its keys and values
    went into, no gradient reaches its outputs, and the backward through the cache found the weights freed (setStorage:
    "storage of size 0"). Adding this to the loss sends a (zero) gradient through the prefix pass's outputs."""
    return 0 * prefix_output.sum()


def tokens_seen(inputs: dict, counted: torch.Tensor) -> torch.Tensor:
    """The tokens of a GroupCollator batch's `counted` rows, each row's shared prefix included."""
    seen = inputs["attention_mask"][counted].sum()
    if "prefix_mask" in inputs:
        seen = seen + inputs["prefix_mask"].sum(1)[inputs["prefix_index"]][counted].sum()
    return seen


def pairs_in_step(accelerator, batch_samples: list[dict], device) -> torch.Tensor:
    """The pairs of one optimizer step (a grouped trainer's `_get_num_items_in_batch`): in each micro-batch of its
    gradient accumulation, on every rank. Groups hold different numbers of pairs, so the mean over each micro-batch's
    pairs, averaged over micro-batches and ranks, weighted a prompt of few pairs above one of many: not the step's mean
    over its pairs."""
    pairs = torch.tensor(sum(len(b["winners"]) for b in batch_samples), device=device)
    return accelerator.gather(pairs.reshape(1)).sum() if accelerator.num_processes > 1 else pairs


def held_out_sums(trainer, dataset, batch_sums) -> list[float]:
    """Every rank's sums of `batch_sums(inputs)` (a float64 tensor) over the held-out groups, in batches of
    `per_device_eval_batch_size`, the batches spread over the ranks. Every rank runs the same number of batches (a
    sharded base's forward is collective): one with none left scores its first again, weighted 0."""
    acc, size = trainer.accelerator, trainer.args.per_device_eval_batch_size
    batches = [list(range(i, min(i + size, len(dataset)))) for i in range(0, len(dataset), size)]
    mine = batches[acc.process_index::acc.num_processes]
    rounds = -(-len(batches) // acc.num_processes)
    sums, training = None, trainer.model.training
    trainer.model.eval()
    with torch.no_grad():
        for r in range(rounds):
            batch = mine[r] if r < len(mine) else batches[0]
            inputs = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in batch]))
            counted = float(r < len(mine)) * batch_sums(inputs).to(torch.float64)
            sums = counted if sums is None else sums + counted
    trainer.model.train(training)
    return acc.reduce(sums, "sum").tolist()  # one process: as it is


def grouped_reward_trainer():
    """TRL's RewardTrainer taking GroupCollator batches: its own loss and logged figures, over the batch's pairs.
    `score_pooling` (a keyword of the trainer): the model's pooling (pool_in_forward), which shared prefixes need."""
    from trl import RewardTrainer

    class GroupedRewardTrainer(RewardTrainer):
        def __init__(self, *args, score_pooling: str = "last", **kwargs):
            super().__init__(*args, **kwargs)
            self.score_pooling = score_pooling
            self.loss_is_scaled_for_ga = True  # compute_loss divides by the optimizer step's pairs itself

        def _get_num_items_in_batch(self, batch_samples, device):
            return pairs_in_step(self.accelerator, batch_samples, device)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already grouped token ids (group_by_prompt), cut to max_length by rm_data

        def pair_losses(self, model, inputs):
            """(each pair's loss, every row's reward, winner rows, loser rows, the model's outputs, the shared-prefix
            inputs) of one batch. `inputs` loses the keys that are not the model's."""
            winners, losers, margins = inputs.pop("winners"), inputs.pop("losers"), inputs.pop("margin", None)
            inputs.pop("row_group")
            prefix = {k: inputs.pop(k) for k in ("prefix_ids", "prefix_mask", "prefix_index") if k in inputs}
            if prefix:
                rewards = shared_prefix_rewards(model, **inputs, **prefix, add_prefix_score=self.score_pooling == "sum")
                outputs = {"rewards": rewards}
            else:
                outputs = model(**inputs, use_cache=False)
                rewards = outputs.logits.squeeze(-1)
            losses = pair_losses(rewards, winners, losers, margins)
            if self.args.center_rewards_coefficient is not None:  # RewardTrainer's: each pair's reward sum, squared
                losses = losses + self.args.center_rewards_coefficient * (rewards[winners] + rewards[losers]) ** 2
            return losses, rewards, winners, losers, outputs, prefix

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Training: this micro-batch's share of the optimizer step's mean over all its pairs (every rank's);
            called alone (no num_items_in_batch), the batch's mean."""
            counted = inputs.pop("row_counted", None)  # the rows of the epoch's own groups (stages/epoch_end.py)
            losses, rewards, winners, losers, outputs, prefix = self.pair_losses(model, inputs)
            if num_items_in_batch is None:
                loss = losses.mean()
            else:  # the ranks' gradients are averaged, hence x ranks
                loss = losses.sum() * self.accelerator.num_processes / num_items_in_batch
            counted = torch.ones_like(rewards, dtype=torch.bool) if counted is None else counted
            seen = tokens_seen(inputs | prefix, counted)
            tokens = self.accelerator.gather(seen.reshape(1)).sum().item()  # every rank's, at an epoch's end too
            self._total_train_tokens += tokens // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            with torch.no_grad():  # ranks hold different numbers of responses and pairs: gather sums and counts
                r, diff = rewards[counted].float(), (rewards[winners] - rewards[losers]).float()
                low, high = (r.min(), r.max()) if r.numel() else (r.new_tensor(float("inf")), r.new_tensor(-float("inf")))
                local = torch.stack([low, high, r.sum(), r.new_tensor(r.numel()), (diff > 0).sum().float(),
                                     diff.sum(), r.new_tensor(diff.numel())])
                every = self.accelerator.gather(local.unsqueeze(0))  # one row a rank, none dropped at the end
                low, high = every[:, 0].min(), every[:, 1].max()
                reward_sum, responses, correct, diff_sum, pairs = every[:, 2:].sum(0)
                for name, value in (("min_reward", low), ("mean_reward", reward_sum / responses), ("max_reward", high),
                                    ("accuracy", correct / pairs), ("margin", diff_sum / pairs)):
                    self._metrics["train"][name].append(value.item())
            return (loss, outputs) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """The held-out loss and accuracy over every held-out pair, on one rank or several (held_out_sums): eval_loss
            picks the kept checkpoint (metric_for_best_model). The Trainer's loop averaged each batch's own mean, so a
            prompt of one pair weighed as much as a batch of twenty, and one batch a rank as much as another."""
            def batch_sums(inputs):  # pair losses, pairs ordered right, pairs
                losses, rewards, winners, losers, _, _ = self.pair_losses(self.model, inputs)
                right = (rewards[winners] > rewards[losers]).sum()  # a tie is wrong, as in rm_scoring
                return torch.stack([losses.double().sum(), right.double(), losses.new_tensor(len(losses), dtype=torch.float64)])

            loss, right, pairs = held_out_sums(self, self.eval_dataset if eval_dataset is None else eval_dataset, batch_sums)
            metrics = {f"{metric_key_prefix}_loss": loss / pairs if pairs else float("nan"),
                       f"{metric_key_prefix}_accuracy": right / pairs if pairs else float("nan")}
            self.log(dict(metrics))
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return GroupedRewardTrainer
