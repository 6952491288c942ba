"""The reward model's data: preference rows in any TRL format (this run's label export, the bundled mixture or
--dataset_name) -> explicit pairs -> token ids exactly as RewardTrainer tokenizes them -> pairs over max_length cut
(the prompt keeps its end, each response its beginning and end) -> a split by prompt -> per-source weights.
DPO reads its pairs through the same functions, so both stages hold out the same prompts."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from pipeline.config import ConfigError, resolve_path
from pipeline.data import (check_dataset_exists, conversation_root, load_any, messages_problem, require_columns,
                           text_problem, train_eval_split)
from pipeline.chat import TEMPLATE_KWARGS
from pipeline.generation import chat_ids, common_prefix
from pipeline.run import StageRun, read_manifest, stage_dir

if TYPE_CHECKING:
    from stages.rm import RMArgs

LABEL_EXPORT = "label-export"  # mixture key for this run's own labels (runs/<run>/label-export/manifest.json)
# Llama 2's small-margin scale (Touvron et al. 2023, table 28): "much better" 1, "slightly better" 1/3.
STRENGTH_WORDS = {"much": 1.0, "significantly": 1.0, "better": 2 / 3, "slightly": 1 / 3, "slight": 1 / 3,
                  "negligibly": 0.0, "unsure": 0.0}


def check_eval_fraction(eval_fraction: float) -> None:
    """The reward model and DPO measure themselves on held-out prompts (the reward model's also give PPO its reward's
    mean and std): a share of them above 0 and below 1. 0 was refused only after loading, as "too few prompts"."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction {eval_fraction} must be above 0 and below 1: the held-out prompts' pairs are "
                         f"what the stage is measured on (0.2 by default)")


def checked_mixture(mixture: dict | str) -> dict:
    """dataset_mixture (a dict, or JSON from the command line) with only known keys and no negative weight; a
    ValueError the argument parser turns into one line naming the flag or the YAML key. DPO shares it."""
    if isinstance(mixture, str):
        mixture = json.loads(mixture)
    for key, spec in mixture.items():
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"dataset_mixture['{key}'] is {spec!r}: give {{weight: W, max_rows: N}} (or {{}} for "
                             f"weight 1, every row)")
        for name, value in (spec or {}).items():
            if name in ("weight", "max_rows") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"dataset_mixture['{key}'] has {name} {value!r}: it must be a number")
        unknown = set(spec or {}) - {"weight", "max_rows"}
        if unknown:
            raise ValueError(f"dataset_mixture['{key}'] has unknown key(s) {sorted(unknown)}: use weight, max_rows")
        rows = (spec or {}).get("max_rows", 0)
        if not isinstance(rows, int) or rows < 0:  # -5 kept all but 5 pairs, 0.5 none (rows[:0]); SFTArgs' rule
            raise ValueError(f"dataset_mixture['{key}'] has max_rows {rows!r}: give the pairs to keep from it, a whole "
                             f"number (0 = all)")
        if float((spec or {}).get("weight", 1.0)) < 0:
            raise ValueError(f"dataset_mixture['{key}'] has a negative weight")
        if key != LABEL_EXPORT:  # at parse, so that `make` says so before the upstream stages train
            check_dataset_exists(key, "--dataset_mixture")
    return mixture

def is_empty(response) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return not response or all(not str(m.get("content") or "").strip() for m in response)


def strength_value(value, column: str) -> float:
    if value is None or value == "":
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    words = str(value).strip().lower().split()
    word = words[0] if words else ""
    if word not in STRENGTH_WORDS:
        raise ConfigError(f"label strength {value!r} in column '{column}' is neither a number nor one of "
                          f"{sorted(STRENGTH_WORDS)}")
    return STRENGTH_WORDS[word]


def is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def preference_problem(row: dict) -> str | None:
    """Why a row is not a preference pair, or None: chosen and rejected each a text or a conversation (a list of
    {"role": text, "content": text}), the prompt (optional) too, all of one kind."""
    for key in ("prompt", "chosen", "rejected"):
        value = row.get(key)
        if key == "prompt" and value is None:
            continue
        if value is None:  # a JSONL row without the key reads as null (the file's other rows have it)
            return f"'{key}' is missing (or null): every row needs both 'chosen' and 'rejected'"
        problem = text_problem(value) if isinstance(value, str) else messages_problem(value)
        if problem:
            return f"'{key}': {problem}"
    return None


def conversation_holds(prompt: list, text: str) -> bool:
    """Whether a text prompt is a user turn of the conversations' shared start (HuggingFaceH4/ultrafeedback_binarized:
    a `prompt` text beside whole conversations), so that TRL's extracted prompt loses nothing."""
    return any(m["role"] == "user" and m["content"].strip() == text.strip() for m in prompt)


def as_conversation(pair: dict) -> dict:
    """A plain-text pair with its prompt as a conversation: the prompt a user turn, each reply an assistant turn. As
    text, RewardTrainer (and DPO) trained on prompt + reply + EOS without the chat template, while PPO and eval score
    the templated conversation (chat_reward_inputs): the reward model was asked about inputs it never saw. SFT reads
    prompt-completion rows the same way (stages.sft.prompt_completion_as_messages)."""
    return {"prompt": [{"role": "user", "content": pair["prompt"]}],
            **{k: [{"role": "assistant", "content": pair[k]}] for k in ("chosen", "rejected")}}


def to_pairs(ds, source: str, args: RMArgs, counts: dict, source_column: bool = False,
             origin: str | None = None, templated: bool = True) -> list[dict]:
    """Rows -> {prompt, chosen, rejected, source, margin, tie}; equal or empty pairs dropped, counted per source.
    `origin`: the file or Hub id the rows came from, for the errors (default: `source`).

    Implicit-prompt rows (chosen/rejected hold the whole conversation or text) get their shared prefix as the
    prompt, as TRL does, so that every pair has a prompt to split on."""
    from trl.data_utils import maybe_extract_prompt

    pairs = []
    for i, row in enumerate(ds):
        where = f"{origin or source} row {i + 1}"
        problem = preference_problem(row)
        if problem:
            raise ConfigError(f"{where}: {problem}: give 'chosen' and 'rejected' (and optionally 'prompt') "
                              f"as texts or as lists of {{'role', 'content'}} messages")
        name = str(row["source"]) if source_column else source
        counts[name]["read"] += 1
        if row["chosen"] == row["rejected"]:
            counts[name]["equal"] += 1
            continue
        # Before TRL's extract_prompt, which fails on an empty text (UnboundLocalError) and makes a blank one look full.
        if is_empty(row["chosen"]) or is_empty(row["rejected"]):
            counts[name]["empty"] += 1
            continue
        given = {k: row[k] for k in ("prompt", "chosen", "rejected") if row.get(k) is not None}
        # The kinds as given: TRL's maybe_extract_prompt drops a prompt of the other kind than the replies and takes the
        # replies' shared start instead, which is nothing when they are the assistant turns alone.
        if len({is_messages(v) for v in given.values()}) > 1:
            replies = is_messages(row["chosen"]) and is_messages(row["rejected"])
            kept = maybe_extract_prompt(given)["prompt"] if replies else []
            if not (isinstance(row.get("prompt"), str) and conversation_holds(kept, row["prompt"])):
                raise ConfigError(f"{where} mixes plain-text and conversational fields: give prompt, chosen and "
                                  f"rejected all as strings or all as lists of {{'role', 'content'}} messages (a text "
                                  f"prompt as [{{'role': 'user', 'content': ...}}])")
        if isinstance(row["chosen"], str) and "prompt" not in given and row["chosen"][0] != row["rejected"][0]:
            # Nothing shared. TRL's extract_prompt would look at chosen[-1] here: "Yes " vs "No" became " " vs "o".
            ex = {"prompt": "", "chosen": row["chosen"], "rejected": row["rejected"]}
        elif templated and all(isinstance(v, str) for v in given.values()) and not is_empty(given.get("prompt", "")):
            ex = as_conversation(given)
        else:
            ex = maybe_extract_prompt(given)
        if is_empty(ex["chosen"]) or is_empty(ex["rejected"]):  # a conversation whose differing part is blank
            counts[name]["empty"] += 1
            continue
        strength = strength_value(row.get(args.margin_column), args.margin_column) if args.margin_scale else 0.0
        # A tie exported in both orders (label-export's is_tie) trains the rewards together; it has no right answer.
        pairs.append({"prompt": ex["prompt"], "chosen": ex["chosen"], "rejected": ex["rejected"], "source": name,
                      "margin": args.margin_scale * strength, "tie": bool(row.get("is_tie")),
                      "implicit_prompt": "prompt" not in given})
    return pairs


def load_pairs(args: RMArgs, stage: StageRun, seed: int, templated: bool = True) -> tuple[list[dict], dict, dict, str]:
    """All usable pairs, the per-source weights, per-source counts (read, dropped), and a readable name of the data.
    `templated`: the tokenizer has a chat template, so plain-text pairs with a prompt are read as conversations (as
    text for a base without one, whose PPO scores the policy's plain tokens: reward_input tokens)."""
    fix = "give preference rows with 'chosen' and 'rejected' (and optionally 'prompt') in a TRL preference format"
    counts: dict = defaultdict(Counter)
    if args.dataset_name:
        ds = load_any(args.dataset_name, args.dataset_split)
        require_columns(ds, ["chosen", "rejected"], args.dataset_name, fix)
        name = Path(args.dataset_name).stem if resolve_path(args.dataset_name).exists() else args.dataset_name
        check_margin_column(args, [ds], args.dataset_name)
        pairs = to_pairs(ds, name, args, counts, source_column="source" in ds.column_names,
                         origin=args.dataset_name, templated=templated)
        return pairs, {}, counts, args.dataset_name
    if not args.dataset_mixture:
        raise ConfigError("no preference data: set dataset_mixture in configs/rm.yaml or pass --dataset_name")
    pairs, weights, used, read = [], {}, [], []
    for key, spec in args.dataset_mixture.items():
        spec = spec or {}
        if key == LABEL_EXPORT:
            manifest_path = stage_dir(stage.runs_dir, stage.run, LABEL_EXPORT) / "manifest.json"
            if not manifest_path.is_file():
                from stages.label.store import count_labels  # stdlib only

                db = stage_dir(stage.runs_dir, stage.run, "label") / "labels.sqlite"
                n_labels = count_labels(db)
                if n_labels:  # this run was labeled: training without its labels must not look fine
                    raise ConfigError(f"run '{stage.run}' has {n_labels} labels in {db} but no label "
                                      f"export ({manifest_path} is missing): run `make label-export RUN={stage.run}`, "
                                      f"or drop '{LABEL_EXPORT}' from dataset_mixture to train without them")
                if not [k for k in args.dataset_mixture if k != LABEL_EXPORT]:  # nothing else to train on
                    raise ConfigError(f"no preference data: dataset_mixture names only the label export, and run "
                                      f"'{stage.run}' has none ({manifest_path} is missing): label its pairs (`make "
                                      f"pairs label RUN={stage.run}`, then `make label-export RUN={stage.run}`; or `make "
                                      f"pairs simulate label-export RUN={stage.run}`), or give your preferences with "
                                      f"--dataset_name")
                print(f"rm: no label export for run '{stage.run}' ({manifest_path}); training on the bundled data only")
                continue
            manifest = read_manifest(stage.runs_dir, stage.run, LABEL_EXPORT, needed_by="`make rm`")
            stage.upstream[LABEL_EXPORT] = manifest
            path, name = (manifest.get("outputs") or {}).get("dataset") or "", LABEL_EXPORT
            if not path or not Path(path).is_dir():
                raise ConfigError(f"the label export of run '{stage.run}' is broken: {manifest_path} names {path}, "
                                  f"which does not exist: rerun `make label-export RUN={stage.run}`")
        else:
            path, name = key, Path(key).stem if resolve_path(key).exists() else key
        ds = load_any(path, flag="--dataset_mixture")
        require_columns(ds, ["chosen", "rejected"], path, fix)
        read.append(ds)
        rows = to_pairs(ds, name, args, counts, origin=path, templated=templated)
        if spec.get("max_rows"):
            random.Random(seed).shuffle(rows)
            rows = rows[: int(spec["max_rows"])]
        pairs += rows
        weights[name] = float(spec.get("weight", 1.0))
        used.append(name)
    check_margin_column(args, read, "the dataset_mixture's files")
    return pairs, weights, counts, "mixture of " + ", ".join(used)


def check_margin_column(args: RMArgs, datasets: list, where: str) -> None:
    """margin_scale > 0 reads each pair's strength from margin_column: a column no file has (`strenght`) gave every
    pair a margin of 0, plain Bradley-Terry, with no word."""
    if args.margin_scale and datasets and not any(args.margin_column in ds.column_names for ds in datasets):
        raise ConfigError(f"margin_scale {args.margin_scale:g} reads the label strength from the column "
                          f"'{args.margin_column}', which {where} do not have: set --margin_column to theirs (a label "
                          f"export's is strength), or --margin_scale 0")


def encode_pair(tokenizer, pair: dict) -> tuple[list[int], list[int]]:
    """prompt + response -> token ids, exactly as RewardTrainer tokenizes (conversational: chat template;
    plain text: EOS appended). Shared by training, held-out scoring and the fresh-process reload check. A pair that
    carries its token ids (eval_pairs.jsonl: as scored, after truncate_pair) keeps them."""
    if "chosen_ids" in pair:
        return pair["chosen_ids"], pair["rejected_ids"]
    return encode_side(tokenizer, pair, "chosen"), encode_side(tokenizer, pair, "rejected")


def encode_side(tokenizer, pair: dict, key: str) -> list[int]:
    """The token ids of the pair's prompt + its `key` response (encode_pair)."""
    if isinstance(pair[key], str):
        text = pair[key] if pair[key].endswith(tokenizer.eos_token) else pair[key] + tokenizer.eos_token
        return tokenizer(text=pair["prompt"] + text)["input_ids"]
    try:
        return tokenizer.apply_chat_template(pair["prompt"] + pair[key], tokenize=True, return_dict=True,
                                             **TEMPLATE_KWARGS)["input_ids"]
    except (jinja2.TemplateError, ValueError) as err:  # e.g. the template's raise_exception on roles out of order
        raise ConfigError(f"a pair of {pair.get('source', 'the data')} that the chat template refuses "
                          f"({type(err).__name__}: {err}): {json.dumps(pair['prompt'] + pair[key])[:80]}: fix "
                          f"the pair or the model profile's chat_template") from None


class EncodedOnce:
    """encode_pair and the prompt's ids of reply_start, each distinct prompt + response and each prompt rendered
    once: a prompt's 8 responses make 28 labelled pairs, which rendered each response 7 times and the prompt 28
    (100,000 pairs took 168 s to prepare)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sides, self.prompts = tokenizer, {}, {}

    def pair(self, pair: dict) -> tuple[list[int], list[int]]:
        if "chosen_ids" in pair:
            return pair["chosen_ids"], pair["rejected_ids"]
        out = []
        for key in ("chosen", "rejected"):
            memo = json.dumps([pair["prompt"], pair[key]])
            if memo not in self.sides:
                self.sides[memo] = encode_side(self.tokenizer, pair, key)
            out.append(self.sides[memo])
        return out[0], out[1]

    def prompt(self, prompt) -> list[int]:
        memo = json.dumps(prompt)
        if memo not in self.prompts:
            self.prompts[memo] = prompt_ids_of(self.tokenizer, prompt)
        return self.prompts[memo]


# Of a response longer than its share of max_length, this share is taken from its end: how it ends (a question, a
# sign-off, the EOS where the score is read) stays in view, as does its beginning.
RESPONSE_END_SHARE = 0.25
MISSING = object()  # reply_start's prompt_ids not given


def prompt_ids_of(tokenizer, prompt) -> list[int] | None:
    """A pair's prompt as templated with its generation prompt (a text prompt as text); None for an implicit one."""
    if isinstance(prompt, list) and prompt:
        return chat_ids(tokenizer, prompt, add_generation_prompt=True)
    if isinstance(prompt, str) and prompt:
        return tokenizer(text=prompt)["input_ids"]
    return None


def reply_start(tokenizer, pair: dict, chosen: list[int], rejected: list[int], prompt_ids=MISSING) -> int:
    """Where a pair's replies begin in its token ids: after the prompt as templated with its generation prompt (where
    PPO and eval start a `sum`-pooled reply), never past where chosen and rejected part. On the whole pair: a pair
    truncate_pair cut moves it back by the prompt tokens cut out (prepare_data). `prompt_ids`: prompt_ids_of the
    pair's prompt, when already known."""
    shared = common_prefix(chosen, rejected)
    if prompt_ids is MISSING:
        prompt_ids = prompt_ids_of(tokenizer, pair.get("prompt"))
    if prompt_ids is None:  # implicit prompt: what both sequences share
        return shared
    return min(common_prefix(chosen, prompt_ids), shared)


def cut_middle(ids: list[int], cap: int) -> list[int]:
    if len(ids) <= cap:
        return ids
    end = max(1, int(cap * RESPONSE_END_SHARE))
    return ids[: cap - end] + ids[len(ids) - end :]


def truncate_pair(chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int,
                  bos_token_id: int | None) -> tuple[list[int], list[int], bool, bool] | None:
    """Fit a pair into max_length tokens instead of dropping it: (chosen, rejected, prompt_cut, response_cut), or None
    when max_length leaves fewer than 2 tokens per response after the prompt's kept tokens.

    The shared start of both sequences is the prompt (with the chat template's headers and any words both replies
    begin with); what follows are the two responses. The prompt keeps its END (the question being answered) and at
    least max_prompt_length tokens of it; each response is capped at what is left, losing the middle of its text, so
    its beginning and its end (and EOS) are still seen. A leading BOS stays in place."""
    if max(len(chosen), len(rejected)) <= max_length:
        return chosen, rejected, False, False
    n = common_prefix(chosen, rejected)
    keep = 1 if n and chosen[0] == bos_token_id else 0
    head, prompt = chosen[:keep], chosen[keep:n]
    cap = max_length - keep - min(len(prompt), max_prompt_length)
    if cap < 2:  # no room for a response's beginning and end (where the score is read): the pair does not fit
        return None
    c, r = cut_middle(chosen[n:], cap), cut_middle(rejected[n:], cap)
    room = max_length - keep - max(len(c), len(r))
    kept_prompt = prompt[len(prompt) - room :] if room < len(prompt) else prompt
    response_cut = len(c) + len(r) < len(chosen) + len(rejected) - 2 * n
    return head + kept_prompt + c, head + kept_prompt + r, len(kept_prompt) < len(prompt), response_cut


def weighted(rows: list[dict], weights: dict, seed: int) -> list[dict]:
    """Per-source weight on the training rows: 2.0 = every pair twice, 0.5 = a random half."""
    rng, out = random.Random(seed), []
    by_source = defaultdict(list)
    for r in rows:
        by_source[r["source"]].append(r)
    for source, group in by_source.items():
        w = weights.get(source, 1.0)
        out += group * int(w) + rng.sample(group, round((w - int(w)) * len(group)))
    rng.shuffle(out)
    return out


def prompt_key(row: dict, index: int) -> str:
    """Rows of one prompt share a key (batches by prompt); a row without a prompt (plain-text pairs) is a group of its
    own."""
    return json.dumps(row["prompt"], sort_keys=True) if row.get("prompt") else f"row {index}"


def conversation_key(row: dict, index: int) -> str:
    """The held-out split's key of a pair with a given prompt: its conversation's root (messages up to the first user
    turn, as SFT splits), so that no held-out pair's reply is continued by a training pair's prompt (OASST's trees hold
    both). A one-turn prompt's key is its prompt_key."""
    if isinstance(row.get("prompt"), list):
        return conversation_root({"messages": row["prompt"]})
    return prompt_key(row, index)


def split_keys(rows: list[dict]) -> list[str]:
    """Each pair's key for the held-out split: no key lands in both halves. A prompt TRL took from plain text (no
    prompt column, HH-style `\n\nHuman: ...\n\nAssistant: reply`) is all that both texts share, the first words
    of the two replies included, so one prompt's pairs got as many keys as their replies have starts. Such a prompt is
    cut after its last line break, and a key that another starts with takes it in: one prompt's pairs, and a later
    turn of the same conversation, share the first one's key."""
    keys = [conversation_key(r, i) for i, r in enumerate(rows)]
    cut = {}
    for i, r in enumerate(rows):
        if r.get("implicit_prompt") and r.get("prompt") and isinstance(r["prompt"], str):
            head = r["prompt"][: r["prompt"].rfind("\n") + 1]
            cut[i] = head if head.strip() else r["prompt"]  # a break only at its start would join every prompt
    root, roots = None, {}
    for key in sorted(set(cut.values())):  # sorted: the keys starting with a key follow it at once
        if root is None or not key.startswith(root):
            root = key
        roots[key] = root
    for i, key in cut.items():
        keys[i] = "implicit " + json.dumps(roots[key])
    return keys


def prepare_data(args: RMArgs, train_cfg, stage: StageRun, tokenizer):
    """Pairs -> token ids (once: training, held-out scoring and the reload check all use these) -> pairs over max_length
    truncated (truncate_pair: prompt end, response beginnings and ends), counted per source -> a split by prompt ->
    per-source weights on the training half."""
    from datasets import Dataset

    if train_cfg.max_length and not 0 <= args.max_prompt_length <= train_cfg.max_length // 2:
        raise ConfigError(f"max_prompt_length {args.max_prompt_length} must be between 0 and half of max_length "
                          f"({train_cfg.max_length}): the responses need the rest")
    if not args.dataset_name and LABEL_EXPORT in args.dataset_mixture:  # reward model and DPO alike:
        stage.may_read(LABEL_EXPORT)  # a label export that appears later makes the stage out of date
    pairs, weights, counts, data_name = load_pairs(args, stage, train_cfg.seed,
                                                   templated=bool(getattr(tokenizer, "chat_template", None)))
    if train_cfg.max_length:  # the whole pair is tokenized first, then cut to max_length here: no need to warn
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    kept, encoded = [], EncodedOnce(tokenizer)
    for p in pairs:
        chosen, rejected = encoded.pair(p)
        p["full_lengths"] = [len(chosen), len(rejected)]  # before truncation: what "the longer reply wins" compares
        start = reply_start(tokenizer, p, chosen, rejected, encoded.prompt(p.get("prompt")))
        shared = common_prefix(chosen, rejected)
        c = counts[p["source"]]
        if train_cfg.max_length:
            fitted = truncate_pair(chosen, rejected, train_cfg.max_length, args.max_prompt_length, tokenizer.bos_token_id)
            if fitted is None:
                c["no_room"] += 1
                continue
            chosen, rejected, prompt_cut, response_cut = fitted
            c["prompt_cut"] += prompt_cut
            c["response_cut"] += response_cut
        if chosen == rejected:  # defensive: truncate_pair keeps where the two replies part
            c["equal_after_cut"] += 1
            continue
        p["chosen_ids"], p["rejected_ids"] = chosen, rejected
        # Where the replies start, found on the whole pair and moved back by the prompt tokens the cut took out: on the
        # cut ids the prompt matches its template no more (DPO split its pairs at 0 or 1, training on the prompt).
        floor = 1 if chosen and chosen[0] == tokenizer.bos_token_id and chosen[0] != tokenizer.pad_token_id else 0
        p["reply_start"] = max(start - (shared - common_prefix(chosen, rejected)), min(floor, start))
        kept.append(p)
    no_room = sum(c["no_room"] for c in counts.values())
    if not kept and no_room:
        raise ConfigError(f"max_length {train_cfg.max_length} is too small for {data_name}: {no_room} pair(s) leave "
                          f"fewer than 2 tokens per response after the template and the prompt's kept tokens "
                          f"(max_prompt_length {args.max_prompt_length}): raise max_length")
    if not kept:
        raise ConfigError(f"no usable preference pairs in {data_name}: read and dropped {json.dumps(counts)} (equal "
                          f"chosen/rejected, empty responses)")
    groups = split_keys(kept)
    index = Dataset.from_dict({"i": list(range(len(kept))), "group": groups})
    train_idx, eval_idx = train_eval_split(index, args.eval_fraction, train_cfg.seed, group_by=lambda r: r["group"])
    eval_rows = [kept[i] for i in eval_idx["i"] if not kept[i]["tie"]] if eval_idx is not None else []
    train_rows = weighted([kept[i] for i in train_idx["i"]], weights, train_cfg.seed)
    if not train_rows or not eval_rows:
        raise ConfigError(f"{data_name} has {len(set(groups))} distinct prompt(s) after filtering: too few to hold "
                          f"whole prompts out (eval_fraction={args.eval_fraction}); give more pairs")
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        for r in rows:
            counts[r["source"]][split] += 1
    return train_rows, eval_rows, counts, data_name

def longest_pair(rows: list[dict]) -> int:
    """The longest sequence the trainer will see: a pair's chosen or rejected ids, as cut to max_length."""
    return max(max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)


def data_record(counts: dict, n_train: int, n_eval: int) -> dict:
    total = {k: sum(c[k] for c in counts.values()) for k in ("read", "equal", "empty", "equal_after_cut", "prompt_cut",
                                                             "response_cut", "no_room")}
    return {"pairs_read": total["read"], "train_pairs": n_train, "eval_pairs": n_eval,
            "dropped_equal": total["equal"] + total["equal_after_cut"], "dropped_empty": total["empty"],
            "dropped_no_room": total["no_room"],
            "truncated_prompts": total["prompt_cut"], "truncated_responses": total["response_cut"],
            "pairs_by_source": {k: dict(v) for k, v in sorted(counts.items())}}
