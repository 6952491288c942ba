"""The labeling app on a big label store: what one click and one Stats view cost as the pairs grow.

A store of N pairs is built through the store's own API (scaled like a team's: 12 people at overlap 2 who labeled 80%
of the pairs, and 3 simulated annotators on every pair), then timed, each the median of its repeats:
- a click: one label saved, the next pair, the annotator's progress and recent labels (what the app does per click);
- the next pair alone (it holds the store's write lock, which every other annotator's click waits for);
- the Stats tab: the labels without their texts, summarised.

    python -m bench.label_store                      # 5,000 and 50,000 pairs -> bench/results/label_store.json
    python -m bench.label_store --sizes 500 5000     # others
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.run import atomic_write_json
from stages.label.stats import stats_view
from stages.label.store import LabelStore
from stages.simulate import simulator_store

PEOPLE, OVERLAP, LABELED_SHARE, SIMULATED = 12, 2, 0.8, 3


def build(path: Path, n: int, seed: int = 0) -> list[str]:
    """A store of n pairs with people's and simulated labels; the pair ids in serving order."""
    rng = random.Random(seed)
    words = "the a happy sad cat dog ran home little great glad said rabbit queen king garden".split()
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    pairs = [{"pair_id": f"p{i:07d}", "prompt": [{"role": "user", "content": text(40)}],
              "responses": [text(30), text(30)]} for i in range(n)]
    store = simulator_store(path, overlap=OVERLAP)
    store.import_items(pairs)
    with store._tx() as con:  # people's labels, written as the app writes them, in one transaction for speed
        for k, p in enumerate(pairs[: int(LABELED_SHARE * n)]):
            for j in range(OVERLAP):
                who = f"person{(k + j) % PEOPLE}"
                store._save_label(con, who, p["pair_id"], rng.choice(["left", "right", "tie"]),
                                  store.shown_left(p["pair_id"], who))
    store.save_simulated([], [(f"sim:sentiment-{s}", p["pair_id"], rng.choice(["left", "right", "tie"]), 0)
                              for s in range(1, SIMULATED + 1) for p in pairs])
    store.keepalive.close()
    return [p["pair_id"] for p in pairs]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(n: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labels.sqlite"
        t = time.perf_counter()
        build(path, n)
        built_s = time.perf_counter() - t
        t = time.perf_counter()
        store = LabelStore(path, overlap=OVERLAP)
        open_s = time.perf_counter() - t
        me = "newcomer"

        def click():
            item = store.next_item(me)
            store.save_label(me, item.pair_id, "left", item.shown_left)
            store.next_item(me)
            store.progress(me)
            store.my_labels(me)

        click_s = timed(click, repeats)
        visitors = (f"visitor{i}" for i in range(repeats))  # each a newcomer: a held pair would be handed back as is
        next_s = timed(lambda: store.next_item(next(visitors)), repeats)
        stats_s = timed(lambda: stats_view(store.labels(with_text=False)), max(1, repeats // 3))
        labels = len(store.labels(with_text=False))
    return {"pairs": n, "labels": labels, "build_s": round(built_s, 1), "open_store_ms": round(1000 * open_s, 1),
            "click_ms": round(1000 * click_s, 1), "next_pair_ms": round(1000 * next_s, 1),
            "stats_view_s": round(stats_s, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--output", default="bench/results/label_store.json")
    args = ap.parse_args(argv)
    rows = []
    for n in args.sizes:
        rows.append(measure(n, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    result = {"what": __doc__.splitlines()[0], "people": PEOPLE, "overlap": OVERLAP, "labeled_share": LABELED_SHARE,
              "simulated_annotators": SIMULATED, "repeats": args.repeats, "sizes": rows}
    atomic_write_json(Path(args.output), result)
    return result


if __name__ == "__main__":
    main()
