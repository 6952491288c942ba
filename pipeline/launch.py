"""How `make <stage>` starts a stage: skip it when its manifest is current, else `accelerate launch` it.

    python -m pipeline.launch STAGE [--force] [ACCELERATE_LAUNCH_ARGS...] -m MODULE [STAGE_ARGS...]
    python -m pipeline.launch STAGE --check -m MODULE [STAGE_ARGS...]      # parse the stage's flags only
    python -m pipeline.launch rm --config_file configs/accelerate/cpu.yaml -m stages.rm --config configs/rm.yaml --run default

- Current (same command line and accelerate config, same files, same upstream manifests: pipeline.run.is_current):
  one "up to date" line, exit 0, in well under a second (nothing heavy is imported). `--force` (make's FORCE=1, or in
  ARGS) runs it anyway.
- Otherwise accelerate's own launcher runs, in this process, exactly as `accelerate launch ...` would. A stage that
  stops on bad input has already printed its one `error:` line and exits 2 (pipeline.run.main_guard); the launcher
  would add a CalledProcessError traceback of its own under it, which says nothing more, so for exit code 2 it is
  left out. Any other failure (a real crash) keeps every traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.run import LAUNCH_ENV, is_current

CONFIG_ERROR_EXIT = 2  # pipeline.run.main_guard's exit code for bad input


def processes_for_all_gpus(config_file: str | Path, gpus: int) -> list[str]:
    """A one-machine config with `gpu_ids: all` (multi_gpu.yaml, fsdp.yaml) means one process per GPU of this machine,
    whatever its num_processes says (8, the largest common machine): accelerate would start that many, and the ranks
    beyond the GPUs would fail. The extra launch arguments that say so; none when they agree or there is no GPU."""
    import yaml

    config = yaml.safe_load(Path(config_file).read_text()) or {}
    if str(config.get("gpu_ids")) != "all" or config.get("num_machines", 1) != 1 or gpus < 1:
        return []
    return [] if config.get("num_processes") == gpus else ["--num_processes", str(gpus)]


def launch(accelerate_args: list[str], module: str, stage_args: list[str]) -> int:
    import torch
    from accelerate.commands.launch import launch_command, launch_command_parser

    os.environ[LAUNCH_ENV] = json.dumps(accelerate_args)  # the stage records it (pipeline.run.launch_args)
    if "--config_file" in accelerate_args[:-1] and "--num_processes" not in accelerate_args:
        config_file = accelerate_args[accelerate_args.index("--config_file") + 1]
        extra = processes_for_all_gpus(config_file, torch.cuda.device_count())
        if extra:
            print(f"launch: {extra[1]} GPUs here: {extra[1]} processes ({config_file} asks for all of them)", flush=True)
        accelerate_args = [*accelerate_args, *extra]
    args = launch_command_parser().parse_args([*accelerate_args, "-m", module, *stage_args])
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process: the child's exit code
        if err.returncode == CONFIG_ERROR_EXIT:
            return CONFIG_ERROR_EXIT
        raise
    except Exception as err:  # several processes: torch.distributed.elastic's ChildFailedError, one entry per rank
        failures = getattr(err, "failures", None)
        if failures and all(f.exitcode == CONFIG_ERROR_EXIT for f in failures.values()):
            return CONFIG_ERROR_EXIT
        raise
    return 0


def check(module: str, stage_args: list[str]) -> int:
    """Parse a stage's command line and nothing more (unknown flags, types, ranges, each config's own rules): make
    runs this for the stages it is named with before any stage runs, so that a bad flag is one line at once, not after
    the upstream stages have trained; then the module's `check_args(*parsed)`, where it has one. A module without
    CONFIG_CLASSES is not checked here (it checks itself)."""
    import importlib

    from pipeline.config import ConfigError, parse

    mod = importlib.import_module(module)
    if not hasattr(mod, "CONFIG_CLASSES") and hasattr(mod, "__path__"):  # a package whose __main__ parses (stages.label)
        mod = importlib.import_module(module + ".__main__")
    if not hasattr(mod, "CONFIG_CLASSES"):
        return 0
    try:
        parsed = parse(mod.CONFIG_CLASSES(), stage_args)
        if hasattr(mod, "check_args"):  # the stage's own checks of its flags together (stages.publish: a repo id)
            mod.check_args(*parsed)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 3 or "-m" not in argv[1:]:
        print("usage: python -m pipeline.launch STAGE [--force] [ACCELERATE_ARGS...] -m MODULE [STAGE_ARGS...]",
              file=sys.stderr)
        return CONFIG_ERROR_EXIT
    stage, rest = argv[0], argv[1:]
    m = rest.index("-m")
    ours, module, stage_args = rest[:m], rest[m + 1], rest[m + 2 :]
    if "--check" in ours:
        return check(module, stage_args)
    force = "--force" in ours or "--force" in stage_args
    ours, stage_args = [a for a in ours if a != "--force"], [a for a in stage_args if a != "--force"]
    if "--config_file" in ours[:-1]:
        config_file = Path(ours[ours.index("--config_file") + 1])
        if not config_file.is_file():
            shipped = ", ".join(sorted(str(p) for p in Path("configs/accelerate").glob("*.yaml")))
            print(f"error: ACCELERATE_CONFIG={config_file} does not exist: give one of {shipped}, or your own "
                  f"`accelerate config` file", file=sys.stderr)
            return CONFIG_ERROR_EXIT
    if not force:
        current, why = is_current(stage, stage_args, ours)
        if current:
            print(f"{stage}: up to date, skipped (same command line, launch, files and upstream stages; FORCE=1 redoes it)")
            return 0
        print(f"{stage}: running, because {why}", flush=True)
    return launch(ours, module, stage_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
