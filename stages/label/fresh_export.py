"""Does a run's label export hold the store's labels and the run's pairs as they are now? Exit 0 when it does; 4 when
the pairs were sampled again (or there is no export yet); 3 when labels were added, changed or removed since it was
written, or a file it read changed (configs/label.yaml, the guidelines); 2 on a store that cannot be read. The story
chain's `labels` step of `make rm` then exports again (after simulating new pairs), with `--refresh`: as the last
export did, rewriting only when its rows differ. So people's labels from `make label`, or a `make simulate` with other
settings, reach the reward model without a separate `make label-export`.

    python -m stages.label.fresh_export runs/default
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CURRENT, STALE, NEW_PAIRS = 0, 3, 4  # not 1: an unexpected exception exits 1, and must not read as "export again"


def export_state(run_dir: Path) -> int:
    """CURRENT when the store's labels, the files the export read (configs/label.yaml, the guidelines) and the run's
    pairs are those the export last read; NEW_PAIRS when the pairs changed (or there is no export yet): the chain
    simulates the new pairs first; STALE when the store or a file changed. The export writes the record beside its
    manifest; `--refresh` rewrites it when they changed but its rows did not."""
    from pipeline.run import file_digest, manifest_digest, resolve_path
    from stages.label.store import STORE_RECORD, store_digest

    export_dir, pairs = run_dir / "label-export", run_dir / "pairs" / "manifest.json"
    if not (export_dir / "manifest.json").is_file():
        return NEW_PAIRS
    try:
        record = json.loads((export_dir / STORE_RECORD).read_text())
        stored, files, pairs_then = record["store_digest"], dict(record["files"]), record["pairs"]
    except (OSError, ValueError, KeyError, TypeError):  # an export of an earlier version: as its `make` judged it
        newer = pairs.is_file() and pairs.stat().st_mtime > (export_dir / "manifest.json").stat().st_mtime
        return NEW_PAIRS if newer else STALE
    if pairs_then != (manifest_digest(json.loads(pairs.read_text())) if pairs.is_file() else None):
        return NEW_PAIRS
    same = stored == store_digest(run_dir / "label" / "labels.sqlite") and \
        all(file_digest(resolve_path(name)) == digest for name, digest in files.items())
    return CURRENT if same else STALE


def export_is_current(run_dir: Path) -> bool:
    return export_state(run_dir) == CURRENT


if __name__ == "__main__":
    from pipeline.config import ConfigError

    try:  # not pipeline.run.main_guard: it imports torch, seconds on every `make rm`
        state = export_state(Path(sys.argv[1]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(state)
