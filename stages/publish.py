"""Stage: share the result on the Hugging Face Hub: the PPO policy adapter, a model card, optionally more.

    make publish REPO=you/tiny-rlhf ARGS="--dry-run"      # write and list the folder, upload nothing
    make publish REPO=you/tiny-rlhf ARGS="--private --include_sft --include_reward --merged --include_dataset"

Reads the run's manifests (sft, rm, ppo, eval; label-export with --include_dataset). Writes
runs/<run>/publish/model/, exactly what goes to the model repo: the PPO adapter + tokenizer at the root (so
`AutoPeftModelForCausalLM` loads the repo), README.md (the model card, generated from the manifests:
stages/publish_card.py), eval/ (report + plots), and on request sft/ and reward/ adapters and merged/ (base + PPO
merged into one plain model). With --include_dataset also runs/<run>/publish/dataset/ (the label-export preferences
as parquet + a dataset card) for a dataset repo.

Every adapter_config.json names a base that works away from this checkout: the Hub id for a Hub base. The embedded
tiny base is not on the Hub, so it travels in the folder (base/). The local folder's adapters name it by its absolute
path there, so the folder loads with stock peft from any working directory; what is uploaded names it `base`, the
repo's own folder (this machine's path would tell the Hub the publisher's name and folders, and load nowhere else),
and the card shows how to load the repo from the Hub.

The token comes from HF_TOKEN or `hf auth login`; it is never printed, logged or written. Each repo gets exactly one
commit (HfApi.create_commit), so a failed upload leaves none of these files on the Hub.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from huggingface_hub import HfApi

from pipeline.adapters import read_pooling, reward_members
from pipeline.config import ConfigError, RunArgs, check_hub_repo_id, parse, resolve_path, to_dict
from pipeline.data import read_jsonl
from pipeline.models import FINGERPRINT_FILE
from pipeline.run import StageRun, main_guard, manifest_digest, read_manifest, stage_dir
from stages.eval_compare import POLICY_STAGES, policy_method
from stages.rm_data import LABEL_EXPORT, conversation_key
from stages.publish_card import (ENSEMBLE_FILE, base_license, card_license, check_card, data_files_used, data_sources,
                                 dataset_license, fmt, given_reward, given_sft, hub_base, labeled_prompts, model_card,
                                 prompts_source, public_judge, ships_base, stop_tokens_of, template_kwargs_of,
                                 upstream_read)

ADAPTER_SKIP = {"README.md", "training_args.bin"}  # peft's empty card template; a pickle of local paths
BASE_FIELDS = (("adapter_config.json", "base_model_name_or_path"), (FINGERPRINT_FILE, "base_model"))  # name the base
REPO_BASE = "base"  # a shipped base as the uploaded adapters name it: the repo's folder, not the publisher's path



@dataclass
class PublishArgs:
    # Where
    repo_id: str = field(default="", metadata={"help": "Hub model repo, user/name (`make publish REPO=...`)."})
    revision: str = field(default="", metadata={"help": "Branch to commit to (created if missing); '' = main."})
    private: bool = field(default=False, metadata={"help": "Create the repo private; an existing public repo is refused (publishing never changes a repo's visibility)."})
    dry_run: bool = field(default=False, metadata={"help": "Write and list the folder; no token, no network. Also --dry-run."})
    commit_message: str = field(default="", metadata={"help": "'' = what made the policy, e.g. 'Upload RLHF policy (SFT -> reward model -> GRPO, LoRA)'."})
    policy: str = field(default="ppo", metadata={"help": "The run's policy to publish: ppo, grpo, rloo, reinforce_pp or dpo."})
    # What
    include_sft: bool = field(default=False, metadata={"help": "Add the SFT adapter (the PPO reference) as sft/."})
    include_reward: bool = field(default=False, metadata={"help": "Add the reward-model adapter (LoRA + score head) as reward/ (an ensemble's others as reward-1/, ...)."})
    merged: bool = field(default=False, metadata={"help": "Add merged/: base + PPO adapter merged into one plain model."})
    merged_dtype: str = field(default="auto", metadata={"help": "merged/'s dtype: auto (the base's; a bf16 base loses an update below bf16's resolution, and publish says how much) or float32 (all of it, twice the size)."})
    include_dataset: bool = field(default=False, metadata={"help": "Publish the label-export preference dataset to a dataset repo."})
    dataset_repo_id: str = field(default="", metadata={"help": "Dataset repo for --include_dataset; '' = <repo_id>-preferences."})
    # Card
    license: str = field(default="", metadata={"help": "Card license; '' = the base's (its model card's), else apache-2.0. Must allow the base's and the data's licenses."})
    dataset_license: str = field(default="", metadata={
        "help": "License of the published preferences (--include_dataset); '' = apache-2.0 when their prompts are the "
                "bundled data, else required (your prompts' terms decide)."})
    base_model_id: str = field(default="", metadata={
        "help": "A local base's Hub id (a checkpoint downloaded from the Hub, unchanged): the repo names it as its base "
                "instead of shipping the base's weights under base/."})
    hub_dataset_ids: dict = field(default_factory=dict, metadata={"help": "Bundled source folder -> the Hub dataset it comes from (card `datasets`)."})


# ---------------------------------------------------------------------------------------------------- the folder

def copy_adapter(src: str | Path, dst: Path, base_ref: str) -> Path:
    """A stock PEFT folder whose adapter_config.json (and our fingerprint) name `base_ref` as the base."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name not in ADAPTER_SKIP:
            shutil.copy2(f, dst / f.name)
    for name, key in BASE_FIELDS:
        if (dst / name).is_file():
            data = json.loads((dst / name).read_text())
            data[key] = base_ref
            (dst / name).write_text(json.dumps(data, indent=2) + "\n")
    return dst


def naming_the_repos_base(folder: Path, local_base: str) -> dict[str, bytes]:
    """The files the repo receives in place of those that name the shipped base by its path on this machine (every
    adapter's adapter_config.json and pipeline_base.json, `local_base`): the same JSON naming it REPO_BASE. The local
    folder keeps the path, so that it loads from any working directory; on the Hub the path would only tell others the
    publisher's user name and folders (and a downloaded copy loads from its own root with REPO_BASE)."""
    replaced = {}
    for name, _ in list_folder(folder):
        for file_name, key in BASE_FIELDS:
            if Path(name).name == file_name:
                data = json.loads((folder / name).read_text())
                if data.get(key) == local_base:
                    replaced[name] = (json.dumps({**data, key: REPO_BASE}, indent=2) + "\n").encode()
    return replaced


MERGED_ERROR_WARNING = 0.1  # above this share of the update lost, merged/ is not the policy eval measured


def merged_error_line(policy: str, error: float) -> str:
    """What a 16-bit merged/ kept of the update: a note, or a warning past MERGED_ERROR_WARNING."""
    kind = "warning" if error > MERGED_ERROR_WARNING else "note"
    return (f"{kind}: merged/ stores the {policy} update with a relative error of {100 * error:.2g}% (the base's 16-bit "
            f"weights cannot hold changes that small): the adapter at the repo's root is exact; --merged_dtype float32 "
            f"keeps all of it in merged/")


def merge(base: str, adapter: Path, tokenizer_dir: Path, out: Path, dtype: str = "auto",
          trust_remote_code: bool = False) -> float:
    """Base + PPO LoRA folded into plain weights: loads with AutoModelForCausalLM alone, no peft needed. Merged in
    float32, saved in the base's own dtype ("auto") or float32. Returns the relative error of the update as saved,
    ||stored(W + dW) - (W + dW)|| / ||dW|| over the adapted layers: 0 in float32; in bf16, an update smaller than the
    weights' resolution rounds away (a PPO update that moves weights by a thousandth of their size loses about half)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    code = {"trust_remote_code": trust_remote_code}  # a base with its own modeling code, as its model profile says
    target = torch.float32 if dtype == "float32" else (AutoConfig.from_pretrained(base, **code).dtype or torch.float32)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **code),
                                      str(adapter))
    error = norm = 0.0
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                delta = module.get_delta_weight("default").float()
                merged = module.get_base_layer().weight.float() + delta
                error += float((merged.to(target).float() - merged).pow(2).sum())
                norm += float(delta.pow(2).sum())
    model.merge_and_unload().to(target).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir, **code).save_pretrained(out)
    return (error / norm) ** 0.5 if norm else 0.0


def size_category(n: int) -> str:
    """The Hub's size_categories value for n rows."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "1M<n<10M"


def held_out_by_the_reward_model(rm: dict, label: dict) -> dict | None:
    """The reward model's held-out split of the label export (`label`: its manifest now), from the rm stage's
    eval_pairs.jsonl: the conversations it held out (as rm_data.conversation_key names them), how many held-out pairs it scored of
    the export and of its other data, its held-out accuracy. None when it trained on another export or none."""
    if not rm_read_this_export(rm, label):
        return None
    scored = [pair for _, pair in read_jsonl(Path(rm["outputs"]["eval_pairs"]))]  # a damaged line: one error naming it
    exported = [pair for pair in scored if pair["source"] == LABEL_EXPORT]
    return {"prompts": {conversation_key(pair, 0) for pair in exported if pair.get("prompt")}, "scored": len(exported),
            "scored_elsewhere": len(scored) - len(exported), "accuracy": rm.get("metrics", {}).get("eval_accuracy")}


def as_held_out(ds, held_out: dict | None) -> dict:
    """The export as the splits the dataset repo gets: `test`, the pairs of the conversations the reward model held out
    (no prompt, nor conversation, in both splits, as it split them), and `train`, the rest; all of it `train` when it
    did not train on this export (`held_out` None) or held none of its prompts out."""
    test = [held_out is not None and bool(row.get("prompt")) and conversation_key(row, 0) in held_out["prompts"]
            for row in ds]
    if not any(test):
        return {"train": ds}
    return {"train": ds.select([i for i, t in enumerate(test) if not t]),
            "test": ds.select([i for i, t in enumerate(test) if t])}


def splits_line(splits: dict, held_out: dict | None, repo: str, given: bool = False) -> str:
    """The dataset card's words on its splits: which pairs the reward model held out, and what was measured on them.
    `given`: the published reward model is one the RL stage was given (--reward_adapter), not the run's."""
    model = f"the reward model of [{repo}](https://huggingface.co/{repo})"
    if given:
        return (f"All of them are in `train`: {model} is one its RL stage was given (`--reward_adapter`), not trained "
                f"on them here, so there is no held-out split of its to mark.")
    if held_out is None:
        return (f"All of them are in `train`: {model} did not train on this export (it read another, or none), so "
                f"there is no held-out split to mark.")
    if "test" not in splits:
        return f"They trained {model}, which held none of their prompts out: all of them are in `train`."
    test, train = len(splits["test"]), len(splits["train"])
    pairs = lambda n: f"{n} pair{'' if n == 1 else 's'}"  # noqa: E731
    elsewhere = (f", together with {pairs(held_out['scored_elsewhere'])} of its other data (not published here)"
                 if held_out["scored_elsewhere"] else "")
    # A held-out prompt with nothing to score (every pair a tie) is not in eval_pairs.jsonl, so its pairs are in train
    return (f"They trained {model}, split by prompt as it split them: `test` ({pairs(test)}) holds every pair of the "
            f"prompts it was measured on, none of which it trained on, `train` ({pairs(train)}) the other prompts' "
            f"pairs, which it trained on, save those it could not use (counted in the run's rm manifest: equal or "
            f"empty replies, too long for its `max_length`) and those of a held-out prompt with nothing to score (all "
            f"ties). Its held-out accuracy ({fmt(held_out['accuracy'])}, `eval_accuracy`) and the eval's agreement "
            f"of the reward model with a gold judge (where the eval had one) were measured on "
            f"{pairs(held_out['scored'])} of `test` (a tie, `is_tie`, has no right answer and is left out){elsewhere}.")


def export_dataset(dataset_dir: str, out: Path, args: PublishArgs, repo: str, run: str, prompts: str | None,
                   held_out: dict | None = None, given: bool = False) -> tuple[str, list[str]]:
    """The label-export preferences as one parquet file a split (the Hub's viewer reads them: `test` holds the pairs
    the reward model held out, `held_out`: held_out_by_the_reward_model) and a DatasetCard, which names where their
    prompts came from (`prompts`: labeled_prompts). Returns whose labels they are (people, simulated, all) and the
    splits written (no `test` when the reward model held none of the export's prompts out)."""
    import datasets
    from huggingface_hub import DatasetCard, DatasetCardData

    from stages.label.export import WHOSE, sources_of

    ds = datasets.load_from_disk(dataset_dir)
    ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    sources = sources_of(ds["annotator"])
    whose, source = WHOSE[sources], prompts_source(prompts)
    prompts_line = ("Prompts: of a source the label export does not name (their own terms apply)." if source["name"] is None
                    else f"Prompts: `{source['name']}`" + (f" ({source['url']}, {source['license']})." if source["url"]
                                                           else " (your own: its own terms apply)."))
    splits = as_held_out(ds, held_out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        rows.to_parquet(str(out / "data" / f"{name}-00000-of-00001.parquet"))
    data = DatasetCardData(license=args.dataset_license, tags=["rlhf", "preference", *whose.tags, "dpo", "reward-modeling"],
                           task_categories=["text-generation"], size_categories=[size_category(len(ds))],
                           configs=[{"config_name": "default", "data_files": [{"split": name, "path": f"data/{name}-*.parquet"}
                                                                              for name in splits]}])
    body = (f"\n# Preference labels of run `{run}`\n\n{len(ds)} {whose.pairs}, in TRL's conversational preference format: columns "
            f"{', '.join(f'`{c}`' for c in ds.column_names)}. {splits_line(splits, held_out, repo, given)}\n\n"
            f"{prompts_line}\n\n"
            "```python\nfrom datasets import load_dataset\n"
            f"ds = load_dataset(\"{args.dataset_repo_id or repo + '-preferences'}\")  # {', '.join(splits)}\n```\n")
    DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}").save(out / "README.md")
    return sources, list(splits)


def list_folder(folder: Path) -> list[tuple[str, int]]:
    """The files upload_folder sends (it never sends what huggingface_hub's DEFAULT_IGNORE_PATTERNS name), with sizes."""
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    files = {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*") if f.is_file()}
    return sorted((name, files[name]) for name in filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


# What a local base folder may hold that is not the model: training state (a base saved by a Trainer), and what
# upload_folder never sends (huggingface_hub's DEFAULT_IGNORE_PATTERNS: a git clone's .git/, which may hold a remote URL
# with a token, and `hf download --local-dir`'s .cache/huggingface/). Weights saved as pytorch_model*.bin are the model.
NOT_PART_OF_A_BASE = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json",
                      "__pycache__", ".git", ".cache")


# ---------------------------------------------------------------------------------------------------- the upload

def commit_message(args: PublishArgs, method: str, repo_type: str = "model") -> str:
    """The user's message, else what the repo receives and the chain that made the published policy (DPO has no reward
    model in it): the policy, or (the dataset repo) the preference labels it came from."""
    chain = "SFT -> DPO" if method == "dpo" else f"SFT -> reward model -> {method.upper().replace('_PP', '++')}"
    what = "preference labels of an RLHF policy" if repo_type == "dataset" else "RLHF policy"
    return args.commit_message or f"Upload {what} ({chain}, LoRA)"


def check_private(api, repos: list[tuple[str, str]]) -> None:
    """--private on a repo that exists and is public: create_repo(exist_ok=True) leaves an existing repo as it is, so
    the upload would be public. Refused before anything is created or uploaded."""
    from huggingface_hub.errors import RepositoryNotFoundError

    for repo, repo_type in repos:
        try:
            public = not api.repo_info(repo, repo_type=repo_type).private
        except RepositoryNotFoundError:  # a new repo: create_repo makes it private
            continue
        if public:
            kind = "--type dataset " if repo_type == "dataset" else ""
            raise ConfigError(f"--private: the {repo_type} repo '{repo}' already exists and is public, and publishing "
                              f"never changes a repo's visibility: make it private first (`hf repos settings {repo} "
                              f"{kind}--private`) or publish without --private. Nothing was uploaded.")


def get_token() -> str:
    from huggingface_hub import get_token as hub_token

    token = hub_token()
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access), "
                          "or pass --dry-run to only write the folder")
    return token


@contextmanager
def hub_errors(api, done: list[str], at: dict):
    """Online for its body, and every failure talking to the Hub becomes one ConfigError that says what is on the
    Hub now: a commit either happened whole or not at all, so at most an empty repo or an earlier repo's full commit
    (`done`) is left, and the message names it. `at["repo"]` is the repo being worked on."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    def state() -> str:
        return (f" Already committed: {', '.join(done)}." if done else "") + \
               " Nothing of this failed upload was committed (one commit per repo); rerun to retry."

    # The Makefile sets HF_HUB_OFFLINE=1 for the training stages; publishing is online, but only here: the folder is
    # built offline (transformers writes local_files_only into a saved tokenizer_config.json), as a dry run builds it.
    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False
    try:
        yield
    except (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as err:
        raise ConfigError(f"cannot reach the Hugging Face Hub at {api.endpoint} ({type(err).__name__}): check the network "
                          f"connection (and HF_ENDPOINT if set).{state()}") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if getattr(err, "response", None) is not None else None
        repo = at.get("repo")
        if status == 401:
            msg = "the Hugging Face token was rejected (invalid or expired): run `hf auth login` again or set a valid HF_TOKEN."
        elif status == 403 or isinstance(err, RepositoryNotFoundError):
            msg = (f"the token cannot write to '{repo}' (HTTP {status}): use a repo in your own namespace or an "
                   f"organisation where you have write access, and a token with write permission.")
        else:
            msg = f"the Hub refused the upload to '{repo}' (HTTP {status}): {str(err).splitlines()[0]}."
        raise ConfigError(msg + state()) from None
    finally:
        constants.HF_HUB_OFFLINE = offline


def check_hub(api, args: PublishArgs, repos: list[tuple[str, str]]) -> None:
    """What the Hub can tell before any work, so that a bad token or a public repo under --private writes nothing:
    the token is valid and may write, and no (repo, repo_type) that --private targets is public."""
    with hub_errors(api, [], {}):
        who = api.whoami()
        if (who.get("auth", {}).get("accessToken", {}) or {}).get("role") == "read":
            raise ConfigError(f"the Hugging Face token of '{who.get('name')}' is read-only: create a write token "
                              "(https://huggingface.co/settings/tokens) and set HF_TOKEN or run `hf auth login`")
        if args.private:
            check_private(api, repos)


def upload(api, folders: list[tuple[Path, str, str, dict[str, bytes]]], args: PublishArgs, method: str) -> list[str]:
    """One commit per repo: (folder, repo_id, repo_type, replaced) in order, each with its commit_message: the files
    list_folder lists, those in `replaced` (name -> bytes: naming_the_repos_base) with those bytes. Returns the
    commit URLs."""
    from huggingface_hub import CommitOperationAdd

    done: list[str] = []
    at: dict = {}
    with hub_errors(api, done, at):
        for folder, repo, repo_type, replaced in folders:
            at["repo"] = repo
            api.create_repo(repo, repo_type=repo_type, private=True if args.private else None, exist_ok=True)
            if args.revision and args.revision != "main":
                api.create_branch(repo, branch=args.revision, repo_type=repo_type, exist_ok=True)
            files = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=replaced.get(name, folder / name))
                     for name, _ in list_folder(folder)]
            info = api.create_commit(repo_id=repo, repo_type=repo_type, operations=files, revision=args.revision or None,
                                     commit_message=commit_message(args, method, repo_type))
            done.append(info.commit_url)
            print(f"uploaded {folder} -> {info.commit_url}")
    return done


# ---------------------------------------------------------------------------------------------------- the stage

def rm_read_this_export(rm: dict, label: dict | None) -> bool:
    """The reward model trained on the run's label export as it is now (`label`: its manifest, None when the run has
    none): not on none, nor on one exported before this one (its labels may be others')."""
    read = upstream_read(rm, LABEL_EXPORT)
    return bool(read) and label is not None and manifest_digest(label) == read


def labels_the_reward_model_read(rm: dict, label: dict | None) -> str | None:
    """Whose labels ("people", "simulated", "all") the run's label export (`label`: its manifest now, None when the run
    has none) held when the reward model read it; None when it read none, or the export was made again since."""
    return label.get("metrics", {}).get("sources") if rm_read_this_export(rm, label) else None


def read_manifest_if_any(run: RunArgs, name: str) -> dict | None:
    """A stage's manifest, None when the run has none (a damaged one is one clear error, as read_manifest's)."""
    path = stage_dir(run.runs_dir, run.run, name) / "manifest.json"
    return read_manifest(run.runs_dir, run.run, name, needed_by="`make publish`") if path.is_file() else None


def label_manifests(stage: StageRun, args: PublishArgs, rm: dict, run: RunArgs) -> tuple[dict | None, dict | None]:
    """The run's label export and pairs manifests as they are now, each read once, so that the dataset, its license and
    the card describe the same export (a second read could find the one a `make label-export` wrote meanwhile). The
    export when it is published (needed) or the reward model read one (the card names whose labels); the pairs when
    there is an export (the card names their prompts)."""
    label = stage.need("label-export") if args.include_dataset else \
        read_manifest_if_any(run, "label-export") if upstream_read(rm, LABEL_EXPORT) else None
    return label, read_manifest_if_any(run, "pairs") if label else None


def data_of_the_card(manifests: dict[str, dict], base: str, label: dict | None, pairs: dict | None) -> list[dict]:
    """The card's data table: the files the stages read, and the prompts of the labeled pairs the reward model
    learned from (the run's label export, `label`, when it is the one the rm stage read; `pairs`: the run's pairs
    manifest now)."""
    used = data_files_used(manifests, base)
    if labels_the_reward_model_read(manifests["rm"], label):
        labeled = labeled_prompts(label, pairs)
        if labeled:
            used.setdefault(labeled, set()).add("pairs")
    return data_sources(used)


def check_args(args: PublishArgs, run: RunArgs) -> str:
    """What the flags alone can tell (make runs this before the stages publish depends on: `make publish` on a fresh
    run would otherwise train the whole pipeline first). Returns the model repo id."""
    if not args.repo_id and not args.dry_run:
        raise ConfigError("no repo to publish to: pass REPO=user/name (`--repo_id`), or --dry-run to only write the folder")
    if args.merged_dtype not in ("auto", "float32"):
        raise ConfigError(f"--merged_dtype {args.merged_dtype}: give auto (the base's dtype) or float32")
    if args.policy not in POLICY_STAGES:
        raise ConfigError(f"--policy {args.policy}: publish one of the run's policies: {', '.join(POLICY_STAGES)}")
    repo = args.repo_id or f"your-name/{run.run}-rlhf-{args.policy}"
    check_hub_repo_id(repo, "--repo_id")
    if args.include_dataset:
        check_hub_repo_id(args.dataset_repo_id or f"{repo}-preferences", "--dataset_repo_id")
    return repo


def stage_rerun_since(ev: dict, upstream: dict[str, dict]) -> str | None:
    """The first of `upstream` (name -> manifest now) that is not the manifest the eval report read, or None (also
    when the report does not record what it read: written by an older version)."""
    read = (ev.get("inputs") or {}).get("manifests")
    if read is None:
        return None
    return next((name for name, manifest in upstream.items() if read.get(name) != manifest_digest(manifest)), None)


def trusts_its_code(sft: dict) -> bool:
    """The model profile's trust_remote_code, for the merge's load of the base: the profile the SFT stage ran with."""
    from pipeline.models import profile_from

    profile = ((sft.get("config") or {}).get("run") or {}).get("model_config")
    return bool(profile) and resolve_path(profile).is_file() and profile_from(profile).trust_remote_code


def write_ensemble_member(folder: Path, index: int, stats: list[tuple[float, float]]) -> None:
    """What a stranger needs to score as the ensemble PPO optimised (pipeline.adapters.ensemble_score): this member's
    held-out reward mean and std, which live only in the run's rm manifest. One reward model is its own score."""
    mean, std = stats[index]
    (folder / ENSEMBLE_FILE).write_text(json.dumps(
        {"member": index, "members": len(stats), "reward_mean": mean, "reward_std": std,
         "rule": "ensemble reward = mean over the members (reward/, reward-1/, ...) of (score - reward_mean) / "
                 "reward_std, each score as its score_pooling.json says"}, indent=1) + "\n")


def published_rewards(rm: dict, given: str | None) -> dict[str, str]:
    """--include_reward's folders: the reward model the policy optimised, which is the rm stage's (its ensemble as
    reward/, reward-1/, ...) unless the RL stage was given another (`given`: given_reward). DPO has none of its own:
    the rm stage's."""
    return {"reward": str(resolve_path(given))} if given else reward_members(rm)[0]


def main(args: PublishArgs, run: RunArgs) -> dict:
    stage = StageRun("publish", run.run, run.runs_dir)
    repo = check_args(args, run)
    token = None if args.dry_run else get_token()  # before any work: a missing token should cost nothing
    policy, ev = stage.need(args.policy), stage.need("eval")
    evaluated = ev["metrics"].get("comparison") or ({"ppo": {}} if "win_rate" in ev["metrics"] else {})
    if args.policy not in evaluated:  # the card's figures come from the eval report
        raise ConfigError(f"the eval report of run '{run.run}' has no figures for its {args.policy} policy: run "
                          f"`make eval RUN={run.run}` again (it evaluates every policy the run has), then publish")
    sft, rm = stage.need("sft"), stage.need("rm")
    rerun = stage_rerun_since(ev, {"sft": sft, "rm": rm, args.policy: policy})
    if rerun:  # `make publish` reruns eval first; a direct run would publish another policy's figures
        raise ConfigError(f"the {rerun} stage of run '{run.run}' ran again after its eval report was made, so the "
                          f"report's figures are not this {args.policy} policy's: run `make eval RUN={run.run}`, then "
                          f"publish")
    label_now, pairs_now = label_manifests(stage, args, rm, run)
    label = label_now if args.include_dataset else None
    # Every upstream output the folder is built from, before the last publish folder is deleted
    needed = [(args.policy, policy["outputs"]["adapter"]), ("sft", sft["outputs"]["adapter"]),
              ("eval", ev["outputs"]["report"]), ("eval", Path(ev["outputs"]["report"]).with_suffix(".json"))]
    started_from = given_sft(policy)
    if args.include_sft and started_from:  # sft/ would be the run's SFT, which this policy did not start from
        raise ConfigError(f"the {args.policy} stage of run '{run.run}' started from the SFT adapter it was given "
                          f"(sft_adapter: {started_from}), not the run's: publish without --include_sft (the card "
                          f"names that adapter)")
    given = given_reward(policy)
    rewards = published_rewards(rm, given) if args.include_reward else {}
    if given and args.include_reward and not resolve_path(given).exists():
        raise ConfigError(f"{rewards['reward']}, the reward model the {args.policy} stage of run '{run.run}' was given "
                          f"(reward_adapter), is missing: put it back, or publish without --include_reward")
    needed += [("rm", path) for path in rewards.values()] if not given else []
    needed += [("label-export", label["outputs"]["dataset"])] if label else []
    if label and rm_read_this_export(rm, label):  # the published test split is the reward model's held-out prompts
        needed.append(("rm", rm["outputs"]["eval_pairs"]))  # every rm manifest records it
    for name, path in needed:
        if not Path(path).exists():
            raise ConfigError(f"{path}, an output of the {name} stage of run '{run.run}', is missing: run `make "
                              f"{name} RUN={run.run} FORCE=1`, then publish")
    dataset_repo = (args.dataset_repo_id or f"{repo}-preferences") if args.include_dataset else None
    prompts = labeled_prompts(label, pairs_now) if label else None
    if label:  # the license the preferences go out under, decided (or refused) before anything is written
        args = replace(args, dataset_license=dataset_license(args, prompts, run.run))
    base = sft["outputs"].get("base_model") or json.loads((Path(policy["outputs"]["adapter"]) / "adapter_config.json").read_text())["base_model_name_or_path"]
    manifests = {"sft": sft, "rm": rm, args.policy: policy, "eval": ev}
    sources = data_of_the_card(manifests, base, label_now, pairs_now)
    for adapter in {rm["outputs"]["adapter"], *([resolve_path(given)] if given else [])}:
        read_pooling(adapter)  # the card describes its score: a pooling file this code would not apply is refused now
    api = None
    if not args.dry_run:  # a rejected token or a public repo under --private: before the run folder is touched
        api = HfApi(token=token)
        check_hub(api, args, ([(dataset_repo, "dataset")] if dataset_repo else []) + [(repo, "model")])
    config = {"publish": to_dict(args), "run": to_dict(run)}
    stage.prepare(config)

    # 1. The model folder, rebuilt from scratch so it holds exactly what is uploaded
    folder = stage.dir / "model"
    shutil.rmtree(folder, ignore_errors=True)
    local = ships_base(base, args)
    base_ref = str(folder / "base") if local else hub_base(base, args)
    copy_adapter(policy["outputs"]["adapter"], folder, base_ref)
    if not (folder / "tokenizer_config.json").is_file():  # AutoPeftModel and users look for it beside the adapter
        for f in Path(sft["outputs"]["adapter"]).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(f, folder / f.name)
    extras = []
    if local:
        shutil.copytree(base, folder / "base", ignore=shutil.ignore_patterns(*NOT_PART_OF_A_BASE))
    if args.include_sft:
        copy_adapter(sft["outputs"]["adapter"], folder / "sft", base_ref)
        extras.append("sft/")
    member_stats = reward_members(rm)[1] if rewards and not given else []
    for index, (name, path) in enumerate(rewards.items()):  # an ensemble's other members beside the first: reward-1/, ...
        copy_adapter(path, folder / name, base_ref)
        if len(member_stats) > 1:
            write_ensemble_member(folder / name, index, member_stats)
        extras.append(f"{name}/")
    merged_error = None
    if args.merged:
        merged_error = merge(base, folder, folder, folder / "merged", args.merged_dtype, trusts_its_code(sft))
        extras.append("merged/")
        if merged_error > 0:
            print(merged_error_line(args.policy, merged_error), file=sys.stderr)
    eval_dir = Path(ev["outputs"]["report"]).parent
    (folder / "eval").mkdir()
    judge = ev["metrics"].get("gold_judge") or ""
    report = json.loads((eval_dir / "report.json").read_text(encoding="utf-8"))
    # This machine's folders the report names, by the names the card gives them: a reward or SFT adapter the RL stages
    # were given (--reward_adapter, --sft_adapter) by its folder's name, an rm: judge by its last two folders.
    public = {given: Path(given).name for given in (report.get("reward_adapter"), report.get("sft_adapter")) if given}
    if judge.startswith("rm:"):
        public[judge[3:].strip()] = public_judge(judge)[3:]
    for name in ("report.md", "report.json"):
        text = (eval_dir / name).read_text(encoding="utf-8")
        for path in sorted(public, key=len, reverse=True):  # wherever the report names it: as written, as JSON escapes it
            for written in {path, json.dumps(path)[1:-1], json.dumps(path, ensure_ascii=False)[1:-1]}:
                text = text.replace(written, public[path])
        (folder / "eval" / name).write_text(text, encoding="utf-8")
    if (eval_dir / "plots").is_dir():  # none for a run without PPO and without a gold judge
        shutil.copytree(eval_dir / "plots", folder / "eval" / "plots")

    # 2. The preference dataset, for its own dataset repo
    dataset_folder, dataset_sources, dataset_splits = None, None, []
    shutil.rmtree(stage.dir / "dataset", ignore_errors=True)  # an earlier --include_dataset run's folder is not uploaded now
    if label:
        dataset_folder = stage.dir / "dataset"
        dataset_sources, dataset_splits = export_dataset(label["outputs"]["dataset"], dataset_folder, args, repo,
                                                         run.run, prompts,
                                                         None if given else held_out_by_the_reward_model(rm, label),
                                                         bool(given))

    # 3. The card, from the manifests (whose labels the reward model learned from, published or not)
    dataset_sources = dataset_sources or labels_the_reward_model_read(rm, label_now)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))  # as published: how the card's snippets template and stop
    license, note = card_license(args, base_license(base, args, online=not args.dry_run))
    if note:
        print(note, file=sys.stderr)
    card = model_card(args, repo, run.run, {**manifests, **({"label-export": label_now} if label_now else {})}, base,
                      base_ref, sources, extras, dataset_repo, dataset_sources, license,
                      test_split="test" in dataset_splits, template_kwargs=template_kwargs_of(tokenizer),
                      stop_tokens=stop_tokens_of(tokenizer, base_ref))
    check_card(card, local, policy_method(args.policy, policy))
    (folder / "README.md").write_text(card)

    # 4. List what goes where (as uploaded: a shipped base named as the repo's folder); upload unless --dry-run
    replaced = naming_the_repos_base(folder, base_ref) if local else {}
    targets = [(dataset_folder, dataset_repo, "dataset", {})] if dataset_folder else []
    targets.append((folder, repo, "model", replaced))  # the model last: its card links the dataset
    for path, repo_id, kind, sent_instead in targets:
        files = [(name, len(sent_instead[name]) if name in sent_instead else size) for name, size in list_folder(path)]
        print(f"\n{kind} repo {repo_id}{'@' + args.revision if args.revision else ''}: {len(files)} files, "
              f"{sum(s for _, s in files) / 1e6:.2f} MB, from {path}")
        for name, size in files:
            print(f"  {name:<60} {size:>12,}")
        if sent_instead:
            print(f"  ({len(sent_instead)} files name the base `{REPO_BASE}`, the repo's folder, in the repo; here its "
                  f"path, so that this folder loads from any directory)")
    method = policy_method(args.policy, policy)
    message = commit_message(args, method)
    commits = [] if args.dry_run else upload(api, targets, args, method)
    if args.dry_run:
        # the same options: the command as it was printed dropped them (a run of it sent another set of files)
        print("\ndry run: nothing uploaded. To publish: the same command without --dry-run"
              + ("" if args.repo_id else ", with REPO=user/name"))
    metrics = {"repo_id": repo, "dry_run": args.dry_run, "files": len(list_folder(folder)), "commits": commits,
               "commit_message": message, "dataset_repo_id": dataset_repo, "merged_update_error": merged_error}
    outputs = {"folder": folder, **({"dataset_folder": dataset_folder} if dataset_folder else {})}
    stage.finish(outputs, metrics, config)
    return metrics


def CONFIG_CLASSES():
    return (PublishArgs, RunArgs)


def parse_args(argv=None):
    return parse(CONFIG_CLASSES(), argv)


if __name__ == "__main__":
    main_guard(lambda: main(*parse_args()))
