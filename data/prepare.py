"""Build the bundled datasets in data/ from snapshots of their licensed sources (a maintainer tool).

    python data/prepare.py --shared DIR     # DIR: one folder per source, as data/sources/<name>/SOURCE.json describes

The pipeline itself never reads those snapshots: it reads the files this script writes (committed), each source's
LICENSE, README and SOURCE.json sit in data/sources/<name>/. Outputs:

- data/sft/{oasst,self_instruct,gsm8k}.jsonl   {"messages": [...]}          SFT mixture (configs/sft.yaml)
- data/prompts/oasst_{pairs,ppo}_prompts.jsonl  {"prompt": [user message]}    pairs; PPO / eval prompts (disjoint
  halves, so the prompts PPO and eval use are new to the reward model, as the story recipe's)
- data/preferences/{oasst,pandalm,tulu}.jsonl  {"prompt","chosen","rejected"} TRL conversational preference format
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def user(text):
    return {"role": "user", "content": text.strip()}


def assistant(text):
    return {"role": "assistant", "content": str(text).strip()}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path.relative_to(HERE.parent)}: {len(rows)} rows")


def human(m):
    return not m.get("synthetic") and not m.get("deleted") and m.get("review_result", True) is not False


def oasst(src: Path):
    """SFT: every path root -> best-ranked human assistant reply. Preferences: sibling replies ordered by rank."""
    sft, prefs = [], []

    def walk(msg, history):
        turn = user(msg["text"]) if msg["role"] == "prompter" else assistant(msg["text"])
        history = history + [turn]
        replies = [r for r in msg.get("replies", []) if human(r)]
        if msg["role"] == "prompter":
            ranked = sorted((r for r in replies if r.get("rank") is not None), key=lambda r: r["rank"])
            if ranked:
                sft.append({"messages": history + [assistant(ranked[0]["text"])]})
            for i in range(len(ranked)):
                for j in range(i + 1, len(ranked)):
                    if ranked[i]["rank"] < ranked[j]["rank"] and ranked[i]["text"].strip() != ranked[j]["text"].strip():
                        prefs.append({"prompt": history, "chosen": [assistant(ranked[i]["text"])],
                                      "rejected": [assistant(ranked[j]["text"])], "source": "oasst"})
        for r in replies:
            walk(r, history)

    for line in open(src / "en_100_tree.jsonl"):
        tree = json.loads(line)
        if human(tree["prompt"]):
            walk(tree["prompt"], [])
    prompts = [{"prompt": [user(json.loads(line))]} for line in open(src / "prompt_lottery_en_250_text.jsonl")]
    return sft, prefs, prompts


def self_instruct(src: Path):
    rows = []
    for name in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl"):
        for line in open(src / name):
            task = json.loads(line)
            for inst in task["instances"]:
                prompt = task["instruction"] + (f"\n\n{inst['input']}" if inst.get("input") else "")
                if inst.get("output", "").strip():
                    rows.append({"messages": [user(prompt), assistant(inst["output"])]})
    return rows


def gsm8k(src: Path, n: int, seed: int):
    rows = [json.loads(line) for line in open(src / "train.jsonl")]
    random.Random(seed).shuffle(rows)
    # The <<48/2=24>> calculator annotations are tool calls in the source; plain text reads better.
    import re

    return [{"messages": [user(r["question"]), assistant(re.sub(r"<<[^>]*>>", "", r["answer"]))]} for r in rows[:n]]


def pandalm(src: Path):
    """Three annotators: 1 = response1 better, 2 = response2 better, 0 = tie. Majority, ties dropped."""
    rows = []
    for item in json.load(open(src / "testset-v1.json")):
        votes = Counter(item[f"annotator{i}"] for i in (1, 2, 3))
        winner, count = votes.most_common(1)[0]
        if winner == 0 or count < 2:
            continue
        prompt = item["instruction"] + (f"\n\n{item['input']}" if item.get("input") else "")
        good, bad = (item["response1"], item["response2"]) if winner == 1 else (item["response2"], item["response1"])
        rows.append({"prompt": [user(prompt)], "chosen": [assistant(good)], "rejected": [assistant(bad)], "source": "pandalm"})
    return rows


def tulu(src: Path):
    rows = []
    for line in open(src / "eval_annotations_tulu_1.jsonl"):
        a = json.loads(line)
        pref = a.get("preference") or ""
        if pref.startswith("a-is"):
            good, bad = a["completion_a"], a["completion_b"]
        elif pref.startswith("b-is"):
            good, bad = a["completion_b"], a["completion_a"]
        else:  # "tie" and missing preferences carry no direction
            continue
        rows.append({"prompt": [user(a["prompt"])], "chosen": [assistant(good)], "rejected": [assistant(bad)], "source": "tulu"})
    return rows


def halves(rows: list, seed: int) -> tuple[list, list]:
    """A seeded half of the rows and the other half, each in the source's order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    first = set(order[: len(rows) // 2])
    return [r for i, r in enumerate(rows) if i in first], [r for i, r in enumerate(rows) if i not in first]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", required=True, help="folder of source snapshots (repository and commit: data/sources/*/SOURCE.json)")
    ap.add_argument("--gsm8k", type=int, default=300)
    args = ap.parse_args()
    shared = Path(args.shared)
    sft, prefs, prompts = oasst(shared / "sft_and_preferences_oasst_en100")
    write_jsonl(HERE / "sft" / "oasst.jsonl", sft)
    write_jsonl(HERE / "sft" / "self_instruct.jsonl", self_instruct(shared / "instructions_self_instruct_human"))
    write_jsonl(HERE / "sft" / "gsm8k.jsonl", gsm8k(shared / "instructions_gsm8k", args.gsm8k, seed=0))
    pairs_prompts, ppo_prompts = halves(prompts, seed=0)
    write_jsonl(HERE / "prompts" / "oasst_pairs_prompts.jsonl", pairs_prompts)
    write_jsonl(HERE / "prompts" / "oasst_ppo_prompts.jsonl", ppo_prompts)
    write_jsonl(HERE / "preferences" / "oasst.jsonl", prefs)
    write_jsonl(HERE / "preferences" / "pandalm.jsonl", pandalm(shared / "preferences_pandalm_human_testset"))
    write_jsonl(HERE / "preferences" / "tulu.jsonl", tulu(shared / "preferences_tulu1_human_eval"))


if __name__ == "__main__":
    main()
