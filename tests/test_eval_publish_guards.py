"""Eval and publish on inputs they must not trust: a damaged or missing upstream file, a judge that fails only on the
real samples or on import, a reward model with no trained head, an RL stage given its own reward model, a flagged
policy other than PPO, a local base saved as .bin or holding .git/ and .cache/, a run with no plots."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from pipeline.config import ConfigError
from tests.fake_upstream import _lora_adapter, build_upstream


def eval_args(runs, profile, *extra):
    from stages.eval import parse_args
    return parse_args(["--config", "configs/eval.yaml", "--run", "t", "--runs_dir", str(runs),
                       "--model_config", str(profile), "--max_new_tokens", "6", *extra])


def test_damaged_heldout_prompts_file_is_one_config_error(tmp_path, tiny_models):
    """load_prompts refuses a damaged line with a clear ConfigError, but shared_heldout_prompts reads the file first
    with a bare json.loads: a JSONDecodeError escapes main_guard as a traceback."""
    from stages.eval import main
    runs = build_upstream(tmp_path / "runs", tiny_models["llama"])
    path = runs / "t" / "ppo" / "heldout_prompts.jsonl"
    path.write_text(path.read_text() + '{"prompt": [{"role": "user", "content": "cut off\n')
    with pytest.raises(ConfigError):
        main(*eval_args(runs, tiny_models["llama"]))
    assert not (runs / "t" / "eval").exists()


def test_missing_metrics_is_refused_before_the_run_folder_is_touched(tmp_path, tiny_models):
    """A finished eval; then PPO's metrics.jsonl goes missing. The rerun fails (ConfigError) only after
    stage.prepare has deleted the finished eval's manifest."""
    from stages.eval import main
    profile = tiny_models["llama"]
    runs = build_upstream(tmp_path / "runs", profile)
    main(*eval_args(runs, profile, "--gold_judge", ""))
    manifest = runs / "t" / "eval" / "manifest.json"
    assert manifest.is_file()
    (runs / "t" / "ppo" / "metrics.jsonl").unlink()
    with pytest.raises(ConfigError, match="metrics"):
        main(*eval_args(runs, profile, "--gold_judge", ""))
    assert manifest.is_file(), "the finished eval's manifest was deleted by a run that then failed"


def test_a_judge_failing_on_the_samples_leaves_the_run_folder_alone(tmp_path, tiny_models):
    """load_gold_judge tries the judge on two canned rows only; a judge that fails on the real samples fails after
    stage.prepare (eval/ created, config.json written, a finished eval's manifest deleted)."""
    from stages.eval import main
    runs = build_upstream(tmp_path / "runs", tiny_models["llama"])
    with pytest.raises(ConfigError, match="lexicon_judge"):
        main(*eval_args(runs, tiny_models["llama"], "--gold_judge", "tests.judge_fixtures:lexicon_judge"))
    assert not (runs / "t" / "eval").exists()


@pytest.mark.parametrize("damage", ["rm_eval_pairs", "kept_policy"])
def test_a_damaged_upstream_file_met_while_sampling_leaves_the_run_folder_alone(damage, tmp_path, tiny_models):
    """Two upstream files are first read during the model work, after eval has kept its sampled batches: the reward
    model's held-out pairs and a policy PPO kept along the way. Either, damaged, is one ConfigError, and a first eval
    leaves no eval/ folder (no sampled batches, no resume key)."""
    from stages.eval import main
    runs = build_upstream(tmp_path / "runs", tiny_models["llama"])
    t = runs / "t"
    if damage == "rm_eval_pairs":
        (t / "rm" / "eval_pairs.jsonl").write_text('{"prompt": "x", "chosen": "a"}\n')
        manifest = json.loads((t / "rm" / "manifest.json").read_text())
        manifest["outputs"]["eval_pairs"] = str(t / "rm" / "eval_pairs.jsonl")
        (t / "rm" / "manifest.json").write_text(json.dumps(manifest))
    else:
        kept = t / "ppo" / "policies" / "update-4"
        shutil.copytree(t / "sft" / "adapter", kept)
        record = json.loads((kept / "pipeline_base.json").read_text())
        record["fingerprint"]["hidden_size"] = 999
        (kept / "pipeline_base.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="eval_pairs|hidden_size"):
        main(*eval_args(runs, tiny_models["llama"]))
    assert not (t / "eval").exists()


def given_to_ppo(runs, **adapters) -> None:
    """The run's PPO manifest as if the stage had been given these adapters (configs/ppo.yaml's sft_adapter,
    reward_adapter) instead of the run's own."""
    path = runs / "t" / "ppo" / "manifest.json"
    m = json.loads(path.read_text())
    m["config"]["ppo"].update(adapters)
    path.write_text(json.dumps(m))


def test_proxy_is_the_reward_model_ppo_optimised(tmp_path, tiny_models):
    """PPO trained with `reward_adapter: <another RM>` (configs/ppo.yaml); eval still scores with the rm stage's
    reward model, yet report.md says 'as PPO was rewarded' and the card 'Under the reward model PPO optimised'."""
    import yaml

    from pipeline.judges import judge_scores, load_judge
    from stages.eval import main
    profile = tiny_models["llama"]
    spec = yaml.safe_load(profile.read_text())
    runs = build_upstream(tmp_path / "runs", profile, reward_members=2)  # the rm stage's: an ensemble of two
    other = _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], tmp_path / "other_rm" / "adapter",
                          seed=99, task_type="SEQ_CLS")
    given_to_ppo(runs, reward_adapter=str(other))
    main(*eval_args(runs, profile, "--gold_judge", ""))
    report = json.loads((runs / "t" / "eval" / "report.json").read_text())
    s = report["samples"]
    optimised = judge_scores(load_judge(f"rm:{other}"), [x["prompt"] for x in s], [x["ppo"] for x in s])
    assert [x["reward_ppo"] for x in s] == pytest.approx(optimised, abs=1e-4)
    assert report["reward_adapter"] == str(other)
    assert f"scored by the reward model the RL stages were given (`{other}`)" in (runs / "t" / "eval" / "report.md").read_text()
    # publish ships and names that reward model too: its bytes as reward/, not the rm stage's, and no rm accuracy
    from pipeline.config import RunArgs
    from stages.publish import PublishArgs
    from stages.publish import main as publish

    publish(PublishArgs(dry_run=True, include_reward=True), RunArgs(run="t", runs_dir=str(runs)))
    folder = runs / "t" / "publish" / "model"
    shipped = (folder / "reward" / "adapter_model.safetensors").read_bytes()
    assert shipped == (other / "adapter_model.safetensors").read_bytes()
    assert shipped != (runs / "t" / "rm" / "adapter" / "adapter_model.safetensors").read_bytes()
    # one reward model, scored as it is: no ensemble member's file (the rm stage's members' mean and std are not its
    # own), and none of the rm stage's other members
    assert not (folder / "reward" / "ensemble_member.json").exists() and not (folder / "reward-1").exists()
    card = (folder / "README.md").read_text()
    assert "a reward model given to it (`reward_adapter`, `adapter`: trained outside this run" in card
    assert "Reward model: `adapter`, given as `reward_adapter`." in card and "trained on preference pairs" not in card
    assert "\n| rm |" not in card
    # that reward model deleted since: one error naming it, before the publish folder is touched (it was deleted
    # first, then copying the adapter crashed with a traceback)
    before = {str(f): f.read_bytes() for f in folder.rglob("*") if f.is_file()}
    aside = other.with_name("adapter.aside")
    other.rename(aside)
    try:
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(other))}, the reward model the ppo stage of run 't' "
                                              r"was given \(reward_adapter\), is missing"):
            publish(PublishArgs(dry_run=True, include_reward=True), RunArgs(run="t", runs_dir=str(runs)))
    finally:
        aside.rename(other)
    assert {str(f): f.read_bytes() for f in folder.rglob("*") if f.is_file()} == before
    # a GRPO stage beside it, rewarded by the rm stage's model: one reward column cannot serve both
    from tests.fake_upstream import add_policy_stage

    add_policy_stage(runs, profile, "grpo", seed=6)
    with pytest.raises(ConfigError, match=r"rewarded by different reward models \(ppo: .*other_rm.*, grpo: the rm stage\)"):
        main(*eval_args(runs, profile, "--gold_judge", ""))


def test_the_sft_a_policy_started_from_is_evals_sft(tmp_path, tiny_models):
    """PPO trained from `sft_adapter: <an adapter of your own>` was compared with the run's sft stage (win rates, KL
    to the reference). eval's SFT is now the adapter it started from: here the PPO adapter's own copy, so every
    reply is the same and its KL 0. report.md says so; publish refuses --include_sft (sft/ would be the run's SFT) and
    its card names the given adapter; a GRPO stage from the run's SFT beside it cannot share one baseline. Mutants:
    eval's SFT the sft stage's; the DPO/other stages' own SFT not counted; publish's sft/ of the run."""
    from pipeline.config import RunArgs
    from stages.eval import main
    from stages.publish import PublishArgs
    from stages.publish import main as publish
    from tests.fake_upstream import add_policy_stage

    profile = tiny_models["llama"]
    runs = build_upstream(tmp_path / "runs", profile)
    own = tmp_path / "my_sft" / "adapter"
    shutil.copytree(runs / "t" / "ppo" / "adapter", own)
    given_to_ppo(runs, sft_adapter=str(own))
    main(*eval_args(runs, profile, "--gold_judge", ""))
    report = json.loads((runs / "t" / "eval" / "report.json").read_text())
    assert report["sft_adapter"] == str(own)
    assert all(x["sft"] == x["ppo"] for x in report["samples"]) and report["figures"]["kl_mean"] == pytest.approx(0, abs=1e-5)
    assert f"SFT here is the adapter the RL stages started from, given as `sft_adapter` (`{own}`)" in (
        runs / "t" / "eval" / "report.md").read_text()
    with pytest.raises(ConfigError, match=r"started from the SFT adapter it was given \(sft_adapter: .*my_sft/adapter\), "
                                          r"not the run's: publish without --include_sft"):
        publish(PublishArgs(dry_run=True, include_sft=True), RunArgs(run="t", runs_dir=str(runs)))
    publish(PublishArgs(dry_run=True), RunArgs(run="t", runs_dir=str(runs)))
    card = (runs / "t" / "publish" / "model" / "README.md").read_text()
    assert "| sft | given as `sft_adapter` (`adapter`): trained outside this run |" in card
    add_policy_stage(runs, profile, "grpo", seed=6)
    with pytest.raises(ConfigError, match=r"started from different SFT adapters \(ppo: .*my_sft/adapter, grpo: the sft "
                                          r"stage\)"):
        main(*eval_args(runs, profile, "--gold_judge", ""))


def test_card_of_a_flagged_non_ppo_policy_warns(tmp_path):
    """eval flags grpo (flagged_policies, its over-optimisation/KL/length signs); the card for --policy grpo says
    nothing, where a flagged PPO's card carries a warning."""
    from stages.publish import PublishArgs
    from stages.publish_card import model_card
    row = lambda p, g, kl: {"method": "x", "proxy_mean": p, "gold_mean": g, "kl_mean": kl, "sqrt_kl": kl ** .5,  # noqa
                            "length_mean": 10.0, "no_eos": 0.1}
    (tmp_path / "rm").mkdir()
    manifests = {"sft": {"config": {}, "metrics": {}}, "rm": {"outputs": {"adapter": str(tmp_path / "rm")}, "metrics": {}, "config": {}},
                 "grpo": {"config": {}, "metrics": {"method": "grpo"}},
                 "eval": {"metrics": {"n_prompts": 6, "comparison": {"sft": row(0, 0.1, 0), "grpo": row(3, -0.4, 25.0)},
                                      "flagged_policies": ["grpo"], "gold_judge": "sentiment"}}}
    card = model_card(PublishArgs(policy="grpo"), "me/x", "t", manifests, "org/base", "org/base", [], [], None)
    assert "⚠️ The evaluation flagged grpo" in card
    manifests["eval"]["metrics"]["flagged_policies"] = []
    assert "⚠️" not in model_card(PublishArgs(policy="grpo"), "me/x", "t", manifests, "org/base", "org/base", [], [], None)


def test_a_local_base_saved_as_bin_ships_its_weights(tmp_path, tiny_models):
    """A local base whose weights are pytorch_model.bin (save_pretrained(safe_serialization=False), older
    checkpoints): publish copies it under base/ with ignore_patterns("*.bin"), so base/ has a config and no weights,
    while the card says the base is included. What the folder holds beside the model (a git clone's .git/, a
    Trainer's optimizer and rng state) stays out."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import RunArgs
    from stages.eval import main as eval_main
    from stages.publish import PublishArgs, main

    spec = yaml.safe_load(tiny_models["llama"].read_text())
    bin_base = tmp_path / "bin_base"
    import torch
    model = AutoModelForCausalLM.from_pretrained(spec["name_or_path"])
    model.save_pretrained(bin_base)
    torch.save(model.state_dict(), bin_base / "pytorch_model.bin")  # as older transformers saved it
    (bin_base / "model.safetensors").unlink()
    AutoTokenizer.from_pretrained(spec["name_or_path"]).save_pretrained(bin_base)
    for rel in (".git/config", ".cache/huggingface/download/model.safetensors.metadata", "training_args.bin",
                "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "trainer_state.json", "__pycache__/m.pyc"):
        (bin_base / rel).parent.mkdir(parents=True, exist_ok=True)  # a git clone / `hf download --local-dir` / Trainer
        (bin_base / rel).write_text("[remote]\nurl = https://user:hf_secret@huggingface.co/x\n")
    AutoModelForCausalLM.from_pretrained(bin_base)  # a loadable base
    assert (bin_base / "pytorch_model.bin").is_file()
    profile = tmp_path / "bin.yaml"
    profile.write_text(yaml.safe_dump({**spec, "name_or_path": str(bin_base)}))
    runs = build_upstream(tmp_path / "runs", profile)
    eval_main(*eval_args(runs, profile, "--gold_judge", ""))
    main(PublishArgs(dry_run=True), RunArgs(run="t", runs_dir=str(runs)))
    folder = runs / "t" / "publish" / "model"
    assert "included in this repo under `base/`" in (folder / "README.md").read_text()
    AutoModelForCausalLM.from_pretrained(folder / "base")  # its weights are there (pytorch_model.bin)
    shipped = sorted(str(f.relative_to(folder / "base")) for f in (folder / "base").rglob("*") if f.is_file())
    assert "pytorch_model.bin" in shipped and not [f for f in shipped if f.startswith((".git", ".cache", "training_args"))]
    # a base saved by a Trainer: its training state is not the model (mutant: the optimizer's state shipped)
    assert not {"optimizer.pt", "scheduler.pt", "rng_state_0.pth", "trainer_state.json", "__pycache__/m.pyc"} & set(shipped)


def test_dry_run_listing_is_what_upload_folder_sends(tmp_path):
    """A local base fetched with `hf download --local-dir` holds .cache/huggingface/ (a git clone: .git/): copytree
    copies them under base/, the dry run lists them, upload_folder (DEFAULT_IGNORE_PATTERNS) leaves them out."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    from stages.publish import list_folder
    folder = tmp_path / "model"
    for rel in ("adapter_config.json", "base/model.safetensors", "base/.cache/huggingface/download/model.safetensors.metadata",
                "base/.git/config"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("x")
    # what HfApi.upload_folder commits: these additions (its own call, with its default ignore patterns)
    sent = [op.path_in_repo for op in HfApi()._prepare_upload_folder_additions(folder, "", ignore_patterns=list(DEFAULT_IGNORE_PATTERNS))]
    assert sorted(sent) == [name for name, _ in list_folder(folder)]


def test_publish_a_grpo_run_evaluated_without_a_gold_judge(tmp_path, tiny_models):
    """A run with GRPO only, evaluated with `gold_judge: ""`: eval writes no plots/ folder (no PPO curves, no gold
    curves), and publish's shutil.copytree(eval_dir / "plots") raises FileNotFoundError: a traceback, not an
    `error:` line, after stage.prepare."""
    from pipeline.config import RunArgs
    from stages.eval import main as eval_main
    from stages.publish import PublishArgs, main
    from tests.fake_upstream import add_policy_stage

    profile = tiny_models["llama"]
    runs = build_upstream(tmp_path / "runs", profile)
    add_policy_stage(runs, profile, "grpo", seed=6)
    shutil.rmtree(runs / "t" / "ppo")
    eval_main(*eval_args(runs, profile, "--gold_judge", ""))
    main(PublishArgs(dry_run=True, policy="grpo"), RunArgs(run="t", runs_dir=str(runs)))
    assert (runs / "t" / "publish" / "model" / "eval" / "report.md").is_file()


def test_rm_judge_refuses_a_checkpoint_without_a_trained_score_head(tiny_models):
    """`rm:<a causal-LM checkpoint>` (the base, a merged policy) loads with a freshly initialised score head: a random
    gold judge, different on every load, no error."""
    import yaml

    from pipeline.judges import judge_scores, load_judge
    model_dir = yaml.safe_load(tiny_models["llama"].read_text())["name_or_path"]
    prompts, replies = [[{"role": "user", "content": "Hi"}]] * 2, ["A happy day.", "A sad day."]
    try:
        a = judge_scores(load_judge(f"rm:{model_dir}"), prompts, replies)
        b = judge_scores(load_judge(f"rm:{model_dir}"), prompts, replies)
    except ConfigError:
        return
    pytest.fail(f"no error; two loads of the same judge scored {a} and {b}")


def test_a_judge_module_that_fails_on_import_is_one_config_error(tmp_path, monkeypatch):
    from pipeline.judges import load_judge
    (tmp_path / "needs_key_judge.py").write_text("raise RuntimeError('set GOLD_API_KEY')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="needs_key_judge"):
        load_judge("needs_key_judge:score")
