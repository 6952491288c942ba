"""Property: any pairs file the labeling app is pointed at either loads completely or is refused with one ConfigError,
and the label store sees either the whole file or nothing (hypothesis; ~100 random files, a few seconds)."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError
from pipeline.run import StageRun
from stages.label.__main__ import load_pairs
from stages.label.config import LabelArgs
from stages.label.store import LabelStore

SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None  # every example fsyncs a fresh store
HUGE = "x" * 200_000
texts = st.text(max_size=20) | st.sampled_from(["", " ", HUGE, "\ud800 lone surrogate", "\x00nul", "é\u2028ü"])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=6)
messages = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | json_values,
                                  "content": texts | json_values})
ids = st.sampled_from(["p0", "p1", "p2"]) | texts | json_values  # repeats and wrong types both
pairs = st.fixed_dictionaries({}, optional={"pair_id": ids, "prompt": st.lists(messages, max_size=3) | json_values,
                                            "responses": st.lists(texts, max_size=3) | json_values, "extra": json_values})
good_pairs = st.builds(lambda i, q, a, b: {"pair_id": i, "prompt": [{"role": "user", "content": q}], "responses": [a, b]},
                       st.integers(0, 10**6).map(lambda i: f"g{i}") | texts, texts, texts, texts)
lines = (good_pairs.map(json.dumps) | pairs.map(json.dumps) | json_values.map(json.dumps)
         | st.binary(max_size=30) | st.just(b"\xff\xfe not utf-8"))
files = st.lists(good_pairs.map(json.dumps), min_size=1, max_size=4) | st.lists(lines, max_size=5)  # some load


def test_random_pairs_files_load_whole_or_raise_one_config_error():
    outcomes = Counter()

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(files)
    def check(file_lines):
        with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
            path = Path(tmp) / "pairs.jsonl"
            path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass")
                                        for x in file_lines))
            store = LabelStore(Path(tmp) / "labels.sqlite")
            store.import_items([{"pair_id": "old", "prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"]}])
            store.save_label("ann", "old", "left", 0)
            before = (store.labels(), store.progress())
            try:
                loaded = load_pairs(LabelArgs(pairs_dataset=str(path)), StageRun("label", "fuzz", str(Path(tmp) / "runs")))
            except ConfigError as err:
                assert str(path) in str(err) and "\n" not in str(err)  # one line, naming the file
                assert (store.labels(), store.progress()) == before
                outcomes["refused"] += 1
                return
            json.dumps(loaded, ensure_ascii=False).encode("utf-8")  # valid Unicode: the page and the export can carry it
            store.import_items(loaded)
            assert store.progress()["pairs"] == len(loaded) == len({p["pair_id"] for p in loaded})  # all of it
            # the earlier pair's label is kept whole; it is current only if the new file holds that pair again
            again = "old" in {p["pair_id"] for p in loaded}
            assert store.labels() == [{**lab, "current": again} for lab in before[0]]
            outcomes["loaded"] += 1

    check()
    assert outcomes["loaded"] >= 5 and outcomes["refused"] >= 20, outcomes
