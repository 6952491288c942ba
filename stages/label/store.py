"""The label store: one SQLite file per run (runs/<RUN>/label/labels.sqlite), the only state the labeling app keeps.

People spend hours on these labels, so the rules are strict:
- WAL mode + synchronous=FULL: a label is on disk when its transaction commits; the UI acknowledges it only after.
  A `kill -9` of the app at any moment loses at most the click that was not yet acknowledged.
- One `BEGIN IMMEDIATE` transaction per label (the label, its history row, the lease release), busy_timeout for
  the many annotators who write at once; every call opens its own connection (Gradio runs handlers in threads).
- UNIQUE(pair_id, annotator): a changed mind is an UPDATE (revision + 1); every version is kept in label_history.
- Assignment by lease: a pair is handed to at most `overlap` annotators at once (labels + live leases), and a lease
  not answered within `lease_s` expires, so the pair goes back to the pool.
- A file that is not an SQLite database (garbage, or 0 bytes: most likely truncated) is refused, never overwritten;
  one app at a time serves a store (`lock_store`), and a note is at most `max_note_chars` long.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable

from pipeline.config import ConfigError
from pipeline.data import role_problem

SQLITE_HEADER = b"SQLite format 3\x00"
CHOICES = ("left", "right", "tie", "both_bad")
STRENGTHS = ("slightly", "much")
# Simulated annotators (make simulate) are named sim:<judge>[-k]. People's names cannot hold ':' (the app's name rule;
# a login is the part of a `name:password` line before the ':'), so nobody labels under a simulator's name.
SIMULATED_PREFIX = "sim:"


def is_simulated(annotator: str) -> bool:
    return annotator.startswith(SIMULATED_PREFIX)


SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    pair_id    TEXT PRIMARY KEY,
    position   INTEGER NOT NULL,              -- row in the pairs dataset: the serving order
    prompt     TEXT NOT NULL,                 -- JSON: [{"role", "content"}, ...]
    responses  TEXT NOT NULL,                 -- JSON: [response_0, response_1]
    active     INTEGER NOT NULL DEFAULT 1,    -- in the pairs dataset the app was last started on
    blocked    TEXT,                          -- the filter word that keeps it from annotators, else NULL
    added_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    id          INTEGER PRIMARY KEY,
    pair_id     TEXT NOT NULL REFERENCES items(pair_id),
    annotator   TEXT NOT NULL,
    choice      TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'both_bad')),  -- the side clicked
    shown_left  INTEGER NOT NULL CHECK (shown_left IN (0, 1)),   -- which response was shown on the left
    preferred   INTEGER CHECK (preferred IN (0, 1)),             -- winning response index; NULL for tie/both_bad
    strength    TEXT CHECK (strength IN ('slightly', 'much')),
    note        TEXT NOT NULL DEFAULT '',
    revision    INTEGER NOT NULL DEFAULT 1,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    UNIQUE (pair_id, annotator)
);
CREATE TABLE IF NOT EXISTS label_history (
    id          INTEGER PRIMARY KEY,
    action      TEXT NOT NULL,                -- new | change | undo | skip | remove (a simulator's, on rerun)
    pair_id     TEXT NOT NULL,
    annotator   TEXT NOT NULL,
    choice      TEXT, shown_left INTEGER, preferred INTEGER, strength TEXT, note TEXT,
    undone      INTEGER NOT NULL DEFAULT 0,   -- a new/change row taken back by an undo
    at          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_annotator ON label_history (annotator, id);
CREATE TABLE IF NOT EXISTS assignments (
    pair_id     TEXT NOT NULL,
    annotator   TEXT NOT NULL,
    shown_left  INTEGER NOT NULL,
    assigned_at REAL NOT NULL,
    expires_at  REAL NOT NULL,
    PRIMARY KEY (pair_id, annotator)
);
CREATE TABLE IF NOT EXISTS skips (
    pair_id   TEXT NOT NULL,
    annotator TEXT NOT NULL,
    at        REAL NOT NULL,
    PRIMARY KEY (pair_id, annotator)
);
"""

# `overlap` shares pairs out among people: a label row `l` of a simulated annotator (make simulate labels every pair)
# takes no person's place, so it counts towards no pair's overlap.
def is_person(row: str) -> str:
    """SQL: the label row `row` (an alias, or a trigger's NEW or OLD) is a person's, not a simulated annotator's."""
    return f"substr({row}.annotator, 1, {len(SIMULATED_PREFIX)}) != '{SIMULATED_PREFIX}'"


PERSON = is_person("l")


def others_on(pair: str) -> str:
    """SQL: how many people other than :me are on `pair` now (their labels + their live leases), the count that
    `overlap` caps together with :me's own lease or label."""
    return (f"((SELECT COUNT(*) FROM labels l WHERE l.pair_id = {pair} AND l.annotator != :me AND {PERSON})"
            f" + (SELECT COUNT(*) FROM assignments a WHERE a.pair_id = {pair} AND a.annotator != :me"
            f" AND a.expires_at > :now))")


# A pair this annotator may get: not blocked, not labeled or skipped by them, and fewer than `overlap` people
# on it (labels + live leases of others). Pairs already started by others come first, so overlap sets complete.
CANDIDATES = """
SELECT i.pair_id FROM items i
WHERE i.active = 1 AND i.blocked IS NULL
  AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = i.pair_id AND l.annotator = :me)
  AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.pair_id = i.pair_id AND s.annotator = :me)
  AND i.people < :overlap  -- implied by the next line; a range of the index, so full pairs are not walked
  AND i.people + (SELECT COUNT(*) FROM assignments a WHERE a.pair_id = i.pair_id AND a.annotator != :me
                    AND a.expires_at > :now) < :overlap
ORDER BY i.people DESC, i.position
"""

# items.people: how many people (not simulated annotators) labeled the pair, kept by triggers on every label written
# or deleted. The next pair and the progress figures read it and a partial index in serving order, where they counted
# each pair's labels: with 50,000 pairs a click took 1.4 s, holding the write lock 0.3 s while every other annotator
# waited (past SQLite's 30 s timeout their labels were lost: "database is locked").
PEOPLE_COUNT = (
    f"CREATE TRIGGER IF NOT EXISTS people_count_up AFTER INSERT ON labels WHEN {is_person('NEW')}"
    " BEGIN UPDATE items SET people = people + 1 WHERE pair_id = NEW.pair_id; END",
    f"CREATE TRIGGER IF NOT EXISTS people_count_down AFTER DELETE ON labels WHEN {is_person('OLD')}"
    " BEGIN UPDATE items SET people = people - 1 WHERE pair_id = OLD.pair_id; END",
    "CREATE INDEX IF NOT EXISTS servable_by_people ON items (people DESC, position, pair_id) "
    "WHERE active = 1 AND blocked IS NULL",
    "CREATE INDEX IF NOT EXISTS labels_by_annotator ON labels (annotator, updated_at)",
)


def add_people_count(con: sqlite3.Connection) -> None:
    """items.people and what keeps it (PEOPLE_COUNT); a store of an earlier version gets the column, counted once."""
    con.execute("BEGIN IMMEDIATE")
    try:
        if "people" not in {r[1] for r in con.execute("PRAGMA table_info(items)")}:
            con.execute("ALTER TABLE items ADD COLUMN people INTEGER NOT NULL DEFAULT 0")
            con.execute(f"UPDATE items SET people = (SELECT COUNT(*) FROM labels l WHERE l.pair_id = items.pair_id "
                        f"AND {PERSON})")
        for statement in PEOPLE_COUNT:
            con.execute(statement)
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


@dataclass
class Item:
    pair_id: str
    prompt: list[dict]
    responses: list[str]
    shown_left: int  # index of the response on the left; the right one is 1 - shown_left
    label: dict | None = None  # this annotator's current label, when reopened to change it

    @property
    def left(self) -> str:
        return self.responses[self.shown_left]

    @property
    def right(self) -> str:
        return self.responses[1 - self.shown_left]


class NoteTooLong(ValueError):
    """A note beyond the store's limit: refused, so one paste cannot grow the store (and its history) without bound."""


def pair_problem(row) -> str | None:
    """What makes a row unusable as a pair to label (None: usable): the one rule both the loader and the store apply."""
    if not isinstance(row, dict):
        return f"a pair must be a JSON object, got {type(row).__name__}"
    missing = [k for k in ("pair_id", "prompt", "responses") if k not in row]
    if missing:
        return f"missing key(s) {missing}"
    pair_id, prompt, responses = row["pair_id"], row["prompt"], row["responses"]
    if not isinstance(pair_id, str) or not pair_id.strip():
        return f"pair_id must be a non-empty string, got {_short(pair_id)}"
    if not isinstance(prompt, list) or not prompt:
        return f"prompt must be a non-empty list of messages ({{\"role\", \"content\"}}), got {_short(prompt)}"
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"each prompt message must be {{\"role\": text, \"content\": text}}, got {_short(m)}"
        problem = role_problem(m["role"])  # as the reward model will read the export: refused before anyone labels
        if problem:
            return problem
    if not any(m["content"].strip() for m in prompt):  # as the pairs and PPO stages refuse it
        return "every message of the prompt is empty"
    if not isinstance(responses, list) or len(responses) != 2 or not all(isinstance(r, str) for r in responses):
        return f"responses must be a list of exactly 2 texts (the UI compares two), got {_short(responses)}"
    texts = [pair_id, *responses, *(m["role"] for m in prompt), *(m["content"] for m in prompt)]
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): neither SQLite nor the browser can hold it
        return "a text holds an unpaired surrogate (\\udXXX escape), which is not valid Unicode"
    return None


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=True, default=lambda o: type(o).__name__)
    return text if len(text) <= limit else text[:limit] + "..."


def check_store_file(path: Path, writing: bool = False) -> None:
    """Refuse, before anything writes to it, a file at `path` that is not an SQLite database, or that this process
    cannot read (or, `writing`, write): it, or the -wal and -shm files beside it.

    SQLite would take a 0-byte file as a new empty store (and start writing into it): a label store is never empty on
    disk once created, so 0 bytes means a truncated copy or a failed restore, and people's labels may be elsewhere.
    A read-only store was opened first: SQLite made its -wal and -shm files, read-only as the store, and once the store
    was made writable the -shm alone failed every write (a traceback, the file named nowhere).
    """
    if not path.exists():
        return
    if not path.is_file():
        raise ConfigError(f"label store {path} is not a file: move it away")
    need, how = (os.R_OK | os.W_OK, "readable and writable") if writing else (os.R_OK, "readable")
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and not os.access(file, need):
            raise ConfigError(f"no access to {file}: make it {how} (chmod u+{'rw' if writing else 'r'} {file}), and "
                              f"run the same command again")
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if not header:
        raise ConfigError(f"label store {path} is empty (0 bytes): most likely a truncated copy. Restore it from a "
                          f"backup, or delete it to start a new store")
    if header != SQLITE_HEADER:
        raise ConfigError(f"label store {path} is not an SQLite database (corrupted or another file): restore it from "
                          f"a backup, or move it away to start a new store")


def lock_store(path: Path, then: str = "use that one, or stop it first (each run's label store is served by one "
                                       "app at a time)") -> IO:
    """Hold `<store>.lock` for as long as the returned file is open: one labeling app (or simulator) per store.

    A second `make label` on the same run would otherwise re-import its pairs into the live store before failing
    on the port; `make simulate` would re-import its pairs under the annotators' feet. The lock is taken before
    anything is written, and the kernel drops it when the process dies. `then`: what the refusal tells the user.
    """
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock_path, "a+")  # no truncation: the holder's pid stays readable for the error message
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise ConfigError(f"another labeling app (pid {holder}) is serving {path}: {then}") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def disk_error(err: sqlite3.Error, path: Path) -> OSError | None:
    """The disk fault behind SQLite's error on the store at `path`, as the OSError that pipeline.run.disk_problem turns
    into one line naming the store and the fix (free space, make it writable); None for any other error. SQLite says
    only "database or disk is full" or "unable to open database file", which read as a damaged store: its fix,
    "restore it from a backup", sent people after a backup of labels that were whole. A real full disk seldom reaches
    SQLite as SQLITE_FULL: each transaction opens the store again, and the -shm file the last one deleted cannot be
    sized (SQLITE_IOERR_SHMSIZE) or the WAL cannot grow (SQLITE_IOERR_WRITE), both "disk I/O error": such an error on a
    disk out of room (pipeline.run.out_of_room) is a full disk."""
    from pipeline.run import out_of_room, read_only

    code = (getattr(err, "sqlite_errorcode", None) or 0) & 0xFF  # the primary code of an extended one
    folder = path.parent if path.parent.is_dir() else None
    if code == sqlite3.SQLITE_IOERR and folder is not None and out_of_room(folder):  # a full disk's "disk I/O error"
        code = sqlite3.SQLITE_FULL
    if code == sqlite3.SQLITE_FULL:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    writable = folder is not None and os.access(folder, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN) and folder is not None and not writable:
        code = errno.EROFS if read_only(folder) else errno.EACCES
        return OSError(code, os.strerror(code), str(path))
    return None


def reading_connection(path: Path) -> sqlite3.Connection:
    """A connection that reads the existing store at `path` and writes nothing to it (query_only), and that leaves it
    as it found it. A read-only connection (mode=ro) makes the WAL store's -wal and -shm files and, being read-only,
    may not remove them as the last connection to close: each `make rm` and `make ppo` (the labels step's
    store_digest, the reward data's count_labels) left labels.sqlite-wal and -shm beside a store nobody had open. A
    read-write one removes them (as the labeling app's do). mode=ro only where the store's folder cannot be written,
    and so cannot have gained them."""
    writable = os.access(path.parent, os.W_OK)
    con = sqlite3.connect(f"file:{path}?mode={'rw' if writable else 'ro'}", uri=True, timeout=30.0)
    try:
        con.execute("PRAGMA query_only=ON")
    except BaseException:
        con.close()
        raise
    return con


def unreadable_store(err: sqlite3.DatabaseError, path: Path) -> ConfigError:
    """Why a read of the store failed, in one line: a full or read-only disk as such (disk_error; on a full disk
    SQLite says "disk I/O error", and the line sent people to restore whole labels from a backup), else damage."""
    from pipeline.run import disk_problem

    disk = disk_error(err, path)
    if disk is not None:
        return ConfigError(disk_problem(disk))
    return ConfigError(f"label store {path} cannot be read ({err}): restore it from a backup")


def count_labels(path: Path) -> int:
    """How many labels a store holds, read only (0 when there is no store). For stages that must not miss them."""
    path = Path(path)
    if not path.is_file():
        return 0
    check_store_file(path)
    try:
        con = reading_connection(path)
        try:
            has_table = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'labels'").fetchone()
            return con.execute("SELECT COUNT(*) FROM labels").fetchone()[0] if has_table else 0
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        raise unreadable_store(err, path) from None


# Beside the export's manifest, not in it: the store state (and the files) the export is known to hold. Rewriting it
# when the store changed but the rows did not leaves the manifest, and so the reward model that read it, current.
STORE_RECORD = "store_digest.json"

# What a label export depends on in the store: every label's pair, annotator, choice, side and strength,
# and whether its pair is current. Equal digests: an export of the store now would hold the same rows.
DIGEST_FIELDS = ("pair_id", "annotator", "choice", "shown_left", "strength", "current")


def labels_digest(labels: Iterable[dict]) -> str:
    """A digest of the labels as `LabelStore.labels()` returns them (the export records it, `store_digest` reads it
    back without loading prompts), in the store's order."""
    h = hashlib.sha256()
    for lab in labels:
        h.update(json.dumps([lab[k] for k in DIGEST_FIELDS]).encode())
    return h.hexdigest()


def store_digest(path: Path) -> str:
    """`labels_digest` of the store at `path`, read only (the empty digest when there is no store or no label yet)."""
    path = Path(path)
    if not path.is_file():
        return labels_digest([])
    check_store_file(path)
    try:
        con = reading_connection(path)
        con.row_factory = sqlite3.Row
        try:
            if not con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'labels'").fetchone():
                return labels_digest([])
            rows = con.execute("SELECT l.pair_id, l.annotator, l.choice, l.shown_left, l.strength, "
                               "i.active FROM labels l JOIN items i USING (pair_id) ORDER BY l.id").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        raise unreadable_store(err, path) from None
    return labels_digest({**dict(r), "current": bool(r["active"])} for r in rows)


def preferred_index(choice: str, shown_left: int) -> int | None:
    """Map the side clicked back to the response index: the one fact the export needs."""
    if choice == "left":
        return shown_left
    if choice == "right":
        return 1 - shown_left
    return None


def drop_new_store(path: Path) -> None:
    """Delete the store files that opening a new store at `path` created before the disk refused it (no label in them)."""
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        (path.parent / name).unlink(missing_ok=True)


class LabelStore:
    def __init__(self, path: str | Path, overlap: int = 1, lease_s: float = 900.0, seed: int = 0,
                 clock: Callable[[], float] = time.time, max_note_chars: int = 2000):
        if overlap < 1:
            raise ValueError(f"overlap must be at least 1, got {overlap}")
        self.path = Path(path)
        self.overlap, self.lease_s, self.seed, self.clock = overlap, lease_s, seed, clock
        self.max_note_chars = max_note_chars
        check_store_file(self.path, writing=True)
        existed = self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = self._connect()
            try:
                if existed and con.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("integrity check failed")
                con.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
                con.executescript(SCHEMA)
                add_people_count(con)
            finally:
                con.close()
        except sqlite3.DatabaseError as err:
            disk = disk_error(err, self.path)
            if disk is None:  # a valid header over damaged pages
                raise ConfigError(f"label store {self.path} is damaged ({err}): restore it from a backup") from None
            if not existed:  # the 0-byte file a full disk left would be refused as a truncated store once freed
                drop_new_store(self.path)
            raise disk from err

    # -- plumbing -------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)  # we issue BEGIN/COMMIT ourselves
        con.row_factory = sqlite3.Row
        try:  # the first statement makes the -shm file the last connection deleted: a full disk refuses it here
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA synchronous=FULL")  # fsync the WAL at each commit: survives power loss, not only kill -9
            con.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            con.close()
            raise
        return con

    @contextmanager
    def _tx(self):
        """One write transaction. IMMEDIATE takes the write lock up front, so two claims cannot interleave."""
        con = None
        try:
            con = self._connect()
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                if con.in_transaction:  # SQLite rolls back by itself on a full disk; a ROLLBACK then hid why
                    con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        except sqlite3.DatabaseError as err:  # a full or read-only disk: nothing of the transaction was stored
            raise (disk_error(err, self.path) or err) from err
        finally:
            if con is not None:
                con.close()

    @contextmanager
    def _read(self):
        try:
            con = self._connect()
        except sqlite3.DatabaseError as err:  # a full disk refuses even a read its -shm file (_connect)
            raise (disk_error(err, self.path) or err) from err
        try:
            yield con
        finally:
            con.close()

    def journal_mode(self) -> str:
        with self._read() as con:
            return con.execute("PRAGMA journal_mode").fetchone()[0]

    # -- items ----------------------------------------------------------------------------------------------
    def import_items(self, rows: Iterable[dict], blocked: Callable[[dict], str | None] = lambda row: None) -> dict:
        """Load the pairs the app serves. Pairs from an earlier pairs dataset stay (with their labels), inactive.

        Every row is checked before the transaction starts: a bad row or a repeated pair_id changes nothing.
        """
        rows, seen = list(rows), set()
        for position, row in enumerate(rows):
            problem = pair_problem(row)
            if problem is None and row["pair_id"] in seen:
                problem = f"pair_id {row['pair_id']!r} appears twice"
            if problem:
                raise ValueError(f"pair at position {position}: {problem}")
            seen.add(row["pair_id"])
        self.check_labeled_text(rows)
        now, n, n_blocked = self.clock(), 0, 0
        with self._tx() as con:
            con.execute("UPDATE items SET active = 0")
            for position, row in enumerate(rows):
                word = blocked(row)
                n_blocked += word is not None
                con.execute(  # a pair nobody labeled takes the file's text (check_labeled_text: a labeled one has it)
                    "INSERT INTO items (pair_id, position, prompt, responses, active, blocked, added_at) "
                    "VALUES (?, ?, ?, ?, 1, ?, ?) ON CONFLICT (pair_id) DO UPDATE SET position = excluded.position, "
                    "prompt = excluded.prompt, responses = excluded.responses, active = 1, blocked = excluded.blocked",
                    (row["pair_id"], position, json.dumps(row["prompt"]), json.dumps(list(row["responses"])), word, now))
                n += 1
        return {"items": n, "blocked": n_blocked}

    def check_labeled_text(self, rows: list[dict]) -> None:
        """Refuse a pairs file that gives a labeled pair's id to other text (a typo fixed in a file of your own ids):
        its labels were given on the old text, and the app and the export would otherwise serve the old text on."""
        with self._read() as con:
            labeled = {r["pair_id"]: r for r in con.execute(
                "SELECT i.pair_id, i.prompt, i.responses, COUNT(*) AS n FROM items i JOIN labels l USING (pair_id) "
                "GROUP BY i.pair_id")}
        for position, row in enumerate(rows):
            old = labeled.get(row["pair_id"])
            if old is not None and (json.loads(old["prompt"]), json.loads(old["responses"])) != (
                    row["prompt"], list(row["responses"])):
                raise ConfigError(
                    f"pair {row['pair_id']!r} (position {position} of the pairs) has another prompt or responses than "
                    f"the pair of that id in {self.path}, which holds {old['n']} label(s) given on the old text: give "
                    f"a changed pair a new pair_id")

    def shown_left(self, pair_id: str, annotator: str) -> int:
        """Left/right order per (pair, annotator): random-looking but fixed, so a reload shows the same layout."""
        digest = hashlib.sha256(f"{self.seed}\0{pair_id}\0{annotator}".encode()).digest()
        return digest[0] & 1

    def _item(self, con, pair_id: str, shown_left: int, label=None) -> Item:
        row = con.execute("SELECT prompt, responses FROM items WHERE pair_id = ?", (pair_id,)).fetchone()
        return Item(pair_id, json.loads(row["prompt"]), json.loads(row["responses"]), shown_left,
                    dict(label) if label is not None else None)

    # -- assignment -----------------------------------------------------------------------------------------
    def next_item(self, annotator: str) -> Item | None:
        """The pair this annotator should see now: the one they already hold, else a fresh lease; None = all done."""
        now = self.clock()
        with self._tx() as con:
            con.execute("DELETE FROM assignments WHERE expires_at <= ?", (now,))
            # A lease on a pair that others fill meanwhile (their labels and live leases: a late answer after a
            # timeout, a lower overlap since a restart) is no use any more: it would put one person too many on it.
            con.execute(f"DELETE FROM assignments WHERE annotator = :me AND {others_on('assignments.pair_id')} >= :overlap",
                        {"me": annotator, "now": now, "overlap": self.overlap})
            held = con.execute(
                "SELECT a.pair_id, a.shown_left FROM assignments a JOIN items i USING (pair_id) "
                "WHERE a.annotator = ? AND i.active = 1 AND i.blocked IS NULL AND NOT EXISTS "
                "(SELECT 1 FROM labels l WHERE l.pair_id = a.pair_id AND l.annotator = a.annotator) "
                "ORDER BY a.assigned_at DESC, a.rowid DESC LIMIT 1", (annotator,)).fetchone()  # newest: a pair just undone
            if held is not None:
                con.execute("UPDATE assignments SET expires_at = ? WHERE pair_id = ? AND annotator = ?",
                            (now + self.lease_s, held["pair_id"], annotator))
                return self._item(con, held["pair_id"], held["shown_left"])
            row = con.execute(CANDIDATES + " LIMIT 1", {"me": annotator, "now": now, "overlap": self.overlap}).fetchone()
            if row is None:
                return None
            left = self.shown_left(row["pair_id"], annotator)
            con.execute("INSERT OR REPLACE INTO assignments VALUES (?, ?, ?, ?, ?)",
                        (row["pair_id"], annotator, left, now, now + self.lease_s))
            return self._item(con, row["pair_id"], left)

    def servable_pairs(self) -> list[str]:
        """Every pair the app can serve (active, not blocked by the word filter), in the order it serves them."""
        with self._read() as con:
            rows = con.execute("SELECT pair_id FROM items WHERE active = 1 AND blocked IS NULL ORDER BY position").fetchall()
        return [r["pair_id"] for r in rows]

    def blocked_pairs(self) -> list[str]:
        """The current pairs the word filter holds back (active, blocked): served to nobody."""
        with self._read() as con:
            rows = con.execute("SELECT pair_id FROM items WHERE active = 1 AND blocked IS NOT NULL").fetchall()
        return [r["pair_id"] for r in rows]

    def _remove_labels(self, con, annotator: str) -> int:
        now = self.clock()
        pairs = [r["pair_id"] for r in con.execute("SELECT pair_id FROM labels WHERE annotator = ?", (annotator,))]
        con.execute("DELETE FROM labels WHERE annotator = ?", (annotator,))
        for pair_id in pairs:
            self._history(con, "remove", pair_id, annotator, now)
        return len(pairs)

    def release(self, annotator: str, pair_id: str) -> None:
        """Give an opened pair back to the pool now (the annotator leaves), instead of at the lease timeout."""
        with self._tx() as con:
            con.execute("DELETE FROM assignments WHERE pair_id = ? AND annotator = ?", (pair_id, annotator))

    def reopen(self, annotator: str, pair_id: str) -> Item | None:
        """One of this annotator's labeled pairs, in the order they saw it, with their label: to change their mind."""
        with self._read() as con:
            label = con.execute("SELECT * FROM labels WHERE pair_id = ? AND annotator = ?", (pair_id, annotator)).fetchone()
            if label is None:
                return None
            return self._item(con, pair_id, label["shown_left"], label)

    # -- labels ---------------------------------------------------------------------------------------------
    def save_label(self, annotator: str, pair_id: str, choice: str, shown_left: int,
                   strength: str | None = None, note: str = "", new_only: bool = False) -> dict | None:
        """Insert or change this annotator's label for the pair, in one transaction. Returns the stored row.

        `new_only`: the click answers a pair served as unlabeled, so it may not change a label they gave it meanwhile
        (a second tab showing the same pair, a second key pressed before the page showed the next pair), nor turn a
        skip they gave it meanwhile into a label (a pair past its overlap): nothing is written and None is returned.
        Changing a label is the "Change an earlier label" view's, where they see it; a skip is taken back by Undo."""
        with self._tx() as con:
            if new_only and self._answered(con, annotator, pair_id):
                return None
            return self._save_label(con, annotator, pair_id, choice, shown_left, strength, note)

    def save_simulated(self, remove: list[str], labels: list[tuple[str, str, str, int]],
                       withdraw: list[tuple[str, str]] = ()) -> int:
        """A `make simulate` run's writes, all in one transaction: the simulated annotators no longer named removed,
        and each (annotator, pair_id) of `withdraw` (a pair the word filter now holds back), then each (annotator,
        pair_id, choice, shown_left) saved. A run killed midway leaves the store as it was, never half redrawn with
        other noise settings. Returns how many labels `remove` and `withdraw` took away."""
        if not all(is_simulated(a) for a in [*remove, *(lab[0] for lab in labels), *(w[0] for w in withdraw)]):
            raise ValueError("save_simulated writes simulated annotators' labels only")
        with self._tx() as con:
            removed = sum(self._remove_labels(con, annotator) for annotator in remove)
            now = self.clock()
            for annotator, pair_id in withdraw:
                removed += con.execute("DELETE FROM labels WHERE annotator = ? AND pair_id = ?",
                                       (annotator, pair_id)).rowcount
                self._history(con, "remove", pair_id, annotator, now)  # withdrawn: held back now
            for annotator, pair_id, choice, shown_left in labels:
                self._save_label(con, annotator, pair_id, choice, shown_left)
        return removed

    def _save_label(self, con, annotator: str, pair_id: str, choice: str, shown_left: int,
                    strength: str | None = None, note: str = "") -> dict:
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if strength not in (None, *STRENGTHS):
            raise ValueError(f"strength must be one of {STRENGTHS} or None, got {strength!r}")
        if choice in ("tie", "both_bad"):
            strength = None  # "much better" says nothing about a tie
        now, preferred, note = self.clock(), preferred_index(choice, shown_left), (note or "").strip()
        if len(note) > self.max_note_chars:
            raise NoteTooLong(f"the note is {len(note)} characters long; the limit is {self.max_note_chars} "
                              f"(max_note_chars in configs/label.yaml)")
        if con.execute("SELECT 1 FROM items WHERE pair_id = ?", (pair_id,)).fetchone() is None:
            raise KeyError(f"unknown pair {pair_id}")
        old = con.execute("SELECT id FROM labels WHERE pair_id = ? AND annotator = ?", (pair_id, annotator)).fetchone()
        if old is None:
            con.execute(
                "INSERT INTO labels (pair_id, annotator, choice, shown_left, preferred, strength, note, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pair_id, annotator, choice, shown_left, preferred, strength, note, now, now))
        else:
            con.execute(
                "UPDATE labels SET choice = ?, shown_left = ?, preferred = ?, strength = ?, note = ?, "
                "revision = revision + 1, updated_at = ? WHERE id = ?",
                (choice, shown_left, preferred, strength, note, now, old["id"]))
        self._history(con, "new" if old is None else "change", pair_id, annotator, now,
                      choice, shown_left, preferred, strength, note)
        con.execute("DELETE FROM assignments WHERE pair_id = ? AND annotator = ?", (pair_id, annotator))
        con.execute("DELETE FROM skips WHERE pair_id = ? AND annotator = ?", (pair_id, annotator))
        row = con.execute("SELECT * FROM labels WHERE pair_id = ? AND annotator = ?", (pair_id, annotator)).fetchone()
        return dict(row)

    @staticmethod
    def _answered(con, annotator: str, pair_id: str) -> bool:
        """This annotator labeled or skipped the pair: a stale screen's click on it changes nothing."""
        return con.execute("SELECT 1 FROM labels WHERE pair_id = ? AND annotator = ? UNION ALL "
                           "SELECT 1 FROM skips WHERE pair_id = ? AND annotator = ?",
                           (pair_id, annotator, pair_id, annotator)).fetchone() is not None

    def skip(self, annotator: str, pair_id: str) -> None:
        """Not for me: the pair goes back to the pool for others and is not shown to this annotator again. A pair they
        have labelled or skipped already is left as it is: a second tab still showing it would otherwise record a
        skip that the next undo takes back instead of their label."""
        now = self.clock()
        with self._tx() as con:
            if self._answered(con, annotator, pair_id):
                return
            con.execute("INSERT OR IGNORE INTO skips VALUES (?, ?, ?)", (pair_id, annotator, now))
            con.execute("DELETE FROM assignments WHERE pair_id = ? AND annotator = ?", (pair_id, annotator))
            self._history(con, "skip", pair_id, annotator, now)

    def undo(self, annotator: str) -> tuple[str, str] | None:
        """Take back this annotator's latest label or skip: a new label is deleted, a change reverts to the version
        before, a skip is forgotten (one stray S would otherwise keep the pair from them for good).

        The pair comes back to them at once (a lease in their name) if it has room: fewer than `overlap` others on it
        (labels + live leases), else it stays with those others. Returns (pair_id, what was taken back: "new",
        "change" or "skip"), or None if there is nothing to undo.
        """
        now = self.clock()
        with self._tx() as con:
            last = con.execute(
                "SELECT * FROM label_history WHERE annotator = ? AND action IN ('new', 'change', 'skip') AND undone = 0 "
                "ORDER BY id DESC LIMIT 1", (annotator,)).fetchone()
            if last is None:
                return None
            pair_id = last["pair_id"]
            con.execute("UPDATE label_history SET undone = 1 WHERE id = ?", (last["id"],))
            before = con.execute(
                "SELECT * FROM label_history WHERE annotator = ? AND pair_id = ? AND action IN ('new', 'change') "
                "AND undone = 0 AND id < ? ORDER BY id DESC LIMIT 1", (annotator, pair_id, last["id"])).fetchone()
            # The pair comes back only while it has room: others may have filled it since (a skip hands it on)
            room = con.execute(f"SELECT {others_on(':pair')} < :overlap", {
                "me": annotator, "pair": pair_id, "now": now, "overlap": self.overlap}).fetchone()[0]
            if last["action"] == "skip":
                con.execute("DELETE FROM skips WHERE pair_id = ? AND annotator = ?", (pair_id, annotator))
                if room:
                    con.execute("INSERT OR REPLACE INTO assignments VALUES (?, ?, ?, ?, ?)",
                                (pair_id, annotator, self.shown_left(pair_id, annotator), now, now + self.lease_s))
            elif before is None:
                con.execute("DELETE FROM labels WHERE pair_id = ? AND annotator = ?", (pair_id, annotator))
                if room:
                    con.execute("INSERT OR REPLACE INTO assignments VALUES (?, ?, ?, ?, ?)",
                                (pair_id, annotator, last["shown_left"], now, now + self.lease_s))
            else:
                con.execute("UPDATE labels SET choice = ?, shown_left = ?, preferred = ?, strength = ?, note = ?, "
                            "revision = revision + 1, updated_at = ? WHERE pair_id = ? AND annotator = ?",
                            (before["choice"], before["shown_left"], before["preferred"], before["strength"],
                             before["note"], now, pair_id, annotator))
            self._history(con, "undo", pair_id, annotator, now, last["choice"], last["shown_left"], last["preferred"],
                          last["strength"], last["note"])
            return pair_id, last["action"]

    @staticmethod
    def _history(con, action, pair_id, annotator, at, choice=None, shown_left=None, preferred=None, strength=None,
                 note=None) -> None:
        con.execute("INSERT INTO label_history (action, pair_id, annotator, choice, shown_left, preferred, strength, "
                    "note, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (action, pair_id, annotator, choice, shown_left, preferred, strength, note, at))

    # -- reading --------------------------------------------------------------------------------------------
    def labels(self, with_text: bool = True) -> list[dict]:
        """Every current label with its pair's prompt and responses (what export and stats read), and `current`: whether
        the pair is in the pairs dataset last loaded (false: a pair of an earlier dataset, kept with its labels).
        `with_text` False: without prompt and responses (the Stats tab's figures need none: on 50,000 pairs reading
        them took 10 s and a GB a view)."""
        text = ", i.prompt, i.responses" if with_text else ""
        with self._read() as con:
            rows = con.execute(f"SELECT l.*{text}, i.active FROM labels l JOIN items i USING (pair_id) "
                               "ORDER BY l.id").fetchall()
        return [{**{k: r[k] for k in r.keys() if k not in ("active", "prompt", "responses")},
                 **({"prompt": json.loads(r["prompt"]), "responses": json.loads(r["responses"])} if with_text else {}),
                 "current": bool(r["active"])} for r in rows]

    def my_labels(self, annotator: str, limit: int = 50) -> list[dict]:
        with self._read() as con:
            rows = con.execute("SELECT l.pair_id, l.choice, l.strength, l.updated_at, l.shown_left, i.prompt, "
                               "i.responses FROM labels l "
                               "JOIN items i USING (pair_id) WHERE l.annotator = ? ORDER BY l.updated_at DESC, l.id DESC "
                               "LIMIT ?", (annotator, limit)).fetchall()
        return [{**dict(r), "prompt": json.loads(r["prompt"]), "responses": json.loads(r["responses"])} for r in rows]

    def history(self, annotator: str | None = None) -> list[dict]:
        with self._read() as con:
            sql, args = "SELECT * FROM label_history", ()
            if annotator is not None:
                sql, args = sql + " WHERE annotator = ?", (annotator,)
            return [dict(r) for r in con.execute(sql + " ORDER BY id", args)]

    def progress(self, annotator: str | None = None) -> dict:
        """Yours: labeled, and still possible for you; overall: pairs with `overlap` people's labels, of all servable pairs,
        and people's labels (simulated annotators' are in the Stats tab)."""
        now = self.clock()
        with self._read() as con:
            one = lambda sql, *a: con.execute(sql, a).fetchone()[0]  # noqa: E731
            out = {
                "pairs": one("SELECT COUNT(*) FROM items WHERE active = 1 AND blocked IS NULL"),
                "blocked": one("SELECT COUNT(*) FROM items WHERE active = 1 AND blocked IS NOT NULL"),
                "labels": one("SELECT COALESCE(SUM(people), 0) FROM items WHERE active = 1"),
                "pairs_done": one("SELECT COUNT(*) FROM items WHERE active = 1 AND blocked IS NULL AND people >= ?",
                                  self.overlap),
                "overlap": self.overlap,
            }
            if annotator is not None:
                out["mine"] = one("SELECT COUNT(*) FROM labels l JOIN items i USING (pair_id) "
                                  "WHERE l.annotator = ? AND i.active = 1", annotator)
                # Pairs still open to me: not mine yet, not skipped, and not full (others' live leases aside).
                open_to_me = ("i.active = 1 AND i.blocked IS NULL "
                              "AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = i.pair_id AND l.annotator = ?) "
                              "AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.pair_id = i.pair_id AND s.annotator = ?) "
                              "AND i.people < ?")
                out["open_to_me"] = one(f"SELECT COUNT(*) FROM items i WHERE {open_to_me}",
                                        annotator, annotator, self.overlap)
                # Of those, the ones another's live lease holds: they come back to me if not answered in time (a pair
                # I labeled or skipped, or a full one, does not: the done screen promised it did).
                out["held_by_others"] = one(
                    f"SELECT COUNT(*) FROM items i WHERE {open_to_me} AND EXISTS (SELECT 1 FROM assignments a "
                    "WHERE a.pair_id = i.pair_id AND a.annotator != ? AND a.expires_at > ?)",
                    annotator, annotator, self.overlap, annotator, now)
        return out
