"""What does running a prompt's shared tokens once buy the reward model and DPO stages? `share_prefix` on and off,
interleaved.

    make sft rm                                   # a run with pairs and labels (the default chain makes them)
    make bench-rm-prefix                          # -> bench/results/rm_prefix.json (about 12 minutes on 2 CPU cores)
    make bench-dpo-prefix                         # -> bench/results/dpo_prefix.json (about 10 minutes)
    python -m bench.shared_prefix --stage dpo --from_run runs/default --repeats 1 --output /tmp/p.json [stage overrides]

With batches by prompt (configs/rm.yaml, configs/dpo.yaml) a step holds whole openings' responses, and every response
begins with its opening and the template's headers. `share_prefix: true` runs those tokens once an opening (under the
policy and the reference, for DPO) and each response after them from their keys and values; `false` runs every
response whole. The loss and gradients are the same (tests/test_rm_groups.py, tests/test_dpo_groups.py); this bench
measures the time. Each repeat runs the stage on the run's label export, once each way, one after the other (the order
alternating), exactly as `make rm` trains a member or `make dpo` its policy (accelerate launch, the stage's config and
default steps), on a no-op SFT adapter: the time is the stage's own train_time_s (training and, for the reward model,
its held-out evaluations), compared by median. The held-out figures of the two should agree to rounding: they train on
the same batches with the same gradients, up to float rounding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.rm_rules import no_op_sft, run_stage
from pipeline.config import REPO_ROOT
from pipeline.run import atomic_write_json, git_commit, package_versions


def parse_bench_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("rm", "dpo"), default="rm", help="The stage to time.")
    p.add_argument("--from_run", default="runs/default", help="A run with a label export (make sft rm makes one).")
    p.add_argument("--dataset_name", default=None, help="Train on this pairs file instead of the run's label export.")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model_config", default="configs/models/tiny.yaml")
    p.add_argument("--work_dir", default=None, help="Default: bench/out/<stage>_prefix.")
    p.add_argument("--output", default=None, help="Default: bench/results/<stage>_prefix.json.")
    args, overrides = p.parse_known_args(argv)
    args.work_dir = args.work_dir or f"bench/out/{args.stage}_prefix"
    args.output = args.output or f"bench/results/{args.stage}_prefix.json"
    return args, overrides


def label_export(run_dir: Path) -> Path | None:
    manifest = run_dir / "label-export" / "manifest.json"
    return Path(json.loads(manifest.read_text())["outputs"]["dataset"]) if manifest.is_file() else None


def main(argv=None) -> int:
    args, overrides = parse_bench_args(argv)
    data = Path(args.dataset_name) if args.dataset_name else label_export(REPO_ROOT / args.from_run)
    if data is None:
        print(f"error: {args.from_run} has no label export: run `make sft rm` first (or pass --from_run)", file=sys.stderr)
        return 2
    runs_dir = REPO_ROOT / args.work_dir / "runs"
    runs = {"true": [], "false": []}
    for repeat in range(args.repeats):
        for share in (("true", "false") if repeat % 2 == 0 else ("false", "true")):
            run = f"share-{share}-{repeat}"
            no_op_sft(runs_dir, run, args.model_config)
            code, wall, err = run_stage(data, runs_dir, run, args.model_config, ["--share_prefix", share, *overrides],
                                        stage=args.stage)
            if code != 0:  # bad input (exit 2): the stage's own line alone
                print(err if code == 2 else f"error: the {args.stage} stage failed with --share_prefix {share}:\n{err}",
                      file=sys.stderr)
                return code if code == 2 else 1
            m = json.loads((runs_dir / run / args.stage / "manifest.json").read_text())["metrics"]
            runs[share].append({"train_time_s": m["train_time_s"], "wall_s": wall, "steps": m["steps"],
                                "eval_accuracy": m["eval_accuracy"], "eval_loss": m["eval_loss"],
                                "train_loss": m["train_loss"]})
            print(f"share_prefix {share}, repeat {repeat + 1}: {m['train_time_s']} s training, "
                  f"held-out accuracy {m['eval_accuracy']}, loss {m['eval_loss']}", flush=True)
    median = {share: statistics.median(r["train_time_s"] for r in rows) for share, rows in runs.items()}
    result = {"settings": {**vars(args), "data": str(data), "overrides": overrides},
              "runs": runs, "median_train_time_s": median,
              "speedup": round(median["false"] / median["true"], 2) if median["true"] else None,
              "commit": git_commit(), "packages": package_versions()}
    atomic_write_json(REPO_ROOT / args.output, result)
    print(f"median training time: {median['false']} s whole, {median['true']} s shared: x{result['speedup']} "
          f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
