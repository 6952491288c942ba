"""The model card `make publish` writes: what made the policy (method, base, reward model, data and their licenses),
its hyperparameters, the eval figures of the run (gold judge and reward-hacking signs included), how to load it; and
the check that the card parses as the Hub's client parses it, with the metadata every card of ours carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.adapters import read_pooling, read_sum_divisor
from pipeline.chat import TEMPLATE_KWARGS
from pipeline.config import REPO_ROOT, ConfigError, resolve_path
from pipeline.data import own_files
from pipeline.judges import describe_judge
from pipeline.run import manifest_digest
from stages.eval_compare import policy_method, responses_per_prompt

if TYPE_CHECKING:
    from stages.publish import PublishArgs


TRAIN_KEYS = ("learning_rate", "lr_scheduler_type", "optim", "weight_decay", "warmup_steps", "warmup_ratio", "max_steps",
              "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "beta",
              "bf16", "seed")  # the TrainingArguments worth a card line (the other ~120 are defaults)
TAGS = ["trl", "rlhf", "lora", "peft"]  # and the method that made the policy (ppo, grpo, rloo, reinforce_pp, dpo)
HOW_MADE = {  # the card's first sentence, by method (the `method` in the policy stage's manifest)
    "ppo": "PPO against that reward with a KL penalty to the SFT policy",
    "grpo": "GRPO against that reward (no critic: each answer's advantage is its score against the group of answers to "
            "the same prompt) with a KL term to the SFT policy",
    "rloo": "RLOO against that reward (no critic: each answer's baseline is the mean score of the other answers to the "
            "same prompt) with a KL penalty to the SFT policy",
    "reinforce_pp": "REINFORCE++ against that reward (no critic: returns normalised over the batch) with a KL penalty "
                    "to the SFT policy",
}
ENSEMBLE_FILE = "ensemble_member.json"  # beside each published member of a reward-model ensemble (stages/publish.py)
NOT_HYPERPARAMETERS = {"save_every", "auto_resume", "resume", "report_to", "sample_every", "num_samples", "stop_after",
                       "generation_batch_size", "forward_batch_size", "logging_steps", "model_config", "sample_prompts",
                       "sample_max_new_tokens", "progress_bar"}  # bookkeeping


def is_local_base(base: str) -> bool:
    return Path(base).is_absolute() and Path(base).is_dir()


def ships_base(base: str, args: PublishArgs) -> bool:
    """A local base ships with the adapters under base/, unless --base_model_id names it on the Hub (a checkpoint
    downloaded from there: its gigabytes are not uploaded again, and the repo names the id as its base)."""
    return is_local_base(base) and not args.base_model_id


def hub_base(base: str, args: PublishArgs) -> str:
    """The base as the published repo names it: a Hub base's own id (--base_model_id is for a local base only), a
    local base's --base_model_id."""
    return args.base_model_id if is_local_base(base) and args.base_model_id else base


LICENSE_KEYS = ("license", "license_name", "license_link")  # `other` licenses are named and linked


def base_license(base: str, args: PublishArgs, online: bool) -> dict | None:
    """The license the base's own model card names (README.md's metadata: a Llama base's `llama3.2`, a Gemma's
    `gemma`, `other` with a name and link): a local base's file; a Hub base's (or --base_model_id's) from the local
    cache, or, when publishing for real, from the Hub. None when no card or no license is found."""
    from huggingface_hub import ModelCard, hf_hub_download, try_to_load_from_cache

    card = Path(base) / "README.md" if is_local_base(base) and not args.base_model_id else None
    if card is None:
        repo = hub_base(base, args)
        cached = try_to_load_from_cache(repo, "README.md")
        if isinstance(cached, str):
            card = Path(cached)
        elif online:
            try:
                card = Path(hf_hub_download(repo, "README.md"))
            except Exception:  # no card on the Hub, a gated repo without access: the note says it is unknown
                card = None
    if card is None or not card.is_file():
        return None
    try:
        meta = ModelCard(card.read_text(encoding="utf-8", errors="replace")).data.to_dict()
    except Exception:  # front matter huggingface_hub cannot read: the license is unknown, and the note says so
        return None
    return {k: meta[k] for k in LICENSE_KEYS if meta.get(k)} if meta.get("license") else None


def card_license(args: PublishArgs, found: dict | None) -> tuple[dict, str | None]:
    """The card's license metadata (--license, else the base's, else apache-2.0) and a note for the console when the
    base's license is unknown or differs from --license."""
    if args.license:
        note = None if found is None or found["license"] == args.license else (
            f"note: the card's license is {args.license} (--license); the base's own card says {found['license']}: "
            f"the adapters are derived from the base, so its terms still apply")
        return {"license": args.license}, note
    if found:
        return found, None
    return {"license": "apache-2.0"}, ("note: the base's model card names no license (or is not in the cache: a dry "
                                       "run does not look on the Hub), so the card says apache-2.0: give --license "
                                       "if the base's terms differ")


def flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and k not in ("dataset_mixture",):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


REPLACED_BY_DATASET_NAME = ("dataset_mixture", "prompts_file")  # a stage given --dataset_name did not read these


def own_dataset(values: dict) -> str | None:
    """The --dataset_name a stage's config section was given (your own data, in place of its bundled files)."""
    name = values.get("dataset_name")
    return name if isinstance(name, str) and name else None


def hyperparameters(manifest: dict) -> dict:
    """A stage's own settings (its small dataclasses) plus the TrainingArguments that matter; no paths of this box."""
    rows = {}
    for section, values in (manifest.get("config") or {}).items():
        if section == "run" or not isinstance(values, dict):
            continue
        if own_dataset(values):
            values = {k: v for k, v in values.items() if k not in REPLACED_BY_DATASET_NAME}
        if isinstance(values.get("dataset_mixture"), dict):  # a recipe's own files: named as the data table names them
            values = {**values, "dataset_mixture": {own_or_bundled(k) if is_data_path(k) else k: v
                                                    for k, v in values["dataset_mixture"].items()}}
        for k, v in flat(values).items():
            local_path = isinstance(v, str) and (v.startswith("/") or "dir" in k or "path" in k)  # this box's paths
            if (section != "train" or k in TRAIN_KEYS) and v not in (None, "", [], {}) and not local_path \
                    and k not in NOT_HYPERPARAMETERS:
                rows[k] = v
    # the Trainer's length settings as they acted: max_steps > 0 overrides the epochs; -1 and 0 are "not set" (the
    # reward models' own min_steps and max_epochs say how long they trained)
    if isinstance(rows.get("max_steps"), int) and rows["max_steps"] > 0:
        rows.pop("num_train_epochs", None)
    for k in ("max_steps", "num_train_epochs"):
        if rows.get(k) in (-1, 0):
            rows.pop(k)
    return rows


OWN_DATA = "your own data: "
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")  # a data file of yours, not a run's folder
DATA_KEYS = ("dataset_mixture", "prompts_file")  # the keys that name a stage's data files (a recipe's YAML can name yours)


def is_data_path(item) -> bool:
    """A data file or folder a config names (not `label-export`, not a Hub id): one of DATA_SUFFIXES, or a folder."""
    return isinstance(item, str) and bool(item) and item != "label-export" and (
        Path(item).suffix in DATA_SUFFIXES or resolve_path(item).is_dir())


def named_data(values: dict) -> list[str]:
    """The data files a stage's config section names under DATA_KEYS, wherever they are (a recipe YAML's
    `dataset_mixture: {/home/me/chats.jsonl: 0}` or `prompts_file:` of yours, not only paths under a data/ folder)."""
    named = []
    for key in DATA_KEYS:
        value = values.get(key)
        named += [item for item in (value if isinstance(value, dict) else [value]) if is_data_path(item)]
    return named


def data_files_used(manifests: dict[str, dict], base: str) -> dict[str, set[str]]:
    """Bundled data file (repo-relative) -> stages that read it, from the resolved configs; pretraining data of the
    embedded base from its training_report.json."""
    used: dict[str, set[str]] = {}
    for stage, m in manifests.items():
        config = dict(m.get("config") or {})
        for section, values in config.items():
            if isinstance(values, dict) and own_dataset(values):  # your own data, not the bundled files it replaced
                used.setdefault(OWN_DATA + Path(own_dataset(values)).name, set()).add(stage)
                config[section] = {k: v for k, v in values.items() if k not in (*REPLACED_BY_DATASET_NAME, "dataset_name")}
            elif isinstance(values, dict):
                for item in named_data(values):
                    used.setdefault(own_or_bundled(item), set()).add(stage)
        for v in flat(config).values():
            for item in (v if isinstance(v, (list, dict)) else [v]):
                if isinstance(item, str) and "data/" in item and not item.startswith("runs/"):
                    named = own_or_bundled(item)  # yours by name, wherever it is; not a folder of a run
                    if not named.startswith(OWN_DATA) or Path(item).suffix in DATA_SUFFIXES:
                        used.setdefault(named, set()).add(stage)
    report = Path(base) / "training_report.json"
    if is_local_base(base) and report.is_file():
        text_dir = json.loads(report.read_text()).get("config", {}).get("text_dir")
        if text_dir:
            used.setdefault(text_dir, set()).add("base")
    return used


def own_or_bundled(path: str) -> str:
    """A data file as the card names it: repo-relative when it is bundled (it resolves under the repo's data/), else
    OWN_DATA and its name (a file of yours, wherever it is: never this machine's path)."""
    if own_files([path]):
        return OWN_DATA + Path(path).name
    return str(Path("data") / resolve_path(path).resolve().relative_to((REPO_ROOT / "data").resolve()))


def labeled_prompts(label: dict, pairs: dict | None) -> str | None:
    """The data file the label export's prompts came from (own_or_bundled): your pairs (`make label --pairs_dataset`),
    or the prompts of the pairs stage the export read (`make pairs`, --dataset_name or its prompts_file). None when the
    export does not say: no pairs stage, or pairs sampled again since (`pairs`, the run's pairs manifest now, is used
    only when it is the one the export read)."""
    given = ((label.get("config") or {}).get("label") or {}).get("pairs_dataset")
    if given:
        return OWN_DATA + Path(given).name
    read = upstream_read(label, "pairs")
    if pairs is None or read is None or read != manifest_digest(pairs):
        return None
    values = ((pairs.get("config") or {}).get("pairs")) or {}
    path = own_dataset(values) or values.get("prompts_file")
    return (OWN_DATA + Path(path).name if own_dataset(values) else own_or_bundled(path)) if path else None


def prompts_source(prompts: str | None) -> dict:
    """labeled_prompts' source, as data_sources gives it: a bundled one has a url and a license; yours or none, not."""
    if prompts is None or prompts.startswith(OWN_DATA):
        return {"name": prompts[len(OWN_DATA):] if prompts else None, "license": "see the dataset's own terms", "url": ""}
    return data_sources({prompts: set()})[0]


def dataset_license(args: PublishArgs, prompts: str | None, run: str) -> str:
    """The preference dataset's license: --dataset_license, else apache-2.0 when its prompts are bundled data (public
    domain or Apache-2.0, data/*/SOURCE.json). Your own prompts' or pairs' terms are yours to name, and so are those
    of prompts the export cannot name: the labels are published with them."""
    if args.dataset_license:
        return args.dataset_license
    source = prompts_source(prompts)
    if source["url"]:
        return "apache-2.0"
    fix = "give --dataset_license (the license their terms allow, e.g. cc-by-4.0)"
    if prompts is None:
        raise ConfigError(f"--include_dataset: the label export of run '{run}' does not say where its pairs' prompts "
                          f"came from (the run has no pairs stage, or its pairs were sampled again since: `make "
                          f"label-export RUN={run}` exports them again), so their license is unknown: {fix}")
    raise ConfigError(f"--include_dataset publishes the prompts of {source['name']} with your labels "
                      f"under a license, and their terms are not this project's to choose: {fix}")


def data_sources(used: dict[str, set[str]]) -> list[dict]:
    """Match each data file to its licensed source folder (data/sources/<name>/, data/pretrain/)."""
    folders = sorted((REPO_ROOT / "data" / "sources").iterdir()) if (REPO_ROOT / "data" / "sources").is_dir() else []
    found: dict[str, dict] = {}
    for path, stages in sorted(used.items()):
        own = (REPO_ROOT / path).parent  # a folder that documents its own source (data/pretrain, data/story)
        if path.startswith(OWN_DATA):  # no bundled source: "see the dataset's own terms" below
            src = None
        elif path.startswith("data/pretrain"):
            src = REPO_ROOT / "data" / "pretrain"
        elif (own / "SOURCE.json").is_file():
            src = own
        else:
            stem = Path(path).stem
            src = next((f for f in folders if stem in f.name), None) or next((f for f in folders if stem.split("_")[0] in f.name), None)
        if src is None or not (src / "SOURCE.json").is_file():
            found.setdefault(path, {"name": path, "license": "see the dataset's own terms", "url": "", "stages": set(), "files": []})
            found[path]["stages"] |= stages
            continue
        meta = json.loads((src / "SOURCE.json").read_text())
        entry = found.setdefault(src.name, {"name": src.name, "license": meta.get("license", "").split(" (")[0],
                                            "url": meta.get("source_repo", ""), "stages": set(), "files": []})
        entry["stages"] |= stages
        entry["files"].append(path)
    return list(found.values())


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


EXAMPLE_PROMPT = "Tell me a short story about a rabbit."


def example_prompt(sft: dict) -> str:
    """A prompt of the task the policy was trained for: the first SFT sampled before and after training (samples.json:
    the story recipe's opening of a book, or your own data's held-out opening)."""
    try:
        return json.loads(Path(sft["outputs"]["samples"]).read_text())[0]["prompt"]
    except (KeyError, IndexError, TypeError, OSError, ValueError):
        return ((sft.get("config") or {}).get("sft", {}).get("sample_prompts") or [EXAMPLE_PROMPT])[0]


def public_judge(spec: str) -> str:
    """A judge as the card names it: an `rm:` judge's folder by its last two names, not this machine's path
    (`rm:/home/me/runs/big/rm/adapter` is `rm:.../rm/adapter`)."""
    if not spec.startswith("rm:"):
        return spec
    parts = Path(spec[3:].strip()).parts
    return "rm:" + ("/".join(parts) if len(parts) <= 2 and not Path(spec[3:].strip()).is_absolute()
                    else ".../" + "/".join(parts[-2:]))


def ppo_results(ev: dict) -> list[str]:
    """The card's results for the PPO policy: eval's SFT-vs-PPO figures."""
    gold = ev.get("gold_win_rate") is not None
    judge = public_judge(ev["gold_judge"]) if gold else None
    judged = (f"scored by the gold judge `{judge}` ({describe_judge(judge)}), which PPO never saw, "
              "and by the run's reward model, which it optimised" if gold else "scored by the run's reward model")
    lines = [f"{ev['n_prompts']} prompts PPO never trained on; {responses_per_prompt(ev)}, {judged}.", "",
             "| | SFT (reference) | PPO (this adapter) |", "|---|---|---|",
             *([f"| gold judge score (mean) | {ev['gold_sft_mean']:.3f} | {ev['gold_ppo_mean']:.3f} |"] if gold else []),
             f"| reward-model score (mean) | {ev['reward_sft_mean']:.3f} | {ev['reward_ppo_mean']:.3f} |",
             f"| response length (tokens) | {ev['length_sft_mean']:.1f} | {ev['length_ppo_mean']:.1f} |",
             f"| share without EOS | {ev['no_eos_sft']:.1%} | {ev['no_eos_ppo']:.1%} |",
             f"| KL to the SFT policy (nats/response) | 0 | {ev['kl_mean']:.3f} |", "",
             *([f"**Win rate of PPO over SFT judged by the gold judge: {ev['gold_win_rate']:.1%}** (95% CI "
                f"{ev['gold_win_rate_ci_low']:.1%} – {ev['gold_win_rate_ci_high']:.1%}, Wilson, ties counted half)."
                + (f" The reward model orders {ev['rm_gold_agreement']:.1%} of {ev['rm_gold_pairs']} held-out pairs as "
                   "the gold judge does." if ev.get("rm_gold_agreement") is not None else ""), ""] if gold else []),
             f"{'Under the reward model PPO optimised' if gold else '**Under the reward model**'}: win rate of PPO over "
             f"SFT {ev['win_rate']:.1%}{'' if gold else '**'} (95% CI {ev['win_rate_ci_low']:.1%} – "
             f"{ev['win_rate_ci_high']:.1%}, Wilson, ties counted half)."]
    if ev.get("overoptimisation_suspected"):
        lines += ["", "⚠️ The evaluation flagged over-optimisation: the reward model's score rose while the gold judge's "
                  "fell (see `eval/report.md`)."]
    if ev.get("human_win_rate") is not None:
        lines += ["", f"Win rate judged by people: {ev['human_win_rate']:.1%}."]
    if ev.get("reward_hacking_suspected"):
        lines += ["", "⚠️ The evaluation flagged likely reward hacking (see `eval/report.md`): read the samples before use."]
    lines += ["", "![training curves and reward distributions](eval/plots/overview.png)", "",
              "Full report with samples: [`eval/report.md`](eval/report.md); every figure: `eval/report.json`."]
    return lines


def policy_results(ev: dict, policy: str) -> list[str]:
    """The card's results for another policy: its line of eval's comparison beside SFT's."""
    mine, sft = ev["comparison"][policy], ev["comparison"]["sft"]
    num = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    return [f"{ev['n_prompts']} held-out prompts; {responses_per_prompt(ev)} with the same seed.", "",
            f"| | SFT (reference) | {policy} (this adapter) |", "|---|---|---|",
            f"| reward-model score (mean) | {sft['proxy_mean']:.3f} | {mine['proxy_mean']:.3f} |",
            f"| gold judge score (mean) | {num(sft['gold_mean'])} | {num(mine['gold_mean'])} |",
            f"| response length (tokens) | {sft['length_mean']:.1f} | {mine['length_mean']:.1f} |",
            f"| share without EOS | {sft['no_eos']:.1%} | {mine['no_eos']:.1%} |",
            f"| KL to the SFT policy (nats/response) | 0 | {mine['kl_mean']:.3f} |", "",
            *([f"⚠️ The evaluation flagged {policy} (a mean KL over its threshold, longer replies for a higher reward, or "
               "its reward model's score rising while the gold judge's fell; see `eval/report.md`): read the samples "
               "before use.", ""] if policy in ev.get("flagged_policies", []) else []),
            "The win rates of every policy of the run against every other, and the gold score against KL: "
            "[`eval/report.md`](eval/report.md); every figure: `eval/report.json`."]


def reward_window(trained: dict) -> str:
    """Which updates the summary's first and last rewards are means of: as many as the RL stage's manifest says
    (`reward_window_updates`: a tenth of the updates, at least one: 4 of PPO's 48), else its older words."""
    w = trained.get("reward_window_updates")
    if w is None:  # a manifest written before the stage recorded it
        return "means of the first and last tenth of the updates"
    return f"means of the first and last {w} update{'' if w == 1 else 's'}"


def given_adapter(policy: dict, key: str) -> str | None:
    """An adapter an RL stage was given instead of its run's own, from its manifest's config, as eval takes it:
    `sft_adapter` (the policy's start and reference, for the sft stage's) or `reward_adapter` (what it optimised, for
    the rm stage's), as in configs/ppo.yaml."""
    return ((policy.get("config") or {}).get("ppo") or {}).get(key) or None


def given_sft(policy: dict) -> str | None:
    return given_adapter(policy, "sft_adapter")


def given_reward(policy: dict) -> str | None:
    return given_adapter(policy, "reward_adapter")


def reward_made(rm: dict, given: str | None = None) -> str:
    """How the card names the reward: one reward model, make rm's ensemble of them, or the one the RL stage was given."""
    if given:
        return (f"a reward model given to it (`reward_adapter`, `{Path(given).name}`: trained outside this run, not by its "
                f"rm stage; taken as it scores)")
    n = int(rm.get("metrics", {}).get("ensemble", 1) or 1)
    made = ("a reward model trained on preference pairs (TRL `RewardTrainer`)" if n == 1 else
            f"an ensemble of {n} reward models trained on the same preference pairs with different seeds (TRL "
            f"`RewardTrainer`; the reward is the mean of their standardised scores)")
    if read_pooling(rm["outputs"]["adapter"]) == "sum":
        made += (f" that scores a reply by the sum of its head over the reply's tokens divided by "
                 f"{fmt(read_sum_divisor(rm['outputs']['adapter']))}, not by the last token (`score_pooling.json` beside "
                 f"the adapter; `pipeline.adapters.pool_in_forward` applies it)")
    return made


def upstream_read(manifest: dict, upstream: str) -> str | None:
    """The digest of `upstream`'s manifest as the stage of `manifest` recorded reading it; None when it read none."""
    return ((manifest.get("inputs") or {}).get("manifests") or {}).get(upstream)


def trained_on_labels(manifests: dict[str, dict], policy: str) -> list[str]:
    """The card's stages that trained on the run's label export as it is now (`manifests["label-export"]`, absent when
    the run has none): the rm stage, and DPO (its policy learned from the labels directly), each when its manifest
    records that it read this export: not when it trained on other preferences, or on an export made before this one."""
    export = manifests.get("label-export")
    read = lambda stage: upstream_read(manifests[stage], "label-export")  # noqa: E731
    return sorted(stage for stage in {"rm", policy} if export and read(stage) == manifest_digest(export))


def template_kwargs_of(tokenizer) -> str:
    """The apply_chat_template arguments, as Python source (`, date_string="26 Jul 2024"`), that template a
    conversation as this run did: pipeline.chat.TEMPLATE_KWARGS that the published tokenizer's template reads. Llama
    3.x writes today's date into every prompt without date_string: the policy saw, and the reward model scored, another."""
    template = json.dumps(getattr(tokenizer, "chat_template", None))  # a text, or a dict of named templates
    return "".join(f", {key}={json.dumps(value)}" for key, value in TEMPLATE_KWARGS.items() if key in template)


def stop_tokens_of(tokenizer, base: str) -> list[str]:
    """The tokens the run's sampling stopped at (pipeline.generation.stop_token_ids: the template's end-of-turn too),
    by name, when generate() would not stop at all of them by itself (the base's generation_config): a base given
    another family's template (Qwen2.5 base + ChatML) wrote past `<|im_end|>`. Empty: generate() stops as the run did."""
    from transformers import GenerationConfig

    from pipeline.generation import stop_token_ids

    try:
        generation = GenerationConfig.from_pretrained(base)
    except (OSError, ValueError):  # none saved (generate() then stops at the model config's EOS): the tokenizer's
        generation = None
    listed = getattr(generation, "eos_token_id", None)
    listed = set(listed if isinstance(listed, (list, tuple)) else [listed if listed is not None else tokenizer.eos_token_id])
    stops = stop_token_ids(tokenizer, generation)
    return [] if set(stops) <= listed else tokenizer.convert_ids_to_tokens(stops)


def reward_use(rm: dict, given: str | None, extras: list[str], method: str, repo: str = "repo",
               base: str | None = None, template_kwargs: str = "") -> str:
    """How to load and score as the published reward model(s) do: the base (`base`: its Hub id; None: shipped in the
    repo's base/, which loads only with adapter_kwargs, as the policy's does), then each member; a stock load reads the
    head at the last token, which is not the score of a `sum`-pooled model, and an ensemble's reward needs each
    member's held-out mean and std."""
    members = [e.rstrip("/") for e in extras if e.startswith("reward")]
    load_base = (f"AutoModelForSequenceClassification.from_pretrained(\"{base}\", num_labels=1)" if base else
                 f"AutoModelForSequenceClassification.from_pretrained(\"{repo}\", subfolder=\"base\", num_labels=1, "
                 f"adapter_kwargs={{\"subfolder\": \"base\"}})")
    text = (f"The reward model{'s' if len(members) > 1 else ''} ({', '.join(f'`{m}/`' for m in members)}): LoRA + score "
            f"head on the base; load the base with `{load_base}`, then each with "
            f"`PeftModel.from_pretrained(model, \"{repo}\", subfolder=\"{members[0]}\")`"
            + (" (a fresh base for each: it adds the member's LoRA and head to the model it is given, so a second "
               "member on the same base object changes the first)" if len(members) > 1 else "") + ". "
            "If the base's config has no `pad_token_id`, set `model.config.pad_token_id = tokenizer.pad_token_id` (a "
            "batch of more than one is refused otherwise). Template the conversation with "
            "`tokenizer.apply_chat_template(messages, tokenize=False" + template_kwargs + ")`, as the policy's lines "
            "above do" + (" (the date this run templated with; the template writes today's otherwise)" if
                          template_kwargs else "") + ".")
    if read_pooling(resolve_path(given) if given else rm["outputs"]["adapter"]) == "sum":
        text += (" The score is not the stock output (the head at the last token): sum the head (`score`) over the "
                 "hidden states of the reply's tokens, after the prompt as templated with its generation prompt, up to "
                 "the last token that is not `pad_token_id` (where a stock model reads its score: when the pad token "
                 "is the EOS, the reply's closing EOS is left out), and divide by `sum_divisor` (`score_pooling.json`).")
    if len(members) > 1:
        text += (f" The reward {'eval scored with (DPO optimised none)' if method == 'dpo' else 'the policy optimised'} "
                 f"is the mean over the members of (score − `reward_mean`) / `reward_std`, each member's from its "
                 f"`{ENSEMBLE_FILE}`.")
    return text


def model_card(args: PublishArgs, repo: str, run: str, manifests: dict[str, dict], base: str, base_ref: str,
               sources: list[dict], extras: list[str], dataset_repo: str | None, dataset_sources: str | None = None,
               license: dict | None = None, test_split: bool = False, template_kwargs: str = "",
               stop_tokens: list[str] | None = None) -> str:
    """The card's text, from `manifests`: the sft, rm, policy and eval stages' (and the run's label export's as it is
    now, when it has one: which stages trained on it). `test_split`: the published dataset (`dataset_repo`) has the
    `test` split of the reward model's held-out pairs (publish.as_held_out), which the card then names.
    `template_kwargs`: template_kwargs_of the published tokenizer, for the snippets' apply_chat_template.
    `stop_tokens`: stop_tokens_of it, for the snippet's generate()."""
    from huggingface_hub import ModelCardData

    from stages.label.export import WHOSE

    local = ships_base(base, args)
    base = base if local else hub_base(base, args)
    method = policy_method(args.policy, manifests[args.policy])
    hub_ids = [args.hub_dataset_ids[s["name"]] for s in sources if s["name"] in args.hub_dataset_ids]
    data = ModelCardData(base_model=None if local else base, library_name="peft",
                         **(license or card_license(args, None)[0]),
                         tags=TAGS[:2] + [method] + TAGS[2:], datasets=sorted(set(hub_ids + ([dataset_repo] if dataset_repo else []))) or None,
                         pipeline_tag="text-generation")
    ev, trained = manifests["eval"]["metrics"], manifests[args.policy]["metrics"]
    read_labels = trained_on_labels(manifests, args.policy)  # the stages that trained on the run's export
    given, started_from = given_reward(manifests[args.policy]), given_sft(manifests[args.policy])
    how = ("two stages: supervised fine-tuning (TRL `SFTTrainer`), then DPO (TRL `DPOTrainer`) on preference pairs with "
           "the SFT policy as the reference" if method == "dpo" else
           f"three stages: supervised fine-tuning (TRL `SFTTrainer`), {reward_made(manifests['rm'], given)}, then "
           f"{HOW_MADE.get(method, method)}")
    lines = [f"# {repo.split('/')[-1]}", "",
             f"A LoRA policy adapter trained with RLHF in {how}. Run `{run}` of an open-source RLHF pipeline on the "
             f"Hugging Face stack (transformers, TRL, peft, accelerate).", "",
             f"- **Method:** {method}",
             "- **Base model:** " + (f"[{base}](https://huggingface.co/{base})" if not local else
                                      f"`{Path(base).name}`, a small local checkpoint, included in this repo under `base/`"),
             f"- **Adapter:** LoRA on the base (the {method} policy), at the root of this repo"]
    lines += [f"- **Also here:** {', '.join(extras)}" if extras else ""]
    lines += ["", "## Results on held-out prompts", ""]
    lines += ppo_results(ev) if args.policy == "ppo" else policy_results(ev, args.policy)
    lines += ["", "## How to use", "", "```python"]
    if local:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  "# adapter_kwargs: the adapter_config.json at the repo's root is not this folder's (transformers would "
                  "follow it)",
                  f"base = AutoModelForCausalLM.from_pretrained(\"{repo}\", subfolder=\"base\", "
                  f"adapter_kwargs={{\"subfolder\": \"base\"}})",
                  f"model = PeftModel.from_pretrained(base, \"{repo}\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")"]
    else:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo}\")  # downloads the base, {base}",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")"]
    example = example_prompt(manifests["sft"])
    lines += [f"messages = [{{\"role\": \"user\", \"content\": {json.dumps(example, ensure_ascii=False)}}}]"]
    if template_kwargs:
        lines += ["# the date the run templated every prompt with (the template writes today's otherwise)"]
    if stop_tokens:
        lines += ["# stop where the run's sampling stopped: at the end of the assistant's turn too",
                  f"model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids({json.dumps(stop_tokens)})"]
    lines += [f"ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True{template_kwargs})",
              "out = model.generate(**ids, max_new_tokens=64, do_sample=True, temperature=0.7)",
              "print(tokenizer.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", ""]
    if local:
        lines += ["The base is not on the Hub, so it ships here under `base/`. This repo's `adapter_config.json` files "
                  "name it `base`, that folder, relative to the working directory: from the Hub, load the base from "
                  "`subfolder=\"base\"` as above; a downloaded copy also loads with "
                  "`AutoPeftModelForCausalLM.from_pretrained(\".\")` run from its own root. (The folder `make publish` "
                  "wrote before uploading names it by its absolute path there, so it loads from any directory.)", ""]
    if "merged/" in extras:
        lines += [f"Without peft: `AutoModelForCausalLM.from_pretrained(\"{repo}\", subfolder=\"merged\", "
                  f"adapter_kwargs={{\"subfolder\": \"merged\"}})` (base and adapter merged).", ""]
    if "reward/" in extras:
        lines += [reward_use(manifests["rm"], given, extras, method, repo, None if local else base, template_kwargs), ""]
    lines += ["## Training", "", "| stage | key hyper-parameters |", "|---|---|"]
    for stage in ("sft", args.policy) if method == "dpo" or given else ("sft", "rm", args.policy):
        if stage == "sft" and started_from:
            lines.append(f"| sft | given as `sft_adapter` (`{Path(started_from).name}`): trained "
                         f"outside this run |")
            continue
        hp = hyperparameters(manifests[stage])
        lines.append(f"| {stage} | " + ("; ".join(f"`{k}`={fmt(v)}" for k, v in hp.items()).replace("|", "\\|") or "defaults") + " |")
    summary = (f"DPO: held-out preference accuracy {fmt(trained.get('eval_accuracy'))}." if method == "dpo" else
               f"{method.upper()}: {trained.get('updates', '?')} updates, reward {fmt(trained.get('reward_first'))} → "
               f"{fmt(trained.get('reward_last'))} (the reward model's, {reward_window(trained)}), KL "
               f"{fmt(trained.get('kl_last'))} at the last update (held out: the table above). Reward "
               f"model: " + (f"`{Path(given).name}`, given as `reward_adapter`." if given else
                             f"accuracy {fmt(manifests['rm']['metrics'].get('eval_accuracy'))} on its held-out pairs"
                             + (f" (the `test` split of [{dataset_repo}](https://huggingface.co/datasets/{dataset_repo}))"
                                if dataset_repo and test_split else "") + "."))
    lines += ["", summary + " Software: " + ", ".join(f"{k} {v}" for k, v in manifests[args.policy].get("versions", {}).items())
              + ".", "",
              "## Data", "", "| data | used by | source | license |", "|---|---|---|---|"]
    for s in sources:
        lines.append(f"| `{s['name']}` | {', '.join(sorted(s['stages']))} | {s['url'] or '—'} | {s['license']} |")
    readers = ", ".join(read_labels) or "no stage of this run"
    if dataset_repo:
        lines.append(f"| [{dataset_repo}](https://huggingface.co/datasets/{dataset_repo}) | {readers} | {WHOSE[dataset_sources or 'people'].short} of this run | {args.dataset_license} |")
    elif dataset_sources in WHOSE:  # the reward model's labels, not published (--include_dataset publishes them)
        lines.append(f"| this run's preference labels (`make label-export`; not published) | {readers} | "
                     f"{WHOSE[dataset_sources].short} of this run | — |")
    lines += ["", "## Intended use and limits", "",
              "For research on and demonstrations of RLHF: comparing policies, studying reward models and PPO. Not for "
              "decisions about people or for unsupervised use in products. The policy is optimised against a learned reward "
              "model, which it can exploit: a higher reward is not the same as a better answer (check the length and KL "
              "figures and the samples above). It inherits the biases and errors of its base model and of a small preference "
              "dataset, and it can state false things fluently."]
    if local and (Path(base) / "training_report.json").is_file():  # the embedded base that `make base` builds
        lines += ["", "The base here is tiny and was trained on public-domain children's books: its answers are mostly "
                      "not sensible. It exists to run the whole pipeline on a laptop CPU, not to be used."]
    body = "\n".join(lines) + "\n"
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def check_card(text: str, local: bool, method: str = "ppo") -> None:
    """Parse the card as the Hub's client does and check the metadata every card of ours must carry."""
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    meta = card.data.to_dict()
    missing = [k for k in ("library_name", "license", "tags") if not meta.get(k)] + \
              ([] if local or meta.get("base_model") else ["base_model"])
    if missing or not set(TAGS + [method]) <= set(meta["tags"]):
        raise ConfigError(f"generated model card lacks metadata {missing or TAGS + [method]}: this is a bug in stages/publish_card.py")
