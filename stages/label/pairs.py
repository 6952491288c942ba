"""The pairs the labeling app serves, read and checked before anything is written.

A .jsonl file is read line by line, so an error names its line; any other dataset (the pairs stage's save_to_disk
folder, .json, .parquet) goes through `pipeline.data.load_any`. Every row must be a usable pair (`store.pair_problem`)
and every pair_id unique: anything else is one ConfigError naming the file, the line or row, and the fix.
"""

from __future__ import annotations

import sys

from pipeline.config import ConfigError, resolve_path
from pipeline.data import load_any, read_jsonl
from stages.label.store import pair_problem

FIX = 'each line/row needs "pair_id" (text), "prompt" (a list of {"role", "content"} messages) and "responses" (2 texts)'


def read_pairs(source: str, name: str) -> list[dict]:
    """Pairs from `source` (a path); `name` says where it came from in messages (a flag, or the pairs stage)."""
    path = resolve_path(source)
    if not path.exists():
        raise ConfigError(f"{name}: {path} does not exist: give a .jsonl file or a save_to_disk folder of pairs")
    if path.is_file() and path.suffix == ".jsonl":
        try:
            numbered = [(f"line {n}", row) for n, row in read_jsonl(path)]
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
    else:
        try:  # a folder's bad file is named by load_any; the message says which flag (or stage) gave the folder
            numbered = [(f"row {i + 1}", row) for i, row in enumerate(load_any(str(path), flag=name, split_flag=None))]
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
    if not numbered:
        raise ConfigError(f"{name}: {path} holds no pairs: {FIX}")
    pairs, first_seen = [], {}
    for where, row in numbered:
        problem = pair_problem(row)
        if problem:
            raise ConfigError(f"{name}: {path} {where}: {problem}: {FIX}")
        if row["pair_id"] in first_seen:
            raise ConfigError(f"{name}: {path} {where}: pair_id {row['pair_id']!r} was already used on "
                              f"{first_seen[row['pair_id']]}: give each pair its own pair_id, or drop the repeat")
        first_seen[row["pair_id"]] = where
        pairs.append({"pair_id": row["pair_id"], "responses": list(row["responses"]),
                      "prompt": [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]})
    for note in pair_notes(pairs, [where for where, _ in numbered]):
        print(f"note: {name}: {path} {note}", file=sys.stderr)
    return pairs


def pair_notes(pairs: list[dict], wheres: list[str]) -> list[str]:
    """What annotators would be asked in vain, said before they are (served all the same: eval's SFT-vs-PPO pairs
    may hold two equal replies, whose honest label is a tie): pairs whose two responses are the same text, or one
    empty (the reward model leaves their labels out: it cannot learn from them), and pairs that repeat an earlier
    pair's prompt and responses under another pair_id (their labels count twice)."""
    import json

    notes, first = [], {}
    for pair, where in zip(pairs, wheres):
        a, b = pair["responses"]
        if a == b or not a.strip() or not b.strip():
            notes.append(f"{where} (pair_id {pair['pair_id']!r}): "
                         + ("its two responses are the same text" if a == b else "a response is empty")
                         + ": the reward model leaves its label out")
        key = json.dumps([pair["prompt"], sorted(pair["responses"])])
        if key in first:
            notes.append(f"{where} (pair_id {pair['pair_id']!r}) repeats {first[key]}'s prompt and responses: "
                         f"labels of both count twice")
        first.setdefault(key, f"{where} (pair_id {pair['pair_id']!r})")
    return notes
