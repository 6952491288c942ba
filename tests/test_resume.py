"""stages/resume.py by hand: which checkpoint an interrupted Trainer stage continues from (the stages' own resume ==
no resume checks: tests/test_sft.py and tests/test_rm.py, `interrupted`)."""

from __future__ import annotations

import json

from stages.resume import RESUME_KEY, checkpoint_to_resume, checkpoints, drop_checkpoints, start_over

KEY = {"argv": ["--run", "r"], "config": {"lr": 0.1}}


def checkpoint(root, step: int, state: bool = True, optimizer: bool = True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if state:
        (path / "trainer_state.json").write_text("{}")
    if optimizer:
        (path / "optimizer.pt").write_bytes(b"")
    return path


def test_a_checkpoint_counts_when_complete_and_holding_the_optimizers_state(tmp_path):
    """Oldest first by step (10 after 9, not before it as text); one without trainer_state.json (killed while it was
    written) or without the optimizer's state (save_only_model) cannot be continued from."""
    c9, c10 = checkpoint(tmp_path, 9), checkpoint(tmp_path, 10)
    checkpoint(tmp_path, 11, state=False)
    checkpoint(tmp_path, 12, optimizer=False)
    (tmp_path / "checkpoint-last").mkdir()
    assert checkpoints(tmp_path) == [c9, c10]


def test_the_same_run_resumes_from_its_newest_checkpoint_before_the_last_step(tmp_path):
    c3, c6 = checkpoint(tmp_path, 3), checkpoint(tmp_path, 6)
    checkpoint(tmp_path, 8)
    (tmp_path / RESUME_KEY).write_text(json.dumps(KEY))
    assert checkpoint_to_resume(tmp_path, KEY, max_steps=8) == (c6, None)  # not 8: one step too many would follow
    assert checkpoint_to_resume(tmp_path, KEY, max_steps=0) == (tmp_path / "checkpoint-8", None)  # epochs: no limit
    assert checkpoint_to_resume(tmp_path, KEY, max_steps=4) == (c3, None)
    assert checkpoint_to_resume(tmp_path, {**KEY, "config": {"lr": 0.2}}, max_steps=8)[0] is None


def test_another_run_starts_over_and_the_main_process_deletes_the_old_checkpoints(tmp_path, capsys):
    checkpoint(tmp_path, 3)
    (tmp_path / RESUME_KEY).write_text(json.dumps(KEY))
    other = {**KEY, "config": {"lr": 0.2}}
    resume_from, why = checkpoint_to_resume(tmp_path, other, max_steps=8)  # choosing only reads
    assert resume_from is None and "holds checkpoints of another command line" in why
    assert (tmp_path / "checkpoint-3").is_dir() and json.loads((tmp_path / RESUME_KEY).read_text()) == KEY
    start_over(tmp_path, other, why)
    assert f"note: {tmp_path} holds checkpoints of another command line" in capsys.readouterr().err
    assert not list(tmp_path.glob("checkpoint-*")) and json.loads((tmp_path / RESUME_KEY).read_text()) == other
    checkpoint(tmp_path, 8)  # the same run, with only a last-step checkpoint: starts over too, and says why
    resume_from, why = checkpoint_to_resume(tmp_path, other, max_steps=8)
    assert resume_from is None and why == "holds no checkpoint before the last step with the optimizer's state"
    drop_checkpoints(tmp_path)
    assert not list(tmp_path.iterdir())
    assert checkpoint_to_resume(tmp_path, other, max_steps=8) == (None, None)  # nothing to clear, nothing to say


def test_no_rank_chooses_after_the_main_process_has_started_over(tmp_path, monkeypatch):
    """Two ranks (threads, a real barrier) meet another run's checkpoints. Rank 1 is slow to look: the main process
    must not delete them, nor record the new run's key, before it has looked, or rank 1 would see the new key beside
    the old checkpoints and resume alone. Both start over, and the old checkpoint is gone after."""
    import threading
    import time
    from types import SimpleNamespace

    import accelerate
    from transformers.trainer_utils import TrainOutput

    import stages.resume as resume

    checkpoint(tmp_path, 3)
    (tmp_path / RESUME_KEY).write_text(json.dumps(KEY))
    other = {**KEY, "config": {"lr": 0.2}}
    barrier, rank_of, seen_by_rank_1, results = threading.Barrier(2, timeout=30), {}, [], {}

    class State:
        @property
        def is_main_process(self):
            return rank_of[threading.get_ident()] == 0

        def wait_for_everyone(self):
            barrier.wait()

    real_checkpoints = resume.checkpoints

    def slow_for_rank_1(output_dir):
        if rank_of[threading.get_ident()] == 1:
            time.sleep(0.5)  # the main process has long passed its own look by now
            seen_by_rank_1.append(((tmp_path / "checkpoint-3").is_dir(), json.loads((tmp_path / RESUME_KEY).read_text())))
        return real_checkpoints(output_dir)

    monkeypatch.setattr(accelerate, "PartialState", State)
    monkeypatch.setattr(resume, "checkpoints", slow_for_rank_1)

    class Trainer:
        args = SimpleNamespace(save_strategy="steps", output_dir=str(tmp_path), max_steps=8)

        def train(self, resume_from_checkpoint=None):
            return TrainOutput(0, 0.0, {"resume_from_checkpoint": resume_from_checkpoint})

    def rank(r):
        rank_of[threading.get_ident()] = r
        out, resumed_from = resume.train_resuming(Trainer(), other)
        results[r] = (out.metrics["resume_from_checkpoint"], resumed_from)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen_by_rank_1 == [(True, KEY)]  # what rank 1 saw: the old run, untouched
    assert results == {0: (None, None), 1: (None, None)}
    assert not (tmp_path / "checkpoint-3").exists() and json.loads((tmp_path / RESUME_KEY).read_text()) == other


def test_a_sharded_base_checkpoints_the_optimizer_of_its_whole_trained_weights(capsys, monkeypatch):
    """transformers refuses a Trainer on a base sharded at load time that would save its optimizer state: build_trainer
    builds it with `save_only_model` on, then turns it off again when every trained weight is whole (LoRA, heads), so
    the checkpoints hold the optimizer and a sharded run resumes (tests/test_sft.py, two_processes_resume, fsdp). A
    trained weight that is sharded keeps the model only, and says so; an unsharded run, or one that saves none, is
    left as it was."""
    from types import SimpleNamespace

    import torch.distributed.tensor
    from torch import nn

    from stages.resume import build_trainer

    class ShardedWeight(nn.Parameter):  # stands for a DTensor: the check is by type
        pass

    monkeypatch.setattr(torch.distributed.tensor, "DTensor", ShardedWeight)
    for sharded, strategy, trained_shard, want_at_init, want_after in (
            (True, "steps", False, True, False), (True, "steps", True, True, True),
            (False, "steps", False, False, False), (True, "no", False, False, False)):
        cfg = SimpleNamespace(save_strategy=strategy, save_only_model=False, save_steps=3, logging_steps=3,
                              logging_strategy="steps")
        model = nn.Linear(2, 2)
        if trained_shard:
            model.weight = ShardedWeight(model.weight.detach())
        seen_at_init = []

        def build():
            seen_at_init.append(cfg.save_only_model)  # what transformers' Trainer.__init__ checks
            return SimpleNamespace(args=cfg, model=model, _get_train_sampler=lambda *a: None,
                                   accelerator=SimpleNamespace(num_processes=1, process_index=0))

        assert build_trainer(build, cfg, sharded).args is cfg
        assert seen_at_init == [want_at_init] and cfg.save_only_model is want_after
        assert ("the checkpoints hold the model only" in capsys.readouterr().err) is trained_shard


def test_a_launch_that_times_out_is_killed_with_the_ranks_it_started_in_their_own_sessions(tmp_path):
    """tests.conftest.run_as_group, which every multi-process test launches through: torch's launcher starts each rank
    in a session of its own. A launch past its timeout must raise, with every process below it killed; killing the
    launcher's group alone left the ranks holding the output pipes, and the test waiting for them forever."""
    import subprocess
    import sys
    import threading

    import psutil

    from tests.conftest import run_as_group

    rank_pid = tmp_path / "rank.pid"
    launcher = ("import subprocess, sys, time\n"  # as torch's launcher: a rank in its own session, sharing stdout
                "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
                f"open({str(rank_pid)!r}, 'w').write(str(p.pid))\n"
                "print('started', flush=True)\n"
                "time.sleep(600)\n")
    outcome = []

    def launch():
        try:
            run_as_group([sys.executable, "-c", launcher], timeout=10, env={})  # the rank starts well before, even under load
        except subprocess.TimeoutExpired:
            outcome.append("timed out")

    waiter = threading.Thread(target=launch, daemon=True)
    waiter.start()
    waiter.join(timeout=60)
    rank = int(rank_pid.read_text())
    assert not waiter.is_alive() and outcome == ["timed out"]
    assert not psutil.pid_exists(rank) or psutil.Process(rank).status() == psutil.STATUS_ZOMBIE


def test_a_resumed_runs_loss_is_the_mean_over_every_step_by_hand():
    """whole_run_loss: logged means of 1.0 (steps 1-2) and 0.5 (steps 3-4) before the checkpoint at step 4, then this
    call's 0.2 over steps 5-6: (2 x 1.0 + 2 x 0.5 + 2 x 0.2) / 6. Logs that stop short of the checkpoint (logging by
    epoch, or steps off the checkpoints) cover some of its steps only: None, not a wrong mean."""
    from pathlib import Path
    from types import SimpleNamespace

    from stages.resume import whole_run_loss

    def trainer(logged, steps):
        return SimpleNamespace(state=SimpleNamespace(log_history=[{"loss": v, "step": s} for s, v in logged],
                                                     global_step=steps))

    result = SimpleNamespace(training_loss=0.2)
    checkpoint = Path("trainer/checkpoint-4")
    assert whole_run_loss(trainer([(2, 1.0), (4, 0.5), (6, 0.2)], 6), result, checkpoint) == round(3.4 / 6, 4)
    assert whole_run_loss(trainer([(2, 1.0), (4, 0.5)], 6), result, None) == 0.2  # not resumed: this call's own
    assert whole_run_loss(trainer([(3, 1.0)], 6), result, checkpoint) is None  # steps 4 not covered
    assert whole_run_loss(trainer([(2, 1.0), (4, 0.5)], 4), result, checkpoint) is None  # nothing trained since


def test_each_epoch_of_length_grouped_batches_has_its_own_order_from_the_seed():
    """seed_length_grouped_epochs: epoch e's order is drawn from seed + e, so epochs differ from each other, and the
    same epoch (a resumed run's) has the same order again."""
    from types import SimpleNamespace

    from transformers.trainer_pt_utils import LengthGroupedSampler

    from stages.resume import seed_length_grouped_epochs

    lengths = [5, 9, 3, 7, 1, 8, 2, 6, 4, 10, 11, 12] * 4
    trainer = SimpleNamespace(args=SimpleNamespace(seed=42), state=SimpleNamespace(epoch=0.0),
                              _get_train_sampler=lambda *a, **k: LengthGroupedSampler(4, lengths=lengths))
    seed_length_grouped_epochs(trainer)
    orders = {}
    for epoch in (0.0, 1.0, 0.0):
        trainer.state.epoch = epoch
        order = list(trainer._get_train_sampler())
        assert sorted(order) == list(range(len(lengths)))
        orders.setdefault(epoch, order)
        assert orders[epoch] == order
    assert orders[0.0] != orders[1.0]


def test_sampled_batches_key_paths_as_recorded_a_killed_write_leaves_no_batch_and_tokens_seen(tmp_path, monkeypatch):
    """A key holding paths reads back as the same run (as recorded: JSON text), so the run continues; a batch whose
    write is killed midway leaves no batch file (it is written aside, then renamed), so the next run samples it again
    rather than load half a file; a checkpoint's tokens seen are the Trainer's num_input_tokens_seen."""
    from pathlib import Path
    from types import SimpleNamespace

    import pytest
    import torch

    from stages.resume import SampledBatches, recorded_key_is, tokens_seen_by

    state = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    key = {"inputs": {"data": Path("data/story/pairs.jsonl")}, "config": {"seed": 1}}
    batches = SampledBatches(tmp_path / "sampled", key, state)
    assert recorded_key_is(tmp_path / "sampled", key)

    def killed(obj, f):
        Path(f).write_bytes(b"half a batch")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        batches.put(0, (torch.ones(2),))
    monkeypatch.undo()
    again = SampledBatches(tmp_path / "sampled", key, state)
    assert again.kept == 0 and again.get(0) is None
    again.put(0, (torch.ones(2),))
    assert torch.equal(SampledBatches(tmp_path / "sampled", key, state).get(0)[0], torch.ones(2))

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4, "num_input_tokens_seen": 1234}')
    assert tokens_seen_by(checkpoint) == 1234

    # bad input after the batches' folder made the stage's: both go; a stage folder that was there before stays
    from stages.resume import drop_sampled_batches

    stage = tmp_path / "pairs"
    SampledBatches(stage / "sampled", key, state)
    drop_sampled_batches(stage, made_stage_folder=True)
    assert not stage.exists()
    SampledBatches(stage / "sampled", key, state)
    drop_sampled_batches(stage, made_stage_folder=False)
    assert stage.is_dir() and not (stage / "sampled").exists()


def test_logging_steps_become_the_largest_divisor_of_save_steps_by_hand(tmp_path):
    """align_logging_with_checkpoints: logging every 4 steps and saving every 6 logs every gcd = 2 (not every 4, which
    would leave steps 5-6 of the checkpoint at 6 in no log); a divisor of save_steps, or logging by epoch, is left as
    it is. A checkpoint folder whose name does not end in a step (a copy, checkpoint-4-old) is no checkpoint, however
    complete, not a ValueError."""
    from types import SimpleNamespace

    from stages.resume import align_logging_with_checkpoints

    def aligned(save, log, strategy="steps"):
        cfg = SimpleNamespace(save_steps=save, logging_steps=log, save_strategy="steps", logging_strategy=strategy)
        align_logging_with_checkpoints(cfg)
        return cfg.logging_steps

    assert (aligned(6, 4), aligned(8, 4), aligned(9, 6), aligned(10, 4), aligned(6, 4, "epoch")) == (2, 4, 3, 2, 4)
    c4 = checkpoint(tmp_path, 4)
    copy = tmp_path / "checkpoint-4-old"
    copy.mkdir()
    (copy / "trainer_state.json").write_text("{}")
    (copy / "optimizer.pt").write_bytes(b"")
    assert checkpoints(tmp_path) == [c4]


def test_a_user_s_save_only_model_stays_on_a_sharded_base():
    """build_trainer turns save_only_model off again only where it turned it on: a config that asked for model-only
    checkpoints keeps them on a sharded base too. Mutant: the user's setting overwritten, the optimizer saved."""
    from types import SimpleNamespace

    from torch import nn

    from stages.resume import build_trainer

    cfg = SimpleNamespace(save_strategy="steps", save_only_model=True, save_steps=3, logging_steps=3,
                          logging_strategy="steps")
    trainer = SimpleNamespace(args=cfg, model=nn.Linear(2, 2), _get_train_sampler=lambda *a: None,
                              accelerator=SimpleNamespace(num_processes=1, process_index=0))
    assert build_trainer(lambda: trainer, cfg, True).args.save_only_model is True and cfg.save_only_model is True


def test_a_rank_does_not_reuse_another_ranks_batch(tmp_path):
    """Batch 0 is rank 0's of two: rank 1, which runs it again only to keep in step, does not load rank 0's file
    (it would skip a forward rank 0 takes part in) nor count it reused."""
    from types import SimpleNamespace

    import torch

    from stages.resume import SampledBatches

    def state(rank):
        return SimpleNamespace(process_index=rank, num_processes=2, is_main_process=rank == 0,
                               wait_for_everyone=lambda: None)

    key = {"argv": ["--run", "r"]}
    SampledBatches(tmp_path / "sampled", key, state(0)).put(0, (torch.ones(2),))
    second = SampledBatches(tmp_path / "sampled", key, state(1))
    assert (tmp_path / "sampled" / "batch-000000.pt").is_file()
    assert second.get(0) is None and second.reused == 0
    assert torch.equal(SampledBatches(tmp_path / "sampled", key, state(0)).get(0)[0], torch.ones(2))
