"""The Makefile: ARGS reach the stage you name, a stage reruns exactly when what it read changed, one clear line on bad
input. Real `make` on the real Makefile; the stages are fast stand-ins (tests/fake_stages/) except where noted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.run import StageRun, file_digest, input_digest, is_current, manifest_digest
from tests.conftest import REPO, yaml_with

PY = sys.executable


def make(*args, dry_run=False, fake=True, runs_dir=None, timeout=300, env=None):
    # -o .venv/.done: never (re)install the environment from a test; it is the one running the test.
    cmd = ["make", "--no-print-directory", "-o", ".venv/.done", *(["-n"] if dry_run else []), *args, f"PY={PY}"]
    if fake:  # the fake stages have no simulated annotators: the story chain's automatic labels step is off
        cmd += ["STAGE_PKG=tests.fake_stages", "AUTO_LABELS="]
    if runs_dir:
        cmd += [f"RUNS_DIR={runs_dir}", "RUN=t"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def launches(out: str) -> dict[str, list[str]]:
    """stage -> the rest of its `python -m pipeline.launch STAGE ...` line, from `make -n` output."""
    found = {}
    for line in out.replace("\\\n", " ").splitlines():
        m = re.search(r"-m pipeline\.launch (\S+) (.*)", line)
        if m:
            found[m.group(1)] = m.group(2).split()
    return found


def stage_args(words: list[str]) -> list[str]:
    """What follows `--runs_dir DIR` on a launch line: the model profile and the stage's own ARGS."""
    return words[words.index("--runs_dir") + 2 :]


# ---------------------------------------------------------------- ARGS go to the stage you name

def test_args_go_to_the_named_stage_only():
    res = make("rm", "ARGS=--learning_rate 1e-4", dry_run=True)
    assert res.returncode == 0, res.stderr
    lines = launches(res.stdout)
    assert list(lines) == ["sft", "rm"]  # rm triggers sft first
    assert stage_args(lines["rm"]) == ["--learning_rate", "1e-4"]
    assert stage_args(lines["sft"]) == []  # the SFT stage a chain triggers does not get rm's ARGS


def test_per_stage_variables_reach_every_stage_of_a_chain(tmp_path):
    res = make("sft", "rm", "ppo", "SFT_ARGS=--max_steps 5", "RM_ARGS=--min_steps 7", "PPO_ARGS=--total_updates 3",
               dry_run=True)
    assert res.returncode == 0, res.stderr
    lines = launches(res.stdout)
    assert stage_args(lines["sft"]) == ["--max_steps", "5"]
    assert stage_args(lines["rm"]) == ["--min_steps", "7"]
    assert stage_args(lines["ppo"]) == ["--total_updates", "3"]
    # eval triggers the whole chain; each triggered stage gets its own variable, the named one also ARGS (in an empty
    # runs folder: eval also brings every RL policy the run already has up to date)
    lines = launches(make("eval", "RM_ARGS=--min_steps 7", "ARGS=--max_new_tokens 9", dry_run=True,
                          runs_dir=tmp_path).stdout)
    assert list(lines) == ["sft", "rm", "ppo", "eval"]
    assert stage_args(lines["rm"]) == ["--min_steps", "7"] and stage_args(lines["eval"]) == ["--max_new_tokens", "9"]
    assert stage_args(lines["ppo"]) == [] and stage_args(lines["sft"]) == []
    # a model profile goes to every stage, before the stage's own arguments
    lines = launches(make("rm", "MODEL=configs/models/x.yaml", "ARGS=--seed 1", dry_run=True).stdout)
    assert stage_args(lines["sft"]) == ["--model_config", "configs/models/x.yaml"]
    assert stage_args(lines["rm"]) == ["--model_config", "configs/models/x.yaml", "--seed", "1"]


def test_eval_depends_on_the_policies_the_run_has(tmp_path):
    """A run with a GRPO policy and no PPO: `make eval` brings GRPO up to date and trains no PPO; with none, PPO; on a
    fresh run, `make grpo eval` evaluates the GRPO policy it asked for and trains no PPO either."""
    assert list(launches(make("eval", dry_run=True, runs_dir=tmp_path).stdout)) == ["sft", "rm", "ppo", "eval"]
    assert list(launches(make("grpo", "eval", dry_run=True, runs_dir=tmp_path).stdout)) == ["sft", "rm", "grpo", "eval"]
    assert list(launches(make("ppo", "rloo", "eval", dry_run=True, runs_dir=tmp_path).stdout)) == [
        "sft", "rm", "ppo", "rloo", "eval"]
    for stage in ("grpo", "dpo"):
        (tmp_path / "t" / stage).mkdir(parents=True)
        (tmp_path / "t" / stage / "manifest.json").write_text("{}")
    assert list(launches(make("eval", dry_run=True, runs_dir=tmp_path).stdout)) == ["sft", "rm", "grpo", "dpo", "eval"]
    (tmp_path / "t" / "reinforce_pp").mkdir()
    (tmp_path / "t" / "reinforce_pp" / "manifest.json").write_text("{}")
    assert list(launches(make("eval", dry_run=True, runs_dir=tmp_path).stdout)) == [
        "sft", "rm", "grpo", "reinforce_pp", "dpo", "eval"]


def test_publish_brings_the_policy_it_publishes_up_to_date(tmp_path):
    """`make publish ARGS="--policy grpo"` on a run without GRPO trained SFT, the reward models, PPO and eval, and
    then refused (no grpo stage): the policy it names is brought up to date and evaluated, as a named stage is, in
    either form of the flag; without --policy, PPO. Mutant: the policy's flag not read."""
    for flags, rl in (("--policy grpo", "grpo"), ("--dry-run --policy=rloo", "rloo"), ("--dry-run", "ppo")):
        res = make("publish", f"ARGS={flags}", "REPO=me/x", dry_run=True, fake=False, runs_dir=tmp_path)
        assert res.returncode == 0, res.stderr
        assert list(launches(res.stdout)) == ["sft", "pairs", "rm", rl, "eval"], res.stdout


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_each_critic_free_estimator_has_a_target_with_its_own_config_and_args(estimator):
    """`make grpo|rloo|reinforce_pp`: the RL loop (stages.ppo) with configs/<estimator>.yaml, whose estimator is the
    target's (so the outputs land in runs/<RUN>/<estimator>/), and its own <ESTIMATOR>_ARGS variable."""
    from pipeline.config import read_yaml
    from tests.conftest import REPO

    var = f"{estimator.upper()}_ARGS=--total_updates 3"
    lines = launches(make(estimator, var, dry_run=True).stdout)
    assert list(lines) == ["sft", "rm", estimator]
    assert stage_args(lines[estimator]) == ["--total_updates", "3"]
    words = lines[estimator]
    assert words[words.index("-m") + 1].endswith(".ppo") and words[words.index("--config") + 1] == f"configs/{estimator}.yaml"
    assert read_yaml(REPO / "configs" / f"{estimator}.yaml")["advantage_estimator"] == estimator


def test_args_with_several_named_stages_is_refused():
    res = make("sft", "rm", "ARGS=--seed 1", dry_run=True)
    assert res.returncode != 0 and not launches(res.stdout)
    assert "RM_ARGS" in res.stderr and "sft rm" in res.stderr


def test_force_applies_to_the_named_stage():
    lines = launches(make("ppo", "FORCE=1", dry_run=True).stdout)
    assert lines["ppo"][0] == "--force" and "--force" not in lines["sft"] + lines["rm"]


def test_make_base_writes_its_record_into_the_run_it_is_given():
    """`make base RUN=mine` wrote runs/default/base/ whatever RUN and RUNS_DIR said."""
    out = make("base", "RUN=mine", "RUNS_DIR=/tmp/elsewhere", "ARGS=--max_steps 5", dry_run=True).stdout
    assert "-m stages.base --config configs/base.yaml --run mine --runs_dir /tmp/elsewhere --max_steps 5" in out, out


def test_force_in_args_passes_makes_check_of_the_stages_flags(capsys):
    """The launch takes --force from ARGS too (`make eval ARGS=--force`); make's check of every named stage's flags
    parsed it as a stage flag and stopped with "unknown command-line argument(s) ['--force']"."""
    from pipeline.launch import check_stages

    stage = ["::", "eval", "-m", "stages.eval", "--config", "configs/eval.yaml"]
    assert check_stages(stage + ["--force"]) == 0, capsys.readouterr().err
    assert check_stages(stage + ["--forc"]) == 2 and "unknown command-line argument(s) ['--forc']" in capsys.readouterr().err


# ---------------------------------------------------------------- a stage reruns when its inputs changed

def ran(runs_dir) -> list[str]:
    f = runs_dir / "t" / "ran.txt"
    out = f.read_text().split() if f.is_file() else []
    f.unlink(missing_ok=True)
    return out


def test_eval_of_a_dpo_only_run_trains_ppo_and_brings_the_reward_models_up_to_date(tmp_path):
    """eval scores every policy with the reward models, on the prompts an RL stage set aside: a run with DPO alone was
    evaluated with a stale reward model, or stopped for a missing one, and then stopped for want of held-out prompts
    (stages/eval_compare.py shared_heldout_prompts). `make dpo eval` on a fresh run does the same. A run with an RL
    policy beside DPO trains no PPO."""
    runs = tmp_path / "runs"
    assert make("dpo", runs_dir=runs).returncode == 0 and ran(runs) == ["sft", "dpo"]
    res = make("eval", runs_dir=runs)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ran(runs) == ["rm", "ppo", "eval"]
    fresh = tmp_path / "fresh"
    assert make("dpo", "eval", runs_dir=fresh).returncode == 0 and ran(fresh) == ["sft", "dpo", "rm", "ppo", "eval"]
    assert list(launches(make("dpo", "grpo", "eval", dry_run=True, runs_dir=tmp_path / "grpo").stdout)) == [
        "sft", "dpo", "rm", "grpo", "eval"]


def real_stages_parse(dry_run_out: str, *stages: str) -> int:
    """make's --check of STAGES (pipeline.launch.check_stages, all in one call as make runs it) on the real stage
    modules, with the arguments of the launch lines a `make -n` on the fake stages (tests/fake_stages/) wrote for them."""
    import shlex

    from pipeline.launch import check_stages

    lines, segments = dry_run_out.replace("\\\n", " ").splitlines(), []
    for stage in stages:
        words = shlex.split(next(line for line in lines if f"-m pipeline.launch {stage} " in line))
        module_at = words.index("-m", words.index("pipeline.launch")) + 1
        module = words[module_at].replace("tests.fake_stages.", "stages.")
        segments += ["::", stage, "-m", module, *words[module_at + 1 :]]
    return check_stages(segments)


def make_n_checked(*args, check=(), runs_dir=None, env=None) -> subprocess.CompletedProcess:
    """`make -n ARGS` on the fake stages (tests/fake_stages/: their --check imports nothing, where the real stages'
    took ~10 s a make), the story chain's labels step as a real run has it; then make's --check of the stages in
    `check` on the real stage modules, in this process, with the arguments of the launch lines make wrote (when make
    itself succeeded). Its lines are the Makefile's alone."""
    cmd = ["make", "--no-print-directory", "-o", ".venv/.done", "-n", *args, f"PY={PY}", "STAGE_PKG=tests.fake_stages"]
    if runs_dir:
        cmd += [f"RUNS_DIR={runs_dir}", "RUN=t"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    if res.returncode == 0 and check:
        assert real_stages_parse(res.stdout, *check) == 0, f"make's --check of {check} on the real stages failed (above)"
    return res


def test_own_preferences_skip_the_runs_pairs_and_simulated_labels(tmp_path):
    """`make rm ARGS="--dataset_name FILE"` (or RM_ARGS, and DPO alike) trains on the file, not the label export: the
    story chain's labels step (pairs sampled, simulated annotators, an export) would be work it never reads. Without
    the flag, or for another stage's flag, the step stays. Mutant: the labels step whatever the flags."""
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    runs = tmp_path / "runs"

    def labels_step(stage, *args):
        res = make_n_checked(stage, *args, check=[stage], runs_dir=runs)
        assert res.returncode == 0, res.stderr
        return "stages.label.fresh_export" in res.stdout

    assert labels_step("rm") and labels_step("dpo")
    assert not labels_step("rm", f"ARGS=--dataset_name {prefs}")
    assert not labels_step("rm", f"RM_ARGS=--dataset_name={prefs}")
    assert not labels_step("dpo", f"ARGS=--dataset_name {prefs}")
    assert labels_step("dpo", f"RM_ARGS=--dataset_name {prefs}")  # RM's own data: DPO still reads the run's labels
    # a mixture of your own files, or one that keeps the run's labels beside them
    assert not labels_step("rm", f"""RM_ARGS=--dataset_mixture '{{"{prefs}": {{"weight": 1}}}}'""")
    assert labels_step("rm", f"""RM_ARGS=--dataset_mixture '{{"{prefs}": {{"weight": 1}}, "label-export": {{}}}}'""")
    assert labels_step("dpo", "DPO_ARGS=--dataset_mixture '{}'")  # DPO's empty mixture: rm_config's, the labels' too


def test_a_run_named_again_in_args_is_the_one_make_checks(tmp_path):
    """`make sft ARGS="--run try2"`: the stage's parser takes the last --run (try2), `make`'s up-to-date check took
    the first (the default run's), so the stage ran every time."""
    from pipeline.run import _flag

    argv = ["--config", "c.yaml", "--run", "default", "--runs_dir", "runs", "--run", "try2"]
    assert _flag(argv, "--run", "x") == "try2" and _flag(argv, "--runs_dir", "x") == "runs"
    assert _flag(["--run=try3", "--runs_dir=elsewhere"], "--run", "x") == "try3"
    assert _flag(["--run=try3", "--runs_dir=elsewhere"], "--runs_dir", "x") == "elsewhere"
    assert _flag(["--run"], "--run", "x") == "x" and _flag(["--running", "y"], "--run", "x") == "x"
    runs = tmp_path / "runs"
    assert make("sft", "ARGS=--run try2", runs_dir=runs).returncode == 0 and ran(runs) == []  # ran in try2, not t
    res = make("sft", "ARGS=--run try2", runs_dir=runs)
    assert res.returncode == 0 and "up to date" in res.stdout and (runs / "try2" / "sft" / "manifest.json").is_file()


def test_label_export_rm_ppo_chain(tmp_path):
    runs = tmp_path / "runs"
    res = make("ppo", runs_dir=runs)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ran(runs) == ["sft", "rm", "ppo"]

    res = make("ppo", runs_dir=runs)  # nothing changed: all three skipped, each with one line
    assert res.returncode == 0 and ran(runs) == []
    assert [line.split(":")[0] for line in res.stdout.splitlines() if "up to date" in line] == ["sft", "rm", "ppo"]

    assert make("label-export", runs_dir=runs).returncode == 0 and ran(runs) == ["label-export"]
    res = make("rm", runs_dir=runs)  # a first label export appeared: the reward model retrains, SFT does not rerun
    assert ran(runs) == ["rm"] and "the label-export stage now exists" in res.stdout
    res = make("ppo", runs_dir=runs)  # ...and PPO, whose reward model changed
    assert ran(runs) == ["ppo"] and "the rm stage ran again" in res.stdout

    assert make("label-export", runs_dir=runs).returncode == 0 and ran(runs) == ["label-export"]  # new labels
    make("ppo", runs_dir=runs)  # one command retrains both
    assert ran(runs) == ["rm", "ppo"]

    make("ppo", "FORCE=1", runs_dir=runs)  # FORCE redoes the named stage only
    assert ran(runs) == ["ppo"]
    make("ppo", "ARGS=--force", runs_dir=runs)
    assert ran(runs) == ["ppo"]


def test_labels_export_again_when_the_pairs_or_the_store_changed_since_the_last_export(tmp_path):
    """The story chain's labels step: new pairs are simulated and exported; `make label` (people) or `make simulate
    SIMULATE_ARGS=...` after a finished chain, then `make rm`, exports the store again without simulating, so the
    reward model retrains on those labels; an unchanged run stays current, whatever its files' times."""
    import os
    import time

    from stages.label.store import LabelStore

    runs = tmp_path / "runs"
    assert make("pairs", runs_dir=runs).returncode == 0 and ran(runs) == ["sft", "pairs"]
    store = LabelStore(runs / "t" / "label" / "labels.sqlite")
    store.import_items([{"pair_id": p, "prompt": [{"role": "user", "content": p}], "responses": [f"{p} a", f"{p} b"]}
                        for p in ("p1", "p2")])
    store.save_label("sim:sentiment", "p1", "left", 0)
    res = make("labels", runs_dir=runs)  # no export yet: simulated, then exported
    assert res.returncode == 0 and ran(runs) == ["simulate", "label-export"], res.stdout + res.stderr
    now = time.time()
    for f in (runs / "t").rglob("*"):  # a copied run: every file's time is new, in any order; the pairs' newest
        os.utime(f, (now - 60, now - 60))
    os.utime(runs / "t" / "pairs" / "manifest.json", (now, now))
    res = make("labels", runs_dir=runs)
    assert res.returncode == 0 and ran(runs) == [] and "labels: up to date" in res.stdout, res.stdout + res.stderr

    # Simulate's settings: other SIMULATE_ARGS than it last ran with (or a `make simulate ARGS=...` before) are not
    # redrawn unasked (a redraw replaces every simulated label): one error line, nothing run. `make simulate` with them
    # draws them, and the chain then exports (it differs from it in --skip_if_people_labeled alone, which changes no
    # label); a file simulate read that changed redraws them through the chain
    label_config = tmp_path / "label.yaml"
    label_config.write_text((REPO / "configs" / "label.yaml").read_text())
    settings = f"SIMULATE_ARGS=--annotators 2 --label_config {label_config}"
    res = make("labels", settings, runs_dir=runs)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and ran(runs) == [] and len(errors) == 1, res.stdout + res.stderr
    assert errors[0].startswith("error: simulate ran with another command line than `make` would give it now (was: ")
    assert make("simulate", settings, runs_dir=runs).returncode == 0 and ran(runs) == ["simulate"]
    res = make("labels", settings, runs_dir=runs)  # (the fake simulate labels nothing; a real one's store is exported)
    assert ran(runs) == [] and "labels: up to date" in res.stdout, res.stdout + res.stderr
    label_config.write_text(label_config.read_text() + "# a comment\n")  # the same config: nothing drawn again
    res = make("labels", settings, runs_dir=runs)
    assert ran(runs) == [] and "labels: up to date" in res.stdout, res.stdout + res.stderr
    label_config.write_text(label_config.read_text().replace("concurrency_limit: 16", "concurrency_limit: 8"))
    res = make("labels", settings, runs_dir=runs)
    assert ran(runs) == ["simulate", "label-export"] and \
        f"labels: a file the simulated annotators read changed ({label_config} changed)" in res.stdout, res.stdout
    res = make("labels", settings, runs_dir=runs)
    assert ran(runs) == [] and "labels: up to date" in res.stdout, res.stdout + res.stderr

    for change in (lambda: store.save_label("alice", "p2", "right", 0),      # a person labels
                   lambda: store.save_label("alice", "p2", "left", 0),       # ... changes her mind
                   lambda: store.undo("alice"),                              # ... takes it back
                   lambda: store.save_simulated(["sim:sentiment"], [])):  # a simulate rerun drops an annotator
        change()
        res = make("labels", runs_dir=runs)
        assert res.returncode == 0 and ran(runs) == ["label-export"], res.stdout + res.stderr
        assert "the label store or the label config changed since the last export" in res.stdout
        res = make("labels", runs_dir=runs)
        assert ran(runs) == [] and "labels: up to date" in res.stdout

    assert make("pairs", "FORCE=1", runs_dir=runs).returncode == 0 and ran(runs) == ["pairs"]  # sampled again
    res = make("labels", runs_dir=runs)
    assert res.returncode == 0 and ran(runs) == ["simulate", "label-export"], res.stdout + res.stderr

    # a store that cannot be read: one error line, nothing exported
    for f in store.path.parent.glob("labels.sqlite-*"):
        f.unlink()
    store.path.write_bytes(b"garbage" * 100)
    res = make("labels", runs_dir=runs)
    assert res.returncode != 0 and ran(runs) == [] and "error: label store" in res.stderr, res.stdout + res.stderr


def test_label_with_a_pairs_dataset_samples_no_pairs(tmp_path):
    """`make label ARGS="--pairs_dataset FILE"` (eval's human_pairs.jsonl, or your own pairs) serves that file: it
    trains no SFT and samples no pairs first (README, *Did it help?* and *Human feedback*); plain `make label` serves
    the run's sampled pairs, so SFT and pairs come first."""
    own = tmp_path / "pairs.jsonl"
    own.write_text('{"pair_id": "a", "prompt": [{"role": "user", "content": "hi"}], "responses": ["x", "y"]}\n')
    res = make("label", f"ARGS=--pairs_dataset {own}", dry_run=True, fake=False, runs_dir=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert launches(res.stdout) == {} and f"-m stages.label --config configs/label.yaml" in res.stdout
    res = make("label", dry_run=True, fake=False, runs_dir=tmp_path)
    assert res.returncode == 0 and list(launches(res.stdout)) == ["sft", "pairs"], res.stdout + res.stderr


def test_labels_of_your_own_pairs_are_exported_and_no_pairs_are_sampled(tmp_path):
    """People labeled pairs of their own (`make label ARGS="--pairs_dataset FILE"`, which records FILE in
    label/own_pairs.txt) in a run with no pairs stage: the labels step sampled the bundled prompts' pairs, simulated
    their labels and exported those, so the reward model trained on the story's pairs, people's labels dropped as
    labels of earlier pairs. Now it exports the labels of that file's pairs (given to the export: eval's SFT-vs-PPO
    pairs labeled since are not among them) and samples nothing; once the run has sampled pairs, the step is the story
    chain's again."""
    from stages.label.store import LabelStore

    runs = tmp_path / "runs"
    store = LabelStore(runs / "t" / "label" / "labels.sqlite")
    store.import_items([{"pair_id": p, "prompt": [{"role": "user", "content": p}], "responses": [f"{p} a", f"{p} b"]}
                        for p in ("own1", "own2")])
    store.save_label("alice", "own1", "left", 0)
    own = tmp_path / "my pairs.jsonl"
    (runs / "t" / "label" / "own_pairs.txt").write_text(f"{own}\n")
    res = make_n_checked("rm", check=["rm"], runs_dir=runs)  # no pairs stage launched
    assert res.returncode == 0 and list(launches(res.stdout)) == ["sft", "rm"], res.stdout + res.stderr
    assert "stages.label.fresh_export" in res.stdout
    res = make("label", dry_run=True, fake=False, runs_dir=runs)  # people come back to label more: their pairs
    assert res.returncode == 0 and launches(res.stdout) == {} and "-m stages.label --config" in res.stdout, res.stdout
    res = make("labels", runs_dir=runs)
    assert res.returncode == 0 and ran(runs) == ["label-export"], res.stdout + res.stderr
    assert f"labels: exporting people's labels of your own pairs ({own}; no pairs are sampled)" in res.stdout
    argv = json.loads((runs / "t" / "label-export" / "manifest.json").read_text())["inputs"]["argv"]
    assert argv[argv.index("--pairs_dataset") + 1] == str(own)  # the file, its space kept
    res = make("labels", runs_dir=runs)
    assert res.returncode == 0 and ran(runs) == [] and "labels: up to date" in res.stdout, res.stdout + res.stderr
    store.save_label("alice", "own2", "right", 0)
    res = make("labels", runs_dir=runs)
    assert ran(runs) == ["label-export"] and "exporting people's labels of your own pairs" in res.stdout
    # no record (the run's labels are of pairs it sampled, or of none), or a run that has sampled pairs: the story
    # chain's step
    (runs / "t" / "label" / "own_pairs.txt").unlink()
    assert list(launches(make_n_checked("rm", check=["rm"], runs_dir=runs).stdout)) == ["sft", "pairs", "rm"]
    assert list(launches(make("label", dry_run=True, fake=False, runs_dir=runs).stdout)) == ["sft", "pairs"]
    (runs / "t" / "label" / "own_pairs.txt").write_text(f"{own}\n")
    assert make("pairs", runs_dir=runs).returncode == 0 and ran(runs) == ["sft", "pairs"]
    res = make("labels", runs_dir=runs)
    assert res.returncode == 0 and ran(runs) == ["simulate", "label-export"], res.stdout + res.stderr


def test_changed_data_file_or_command_line_reruns(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "prefs.jsonl"
    data.write_text('{"chosen": "a", "rejected": "b"}\n')
    make("rm", f"ARGS=--dataset_name {data}", runs_dir=runs)
    assert ran(runs) == ["sft", "rm"]
    make("rm", f"ARGS=--dataset_name {data}", runs_dir=runs)
    assert ran(runs) == []
    data.write_text('{"chosen": "a", "rejected": "c"}\n')  # the file it read changed
    res = make("rm", f"ARGS=--dataset_name {data}", runs_dir=runs)
    assert ran(runs) == ["rm"] and f"{data} changed" in res.stdout
    res = make("rm", runs_dir=runs)  # another command line
    assert ran(runs) == ["rm"] and "the command line changed" in res.stdout


def test_a_stage_reached_through_the_chain_keeps_its_last_flags(tmp_path):
    """`make rm ARGS="--dataset_name mine"`, then `make ppo`: rm is not named, so make does not retrain it on the config's
    data (the own-data run was lost that way): one error line, exit 2, nothing run. Named with its flags, or its own
    variable, it is up to date; a changed file of its still reruns it through the chain."""
    runs, data = tmp_path / "runs", tmp_path / "prefs.jsonl"
    data.write_text('{"chosen": "a", "rejected": "b"}\n')
    make("rm", f"ARGS=--dataset_name {data}", runs_dir=runs)
    assert ran(runs) == ["sft", "rm"]
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    res = make("ppo", runs_dir=runs)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert errors[0].startswith(f"error: rm ran with another command line than `make` would give it now (was: ")
    assert f"--dataset_name {data}" in errors[0] and "To retrain it with the flags given now, name it too (`make rm ..." \
        in errors[0] and "to keep it as it ran, give every `make` the flags it ran with (RM_ARGS=..." in errors[0]
    assert ran(runs) == [] and sorted(p.relative_to(runs) for p in runs.rglob("*")) == before
    make("ppo", f"RM_ARGS=--dataset_name {data}", runs_dir=runs)  # its own variable: rm is current, ppo runs
    assert ran(runs) == ["ppo"]
    data.write_text('{"chosen": "a", "rejected": "c"}\n')  # a file it read changed: rerun, through the chain too
    make("ppo", f"RM_ARGS=--dataset_name {data}", runs_dir=runs)
    assert ran(runs) == ["rm", "ppo"]
    res = make("rm", runs_dir=runs)  # named: another command line reruns it, as asked
    assert ran(runs) == ["rm"] and "the command line changed" in res.stdout


def test_a_stage_an_earlier_version_ran_is_not_retrained_through_the_chain(tmp_path):
    """A manifest of an earlier version records no inputs: through the chain (`make ppo` after an upgrade) SFT was
    retrained with today's default flags (its own data and step counts gone) and its old manifest deleted as it
    started. Now one error line, nothing run; named, it retrains."""
    runs = tmp_path / "runs"
    make("rm", runs_dir=runs)
    assert ran(runs) == ["sft", "rm"]
    manifest = runs / "t" / "sft" / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "inputs"}))
    before = {p.relative_to(runs): p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    res = make("ppo", runs_dir=runs)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and errors == [
        "error: sft's manifest was written by an earlier version of the pipeline and does not record the command line "
        "it ran with: it is not named here, so it is not retrained with the flags `make` would give it now; name it to "
        "retrain it (`make sft ...` with the flags you want; MODEL= and ARGS= too)"], res.stderr[-2000:]
    assert ran(runs) == [] and {p.relative_to(runs): p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before
    res = make("sft", runs_dir=runs)  # named: retrained, saying why
    assert ran(runs) == ["sft"] and "does not record its inputs" in res.stdout


@pytest.mark.slow  # two processes
def test_a_stage_killed_mid_run_keeps_its_flags_through_the_chain(tmp_path):
    """A run of rm with its own flags killed after its folder was prepared (its manifest gone): `make ppo` read "rm has
    not run yet" and retrained it with the config's flags. The killed run's command line is recorded (started.json)
    until its manifest is written: the chain refuses, and the same command line runs it again (it resumes)."""
    runs, data = tmp_path / "runs", tmp_path / "prefs.jsonl"
    data.write_text('{"chosen": "a", "rejected": "b"}\n')
    make("rm", f"ARGS=--dataset_name {data}", runs_dir=runs)
    res = make("rm", f"ARGS=--dataset_name {data} --crash_after_prepare", runs_dir=runs)
    assert res.returncode != 0 and (runs / "t/rm/started.json").is_file() and not (runs / "t/rm/manifest.json").exists()
    res = make("ppo", runs_dir=runs)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert errors[0].startswith("error: rm ran with another command line than `make` would give it now (was: ")
    assert "--crash_after_prepare, interrupted)" in errors[0] and ran(runs) == ["sft", "rm"]
    res = make("rm", runs_dir=runs)  # named: its last run, interrupted, had other flags
    assert res.returncode == 0 and "the command line changed" in res.stdout and "interrupted" in res.stdout
    assert not (runs / "t/rm/started.json").exists() and (runs / "t/rm/manifest.json").is_file()
    res = make("rm", "ARGS=--crash_after_prepare", runs_dir=runs)
    res = make("rm", "ARGS=--crash_after_prepare", runs_dir=runs)  # the same command line again: it runs (resumes)
    assert "rm: running, because its last run, with this command line, was interrupted" in res.stdout
    res = make("rm", "ARGS=--crash_after_prepare", "ACCELERATE_CONFIG=configs/accelerate/cpu2.yaml", runs_dir=runs)
    assert "rm: running, because the accelerate launch changed (was: --config_file configs/accelerate/cpu.yaml, " \
           "interrupted)" in res.stdout, res.stdout
    started = runs / "t/rm/started.json"
    for damaged in ("not json", '{"launch": []}', "[]"):  # an unreadable record: a run that did not finish
        started.write_text(damaged)
        res = make("rm", "ARGS=--crash_after_prepare", runs_dir=runs)
        assert "rm: running, because its last run did not finish" in res.stdout and "is_current" not in res.stderr, \
            res.stderr
    # a stage that records its command line last (eval), interrupted before: its folder holds what it kept
    (runs / "t" / "eval" / "sampled").mkdir(parents=True)
    assert is_current("eval", ["--run", "t", "--runs_dir", str(runs)]) == (False, "its last run did not finish")
    assert is_current("dpo", ["--run", "t", "--runs_dir", str(runs)]) == (False, "it has not run yet")


@pytest.mark.parametrize("form", ["flag value", "flag=value"])
def test_a_file_of_passwords_is_named_but_never_digested(form, tmp_path):
    """label-export recorded the users file's sha256 (of `alice:hunter2`) in its manifest and store record, beside the
    annotator names it exports: a dictionary attack away from the passwords. A users_file, on the command line, in the
    resolved config or in a YAML the stage read, is now left out of every digest; the YAML itself is still one."""
    users, label_yaml, runs = tmp_path / "users.txt", tmp_path / "label.yaml", tmp_path / "runs"
    users.write_text("alice:hunter2\n")
    label_yaml.write_text(f"users_file: {users}\n")
    stage = StageRun("label-export", "r", str(runs))
    flag = [f"--users_file={users}"] if form == "flag=value" else ["--users_file", str(users)]
    stage.argv = ["--config", str(label_yaml), "--run", "r", "--runs_dir", str(runs), *flag]
    config = {"label": {"users_file": str(users)}}
    stage.prepare(config)
    manifest = stage.finish({}, {}, config)
    assert str(label_yaml) in manifest["inputs"]["files"] and str(users) not in manifest["inputs"]["files"]
    written = "".join(f.read_text() for f in runs.rglob("*") if f.is_file())
    assert input_digest(label_yaml) in written and file_digest(users) not in written


def test_a_file_edited_while_the_stage_runs_is_recorded_as_it_was_read(tmp_path, capsys):
    """The digests are taken when the stage starts (prepare): a data file edited during training made the manifest
    record the new bytes, and `make` called the stage up to date."""
    runs, data = tmp_path / "runs", tmp_path / "d.jsonl"
    data.write_text("x\n")
    stage = StageRun("rm", "r", str(runs))
    stage.argv = ["--run", "r", "--runs_dir", str(runs), "--dataset_name", str(data)]
    stage.prepare({})
    data.write_text("y\n")  # edited mid-run
    manifest = stage.finish({}, {}, {})
    assert manifest["inputs"]["files"] == {str(data): file_digest_of(b"x\n", tmp_path)}
    assert is_current("rm", stage.argv) == (False, f"{data} changed")
    assert f"note: {data} changed while the rm stage ran" in capsys.readouterr().err
    stage.prepare({})  # run again: nothing edited during it, current
    stage.finish({}, {}, {})
    assert is_current("rm", stage.argv) == (True, "")


def test_a_file_the_command_line_names_is_recorded_as_it_was_when_the_stage_started(tmp_path, monkeypatch):
    """eval reads its YAML, samples and scores for a minute, and only then prepares its folder: a YAML edited in that
    minute was recorded with its new bytes, and `make eval` called the old report up to date."""
    runs, cfg = tmp_path / "runs", tmp_path / "eval.yaml"
    cfg.write_text("max_prompts: 8\n")
    argv = ["--config", str(cfg), "--run", "r", "--runs_dir", str(runs)]
    monkeypatch.setattr(sys, "argv", ["stages.eval", *argv])
    stage = StageRun("eval", "r", str(runs))  # the stage starts
    cfg.write_text("max_prompts: 16\n")  # edited while it samples, before prepare
    stage.prepare({})
    manifest = stage.finish({}, {}, {})
    assert manifest["inputs"]["files"][str(cfg)] == file_digest_of(b"max_prompts: 8\n", tmp_path, ".yaml")
    assert is_current("eval", argv) == (False, f"{cfg} changed")


def file_digest_of(content: bytes, tmp_path, suffix: str = "") -> str:
    path = tmp_path / f"digest_of{suffix}"
    path.write_bytes(content)
    return input_digest(path)


def test_a_yamls_comments_and_spacing_are_not_a_change_its_values_are(tmp_path):
    """A comment, quoting or spacing edited in a stage's YAML retrained the stage (its bytes were digested); its
    values, their types and the order of its keys and items are what the stage reads, and each still reruns it."""
    runs, cfg = tmp_path / "runs", tmp_path / "rm.yaml"
    cfg.write_text("learning_rate: 1.0e-4\nsources: {a.jsonl: 1, b.jsonl: 2}\nseed: 1\n")
    stage = StageRun("rm", "r", str(runs))
    stage.argv = ["--config", str(cfg), "--run", "r", "--runs_dir", str(runs)]
    stage.prepare({})
    stage.finish({}, {}, {})
    assert is_current("rm", stage.argv) == (True, "")
    same = ["# tuned\nlearning_rate: 0.0001   # from the paper\n\nsources:\n  a.jsonl: 1\n  b.jsonl: 2\nseed: 1\n",
            "learning_rate: 1.0e-4\nsources: {'a.jsonl': 1, \"b.jsonl\": 2}\nseed: 1"]
    for text in same:
        cfg.write_text(text)
        assert is_current("rm", stage.argv) == (True, ""), text
    changed = ["learning_rate: 2.0e-4\nsources: {a.jsonl: 1, b.jsonl: 2}\nseed: 1\n",
               "learning_rate: 1.0e-4\nsources: {b.jsonl: 2, a.jsonl: 1}\nseed: 1\n",  # the sources' order
               "learning_rate: 1.0e-4\nsources: {a.jsonl: 1, b.jsonl: 2}\nseed: '1'\n",  # a string, not a number
               "learning_rate: 1.0e-4\nsources: {a.jsonl: 1, b.jsonl: 2}\nseed: 1.0\n",
               "learning_rate: 1.0e-4\nsources: {a.jsonl: 1, b.jsonl: 2}\n"]
    for text in changed:
        cfg.write_text(text)
        assert is_current("rm", stage.argv) == (False, f"{cfg} changed"), text


def test_a_yaml_that_does_not_parse_and_other_files_are_digested_by_their_bytes(tmp_path):
    broken, data = tmp_path / "broken.yaml", tmp_path / "d.jsonl"
    broken.write_text("a: [1, 2\n")
    data.write_text('{"a": 1}\n')
    assert input_digest(broken) == file_digest(broken) and input_digest(data) == file_digest(data)
    assert input_digest(tmp_path / "gone.yaml") is None
    assert file_digest_of(b"a: 1\n", tmp_path, ".yml") == file_digest_of(b"a: 1  # one\n", tmp_path, ".yml")
    assert file_digest_of(b"a: 1\n", tmp_path, ".txt") != file_digest_of(b"a: 1  # one\n", tmp_path, ".txt")


def test_a_yaml_the_stage_would_refuse_or_that_reprs_by_chance_is_digested_by_its_bytes(tmp_path):
    """A key given twice is refused by the stage's loader (pipeline.config.UniqueKeyLoader), but safe_load keeps the
    last: a line added above the same key was "up to date" instead of the stage's error. A !!set's repr follows string
    hashing, which differs between processes: every `make` called the stage out of date."""
    runs, cfg = tmp_path / "runs", tmp_path / "rm.yaml"
    cfg.write_text("learning_rate: 1.0e-4\nseed: 1\n")
    stage = StageRun("rm", "r", str(runs))
    stage.argv = ["--config", str(cfg), "--run", "r", "--runs_dir", str(runs)]
    stage.prepare({})
    stage.finish({}, {}, {})
    cfg.write_text("learning_rate: 1.0e-3\nlearning_rate: 1.0e-4\nseed: 1\n")
    assert is_current("rm", stage.argv) == (False, f"{cfg} changed")
    assert input_digest(cfg) == file_digest(cfg)
    tags = tmp_path / "tags.yaml"
    tags.write_text("tags: !!set {alpha, beta, gamma, delta, epsilon}\n")
    code = f"from pathlib import Path; from pipeline.run import input_digest; print(input_digest(Path({str(tags)!r})))"
    seen = {subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(4)}
    assert len(seen) == 1, seen
    assert file_digest_of(b"t: !!set {a, b}\n", tmp_path, ".yaml") != file_digest_of(b"t: [a, b]\n", tmp_path, ".yaml")


def test_a_manifest_that_recorded_a_yamls_bytes_is_current_while_they_are_the_same(tmp_path):
    """Manifests of earlier versions digested every file's bytes: an upgrade must not retrain every stage of a run."""
    runs, cfg = tmp_path / "runs", tmp_path / "sft.yaml"
    cfg.write_text("max_steps: 5  # short\n")
    stage = StageRun("sft", "r", str(runs))
    stage.argv = ["--config", str(cfg), "--run", "r", "--runs_dir", str(runs)]
    stage.prepare({})
    manifest = stage.finish({}, {}, {})
    assert manifest["inputs"]["files"][str(cfg)] == input_digest(cfg) != file_digest(cfg)
    manifest["inputs"]["files"][str(cfg)] = file_digest(cfg)  # as an earlier version wrote it
    stage.manifest_path.write_text(json.dumps(manifest))
    assert is_current("sft", stage.argv) == (True, "")
    cfg.write_text("max_steps: 5\n")  # the comment gone: other bytes, which that manifest cannot tell from a change
    assert is_current("sft", stage.argv) == (False, f"{cfg} changed")


def test_is_current_records(tmp_path, monkeypatch):
    """The recorded inputs, hand-checked: argv, file digests (not the stage's own folder), upstream digests."""
    runs, data = tmp_path / "runs", tmp_path / "d.jsonl"
    data.write_text("x\n")
    sft = StageRun("sft", "r", str(runs))
    sft.argv = ["--run", "r", "--runs_dir", str(runs)]
    sft.prepare({})
    sft_manifest = sft.finish({}, {}, {})
    rm = StageRun("rm", "r", str(runs))
    rm.argv = ["--run", "r", "--runs_dir", str(runs), "--dataset_name", str(data)]
    rm.need("sft")
    rm.may_read("label-export")
    rm.prepare({})
    manifest = rm.finish({}, {}, {"train": {"output_dir": str(rm.dir / "trainer")}, "data": {str(data): 1}})
    assert manifest["inputs"] == {"argv": rm.argv, "launch": None, "files": {str(data): file_digest(data)},
                                  "manifests": {"label-export": None, "sft": manifest_digest(sft_manifest)}}
    assert is_current("rm", rm.argv) == (True, "")
    assert is_current("rm", rm.argv + ["--seed", "2"])[0] is False
    assert is_current("rm", ["--run", "other", "--runs_dir", str(runs)]) == (False, "it has not run yet")
    data.write_text("y\n")
    assert is_current("rm", rm.argv) == (False, f"{data} changed")
    data.write_text("x\n")
    assert is_current("rm", rm.argv) == (True, "")
    kept = sft.manifest_path.read_text()  # a damaged upstream manifest: not current (the stage then says which file)
    sft.manifest_path.write_text("{cut off")
    assert is_current("rm", rm.argv) == (False, f"{sft.manifest_path} is not valid JSON")
    sft.manifest_path.write_text(kept)
    export = StageRun("label-export", "r", str(runs))
    export.prepare({})
    export.finish({}, {}, {})
    assert is_current("rm", rm.argv) == (False, "the label-export stage now exists")
    # a launch by make is another launch than none; a manifest from before launches were recorded is taken as current
    assert is_current("sft", sft.argv, ["--config_file", "c.yaml"]) == (False, "the accelerate launch changed (was: none)")
    older = json.loads(sft.manifest_path.read_text())
    del older["inputs"]["launch"]
    sft.manifest_path.write_text(json.dumps(older))
    assert is_current("sft", sft.argv, ["--config_file", "c.yaml"]) == (True, "")
    # rm's recorded inputs: a manifest written before inputs were recorded is not current (and no crash reading it);
    # an upstream stage deleted since is named as gone, not as new
    export.manifest_path.unlink()
    sft.manifest_path.unlink()
    assert is_current("rm", rm.argv) == (False, "the sft stage is gone")
    without = json.loads(rm.manifest_path.read_text())
    del without["inputs"]
    rm.manifest_path.write_text(json.dumps(without))
    assert is_current("rm", rm.argv) == (False, "its manifest does not record its inputs (written by an older version)")


def test_the_code_a_stage_ran_is_recorded_as_it_was_when_the_stage_prepared(tmp_path, monkeypatch):
    """A module edited while the stage trains (a branch checked out, an upgrade pulled) is recorded with the digest it
    had at prepare(), when it was imported and ran, so that `make` notes the change; a module first imported after
    prepare() is digested at finish(). Digests faked by hand."""
    import pipeline.run as run

    stage = StageRun("sft", "r", str(tmp_path / "runs"))
    stage.argv = ["--run", "r", "--runs_dir", str(tmp_path / "runs")]
    monkeypatch.setattr(run, "code_digests", lambda: {"pipeline/a.py": "as-run"})
    stage.prepare({})
    monkeypatch.setattr(run, "code_digests", lambda: {"pipeline/a.py": "edited", "stages/late.py": "late"})
    assert stage.finish({}, {}, {})["code"] == {"pipeline/a.py": "as-run", "stages/late.py": "late"}


def test_the_manifests_commit_says_when_the_working_tree_was_edited(monkeypatch):
    """git_commit: HEAD's hash, with "-dirty" when tracked files differ from it (the outputs came from code that no
    commit holds); None outside a git checkout. By hand, with git's two answers faked."""
    import pipeline.run as run

    def fake_git(status: str, rc: int = 0):
        def fake_run(cmd, **kw):
            out = "abc123\n" if cmd[1] == "rev-parse" else status
            return subprocess.CompletedProcess(cmd, rc, stdout=out, stderr="")
        return fake_run

    monkeypatch.setattr(run.subprocess, "run", fake_git(" M pipeline/run.py\n"))
    assert run.git_commit() == "abc123-dirty"
    monkeypatch.setattr(run.subprocess, "run", fake_git(""))
    assert run.git_commit() == "abc123"
    monkeypatch.setattr(run.subprocess, "run", fake_git("", rc=128))  # not a git checkout
    assert run.git_commit() is None


def test_a_stage_whose_code_changed_since_it_ran_is_kept_with_a_note(tmp_path):
    """The manifest records the digest of every module of the project the stage imported. `make` does not redo an
    up-to-date stage for a code change (an upgrade's refactor is not worth a base retrained for hours), but says so
    beside its "up to date" line, naming the files; FORCE=1 redoes it, and the note goes."""
    runs = tmp_path / "runs"
    assert make("sft", runs_dir=runs).returncode == 0 and ran(runs) == ["sft"]
    path = runs / "t" / "sft" / "manifest.json"
    code = json.loads(path.read_text())["code"]
    assert {"pipeline/run.py", "pipeline/config.py"} <= set(code)  # what the (fake) stage ran: pipeline's modules
    assert all(name.startswith(("pipeline/", "stages/")) for name in code)  # not the tests', not .venv's
    assert all(digest == file_digest(REPO / name) for name, digest in code.items())
    res = make("sft", runs_dir=runs)
    assert ran(runs) == [] and "sft: up to date" in res.stdout and "note:" not in res.stderr
    older = json.loads(path.read_text())  # as if made by an older version of two of its files
    older["code"].update({"pipeline/run.py": "0" * 64, "pipeline/config.py": "1" * 64})
    path.write_text(json.dumps(older))
    res = make("sft", runs_dir=runs)
    assert res.returncode == 0 and ran(runs) == [] and "sft: up to date" in res.stdout
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: the pipeline's code changed since sft ran (pipeline/config.py, pipeline/run.py): its "
                     "outputs are from the old code; `make` does not redo a stage for a code change; FORCE=1 does"]
    res = make("sft", "FORCE=1", runs_dir=runs)
    assert ran(runs) == ["sft"] and json.loads(path.read_text())["code"] == code
    assert "note:" not in make("sft", runs_dir=runs).stderr


def test_an_up_to_date_stage_says_what_the_batches_of_an_unfinished_run_beside_it_are(tmp_path):
    """`make eval FORCE=1` (or `make pairs`) killed on a finished run leaves its kept batches (sampled/) beside the
    finished outputs, whose manifest is still current: the next `make eval` said "up to date" and nothing of them. It
    now says what they are and what to do; a run folder without them gets no note."""
    runs = tmp_path / "runs"
    assert make("pairs", runs_dir=runs).returncode == 0 and ran(runs) == ["sft", "pairs"]
    res = make("pairs", runs_dir=runs)
    assert "pairs: up to date" in res.stdout and "note:" not in res.stderr
    kept = runs / "t" / "pairs" / "sampled"
    kept.mkdir()
    (kept / "batch-000000.pt").write_bytes(b"")  # as a killed rerun kept it
    res = make("pairs", runs_dir=runs)
    assert res.returncode == 0 and ran(runs) == [] and "pairs: up to date" in res.stdout
    assert [line for line in res.stderr.splitlines() if line.startswith("note:")] == [
        f"note: {kept} holds the batches of a later run of pairs that did not finish: the outputs here are the last "
        "finished run's; `make pairs FORCE=1` continues that run if it had this command line and inputs (else starts "
        "over), or delete the folder"]


@pytest.mark.slow  # two processes
def test_a_chained_stage_is_kept_under_another_launch_and_a_named_one_reruns(tmp_path):
    """`make ppo ACCELERATE_CONFIG=cpu2.yaml` on a finished run retrained SFT and the reward model under two processes
    (and sampled the pairs again, making people's labels an earlier run's): a stage reached only through the chain is
    kept as it ran, with one line saying so, unless something else changed (a file it read) or it did not finish."""
    runs = tmp_path / "runs"
    stages_ran = lambda: list(dict.fromkeys(ran(runs)))  # noqa: E731  (under cpu2.yaml each fake stage writes twice)
    assert make("ppo", runs_dir=runs).returncode == 0 and ran(runs) == ["sft", "rm", "ppo"]
    two = "ACCELERATE_CONFIG=configs/accelerate/cpu2.yaml"
    res = make("ppo", two, runs_dir=runs)
    assert res.returncode == 0 and stages_ran() == ["ppo"], res.stdout + res.stderr
    for stage in ("sft", "rm"):
        assert (f"{stage}: up to date, kept (it ran under another accelerate launch, --config_file "
                f"configs/accelerate/cpu.yaml; not named here, so not retrained under this one") in res.stdout
    assert "ppo: running, because the accelerate launch changed" in res.stdout
    res = make("rm", "ppo", two, runs_dir=runs)  # named: retrained under it, and PPO after it
    assert res.returncode == 0 and stages_ran() == ["rm", "ppo"] and "sft: up to date, kept" in res.stdout
    res = make("ppo", runs_dir=runs)  # back to one process: the chained reward model kept as it ran under two
    assert ran(runs) == ["ppo"] and "rm: up to date, kept (it ran under another accelerate launch, --config_file " \
        "configs/accelerate/cpu2.yaml" in res.stdout
    # a file it read changed: it reruns, under this launch
    config = tmp_path / "sft.yaml"
    config.write_text((REPO / "configs/sft.yaml").read_text())
    assert make("sft", f"ARGS=--config {config}", runs_dir=runs).returncode == 0 and ran(runs) == ["sft"]
    config.write_text(config.read_text() + "\n# a comment\n")  # the same config: SFT kept (the rest: after it)
    res = make("ppo", two, f"SFT_ARGS=--config {config}", runs_dir=runs)
    assert stages_ran() == ["rm", "ppo"] and "sft: up to date, kept" in res.stdout, res.stdout
    config.write_text(config.read_text().replace("seed: 42", "seed: 43"))
    res = make("ppo", two, f"SFT_ARGS=--config {config}", runs_dir=runs)
    assert stages_ran() == ["sft", "rm", "ppo"] and "sft: running, because the accelerate launch changed" in res.stdout, \
        (res.returncode, res.stdout[-3000:], res.stderr[-3000:])  # failed once under the suite's load: say why next time


def test_another_accelerate_config_reruns_and_its_file_is_an_input(tmp_path):
    """Processes, sharding and precision change what a stage computes: the launch arguments and the accelerate config
    file's bytes are inputs like the stage's own (through real make and pipeline.launch, on a fake stage)."""
    runs, acc = tmp_path / "runs", tmp_path / "acc.yaml"
    acc.write_text((REPO / "configs/accelerate/cpu.yaml").read_text())
    make("sft", runs_dir=runs)
    assert ran(runs) == ["sft"]
    res = make("sft", f"ACCELERATE_CONFIG={acc}", runs_dir=runs)
    assert ran(runs) == ["sft"] and "the accelerate launch changed (was: --config_file configs/accelerate/cpu.yaml)" \
        in res.stdout
    make("sft", f"ACCELERATE_CONFIG={acc}", runs_dir=runs)
    assert ran(runs) == []
    acc.write_text(yaml_with(acc.read_text(), "mixed_precision: 'no'\n"))
    res = make("sft", f"ACCELERATE_CONFIG={acc}", runs_dir=runs)
    assert ran(runs) == ["sft"] and f"{acc} changed" in res.stdout


def test_a_variant_configs_base_config_is_an_input(tmp_path, monkeypatch):
    """grpo.yaml and friends take most keys from ppo.yaml (`base_config:`): an edit there makes the variant stale."""
    runs, base, variant = tmp_path / "runs", tmp_path / "base.yaml", tmp_path / "variant.yaml"
    base.write_text("learning_rate: 0.001\n")
    variant.write_text(f"base_config: {base}\nseed: 3\n")
    stage = StageRun("grpo", "r", str(runs))
    stage.argv = ["--config", str(variant), "--run", "r", "--runs_dir", str(runs)]
    stage.prepare({})
    manifest = stage.finish({}, {}, {})
    assert set(manifest["inputs"]["files"]) == {str(variant), str(base)}
    assert is_current("grpo", stage.argv) == (True, "")
    base.write_text("learning_rate: 0.05\n")
    assert is_current("grpo", stage.argv) == (False, f"{base} changed")


def test_what_your_own_data_and_model_replace_is_not_an_input(tmp_path):
    """SFT on your own data (--dataset_name) recorded the bundled mixture its YAML names as an input, and the YAML's
    model profile beside MODEL=: editing data/story/sft.jsonl reran SFT, then the pairs, the labels step and the
    reward model, which could make people's labels an earlier run's. A stage's inputs are what its resolved config
    names (the --config file itself, and a variant's base_config, not the values it holds that the command line
    replaced) and nothing it set aside (not_inputs). Mutants: the --config file read for more; not_inputs ignored."""
    runs, ours, bundled, mine, data = (tmp_path / n for n in ("runs", "ours.yaml", "bundled.jsonl", "mine.yaml",
                                                               "mine.jsonl"))
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    for f in (bundled, data):
        f.write_text("{}\n")
    ours.write_text(f"name_or_path: {base}\n")
    mine.write_text(f"name_or_path: {base}\n")
    config_yaml = tmp_path / "sft.yaml"
    config_yaml.write_text(f"model_config: {ours}\ndataset_mixture: {{{bundled}: 0}}\n")
    stage = StageRun("sft", "r", str(runs))
    stage.argv = ["--config", str(config_yaml), "--run", "r", "--runs_dir", str(runs), "--model_config", str(mine),
                  "--dataset_name", str(data)]
    config = {"run": {"model_config": str(mine)}, "sft": {"dataset_name": str(data), "dataset_mixture": {str(bundled): 0}}}
    stage.not_inputs({str(bundled): 0}, str(data))
    stage.prepare(config)
    manifest = stage.finish({}, {}, config)
    assert set(manifest["inputs"]["files"]) == {str(config_yaml), str(mine), str(base), str(data)}
    bundled.write_text("{}\n{}\n")
    ours.write_text(f"name_or_path: {base}\ndtype: bfloat16\n")
    assert is_current("sft", stage.argv) == (True, "")
    data.write_text("{}\n{}\n")
    assert is_current("sft", stage.argv) == (False, f"{data} changed")
    # --dataset_name one of the mixture's own files (named another way): the file read stays an input
    again = StageRun("sft", "r2", str(runs))
    again.not_inputs({str(bundled): 0, str(data): 0}, os.path.relpath(data, REPO))
    assert again._named([config]) == sorted({str(mine), str(base), str(data)})


def test_the_base_checkpoint_a_profile_names_and_a_judges_reward_model_are_inputs(tmp_path):
    """A stage reads the base checkpoint through the model profile (`make base` writes new weights to the same folder)
    and a gold judge's reward model through `rm:<dir>`: new bytes in either make the stage stale, like its own files."""
    runs, base, judge, template = tmp_path / "runs", tmp_path / "base", tmp_path / "judge", tmp_path / "chat.jinja"
    base.mkdir(), judge.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    (judge / "adapter_model.safetensors").write_bytes(b"reward")
    template.write_text("{{ messages }}")
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"name_or_path: {base}\nchat_template: {template}\n")
    stage = StageRun("eval", "r", str(runs))
    stage.argv = ["--run", "r", "--runs_dir", str(runs)]
    config = {"run": {"model_config": str(profile)}, "eval": {"gold_judge": f"rm:{judge}"}}
    stage.prepare(config)
    manifest = stage.finish({}, {}, config)
    assert set(manifest["inputs"]["files"]) == {str(profile), str(base), str(template), str(judge)}
    assert is_current("eval", stage.argv) == (True, "")
    for changed in (base / "model.safetensors", judge / "adapter_model.safetensors", template):
        before = changed.read_bytes()
        changed.write_bytes(before + b"!")
        assert is_current("eval", stage.argv) == (False, f"{changed.parent if changed != template else changed} changed")
        changed.write_bytes(before)
        assert is_current("eval", stage.argv) == (True, "")


def test_a_function_judges_module_is_an_input(tmp_path, monkeypatch):
    """`--gold_judge myjudge:score` (your own function, on PYTHONPATH): editing it left `make eval` up to date, its
    report the old function's. Its module's source file is an input, found as import finds it; another module's
    change does not touch the stage."""
    runs, code = tmp_path / "runs", tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "__init__.py").write_text("")
    judge = code / "pkg" / "myjudge.py"
    judge.write_text("def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    other = code / "pkg" / "other.py"
    other.write_text("")
    monkeypatch.syspath_prepend(str(code))
    stage = StageRun("eval", "r", str(runs))
    stage.argv = ["--run", "r", "--runs_dir", str(runs), "--gold_judge", "pkg.myjudge:score"]
    config = {"eval": {"gold_judge": "pkg.myjudge:score"}}
    stage.prepare(config)
    manifest = stage.finish({}, {}, config)
    assert set(manifest["inputs"]["files"]) == {str(judge.resolve())}
    assert is_current("eval", stage.argv) == (True, "")
    other.write_text("x = 1\n")
    assert is_current("eval", stage.argv) == (True, "")
    judge.write_text(judge.read_text().replace("0.0", "1.0"))
    assert is_current("eval", stage.argv) == (False, f"{judge.resolve()} changed")


# ---------------------------------------------------------------- one clear line on failure

def test_bad_input_gives_one_line_through_make(tmp_path):
    """The real SFT stage, an empty data file (past the flag check, which finds only missing ones): its error line and
    make's one-line failure, no launcher traceback. A misspelled flag stops in the check before it, with one line too."""
    res = make("sft", "ARGS=--learnin_rate 1e-4", fake=False, runs_dir=tmp_path / "runs")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1 and "--learning_rate" in errors[0], res.stderr
    (tmp_path / "empty.jsonl").write_text("")
    res = make("sft", f"ARGS=--dataset_name {tmp_path / 'empty.jsonl'}", fake=False, runs_dir=tmp_path / "runs")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "CalledProcessError" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "empty.jsonl" in errors[0] and "is empty" in errors[0], errors
    # make[1]: under `make test` (CI) this make runs nested
    assert re.search(r"make(\[\d+\])?: \*\*\* \[Makefile:\d+: sft\] Error 2", res.stderr.strip().splitlines()[-1])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("variables,words", [
    (["RECIPE=bogus"], ["RECIPE=bogus: no configs in configs/recipes/bogus", "use story or one of: assistant"]),
    (["rm", "ARGS=--x 1"], ['ARGS="--x 1" would go to every one of sft rm', "RM_ARGS, PPO_ARGS"]),
    (["ACCELERATE_CONFIG=/nonexistent/acc.yaml"], ["ACCELERATE_CONFIG=/nonexistent/acc.yaml does not exist",
                                                   "configs/accelerate/cpu.yaml"]),
    (["publish", "REPO=not a repo"], ["REPO=not a repo is not one word: give the Hub repo id as user/name"]),
    (["publish", "REPO=me/x --private"], ["REPO=me/x --private is not one word: give the Hub repo id as user/name"]),
])
def test_bad_make_variables_give_one_error_line_and_exit_2(variables, words, tmp_path):
    res = make("sft", *variables, runs_dir=tmp_path / "runs")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert all(w in errors[0] for w in words), errors[0]
    assert not (tmp_path / "runs").exists()


ACCELERATE_HEAD = "compute_environment: LOCAL_MACHINE\nuse_cpu: true\n"


def test_a_multi_cpu_config_of_one_process_is_not_refused(tmp_path):
    """MULTI_CPU without mpirun runs ONE process: refused only where the file asks for more (it would run fewer than it
    says); one process is what it runs."""
    from pipeline.launch import accelerate_config_problem

    acc = tmp_path / "acc.yaml"
    acc.write_text(ACCELERATE_HEAD + "distributed_type: MULTI_CPU\nnum_processes: 1\nmixed_precision: 'no'\n")
    assert accelerate_config_problem(acc) is None


def test_the_stages_own_folder_and_the_folders_around_it_are_not_inputs(tmp_path):
    """A config names the stage's own folder (output_dir), the runs folder around it and files inside it: none is an
    input (the stage writes them: recorded, they made every `make` rerun it); a data file beside them is one."""
    from pipeline.run import paths_named_in

    own = tmp_path / "runs" / "r" / "sft"
    (own / "ckpt").mkdir(parents=True)
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    named = {"output_dir": str(own), "runs_dir": str(tmp_path / "runs"), "resume": str(own / "ckpt"), "data": str(data)}
    assert paths_named_in(named, own.resolve()) == {str(data)}


def test_a_bare_folder_name_given_as_data_or_weights_is_an_input(tmp_path, monkeypatch):
    """`--dataset_name mydata` reads the folder ./mydata (pipeline.data.load_any), but a name without '/' or a suffix
    was not recorded: after editing its files `make sft` said "up to date". A bare word is an input as the value of a
    setting that names data or weights (either spelling of the flag, or a config key); elsewhere ("data") it is not."""
    from pipeline.run import paths_named_in

    monkeypatch.setattr("pipeline.config.REPO_ROOT", tmp_path)  # bare names resolve from the repository root
    for name in ("mydata", "myadapter", "data"):
        (tmp_path / name).mkdir()
    own = (tmp_path / "runs" / "r" / "sft").resolve()
    assert paths_named_in(["--dataset_name", "mydata", "--seed", "data"], own) == {"mydata"}
    assert paths_named_in(["--sft_adapter=myadapter", "--note", "mydata"], own) == {"myadapter"}
    assert paths_named_in({"sft": {"prompts_file": "mydata", "other": "data"}, "model": {"name_or_path": "nowhere"}},
                          own) == {"mydata"}
    # a dataset_mixture names its files as keys ({"file": rows}): editing one makes the stage out of date
    (tmp_path / "part.jsonl").write_text("{}\n")
    assert paths_named_in({"sft": {"dataset_mixture": {str(tmp_path / "part.jsonl"): 10}}}, own) == \
        {str(tmp_path / "part.jsonl")}


def test_fsdp_on_all_the_gpus_of_a_one_gpu_machine_is_refused():
    """configs/accelerate/fsdp.yaml asks for every GPU: on a machine with one, the launch starts one process, which has
    nothing to shard over (the file's own num_processes is 8)."""
    from pipeline.launch import accelerate_config_problem, processes_for_all_gpus

    launched = processes_for_all_gpus("configs/accelerate/fsdp.yaml", count_gpus=lambda: 1)
    assert launched == ["--num_processes", "1"]
    assert accelerate_config_problem("configs/accelerate/fsdp.yaml", 1).startswith(
        "has distributed_type: FSDP with all the GPUs of a machine that has one, and one process has nothing to shard")
    assert accelerate_config_problem("configs/accelerate/fsdp.yaml", 2) is None
    assert accelerate_config_problem("configs/accelerate/fsdp.yaml") is None


@pytest.mark.parametrize("text,problem", [
    ("foo: [1, 2\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence) "
                     "at line 2, column 1"),
    (ACCELERATE_HEAD + "distributed_type: BOGUS\nnum_processes: 1\n",
     "is not an accelerate config: 'BOGUS' is not a valid DistributedType"),
    (ACCELERATE_HEAD + "distributed_type: 'NO'\nnum_processes: 1\nbogus_key: 1\n",
     "is not an accelerate config: The config file at"),
    (ACCELERATE_HEAD + "distributed_type: 'NO'\nnum_processes: two\n", "has num_processes: 'two', not a whole number"),
    (ACCELERATE_HEAD + "distributed_type: 'NO'\nnum_processes: 1\ndebug: maybe\n", "has debug: 'maybe', not true or false"),
    (ACCELERATE_HEAD + "distributed_type: 'NO'\nnum_processes: 1\nmixed_precision: bf32\n",
     "has mixed_precision: 'bf32': give no, bf16, fp16 or fp8"),
    # `accelerate config` on a CPU writes MULTI_CPU: without mpirun accelerate started ONE process, with no word of it
    (ACCELERATE_HEAD + "distributed_type: MULTI_CPU\nnum_processes: 2\nmixed_precision: 'no'\n",
     "has distributed_type: MULTI_CPU with num_processes: 2, which accelerate runs as ONE process without mpirun"),
    # FSDP over one process: the stages ran unsharded (the manifest's engine 'none'), with no word of it
    ("compute_environment: LOCAL_MACHINE\nuse_cpu: false\ndistributed_type: FSDP\nnum_processes: 1\n"
     "mixed_precision: 'no'\nfsdp_config:\n  fsdp_version: 2\n",
     "has distributed_type: FSDP with num_processes: 1, and one process has nothing to shard the base over"),
    # 0: make's thread count divided by it (empty OMP_NUM_THREADS, accelerate's traceback); -2 ran as one process
    (ACCELERATE_HEAD + "distributed_type: MULTI_GPU\nnum_processes: 0\n", "has num_processes: 0: give 1 or more"),
    (ACCELERATE_HEAD + "distributed_type: 'NO'\nnum_processes: -2\n", "has num_processes: -2: give 1 or more"),
    # FSDP settings the stages' own sharding does not follow ran without them, with no word (offload, no reshard)
    ("compute_environment: LOCAL_MACHINE\nuse_cpu: false\ndistributed_type: FSDP\nnum_processes: 2\n"
     "mixed_precision: 'no'\nfsdp_config:\n  fsdp_version: 2\n  fsdp_offload_params: true\n",
     "has fsdp_config fsdp_offload_params: True, which the stages do not do"),
    ("compute_environment: LOCAL_MACHINE\nuse_cpu: false\ndistributed_type: FSDP\nnum_processes: 2\n"
     "mixed_precision: 'no'\nfsdp_config:\n  fsdp_version: 2\n  fsdp_reshard_after_forward: false\n",
     "has fsdp_config fsdp_reshard_after_forward: False, which the stages do not do (they shard the frozen base"),
    # accelerate kept the last: a num_processes edited below the first launched what the first line said nothing of
    (ACCELERATE_HEAD + "distributed_type: MULTI_GPU\nnum_processes: 2\nnum_processes: 1\n",
     "is not valid YAML: the key 'num_processes' is given twice (first at line"),
], ids=["yaml", "value", "key", "int", "bool", "mixed-precision", "multi-cpu-one-process", "fsdp-one-process",
        "zero-processes", "negative-processes", "fsdp-offload", "fsdp-no-reshard", "key-twice"])
def test_an_accelerate_config_accelerate_cannot_read_is_one_error_line(text, problem, tmp_path):
    """accelerate's launcher stopped on each of these with a traceback of its own (exit 1)."""
    acc = tmp_path / "acc.yaml"
    acc.write_text(text)
    res = make("sft", f"ACCELERATE_CONFIG={acc}", runs_dir=tmp_path / "runs")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert errors[0].startswith(f"error: ACCELERATE_CONFIG={acc} {problem}") and errors[0].endswith(
        ": fix the file (`accelerate config` writes one), or give one of configs/accelerate/"), errors[0]
    assert not (tmp_path / "runs").exists()


def test_a_stage_folder_another_launch_is_writing_is_refused_until_it_ends(tmp_path):
    """Two `make sft` of one run at once would both write its checkpoints and adapters: the second is one error line,
    exit 2, naming the folder and who holds it, and writes nothing; once the first ends (its lock goes with its
    process), the stage runs. The lock is checked before the up-to-date check: a stage being rewritten still has its
    old manifest, and would read as up to date. Another run's folder is not held. Mutants: the lock not taken (flock
    skipped); taken after the up-to-date check."""
    from pipeline.launch import hold_stage_folder

    runs = tmp_path / "runs"
    for fresh in (True, False):  # nothing there yet; a finished, current sft (FORCE=1 rewriting it in the first launch)
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        lock, _ = hold_stage_folder(runs / "t" / "sft")  # the first launch, still training
        res = make("sft", runs_dir=runs)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
        assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
        assert errors[0] == (f"error: {runs / 't' / 'sft'} is being written by another run of `sft` (pid {os.getpid()}, "
                             f"since {errors[0].split('since ')[1][:8]}): wait for it to end, or give this one its own "
                             f"run folder (make sft RUN=another)")
        assert "up to date" not in res.stdout and sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
        if fresh:
            assert make("sft", "RUN=other", f"RUNS_DIR={runs}").returncode == 0  # another folder: not held
            # the same folder by another path (a link to the runs folder, a `..`): held
            (tmp_path / "link").symlink_to(runs, target_is_directory=True)
            for other_path in (tmp_path / "link", tmp_path / "runs" / ".." / "runs"):
                res = make("sft", "RUN=t", f"RUNS_DIR={other_path}")
                assert res.returncode == 2 and "is being written by another run of `sft`" in res.stderr, res.stderr
        lock.close()
        res = make("sft", runs_dir=runs)
        assert res.returncode == 0 and ran(runs) == (["sft"] if fresh else []), res.stderr
        assert fresh or "sft: up to date" in res.stdout


def test_a_launch_leaves_no_lock_file_behind(tmp_path):
    """Each launch's lock file was left in the temp folder (one for every stage folder ever launched; the suite left
    hundreds): it is deleted as the launcher exits, still locked. One a killed launcher left is taken and deleted by
    the next launch of that folder. Mutant: the exit hook not registered."""
    import hashlib
    import tempfile

    runs = tmp_path / "runs"
    key = hashlib.sha256(str((runs / "t" / "sft").resolve()).encode()).hexdigest()[:24]
    lock_file = Path(tempfile.gettempdir()) / f"rlhf-pipeline-locks-{os.getuid()}" / f"{key}.lock"
    assert make("sft", runs_dir=runs).returncode == 0 and ran(runs) == ["sft"]
    assert not lock_file.exists()
    lock_file.write_text("pid 1, since 00:00:00")  # a killed launcher's
    res = make("sft", "FORCE=1", runs_dir=runs)
    assert res.returncode == 0 and ran(runs) == ["sft"] and not lock_file.exists(), res.stderr


def test_a_lock_file_replaced_between_open_and_lock_is_not_taken(tmp_path, monkeypatch):
    """The lock file is deleted at exit: a launch that opened it just before another launch deleted it and locked a new
    one would lock the deleted file and write beside that launch. It checks, once locked, that the path is still its
    file, and otherwise tries the new one (held: refused, naming its holder)."""
    import fcntl

    from pipeline.launch import hold_stage_folder

    real, other = fcntl.flock, []

    def racing(f, op):
        if not other:  # between our open and our lock: another launch deletes the file and locks a new one
            Path(f.name).unlink()
            theirs = open(f.name, "a+")
            real(theirs, fcntl.LOCK_EX | fcntl.LOCK_NB)
            theirs.write("pid other, since 00:00:00")
            theirs.flush()
            other.append(theirs)
        return real(f, op)

    monkeypatch.setattr(fcntl, "flock", racing)
    try:
        lock, holder = hold_stage_folder(tmp_path / "runs" / "t" / "sft")
        assert lock is None and holder == "pid other, since 00:00:00"
    finally:
        for theirs in other:
            Path(theirs.name).unlink(missing_ok=True)
            theirs.close()


def test_each_stage_ends_by_naming_where_its_outputs_are(tmp_path, monkeypatch):
    """The console never said where a stage's outputs went (the adapter, eval's report): its last line names the
    stage's folder (relative to where make runs) and each output in it, once (a folder of plots once); paths outside
    it (the base, the label store) are inputs, not listed."""
    from pipeline.run import finished_line

    res = make("sft", runs_dir=tmp_path / "runs")
    assert res.returncode == 0 and re.search(rf"^sft: done in \d+ s; outputs in {re.escape(str(tmp_path))}/runs/t/sft/$",
                                              res.stdout, re.M), res.stdout
    folder = tmp_path / "runs" / "t" / "eval"
    (folder / "plots").mkdir(parents=True)
    outputs = {"report": folder / "report.md", "plot_a": folder / "plots" / "a.png",
               "plot_b": folder / "plots" / "b.png",
               "base_model": tmp_path / "models" / "tiny", "members": '["x"]', "report_json": folder / "report.json"}
    monkeypatch.chdir(tmp_path)
    assert finished_line("eval", folder, {k: str(v) for k, v in outputs.items()}, 41.4) == (
        "eval: done in 41 s; outputs in runs/t/eval/: report.md, plots/, report.json")


@pytest.mark.parametrize("config, ranks", [("cpu.yaml", 1), pytest.param("cpu2.yaml", 2, marks=pytest.mark.slow)])
def test_ctrl_c_is_one_line_saying_how_to_continue(config, ranks, tmp_path):
    """Ctrl-C (SIGINT to make's process group) printed the stage's traceback, 26 to 38 frames of library code, and
    with two ranks torch's launcher's own: now one line saying how to continue, and exit 130 (SIGINT's). The stage
    takes 2 s to stop: the launcher waits for it (ending first, it ended the stage before its line:
    end_with_launcher)."""
    import signal

    held = tmp_path / "held"
    held.mkdir()
    proc = subprocess.Popen(["make", "--no-print-directory", "-o", ".venv/.done", "sft", "STAGE_PKG=tests.fake_stages",
                             "AUTO_LABELS=", f"RUNS_DIR={tmp_path / 'runs'}", "RUN=t", f"PY={PY}",
                             f"ACCELERATE_CONFIG=configs/accelerate/{config}", f"ARGS=--hold {held} --interrupt_takes 2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # a shell's background job ignores SIGINT, and its children inherit that (Python then
                            # raises no KeyboardInterrupt): a terminal's foreground job, as a user's make is, takes it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = interrupted(proc, lambda: len(list(held.glob("*.pid"))) == ranks, wait_s=120)
    assert err.strip().splitlines()[:-1] == [
        "interrupted: run the same command again to continue (a training stage resumes from its last checkpoint if it "
        "had saved one, a sampling stage keeps its finished batches)"], err
    assert re.search(r"\*\*\* \[Makefile:\d+: sft\] Error 130", err.strip().splitlines()[-1]), err


def interrupted(proc: subprocess.Popen, ready, wait_s: float) -> str:
    """Ctrl-C to make's process group once `ready()`, and its stderr; a make left running is killed."""
    import signal

    try:
        deadline = time.time() + wait_s
        while not ready() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert ready(), proc.poll()
        os.killpg(proc.pid, signal.SIGINT)
        return proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_ctrl_c_while_a_stage_imports_its_libraries_is_the_same_line(tmp_path):
    """Ctrl-C in a stage's first second or two, while it imports torch and transformers (before main_guard), printed
    Python's traceback of the import it landed in: now the same one line and exit 130. The real SFT stage, interrupted
    as soon as it has loaded torch's library. Mutant: the stages package not asking for it."""
    import signal

    from pipeline.run import INTERRUPTED_LINE

    proc = subprocess.Popen(["make", "--no-print-directory", "-o", ".venv/.done", "sft", f"RUNS_DIR={tmp_path}", "RUN=t",
                             f"PY={PY}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def importing_torch() -> bool:  # the stage process, with torch's library loaded: its imports are under way
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
                if args[1:3] == [b"-m", b"stages.sft"] and os.getsid(int(cmdline.parent.name)) == proc.pid:
                    return b"libtorch" in (cmdline.parent / "maps").read_bytes()
            except (OSError, ProcessLookupError):
                pass
        return False

    err = interrupted(proc, importing_torch, wait_s=60)
    lines = err.strip().splitlines()
    assert lines[:-1] == [INTERRUPTED_LINE], err
    assert re.search(r"\*\*\* \[Makefile:\d+: sft\] Error 130", lines[-1]), err
    assert not (tmp_path / "t" / "sft" / "manifest.json").exists()


def test_ctrl_c_before_the_launcher_starts_a_stage_ends_it_at_once(monkeypatch):
    """Ctrl-C while the launcher imported torch (its C code imports numpy and swallowed the KeyboardInterrupt: the
    launch went on and SFT trained in the background after make had exited; or numpy was left half set up, a
    RecursionError traceback): until launch() starts the stage, Ctrl-C ends the launcher at once, exit 130, nothing
    printed; from there it is a KeyboardInterrupt again, which reaches the stage and waits for it."""
    import signal

    from pipeline import launch as L

    for name in (L.LAUNCH_ENV, L.STAGE_ENV, L.LAUNCHER_PID_ENV, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(name, "")  # launch() sets them for its stage: put back after the test
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        L.quiet_ctrl_c_until_launch()
        assert signal.getsignal(signal.SIGINT) is L.interrupted_before_launch
        seen = []
        monkeypatch.setattr("accelerate.commands.launch.launch_command",
                            lambda args: seen.append(signal.getsignal(signal.SIGINT)))
        assert L.launch(["--config_file", "configs/accelerate/cpu.yaml"], "stages.sft", []) == 0
        assert seen == [signal.default_int_handler]
    finally:
        signal.signal(signal.SIGINT, previous)
    code = ("import os, signal, time\n"
            "from pipeline.launch import quiet_ctrl_c_until_launch\n"
            "quiet_ctrl_c_until_launch()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(5)\n"
            "finally:\n"
            "    print('went on', flush=True)\n")
    proc = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,  # a suite run in
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # the background ignores it
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "")


def test_ctrl_c_once_a_stage_runs_unwinds_it(tmp_path):
    """Once main_guard runs the stage, Ctrl-C is Python's KeyboardInterrupt again (the quiet exit of the imports would
    end it without its `finally` blocks): the stage's own clean-up runs, then the one line and 130."""
    code = ("import os, signal, time\n"
            "import stages\n"  # as `python -m stages.X` does first
            "from pipeline.run import main_guard\n"
            "def stage():\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        time.sleep(5)\n"
            "    finally:\n"
            "        print('cleaned up', flush=True)\n"
            "main_guard(stage)\n")
    res = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PIPELINE_LAUNCHER_PID": str(os.getpid())},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (res.returncode, res.stdout) == (130, "cleaned up\n"), res.stderr
    assert res.stderr.startswith("interrupted: run the same command again"), res.stderr


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("config, ranks", [("cpu.yaml", 1), pytest.param("cpu2.yaml", 2, marks=pytest.mark.slow)])
def test_a_killed_launcher_takes_its_stage_processes_with_it(config, ranks, tmp_path):
    """`kill -9` of pipeline.launch (a scheduler's hard stop) left the stage it started training on, writing a folder
    whose lock had gone with the launcher: a second `make` could start beside it. Its processes (one, or two ranks)
    now end within seconds. Mutant: the parent-death signal not asked for."""
    held = tmp_path / "held"
    held.mkdir()
    launcher = subprocess.Popen([PY, "-m", "pipeline.launch", "sft", "--config_file", f"configs/accelerate/{config}",
                                 "-m", "tests.fake_stages.sft", "--run", "t", "--runs_dir", str(tmp_path / "runs"),
                                 "--hold", str(held)], cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list(held.glob("*.pid"))) < ranks and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in held.glob("*.pid")]
        assert len(pids) == ranks and all(alive(p) for p in pids), (pids, launcher.poll())
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 15
        while any(alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in pids), "the stage outlived its launcher"
    finally:
        launcher.kill()
        for p in held.glob("*.pid"):
            if alive(int(p.read_text())):  # left by a failed assertion (an ended one's pid may be another's now)
                os.kill(int(p.read_text()), 9)


@pytest.mark.parametrize("run,problem", [("../escape", "holds a path separator"), ("a/b", "holds a path separator"),
                                         ("..", "is not a folder name"), ("my run", "is not one word"), ("", "is not one word"),
                                         ("x;touch_escape", "holds other characters"), ("x|cat", "holds other characters"),
                                         ("-rf", "does not start with a letter or digit")])
@pytest.mark.parametrize("target", ["sft", "clean-run"])
def test_a_run_name_that_is_not_one_folder_is_refused(run, problem, target, tmp_path):
    """RUN=../escape wrote outside the runs folder, and `make clean-run RUN=..` would have deleted the checkout;
    RUN=x;cmd ran cmd in the recipe's shell."""
    res = make(target, f"RUNS_DIR={tmp_path / 'runs'}", f"RUN={run}")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and errors == [f"error: RUN={run} {problem}: name the run with letters digits . _ - only "
                                              f"(e.g. RUN=mine)"], res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists() and (REPO / "Makefile").is_file()
    assert not (REPO / "touch_escape").exists()


@pytest.mark.parametrize("runs_dir,problem", [("junk runs", "is not one word"), ("x;touch_escape", "holds other characters"),
                                              ("a|cat", "holds other characters")])
@pytest.mark.parametrize("target", ["sft", "clean-run"])
def test_a_runs_dir_the_shell_would_read_is_refused(runs_dir, problem, target):
    """RUNS_DIR goes into every recipe line unquoted: `make clean-run RUNS_DIR="junk runs"` ran `rm -rf junk
    runs/default`, and RUNS_DIR=x;cmd ran cmd. A path (/ allowed) of the run name's characters passes."""
    res = make(target, f"RUNS_DIR={runs_dir}")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and errors == [f"error: RUNS_DIR={runs_dir} {problem}: give a folder path of letters "
                                              f"digits . _ - / only"], res.stderr
    assert not (REPO / "touch_escape").exists() and not (REPO / "junk").exists()
    assert make("clean-run", "RUNS_DIR=/tmp/a-b_c.d/runs", dry_run=True).returncode == 0


@pytest.mark.parametrize("variable, value", [("REPO", "me/x;touch_escape"), ("MODEL", "configs/models/x.yaml|cat"),
                                             ("ACCELERATE_CONFIG", "configs/accelerate/cpu.yaml;touch_escape")])
def test_a_repo_model_or_accelerate_config_the_shell_would_read_is_refused(variable, value, tmp_path):
    """REPO, MODEL and ACCELERATE_CONFIG go into the recipe lines unquoted: REPO='me/x;cmd' ran cmd (under make -n
    too, whose check its exit status then answered). One error line, exit 2, nothing run. Mutant: none checked."""
    res = make("publish", f"{variable}={value}", "ARGS=--dry-run", dry_run=True, runs_dir=tmp_path / "runs")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and errors == [f"error: {variable}={value} holds other characters than letters digits . "
                                              f"_ - /: " + ("give the Hub repo id as user/name" if variable == "REPO" else
                                                            "give the path of a file of such a name")], res.stderr
    assert not (REPO / "touch_escape").exists() and not (tmp_path / "runs").exists()


def test_clean_run_deletes_the_run_folder_and_nothing_beside_it(tmp_path):
    """`make clean-run` deletes RUNS_DIR/RUN (README, *Configuration*): the run's folder, not its neighbours."""
    runs = tmp_path / "runs"
    for run in ("t", "other"):
        (runs / run / "sft").mkdir(parents=True)
        (runs / run / "sft" / "manifest.json").write_text("{}")
    res = make("clean-run", runs_dir=runs)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["other"] and (runs / "other" / "sft" / "manifest.json").is_file()


def test_a_bad_flag_of_a_later_stage_stops_before_any_stage_runs(tmp_path):
    """`make ppo PPO_ARGS=...` on a fresh run: the flag is parsed before SFT, pairs, labels and the reward models run
    (they would take minutes, and write the run folder, before PPO refused it)."""
    res = make("ppo", "PPO_ARGS=--learning_rate abc", fake=False, runs_dir=tmp_path / "runs")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and errors == ["error: --learning_rate on the command line is 'abc', not a number: give "
                                              "a number"], res.stderr
    assert "launch sft" not in res.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("variables,folder,target", [(["PPO_ARGS=--advantage_estimator reinforce_pp"], "ppo", "reinforce_pp"),
                                                      (["PPO_ARGS=--advantage_estimator grpo"], "ppo", "grpo"),
                                                      (["ARGS=--advantage_estimator=gae"], "grpo", "ppo")])
def test_an_estimator_that_writes_another_stages_folder_is_refused_before_any_stage_runs(variables, folder, target,
                                                                                        tmp_path):
    """The RL loop's folder follows its advantage estimator: `make ppo PPO_ARGS="--advantage_estimator grpo"` wrote
    grpo/ while make's lock and up-to-date check looked at ppo/ (and eval read ppo/'s old policy). The folder is said
    first: grpo's own need of 2 answers a prompt (ppo's config gives 1) once hid it."""
    res = make(folder, *variables, fake=False, runs_dir=tmp_path / "runs", timeout=120)  # else SFT runs: minutes
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr
    assert f"writes the run's {target}/ folder, but this is `make {folder}`" in errors[0], errors
    assert f"run `make {target}`" in errors[0], errors
    assert "launch sft" not in res.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("targets", [["ppo"], ["sft", "rm", "ppo"]])
def test_a_typo_in_a_named_stages_yaml_stops_before_any_stage_runs(targets, tmp_path):
    """A recipe whose ppo.yaml has a bad value, no flags given: `make ppo` (and `make sft rm ppo`) parsed PPO's YAML
    only when PPO started, after SFT, pairs, labels and the reward models had trained and written the run folder.
    The checkout is a copy (its configs/ holds the broken recipe; the rest are links), so the real one is untouched."""
    work = tmp_path / "checkout"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("configs", "runs", ".git"):
            (work / entry.name).symlink_to(entry)
    shutil.copytree(REPO / "configs", work / "configs")
    (work / "configs" / "recipes" / "typo").mkdir()
    (work / "configs" / "recipes" / "typo" / "ppo.yaml").write_text("base_config: configs/ppo.yaml\nkl_coef: -0.5\n")
    res = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.done", *targets, "RECIPE=typo",
                          f"RUNS_DIR={tmp_path / 'runs'}", f"PY={PY}"], cwd=work, capture_output=True, text=True,
                         timeout=120)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr
    assert "kl_coef must be >= 0, got -0.5" in errors[0] and "configs/recipes/typo/ppo.yaml" in errors[0], errors
    assert "launch sft" not in res.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("variables", [["PPO_ARGS=--prompts_file data/story/missing.jsonl"],
                                       ["RM_ARGS=--dataset_name my/prefs/missing"],
                                       ["ARGS=--dataset_name ./missing"]])
def test_a_missing_dataset_of_a_later_stage_stops_before_any_stage_runs(variables, tmp_path):
    """A dataset path that does not exist was found only when its stage started: `make ppo` on a fresh run trained
    SFT, sampled pairs and trained the reward models (over ten minutes) first."""
    res = make("ppo", *variables, fake=False, runs_dir=tmp_path / "runs", timeout=120)  # else SFT runs: minutes
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    name, flag = variables[0].split("--")[1].split()[1], "--" + variables[0].split("--")[1].split()[0]
    assert res.returncode == 2 and errors == [f"error: dataset {name} does not exist: check the path given to {flag}"], res.stderr
    assert "launch sft" not in res.stdout and not (tmp_path / "runs").exists()


def test_an_empty_dataset_flag_is_refused_before_the_labels_step_is_skipped(tmp_path):
    """`RM_ARGS='--dataset_name ""'`: make skipped the labels step (the stage was given its own preferences) while the
    stage read the empty value as none given and trained on the run's label export, stale or missing."""
    res = make("rm", 'RM_ARGS=--dataset_name ""', fake=False, runs_dir=tmp_path / "runs")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and errors == ["error: --dataset_name on the command line is empty: give a file, folder "
                                              "or Hub id, or leave it out for the config's own data"], res.stderr
    assert "launch sft" not in res.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("variables,error", [
    ([], "error: no repo to publish to: pass REPO=user/name (`--repo_id`), or --dry-run to only write the folder"),
    (["REPO=me//x"], "error: --repo_id 'me//x' is not a Hub repo id: give it as user/name"),
    (["ARGS=--policy sft"], "error: no repo to publish to"),
    (["REPO=me/x", "ARGS=--policy sft"], "error: --policy sft: publish one of the run's policies"),
])
def test_publish_without_a_usable_repo_stops_before_the_pipeline_runs(variables, error, tmp_path):
    """`make publish` on a fresh run brings every stage up to date first: without a repo (or with one the Hub would
    refuse) the stage refused only after SFT, the reward models, PPO and eval had run."""
    res = make("publish", *variables, fake=False, runs_dir=tmp_path / "runs")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1 and errors[0].startswith(error), res.stderr
    assert "launch sft" not in res.stdout and not (tmp_path / "runs").exists()


def test_publish_gets_its_repo_and_args():
    res = make("publish", "REPO=me/x", "ARGS=--private", dry_run=True, fake=False)
    assert res.returncode == 0, res.stderr
    line = [w for w in res.stdout.splitlines() if "-m stages.publish" in w][-1].split()
    assert line[line.index("--runs_dir") + 2:] == ["--repo_id", "me/x", "--private"]
    res = make("sft", "REPO=/home/me/not-a-hub-id", dry_run=True)  # REPO is publish's only: other targets ignore it
    assert res.returncode == 0 and "error" not in res.stderr, res.stderr


def test_a_crash_keeps_its_traceback(tmp_path):
    res = make("sft", "ARGS=--crash", runs_dir=tmp_path / "runs")
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "RuntimeError: sft: --crash was given" in res.stderr
    res = make("sft", "ARGS=--fail", runs_dir=tmp_path / "runs")  # the fake's ConfigError: one line, as the real one
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "error: sft: --fail was given" in res.stderr


# ---------------------------------------------------------------- CPU threads per process

def make_variable(name: str, *args, env_drop=("OMP_NUM_THREADS", "OMP_WAIT_POLICY")) -> str:
    """The value the Makefile gives `name` (what the stages' processes inherit), with the caller's environment."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    res = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.done", "-f", "Makefile", "-f", "-", "show-var",
                          *args], cwd=REPO, input=f"show-var:\n\t@echo $({name})\n", capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_threads_per_process_share_out_the_cores_and_wait_passively():
    """One process gets every core; the 2-process config half each (at least 1); waiting threads sleep (PASSIVE), so a
    busy neighbour does not make the extra threads spin; the caller's OMP_NUM_THREADS wins."""
    import os

    cores = len(os.sched_getaffinity(0))
    assert make_variable("OMP_NUM_THREADS") == str(cores)
    assert make_variable("OMP_NUM_THREADS", "ACCELERATE_CONFIG=configs/accelerate/cpu2.yaml") == str(max(1, cores // 2))
    assert make_variable("OMP_WAIT_POLICY") == "PASSIVE"
    assert make_variable("OMP_NUM_THREADS", env_drop=()) == os.environ.get("OMP_NUM_THREADS", str(cores))
    os.environ["OMP_NUM_THREADS"], saved = "1", os.environ.get("OMP_NUM_THREADS")
    try:  # the caller's OMP_NUM_THREADS=1 is not the machine's core count (nproc alone would say 1)
        assert make_variable("CPU_COUNT", env_drop=()) == str(cores)
    finally:
        os.environ.pop("OMP_NUM_THREADS") if saved is None else os.environ.__setitem__("OMP_NUM_THREADS", saved)


def test_progress_bars_into_a_log_redraw_each_ten_seconds_and_in_a_terminal_as_tqdm_has_them():
    """A log of the default run was 80% progress-bar redraws (tqdm's 0.1 s): with stderr not a terminal (this test's,
    a pipe), make sets one redraw each 10 s; a terminal, or the caller's own setting, is left as it is."""
    import pty

    assert make_variable("TQDM_MININTERVAL", env_drop=("TQDM_MININTERVAL",)) == "10"
    assert make_variable("TQDM_MININTERVAL", "TQDM_MININTERVAL=0.5") == "0.5"
    leader, follower = pty.openpty()  # stderr a terminal
    try:
        res = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.done", "-f", "Makefile", "-f", "-",
                              "show-var"], cwd=REPO, input="show-var:\n\t@echo [$(TQDM_MININTERVAL)]\n",
                             stdout=subprocess.PIPE, stderr=follower, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"})
    finally:
        os.close(follower)
        os.close(leader)
    assert res.returncode == 0 and res.stdout.strip() == "[]"


def launch_lines(*args, env_drop=("OMP_NUM_THREADS",)) -> dict[str, str]:
    """stage -> its whole `make -n` command line (environment prefix included), with the caller's environment; the
    stages named are checked on the real stage modules, as make's --check does (a stage given another's config)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    res = make_n_checked(*args, check=[arg for arg in args if "=" not in arg], env=env)
    assert res.returncode == 0, res.stderr
    return {m.group(1): line for line in res.stdout.replace("\\\n", " ").splitlines()
            if (m := re.search(r"-m pipeline\.launch (\S+) ", line))}


def test_sampling_runs_a_process_a_core_on_the_cpu_default_only():
    """make pairs and make eval on the default one-process CPU config, with two cores or more: two CPU processes
    (cpu2.yaml), each its share of the cores; every other stage keeps one process. Another ACCELERATE_CONFIG,
    SAMPLING_ACCELERATE_CONFIG, or OMP_NUM_THREADS=1 from the caller (nproc then counts one core) keep pairs under the
    one config."""
    import os

    cores = len(os.sched_getaffinity(0))
    lines = launch_lines("eval")  # eval pulls in every stage before it, pairs included
    for sampling in ("pairs", "eval"):
        if cores >= 2:
            assert lines[sampling].startswith(f"env ACCELERATE_USE_CPU=1 OMP_NUM_THREADS={cores // 2} ")
            assert "--config_file configs/accelerate/cpu2.yaml" in lines[sampling]
        else:
            assert "--config_file configs/accelerate/cpu.yaml" in lines[sampling] and not lines[sampling].startswith("env")
    for training in ("sft", "rm", "ppo"):
        assert "--config_file configs/accelerate/cpu.yaml" in lines[training] and not lines[training].startswith("env")
    for args in (["ACCELERATE_CONFIG=configs/accelerate/multi_gpu.yaml"],
                 ["SAMPLING_ACCELERATE_CONFIG=configs/accelerate/multi_gpu.yaml"]):
        line = launch_lines("pairs", *args)["pairs"]
        assert "--config_file configs/accelerate/multi_gpu.yaml" in line and "ACCELERATE_USE_CPU" not in line
    one = launch_lines("pairs", "SAMPLING_ACCELERATE_CONFIG=configs/accelerate/cpu.yaml")["pairs"]
    assert "--config_file configs/accelerate/cpu.yaml" in one and not one.startswith("env")
    # the caller's OMP_NUM_THREADS=1, in the environment or on make's command line, is one core: one process
    os.environ["OMP_NUM_THREADS"], saved = "1", os.environ.get("OMP_NUM_THREADS")
    try:
        from_env = launch_lines("pairs", env_drop=())["pairs"]
    finally:
        os.environ.pop("OMP_NUM_THREADS") if saved is None else os.environ.__setitem__("OMP_NUM_THREADS", saved)
    for line in (from_env, launch_lines("pairs", "OMP_NUM_THREADS=1")["pairs"]):
        assert "--config_file configs/accelerate/cpu.yaml" in line


def test_the_shipped_all_gpu_configs_start_one_process_per_gpu(tmp_path, monkeypatch):
    """multi_gpu.yaml and fsdp.yaml (gpu_ids: all) start one process per GPU of this machine, whatever their
    num_processes says; a config of your own, or one not for all GPUs or edited for several machines, keeps its
    num_processes; no GPU: one error line through make, exit 2, nothing run (accelerate started its 8 processes on the
    CPU, silently)."""
    import pipeline.launch as launch_module
    from pipeline.launch import processes_for_all_gpus

    shipped = REPO / "configs/accelerate/multi_gpu.yaml"
    assert processes_for_all_gpus(shipped, lambda: 2) == ["--num_processes", "2"]
    assert processes_for_all_gpus(REPO / "configs/accelerate/fsdp.yaml", lambda: 3) == ["--num_processes", "3"]
    assert processes_for_all_gpus(shipped, lambda: 8) == []  # it already asks for 8
    assert processes_for_all_gpus(REPO / "configs/accelerate/cpu2.yaml", lambda: 2) == []  # not gpu_ids: all
    own = tmp_path / "multi_gpu.yaml"
    own.write_text(shipped.read_text())
    assert processes_for_all_gpus(own, lambda: 2) == []  # your own file: its num_processes is what you asked for
    # a shipped file edited for two machines: accelerate's num_processes counts the processes of every machine and
    # starts num_processes / num_machines on each: one per GPU of each machine is this machine's GPUs times two (its
    # 8 started 4 on each machine of 8 GPUs; 2 here would start one)
    edited = tmp_path / "shipped"
    edited.mkdir()
    assert "num_machines: 1\n" in shipped.read_text()
    (edited / "multi_gpu.yaml").write_text(shipped.read_text().replace("num_machines: 1\n", "num_machines: 2\n"))
    monkeypatch.setattr(launch_module, "SHIPPED_CONFIGS", edited.resolve())
    assert processes_for_all_gpus(edited / "multi_gpu.yaml", lambda: 2) == ["--num_processes", "4"]
    assert processes_for_all_gpus(edited / "multi_gpu.yaml", lambda: 4) == []
    # a shipped file broken (bad YAML, a list, bytes that are not UTF-8): no traceback here, where make's launch asks
    # first; accelerate_config_problem then says what is wrong in one line (test_an_accelerate_config_accelerate_...)
    for broken in (b"foo: [1, 2\n", b"- gpu_ids: all\n", b"gpu_ids: \xff\n"):
        (edited / "broken.yaml").write_bytes(broken)
        assert processes_for_all_gpus(edited / "broken.yaml", lambda: 2) == []
    import torch

    if not torch.cuda.is_available():  # this machine: make's own run of it
        res = make("sft", "ACCELERATE_CONFIG=configs/accelerate/multi_gpu.yaml", runs_dir=tmp_path / "runs")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and lines[0] == (
            "error: ACCELERATE_CONFIG=configs/accelerate/multi_gpu.yaml starts one process per GPU, and torch sees no "
            "GPU here (a CPU-only torch, or CUDA_VISIBLE_DEVICES empty): on the CPU give configs/accelerate/cpu.yaml "
            "(one process), cpu2.yaml (two) or fsdp_cpu2.yaml (two, the base sharded)"), res.stderr
        assert len(lines) == 2 and not (tmp_path / "runs").exists()


def test_a_crashed_rank_keeps_its_traceback_beside_ranks_that_refused_bad_input(monkeypatch):
    """Exit code 2 (one `error:` line) only when every rank stopped on bad input; one rank that crashed is a real
    failure, and its error propagates; a process or the ranks interrupted (exit 130, the others stopped by the
    launcher) is no crash either."""
    from types import SimpleNamespace

    import accelerate.commands.launch as accelerate_launch

    from pipeline.launch import CONFIG_ERROR_EXIT, launch
    from pipeline.run import INTERRUPTED_EXIT, LAUNCH_ENV, LAUNCHER_PID_ENV, STAGE_ENV

    class ChildFailed(Exception):
        def __init__(self, codes):
            super().__init__(codes)
            self.failures = {rank: SimpleNamespace(exitcode=c) for rank, c in enumerate(codes)}

    def failing(codes):
        def launch_command(args):
            raise ChildFailed(codes) if len(codes) > 1 else subprocess.CalledProcessError(codes[0], ["python"])
        return launch_command

    for name in (LAUNCH_ENV, LAUNCHER_PID_ENV, STAGE_ENV):  # launch() sets them for the stage: restored after the test
        monkeypatch.setenv(name, "")
    args = ["--num_processes", "2"]
    monkeypatch.setattr(accelerate_launch, "launch_command", failing([2, 2]))
    assert launch(args, "stages.sft", []) == CONFIG_ERROR_EXIT
    monkeypatch.setattr(accelerate_launch, "launch_command", failing([2, -15]))  # the other rank stopped by the launcher
    assert launch(args, "stages.sft", []) == CONFIG_ERROR_EXIT
    for codes in ([2, 1], [1, -15], [-15, -15], [2, -9]):  # a crash, or a kill that is not the launcher's SIGTERM
        monkeypatch.setattr(accelerate_launch, "launch_command", failing(codes))
        with pytest.raises(ChildFailed):
            launch(args, "stages.sft", [])
    monkeypatch.setattr(accelerate_launch, "launch_command", failing([2]))
    assert launch([], "stages.sft", []) == CONFIG_ERROR_EXIT
    monkeypatch.setattr(accelerate_launch, "launch_command", failing([1]))
    with pytest.raises(subprocess.CalledProcessError):
        launch([], "stages.sft", [])
    # one process stopped by a SIGINT of its own (`kill -INT` of the stage, not Ctrl-C in the terminal): it said
    # "interrupted" in one line (main_guard) and exited 130, which is no crash
    monkeypatch.setattr(accelerate_launch, "launch_command", failing([INTERRUPTED_EXIT]))
    assert launch([], "stages.sft", []) == INTERRUPTED_EXIT
    for codes in ([130, 130], [130, -15], [-15, 130]):  # so too for the ranks of several processes
        monkeypatch.setattr(accelerate_launch, "launch_command", failing(codes))
        assert launch(args, "stages.sft", []) == INTERRUPTED_EXIT, codes
    for codes in ([130, 1], [130, -9]):  # beside a crash or a kill that is not the launcher's: a crash
        monkeypatch.setattr(accelerate_launch, "launch_command", failing(codes))
        with pytest.raises(ChildFailed):
            launch(args, "stages.sft", [])


@pytest.mark.slow
@pytest.mark.parametrize("fail", ["--fail", "--fail_on_rank 1"])
def test_bad_input_in_a_two_process_stage_is_one_line_and_exit_2(fail, tmp_path):
    """`make pairs` and `make eval` run two processes on the CPU. Both ranks meeting the same bad input printed the
    line twice, and the launcher's SIGTERM to the slower rank read as a crash (a traceback, make's Error 1) about half
    the time. Now one line, exit 2, no traceback: when both ranks meet it, and when rank 1 meets it alone while rank 0
    waits (had rank 0 not been stopped, it would have finished its stage: the two processes are real). And no more
    lines: torch's launcher logged one for the rank it stopped and one for the rank that exited."""
    runs, temp = tmp_path / "runs", tmp_path / "temp"
    temp.mkdir()
    res = make("sft", f"ARGS={fail}", "ACCELERATE_CONFIG=configs/accelerate/cpu2.yaml", runs_dir=runs,
               env={"TMPDIR": str(temp)})
    # torch's launcher of two processes left a log folder (torchelastic_*) in the temp folder at every launch
    assert list(temp.glob("torchelastic_*")) == []
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: sft: --fail"), res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "sft] Error 2" in res.stderr  # the launcher itself exited 2
    lines = res.stderr.strip().splitlines()  # nothing else: not torch's launcher's lines on the ranks it stopped
    assert len(lines) == 2 and lines[0] == errors[0] and lines[1].endswith("sft] Error 2"), lines
    assert not (runs / "t" / "sft" / "manifest.json").exists() and ran(runs) == []


@pytest.mark.slow
def test_a_port_another_run_holds_is_replaced_without_a_word(tmp_path):
    """Two 2-process runs at once on one machine (two users, or the test suite's two workers): the second found
    cpu2.yaml's port taken, and accelerate printed a five-line warning before starting it on a free port. The run
    is the same, so nothing is printed; both ranks run. Mutant: the warning not filtered."""
    import socket

    runs = tmp_path / "runs"
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            held.bind(("127.0.0.1", 29511))  # cpu2.yaml's main_process_port
        except OSError:
            pass  # another test's run holds it already: the case itself
        held.listen()
        res = make("sft", "ACCELERATE_CONFIG=configs/accelerate/cpu2.yaml", runs_dir=runs)
    assert res.returncode == 0 and res.stderr == "", res.stderr[-3000:]
    assert ran(runs) == ["sft", "sft"]  # each rank's line


def test_an_rl_stage_on_a_float16_base_is_refused_before_any_stage_trains(tmp_path):
    """A `dtype: float16` model profile trained PPO's LoRA through fp16 activations with no loss scaler (gradients off
    by 1-6%), as the fp16 launch it refuses would: make's check says so first, exit 2, nothing run; SFT alone still
    takes the profile. Mutant: the RL stages' check_args gone."""
    profile = tmp_path / "fp16.yaml"
    profile.write_text((REPO / "configs/models/tiny.yaml").read_text().replace("dtype: float32", "dtype: float16"))
    assert "dtype: float16" in profile.read_text()
    res = make("sft", "rm", "grpo", f"MODEL={profile}", fake=False, runs_dir=tmp_path / "runs", timeout=120)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and errors == [f"error: grpo cannot train a float16 base (model profile {profile}): its "
                                              f"loop has no loss scaler; set `dtype: bfloat16` (or float32) in the "
                                              f"profile"], res.stderr
    assert "launch sft" not in res.stdout and not (tmp_path / "runs").exists()


def test_a_base_with_no_sequence_classification_model_is_refused_before_any_stage_trains(tmp_path):
    """Granite (and Cohere) have no *ForSequenceClassification in transformers, which `make rm` builds the reward model
    from: `make sft rm ppo` trained SFT, sampled and labeled pairs, then stopped in rm with a traceback. make's check
    says it first (exit 2, nothing run) and names DPO; a base that has one (the tiny Llama) passes the same check."""
    from transformers import AutoConfig

    base = tmp_path / "granite"
    AutoConfig.for_model("granite", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2).save_pretrained(base)
    profile = tmp_path / "granite.yaml"
    profile.write_text(f"name_or_path: {base}\nlora_target_modules: [q_proj, v_proj]\n")
    res = make("sft", "rm", f"MODEL={profile}", fake=False, runs_dir=tmp_path / "runs", timeout=120)  # rm's check
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr
    assert errors[0].startswith(f"error: the base {base} (granite, model profile {profile}) has no sequence-classification "
                                f"model in transformers ") and errors[0].endswith("`make dpo` trains on the labels "
                                                                                 "without a reward model"), errors
    assert "launch sft" not in res.stdout and not (tmp_path / "runs").exists()
    for goal in ("ppo", "eval"):  # rm reached through the chain alone: the RL stage's check says it, as first
        res = make(goal, f"MODEL={profile}", fake=False, runs_dir=tmp_path / "runs", timeout=120)
        assert res.returncode == 2 and [line for line in res.stderr.splitlines() if line.startswith("error: ")] == \
            errors, res.stderr
        assert "launch sft" not in res.stdout and not (tmp_path / "runs").exists()

    from pipeline.models import require_score_class

    require_score_class("configs/models/tiny.yaml")  # llama: has one


def test_an_rl_stage_under_fp16_is_refused_before_any_stage_trains(tmp_path):
    """PPO's loop has no fp16 loss scaler, so it refuses an fp16 launch: `make sft rm ppo` under an fp16 config said
    so only after SFT, the pairs and the reward models had trained. make's check says it first (exit 2, nothing run);
    the Trainer stages alone still run under fp16 (their Trainer scales the loss on a GPU), and bf16 is no problem."""
    runs = tmp_path / "runs"
    fp16 = tmp_path / "fp16.yaml"
    fp16.write_text((REPO / "configs/accelerate/cpu.yaml").read_text().replace('mixed_precision: "no"',
                                                                               "mixed_precision: fp16"))
    assert "mixed_precision: fp16" in fp16.read_text()
    for rl in ("ppo", "grpo"):
        res = make("sft", "rm", rl, f"ACCELERATE_CONFIG={fp16}", runs_dir=runs)
        assert res.returncode == 2 and res.stderr.splitlines()[0] == (
            f"error: {rl} cannot train under fp16 mixed precision (its training loop has no loss scaler): set "
            f"`mixed_precision: bf16` or `no` in {fp16}"), res.stderr
        assert ran(runs) == []
    # `make eval` on a run with no RL policy trains PPO first: the same refusal, before anything trains
    res = make("eval", f"ACCELERATE_CONFIG={fp16}", runs_dir=runs)
    assert res.returncode == 2 and res.stderr.startswith("error: ppo cannot train under fp16"), res.stderr
    assert ran(runs) == []
    assert make("sft", f"ACCELERATE_CONFIG={fp16}", runs_dir=runs).returncode == 0 and ran(runs) == ["sft"]
    from pipeline.launch import rl_precision_problem

    fp8 = tmp_path / "fp8.yaml"
    fp8.write_text("mixed_precision: fp8\n")
    assert rl_precision_problem("grpo", str(fp8)).startswith("grpo cannot train under fp8 mixed precision (its loop runs "
                                                             "bf16 or full precision)")
    (tmp_path / "list.yaml").write_text("- mixed_precision: fp16\n")  # not a config: the launch says what is wrong
    assert rl_precision_problem("ppo", str(tmp_path / "list.yaml")) is None
    assert rl_precision_problem("sft", str(fp16)) is None
    for rl in ("ppo", "grpo", "rloo", "reinforce_pp"):  # every RL stage's loop, not only the two make ran above
        assert rl_precision_problem(rl, str(fp16)).startswith(f"{rl} cannot train under fp16"), rl
    bf16 = tmp_path / "bf16.yaml"
    bf16.write_text(fp16.read_text().replace("mixed_precision: fp16", "mixed_precision: bf16"))
    assert make("ppo", f"ACCELERATE_CONFIG={bf16}", runs_dir=runs).returncode == 0 and "ppo" in ran(runs)
    # a run with its PPO policy (trained under bf16): under the fp16 config PPO would train again (another launch)
    res = make("eval", f"ACCELERATE_CONFIG={fp16}", runs_dir=runs)
    assert res.returncode == 2 and res.stderr.startswith("error: ppo cannot train under fp16"), res.stderr
    assert ran(runs) == [] and make("eval", f"ACCELERATE_CONFIG={bf16}", runs_dir=runs).returncode == 0


def test_a_rerun_drops_the_old_manifest_when_it_starts(tmp_path):
    """A manifest on disk means the stage finished: a rerun removes the old one when it starts (prepare), so that a
    rerun that dies midway leaves no manifest that later stages, `make` and PPO's auto-resume take as finished."""
    from pipeline.config import ConfigError
    from pipeline.run import read_manifest

    runs = tmp_path / "runs"
    sft = StageRun("sft", "r", str(runs))
    sft.argv = ["--run", "r", "--runs_dir", str(runs)]
    sft.prepare({})
    sft.finish({"adapter": "a"}, {}, {})
    assert read_manifest(str(runs), "r", "sft", "test")["outputs"] == {"adapter": "a"}
    again = StageRun("sft", "r", str(runs))
    again.argv = ["--run", "r", "--runs_dir", str(runs), "--seed", "2"]
    again.prepare({"seed": 2})  # ... and the process dies here, before finish()
    assert not again.manifest_path.exists()
    # the interrupted run's command line is known (started.json): not "it has not run yet"
    assert is_current("sft", sft.argv) == (False, f"the command line changed (was: {' '.join(again.argv)}, interrupted)")
    assert is_current("sft", again.argv) == (False, "its last run, with this command line, was interrupted")
    with pytest.raises(ConfigError, match="needs the sft stage of run 'r'"):
        read_manifest(str(runs), "r", "sft", "`make rm`")


def test_a_big_file_rewritten_at_the_same_size_is_a_change(tmp_path, monkeypatch):
    """Files over HASH_LIMIT_BYTES (a real base checkpoint) are fingerprinted by size and modification time, not read:
    `make base` writing new weights of the same size (the same architecture) must still make the stages stale."""
    import os

    import pipeline.run as run_mod

    monkeypatch.setattr(run_mod, "HASH_LIMIT_BYTES", 8)
    weights = tmp_path / "base" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"0123456789abcdef")
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    before = file_digest(weights.parent)
    assert file_digest(weights.parent) == before  # not re-read: the same size and time give the same digest
    weights.write_bytes(b"fedcba9876543210")  # retrained: same size, new bytes, written later
    os.utime(weights, ns=(2_000_000_000, 2_000_000_000))
    assert file_digest(weights.parent) != before


def test_a_folders_digest_covers_its_file_names(tmp_path):
    """A data folder whose file was renamed (train.jsonl -> test.jsonl: the rows change split) is another input,
    though every byte is the same."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "a"}\n')
    before = file_digest(data)
    (data / "train.jsonl").rename(data / "test.jsonl")
    assert file_digest(data) != before
    (data / "test.jsonl").rename(data / "train.jsonl")
    assert file_digest(data) == before


@pytest.mark.parametrize("target,module", [("bench-rm-limit", "rm_limit"), ("bench-rm-prefix", "shared_prefix --stage rm"),
                                           ("bench-dpo-prefix", "shared_prefix --stage dpo"),
                                           ("bench-rm-ceiling", "rm_ceiling")])
def test_the_run_benches_read_the_run_make_names(target, module, tmp_path):
    """They read runs/default whatever RUN= said (and measured, then overwrote the results of, the wrong run)."""
    res = make(target, "RUN=mine", f"RUNS_DIR={tmp_path}", "ARGS=--seeds 1", dry_run=True)
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if f"-m bench.{module}" in x)
    assert line.endswith(f"-m bench.{module} --from_run {tmp_path}/mine --seeds 1"), line


def test_bench_estimators_runs_the_seeds_and_runs_folder_make_names(tmp_path):
    """`make bench-estimators SEEDS="1 2"` benches those seeds' runs under RUNS_DIR (default: seed 42 in runs/)."""
    res = make("bench-estimators", "SEEDS=1 2", f"RUNS_DIR={tmp_path}", dry_run=True)
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if "-m bench.estimators" in x)
    assert line.endswith(f"-m bench.estimators --seeds 1 2 --runs_dir {tmp_path}"), line
    res = make("bench-estimators", dry_run=True)
    assert next(x for x in res.stdout.splitlines() if "-m bench.estimators" in x).endswith("--seeds 42 --runs_dir runs")


@pytest.mark.parametrize("stage, variable", [("rm", "RM_ARGS"), ("sft", "SFT_ARGS"), ("dpo", "DPO_ARGS")])
def test_a_missing_file_of_a_dataset_mixture_stops_before_any_stage_runs(stage, variable, tmp_path):
    """A `--dataset_mixture` naming a file that does not exist passed make's check: `make rm` trained SFT, sampled
    and labelled pairs, and then the reward model's stage said `--dataset_name`, a flag nobody gave. Mutant: the
    mixture's files not checked at parse."""
    mixture = '{"data/preferences/missing.jsonl": ' + ("0}" if stage == "sft" else "{}}")
    res = make(stage, f"{variable}=--dataset_mixture '{mixture}'", fake=False, runs_dir=tmp_path / "runs", timeout=120)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1 and errors[0].endswith(
        "dataset data/preferences/missing.jsonl does not exist: check the path given to --dataset_mixture"), res.stderr
    assert "launch sft" not in res.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags, message", [
    ("--users_file /nope/users.txt", "/nope/users.txt"),
    ("--host 0.0.0.0", "0.0.0.0"),
    ("--guidelines /nope/guidelines.md", "/nope/guidelines.md"),
])
def test_make_label_refuses_bad_logins_or_guidelines_before_the_pairs_are_sampled(flags, message, tmp_path):
    """`make label` with a users file that does not exist, a public host without logins or no guidelines file trained
    SFT and sampled the pairs (minutes) before the app said so. make's check now asks the labeling stage first: one
    error line naming the flag's value, exit 2, nothing written. Mutant: stages.label without check_args."""
    res = make("label", f"ARGS={flags}", fake=False, runs_dir=tmp_path / "runs", timeout=120)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and len(errors) == 1 and message in errors[0], res.stderr
    assert "launch sft" not in res.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_two_process_stage_stopped_by_a_signal_is_one_line_and_its_exit_code(sig, monkeypatch, capsys):
    """`kill`, `timeout`, `docker stop`, a scheduler's time limit (SIGTERM) or a closed terminal (SIGHUP) stopping a
    stage of two processes (pairs and eval by default): torch's launcher raised SignalException, whose 37 lines of
    traceback were all the user saw. Now one line, how to go on, and the shell's 128 + the signal; Ctrl-C as before
    (its line is the stage's own)."""
    import signal

    import accelerate.commands.launch as accelerate_launch

    from pipeline import launch
    from pipeline.run import INTERRUPTED_LINE

    class SignalException(Exception):  # torch.distributed.elastic's, as launch() sees it: by name and sigval
        def __init__(self, sigval):
            super().__init__(f"Process got signal: {sigval}")
            self.sigval = sigval

    def stopped(args):
        raise SignalException(getattr(signal, sig))

    monkeypatch.setattr(accelerate_launch, "launch_command", stopped)
    for name in (launch.LAUNCH_ENV, launch.STAGE_ENV, launch.LAUNCHER_PID_ENV):  # launch() sets them: put back after
        monkeypatch.setenv(name, "")
    code = launch.launch(["--num_processes", "2"], "stages.pairs", [], "pairs")
    err = capsys.readouterr().err
    assert code == 128 + getattr(signal, sig)
    if sig == "SIGINT":
        assert err == ""
    else:
        assert err == f"pairs: stopped by {sig}: {INTERRUPTED_LINE.split(': ', 1)[1]}\n"


def test_clean_run_refuses_a_run_a_stage_is_running_in(tmp_path):
    """`make clean-run` deleted the run under a stage that was training in it: PPO crashed on its next write, SFT wrote
    its adapter and manifest into a new folder that then looked finished. A stage's launch holds its folder's lock:
    while it does, clean-run is one error line naming the stage and its process, and deletes nothing."""
    from pipeline.launch import hold_stage_folder, release_stage_folder, stage_lock_path

    runs = tmp_path / "runs"
    for stage in ("sft", "ppo"):
        (runs / "t" / stage).mkdir(parents=True)
    lock, _ = hold_stage_folder(runs / "t" / "ppo")
    res = make("clean-run", runs_dir=runs)
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode != 0 and (runs / "t" / "ppo").is_dir(), res.stderr
    assert err == [f"error: {runs}/t is in use: ppo (pid {os.getpid()}, since {lock_since(lock)}) runs in it; stop it "
                   f"first (Ctrl-C), then `make clean-run`"], res.stderr
    release_stage_folder(lock, stage_lock_path(runs / "t" / "ppo"))
    res = make("clean-run", runs_dir=runs)
    assert res.returncode == 0 and not (runs / "t").exists(), res.stderr


def lock_since(lock) -> str:
    lock.seek(0)
    return lock.read().split("since ")[1]


def test_clean_run_refuses_a_run_whose_label_store_is_served(tmp_path):
    """`make label` runs outside any launch: it holds the store's lock (`labels.sqlite.lock`) alone, and `make
    clean-run` deleted the store under it, the app writing its people's labels on into a deleted file. The held store
    lock refuses it as a stage's lock does; a lock file left by a process gone does not."""
    from stages.label.store import lock_store

    runs = tmp_path / "runs"
    (runs / "t" / "label").mkdir(parents=True)
    lock = lock_store(runs / "t" / "label" / "labels.sqlite")
    res = make("clean-run", runs_dir=runs)
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode != 0 and (runs / "t" / "label").is_dir(), res.stderr
    assert err == [f"error: {runs}/t is in use: label (pid {os.getpid()}) runs in it; stop it first (Ctrl-C), then "
                   f"`make clean-run`"], res.stderr
    lock.close()
    res = make("clean-run", runs_dir=runs)
    assert res.returncode == 0 and not (runs / "t").exists(), res.stderr


def test_clean_run_of_a_run_with_no_folder_or_no_locks_is_quiet_and_creates_nothing(tmp_path, monkeypatch):
    """`make clean-run` of a run never made is a no-op, as `rm -rf` was (no traceback); of a run no stage has launched
    since the temp folder was emptied (a reboot), it deletes the run and leaves no lock file behind: the locks are
    tried only where they exist."""
    import tempfile

    from pipeline.launch import stages_running

    res = make("clean-run", runs_dir=tmp_path / "runs")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    run = tmp_path / "runs" / "t"
    for stage in ("sft", "ppo", "label"):
        (run / stage).mkdir(parents=True)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert stages_running(run) == [] and list(temp.iterdir()) == []


def test_the_libraries_bars_show_on_the_main_rank_only(monkeypatch):
    """datasets' and transformers' own bars drew once a rank, interleaved: a rank other than 0 turns them off."""
    import datasets
    from transformers.utils import logging as transformers_logging

    from pipeline.run import library_bars_on_the_main_rank_only

    for var in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(var, "")  # recorded, so that what the function sets is undone after the test
    try:
        monkeypatch.setenv("RANK", "0")
        library_bars_on_the_main_rank_only()
        assert datasets.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
        monkeypatch.setenv("RANK", "1")
        library_bars_on_the_main_rank_only()
        assert not datasets.is_progress_bar_enabled() and not transformers_logging.is_progress_bar_enabled()
        assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    finally:
        datasets.enable_progress_bars()
        transformers_logging.enable_progress_bar()
