"""Run folders and manifests.

Every stage writes under runs/<run>/<stage>/ and ends by writing manifest.json there, atomically and last:
a manifest on disk means the stage finished. Later stages find their inputs through it, and Make targets
depend on it, so a finished stage is not rerun.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT, ConfigError, resolve_path

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


def atomic_write_json(path: Path, data: Any) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


class StageRun:
    """Bookkeeping for one stage: its folder, the saved config, the final manifest."""

    def __init__(self, stage: str, run: str, runs_dir: str = "runs"):
        self.stage, self.run, self.runs_dir = stage, run, runs_dir
        self.dir = stage_dir(runs_dir, run, stage)
        self.manifest_path = self.dir / "manifest.json"
        self.started = time.time()
        self.upstream: dict[str, Any] = {}

    def prepare(self, config: dict[str, Any], is_main: bool = True) -> None:
        """Create the folder, drop a stale manifest (this run replaces it), save the resolved config."""
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.manifest_path.exists():
                self.manifest_path.unlink()
            atomic_write_json(self.dir / "config.json", config)

    def need(self, stage: str) -> dict[str, Any]:
        manifest = read_manifest(self.runs_dir, self.run, stage, needed_by=f"`make {self.stage}`")
        self.upstream[stage] = manifest
        return manifest

    def finish(self, outputs: dict[str, Any], metrics: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        manifest = {
            "stage": self.stage,
            "run": self.run,
            "outputs": {k: str(v) for k, v in outputs.items()},
            "metrics": metrics,
            "upstream": {k: {"manifest": str(stage_dir(self.runs_dir, self.run, k) / "manifest.json"),
                             "outputs": v.get("outputs", {}), "git_commit": v.get("git_commit")}
                         for k, v in self.upstream.items()},
            "config": config,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "command": " ".join(sys.argv),
            "wall_time_s": round(time.time() - self.started, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest


def main_guard(main_fn):
    """Run a stage's main(); a ConfigError becomes one clear line on stderr and exit code 2, no traceback."""
    from pipeline.report import destroy_distributed

    try:
        main_fn()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    destroy_distributed()
