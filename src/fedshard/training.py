"""Local training and evaluation on data that already sits on the device.

As in airbench, a trainer's whole partition is one uint8 tensor on its device;
random crop (pad 4) and horizontal flip are drawn per image but applied to a
whole batch at once with one gather, then normalised. No DataLoader, no PIL.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)
PAD = 4
SIZE = 32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


@dataclass
class DeviceData:
    """Images (N,3,32,32) uint8 and labels (N,) int64, both on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray, device: torch.device) -> "DeviceData":
        return cls(torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device))

    def __len__(self) -> int:
        return len(self.labels)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float, scaled to [0, 1] then standardised per channel."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255) - mean).div_(std)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the zero-padded image and random horizontal flip, as one gather."""
    b, dev = images.shape[0], images.device
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (b, 1), generator=generator, device=dev)
    dx = torch.randint(0, 2 * PAD + 1, (b, 1), generator=generator, device=dev)
    flip = torch.rand((b, 1), generator=generator, device=dev) < 0.5
    steps = torch.arange(SIZE, device=dev)
    rows = dy + steps
    cols = dx + torch.where(flip, steps.flip(0), steps)  # a flipped crop reads its columns backwards
    return padded[
        torch.arange(b, device=dev).view(b, 1, 1, 1),
        torch.arange(3, device=dev).view(1, 3, 1, 1),
        rows.view(b, 1, SIZE, 1),
        cols.view(b, 1, 1, SIZE),
    ]


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainResult:
    samples: int
    mean_loss: float
    seconds: float


def train_local(
    model: nn.Module,
    data: DeviceData,
    *,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    amp: bool = False,
) -> TrainResult:
    """A fresh Adam(lr, weight_decay=1e-4) and `epochs` shuffled passes over `data`."""
    start = time.perf_counter()
    device = data.images.device
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    model.train()
    n = len(data)
    total = torch.zeros((), device=device)  # summed on the device: no sync per step
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator, device=device)
        for batch in order.split(batch_size):
            x = normalize(augment(data.images[batch], generator))
            y = data.labels[batch]
            with _autocast(device, amp):
                loss = F.nll_loss(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(batch)
    mean_loss = total.item() / (n * epochs)
    return TrainResult(samples=n, mean_loss=mean_loss, seconds=time.perf_counter() - start)


@torch.inference_mode()
def evaluate(model: nn.Module, data: DeviceData, batch_size: int = 1000, amp: bool = False) -> tuple[float, float]:
    """(mean NLL, fraction correct) over all of `data`, in large batches."""
    model.eval()
    device = data.images.device
    loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for images, labels in zip(data.images.split(batch_size), data.labels.split(batch_size)):
        with _autocast(device, amp):
            out = model(normalize(images)).float()
        loss += F.nll_loss(out, labels, reduction="sum").double()
        correct += (out.argmax(1) == labels).sum()
    n = len(data)
    return loss.item() / n, correct.item() / n
