"""bench/story_seeds.py: the seed summary (hand-computed) and the make call it builds for a seed."""
import subprocess

import pytest

from bench import story_seeds


def test_gain_summary_mean_and_standard_error_by_hand():
    s = story_seeds.gain_summary([0.1, 0.3, 0.2])
    assert s["gold_gain_mean"] == pytest.approx(0.2)
    assert s["gold_gain_se"] == pytest.approx(0.1 / 3 ** 0.5)  # sample std 0.1
    assert s["every_seed_positive"] is True
    assert story_seeds.gain_summary([0.1, -0.01, 0.2])["every_seed_positive"] is False
    assert story_seeds.gain_summary([0.0, 0.1])["every_seed_positive"] is False  # no gain is not a gain


def test_a_seed_without_a_figure_leaves_it_out_of_the_median():
    assert story_seeds.median_given([0.7, None, 0.8, 0.75]) == 0.75
    assert story_seeds.median_given([None, None]) is None


def test_every_training_stage_gets_the_seed(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(story_seeds.subprocess, "run", fake_run)
    story_seeds.make(["sft", "rm", "ppo"], "seed-7", tmp_path, 7)
    cmd = seen["cmd"]
    assert cmd[:4] == ["make", "sft", "rm", "ppo"]
    for var in ("SFT_ARGS", "PAIRS_ARGS", "SIMULATE_ARGS", "RM_ARGS", "PPO_ARGS"):
        assert f"{var}=--seed 7" in cmd
    assert "RUN=seed-7" in cmd and f"RUNS_DIR={tmp_path}" in cmd
    assert "FORCE=1" not in cmd
    story_seeds.make(["eval"], "seed-7", tmp_path, 7, force=True)
    assert seen["cmd"][-1] == "FORCE=1"
    story_seeds.make(["sft", "rm", "ppo"], "seed-7", tmp_path, 7, rm_args="--ensemble 1", ppo_args="--kl_coef 0.15")
    assert "RM_ARGS=--seed 7 --ensemble 1" in seen["cmd"] and "PPO_ARGS=--seed 7 --kl_coef 0.15" in seen["cmd"]


def test_a_seed_starts_from_an_empty_run_folder(monkeypatch, tmp_path):
    """A seed's folder left by an earlier bench would make `make sft rm ppo` skip its stages as up to date, and the
    recorded wall time would leave them out: the bench deletes it before the first make call."""
    stale = tmp_path / "seed-5" / "sft" / "manifest.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    seen = []

    def fake_make(targets, run, runs_dir, seed, rm_args="", ppo_args="", force=False):
        seen.append(((runs_dir / run).exists(), targets))
        raise SystemExit("stop after the first call")

    monkeypatch.setattr(story_seeds, "make", fake_make)
    with pytest.raises(SystemExit):
        story_seeds.one_seed(5, tmp_path, samples=1)
    assert seen == [(False, ["sft", "rm", "ppo"])]


def test_a_variants_stage_flags_go_to_every_make_call(monkeypatch, tmp_path):
    """`make eval` would retrain a stage whose flags differ from its manifest's: the variant's flags go to both calls."""
    calls = []

    def fake_make(targets, run, runs_dir, seed, rm_args="", ppo_args="", force=False):
        calls.append((targets, rm_args, ppo_args))
        if targets == ["eval"]:
            raise SystemExit("stop after the eval call")
        return 1.0

    monkeypatch.setattr(story_seeds, "make", fake_make)
    with pytest.raises(SystemExit):
        story_seeds.one_seed(5, tmp_path, samples=1, rm_args="--ensemble 1", ppo_args="--kl_coef 0.15")
    assert calls == [(["sft", "rm", "ppo"], "--ensemble 1", "--kl_coef 0.15"), (["eval"], "--ensemble 1", "--kl_coef 0.15")]


def test_one_seeds_gold_gain_is_ppo_minus_sft(monkeypatch, tmp_path):
    """A seed's gold gain is eval's PPO gold mean minus its SFT one; its samples are the first n of the report's."""
    import json

    ev = {"gold_sft_mean": 0.25, "gold_ppo_mean": 0.75, "gold_win_rate": 0.6}

    def fake_make(targets, run, runs_dir, seed, rm_args="", ppo_args="", force=False):
        if targets == ["eval"]:
            for stage, metrics in (("eval", ev), ("rm", {"eval_accuracy": 0.7}), ("simulate", {"agreement_with_gold": 0.8})):
                (runs_dir / run / stage).mkdir(parents=True, exist_ok=True)
                (runs_dir / run / stage / "manifest.json").write_text(json.dumps({"metrics": metrics}))
            rows = [{"prompt_text": f"p{i}", "gold_ppo": i} for i in range(3)]
            (runs_dir / run / "eval" / "report.json").write_text(json.dumps({"samples": rows}))
        return 1.0

    monkeypatch.setattr(story_seeds, "make", fake_make)
    got = story_seeds.one_seed(5, tmp_path, samples=2)
    assert got["gold_gain"] == 0.5 and got["rm_heldout_accuracy"] == 0.7 and got["gold_win_rate"] == 0.6
    assert got["simulator_agreement_with_gold"] == 0.8 and got["wall_s"] == {"sft_rm_ppo_s": 1.0, "eval_s": 1.0}
    assert [s["prompt_text"] for s in got["samples"]] == ["p0", "p1"]


def test_split_prompts_holds_out_a_seeded_fifth_nothing_trains_on(tmp_path):
    """bench/story.py: one seeded split (the same every build), a fifth held out, disjoint from the training prompts
    and together all of them; --limit shortens the held-out file only."""
    from bench.story import split_prompts

    source = tmp_path / "prompts.jsonl"
    rows = [f'{{"prompt": "p{i}"}}' for i in range(50)]
    source.write_text("\n".join(rows) + "\n")
    splits = []
    for name, limit in (("a", None), ("b", None), ("c", 3)):
        (tmp_path / name).mkdir()
        split_prompts(tmp_path / name, source, limit)
        splits.append([(tmp_path / name / f).read_text().splitlines() for f in ("heldout.jsonl", "prompts.jsonl")])
    (held, train), again, (short, train_c) = splits
    assert len(held) == 10 and len(train) == 40 and not set(held) & set(train) and sorted(held + train) == sorted(rows)
    assert again == [held, train] and held != rows[:10] and held != rows[-10:]
    assert short == held[:3] and train_c == train


def test_one_seeds_gain_has_no_standard_error_and_medians_are_not_means():
    """One seed: the mean gain and no SE (None, not 0.0: nothing measured); median_given is a median, not a mean."""
    assert story_seeds.gain_summary([0.3]) == {"gold_gain_mean": 0.3, "gold_gain_se": None, "every_seed_positive": True}
    assert story_seeds.median_given([0.1, None, 0.2, 0.9]) == 0.2  # mean 0.4


def test_main_summarises_the_seeds_by_hand(monkeypatch, tmp_path):
    """bench-story's summary: the mean gold gain (PPO minus SFT per seed) with its SE, and each median over the seeds'
    own figure (a seed without it left out), the wall time's too; the file written is the result returned."""
    import json

    per = {1: (0.1, 0.9, 0.6, 0.7, 2.0, 100.0), 2: (0.2, 0.8, 0.7, None, 3.0, 110.0), 3: (0.6, 0.7, 0.95, 0.9, 10.0, 200.0)}
    seen = []

    def fake_one_seed(seed, runs_dir, samples, rm_args="", ppo_args="", trained_s=None):
        seen.append((seed, samples, rm_args, ppo_args))
        gain, ppo, win, agree, kl, wall = per[seed]
        return {"seed": seed, "gold_gain": gain, "gold_ppo_mean": ppo, "gold_sft_mean": ppo - gain,
                "gold_win_rate": win, "rm_gold_agreement": agree, "kl_mean": kl, "wall_s": {"sft_rm_ppo_s": wall},
                "samples": []}

    monkeypatch.setattr(story_seeds, "one_seed", fake_one_seed)
    out = tmp_path / "story.json"
    got = story_seeds.main(["--seeds", "1", "2", "3", "--samples", "2", "--rm_args", "--ensemble 1",
                            "--output", str(out)])
    assert seen == [(1, 2, "--ensemble 1", ""), (2, 2, "--ensemble 1", ""), (3, 2, "--ensemble 1", "")]
    s = got["summary"]
    assert s["gold_gain_mean"] == pytest.approx(0.3) and s["gold_gain_se"] == pytest.approx((0.07 / 3) ** 0.5)
    assert s["every_seed_positive"] is True
    assert s["gold_win_rate_median"] == 0.7 and s["kl_mean_median"] == 3.0  # means 0.75 and 5.0
    assert s["rm_gold_agreement_median"] == pytest.approx(0.8)  # seed 2 has none
    assert s["sft_rm_ppo_wall_s_median"] == 110.0  # mean 136.7
    assert got["stage_args"] == {"rm": "--ensemble 1", "ppo": ""}
    assert json.loads(out.read_text()) == got


def test_ppo_peer_folder_links_the_reward_model_as_the_value_and_templates_the_prompts(tmp_path):
    """bench-ppo's story peer: policy = the merged SFT policy, reward and value = the merged reward model (TRL 1.12
    starts its value model from the reward model, as ours), and the training prompts chat-templated with the
    assistant's header opened (the peer generates straight after them)."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from bench.story import ppo_peer_folder
    from pipeline.config import REPO_ROOT

    work, peer = tmp_path / "work", tmp_path / "peer"
    tok = AutoTokenizer.from_pretrained(REPO_ROOT / "models" / "tiny")
    for name, tensors in (("peer_policy", {"w": torch.zeros(2, 3)}), ("peer_reward", {"w": torch.zeros(5)})):
        (work / name).mkdir(parents=True)
        save_file(tensors, str(work / name / "model.safetensors"))
    tok.save_pretrained(work / "peer_policy")
    LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=len(tok)).save_pretrained(work / "peer_policy")
    prompts = [[{"role": "user", "content": "Tell a story about a cat."}], [{"role": "user", "content": "A dog ran."}]]
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    ppo_peer_folder(work, peer)
    assert (peer / "policy").resolve() == (work / "peer_policy").resolve()
    assert (peer / "reward").resolve() == (peer / "value").resolve() == (work / "peer_reward").resolve()
    texts = json.loads((peer / "prompts.json").read_text())
    assert texts == [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    assert texts != [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=False) for p in prompts]
    info = json.loads((peer / "BUILD_INFO.json").read_text())
    assert (info["policy_params"], info["reward_params"], info["hidden_size"], info["num_hidden_layers"]) == (6, 5, 8, 1)


def test_the_story_chain_runs_every_stage_with_its_config_and_one_reward_model(monkeypatch, tmp_path):
    """bench.story's own chain: sft, pairs, simulate, label export and rm, in that order, each with its config and
    the bench's run, and the reward model alone (--ensemble 1: both sides are rewarded by one model)."""
    from bench import story

    cmds = []
    monkeypatch.setattr(story.subprocess, "run", lambda cmd, **kw: cmds.append(cmd))
    monkeypatch.setattr(story, "run_adapters", lambda run_dir: (run_dir, run_dir))
    assert story.run_stages(tmp_path) == (tmp_path / "runs" / "bench",) * 2
    assert [c[2] for c in cmds] == ["stages.sft", "stages.pairs", "stages.simulate", "stages.label.export", "stages.rm"]
    assert [c[c.index("--config") + 1] for c in cmds] == ["configs/sft.yaml", "configs/pairs.yaml",
                                                           "configs/simulate.yaml", "configs/label.yaml", "configs/rm.yaml"]
    assert all(c[c.index("--run") + 1] == "bench" for c in cmds)
    assert cmds[-1][-2:] == ["--ensemble", "1"] and "--ensemble" not in cmds[0]


def test_merging_refuses_a_merged_model_whose_outputs_differ(tmp_path, monkeypatch):
    """bench.story.merged saves the adapter merged into its base only if the merged model gives the adapter's logits:
    a merge that changed them is one error, and nothing is saved."""
    import torch
    from peft.tuners.tuners_utils import BaseTuner

    from bench import story

    base = story.micro_base(tmp_path)
    sft, _ = story.micro_adapters(tmp_path, base)
    probe = [[{"role": "user", "content": "Once upon a time"}]]
    story.merged(base, sft, tmp_path / "ok", "policy", probe)
    assert (tmp_path / "ok" / "model.safetensors").is_file()
    real = BaseTuner.merge_and_unload  # what PeftModel.merge_and_unload runs

    def off_merge(self, *args, **kw):
        model = real(self, *args, **kw)
        with torch.no_grad():
            model.lm_head.weight.add_(0.1 * torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", off_merge)
    with pytest.raises(SystemExit, match="changed its outputs"):
        story.merged(base, sft, tmp_path / "bad", "policy", probe)
    assert not (tmp_path / "bad").exists()


def test_the_story_benches_hold_out_the_same_82_prompts_as_their_published_figures(tmp_path):
    """bench-rl's and bench-ppo's gold figures were measured on one split of data/story/ppo_prompts.jsonl: 82 of its
    413 prompts (a fifth, seed 42). Another seed or fraction would gold-score other prompts than the published ones."""
    from bench.story import PROMPTS, split_prompts

    split_prompts(tmp_path)
    rows = [ln for ln in PROMPTS.read_text().splitlines() if ln.strip()]
    held, train = ((tmp_path / f).read_text().splitlines() for f in ("heldout.jsonl", "prompts.jsonl"))
    assert (len(rows), len(held), len(train)) == (413, 82, 331)
    assert [rows.index(h) for h in held[:8]] == [2, 9, 11, 26, 29, 31, 34, 38]


def test_the_samples_kept_are_a_pair_a_prompt(tmp_path):
    """eval samples samples_per_prompt pairs a prompt, prompt-major: story.json keeps each prompt's first pair, so four
    samples are four openings, not one opening four times."""
    import json

    rows = [{"prompt_text": f"p{i // 3}", "sft": f"s{i}", "ppo": f"q{i}", "gold_sft": 0.0, "gold_ppo": 1.0,
             "reward_sft": 0.0, "reward_ppo": 1.0} for i in range(12)]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text(json.dumps({"figures": {"samples_per_prompt": 3}, "samples": rows}))
    got = story_seeds.samples_of(tmp_path, 3)
    assert [(r["prompt_text"], r["sft"]) for r in got] == [("p0", "s0"), ("p1", "s3"), ("p2", "s6")]


def test_eval_only_evaluates_the_last_results_runs_and_keeps_their_training_time(monkeypatch, tmp_path):
    """--eval_only after a change to eval alone: no folder deleted, no training, `make eval` only, and the seed's
    training wall time the last result's; refused (one error line) without that result's runs."""
    import json

    runs, out = tmp_path / "runs", tmp_path / "story.json"
    (runs / "seed-1" / "ppo").mkdir(parents=True)
    kept = runs / "seed-1" / "sft.txt"
    kept.write_text("trained")
    out.write_text(json.dumps({"stage_args": {"rm": "", "ppo": ""}, "seeds": [{"seed": 1, "wall_s": {"sft_rm_ppo_s": 444.0}}]}))
    calls = []

    def fake_make(targets, run, runs_dir, seed, rm_args="", ppo_args="", force=False):
        calls.append((targets, force))
        for stage, metrics in (("eval", {"gold_ppo_mean": 0.7, "gold_sft_mean": 0.1, "gold_win_rate": 0.9}),
                               ("rm", {}), ("simulate", {})):
            (runs_dir / run / stage).mkdir(parents=True, exist_ok=True)
            (runs_dir / run / stage / "manifest.json").write_text(json.dumps({"metrics": metrics}))
        (runs_dir / run / "eval" / "report.json").write_text(json.dumps({"samples": []}))
        return 12.5

    monkeypatch.setattr(story_seeds, "make", fake_make)
    result = story_seeds.main(["--seeds", "1", "--runs_dir", str(runs), "--output", str(out), "--eval_only"])
    assert calls == [(["eval"], True)] and kept.read_text() == "trained"  # FORCE=1: make does not watch eval's code
    assert result["seeds"][0]["wall_s"] == {"sft_rm_ppo_s": 444.0, "eval_s": 12.5}
    assert result["seeds"][0]["gold_gain"] == pytest.approx(0.6)
    with pytest.raises(SystemExit, match="error: --eval_only needs .* seeds \\[2\\]"):
        story_seeds.main(["--seeds", "2", "--runs_dir", str(runs), "--output", str(out), "--eval_only"])
    with pytest.raises(SystemExit, match="error: --eval_only needs"):
        story_seeds.main(["--seeds", "1", "--runs_dir", str(runs), "--output", str(out), "--eval_only",
                          "--ppo_args", "--kl_coef 0.1"])
