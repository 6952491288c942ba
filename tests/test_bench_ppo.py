"""bench/bench_ppo.py: our side's harness at micro size (--ours-only: no TRL venv is made or used), JSON shape."""

from __future__ import annotations

import json

import pytest

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
    # Both sides maximise one reward function: the peer's reward and value models are our reward model, merged
    # (run_ours prepare refuses to finish if the merged model scores differently from the adapter).
    import bench.bench_ppo as bp

    bp.OUT = tmp_path / "work"
    peer = bp.peer_model_dir("micro", tmp_path / "work" / "models" / "micro")
    assert (peer / "reward").resolve() == (tmp_path / "work" / "ours" / "micro" / "peer_reward").resolve()
    assert (peer / "value" / "config.json").exists() and (peer / "policy" / "config.json").exists()
    assert json.loads((peer / "reward" / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    # reward_gain: the fitted line over every update's mean score, the same arithmetic for both sides
    assert ours["runs"][0]["reward_gain"] == bp.fitted_gain(run["scores"]) and len(run["scores"]) == 2
    # The reward model reads the policy's token ids, as the peer's PPOTrainer does (not the decoded reply re-templated)
    assert run["stage_args"][run["stage_args"].index("--reward_input") + 1] == "tokens"


def test_run_ours_reward_input_reaches_the_stage():
    """bench-rl's side keeps the stage's chat default (its TRL 1.16 peer re-templates the reply too); bench-ppo
    asks for tokens (its TRL 1.12 peer scores the token ids)."""
    from bench.run_ours import cli_parser, stage_args

    def reward_input(*extra):
        args = stage_args(cli_parser().parse_args(["run", "--model-dir", "m", "--work", "w", *extra]))
        return args[args.index("--reward_input") + 1]

    assert reward_input() == "chat" and reward_input("--reward-input", "tokens") == "tokens"
    with pytest.raises(SystemExit):
        cli_parser().parse_args(["run", "--model-dir", "m", "--work", "w", "--reward-input", "text"])


def test_fitted_gain_by_hand():
    from bench.bench_ppo import fitted_gain, fitted_gain_se

    assert fitted_gain([0.0, 1.0, 2.0]) == 2.0
    assert fitted_gain([1.0, 0.0]) == -1.0
    assert fitted_gain([0.0, 3.0, 0.0, 3.0]) == 1.8  # slope 0.6 over 3 steps: noise partly cancels
    assert fitted_gain([5.0]) is None and fitted_gain(None) is None
    assert fitted_gain_se([0.0, 1.0, 2.0, 3.0]) == 0.0  # on the line: no noise
    assert fitted_gain_se([0.0, 3.0, 0.0, 3.0]) == pytest.approx(3 * (7.2 / 2 / 5) ** 0.5, abs=1e-4)


def test_from_run_reaches_the_story_build(tmp_path, monkeypatch):
    """--from_run: bench-ppo's story scale builds from that run's models (bench.story build --from_run), as
    bench-rl's does; without it the build trains them."""
    from bench import bench_ppo

    calls = []
    monkeypatch.setattr(bench_ppo, "run_child", lambda cmd, log, want_json=True: calls.append(cmd))
    monkeypatch.setattr(bench_ppo, "OUT", tmp_path)
    bench_ppo.story_dirs(str(tmp_path / "runs/default"))
    bench_ppo.story_dirs()
    with_run, without = calls[0], calls[2]
    assert with_run[with_run.index("--from_run") + 1] == str(tmp_path / "runs/default")
    assert "--from_run" not in without and "build" in without

    class Measured(Exception):  # stop main() at the measurement, with what it was given
        pass

    def bench_scale(scale, rounds, peer_python, ours_only, from_run=None):
        raise Measured(scale, from_run)

    monkeypatch.setattr(bench_ppo, "bench_scale", bench_scale)
    with pytest.raises(Measured) as got:
        bench_ppo.main(["--scales", "story", "--ours-only", "--from_run", str(tmp_path / "runs/default"),
                        "--output", str(tmp_path / "ppo.json"), "--work_dir", str(tmp_path)])
    assert got.value.args == ("story", str((tmp_path / "runs/default").resolve()))
