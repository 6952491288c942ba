"""Does a run's label export hold the store's labels as they are now? Exit 0 when it does; 3 when labels were added,
changed or removed since it was written, or a file it read changed (configs/label.yaml, the guidelines), or it
predates this record; 2 on a store that cannot be read. The story chain's `labels` step of `make rm` then calls the
export again (`--refresh`: as the last export did, rewriting only when its rows differ), so people's labels from
`make label`, or a `make simulate` with other settings, reach the reward model without a separate `make label-export`.

    python -m stages.label.fresh_export runs/default
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STALE = 3  # not 1: an unexpected exception exits 1, and must not read as "export again"


def export_is_current(run_dir: Path) -> bool:
    """Whether the store's labels, and the files the export read (configs/label.yaml, the guidelines), are those the
    export last read (the export writes the record; `--refresh` rewrites it when they changed but its rows did not)."""
    from pipeline.run import file_digest, resolve_path
    from stages.label.store import STORE_RECORD, store_digest

    try:
        record = json.loads((run_dir / "label-export" / STORE_RECORD).read_text())
        stored, files = record["store_digest"], dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError):  # no export yet, or one from before the record
        return False
    return stored == store_digest(run_dir / "label" / "labels.sqlite") and \
        all(file_digest(resolve_path(name)) == digest for name, digest in files.items())


if __name__ == "__main__":
    from pipeline.config import ConfigError

    try:  # not pipeline.run.main_guard: it imports torch, seconds on every `make rm`
        current = export_is_current(Path(sys.argv[1]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if current else STALE)
