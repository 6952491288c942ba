"""Does a run's label export hold the store's labels as they are now? Exit 0 when it does, 1 when labels were added,
changed or removed since it was written (or it predates this record), 2 on a store that cannot be read. The story
chain's `labels` step of `make rm` then exports again, so people's labels from `make label`, or a `make simulate`
with other settings, reach the reward model without a separate `make label-export`.

    python -m stages.label.fresh_export runs/default
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.run import main_guard


def export_is_current(run_dir: Path) -> bool:
    from stages.label.store import store_digest

    manifest = run_dir / "label-export" / "manifest.json"
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text()).get("metrics", {}).get("store_digest")
    return recorded == store_digest(run_dir / "label" / "labels.sqlite")


if __name__ == "__main__":
    main_guard(lambda: sys.exit(0 if export_is_current(Path(sys.argv[1])) else 1))
