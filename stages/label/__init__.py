"""The labeling stage: Gradio app (`python -m stages.label`), SQLite store, export (`python -m stages.label.export`)."""


def CONFIG_CLASSES():
    """configs/label.yaml is read by both the app and the export."""
    from pipeline.config import RunArgs

    from .config import ExportArgs, LabelArgs

    return (LabelArgs, ExportArgs, RunArgs)


def check_args(args, export, run) -> None:
    """What `make label` refuses before the stages it needs (sampling the pairs: SFT first, minutes): the logins, the
    host they guard, the guidelines. The app checks them again as it starts (`python -m stages.label` alone)."""
    from .config import check_exposure, load_users, read_guidelines

    check_exposure(args.host, load_users(args.users_file))
    read_guidelines(args.guidelines)
