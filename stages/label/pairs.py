"""The pairs the labeling app serves, read and checked before anything is written.

A .jsonl file is read line by line, so an error names its line; any other dataset (the pairs stage's save_to_disk
folder, .json, .parquet) goes through `pipeline.data.load_any`. Every row must be a usable pair (`store.pair_problem`)
and every pair_id unique: anything else is one ConfigError naming the file, the line or row, and the fix.
"""

from __future__ import annotations

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
    return pairs
