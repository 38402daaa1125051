"""fedshard's input pipeline and evaluation against the classic way, the same images on both sides:
data_pipeline_speedup and eval_speedup.

The classic way is what torchvision's CIFAR100 dataset with PIL transforms and a DataLoader
does; fedshard keeps a partition as one uint8 tensor on the device and crops, flips and
normalises whole batches there (fedshard.core.training).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common import best_of, sync, threads
from fedshard.core import models, precision, training
from report import Section


class ClassicCIFAR(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR100 does: HWC uint8 numpy images, a PIL image per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.data = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # (N,32,32,3), as torchvision stores it
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def classic_transforms(train: bool):
    import torchvision.transforms as T

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(training.MEAN, training.STD)])


# ----------------------------------------------------------------------------- input pipeline


def bench_data_pipeline(images, labels, device, batch_size: int, repeats: int) -> dict:
    """Images/s of one pass over the same images, each pipeline delivering batches on `device`.
    Both run on one torch thread: the classic pipeline is single-threaded by construction."""
    n = len(labels)
    loader = torch.utils.data.DataLoader(
        ClassicCIFAR(images, labels, classic_transforms(True)), batch_size=batch_size, shuffle=True, num_workers=0
    )
    data = training.DeviceData.from_numpy(images, labels, device)
    generator = torch.Generator(device).manual_seed(0)

    def classic():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync(device)

    def fedshard():
        for _ in training.input_batches(data, batch_size, generator):
            pass
        sync(device)

    classic_times, fast_times = [], []
    with threads(1):
        fedshard()  # warm-up (allocator, CUDA kernels)
        for _ in range(repeats):  # interleaved, so both see the same background load
            classic_times.append(best_of(classic, 1)[0])
            fast_times.append(best_of(fedshard, 1)[0])
    classic_ips, fast_ips = n / min(classic_times), n / min(fast_times)
    return {
        "images": n,
        "batch_size": batch_size,
        "torch_threads": 1,
        "classic_images_per_s": classic_ips,
        "fedshard_images_per_s": fast_ips,
        "data_pipeline_speedup": fast_ips / classic_ips,
    }


def data_pipeline_section(images, labels, device, repeats: int) -> Section:
    d = bench_data_pipeline(images, labels, device, 64, repeats)
    return Section(
        d,
        {"data_pipeline_speedup": d["data_pipeline_speedup"]},
        [
            ("data_pipeline_speedup", d["data_pipeline_speedup"], "x"),
            ("  fedshard pipeline", d["fedshard_images_per_s"], "img/s"),
            ("  classic pipeline", d["classic_images_per_s"], "img/s"),
        ],
    )


# ----------------------------------------------------------------------------- evaluation


def bench_eval(images, labels, device, n_fast: int, n_plain: int, bf16: bool, repeats: int) -> dict:
    """training.evaluate vs a batch-size-1 DataLoader loop, full AlexNet, the process's threads."""
    torch.manual_seed(0)
    model = models.get("alexnet").network().to(device)
    fast_data = training.DeviceData.from_numpy(images[:n_fast], labels[:n_fast], device)
    plain = torch.utils.data.DataLoader(
        ClassicCIFAR(images[:n_plain], labels[:n_plain], classic_transforms(False)),
        batch_size=1,
        shuffle=False,
        num_workers=0,
    )

    def fast():
        training.evaluate(model, fast_data, batch_size=1000, bf16=bf16)

    def plain_loop():
        model.eval()
        loss, correct = 0.0, 0
        with torch.no_grad():
            for x, y in plain:
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss += F.nll_loss(out, y).item()
                correct += int((out.argmax(1) == y).item())
        return loss, correct

    training.evaluate(model, training.DeviceData(fast_data.images[:8], fast_data.labels[:8]), bf16=bf16)  # warm-up
    fast_s, _ = best_of(fast, repeats)
    plain_s, _ = best_of(plain_loop, 1)
    return {
        "fedshard_images": n_fast,
        "plain_images": n_plain,
        "bf16": bf16,
        "fedshard_images_per_s": n_fast / fast_s,
        "plain_images_per_s": n_plain / plain_s,
        "eval_speedup": (n_fast / fast_s) / (n_plain / plain_s),
    }


def eval_section(images, labels, device, n_fast: int, n_plain: int) -> Section:
    """In the precision a run evaluates in on this device (precision=auto)."""
    bf16 = precision.resolve("auto", device.type) == "bf16"
    e = bench_eval(images, labels, device, n_fast, n_plain, bf16=bf16, repeats=2)
    return Section(
        e,
        {"eval_speedup": e["eval_speedup"]},
        [
            ("eval_speedup", e["eval_speedup"], "x"),
            ("  fedshard evaluate", e["fedshard_images_per_s"], "img/s"),
            ("  batch-size-1 loop", e["plain_images_per_s"], "img/s"),
        ],
    )
