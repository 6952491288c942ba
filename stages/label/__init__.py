"""The labeling stage: Gradio app (`python -m stages.label`), SQLite store, export (`python -m stages.label.export`)."""


def CONFIG_CLASSES():
    """configs/label.yaml is read by both the app and the export."""
    from pipeline.config import RunArgs

    from .config import ExportArgs, LabelArgs

    return (LabelArgs, ExportArgs, RunArgs)
