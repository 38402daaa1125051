"""The models fedshard trains: one registry entry each, and what every other module asks of one.

An entry (`Model`) says, without importing PyTorch (the launcher, the sweep and the config
checks read it): the model's name (the `model` setting), its training recipe, the widths
its output-split layers have, and the family file that builds it (alexnet.py, resnet.py).
The family file holds the PyTorch side: the network at full width and as slice s of n,
its slicing table (every parameter and buffer: split along which dimension, or whole),
its FLOPs from the layer shapes, and the smallest batch it trains on. Strategies,
transport, checkpoints, byte counts, model sizes and the MLflow model take all of it from
here: none of them names a layer.

A new model of an existing family is one entry in REGISTRY below and nothing else; a new
family is its file plus its entries.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

# CIFAR-100's classes: what every model predicts, and what every label must be below.
NUM_CLASSES = 100
# The per-channel statistics of the images a recipe standardises with.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# CIFAR's images are 32 x 32; a model sees them resized up to its image size, never down.
NATIVE_IMAGE_SIZE = 32
# init_from=torchvision:<weights>: the ImageNet weights torchvision publishes for the same network.
TORCHVISION_PREFIX = "torchvision:"


@dataclass(frozen=True)
class Recipe:
    """How a model is trained, as the harness trained it. optimizer, image_size, local_epochs and
    batch_size are the defaults of the settings of those names (config.py); the normalisation and
    the augmentation (random crop of the image zero-padded by `crop_pad` pixels, random horizontal
    flip) go with the model."""

    optimizer: str  # training.OPTIMIZERS: adam (weight decay 1e-4) or sgd (momentum 0.9, weight decay 1e-4)
    image_size: int
    local_epochs: int
    batch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pad: int  # at image_size; at another image size the same fraction of it (28 at 224 is 4 at 32)

    def pad_at(self, image_size: int) -> int:
        return round(self.crop_pad * image_size / self.image_size)


# The harness's two recipes: its AlexNet's (CIFAR-100 statistics, 32 x 32) and its ResNet-34's.
CIFAR_ADAM = Recipe("adam", 32, 3, 32, CIFAR100_MEAN, CIFAR100_STD, crop_pad=4)
IMAGENET_SGD = Recipe("sgd", 224, 1, 32, IMAGENET_MEAN, IMAGENET_STD, crop_pad=28)


def part_sizes(total: int, n: int) -> list[int]:
    """Sizes of torch.tensor_split(x, n) along a dimension of length total: the first total mod n
    parts one larger."""
    return [total // n + (k < total % n) for k in range(n)]


@dataclass(frozen=True)
class Model:
    """One model: what config checks read (no PyTorch), and the family file's PyTorch side."""

    name: str  # the `model` setting
    title: str  # in words, e.g. ResNet-34
    family: str  # the module of fedshard.core.models that builds it
    recipe: Recipe
    # The full widths of its output-split layers, each once: the world sizes it can be cut for
    # (config.py checks them without PyTorch; tests/test_models.py checks them against the table).
    split_widths: tuple[int, ...]
    arch: tuple[int, ...] = ()  # the family's arguments (ResNet: blocks per stage)
    torchvision: str = ""  # torchvision's name for the same network, whose ImageNet weights it loads
    head: str = ""  # the layer torchvision's weights leave at its seeded init (their 1000 classes)
    # How far its last batch norm's map is downsampled (ResNet: 32, a 1 x 1 map at 32 x 32); 0: no batch norm.
    bn_stride: int = 0

    @property
    def max_world_size(self) -> int:
        """The most tensor-parallel trainers: one channel of its narrowest split layer each."""
        return min(self.split_widths)

    def min_batch(self, image_size: int) -> int:
        """The fewest images a training batch may hold: batch norm in training needs more than one
        value per channel, and a 1 x 1 map gives one per image."""
        return 2 if self.bn_stride and -(-image_size // self.bn_stride) == 1 else 1

    def even_world_sizes(self) -> list[int]:
        """World sizes > 1 that cut every split layer into equal blocks (layerwise swapping needs them)."""
        return [n for n in range(2, self.max_world_size + 1) if all(w % n == 0 for w in self.split_widths)]

    # --- the PyTorch side: the family file -----------------------------------------------
    @cached_property
    def _family(self):
        return importlib.import_module(f"{__name__}.{self.family}")

    def network(self, widths: dict[str, int] | None = None) -> nn.Module:
        """The network at these split widths (the full one without), randomly initialised from
        torch's global generator (on the meta device under `torch.device("meta")`)."""
        return self._family.network(self, widths)

    def table(self) -> dict[str, int | None]:
        """Module -> the dimension its weight is split along (0: outputs, 1: inputs), or None: whole
        on every slice. It names every module that holds a parameter or a buffer (sharding.py says
        what that means for each tensor)."""
        return self._family.table(self)

    def full_widths(self) -> dict[str, int]:
        """Each output-split module -> its full width; a slice's network takes a part of each."""
        return self._family.full_widths(self)

    def slice_widths(self, n: int, index: int) -> dict[str, int]:
        """Split widths of slice `index` of `n` (uneven when n does not divide a width)."""
        if not 0 <= index < n:
            raise ValueError(f"slice index {index} out of range for {n} slices")
        return {name: part_sizes(width, n)[index] for name, width in self.full_widths().items()}

    def forward_flops(self, widths: dict[str, int] | None = None, image_size: int | None = None) -> int:
        """FLOPs of one image's forward pass at `image_size` (the recipe's without): 2 x the
        multiply-accumulates of the convolutions and linear layers, as torch.utils.flop_counter
        counts them (tests/test_models.py), from the layers' shapes alone."""
        return self._family.forward_flops(self, widths, image_size or self.recipe.image_size)

    def parameter_count(self, widths: dict[str, int] | None = None) -> int:
        """Parameters at these split widths (the full model without)."""
        return sum(p.numel() for p in self.shapes(widths).parameters())

    def shapes(self, widths: dict[str, int] | None = None) -> nn.Module:
        """The network on the meta device: shapes and dtypes only, no memory, no initialisation."""
        import torch

        with torch.device("meta"):
            return self.network(widths)

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The full model's state dict as name -> (shape, dtype): what a checkpoint must hold."""
        return {k: (tuple(v.shape), v.dtype) for k, v in self.shapes().state_dict().items()}


# name -> entry. ResNets differ only in their blocks per stage (torchvision's layer1..layer4).
REGISTRY: dict[str, Model] = {
    m.name: m
    for m in (
        Model("alexnet", "AlexNet", "alexnet", CIFAR_ADAM, split_widths=(96, 256, 384, 4096)),
        Model(
            "resnet34",
            "ResNet-34",
            "resnet",
            IMAGENET_SGD,
            split_widths=(64, 128, 256, 512),
            arch=(3, 4, 6, 3),
            torchvision="resnet34",
            head="fc",
            bn_stride=32,
        ),
        Model(
            "resnet18",
            "ResNet-18",
            "resnet",
            IMAGENET_SGD,
            split_widths=(64, 128, 256, 512),
            arch=(2, 2, 2, 2),
            torchvision="resnet18",
            head="fc",
            bn_stride=32,
        ),
    )
}
DEFAULT = "alexnet"


def names() -> list[str]:
    return list(REGISTRY)


def own_values(setting: str) -> str:
    """Each model's own value of a recipe setting, in words: 'alexnet 3, resnet34 1'."""
    return ", ".join(f"{m.name} {getattr(m.recipe, setting)}" for m in REGISTRY.values())


def get(name: str) -> Model:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"model={name!r}: must be one of {', '.join(REGISTRY)}") from None


def state_dict_mismatch(state: object, model: nn.Module, shown: int = 5) -> str:
    """Why `state` does not load into `model`, in words: what it is when it is no mapping, else its
    missing and unexpected keys (the first `shown` of each, and how many) and the tensors of the
    wrong shape. load_state_dict's own error names none of them in its first line."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a state dict (a mapping of parameter names to tensors)"
    expected = model.state_dict()

    def first(names: list) -> str:
        return ", ".join(map(str, names[:shown])) + (", ..." if len(names) > shown else "")

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(getattr(state[k], 'shape', ()))} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and getattr(state[k], "shape", None) != v.shape
    ]
    problems = [
        f"{len(names)} {what} key{'s' * (len(names) != 1)} ({first(names)})"
        for what, names in (("missing", missing), ("unexpected", unexpected))
        if names
    ]
    if wrong:
        problems.append(f"{len(wrong)} tensor{'s' * (len(wrong) != 1)} of the wrong shape ({first(wrong)})")
    return "; ".join(problems) or "it does not load (its keys and shapes match)"
