"""bench/bench_rl.py (make bench-rl) and the gold-gain arithmetic it shares with the other benchmarks (bench/harness.py)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from bench.harness import gain_over_rounds, gain_verdict, gold_gain, paired_ratios
from tests.conftest import run_python


def test_gold_gain_by_hand():
    g = gold_gain(before=[0.0, 0.5, 1.0, -0.5], after=[0.5, 0.5, 2.0, 0.5])
    # paired differences 0.5, 0, 1, 1: mean 0.625; sd sqrt(0.6875 / 3), SE = sd / sqrt(4)
    assert g == {"gold_before": 0.25, "gold_after": 0.875, "gold_gain": 0.625,
                 "gold_gain_paired_se": round(math.sqrt(0.6875 / 3) / 2, 4)}
    assert gold_gain([0.1, 0.2], [0.1, 0.2])["gold_gain"] == 0.0  # the same samples: no gain, no spread
    with pytest.raises(ValueError):
        gold_gain([0.1, 0.2, 0.3], [0.1, 0.2])  # unpaired: refused, not truncated


def test_gain_over_rounds_by_hand():
    r = gain_over_rounds([0.1, 0.3, 0.2, 0.6])
    assert r["gold_gain"] == 0.25 and r["gold_gain_mean"] == 0.3 and r["rounds"] == 4  # median of 4 = mid-pair mean
    sd = math.sqrt((0.04 + 0.0 + 0.01 + 0.09) / 3)
    assert r["gold_gain_se"] == round(sd / 2, 4)
    assert gain_over_rounds([0.2])["gold_gain_se"] is None  # one round: no spread over seeds to measure
    assert gain_over_rounds([])["gold_gain"] is None


def test_gain_verdict_within_se():
    # difference -0.05, SE of the difference sqrt(0.03^2 + 0.04^2) = 0.05: just within
    v = gain_verdict({"gold_gain_mean": 0.10, "gold_gain_se": 0.03}, {"gold_gain_mean": 0.15, "gold_gain_se": 0.04})
    assert v == {"gold_gain_diff": -0.05, "gold_gain_diff_se": 0.05, "meets_gold_gain_target": True}
    v = gain_verdict({"gold_gain_mean": 0.09, "gold_gain_se": 0.03}, {"gold_gain_mean": 0.15, "gold_gain_se": 0.04})
    assert v["meets_gold_gain_target"] is False
    v = gain_verdict({"gold_gain_mean": 0.1, "gold_gain_se": None}, {"gold_gain_mean": 0.0, "gold_gain_se": None})
    assert v["gold_gain_diff"] == 0.1 and v["meets_gold_gain_target"] is None  # one round: no verdict


def test_paired_ratios_by_round():
    ours = [{"round": 1, "x": 4.0}, {"round": 2, "x": 9.0}, {"round": 3, "x": 6.0}]
    peer = [{"round": 2, "x": 3.0}, {"round": 1, "x": 2.0}, {"round": 3, "x": 6.0}]  # matched by round, not order
    assert paired_ratios(ours, peer, "x") == {"x_per_round": [2.0, 3.0, 1.0], "x_median_of_rounds": 2.0}
    assert paired_ratios(ours, [], "x") == {"x_per_round": [], "x_median_of_rounds": None}


@pytest.mark.slow
def test_bench_rl_micro(tmp_path):
    """Micro scale, GRPO, 1 round of 2 updates: both sides run, on one process each, on equal batches; the gold
    gain of each run is gold_gain() of the logged before/after gold scores."""
    out, work = tmp_path / "rl.json", tmp_path / "work"
    res = run_python("bench.bench_rl", ["--scale", "micro", "--methods", "grpo", "--output", str(out),
                                        "--work_dir", str(work)], timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) == {"grpo", "meta"} and set(data["grpo"]) == {"settings", "ours", "peer", "ratio"}
    g = data["grpo"]
    for side in ("ours", "peer"):
        for k in ("episodes_per_s", "gen_tokens_per_s", "peak_rss_mb", "gold_gain", "gold_gain_mean", "gold_gain_se"):
            assert k in g[side], (side, k)
        assert g[side]["episodes_per_s"] > 0 and g[side]["peak_rss_mb"] > 100
        run = g[side]["runs"][0]
        assert run["world_size"] == 1 and run["detail"]["episodes"] == 16  # 2 updates x 8 episodes
    assert g["ours"]["runs"][0]["detail"]["advantage_estimator"] == "grpo"
    peer = g["peer"]["runs"][0]["detail"]
    assert peer["reward_pooling"] == "sum"  # the micro reward adapter sums, as configs/rm.yaml's do
    assert peer["trl"] == "1.16.0" and peer["updates"] == 2 and peer["generate_calls"] == 2  # one generation an update
    assert peer["config"]["generation_batch_size"] == 8 and peer["config"]["num_generations"] == 2
    assert g["settings"]["trl_mapping"]["steps_per_generation"] == peer["config"]["steps_per_generation"] == 2
    gold = json.loads((work / "gold" / "micro-grpo.json").read_text())
    for side in ("ours", "peer"):
        run = g[side]["runs"][0]
        assert {k: run[k] for k in ("gold_before", "gold_after", "gold_gain", "gold_gain_paired_se")} == \
            gold_gain(gold["sft"]["scores"], gold[f"{side}-r1"]["scores"])
    assert len(gold["sft"]["scores"]) == 8 * 2  # 8 held-out prompts x 2 samples
    for side in ("ours", "peer"):  # each trained policy's KL to the SFT start, on its own gold samples
        kl = gold[f"{side}-r1"]["kl"]
        assert len(kl) == 16 and g[side]["runs"][0]["kl_to_sft"] == round(statistics.fmean(kl), 4) > 0
        assert g[side]["kl_to_sft"] == g[side]["runs"][0]["kl_to_sft"]
    assert "kl" not in gold["sft"]
    assert g["ratio"]["episodes_per_s_per_round"] == [round(g["ours"]["runs"][0]["episodes_per_s"]
                                                            / g["peer"]["runs"][0]["episodes_per_s"], 3)]
    assert g["ratio"]["episodes_per_s"] == round(g["ours"]["episodes_per_s"] / g["peer"]["episodes_per_s"], 3)


def test_make_bench_rl_target():
    """`make bench-rl` runs this harness, and `make bench` includes it."""
    import subprocess

    from tests.conftest import REPO

    for target in ("bench-rl", "bench"):
        out = subprocess.run(["make", "-n", target, "PY=python"], cwd=REPO, capture_output=True, text=True).stdout
        assert "python -m bench.bench_rl" in out, (target, out)


def test_story_build_from_a_finished_run_uses_its_models_and_rebuilds_only_when_asked_for_another(tmp_path):
    """bench.story build --from_run RUN: the bench's SFT policy and reward model are the run's (from its manifests),
    nothing is trained; the same run again keeps the build; another run replaces it; a run without an rm stage is
    one error naming it, before anything is written."""
    from bench import story
    from pipeline.config import REPO_ROOT

    base = REPO_ROOT / "models" / "tiny"

    def fake_run(name: str) -> Path:
        run = tmp_path / "runs" / name
        sft, rm = story.micro_adapters(tmp_path / f"adapters-{name}", base)
        for stage, adapter in (("sft", sft), ("rm", rm)):
            (run / stage).mkdir(parents=True)
            (run / stage / "manifest.json").write_text(json.dumps({"outputs": {"adapter": str(adapter)}, "metrics": {}}))
        return run

    work, run_a, run_b = tmp_path / "work", fake_run("a"), fake_run("b")
    story.build("story", work, from_run=run_a)
    info = json.loads((work / "BUILD_INFO.json").read_text())
    assert info["from_run"] == str(run_a) and info["stage_args"] is None and not (work / "runs").exists()
    assert info["sft_adapter"] == str(run_a.parent.parent / "adapters-a" / "sft_adapter")
    assert info["rm_adapter"] == str(run_a.parent.parent / "adapters-a" / "rm_adapter")
    assert (work / "peer_policy" / "model.safetensors").is_file() and (work / "peer_reward" / "model.safetensors").is_file()
    stamp = (work / "DONE").stat().st_mtime_ns
    story.build("story", work, from_run=run_a)  # the same run: kept as built
    assert (work / "DONE").stat().st_mtime_ns == stamp
    story.build("story", work, from_run=run_b)  # another run: rebuilt from it
    assert json.loads((work / "BUILD_INFO.json").read_text())["rm_adapter"].endswith("adapters-b/rm_adapter")

    (run_a / "rm" / "manifest.json").unlink()
    with pytest.raises(SystemExit, match=r"no finished rm stage.*make sft rm"):
        story.build("story", tmp_path / "work2", from_run=run_a)
    assert not (tmp_path / "work2").exists()


def _trl112_get_reward(model, query_responses, pad_token_id, context_length):
    """TRL 1.12's trl.experimental.utils.get_reward, as it is (its venv is the bench's own, bench/.venv-trl112)."""
    import torch

    attention_mask = query_responses != pad_token_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    lm_backbone = getattr(model, model.base_model_prefix)
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    output = lm_backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         return_dict=True, output_hidden_states=True, use_cache=False)
    reward_logits = model.score(output.hidden_states[-1])
    is_pad = query_responses[:, context_length:] == pad_token_id
    first_pad = torch.min(is_pad.shape[-1] * (~is_pad).long() + torch.arange(is_pad.shape[-1]), dim=-1).values
    sequence_lengths = first_pad - 1 + context_length
    return (reward_logits, reward_logits[torch.arange(reward_logits.size(0)), sequence_lengths].squeeze(-1),
            sequence_lengths)


def test_the_peers_score_as_our_summing_reward_adapter(tmp_path):
    """A reward adapter trained with pooling sum, merged for the peers (bench/story.py), scores by that pooling in
    their processes too (bench/peer/peer_common.py): TRL 1.16's reward_funcs forward gives our reply score plus the
    prompt's part, the same for every reply of a prompt, so group-centred rewards (GRPO's and RLOO's baselines) are
    ours exactly; TRL 1.12's get_reward on left-padded queries, through reply_only_reward, is ours. Read at the last
    token as stock, the peer would optimise another reward."""
    import sys

    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bench import story
    from pipeline.adapters import pool_scores, read_pooling
    from pipeline.config import REPO_ROOT
    from pipeline.generation import chat_reward_inputs

    sys.path.insert(0, str(REPO_ROOT / "bench" / "peer"))
    import peer_common as pc

    base = story.micro_base(tmp_path)
    _, rm = story.micro_adapters(tmp_path, base)  # pooling sum
    prompts = [[{"role": "user", "content": "Once upon a time there was a rabbit."}]] * 3 + \
              [[{"role": "user", "content": "The fox ran home."}]] * 3
    replies = ["They were happy.", "It rained all day and all night long", "No.", "He was glad to be back",
               "The fox came back.", "Sad"]
    assert read_pooling(rm) == "sum"
    story.merged(base, rm, tmp_path / "peer_reward", "reward", prompts[:1])
    tok = AutoTokenizer.from_pretrained(rm)
    pad = tok.pad_token_id
    ids, mask, starts = chat_reward_inputs(tok, prompts, replies)

    ours_model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    ours_model.config.pad_token_id = pad
    ours_model = PeftModel.from_pretrained(ours_model, rm).eval().get_base_model()
    with torch.no_grad():
        per_token = ours_model.score(ours_model.model(input_ids=ids, attention_mask=mask).last_hidden_state)[..., 0]
    ours = pool_scores(per_token, ids, mask, pad, "sum", starts)

    peer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "peer_reward", num_labels=1).eval()
    with torch.no_grad():
        stock_last = peer(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert pc.pool_reward_model(peer, tmp_path / "peer_reward") == "sum"
        trl116 = peer(input_ids=ids, attention_mask=mask).logits[:, 0]  # what 1.16 does with reward_funcs=model

    def centred(x):
        return x.view(2, 3) - x.view(2, 3).mean(dim=1, keepdim=True)

    torch.testing.assert_close(centred(trl116), centred(ours), atol=1e-5, rtol=0)
    assert (trl116 - ours).abs().min() > 1e-3  # the prompt's part is in 1.16's rewards, and the baselines cancel it
    assert (centred(stock_last) - centred(ours)).abs().max() > 1e-2

    # TRL 1.12: [left-padded templated prompt | reply | right padding], the prompt ending at context_length.
    lengths = mask.sum(1)
    context_length = int(starts.max())
    rows = torch.full((len(replies), context_length + int((lengths - starts).max()) + 2), pad)
    for i in range(len(replies)):
        rows[i, context_length - starts[i]:context_length] = ids[i, :starts[i]]
        rows[i, context_length:context_length + lengths[i] - starts[i]] = ids[i, starts[i]:lengths[i]]
    with torch.no_grad():
        _, trl112, _ = pc.reply_only_reward(_trl112_get_reward)(peer, rows, pad, context_length)
        _, value_like, _ = pc.reply_only_reward(_trl112_get_reward)(ours_model, rows, pad, context_length)
    torch.testing.assert_close(trl112, ours, atol=1e-5, rtol=0)
    assert not hasattr(ours_model, "score_includes_prompt") and (value_like - ours).abs().max() > 1e-2  # unhooked: as is


def test_rm_accuracy_is_the_benched_members_own(tmp_path):
    """bench-rl's reward model is an ensemble's first member: the accuracy it reports is that member's, not the
    ensemble's; a single model's is the stage's."""
    from bench.bench_rl import rm_accuracy

    rm = tmp_path / "rm"
    (rm / "adapter").mkdir(parents=True)
    (tmp_path / "BUILD_INFO.json").write_text(json.dumps({"rm_adapter": str(rm / "adapter")}))
    members = [{"adapter": str(rm / "adapter"), "eval_accuracy": 0.66}, {"adapter": str(rm / "m1"), "eval_accuracy": 0.68}]
    (rm / "manifest.json").write_text(json.dumps({"metrics": {"eval_accuracy": 0.69, "members": members}}))
    assert rm_accuracy(tmp_path) == 0.66
    (rm / "manifest.json").write_text(json.dumps({"metrics": {"eval_accuracy": 0.61}}))
    assert rm_accuracy(tmp_path) == 0.61


def test_the_gold_processes_kl_is_the_policys_to_its_reference_at_the_sampling_temperature(tmp_path, tiny_models):
    """bench/gold.py's KL of a policy's gold samples: KL(policy || reference) at the sampling temperature, on the
    policy's own samples (stages.eval.sequence_kl on regenerated samples agrees; the other direction or T = 1 does not);
    a policy against itself: 0."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.gold import TwoPolicies, score_policy
    from pipeline.generation import SamplingConfig, encode_prompts, generate
    from pipeline.judges import load_judge
    from stages.eval import sequence_kl

    base = yaml.safe_load(tiny_models["llama"].read_text())["name_or_path"]
    tok = AutoTokenizer.from_pretrained(base)
    policy, reference = AutoModelForCausalLM.from_pretrained(base).eval(), AutoModelForCausalLM.from_pretrained(base).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = [[{"role": "user", "content": t}] for t in ("Once upon a time", "The dog ran", "It rained all day")]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    judge = load_judge("sentiment")
    got = score_policy(policy, tok, str(prompts_file), 2, 7, 8, 0.7, judge, reference=reference)
    gens = generate(policy, tok, encode_prompts(tok, [p for p in prompts for _ in range(2)]),
                    SamplingConfig(max_new_tokens=8, temperature=0.7, generation_batch_size=64), generator_seed=7)
    assert got["texts"] == gens.texts
    pair = TwoPolicies({"policy": policy, "reference": reference})
    want = sequence_kl(pair, "policy", "reference", {"gens": gens}, 16, 0.7)
    assert got["kl"] == pytest.approx(want, abs=1e-5) and min(want) > 0
    assert got["kl"] != pytest.approx(sequence_kl(pair, "reference", "policy", {"gens": gens}, 16, 0.7), abs=1e-3)
    assert got["kl"] != pytest.approx(sequence_kl(pair, "policy", "reference", {"gens": gens}, 16, 1.0), abs=1e-3)
    itself = score_policy(reference, tok, str(prompts_file), 2, 7, 8, 0.7, judge, reference=reference)
    assert itself["kl"] == pytest.approx([0.0] * 6, abs=1e-6)
    assert "kl" not in score_policy(policy, tok, str(prompts_file), 2, 7, 8, 0.7, judge)


def test_the_lr_probe_needs_bench_rls_built_models(tmp_path):
    from bench.rl_lr_probe import main

    with pytest.raises(SystemExit, match="no built story models"):
        main(["peer", "grpo", "3e-3", "--work_dir", str(tmp_path)])


# ------------------------------------------------------------------ the harness's figures and verdicts, by hand
def test_summarise_is_the_median_of_the_rounds_that_have_the_figure():
    """summarise(): the median over rounds, not the mean; a round without the figure (None) is left out, and a
    figure of 0.0 is a figure (a run that gained nothing counts)."""
    from bench.harness import summarise

    runs = [{"x": 1.0, "g": 0.0}, {"x": 2.0, "g": 0.0}, {"x": 9.0, "g": 0.3}, {"x": None, "g": None}]
    out = summarise(runs, ("x", "g", "missing"))
    assert out["x"] == 2.0 and out["g"] == 0.0 and out["missing"] is None and out["runs"] is runs


def test_speed_memory_ratio_is_ours_over_the_peers():
    from bench.harness import speed_memory_ratio

    got = speed_memory_ratio({"episodes_per_s": 3.0, "gen_tokens_per_s": None, "peak_rss_mb": 700.0},
                             {"episodes_per_s": 2.0, "gen_tokens_per_s": 5.0, "peak_rss_mb": 1000.0})
    assert got == {"episodes_per_s": 1.5, "gen_tokens_per_s": None, "peak_rss_mb": 0.7}


def test_paired_ratios_median_is_not_the_mean():
    ours = [{"round": 1, "x": 1.0}, {"round": 2, "x": 2.0}, {"round": 3, "x": 9.0}]
    peer = [{"round": 1, "x": 1.0}, {"round": 2, "x": 1.0}, {"round": 3, "x": 1.0}]
    assert paired_ratios(ours, peer, "x") == {"x_per_round": [1.0, 2.0, 9.0], "x_median_of_rounds": 2.0}


def test_gold_summary_is_over_the_rounds_gold_gains():
    from bench.harness import gold_summary

    runs = [{"round": r, "gold_gain": g, "gold_after": a} for r, g, a in ((1, 0.1, 0.9), (2, 0.3, 0.5), (3, 0.2, 0.1))]
    out = gold_summary(runs, ("gold_gain",))
    assert out["gold_gain"] == 0.2 and out["gold_gain_mean"] == 0.2 and out["rounds"] == 3
    assert out["gold_gain_se"] == round(0.1 / math.sqrt(3), 4)  # sd of 0.1, 0.3, 0.2 is 0.1


def test_gain_verdict_passes_at_exactly_one_standard_error_below():
    """'At least the peer's within SE': ours lying exactly one SE below the peer's still passes (binary-exact values)."""
    v = gain_verdict({"gold_gain_mean": 0.25, "gold_gain_se": 0.0}, {"gold_gain_mean": 0.5, "gold_gain_se": 0.25})
    assert v == {"gold_gain_diff": -0.25, "gold_gain_diff_se": 0.25, "meets_gold_gain_target": True}
    v = gain_verdict({"gold_gain_mean": 0.25, "gold_gain_se": 0.0}, {"gold_gain_mean": 0.5, "gold_gain_se": 0.125})
    assert v["meets_gold_gain_target"] is False


def test_add_gold_gains_are_after_minus_the_sft_start(monkeypatch, tmp_path):
    """add_gold: every run's gold gain is its policy's scores minus the SFT policy's, slot by slot; its kl_to_sft the
    mean of its samples' KL; the SFT start and every run's policy are scored in the one gold process."""
    import bench.story
    from bench import harness

    seen = {}

    def fake_gold_scores(cmd, policies, out, logfile):
        seen["cmd"], seen["policies"] = cmd, policies
        return {"sft": {"scores": [0.0, 1.0, 0.0, 1.0]},
                "ours-r1": {"scores": [1.0, 1.0, 1.0, 2.0], "kl": [1.0, 2.0, 3.0, 6.0]},
                "peer-r1": {"scores": [0.0, 0.0, 0.0, 1.0], "kl": [0.5, 0.5, 0.5, 0.5]}}

    monkeypatch.setattr(harness, "gold_scores", fake_gold_scores)
    monkeypatch.setattr(bench.story, "base_of", lambda work: Path("/base"))
    runs = {"ours": [{"round": 1, "policy": ["/b", "/ours"]}], "peer": [{"round": 1, "policy": ["/p", "/peer"]}]}
    gold = harness.GoldEval(tmp_path, 1, {"gold_seed": 7, "response_length": 12, "temperature": 1.3,
                                          "gold_judge": "sentiment"})
    before = harness.add_gold(runs, gold, tmp_path, "x", lambda msg: None)
    assert before == [0.0, 1.0, 0.0, 1.0]
    ours, peer = runs["ours"][0], runs["peer"][0]
    assert (ours["gold_before"], ours["gold_after"], ours["gold_gain"], ours["kl_to_sft"]) == (0.5, 1.25, 0.75, 3.0)
    assert (peer["gold_before"], peer["gold_after"], peer["gold_gain"], peer["kl_to_sft"]) == (0.5, 0.25, -0.25, 0.5)
    assert seen["policies"] == {"sft": (Path("/base"), tmp_path / "sft"), "ours-r1": (Path("/b"), Path("/ours")),
                                "peer-r1": (Path("/p"), Path("/peer"))}
    assert seen["cmd"][-2:] == ["--reference", "sft"]


def test_gold_eval_command_carries_the_sampling_settings(tmp_path):
    """The gold process samples as the sides trained: their response length and temperature, the gold seed, judge."""
    from bench.harness import GoldEval

    cmd = GoldEval(tmp_path, 3, {"gold_seed": 7, "response_length": 12, "temperature": 1.3,
                                 "gold_judge": "sentiment"}).command()
    assert cmd[1:3] == ["-m", "bench.gold"]
    assert dict(zip(cmd[3::2], cmd[4::2])) == {"--prompts": str(tmp_path / "heldout.jsonl"), "--samples": "3",
                                               "--seed": "7", "--max-new-tokens": "12", "--temperature": "1.3",
                                               "--judge": "sentiment"}


def test_run_child_reads_its_last_json_line_and_its_peak_rss_in_mb(tmp_path):
    """run_child: the child's last JSON line (not its first), and its peak RSS in MB (wait4's ru_maxrss is in kB on
    Linux): at least the child's own VmHWM from /proc, and at most the larger of that and this process's peak (Linux
    counts a forked child's RSS before its exec: the parent's at the fork is a floor)."""
    import sys

    from bench.harness import run_child

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")

    def hwm_kb(status: str) -> int:
        return int([line for line in status.splitlines() if line.startswith("VmHWM")][0].split()[1])

    code = ("import json; print(json.dumps({'first': 1})); print('not json'); block = bytearray(64 * 2**20); "
            "print(json.dumps({'status': open('/proc/self/status').read()}))")
    res, rss, wall = run_child([sys.executable, "-c", code], tmp_path / "log.txt")
    assert set(res) == {"status"} and wall > 0
    child_mb, ours_mb = hwm_kb(res["status"]) / 1024, hwm_kb(Path("/proc/self/status").read_text()) / 1024
    assert 0.9 * child_mb <= rss <= 1.1 * max(child_mb, ours_mb) and rss > 64


def _fake_rl_bench(monkeypatch, tmp_path, figures: dict) -> tuple[dict, list]:
    """bench_rl.bench_method with each side's run and the gold evaluation faked: figures[side][key] is one value per
    round. Returns (the result, the (side, round) order the runs went in)."""
    from bench import bench_rl

    (tmp_path / "BUILD_INFO.json").write_text(json.dumps({"rm_adapter": str(tmp_path / "rm" / "adapter")}))
    (tmp_path / "heldout.jsonl").write_text("{}\n{}\n")
    order = []

    def fake_run_side(side, method, work, s, rnd):
        order.append((side, rnd))
        f = figures[side]
        return {"episodes_per_s": f["eps"][rnd - 1], "gen_tokens_per_s": 1.0, "peak_rss_mb": f["rss"][rnd - 1],
                "process_wall_s": 1.0, "world_size": 1}

    def fake_add_gold(runs, gold, out, name, log):
        for side, rs in runs.items():
            for r in rs:
                r["gold_gain"], r["kl_to_sft"] = figures[side]["gain"][r["round"] - 1], 1.0
        return [0.0, 1.0]

    monkeypatch.setattr(bench_rl, "run_side", fake_run_side)
    monkeypatch.setattr(bench_rl, "add_gold", fake_add_gold)
    s = {**bench_rl.SCALES["micro"], "rounds": len(figures["ours"]["eps"])}
    return bench_rl.bench_method("grpo", "micro", tmp_path, s), order


def test_bench_rl_alternates_the_sides_and_judges_its_targets(monkeypatch, tmp_path):
    """Rounds alternate which side goes first; the speed target is ours/peer episodes/s at least 1.5, the memory target
    ours/peer peak RSS at most 0.7 (ratios of the medians over rounds); the gold verdict is ours against the peer's."""
    at = {"ours": {"eps": [3.0, 3.0, 3.0], "rss": [70.0, 70.0, 70.0], "gain": [0.1, 0.2, 0.3]},
          "peer": {"eps": [2.0, 2.0, 2.0], "rss": [100.0, 100.0, 100.0], "gain": [0.3, 0.4, 0.5]}}
    res, order = _fake_rl_bench(monkeypatch, tmp_path, at)
    assert order == [("ours", 1), ("peer", 1), ("peer", 2), ("ours", 2), ("ours", 3), ("peer", 3)]
    r = res["ratio"]
    assert (r["episodes_per_s"], r["peak_rss_mb"]) == (1.5, 0.7)
    assert r["meets_episodes_per_s_target"] is True and r["meets_peak_rss_target"] is True
    assert r["gold_gain_diff"] == -0.2 and r["meets_gold_gain_target"] is False  # 0.2 below, SE of the diff 0.0816
    assert res["ours"]["gold_gain"] == 0.2 and res["peer"]["gold_gain"] == 0.4
    assert r["episodes_per_s_per_round"] == [1.5] * 3 and r["peak_rss_mb_per_round"] == [0.7] * 3
    settings = res["settings"]
    assert (settings["prompts_per_update"], settings["grad_accum"], settings["gold_before"]) == (4, 2, 0.5)  # 8 / 2, 8 / 4
    just_missed = {"ours": {**at["ours"], "eps": [2.9] * 3, "rss": [71.0] * 3, "gain": [0.3, 0.4, 0.5]},
                   "peer": {**at["peer"], "gain": [0.1, 0.2, 0.3]}}
    r = _fake_rl_bench(monkeypatch, tmp_path, just_missed)[0]["ratio"]
    assert (r["episodes_per_s"], r["peak_rss_mb"]) == (1.45, 0.71)
    assert r["meets_episodes_per_s_target"] is False and r["meets_peak_rss_target"] is False
    assert r["gold_gain_diff"] == 0.2 and r["meets_gold_gain_target"] is True


def test_bench_rl_rounds_seed_both_sides_alike(monkeypatch, tmp_path):
    """Round r runs both sides with seed 42 + r - 1 and the same updates, batch and sampling settings."""
    from bench import bench_rl

    cmds = {}

    def fake_run_child(cmd, logfile, want_json=True):
        cmds[cmd[cmd.index("--method") + 1] if "--method" in cmd else "ours"] = cmd
        return {"episodes_per_s": 1.0, "adapter": str(tmp_path / "a")}, 100.0, 1.0

    monkeypatch.setattr(bench_rl, "run_child", fake_run_child)
    monkeypatch.setattr(bench_rl, "base_of", lambda work: tmp_path / "base")
    for side in ("ours", "peer"):
        bench_rl.run_side(side, "grpo", tmp_path, bench_rl.SCALES["micro"], 2)
    shared = ("--seed", "--updates", "--batch-size", "--per-device-batch", "--response-length", "--temperature", "--lr",
              "--kl-coef", "--samples-per-prompt")
    got = {side: {k: cmd[cmd.index(k) + 1] for k in shared} for side, cmd in (("ours", cmds["ours"]), ("peer", cmds["grpo"]))}
    assert got["ours"] == got["peer"] and got["ours"]["--seed"] == "43" and got["ours"]["--updates"] == "2"
    assert got["ours"]["--per-device-batch"] == "4" and got["ours"]["--batch-size"] == "8"  # micro's
    assert "--stop-at-eos" in cmds["ours"]  # as the peer's generation stops at EOS
    peer = cmds["grpo"]
    assert (peer[peer.index("--lora-r") + 1], peer[peer.index("--lora-alpha") + 1]) == ("16", "32")


def test_bench_rl_main_refuses_an_unknown_method_and_takes_the_rounds_and_updates_flags(monkeypatch, tmp_path):
    from bench import bench_rl

    seen = []
    monkeypatch.setattr(bench_rl, "OUT", bench_rl.OUT)  # main() repoints it: put it back afterwards
    monkeypatch.setattr(bench_rl, "build_models", lambda scale, from_run=None: tmp_path)
    side = {k: 0.0 for k in (*bench_rl.METRICS, "gold_gain_se")}
    monkeypatch.setattr(bench_rl, "bench_method",
                        lambda m, scale, work, s: seen.append((m, s)) or {"ours": side, "peer": side, "ratio": {}})
    with pytest.raises(SystemExit, match="unknown method 'ppo'"):
        bench_rl.main(["--methods", "grpo,ppo", "--output", str(tmp_path / "rl.json"), "--work_dir", str(tmp_path)])
    assert seen == []
    monkeypatch.setattr(bench_rl, "meta", lambda *a, **k: {"wall_s": 0.0})
    bench_rl.main(["--scale", "micro", "--methods", "rloo", "--rounds", "2", "--updates", "5",
                   "--output", str(tmp_path / "rl.json"), "--work_dir", str(tmp_path)])
    assert seen == [("rloo", {**bench_rl.SCALES["micro"], "rounds": 2, "updates": 5})]


def test_gold_main_measures_kl_to_the_reference_for_every_other_policy_only(monkeypatch, tmp_path):
    """bench/gold.py main: the reference policy (loaded once) gets no KL to itself; every other policy is scored with
    the reference beside it; a --reference that names no policy is one error."""
    from bench import gold
    from pipeline import judges
    from pipeline.config import REPO_ROOT

    tiny = str(REPO_ROOT / "models" / "tiny")
    loaded, scored = [], []
    monkeypatch.setattr(judges, "load_judge", lambda spec: spec)
    monkeypatch.setattr(gold, "load_policy", lambda base, adapter: loaded.append(adapter) or f"model {adapter}")

    def fake_score(model, tokenizer, prompts, samples, seed, max_new_tokens, temperature, judge, reference=None):
        scored.append((model, reference, samples, seed, temperature, judge))
        return {"scores": [0.5]}

    monkeypatch.setattr(gold, "score_policy", fake_score)
    out = tmp_path / "gold.json"
    gold.main(["--policy", f"sft={tiny}", "--policy", f"grpo={tiny},ad", "--prompts", "p.jsonl", "--reference", "sft",
               "--samples", "3", "--seed", "5", "--temperature", "0.9", "--out", str(out)])
    assert loaded == [None, "ad"]
    assert scored == [("model None", None, 3, 5, 0.9, "sentiment"), ("model ad", "model None", 3, 5, 0.9, "sentiment")]
    assert json.loads(out.read_text())["grpo"] == {"base": tiny, "adapter": "ad", "scores": [0.5]}
    with pytest.raises(SystemExit, match="--reference peer: not one of the --policy names"):
        gold.main(["--policy", f"sft={tiny}", "--prompts", "p.jsonl", "--reference", "peer", "--out", str(out)])


def test_speed_memory_ratio_of_a_figure_the_peer_lacks_is_none():
    """A figure the peer did not report (None or 0) gives no ratio, as one ours lacks does: not a crash."""
    from bench.harness import speed_memory_ratio

    got = speed_memory_ratio({"episodes_per_s": 3.0, "gen_tokens_per_s": 8.0, "peak_rss_mb": 700.0},
                             {"episodes_per_s": 2.0, "gen_tokens_per_s": None, "peak_rss_mb": 0.0})
    assert got == {"episodes_per_s": 1.5, "gen_tokens_per_s": None, "peak_rss_mb": None}


def test_run_child_peak_rss_is_wait4s_kib_in_mib_and_a_failed_child_is_one_error(tmp_path, monkeypatch):
    """ru_maxrss is in KiB on Linux: 300 * 1024 of it is 300.0 MB exactly (not 307.2, dividing by 1000). A child that
    fails is one error naming its log and quoting its last lines, not an empty result."""
    import os
    import sys
    from types import SimpleNamespace

    from bench import harness

    real_wait4 = os.wait4

    def fake_wait4(pid, options):
        pid, status, _ = real_wait4(pid, options)
        return pid, status, SimpleNamespace(ru_maxrss=300 * 1024)

    monkeypatch.setattr(harness.os, "wait4", fake_wait4)
    res, rss, _ = harness.run_child([sys.executable, "-c", "print('{\"x\": 1}')"], tmp_path / "ok.log")
    assert res == {"x": 1} and rss == 300.0
    code = "import json, sys; print(json.dumps({'episodes_per_s': 9.0})); print('boom at the end'); sys.exit(3)"
    with pytest.raises(SystemExit, match=r"(?s)failed \(rc 3\); see .*bad\.log.*boom at the end"):
        harness.run_child([sys.executable, "-c", code], tmp_path / "bad.log")


def test_gold_scores_hands_every_policy_to_the_gold_process_by_name(monkeypatch, tmp_path):
    """harness.gold_scores -> bench/gold.py: each named policy reaches the gold process as its own base and adapter (a
    base without one as the base alone), the reference as the SFT policy, and the result is read back by name."""
    import sys

    from bench import gold, harness
    from pipeline import judges
    from pipeline.config import REPO_ROOT

    tiny = REPO_ROOT / "models" / "tiny"
    monkeypatch.setattr(judges, "load_judge", lambda spec: spec)
    monkeypatch.setattr(gold, "load_policy", lambda base, adapter: (base, adapter))

    def fake_score(model, tok, prompts, samples, seed, new, temperature, judge, reference=None):
        return {"scores": [0.5], "model": list(model), "reference": reference and list(reference)}

    monkeypatch.setattr(gold, "score_policy", fake_score)

    def fake_run_child(cmd, logfile, want_json=True):
        assert cmd[:3] == [sys.executable, "-m", "bench.gold"] and want_json is False
        gold.main(cmd[3:])
        return {}, 0.0, 0.0

    monkeypatch.setattr(harness, "run_child", fake_run_child)
    policies = {"sft": (tiny, tmp_path / "sft"), "ours-r1": (tiny, tmp_path / "ours"), "base": (tiny, None)}
    got = harness.gold_scores([sys.executable, "-m", "bench.gold", "--prompts", "p.jsonl", "--reference", "sft"],
                              policies, tmp_path / "gold.json", tmp_path / "gold.log")
    sft = [str(tiny), str(tmp_path / "sft")]
    assert got["sft"]["model"] == sft and got["sft"]["reference"] is None
    assert got["ours-r1"]["model"] == [str(tiny), str(tmp_path / "ours")] and got["ours-r1"]["reference"] == sft
    assert got["base"]["model"] == [str(tiny), None] and got["base"]["adapter"] is None


def test_the_harness_runs_every_side_on_the_cpu(monkeypatch):
    """The peers train with use_cpu=True; ours, run without a launch, took a GPU it saw (pipeline/sharding.py), and
    bench-ppo compared GPU episodes/s with CPU ones. The children's environment says CPU whatever the caller's does,
    and the results' meta records it."""
    from bench import harness

    monkeypatch.setenv("ACCELERATE_USE_CPU", "0")
    assert harness.env()["ACCELERATE_USE_CPU"] == "1"
    assert harness.meta({}, 0.0)["env"]["ACCELERATE_USE_CPU"] == "1"


def test_the_peers_count_generated_tokens_through_each_rows_first_eos():
    """GenCounter counted every generated position, a batch's padding after a row's EOS too, while ours counts the
    response mask (through the first EOS): bench-rl's gen tokens/s ratio read 1.61 against 1.98 in episodes/s."""
    import sys
    from types import SimpleNamespace

    import torch

    from pipeline.config import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "bench" / "peer"))
    import peer_common as pc

    prompt = torch.tensor([[5, 6], [5, 7], [5, 8]])
    new = torch.tensor([[9, 2, 0, 0], [9, 9, 9, 9], [2, 0, 0, 0]])  # EOS 2 at 1; none; at 0

    class Model:
        generation_config = SimpleNamespace(eos_token_id=2)

        def generate(self, input_ids, **kwargs):
            return torch.cat([input_ids, new], 1)

    counter = pc.GenCounter()
    model = counter.wrap(Model())
    model.generate(input_ids=prompt)
    assert (counter.tokens, counter.rows, counter.calls) == (2 + 4 + 1, 3, 1)
    model.generate(input_ids=prompt, generation_config=SimpleNamespace(eos_token_id=[9, 2]))  # the config's ids win
    assert counter.tokens == 7 + 1 + 1 + 1
