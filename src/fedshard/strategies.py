"""How a round's model is split among trainers and how their results are combined.

The round loop (aggregator.py) is written once; a strategy only answers three
questions: which part does trainer k train in round r, what weights does it
receive, and how are the trained parts combined. Both strategies are pure.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import sharding
from .config import ExperimentConfig
from .model import forward_flops, parameter_count, slice_widths
from .sharding import StateDict


class TensorParallel:
    """Each trainer trains one width-wise slice; slices may rotate between trainers."""

    name = "tensor_parallel"

    def assignment(self, cfg: ExperimentConfig, round_: int) -> list[int]:
        return sharding.assignment(round_, cfg.world_size, cfg.enable_swapping, cfg.swap_every)

    def widths(self, cfg: ExperimentConfig, part: int) -> dict[str, int]:
        return slice_widths(cfg.world_size, part)

    def split(self, weights: StateDict, cfg: ExperimentConfig, assignment: Sequence[int]) -> list[StateDict]:
        slices = sharding.slice_state(weights, cfg.world_size)
        return [slices[part] for part in assignment]

    def combine(self, trained: Sequence[StateDict], samples: Sequence[int], assignment: Sequence[int]) -> StateDict:
        # Put the trained slices back in slice order; whole-kept biases are
        # averaged weighted by the samples of the trainer that trained each slice.
        by_slice = sorted(zip(assignment, trained, samples), key=lambda t: t[0])
        return sharding.assemble([t for _, t, _ in by_slice], [s for _, _, s in by_slice])


class FedAvg:
    """Every trainer trains the whole model; the result is the sample-weighted mean."""

    name = "fedavg"

    def assignment(self, cfg: ExperimentConfig, round_: int) -> list[int]:
        return [0] * cfg.world_size

    def widths(self, cfg: ExperimentConfig, part: int) -> dict[str, int]:
        return slice_widths(1, 0)

    def split(self, weights: StateDict, cfg: ExperimentConfig, assignment: Sequence[int]) -> list[StateDict]:
        return [weights] * len(assignment)

    def combine(self, trained: Sequence[StateDict], samples: Sequence[int], assignment: Sequence[int]) -> StateDict:
        return {name: sharding.weighted_mean([t[name] for t in trained], samples) for name in trained[0]}


STRATEGIES = {s.name: s for s in (TensorParallel(), FedAvg())}


def model_sizes(cfg: ExperimentConfig) -> dict[str, int]:
    """What the method's point shows in: parameters and forward FLOPs per image of the full model
    and of the largest model a trainer trains (slices of uneven width differ by a channel or so)."""
    strategy = get(cfg.strategy)
    parts = range(cfg.world_size) if strategy.name == "tensor_parallel" else [0]
    trained = max((strategy.widths(cfg, p) for p in parts), key=parameter_count)
    return {"model.params_full": parameter_count(), "model.params_per_trainer": parameter_count(trained),
            "model.flops_per_image_full": forward_flops(), "model.flops_per_image_per_trainer": forward_flops(trained)}


def get(name: str):
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}") from None
