"""bench/bench_ppo.py: our side's harness at micro size (--ours-only: no TRL venv is made or used), JSON shape."""

from __future__ import annotations

import json

from tests.conftest import run_python


def test_bench_ppo_ours_only_micro(tmp_path):
    out = tmp_path / "ppo.json"
    res = run_python("bench.bench_ppo", ["--ours-only", "--scales", "micro", "--output", str(out),
                                         "--work_dir", str(tmp_path / "work")], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) == {"micro", "meta"} and "peer" not in data["micro"]
    ours = data["micro"]["ours"]
    for k in ("episodes_per_s", "gen_tokens_per_s", "peak_rss_mb", "reward_gain"):
        assert isinstance(ours[k], (int, float)), k
    assert ours["episodes_per_s"] > 0 and ours["peak_rss_mb"] > 100
    run = ours["runs"][0]["detail"]
    assert run["episodes"] == 16 and run["updates"] == 2  # micro: 2 updates x 8 episodes
    s = data["micro"]["settings"]
    assert s["batch_size"] == 8 and s["response_length"] == 32 and s["updates"] == 2
    assert data["meta"]["ours_only"] is True and data["meta"]["peer_python"] is None
    assert not (tmp_path / "work" / ".venv-trl112").exists()
