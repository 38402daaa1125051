"""ResNets of BasicBlocks (ResNet-18, ResNet-34), with torchvision's module names, cut as the
researchers' harness cut ResNet-34 (JaMussCraft/flame, cifar100_resnet34).

In each BasicBlock, conv1 is split by its outputs and bn1 follows it (weight, bias, running
mean and variance); conv2 is split by its inputs, so each slice produces the block's whole
output, which bn2 normalises. bn2, the downsample projection and its batch norm, the stem
(conv1, bn1) and fc stay whole on every slice and are averaged on assembly. The names are
torchvision's (`layer2.0.downsample.0.weight`, not the harness's `shortcut.*`), so that
torchvision's ImageNet weights load key for key (init_from=torchvision:DEFAULT). The
initialisation is PyTorch's default for each layer, as the harness's network had it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedshard.core.models import NUM_CLASSES

if TYPE_CHECKING:
    from fedshard.core.models import Model

STAGE_WIDTHS = (64, 128, 256, 512)  # torchvision's layer1..layer4
STAGES = ("layer1", "layer2", "layer3", "layer4")
STEM_WIDTH = 64


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class BasicBlock(nn.Module):
    """Two 3 x 3 convolutions with batch norm and a shortcut; conv1 has `width` of `planes` outputs."""

    def __init__(self, inplanes: int, planes: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:  # the shortcut must change shape: a 1 x 1 projection
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def blocks(arch: tuple[int, ...]) -> Iterator[tuple[str, int, int, int]]:
    """(name, in channels, channels, stride) of every block, in order: layer1.0, layer1.1, ..."""
    inplanes = STEM_WIDTH
    for stage, (count, planes) in enumerate(zip(arch, STAGE_WIDTHS), start=1):
        for b in range(count):
            yield f"layer{stage}.{b}", inplanes, planes, 2 if stage > 1 and b == 0 else 1
            inplanes = planes


class ResNet(nn.Module):
    """torchvision's ResNet of BasicBlocks (stem 7 x 7 stride 2 and max pool, four stages, average
    pool, fc) returning log-probabilities, with each block's conv1 at its split width."""

    def __init__(self, arch: tuple[int, ...], widths: dict[str, int] | None = None, num_classes: int = NUM_CLASSES):
        super().__init__()
        widths = widths or {}
        self.conv1 = nn.Conv2d(3, STEM_WIDTH, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages: dict[str, list[BasicBlock]] = {}
        for name, inplanes, planes, stride in blocks(arch):
            width = widths.get(f"{name}.conv1", planes)
            stages.setdefault(name.split(".")[0], []).append(BasicBlock(inplanes, planes, width, stride))
        for stage, members in stages.items():
            self.add_module(stage, nn.Sequential(*members))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in STAGES:  # added by name in __init__ (torchvision's names: layer1 .. layer4)
            x = self.get_submodule(stage)(x)
        x = torch.flatten(self.avgpool(x), 1)
        # fp32 log-probabilities under autocast too, as AlexNet's (the loss is NLL on them).
        return F.log_softmax(self.fc(x).float(), dim=1)


# --- the family interface (models.Model) ----------------------------------------------------


def network(model: Model, widths: dict[str, int] | None) -> ResNet:
    return ResNet(model.arch, widths)


def table(model: Model) -> dict[str, int | None]:
    out: dict[str, int | None] = {"conv1": None, "bn1": None}
    for name, inplanes, planes, stride in blocks(model.arch):
        out.update({f"{name}.conv1": 0, f"{name}.bn1": 0, f"{name}.conv2": 1, f"{name}.bn2": None})
        if stride != 1 or inplanes != planes:
            out.update({f"{name}.downsample.0": None, f"{name}.downsample.1": None})
    out["fc"] = None
    return out


def full_widths(model: Model) -> dict[str, int]:
    return {f"{name}.conv1": planes for name, _, planes, _ in blocks(model.arch)}


def _stem_out(image_size: int) -> tuple[int, int]:
    """The stem convolution's output size, and the max pool's after it."""
    stem = conv_out(image_size, 7, 2, 3)
    return stem, conv_out(stem, 3, 2, 1)


def forward_flops(model: Model, widths: dict[str, int] | None, image_size: int) -> int:
    widths = widths or {}
    stem, size = _stem_out(image_size)
    macs = STEM_WIDTH * 3 * 7 * 7 * stem**2
    for name, inplanes, planes, stride in blocks(model.arch):
        width = widths.get(f"{name}.conv1", planes)
        out = conv_out(size, 3, stride, 1)
        macs += (width * inplanes * 9 + planes * width * 9) * out**2  # conv1, conv2
        if stride != 1 or inplanes != planes:
            macs += planes * inplanes * out**2  # the 1 x 1 projection
        size = out
    return 2 * (macs + STAGE_WIDTHS[-1] * NUM_CLASSES)
