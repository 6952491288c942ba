"""Stage: share the result on the Hugging Face Hub: the PPO policy adapter, a model card, optionally more.

    make publish REPO=you/tiny-rlhf ARGS="--dry-run"      # write and list the folder, upload nothing
    make publish REPO=you/tiny-rlhf ARGS="--private --include_sft --include_reward --merged --include_dataset"

Reads the run's manifests (sft, rm, ppo, eval; label-export with --include_dataset). Writes runs/<run>/publish/model/,
exactly what goes to the model repo: the PPO adapter + tokenizer at the root (so `AutoPeftModelForCausalLM` loads the
repo), README.md (the model card, generated from the manifests), eval/ (report + plots), and on request sft/ and
reward/ adapters and merged/ (base + PPO merged into one plain model). With --include_dataset also
runs/<run>/publish/dataset/ (the label-export preferences as parquet + a dataset card) for a dataset repo.

Every adapter_config.json names a base that works away from this checkout: the Hub id for a Hub base. The embedded
tiny base is not on the Hub, so it travels in the folder (base/) and the adapter names it by its absolute path there:
the folder loads with stock peft from any working directory, and the card shows how to load the repo from the Hub.

The token comes from HF_TOKEN or `hf auth login`; it is never printed, logged or written. Each repo gets exactly one
commit (huggingface_hub.upload_folder), so a failed upload leaves none of these files on the Hub.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.adapters import read_pooling, reward_members
from pipeline.config import REPO_ROOT, ConfigError, RunArgs, parse, to_dict
from pipeline.models import FINGERPRINT_FILE
from pipeline.run import StageRun, main_guard
from stages.eval_compare import POLICY_STAGES, policy_method

ADAPTER_SKIP = {"README.md", "training_args.bin"}  # peft's empty card template; a pickle of local paths
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
NOT_HYPERPARAMETERS = {"save_every", "auto_resume", "resume", "report_to", "sample_every", "num_samples", "stop_after",
                       "generation_batch_size", "forward_batch_size", "logging_steps", "model_config"}  # bookkeeping


@dataclass
class PublishArgs:
    # Where
    repo_id: str = field(default="", metadata={"help": "Hub model repo, user/name (`make publish REPO=...`)."})
    revision: str = field(default="", metadata={"help": "Branch to commit to (created if missing); '' = main."})
    private: bool = field(default=False, metadata={"help": "Create the repo private (an existing repo keeps its visibility)."})
    dry_run: bool = field(default=False, metadata={"help": "Write and list the folder; no token, no network. Also --dry-run."})
    commit_message: str = "Upload RLHF policy (SFT -> reward model -> PPO, LoRA)"
    policy: str = field(default="ppo", metadata={"help": "The run's policy to publish: ppo, grpo, rloo, reinforce_pp or dpo."})
    # What
    include_sft: bool = field(default=False, metadata={"help": "Add the SFT adapter (the PPO reference) as sft/."})
    include_reward: bool = field(default=False, metadata={"help": "Add the reward-model adapter (LoRA + score head) as reward/ (an ensemble's others as reward-1/, ...)."})
    merged: bool = field(default=False, metadata={"help": "Add merged/: base + PPO adapter merged into one plain model."})
    include_dataset: bool = field(default=False, metadata={"help": "Publish the label-export preference dataset to a dataset repo."})
    dataset_repo_id: str = field(default="", metadata={"help": "Dataset repo for --include_dataset; '' = <repo_id>-preferences."})
    # Card
    license: str = field(default="apache-2.0", metadata={"help": "Card license; must allow the base's and the data's licenses."})
    dataset_license: str = field(default="apache-2.0", metadata={"help": "License of your preference labels (--include_dataset)."})
    base_model_id: str = field(default="", metadata={"help": "Hub id for the card's base_model when the base is a local folder."})
    hub_dataset_ids: dict = field(default_factory=dict, metadata={"help": "Bundled source folder -> the Hub dataset it comes from (card `datasets`)."})


# ---------------------------------------------------------------------------------------------------- the folder

def is_local_base(base: str) -> bool:
    return Path(base).is_absolute() and Path(base).is_dir()


def copy_adapter(src: str | Path, dst: Path, base_ref: str) -> Path:
    """A stock PEFT folder whose adapter_config.json (and our fingerprint) name `base_ref` as the base."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name not in ADAPTER_SKIP:
            shutil.copy2(f, dst / f.name)
    for name, key in (("adapter_config.json", "base_model_name_or_path"), (FINGERPRINT_FILE, "base_model")):
        if (dst / name).is_file():
            data = json.loads((dst / name).read_text())
            data[key] = base_ref
            (dst / name).write_text(json.dumps(data, indent=2) + "\n")
    return dst


def merge(base: str, adapter: Path, tokenizer_dir: Path, out: Path) -> None:
    """Base + PPO LoRA folded into plain weights: loads with AutoModelForCausalLM alone, no peft needed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), str(adapter))
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


def export_dataset(dataset_dir: str, out: Path, args: PublishArgs, repo: str, run: str) -> None:
    """The label-export preferences as one parquet file (the Hub's viewer reads it) and a DatasetCard."""
    import datasets
    from huggingface_hub import DatasetCard, DatasetCardData

    ds = datasets.load_from_disk(dataset_dir)
    ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    (out / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(out / "data" / "train-00000-of-00001.parquet"))
    data = DatasetCardData(license=args.dataset_license, tags=["rlhf", "preference", "human-feedback", "dpo", "reward-modeling"],
                           task_categories=["text-generation"], size_categories=["n<1K"] if len(ds) < 1000 else ["1K<n<10K"],
                           configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}])
    body = (f"\n# Preference labels of run `{run}`\n\n{len(ds)} human preference pairs collected with the pipeline's labeling "
            f"UI (`make pairs label label-export`), in TRL's conversational preference format: columns "
            f"{', '.join(f'`{c}`' for c in ds.column_names)}. They trained the reward model of [{repo}](https://huggingface.co/{repo}).\n\n"
            "```python\nfrom datasets import load_dataset\n"
            f"ds = load_dataset(\"{args.dataset_repo_id or repo + '-preferences'}\", split=\"train\")\n```\n")
    DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}").save(out / "README.md")


def list_folder(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(f.relative_to(folder)), f.stat().st_size) for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------------- the card

def flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and k not in ("dataset_mixture",):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def hyperparameters(manifest: dict) -> dict:
    """A stage's own settings (its small dataclasses) plus the TrainingArguments that matter; no paths of this box."""
    rows = {}
    for section, values in (manifest.get("config") or {}).items():
        if section == "run" or not isinstance(values, dict):
            continue
        for k, v in flat(values).items():
            local_path = isinstance(v, str) and (v.startswith("/") or "dir" in k or "path" in k)  # this box's paths
            if (section != "train" or k in TRAIN_KEYS) and v not in (None, "", [], {}) and not local_path \
                    and k not in NOT_HYPERPARAMETERS:
                rows[k] = v
    return rows


def data_files_used(manifests: dict[str, dict], base: str) -> dict[str, set[str]]:
    """Bundled data file (repo-relative) -> stages that read it, from the resolved configs; pretraining data of the
    embedded base from its training_report.json."""
    used: dict[str, set[str]] = {}
    for stage, m in manifests.items():
        for v in flat(m.get("config")).values():
            for item in (v if isinstance(v, (list, dict)) else [v]):
                if isinstance(item, str) and "data/" in item and not item.startswith("runs/"):
                    used.setdefault(item[item.index("data/"):], set()).add(stage)
    report = Path(base) / "training_report.json"
    if is_local_base(base) and report.is_file():
        text_dir = json.loads(report.read_text()).get("config", {}).get("text_dir")
        if text_dir:
            used.setdefault(text_dir, set()).add("base")
    return used


def data_sources(used: dict[str, set[str]]) -> list[dict]:
    """Match each data file to its licensed source folder (data/sources/<name>/, data/pretrain/)."""
    folders = sorted((REPO_ROOT / "data" / "sources").iterdir()) if (REPO_ROOT / "data" / "sources").is_dir() else []
    found: dict[str, dict] = {}
    for path, stages in sorted(used.items()):
        if path.startswith("data/pretrain"):
            src = REPO_ROOT / "data" / "pretrain"
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


def ppo_results(ev: dict) -> list[str]:
    """The card's results for the PPO policy: eval's SFT-vs-PPO figures."""
    lines = [f"{ev['n_prompts']} prompts PPO never trained on; one sampled response per policy, scored by the run's reward model.", "",
             "| | SFT (reference) | PPO (this adapter) |", "|---|---|---|",
             f"| reward-model score (mean) | {ev['reward_sft_mean']:.3f} | {ev['reward_ppo_mean']:.3f} |",
             f"| response length (tokens) | {ev['length_sft_mean']:.1f} | {ev['length_ppo_mean']:.1f} |",
             f"| share without EOS | {ev['no_eos_sft']:.1%} | {ev['no_eos_ppo']:.1%} |",
             f"| KL to the SFT policy (nats/response) | 0 | {ev['kl_mean']:.3f} |", "",
             f"**Win rate of PPO over SFT under the reward model: {ev['win_rate']:.1%}** "
             f"(95% CI {ev['win_rate_ci_low']:.1%} – {ev['win_rate_ci_high']:.1%}, Wilson, ties counted half)."]
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
    return [f"{ev['n_prompts']} held-out prompts; one sampled response per policy with the same seed.", "",
            f"| | SFT (reference) | {policy} (this adapter) |", "|---|---|---|",
            f"| reward-model score (mean) | {sft['proxy_mean']:.3f} | {mine['proxy_mean']:.3f} |",
            f"| gold judge score (mean) | {num(sft['gold_mean'])} | {num(mine['gold_mean'])} |",
            f"| response length (tokens) | {sft['length_mean']:.1f} | {mine['length_mean']:.1f} |",
            f"| share without EOS | {sft['no_eos']:.1%} | {mine['no_eos']:.1%} |",
            f"| KL to the SFT policy (nats/response) | 0 | {mine['kl_mean']:.3f} |", "",
            "The win rates of every policy of the run against every other, and the gold score against KL: "
            "[`eval/report.md`](eval/report.md); every figure: `eval/report.json`."]


def reward_made(rm: dict) -> str:
    """How the card names the reward: one reward model, or make rm's ensemble of them."""
    n = int(rm.get("metrics", {}).get("ensemble", 1) or 1)
    made = ("a reward model trained on preference pairs (TRL `RewardTrainer`)" if n == 1 else
            f"an ensemble of {n} reward models trained on the same preference pairs with different seeds (TRL "
            f"`RewardTrainer`; the reward is the mean of their standardised scores)")
    if read_pooling(rm["outputs"]["adapter"]) == "sum":
        made += (" that scores a reply by the sum of its head over the reply's tokens divided by 16, not by the last token "
                 "(`score_pooling.json` beside the adapter; `pipeline.adapters.pool_in_forward` applies it)")
    return made


def model_card(args: PublishArgs, repo: str, run: str, manifests: dict[str, dict], base: str, base_ref: str,
               sources: list[dict], extras: list[str], dataset_repo: str | None) -> str:
    from huggingface_hub import ModelCardData

    local = is_local_base(base)
    method = policy_method(args.policy, manifests[args.policy])
    hub_ids = [args.hub_dataset_ids[s["name"]] for s in sources if s["name"] in args.hub_dataset_ids]
    data = ModelCardData(base_model=(args.base_model_id or None) if local else base, library_name="peft", license=args.license,
                         tags=TAGS[:2] + [method] + TAGS[2:], datasets=sorted(set(hub_ids + ([dataset_repo] if dataset_repo else []))) or None,
                         pipeline_tag="text-generation")
    ev, trained = manifests["eval"]["metrics"], manifests[args.policy]["metrics"]
    how = ("two stages: supervised fine-tuning (TRL `SFTTrainer`), then DPO (TRL `DPOTrainer`) on preference pairs with "
           "the SFT policy as the reference" if method == "dpo" else
           f"three stages: supervised fine-tuning (TRL `SFTTrainer`), {reward_made(manifests['rm'])}, then "
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
                  f"base = AutoModelForCausalLM.from_pretrained(\"{repo}\", subfolder=\"base\")",
                  f"model = PeftModel.from_pretrained(base, \"{repo}\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")"]
    else:
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo}\")  # downloads the base, {base}",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{repo}\")"]
    lines += ["messages = [{\"role\": \"user\", \"content\": \"Tell me a short story about a rabbit.\"}]",
              "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
              "out = model.generate(**ids, max_new_tokens=64, do_sample=True, temperature=0.7)",
              "print(tokenizer.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", ""]
    if local:
        lines += ["The base is not on the Hub, so it ships here under `base/`. In this repo's `adapter_config.json` it is "
                  "named by the absolute path it had on the machine that published it (where the folder loads with "
                  "`AutoPeftModelForCausalLM.from_pretrained(folder)` from any directory); from the Hub, load the base from "
                  "`subfolder=\"base\"` as above.", ""]
    if "merged/" in extras:
        lines += [f"Without peft: `AutoModelForCausalLM.from_pretrained(\"{repo}\", subfolder=\"merged\")` (base and adapter merged).", ""]
    lines += ["## Training", "", "| stage | key hyper-parameters |", "|---|---|"]
    for stage in ("sft", args.policy) if method == "dpo" else ("sft", "rm", args.policy):
        hp = hyperparameters(manifests[stage])
        lines.append(f"| {stage} | " + ("; ".join(f"`{k}`={fmt(v)}" for k, v in hp.items()).replace("|", "\\|") or "defaults") + " |")
    summary = (f"DPO: held-out preference accuracy {fmt(trained.get('eval_accuracy'))}." if method == "dpo" else
               f"{method.upper()}: {trained.get('updates', '?')} updates, reward {fmt(trained.get('reward_first'))} → "
               f"{fmt(trained.get('reward_last'))}, final KL {fmt(trained.get('kl_last'))}. Reward model: eval accuracy "
               f"{fmt(manifests['rm']['metrics'].get('eval_accuracy'))}.")
    lines += ["", summary + " Software: " + ", ".join(f"{k} {v}" for k, v in manifests[args.policy].get("versions", {}).items())
              + ".", "",
              "## Data", "", "| data | used by | source | license |", "|---|---|---|---|"]
    for s in sources:
        lines.append(f"| `{s['name']}` | {', '.join(sorted(s['stages']))} | {s['url'] or '—'} | {s['license']} |")
    if dataset_repo:
        lines.append(f"| [{dataset_repo}](https://huggingface.co/datasets/{dataset_repo}) | rm | human labels of this run | {args.dataset_license} |")
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
        raise ConfigError(f"generated model card lacks metadata {missing or TAGS + [method]}: this is a bug in stages/publish.py")


# ---------------------------------------------------------------------------------------------------- the upload

def get_token() -> str:
    from huggingface_hub import get_token as hub_token

    token = hub_token()
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access), "
                          "or pass --dry-run to only write the folder")
    return token


def upload(folders: list[tuple[Path, str, str]], args: PublishArgs, token: str) -> list[str]:
    """One commit per repo: (folder, repo_id, repo_type) in order. Returns the commit URLs.

    Every failure becomes one ConfigError that says what is on the Hub now: a commit either happened whole or
    not at all, so at most an empty repo or an earlier repo's full commit is left, and the message names it."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    constants.HF_HUB_OFFLINE = False  # the Makefile sets HF_HUB_OFFLINE=1 for the training stages; publishing is online
    api = HfApi(token=token)
    done: list[str] = []

    def state() -> str:
        return (f" Already committed: {', '.join(done)}." if done else "") + \
               " Nothing of this failed upload was committed (one commit per repo); rerun to retry."

    repo = None
    try:
        who = api.whoami()
        if (who.get("auth", {}).get("accessToken", {}) or {}).get("role") == "read":
            raise ConfigError(f"the Hugging Face token of '{who.get('name')}' is read-only: create a write token "
                              "(https://huggingface.co/settings/tokens) and set HF_TOKEN or run `hf auth login`")
        for folder, repo, repo_type in folders:
            api.create_repo(repo, repo_type=repo_type, private=True if args.private else None, exist_ok=True)
            if args.revision and args.revision != "main":
                api.create_branch(repo, branch=args.revision, repo_type=repo_type, exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type=repo_type,
                                     revision=args.revision or None, commit_message=args.commit_message)
            done.append(info.commit_url)
            print(f"uploaded {folder} -> {info.commit_url}")
    except (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as err:
        raise ConfigError(f"cannot reach the Hugging Face Hub at {api.endpoint} ({type(err).__name__}): check the network "
                          f"connection (and HF_ENDPOINT if set).{state()}") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if getattr(err, "response", None) is not None else None
        if status == 401:
            msg = "the Hugging Face token was rejected (invalid or expired): run `hf auth login` again or set a valid HF_TOKEN."
        elif status == 403 or isinstance(err, RepositoryNotFoundError):
            msg = (f"the token cannot write to '{repo}' (HTTP {status}): use a repo in your own namespace or an "
                   f"organisation where you have write access, and a token with write permission.")
        else:
            msg = f"the Hub refused the upload to '{repo}' (HTTP {status}): {str(err).splitlines()[0]}."
        raise ConfigError(msg + state()) from None
    return done


# ---------------------------------------------------------------------------------------------------- the stage

def main(args: PublishArgs, run: RunArgs) -> dict:
    stage = StageRun("publish", run.run, run.runs_dir)
    if not args.repo_id and not args.dry_run:
        raise ConfigError("no repo to publish to: pass REPO=user/name (`--repo_id`), or --dry-run to only write the folder")
    if args.policy not in POLICY_STAGES:
        raise ConfigError(f"--policy {args.policy}: publish one of the run's policies: {', '.join(POLICY_STAGES)}")
    repo = args.repo_id or f"your-name/{run.run}-rlhf-{args.policy}"
    if repo.count("/") != 1 or " " in repo:
        raise ConfigError(f"repo id '{repo}' is not of the form user/name")
    token = None if args.dry_run else get_token()  # before any work: a missing token should cost nothing
    policy, ev = stage.need(args.policy), stage.need("eval")
    evaluated = ev["metrics"].get("comparison") or ({"ppo": {}} if "win_rate" in ev["metrics"] else {})
    if args.policy not in evaluated:  # the card's figures come from the eval report
        raise ConfigError(f"the eval report of run '{run.run}' has no figures for its {args.policy} policy: run "
                          f"`make eval RUN={run.run}` again (it evaluates every policy the run has), then publish")
    sft, rm = stage.need("sft"), stage.need("rm")
    label = stage.need("label-export") if args.include_dataset else None
    config = {"publish": to_dict(args), "run": to_dict(run)}
    stage.prepare(config)

    # 1. The model folder, rebuilt from scratch so it holds exactly what is uploaded
    folder = stage.dir / "model"
    shutil.rmtree(folder, ignore_errors=True)
    base = sft["outputs"].get("base_model") or json.loads((Path(policy["outputs"]["adapter"]) / "adapter_config.json").read_text())["base_model_name_or_path"]
    local = is_local_base(base)
    base_ref = str(folder / "base") if local else base
    copy_adapter(policy["outputs"]["adapter"], folder, base_ref)
    if not (folder / "tokenizer_config.json").is_file():  # AutoPeftModel and users look for it beside the adapter
        for f in Path(sft["outputs"]["adapter"]).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(f, folder / f.name)
    extras = []
    if local:
        shutil.copytree(base, folder / "base", ignore=shutil.ignore_patterns("*.bin", "__pycache__"))
    if args.include_sft:
        copy_adapter(sft["outputs"]["adapter"], folder / "sft", base_ref)
        extras.append("sft/")
    if args.include_reward:  # an ensemble's other members beside the first: reward-1/, reward-2/, ...
        for name, path in reward_members(rm)[0].items():
            copy_adapter(path, folder / name, base_ref)
            extras.append(f"{name}/")
    if args.merged:
        merge(base, folder, folder, folder / "merged")
        extras.append("merged/")
    eval_dir = Path(ev["outputs"]["report"]).parent
    (folder / "eval").mkdir()
    for name in ("report.md", "report.json"):
        shutil.copy2(eval_dir / name, folder / "eval" / name)
    shutil.copytree(eval_dir / "plots", folder / "eval" / "plots")

    # 2. The preference dataset, for its own dataset repo
    dataset_folder, dataset_repo = None, None
    shutil.rmtree(stage.dir / "dataset", ignore_errors=True)  # an earlier --include_dataset run's folder is not uploaded now
    if label:
        dataset_repo = args.dataset_repo_id or f"{repo}-preferences"
        dataset_folder = stage.dir / "dataset"
        export_dataset(label["outputs"]["dataset"], dataset_folder, args, repo, run.run)

    # 3. The card, from the manifests
    manifests = {"sft": sft, "rm": rm, args.policy: policy, "eval": ev}
    sources = data_sources(data_files_used(manifests, base))
    card = model_card(args, repo, run.run, manifests, base, base_ref, sources, extras, dataset_repo)
    check_card(card, local, policy_method(args.policy, policy))
    (folder / "README.md").write_text(card)

    # 4. List what goes where; upload unless --dry-run
    targets = [(dataset_folder, dataset_repo, "dataset")] if dataset_folder else []
    targets.append((folder, repo, "model"))  # the model last: its card links the dataset
    for path, repo_id, kind in targets:
        files = list_folder(path)
        print(f"\n{kind} repo {repo_id}{'@' + args.revision if args.revision else ''}: {len(files)} files, "
              f"{sum(s for _, s in files) / 1e6:.2f} MB, from {path}")
        for name, size in files:
            print(f"  {name:<60} {size:>12,}")
    commits = [] if args.dry_run else upload(targets, args, token)
    if args.dry_run:
        print("\ndry run: nothing uploaded. To publish: make publish REPO=user/name")
    metrics = {"repo_id": repo, "dry_run": args.dry_run, "files": len(list_folder(folder)), "commits": commits,
               "dataset_repo_id": dataset_repo}
    outputs = {"folder": folder, **({"dataset_folder": dataset_folder} if dataset_folder else {})}
    stage.finish(outputs, metrics, config)
    return metrics


def CONFIG_CLASSES():
    return (PublishArgs, RunArgs)


def parse_args(argv=None):
    return parse(CONFIG_CLASSES(), argv)


if __name__ == "__main__":
    main_guard(lambda: main(*parse_args()))
