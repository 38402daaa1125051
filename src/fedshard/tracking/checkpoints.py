"""A run's checkpoints in its artifacts, so that whatever stops a run, it continues from its
latest round (`fedshard run --resume`).

A run keeps the model of its latest round as the artifact checkpoint/round-<r>.pt (the file
format is fedshard.core.checkpoint's), its round in the tag fedshard.checkpoint_round. The tags of
resume and extension live here too: a longer run of the same configuration starts from a
shorter one's final model, with its rounds' metrics copied in.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedshard.core import checkpoint
from fedshard.core.errors import FedshardError, described
from fedshard.tracking.metrics import log_round
from fedshard.tracking.store import client

if TYPE_CHECKING:
    from mlflow.store.artifact.artifact_repo import ArtifactRepository

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_TAG = "fedshard.checkpoint_round"
RESUMED_TAG = "fedshard.resumed_from_round"
EXTENDS_TAG = "fedshard.extends"
ROUNDS_TRAINED_TAG = "fedshard.rounds_trained"


class CheckpointWriteError(FedshardError, OSError):
    """A round's checkpoint could not be stored; the run cannot promise to continue from it."""


def _artifacts(run_id: str) -> ArtifactRepository:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(client().get_run(run_id).info.artifact_uri)


def commit_round(
    run_id: str,
    round_: int,
    metrics: dict[str, float],
    weights: dict | None = None,
    still_ours: Callable[[], None] | None = None,
) -> None:
    """Make round `round_` durable: its checkpoint first (when `weights` are given), then its
    metrics, then the older checkpoints go. A run whose metrics show round r therefore always
    has a checkpoint of round r or later, and a crash at any point leaves one that loads: the
    previous file is deleted only after the new one is complete (artifact stores publish a file
    only once it is whole; a torn file would fail checkpoint.load and the older one is used).
    `still_ours()` (claims.check) is asked before each write: it raises once the run changed hands."""
    if weights is not None:
        if still_ours:
            still_ours()
        start = time.perf_counter()
        _store_checkpoint(run_id, round_, metrics, weights)
        metrics = {**metrics, "checkpoint_seconds": time.perf_counter() - start}
    if still_ours:
        still_ours()
    log_round(run_id, round_, metrics)
    if weights is not None:
        client().set_tag(run_id, CHECKPOINT_TAG, str(round_))
        delete_checkpoints(run_id, below=round_)


def _store_checkpoint(run_id: str, round_: int, metrics: dict[str, float], weights: dict) -> None:
    """Write round `round_`'s checkpoint into the run's artifacts, or raise CheckpointWriteError
    with no part of it left behind."""
    name = checkpoint.file_name(round_)
    with tempfile.TemporaryDirectory(prefix="fedshard-ckpt-") as tmp:
        try:
            path = checkpoint.save(checkpoint.Checkpoint(round_, weights, metrics), Path(tmp) / name)
            client().log_artifact(run_id, str(path), CHECKPOINT_DIR)
        except Exception as exc:
            try:  # no torn file left for a later resume to trip over
                _artifacts(run_id).delete_artifacts(f"{CHECKPOINT_DIR}/{name}")
            except Exception as cleanup_exc:  # the error that matters is raised below; a resume passes torn files over
                log.debug(f"a torn {name} may remain in run {run_id}: {described(cleanup_exc)}")
            raise CheckpointWriteError(
                f"round {round_}: cannot store the checkpoint in the run's artifacts "
                f"({client().get_run(run_id).info.artifact_uri}): "
                f"{described(exc)}"
            ) from exc


def checkpoint_rounds(run_id: str) -> list[int]:
    """Rounds of the run's checkpoint files, newest first."""
    rounds = (checkpoint.round_of(a.path) for a in client().list_artifacts(run_id, CHECKPOINT_DIR))
    return sorted((r for r in rounds if r is not None), reverse=True)


def load_checkpoint(run_id: str, model: str) -> checkpoint.Checkpoint | None:
    """The run's newest checkpoint that loads completely and holds `model`'s weights (a torn newer
    file is passed over, with a warning), or None when it has none."""
    for round_ in checkpoint_rounds(run_id):
        with tempfile.TemporaryDirectory(prefix="fedshard-ckpt-") as tmp:
            try:
                path = client().download_artifacts(run_id, f"{CHECKPOINT_DIR}/{checkpoint.file_name(round_)}", tmp)
                return checkpoint.load(path, model)
            except Exception as exc:  # a torn or foreign file, an artifact gone: an older one may do
                log.warning(
                    f"fedshard: warning: run {run_id}: checkpoint of round {round_} is unusable ({exc}); "
                    f"trying an older one"
                )
    return None


def delete_checkpoints(run_id: str, below: int | None = None) -> None:
    """Delete the checkpoint files of rounds before `below`; without it, all of them: the folder
    goes (a FINISHED run's artifacts show no empty checkpoint folder), and the tag."""
    repo = _artifacts(run_id)
    if below is None:
        repo.delete_artifacts(CHECKPOINT_DIR)
        try:
            client().delete_tag(run_id, CHECKPOINT_TAG)
        except Exception as exc:  # a run without the tag: nothing to delete
            log.debug(f"run {run_id} had no checkpoint tag to delete: {described(exc)}")
        return
    for round_ in checkpoint_rounds(run_id):
        if round_ < below:
            repo.delete_artifacts(f"{CHECKPOINT_DIR}/{checkpoint.file_name(round_)}")
