"""bench/rm_rules.py: every generated pair follows its rule, and the test pairs share no prompt or sentence with the
training pairs (else the held-out accuracy would measure memory, not the rule)."""

from __future__ import annotations

import pytest

from bench.rm_rules import RULES, WORD, rule_pairs, split_pools


def reply(row, key):
    return row[key][0]["content"]


def test_each_rule_holds_in_every_pair_and_test_pairs_are_new():
    pools = split_pools(0)
    assert not set(pools["train"][0]) & set(pools["test"][0]) and not set(pools["train"][1]) & set(pools["test"][1])
    for rule in RULES:
        train, test = rule_pairs(rule, 300, 1, *pools["train"]), rule_pairs(rule, 300, 2, *pools["test"])
        assert len(train) == len(test) == 300
        for row in train + test:
            c, r = reply(row, "chosen"), reply(row, "rejected")
            assert c != r
            if rule == "word":
                assert WORD in c.split() and WORD not in r.split() and len(c.split()) == len(r.split())
            elif rule == "shorter":
                assert len(c.split()) < len(r.split())
            elif rule == "question":
                assert c.endswith("?") and r.endswith(".") and c[:-1] == r[:-1]
            else:
                assert c == r.upper() and c != r
        train_texts = {reply(row, "rejected") for row in train} | {row["prompt"][0]["content"] for row in train}
        test_texts = {reply(row, "rejected") for row in test} | {row["prompt"][0]["content"] for row in test}
        if rule != "shorter":  # its rejected replies are joined sentences: checked through the pools above
            assert not train_texts & test_texts


def test_shorter_rejected_replies_are_at_least_five_words_longer():
    pools = split_pools(0)
    for row in rule_pairs("shorter", 300, 1, *pools["train"]):
        assert len(reply(row, "rejected").split()) >= len(reply(row, "chosen").split()) + 5


def test_test_accuracy_reads_the_chosen_scores_first(monkeypatch):
    from bench import rm_rules

    monkeypatch.setattr(rm_rules, "saved_adapter_scores", lambda adapter, rows: [2.0, 3.0, 1.0, 0.0, 1.0, 5.0])
    got = rm_rules.test_accuracy("adapter", [{}, {}, {}])
    assert (got["accuracy"], got["mean_margin"], got["pairs"]) == (0.6667, 0.0, 3)  # 2 of 3; (2 + 2 - 4) / 3


def test_run_stage_trains_one_reward_model_on_the_file(monkeypatch, tmp_path):
    import subprocess

    from bench import rm_rules

    cmds = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: cmds.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    assert rm_rules.run_stage(tmp_path / "d.jsonl", tmp_path, "r", "m.yaml", ["--seed", "3"])[0] == 0
    cmd = cmds[0]
    assert cmd[cmd.index("--dataset_name") + 1] == str(tmp_path / "d.jsonl")
    assert cmd[cmd.index("--ensemble") + 1] == "1" and cmd[-2:] == ["--seed", "3"]
    # bad input: the stage's error line alone, not accelerate's traceback after it
    stderr = "warning: x\nerror: unknown command-line argument(s) ['--bogus']\nTraceback (most recent call last):\n  ..."
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2, "", stderr))
    rc, _, err = rm_rules.run_stage(tmp_path / "d.jsonl", tmp_path, "r", "m.yaml", [])
    assert (rc, err) == (2, "error: unknown command-line argument(s) ['--bogus']")


def test_main_tests_on_new_pairs_and_exits_1_when_a_stage_fails(monkeypatch, tmp_path):
    """The test pairs are their own (the test pools, another seed), never the training file's; a failed stage is
    recorded and the bench exits 1."""
    import json

    from bench import rm_rules

    trained, tested, rcs = [], [], [0, 1]

    def fake_run_stage(data_file, runs_dir, run, model_config, overrides):
        trained.append([json.loads(line) for line in data_file.read_text().splitlines()])
        metrics = {"train_pairs": 1, "eval_pairs": 1, "eval_accuracy": 1.0, "steps": 1, "plan_epochs": 1,
                   "best_step": 1, "truncated_responses": 0}
        (runs_dir / run / "rm").mkdir(parents=True, exist_ok=True)
        (runs_dir / run / "rm" / "manifest.json").write_text(json.dumps({"metrics": metrics}))
        return rcs.pop(0), 1.0, "boom"

    monkeypatch.setattr(rm_rules, "no_op_sft", lambda runs_dir, run, model_config: None)
    monkeypatch.setattr(rm_rules, "run_stage", fake_run_stage)
    monkeypatch.setattr(rm_rules, "test_accuracy", lambda adapter, rows: tested.append(rows) or {"accuracy": 1.0})
    out = tmp_path / "rm.json"
    argv = ["--rules", "question", "capitals", "--train_pairs", "20", "--test_pairs", "10", "--work_dir",
            str(tmp_path / "w"), "--output", str(out)]
    assert rm_rules.main(argv) == 1
    res = json.loads(out.read_text())["rules"]
    assert res["question"]["test"] == {"accuracy": 1.0} and res["capitals"] == {"returncode": 1}
    train, test = trained[0], tested[0]
    assert len(train) == 20 and len(test) == 10
    texts = lambda rows: {reply(r, "rejected") for r in rows} | {r["prompt"][0]["content"] for r in rows}  # noqa: E731
    assert not texts(train) & texts(test)


def test_a_reply_drawn_with_the_word_already_is_drawn_again_until_it_has_none():
    """make_pair redraws a reply that already holds "certainly" as often as it takes: else the word rule's rejected
    reply would hold the word too (and the question and capitals pairs would teach it)."""
    import random

    from bench.rm_rules import make_pair

    pool = ["Certainly it was late.", "It was certainly cold then.", "She certainly knew the way home.",
            "The cat sat on the mat."]
    for seed in range(40):
        for rule in ("word", "question", "capitals"):  # the rules whose two replies are one drawn reply
            chosen, rejected = make_pair(rule, random.Random(seed), pool)
            assert WORD not in rejected.lower(), (seed, rule, rejected)


def test_saved_adapter_scores_are_the_summing_heads_reply_sums(tmp_path):
    """The rule benches' test accuracy rests on saved_adapter_scores: a reward adapter saved with pooling sum, loaded
    as stock peft loads it, scores each reply as the per-token head summed over the reply's own tokens (pool_scores
    from the reply's start), chosen replies first, then rejected ones; read at the last token it would be another
    reward model than the one trained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bench import story
    from bench.rm_rules import saved_adapter_scores
    from pipeline.adapters import pool_scores, read_pooling
    from stages.rm_data import encode_pair, reply_start

    base = story.micro_base(tmp_path)
    _, rm = story.micro_adapters(tmp_path, base)
    assert read_pooling(rm) == "sum"
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for p, c, r in (("Tell a story.", "They were happy.", "It rained all day long."),
                            ("The fox ran home.", "He was glad", "No."))]
    got = saved_adapter_scores(rm, rows)

    tok = AutoTokenizer.from_pretrained(rm)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(model, rm).eval().get_base_model()
    want = {"chosen": [], "rejected": []}
    for r in rows:
        chosen, rejected = encode_pair(tok, r)
        start = reply_start(tok, r, chosen, rejected)
        for side, seq in (("chosen", chosen), ("rejected", rejected)):
            ids = torch.tensor([seq])
            with torch.no_grad():
                per_token = model.score(model.model(input_ids=ids).last_hidden_state)[..., 0]
            want[side].append(float(pool_scores(per_token, ids, torch.ones_like(ids), tok.pad_token_id, "sum",
                                                torch.tensor([start]))[0]))
    assert got == pytest.approx(want["chosen"] + want["rejected"], abs=1e-5)
    assert abs(got[0] - got[2]) > 1e-3  # the two replies of a pair score apart: the check can tell them
