"""How much can the run's labels teach at all? Bag-of-words learners on the reward model's own held-out pairs.

    make sft rm eval              # a run with labels, a reward model and its RM-gold figure
    make bench-rm-ceiling         # -> bench/results/rm_ceiling.json (about 2 minutes on 2 CPU cores)
    python -m bench.rm_ceiling --from_run runs/default --output /tmp/rm_ceiling.json

Issue 11 asks the reward model to order 85% of held-out pairs as the gold judge (VADER) does. This bench asks what
the run's labels allow any learner that must learn word valences from them. Each learner is a Bradley-Terry model
(a logistic regression without intercept) on the difference of the two replies' word counts, fitted on the pairs
the reward model trained on (the run's label export minus the reward model's held-out prompts) and scored on the
reward model's own held-out pairs (rm/eval_pairs.jsonl) whose gold scores differ, as `make eval` counts RM-gold
agreement (a tie half a point):

- all words:     every word of the training replies: a learner that knows no word's sentiment, as the tiny base
                 knows none (`make bench-valence-probe`);
- lexicon words: only the words of VADER's own lexicon: a learner *told which words carry sentiment*, which still has
                 to learn from the labels how much, and which way;

each fitted on the run's labels and on the same pairs ordered by the gold itself (noise-free labels). Its L2 penalty
is chosen by 5-fold cross-validation over the training prompts (held-out log loss), never by the test pairs. Beside
them: the lexicon oracle (VADER's valences summed, without its rules for negation, intensifiers, "but", capitals and
"!"), and the run's reward models as `make eval` measured them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

PENALTIES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def words(text: str) -> list[str]:
    """Lower-case words, apostrophes inside a word kept (curly ones made straight): VADER looks words up lower-cased."""
    return WORD.findall(text.lower().replace("\u2019", "'"))


def counts(texts: list[str], vocab: list[str]) -> np.ndarray:
    """(texts, vocab) word counts; words outside vocab are not counted."""
    index = {w: i for i, w in enumerate(vocab)}
    out = np.zeros((len(texts), len(vocab)))
    for row, text in enumerate(texts):
        for w in words(text):
            if w in index:
                out[row, index[w]] += 1
    return out


def fit(diff: np.ndarray, penalty: float) -> np.ndarray:
    """Word valences w minimising sum_i log(1 + exp(-diff_i . w)) + penalty * |w|^2, where diff_i is the chosen reply's
    counts minus the rejected one's (Bradley-Terry on bags of words)."""
    import torch

    # Sparse: a pair's counts touch a few dozen words of thousands, so each of LBFGS's products costs its nonzeros, not
    # pairs x words (the same w to 1e-13, 9x faster on 3,000 random pairs of 2,000 words; the default run's figures to
    # the digit)
    x = torch.tensor(diff, dtype=torch.float64).to_sparse()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-torch.sparse.mm(x, w[:, None]).squeeze(1)).sum() + penalty * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def log_loss(diff: np.ndarray, w: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, -(diff @ w))))


def choose_penalty(diff: np.ndarray, groups: list[str], folds: int = 5, seed: int = 0) -> float:
    """The penalty with the lowest held-out log loss over `folds` folds of whole groups (prompts)."""
    keys = sorted(set(groups))
    np.random.RandomState(seed).shuffle(keys)
    fold_of = {k: i % folds for i, k in enumerate(keys)}
    fold = np.array([fold_of[g] for g in groups])

    def cv_loss(penalty: float) -> float:
        return float(np.mean([log_loss(diff[fold == f], fit(diff[fold != f], penalty)) for f in range(folds)]))

    return min(PENALTIES, key=cv_loss)


def agreement(score_chosen, score_rejected, gold_chosen, gold_rejected) -> float:
    from stages.eval_ppo import gold_agreement

    return round(gold_agreement(list(score_chosen), list(score_rejected), list(gold_chosen), list(gold_rejected))["agreement"], 4)


def lexicon_sum(texts: list[str], lexicon: dict) -> list[float]:
    return [sum(lexicon.get(w, 0.0) for w in words(t)) for t in texts]


def learner(vocab: list[str], train: dict, test: dict, gold_order: bool) -> dict:
    """Fit on the training pairs (with their labels, or ordered by the gold) and score the test pairs."""
    diff = counts(train["chosen"], vocab) - counts(train["rejected"], vocab)
    if gold_order:  # the gold's winner as `chosen`; pairs the gold scores equal keep their label
        flip = np.array(train["gold_chosen"]) < np.array(train["gold_rejected"])
        diff[flip] *= -1
    penalty = choose_penalty(diff, train["groups"])
    w = fit(diff, penalty)
    return {"agreement": agreement(counts(test["chosen"], vocab) @ w, counts(test["rejected"], vocab) @ w,
                                   test["gold_chosen"], test["gold_rejected"]),
            "penalty": penalty, "words": len(vocab)}


def read_pairs(run_dir: Path) -> tuple[dict, dict, str]:
    """The reward model's training pairs (the label export minus its held-out prompts, ties left out as the reward model
    leaves them out of its held-out pairs) and its held-out pairs, as reply texts with prompt groups; the run's judge."""
    from bench.rm_limit import read_run, reply_text
    from stages.rm_data import prompt_key

    rows, judge = read_run(run_dir)  # the label export without ties, and the judge its annotators used
    held = [json.loads(line) for line in (run_dir / "rm" / "eval_pairs.jsonl").read_text().splitlines() if line.strip()]
    held_prompts = {prompt_key(r, i) for i, r in enumerate(held)}
    train_rows = [r for i, r in enumerate(rows) if prompt_key(r, i) not in held_prompts]

    def as_pairs(part: list[dict]) -> dict:
        return {"prompts": [r["prompt"] for r in part], "groups": [prompt_key(r, i) for i, r in enumerate(part)],
                "chosen": [reply_text(r["chosen"]) for r in part], "rejected": [reply_text(r["rejected"]) for r in part]}

    return as_pairs(train_rows), as_pairs(held), judge


def main(argv=None) -> int:
    from pipeline.config import REPO_ROOT
    from pipeline.judges import judge_scores, load_judge
    from pipeline.run import atomic_write_json, git_commit

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from_run", default="runs/default", help="A run with a label export and a reward model (make sft rm).")
    p.add_argument("--output", default="bench/results/rm_ceiling.json")
    args = p.parse_args(argv)
    run_dir = REPO_ROOT / args.from_run
    for need, make in (("label-export/manifest.json", "make sft rm"), ("rm/eval_pairs.jsonl", "make rm")):
        if not (run_dir / need).is_file():
            print(f"error: {args.from_run} has no {need}: run `{make}` first (or pass --from_run)", file=sys.stderr)
            return 2
    train, test, judge_spec = read_pairs(run_dir)
    if judge_spec != "sentiment":
        print(f"error: {args.from_run} was labelled against the judge {judge_spec!r}; this bench needs the sentiment "
              "judge, whose lexicon it reads", file=sys.stderr)
        return 2
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    judge, lexicon = load_judge(judge_spec), SentimentIntensityAnalyzer().lexicon
    for part in (train, test):
        part["gold_chosen"] = judge_scores(judge, part["prompts"], part["chosen"])
        part["gold_rejected"] = judge_scores(judge, part["prompts"], part["rejected"])
    vocab = sorted({w for side in ("chosen", "rejected") for t in train[side] for w in words(t)})
    lexicon_vocab = [w for w in vocab if w in lexicon]
    decided = [(c > r) for c, r in zip(train["gold_chosen"], train["gold_rejected"]) if c != r]
    result = {
        "run": args.from_run, "train_pairs": len(train["chosen"]), "test_pairs": len(test["chosen"]),
        "test_pairs_gold_differs": sum(c != r for c, r in zip(test["gold_chosen"], test["gold_rejected"])),
        "train_labels_agree_with_gold": round(sum(decided) / len(decided), 4) if decided else None,
        "learners": {name: {"labels": learner(v, train, test, gold_order=False),
                            "gold": learner(v, train, test, gold_order=True)}
                     for name, v in (("all_words", vocab), ("lexicon_words", lexicon_vocab))},
        "lexicon_oracle": agreement(lexicon_sum(test["chosen"], lexicon), lexicon_sum(test["rejected"], lexicon),
                                    test["gold_chosen"], test["gold_rejected"]),
    }
    report = run_dir / "eval" / "report.json"
    if report.is_file():
        rm = json.loads(report.read_text()).get("gold", {}).get("rm_agreement_heldout_pairs") or {}
        result["reward_models"] = {"agreement": rm.get("agreement") and round(rm["agreement"], 4), "pairs": rm.get("pairs")}
    result["git_commit"] = git_commit()
    print(f"{result['train_pairs']} training pairs ({result['train_labels_agree_with_gold']} of their labels the gold's "
          f"choice), {result['test_pairs_gold_differs']} held-out pairs whose gold differs")
    for name, by in result["learners"].items():
        print(f"{name:>14} ({by['labels']['words']} words): run's labels {by['labels']['agreement']:.3f}, "
              f"noise-free {by['gold']['agreement']:.3f}")
    print(f"{'lexicon oracle':>14}: {result['lexicon_oracle']:.3f}")
    if "reward_models" in result:
        print(f"{'reward models':>14}: {result['reward_models']['agreement']} (make eval)")
    atomic_write_json(Path(args.output), result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
