"""The data sets a run reads, recorded as the run's dataset inputs (the UI's Datasets column)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fedshard.core.errors import described
from fedshard.tracking.store import client

if TYPE_CHECKING:
    from fedshard.core.data import DatasetInput

log = logging.getLogger(__name__)

_ATTEMPTS = 3


def log_datasets(run_id: str, inputs: Iterable[DatasetInput]) -> None:
    """Record the data sets an experiment reads (data.DatasetInput) as the run's dataset inputs:
    name, digest, source file, number of images, and its context (training / evaluation)."""
    import json

    import numpy as np
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    schema = json.dumps(
        TensorDatasetSchema(
            features=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, 32, 32), "images")]),
            targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "fine_labels")]),
        ).to_dict()
    )
    datasets = [
        DatasetInput(
            Dataset(i.name, i.digest, "local", json.dumps({"uri": i.source}), schema, json.dumps(i.profile)),
            [InputTag("mlflow.data.context", i.context)],
        )
        for i in inputs
    ]
    # Experiments started together record the same data sets: both may find one missing and insert
    # it, and the store refuses the second insert. Once the first is in, a second try finds it.
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            client().log_inputs(run_id, datasets=datasets)
            return
        except Exception as exc:
            if attempt == _ATTEMPTS:
                raise
            log.debug(f"the datasets of run {run_id} were not logged, trying again: {described(exc)}")
            time.sleep(0.5 * attempt)
