"""pipeline.data's rules by hand: the split by prompt, what counts as a prompt, JSON Lines with a BOM, a bundled
mixture's max_rows."""

from __future__ import annotations

import json

import pytest


def test_a_split_by_prompt_holds_out_round_n_times_fraction_prompts_and_at_least_one():
    """10 prompts (3 rows each) at 0.2: exactly 2 prompts held out, whole; at 0.01 still one; at 0.27 round(2.7) = 3,
    not 2; at 0: no split; at 0.95 all 10: refused."""
    from datasets import Dataset

    from pipeline.config import ConfigError
    from pipeline.data import train_eval_split

    ds = Dataset.from_dict({"prompt": [f"p{i // 3}" for i in range(30)], "i": list(range(30))})
    for fraction, prompts in ((0.2, 2), (0.01, 1), (0.5, 5), (0.27, 3)):
        train, held = train_eval_split(ds, fraction, seed=0, group_by=lambda r: r["prompt"])
        assert len(set(held["prompt"])) == prompts and len(held) == 3 * prompts and len(train) == 30 - 3 * prompts
        assert not set(train["prompt"]) & set(held["prompt"])
    assert train_eval_split(ds, 0, seed=0) == (ds, None)
    with pytest.raises(ConfigError, match="^10 distinct prompt"):  # round(9.5) = 10 prompts: none left to train on
        train_eval_split(ds, 0.95, seed=0, group_by=lambda r: r["prompt"])
    # the run's seed picks the held-out prompts: the same for the same seed, others for others
    held_by_seed = [tuple(sorted(set(train_eval_split(ds, 0.2, seed=s, group_by=lambda r: r["prompt"])[1]["prompt"])))
                    for s in (0, 0, 1, 2, 3)]
    assert held_by_seed[0] == held_by_seed[1] and len(set(held_by_seed)) > 1


def test_a_row_split_that_leaves_no_row_to_train_on_is_one_config_error():
    """Without a key, the held-out share is ceil(rows x fraction), as datasets rounds it: 3 rows at 0.5 hold out 2 and
    train on 1; 3 rows at 0.7, or 1 row at 0.05, would train on none: one ConfigError saying so (not datasets'
    ValueError from inside train_test_split)."""
    import pytest
    from datasets import Dataset

    from pipeline.config import ConfigError
    from pipeline.data import train_eval_split

    ds = Dataset.from_dict({"text": ["a", "b", "c"]})
    train, held = train_eval_split(ds, 0.5, seed=0)
    assert (len(train), len(held)) == (1, 2) and sorted([*train["text"], *held["text"]]) == ["a", "b", "c"]
    for n, fraction in ((3, 0.7), (1, 0.05)):
        with pytest.raises(ConfigError, match=rf"^{n} row\(s\) are too few to hold out eval_fraction={fraction} and train"):
            train_eval_split(ds.select(range(n)), fraction, seed=0)


def test_what_counts_as_a_prompt():
    """A conversation's prompt is its messages without every trailing assistant turn; a prompt is usable when at
    least one of its messages has text (an empty system message beside a question is fine)."""
    from pipeline.data import prompt_of, prompt_problem

    user = {"role": "user", "content": "Tell me a story."}
    row = {"messages": [user, {"role": "assistant", "content": "Once"}, {"role": "assistant", "content": "upon"}]}
    assert prompt_of(row) == [user] and prompt_of({"prompt": "Hi", "messages": row["messages"]}) == "Hi"
    assert prompt_problem([{"role": "system", "content": ""}, user]) is None
    assert prompt_problem([{"role": "system", "content": " "}, {"role": "user", "content": ""}]) == \
        "every message of the prompt is empty"


def test_a_message_whose_content_is_not_text_is_a_problem():
    """content null (some exports) or a list of parts (OpenAI's multimodal shape): one problem line, not a crash."""
    from pipeline.data import messages_problem, prompt_problem

    for content, shown in ((None, "null}"), ([{"type": "text", "text": "hi"}], '[{"type": "text"')):
        message = [{"role": "user", "content": content}]
        expected = f'each message must be {{"role": text, "content": text}}, not {{"role": "user", "content": {shown}'
        assert messages_problem(message).startswith(expected) and prompt_problem(message).startswith(expected), \
            messages_problem(message)


def test_the_split_by_prompt_is_the_same_in_every_process():
    """Each rank of a launch, and a resumed run, is another Python process, whose set order of strings differs
    (PYTHONHASHSEED): the held-out prompts must not. 20 one-prompt conversations at 0.25, seed 42, in two processes
    with other hash seeds."""
    import os
    import subprocess
    import sys

    script = ("from datasets import Dataset\n"
              "from pipeline.data import conversation_root, train_eval_split\n"
              "rows = [{'messages': [{'role': 'user', 'content': f'Question {i}?'}, {'role': 'assistant', 'content': 'A.'}]}"
              " for i in range(20)]\n"
              "_, held = train_eval_split(Dataset.from_list(rows), 0.25, 42, group_by=conversation_root)\n"
              "print(sorted(r['messages'][0]['content'] for r in held))\n")
    outs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2", "3")]
    assert all(o.returncode == 0 for o in outs), outs[0].stderr[-2000:]
    assert len({o.stdout for o in outs}) == 1 and outs[0].stdout.count("Question") == 5, [o.stdout for o in outs]


def test_a_lone_surrogate_in_a_messages_content_is_a_problem():
    """A lone surrogate in a message's content (not only in its role, nor only in a text prompt) is named: no
    tokenizer can encode it."""
    from pipeline.data import messages_problem, prompt_problem

    surrogate = "a text holds an unpaired surrogate (\\udXXX escape), which is not valid Unicode"
    assert messages_problem([{"role": "user", "content": "Hi \ud800"}]) == surrogate
    assert prompt_problem([{"role": "user", "content": "\ud800"}]) == surrogate
    assert messages_problem([{"role": "user", "content": "Hi"}]) is None


def test_a_folder_without_data_files_says_so(tmp_path):
    """A folder with no data file says so, not "has files of the splits ['train'], none of 'train'" (the Hub's rules
    find no split in it and name the default one)."""
    from pipeline.config import ConfigError
    from pipeline.data import load_any

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("rows elsewhere")
    with pytest.raises(ConfigError, match=r"docs holds no \.jsonl/\.json/\.parquet/\.csv files and no saved dataset$"):
        load_any(str(tmp_path / "docs"))


def test_a_jsonl_file_saved_with_a_byte_order_mark_reads(tmp_path):
    from pipeline.data import read_jsonl

    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"prompt": "a"}\n{"prompt": "b"}\n')
    assert read_jsonl(path) == [(1, {"prompt": "a"}), (2, {"prompt": "b"})]


def test_blank_lines_of_a_jsonl_file_are_skipped_and_still_counted(tmp_path):
    """Blank lines (CRLF, spaces, a trailing one) hold no row; an error further on still names its line as an editor
    numbers it."""
    import pytest

    from pipeline.config import ConfigError
    from pipeline.data import read_jsonl

    path = tmp_path / "gaps.jsonl"
    path.write_bytes(b'{"prompt": "a"}\r\n\r\n   \n{"prompt": "b"}\n\n')
    assert read_jsonl(path) == [(1, {"prompt": "a"}), (4, {"prompt": "b"})]
    path.write_bytes(b'{"prompt": "a"}\n\n{"prompt": \n')
    with pytest.raises(ConfigError, match=r"gaps\.jsonl line 3 is not valid JSON"):
        read_jsonl(path)


def test_a_mixture_source_keeps_max_rows_rows(tmp_path):
    """max_rows 4 of 10 keeps 4 distinct rows of that source, and the concatenation is shuffled with the seed; max_rows
    5 of a source of 3 rows keeps its 3."""
    from pipeline.data import load_mixture

    for name, n in (("a", 10), ("b", 3)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name}{i}"}) + "\n" for i in range(n)))
    mixed = load_mixture([{"path": str(tmp_path / "a.jsonl"), "max_rows": 4}, {"path": str(tmp_path / "b.jsonl")}], 0)
    texts = mixed["text"]
    assert len(texts) == 7 and sum(t.startswith("a") for t in texts) == 4 and len(set(texts)) == 7
    assert [t[0] for t in texts] != ["a"] * 4 + ["b"] * 3  # shuffled after concatenation: the sources interleave
    short = load_mixture([{"path": str(tmp_path / "b.jsonl"), "max_rows": 5}], 0)  # more than it has: all 3 rows
    assert sorted(short["text"]) == ["b0", "b1", "b2"]
    every = load_mixture([{"path": str(tmp_path / "b.jsonl"), "max_rows": 0}], 0)  # 0: all its rows, not none
    assert sorted(every["text"]) == ["b0", "b1", "b2"]


def test_max_rows_is_a_sample_drawn_with_the_seed(tmp_path):
    """max_rows 4 of 20 keeps the first 4 rows of the source shuffled with the seed (datasets' own shuffle), not the
    file's first 4 rows (a file sorted by topic or source would give one topic): another seed draws other rows."""
    from pipeline.data import load_any, load_mixture

    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(20)))
    drawn = {}
    for seed in (0, 1):
        mixed = load_mixture([{"path": str(path), "max_rows": 4}], seed)
        assert sorted(mixed["text"]) == sorted(load_any(str(path)).shuffle(seed=seed)["text"][:4])
        drawn[seed] = set(mixed["text"])
    assert drawn[0] != drawn[1] and {f"a{i}" for i in range(4)} not in drawn.values()


def test_score_each_distinct_item_once_spreads_the_scores_back_in_order():
    from pipeline.data import score_each_once

    asked = []

    def score_many(items):
        asked.append(list(items))
        return [float(len(item[1]) * 10 + i) for i, item in enumerate(items)]  # the i-th distinct item's own score

    items = [("p", "ab"), ("q", "c"), ("p", "ab"), ("p", "xyz"), ("q", "c")]
    scores = score_each_once(items, score_many, key=json.dumps)
    assert asked == [[("p", "ab"), ("q", "c"), ("p", "xyz")]]  # each distinct item once, first-seen order
    assert scores == [20.0, 11.0, 20.0, 32.0, 11.0]
    assert score_each_once([], lambda items: [], key=tuple) == []


def test_a_dataset_folder_reads_its_train_split_by_the_hubs_file_names(tmp_path):
    """A downloaded dataset folder (data/train.jsonl and data/test.jsonl) was read whole: its test rows trained. Now
    the split comes from the file names as on the Hub; a folder whose names say no split is one train split."""
    import datasets

    from pipeline.config import ConfigError
    from pipeline.data import load_any

    def write(path, xs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"x": x}) + "\n" for x in xs))

    write(tmp_path / "hub" / "data" / "train.jsonl", [1, 2])
    write(tmp_path / "hub" / "data" / "test.jsonl", [3])
    assert sorted(load_any(str(tmp_path / "hub"))["x"]) == [1, 2]
    write(tmp_path / "plain" / "one.jsonl", [4])
    write(tmp_path / "plain" / "two.jsonl", [5])
    assert sorted(load_any(str(tmp_path / "plain"))["x"]) == [4, 5]
    write(tmp_path / "only_test" / "test.jsonl", [6])
    with pytest.raises(ConfigError, match=r"has files of the splits \['test'\], none of 'train': name its files by "):
        load_any(str(tmp_path / "only_test"))
    assert load_any(str(tmp_path / "only_test"), "test")["x"] == [6] and load_any(str(tmp_path / "hub"), "test")["x"] == [3]
    with pytest.raises(ConfigError, match=r"is one split: --dataset_split test picks a split of a folder or a Hub id"):
        load_any(str(tmp_path / "plain" / "one.jsonl"), "test")
    # a folder of one saved Dataset is one split too (--dataset_split test read its rows as if they were the test split)
    datasets.Dataset.from_dict({"x": [9]}).save_to_disk(str(tmp_path / "saved"))
    assert load_any(str(tmp_path / "saved"))["x"] == [9]
    with pytest.raises(ConfigError, match=rf"^dataset folder {tmp_path / 'saved'} holds one saved Dataset, one split: "
                                          rf"drop --dataset_split test \(it picks a split of a saved DatasetDict"):
        load_any(str(tmp_path / "saved"), "test")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"x": [10]})}).save_to_disk(str(tmp_path / "saved_dict"))
    assert load_any(str(tmp_path / "saved_dict"), "test")["x"] == [10]
    # a download of a dataset with splits the Hub's rules do not name (ultrafeedback_binarized: train_prefs,
    # train_sft, ...): `train` read all three as one; no train split is the missing split's error, a named one is read
    for name, xs in (("train_prefs", [11]), ("train_sft", [12]), ("train_gen", [13])):
        write(tmp_path / "many" / "data" / f"{name}-00000-of-00001.jsonl", xs)
    with pytest.raises(ConfigError, match=r"none of 'train': name its files by split"):
        load_any(str(tmp_path / "many"))
    assert load_any(str(tmp_path / "many"), "train_sft")["x"] == [12]
    from datasets.data_files import SPLIT_KEYWORDS

    from pipeline.data import HUB_SPLIT_NAMES
    assert HUB_SPLIT_NAMES == {name for names in SPLIT_KEYWORDS.values() for name in names}  # datasets' own list
    write(tmp_path / "mixed" / "a.jsonl", [7])
    (tmp_path / "mixed" / "b.csv").write_text("x\n8\n")
    with pytest.raises(ConfigError, match="mixes csv and json files in its 'train' split: keep one format"):
        load_any(str(tmp_path / "mixed"))


def test_dataset_split_reaches_sft_reward_model_and_dpo_data(tmp_path):
    """--dataset_split picks the split SFT, the reward models and DPO read (a Hub id's train_sft or train_prefs, or
    a folder's by its files' names): every stage read 'train' whatever the dataset called its splits."""
    from stages.dpo import DPOArgs, preference_args
    from stages.rm import RMArgs
    from stages.rm_data import load_pairs
    from stages.sft import SFTArgs, load_data

    chats = tmp_path / "chats"
    chats.mkdir()
    for split, reply in (("train_sft", "From train_sft."), ("test_sft", "From test_sft.")):
        (chats / f"{split}.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                                                       {"role": "assistant", "content": reply}]}) + "\n")
    ds, _ = load_data(SFTArgs(dataset_name=str(chats), dataset_split="test_sft"), 0)
    assert ds[0]["messages"][1]["content"] == "From test_sft."
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    for split in ("train_prefs", "test_prefs"):
        (prefs / f"{split}.jsonl").write_text(json.dumps({"prompt": "Hi?", "chosen": f"{split} yes",
                                                          "rejected": f"{split} no"}) + "\n")
    pairs, _, _, _ = load_pairs(RMArgs(dataset_name=str(prefs), dataset_split="test_prefs"), None, 0)
    assert [p["chosen"] for p in pairs] == [[{"role": "assistant", "content": "test_prefs yes"}]]  # as a conversation
    assert preference_args(DPOArgs(dataset_name=str(prefs), dataset_split="test_prefs")).dataset_split == "test_prefs"


def test_dataset_split_reaches_the_prompts_of_pairs_and_ppo(tmp_path, tiny_models):
    """`make pairs` and `make ppo` read a split of their --dataset_name too (prompts_file is always one file)."""
    from pipeline.config import ConfigError
    from pipeline.data import load_rows
    from stages.pairs import PairsArgs, load_prompts

    folder = tmp_path / "prompts"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"prompt": f"A {split} prompt."}) + "\n")
    prompts, _ = load_prompts(PairsArgs(dataset_name=str(folder), dataset_split="test"))
    assert prompts == [[{"role": "user", "content": "A test prompt."}]]
    rows, _ = load_rows(str(folder), "test")
    assert rows == [{"prompt": "A test prompt."}]
    with pytest.raises(ConfigError, match="is one split: --dataset_split test picks a split"):
        load_rows(str(folder / "train.jsonl"), "test")
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import load_prompts as ppo_prompts
    from stages.ppo.config import PPOConfig

    tokenizer = load_tokenizer(profile_from(str(tiny_models["llama"])))
    train, _, heldout, _ = ppo_prompts(PPOConfig(dataset_name=str(folder), dataset_split="test", heldout_fraction=0.0),
                                       tokenizer)
    assert train + heldout == [[{"role": "user", "content": "A test prompt."}]]


def test_a_blank_file_a_splits_name_and_a_bad_bytes_column(tmp_path):
    """A data file of blank lines is empty (not datasets' 'Instruction "train" corresponds to no data!'); a folder's
    split `gen` is gen.jsonl, not general.jsonl too; a byte that is not UTF-8 is named by its column from 1."""
    from pipeline.config import ConfigError
    from pipeline.data import load_any, read_jsonl, split_files

    for name in ("blank.jsonl", "blank.json"):
        (tmp_path / name).write_text("  \n\n")
        with pytest.raises(ConfigError, match="is empty: give a dataset with at least a few rows"):
            load_any(str(tmp_path / name))
    folder = tmp_path / "splits"
    folder.mkdir()
    for name in ("gen.jsonl", "general.jsonl"):
        (folder / name).write_text('{"a": 1}\n')
    assert split_files(folder, "gen") == [folder / "gen.jsonl"]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"a": 1}\n{"p": "\xff"}\n')
    with pytest.raises(ConfigError, match=r"line 2 is not UTF-8 text \(bad byte at column 8\)"):
        read_jsonl(bad)


def test_a_missing_split_and_an_offline_hub_id_say_the_fix(tmp_path):
    """A saved DatasetDict without the split asked for names --dataset_split; a Hub id with no Hub access (this
    machine has none) says how to download it elsewhere and give the folder, not datasets' message alone; under
    make's HF_HUB_OFFLINE=1 it names that switch first."""
    import subprocess
    import sys

    from datasets import Dataset, DatasetDict

    from pipeline.config import ConfigError
    from pipeline.data import load_any
    from tests.conftest import REPO

    DatasetDict({"validation": Dataset.from_list([{"a": 1}])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match=r"has splits \['validation'\], not 'train': pick one with --dataset_split"):
        load_any(str(tmp_path / "dd"))
    code = ("from pipeline.data import load_any\ntry:\n    load_any('someone/no-such-data')\n"
            "except Exception as err:\n    print(type(err).__name__, err)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**env, "HF_DATASETS_OFFLINE": "1"})
    assert res.stdout.startswith("ConfigError could not load dataset 'someone/no-such-data'"), res.stdout + res.stderr
    assert "no Hub access here (offline, or no network): download it where there is (`hf download " \
           "someone/no-such-data --repo-type dataset --local-dir DIR`) and give DIR" in res.stdout
    # under make (HF_HUB_OFFLINE=1) the network may be there: the fix is make's switch first
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert res.stdout.startswith("ConfigError could not load dataset 'someone/no-such-data'"), res.stdout + res.stderr
    assert "the Hub is switched off (HF_HUB_OFFLINE=1, make's default): add HF_HUB_OFFLINE=0 to the make command " \
           "to download it, or download it yourself (`hf download someone/no-such-data --repo-type dataset " \
           "--local-dir DIR`) and give DIR" in res.stdout


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_byte_that_is_not_utf8_is_placed_by_line_and_column(suffix, tmp_path):
    """A .csv or .json file's bad byte was named by its byte offset into the file (useless in a large file): now by
    line and column from 1, the column in characters (the two-byte letters before it count one each), as an editor
    shows it. The users file of the labeling UI does the same after a byte-order mark, which is not a column."""
    from pipeline.config import ConfigError
    from pipeline.data import load_any
    from stages.label.config import load_users

    path = tmp_path / f"prefs{suffix}"
    path.write_bytes('prompt,chosen\n"café",yes\n"naïve '.encode() + b"\xe9" + b'",no\n')
    with pytest.raises(ConfigError, match=rf"{path} is not UTF-8 text \(bad byte at line 3, column 8\)"):
        load_any(str(path))
    users = tmp_path / "users.txt"
    users.write_bytes(b"\xef\xbb\xbfal\xe9x:pw\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(line 1, column 3\)"):
        load_users(str(users), env={})


def test_a_csv_row_with_more_or_fewer_fields_than_its_header_is_refused_by_line(tmp_path):
    """Texts holding unquoted commas: pandas read a CSV whose every row has one field more than its header with the
    first column as the index, so `prompt` held the first part of the reply and the real prompt was dropped, and SFT
    trained on it without a word. Quoted commas, a byte-order mark and blank lines read as before."""
    from pipeline.config import ConfigError
    from pipeline.data import load_any

    bad = tmp_path / "chats.csv"
    bad.write_text("prompt,completion\nSay hi.,Hi, friend.\nSay bye.,Bye, friend.\n")
    with pytest.raises(ConfigError, match=rf"^{bad} line 2: 3 fields, but the header \(prompt,completion\) has 2: put "
                                          r"a text that holds a comma in double quotes"):
        load_any(str(bad))
    bad.write_text('prompt,completion\n"Say hi.","Hi, friend."\n\n"Say\nbye.",Bye\n"Al\none",\n"x\ny"\n')  # row 4
    with pytest.raises(ConfigError, match=rf"^{bad} line 8: 1 fields, but the header"):  # starts on line 8
        load_any(str(bad))
    good = tmp_path / "good.csv"
    good.write_text('\ufeffprompt,completion\n"Say hi.","Hi, friend."\n\n"Say\nbye.","Bye, friend."\n')
    assert load_any(str(good)).to_list() == [{"prompt": "Say hi.", "completion": "Hi, friend."},
                                             {"prompt": "Say\nbye.", "completion": "Bye, friend."}]


@pytest.mark.parametrize("name,text", [("header.csv", "prompt,completion\n"), ("header.csv", "prompt,completion\n\n\n"),
                                       ("rows.json", "[]\n"), ("rows.json", "{}")])
def test_a_file_without_rows_is_empty_not_a_library_error(name, text, tmp_path):
    """A CSV of a header alone, or a JSON file holding no rows, got datasets' 'Instruction "train" corresponds to no
    data!' where an empty .jsonl gets the project's line."""
    from pipeline.config import ConfigError
    from pipeline.data import load_any

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^dataset {path} is empty: give a dataset with at least a few rows"):
        load_any(str(path))


def test_a_json_file_datasets_cannot_parse_says_why(tmp_path):
    """A .json file in JSON Lines form with a broken line: datasets raised DatasetGenerationError("An error occurred
    while generating the dataset"), the parser's reason ("... in row 2") only in its cause, which the error dropped.
    Mutant: the cause not shown."""
    from pipeline.config import ConfigError
    from pipeline.data import load_any

    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}\n{"a": 2}\n{"a": 3\n{"a": 4}\n')
    with pytest.raises(ConfigError, match=rf"^could not load dataset '{bad}': DatasetGenerationError: An error occurred "
                                          r"while generating the dataset; ArrowInvalid: JSON parse error: .* in row 2$"):
        load_any(str(bad))
