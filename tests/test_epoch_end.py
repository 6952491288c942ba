"""stages/epoch_end.py: the rows accelerate fills an epoch's last batch with, on several ranks, weigh nothing."""

from __future__ import annotations

import torch

from stages.epoch_end import drop_filled_groups, drop_filled_tokens, epoch_remainder, own_rows, repeats_note
from stages.rm_groups import GroupCollator


def test_own_rows_by_hand():
    """30 rows at 2 ranks x 4: the last global batch holds 6 of the epoch's own rows, 4 on rank 0 (nothing filled)
    and 2 on rank 1 (2 filled); 1 own row leaves rank 1 none of its own. No remainder, an unknown one (-1) or one
    process: nothing filled."""
    assert own_rows(6, 0, 2, 4) is None and own_rows(6, 1, 2, 4) == 2
    assert own_rows(1, 0, 2, 4) == 1 and own_rows(1, 1, 2, 4) == 0
    assert [own_rows(9, r, 3, 4) for r in range(3)] == [None, None, 1]
    assert own_rows(0, 1, 2, 4) is None and own_rows(-1, 1, 2, 4) is None and own_rows(3, 0, 1, 4) is None


def test_filled_rows_count_no_token():
    labels = torch.tensor([[5, 6, -100], [7, -100, -100], [8, 9, 10]])
    out = drop_filled_tokens({"input_ids": labels.clamp(min=0), "labels": labels}, 1)
    assert out["labels"].tolist() == [[5, 6, -100], [-100, -100, -100], [-100, -100, -100]]
    assert labels[1, 0] == 7  # the batch handed in is left as it was
    # packed without padding: the batch's 3 rows end to end (5, 2 and 2 tokens; the first row packs two sequences,
    # so position_ids start again inside it), the third filled in, then the second and third
    packed = {"input_ids": torch.arange(9)[None], "labels": torch.arange(9)[None],
              "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 0, 1]])}
    assert drop_filled_tokens(packed, 2, [5, 2, 2])["labels"].tolist() == [[0, 1, 2, 3, 4, 5, 6, -100, -100]]
    assert drop_filled_tokens(packed, 1, [5, 2, 2])["labels"].tolist() == [[0, 1, 2, 3, 4] + [-100] * 4]


def test_a_loader_that_drops_its_last_batch_fills_nothing():
    """30 rows at 2 x 4: 6 of the epoch's own rows in its last global batch; with dataloader_drop_last that batch is
    not trained at all, and nothing is filled in."""
    assert epoch_remainder(30, 4, 2, drop_last=False) == 6 and epoch_remainder(32, 4, 2, drop_last=False) == 0
    assert epoch_remainder(30, 4, 2, drop_last=True) == 0


def test_filled_groups_lose_their_pairs():
    """Three prompts of 2, 3 and 2 responses; the third was filled in: its pair leaves, its rows are not counted."""
    groups = [{"sequences": [[1, 2], [1, 3]], "winners": [0], "losers": [1], "margins": [0.5]},
              {"sequences": [[4, 5], [4, 6], [4, 7]], "winners": [0, 2], "losers": [1, 0], "margins": [0.0, 1.0]},
              {"sequences": [[8, 9], [8, 1]], "winners": [1], "losers": [0], "margins": [2.0]}]
    batch = GroupCollator(pad_token_id=0, with_margin=True)(groups)
    assert batch["row_group"].tolist() == [0, 0, 1, 1, 1, 2, 2]
    out = drop_filled_groups(batch, 2)
    assert out["winners"].tolist() == [0, 2, 4] and out["losers"].tolist() == [1, 3, 2]
    assert out["margin"].tolist() == [0.5, 0.0, 1.0]
    assert out["row_counted"].tolist() == [True] * 5 + [False] * 2
    assert drop_filled_groups(batch, 0)["winners"].numel() == 0


def test_the_repeats_note_names_the_pairs_and_the_size_that_repeats_none():
    note = repeats_note(own=2, batch_size=4, ranks=2)
    assert "repeats 2 pairs" in note and "a multiple of 8 pairs" in note
