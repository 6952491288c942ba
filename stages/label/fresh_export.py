"""Does a run's label export hold the store's labels as they are now? Exit 0 when it does, 3 when labels were added,
changed or removed since it was written (or it predates this record), 2 on a store that cannot be read. The story
chain's `labels` step of `make rm` then calls the export again (`--only_if_changed`: it rewrites only when its rows
differ), so people's labels from `make label`, or a `make simulate` with other settings, reach the reward model without
a separate `make label-export`.

    python -m stages.label.fresh_export runs/default
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.run import main_guard

STALE = 3  # not 1: an unexpected exception exits 1, and must not read as "export again"


def export_is_current(run_dir: Path) -> bool:
    """Whether the store's labels are those the export last read (the export writes the record; `--only_if_changed`
    rewrites it when the store changed but the export's rows would not)."""
    from stages.label.export import STORE_RECORD
    from stages.label.store import store_digest

    try:
        recorded = json.loads((run_dir / "label-export" / STORE_RECORD).read_text())["store_digest"]
    except (OSError, ValueError, KeyError, TypeError):  # no export yet, or one from before the record
        return False
    return recorded == store_digest(run_dir / "label" / "labels.sqlite")


if __name__ == "__main__":
    main_guard(lambda: sys.exit(0 if export_is_current(Path(sys.argv[1])) else STALE))
