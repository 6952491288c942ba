"""Fast stand-ins for the stages, for tests of the Makefile and pipeline.launch (`make ... STAGE_PKG=tests.fake_stages`).

Each reads its upstream manifests the way the real stage does (StageRun.need / may_read), appends its name to
<runs_dir>/<run>/ran.txt, and writes its manifest with StageRun.finish, so that what `make` skips or reruns is decided
by the real manifests' recorded inputs. `--fail` stops with a ConfigError (exit 2), `--fail_on_rank R` on rank R alone (the other ranks wait a
minute), `--crash` raises RuntimeError, `--crash_after_prepare` too, once the stage folder is prepared;
`--hold DIR` writes DIR/<rank>.pid once prepared and sleeps two minutes (a stage training; Ctrl-C then takes
`--interrupt_takes S` seconds to stop it).
"""

from __future__ import annotations

import os
import sys
import time

from pipeline.config import ConfigError
from pipeline.run import StageRun, _flag, main_guard, stage_dir  # _flag: a flag's value as the real stages' parser


def fake_stage(name: str, needs: tuple[str, ...] = (), may_read: tuple[str, ...] = ()) -> None:
    def main():
        argv = sys.argv[1:]
        if "--fail" in argv:
            raise ConfigError(f"{name}: --fail was given (a fake stage's bad input)")
        if "--fail_on_rank" in argv:  # bad input that one rank meets alone; the others wait, as on a collective
            if os.environ.get("RANK", "0") == _flag(argv, "--fail_on_rank", "0"):
                raise ConfigError(f"{name}: --fail_on_rank was given (one rank's bad input)")
            time.sleep(60)
        if "--crash" in argv:
            raise RuntimeError(f"{name}: --crash was given (a fake stage's bug)")
        stage = StageRun(name, _flag(argv, "--run", "default"), _flag(argv, "--runs_dir", "runs"))
        for upstream in needs:
            stage.need(upstream)
        for upstream in may_read:
            stage.may_read(upstream)
            if (stage_dir(stage.runs_dir, stage.run, upstream) / "manifest.json").is_file():
                stage.need(upstream)
        stage.prepare({})
        if "--crash_after_prepare" in argv:  # killed mid-run: the run folder prepared, no manifest written
            raise RuntimeError(f"{name}: --crash_after_prepare was given (a run killed while it trains)")
        if "--hold" in argv:
            held = _flag(argv, "--hold", "")
            with open(os.path.join(held, f"{os.environ.get('RANK', '0')}.pid.tmp"), "w") as f:
                f.write(str(os.getpid()))
            os.replace(f.name, f.name[: -len(".tmp")])
            try:
                time.sleep(120)
            except KeyboardInterrupt:  # a stage that takes a while to stop (closing files, a collective)
                time.sleep(float(_flag(argv, "--interrupt_takes", "0")))
                raise
        with open(stage.dir.parent / "ran.txt", "a") as f:
            f.write(name + "\n")
        stage.finish({}, {}, {"argv": argv})

    main_guard(main)
