"""The label store, its stats and the export's vote, without a browser (fast)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter

import pytest

from pipeline.config import ConfigError
from stages.label.config import check_exposure, load_users, word_filter
from stages.label.export import aggregate
from stages.label.stats import binomial_two_sided_p, cohen_kappa, krippendorff_alpha, summarize
from stages.label.store import LabelStore
from tests.conftest import REPO


def pairs(n: int) -> list[dict]:
    return [{"pair_id": f"p{i:03d}", "prompt": [{"role": "user", "content": f"question {i}"}],
             "responses": [f"answer {i} zero", f"answer {i} one"]} for i in range(n)]


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


@pytest.fixture
def store(tmp_path):
    s = LabelStore(tmp_path / "labels.sqlite", overlap=1, lease_s=60, clock=Clock())
    s.import_items(pairs(4))
    return s


def test_label_is_stored_with_order_and_mapped_back(store):
    assert store.journal_mode() == "wal"
    item = store.next_item("alice")
    assert item.pair_id == "p000" and item.left == item.responses[item.shown_left]
    row = store.save_label("alice", item.pair_id, "right", item.shown_left, "much", " close call ")
    assert row["preferred"] == 1 - item.shown_left and row["shown_left"] == item.shown_left
    assert (row["strength"], row["note"], row["revision"]) == ("much", "close call", 1)
    tie = store.save_label("alice", "p001", "tie", 0, "much")
    assert tie["preferred"] is None and tie["strength"] is None  # strength means nothing for a tie
    with pytest.raises(ValueError):
        store.save_label("alice", "p002", "left-ish", 0)
    with pytest.raises(KeyError):
        store.save_label("alice", "nope", "left", 0)


def test_changed_mind_is_an_update_and_history_keeps_every_version(store):
    first = store.save_label("alice", "p000", "left", 0)
    second = store.save_label("alice", "p000", "right", 0, "slightly")
    assert second["id"] == first["id"] and second["revision"] == 2 and second["preferred"] == 1
    assert len(store.labels()) == 1
    assert [(h["action"], h["choice"]) for h in store.history("alice")] == [("new", "left"), ("change", "right")]


def test_undo_reverts_a_change_then_deletes_and_serves_the_pair_again(store):
    store.save_label("alice", "p000", "left", 1)
    store.save_label("alice", "p001", "tie", 0)
    store.save_label("alice", "p001", "both_bad", 0)
    assert store.next_item("alice").pair_id == "p002"  # alice now holds p002
    assert store.undo("alice") == ("p001", "change")  # the change is reverted to the tie
    assert store.reopen("alice", "p001").label["choice"] == "tie"
    assert store.undo("alice") == ("p001", "new")  # then the tie itself goes
    assert store.reopen("alice", "p001") is None
    back = store.next_item("alice")
    assert back.pair_id == "p001" and back.shown_left == 0  # the undone pair first, in the order it was shown
    assert store.undo("alice") == ("p000", "new") and store.undo("alice") is None
    assert store.labels() == []


def test_undo_takes_back_a_skip_and_the_pair_comes_back_unless_others_filled_it(store):
    store.save_label("alice", "p000", "left", 1)
    held = store.next_item("alice")
    store.skip("alice", held.pair_id)
    assert held.pair_id == "p001" and store.next_item("alice").pair_id == "p002"
    assert store.progress("alice")["open_to_me"] == 2  # p000 labeled, p001 skipped
    assert store.undo("alice") == ("p001", "skip")  # a stray S: the latest action, before the label of p000
    assert store.next_item("alice") == held and store.progress("alice")["open_to_me"] == 3
    store.skip("alice", "p001")
    store.save_label("bob", "p001", "tie", 0)  # overlap 1: bob fills it meanwhile
    assert store.undo("alice") == ("p001", "skip")
    assert store.next_item("alice").pair_id == "p002"  # p001 is full: not served to alice beyond overlap
    assert store.undo("alice") == ("p000", "new") and store.undo("alice") is None
    assert [h["action"] for h in store.history("alice")] == ["new", "skip", "undo", "skip", "undo", "undo"]


def test_a_stale_tabs_skip_of_an_answered_pair_records_nothing(store):
    """Two tabs under one login: alice labels p000 in one, then presses Skip on p000 in the other, which still shows it.
    No skip is recorded (nor a second one of a pair already skipped), so her undo takes back her label, as she expects."""
    store.save_label("alice", "p000", "left", 0)
    store.skip("alice", "p000")
    store.skip("alice", "p001")
    store.skip("alice", "p001")
    assert [(h["action"], h["pair_id"]) for h in store.history("alice")] == [("new", "p000"), ("skip", "p001")]
    assert store.undo("alice") == ("p001", "skip") and store.undo("alice") == ("p000", "new")
    assert store.labels() == [] and store.undo("alice") is None


def test_handing_back_one_pair_keeps_the_annotators_other_lease(store):
    """overlap 1. Alice labels p000, opens p001, and undoes her label: she now holds leases on p000 (shown) and p001
    (still open in another tab). Handing back p001 (that tab switches name) frees p001 alone: bob gets p001, not
    p000, which alice is still labeling."""
    assert store.next_item("alice").pair_id == "p000"
    store.save_label("alice", "p000", "left", store.shown_left("p000", "alice"))
    assert store.next_item("alice").pair_id == "p001"
    assert store.undo("alice") == ("p000", "new")
    store.release("alice", "p001")
    assert store.next_item("bob").pair_id == "p001"
    assert store.next_item("alice").pair_id == "p000"


def test_an_undo_never_puts_a_second_person_on_a_full_pair(store):
    """overlap 1. Alice skips p000 and bob takes it: alice's undo takes her skip back, but not the pair while bob's live
    lease fills it, so both saving leaves p000 with bob's label alone; once bob hands it back, it is open to her again.
    A late answer undone (alice's lease ran out, bob took p003, alice saved it anyway) does not come back either."""
    assert store.next_item("alice").pair_id == "p000"
    store.skip("alice", "p000")
    assert store.next_item("bob").pair_id == "p000"
    assert store.undo("alice") == ("p000", "skip")
    assert store.next_item("bob").pair_id == "p000"  # bob's reload keeps his pair: no lease of alice's took it
    mine = store.next_item("alice")
    assert mine.pair_id == "p001"
    store.save_label("alice", mine.pair_id, "left", mine.shown_left)
    store.save_label("bob", "p000", "left", store.shown_left("p000", "bob"))
    assert sorted((lab["pair_id"], lab["annotator"]) for lab in store.labels()) == [("p000", "bob"), ("p001", "alice")]
    store.undo("bob")  # bob takes his label back (his lease on p000 returns), then leaves the pair
    store.release("bob", "p000")
    assert store.next_item("alice").pair_id == "p000"  # alice's skip of p000 is gone
    store.release("alice", "p000")

    late = store.next_item("carol")
    store.clock.t += 61
    assert late.pair_id == "p000" and store.next_item("dave").pair_id == "p000"
    store.save_label("carol", "p000", "tie", late.shown_left)  # late, but accepted
    assert store.undo("carol") == ("p000", "new")
    assert store.next_item("dave").pair_id == "p000"  # dave keeps his pair
    assert store.next_item("carol").pair_id == "p002"  # dave's live lease fills p000


def test_a_held_lease_gives_way_when_others_live_leases_fill_the_pair(tmp_path):
    """alice and bob hold p000 at overlap 2, then the app restarts with overlap 1: bob's live lease fills p000, so
    alice's lease gives way at her next call (she is served p001), and bob keeps his."""
    db, clock = tmp_path / "labels.sqlite", Clock()
    two = LabelStore(db, overlap=2, lease_s=60, clock=clock)
    two.import_items(pairs(2))
    assert two.next_item("alice").pair_id == two.next_item("bob").pair_id == "p000"
    one = LabelStore(db, overlap=1, lease_s=60, clock=clock)
    assert one.next_item("alice").pair_id == "p001"
    assert one.next_item("bob").pair_id == "p000"


def test_left_right_order_is_random_per_annotator_but_stable(tmp_path):
    s = LabelStore(tmp_path / "a.sqlite", seed=3)
    orders = [s.shown_left(f"p{i}", who) for i in range(200) for who in ("alice", "bob")]
    assert 0.4 < sum(orders) / len(orders) < 0.6
    assert any(s.shown_left(f"p{i}", "alice") != s.shown_left(f"p{i}", "bob") for i in range(20))
    again = LabelStore(tmp_path / "a.sqlite", seed=3)
    assert orders == [again.shown_left(f"p{i}", who) for i in range(200) for who in ("alice", "bob")]


def test_every_connection_fsyncs_its_commits_and_the_seed_picks_the_orders(tmp_path):
    """synchronous=FULL on every connection: the WAL is fsynced at each commit, so an acknowledged label survives a
    power loss, not only a kill -9. And `seed` picks the left/right orders: another seed flips about half of them."""
    s = LabelStore(tmp_path / "a.sqlite", seed=3)
    with s._read() as con:
        assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # 2 = FULL
    other = LabelStore(tmp_path / "a.sqlite", seed=4)
    flips = sum(s.shown_left(f"p{i}", "alice") != other.shown_left(f"p{i}", "alice") for i in range(200))
    assert 60 < flips < 140


def test_overlap_one_never_double_serves_and_a_timed_out_lease_is_released(store):
    clock = store.clock
    held = store.next_item("alice")
    assert store.next_item("alice").pair_id == held.pair_id  # a reload gets the same pair back
    seen_by_bob = []
    while (item := store.next_item("bob")) is not None:
        seen_by_bob.append(item.pair_id)
        store.save_label("bob", item.pair_id, "left", item.shown_left)
    assert held.pair_id not in seen_by_bob and len(seen_by_bob) == 3
    assert store.progress("bob")["held_by_others"] == 1
    clock.t += 61  # alice walked away: her lease expires, the pair goes back to the pool
    assert store.next_item("bob").pair_id == held.pair_id
    # alice answers late: accepted (people's work is never thrown away), bob's lease stays until it ends
    store.save_label("alice", held.pair_id, "tie", held.shown_left)
    assert store.progress()["pairs_done"] == 4


def test_overlap_two_completes_sets_and_skip_passes_the_pair_on(tmp_path):
    s = LabelStore(tmp_path / "o2.sqlite", overlap=2, lease_s=60, clock=Clock())
    s.import_items(pairs(3))
    a, b, c = s.next_item("alice"), s.next_item("bob"), s.next_item("carol")
    assert a.pair_id == b.pair_id == "p000" and c.pair_id == "p001"
    s.skip("alice", "p000")
    assert s.next_item("alice").pair_id == "p001"
    assert s.next_item("dave").pair_id == "p000"  # alice's slot on p000 went back to the pool
    s.save_label("alice", "p001", "left", 0)
    assert s.next_item("alice").pair_id == "p002"  # p000 is never shown to alice again


def test_simulated_labels_take_no_person_s_place_in_overlap(tmp_path):
    """The default chain's `make simulate` has three simulated annotators label every pair; `make label` (overlap 1)
    must still serve people every pair, count their progress alone, and fill a pair with people's labels only."""
    clock = Clock()
    db = tmp_path / "labels.sqlite"
    simulators = LabelStore(db, overlap=10**6, clock=clock)  # as stages/simulate.py opens it
    simulators.import_items(pairs(3))
    for name in ("sim:sentiment-1", "sim:sentiment-2", "sim:sentiment-3"):
        for pair_id in simulators.servable_pairs():
            simulators.save_label(name, pair_id, "left", simulators.shown_left(pair_id, name))
    people = LabelStore(db, overlap=1, lease_s=60, clock=clock)
    people.import_items(pairs(3))
    assert people.progress("alice") | {"held_by_others": 0} == {
        "pairs": 3, "blocked": 0, "labels": 0, "pairs_done": 0, "overlap": 1, "mine": 0, "open_to_me": 3,
        "held_by_others": 0}
    held = people.next_item("alice")
    assert held.pair_id == "p000" and people.next_item("bob").pair_id == "p001"  # alice's lease keeps bob off p000
    people.save_label("alice", held.pair_id, "right", held.shown_left)
    assert people.next_item("alice").pair_id == "p002"  # p000 is full with her label, p001 is bob's
    p = people.progress("carol")
    assert (p["labels"], p["pairs_done"], p["open_to_me"]) == (1, 1, 2)


def test_a_labeled_pair_s_id_cannot_take_other_text_and_an_unlabeled_one_takes_the_new(store):
    """A pairs file of your own ids, a typo fixed and the app restarted: a labeled pair keeps the text its labels were
    given on (the file is refused, naming the pair, and the store is unchanged); a pair nobody labeled serves the new."""
    from pipeline.config import ConfigError

    store.save_label("alice", "p000", "left", 0)
    before = (store.labels(), store.progress(), store.my_labels("alice"))
    fixed = pairs(4)
    fixed[0]["responses"] = ["answer 0 zero (fixed)", "answer 0 one"]
    with pytest.raises(ConfigError, match=r"pair 'p000' \(position 0 of the pairs\) has another prompt or responses .* "
                                          r"holds 1 label\(s\) given on the old text: give a changed pair a new pair_id"):
        store.import_items(fixed)
    assert (store.labels(), store.progress(), store.my_labels("alice")) == before
    fixed = pairs(4)
    fixed[1]["prompt"] = [{"role": "user", "content": "question 1, fixed"}]
    store.import_items(fixed)
    item = store.next_item("bob")
    assert item.pair_id == "p001" and item.prompt == fixed[1]["prompt"]
    store.import_items(pairs(4))  # the labeled pair's own text again: accepted
    assert store.labels() == before[0]


def test_word_filter_holds_pairs_back(tmp_path):
    blocked = word_filter(["faggot", "jap"])
    assert blocked({"prompt": [{"role": "user", "content": "He carried two Faggots of wood"}], "responses": ["", ""]}) == "faggot"
    assert blocked({"prompt": [{"role": "user", "content": "Trip to Japan, fagged out"}], "responses": ["ok", "ok"]}) is None
    s = LabelStore(tmp_path / "f.sqlite")
    rows = pairs(3)
    rows[1]["responses"][0] = "the Japs came"
    assert s.import_items(rows, blocked) == {"items": 3, "blocked": 1}
    served = []
    while (item := s.next_item("alice")) is not None:
        served.append(item.pair_id)
        s.save_label("alice", item.pair_id, "left", 0)
    assert served == ["p000", "p002"] and s.progress()["blocked"] == 1


def test_a_blank_offensive_word_holds_nothing_back():
    """A blank entry in offensive_words (`- " "` in the label config) is no word: it once made the pattern's empty
    alternative match at every word boundary, and every pair was held back from the annotators."""
    blocked = word_filter(["  ", "", "jap"])
    assert blocked({"prompt": [{"role": "user", "content": "A trip to Japan"}], "responses": ["fine", "ok"]}) is None
    assert blocked({"prompt": [{"role": "user", "content": "Hi"}], "responses": ["the Japs came", "ok"]}) == "jap"
    assert word_filter([" ", "\t"])({"prompt": [{"role": "user", "content": "Any words"}], "responses": ["a", "b"]}) is None


def test_servable_pairs_come_in_the_files_order_not_their_ids(tmp_path):
    """servable_pairs (what make simulate labels, in order: the labels' and so the export's order) lists the pairs as
    the file gives them, blocked ones left out, whatever their ids sort as."""
    s = LabelStore(tmp_path / "f.sqlite")
    rows = [dict(row, pair_id=pid) for row, pid in zip(pairs(4), ["b", "a", "d", "c"])]
    s.import_items(rows, lambda row: "word" if row["pair_id"] == "d" else None)
    assert s.servable_pairs() == ["b", "a", "c"]


def test_many_annotators_at_once_no_pair_beyond_overlap(tmp_path):
    for overlap in (1, 2):
        s = LabelStore(tmp_path / f"c{overlap}.sqlite", overlap=overlap)
        s.import_items(pairs(30))
        errors = []

        def annotate(name):
            try:
                while (item := s.next_item(name)) is not None:
                    s.save_label(name, item.pair_id, "left", item.shown_left)
            except Exception as err:  # surfaced below; a thread's exception is otherwise lost
                errors.append(err)

        threads = [threading.Thread(target=annotate, args=(f"a{i}",)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        per_pair = Counter(lab["pair_id"] for lab in s.labels())
        assert len(per_pair) == 30 and set(per_pair.values()) == {overlap}


WRITER = """
import sys
from stages.label.store import LabelStore
s = LabelStore(sys.argv[1])
i = 0
while (item := s.next_item(f"w{i % 3}")) is not None:
    s.save_label(f"w{i % 3}", item.pair_id, ("left", "right", "tie")[i % 3], item.shown_left)
    print(item.pair_id, f"w{i % 3}", flush=True)   # the acknowledgement comes after the commit, as in the UI
    i += 1
"""


def test_kill9_while_writing_loses_no_acknowledged_label(tmp_path):
    db = tmp_path / "k.sqlite"
    LabelStore(db).import_items(pairs(5000))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    acked = [proc.stdout.readline().split() for _ in range(60)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    acked += [line.split() for line in proc.stdout.read().splitlines()]  # anything printed before it died
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {tuple(r) for r in con.execute("SELECT pair_id, annotator FROM labels")}
    assert {tuple(a) for a in acked} <= stored and len(stored) <= len(acked) + 1  # at most the one in flight
    again = LabelStore(db)  # a restart continues: the next pair is one nobody labeled
    assert again.next_item("w0").pair_id not in {p for p, _ in stored}


def disk_full_at(monkeypatch, pages: int | None) -> None:
    """Every store connection from now on meets a disk with room for `pages` pages of its file (None: as it is now):
    SQLite's own "database or disk is full" (SQLITE_FULL), as a full disk gives it."""
    connect = LabelStore._connect

    def full_connect(self):
        con = connect(self)
        now = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count={now if pages is None else pages}")
        return con

    monkeypatch.setattr(LabelStore, "_connect", full_connect)


def test_a_full_disk_is_said_as_one_and_leaves_no_empty_store_behind(tmp_path, monkeypatch):
    import errno

    from pipeline.run import disk_problem

    db = tmp_path / "labels.sqlite"
    whole = LabelStore(db)
    whole.import_items(pairs(3))
    whole.save_label("alice", "p000", "left", 0)
    disk_full_at(monkeypatch, None)
    with pytest.raises(OSError) as full:  # a label on a full disk: not "damaged", nothing stored
        whole.import_items(pairs(400))
    assert (full.value.errno, full.value.filename) == (errno.ENOSPC, str(db))
    assert disk_problem(full.value) == (
        f"cannot write {db}: No space left on device: free space on that disk, or point RUNS_DIR= (--runs_dir) at a "
        f"disk with room, and run the same command again")
    assert [lab["pair_id"] for lab in whole.labels()] == ["p000"] and len(whole.servable_pairs()) == 3

    new = tmp_path / "new" / "labels.sqlite"
    disk_full_at(monkeypatch, 1)  # a new store's schema takes more pages than the disk has
    with pytest.raises(OSError) as full:
        LabelStore(new)
    assert (full.value.errno, full.value.filename) == (errno.ENOSPC, str(new))
    assert sorted(new.parent.iterdir()) == []  # no 0-byte store, refused as a truncated copy once space is freed
    monkeypatch.undo()
    LabelStore(new).import_items(pairs(2))  # the same command, with room, makes it
    assert len(LabelStore(new).servable_pairs()) == 2


@pytest.mark.parametrize("file_limit, sqlite_says", [(16384, "SQLITE_IOERR_SHMSIZE"), (65536, "SQLITE_IOERR_WRITE")])
def test_a_full_disk_sqlite_calls_an_io_error_is_said_as_a_full_disk(file_limit, sqlite_says, tmp_path, monkeypatch):
    """On a real full disk SQLite rarely says SQLITE_FULL: each transaction opens the store again, the -shm file the
    last one deleted cannot be sized (SQLITE_IOERR_SHMSIZE), or the WAL cannot grow (SQLITE_IOERR_WRITE): "disk I/O
    error" both (seen on a full 512 KiB tmpfs). Here a file size limit refuses those writes as the disk would, and the
    store's disk reports its room: none (a full disk, one line), or plenty (another fault: SQLite's own error)."""
    import errno
    import resource

    from pipeline.run import disk_problem

    db = tmp_path / "labels.sqlite"
    store = LabelStore(db)
    store.import_items(pairs(3))
    store.save_label("alice", "p000", "left", 0)
    real_statvfs = os.statvfs

    def disk(free_blocks):
        def statvfs(path):
            real = real_statvfs(path)
            return type("Disk", (), {"f_flag": real.f_flag, "f_frsize": 4096, "f_bavail": free_blocks})
        return statvfs

    def refused_import(write=lambda: store.import_items(pairs(400))) -> BaseException:
        limit, on_limit = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, limit[1]))
        try:
            with pytest.raises(Exception) as refused:
                write()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            signal.signal(signal.SIGXFSZ, on_limit)
        return refused.value

    monkeypatch.setattr(os, "statvfs", disk(255))  # under 1 MiB free: out of room
    full = refused_import()
    assert isinstance(full, OSError) and (full.errno, full.filename) == (errno.ENOSPC, str(db))
    assert full.__cause__.sqlite_errorname == sqlite_says
    if sqlite_says == "SQLITE_IOERR_SHMSIZE":  # a label alone (one transaction, no read before it): the same line
        label = refused_import(lambda: store.save_label("bob", "p001", "right", 0))
        assert isinstance(label, OSError) and (label.errno, label.filename) == (errno.ENOSPC, str(db))
    assert disk_problem(full) == (
        f"cannot write {db}: No space left on device: free space on that disk, or point RUNS_DIR= (--runs_dir) at a "
        f"disk with room, and run the same command again")
    monkeypatch.setattr(os, "statvfs", disk(256))  # 1 MiB free: not a full disk, SQLite's error as it is
    other = refused_import()
    assert isinstance(other, sqlite3.OperationalError) and other.sqlite_errorname == sqlite_says
    monkeypatch.undo()
    assert [lab["pair_id"] for lab in LabelStore(db).labels()] == ["p000"] and len(LabelStore(db).servable_pairs()) == 3


def test_a_store_sqlite_cannot_open_is_unwritable_only_when_its_folder_is(tmp_path, monkeypatch):
    import errno

    from stages.label.store import disk_error

    db = tmp_path / "labels.sqlite"
    LabelStore(db).import_items(pairs(2))
    cannot_open = sqlite3.OperationalError("unable to open database file")
    cannot_open.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN
    assert disk_error(cannot_open, db) is None  # a writable folder: some other fault, said as SQLite says it
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)  # as a chmod 555 folder to a non-root user
    unwritable = disk_error(cannot_open, db)
    assert (unwritable.errno, unwritable.filename) == (errno.EACCES, str(db))


def test_reading_a_store_on_a_full_disk_says_the_disk_is_full(tmp_path, monkeypatch):
    """make rm and make ppo read the store (count_labels, store_digest): on a full disk SQLite says "disk I/O error",
    and the line told people to restore whole labels from a backup. A full disk is said as one; other damage as before."""
    import stages.label.store as store_module
    from pipeline.run import disk_problem
    from stages.label.store import count_labels, store_digest

    db = tmp_path / "labels.sqlite"
    LabelStore(db).import_items(pairs(2))
    io_error = sqlite3.OperationalError("disk I/O error")
    io_error.sqlite_errorcode = sqlite3.SQLITE_IOERR_SHMSIZE

    def failing(path):
        raise io_error

    monkeypatch.setattr(store_module, "reading_connection", failing)
    real_statvfs = os.statvfs
    for free_blocks, says in ((255, disk_problem(OSError(28, os.strerror(28), str(db)))),
                              (10**6, f"label store {db} cannot be read (disk I/O error): restore it from a backup")):
        monkeypatch.setattr(os, "statvfs", lambda path, free=free_blocks: type(
            "Disk", (), {"f_flag": real_statvfs(path).f_flag, "f_frsize": 4096, "f_bavail": free}))
        for read in (count_labels, store_digest):
            with pytest.raises(ConfigError) as err:
                read(db)
            assert str(err.value) == says
    assert "No space left on device" in disk_problem(OSError(28, os.strerror(28), str(db)))


def test_the_store_digest_sees_the_side_clicked_and_the_order_shown(tmp_path):
    """`make rm` exports again when a label changes: the store digest fresh_export compares changes with the side
    clicked alone (left -> right) and with the order shown alone (which response was on the left), since either
    changes the winner; a note alone changes no exported row, and not the digest."""
    from stages.label.store import labels_digest, store_digest

    s = LabelStore(tmp_path / "labels.sqlite")
    s.import_items(pairs(1))
    digests = []
    for choice, shown_left in (("left", 0), ("right", 0), ("right", 1)):
        s.save_label("ann", "p000", choice, shown_left)
        digests.append(store_digest(s.path))
    s.save_label("ann", "p000", "right", 1, note="on second thought")
    assert len(set(digests)) == 3 and store_digest(s.path) == digests[-1] == labels_digest(s.labels())


def test_kappa_alpha_and_position_bias_by_hand():
    # rater 1: a b a, rater 2: a b b -> p_o = 2/3, p_e = 2/9 + 2/9 = 4/9, kappa = (2/9) / (5/9) = 0.4
    assert cohen_kappa(list("aba"), list("abb")) == pytest.approx(0.4)
    assert cohen_kappa(list("aa"), list("aa")) is None  # chance agreement is total
    # units {a,a} {b,b} {a,b}: n = 6, o_ab = o_ba = 1, n_a = n_b = 3 -> alpha = 1 - 5 * 2 / 18 = 4/9
    assert krippendorff_alpha([["a", "a"], ["b", "b"], ["a", "b"]]) == pytest.approx(4 / 9)
    assert krippendorff_alpha([["a", "a"], ["b", "b"], ["c"]]) == pytest.approx(1.0)
    assert binomial_two_sided_p(5, 10) == pytest.approx(1.0)
    assert binomial_two_sided_p(9, 10) == pytest.approx(22 / 1024)
    # units of three values weigh each ordered pair 1 / (m - 1): {a,a,a} {a,a,b} {b,b} -> o_aa = 3 + 1 = 4,
    # o_ab = o_ba = 1, o_bb = 2; n = 8, n_a = 5, n_b = 3 -> alpha = 1 - (8 - 1) * 2 / (2 * 5 * 3) = 8/15
    assert krippendorff_alpha([["a", "a", "a"], ["a", "a", "b"], ["b", "b"]]) == pytest.approx(8 / 15)


def test_agreement_counts_only_pairs_several_annotators_labeled():
    """p1 has two labels (ann: response 0, bob: response 1), p2 and p3 one each: one pair with several labels, alpha
    0 on it, and no kappa (ann and bob share one pair, and a kappa needs two)."""
    labels = [lab("p1", "ann", "left", 0), lab("p1", "bob", "right", 1), lab("p2", "ann", "left", 0),
              lab("p3", "bob", "tie", None)]
    assert summarize(labels, now=10)["agreement"] == {"pairs_with_several_labels": 1, "krippendorff_alpha": 0.0,
                                                      "cohen_kappa": {}, "mean_cohen_kappa": None}


def lab(pair, who, choice, pref, strength=None, t=0):
    """A label-store row as stats and export read it (responses "<pair>-r0", "<pair>-r1")."""
    return {"pair_id": pair, "annotator": who, "choice": choice, "preferred": pref, "strength": strength,
            "created_at": t, "prompt": [{"role": "user", "content": pair}], "responses": [f"{pair}-r0", f"{pair}-r1"]}


def test_stats_tab_shows_people_s_position_bias_beside_simulated_labels():
    """30 of 30 clicks for the left side by a person is a textbook position bias (p = 2 / 2**30); beside 600 balanced
    labels of make simulate's annotators, pooled figures would read 330 of 630 (p = 0.25). The tab shows people's."""
    from stages.label.stats import stats_view, to_html

    def lab(i, who, choice):
        return {"pair_id": f"p{i}", "annotator": who, "choice": choice, "preferred": int(choice == "right"),
                "strength": None, "created_at": 1000.0 + i}

    labels = [lab(i, f"sim:sentiment-{k}", ("left", "right")[(i + k) % 2]) for i in range(200) for k in (1, 2)]
    labels += [lab(i, "sim:sentiment-3", ("left", "right")[i % 2]) for i in range(200)]
    labels += [lab(i, "alice", "left") for i in range(30)]
    s = stats_view(labels, now=5000)
    assert s["position_bias"] == {"left_wins": 30, "decided": 30, "left_share": 1.0, "p_value": 0.0}
    assert s["labels"] == 30 and list(s["annotators"]) == ["alice"] and s["choices"]["left"] == 30
    assert s["simulated"] == {"labels": 600, "annotators": ["sim:sentiment-1", "sim:sentiment-2", "sim:sentiment-3"]}
    assert s["human_vs_simulated"]["pairs"] == 30
    shown = to_html(s, overlap=1)
    assert "the left side won 30 of 30 decided labels" in shown
    assert "(sim:sentiment-1, sim:sentiment-2, sim:sentiment-3): 600 labels, not counted above" in shown
    # no pair has two people's labels: at overlap 1 none can, so the fix is named; at overlap 2 they are still to come
    assert "Overlap is 1 (each pair gets one annotator)" in shown and "No pair has two labels yet" not in shown
    assert "No pair has two labels yet" in to_html(s, overlap=2) and "Overlap is 1" not in to_html(s, overlap=2)
    assert "word filter" not in shown and to_html(s, 1, blocked=3).endswith(
        "<p>3 pair(s) are held back from annotators by the word filter.</p>")
    assert to_html(stats_view(labels[:600]), overlap=1).startswith("<p>No labels from people yet.</p>")


def test_summarize_counts_choices_rates_and_agreement():
    labels = [lab("p0", "ann", "left", 0, t=0), lab("p0", "bob", "right", 0, t=60),   # same meaning, other sides
              lab("p1", "ann", "left", 1, t=1800), lab("p1", "bob", "left", 0, t=1860),
              lab("p2", "ann", "tie", None, t=3600), lab("p2", "bob", "tie", None, t=3660)]
    s = summarize(labels, now=3700)
    assert s["choices"] == {"left": 3, "right": 1, "tie": 2, "both_bad": 0}
    assert s["position_bias"]["left_share"] == 0.75
    assert s["annotators"]["ann"] == {"labels": 3, "labels_per_hour": 3.0, "last_hour": 2}
    assert s["agreement"]["pairs_with_several_labels"] == 3
    assert s["agreement"]["cohen_kappa"]["ann / bob"]["kappa"] == pytest.approx(
        cohen_kappa(["0", "1", "tie"], ["0", "0", "tie"]), abs=1e-3)


def test_export_vote_majority_ties_and_both_bad():
    labels = [lab("maj", "a", "left", 1, "much"), lab("maj", "b", "right", 1, "much"), lab("maj", "c", "left", 0),
              lab("tie", "a", "tie", None), lab("split", "a", "left", 0), lab("split", "b", "left", 1),
              lab("bad", "a", "both_bad", None)]
    rows, dropped = aggregate(labels)
    assert [r["pair_id"] for r in rows] == ["maj"]
    maj = rows[0]
    assert maj["chosen"] == [{"role": "assistant", "content": "maj-r1"}] and maj["rejected"][0]["content"] == "maj-r0"
    assert (maj["annotator"], maj["n_annotators"], maj["strength"], maj["agreement"]) == ("a,b,c", 3, "much", 0.6667)
    assert dropped == Counter(tie=1, no_majority=1, both_bad=1)
    rows, dropped = aggregate(labels, ties="both_orders", both_bad="tie")
    ties = [r for r in rows if r["is_tie"]]
    assert len(ties) == 4 and {r["chosen"][0]["content"] for r in ties if r["pair_id"] == "tie"} == {"tie-r0", "tie-r1"}
    rows, dropped = aggregate(labels, min_agreement=0.7)
    assert rows == [] and dropped["low_agreement"] == 1


def test_export_keeps_a_majority_not_a_plurality():
    """An outcome needs more than half the votes. A, B, B, tie: B has the most votes but 2 of 4, so the pair is
    dropped (it was exported as B, agreement 0.5); B, B, B, A, tie keeps B at 3/5. Three voters (the default
    simulation) as before: 2 of 3 or 3 of 3 wins, one each is no majority; one voter wins, two split voters do not.
    With both_bad: tie, "both bad" joins the tie votes: tie, both bad, A is a tie at 2/3; tie, both bad, A, B is not."""
    A, B, TIE, BAD = ("left", 0), ("left", 1), ("tie", None), ("both_bad", None)

    def votes(pair, *outcomes):
        return [lab(pair, f"v{i}", choice, pref) for i, (choice, pref) in enumerate(outcomes)]

    labels = (votes("abbt", A, B, B, TIE) + votes("bbbat", B, B, B, A, TIE) + votes("aab", A, A, B)
              + votes("aaa", A, A, A) + votes("abt", A, B, TIE) + votes("abx", A, B, BAD) + votes("a", A)
              + votes("ab", A, B) + votes("aa", A, A))
    rows, dropped = aggregate(labels)
    assert [(r["pair_id"], r["chosen"][0]["content"], r["agreement"]) for r in rows] == [
        ("bbbat", "bbbat-r1", 0.6), ("aab", "aab-r0", 0.6667), ("aaa", "aaa-r0", 1.0), ("a", "a-r0", 1.0),
        ("aa", "aa-r0", 1.0)]
    assert dropped == Counter(no_majority=4)
    rows, dropped = aggregate(votes("tba", TIE, BAD, A) + votes("tbab", TIE, BAD, A, B), ties="both_orders",
                              both_bad="tie")
    assert [(r["pair_id"], r["is_tie"], r["agreement"]) for r in rows] == [("tba", True, 0.6667)] * 2
    assert dropped == Counter(no_majority=1)


def test_auth_guard_and_users(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="refusing to start the labeling UI on 0.0.0.0 without authentication"):
        check_exposure("0.0.0.0", [])
    check_exposure("127.0.0.1", [])
    check_exposure("::1", [])
    check_exposure("0.0.0.0", [("alice", "pw")])
    users = tmp_path / "users.txt"
    users.write_text("# annotators\nalice:s3cret:with:colons\n\n  bob:pw \tx\n")
    assert load_users(str(users), env={"LABEL_USERS": "carol:x, dan:y"}) == [
        ("alice", "s3cret:with:colons"), ("bob", "pw \tx"), ("carol", "x"), ("dan", "y")]
    # `bob: pw` (YAML's habit) made the password " pw", and a trailing space was cut off: nobody could log in
    for n, line in ((2, "bob: hunter2"), (2, "bob:hunter2 "), (2, "bob:hunter2\t")):
        users.write_text(f"alice:pw\n{line}\n")
        with pytest.raises(ConfigError, match=rf"bad password \(line {n} of the users file .*\): it starts or ends "
                                               rf"with a space") as err:
            load_users(str(users), env={})
        assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match=r"bad password \(entry 1 of \$LABEL_USERS\): it starts or ends with a space"):
        load_users(None, env={"LABEL_USERS": "bob:hunter2 , alice:x"})  # the space before the comma is the password's
    # `LABEL_USERS=$(cat users.env)` with a login per line: one login, alice, whose password nobody can type
    for env in ({"LABEL_USERS": "alice:zq1\nbob:zq2"}, {"LABEL_USERS": "carol:x,alice:zq1\r\nbob:zq2\n"},
                {"LABEL_USERS": "alice:p\x00w"}):
        with pytest.raises(ConfigError, match=r"bad password \(entry (1|2) of \$LABEL_USERS\): it holds a line break or "
                                               r"another control character.*part \$LABEL_USERS's entries with commas") as err:
            load_users(None, env=env)
        assert "zq" not in str(err.value) and "\n" not in str(err.value)
    users.write_text("alice:p\x07w\n")
    with pytest.raises(ConfigError, match=r"bad password \(line 1 of the users file .*\): it holds a line break"):
        load_users(str(users), env={})


def test_a_login_name_with_a_space_before_its_colon_is_the_name_itself(tmp_path):
    """`bob :pw` (a space before the ':') is the login `bob`, as a person types it at the login page and as the
    labels store it; kept as 'bob ', nobody could log in as bob (Gradio compares the name exactly)."""
    from stages.label.config import LoginGuard

    users = tmp_path / "users.txt"
    users.write_text("bob :pw1\n")
    found = load_users(str(users), env={"LABEL_USERS": "carol\t:x"})
    assert found == [("bob", "pw1"), ("carol", "x")]
    guard = LoginGuard(found)
    assert guard("bob", "pw1") and guard("carol", "x") and not guard("bob ", "pw1")


def test_wrong_passwords_in_a_row_lock_a_login_for_a_doubling_time(capsys):
    """Five wrong passwords in a row lock the login, the right password too, for 60 s, then 120 s after the sixth and
    so on up to an hour; a right password after the lock clears the count; another login is not touched; names that
    are no login are refused and never counted. The password is compared exactly (no stripping, no case folding)."""
    from stages.label.config import LoginGuard

    now = [1000.0]
    guard = LoginGuard([("alice", "pw A"), ("bob", "b")], clock=lambda: now[0])
    assert not guard("alice", "pw a") and not guard("alice", "pw A ") and guard.failures == {"alice": 2}
    assert guard("alice", "pw A") and guard.failures == {}
    for _ in range(4):
        assert not guard("alice", "x")
    assert guard.failures == {"alice": 4} and guard.locked_until == {}
    assert not guard("alice", "x")  # the fifth in a row: locked for 60 s
    assert guard.locked_until == {"alice": 1060.0}
    assert capsys.readouterr().err == "note: login 'alice' locked for 60 s after 5 wrong passwords in a row\n"
    now[0] = 1059.9
    assert not guard("alice", "pw A") and guard("bob", "b")
    assert guard.failures == {"alice": 5}  # a try while locked is not counted
    now[0] = 1060.0
    assert not guard("alice", "y")  # the sixth: 120 s
    assert guard.locked_until["alice"] == 1180.0 and "locked for 120 s after 6" in capsys.readouterr().err
    now[0] = 1180.0
    assert guard("alice", "pw A") and guard.failures == {}
    for _ in range(4):
        assert not guard("alice", "x")
    assert guard.failures == {"alice": 4} and guard.locked_until["alice"] == 1060.0 + 120  # not locked again yet
    guard.failures["alice"] = 30
    now[0] = 5000.0
    assert not guard("alice", "x") and guard.locked_until["alice"] == 5000.0 + 3600
    for _ in range(10):
        assert not guard("mallory", "pw A")
    assert "mallory" not in guard.failures and "mallory" not in guard.locked_until


def test_a_users_file_others_can_read_is_noted(tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text("alice:pw\n")
    users.chmod(0o644)
    assert load_users(str(users), env={}) == [("alice", "pw")]
    assert capsys.readouterr().err == (f"note: the users file {users} can be read or changed by other users of this "
                                       f"machine (mode 644): `chmod 600 {users}`\n")
    for mode in (0o640, 0o620, 0o604):  # the group's or anyone's read or write
        users.chmod(mode)
        load_users(str(users), env={})
        assert f"(mode {mode:o})" in capsys.readouterr().err
    users.chmod(0o600)
    load_users(str(users), env={})
    assert capsys.readouterr().err == ""
    users.write_text("alice\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_users(str(users), env={})


def test_users_and_guidelines_files_are_read_as_utf8_and_a_login_given_twice_is_refused(tmp_path):
    """Notepad's "UTF-8 with BOM" made the first login '\\ufeffalice' (alice could not log in); a Latin-1 file was a
    traceback; a name given twice kept the last password without a word (Gradio's auth is a dict)."""
    from pipeline.config import ConfigError
    from stages.label.config import read_guidelines

    users = tmp_path / "users.txt"
    users.write_bytes(b"\xef\xbb\xbfalice:pw1\r\nbob:p\xc3\xa4ss\r\n")
    assert load_users(str(users), env={}) == [("alice", "pw1"), ("bob", "p\u00e4ss")]
    users.write_bytes(b"alice:pw1\nbob:p\xe4ss\n")
    with pytest.raises(ConfigError, match=rf"users file {users} is not UTF-8 text \(line 2, column 6\): save it as UTF-8"):
        load_users(str(users), env={})
    users.write_text("alice:pw1\nbob:pw2\n")
    with pytest.raises(ConfigError, match="login 'bob' is given more than once"):
        load_users(str(users), env={"LABEL_USERS": "carol:x,bob:pw3"})
    guidelines = tmp_path / "guidelines.md"
    guidelines.write_bytes(b"\xef\xbb\xbf# Guidelines\n")
    assert read_guidelines(str(guidelines)) == "# Guidelines\n"
    guidelines.write_bytes(b"# Guidelines \x96 Latin-1\n")
    with pytest.raises(ConfigError, match=r"guidelines file .* is not UTF-8 text \(line 1, column 14\)"):
        read_guidelines(str(guidelines))


def test_earlier_labels_of_one_prompt_are_told_apart_by_their_responses(tmp_path):
    """The story recipe asks 28 pairs of each opening: the "change an earlier label" list names each label by its
    responses too, as its annotator saw them (left, right), not by the prompt alone."""
    import time

    from stages.label.app import earlier_label_text

    s = LabelStore(tmp_path / "labels.sqlite", clock=lambda: 1_000_000.0)
    q = [{"role": "user", "content": "Once upon a time\nthere was a very long opening of a story, cut here"}]
    s.import_items([{"pair_id": f"p{i}", "prompt": q, "responses": [f"Happy {i}", f"Sad {i}"]} for i in range(2)])
    s.save_label("ann", "p0", "left", 1, strength="much")
    s.save_label("ann", "p1", "tie", 0)
    hhmm = time.strftime("%H:%M", time.localtime(1_000_000.0))
    i = lambda text: f"\u2068{text}\u2069"  # noqa: E731  each piece isolated from the others' direction
    assert [earlier_label_text(m) for m in s.my_labels("ann")] == [
        f"{hhmm} · tie · {i('Once upon a time there was a very long o')} · left: {i('Happy 1')} | right: {i('Sad 1')}",
        f"{hhmm} · left is better (much) · {i('Once upon a time there was a very long o')} · left: {i('Sad 0')} | "
        f"right: {i('Happy 0')}"]


def test_an_earlier_label_of_a_conversation_is_named_by_its_last_turn():
    """A multi-turn prompt (a chat's follow-up): the "change an earlier label" list shows the turn the two replies
    answer, its last message, not the conversation's first (every follow-up of one chat would read alike)."""
    import time

    from stages.label.app import earlier_label_text

    m = {"prompt": [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once, a fox"},
                    {"role": "user", "content": "Make it sadder"}],
         "responses": ["The fox wept", "Rain fell"], "shown_left": 1, "choice": "right", "strength": None,
         "updated_at": 1_000_000.0}
    hhmm = time.strftime("%H:%M", time.localtime(1_000_000.0))
    assert earlier_label_text(m) == (f"{hhmm} · right is better · \u2068Make it sadder\u2069 · left: \u2068Rain fell\u2069 "
                                     f"| right: \u2068The fox wept\u2069")


def test_my_labels_list_the_latest_changed_first(store):
    """The "change an earlier label" list is newest first by the last change: a label changed now comes before one
    made after it was first given."""
    store.save_label("alice", "p000", "left", 0)
    store.clock.t += 10
    store.save_label("alice", "p001", "left", 0)
    store.clock.t += 10
    store.save_label("alice", "p000", "right", 0)
    assert [m["pair_id"] for m in store.my_labels("alice")] == ["p000", "p001"]


def test_text_reaches_the_page_with_its_control_characters_visible_and_roles_keep_their_whitespace():
    """The browser drops a NUL and hides other control characters: they show as their Unicode pictures; tabs, line
    breaks and CRLF line ends stay. A carriage return alone shows as its picture too (HTML read it as a line break,
    and `a\rb` showed on two lines). A role (a pairs file may name any) keeps its spaces and line breaks as the
    content does (it lacked the `plain` class: `tool  x` showed as `tool x`)."""
    from stages.label.app import prompt_html, text_html

    assert text_html("a\x00b\x1bc\x7fd\te\nf\rg <h>\r\ni\r") == (
        '<div class="plain">a\u2400b\u241bc\u2421d\te\nf\u240dg &lt;h&gt;\r\ni\u240d</div>')
    assert prompt_html([{"role": "tool  x\n y", "content": " c"}]) == (
        '<div class="msg"><div class="role plain">tool  x\n y</div><div class="plain"> c</div></div>')


def test_a_response_nothing_of_which_would_be_seen_is_said_in_words_and_kept_as_stored():
    """An empty reply said "(empty response)", but one of spaces alone showed an empty box (the browser journey): the
    annotator could not tell it from a reply that failed to load. It keeps its characters and says what they are."""
    from stages.label.app import response_html

    assert response_html("") == '<i class="plain">(empty response)</i>'
    assert response_html("   ") == ('<div class="plain">   </div><i class="plain">(whitespace only: 3 characters)</i>')
    assert response_html("\n") == ('<div class="plain">\n</div><i class="plain">(whitespace only: 1 character)</i>')
    assert response_html(" a <b> ") == '<div class="plain"> a &lt;b&gt; </div>'


def test_every_control_and_format_character_reaches_the_page_visible_not_acting():
    """Beyond C0 and DEL (their pictures), every Unicode control (Cc: the C1 block) and format character (Cf: zero-width
    space, word joiner, byte-order mark, soft hyphen, Arabic number sign, tag characters, direction controls) shows as
    its escape; tab, line break and carriage return stay, and other text (accents, CJK, emoji, Hebrew) is unchanged."""
    import sys
    import unicodedata

    from stages.label.app import text_html

    assert text_html("a\x85b\x9bc\u200bd\u2060e\ufefff\u00adg\u0600h\U000e0041i\U000e007fj") == (
        '<div class="plain">a\\u0085b\\u009bc\\u200bd\\u2060e\\ufefff\\u00adg\\u0600h\\U000e0041i\\U000e007fj</div>')
    assert text_html("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c") == (
        '<div class="plain">\\u202a\\u202b\\u202c\\u202d\\u202e\\u2066\\u2067\\u2068\\u2069\\u200e\\u200f'
        '\\u061c</div>')
    assert text_html("\t\n\r\n\u00e9 \u4e2d \U0001f44d \u05d0\u05d1 e\u0301") == (
        '<div class="plain">\t\n\r\n\u00e9 \u4e2d \U0001f44d \u05d0\u05d1 e\u0301</div>')
    hidden = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Cc", "Cf")
              and chr(c) not in "\t\n\r"]
    assert len(hidden) > 200 and not [c for c in hidden
                                      if any(unicodedata.category(shown) in ("Cc", "Cf") for shown in text_html(chr(c)))]


def test_characters_a_browser_draws_as_nothing_reach_the_page_visible():
    """Default-ignorable characters that are not Cc/Cf (variation selectors, the combining grapheme joiner, Hangul
    fillers, ...) are drawn as nothing or a blank: a run of variation selectors after one letter hid any bytes from the
    annotator (`a` + 8 x U+E0100 was as wide as `a` on the page) while the export and the reward model read them.
    They show as escapes, in the page and in the "change an earlier label" list alike."""
    from stages.label.app import earlier_label_text, text_html

    assert text_html("a\U000e0100\U000e01efb\ufe00\ufe0fc\u034fd\u3164e\u115ff\u180bg\u17b4h") == (
        '<div class="plain">a\\U000e0100\\U000e01efb\\ufe00\\ufe0fc\\u034fd\\u3164e\\u115ff\\u180bg\\u17b4h</div>')
    line = earlier_label_text({"updated_at": 0.0, "choice": "left", "strength": None, "shown_left": 0,
                               "prompt": [{"role": "user", "content": "q\U000e0100"}], "responses": ["x\ufe01", "y"]})
    assert "q\\U000e0100" in line and "x\\ufe01" in line
    # every default-ignorable code point, as Unicode's own property lists them (the `regex` module's tables)
    import regex

    from stages.label.app import CONTROL_PICTURES

    everything = "".join(map(chr, range(sys.maxunicode + 1)))
    ignorable = {ord(c) for c in regex.findall(r"\p{Default_Ignorable_Code_Point}", everything)}
    assert len(ignorable) > 4000 and sorted(ignorable - set(CONTROL_PICTURES)) == []


def test_a_direction_override_in_one_piece_of_an_earlier_label_does_not_turn_the_rest_around(tmp_path):
    """Each piece's own direction controls are shown as escapes: a response's PDI (U+2069) cannot close the isolate
    around it and its RLO (U+202E) then reverse the rest of the line, and an RLI the 30-character cut leaves open (the
    right response's) stays open nowhere. The line's only format characters are the three isolates the app puts; the
    cut counts the characters shown, escapes included, and never cuts an escape in half."""
    import time
    import unicodedata

    from stages.label.app import earlier_label_text

    s = LabelStore(tmp_path / "labels.sqlite", clock=lambda: 1_000_000.0)
    s.import_items([{"pair_id": "p0", "prompt": [{"role": "user", "content": "q\u200f\u061c"}],
                     "responses": ["ok\u2069\u202eevil \u202a\u202b\u202c\u202d\u2066\u200e", "\u2067" + "y" * 40]}])
    s.save_label("ann", "p0", "tie", 0)
    shown = earlier_label_text(s.my_labels("ann")[0])
    hhmm = time.strftime("%H:%M", time.localtime(1_000_000.0))
    assert shown == (f"{hhmm} · tie · \u2068q\\u200f\\u061c\u2069 · left: \u2068ok\\u2069\\u202eevil \\u202a"
                     f"\u2069 | right: \u2068\\u2067{'y' * 24}\u2069")  # 25 shown: the next escape would pass 30
    from stages.label.app import shown_start

    assert shown_start("ab\\U000e0100cd", 11) == "ab" and shown_start("ab\\U000e0100cd", 13) == "ab\\U000e0100c"
    assert shown_start("  a \t\n b  ", 3) == "a b" and shown_start("\\u00", 3) == "\\u0"  # a typed \\u00 is text
    assert [c for c in shown if unicodedata.category(c) == "Cf"] == ["\u2068", "\u2069"] * 3


@pytest.mark.parametrize("login", ["ann  lee", "\u202eecila", "<b>eve</b>", "tab\there", "x" * 65,
                                   "\u0430lice", "b\u03bfb", "\uff41lice", "\ufb01na", "Zoe\u0308",
                                   "alice\u115f", "alice\u1160", "\u3164bob", "\uffa0ann",
                                   "ann\u0661", "bo\u0966", "\u01c0ily", "\u041e\u043b\u0435\u0433\u0661"])
def test_a_login_name_that_could_look_like_another_is_refused(login):
    """A login is the identity: `ann  lee` showed as `ann lee` (another login), a direction override reversed the
    progress line around it, and `аlice` with a Cyrillic `а` (or `bοb` with a Greek `ο`, a full-width `ａ`, the ligature
    `ﬁ`, an `e` and a combining diaeresis for `ë`) looked like `alice`, as did `alice` and a Hangul filler (a letter,
    Hangul mixes with Latin, and a browser draws it as a blank), `ann١` (an Arabic-Indic digit) `ann1`, `ǀily` (a
    Latin click letter) `lily`. Logins follow the typed names' rule; one error line,
    naming the source, not the password."""
    from stages.label.app import clean_name

    with pytest.raises(ConfigError) as err:
        load_users(None, env={"LABEL_USERS": f"{login}:secretpw,bob:pw2"})
    assert str(err.value) == ("bad login name (entry 1 of $LABEL_USERS): use letters of one script, digits 0-9, single "
                              "spaces and . @ ' - only, up to 64 characters (as a typed name), so that no two logins "
                              "look alike")
    if len(login.split()) == 1:  # a typed name, the same (a typed name's spaces are made single, not refused)
        assert clean_name(login) is None
    names = ["Ann Lee", "j.o'neil-2@lab.org", "Zoë", "Олег", "Ελένη", "山田たろう", "김민준", "Kenji 山田", "Олег 2"]
    assert load_users(None, env={"LABEL_USERS": ",".join(f" {n}:pw{i}" for i, n in enumerate(names))}) == [
        (n, f"pw{i}") for i, n in enumerate(names)]


def test_a_bad_login_entry_names_its_place_never_its_text(tmp_path):
    """`LABEL_USERS='alice:pw1,bob:se,cretpart'` (a password with a comma) printed 'cretpart', and a users file's
    `alice hunter2` (a space for the ':') printed 'alice hunter2': an error names the entry's place only (and, for
    $LABEL_USERS, that a password there cannot hold a comma), whatever part of it is a password."""
    with pytest.raises(ConfigError) as err:
        load_users(None, env={"LABEL_USERS": "alice:pw1,,bob:se,cretpart"})
    assert str(err.value) == (
        "bad user entry (entry 4 of $LABEL_USERS): write `name:password`, a name and a password; a password in "
        "$LABEL_USERS cannot hold a comma (it parts the entries): give such a password in a users file (--users_file)")
    users = tmp_path / "users.txt"
    for text, problem in (("# team\nbob:pw2\n\nalice hunter2\n", "bad user entry"),
                          ("# team\nbob:pw2\n\nalice\thunter2:x\n", "bad login name"),
                          ("# team\nbob:pw2\n\n:hunter2\n", "bad user entry")):
        users.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_users(str(users), env={})
        assert str(err.value).startswith(f"{problem} (line 4 of the users file {users}): ")
        assert "hunter2" not in str(err.value) and "alice" not in str(err.value) and "$LABEL_USERS" not in str(err.value)


def test_people_cannot_take_a_simulated_annotators_name():
    """A simulator's labels are exported, removed and counted apart from people's by the `sim:` prefix alone, so no
    person may carry it: a typed name with ':' is refused, and a login is what comes before a users line's ':'."""
    from stages.label.app import clean_name
    from stages.label.store import is_simulated

    assert clean_name("  Ann   Lee ") == "Ann Lee"
    assert clean_name("sim:sentiment") is None and clean_name("sim:sentiment-1") is None
    (name, password), = load_users(None, env={"LABEL_USERS": "sim:sentiment:pw"})
    assert (name, password) == ("sim", "sentiment:pw") and not is_simulated(name)
    assert is_simulated("sim:sentiment-2") and not is_simulated("Sim:sentiment") and not is_simulated("simon")


def test_export_strength_comes_from_the_winning_votes():
    """Five votes, three for response 0 (slightly, slightly, much) and two for response 1 (much, much): the pair's
    strength is the winners' most common one, 'slightly'; the losers' words do not count."""
    labels = [lab("p", who, "left", pref, strength) for who, pref, strength in
              (("a", 0, "slightly"), ("b", 0, "slightly"), ("c", 0, "much"), ("d", 1, "much"), ("e", 1, "much"))]
    (row,), _ = aggregate(labels)
    assert row["chosen"][0]["content"] == "p-r0" and row["strength"] == "slightly" and row["agreement"] == 0.6
    # no majority among the winners: no strength, whatever order the labels were saved in (the first saved won, so an
    # undo and the same label again changed the export); a vote without a strength counts as one
    for order in ((("a", "much"), ("b", "slightly")), (("b", "slightly"), ("a", "much"))):
        (row,), _ = aggregate([lab("p", who, "left", 0, strength) for who, strength in order])
        assert row["strength"] == "", order
    (row,), _ = aggregate([lab("p", who, "left", 0, strength) for who, strength in (("a", "much"), ("b", None), ("c", None))])
    assert row["strength"] == ""
    (row,), _ = aggregate([lab("p", who, "left", 0, strength) for who, strength in (("a", "much"), ("b", "much"), ("c", None))])
    assert row["strength"] == "much"


def test_binomial_p_of_a_large_count_and_the_rate_of_a_short_session():
    """Over 1000 labels the two-sided p is the normal approximation (sd sqrt(n / 4)), close to the exact sum; an
    annotator whose labels span under a minute has no labels-per-hour figure, two labels 2 minutes apart 60 an hour."""
    import math

    exact = 2 * sum(math.comb(1100, i) for i in range(600, 1101)) / 2**1100
    assert binomial_two_sided_p(600, 1100) == pytest.approx(exact, rel=0.15)
    assert binomial_two_sided_p(550, 1100) == pytest.approx(1.0)

    at = lambda t: lab(f"p{t}", "ann", "left", 0, t=t)  # noqa: E731
    assert summarize([at(0), at(30)], now=60)["annotators"]["ann"]["labels_per_hour"] is None
    assert summarize([at(0), at(120)], now=130)["annotators"]["ann"]["labels_per_hour"] == 60.0
    assert summarize([at(0), at(60)], now=70)["annotators"]["ann"]["labels_per_hour"] == 120.0  # a minute: a rate
    assert summarize([at(0)], now=3600)["annotators"]["ann"]["last_hour"] == 1  # an hour ago: in the last hour


def test_pairs_others_started_come_first_and_a_reload_renews_the_lease(tmp_path):
    """Overlap 2: once alice has labeled p000, bob is served p000 (finish started sets first), not p001. Overlap 1: a
    reload renews the lease, so a pair held 45 s, reloaded, then held 45 s more is still not served to anyone else."""
    s = LabelStore(tmp_path / "o2.sqlite", overlap=2, lease_s=60, clock=Clock())
    s.import_items(pairs(3))
    first = s.next_item("alice")
    s.save_label("alice", first.pair_id, "left", first.shown_left)
    assert first.pair_id == "p000" and s.next_item("alice").pair_id == "p001"
    assert s.next_item("bob").pair_id == "p000"

    s = LabelStore(tmp_path / "o1.sqlite", overlap=1, lease_s=60, clock=Clock())
    s.import_items(pairs(2))
    held = s.next_item("alice")
    s.clock.t += 45
    assert s.next_item("alice").pair_id == held.pair_id  # the reload
    s.clock.t += 45  # 90 s after the first lease began, 45 s after the renewal
    assert s.next_item("bob").pair_id != held.pair_id


def test_a_lease_ends_at_its_expiry_time_for_its_holder_too(store):
    """lease_s 60: at 60 s the pair is back in the pool; bob gets it, and alice, asking at that same moment, gets
    another pair (overlap 1: never both of them)."""
    held = store.next_item("alice")
    store.clock.t += 60
    assert store.next_item("bob").pair_id == held.pair_id
    assert store.next_item("alice").pair_id != held.pair_id


def test_boundaries_of_the_export_filter_kappa_and_open_pairs(tmp_path):
    """A 2-of-3 majority meets min_agreement 2/3 (kept: the bar is "at least"); two annotators who share exactly two
    pairs get a kappa; a pair others have filled (overlap 1) is not open to me."""
    votes = [lab("p", "a", "left", 0), lab("p", "b", "left", 0), lab("p", "c", "left", 1)]
    rows, dropped = aggregate(votes, min_agreement=2 / 3)
    assert len(rows) == 1 and not dropped
    two = [lab("p0", "a", "left", 0), lab("p0", "b", "left", 0), lab("p1", "a", "left", 1), lab("p1", "b", "left", 0)]
    assert summarize(two, now=1)["agreement"]["cohen_kappa"]["a / b"]["items"] == 2

    s = LabelStore(tmp_path / "open.sqlite", overlap=1, lease_s=60, clock=Clock())
    s.import_items(pairs(3))
    item = s.next_item("bob")
    s.save_label("bob", item.pair_id, "left", item.shown_left)
    assert s.progress("alice")["open_to_me"] == 2


def test_undo_takes_back_only_my_label_and_never_returns_to_a_version_already_undone(tmp_path):
    """Overlap 2: alice's undo of her label on p000 leaves bob's label on it. And undo walks back over what is still
    in force: left, changed to right, undone (back to left), changed to tie, undone: left again, not the undone
    right."""
    s = LabelStore(tmp_path / "o2.sqlite", overlap=2, lease_s=60, clock=Clock())
    s.import_items(pairs(2))
    s.save_label("alice", "p000", "left", 0)
    s.save_label("bob", "p000", "right", 1, "much")
    assert s.undo("alice") == ("p000", "new")
    assert [(lab["annotator"], lab["choice"], lab["preferred"], lab["strength"]) for lab in s.labels()] == [
        ("bob", "right", 0, "much")]
    assert s.undo("alice") is None and [h["annotator"] for h in s.history("bob")] == ["bob"]

    s.save_label("alice", "p001", "left", 1)
    s.save_label("alice", "p001", "right", 1)
    assert s.undo("alice") == ("p001", "change") and s.reopen("alice", "p001").label["choice"] == "left"
    s.save_label("alice", "p001", "tie", 1)
    assert s.undo("alice") == ("p001", "change")
    back = s.reopen("alice", "p001").label
    assert (back["choice"], back["preferred"]) == ("left", 1)
    assert s.undo("alice") == ("p001", "new") and s.reopen("alice", "p001") is None


def test_undo_of_a_change_brings_back_the_earlier_strength_and_note(store):
    store.save_label("alice", "p000", "left", 0, "much", "first thoughts")
    store.save_label("alice", "p000", "left", 0, "slightly", "second thoughts")
    assert store.undo("alice") == ("p000", "change")
    back = store.reopen("alice", "p000").label
    assert (back["choice"], back["strength"], back["note"], back["revision"]) == ("left", "much", "first thoughts", 3)


def test_progress_counts_people_s_labels_of_the_current_pairs_only(tmp_path):
    """`make pairs` again: p000 is no longer served (its label stays in the store, inactive). The progress line counts
    the labels of the pairs served now: alice's label of p001, not that of p000; done 1 of the 3 current pairs."""
    s = LabelStore(tmp_path / "labels.sqlite", overlap=1, lease_s=60, clock=Clock())
    s.import_items(pairs(2))
    s.save_label("alice", "p000", "left", 0)
    s.save_label("alice", "p001", "left", 0)
    s.import_items(pairs(4)[1:])  # p001, p002, p003
    p = s.progress("alice")
    assert (p["pairs"], p["labels"], p["pairs_done"], p["mine"], p["open_to_me"]) == (3, 1, 1, 1, 2)
    assert len(s.labels()) == 2


def test_the_choices_table_gives_each_choice_s_share_of_all_labels():
    """Left 2, right 0, tie 1, both bad 1 of 4 labels: 50%, 0%, 25%, 25% (of every label, ties and both-bad too, not of
    the 2 decided ones, which would read 100% left)."""
    from stages.label.stats import summarize, to_html

    labels = [lab("p0", "ann", "left", 0), lab("p1", "ann", "left", 1), lab("p2", "ann", "tie", None),
              lab("p3", "ann", "both_bad", None)]
    shown = to_html(summarize(labels, now=1), overlap=1)
    right = ' style="text-align:right"'
    for name, n, share in (("left better", 2, "50%"), ("right better", 0, "0%"), ("tie", 1, "25%"), ("both bad", 1, "25%")):
        assert f"<tr><td>{name}</td><td{right}>{n}</td><td{right}>{share}</td></tr>" in shown


def test_mean_kappa_is_the_mean_over_annotator_pairs_and_the_hours_are_the_last_24():
    """Three annotators on three pairs: a and b agree throughout (kappa 1); c says response 0 where they say 1.
    kappa(a, c): p_o = 2/3, p_e = (1*2 + 1*0 + 1*1) / 9 = 1/3, so (2/3 - 1/3) / (2/3) = 1/2; the same for (b, c).
    The mean is (1 + 1/2 + 1/2) / 3 = 2/3. Labels in 30 distinct hours: the per-hour table keeps the latest 24."""
    import time

    labels = [lab(p, who, "left", pref) for who, prefs in (("a", (0, 1)), ("b", (0, 1)), ("c", (0, 0)))
              for p, pref in zip(("p0", "p1"), prefs)]
    labels += [lab("p2", who, "tie", None) for who in ("a", "b", "c")]
    ag = summarize(labels, now=0)["agreement"]
    assert {k: v["kappa"] for k, v in ag["cohen_kappa"].items()} == {"a / b": 1.0, "a / c": 0.5, "b / c": 0.5}
    assert ag["mean_cohen_kappa"] == 0.667

    hour0 = 1_699_999_200  # a whole hour
    hourly = [lab(f"h{h}", "a", "left", 0, t=hour0 + 3600 * h) for h in range(30)]
    per_hour = summarize(hourly, now=hour0 + 3600 * 30)["per_hour"]
    assert list(per_hour) == [time.strftime("%Y-%m-%d %H:00", time.localtime(hour0 + 3600 * h)) for h in range(6, 30)]
    assert set(per_hour.values()) == {1}


HOSTILE = '<img src=http://example.com/n.png> <b>eve</b>'


def test_names_reach_the_stats_and_progress_html_escaped():
    """A login is whatever a users line holds before its ':' (`<b>eve</b>:pw` is one), and a simulator is named after
    its judge: in the Stats tab and the progress line a name is text, never markup."""
    import html

    from stages.label.app import progress_html
    from stages.label.stats import stats_view, to_html

    labels = [lab("p0", HOSTILE, "left", 0), lab("p0", "sim:" + HOSTILE, "left", 0)]
    shown = to_html(stats_view(labels, now=1), overlap=1)
    assert "<img" not in shown and "<b>eve" not in shown
    assert f"<td>{html.escape(HOSTILE)}</td>" in shown and f"(sim:{html.escape(HOSTILE)}): 1 labels" in shown
    p = {"pairs": 2, "pairs_done": 1, "labels": 1, "overlap": 1, "mine": 1, "open_to_me": 1}
    line = progress_html(p, HOSTILE)
    assert "<img" not in line and f"Yours ({html.escape(HOSTILE)}): <b>1 labeled</b>" in line


def app_handlers(store, use_login):
    """The app's click handlers by API name, called directly (no server): what a browser or a script would send."""
    from stages.label.app import build_app

    return {f.api_name: f.fn for f in build_app(store, "guidelines", use_login=use_login).fns.values()}
# A label or skip sends the pair the page shows: here always the one the state holds (a second key before the next
# pair is on screen is tests/test_label_api.py's).


def test_with_logins_a_click_labels_as_the_login_with_the_side_shown_and_the_strength(tmp_path):
    """A page state naming bob, sent by alice's login, labels nothing; alice's own click of "right is better, much"
    on the pair she was shown stores her label of the response shown on the right, with its strength."""
    from types import SimpleNamespace

    store = LabelStore(tmp_path / "labels.sqlite")
    store.import_items(pairs(2))
    # an annotator shown p000 with response 1 on the left: a click mapped as if 0 were on the left would store the loser
    me = next(n for n in ("alice", "bob", "carol", "dave", "erin", "fred") if store.shown_left("p000", n) == 1)
    login = SimpleNamespace(username=me)
    api = app_handlers(store, use_login=True)
    st = api["on_load"]("", login)[0]
    assert st == {"annotator": me, "pair_id": "p000", "shown_left": 1}
    api["label_left"]("", "", st["pair_id"], {**st, "annotator": "mallory"}, login)
    assert store.labels() == [] and store.history() == []
    api["label_right"]("much", "close", st["pair_id"], st, login)
    (row,) = store.labels()
    assert (row["annotator"], row["pair_id"], row["choice"], row["shown_left"], row["preferred"], row["strength"],
            row["note"]) == (me, "p000", "right", 1, 0, "much", "close")


def test_the_stats_tab_counts_the_pairs_held_back_before_and_after_the_first_label(tmp_path):
    """The Stats handler, as Gradio calls it: 2 of 3 pairs held back by the word filter are counted (not the 1
    servable pair, not the 3 imported) before anyone labels, when it is the only reason nothing is served, and after."""
    store = LabelStore(tmp_path / "labels.sqlite", overlap=1, lease_s=60, clock=Clock())
    store.import_items(pairs(3), lambda row: None if row["pair_id"] == "p000" else "blocked")
    stats = app_handlers(store, use_login=False)["stats"]
    held_back = "<p>2 pair(s) are held back from annotators by the word filter.</p>"
    assert stats() == "<p>No labels yet.</p>\n" + held_back
    store.save_label("ann", "p000", "left", 0)
    assert stats().startswith("<p><b>1 labels</b> from 1 annotator(s).</p>") and stats().endswith("</p>\n" + held_back)


def test_skip_while_changing_an_earlier_label_keeps_it_and_switch_hands_the_open_pair_back(tmp_path):
    """Skip on a reopened label leaves it as it was (no skip is stored, so an undo takes back the label, not a skip);
    "Switch annotator" gives the pair on screen back to the pool at once, not at the lease's end."""
    from types import SimpleNamespace

    store = LabelStore(tmp_path / "labels.sqlite", overlap=1, lease_s=60, clock=Clock())
    store.import_items(pairs(2))
    api, page = app_handlers(store, use_login=False), SimpleNamespace(username=None)
    st = api["start"]("ann", {}, page)[0]
    st = api["label_left"]("", "", st["pair_id"], st, page)[0]
    assert st["pair_id"] == "p001"
    st = api["open"]("p000", st, page)[0]
    assert st["editing"] and st["pair_id"] == "p000"
    st = api["skip"](st["pair_id"], st, page)[0]
    assert [h["action"] for h in store.history("ann")] == ["new"] and st["pair_id"] == "p001"
    api["switch"](st, page)
    assert store.next_item("bob").pair_id == "p001"


def test_the_undo_message_says_whether_the_pair_came_back(tmp_path):
    """An undone skip says "Here is that pair again" only when it is: with bob on p000 (overlap 1), alice's undo says
    the pair is with others and shows her p001."""
    from types import SimpleNamespace

    store = LabelStore(tmp_path / "labels.sqlite", overlap=1, lease_s=60, clock=Clock())
    store.import_items(pairs(2))
    api, page = app_handlers(store, use_login=False), SimpleNamespace(username=None)
    st = api["start"]("ann", {}, page)[0]
    st = api["skip"](st["pair_id"], st, page)[0]
    assert st["pair_id"] == "p001"
    out = api["undo"](st, page)
    assert out[0]["pair_id"] == "p000" and "Here is that pair again." in out[13]
    st = api["skip"](out[0]["pair_id"], out[0], page)[0]
    assert store.next_item("bob").pair_id == "p000"
    out = api["undo"](st, page)
    assert out[0]["pair_id"] == "p001" and out[13] == ("↶ Undone: your skip was taken back. That pair is with others "
                                                       "now (overlap 1): it comes back to you if they leave it.")


def test_a_changed_label_comes_back_with_its_strength_and_note_and_says_changed(tmp_path):
    """Opening an earlier label puts its strength and note back on screen: a click that changes only the side keeps
    them (an empty note on screen would overwrite it). A first label says "Saved", a change "Changed"; the typed
    name is cleaned (spaces made single) before it is stored."""
    from types import SimpleNamespace

    store = LabelStore(tmp_path / "labels.sqlite", overlap=1, lease_s=600, clock=Clock())
    store.import_items(pairs(2))
    api, page = app_handlers(store, use_login=False), SimpleNamespace(username=None)
    out = api["start"]("  Ann   Lee ", {}, page)
    assert out[0]["annotator"] == "Ann Lee" and out[16] == "Ann Lee"
    out = api["label_right"]("much", "kinder ending", out[0]["pair_id"], out[0], page)
    assert out[13].startswith("✓ Saved label #1: right is better (much) (")
    out = api["open"]("p000", out[0], page)
    assert out[0]["editing"] and (out[10], out[11]) == ("much", "kinder ending")
    out = api["label_left"](out[10], out[11], out[0]["pair_id"], out[0], page)
    assert out[13].startswith("✓ Changed label #1: left is better (much) (")
    (row,) = store.labels()
    assert (row["annotator"], row["choice"], row["strength"], row["note"], row["revision"]) == \
        ("Ann Lee", "left", "much", "kinder ending", 2)


def test_a_refused_name_or_note_saves_nothing_and_keeps_the_typed_note(tmp_path):
    """A name against the rule (markup) starts nobody; a note over the limit is not saved and stays on screen (the
    view's note box is left as typed: gr.update() with no value), so the annotator can shorten it. With the other
    pair leased by bob, alice's done page says when it comes back: the lease in minutes (600 s = 10 min)."""
    from types import SimpleNamespace

    import gradio as gr

    store = LabelStore(tmp_path / "labels.sqlite", overlap=1, lease_s=600, clock=Clock())
    store.import_items(pairs(2))
    api, page = app_handlers(store, use_login=False), SimpleNamespace(username=None)
    out = api["start"]("<b>eve</b>", {}, page)
    assert "annotator" not in out[0] and out[13].startswith("⚠ Enter a name")
    st = api["start"]("alice", {}, page)[0]
    too_long = "x" * (store.max_note_chars + 1)
    out = api["label_left"]("", too_long, st["pair_id"], st, page)
    assert out[11] == gr.update() and out[13].startswith("⚠ Not saved") and store.labels() == []
    assert out[0]["pair_id"] == st["pair_id"] == "p000"
    assert store.next_item("bob").pair_id == "p001"
    out = api["label_left"]("", "short", out[0]["pair_id"], out[0], page)
    assert "within 10 min" in out[4]["value"] and "1 pair(s) are open with others" in out[4]["value"]


def test_the_progress_line_s_bars_by_hand():
    """Mine: 2 labeled of 2 + 1 still open; overall: 1 of 4 pairs done (25%), whatever the 3 labels (overlap 2)."""
    from stages.label.app import progress_html

    line = progress_html({"pairs": 4, "pairs_done": 1, "labels": 3, "overlap": 2, "mine": 2, "open_to_me": 1}, "ann")
    assert '<progress max="3" value="2"></progress>' in line
    assert "1 of 4 pairs done</b> (25%) · 3 labels · overlap 2" in line and '<progress max="4" value="1">' in line


def test_a_store_with_no_servable_pair_shows_no_share_done(tmp_path):
    """Every pair held back by the word filter: 0 of 0 done is no share of anything (not "100%"), and both bars are
    empty (max 1, value 0), not a division by zero."""
    from stages.label.app import progress_html

    s = LabelStore(tmp_path / "labels.sqlite", overlap=1, lease_s=60, clock=Clock())
    assert s.import_items(pairs(2), lambda row: "blocked") == {"items": 2, "blocked": 2}
    assert progress_html(s.progress("ann"), "ann") == (
        '<div>Yours (ann): <b>0 labeled</b> · 0 still open to you</div><progress max="1" value="0"></progress>'
        '<div>Overall: <b>0 of 0 pairs done</b> (no pairs to label) · 0 labels · overlap 1</div>'
        '<progress max="1" value="0"></progress>')


def test_a_store_with_no_servable_pair_says_so_not_all_done(tmp_path):
    """An annotator who starts on a store whose every pair the word filter held back is told there is nothing to label
    and why (not "All done ✓ ... you labeled 0 pair(s)", which thanks them for work that never was); a store with pairs
    to serve, all of them labeled, still says All done."""
    from types import SimpleNamespace

    store = LabelStore(tmp_path / "labels.sqlite", overlap=1, lease_s=60, clock=Clock())
    store.import_items(pairs(2), lambda row: "blocked")
    screen = app_handlers(store, use_login=False)["start"]("ann", {}, SimpleNamespace(username=None))[4]["value"]
    assert screen == ("<h3>No pairs to label</h3><p>This labeling store has no pair to serve. The word filter holds "
                      "back all 2 pair(s) it has: whoever runs `make label` can change `offensive_words` or "
                      "`filter_offensive` in the label config and start it again.</p>")
    other = LabelStore(tmp_path / "other.sqlite", overlap=1, lease_s=60, clock=Clock())
    other.import_items(pairs(1))
    api, page = app_handlers(other, use_login=False), SimpleNamespace(username=None)
    st = api["start"]("ann", {}, page)[0]
    assert api["label_left"]("", "", st["pair_id"], st, page)[4]["value"].startswith("<h3>All done ✓</h3>")


def test_prompts_and_responses_reach_the_page_as_text():
    """A response or prompt is data: its markup is shown, escaped, never drawn (the browser test shows it on a page)."""
    import html

    from stages.label.app import prompt_html, text_html

    assert text_html(HOSTILE) == f'<div class="plain">{html.escape(HOSTILE)}</div>'
    shown = prompt_html([{"role": "user", "content": HOSTILE}])
    assert "<img" not in shown and "<b>eve" not in shown and html.escape(HOSTILE) in shown


def test_a_hostname_is_not_loopback_and_a_login_needs_a_password():
    """Only 127.0.0.0/8, ::1 and 'localhost' serve without logins: a hostname may resolve to any interface. A users
    entry with an empty password (`alice:`) is refused, not a login anyone can use."""
    from pipeline.config import ConfigError
    from stages.label.config import is_loopback

    assert is_loopback("localhost") and is_loopback("127.0.0.2") and is_loopback("::1")
    for host in ("labeler.example.org", "my-laptop", "0.0.0.0", "10.0.0.5"):
        assert not is_loopback(host)
        with pytest.raises(ConfigError, match=f"refusing to start the labeling UI on {host} without authentication"):
            check_exposure(host, [])
    for entry in ("alice:", "alice: ,bob:pw"):
        with pytest.raises(ConfigError, match=r"^bad user entry \(entry 1 of \$LABEL_USERS\): write `name:password`, "
                                              r"a name and a password;"):
            load_users(None, env={"LABEL_USERS": entry})


def test_an_overlap_below_one_is_refused(tmp_path):
    """overlap is how many annotators label each pair: 0 would serve no pair to anyone."""
    from stages.label.config import LabelArgs

    with pytest.raises(ValueError, match="overlap must be at least 1, got 0"):
        LabelArgs(overlap=0)
    assert LabelArgs(overlap=1).overlap == 1
    with pytest.raises(ValueError, match="overlap must be at least 1, got 0"):  # the store refuses it too
        LabelStore(tmp_path / "o.sqlite", overlap=0)
    assert not (tmp_path / "o.sqlite").exists()
    with pytest.raises(ValueError, match=r"max_note_chars must be 1 or more \(a note is optional\), got 0"):
        LabelArgs(max_note_chars=0)  # a note box "up to 0 characters" that refused every note
    assert LabelArgs(max_note_chars=1).max_note_chars == 1


def test_min_agreement_outside_0_1_is_refused():
    """A majority share is at most 1: min_agreement 1.5 would drop every pair and export nothing, without a word."""
    from stages.label.config import LabelArgs

    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=f"min_agreement must be between 0 and 1, got {bad}"):
            LabelArgs(min_agreement=bad)
    assert LabelArgs(min_agreement=1.0).min_agreement == 1.0 and LabelArgs(min_agreement=0).min_agreement == 0


def test_export_policies_outside_their_choices_are_refused():
    """A typo in ties, both_bad, earlier_pairs or sources is one clear error, not a policy silently read as another."""
    from stages.label.config import LabelArgs

    for field, bad in (("ties", "keep"), ("both_bad", "keep"), ("earlier_pairs", "all"), ("sources", "humans")):
        with pytest.raises(ValueError, match=f"{field} must be one of .*, got '{bad}'"):
            LabelArgs(**{field: bad})


def test_a_restart_on_a_new_pairs_file_takes_its_order_and_its_word_filter_and_drops_leases_of_pairs_left_out(tmp_path):
    """The app started again on another pairs file: the pairs it still holds come in the new file's order, the word
    filter of this start decides which are held back (a word taken off the list frees its pairs, a new word holds
    others back), and a lease on a pair the new file leaves out is not served any more."""
    s = LabelStore(tmp_path / "f.sqlite")
    s.import_items(pairs(4), lambda row: "word" if row["pair_id"] == "p001" else None)
    assert s.servable_pairs() == ["p000", "p002", "p003"]
    assert s.next_item("alice").pair_id == "p000"  # alice holds a lease on p000
    rows = pairs(4)
    s.import_items([rows[3], rows[1], rows[2]], lambda row: "word" if row["pair_id"] == "p002" else None)
    assert s.servable_pairs() == ["p003", "p001"] and (s.progress()["pairs"], s.progress()["blocked"]) == (2, 1)
    assert s.next_item("alice").pair_id == "p003"  # not p000, which the new file leaves out
    s.import_items([rows[3]])  # p002, still blocked by its word, is left out: no longer held back from anyone
    assert (s.progress()["pairs"], s.progress()["blocked"]) == (1, 0)


def test_undo_of_a_change_brings_back_the_side_shown_with_the_choice(store):
    """A change made on the other layout (response 1 on the left) and undone: the label is again "left" as shown with
    response 0 on the left, so response 0 wins, as first given."""
    store.save_label("alice", "p000", "left", 0)
    store.save_label("alice", "p000", "left", 1)
    assert store.undo("alice") == ("p000", "change")
    back = store.reopen("alice", "p000").label
    assert (back["choice"], back["shown_left"], back["preferred"]) == ("left", 0, 0)


def test_the_digest_read_back_follows_the_labels_order_and_my_labels_stop_at_the_limit(store):
    """store_digest reads the labels in the order labels() gives them (the order they were first given, not their
    pair ids'), so an export of them stays current; my_labels gives the newest `limit` only."""
    from stages.label.store import labels_digest, store_digest

    store.clock.t += 1
    store.save_label("alice", "p002", "left", 0)
    store.clock.t += 1
    store.save_label("alice", "p000", "right", 1)
    store.clock.t += 1
    store.save_label("alice", "p001", "tie", 0)
    assert [lab["pair_id"] for lab in store.labels()] == ["p002", "p000", "p001"]
    assert store_digest(store.path) == labels_digest(store.labels())
    assert [m["pair_id"] for m in store.my_labels("alice", limit=2)] == ["p001", "p000"]


def test_others_leases_count_as_held_only_until_they_expire(store):
    assert store.next_item("alice").pair_id == "p000"  # a lease of 60 s
    store.clock.t += 59
    assert store.progress("bob")["held_by_others"] == 1
    store.clock.t += 1
    assert store.progress("bob")["held_by_others"] == 0


def test_held_by_others_counts_only_pairs_that_can_come_back(tmp_path):
    """The done screen says "N pair(s) are open with others; they come back here if not answered": a pair you labeled
    or skipped, held by someone else, never comes back to you, and was counted. Mutant: every live lease of another
    counted."""
    two = LabelStore(tmp_path / "two.sqlite", overlap=2, lease_s=60, clock=Clock())
    two.import_items(pairs(1))
    item = two.next_item("alice")
    two.save_label("alice", item.pair_id, "left", item.shown_left)
    assert two.next_item("bob").pair_id == item.pair_id  # bob holds it: alice is done with it
    assert two.progress("alice")["held_by_others"] == 0 and two.progress("carol")["held_by_others"] == 1
    one = LabelStore(tmp_path / "one.sqlite", overlap=1, lease_s=60, clock=Clock())
    one.import_items(pairs(1))
    item = one.next_item("alice")
    one.skip("alice", item.pair_id)
    assert one.next_item("bob").pair_id == item.pair_id
    assert one.progress("alice")["held_by_others"] == 0 and one.progress("carol")["held_by_others"] == 1


def test_a_failed_write_rolls_back_what_its_transaction_wrote_and_a_removal_is_in_the_history(store):
    """save_simulated writes all its labels in one transaction: a bad one in the middle (an unknown choice) raises and
    leaves the store as it was, the labels before it too. Removing a simulator's labels keeps a
    'remove' row per label in the history."""
    store.save_simulated([], [("sim:a", "p000", "left", 0), ("sim:a", "p001", "right", 1)])
    before = (store.labels(), store.history())
    with pytest.raises(ValueError, match="choice must be one of"):
        store.save_simulated(["sim:a"], [("sim:b", "p002", "left", 0), ("sim:b", "p003", "sideways", 0)])
    assert (store.labels(), store.history()) == before
    assert store.save_simulated(["sim:a"], []) == 2 and store.labels() == []
    assert [(h["action"], h["pair_id"]) for h in store.history("sim:a")] == [
        ("new", "p000"), ("new", "p001"), ("remove", "p000"), ("remove", "p001")]


def test_agreement_edges_the_exact_binomial_the_rate_to_a_tenth_and_the_agreement_html_by_hand():
    """A kappa of raters over different numbers of items is undefined, and so is an alpha without variation (every
    value the same: no division by zero); from 11 to 1000 decided labels the p-value is the exact two-sided sum,
    2 * (C(20,15) + ... + C(20,20)) / 2**20 = 0.0414 (the normal approximation would say 0.025); a rate is to a tenth
    (2 labels 0.3 h apart: 6.7 an hour). The Stats tab shows each annotator pair's kappa in its table (numbers right
    aligned) and the people-vs-simulated agreement line."""
    from stages.label.stats import stats_view, to_html

    assert cohen_kappa(list("ab"), list("abb")) is None
    assert krippendorff_alpha([["a", "a"], ["a", "a", "a"]]) is None
    assert binomial_two_sided_p(15, 20) == pytest.approx(2 * (15504 + 4845 + 1140 + 190 + 20 + 1) / 2**20, rel=1e-12)
    two = [lab("p0", "ann", "left", 0, t=0), lab("p1", "ann", "left", 0, t=1080)]
    assert summarize(two, now=2000)["annotators"]["ann"]["labels_per_hour"] == 6.7
    # ann: 0, 1; bob: 0, 0 -> p_o = 1/2, p_e = (1 * 2) / 4 = 1/2, kappa 0 over 2 shared pairs; the simulator agrees
    # with both people on p0: 2 label pairs, 100%
    labels = [lab("p0", "ann", "left", 0), lab("p0", "bob", "right", 0), lab("p1", "ann", "left", 1),
              lab("p1", "bob", "left", 0), lab("p0", "sim:x", "right", 0)]
    shown = to_html(stats_view(labels, now=1), overlap=2)
    assert ('<tr><td>ann / bob</td><td style="text-align:right">0.0</td><td style="text-align:right">2</td></tr>'
            in shown)
    assert ("<p><b>People vs simulated annotators</b> (<code>sim:...</code>): 100% agreement on 1 pairs labeled by "
            "both (2 label pairs).</p>") in shown


def test_a_store_file_without_a_labels_table_reads_as_no_labels(tmp_path):
    """An SQLite file at the store's place that holds no labels table (a store killed before its schema was written)
    holds no labels: count_labels and store_digest say so, not that the store is damaged."""
    from stages.label.store import count_labels, labels_digest, store_digest

    db = tmp_path / "labels.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE other (x)")
    con.commit()
    con.close()
    assert count_labels(db) == 0 and store_digest(db) == labels_digest([])


def test_a_reading_connection_cannot_write_the_store(tmp_path):
    """The stages' reads of people's labels (count_labels, store_digest) go through a connection that writes nothing:
    a read-write one (which leaves no -wal and -shm files behind) is made query-only."""
    from stages.label.store import reading_connection

    db = tmp_path / "labels.sqlite"
    LabelStore(db).import_items(pairs(1))
    con = reading_connection(db)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            con.execute("DELETE FROM items")
    finally:
        con.close()
    assert LabelStore(db).servable_pairs() == ["p000"]


def test_the_stages_reads_of_the_store_leave_it_as_they_found_it(tmp_path, monkeypatch):
    """`make ppo` (and `make rm`) left labels.sqlite-wal and labels.sqlite-shm beside a store nobody had open, failed
    or not: the labels step's store_digest and the reward data's count_labels read it through a read-only connection,
    which makes those files and, read-only, does not remove them. Each read now leaves the folder and the store's
    bytes as they were, and still reads it all; through a folder it cannot write, read-only as before."""
    from stages.label.store import count_labels, labels_digest, store_digest

    db = tmp_path / "label" / "labels.sqlite"
    store = LabelStore(db)
    store.import_items(pairs(3))
    store.save_label("alice", "p000", "left", 0)
    store.save_label("bob", "p001", "right", 1, "much")
    expected_digest = labels_digest(store.labels())
    listing, data = sorted(p.name for p in db.parent.iterdir()), db.read_bytes()
    assert listing == ["labels.sqlite"]
    assert count_labels(db) == 2 and store_digest(db) == expected_digest
    assert sorted(p.name for p in db.parent.iterdir()) == listing and db.read_bytes() == data
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not (mode & os.W_OK and str(path) == str(db.parent))
                        and real_access(path, mode))  # a folder the stage cannot write: read-only
    assert count_labels(db) == 2 and store_digest(db) == expected_digest


@pytest.mark.parametrize("denied", ["labels.sqlite", "labels.sqlite-shm", "labels.sqlite-wal"])
def test_a_store_or_its_wal_files_this_process_cannot_write_are_refused_before_sqlite_opens_them(denied, tmp_path,
                                                                                                  monkeypatch):
    """A read-only store (a backup restored with its mode) was opened first: SQLite made its -wal and -shm files,
    read-only as the store, and once the store was made writable as the error said, the -shm alone failed every write
    with a traceback naming no file. Now the file is named, with the fix, before any connection (nothing is written);
    readers (count_labels) need only to read it. Unreadable: the fix names reading too (chmod u+w left it unreadable)."""
    from stages.label.store import count_labels

    db = tmp_path / "label" / "labels.sqlite"
    store = LabelStore(db)
    store.import_items(pairs(2))
    store.save_label("alice", "p000", "left", 0)
    for name in ("labels.sqlite-wal", "labels.sqlite-shm"):  # as a crash leaves them
        (db.parent / name).write_bytes(b"")
    listing = {p.name: p.read_bytes() for p in db.parent.iterdir()}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not (mode & os.W_OK and os.path.basename(path) == denied)
                        and real_access(path, mode))  # as a chmod 444 file to a non-root user
    with pytest.raises(ConfigError) as err:
        LabelStore(db)
    assert str(err.value) == (f"no access to {db.parent / denied}: make it readable and writable (chmod u+rw "
                              f"{db.parent / denied}), and run the same command again")
    assert {p.name: p.read_bytes() for p in db.parent.iterdir()} == listing
    assert count_labels(db) == 1  # its last connection removed the -wal and -shm: as a crash leaves them again
    for name in ("labels.sqlite-wal", "labels.sqlite-shm"):
        (db.parent / name).write_bytes(b"")
    monkeypatch.setattr(os, "access", lambda path, mode: not (mode & os.R_OK and os.path.basename(path) == denied)
                        and real_access(path, mode))  # chmod 000
    with pytest.raises(ConfigError, match=rf"no access to .*{denied}: make it readable \(chmod u\+r "):
        count_labels(db)


def people_column(path) -> dict:
    con = sqlite3.connect(path)
    try:
        return dict(con.execute("SELECT pair_id, people FROM items ORDER BY position").fetchall())
    finally:
        con.close()


def test_each_pairs_people_count_follows_every_label_written_and_taken_back(tmp_path):
    """items.people (what the next pair and the progress figures read) counts people's labels of a pair: a label,
    a changed mind (no new person), an undo, and simulated labels (no person) and their removal, by hand."""
    path = tmp_path / "labels.sqlite"
    store = LabelStore(path, overlap=2, clock=Clock())
    store.import_items(pairs(3))
    store.save_label("alice", "p000", "left", 0)
    store.save_label("bob", "p000", "right", 0)
    store.save_label("alice", "p000", "tie", 0)  # alice changes her mind: still two people
    store.save_label("bob", "p001", "left", 0)
    store.save_simulated([], [("sim:sentiment", "p001", "left", 0), ("sim:sentiment", "p002", "right", 1)])
    assert people_column(path) == {"p000": 2, "p001": 1, "p002": 0}
    assert store.undo("bob") is not None  # bob's p001 label
    store.save_simulated(["sim:sentiment"], [])
    assert people_column(path) == {"p000": 2, "p001": 0, "p002": 0}
    assert store.progress() | {"overlap": None} == {"pairs": 3, "blocked": 0, "labels": 2, "pairs_done": 1,
                                                   "overlap": None}


def test_a_store_of_an_earlier_version_gets_its_people_counts(tmp_path):
    """A store written before items.people existed: opened, the column is added and counted from its labels once,
    and the next pair is the one a pair's count orders first (the started pair, so that overlap sets complete)."""
    path = tmp_path / "labels.sqlite"
    store = LabelStore(path, overlap=2, clock=Clock())
    store.import_items(pairs(3))
    store.save_label("alice", "p002", "left", 0)
    store.save_label("bob", "p002", "left", 0)
    store.save_label("carol", "p001", "left", 0)
    store.save_simulated([], [("sim:sentiment", "p000", "left", 0)])
    con = sqlite3.connect(path)
    con.executescript("DROP TRIGGER people_count_up; DROP TRIGGER people_count_down; DROP INDEX servable_by_people; "
                      "ALTER TABLE items DROP COLUMN people;")
    con.close()
    again = LabelStore(path, overlap=2, clock=Clock())
    assert people_column(path) == {"p000": 0, "p001": 1, "p002": 2}
    assert again.next_item("dave").pair_id == "p001"  # p002 is full; carol's p001 before the untouched p000
    again.save_label("dave", "p001", "left", 0)
    assert people_column(path)["p001"] == 2  # the triggers are back too


def test_the_next_pair_and_the_progress_read_indexes_not_every_pair(tmp_path):
    """On a store of many pairs each click ran queries over every pair (1.4 s a click at 50,000 pairs, the write lock
    held 0.3 s of it): the serving order and the counts read the partial index, and one's own labels their index."""
    from stages.label.store import CANDIDATES

    store = LabelStore(tmp_path / "labels.sqlite", overlap=2, clock=Clock())
    store.import_items(pairs(3))
    con = sqlite3.connect(tmp_path / "labels.sqlite")
    try:
        plan = lambda sql, *args: " ".join(r[-1] for r in con.execute("EXPLAIN QUERY PLAN " + sql, args))  # noqa: E731
        candidates = plan(CANDIDATES + " LIMIT 1", "alice", 0.0, 2)
        # a range of the index (the pairs not full yet), in serving order: no full pair walked, no sort
        assert "SEARCH i USING INDEX servable_by_people (people<?)" in candidates, candidates
        assert "USE TEMP B-TREE FOR ORDER BY" not in candidates, candidates
        assert "servable_by_people" in plan("SELECT COUNT(*) FROM items WHERE active = 1 AND blocked IS NULL "
                                            "AND people >= ?", 2)
        assert "labels_by_annotator" in plan("SELECT pair_id FROM labels WHERE annotator = ? "
                                             "ORDER BY updated_at DESC LIMIT 5", "alice")
    finally:
        con.close()


def test_labels_without_text_are_the_labels_less_their_texts(store):
    """What the Stats tab reads: every label's fields but the prompt and responses."""
    store.save_label("alice", "p000", "left", 0, "much", "why")
    store.save_label("bob", "p001", "tie", 1)
    whole = store.labels()
    assert whole[0]["prompt"] == [{"role": "user", "content": "question 0"}]
    assert store.labels(with_text=False) == [{k: v for k, v in lab.items() if k not in ("prompt", "responses")}
                                             for lab in whole]
