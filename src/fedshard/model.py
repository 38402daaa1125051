"""CIFAR AlexNet, at full width or as one tensor-parallel slice of it.

The slicing table below is the single statement of how the network is cut:
layers alternate between splitting their outputs (dim 0 of the weight) and
their inputs (dim 1), as in Megatron, so that a slice is itself a complete,
narrower AlexNet that a trainer can train on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import NUM_CLASSES

# layer -> weight dimension that is split. Output-split layers (dim 0) slice
# their bias with the weight; input-split layers (dim 1) keep the bias whole.
SPLIT_DIM: dict[str, int] = {
    "conv1": 0, "conv2": 1,
    "conv3": 0, "conv4": 1,
    "conv5": 0, "conv6": 1,
    "fc1": 0, "fc2": 1,
    "fc3": 0, "fc4": 1,
}

# The split widths of the full network: the output width of each dim-0 layer,
# which is also the input width of the dim-1 layer that follows it.
FULL_WIDTHS: dict[str, int] = {"conv1": 96, "conv3": 384, "conv5": 256, "fc1": 4096, "fc3": 4096}

# Output height (= width) of each convolution on a 32x32 image: padding keeps the size, each pool
# halves it. With the layers' shapes this gives what a forward pass costs (forward_flops).
CONV_OUTPUT_SIZE = {"conv1": 32, "conv2": 32, "conv3": 16, "conv4": 16, "conv5": 8, "conv6": 8}


def part_sizes(total: int, n: int) -> list[int]:
    """Sizes of torch.tensor_split(x, n) along a dimension of length total."""
    return [len(c) for c in torch.arange(total).tensor_split(n)]


def slice_widths(n: int, index: int) -> dict[str, int]:
    """Split widths of slice `index` of `n` (uneven when n does not divide a width)."""
    if not 0 <= index < n:
        raise ValueError(f"slice index {index} out of range for {n} slices")
    return {layer: part_sizes(width, n)[index] for layer, width in FULL_WIDTHS.items()}


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
        self.fc1 = nn.Linear(256 * 4 * 4, w["fc1"])
        self.fc2 = nn.Linear(w["fc1"], 4096)
        self.fc3 = nn.Linear(4096, w["fc3"])
        self.fc4 = nn.Linear(w["fc3"], num_classes)

    @classmethod
    def for_slice(cls, n: int, index: int) -> "AlexNet":
        return cls(slice_widths(n, index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv6(F.relu(self.conv5(x)))), 2)
        x = torch.flatten(x, 1)
        x = F.dropout(F.relu(self.fc1(x)), 0.5, self.training)
        x = F.dropout(F.relu(self.fc2(x)), 0.5, self.training)
        x = F.dropout(F.relu(self.fc3(x)), 0.5, self.training)
        # In fp32 under autocast too: on a CPU autocast would leave log_softmax in bf16, and the loss
        # and its gradients with it (on CUDA it computes log_softmax in fp32 itself).
        return F.log_softmax(self.fc4(x).float(), dim=1)


def _shapes(widths: dict[str, int] | None) -> AlexNet:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return AlexNet(widths)


def parameter_count(widths: dict[str, int] | None = None) -> int:
    """Parameters of AlexNet at these split widths (the full model without widths)."""
    return sum(p.numel() for p in _shapes(widths).parameters())


def forward_flops(widths: dict[str, int] | None = None) -> int:
    """FLOPs of one 32x32 image's forward pass: 2 x the multiply-accumulates of the convolutions
    and linear layers, as torch.utils.flop_counter counts them (checked in the tests), but from
    the layers' shapes alone, without the seconds a first meta-device forward takes."""
    macs = 0
    for name, layer in _shapes(widths).named_children():
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            macs += layer.out_channels * layer.in_channels * kh * kw * CONV_OUTPUT_SIZE[name] ** 2
        elif isinstance(layer, nn.Linear):
            macs += layer.in_features * layer.out_features
    return 2 * macs


def state_dict_mismatch(state, model: nn.Module, shown: int = 5) -> str:
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
    wrong = [f"{k} {tuple(getattr(state[k], 'shape', ()))} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and getattr(state[k], "shape", None) != v.shape]
    problems = [f"{len(names)} {what} key{'s' * (len(names) != 1)} ({first(names)})"
                for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    if wrong:
        problems.append(f"{len(wrong)} tensor{'s' * (len(wrong) != 1)} of the wrong shape ({first(wrong)})")
    return "; ".join(problems) or "it does not load (its keys and shapes match)"
