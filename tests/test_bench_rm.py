"""bench/rm_rules.py: every generated pair follows its rule, and the test pairs share no prompt or sentence with the
training pairs (else the held-out accuracy would measure memory, not the rule)."""

from __future__ import annotations

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
