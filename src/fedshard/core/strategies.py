"""How a round's model is split among trainers and how their results are combined.

The round loop (aggregator.py) is written once, against the small `Strategy` interface below,
as Flower's server is written against its Strategy: a strategy only answers which part trainer
k trains in round r, what weights it receives, what shape that part has, how the trained parts
are combined and, where it has any, which settings each trainer is told every round (a small
typed record, its `Settings`) and what term they add to a trainer's loss. Its math is pure (no
processes, no I/O) and tested against hand-computed cases. Each strategy is built once, with
the experiment's configuration (`build`); a new one is one class here and one entry in
REGISTRY (and its name in config.STRATEGIES, with any setting of its own): FedProx is.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from fedshard.core import models, sharding
from fedshard.core.config import STRATEGIES, ExperimentConfig
from fedshard.core.sharding import StateDict

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


@runtime_checkable
class Strategy(Protocol):
    """What the aggregator's round loop and the trainers ask of a federated strategy."""

    name: ClassVar[str]
    Settings: ClassVar[type[DataclassInstance]]  # the record a trainer is told each round: a dataclass of numbers

    def assignment(self, round_: int) -> list[int]:
        """The part each trainer trains in round `round_` (rounds count from 1), trainer order."""

    def widths(self, part: int) -> dict[str, int]:
        """The split widths of the model that `part` is (models.Model.network(widths) builds it)."""

    def split(self, weights: StateDict, round_: int) -> list[StateDict]:
        """The weights each trainer receives in round `round_`, trainer order, from the full model's."""

    def combine(
        self,
        weights: StateDict,
        sent: Sequence[StateDict],
        trained: Sequence[StateDict],
        samples: Sequence[int],
        round_: int,
    ) -> StateDict:
        """The full model after round `round_`: from the model before it (`weights`), what each trainer
        received (`sent`, as `split` made it) and trained from it, on how many images (trainer order)."""

    def round_settings(self, round_: int) -> list[DataclassInstance]:
        """The Settings record each trainer is told in round `round_`, trainer order."""

    def local_loss(self, settings: object, received: StateDict) -> Callable[[nn.Module], torch.Tensor] | None:
        """Trainer side: the term added to its loss this round, given its `settings` and the weights
        it `received` (None: the NLL alone)."""


@dataclass(frozen=True)
class NoSettings:
    """The per-round settings of a strategy that has none: nothing travels."""


class _Plain:
    """A strategy that tells its trainers nothing beyond their weights, and adds nothing to their loss."""

    Settings: ClassVar[type[DataclassInstance]] = NoSettings
    n: int

    def round_settings(self, round_: int) -> list[DataclassInstance]:
        return [NoSettings()] * self.n

    def local_loss(self, settings: object, received: StateDict) -> Callable[[nn.Module], torch.Tensor] | None:
        return None


class TensorParallel(_Plain):
    """Each trainer trains one width-wise slice; slices may rotate between trainers (swapping).

    With layerwise swapping (the original harness's), the trainer of slice s receives, in round r,
    input block (s + r) mod n of every input-split weight, and its *change* to it is added at block
    s. So unless n divides r, the update lands on another block than it was trained from: the
    harness's behaviour, reproduced as it is (docs/experiments.md)."""

    name = "tensor_parallel"

    def __init__(self, cfg: ExperimentConfig):
        self.n, self.swapping, self.every = cfg.world_size, cfg.enable_swapping, cfg.swap_every
        self.layerwise = cfg.enable_layerwise_swapping
        self.model = models.get(cfg.model)
        self.table = self.model.table()

    def assignment(self, round_: int) -> list[int]:
        return sharding.assignment(round_, self.n, self.swapping, self.every)

    def widths(self, part: int) -> dict[str, int]:
        return self.model.slice_widths(self.n, part)

    def split(self, weights: StateDict, round_: int) -> list[StateDict]:
        slices = sharding.slice_state(weights, self.n, self.table)
        payloads = [slices[part] for part in self.assignment(round_)]
        if not self.layerwise:
            return payloads
        blocks = {name: [s[name] for s in slices] for name in sharding.input_split(weights, self.table)}
        return [
            {**payload, **{name: blocks[name][(part + round_) % self.n] for name in blocks}}
            for part, payload in zip(self.assignment(round_), payloads)
        ]

    def combine(
        self,
        weights: StateDict,
        sent: Sequence[StateDict],
        trained: Sequence[StateDict],
        samples: Sequence[int],
        round_: int,
    ) -> StateDict:
        # Slice order: trained parts, or (layerwise) the changes, are put back at their slice's place;
        # whole tensors are averaged weighted by the samples of the trainer that trained each slice.
        parts = self.assignment(round_)
        if self.layerwise:  # change-based, as the harness: the model sent plus the assembled changes
            trained = [{name: t[name] - s[name] for name in t} for t, s in zip(trained, sent)]
        by_slice = sorted(zip(parts, trained, samples), key=lambda t: t[0])
        assembled = sharding.assemble([t for _, t, _ in by_slice], self.table, [s for _, _, s in by_slice])
        if not self.layerwise:  # the trained weights themselves: the same model, without a rounding step
            return assembled
        return {name: weights[name] + assembled[name] for name in weights}


class FedAvg(_Plain):
    """Every trainer trains the whole model; the result is the sample-weighted mean."""

    name = "fedavg"

    def __init__(self, cfg: ExperimentConfig):
        self.n = cfg.world_size
        self.model = models.get(cfg.model)
        self.table = self.model.table()

    def assignment(self, round_: int) -> list[int]:
        return [0] * self.n

    def widths(self, part: int) -> dict[str, int]:
        return self.model.full_widths()

    def split(self, weights: StateDict, round_: int) -> list[StateDict]:
        return [weights] * self.n

    def combine(
        self,
        weights: StateDict,
        sent: Sequence[StateDict],
        trained: Sequence[StateDict],
        samples: Sequence[int],
        round_: int,
    ) -> StateDict:
        # The sample-weighted mean of every weight and running statistic; step counters their maximum.
        return {name: sharding.combine([t[name] for t in trained], self._whole(name), samples) for name in trained[0]}

    def _whole(self, name: str) -> None | str:
        """How a whole tensor is combined: averaged (None), or the maximum for a step counter."""
        return sharding.MAX if sharding.rule(self.table, name) == sharding.MAX else None


@dataclass(frozen=True)
class ProximalSettings:
    proximal_mu: float


class FedProx(FedAvg):
    """FedAvg whose trainers minimise their loss plus the proximal term mu/2 ||w - w_round||^2 over the
    model's parameters, w_round being the weights received that round (Li et al., FedProx, 2020): it
    keeps local models near the global one on skewed (non-IID) partitions. mu = 0 is FedAvg."""

    name = "fedprox"
    Settings: ClassVar[type[DataclassInstance]] = ProximalSettings

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.mu = cfg.proximal_mu

    def round_settings(self, round_: int) -> list[DataclassInstance]:
        return [ProximalSettings(self.mu)] * self.n

    def local_loss(self, settings: object, received: StateDict) -> Callable[[nn.Module], torch.Tensor] | None:
        if not isinstance(settings, ProximalSettings):
            raise TypeError(f"FedProx's trainer was told {settings!r}, not its ProximalSettings")
        if settings.proximal_mu == 0:
            return None
        # A copy: `received` may be the model's own tensors, which training changes.
        mu, anchor = settings.proximal_mu, {name: t.detach().clone() for name, t in received.items()}

        def proximal(model: nn.Module) -> torch.Tensor:
            squares = [((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters()]
            return mu / 2 * functools.reduce(operator.add, squares)  # sum(), in tensors from the first

        return proximal


REGISTRY: dict[str, type] = {s.name: s for s in (TensorParallel, FedAvg, FedProx)}
assert tuple(REGISTRY) == STRATEGIES, "config.STRATEGIES names the strategies of REGISTRY, in its order"


def build(cfg: ExperimentConfig) -> Strategy:
    """The experiment's strategy, built once with its configuration."""
    try:
        return REGISTRY[cfg.strategy](cfg)
    except KeyError:
        raise ValueError(f"unknown strategy {cfg.strategy!r}; valid: {', '.join(REGISTRY)}") from None


def model_sizes(cfg: ExperimentConfig) -> dict[str, int]:
    """What the method's point shows in: parameters and forward FLOPs per image (at the run's image
    size) of the full model and of the largest model a trainer trains (slices of uneven width
    differ by a channel or so)."""
    strategy, model = build(cfg), models.get(cfg.model)  # every round's assignment holds every part trained
    trained = max((strategy.widths(p) for p in set(strategy.assignment(1))), key=model.parameter_count)
    return {
        "model.params_full": model.parameter_count(),
        "model.params_per_trainer": model.parameter_count(trained),
        "model.flops_per_image_full": model.forward_flops(None, cfg.image_size),
        "model.flops_per_image_per_trainer": model.forward_flops(trained, cfg.image_size),
    }
