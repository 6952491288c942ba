"""`make label`: the labeling UI for this run's pairs, at http://127.0.0.1:7860 by default.

    python -m stages.label --config configs/label.yaml --run default [--port 7861 --host 0.0.0.0 --users_file users.txt]
    make label ARGS="--overlap 2"

Reads the pairs stage's dataset (or --pairs_dataset) and serves it from runs/<run>/label/labels.sqlite; restarting
continues where everyone left off. Bound to anything but loopback it refuses to start without logins
(--users_file or LABEL_USERS). `make label-export` turns the labels into a preference dataset.

Everything is checked before anything is written: logins, guidelines, the pairs, the store file, the port, and
that no other app serves this run's store (a lock held for the server's life).
"""

from __future__ import annotations

import os

from pipeline.config import ConfigError, RunArgs, parse, resolve_path, to_dict
from pipeline.run import StageRun, atomic_write_json, atomic_write_text, main_guard
from stages.label.config import (OWN_PAIRS, LabelArgs, LoginGuard, check_exposure, check_port_free, db_path,
                                 default_to_own_pairs, load_users, read_guidelines, word_filter)
from stages.label.pairs import read_pairs
from stages.label.store import LabelStore, check_store_file, lock_store


def load_pairs(args: LabelArgs, stage: StageRun) -> list[dict]:
    default_to_own_pairs(args, stage.runs_dir, stage.run, "label")  # a run of your own pairs: those, not sampled ones
    if args.pairs_dataset:
        return read_pairs(args.pairs_dataset, "--pairs_dataset")
    path = stage.need("pairs")["outputs"]["dataset"]
    return read_pairs(path, f"the pairs of run '{stage.run}' (rerun `make pairs RUN={stage.run}`)")


def record_own_pairs(args: LabelArgs, stage: StageRun) -> None:
    """Pairs of your own, labeled in a run that has sampled none (`make label ARGS="--pairs_dataset FILE"`): their file,
    for `make rm`'s labels step, which then exports their labels instead of sampling the bundled prompts' pairs.
    Eval's SFT-vs-PPO pairs (labeled for people's win rate, not to train on) are never recorded, and labeling them
    later leaves the record as it was."""
    if not args.pairs_dataset or (stage.dir.parent / "pairs" / "manifest.json").is_file():
        return
    path = resolve_path(args.pairs_dataset).resolve()
    if (stage.dir.parent / "eval").resolve() not in path.parents:
        atomic_write_text(stage.dir / OWN_PAIRS, f"{path}\n")


def main(args: LabelArgs, run: RunArgs, block: bool = True):
    users = load_users(args.users_file)
    check_exposure(args.host, users)  # before anything slow: a refusal must be quick and clear
    guidelines = read_guidelines(args.guidelines)
    stage = StageRun("label", run.run, run.runs_dir)
    pairs = load_pairs(args, stage)
    db = db_path(run.runs_dir, run.run)
    check_store_file(db, writing=True)
    check_port_free(args.host, args.port)

    lock = lock_store(db)  # held until this process ends: a second app on this run stops here, having written nothing
    store = LabelStore(db, overlap=args.overlap, lease_s=args.lease_timeout_s, seed=args.seed,
                       max_note_chars=args.max_note_chars)
    counts = store.import_items(pairs, word_filter(args.offensive_words if args.filter_offensive else []))
    prog = store.progress()
    print(f"label store {store.path}: {counts['items']} pairs ({counts['blocked']} held back by the word filter), "
          f"{prog['labels']} labels so far, {prog['pairs_done']} pairs done, overlap {args.overlap}", flush=True)

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home
    from stages.label.app import build_app, launch_kwargs

    atomic_write_json(stage.dir / "config.json", {"label": to_dict(args), "run": to_dict(run)})
    record_own_pairs(args, stage)
    demo = build_app(store, guidelines, args.title, use_login=bool(users))
    demo.queue(default_concurrency_limit=args.concurrency_limit)
    demo.store_lock = lock  # lives as long as the app (block=False returns before the server stops)
    try:
        demo.launch(server_name=args.host, server_port=args.port, auth=LoginGuard(users) if users else None,
                    auth_message="Log in with the name and password you were given.",
                    prevent_thread_lock=True, **launch_kwargs())
    except OSError as err:  # port taken
        raise ConfigError(f"could not serve on {args.host}:{args.port} ({err}): pick another with --port N") from None
    # gradio's own line, which launch_kwargs' quiet drops with its hint to serve a public link (share=True), which
    # would put the app beyond the exposure check above
    print(f"* Running on local URL:  {demo.local_url}", flush=True)
    if block:
        demo.block_thread()
    return demo


def CONFIG_CLASSES():
    return (LabelArgs, RunArgs)


if __name__ == "__main__":
    main_guard(lambda: main(*parse(CONFIG_CLASSES())))
