"""Loading datasets: the bundled mixtures in data/, or a user's own (`--dataset_name PATH_OR_HUB_ID`).

A user dataset can be a .jsonl/.json/.parquet/.csv file, a folder written by `datasets.save_to_disk`, a folder
of such files, or a Hub id. Every failure names the file and what to fix.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from pipeline.config import REPO_ROOT, ConfigError, bad_byte_at, resolve_path

SUFFIX_TO_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DATA_FLAGS = ("dataset_name", "prompts_file", "pairs_dataset")  # the stages' flags that name a dataset to load


def own_files(paths) -> list[str]:
    """The paths (a mixture's keys) that are not the project's bundled data (under data/): yours."""
    data = (REPO_ROOT / "data").resolve()
    return [p for p in paths if not resolve_path(p).resolve().is_relative_to(data)]


def check_dataset_exists(name_or_path: str, flag: str) -> None:
    """A name that can only be a local path (./x, /x, a data file's suffix, more than one '/') must exist; anything
    else may be a Hub id. `make` runs this for every stage given flags before any stage runs (pipeline.launch)."""
    looks_local = name_or_path.startswith((".", "/")) or name_or_path.endswith(tuple(SUFFIX_TO_BUILDER)) \
        or name_or_path.count("/") > 1
    if looks_local and not resolve_path(name_or_path).exists():
        raise ConfigError(f"dataset {name_or_path} does not exist: check the path given to {flag}")


def load_any(name_or_path: str, split: str = "train", flag: str = "--dataset_name",
             split_flag: str | None = "--dataset_split"):
    """One `datasets.Dataset` from wherever the user points (`flag`: where it was given, for the error; `split_flag`:
    the flag that picks another split, None where there is none and the split must be `train`)."""
    import datasets

    pick = f"pick one with {split_flag}" if split_flag else f"name the split '{split}' ({flag} reads that split only)"

    path = resolve_path(name_or_path)
    try:
        if path.is_file():
            builder = SUFFIX_TO_BUILDER.get(path.suffix)
            if builder is None:
                raise ConfigError(f"dataset file {path} has an unsupported suffix: use .jsonl, .json, .parquet or .csv")
            if path.stat().st_size == 0 or (path.stat().st_size < 4096 and not path.read_bytes().strip()):
                raise ConfigError(f"dataset {path} is empty: give a dataset with at least a few rows")
            if split != "train":
                raise ConfigError(f"dataset file {path} is one split: --dataset_split {split} picks a split of a "
                                  f"folder or a Hub id")
            check_text_file(path)
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise ConfigError(f"dataset folder {path} has splits {list(ds)}, not '{split}': {pick}")
                    ds = ds[split]
                elif split != "train":  # as a file: one split, read whatever --dataset_split says (it read train rows)
                    raise ConfigError(f"dataset folder {path} holds one saved Dataset, one split: drop --dataset_split "
                                      f"{split} (it picks a split of a saved DatasetDict, a folder of data files or a "
                                      f"Hub id)")
                return ds
            files = split_files(path, split, pick)
            for f in files:
                check_text_file(f)
            return datasets.load_dataset(SUFFIX_TO_BUILDER[files[0].suffix], data_files=[str(f) for f in files], split="train")
        check_dataset_exists(name_or_path, flag)
        return datasets.load_dataset(name_or_path, split=split)
    except ConfigError:
        raise
    except Exception as err:  # datasets raises many kinds; the user needs the name and the reason
        offline = "Offline" in type(err).__name__ or "offline" in str(err).lower() or isinstance(err, ConnectionError)
        download = f"(`hf download {name_or_path} --repo-type dataset --local-dir DIR`) and give DIR"
        if offline and os.environ.get("HF_HUB_OFFLINE") == "1":  # make's default: the network may be there
            fix = (": the Hub is switched off (HF_HUB_OFFLINE=1, make's default): add HF_HUB_OFFLINE=0 to the make "
                   f"command to download it, or download it yourself {download}")
        else:
            fix = f": no Hub access here (offline, or no network): download it where there is {download}" if offline else ""
        # datasets' DatasetGenerationError says only "An error occurred while generating the dataset": the reason
        # (the JSON parser's "... in row 4") is its cause
        cause = err.__cause__ if type(err).__name__ == "DatasetGenerationError" and err.__cause__ else None
        why = "; ".join(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for e in (err, cause) if e)
        raise ConfigError(f"could not load dataset '{name_or_path}': {why}{fix}") from None


# The split names the Hub's file-name rules know (datasets.data_files.SPLIT_KEYWORDS): train, test, validation, ...
HUB_SPLIT_NAMES = {"train", "training", "validation", "valid", "dev", "val", "test", "testing", "eval", "evaluation"}


def split_files(folder: Path, split: str, pick: str = "pick one with --dataset_split") -> list[Path]:
    """The data files of one split of a folder, by the Hub's file-name rules (`train.jsonl`, `data/test-0000.parquet`,
    ...: datasets' get_data_patterns); a folder whose names say no split is all one `train` split. Every file of the
    folder used to be read as training data, a downloaded dataset's test split included."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    data = [f for f in sorted(folder.rglob("*")) if f.suffix in SUFFIX_TO_BUILDER]
    if not data:
        raise ConfigError(f"dataset folder {folder} holds no .jsonl/.json/.parquet/.csv files and no saved dataset")
    by_split = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    files = [Path(f) for f in by_split.get(split, []) if Path(f).suffix in SUFFIX_TO_BUILDER]
    if not files and split not in HUB_SPLIT_NAMES:  # a split the Hub's rules do not name (train_sft.jsonl): the files
        # named after it. Not for one they do: `train` would take train_sft, train_gen and train_prefs of a download.
        files = [f for f in data if re.match(rf"{re.escape(split)}([-._ 0-9]|$)", f.stem)]
    if not files:
        raise ConfigError(f"dataset folder {folder} has files of the splits {sorted(map(str, by_split))}, none of "
                          f"'{split}': name its files by split (train*.jsonl, test*.jsonl), or {pick}")
    builders = sorted({SUFFIX_TO_BUILDER[f.suffix] for f in files})
    if len(builders) > 1:
        raise ConfigError(f"dataset folder {folder} mixes {' and '.join(builders)} files in its '{split}' split: keep "
                          f"one format")
    return files


def load_rows(name_or_path: str, split: str = "train") -> tuple[list[dict], list[str]]:
    """(rows as dicts, column names). A local .jsonl file is read and checked line by line here, without importing
    `datasets` (pyarrow and pandas hold ~100 MB for the life of a process: the RL stages only need the rows);
    anything else goes through load_any (`split`: of a folder or a Hub id)."""
    path = resolve_path(name_or_path)
    if not (path.is_file() and path.suffix == ".jsonl") or split != "train":
        ds = load_any(name_or_path, split)
        return list(ds), list(ds.column_names)
    rows = jsonl_objects(path)
    if not rows:
        raise ConfigError(f"dataset {path} is empty: give a dataset with at least a few rows")
    return rows, list(dict.fromkeys(key for row in rows for key in row))


def load_mixture(sources: list[dict], seed: int):
    """Bundled mixture: a list of {path, max_rows (optional)}; rows shuffled with the seed, then concatenated."""
    import datasets

    parts = []
    for src in sources:
        ds = load_any(src["path"], flag="--dataset_mixture")
        if src.get("max_rows"):
            ds = ds.shuffle(seed=seed).select(range(min(int(src["max_rows"]), len(ds))))
        parts.append(ds)
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


def check_text_file(path: Path) -> None:
    """Before `datasets` reads a text file: it must be UTF-8 (pyarrow's JSON reader passes some invalid bytes through as
    they are, and its errors name neither file nor line), and a JSON Lines file must hold one JSON object per line.
    Either problem is one ConfigError naming the file and the line. Binary formats (.parquet) are left to `datasets`."""
    if path.suffix == ".jsonl":
        jsonl_objects(path)
    elif path.suffix in (".json", ".csv"):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            line, column = bad_byte_at(err)
            raise ConfigError(f"{path} is not UTF-8 text (bad byte at line {line}, column {column}): save the file "
                              f"as UTF-8") from None
        if path.suffix == ".csv":
            check_csv_rows(path, text)
        elif text.strip() in ("[]", "{}"):
            raise ConfigError(f"dataset {path} is empty: give a dataset with at least a few rows")


def check_csv_rows(path: Path, text: str) -> None:
    """Every row of a CSV holds the header's number of fields. pandas reads a file whose rows all hold one field more
    (a text with an unquoted comma) with its first column as the index: every column shifted one place, no error."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))
    header = next(reader, [])
    rows, line = 0, reader.line_num + 1  # the line a row starts on (a quoted text may hold line breaks)
    for row in reader:
        if row:  # not a blank line, which pandas skips too
            rows += 1
        if row and len(row) != len(header):
            raise ConfigError(f"{path} line {line}: {len(row)} fields, but the header ({','.join(header)}) "
                              f"has {len(header)}: put a text that holds a comma in double quotes (\"like, this\")")
        line = reader.line_num + 1
    if not rows:
        raise ConfigError(f"dataset {path} is empty: give a dataset with at least a few rows (it holds a header only)")


def jsonl_objects(path: Path) -> list[dict]:
    """The rows of a JSON Lines file, each one a JSON object (else one ConfigError naming the file and the line)."""
    rows = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise ConfigError(f"{path} line {n} is a JSON {type(row).__name__}, not an object: give one "
                              f"{{\"column\": value, ...}} object per line")
        rows.append(row)
    return rows


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSON Lines file. A line that is not UTF-8 or not JSON is one
    ConfigError naming the file and the line (datasets' loader names neither)."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path} line {n} is not UTF-8 text (bad byte at column {bad_byte_at(err)[1]}): "
                                  f"save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line.rstrip("\r\n"))))
            except (json.JSONDecodeError, RecursionError) as err:
                why = f"{err.msg}, column {err.colno}" if isinstance(err, json.JSONDecodeError) else "nested too deeply"
                raise ConfigError(f"{path} line {n} is not valid JSON ({why}): fix or remove that line") from None
    return rows


def require_columns(ds, columns: list[str], name: str, fix: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing and "messages" in missing and "conversations" in ds.column_names:  # ShareGPT's layout
        fix = (f"{fix} (ShareGPT rows, {{'conversations': [{{'from': 'human', 'value': ...}}]}}, are "
               f"{{'messages': [{{'role': 'user', 'content': ...}}]}} here: rename the column and the keys, "
               f"human -> user, gpt -> assistant)")
    if missing:
        raise ConfigError(f"dataset {name} has no column(s) {missing} (it has {ds.column_names}): {fix}")
    if len(ds) == 0:
        raise ConfigError(f"dataset {name} is empty: give a dataset with at least a few rows")


def conversation_root(row: dict) -> str:
    """What the rows of one conversation tree share: its messages up to the first user turn (OASST holds sibling
    replies and follow-ups of one root prompt as separate rows). Rows are checked conversations by now."""
    msgs = row["messages"]
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), len(msgs) - 1)
    return json.dumps(msgs[: first_user + 1], sort_keys=True)


def train_eval_split(ds, eval_fraction: float, seed: int, group_by=None):
    """Split rows; with `group_by` (a function row -> key) no key lands in both halves (e.g. split by prompt)."""
    if eval_fraction <= 0:
        return ds, None
    if group_by is None:
        n_eval = math.ceil(len(ds) * eval_fraction)  # as datasets rounds the held-out share
        if n_eval >= len(ds):
            raise ConfigError(f"{len(ds)} row(s) are too few to hold out eval_fraction={eval_fraction} and train on the "
                              f"rest: give more rows, or set eval_fraction 0")
        parts = ds.train_test_split(test_size=eval_fraction, seed=seed)
        return parts["train"], parts["test"]
    import random

    keys = sorted({group_by(row) for row in ds})
    random.Random(seed).shuffle(keys)
    n_eval = max(1, int(round(len(keys) * eval_fraction)))
    if n_eval >= len(keys):
        raise ConfigError(f"{len(keys)} distinct prompt(s) are too few to hold out eval_fraction={eval_fraction} and "
                          f"train on the rest (rows of one prompt stay on one side): give more rows, or set "
                          f"eval_fraction 0")
    eval_keys = set(keys[:n_eval])
    flags = [group_by(row) in eval_keys for row in ds]
    eval_idx = [i for i, f in enumerate(flags) if f]
    train_idx = [i for i, f in enumerate(flags) if not f]
    return ds.select(train_idx), ds.select(eval_idx)


def prompt_of(row: dict):
    """A row's prompt as given (`prompt`: messages or text), or its `messages` without the trailing assistant turns.
    Whatever it finds is returned as is: `prompt_problem` says whether it is usable."""
    if row.get("prompt") is not None or not isinstance(row.get("messages"), list):
        return row.get("prompt")
    msgs = [dict(m) if isinstance(m, dict) else m for m in row["messages"]]
    while msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        msgs.pop()
    return msgs


def text_problem(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no tokenizer or browser can hold it
        return "a text holds an unpaired surrogate (\\udXXX escape), which is not valid Unicode"
    return None


def prompt_problem(prompt) -> str | None:
    """Why `prompt` cannot be sampled from, or None: it must be a non-empty text, or a non-empty list of
    {"role": text, "content": text} messages, not all of them empty."""
    if isinstance(prompt, str):
        return text_problem(prompt) or (None if prompt.strip() else "the prompt is empty")
    if not isinstance(prompt, list) or not prompt:
        return f"a prompt must be a text or a non-empty list of messages, not {json.dumps(prompt, default=str)[:60]}"
    problem = messages_problem(prompt)
    if problem:
        return problem
    if not any(m["content"].strip() for m in prompt):
        return "every message of the prompt is empty"
    return None


def messages_problem(messages) -> str | None:
    """Why `messages` is not a conversation (a non-empty list of {"role": text, "content": text}), or None."""
    if not isinstance(messages, list) or not messages:
        return f"a conversation must be a non-empty list of messages, not {json.dumps(messages, default=str)[:60]}"
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f'each message must be {{"role": text, "content": text}}, not {json.dumps(m, default=str)[:60]}'
        problem = text_problem(m["role"]) or text_problem(m["content"]) or role_problem(m["role"])
        if problem:
            return problem
    return None


# The roles chat templates know: the three of every template, and those of tool calls (Llama 3.1's ipython).
ROLES = ("system", "user", "assistant", "tool", "ipython", "developer")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def role_problem(role: str) -> str | None:
    """Why a message's role is not one a chat template renders (a ShareGPT-style 'human' rendered as a turn of its own,
    or, with no 'assistant' turn, the row left out as having no reply), or None."""
    if role in ROLES:
        return None
    hint = f": ShareGPT's '{role}' is '{SHAREGPT_ROLES[role]}'" if role in SHAREGPT_ROLES else ""
    return f"role '{role[:40]}' is not one of {', '.join(ROLES)}{hint}"


def score_each_once(items: list, score_many, key=repr) -> list[float]:
    """score_many's score for every item, asking it for each distinct item (by key) once, in first-seen order: a
    prompt's K responses sit in K-1 pairs each, and a score does not depend on the pair."""
    where: dict = {}
    distinct = []
    for item in items:
        if where.setdefault(key(item), len(distinct)) == len(distinct):
            distinct.append(item)
    scores = score_many(distinct)
    return [scores[where[key(item)]] for item in items]
