"""How `make <stage>` starts a stage: skip it when its manifest is current, else `accelerate launch` it.

    python -m pipeline.launch STAGE [--force] [ACCELERATE_LAUNCH_ARGS...] -m MODULE [STAGE_ARGS...]
    python -m pipeline.launch --check :: STAGE -m MODULE [STAGE_ARGS...] [:: STAGE -m MODULE ...]   # parse only
    python -m pipeline.launch rm --config_file configs/accelerate/cpu.yaml -m stages.rm --config configs/rm.yaml --run default

- Current (same command line and accelerate config, same files, same upstream manifests: pipeline.run.is_current):
  one "up to date" line, exit 0, in well under a second (nothing heavy is imported), and a note when the project's
  code it ran has changed since (pipeline.run.code_changed: not a reason to redo it). `--force` (make's FORCE=1, or in
  ARGS) runs it anyway. A stage make runs only because a later one needs it (`--chained`) is not retrained for another
  command line (one error line) nor, once finished, for another accelerate launch alone (kept, one line saying so).
- Otherwise accelerate's own launcher runs, in this process, exactly as `accelerate launch ...` would. A stage that
  stops on bad input has already printed its one `error:` line and exits 2 (pipeline.run.main_guard); the launcher
  would add a CalledProcessError traceback of its own under it, which says nothing more, so for exit code 2 it is
  left out (with several processes: one rank's exit 2, the others' too or the launcher's SIGTERM to them). Any other failure (a real crash) keeps every traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

from pipeline.config import STAGE_MODULE_ENV, ConfigError
from pipeline.run import (HOW_TO_GO_ON, INTERRUPTED_EXIT, LAUNCH_ENV, LAUNCHER_PID_ENV, STAGE_ENV, code_changed,
                          is_current, stage_folder)

CONFIG_ERROR_EXIT = 2  # pipeline.run.main_guard's exit code for bad input
ELASTIC_LOGGER = "torch.distributed.elastic.multiprocessing.api"
ELASTIC_AGENT_LOGGER = "torch.distributed.elastic.agent.server.api"


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
# accelerate's launcher as a command, for code that starts a stage in a child process (benches, tests): the same
# launch_command that launch() below calls in process. `python -m` skips the `accelerate` CLI's imports of its
# other commands (3 s a launch).
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listens on now, as the OS picks one: a launch's --main_process_port, a test's
    server. Another process may take it before it is used: for what starts right away (tests, benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpus_here() -> int:
    import torch

    return torch.cuda.device_count()


def processes_for_all_gpus(config_file: str | Path, count_gpus: Callable[[], int] = gpus_here) -> list[str]:
    """The shipped configs for all GPUs of a machine (`gpu_ids: all`: multi_gpu.yaml, fsdp.yaml) start one process
    per GPU of this machine (on each of `num_machines`), whatever their num_processes says (8: accelerate would start
    that many, and the ranks beyond the GPUs would fail). A config of your own keeps its num_processes. The extra launch arguments; none when
    they agree. With no GPU, one clear line (accelerate would start its 8 processes on the CPU: 8 times the batch)."""
    import yaml

    path = Path(config_file).resolve()
    if path.parent != SHIPPED_CONFIGS:
        return []
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):  # accelerate_config_problem says what is wrong with it, in one line
        return []
    if str(config.get("gpu_ids")) != "all":
        return []
    gpus = count_gpus()
    if gpus < 1:
        raise ConfigError(f"ACCELERATE_CONFIG={config_file} starts one process per GPU, and torch sees no GPU here (a "
                          f"CPU-only torch, or CUDA_VISIBLE_DEVICES empty): on the CPU give configs/accelerate/cpu.yaml "
                          f"(one process), cpu2.yaml (two) or fsdp_cpu2.yaml (two, the base sharded)")
    # accelerate's num_processes counts every machine's processes and starts num_processes / num_machines on each: a
    # file edited for two machines of 8 GPUs kept 8 and used 4 of each machine's GPUs. Machines alike, as torchrun's.
    total = gpus * int(config.get("num_machines", 1) or 1)
    return [] if config.get("num_processes") == total else ["--num_processes", str(total)]


def launch(accelerate_args: list[str], module: str, stage_args: list[str], stage: str = "") -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from accelerate.utils import parse_flag_from_env

    os.environ[LAUNCH_ENV] = json.dumps(accelerate_args)  # the stage records it (pipeline.run.launch_args)
    os.environ[STAGE_ENV] = stage  # the folder it writes must be this one (pipeline.run.check_launched_folder)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # its processes end with this one (pipeline.run.end_with_launcher)
    if parse_flag_from_env("ACCELERATE_USE_CPU"):  # CPU ranks (cpu2.yaml, fsdp_cpu2.yaml) on a machine with a GPU:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # transformers' sharded load put each CPU rank's shard on cuda:RANK
    # torch's launcher logs a line when it stops the other ranks (SIGTERM) and one for the rank that exited: beside bad
    # input's one `error:` line they are noise, and for a crash the ChildFailedError below says the same and more.
    logging.getLogger(ELASTIC_LOGGER).setLevel(logging.CRITICAL)
    # Another run on this machine holding the config's port (cpu2.yaml's 29511, torch's 29500): on one machine,
    # accelerate then has torch pick a free port, the same run, and says so in a five-line UserWarning.
    warnings.filterwarnings("ignore", message=r"Port `\d+` is already in use", category=UserWarning)
    import torch.distributed.elastic.agent.server.api  # noqa: F401 (its import sets its logger's level: then ours)

    logging.getLogger(ELASTIC_AGENT_LOGGER).setLevel(logging.ERROR)  # "Received 2 death signal" beside Ctrl-C's line
    args = launch_command_parser().parse_args([*accelerate_args, "-m", module, *stage_args])
    # torch's launcher of several processes made a log folder of its own in the temp folder (torchelastic_*) at each
    # launch and left it there (the test suite: one per 2-process test): one of ours, deleted as the launch ends.
    scratch = None
    if args.log_dir is None:
        import tempfile

        scratch = args.log_dir = tempfile.mkdtemp(prefix="torchelastic_")
    if signal.getsignal(signal.SIGINT) is interrupted_before_launch:  # from here Ctrl-C reaches the stage: below
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        launch_command(args)
    except KeyboardInterrupt:  # Ctrl-C reaches the stage too, which says so in one line (pipeline.run.main_guard)
        wait_for_children()  # before this process ends, which would end the stage midway (end_with_launcher)
        return INTERRUPTED_EXIT
    except subprocess.CalledProcessError as err:  # one process: the child's exit code
        if err.returncode in (CONFIG_ERROR_EXIT, INTERRUPTED_EXIT):
            return err.returncode
        raise
    except Exception as err:  # several processes: torch.distributed.elastic's ChildFailedError, one entry per rank
        sig = getattr(err, "sigval", None) if type(err).__name__ == "SignalException" else None
        if sig == signal.SIGINT:
            return INTERRUPTED_EXIT  # Ctrl-C: torch's launcher stopped the ranks (rank 0 said so)
        if sig in (signal.SIGTERM, signal.SIGHUP):  # `kill`, `timeout`, a scheduler's time limit, a closed terminal
            print(f"{stage or module}: stopped by {signal.Signals(sig).name}: {HOW_TO_GO_ON}", file=sys.stderr)
            return 128 + int(sig)
        codes = [f.exitcode for f in (getattr(err, "failures", None) or {}).values()]
        # Bad input (exit 2, pipeline.run.refuse) or a rank's own SIGINT (exit 130: `kill -INT`; Ctrl-C reaches this
        # process as the SignalException above): a rank said so in one line, as one process does (above), and every
        # other rank said so too or was stopped by the launcher (SIGTERM) while it waited. Any other exit is a crash
        # and keeps its traceback.
        for said in (CONFIG_ERROR_EXIT, INTERRUPTED_EXIT):
            if said in codes and all(c in (said, -signal.SIGTERM) for c in codes):
                return said
        raise
    finally:
        if scratch:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def interrupted_before_launch(signum, frame) -> None:
    """Ctrl-C while the launcher imports torch and accelerate and checks the stages, before any stage process: torch's
    C code imports numpy and swallowed the KeyboardInterrupt raised there (the launch went on, SFT trained in the
    background after make had exited) or left numpy half set up (a RecursionError traceback). Nothing started yet."""
    os._exit(INTERRUPTED_EXIT)


def quiet_ctrl_c_until_launch() -> None:
    """Ctrl-C is interrupted_before_launch until launch() starts the stage; a SIGINT already ignored stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupted_before_launch)


def wait_for_children(timeout_s: float = 60.0) -> None:
    """Wait for this process's children (the stage accelerate started) to end, at most `timeout_s`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # none left
            return
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
            return
        if pid == 0:
            time.sleep(0.05)


def check(module: str, stage_args: list[str], stage: str = "") -> int:
    """Parse a stage's command line and nothing more (unknown flags, types, ranges, each config's own rules, dataset
    paths that do not exist): make runs this for the stages it is named with before any stage runs, so that a bad
    flag is one line at once, not after the upstream stages have trained; then the module's `check_args(*parsed)`,
    where it has one. A module without CONFIG_CLASSES is not checked here (it checks itself)."""
    import importlib

    from pipeline.config import ConfigError, parse
    from pipeline.data import DATA_FLAGS, check_dataset_exists

    mod = importlib.import_module(module)
    if not hasattr(mod, "CONFIG_CLASSES") and hasattr(mod, "__path__"):  # a package whose __main__ parses (stages.label)
        mod = importlib.import_module(module + ".__main__")
    if not hasattr(mod, "CONFIG_CLASSES"):
        return 0
    before = os.environ.get(STAGE_ENV)
    os.environ[STAGE_MODULE_ENV] = module  # the unknown-flag error names it
    if stage:  # as the launched stage will see it: a config that picks its folder (PPOConfig) checks it as it is built
        os.environ[STAGE_ENV] = stage
    try:
        parsed = parse(mod.CONFIG_CLASSES(), stage_args)
        for cfg in parsed:  # a dataset path that does not exist, before the upstream stages spend minutes
            for flag in DATA_FLAGS:
                if isinstance(getattr(cfg, flag, None), str) and getattr(cfg, flag):
                    check_dataset_exists(getattr(cfg, flag), f"--{flag}")
            check_files_named(cfg)
        if hasattr(mod, "check_args"):  # the stage's own checks of its flags together (stages.publish: a repo id)
            mod.check_args(*parsed)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    finally:  # the check runs in-process in tests: the variable is the launched stage's, not this process's
        os.environ.pop(STAGE_MODULE_ENV, None)
        if before is None:
            os.environ.pop(STAGE_ENV, None)
        else:
            os.environ[STAGE_ENV] = before
    return 0


def check_files_named(cfg) -> None:
    """The other files a config names that its stage would refuse only once it runs, after the upstream stages have
    trained: the model profile (read as the stage reads it), a label config, adapters given by path, judges' specs."""
    from pipeline.config import ConfigError, load_model_profile, resolve_path
    from pipeline.judges import check_judge_spec

    if getattr(cfg, "model_config", None):
        load_model_profile(resolve_path(cfg.model_config))
    if getattr(cfg, "label_config", None) and not resolve_path(cfg.label_config).is_file():
        raise ConfigError(f"label config {cfg.label_config} does not exist: check the path given to --label_config")
    for flag in ("sft_adapter", "reward_adapter"):
        if getattr(cfg, flag, None) and not resolve_path(getattr(cfg, flag)).is_dir():
            raise ConfigError(f"--{flag} {getattr(cfg, flag)} is not a folder: give an adapter folder (with "
                              f"adapter_config.json), or leave it out for the run's own")
    for flag in ("judge", "gold_judge"):
        if isinstance(getattr(cfg, flag, None), str) and getattr(cfg, flag).strip():
            check_judge_spec(getattr(cfg, flag))


def check_stages(argv: list[str]) -> int:
    """make's check of several stages in one process (their imports once): `:: STAGE -m MODULE ARGS...` each, in
    order; the first error stops it."""
    segments: list[list[str]] = []
    for arg in argv:
        if arg == "::":
            segments.append([])
        elif segments:
            segments[-1].append(arg)
    for stage, _m, module, *stage_args in segments:
        problem = rl_precision_problem(stage, os.environ.get(CHECK_ACCELERATE_CONFIG_ENV, ""))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return CONFIG_ERROR_EXIT
        rc = check(module, [a for a in stage_args if a != "--force"], stage)  # --force in ARGS is the launch's, as below
        if rc:
            return rc
    return 0


# make's check is given the accelerate config the training stages will run under (ACCELERATE_CONFIG).
CHECK_ACCELERATE_CONFIG_ENV = "PIPELINE_ACCELERATE_CONFIG"
RL_STAGES = ("ppo", "grpo", "rloo", "reinforce_pp")


def rl_precision_problem(stage: str, config_file: str) -> str | None:
    """An RL stage trains in its own loop, which has no fp16 loss scaler (pipeline.models.launch_autocast refuses fp16
    and fp8 there): said by make's check, before SFT and the reward models train, not when the RL stage starts."""
    import yaml

    if stage not in RL_STAGES or not config_file or not Path(config_file).is_file():
        return None
    try:
        config = yaml.safe_load(Path(config_file).read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return None  # the launch says what is wrong with it (accelerate_config_problem)
    mixed = str(config.get("mixed_precision", "no")).lower() if isinstance(config, dict) else "no"
    if mixed in ("fp16", "fp8"):
        why = "its training loop has no loss scaler" if mixed == "fp16" else "its loop runs bf16 or full precision"
        return (f"{stage} cannot train under {mixed} mixed precision ({why}): set `mixed_precision: bf16` or `no` in "
                f"{config_file}")
    return None


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        return check_stages(argv[1:])
    if argv[:1] == ["--refuse_if_running"] and len(argv) == 2:  # make clean-run
        running = stages_running(Path(argv[1]))
        if running:
            print(f"error: {argv[1]} is in use: {', '.join(running)} runs in it; stop it first (Ctrl-C), then `make "
                  f"clean-run`", file=sys.stderr)
            return CONFIG_ERROR_EXIT
        return 0
    if len(argv) < 3 or "-m" not in argv[1:]:
        print("usage: python -m pipeline.launch STAGE [--force] [--chained] [ACCELERATE_ARGS...] -m MODULE [STAGE_ARGS...]",
              file=sys.stderr)
        return CONFIG_ERROR_EXIT
    stage, rest = argv[0], argv[1:]
    m = rest.index("-m")
    ours, module, stage_args = rest[:m], rest[m + 1], rest[m + 2 :]
    force = "--force" in ours or "--force" in stage_args
    chained = "--chained" in ours  # make runs it only because a stage named after it needs it
    ours, stage_args = [a for a in ours if a not in ("--force", "--chained")], [a for a in stage_args if a != "--force"]
    if ours[-1:] == ["--config_file"]:  # `make ... ACCELERATE_CONFIG=` (empty): accelerate printed its whole usage
        shipped = ", ".join(sorted(str(p) for p in Path("configs/accelerate").glob("*.yaml")))
        print(f"error: ACCELERATE_CONFIG is empty: give one of {shipped}, or your own `accelerate config` file",
              file=sys.stderr)
        return CONFIG_ERROR_EXIT
    if "--config_file" in ours[:-1]:
        config_file = Path(ours[ours.index("--config_file") + 1])
        if not config_file.is_file():
            shipped = ", ".join(sorted(str(p) for p in Path("configs/accelerate").glob("*.yaml")))
            print(f"error: ACCELERATE_CONFIG={config_file} does not exist: give one of {shipped}, or your own "
                  f"`accelerate config` file", file=sys.stderr)
            return CONFIG_ERROR_EXIT
        if "--num_processes" not in ours:  # the process count is part of the launch: another count is another run
            try:
                extra = processes_for_all_gpus(config_file)
            except ConfigError as err:
                print(f"error: {err}", file=sys.stderr)
                return CONFIG_ERROR_EXIT
            if extra:
                print(f"launch: {extra[1]} GPUs here: {extra[1]} processes ({config_file} asks for all of them)")
            ours = [*ours, *extra]
    # Before the up-to-date check: a stage another launch is rewriting still has its old manifest (until that launch
    # prepares its folder) and would read as up to date, or as interrupted.
    folder = stage_folder(stage, stage_args)
    lock, holder = hold_stage_folder(folder)  # held until this process ends, a kill too (its file goes at exit)
    if lock is None:
        print(f"error: {folder} is being written by another run of `{stage}` ({holder}): wait for it to end, or give "
              f"this one its own run folder (make {stage} RUN=another)", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    if not force:
        current, why = is_current(stage, stage_args, ours)
        if current:
            print(f"{stage}: up to date, skipped (same command line, launch, files and upstream stages; FORCE=1 redoes it)")
            changed = code_changed(stage, stage_args)
            if changed:
                shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
                print(f"note: the pipeline's code changed since {stage} ran ({shown}): its outputs are from the old code; "
                      f"`make` does not redo a stage for a code change; FORCE=1 does", file=sys.stderr)
            say_batches_of_an_unfinished_run(stage, folder)
            return 0
        if chained and why.startswith("the accelerate launch changed") and not why.endswith("interrupted)"):
            # Reached through the chain only, finished under another launch and nothing else changed: kept as it ran.
            # `make ppo ACCELERATE_CONFIG=cpu2.yaml` on a finished run retrained SFT and the reward models under it
            # (sampling the pairs again: people's labels became an earlier run's). A named stage reruns.
            was = recorded_launch(folder)
            if was is not MISSING and is_current(stage, stage_args, was)[0]:
                print(f"{stage}: up to date, kept (it ran under another accelerate launch, "
                      f"{' '.join(was) if was else 'none'}; not named here, so not retrained under this one: name it "
                      f"to retrain it)")
                return 0
        if chained and why.startswith("the command line changed"):
            # Reached through the chain only (`make ppo` needs sft): its last run's flags (own data, MODEL=, ...) are not
            # retrained away by a command that did not ask for that stage. Files and upstream stages still rerun it.
            print(f"error: {stage} ran with another command line than `make` would give it now ({why.split('(', 1)[1][:-1]}"
                  f"): it is not named here, so it is not retrained with other flags. To retrain it with the flags "
                  f"given now, name it too (`make {stage} ...` before the targets you asked for, with the same "
                  f"variables); to keep it as it ran, give every `make` the flags it ran with "
                  f"({stage.upper().replace('-', '_')}_ARGS=..., MODEL=, ARGS=)", file=sys.stderr)
            return CONFIG_ERROR_EXIT
        if chained and why.startswith("its manifest does not record its inputs"):
            # An earlier version's manifest: the flags it ran with are unknown, so through the chain it would be
            # retrained with today's defaults (its own data, MODEL=, step counts lost), its old outputs deleted.
            print(f"error: {stage}'s manifest was written by an earlier version of the pipeline and does not record the "
                  f"command line it ran with: it is not named here, so it is not retrained with the flags `make` would "
                  f"give it now; name it to retrain it (`make {stage} ...` with the flags you want; MODEL= and ARGS= "
                  f"too)", file=sys.stderr)
            return CONFIG_ERROR_EXIT
    if "--config_file" in ours[:-1]:  # checked only now: it imports accelerate (and torch), as the launch does
        config_file = ours[ours.index("--config_file") + 1]
        launched = int(ours[ours.index("--num_processes") + 1]) if "--num_processes" in ours[:-1] else None
        problem = accelerate_config_problem(config_file, launched)
        if problem:
            print(f"error: ACCELERATE_CONFIG={config_file} {problem}: fix the file (`accelerate config` writes one), or "
                  f"give one of configs/accelerate/", file=sys.stderr)
            return CONFIG_ERROR_EXIT
    if not force:
        print(f"{stage}: running, because {why}", flush=True)
    return launch(ours, module, stage_args, stage)


MISSING = object()


def say_batches_of_an_unfinished_run(stage: str, folder: Path) -> None:
    """A note for an up-to-date sampling stage (`make pairs`, `make eval`) whose folder holds the batches a later run
    kept (stages.resume.SampledBatches): that run (a FORCE=1 rerun, or one with other flags) was killed before it
    finished, and its batches lay beside the last finished run's outputs, with no word of what they were. A later run
    reuses them only if it reads what that run read (their resume key), and deletes them once it finishes."""
    kept = folder / "sampled"
    if kept.is_dir():
        print(f"note: {kept} holds the batches of a later run of {stage} that did not finish: the outputs here are the "
              f"last finished run's; `make {stage} FORCE=1` continues that run if it had this command line and inputs "
              f"(else starts over), or delete the folder", file=sys.stderr)


def recorded_launch(folder: Path):
    """The accelerate launch arguments the manifest in a stage's folder records (a list, or None for a run outside
    accelerate), or MISSING when it cannot be read."""
    try:
        return json.loads((folder / "manifest.json").read_text())["inputs"]["launch"]
    except (OSError, ValueError, KeyError, TypeError):
        return MISSING


def hold_stage_folder(folder: Path) -> tuple[object | None, str]:
    """An exclusive lock on a stage's folder for this launch: two `make ppo` of one run at once (two terminals, a
    second make while the first trains) would both write its checkpoints and adapters. (the open lock file, "") when
    taken; (None, who holds it) when another process does. The lock file lives in the temp folder, keyed by the
    folder's absolute path, so the run folder gets nothing before the stage has checked its input; the operating
    system releases it when its process ends, killed or not, so a crash leaves no stale lock. The file is deleted as
    this process exits, still locked, so that launches leave none behind (a killed one leaves its file, which the next
    launch takes and deletes); a launch that locked a file just deleted so takes the new one instead."""
    import atexit
    import fcntl

    path = stage_lock_path(folder)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process"
            lock.close()
            return None, holder
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()  # its holder deleted it between our open and our lock: lock the file now at that path
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}")
    lock.flush()
    atexit.register(release_stage_folder, lock, path)
    return lock, ""


def stage_lock_path(folder: Path) -> Path:
    """The lock file of a stage's folder (hold_stage_folder): in the temp folder, keyed by the folder's absolute path."""
    import hashlib
    import tempfile

    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"rlhf-pipeline-locks-{os.getuid()}" / f"{key}.lock"


def stages_running(run_dir: Path) -> list[str]:
    """The stages of the run in `run_dir` a launch holds now ("ppo (pid 123, since 10:02:11)"): `make clean-run`
    deleted the folder under them (PPO crashed on its next write; SFT wrote its adapter and manifest into a new folder
    that then looked finished). A lock is tried, not taken: a free one is let go at once."""
    import fcntl

    running = []
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir()) if run_dir.is_dir() else []:
        # The stage's own lock, and the label store's (`make label` and `make simulate` hold `labels.sqlite.lock`
        # for their life, outside any launch: the labeling app wrote its people's labels on into a deleted store).
        for path in [stage_lock_path(folder), *sorted(folder.glob("*.lock"))]:
            if not path.is_file():
                continue
            with open(path, "a+") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    lock.seek(0)
                    holder = lock.read().strip() or "a process"  # the store's lock holds its pid alone
                    running.append(f"{folder.name} ({'pid ' if holder.isdigit() else ''}{holder})")
    return running


def release_stage_folder(lock, path: Path) -> None:
    """Delete the lock file while still holding it, then let it go (hold_stage_folder)."""
    if not lock.closed:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        lock.close()


# The fsdp_config settings the stages' own sharding (pipeline/sharding.py) follows, as accelerate's config writes
# them (lower-cased): any other value of these keys was ignored without a word (offload, no reshard, another wrap).
FSDP_AS_THE_STAGES_DO = {"fsdp_auto_wrap_policy": ("TRANSFORMER_BASED_WRAP",),
                         "fsdp_reshard_after_forward": ("true", "FULL_SHARD"), "fsdp_offload_params": ("false",),
                         "fsdp_state_dict_type": ("FULL_STATE_DICT",), "fsdp_cpu_ram_efficient_loading": ("false",),
                         "fsdp_activation_checkpointing": ("false",)}  # fsdp_version: pipeline.sharding says


def accelerate_config_problem(config_file: str | Path, launched: int | None = None) -> str | None:
    """What in an accelerate config file accelerate's launcher would stop on with a traceback of its own (YAML it
    cannot read, an unknown key or value, a number given as text), or would run as fewer processes than it says, in a
    few words; None when it is fine. `launched`: the processes the launch starts when not the file's (all the GPUs of
    this machine, processes_for_all_gpus)."""
    import dataclasses
    import typing

    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    from pipeline.config import UniqueKeyLoader, yaml_problem

    try:
        yaml.load(Path(config_file).read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # a key twice: accelerate keeps the last
        config = load_config_from_file(str(config_file))
    except yaml.YAMLError as err:
        return f"is not valid YAML: {yaml_problem(err)}"
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        return f"is not an accelerate config: {' '.join(str(err).split())}"
    for f in dataclasses.fields(config):
        value, kinds = getattr(config, f.name), set(typing.get_args(f.type) or (f.type,)) - {type(None)}
        if value is None:
            continue
        if kinds == {int} and (isinstance(value, bool) or not isinstance(value, int)):
            return f"has {f.name}: {value!r}, not a whole number"
        if kinds == {bool} and not isinstance(value, bool):
            return f"has {f.name}: {value!r}, not true or false"
    if config.num_processes is not None and config.num_processes < 1:  # 0 ran one process, -2 too, with no word
        return f"has num_processes: {config.num_processes}: give 1 or more"
    if str(config.mixed_precision) not in ("no", "fp16", "bf16", "fp8"):
        return f"has mixed_precision: {config.mixed_precision!r}: give no, bf16, fp16 or fp8"
    kind = str(getattr(config.distributed_type, "value", config.distributed_type))
    one_machine = (config.num_machines or 1) == 1
    if kind == "MULTI_CPU" and one_machine and (config.num_processes or 1) > 1 and not getattr(config, "mpirun_config", None):
        # accelerate starts MULTI_CPU ranks only through mpirun; without it its launcher runs ONE process, silently,
        # and every stage would train at one process's batch while the config says more
        return (f"has distributed_type: MULTI_CPU with num_processes: {config.num_processes}, which accelerate runs as ONE "
                f"process without mpirun: for {config.num_processes} CPU processes use distributed_type: MULTI_GPU and "
                f"use_cpu: false, as configs/accelerate/cpu2.yaml does (on a machine without a GPU every stage counts them as CPU ranks)")
    if kind == "FSDP":
        for key, value in (getattr(config, "fsdp_config", None) or {}).items():
            done = FSDP_AS_THE_STAGES_DO.get(key)
            if done is not None and str(value).lower() not in [d.lower() for d in done]:
                return (f"has fsdp_config {key}: {value}, which the stages do not do (they shard the frozen base "
                        f"themselves: each decoder layer, the embeddings, the norm and the head a unit, fully sharded, "
                        f"no offload, saved whole; pipeline/sharding.py): set it to {done[0]} or remove it")
    if kind == "FSDP" and one_machine and (launched or config.num_processes) == 1:  # all GPUs: one on this machine
        # one rank has nothing to shard over: the stages would run unsharded, as under cpu.yaml, with no word of it
        given = "num_processes: 1" if config.num_processes == 1 else "all the GPUs of a machine that has one"
        return (f"has distributed_type: FSDP with {given}, and one process has nothing to shard the base over: "
                "set num_processes: 2 or more (configs/accelerate/fsdp_cpu2.yaml on the CPU), or use "
                "configs/accelerate/cpu.yaml for one process")
    return None


if __name__ == "__main__":
    quiet_ctrl_c_until_launch()
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C before the stage started (the imports, the up-to-date check): nothing to say
        sys.exit(INTERRUPTED_EXIT)
