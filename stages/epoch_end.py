"""Each training row once an epoch, on several ranks as on one process.

accelerate's data loaders (the Trainer's, with `even_batches` on) fill every rank's last batch of an epoch to full
size with rows from the epoch's start. Two ranks x B rows then trained up to (ranks - 1) x B rows twice where one
process x 2B trains a short last batch once: an SFT epoch of 30 rows at 2 x 4 took rows 0 and 1 again, and the two
loss curves parted there. Turning the filling off (`even_batches: false`) leaves a rank without a batch at some
lengths, and the others then wait on it forever. So the filled rows stay, and weigh nothing. accelerate puts the
epoch's own rows first in rank order (its gather_for_metrics cuts the gathered last batch at the same count), so of
rank r's last batch the first clamp(remainder - r x B, 0, B) rows are the epoch's own (`own_rows`).

How a filled row weighs nothing depends on the loss:
- a token mean over the step (SFT): its labels become -100 (`drop_filled_tokens`; packed without padding, its tokens
  by each row's length);
- a mean over the step's pairs (the reward model's and DPO's batches by prompt): its pairs leave the batch
  (`drop_filled_groups`);
- a mean over the rank's own rows (TRL's pairwise RewardTrainer and DPOTrainer): not done. Those trainers gather per-row
  figures, which needs the same rows on every rank, and their loss is theirs; the rank that repeats rows says so once
  (`repeats_note`), with the training-set size that repeats none.
"""

from __future__ import annotations

import sys

ROW_LENGTHS = "row_lengths"  # the batch key of each example's length (count_each_row_once's loader)


def own_rows(remainder: int, rank: int, ranks: int, batch_size: int) -> int | None:
    """How many of rank `rank`'s rows in an epoch's last batch are the epoch's own (the rest were filled in), from
    `remainder`, the epoch's rows in its last global batch (epoch_remainder; 0: nothing is filled in): None when no row
    was filled in."""
    if ranks == 1 or remainder <= 0:
        return None
    own = min(max(remainder - rank * batch_size, 0), batch_size)
    return None if own == batch_size else own


def drop_filled_tokens(batch: dict, own: int, row_lengths: list[int] | None = None) -> dict:
    """A token-mean batch (`labels`, -100 where no loss is taken) whose rows from `own` on count no token. Packed
    without padding (the batch's rows laid end to end in one, `row_lengths` tokens each): the tokens from the end of
    row `own - 1` on."""
    labels = batch["labels"].clone()
    if labels.shape[0] == 1 and row_lengths and len(row_lengths) > 1:
        labels[0, sum(row_lengths[:own]):] = -100
    else:
        labels[own:] = -100
    return dict(batch, labels=labels)


def epoch_remainder(rows: int, batch_size: int, ranks: int, drop_last: bool) -> int:
    """The epoch's own rows in its last global batch (0: nothing is filled in: the rows fill their batches, or the
    loader drops a last batch that would not be full)."""
    return 0 if drop_last else rows % (batch_size * ranks)


def drop_filled_groups(batch: dict, own: int) -> dict:
    """A GroupCollator batch (stages/rm_groups.py: `row_group`, each row's group) without the pairs of its groups from
    `own` on; `row_counted` marks the rows of the groups before (the logged tokens and rewards)."""
    keep = batch["row_group"][batch["winners"]] < own
    out = dict(batch, winners=batch["winners"][keep], losers=batch["losers"][keep],
               row_counted=batch["row_group"] < own)
    if "margin" in batch:
        out["margin"] = batch["margin"][keep]
    return out


def repeats_note(own: int, batch_size: int, ranks: int) -> str:
    return (f"note: this rank's last batch of the epoch repeats {batch_size - own} pairs from the epoch's start "
            f"(accelerate fills every rank's last batch to full size; pairwise DPO and reward batches train on them): "
            f"a training set of a multiple of {batch_size * ranks} pairs (per_device_train_batch_size x processes) "
            f"trains each pair once an epoch")


def count_each_row_once(trainer) -> None:
    """Make `trainer` (a transformers Trainer of this project's stages) weigh the rows accelerate fills an epoch's last
    batch with at 0 (SFT, batches by prompt), or say that they repeat (pairwise DPO and reward batches). On one process
    nothing is filled, and nothing changes."""
    acc = trainer.accelerator
    if acc.num_processes == 1:
        return
    noted = []
    build_loader = trainer.get_train_dataloader

    def get_train_dataloader(*args, **kwargs):
        """The training loader, its batches with each example's length: a batch packed without padding lays its rows
        end to end, each of several sequences, and its `position_ids` do not say where a row ends."""
        collate = trainer.data_collator

        def collate_with_row_lengths(examples):
            batch = collate(examples)
            if isinstance(examples[0], dict) and "input_ids" in examples[0]:
                batch[ROW_LENGTHS] = [len(e["input_ids"]) for e in examples]
            return batch

        trainer.data_collator = collate_with_row_lengths
        try:
            return build_loader(*args, **kwargs)
        finally:
            trainer.data_collator = collate  # evaluation's batches go to the model as they are

    trainer.get_train_dataloader = get_train_dataloader

    def get_batch_samples(epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            row_lengths = batch.pop(ROW_LENGTHS, None)
            state = acc.gradient_state
            if state.end_of_dataloader:  # set as the last batch is handed out
                # Not the loader's remainder: a resumed run's loader (skip_first_batches) knows none (-1)
                batch_size = trainer.args.train_batch_size
                remainder = epoch_remainder(len(state.active_dataloader.dataset), batch_size, acc.num_processes,
                                            trainer.args.dataloader_drop_last)
                own = own_rows(remainder, acc.process_index, acc.num_processes, batch_size)
                if own is not None and "labels" in batch:
                    batch = drop_filled_tokens(batch, own, row_lengths)
                elif own is not None and "row_group" in batch:
                    batch = drop_filled_groups(batch, own)
                elif own is not None and not noted:
                    print(repeats_note(own, batch_size, acc.num_processes), file=sys.stderr)
                    noted.append(own)
            batches.append(batch)
        return batches, trainer._get_num_items_in_batch(batches, device)

    trainer.get_batch_samples = get_batch_samples
