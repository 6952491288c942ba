import json
import sys

from pipeline.run import manifest_digest, stage_dir
from stages.label.fresh_export import write_store_record
from stages.label.store import store_digest
from tests.fake_stages import _flag, fake_stage

if __name__ == "__main__":
    fake_stage("label-export")
    # like the real export, it records the store state and the pairs it exported (what `make rm`'s labels step compares)
    argv = sys.argv[1:]
    run_dir = stage_dir(_flag(argv, "--runs_dir", "runs"), _flag(argv, "--run", "default"), "label").parent
    pairs = run_dir / "pairs" / "manifest.json"
    write_store_record(run_dir / "label-export", store_digest(run_dir / "label" / "labels.sqlite"), {},
                       manifest_digest(json.loads(pairs.read_text())) if pairs.is_file() else None)
