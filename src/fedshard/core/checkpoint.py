"""The round checkpoint: everything a run needs to continue after round r.

A round depends only on the model after the round before it and on its own
number (fresh optimiser, randomness from (seed, trainer, round),
partition from the seed). So the model of round r, exactly (fp32), and r itself
are a complete resume point. The round's metrics ride along, so that a run which
stopped after writing the checkpoint but before logging the round can log it on
resume instead of training it again.

This module is the file format only: pure PyTorch, no MLflow (tracking/checkpoints.py stores
the files as run artifacts, one per round, the newest kept). PyTorch is imported only to save
or load one: the names of the files are all the launcher needs at a run's end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedshard.core.errors import FedshardError, first_line

if TYPE_CHECKING:
    import torch

FORMAT = "fedshard-checkpoint-1"
_NAME = re.compile(r"round-(\d{5,})\.pt")


class CheckpointError(FedshardError, ValueError):
    """A file that is not a complete fedshard checkpoint (truncated, foreign, another model)."""


@dataclass
class Checkpoint:
    round: int
    weights: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)  # what the run logs at step `round`


def file_name(round_: int) -> str:
    """round-00007.pt: names sort by round, and say it without opening the file."""
    return f"round-{round_:05d}.pt"


def round_of(name: str) -> int | None:
    """The round in a checkpoint file name, or None for any other file."""
    match = _NAME.fullmatch(Path(name).name)
    return int(match.group(1)) if match else None


def save(ckpt: Checkpoint, path: str | Path) -> Path:
    import torch

    path = Path(path)
    # Floating tensors as fp32 (the model computes in bf16 at most under autocast), integer ones
    # (batch norm's step counters) as they are.
    torch.save(
        {
            "format": FORMAT,
            "round": int(ckpt.round),
            "weights": {
                k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                for k, v in ckpt.weights.items()
            },
            "metrics": {k: float(v) for k, v in ckpt.metrics.items()},
        },
        path,
    )
    return path


def load(path: str | Path, model: str) -> Checkpoint:
    """Read and check a checkpoint: it must be complete and hold the full weights of `model` (a
    models name), every parameter and buffer, of its shapes and types."""
    import torch

    from fedshard.core import models

    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as exc:  # a truncated zip, a foreign pickle: many exception types
        raise CheckpointError(f"{path}: not a complete checkpoint ({type(exc).__name__}: {first_line(exc)})") from exc
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fedshard checkpoint (format {FORMAT} expected)")
    weights = content["weights"]
    if {k: (tuple(v.shape), v.dtype) for k, v in weights.items()} != models.get(model).state_shapes():
        raise CheckpointError(f"{path}: the weights are not those of the full {models.get(model).title}")
    return Checkpoint(int(content["round"]), weights, dict(content["metrics"]))
