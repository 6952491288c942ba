"""Who a label belongs to, checked through Gradio's own API (what any script can send, not just our page).

With logins, the annotator is the login in every handler: a client logged in as alice that sends "bob" as its name
(the hidden name box's endpoint) still labels, skips, undoes and switches as alice. And the store, not only the
note box, refuses a note beyond `max_note_chars`.
"""

from __future__ import annotations

import os

import pytest

from pipeline.launch import free_port

pytestmark = [pytest.mark.slow]  # a Gradio server in a thread (gradio import ~6 s)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

USERS = [("alice", "pw-alice"), ("bob", "pw-bob")]


@pytest.fixture
def login_app(tmp_path):
    from stages.label.app import build_app, launch_kwargs
    from stages.label.store import LabelStore

    store = LabelStore(tmp_path / "labels.sqlite", max_note_chars=20)
    store.import_items([{"pair_id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}],
                         "responses": [f"zero {i}", f"one {i}"]} for i in range(6)])
    demo = build_app(store, "guidelines", use_login=True)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            auth=USERS, **launch_kwargs())
    yield url, store
    demo.close()


def client(url: str, user: str):
    from gradio_client import Client

    return Client(url, auth=(user, dict(USERS)[user]), verbose=False, download_files=False)


def on_screen(out: tuple, after_start: bool = False) -> str:
    """The pair the page shows, from an API answer: the hidden box a label or skip sends back (last; /start answers
    the saved name after it)."""
    return out[-2] if after_start else out[-1]


def annotators(store) -> list[str]:
    return sorted(lab["annotator"] for lab in store.labels())


def test_a_login_cannot_label_under_another_name(login_app):
    url, store = login_app
    alice = client(url, "alice")
    out = alice.predict("bob", api_name="/start")  # the hidden name box: "I am bob"
    alice.predict("", "", on_screen(out, after_start=True), api_name="/label_left")
    out = alice.predict("bob", api_name="/start_on_enter")
    alice.predict("much", "", on_screen(out, after_start=True), api_name="/label_right")
    assert annotators(store) == ["alice", "alice"]
    assert [h["annotator"] for h in store.history()] == ["alice", "alice"]

    bob = client(url, "bob")
    out = bob.predict("alice", api_name="/start")  # and the other way round
    bob.predict("", "", on_screen(out, after_start=True), api_name="/label_tie")
    assert annotators(store) == ["alice", "alice", "bob"]

    # undo, skip and switch act on alice's own labels and pairs, whatever name she sent
    alice.predict("bob", api_name="/start")
    alice.predict(api_name="/undo")
    assert annotators(store) == ["alice", "bob"]
    alice.predict(api_name="/switch")
    out = alice.predict("bob", api_name="/start")
    alice.predict(on_screen(out, after_start=True), api_name="/skip")
    assert {h["annotator"] for h in store.history() if h["action"] in ("undo", "skip")} == {"alice"}
    assert store.progress("bob")["mine"] == 1


def test_gradios_run_history_pages_are_off(login_app):
    """Gradio's run history pages answered without a login and, for a client on this machine (an SSH tunnel, a
    proxy), called the Hub with the operator's token: listing and creating buckets in their name, saving the labels
    there. Off: each is Not Found, while the app itself still asks for a login."""
    import urllib.error
    import urllib.request

    url, _ = login_app
    for path, data in [("gradio_api/run-history/buckets", None), ("gradio_api/runs", None),
                       ("gradio_api/run-history/connect", b'{"bucket_id": "someone/loot"}')]:
        request = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 404, (path, err.value.code)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "config", timeout=30)
    assert err.value.code == 401


def test_a_note_beyond_the_limit_is_refused_and_nothing_is_stored(login_app):
    url, store = login_app
    alice = client(url, "alice")
    pair = on_screen(alice.predict("", "", api_name="/start"), after_start=True)
    out = alice.predict("", "x" * 21, pair, api_name="/label_left")  # over the API: the page's max_length is not in the way
    assert any("Not saved" in str(part) and "limit is 20" in str(part) for part in out)
    assert store.labels() == [] and store.history() == [] and on_screen(out) == pair
    alice.predict("", "y" * 20, pair, api_name="/label_left")  # at the limit: stored
    assert [lab["note"] for lab in store.labels()] == ["y" * 20]


def test_on_load_a_login_is_the_annotator_and_its_name_is_shown_as_text(tmp_path):
    """The page's first call (`demo.load`) sends the name this browser saved before (a no-login session on a shared
    machine): with logins it is ignored, the login is who labels. And whatever name a login carries (load_users refuses
    `<b>eve</b>`, but the page does not rely on it), the progress line and the "All done" screen show it escaped."""
    import html
    from types import SimpleNamespace

    from stages.label.app import build_app
    from stages.label.store import LabelStore

    store = LabelStore(tmp_path / "labels.sqlite")
    store.import_items([{"pair_id": "p0", "prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"]}])
    on_load, = [f.fn for f in build_app(store, "guidelines", use_login=True).fns.values()
                if getattr(f.fn, "__name__", "") == "on_load"]
    state = on_load("mallory", SimpleNamespace(username="alice"))[0]
    assert state == {"annotator": "alice", "pair_id": "p0", "shown_left": store.shown_left("p0", "alice")}

    eve = '<img src=http://example.com/e.png> <b>eve</b>'
    store.save_label(eve, "p0", "left", 0)
    out = on_load("", SimpleNamespace(username=eve))
    shown = "".join(str(part.get("value", "")) if isinstance(part, dict) else str(part) for part in out)
    assert out[0] == {"annotator": eve} and "<img" not in shown and "<b>eve" not in shown
    assert f"Nothing is left for you, {html.escape(eve)}: you labeled 1 pair(s)" in shown
    assert f"Yours ({html.escape(eve)}): <b>1 labeled</b>" in shown


def test_wrong_passwords_lock_a_login_through_gradio(tmp_path):
    """The lockout as Gradio's /login route calls it: five wrong passwords lock alice (the right one refused too) and
    not bob; after the lock the right one logs in again. Through the server, not the guard alone: Gradio awaits only
    coroutine functions, so a guard Gradio misread would let everyone in or no one."""
    import httpx

    from stages.label.app import build_app, launch_kwargs
    from stages.label.config import LoginGuard
    from stages.label.store import LabelStore

    store = LabelStore(tmp_path / "labels.sqlite")
    store.import_items([{"pair_id": "p0", "prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"]}])
    now = [0.0]
    demo = build_app(store, "guidelines", use_login=True)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            auth=LoginGuard(USERS, clock=lambda: now[0]), **launch_kwargs())
    try:
        def login(user, password):
            return httpx.post(f"{url}login", data={"username": user, "password": password}).status_code

        assert login("alice", "pw-alice") == 200 and login("alice", "nope") == 400 and login("mallory", "x") == 400
        for _ in range(5):
            assert login("alice", "guess") == 400
        assert login("alice", "pw-alice") == 400  # locked
        assert login("bob", "pw-bob") == 200
        now[0] += 61
        assert login("alice", "pw-alice") == 200
    finally:
        demo.close()


def test_a_stale_screen_cannot_change_a_label_it_did_not_show(tmp_path):
    """Two tabs of one annotator show the same pair (the lease is theirs), or a second key arrives before the page shows
    the next pair: the click the page sends carries the pair already labeled. It may not change that label (a pair is
    labeled once; changing one is the "Change an earlier label" view's): nothing is written, the page says so and
    serves the next pair. Reopened on purpose, the same click does change it. A pair skipped in another tab is not
    labeled by the stale one either."""
    from types import SimpleNamespace

    from stages.label.app import ALREADY_LABELED, build_app
    from stages.label.store import LabelStore

    store = LabelStore(tmp_path / "labels.sqlite")
    store.import_items([{"pair_id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
                         "responses": [f"a{i}", f"b{i}"]} for i in range(2)])
    handlers = {f.api_name: f.fn for f in build_app(store, "guidelines").fns.values() if f.api_name}
    me = SimpleNamespace(username=None)
    tab1 = handlers["start"]("dora", {}, me)[0]
    tab2 = handlers["start"]("dora", {}, me)[0]  # the second tab gets the pair the first holds
    assert tab1["pair_id"] == tab2["pair_id"] == "p0"

    handlers["label_left"]("", "", "p0", tab1, me)
    out = handlers["label_right"]("much", "second thoughts?", "p0", tab2, me)  # tab2 still shows p0
    assert [(lab["pair_id"], lab["choice"], lab["strength"], lab["note"], lab["revision"]) for lab in store.labels()] \
        == [("p0", "left", None, "", 1)]
    assert [(h["action"], h["pair_id"]) for h in store.history("dora")] == [("new", "p0")]
    assert ALREADY_LABELED in out and out[0]["pair_id"] == "p1"  # told, and on to the next pair
    assert store.save_label("dora", "p0", "tie", 0, new_only=True) is None and store.labels()[0]["choice"] == "left"

    opened = handlers["open"]("p0", out[0], me)[0]  # on purpose: Change an earlier label
    handlers["label_right"]("", "", "p0", opened, me)
    assert [(lab["choice"], lab["revision"]) for lab in store.labels()] == [("right", 2)]

    # p1 skipped in one tab, labeled from another still showing it: the skip stands (the pair went back to the pool
    # for others; a label would have taken it past its overlap)
    tab2 = handlers["start"]("dora", {}, me)[0]
    assert out[0]["pair_id"] == tab2["pair_id"] == "p1"
    handlers["skip"]("p1", out[0], me)
    stale = handlers["label_left"]("", "", "p1", tab2, me)
    assert ALREADY_LABELED in stale and [lab["pair_id"] for lab in store.labels()] == ["p0"]
    assert [(h["action"], h["pair_id"]) for h in store.history("dora")][-1] == ("skip", "p1")


@pytest.mark.parametrize("first", ["label_left", "skip"])
def test_a_second_key_before_the_next_pair_is_on_screen_saves_nothing(tmp_path, first):
    """Keys 1 then 2 (or S then 1) pressed within a moment: Gradio runs the second event after the first, on the state
    the first left, which already holds the next pair, while the page still shows the first. The browser sends the
    pair it shows with every label and skip: the second key is refused, the next pair stays open and unlabeled."""
    from types import SimpleNamespace

    from stages.label.app import NOT_ON_SCREEN, build_app
    from stages.label.store import LabelStore

    store = LabelStore(tmp_path / "labels.sqlite")
    store.import_items([{"pair_id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
                         "responses": [f"a{i}", f"b{i}"]} for i in range(3)])
    handlers = {f.api_name: f.fn for f in build_app(store, "guidelines").fns.values() if f.api_name}
    me = SimpleNamespace(username=None)
    start = handlers["start"]("dora", {}, me)
    assert start[0]["pair_id"] == start[-2] == "p0"  # the state and the page's hidden box agree
    after_first = handlers[first](*(("", "", "p0") if first != "skip" else ("p0",)), start[0], me)
    assert after_first[0]["pair_id"] == after_first[-1] == "p1"
    second = handlers["label_right"]("", "", "p0", after_first[0], me)  # the page still showed p0
    assert NOT_ON_SCREEN in second and second[0]["pair_id"] == second[-1] == "p1"
    assert [lab["pair_id"] for lab in store.labels()] == ([] if first == "skip" else ["p0"])
    again = handlers["skip"]("p0", after_first[0], me)  # a late skip does not skip the pair on screen either
    assert NOT_ON_SCREEN in again and [h["pair_id"] for h in store.history("dora")] == ["p0"]
    handlers["label_right"]("", "", "p1", second[0], me)  # once shown, the same key labels it
    assert [(lab["pair_id"], lab["choice"]) for lab in store.labels()][-1] == ("p1", "right")


def test_the_done_screen_says_the_lease_time_people_can_read():
    """A pair open with someone else comes back after the lease: 30 s said as "30 s" (it read "0 min"), minutes rounded
    up (90 s read "2 min", 901 s "15 min": never sooner than it comes back)."""
    from stages.label.app import minutes_or_seconds

    assert [minutes_or_seconds(s) for s in (30, 90, 119, 120, 900, 901)] == \
        ["30 s", "90 s", "119 s", "2 min", "15 min", "16 min"]
