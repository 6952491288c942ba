"""Does the base model know which words are happy? A linear probe of its representations for VADER's word valences.

    make bench-valence-probe                     # -> bench/results/valence_probe.json (seconds)
    python -m bench.valence_probe --model models/tiny --output /tmp/probe.json

The story task's reward model must learn what makes a continuation happy from about 1,500 labelled pairs. A base that
already represents word sentiment would hand it that knowledge; one that does not leaves every word's valence to be
learned from the pairs alone. This probe asks which of the two the base is.

The words: every entry of VADER's lexicon (the gold judge's own, `vaderSentiment`) that the base's tokenizer spells as
one token after a space. For each, the representation at that token at every layer (the input embedding is layer 0),
the word placed in a neutral frame ("She said it was very <word>") so that the hidden states see it in a sentence.
A ridge regression from representation to valence, scored out of fold (10 folds; its penalty chosen by the same
folds), gives the correlation of predicted and true valence and how often the predicted sign is right. The same probe
on random Gaussian vectors of the same shape is the floor: a probe that fits noise no better than knowledge.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FRAME = "She said it was very"
PENALTIES = tuple(10.0 ** k for k in range(-2, 4))


def ridge_fit(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    """Weights and intercept minimising |y - x w - b|^2 + penalty |w|^2 (the intercept unpenalised)."""
    mean_x, mean_y = x.mean(axis=0), y.mean()
    xc = x - mean_x
    w = np.linalg.solve(xc.T @ xc + penalty * np.eye(x.shape[1]), xc.T @ (y - mean_y))
    return w, float(mean_y - mean_x @ w)


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).permutation(n) % folds


def out_of_fold(x: np.ndarray, y: np.ndarray, folds: np.ndarray, penalty: float) -> np.ndarray:
    """Each row predicted by a ridge fitted on the other folds."""
    pred = np.empty_like(y)
    for f in np.unique(folds):
        w, b = ridge_fit(x[folds != f], y[folds != f], penalty)
        pred[folds == f] = x[folds == f] @ w + b
    return pred


def probe(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> dict:
    """The out-of-fold predictions of the penalty with the lowest out-of-fold squared error, and how good they are."""
    best = min(PENALTIES, key=lambda p: float(np.mean((out_of_fold(x, y, folds, p) - y) ** 2)))
    pred = out_of_fold(x, y, folds, best)
    return {"correlation": round(float(np.corrcoef(pred, y)[0, 1]), 4),
            "sign_accuracy": round(float(np.mean(np.sign(pred) == np.sign(y))), 4), "penalty": best}


def one_token_lexicon(tokenizer, lexicon: dict) -> tuple[list[str], list[int], np.ndarray]:
    words, ids, valence = [], [], []
    for word, value in sorted(lexicon.items()):
        tokens = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(tokens) == 1 and value != 0:
            words.append(word), ids.append(tokens[0]), valence.append(value)
    return words, ids, np.array(valence, dtype=np.float64)


def layer_states(model, tokenizer, ids: list[int]) -> list[np.ndarray]:
    """[layer] -> (words, hidden) at each word's token in FRAME; layer 0 is the input embedding."""
    import torch

    frame = tokenizer.encode(FRAME, add_special_tokens=False)
    batch = torch.tensor([frame + [i] for i in ids])
    with torch.no_grad():
        hidden = model(input_ids=batch, output_hidden_states=True).hidden_states
    return [h[:, -1].double().numpy() for h in hidden]


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from pipeline.run import atomic_write_json, git_commit

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/tiny")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="bench/results/valence_probe.json")
    args = p.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    words, ids, valence = one_token_lexicon(tokenizer, SentimentIntensityAnalyzer().lexicon)
    folds = fold_ids(len(ids), args.folds, args.seed)
    states = layer_states(model, tokenizer, ids)
    layers = {str(i): probe(x, valence, folds) for i, x in enumerate(states)}
    noise = np.random.RandomState(args.seed).standard_normal(states[0].shape)
    result = {"model": args.model, "words": len(words), "frame": FRAME, "folds": args.folds,
              "layers": layers, "random_vectors": probe(noise, valence, folds),
              "positive_share": round(float(np.mean(valence > 0)), 4), "git_commit": git_commit()}
    for name, row in [*(("layer " + k, v) for k, v in layers.items()), ("random vectors", result["random_vectors"])]:
        print(f"{name:>15}  r {row['correlation']:+.3f}  sign right {row['sign_accuracy']:.3f}")
    print(f"{'every word +':>15}  sign right {result['positive_share']:.3f} (the floor a sign must beat)")
    atomic_write_json(Path(args.output), result)
    print(f"{len(words)} one-token lexicon words; wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
