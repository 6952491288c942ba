"""`make eval`: the real stage on a fake finished run (tests/fake_upstream.py): report, plots, manifest, flags."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.stats import wilson
from tests.conftest import on_device
from tests.fake_upstream import build_upstream, evaluated_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, tiny_models):
    return evaluated_run(tmp_path_factory, tiny_models["llama"]) / "t" / "eval"


def test_manifest_holds_the_headline_figures(eval_dir):
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    m = manifest["metrics"]
    for key in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "reward_sft_mean", "reward_ppo_mean", "kl_mean",
                "length_sft_mean", "length_ppo_mean", "no_eos_sft", "no_eos_ppo", "n_prompts"):
        assert isinstance(m[key], (int, float)), key
    assert m["n_prompts"] == 6 and 0 <= m["win_rate_ci_low"] <= m["win_rate"] <= m["win_rate_ci_high"] <= 1
    assert set(manifest["upstream"]) == {"sft", "rm", "ppo"}
    assert (eval_dir / "report.md").is_file() and manifest["outputs"]["report_json"].endswith("report.json")


def test_report_json_figures_match_its_samples(eval_dir):
    report = json.loads((eval_dir / "report.json").read_text())
    s, f = report["samples"], report["figures"]
    assert len(s) == f["n_prompts"] == 6
    rs, rp = [x["reward_sft"] for x in s], [x["reward_ppo"] for x in s]
    assert f["reward_sft_mean"] == pytest.approx(statistics.fmean(rs))
    assert f["reward_ppo_mean"] == pytest.approx(statistics.fmean(rp))
    assert f["kl_mean"] == pytest.approx(statistics.fmean(x["kl"] for x in s))
    assert f["length_ppo_mean"] == pytest.approx(statistics.fmean(x["length_ppo"] for x in s))
    assert f["no_eos_sft"] == pytest.approx(statistics.fmean(not x["eos_sft"] for x in s))
    wins = sum(p > q for p, q in zip(rp, rs))
    ties = sum(p == q for p, q in zip(rp, rs))
    assert report["win_rate"]["wins"] == wins and f["win_rate"] == pytest.approx((wins + 0.5 * ties) / len(s))
    assert report["reward"]["ppo"]["median"] == pytest.approx(statistics.median(rp))
    # the policies differ (random LoRA deltas), so the KL is positive and the rewards vary
    assert all(x["kl"] > 0 for x in s) and len(set(rs + rp)) > 2
    assert all(x["length_ppo"] <= 12 and x["sft"] is not None for x in s)


def test_plots_are_valid_pngs(eval_dir):
    from PIL import Image

    report = json.loads((eval_dir / "report.json").read_text())
    assert set(report["plots"]) == {"training_curves", "reward_distribution", "overview", "overoptimisation", "gold_vs_kl"}
    for rel in report["plots"].values():
        path = eval_dir / rel
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    md = (eval_dir / "report.md").read_text()
    assert "plots/training_curves.png" in md and "Win rate of PPO over SFT" in md and "| prompt |" in md


def test_a_new_eval_leaves_no_plot_of_the_last_one(eval_dir, tiny_models, tmp_path):
    """An eval without a gold judge after one with it kept the old gold_vs_kl.png and overoptimisation.png in plots/,
    and publish uploaded them beside a report without a gold judge. plots/ now holds exactly the report's plots."""
    import shutil

    from stages.eval import main, parse_args

    runs = tmp_path / "runs"
    shutil.copytree(eval_dir.parent, runs / "t")
    assert {"gold_vs_kl.png", "overoptimisation.png"} <= {p.name for p in (runs / "t" / "eval" / "plots").iterdir()}
    main(*parse_args(["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs), "--model_config",
                      str(tiny_models["llama"]), "--max_new_tokens", "12", "--gold_judge", ""]))
    report = json.loads((runs / "t" / "eval" / "report.json").read_text())
    assert sorted(report["plots"].values()) == sorted(f"plots/{p.name}" for p in (runs / "t" / "eval" / "plots").iterdir())
    assert "overoptimisation" not in report["plots"]


def test_the_no_flag_line_names_the_runs_own_thresholds(eval_dir):
    """report.md said "a doubled length" whatever --hacking_length_ratio was."""
    from stages.eval_ppo import ppo_markdown

    report = json.loads((eval_dir / "report.json").read_text())
    quiet = {**report, "flags": [], "comparison": {**report["comparison"], "hacking_length_ratio": 3.0, "hacking_kl": 7.5}}
    md = "\n".join(ppo_markdown(quiet, 4))
    assert ("No sign of it: the reward did not rise together with 3 times the length, and KL stayed below the "
            "threshold (7.5 nats)") in md
    # with a gold judge it says the over-optimisation rule too: a gold that fell by less is no flag
    said = ", and the gold did not fall from its best point by more than about 2 paired standard errors while the " \
           "reward model's score rose (the over-optimisation table above)."
    assert (said in md) == bool(report.get("gold"))
    assert said not in "\n".join(ppo_markdown({**quiet, "gold": None}, 4))


def test_reward_hacking_is_flagged(eval_dir):
    """The fake training curves: reward up while the length went from 10 to ~23 tokens."""
    report = json.loads((eval_dir / "report.json").read_text())
    assert any("reward rose" in f and "reward hacking" in f for f in report["flags"])
    assert report["figures"]["reward_hacking_suspected"] is True
    assert "⚠️" in (eval_dir / "report.md").read_text()


@pytest.mark.parametrize("arch", ["gpt2"])  # absolute positions: left padding must not shift them
def test_ppo_equal_to_sft_gives_zero_kl_and_all_ties(tmp_path, tiny_models, arch):
    """Point the PPO manifest at the SFT adapter: same seed, same samples, so KL 0 and a 50% win rate of ties (two
    samples a prompt: 12 ties on 6 prompts)."""
    from stages.eval import main, parse_args

    runs = build_upstream(tmp_path / "runs", tiny_models[arch])
    path = runs / "t" / "ppo" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["outputs"]["adapter"] = str(runs / "t" / "sft" / "adapter")
    path.write_text(json.dumps(manifest))
    m = main(*parse_args(["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs),
                          "--model_config", str(tiny_models[arch]), "--max_new_tokens", "8", "--samples_per_prompt", "2"]))
    report = json.loads((runs / "t" / "eval" / "report.json").read_text())
    assert all(s["sft"] == s["ppo"] for s in report["samples"]) and len(report["samples"]) == 12
    assert m["kl_mean"] == pytest.approx(0.0, abs=1e-5) and m["win_rate"] == 0.5 and report["win_rate"]["ties"] == 12
    assert (m["n_prompts"], m["samples_per_prompt"]) == (6, 2)
    # every pair a tie: every prompt's share 0.5, so nothing says a prompt's pairs are alike: the 12 pairs' interval
    assert (m["win_rate_ci_low"], m["win_rate_ci_high"]) == pytest.approx(wilson(6, 12))
    assert m["reward_sft_mean"] == pytest.approx(m["reward_ppo_mean"])
    # the gold judge sees the same: a 0.5 win rate, inside its interval, and no over-optimisation
    assert m["gold_win_rate"] == 0.5 and m["gold_win_rate_ci_low"] < 0.5 < m["gold_win_rate_ci_high"]
    assert m["gold_sft_mean"] == m["gold_ppo_mean"] and m["overoptimisation_suspected"] is False
    # every figure counts prompts: the gold rate's interval, the matrices', the curves' per-prompt scores
    assert (m["gold_win_rate_ci_low"], m["gold_win_rate_ci_high"]) == pytest.approx(wilson(6, 12))
    c = report["comparison"]
    assert c["n_prompts"] == 6 and c["win_rate_gold"]["ppo"]["sft"]["n"] == c["win_rate_proxy"]["sft"]["ppo"]["n"] == 6
    assert [len(p["gold"]) for p in report["gold"]["curve"] + c["curves"]["ppo"] + c["curves"]["sft"]] == [6] * 5
    # report.md: two samples a prompt, its table a row a prompt (each prompt's first pair)
    md = (runs / "t" / "eval" / "report.md").read_text()
    assert "6 held-out prompts (never trained on), 2 sampled responses per prompt and policy" in md
    table = md[md.index("## Samples"):].splitlines()[4:]
    shown = [row.split(" | ")[0] for row in table if row.startswith("| ")]
    assert len(shown) == len(set(shown)) == 6, shown
    people = [json.loads(line) for line in (runs / "t" / "eval" / "human_pairs.jsonl").read_text().splitlines()]
    assert [p["pair_id"] for p in people] == [s["pair_id"] for s in report["samples"][::2]]


def test_sequence_kl_by_hand():
    """Eval's KL is KL(policy || reference) at the sampling temperature, exact over the vocabulary at each response
    position, summed over the response's real tokens: checked against a loop over made-up logits."""
    import math
    from types import SimpleNamespace

    import torch

    from stages.eval import sequence_kl

    torch.manual_seed(0)
    B, P, R, V, T = 3, 2, 4, 5, 0.7
    made_up = {"policy": torch.randn(B, P + R, V) * 2, "reference": torch.randn(B, P + R, V) * 2}
    stack = SimpleNamespace(model=torch.nn.Linear(1, 1),
                            logits=lambda name, ids, mask, position_ids=None: made_up[name][: len(ids)])
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    gens = SimpleNamespace(prompt_ids=torch.zeros(B, P, dtype=torch.long), prompt_mask=torch.ones(B, P, dtype=torch.long),
                           response_ids=torch.zeros(B, R, dtype=torch.long), response_mask=response_mask)
    got = sequence_kl(stack, "policy", "reference", {"gens": gens}, batch=B, temperature=T)
    want = []
    for b in range(B):
        total = 0.0
        for t in range(R):  # the logits at position P - 1 + t predict response token t
            if response_mask[b, t]:
                p = torch.softmax(made_up["policy"][b, P - 1 + t] / T, -1).tolist()
                q = torch.softmax(made_up["reference"][b, P - 1 + t] / T, -1).tolist()
                total += sum(pv * math.log(pv / qv) for pv, qv in zip(p, q))
        want.append(total)
    assert got == pytest.approx(want, rel=1e-5) and all(w > 0 for w in want)


def test_wilson_interval_and_ties_count_half():
    from pipeline.stats import wilson
    from stages.eval_compare import win_rate

    low, high = wilson(8, 10)  # hand computed: centre 0.7167, half width 0.2266
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    w = win_rate([1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 1.0, 3.0])
    assert (w["wins"], w["ties"], w["losses"]) == (1, 2, 1) and w["rate"] == 0.5


def test_a_grouped_win_rate_averages_each_prompts_pairs_and_its_interval_takes_their_effective_number():
    """samples_per_prompt 4: two prompts of four rows each, prompt-major. PPO wins 1 of the first prompt's pairs (one
    tie: the same reply, whatever its scores) and all 4 of the second's: shares 0.375 and 1, rate 0.6875; the shares'
    variance 0.1953 against p(1-p) 0.2148 makes the 8 pairs worth 2 x 0.2148 / 0.1953 = 2.2 trials, and the Wilson
    interval is wilson(0.6875 x 2.2, 2.2), not the 8 pairs' (far narrower)."""
    from stages.eval_compare import win_rate

    ppo, sft = [1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.4, 0.0, 0.0, 0.0, 0.0]
    same = [False, False, False, True] + [False] * 4
    w = win_rate(ppo, sft, same_text=same, group=4)
    assert (w["wins"], w["ties"], w["losses"], w["n"], w["pairs"]) == (5, 1, 2, 2, 8)
    assert w["rate"] == 5.5 / 8 and w["n_effective"] == pytest.approx(2.2)
    assert (w["ci_low"], w["ci_high"]) == pytest.approx(wilson(0.6875 * 2.2, 2.2))
    assert (w["ci_low"], w["ci_high"]) != pytest.approx(wilson(5.5, 8))
    ungrouped = win_rate(ppo, sft, same_text=same)  # one row a prompt: the interval over the 8
    assert ungrouped["n"] == ungrouped["n_effective"] == 8 and (ungrouped["ci_low"], ungrouped["ci_high"]) == \
        pytest.approx(wilson(5.5, 8))
    with pytest.raises(ValueError, match="8 rows are not whole groups of 3"):
        win_rate(ppo, sft, group=3)


def test_the_effective_trials_lie_between_the_prompts_and_the_pairs_by_hand():
    """Kish's effective size of 4 prompts x 4 pairs, prompts x p(1-p) / var(shares) (sample variance): shares 0.25,
    0.75, 0.5, 1 give p 0.625, variance 0.3125 / 3, so 4 x 0.234375 / 0.1041667 = 9; shares that vary as single trials
    (0, 1, 0, 1: 3 by the formula) are worth the 4 prompts; nearly equal shares (0.5, 0.75, 0.25, 0.5: 24) the 16
    pairs; equal shares the pairs; one pair a prompt the prompts."""
    from stages.eval_compare import effective_trials

    assert effective_trials([0.25, 0.75, 0.5, 1.0], 4) == pytest.approx(9.0)
    assert effective_trials([0.0, 1.0, 0.0, 1.0], 4) == 4.0
    assert effective_trials([0.5, 0.75, 0.25, 0.5], 4) == 16.0
    assert effective_trials([0.5] * 4, 4) == 16.0
    assert effective_trials([0.0, 1.0, 1.0], 1) == 3.0


def test_a_curve_point_pairs_prompts_by_their_means():
    """The gold curve's per-prompt scores are each prompt's mean over its samples, so the over-optimisation flag's
    paired t test counts prompts: two prompts of two samples give two per-prompt values, and the means are the rows'."""
    from stages.eval_ppo import curve_point

    p = curve_point(6, "update-6", [1.0, 3.0, 0.0, 2.0], [0.2, 0.4, 0.9, 0.5], [4.0, 4.0, 1.0, 1.0], group=2)
    assert p["proxy"] == [2.0, 1.0] and p["gold"] == pytest.approx([0.3, 0.7])
    assert (p["proxy_mean"], p["gold_mean"], p["kl_mean"], p["sqrt_kl"]) == pytest.approx((1.5, 0.5, 2.5, 2.5 ** 0.5))


def test_the_policy_samples_agreement_interval_counts_prompts():
    """Two prompts of three rows: 5 counted pairs (one row's gold tie left out) on 2 prompts. The agreement is the
    pairs' (4 of 5), its Wilson interval over the 2 prompts (as a win rate's), not the 5 pairs."""
    from stages.eval_ppo import gold_agreement

    proxy_a, proxy_b = [1.0, 1.0, 1.0, 1.0, -1.0, 1.0], [0.0] * 6
    gold_a, gold_b = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    a = gold_agreement(proxy_a, proxy_b, gold_a, gold_b, group=3)
    assert (a["agreement"], a["pairs"], a["prompts"]) == (0.8, 5, 2)
    assert (a["ci_low"], a["ci_high"]) == pytest.approx(wilson(0.8 * 2, 2))
    rows = gold_agreement(proxy_a, proxy_b, gold_a, gold_b)
    assert rows["prompts"] == 5 and (rows["ci_low"], rows["ci_high"]) == pytest.approx(wilson(4, 5))


def test_the_gold_report_counts_prompts_of_several_samples():
    """gold_report at 2 samples a prompt, 4 rows: its win rate, its curve's ends and the policy samples' agreement
    are over the 2 prompts (shares 1 and 0.5: p 0.75, the pairs worth 2 x 0.1875 / 0.125 = 3 trials)."""
    from types import SimpleNamespace

    from stages.eval_ppo import gold_report

    ro_sft = {"texts": ["s0", "s1", "s2", "s3"], "rewards": [0.0] * 4}
    ro_ppo = {"texts": ["p0", "p1", "p2", "p3"], "rewards": [1.0] * 4}
    gold = gold_report(SimpleNamespace(spec="test"), [], SimpleNamespace(gold_batch_size=8, samples_per_prompt=2),
                       ([], [], []), [], 4, ro_sft, ro_ppo, [1.0] * 4, [0.0] * 4, [1.0, 1.0, 1.0, -1.0])
    w = gold["win_rate"]
    assert (w["n"], w["pairs"], w["rate"]) == (2, 4, 0.75) and w["n_effective"] == pytest.approx(3.0)
    assert (w["ci_low"], w["ci_high"]) == pytest.approx(wilson(2.25, 3.0))
    assert [len(p["gold"]) for p in gold["curve"]] == [2, 2] and gold["curve"][1]["gold"] == [1.0, 0.0]
    assert gold["rm_agreement_policy_samples"]["prompts"] == 2


def test_wilson_of_no_trials_is_the_whole_interval():
    from pipeline.stats import wilson

    assert wilson(0, 0) == (0.0, 1.0)


def test_wilson_at_none_and_all_successes_stays_inside_0_and_1():
    """Wilson's bounds at 0 of n and n of n are 0 and 1 exactly; in floating point they come out a hair outside
    (-2.8e-17 at 0 of 5, 1 + 2.2e-16 at 5 of 5): clamped, an interval never claims a rate below 0 or above 1."""
    from pipeline.stats import wilson

    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0 and wilson(19, 19)[1] == 1.0
    low, high = wilson(0, 5)
    assert high == pytest.approx(0.434491, abs=1e-6)  # z^2/n / (1 + z^2/n) at z = 1.96, n = 5


def test_peak_memory_mb_is_the_processes_peak_rss_in_mb(monkeypatch):
    """pipeline.report.peak_memory_mb on CPU: ru_maxrss (kB on Linux) in MB, as /proc's VmHWM of this process says."""
    from pathlib import Path

    from pipeline.report import peak_memory_mb

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    hwm_kb = int([line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")][0].split()[1])
    assert peak_memory_mb("cpu") == pytest.approx(hwm_kb / 1024, rel=0.05) and peak_memory_mb("cpu") > 50


def test_optimised_reward_refuses_stages_rewarded_by_different_models(tmp_path):
    """One reward column for every policy: RL stages given different reward models are one ConfigError naming them;
    stages all given one reward_adapter are scored with it, unnormalised."""
    from stages.eval import optimised_reward

    given = str(tmp_path / "other_rm")
    with pytest.raises(ConfigError, match=r"rewarded by different reward models \(ppo: .*other_rm, grpo: the rm stage\)"):
        optimised_reward({}, {"ppo": {"reward_adapter": given}, "grpo": {}})
    adapters, stats, adapter = optimised_reward({}, {"ppo": {"reward_adapter": given}, "grpo": {"reward_adapter": given}})
    assert adapter == given and stats == [(0.0, 1.0)] and list(adapters) == ["reward"]


def test_started_from_is_the_given_sft_adapter_or_the_sft_stages_and_one_for_every_policy(tmp_path):
    """eval's SFT baseline: the sft stage's adapter, or the `sft_adapter` every RL stage was given; DPO starts from the
    sft stage's, so a DPO policy beside an RL stage given another SFT is refused, as two RL stages given two are."""
    from stages.eval import started_from

    sft, own = {"outputs": {"adapter": "runs/t/sft/adapter"}}, str(tmp_path / "my_sft")
    assert started_from(sft, {"ppo": {}}, {"ppo": {}, "dpo": {}}) == ("runs/t/sft/adapter", None)
    assert started_from(sft, {"ppo": {"sft_adapter": own}, "grpo": {"sft_adapter": own}}, {"ppo": {}, "grpo": {}}) == (
        own, own)
    with pytest.raises(ConfigError, match=r"different SFT adapters \(ppo: .*my_sft, dpo: the sft stage\)"):
        started_from(sft, {"ppo": {"sft_adapter": own}}, {"ppo": {}, "dpo": {}})


def test_human_win_rate_read_back_from_the_label_store(tmp_path, eval_dir):
    """human_pairs.jsonl goes into the labeling stage's real store; the labels come back as a win rate."""
    from stages.eval_ppo import human_win_rate
    from stages.label.store import LabelStore

    samples = json.loads((eval_dir / "report.json").read_text())["samples"]
    pairs = [json.loads(line) for line in (eval_dir / "human_pairs.jsonl").read_text().splitlines()]
    assert [p["pair_id"] for p in pairs] == [s["pair_id"] for s in samples]
    assert pairs[0]["responses"] == [samples[0]["sft"], samples[0]["ppo"]]
    store = LabelStore(tmp_path / "labels.sqlite")
    store.import_items(pairs + [{"pair_id": "other", "prompt": pairs[0]["prompt"], "responses": ["x", "y"]}])
    ids = [p["pair_id"] for p in pairs]
    # PPO (response 1) preferred twice (shown left once, right once), SFT once, one tie; a label elsewhere is ignored
    for pid, choice, shown_left in ((ids[0], "left", 1), (ids[1], "right", 0), (ids[2], "left", 0), (ids[3], "tie", 0),
                                    ("other", "left", 1)):
        store.save_label("ann", pid, choice, shown_left)
    for pid in ids[:4]:  # a simulated annotator on the same pairs is not a person
        store.save_label("sim:sentiment", pid, "left", 1)
    h = human_win_rate(store.path, {i: 1 for i in ids})
    assert h["labels"] == 4 and h["rate"] == pytest.approx(2.5 / 4) and h["ci_low"] < h["rate"] < h["ci_high"]
    assert human_win_rate(tmp_path / "missing.sqlite", {i: 1 for i in ids}) is None


def ppo_section(tmp_path, ended_sft, ended_ppo, gold=None, kl=(1.0, 1.0, 1.0, 1.0), args=None):
    """sft_vs_ppo on four made-up prompts (no model work): PPO beats SFT under the reward model on the first three,
    the training curves are tests/fake_upstream.py's, the label store is the run's default one (label/labels.sqlite
    beside the ppo folder)."""
    from types import SimpleNamespace

    from stages.eval import EvalArgs
    from stages.eval_ppo import sft_vs_ppo
    from tests.fake_upstream import fake_metrics

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fake_metrics()))
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(4)]
    ro_sft = {"texts": [f"sft answer {i}" for i in range(4)], "rewards": [0.0, 0.0, 0.0, 1.0],
              "lengths": [5, 6, 7, 8], "ended": ended_sft}
    ro_ppo = {"texts": [f"ppo answer {i}" for i in range(4)], "rewards": [1.0, 2.0, 3.0, 0.0],
              "lengths": [9, 10, 11, 12], "ended": ended_ppo}
    return sft_vs_ppo(SimpleNamespace(spec="made-up gold"), prompts, args or EvalArgs(), {"outputs": {"metrics_jsonl":
                      str(tmp_path / "metrics.jsonl")}}, tmp_path / "ppo", ro_sft, ro_ppo, list(kl), gold,
                      ([], [], []), [])


def test_a_samples_length_is_its_replys_tokens_up_to_its_eos(tiny_models, monkeypatch):
    """eval's rollout records each reply's length as its real tokens, up to and including its EOS (the length-hacking
    flag and the report's length columns read it): 3 for a reply that ended at its third token, 4 for one that ran
    to the limit of 4. Sampling and scoring faked; the masks by hand."""
    import stages.eval as ev
    from pipeline.generation import Generations, SamplingConfig
    from pipeline.models import load_tokenizer, profile_from

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    gens = Generations(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                       torch.tensor([[5, 6, eos, pad], [5, 6, 7, 8]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
                       ["a b", "a b c d"], torch.tensor([True, False]))
    monkeypatch.setattr(ev, "generate", lambda *a, **k: gens)

    class Stack:
        model = torch.nn.Linear(1, 1)

        def use(self, name):
            pass

        def scores(self, name, ids, mask, starts):
            return torch.zeros(len(ids))

    prompts = [[{"role": "user", "content": "Once"}], [{"role": "user", "content": "Then"}]]
    ro = ev.rollout(Stack(), "ppo", tok, prompts, [[1], [1]], SamplingConfig(max_new_tokens=4), 0, 8)
    assert ro["lengths"] == [3, 4] and ro["ended"] == [True, False] and ro["rewards"] == [0.0, 0.0]


def test_no_eos_figures_are_the_shares_without_eos(tmp_path):
    """no_eos_sft / no_eos_ppo = the share of samples that did not end with EOS: 1 of 4 for SFT, 3 of 4 for PPO."""
    out = ppo_section(tmp_path, ended_sft=[True, True, True, False], ended_ppo=[True, False, False, False])
    f = out["figures"]
    assert f["no_eos_sft"] == 0.25 and f["no_eos_ppo"] == 0.75
    assert [s["eos_ppo"] for s in out["samples"]] == [True, False, False, False]
    assert f["win_rate"] == 0.75 and f["human_win_rate"] is None and out["human"] is None  # no label store yet


def ppo_section_labelled(tmp_path, votes: list[tuple[str, int]], args=None) -> dict:
    """ppo_section after one person labeled its four SFT-vs-PPO pairs in the run's store: votes[i] = (choice,
    shown_left) on pair i, whose responses are [SFT, PPO]."""
    from stages.label.store import LabelStore

    ended = [True] * 4
    samples = ppo_section(tmp_path, ended, ended, args=args)["samples"]
    store = LabelStore(tmp_path / "label" / "labels.sqlite")
    store.import_items([{"pair_id": s["pair_id"], "prompt": s["prompt"], "responses": [s["sft"], s["ppo"]]}
                        for s in samples])
    for s, (choice, shown_left) in zip(samples, votes, strict=True):
        store.save_label("ann", s["pair_id"], choice, shown_left)
    return ppo_section(tmp_path, ended, ended, args=args)


def test_human_win_rate_counts_a_ppo_preference_as_a_ppo_win(tmp_path):
    """sft_vs_ppo reads the labels on its pairs (responses = [SFT, PPO], as human_pairs.jsonl writes them) from the
    run's label store: PPO (response 1) preferred on 3 pairs, SFT (response 0) on 1 -> a human win rate of 3/4."""
    # PPO shown left and clicked left, PPO shown right and clicked right, PPO shown left, then SFT shown left and clicked
    out = ppo_section_labelled(tmp_path, [("left", 1), ("right", 0), ("left", 1), ("left", 0)])
    h = out["human"]
    assert (h["labels"], h["wins"], h["ties_or_both_bad"]) == (4, 3, 0) and h["rate"] == 0.75
    assert out["figures"]["human_win_rate"] == 0.75


def test_the_human_win_rate_reads_the_pairs_eval_wrote_for_people(tmp_path):
    """Two samples a prompt: human_pairs.jsonl holds each prompt's first pair (rows 0 and 2), so the human win rate
    reads labels on those alone: labels on rows 1 and 3 (the same texts served from another file) do not count."""
    from stages.eval import EvalArgs

    out = ppo_section_labelled(tmp_path, [("left", 1), ("left", 0), ("right", 0), ("left", 0)],
                               args=EvalArgs(samples_per_prompt=2))
    assert (out["human"]["pairs"], out["human"]["labels"], out["human"]["rate"]) == (2, 2, 1.0)


def test_rm_gold_agreement_on_the_policy_samples_by_hand(tmp_path):
    """The reward model's agreement with the gold on the SFT-vs-PPO pairs: over the pairs whose gold scores differ,
    the share where the proxy orders PPO against SFT as the gold does. Proxy PPO - SFT = 1, 2, 3, -1; gold PPO - SFT
    = 0.5, 0.5, -0.5, 0 (left out): agree, agree, disagree -> 2/3 on 3 pairs."""
    ended = [True] * 4
    out = ppo_section(tmp_path, ended, ended, gold={"sft": [0.0, 0.0, 0.0, 0.3], "ppo": [0.5, 0.5, -0.5, 0.3]})
    g, f = out["gold"], out["figures"]
    assert g["rm_agreement_policy_samples"]["pairs"] == 3
    assert g["rm_agreement_policy_samples"]["agreement"] == f["rm_gold_agreement_policy_samples"] == pytest.approx(2 / 3)
    assert f["rm_gold_agreement"] is None and f["rm_gold_pairs"] == 0  # the made-up run kept no RM held-out pairs
    assert f["gold_win_rate"] == 0.625 and [p["update"] for p in g["curve"]] == [0, 11]  # 2 wins, 1 tie, 1 loss


def summary_rows(n: int = 20, **curves) -> list[dict]:
    """n training rows: every curve constant at 1.0 unless given as a function of the update."""
    keys = ("reward_raw", "reward", "kl", "entropy", "response_length", "no_eos_fraction")
    return [{"update": i, **{k: float(curves[k](i)) if k in curves else 1.0 for k in keys}} for i in range(n)]


def test_training_summary_first_and_last_are_means_of_a_tenth():
    """first / last = the mean of the first / last tenth of the updates (len // 10, at least one), max over all:
    20 rows of reward_raw = update -> first (0 + 1) / 2, last (18 + 19) / 2, max 19."""
    from stages.eval_ppo import training_summary

    t = training_summary(summary_rows(20, reward_raw=lambda i: i))
    assert t["updates"] == 20
    assert (t["reward_raw_first"], t["reward_raw_last"], t["reward_raw_max"]) == (0.5, 18.5, 19.0)
    t = training_summary(summary_rows(5, reward_raw=lambda i: i))  # fewer than 10: one row each
    assert (t["reward_raw_first"], t["reward_raw_last"]) == (0.0, 4.0)
    assert training_summary([]) == {"updates": 0}


def test_training_flags_by_hand():
    """The training-curve signs: the raw reward (not the KL-shaped one) rose while the length grew at least
    hacking_length_ratio times (exactly 2x flags, 1.99x does not); the KL's maximum over the run (a spike mid-run
    counts, though the first and last tenths are calm) above hacking_kl."""
    from stages.eval import EvalArgs
    from stages.eval_ppo import training_flags, training_summary

    args = EvalArgs(hacking_length_ratio=2.0, hacking_kl=10.0)
    train = lambda r0, r1, l0, l1: {"reward_raw_first": r0, "reward_raw_last": r1,  # noqa: E731
                                    "response_length_first": l0, "response_length_last": l1}
    exactly = training_flags(train(0.0, 1.0, 10.0, 20.0), args)
    assert len(exactly) == 1 and "reward rose (0.000 -> 1.000)" in exactly[0] and "2.0x" in exactly[0]
    assert training_flags(train(0.0, 1.0, 10.0, 19.9), args) == []
    assert training_flags(train(1.0, 0.0, 10.0, 30.0), args) == []  # the reward fell: no length hacking
    assert training_flags(train(1.0, 1.0, 10.0, 30.0), args) == []  # the reward stayed level: it did not rise
    # the raw reward rises (0 -> 19) while the shaped one falls (0 -> -19), and the length grows 10 -> 29: flagged
    rows = summary_rows(20, reward_raw=lambda i: i, reward=lambda i: -i, response_length=lambda i: 10 + i)
    t = training_summary(rows)
    assert t["reward_first"] > t["reward_last"] and t["response_length_last"] >= 2 * t["response_length_first"]
    (flag,) = training_flags(t, args)
    assert "reward rose (0.500 -> 18.500)" in flag
    # KL 0 except 50 nats at update 9: the first and last tenths are 0, the maximum flags
    t = training_summary(summary_rows(20, kl=lambda i: 50.0 if i == 9 else 0.0))
    assert (t["kl_first"], t["kl_last"], t["kl_max"]) == (0.0, 0.0, 50.0)
    assert training_flags(t, args) == ["training: KL to the reference reached 50.00 nats (threshold 10.0): the "
                                       "policy drifted far from SFT; read the samples before trusting the reward"]
    assert training_flags(training_summary(summary_rows(20, kl=lambda i: 10.0)), args) == []  # at the threshold


def test_missing_ppo_stage_is_one_clear_error(tmp_path, tiny_models):
    from stages.eval import main, parse_args

    with pytest.raises(ConfigError, match="make ppo"):
        main(*parse_args(["--config", "configs/eval.yaml", "--run", "none", "--runs_dir", str(tmp_path),
                          "--model_config", str(tiny_models["llama"])]))


def test_eval_on_a_bf16_base_on_the_accelerator(tmp_path, tiny_models_bf16, monkeypatch):
    """A bf16 profile: the three adapters sit on a bf16 base (their LoRA weights and score heads float32), every
    figure is finite, and the stack is moved to this process's accelerator (PartialState().device)."""
    import math

    from accelerate import PartialState

    import stages.eval as ev

    moved = []
    real = ev.to_device
    monkeypatch.setattr(ev, "to_device", lambda model, device=None: moved.append(model) or real(model, device))
    runs = build_upstream(tmp_path / "runs", tiny_models_bf16["llama"])
    m = ev.main(*ev.parse_args(["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs),
                                "--model_config", str(tiny_models_bf16["llama"]), "--max_new_tokens", "8"]))
    (model,) = moved
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n and ".score." not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if ".score." in n} == {torch.float32}  # the stack's head slot
    assert on_device({p.device for p in model.parameters()}, PartialState().device)
    for key in ("reward_sft_mean", "reward_ppo_mean", "kl_mean", "win_rate", "length_ppo_mean"):
        assert math.isfinite(m[key]), (key, m)
    report = json.loads((runs / "t" / "eval" / "report.json").read_text())
    assert all(math.isfinite(s["reward_sft"]) and math.isfinite(s["reward_ppo"]) and math.isfinite(s["kl"]) for s in report["samples"])


# ------------------------------------------------------------------------------------------------ gold judge

def test_gold_figures_are_the_judges_scores_of_the_samples(eval_dir):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    report = json.loads((eval_dir / "report.json").read_text())
    s, f = report["samples"], report["figures"]
    assert f["gold_judge"] == "sentiment"  # configs/eval.yaml
    for x in s:
        assert x["gold_sft"] == vader.polarity_scores(x["sft"])["compound"]
        assert x["gold_ppo"] == vader.polarity_scores(x["ppo"])["compound"]
    assert f["gold_sft_mean"] == pytest.approx(statistics.fmean(x["gold_sft"] for x in s))
    assert f["gold_ppo_mean"] == pytest.approx(statistics.fmean(x["gold_ppo"] for x in s))
    wins = sum(x["gold_ppo"] > x["gold_sft"] for x in s)
    ties = sum(x["gold_ppo"] == x["gold_sft"] for x in s)
    assert f["gold_win_rate"] == pytest.approx((wins + 0.5 * ties) / len(s))
    assert f["gold_win_rate_ci_low"] <= f["gold_win_rate"] <= f["gold_win_rate_ci_high"]
    md = (eval_dir / "report.md").read_text()
    assert "Gold win rate of PPO over SFT" in md and "| gold SFT | gold PPO |" in md
    assert f"| {s[0]['gold_sft']:.3f} | {s[0]['gold_ppo']:.3f} |" in md
    curve = report["gold"]["curve"]  # no kept policies: SFT and the final policy
    assert [p["policy"] for p in curve] == ["sft", "ppo (final)"] and curve[0]["sqrt_kl"] == 0.0
    assert curve[1]["sqrt_kl"] == pytest.approx(f["kl_mean"] ** 0.5)
    assert json.loads((eval_dir / "manifest.json").read_text())["metrics"]["gold_win_rate"] == f["gold_win_rate"]


def point(update, proxy, gold):
    return {"update": update, "policy": f"u{update}", "sqrt_kl": update / 10, "proxy": proxy, "gold": gold,
            "proxy_mean": statistics.fmean(proxy), "gold_mean": statistics.fmean(gold)}


def test_proxy_rising_while_gold_falls_is_flagged():
    from stages.eval_compare import overoptimisation_flag

    rising = [point(0, [0.0, 0.1, 0.2, 0.1], [0.1, 0.0, 0.2, 0.1]), point(8, [0.5, 0.6, 0.4, 0.5], [0.5, 0.6, 0.4, 0.6]),
              point(16, [1.0, 1.2, 0.9, 1.1], [0.1, 0.2, 0.0, 0.2])]  # proxy keeps rising; gold peaks at 8, then falls
    flag = overoptimisation_flag(rising)
    assert flag and "update 8" in flag and "update 16" in flag and "reward hacking" in flag
    assert overoptimisation_flag(list(reversed(rising))) == flag  # by update, not by list order
    both_up = [rising[0], rising[1], point(16, [1.0, 1.2, 0.9, 1.1], [0.6, 0.7, 0.5, 0.7])]
    assert overoptimisation_flag(both_up) is None  # gold still rising: learning, not hacking
    both_down = [rising[0], rising[1], point(16, [0.3, 0.2, 0.3, 0.2], [0.1, 0.2, 0.0, 0.2])]
    assert overoptimisation_flag(both_down) is None  # the proxy fell too: the policy just got worse
    noisy = [rising[0], point(8, [0.5] * 4, [0.5, -0.5, 0.5, -0.4]), point(16, [1.0] * 4, [0.45, -0.5, 0.5, -0.45])]
    assert overoptimisation_flag(noisy) is None  # a gold drop of 0.1 from update 0 against a standard error of 0.23


def test_gold_agreement_by_hand():
    from stages.eval_ppo import gold_agreement

    g = gold_agreement([1.0, 0.0, 2.0, 0.5, 3.0], [0.0, 1.0, 2.0, 0.5, 1.0], [0.9, 0.1, 0.3, 0.2, 0.0], [0.1, 0.2, 0.1, 0.2, 0.4])
    # pair 4 has equal gold scores: left out; agree, agree, proxy tie (half), disagree -> 2.5 / 4
    assert g["pairs"] == 4 and g["agreement"] == pytest.approx(2.5 / 4) and g["ci_low"] < 0.625 < g["ci_high"]
    from pipeline.stats import wilson

    assert (g["ci_low"], g["ci_high"]) == wilson(2.5, 4)  # the interval of the 4 pairs counted, not of all 5
    # the same reply on both sides (pair 1) has no order, whatever its two scores: left out too -> 1.5 / 3
    same = gold_agreement([1.0, 0.0, 2.0, 0.5, 3.0], [0.0, 1.0, 2.0, 0.5, 1.0], [0.9, 0.1, 0.3, 0.2, 0.0],
                          [0.1, 0.2, 0.1, 0.2, 0.4], [True, False, False, False, False])
    assert same["pairs"] == 3 and same["agreement"] == pytest.approx(1.5 / 3)


def test_the_policy_samples_agreement_leaves_out_prompts_where_both_policies_wrote_the_same_reply():
    """An `rm:` judge scores one reply twice with ~1e-7 between the scores (a batch's padding): that is no ordering
    for the reward model to agree with. Two prompts, the first answered alike by SFT and PPO."""
    from types import SimpleNamespace

    from stages.eval_ppo import gold_report

    ro_sft = {"texts": ["same", "sft"], "rewards": [0.0, 0.0]}
    ro_ppo = {"texts": ["same", "ppo"], "rewards": [1.0, 1.0]}  # the proxy prefers PPO on both
    judge = SimpleNamespace(spec="test")
    gold = gold_report(judge, [], SimpleNamespace(gold_batch_size=8, samples_per_prompt=1), ([], [], []), [], 4, ro_sft, ro_ppo, [0.0, 0.0],
                       [0.0 + 1e-7, 0.0], [0.0, 1.0])
    assert gold["rm_agreement_policy_samples"]["pairs"] == 1 and gold["rm_agreement_policy_samples"]["agreement"] == 1.0
    assert gold["win_rate"]["ties"] == 1


def add_kept_policies_and_rm_pairs(t: Path) -> list[dict]:
    """PPO kept policies update-4 (= SFT), 8 (= final), 11 (the final update) and 4 RM held-out pairs, in run `t`."""
    import shutil

    for update, src in ((4, t / "sft" / "adapter"), (8, t / "ppo" / "adapter"), (11, t / "sft" / "adapter")):
        shutil.copytree(src, t / "ppo" / "policies" / f"update-{update}")  # 11 = the final update: not measured twice
    held = [{"prompt": [{"role": "user", "content": f"Tell me story {i}."}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for i, (c, r) in enumerate([("A happy, lovely day.", "A sad, awful day."), ("The door.", "The wall."),
                                        ("He died.", "She laughed with joy."), ("Good and kind.", "Cruel and bad.")])]
    (t / "rm" / "eval_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    manifest = json.loads((t / "rm" / "manifest.json").read_text())
    manifest["outputs"]["eval_pairs"] = str(t / "rm" / "eval_pairs.jsonl")
    (t / "rm" / "manifest.json").write_text(json.dumps(manifest))
    return held


def test_checkpoint_curve_and_rm_agreement_on_a_run_with_kept_policies(tmp_path, tiny_models):
    """policies/update-4 is the SFT adapter and update-8 the final one: their points must equal the two ends. The
    RM's held-out pairs are scored by the gold judge; agreement is recomputed with the RM loaded as a judge."""
    from pipeline.judges import judge_scores, load_judge
    from stages.eval_ppo import gold_agreement
    from stages.eval import main, parse_args

    runs = build_upstream(tmp_path / "runs", tiny_models["llama"])
    t = runs / "t"
    held = add_kept_policies_and_rm_pairs(t)
    m = main(*parse_args(["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs),
                          "--model_config", str(tiny_models["llama"]), "--max_new_tokens", "8"]))
    report = json.loads((t / "eval" / "report.json").read_text())
    curve = report["gold"]["curve"]
    assert [p["update"] for p in curve] == [0, 4, 8, 11] and m["gold_curve_points"] == 4
    sft, four, eight, final = curve
    assert four["gold"] == sft["gold"] and four["proxy"] == pytest.approx(sft["proxy"], abs=1e-5)
    # the same adapters through the same forwards: seen equal (sqrt_kl 0.0; KL 1e-10 would give 1e-5)
    assert four["sqrt_kl"] == pytest.approx(0.0, abs=1e-5)
    assert eight["gold"] == final["gold"] and eight["kl_mean"] == pytest.approx(final["kl_mean"], rel=1e-6)
    assert (t / "eval" / "plots" / "overoptimisation.png").read_bytes()[:8] == PNG_MAGIC
    assert "| 4 | update-4 |" in (t / "eval" / "report.md").read_text()

    rm_judge = load_judge(f"rm:{t / 'rm' / 'adapter'}")  # stock peft: another path to the same scores
    prompts = [r["prompt"] for r in held]
    rm_c = judge_scores(rm_judge, prompts, [r["chosen"][0]["content"] for r in held])
    rm_r = judge_scores(rm_judge, prompts, [r["rejected"][0]["content"] for r in held])
    gold = load_judge("sentiment")
    g_c = judge_scores(gold, prompts, [r["chosen"][0]["content"] for r in held])
    g_r = judge_scores(gold, prompts, [r["rejected"][0]["content"] for r in held])
    want = gold_agreement(rm_c, rm_r, g_c, g_r)
    assert want["pairs"] == 3  # "The door." vs "The wall.": both 0 under VADER, left out
    assert m["rm_gold_pairs"] == 3 and m["rm_gold_agreement"] == want["agreement"]


def test_eval_samples_and_scores_under_the_launch_mixed_precision(tmp_path, tiny_models, monkeypatch):
    """The accelerate config's `mixed_precision: bf16` (configs/accelerate/multi_gpu.yaml), which the Trainer stages
    get from accelerate: every model pass of eval (sampling, KL, the reward model's held-out pairs, kept policies)
    runs under bf16 autocast."""
    from accelerate import PartialState

    import stages.eval as ev

    device = PartialState().device.type  # where eval puts the models: the accelerator's, on a GPU machine
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    runs = build_upstream(tmp_path / "runs", tiny_models["llama"])
    add_kept_policies_and_rm_pairs(runs / "t")
    seen = {}

    def spied(name):
        real = getattr(ev, name)

        def spy(*a, **k):
            on = torch.is_autocast_enabled(device)
            seen.setdefault(name, set()).add(torch.get_autocast_dtype(device) if on else None)
            return real(*a, **k)
        monkeypatch.setattr(ev, name, spy)

    for name in ("rollout", "sequence_kl", "heldout_pair_rewards", "kept_policy_samples"):
        spied(name)
    moved, real_to_device = [], ev.to_device
    monkeypatch.setattr(ev, "to_device", lambda model, device=None: moved.append(model) or real_to_device(model, device))
    m = ev.main(*ev.parse_args(["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs),
                                "--model_config", str(tiny_models["llama"]), "--max_new_tokens", "8"]))
    assert seen == {name: {torch.bfloat16} for name in ("rollout", "sequence_kl", "heldout_pair_rewards",
                                                        "kept_policy_samples")}
    # the reward models' score head computes in fp32 under it, as the rm stage and PPO score (it rounded to bf16)
    score = next(mod for name, mod in moved[0].named_modules() if name.endswith(".score"))
    with torch.autocast(device, dtype=torch.bfloat16):
        assert score(torch.randn(2, score.in_features if hasattr(score, "in_features") else
                                 next(score.parameters()).shape[-1])).dtype == torch.float32
    assert m["gold_curve_points"] == 4 and m["rm_gold_pairs"] == 3


def test_an_interrupted_eval_keeps_its_sampled_batches_and_ends_as_an_uninterrupted_one(tmp_path, tiny_models,
                                                                                         monkeypatch, capsys):
    """resume == no resume: `make eval` on a run with kept policies (SFT, PPO, then PPO's updates 4 and 8: 3 batches
    each) killed after 5 batches, run again with the same command, samples the other 7 only and writes the
    uninterrupted run's samples and figures; its kept batches are gone once the report is written."""
    import stages.resume as resume
    from stages.eval import main, parse_args
    from tests.killed_stage import dying_put

    put, sampled = resume.SampledBatches.put, []

    def run(runs, kill_after=None):
        sampled.clear()
        monkeypatch.setattr(resume.SampledBatches, "put",
                            dying_put(put, kill_after, sampled, lambda store, batch: (store.folder.name, batch)))
        main(*parse_args(["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs),
                          "--model_config", str(tiny_models["llama"]), "--max_new_tokens", "8",
                          "--generation_batch_size", "2", "--samples_per_prompt", "1"]))
        return json.loads((runs / "t" / "eval" / "manifest.json").read_text())["metrics"]

    runs = {}
    for name in ("whole", "cut"):
        runs[name] = build_upstream(tmp_path / name, tiny_models["llama"])
        add_kept_policies_and_rm_pairs(runs[name] / "t")
    whole = run(runs["whole"])
    order = ["sft", "ppo", "ppo-update-4", "ppo-update-8"]
    assert sampled == [(p, b) for p in order for b in range(3)] and whole["batches_kept_from_an_interrupted_run"] == 0
    with pytest.raises(RuntimeError, match="killed after 5 batches"):
        run(runs["cut"], kill_after=5)
    capsys.readouterr()
    cut = run(runs["cut"])
    printed = capsys.readouterr()
    assert "note: 2 batches sampled by an interrupted run of the same command are kept" in printed.err
    shown = [line.split()[0] for line in printed.out.split("== eval ==")[1].splitlines() if line.startswith("  ")]
    assert shown[0] == "gold_judge" and shown == sorted(shown, key=lambda k: not k.startswith("gold"))  # gold first
    assert sampled == [("ppo", 2)] + [(p, b) for p in order[2:] for b in range(3)]
    assert cut["batches_kept_from_an_interrupted_run"] == 5
    report = {n: json.loads((runs[n] / "t" / "eval" / "report.json").read_text()) for n in runs}
    assert report["cut"]["samples"] == report["whole"]["samples"] and report["cut"]["gold"] == report["whole"]["gold"]
    assert {k: v for k, v in cut.items() if k != "batches_kept_from_an_interrupted_run"} == \
        {k: v for k, v in whole.items() if k != "batches_kept_from_an_interrupted_run"}
    assert not (runs["cut"] / "t" / "eval" / "sampled").exists()


def test_bad_gold_judge_is_one_error_before_anything_is_written(tmp_path, tiny_models):
    from stages.eval import main, parse_args

    runs = build_upstream(tmp_path / "runs", tiny_models["llama"], reward_members=2)
    base = ["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs), "--model_config", str(tiny_models["llama"])]
    for judge, message in ((f"rm:{runs / 't' / 'rm' / 'adapter'}", "reward model this run's PPO optimised"),
                           (f"rm:{runs / 't' / 'rm' / 'member-1' / 'adapter'}", "reward model this run's PPO optimised"),
                           ("tests.judge_fixtures:raising_judge", "the grader is on holiday"),
                           ("tests.judge_fixtures:short_judge", "returned 1 scores for a batch of 2"),
                           ("vibes", "unknown judge")):
        with pytest.raises(ConfigError, match=message):
            main(*parse_args(base + ["--gold_judge", judge]))
        assert not (runs / "t" / "eval").exists()


def test_held_out_pair_rewards_score_each_distinct_reply_once(tmp_path, monkeypatch):
    """RM-gold's held-out scores: each pair's chosen and rejected score as before, each distinct (prompt, reply) scored
    once (K responses a prompt sit in K-1 pairs each)."""
    import stages.eval as ev

    calls = []

    def fake_scores(stack, tokenizer, prompts, texts, batch):
        calls.append(list(zip([json.dumps(p) for p in prompts], texts)))
        return [len(p[0]["content"]) + 10.0 * len(t) for p, t in zip(prompts, texts)]

    monkeypatch.setattr(ev, "reward_scores", fake_scores)
    rows = [("A", "xx", "y"), ("A", "zzz", "xx"), ("B", "xx", "y"), ("A", "y", "zzz")]
    pairs = tmp_path / "eval_pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}], "chosen": c, "rejected": r}) + "\n"
                             for p, c, r in rows))
    held, chosen, rejected = ev.heldout_pair_rewards(None, None, {"outputs": {"eval_pairs": str(pairs)}}, 8)
    assert [r["chosen"] for r in held] == ["xx", "zzz", "xx", "y"]
    assert chosen == [21.0, 31.0, 21.0, 11.0] and rejected == [11.0, 21.0, 11.0, 31.0]
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0])) == 5  # A: xx, zzz, y; B: xx, y


def test_the_reward_models_held_out_pairs_are_scored_on_the_tokens_it_kept(tiny_models, tmp_path):
    """The RM-vs-gold agreement templated each held-out pair again from its text: a pair the rm stage cut to its
    max_length was scored on tokens the reward model never trained on, and on GPT-2 a reply past the base's 512
    positions crashed eval (IndexError in the position embedding). The pairs' kept token ids (eval_pairs.jsonl) are
    scored as they are, each reply from its reply_start. Mutant: the text templated again."""
    import yaml

    import stages.eval as ev
    from pipeline.adapters import AdapterStack
    from pipeline.generation import chat_reward_inputs, right_pad
    from pipeline.models import load_tokenizer, profile_from
    from tests.fake_upstream import _lora_adapter

    spec = yaml.safe_load(tiny_models["gpt2"].read_text())
    rm_dir = _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], tmp_path / "rm" / "adapter", seed=2,
                           task_type="SEQ_CLS")
    profile = profile_from(str(tiny_models["gpt2"]))
    tokenizer = load_tokenizer(profile)
    stack = AdapterStack.build(profile, tokenizer, {"reward": rm_dir})
    stack.pooling["reward"] = "sum"  # the reply's tokens from reply_start: where the kept ids say it starts
    prompt = [{"role": "user", "content": "Tell me a story."}]
    long_text = "The rabbit ran far away into the green wood. " * 80  # about 800 tokens: past GPT-2's 512
    ids, mask, starts = chat_reward_inputs(tokenizer, [prompt, prompt], [long_text, "A happy day."])
    assert mask[0].sum() > 512
    chosen = ids[0][:40].tolist() + ids[0][mask[0].bool()][-8:].tolist()  # cut in the middle, as truncate_pair cuts
    rejected = ids[1][mask[1].bool()].tolist()
    start = int(starts[1])
    pairs = tmp_path / "rm" / "eval_pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": long_text}],
                                 "rejected": [{"role": "assistant", "content": "A happy day."}], "chosen_ids": chosen,
                                 "rejected_ids": rejected, "reply_start": start}) + "\n")
    held, got_chosen, got_rejected = ev.heldout_pair_rewards(stack, tokenizer, {"outputs": {"eval_pairs": str(pairs)}},
                                                             batch=2)
    want_ids, want_mask = right_pad([chosen, rejected], tokenizer.pad_token_id)
    want = stack.scores("reward", want_ids, want_mask, torch.tensor([start, start])).tolist()
    assert [got_chosen[0], got_rejected[0]] == pytest.approx(want, abs=1e-6)
    assert held[0]["chosen"] == long_text  # the gold judge still reads the whole reply


def test_report_md_states_the_intervals_report_json_holds(eval_dir):
    """Each win rate's line in report.md shows its own Wilson interval, low end first: the interval of (wins + ties/2)
    of n, from report.json's counts."""
    from pipeline.stats import wilson
    from stages.eval_ppo import counts_text

    report = json.loads((eval_dir / "report.json").read_text())
    md = (eval_dir / "report.md").read_text()
    n = report["figures"]["n_prompts"]
    for label, w in (("Win rate of PPO over SFT under the reward model", report["win_rate"]),
                     ("Gold win rate of PPO over SFT", report["gold"]["win_rate"])):
        low, high = wilson(w["wins"] + 0.5 * w["ties"], n)
        assert (w["ci_low"], w["ci_high"]) == (low, high) and low < w["rate"] < high
        assert f"**{label}: {w['rate']:.1%}** (95% CI {low:.1%} – {high:.1%}, Wilson; {counts_text(w)})" in md
    # the gold first, its judge's scale said; the reward model's own verdict after it, called the proxy
    assert md.index("**Gold win rate") < md.index("**Win rate of PPO over SFT under the reward model")
    assert "Judge `sentiment` (VADER's compound sentiment of the reply, from -1, negative, to 1, positive)" in md
    assert "the proxy PPO was trained to raise" in md


def test_console_tables_show_numbers_to_five_significant_digits(capsys):
    """A stage's console table: 0.7873908519744873 read as noise; floats to 5 significant digits (the manifest keeps
    them whole), a large one in exponent form rather than a made-up exact 12346000.0; other values as they are."""
    from pipeline.report import print_table

    print_table("x", {"accuracy": 0.7873908519744873, "tokens_per_s": 2759.31, "lr": 1e-05, "big": 12345678.9,
                      "steps": 100, "judge": "sentiment", "mean": round(-0.00001, 4)})
    assert capsys.readouterr().out.splitlines()[2:] == [
        "  accuracy      0.78739", "  tokens_per_s  2759.3", "  lr            1e-05", "  big           1.2346e+07",
        "  steps         100", "  judge         sentiment", "  mean          0"]


def test_peak_memory_on_a_gpu_is_torchs_peak_allocation_in_mb_and_on_cpu_rounded_to_a_tenth(monkeypatch):
    """On the stage's GPU the figure is torch's peak allocated bytes there / 2**20; on the CPU, on Linux ru_maxrss (kB)
    / 1024, to one decimal, even on a machine with a GPU (a CPU stage there recorded the GPU's 0)."""
    import resource
    from types import SimpleNamespace

    from pipeline.report import peak_memory_mb

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: {"cuda:1": 3 * 2**20 + 2**19}[str(device)])
    assert peak_memory_mb(torch.device("cuda", 1)) == 3.5
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=1024 * 250 + 300))
    monkeypatch.setattr("sys.platform", "linux")
    assert peak_memory_mb(torch.device("cpu")) == 250.3  # 250.29 MB, to one decimal


def test_the_end_of_a_stage_waits_for_every_rank_and_tears_the_group_down_after_freeing_its_holders(monkeypatch):
    """finish_distributed: a barrier when a process group is up, nothing without one; destroy_distributed collects
    garbage (a DDP reducer holding the group) before the barrier and the teardown, and in a process that never
    imported torch it imports nothing."""
    import gc
    import subprocess
    import sys

    import torch.distributed as dist

    from pipeline.report import destroy_distributed, finish_distributed
    from tests.conftest import REPO

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("gc"))
    finish_distributed()
    assert calls == ["barrier"]
    calls.clear()
    destroy_distributed()
    assert calls == ["gc", "barrier", "destroy"]
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    calls.clear()
    finish_distributed()
    destroy_distributed()
    assert calls == ["gc"]
    code = ("import sys; from pipeline.report import destroy_distributed; destroy_distributed(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_a_win_rates_counts_read_as_words():
    from stages.eval_ppo import counts_text

    assert counts_text({"wins": 81, "ties": 0, "losses": 1}) == "81 wins, 1 loss"
    assert counts_text({"wins": 1, "ties": 1, "losses": 2}) == "1 win, 2 losses, 1 tie counted half"
    assert counts_text({"wins": 72, "ties": 3, "losses": 0}) == "72 wins, 0 losses, 3 ties counted half"
    assert counts_text({"wins": 300, "ties": 4, "losses": 24, "n": 82, "pairs": 328}) == \
        "over 82 prompts; of their 328 pairs 300 wins, 24 losses, 4 ties counted half"
    assert counts_text({"wins": 81, "ties": 0, "losses": 1, "n": 82, "pairs": 82}) == "81 wins, 1 loss"


def test_report_samples_sets_the_table_rows_and_report_json_keeps_all(eval_dir):
    from stages.eval import render_markdown

    report = json.loads((eval_dir / "report.json").read_text())
    samples = report["samples"]
    for n_rows in (2, 8):
        table = render_markdown(report, n_rows).split("## Samples")[1]
        rows = [x for x in table.splitlines() if x.startswith("| ") and not x.startswith("| prompt |")]
        assert len(rows) == min(n_rows, len(samples)) == len(samples[:n_rows])
        assert all(f"| {s['reward_sft']:.3f} | {s['reward_ppo']:.3f} |" in row for s, row in zip(samples, rows))
        assert f"All {len(samples)} samples are in report.json." in table


def test_a_greedy_report_says_what_its_kl_is(eval_dir):
    """Under temperature 0 the KL is that of the temperature-1 distributions along the greedy replies (greedy
    sampling has no distribution): the report says so, and only then."""
    from stages.eval import GREEDY_KL_NOTE, render_markdown

    report = json.loads((eval_dir / "report.json").read_text())
    assert report["sampling"]["temperature"] > 0 and GREEDY_KL_NOTE not in render_markdown(report, 2)
    greedy = {**report, "sampling": {**report["sampling"], "temperature": 0.0}}
    assert render_markdown(greedy, 2).count(GREEDY_KL_NOTE) == 1


@pytest.mark.parametrize("top_p, top_k, noted", [(1.0, 0, False), (0.9, 0, True), (1.0, 1, True)])
def test_a_truncated_sampling_report_says_what_its_kl_is(eval_dir, top_p, top_k, noted):
    """With top_p < 1 or top_k > 0 the replies come from the truncated distributions, the KL from the whole ones
    (top_k 1 at a low temperature read 18,420 nats and raised the KL flag): the report says so, and only then."""
    from stages.eval import TRUNCATED_KL_NOTE, render_markdown

    report = json.loads((eval_dir / "report.json").read_text())
    report = {**report, "sampling": {**report["sampling"], "top_p": top_p, "top_k": top_k}}
    note = TRUNCATED_KL_NOTE.format(top_p=top_p, top_k=top_k)
    assert render_markdown(report, 2).count(note) == int(noted)


def test_max_prompts_takes_the_first_prompts_of_the_held_out_file(tmp_path):
    from stages.eval import load_prompts

    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Opening {i}."}) + "\n" for i in range(5)))
    assert [p[0]["content"] for p in load_prompts(path, 2)] == ["Opening 0.", "Opening 1."]
    assert len(load_prompts(path, 0)) == 5 and len(load_prompts(path, 9)) == 5
    path.write_text("\n")  # an RL stage that set no prompt aside: refused, naming the fix
    with pytest.raises(ConfigError, match="holds no prompts: its RL stage set none aside"):
        load_prompts(path, 0)


def test_label_store_flag_reads_the_human_labels_from_that_store(tmp_path):
    """--label_store points eval at another store (a team's shared one): its labels, not the run's, give the rate."""
    from types import SimpleNamespace

    from stages.eval import EvalArgs
    from stages.eval_ppo import sft_vs_ppo
    from stages.label.store import LabelStore

    ended = [True] * 4
    samples = ppo_section(tmp_path, ended, ended)["samples"]
    for path, choice in ((tmp_path / "label" / "labels.sqlite", "right"), (tmp_path / "team.sqlite", "left")):
        store = LabelStore(path)  # the run's store says SFT on every pair, the team's store PPO
        store.import_items([{"pair_id": s["pair_id"], "prompt": s["prompt"], "responses": [s["sft"], s["ppo"]]}
                            for s in samples])
        for s in samples:
            store.save_label("ann", s["pair_id"], choice, 1)  # PPO shown left
    assert ppo_section(tmp_path, ended, ended)["human"]["rate"] == 0.0
    ro = {"texts": [s["sft"] for s in samples], "rewards": [0.0] * 4, "lengths": [5] * 4, "ended": ended}
    ro_ppo = {**ro, "texts": [s["ppo"] for s in samples]}
    out = sft_vs_ppo(SimpleNamespace(spec="made-up gold"), [s["prompt"] for s in samples],
                     EvalArgs(label_store=str(tmp_path / "team.sqlite")),
                     {"outputs": {"metrics_jsonl": str(tmp_path / "metrics.jsonl")}}, tmp_path / "ppo", ro, ro_ppo,
                     [1.0] * 4, None, ([], [], []), [])
    assert out["human"]["rate"] == 1.0 and out["human"]["labels"] == 4


def test_human_win_rate_interval_is_of_wins_and_half_the_ties(tmp_path):
    """People's win rate and its Wilson interval count a tie (or 'both bad') half, as the rate does: PPO preferred on
    one pair, a tie and 'both bad' on two, SFT on one -> (1 + 2/2) / 4 = 0.5, interval wilson(2, 4)."""
    from pipeline.stats import wilson

    h = ppo_section_labelled(tmp_path, [("left", 1), ("tie", 1), ("both_bad", 0), ("left", 0)])["human"]
    assert (h["wins"], h["ties_or_both_bad"], h["labels"], h["rate"]) == (1, 2, 4, 0.5)
    assert (h["ci_low"], h["ci_high"]) == wilson(2, 4) and h["ci_low"] < 0.5 < h["ci_high"]


def test_human_win_rate_counts_each_pair_once_however_many_people_labeled_it(tmp_path):
    """Three people on pair 0 (PPO, PPO, SFT: 2/3), one on pair 1 (PPO: 1), one tie on pair 2 (1/2), nobody on pair 3:
    the rate is the pairs' mean (2/3 + 1 + 1/2) / 3, not the labels' (3.5 / 5), and the interval is of 3 trials."""
    from pipeline.stats import wilson
    from stages.label.store import LabelStore

    ended = [True] * 4
    samples = ppo_section(tmp_path, ended, ended)["samples"]
    store = LabelStore(tmp_path / "label" / "labels.sqlite")
    store.import_items([{"pair_id": s["pair_id"], "prompt": s["prompt"], "responses": [s["sft"], s["ppo"]]}
                        for s in samples])
    ids = [s["pair_id"] for s in samples]
    for who, pid, choice, shown_left in (("ann", ids[0], "left", 1), ("bo", ids[0], "right", 0),
                                         ("cy", ids[0], "right", 1), ("ann", ids[1], "left", 1),
                                         ("bo", ids[2], "tie", 0)):
        store.save_label(who, pid, choice, shown_left)
    from stages.eval_ppo import ppo_markdown

    out = ppo_section(tmp_path, ended, ended)
    h = out["human"]
    won = 2 / 3 + 1 + 1 / 2
    assert f"**Win rate judged by people: {won / 3:.1%}** (95% CI {wilson(won, 3)[0]:.1%} – {wilson(won, 3)[1]:.1%}; " \
           "3 pairs, each counted once: the mean of its labels, 5 in all)." in ppo_markdown({**out, "run": "t"}, 8)
    assert (h["labels"], h["pairs"], h["wins"], h["ties_or_both_bad"]) == (5, 3, 3, 1)
    assert h["rate"] == pytest.approx(won / 3)
    assert (h["ci_low"], h["ci_high"]) == pytest.approx(wilson(won, 3))


def test_the_ppo_sections_tables_by_hand(tmp_path):
    """report.md's PPO section from ppo_section's four made-up prompts (KL 4 nats each): every SFT column holds
    SFT's figure and every PPO column PPO's; the gold curve's x is sqrt(KL) (2, not 4); each sample row shows its
    rewards then its gold scores, SFT first."""
    from stages.eval_ppo import ppo_markdown

    ended = [True] * 4
    out = ppo_section(tmp_path, ended, [True, False, True, True], gold={"sft": [0.0, 0.0, 0.0, 0.3],
                                                                         "ppo": [0.5, 0.5, -0.5, 0.3]}, kl=[4.0] * 4)
    lines = ppo_markdown({**out, "run": "t"}, 8)
    # rewards SFT 0, 0, 0, 1 (mean 0.25, pstdev 0.433, median 0); PPO 1, 2, 3, 0 (mean 1.5, pstdev 1.118, median 1.5)
    for row in ("| reward (mean ± std) | 0.250 ± 0.433 | 1.500 ± 1.118 |", "| reward (median) | 0.000 | 1.500 |",
                "| response length (tokens, mean) | 6.5 | 10.5 |", "| share without EOS | 0.0% | 25.0% |",
                "| KL to the SFT reference (nats/response) | 0.000 | 4.000 |", "| gold score (mean) | 0.075 | 0.200 |",
                "| 0 | sft | 0.000 | 0.250 | 0.075 |", "| 11 | ppo (final) | 2.000 | 1.500 | 0.200 |"):
        assert row in lines, row
    rows = [x for x in lines if x.startswith("| Question ")]
    assert [x.split(" | ", 3)[3] for x in rows] == ["0.000 | 1.000 | 0.000 | 0.500 |", "0.000 | 2.000 | 0.000 | 0.500 |",
                                                    "0.000 | 3.000 | 0.000 | -0.500 |", "1.000 | 0.000 | 0.300 | 0.300 |"]


def test_kept_policies_are_ordered_by_update_number(tmp_path):
    """policies/update-N/ folders are read in the order of N as a number (update-10 after update-9, not before it as
    its name sorts); a folder without adapter_config.json (half written) or whose tail is not a number is no policy."""
    from stages.eval import policy_checkpoints

    for name, config in (("update-10", True), ("update-9", True), ("update-2", True), ("update-3", False),
                         ("update-x", True), ("update-100", True)):
        (tmp_path / "policies" / name).mkdir(parents=True)
        if config:
            (tmp_path / "policies" / name / "adapter_config.json").write_text("{}")
    assert policy_checkpoints(tmp_path) == [(u, tmp_path / "policies" / f"update-{u}") for u in (2, 9, 10, 100)]


def drawn(monkeypatch) -> list[tuple]:
    """Every line and histogram matplotlib draws from here on: (axes, kind, x, y or None, label)."""
    from matplotlib.axes import Axes

    calls = []
    real_plot, real_hist = Axes.plot, Axes.hist

    def plot(self, x, y, *args, **kw):
        calls.append((self, "plot", [float(v) for v in x], [float(v) for v in y], kw.get("label")))
        return real_plot(self, x, y, *args, **kw)

    def hist(self, x, *args, **kw):
        calls.append((self, "hist", [float(v) for v in x], None, kw.get("label")))
        return real_hist(self, x, *args, **kw)

    monkeypatch.setattr(Axes, "plot", plot)
    monkeypatch.setattr(Axes, "hist", hist)
    return calls


def test_the_plots_draw_each_series_from_its_own_figures(tmp_path, monkeypatch):
    """The training curves against the logged update (not the row's index: a resumed run starts at update 5), the
    histograms with SFT's values under SFT's label and PPO's under PPO's, and the over-optimisation plot with the gold
    on the gold axis and the proxy on the proxy axis, both against sqrt(KL)."""
    import math

    from stages.eval_plots import plot_overoptimisation, save_plots

    calls = drawn(monkeypatch)
    rows = [{"update": u, "reward_raw": 0.1 * u, "kl": 0.01 * u, "entropy": 3.0 - 0.1 * u, "response_length": 10.0 + u}
            for u in (5, 6, 7)]
    sft = {"rewards": [0.0, 1.0, 2.0], "lengths": [3, 4, 5]}
    ppo = {"rewards": [5.0, 6.0, 7.0], "lengths": [8, 9, 10]}
    save_plots(rows, sft, ppo, tmp_path / "plots")
    lines = {(ax.get_title(), label): (x, y) for ax, kind, x, y, label in calls if kind == "plot"}
    assert lines[("reward (per response, batch mean)", "reward model's score")] == ([5.0, 6.0, 7.0], pytest.approx([0.5, 0.6, 0.7]))
    assert lines[("response length (tokens)", "response_length")] == ([5.0, 6.0, 7.0], [15.0, 16.0, 17.0])
    hists = [(ax.get_xlabel(), x, label.split(" ")[0]) for ax, kind, x, _, label in calls if kind == "hist"]
    assert ("reward-model score", [0.0, 1.0, 2.0], "SFT") in hists and ("reward-model score", [5.0, 6.0, 7.0], "PPO") in hists
    assert ("tokens", [3.0, 4.0, 5.0], "SFT") in hists and ("tokens", [8.0, 9.0, 10.0], "PPO") in hists
    assert len(hists) == 6  # reward_distribution.png, and reward and length in overview.png
    # each figure's own pair, SFT first (mutant: reward_distribution.png's SFT and PPO scores swapped, overview right)
    assert hists == [("reward-model score", [0.0, 1.0, 2.0], "SFT"), ("reward-model score", [5.0, 6.0, 7.0], "PPO")] * 2 + [
        ("tokens", [3.0, 4.0, 5.0], "SFT"), ("tokens", [8.0, 9.0, 10.0], "PPO")]

    calls.clear()
    points = [{"update": u, "sqrt_kl": math.sqrt(kl), "proxy_mean": proxy, "gold_mean": gold}
              for u, kl, proxy, gold in ((0, 0.0, 0.1, 0.2), (4, 1.0, 0.5, 0.4), (8, 4.0, 0.9, 0.3))]
    plot_overoptimisation(points, tmp_path / "o.png")
    by_axis = {ax.get_ylabel(): (x, y) for ax, _, x, y, _ in calls}
    assert by_axis == {"gold score (mean)": ([0.0, 1.0, 2.0], [0.2, 0.4, 0.3]),
                       "reward-model score (mean)": ([0.0, 1.0, 2.0], [0.1, 0.5, 0.9])}


def test_the_reward_adapter_the_rl_stages_were_given_is_refused_as_gold_judge(tmp_path):
    """An RL stage trained with `reward_adapter:` optimised that model, not the rm stage's: it cannot be the gold judge
    either (refused before anything is loaded, so an empty folder stands in for it)."""
    from stages.eval import EvalArgs, load_gold_judge

    given = tmp_path / "other_rm" / "adapter"
    given.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"reward model this run's PPO optimised"):
        load_gold_judge(EvalArgs(gold_judge=f"rm:{given}"), {"outputs": {}}, [{}, {"reward_adapter": str(given)}],
                        [[{"role": "user", "content": "Hi."}]])


def test_sequence_kl_of_a_row_is_the_same_left_padded_or_alone(tmp_path, tiny_models):
    """A response's KL does not depend on the rows batched with it: a short prompt left-padded beside a long one is
    read at the positions generate() gave it (gpt2: absolute positions, so a shift would change every logit), and its
    KL equals the KL of the same row alone, unpadded."""
    from types import SimpleNamespace

    import yaml

    from pipeline.adapters import AdapterStack
    from pipeline.models import load_tokenizer, profile_from
    from stages.eval import sequence_kl
    from tests.fake_upstream import _lora_adapter

    spec = yaml.safe_load(tiny_models["gpt2"].read_text())
    adapters = {name: _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], tmp_path / name, seed=seed)
                for name, seed in (("policy", 1), ("sft", 2))}
    profile = profile_from(str(tiny_models["gpt2"]))
    tokenizer = load_tokenizer(profile)
    stack = AdapterStack.build(profile, tokenizer, adapters)
    pad = tokenizer.pad_token_id
    short, long_ = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    response = torch.tensor([[20, 21, 22, 23], [24, 25, 26, 27]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    both = SimpleNamespace(prompt_ids=torch.tensor([[pad] * 3 + short, long_]),
                           prompt_mask=torch.tensor([[0] * 3 + [1] * 3, [1] * 6]),
                           response_ids=response, response_mask=response_mask)
    alone = SimpleNamespace(prompt_ids=torch.tensor([short]), prompt_mask=torch.ones(1, 3, dtype=torch.long),
                            response_ids=response[:1], response_mask=response_mask[:1])
    padded = sequence_kl(stack, "policy", "sft", {"gens": both}, batch=2, temperature=0.7)
    (single,) = sequence_kl(stack, "policy", "sft", {"gens": alone}, batch=1, temperature=0.7)
    assert single > 1e-4 and padded[0] == pytest.approx(single, rel=1e-6, abs=1e-6)  # seen: equal


def test_sequence_kl_sums_the_exact_kl_over_the_masked_response_at_generates_positions(tmp_path, tiny_models):
    """One unpadded row: generate() read it at positions 0..T-1 (the model's own default), so its KL is the exact
    KL(policy || sft) of the temperature-0.7 distributions predicting each response token, summed over the three
    tokens its mask keeps (the fourth, after EOS, counts nothing): computed here from the two adapters' logits."""
    from types import SimpleNamespace

    import yaml

    from pipeline.adapters import AdapterStack
    from pipeline.models import load_tokenizer, profile_from
    from stages.eval import sequence_kl
    from tests.fake_upstream import _lora_adapter

    spec = yaml.safe_load(tiny_models["gpt2"].read_text())
    adapters = {name: _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], tmp_path / name, seed=seed)
                for name, seed in (("policy", 1), ("sft", 2))}
    profile = profile_from(str(tiny_models["gpt2"]))
    stack = AdapterStack.build(profile, load_tokenizer(profile), adapters)
    prompt, response = torch.tensor([[5, 6, 7]]), torch.tensor([[20, 21, 22, 23]])
    row = SimpleNamespace(prompt_ids=prompt, prompt_mask=torch.ones(1, 3, dtype=torch.long), response_ids=response,
                          response_mask=torch.tensor([[1, 1, 1, 0]]))
    (kl,) = sequence_kl(stack, "policy", "sft", {"gens": row}, batch=1, temperature=0.7)
    ids = torch.cat([prompt, response], 1)
    with torch.no_grad():  # logits at 2..5 predict the response tokens 3..6; no position_ids: the model's 0..6
        logp, logq = (torch.log_softmax(stack.logits(name, ids, torch.ones_like(ids))[0, 2:6] / 0.7, -1)
                      for name in ("policy", "sft"))
    per_token = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    assert per_token[3] > 1e-4  # the masked token's KL would show
    assert kl == pytest.approx(per_token[:3].sum().item(), rel=1e-4)


def test_a_score_or_kl_that_is_not_a_number_stops_eval():
    """A NaN reward-model score counted as a tie in every win rate (4 NaN scores: 0.5 with '4 ties counted half'), a
    NaN KL switched the KL flag off: eval refuses them, naming what and which response."""
    from stages.eval import finite

    assert finite([0.5, -2.0], "x") == [0.5, -2.0]
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ConfigError, match=rf"the KL of ppo to sft on response 1 is {bad}: the adapters that "
                                              r"computed it are broken"):
            finite([0.1, bad, 0.2], "the KL of ppo to sft on response")


def test_each_score_and_kl_eval_computes_is_checked_for_a_number(monkeypatch, tmp_path):
    """The three places eval computes numbers each refuse a NaN: the reward model's score of a sampled response, of a
    held-out pair's reply, and a response's KL. A stand-in adapter stack whose every output is NaN."""
    from types import SimpleNamespace

    import stages.eval as E

    nan = float("nan")

    class NaNStack:
        model = torch.nn.Linear(1, 1)

        def use(self, name):
            pass

        def scores(self, name, ids, mask, starts):
            return torch.full((len(ids),), nan)

        def logits(self, name, ids, mask, position_ids=None):
            return torch.full((*ids.shape, 5), nan)

    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    gens = SimpleNamespace(texts=["a", "b"], prompt_ids=ids, prompt_mask=mask, response_ids=ids, response_mask=mask,
                           ended=torch.ones(2, dtype=torch.bool))
    monkeypatch.setattr(E, "generate", lambda *a, **k: gens)
    monkeypatch.setattr(E, "chat_reward_inputs", lambda tokenizer, prompts, texts, cut=None: (ids[:len(texts)], mask[:len(texts)],
                                                                                    [1] * len(texts)))
    prompts = [[{"role": "user", "content": "x"}]] * 2
    with pytest.raises(ConfigError, match="the reward model's score of ppo's response 0 is nan"):
        E.rollout(NaNStack(), "ppo", None, prompts, ids, None, seed=0, batch=2)
    with pytest.raises(ConfigError, match="the KL of ppo to sft on response 0 is nan"):
        E.sequence_kl(NaNStack(), "ppo", "sft", {"gens": gens}, batch=2, temperature=1.0)
    pairs = tmp_path / "eval_pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ConfigError, match="the reward model's score of held-out reply 0 is nan"):
        E.heldout_pair_rewards(NaNStack(), None, {"outputs": {"eval_pairs": str(pairs)}}, batch=2)


def test_each_training_panel_draws_the_keys_logged_dashes_the_second_and_says_what_was_not_logged():
    """plot_training: a panel's first key solid, the second dashed, each under its legend name; a key logged from a
    later update on (kl_k3) is drawn with a gap where it was not; a panel with no key logged says "not logged"."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.eval_plots import plot_training

    fig, axes = plt.subplots(2, 2)
    rows = [{"update": 1, "reward_raw": 0.5, "reward": 0.1, "kl": 0.2, "response_length": 9.0},
            {"update": 2, "reward_raw": 0.7, "reward": 0.3, "kl": 0.4, "kl_k3": 0.35, "response_length": 8.0}]
    plot_training(axes.flat, rows)
    reward, kl, entropy, length = axes.flat
    assert [(ln.get_label(), ln.get_linestyle()) for ln in reward.get_lines()] == [
        ("reward model's score", "-"), ("as PPO used it (normalised, clipped, EOS penalty)", "--")]
    (k1, k3) = kl.get_lines()
    assert (k1.get_label(), list(k1.get_ydata())) == ("KL (k1)", [0.2, 0.4])
    assert k3.get_label() == "KL (k3)" and math.isnan(k3.get_ydata()[0]) and k3.get_ydata()[1] == 0.35
    assert list(entropy.get_lines()) == [] and [t.get_text() for t in entropy.texts] == ["not logged"]
    assert list(length.texts) == [] and length.get_legend() is not None
    plt.close(fig)


def test_the_score_histogram_bins_every_score_and_labels_each_policys_mean():
    """plot_hist: 20 bins from the lowest score to the highest hold all six scores (the highest too), and each legend
    entry is its own policy's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.eval_plots import plot_hist

    fig, ax = plt.subplots()
    plot_hist(ax, [0.0, 1.0, 2.0], [5.0, 6.0, 7.0])
    assert sum(p.get_height() for p in ax.patches) == 6
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SFT (mean 1.000)", "PPO (mean 6.000)"]
    plt.close(fig)
    # PPO's scores below SFT's lowest are binned too: the bins span both policies (mutant: SFT's lowest as the start)
    fig, ax = plt.subplots()
    plot_hist(ax, [5.0, 6.0, 7.0], [0.0, 1.0, 2.0])
    assert sum(p.get_height() for p in ax.patches) == 6
    plt.close(fig)


def test_a_reply_with_a_pipe_or_a_line_break_stays_in_its_cell_of_the_sample_table():
    """A reply is data in a markdown table: its '|' escaped and its line breaks made spaces, or it would open columns
    (the rewards would sit under the wrong heading) and rows; over 160 characters it is cut to 159 and an ellipsis."""
    from stages.eval_ppo import sample_table

    s = {"prompt_text": "Why?\nTell me", "sft": "a | b", "ppo": "x" * 161, "reward_sft": 0.5, "reward_ppo": 1.25}
    assert sample_table([s])[2] == "| Why? Tell me | a \\| b | " + "x" * 159 + "… | 0.500 | 1.250 |"
    assert sample_table([{**s, "ppo": "x" * 160}])[2].endswith("| " + "x" * 160 + " | 0.500 | 1.250 |")


def test_model_text_in_the_sample_table_is_shown_as_itself_not_as_markdown_or_html():
    """report.md is published with the adapters: a reply's `*sigh*` is not italics, `<img src=...>` no remote image,
    `[x](url)` no link. Every character Markdown or HTML reads is escaped, after the cut (an escape is never cut in
    two), so the cell renders the stored text."""
    from stages.eval_ppo import sample_table

    s = {"prompt_text": "<details>", "sft": "*sigh* ![x](http://e.x/a.png)", "ppo": "<" * 170,
         "reward_sft": 0.5, "reward_ppo": 1.25}
    assert sample_table([s])[2] == ("| &#60;details&#62; | \\*sigh\\* \\!\\[x\\]\\(http://e.x/a.png\\) | "
                                    + "&#60;" * 159 + "… | 0.500 | 1.250 |")


def test_held_out_pairs_with_kept_token_ids_score_each_pairs_own_chosen_and_rejected(tmp_path, monkeypatch):
    """heldout_pair_rewards on pairs that carry the rm stage's token ids (as `make rm` writes eval_pairs.jsonl): pair
    i's chosen score is that of its chosen ids, its rejected score that of its rejected ids, over several pairs (with
    one pair any order reads the same). Scoring faked: a sequence's score is the sum of its ids plus half its start."""
    from types import SimpleNamespace

    import stages.eval as ev

    monkeypatch.setattr(ev, "token_scores", lambda stack, seqs, starts, pad_id, batch:
                        [float(sum(s)) + 0.5 * st for s, st in zip(seqs, starts)])
    rows = [([1, 2], [30], 1), ([4, 5, 6], [70, 8], 2), ([9], [10, 11], 0)]
    pairs = tmp_path / "eval_pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "Hi", "chosen": "c", "rejected": "r", "chosen_ids": c,
                                         "rejected_ids": r, "reply_start": s}) + "\n" for c, r, s in rows))
    held, chosen, rejected = ev.heldout_pair_rewards(None, SimpleNamespace(pad_token_id=0),
                                                     {"outputs": {"eval_pairs": str(pairs)}}, 8)
    assert len(held) == 3 and chosen == [3.5, 16.0, 9.0] and rejected == [30.5, 79.0, 21.0]


def test_the_proxy_win_rate_counts_the_same_reply_as_a_tie_whatever_its_two_scores(tmp_path):
    """SFT and PPO writing the same reply to a prompt is a tie under the reward model, though its two scores can differ
    (a batch's padding; in bf16 by ~1e-2): PPO wins prompt 1, ties prompt 0 -> (1 + 0.5) / 2."""
    from types import SimpleNamespace

    from stages.eval import EvalArgs
    from stages.eval_ppo import sft_vs_ppo
    from tests.fake_upstream import fake_metrics

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fake_metrics()))
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(2)]
    ro_sft = {"texts": ["same", "sft"], "rewards": [0.0, 0.0], "lengths": [3, 3], "ended": [True, True]}
    ro_ppo = {"texts": ["same", "ppo"], "rewards": [0.01, 1.0], "lengths": [3, 3], "ended": [True, True]}
    out = sft_vs_ppo(SimpleNamespace(spec="none"), prompts, EvalArgs(), {"outputs": {"metrics_jsonl":
                     str(tmp_path / "metrics.jsonl")}}, tmp_path / "ppo", ro_sft, ro_ppo, [0.0, 1.0], None, ([], [], []), [])
    assert (out["win_rate"]["wins"], out["win_rate"]["ties"]) == (1, 1) and out["figures"]["win_rate"] == 0.75


def test_a_first_response_length_of_zero_raises_no_length_flag_and_no_error():
    """The length flag compares the last length with a multiple of the first: a first tenth of empty replies (length 0)
    has no ratio, so no flag, rather than a ZeroDivisionError in the report."""
    from stages.eval import EvalArgs
    from stages.eval_ppo import training_flags

    train = {"reward_raw_first": 0.0, "reward_raw_last": 1.0, "response_length_first": 0.0, "response_length_last": 5.0}
    assert training_flags(train, EvalArgs(hacking_length_ratio=2.0, hacking_kl=10.0)) == []


def test_the_final_update_is_the_last_logged_else_the_configured_total_else_one(tmp_path):
    """Where an RL stage's final policy sits on the curve: the highest update its metrics logged; with none logged, its
    configured total_updates; with neither, 1 (after SFT's 0)."""
    from stages.eval_ppo import final_update

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"update": 3}\n{"update": 7}\n{"update": 5}\n')
    manifest = {"outputs": {"metrics_jsonl": str(metrics)}, "config": {"ppo": {"total_updates": 20}}}
    assert final_update(manifest) == 7
    metrics.write_text('{"kl": 0.1}\n')
    assert final_update(manifest) == 20
    assert final_update({**manifest, "config": {}}) == 1


def test_the_gold_win_rate_matrix_counts_any_gold_difference_as_the_ppo_report_does(tmp_path):
    """The comparison's gold matrix takes ties as the PPO report's gold win rate does (tie_eps 0: a judge's scores are
    its own; any difference orders them): PPO's gold 5e-7 above SFT's on both prompts is two wins in both."""
    from types import SimpleNamespace

    from stages.eval import EvalArgs, compare_policies
    from stages.eval_ppo import curve_point, gold_report

    ro = {n: {"texts": [f"{n} a", f"{n} b"], "rewards": [0.0, 1.0], "lengths": [3, 3], "ended": [True, True]}
          for n in ("sft", "ppo")}
    gold = {"sft": [0.0, 0.0], "ppo": [5e-7, 5e-7]}
    kl = {"sft": [0.0, 0.0], "ppo": [1.0, 1.0]}
    curve = [curve_point(0, "sft", ro["sft"]["rewards"], gold["sft"], kl["sft"]),
             curve_point(4, "ppo (final)", ro["ppo"]["rewards"], gold["ppo"], kl["ppo"])]
    judge = SimpleNamespace(spec="made-up")
    c = compare_policies(judge, [[{"role": "user", "content": "a"}]] * 2, EvalArgs(), {"ppo": {}}, ro, kl, gold, {}, curve,
                         {"ppo": 4})
    report = gold_report(judge, [], SimpleNamespace(gold_batch_size=8, samples_per_prompt=1), ([], [], []), [], 4, ro["sft"], ro["ppo"],
                         kl["ppo"], gold["sft"], gold["ppo"])
    assert report["win_rate"]["rate"] == c["win_rate_gold"]["ppo"]["sft"]["rate"] == 1.0


def test_the_reports_rm_gold_agreement_says_whose_held_out_pairs_a_given_reward_model_is_measured_on():
    """The RL stages given a reward model (--reward_adapter): eval scores the run's reward model's held-out pairs with
    it, pairs it may have trained on; the report called them "its held-out pairs"."""
    from stages.eval_ppo import gold_markdown

    gold = {"judge": "sentiment", "curve": [], "win_rate": {"rate": 0.8, "ci_low": 0.7, "ci_high": 0.9, "wins": 8,
                                                             "losses": 2, "ties": 0},
            "rm_agreement_heldout_pairs": {"agreement": 0.75, "pairs": 40},
            "rm_agreement_policy_samples": {"agreement": 0.5, "pairs": 10}}
    figures = {"gold_sft_mean": 0.1, "gold_ppo_mean": 0.6}
    own = "\n".join(gold_markdown(gold, figures))
    given = "\n".join(gold_markdown(gold, figures, "/somewhere/my-rm"))
    assert "Reward model agrees with the gold on 75.0% of its held-out pairs whose gold scores differ (40 pairs)" in own
    assert ("Reward model agrees with the gold on 75.0% of the run's reward model's held-out pairs (the one the RL "
            "stages were given may have trained on them) whose gold scores differ (40 pairs)") in given


def test_the_report_says_whose_held_out_pairs_a_given_reward_models_agreement_is_measured_on(eval_dir):
    """gold_markdown's words for a reward model given to the RL stages reach the report only through its call in the
    PPO section: the report of such a run said "its held-out pairs" of pairs that reward model may have trained on."""
    from stages.eval import render_markdown

    report = json.loads((eval_dir / "report.json").read_text())
    assert report.get("gold") and not report.get("reward_adapter")
    own = render_markdown(report, 2)
    given = render_markdown({**report, "reward_adapter": "/somewhere/my-rm"}, 2)
    words = "the run's reward model's held-out pairs (the one the RL stages were given may have trained on them)"
    assert words not in own and "of its held-out pairs whose gold scores differ" in own
    assert words in given


def test_the_training_line_says_kl_was_not_measured_without_a_reference(eval_dir):
    """A kl_coef 0 run logs no KL (no reference model): report.md read "KL nan → nan"; now it says why there is none,
    and a run with a KL curve still shows its first and last tenth."""
    from stages.eval_ppo import ppo_markdown, training_summary

    report = json.loads((eval_dir / "report.json").read_text())
    without = training_summary([{**row, "kl": None} for row in summary_rows(20)])
    md = "\n".join(ppo_markdown({**report, "training": without}, 4))
    assert "KL not measured (kl_coef 0: no reference model), length 1.0 → 1.0" in md and "nan" not in md
    md = "\n".join(ppo_markdown({**report, "training": training_summary(summary_rows(20, kl=lambda i: i))}, 4))
    assert "KL 0.500 → 18.500, length" in md
