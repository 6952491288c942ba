"""bench/label_store.py: the store it builds holds the labels it says, and each figure is measured."""

from __future__ import annotations

import json


def test_the_bench_builds_its_store_and_writes_each_size(tmp_path):
    from bench.label_store import main

    result = main(["--sizes", "50", "--repeats", "2", "--output", str(tmp_path / "out.json")])
    row = result["sizes"][0]
    # 12 people at overlap 2 on 80% of 50 pairs (80 labels), 3 simulated annotators on all 50 (150), and the 2 clicks'
    assert row["pairs"] == 50 and row["labels"] == 80 + 150 + 2, row
    assert row["click_ms"] > 0 and row["next_pair_ms"] > 0 and row["stats_view_s"] >= 0, row
    assert json.loads((tmp_path / "out.json").read_text()) == result
