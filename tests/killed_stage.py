"""A stage killed at a training step, in a real launch: `python -m tests.killed_stage STAGE_MODULE STEP ARGS...` runs
STAGE_MODULE's `__main__` with ARGS, and every rank's Trainer raises once it has finished step STEP (after that step's
checkpoint, if it saves one), as a crash or a kill would end it. For the multi-process resume tests."""

import runpy
import sys

import transformers


class KilledAt(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")


def kill_every_trainer_at(step: int) -> None:
    init = transformers.Trainer.__init__

    def init_then_watch(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(KilledAt(step))

    transformers.Trainer.__init__ = init_then_watch


if __name__ == "__main__":
    module, step, *stage_args = sys.argv[1:]
    kill_every_trainer_at(int(step))
    sys.argv = [module, *stage_args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
