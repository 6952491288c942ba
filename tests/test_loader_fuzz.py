"""Property: every stage's data loader, fed random JSON Lines files (wrong types, missing keys, empty and huge strings,
lone surrogates, non-UTF-8 bytes, broken lines), either loads or raises one ConfigError: one line naming the file,
never another exception, and nothing written to the run folder. (The label importer has its own: test_label_fuzz.py.)

The loaders are called directly, as each stage calls them before it touches runs/<run>/<stage>/: SFT's rows and their
tokenization, RM's and DPO's preference pairs, PPO's, pairs' and eval's prompts. ~60 files a loader, a few seconds each.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError
from pipeline.run import StageRun

SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None
HUGE = "x" * 100_000
texts = st.text(max_size=12) | st.sampled_from(["", " ", HUGE, "\ud800 lone surrogate", "\x00nul", "é\u2028ü", "much"])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=6)
roles = st.sampled_from(["user", "assistant", "system"])
good_message = st.fixed_dictionaries({"role": roles, "content": texts})
any_message = st.fixed_dictionaries({}, optional={"role": roles | json_values, "content": texts | json_values})
conversations = st.lists(good_message, max_size=4) | st.lists(any_message, max_size=3) | json_values
good_chat = st.builds(lambda q, a: [{"role": "user", "content": "q " + q}, {"role": "assistant", "content": "a " + a}],
                      st.text(max_size=8), st.text(max_size=8))


def rows_of(fields: dict, good_row) -> st.SearchStrategy:
    """Rows with any subset of the loader's fields (each a usable or a random value), or good rows."""
    return good_row | st.fixed_dictionaries({}, optional={**fields, "extra": json_values})


def files_of(rows: st.SearchStrategy, good_row) -> st.SearchStrategy:
    """A file's lines: mostly rows, sometimes any JSON value, raw bytes or a broken line; some files all good."""
    line = (rows.map(json.dumps) | json_values.map(json.dumps) | st.binary(max_size=20)
            | st.sampled_from([b"\xff\xfe not utf-8", b'{"broken": ', b"[1, 2]"]))
    return st.lists(good_row.map(json.dumps), min_size=3, max_size=6) | st.lists(line, max_size=5)


SFT_ROW = st.builds(lambda c: {"messages": c}, good_chat)
SFT_ROWS = rows_of({"messages": conversations, "prompt": json_values, "completion": json_values}, SFT_ROW)
PREF_ROW = st.builds(lambda q, a, b, s: {"prompt": [{"role": "user", "content": "q " + q}],
                                         "chosen": [{"role": "assistant", "content": "good " + a}],
                                         "rejected": [{"role": "assistant", "content": "bad " + b}], "strength": s},
                     st.text(max_size=8), st.text(max_size=8), st.text(max_size=8), st.sampled_from(["much", "slightly", 1]))
PREF_VALUE = conversations | texts
PREF_ROWS = rows_of({"prompt": PREF_VALUE, "chosen": PREF_VALUE, "rejected": PREF_VALUE, "strength": json_values,
                     "is_tie": json_values, "source": json_values, "annotator": json_values}, PREF_ROW)
PROMPT_ROW = st.builds(lambda q: {"prompt": [{"role": "user", "content": "q " + q}]}, st.text(max_size=8)) | \
    st.builds(lambda q: {"prompt": "q " + q}, st.text(max_size=8))
PROMPT_ROWS = rows_of({"prompt": conversations | texts, "messages": conversations}, PROMPT_ROW)


def write(folder: Path, lines: list) -> Path:
    path = folder / "data.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines))
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Every random file would otherwise leave an Arrow cache in ~/.cache/huggingface/datasets."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


def sft_loader(path: Path, tokenizer, stage: StageRun):
    from stages.sft import SFTArgs, load_data, split_and_tokenize

    args = SFTArgs(dataset_name=str(path), eval_fraction=0.05)
    ds, name = load_data(args, 0)
    split_and_tokenize(ds, tokenizer, SimpleNamespace(seed=0, assistant_only_loss=True, max_length=128, truncation_mode="keep_start"), args, name)


def rm_loader(path: Path, tokenizer, stage: StageRun):
    from stages.rm import RMArgs
    from stages.rm_data import prepare_data

    prepare_data(RMArgs(dataset_name=str(path), margin_scale=1.0, eval_fraction=0.2, max_prompt_length=16),
                 SimpleNamespace(seed=0, max_length=64), stage, tokenizer)


def dpo_loader(path: Path, tokenizer, stage: StageRun):
    from stages.dpo import DPOArgs, as_token_ids, preference_args
    from stages.rm_data import prepare_data

    train, held, _, _ = prepare_data(preference_args(DPOArgs(dataset_name=str(path))),
                                     SimpleNamespace(seed=0, max_length=256), stage, tokenizer)
    as_token_ids(train + held)


def ppo_loader(path: Path, tokenizer, stage: StageRun):
    from stages.ppo import PPOConfig, load_prompts

    load_prompts(PPOConfig(dataset_name=str(path), heldout_fraction=0.2, long_prompts="truncate"), tokenizer)


def pairs_loader(path: Path, tokenizer, stage: StageRun):
    from pipeline.generation import encode_prompts
    from stages.pairs import PairsArgs, load_prompts

    prompts, _ = load_prompts(PairsArgs(dataset_name=str(path)))
    encode_prompts(tokenizer, prompts)


def eval_loader(path: Path, tokenizer, stage: StageRun):
    from pipeline.generation import encode_prompts
    from stages.eval import load_prompts

    encode_prompts(tokenizer, load_prompts(path, 0), 64)


LOADERS = {"sft": (sft_loader, SFT_ROWS, SFT_ROW), "rm": (rm_loader, PREF_ROWS, PREF_ROW),
           "dpo": (dpo_loader, PREF_ROWS, PREF_ROW), "ppo": (ppo_loader, PROMPT_ROWS, PROMPT_ROW),
           "pairs": (pairs_loader, PROMPT_ROWS, PROMPT_ROW), "eval": (eval_loader, PROMPT_ROWS, PROMPT_ROW)}


@pytest.mark.parametrize("stage_name", list(LOADERS))
def test_random_jsonl_loads_or_is_one_config_error(stage_name, tokenizer):
    loader, rows, good_row = LOADERS[stage_name]
    outcomes = Counter()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                     HealthCheck.function_scoped_fixture])
    @given(files_of(rows, good_row))
    def check(lines):
        with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
            path = write(Path(tmp), lines)
            stage = StageRun(stage_name, "fuzz", str(Path(tmp) / "runs"))
            stage.dir.mkdir(parents=True)
            (stage.dir / "manifest.json").write_text("{}")  # an earlier run's: must survive bad input untouched
            try:
                loader(path, tokenizer, stage)
                outcomes["loaded"] += 1
            except ConfigError as err:
                assert "\n" not in str(err), str(err)
                outcomes["refused"] += 1
            assert sorted(p.name for p in stage.dir.parent.parent.rglob("*")) == sorted(["fuzz", "manifest.json", stage_name])
            assert (stage.dir / "manifest.json").read_text() == "{}"

    check()
    # both outcomes happen, so the property was tested on both sides
    assert outcomes["loaded"] >= 3 and outcomes["refused"] >= 15, outcomes
