"""The model of a run: its final model logged as an MLflow model, and weights loaded back, from
such a model or a state-dict file, for an experiment to start from (`init_from`)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from fedshard.core.config import RUN_PREFIX
from fedshard.core.errors import described, first_line
from fedshard.tracking.store import client, experiment_id, experiment_meant, tracking_uri

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the final model: runs:/<run id>/model
# The run an experiment started from, when init_from named it (run:<name>): a name, recorded as an id too.
INIT_FROM_RUN_TAG = "fedshard.init_from_run_id"
# fedshard's own code travels with the model (MLflow's code_paths), so loading needs no fedshard install.
_FEDSHARD_PACKAGE = Path(__file__).resolve().parents[1]


def log_model(run_id: str, weights: dict, model_name: str, example: np.ndarray | None = None) -> None:
    """The final model as an MLflow model: `mlflow.pytorch.load_model("runs:/<id>/model")` gives
    fedshard's network of `model_name` (models.REGISTRY: AlexNet, ResNet), registrable with
    `mlflow.register_model`. Its signature: a float32 batch (N, 3, S, S) of CIFAR images as the
    model evaluates them (training.evaluation_input: resized to the run's image size S, normalised)
    -> (N, 100) log-probabilities; `example` is such a batch. fedshard's code travels with it, so
    loading needs no fedshard install."""
    import logging

    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from fedshard.core import models

    model = models.get(model_name).shapes()
    model.load_state_dict({k: v.detach().cpu() for k, v in weights.items()}, assign=True)
    model.eval()
    x = np.asarray(example if example is not None else np.zeros((2, 3, 32, 32)), dtype=np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    # Created here, in the run's own experiment: left to itself, MLflow puts a model logged by run id
    # into the process's current experiment (Default), not the run's.
    # Pickled, not torch.export's pt2, so that load_model gives back the AlexNet class itself; MLflow
    # warns about pickle on every save, which is no news to whoever runs fedshard's own model.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    run = client().get_run(run_id)
    logged = client().create_logged_model(
        run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id, params=dict(run.data.params)
    )
    mlflow.pytorch.log_model(
        model,
        name=MODEL_NAME,
        model_id=logged.model_id,
        run_id=run_id,
        signature=infer_signature(x, y),
        serialization_format="pickle",
        code_paths=[str(_FEDSHARD_PACKAGE)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
    )


ACCEPTED = (
    "init_from takes a file of torch.save(model.state_dict(), PATH) (tensors only: it is loaded with "
    "weights_only=True, which unpickles no object), runs:/<run id>/model, models:/<name>/<version> or run:<run name>"
)


def _not_a_state_dict(exc: Exception) -> str:
    """What a file that torch.load(weights_only=True) refused is, from its error: a pickled object of
    some class (a whole model, say), or no file of torch.save holding tensors."""
    import re

    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:
        return f"is not a state dict: it holds a pickled {found.group(1)} object"
    return "is not a state dict: it is no file of torch.save holding tensors only"


def source_run(uri: str, experiment_name: str | None = None) -> str | None:
    """The id of the run init_from=run:<name> names: the newest FINISHED run of that name in the
    experiment (experiment_name, else the one this process works in: experiment_meant); None for
    any other init_from. FileNotFoundError when there is no such run."""
    if not uri.startswith(RUN_PREFIX):
        return None
    name, experiment = uri[len(RUN_PREFIX) :], experiment_meant(experiment_name)
    exp_id = experiment_id(experiment, create=False)
    runs = (
        []
        if exp_id is None or "'" in name
        else client().search_runs(
            [exp_id],
            filter_string=f"tags.`mlflow.runName` = '{name}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    )
    if not runs:
        raise FileNotFoundError(
            f"init_from={uri!r}: experiment {experiment!r} has no FINISHED run named {name!r} "
            f"(run names are the configurations, e.g. ws1-lr0.0001-swapfalse-r10-s77)"
        )
    return runs[0].info.run_id


def load_weights(uri: str, experiment_name: str | None = None) -> dict:
    """The state dict that `init_from` names: a state-dict file (path or file: URI), an MLflow
    model (runs:/<run id>/model, models:/<name>/<version>), or the final model of a run named in
    `experiment_name` (run:<name>, source_run). Raises FileNotFoundError when there is nothing to
    load there, ValueError when what is there is no state dict."""
    import torch

    run_id = source_run(uri, experiment_name)
    if run_id is not None:
        return load_weights(f"runs:/{run_id}/{MODEL_NAME}")
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        path = Path(urlparse(uri).path if scheme == "file" else uri).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"init_from={uri!r}: no weights file at {path}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # never PyTorch's own advice: it suggests weights_only=False, an unsafe load
            raise ValueError(f"init_from={uri!r}: {path} {_not_a_state_dict(exc)}. {ACCEPTED}") from exc
    import mlflow.pytorch

    try:
        # Into a directory of our own, gone afterwards: left to itself MLflow downloads the model (220 MB
        # for AlexNet) into a temporary directory that it never removes, once for every run that starts
        # from it (an extension, init_from).
        with tempfile.TemporaryDirectory(prefix="fedshard-model-") as tmp:
            return mlflow.pytorch.load_model(uri, dst_path=tmp, map_location="cpu").state_dict()
    except Exception as exc:
        if uri.startswith("runs:/"):  # a run from before final models were MLflow models: model/weights.pt
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    legacy = mlflow.artifacts.download_artifacts(
                        f"{uri.rstrip('/')}/weights.pt", dst_path=tmp, tracking_uri=tracking_uri()
                    )
                    return torch.load(legacy, map_location="cpu", weights_only=True)
            except Exception as legacy_exc:  # no legacy weights either: the model's own error is said below
                log.debug(f"{uri} holds no legacy model/weights.pt: {described(legacy_exc)}")
        raise FileNotFoundError(f"init_from={uri!r}: cannot load it as an MLflow model: {first_line(exc)}") from exc


def load_final_weights(run_id: str) -> dict:
    """The final model of a FINISHED run, as a state dict."""
    return load_weights(f"runs:/{run_id}/{MODEL_NAME}")
