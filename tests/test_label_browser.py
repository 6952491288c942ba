"""The labeling UI in a real browser: Playwright driving Debian's Chromium, headless (`apt-get install chromium`, as .ci/run does).

Every test checks that nothing leaves the machine: the browser's requests to anything but the app are aborted
and recorded, and a Python audit hook records non-loopback connects/lookups of the app (in this process, or in
the server subprocess of the kill -9 test).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.launch import free_port
from tests.conftest import PYTHON, REPO

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = [pytest.mark.slow]
# Chromium calls home even headless (update, accounts, autofill); the resolver rule makes every such lookup fail locally.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"]
TIMEOUT_MS = 30_000  # two shared cores: Gradio's first render can take seconds

LOCAL = ("127.", "::1", "localhost", "0.0.0.0")
NET_HOOK = r"""
import sys
def _net_hook(event, args, _local=("127.", "::1", "localhost", "0.0.0.0")):
    if event in ("socket.connect", "socket.sendto"):
        addr = args[-1]
        if isinstance(addr, tuple) and not str(addr[0]).startswith(_local):
            _report(f"{event} {addr[0]}")
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
        if host and not str(host).startswith(_local):
            _report(f"{event} {host}")
sys.addaudithook(_net_hook)
"""
PYTHON_NET: list[str] = []  # non-loopback network use by this process while a browser test runs
_armed = [False]


def _report(what: str) -> None:
    if _armed[0]:
        PYTHON_NET.append(what)


exec(NET_HOOK)  # noqa: S102 - installs the audit hook (hooks cannot be removed; it only records while armed)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright's launch, with Debian's Chromium (Playwright's own download needs the internet)."""
    if CHROMIUM is None:  # a failure, not a skip: the browser tests are part of the suite (.ci/run installs chromium).
        # Here, not at import: an import error stopped the whole suite at collection, `-m "not slow"` too.
        pytest.fail("the labeling UI tests need Debian's Chromium: apt-get install chromium", pytrace=False)
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": ARGS}


@pytest.fixture(autouse=True)
def offline():
    """Yields the list of browser requests that tried to leave the machine; asserts it (and Python's) stay empty."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    blocked: list[str] = []
    PYTHON_NET.clear()
    _armed[0] = True
    try:
        yield blocked
    finally:  # every page's context: the session's browser outlives the test, and an open page kept polling its
        for context in OPEN_CONTEXTS:  # server's queue (each test left ~3 renderers, ~30% of a core in all)
            context.close()
        OPEN_CONTEXTS.clear()
    _armed[0] = False
    assert blocked == [], f"the page tried to reach beyond the machine: {blocked}"
    assert PYTHON_NET == [], f"the app tried to reach beyond the machine: {PYTHON_NET}"


def make_pairs(n: int) -> list[dict]:
    """Response 0 always starts 'Response A', response 1 'Response B': the page tells which side holds which."""
    return [{"pair_id": f"pair{i:02d}", "prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
             "responses": [f"Response A{i}: it is {2 * i}.", f"Response B{i}: maybe {2 * i + 1}?"]} for i in range(n)]


@pytest.fixture
def serve(tmp_path):
    """Factory: the app in a thread of this process -> (url, store)."""
    import gradio  # noqa: F401  (slow import, once)

    from stages.label.app import build_app, launch_kwargs
    from stages.label.config import read_guidelines
    from stages.label.store import LabelStore

    demos = []

    def _serve(n_pairs=5, overlap=1, users=None, pairs=None):
        store = LabelStore(tmp_path / f"labels{len(demos)}.sqlite", overlap=overlap, lease_s=600)
        store.import_items(pairs or make_pairs(n_pairs))
        demo = build_app(store, read_guidelines("docs/labeling-guidelines.md"), use_login=bool(users))
        demo.queue(default_concurrency_limit=16)
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                auth=users, **launch_kwargs())
        demos.append(demo)
        return url.rstrip("/"), store

    yield _serve
    for demo in demos:
        demo.close()


OPEN_CONTEXTS: list = []  # closed by `offline` as each test ends


def open_page(browser, url: str, blocked: list[str]):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    OPEN_CONTEXTS.append(context)

    def route(r):
        if r.request.url.startswith(url):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.goto(url)
    return page


def start_as(page, name: str) -> None:
    page.locator("#name textarea, #name input").first.fill(name)
    page.locator("#btn-start").click()


def log_in(page, user: str, password: str) -> None:
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def shown(page) -> tuple[str, int]:
    """(pair_id, index of the response on the left) as the page shows them."""
    from playwright.sync_api import expect

    expect(page.locator("#left")).to_contain_text("Response")
    question = page.locator("#prompt").inner_text()
    i = int(question.split("Question ")[1].split(":")[0])
    return f"pair{i:02d}", 0 if page.locator("#left").inner_text().strip().startswith("Response A") else 1


def db_labels(db) -> dict[str, dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    return {r["pair_id"]: dict(r) for r in con.execute("SELECT * FROM labels")}


def test_label_by_mouse_and_keyboard_undo_change_skip(serve, browser, offline, tmp_path):
    from playwright.sync_api import expect

    url, store = serve(n_pairs=5)
    page = open_page(browser, url, offline)
    start_as(page, "alice")
    progress = page.locator("#progress")
    expect(progress).to_contain_text("Yours (alice): 0 labeled")
    expected, latencies = {}, []

    def ack(n):
        t0 = time.perf_counter()
        expect(progress).to_contain_text(f"Yours (alice): {n} labeled")
        latencies.append(time.perf_counter() - t0)

    # 1. Mouse: "much better" + a note, then Left is better
    pair, left = shown(page)
    page.get_by_text("much better [W]").click()
    page.locator("#note textarea").fill("clearly right answer")
    t0 = time.perf_counter()
    page.locator("#btn-left").click()
    ack(1)
    latencies[-1] = time.perf_counter() - t0
    expected[pair] = dict(choice="left", preferred=left, shown_left=left, strength="much", note="clearly right answer")
    # 2. Keyboard: 2 = right is better
    pair, left = shown(page)
    page.keyboard.press("2")
    ack(2)
    expected[pair] = dict(choice="right", preferred=1 - left, shown_left=left, strength=None, note="")
    # 3. Keyboard: Q (slightly) then the left arrow
    pair, left = shown(page)
    page.keyboard.press("q")
    expect(page.locator("#strength input[value='slightly']")).to_be_checked()
    page.keyboard.press("ArrowLeft")
    ack(3)
    expected[pair] = dict(choice="left", preferred=left, shown_left=left, strength="slightly", note="")
    # 4. Keyboard: 3 = tie, then U undoes it: the same pair comes back, in the same order
    pair4, left4 = shown(page)
    page.keyboard.press("3")
    ack(4)
    page.keyboard.press("u")
    ack(3)
    expect(page.locator("#status")).to_contain_text("Undone")
    assert shown(page) == (pair4, left4)
    page.keyboard.press("4")  # both bad instead
    ack(4)
    expected[pair4] = dict(choice="both_bad", preferred=None, shown_left=left4, strength=None, note="")
    # 5. Change an earlier label (the second one) to "left is better": an UPDATE, not a second row
    second = list(expected)[1]
    page.locator("#earlier > button").click()
    page.locator("#earlier-list input").click()
    page.get_by_role("option").filter(has_text=f"Question {int(second[4:])}:").click()
    page.locator("#btn-open").click()
    expect(page.locator("#status")).to_contain_text("Changing your label")
    pair, left = shown(page)
    assert pair == second
    page.keyboard.press("1")
    expect(page.locator("#status")).to_contain_text("Changed label")
    expected[second] = dict(choice="left", preferred=left, shown_left=left, strength=None, note="")
    # 6. S skips the last pair: all done
    skipped, _ = shown(page)
    page.keyboard.press("s")
    expect(page.locator("#done")).to_contain_text("All done")
    expect(progress).to_contain_text("Yours (alice): 4 labeled")

    # The database holds exactly what was chosen, mapped back through the order shown.
    rows = db_labels(store.path)
    assert set(rows) == set(expected)
    for pair, want in expected.items():
        got = {k: rows[pair][k] for k in want}
        assert got == want, pair
        assert rows[pair]["annotator"] == "alice"
    assert rows[second]["revision"] == 2
    actions = [(h["action"], h["pair_id"]) for h in store.history("alice")]
    assert ("undo", pair4) in actions and ("skip", skipped) in actions and ("change", second) in actions
    assert sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    # Guidelines (G) and the stats view
    page.keyboard.press("g")
    expect(page.locator("#guidelines")).to_contain_text("How to label")
    page.get_by_role("tab", name="Stats").click()
    page.locator("#btn-stats").click()
    expect(page.locator("#stats")).to_contain_text("4 labels")
    expect(page.locator("#stats")).to_contain_text("Position bias")
    page.screenshot(path=str(tmp_path / "stats.png"), animations="disabled")
    print(f"\nlabel round trip (click -> acknowledged on screen): "
          f"{', '.join(f'{t * 1000:.0f}' for t in latencies)} ms")


def test_two_annotators_at_once_overlap_one(serve, browser, offline):
    from playwright.sync_api import expect

    url, store = serve(n_pairs=6, overlap=1)
    pages = {name: open_page(browser, url, offline) for name in ("alice", "bob")}
    for name, page in pages.items():
        start_as(page, name)
    counts = {"alice": 0, "bob": 0}
    done = set()
    while len(done) < 2:
        on_screen = {}
        for name, page in pages.items():
            if name in done:
                continue
            if page.locator("#done").is_visible():
                done.add(name)
                continue
            on_screen[name] = shown(page)[0]
        if len(on_screen) == 2:
            assert on_screen["alice"] != on_screen["bob"], "the same pair was open with both annotators"
        for name in on_screen:  # both answer, interleaved
            pages[name].keyboard.press("1")
            counts[name] += 1
            expect(pages[name].locator("#progress")).to_contain_text(f"{counts[name]} labeled")
    rows = store.labels()
    assert len(rows) == 6 and len({r["pair_id"] for r in rows}) == 6  # every pair once, none twice
    assert {r["annotator"] for r in rows} == {"alice", "bob"} and counts["alice"] + counts["bob"] == 6


def test_login_mode_labels_as_the_logged_in_user(serve, browser, offline):
    from playwright.sync_api import expect

    url, store = serve(n_pairs=2, users=[("carol", "pw-carol")])
    page = open_page(browser, url, offline)
    log_in(page, "carol", "pw-carol")
    expect(page.locator("#progress")).to_contain_text("Yours (carol): 0 labeled")
    assert not page.locator("#name").is_visible()  # no name field: the login is the identity
    page.keyboard.press("2")
    expect(page.locator("#progress")).to_contain_text("Yours (carol): 1 labeled")
    assert [r["annotator"] for r in store.labels()] == ["carol"]


def test_a_second_key_pressed_while_the_first_saves_labels_nothing_unseen(serve, browser, offline):
    """1 then 2 within a moment, the first one's save slow: the pair on screen gets the first key's label, and the next
    one, which the second key arrived before, stays open and unlabeled (the four choices are one event, which the page
    does not send again while it runs: as four, the second ran beside the first and was saved first). With logins the
    page offers a way to log out."""
    from playwright.sync_api import expect

    import time

    url, store = serve(n_pairs=4, users=[("carol", "pw-carol")])
    save = store.save_label

    def slow_left(annotator, pair_id, choice, *args, **kwargs):  # the first key's save takes a while, as under load
        if choice == "left":
            time.sleep(1.5)
        return save(annotator, pair_id, choice, *args, **kwargs)

    store.save_label = slow_left
    page = open_page(browser, url, offline)
    log_in(page, "carol", "pw-carol")
    expect(page.locator("#progress")).to_contain_text("Yours (carol): 0 labeled")
    expect(page.locator("#btn-logout")).to_be_visible()
    first, _ = shown(page)
    page.keyboard.press("1")
    page.keyboard.press("2")
    # The second is not sent while the first runs (or, sent after it, refused as not on screen): the store is what is
    # checked, once the first has come back.
    expect(page.locator("#progress")).to_contain_text("Yours (carol): 1 labeled")
    page.wait_for_timeout(3000)
    expect(page.locator("#status")).not_to_contain_text("processing")
    second, _ = shown(page)
    assert second != first
    assert [(r["pair_id"], r["choice"]) for r in store.labels()] == [(first, "left")]
    page.keyboard.press("2")  # now shown: labeled
    expect(page.locator("#progress")).to_contain_text("Yours (carol): 2 labeled")
    assert [(r["pair_id"], r["choice"]) for r in store.labels()] == [(first, "left"), (second, "right")]


# Text that would be markup if the page rendered it: an image from elsewhere (HTML and Markdown), a page-covering
# overlay, hidden text, a fake password form, a script, LaTeX. It must show as exactly these characters.
HOSTILE_PROMPT = ['<div style="position:fixed;inset:0;background:red">cover</div> system says hi',
                  'Q <img src=http://example.com/x.png> and ![x](http://example.com/y.png)\n  second line']
HOSTILE_RESPONSES = ['Response A: <span style="display:none">hidden</span> then <form><input type=password></form>',
                     'Response B: **bold** <script>window.pwned = 1</script> $$x^2$$ <b onmouseover=alert(1)>b</b>']
HOSTILE_NAME = '<img src=http://example.com/n.png> <b>eve</b> ![n](http://example.com/m.png)'
# a tool's output in a prompt of your own (a role no template knows is refused before it reaches the store)
HOSTILE_TOOL_OUTPUT = '<b>output</b> <img src=http://example.com/r.png>'


def test_model_prompt_and_user_text_is_shown_as_plain_text(serve, browser, offline):
    from playwright.sync_api import expect

    pair = {"pair_id": "hostile", "prompt": [{"role": "system", "content": HOSTILE_PROMPT[0]},
                                             {"role": "user", "content": HOSTILE_PROMPT[1]},
                                             {"role": "tool", "content": HOSTILE_TOOL_OUTPUT}],
            "responses": HOSTILE_RESPONSES}
    url, store = serve(pairs=[pair, *make_pairs(1)])
    store.save_label(HOSTILE_NAME, "pair00", "left", 0, note="<img src=http://example.com/note.png>")
    requests: list[str] = []
    page = open_page(browser, url, offline)
    page.on("request", lambda r: requests.append(r.url))
    start_as(page, "alice")
    expect(page.locator("#left")).to_contain_text("Response")

    for text in [*HOSTILE_PROMPT, "tool", HOSTILE_TOOL_OUTPUT]:
        assert text in page.locator("#prompt").inner_text()  # every character visible, newline and spaces kept
    shown_texts = {page.locator("#left").inner_text().strip(), page.locator("#right").inner_text().strip()}
    assert shown_texts == set(HOSTILE_RESPONSES)
    page.get_by_role("tab", name="Stats").click()
    expect(page.locator("#stats")).to_contain_text(HOSTILE_NAME)

    # nothing of it became markup: no image, form, password box or script anywhere on the page, and no element
    # holds just a fragment of it (the <div> overlay, the hidden <span>, the <b>, Markdown's **bold**)
    dom = page.evaluate("""() => ({
        imgs: [...document.querySelectorAll('img')].map(i => i.src)
              .filter(s => !s.startsWith(location.origin) && !s.startsWith('data:')),
        forms: document.querySelectorAll('form').length,
        passwords: document.querySelectorAll('input[type=password]').length,
        fragments: [...document.querySelectorAll('body *')].map(e => e.textContent)
                   .filter(t => ['cover', 'hidden', 'bold', 'b', 'eve', 'x^2', 'output'].includes(t.trim())),
        pwned: window.pwned === 1,
    })""")
    assert dom == {"imgs": [], "forms": 0, "passwords": 0, "fragments": [], "pwned": False}
    assert [u for u in requests if not u.startswith(url)] == []  # and the page fetched nothing from elsewhere
    assert any(u.startswith(url) for u in requests)  # (the listener did see the page's own requests)


SERVER_BOOT = NET_HOOK.replace("_report(", "_log(") + r"""
import os, runpy
_out = open(os.environ["NET_LOG"], "a", buffering=1)
def _log(what):
    _out.write(what + "\n")
sys.argv = ["stages.label", *sys.argv[1:]]
runpy.run_module("stages.label", run_name="__main__", alter_sys=True)
"""


def start_server(args: list[str], net_log: Path) -> subprocess.Popen:
    env = {**os.environ, "NET_LOG": str(net_log), "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen([PYTHON, "-c", SERVER_BOOT, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_until_up(proc, url: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("server did not come up")


def test_sigkill_mid_session_then_restart_loses_no_acknowledged_label(browser, offline, tmp_path):
    from playwright.sync_api import expect

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(8)))
    runs, port, net_log = tmp_path / "runs", free_port(), tmp_path / "net.log"
    url = f"http://127.0.0.1:{port}"
    args = ["--config", "configs/label.yaml", "--run", "k", "--runs_dir", str(runs), "--pairs_dataset", str(pairs),
            "--port", str(port)]
    server = start_server(args, net_log)
    try:
        wait_until_up(server, url)
        page = open_page(browser, url, offline)
        start_as(page, "dora")
        acknowledged = {}
        for n, key in enumerate(["1", "2", "4"], 1):
            pair, left = shown(page)
            page.keyboard.press(key)
            expect(page.locator("#progress")).to_contain_text(f"Yours (dora): {n} labeled")
            acknowledged[pair] = {"1": "left", "2": "right", "4": "both_bad"}[key]
        in_flight, _ = shown(page)
        page.keyboard.press("3")  # and kill the server while this click may be on its way
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
    rows = db_labels(runs / "k/label/labels.sqlite")
    assert {p: rows[p]["choice"] for p in acknowledged} == acknowledged  # every acknowledged label survived
    assert set(rows) - set(acknowledged) <= {in_flight}

    server = start_server(args, net_log)  # same port: the browser's stored name applies again
    try:
        wait_until_up(server, url)
        # A new tab in the same browser context (same stored name), not page.reload(): the old tab's Gradio client
        # reconnects and reloads itself when the server returns, and racing it aborts our reload (ERR_ABORTED).
        context = page.context
        page.close()
        page = context.new_page()
        page.goto(url)
        expect(page.locator("#progress")).to_contain_text(f"Yours (dora): {len(rows)} labeled")
        pair, _ = shown(page)
        assert pair not in rows  # continues with a pair not yet labeled
        page.keyboard.press("2")
        expect(page.locator("#progress")).to_contain_text(f"Yours (dora): {len(rows) + 1} labeled")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    assert len(db_labels(runs / "k/label/labels.sqlite")) == len(rows) + 1
    assert not net_log.exists() or net_log.read_text() == "", net_log.read_text()


def test_binding_to_all_interfaces_without_auth_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LABEL_USERS"}
    proc = subprocess.run([PYTHON, "-m", "stages.label", "--config", "configs/label.yaml", "--run", "x", "--runs_dir",
                           str(tmp_path), "--host", "0.0.0.0"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "refusing to start the labeling UI on 0.0.0.0 without authentication" in proc.stderr
    assert "--users_file" in proc.stderr and "LABEL_USERS" in proc.stderr
    assert not (tmp_path / "x").exists()  # refused before touching anything
