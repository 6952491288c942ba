"""bench/bench_shard.py: the check that sharding changed no logged figure."""

from __future__ import annotations

from bench.bench_shard import same_figures


def test_same_figures_is_equal_to_rel_1e5_key_by_key_and_row_by_row():
    rows = [{"update": 1, "reward": 0.5, "kl": 1e-3}, {"update": 2, "reward": -0.25, "kl": 2e-3}]
    assert same_figures(rows, [dict(r) for r in rows])
    assert same_figures(rows, [rows[0], {**rows[1], "reward": -0.25 * (1 + 5e-6)}])  # within rel 1e-5
    assert not same_figures(rows, [rows[0], {**rows[1], "reward": -0.25 * (1 + 3e-5)}])  # past it
    assert not same_figures(rows, [rows[0], {**rows[1], "update": 3}])  # a count differs
    assert not same_figures(rows, [rows[0], {"update": 2, "reward": -0.25}])  # a figure missing
    assert not same_figures(rows, rows[:1])  # a row missing
    # A figure near 0 is compared on the scale 1e-2: 1e-9 against 0 is equal, 1e-6 is not.
    assert same_figures([{"x": 0.0}], [{"x": 1e-9}]) and not same_figures([{"x": 0.0}], [{"x": 1e-6}])


def test_main_alternates_the_sides_and_summarises_each_ranks_median_by_hand(monkeypatch, tmp_path):
    """bench-shard's figures from faked runs: rounds alternate which side goes first; each rank's peak is its median
    over rounds (not the max or mean); saved_mb_per_rank is DDP's highest rank minus FSDP's (negative: sharding cost
    memory); same_metrics needs every round's two runs to agree."""
    import json

    from bench import bench_shard

    def fake_build(work, hidden, layers, seed=0):
        work.mkdir(parents=True, exist_ok=True)
        (work / "profile.yaml").write_text("name_or_path: x\ndtype: float32\n")
        return {"base_numel": 10, "hidden": hidden, "layers": layers, "weight_mb_fp32": 0.0}

    peaks = {"ddp": [[100.0, 90.0], [130.0, 80.0], [110.0, 85.0]], "fsdp": [[120.0, 70.0], [60.0, 75.0], [125.0, 72.0]]}
    eps = {"ddp": [0.3, 0.2, 0.4], "fsdp": [0.1, 0.05, 0.07]}
    order = []

    def fake_run_side(side, work, run, updates):
        r = int(run.split("-r")[1])
        order.append((side, r))
        logged = [{"update": 1, "reward": 0.5 if (side, r) != ("fsdp", 0) else 0.75}]
        return {"side": side, "wall_s": 1.0, "world_size": 2, "base_sharded": side == "fsdp",
                "peak_memory_mb_per_rank": peaks[side][r], "episodes_per_s": eps[side][r],
                "base_numel_per_rank": [10, 10] if side == "ddp" else [5, 5],
                "base_stored_numel_per_rank": [10, 10] if side == "ddp" else [5, 5], "logged": logged}

    monkeypatch.setattr(bench_shard, "build", fake_build)
    monkeypatch.setattr(bench_shard, "load_side", lambda side, profile: [{"rank": 0}, {"rank": 1}])
    monkeypatch.setattr(bench_shard, "run_side", fake_run_side)
    out = tmp_path / "shard.json"
    assert bench_shard.main(["--rounds", "3", "--work", str(tmp_path / "w"), "--output", str(out)]) == 0
    assert order == [("ddp", 0), ("fsdp", 0), ("fsdp", 1), ("ddp", 1), ("ddp", 2), ("fsdp", 2)]
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["ddp"]["peak_memory_mb_per_rank_median"] == [110.0, 85.0]
    assert s["fsdp"]["peak_memory_mb_per_rank_median"] == [120.0, 72.0]
    assert s["ddp"]["episodes_per_s_median"] == 0.3 and s["fsdp"]["episodes_per_s_median"] == 0.07
    assert res["saved_mb_per_rank"] == -10.0  # 110 - 120: each side's highest rank
    assert res["same_metrics"] is False  # round 0's runs logged another reward; rounds 1 and 2 agree
    assert set(res["load"]) == {"ddp float32", "fsdp float32", "ddp bfloat16", "fsdp bfloat16"}


def test_run_side_compares_every_logged_figure_but_the_timings(monkeypatch, tmp_path):
    """A run's logged rows keep every figure but the ones that measure time (the trainer's TIMING_KEYS): those differ
    between any two runs, and same_metrics would always be False. reward_std, made across ranks, is compared (a key
    holding "_s" was dropped)."""
    import json
    import subprocess

    from bench import bench_shard

    rows = [{"update": 1, "reward": 0.5, "reward_std": 0.2, "kl": 0.01, "time_update_s": 3.0, "time_generate_s": 1.2,
             "episodes_per_s": 0.3}]
    metrics = {"world_size": 2, "base_sharded": True, "peak_memory_mb_per_rank": [1.0, 2.0],
               "base_numel_per_rank": [5, 5], "base_stored_numel_per_rank": [5, 5], "episodes_per_s": 0.3}
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        stage = tmp_path / "runs" / "fsdp-r0" / "ppo"
        stage.mkdir(parents=True)
        (stage / "manifest.json").write_text(json.dumps({"metrics": metrics}))
        (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_shard.subprocess, "run", fake_run)
    got = bench_shard.run_side("fsdp", tmp_path, "fsdp-r0", 2)
    assert got["logged"] == [{"update": 1, "reward": 0.5, "reward_std": 0.2, "kl": 0.01}]
    assert got["peak_memory_mb_per_rank"] == [1.0, 2.0] and got["base_sharded"] is True
    cmd = seen[0]
    assert cmd[cmd.index("--config_file") + 1] == "configs/accelerate/fsdp_cpu2.yaml"
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--total_updates") + 1] == "2"


def test_build_reports_the_bases_elements_and_its_fp32_megabytes(monkeypatch, tmp_path):
    """The model line of the result: every element of the saved base, and their fp32 size (4 bytes each) in MiB, which
    is the saved checkpoint's size."""
    from bench import bench_shard
    from bench.story import n_params

    monkeypatch.setattr(bench_shard, "seeded_sft_and_reward", lambda *a, **k: None)
    info = bench_shard.build(tmp_path / "b", hidden=64, layers=1)
    saved = tmp_path / "b" / "base" / "model.safetensors"
    assert info["base_numel"] == n_params(saved) and (info["hidden"], info["layers"]) == (64, 1)
    assert abs(info["weight_mb_fp32"] - saved.stat().st_size / 2**20) <= 0.1
    assert bench_shard.build(tmp_path / "b", hidden=64, layers=1) == info  # built once
