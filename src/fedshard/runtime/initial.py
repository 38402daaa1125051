"""The model an experiment starts from (round 0): seeded random weights, or those `init_from` names,
checked to fit the model before anything starts (the launcher) and loaded by the aggregator.
MLflow is imported only when init_from names a logged model or a run."""

from __future__ import annotations

import torch

from fedshard.core import models
from fedshard.core.config import RUN_PREFIX, ExperimentConfig


def weights(cfg: ExperimentConfig, experiment_name: str | None = None) -> dict[str, torch.Tensor]:
    """The starting model: seeded random init, or the `init_from` weights (checked to fit); a run
    named by init_from=run:<name> is looked for in `experiment_name` (default: the experiment meant);
    torchvision:<weights> are torchvision's of the same network (models/pretrained.py)."""
    torch.manual_seed(cfg.seed)
    spec = models.get(cfg.model)
    model = spec.network()
    if cfg.init_from.startswith(models.TORCHVISION_PREFIX):
        from fedshard.core.models import pretrained

        model.load_state_dict(pretrained.torchvision_state(spec, cfg.init_from, model.state_dict()))
    elif cfg.init_from:
        from fedshard import tracking

        state = tracking.load_weights(cfg.init_from, experiment_name)
        try:
            model.load_state_dict(state)
        except Exception as exc:
            raise ValueError(
                f"init_from={cfg.init_from!r} is not a fedshard {cfg.model} state dict: "
                f"{models.state_dict_mismatch(state, model)}"
            ) from exc
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def experiment_if_named(cfg: ExperimentConfig, run_id: str) -> str | None:
    """The experiment of this run, where init_from names a run of it (run:<name>): looked for there."""
    if not cfg.init_from.startswith(RUN_PREFIX):
        return None
    from fedshard import tracking

    return tracking.experiment_name_of_run(run_id)
