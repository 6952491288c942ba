"""stages/resume.py by hand: which checkpoint an interrupted Trainer stage continues from (the stages' own resume ==
no resume checks: tests/test_sft.py and tests/test_rm.py, `interrupted`)."""

from __future__ import annotations

import json

from stages.resume import RESUME_KEY, checkpoint_to_resume, checkpoints, drop_checkpoints

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


def test_the_same_run_resumes_from_its_newest_checkpoint_before_the_last_step(tmp_path, capsys):
    c3, c6 = checkpoint(tmp_path, 3), checkpoint(tmp_path, 6)
    checkpoint(tmp_path, 8)
    (tmp_path / RESUME_KEY).write_text(json.dumps(KEY))
    assert checkpoint_to_resume(tmp_path, KEY, True, max_steps=8) == c6  # not 8: one step too many would follow
    assert checkpoint_to_resume(tmp_path, KEY, True, max_steps=0) == tmp_path / "checkpoint-8"  # epochs: no limit
    assert checkpoint_to_resume(tmp_path, KEY, False, max_steps=7) == c6  # every rank picks the same one
    assert "note: resuming from" in capsys.readouterr().err
    assert checkpoint_to_resume(tmp_path, KEY, True, max_steps=4) == c3


def test_another_run_starts_over_and_the_main_process_deletes_the_old_checkpoints(tmp_path, capsys):
    checkpoint(tmp_path, 3)
    (tmp_path / RESUME_KEY).write_text(json.dumps(KEY))
    other = {**KEY, "config": {"lr": 0.2}}
    assert checkpoint_to_resume(tmp_path, other, False, max_steps=8) is None  # not the main process: only reads
    assert (tmp_path / "checkpoint-3").is_dir() and json.loads((tmp_path / RESUME_KEY).read_text()) == KEY
    assert checkpoint_to_resume(tmp_path, other, True, max_steps=8) is None
    assert "holds checkpoints of another command line" in capsys.readouterr().err
    assert not list(tmp_path.glob("checkpoint-*")) and json.loads((tmp_path / RESUME_KEY).read_text()) == other
    checkpoint(tmp_path, 8)  # the same run, with only a last-step checkpoint: starts over too, and says why
    assert checkpoint_to_resume(tmp_path, other, True, max_steps=8) is None
    assert "holds no checkpoint before the last step" in capsys.readouterr().err
    drop_checkpoints(tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_sharded_base_checkpoints_the_model_only(capsys):
    """transformers refuses a Trainer on a base sharded at load time that would save its optimizer state: the
    checkpoints of a sharded run hold the model only (and say so); an unsharded run, or one that saves none, is left."""
    from types import SimpleNamespace

    from stages.resume import model_only_when_sharded

    for sharded, strategy, want in ((True, "steps", True), (False, "steps", False), (True, "no", False)):
        cfg = SimpleNamespace(save_strategy=strategy, save_only_model=False)
        model_only_when_sharded(cfg, sharded, is_main=True)
        assert cfg.save_only_model is want
        assert ("checkpoints hold the model only" in capsys.readouterr().err) is want
