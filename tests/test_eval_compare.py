"""`make eval` compares every policy of the run: the real stage on a fake finished run with ppo, grpo and dpo
(tests/fake_upstream.py), the win-rate matrix by hand, the held-out prompt rule, the gold-vs-KL plot."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from pipeline.config import ConfigError
from tests.fake_upstream import HELDOUT, add_policy_stage, build_upstream

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_eval(runs, profile, *extra):
    from stages.eval import main, parse_args

    return main(*parse_args(["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs),
                             "--model_config", str(profile), "--max_new_tokens", "8", "--samples_per_prompt", "1", *extra]))


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_models):
    """ppo; grpo = the same adapter copied into its own folder (an identical policy), which kept the SFT adapter as
    its update-2 policy; dpo = another random adapter."""
    profile = tiny_models["llama"]
    runs = build_upstream(tmp_path_factory.mktemp("runs"), profile)
    t = runs / "t"
    add_policy_stage(runs, profile, "grpo", adapter_from=t / "ppo" / "adapter", kept={2: t / "sft" / "adapter"})
    add_policy_stage(runs, profile, "dpo", seed=5)
    metrics = run_eval(runs, profile)
    return t / "eval", metrics


def test_the_report_lists_every_policy_of_the_run(compared):
    eval_dir, metrics = compared
    report = json.loads((eval_dir / "report.json").read_text())
    c = report["comparison"]
    assert c["policies"] == metrics["policies"] == ["sft", "ppo", "grpo", "dpo"]
    assert {n: r["method"] for n, r in c["by_policy"].items()} == {"sft": "sft", "ppo": "ppo", "grpo": "grpo", "dpo": "dpo"}
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    assert manifest["metrics"]["comparison"] == c["by_policy"]
    assert {"ppo", "grpo", "dpo", "sft", "rm"} <= set(manifest["upstream"])
    md = (eval_dir / "report.md").read_text()
    for name in ("ppo", "grpo", "dpo"):
        assert f"| {name} | {name} |" in md and f"| **{name}** |" in md
    assert "Win rate of PPO over SFT" in md  # the SFT-vs-PPO report stays


def test_identical_policies_win_half_inside_the_interval(compared):
    eval_dir, _ = compared
    c = json.loads((eval_dir / "report.json").read_text())["comparison"]
    assert all(s["responses"]["ppo"] == s["responses"]["grpo"] for s in c["samples"])
    for matrix in (c["win_rate_proxy"], c["win_rate_gold"]):
        for a, b in (("ppo", "grpo"), ("grpo", "ppo")):
            w = matrix[a][b]
            assert w["rate"] == 0.5 and w["ties"] == w["n"] == 6 and w["ci_low"] < 0.5 < w["ci_high"]
    ppo, grpo = c["by_policy"]["ppo"], c["by_policy"]["grpo"]
    assert {k: v for k, v in ppo.items() if k != "method"} == pytest.approx({k: v for k, v in grpo.items() if k != "method"})


def test_the_matrix_is_antisymmetric_and_matches_the_samples(compared):
    eval_dir, _ = compared
    report = json.loads((eval_dir / "report.json").read_text())
    c, s = report["comparison"], report["comparison"]["samples"]
    for key, matrix, eps in (("proxy", c["win_rate_proxy"], 1e-6), ("gold", c["win_rate_gold"], 0.0)):
        for a in c["policies"]:
            for b in c["policies"]:
                if a == b:
                    assert b not in matrix[a]
                    continue
                w, v = matrix[a][b], matrix[b][a]
                assert w["rate"] + v["rate"] == pytest.approx(1.0)
                assert (w["wins"] + v["wins"] + w["ties"]) / w["n"] == pytest.approx(1.0) and w["wins"] == v["losses"]
                wins = sum(x[key][a] > x[key][b] + eps for x in s)
                ties = sum(abs(x[key][a] - x[key][b]) <= eps for x in s)
                assert (w["wins"], w["ties"]) == (wins, ties), (key, a, b)
    assert c["win_rate_proxy"]["dpo"]["sft"]["ties"] < 6  # the random DPO adapter really differs: not all ties
    for name, row in c["by_policy"].items():
        assert row["proxy_mean"] == pytest.approx(statistics.fmean(x["proxy"][name] for x in s))
        assert row["gold_mean"] == pytest.approx(statistics.fmean(x["gold"][name] for x in s))
        assert row["kl_mean"] == pytest.approx(statistics.fmean(x["kl"][name] for x in s))
    f = report["figures"]  # the same samples as the SFT-vs-PPO figures
    assert c["by_policy"]["ppo"]["proxy_mean"] == pytest.approx(f["reward_ppo_mean"])
    assert c["by_policy"]["ppo"]["kl_mean"] == pytest.approx(f["kl_mean"])
    assert c["by_policy"]["sft"]["kl_mean"] == 0 and c["by_policy"]["dpo"]["kl_mean"] > 0


def test_one_series_per_method_with_the_kept_policies(compared):
    eval_dir, _ = compared
    report = json.loads((eval_dir / "report.json").read_text())
    c = report["comparison"]
    assert c["plot_series"] == ["sft", "ppo", "grpo", "dpo"]
    assert (eval_dir / report["plots"]["gold_vs_kl"]).read_bytes()[:8] == PNG_MAGIC
    md = (eval_dir / "report.md").read_text()
    assert "![gold score against KL](plots/gold_vs_kl.png)" in md and "No gold judge" not in md
    curves = c["curves"]
    assert [p["update"] for p in curves["grpo"]] == [0, 2, 11] and [p["update"] for p in curves["ppo"]] == [0, 11]
    assert len(curves["dpo"]) == 1 and len(curves["sft"]) == 1
    sft, kept, final = curves["grpo"]  # update 2 is the SFT adapter: SFT's gold, KL 0
    assert kept["gold_mean"] == sft["gold_mean"] and kept["sqrt_kl"] == pytest.approx(0.0, abs=1e-3)
    assert final["gold_mean"] == c["by_policy"]["grpo"]["gold_mean"] == curves["ppo"][-1]["gold_mean"]
    # each point keeps its per-prompt scores, from which its means and the proxy-up-gold-down flag are recomputed
    from stages.eval_compare import overoptimisation_flag

    for name, points in curves.items():
        for p in points:
            assert len(p["proxy"]) == len(p["gold"]) == len(c["samples"])
            assert (statistics.fmean(p["proxy"]), statistics.fmean(p["gold"])) == pytest.approx((p["proxy_mean"], p["gold_mean"]))
        if len(points) > 1:
            sign = overoptimisation_flag(points)
            assert [f for f in c["flags"][name] if not f.startswith(("mean KL", "a higher reward-model"))] == (
                [sign] if sign else [])
    assert curves["grpo"][-1]["gold"] == [x["gold"]["grpo"] for x in c["samples"]]


def test_plot_draws_one_series_per_policy(tmp_path):
    from PIL import Image

    from stages.eval_plots import plot_gold_vs_kl

    pt = lambda u, x, g: {"update": u, "sqrt_kl": x, "gold_mean": g}  # noqa: E731
    curves = {"sft": [pt(0, 0.0, 0.1)], "ppo": [pt(0, 0.0, 0.1), pt(4, 1.0, 0.3), pt(8, 2.0, 0.2)],
              "rloo": [pt(0, 0.0, 0.1), pt(8, 1.5, 0.4)], "dpo": [pt(1, 0.7, 0.25)]}
    labels = plot_gold_vs_kl(curves, tmp_path / "p.png")
    assert labels == ["sft", "ppo", "rloo", "dpo"]
    with Image.open(tmp_path / "p.png") as im:
        assert im.size[0] > 300


def test_win_rate_matrix_by_hand():
    from stages.eval_compare import wilson, win_rate_matrix

    m = win_rate_matrix({"a": [1.0, 2.0, 3.0, 0.0], "b": [0.0, 2.0, 4.0, 0.0], "c": [2.0, 2.0, 2.0, 2.0]})
    # a-b: win, tie, loss, tie; a-c: loss, tie, win, loss; b-c: loss, tie, win, loss
    assert (m["a"]["b"]["wins"], m["a"]["b"]["ties"], m["a"]["b"]["losses"], m["a"]["b"]["rate"]) == (1, 2, 1, 0.5)
    assert m["a"]["c"]["rate"] == 0.375 and m["c"]["a"]["rate"] == 0.625 and m["b"]["c"]["rate"] == 0.375
    assert (m["c"]["b"]["wins"], m["c"]["b"]["ties"], m["c"]["b"]["losses"]) == (2, 1, 1)
    assert (m["a"]["c"]["ci_low"], m["a"]["c"]["ci_high"]) == wilson(1.5, 4)
    assert set(m) == {"a", "b", "c"} and set(m["a"]) == {"b", "c"}
    with pytest.raises(ValueError, match="different numbers of prompts"):
        win_rate_matrix({"a": [1.0], "b": [1.0, 2.0]})


def test_the_gold_win_rate_counts_any_gold_difference_and_only_equal_gold_as_a_tie():
    """compare_policies' gold matrix has no tie band: a gold judge's 0.01 is a win (VADER's scores differ by as
    little), only equal scores tie; the proxy's band is 1e-6. By hand on four prompts, DPO against SFT: gold +0.01,
    -0.02, equal, +0.3: 2 wins, 1 tie, 1 loss, a rate of (2 + 0.5) / 4."""
    from types import SimpleNamespace

    from stages.eval import EvalArgs, compare_policies

    texts = {"sft": ["a", "b", "c", "d"], "dpo": ["e", "f", "g", "h"]}  # other replies: scores decide, not the text
    ro = {n: {"rewards": [0.0] * 4, "texts": texts[n], "lengths": [3] * 4, "ended": [True] * 4} for n in texts}
    gold = {"sft": [0.10, 0.50, 0.20, 0.0], "dpo": [0.11, 0.48, 0.20, 0.3]}
    c = compare_policies(SimpleNamespace(spec="sentiment"), [[{"role": "user", "content": f"p{i}"}] for i in range(4)],
                         EvalArgs(), {"dpo": {"metrics": {}}}, ro, {"sft": [0.0] * 4, "dpo": [0.5] * 4}, gold, {}, None, {})
    w = c["win_rate_gold"]["dpo"]["sft"]
    assert (w["wins"], w["ties"], w["losses"], w["rate"]) == (2, 1, 1, 0.625)
    assert c["win_rate_proxy"]["dpo"]["sft"]["ties"] == 4  # the proxy's equal scores: all ties


def test_the_same_reply_is_a_tie_whatever_its_scores_say():
    """A reply scored in two batches (each policy's) can come back ~1e-7 apart from its padding alone, more than a
    tie_eps of 0 (the gold) and, in bf16, than 1e-6: the same text is a tie. Other texts keep their scores' verdict."""
    from stages.eval_compare import same_replies, win_rate, win_rate_matrix

    a = {"texts": ["x", "y", "z", "w"], "rewards": [0.5000001, 1.0, 0.2, 0.3]}
    b = {"texts": ["x", "y2", "z2", "w"], "rewards": [0.5, 0.0, 0.4, 0.3000002]}
    assert same_replies(a["texts"], b["texts"]) == [True, False, False, True]
    w = win_rate(a["rewards"], b["rewards"], 0.0, same_replies(a["texts"], b["texts"]))
    assert (w["wins"], w["ties"], w["losses"], w["rate"]) == (1, 2, 1, 0.5)
    assert win_rate(a["rewards"], b["rewards"], 0.0)["wins"] == 2  # by scores alone, the padding's difference wins
    m = win_rate_matrix({"a": a["rewards"], "b": b["rewards"]}, 0.0, {"a": a["texts"], "b": b["texts"]})
    assert (m["a"]["b"]["ties"], m["b"]["a"]["ties"], m["a"]["b"]["rate"] + m["b"]["a"]["rate"]) == (2, 2, 1.0)


def test_heldout_rule_shared_prompts_or_one_error(tmp_path):
    from stages.eval_compare import shared_heldout_prompts

    def held(name, texts):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": x}]}) + "\n" for x in texts))
        return {"outputs": {"heldout_prompts": str(path), "adapter": "x"}}

    same = {"grpo": held("grpo", HELDOUT), "ppo": held("ppo", HELDOUT), "dpo": {"outputs": {"adapter": "x"}}}
    assert shared_heldout_prompts(same) == tmp_path / "ppo.jsonl"  # ppo's file when it has one
    assert shared_heldout_prompts({"rloo": held("rloo", HELDOUT)}) == tmp_path / "rloo.jsonl"
    with pytest.raises(ConfigError, match=r"held-out prompts of ppo .* and rloo .* differ"):
        shared_heldout_prompts({"ppo": held("ppo", HELDOUT), "rloo": held("rloo", HELDOUT[:-1] + ["Another one."])})
    with pytest.raises(ConfigError, match="from an RL stage"):
        shared_heldout_prompts({"dpo": {"outputs": {"adapter": "x"}}})


def test_differing_heldout_prompts_are_refused_before_anything_is_written(tmp_path, tiny_models):
    runs = build_upstream(tmp_path / "runs", tiny_models["llama"])
    add_policy_stage(runs, tiny_models["llama"], "rloo", heldout=list(reversed(HELDOUT)))
    with pytest.raises(ConfigError, match="held-out prompts of ppo .* and rloo .* differ"):
        run_eval(runs, tiny_models["llama"])
    assert not (runs / "t" / "eval").exists()


def test_a_run_without_ppo_is_compared_too(tmp_path, tiny_models):
    """GRPO alone: the comparison of SFT and GRPO, no SFT-vs-PPO section, no human pairs (they are SFT-vs-PPO)."""
    profile = tiny_models["llama"]
    runs = build_upstream(tmp_path / "runs", profile)
    t = runs / "t"
    add_policy_stage(runs, profile, "grpo", seed=6)
    shutil.rmtree(t / "ppo")
    m = run_eval(runs, profile)
    report = json.loads((t / "eval" / "report.json").read_text())
    assert m["policies"] == ["sft", "grpo"] and "win_rate" not in m and "win_rate" not in report
    assert report["comparison"]["plot_series"] == ["sft", "grpo"] and report["comparison"]["by_policy"]["grpo"]["kl_mean"] > 0
    assert set(report["plots"]) == {"gold_vs_kl"} and not (t / "eval" / "human_pairs.jsonl").exists()
    md = (t / "eval" / "report.md").read_text()
    assert "| grpo | grpo |" in md and "PPO against SFT" not in md
    assert "ppo" not in json.loads((t / "eval" / "manifest.json").read_text())["upstream"]


def test_dpo_alone_has_no_heldout_prompts(tmp_path, tiny_models):
    runs = build_upstream(tmp_path / "runs", tiny_models["llama"])
    add_policy_stage(runs, tiny_models["llama"], "dpo")
    shutil.rmtree(runs / "t" / "ppo")
    with pytest.raises(ConfigError, match="held-out prompts from an RL stage"):
        run_eval(runs, tiny_models["llama"])
    assert not (runs / "t" / "eval").exists()


def test_policy_flags_by_hand():
    """Every policy's held-out signs against SFT's row: KL above the threshold (not at it), a higher proxy reached
    with responses at least length_ratio times as long (not with a lower proxy, not 1.9x)."""
    from stages.eval_compare import overoptimisation_flag, policy_flags
    from tests.test_eval import point

    row = lambda proxy, kl, length: {"proxy_mean": proxy, "kl_mean": kl, "length_mean": length}  # noqa: E731
    by_policy = {"sft": row(0.0, 0.0, 10.0), "ppo": row(1.0, 10.0, 19.0), "grpo": row(1.0, 10.01, 20.0),
                 "rloo": row(-0.1, 3.0, 25.0), "dpo": row(0.5, 0.5, 9.0)}
    hacked = [point(0, [0.0, 0.1, 0.2, 0.1], [0.1, 0.0, 0.2, 0.1]), point(8, [0.5, 0.6, 0.4, 0.5], [0.5, 0.6, 0.4, 0.6]),
              point(16, [1.0, 1.2, 0.9, 1.1], [0.1, 0.2, 0.0, 0.2])]  # the proxy rises on, the gold falls after 8
    learning = hacked[:2]
    curves = {"sft": hacked[:1], "ppo": learning, "rloo": hacked, "dpo": hacked[2:]}  # dpo: one point, no curve
    flags = policy_flags(by_policy, hacking_kl=10.0, length_ratio=2.0, curves=curves)
    assert set(flags) == {"ppo", "grpo", "rloo", "dpo"}
    assert flags["ppo"] == [] and flags["dpo"] == []
    assert flags["grpo"] == ["mean KL to the reference 10.01 nats (threshold 10)",
                             "a higher reward-model score with responses 2.0x as long as SFT's (10.0 -> 20.0 tokens)"]
    assert flags["rloo"] == [overoptimisation_flag(hacked)] and "update 16" in flags["rloo"][0]
    assert policy_flags(by_policy, 10.0, 2.0, curves={})["rloo"] == []  # no gold judge, no curves
    # the curve's points in any order: the last is the latest update (mutant: the order given taken as the curve's)
    assert flags["rloo"] == [overoptimisation_flag([hacked[2], hacked[0], hacked[1]])]
    # SFT wrote nothing (every reply empty): no length ratio to measure, no flag and no division by zero (mutant: its
    # `> 0` dropped, the flag's message divided by 0)
    empty_sft = {"sft": row(0.0, 0.0, 0.0), "ppo": row(1.0, 1.0, 0.0)}
    assert policy_flags(empty_sft, hacking_kl=10.0, length_ratio=2.0, curves={}) == {"ppo": []}


def test_the_manifests_flagged_policies_are_those_with_a_flag():
    """The manifest's flagged_policies (the card warns for each): the policies with at least one flag, not every one
    policy_flags lists. Mutant: every policy named."""
    from stages.eval_compare import comparison_figures

    comparison = {"policies": ["sft", "ppo", "dpo"], "by_policy": {"sft": {}, "ppo": {}, "dpo": {}},
                  "flags": {"ppo": [], "dpo": ["mean KL to the reference 12.00 nats (threshold 10)"]}}
    assert comparison_figures(comparison) == {"policies": ["sft", "ppo", "dpo"], "comparison": comparison["by_policy"],
                                              "flagged_policies": ["dpo"]}


def test_the_comparison_names_each_flagged_policy(compared):
    """The fixture's policies are random LoRA adapters, more than 10 nats from SFT: each is flagged, in report.json,
    in the manifest's list and under the report's table; a comparison without a flag says none."""
    from stages.eval_compare import comparison_markdown

    eval_dir, metrics = compared
    c = json.loads((eval_dir / "report.json").read_text())["comparison"]
    md = (eval_dir / "report.md").read_text()
    assert set(c["flags"]) == {"ppo", "grpo", "dpo"} and metrics["flagged_policies"] == ["dpo", "grpo", "ppo"]
    for name in ("ppo", "grpo", "dpo"):
        flag = f"mean KL to the reference {c['by_policy'][name]['kl_mean']:.2f} nats (threshold 10)"
        assert c["by_policy"][name]["kl_mean"] > 10 and c["flags"][name] == [flag]
        assert f"- **{name}**: {flag}" in md
    # the PPO section's held-out signs are the comparison's, once, beside its training-curve ones
    report = json.loads((eval_dir / "report.json").read_text())
    held_out = [f for f in report["flags"] if f.startswith("held-out: ")]
    assert held_out == [f"held-out: {flag}" for flag in c["flags"]["ppo"]] and len(held_out) == 1
    assert report["figures"]["reward_hacking_suspected"] is True and f"- ⚠️ {held_out[0]}" in md
    assert "a mean KL above 10 nats, a higher reward with responses 2x as long as SFT's" in md
    c["flags"] = {n: [] for n in c["flags"]}
    c["hacking_kl"], c["hacking_length_ratio"] = 7.5, 1.5  # the heading names the thresholds the flags used
    text = "\n".join(comparison_markdown(c))
    assert "a Bonferroni-corrected t test over the run's points): none." in text and "above 7.5 nats" in text
    assert "1.5x as long" in text


def test_describe_and_policy_row_by_hand():
    """describe's std is the population one (pstdev: [0, 2] -> 1, not sqrt 2); a policy row's sqrt_kl is the square
    root of the mean KL (KL 1 and 9 -> sqrt 5, not the mean of the roots, 2), no_eos the share of responses that did
    not end (1 of 4 ended -> 0.75)."""
    import math

    from stages.eval_compare import describe, policy_row

    d = describe([0.0, 2.0])
    assert (d["n"], d["mean"], d["std"], d["min"], d["max"]) == (2, 1.0, 1.0, 0.0, 2.0)
    assert describe([0.0, 0.0, 3.0, 3.0])["std"] == 1.5 and describe([]) == {"n": 0}
    row = policy_row("grpo", [1.0, 2.0], [0.5, -0.5], [1.0, 9.0], [10, 20], [True, False, False, False])
    assert row == {"method": "grpo", "proxy_mean": 1.5, "gold_mean": 0.0, "kl_mean": 5.0, "sqrt_kl": math.sqrt(5.0),
                   "length_mean": 15.0, "no_eos": 0.75}
    assert policy_row("ppo", [0.0], None, [4.0, 4.0], [1], [True])["sqrt_kl"] == 2.0
    assert policy_row("ppo", [0.0], None, [-0.5, -0.5], [1], [True])["sqrt_kl"] == 0.0  # a negative estimate: 0


def two_point_curve(drops):
    """SFT (update 0, gold 1 on each prompt, proxy 0) and the final policy (update 8, gold 1 + drop, proxy 1)."""
    from tests.test_eval import point

    return [point(0, [0.0] * len(drops), [1.0] * len(drops)), point(8, [1.0] * len(drops), [1.0 + d for d in drops])]


SPREAD = [0.5, -0.5] * 8  # 16 prompts' paired drops about their mean: sd 0.516, standard error 0.129


def test_gold_drop_is_measured_in_standard_errors_of_the_mean():
    """The gold fell when its mean paired drop exceeds gold_drop_z standard errors, sd / sqrt(n): 16 drops of +-0.5
    about a mean m flag with m just past -z * 0.129, not just short of it (with sd / sqrt(n - 1) = 0.133, or with the
    sd itself, the first would not flag)."""
    from stages.eval_compare import gold_drop_z, overoptimisation_flag

    se, z = statistics.stdev(SPREAD) / 4, gold_drop_z(2, 16)
    flag = overoptimisation_flag(two_point_curve([d - 1.01 * z * se for d in SPREAD]))
    assert flag and "from update 0 (u0) to update 8" in flag and "(0.000 -> 1.000)" in flag
    assert f"more than {z:.2f} standard errors" in flag
    assert overoptimisation_flag(two_point_curve([d - 0.99 * z * se for d in SPREAD])) is None


def test_the_threshold_is_students_t_on_the_prompts_and_counts_the_checkpoints():
    """Student's t on prompts - 1 degrees of freedom (the standard error is estimated from the prompts' drops), and
    Bonferroni over the points - 1 checkpoints the peak was picked from: 2.03 for two points on 82 prompts, 2.74 for
    seven; 3.31 for two on 4 prompts. A drop of 1.2 two-point thresholds flags a two-point curve, and the same drop
    after five flat checkpoints does not."""
    from statistics import NormalDist

    from pipeline.stats import student_t_isf, student_t_sf
    from stages.eval_compare import gold_drop_z, overoptimisation_flag

    for df, quantile in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (10, 2.2281), (30, 2.0423)):  # t tables, 97.5%
        assert student_t_isf(0.025, df) == pytest.approx(quantile, abs=1e-4)
    assert student_t_sf(0.0, 5) == 0.5 and student_t_sf(-2.0, 7) == pytest.approx(1 - student_t_sf(2.0, 7))
    tail = 1 - NormalDist().cdf(2.0)
    assert gold_drop_z(2, 82) == pytest.approx(student_t_isf(tail, 81)) == pytest.approx(2.0313, abs=1e-4)
    assert gold_drop_z(7, 82) == pytest.approx(student_t_isf(tail / 6, 81)) == pytest.approx(2.7387, abs=1e-4)
    assert gold_drop_z(2, 4) == pytest.approx(3.3068, abs=1e-4) and gold_drop_z(2, 5001) == pytest.approx(2.0, abs=1e-3)
    se = statistics.stdev(SPREAD) / 4
    two = two_point_curve([d - 1.2 * gold_drop_z(2, 16) * se for d in SPREAD])
    assert overoptimisation_flag(two)
    flat = [{**two[0], "update": -u, "policy": f"flat{u}"} for u in range(1, 6)]  # the same scores, earlier
    assert overoptimisation_flag(flat + two) is None


def test_one_prompt_measures_no_drop():
    """One prompt has no standard error: any drop at all (0.6 -> 0.5999) was flagged as reward hacking."""
    from stages.eval_compare import overoptimisation_flag

    assert overoptimisation_flag(two_point_curve([-0.0001])) is None
    assert overoptimisation_flag(two_point_curve([-1.0, -1.0001]))  # two prompts: a standard error, and a drop


def test_a_flat_gold_curve_of_few_prompts_is_flagged_at_the_stated_rate():
    """Statistically: 3 prompts, two points whose gold is the same on average (noise only), the proxy rising. Under
    the t threshold a flat curve is flagged as often as one comparison at 2 normal standard errors (2.3%); the normal's
    2.0 flagged 9.5%. 4,000 curves: the rate's standard error is 0.0024, so 0.013-0.033 is 4 of them either side."""
    rate = flat_curve_flag_rate(curves=4000, points=2, prompts=3, seed=1)
    assert 0.013 < rate < 0.033, rate


def flat_curve_flag_rate(curves: int, points: int, prompts: int, seed: int) -> float:
    """The share of `curves` flagged, each of `points` checkpoints whose gold is noise about one mean on every prompt,
    the proxy rising."""
    import random

    from stages.eval_compare import overoptimisation_flag

    rng, fired = random.Random(seed), 0
    for _ in range(curves):
        curve = []
        for k in range(points):
            gold = [rng.gauss(0.0, 0.3) for _ in range(prompts)]
            curve.append({"update": k, "policy": f"u{k}", "proxy": [float(k)] * prompts, "gold": gold,
                          "proxy_mean": float(k), "gold_mean": statistics.fmean(gold)})
        fired += overoptimisation_flag(curve) is not None
    return fired / curves


def test_a_flat_gold_curve_is_flagged_at_the_stated_rate():
    """Statistically: 82 prompts, seven checkpoints whose gold is the same on average (noise only), the proxy rising.
    The flag must fire about as often as one comparison at 2 normal standard errors (2.3%), not 4 times that (the best
    of six noisy means picked as the peak, then tested as if it were the only one). 2,000 curves: the rate's standard error
    is 0.0034, so 0.035 is 2.5 of them above 0.026."""
    rate = flat_curve_flag_rate(curves=2000, points=7, prompts=82, seed=0)
    assert 0.010 < rate < 0.035, rate


def test_a_two_point_curve_is_a_curve():
    """policy_flags reads overoptimisation_flag on any curve of two points or more: SFT and the final policy alone
    (an RL stage that kept no policy) already show the proxy rising while the gold fell; one point is no curve."""
    from stages.eval_compare import overoptimisation_flag, policy_flags

    row = {"proxy_mean": 0.0, "kl_mean": 0.0, "length_mean": 10.0}
    curve = two_point_curve([d - 1.0 for d in SPREAD])
    flags = policy_flags({"sft": row, "rloo": row, "dpo": row}, 10.0, 2.0, curves={"rloo": curve, "dpo": curve[1:]})
    assert flags == {"rloo": [overoptimisation_flag(curve)], "dpo": []} and flags["rloo"][0]


def test_a_proxy_that_stayed_level_is_no_sign_of_hacking():
    """Goodhart's sign needs the proxy to RISE from the gold's peak to the last point: a gold that fell by 1 on each of
    16 prompts (7.7 standard errors) beside a proxy that stayed level is a policy getting worse, not one exploiting the
    reward model; the same fall beside a proxy 0.001 higher is flagged. Mutant: a level proxy counted as rising."""
    from stages.eval_compare import overoptimisation_flag

    sft, fell = two_point_curve([d - 1.0 for d in SPREAD])  # proxy 0 -> 1
    assert overoptimisation_flag([sft, {**fell, "proxy": sft["proxy"], "proxy_mean": sft["proxy_mean"]}]) is None
    assert overoptimisation_flag([sft, {**fell, "proxy_mean": sft["proxy_mean"] + 0.001}])


def test_policy_method_is_the_manifests_method():
    """The method is the manifest's metrics.method when it names one (the RL loop records its estimator), else the
    stage's name."""
    from stages.eval_compare import policy_method

    assert policy_method("ppo", {"metrics": {"method": "grpo"}}) == "grpo"
    assert policy_method("dpo", {"metrics": {"beta": 0.1}}) == "dpo" and policy_method("dpo", {"metrics": None}) == "dpo"


def test_policy_stages_without_an_adapter_are_skipped(tmp_path, capsys):
    """find_policy_stages keeps the policy stages whose manifest names an adapter, in POLICY_STAGES order; a manifest
    without one is no policy (skipped); a run with none is one error naming `make ppo`."""
    from pipeline.run import StageRun
    from stages.eval_compare import POLICY_STAGES, find_policy_stages

    def write(stage, outputs):
        st = StageRun(stage, "t", str(tmp_path))
        st.prepare({})
        return st.finish(outputs, {}, {})

    write("grpo", {"metrics_jsonl": tmp_path / "m.jsonl"})  # a stage without an adapter
    with pytest.raises(ConfigError, match=r"needs a trained policy in run 't'.*make ppo RUN=t"):
        find_policy_stages(StageRun("eval", "t", str(tmp_path)))
    dpo, ppo = write("dpo", {"adapter": tmp_path / "dpo"}), write("ppo", {"adapter": tmp_path / "ppo"})
    eval_run = StageRun("eval", "t", str(tmp_path))
    found = find_policy_stages(eval_run)
    assert list(found) == ["ppo", "dpo"] and found == {"ppo": ppo, "dpo": dpo}
    assert eval_run.optional == set(POLICY_STAGES)  # every one read when present: one appearing later reruns eval
    # an interrupted one (started, no manifest) is not compared either, and eval says so: it was left out unsaid
    StageRun("rloo", "t", str(tmp_path)).prepare({})
    capsys.readouterr()
    assert list(find_policy_stages(StageRun("eval", "t", str(tmp_path)))) == ["ppo", "dpo"]
    assert capsys.readouterr().err == (f"note: rloo did not finish (interrupted; {tmp_path / 't' / 'rloo'} has no "
                                       f"manifest): it is not compared; `make rloo RUN=t` finishes it\n")


def test_plot_draws_each_policy_at_its_sqrt_kl_and_gold(tmp_path, monkeypatch):
    """Gao et al.'s axes: sqrt(KL to SFT) across, the gold score up, each series from its own policy's points."""
    from stages.eval_plots import plot_gold_vs_kl
    from tests.test_eval import drawn

    calls = drawn(monkeypatch)
    pt = lambda u, x, g: {"update": u, "sqrt_kl": x, "gold_mean": g}  # noqa: E731
    curves = {"sft": [pt(0, 0.0, 0.1)], "ppo": [pt(0, 0.0, 0.1), pt(4, 1.0, 0.3), pt(8, 2.0, 0.2)],
              "dpo": [pt(1, 0.7, 0.25)]}
    plot_gold_vs_kl(curves, tmp_path / "p.png")
    assert [(label, x, y) for _, _, x, y, label in calls] == [("sft", [0.0], [0.1]), ("ppo", [0.0, 1.0, 2.0], [0.1, 0.3, 0.2]),
                                                               ("dpo", [0.7], [0.25])]
    axes = {c[0] for c in calls}
    assert len(axes) == 1
    ax = axes.pop()
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("sqrt(KL to SFT)  (sqrt nats)", "gold score (mean)")


def test_the_plots_label_each_kept_policys_point_with_its_update_and_join_only_a_runs_points(tmp_path, monkeypatch):
    """The update labels: in the comparison plot on each RL run's points after SFT's (SFT's own point, update 0, and a
    one-point DPO series carry none); in the over-optimisation plot on every point of the gold curve. A line joins an
    RL run's points only: a one-point series is a marker (its legend entry no line)."""
    from matplotlib.axes import Axes

    from stages.eval_plots import plot_gold_vs_kl, plot_overoptimisation

    notes, styles, real_plot = [], {}, Axes.plot

    def plot(self, x, y, *args, **kw):
        styles[kw.get("label")] = kw.get("linestyle")
        return real_plot(self, x, y, *args, **kw)

    monkeypatch.setattr(Axes, "plot", plot)
    monkeypatch.setattr(Axes, "annotate", lambda self, text, xy, **kw: notes.append((text, tuple(xy))))
    pt = lambda u, x, g: {"update": u, "sqrt_kl": x, "gold_mean": g, "proxy_mean": 0.9}  # noqa: E731
    plot_gold_vs_kl({"sft": [pt(0, 0.0, 0.1)], "ppo": [pt(0, 0.0, 0.1), pt(4, 1.0, 0.3), pt(8, 2.0, 0.2)],
                     "dpo": [pt(1, 0.7, 0.25)]}, tmp_path / "p.png")
    assert notes == [("4", (1.0, 0.3)), ("8", (2.0, 0.2))] and styles == {"sft": "none", "ppo": "-", "dpo": "none"}
    notes.clear()
    plot_overoptimisation([pt(0, 0.0, 0.1), pt(4, 1.0, 0.3)], tmp_path / "o.png")
    assert notes == [("0", (0.0, 0.1)), ("4", (1.0, 0.3))]


def test_the_win_rate_table_reads_row_over_column(tmp_path):
    """matrix_markdown's cell (row a, column b) is a's win rate over b with that rate's own interval: a beats c on one
    of four prompts and ties one (37.5%), c beats a on two and ties one (62.5%)."""
    from stages.eval_compare import matrix_markdown, win_rate_matrix

    m = win_rate_matrix({"a": [1.0, 2.0, 3.0, 0.0], "c": [2.0, 2.0, 2.0, 2.0]})
    pct = lambda w: f"{w['rate']:.0%} ({w['ci_low']:.0%}–{w['ci_high']:.0%})"  # noqa: E731
    lines = matrix_markdown(m, "by hand")
    assert f"| **a** | – | {pct(m['a']['c'])} |" in lines and f"| **c** | {pct(m['c']['a'])} | – |" in lines
    assert pct(m["a"]["c"]).startswith("38% (") and pct(m["c"]["a"]).startswith("62% (")


def test_describe_by_hand_and_a_held_out_row_without_a_prompt_is_one_error(tmp_path):
    """describe's quartiles are statistics' default (exclusive) method: for 1, 2, 3, 4 the positions (n + 1) p give
    1.25, 2.5 and 3.75; the std is the population's, sqrt(1.25). A held-out prompts file whose row lacks 'prompt' is one
    ConfigError naming the file and the row, not a KeyError."""
    import math

    from pipeline.config import ConfigError
    from stages.eval_compare import describe, read_prompt_rows

    assert describe([1.0, 2.0, 3.0, 4.0]) == {"n": 4, "mean": 2.5, "std": math.sqrt(1.25), "min": 1.0, "p25": 1.25,
                                              "median": 2.5, "p75": 3.75, "max": 4.0}
    rows = tmp_path / "heldout_prompts.jsonl"
    rows.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ConfigError, match=f"held-out prompts {rows}: row 2 has no 'prompt': rerun the stage"):
        read_prompt_rows(rows)


def test_describe_of_two_scores_takes_their_quartiles_and_a_missing_held_out_file_is_one_error(tmp_path):
    """Two scores are quartiled as any other number of them (statistics' exclusive method: 0 and 2 -> -0.5, 1, 2.5),
    only one score is its own quartiles. Mutant: two scores reported as the first one three times (median 0, not 1).
    A held-out prompts file that is not there is one ConfigError saying to rerun its stage, not a FileNotFoundError."""
    from stages.eval_compare import describe, read_prompt_rows

    d = describe([0.0, 2.0])
    assert (d["p25"], d["median"], d["p75"]) == (-0.5, 1.0, 2.5)
    assert (describe([3.0])["p25"], describe([3.0])["median"], describe([3.0])["p75"]) == (3.0, 3.0, 3.0)
    with pytest.raises(ConfigError, match=r"held-out prompts .*nowhere.jsonl are missing: rerun the stage"):
        read_prompt_rows(tmp_path / "nowhere.jsonl")


def test_a_level_proxy_with_longer_replies_is_no_length_flag():
    """The length sign needs a reward-model score ABOVE SFT's: the same score with replies twice as long is no sign of
    the reward model rewarding length; 0.001 above it is. Mutant: `>=` (a level proxy flagged)."""
    from stages.eval_compare import policy_flags

    row = lambda proxy, length: {"proxy_mean": proxy, "kl_mean": 0.0, "length_mean": length}  # noqa: E731
    flags = policy_flags({"sft": row(0.5, 10.0), "ppo": row(0.5, 30.0), "grpo": row(0.501, 30.0)}, hacking_kl=10.0,
                         length_ratio=2.0, curves={})
    assert flags["ppo"] == []
    assert flags["grpo"] == ["a higher reward-model score with responses 3.0x as long as SFT's (10.0 -> 30.0 tokens)"]


def test_the_reward_model_reads_each_prompt_cut_as_the_policies_saw_it(tmp_path, tiny_models, monkeypatch):
    """--max_prompt_tokens cuts the prompts the policies answer; the reward model read each whole (past a GPT-2
    base's positions: an IndexError after eval/sampled/ was written). Every policy's replies, the final ones and a
    kept one's along the gold curve, are scored after the same cut prompt."""
    import stages.eval as ev
    from pipeline.generation import chat_reward_inputs

    starts = []

    def recording(tokenizer, prompts, texts, max_prompt_tokens=None):
        ids, mask, first = chat_reward_inputs(tokenizer, prompts, texts, max_prompt_tokens)
        starts.append(first.tolist())
        return ids, mask, first

    monkeypatch.setattr(ev, "chat_reward_inputs", recording)
    profile = tiny_models["llama"]
    runs = build_upstream(tmp_path / "runs", profile)
    add_policy_stage(runs, profile, "grpo", adapter_from=runs / "t" / "ppo" / "adapter",
                     kept={2: runs / "t" / "sft" / "adapter"})
    run_eval(runs, profile, "--max_prompt_tokens", "12")
    assert len(starts) == 4  # sft, ppo, grpo, grpo's kept update-2
    assert all(s == 12 for batch in starts for s in batch)
