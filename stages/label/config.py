"""configs/label.yaml as a dataclass, plus the two guards the app needs before it serves anyone:
who may log in (a users file or LABEL_USERS), and which words keep a pair away from annotators.
Imports nothing heavy: `python -m stages.label --host 0.0.0.0` must refuse within a second or two, before Gradio loads.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError, bad_byte_at, resolve_path

USERS_ENV = "LABEL_USERS"
TIE_POLICIES = ("drop", "both_orders")
BOTH_BAD_POLICIES = ("drop", "tie")
EARLIER_PAIRS_POLICIES = ("drop", "keep")
SOURCES = ("auto", "people", "simulated", "all")


@dataclass
class LabelArgs:
    # Data
    pairs_dataset: str | None = field(default=None, metadata={
        "help": "Pairs to label (save_to_disk folder or .jsonl with pair_id, prompt, responses). "
                "Default: outputs.dataset of this run's pairs stage."})
    # Assignment
    overlap: int = field(default=1, metadata={"help": "Annotators per pair; 2+ measures agreement."})
    lease_timeout_s: float = field(default=900.0, metadata={
        "help": "A pair opened but not answered goes back to the pool after this many seconds."})
    seed: int = field(default=0, metadata={"help": "Seeds the per-(pair, annotator) left/right order."})
    # Server
    host: str = field(default="127.0.0.1", metadata={"help": "Bind address; anything but loopback needs users (auth)."})
    port: int = 7860
    users_file: str | None = field(default=None, metadata={
        "help": f"File of `name:password` lines; turns on login. Or set {USERS_ENV}=name:pw,name2:pw2 (passwords without commas)."})
    concurrency_limit: int = field(default=16, metadata={"help": "Label clicks handled at once (SQLite serialises writes)."})
    # What annotators see
    title: str = "Which response is better?"
    guidelines: str = field(default="docs/labeling-guidelines.md", metadata={"help": "Markdown shown in the guidelines panel."})
    max_note_chars: int = field(default=2000, metadata={
        "help": "Longest note an annotator may store with a label; the store refuses longer ones."})
    filter_offensive: bool = field(default=True, metadata={"help": "Hold back pairs containing a word of offensive_words."})
    offensive_words: list[str] = field(default_factory=list, metadata={
        "help": "Whole words, case-insensitive, plural s/es included."})
    # Export (make label-export)
    ties: str = field(default="drop", metadata={
        "help": "drop: leave ties out; both_orders: keep a tie as two rows (A>B and B>A), which pull the rewards together."})
    both_bad: str = field(default="drop", metadata={"help": "drop, or tie: count 'both bad' as a tie."})
    min_agreement: float = field(default=0.0, metadata={"help": "Drop pairs whose majority share is below this (0..1)."})
    earlier_pairs: str = field(default="drop", metadata={
        "help": "Labels of pairs from an earlier pairs dataset (the store keeps them when `make pairs` runs again): "
                "drop leaves them out of the export, keep exports them with the current pairs' labels."})
    sources: str = field(default="auto", metadata={
        "help": "Whose labels the export holds: auto (people's when the store holds any of theirs, else the simulated "
                "annotators'), people, simulated (make simulate's sim:... annotators), or all (one vote each)."})

    def __post_init__(self):
        if self.overlap < 1:
            raise ValueError(f"overlap must be at least 1, got {self.overlap}")
        if self.max_note_chars < 1:  # 0 drew a note box "up to 0 characters" that refused every note
            raise ValueError(f"max_note_chars must be 1 or more (a note is optional), got {self.max_note_chars}")
        if self.ties not in TIE_POLICIES:
            raise ValueError(f"ties must be one of {TIE_POLICIES}, got '{self.ties}'")
        if self.both_bad not in BOTH_BAD_POLICIES:
            raise ValueError(f"both_bad must be one of {BOTH_BAD_POLICIES}, got '{self.both_bad}'")
        if self.earlier_pairs not in EARLIER_PAIRS_POLICIES:
            raise ValueError(f"earlier_pairs must be one of {EARLIER_PAIRS_POLICIES}, got '{self.earlier_pairs}'")
        if self.sources not in SOURCES:
            raise ValueError(f"sources must be one of {SOURCES}, got '{self.sources}'")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be between 0 and 1, got {self.min_agreement}")


@dataclass
class ExportArgs:
    push_to_hub: str | None = field(default=None, metadata={"help": "Also push the dataset + card to this Hub repo (user/name)."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub dataset as private."})
    refresh: bool = field(default=False, metadata={
        "help": "make rm's labels step: export again as the last export did (the flags of its command line over the "
                "config file, read again; no --push_to_hub), and leave the export as it is when its rows would be the "
                "same, so people labeling other pairs retrains nothing."})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def load_users(users_file: str | None, env: dict | None = None) -> list[tuple[str, str]]:
    """Login pairs from the users file and/or LABEL_USERS; empty when neither is set."""
    env = os.environ if env is None else env
    users: list[tuple[str, str]] = []
    if users_file:
        path = resolve_path(users_file)
        if not path.is_file():
            raise ConfigError(f"users file {path} does not exist: create it with one `name:password` line per annotator")
        if os.name == "posix" and path.stat().st_mode & 0o077:  # passwords others on this machine can read or change
            print(f"note: the users file {path} can be read or changed by other users of this machine (mode "
                  f"{path.stat().st_mode & 0o777:o}): `chmod 600 {path}`", file=sys.stderr)
        for n, line in enumerate(read_utf8(path, "the users file").splitlines(), 1):
            if not line.strip() or line.strip().startswith("#"):
                continue
            users.append(_user(line.lstrip(), f"line {n} of the users file {path}"))
    if env.get(USERS_ENV):  # entry K: the K-th between commas, blank ones counted, as a person counts them
        users += [_user(entry.lstrip(), f"entry {k} of ${USERS_ENV}", COMMA_HINT)
                  for k, entry in enumerate(env[USERS_ENV].split(","), 1) if entry.strip()]
    twice = sorted(name for name, n in Counter(name for name, _ in users).items() if n > 1)
    if twice:  # Gradio would keep the last password of a name without a word
        raise ConfigError(f"login {twice[0]!r} is given more than once in the users file and ${USERS_ENV}: one line "
                          f"per annotator")
    return users


class LoginGuard:
    """Gradio's login check, with a lockout against guessing: after `max_failures` wrong passwords in a row for one
    login, that login is refused, the right password too, for `lockout_s` seconds, doubling with each further wrong
    password (at most an hour); a right password once the lock has passed clears the count. Only logins that exist
    are counted (a guess at another name can never succeed, and counting every name sent would grow without end).
    The operator sees each lock on the console; the page says only "Incorrect credentials", as for a wrong password.
    Gradio calls it as `auth(username, password)`: a plain function, as Gradio awaits only what
    `inspect.iscoroutinefunction` says is a coroutine function (an object with an async __call__ would log anyone in)."""

    def __init__(self, users: list[tuple[str, str]], max_failures: int = 5, lockout_s: float = 60.0,
                 clock=time.monotonic):
        self.passwords = {name: password.encode() for name, password in users}
        self.max_failures, self.lockout_s, self.clock = max_failures, lockout_s, clock
        self.failures: dict[str, int] = {}
        self.locked_until: dict[str, float] = {}

    def __call__(self, username: str, password: str) -> bool:
        stored = self.passwords.get(username)
        if stored is None:
            return False
        now = self.clock()
        if now < self.locked_until.get(username, 0.0):
            return False
        if hmac.compare_digest(password.encode(), stored):  # in constant time: the time taken says nothing
            self.failures.pop(username, None)
            return True
        failures = self.failures[username] = self.failures.get(username, 0) + 1
        if failures >= self.max_failures:
            lock = min(self.lockout_s * 2 ** (failures - self.max_failures), 3600.0)
            self.locked_until[username] = now + lock
            print(f"note: login {username!r} locked for {lock:.0f} s after {failures} wrong passwords in a row",
                  file=sys.stderr, flush=True)
        return False


def read_utf8(path: Path, what: str) -> str:
    """A text file as UTF-8; a byte-order mark (Notepad's "UTF-8 with BOM") is not part of the first line."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line, column = bad_byte_at(err)
        raise ConfigError(f"{what} {path} is not UTF-8 text (line {line}, column {column}): save it as UTF-8") from None


# An annotator's name, typed or a login: letters, digits 0-9, single spaces, . @ ' - (no ':', which marks a simulator; no
# control or direction characters): as it is shown, stored and exported, so two people never look alike.
NAME_RE = re.compile(r"^[\w .@'-]{1,64}$")
# The scripts one name may mix, as browsers allow in a domain name (Chromium's IDN policy): Japanese, Korean and Chinese
# with Han and Latin. Latin with Cyrillic or Greek is refused: `аlice` with a Cyrillic `а` looks like `alice`.
SCRIPT_MIXES = ({"CJK", "HIRAGANA", "KATAKANA", "LATIN"}, {"HANGUL", "CJK", "LATIN"}, {"BOPOMOFO", "CJK", "LATIN"})


# Unicode's default-ignorable code points (DerivedCoreProperties.txt) that are neither Cc nor Cf: marks and letters a
# browser draws as nothing (variation selectors, the combining grapheme joiner, Mongolian free variation selectors,
# Khmer inherent vowels) or as a blank (the Hangul fillers). A run of variation selectors after one letter carries any
# bytes unseen ("emoji smuggling"): the annotator would not see what the reward model reads.
IGNORABLE_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x2065, 0x2065),
                    (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
                    (0xE0000, 0xE0FFF))

def name_scripts(name: str) -> set[str]:
    """The scripts of a name's letters, by their Unicode names' first word (LATIN, CYRILLIC, GREEK, CJK, ...)."""
    return {unicodedata.name(c, "?").split()[0] for c in name if c.isalpha()}


def clean_name(name: str | None) -> str | None:
    """The name with its spaces made single, or None if it breaks the rule: NAME_RE's characters, in Unicode's
    normal form (NFKC: no full-width `ａ` or ligature `ﬁ` standing in for `a` or `fi`), none drawn as nothing or a
    blank (IGNORABLE_RANGES: NAME_RE's letters include the Hangul fillers), letters of one script or of a mix in
    SCRIPT_MIXES."""
    name = " ".join((name or "").split())
    if not name or not NAME_RE.match(name) or unicodedata.normalize("NFKC", name) != name:
        return None
    if any(lo <= ord(c) <= hi for c in name for lo, hi in IGNORABLE_RANGES):  # a Hangul filler: `alice` + a blank
        return None
    # Digits 0-9 only: `ann١` (an Arabic-Indic one) and `bo०` (a Devanagari zero) passed beside `ann1` and `bo0`, as the
    # scripts are the letters'. And no Latin "other letter": the clicks `ǀ ǁ ǃ` are drawn as `l`/`|`, `‖`, `!`.
    if any(unicodedata.category(c) == "Nd" and not "0" <= c <= "9" for c in name):
        return None
    if any(unicodedata.category(c) == "Lo" and name_scripts(c) == {"LATIN"} for c in name):
        return None
    scripts = name_scripts(name)
    return name if len(scripts) <= 1 or any(scripts <= mix for mix in SCRIPT_MIXES) else None


# What a bad $LABEL_USERS entry may be: a password cut in two at its comma (`bob:se,cret` gives the entry `cret`).
COMMA_HINT = (f"; a password in ${USERS_ENV} cannot hold a comma (it parts the entries): give such a password in a users "
              f"file (--users_file)")


def _user(entry: str, where: str, hint: str = "") -> tuple[str, str]:
    """One `name:password` login. An error names where the entry is, never its text, which may be a password or hold
    one (`alice hunter2`, a space for the ':'; the `cret` of `bob:se,cret` in $LABEL_USERS)."""
    name, sep, password = entry.partition(":")
    if not sep or not name.strip() or not password.strip():
        raise ConfigError(f"bad user entry ({where}): write `name:password`, a name and a password{hint}")
    # A browser's password box drops line breaks (a tab can be pasted): `LABEL_USERS=$(cat users.env)` with one login
    # per line was one login, alice's password `pw1\nbob:pw2`, which nobody could type, and no login for bob
    if any(unicodedata.category(c) == "Cc" and c != "\t" for c in password):
        raise ConfigError(f"bad password ({where}): it holds a line break or another control character, which the "
                          f"login form cannot take (one login per line in ${USERS_ENV} made one login of them): part "
                          f"${USERS_ENV}'s entries with commas, `alice:pw1,bob:pw2`, or give them in a users file")
    if password != password.strip():  # the users file's line once lost a trailing space, and nobody could log in
        raise ConfigError(f"bad password ({where}): it starts or ends with a space, which is easily lost when it is "
                          f"typed or pasted: remove the space")
    if clean_name(name) != name.strip():  # `ann  lee` would show as `ann lee`, another login's name
        raise ConfigError(f"bad login name ({where}): use letters of one script, digits 0-9, single spaces and . @ ' - "
                          f"only, up to 64 characters (as a typed name), so that no two logins look alike")
    return name.strip(), password


def check_exposure(host: str, users: list[tuple[str, str]]) -> None:
    """Refuse to serve beyond this machine without login: annotator identity is what makes a label usable."""
    if not is_loopback(host) and not users:
        raise ConfigError(
            f"refusing to start the labeling UI on {host} without authentication: anyone who can reach this "
            f"machine could label under any name. Give annotator logins with --users_file FILE (one `name:password` "
            f"per line, `chmod 600`) or the {USERS_ENV} environment variable (`alice:pw1,bob:pw2`, set from a file, "
            f"not typed into your shell's history), or bind to 127.0.0.1 (the default)")


def word_filter(words: list[str]):
    """row -> the first offensive word found in its prompt or responses, else None."""
    words = [w.strip() for w in words if w and w.strip()]
    if not words:
        return lambda row: None
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")(?:s|es)?\b",
                         re.IGNORECASE)

    def blocked(row: dict) -> str | None:
        texts = [m.get("content", "") for m in row["prompt"]] + list(row["responses"])
        for text in texts:
            match = pattern.search(text or "")
            if match:
                return match.group(1).lower()
        return None

    return blocked


def read_guidelines(path: str) -> str:
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"guidelines file {p} does not exist: fix `guidelines` in configs/label.yaml")
    return read_utf8(p, "the guidelines file")


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on, a host that is not this machine's and a port this user may not open,
    before the store is touched (Gradio would fail only after), each with its own fix."""
    import errno
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a just-closed port is free
            s.bind((host, port))
    except OSError as err:
        why = f"cannot serve on {host}:{port} ({err.strerror or err})"
        if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:  # the host, not the port
            raise ConfigError(f"{why}: --host {host} is not an address of this machine; give 127.0.0.1 (this machine "
                              f"only), 0.0.0.0 (every interface, with logins) or one of its own addresses") from None
        if err.errno == errno.EACCES:  # a port below 1024, or one the system keeps for itself (a firewall, SELinux)
            fix = "ports below 1024 need root; pick" if port < 1024 else "this user may not open it; pick another"
            raise ConfigError(f"{why}: {fix} --port 1024 or above (7860 by default)") from None
        raise ConfigError(f"{why}: another program (another `make label`?) uses it; pick another port with --port N") \
            from None


def db_path(runs_dir: str, run: str) -> Path:
    from pipeline.run import stage_dir

    return stage_dir(runs_dir, run, "label") / "labels.sqlite"


OWN_PAIRS = "own_pairs.txt"  # in the label stage's folder; the Makefile reads it too (OWN_PAIRS_FILE)


def recorded_own_pairs(runs_dir: str, run: str) -> str | None:
    """The file of pairs of your own that `make label ARGS="--pairs_dataset FILE"` labeled in this run, which has
    sampled none (label/own_pairs.txt): what a later `make label` or `make label-export` without the flag serves and
    exports, not the pairs stage the run does not have. None once the run has a pairs stage, or without the record."""
    from pipeline.run import stage_dir

    record = stage_dir(runs_dir, run, "label") / OWN_PAIRS
    if (stage_dir(runs_dir, run, "pairs") / "manifest.json").is_file() or not record.is_file():
        return None
    return record.read_text().strip() or None


def default_to_own_pairs(args: LabelArgs, runs_dir: str, run: str, who: str) -> None:
    """Without --pairs_dataset, a run of your own pairs (recorded_own_pairs) serves and exports that file, not the
    pairs stage it does not have: `args.pairs_dataset` set to it, and `who` (the stage) says so."""
    own = None if args.pairs_dataset else recorded_own_pairs(runs_dir, run)
    if own:
        print(f"{who}: this run labels your own pairs: {own} (label/{OWN_PAIRS})", flush=True)
        args.pairs_dataset = own
