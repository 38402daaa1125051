"""The one frozen description of an experiment.

Every knob lives here, with its validation, its canonical string form (what
MLflow stores as a param) and its JSON round trip (what travels to every
process). Nothing else decides what a valid experiment is.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields

STRATEGIES = ("tensor_parallel", "fedavg")
PARTITIONS = ("iid", "contiguous", "dirichlet")
DEVICES = ("auto", "cpu", "cuda")
# The narrowest split width of AlexNet (conv1 has 96 output channels): a
# tensor-parallel world cannot have more trainers than that.
MAX_TENSOR_PARALLEL_WORLD = 96

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """An invalid experiment setting; the message names the value and what is valid."""


@dataclass(frozen=True)
class ExperimentConfig:
    world_size: int = 2
    learning_rate: float = 1e-3
    enable_swapping: bool = True
    rounds: int = 30
    seed: int = 123
    local_epochs: int = 1
    batch_size: int = 64
    swap_every: int = 2
    strategy: str = "tensor_parallel"
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    data_dir: str = "./data"
    max_train_samples: int = 0
    max_test_samples: int = 0
    init_from: str = ""
    eval_batch_size: int = 1000
    round_timeout: float = 1800.0
    device: str = "auto"
    amp: bool = True
    deterministic: bool = False

    def __post_init__(self) -> None:
        # Coerce exact types first so that 1 and 1.0, "1e-05" and 0.00001 are one config.
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
        problems = self._problems()
        if problems:
            raise ConfigError("invalid experiment configuration:\n  " + "\n  ".join(problems))
        # Swapping means rotating slices between trainers; with one trainer or with
        # whole-model FedAvg there is nothing to rotate, so it is switched off (the
        # CLI tells the user) rather than recorded as a setting that did nothing.
        if self.enable_swapping and not self.swapping_applies:
            object.__setattr__(self, "enable_swapping", False)

    @property
    def swapping_applies(self) -> bool:
        return self.world_size > 1 and self.strategy == "tensor_parallel"

    def _problems(self) -> list[str]:
        p = []
        if self.world_size < 1:
            p.append(f"world_size={self.world_size}: must be an integer >= 1")
        elif self.strategy == "tensor_parallel" and self.world_size > MAX_TENSOR_PARALLEL_WORLD:
            p.append(
                f"world_size={self.world_size}: tensor_parallel slicing allows 1..{MAX_TENSOR_PARALLEL_WORLD} "
                f"(conv1 has {MAX_TENSOR_PARALLEL_WORLD} channels to split)"
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            p.append(f"learning_rate={self.learning_rate!r}: must be a finite number > 0")
        if self.rounds < 1:
            p.append(f"rounds={self.rounds}: must be an integer >= 1")
        if self.seed < 0:
            p.append(f"seed={self.seed}: must be an integer >= 0")
        for name in ("local_epochs", "batch_size", "swap_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)}: must be an integer >= 1")
        if self.strategy not in STRATEGIES:
            p.append(f"strategy={self.strategy!r}: must be one of {', '.join(STRATEGIES)}")
        if self.partition not in PARTITIONS:
            p.append(f"partition={self.partition!r}: must be one of {', '.join(PARTITIONS)}")
        if not (self.dirichlet_alpha > 0 and math.isfinite(self.dirichlet_alpha)):
            p.append(f"dirichlet_alpha={self.dirichlet_alpha!r}: must be a finite number > 0")
        for name in ("max_train_samples", "max_test_samples"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)}: must be >= 0 (0 means all)")
        if not (self.round_timeout > 0 and math.isfinite(self.round_timeout)):
            p.append(f"round_timeout={self.round_timeout!r}: must be a number of seconds > 0")
        if self.device not in DEVICES:
            p.append(f"device={self.device!r}: must be one of {', '.join(DEVICES)}")
        if not self.data_dir:
            p.append("data_dir is empty: give the directory that holds (or will hold) cifar-100-python/")
        return p

    # --- identity -----------------------------------------------------------------
    def key(self) -> tuple[int, float, bool, int, int]:
        """The results-pickle key: (world_size, learning_rate, enable_swapping, rounds, seed)."""
        return (self.world_size, self.learning_rate, self.enable_swapping, self.rounds, self.seed)

    def description(self) -> str:
        """The experiment in one line of words (the run's description in the MLflow UI)."""
        lr = canonical(self.learning_rate)
        if self.strategy == "fedavg":
            how = f"FedAvg of {self.world_size} whole-model trainer{'s' * (self.world_size > 1)}"
        elif self.world_size == 1:
            how = "centralised training of the full model (world size 1)"
        else:
            how = (f"{self.world_size} trainers, each training a 1/{self.world_size}-width tensor-parallel slice, "
                   + (f"slices swapped every {self.swap_every} rounds" if self.enable_swapping else "no swapping"))
        data = f"{self.partition} partition" + (f", first {self.max_train_samples} training images"
                                                if self.max_train_samples else "")
        return (f"AlexNet on CIFAR-100: {how}; Adam lr {lr}, {self.rounds} rounds of {self.local_epochs} local "
                f"epoch{'s' * (self.local_epochs > 1)} at batch {self.batch_size}, seed {self.seed}, {data}.")

    def params(self) -> dict[str, str]:
        """Every field as its canonical string: what MLflow stores and sweeps compare."""
        return {f.name: canonical(getattr(self, f.name)) for f in fields(self)}

    # --- serialisation ------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return cls.from_mapping(json.loads(text))

    @classmethod
    def from_mapping(cls, values: dict) -> "ExperimentConfig":
        """Build from names -> values (strings, as MLflow params, are parsed)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown experiment parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**values)

    def replace(self, **changes) -> "ExperimentConfig":
        return dataclasses.replace(self, **changes)


def canonical(value) -> str:
    """One string per value: 1e-05 and 0.00001 both become '1e-05', booleans 'true'/'false'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def field_names() -> list[str]:
    return [f.name for f in fields(ExperimentConfig)]


def _coerce(name: str, typ: str, value):
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(str(value).strip()) if isinstance(value, str) else float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = {"bool": "true or false", "int": "an integer", "float": "a number"}[typ]
        raise ConfigError(f"{name}={value!r}: must be {kind}") from None
