"""`make label-export`: labels in the store -> a dataset TRL's RewardTrainer and DPOTrainer take unchanged."""

from __future__ import annotations

import json
import shutil
import re

import pytest

from pipeline.config import ConfigError
from stages.label.config import db_path
from stages.label.store import LabelStore
from tests.conftest import REPO, run_python


def labeled_run(runs_dir, run="r") -> LabelStore:
    """Three pairs: 'maj' (2 of 3 annotators prefer response 1), 'tie' (one tie), 'solo' (one left-better)."""
    store = LabelStore(db_path(str(runs_dir), run), overlap=3)
    store.import_items([{"pair_id": p, "prompt": [{"role": "user", "content": f"Tell me about {p}."}],
                         "responses": [f"{p} answer zero", f"{p} answer one"]} for p in ("maj", "tie", "solo")])
    for who, side, strength in (("ann", "right", "much"), ("bob", "left", None), ("cat", "right", "slightly")):
        store.save_label(who, "maj", side, 0, strength)  # response 0 on the left: right = response 1
    store.save_label("ann", "tie", "tie", 1)
    store.save_label("bob", "solo", "left", 1, "slightly", "clear winner")
    return store


def test_export_reads_into_reward_and_dpo_trainers(tiny_models, runs_dir, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from pipeline.config import RunArgs, load_model_profile, parse
    from stages.label.config import ExportArgs, LabelArgs
    from stages.label.export import main

    labeled_run(runs_dir)
    metrics = main(*parse((LabelArgs, ExportArgs, RunArgs), ["--config", "configs/label.yaml", "--run", "r",
                                                              "--runs_dir", str(runs_dir), "--overlap", "3",
                                                              "--ties", "drop"]))
    assert metrics["rows"] == 2 and metrics["dropped"] == {"tie": 1}
    manifest = json.loads((runs_dir / "r/label-export/manifest.json").read_text())
    ds = datasets.load_from_disk(manifest["outputs"]["dataset"])
    by_pair = {r["pair_id"]: r for r in ds}
    maj = by_pair["maj"]  # majority vote: ann + cat chose response 1 over bob's response 0
    assert maj["chosen"] == [{"role": "assistant", "content": "maj answer one"}]
    assert maj["rejected"] == [{"role": "assistant", "content": "maj answer zero"}]
    assert (maj["annotator"], maj["n_annotators"], maj["agreement"]) == ("ann,bob,cat", 3, pytest.approx(0.6667))
    assert by_pair["solo"]["chosen"][0]["content"] == "solo answer one"  # left was response 1 for bob
    card = (runs_dir / "r/label-export/README.md").read_text()
    assert "| ann | 2 |" in card and "How to label" in card

    model_dir = load_model_profile(tiny_models["llama"]).name_or_path
    tok = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=str(tmp_path / "out"), report_to="none", bf16=False, max_steps=1,
                  per_device_train_batch_size=2, gradient_checkpointing=False, save_strategy="no", logging_steps=1)
    rm = RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1),
                       args=RewardConfig(**common, max_length=256), train_dataset=ds, processing_class=tok)
    tokenized = {r["pair_id"]: r for r in rm.train_dataset}
    assert "<|assistant|>\nmaj answer one</s>" in tok.decode(tokenized["maj"]["chosen_ids"])
    assert "<|assistant|>\nmaj answer zero</s>" in tok.decode(tokenized["maj"]["rejected_ids"])
    assert rm.train().training_loss > 0

    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=DPOConfig(**common),
                     train_dataset=ds, processing_class=tok)
    dpo_rows = {r["pair_id"]: r for r in dpo.train_dataset}
    assert "maj answer one" in tok.decode(dpo_rows["maj"]["chosen_ids"])
    assert "Tell me about maj." in tok.decode(dpo_rows["maj"]["prompt_ids"])
    assert dpo.train().training_loss > 0


def test_export_cli_keeps_ties_when_asked_and_pushes_with_a_card(runs_dir, monkeypatch):
    labeled_run(runs_dir)
    proc = run_python("stages.label.export", ["--config", "configs/label.yaml", "--run", "r", "--runs_dir",
                                              str(runs_dir), "--ties", "both_orders"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    # its closing line comes last, once the folder is in place (a first export: `dataset/` a folder there too)
    done = [line for line in proc.stdout.splitlines() if " done in " in line]
    assert len(done) == 1 and done[0] == proc.stdout.strip().splitlines()[-1], proc.stdout[-1000:]
    assert re.fullmatch(rf"label-export: done in \d+ s; outputs in {re.escape(str(runs_dir))}/r/label-export/: "
                        r"dataset/, README.md", done[0]), done
    import datasets

    ds = datasets.load_from_disk(str(runs_dir / "r/label-export/dataset"))
    ties = [r for r in ds if r["is_tie"]]
    assert len(ds) == 4 and {r["chosen"][0]["content"] for r in ties} == {"tie answer zero", "tie answer one"}
    # a tie kept in both orders is two rows of one pair: 4 rows of 3 pairs, from 5 labels of 3 annotators
    metrics = json.loads((runs_dir / "r/label-export/manifest.json").read_text())["metrics"]
    assert (metrics["rows"], metrics["pairs"], metrics["labels"], metrics["annotators"]) == (4, 3, 5, 3)
    # the card says how many annotators the exported labels have per pair ('maj' 3, 'tie' and 'solo' 1), not the
    # `overlap` people are served with (configs/label.yaml's)
    card = (runs_dir / "r/label-export/README.md").read_text()
    assert "- **Annotators per pair**: 1 on 2 pairs, 3 on 1 pair (people are served each pair up to `overlap: 1` " \
           "times)." in card
    assert "- **Rows**: 4 from 3 pairs (5 labels in all)." in card

    # a repo id the Hub would refuse: one error line, exit 2, the export as it was
    before = {p: p.read_bytes() for p in (runs_dir / "r/label-export").rglob("*") if p.is_file()}
    bad = run_python("stages.label.export", ["--config", "configs/label.yaml", "--run", "r", "--runs_dir",
                                             str(runs_dir), "--push_to_hub", "me/my labels"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: --push_to_hub 'me/my labels' is not a Hub repo id: Repo id must use alphanumeric chars")
    assert {p: p.read_bytes() for p in (runs_dir / "r/label-export").rglob("*") if p.is_file()} == before

    # --push_to_hub: refused offline with the command to use; online, data then card (Hub calls faked here)
    from stages.label import export

    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=0"):
        export.push(ds, "card", "me/labels", private=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, private: calls.append(("data", repo, private)))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.DatasetCard, "load", classmethod(lambda cls, repo: (_ for _ in ()).throw(OSError())))
    monkeypatch.setattr(huggingface_hub.DatasetCard, "push_to_hub",
                        lambda self, repo, repo_type, commit_message: calls.append(("card", repo, self.text)))
    card = (runs_dir / "r/label-export/README.md").read_text()
    export.push(ds, card, "me/labels", private=True)
    assert calls[0] == ("data", "me/labels", True) and calls[1][:2] == ("card", "me/labels")
    assert "Who labeled" in calls[1][2]


def test_export_without_labels_says_what_to_do(runs_dir):
    from pipeline.config import RunArgs, parse
    from stages.label.config import ExportArgs, LabelArgs
    from stages.label.export import main

    argv = ["--config", "configs/label.yaml", "--run", "empty", "--runs_dir", str(runs_dir)]
    with pytest.raises(ConfigError, match=r"no label store at .*make label RUN=empty"):
        main(*parse((LabelArgs, ExportArgs, RunArgs), argv))
    assert not (runs_dir / "empty").exists()  # refused before a store (an empty labels.sqlite) is made
    LabelStore(db_path(str(runs_dir), "empty")).import_items([])
    with pytest.raises(ConfigError, match="holds no labels yet"):
        main(*parse((LabelArgs, ExportArgs, RunArgs), argv))


def test_an_export_whose_every_pair_is_left_out_is_refused_and_writes_nothing(runs_dir):
    """Labels that all fall on dropped pairs (a tie with ties: drop, a pair without a majority) make no dataset: one
    error naming the reasons, and no export folder (`make rm` would otherwise train on zero rows)."""
    from pipeline.config import RunArgs, parse
    from stages.label.config import ExportArgs, LabelArgs
    from stages.label.export import main

    store = LabelStore(db_path(str(runs_dir), "none"), overlap=2)
    store.import_items([{"pair_id": p, "prompt": [{"role": "user", "content": f"About {p}."}],
                         "responses": [f"{p} zero", f"{p} one"]} for p in ("tie", "split")])
    store.save_label("ann", "tie", "tie", 0)
    store.save_label("ann", "split", "left", 0)
    store.save_label("bob", "split", "left", 1)
    argv = ["--config", "configs/label.yaml", "--run", "none", "--runs_dir", str(runs_dir), "--ties", "drop"]
    with pytest.raises(ConfigError, match=r"^all 3 labels were left out \({'tie': 1, 'no_majority': 1}\)"):
        main(*parse((LabelArgs, ExportArgs, RunArgs), argv))
    assert not (runs_dir / "none/label-export").exists()


def export_main(runs_dir, run="r"):
    from pipeline.config import RunArgs, parse
    from stages.label.config import ExportArgs, LabelArgs
    from stages.label.export import main

    return main(*parse((LabelArgs, ExportArgs, RunArgs), ["--config", "configs/label.yaml", "--run", run,
                                                          "--runs_dir", str(runs_dir), "--overlap", "3"]))


def files(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_failed_export_leaves_the_previous_one_whole(runs_dir, monkeypatch):
    from stages.label import export

    labeled_run(runs_dir)
    export_main(runs_dir)
    out = runs_dir / "r/label-export"
    previous = files(out)
    assert {"manifest.json", "README.md", "config.json", "dataset/dataset_info.json"} <= set(previous)
    assert json.loads(previous["manifest.json"])["outputs"]["dataset"] == str(out / "dataset")  # the final path

    # killed (here: an error) after the new dataset was half written: the old export is untouched, no debris
    def fail(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(export, "dataset_card", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_main(runs_dir)
    assert files(out) == previous
    assert sorted(p.name for p in (runs_dir / "r").iterdir()) == ["label", "label-export"]
    monkeypatch.undo()

    # a damaged store: one clear error, before anything is written
    db = db_path(str(runs_dir), "r")
    for f in db.parent.glob("labels.sqlite-*"):
        f.unlink()
    db.write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError, match="is not an SQLite database"):
        export_main(runs_dir)
    assert files(out) == previous


def test_a_new_export_replaces_the_old_one_completely(runs_dir):
    import datasets

    store = labeled_run(runs_dir)
    export_main(runs_dir)
    store.save_label("ann", "tie", "left", 0)  # ann changed her mind: the tie now has a winner
    metrics = export_main(runs_dir)
    assert metrics["rows"] == 3
    manifest = json.loads((runs_dir / "r/label-export/manifest.json").read_text())
    assert len(datasets.load_from_disk(manifest["outputs"]["dataset"])) == 3
    assert sorted(p.name for p in (runs_dir / "r").iterdir()) == ["label", "label-export"]


KILLED_EXPORT = """
import os, signal, sys
from stages.label import export
real_rename, renames = os.rename, []
def rename(src, dst):  # kill -9 as the export reaches rename number {at} (1: the last export moved aside)
    renames.append(src)
    if len(renames) == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(src, dst)
export.os.rename = rename
sys.argv[1:] = ["--config", "configs/label.yaml", "--run", "r", "--runs_dir", {runs!r}, "--overlap", "3"]
export.main_guard(export.command_line_main)
"""


def test_an_export_killed_before_its_folder_is_in_place_leaves_nothing_the_next_one_keeps(runs_dir):
    """kill -9 runs no clean-up: a killed export's half-built `.label-export.new-PID` stayed in the run folder for good
    (each export deleted only its own pid's), and one killed between its two renames left the last export aside as
    `.label-export.old-PID`, with none in place."""
    import subprocess
    import sys

    store = labeled_run(runs_dir)
    export_main(runs_dir)
    out, run = runs_dir / "r/label-export", runs_dir / "r"
    last = files(out)
    store.save_label("ann", "tie", "left", 0)  # the next export's rows differ
    first = subprocess.run([sys.executable, "-c", KILLED_EXPORT.format(at=1, runs=str(runs_dir))], cwd=REPO)
    assert first.returncode == -9 and files(out) == last  # killed with its folder built, before the last one moved
    assert [p.name for p in run.iterdir() if p.name.startswith(".")][0].startswith(".label-export.new-")

    second = subprocess.run([sys.executable, "-c", KILLED_EXPORT.format(at=2, runs=str(runs_dir))], cwd=REPO)
    assert second.returncode == -9 and not out.exists()  # between the renames: the last export aside, none in place
    aside = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    assert [name.rsplit("-", 1)[0] for name in aside] == [".label-export.new", ".label-export.old"]  # the first's gone
    assert files(run / aside[1]) == last

    from stages.label.export import clear_killed_exports

    running = subprocess.Popen(["sleep", "60"])  # an export running now: its folder is its own
    (run / f".label-export.new-{running.pid}").mkdir()
    clear_killed_exports(out)  # what the next export does first: the last one back in place, the half-built one gone
    running.kill()
    running.wait()
    assert files(out) == last and sorted(p.name for p in run.iterdir()) == [
        f".label-export.new-{running.pid}", "label", "label-export"]
    (run / f".label-export.new-{running.pid}").rmdir()
    assert export_main(runs_dir)["rows"] == 3


def rm_mixture(runs_dir, run):
    from stages.rm import RMArgs
    from stages.rm_data import load_pairs
    from pipeline.run import StageRun

    args = RMArgs(dataset_mixture={"label-export": {"weight": 1.0}})
    return load_pairs(args, StageRun("rm", run, str(runs_dir)), 0)


def test_rm_refuses_a_run_with_labels_but_no_usable_export(runs_dir):
    import shutil

    labeled_run(runs_dir)
    with pytest.raises(ConfigError, match=r"run 'r' has 5 labels in .*labels.sqlite but no label export.*"
                                          r"make label-export RUN=r"):
        rm_mixture(runs_dir, "r")
    export_main(runs_dir)
    pairs, weights, counts, _ = rm_mixture(runs_dir, "r")
    assert len(pairs) == 2 and weights == {"label-export": 1.0}
    shutil.rmtree(runs_dir / "r/label-export/dataset")  # the manifest names a dataset that is gone
    with pytest.raises(ConfigError, match="label export of run 'r' is broken"):
        rm_mixture(runs_dir, "r")
    (runs_dir / "r/label-export/manifest.json").write_text("{trunc")
    with pytest.raises(ConfigError, match="not valid JSON"):
        rm_mixture(runs_dir, "r")
    # a run nobody labeled: a mixture of the label export alone is one error saying how to label (it read "no usable
    # preference pairs in mixture of : read and dropped {}"); beside bundled data, it trains on that alone
    with pytest.raises(ConfigError, match=r"no preference data: dataset_mixture names only the label export, and run "
                                          r"'unlabeled' has none"):
        rm_mixture(runs_dir, "unlabeled")
    from stages.rm import RMArgs
    from stages.rm_data import load_pairs
    from pipeline.run import StageRun

    args = RMArgs(dataset_mixture={"label-export": {"weight": 1.0}, "data/preferences/pandalm.jsonl": {"max_rows": 3}})
    pairs, weights, _, _ = load_pairs(args, StageRun("rm", "unlabeled", str(runs_dir)), 0)
    assert len(pairs) == 3 and weights == {"pandalm": 1.0}


def pair(pair_id: str) -> dict:
    return {"pair_id": pair_id, "prompt": [{"role": "user", "content": f"Tell me about {pair_id}."}],
            "responses": [f"{pair_id} zero", f"{pair_id} one"]}


def sample_pairs(runs_dir, run: str, pair_ids: list[str], tag: str) -> None:
    """The run's pairs stage as `make pairs` leaves it: a dataset and a manifest naming it (`tag` makes it new)."""
    import datasets

    from pipeline.run import StageRun

    stage = StageRun("pairs", run, str(runs_dir))
    stage.prepare({"tag": tag})
    datasets.Dataset.from_list([pair(p) for p in pair_ids]).save_to_disk(str(stage.dir / f"dataset-{tag}"))
    stage.finish({"dataset": stage.dir / f"dataset-{tag}"}, {"policy": f"/home/me/models/base-{tag} + /home/me/runs/sft"},
                 {"tag": tag})


def test_labels_of_pairs_from_an_earlier_pairs_dataset_stay_out_unless_kept(runs_dir, monkeypatch, capsys):
    """`make pairs` again: the store keeps the old pairs' labels, the export holds only the current pairs' labels (by
    the run's pairs dataset, even before `make label` has loaded it), unless --earlier_pairs keep; and the new pairs
    make the export out of date."""
    import datasets

    from pipeline.run import is_current
    from stages.label.pairs import read_pairs

    sample_pairs(runs_dir, "r", ["a", "b"], "v1")
    store = LabelStore(db_path(str(runs_dir), "r"))
    store.import_items(read_pairs(str(runs_dir / "r/pairs/dataset-v1"), "pairs"))  # what `make label` serves
    store.save_label("ann", "a", "left", 0)
    store.save_label("ann", "b", "right", 0)
    argv = ["--config", "configs/label.yaml", "--run", "r", "--runs_dir", str(runs_dir)]
    monkeypatch.setattr("sys.argv", ["export", *argv])

    def export(*extra):
        from pipeline.config import RunArgs, parse
        from stages.label.config import ExportArgs, LabelArgs
        from stages.label.export import main

        metrics = main(*parse((LabelArgs, ExportArgs, RunArgs), [*argv, *extra]))
        rows = datasets.load_from_disk(str(runs_dir / "r/label-export/dataset")).to_list()
        return metrics, sorted((r["pair_id"], r["chosen"][0]["content"]) for r in rows)

    metrics, rows = export()
    assert rows == [("a", "a zero"), ("b", "b one")] and metrics["earlier_pairs_labels"] == 0
    card = (runs_dir / "r/label-export/README.md").read_text()  # the Hub's copy names no path of this machine
    assert "- **Pairs**: sampled by `make pairs` from this run's SFT policy (base: `base-v1`)." in card
    assert "/home/me" not in card
    assert is_current("label-export", argv) == (True, "")

    sample_pairs(runs_dir, "r", ["b", "c"], "v2")  # sampled again; b comes back (same pair_id), a does not
    assert is_current("label-export", argv) == (False, "the pairs stage ran again")
    metrics, rows = export()
    assert rows == [("b", "b one")] and metrics["earlier_pairs_labels"] == 1 and metrics["earlier_pairs"] == "drop"
    assert "Labels of pairs from earlier pairs datasets: 1, left out" in (runs_dir / "r/label-export/README.md").read_text()
    metrics, rows = export("--earlier_pairs", "keep")
    assert rows == [("a", "a zero"), ("b", "b one")] and metrics["earlier_pairs_labels"] == 1

    sample_pairs(runs_dir, "r", ["c"], "v3")  # none of the labels is of a current pair: one clear error, nothing touched
    before = files(runs_dir / "r/label-export")
    with pytest.raises(ConfigError, match=r"all 2 labels in .* are of pairs from an earlier pairs dataset: label the "
                                          r"current pairs with `make label RUN=r`, or .*`earlier_pairs: keep` in configs/label.yaml"):
        export()
    assert files(runs_dir / "r/label-export") == before
    with pytest.raises(ValueError, match="earlier_pairs must be one of"):
        export("--earlier_pairs", "some")

    # simulated annotators label the new pair (the chain after pairs sampled again): people's two labels would go
    # unused without a word; the export says so and how to use them
    store.import_items(read_pairs(str(runs_dir / "r/pairs/dataset-v3"), "pairs"))
    store.save_label("sim:sentiment", "c", "left", 0)
    capsys.readouterr()
    metrics, rows = export()
    assert rows == [("c", "c zero")] and metrics["sources"] == "simulated"
    err = capsys.readouterr().err
    assert "note: the 2 labels people gave in " in err and (
        "this export holds simulated labels only. Label the current pairs with `make label RUN=r`, or export the "
        "earlier ones too with --earlier_pairs keep") in err, err
    store.save_label("ann", "c", "right", 0)  # a person labels the new pair: theirs are exported, no note
    metrics, rows = export()
    assert metrics["sources"] == "people" and "note:" not in capsys.readouterr().err


def test_the_dataset_card_names_your_pairs_file_not_its_path_here(runs_dir, tmp_path):
    """Labels of your own pairs (--pairs_dataset): the card, which goes to the Hub with the data, names their file
    by its name, not by this machine's path (a home folder, a user name). Mutant: the path as given."""
    from pipeline.config import RunArgs, parse
    from stages.label.config import ExportArgs, LabelArgs
    from stages.label.export import main
    from stages.label.pairs import read_pairs

    mine = tmp_path / "home" / "me" / "my_pairs.jsonl"
    mine.parent.mkdir(parents=True)
    mine.write_text("".join(json.dumps(pair(p)) + "\n" for p in "ab"))
    store = LabelStore(db_path(str(runs_dir), "r"))
    store.import_items(read_pairs(str(mine), "--pairs_dataset"))
    for item in read_pairs(str(mine), "--pairs_dataset"):
        store.save_label("ann", item["pair_id"], "left", 0)
    main(*parse((LabelArgs, ExportArgs, RunArgs), ["--config", "configs/label.yaml", "--run", "r", "--runs_dir",
                                                   str(runs_dir), "--pairs_dataset", str(mine)]))
    card = (runs_dir / "r" / "label-export" / "README.md").read_text()
    assert "- **Pairs**: my_pairs.jsonl. Labels of pairs" in card and str(mine.parent) not in card
    # the run labels these pairs (label/own_pairs.txt, no pairs stage): `make label-export` by hand exports them too,
    # as `make rm` does (its card said "the pairs stage of this run", which publish refused, naming this command)
    (runs_dir / "r" / "label" / "own_pairs.txt").write_text(f"{mine}\n")
    shutil.rmtree(runs_dir / "r" / "label-export")
    main(*parse((LabelArgs, ExportArgs, RunArgs), ["--config", "configs/label.yaml", "--run", "r", "--runs_dir",
                                                   str(runs_dir)]))
    card = (runs_dir / "r" / "label-export" / "README.md").read_text()
    manifest = json.loads((runs_dir / "r" / "label-export" / "manifest.json").read_text())
    assert "- **Pairs**: my_pairs.jsonl. Labels of pairs" in card and manifest["config"]["label"]["pairs_dataset"] == str(mine)


def test_without_a_pairs_stage_the_pairs_the_store_loaded_last_are_the_current_ones(runs_dir, monkeypatch):
    from pipeline.run import is_current

    argv = ["--config", "configs/label.yaml", "--run", "r", "--runs_dir", str(runs_dir), "--overlap", "3"]
    monkeypatch.setattr("sys.argv", ["export", *argv])
    store = LabelStore(db_path(str(runs_dir), "r"))
    store.import_items([pair("a"), pair("b")])
    store.save_label("ann", "a", "left", 0)
    store.save_label("ann", "b", "left", 0)
    store.import_items([pair("b"), pair("c")])  # `make label` on new pairs: a stays in the store, inactive
    assert [(lab["pair_id"], lab["current"]) for lab in store.labels()] == [("a", False), ("b", True)]
    metrics = export_main(runs_dir)
    assert metrics["pairs"] == 1 and metrics["earlier_pairs_labels"] == 1
    assert is_current("label-export", argv) == (True, "")
    sample_pairs(runs_dir, "r", ["c"], "v1")  # a pairs stage that appears later decides from then on
    assert is_current("label-export", argv) == (False, "the pairs stage now exists")


NAMES_THAT_LOOK_LIKE_MARKUP = ["_eve_", "<img src=https://evil.example/x.png>", "a | b", "**bold**", "[link](http://a)",
                               "back\\slash `code`", "&amp;", "# head", "sim:sentiment-1"]


def test_the_dataset_card_shows_annotator_names_as_they_are(runs_dir):
    """Names are data, never markup: a login may be anything a users file holds. Rendered as Markdown (CommonMark with
    tables, as the Hub renders cards), each name's cell holds exactly the name, and no tag or emphasis appears."""
    import html

    from markdown_it import MarkdownIt

    from stages.label.config import LabelArgs
    from stages.label.export import aggregate, dataset_card

    store = LabelStore(db_path(str(runs_dir), "r"), overlap=len(NAMES_THAT_LOOK_LIKE_MARKUP))
    store.import_items([{"pair_id": "p", "prompt": [{"role": "user", "content": "Hi."}], "responses": ["a", "b"]}])
    for name in NAMES_THAT_LOOK_LIKE_MARKUP:
        store.save_label(name, "p", "left", 0)
    labels = store.labels()
    rows, dropped = aggregate(labels, "drop", "drop", 0.0)
    page = MarkdownIt("commonmark").enable("table").render(dataset_card(rows, labels, dropped, LabelArgs(), "", "x"))
    table = page[page.index("<tbody>", page.index("Who labeled")):]
    cells = [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
             for row in re.findall(r"<tr>(.*?)</tr>", table.split("</tbody>")[0], re.S)]
    assert sorted(c[0] for c in cells) == sorted(NAMES_THAT_LOOK_LIKE_MARKUP) and all(len(c) == 2 for c in cells)
    assert not re.search(r"<(img|em|strong|a|h1)\b", table)


def test_the_dataset_card_says_what_simulated_annotators_are_and_shows_people_their_guidelines(runs_dir):
    """Three sentiment judges' labels went out under "Guidelines shown to annotators" and people's helpful / honest /
    harmless guidelines: simulated annotators were shown none, and the card now says what they are; a store with
    people's labels too keeps the guidelines people saw."""
    from stages.label.config import LabelArgs
    from stages.label.export import aggregate, dataset_card

    store = LabelStore(db_path(str(runs_dir), "c"), overlap=4)
    store.import_items([{"pair_id": "p", "prompt": [{"role": "user", "content": "Hi."}], "responses": ["a", "b"]}])
    for name in ("sim:sentiment-1", "sim:sentiment-2", "sim:sentiment-3"):
        store.save_label(name, "p", "left", 0)

    def card():
        labels = store.labels()
        rows, dropped = aggregate(labels, "drop", "drop", 0.0)
        return dataset_card(rows, labels, dropped, LabelArgs(), "Be kind.", "x")

    simulated = card()
    assert "## Guidelines shown to annotators" not in simulated and "Be kind." not in simulated
    assert "## Simulated annotators\n\nThe `sim:` annotators are not people: `make simulate` labels each pair with a " \
           "gold judge (configs/simulate.yaml's `judge`; the story recipe's is `sentiment`, VADER's compound " \
           "sentiment of the reply, from -1, negative, to 1, positive)" in simulated
    store.save_label("alice", "p", "right", 0)
    both = card()
    assert "## Simulated annotators" in both and both.endswith("## Guidelines shown to annotators\n\nBe kind.\n")


def test_people_labels_are_exported_instead_of_simulated_ones_unless_asked(runs_dir):
    """A store with people's and simulated annotators' labels: `sources: auto` exports people's alone (three
    simulated votes would outvote a person on every pair), and the card says whose labels they are; `simulated` and
    `all` export those; `people` on a store without people's labels is one clear error that writes nothing."""
    import datasets

    from pipeline.config import RunArgs, parse
    from stages.label.config import ExportArgs, LabelArgs
    from stages.label.export import main
    from stages.label.fresh_export import export_is_current

    def export(run, *flags):
        argv = ["--config", "configs/label.yaml", "--run", run, "--runs_dir", str(runs_dir), "--overlap", "4", *flags]
        metrics = main(*parse((LabelArgs, ExportArgs, RunArgs), argv))
        out = runs_dir / run / "label-export"
        ds = datasets.load_from_disk(str(out / "dataset"))
        return metrics, {r["pair_id"]: (r["chosen"][0]["content"], r["annotator"]) for r in ds}, (out / "README.md").read_text()

    store = LabelStore(db_path(str(runs_dir), "r"), overlap=4)
    store.import_items([{"pair_id": p, "prompt": [{"role": "user", "content": p}], "responses": [f"{p} zero", f"{p} one"]}
                        for p in ("p1", "p2")])
    for sim in ("sim:sentiment-1", "sim:sentiment-2", "sim:sentiment-3"):
        store.save_label(sim, "p1", "left", 0)   # response 0
        store.save_label(sim, "p2", "left", 0)
    store.save_label("alice", "p1", "right", 0)  # alice: response 1, on p1 only

    metrics, rows, card = export("r")
    assert metrics["sources"] == "people" and metrics["other_sources_labels"] == 6 and metrics["labels"] == 1
    assert export_is_current(runs_dir / "r")  # the record is of the whole store, not of the labels exported
    assert rows == {"p1": ("p1 one", "alice")}
    assert "# Human preference labels" in card and "human-feedback" in card and "6 labels of other annotators" in card

    metrics, rows, card = export("r", "--sources", "simulated")
    assert metrics["sources"] == "simulated" and metrics["other_sources_labels"] == 1
    sims = "sim:sentiment-1,sim:sentiment-2,sim:sentiment-3"
    assert rows == {"p1": ("p1 zero", sims), "p2": ("p2 zero", sims)}
    assert "# Simulated preference labels" in card and "human-feedback" not in card and "not by people" in card

    metrics, rows, card = export("r", "--sources", "all")  # one vote each: 3 simulated against alice on p1
    assert metrics["sources"] == "all" and rows["p1"] == ("p1 zero", "alice," + sims) and len(rows) == 2
    assert "# Preference labels from people and simulated annotators" in card

    only_sim = LabelStore(db_path(str(runs_dir), "s"), overlap=4)
    only_sim.import_items([{"pair_id": "p", "prompt": [{"role": "user", "content": "p"}], "responses": ["a", "b"]}])
    only_sim.save_label("sim:sentiment", "p", "left", 0)
    assert export("s")[0]["sources"] == "simulated"  # auto, nobody labeled: the simulators stand in
    metrics, _, card = export("s", "--sources", "all")  # all of a store that holds no person's label: not human feedback
    assert metrics["sources"] == "simulated" and "human-feedback" not in card and "labeled by people" not in card
    tied = LabelStore(db_path(str(runs_dir), "m"), overlap=4)
    tied.import_items([{"pair_id": k, "prompt": [{"role": "user", "content": k}], "responses": ["a", "b"]} for k in "pq"])
    tied.save_label("sim:sentiment", "p", "left", 0)
    tied.save_label("alice", "q", "tie", 0)  # a person's only label, on a pair the export drops (ties: drop)
    metrics, _, card = export("m", "--sources", "all")
    assert metrics["sources"] == "simulated" and "human-feedback" not in card, card
    people = LabelStore(db_path(str(runs_dir), "h"), overlap=4)  # and a store of people's labels alone: not synthetic
    people.import_items([{"pair_id": "p", "prompt": [{"role": "user", "content": "p"}], "responses": ["a", "b"]}])
    people.save_label("alice", "p", "left", 0)
    metrics, _, card = export("h", "--sources", "all")
    assert metrics["sources"] == "people" and "synthetic" not in card and "human-feedback" in card
    before = files(runs_dir / "s")
    with pytest.raises(ConfigError, match=r"none of the 1 labels in .* is from people \(sources: people\)"):
        export("s", "--sources", "people")
    assert files(runs_dir / "s") == before


def test_the_export_records_the_store_it_read(runs_dir):
    """`make rm` exports again exactly when the store's labels are no longer the ones the export read: what the export
    records and what stages.label.fresh_export reads from the store are the same digest."""
    from stages.label.fresh_export import NEW_PAIRS, export_is_current, export_state

    store = labeled_run(runs_dir)
    run_dir = runs_dir / "r"
    assert export_state(run_dir) == NEW_PAIRS  # no export yet: the labels step simulates, then exports
    export_main(runs_dir)
    assert export_is_current(run_dir)
    store.skip("cat", "solo")  # a skip changes no label
    assert export_is_current(run_dir)
    for change in (lambda: store.save_label("cat", "solo", "tie", 0), lambda: store.undo("cat"),
                   lambda: store.save_label("ann", "maj", "right", 0, "slightly")):  # the strength alone
        change()
        assert not export_is_current(run_dir)
        export_main(runs_dir)
        assert export_is_current(run_dir)
    store.save_label("ann", "maj", "right", 0, "slightly", "a note")  # saved again as it was: the export is the same
    assert export_is_current(run_dir)
    store.import_items([])  # `make label` on another pairs dataset: the labeled pairs are no longer current
    assert not export_is_current(run_dir)


def test_a_store_change_that_leaves_the_rows_leaves_the_export(runs_dir, monkeypatch):
    """`make rm`'s labels step exports with --refresh: people labeling eval's pairs (`make label
    --pairs_dataset`), or a simulated annotator on a run where people labeled, change the store but not the rows, so
    the export is left byte for byte (and the reward model that read it stays current), with the store's new state
    recorded; a label of one of the run's pairs rewrites it."""
    import datasets

    from stages.label.fresh_export import export_is_current
    from stages.label.pairs import read_pairs

    sample_pairs(runs_dir, "r", ["a", "b"], "v1")
    store = LabelStore(db_path(str(runs_dir), "r"))
    store.import_items(read_pairs(str(runs_dir / "r/pairs/dataset-v1"), "pairs"))
    store.save_label("ann", "a", "left", 0)
    argv = ["--config", "configs/label.yaml", "--run", "r", "--runs_dir", str(runs_dir)]
    monkeypatch.setattr("sys.argv", ["export", *argv])

    def export(*extra):
        from pipeline.config import RunArgs, parse
        from stages.label.config import ExportArgs, LabelArgs
        from stages.label.export import main

        return main(*parse((LabelArgs, ExportArgs, RunArgs), [*argv, *extra]))

    export()
    out, run_dir = runs_dir / "r/label-export", runs_dir / "r"
    before = {k: v for k, v in files(out).items() if k != "store_digest.json"}
    store.import_items([pair("e1")])        # make label on eval's pairs: the run's pairs are no longer active ...
    store.save_label("ann", "e1", "right", 0)
    store.save_label("sim:sentiment", "b", "left", 0)  # ... and a simulated label where people labeled (auto: people's)
    assert not export_is_current(run_dir)
    metrics = export("--refresh", "true")
    assert metrics["rows"] == 1 and {k: v for k, v in files(out).items() if k != "store_digest.json"} == before
    assert export_is_current(run_dir)  # the next make rm: up to date, without calling the export
    store.save_label("ann", "b", "right", 0)  # a label of the run's pairs: rewritten
    assert not export_is_current(run_dir)
    assert export("--refresh", "true")["rows"] == 2 and files(out) != before
    assert export_is_current(run_dir)
    after = files(out)["manifest.json"]

    from stages.label.fresh_export import rows_digest  # rows in another order (a label undone and made again): the same set
    rows = datasets.load_from_disk(str(out / "dataset")).to_list()
    assert rows_digest(rows) == rows_digest(rows[::-1]) != rows_digest(rows[:1])
    assert rows_digest([dict(reversed(r.items())) for r in rows]) == rows_digest(rows)  # nor the order of its columns

    from stages.label.fresh_export import NEW_PAIRS, export_state

    sample_pairs(runs_dir, "r", ["a", "b"], "v2")  # sampled again, the same pairs: new pairs for the chain, same rows
    assert export_state(run_dir) == NEW_PAIRS
    export("--refresh", "true")
    assert files(out)["manifest.json"] == after and export_is_current(run_dir)

    # an export of an earlier version (no rows digest, no store record): its dataset's rows are compared
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["metrics"]["rows_digest"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "store_digest.json").unlink()
    before = {k: v for k, v in files(out).items() if k != "store_digest.json"}
    assert not export_is_current(run_dir)
    export("--refresh", "true")
    assert {k: v for k, v in files(out).items() if k != "store_digest.json"} == before and export_is_current(run_dir)


def test_an_export_of_an_earlier_version_is_judged_by_its_files_times(runs_dir):
    """An export without a store record (an earlier version wrote it): as its `make` judged it, pairs sampled after
    the export are new pairs (simulated, then exported), pairs older than it (or none) mean a stale export; no export
    at all is new pairs."""
    import os

    from stages.label.fresh_export import NEW_PAIRS, STALE, export_state

    run_dir = runs_dir / "r"
    assert export_state(run_dir) == NEW_PAIRS
    (run_dir / "label-export").mkdir(parents=True)
    (run_dir / "label-export" / "manifest.json").write_text("{}")
    os.utime(run_dir / "label-export" / "manifest.json", (1000, 1000))
    assert export_state(run_dir) == STALE  # no pairs stage
    (run_dir / "pairs").mkdir()
    (run_dir / "pairs" / "manifest.json").write_text("{}")
    for pairs_time, state in ((2000, NEW_PAIRS), (500, STALE)):
        os.utime(run_dir / "pairs" / "manifest.json", (pairs_time, pairs_time))
        assert export_state(run_dir) == state, pairs_time


def test_the_labels_step_exports_as_the_last_export_did_and_sees_its_config_change(runs_dir, tmp_path, monkeypatch):
    """`make label-export ARGS="--sources all"`, then people label and `make rm` runs: the labels step's export
    (--refresh) keeps `--sources all` (it replays the last export's flags, not its --push_to_hub) and records them
    again for the next one; an edit of the config file makes the export stale, and the refresh reads the new file."""
    import shutil

    from stages.label.export import command_line_main
    from stages.label.fresh_export import export_is_current

    config = tmp_path / "label.yaml"
    shutil.copy("configs/label.yaml", config)
    store = LabelStore(db_path(str(runs_dir), "r"), overlap=4)
    store.import_items([pair("p1"), pair("p2")])
    store.save_label("sim:sentiment", "p1", "left", 0)
    store.save_label("alice", "p2", "left", 0)
    base = ["export", "--config", str(config), "--run", "r", "--runs_dir", str(runs_dir)]

    def run(*flags):
        monkeypatch.setattr("sys.argv", [*base, *flags])
        return command_line_main()

    assert run("--sources", "all")["sources"] == "all"
    store.save_label("alice", "p1", "right", 0)
    assert not export_is_current(runs_dir / "r")
    metrics = run("--refresh", "true")
    # p1's one-one split (sim left, alice right) is dropped: the rows left are alice's alone
    assert metrics["sources"] == "people" and metrics["labels"] == 3
    argv = json.loads((runs_dir / "r/label-export/manifest.json").read_text())["inputs"]["argv"]
    assert argv == base[1:] + ["--sources", "all"]
    assert export_is_current(runs_dir / "r")

    monkeypatch.setattr("stages.label.export.check_online", lambda repo: None)
    pushed = []
    monkeypatch.setattr("stages.label.export.push", lambda ds, card, repo, private: pushed.append(repo))
    run("--push_to_hub", "me/prefs")
    assert pushed == ["me/prefs"]
    store.save_label("alice", "p1", "left", 0)
    assert run("--refresh", "true")["pushed_to"] is None and pushed == ["me/prefs"]

    config.write_text(config.read_text().replace("sources: auto", "sources: simulated"))
    assert not export_is_current(runs_dir / "r")  # the config changed, the store did not
    assert run("--refresh", "true")["sources"] == "simulated"
    assert export_is_current(runs_dir / "r")


def test_a_refresh_from_the_command_line_leaves_an_export_whose_rows_are_the_same(runs_dir, monkeypatch):
    """`make rm`'s labels step runs the export's command line with --refresh: command_line_main replays the last
    export's flags (which hold no --refresh) and must still refresh, so that a store change that leaves the rows (a
    simulated label where people labeled, sources auto) leaves the export byte for byte, its manifest included (a new
    manifest makes `make` retrain the reward model)."""
    from stages.label.export import command_line_main

    store = LabelStore(db_path(str(runs_dir), "r"))
    store.import_items([pair("p1"), pair("p2")])
    store.save_label("alice", "p1", "left", 0)
    base = ["export", "--config", "configs/label.yaml", "--run", "r", "--runs_dir", str(runs_dir)]
    monkeypatch.setattr("sys.argv", base)
    command_line_main()
    out = runs_dir / "r/label-export"
    before = {k: v for k, v in files(out).items() if k != "store_digest.json"}
    store.save_label("sim:sentiment", "p2", "left", 0)  # people's labels are the ones exported: the rows are the same
    monkeypatch.setattr("sys.argv", [*base, "--refresh", "true"])
    assert command_line_main()["rows"] == 1
    assert {k: v for k, v in files(out).items() if k != "store_digest.json"} == before


def test_the_leftovers_of_an_export_another_user_runs_now_are_kept(runs_dir, monkeypatch):
    """A `.label-export.new-PID` whose process the system will not signal (PermissionError: another user's, alive) is
    an export running now, not a killed one's leftover: the next export leaves it alone."""
    from stages.label import export

    out, theirs = runs_dir / "r/label-export", runs_dir / "r/.label-export.new-4242"
    theirs.mkdir(parents=True)

    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(export.os, "kill", kill)
    assert export.process_alive(4242)
    export.clear_killed_exports(out)
    assert theirs.is_dir()


def test_a_refresh_replays_the_last_exports_flags_in_this_run(runs_dir):
    """The run's own --config, --run and --runs_dir (a run folder copied under another name exports itself; given as
    --flag value or --flag=value), every other flag of the last export's command line, flags without a value and lists
    included, never a push."""
    from stages.label.fresh_export import last_command_line

    manifest = runs_dir / "r/label-export/manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"inputs": {"argv": [
        "--config", "old.yaml", "--run", "old", "--runs_dir", "elsewhere", "--sources", "all", "--hub_private",
        "--push_to_hub", "me/p", "--offensive_words", "a", "b", "--ties", "both_orders", "--refresh", "true",
        "--push_to_hub=me/q", "--hub_private=true", "--run=other", "--refresh=true"]}}))
    now = ["--config", "configs/label.yaml", "--run", "r", "--runs_dir", str(runs_dir), "--refresh", "true"]
    assert last_command_line(now) == ["--config", "configs/label.yaml", "--run", "r", "--runs_dir", str(runs_dir),
                                      "--sources", "all", "--offensive_words", "a", "b", "--ties", "both_orders"]
    given = ["--config=configs/label.yaml", "--run=r", f"--runs_dir={runs_dir}", "--refresh=true"]  # flag=value: the same
    assert last_command_line(given) == given[:3] + ["--sources", "all", "--offensive_words", "a", "b", "--ties", "both_orders"]
    manifest.unlink()  # no export yet: this command line without --refresh
    assert last_command_line(now) == now[:-2]


def test_the_freshness_check_without_its_run_folder_is_a_usage_error(runs_dir):
    """`python -m stages.label.fresh_export` alone was an IndexError traceback: it is one error line naming what to
    give, exit 2 (as a store that cannot be read), and so is a second argument; with the folder it answers (4: no
    export yet)."""
    for args in ([], [str(runs_dir / "r"), "extra"]):
        proc = run_python("stages.label.fresh_export", args)
        assert (proc.returncode, proc.stdout, proc.stderr) == (
            2, "", "error: give the run folder: python -m stages.label.fresh_export runs/<RUN> [-- <simulate's flags>]\n"), args
    assert run_python("stages.label.fresh_export", [str(runs_dir / "r")]).returncode == 4
    assert run_python("stages.label.fresh_export", [str(runs_dir / "r"), "--", "--run", "r"]).returncode == 4


def test_the_card_says_how_peoples_labels_reached_the_store_as_far_as_it_knows(runs_dir):
    """A script that labels through `make label`'s Gradio API (gradio_client, as tests/test_label_api.py does) stores
    labels the store cannot tell from clicks on the page: it records the annotator only. The export card said "labeled
    by people in this project's Gradio labeling UI", and `make publish --include_dataset`'s "collected with the
    pipeline's labeling UI": now the app, its page or its API, for people's labels and for people's beside simulated."""
    from stages.label.export import WHOSE

    labeled_run(runs_dir)  # as any client of the app stores them: LabelStore.save_label
    export_main(runs_dir)
    card = (runs_dir / "r" / "label-export" / "README.md").read_text()
    how = "`make label`: its page in a browser, or its Gradio API, which the label store does not tell apart"
    assert (f"Pairs of model responses labeled by people through this project's labeling app ({how}), exported with "
            "`make label-export`.") in card
    assert WHOSE["people"].pairs == ("human preference pairs collected with the pipeline's labeling app (`make pairs "
                                     "label label-export`: its page in a browser, or its Gradio API, which the label "
                                     "store does not tell apart)")
    assert how in WHOSE["all"].who and how in WHOSE["all"].pairs
    for whose in WHOSE.values():  # no card of any source credits a UI the store cannot vouch for
        assert " UI" not in " ".join((whose.who, whose.pairs, whose.short, whose.title)), whose


def test_simulated_labels_from_other_settings_are_refused_unless_people_labeled(tmp_path):
    """The chain's labels step does not redraw simulated labels that simulate gave with another command line (a `make
    simulate ARGS=...`, other SIMULATE_ARGS): one error naming SIMULATE_ARGS; --skip_if_people_labeled, which changes no
    label, is no change; once people have labeled (the export theirs, or a label of theirs in the store) the chain
    does not simulate over them, so nothing is said."""
    import json

    from stages.label.fresh_export import simulated_otherwise

    run_dir = tmp_path / "r"
    for stage, content in (("label-export", {"metrics": {"sources": "simulated"}}),
                           ("simulate", {"inputs": {"argv": ["--run", "r", "--annotators", "3"], "files": {}}})):
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / "manifest.json").write_text(json.dumps(content))
    store = LabelStore(run_dir / "label" / "labels.sqlite")
    store.import_items([{"pair_id": "p", "prompt": [{"role": "user", "content": "p"}], "responses": ["a", "b"]}])
    store.save_label("sim:sentiment", "p", "left", 0)
    assert simulated_otherwise(run_dir, ["--run", "r", "--skip_if_people_labeled", "true", "--annotators", "3"]) is None
    assert simulated_otherwise(run_dir, ["--run", "r", "--annotators", "3", "--skip_if_people_labeled=true"]) is None
    with pytest.raises(ConfigError, match=r"simulate ran with another command line than `make` would give it now "
                                          r"\(was: --run r --annotators 3\): .*give them in SIMULATE_ARGS on every `make`"):
        simulated_otherwise(run_dir, ["--run", "r", "--annotators", "2"])
    store.save_label("ann", "p", "right", 0)  # a person labeled: the chain does not simulate over them
    assert simulated_otherwise(run_dir, ["--run", "r", "--annotators", "2"]) is None
    store.undo("ann")
    (run_dir / "label-export" / "manifest.json").write_text(json.dumps({"metrics": {"sources": "people"}}))
    assert simulated_otherwise(run_dir, ["--run", "r", "--annotators", "2"]) is None
