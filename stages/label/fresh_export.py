"""Does a run's label export hold the store's labels and the run's pairs as they are now? Exit 0 when it does; 4 when
the pairs were sampled again (or there is no export yet), or a file simulate read (configs/simulate.yaml, a file it
names) changed since it drew the simulated labels the export holds (other flags than it ran with: an error, exit 2);
3 when labels were added, changed or removed since it was
written, or a file it read changed (configs/label.yaml, the guidelines); 2 on a store that cannot be read. The story
chain's `labels` step of `make rm` then exports again (after simulating new pairs), with `--refresh`: as the last
export did, rewriting only when its rows differ. So people's labels from `make label`, or a `make simulate` with other
settings, reach the reward model without a separate `make label-export`.

    python -m stages.label.fresh_export runs/default [-- <the flags the chain runs stages.simulate with>]

Also here: what the export records for that check (`write_store_record`, `rows_digest`) and the command line a
refresh replays (`last_command_line`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

CURRENT, STALE, NEW_PAIRS = 0, 3, 4  # not 1: an unexpected exception exits 1, and must not read as "export again"


def export_state(run_dir: Path, simulate_flags: list[str] | None = None) -> int:
    """CURRENT when the store's labels, the files the export read (configs/label.yaml, the guidelines) and the run's
    pairs are those the export last read; NEW_PAIRS when the pairs changed (or there is no export yet), or a file
    simulate read changed since it drew the export's simulated labels (simulated_otherwise, `simulate_flags` being the
    chain's command line for it): the chain simulates first; STALE when the store or a file changed. The export writes the record beside its manifest;
    `--refresh` rewrites it when they changed but its rows did not."""
    from pipeline.config import resolve_path
    from pipeline.run import inputs_changed
    from stages.label.store import STORE_RECORD, store_digest

    run_dir = resolve_path(run_dir)  # as the stages resolve RUNS_DIR: from the repository, whatever the working directory
    export_dir, pairs = run_dir / "label-export", run_dir / "pairs" / "manifest.json"
    if not (export_dir / "manifest.json").is_file():
        return NEW_PAIRS
    try:
        record = json.loads((export_dir / STORE_RECORD).read_text())
        stored, files, pairs_then = record["store_digest"], dict(record["files"]), record["pairs"]
    except (OSError, ValueError, KeyError, TypeError):  # an export of an earlier version: as its `make` judged it
        newer = pairs.is_file() and pairs.stat().st_mtime > (export_dir / "manifest.json").stat().st_mtime
        return NEW_PAIRS if newer else STALE
    if inputs_changed({}, {"pairs": pairs_then}, str(run_dir.parent), run_dir.name):
        return NEW_PAIRS
    same = stored == store_digest(run_dir / "label" / "labels.sqlite") and \
        not inputs_changed(files, {}, str(run_dir.parent), run_dir.name)  # first: an unreadable store is an error
    if simulate_flags is not None and (why := simulated_otherwise(run_dir, simulate_flags)):
        print(f"labels: a file the simulated annotators read changed ({why}): labeling the pairs again")
        return NEW_PAIRS
    return CURRENT if same else STALE


def simulated_otherwise(run_dir: Path, flags: list[str]) -> str | None:
    """Why the simulated labels the run's export holds must be drawn again (a file simulate read changed: its config,
    a file it names), in words; None when they are current, when people have labeled (the chain does not simulate
    over them) or when simulate recorded no inputs. Simulate last run with another command line than `flags` (other
    SIMULATE_ARGS, or `make simulate ARGS=...`) is a ConfigError: as any stage reached through the chain, it is not
    redrawn with other flags unasked (a redraw replaces every simulated label). `make simulate` and the chain differ
    only in --skip_if_people_labeled, which changes no label."""
    from pipeline.config import ConfigError
    from pipeline.run import inputs_changed

    try:
        if json.loads((run_dir / "label-export" / "manifest.json").read_text())["metrics"].get("sources") == "people":
            return None
        inputs = json.loads((run_dir / "simulate" / "manifest.json").read_text())["inputs"]
        argv, files = list(inputs["argv"]), dict(inputs["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if people_labeled(run_dir / "label" / "labels.sqlite"):
        return None
    if without_skip_flag(argv) != without_skip_flag(flags):
        raise ConfigError(f"simulate ran with another command line than `make` would give it now (was: "
                          f"{' '.join(without_skip_flag(argv))}): the labels step does not draw its labels again with "
                          f"other flags unasked; give them in SIMULATE_ARGS on every `make` (as it ran, or as you want "
                          f"them: `make simulate SIMULATE_ARGS=...` draws them so)")
    return inputs_changed(files, {}, str(run_dir.parent), run_dir.name)


def people_labeled(db: Path) -> bool:
    """Whether the store holds a label from a person (not a simulated annotator): read-only, nothing created."""
    import sqlite3

    from stages.label.store import SIMULATED_PREFIX

    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return con.execute("SELECT 1 FROM labels WHERE substr(annotator, 1, ?) != ? LIMIT 1",
                           (len(SIMULATED_PREFIX), SIMULATED_PREFIX)).fetchone() is not None
    finally:
        con.close()


def without_skip_flag(flags: list[str]) -> list[str]:
    out, words = [], iter(flags)
    for w in words:
        if w == "--skip_if_people_labeled":
            next(words, None)
        elif not w.startswith("--skip_if_people_labeled="):
            out.append(w)
    return out


def export_is_current(run_dir: Path) -> bool:
    return export_state(run_dir) == CURRENT


# ------------------------------------------------------------------ what the export records and replays (stages.label.export)

def rows_digest(rows: list[dict]) -> str:
    """Of the rows as a set: an undo and the same label again reorders them and changes nothing."""
    return hashlib.sha256("\n".join(sorted(json.dumps(r, sort_keys=True) for r in rows)).encode()).hexdigest()


def recorded(manifest_path: Path, metric: str):
    try:
        return json.loads(manifest_path.read_text())["metrics"].get(metric)
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def last_rows_digest(stage) -> str | None:
    """The rows digest of the run's export: recorded, or of its dataset for an export from before the record (so that
    a run exported by an earlier version is not retrained for nothing)."""
    import datasets

    digest = recorded(stage.manifest_path, "rows_digest")
    if digest is None and (stage.dir / "dataset").is_dir():
        try:
            digest = rows_digest(datasets.load_from_disk(str(stage.dir / "dataset")).to_list())
        except Exception:  # unreadable: exported again
            return None
    return digest


def write_store_record(export_dir: Path, store_state: str, files: dict[str, str | None], pairs: str | None) -> None:
    """What the export in `export_dir` holds: the store state, the files it read (config, guidelines) and the run's
    pairs manifest (its digest; None without a pairs stage): what export_state compares."""
    from pipeline.run import atomic_write_json
    from stages.label.store import STORE_RECORD

    atomic_write_json(export_dir / STORE_RECORD, {"store_digest": store_state, "files": files, "pairs": pairs})


OWN_FLAGS = ("--config", "--run", "--runs_dir")  # a refresh keeps its own: the run folder may have been moved
NOT_REPLAYED = ("--push_to_hub", "--hub_private", "--refresh")


def last_command_line(argv: list[str]) -> list[str]:
    """--refresh: this command line's config file and run, with the other flags of the run's last export (a push to
    the Hub and --refresh itself left out); without a last export, this command line without --refresh."""
    def flags(words: list[str], keep) -> list[str]:  # each flag with the words up to the next flag (none, one, a list)
        groups: list[list[str]] = []
        for w in words:
            if w.startswith("--") or not groups:
                groups.append([w])
            else:
                groups[-1].append(w)
        return [w for group in groups if keep(group[0]) for w in group]

    from pipeline.config import parse
    from pipeline.run import stage_dir
    from stages.label.export import CONFIG_CLASSES

    run = parse(CONFIG_CLASSES(), argv)[2]
    try:
        last = json.loads((stage_dir(run.runs_dir, run.run, "label-export") / "manifest.json").read_text())["inputs"]["argv"]
    except (OSError, ValueError, KeyError, TypeError):
        last = []
    name = lambda flag: flag.split("=", 1)[0]  # noqa: E731  (--push_to_hub=me/x is --push_to_hub)
    return [*flags(argv, lambda f: name(f) in OWN_FLAGS),
            *flags(last, lambda f: name(f) not in OWN_FLAGS + NOT_REPLAYED)]


if __name__ == "__main__":
    from pipeline.config import ConfigError

    if len(sys.argv) < 2 or (len(sys.argv) > 2 and sys.argv[2] != "--"):
        print("error: give the run folder: python -m stages.label.fresh_export runs/<RUN> [-- <simulate's flags>]",
              file=sys.stderr)
        sys.exit(2)
    try:  # not pipeline.run.main_guard: it imports torch, seconds on every `make rm`
        state = export_state(Path(sys.argv[1]), sys.argv[3:] if len(sys.argv) > 2 else None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(state)
