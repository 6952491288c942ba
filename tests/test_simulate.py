"""Simulated annotators (stages/simulate.py): the noise model, checked statistically; labels through the label store
people use, exported like theirs; people-vs-simulator agreement in the stats."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.config import ConfigError, RunArgs, parse
from stages.simulate import (SimulateArgs, agreement_with_gold, calibrate_temperature, choose, expected_agreement, main,
                             sigmoid, uniform)
from tests.conftest import REPO, run_python, yaml_with

N = 20000  # draws per statistical check: a share's standard error is at most 0.5 / sqrt(N) = 0.0035
TOL = 4 * 0.5 / math.sqrt(N)  # 4 standard errors: a correct model fails this about once in 16,000 runs


def shares(diff: float, temperature: float, tie_band: float, bias: float, seed: int = 0) -> dict:
    picks = [choose(diff, uniform(seed, "sim:t", f"pair-{i}"), temperature, tie_band, bias) for i in range(N)]
    return {c: picks.count(c) / N for c in ("left", "right", "tie")}


@pytest.mark.parametrize("diff, temperature, bias", [(0.3, 0.2, 0.0), (-0.5, 0.25, 0.0), (0.0, 1.0, 0.8),
                                                     (0.2, 0.4, -0.5)])
def test_bradley_terry_choice_matches_its_probability(diff, temperature, bias):
    got = shares(diff, temperature, tie_band=0.0, bias=bias)
    want = sigmoid(diff / temperature + bias)  # e.g. sigmoid(1.5) = 0.8176 for the first case
    assert abs(got["left"] - want) < TOL and got["tie"] == 0.0
    assert got["left"] + got["right"] == pytest.approx(1.0)


def test_tie_band_and_no_bias_means_no_position_preference():
    assert shares(0.04, 0.1, tie_band=0.05, bias=2.0) == {"left": 0.0, "right": 0.0, "tie": 1.0}  # inside the band
    assert shares(0.05, 0.1, tie_band=0.05, bias=0.0)["tie"] == 0.0  # the band is open: 0.05 is decided
    assert abs(shares(0.0, 1.0, tie_band=0.0, bias=0.0)["left"] - 0.5) < TOL
    assert sigmoid(0.0) == 0.5 and sigmoid(-800.0) == 0.0 and sigmoid(800.0) == 1.0  # no overflow either way


def test_draws_are_fixed_by_seed_annotator_and_pair_not_by_order():
    assert uniform(0, "sim:a", "p1") == uniform(0, "sim:a", "p1")
    assert len({uniform(0, "sim:a", "p1"), uniform(1, "sim:a", "p1"), uniform(0, "sim:b", "p1"), uniform(0, "sim:a", "p2")}) == 4
    draws = [uniform(3, "sim:a", f"p{i}") for i in range(N)]
    assert all(0 <= u < 1 for u in draws) and abs(sum(draws) / N - 0.5) < 4 * math.sqrt(1 / 12 / N)


def test_calibrated_temperature_gives_the_target_agreement():
    diffs = [0.05 + 0.9 * i / 999 for i in range(1000)]  # |score differences| spread over VADER's range
    for target, bias in ((0.73, 0.0), (0.9, 0.0), (0.73, 0.5)):
        t = calibrate_temperature(diffs, target, bias)
        assert expected_agreement(diffs, t, bias) == pytest.approx(target, abs=1e-6)
    # and the draws achieve it: pairs with the gold winner shown left and right equally often (with a position bias
    # too: the left-favouring annotator gains on half the pairs what it loses on the other half, not the same)
    for bias in (0.0, 0.5):
        t = calibrate_temperature(diffs, 0.73, bias)
        agree = sum(choose(d if i % 2 else -d, uniform(0, "sim:t", f"p{i}{j}"), t, 0.0, bias) == ("left" if i % 2 else "right")
                    for j in range(20) for i, d in enumerate(diffs)) / (20 * len(diffs))
        assert abs(agree - 0.73) < TOL
    with pytest.raises(ConfigError, match="out of reach"):
        calibrate_temperature([1e-9], 0.73, 0.0)  # differences far below any temperature's resolution
    with pytest.raises(ConfigError, match="outside tie_band"):
        calibrate_temperature([], 0.73, 0.0)


def test_agreement_with_gold_counts_decided_labels_on_unequal_pairs():
    scores = {"a": [0.5, 0.0], "b": [0.0, 0.6], "c": [0.2, 0.2], "d": [0.9, 0.1], "e": [0.0, 0.3]}
    labels = [{"pair_id": "a", "preferred": 0}, {"pair_id": "b", "preferred": 0}, {"pair_id": "c", "preferred": 1},
              {"pair_id": "d", "preferred": 0}, {"pair_id": "e", "preferred": None}]
    got = agreement_with_gold(labels, scores, tie_band=0.05)
    # c: equal gold scores, left out; e: a tie label; a and d agree, b does not -> 2 of 3
    assert got["agreement_with_gold"] == pytest.approx(2 / 3, abs=1e-4) and got["decided_labels"] == 3
    assert got["tie_labels_on_unequal"] == 1
    # its 95% interval is of the labels that agree (Wilson, z = 1.96): 2 of 3 -> centre (2/3 + 0.6403) / 2.2805 =
    # 0.5731, half-width 1.96 * sqrt(2/27 + 0.1067) / 2.2805 = 0.3654 (the disagreeing 1 of 3: [0.0615, 0.7923])
    assert got["agreement_with_gold_ci95"] == [0.2077, 0.9385]
    # the band's edge: a gold difference of exactly tie_band is decided, by the simulator (choose) and so here
    # (0.5 - 0.25 and 0.25 are exact in binary); mutant: the edge left out with the ties
    edge = agreement_with_gold([{"pair_id": "f", "preferred": 0}], {"f": [0.5, 0.25]}, tie_band=0.25)
    assert choose(0.25, 0.0, 1.0, 0.25, 0.0) == "left" and edge["decided_labels"] == 1


def test_expected_agreement_by_hand():
    """expected_agreement is the mean over pairs of (p_left(|d|, T, b) + p_left(|d|, T, -b)) / 2: the gold winner shown
    left or right with even odds; a difference's sign does not matter (the winner is whichever scores more)."""
    # T = 0.4, no bias: sigmoid(0.2 / 0.4) = 0.6224593, sigmoid(0.6 / 0.4) = 0.8175745 -> mean 0.7200169
    assert expected_agreement([0.2, 0.6], 0.4, 0.0) == pytest.approx(0.7200169037, abs=1e-9)
    assert expected_agreement([-0.2, 0.6], 0.4, 0.0) == pytest.approx(0.7200169037, abs=1e-9)
    # bias 0.5: d = 0.2 -> (sigmoid(1.0) + sigmoid(0.0)) / 2 = 0.6155293; d = 0.6 -> (sigmoid(2.0) + sigmoid(1.0)) / 2
    # = 0.8059278; mean 0.7107286
    assert expected_agreement([0.2, -0.6], 0.4, 0.5) == pytest.approx(0.7107285588, abs=1e-9)
    assert expected_agreement([0.3], 0.1, 0.0) == pytest.approx(0.9525741268, abs=1e-9)  # one pair: sigmoid(3)


# ------------------------------------------------------------------------------------------------ the stage

HAPPY = ["It was a lovely, happy day and everyone laughed.", "She smiled, glad and grateful for her wonderful friends.",
         "They won the prize and cheered with joy."]
SAD = ["He died alone, hurt and afraid.", "The awful storm destroyed their home and they wept.",
       "It was a terrible, miserable night of pain."]
NEUTRAL = ["The door was brown.", "He walked to the table."]


def pairs_file(tmp_path, n: int = 60):
    """n pairs of a happy, a sad or a neutral continuation, in both orders."""
    rows = []
    for i in range(n):
        a = [HAPPY, SAD, NEUTRAL][i % 3][i % 2] + f" ({i})"
        b = [SAD, NEUTRAL, NEUTRAL][i % 3][(i + 1) % 2] + f" ({i})"
        responses = [a, b] if i % 2 else [b, a]
        rows.append({"pair_id": f"pair{i:03d}", "prompt": [{"role": "user", "content": f"Story {i} begins."}],
                     "responses": responses})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def simulate(tmp_path, runs, *extra):
    """The stage on the fixture pairs; one annotator (`sim:sentiment`) unless the test asks for more (the config has 3)."""
    path, _ = pairs_file(tmp_path)
    extra = extra if "--annotators" in extra else ("--annotators", "1", *extra)
    return main(*parse((SimulateArgs, RunArgs), ["--config", str(REPO / "configs/simulate.yaml"), "--runs_dir", str(runs),
                                                  "--run", "t", "--pairs_dataset", str(path), *extra]))


def test_simulated_labels_go_through_the_store_and_export_like_peoples(tmp_path):
    import datasets

    from stages.label.config import ExportArgs, LabelArgs
    from stages.label.export import main as export_main
    from stages.label.store import LabelStore

    runs = tmp_path / "runs"
    metrics = simulate(tmp_path, runs)
    _, rows = pairs_file(tmp_path)
    store = LabelStore(runs / "t" / "label" / "labels.sqlite")
    labels = store.labels()
    assert metrics["annotator"] == "sim:sentiment" and metrics["labels_written"] == len(labels) == len(rows) == 60
    assert {lab["annotator"] for lab in labels} == {"sim:sentiment"}
    for lab in labels:  # each pair was served by next_item, in the order the store shows this annotator
        assert lab["shown_left"] == store.shown_left(lab["pair_id"], "sim:sentiment")
    history = store.history("sim:sentiment")
    assert [h["action"] for h in history] == ["new"] * 60
    # the manifest's agreement is the one recomputed from the store and the judge's scores
    gold = {json.loads(line)["pair_id"]: json.loads(line)["scores"]
            for line in (runs / "t" / "simulate" / "gold_scores.jsonl").read_text().splitlines()}
    assert metrics["agreement_with_gold"] == agreement_with_gold(labels, gold, 0.05)["agreement_with_gold"]
    assert metrics["temperature_calibrated"] and metrics["expected_agreement"] == pytest.approx(0.73, abs=1e-4)  # 4 digits
    neutral = [p["pair_id"] for p in rows if abs(gold[p["pair_id"]][0] - gold[p["pair_id"]][1]) < 0.05]
    assert neutral and all(lab["choice"] == "tie" for lab in labels if lab["pair_id"] in neutral)
    manifest = json.loads((runs / "t" / "simulate" / "manifest.json").read_text())
    assert manifest["metrics"]["agreement_with_gold"] == metrics["agreement_with_gold"]

    # a rerun labels nothing twice and reports the same
    again = simulate(tmp_path, runs)
    assert again["labels_written"] == 0 and again["agreement_with_gold"] == metrics["agreement_with_gold"]
    assert len(store.labels()) == 60

    # export: the simulator is an annotator like any other
    out = export_main(*parse((LabelArgs, ExportArgs, RunArgs), ["--config", str(REPO / "configs/label.yaml"),
                                                                "--runs_dir", str(runs), "--run", "t"]))
    ds = datasets.load_from_disk(str(runs / "t" / "label-export" / "dataset"))
    decided = [lab for lab in labels if lab["preferred"] is not None]
    assert out["annotators"] == 1 and len(ds) == len(decided) and set(ds["annotator"]) == {"sim:sentiment"}
    by_id = {lab["pair_id"]: lab for lab in decided}
    for row in ds:
        lab = by_id[row["pair_id"]]
        assert row["chosen"][0]["content"] == lab["responses"][lab["preferred"]]
        assert row["rejected"][0]["content"] == lab["responses"][1 - lab["preferred"]]


def test_people_and_simulators_share_a_store_and_their_agreement_shows(tmp_path):
    from stages.label.stats import human_vs_simulated, stats_view, summarize, to_html
    from stages.label.store import LabelStore

    runs = tmp_path / "runs"
    _, rows = pairs_file(tmp_path)
    store = LabelStore(runs / "t" / "label" / "labels.sqlite", overlap=2)
    store.import_items(rows)
    store.import_items([{"pair_id": "eval-1", "prompt": [{"role": "user", "content": "x"}], "responses": ["a", "b"]}])
    store.save_label("alice", "eval-1", "left", 0)  # people's labels of other pairs (eval's) do not stop the simulators
    assert simulate(tmp_path, runs, "--skip_if_people_labeled", "true")["labels_written"] == 60
    store.save_simulated(["sim:sentiment"], [])
    for row in rows[:4]:  # a person says response 0 wins on four pairs
        store.save_label("alice", row["pair_id"], "left", 0)
    # the default chain leaves people's labels alone ...
    assert simulate(tmp_path, runs, "--skip_if_people_labeled", "true") == {"skipped": "people labeled"}
    assert {lab["annotator"] for lab in store.labels()} == {"alice"} and len(store.labels()) == 5
    # ... while make simulate labels every pair, those people labeled included
    simulate(tmp_path, runs)
    labels = store.labels()
    sim = {lab["pair_id"]: lab for lab in labels if lab["annotator"] == "sim:sentiment"}
    assert len(sim) == 60
    same = sum(sim[row["pair_id"]]["preferred"] == 0 for row in rows[:4])
    got = human_vs_simulated(labels)
    assert got == {"pairs": 4, "comparisons": 4, "agreement": round(same / 4, 3)}
    assert summarize(labels)["human_vs_simulated"] == got
    shown = to_html(stats_view(labels), overlap=2)  # the Stats tab
    assert f"{got['agreement']:.0%} agreement on 4 pairs labeled by both" in shown
    assert "<b>5 labels</b> from 1 annotator(s)" in shown and "(sim:sentiment): 60 labels, not counted above" in shown


def test_human_vs_simulated_agreement_by_hand():
    from stages.label.stats import human_vs_simulated

    def lab(pair, who, preferred, choice="left"):
        return {"pair_id": pair, "annotator": who, "preferred": preferred, "choice": choice}

    labels = [lab("p1", "ann", 0), lab("p1", "sim:x", 0), lab("p1", "sim:y", 1),  # 1 of 2 agree
              lab("p2", "bob", None, "tie"), lab("p2", "sim:x", None, "tie"),    # ties agree
              lab("p3", "ann", 1), lab("p3", "bob", 1),                            # no simulator: left out
              lab("p4", "sim:x", 0)]                                             # no person: left out
    assert human_vs_simulated(labels) == {"pairs": 2, "comparisons": 3, "agreement": round(2 / 3, 3)}
    assert human_vs_simulated(labels[5:]) is None


def test_bad_simulate_input_is_one_error_before_anything_is_written(tmp_path):
    runs = tmp_path / "runs"
    path, _ = pairs_file(tmp_path)
    base = ["--config", "configs/simulate.yaml", "--runs_dir", str(runs), "--run", "t", "--pairs_dataset", str(path)]
    label_yaml = tmp_path / "label.yaml"
    label_yaml.write_text(yaml_with((REPO / "configs/label.yaml").read_text(), "\noffensive_words: 5\n"))
    for extra, message in ((["--label_config", str(label_yaml)], "'offensive_words' in .*label.yaml is 5: it must be a list"),
                           (["--label_config", str(tmp_path / "nope.yaml")], rf"^label config {tmp_path / 'nope.yaml'} "
                            r"does not exist: pass --label_config with a path to a YAML file \(configs/label.yaml by "
                            r"default\)$"),
                           (["--judge", "tests.judge_fixtures:raising_judge"], "the grader is on holiday"),
                           (["--judge", "vibes"], "unknown judge 'vibes'"),
                           (["--annotator", "alice"], "must start with 'sim:'"),
                           # the export's annotator column parts names at commas: ` strict` would pass for a person
                           (["--annotator", "sim:vader, strict"], "annotator 'sim:vader, strict' holds a comma"),
                           (["--target_agreement", "0.4"], "target_agreement must be between 0.5"),
                           (["--target_agreement", "1"], "target_agreement must be between 0.5"),  # no noise at all
                           (["--temperature", "2", "--target_agreement", "0.9"],
                            "^--target_agreement on the command line would have no effect: temperature 2 is given"),
                           (["--batch_size", "0"], "--batch_size on the command line is 0: it must be >= 1")):
        with pytest.raises(ConfigError, match=message):
            main(*parse((SimulateArgs, RunArgs), base + extra))
    assert not runs.exists()  # neither the label store nor the stage folder
    # as `make simulate` runs it: one error line, exit code 2
    res = run_python("stages.simulate", base + ["--judge", "tests.judge_fixtures:nan_judge"], timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: judge 'tests.judge_fixtures:nan_judge' gave nan") and not runs.exists()


def test_simulate_waits_for_no_live_labeling_app(tmp_path):
    """A labeling app serving the run's store holds its lock: `make simulate` stops before writing (importing its
    pairs would take the app's pairs away from the people labeling), and runs once the app has stopped."""
    from stages.label.config import db_path
    from stages.label.store import LabelStore, lock_store

    runs = tmp_path / "runs"
    served = lock_store(db_path(str(runs), "t"))
    try:
        with pytest.raises(ConfigError, match=r"another labeling app \(pid \d+\) is serving .* stop it before `make simulate`"):
            simulate(tmp_path, runs)
        assert not (runs / "t" / "simulate").exists() and not db_path(str(runs), "t").exists()
    finally:
        served.close()
    assert simulate(tmp_path, runs)["labels_written"] == 60
    assert len(LabelStore(db_path(str(runs), "t")).labels()) == 60


def test_the_seed_fixes_the_labels(tmp_path):
    from stages.label.store import LabelStore

    def choices(runs, *extra):
        simulate(tmp_path, runs, *extra)
        return {lab["pair_id"]: lab["choice"] for lab in LabelStore(runs / "t" / "label" / "labels.sqlite").labels()}

    first, again, other = choices(tmp_path / "a"), choices(tmp_path / "b"), choices(tmp_path / "c", "--seed", "1")
    assert first == again and first.keys() == other.keys() and first != other


def test_a_given_temperature_is_used_as_is_and_a_wide_tie_band_makes_every_label_a_tie(tmp_path):
    runs = tmp_path / "runs"
    m = simulate(tmp_path, runs, "--temperature", "0.3", "--tie_band", "5")  # VADER differences are at most 2
    assert m["temperature"] == 0.3 and not m["temperature_calibrated"] and m["tie_share"] == 1.0
    assert m["expected_agreement"] is None and m["agreement_with_gold"] is None and m["decided_labels"] == 0


def votes(*pairs_and_prefs) -> list[dict]:
    """Label-store rows as label-export reads them, one per (pair, preferred) vote, each by the pair's next
    simulated annotator; preferred None = a tie."""
    seen: dict[str, int] = {}
    rows = []
    for pair, pref in pairs_and_prefs:
        seen[pair] = seen.get(pair, 0) + 1
        rows.append({"pair_id": pair, "preferred": pref, "choice": "tie" if pref is None else ("left", "right")[pref],
                     "annotator": f"sim:x-{seen[pair]}", "strength": None,
                     "prompt": [{"role": "user", "content": pair}], "responses": [f"{pair} first", f"{pair} second"]})
    return rows


def test_majority_agreement_with_gold_by_hand():
    from stages.simulate import majority_agreement_with_gold

    scores = {"a": [0.9, 0.1], "b": [0.0, 0.5], "c": [0.2, 0.2], "d": [0.8, 0.0], "e": [0.7, 0.1]}
    labels = votes(("a", 0), ("a", 0), ("a", 1),      # majority 0 = gold winner
                   ("b", 0), ("b", 0), ("b", None),   # majority 0, gold winner is 1
                   ("c", 0), ("c", 0), ("c", 0),      # gold tie: not counted
                   ("d", 0), ("d", 1), ("d", None),   # 1-1-1: no majority, not counted
                   ("e", 0), ("e", None), ("e", None))  # a tie majority: export drops it, not counted
    out = majority_agreement_with_gold(labels, scores, tie_band=0.05)
    assert out["majority_agreement_with_gold"] == 0.5 and out["majority_decided_pairs"] == 2
    # the interval is of the majorities that agree (Wilson, z = 1.96): pair a alone, 1 of 1 -> centre (1 + 1.9208) /
    # 4.8416 = 0.6033, half-width 1.96 * 0.98 / 4.8416 = 0.3967 (the disagreeing 0 of 1: [0.0, 0.7935])
    one = majority_agreement_with_gold([lab for lab in labels if lab["pair_id"] == "a"], scores, tie_band=0.05)
    assert one["majority_agreement_with_gold"] == 1.0 and one["majority_agreement_with_gold_ci95"] == [0.2065, 1.0]


def test_majority_agreement_with_gold_counts_which_response_the_majority_chose():
    """The majority's pick is the response label-export keeps as chosen (0 or 1, whatever the order shown); it agrees
    when that is the response with the higher gold score. Asymmetric: 2 of 3 pairs agree, so a flipped side gives
    1/3."""
    from stages.simulate import majority_agreement_with_gold

    scores = {"a": [0.9, 0.1], "b": [0.0, 0.5], "f": [0.1, 0.6]}
    labels = votes(("a", 0), ("a", 0), ("a", 1),   # majority 0 = gold winner 0: agrees
                   ("b", 0), ("b", 0), ("b", 1),   # majority 0, gold winner 1: disagrees
                   ("f", 1), ("f", 1), ("f", 0))   # majority 1 = gold winner 1: agrees
    out = majority_agreement_with_gold(labels, scores, tie_band=0.05)
    assert out["majority_agreement_with_gold"] == round(2 / 3, 4) and out["majority_decided_pairs"] == 3
    assert majority_agreement_with_gold(labels[6:], scores, 0.05)["majority_agreement_with_gold"] == 1.0  # f alone


def test_several_simulated_annotators_label_every_pair_with_their_own_draws(tmp_path):
    from stages.label.store import LabelStore

    runs = tmp_path / "runs"
    metrics = simulate(tmp_path, runs, "--annotators", "3")
    _, rows = pairs_file(tmp_path)
    labels = LabelStore(runs / "t" / "label" / "labels.sqlite").labels()
    names = {"sim:sentiment-1", "sim:sentiment-2", "sim:sentiment-3"}
    assert {lab["annotator"] for lab in labels} == names and len(labels) == 3 * len(rows) == metrics["labels_written"]
    for name in names:
        assert sorted(lab["pair_id"] for lab in labels if lab["annotator"] == name) == sorted(r["pair_id"] for r in rows)
    by_pair = {}
    for lab in labels:
        by_pair.setdefault(lab["pair_id"], set()).add(lab["choice"])
    assert any(len(choices) > 1 for choices in by_pair.values())  # independent draws: the annotators disagree somewhere
    assert metrics["annotators"] == 3 and metrics["majority_decided_pairs"] > 0
    assert simulate(tmp_path, runs, "--annotators", "3")["labels_written"] == 0  # a rerun labels nothing twice


def test_every_label_is_its_own_annotators_draw_at_the_temperature_calibrated_outside_the_band(tmp_path):
    """Three annotators, recomputed label by label: each sees the pair in the store's order for its own name and
    answers with its own draw, choose(s_left - s_right, uniform(seed, its name, pair), T, tie_band, bias). T is the
    temperature calibrated on the pairs outside the tie band only: a pair inside it is a tie whatever T is, and
    counting its zero difference would make the decided labels agree with the gold more often than the target."""
    from stages.label.store import LabelStore

    runs = tmp_path / "runs"
    metrics = simulate(tmp_path, runs, "--annotators", "3")
    gold = {json.loads(line)["pair_id"]: json.loads(line)["scores"]
            for line in (runs / "t" / "simulate" / "gold_scores.jsonl").read_text().splitlines()}
    outside = [abs(s[0] - s[1]) for s in gold.values() if abs(s[0] - s[1]) >= 0.05]
    assert 0 < len(outside) < len(gold)  # the fixture has pairs inside the band (two neutral sentences score 0)
    assert metrics["temperature"] == pytest.approx(calibrate_temperature(outside, 0.73, 0.0), rel=1e-9)
    store = LabelStore(runs / "t" / "label" / "labels.sqlite")
    labels = store.labels()
    assert len(labels) == 3 * len(gold)
    for lab in labels:
        left = store.shown_left(lab["pair_id"], lab["annotator"])
        s = gold[lab["pair_id"]]
        want = choose(s[left] - s[1 - left], uniform(0, lab["annotator"], lab["pair_id"]), metrics["temperature"], 0.05, 0.0)
        assert (lab["shown_left"], lab["choice"]) == (left, want), lab
    orders = {}
    for lab in labels:
        orders.setdefault(lab["pair_id"], set()).add(lab["shown_left"])
    assert any(len(o) == 2 for o in orders.values())  # the annotators' orders differ: each one's own is checked


def test_a_rerun_with_other_settings_leaves_the_labels_a_fresh_run_with_them_would(tmp_path):
    """The store holds the labels of the settings given last: new noise settings redraw what they change, fewer or
    other annotators remove the rest, another name's or judge's included (the export would count its 60 labels in one
    majority with these), and a person's labels are never touched."""
    from stages.label.store import LabelStore

    def labels_of(runs) -> dict:
        return {(lab["annotator"], lab["pair_id"]): (lab["choice"], lab["shown_left"])
                for lab in LabelStore(runs / "t" / "label" / "labels.sqlite").labels()}

    runs = tmp_path / "runs"
    _, rows = pairs_file(tmp_path)
    store = LabelStore(runs / "t" / "label" / "labels.sqlite")
    store.import_items(rows)
    store.save_label("alice", rows[0]["pair_id"], "left", 0)
    simulate(tmp_path, runs, "--annotator", "sim:other", "--seed", "7")
    others = {k: v for k, v in labels_of(runs).items() if k[0] == "alice"}
    assert simulate(tmp_path, runs)["labels_removed"] == 60  # sim:other's, one per pair
    assert {who for who, _ in labels_of(runs)} == {"alice", "sim:sentiment"}
    for settings, removed in ((("--position_bias", "1.0", "--seed", "5", "--tie_band", "0.02"), 0),
                              (("--annotators", "3"), 60), (("--annotators", "2"), 60)):
        got = simulate(tmp_path, runs, *settings)
        fresh = tmp_path / f"fresh{len(settings)}"
        simulate(tmp_path, fresh, *settings)
        mine = {k: v for k, v in labels_of(runs).items() if k[0] != "alice"}
        assert mine == labels_of(fresh), settings
        assert got["labels_removed"] == removed and got["labels"] == len(labels_of(fresh))
        assert {k: v for k, v in labels_of(runs).items() if k[0] == "alice"} == others
    assert got["labels_written"] == 0 and got["labels_redrawn"] == 0  # 2 of the 3 annotators: nothing to draw anew
    again = simulate(tmp_path, runs, "--annotators", "2", "--position_bias", "1.0")
    assert again["labels_redrawn"] > 0 and again["left_share"] > 0.6  # the bias the manifest reports is in the labels
    # and in the expected agreement it reports: the calibration's target, reached at that bias (at no bias the same
    # temperature would agree more)
    assert again["temperature_calibrated"] and again["expected_agreement"] == pytest.approx(0.73, abs=1e-4)
    assert simulate(tmp_path, runs, "--annotators", "2", "--position_bias", "1.0")["labels_redrawn"] == 0
    with pytest.raises(ValueError, match="simulated annotators' labels only"):
        store.save_simulated(["alice"], [])  # people's labels are never removed with a simulator's


def test_no_member_of_the_runs_reward_model_ensemble_may_judge(tmp_path):
    runs = tmp_path / "runs"
    for member in ("adapter", "member-1/adapter", "member-2/adapter"):
        (runs / "t" / "rm" / member).mkdir(parents=True)
    for member in ("adapter", "member-2/adapter"):
        with pytest.raises(ConfigError, match="reward model this run's PPO optimised"):
            simulate(tmp_path, runs, "--judge", f"rm:{runs / 't' / 'rm' / member}")
    assert sorted(p.name for p in (runs / "t").iterdir()) == ["rm"]  # no label store, no simulate stage


def test_gold_scores_are_each_pairs_own_and_a_cold_annotator_always_picks_the_gold_winner(tmp_path):
    """gold_scores.jsonl holds, for each pair, the judge's (VADER's) scores of THAT pair's two responses, in order.
    With a tiny temperature sigmoid(diff / T) is 0 or 1: every pair outside the tie band is labeled with the response
    the gold judge scores higher, whichever side the store shows it on; inside the band, a tie. So agreement_with_gold
    is 1, left_share = (decided labels with the gold winner shown left) / (decided labels), ties not counted, and
    tie_share = ties / all labels. At the calibrated temperature (expected 0.73) the achieved agreement is near it."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from stages.label.store import LabelStore

    runs = tmp_path / "cold"
    metrics = simulate(tmp_path, runs, "--temperature", "1e-6")
    _, rows = pairs_file(tmp_path)
    analyzer = SentimentIntensityAnalyzer()
    gold = {json.loads(line)["pair_id"]: json.loads(line)["scores"]
            for line in (runs / "t" / "simulate" / "gold_scores.jsonl").read_text().splitlines()}
    assert gold == {r["pair_id"]: [analyzer.polarity_scores(x)["compound"] for x in r["responses"]] for r in rows}
    assert len({tuple(s) for s in gold.values()}) > 3  # the fixture's pairs are not all scored alike
    assert metrics["gold_mean"] == round(sum(sum(s) for s in gold.values()) / (2 * len(rows)), 4)

    store = LabelStore(runs / "t" / "label" / "labels.sqlite")
    labels = store.labels()
    assert len(labels) == 60
    ties = winner_left = decided = 0
    for lab in labels:
        s = gold[lab["pair_id"]]
        if abs(s[0] - s[1]) < 0.05:
            assert lab["choice"] == "tie"
            ties += 1
            continue
        winner = 0 if s[0] > s[1] else 1
        shown_left = store.shown_left(lab["pair_id"], "sim:sentiment")
        assert lab["preferred"] == winner and lab["choice"] == ("left" if shown_left == winner else "right")
        decided += 1
        winner_left += shown_left == winner
    assert 0 < ties < 60 and 0 < winner_left < decided  # both sides and ties occur: the shares below are not trivial
    assert metrics["agreement_with_gold"] == 1.0 and metrics["decided_labels"] == decided
    assert metrics["left_share"] == round(winner_left / decided, 4) and metrics["tie_share"] == round(ties / 60, 4)

    calibrated = simulate(tmp_path, tmp_path / "calibrated")
    assert calibrated["expected_agreement"] == pytest.approx(0.73, abs=1e-4) and calibrated["agreement_with_gold"] > 0.6


def test_a_simulate_run_killed_midway_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    """Killed while redrawing labels with other settings: the store held some labels of each setting, and `make rm`
    exported and trained on the mix. All of a run's writes are one transaction now: a kill changes nothing."""
    from stages.label.store import LabelStore

    runs = tmp_path / "runs"
    simulate(tmp_path, runs, "--annotators", "3")
    store = LabelStore(runs / "t" / "label" / "labels.sqlite")
    before = sorted((lab["annotator"], lab["pair_id"], lab["choice"], lab["shown_left"]) for lab in store.labels())
    saved = []
    real = LabelStore._save_label

    def killed_after_five(self, con, *args, **kwargs):
        if len(saved) == 5:
            raise KeyboardInterrupt
        saved.append(args)
        return real(self, con, *args, **kwargs)

    monkeypatch.setattr(LabelStore, "_save_label", killed_after_five)
    with pytest.raises(KeyboardInterrupt):  # other noise and fewer annotators: removals and redraws, cut short
        simulate(tmp_path, runs, "--annotators", "2", "--seed", "9", "--position_bias", "1.0")
    assert len(saved) == 5
    after = sorted((lab["annotator"], lab["pair_id"], lab["choice"], lab["shown_left"]) for lab in store.labels())
    assert after == before and len(before) == 180
    monkeypatch.undo()  # a person's label must be refused by the guard, not by the simulated kill above
    with pytest.raises(ValueError, match="simulated annotators' labels only"):
        store.save_simulated([], [("alice", "pair000", "left", 0)])


def test_your_own_prompts_judged_by_sentiment_get_a_note():
    """The story chain's simulated annotators judge by sentiment: on pairs sampled for your own prompts they would
    label a task they know nothing of, silently. A note names your prompts and the two ways out; the story openings,
    or pairs given another way, get none."""
    from stages.simulate import own_prompts

    def manifest(**pairs):
        return {"config": {"pairs": {"dataset_name": None, "prompts_file": "data/story/pairs_prompts.jsonl", **pairs}}}

    assert own_prompts(manifest()) is None and own_prompts(None) is None
    assert own_prompts(manifest(prompts_file=str(REPO / "data/story/pairs_prompts.jsonl"))) is None  # named another way
    assert own_prompts(manifest(prompts_file="./data/story/pairs_prompts.jsonl")) is None
    assert own_prompts(manifest(dataset_name="my_prompts.jsonl")) == "my_prompts.jsonl"
    assert own_prompts(manifest(prompts_file="data/prompts/oasst_pairs_prompts.jsonl")) == \
        "data/prompts/oasst_pairs_prompts.jsonl"


def test_the_note_on_your_own_prompts_is_printed_by_the_stage(tmp_path, capsys):
    """The stage itself, on a run whose pairs stage sampled your prompts (its manifest says so)."""
    runs = tmp_path / "runs"
    path, _ = pairs_file(tmp_path)
    (runs / "t" / "pairs").mkdir(parents=True)
    (runs / "t" / "pairs" / "manifest.json").write_text(json.dumps({
        "stage": "pairs", "run": "t", "outputs": {"dataset": str(path)}, "metrics": {},
        "config": {"pairs": {"dataset_name": "my_prompts.jsonl"}}}))
    main(*parse((SimulateArgs, RunArgs), ["--config", str(REPO / "configs/simulate.yaml"), "--runs_dir", str(runs),
                                          "--run", "t", "--annotators", "1"]))
    assert "note: the simulated annotators judge the replies to these prompts (my_prompts.jsonl) by sentiment" \
        in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [({"temperature": 0.0}, r"temperature must be > 0"),
                                              ({"annotators": 0}, r"annotators must be >= 1"),
                                              ({"tie_band": -0.01}, r"tie_band must be >= 0")])
def test_a_zero_temperature_no_annotators_or_a_negative_tie_band_is_refused(setting, message):
    """The settings' edges: temperature 0 divides by zero in p_left (and `args.temperature or calibrate` would quietly
    calibrate one instead), 0 annotators label nothing while removing every simulator's labels, and a negative tie
    band is no band. The smallest settings allowed are fine."""
    with pytest.raises(ConfigError, match=message):
        SimulateArgs(**setting)
    SimulateArgs(temperature=1e-6, annotators=1, tie_band=0.0)


def test_pairs_the_word_filter_holds_back_from_people_are_not_labeled_by_the_simulators_either(tmp_path):
    """The simulators are served what people are: a pair holding a word of the label config's offensive_words is
    held back (the same word filter), so it gets no simulated label either."""
    from stages.label.store import LabelStore

    runs = tmp_path / "runs"
    path, rows = pairs_file(tmp_path)
    rows[4]["responses"][1] += " zorblax"
    rows[7]["responses"][0] += " glorp"  # not filtered yet
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    label_yaml = tmp_path / "label.yaml"
    label_yaml.write_text(yaml_with((REPO / "configs/label.yaml").read_text(), "\nfilter_offensive: true\noffensive_words: [zorblax]\n"))
    m = main(*parse((SimulateArgs, RunArgs), ["--config", str(REPO / "configs/simulate.yaml"), "--runs_dir", str(runs),
                                              "--run", "t", "--pairs_dataset", str(path), "--annotators", "1",
                                              "--label_config", str(label_yaml)]))
    labeled = {lab["pair_id"] for lab in LabelStore(runs / "t" / "label" / "labels.sqlite").labels()}
    assert labeled == {r["pair_id"] for r in rows} - {rows[4]["pair_id"]} and m["labels"] == 59
    # a word added later: the pair it now holds back loses its simulated label, as a fresh run would not draw it (the
    # export counted it on); a person's label there stays
    store = LabelStore(runs / "t" / "label" / "labels.sqlite")
    store.save_label("alice", rows[7]["pair_id"], "left", 0)
    label_yaml.write_text(label_yaml.read_text().replace("[zorblax]", "[zorblax, glorp]"))
    m = main(*parse((SimulateArgs, RunArgs), ["--config", str(REPO / "configs/simulate.yaml"), "--runs_dir", str(runs),
                                              "--run", "t", "--pairs_dataset", str(path), "--annotators", "1",
                                              "--label_config", str(label_yaml)]))
    labels = LabelStore(runs / "t" / "label" / "labels.sqlite").labels()
    assert {lab["pair_id"] for lab in labels if lab["annotator"] != "alice"} == labeled - {rows[7]["pair_id"]}
    assert [lab["pair_id"] for lab in labels if lab["annotator"] == "alice"] == [rows[7]["pair_id"]]
    assert m["labels_removed"] == 1 and m["labels"] == 58


def test_the_metrics_are_of_the_pairs_labeled_now_not_of_an_earlier_pairs_dataset(tmp_path):
    """A rerun on another pairs dataset keeps the earlier dataset's labels in the store (inactive, as people's): the
    manifest's label count and shares are of this run's pairs only."""
    from stages.label.store import LabelStore

    runs = tmp_path / "runs"
    simulate(tmp_path, runs, "--temperature", "1e-6")
    _, rows = pairs_file(tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "pair_id": f"new-{r['pair_id']}"}) + "\n" for r in rows[:9]))
    m = main(*parse((SimulateArgs, RunArgs), ["--config", str(REPO / "configs/simulate.yaml"), "--runs_dir", str(runs),
                                              "--run", "t", "--pairs_dataset", str(other), "--annotators", "1",
                                              "--temperature", "1e-6"]))
    labels = LabelStore(runs / "t" / "label" / "labels.sqlite").labels()
    assert len(labels) == 69  # the 60 earlier labels stay
    now = [lab for lab in labels if lab["pair_id"].startswith("new-")]
    assert m["pairs"] == 9 and m["labels"] == m["labels_written"] == len(now) == 9
    assert m["tie_share"] == round(sum(lab["choice"] == "tie" for lab in now) / 9, 4)


def test_a_score_difference_of_exactly_tie_band_is_calibrated_on_as_it_is_labeled(tmp_path):
    """choose() decides a pair whose score difference is exactly tie_band (the band is open), so the temperature is
    calibrated on those pairs too. Judge: the length of a reply in characters; differences 0, 1 (ties), 2 (the edge),
    3, 5 and 8, with tie_band 2."""
    runs = tmp_path / "runs"
    diffs = [0, 1, 2, 3, 5, 8]
    rows = [{"pair_id": f"p{i}", "prompt": [{"role": "user", "content": f"Story {i}."}],
             "responses": ["a" * 10, "b" * (10 + d)] if i % 2 else ["b" * (10 + d), "a" * 10]}
            for i, d in enumerate(diffs)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = main(*parse((SimulateArgs, RunArgs), ["--config", str(REPO / "configs/simulate.yaml"), "--runs_dir", str(runs),
                                              "--run", "t", "--pairs_dataset", str(path), "--annotators", "1",
                                              "--judge", "tests.judge_fixtures:length_judge", "--tie_band", "2"]))
    assert m["temperature"] == pytest.approx(calibrate_temperature([2.0, 3.0, 5.0, 8.0], 0.73, 0.0), rel=1e-9)
    assert m["expected_agreement"] == pytest.approx(0.73, abs=1e-4)
    assert m["tie_share"] == round(2 / 6, 4)


def test_with_no_tie_band_a_pair_the_gold_scores_alike_is_left_out_of_the_agreement():
    """tie_band 0: the simulator decides every pair, those the gold scores alike included, and the gold has no winner
    there to agree with: such a label counts neither way, for one annotator or a majority."""
    from stages.simulate import majority_agreement_with_gold

    scores = {"a": [0.3, 0.3], "b": [0.9, 0.1]}
    got = agreement_with_gold([{"pair_id": "a", "preferred": 0}, {"pair_id": "b", "preferred": 0}], scores, tie_band=0.0)
    assert got["decided_labels"] == 1 and got["agreement_with_gold"] == 1.0
    labels = votes(("a", 0), ("a", 0), ("a", 1), ("b", 0), ("b", 0), ("b", 1))
    out = majority_agreement_with_gold(labels, scores, tie_band=0.0)
    assert out["majority_decided_pairs"] == 1 and out["majority_agreement_with_gold"] == 1.0
