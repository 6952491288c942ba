"""make base: the settings and corpus it cannot run with are refused before the run folder is touched."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, parse
from tests.conftest import REPO, run_python


def base_args(runs, *extra):
    return ["--config", str(REPO / "configs/base.yaml"), "--runs_dir", str(runs), "--run", "t", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--optimizer", "bogus"], "optimizer must be one of adamw, sgd, rmsprop, not 'bogus'"),
    (["--hidden_size", "100"], "hidden_size 100 must be a multiple of num_attention_heads 6"),
    (["--eval_every", "0"], "eval_every must be at least 1, got 0"),
    (["--text_dir", "{tmp}/nowhere"], "text_dir .*nowhere holds no .txt files"),
    (["--heldout_books", "alice", "zebra"], r"heldout_books \['zebra'\] are not in data/pretrain/texts"),
])
def test_settings_make_base_cannot_run_with_are_one_error_before_writing(extra, message, tmp_path):
    from stages.base import CONFIG_CLASSES, main

    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match=message):
        main(*parse(CONFIG_CLASSES(), base_args(runs, *[e.format(tmp=tmp_path) for e in extra])))
    assert not runs.exists()


def test_make_base_refusal_is_one_error_line_and_exit_2(tmp_path):
    res = run_python("stages.base", base_args(tmp_path / "runs", "--optimizer", "bogus"), timeout=120)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr and "--optimizer" in errors[0]
    assert not (tmp_path / "runs").exists()
