"""Training images/s of every model of the registry (fedshard.core.models), as a trainer trains it: its
own recipe (optimizer, batch size; images resized, cropped and flipped on the device), the full
model and a world-size-2 slice, at 32 x 32 and at the model's own image size where that differs
(ResNet-34: 224 x 224).

Each figure is the best of `repeats` passes of train_local over `steps` batches of random images
(after one untimed pass), on the threads a world-size-1 trainer gets (all this process may use):
--quick times one pass of 4 batches at 32 x 32 and of 1 batch at 224 x 224, else the best of 2
passes of 16 and 3 batches. What a round costs follows: one epoch of N images takes N over the
full model's images/s at world size 1; at world size 2 each trainer trains N / 2 images on its
slice, both at once on one machine's cores.
"""

from __future__ import annotations

import torch

from common import best_of
from fedshard.core import models, training
from report import Section


def train_images_per_s(name: str, image_size: int, world_size: int, steps: int, repeats: int) -> float:
    """Images/s of train_local on `steps` batches of slice 0 of `world_size` (the full model at 1)."""
    model = models.get(name)
    recipe = model.recipe
    torch.manual_seed(0)
    net = model.network(model.slice_widths(world_size, 0) if world_size > 1 else None)
    gen = torch.Generator().manual_seed(0)
    n = recipe.batch_size * steps
    data = training.DeviceData(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.randint(0, 100, (n,), generator=gen),
    )
    prep = training.Preprocessing.of(name, image_size)

    def one_pass():
        training.train_local(
            net,
            data,
            learning_rate=1e-4,
            epochs=1,
            batch_size=recipe.batch_size,
            generator=gen,
            optimizer=recipe.optimizer,
            prep=prep,
        )

    return n / best_of(one_pass, repeats, warmup=1)[0]


def models_section(quick: bool) -> Section:
    """Every model at 32 x 32 and at its own image size, full and as a world-size-2 slice."""
    details, figures, rows = {}, {}, []
    for name, model in models.REGISTRY.items():
        for size in sorted({models.NATIVE_IMAGE_SIZE, model.recipe.image_size}):
            steps = (1 if quick else 3) if size > 64 else (4 if quick else 16)  # a 224 x 224 step takes seconds
            for world_size in (1, 2):
                ips = train_images_per_s(name, size, world_size, steps, repeats=1 if quick else 2)
                key = f"{name}_{size}px_ws{world_size}"
                details[key] = {
                    "model": name,
                    "image_size": size,
                    "world_size": world_size,
                    "images_per_s": ips,
                    "batch_size": model.recipe.batch_size,
                    "optimizer": model.recipe.optimizer,
                    "images_timed": model.recipe.batch_size * steps,
                }
                if world_size == 1:
                    figures[f"train_images_per_s_{name}_{size}px"] = ips
                rows.append(
                    (f"train_images_per_s {name} {size}px" + (" (ws2 slice)" if world_size > 1 else ""), ips, "img/s")
                )
    return Section(details, figures, rows)
