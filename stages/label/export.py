"""`make label-export`: the label store -> a preference dataset that TRL's RewardTrainer and DPOTrainer read unchanged.

    python -m stages.label.export --config configs/label.yaml --run default [--push_to_hub user/name]
    make label-export ARGS="--ties both_orders --both_bad tie"

One row per labeled pair of the current pairs dataset (`earlier_pairs: keep` adds the labels of pairs from earlier
ones, which the store keeps): `prompt` (messages), `chosen` / `rejected` (one assistant message each), plus
`annotator` (everyone who labeled it), `n_annotators`, `strength` (slightly / much / ""), `agreement` (share of
votes for the winning outcome), `is_tie`, `pair_id`. Several annotators on a pair: majority vote; no majority (more
than half the votes for one outcome: one vote each way, or 2 of 4 as in A, B, B, tie) drops the pair. Ties and "both bad" follow `ties` and `both_bad` in configs/label.yaml.
Writes runs/<run>/label-export/: dataset/ (save_to_disk), README.md (the dataset card), manifest.json.
All of it is written into a new folder next to it first, which replaces the previous export only once complete:
an export that fails or is killed leaves the previous one as it was (`make rm` reads it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, RunArgs, check_hub_repo_id, parse, to_dict
from pipeline.judges import describe_judge
from pipeline.run import StageRun, atomic_write_json, finished_line, main_guard, manifest_digest
from stages.label.config import ExportArgs, LabelArgs, db_path, default_to_own_pairs
from stages.label.stats import category, summarize
from stages.label.store import is_simulated
from stages.label.fresh_export import last_command_line, last_rows_digest, rows_digest, write_store_record


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def aggregate(labels: list[dict], ties: str = "drop", both_bad: str = "drop", min_agreement: float = 0.0):
    """Majority vote per pair: an outcome needs more than half the pair's votes. Returns (rows, dropped counts by
    reason)."""
    by_pair: dict[str, list[dict]] = defaultdict(list)
    for lab in labels:
        by_pair[lab["pair_id"]].append(lab)
    rows, dropped = [], Counter()
    for pair_id, labs in by_pair.items():
        votes = [category(lab) for lab in labs]  # '0' / '1' (winning response), 'tie', 'both_bad'
        if both_bad == "tie":
            votes = ["tie" if v == "both_bad" else v for v in votes]
        ranked = Counter(votes).most_common()
        outcome, n_top = ranked[0]
        if 2 * n_top <= len(votes):  # the most votes is not a majority: B of A, B, B, tie has half, A and tie the rest
            dropped["no_majority"] += 1
            continue
        agreement = n_top / len(votes)
        if agreement < min_agreement:
            dropped["low_agreement"] += 1
            continue
        if outcome == "both_bad":
            dropped["both_bad"] += 1
            continue
        if outcome == "tie" and ties == "drop":
            dropped["tie"] += 1
            continue
        # The strength more than half the winning votes gave (a vote without one counts): most_common's first of
        # equals was the first label saved, so an undo and the same label again changed the export.
        strengths = [lab["strength"] or "" for lab, v in zip(labs, votes) if v == outcome]
        top, n_strength = Counter(strengths).most_common(1)[0]
        common = dict(pair_id=pair_id, prompt=labs[0]["prompt"],
                      annotator=",".join(sorted(lab["annotator"] for lab in labs)), n_annotators=len(labs),
                      strength=top if 2 * n_strength > len(strengths) else "",
                      agreement=round(agreement, 4), is_tie=outcome == "tie")
        responses = labs[0]["responses"]
        if outcome == "tie":  # both orders: their Bradley-Terry gradients cancel, so the rewards are pulled together
            rows.append({**common, "chosen": _assistant(responses[0]), "rejected": _assistant(responses[1])})
            rows.append({**common, "chosen": _assistant(responses[1]), "rejected": _assistant(responses[0])})
        else:
            win = int(outcome)
            rows.append({**common, "chosen": _assistant(responses[win]), "rejected": _assistant(responses[1 - win])})
    return rows, dropped


@dataclass(frozen=True)
class Whose:
    """How everything that describes an export (its card, `make publish`'s dataset and model cards, errors) says whose
    labels it holds: a dataset of simulated labels must never pass for human feedback."""
    tags: tuple[str, ...]  # the Hub tags that say it
    title: str             # the export card's heading
    who: str               # the export card's first sentence
    pairs: str             # publish's dataset card: "<N> <pairs>"
    short: str             # the model card's data row: "<short> of this run"
    from_whom: str         # "the labels <from_whom>"


# How people's labels reached the store, as far as it knows: it records each label's annotator (a login, or a typed
# name), not whether it was clicked on `make label`'s page or sent to the same app's Gradio API by a script
# (tests/test_label_api.py), so no card may say the labels were made in the UI.
HOW = ": its page in a browser, or its Gradio API, which the label store does not tell apart"

WHOSE = {
    "people": Whose(("human-feedback",), "Human preference labels",
                    f"Pairs of model responses labeled by people through this project's labeling app (`make label`{HOW})",
                    f"human preference pairs collected with the pipeline's labeling app (`make pairs label "
                    f"label-export`{HOW})", "human labels", "from people"),
    "simulated": Whose(("synthetic",), "Simulated preference labels",
                       "Pairs of model responses labeled by simulated annotators (`make simulate`: a gold judge's scores "
                       "with Bradley-Terry noise, standing in for people), not by people",
                       "preference pairs labeled by simulated annotators, not people (`make pairs simulate "
                       "label-export`: a gold judge's scores with Bradley-Terry noise)",
                       "simulated annotators' labels (not people's)", "from simulated annotators"),
    "all": Whose(("human-feedback", "synthetic"), "Preference labels from people and simulated annotators",
                 f"Pairs of model responses labeled by people through this project's labeling app (`make label`{HOW}) "
                 "and by simulated annotators (`make simulate`, annotators named `sim:...`), one vote each",
                 f"preference pairs labeled by people through the pipeline's labeling app (`make label`{HOW}) and by "
                 "simulated annotators (`sim:...`), one vote each", "human and simulated annotators' labels",
                 "from people and simulated annotators"),
}


def pick_sources(labels: list[dict], sources: str) -> tuple[list[dict], str]:
    """The labels of the annotators `sources` names, and whose those are ("people", "simulated" or "all").
    auto: people's when there are any, else the simulated annotators'. The simulators stand in for people, so once
    people have labeled, their votes are not outvoted by three simulated ones on the same pair. all: every label (whose
    the exported rows then are, main() reads from them: a store of simulated labels alone, exported with `all`, was
    carded as human feedback)."""
    people = [lab for lab in labels if not is_simulated(lab["annotator"])]
    if sources == "auto":
        sources = "people" if people else "simulated"
    if sources == "people":
        return people, sources
    if sources == "simulated":
        return [lab for lab in labels if is_simulated(lab["annotator"])], sources
    return labels, sources


MARKDOWN_SPECIALS = "\\`*_[]()|#!~<>&"


def markdown_literal(text: str) -> str:
    """Text shown as itself in Markdown (a table cell included): every character Markdown or HTML could read as markup
    escaped, so a login like `<img src=...>` or `_eve_` is a name, not an image or italics."""
    return "".join(f"&#{ord(c)};" if c in "<>&" else ("\\" + c if c in MARKDOWN_SPECIALS else c) for c in text)


def sources_of(annotator_cells) -> str:
    """Whose labels an exported dataset holds ("people", "simulated" or "all"), from its `annotator` column."""
    simulated = {is_simulated(name) for cell in annotator_cells for name in cell.split(",")}
    return "all" if len(simulated) == 2 else "simulated" if simulated == {True} else "people"


def dataset_card(rows: list[dict], labels: list[dict], dropped: Counter, args: LabelArgs, guidelines: str,
                 pairs_source: str, n_earlier: int = 0, sources: str = "people", n_other: int = 0,
                 summary: dict | None = None) -> str:
    s = summarize(labels) if summary is None else summary  # the export's own, computed once
    whose = WHOSE[sources]
    ag = s["agreement"]
    people = "\n".join(f"| {markdown_literal(name)} | {a['labels']} |" for name, a in s["annotators"].items())
    dropped_text = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(dropped.items())) or "none"
    # What the exported labels hold (3 simulated annotators label every pair), not the `overlap` people are served with
    per_pair = Counter(Counter(lab["pair_id"] for lab in labels).values())
    annotators = ", ".join(f"{k} on {n} pair{'s' * (n != 1)}" for k, n in sorted(per_pair.items())) or "none"
    return f"""---
tags: [{", ".join(("trl", "preference", *whose.tags, "rlhf"))}]
---
# {whose.title}

{whose.who}, exported with `make label-export`. Format: TRL conversational preference (`prompt`, `chosen`, `rejected`), read unchanged by
`RewardTrainer` and `DPOTrainer`.

- **Rows**: {len(rows)} from {len({r['pair_id'] for r in rows})} pairs ({s['labels']} labels in all).
- **Pairs left out**: {dropped_text}. Ties: `{args.ties}`; both bad: `{args.both_bad}`; min agreement: {args.min_agreement}.
- **Whose labels**: {WHOSE[sources].from_whom} (`sources: {args.sources}`); {n_other} labels of other annotators in the store left out.
- **Annotators per pair**: {annotators} (people are served each pair up to `overlap: {args.overlap}` times). Majority vote where several annotators labeled a pair.
- **Agreement**: {ag['pairs_with_several_labels']} pairs with 2+ labels; Krippendorff's alpha (nominal) {ag['krippendorff_alpha']},
  mean pairwise Cohen's kappa {ag['mean_cohen_kappa']}.
- **Position bias**: the left side won {s['position_bias']['left_share']} of decided labels (left/right order was randomized per annotator).
- **Pairs**: {pairs_source}. Labels of pairs from earlier pairs datasets: {n_earlier}, {"kept" if args.earlier_pairs == "keep" else "left out"} (`earlier_pairs: {args.earlier_pairs}`).

Columns: `annotator` (everyone who labeled the pair, comma-separated), `n_annotators`, `strength` (slightly / much /
empty: what more than half the winning votes gave, a vote without one included; empty without such a majority), `agreement` (share of votes for the winning outcome), `is_tie`,
`pair_id` (hash of prompt and responses).

## Who labeled

| annotator | labels |
|---|---:|
{people}

{guidelines_section(s["annotators"], guidelines)}"""


def guidelines_section(annotators, guidelines: str) -> str:
    """The guidelines people were shown; simulated annotators (`sim:<judge>[-k]`) were shown none: the card says what
    they stand in for instead (it listed people's helpful/honest/harmless guidelines for three sentiment judges)."""
    simulated = ""
    if any(is_simulated(name) for name in annotators):  # their names are settings (--annotator), not their judge's
        simulated = ("## Simulated annotators\n\nThe `sim:` annotators are not people: `make simulate` labels each pair "
                     "with a gold judge (configs/simulate.yaml's `judge`; the story recipe's is `sentiment`, "
                     f"{describe_judge('sentiment')}), preferring the reply it scores higher through a noisy "
                     "Bradley-Terry choice (by default calibrated to agree with the judge about as often as people agree "
                     "with each other). They are shown no guidelines.\n")
    if all(is_simulated(name) for name in annotators) and annotators:
        return simulated
    return simulated + ("\n" if simulated else "") + f"## Guidelines shown to annotators\n\n{guidelines}\n"


def check_online(repo: str) -> None:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError("--push_to_hub needs the Hub but HF_HUB_OFFLINE=1 (the Makefile's default): run "
                          f"`HF_HUB_OFFLINE=0 make label-export ARGS='--push_to_hub {repo}'` after `hf auth login`")


def push(ds, card_text: str, repo: str, private: bool) -> None:
    """Push the data, then our card on top of the one `push_to_hub` wrote (keeping its config/dataset_info YAML)."""
    check_online(repo)
    from huggingface_hub import DatasetCard

    ds.push_to_hub(repo, private=private)
    ours = DatasetCard(card_text)
    try:
        card = DatasetCard.load(repo)
        card.data.update({k: v for k, v in ours.data.to_dict().items() if k not in card.data.to_dict()})
        card.text = ours.text
    except Exception:  # no card on the Hub yet: ours alone
        card = ours
    card.push_to_hub(repo, repo_type="dataset", commit_message="Dataset card: annotators, guidelines, agreement")


def current_pair_ids(args: LabelArgs, stage: StageRun) -> set[str] | None:
    """The pair_ids of the pairs the labels are for now: --pairs_dataset, else the run's pairs stage, as `make label`
    would serve them (even before it has). None when the run has neither: the store's record of the pairs it last
    loaded decides."""
    from stages.label.__main__ import load_pairs

    stage.may_read("pairs")  # pairs sampled again make the export out of date
    if not args.pairs_dataset and not (stage.dir.parent / "pairs" / "manifest.json").is_file():
        return None
    return {pair["pair_id"] for pair in load_pairs(args, stage)}


def replace_folder(new: Path, final: Path) -> None:
    """Put the complete folder `new` in the place of `final`, by renames: readers see the old export or the new one.
    (For the instant between the two renames there is none; `make rm` then refuses instead of training without it.)"""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_killed_exports(final: Path) -> None:
    """What an export killed before it finished left beside `final` (replace_folder's names; kill -9 runs no clean-up):
    its half-built `.NAME.new-PID`, which no later export deleted (each deletes only its own pid's), and, killed between
    the two renames, the last export as `.NAME.old-PID`, which goes back in place when `final` is missing (the export
    it was replaced for never arrived). Those of a live process, an export running now, are its own."""
    for leftover in sorted(final.parent.glob(f".{final.name}.new-*")) + sorted(final.parent.glob(f".{final.name}.old-*")):
        pid = leftover.name.rsplit("-", 1)[1]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if ".old-" in leftover.name and not final.exists():
            os.rename(leftover, final)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def main(args: LabelArgs, export: ExportArgs, run: RunArgs) -> dict:
    import datasets

    from pipeline.report import print_table
    from stages.label.config import read_guidelines
    from stages.label.store import LabelStore, labels_digest

    stage = StageRun("label-export", run.run, run.runs_dir)
    default_to_own_pairs(args, run.runs_dir, run.run, "label-export")  # as `make rm`'s labels step exports them
    config = {"label": to_dict(args), "export": to_dict(export), "run": to_dict(run)}
    if export.push_to_hub:
        check_hub_repo_id(export.push_to_hub, "--push_to_hub")
        check_online(export.push_to_hub)
    db = db_path(run.runs_dir, run.run)
    if not db.is_file():
        raise ConfigError(f"no label store at {db}: label some pairs first with `make label RUN={run.run}`")

    labels = LabelStore(db, overlap=args.overlap).labels()  # a damaged store stops here, the last export untouched
    store_state = labels_digest(labels)  # `make rm`'s labels step calls the export again once the store is not in it
    if not labels:
        raise ConfigError(f"the label store {db} holds no labels yet: label some pairs with `make label RUN={run.run}`")
    # Pairs of an earlier pairs dataset keep their labels in the store; by default only the current pairs' labels are
    # exported, so that sampling pairs again does not mix labels of other responses into the reward model unnoticed.
    current = current_pair_ids(args, stage)
    is_current = (lambda lab: lab["pair_id"] in current) if current is not None else (lambda lab: lab["current"])
    n_earlier = sum(not is_current(lab) for lab in labels)
    people_earlier = sum(not is_current(lab) and not is_simulated(lab["annotator"]) for lab in labels)
    if args.earlier_pairs == "drop":
        labels = [lab for lab in labels if is_current(lab)]
        if not labels:
            raise ConfigError(f"all {n_earlier} labels in {db} are of pairs from an earlier pairs dataset: label the "
                              f"current pairs with `make label RUN={run.run}`, or export the earlier ones too with "
                              "`earlier_pairs: keep` in configs/label.yaml (or --earlier_pairs keep)")
    n_read = len(labels)
    labels, sources = pick_sources(labels, args.sources)
    if people_earlier and args.earlier_pairs == "drop" and sources == "simulated":
        # e.g. the pairs were sampled again (another pairs config, an upgrade): people's work would go unused unsaid
        print(f"note: the {people_earlier} labels people gave in {db} are of pairs sampled before (an earlier pairs "
              f"dataset) and are left out: this export holds simulated labels only. Label the current pairs with `make "
              f"label RUN={run.run}`, or export the earlier ones too with --earlier_pairs keep", file=sys.stderr)
    if not labels:
        raise ConfigError(f"none of the {n_read} labels in {db} is {WHOSE[sources].from_whom} (sources: {args.sources}): "
                          f"label with `make label RUN={run.run}` or `make simulate RUN={run.run}`, or export the "
                          f"others with --sources auto or all")
    if len(labels) < n_read:  # e.g. the first people's labels on a run the simulated annotators labeled: say so
        print(f"label-export: the {len(labels)} labels {WHOSE[sources].from_whom} are exported, the {n_read - len(labels)} "
              f"of other annotators left out (sources: {args.sources}; --sources all exports both, one vote each)")
    rows, dropped = aggregate(labels, args.ties, args.both_bad, args.min_agreement)
    if not rows:
        raise ConfigError(f"all {len(labels)} labels were left out ({dict(dropped)}): label more pairs, or keep ties "
                          f"with --ties both_orders / --both_bad tie")
    if sources == "all":  # whose the exported rows are: people's labels may all have fallen on dropped pairs (ties)
        sources = sources_of([row["annotator"] for row in rows])
    rows_state = rows_digest(rows)
    read_files = stage.inputs(config)["files"]
    pairs_state = manifest_digest(stage.upstream.get("pairs"))
    clear_killed_exports(stage.dir)  # an export killed between its renames had left none in place: the last one back
    if export.refresh and last_rows_digest(stage) == rows_state:
        # e.g. people labeled eval's pairs, or the pairs were sampled again alike: the reward model's data is the same,
        # so it is not retrained
        write_store_record(stage.dir, store_state, read_files, pairs_state)
        print(f"label-export: the export's {len(rows)} rows would be the same: left as it is")
        return json.loads(stage.manifest_path.read_text())["metrics"]
    guidelines = read_guidelines(args.guidelines)
    pairs_source = (Path(args.pairs_dataset).name if os.path.isabs(args.pairs_dataset) else args.pairs_dataset) \
        if args.pairs_dataset else "the pairs stage of this run"  # a name, not this machine's path: the card is public
    if "pairs" in stage.upstream:  # the base by name, not the path it has here (the card goes to the Hub)
        base = str(stage.upstream["pairs"]["metrics"].get("policy", "")).split(" + ")[0]
        shown = Path(base).name if base and os.path.isabs(base) else base
        pairs_source = "sampled by `make pairs` from this run's SFT policy" + (f" (base: `{shown}`)" if shown else "")

    new = stage.dir.with_name(f".{stage.dir.name}.new-{os.getpid()}")  # becomes stage.dir once complete
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    try:
        ds = datasets.Dataset.from_list(rows)
        ds.save_to_disk(str(new / "dataset"))
        s = summarize(labels)
        card = dataset_card(rows, labels, dropped, args, guidelines, pairs_source, n_earlier, sources, n_read - len(labels),
                            summary=s)
        (new / "README.md").write_text(card)
        atomic_write_json(new / "config.json", config)
        if export.push_to_hub:
            push(ds, card, export.push_to_hub, export.hub_private)

        metrics = {"rows": len(rows), "pairs": len({r["pair_id"] for r in rows}), "labels": len(labels),
                   "annotators": len(s["annotators"]), "dropped": dict(dropped),
                   "earlier_pairs_labels": n_earlier, "earlier_pairs": args.earlier_pairs,
                   "sources": sources, "other_sources_labels": n_read - len(labels), "rows_digest": rows_state,
                   "krippendorff_alpha": s["agreement"]["krippendorff_alpha"],
                   "left_share": s["position_bias"]["left_share"], "pushed_to": export.push_to_hub}
        stage.manifest_path = new / "manifest.json"  # the manifest travels with the folder; its paths name the final one
        manifest = stage.finish({"dataset": stage.dir / "dataset", "card": stage.dir / "README.md", "labels_sqlite": db},
                                metrics, config, announce=False)
        write_store_record(new, store_state, read_files, pairs_state)
        replace_folder(new, stage.dir)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    print_table("label-export", metrics)
    print(finished_line(stage.stage, stage.dir, manifest["outputs"], manifest["wall_time_s"]), flush=True)
    return metrics


def CONFIG_CLASSES():
    return (LabelArgs, ExportArgs, RunArgs)


def command_line_main() -> dict:
    argv = sys.argv[1:]
    if parse(CONFIG_CLASSES(), argv)[1].refresh:
        argv = last_command_line(argv)
        sys.argv[1:] = argv  # what the manifest records: the next refresh replays it again
        try:
            label, export, run = parse(CONFIG_CLASSES(), argv)
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"the flags of the run's last label export no longer apply ({err}): export once with "
                              "`make label-export` (configs/label.yaml alone, or your ARGS), then `make rm` again") from None
        export.refresh = True
        return main(label, export, run)
    return main(*parse(CONFIG_CLASSES(), argv))


if __name__ == "__main__":
    main_guard(command_line_main)
