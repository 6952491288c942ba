"""Build the story-continuation task in data/story/ from the bundled children's books (data/pretrain/texts/).

    python data/story/build.py            # writes sft.jsonl, pairs_prompts.jsonl, ppo_prompts.jsonl (committed)
    python data/story/build.py --more_pairs_prompts 4 --output /tmp/pairs_prompts_x4.jsonl   # not committed: below

The default recipe's task is Ziegler et al. 2019's "continue the story, happily" on our own base:
- sft.jsonl: {"messages": [user: a story opening (a few sentences), assistant: the next sentence or two]}, cut from
  the books the base model was TRAINED on. SFT teaches the chat format and to stop (EOS) after a sentence or two.
- pairs_prompts.jsonl, ppo_prompts.jsonl: {"prompt": [user: a story opening]}, from the books the base model
  never saw (`heldout_books` in configs/base.yaml): the pairs stage (simulated or human labels for the reward
  model) and PPO (whose held-out share `make eval` uses) get disjoint halves, so eval prompts are new to the RM too.

--more_pairs_prompts N writes N times pairs_prompts.jsonl's openings: its own, then openings of training-book windows
that sft.jsonl does not use (the base saw those books, SFT never saw these openings). `make pairs PAIRS_ARGS=
"--prompts_file FILE"` then samples pairs of them: how far more labelled openings lift the reward model (README,
`bench.rm_limit --conditions labels half quarter`).

Lengths are measured with the base's own tokenizer, so every prompt fits PPO's max_prompt_length after the chat
template and every reply fits its response_length. Openings and replies holding a word of configs/label.yaml's
offensive_words are left out (annotators see these prompts). Deterministic: same books, same files.
"""

from __future__ import annotations

import functools
import json
import random
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

SEED = 0
SFT_ROWS = 4000
OPENING_SENTENCES = 3  # at most: a few sentences of context, as Ziegler et al. 2019's book-corpus prompts
REPLY_SENTENCES = 2  # at most
OPENING_TOKENS = (10, 48)  # + the chat template's 8 tokens stays under PPO's max_prompt_length of 64
REPLY_TOKENS = (4, 28)  # + EOS fits PPO's response_length of 32
ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Messrs.", "Mt.")
SENTENCE = re.compile(r".+?[.!?]+[’”\"')]*(?=\s|$)")


def paragraphs(text: str) -> list[str]:
    """Hard-wrapped lines joined. Left out: the title block (the first paragraph) and headings (CHAPTER I., lines in
    capitals), which are not story text; short lines of dialogue ("No.") stay, so the sentence stream is contiguous."""
    out = []
    for p in re.split(r"\n\s*\n", text)[1:]:
        p = re.sub(r"\s+", " ", p).strip()
        letters = [c for c in p if c.isalpha()]
        if not letters or sum(c.isupper() for c in letters) > 0.6 * len(letters):
            continue
        if re.match(r"^(CHAPTER|Chapter|BOOK|PART)\b", p):
            continue
        out.append(p)
    return out


def sentences(paragraph: str) -> list[str]:
    """Sentences in order; a tail without end punctuation ("axis--'") is one too, so that no text goes missing
    between two sentences that end up side by side in an opening."""
    found = SENTENCE.findall(paragraph)
    tail = paragraph[sum(len(s) for s in found):].strip() if found else paragraph.strip()
    merged = []
    for s in (s.strip() for s in found + ([tail] if tail else [])):
        if merged and merged[-1].endswith(ABBREVIATIONS):  # "Mr. McGregor" is one sentence
            merged[-1] += " " + s
        else:
            merged.append(s)
    return merged


def stream(text: str) -> list[str]:
    """A book as one list of sentences (a story opening may run over a paragraph break)."""
    return [s for p in paragraphs(text) for s in sentences(p)]


def take(sents: list[str], i: int, max_sents: int, max_tokens: int, n_tokens) -> int:
    """How many sentences from sents[i] fit in max_tokens (at most max_sents); 0 if not even one."""
    k, total = 0, 0
    while k < max_sents and i + k < len(sents) and total + n_tokens(sents[i + k]) <= max_tokens:
        total += n_tokens(sents[i + k])
        k += 1
    return k


def windows(sents: list[str], n_tokens, reply: bool):
    """Consecutive, non-overlapping (opening, reply) windows: as many sentences as fit the token limits."""
    i = 0
    while i < len(sents):
        k = take(sents, i, OPENING_SENTENCES, OPENING_TOKENS[1], n_tokens)
        r = take(sents, i + k, REPLY_SENTENCES, REPLY_TOKENS[1], n_tokens) if reply and k else 0
        opening, follow = " ".join(sents[i:i + k]), " ".join(sents[i + k:i + k + r])
        i += max(1, k + r)
        if k == 0 or n_tokens(opening) < OPENING_TOKENS[0]:
            continue
        if reply and (r == 0 or n_tokens(follow) < REPLY_TOKENS[0]):
            continue
        yield opening, follow


def build(books_dir: Path, heldout: list[str], tokenizer, blocked) -> dict[str, list[dict]]:
    @functools.cache
    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rng = random.Random(SEED)
    sft, prompts = [], []
    for path in sorted(books_dir.glob("*.txt")):
        sents = stream(path.read_text())
        if path.stem in heldout:
            for opening, _ in windows(sents, n_tokens, reply=False):
                row = {"prompt": [{"role": "user", "content": opening}]}
                if not blocked({"prompt": row["prompt"], "responses": []}):
                    prompts.append(row)
        else:
            for opening, follow in windows(sents, n_tokens, reply=True):
                row = {"messages": [{"role": "user", "content": opening}, {"role": "assistant", "content": follow}]}
                if not blocked({"prompt": row["messages"][:1], "responses": [follow]}):
                    sft.append(row)
    rng.shuffle(sft)
    rng.shuffle(prompts)
    half = len(prompts) // 2
    return {"sft.jsonl": sft[:SFT_ROWS], "pairs_prompts.jsonl": prompts[:half], "ppo_prompts.jsonl": prompts[half:],
            "spare": [{"prompt": row["messages"][:1]} for row in sft[SFT_ROWS:]]}  # the windows SFT leaves unused


def more_pairs_prompts(files: dict[str, list[dict]], times: int) -> list[dict]:
    """`times` x as many openings as pairs_prompts.jsonl: its own first, then the spare training-book openings in order."""
    own = files["pairs_prompts.jsonl"]
    extra = (times - 1) * len(own)
    if extra > len(files["spare"]):
        raise SystemExit(f"error: --more_pairs_prompts {times}: only {len(files['spare'])} spare openings, "
                         f"{extra} needed; ask for at most {1 + len(files['spare']) // len(own)}")
    return own + files["spare"][:extra]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None) -> None:
    import argparse

    from transformers import AutoTokenizer

    from stages.label.config import word_filter

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--more_pairs_prompts", type=int, default=0, metavar="N",
                   help="Write N x pairs_prompts.jsonl's openings to --output instead of the committed files.")
    p.add_argument("--output", type=Path, help="Where --more_pairs_prompts writes (a .jsonl path).")
    args = p.parse_args(argv)
    if args.more_pairs_prompts and (args.more_pairs_prompts < 2 or not args.output):
        p.error("--more_pairs_prompts takes N >= 2 and an --output path")
    base_cfg = yaml.safe_load((REPO / "configs/base.yaml").read_text())
    label_cfg = yaml.safe_load((REPO / "configs/label.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(REPO / "models/tiny")
    files = build(REPO / base_cfg["text_dir"], base_cfg["heldout_books"], tokenizer, word_filter(label_cfg["offensive_words"]))
    if args.more_pairs_prompts:
        rows = more_pairs_prompts(files, args.more_pairs_prompts)
        write_jsonl(args.output, rows)
        print(f"{args.output}: {len(rows)} rows")
        return
    for name in ("sft.jsonl", "pairs_prompts.jsonl", "ppo_prompts.jsonl"):
        write_jsonl(HERE / name, files[name])
        print(f"data/story/{name}: {len(files[name])} rows")


if __name__ == "__main__":
    main()
