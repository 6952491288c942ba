"""Every YAML in configs/ parses into its dataclasses; unknown keys fail naming the key and the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, ModelProfile, RunArgs, load_model_profile, parse, read_yaml
from tests.conftest import REPO, yaml_with

STAGE_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))


def stage_classes(name: str):
    """The dataclasses a stage parses, as its own parse function declares them."""
    import importlib

    name = {"grpo": "ppo", "rloo": "ppo", "reinforce_pp": "ppo"}.get(name, name)  # the RL estimators' variants of the ppo stage
    module = importlib.import_module(f"stages.{name}")
    if hasattr(module, "CONFIG_CLASSES"):
        return module.CONFIG_CLASSES()
    raise AssertionError(f"stages/{name} does not declare CONFIG_CLASSES")


def resolved_yaml(path) -> dict:
    """A stage YAML's keys as the stage sees them: a variant (base_config) is its base's keys with its own overrides."""
    values = read_yaml(path)
    if "base_config" in values:
        values = {**read_yaml(REPO / values.pop("base_config")), **values}
    return values


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: p.name)
def test_stage_yaml_parses(path):
    classes = stage_classes(path.stem)
    parsed = parse(classes, ["--config", str(path)])
    assert len(parsed) == len(classes)
    # every key of the YAML reached a dataclass with the YAML's value
    values = resolved_yaml(path)
    for key, value in values.items():
        holders = [obj for obj in parsed if hasattr(obj, key)]
        assert holders, key
        got = getattr(holders[0], key)
        got = got.value if hasattr(got, "value") else got  # enums in TrainingArguments
        if value == "none" and got in ([], ["none"]):  # report_to: "none" normalises to []
            continue
        assert got == value or str(got) == str(value), (key, got, value)


@pytest.mark.parametrize("path", sorted((REPO / "configs/models").glob("*.yaml")), ids=lambda p: p.name)
def test_model_profiles_parse(path):
    profile = load_model_profile(path)
    assert isinstance(profile, ModelProfile) and profile.name_or_path and profile.lora_target_modules


@pytest.mark.parametrize("path", sorted((REPO / "configs/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    from pipeline.launch import accelerate_config_problem

    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type is not None and cfg.num_processes >= 1
    assert accelerate_config_problem(path) is None  # the launch's own check lets every shipped config through
    if path.name == "cpu2.yaml":
        assert cfg.num_processes == 2 and str(cfg.distributed_type).endswith("MULTI_GPU")


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text(yaml_with((REPO / "configs/sft.yaml").read_text(), "\nlearning_rat: 0.1\n"))
    with pytest.raises(ConfigError) as err:
        parse(stage_classes("sft"), ["--config", str(bad)])
    assert "learning_rat" in str(err.value) and str(bad) in str(err.value) and "learning_rate" in str(err.value)


@pytest.mark.parametrize("stage,line,message", [
    ("sft", "per_device_train_batch_size: 16.5", "'per_device_train_batch_size' in .* is 16.5: it must be a whole number"),
    ("sft", "learning_rate: [0.002]", r"'learning_rate' in .* is \[0.002\]: it must be a single value, not a list"),
    ("sft", "lora_r: true", "'lora_r' in .* is True: it must be a whole number"),
    ("sft", "dataset_mixture: [data/story/sft.jsonl]", "'dataset_mixture' in .* it must be a mapping of key: value"),
    ("ppo", "response_length: 2.5", "'response_length' in .* is 2.5: it must be a whole number"),
    ("ppo", "whiten_rewards: 5", "'whiten_rewards' in .* is 5: it must be true or false"),
    ("label", "offensive_words: 5", "'offensive_words' in .* is 5: it must be a list"),
    ("label", "overlap: 1.5", "'overlap' in .* is 1.5: it must be a whole number"),
    ("eval", "seed:", "'seed' in .* is None: it must be a value, not empty"),
    ("eval", "hacking_kl:", "'hacking_kl' in .* is None: it must be a value, not empty"),
    ("eval", "gold_judge: no", "'gold_judge' in .* is False: it must be text: put it in quotes"),
    ("eval", "gold_judge: 5", "'gold_judge' in .* is 5: it must be text: put it in quotes"),
    ("label", "title: 2024", "'title' in .* is 2024: it must be text: put it in quotes"),
    ("sft", "learning_rate: true", "'learning_rate' in .* is True: it must be a number"),  # not a rate of 1.0
    ("label", "offensive_words: [[a, b]]", r"'offensive_words' in .* is \[\['a', 'b'\]\]: it must be a list of single values"),
])
def test_a_yaml_value_of_the_wrong_type_names_its_key_and_file(stage, line, message, tmp_path):
    """argparse converts text itself, but a YAML number, list or mapping reaches the config as it is: checked against
    the field's type, named by key and file, before anything runs. The same key on the command line wins unchecked."""
    src = REPO / "configs" / f"{stage}.yaml"
    bad = tmp_path / f"{stage}.yaml"
    bad.write_text(yaml_with(src.read_text(), f"\n{line}\n"))
    with pytest.raises(ConfigError, match=message):
        parse(stage_classes(stage), ["--config", str(bad)])
    key = line.split(":")[0]
    value = {"dataset_mixture": '{"data/story/sft.jsonl": 1}', "whiten_rewards": "false", "offensive_words": "x",
             "learning_rate": "0.002", "lora_r": "4", "gold_judge": "sentiment", "title": "Which?"}.get(key, "2")
    parse(stage_classes(stage), ["--config", str(bad), f"--{key}", value])


def test_an_empty_yaml_value_stays_allowed_where_the_field_takes_none(tmp_path):
    """`key:` is None: refused for a field that needs a value (above), taken for an optional one (simulate's
    temperature: none means calibrate it; sft's dataset_name: none means the mixture), and not taken for eval's
    gold_judge, a text whose 'no judge' is '' (empty text, not an empty value)."""
    bad = tmp_path / "simulate.yaml"
    bad.write_text(yaml_with((REPO / "configs/simulate.yaml").read_text(), "\ntemperature:\npairs_dataset:\n"))
    sim = parse(stage_classes("simulate"), ["--config", str(bad)])[0]
    assert sim.temperature is None and sim.pairs_dataset is None
    bad = tmp_path / "eval.yaml"
    bad.write_text(yaml_with((REPO / "configs/eval.yaml").read_text(), "\ngold_judge:\n"))
    with pytest.raises(ConfigError, match="'gold_judge' in .* is None: it must be a value, not empty"):
        parse(stage_classes("eval"), ["--config", str(bad)])


def test_report_to_an_integration_that_is_not_installed_is_refused_at_parse():
    """SFT's Trainer would fail building its callback after the run folder was prepared (the manifest deleted)."""
    from transformers.integrations import get_available_reporting_integrations

    assert "wandb" not in get_available_reporting_integrations()  # not in the pinned stack
    with pytest.raises(ConfigError, match="--report_to on the command line names 'wandb', whose package is not installed"):
        parse(stage_classes("sft"), ["--config", str(REPO / "configs/sft.yaml"), "--report_to", "wandb"])
    with pytest.raises(ConfigError, match="names 'wandbb', which is not a transformers integration"):
        parse(stage_classes("rm"), ["--config", str(REPO / "configs/rm.yaml"), "--report_to", "wandbb"])
    parse(stage_classes("sft"), ["--config", str(REPO / "configs/sft.yaml"), "--report_to", "none"])


@pytest.mark.parametrize("stage,flag,value,message", [
    ("sft", "--seed", "-1", r"--seed on the command line is -1: it must be in \[0, 4294967296\)"),
    ("ppo", "--seed", str(2**32), r"--seed on the command line is 4294967296: it must be in \[0, 4294967296\)"),
    ("dpo", "--beta", "0", "--beta on the command line is 0.0: it must be > 0"),
    ("label", "--port", "65536", r"--port on the command line is 65536: it must be in \[1, 65536\)"),
    ("sft", "--logging_steps", "-3", "--logging_steps on the command line is -3.0: it must be > 0"),
    ("eval", "--label_store", "nowhere/labels.sqlite", "invalid value of --label_store on the command line: label_store "
     "nowhere/labels.sqlite does not exist: give the labels.sqlite that `make label` wrote, or leave it empty"),
    ("dpo", "--rm_config", "nowhere/rm.yaml", "invalid value of --rm_config on the command line: rm_config "
     "nowhere/rm.yaml does not exist: give the recipe's reward-model config"),
])
def test_values_no_stage_can_run_with_are_refused_at_parse(stage, flag, value, message):
    """A negative seed failed in set_seed after the run folder was prepared (deleting the last manifest); a DPO beta of
    0 or less trained silently (no preference signal, or the wrong sign). A label store named but not there gave a
    report without the human win rate, after minutes of sampling; DPO's missing rm_config was blamed on --config, once
    SFT had trained."""
    with pytest.raises(ConfigError, match=message):
        parse(stage_classes(stage), ["--config", str(REPO / "configs" / f"{stage}.yaml"), flag, value])

@pytest.mark.parametrize("stage,flags,message", [
    ("sft", ["--adam_beta1", "5"], r"--adam_beta1 on the command line is 5.0: it must be in \[0, 1\)"),
    ("rm", ["--adam_beta2", "1"], r"--adam_beta2 on the command line is 1.0: it must be in \[0, 1\)"),
    ("dpo", ["--adam_epsilon", "-1"], "--adam_epsilon on the command line is -1.0: it must be >= 0"),
    ("sft", ["--dataloader_num_workers", "-1"], "--dataloader_num_workers on the command line is -1: it must be >= 0"),
    ("rm", ["--optim", "adamw_bnb_8bit"], "--optim on the command line is 'adamw_bnb_8bit', which cannot be built "
                                          "here: You need to install `bitsandbytes`"),
    ("sft", ["--lr_scheduler_type", "cosine_with_min_lr"], "--lr_scheduler_type on the command line is "
     r"'cosine_with_min_lr', whose schedule cannot be built from lr_scheduler_kwargs \{\}: One of min_lr or min_lr_rate"),
])
def test_a_trainers_optimizer_and_schedule_are_checked_at_parse(stage, flags, message):
    """Adam's betas and epsilon, the data loader's workers, an optimizer whose package is missing and a schedule that
    needs lr_scheduler_kwargs failed when the Trainer built them, with a traceback, after the run folder was prepared
    (the stage's last manifest deleted); each is one error at parse now, and the settings that work still parse."""
    config = ["--config", str(REPO / "configs" / f"{stage}.yaml")]
    with pytest.raises(ConfigError, match=message):
        parse(stage_classes(stage), [*config, *flags])
    train = parse(stage_classes(stage), [*config, "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs",
                                         '{"min_lr_rate": 0.1}', "--optim", "sgd", "--adam_beta2", "0"])[0]
    assert (train.lr_scheduler_kwargs, train.adam_beta2) == ({"min_lr_rate": 0.1}, 0.0)


@pytest.mark.parametrize("stage,flags,message", [
    ("simulate", ["--label_config", "configs/lable.yaml"], "label config configs/lable.yaml does not exist"),
    ("simulate", ["--judge", "nosuch"], "unknown judge 'nosuch': name one of sentiment"),
    ("eval", ["--gold_judge", "rm:nowhere/rm"], "judge 'rm:nowhere/rm': .*nowhere/rm is not a folder"),
    ("ppo", ["--reward_adapter", "nowhere/adapter"], "--reward_adapter nowhere/adapter is not a folder"),
    ("ppo", ["--sft_adapter", "nowhere/adapter"], "--sft_adapter nowhere/adapter is not a folder"),
    ("sft", ["--model_config", "configs/models/nope.yaml"], "model profile .*configs/models/nope.yaml does not exist"),
])
def test_files_a_stage_names_are_checked_before_any_stage_runs(stage, flags, message, capsys):
    """make's check of the stages it is named with: a mistyped label config, judge, adapter folder or model profile was
    refused only when its stage ran, after the stages before it had trained (30 s to an hour)."""
    from pipeline.launch import check

    module = {"ppo": "stages.ppo"}.get(stage, f"stages.{stage}")
    argv = ["--config", str(REPO / "configs" / f"{stage}.yaml")]
    assert check(module, argv) == 0
    capsys.readouterr()
    assert check(module, [*argv, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_resume_from_checkpoint_is_refused_not_ignored(stage):
    """The Trainer's --resume_from_checkpoint was accepted and never read (the stages resume by themselves)."""
    with pytest.raises(ConfigError, match="--resume_from_checkpoint on the command line: the training stages resume by "
                                          "themselves"):
        parse(stage_classes(stage), ["--config", str(REPO / "configs" / f"{stage}.yaml"), "--resume_from_checkpoint",
                                     "runs/x/sft/trainer/checkpoint-3"])


@pytest.mark.parametrize("stage,flag,bad,message,edge", [
    ("eval", "--temperature", "-0.5", "is -0.5: it must be >= 0", "0"),
    ("pairs", "--top_k", "-1", "is -1: it must be >= 0", "0"),
    ("eval", "--max_new_tokens", "0", "is 0: it must be >= 1", "1"),
    ("sft", "--max_grad_norm", "-1", "is -1.0: it must be >= 0", "0"),
    ("sft", "--lora_r", "0", "is 0: it must be >= 1", "1"),
    ("sft", "--lora_alpha", "0", "is 0: it must be > 0", "1"),
    ("sft", "--max_length", "0", "is 0: it must be >= 1", "1"),
    ("sft", "--lora_dropout", "1", r"is 1.0: it must be in \[0, 1\)", "0"),
])
def test_each_ranged_setting_is_refused_past_its_bound_and_kept_at_it(stage, flag, bad, message, edge):
    """RANGES, entry by entry (each one dropped from the table went unnoticed): a negative temperature or top_k, no
    new tokens, a negative clipping norm, a LoRA of rank or alpha 0, a max_length of 0, a dropout of 1 are
    refused at parse naming the flag; the bound itself (greedy temperature 0, top_k 0 = off, rank 1, ...) parses."""
    config = ["--config", str(REPO / "configs" / f"{stage}.yaml")]
    with pytest.raises(ConfigError, match=f"^{flag} on the command line {message}$"):
        parse(stage_classes(stage), [*config, flag, bad])
    parsed = parse(stage_classes(stage), [*config, flag, edge])
    assert any(getattr(obj, flag[2:], None) == float(edge) for obj in parsed)


def test_config_as_the_last_word_is_one_line_not_a_traceback():
    """`--config` with nothing after it (a Makefile variable left empty) is one ConfigError, not an IndexError."""
    for argv in (["--config"], ["--run", "x", "--config"]):
        with pytest.raises(ConfigError, match="^--config needs a path to a YAML file$"):
            parse(stage_classes("sft"), argv)


def test_a_second_config_names_recipes():
    """`make sft ARGS="--config my.yaml"`: the second --config was an unknown flag ("did you mean '--fsdp_config'?")."""
    with pytest.raises(ConfigError, match=r"--config is given more than once \(configs/sft.yaml, my.yaml\): `make` gives "
                                          r"the recipe's own; for configs of your own, put them in configs/recipes/NAME/"):
        parse(stage_classes("sft"), ["--config", "configs/sft.yaml", "--run", "x", "--config", "my.yaml"])
    with pytest.raises(ConfigError, match=r"--config is given more than once \(configs/sft.yaml, my.yaml\)"):
        parse(stage_classes("sft"), ["--config", "configs/sft.yaml", "--config=my.yaml"])


def test_config_equals_file_reads_the_file():
    """`--config=FILE` is `--config FILE` (argparse's two spellings)."""
    train, args, _ = parse(stage_classes("sft"), ["--config=configs/sft.yaml"])
    assert train.learning_rate == read_yaml(REPO / "configs/sft.yaml")["learning_rate"] and args.sample_prompts


def test_sft_evaluating_with_nothing_held_out_is_refused_before_any_stage():
    from pipeline.launch import check

    argv = ["--config", str(REPO / "configs/sft.yaml"), "--eval_fraction", "0"]
    assert check("stages.sft", [*argv, "--eval_strategy", "steps"]) == 2
    assert check("stages.sft", argv) == 0



@pytest.mark.parametrize("flags,problem", [(["--num_responses", "1"], "num_responses must be at least 2"),
                                           (["--temperature", "0"], "temperature 0 is greedy decoding"),
                                           (["--top_k", "1"], "top_k 1 is greedy decoding")])
def test_pairs_that_cannot_differ_are_refused_before_any_stage(flags, problem, capsys):
    """make's check (before SFT trains) let these through: pairs refused them only once it ran, after SFT."""
    from pipeline.launch import check

    assert check("stages.pairs", ["--config", str(REPO / "configs/pairs.yaml"), *flags]) == 2
    assert capsys.readouterr().err.startswith(f"error: {problem}")
    assert check("stages.pairs", ["--config", str(REPO / "configs/pairs.yaml")]) == 0


@pytest.mark.parametrize("flag,value,want", [("--grad_clip", "-1", "> 0"), ("--grad_clip", "0", "> 0"),
                                             ("--dropout", "1.5", "in [0, 1)"), ("--min_lr_ratio", "-0.5", ">= 0")])
def test_make_base_refuses_optimisation_values_that_break_training(flag, value, want):
    """A negative clip reversed the gradients (loss 6.9 -> 12.6, the checkpoint written anyway), 0 trained nothing,
    a dropout of 1.5 was torch's traceback after the run folder, a negative floor a negative learning rate."""
    from stages.base import CONFIG_CLASSES

    with pytest.raises(ConfigError, match=re.escape(f"{flag} on the command line is {float(value)}: it must be {want}")):
        parse(CONFIG_CLASSES(), ["--config", str(REPO / "configs/base.yaml"), flag, value])
    parse(CONFIG_CLASSES(), ["--config", str(REPO / "configs/base.yaml")])


def test_a_training_arguments_error_is_one_line_naming_a_key_it_names():
    """TrainingArguments' own check spans three lines and names its keys as `--load_best_model_at_end`: the error was
    three lines blaming "configs/rm.yaml or the command line"."""
    with pytest.raises(ConfigError) as err:
        parse(stage_classes("rm"), ["--config", "configs/rm.yaml", "--eval_strategy", "no"])
    text = str(err.value)
    assert "\n" not in text and text.startswith("invalid value of 'save_strategy' in configs/rm.yaml: ")
    assert text.endswith("but found - Evaluation strategy: IntervalStrategy.NO - Save strategy: SaveStrategy.STEPS")


def test_unknown_cli_flag_is_an_error():
    with pytest.raises(ConfigError, match="lerning_rate"):
        parse(stage_classes("sft"), ["--config", str(REPO / "configs/sft.yaml"), "--lerning_rate", "1"])
    with pytest.raises(ConfigError) as err:  # no near name: the error still says where the flags are
        parse(stage_classes("pairs"), ["--config", str(REPO / "configs/pairs.yaml"), "--bogus", "1"])
    pairs_yaml = REPO / "configs/pairs.yaml"
    assert str(err.value) == ("unknown command-line argument(s) ['--bogus', '1']: a stage's flags are the keys of its "
                              f"config ({pairs_yaml}); the stage's --help, given its --config, lists them all")


def test_help_without_a_config_says_its_defaults_are_not_makes(capsys):
    """Without --config, --help lists the dataclasses' defaults (DPO's batch_by_prompt False), where make's config
    sets many of them (configs/dpo.yaml: true): it says so. Given the config, it shows the config's values."""
    import re

    def help_text(*argv):
        with pytest.raises(SystemExit) as done:
            parse(stage_classes("dpo"), [*argv, "--help"])
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        return text, re.search(r"--batch_by_prompt \[BATCH_BY_PROMPT\], .*? \(default: (\w+)\)", text).group(1)

    text, default = help_text()
    assert default == "False" and ("The defaults below are the code's. `make` runs each stage with its config "
                                   "(configs/<stage>.yaml, or a recipe's), which sets many of them") in text
    text, default = help_text("--config", "configs/dpo.yaml")
    assert default == "True" and "The defaults below" not in text


def test_the_unknown_flag_error_names_the_module_and_config_make_parses(tmp_path, capsys):
    """`python -m stages.<stage> --help` named stages.grpo for `make grpo` (no such module: it is stages.ppo with
    configs/grpo.yaml) and stages.label-export for `make label-export`, and without --config it lists the dataclass
    defaults, not make's. make's check names the module and config it parses."""
    from pipeline.launch import check

    assert check("stages.ppo", ["--config", "configs/grpo.yaml", "--bogus", "1"], "grpo") == 2
    assert capsys.readouterr().err.endswith("`python -m stages.ppo --config configs/grpo.yaml --help` lists them all\n")
    assert check("stages.label.export", ["--config", "configs/label.yaml", "--bogus", "1"], "label-export") == 2
    assert capsys.readouterr().err.endswith("`python -m stages.label.export --config configs/label.yaml --help` lists "
                                            "them all\n")
    import os

    from pipeline.config import STAGE_MODULE_ENV

    assert STAGE_MODULE_ENV not in os.environ  # the check's own, not left to the next parse


def test_cli_overrides_yaml():
    train, args, run = parse(stage_classes("sft"), ["--config", str(REPO / "configs/sft.yaml"), "--learning_rate", "1e-4",
                                                     "--lora_r", "4", "--run", "xyz"])
    assert train.learning_rate == 1e-4 and args.lora_r == 4 and run.run == "xyz"


def test_a_merge_key_may_be_overridden_and_equal_values_of_two_keys_are_not_a_key_twice(tmp_path):
    """`<<: *base` then the same key of its own is YAML's override, not a key given twice."""
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {lr: 1, epochs: 2}\nown:\n  <<: *b\n  lr: 3\nother: 1\nmore: 1\n")
    assert read_yaml(path) == {"base": {"lr": 1, "epochs": 2}, "own": {"lr": 3, "epochs": 2}, "other": 1, "more": 1}


def test_malformed_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse((RunArgs,), ["--config", str(broken)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse((RunArgs,), ["--config", str(tmp_path / "nope.yaml")])
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        parse((RunArgs,), ["--config", str(listy)])


@pytest.mark.parametrize("content,message", [
    (b"a: 1\nfoo: [1, 2\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow "
                            "sequence) at line 3, column 1: fix it there"),
    (b"\x00\xff\xfe garbage\n", "is not UTF-8 text (line 1, column 2): save it as UTF-8"),
    (b"", "is empty: give it the stage's key: value lines (as configs/ has them)"),
    (b"# only a comment\n", "is empty: give it the stage's key: value lines (as configs/ has them)"),
    (b"run: x\n1: foo\n", "has the key 1, which is not a name: every key is a setting's name (as configs/ has them)"),
    (b"null: 3\n", "has the key None, which is not a name: every key is a setting's name (as configs/ has them)"),
    # pyyaml keeps the last of a key given twice: a learning rate edited lower down undid the one above, silently
    (b"learning_rate: 1e-3\nrun: x\nlearning_rate: 5e-4\n",
     "is not valid YAML: the key 'learning_rate' is given twice (first at line 1) at line 3, column 1: fix it there"),
    (b"dataset_mixture: {a: {weight: 1}, a: {weight: 2}}\n",
     "is not valid YAML: the key 'a' is given twice (first at line 1) at line 1, column 35: fix it there"),
], ids=["broken", "not-utf8", "empty", "comment-only", "number-key", "null-key", "key-twice", "nested-key-twice"])
def test_a_config_file_that_is_not_yaml_of_keys_is_one_line_naming_it(content, message, tmp_path):
    """pyyaml's own message spans several lines; a non-UTF-8 file was a traceback; an empty one gave every default,
    and then transformers' error about a bf16 GPU."""
    path = tmp_path / "sft.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        parse((RunArgs,), ["--config", str(path)])
    assert str(err.value) == f"config file {path} {message}" and "\n" not in str(err.value)


@pytest.mark.parametrize("run", ["../escape", "x;echo", "-rf", "..", ".", "a b", ""])
def test_a_run_name_that_is_not_a_plain_folder_name_is_refused_by_every_stage(run):
    """`make` checks RUN=, but ARGS="--run ../escape" reached the stage, which wrote ../escape/sft/ outside runs/."""
    with pytest.raises(ConfigError) as err:
        parse((RunArgs,), [f"--run={run}"])
    assert str(err.value) == (f"invalid value of --run on the command line: run name {run!r}: name the run with letters, "
                              f"digits, . _ - only, starting with a letter or digit (e.g. --run mine; make: RUN=mine)")
    assert parse((RunArgs,), ["--run", "my-run_2.b"])[0].run == "my-run_2.b"


def test_model_profile_unknown_key(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name_or_path: x\nlora_targets: [q_proj]\n")
    with pytest.raises(ConfigError, match="lora_targets.*m.yaml|m.yaml.*lora_targets"):
        load_model_profile(p)


@pytest.mark.parametrize("lines,message", [
    ("dtype: fp16", "dtype is 'fp16': it must be one of float32, bfloat16, float16"),
    ("chat_template: 5", "chat_template is 5: it must be text"),
    ("load_in_4bit: 1", "load_in_4bit is 1: it must be true or false"),
    ("lora_target_modules: q_proj", "lora_target_modules is 'q_proj': it must be a list of module names"),
    ("lora_target_modules: [q_proj, 5]", r"lora_target_modules is \['q_proj', 5\]: it must be a list of module names"),
    ("trust_remote_code: 'false'", "trust_remote_code is 'false': it must be true or false"),  # text, yet truthy
])
def test_a_model_profile_value_of_the_wrong_type_is_one_clear_error(lines, message, tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(f"name_or_path: models/tiny\n{lines}\n")
    with pytest.raises(ConfigError, match=f"model profile {p}: {message}"):
        load_model_profile(p)
    p.write_text("name_or_path: [models/tiny]\n")
    with pytest.raises(ConfigError, match=r"name_or_path is \['models/tiny'\]: it must be text"):
        load_model_profile(p)


def test_a_folder_without_a_model_is_one_clear_error(tmp_path):
    from pipeline.models import load_tokenizer

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=f"no tokenizer loads from {tmp_path} .*must be a model folder"):
        load_tokenizer(ModelProfile(name_or_path=str(tmp_path)))


def test_a_hub_id_that_does_not_download_says_what_to_check(monkeypatch):
    """A Hub id that cannot be fetched (no network, a gated model, a typo) was told to be "a model folder or a Hub
    model id", which it is: the error now names what to check instead."""
    import transformers

    from pipeline.models import load_tokenizer

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.\nCheck your connection.")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    with pytest.raises(ConfigError) as err:
        load_tokenizer(ModelProfile(name_or_path="someone/some-model"))
    assert str(err.value) == (
        "no tokenizer loads from the Hub id someone/some-model (OSError: We couldn't connect to 'https://huggingface.co' "
        "to load the files, and couldn't find them in the cached files.): check the id, the network (HF_ENDPOINT, a "
        "proxy) and, for a gated model such as Llama, its license on the Hub and `hf auth login`; or `hf download "
        "someone/some-model` where there is a network and point name_or_path at that folder")


def test_an_abbreviated_flag_is_refused_not_guessed():
    """argparse would read --learning_rat as --learning_rate: a typo must not silently set another key."""
    from stages.ppo import parse_args

    with pytest.raises(ConfigError, match=r"unknown command-line argument.*did you mean '--learning_rate'"):
        parse_args(["--config", "configs/ppo.yaml", "--learning_rat", "0.1"])


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_a_token_on_the_command_line_is_refused_before_anything_is_written(stage, tmp_path):
    """--hub_token would land verbatim in manifest.json's command and in adapter/training_args.bin."""
    module = __import__(f"stages.{stage}", fromlist=["parse_args"])
    with pytest.raises(ConfigError, match="--hub_token would be written .* HF_TOKEN"):
        module.parse_args(["--config", f"configs/{stage}.yaml", "--hub_token", "hf_secret123", "--runs_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_an_offline_hub_id_in_the_cache_is_used_and_one_not_there_is_refused(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (the Makefile's): a Hub model downloaded earlier (`hf download`) loads from the cache, as
    transformers itself would load it; one that is not there is one error naming the download command."""
    from huggingface_hub import constants

    from pipeline.models import resolve_base

    repo = tmp_path / "hub" / "models--someorg--tiny"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text('{"model_type": "llama"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_base("someorg/tiny") == "someorg/tiny"
    with pytest.raises(ConfigError, match=r"'someorg/other' is neither a local folder nor in the Hub cache.*"
                                          r"`hf download someorg/other`"):
        resolve_base("someorg/other")


def test_qlora_computes_in_the_profiles_half_precision():
    """A float16 profile (T4, V100: no bf16) computes its 4-bit matmuls in fp16, like the rest of its model."""
    import torch

    from pipeline.models import bnb_4bit_config

    assert bnb_4bit_config("float16").bnb_4bit_compute_dtype == torch.float16
    assert bnb_4bit_config("bfloat16").bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_4bit_config("float32").bnb_4bit_compute_dtype == torch.bfloat16  # 4-bit never computes in fp32


def test_a_profiles_dtype_is_the_torch_dtype_its_base_loads_in():
    """load_base's dtype: each of the three a profile may name, as itself (a float16 profile's base in fp16, not bf16)."""
    import torch

    from pipeline.models import dtype_of

    loaded = [dtype_of(ModelProfile(name_or_path="models/tiny", dtype=d)) for d in ("float32", "bfloat16", "float16")]
    assert loaded == [torch.float32, torch.bfloat16, torch.float16]


def test_a_4bit_profile_loads_with_its_own_compute_dtype(monkeypatch):
    """What load_base passes to from_pretrained for a 4-bit float16 profile (as on a GPU: CUDA stood in for here)."""
    import torch

    from pipeline.models import quantization_kwargs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    profile = ModelProfile(name_or_path="models/tiny", dtype="float16", load_in_4bit=True)
    assert quantization_kwargs(profile)["quantization_config"].bnb_4bit_compute_dtype == torch.float16


@pytest.mark.parametrize("stage,flag,value,message", [
    ("sft", "--learning_rate", "nan", "--learning_rate on the command line is nan: it must be > 0"),
    ("pairs", "--top_p", "0", r"--top_p on the command line is 0.0: it must be in \(0, 1\]"),
    ("sft", "--max_steps", "0", "--max_steps on the command line is 0: give a number of steps >= 1, or -1"),
])
def test_a_nan_rate_a_zero_top_p_and_zero_steps_are_refused_and_their_edges_kept(stage, flag, value, message):
    """NaN compares false with every bound (a NaN learning rate would train to NaN weights); top_p 0 keeps no token
    (top_p's range is (0, 1], open at 0); max_steps 0 trains nothing, while -1 means 'by num_train_epochs'."""
    config = ["--config", str(REPO / "configs" / f"{stage}.yaml")]
    with pytest.raises(ConfigError, match=message):
        parse(stage_classes(stage), [*config, flag, value])
    edge = {"--learning_rate": "1e-9", "--top_p": "1", "--max_steps": "-1"}[flag]
    parsed = parse(stage_classes(stage), [*config, flag, edge])
    assert any(getattr(obj, flag[2:], None) == float(edge) for obj in parsed)


@pytest.mark.parametrize("stage,flag,value", [("simulate", "--position_bias", "nan"), ("simulate", "--tie_band", "nan"),
                                              ("ppo", "--temperature", "inf")])
def test_a_number_that_is_not_finite_is_refused_in_every_config(stage, flag, value):
    """No range names these, and NaN passes every comparison their own checks make: a NaN position_bias made every
    simulated label 'right', a NaN tie_band no pair a tie, a NaN hacking_kl switched eval's KL flag off."""
    config = ["--config", str(REPO / "configs" / f"{stage}.yaml")]
    with pytest.raises(ConfigError, match=rf"^{flag} on the command line is {value}: give a finite number$"):
        parse(stage_classes(stage), [*config, flag, value])
    assert any(getattr(obj, flag[2:], None) == 0.25 for obj in parse(stage_classes(stage), [*config, flag, "0.25"]))


def test_a_bad_value_in_a_variants_base_file_names_the_base_file(tmp_path):
    """grpo.yaml takes most keys from ppo.yaml (base_config): a bad value read from the base file is blamed on the base
    file, and the variant's own key on the variant, so the user edits the file that holds it."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml_with((REPO / "configs/ppo.yaml").read_text(), "\nresponse_length: 2.5\n"))
    variant = tmp_path / "variant.yaml"
    variant.write_text(f"base_config: {base}\nseed: 3\n")
    with pytest.raises(ConfigError, match=rf"'response_length' in {base}\b is 2.5: it must be a whole number"):
        parse(stage_classes("ppo"), ["--config", str(variant)])
    variant.write_text(f"base_config: {base}\nseed: 3\nresponse_length: 4\nnum_ppo_epochs: 1.5\n")
    with pytest.raises(ConfigError, match=rf"'num_ppo_epochs' in {variant} is 1.5: it must be a whole number"):
        parse(stage_classes("ppo"), ["--config", str(variant)])
    base.write_text(yaml_with((REPO / "configs/ppo.yaml").read_text(), "\nlerning_rate: 1e-3\n"))  # a typo in the base file
    variant.write_text(f"base_config: {base}\nseed: 3\n")
    with pytest.raises(ConfigError, match=rf"^unknown config key 'lerning_rate' in {base} \(did you mean 'learning_rate'"):
        parse(stage_classes("ppo"), ["--config", str(variant)])


@pytest.mark.parametrize("value", ["5", "[a]", "''"])
def test_a_base_config_that_is_not_a_path_is_one_line(value, tmp_path):
    """`base_config: 5` was a 32-line TypeError from inside the loader."""
    variant = tmp_path / "v.yaml"
    variant.write_text(f"base_config: {value}\n")
    with pytest.raises(ConfigError, match=rf"'base_config' in {re.escape(str(variant))} is .*: give the path of the YAML"):
        parse((RunArgs,), ["--config", str(variant)])


def test_a_chat_template_file_that_is_not_utf8_is_one_line(tmp_path):
    from pipeline.models import template_text

    path = tmp_path / "t.jinja"
    path.write_bytes(b"{{ messages }}\xff\n")
    with pytest.raises(ConfigError, match=r"chat_template file .*t.jinja of the model profile is not UTF-8 text "
                                          r"\(invalid start byte at line 1, column 15\): save it as UTF-8"):
        template_text(str(path))


def test_a_chat_template_is_text_with_either_jinja_mark_and_a_missing_file_is_one_line(tmp_path):
    """A profile's chat_template is the template itself when it holds `{{` or `{%` (either alone: a template of
    expressions only, or of statements only), else a .jinja file; a file that is not there is one ConfigError naming
    it, not a traceback. Mutants: both marks required; the file read unchecked (FileNotFoundError)."""
    from pipeline.models import template_text

    for text in ("{{ messages[0]['content'] }}", "{% for m in messages %}{{ m }}{% endfor %}", "{% if x %}y{% endif %}"):
        assert template_text(text) == text
    with pytest.raises(ConfigError, match=r"^chat_template file .*missing\.jinja of the model profile does not exist"):
        template_text(str(tmp_path / "missing.jinja"))


def test_a_4bit_base_is_nf4_double_quantized_onto_this_process_device(monkeypatch):
    """QLoRA's base as Dettmers et al. quantize it (NF4, the quantization constants quantized again), loaded straight
    onto this process's device (a 4-bit model cannot be moved after loading). Mutants: FP4; single quantization; no
    device_map."""
    import torch
    from accelerate import PartialState

    from pipeline.models import quantization_kwargs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kwargs = quantization_kwargs(ModelProfile(name_or_path="models/tiny", load_in_4bit=True))
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant is True
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["device_map"] == {"": PartialState().device}


def test_a_4bit_profile_without_a_cuda_gpu_is_one_line(monkeypatch):
    """QLoRA's 4-bit base needs bitsandbytes on a CUDA GPU: without one the profile is refused in one line before any
    weight loads (it failed inside from_pretrained). Mutant: the check dropped."""
    import torch

    from pipeline.models import quantization_kwargs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^load_in_4bit needs a CUDA GPU and bitsandbytes"):
        quantization_kwargs(ModelProfile(name_or_path="models/tiny", load_in_4bit=True))
    assert quantization_kwargs(ModelProfile(name_or_path="models/tiny")) == {}


def test_a_launch_variable_make_did_not_write_is_one_line(monkeypatch):
    from pipeline.run import LAUNCH_ENV, launch_args

    monkeypatch.setenv(LAUNCH_ENV, '["--config_file", "configs/accelerate/cpu.yaml"]')
    assert launch_args() == ["--config_file", "configs/accelerate/cpu.yaml"]
    for odd in ("x", '{"a": 1}', "[1]"):
        monkeypatch.setenv(LAUNCH_ENV, odd)
        with pytest.raises(ConfigError, match=f"the environment variable {LAUNCH_ENV} is set to .*: unset it"):
            launch_args()


def test_an_empty_accelerate_config_is_one_line(capsys):
    """`make sft ACCELERATE_CONFIG=` gave accelerate's 116-line usage."""
    from pipeline.launch import main

    assert main(["sft", "--config_file", "-m", "stages.sft", "--config", "configs/sft.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ACCELERATE_CONFIG is empty: give one of configs/accelerate/")


@pytest.mark.parametrize("argv,message", [
    (["--num_train_epochs", "-1"], r"^--num_train_epochs on the command line is -1.0: it must be >= 0$"),
    (["--eval_fraction", "1"], r"^--eval_fraction on the command line is 1.0: it must be in \[0, 1\)$"),
    (["--per-device-train-batch-size", "0"],  # a dashed flag is blamed as the flag, not as the YAML's key
     r"^--per_device_train_batch_size on the command line is 0: it must be >= 1$"),
    (["--dataset_name", "  "], r"^--dataset_name on the command line is empty: give a file, folder or Hub id"),
    (["--learning_rate"], r"^--learning_rate on the command line needs a value: give --learning_rate VALUE$"),
    (["--dataset_mixture", "[1]"], r"^--dataset_mixture on the command line is '\[1\]', not a JSON object such as"),
])
def test_more_values_no_stage_can_run_with_are_one_line_naming_the_flag(argv, message):
    """Negative epochs, everything held out, a blank dataset name, a flag without its value, a JSON list for a mixture:
    each one line naming the flag as given (dashes or underscores) and what it must be."""
    with pytest.raises(ConfigError, match=message):
        parse(stage_classes("sft"), ["--config", str(REPO / "configs/sft.yaml"), *argv])


def test_a_profile_without_its_checkpoint_hub_ids_first_lines_and_empty_values_by_hand(tmp_path):
    """A model profile without name_or_path is one ConfigError (not a TypeError); a Hub id with two slashes is told
    to be user/name; a library error is shown by its first line (or its type's name when it has no message); an
    empty YAML value is allowed where None is the field's own default whatever its type."""
    from pipeline.config import check_hub_repo_id, first_line, takes_none

    profile = tmp_path / "p.yaml"
    profile.write_text("dtype: float32\n")
    with pytest.raises(ConfigError, match=rf"^model profile {re.escape(str(profile))} has no 'name_or_path'"):
        load_model_profile(profile)
    with pytest.raises(ConfigError, match=r"^--push_to_hub 'me/my/labels' is not a Hub repo id: give it as user/name$"):
        check_hub_repo_id("me/my/labels", "--push_to_hub")
    assert first_line(ValueError("first\nsecond\nthird")) == "first" and first_line(KeyError()) == "KeyError"
    assert takes_none(int, None) and not takes_none(int, 3) and takes_none(int | None, 3)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_a_cpu_launch_trains_on_the_cpu_on_a_machine_with_a_gpu(stage, monkeypatch, tmp_path):
    """accelerate's use_cpu reaches a stage as ACCELERATE_USE_CPU: TrainingArguments hands it to accelerate (whose
    state is then the CPU's) but put the model on cuda:0 unless its own use_cpu said so, as it now does (the default
    configs/accelerate/cpu.yaml on a GPU machine). A use_cpu given in a config or on the command line still wins."""
    from tests.conftest import REPO

    def use_cpu(*extra, config=str(REPO / f"configs/{stage}.yaml")):
        parsed = parse(stage_classes(stage), ["--config", config, *extra])
        return next(c for c in parsed if hasattr(c, "use_cpu")).use_cpu

    variant = tmp_path / "variant.yaml"
    variant.write_text(f"base_config: {REPO / f'configs/{stage}.yaml'}\nuse_cpu: false\n")

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert use_cpu() is False
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert use_cpu() is True and use_cpu("--use_cpu", "false") is False and use_cpu(config=str(variant)) is False
    monkeypatch.setenv("ACCELERATE_USE_CPU", "0")
    assert use_cpu() is False
