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


def test_run_ours_gives_the_stage_the_peers_batch_and_raw_reward():
    """Our side's stage flags: episodes per update = per-device batch x grad-accum (one mini-batch), the raw reward
    (no normalisation, clipping or EOS penalty), no held-out split, and --stop-at-eos carried as the flag says."""
    from bench.run_ours import cli_parser, stage_args

    def flags(*extra):
        args = stage_args(cli_parser().parse_args(["run", "--model-dir", "m", "--work", "w", "--batch-size", "32",
                                                   "--per-device-batch", "8", "--seed", "7", *extra]))
        return dict(zip(args[::2], args[1::2]))

    f = flags()
    assert f["--per_device_train_batch_size"] == "8" and f["--gradient_accumulation_steps"] == "4"
    assert f["--num_mini_batches"] == "1" and f["--seed"] == "7" and f["--heldout_fraction"] == "0"
    assert (f["--normalize_reward"], f["--reward_clip"], f["--missing_eos_penalty"]) == ("false", "0", "0")
    assert f["--stop_at_eos"] == "false" and flags("--stop-at-eos")["--stop_at_eos"] == "true"


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


def test_side_args_seed_each_round_and_take_the_scales_lr():
    """Round r runs with seed 42 + r - 1; the story scale trains at its own lr (1e-3), the others at COMMON's."""
    from bench.bench_ppo import COMMON, SCALES, side_args

    def flags(scale, rnd):
        args = side_args(SCALES[scale], rnd)
        return dict(zip(args[::2], args[1::2]))

    assert flags("tiny", 1)["--seed"] == "42" and flags("tiny", 3)["--seed"] == "44"
    assert flags("story", 1)["--lr"] == "0.001" and flags("tiny", 1)["--lr"] == str(COMMON["lr"])
    assert flags("tiny", 1)["--updates"] == "12" and flags("tiny", 1)["--batch-size"] == "32"
    # the rest of the equal workload: micro-batch 8 (grad-accum 32 / 8), 4 PPO epochs, 32 tokens at 0.7, kl_coef 0.05
    assert (flags("tiny", 1)["--per-device-batch"], flags("tiny", 1)["--ppo-epochs"]) == ("8", "4")
    assert (flags("tiny", 1)["--response-length"], flags("tiny", 1)["--temperature"]) == ("32", "0.7")
    assert flags("tiny", 1)["--kl-coef"] == "0.05" and flags("micro", 1)["--per-device-batch"] == "4"


def test_side_result_figures_by_hand():
    from bench.bench_ppo import fitted_gain_se, side_result

    r = side_result({"episodes_per_s": 2.0, "gen_tokens_per_s": 64.0, "scores": [1.0, 0.0, 2.0, 4.0]}, 512.04, 3.0)
    assert r["reward_last_minus_first"] == 3.0 and r["peak_rss_mb"] == 512.0
    assert r["reward_gain"] == 3.3  # slope 1.1 over 3 steps
    assert r["reward_gain_se"] == fitted_gain_se([1.0, 0.0, 2.0, 4.0]) == 1.5588  # residuals 0.9, -1.2, -0.3, 0.6: 3 x sqrt(2.7 / 2 / 5)
    assert fitted_gain_se([1.0, 2.0]) is None  # two points: the line has no residual to measure


def _fake_ppo_bench(monkeypatch, tmp_path, scale: str, figures: dict, ours_only: bool = False,
                    gold_seen: list | None = None) -> tuple[dict, list]:
    """bench_ppo.bench_scale with the models and each side's runs faked (figures[side][key]: one value per round), and
    at the story scale the gold evaluation too (figures[side]["gold"]). Returns (the result, the run order)."""
    from bench import bench_ppo

    info = {"policy_params": 1, "reward_params": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1,
            "num_attention_heads": 1, "vocab_size": 1}
    (tmp_path / "BUILD_INFO.json").write_text(json.dumps(info))
    order = []

    def side(name):
        def run(scale, folder, s, rnd, *python):
            order.append((name, rnd))
            f = figures[name]
            return {"episodes_per_s": f["eps"][rnd - 1], "gen_tokens_per_s": 1.0, "peak_rss_mb": f["rss"][rnd - 1],
                    "reward_gain": f["gain"][rnd - 1], "reward_gain_se": 0.1, "process_wall_s": 1.0}
        return run

    def fake_add_gold(runs, gold, out, name, log):
        if gold_seen is not None:
            gold_seen.append(gold)
        for s, rs in runs.items():
            for r in rs:
                r["gold_gain"], r["kl_to_sft"] = figures[s]["gold"][r["round"] - 1], 1.0
        return [0.0]

    monkeypatch.setattr(bench_ppo, "build_models", lambda scale: tmp_path)
    monkeypatch.setattr(bench_ppo, "prepare_ours", lambda scale, model_dir: tmp_path)
    monkeypatch.setattr(bench_ppo, "peer_model_dir", lambda scale, model_dir: tmp_path)
    monkeypatch.setattr(bench_ppo, "story_dirs", lambda from_run=None: (tmp_path, tmp_path))
    monkeypatch.setattr(bench_ppo, "run_ours", side("ours"))
    monkeypatch.setattr(bench_ppo, "run_peer", side("peer"))
    monkeypatch.setattr(bench_ppo, "add_gold", fake_add_gold)
    return bench_ppo.bench_scale(scale, len(figures["ours"]["eps"]), "python", ours_only), order


def test_bench_ppo_alternates_the_sides_and_judges_its_targets(monkeypatch, tmp_path):
    """Rounds alternate which side goes first; reward_gain_diff is ours minus the peer's (medians over rounds); the
    speed target is a ratio of at least 1.5, 125m's memory target at most 0.6; the story scale adds the gold verdict."""
    figures = {"ours": {"eps": [3.0, 3.0, 3.0], "rss": [60.0, 60.0, 60.0], "gain": [0.5, 0.1, 0.2]},
               "peer": {"eps": [2.0, 2.0, 2.0], "rss": [100.0, 100.0, 100.0], "gain": [0.4, 0.9, 0.5]}}
    res, order = _fake_ppo_bench(monkeypatch, tmp_path, "125m", figures)
    assert order == [("ours", 1), ("peer", 1), ("peer", 2), ("ours", 2), ("ours", 3), ("peer", 3)]
    r = res["ratio"]
    assert r["reward_gain_diff"] == -0.3  # medians 0.2 and 0.5
    assert (r["episodes_per_s"], r["peak_rss_mb"]) == (1.5, 0.6)
    assert r["episodes_per_s_per_round"] == [1.5] * 3 and r["peak_rss_mb_per_round"] == [0.6] * 3
    assert r["meets_episodes_per_s_target"] is True and r["meets_peak_rss_target"] is True
    assert "meets_gold_gain_target" not in r
    s = res["settings"]
    assert (s["grad_accum"], s["episodes_per_run"], s["rounds"]) == (1, 16, 3)  # 125m: 8 / 8, 2 updates x 8
    figures["ours"].update(eps=[2.9] * 3, rss=[61.0] * 3)
    r = _fake_ppo_bench(monkeypatch, tmp_path, "125m", figures)[0]["ratio"]
    assert (r["episodes_per_s"], r["peak_rss_mb"]) == (1.45, 0.61)
    assert r["meets_episodes_per_s_target"] is False and r["meets_peak_rss_target"] is False
    figures["ours"]["gold"], figures["peer"]["gold"] = [0.1, 0.2, 0.3], [0.3, 0.4, 0.5]
    r = _fake_ppo_bench(monkeypatch, tmp_path, "story", figures)[0]["ratio"]
    assert r["gold_gain_diff"] == -0.2 and r["meets_gold_gain_target"] is False
    res = _fake_ppo_bench(monkeypatch, tmp_path, "story", figures)[0]
    assert (res["ours"]["gold_gain"], res["peer"]["gold_gain"], res["ours"]["kl_to_sft"]) == (0.2, 0.4, 1.0)


def test_bench_ppo_ours_only_never_runs_the_peer(monkeypatch, tmp_path):
    figures = {"ours": {"eps": [3.0, 3.0], "rss": [60.0, 60.0], "gain": [0.5, 0.1]}}
    res, order = _fake_ppo_bench(monkeypatch, tmp_path, "tiny", {**figures, "peer": figures["ours"]}, ours_only=True)
    assert order == [("ours", 1), ("ours", 2)]
    assert "peer" not in res and "ratio" not in res and res["ours"]["reward_gain"] == 0.3
    assert (res["settings"]["grad_accum"], res["settings"]["episodes_per_run"]) == (4, 384)  # 32 / 8; 12 updates x 32


def test_run_ours_scores_the_policys_tokens_and_names_the_story_policy(monkeypatch, tmp_path):
    """Our side reads the reward on the policy's token ids (as TRL 1.12's peer), and at the story scale hands the
    trained adapter on its base to the gold evaluation."""
    from bench import bench_ppo

    cmds = []

    def fake_run_child(cmd, logfile, want_json=True):
        cmds.append(cmd)
        return {"episodes_per_s": 1.0, "gen_tokens_per_s": 2.0, "scores": [0.0, 1.0], "adapter": "ad"}, 10.0, 1.0

    monkeypatch.setattr(bench_ppo, "run_child", fake_run_child)
    monkeypatch.setattr(bench_ppo, "base_of", lambda work: tmp_path / "base")
    story = bench_ppo.run_ours("story", tmp_path, bench_ppo.SCALES["story"], 1)
    tiny = bench_ppo.run_ours("tiny", tmp_path, bench_ppo.SCALES["tiny"], 1)
    assert all(c[c.index("--reward-input") + 1] == "tokens" for c in cmds)
    assert story["policy"] == [str(tmp_path / "base"), "ad"] and tiny["policy"] is None


def test_the_peers_value_model_starts_from_our_merged_reward_model(monkeypatch, tmp_path):
    from bench import bench_ppo

    monkeypatch.setattr(bench_ppo, "OUT", tmp_path)
    model_dir = tmp_path / "models" / "tiny"
    for folder in (model_dir / "policy", tmp_path / "ours" / "tiny" / "peer_reward"):
        folder.mkdir(parents=True)
    for f in ("prompts.json", "BUILD_INFO.json"):
        (model_dir / f).write_text("{}")
    peer = bench_ppo.peer_model_dir("tiny", model_dir)
    reward = (tmp_path / "ours" / "tiny" / "peer_reward").resolve()
    assert (peer / "reward").resolve() == (peer / "value").resolve() == reward
    assert (peer / "policy").resolve() == (model_dir / "policy").resolve()


def test_bench_ppo_main_takes_rounds_at_tiny_and_story_only_and_the_lr_and_updates(monkeypatch, tmp_path):
    from bench import bench_ppo

    seen = []
    monkeypatch.setattr(bench_ppo, "OUT", bench_ppo.OUT)
    monkeypatch.setitem(bench_ppo.COMMON, "lr", bench_ppo.COMMON["lr"])
    for sc in bench_ppo.SCALES:
        monkeypatch.setitem(bench_ppo.SCALES, sc, dict(bench_ppo.SCALES[sc]))
    ours = {k: 0.0 for k in bench_ppo.METRICS}

    def bench_scale(scale, rounds, peer_python, ours_only, from_run=None):
        seen.append((scale, rounds, bench_ppo.SCALES[scale]["updates"], bench_ppo.COMMON["lr"]))
        return {"ours": ours}

    monkeypatch.setattr(bench_ppo, "bench_scale", bench_scale)
    bench_ppo.main(["--scales", "tiny,125m,micro", "--ours-only", "--rounds", "5", "--updates", "3", "--lr", "0.01",
                    "--output", str(tmp_path / "ppo.json"), "--work_dir", str(tmp_path)])
    assert seen == [("tiny", 5, 3, 0.01), ("125m", 1, 3, 0.01), ("micro", 1, 3, 0.01)]


def test_run_ours_passes_every_workload_flag_and_refuses_a_ragged_batch():
    """Each of the harness's workload flags reaches the stage as given (none left at run_ours' default), and a batch
    that is not a whole number of micro-batches is refused before the stage runs."""
    from bench.run_ours import cli_parser, main_cli, stage_args

    args = stage_args(cli_parser().parse_args([
        "run", "--model-dir", "m", "--work", "w", "--updates", "5", "--batch-size", "12", "--per-device-batch", "3",
        "--ppo-epochs", "2", "--response-length", "7", "--temperature", "0.9", "--lr", "0.002", "--kl-coef", "0.2",
        "--seed", "9", "--samples-per-prompt", "3", "--config", "configs/grpo.yaml"]))
    f = dict(zip(args[::2], args[1::2]))
    assert (f["--total_updates"], f["--per_device_train_batch_size"], f["--gradient_accumulation_steps"]) == ("5", "3", "4")
    assert (f["--num_ppo_epochs"], f["--response_length"], f["--temperature"]) == ("2", "7", "0.9")
    assert (f["--learning_rate"], f["--kl_coef"], f["--seed"]) == ("0.002", "0.2", "9")
    assert f["--num_samples_per_prompt"] == "3" and f["--config"] == "configs/grpo.yaml"
    assert "--num_samples_per_prompt" not in stage_args(cli_parser().parse_args(["run", "--model-dir", "m", "--work", "w"]))
    with pytest.raises(SystemExit, match="multiple of --per-device-batch"):
        main_cli(["run", "--model-dir", "m", "--work", "w", "--batch-size", "10", "--per-device-batch", "4"])


def test_run_ours_prepare_makes_the_peers_lora_shape_and_head(tmp_path):
    """bench.run_ours prepare: the policy's and the reward model's LoRA are the peer's (r 16, alpha 32, the 7
    projections), the reward adapter carries the peer reward model's score head, and the peer gets the prompts."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from bench import story
    from bench.run_ours import PROJ, prepare

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    story.micro_base(tmp_path).rename(model_dir / "policy")  # a 2-layer random Llama on the tiny tokenizer
    torch.manual_seed(5)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir / "policy", num_labels=1)
    reward.save_pretrained(model_dir / "reward")
    prompts = ["Once upon a time", "The dog", "It rained", "A cat sat"]
    (model_dir / "prompts.json").write_text(json.dumps(prompts))
    prepare(model_dir, tmp_path / "work")
    for name in ("sft", "rm"):
        cfg = json.loads((tmp_path / "work" / name / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], sorted(cfg["target_modules"])) == (16, 32, 0.0, sorted(PROJ))
    head = [v for k, v in load_file(str(tmp_path / "work" / "rm" / "adapter_model.safetensors")).items() if "score" in k]
    assert len(head) == 1 and torch.equal(head[0], reward.score.weight.data)
    rows = [json.loads(line)["prompt"] for line in (tmp_path / "work" / "prompts.jsonl").read_text().splitlines()]
    assert rows == prompts and (tmp_path / "work" / "peer_reward" / "model.safetensors").is_file()


def test_the_story_gold_samples_as_the_sides_trained(monkeypatch, tmp_path):
    """The gold evaluation samples each trained policy at the training temperature and response length (the flags
    both sides ran with), with the scale's samples per prompt: a policy judged at another temperature is not the
    policy that was trained."""
    from bench import bench_ppo

    figures = {side: {"eps": [1.0], "rss": [1.0], "gain": [0.0], "gold": [0.0]} for side in ("ours", "peer")}
    seen = []
    _fake_ppo_bench(monkeypatch, tmp_path, "story", figures, gold_seen=seen)
    (gold,) = seen
    flags = dict(zip(*[iter(bench_ppo.side_args(bench_ppo.SCALES["story"], 1))] * 2))
    assert str(gold.common["temperature"]) == flags["--temperature"] == "0.7"
    assert str(gold.common["response_length"]) == flags["--response-length"] == "32"
    assert gold.samples == bench_ppo.SCALES["story"]["gold_samples"] and gold.work == tmp_path


def test_each_round_trains_and_gold_scores_its_own_policy(monkeypatch, tmp_path):
    """The gold is measured after every round: each round's policy must be its own (our run folder ppo-r<round>, the
    peer's --save-policy folder <scale>-policy-r<round>), else every round would be scored on the last one's policy."""
    from bench import bench_ppo

    cmds = []

    def fake_run_child(cmd, logfile, want_json=True):
        cmds.append(cmd)
        run = cmd[cmd.index("--run") + 1] if "--run" in cmd else "peer"
        res = {"episodes_per_s": 1.0, "gen_tokens_per_s": 2.0, "scores": [0.0, 1.0], "adapter": f"/runs/{run}"}
        return res, 1.0, 1.0

    monkeypatch.setattr(bench_ppo, "run_child", fake_run_child)
    monkeypatch.setattr(bench_ppo, "base_of", lambda work: tmp_path / "base")
    monkeypatch.setattr(bench_ppo, "OUT", tmp_path)
    s = bench_ppo.SCALES["story"]
    ours = [bench_ppo.run_ours("story", tmp_path, s, rnd) for rnd in (1, 2)]
    peer = [bench_ppo.run_peer("story", tmp_path / "peer", s, rnd, "python") for rnd in (1, 2)]
    assert [c[c.index("--run") + 1] for c in cmds[:2]] == ["ppo-r1", "ppo-r2"]
    assert [r["policy"][1] for r in ours] == ["/runs/ppo-r1", "/runs/ppo-r2"]
    saved = [c[c.index("--save-policy") + 1] for c in cmds[2:]]
    assert saved == [str(tmp_path / "peer_trl112" / f"story-policy-r{rnd}") for rnd in (1, 2)]
    assert [r["policy"] for r in peer] == [[str(tmp_path / "peer" / "policy"), path] for path in saved]


def test_lr_flag_reaches_every_scale(monkeypatch):
    """`--lr` is "the learning rate for both sides": the story scale's own 1e-3 won over it, silently."""
    import copy

    from bench import bench_ppo

    monkeypatch.setattr(bench_ppo, "SCALES", copy.deepcopy(bench_ppo.SCALES))
    monkeypatch.setattr(bench_ppo, "COMMON", copy.deepcopy(bench_ppo.COMMON))
    bench_ppo.set_lr(5e-4)
    for scale in bench_ppo.SCALES.values():
        args = bench_ppo.side_args(scale, 1)
        assert args[args.index("--lr") + 1] == "0.0005"


def test_reward_gain_target_is_a_verdict_that_can_fail():
    """"reward gain >= the peer's" had no verdict at the tiny and 125m scales (the difference alone was written):
    met unless ours is below the peer's by more than the SE of the difference, sqrt(0.3^2 + 0.4^2) = 0.5 here."""
    from bench.harness import gain_verdict

    reward_gain_verdict = lambda ours, peer: gain_verdict(ours, peer, "reward_gain", mean="reward_gain")  # noqa: E731
    peer = {"reward_gain": 1.0, "reward_gain_se": 0.4}
    assert reward_gain_verdict({"reward_gain": 0.51, "reward_gain_se": 0.3}, peer) == {
        "reward_gain_diff": -0.49, "reward_gain_diff_se": 0.5, "meets_reward_gain_target": True}
    assert reward_gain_verdict({"reward_gain": 0.49, "reward_gain_se": 0.3}, peer)["meets_reward_gain_target"] is False
    assert reward_gain_verdict({"reward_gain": 0.49, "reward_gain_se": None}, peer)["meets_reward_gain_target"] is None
