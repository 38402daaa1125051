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
from typing import Any, SupportsFloat, cast

from fedshard.core import models
from fedshard.core.errors import FedshardError

STRATEGIES = ("tensor_parallel", "fedavg", "fedprox")
# The local optimisers, fresh every round (training.py): Adam with weight decay 1e-4, or SGD with
# momentum 0.9 and weight decay 1e-4.
OPTIMIZERS = ("adam", "sgd")
PARTITIONS = ("iid", "contiguous", "dirichlet")
DEVICES = ("auto", "cpu", "cuda")
# What a run computes in (precision.py): auto is bf16 where the device computes it natively, else
# fp32; a run records the one it really used.
PRECISIONS = ("auto", "bf16", "fp32")
# Settings that are gone, and what took their place: named when someone still gives them.
RENAMED = {
    "amp": "precision (bf16 for amp=true, fp32 for amp=false; auto: bf16 wherever the device computes "
    "it natively, which is what amp did on CUDA)"
}
# init_from=run:<run name>: the final model of the FINISHED run of that name in the same experiment.
RUN_PREFIX = "run:"
# Settings whose default is the model's own (its recipe, models.Recipe): this value in the dataclass
# means "the model's", and a config always holds, and records, the value it resolved to. So a run
# recorded before the setting existed (read back with the dataclass default) is the same
# configuration as one that gives AlexNet's value, and `model=resnet34` alone is the harness's
# ResNet-34 recipe.
MODEL_DEFAULT = {"optimizer": "", "image_size": 0, "local_epochs": 0, "batch_size": 0}

# What a configuration *is*: every setting that can change a result. Two runs that agree on all
# of these trained the same thing, so a sweep skips, resumes and extends across them and export
# and analysis keep them apart from runs that differ in any. The settings left out say where the
# data sits, how long to wait, how large the evaluation batches are and which kernels run: they
# change how a run goes (or its last bits, between CPU and GPU), never what it trains.
NOT_RESULT_SETTINGS = ("data_dir", "eval_batch_size", "round_timeout", "device", "deterministic")
# The five settings of the classic results pickle's key, in key order.
KEY_SETTINGS = ("world_size", "learning_rate", "enable_swapping", "rounds", "seed")
# How a run's name spells a setting that differs from its default (the five of the key are
# always in it): ws2-lr0.001-swaptrue-r30-s123-fedavg-bs16.
NAME_PARTS = {
    "model": "{}",
    "enable_layerwise_swapping": "layerwise",
    "local_epochs": "ep{}",
    "batch_size": "bs{}",
    "optimizer": "{}",
    "image_size": "img{}",
    "swap_every": "every{}",
    "strategy": "{}",
    "proximal_mu": "mu{}",
    "partition": "{}",
    "dirichlet_alpha": "alpha{}",
    "max_train_samples": "train{}",
    "max_test_samples": "test{}",
    "init_from": "init",
    "precision": "{}",
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(FedshardError, ValueError):
    """An invalid experiment setting; the message names the value and what is valid."""

    exit_code = 2


@dataclass(frozen=True)
class ExperimentConfig:
    world_size: int = 2
    learning_rate: float = 1e-3
    enable_swapping: bool = True
    rounds: int = 30
    seed: int = 123
    model: str = models.DEFAULT
    enable_layerwise_swapping: bool = False
    # The model's recipe (MODEL_DEFAULT): AlexNet's is the original harness's, 3 local epochs at batch 32
    # with Adam on 32x32 images; ResNet-34's 1 local epoch at batch 32 with SGD on 224x224.
    local_epochs: int = 0  # these four: MODEL_DEFAULT, checked below the class
    batch_size: int = 0
    optimizer: str = ""
    image_size: int = 0
    swap_every: int = 2
    strategy: str = "tensor_parallel"
    proximal_mu: float = 0.01
    partition: str = "contiguous"
    dirichlet_alpha: float = 0.5
    data_dir: str = "./data"
    max_train_samples: int = 0
    max_test_samples: int = 0
    init_from: str = ""
    eval_batch_size: int = 1000
    round_timeout: float = 1800.0
    device: str = "auto"
    precision: str = "auto"
    deterministic: bool = False

    def __post_init__(self) -> None:
        # Coerce exact types first so that 1 and 1.0, "1e-05" and 0.00001 are one config.
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, str(f.type), getattr(self, f.name)))
        recipe = models.REGISTRY.get(self.model, models.get(models.DEFAULT)).recipe  # an unknown model is a problem
        for name, unset in MODEL_DEFAULT.items():
            if getattr(self, name) == unset:
                object.__setattr__(self, name, getattr(recipe, name))
        problems = self._problems()
        if problems:
            raise ConfigError("invalid experiment configuration:\n  " + "\n  ".join(problems))
        for name, (value, _) in self._not_applying().items():
            object.__setattr__(self, name, value)

    def _not_applying(self) -> dict[str, tuple[object, str]]:
        """Settings that mean nothing here -> (the value they take instead, why). They are recorded
        as that value, not as a setting that did nothing, so that two runs training the same thing
        are one configuration and a grid never runs it twice."""
        out: dict[str, tuple[object, str]] = {}
        if self.world_size == 1 and self.strategy != "tensor_parallel":
            out["strategy"] = (
                "tensor_parallel",
                "one trainer trains the whole model whatever the strategy; running it as centralised training",
            )
        if self.enable_swapping and not self.swapping_applies:
            out["enable_swapping"] = (
                False,
                f"swapping does not apply to world_size={self.world_size} with "
                f"strategy={self.strategy}; running without it",
            )
        if self.enable_layerwise_swapping and self.world_size == 1:
            out["enable_layerwise_swapping"] = (
                False,
                "layerwise swapping does not apply to world_size=1; running without it",
            )
        if not (self.enable_swapping and self.swapping_applies) and self.swap_every != _default("swap_every"):
            out["swap_every"] = (
                _default("swap_every"),
                "swap_every applies only when slices are swapped; recorded as the default",
            )
        if self.strategy != "fedprox" and self.proximal_mu != _default("proximal_mu"):
            out["proximal_mu"] = (
                _default("proximal_mu"),
                "proximal_mu applies only to strategy=fedprox; recorded as the default",
            )
        if self.partition != "dirichlet" and self.dirichlet_alpha != _default("dirichlet_alpha"):
            out["dirichlet_alpha"] = (
                _default("dirichlet_alpha"),
                "dirichlet_alpha applies only to partition=dirichlet; recorded as the default",
            )
        return out

    @property
    def swapping_applies(self) -> bool:
        return self.world_size > 1 and self.strategy == "tensor_parallel"

    def _problems(self) -> list[str]:
        p = self._model_problems()
        if self.world_size < 1:
            p.append(f"world_size={self.world_size}: must be an integer >= 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            p.append(f"learning_rate={self.learning_rate!r}: must be a finite number > 0")
        if self.rounds < 1:
            p.append(f"rounds={self.rounds}: must be an integer >= 1")
        if self.seed < 0:
            p.append(f"seed={self.seed}: must be an integer >= 0")
        for name in ("local_epochs", "batch_size", "swap_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                own = " (0: the model's own)" if name in MODEL_DEFAULT else ""
                p.append(f"{name}={getattr(self, name)}: must be an integer >= 1{own}")
        if self.strategy not in STRATEGIES:
            p.append(f"strategy={self.strategy!r}: must be one of {', '.join(STRATEGIES)}")
        if self.partition not in PARTITIONS:
            p.append(f"partition={self.partition!r}: must be one of {', '.join(PARTITIONS)}")
        if not (self.proximal_mu >= 0 and math.isfinite(self.proximal_mu)):
            p.append(f"proximal_mu={self.proximal_mu!r}: must be a finite number >= 0")
        if not (self.dirichlet_alpha > 0 and math.isfinite(self.dirichlet_alpha)):
            p.append(f"dirichlet_alpha={self.dirichlet_alpha!r}: must be a finite number > 0")
        for name in ("max_train_samples", "max_test_samples"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)}: must be >= 0 (0 means all)")
        if not (self.round_timeout > 0 and math.isfinite(self.round_timeout)):
            p.append(f"round_timeout={self.round_timeout!r}: must be a number of seconds > 0")
        if self.device not in DEVICES:
            p.append(f"device={self.device!r}: must be one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            p.append(f"precision={self.precision!r}: must be one of {', '.join(PRECISIONS)}")
        if not self.data_dir:
            p.append("data_dir is empty: give the directory that holds (or will hold) cifar-100-python/")
        return p

    def _model_problems(self) -> list[str]:
        """What the model makes invalid: its name, a world size it cannot be cut for, its recipe's settings."""
        if self.model not in models.REGISTRY:
            return [f"model={self.model!r}: must be one of {', '.join(models.REGISTRY)}"]
        model, p = models.get(self.model), []
        if self.strategy == "tensor_parallel" and self.world_size > model.max_world_size:
            p.append(
                f"world_size={self.world_size}: tensor_parallel slicing allows 1..{model.max_world_size} "
                f"({self.model}'s narrowest split layer has {model.max_world_size} channels to split)"
            )
        elif self.enable_layerwise_swapping and self.world_size > 1:
            p.extend(_layerwise_problems(model, self.world_size, self.strategy))
        if self.optimizer not in OPTIMIZERS:
            p.append(f"optimizer={self.optimizer!r}: must be one of {', '.join(OPTIMIZERS)} (empty: the model's own)")
        if self.image_size < models.NATIVE_IMAGE_SIZE:
            p.append(
                f"image_size={self.image_size}: must be an integer >= {models.NATIVE_IMAGE_SIZE} (CIFAR's images "
                f"are resized up, never down; 0: the model's own)"
            )
        if self.init_from.startswith(models.TORCHVISION_PREFIX) and not model.torchvision:
            with_weights = [m.name for m in models.REGISTRY.values() if m.torchvision]
            p.append(
                f"init_from={self.init_from!r}: torchvision has no weights of fedshard's {self.model}; models "
                f"with them: {', '.join(with_weights)}"
            )
        return p

    # --- identity -----------------------------------------------------------------
    def key(self) -> tuple[int, float, bool, int, int]:
        """The results-pickle key: (world_size, learning_rate, enable_swapping, rounds, seed)."""
        return (self.world_size, self.learning_rate, self.enable_swapping, self.rounds, self.seed)

    def settings(self) -> dict[str, str]:
        """The settings that make up the configuration (RESULT_SETTINGS), as canonical strings."""
        params = self.params()
        return {name: params[name] for name in RESULT_SETTINGS}

    def identity(self) -> tuple[tuple[str, str], ...]:
        """What two runs must share to be one configuration: skip, resume, extension and export
        compare this, never the whole config (see NOT_RESULT_SETTINGS)."""
        return tuple(self.settings().items())

    def run_name(self) -> str:
        """The run's name in the MLflow UI: the pickle key's five settings, then every other setting
        that differs from its default, e.g. ws2-lr0.001-swapfalse-r30-s123-fedavg; the model is named
        unless it is AlexNet, and its recipe's settings differ from the model's own, not AlexNet's
        (ws1-lr0.001-swapfalse-r10-s42-resnet34: SGD, 224x224, 1 local epoch); bf16 is named, fp32
        (what the original harness computed in) is not."""
        p, default = self.params(), dict(ExperimentConfig(model=self.model).params(), precision="fp32")
        if self.model != models.DEFAULT:
            default["model"] = models.DEFAULT
        if p["precision"] == "auto":
            p["precision"] = "fp32"
        name = f"ws{self.world_size}-lr{p['learning_rate']}-swap{p['enable_swapping']}-r{self.rounds}-s{self.seed}"
        extra = [NAME_PARTS[k].format(p[k]) for k in RESULT_SETTINGS if k in NAME_PARTS and p[k] != default[k]]
        return "-".join([name, *extra])

    def description(self) -> str:
        """The experiment in one line of words (the run's description in the MLflow UI)."""
        lr = canonical(self.learning_rate)
        if self.strategy in ("fedavg", "fedprox"):
            how = f"FedAvg of {self.world_size} whole-model trainer{'s' * (self.world_size > 1)}" + (
                f" with FedProx's proximal term (mu {canonical(self.proximal_mu)})"
                if self.strategy == "fedprox"
                else ""
            )
        elif self.world_size == 1:
            how = "centralised training of the full model (world size 1)"
        else:
            how = (
                f"{self.world_size} trainers, each training a 1/{self.world_size}-width tensor-parallel slice, "
                + (f"slices swapped every {self.swap_every} rounds" if self.enable_swapping else "no swapping")
                + (", input blocks swapped layerwise every round" if self.enable_layerwise_swapping else "")
            )
        data = f"{self.partition} partition" + (
            f", first {self.max_train_samples} training images" if self.max_train_samples else ""
        )
        size = "" if self.image_size == models.NATIVE_IMAGE_SIZE else f" resized to {self.image_size}x{self.image_size}"
        optimizer = {"adam": "Adam", "sgd": "SGD"}[self.optimizer]
        return (
            f"{models.get(self.model).title} on CIFAR-100{size}: {how}; {optimizer} lr {lr}, {self.rounds} rounds "
            f"of {self.local_epochs} local epoch{'s' * (self.local_epochs > 1)} at batch {self.batch_size}, "
            f"seed {self.seed}, {data}."
        )

    def params(self) -> dict[str, str]:
        """Every field as its canonical string: what MLflow stores and sweeps compare."""
        return {f.name: canonical(getattr(self, f.name)) for f in fields(self)}

    # --- serialisation ------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        return cls.from_mapping(json.loads(text))

    @classmethod
    def from_mapping(cls, values: dict) -> ExperimentConfig:
        """Build from names -> values (strings, as MLflow params, are parsed)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            renamed = "".join(f"; {name} is now {RENAMED[name]}" for name in unknown if name in RENAMED)
            raise ConfigError(
                f"unknown experiment parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}" + renamed
            )
        return cls(**values)

    def replace(self, **changes: Any) -> ExperimentConfig:  # any value: __post_init__ coerces and checks it
        return dataclasses.replace(self, **changes)

    @classmethod
    def with_notes(cls, values: dict) -> tuple[ExperimentConfig, list[str]]:
        """from_mapping, and a note for every given setting that does not apply and was changed."""
        cfg = cls.from_mapping(values)
        given = cls.__new__(cls)  # the values as given, coerced but not canonicalised
        for f in fields(cls):
            object.__setattr__(given, f.name, _coerce(f.name, str(f.type), values.get(f.name, getattr(cfg, f.name))))
        return cfg, [f"{why} ({name}={canonical(value)})" for name, (value, why) in given._not_applying().items()]


RESULT_SETTINGS = tuple(f.name for f in fields(ExperimentConfig) if f.name not in NOT_RESULT_SETTINGS)


def _layerwise_problems(model: models.Model, world_size: int, strategy: str) -> list[str]:
    """Layerwise swapping hands a trainer another slice's input block, which must have its own
    block's width: every split width must divide evenly (as the harness's `width // n` assumed)."""
    if strategy != "tensor_parallel":
        return [
            f"enable_layerwise_swapping=true: layerwise swapping exchanges input blocks of tensor-parallel "
            f"slices; strategy={strategy} trains whole models (use strategy=tensor_parallel or "
            f"enable_layerwise_swapping=false)"
        ]
    uneven = [width for width in model.split_widths if width % world_size]
    if uneven:
        return [
            f"enable_layerwise_swapping=true with world_size={world_size}: {model.name}'s split widths "
            f"{', '.join(map(str, uneven))} do not divide into {world_size} equal blocks; layerwise swapping "
            f"needs world_size in {', '.join(map(str, model.even_world_sizes()))}"
        ]
    return []


def _default(name: str) -> object:
    return ExperimentConfig.__dataclass_fields__[name].default


assert all(_default(name) == unset for name, unset in MODEL_DEFAULT.items()), "the recipe's fields default to unset"


def canonical(value: object) -> str:
    """One string per value: 1e-05 and 0.00001 both become '1e-05', booleans 'true'/'false'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def setting_value(name: str, value: object) -> str:
    """One setting's value as runs record it (canonical), checked by that setting's own rules; a
    ConfigError names it and what is valid. Whether it suits the other settings is not asked (a
    world size is checked with FedAvg, which runs any number of trainers; every other setting with
    the default tensor-parallel experiment, where each applies), and the rules for settings that
    do not apply are left out: dirichlet_alpha=0.1 stays 0.1 whatever the partition. A value one
    model allows is valid (init_from=torchvision:DEFAULT is ResNet-34's); the value that means "the
    model's own" is not, as runs record the value it stood for."""
    coerced = _coerce(name, str(ExperimentConfig.__dataclass_fields__[name].type), value)
    if name in MODEL_DEFAULT and coerced == MODEL_DEFAULT[name]:
        raise ConfigError(
            f"{name}={canonical(coerced) or repr(coerced)} stands for the model's own value, which "
            f"runs record instead: give that ({models.own_values(name)})"
        )
    problems = []
    for model in models.REGISTRY:
        try:
            ExperimentConfig.from_mapping(
                {"strategy": "fedavg" if name == "world_size" else "tensor_parallel", "model": model, name: value}
            )
            return canonical(coerced)
        except ConfigError as exc:
            problems.append(exc)
    raise problems[0]


def field_names() -> list[str]:
    return [f.name for f in fields(ExperimentConfig)]


def _coerce(name: str, typ: str, value: object) -> object:
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
            # Anything else float() takes (numpy scalars); what it refuses is the TypeError below.
            return float(str(value).strip()) if isinstance(value, str) else float(cast(SupportsFloat, value))
        return str(value)
    except (TypeError, ValueError):
        kind = {"bool": "true or false", "int": "an integer", "float": "a number"}[typ]
        raise ConfigError(f"{name}={value!r}: must be {kind}") from None
