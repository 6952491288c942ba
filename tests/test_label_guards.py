"""Bad input on the label path, and the store's own limits: each refusal is one ConfigError (one `error:` line, exit 2)
that names the file or flag, and leaves every file as it was.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunArgs, parse
from pipeline.launch import free_port
from pipeline.run import StageRun
from stages.label.config import LabelArgs, db_path
from stages.label.store import LabelStore, NoteTooLong, count_labels, lock_store
from tests.conftest import PYTHON, REPO


def pair(i: int, **over) -> dict:
    return {"pair_id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}],
            "responses": [f"zero {i}", f"one {i}"], **over}


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def snapshot(root: Path) -> dict:
    """Every file under root with its bytes and mtime: 'nothing written' made checkable."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def label_main(runs: Path, *extra: str, run: str = "r"):
    from stages.label.__main__ import main

    return main(*parse((LabelArgs, RunArgs), ["--config", "configs/label.yaml", "--run", run, "--runs_dir", str(runs),
                                              *extra]), block=False)


@pytest.fixture
def runs(tmp_path):
    """A run whose label store already holds one label (so 'nothing written' means something)."""
    runs = tmp_path / "runs"
    store = LabelStore(db_path(str(runs), "r"))
    store.import_items([pair(0), pair(1)])
    store.save_label("ann", "p0", "left", 0)
    return runs


# ---------------------------------------------------------------------------------------------- the pairs file
BAD_PAIRS = {  # name -> (lines of the file, words the error must contain)
    "string prompt": ([pair(0, prompt="just a string")], ["line 1", "prompt must be a non-empty list of messages"]),
    "empty prompt": ([pair(0), pair(1, prompt=[])], ["line 2", "prompt must be a non-empty list of messages"]),
    "three responses": ([pair(0), pair(1, responses=["a", "b", "c"])], ["line 2", "exactly 2 texts"]),
    "duplicate pair_id": ([pair(0), pair(1), pair(0)], ["line 3", "'p0' was already used on line 1"]),
    "broken line": ([pair(0), '{"pair_id": "p1", "prompt": [', pair(2)], ["line 2 is not valid JSON (Expecting value, column 30)"]),
    "missing key": ([{"pair_id": "p0", "prompt": [{"role": "user", "content": "q"}]}],
                    ["line 1", "missing key(s) ['responses']"]),
    # a role the reward model would refuse in the export: refused here, before anyone labels
    "sharegpt role": ([{"pair_id": "p0", "prompt": [{"role": "human", "content": "q"}], "responses": ["a", "b"]}],
                      ["line 1", "role 'human' is not one of", "ShareGPT's 'human' is 'user'"]),
    "number pair_id": ([pair(0, pair_id=7)], ["line 1", "pair_id must be a non-empty string"]),
    "message without content": ([pair(0, prompt=[{"role": "user"}])], ["line 1", "each prompt message"]),
    "not an object": (["[1, 2]"], ["line 1", "must be a JSON object"]),
    "blank pair_id": ([pair(0, pair_id="  ")], ["line 1", "pair_id must be a non-empty string, got \"  \""]),
    "empty file": ([], ["holds no pairs"]),
}


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_a_bad_pairs_file_is_refused_by_line_and_writes_nothing(runs, tmp_path, case):
    lines, words = BAD_PAIRS[case]
    bad = write_lines(tmp_path / "pairs.jsonl", lines)
    before = snapshot(runs)
    with pytest.raises(ConfigError) as err:
        label_main(runs, "--pairs_dataset", str(bad))
    for w in ["--pairs_dataset", str(bad), *words]:
        assert w in str(err.value), (w, str(err.value))
    assert snapshot(runs) == before


def test_a_bad_row_of_a_dataset_folder_or_parquet_file_is_named_by_its_row_from_1(runs, tmp_path):
    """Pairs that are not .jsonl (the pairs stage's save_to_disk folder, a .parquet file) have rows, not lines:
    the error counts them from 1, as the .jsonl error counts lines."""
    import datasets

    folder = tmp_path / "pairs_folder"
    datasets.Dataset.from_list([pair(0), pair(1), pair(0)]).save_to_disk(str(folder))
    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list([pair(0), pair(1, responses=["a", "b", "c"])]).to_parquet(str(parquet))
    before = snapshot(runs)
    with pytest.raises(ConfigError, match=r"row 3: pair_id 'p0' was already used on row 1"):
        label_main(runs, "--pairs_dataset", str(folder))
    with pytest.raises(ConfigError, match=r"pairs.parquet row 2: .*exactly 2 texts"):
        label_main(runs, "--pairs_dataset", str(parquet))
    jsonl_folder = tmp_path / "jsonl_folder"  # a folder of .jsonl files: a bad one's error said nothing of the flag
    jsonl_folder.mkdir()
    (jsonl_folder / "part.jsonl").write_text(json.dumps(pair(0)) + "\n{not json\n")
    with pytest.raises(ConfigError) as err:
        label_main(runs, "--pairs_dataset", str(jsonl_folder))
    assert str(err.value).startswith("--pairs_dataset: ") and "part.jsonl" in str(err.value)
    assert snapshot(runs) == before


def test_a_pairs_folder_without_a_train_split_names_no_flag_the_label_stage_lacks(runs, tmp_path):
    """The labeling UI reads a folder's train split and has no --dataset_split: the fix was to pick a split with it."""
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([pair(0)])}).save_to_disk(str(saved))
    files = tmp_path / "files"
    files.mkdir()
    (files / "test.jsonl").write_text(json.dumps(pair(0)) + "\n")
    before = snapshot(runs)
    for folder, where in ((saved, "has splits ['test'], not 'train'"), (files, "none of 'train'")):
        with pytest.raises(ConfigError) as err:
            label_main(runs, "--pairs_dataset", str(folder))
        assert where in str(err.value) and "--dataset_split" not in str(err.value)
        assert "name the split 'train' (--pairs_dataset reads that split only)" in str(err.value)
    assert snapshot(runs) == before


def test_non_utf8_and_missing_pairs_files_name_the_line_and_the_flag(runs, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes((json.dumps(pair(0)) + "\n").encode() + json.dumps(pair(1, responses=["caf\u00e9", "x"]),
                                                                      ensure_ascii=False).encode("latin-1") + b"\n")
    before = snapshot(runs)
    with pytest.raises(ConfigError, match=r"--pairs_dataset: .*latin1.jsonl line 2 is not UTF-8 text"):
        label_main(runs, "--pairs_dataset", str(bad))
    with pytest.raises(ConfigError, match=r"--pairs_dataset: .*nowhere.jsonl does not exist") as err:
        label_main(runs, "--pairs_dataset", str(tmp_path / "nowhere.jsonl"))
    assert "--dataset_name" not in str(err.value)
    assert snapshot(runs) == before


def test_read_pairs_keeps_each_pair_as_the_app_serves_it(tmp_path):
    """read_pairs keeps pair_id, the two responses and each prompt message's role and content: the other keys of a row
    or of a message (a name, a score) are left behind, not stored with the pair."""
    from stages.label.pairs import read_pairs

    row = pair(0, prompt=[{"role": "user", "content": "question 0", "name": "bob"}], score=0.5)
    assert read_pairs(str(write_lines(tmp_path / "p.jsonl", [row])), "--pairs_dataset") == [
        {"pair_id": "p0", "responses": ["zero 0", "one 0"], "prompt": [{"role": "user", "content": "question 0"}]}]


def test_pairs_annotators_would_label_in_vain_are_refused_or_named_before_anyone_labels(runs, tmp_path, capsys):
    """Your own pairs (--pairs_dataset) were served whatever they held: a prompt of empty messages (the pairs and PPO
    stages refuse it) is refused by its line; two equal responses, an empty one, or a pair repeated under another
    pair_id are served (eval's SFT-vs-PPO pairs may hold equal replies: a tie) with a note naming each line."""
    from stages.label.pairs import read_pairs

    before = snapshot(runs)
    empty_prompt = write_lines(tmp_path / "e.jsonl", [pair(0), pair(1, prompt=[{"role": "system", "content": "  "},
                                                                             {"role": "user", "content": ""}])])
    with pytest.raises(ConfigError, match=r"e.jsonl line 2: every message of the prompt is empty"):
        label_main(runs, "--pairs_dataset", str(empty_prompt))
    assert snapshot(runs) == before
    mine = write_lines(tmp_path / "m.jsonl", [pair(0), pair(1, responses=["same", "same"]), pair(2, responses=["x", " "]),
                                              {**pair(0), "pair_id": "again"}, {**pair(0, responses=["one 0", "zero 0"]),
                                                                                "pair_id": "swapped"},
                                              # an empty system message before a real question; p0's replies to
                                              # another question: neither refused nor noted
                                              pair(3, prompt=[{"role": "system", "content": ""},
                                                              {"role": "user", "content": "question 3"}]),
                                              pair(4, responses=["zero 0", "one 0"])])
    assert [p["pair_id"] for p in read_pairs(str(mine), "--pairs_dataset")] == ["p0", "p1", "p2", "again", "swapped",
                                                                                 "p3", "p4"]
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: --pairs_dataset")]
    assert [n.split("m.jsonl ", 1)[1] for n in notes] == [
        "line 2 (pair_id 'p1'): its two responses are the same text: the reward model leaves its label out",
        "line 3 (pair_id 'p2'): a response is empty: the reward model leaves its label out",
        "line 4 (pair_id 'again') repeats line 1 (pair_id 'p0')'s prompt and responses: labels of both count twice",
        "line 5 (pair_id 'swapped') repeats line 1 (pair_id 'p0')'s prompt and responses: labels of both count twice"]


def test_the_store_itself_refuses_bad_rows_before_writing(tmp_path):
    store = LabelStore(tmp_path / "s.sqlite")
    store.import_items([pair(0), pair(1)])
    for rows in ([pair(2), pair(3), pair(2)], [pair(2), pair(3, responses=["a", "b", "c"])],
                 [pair(2, responses=["\ud800", "b"])]):  # a lone surrogate: SQLite cannot store it as text
        with pytest.raises(ValueError):
            store.import_items(rows)
        assert store.progress()["pairs"] == 2  # the earlier pairs are still the active ones: nothing half-imported


# ---------------------------------------------------------------------------------------------- the store file
def test_a_garbage_or_empty_store_is_refused_and_left_as_it_is(tmp_path):
    pairs = write_lines(tmp_path / "pairs.jsonl", [pair(0)])
    runs = tmp_path / "runs"
    db = db_path(str(runs), "r")
    db.parent.mkdir(parents=True)
    garbage = random.Random(0).randbytes(3000)
    for content, words in ((garbage, "is not an SQLite database"), (b"", r"is empty \(0 bytes\)")):
        db.write_bytes(content)
        before = snapshot(runs)
        with pytest.raises(ConfigError, match=words):
            label_main(runs, "--pairs_dataset", str(pairs))
        with pytest.raises(ConfigError, match=words):
            LabelStore(db)
        with pytest.raises(ConfigError, match=words):
            count_labels(db)
        assert snapshot(runs) == before  # not even a lock file or a WAL next to it

    good = LabelStore(tmp_path / "good.sqlite")  # a valid header over damaged pages: also one clear error
    good.import_items([pair(i) for i in range(200)])
    raw = bytearray((tmp_path / "good.sqlite").read_bytes())
    raw[4096:12288] = random.Random(1).randbytes(8192)
    (tmp_path / "good.sqlite").write_bytes(bytes(raw))
    for f in tmp_path.glob("good.sqlite-*"):
        f.unlink()
    with pytest.raises(ConfigError, match="is damaged"):
        LabelStore(tmp_path / "good.sqlite")


def test_cli_refusal_is_one_error_line_and_exit_2(runs, tmp_path):
    bad = write_lines(tmp_path / "pairs.jsonl", [pair(0), "{oops"])
    before = snapshot(runs)
    proc = subprocess.run([PYTHON, "-m", "stages.label", "--config", "configs/label.yaml", "--run", "r", "--runs_dir",
                           str(runs), "--pairs_dataset", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --pairs_dataset: {bad} line 2 is not valid JSON "
                                                f"(Expecting property name enclosed in double quotes, column 2): "
                                                f"fix or remove that line"]
    assert snapshot(runs) == before


# ---------------------------------------------------------------------------------------------- one app per store
def test_a_second_app_on_a_served_store_stops_before_writing(runs, tmp_path):
    db = db_path(str(runs), "r")
    other_pairs = write_lines(tmp_path / "other.jsonl", [pair(7)])
    held = lock_store(db)  # as a running `make label` holds it
    try:
        before = snapshot(runs)
        with pytest.raises(ConfigError, match=rf"another labeling app \(pid {os.getpid()}\) is serving .*labels.sqlite"):
            label_main(runs, "--pairs_dataset", str(other_pairs), "--port", str(free_port()))
        assert snapshot(runs) == before
        assert LabelStore(db).progress()["pairs"] == 2  # the live app's pairs, not the other file's
    finally:
        held.close()
    lock_store(db).close()  # released with its holder


@pytest.mark.parametrize("flag,value,message", [
    ("--port", "70000", r"--port on the command line is 70000: it must be in \[1, 65536\)"), ("--port", "0", r"--port on the command line is 0:"),
    ("--lease_timeout_s", "0", "--lease_timeout_s on the command line is 0.0: it must be > 0"),
    ("--concurrency_limit", "0", "--concurrency_limit on the command line is 0: it must be >= 1")])
def test_settings_the_app_cannot_serve_with_are_refused_by_flag(tmp_path, flag, value, message):
    """A lease of 0 s would hand an open pair to a second annotator at once (two labels at overlap 1); a concurrency
    limit of 0 runs no click; a port past 65535 crashed in bind()."""
    pairs = write_lines(tmp_path / "pairs.jsonl", [pair(0)])
    with pytest.raises(ConfigError, match=message):
        label_main(tmp_path / "runs", "--pairs_dataset", str(pairs), flag, value)
    assert not (tmp_path / "runs").exists()


def test_a_taken_port_is_refused_before_the_run_folder_is_touched(tmp_path):
    pairs = write_lines(tmp_path / "pairs.jsonl", [pair(0)])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match=rf"cannot serve on 127.0.0.1:{busy.getsockname()[1]}.*--port N"):
            label_main(tmp_path / "runs", "--pairs_dataset", str(pairs), "--port", str(busy.getsockname()[1]))
    assert not (tmp_path / "runs").exists()


def test_a_host_that_is_not_this_machines_is_refused_by_its_flag_not_the_port(tmp_path):
    """`--host 192.0.2.1` (an address of no machine of this one's) said "another program uses it; pick another port
    with --port N": the fix names --host, and nothing is written."""
    pairs = write_lines(tmp_path / "pairs.jsonl", [pair(0)])
    users = tmp_path / "users.txt"
    users.write_text("ann:pw\n")
    with pytest.raises(ConfigError, match=r"cannot serve on 192.0.2.1:7860 .*--host 192.0.2.1 is not an address of this "
                                          r"machine") as err:
        label_main(tmp_path / "runs", "--pairs_dataset", str(pairs), "--host", "192.0.2.1", "--users_file", str(users))
    assert "--port" not in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_a_free_port_on_the_ipv6_loopback_is_free():
    """`--host ::1`: the port check binds a socket of the host's own family (getaddrinfo's), not IPv4's, which cannot
    bind ::1 and called this machine's own loopback "not an address of this machine"; an IPv4 host still binds."""
    from stages.label.config import check_port_free

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    check_port_free("::1", port)
    check_port_free("127.0.0.1", free_port())


def test_a_port_this_user_may_not_open_says_why(monkeypatch):
    """A refused bind (EACCES) said "ports below 1024 need root" for any port: a firewall or SELinux refuses others."""
    import errno

    from stages.label.config import check_port_free

    def refuse(self, address):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", refuse)
    for port, fix in ((80, "ports below 1024 need root; pick"), (8000, "this user may not open it; pick another")):
        with pytest.raises(ConfigError) as err:
            check_port_free("127.0.0.1", port)
        assert str(err.value) == (f"cannot serve on 127.0.0.1:{port} (Permission denied): {fix} --port 1024 or above "
                                  f"(7860 by default)")


@pytest.mark.slow
def test_second_make_label_on_a_live_run_leaves_the_live_app_alone(tmp_path):
    """End to end: a real server on 9 pairs; `make label` again on the same run (same port, then another port) with
    another pairs file exits 2 with one line, and the live app still serves its 9 pairs and its note limit."""
    runs, port = tmp_path / "runs", free_port()
    nine = write_lines(tmp_path / "nine.jsonl", [pair(i) for i in range(9)])
    three = write_lines(tmp_path / "three.jsonl", [pair(i + 100) for i in range(3)])
    cmd = [PYTHON, "-m", "stages.label", "--config", "configs/label.yaml", "--run", "r", "--runs_dir", str(runs)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(cmd + ["--pairs_dataset", str(nine), "--port", str(port), "--max_note_chars", "5"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None and time.time() < deadline, "the first app did not come up"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        db = db_path(str(runs), "r")
        before = {p.name: p.read_bytes() for p in db.parent.iterdir() if p.is_file()}
        for second_port in (port, free_port()):
            proc = subprocess.run(cmd + ["--pairs_dataset", str(three), "--port", str(second_port)], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ")
            assert ("another labeling app" in lines[0]) or (second_port == port and "cannot serve" in lines[0])
        assert {p.name: p.read_bytes() for p in db.parent.iterdir() if p.is_file()} == before
        assert LabelStore(db).progress()["pairs"] == 9

        from gradio_client import Client  # the live app works on, with --max_note_chars from its command line

        client = Client(f"http://127.0.0.1:{port}", verbose=False, download_files=False)
        shown = client.predict("dora", api_name="/start")[-2]  # the pair on screen (the saved name comes last)
        out = client.predict("", "123456", shown, api_name="/label_left")
        assert any("limit is 5" in str(part) for part in out)
        client.predict("", "12345", shown, api_name="/label_left")
        rows = sqlite3.connect(db).execute("SELECT annotator, note FROM labels").fetchall()
        assert rows == [("dora", "12345")]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_app_gets_the_logins_and_the_store_gets_the_flags(runs, tmp_path, monkeypatch):
    """What `make label` hands on (the app stubbed: no server): with a users file the login is the annotator and the
    server asks for it; --overlap, --lease_timeout_s, --seed and --max_note_chars reach the store; with
    --filter_offensive false a pair holding an offensive word is served."""
    import sys
    import types

    built = {}

    class Demo:
        def queue(self, **kwargs):
            pass

        local_url = "http://127.0.0.1:0/"

        def launch(self, **kwargs):
            built["launch"] = kwargs

    def build_app(store, guidelines, title, use_login):
        built.update(store=store, use_login=use_login)
        return Demo()

    monkeypatch.setitem(sys.modules, "stages.label.app", types.SimpleNamespace(build_app=build_app, launch_kwargs=dict))
    users = tmp_path / "users.txt"
    users.write_text("alice:pw\n")
    pairs = write_lines(tmp_path / "pairs.jsonl", [pair(0), pair(1, responses=["a zebra", "one 1"])])
    demo = label_main(runs, "--pairs_dataset", str(pairs), "--users_file", str(users), "--port", str(free_port()),
                      "--overlap", "2", "--lease_timeout_s", "30", "--seed", "5", "--max_note_chars", "7",
                      "--offensive_words", "zebra", "--filter_offensive", "false")
    demo.store_lock.close()
    store = built["store"]
    guard = built["launch"]["auth"]
    assert built["use_login"] is True and guard.passwords == {"alice": b"pw"} and guard.max_failures == 5
    assert guard.lockout_s == 60.0 and guard("alice", "pw") and not guard("alice", "pW")
    assert (store.overlap, store.lease_s, store.seed, store.max_note_chars) == (2, 30.0, 5, 7)
    # pairs of your own in a run with no pairs stage: recorded for `make rm`'s labels step
    assert (runs / "r" / "label" / "own_pairs.txt").read_text() == f"{pairs.resolve()}\n"
    assert store.progress()["blocked"] == 0 and store.servable_pairs() == ["p0", "p1"]
    # and served again by a later `make label` without the flag (it read the pairs stage's, which the run has not)
    label_main(runs, "--users_file", str(users), "--port", str(free_port())).store_lock.close()
    assert built["store"].servable_pairs() == ["p0", "p1"]


def test_only_your_own_pairs_in_a_run_without_sampled_ones_are_recorded(tmp_path):
    """record_own_pairs: eval's SFT-vs-PPO pairs (labeled for people's win rate) are never the run's own pairs, and
    labeling them after yours leaves your record; a run that has sampled pairs records none."""
    from stages.label.__main__ import OWN_PAIRS, record_own_pairs
    from stages.label.config import recorded_own_pairs

    runs = tmp_path / "runs"
    stage = StageRun("label", "r", str(runs))
    stage.dir.mkdir(parents=True)
    mine, human = tmp_path / "mine.jsonl", runs / "r" / "eval" / "human_pairs.jsonl"
    record_own_pairs(LabelArgs(pairs_dataset=str(human)), stage)
    assert not (stage.dir / OWN_PAIRS).exists()
    record_own_pairs(LabelArgs(pairs_dataset=str(mine)), stage)
    record_own_pairs(LabelArgs(pairs_dataset=str(human)), stage)
    record_own_pairs(LabelArgs(), stage)  # the run's own pairs stage's (none here): no record of a file
    assert (stage.dir / OWN_PAIRS).read_text() == f"{mine.resolve()}\n"
    assert recorded_own_pairs(str(runs), "r") == str(mine.resolve())  # what a later make label / label-export reads
    (runs / "r" / "pairs").mkdir()
    (runs / "r" / "pairs" / "manifest.json").write_text("{}")
    assert recorded_own_pairs(str(runs), "r") is None  # the run has sampled pairs since: theirs are the run's
    (stage.dir / OWN_PAIRS).unlink()
    record_own_pairs(LabelArgs(pairs_dataset=str(mine)), stage)
    assert not (stage.dir / OWN_PAIRS).exists()


# ---------------------------------------------------------------------------------------------- note size
def test_the_store_refuses_a_note_over_the_limit(tmp_path):
    store = LabelStore(tmp_path / "n.sqlite", max_note_chars=10)
    store.import_items([pair(0), pair(1)])
    with pytest.raises(NoteTooLong, match="11 characters long; the limit is 10"):
        store.save_label("ann", "p0", "left", 0, note="x" * 11)
    assert store.labels() == [] and store.history() == []
    store.save_label("ann", "p0", "left", 0, note="  " + "x" * 10 + "\n")  # the limit counts the stored (stripped) note
    with pytest.raises(NoteTooLong):  # a change of mind too
        store.save_label("ann", "p0", "right", 0, note="y" * 11)
    assert [(r["choice"], r["note"]) for r in store.labels()] == [("left", "x" * 10)]
    assert LabelStore(tmp_path / "d.sqlite").max_note_chars == LabelArgs().max_note_chars == 2000
    assert "max_note_chars: 2000" in (REPO / "configs/label.yaml").read_text()


def test_a_run_of_your_own_pairs_serves_them_unless_the_flag_names_others(tmp_path, capsys):
    """default_to_own_pairs: without --pairs_dataset a run of your own pairs serves and exports the recorded file, and
    says so; with the flag, the flag's file wins (the recorded one exported instead of X, silently, would lose X's
    labels); a run with a pairs stage has no record to follow."""
    from stages.label.config import OWN_PAIRS, LabelArgs, default_to_own_pairs

    runs = tmp_path / "runs"
    (runs / "r" / "label").mkdir(parents=True)
    (runs / "r" / "label" / OWN_PAIRS).write_text("/data/mine.jsonl\n")
    args = LabelArgs()
    default_to_own_pairs(args, str(runs), "r", "label-export")
    assert args.pairs_dataset == "/data/mine.jsonl"
    assert capsys.readouterr().out == f"label-export: this run labels your own pairs: /data/mine.jsonl (label/{OWN_PAIRS})\n"
    args = LabelArgs(pairs_dataset="/data/other.jsonl")
    default_to_own_pairs(args, str(runs), "r", "label-export")
    assert args.pairs_dataset == "/data/other.jsonl" and capsys.readouterr().out == ""


def test_the_app_says_where_it_serves_and_offers_no_public_link(runs, tmp_path, capsys):
    """make label prints the address; gradio's hint to set share=True (a public link past the exposure check) is not
    printed."""
    pairs = write_lines(tmp_path / "pairs.jsonl", [pair(0), pair(1)])
    port = free_port()
    demo = label_main(runs, "--pairs_dataset", str(pairs), "--port", str(port))
    try:
        out = capsys.readouterr().out
        assert f"* Running on local URL:  http://127.0.0.1:{port}/" in out and "share" not in out, out
    finally:
        demo.close()
        demo.store_lock.close()
