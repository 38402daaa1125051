"""Local training and evaluation on data that already sits on the device.

As in airbench, a trainer's whole partition is one uint8 tensor on its device;
each batch is resized there to the model's image size (ResNet-34's 224: never
a CPU loader), its random crop (padded by an eighth of the image size) and
horizontal flip are drawn per image but applied to the whole batch with one
gather, then normalised with the model's statistics (Images: the model's recipe,
models.Recipe). No DataLoader, no PIL. The optimiser, fresh every round, is
Adam or SGD (make_optimizer).

`bf16` (a run's precision, precision.py) means bf16 autocast, on CUDA and on a CPU
that computes bf16 natively; weights, optimiser state and losses stay fp32. On CUDA
it goes with channels_last activations (AlexNet has no batch norm, so the layout
changes only which convolution kernels run, not the arithmetic); on a CPU it
measured slower (training with bf16 autocast 31.0 img/s, 27.9 with channels_last, on an
AMD EPYC with native bf16: benchmarks/RESULTS.md) and is not used.
`configure_backends` chooses between fast (cuDNN autotuning) and bit-for-bit
reproducible kernels.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedshard.core import models

# AlexNet's, the default of every function here: CIFAR-100's statistics, 32 x 32, crop padding 4.
MEAN, STD = models.CIFAR100_MEAN, models.CIFAR100_STD
PAD = 4
SIZE = models.NATIVE_IMAGE_SIZE


# cuBLAS needs a fixed workspace configuration to be deterministic; see
# https://docs.nvidia.com/cuda/cublas/#results-reproducibility
CUBLAS_WORKSPACE = ":4096:8"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """Pick fast or reproducible kernels for this process; call once, before any CUDA work.

    CUDA, deterministic: deterministic cuDNN/cuBLAS algorithms only (an operation
    without one raises instead of silently varying); slower.
    CUDA, not deterministic: cuDNN autotunes its algorithms (the batch shapes are
    fixed), which is faster but may vary in the last bits between runs.
    CPU: nothing to do; the kernels fedshard uses there are deterministic for a
    given number of threads.
    """
    if device.type != "cuda":
        return
    if deterministic:
        # Read when cuBLAS creates its workspace, hence "before any CUDA work".
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def _nll_loss(log_probs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """F.nll_loss, except where deterministic CUDA mode is on: PyTorch flags CUDA NLLLoss
    as nondeterministic (atomicAdd), so there the picked log-probabilities are reduced directly."""
    if log_probs.is_cuda and torch.are_deterministic_algorithms_enabled():
        picked = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
        return picked.sum() if reduction == "sum" else picked.mean()
    return F.nll_loss(log_probs, labels, reduction=reduction)


@dataclass
class DeviceData:
    """Images (N,3,32,32) uint8 and labels (N,) int64, both on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray, device: torch.device) -> DeviceData:
        return cls(torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Preprocessing:
    """How a model sees CIFAR's 32 x 32 uint8 images: resized to `size`, in training cropped at random
    from the image zero-padded by `pad` and flipped, standardised with `mean` and `std` per channel.
    The default is AlexNet's recipe."""

    size: int = SIZE
    pad: int = PAD
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    @classmethod
    def of(cls, model: str, image_size: int) -> Preprocessing:
        """The recipe of `model` (models.Recipe) at `image_size`."""
        recipe = models.get(model).recipe
        return cls(image_size, recipe.pad_at(image_size), recipe.mean, recipe.std)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B,3,h,w) -> uint8 (B,3,size,size): bilinear, as torchvision's Resize of a PIL image,
    rounded back to uint8 as PIL's is. Images of that size already come back as they are."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def normalize(images: torch.Tensor, prep: Preprocessing = Preprocessing()) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float, scaled to [0, 1] then standardised per channel.

    (x/255 - mean)/std as one multiply-add, in place on the fresh float copy.
    """
    mean = torch.tensor(prep.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=images.device).view(1, 3, 1, 1)
    return images.float().mul_(1 / (255 * std)).sub_(mean / std)


def evaluation_input(images: torch.Tensor, prep: Preprocessing = Preprocessing()) -> torch.Tensor:
    """What the model is given to evaluate uint8 CIFAR images: resized and normalised, not augmented."""
    return normalize(resize(images, prep.size), prep)


def draw_augmentation(
    b: int, generator: torch.Generator, device: torch.device, pad: int = PAD
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: crop offsets dy, dx in 0..2*pad into the padded image, and whether to flip; each (b, 1)."""
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=device)
    flip = torch.rand((b, 1), generator=generator, device=device) < 0.5
    return dy, dx, flip


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = PAD) -> torch.Tensor:
    """Per-image random crop of the zero-padded image and random horizontal flip, as one gather."""
    dy, dx, flip = draw_augmentation(images.shape[0], generator, images.device, pad)
    return apply_augmentation(images, dy, dx, flip, pad)


def apply_augmentation(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = PAD
) -> torch.Tensor:
    """Crop image i at (dy[i], dx[i]) of its zero-padded self, then mirror it if flip[i].

    Mirroring a crop equals cropping the mirrored padded image at 2*pad - dx, so
    the batch and its mirror image are viewed (no copy) as every window of the
    image's size, (B, 2, 3, 9, 9, 32, 32) at 32 x 32 with pad 4, and one gather
    picks each image's window: four indices per image rather than per pixel,
    several times faster on a CPU.
    """
    b, size = images.shape[0], images.shape[-1]
    padded = F.pad(images, (pad, pad, pad, pad))
    windows = torch.stack([padded, padded.flip(3)], 1).unfold(3, size, 1).unfold(4, size, 1)
    flip, dx = flip.view(b), dx.view(b)
    return windows[
        torch.arange(b, device=images.device), flip.long(), :, dy.view(b), torch.where(flip, 2 * pad - dx, dx)
    ]


def input_batches(
    data: DeviceData,
    batch_size: int,
    generator: torch.Generator,
    channels_last: bool = False,
    prep: Preprocessing = Preprocessing(),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over `data`: (resized, augmented, normalised float images, labels) per batch.

    This is the whole training input pipeline; all of it runs on the data's device.
    """
    order = torch.randperm(len(data), generator=generator, device=data.images.device)
    for batch in order.split(batch_size):
        # index_select, not images[batch]: the same rows, many times faster on a CPU.
        images = resize(data.images.index_select(0, batch), prep.size)
        x = normalize(augment(images, generator, prep.pad), prep)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, data.labels.index_select(0, batch)


def make_optimizer(name: str, parameters: Iterable[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
    """A fresh optimiser (config.OPTIMIZERS), as the harness's: adam, Adam with weight decay 1e-4 (its
    AlexNet's), or sgd, SGD with momentum 0.9 and weight decay 1e-4 (its ResNet-34's). Fused: one
    pass over the parameters per step instead of several; on a CPU at batch 8 it cut a full AlexNet
    step from 0.98 s to 0.40 s (benchmarks/RESULTS.md)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=1e-4, fused=True)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, weight_decay=1e-4, fused=True)
    raise ValueError(f"optimizer={name!r}: must be adam or sgd")


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[object]:
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _use_channels_last(device: torch.device, bf16: bool, channels_last: bool | None) -> bool:
    """channels_last goes with bf16 on CUDA unless asked for explicitly (True/False)."""
    return (bf16 and device.type == "cuda") if channels_last is None else channels_last


@contextlib.contextmanager
def _memory_format(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """Run `model` with channels_last weights and give it back contiguous: callers flatten
    parameters with .view(-1) (transport, parameters_to_vector) and load state dicts into them.
    The same Parameter objects are kept, so references to them stay valid."""
    if not channels_last:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


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
    bf16: bool = False,
    channels_last: bool | None = None,
    on_step: Callable[[int, int], None] | None = None,
    optimizer: str = "adam",
    prep: Preprocessing = Preprocessing(),
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> TrainResult:
    """A fresh `optimizer` (make_optimizer) and `epochs` shuffled passes over `data`, seen as `prep` says.

    channels_last None: on with bf16 on CUDA (see the module docstring). `on_step(done, total)`
    is told after every optimiser step how many of the round's steps are done (progress).
    `extra_loss(model)` is added to what each step minimises (a strategy's term: FedProx's proximal
    term); the loss reported is the NLL alone, the task's loss.
    """
    start = time.perf_counter()
    device = data.images.device
    fast_layout = _use_channels_last(device, bf16, channels_last)
    model.train()
    n = len(data)
    total = torch.zeros((), device=device)  # summed on the device: no sync per step
    with _memory_format(model, fast_layout):
        # Created after the layout change, so the optimiser's state matches the weights' layout.
        opt = make_optimizer(optimizer, model.parameters(), learning_rate)
        steps, done = epochs * math.ceil(n / batch_size), 0
        for _ in range(epochs):
            for x, y in input_batches(data, batch_size, generator, fast_layout, prep):
                with _autocast(device, bf16):
                    loss = _nll_loss(model(x), y)  # the models return fp32 log-probabilities
                opt.zero_grad(set_to_none=True)
                (loss if extra_loss is None else loss + extra_loss(model)).backward()
                opt.step()
                total += loss.detach() * len(y)
                done += 1
                if on_step is not None:
                    on_step(done, steps)
        mean_loss = total.item() / (n * epochs)
    return TrainResult(samples=n, mean_loss=mean_loss, seconds=time.perf_counter() - start)


def evaluate(
    model: nn.Module,
    data: DeviceData,
    batch_size: int = 1000,
    bf16: bool = False,
    channels_last: bool | None = None,
    prep: Preprocessing = Preprocessing(),
) -> tuple[float, float]:
    """(mean NLL, fraction correct) over all of `data`, in large batches, seen as `prep` says (resized,
    normalised); one host sync at the end."""
    model.eval()
    device = data.images.device
    fast_layout = _use_channels_last(device, bf16, channels_last)
    # The layout change happens outside inference mode: weights converted inside it would
    # become inference tensors that a later load_state_dict or training step cannot touch.
    with _memory_format(model, fast_layout), torch.inference_mode():
        loss = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        for images, labels in zip(data.images.split(batch_size), data.labels.split(batch_size)):
            x = evaluation_input(images, prep)
            if fast_layout:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, bf16):
                out = model(x)
            loss += _nll_loss(out, labels, reduction="sum").double()
            correct += (out.argmax(1) == labels).sum()
    n = len(data)
    return loss.item() / n, correct.item() / n
