"""A stage killed at a training step, in a real launch: `python -m tests.killed_stage STAGE_MODULE [FOLDER:]STEP ARGS...`
runs STAGE_MODULE's `__main__` with ARGS, and every rank's Trainer (only one whose output folder is named FOLDER, e.g.
a reward-model ensemble's `member-1`) raises once it has finished step STEP, after that step's checkpoint if it saves
one, as a crash or a kill would end it. `batches:K` instead: every rank of a sampling stage (pairs, eval) raises once
it has kept its K-th sampled batch (stages.resume.SampledBatches). For the multi-process resume tests."""

import runpy
import sys
from pathlib import Path

import transformers


class KilledAt(transformers.TrainerCallback):
    def __init__(self, step: int, folder: str | None):
        self.step, self.folder = step, folder

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.folder in (None, Path(args.output_dir).name):
            raise RuntimeError(f"killed at step {self.step}")


def kill_every_trainer_at(step: int, folder: str | None = None) -> None:
    init = transformers.Trainer.__init__

    def init_then_watch(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(KilledAt(step, folder))

    transformers.Trainer.__init__ = init_then_watch


def dying_put(put, kill_after: int | None, seen: list, record=lambda store, batch: batch):
    """SampledBatches.put (`put`) that also appends record(store, batch) to `seen` for each batch it keeps, and raises
    once `seen` holds `kill_after` of them (None: never), as a crash would end the stage."""
    def put_then_watch(self, batch, tensors):
        put(self, batch, tensors)
        seen.append(record(self, batch))
        if len(seen) == kill_after:
            raise RuntimeError(f"killed after {kill_after} batches")

    return put_then_watch


def kill_every_rank_after_batches(k: int) -> None:
    import stages.resume

    stages.resume.SampledBatches.put = dying_put(stages.resume.SampledBatches.put, k, [])


if __name__ == "__main__":
    module, where, *stage_args = sys.argv[1:]
    folder, _, count = where.rpartition(":")
    if folder == "batches":
        kill_every_rank_after_batches(int(count))
    else:
        kill_every_trainer_at(int(count), folder or None)
    sys.argv = [module, *stage_args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
