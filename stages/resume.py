"""Continue an interrupted Trainer stage (SFT, the reward models, DPO) from its newest checkpoint, as PPO does.

Only the same run continues: the checkpoints' folder records what `make` compares to call a stage up to date (its
command line, accelerate launch, the digests of the files it read and of its upstream manifests:
pipeline.run.StageRun.inputs) and the resolved config it trains with. Run the same command again after a crash and
it resumes; change a flag or a data file and it starts over, with a note, after the main process has cleared the
other run's checkpoints (the Trainer's rotation would otherwise take them for this run's). A finished stage deletes
its checkpoints: its adapter is the result.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from pipeline.run import atomic_write_json, fsync_dir
from stages.epoch_end import count_each_row_once

RESUME_KEY = "resume_key.json"  # beside the checkpoints: what the run that wrote them read


def as_recorded(key: dict) -> dict:
    """`key` as it reads back from RESUME_KEY (paths and other objects as text)."""
    return json.loads(json.dumps(key, default=str))


def recorded_key_is(folder: Path, key: dict) -> bool:
    """The run that wrote `folder`'s checkpoints or batches read what this one reads (`key`)."""
    recorded = folder / RESUME_KEY
    return recorded.is_file() and json.loads(recorded.read_text()) == as_recorded(key)


def checkpoints(output_dir: Path) -> list[Path]:
    """The Trainer's checkpoints a run can continue from, oldest first: complete (one killed while it was written has
    no trainer_state.json) and holding the optimizer's state (`save_only_model: true` leaves it out, and a resume
    with fresh Adam moments takes larger steps than the run it continues)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted((p for p in found if (p / "trainer_state.json").is_file() and any(p.glob("optimizer*"))), key=step_of)


def build_trainer(build, train_cfg, sharded: bool):
    """`build()` (the stage's Trainer), such that its checkpoints hold the optimizer's state on a sharded base too.

    transformers refuses a Trainer on a base sharded at load time (our FSDP2) that would save its optimizer: in general
    a sharded trained weight has a sharded optimizer state, which its torch.save of one rank's state would not hold.
    Here only whole weights train (the LoRA matrices and peft's copies of heads stay whole on every rank:
    pipeline.sharding), so their optimizer state is the same on every rank, and the main process's file is all of it,
    as under DDP. So the Trainer is built with `save_only_model` on, to pass that check, and then saves the optimizer
    again: an interrupted sharded run resumes. Were a sharded weight trained after all, its checkpoints keep the model
    only and an interrupted run starts over, with a note."""
    from accelerate import PartialState
    from torch.distributed.tensor import DTensor

    align_logging_with_checkpoints(train_cfg)
    wants_optimizer = sharded and train_cfg.save_strategy != "no" and not train_cfg.save_only_model
    if wants_optimizer:
        train_cfg.save_only_model = True
    trainer = build()
    seed_length_grouped_epochs(trainer)
    seed_each_rank(trainer)
    count_each_row_once(trainer)
    if wants_optimizer:
        sharded_trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad and isinstance(p, DTensor)]
        # train_cfg too: the reward models build a Trainer per member from it
        train_cfg.save_only_model = trainer.args.save_only_model = bool(sharded_trained)
        if sharded_trained and PartialState().is_main_process:
            print(f"note: {sharded_trained[0]} is sharded and trained: the checkpoints hold the model only "
                  f"(transformers saves no sharded optimizer state), so an interrupted run starts over", file=sys.stderr)
    return trainer


def align_logging_with_checkpoints(train_cfg) -> None:
    """Checkpoints on logging steps: logging_steps becomes a divisor of save_steps (their greatest common divisor).
    A resumed run logs its first loss over the steps since its checkpoint, and the losses of the steps between the
    last log and the checkpoint are in no checkpoint: the resumed loss curve and train_loss then differed from the
    uninterrupted run's (steps 7-8 logged in place of 5-8)."""
    import math

    save, log = train_cfg.save_steps, train_cfg.logging_steps
    if (train_cfg.save_strategy == "steps" and train_cfg.logging_strategy == "steps" and save >= 1 and log >= 1
            and save == int(save) and log == int(log) and save % log):
        train_cfg.logging_steps = math.gcd(int(save), int(log))


def whole_run_loss(trainer, result, resumed_from: Path | None) -> float | None:
    """The mean training loss over all the run's steps (4 decimals). transformers' training_loss covers the steps of
    this call only, so a resumed run reported the mean of its last steps (0.008 against 0.159). The steps up to the
    checkpoint come from the logged losses it restored, each a mean over its steps; they cover those steps exactly
    because checkpoints fall on logging steps (align_logging_with_checkpoints). None where they do not (logging by
    epoch)."""
    if resumed_from is None:
        return round(result.training_loss, 4)
    start, done, last = step_of(resumed_from), 0.0, 0
    for entry in trainer.state.log_history:
        if "loss" in entry and entry["step"] <= start:
            done, last = done + entry["loss"] * (entry["step"] - last), entry["step"]
    steps = trainer.state.global_step
    if last != start or steps <= start:
        return None
    return round((done + result.training_loss * (steps - start)) / steps, 4)


def seed_each_rank(trainer) -> None:
    """transformers seeds every rank alike (set_seed(seed)), so under DDP rank 1's rows drew exactly rank 0's LoRA
    dropout masks, where one process draws its rows' masks one after another. Each rank starts training from seed +
    rank instead (one process: as it was); a resumed run then loads each rank's own state from its checkpoint."""
    from transformers import TrainerCallback, set_seed

    rank = trainer.accelerator.process_index
    if trainer.accelerator.num_processes == 1:
        return

    class SeedEachRank(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            set_seed(args.seed + rank)

    trainer.add_callback(SeedEachRank())


def seed_length_grouped_epochs(trainer) -> None:
    """train_sampling_strategy group_by_length draws each epoch's order from a generator seeded with seed + epoch, as
    accelerate's seedable sampler does for `random`. transformers' LengthGroupedSampler draws it from the global RNG:
    a run resumed inside epoch 1 never made epoch 0's draw, so it took epoch 0's order again (some rows trained twice,
    others not at all) and did not end where the uninterrupted run ends."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        def __iter__(self):
            # The epoch from the Trainer's state (restored on resume; a whole number at each epoch's start), not
            # set_epoch: accelerate does not pass that through a resumed run's SkipBatchSampler over its
            # BatchSamplerShard, so two ranks resumed inside epoch 1 drew epoch 0's order.
            epoch = int(trainer.state.epoch or 0)
            self.generator = torch.Generator().manual_seed(trainer.args.seed + epoch)
            return super().__iter__()

    build_sampler = trainer._get_train_sampler

    def train_sampler(*args, **kwargs):
        sampler = build_sampler(*args, **kwargs)
        if type(sampler) is LengthGroupedSampler:
            sampler.__class__ = EpochSeededLengthGroupedSampler
        return sampler

    trainer._get_train_sampler = train_sampler


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def checkpoint_to_resume(output_dir: Path, key: dict, max_steps: int) -> tuple[Path | None, str | None]:
    """(the newest checkpoint, None) when the run that wrote it read what this one reads (`key`); else (None, why this
    run starts over, or None when there is nothing to clear). Reads only: every rank calls it, and none may call it
    after the main process has started over (train_resuming waits for every rank between the two).

    A checkpoint at max_steps is passed over for the one before it: transformers checks max_steps only after a step,
    so resuming from the last step in the middle of an epoch trains one step more than the run it continues."""
    found = [c for c in checkpoints(output_dir) if max_steps <= 0 or step_of(c) < max_steps]
    same_run = recorded_key_is(output_dir, key)
    if same_run and found:
        return found[-1], None
    if not any(p.is_dir() for p in output_dir.glob("checkpoint-*")):
        return None, None
    return None, ("holds no checkpoint before the last step with the optimizer's state" if same_run else
                  "holds checkpoints of another command line, launch or data")


def start_over(output_dir: Path, key: dict, why: str | None) -> None:
    """The main process, once every rank has chosen not to resume: clear the other run's checkpoints (the Trainer's
    rotation would otherwise take them for this run's), with a note saying why, and record this run's key."""
    stale = [p for p in output_dir.glob("checkpoint-*") if p.is_dir()]
    if stale:
        print(f"note: {output_dir} {why}: starting over (they are deleted)", file=sys.stderr)
    for p in stale:
        shutil.rmtree(p)
    atomic_write_json(output_dir / RESUME_KEY, as_recorded(key))


def train_resuming(trainer, key: dict):
    """trainer.train(), from the newest checkpoint of an interrupted run of the same command when there is one
    (checkpoint_to_resume; a run that saves none has none). Every rank calls it. (train's result, that checkpoint or
    None)."""
    from accelerate import PartialState

    args, state = trainer.args, PartialState()
    resume_from = None
    if args.save_strategy != "no":
        output_dir = Path(args.output_dir)
        resume_from, why = checkpoint_to_resume(output_dir, key, args.max_steps)
        # Every rank has chosen before the main process deletes or records anything: a rank still reading would
        # otherwise see the new key beside the old run's checkpoints and continue from one of them alone.
        state.wait_for_everyone()
        if state.is_main_process and resume_from:
            print(f"note: resuming from {resume_from} (the same command line, launch and files as the run that wrote "
                  f"it; FORCE=1 does not start over: delete {output_dir} for that)", file=sys.stderr)
        elif state.is_main_process:
            start_over(output_dir, key, why)
        state.wait_for_everyone()  # another run's checkpoints are gone before this one writes its own
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return result._replace(training_loss=whole_run_loss(trainer, result, resume_from)), resume_from


def drop_checkpoints(output_dir: Path) -> None:
    """After the stage's outputs and manifest are written: the checkpoints are no longer needed to continue it."""
    for p in output_dir.glob("checkpoint-*"):
        if p.is_dir():
            shutil.rmtree(p)
    (output_dir / RESUME_KEY).unlink(missing_ok=True)


def tokens_seen_by(checkpoint: Path) -> int:
    """The input tokens the run had trained on when it wrote `checkpoint` (Trainer's num_input_tokens_seen)."""
    return json.loads((checkpoint / "trainer_state.json").read_text()).get("num_input_tokens_seen") or 0


class SampledBatches:
    """The finished batches of an interrupted sampling stage (`make pairs`, `make eval`), kept in `folder` as sampled, so
    that the same command run again samples only the batches it had not finished. Every batch has its own seed
    (pipeline.generation.generate), so the result is the one an uninterrupted run gives, byte for byte. Only the same
    run continues (`key`, as for checkpoints); another command line, launch or data starts over, with a note. Every
    rank builds it; each rank reads and writes the batches it samples."""

    def __init__(self, folder: Path, key: dict, state):
        self.folder, self.reused = folder, 0
        self.rank, self.world = state.process_index, state.num_processes
        same_run = recorded_key_is(folder, key)
        kept = sorted(folder.glob("batch-*.pt"))
        self.kept = len(kept) if same_run else 0
        state.wait_for_everyone()  # every rank has read the key before the main process replaces it
        if state.is_main_process:
            if same_run and kept:
                print(f"note: {len(kept)} batches sampled by an interrupted run of the same command are kept "
                      f"({folder}); the rest are sampled now", file=sys.stderr)
            elif not same_run:
                if kept:
                    print(f"note: {folder} holds batches of another command line, launch or data: starting over "
                          f"(they are deleted)", file=sys.stderr)
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                atomic_write_json(folder / RESUME_KEY, as_recorded(key))
        state.wait_for_everyone()

    def path(self, batch: int) -> Path:
        return self.folder / f"batch-{batch:06d}.pt"

    def mine(self, batch: int) -> bool:
        """Batch b is rank b % N's (pipeline.sharding.spread); another rank that runs it again only keeps in step."""
        return batch % self.world == self.rank

    def get(self, batch: int):
        """The batch's tensors when an earlier run of the same command finished it, else None."""
        import torch

        if not self.mine(batch) or not self.path(batch).is_file():
            return None
        try:
            tensors = tuple(torch.load(self.path(batch), weights_only=True))
        except (EOFError, RuntimeError, OSError, ValueError):  # a file a power cut left empty or cut short: sampled again
            return None
        self.reused += 1
        return tensors

    def put(self, batch: int, tensors: tuple) -> None:
        import torch

        if not self.mine(batch):
            return
        part = self.path(batch).with_suffix(".part")  # a kill mid-write leaves no batch file behind
        torch.save(list(tensors), part)
        with open(part, "rb") as f:  # its data on the disk before the rename names it finished (a power cut)
            os.fsync(f.fileno())
        part.replace(self.path(batch))
        fsync_dir(self.folder)


def sampled_batches(stage, config: dict, state, name: str = "") -> SampledBatches:
    """The SampledBatches of a sampling stage's run (`stage`: pipeline.run.StageRun), in stage.dir/sampled/NAME (eval
    keeps each policy's apart), keyed as a Trainer stage's checkpoints are."""
    key = {**stage.inputs(config), "config": config, "sampled": name}
    return SampledBatches(stage.dir / "sampled" / name, key, state)  # name "": stage.dir/sampled itself


def drop_sampled_batches(stage_dir: Path, made_stage_folder: bool = False) -> None:
    """Every SampledBatches folder of the stage's run (sampled_batches): once its outputs are written, or when it
    stops on bad input, then with the stage's folder too if keeping them had made it."""
    shutil.rmtree(stage_dir / "sampled", ignore_errors=True)
    if made_stage_folder and stage_dir.is_dir() and not any(stage_dir.iterdir()):
        stage_dir.rmdir()
