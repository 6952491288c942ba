"""`make publish`: the dry-run folder loads with stock peft in a fresh process and generates what the pipeline's PPO
policy generates; the card parses; the upload goes end to end through a fake Hub (a local HTTP server speaking the
Hub's repo-creation, preupload and commit API); the token never leaks; each failure is one clear error."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.launch import free_port
from tests.conftest import REPO, yaml_with
from tests.fake_upstream import build_label_export, evaluated_run

TOKEN = "hf_TESTtokenNEVERtoBEseen0123456789"
PROMPT = [{"role": "user", "content": "Tell me about rabbits."}]


def publish(runs_dir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The Makefile's command line, in a fresh process."""
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    return subprocess.run([sys.executable, "-m", "stages.publish", "--config", "configs/publish.yaml", "--run", "t",
                           "--runs_dir", str(runs_dir), *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**clean, "HF_HOME": str(runs_dir.parent / "hf_home"), **(env or {})})


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    runs_dir = evaluated_run(tmp_path_factory, tiny_models["llama"])
    if not (runs_dir / "t" / "label-export" / "manifest.json").is_file():
        build_label_export(runs_dir)
    return runs_dir


@pytest.fixture(scope="module")
def dry_run(runs, tmp_path_factory):
    """`make publish REPO=tester/tiny-rlhf ARGS="--dry-run --include_sft --include_reward --merged --include_dataset"`,
    no token and no network; the folders are copied aside so the upload test can compare bytes."""
    proc = publish(runs, "--repo_id", "tester/tiny-rlhf", "--dry-run", "--include_sft", "--include_reward", "--merged",
                   "--include_dataset", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    keep = tmp_path_factory.mktemp("dry_run")
    shutil.copytree(runs / "t" / "publish" / "model", keep / "model")
    shutil.copytree(runs / "t" / "publish" / "dataset", keep / "dataset")
    return keep, proc


def test_dry_run_writes_and_lists_exactly_the_folder(runs, dry_run):
    keep, proc = dry_run
    manifest = json.loads((runs / "t" / "publish" / "manifest.json").read_text())
    assert manifest["metrics"]["dry_run"] is True and manifest["metrics"]["commits"] == []
    assert Path(manifest["outputs"]["folder"]) == runs / "t" / "publish" / "model"
    model = files_of(keep / "model")
    for name in model:  # every file is listed, with its size
        assert f"  {name} " in proc.stdout, name
    assert f"{len(model)} files" in proc.stdout and "dry run: nothing uploaded" in proc.stdout
    # the way on names these options (the line said `make publish REPO=user/name`: another set of files, no dataset)
    assert "\ndry run: nothing uploaded. To publish: the same command without --dry-run\n" in proc.stdout
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
                 "base/model.safetensors", "sft/adapter_config.json", "reward/adapter_model.safetensors",
                 "merged/model.safetensors", "eval/report.md", "eval/plots/overview.png"):
        assert name in model, name
    assert "training_args.bin" not in " ".join(model) and "reward-1/adapter_config.json" not in model
    assert "reward/ensemble_member.json" not in model  # one reward model: its own score, nothing to standardise
    assert "a reward model trained on preference pairs (TRL `RewardTrainer`)" in model["README.md"].decode()
    assert set(files_of(keep / "dataset")) == {"README.md", "data/train-00000-of-00001.parquet"}
    # every adapter names the base copied into the folder, not this checkout's runs/ or models/
    for cfg in ("adapter_config.json", "sft/adapter_config.json", "reward/adapter_config.json"):
        base = json.loads(model[cfg])["base_model_name_or_path"]
        assert base == str(runs / "t" / "publish" / "model" / "base"), (cfg, base)


def test_the_reward_model_loads_as_the_card_says(dry_run):
    """The card's reward-model lines, run as written on the published folder (the repo id as its path): they named
    AutoModelForSequenceClassification and `num_labels=1` alone, and the obvious load of the shipped base failed
    ("Unrecognized model in base": its root's adapter_config.json is the policy's); the base needs adapter_kwargs, as
    the policy's lines say."""
    import re

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    keep, _ = dry_run
    card = (keep / "model" / "README.md").read_text()
    line = next(line for line in card.splitlines() if line.startswith("The reward model"))
    load_base, load_member = re.findall(r"`((?:AutoModelForSequenceClassification|PeftModel)\.from_pretrained\(.*?\))`", line)
    here = json.dumps(str(keep / "model"))
    model = eval(load_base.replace('"tester/tiny-rlhf"', here), {"AutoModelForSequenceClassification":
                                                                  AutoModelForSequenceClassification})
    model = eval(load_member.replace('"tester/tiny-rlhf"', here), {"PeftModel": PeftModel, "model": model})
    reward = dict(model.named_parameters())
    assert any("score" in name for name in reward) and any("lora_" in name for name in reward)
    assert model.peft_config["default"].task_type == "SEQ_CLS"


def test_an_rm_judges_path_reaches_no_published_file(runs, tmp_path):
    """eval's report names its judge as given, `rm:/home/me/.../rm/adapter`: the published card and the copies of the
    report named this machine's folders. They name it by its last two folders; a reward or SFT adapter given to the RL
    stages (whose paths the report named too, and the upload sent) by its folder's name, as the card does."""
    import stages.eval as ev

    copy = tmp_path / "runs"
    shutil.copytree(runs, copy, ignore=shutil.ignore_patterns("publish"))
    eval_dir, spec = copy / "t" / "eval", "rm:/home/jos\u00e9/secret/big/rm/adapter"
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    was = manifest["metrics"]["gold_judge"]
    manifest["metrics"]["gold_judge"] = spec
    manifest["outputs"]["report"] = str(eval_dir / "report.md")  # the copy's, not the module's run
    (eval_dir / "manifest.json").write_text(json.dumps(manifest))
    from pipeline.judges import describe_judge

    text = (eval_dir / "report.md").read_text()  # the judge as eval writes it: named, and described
    assert f"`{was}`" in text
    (eval_dir / "report.md").write_text(text.replace(f"`{was}`", f"`{spec}`") + describe_judge(spec) + "\n")
    text = (eval_dir / "report.json").read_text()  # ... and in JSON, escaped as json.dumps writes it
    assert f'"{was}"' in text
    report = json.loads(text.replace(f'"{was}"', json.dumps(spec)))
    # a reward and an SFT adapter given to the RL stages (--reward_adapter, --sft_adapter): eval names them as given
    given = {"reward_adapter": "/home/jos\u00e9/secret/models/my-rm", "sft_adapter": "/home/jos\u00e9/secret/models/my-sft"}
    (eval_dir / "report.json").write_text(json.dumps({**report, **given}))
    (eval_dir / "report.md").write_text((eval_dir / "report.md").read_text() + ev.render_markdown(
        {**report, **given}, 2).split("\n")[2] + "\n")
    proc = publish(copy, "--repo_id", "tester/tiny-rlhf", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = copy / "t" / "publish" / "model"
    for name in ("README.md", "eval/report.md", "eval/report.json"):
        text = (folder / name).read_text()
        assert "rm:.../rm/adapter" in text and "/home/" not in text and "secret" not in text, name
    assert "the score the reward model .../rm/adapter gives" in (folder / "eval" / "report.md").read_text()
    assert "the reward model the RL stages were given (`my-rm`)" in (folder / "eval" / "report.md").read_text()
    assert "given as `sft_adapter` (`my-sft`)" in (folder / "eval" / "report.md").read_text()
    assert {k: json.loads((folder / "eval" / "report.json").read_text())[k] for k in given} == {
        "reward_adapter": "my-rm", "sft_adapter": "my-sft"}


def test_folder_loads_in_a_fresh_process_with_stock_peft_and_matches_the_pipeline(runs, dry_run, tiny_models, tmp_path):
    """Stock AutoPeftModelForCausalLM, another working directory, offline: same greedy and same seeded tokens."""
    import torch

    from pipeline.adapters import AdapterStack
    from pipeline.generation import SamplingConfig, encode_prompts, generate
    from pipeline.models import load_tokenizer, profile_from

    folder = runs / "t" / "publish" / "model"
    script = textwrap.dedent(f"""
        import json, torch
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder = {str(folder)!r}
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok.apply_chat_template({PROMPT!r}, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        kw = dict(max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out = {{}}
        for name, model in (("peft", AutoPeftModelForCausalLM.from_pretrained(folder)),
                            ("merged", AutoModelForCausalLM.from_pretrained(folder + "/merged"))):
            model.eval()
            out[name + "_greedy"] = model.generate(**ids, do_sample=False, **kw)[0, ids["input_ids"].shape[1]:].tolist()
            torch.manual_seed(7)
            out[name + "_sampled"] = model.generate(**ids, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, **kw)[0, ids["input_ids"].shape[1]:].tolist()
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])

    profile = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(profile)
    ppo_adapter = json.loads((runs / "t" / "ppo" / "manifest.json").read_text())["outputs"]["adapter"]
    stack = AdapterStack.build(profile, tok, {"ppo": ppo_adapter})
    prompt_ids = encode_prompts(tok, [PROMPT])

    def ours(temperature, seed=None):
        g = generate(stack.model, tok, prompt_ids, SamplingConfig(max_new_tokens=12, temperature=temperature), generator_seed=seed)
        return g.response_ids[0][g.response_mask[0].bool()].tolist()

    def until_eos(ids):
        return ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids

    greedy, sampled = ours(0.0), ours(0.7, seed=7)
    assert len(greedy) > 0
    assert until_eos(fresh["peft_greedy"]) == greedy and until_eos(fresh["merged_greedy"]) == greedy
    assert until_eos(fresh["peft_sampled"]) == sampled
    assert torch.tensor(greedy).numel() == len(greedy)


def test_card_parses_with_the_hub_metadata(runs, dry_run):
    from huggingface_hub import DatasetCard, ModelCard

    keep, _ = dry_run
    card = ModelCard.load(keep / "model" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"  # the test base has no card: the note
    assert "note: the base's model card names no license" in dry_run[1].stderr
    assert {"trl", "rlhf", "ppo", "lora"} <= set(meta["tags"])
    assert "tester/tiny-rlhf-preferences" in meta["datasets"] and "openai/gsm8k" in meta["datasets"]
    assert "base_model" not in meta  # a local base: not a Hub id, shipped under base/ instead
    text = card.text
    for needle in ("Win rate of PPO over SFT", "eval/plots/overview.png", "PeftModel.from_pretrained", "subfolder=\"base\"",
                   "## Intended use and limits", "| sft |", "| ppo |", "Apache-2.0", "MIT", "learning_rate"):
        assert needle in text, needle
    assert "/tmp" not in text.split("## How to use")[0]  # no local paths in the description
    # the card's own loading lines work: run on the folder as it would be downloaded (the repo id -> its path)
    code = text.split("## How to use")[1].split("```python")[1].split("```")[0].split("messages =")[0]
    merged = text.split("Without peft: `")[1].split("`")[0]
    script = (code + f"\nmerged = {merged}\nprint(type(model).__name__, type(merged).__name__)").replace(
        '"tester/tiny-rlhf"', repr(str(keep / "model")))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0 and "PeftModelForCausalLM" in res.stdout, res.stderr[-2000:]
    ds_card = DatasetCard.load(keep / "dataset" / "README.md")
    assert ds_card.data.to_dict()["license"] == "apache-2.0"
    # the fixture's labels are a person's ("ann"): said so on both cards; its reward model trained on the bundled
    # preferences, not on them (the card once said rm did, and "accuracy on the held-out pairs of its own labels")
    assert "human-feedback" in ds_card.data.to_dict()["tags"] and "5 human preference pairs" in ds_card.text
    assert "| no stage of this run | human labels of this run |" in text
    assert "Reward model: accuracy 0.61 on its held-out pairs. Software:" in text


def test_the_card_takes_the_bases_license_unless_told_otherwise(tmp_path, monkeypatch):
    """The card said apache-2.0 whatever the base: a Llama or Gemma base's adapters went out under a license their
    base's terms do not allow. `license: ""` (the default) takes the base's own card's (a local base's README.md; a
    Hub base's from the cache, or from the Hub when publishing for real, never in a dry run); --license overrides it,
    with a note naming the base's; a base whose card names none gets apache-2.0 and a note saying so."""
    import huggingface_hub

    from stages.publish import PublishArgs
    from stages.publish_card import base_license, card_license

    def base_with_card(name: str, meta: str | None) -> str:
        folder = tmp_path / name
        folder.mkdir()
        if meta is not None:
            (folder / "README.md").write_text(f"---\n{meta}---\n\n# A base\n")
        return str(folder)

    llama = base_with_card("llama", "license: llama3.2\nlibrary_name: transformers\n")
    assert base_license(llama, PublishArgs(), online=False) == {"license": "llama3.2"}
    assert card_license(PublishArgs(), {"license": "llama3.2"}) == ({"license": "llama3.2"}, None)
    told, note = card_license(PublishArgs(license="mit"), {"license": "llama3.2"})
    assert told == {"license": "mit"} and "the base's own card says llama3.2" in note
    assert card_license(PublishArgs(license="llama3.2"), {"license": "llama3.2"}) == ({"license": "llama3.2"}, None)
    other = base_with_card("other", "license: other\nlicense_name: my-terms\nlicense_link: LICENSE.md\n")
    assert base_license(other, PublishArgs(), online=False) == {"license": "other", "license_name": "my-terms",
                                                               "license_link": "LICENSE.md"}
    assert base_license(base_with_card("none", None), PublishArgs(), online=False) is None
    assert base_license(base_with_card("blank", "library_name: transformers\n"), PublishArgs(), online=False) is None
    default, note = card_license(PublishArgs(), None)
    assert default == {"license": "apache-2.0"} and note.startswith("note: the base's model card names no license")
    assert card_license(PublishArgs(license="mit"), None) == ({"license": "mit"}, None)

    # a Hub base (or a local one's --base_model_id): the cache's card, else the Hub's only when publishing for real
    gemma_card = Path(base_with_card("gemma", "license: gemma\n")) / "README.md"
    asked = []

    def download(repo, filename):
        asked.append((repo, filename))
        return str(gemma_card)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename: None)
    assert base_license("google/gemma-2-2b-it", PublishArgs(), online=False) is None and asked == []
    assert base_license("google/gemma-2-2b-it", PublishArgs(), online=True) == {"license": "gemma"}
    assert base_license(llama, PublishArgs(base_model_id="google/gemma-2-2b-it"), online=True) == {"license": "gemma"}
    assert asked == [("google/gemma-2-2b-it", "README.md")] * 2
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, filename: str(gemma_card) if repo == "google/gemma-2-2b-it" else None)
    assert base_license("google/gemma-2-2b-it", PublishArgs(), online=False) == {"license": "gemma"}

    def gated(repo, filename):
        raise huggingface_hub.errors.GatedRepoError("no access")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    assert base_license("meta-llama/Llama-3.2-1B", PublishArgs(), online=True) is None


def test_the_embedded_bases_card_is_the_one_make_base_writes():
    """models/tiny/README.md (the license its adapters get) is what stages.base writes from its training report."""
    from stages.base import model_card

    report = json.loads((REPO / "models" / "tiny" / "training_report.json").read_text())
    assert (REPO / "models" / "tiny" / "README.md").read_text() == model_card(report["config"], report["metrics"],
                                                                             report["samples"])


def test_simulated_labels_are_not_published_as_human_feedback(runs, tmp_path):
    """The default run's labels come from simulated annotators: the dataset card and the model card say so, and the
    dataset is not tagged human-feedback. Mixed labels say both."""
    import datasets
    from huggingface_hub import DatasetCard

    from stages.label.export import sources_of
    from stages.publish import PublishArgs, export_dataset, size_category
    from stages.publish_card import model_card

    from pipeline.run import manifest_digest

    manifests = {s: json.loads((runs / "t" / s / "manifest.json").read_text()) for s in ("sft", "rm", "ppo", "eval")}
    manifests["label-export"] = {"stage": "label-export", "outputs": {"dataset": "d"}}  # the one the reward model read
    manifests["rm"] = {**manifests["rm"], "inputs": {"manifests": {"label-export": manifest_digest(manifests["label-export"])}}}
    base = "HuggingFaceTB/SmolLM2-135M-Instruct"

    assert sources_of(["alice", "bob,carol"]) == "people" and sources_of(["sim:a-1,sim:a-2"]) == "simulated"
    assert sources_of(["sim:a-1", "alice,sim:a-2"]) == "all" and sources_of(["alice", "sim:x"]) == "all"
    assert [size_category(n) for n in (999, 1000, 9999, 10_000, 99_999, 100_000)] == \
        ["n<1K", "1K<n<10K", "1K<n<10K", "10K<n<100K", "10K<n<100K", "100K<n<1M"]
    for annotators, tag, phrase, who in (
            (["sim:sentiment-1,sim:sentiment-2"] * 3, "synthetic", "3 preference pairs labeled by simulated annotators, not people",
             "simulated annotators' labels (not people's) of this run"),
            (["alice", "sim:sentiment-1"] * 2, "synthetic", "4 preference pairs labeled by people through the pipeline's labeling app (`make label`: its page in a browser, or its Gradio API, which the label store does not tell apart) and by simulated",
             "human and simulated annotators' labels of this run")):
        rows = [{"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b"}], "annotator": a} for a in annotators]
        src = tmp_path / f"export-{len(rows)}"
        datasets.Dataset.from_list(rows).save_to_disk(str(src))
        out = tmp_path / f"out-{len(rows)}"
        sources, splits = export_dataset(str(src), out, PublishArgs(), "me/x", "default", "data/story/pairs_prompts.jsonl")
        assert splits == ["train"]  # no reward model held any of it out
        card = DatasetCard.load(out / "README.md")
        tags = card.data.to_dict()["tags"]
        assert tag in tags and phrase in card.text
        assert ("human-feedback" in tags) == (sources == "all")
        text = model_card(PublishArgs(), "me/x", "t", manifests, base, base, [], [], "me/x-preferences", sources)
        assert f"| [me/x-preferences](https://huggingface.co/datasets/me/x-preferences) | rm | {who} |" in text
        # a DPO policy learned from the labels itself (its manifest read the export): the row names it beside rm
        dpo = {"config": {"dpo": {"beta": 0.1}}, "metrics": {"eval_accuracy": 0.6},
               "inputs": {"manifests": {"sft": "d", "label-export": manifest_digest(manifests["label-export"])}}}
        line = {"proxy_mean": 0.1, "gold_mean": None, "length_mean": 5.0, "no_eos": 0.0, "kl_mean": 0.0}
        ev = {**manifests["eval"], "metrics": {**manifests["eval"]["metrics"], "comparison": {"sft": line, "dpo": line}}}
        text = model_card(PublishArgs(policy="dpo"), "me/x", "t", {**manifests, "dpo": dpo, "eval": ev}, base, base, [],
                          [], "me/x-preferences", sources)
        assert f"| [me/x-preferences](https://huggingface.co/datasets/me/x-preferences) | dpo, rm | {who} |" in text


def test_card_credits_each_data_file_to_its_own_source():
    """The story recipe's files are cut from the public-domain books, not from OASST (the file named sft.jsonl once
    matched the OASST source folder by name); the assistant recipe's keep theirs."""
    from stages.publish_card import data_sources

    found = {s["name"]: s for s in data_sources({"data/story/sft.jsonl": {"sft"}, "data/story/ppo_prompts.jsonl": {"ppo"},
                                                 "data/sft/oasst.jsonl": {"sft"}, "data/sft/gsm8k.jsonl": {"sft"},
                                                 "data/prompts/oasst_ppo_prompts.jsonl": {"ppo"}})}
    assert set(found) == {"story", "sft_and_preferences_oasst_en100", "instructions_gsm8k"}
    assert found["story"]["files"] == ["data/story/ppo_prompts.jsonl", "data/story/sft.jsonl"]
    assert found["story"]["license"] == "LicenseRef-Public-Domain" and found["story"]["stages"] == {"sft", "ppo"}
    assert found["sft_and_preferences_oasst_en100"]["files"] == ["data/prompts/oasst_ppo_prompts.jsonl", "data/sft/oasst.jsonl"]


def test_card_credits_your_own_data_not_the_bundled_files_it_replaced():
    """SFT given --dataset_name, the reward model and PPO too: their configs still name the bundled mixture and prompts
    file, which the card credited (public-domain books, a wrong license and provenance) while your files were nowhere."""
    from stages.publish_card import data_files_used, data_sources, hyperparameters

    manifests = {
        "sft": {"config": {"sft": {"dataset_mixture": {"data/story/sft.jsonl": 0}, "dataset_name": "/home/me/my_chats.jsonl"}}},
        "rm": {"config": {"rm": {"dataset_mixture": {"label-export": {"weight": 1.0}}, "dataset_name": "my_prefs.jsonl"}}},
        "ppo": {"config": {"ppo": {"prompts_file": "data/story/ppo_prompts.jsonl", "dataset_name": "p/my_prompts.jsonl",
                                   "kl_coef": 0.25}}},
        "pairs": {"config": {"pairs": {"prompts_file": "data/story/pairs_prompts.jsonl",
                                       "sft_adapter": "runs/data/sft/adapter",  # a run named data: not a data file
                                       "heldout": "runs/data/ppo/heldout_prompts.jsonl"}}},  # nor a run's file
        "grpo": {"config": {"ppo": {"prompts_file": "/home/me/data/oasst_mine.jsonl",  # yours, not OASST's
                                    "sft_adapter": "/home/me/runs/data/sft/adapter"}}}}
    used = data_files_used(manifests, "org/base")
    assert used == {"your own data: my_chats.jsonl": {"sft"}, "your own data: my_prefs.jsonl": {"rm"},
                    "your own data: my_prompts.jsonl": {"ppo"}, "data/story/pairs_prompts.jsonl": {"pairs"},
                    "your own data: oasst_mine.jsonl": {"grpo"}}
    found = {s["name"]: s for s in data_sources(used)}
    assert found["your own data: my_chats.jsonl"]["license"] == "see the dataset's own terms"
    assert found["story"]["files"] == ["data/story/pairs_prompts.jsonl"] and found["story"]["stages"] == {"pairs"}
    assert hyperparameters(manifests["ppo"]) == {"dataset_name": "p/my_prompts.jsonl", "kl_coef": 0.25}
    assert hyperparameters(manifests["sft"]) == {}  # an absolute path of this box is not shown either


def test_card_credits_your_own_data_named_by_a_recipe_yaml_wherever_it_is():
    """A recipe of your own (configs/recipes/NAME/, `make ... RECIPE=NAME`) names your files in its YAML, as
    `dataset_mixture: {/tmp/mine/chats.jsonl: 0}` and `prompts_file: /tmp/mine/prompts.jsonl`: the card's data table
    left them out (only a path holding "data/" was taken for a data file) and the training table showed this machine's
    path."""
    from stages.publish_card import data_files_used, data_sources, hyperparameters

    manifests = {
        "sft": {"config": {"sft": {"dataset_mixture": {"/tmp/mine/chats.jsonl": 0}, "dataset_name": None, "lora_r": 16}}},
        "rm": {"config": {"rm": {"dataset_mixture": {"label-export": {"weight": 1.0}, "/srv/x/prefs.parquet": 0}}}},
        "ppo": {"config": {"ppo": {"prompts_file": "/tmp/mine/ppo_prompts.jsonl", "dataset_name": None}}},
        "pairs": {"config": {"pairs": {"prompts_file": "data/story/pairs_prompts.jsonl"}}}}
    used = data_files_used(manifests, "org/base")
    assert used == {"your own data: chats.jsonl": {"sft"}, "your own data: prefs.parquet": {"rm"},
                    "your own data: ppo_prompts.jsonl": {"ppo"}, "data/story/pairs_prompts.jsonl": {"pairs"}}
    found = {s["name"]: s for s in data_sources(used)}
    assert found["your own data: chats.jsonl"]["license"] == "see the dataset's own terms"
    assert hyperparameters(manifests["sft"]) == {"dataset_mixture": {"your own data: chats.jsonl": 0}, "lora_r": 16}
    assert "/srv/x" not in json.dumps(hyperparameters(manifests["rm"]))


def test_the_card_names_whose_labels_the_reward_model_read_not_a_later_exports():
    from pipeline.run import manifest_digest
    from stages.publish import labels_the_reward_model_read

    exported = {"stage": "label-export", "metrics": {"sources": "simulated"}}
    rm = {"inputs": {"manifests": {"label-export": manifest_digest(exported)}}}
    assert labels_the_reward_model_read(rm, exported) == "simulated"
    assert labels_the_reward_model_read(rm, {**exported, "metrics": {"sources": "people"}}) is None  # exported since
    assert labels_the_reward_model_read(rm, None) is None  # the export is gone
    assert labels_the_reward_model_read({"inputs": {"manifests": {"label-export": None}}}, exported) is None  # read none


def test_the_cards_data_names_the_prompts_of_the_pairs_the_reward_model_learned_from():
    """The reward model learns from labeled pairs, so their prompts are training data: the card's data table once left
    them out (a user's own prompts, and their terms, nowhere). They are the prompts of the pairs the export read: pairs
    sampled again since name nothing, and a file of yours outside the repo is named by its name, never credited to a
    bundled source whose name it shares a word with (`oasst_mine.jsonl` is not OASST's)."""
    from pipeline.run import manifest_digest
    from stages.publish import data_of_the_card

    export = None

    def sampled(values: dict, export_reads_it: bool = True) -> tuple[dict, dict, dict]:
        """pairs sampled with `values`, exported (or not since), the reward model trained on that export: the card's
        manifests, the run's export and pairs manifests now"""
        nonlocal export
        pairs = {"config": {"pairs": values}}
        if export_reads_it:
            export = {"stage": "label-export", "metrics": {"sources": "simulated"},
                      "inputs": {"manifests": {"pairs": manifest_digest(pairs)}}}
        return {"sft": {"config": {"sft": {"dataset_mixture": {"data/story/sft.jsonl": 0}}}},
                "rm": {"inputs": {"manifests": {"label-export": manifest_digest(export)}}}}, export, pairs

    manifests, label, pairs = sampled({"prompts_file": "data/story/pairs_prompts.jsonl"})
    (story,) = data_of_the_card(manifests, "org/base", label, pairs)
    assert story["stages"] == {"sft", "pairs"} and story["files"] == ["data/story/pairs_prompts.jsonl", "data/story/sft.jsonl"]
    manifests, label, pairs = sampled({"prompts_file": "data/story/pairs_prompts.jsonl", "dataset_name": "/home/me/mine.jsonl"})
    rows = {s["name"]: s for s in data_of_the_card(manifests, "org/base", label, pairs)}
    assert rows["your own data: mine.jsonl"]["stages"] == {"pairs"} and rows["story"]["stages"] == {"sft"}
    manifests, label, pairs = sampled({"prompts_file": "/home/me/data/oasst_mine.jsonl"})
    rows = {s["name"]: s for s in data_of_the_card(manifests, "org/base", label, pairs)}
    assert set(rows) == {"story", "your own data: oasst_mine.jsonl"}
    assert rows["your own data: oasst_mine.jsonl"]["license"] == "see the dataset's own terms"
    manifests, label, pairs = sampled({"prompts_file": "data/story/pairs_prompts.jsonl"})
    manifests["rm"] = {"inputs": {"manifests": {"label-export": None}}}  # its own preferences: the pairs are not its data
    assert [s["stages"] for s in data_of_the_card(manifests, "org/base", label, pairs)] == [{"sft"}]
    manifests, label, pairs = sampled({"prompts_file": "data/story/pairs_prompts.jsonl", "seed": 7}, export_reads_it=False)
    assert [s["stages"] for s in data_of_the_card(manifests, "org/base", label, pairs)] == [{"sft"}]  # sampled again

def test_card_hyperparameters_are_the_settings_that_acted():
    """max_steps > 0 overrides the epochs (SFT showed num_train_epochs=1 for 0.42 of an epoch); -1 and 0 are "not
    set" (the reward model's, which trains by min_steps and max_epochs); sample prompts are not hyper-parameters, nor
    are the TrainingArguments outside TRAIN_KEYS (adam_epsilon: one of ~120 defaults)."""
    from stages.publish_card import hyperparameters

    sft = {"config": {"sft": {"lora_r": 16, "sample_prompts": ["Once"], "sample_max_new_tokens": 48},
                      "train": {"max_steps": 100, "num_train_epochs": 1, "learning_rate": 0.002, "adam_epsilon": 1e-8}}}
    rm = {"config": {"rm": {"min_steps": 100, "max_epochs": 10}, "train": {"max_steps": -1, "num_train_epochs": 0}}}
    epochs = {"config": {"train": {"max_steps": -1, "num_train_epochs": 3}}}
    assert hyperparameters(sft) == {"lora_r": 16, "max_steps": 100, "learning_rate": 0.002}
    assert hyperparameters(rm) == {"min_steps": 100, "max_epochs": 10}
    assert hyperparameters(epochs) == {"num_train_epochs": 3}
    one_step = {"config": {"train": {"max_steps": 1, "num_train_epochs": 3}}}  # one step overrides the epochs too
    assert hyperparameters(one_step) == {"max_steps": 1}


def test_card_hyperparameters_leave_out_the_run_section_and_empty_values():
    """The run section (run name, runs folder, model profile) is where the run went, not how it trained; an empty value
    (no reward_adapter given, an empty list) was not set; a folder or path of this machine (relative too) is no
    setting. None of them is a card line."""
    from stages.publish_card import hyperparameters

    ppo = {"config": {"run": {"run": "t", "runs_dir": "runs", "model_config": "configs/models/tiny.yaml", "seed": 3},
                      "ppo": {"kl_coef": 0.05, "reward_adapter": "", "sft_adapter": None, "stop_words": [],
                              "cache_dir": "cache/ppo", "prompts_path": "mine/prompts.jsonl"}}}
    assert hyperparameters(ppo) == {"kl_coef": 0.05}


def test_card_shows_a_zero_figure_as_zero_not_as_missing():
    """A win rate of 0% (by the gold judge, or by people) and a reward model that agreed with the gold judge on no
    pair are figures: the card shows them (a truthiness test read them as "no gold judge", "no people's labels")."""
    from stages.publish_card import ppo_results

    ev = {"n_prompts": 10, "reward_sft_mean": 0.5, "reward_ppo_mean": 0.25, "length_sft_mean": 20.0,
          "length_ppo_mean": 21.0, "no_eos_sft": 0.0, "no_eos_ppo": 0.0, "kl_mean": 1.5, "win_rate": 0.0,
          "win_rate_ci_low": 0.0, "win_rate_ci_high": 0.278, "gold_judge": "sentiment", "gold_sft_mean": 0.4,
          "gold_ppo_mean": 0.1, "gold_win_rate": 0.0, "gold_win_rate_ci_low": 0.0, "gold_win_rate_ci_high": 0.278,
          "rm_gold_agreement": 0.0, "rm_gold_pairs": 12, "human_win_rate": 0.0}
    text = "\n".join(ppo_results(ev))
    assert "| gold judge score (mean) | 0.400 | 0.100 |" in text
    assert "**Win rate of PPO over SFT judged by the gold judge: 0.0%** (95% CI 0.0% – 27.8%" in text
    assert "The reward model orders 0.0% of 12 held-out pairs as the gold judge does." in text
    assert "Win rate judged by people: 0.0%." in text


def test_only_the_embedded_base_is_called_tiny_and_its_books_are_credited(tmp_path):
    """A local base that `make base` built (its training_report.json) is the tiny one trained on the bundled books: the
    card says so and credits its pretraining texts to the base. Any other local base (your own checkpoint, shipped
    under base/) is neither called tiny nor credited with the books."""
    from stages.publish import PublishArgs
    from stages.publish_card import data_files_used, model_card

    ev = {"n_prompts": 4, "reward_sft_mean": 0.1, "reward_ppo_mean": 0.2, "length_sft_mean": 5.0, "length_ppo_mean": 6.0,
          "no_eos_sft": 0.0, "no_eos_ppo": 0.0, "kl_mean": 0.5, "win_rate": 0.5, "win_rate_ci_low": 0.2,
          "win_rate_ci_high": 0.8}
    manifests = {"sft": {"config": {}, "metrics": {}}, "eval": {"metrics": ev},
                 "rm": {"config": {}, "metrics": {"eval_accuracy": 0.7}, "outputs": {"adapter": str(tmp_path)}},
                 "ppo": {"config": {}, "metrics": {"updates": 2}}}
    base = tmp_path / "my-base"
    base.mkdir()
    card = lambda: model_card(PublishArgs(license="mit"), "me/x", "t", manifests, str(base), str(base), [], [], None)  # noqa: E731
    assert "children's books" not in card() and data_files_used({}, str(base)) == {}
    (base / "training_report.json").write_text(json.dumps({"config": {"text_dir": "data/pretrain/texts"}}))
    assert "The base here is tiny and was trained on public-domain children's books" in card()
    assert data_files_used({}, str(base)) == {"data/pretrain/texts": {"base"}}


def test_card_leads_with_the_gold_judge_when_eval_has_one():
    """A run with a gold judge: the card's headline is the win rate the gold judge gives (PPO never saw it), with the
    reward model's agreement with it; the reward model's own win rate follows, named as the one PPO optimised. Without
    a gold judge the reward model's win rate is the headline. Hand-made figures."""
    from stages.publish_card import ppo_results

    ev = {"n_prompts": 82, "reward_sft_mean": -0.058, "reward_ppo_mean": 2.311, "length_sft_mean": 20.2,
          "length_ppo_mean": 23.2, "no_eos_sft": 0.122, "no_eos_ppo": 0.171, "kl_mean": 6.068, "win_rate": 0.89,
          "win_rate_ci_low": 0.804, "win_rate_ci_high": 0.941}
    gold = {"gold_judge": "sentiment", "gold_sft_mean": 0.1487, "gold_ppo_mean": 0.6385037, "gold_win_rate": 0.84146,
            "gold_win_rate_ci_low": 0.7474, "gold_win_rate_ci_high": 0.9049, "rm_gold_agreement": 0.7376, "rm_gold_pairs": 1818}
    text = "\n".join(ppo_results({**ev, **gold}))
    assert "| gold judge score (mean) | 0.149 | 0.639 |" in text and "by the gold judge `sentiment` (VADER's compound sentiment of the reply, from -1, negative, to 1, positive), which PPO never saw" in text
    assert "**Win rate of PPO over SFT judged by the gold judge: 84.1%** (95% CI 74.7% – 90.5%" in text
    assert "orders 73.8% of 1818 held-out pairs as the gold judge does" in text
    assert "Under the reward model PPO optimised: win rate of PPO over SFT 89.0% (95% CI 80.4% – 94.1%" in text
    assert text.index("judged by the gold judge") < text.index("Under the reward model") and "over-optimisation" not in text
    assert "over-optimisation" in "\n".join(ppo_results({**ev, **gold, "overoptimisation_suspected": True}))
    # an rm: judge: named by its folder's last two names, never this machine's path
    mine = "\n".join(ppo_results({**ev, **gold, "gold_judge": "rm:/home/me/secret/big/rm/adapter"}))
    assert "`rm:.../rm/adapter` (the score the reward model .../rm/adapter gives the reply" in mine
    assert "/home/me" not in mine and "secret" not in mine
    assert "`rm:judges/rm` (" in "\n".join(ppo_results({**ev, **gold, "gold_judge": "rm:judges/rm"}))
    assert "`rm:.../rm/adapter` (" in "\n".join(ppo_results({**ev, **gold, "gold_judge": "rm:big/rm/adapter"}))
    plain = "\n".join(ppo_results({**ev, "gold_win_rate": None}))
    assert "gold" not in plain and "**Under the reward model**: win rate of PPO over SFT 89.0%** (95% CI" in plain


def test_the_card_says_how_many_responses_eval_sampled_a_prompt():
    """eval's samples_per_prompt reaches both cards' first line: 4 samples a prompt are not "one sampled response"."""
    from stages.publish_card import policy_results, ppo_results

    ev = {"n_prompts": 82, "reward_sft_mean": 0.1, "reward_ppo_mean": 0.2, "length_sft_mean": 5.0, "length_ppo_mean": 6.0,
          "no_eos_sft": 0.0, "no_eos_ppo": 0.0, "kl_mean": 0.5, "win_rate": 0.5, "win_rate_ci_low": 0.2,
          "win_rate_ci_high": 0.8, "comparison": {n: {"proxy_mean": 0.1, "gold_mean": None, "length_mean": 5.0,
                                                        "no_eos": 0.0, "kl_mean": 0.0} for n in ("sft", "grpo")}}
    assert ppo_results({**ev, "samples_per_prompt": 4})[0].startswith(
        "82 prompts PPO never trained on; 4 sampled responses per prompt and policy, ")
    assert policy_results({**ev, "samples_per_prompt": 4}, "grpo")[0] == \
        "82 held-out prompts; 4 sampled responses per prompt and policy with the same seed."
    assert "one sampled response per policy" in ppo_results(ev)[0]  # an eval report from before samples_per_prompt


def test_card_figures_each_come_from_their_own_field_by_hand(tmp_path):
    """Every figure of the card's tables and summary is the one the eval report and the policy's manifest give for it,
    in its own column (hand-made figures, each distinct); the flags show when the report raised them and only then;
    the labels' row carries the labels' license, not the model's."""
    from stages.publish import PublishArgs
    from stages.publish_card import model_card, policy_results, ppo_results

    ev = {"n_prompts": 82, "reward_sft_mean": -0.058, "reward_ppo_mean": 2.311, "length_sft_mean": 20.2,
          "length_ppo_mean": 23.7, "no_eos_sft": 0.122, "no_eos_ppo": 0.171, "kl_mean": 6.068, "win_rate": 0.89,
          "win_rate_ci_low": 0.804, "win_rate_ci_high": 0.941}
    text = "\n".join(ppo_results(ev))
    for row in ("| reward-model score (mean) | -0.058 | 2.311 |", "| response length (tokens) | 20.2 | 23.7 |",
                "| share without EOS | 12.2% | 17.1% |", "| KL to the SFT policy (nats/response) | 0 | 6.068 |"):
        assert row in text, row
    assert "reward hacking" not in text and "judged by people" not in text
    flagged = "\n".join(ppo_results({**ev, "reward_hacking_suspected": True, "human_win_rate": 0.625}))
    assert "flagged likely reward hacking" in flagged and "Win rate judged by people: 62.5%." in flagged

    comparison = {"sft": {"proxy_mean": 0.1, "gold_mean": 0.25, "length_mean": 20.0, "no_eos": 0.05, "kl_mean": 0.0},
                  "grpo": {"proxy_mean": 1.5, "gold_mean": None, "length_mean": 31.5, "no_eos": 0.3, "kl_mean": 4.5}}
    rows = "\n".join(policy_results({"n_prompts": 9, "comparison": comparison}, "grpo"))
    for row in ("| reward-model score (mean) | 0.100 | 1.500 |", "| gold judge score (mean) | 0.250 | – |",
                "| response length (tokens) | 20.0 | 31.5 |", "| share without EOS | 5.0% | 30.0% |",
                "| KL to the SFT policy (nats/response) | 0 | 4.500 |"):
        assert row in rows, row
    assert "flagged" not in rows
    assert "⚠️ The evaluation flagged grpo" in "\n".join(
        policy_results({"n_prompts": 9, "comparison": comparison, "flagged_policies": ["grpo"]}, "grpo"))

    from pipeline.run import manifest_digest

    export = {"stage": "label-export", "outputs": {"dataset": "d"}}  # the run's export, which the reward model read
    manifests = {"sft": {"config": {}, "metrics": {}}, "eval": {"metrics": ev}, "label-export": export,
                 "rm": {"config": {}, "metrics": {"eval_accuracy": 0.71}, "outputs": {"adapter": str(tmp_path)},
                        "inputs": {"manifests": {"label-export": manifest_digest(export)}}},
                 "ppo": {"config": {}, "versions": {"trl": "1.0"},
                         "metrics": {"updates": 40, "reward_first": -0.5, "reward_last": 1.25, "kl_last": 3.5,
                                     "reward_window_updates": 3}}}
    card = model_card(PublishArgs(license="mit", dataset_license="cc-by-4.0"), "me/x", "t", manifests, "org/base",
                      "org/base", [], [], "me/x-preferences", "people", test_split=True)
    # the window of the first and last rewards is the manifest's (once "a tenth" whatever the stage averaged)
    assert "PPO: 40 updates, reward -0.5 → 1.25 (the reward model's, means of the first and last 3 updates), KL 3.5 " \
           "at the last update (held out: the table above). Reward model: accuracy 0.71 on its held-out pairs (the " \
           "`test` split of [me/x-preferences](https://huggingface.co/datasets/me/x-preferences))." in card
    del manifests["ppo"]["metrics"]["reward_window_updates"]  # a manifest from before the stage recorded it
    assert "(the reward model's, means of the first and last tenth of the updates)" in model_card(
        PublishArgs(license="mit"), "me/x", "t", manifests, "org/base", "org/base", [], [], None, "people")
    assert "| rm | human labels of this run | cc-by-4.0 |" in card and "license: mit" in card
    # an export made since the reward model trained (or none it read): no stage of the run trained on the published one
    later = model_card(PublishArgs(license="mit", dataset_license="cc-by-4.0"), "me/x", "t",
                       {**manifests, "label-export": {**export, "finished_at": "later"}}, "org/base", "org/base", [], [],
                       "me/x-preferences", "people")
    assert "| [me/x-preferences](https://huggingface.co/datasets/me/x-preferences) | no stage of this run | human " \
           "labels of this run | cc-by-4.0 |" in later and "accuracy 0.71 on its held-out pairs. Software:" in later
    # the labels not published: the row still says whose they were; the example prompt is the task's
    manifests["sft"]["config"] = {"sft": {"sample_prompts": ['Once upon a time, "Tom" said']}}
    card = model_card(PublishArgs(license="mit"), "me/x", "t", manifests, "org/base", "org/base", [], [], None,
                      "simulated")
    assert "| this run's preference labels (`make label-export`; not published) | rm | simulated annotators' labels " \
           "(not people's) of this run | — |" in card
    assert 'messages = [{"role": "user", "content": "Once upon a time, \\"Tom\\" said"}]' in card

    import datasets
    from huggingface_hub import DatasetCard

    from stages.publish import export_dataset

    row = {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}], "annotator": "alice"}
    datasets.Dataset.from_list([row]).save_to_disk(str(tmp_path / "export"))
    export_dataset(str(tmp_path / "export"), tmp_path / "out", PublishArgs(license="mit", dataset_license="cc-by-4.0"),
                   "me/x", "t", "your own data: mine.jsonl")
    assert DatasetCard.load(tmp_path / "out" / "README.md").data.to_dict()["license"] == "cc-by-4.0"


def test_the_card_check_refuses_a_card_without_the_metadata_every_card_carries():
    """check_card, the last check before a card is written: library_name, license and tags (ours and the method's) on
    every card, base_model on one whose base is not in the repo (a local base ships under base/ and has none). A card
    without them would be a bug of the card's writer, refused naming what is missing. Mutants: base_model or the
    method's tag unchecked."""
    from stages.publish_card import check_card

    def card(**meta):
        return "---\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in meta.items()) + "---\n\n# a card\n"

    whole = dict(library_name="peft", license="apache-2.0", tags=["trl", "rlhf", "grpo", "lora", "peft"])
    check_card(card(**whole, base_model="someone/base"), local=False, method="grpo")
    check_card(card(**whole), local=True, method="grpo")  # the base in the repo: no base_model
    with pytest.raises(ConfigError, match=r"lacks metadata \['base_model'\]"):
        check_card(card(**whole), local=False, method="grpo")
    with pytest.raises(ConfigError, match=r"lacks metadata \['license'\]"):
        check_card(card(**{**whole, "license": ""}, base_model="someone/base"), local=False, method="grpo")
    with pytest.raises(ConfigError, match="'trl', 'rlhf', 'lora', 'peft', 'ppo'"):  # made by grpo, checked as ppo's
        check_card(card(**whole, base_model="someone/base"), local=False, method="ppo")


def test_the_cards_example_prompt_is_the_first_sft_sampled(tmp_path):
    """The card's usage snippet asks the policy what SFT sampled first (samples.json: the task's own prompt), else the
    first of SFT's sample_prompts, else a fixed one. Mutant: samples.json's last prompt."""
    from stages.publish_card import EXAMPLE_PROMPT, example_prompt

    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps([{"prompt": "Once upon a time", "before": "a"}, {"prompt": "The fox", "before": "b"}]))
    config = {"sft": {"sample_prompts": ["Given prompt", "Another"]}}
    assert example_prompt({"outputs": {"samples": str(samples)}, "config": config}) == "Once upon a time"
    assert example_prompt({"outputs": {"samples": str(tmp_path / "gone.json")}, "config": config}) == "Given prompt"
    assert example_prompt({"outputs": {}}) == EXAMPLE_PROMPT


def test_card_for_a_hub_base_names_it(runs):
    """A Hub base: base_model metadata and a one-line AutoPeftModel snippet (card built without loading anything)."""
    from huggingface_hub import ModelCard

    from stages.publish import PublishArgs
    from stages.publish_card import check_card, model_card

    t = runs / "t"
    manifests = {s: json.loads((t / s / "manifest.json").read_text()) for s in ("sft", "rm", "ppo", "eval")}
    base = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # --base_model_id names a local base: a Hub base keeps its own id
    text = model_card(PublishArgs(base_model_id="someone/else"), "tester/smol-rlhf", "t", manifests, base, base, [], [],
                      None)
    check_card(text, local=False)
    card = ModelCard(text)
    assert card.data.base_model == base and card.data.library_name == "peft"
    assert 'AutoPeftModelForCausalLM.from_pretrained("tester/smol-rlhf")' in card.text


def test_a_local_base_downloaded_from_the_hub_is_named_not_shipped(runs, tmp_path):
    """--base_model_id on a local base (a checkpoint downloaded from the Hub): the repo names the id as its base in
    every adapter_config.json and in the card, and does not upload the base's weights again under base/. Mutant: the
    base shipped whatever --base_model_id says."""
    from huggingface_hub import ModelCard

    own = tmp_path / "runs"
    shutil.copytree(runs, own)
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cached = tmp_path / "hf_home" / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"  # its card, as downloaded
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("0" * 40)
    (cached / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (cached / "snapshots" / ("0" * 40) / "README.md").write_text("---\nlicense: mit\n---\n# SmolLM2\n")
    proc = publish(own, "--repo_id", "tester/tiny-rlhf", "--dry-run", "--include_sft", "--base_model_id", hub_id,
                   env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "license" not in proc.stderr  # the card takes the base's license (its cached card's): no note
    model = files_of(own / "t" / "publish" / "model")
    assert not any(name.startswith("base/") for name in model), sorted(model)
    for cfg in ("adapter_config.json", "sft/adapter_config.json"):
        assert json.loads(model[cfg])["base_model_name_or_path"] == hub_id
    card = ModelCard(model["README.md"].decode())
    assert card.data.base_model == hub_id and "under `base/`" not in card.text and card.data.license == "mit"
    assert 'AutoPeftModelForCausalLM.from_pretrained("tester/tiny-rlhf")  # downloads the base, ' + hub_id in card.text


# ---------------------------------------------------------------------------------------------------- a fake Hub

class FakeHub:
    """Just enough of the Hub API for HfApi.whoami/create_repo/create_branch/upload_folder (huggingface_hub 2.4):
    every file is answered "regular" at preupload, so it arrives base64 inside the commit's NDJSON."""

    def __init__(self, mode: str = "ok", existing: dict | None = None):
        self.mode, self.commits, self.calls, self.auth, self.unknown, self.created = mode, {}, [], set(), [], []
        self.existing = existing or {}  # (kind, repo) -> private, for repos already on the Hub
        self.messages = {}  # (kind, repo, revision) -> the commit's summary
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, status, body=None, headers=None):
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.auth.add(self.headers.get("Authorization"))
                hub.calls.append(("GET", self.path))
                if self.path.startswith("/api/whoami-v2"):
                    if hub.mode == "rejected":
                        return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                    return self.reply(200, {"name": "tester", "type": "user", "orgs": [],
                                            "auth": {"type": "access_token", "accessToken": {
                                                "displayName": "t",
                                                "role": "read" if hub.mode == "read" else "write"}}})
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) == 4 and parts[0] == "api" and (parts[1][:-1], f"{parts[2]}/{parts[3]}") in hub.existing:
                    repo = f"{parts[2]}/{parts[3]}"
                    return self.reply(200, {"id": repo, "private": hub.existing[(parts[1][:-1], repo)], "sha": "b" * 40})
                self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

            def do_POST(self):
                hub.auth.add(self.headers.get("Authorization"))
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.split("?")[0]
                hub.calls.append(("POST", path))
                parts = path.strip("/").split("/")
                if path == "/api/validate-yaml":
                    return self.reply(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    if hub.mode == "forbidden":
                        return self.reply(403, {"error": "You don't have the rights to create a model under this namespace"})
                    req = json.loads(body)
                    hub.created.append((req.get("type", "model"), f"{req['organization']}/{req['name']}", req.get("visibility")))
                    return self.reply(200, {"url": f"{hub.url}/{req['organization']}/{req['name']}", "name": req["name"]})
                if len(parts) >= 6 and parts[0] == "api" and parts[4] in ("preupload", "commit", "branch"):
                    kind, repo, rev = parts[1][:-1], f"{parts[2]}/{parts[3]}", "/".join(parts[5:])
                    if hub.mode == "forbidden":
                        return self.reply(403, {"error": "Forbidden"})
                    if parts[4] == "branch":
                        return self.reply(200, {})
                    if parts[4] == "preupload":
                        files = json.loads(body)["files"]
                        return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                           "oid": None} for f in files]})
                    received = {}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "header":
                            hub.messages[(kind, repo, rev)] = item["value"]["summary"]
                        elif item["key"] != "header":
                            hub.unknown.append(item["key"])
                    hub.commits[(kind, repo, rev)] = received
                    return self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40,
                                            "pullRequestUrl": None})
                hub.unknown.append(path)
                self.reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def publish_once(server: FakeHub, runs_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """One publish against `server` with the test token; the server is closed after it (its record stays readable)."""
    try:
        return publish(runs_dir, *args, env={"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN})
    finally:
        server.close()


@pytest.fixture(scope="module")
def uploaded(runs, dry_run):
    """The dry run's publish uploaded through a fake Hub: (the server, closed, with its record; the process).
    HF_HUB_OFFLINE=1 as the Makefile exports it: publishing must still go online."""
    server = FakeHub()
    try:
        proc = publish(runs, "--repo_id", "tester/tiny-rlhf", "--revision", "dev", "--private", "--include_sft",
                       "--include_reward", "--merged", "--include_dataset",
                       env={"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"})
    finally:
        server.close()
    return server, proc


def test_upload_end_to_end_every_file_arrives_and_the_token_never_leaks(runs, dry_run, uploaded):
    keep, _ = dry_run
    hub, proc = uploaded
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not hub.unknown, hub.unknown
    assert set(hub.commits) == {("model", "tester/tiny-rlhf", "dev"), ("dataset", "tester/tiny-rlhf-preferences", "dev")}
    # the dry run byte for byte, but for the adapters' name of the shipped base: the repo's folder, not its path here
    sent, local = hub.commits[("model", "tester/tiny-rlhf", "dev")], files_of(keep / "model")
    key_of = {"adapter_config.json": "base_model_name_or_path", "pipeline_base.json": "base_model"}
    naming_the_base = sorted(name for name in local if Path(name).name in key_of)
    assert naming_the_base == ["adapter_config.json", "pipeline_base.json", "reward/adapter_config.json",
                               "reward/pipeline_base.json", "sft/adapter_config.json", "sft/pipeline_base.json"]
    assert set(sent) == set(local)
    for name in local:
        if name in naming_the_base:
            key = key_of[Path(name).name]
            assert json.loads(local[name])[key] == str(runs / "t" / "publish" / "model" / "base"), name
            assert json.loads(sent[name]) == {**json.loads(local[name]), key: "base"}, name
        else:
            assert sent[name] == local[name], name
    assert hub.commits[("dataset", "tester/tiny-rlhf-preferences", "dev")] == files_of(keep / "dataset")
    assert ("POST", "/api/models/tester/tiny-rlhf/branch/dev") in hub.calls
    # the dataset first: the model card links it, so a failed dataset upload must leave no model commit pointing at it
    commits = [path for method, path in hub.calls if method == "POST" and "/commit/" in path]
    assert commits == ["/api/datasets/tester/tiny-rlhf-preferences/commit/dev", "/api/models/tester/tiny-rlhf/commit/dev"]
    assert hub.messages == {("model", "tester/tiny-rlhf", "dev"): "Upload RLHF policy (SFT -> reward model -> PPO, LoRA)",
                            ("dataset", "tester/tiny-rlhf-preferences", "dev"):
                                "Upload preference labels of an RLHF policy (SFT -> reward model -> PPO, LoRA)"}
    assert sorted(hub.created) == [("dataset", "tester/tiny-rlhf-preferences", "private"), ("model", "tester/tiny-rlhf", "private")]
    assert hub.auth == {f"Bearer {TOKEN}"}  # the token was used for every call...
    manifest = json.loads((runs / "t" / "publish" / "manifest.json").read_text())
    assert len(manifest["metrics"]["commits"]) == 2 and manifest["metrics"]["dry_run"] is False
    # ...and appears nowhere else: not in the output, not in the run folder, not in what was uploaded
    assert TOKEN not in proc.stdout + proc.stderr
    for f in runs.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f
    for received in hub.commits.values():
        assert not any(TOKEN.encode() in data for data in received.values())


def test_the_upload_names_no_local_path_and_loads_as_its_card_says(runs, uploaded, tmp_path):
    """The adapters named the shipped base by the publisher's absolute path (/home/alice/.../publish/model/base):
    nothing uploaded may name this machine's folders. The uploaded files, written to a fresh folder, load as the
    card's snippet says, from another working directory, and with stock AutoPeftModel from the copy's own root;
    both generate what the local folder does."""
    import getpass
    import tempfile

    hub, proc = uploaded
    assert proc.returncode == 0, proc.stderr[-3000:]
    local_paths = {str(runs), str(REPO), tempfile.gettempdir() + "/", "/home/", os.path.expanduser("~") + "/",
                   f"/{getpass.getuser()}/"}
    for (kind, _, _), received in hub.commits.items():
        for name, data in received.items():
            for path in local_paths:
                assert path.encode() not in data, (kind, name, path)

    download, elsewhere = tmp_path / "download", tmp_path / "elsewhere"
    for name, data in hub.commits[("model", "tester/tiny-rlhf", "dev")].items():
        (download / name).parent.mkdir(parents=True, exist_ok=True)
        (download / name).write_bytes(data)
    elsewhere.mkdir()
    card = (download / "README.md").read_text()
    snippet = card.split("## How to use\n\n```python\n")[1].split("\n```")[0]
    assert snippet.count('"tester/tiny-rlhf"') == 3 and 'subfolder="base"' in snippet
    script = snippet.replace('"tester/tiny-rlhf"', repr(str(download))) + textwrap.dedent(f"""
        import json, os
        from peft import AutoPeftModelForCausalLM
        greedy = lambda m: m.eval().generate(**ids, do_sample=False, max_new_tokens=12)[0].tolist()
        out = {{"card": greedy(model), "prompt": ids["input_ids"].shape[1],
                "local": greedy(AutoPeftModelForCausalLM.from_pretrained({str(runs / "t" / "publish" / "model")!r}))}}
        os.chdir({str(download)!r})
        out["root"] = greedy(AutoPeftModelForCausalLM.from_pretrained("."))
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["card"] == out["local"] == out["root"] and len(out["card"]) > out["prompt"]


def error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("stage", ["ppo", "sft", "rm"])
def test_a_policy_trained_again_after_eval_is_not_published_with_the_old_figures(runs, tmp_path, stage):
    """`make publish` reruns eval first; run directly after PPO, or the SFT policy (PPO's reference, the table's SFT
    column) or the reward model (the table's reward column) ran again, publish refuses (the card's figures would be
    another run's) before writing anything."""
    copy = tmp_path / "runs"
    shutil.copytree(runs / "t", copy / "t", ignore=shutil.ignore_patterns("publish"))
    rerun_manifest = copy / "t" / stage / "manifest.json"
    manifest = json.loads(rerun_manifest.read_text())
    manifest["finished_at"] = "a later run"
    rerun_manifest.write_text(json.dumps(manifest))
    line = error_line(publish(copy, "--repo_id", "tester/tiny-rlhf", "--dry-run"))
    assert f"the {stage} stage of run 't' ran again after its eval report was made" in line and "make eval RUN=t" in line
    assert not (copy / "t" / "publish").exists()


def test_which_stage_ran_again_since_the_eval_report_by_hand():
    """stage_rerun_since: the first stage whose manifest now is not the one the report read; none when all are; and
    none for a report that records no inputs (written by an older version: taken as it is, not refused)."""
    from pipeline.run import manifest_digest
    from stages.publish import stage_rerun_since

    now = {"sft": {"stage": "sft"}, "rm": {"stage": "rm"}, "ppo": {"stage": "ppo"}}
    read = {name: manifest_digest(m) for name, m in now.items()}
    assert stage_rerun_since({"inputs": {"manifests": read}}, now) is None
    assert stage_rerun_since({"inputs": {"manifests": {**read, "rm": "an earlier rm"}}}, now) == "rm"
    assert stage_rerun_since({"inputs": {"manifests": {"sft": read["sft"]}}}, now) == "rm"  # ppo unread too: rm first
    assert stage_rerun_since({"metrics": {}}, now) is None and stage_rerun_since({"inputs": {}}, now) is None


def run_folder_state(runs: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under the run's publish/ with its bytes and mtime: a folder rebuilt with the same bytes differs."""
    folder = runs / "t" / "publish"
    return {str(f.relative_to(folder)): (f.read_bytes(), f.stat().st_mtime_ns) for f in folder.rglob("*") if f.is_file()}


@pytest.mark.parametrize("stage,output", [("sft", "adapter"), ("eval", "report")])
def test_a_missing_upstream_output_is_one_clear_error_and_writes_nothing(runs, dry_run, stage, output):
    """An upstream folder deleted by hand: publish deleted the last publish folder, then crashed with a traceback."""
    path = Path(json.loads((runs / "t" / stage / "manifest.json").read_text())["outputs"][output])
    before = run_folder_state(runs)
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    try:
        line = error_line(publish(runs, "--repo_id", "tester/tiny-rlhf", "--dry-run", "--include_sft"))
    finally:
        aside.rename(path)
    assert line == (f"error: {path}, an output of the {stage} stage of run 't', is missing: run `make {stage} RUN=t "
                    f"FORCE=1`, then publish")
    assert before and run_folder_state(runs) == before


def a_run_whose_reward_model_read_its_export(runs: Path, copy: Path, export: list[dict], held_out: list[dict]) -> Path:
    """The fixture's run copied to `copy`, with `export` as its label export and a reward model that trained on it and
    held out `held_out` (its eval_pairs.jsonl, as the rm stage writes it), evaluated since: what `make rm eval` leaves."""
    import datasets

    from pipeline.run import manifest_digest

    shutil.copytree(runs / "t", copy / "t", ignore=shutil.ignore_patterns("publish"))

    def rewrite(stage: str, change) -> dict:
        path = copy / "t" / stage / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
        return manifest

    datasets.Dataset.from_list(export).save_to_disk(str(copy / "t" / "label-export" / "dataset"))
    label = rewrite("label-export", lambda m: (m["outputs"].update(dataset=str(copy / "t" / "label-export" / "dataset")),
                                               m["metrics"].update(sources="people")))
    (copy / "t" / "rm" / "eval_pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in held_out))
    rm = rewrite("rm", lambda m: (m["outputs"].update(eval_pairs=str(copy / "t" / "rm" / "eval_pairs.jsonl")),
                                  m.setdefault("inputs", {}).setdefault("manifests", {}).update(
                                      {"label-export": manifest_digest(label)})))
    rewrite("eval", lambda m: m["inputs"]["manifests"].update(rm=manifest_digest(rm)))
    return copy


def test_a_reward_model_given_to_the_rl_stage_publishes_the_export_as_one_train_split(runs, tmp_path):
    """The run's rm stage read its export and held out some prompts, but PPO optimised a reward model it was given
    (--reward_adapter): the published reward is that one, which never saw this export's split, so the dataset is one
    `train` split and its card says why (a `test` split named held-out pairs of a reward model not published)."""
    from huggingface_hub import DatasetCard

    from pipeline.run import manifest_digest

    def pair(prompt: str) -> dict:
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}], "annotator": "ann", "is_tie": False}

    export = [pair(f"Q{i}?") for i in range(4)]
    copy = a_run_whose_reward_model_read_its_export(runs, tmp_path / "runs", export,
                                                    [{**pair("Q1?"), "source": "label-export"}])
    given = tmp_path / "elsewhere" / "my-rm"
    shutil.copytree(copy / "t" / "rm" / "adapter", given)
    for stage in ("ppo", "eval"):
        path = copy / "t" / stage / "manifest.json"
        manifest = json.loads(path.read_text())
        if stage == "ppo":
            manifest["config"]["ppo"]["reward_adapter"] = str(given)
            ppo = manifest
        else:
            manifest["inputs"]["manifests"]["ppo"] = manifest_digest(ppo)
        path.write_text(json.dumps(manifest))
    proc = publish(copy, "--repo_id", "tester/tiny-rlhf", "--dry-run", "--include_dataset")
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = copy / "t" / "publish" / "dataset"
    assert set(files_of(folder)) == {"README.md", "data/train-00000-of-00001.parquet"}
    assert "stage was given (`--reward_adapter`), not trained on them here" in DatasetCard.load(folder / "README.md").text


def test_a_missing_output_a_flag_adds_is_one_clear_error_and_writes_nothing(runs, tmp_path):
    """What --include_reward (the reward model's adapter) and --include_dataset (the export's dataset, and the reward
    model's eval_pairs.jsonl that splits it) add to the folder, and eval's report.json, each deleted by hand: publish
    deleted the last publish folder, then crashed with a traceback. Each is one error naming the stage to run again,
    before the folder is touched. Without --include_dataset, the export the reward model read is not published."""
    from stages.publish import main, parse_args

    export = [{"prompt": [{"role": "user", "content": f"Q{i}?"}], "chosen": [{"role": "assistant", "content": "a"}],
               "rejected": [{"role": "assistant", "content": "b"}], "annotator": "ann", "is_tie": False}
              for i in range(3)]
    copy = a_run_whose_reward_model_read_its_export(runs, tmp_path / "runs", export,
                                                    [{**export[0], "source": "label-export"}])
    argv = ["--config", "configs/publish.yaml", "--run", "t", "--runs_dir", str(copy), "--repo_id", "tester/tiny-rlhf",
            "--dry-run"]
    # without --include_dataset the export the reward model read is named on the card, not published
    assert main(*parse_args([*argv, "--include_reward"]))["dataset_repo_id"] is None
    assert not (copy / "t" / "publish" / "dataset").exists()
    assert "| this run's preference labels (`make label-export`; not published) | rm | human labels of this run | — |" \
        in (copy / "t" / "publish" / "model" / "README.md").read_text()
    before = run_folder_state(copy)
    outputs = {stage: json.loads((copy / "t" / stage / "manifest.json").read_text())["outputs"]
               for stage in ("rm", "label-export", "eval")}
    for stage, path, flag in (("rm", outputs["rm"]["adapter"], "--include_reward"),
                              ("label-export", outputs["label-export"]["dataset"], "--include_dataset"),
                              ("rm", outputs["rm"]["eval_pairs"], "--include_dataset"),
                              ("eval", str(Path(outputs["eval"]["report"]).with_suffix(".json")), "--include_sft")):
        aside = Path(path + ".aside")
        Path(path).rename(aside)
        try:
            with pytest.raises(ConfigError) as err:
                main(*parse_args([*argv, flag]))
        finally:
            aside.rename(path)
        assert str(err.value) == (f"{path}, an output of the {stage} stage of run 't', is missing: run `make {stage} "
                                  f"RUN=t FORCE=1`, then publish")
        assert run_folder_state(copy) == before, path


def test_the_published_test_split_is_the_reward_models_held_out_pairs(runs, dry_run, tmp_path):
    """--include_dataset published the preferences as one `train` split, so nobody could score the pairs the reward
    model's held-out accuracy and its agreement with the gold judge were measured on. `test` is now every pair of the
    prompts it held out (its eval_pairs.jsonl: ties of those prompts too, which it leaves unscored), `train` the rest:
    no prompt in both, as the rm stage split them."""
    import datasets
    from huggingface_hub import DatasetCard

    def pair(prompt: str, chosen: str, rejected: str, **more) -> dict:
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}], **more}

    labeled = {"annotator": "ann", "strength": "much", "agreement": 1.0}
    export = [pair("Q0?", "a", "b", **labeled, is_tie=False), pair("Q1?", "c", "d", **labeled, is_tie=False),
              pair("Q1?", "e", "f", **labeled, is_tie=False), pair("Q2?", "g", "h", **labeled, is_tie=False),
              pair("Q3?", "i", "j", **labeled, is_tie=True), pair("Q3?", "j", "i", **labeled, is_tie=True),
              pair("Q3?", "k", "l", **labeled, is_tie=False), pair("Q4?", "m", "n", **labeled, is_tie=False)]
    # held out: Q1 and Q3 (its tie in both orders unscored), and a prompt of the reward model's other data
    held_out = [{**pair("Q1?", "c", "d"), "source": "label-export"}, {**pair("Q1?", "e", "f"), "source": "label-export"},
                {**pair("Q3?", "k", "l"), "source": "label-export"}, {**pair("Other?", "x", "y"), "source": "oasst"}]
    copy = a_run_whose_reward_model_read_its_export(runs, tmp_path / "runs", export, held_out)
    proc = publish(copy, "--repo_id", "tester/tiny-rlhf", "--dry-run", "--include_dataset")
    assert proc.returncode == 0, proc.stderr[-3000:]

    folder = copy / "t" / "publish" / "dataset"
    # as `load_dataset(repo)` reads the repo (its card's configs), into a cache of its own: datasets caches a local
    # folder by its name and configs, not its files, so another run's `publish/dataset` would be read back instead
    splits = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "datasets_cache"))
    as_pairs = lambda rows: sorted((r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"])  # noqa: E731
                                   for r in rows)
    assert as_pairs(r for r in splits["test"] if not r["is_tie"]) == as_pairs(held_out[:3])  # the pairs it scored
    assert as_pairs(splits["test"]) == as_pairs(export[1:3] + export[4:7])
    assert as_pairs(splits["train"]) == as_pairs([export[0], export[3], export[7]])
    assert set(files_of(folder)) == {"README.md", "data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"}
    card = DatasetCard.load(folder / "README.md").text
    assert ("They trained the reward model of [tester/tiny-rlhf](https://huggingface.co/tester/tiny-rlhf), split by "
            "prompt as it split them: `test` (5 pairs) holds every pair of the prompts it was measured on, none of "
            "which it trained on, `train` (3 pairs) the other prompts' pairs, which it trained on, save those it could "
            "not use (counted in the run's rm manifest: equal or empty replies, too long for its `max_length`) and "
            "those of a held-out prompt with nothing to score (all ties). Its held-out accuracy (0.61, "
            "`eval_accuracy`) and the eval's agreement of the reward model with a gold judge (where the eval had one) "
            "were measured on 3 pairs of `test` (a tie, `is_tie`, has no right answer and is left out), together with "
            "1 pair of its other data (not published here).") in card
    assert 'ds = load_dataset("tester/tiny-rlhf-preferences")  # train, test' in card
    assert ("Reward model: accuracy 0.61 on its held-out pairs (the `test` split of [tester/tiny-rlhf-preferences]"
            "(https://huggingface.co/datasets/tester/tiny-rlhf-preferences)). Software:") in \
        (copy / "t" / "publish" / "model" / "README.md").read_text()

    # the fixture's reward model trained on its bundled pairs, not on this export: one split, and the card says why
    keep, _ = dry_run
    assert set(files_of(keep / "dataset")) == {"README.md", "data/train-00000-of-00001.parquet"}
    assert ("All of them are in `train`: the reward model of [tester/tiny-rlhf](https://huggingface.co/tester/tiny-rlhf) "
            "did not train on this export (it read another, or none), so there is no held-out split to mark.") in \
        DatasetCard.load(keep / "dataset" / "README.md").text


def test_the_model_card_names_no_test_split_when_the_reward_model_held_none_of_the_exports_prompts_out(runs, tmp_path):
    """A reward model that trained on the run's export beside other data, and held out only the other data's prompts:
    the published dataset is all `train` (its card says so), and the model card said the held-out accuracy was on
    "the `test` split" of that dataset, which has none."""
    def pair(prompt: str) -> dict:
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}]}

    export = [{**pair(f"Q{i}?"), "annotator": "ann", "is_tie": False} for i in range(3)]
    copy = a_run_whose_reward_model_read_its_export(runs, tmp_path / "runs", export,
                                                    [{**pair("Other?"), "source": "oasst"}])
    proc = publish(copy, "--repo_id", "tester/tiny-rlhf", "--dry-run", "--include_dataset")
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = copy / "t" / "publish"
    assert set(files_of(folder / "dataset")) == {"README.md", "data/train-00000-of-00001.parquet"}
    assert "which held none of their prompts out: all of them are in `train`." in (folder / "dataset" / "README.md").read_text()
    card = (folder / "model" / "README.md").read_text()
    assert "Reward model: accuracy 0.61 on its held-out pairs. Software:" in card and "`test` split" not in card


def test_publish_reads_each_manifest_once(runs, tmp_path, monkeypatch):
    """The label export's and the pairs' manifests were read up to four times (the dataset, its license, the card's
    data table, whose labels): a `make label-export` in between would have the card describe another export than the
    one published. Each upstream manifest is now read once."""
    from collections import Counter

    from stages.publish import main, parse_args

    export = [{"prompt": [{"role": "user", "content": f"Q{i}?"}], "chosen": [{"role": "assistant", "content": "a"}],
               "rejected": [{"role": "assistant", "content": "b"}], "annotator": "ann", "is_tie": False}
              for i in range(3)]
    copy = a_run_whose_reward_model_read_its_export(runs, tmp_path / "runs", export, [])
    reads, read_text = Counter(), Path.read_text

    def counted(path, *args, **kwargs):
        if path.name == "manifest.json":
            reads[path.parent.name] += 1
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    main(*parse_args(["--config", "configs/publish.yaml", "--run", "t", "--runs_dir", str(copy), "--repo_id",
                      "tester/tiny-rlhf", "--dry-run", "--include_dataset"]))
    assert reads == {stage: 1 for stage in ("ppo", "eval", "sft", "rm", "label-export", "pairs")}, reads


def test_the_dataset_license_is_yours_to_name_for_your_own_prompts(runs, dry_run, tmp_path):
    """--include_dataset once stamped apache-2.0 on any labels, your own prompts' (whatever their terms) included: the
    bundled prompts' labels still default to it, and the card names where the prompts came from; your own prompts or
    pairs, or prompts the export cannot name (no pairs stage, or pairs sampled again since it), need
    --dataset_license, refused before the run folder is touched."""
    from huggingface_hub import DatasetCard

    from pipeline.run import manifest_digest
    from stages.publish import PublishArgs
    from stages.publish_card import OWN_DATA, dataset_license, labeled_prompts, prompts_source

    keep, _ = dry_run  # the fixture's pairs stage sampled the bundled story openings
    card = DatasetCard.load(keep / "dataset" / "README.md")
    assert card.data.license == "apache-2.0"
    assert "Prompts: `story` (https://github.com/mahlberg-lab/corpora, LicenseRef-Public-Domain)." in card.text

    story = {"config": {"pairs": {"prompts_file": "data/story/pairs_prompts.jsonl", "dataset_name": None}}}
    mine = {"config": {"pairs": {"prompts_file": "data/story/pairs_prompts.jsonl", "dataset_name": "/home/me/p.jsonl"}}}

    def export_of(pairs: dict, **label) -> dict:
        return {"inputs": {"manifests": {"pairs": manifest_digest(pairs)}}, "config": {"label": label}}

    assert labeled_prompts(export_of(story), story) == "data/story/pairs_prompts.jsonl"
    assert labeled_prompts(export_of(mine), mine) == OWN_DATA + "p.jsonl"
    assert labeled_prompts(export_of(story, pairs_dataset="/home/me/my_pairs.jsonl"), story) == OWN_DATA + "my_pairs.jsonl"
    assert labeled_prompts(export_of(story), mine) is None  # sampled again since the export: not its prompts
    assert labeled_prompts({}, None) is None  # an export of the store's pairs, with no pairs stage to say whose
    escaped = tmp_path / "oasst_mine.jsonl"  # under data/ by its letters, outside it once resolved; named like OASST
    dotted = "data/" + os.path.relpath(escaped, REPO / "data")
    assert labeled_prompts(export_of(outside := {"config": {"pairs": {"prompts_file": dotted}}}), outside) == \
        OWN_DATA + "oasst_mine.jsonl"
    for bundled in ("data/story/pairs_prompts.jsonl", "data/prompts/oasst_pairs_prompts.jsonl"):
        assert dataset_license(PublishArgs(), bundled, "t") == "apache-2.0", bundled
    assert prompts_source("data/prompts/oasst_pairs_prompts.jsonl")["license"] == "Apache-2.0"
    for prompts, why in ((OWN_DATA + "p.jsonl", "publishes the prompts of p.jsonl with your labels"),
                         (None, "the label export of run 't' does not say where its pairs' prompts came from")):
        with pytest.raises(ConfigError, match=f"{why}.*give --dataset_license"):
            dataset_license(PublishArgs(), prompts, "t")
        assert dataset_license(PublishArgs(dataset_license="cc-by-4.0"), prompts, "t") == "cc-by-4.0"

    pairs, export = runs / "t" / "pairs" / "manifest.json", runs / "t" / "label-export" / "manifest.json"
    originals = pairs.read_text(), export.read_text()
    try:
        pairs.write_text(json.dumps({**json.loads(originals[0]), **mine}))  # sampled again from your prompts
        before = run_folder_state(runs)
        line = error_line(publish(runs, "--repo_id", "tester/tiny-rlhf", "--dry-run", "--include_dataset"))
        assert line.startswith("error: --include_dataset: the label export of run 't' does not say where its pairs' "
                               "prompts came from (the run has no pairs stage, or its pairs were sampled again since: "
                               "`make label-export RUN=t` exports them again)")
        export.write_text(json.dumps(export_of(json.loads(pairs.read_text())) | {
            k: v for k, v in json.loads(originals[1]).items() if k not in ("inputs", "config")}))  # and exported
        line = error_line(publish(runs, "--repo_id", "tester/tiny-rlhf", "--dry-run", "--include_dataset"))
        assert line == ("error: --include_dataset publishes the prompts of p.jsonl with your labels under a license, "
                        "and their terms are not this project's to choose: give --dataset_license (the license their "
                        "terms allow, e.g. cc-by-4.0)")
        assert before and run_folder_state(runs) == before
        proc = publish(runs, "--repo_id", "tester/tiny-rlhf", "--dry-run", "--include_dataset", "--dataset_license",
                       "cc-by-4.0")
        assert proc.returncode == 0, proc.stderr[-2000:]
        card = DatasetCard.load(runs / "t" / "publish" / "dataset" / "README.md")
        assert card.data.license == "cc-by-4.0" and "Prompts: `p.jsonl` (your own: its own terms apply)." in card.text
        assert "/home/me" not in card.text  # a name, not this machine's path
        model = (runs / "t" / "publish" / "model" / "README.md").read_text()
        assert "rm | simulated annotators' labels" not in model and "| cc-by-4.0 |" in model
        pairs.write_text("{not json")
        line = error_line(publish(runs, "--repo_id", "tester/tiny-rlhf", "--dry-run", "--include_dataset"))
        assert line.startswith(f"error: {pairs} is not valid JSON") and line.endswith("rerun `make pairs RUN=t`")
    finally:
        pairs.write_text(originals[0])
        export.write_text(originals[1])

def test_missing_token_is_one_clear_error(runs):
    line = error_line(publish(runs, "--repo_id", "tester/tiny-rlhf"))
    assert "no Hugging Face token" in line and "HF_TOKEN" in line and "hf auth login" in line


def test_no_write_permission_is_one_clear_error_and_nothing_is_committed(runs):
    server = FakeHub(mode="forbidden")
    proc = publish_once(server, runs, "--repo_id", "someone-else/their-model")
    line = error_line(proc)
    assert "cannot write to 'someone-else/their-model'" in line and "Nothing of this failed upload was committed" in line
    assert server.commits == {} and TOKEN not in proc.stdout + proc.stderr


def test_a_read_only_token_is_one_clear_error_before_any_repo_is_created(runs, dry_run):
    """Found before the run folder is touched: the earlier dry run's publish/ is left as it was, to the mtime."""
    before = run_folder_state(runs)
    server = FakeHub(mode="read")
    proc = publish_once(server, runs, "--repo_id", "tester/tiny-rlhf")
    line = error_line(proc)
    assert "the Hugging Face token of 'tester' is read-only: create a write token" in line
    assert server.created == [] and server.commits == {} and TOKEN not in proc.stdout + proc.stderr
    assert before and run_folder_state(runs) == before


def test_a_rejected_token_is_one_clear_error_and_writes_nothing(runs, dry_run):
    before = run_folder_state(runs)
    server = FakeHub(mode="rejected")
    proc = publish_once(server, runs, "--repo_id", "tester/tiny-rlhf", "--include_dataset")
    line = error_line(proc)
    assert "the Hugging Face token was rejected (invalid or expired): run `hf auth login` again" in line
    assert server.calls == [("GET", "/api/whoami-v2")] and TOKEN not in proc.stdout + proc.stderr
    assert before and run_folder_state(runs) == before


def test_private_refuses_an_existing_public_repo_before_anything_is_created(runs, dry_run):
    """create_repo(exist_ok=True) leaves an existing repo's visibility as it is: --private on a public repo would
    publish in public. Refused, naming the repo and how to make it private, before the run folder is touched; a
    private one, or no --private, goes on."""
    server = FakeHub(existing={("model", "tester/tiny-rlhf"): False, ("dataset", "tester/tiny-rlhf-preferences"): True})
    try:
        env = {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN}
        before = run_folder_state(runs)
        line = error_line(publish(runs, "--repo_id", "tester/tiny-rlhf", "--private", "--include_dataset", env=env))
        assert "'tester/tiny-rlhf' already exists and is public" in line and "hf repos settings tester/tiny-rlhf --private" in line
        assert server.commits == {} and server.created == []  # the dataset repo (private) was not touched either
        assert before and run_folder_state(runs) == before
        server.existing = {("dataset", "tester/d"): False}
        line = error_line(publish(runs, "--repo_id", "tester/tiny-rlhf", "--private", "--include_dataset",
                                  "--dataset_repo_id", "tester/d", env=env))
        assert "dataset repo 'tester/d' already exists and is public" in line and "--type dataset --private" in line
        assert server.commits == {} and server.created == []
        server.existing = {("model", "tester/tiny-rlhf"): True}  # private already: --private publishes
        assert publish(runs, "--repo_id", "tester/tiny-rlhf", "--private", env=env).returncode == 0
        server.existing = {("model", "tester/other"): False}  # public, and public asked for
        assert publish(runs, "--repo_id", "tester/other", env=env).returncode == 0
        assert set(server.commits) == {("model", "tester/tiny-rlhf", "main"), ("model", "tester/other", "main")}
    finally:
        server.close()


def test_commit_message_names_the_method_that_made_the_policy():
    from stages.publish import PublishArgs, commit_message

    assert commit_message(PublishArgs(), "grpo") == "Upload RLHF policy (SFT -> reward model -> GRPO, LoRA)"
    assert commit_message(PublishArgs(), "reinforce_pp") == "Upload RLHF policy (SFT -> reward model -> REINFORCE++, LoRA)"
    assert commit_message(PublishArgs(), "dpo") == "Upload RLHF policy (SFT -> DPO, LoRA)"
    assert commit_message(PublishArgs(commit_message="v2: more labels"), "ppo") == "v2: more labels"
    assert commit_message(PublishArgs(), "dpo", "dataset") == "Upload preference labels of an RLHF policy (SFT -> DPO, LoRA)"
    assert commit_message(PublishArgs(commit_message="v2: more labels"), "ppo", "dataset") == "v2: more labels"


def test_no_network_is_one_clear_error(runs, dry_run):
    port = free_port()  # nobody listens on it
    before = run_folder_state(runs)
    line = error_line(publish(runs, "--repo_id", "tester/tiny-rlhf", env={"HF_ENDPOINT": f"http://127.0.0.1:{port}",
                                                                           "HF_TOKEN": TOKEN}))
    assert "cannot reach the Hugging Face Hub" in line and "network" in line
    assert before and run_folder_state(runs) == before


# ---------------------------------------------------------------------------------------------------- which method

def test_the_cards_reward_use_follows_the_pooling_of_the_reward_model_the_policy_optimised(tmp_path):
    """reward_use: a reward model given to the RL stage (`reward_adapter`) is the one published as reward/, so its own
    score_pooling.json says how to score with it, not the rm stage's: a sum-pooled given one beside a last-token rm
    stage, the other way round, and the rm stage's own when none was given."""
    from pipeline.adapters import write_pooling
    from stages.publish_card import reward_use

    last, summed = tmp_path / "last", tmp_path / "sum"
    last.mkdir()
    summed.mkdir()
    write_pooling(summed, "sum")
    rule = "sum the head (`score`) over the hidden states of the reply's tokens"
    for rm_adapter, given, says_sum in ((last, summed, True), (summed, last, False), (summed, None, True),
                                        (last, None, False)):
        text = reward_use({"outputs": {"adapter": str(rm_adapter)}}, str(given) if given else None, ["reward/"], "ppo")
        assert (rule in text) == says_sum, (rm_adapter, given)
    # a base on the Hub loads by its id (one shipped in the repo: test_the_reward_model_loads_as_the_card_says)
    text = reward_use({"outputs": {"adapter": str(last)}}, None, ["reward/"], "ppo", "me/r", "org/base-1b")
    assert "load the base with `AutoModelForSequenceClassification.from_pretrained(\"org/base-1b\", num_labels=1)`, " \
           "then each with `PeftModel.from_pretrained(model, \"me/r\", subfolder=\"reward\")`" in text


@pytest.mark.parametrize("template,dated", [("llama3_2", True), ("llama3_1", True), ("qwen2_5", False)])
def test_the_cards_snippets_template_as_the_run_did(template, dated, template_tokenizers, tmp_path):
    """Llama 3.x templates write today's date into the system turn unless given date_string; every stage templates
    with pipeline.chat's fixed date, so the card's apply_chat_template (the policy's lines and the reward model's) gave
    the published policy and reward model other prompts than the run's (a reward off by up to 0.034). The card passes
    the date for a template that reads one, and its text is then the pipeline's. It also says to set pad_token_id
    (a base without one refuses a batch) and, for an ensemble, to load a fresh base per member."""
    from transformers import AutoTokenizer

    from pipeline.chat import render
    from stages.publish import PublishArgs
    from stages.publish_card import model_card, reward_use, template_kwargs_of

    tok = AutoTokenizer.from_pretrained(template_tokenizers[template])
    kwargs = template_kwargs_of(tok)
    assert kwargs == (', date_string="26 Jul 2024"' if dated else "")
    messages = [{"role": "user", "content": "Once upon a time"}]
    as_card = eval(f"tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False{kwargs})",
                   {"tok": tok, "messages": messages})
    assert as_card == render(tok, messages, add_generation_prompt=True)

    ev = {"n_prompts": 8, "reward_sft_mean": 0.0, "reward_ppo_mean": 1.0, "length_sft_mean": 20.0,
          "length_ppo_mean": 21.0, "no_eos_sft": 0.1, "no_eos_ppo": 0.1, "kl_mean": 1.0, "win_rate": 0.6,
          "win_rate_ci_low": 0.3, "win_rate_ci_high": 0.8}
    manifests = {"sft": {"config": {}, "metrics": {}}, "eval": {"metrics": ev},
                 "rm": {"config": {}, "metrics": {"eval_accuracy": 0.7}, "outputs": {"adapter": str(tmp_path)}},
                 "ppo": {"config": {}, "metrics": {"updates": 4, "reward_first": 0.0, "reward_last": 1.0, "kl_last": 1.0}}}
    card = model_card(PublishArgs(license="mit"), "me/x", "t", manifests, "org/base", "org/base", [],
                      ["reward/", "reward-1/"], None, template_kwargs=kwargs)
    assert "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", " \
           f"return_dict=True{kwargs})" in card
    assert ("# the date the run templated every prompt with" in card) == dated
    text = reward_use(manifests["rm"], None, ["reward/", "reward-1/"], "ppo", "me/x", "org/base", kwargs)
    assert f"`tokenizer.apply_chat_template(messages, tokenize=False{kwargs})`" in text and text in card
    assert "set `model.config.pad_token_id = tokenizer.pad_token_id`" in text and "a fresh base for each" in text
    assert "a fresh base" not in reward_use(manifests["rm"], None, ["reward/"], "ppo", "me/x", "org/base", kwargs)


def test_the_cards_snippet_stops_where_the_run_stopped(template_tokenizers, tmp_path):
    """The run stops sampling at the template's end-of-turn too (pipeline.generation.stop_token_ids); generate() stops
    at the base's generation_config EOS ids alone: a base whose config lists only its EOS (Gemma's <eos>, a Qwen2.5
    base under ChatML) wrote past the turn's end with the card's snippet. The card then sets the run's stop tokens;
    a base that lists them all gets no such line."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, GenerationConfig

    from pipeline.generation import stop_token_ids
    from stages.publish import PublishArgs
    from stages.publish_card import model_card, stop_tokens_of

    folder = template_tokenizers["gemma"]
    tok = AutoTokenizer.from_pretrained(folder)
    base = tmp_path / "base"
    GenerationConfig(eos_token_id=tok.eos_token_id).save_pretrained(base)
    stops = stop_tokens_of(tok, str(base))
    assert stops == ["<eos>", "<end_of_turn>"] == stop_tokens_of(tok, str(tmp_path / "no-generation-config"))
    ev = {"n_prompts": 8, "reward_sft_mean": 0.0, "reward_ppo_mean": 1.0, "length_sft_mean": 20.0,
          "length_ppo_mean": 21.0, "no_eos_sft": 0.1, "no_eos_ppo": 0.1, "kl_mean": 1.0, "win_rate": 0.6,
          "win_rate_ci_low": 0.3, "win_rate_ci_high": 0.8}
    manifests = {"sft": {"config": {}, "metrics": {}}, "eval": {"metrics": ev},
                 "rm": {"config": {}, "metrics": {}, "outputs": {"adapter": str(tmp_path)}},
                 "ppo": {"config": {}, "metrics": {"updates": 4, "reward_first": 0.0, "reward_last": 1.0, "kl_last": 1.0}}}
    card = model_card(PublishArgs(license="mit"), "me/x", "t", manifests, "org/base", "org/base", [], [], None,
                      stop_tokens=stops)
    line = next(x for x in card.splitlines() if x.startswith("model.generation_config.eos_token_id = "))
    model = SimpleNamespace(generation_config=SimpleNamespace())
    exec(line, {"tokenizer": tok, "model": model})
    assert model.generation_config.eos_token_id == stop_token_ids(tok, GenerationConfig(eos_token_id=tok.eos_token_id))
    GenerationConfig(eos_token_id=tok.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])).save_pretrained(base)
    assert stop_tokens_of(tok, str(base)) == []
    assert "generation_config.eos_token_id" not in model_card(PublishArgs(license="mit"), "me/x", "t", manifests,
                                                              "org/base", "org/base", [], [], None, stop_tokens=[])


def test_card_says_which_method_made_the_policy(tmp_path, tiny_models, monkeypatch):
    """A run with ppo, grpo and dpo, evaluated together: each published policy's folder holds its own adapter, and its
    card names its method (from the manifest) in the text and the tags; a policy eval has no figures for is refused
    before the publish folder is touched."""
    from huggingface_hub import ModelCard

    from pipeline.adapters import read_pooling, write_pooling
    from pipeline.config import ConfigError, RunArgs
    from stages.eval import main as eval_main, parse_args as eval_args, render_markdown
    from stages.publish import PublishArgs, main
    from tests.fake_upstream import add_policy_stage, build_upstream

    profile = tiny_models["llama"]
    runs = build_upstream(tmp_path / "runs", profile, reward_members=2)  # an ensemble of two reward models
    add_policy_stage(runs, profile, "grpo", seed=6)
    add_policy_stage(runs, profile, "dpo", seed=7)
    eval_main(*eval_args(["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs), "--model_config",
                          str(profile), "--max_new_tokens", "6", "--gold_judge", ""]))
    run = RunArgs(run="t", runs_dir=str(runs))
    assert "the mean of its 2 members' standardised scores" in (runs / "t" / "eval" / "report.md").read_text()
    report = json.loads((runs / "t" / "eval" / "report.json").read_text())
    assert report["reward_pooling"] == "last" and "pooling `sum`" not in (runs / "t" / "eval" / "report.md").read_text()
    assert "each summing its head over the reply's tokens (pooling `sum`)" in render_markdown({**report, "reward_pooling": "sum"}, 3)
    comparison = json.loads((runs / "t" / "eval" / "manifest.json").read_text())["metrics"]["comparison"]
    for policy, made_by, not_here in (("ppo", "then PPO against that reward", "GRPO"),
                                      ("grpo", "then GRPO against that reward", "PPO against"),
                                      ("dpo", "then DPO (TRL `DPOTrainer`)", "\n| rm | ")):
        message = main(PublishArgs(dry_run=True, policy=policy), run)["commit_message"]
        assert message == {"ppo": "Upload RLHF policy (SFT -> reward model -> PPO, LoRA)",
                           "grpo": "Upload RLHF policy (SFT -> reward model -> GRPO, LoRA)",
                           "dpo": "Upload RLHF policy (SFT -> DPO, LoRA)"}[policy]
        folder = runs / "t" / "publish" / "model"
        assert (folder / "adapter_model.safetensors").read_bytes() == \
            (runs / "t" / policy / "adapter" / "adapter_model.safetensors").read_bytes()
        card = ModelCard.load(folder / "README.md")
        assert policy in card.data.tags and f"- **Method:** {policy}" in card.text and made_by in card.text
        assert ("an ensemble of 2 reward models" in card.text) == (policy != "dpo")
        assert not_here not in card.text
        assert {m for m in ("ppo", "grpo", "dpo") if m in card.data.tags} == {policy}
        if policy != "ppo":  # its line of the comparison, beside SFT's
            assert f"| reward-model score (mean) | {comparison['sft']['proxy_mean']:.3f} | " \
                   f"{comparison[policy]['proxy_mean']:.3f} |" in card.text
    assert "the sum of its head" not in card.text  # these reward models read the last token (no score_pooling.json)
    for member in ("adapter", "member-1/adapter"):  # as `make rm --pooling sum` saves them
        write_pooling(runs / "t" / "rm" / member, "sum")
    pooling = runs / "t" / "rm" / "adapter" / "score_pooling.json"
    written = pooling.read_text()
    # a divisor the code does not score with (pool_scores, pool_in_forward: SUM_DIVISOR) is refused before the publish
    # folder is touched: the card would describe a score nobody computes
    shutil.rmtree(runs / "t" / "publish")
    pooling.write_text(json.dumps({**json.loads(written), "sum_divisor": 8.0}))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(pooling))}: sum_divisor 8.0 is not 16, the divisor this "
                                          r"version scores with: .*make rm FORCE=1"):
        main(PublishArgs(dry_run=True, include_reward=True), run)
    assert not (runs / "t" / "publish").exists()
    # the card names the divisor the code applies (16 here): one that differed is the one a user must divide by
    monkeypatch.setattr("pipeline.adapters.SUM_DIVISOR", 8.0)
    for member in ("adapter", "member-1/adapter"):
        write_pooling(runs / "t" / "rm" / member, "sum")
    main(PublishArgs(dry_run=True, include_reward=True), run)  # every member of the ensemble: reward/, reward-1/
    for name, member in (("reward", "adapter"), ("reward-1", "member-1/adapter")):
        assert (folder / name / "adapter_model.safetensors").read_bytes() == \
            (runs / "t" / "rm" / member / "adapter_model.safetensors").read_bytes()
        assert read_pooling(folder / name) == "sum"  # the rule travels with the adapter
    assert "by the sum of its head over the reply's tokens divided by 8, not by the last token" in \
        ModelCard.load(folder / "README.md").text
    assert not (folder / "reward-2").exists()
    # the ensemble's reward from the published files alone: each member's held-out mean and std (fake_upstream's
    # 0.1 * i and 1.0 + i), which were in the run's rm manifest only, and the card's rule for the score
    for index, name in enumerate(("reward", "reward-1")):
        member = json.loads((folder / name / "ensemble_member.json").read_text())
        assert {k: member[k] for k in ("member", "members", "reward_mean", "reward_std")} == \
            {"member": index, "members": 2, "reward_mean": [0.0, 0.1][index], "reward_std": [1.0, 2.0][index]}
    text = ModelCard.load(folder / "README.md").text
    assert "(`reward/`, `reward-1/`)" in text and "divide by `sum_divisor` (`score_pooling.json`)" in text
    assert "The reward the policy optimised is the mean over the members of (score − `reward_mean`) / `reward_std`, " \
           "each member's from its `ensemble_member.json`" in text
    main(PublishArgs(dry_run=True, include_reward=True, policy="dpo"), run)  # DPO optimised no reward model
    text = ModelCard.load(folder / "README.md").text
    assert "The reward eval scored with (DPO optimised none) is the mean over the members" in text
    assert "the policy optimised" not in text
    shutil.rmtree(runs / "t" / "publish")
    add_policy_stage(runs, profile, "rloo", seed=8)  # trained after the eval: no figures for it
    with pytest.raises(ConfigError, match="no figures for its rloo policy"):
        main(PublishArgs(dry_run=True, policy="rloo"), run)
    with pytest.raises(ConfigError, match="--policy sft"):
        main(PublishArgs(dry_run=True, policy="sft"), run)
    # repo ids the Hub would refuse only after the folder was built: refused first, by flag
    for given, message in (({"repo_id": "me/na#me"}, "--repo_id 'me/na#me' is not a Hub repo id: Repo id must use"),
                           ({"repo_id": "a/b/c"}, "--repo_id 'a/b/c' is not a Hub repo id: give it as user/name"),
                           ({"repo_id": "me/" + "x" * 90, "include_dataset": True},
                            r"--dataset_repo_id 'me/x+-preferences' is not a Hub repo id.*maximum length is 96")):
        with pytest.raises(ConfigError, match=message):
            main(PublishArgs(dry_run=True, **given), run)
    assert not (runs / "t" / "publish").exists()


def test_merged_bf16_base_says_how_much_of_the_update_it_keeps(tiny_models, tmp_path):
    """A bf16 checkpoint merged in bf16 rounds away an update smaller than the weights' resolution: the published
    merged/ then differs from the adapter eval measured. merge() reports the update's relative error as stored, and
    --merged_dtype float32 stores it exactly: W + dW, by hand."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from stages.publish import merge
    from tests.test_ppo import yaml_model_dir

    src = yaml_model_dir(tiny_models["llama"])
    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(base)  # stored in bf16
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # dW = B A of about a thousandth of the weights' size
                p.copy_(torch.randn_like(p) * (0.02 if "lora_A" in name else 0.001))
    model.save_pretrained(tmp_path / "adapter")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    want = (layer.get_base_layer().weight + layer.get_delta_weight("default")).detach()
    error16 = merge(str(base), tmp_path / "adapter", src, tmp_path / "m16")
    error32 = merge(str(base), tmp_path / "adapter", src, tmp_path / "m32", "float32")
    w16, w32 = (load_file(tmp_path / m / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"] for m in ("m16", "m32"))
    assert w16.dtype == torch.bfloat16 and w32.dtype == torch.float32
    assert error32 == 0.0 and torch.allclose(w32, want, atol=1e-7)
    assert error16 > 0.1  # most of an update this small is lost in bf16, and merge says so
    # the figure by hand: ||stored(W + dW) - (W + dW)|| / ||dW|| over every adapted layer, from merged/'s own file
    stored, lost, norm = load_file(tmp_path / "m16" / "model.safetensors"), 0.0, 0.0
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            delta = module.get_delta_weight("default").detach()
            exact = module.get_base_layer().weight.detach() + delta
            lost += float((stored[name.removeprefix("base_model.model.") + ".weight"].float() - exact).pow(2).sum())
            norm += float(delta.pow(2).sum())
    assert error16 == pytest.approx((lost / norm) ** 0.5, rel=1e-4)


def test_flags_publish_cannot_act_on_are_refused_by_check_args():
    """What the flags alone tell, before make runs the stages publish needs: each refusal names its flag; a dry run
    without a repo gets a placeholder id."""
    from pipeline.config import ConfigError, RunArgs
    from stages.publish import PublishArgs, check_args

    run = RunArgs(run="t")
    assert check_args(PublishArgs(dry_run=True, policy="grpo"), run) == "your-name/t-rlhf-grpo"
    for args, message in ((PublishArgs(), "no repo to publish to"),
                          (PublishArgs(dry_run=True, merged_dtype="bfloat16"), "--merged_dtype bfloat16: give auto"),
                          (PublishArgs(dry_run=True, policy="sft"), "--policy sft: publish one of the run's policies"),
                          (PublishArgs(repo_id="me/x", include_dataset=True, dataset_repo_id="me/x/y"),
                           "--dataset_repo_id 'me/x/y' is not a Hub repo id")):
        with pytest.raises(ConfigError, match=message):
            check_args(args, run)


def test_an_adapter_is_copied_without_peft_s_card_or_a_pickle_and_names_the_published_base(tmp_path):
    """copy_adapter: peft's empty card and a Trainer's training_args.bin (a pickle of this box's paths) stay behind;
    adapter_config.json and the fingerprint both name the base the repo names, not this checkout's path."""
    from stages.publish import copy_adapter

    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/home/me/base", "r": 8}))
    (src / "pipeline_base.json").write_text(json.dumps({"base_model": "/home/me/base", "fingerprint": {"n_layer": 2}}))
    for name in ("adapter_model.safetensors", "README.md", "training_args.bin"):
        (src / name).write_bytes(b"x")
    (src / "checkpoint-1").mkdir()
    out = copy_adapter(src, tmp_path / "out" / "sft", "you/base")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "pipeline_base.json"]
    assert json.loads((out / "adapter_config.json").read_text()) == {"base_model_name_or_path": "you/base", "r": 8}
    assert json.loads((out / "pipeline_base.json").read_text()) == {"base_model": "you/base",
                                                                   "fingerprint": {"n_layer": 2}}


def test_publish_says_how_much_of_the_update_a_16_bit_merge_lost_and_warns_past_a_tenth():
    """Every 16-bit merge's loss is printed (8% is a note: the README promises the figure), past 10% as a warning."""
    from stages.publish import merged_error_line

    assert merged_error_line("ppo", 0.08).startswith("note: merged/ stores the ppo update with a relative error of 8% ")
    assert "relative error of 0.031% " in merged_error_line("ppo", 0.00031)  # not rounded to 0%
    assert merged_error_line("dpo", 0.1).startswith("note: merged/ stores the dpo update with a relative error of 10% ")
    assert merged_error_line("ppo", 0.45).startswith("warning: merged/ stores the ppo update with a relative error of 45%")
    assert merged_error_line("ppo", 0.11).startswith("warning: merged/ stores the ppo update with a relative error of 11%")


def test_merged_takes_the_model_profiles_trust_remote_code(custom_code_model, tiny_models, tmp_path, monkeypatch,
                                                            capsys):
    """--merged loads the base again: a base with its own modeling code (profile trust_remote_code: true) was refused
    there. merge() takes the flag (the custom base merges: W + dW by hand), and publish passes the profile's, read from
    the profile the SFT stage ran with; it prints the merge's loss when there is one (a 16-bit base's: a note under
    10%), and nothing for an exact merge."""
    import json

    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import stages.publish as publish
    from pipeline.config import RunArgs
    from tests.fake_upstream import build_upstream

    base = yaml.safe_load(custom_code_model.read_text())["name_or_path"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True),
                           LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    want = (layer.get_base_layer().weight + layer.get_delta_weight("default")).detach()
    with pytest.raises(ValueError, match="trust_remote_code"):
        publish.merge(base, tmp_path / "adapter", base, tmp_path / "refused")
    assert publish.merge(base, tmp_path / "adapter", base, tmp_path / "merged", trust_remote_code=True) == 0.0
    got = load_file(tmp_path / "merged" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(got, want, atol=1e-7)

    from stages.eval import main as evaluate
    from stages.eval import parse_args
    from stages.publish import merged_error_line

    runs = build_upstream(tmp_path / "runs", tiny_models["llama"])
    seen = []
    monkeypatch.setattr(publish, "merge", lambda *a, **k: seen.append(a[4:]) or (0.05 if a[5] else 0.0))
    for trusted in (True, False):  # the SFT stage's profile, then eval (its report must be newer), then publish
        profile = tmp_path / f"trusted-{trusted}.yaml"
        profile.write_text(yaml_with(Path(tiny_models["llama"]).read_text(), f"\ntrust_remote_code: {str(trusted).lower()}\n"))
        manifest = runs / "t" / "sft" / "manifest.json"
        m = json.loads(manifest.read_text())
        m.setdefault("config", {})["run"] = {"model_config": str(profile)}
        manifest.write_text(json.dumps(m))
        evaluate(*parse_args(["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs), "--model_config",
                              str(tiny_models["llama"]), "--max_new_tokens", "4", "--gold_judge", ""]))
        capsys.readouterr()
        publish.main(publish.PublishArgs(dry_run=True, merged=True), RunArgs(run="t", runs_dir=str(runs)))
        noted = [line for line in capsys.readouterr().err.splitlines() if "merged/ stores" in line]
        assert noted == ([merged_error_line("ppo", 0.05)] if trusted else []), noted
    assert seen == [("auto", True), ("auto", False)]


def test_the_published_test_split_holds_a_held_out_conversations_later_turns():
    """The reward model holds out whole conversations (rm_data.split_keys): the published `test` split takes every
    pair whose conversation it held out, a later turn of it that it did not score (a tie) too, not only the prompts
    it scored. Mutant: the pairs matched by prompt (the second turn would land in `train`, beside its first)."""
    import datasets

    from stages.publish import as_held_out
    from stages.rm_data import conversation_key

    q1 = [{"role": "user", "content": "Q1?"}]
    rows = [{"prompt": q1, "is_tie": False},
            {"prompt": q1 + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "More?"}], "is_tie": True},
            {"prompt": [{"role": "user", "content": "Q2?"}], "is_tie": False}]
    held_out = {"prompts": {conversation_key(rows[0], 0)}}  # it scored Q1's first turn only
    splits = as_held_out(datasets.Dataset.from_list(rows), held_out)
    assert [r["prompt"][-1]["content"] for r in splits["test"]] == ["Q1?", "More?"]
    assert [r["prompt"][-1]["content"] for r in splits["train"]] == ["Q2?"]


def test_the_dataset_card_credits_no_held_out_split_to_a_reward_model_the_rl_stage_was_given():
    """The published reward model is the one the RL stage was given (--reward_adapter): the card said these labels
    trained it and gave the run's own reward model's held-out accuracy as its."""
    from stages.publish import splits_line

    held_out = {"scored": 3, "scored_elsewhere": 0, "accuracy": 0.6667}
    splits = {"train": [1] * 7, "test": [1] * 3}
    assert "They trained the reward model of [me/r]" in splits_line(splits, held_out, "me/r")
    line = splits_line({"train": [1] * 10}, None, "me/r", given=True)
    assert line == ("All of them are in `train`: the reward model of [me/r](https://huggingface.co/me/r) is one its RL "
                    "stage was given (`--reward_adapter`), not trained on them here, so there is no held-out split of "
                    "its to mark.")
