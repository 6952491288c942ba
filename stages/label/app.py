"""The labeling UI: a Gradio Blocks app over the label store. One pair at a time, two responses side by side.

The app keeps no state of its own: every click is one store call, and the UI shows "Saved" only after the
label's transaction committed. Per-browser state is just who you are and which pair is on screen.

Two trust rules:
- With logins, who you are is the login (`request.username`) in every handler; a name sent by the page is ignored.
- Prompts, responses, notes and names are data: they reach the page HTML-escaped, as plain visible text (no
  Markdown, no HTML), so a response cannot draw a fake form, hide text or load an image from elsewhere.
"""

from __future__ import annotations

import html
import math
import re
import sys
import time
import unicodedata

import gradio as gr

from stages.label.config import IGNORABLE_RANGES, clean_name
from stages.label.stats import stats_view, to_html
from stages.label.store import LabelStore, NoteTooLong

SHORTCUTS = [("1 or ←", "left is better"), ("2 or →", "right is better"), ("3 or T", "tie"), ("4 or B", "both bad"),
             ("Q / W", "strength: slightly / much better"), ("N", "write a note (Esc leaves it)"), ("S", "skip"),
             ("U", "undo your last label"), ("G", "show / hide the guidelines")]

# Gradio has no per-button hotkeys: one document listener clicks the buttons.
HEAD = """<script>
(() => {
  const buttons = {"1": "btn-left", "arrowleft": "btn-left", "2": "btn-right", "arrowright": "btn-right",
                   "3": "btn-tie", "t": "btn-tie", "4": "btn-bad", "b": "btn-bad", "s": "btn-skip", "u": "btn-undo"};
  const strengths = {"q": "slightly", "w": "much"};
  const visible = (el) => el && el.offsetParent !== null;
  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const t = e.target, tag = (t && t.tagName || "").toLowerCase();
    if (tag === "textarea" || (tag === "input" && !["radio", "checkbox"].includes(t.type)) || (t && t.isContentEditable)) {
      if (e.key === "Escape") t.blur();
      return;
    }
    const key = e.key.toLowerCase();
    let el = null;
    if (buttons[key]) el = document.getElementById(buttons[key]);
    else if (strengths[key]) el = document.querySelector(`#strength input[value="${strengths[key]}"]`);
    else if (key === "g") el = document.querySelector("#guidelines > button, #guidelines .label-wrap");
    else if (key === "n") {
      const note = document.querySelector("#note textarea");
      if (visible(note)) { e.preventDefault(); note.focus(); }
      return;
    }
    if (visible(el)) { e.preventDefault(); el.click(); }
  });
})();
</script>"""

CSS = """
#progress progress { width: 100%; height: 8px; margin: 2px 0 8px; accent-color: var(--color-accent); }
.plain { white-space: pre-wrap; overflow-wrap: anywhere; }
#prompt .msg { margin: 0 0 8px; padding: 6px 10px; border-radius: 8px; background: var(--background-fill-secondary); }
#prompt .role { font-size: 0.8em; opacity: 0.7; }
#left, #right { min-height: 110px; }
"""

# A label click on a pair this annotator labeled since it was put on screen: the label stays as it was
ALREADY_LABELED = ("⚠ Not saved: you had already labeled or skipped that pair (in another tab, or with the key "
                   "before). It stays as it was; to change a label, use <b>Change an earlier label</b>; to take back "
                   "a skip, <b>Undo</b>.")
NOT_ON_SCREEN = ("⚠ Not saved: that key or click came before this pair was on screen (a second key pressed while the "
                 "last one was saving). Read this pair, then choose.")


def minutes_or_seconds(seconds: float) -> str:
    """A lease time as people read it: "45 s", "2 min" (rounded up, so a pair never comes back later than said)."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{math.ceil(seconds / 60)} min"

CHOICE_TEXT = {"left": "left is better", "right": "right is better", "tie": "tie", "both_bad": "both bad"}


def _picture(c: int) -> str:
    """How a character that acts without being seen is shown: a C0 control or DEL as its Unicode picture (U+2400...),
    any other as its escape (`\\u200b`, `\\U000e0041`)."""
    if c < 0x20:
        return chr(0x2400 + c)
    if c == 0x7F:
        return "\u2421"
    return f"\\u{c:04x}" if c <= 0xFFFF else f"\\U{c:08x}"


# Characters a browser drops, hides or obeys unseen: Unicode's controls (Cc: NUL, ESC, DEL, the C1 controls), format
# characters (Cf: zero-width spaces and joiners, the byte-order mark, tag characters, and the direction controls that
# would reverse the text around them) and the other default-ignorable ones (IGNORABLE_RANGES), shown as their
# `_picture`. Tabs, line breaks and carriage returns stay themselves: the page lays the text out with them.
CONTROL_PICTURES = {c: _picture(c) for c in [
    *(c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Cc", "Cf") and chr(c) not in "\t\n\r"),
    *(c for lo, hi in IGNORABLE_RANGES for c in range(lo, hi + 1))]}


LONE_CR = re.compile(r"\r(?!\n)")  # a carriage return without its line feed: HTML reads it as a line break, so ␍


def text_html(text: str, tag: str = "div", classes: str = "plain") -> str:
    """Any text as inert, visible HTML: escaped, whitespace kept, control characters visible. The one way model/user
    text reaches the page."""
    text = LONE_CR.sub("\u240d", text.translate(CONTROL_PICTURES))  # the page would break the line there
    return f'<{tag} class="{classes}">{html.escape(text)}</{tag}>'


def response_html(text: str) -> str:
    """A response as shown to the annotator: as stored (text_html), and said in words where nothing would be seen, an
    empty reply or one of whitespace alone, which otherwise looked like an empty box (or a reply that failed to load)."""
    if not text:
        return '<i class="plain">(empty response)</i>'
    if text.strip():
        return text_html(text)
    return text_html(text) + f'<i class="plain">(whitespace only: {len(text)} character{"" if len(text) == 1 else "s"})</i>'


def prompt_html(messages: list[dict]) -> str:
    """The prompt as a plain-text chat: one box per message, its role above it."""
    return "".join(f'<div class="msg">{text_html(m["role"], classes="role plain")}{text_html(m["content"])}</div>'
                   for m in messages)


def describe(label: dict) -> str:
    text = CHOICE_TEXT[label["choice"]]
    return f"{text} ({label['strength']})" if label.get("strength") else text


def earlier_label_text(m: dict) -> str:
    """A label in the "change an earlier label" list (a dropdown shows text, not markup): time, choice, the prompt's
    start, and the two responses' starts as that annotator saw them, since the story recipe asks 28 pairs of each
    prompt and the prompt alone would not tell them apart."""
    # A piece's own direction controls shown, not obeyed (CONTROL_PICTURES): a text cannot close the isolate around it
    # (U+2069) and then reverse the rest of the line, nor leave an override or isolate open where the cut falls
    prompt, left, right = (text.translate(CONTROL_PICTURES) for text in (
        m["prompt"][-1]["content"], m["responses"][m["shown_left"]], m["responses"][1 - m["shown_left"]]))
    # Each piece isolated (U+2068 ... U+2069): a right-to-left text in one must not reorder the rest of the line
    cut = lambda text, n: "\u2068" + shown_start(text, n) + "\u2069"  # noqa: E731
    return (f"{time.strftime('%H:%M', time.localtime(m['updated_at']))} · {describe(m)} · "
            f"{cut(prompt, 40)} · left: {cut(left, 30)} | right: {cut(right, 30)}")


SHOWN_UNIT = re.compile(r"\\u[0-9a-f]{4}|\\U[0-9a-f]{8}|.", re.S)  # a picture's escape is one unit, as its character was


def shown_start(shown: str, n: int) -> str:
    """The first n characters of a shown text (CONTROL_PICTURES applied), its runs of whitespace made one space, and
    an escape never cut in half (`\\u202` would read as other text)."""
    out, width = [], 0
    for unit in SHOWN_UNIT.findall(" ".join(shown.split())):
        if width + len(unit) > n:
            break
        out.append(unit)
        width += len(unit)
    return "".join(out)


def no_pairs_html(p: dict) -> str:
    """The screen of a store with no pair to serve: not "All done" (nothing was), and why, when the word filter held
    every pair back."""
    why = (f" The word filter holds back all {p['blocked']} pair(s) it has: whoever runs `make label` can change "
           f"`offensive_words` or `filter_offensive` in the label config and start it again." if p.get("blocked") else "")
    return f"<h3>No pairs to label</h3><p>This labeling store has no pair to serve.{why}</p>"


def progress_html(p: dict, annotator: str | None = None) -> str:
    mine = p.get("mine", 0)
    mine_total = mine + p.get("open_to_me", 0)
    # No servable pair (every one held back by the word filter) is no share done: "100%" would claim work that never was.
    share = f'{p["pairs_done"] / p["pairs"]:.0%}' if p["pairs"] else "no pairs to label"
    who = f" ({html.escape(annotator)})" if annotator else ""
    return (f'<div>Yours{who}: <b>{mine} labeled</b> · {p.get("open_to_me", 0)} still open to you</div>'
            f'<progress max="{max(mine_total, 1)}" value="{mine}"></progress>'
            f'<div>Overall: <b>{p["pairs_done"]} of {p["pairs"]} pairs done</b> ({share}) · '
            f'{p["labels"]} labels · overlap {p["overlap"]}</div>'
            f'<progress max="{max(p["pairs"], 1)}" value="{p["pairs_done"]}"></progress>')


def build_app(store: LabelStore, guidelines_md: str, title: str = "Which response is better?",
              use_login: bool = False) -> gr.Blocks:
    """`use_login`: the annotator is the logged-in Gradio user; otherwise a name typed on the page (loopback only)."""
    shortcuts_md = "\n".join(["| key | action |", "|---|---|"] + [f"| {k} | {a} |" for k, a in SHORTCUTS])

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        state = gr.State({})  # {"annotator", "pair_id", "shown_left", "editing"}
        # The pair on this page, sent with every label and skip. The State above is the server's and already holds the
        # next pair when a second key arrives before the page has shown it; this is what the browser showed.
        on_screen = gr.Textbox(visible=False, elem_id="on-screen-pair")
        saved_name = gr.BrowserState("", storage_key="rlhf-label-annotator", secret="rlhf-label-name")
        gr.HTML(f"<h2>{html.escape(title)}</h2>", js_on_load=None)
        with gr.Row(visible=False) as who:
            name = gr.Textbox(label="Your name (stored with every label)", elem_id="name", scale=3)
            start = gr.Button("Start labeling", elem_id="btn-start", variant="primary", scale=1)
        progress = gr.HTML(elem_id="progress", js_on_load=None)
        status = gr.HTML(elem_id="status", js_on_load=None)
        with gr.Tabs():
            with gr.Tab("Label", id="label"):
                with gr.Column(visible=False, elem_id="item") as item_col:
                    gr.HTML("<b>Prompt</b>", js_on_load=None)
                    chat = gr.HTML(elem_id="prompt", max_height=320, js_on_load=None)
                    with gr.Row():
                        with gr.Column():
                            gr.HTML("<b>Left</b> — key 1 or ←", js_on_load=None)
                            left = gr.HTML(elem_id="left", container=True, padding=True, js_on_load=None)
                        with gr.Column():
                            gr.HTML("<b>Right</b> — key 2 or →", js_on_load=None)
                            right = gr.HTML(elem_id="right", container=True, padding=True, js_on_load=None)
                    with gr.Row():
                        b_left = gr.Button("◀ Left is better [1]", elem_id="btn-left", variant="primary")
                        b_tie = gr.Button("Tie [3]", elem_id="btn-tie")
                        b_bad = gr.Button("Both bad [4]", elem_id="btn-bad")
                        b_right = gr.Button("Right is better ▶ [2]", elem_id="btn-right", variant="primary")
                    with gr.Row():
                        strength = gr.Radio([("not said", ""), ("slightly better [Q]", "slightly"),
                                             ("much better [W]", "much")], value="", label="How much better? (optional)",
                                            elem_id="strength")
                        note = gr.Textbox(label=f"Note (optional, up to {store.max_note_chars} characters) [N]", lines=2,
                                          elem_id="note", max_length=store.max_note_chars)
                    b_skip = gr.Button("Skip this pair [S]", elem_id="btn-skip", size="sm")
                done = gr.HTML(visible=False, elem_id="done", js_on_load=None)
                with gr.Row():
                    b_undo = gr.Button("Undo my last label [U]", elem_id="btn-undo", size="sm", visible=False)
                    b_switch = gr.Button("Switch annotator", elem_id="btn-switch", size="sm", visible=False)
                    # Gradio's own route: ends this browser's login, so that another person can log in on it
                    gr.Button("Log out", link="/logout", elem_id="btn-logout", size="sm", visible=use_login)
                with gr.Accordion("Guidelines [G]", open=False, elem_id="guidelines"):
                    gr.Markdown(guidelines_md + "\n\n**Keyboard shortcuts**\n\n" + shortcuts_md)  # the project's own text
                with gr.Accordion("Change an earlier label", open=False, elem_id="earlier", visible=False) as earlier_box:
                    earlier = gr.Dropdown(choices=[], label="Your labels, newest first", elem_id="earlier-list")
                    b_open = gr.Button("Open it", elem_id="btn-open", size="sm")
            with gr.Tab("Stats", id="stats") as stats_tab:
                b_stats = gr.Button("Refresh", elem_id="btn-stats", size="sm")
                stats_html = gr.HTML(elem_id="stats", js_on_load=None)

        view_outputs = [state, who, b_switch, item_col, done, b_undo, earlier_box, chat, left, right, strength, note,
                        progress, status, earlier, on_screen]
        note_output = view_outputs.index(note)

        def session(st: dict, request: gr.Request) -> dict:
            """This browser's state, with the annotator it may act as: with logins always the login, whatever the
            page sent before (a state naming someone else is dropped, with its open pair)."""
            if use_login and st.get("annotator") != request.username:
                return {"annotator": request.username}
            return st

        def view(st: dict, message: str = ""):
            """Everything on screen for this annotator; claims the next pair (a lease) when none is open.
            `message` is HTML: callers escape what they put in it."""
            me = st.get("annotator")
            if not me:
                return (st, gr.update(visible=not use_login), gr.update(visible=False), gr.update(visible=False),
                        gr.update(visible=False),
                        gr.update(visible=False), gr.update(visible=False), "", "", "", "", "",
                        progress_html(store.progress()), message or "Type your name to start.", gr.update(), "")
            item = store.reopen(me, st["pair_id"]) if st.get("editing") else None
            if item is None:
                st = {"annotator": me}
                item = store.next_item(me)
            mine = store.my_labels(me)
            choices = [(earlier_label_text(m), m["pair_id"]) for m in mine]
            common = (gr.update(visible=False), gr.update(visible=not use_login), gr.update(visible=bool(mine)),
                      gr.update(visible=bool(mine)))
            prog = store.progress(me)
            if item is None:
                held = f" {prog['held_by_others']} pair(s) are open with others; they come back here if not answered " \
                       f"within {minutes_or_seconds(store.lease_s)} (reload this page to see them)." if prog["held_by_others"] else ""
                done_html = (f"<h3>All done ✓</h3><p>Nothing is left for you, {html.escape(me)}: you labeled "
                             f"{prog['mine']} pair(s). Thank you!{held}</p>" if prog["pairs"] else no_pairs_html(prog))
                return ({"annotator": me}, common[0], common[1], gr.update(visible=False),
                        gr.update(value=done_html, visible=True), common[2], common[3], "", "", "", "", "",
                        progress_html(prog, me), message, gr.update(choices=choices, value=None), "")
            st = {**st, "pair_id": item.pair_id, "shown_left": item.shown_left}
            if item.label is not None:
                message = (f"Changing your label on this pair (you chose: <b>{describe(item.label)}</b>). Choose again, "
                           f"or Skip to leave it as it is.")
            return (st, common[0], common[1], gr.update(visible=True), gr.update(visible=False), common[2], common[3],
                    prompt_html(item.prompt), response_html(item.left), response_html(item.right),
                    (item.label or {}).get("strength") or "", (item.label or {}).get("note") or "",
                    progress_html(prog, me), message, gr.update(choices=choices, value=None), item.pair_id)

        def on_load(saved: str, request: gr.Request):
            annotator = request.username if use_login else clean_name(saved)
            return view({"annotator": annotator} if annotator else {})

        def on_start(typed: str, st: dict, request: gr.Request):
            if use_login:  # the login is the name: a typed (or API-sent) one changes nothing
                return (*view(session(st, request)), gr.update())
            annotator = clean_name(typed)
            if annotator is None:
                return (*view(st, "⚠ Enter a name: letters of one script, digits 0-9, spaces, . @ ' - (up to 64 characters)."), gr.update())
            return (*view({"annotator": annotator}, f"Labeling as <b>{html.escape(annotator)}</b>."), annotator)

        def on_choice(choice: str):
            def handler(strength_value: str, note_value: str, shown_pair: str, st: dict, request: gr.Request):
                st = session(st, request)
                if not st.get("annotator") or not st.get("pair_id"):
                    return view(st, "Nothing to label right now.")
                if shown_pair != st["pair_id"]:
                    return view(st, NOT_ON_SCREEN)
                t0 = time.perf_counter()
                try:
                    row = store.save_label(st["annotator"], st["pair_id"], choice, st["shown_left"],
                                           strength_value or None, note_value, new_only=not st.get("editing"))
                except NoteTooLong as err:  # not saved: keep the pair and the typed note on screen to shorten it
                    out = list(view(st, f"⚠ Not saved: {html.escape(str(err))}. Shorten the note."))
                    out[note_output] = gr.update()
                    return tuple(out)
                if row is None:  # a stale screen: this pair was labeled or skipped from another tab, or by the key before
                    return view({"annotator": st["annotator"]}, ALREADY_LABELED)
                verb = "Changed" if row["revision"] > 1 else "Saved"
                msg = (f"✓ {verb} label #{row['id']}: {describe(row)} "
                       f"({(time.perf_counter() - t0) * 1000:.0f} ms)")
                return view({"annotator": st["annotator"]}, msg)
            return handler

        def on_skip(shown_pair: str, st: dict, request: gr.Request):
            st = session(st, request)
            if st.get("pair_id") and shown_pair != st["pair_id"]:
                return view(st, NOT_ON_SCREEN)
            if st.get("editing"):
                return view({"annotator": st["annotator"]}, "Left your earlier label as it was.")
            if st.get("annotator") and st.get("pair_id"):
                store.skip(st["annotator"], st["pair_id"])
                return view({"annotator": st["annotator"]}, "Skipped: that pair goes to someone else.")
            return view(st)

        def on_undo(st: dict, request: gr.Request):
            me = session(st, request).get("annotator")
            if not me:
                return view(st)
            undone = store.undo(me)
            if undone is None:
                return view({"annotator": me}, "Nothing to undo.")
            pair_id, action = undone
            back = None if action == "skip" else store.reopen(me, pair_id)
            if back is None:  # a skip or a new label taken back: the pair is served again only if others left room
                taken = "↶ Undone: your skip was taken back." if action == "skip" else \
                    "↶ Undone: your last label was taken back."
                served = store.next_item(me)  # the lease the undo took, if any: view() serves the same one
                if served is not None and served.pair_id == pair_id:
                    again = "Here is that pair again." if action == "skip" else "Label this pair again."
                    return view({"annotator": me}, f"{taken} {again}")
                return view({"annotator": me}, f"{taken} That pair is with others now (overlap {store.overlap}): it "
                                               f"comes back to you if they leave it.")
            return view({"annotator": me}, f"↶ Undone: your change was reverted (back to: {describe(back.label)}).")

        def on_open(pair_id: str | None, st: dict, request: gr.Request):
            st = session(st, request)
            if not st.get("annotator") or not pair_id:
                return view(st, "Pick one of your labels first.")
            return view({"annotator": st["annotator"], "pair_id": pair_id, "editing": True})  # reopen: own labels only

        def on_switch(st: dict, request: gr.Request):
            st = session(st, request)
            if use_login:  # one login, one annotator: log out to change
                return (*view(st, f"You are logged in as <b>{html.escape(request.username)}</b>."), gr.update())
            if st.get("annotator") and st.get("pair_id") and not st.get("editing"):
                store.release(st["annotator"], st["pair_id"])  # hand the open pair back at once
            return (*view({}, "Type the name to label as."), "")

        def on_stats():
            return to_html(stats_view(store.labels(with_text=False)), store.overlap, store.progress()["blocked"])

        demo.load(on_load, [saved_name], view_outputs)
        start.click(on_start, [name, state], view_outputs + [saved_name], api_name="start")
        name.submit(on_start, [name, state], view_outputs + [saved_name], api_name="start_on_enter")
        choice_of = {b_left: "left", b_right: "right", b_tie: "tie", b_bad: "both_bad"}

        def on_any_choice(strength_value: str, note_value: str, shown_pair: str, st: dict, request: gr.Request,
                          evt: gr.EventData):
            return on_choice(choice_of[evt.target])(strength_value, note_value, shown_pair, st, request)

        # One listener for the four choices, sending nothing while it runs (trigger_mode once): as four, a second key
        # pressed while the first saved ran beside it, and under load was saved first
        gr.on([b.click for b in choice_of], on_any_choice, [strength, note, on_screen, state], view_outputs,
              trigger_mode="once", api_visibility="private")
        for choice in choice_of.values():  # the API's endpoints, one a choice (the page's buttons use the one above)
            gr.Button(visible=False).click(on_choice(choice), [strength, note, on_screen, state], view_outputs,
                                           api_name=f"label_{choice}")
        b_skip.click(on_skip, [on_screen, state], view_outputs, api_name="skip")
        b_undo.click(on_undo, [state], view_outputs, api_name="undo")
        b_open.click(on_open, [earlier, state], view_outputs, api_name="open")
        b_switch.click(on_switch, [state], view_outputs + [saved_name], api_name="switch")
        b_stats.click(on_stats, None, stats_html, api_name="stats")
        stats_tab.select(on_stats, None, stats_html)
    return demo


def launch_kwargs() -> dict:
    """What every launch passes: shortcuts, styling, nothing that reaches beyond this machine (quiet: no hint to serve
    a public link; stages/label/__main__.py prints the address itself). Gradio's run history
    is off: its pages answer without a login and, for a client on this machine (an SSH tunnel, a proxy), call the Hub
    with this machine's token (HF_TOKEN or the saved login): anyone reaching the app could list and create buckets
    under the operator's name, and have every label saved there."""
    return dict(head=HEAD, css=CSS, share=False, ssr_mode=False, show_error=True, run_history=False, quiet=True)
