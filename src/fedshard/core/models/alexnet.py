"""CIFAR AlexNet, at full width or as one tensor-parallel slice of it.

The slicing table below is the single statement of how the network is cut:
layers alternate between splitting their outputs (dim 0 of the weight) and
their inputs (dim 1), as in Megatron, so that a slice is itself a complete,
narrower AlexNet that a trainer can train on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedshard.core.models import NUM_CLASSES

if TYPE_CHECKING:
    from fedshard.core.models import Model

# layer -> weight dimension that is split. Output-split layers (dim 0) slice
# their bias with the weight; input-split layers (dim 1) keep the bias whole.
SPLIT_DIM: dict[str, int] = {
    "conv1": 0,
    "conv2": 1,
    "conv3": 0,
    "conv4": 1,
    "conv5": 0,
    "conv6": 1,
    "fc1": 0,
    "fc2": 1,
    "fc3": 0,
    "fc4": 1,
}

# The split widths of the full network: the output width of each dim-0 layer,
# which is also the input width of the dim-1 layer that follows it.
FULL_WIDTHS: dict[str, int] = {"conv1": 96, "conv3": 384, "conv5": 256, "fc1": 4096, "fc3": 4096}

# The map fc1 reads: 256 channels of 4 x 4 (a 32 x 32 image after three 2 x 2 pools).
POOLED = 4


class AlexNet(nn.Module):
    """conv 5-5 pool, 3-3 pool, 3-3 pool, fc x4; ReLU everywhere but fc4, dropout after fc1-3."""

    def __init__(self, widths: dict[str, int] | None = None, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = dict(FULL_WIDTHS, **(widths or {}))
        self.conv1 = nn.Conv2d(3, w["conv1"], 5, padding=2)
        self.conv2 = nn.Conv2d(w["conv1"], 256, 5, padding=2)
        self.conv3 = nn.Conv2d(256, w["conv3"], 3, padding=1)
        self.conv4 = nn.Conv2d(w["conv3"], 384, 3, padding=1)
        self.conv5 = nn.Conv2d(384, w["conv5"], 3, padding=1)
        self.conv6 = nn.Conv2d(w["conv5"], 256, 3, padding=1)
        self.fc1 = nn.Linear(256 * POOLED * POOLED, w["fc1"])
        self.fc2 = nn.Linear(w["fc1"], 4096)
        self.fc3 = nn.Linear(4096, w["fc3"])
        self.fc4 = nn.Linear(w["fc3"], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv6(F.relu(self.conv5(x)))), 2)
        # Images larger than 32 x 32 (image_size) leave a larger map: averaged down to fc1's 4 x 4,
        # as torchvision's AlexNet does. At 32 x 32 each output is its one input over 1: exact.
        x = torch.flatten(F.adaptive_avg_pool2d(x, POOLED), 1)
        x = F.dropout(F.relu(self.fc1(x)), 0.5, self.training)
        x = F.dropout(F.relu(self.fc2(x)), 0.5, self.training)
        x = F.dropout(F.relu(self.fc3(x)), 0.5, self.training)
        # In fp32 under autocast too: on a CPU autocast would leave log_softmax in bf16, and the loss
        # and its gradients with it (on CUDA it computes log_softmax in fp32 itself).
        return F.log_softmax(self.fc4(x).float(), dim=1)


# --- the family interface (models.Model) ----------------------------------------------------


def network(model: Model, widths: dict[str, int] | None) -> AlexNet:
    return AlexNet(widths)


def table(model: Model) -> dict[str, int | None]:
    return dict(SPLIT_DIM)


def full_widths(model: Model) -> dict[str, int]:
    return dict(FULL_WIDTHS)


def conv_output_sizes(image_size: int) -> dict[str, int]:
    """Output height (= width) of each convolution: padding keeps the size, each pool halves it."""
    return {
        "conv1": image_size,
        "conv2": image_size,
        "conv3": image_size // 2,
        "conv4": image_size // 2,
        "conv5": image_size // 4,
        "conv6": image_size // 4,
    }


def forward_flops(model: Model, widths: dict[str, int] | None, image_size: int) -> int:
    sizes, macs = conv_output_sizes(image_size), 0
    with torch.device("meta"):
        net = AlexNet(widths)
    for name, layer in net.named_children():
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            macs += layer.out_channels * layer.in_channels * kh * kw * sizes[name] ** 2
        elif isinstance(layer, nn.Linear):
            macs += layer.in_features * layer.out_features
    return 2 * macs
