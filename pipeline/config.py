"""YAML + command line -> typed dataclasses, the TRL way.

`python -m stages.sft --config configs/sft.yaml --learning_rate 1e-4`: the YAML gives the defaults, any key
can be overridden on the command line, and a key that no dataclass knows is an error naming the key and the
file (alignment-handbook's recipes drifted from TRL's field names without anyone noticing; we refuse instead).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """Bad user input: a file, key or value that the user has to fix. Stages print it without a traceback."""


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class RunArgs:
    """Where a stage writes: runs/<run>/<stage>/."""

    run: str = field(default="default", metadata={"help": "Run name; outputs go to <runs_dir>/<run>/<stage>/."})
    runs_dir: str = field(default="runs", metadata={"help": "Folder holding all runs (relative to the repo root)."})
    model_config: str = field(
        default="configs/models/tiny.yaml",
        metadata={"help": "Model profile YAML (base checkpoint, LoRA targets, chat template). `make ... MODEL=...`."},
    )

    def __post_init__(self):
        # A folder name under runs_dir: no path (a `..` would write outside it), nothing a shell or make reads
        if not RUN_NAME.fullmatch(self.run) or self.run in (".", ".."):
            raise ValueError(f"run name {self.run!r}: name the run with letters, digits, . _ - only, starting with a "
                             f"letter or digit (e.g. --run mine; make: RUN=mine)")


PROFILE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelProfile:
    """One base checkpoint and how to put LoRA on it: a file in configs/models/."""

    name_or_path: str = field(metadata={"help": "Local folder (repo-relative or absolute) or Hub id."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layers that get LoRA. Listed explicitly: 'all-linear' would also wrap score/value heads."},
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja file replacing the tokenizer's chat template (for bases without one)."}
    )
    dtype: str = field(default="float32", metadata={"help": "float32 on CPU; bfloat16 on recent GPUs."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the frozen base in 4-bit (GPU + bitsandbytes)."})
    trust_remote_code: bool = False
    description: str = ""

    def __post_init__(self):
        types = {"name_or_path": (str,), "chat_template": (str, type(None)), "dtype": (str,), "load_in_4bit": (bool,),
                 "trust_remote_code": (bool,), "description": (str,)}
        for name, allowed in types.items():
            if not isinstance(getattr(self, name), allowed):
                raise ValueError(f"{name} is {getattr(self, name)!r}: it must be "
                                 f"{'true or false' if bool in allowed else 'text'}")
        if not isinstance(self.lora_target_modules, list) or not all(isinstance(m, str) for m in self.lora_target_modules):
            raise ValueError(f"lora_target_modules is {self.lora_target_modules!r}: it must be a list of module names")
        if self.dtype not in PROFILE_DTYPES:
            raise ValueError(f"dtype is '{self.dtype}': it must be one of {', '.join(PROFILE_DTYPES)}")


def stream_seed(seed: int, index: int) -> int:
    """The seed of a run's index-th random stream: a sampling batch, a pass over PPO's prompts, a reward-model ensemble
    member. Stream 0 keeps the seed itself; the others lie a prime stride apart, so that no stream of seed s is a
    stream of another seed a user would type (with seed + index, seed 1's second pass over the prompts would be seed
    2's first, and a seed sweep would share its prompt orders)."""
    return seed + 1_000_003 * index


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def bad_byte_at(err: UnicodeDecodeError) -> tuple[int, int]:
    """(line, column) of the first byte that is not UTF-8, as an editor counts them: from 1, columns in characters
    (a byte offset into a large .csv or .json told nobody where to look)."""
    data = err.object
    line_start = data.rfind(b"\n", 0, err.start) + 1
    return data.count(b"\n", 0, err.start) + 1, len(data[line_start:err.start].decode("utf-8", errors="replace")) + 1


def read_utf8(path: Path, name: str) -> str:
    """The text of a file a user gave (`name`: how errors call it); not UTF-8 is one ConfigError, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line, column = bad_byte_at(err)
        raise ConfigError(f"{name} is not UTF-8 text ({err.reason} at line {line}, column {column}): save it as "
                          f"UTF-8") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping: pyyaml keeps the last silently, so a setting
    edited lower down in a long config quietly undid (or was undone by) the same key above it."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key of its own overrides, by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first_line:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key {key!r} is given twice (first at line {first_line[key]})",
                            key_node.start_mark)
                    first_line[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: the base class says what is wrong with it
                    continue
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass --config with a path to a YAML file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except UnicodeDecodeError as err:
        line, column = bad_byte_at(err)
        raise ConfigError(f"config file {path} is not UTF-8 text (line {line}, column {column}): save it as "
                          f"UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(err)}: fix it there") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty: give it the stage's key: value lines (as configs/ has them)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, not {type(data).__name__}")
    odd = next((k for k in data if not isinstance(k, str)), None)
    if odd is not None or None in data:
        raise ConfigError(f"config file {path} has the key {odd!r}, which is not a name: every key is a setting's name "
                          f"(as configs/ has them)")
    return data


def yaml_problem(err) -> str:
    """pyyaml's error in one line: what, at which line and column (its own text spans several lines)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())
    context = getattr(err, "context", None)
    return f"{problem}{f' ({context})' if context else ''} at line {mark.line + 1}, column {mark.column + 1}"


# Settings that were removed, and why: named, not "unknown" (with a did-you-mean of another key).
REMOVED_KEYS = {"kl_estimator": "the KL in PPO's reward is always k1, the log-ratio (k3 there is no KL penalty), and "
                                "use_kl_loss's term always k3: remove it"}


def check_keys(keys, classes, source: str) -> None:
    known = set().union(*(_field_names(c) for c in classes))
    for key in keys:
        if key in REMOVED_KEYS and key not in known:
            raise ConfigError(f"'{key}' in {source} is no setting any more: {REMOVED_KEYS[key]}")
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{key}' in {source}{did_you_mean}: fix or remove it")


def load_model_profile(path: str | Path) -> ModelProfile:
    if not Path(path).is_file():
        shipped = sorted(f"configs/models/{f.name}" for f in (REPO_ROOT / "configs/models").glob("*.yaml"))
        raise ConfigError(f"model profile {path} does not exist: give MODEL= (or --model_config) one of "
                          f"{', '.join(shipped)}, or a YAML file of your own with name_or_path: (see configs/models/)")
    data = read_yaml(path)
    check_keys(data, [ModelProfile], str(path))
    if "name_or_path" not in data:
        raise ConfigError(f"model profile {path} has no 'name_or_path': name the base checkpoint (folder or Hub id)")
    try:
        return ModelProfile(**data)
    except ValueError as err:
        raise ConfigError(f"model profile {path}: {err}") from None


# The stage module make's check parses for (pipeline.launch.check, in its own process): the unknown-flag error names
# it; a stage run as `python -m` is its own __main__. (`make grpo` is stages.ppo with configs/grpo.yaml.)
STAGE_MODULE_ENV = "PIPELINE_STAGE_MODULE"


def parse(classes: tuple, argv: list[str] | None = None):
    """Parse `--config FILE` plus CLI overrides into one instance of each dataclass in `classes`.

    The same key may live in several dataclasses (e.g. `seed`); a value then goes to all of them.
    """
    from transformers import HfArgumentParser

    argv = [part for a in (sys.argv[1:] if argv is None else argv)  # --config=FILE reads as --config FILE, and so on
            for part in (a.split("=", 1) if a.startswith(("--config=", "--base_config=")) else [a])]
    config_path = None
    if argv.count("--config") > 1:
        given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
        raise ConfigError(f"--config is given more than once ({', '.join(given)}): `make` gives the "
                          f"recipe's own; for configs of your own, put them in configs/recipes/NAME/ and run `make ... "
                          f"RECIPE=NAME`, or change single keys with ARGS=\"--key value\"")
    for flag, variable in (("--run", "RUN"), ("--runs_dir", "RUNS_DIR")):  # make gives both: the last one won silently,
        given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag] + [a.split("=", 1)[1] for a in argv
                                                                                if a.startswith(flag + "=")]
        if len(given) > 1:  # the stage wrote another folder than make's up-to-date check and `make clean-run` read
            raise ConfigError(f"{flag} is given more than once ({', '.join(given)}): `make` gives {variable}'s; set "
                              f"{variable}= on make's command line instead of {flag} in ARGS")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a path to a YAML file")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    base_given = None  # `--base_config FILE`: a variant's keys over another base (make: a recipe's own ppo.yaml)
    if "--base_config" in argv:
        i = argv.index("--base_config")
        if i + 1 >= len(argv):
            raise ConfigError("--base_config needs a path to a YAML file")
        if argv.count("--base_config") > 1:
            given = [argv[j + 1] for j, a in enumerate(argv[:-1]) if a == "--base_config"]
            raise ConfigError(f"--base_config is given more than once ({', '.join(given)}): `make` gives a recipe's "
                              f"ppo.yaml to its grpo, rloo and reinforce_pp when the recipe has no file of their own: "
                              f"put yours in configs/recipes/NAME/ (e.g. grpo.yaml with base_config:) and run with "
                              f"RECIPE=NAME")
        base_given = argv[i + 1]
        del argv[i : i + 2]
    yaml_values = read_yaml(config_path) if config_path else {}
    yaml_file = {key: config_path for key in yaml_values}  # which file gave each key: errors name it
    if base_given is not None:
        if "base_config" not in yaml_values:
            raise ConfigError(f"--base_config {base_given}: {config_path or 'no --config'} is no variant config (one "
                              f"with base_config:, as configs/grpo.yaml): give the keys with --config instead")
        yaml_values["base_config"] = base_given
    if "base_config" in yaml_values:  # a variant YAML: the keys it names override its base file's (one level)
        if not isinstance(yaml_values["base_config"], str) or not yaml_values["base_config"].strip():
            raise ConfigError(f"'base_config' in {config_path} is {yaml_values['base_config']!r}: give the path of the "
                              f"YAML file whose keys this one overrides (as configs/grpo.yaml does)")
        base_path = resolve_path(yaml_values.pop("base_config"))
        base_values = read_yaml(base_path)
        check_keys(base_values, classes, str(base_path))
        yaml_file = {**{key: str(base_path) for key in base_values}, **yaml_file}
        yaml_values = {**base_values, **yaml_values}
    check_keys(yaml_values, classes, config_path or "<none>")
    cli_keys = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    if {"dataset_name", "dataset_mixture"} <= cli_keys:  # the mixture was set aside without a word
        raise ConfigError("--dataset_mixture has no effect beside --dataset_name (your dataset replaces the mixture): "
                          "give one of them")

    def source_of(key: str) -> str:
        """Where the value of `key` came from: the command line wins over the YAML, as in parsing."""
        if key in cli_keys:
            return f"--{key} on the command line"
        if key in yaml_values:
            return f"'{key}' in {yaml_file[key]}"
        return f"the default of {key}"

    # --help without --config shows the dataclasses' defaults, which the configs make runs with override
    unconfigured = ("The defaults below are the code's. `make` runs each stage with its config (configs/<stage>.yaml, "
                    "or a recipe's), which sets many of them: give that --config too to see the values make uses.")
    parser = HfArgumentParser(classes, allow_abbrev=False,  # --learning_rat must not silently mean --learning_rate
                              description=None if config_path else unconfigured)
    for action in parser._actions:  # dict-typed fields (mixtures, weights) take JSON on the command line
        if action.type is dict:
            action.type = _json_dict
    known_dests = {a.dest for a in parser._actions}
    check_yaml_types(parser, classes, {k: v for k, v in yaml_values.items() if k not in cli_keys}, source_of)
    parser.set_defaults(**{k: v for k, v in yaml_values.items() if k in known_dests})
    from accelerate.utils import parse_flag_from_env

    if "use_cpu" in known_dests and "use_cpu" not in yaml_values and parse_flag_from_env("ACCELERATE_USE_CPU"):
        # A CPU launch (accelerate's use_cpu) on a machine with a GPU: TrainingArguments hands the variable to
        # accelerate, whose state is then the CPU's, but puts the model on cuda:0 unless its own use_cpu says so.
        parser.set_defaults(use_cpu=True)

    def refuse(message: str):  # instead of argparse's usage dump (130 lines for a TRL config) and exit
        raise ConfigError(argparse_problem(message, source_of))

    parser.error = refuse
    instances, remaining = parser.parse_known_args(argv)
    if remaining:
        flags = [a for a in remaining if a.startswith("--")]
        removed = next((f[2:].split("=", 1)[0] for f in flags if f[2:].split("=", 1)[0] in REMOVED_KEYS), None)
        if removed:
            raise ConfigError(f"--{removed} is no setting any more: {REMOVED_KEYS[removed]}")
        hint = ""
        if flags:
            match = difflib.get_close_matches(flags[0][2:], sorted(known_dests), n=1)
            hint = f" (did you mean '--{match[0]}'?)" if match else ""
        module = os.environ.get(STAGE_MODULE_ENV) or getattr(getattr(sys.modules.get("__main__"), "__spec__", None),
                                                                 "name", "")
        module = module.removesuffix(".__main__")
        listing = (f"`python -m {module}{f' --config {config_path}' if config_path else ''} --help` lists them all"
                   if module.startswith("stages.") else "the stage's --help, given its --config, lists them all")
        raise ConfigError(f"unknown command-line argument(s) {remaining}{hint}: a stage's flags are the keys of its "
                          f"config ({config_path or 'configs/<stage>.yaml'}); {listing}")
    for name in SECRET_KEYS:  # a secret in a config or on the command line ends up in manifests, logs, ps and history
        if getattr(instances, name, None):
            raise ConfigError(f"--{name} would be written into the run's manifest and saved training arguments: remove it "
                              f"and set the HF_TOKEN environment variable or run `hf auth login` instead")
    out = []
    for cls in classes:
        values = {f.name: getattr(instances, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(instances, f.name)}
        try:
            out.append(cls(**values))
        except (ValueError, TypeError, ImportError) as err:  # the class's own checks (__post_init__; a --deepspeed
            # config without the package): blame the key it names
            text = " ".join(str(err).split())  # transformers' own spans lines ("... but found\n- Evaluation ...")
            named = [k for k in values if re.search(rf"(?:(?<=--)|(?<![\w-])){re.escape(k)}(?!\w)", text)]
            given = [k for k in named if k in cli_keys] or [k for k in named if k in yaml_values]
            where = source_of(given[0]) if given else f"{config_path or 'the defaults'} or the command line"
            raise ConfigError(f"invalid value of {where}: {text}") from None
        check_ranges(out[-1], source_of)
        check_finite(out[-1], source_of)
        check_report_to(out[-1], source_of)
        check_optimizer(out[-1], source_of)
        check_datasets_named(out[-1], source_of)
        if getattr(out[-1], "resume_from_checkpoint", None):  # TrainingArguments': accepted, and never read
            raise ConfigError(f"{source_of('resume_from_checkpoint')}: the training stages resume by themselves, from "
                              f"the newest checkpoint of an interrupted run of the same command: remove it and run "
                              f"the same command again")
    for instance in out:  # a flag you give that the rest of the config keeps from acting: said, not ignored
        inert = instance.inert_settings(out) if hasattr(instance, "inert_settings") else {}
        if hasattr(instance, "dataset_split") and not getattr(instance, "dataset_name", None):
            inert = {**inert, "dataset_split": "it picks the split of --dataset_name, which is not given (the bundled "
                                               "data is read whole)"}
        for key, why in inert.items():
            if key in cli_keys:
                raise ConfigError(f"--{key} on the command line would have no effect: {why}")
    return out


def lora_dropout_inert(lora_dropout: float, parsed: list) -> dict[str, str]:
    """TRL's RewardTrainer and DPOTrainer zero every dropout in the model after the LoRA layers are added when their
    `disable_dropout` is on (the default): a lora_dropout there acts not at all (adapters bit-identical to 0's), though
    adapter_config.json records it. For inert_settings."""
    train = next((c for c in parsed if hasattr(c, "disable_dropout")), None)
    if lora_dropout > 0 and train is not None and train.disable_dropout:
        return {"lora_dropout": "TRL's disable_dropout (on) zeroes every dropout in the model: set --disable_dropout "
                                "false too"}
    return {}


def check_datasets_named(instance, source_of) -> None:
    """A dataset flag given as empty text (`RM_ARGS='--dataset_name ""'`) read as not given: the stage took its
    config's data (the reward model the run's label export), while `make` had skipped what makes that data (the labels
    step: it is left out for a stage given its own preferences)."""
    from pipeline.data import DATA_FLAGS

    for name in DATA_FLAGS:
        value = getattr(instance, name, None)
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{source_of(name)} is empty: give a file, folder or Hub id, or leave it out for the "
                              f"config's own data")


def check_optimizer(instance, source_of) -> None:
    """A Trainer config's optimizer and learning-rate schedule, built here on one throw-away weight: an optimizer whose
    package is missing (adamw_bnb_8bit), a schedule that needs lr_scheduler_kwargs (cosine_with_min_lr) failed only when
    the Trainer built them, with a traceback, after the run folder was prepared (the stage's manifest gone). Optimizers
    that need the model itself (GaLore, APOLLO, LOMO) are left to the Trainer."""
    from transformers import TrainingArguments

    if not isinstance(instance, TrainingArguments):
        return
    import torch
    from transformers import Trainer
    from transformers.optimization import get_scheduler

    try:
        optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(instance)
        optimizer = optimizer_class([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    except (ValueError, TypeError, ImportError, RuntimeError) as err:
        if "pass a model" in str(err) or "pass a `model`" in str(err):
            return
        optim = getattr(instance.optim, "value", instance.optim)
        raise ConfigError(f"{source_of('optim')} is '{optim}', which cannot be built here: {first_line(err)}") from None
    try:
        get_scheduler(instance.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=10,
                      scheduler_specific_kwargs=instance.lr_scheduler_kwargs)
    except (ValueError, TypeError, KeyError) as err:
        schedule = getattr(instance.lr_scheduler_type, "value", instance.lr_scheduler_type)
        raise ConfigError(f"{source_of('lr_scheduler_type')} is '{schedule}', whose schedule cannot be built from "
                          f"lr_scheduler_kwargs {instance.lr_scheduler_kwargs or {}}: {first_line(err)}") from None


def first_line(err: Exception) -> str:
    """A library error in one line: its message's first, or its type's name when it has none."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def check_report_to(instance, source_of) -> None:
    """A Trainer's report_to names integrations whose packages are installed: otherwise the Trainer fails when it is
    built, after the run folder is prepared."""
    report_to = getattr(instance, "report_to", None)
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n not in ("none", "all")]
    if not names:
        return
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"{source_of('report_to')} names '{name}', which is not a transformers integration: use "
                              f"none or one of {', '.join(INTEGRATION_TO_CALLBACK)}")
        if name not in get_available_reporting_integrations():
            raise ConfigError(f"{source_of('report_to')} names '{name}', whose package is not installed: install it "
                              f"into .venv (.venv/bin/pip install {name}), or use report_to none")


# Sizes and rates no stage can run with, checked on every parsed config that has the field (TRL's and ours alike), so a
# zero batch size or a negative learning rate stops here, named by its flag or YAML key, before anything is loaded or
# written (TRL would fail deep in training, or train on). name: (low, high, low inclusive); None = no bound.
SIZES = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_new_tokens",
         "generation_batch_size", "sample_max_new_tokens", "score_batch_size", "gold_batch_size", "max_prompt_tokens",
         "max_length", "lora_r", "batch_size", "concurrency_limit", "samples_per_prompt")
SIZE_LIMIT = 2**31  # past an index's size: a traceback deep in torch, after the run folder was prepared
RANGES = {
    **dict.fromkeys(SIZES, (1, None, True)),
    **dict.fromkeys(("learning_rate", "lora_alpha", "lease_timeout_s", "beta", "logging_steps", "save_steps"),
                    (0, None, False)),
    "seed": (0, 2**32, True),  # numpy's and transformers' set_seed refuse others, after the run folder is prepared
    "port": (1, 65536, True),
    **dict.fromkeys(("num_train_epochs", "warmup_steps", "weight_decay", "max_prompts", "report_samples", "top_k",
                     "temperature", "max_grad_norm"), (0, None, True)),
    **dict.fromkeys(("eval_fraction", "lora_dropout", "adam_beta1", "adam_beta2"), (0, 1, True)),
    **dict.fromkeys(("adam_epsilon", "dataloader_num_workers"), (0, None, True)),
    "top_p": (0, 1, False),
    # make base: a negative clip reversed the gradients (loss 6.9 -> 12.6, the checkpoint written), 0 trained nothing,
    # a dropout of 1.5 was torch's traceback after the folder; eval: a length ratio <= 1 flagged shorter replies as
    # "hacking through length", a negative KL threshold flagged every policy
    "grad_clip": (0, None, False), "dropout": (0, 1, True), "min_lr_ratio": (0, None, True),
    "hacking_kl": (0, None, False), "hacking_length_ratio": (1, None, False),
}


def refuse_training_nothing(train_cfg) -> None:
    """max_steps -1 trains for num_train_epochs: 0 of them trained no step and saved the untrained adapter, exit 0. (The
    reward model reads that pair as "sized by its data", its own rule: not called there.)"""
    if train_cfg.max_steps == -1 and not train_cfg.num_train_epochs > 0:
        raise ConfigError(f"num_train_epochs {train_cfg.num_train_epochs:g} with max_steps -1 trains nothing: give "
                          f"--num_train_epochs above 0 (1: one pass over the data), or --max_steps N")


def check_ranges(instance, source_of) -> None:
    for name, (low, high, inclusive) in RANGES.items():
        v = getattr(instance, name, None)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v != v or (v < low if inclusive else v <= low) or (high is not None and (v >= high if name != "top_p" else v > high)):
            if high is None:
                want = f">= {low}" if inclusive else f"> {low}"
            else:
                want = f"in [{low}, {high})" if name != "top_p" else f"in ({low}, {high}]"
            raise ConfigError(f"{source_of(name)} is {v}: it must be {want}")
    for name in SIZES:
        v = getattr(instance, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v >= SIZE_LIMIT:
            raise ConfigError(f"{source_of(name)} is {v}: it must be below {SIZE_LIMIT}")
    steps = getattr(instance, "max_steps", None)
    if isinstance(steps, int) and steps != -1 and steps < 1:  # TrainingArguments: -1 = train by num_train_epochs
        raise ConfigError(f"{source_of('max_steps')} is {steps}: give a number of steps >= 1, or -1 to train for "
                          f"num_train_epochs")


def check_finite(instance, source_of) -> None:
    """Every number in a config is finite, ranged (RANGES) or not: NaN compares false with every bound a stage checks
    (a NaN position_bias made every simulated label 'right', a NaN hacking_kl switched eval's KL flag off)."""
    for f in dataclasses.fields(instance):
        v = getattr(instance, f.name, None)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{source_of(f.name)} is {v}: give a finite number")


ARGPARSE_TYPES = {"int": "a whole number", "float": "a number", "string_to_bool": "true or false",
                  "_json_dict": "a JSON object such as '{\"data/x.jsonl\": 100}'"}


def field_types(classes: tuple) -> dict[str, tuple[Any, Any, bool]]:
    """Each field's resolved type, default, and whether YAML's true/false are among its texts (the class's
    YAML_BOOL_TEXT: PPO's shard_base is auto | true | false), by name (the first class's, when several share a key)."""
    import typing

    out: dict[str, tuple[Any, Any, bool]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, (hints.get(f.name, Any), f.default, f.name in getattr(cls, "YAML_BOOL_TEXT", ())))
    return out


def takes_none(hint, default) -> bool:
    """An empty YAML value (`seed:`) is None: allowed where the field's type admits it or None is its own default."""
    import typing

    return default is None or hint is Any or type(None) in typing.get_args(hint)


def yaml_type_problem(action, value, hint=Any, default=None, yaml_bool: bool = False) -> str | None:
    """What a YAML value should have been for its argparse action, or None. argparse converts (and refuses) text
    itself, but passes a YAML number, list or mapping through as it is: 16.5 for a batch size, a list for a rate.
    An empty value is None, which argparse passes on too: `seed:` left sampling unseeded. YAML reads `no` and `off` as
    false, and a bare number as a number: a text field (a judge's name) refuses both, so quoting it says what it is."""
    import types
    import typing

    from transformers.hf_argparser import string_to_bool

    if value is None:
        return None if takes_none(hint, default) else "a value, not empty"
    if hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                       and set(typing.get_args(hint)) == {str, type(None)}):
        return None if isinstance(value, str) or (yaml_bool and isinstance(value, bool)) else "text: put it in quotes"
    if action.type is _json_dict:
        return None if isinstance(value, (dict, str)) else "a mapping of key: value"
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            return "a list"
        items = value
    else:
        if isinstance(value, list):
            return "a single value, not a list"
        items = [value]
    for v in items:
        if isinstance(v, str):
            continue
        if isinstance(v, (dict, list)):
            return "a single value, not a mapping" if isinstance(v, dict) else "a list of single values"
        if action.type is int and (isinstance(v, bool) or not isinstance(v, int)):
            return "a whole number"
        if action.type is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return "a number"
        if action.type is string_to_bool and not isinstance(v, bool):
            return "true or false"
    return None


def check_yaml_types(parser, classes: tuple, yaml_values: dict, source_of) -> None:
    by_dest = {a.dest: a for a in parser._actions}
    types = field_types(classes)
    for key, value in yaml_values.items():
        problem = yaml_type_problem(by_dest[key], value, *types.get(key, (Any, None, False))) if key in by_dest else None
        if problem:
            raise ConfigError(f"{source_of(key)} is {value!r}: it must be {problem}")


def check_hub_repo_id(repo: str, flag: str) -> None:
    """A Hub repo id as the Hub checks it (user/name; letters, digits, '-', '_', '.'; at most 96 characters), before any
    work: the upload would refuse it only after the folder was built."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = None if repo.count("/") == 1 else "give it as user/name"
    if problem is None:
        try:
            validate_repo_id(repo)
        except HFValidationError as err:
            problem = str(err).split(":")[0].rstrip(".")
    if problem:
        raise ConfigError(f"{flag} '{repo}' is not a Hub repo id: {problem}")


def argparse_problem(message: str, source_of) -> str:
    """argparse's complaint about one argument ("argument --lr/--learning-rate: invalid float value: 'abc'") as one line
    naming the flag or YAML key it came from and the type expected."""
    m = re.match(r"argument (--[\w-]+)\S*: (.*)", message)
    if not m:
        return f"{message}: see --help"
    key, problem = m.group(1)[2:].replace("-", "_"), m.group(2)
    bad = re.match(r"invalid (\w+) value: (.*)", problem)
    if bad:
        expected = ARGPARSE_TYPES.get(bad.group(1), f"a {bad.group(1)} value")
        return f"{source_of(key)} is {bad.group(2)}, not {expected}: give {expected}"
    if problem.startswith("expected one argument"):
        return f"{source_of(key)} needs a value: give --{key} VALUE"
    return f"{source_of(key)}: {problem}"


SECRET_KEYS = ("hub_token",)  # TrainingArguments fields that hold a credential


def _json_dict(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"expected a JSON object such as '{{\"a.jsonl\": 100}}', got {text!r} ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def to_dict(obj) -> dict[str, Any]:
    """A JSON-safe view of a config dataclass (TrainingArguments have their own to_dict)."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return {k: v for k, v in dataclasses.asdict(obj).items()}


def resolve_path(path: str | Path) -> Path:
    """Repo-relative paths work from any working directory."""
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p)


def function_spec_module(spec: str) -> str | None:
    """The module of a `module:function` judge's spec (pipeline/judges.py: dotted identifiers, a colon, an
    identifier), None for any other text."""
    module, colon, function = spec.partition(":")
    if colon and module and function and all(part.isidentifier() for part in module.split(".")) \
            and function.isidentifier():
        return module
    return None


def module_source(spec: str) -> Path | None:
    """The source file of a `module:function` spec's module, found on sys.path (PYTHONPATH, the working directory) as
    `import` finds a plain module or package, without importing it (make's checks must stay fast and run no one's
    code); None when the spec is not of that form or no such file is there."""
    module = function_spec_module(spec)
    if module is None:
        return None
    parts = module.split(".")
    for entry in sys.path:
        base = Path(entry or ".").joinpath(*parts)
        for candidate in (base / "__init__.py", base.parent / f"{parts[-1]}.py"):  # a package first, as import does
            if candidate.is_file():
                return candidate
    return None

