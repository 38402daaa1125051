"""What a run keeps besides its metrics: files and folders (its configuration, its processes'
logs), text and tables, as the run's artifacts. Checkpoints and the final model have their own
modules (checkpoints, logged_model)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedshard.tracking.store import client

if TYPE_CHECKING:
    import pandas as pd


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def log_artifacts(run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifacts(run_id, str(local_dir), artifact_path)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def log_table(run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
    """A pandas DataFrame as an MLflow table (shown in the UI's artifact view and evaluation tab)."""
    client().log_table(run_id, frame, artifact_file)
