"""Run folders and manifests.

Every stage writes under runs/<run>/<stage>/ and ends by writing manifest.json there, atomically and last:
a manifest on disk means the stage finished. Later stages find their inputs through it.

A manifest also records what the stage read (`inputs`): its command line, the digest of every file or folder its
command line and resolved config name (YAML, data), and the digest of every upstream manifest (None for an optional
one that was absent). `is_current` compares them with what is on disk now, so `make` reruns a stage exactly when
one of them changed (pipeline/launch.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import REPO_ROOT, ConfigError, UniqueKeyLoader, function_spec_module, module_source, resolve_path

# Files above this size (a real base checkpoint) are fingerprinted by size and modification time, not read:
# hashing gigabytes on every `make` would take longer than the check is worth.
HASH_LIMIT_BYTES = 64 * 2**20
JUDGE_RM_PREFIX = "rm:"  # pipeline/judges.py: `rm:<adapter dir>` names a reward model as a judge
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "huggingface_hub", "gradio")


def stage_dir(runs_dir: str, run: str, stage: str) -> Path:
    return resolve_path(runs_dir) / run / stage


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, before a rename publishes it: a rename can reach the disk before
    the files' data do, so a power cut after it could leave a complete-looking checkpoint of empty files."""
    for sub, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(sub, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(sub))


def fsync_dir(folder: Path) -> None:
    """fsync a folder's entries (a rename into it, a file created in it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_folder(folder: Path) -> Path:
    """Where `folder` is written before replace_folder swaps it in: a fixed name beside it (one writer a folder), so a
    write killed midway leaves no stray folder for good: the next write clears it."""
    return folder.parent / f".{folder.name}.saving"


def replace_folder(new: Path, folder: Path) -> None:
    """Make the finished folder `new` (beside it) `folder`, whole, by renames: a kill midway leaves the old folder (or
    it beside, as .NAME.old, which the next replace clears) or the new one, never the old files mixed with the new."""
    import shutil

    old = folder.parent / f".{folder.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    fsync_tree(new)  # the files on disk before the rename that makes them the folder
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def read_manifest(runs_dir: str, run: str, stage: str, needed_by: str) -> dict[str, Any]:
    """The manifest of an upstream stage, or a clear error saying which make target produces it."""
    path = stage_dir(runs_dir, run, stage) / "manifest.json"
    if not path.is_file():
        raise ConfigError(
            f"{needed_by} needs the {stage} stage of run '{run}', but {path} does not exist: "
            f"run `make {stage} RUN={run}` first"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): rerun `make {stage} RUN={run}`") from None


def file_digest(path: Path) -> str | None:
    """sha256 of a file's bytes, or of a folder's file names and bytes; None when the path does not exist."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\0")
        size = f.stat().st_size
        if size > HASH_LIMIT_BYTES:
            h.update(f"{size}:{f.stat().st_mtime_ns}".encode())
        else:
            h.update(f.read_bytes())
    return h.hexdigest()


YAML_SUFFIXES = (".yaml", ".yml")


class _DigestLoader(UniqueKeyLoader):
    """pipeline.config's loader, with a !!set's members sorted (a set's repr follows string hashing, per process)."""


_DigestLoader.add_constructor("tag:yaml.org,2002:set", lambda loader, node: (
    "!!set", sorted(repr(k) for k in loader.construct_mapping(node))))


def input_digest(path: Path) -> str | None:
    """A stage input's digest as `make` compares it: a YAML's values as it parses (a comment, quoting or spacing
    edited is the same config, which had retrained the stage; keys keep their order, as a mixture's sources do), any
    other file's bytes (file_digest, as is a YAML that does not parse)."""
    if path.suffix in YAML_SUFFIXES and path.is_file() and path.stat().st_size <= HASH_LIMIT_BYTES:
        try:
            # as the stages read a config (a key given twice is refused there: its bytes, so that the stage runs and
            # says so, not "up to date" on the key's last value); a set (!!set) would repr in a per-process order
            values = yaml.load(path.read_text(encoding="utf-8"), Loader=_DigestLoader)
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            return file_digest(path)
        # repr keeps the types apart (1, 1.0, "1", True) and the order of keys and items
        return "yaml:" + hashlib.sha256(repr(values).encode()).hexdigest()
    return file_digest(path)


def digest_holds(path: Path, recorded: str | None) -> bool:
    """Is the file as a manifest recorded it: its input_digest, or (a manifest of an earlier version, which digested a
    YAML's bytes) its bytes."""
    now = input_digest(path)
    return now == recorded or (now is not None and now.startswith("yaml:") and file_digest(path) == recorded)


def manifest_digest(manifest: dict | None) -> str | None:
    return None if manifest is None else hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()


# Files of passwords (the labeling UI's logins): named in configs and command lines, never digested into a manifest.
# A fast unsalted digest of a short `name:password` file, beside the annotator names in the export, is the password to
# a dictionary attack.
SECRET_FILE_KEYS = ("users_file",)


def secret_file_values(argv: list) -> set[int]:
    """The positions in a command line that hold a SECRET_FILE_KEYS flag's value (`--users_file F`; `--users_file=F`
    is one word that names no file)."""
    return {i + 1 for i, arg in enumerate(argv) if isinstance(arg, str) and arg.startswith("--")
            and arg[2:] in SECRET_FILE_KEYS}


# Settings that name data or weights to read: a bare folder name there (`--dataset_name mydata`) is read as a path
# (pipeline.data.load_any, resolve_base), so it is an input, although a bare word elsewhere ("data") is not taken for one.
PATH_KEYS = ("dataset_name", "prompts_file", "pairs_dataset", "sft_adapter", "reward_adapter", "name_or_path")


def bare_path_values(values: Any) -> list[str]:
    """The values of PATH_KEYS in a dict or a command line (`--key value`, `--key=value`)."""
    if isinstance(values, dict):
        return [v for k, v in values.items() if k in PATH_KEYS and isinstance(v, str)]
    words = [w for w in values if isinstance(w, str)] if isinstance(values, (list, tuple)) else []
    out = [w.split("=", 1)[1] for w in words if w.startswith("--") and w[2:].split("=", 1)[0] in PATH_KEYS and "=" in w]
    return out + [b for a, b in zip(words, words[1:]) if a.startswith("--") and a[2:] in PATH_KEYS]


def paths_named_in(values: Any, own_dir: Path) -> set[str]:
    """Every string in `values` (nested dicts, keys included, and lists) that names an existing file or folder and looks
    like a path (a '/' or a suffix: not a bare word such as "data"; any value of a PATH_KEYS setting), except the
    stage's own folder and anything around or inside it (runs_dir, output_dir), and the files of passwords
    (SECRET_FILE_KEYS); and the source file of a `module:function` judge's module (your own judge edited is a changed
    input, as an `rm:` judge's folder is)."""
    found: set[str] = set()
    stack = [values]
    while stack:
        v = stack.pop()
        found.update(bare for bare in bare_path_values(v) if names_an_input(bare, own_dir))
        if isinstance(v, dict):
            stack += list(v.keys()) + [value for key, value in v.items() if key not in SECRET_FILE_KEYS]
        elif isinstance(v, (list, tuple)):
            secret = secret_file_values(list(v))
            stack += [item for i, item in enumerate(v) if i not in secret]
        elif isinstance(v, str) and function_spec_module(v):  # a judge `module:function`: its module's source
            source = module_source(v)
            if source is not None:
                found.add(str(source.resolve()))
        elif isinstance(v, str) and ("/" in v or Path(v).suffix) and "\n" not in v and len(v) < 1024:
            v = v.removeprefix(JUDGE_RM_PREFIX)  # a reward model as judge: its folder is what is read
            if names_an_input(v, own_dir):
                found.add(v)
    return found


def names_an_input(text: str, own_dir: Path) -> bool:
    """`text` names an existing file or folder that is not the stage's own folder, inside it or around it."""
    try:
        p = resolve_path(text).resolve()
        return p.exists() and p != own_dir and own_dir not in p.parents and p not in own_dir.parents
    except (OSError, ValueError):  # not a path at all
        return False


def named_in_yamls(paths: set[str], own_dir: Path) -> set[str]:
    """The paths named inside the YAML files among `paths`, one level down: a model profile names the base checkpoint
    and chat template that every stage loads, so new weights at the same place (`make base`) make the stages stale; a
    label config or DPO's rm_config names its own files. (A stage's own --config files: StageRun._named.)"""
    import yaml

    found: set[str] = set()
    for name in paths:
        path = resolve_path(name)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            try:
                found |= paths_named_in(yaml.safe_load(path.read_text()), own_dir)
            except (OSError, ValueError, yaml.YAMLError):
                continue
    return found


def base_configs_of(configs: set[str]) -> set[str]:
    """The base_config each variant YAML among `configs` names, and theirs in turn."""
    import yaml

    found: set[str] = set()
    todo = list(configs)
    while todo:
        try:
            base = (yaml.safe_load(resolve_path(todo.pop()).read_text()) or {}).get("base_config")
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            continue
        if isinstance(base, str) and base not in found and resolve_path(base).is_file():
            found.add(base)
            todo.append(base)
    return found


def _flag(argv: list[str], name: str, default: str) -> str:
    """The value the stage's parser gives `name`: its last occurrence (`make` puts `--run $(RUN)` before ARGS, so
    ARGS="--run try2" wins), as `--name value` or `--name=value`."""
    value = default
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def stage_folder(stage: str, argv: list[str]) -> Path:
    """The folder of `stage` (make's name for it) under a command line's --runs_dir and --run, as its parser reads
    them."""
    return stage_dir(_flag(argv, "--runs_dir", "runs"), _flag(argv, "--run", "default"), stage)


CODE_PACKAGES = ("pipeline", "stages")  # the project's own code that a stage runs (tests.fake_stages imports pipeline)


def code_digests() -> dict[str, str | None]:
    """The project's modules this process has imported (CODE_PACKAGES), path in the repo -> digest: what a stage's
    manifest records as the code that made its outputs."""
    found = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.partition(".")[0] in CODE_PACKAGES and path:
            try:
                found[str(Path(path).resolve().relative_to(REPO_ROOT))] = file_digest(Path(path))
            except ValueError:  # installed elsewhere than this checkout: nothing `make` here could compare it with
                continue
    return dict(sorted(found.items()))


def code_changed(stage: str, argv: list[str]) -> list[str]:
    """The code files the stage's manifest records that are no longer as they were when it ran (edited by an upgrade or
    by hand, or gone); [] for a manifest that records none. `make` does not rerun a stage for these (a base trained for
    hours is not redone for a refactor): pipeline.launch says so beside its "up to date" line."""
    path = stage_folder(stage, argv) / "manifest.json"
    try:
        code = json.loads(path.read_text()).get("code") or {}
    except (OSError, json.JSONDecodeError):
        return []
    return [name for name, digest in code.items() if file_digest(REPO_ROOT / name) != digest]


# pipeline.launch puts accelerate's arguments (--config_file ...) here for the stage to record: the number of processes,
# sharding and mixed precision change what a stage computes, so another launch config is another run.
LAUNCH_ENV = "PIPELINE_LAUNCH_ARGS"
STARTED = "started.json"  # a stage's command line while it runs: removed when its manifest is written
# pipeline.launch puts make's name of the stage here: the folder it locked and checked for being up to date.
STAGE_ENV = "PIPELINE_STAGE"


def check_launched_folder(folder_name: str, why: str, stage: str | None = None) -> None:
    """A stage whose config picks its folder (stages.ppo: ppo, grpo, rloo or reinforce_pp by its advantage estimator)
    writes the folder `make` launched it as (`stage`, or STAGE_ENV's; None: not launched by make), which make locked
    and checked: `make ppo PPO_ARGS="--advantage_estimator grpo"` would write grpo/ under ppo/'s lock. `why`: the
    setting that picked `folder_name`, as the error names it."""
    stage = stage if stage is not None else os.environ.get(STAGE_ENV)
    if stage and stage != folder_name:
        raise ConfigError(f"{why} writes the run's {folder_name}/ folder, but this is `make {stage}`, whose folder is "
                          f"{stage}/: run `make {folder_name}` for it, or leave {why.split()[0]} as {stage}'s config "
                          f"sets it")


def launch_args() -> list[str] | None:
    """The accelerate arguments this stage was launched with by pipeline.launch (`make`); None when started otherwise."""
    if LAUNCH_ENV not in os.environ:
        return None
    try:
        launch = json.loads(os.environ[LAUNCH_ENV])
    except ValueError:
        launch = None
    if not (isinstance(launch, list) and all(isinstance(a, str) for a in launch)):
        raise ConfigError(f"the environment variable {LAUNCH_ENV} is set to {os.environ[LAUNCH_ENV][:60]!r}, which "
                          f"`make` did not write (pipeline.launch sets it to the accelerate arguments): unset it")
    return launch


def is_current(stage: str, argv: list[str], launch: list[str] | None = None) -> tuple[bool, str]:
    """Would `stage` with this command line do exactly what its manifest records? (True, "") or (False, why not).

    Same command line and accelerate launch arguments (`launch`: pipeline.launch's; their config file is one of the
    files), every file it named as it was (a variant YAML's base config too; a YAML's values, input_digest), same
    upstream manifests (a rerun upstream stage has a new manifest, and an optional one that appeared, such as a first
    label export, counts as a change)."""
    run, runs_dir = _flag(argv, "--run", "default"), _flag(argv, "--runs_dir", "runs")
    path = stage_dir(runs_dir, run, stage) / "manifest.json"
    if not path.is_file():
        try:
            started = json.loads((path.parent / STARTED).read_text())
            started_argv, started_launch = started["argv"], started.get("launch", launch)
        except (OSError, ValueError, KeyError, TypeError):
            # a folder without a record of its command line: a stage that writes it last (eval keeps its sampled
            # batches first) was interrupted before
            return False, "its last run did not finish" if path.parent.is_dir() and any(path.parent.iterdir()) \
                else "it has not run yet"
        if started_argv != argv:
            return False, f"the command line changed (was: {' '.join(map(str, started_argv))}, interrupted)"
        if started_launch != launch:
            was = ' '.join(map(str, started_launch)) if isinstance(started_launch, list) else 'none'
            return False, f"the accelerate launch changed (was: {was}, interrupted)"
        return False, "its last run, with this command line, was interrupted"
    try:
        inputs = json.loads(path.read_text()).get("inputs")
    except json.JSONDecodeError:
        return False, f"{path} is not valid JSON"
    if not inputs:
        return False, "its manifest does not record its inputs (written by an older version)"
    if inputs["argv"] != argv:
        return False, f"the command line changed (was: {' '.join(inputs['argv'])})"
    if "launch" in inputs and inputs["launch"] != launch:  # not recorded (an older manifest): taken as the same
        was = inputs["launch"]
        return False, f"the accelerate launch changed (was: {' '.join(was) if was is not None else 'none'})"
    changed = inputs_changed(inputs["files"], inputs["manifests"], runs_dir, run)
    return (False, changed) if changed else (True, "")


def inputs_changed(files: dict[str, str | None], manifests: dict[str, str | None], runs_dir: str, run: str) -> str | None:
    """The first recorded input that is no longer as recorded, in words ("configs/x.yaml changed", "the pairs stage ran
    again"); None when every file and upstream manifest of the run is as its digest says."""
    for name, digest in files.items():
        if not digest_holds(resolve_path(name), digest):
            return f"{name} changed"
    for name, digest in manifests.items():
        upstream = stage_dir(runs_dir, run, name) / "manifest.json"
        try:
            now = manifest_digest(json.loads(upstream.read_text())) if upstream.is_file() else None
        except json.JSONDecodeError:  # the stage then runs and says which file, in one line (read_manifest)
            return f"{upstream} is not valid JSON"
        if now != digest:
            return (f"the {name} stage ran again" if now and digest else
                    f"the {name} stage now exists" if now else f"the {name} stage is gone")
    return None


class StageRun:
    """Bookkeeping for one stage: its folder, the saved config, the final manifest."""

    def __init__(self, stage: str, run: str, runs_dir: str = "runs"):
        self.stage, self.run, self.runs_dir = stage, run, runs_dir
        self.dir = stage_dir(runs_dir, run, stage)
        self.manifest_path = self.dir / "manifest.json"
        self.started = time.time()
        self.upstream: dict[str, Any] = {}
        self.optional: set[str] = set()  # upstream stages read when present: their absence is an input too
        self.argv = sys.argv[1:]  # the stage's command line (`make` compares it with the next one)
        # The files the command line names (its YAMLs and the files they name), digested now, as the stage starts:
        # eval reads them, samples and scores for a minute, and only then prepares its folder.
        self.not_read: set[str] = set()  # named by the config, not read by this run (not_inputs)
        self.first_seen = self._digests(self._named([self.argv, launch_args() or []], every_yaml=True))
        self.read_files: dict[str, str | None] = {}  # file -> digest when the stage started (prepare)
        self.code: dict[str, str | None] = {}  # the project's modules imported by then (code_digests), as read

    def _named(self, sources: list, every_yaml: bool = False) -> list[str]:
        """The files the sources name, and those named inside the YAMLs among them (a model profile's base and
        template). The stage's own --config files are not read for more: their keys are in the resolved config as
        they acted, and a value the command line overrode (the YAML's model profile beside MODEL=) was never read;
        only a variant's base_config is added. `every_yaml`: read them too (first_seen, digests taken as the stage
        starts, a superset)."""
        own_dir = self.dir.resolve()
        named = paths_named_in(sources, own_dir) - self.not_read
        configs = set() if every_yaml else {v for k, v in zip(self.argv, self.argv[1:]) if k == "--config"}
        given_base = any(a == "--base_config" or a.startswith("--base_config=") for a in self.argv)  # read instead
        found = named_in_yamls(named - configs, own_dir) | (set() if given_base else base_configs_of(configs & named))
        return sorted((named | found) - self.not_read)

    def not_inputs(self, paths, reading: str) -> None:
        """Files the config names that this run does not read (the bundled mixture beside --dataset_name `reading`):
        not recorded as inputs, so that editing them does not make `make` run the stage again. The file read stays
        one, however it is named (--dataset_name data/sft/oasst.jsonl beside a mixture that names it too)."""
        read = resolve_path(reading).resolve()
        self.not_read |= {str(p) for p in paths if resolve_path(str(p)).resolve() != read}

    @staticmethod
    def _digests(files: list[str], known: dict[str, str | None] | None = None) -> dict[str, str | None]:
        """Each file's digest; one in `known` (digested earlier) is taken from there, not read again."""
        known = known or {}
        return {f: known[f] if f in known else input_digest(resolve_path(f)) for f in files}

    def prepare(self, config: dict[str, Any], is_main: bool = True) -> None:
        """Create the folder, drop a stale manifest (this run replaces it), save the resolved config. The files the
        stage named are digested now, as they were read (those the command line names, when the stage started): one
        edited while it trains is recorded as it was."""
        self.read_files = self._digests(self._named([self.argv, config, launch_args() or []]), self.first_seen)
        self.code = code_digests()
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Recorded before the manifest goes: a run killed from here on leaves it, and `make` then knows which
            # command line the stage last ran with (is_current): a chain does not retrain it with other flags.
            atomic_write_json(self.dir / STARTED, {"argv": list(self.argv), "launch": launch_args()})
            if self.manifest_path.exists():
                self.manifest_path.unlink()
            atomic_write_json(self.dir / "config.json", config)

    def need(self, stage: str) -> dict[str, Any]:
        manifest = read_manifest(self.runs_dir, self.run, stage, needed_by=f"`make {self.stage}`")
        self.upstream[stage] = manifest
        return manifest

    def may_read(self, stage: str) -> None:
        """This stage reads `stage`'s manifest when it exists (into self.upstream): once it appears, rerun."""
        self.optional.add(stage)

    def inputs(self, config: dict[str, Any]) -> dict[str, Any]:
        """What this stage read, as is_current compares it: command line, accelerate launch, named files' digests,
        upstream manifests'."""
        launch = launch_args()
        files = self._named([self.argv, config, launch or []])
        manifests = {name: None for name in self.optional}
        manifests.update({name: manifest_digest(m) for name, m in self.upstream.items()})
        return {"argv": list(self.argv), "launch": launch, "files": self._digests(files),
                "manifests": dict(sorted(manifests.items()))}

    def inputs_as_read(self, config: dict[str, Any]) -> dict[str, Any]:
        """inputs(), with each file digested at prepare() as it was then: a config or data file edited while the stage
        ran (another branch checked out, a YAML tuned for the next run) must make `make` run the stage again, not
        record the new bytes as trained on."""
        inputs = self.inputs(config)
        for name, digest in inputs["files"].items():
            if name in self.read_files and self.read_files[name] != digest:
                print(f"note: {name} changed while the {self.stage} stage ran: it is recorded as it was read, so "
                      f"`make` runs {self.stage} again", file=sys.stderr)
                inputs["files"][name] = self.read_files[name]
        return inputs

    def finish(self, outputs: dict[str, Any], metrics: dict[str, Any], config: dict[str, Any],
               announce: bool = True) -> dict[str, Any]:
        """Write the manifest (last: its presence says the stage is done), and unless `announce` is False (a stage
        that moves its folder into place after, and says so then) its closing console line (finished_line)."""
        manifest = {
            "stage": self.stage,
            "run": self.run,
            "outputs": {k: str(v) for k, v in outputs.items()},
            "metrics": metrics,
            "upstream": {k: {"manifest": str(stage_dir(self.runs_dir, self.run, k) / "manifest.json"),
                             "outputs": v.get("outputs", {}), "git_commit": v.get("git_commit")}
                         for k, v in self.upstream.items()},
            "config": config,
            "inputs": self.inputs_as_read(config),
            "versions": package_versions(),
            # modules first imported after prepare() are digested now, the rest as they were when the stage started
            "code": {**code_digests(), **self.code},
            "git_commit": git_commit(),
            "command": " ".join(sys.argv),
            "wall_time_s": round(time.time() - self.started, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_json(self.manifest_path, manifest)
        (self.dir / STARTED).unlink(missing_ok=True)
        if announce:
            print(finished_line(self.stage, self.dir, manifest["outputs"], manifest["wall_time_s"]), flush=True)
        return manifest


def finished_line(stage: str, folder: Path, outputs: dict[str, str], wall_s: float) -> str:
    """The stage's last console line: where its outputs are (the console named none: a user looked for the adapter,
    and for eval's report, in the manifest). Each output under the stage's folder, by its first part there (a plot
    folder once); the rest (the base, the label store) are inputs it names."""
    names = []
    for value in outputs.values():
        try:
            rel = Path(value).relative_to(folder)
        except ValueError:
            continue
        name = rel.parts[0] + ("/" if len(rel.parts) > 1 or (folder / rel).is_dir() else "") if rel.parts else ""
        if name and name not in names:
            names.append(name)
    shown = os.path.relpath(folder) if folder.resolve().is_relative_to(Path.cwd().resolve()) else str(folder)
    return f"{stage}: done in {wall_s:.0f} s; outputs in {shown}/" + (f": {', '.join(names)}" if names else "")


# A disk that refuses a write is the user's to fix, like bad input: one line naming the path and the fix.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


# The libraries that write checkpoints, adapters and kept batches, and the argument naming the file: their writers fail
# without an errno (torch's zip writer: RuntimeError "basic_ios::clear: iostream error"; safetensors: SafetensorError
# "I/O error: No space left on device (os error 28)"), which a full disk turned into two screens of traceback.
LIBRARY_WRITERS = {(os.path.join("torch", "serialization.py"), "save"): "f",
                   (os.path.join("safetensors", "torch.py"), "save_file"): "filename"}
FREE_AT_FAILURE_BYTES = 1 << 20  # a disk with less than this free after a failed write: the write ran out of room


def out_of_room(folder) -> bool:
    """Has the disk under `folder` less than FREE_AT_FAILURE_BYTES free: a write that failed there ran out of room."""
    disk = os.statvfs(folder)
    return disk.f_bavail * disk.f_frsize < FREE_AT_FAILURE_BYTES


def read_only(folder) -> bool:
    """Is the disk under `folder` mounted read-only."""
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


def library_write_error(err: BaseException) -> OSError | None:
    """The OSError behind a library writer's failure to write a file (LIBRARY_WRITERS: the file from the frame that was
    writing it; the errno from the message, or else from the file's disk: read-only, or out of room), or None."""
    tb, target = err.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        argument = next((arg for (file, name), arg in LIBRARY_WRITERS.items()
                         if code.co_name == name and code.co_filename.endswith(file)), None)
        if argument and isinstance(tb.tb_frame.f_locals.get(argument), (str, os.PathLike)):
            target = os.fspath(tb.tb_frame.f_locals[argument])
        tb = tb.tb_next
    if target is None:
        return None
    said = re.search(r"\(os error (\d+)\)", str(err))
    code = int(said.group(1)) if said else None
    if code is None:
        folder = os.path.dirname(os.path.abspath(target))
        try:
            code = errno.EROFS if read_only(folder) else errno.ENOSPC if out_of_room(folder) else None
        except OSError:  # the disk cannot be read either
            return None
    return OSError(code, os.strerror(code), target) if code else None


def not_writable_path(path) -> str:
    """The folder or file a user makes writable when a write at `path` was refused: the folder it was written in (the
    nearest one above it that exists) when that folder cannot be written, else `path` as the system named it. The
    refused name is often the stage's own temporary (an atomic write's `started.json.tmp1234`, a kept batch's
    `.part`) or a folder not made yet, which the user cannot act on; and a read-only file in a read-only folder
    (`chmod -R a-w`) needs the folder made writable first."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return path if os.access(folder, os.W_OK) else folder


def disk_problem(err: BaseException) -> str | None:
    """The one-line explanation of a disk fault anywhere in `err`'s chain (libraries wrap OSError in their own, or
    give none: library_write_error), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        fault = err if isinstance(err, OSError) else library_write_error(err)
        if fault is not None and fault.errno in DISK_FULL + NOT_WRITABLE + (errno.ENOTDIR,):
            path = fault.filename or "the run folder"
            if fault.errno in NOT_WRITABLE and fault.filename:
                path = not_writable_path(fault.filename)
            if fault.errno in DISK_FULL:
                fix = ("free space on that disk, or point RUNS_DIR= (--runs_dir) at a disk with room, and run the "
                       "same command again")
            elif fault.errno == errno.ENOTDIR:
                fix = "a part of that path is a file, not a folder: move the file away or choose another RUNS_DIR= / RUN="
            else:
                fix = ("make it writable (chmod u+w, or remount the disk read-write), or point RUNS_DIR= (--runs_dir) "
                       "at a writable folder, and run the same command again")
            what = "no access to" if fault.errno in (errno.EACCES, errno.EPERM) else "cannot write"
            return f"{what} {path}: {fault.strerror or os.strerror(fault.errno)}: {fix}"
        err = err.__cause__ or err.__context__
    return None


# Warnings the libraries give on every run that nobody running a stage can act on: PEFT reads transformers' deprecated
# `is_gradient_checkpointing` on every forward set-up, and the Trainer asks for pinned memory on a machine without an
# accelerator (where it is simply not used), and under FSDP2 on CPU ranks (gloo) torch says that DTensor's random
# operators may not be fully supported on a CPU mesh (GPU meshes do not hear it). Left in, they are most of a stage's
# output.
LIBRARY_NOISE = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
    (UserWarning, r"DTensor random operators may not have complete support on cpu device mesh"),
]


INTERRUPTED_EXIT = 130  # the shell's code for a process ended by SIGINT


HOW_TO_GO_ON = ("run the same command again to continue (a training stage resumes from its last checkpoint if it had "
                "saved one, a sampling stage keeps its finished batches)")
INTERRUPTED_LINE = f"interrupted: {HOW_TO_GO_ON}"


def interrupted_while_starting(signum, frame) -> None:
    """Ctrl-C while a stage imports its libraries (its first second or two, before main_guard): Python printed the
    traceback of whichever import it landed in. Nothing has started to write yet: main_guard's line, and out."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(INTERRUPTED_LINE, file=sys.stderr, flush=True)
    os._exit(INTERRUPTED_EXIT)


def quiet_ctrl_c_while_starting() -> None:
    """For a stage that pipeline.launch started (the stages package calls this as it is imported, before any stage
    module's imports): Ctrl-C until main_guard is interrupted_while_starting. A SIGINT already ignored (a shell's
    background job) stays ignored."""
    if os.environ.get(LAUNCHER_PID_ENV) and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupted_while_starting)


def library_bars_on_the_main_rank_only() -> None:
    """Under several processes the libraries' own progress bars (datasets' map and filter, transformers' loading of
    weights) drew once a rank, interleaved on one line: rank 0's only, as the stages' own bars are."""
    if int(os.environ.get("RANK", "0")) == 0:
        return
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # for a library not imported yet
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def main_guard(main_fn):
    """Run a stage's main(); a ConfigError, or a disk that refuses a write (full, read-only), becomes one clear line on
    stderr and exit code 2, no traceback."""
    import warnings

    from pipeline.report import destroy_distributed

    for category, message in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:  # from here Ctrl-C is the except below
        signal.signal(signal.SIGINT, signal.default_int_handler)
    end_with_launcher()
    count_cpu_ranks()
    library_bars_on_the_main_rank_only()
    try:
        main_fn()
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback of the library frames it landed in (26 to 38)
        if int(os.environ.get("RANK", "0")) == 0:
            print(INTERRUPTED_LINE, file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT)
    except ConfigError as err:
        refuse(str(err))
    except Exception as err:
        problem = disk_problem(err)
        if problem is None:
            wait_if_a_peer_left(err)
            raise
        refuse(problem)
    destroy_distributed()


# pipeline.launch puts its process id here: the stage processes it starts end when it does (end_with_launcher).
LAUNCHER_PID_ENV = "PIPELINE_LAUNCHER_PID"


def end_with_launcher() -> None:
    """A stage process that pipeline.launch started ends when the launcher does, however that ends: a SIGKILLed
    launcher (`kill -9`, a scheduler's hard stop) left its stage training on, writing the folder whose lock went with
    the launcher, so that a second `make` could start beside it. Linux's parent-death signal (SIGTERM; the launcher is
    the parent of the one process accelerate starts, and of torch's ranks); in case the launcher ended before it was
    asked for, this process ends at once. Elsewhere, or started otherwise: nothing."""
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if not (launcher.isdigit() and sys.platform.startswith("linux")):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)  # when this process's parent ends
    if os.getppid() != int(launcher):  # reparented, if the launcher ended before that was asked for
        try:
            os.kill(int(launcher), 0)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGTERM)
        except PermissionError:  # alive, as another user's
            pass


def count_cpu_ranks() -> None:
    """Several processes on a machine with no GPU are CPU ranks of one run, whatever the launch said: accelerate counts
    them only under ACCELERATE_USE_CPU=1, which make sets. `accelerate launch --config_file
    configs/accelerate/cpu2.yaml` without it started two processes that each called themselves rank 0 of 1: each
    trained on all the data, both wrote the manifest, which said world size 1. Set before the stage parses its
    arguments (TrainingArguments)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "1"


# How long a rank other than 0 waits before it reports bad input: long enough for rank 0, which usually meets the same
# input at the same moment, to report it and exit, short enough not to matter when a rank met it alone.
OTHER_RANKS_WAIT_S = 5.0


# What gloo says to a rank waiting in a collective (a barrier) when another rank has exited.
PEER_LEFT = ("Connection closed by peer", "Connection reset by peer")


def wait_if_a_peer_left(err: BaseException) -> None:
    """A rank of a multi-process stage whose collective failed because another rank exited: that rank says why (bad
    input's one line, as the main process's read-only run folder, or a crash's traceback), and the launcher then stops
    this one. Its own traceback ("Connection closed by peer") was a second screen beside that one line. So it waits,
    as refuse does, to be stopped; still running after the wait, it goes on to its traceback."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(said in str(err) for said in PEER_LEFT):
        time.sleep(OTHER_RANKS_WAIT_S)  # the launcher stops this rank meanwhile


def refuse(problem: str) -> None:
    """One `error:` line for the whole launch, and exit 2. The ranks of a multi-process stage (`make pairs` and `make
    eval` run two on the CPU) meet the same bad input together: each printed it, and the launcher stopped the slower
    one with SIGTERM (pipeline.launch then read a crash). Rank 0 says it at once; another rank waits first, and is
    stopped by the launcher once rank 0 has exited. A rank that met it alone (its own share of the data) still says it."""
    if int(os.environ.get("RANK", "0")) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(OTHER_RANKS_WAIT_S)
    print(f"error: {problem}", file=sys.stderr, flush=True)
    sys.exit(2)
